/* The planner's workload (plan_workload.h): loadgen's workload module, turned into requests. */
#include "plan_workload.h"

#include <math.h>
#include <stdio.h>

#include "alloc.h"
#include "file.h"
#include "log.h"

double speed_plan_len_mean(const speed_lg_dist_t *len) {
    switch (len->kind) {
    case SPEED_LG_DIST_UNIFORM: return 0.5 * (len->a + len->b);
    case SPEED_LG_DIST_LOGNORMAL: return len->a * exp(0.5 * len->b * len->b);
    default: return len->a;
    }
}

void speed_plan_workload_make(const speed_lg_dist_t *prompt, const speed_lg_dist_t *output, double rate,
                              speed_lg_arrival_t arrival, uint64_t seed, speed_plan_request_t *reqs, int n) {
    speed_lg_workload_params_t p = {.prompt = *prompt,
                                    .output = *output,
                                    .max_tokens_clamp = SPEED_PLAN_LENGTH_MAX,
                                    .rate = rate,
                                    .arrival = arrival,
                                    .time_scale = 1,
                                    .seed = seed};
    speed_lg_workload_t w;
    speed_lg_workload_init(&w, &p);
    for (int i = 0; i < n; i++) {
        speed_lg_job_t job;
        speed_lg_workload_next(&w, &job); /* never false without a trace */
        reqs[i] = (speed_plan_request_t){job.arrival_s, job.prompt_tokens, job.output_tokens};
    }
}

speed_status_t speed_plan_trace_load(const char *path, speed_plan_request_t **reqs_p, int *n_p, char *err,
                                     size_t err_size) {
    *reqs_p = NULL;
    *n_p = 0;
    char *data = NULL;
    size_t len = 0;
    if (speed_file_read(path, (size_t)1 << 30, SPEED_SUBSYS_CLI, SPEED_FILE_READ_DEFAULT, &data, &len) != SPEED_OK) {
        snprintf(err, err_size, "%s: cannot be read", path);
        return SPEED_ERR_IO;
    }
    speed_lg_trace_t t = {0};
    char why[256];
    speed_status_t st = speed_lg_trace_parse(data, len, &t, why, sizeof why);
    speed_free(data);
    if (st != SPEED_OK) {
        snprintf(err, err_size, "%s: %s", path, why);
        return st;
    }
    if (t.n == 0 || t.n > (size_t)1 << 30) {
        snprintf(err, err_size, "%s: %s", path, t.n ? "too many requests" : "no requests");
        speed_lg_trace_free(&t);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_plan_request_t *reqs = speed_calloc(t.n, sizeof *reqs);
    if (!reqs) {
        speed_lg_trace_free(&t);
        return SPEED_ERR_NO_MEMORY;
    }
    for (size_t i = 0; i < t.n; i++)
        reqs[i] = (speed_plan_request_t){t.entries[i].arrival_s, t.entries[i].input_tokens, t.entries[i].output_tokens};
    *reqs_p = reqs;
    *n_p = (int)t.n;
    speed_lg_trace_free(&t);
    return SPEED_OK;
}
