/* Clocks, deadlines and sleeps: the one place the process reads the time.
 *
 * Two clocks, chosen by what the time is for:
 *   monotonic (CLOCK_MONOTONIC)  durations, rates, timeouts, poll periods. Never goes back and
 *                                is not moved by NTP or an operator setting the date.
 *   wall (CLOCK_REALTIME)        times shown to people or sent to another host (a KV lease's
 *                                deadline in ms since the epoch), and the clock a
 *                                pthread_cond_t without attributes measures timed waits on.
 *
 * A deadline for pthread_cond_timedwait must be on the condition variable's clock: a cond made
 * by speed_clock_cond_init takes speed_clock_deadline(CLOCK_MONOTONIC, ms), one made with
 * default attributes speed_clock_deadline(CLOCK_REALTIME, ms).
 *
 * Thread-safety: everything here is reentrant. Only speed_clock_sleep_ms blocks.
 */
#ifndef SPEED_CLOCK_H
#define SPEED_CLOCK_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

/* Now on `clock` (CLOCK_MONOTONIC or CLOCK_REALTIME; any clockid_t the system has). */
struct timespec speed_clock_now(clockid_t clock);

/* Monotonic time since an arbitrary start (boot, on Linux): nanoseconds, milliseconds (rounded
 * down), seconds. Only differences mean anything. */
uint64_t speed_clock_mono_ns(void);
int64_t speed_clock_mono_ms(void);
double speed_clock_mono_s(void);

/* Wall-clock milliseconds since the Unix epoch (rounded down). */
int64_t speed_clock_wall_ms(void);

/* ts + ms, normalised (0 <= tv_nsec < 1e9, carrying into or borrowing from tv_sec). ms may be
 * negative. */
struct timespec speed_clock_timespec_add_ms(struct timespec ts, int64_t ms);

/* The absolute time ms milliseconds from now on `clock`, for pthread_cond_timedwait (see the
 * top of this file for which clock). ms <= 0 gives a deadline that has already come (or is
 * now): the wait returns ETIMEDOUT at once unless signalled. */
struct timespec speed_clock_deadline(clockid_t clock, int64_t ms);

/* Initialises *cond so that its timed waits measure CLOCK_MONOTONIC: a deadline then survives
 * the wall clock being set. Destroy it with pthread_cond_destroy. Returns 0 or the error of
 * pthread_cond_init (EAGAIN, ENOMEM). */
int speed_clock_cond_init(pthread_cond_t *cond);

/* Sleeps at least ms milliseconds (nothing for ms <= 0), resuming after signal handlers. */
void speed_clock_sleep_ms(int64_t ms);

#endif /* SPEED_CLOCK_H */
