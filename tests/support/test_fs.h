/* Scratch directories and whole-file reads and writes for the tests (library speed_test_common).
 *
 * A test makes one scratch directory, tu_tmp_init("name"): a fresh "<base>/name-XXXXXX" under
 * $SPEED_TEST_TMP (ctest sets it to build/test-tmp) or /tmp. tu_root holds its path and
 * tu_path() builds paths inside it. Memory these functions return is plain malloc (free()),
 * not speed_malloc, so it never shows in the speed_alloc live counts tests check.
 *
 * Failures of the test's own setup (no scratch directory, a file that cannot be written) print
 * the cause and exit(1): the test could not run, and no result it printed would mean anything.
 *
 * Thread-safety: tu_tmp_init and tu_path use process-wide buffers (call tu_tmp_init once, from
 * main; tu_path's results are overwritten after 8 more calls); the rest is reentrant.
 */
#ifndef SPEED_TESTS_TEST_FS_H
#define SPEED_TESTS_TEST_FS_H

#include <stddef.h>

/* The scratch directory of this test ("" before tu_tmp_init). */
extern char tu_root[512];

/* Creates the scratch directory "<$SPEED_TEST_TMP or /tmp>/<test>-XXXXXX" and returns its
 * path (tu_root). Exits 1 when it cannot be created. */
const char *tu_tmp_init(const char *test);

/* "<tu_root>/<printf(fmt, ...)>" in one of 8 rotating static buffers. */
const char *tu_path(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Removes a file or a whole directory tree; silent about what does not exist. */
void tu_rm_rf(const char *path);

/* Writes n bytes (or a NUL-terminated text) as the whole file, replacing it. Exits 1 on
 * failure. */
void tu_write(const char *path, const void *data, size_t n);
void tu_write_text(const char *path, const char *text);

/* The whole file in a malloc'd buffer with a NUL after the last byte (the data may contain
 * NULs); *n_p (may be NULL) gets its length. NULL when the file cannot be read. The caller
 * free()s it. */
char *tu_read(const char *path, size_t *n_p);

#endif /* SPEED_TESTS_TEST_FS_H */
