/* SPEED depth: parsing a stated cutoff and resolving a depth against a model (depth.h). */
#include "depth.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

speed_depth_t speed_depth_default(void) { return (speed_depth_t){0, 1, 1}; }

speed_cutoff_t speed_cutoff_layers(int64_t layers) { return (speed_cutoff_t){SPEED_CUTOFF_LAYERS, layers, 0.0}; }

speed_cutoff_t speed_cutoff_fraction(double fraction) { return (speed_cutoff_t){SPEED_CUTOFF_FRACTION, 0, fraction}; }

static speed_status_t fail(char *err, size_t err_size, const char *fmt, ...) {
    if (err && err_size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_size, fmt, ap);
        va_end(ap);
    }
    return SPEED_ERR_INVALID_ARGUMENT;
}

speed_status_t speed_cutoff_parse(const char *text, speed_cutoff_t *cutoff_p, char *err, size_t err_size) {
    if (!text || !*text) {
        *cutoff_p = (speed_cutoff_t){SPEED_CUTOFF_UNSET, 0, 0.0};
        return SPEED_OK;
    }
    /* The grammar of a JSON number without exponent, so a value means the same typed here as
     * sent in a request: -?digits (a count) or -?digits.digits (a fraction; either side may be
     * empty, not both). Ranges are the resolver's. */
    size_t len = strlen(text);
    size_t sign = text[0] == '-';
    size_t digits = strspn(text + sign, "0123456789");
    if (digits > 0 && sign + digits == len) {
        errno = 0;
        long long v = strtoll(text, NULL, 10);
        if (errno == 0) {
            *cutoff_p = speed_cutoff_layers(v);
            return SPEED_OK;
        }
    } else if (text[sign + digits] == '.' && len < 64) {
        size_t frac = strspn(text + sign + digits + 1, "0123456789");
        if (sign + digits + 1 + frac == len && digits + frac > 0) {
            *cutoff_p = speed_cutoff_fraction(strtod(text, NULL));
            return SPEED_OK;
        }
    }
    return fail(err, err_size,
                "prefill_layers \"%.40s\" is neither a layer count (e.g. 24) nor a fraction of the layers "
                "(e.g. 0.75)",
                text);
}

const char *speed_cutoff_str(speed_cutoff_t c, char *buf, size_t buf_size) {
    switch (c.kind) {
    case SPEED_CUTOFF_LAYERS: snprintf(buf, buf_size, "%lld", (long long)c.layers); break;
    case SPEED_CUTOFF_FRACTION: snprintf(buf, buf_size, "%g", c.fraction); break;
    default: snprintf(buf, buf_size, "default"); break;
    }
    return buf;
}

speed_depth_request_t speed_depth_request_of(speed_depth_t d) {
    speed_depth_request_t r = {.has_anchors = true, .anchors = d.anchors, .has_tail = true, .tail = d.tail};
    if (d.prefill_layers != 0) r.prefill_layers = speed_cutoff_layers(d.prefill_layers);
    return r;
}

/* C of a stated cutoff for L layers; the one rounding rule for fractions. */
static speed_status_t cutoff_resolve(speed_cutoff_t c, int n_layers, int *c_p, char *err, size_t err_size) {
    if (c.kind == SPEED_CUTOFF_LAYERS) {
        if (c.layers < 1 || c.layers > n_layers)
            return fail(err, err_size, "prefill_layers %lld is outside 1..%d (a layer count of this %d-layer model)",
                        (long long)c.layers, n_layers, n_layers);
        *c_p = (int)c.layers;
        return SPEED_OK;
    }
    if (c.kind == SPEED_CUTOFF_FRACTION) {
        if (!(c.fraction > 0.0 && c.fraction <= 1.0))
            return fail(err, err_size,
                        "prefill_layers %g is not a fraction in (0, 1] (give a layer count as an integer)", c.fraction);
        int v = (int)floor(c.fraction * n_layers + 0.5);
        *c_p = v < 1 ? 1 : v;
        return SPEED_OK;
    }
    *c_p = n_layers;
    return SPEED_OK;
}

speed_status_t speed_depth_resolve(const speed_depth_request_t *req, const speed_depth_t *deflt, int n_layers,
                                   speed_depth_t *depth_p, char *err, size_t err_size) {
    if (n_layers < 1) return fail(err, err_size, "a model with %d layers has no depth", n_layers);
    speed_depth_t def = deflt ? *deflt : speed_depth_default();
    speed_depth_t d;
    if (def.prefill_layers == 0) def.prefill_layers = n_layers;
    if (def.prefill_layers < 1 || def.prefill_layers > n_layers || def.anchors < 0 || def.tail < 1)
        return fail(err, err_size, "default depth C=%d A=%d T=%d is out of range for %d layers", def.prefill_layers,
                    def.anchors, def.tail, n_layers);
    if (req && req->prefill_layers.kind != SPEED_CUTOFF_UNSET) {
        speed_status_t st = cutoff_resolve(req->prefill_layers, n_layers, &d.prefill_layers, err, err_size);
        if (st != SPEED_OK) return st;
    } else {
        d.prefill_layers = def.prefill_layers;
    }
    int64_t a = req && req->has_anchors ? req->anchors : def.anchors;
    int64_t t = req && req->has_tail ? req->tail : def.tail;
    if (a < 0 || a > INT32_MAX) return fail(err, err_size, "anchors %lld is outside 0..%d", (long long)a, INT32_MAX);
    if (t < 1 || t > INT32_MAX)
        return fail(err, err_size,
                    "tail %lld is outside 1..%d (the last prompt token makes the first output token, so it runs "
                    "at full depth)",
                    (long long)t, INT32_MAX);
    d.anchors = (int)a;
    d.tail = (int)t;
    *depth_p = d;
    return SPEED_OK;
}

const char *speed_depth_error_part(const char *reason) {
    if (reason && strncmp(reason, "anchors", 7) == 0) return "anchors";
    if (reason && strncmp(reason, "tail", 4) == 0) return "tail";
    return "prefill_layers";
}
