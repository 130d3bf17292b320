/* The Prometheus text format checker and sample reader: see prom_check.h. */
#include "prom_check.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PC_MAX_FAMILIES 256
#define PC_MAX_SERIES   4096
#define PC_MAX_LABELS   16

typedef struct {
    char name[256];
    char type[16];
    bool has_help, has_type, has_samples, closed;
} pc_family_t;

typedef struct {
    char key[1024]; /* sample name + canonical labels (without le for histograms) */
    int family;
    /* histogram state */
    double last_le;
    double last_count;
    bool has_bucket, inf_seen, has_sum, has_count;
    double inf_count, count;
} pc_series_t;

typedef struct {
    pc_family_t fam[PC_MAX_FAMILIES];
    int n_fam;
    pc_series_t *series; /* [PC_MAX_SERIES] */
    int n_series;
    char seen[PC_MAX_SERIES][1024]; /* full sample identities, for duplicate detection */
    int n_seen;
    int cur; /* family the current samples belong to, -1 none */
    char *err;
    size_t cap;
    int line;
} pc_state_t;

static int pc_fail(pc_state_t *s, const char *fmt, ...) {
    int n = snprintf(s->err, s->cap, "line %d: ", s->line);
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < s->cap) vsnprintf(s->err + n, s->cap - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

static bool pc_name_char(char c, bool first, bool colon) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') return true;
    if (colon && c == ':') return true;
    return !first && c >= '0' && c <= '9';
}

/* Reads a metric (colon=true) or label name at *p; returns its length (0 if none). */
static size_t pc_name(const char *p, bool colon) {
    size_t n = 0;
    while (p[n] && pc_name_char(p[n], n == 0, colon)) n++;
    return n;
}

static bool pc_float(const char *s, size_t n, double *v) {
    char buf[64];
    if (n == 0 || n >= sizeof(buf)) return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (strcmp(buf, "NaN") == 0) {
        *v = NAN;
        return true;
    }
    if (strcmp(buf, "+Inf") == 0) {
        *v = INFINITY;
        return true;
    }
    if (strcmp(buf, "-Inf") == 0) {
        *v = -INFINITY;
        return true;
    }
    /* Digits, sign, '.', exponent only: strtod would also take "inf", "0x1p3", "nan". */
    for (size_t i = 0; i < n; i++) {
        if (!strchr("0123456789+-.eE", buf[i])) return false;
    }
    char *end;
    *v = strtod(buf, &end);
    return *end == '\0';
}

static int pc_find_family(pc_state_t *s, const char *name) {
    for (int i = 0; i < s->n_fam; i++)
        if (strcmp(s->fam[i].name, name) == 0) return i;
    return -1;
}

static int pc_family_for(pc_state_t *s, const char *name) {
    if (strlen(name) >= sizeof(s->fam[0].name)) return -1;
    int i = pc_find_family(s, name);
    if (i >= 0) return i;
    if (s->n_fam == PC_MAX_FAMILIES) return -1;
    i = s->n_fam++;
    memset(&s->fam[i], 0, sizeof(s->fam[i]));
    strcpy(s->fam[i].name, name);
    return i;
}

static bool pc_suffix(const char *name, const char *base, const char *suffix) {
    size_t nb = strlen(base);
    return strncmp(name, base, nb) == 0 && strcmp(name + nb, suffix) == 0;
}

static int pc_comment(pc_state_t *s, const char *p) {
    bool help = strncmp(p, "# HELP ", 7) == 0, type = strncmp(p, "# TYPE ", 7) == 0;
    if (!help && !type) return 0; /* free comment */
    p += 7;
    size_t n = pc_name(p, true);
    if (n == 0 || n >= 256) return pc_fail(s, "bad metric name in HELP/TYPE");
    char name[256];
    memcpy(name, p, n);
    name[n] = '\0';
    p += n;
    if (*p != ' ') return pc_fail(s, "expected a space after the name");
    p++;
    int f = pc_family_for(s, name);
    if (f < 0) return pc_fail(s, "too many families");
    pc_family_t *fam = &s->fam[f];
    if (fam->closed || fam->has_samples) return pc_fail(s, "HELP/TYPE for %s after its samples", name);
    if (s->cur >= 0 && s->cur != f) s->fam[s->cur].closed = true;
    s->cur = f;
    if (help) {
        if (fam->has_help) return pc_fail(s, "second HELP for %s", name);
        fam->has_help = true;
        for (; *p; p++) {
            if (*p == '\\') {
                p++;
                if (*p != '\\' && *p != 'n') return pc_fail(s, "bad escape in HELP");
            }
        }
        return 0;
    }
    if (fam->has_type) return pc_fail(s, "second TYPE for %s", name);
    fam->has_type = true;
    if (strcmp(p, "counter") && strcmp(p, "gauge") && strcmp(p, "histogram") && strcmp(p, "summary") &&
        strcmp(p, "untyped"))
        return pc_fail(s, "unknown type \"%s\"", p);
    snprintf(fam->type, sizeof(fam->type), "%s", p);
    if (strcmp(p, "counter") == 0 && !(strlen(name) > 6 && strcmp(name + strlen(name) - 6, "_total") == 0))
        return pc_fail(s, "counter %s does not end in _total", name);
    return 0;
}

