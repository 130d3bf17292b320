/* The Prometheus text format reader and the window arithmetic of speedctl top (prom_text.h).
 *
 * Parsing works in place on one private copy of the text: names and label values are cut out
 * with NULs written over the character after them (a label value's unescaping only ever
 * shortens it), so a document is three allocations whatever its size: the text, the samples,
 * the labels. Labels are collected by index while the arrays grow and turned into pointers
 * once at the end. */
#include "prom_text.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

speed_prom_limits_t speed_prom_default_limits(void) {
    return (speed_prom_limits_t){.max_bytes = (size_t)16 << 20, .max_samples = 65536, .max_labels = 32};
}

/* ---- parsing -------------------------------------------------------------------------------- */

typedef struct {
    speed_prom_text_t *doc;
    speed_prom_limits_t lim;
    size_t cap_samples, cap_labels, n_labels, cap_families;
    size_t *label_first; /* per sample: index of its first label, until the fix-up */
} parser_t;

static bool name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':'; }
static bool name_char(char c) { return name_start(c) || (c >= '0' && c <= '9'); }
static bool is_blank(char c) { return c == ' ' || c == '\t'; }

static char *skip_blank(char *p) {
    while (is_blank(*p)) p++;
    return p;
}

/* A metric or label name at p; its end in *end_p. False when there is none. */
static bool name_scan(char *p, char **end_p) {
    if (!name_start(*p)) return false;
    while (name_char(*p)) p++;
    *end_p = p;
    return true;
}

/* A double as the format writes them (also NaN, +Inf, -Inf); *end_p after it. */
static bool value_scan(char *p, double *v, char **end_p) {
    if (!*p) return false;
    char *end;
    *v = strtod(p, &end);
    if (end == p) return false;
    if (*end && !is_blank(*end)) return false;
    *end_p = end;
    return true;
}

static bool grow(void **arr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return true;
    size_t n = *cap ? *cap * 2 : 64;
    while (n < need) n *= 2;
    void *g = speed_realloc(*arr, n * elem);
    if (!g) return false;
    *arr = g;
    *cap = n;
    return true;
}

/* A quoted label value at p (just after the '"'): unescaped in place, NUL-terminated; *end_p
 * after the closing quote. */
static bool label_value_scan(char *p, char **end_p) {
    char *o = p;
    for (;;) {
        char c = *p++;
        if (!c) return false;
        if (c == '"') break;
        if (c == '\\') {
            char e = *p++;
            if (e == 'n')
                *o++ = '\n';
            else if (e == '\\' || e == '"')
                *o++ = e;
            else
                return false;
            continue;
        }
        *o++ = c;
    }
    *o = '\0'; /* o < p: the quote (or more) was consumed */
    *end_p = p;
    return true;
}

/* One sample line (NUL-terminated, comments excluded). False: a bad line (nothing kept). */
static speed_status_t sample_line(parser_t *ps, char *p, bool *ok_p) {
    speed_prom_text_t *doc = ps->doc;
    *ok_p = false;
    char *name = p, *end;
    if (!name_scan(p, &end)) return SPEED_OK;
    p = end;
    char name_end_char = *p;
    size_t first = ps->n_labels, n_labels = 0;
    char *name_end = p;
    if (name_end_char == '{') {
        p++;
        for (;;) {
            p = skip_blank(p);
            if (*p == '}') {
                p++;
                break;
            }
            char *lname = p, *lend;
            if (!name_scan(p, &lend)) goto bad;
            p = skip_blank(lend);
            if (*p != '=') goto bad;
            p = skip_blank(p + 1);
            if (*p != '"') goto bad;
            *lend = '\0';
            char *lvalue = p + 1;
            if (!label_value_scan(lvalue, &p)) goto bad;
            if (n_labels == ps->lim.max_labels) goto bad;
            if (!grow((void **)&doc->labels, &ps->cap_labels, ps->n_labels + 1, sizeof *doc->labels))
                return SPEED_ERR_NO_MEMORY;
            doc->labels[ps->n_labels++] = (speed_prom_label_t){lname, lvalue};
            n_labels++;
            p = skip_blank(p);
            if (*p == ',') {
                p++;
                continue;
            }
            if (*p == '}') {
                p++;
                break;
            }
            goto bad;
        }
    } else if (name_end_char && !is_blank(name_end_char)) {
        goto bad;
    }
    p = skip_blank(p);
    double v;
    if (!value_scan(p, &v, &end)) goto bad;
    p = skip_blank(end);
    if (*p) { /* a timestamp: an integer, then nothing */
        char *tend;
        (void)strtoll(p, &tend, 10);
        if (tend == p || *skip_blank(tend)) goto bad;
    }
    *name_end = '\0';
    if (doc->n_samples == ps->lim.max_samples) {
        doc->truncated = true;
        ps->n_labels = first;
        return SPEED_OK;
    }
    size_t cap = ps->cap_samples;
    if (!grow((void **)&doc->samples, &ps->cap_samples, doc->n_samples + 1, sizeof *doc->samples)) {
        return SPEED_ERR_NO_MEMORY;
    }
    if (ps->cap_samples != cap) {
        size_t *g = speed_realloc(ps->label_first, ps->cap_samples * sizeof *g);
        if (!g) return SPEED_ERR_NO_MEMORY;
        ps->label_first = g;
    }
    ps->label_first[doc->n_samples] = first;
    doc->samples[doc->n_samples++] = (speed_prom_sample_t){name, NULL, n_labels, v};
    *ok_p = true;
    return SPEED_OK;
bad:
    ps->n_labels = first; /* drop the labels this line added */
    return SPEED_OK;
}

