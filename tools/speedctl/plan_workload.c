/* The planner's workload (plan_workload.h). */
#include "plan_workload.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

speed_status_t speed_plan_len_parse(const char *spec, speed_plan_len_t *len, char *err, size_t err_size) {
    static const struct {
        const char *name;
        speed_plan_len_kind_t kind;
        int n_args;
    } kinds[] = {{"fixed", SPEED_PLAN_LEN_FIXED, 1},
                 {"uniform", SPEED_PLAN_LEN_UNIFORM, 2},
                 {"normal", SPEED_PLAN_LEN_NORMAL, 2},
                 {"lognormal", SPEED_PLAN_LEN_LOGNORMAL, 2}};
    const char *s = spec ? spec : "";
    int k = 0, n_args = 1;
    const char *colon = strchr(s, ':');
    if (colon) {
        for (k = 0; k < 4; k++)
            if (strlen(kinds[k].name) == (size_t)(colon - s) && strncmp(s, kinds[k].name, (size_t)(colon - s)) == 0)
                break;
        if (k == 4) {
            snprintf(err, err_size, "'%s': unknown distribution (fixed, uniform, normal, lognormal)", s);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        n_args = kinds[k].n_args;
        s = colon + 1;
    }
    double v[2] = {0, 0};
    for (int i = 0; i < n_args; i++) {
        char *end;
        errno = 0;
        v[i] = strtod(s, &end);
        if (end == s || errno || !isfinite(v[i]) || (i + 1 < n_args ? *end != ',' : *end != '\0')) {
            snprintf(err, err_size, "'%s': expected fixed:N, uniform:A,B, normal:MEAN,SD or lognormal:MEDIAN,SIGMA",
                     spec ? spec : "");
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        s = end + 1;
    }
    len->kind = kinds[k].kind;
    len->a = v[0];
    len->b = v[1];
    bool ok = len->a >= 1 && len->a <= 1e7 && len->b >= 0 && len->b <= 1e7;
    if (len->kind == SPEED_PLAN_LEN_UNIFORM) ok = ok && len->b >= len->a;
    if (len->kind == SPEED_PLAN_LEN_LOGNORMAL) ok = len->a >= 1 && len->a <= 1e7 && len->b > 0 && len->b <= 10;
    if (!ok) {
        snprintf(err, err_size, "'%s': lengths must be 1..1e7 tokens (uniform: A <= B; lognormal: 0 < SIGMA <= 10)",
                 spec ? spec : "");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

double speed_plan_len_mean(const speed_plan_len_t *len) {
    if (len->kind == SPEED_PLAN_LEN_LOGNORMAL) return len->a * exp(0.5 * len->b * len->b);
    return len->kind == SPEED_PLAN_LEN_UNIFORM ? 0.5 * (len->a + len->b) : len->a;
}

void speed_plan_rng_seed(speed_plan_rng_t *r, uint64_t seed) { r->s = seed * 0x9E3779B97F4A7C15ull + 1; }

static uint64_t rng_next(speed_plan_rng_t *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double speed_plan_rng_uniform(speed_plan_rng_t *r) { return ((double)(rng_next(r) >> 11) + 0.5) / 9007199254740992.0; }

static double rng_normal(speed_plan_rng_t *r) {
    double u = speed_plan_rng_uniform(r), v = speed_plan_rng_uniform(r);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

int64_t speed_plan_len_draw(const speed_plan_len_t *len, speed_plan_rng_t *r) {
    double x;
    switch (len->kind) {
    case SPEED_PLAN_LEN_UNIFORM: x = floor(len->a + speed_plan_rng_uniform(r) * (len->b - len->a + 1)); break;
    case SPEED_PLAN_LEN_NORMAL: x = llround(len->a + len->b * rng_normal(r)); break;
    case SPEED_PLAN_LEN_LOGNORMAL: x = llround(len->a * exp(len->b * rng_normal(r))); break;
    default: x = len->a; break;
    }
    return x < 1 ? 1 : (int64_t)x;
}

void speed_plan_workload_make(const speed_plan_len_t *prompt, const speed_plan_len_t *output, double rate,
                              speed_plan_arrival_t arrival, uint64_t seed, speed_plan_request_t *reqs, int n) {
    /* separate streams for gaps and lengths: a different rate keeps every request's lengths */
    speed_plan_rng_t gaps, lens;
    speed_plan_rng_seed(&gaps, seed);
    speed_plan_rng_seed(&lens, seed ^ 0x5DEECE66Dull);
    double t = 0.0;
    for (int i = 0; i < n; i++) {
        if (i > 0) t += arrival == SPEED_PLAN_ARRIVAL_CONSTANT ? 1.0 / rate : -log(speed_plan_rng_uniform(&gaps)) / rate;
        reqs[i].arrival_s = t;
        reqs[i].prompt = speed_plan_len_draw(prompt, &lens);
        reqs[i].output = speed_plan_len_draw(output, &lens);
    }
}

speed_status_t speed_plan_trace_load(const char *path, speed_plan_request_t **reqs_p, int *n_p, char *err,
                                     size_t err_size) {
    *reqs_p = NULL;
    *n_p = 0;
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, err_size, "%s: %s", path, strerror(errno));
        return SPEED_ERR_IO;
    }
    speed_status_t st = SPEED_OK;
    speed_plan_request_t *reqs = NULL;
    int n = 0, cap = 0, line_no = 0;
    double first_ms = 0;
    char line[4096];
    while (st == SPEED_OK && fgets(line, sizeof line, f)) {
        line_no++;
        if (strspn(line, " \t\r\n") == strlen(line) || line[strspn(line, " \t")] == '#') continue;
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        json_t *a = json_object_get(o, "arrival_ms"), *in = json_object_get(o, "input_tokens"),
               *out = json_object_get(o, "output_tokens");
        if (!a) a = json_object_get(o, "timestamp");
        double ms = json_number_value(a);
        if (n == 0) first_ms = ms;
        if (!json_is_number(a) || !json_is_integer(in) || !json_is_integer(out) || json_integer_value(in) < 1 ||
            json_integer_value(out) < 1 || (n > 0 && (ms - first_ms) / 1e3 < reqs[n - 1].arrival_s)) {
            snprintf(err, err_size,
                     "%s:%d: expected {\"arrival_ms\" (or \"timestamp\"): not before the previous line, "
                     "\"input_tokens\": >= 1, \"output_tokens\": >= 1}",
                     path, line_no);
            st = SPEED_ERR_INVALID_ARGUMENT;
        } else {
            if (n == cap) {
                cap = cap ? cap * 2 : 256;
                speed_plan_request_t *g = speed_realloc(reqs, (size_t)cap * sizeof *g);
                if (!g) st = SPEED_ERR_NO_MEMORY;
                else reqs = g;
            }
            if (st == SPEED_OK)
                reqs[n++] = (speed_plan_request_t){(ms - first_ms) / 1e3, json_integer_value(in),
                                                   json_integer_value(out)};
        }
        json_decref(o);
    }
    fclose(f);
    if (st == SPEED_OK && n == 0) {
        snprintf(err, err_size, "%s: no requests", path);
        st = SPEED_ERR_INVALID_ARGUMENT;
    }
    if (st != SPEED_OK) {
        speed_free(reqs);
        return st;
    }
    *reqs_p = reqs;
    *n_p = n;
    return SPEED_OK;
}
