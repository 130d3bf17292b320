/* The profile JSON (plan_profile.h): load, check, save, and the lookups the planner uses. */
#include "plan_profile.h"

#include <errno.h>
#include <stdbool.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#define PROFILE_SCHEMA "speedserve-profile/1"

/* ---- lookups ---------------------------------------------------------------------------------- */

/* Linear through the two points around x; past either end, the line of the last two points
 * (one point: proportional to x through the origin). Never below 0. */
static double interp(const speed_plan_point_t *p, int n, double x) {
    if (n == 0) return 0.0;
    if (n == 1) return p[0].x > 0 ? p[0].ms * x / p[0].x : p[0].ms;
    int i = 1;
    while (i < n - 1 && p[i].x < x) i++;
    const speed_plan_point_t *a = &p[i - 1], *b = &p[i];
    double v = b->x == a->x ? b->ms : a->ms + (b->ms - a->ms) * (x - a->x) / (b->x - a->x);
    return v > 0 ? v : 0.0;
}

double speed_plan_prefill_ms(const speed_plan_depth_t *d, double rows) {
    return rows <= 0 ? 0.0 : interp(d->prefill, d->n_prefill, rows);
}

double speed_plan_transfer_ms(const speed_plan_depth_t *d, double bytes) {
    return interp(d->transfer, d->n_transfer, bytes);
}

double speed_plan_decode_ms(const speed_plan_depth_t *d, double batch, double context) {
    if (d->n_decode == 0 || batch <= 0) return 0.0;
    /* per measured context: the step time at this batch; then between the contexts (clamped:
     * decode steps of small models barely depend on the context) */
    speed_plan_point_t by_ctx[SPEED_PLAN_MAX_POINTS] = {{0, 0}};
    int n_ctx = 0;
    for (int i = 0; i < d->n_decode; i++) {
        double c = d->decode[i].context;
        bool seen = false;
        for (int k = 0; k < n_ctx; k++) seen |= by_ctx[k].x == c;
        if (seen || n_ctx == SPEED_PLAN_MAX_POINTS) continue;
        speed_plan_point_t by_batch[SPEED_PLAN_MAX_POINTS];
        int n_b = 0;
        for (int j = 0; j < d->n_decode && n_b < SPEED_PLAN_MAX_POINTS; j++)
            if (d->decode[j].context == c) by_batch[n_b++] = (speed_plan_point_t){d->decode[j].batch, d->decode[j].ms};
        /* a batch of 1 point cannot be scaled through the origin: a step's weights cost does not */
        double v = n_b == 1 ? by_batch[0].ms : interp(by_batch, n_b, batch);
        int k = n_ctx++;
        while (k > 0 && by_ctx[k - 1].x > c) { /* keep sorted by context */
            by_ctx[k] = by_ctx[k - 1];
            k--;
        }
        by_ctx[k] = (speed_plan_point_t){c, v};
    }
    if (context <= by_ctx[0].x || n_ctx == 1) return by_ctx[0].ms;
    if (context >= by_ctx[n_ctx - 1].x) return by_ctx[n_ctx - 1].ms;
    return interp(by_ctx, n_ctx, context);
}

const speed_plan_depth_t *speed_plan_profile_depth(const speed_plan_profile_t *prof, int prefill_layers) {
    for (int i = 0; i < prof->n_depths; i++)
        if (prof->depths[i].prefill_layers == prefill_layers) return &prof->depths[i];
    return NULL;
}

/* ---- load ------------------------------------------------------------------------------------- */

#define FAIL(...)                             \
    do {                                      \
        snprintf(err, err_size, __VA_ARGS__); \
        return SPEED_ERR_INVALID_ARGUMENT;    \
    } while (0)

static speed_status_t get_num(json_t *o, const char *key, const char *what, const char *ctx, double lo, double hi,
                              double *v, char *err, size_t err_size) {
    json_t *j = json_object_get(o, key);
    if (!json_is_number(j)) FAIL("%s: %s: \"%s\" missing or not a number", what, ctx, key);
    *v = json_number_value(j);
    if (!(*v >= lo && *v <= hi)) FAIL("%s: %s: \"%s\" = %g is outside %g..%g", what, ctx, key, *v, lo, hi);
    return SPEED_OK;
}

static void get_str(json_t *o, const char *key, char *out, size_t size) {
    const char *s = json_string_value(json_object_get(o, key));
    snprintf(out, size, "%s", s ? s : "");
}