static speed_prom_type_t type_parse(const char *s) {
    if (strcmp(s, "counter") == 0) return SPEED_PROM_COUNTER;
    if (strcmp(s, "gauge") == 0) return SPEED_PROM_GAUGE;
    if (strcmp(s, "histogram") == 0) return SPEED_PROM_HISTOGRAM;
    if (strcmp(s, "summary") == 0) return SPEED_PROM_SUMMARY;
    return SPEED_PROM_UNTYPED;
}

/* "# TYPE name type": kept; any other comment is ignored. */
static speed_status_t comment_line(parser_t *ps, char *p) {
    p = skip_blank(p + 1);
    if (strncmp(p, "TYPE", 4) != 0 || !is_blank(p[4])) return SPEED_OK;
    p = skip_blank(p + 4);
    char *name = p, *end;
    if (!name_scan(p, &end) || !is_blank(*end)) {
        ps->doc->n_bad_lines++;
        return SPEED_OK;
    }
    *end = '\0';
    char *type = skip_blank(end + 1), *tend = type;
    while (*tend && !is_blank(*tend)) tend++;
    *tend = '\0';
    speed_prom_text_t *doc = ps->doc;
    if (doc->n_families == ps->lim.max_samples) return SPEED_OK;
    if (!grow((void **)&doc->families, &ps->cap_families, doc->n_families + 1, sizeof *doc->families))
        return SPEED_ERR_NO_MEMORY;
    doc->families[doc->n_families++] = (speed_prom_family_t){name, type_parse(type)};
    return SPEED_OK;
}

speed_status_t speed_prom_text_parse(const char *text, size_t len, const speed_prom_limits_t *limits,
                                     speed_prom_text_t *doc) {
    if (!doc) return SPEED_ERR_INVALID_ARGUMENT;
    memset(doc, 0, sizeof *doc);
    if (!text && len) return SPEED_ERR_INVALID_ARGUMENT;
    parser_t ps = {.doc = doc, .lim = limits ? *limits : speed_prom_default_limits()};
    if (len > ps.lim.max_bytes) return SPEED_ERR_TOO_LONG;
    doc->text = speed_malloc(len + 1);
    if (!doc->text) return SPEED_ERR_NO_MEMORY;
    if (len) memcpy(doc->text, text, len);
    doc->text[len] = '\0';
    speed_status_t st = SPEED_OK;
    char *p = doc->text, *stop = doc->text + len;
    while (p < stop && st == SPEED_OK) {
        char *nl = memchr(p, '\n', (size_t)(stop - p));
        char *eol = nl ? nl : stop;
        *eol = '\0';
        if (eol > p && eol[-1] == '\r') eol[-1] = '\0';
        char *line = skip_blank(p);
        p = eol + 1;
        if (!*line) continue;
        if (*line == '#') {
            st = comment_line(&ps, line);
            continue;
        }
        bool ok;
        st = sample_line(&ps, line, &ok);
        if (st == SPEED_OK && !ok && !doc->truncated) doc->n_bad_lines++;
    }
    if (st == SPEED_OK)
        for (size_t i = 0; i < doc->n_samples; i++)
            doc->samples[i].labels = doc->samples[i].n_labels ? &doc->labels[ps.label_first[i]] : NULL;
    speed_free(ps.label_first);
    if (st != SPEED_OK) speed_prom_text_cleanup(doc);
    return st;
}

void speed_prom_text_cleanup(speed_prom_text_t *doc) {
    if (!doc) return;
    speed_free(doc->text);
    speed_free(doc->samples);
    speed_free(doc->labels);
    speed_free(doc->families);
    memset(doc, 0, sizeof *doc);
}

/* ---- queries -------------------------------------------------------------------------------- */

speed_prom_type_t speed_prom_text_type(const speed_prom_text_t *doc, const char *name) {
    for (size_t i = 0; i < doc->n_families; i++)
        if (strcmp(doc->families[i].name, name) == 0) return doc->families[i].type;
    return SPEED_PROM_UNTYPED;
}

const char *speed_prom_sample_label(const speed_prom_sample_t *s, const char *name) {
    for (size_t i = 0; i < s->n_labels; i++)
        if (strcmp(s->labels[i].name, name) == 0) return s->labels[i].value;
    return NULL;
}

bool speed_prom_sample_match(const speed_prom_sample_t *s, const char *name, const char *const *match) {
    if (strcmp(s->name, name) != 0) return false;
    for (size_t i = 0; match && match[i] && match[i + 1]; i += 2) {
        const char *v = speed_prom_sample_label(s, match[i]);
        if (!v || strcmp(v, match[i + 1]) != 0) return false;
    }
    return true;
}

