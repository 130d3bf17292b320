/* The planner's workload: speedctl loadgen's (loadgen.h), so that a plan and a loadgen run with
 * the same SPECs, rate and seed see the very same requests — lengths and arrival times.
 *
 * Length SPECs (speed_lg_dist_parse): fixed:N, uniform:A,B, normal:MEAN,SD, lognormal:MEDIAN,SIGMA.
 * Traces (speed_lg_trace_parse): JSONL, {"arrival_ms": 0, "input_tokens": 512, "output_tokens": 64}
 * a line (docs/speedctl.md, "loadgen").
 *
 * Plain data and pure functions. */
#ifndef SPEED_PLAN_WORKLOAD_H
#define SPEED_PLAN_WORKLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "loadgen.h"
#include "status.h"

/* What loadgen clamps drawn lengths to by default (its --length-max). */
#define SPEED_PLAN_LENGTH_MAX 32768

/* The mean of a length distribution (before rounding and clamping). */
double speed_plan_len_mean(const speed_lg_dist_t *len);

typedef struct {
    double arrival_s;
    int64_t prompt, output;
} speed_plan_request_t;

/* n requests at `rate` per second, as speedctl loadgen --rate R --arrival A --seed S --prompt-tokens
 * --output-tokens draws them (speed_lg_workload_next), into reqs[n]. */
void speed_plan_workload_make(const speed_lg_dist_t *prompt, const speed_lg_dist_t *output, double rate,
                              speed_lg_arrival_t arrival, uint64_t seed, speed_plan_request_t *reqs, int n);

/* Reads a loadgen trace into *reqs_p (speed_free it), *n_p requests (arrivals from the first).
 * SPEED_ERR_IO (unreadable), SPEED_ERR_INVALID_ARGUMENT (a bad line: the file, line number and
 * reason in err; an empty trace), SPEED_ERR_NO_MEMORY. */
speed_status_t speed_plan_trace_load(const char *path, speed_plan_request_t **reqs_p, int *n_p, char *err,
                                     size_t err_size);

#endif /* SPEED_PLAN_WORKLOAD_H */