/* A list of {xkey, "ms"} points, strictly increasing in x. */
static speed_status_t get_points(json_t *d, const char *list, const char *xkey, const char *what, int c,
                                 speed_plan_point_t *out, int *n_p, bool required, char *err, size_t err_size) {
    json_t *a = json_object_get(d, list);
    *n_p = 0;
    if (!a && !required) return SPEED_OK;
    if (!json_is_array(a) || json_array_size(a) == 0) FAIL("%s: depth C=%d: \"%s\" missing or empty", what, c, list);
    if (json_array_size(a) > SPEED_PLAN_MAX_POINTS)
        FAIL("%s: depth C=%d: \"%s\" has more than %d points", what, c, list, SPEED_PLAN_MAX_POINTS);
    size_t i;
    json_t *pt;
    json_array_foreach(a, i, pt) {
        char ctx[64];
        snprintf(ctx, sizeof ctx, "C=%d %s[%zu]", c, list, i);
        double x, ms;
        if (get_num(pt, xkey, what, ctx, 0, 1e15, &x, err, err_size) != SPEED_OK ||
            get_num(pt, "ms", what, ctx, 1e-9, 1e9, &ms, err, err_size) != SPEED_OK)
            return SPEED_ERR_INVALID_ARGUMENT;
        if (i > 0 && x <= out[i - 1].x) FAIL("%s: %s: \"%s\" values must increase", what, ctx, xkey);
        out[i] = (speed_plan_point_t){x, ms};
    }
    *n_p = (int)json_array_size(a);
    return SPEED_OK;
}

static speed_status_t profile_from_json(json_t *root, const char *what, speed_plan_profile_t *p, char *err,
                                        size_t err_size) {
    memset(p, 0, sizeof *p);
    if (!json_is_object(root)) FAIL("%s: not a JSON object", what);
    const char *schema = json_string_value(json_object_get(root, "schema"));
    if (!schema || strcmp(schema, PROFILE_SCHEMA) != 0)
        FAIL("%s: \"schema\" is %s%s%s, expected \"%s\" (written by speedctl profile)", what, schema ? "\"" : "",
             schema ? schema : "missing", schema ? "\"" : "", PROFILE_SCHEMA);
    json_t *m = json_object_get(root, "model"), *e = json_object_get(root, "engine");
    if (!json_is_object(m) || !json_is_object(e)) FAIL("%s: \"model\" or \"engine\" missing", what);
    double v;
    SPEED_CHECK(get_num(m, "layers", what, "model", 1, 4096, &v, err, err_size));
    p->n_layers = (int)v;
    SPEED_CHECK(
        get_num(m, "kv_bytes_per_token_layer", what, "model", 1, 1e9, &p->kv_bytes_per_token_layer, err, err_size));
    get_str(m, "path", p->model, sizeof p->model);
    get_str(m, "kv_dtype", p->kv_dtype, sizeof p->kv_dtype);
    get_str(root, "backend", p->backend, sizeof p->backend);
    get_str(root, "transport", p->transport, sizeof p->transport);
    SPEED_CHECK(get_num(root, "threads", what, "top level", 0, 1 << 20, &v, err, err_size));
    p->threads = (int)v;
    SPEED_CHECK(get_num(root, "tensor_parallel", what, "top level", 1, 64, &v, err, err_size));
    p->tensor_parallel = (int)v;
    SPEED_CHECK(get_num(e, "max_step_tokens", what, "engine", 1, 1 << 20, &v, err, err_size));
    p->max_step_tokens = (int)v;
    SPEED_CHECK(get_num(e, "prefill_chunk", what, "engine", 1, 1 << 20, &v, err, err_size));
    p->prefill_chunk = (int)v;
    json_t *ds = json_object_get(root, "depths");
    if (!json_is_array(ds) || json_array_size(ds) == 0) FAIL("%s: \"depths\" missing or empty", what);
    if (json_array_size(ds) > SPEED_PLAN_MAX_CUTOFFS) FAIL("%s: more than %d depths", what, SPEED_PLAN_MAX_CUTOFFS);
    size_t i;
    json_t *d;
    json_array_foreach(ds, i, d) {
        speed_plan_depth_t *pd = &p->depths[i];
        char ctx[32];
        snprintf(ctx, sizeof ctx, "depths[%zu]", i);
        SPEED_CHECK(get_num(d, "prefill_layers", what, ctx, 1, p->n_layers, &v, err, err_size));
        pd->prefill_layers = (int)v;
        if (speed_plan_profile_depth(p, pd->prefill_layers)) FAIL("%s: C=%d appears twice", what, pd->prefill_layers);
        int c = pd->prefill_layers;
        SPEED_CHECK(get_points(d, "prefill", "tokens", what, c, pd->prefill, &pd->n_prefill, true, err, err_size));
        SPEED_CHECK(get_points(d, "transfer", "bytes", what, c, pd->transfer, &pd->n_transfer, false, err, err_size));
        json_t *dec = json_object_get(d, "decode");
        if (!json_is_array(dec) || json_array_size(dec) == 0) FAIL("%s: C=%d: \"decode\" missing or empty", what, c);
        if (json_array_size(dec) > SPEED_PLAN_MAX_POINTS * 4) FAIL("%s: C=%d: too many decode points", what, c);
        size_t k;
        json_t *pt;
        json_array_foreach(dec, k, pt) {
            char pctx[64];
            snprintf(pctx, sizeof pctx, "C=%d decode[%zu]", c, k);
            double b, cx, ms;
            if (get_num(pt, "batch", what, pctx, 1, 1 << 20, &b, err, err_size) != SPEED_OK ||
                get_num(pt, "context", what, pctx, 0, 1e9, &cx, err, err_size) != SPEED_OK ||
                get_num(pt, "ms", what, pctx, 1e-9, 1e9, &ms, err, err_size) != SPEED_OK)
                return SPEED_ERR_INVALID_ARGUMENT;
            pd->decode[k] = (speed_plan_decode_point_t){(int)b, cx, ms};
            for (size_t q = 0; q < k; q++)
                if (pd->decode[q].context == cx && pd->decode[q].batch >= (int)b)
                    FAIL("%s: %s: batches of one context must increase", what, pctx);
        }
        pd->n_decode = (int)json_array_size(dec);
        p->n_depths++;
    }
    return SPEED_OK;
}