double speed_prom_text_sum(const speed_prom_text_t *doc, const char *name, const char *const *match) {
    double sum = 0;
    bool any = false;
    for (size_t i = 0; i < doc->n_samples; i++)
        if (speed_prom_sample_match(&doc->samples[i], name, match)) {
            sum += doc->samples[i].value;
            any = true;
        }
    return any ? sum : NAN;
}

bool speed_prom_text_has_prefix(const speed_prom_text_t *doc, const char *prefix) {
    size_t n = strlen(prefix);
    for (size_t i = 0; i < doc->n_samples; i++)
        if (strncmp(doc->samples[i].name, prefix, n) == 0) return true;
    return false;
}

/* ---- histograms ----------------------------------------------------------------------------- */

speed_status_t speed_prom_text_histogram(const speed_prom_text_t *doc, const char *name, const char *const *match,
                                         speed_prom_hist_t *h) {
    char series[256];
    memset(h, 0, sizeof *h);
    h->count_total = NAN;
    if (snprintf(series, sizeof series, "%s_bucket", name) >= (int)sizeof series) return SPEED_ERR_NOT_FOUND;
    for (size_t i = 0; i < doc->n_samples; i++) {
        const speed_prom_sample_t *s = &doc->samples[i];
        if (!speed_prom_sample_match(s, series, match)) continue;
        const char *le_text = speed_prom_sample_label(s, "le");
        char *end;
        double le = le_text ? strtod(le_text, &end) : NAN;
        if (!le_text || end == le_text || *end || isnan(le)) return SPEED_ERR_FORMAT;
        size_t k = 0;
        while (k < h->n_buckets && h->le[k] < le) k++;
        if (k < h->n_buckets && h->le[k] == le) {
            h->count[k] += s->value;
            continue;
        }
        if (h->n_buckets == SPEED_PROM_HIST_MAX_BUCKETS) return SPEED_ERR_FORMAT;
        memmove(&h->le[k + 1], &h->le[k], (h->n_buckets - k) * sizeof h->le[0]);
        memmove(&h->count[k + 1], &h->count[k], (h->n_buckets - k) * sizeof h->count[0]);
        h->le[k] = le;
        h->count[k] = s->value;
        h->n_buckets++;
    }
    if (!h->n_buckets || !isinf(h->le[h->n_buckets - 1])) return SPEED_ERR_NOT_FOUND;
    snprintf(series, sizeof series, "%s_sum", name);
    double sum = speed_prom_text_sum(doc, series, match);
    h->sum = isnan(sum) ? 0 : sum;
    snprintf(series, sizeof series, "%s_count", name);
    h->count_total = speed_prom_text_sum(doc, series, match);
    return SPEED_OK;
}

double speed_prom_hist_count(const speed_prom_hist_t *h) { return h->n_buckets ? h->count[h->n_buckets - 1] : 0; }

void speed_prom_hist_delta(const speed_prom_hist_t *cur, const speed_prom_hist_t *prev, speed_prom_hist_t *out) {
    bool same = prev && prev->n_buckets == cur->n_buckets;
    for (size_t k = 0; same && k < cur->n_buckets; k++)
        if (prev->le[k] != cur->le[k] || prev->count[k] > cur->count[k]) same = false;
    if (out != cur) *out = *cur;
    if (!same) return;
    for (size_t k = 0; k < cur->n_buckets; k++) out->count[k] = cur->count[k] - prev->count[k];
    out->sum = cur->sum - prev->sum;
    out->count_total = cur->count_total - prev->count_total;
}

double speed_prom_hist_quantile(const speed_prom_hist_t *h, double q) {
    if (!(q >= 0 && q <= 1) || h->n_buckets < 2) return NAN;
    double total = h->count[h->n_buckets - 1];
    if (!(total > 0)) return NAN;
    double rank = q * total;
    /* cumulative counts must not fall; scrapes of a live process can be torn, so take the
     * running maximum as Prometheus does */
    double below = 0, lower_bound = 0;
    for (size_t k = 0; k < h->n_buckets; k++) {
        double c = h->count[k] > below ? h->count[k] : below;
        if (c >= rank && c > 0) {
            /* a first bound at or below zero (-Inf included) is returned as is; only then can an
             * infinite bound be the +Inf bucket, which has a finite bound before it */
            if (k == 0 && h->le[0] <= 0) return h->le[0];
            if (isinf(h->le[k])) return k ? h->le[k - 1] : NAN;
            double in_bucket = c - below;
            if (in_bucket <= 0) return h->le[k];
            return lower_bound + (h->le[k] - lower_bound) * (rank - below) / in_bucket;
        }
        below = c;
        lower_bound = h->le[k];
    }
    return h->le[h->n_buckets - 2];
}

/* ---- counters ------------------------------------------------------------------------------- */

double speed_prom_rate(double cur, double prev, double dt_s) {
    if (isnan(cur) || isnan(prev) || !(dt_s > 0)) return NAN;
    return (cur >= prev ? cur - prev : cur) / dt_s;
}
