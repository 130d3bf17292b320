/* What the fuzz targets share (tests/fuzz): quiet logging, jansson on speed_malloc, memfd
 * files for entry points that take a path, and an abort that names the broken invariant.
 * Not an API outside tests/fuzz. */
#ifndef SPEED_FUZZ_UTIL_H
#define SPEED_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Once per process (from LLVMFuzzerInitialize): logs go to a sink that drops them (every
 * message is still formatted, so the formatting is fuzzed too) unless SPEED_FUZZ_LOG is set
 * (reproducing a crash: the log then says what the parser saw); jansson allocates with
 * speed_malloc / speed_free, as in the daemons. */
void fz_init(void);

/* An anonymous in-memory file holding data[0..size), for entry points that only take a
 * path: returns its fd (close it) and writes "/proc/self/fd/N" into path. Aborts when the
 * kernel refuses (that is the harness, not the code under test). */
int fz_memfd(const uint8_t *data, size_t size, char *path, size_t path_size);

/* Aborts with the target's message when an invariant the code promises does not hold: the
 * fuzzer reports it as a crash, with the input. */
#define FZ_ASSERT(cond)                                                                                                \
    do {                                                                                                               \
        if (!(cond)) fz_fail(__FILE__, __LINE__, #cond);                                                               \
    } while (0)
__attribute__((noreturn)) void fz_fail(const char *file, int line, const char *what);

#endif /* SPEED_FUZZ_UTIL_H */
