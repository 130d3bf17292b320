/* The statistics of timing samples: see test_stats.h. */
#include "test_stats.h"

#include <stdlib.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

void tu_sort_doubles(double *v, size_t n) { qsort(v, n, sizeof *v, cmp_double); }

double tu_median(double *v, int n) {
    tu_sort_doubles(v, (size_t)n);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
