/* speed_clock: see clock.h. */
#include "clock.h"

#include <errno.h>

#define NS_PER_S  1000000000L
#define NS_PER_MS 1000000L

struct timespec speed_clock_now(clockid_t clock) {
    struct timespec ts;
    /* Fails only for a clock the system lacks; both clocks used here always exist. */
    if (clock_gettime(clock, &ts) != 0) ts = (struct timespec){0, 0};
    return ts;
}

uint64_t speed_clock_mono_ns(void) {
    struct timespec ts = speed_clock_now(CLOCK_MONOTONIC);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t speed_clock_mono_ms(void) {
    struct timespec ts = speed_clock_now(CLOCK_MONOTONIC);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / NS_PER_MS;
}

double speed_clock_mono_s(void) {
    struct timespec ts = speed_clock_now(CLOCK_MONOTONIC);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int64_t speed_clock_wall_ms(void) {
    struct timespec ts = speed_clock_now(CLOCK_REALTIME);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / NS_PER_MS;
}

struct timespec speed_clock_timespec_add_ms(struct timespec ts, int64_t ms) {
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * NS_PER_MS; /* in (-1e9, 2e9): one carry or borrow at most */
    if (ts.tv_nsec >= NS_PER_S) {
        ts.tv_sec++;
        ts.tv_nsec -= NS_PER_S;
    } else if (ts.tv_nsec < 0) {
        ts.tv_sec--;
        ts.tv_nsec += NS_PER_S;
    }
    return ts;
}

struct timespec speed_clock_deadline(clockid_t clock, int64_t ms) {
    return speed_clock_timespec_add_ms(speed_clock_now(clock), ms > 0 ? ms : 0);
}

int speed_clock_cond_init(pthread_cond_t *cond) {
    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc != 0) return rc;
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    rc = pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
    return rc;
}

void speed_clock_sleep_ms(int64_t ms) {
    if (ms <= 0) return;
    struct timespec left = {(time_t)(ms / 1000), (long)(ms % 1000) * NS_PER_MS};
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {}
}
