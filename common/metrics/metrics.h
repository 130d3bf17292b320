/* speed_metrics: a small thread-safe Prometheus registry for speedserve daemons.
 *
 * A registry (speed_metrics_t) holds metric families in registration order. A family has a
 * kind (counter, gauge, histogram), a name, a HELP text and zero or more label names. Each
 * distinct set of label values is a child ("series"): speed_router_requests_total{route=
 * "disaggregated",status="200"} is one child of the family speed_router_requests_total.
 *
 * Handles. Registration returns a handle of the family's kind (speed_counter_t,
 * speed_gauge_t, speed_histogram_t):
 *   - a family without labels: the handle IS its only child; update it directly;
 *   - a family with labels: the handle stands for the family; get a child with
 *     speed_counter_labels() (etc.) and update the child. Updating a labelled family's
 *     handle directly is a broken invariant (SPEED_ASSERT).
 * Handles (families and children) are owned by the registry and stay valid until
 * speed_metrics_destroy() (a child: or until its owner removes it, speed_counter_remove);
 * callers never free them. Look a child up once and keep it:
 * updates through a child handle are lock-free atomics and never allocate.
 *
 * Names. Metric names match [a-zA-Z_:][a-zA-Z0-9_:]* (the house style also avoids ':'),
 * counter names must end in "_total", and no two families may produce the same sample name
 * (a histogram "x" owns x_bucket, x_sum and x_count). Label names match
 * [a-zA-Z_][a-zA-Z0-9_]*, do not start with "__", are distinct within a family, and a
 * histogram may not use "le". Label values are any UTF-8 text (escaped on output).
 *
 * Output. speed_metrics_render() writes the Prometheus text exposition format 0.0.4:
 *   # HELP <name> <help, with \\ and \n escaped>
 *   # TYPE <name> counter|gauge|histogram
 *   <name>{l1="v1",l2="v2"} <value>
 * Families appear in registration order, children in creation order; a labelled family with
 * no children yet renders only its HELP and TYPE lines. Values are printed in the shortest
 * form that reads back to the same double ("3", "0.25", "1e-06", "+Inf", "NaN").
 * Histogram buckets are cumulative, end with le="+Inf", and _count always equals the
 * +Inf bucket (it is computed from the buckets at render time, so a scrape that races with
 * observations is still self-consistent; _sum may lag by the racing observations).
 *
 * Threading. Every function may be called from any thread. Registration and rendering take
 * the registry lock; child look-up takes the family lock; updates (inc/add/set/observe) are
 * atomic operations on the child. Gauge callbacks run inside speed_metrics_render() with the
 * registry lock held: they must not call into the same registry.
 * Nothing here blocks except on those locks; nothing logs except registration errors.
 */
#ifndef SPEED_METRICS_H
#define SPEED_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct speed_metrics speed_metrics_t;
typedef struct speed_counter speed_counter_t;
typedef struct speed_gauge speed_gauge_t;
typedef struct speed_histogram speed_histogram_t;

/* Computes a gauge's value at scrape time. Called with the registry lock held. */
typedef double (*speed_gauge_cb_t)(void *user);

/* Most label names a family may have. */
#define SPEED_METRICS_MAX_LABELS  8
/* Most buckets (not counting +Inf) a histogram may have. */
#define SPEED_METRICS_MAX_BUCKETS 64

/* ---- registry ------------------------------------------------------------------------- */

/* Creates an empty registry.
 * SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (metrics_p NULL); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_metrics_create(speed_metrics_t **metrics_p);

/* Frees the registry and every family and child handle it gave out. NULL is a no-op.
 * No other thread may use the registry or its handles during or after this call. */
void speed_metrics_destroy(speed_metrics_t *metrics);

/* Renders every family to a NUL-terminated string allocated with speed_malloc; the caller
 * frees it with speed_free. *len_p (may be NULL) receives strlen of the text.
 * SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (metrics or text_p NULL); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_metrics_render(speed_metrics_t *metrics, char **text_p, size_t *len_p);

/* ---- registration ----------------------------------------------------------------------
 * Common arguments: `name` and `help` are copied (help may be NULL or "", then the HELP
 * line is omitted); `label_names` is an array of `n_labels` strings, copied (NULL when
 * n_labels is 0). Common returns:
 *   SPEED_OK
 *   SPEED_ERR_INVALID_ARGUMENT  a bad name or label name, a NULL required pointer, a counter
 *                               not ending in _total, too many labels, bad buckets
 *   SPEED_ERR_FORMAT            the name (or a sample name it produces) is already taken
 *   SPEED_ERR_NO_MEMORY
 * On error nothing is registered and *x_p is untouched. Errors are logged (SPEED_SUBSYS_CORE).
 */
speed_status_t speed_counter_register(speed_metrics_t *metrics, const char *name, const char *help,
                                      const char *const *label_names, size_t n_labels, speed_counter_t **counter_p);