speed_status_t speed_plan_profile_parse(const char *text, const char *what, speed_plan_profile_t *prof, char *err,
                                        size_t err_size) {
    json_error_t je;
    json_t *root = json_loads(text, 0, &je);
    if (!root) {
        snprintf(err, err_size, "%s: not valid JSON (line %d: %s)", what, je.line, je.text);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_status_t st = profile_from_json(root, what, prof, err, err_size);
    json_decref(root);
    return st;
}

speed_status_t speed_plan_profile_load(const char *path, speed_plan_profile_t *prof, char *err, size_t err_size) {
    json_error_t je;
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, err_size, "%s: %s", path, strerror(errno));
        return SPEED_ERR_IO;
    }
    json_t *root = json_loadf(f, 0, &je);
    fclose(f);
    if (!root) {
        snprintf(err, err_size, "%s: not valid JSON (line %d: %s)", path, je.line, je.text);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_status_t st = profile_from_json(root, path, prof, err, err_size);
    json_decref(root);
    return st;
}

/* ---- save ------------------------------------------------------------------------------------- */

static json_t *points_json(const speed_plan_point_t *p, int n, const char *xkey) {
    json_t *a = json_array();
    for (int i = 0; i < n; i++) {
        json_t *o = json_object();
        json_object_set_new(o, xkey, json_real(p[i].x));
        json_object_set_new(o, "ms", json_real(p[i].ms));
        json_array_append_new(a, o);
    }
    return a;
}

speed_status_t speed_plan_profile_save(const speed_plan_profile_t *p, const char *path, char *err, size_t err_size) {
    json_t *root = json_object(), *m = json_object(), *e = json_object(), *ds = json_array();
    json_object_set_new(root, "schema", json_string(PROFILE_SCHEMA));
    json_object_set_new(m, "path", json_string(p->model));
    json_object_set_new(m, "layers", json_integer(p->n_layers));
    json_object_set_new(m, "kv_bytes_per_token_layer", json_real(p->kv_bytes_per_token_layer));
    json_object_set_new(m, "kv_dtype", json_string(p->kv_dtype));
    json_object_set_new(root, "model", m);
    json_object_set_new(root, "backend", json_string(p->backend));
    json_object_set_new(root, "threads", json_integer(p->threads));
    json_object_set_new(root, "tensor_parallel", json_integer(p->tensor_parallel));
    json_object_set_new(e, "max_step_tokens", json_integer(p->max_step_tokens));
    json_object_set_new(e, "prefill_chunk", json_integer(p->prefill_chunk));
    json_object_set_new(root, "engine", e);
    json_object_set_new(root, "repeat", json_integer(p->repeat));
    json_object_set_new(root, "transport", json_string(p->transport));
    for (int i = 0; i < p->n_depths; i++) {
        const speed_plan_depth_t *pd = &p->depths[i];
        json_t *d = json_object(), *dec = json_array();
        json_object_set_new(d, "prefill_layers", json_integer(pd->prefill_layers));
        json_object_set_new(d, "prefill", points_json(pd->prefill, pd->n_prefill, "tokens"));
        for (int k = 0; k < pd->n_decode; k++) {
            json_t *o = json_object();
            json_object_set_new(o, "batch", json_integer(pd->decode[k].batch));
            json_object_set_new(o, "context", json_real(pd->decode[k].context));
            json_object_set_new(o, "ms", json_real(pd->decode[k].ms));
            json_array_append_new(dec, o);
        }
        json_object_set_new(d, "decode", dec);
        if (pd->n_transfer) json_object_set_new(d, "transfer", points_json(pd->transfer, pd->n_transfer, "bytes"));
        json_array_append_new(ds, d);
    }
    json_object_set_new(root, "depths", ds);
    int rc;
    if (path) {
        rc = json_dump_file(root, path, JSON_INDENT(1) | JSON_REAL_PRECISION(6));
    } else {
        rc = json_dumpf(root, stdout, JSON_INDENT(1) | JSON_REAL_PRECISION(6));
        fputc('\n', stdout);
    }
    json_decref(root);
    if (rc != 0) {
        snprintf(err, err_size, "%s: cannot write the profile", path ? path : "stdout");
        return SPEED_ERR_IO;
    }
    return SPEED_OK;
}