static int pc_sample(pc_state_t *s, const char *p) {
    size_t n = pc_name(p, true);
    if (n == 0 || n >= 256) return pc_fail(s, "bad sample name");
    char name[256];
    memcpy(name, p, n);
    name[n] = '\0';
    p += n;

    /* labels: canonical text without le, and le separately */
    char labels[PC_MAX_LABELS][128];
    int n_labels = 0;
    char canon[1024] = "";
    bool has_le = false;
    double le = 0;
    if (*p == '{') {
        p++;
        while (*p != '}') {
            size_t ln = pc_name(p, false);
            if (ln == 0 || ln >= 128) return pc_fail(s, "bad label name");
            if (n_labels == PC_MAX_LABELS) return pc_fail(s, "too many labels");
            memcpy(labels[n_labels], p, ln);
            labels[n_labels][ln] = '\0';
            for (int i = 0; i < n_labels; i++)
                if (strcmp(labels[i], labels[n_labels]) == 0) return pc_fail(s, "label %s twice", labels[i]);
            p += ln;
            if (p[0] != '=' || p[1] != '"') return pc_fail(s, "expected =\" after label name");
            p += 2;
            char value[512];
            size_t vn = 0;
            while (*p != '"') {
                if (!*p) return pc_fail(s, "unterminated label value");
                char c = *p++;
                if (c == '\\') {
                    c = *p++;
                    if (c == 'n')
                        c = '\n';
                    else if (c != '\\' && c != '"')
                        return pc_fail(s, "bad escape in label value");
                }
                if (vn + 1 >= sizeof(value)) return pc_fail(s, "label value too long");
                value[vn++] = c;
            }
            value[vn] = '\0';
            p++;
            if (strcmp(labels[n_labels], "le") == 0) {
                has_le = true;
                if (!pc_float(value, vn, &le)) return pc_fail(s, "bad le \"%s\"", value);
            } else {
                size_t cl = strlen(canon);
                int w = snprintf(canon + cl, sizeof(canon) - cl, "%s%s=%s", cl ? "," : "", labels[n_labels], value);
                if (w < 0 || (size_t)w >= sizeof(canon) - cl) return pc_fail(s, "labels too long");
            }
            n_labels++;
            if (*p == ',') {
                p++;
                if (*p == '}') return pc_fail(s, "trailing comma in labels");
            } else if (*p != '}') {
                return pc_fail(s, "expected , or } in labels");
            }
        }
        p++;
    }
    if (*p != ' ') return pc_fail(s, "expected a space before the value");
    p++;
    const char *v0 = p;
    while (*p && *p != ' ') p++;
    double value;
    if (!pc_float(v0, (size_t)(p - v0), &value)) return pc_fail(s, "bad value");
    if (*p == ' ') {
        p++;
        if (*p == '-') p++;
        if (!*p) return pc_fail(s, "empty timestamp");
        for (; *p; p++)
            if (*p < '0' || *p > '9') return pc_fail(s, "bad timestamp");
    }

    /* Which family? The current one, by exact name or histogram suffix. */
    if (s->cur < 0) return pc_fail(s, "sample %s without a TYPE", name);
    pc_family_t *fam = &s->fam[s->cur];
    bool hist = strcmp(fam->type, "histogram") == 0;
    const char *suffix = NULL;
    if (strcmp(name, fam->name) == 0 && !hist)
        suffix = "";
    else if (hist && pc_suffix(name, fam->name, "_bucket"))
        suffix = "_bucket";
    else if (hist && pc_suffix(name, fam->name, "_sum"))
        suffix = "_sum";
    else if (hist && pc_suffix(name, fam->name, "_count"))
        suffix = "_count";
    if (!suffix) return pc_fail(s, "sample %s does not belong to family %s", name, fam->name);
    fam->has_samples = true;
    if (strcmp(fam->type, "counter") == 0 && !(value >= 0)) return pc_fail(s, "counter %s is negative or NaN", name);
    if (has_le && strcmp(suffix, "_bucket") != 0) return pc_fail(s, "le outside a bucket");

    char ident[1200];
    int iw = snprintf(ident, sizeof(ident), "%s{%s}le=%s%.17g", name, canon, has_le ? "y" : "n", le);
    if (iw < 0 || (size_t)iw >= sizeof(ident)) return pc_fail(s, "series too long");
    for (int i = 0; i < s->n_seen; i++)
        if (strcmp(s->seen[i], ident) == 0) return pc_fail(s, "duplicate series %s", ident);
    if (s->n_seen == PC_MAX_SERIES) return pc_fail(s, "too many series");
    if (strlen(ident) >= sizeof(s->seen[0])) return pc_fail(s, "series too long");
    memcpy(s->seen[s->n_seen++], ident, strlen(ident) + 1);

    if (!hist) return 0;
    pc_series_t *se = NULL;
    for (int i = 0; i < s->n_series; i++)
        if (s->series[i].family == s->cur && strcmp(s->series[i].key, canon) == 0) se = &s->series[i];
    if (!se) {
        if (s->n_series == PC_MAX_SERIES) return pc_fail(s, "too many series");
        se = &s->series[s->n_series++];
        memset(se, 0, sizeof(*se));
        memcpy(se->key, canon, sizeof(se->key));
        se->family = s->cur;
    }
    if (strcmp(suffix, "_bucket") == 0) {
        if (!has_le) return pc_fail(s, "bucket without le");
        if (se->inf_seen) return pc_fail(s, "bucket after +Inf");
        if (se->has_sum || se->has_count) return pc_fail(s, "bucket after _sum/_count");
        if (se->has_bucket && !(le > se->last_le)) return pc_fail(s, "le not increasing");
        if (se->has_bucket && value < se->last_count) return pc_fail(s, "bucket counts decrease");
        if (value != floor(value) || value < 0) return pc_fail(s, "bucket count not a count");
        se->has_bucket = true;
        se->last_le = le;
        se->last_count = value;
        if (isinf(le) && le > 0) {
            se->inf_seen = true;
            se->inf_count = value;
        }
    } else if (strcmp(suffix, "_sum") == 0) {
        if (se->has_sum) return pc_fail(s, "second _sum");
        se->has_sum = true;
    } else {
        if (se->has_count) return pc_fail(s, "second _count");
        se->has_count = true;
        se->count = value;
    }
    return 0;
}

