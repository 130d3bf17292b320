/* The planner's workload: length distributions, arrivals and traces (docs/operations.md).
 *
 The syntax is speedctl loadgen's (docs/speedctl.md), so one workload drives both. A length
 * SPEC is one of
 *   fixed:N                 every request N tokens (a bare N too)
 *   uniform:A,B             integers A..B, equally likely
 *   normal:MEAN,SD          round(MEAN + SD z), at least 1
 *   lognormal:MEDIAN,SIGMA  round(MEDIAN exp(SIGMA z)), at least 1
 * A trace is JSONL, one request a line: {"arrival_ms": 250, "input_tokens": 512,
 * "output_tokens": 64} ("timestamp" for arrival_ms; offsets from the first line's, which must not
 * decrease; blank lines and lines starting with '#' skipped; other keys ignored).
 *
 * Plain data and pure functions; the generator state is the caller's. */
#ifndef SPEED_PLAN_WORKLOAD_H
#define SPEED_PLAN_WORKLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef enum { SPEED_PLAN_LEN_FIXED, SPEED_PLAN_LEN_UNIFORM, SPEED_PLAN_LEN_NORMAL, SPEED_PLAN_LEN_LOGNORMAL } speed_plan_len_kind_t;

typedef struct {
    speed_plan_len_kind_t kind;
    double a, b; /* N; A, B; MEAN, SD; MEDIAN, SIGMA */
} speed_plan_len_t;

/* Parses a SPEC; SPEED_ERR_INVALID_ARGUMENT with the reason in err. */
speed_status_t speed_plan_len_parse(const char *spec, speed_plan_len_t *len, char *err, size_t err_size);
/* The distribution's mean (before rounding). */
double speed_plan_len_mean(const speed_plan_len_t *len);

/* A small deterministic generator (splitmix64): the same seed, the same workload. */
typedef struct {
    uint64_t s;
} speed_plan_rng_t;
void speed_plan_rng_seed(speed_plan_rng_t *r, uint64_t seed);
double speed_plan_rng_uniform(speed_plan_rng_t *r); /* (0, 1) */
int64_t speed_plan_len_draw(const speed_plan_len_t *len, speed_plan_rng_t *r);

typedef struct {
    double arrival_s;
    int64_t prompt, output;
} speed_plan_request_t;

typedef enum { SPEED_PLAN_ARRIVAL_POISSON, SPEED_PLAN_ARRIVAL_CONSTANT } speed_plan_arrival_t;

/* n requests at `rate` per second (Poisson: exponential gaps; constant: 1/rate apart, the first
 * at 0) with lengths drawn from prompt and output, into reqs[n]. */
void speed_plan_workload_make(const speed_plan_len_t *prompt, const speed_plan_len_t *output, double rate,
                              speed_plan_arrival_t arrival, uint64_t seed, speed_plan_request_t *reqs, int n);

/* Reads a trace (above) into *reqs_p (speed_free it), *n_p requests. SPEED_ERR_IO (unreadable),
 * SPEED_ERR_INVALID_ARGUMENT (a bad line: the line number and the reason in err; an empty trace),
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_plan_trace_load(const char *path, speed_plan_request_t **reqs_p, int *n_p, char *err,
                                     size_t err_size);

#endif /* SPEED_PLAN_WORKLOAD_H */
