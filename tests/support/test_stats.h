/* The statistics benchmarks and timing checks take of their samples (library
 * speed_test_common).
 *
 * Thread-safety: reentrant (they work on the caller's array).
 */
#ifndef SPEED_TESTS_TEST_STATS_H
#define SPEED_TESTS_TEST_STATS_H

#include <stddef.h>

/* Sorts v[0..n) ascending (NaNs in unspecified places). */
void tu_sort_doubles(double *v, size_t n);

/* The median of v[0..n), n >= 1 (the mean of the middle two when n is even). Sorts v. */
double tu_median(double *v, int n);

#endif /* SPEED_TESTS_TEST_STATS_H */
