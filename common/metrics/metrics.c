/* speed_metrics: registry, atomic children and the text exposition renderer. */
#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

typedef enum { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM } kind_t;

typedef struct family family_t;

/* Every child type starts with this header, so families can keep one list of children. */
typedef struct {
    family_t *family;
    bool is_family; /* the registration handle of a labelled family: not a series */
    uint64_t hash;  /* of the label values, to skip most string compares */
    char **values;  /* [n_labels], owned */
} child_hdr_t;

/* Doubles are kept as their bit patterns in 64-bit atomics (C11 has no atomic double
 * add): adds are compare-exchange loops, loads and stores are plain atomic ops. */
struct speed_counter {
    child_hdr_t h;
    _Atomic uint64_t bits;
};

struct speed_gauge {
    child_hdr_t h;
    _Atomic uint64_t bits;
};

struct speed_histogram {
    child_hdr_t h;
    _Atomic uint64_t sum_bits;
    _Atomic uint64_t counts[]; /* [n_buckets + 1], not cumulative; the last is +Inf */
};

struct family {
    kind_t kind;
    char *name;
    char *help;         /* NULL: no HELP line */
    char **label_names; /* [n_labels] */
    size_t n_labels;
    double *buckets; /* [n_buckets], histograms only */
    size_t n_buckets;
    speed_gauge_cb_t cb; /* callback gauges only */
    void *cb_user;

    pthread_mutex_t lock; /* guards children / n_children / cap_children */
    child_hdr_t **children;
    size_t n_children;
    size_t cap_children;
    child_hdr_t *handle; /* what registration returned */
};

struct speed_metrics {
    pthread_mutex_t lock; /* guards families; held while rendering */
    family_t **families;
    size_t n_families;
    size_t cap_families;
};

static const double latency_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                         0.5,   1.0,    2.5,   5.0,  10.0,  30.0, 60.0};

const double *speed_histogram_latency_buckets(size_t *n_p) {
    if (n_p) *n_p = sizeof(latency_buckets) / sizeof(latency_buckets[0]);
    return latency_buckets;
}

/* ---- atomic doubles ------------------------------------------------------------------- */

static uint64_t dbl_bits(double v) {
    uint64_t b;
    memcpy(&b, &v, sizeof(b));
    return b;
}

static double bits_dbl(uint64_t b) {
    double v;
    memcpy(&v, &b, sizeof(v));
    return v;
}

static void atomic_dbl_add(_Atomic uint64_t *p, double v) {
    uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(p, &old, dbl_bits(bits_dbl(old) + v), memory_order_relaxed,
                                                  memory_order_relaxed)) {}
}

/* ---- names ---------------------------------------------------------------------------- */

int speed_metrics_name_is_valid(const char *name) {
    if (!name || !*name) return 0;
    for (const char *c = name; *c; c++) {
        bool alpha = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || *c == '_' || *c == ':';
        bool digit = *c >= '0' && *c <= '9';
        if (!alpha && !(digit && c != name)) return 0;
    }
    return 1;
}