int prom_check(const char *text, char *err, size_t cap) {
    static pc_series_t series[PC_MAX_SERIES];
    static pc_state_t st;
    pc_state_t *s = &st;
    memset(s, 0, sizeof(*s));
    s->series = series;
    s->cur = -1;
    s->err = err;
    s->cap = cap;
    err[0] = '\0';
    const char *p = text;
    while (*p) {
        s->line++;
        const char *nl = strchr(p, '\n');
        if (!nl) return pc_fail(s, "last line does not end in a newline");
        size_t n = (size_t)(nl - p);
        if (n == 0) return pc_fail(s, "blank line");
        char *line = malloc(n + 1);
        memcpy(line, p, n);
        line[n] = '\0';
        int rc = line[0] == '#' ? pc_comment(s, line) : pc_sample(s, line);
        free(line);
        if (rc) return rc;
        p = nl + 1;
    }
    s->line = 0;
    for (int i = 0; i < s->n_series; i++) {
        pc_series_t *se = &s->series[i];
        const char *fname = s->fam[se->family].name;
        if (!se->inf_seen) return pc_fail(s, "histogram %s{%s} has no +Inf bucket", fname, se->key);
        if (!se->has_sum || !se->has_count) return pc_fail(s, "histogram %s{%s} lacks _sum or _count", fname, se->key);
        if (se->count != se->inf_count)
            return pc_fail(s, "histogram %s{%s}: _count %g != +Inf bucket %g", fname, se->key, se->count,
                           se->inf_count);
    }
    return 0;
}

double prom_value(const char *text, const char *series) {
    size_t n = strlen(series);
    const char *p = text;
    while (p && (p = strstr(p, series)) != NULL) {
        if ((p == text || p[-1] == '\n') && p[n] == ' ') return strtod(p + n + 1, NULL);
        p += n;
    }
    return NAN;
}
