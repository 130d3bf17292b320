/* Clocks and waits for the tests (library speed_test_common): short names over common/clock.h.
 *
 * One monotonic clock for every timeout and measurement (now_s / now_ms), the wall clock for
 * deadlines handed to the code under test (realtime_ms, e.g. KV lease deadlines), and the
 * absolute CLOCK_REALTIME times that sem_timedwait / pthread_cond_timedwait take.
 *
 * Thread-safety: every function is reentrant.
 */
#ifndef SPEED_TESTS_TEST_CLOCK_H
#define SPEED_TESTS_TEST_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Monotonic time in seconds / milliseconds (CLOCK_MONOTONIC; only differences mean anything). */
double now_s(void);
double now_ms(void);

/* Wall-clock milliseconds since the Unix epoch (CLOCK_REALTIME). */
uint64_t realtime_ms(void);

/* CPU time this process has used, in seconds (all threads). */
double cpu_s(void);

/* Sleeps ms milliseconds, resuming after signals. */
void sleep_ms(int ms);

/* The CLOCK_REALTIME instant ms milliseconds from now, as the *timedwait calls take it. */
struct timespec realtime_after_ms(int ms);

/* Polls `cond` every 2 ms until it holds or ms milliseconds pass; the caller checks `cond`
 * again afterwards. A macro because `cond` is re-evaluated on every round. */
#define WAIT_FOR(cond, ms)                                     \
    do {                                                       \
        double wait_until_ = now_ms() + (ms);                  \
        while (!(cond) && now_ms() < wait_until_) sleep_ms(2); \
    } while (0)

#endif /* SPEED_TESTS_TEST_CLOCK_H */
