/* speedctl loadgen's workload: seeded random numbers, the length distributions, the JSONL trace,
 * and job i of a run (loadgen.h). */
#include "loadgen.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

/* ---- random numbers ---------------------------------------------------------------------------- */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void speed_lg_rng_seed(speed_lg_rng_t *rng, uint64_t seed, uint64_t stream) {
    /* streams of one seed start far apart: hash both, so that seed 1 stream 2 and seed 2 stream 1
     * differ */
    rng->s = mix64(seed + 0x9e3779b97f4a7c15ULL) ^ mix64(stream * 0xd1b54a32d192ed03ULL + 1);
}

uint64_t speed_lg_rng_next(speed_lg_rng_t *rng) {
    rng->s += 0x9e3779b97f4a7c15ULL;
    return mix64(rng->s);
}

double speed_lg_rng_uniform(speed_lg_rng_t *rng) { return (double)(speed_lg_rng_next(rng) >> 11) * 0x1.0p-53; }

double speed_lg_rng_normal(speed_lg_rng_t *rng) {
    double u1 = 1.0 - speed_lg_rng_uniform(rng); /* (0, 1]: log is finite */
    double u2 = speed_lg_rng_uniform(rng);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

double speed_lg_rng_exp(speed_lg_rng_t *rng) { return -log(1.0 - speed_lg_rng_uniform(rng)); }

/* ---- length distributions ---------------------------------------------------------------------- */

static bool number_parse(const char *s, const char *end, double *x) {
    if (s == end) return false;
    char buf[64];
    size_t n = (size_t)(end - s);
    if (n >= sizeof buf) return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *e;
    errno = 0;
    double v = strtod(buf, &e);
    if (e == buf || *e || errno || !isfinite(v)) return false;
    *x = v;
    return true;
}

speed_status_t speed_lg_dist_parse(const char *what, const char *spec, speed_lg_dist_t *dist_p, char *err,
                                   size_t err_size) {
    static const struct {
        const char *name;
        speed_lg_dist_kind_t kind;
        int n_args;
        const char *form;
    } kinds[] = {
        {"fixed", SPEED_LG_DIST_FIXED, 1, "fixed:N"},
        {"uniform", SPEED_LG_DIST_UNIFORM, 2, "uniform:A,B"},
        {"normal", SPEED_LG_DIST_NORMAL, 2, "normal:MEAN,SD"},
        {"lognormal", SPEED_LG_DIST_LOGNORMAL, 2, "lognormal:MEDIAN,SIGMA"},
    };
    const char *colon = spec ? strchr(spec, ':') : NULL;
    size_t k = 0;
    for (; colon && k < sizeof kinds / sizeof kinds[0]; k++)
        if (strlen(kinds[k].name) == (size_t)(colon - spec) &&
            strncmp(spec, kinds[k].name, (size_t)(colon - spec)) == 0)
            break;
    if (!colon || k == sizeof kinds / sizeof kinds[0]) {
        snprintf(err, err_size,
                 "%s: '%s' is not a length spec (fixed:N, uniform:A,B, normal:MEAN,SD or lognormal:MEDIAN,SIGMA)", what,
                 spec ? spec : "");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    double v[2] = {0, 0};
    const char *p = colon + 1;
    int n = 0;
    for (; n < 2; n++) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        if (!number_parse(p, end, &v[n])) break;
        p = end;
        if (*p != ',') {
            n++;
            break;
        }
        p++;
    }
    if (n != kinds[k].n_args || *p) {
        snprintf(err, err_size, "%s: '%s': expected %s with numbers", what, spec, kinds[k].form);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const char *why = NULL;
    switch (kinds[k].kind) {
    case SPEED_LG_DIST_FIXED:
        if (v[0] < 1 || v[0] != floor(v[0])) why = "N must be a whole number >= 1";
        break;
    case SPEED_LG_DIST_UNIFORM:
        if (v[0] < 1 || v[1] < v[0] || v[0] != floor(v[0]) || v[1] != floor(v[1]))
            why = "A and B must be whole numbers with 1 <= A <= B";
        break;
    case SPEED_LG_DIST_NORMAL:
        if (v[0] < 1 || v[1] < 0) why = "MEAN must be >= 1 and SD >= 0";
        break;
    case SPEED_LG_DIST_LOGNORMAL:
        if (v[0] < 1 || v[1] < 0) why = "MEDIAN must be >= 1 and SIGMA >= 0";
        break;
    }
    if (why) {
        snprintf(err, err_size, "%s: '%s': %s", what, spec, why);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    dist_p->kind = kinds[k].kind;
    dist_p->a = v[0];
    dist_p->b = v[1];
    return SPEED_OK;
}

int64_t speed_lg_dist_sample(const speed_lg_dist_t *d, speed_lg_rng_t *rng, int64_t max) {
    double x = d->a;
    switch (d->kind) {
    case SPEED_LG_DIST_FIXED: break;
    case SPEED_LG_DIST_UNIFORM: x = d->a + floor(speed_lg_rng_uniform(rng) * (d->b - d->a + 1)); break;
    case SPEED_LG_DIST_NORMAL: x = round(d->a + d->b * speed_lg_rng_normal(rng)); break;
    case SPEED_LG_DIST_LOGNORMAL: x = round(d->a * exp(d->b * speed_lg_rng_normal(rng))); break;
    }
    if (!(x >= 1)) return 1; /* also NaN */
    if (x > (double)max) return max;
    return (int64_t)x;
}

void speed_lg_dist_format(const speed_lg_dist_t *d, char *out, size_t size) {
    switch (d->kind) {
    case SPEED_LG_DIST_FIXED: snprintf(out, size, "fixed:%g", d->a); break;
    case SPEED_LG_DIST_UNIFORM: snprintf(out, size, "uniform:%g,%g", d->a, d->b); break;
    case SPEED_LG_DIST_NORMAL: snprintf(out, size, "normal:%g,%g", d->a, d->b); break;
    case SPEED_LG_DIST_LOGNORMAL: snprintf(out, size, "lognormal:%g,%g", d->a, d->b); break;
    }
}

/* ---- the trace --------------------------------------------------------------------------------- */

/* A whole number >= lo in an integer or a real JSON value. */
static bool count_get(const json_t *v, int64_t lo, int64_t *out) {
    double x;
    if (json_is_integer(v))
        x = (double)json_integer_value(v);
    else if (json_is_real(v))
        x = json_real_value(v);
    else
        return false;
    if (x != floor(x) || x < (double)lo || x > 1e12) return false;
    *out = (int64_t)x;
    return true;
}

static speed_status_t entry_parse(const json_t *o, speed_lg_trace_entry_t *e, double *arrival_ms, char *why,
                                  size_t why_size) {
    if (!json_is_object(o)) {
        snprintf(why, why_size, "expected a JSON object");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const json_t *at = json_object_get(o, "arrival_ms");
    if (!at) at = json_object_get(o, "timestamp");
    if (!at) {
        snprintf(why, why_size, "missing \"arrival_ms\" (or \"timestamp\")");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (!json_is_number(at) || !isfinite(json_number_value(at)) || json_number_value(at) < 0) {
        snprintf(why, why_size, "\"arrival_ms\" must be a number >= 0 (milliseconds)");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    *arrival_ms = json_number_value(at);
    static const char *const counts[] = {"input_tokens", "output_tokens"};
    int64_t v[2];
    for (int i = 0; i < 2; i++) {
        const json_t *c = json_object_get(o, counts[i]);
        if (!c) {
            snprintf(why, why_size, "missing \"%s\"", counts[i]);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (!count_get(c, 1, &v[i])) {
            snprintf(why, why_size, "\"%s\" must be a whole number >= 1", counts[i]);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    e->input_tokens = v[0];
    e->output_tokens = v[1];
    e->prefill_layers = 0;
    const json_t *pl = json_object_get(o, "prefill_layers");
    int64_t c = 0;
    if (pl && !json_is_null(pl)) {
        if (!count_get(pl, 1, &c) || c > INT32_MAX) {
            snprintf(why, why_size, "\"prefill_layers\" must be a whole number >= 1");
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        e->prefill_layers = (int32_t)c;
    }
    return SPEED_OK;
}

speed_status_t speed_lg_trace_parse(const char *data, size_t len, speed_lg_trace_t *trace, char *err, size_t err_size) {
    memset(trace, 0, sizeof *trace);
    size_t cap = 0;
    long line_no = 0;
    double first_ms = 0, last_ms = 0;
    for (size_t at = 0; at < len;) {
        size_t eol = at;
        while (eol < len && data[eol] != '\n') eol++;
        line_no++;
        size_t n = eol - at;
        const char *line = data + at;
        at = eol + 1;
        while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t')) n--;
        while (n && (*line == ' ' || *line == '\t')) {
            line++;
            n--;
        }
        if (n == 0 || *line == '#') continue;
        json_error_t je;
        json_t *o = json_loadb(line, n, 0, &je);
        char why[160];
        speed_lg_trace_entry_t e;
        double ms = 0;
        speed_status_t st = SPEED_OK;
        if (!o) {
            snprintf(why, sizeof why, "invalid JSON: %.120s", je.text);
            st = SPEED_ERR_INVALID_ARGUMENT;
        } else {
            st = entry_parse(o, &e, &ms, why, sizeof why);
        }
        json_decref(o);
        if (st == SPEED_OK && trace->n > 0 && ms < last_ms) {
            snprintf(why, sizeof why, "arrival %.3f ms is before the previous line's %.3f ms (sort the trace)", ms,
                     last_ms);
            st = SPEED_ERR_INVALID_ARGUMENT;
        }
        if (st == SPEED_OK && trace->n == cap) {
            cap = cap ? cap * 2 : 256;
            speed_lg_trace_entry_t *grown = speed_realloc(trace->entries, cap * sizeof *grown);
            if (!grown) {
                speed_lg_trace_free(trace);
                snprintf(err, err_size, "out of memory reading the trace");
                return SPEED_ERR_NO_MEMORY;
            }
            trace->entries = grown;
        }
        if (st != SPEED_OK) {
            snprintf(err, err_size, "line %ld: %s", line_no, why);
            speed_lg_trace_free(trace);
            return st;
        }
        if (trace->n == 0) first_ms = ms;
        last_ms = ms;
        e.arrival_s = (ms - first_ms) / 1000.0;
        trace->entries[trace->n++] = e;
    }
    if (trace->n == 0) {
        snprintf(err, err_size, "no requests in the trace");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

void speed_lg_trace_free(speed_lg_trace_t *trace) {
    speed_free(trace->entries);
    memset(trace, 0, sizeof *trace);
}

/* ---- the workload ------------------------------------------------------------------------------ */

void speed_lg_workload_init(speed_lg_workload_t *w, const speed_lg_workload_params_t *p) {
    memset(w, 0, sizeof *w);
    w->p = *p;
    if (w->p.max_tokens_clamp <= 0) w->p.max_tokens_clamp = 1 << 20;
    if (w->p.time_scale <= 0) w->p.time_scale = 1;
    /* the arrival process has its own stream, apart from every request's */
    speed_lg_rng_seed(&w->rng, p->seed, UINT64_MAX);
    w->next_arrival = 0;
    if (!p->trace && p->rate > 0 && p->arrival == SPEED_LG_ARRIVAL_POISSON)
        w->next_arrival = speed_lg_rng_exp(&w->rng) / p->rate;
}

bool speed_lg_workload_next(speed_lg_workload_t *w, speed_lg_job_t *job) {
    const speed_lg_workload_params_t *p = &w->p;
    int64_t i = w->next;
    memset(job, 0, sizeof *job);
    job->index = i;
    job->prefill_layers = p->prefill_layers;
    job->prompt_seed = mix64(p->seed * 0x2545f4914f6cdd1dULL + (uint64_t)i + 1);
    if (p->trace) {
        if ((size_t)i >= p->trace->n) return false;
        const speed_lg_trace_entry_t *e = &p->trace->entries[i];
        job->arrival_s = e->arrival_s * p->time_scale;
        job->prompt_tokens = e->input_tokens;
        job->output_tokens = e->output_tokens;
        if (e->prefill_layers > 0) job->prefill_layers = e->prefill_layers;
        w->next++;
        return true;
    }
    speed_lg_rng_t r;
    speed_lg_rng_seed(&r, p->seed, (uint64_t)i);
    job->prompt_tokens = speed_lg_dist_sample(&p->prompt, &r, p->max_tokens_clamp);
    job->output_tokens = speed_lg_dist_sample(&p->output, &r, p->max_tokens_clamp);
    if (p->rate > 0) {
        job->arrival_s = w->next_arrival;
        w->next_arrival += p->arrival == SPEED_LG_ARRIVAL_POISSON ? speed_lg_rng_exp(&w->rng) / p->rate : 1.0 / p->rate;
    }
    w->next++;
    return true;
}
