/* common/clock: the monotonic and wall clocks agree with each other and with the units they
 * claim, deadlines carry nanoseconds into seconds, sleeps last at least as asked, and a
 * monotonic condition variable times out on its deadline. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>

#include "check.h"
#include "clock.h"

static void test_monotonic(void) {
    uint64_t prev = speed_clock_mono_ns();
    for (int i = 0; i < 100000; i++) {
        uint64_t now = speed_clock_mono_ns();
        CHECK_MSG(now >= prev, "monotonic clock went back: %llu after %llu", (unsigned long long)now,
                  (unsigned long long)prev);
        prev = now;
    }
    /* The units agree: read ns, s, ms, ns in that order; each lies between its neighbours. */
    uint64_t ns0 = speed_clock_mono_ns();
    double s = speed_clock_mono_s();
    int64_t ms = speed_clock_mono_ms();
    uint64_t ns1 = speed_clock_mono_ns();
    CHECK(s * 1e9 >= (double)ns0 - 1e3 && s * 1e9 <= (double)ns1 + 1e3); /* double rounding */
    CHECK(ms >= (int64_t)(ns0 / 1000000u) && ms <= (int64_t)(ns1 / 1000000u));
    struct timespec ts = speed_clock_now(CLOCK_MONOTONIC);
    CHECK(ts.tv_nsec >= 0 && ts.tv_nsec < 1000000000L);
    CHECK((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec >= ns1);
}

static void test_wall(void) {
    int64_t ms = speed_clock_wall_ms();
    CHECK_MSG(ms > 1577836800000LL, "wall clock before 2020: %lld", (long long)ms); /* 2020-01-01 */
    struct timespec ts = speed_clock_now(CLOCK_REALTIME);
    int64_t ts_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    CHECK(ts_ms >= ms && ts_ms - ms < 10000);
    CHECK((int64_t)time(NULL) * 1000 - ms < 10000);
}

static void test_timespec_add(void) {
    struct timespec t;
    t = speed_clock_timespec_add_ms((struct timespec){10, 999999999L}, 1);
    CHECK_INT_EQ(t.tv_sec, 11);
    CHECK_INT_EQ(t.tv_nsec, 999999L);
    t = speed_clock_timespec_add_ms((struct timespec){10, 500000000L}, 2500);
    CHECK_INT_EQ(t.tv_sec, 13);
    CHECK_INT_EQ(t.tv_nsec, 0);
    t = speed_clock_timespec_add_ms((struct timespec){10, 400000000L}, 1700);
    CHECK_INT_EQ(t.tv_sec, 12);
    CHECK_INT_EQ(t.tv_nsec, 100000000L);
    t = speed_clock_timespec_add_ms((struct timespec){10, 0}, 0);
    CHECK_INT_EQ(t.tv_sec, 10);
    CHECK_INT_EQ(t.tv_nsec, 0);
    t = speed_clock_timespec_add_ms((struct timespec){10, 100000000L}, -200); /* borrow */
    CHECK_INT_EQ(t.tv_sec, 9);
    CHECK_INT_EQ(t.tv_nsec, 900000000L);
    t = speed_clock_timespec_add_ms((struct timespec){10, 0}, -3001);
    CHECK_INT_EQ(t.tv_sec, 6);
    CHECK_INT_EQ(t.tv_nsec, 999000000L);
    t = speed_clock_timespec_add_ms((struct timespec){0, 999999999L}, 86400000LL * 365);
    CHECK_INT_EQ(t.tv_sec, 86400LL * 365);
    CHECK_INT_EQ(t.tv_nsec, 999999999L);
}

static void test_deadline(void) {
    /* Every millisecond count, from every nanosecond phase: normalised and ms ahead. */
    for (int64_t ms = 0; ms < 3000; ms += 7) {
        struct timespec before = speed_clock_now(CLOCK_MONOTONIC);
        struct timespec d = speed_clock_deadline(CLOCK_MONOTONIC, ms);
        struct timespec after = speed_clock_now(CLOCK_MONOTONIC);
        CHECK(d.tv_nsec >= 0 && d.tv_nsec < 1000000000L);
        int64_t d_ns = (int64_t)d.tv_sec * 1000000000 + d.tv_nsec;
        int64_t lo = (int64_t)before.tv_sec * 1000000000 + before.tv_nsec + ms * 1000000;
        int64_t hi = (int64_t)after.tv_sec * 1000000000 + after.tv_nsec + ms * 1000000;
        CHECK_MSG(d_ns >= lo && d_ns <= hi, "deadline of %lld ms off", (long long)ms);
    }
    /* A past deadline is now. */
    struct timespec now = speed_clock_now(CLOCK_REALTIME);
    struct timespec d = speed_clock_deadline(CLOCK_REALTIME, -5000);
    CHECK(d.tv_sec >= now.tv_sec);
}

static void test_sleep(void) {
    for (int ms = 0; ms <= 20; ms += 10) {
        uint64_t t0 = speed_clock_mono_ns();
        speed_clock_sleep_ms(ms);
        uint64_t dt = speed_clock_mono_ns() - t0;
        CHECK_MSG(dt >= (uint64_t)ms * 1000000u, "slept %llu ns for %d ms", (unsigned long long)dt, ms);
        CHECK_MSG(dt < (uint64_t)ms * 1000000u + 2000000000u, "slept %llu ns for %d ms", (unsigned long long)dt, ms);
    }
    uint64_t t0 = speed_clock_mono_ns();
    speed_clock_sleep_ms(-5);
    CHECK(speed_clock_mono_ns() - t0 < 1000000000u);
}

static void test_cond(void) {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cond;
    CHECK_INT_EQ(speed_clock_cond_init(&cond), 0);
    /* A monotonic deadline (seconds since boot) read on the wall clock would lie decades in
     * the past and time out at once: waiting its full 30 ms shows which clock the cond uses. */
    uint64_t t0 = speed_clock_mono_ns();
    struct timespec until = speed_clock_deadline(CLOCK_MONOTONIC, 30);
    pthread_mutex_lock(&mu);
    int rc = 0;
    while (rc == 0) rc = pthread_cond_timedwait(&cond, &mu, &until); /* spurious wake-ups: wait on */
    pthread_mutex_unlock(&mu);
    uint64_t dt = speed_clock_mono_ns() - t0;
    CHECK_INT_EQ(rc, ETIMEDOUT);
    CHECK_MSG(dt >= 29000000u && dt < 5000000000u, "a 30 ms monotonic deadline took %llu ns", (unsigned long long)dt);
    pthread_cond_destroy(&cond);
}

int main(void) {
    test_monotonic();
    test_wall();
    test_timespec_add();
    test_deadline();
    test_sleep();
    test_cond();
    return CHECK_DONE();
}