int speed_metrics_label_name_is_valid(const char *name) {
    if (!name || !*name || strncmp(name, "__", 2) == 0) return 0;
    for (const char *c = name; *c; c++) {
        bool alpha = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || *c == '_';
        bool digit = *c >= '0' && *c <= '9';
        if (!alpha && !(digit && c != name)) return 0;
    }
    return 1;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF. */
static bool utf8_is_valid(const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    while (*s) {
        unsigned c = *s;
        size_t n;
        unsigned cp;
        if (c < 0x80) {
            s++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            cp = c & 0x07;
        } else
            return false;
        for (size_t i = 1; i <= n; i++) {
            if ((s[i] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i] & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        s += n + 1;
    }
    return true;
}

/* ---- value formatting ----------------------------------------------------------------- */

size_t speed_metrics_format_value(double v, char *buf, size_t cap) {
    int n;
    if (isnan(v))
        n = snprintf(buf, cap, "NaN");
    else if (isinf(v))
        n = snprintf(buf, cap, v > 0 ? "+Inf" : "-Inf");
    else if (v == trunc(v) && fabs(v) < 1e15)
        n = snprintf(buf, cap, "%.0f", v);
    else {
        /* Shortest decimal that reads back as the same double. */
        n = 0;
        for (int prec = 1; prec <= 17; prec++) {
            n = snprintf(buf, cap, "%.*g", prec, v);
            if (strtod(buf, NULL) == v) break;
        }
    }
    if (n < 0) n = 0;
    return (size_t)n < cap ? (size_t)n : (cap ? cap - 1 : 0);
}

/* ---- families ------------------------------------------------------------------------- */

static void child_free(child_hdr_t *c, size_t n_labels) {
    if (!c) return;
    if (c->values) {
        for (size_t i = 0; i < n_labels; i++) speed_free(c->values[i]);
        speed_free(c->values);
    }
    speed_free(c);
}

static void family_free(family_t *f) {
    if (!f) return;
    /* An unlabelled family's handle is also children[0]: free it once. */
    if (f->handle && f->handle->is_family) child_free(f->handle, f->n_labels);
    for (size_t i = 0; i < f->n_children; i++) child_free(f->children[i], f->n_labels);
    speed_free(f->children);
    if (f->label_names) {
        for (size_t i = 0; i < f->n_labels; i++) speed_free(f->label_names[i]);
        speed_free(f->label_names);
    }
    speed_free(f->buckets);
    speed_free(f->name);
    speed_free(f->help);
    pthread_mutex_destroy(&f->lock);
    speed_free(f);
}

static size_t child_size(const family_t *f) {
    switch (f->kind) {
    case KIND_COUNTER: return sizeof(speed_counter_t);
    case KIND_GAUGE: return sizeof(speed_gauge_t);
    case KIND_HISTOGRAM: return sizeof(speed_histogram_t) + (f->n_buckets + 1) * sizeof(_Atomic uint64_t);
    }
    return 0;
}

static uint64_t values_hash(const char *const *values, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        for (const unsigned char *c = (const unsigned char *)values[i]; *c; c++) {
            h ^= *c;
            h *= 1099511628211ull;
        }
        h ^= 0xff; /* separator: ("a","bc") != ("ab","c") */
        h *= 1099511628211ull;
    }
    return h;
}

/* Allocates a zeroed child with copied values (values may be NULL for n_labels == 0). */
static child_hdr_t *child_new(family_t *f, const char *const *values, bool is_family) {
    child_hdr_t *c = speed_calloc(1, child_size(f));
    if (!c) return NULL;
    c->family = f;
    c->is_family = is_family;
    if (f->n_labels && !is_family) {
        c->values = speed_calloc(f->n_labels, sizeof(char *));
        if (!c->values) goto fail;
        for (size_t i = 0; i < f->n_labels; i++) {
            c->values[i] = speed_strdup(values[i]);
            if (!c->values[i]) goto fail;
        }
        c->hash = values_hash(values, f->n_labels);
    }
    /* Zero bits are 0.0 and zero counts: calloc already initialised the atomics' storage,
     * but initialise them formally for the C11 memory model. */
    if (f->kind == KIND_HISTOGRAM) {
        speed_histogram_t *hist = (speed_histogram_t *)c;
        atomic_init(&hist->sum_bits, dbl_bits(0.0));
        for (size_t i = 0; i <= f->n_buckets; i++) atomic_init(&hist->counts[i], 0);
    } else if (f->kind == KIND_COUNTER) {
        atomic_init(&((speed_counter_t *)c)->bits, dbl_bits(0.0));
    } else {
        atomic_init(&((speed_gauge_t *)c)->bits, dbl_bits(0.0));
    }
    return c;
fail:
    child_free(c, f->n_labels);
    return NULL;
}

/* Appends a child; caller holds f->lock (or owns f exclusively). */
static speed_status_t family_push_child(family_t *f, child_hdr_t *c) {
    if (f->n_children == f->cap_children) {
        size_t cap = f->cap_children ? 2 * f->cap_children : 4;
        child_hdr_t **grown = speed_realloc(f->children, cap * sizeof(*grown));
        if (!grown) return SPEED_ERR_NO_MEMORY;
        f->children = grown;
        f->cap_children = cap;
    }
    f->children[f->n_children++] = c;
    return SPEED_OK;
}

/* The sample names a family writes; returns how many (at most 4). */
static size_t sample_names(kind_t kind, const char *name, char out[4][256]) {
    snprintf(out[0], 256, "%s", name);
    if (kind != KIND_HISTOGRAM) return 1;
    snprintf(out[1], 256, "%s_bucket", name);
    snprintf(out[2], 256, "%s_sum", name);
    snprintf(out[3], 256, "%s_count", name);
    return 4;
}

/* cb_values: a callback gauge's constant label values ([n_labels]; NULL without labels). Its one
 * series is made here, before the family is published, and *handle_p is that series. */
static speed_status_t register_family(speed_metrics_t *m, kind_t kind, const char *name, const char *help,
                                      const char *const *label_names, size_t n_labels, const double *buckets,
                                      size_t n_buckets, speed_gauge_cb_t cb, void *cb_user,
                                      const char *const *cb_values, child_hdr_t **handle_p) {
    if (!m || !name) return SPEED_ERR_INVALID_ARGUMENT;
    if (cb && n_labels) {
        if (!cb_values) return SPEED_ERR_INVALID_ARGUMENT;
        for (size_t i = 0; i < n_labels; i++)
            if (!cb_values[i] || !utf8_is_valid(cb_values[i])) return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (!speed_metrics_name_is_valid(name) || strlen(name) > 200) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: invalid metric name \"%s\"", name);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (kind == KIND_COUNTER && !ends_with(name, "_total")) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: counter name \"%s\" must end in _total", name);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (n_labels > SPEED_METRICS_MAX_LABELS || (n_labels && !label_names)) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: %s: bad label list (%zu labels)", name, n_labels);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < n_labels; i++) {
        if (!speed_metrics_label_name_is_valid(label_names[i]) ||
            (kind == KIND_HISTOGRAM && strcmp(label_names[i], "le") == 0)) {
            SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: %s: invalid label name \"%s\"", name,
                        label_names[i] ? label_names[i] : "(null)");
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(label_names[i], label_names[j]) == 0) {
                SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: %s: label \"%s\" given twice", name, label_names[i]);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
    }
    if (kind == KIND_HISTOGRAM) {
        if (!buckets && n_buckets == 0) buckets = speed_histogram_latency_buckets(&n_buckets);
        if (!buckets || n_buckets == 0 || n_buckets > SPEED_METRICS_MAX_BUCKETS) {
            SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: %s: need 1..%d buckets", name, SPEED_METRICS_MAX_BUCKETS);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        for (size_t i = 0; i < n_buckets; i++) {
            if (!isfinite(buckets[i]) || (i && !(buckets[i] > buckets[i - 1]))) {
                SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: %s: buckets must be finite and strictly increasing", name);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
    }

    speed_status_t status = SPEED_OK;
    family_t *f = speed_calloc(1, sizeof(*f));
    if (!f) return SPEED_ERR_NO_MEMORY;
    pthread_mutex_init(&f->lock, NULL);
    f->kind = kind;
    f->cb = cb;
    f->cb_user = cb_user;
    f->name = speed_strdup(name);
    if (!f->name) goto oom;
    if (help && *help) {
        f->help = speed_strdup(help);
        if (!f->help) goto oom;
    }
    if (n_labels) {
        f->label_names = speed_calloc(n_labels, sizeof(char *));
        if (!f->label_names) goto oom;
        f->n_labels = n_labels;
        for (size_t i = 0; i < n_labels; i++) {
            f->label_names[i] = speed_strdup(label_names[i]);
            if (!f->label_names[i]) goto oom;
        }
    }
    if (kind == KIND_HISTOGRAM) {
        f->buckets = speed_malloc(n_buckets * sizeof(double));
        if (!f->buckets) goto oom;
        memcpy(f->buckets, buckets, n_buckets * sizeof(double));
        f->n_buckets = n_buckets;
    }
    f->handle = child_new(f, NULL, n_labels > 0);
    if (!f->handle) goto oom;
    if (n_labels == 0) SPEED_CHECK_GOTO(family_push_child(f, f->handle), status, fail);
    child_hdr_t *series = f->handle;
    if (cb && n_labels) {
        series = child_new(f, cb_values, false);
        if (!series) goto oom;
        status = family_push_child(f, series);
        if (status != SPEED_OK) {
            child_free(series, n_labels);
            goto fail;
        }
    }

    pthread_mutex_lock(&m->lock);
    char mine[4][256], theirs[4][256];
    size_t n_mine = sample_names(kind, name, mine);
    for (size_t i = 0; i < m->n_families && status == SPEED_OK; i++) {
        size_t n_theirs = sample_names(m->families[i]->kind, m->families[i]->name, theirs);
        for (size_t a = 0; a < n_mine && status == SPEED_OK; a++) {
            for (size_t b = 0; b < n_theirs; b++) {
                if (strcmp(mine[a], theirs[b]) == 0) {
                    status = SPEED_ERR_FORMAT;
                    break;
                }
            }
        }
    }
    if (status == SPEED_OK && m->n_families == m->cap_families) {
        size_t cap = m->cap_families ? 2 * m->cap_families : 16;
        family_t **grown = speed_realloc(m->families, cap * sizeof(*grown));
        if (grown) {
            m->families = grown;
            m->cap_families = cap;
        } else {
            status = SPEED_ERR_NO_MEMORY;
        }
    }
    if (status == SPEED_OK) m->families[m->n_families++] = f;
    pthread_mutex_unlock(&m->lock);
    if (status == SPEED_ERR_FORMAT) SPEED_ERROR(SPEED_SUBSYS_CORE, "metrics: %s: name already registered", name);
    if (status != SPEED_OK) goto fail;
    *handle_p = series;
    return SPEED_OK;

oom:
    status = SPEED_ERR_NO_MEMORY;
fail:
    if (f->handle && !f->handle->is_family && f->n_children == 0) {
        child_free(f->handle, 0); /* the unlabelled child that never made it into the list */
        f->handle = NULL;
    }
    family_free(f);
    return status;
}

speed_status_t speed_counter_register(speed_metrics_t *metrics, const char *name, const char *help,
                                      const char *const *label_names, size_t n_labels, speed_counter_t **counter_p) {
    if (!counter_p) return SPEED_ERR_INVALID_ARGUMENT;
    child_hdr_t *h;
    SPEED_CHECK(
        register_family(metrics, KIND_COUNTER, name, help, label_names, n_labels, NULL, 0, NULL, NULL, NULL, &h));
    *counter_p = (speed_counter_t *)h;
    return SPEED_OK;
}

speed_status_t speed_gauge_register(speed_metrics_t *metrics, const char *name, const char *help,
                                    const char *const *label_names, size_t n_labels, speed_gauge_t **gauge_p) {
    if (!gauge_p) return SPEED_ERR_INVALID_ARGUMENT;
    child_hdr_t *h;
    SPEED_CHECK(register_family(metrics, KIND_GAUGE, name, help, label_names, n_labels, NULL, 0, NULL, NULL, NULL, &h));
    *gauge_p = (speed_gauge_t *)h;
    return SPEED_OK;
}

speed_status_t speed_gauge_register_callback(speed_metrics_t *metrics, const char *name, const char *help,
                                             speed_gauge_cb_t cb, void *user, speed_gauge_t **gauge_p) {
    if (!cb) return SPEED_ERR_INVALID_ARGUMENT;
    child_hdr_t *h;
    SPEED_CHECK(register_family(metrics, KIND_GAUGE, name, help, NULL, 0, NULL, 0, cb, user, NULL, &h));
    if (gauge_p) *gauge_p = (speed_gauge_t *)h;
    return SPEED_OK;
}

speed_status_t speed_gauge_register_callback_labeled(speed_metrics_t *metrics, const char *name, const char *help,
                                                     const char *const *label_names, const char *const *label_values,
                                                     size_t n_labels, speed_gauge_cb_t cb, void *user,
                                                     speed_gauge_t **gauge_p) {
    if (!cb) return SPEED_ERR_INVALID_ARGUMENT;
    child_hdr_t *h;
    SPEED_CHECK(
        register_family(metrics, KIND_GAUGE, name, help, label_names, n_labels, NULL, 0, cb, user, label_values, &h));
    if (gauge_p) *gauge_p = (speed_gauge_t *)h;
    return SPEED_OK;
}

speed_status_t speed_histogram_register(speed_metrics_t *metrics, const char *name, const char *help,
                                        const char *const *label_names, size_t n_labels, const double *buckets,
                                        size_t n_buckets, speed_histogram_t **histogram_p) {
    if (!histogram_p) return SPEED_ERR_INVALID_ARGUMENT;
    child_hdr_t *h;
    SPEED_CHECK(register_family(metrics, KIND_HISTOGRAM, name, help, label_names, n_labels, buckets, n_buckets, NULL,
                                NULL, NULL, &h));
    *histogram_p = (speed_histogram_t *)h;
    return SPEED_OK;
}

/* ---- children ------------------------------------------------------------------------- */

static speed_status_t family_child(child_hdr_t *handle, kind_t kind, const char *const *values, child_hdr_t **child_p) {
    if (!handle || !child_p) return SPEED_ERR_INVALID_ARGUMENT;
    family_t *f = handle->family;
    SPEED_ASSERT(f->kind == kind);
    if (f->n_labels == 0 || !values) return SPEED_ERR_INVALID_ARGUMENT;
    for (size_t i = 0; i < f->n_labels; i++) {
        if (!values[i] || !utf8_is_valid(values[i])) return SPEED_ERR_INVALID_ARGUMENT;
    }
    uint64_t hash = values_hash(values, f->n_labels);
    speed_status_t status = SPEED_OK;
    pthread_mutex_lock(&f->lock);
    for (size_t i = 0; i < f->n_children; i++) {
        child_hdr_t *c = f->children[i];
        if (c->hash != hash) continue;
        size_t j = 0;
        while (j < f->n_labels && strcmp(c->values[j], values[j]) == 0) j++;
        if (j == f->n_labels) {
            *child_p = c;
            pthread_mutex_unlock(&f->lock);
            return SPEED_OK;
        }
    }
    child_hdr_t *c = child_new(f, values, false);
    if (!c) status = SPEED_ERR_NO_MEMORY;
    if (status == SPEED_OK) status = family_push_child(f, c);
    if (status == SPEED_OK)
        *child_p = c;
    else
        child_free(c, f->n_labels);
    pthread_mutex_unlock(&f->lock);
    return status;
}

speed_status_t speed_counter_labels(speed_counter_t *counter, const char *const *values, speed_counter_t **child_p) {
    return family_child(counter ? &counter->h : NULL, KIND_COUNTER, values, (child_hdr_t **)child_p);
}

speed_status_t speed_gauge_labels(speed_gauge_t *gauge, const char *const *values, speed_gauge_t **child_p) {
    if (gauge && gauge->h.family->cb) return SPEED_ERR_INVALID_ARGUMENT;
    return family_child(gauge ? &gauge->h : NULL, KIND_GAUGE, values, (child_hdr_t **)child_p);
}

speed_status_t speed_histogram_labels(speed_histogram_t *histogram, const char *const *values,
                                      speed_histogram_t **child_p) {
    return family_child(histogram ? &histogram->h : NULL, KIND_HISTOGRAM, values, (child_hdr_t **)child_p);
}

static speed_status_t family_remove_child(child_hdr_t *c, kind_t kind) {
    if (!c || c->is_family) return SPEED_ERR_INVALID_ARGUMENT;
    family_t *f = c->family;
    SPEED_ASSERT(f->kind == kind);
    if (f->n_labels == 0 || f->cb) return SPEED_ERR_INVALID_ARGUMENT;
    bool found = false;
    pthread_mutex_lock(&f->lock);
    for (size_t i = 0; i < f->n_children && !found; i++) {
        if (f->children[i] != c) continue;
        /* keeps creation order for the rest (render promises it) */
        memmove(&f->children[i], &f->children[i + 1], (f->n_children - i - 1) * sizeof f->children[0]);
        f->n_children--;
        found = true;
    }
    pthread_mutex_unlock(&f->lock);
    if (!found) return SPEED_ERR_INVALID_ARGUMENT;
    child_free(c, f->n_labels);
    return SPEED_OK;
}

speed_status_t speed_counter_remove(speed_counter_t *child) {
    return family_remove_child(child ? &child->h : NULL, KIND_COUNTER);
}

speed_status_t speed_gauge_remove(speed_gauge_t *child) {
    return family_remove_child(child ? &child->h : NULL, KIND_GAUGE);
}

speed_status_t speed_histogram_remove(speed_histogram_t *child) {
    return family_remove_child(child ? &child->h : NULL, KIND_HISTOGRAM);
}

/* ---- updates -------------------------------------------------------------------------- */

#define ASSERT_SERIES(hdr, k) SPEED_ASSERT(!(hdr).is_family && (hdr).family->kind == (k))

void speed_counter_inc(speed_counter_t *counter) { speed_counter_add(counter, 1.0); }

void speed_counter_add(speed_counter_t *counter, double v) {
    ASSERT_SERIES(counter->h, KIND_COUNTER);
    if (!(v >= 0)) return; /* counters never go down; also drops NaN */
    atomic_dbl_add(&counter->bits, v);
}

double speed_counter_get(const speed_counter_t *counter) {
    ASSERT_SERIES(counter->h, KIND_COUNTER);
    return bits_dbl(atomic_load_explicit(&((speed_counter_t *)counter)->bits, memory_order_relaxed));
}

void speed_gauge_set(speed_gauge_t *gauge, double v) {
    ASSERT_SERIES(gauge->h, KIND_GAUGE);
    SPEED_ASSERT(!gauge->h.family->cb);
    atomic_store_explicit(&gauge->bits, dbl_bits(v), memory_order_relaxed);
}

void speed_gauge_add(speed_gauge_t *gauge, double v) {
    ASSERT_SERIES(gauge->h, KIND_GAUGE);
    SPEED_ASSERT(!gauge->h.family->cb);
    atomic_dbl_add(&gauge->bits, v);
}

void speed_gauge_inc(speed_gauge_t *gauge) { speed_gauge_add(gauge, 1.0); }
void speed_gauge_dec(speed_gauge_t *gauge) { speed_gauge_add(gauge, -1.0); }

double speed_gauge_get(const speed_gauge_t *gauge) {
    ASSERT_SERIES(gauge->h, KIND_GAUGE);
    if (gauge->h.family->cb) return gauge->h.family->cb(gauge->h.family->cb_user);
    return bits_dbl(atomic_load_explicit(&((speed_gauge_t *)gauge)->bits, memory_order_relaxed));
}

void speed_histogram_observe(speed_histogram_t *histogram, double v) {
    ASSERT_SERIES(histogram->h, KIND_HISTOGRAM);
    if (isnan(v)) return;
    const family_t *f = histogram->h.family;
    /* First bucket whose upper bound is >= v (le is inclusive); n_buckets means +Inf. */
    size_t lo = 0, hi = f->n_buckets;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (v <= f->buckets[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    atomic_fetch_add_explicit(&histogram->counts[lo], 1, memory_order_relaxed);
    atomic_dbl_add(&histogram->sum_bits, v);
}

void speed_histogram_get(const speed_histogram_t *histogram, uint64_t *count_p, double *sum_p) {
    ASSERT_SERIES(histogram->h, KIND_HISTOGRAM);
    speed_histogram_t *h = (speed_histogram_t *)histogram;
    if (count_p) {
        uint64_t n = 0;
        for (size_t i = 0; i <= h->h.family->n_buckets; i++)
            n += atomic_load_explicit(&h->counts[i], memory_order_relaxed);
        *count_p = n;
    }
    if (sum_p) *sum_p = bits_dbl(atomic_load_explicit(&h->sum_bits, memory_order_relaxed));
}

/* ---- rendering ------------------------------------------------------------------------ */

typedef struct {
    char *buf;
    size_t len;
    size_t cap;
    bool oom;
} sbuf_t;

static void sb_put(sbuf_t *sb, const char *s, size_t n) {
    if (sb->oom) return;
    if (sb->len + n + 1 > sb->cap) {
        size_t cap = sb->cap ? sb->cap : 4096;
        while (sb->len + n + 1 > cap) cap *= 2;
        char *grown = speed_realloc(sb->buf, cap);
        if (!grown) {
            sb->oom = true;
            return;
        }
        sb->buf = grown;
        sb->cap = cap;
    }
    memcpy(sb->buf + sb->len, s, n);
    sb->len += n;
    sb->buf[sb->len] = '\0';
}

static void sb_str(sbuf_t *sb, const char *s) { sb_put(sb, s, strlen(s)); }

static void sb_value(sbuf_t *sb, double v) {
    char tmp[64];
    size_t n = speed_metrics_format_value(v, tmp, sizeof(tmp));
    sb_put(sb, tmp, n);
}

static void sb_u64(sbuf_t *sb, uint64_t v) {
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)v);
    sb_put(sb, tmp, (size_t)n);
}

/* HELP text escapes \ and newline; label values also escape ". */
static void sb_escaped(sbuf_t *sb, const char *s, bool quote) {
    const char *run = s;
    for (; *s; s++) {
        const char *rep = NULL;
        if (*s == '\\')
            rep = "\\\\";
        else if (*s == '\n')
            rep = "\\n";
        else if (quote && *s == '"')
            rep = "\\\"";
        if (!rep) continue;
        sb_put(sb, run, (size_t)(s - run));
        sb_str(sb, rep);
        run = s + 1;
    }
    sb_put(sb, run, (size_t)(s - run));
}

/* name{l1="v1",...[,le="x"]} */
static void sb_series(sbuf_t *sb, const family_t *f, const char *suffix, const child_hdr_t *c, const char *le) {
    sb_str(sb, f->name);
    sb_str(sb, suffix);
    if (f->n_labels == 0 && !le) return;
    sb_str(sb, "{");
    for (size_t i = 0; i < f->n_labels; i++) {
        if (i) sb_str(sb, ",");
        sb_str(sb, f->label_names[i]);
        sb_str(sb, "=\"");
        sb_escaped(sb, c->values[i], true);
        sb_str(sb, "\"");
    }
    if (le) {
        if (f->n_labels) sb_str(sb, ",");
        sb_str(sb, "le=\"");
        sb_str(sb, le);
        sb_str(sb, "\"");
    }
    sb_str(sb, "}");
}

static void render_family(sbuf_t *sb, family_t *f) {
    static const char *const type_names[] = {"counter", "gauge", "histogram"};
    if (f->help) {
        sb_str(sb, "# HELP ");
        sb_str(sb, f->name);
        sb_str(sb, " ");
        sb_escaped(sb, f->help, false);
        sb_str(sb, "\n");
    }
    sb_str(sb, "# TYPE ");
    sb_str(sb, f->name);
    sb_str(sb, " ");
    sb_str(sb, type_names[f->kind]);
    sb_str(sb, "\n");

    pthread_mutex_lock(&f->lock);
    for (size_t i = 0; i < f->n_children; i++) {
        child_hdr_t *c = f->children[i];
        if (f->kind == KIND_COUNTER || f->kind == KIND_GAUGE) {
            double v;
            if (f->cb)
                v = f->cb(f->cb_user);
            else if (f->kind == KIND_COUNTER)
                v = bits_dbl(atomic_load_explicit(&((speed_counter_t *)c)->bits, memory_order_relaxed));
            else
                v = bits_dbl(atomic_load_explicit(&((speed_gauge_t *)c)->bits, memory_order_relaxed));
            sb_series(sb, f, "", c, NULL);
            sb_str(sb, " ");
            sb_value(sb, v);
            sb_str(sb, "\n");
            continue;
        }
        speed_histogram_t *h = (speed_histogram_t *)c;
        uint64_t cumulative = 0;
        char le[64];
        for (size_t b = 0; b <= f->n_buckets; b++) {
            cumulative += atomic_load_explicit(&h->counts[b], memory_order_relaxed);
            if (b < f->n_buckets)
                speed_metrics_format_value(f->buckets[b], le, sizeof(le));
            else
                snprintf(le, sizeof(le), "+Inf");
            sb_series(sb, f, "_bucket", c, le);
            sb_str(sb, " ");
            sb_u64(sb, cumulative);
            sb_str(sb, "\n");
        }
        sb_series(sb, f, "_sum", c, NULL);
        sb_str(sb, " ");
        sb_value(sb, bits_dbl(atomic_load_explicit(&h->sum_bits, memory_order_relaxed)));
        sb_str(sb, "\n");
        sb_series(sb, f, "_count", c, NULL);
        sb_str(sb, " ");
        sb_u64(sb, cumulative);
        sb_str(sb, "\n");
    }
    pthread_mutex_unlock(&f->lock);
}

speed_status_t speed_metrics_render(speed_metrics_t *metrics, char **text_p, size_t *len_p) {
    if (!metrics || !text_p) return SPEED_ERR_INVALID_ARGUMENT;
    sbuf_t sb = {0};
    sb_put(&sb, "", 0); /* an empty registry still yields "" */
    pthread_mutex_lock(&metrics->lock);
    for (size_t i = 0; i < metrics->n_families; i++) render_family(&sb, metrics->families[i]);
    pthread_mutex_unlock(&metrics->lock);
    if (sb.oom) {
        speed_free(sb.buf);
        return SPEED_ERR_NO_MEMORY;
    }
    *text_p = sb.buf;
    if (len_p) *len_p = sb.len;
    return SPEED_OK;
}

/* ---- registry lifecycle --------------------------------------------------------------- */

speed_status_t speed_metrics_create(speed_metrics_t **metrics_p) {
    if (!metrics_p) return SPEED_ERR_INVALID_ARGUMENT;
    speed_metrics_t *m = speed_calloc(1, sizeof(*m));
    if (!m) return SPEED_ERR_NO_MEMORY;
    pthread_mutex_init(&m->lock, NULL);
    *metrics_p = m;
    return SPEED_OK;
}

void speed_metrics_destroy(speed_metrics_t *metrics) {
    if (!metrics) return;
    for (size_t i = 0; i < metrics->n_families; i++) family_free(metrics->families[i]);
    speed_free(metrics->families);
    pthread_mutex_destroy(&metrics->lock);
    speed_free(metrics);
}
