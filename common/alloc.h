/* Counted host allocator with fault injection.
 *
 * Every heap allocation in speedserve goes through these functions so that
 *   - tests can check that an operation released everything it took
 *     (speed_alloc_live_count / speed_alloc_live_bytes before and after), and
 *   - tests can make the Nth allocation fail (SQLite-style fault injection) and check
 *     that every error path returns SPEED_ERR_NO_MEMORY and leaks nothing.
 *
 * Failure semantics: an *injected* failure returns NULL and callers must handle it.
 * A *real* failure of the system allocator calls the out-of-memory hook, which by
 * default prints a message and aborts (a host that cannot malloc a few bytes cannot
 * serve anyway); a test may install a hook that returns instead, then NULL is returned.
 *
 * Memory from speed_malloc/calloc/realloc/strdup is released with speed_free;
 * memory from speed_aligned_alloc with speed_aligned_free. free(NULL) is a no-op.
 *
 * Thread-safety: all functions are thread-safe (atomic counters). The fault-injection
 * controls are meant for single-threaded tests.
 */
#ifndef SPEED_ALLOC_H
#define SPEED_ALLOC_H

#include <stddef.h>
#include <stdint.h>

void *speed_malloc(size_t size);
void *speed_calloc(size_t n, size_t size);   /* NULL also on n*size overflow */
void *speed_realloc(void *ptr, size_t size); /* on NULL return, ptr is untouched */
char *speed_strdup(const char *s);
char *speed_strndup(const char *s, size_t n);
void speed_free(void *ptr);

/* `alignment` is a power of two >= sizeof(void *); size may be 0. */
void *speed_aligned_alloc(size_t alignment, size_t size);
void speed_aligned_free(void *ptr);

/* Live allocations and bytes (requested sizes) held right now, process-wide. */
int64_t speed_alloc_live_count(void);
int64_t speed_alloc_live_bytes(void);
/* Allocations made since the process started (monotonic). */
int64_t speed_alloc_total_count(void);

/* Fault injection: the allocation `n` calls from now fails (0 = the next one),
 * and every later one too if `sticky`. n < 0 disables injection. */
void speed_alloc_fail_after(int64_t n, int sticky);
/* Number of allocations that failed by injection since the last speed_alloc_fail_after. */
int64_t speed_alloc_injected_failures(void);

/* Called when the system allocator fails. Return to let speed_malloc return NULL. */
typedef void (*speed_alloc_oom_cb_t)(size_t size);
void speed_alloc_set_oom_hook(speed_alloc_oom_cb_t hook); /* NULL restores the default */

#endif /* SPEED_ALLOC_H */
