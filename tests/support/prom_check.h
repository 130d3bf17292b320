/* A strict checker for the Prometheus text exposition format 0.0.4, standing in for
 * `promtool check metrics` (not installed here), in library speed_test_common. Used by the
 * metrics, HTTP and router tests.
 *
 * prom_check(text, err, cap) returns 0 when every line parses and the families are
 * consistent, else -1 with a message "line N: ..." in err. Checked:
 *   - every line ends in '\n'; no blank lines; '#' lines are HELP, TYPE or free comments;
 *   - HELP/TYPE: valid metric name, at most one of each per name, TYPE before the samples,
 *     type is counter|gauge|histogram|summary|untyped, HELP escapes only \\ and \n;
 *   - samples: valid name, {l="v",...} with valid label names, no duplicates, escapes only
 *     \\ \" \n, a value (float, NaN, +Inf, -Inf) and an optional integer timestamp;
 *   - a sample belongs to the family declared just before it (name, or name_bucket/_sum/
 *     _count for a histogram), families are not interleaved, no series appears twice;
 *   - counters are >= 0 and named *_total;
 *   - histograms, per label set: le present on buckets, le strictly increasing, counts
 *     non-decreasing, last le is +Inf, _sum and _count present, _count == +Inf bucket.
 * prom_value() reads one sample's value out of such a page.
 *
 * Thread-safety: prom_check keeps its (large) state in static storage: one call at a time.
 * prom_value is reentrant.
 */
#ifndef SPEED_TESTS_PROM_CHECK_H
#define SPEED_TESTS_PROM_CHECK_H

#include <stddef.h>

/* 0 when `text` is a valid exposition page (the rules above), else -1 with "line N: why" in
 * err[0..cap) (NUL-terminated; line 0 for whole-page rules such as a histogram's +Inf). */
int prom_check(const char *text, char *err, size_t cap);

/* The value of the sample line `series` (the exact name{labels} text, e.g.
 * "speed_router_requests_total{route=\"none\",status=\"400\"}") in a page, or NAN when the
 * page has no such line (or text is NULL). */
double prom_value(const char *text, const char *series);

#endif /* SPEED_TESTS_PROM_CHECK_H */
