/* Minimal assertions for speedserve's test executables (library speed_test_common).
 *
 * A test is a plain program: it returns 0 when every CHECK held, 1 otherwise, and
 * 77 (SPEED_TEST_SKIP) when something it needs is absent, saying why. Checks keep
 * going after a failure so one run shows every broken case.
 *
 * The checks are macros because they report the caller's __FILE__ and __LINE__. They count
 * into the two process-wide counters below, defined once in check.c: a CHECK that fails
 * inside a helper library (engine_test_util.c, openai_util.c, ...) fails the test that
 * called it, and CHECK_DONE() at the end of main turns the count into the exit code.
 *
 * Thread-safety: the counters are atomic, so any thread may CHECK; the message lines of
 * two threads failing at once may interleave.
 */
#ifndef SPEED_TESTS_CHECK_H
#define SPEED_TESTS_CHECK_H

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SPEED_TEST_SKIP 77

/* Checks that failed / that ran in this process. Tests may read them (e.g. to print more
 * context once something failed); only the macros below write them. */
extern _Atomic int check_failures_;
extern _Atomic int check_count_;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        check_count_++;                                                              \
        if (!(cond)) {                                                               \
            check_failures_++;                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_MSG(cond, ...)                                                         \
    do {                                                                             \
        check_count_++;                                                              \
        if (!(cond)) {                                                               \
            check_failures_++;                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                            \
            fputc('\n', stderr);                                                     \
        }                                                                            \
    } while (0)

#define CHECK_INT_EQ(a, b)                                                   \
    do {                                                                     \
        long long check_a_ = (long long)(a), check_b_ = (long long)(b);      \
        CHECK_MSG(check_a_ == check_b_, "%lld != %lld", check_a_, check_b_); \
    } while (0)

#define CHECK_STR_EQ(a, b)                                                                   \
    do {                                                                                     \
        const char *check_a_ = (a), *check_b_ = (b);                                         \
        CHECK_MSG(check_a_ &&check_b_ &&strcmp(check_a_, check_b_) == 0, "\"%s\" != \"%s\"", \
                  check_a_ ? check_a_ : "(null)", check_b_ ? check_b_ : "(null)");           \
    } while (0)

/* `hay` contains `needle` (for error messages). */
#define CHECK_CONTAINS(hay, needle)                                                        \
    do {                                                                                   \
        const char *check_h_ = (hay), *check_n_ = (needle);                                \
        CHECK_MSG(check_h_ &&strstr(check_h_, check_n_), "\"%s\" does not contain \"%s\"", \
                  check_h_ ? check_h_ : "(null)", check_n_);                               \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                                                      \
    do {                                                                                                           \
        double check_a_ = (a), check_b_ = (b);                                                                     \
        CHECK_MSG(fabs(check_a_ - check_b_) <= (tol), "%.9g vs %.9g (tol %g)", check_a_, check_b_, (double)(tol)); \
    } while (0)

/* End of main: print a one-line summary and return the exit code. */
#define CHECK_DONE()                                                                                   \
    (fprintf(stderr, "%s: %d checks, %d failed\n", __FILE__, (int)check_count_, (int)check_failures_), \
     check_failures_ ? 1 : 0)

#define SKIP_TEST(...)                \
    do {                              \
        fprintf(stderr, "SKIP: ");    \
        fprintf(stderr, __VA_ARGS__); \
        fputc('\n', stderr);          \
        return SPEED_TEST_SKIP;       \
    } while (0)

#endif /* SPEED_TESTS_CHECK_H */