speed_status_t speed_gauge_register(speed_metrics_t *metrics, const char *name, const char *help,
                                    const char *const *label_names, size_t n_labels, speed_gauge_t **gauge_p);

/* A gauge without labels whose value is cb(user) at every render. The handle (gauge_p may
 * be NULL if not needed) can only be read with speed_gauge_get (which calls cb). */
speed_status_t speed_gauge_register_callback(speed_metrics_t *metrics, const char *name, const char *help,
                                             speed_gauge_cb_t cb, void *user, speed_gauge_t **gauge_p);

/* A callback gauge with constant labels (one series: label_values, n_labels of them, copied;
 * valid UTF-8), e.g. {role="prefill"}: its value is cb(user) at every render. The handle
 * (gauge_p may be NULL) is that series, read only with speed_gauge_get. n_labels == 0 is
 * speed_gauge_register_callback. Returns as above (SPEED_ERR_INVALID_ARGUMENT also for missing
 * or invalid label values). */
speed_status_t speed_gauge_register_callback_labeled(speed_metrics_t *metrics, const char *name, const char *help,
                                                     const char *const *label_names, const char *const *label_values,
                                                     size_t n_labels, speed_gauge_cb_t cb, void *user,
                                                     speed_gauge_t **gauge_p);

/* `buckets`: n_buckets finite upper bounds, strictly increasing (the +Inf bucket is
 * implicit and must not be listed). buckets == NULL with n_buckets == 0 selects
 * speed_histogram_latency_buckets(). */
speed_status_t speed_histogram_register(speed_metrics_t *metrics, const char *name, const char *help,
                                        const char *const *label_names, size_t n_labels, const double *buckets,
                                        size_t n_buckets, speed_histogram_t **histogram_p);

/* Default latency buckets, in seconds, for request-scale latencies from 1 ms to 60 s:
 * 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10 30 60. *n_p gets the count. */
const double *speed_histogram_latency_buckets(size_t *n_p);

/* ---- children --------------------------------------------------------------------------
 * Returns the child of the handle's family for `values` (n_labels strings, in the order of
 * the label names), creating it on first use. `handle` may be the family or any of its
 * children. Repeated calls with equal values return the same child.
 *   SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL pointer, a value not valid UTF-8, or a
 *   family without labels); SPEED_ERR_NO_MEMORY (only when the child is new).
 */
speed_status_t speed_counter_labels(speed_counter_t *counter, const char *const *values, speed_counter_t **child_p);
speed_status_t speed_gauge_labels(speed_gauge_t *gauge, const char *const *values, speed_gauge_t **child_p);
speed_status_t speed_histogram_labels(speed_histogram_t *histogram, const char *const *values,
                                      speed_histogram_t **child_p);

/* Removes a child (a series) from its family: the next render no longer shows it, and a
 * later speed_*_labels with the same values makes a new one, from zero. For series named after
 * something that comes and goes (a discovered node's address), so that their number stays
 * bounded by what is live. The child is freed: the caller must be its last user (no other
 * thread may update or read it during or after the call; a render in progress is fine, it
 * holds the family lock this takes). Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT (NULL, a
 * family handle, an unlabelled family or a callback gauge's series). Removing a child twice is
 * a use after free, like any use of it after the first removal. */
speed_status_t speed_counter_remove(speed_counter_t *child);
speed_status_t speed_gauge_remove(speed_gauge_t *child);
speed_status_t speed_histogram_remove(speed_histogram_t *child);

/* ---- updates (hot path: atomics, no locks, no allocation) -------------------------------
 * The handle must be a child (or an unlabelled family). Callback gauges cannot be updated.
 */
void speed_counter_inc(speed_counter_t *counter);           /* += 1 */
void speed_counter_add(speed_counter_t *counter, double v); /* v >= 0, else (NaN too) ignored */
double speed_counter_get(const speed_counter_t *counter);

void speed_gauge_set(speed_gauge_t *gauge, double v);
void speed_gauge_inc(speed_gauge_t *gauge);           /* += 1 */
void speed_gauge_dec(speed_gauge_t *gauge);           /* -= 1 */
void speed_gauge_add(speed_gauge_t *gauge, double v); /* v may be negative */
double speed_gauge_get(const speed_gauge_t *gauge);

void speed_histogram_observe(speed_histogram_t *histogram, double v); /* NaN is ignored */
/* Totals of observations so far (either pointer may be NULL). */
void speed_histogram_get(const speed_histogram_t *histogram, uint64_t *count_p, double *sum_p);

/* ---- text helpers (shared with the tests and the HTTP /metrics handler) ----------------- */

/* True if `name` is a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*). */
int speed_metrics_name_is_valid(const char *name);
/* True if `name` is a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with "__"). */
int speed_metrics_label_name_is_valid(const char *name);

/* Writes v the way render does into buf (at least 32 bytes); returns strlen. */
size_t speed_metrics_format_value(double v, char *buf, size_t cap);

#endif /* SPEED_METRICS_H */
