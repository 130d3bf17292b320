/* Clocks and waits for the tests: see test_clock.h. Short names over common/clock.h, the one
 * clock module, so a test reads like what it checks; only CPU time is the tests' own. */
#include "test_clock.h"

#include "clock.h"

double now_s(void) { return speed_clock_mono_s(); }

double now_ms(void) { return (double)speed_clock_mono_ns() / 1e6; }

uint64_t realtime_ms(void) { return (uint64_t)speed_clock_wall_ms(); }

double cpu_s(void) {
    struct timespec ts = speed_clock_now(CLOCK_PROCESS_CPUTIME_ID);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void sleep_ms(int ms) { speed_clock_sleep_ms(ms); }

struct timespec realtime_after_ms(int ms) {
    return speed_clock_deadline(CLOCK_REALTIME, ms);
}
