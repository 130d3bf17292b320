/* speed_prom_text: a small reader of the Prometheus text exposition format (what every
 * speedserve /metrics endpoint serves), and the arithmetic `speedctl top` does on what it read:
 * counter rates and histogram quantiles over a window.
 *
 *   # HELP speed_router_requests_total completion requests by route and HTTP status
 *   # TYPE speed_router_requests_total counter
 *   speed_router_requests_total{route="split",status="200"} 12
 *   speed_router_time_to_first_token_seconds_bucket{le="0.05"} 7
 *
 * The reader is for untrusted text: a line it cannot read is counted and skipped (never a
 * crash, never an error for the whole document), and memory is bounded by the limits (input
 * bytes, samples, labels per sample). Timestamps are read and dropped. Label values are
 * unescaped (\\ \" \n).
 *
 * Ownership: a parsed document owns one copy of the text; every name and value points into
 * it until speed_prom_text_cleanup. Thread-safety: a document is read-only after parse and
 * may be read from any thread; nothing here blocks.
 */
#ifndef SPEED_PROM_TEXT_H
#define SPEED_PROM_TEXT_H

#include <stdbool.h>
#include <stddef.h>

#include "status.h"

typedef enum {
    SPEED_PROM_UNTYPED = 0,
    SPEED_PROM_COUNTER,
    SPEED_PROM_GAUGE,
    SPEED_PROM_HISTOGRAM,
    SPEED_PROM_SUMMARY,
} speed_prom_type_t;

typedef struct {
    const char *name, *value;
} speed_prom_label_t;

typedef struct {
    const char *name; /* the series name as written (a histogram's end in _bucket/_sum/_count) */
    const speed_prom_label_t *labels;
    size_t n_labels;
    double value; /* NaN and ±Inf as written */
} speed_prom_sample_t;

typedef struct {
    const char *name; /* the family name of a # TYPE line */
    speed_prom_type_t type;
} speed_prom_family_t;

typedef struct {
    size_t max_bytes;   /* longer input: SPEED_ERR_TOO_LONG, nothing parsed */
    size_t max_samples; /* samples beyond it are dropped (truncated set) */
    size_t max_labels;  /* labels per sample; a line with more is a bad line */
} speed_prom_limits_t;

/* 16 MiB, 65536 samples, 32 labels. */
speed_prom_limits_t speed_prom_default_limits(void);

typedef struct {
    speed_prom_sample_t *samples;
    size_t n_samples;
    speed_prom_family_t *families;
    size_t n_families;
    size_t n_bad_lines; /* lines that were neither a comment nor a readable sample */
    bool truncated;     /* max_samples was reached */
    /* private */
    char *text;
    speed_prom_label_t *labels;
} speed_prom_text_t;

/* Parses len bytes of text (need not be NUL-terminated; a NUL byte ends a line's content) into
 * *doc (overwritten; release it with speed_prom_text_cleanup whatever the result). limits NULL =
 * the defaults. Returns SPEED_OK (bad lines counted, not errors), SPEED_ERR_INVALID_ARGUMENT
 * (text NULL with len > 0, doc NULL), SPEED_ERR_TOO_LONG (len > max_bytes) or
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_prom_text_parse(const char *text, size_t len, const speed_prom_limits_t *limits,
                                     speed_prom_text_t *doc);

/* Frees what parse allocated and zeroes *doc. Safe on a zeroed document and twice. */
void speed_prom_text_cleanup(speed_prom_text_t *doc);

/* The type of family `name` from its # TYPE line; SPEED_PROM_UNTYPED when none. */
speed_prom_type_t speed_prom_text_type(const speed_prom_text_t *doc, const char *name);

/* Whether sample s is series `name` and carries every label of `match`, a NULL-terminated list
 * of name, value pairs (NULL = no condition). */
bool speed_prom_sample_match(const speed_prom_sample_t *s, const char *name, const char *const *match);

/* The value of label `name` of s, or NULL. */
const char *speed_prom_sample_label(const speed_prom_sample_t *s, const char *name);

/* The sum of the values of every sample matching (name, match); NaN when none matches. */
double speed_prom_text_sum(const speed_prom_text_t *doc, const char *name, const char *const *match);

/* Whether any sample's name begins with prefix. */
bool speed_prom_text_has_prefix(const speed_prom_text_t *doc, const char *prefix);

/* ---- histograms ----------------------------------------------------------------------------- */

#define SPEED_PROM_HIST_MAX_BUCKETS 64

/* A histogram's cumulative buckets, sorted by upper bound, the last one +Inf. */
typedef struct {
    double le[SPEED_PROM_HIST_MAX_BUCKETS];    /* upper bounds, ascending */
    double count[SPEED_PROM_HIST_MAX_BUCKETS]; /* cumulative counts */
    size_t n_buckets;
    double sum, count_total; /* <name>_sum, <name>_count (count_total NaN when absent) */
} speed_prom_hist_t;

/* Family `name`'s histogram (name without the _bucket suffix) over every label set that
 * matches `match` (as speed_prom_sample_match; the le label is the bucket's): buckets with the
 * same bound are added up, so the histograms of several routes merge into one. Returns
 * SPEED_OK; SPEED_ERR_NOT_FOUND (no bucket sample, or no +Inf bucket); SPEED_ERR_FORMAT (more
 * than SPEED_PROM_HIST_MAX_BUCKETS bounds, or an le that is not a number). */
speed_status_t speed_prom_text_histogram(const speed_prom_text_t *doc, const char *name, const char *const *match,
                                         speed_prom_hist_t *hist_p);

/* cur - prev bucket by bucket (what the window between two scrapes observed) into *out. When
 * the bounds differ, or the histogram went backwards (the process restarted: a counter reset),
 * *out is cur, as Prometheus' increase() takes a reset. out may alias cur. */
void speed_prom_hist_delta(const speed_prom_hist_t *cur, const speed_prom_hist_t *prev, speed_prom_hist_t *out);

/* The q-quantile (0 <= q <= 1) as Prometheus' histogram_quantile estimates it: the bucket that
 * holds rank q * count, and linear interpolation inside it (from 0 for the first bucket when
 * its bound is positive); a rank in the +Inf bucket gives the highest finite bound. NaN when
 * the histogram is empty (count 0), q is out of range, or no bucket is finite. */
double speed_prom_hist_quantile(const speed_prom_hist_t *h, double q);

/* Total observations (the +Inf bucket's count; 0 when there are no buckets). */
double speed_prom_hist_count(const speed_prom_hist_t *h);

/* ---- counters ------------------------------------------------------------------------------- */

/* Per-second rate of a counter read as prev then cur dt_s seconds later; a counter that went
 * back (reset) counts from 0 (cur / dt_s). NaN when either value is NaN or dt_s <= 0. */
double speed_prom_rate(double cur, double prev, double dt_s);

#endif /* SPEED_PROM_TEXT_H */
