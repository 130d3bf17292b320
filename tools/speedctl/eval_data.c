/* speedctl eval's records from the operator's files (eval.h): text cut into windows, JSONL lines
 * of text or ids. */
#include <errno.h>
#include <jansson.h>
#include <string.h>

#include "alloc.h"
#include "eval.h"
#include "log.h"
#include "speedctl.h"

void speedctl_eval_set_cleanup(speedctl_eval_set_t *set) {
    for (size_t i = 0; i < set->n; i++) speed_free(set->v[i].ids);
    speed_free(set->v);
    memset(set, 0, sizeof *set);
}


speed_status_t speedctl_eval_set_add(speedctl_eval_set_t *set, const int32_t *ids, int64_t n_prompt, int64_t n_cont,
                                     int probe_depth) {
    if (set->n == set->cap) {
        size_t cap = set->cap ? set->cap * 2 : 64;
        speedctl_eval_record_t *grown = speed_realloc(set->v, cap * sizeof *grown);
        if (!grown) return SPEED_ERR_NO_MEMORY;
        set->v = grown;
        set->cap = cap;
    }
    size_t n = (size_t)(n_prompt + n_cont);
    int32_t *copy = speed_malloc(n * sizeof *copy);
    if (!copy) return SPEED_ERR_NO_MEMORY;
    memcpy(copy, ids, n * sizeof *copy);
    set->v[set->n++] = (speedctl_eval_record_t){copy, n_prompt, n_cont, probe_depth};
    return SPEED_OK;
}

typedef struct {
    const speed_tok_t *tok;
    int32_t vocab;
    int64_t n_prompt, n_cont, max_records;
    speedctl_eval_set_t *set;
} loader_t;

static bool full(const loader_t *ld) { return ld->max_records > 0 && (int64_t)ld->set->n >= ld->max_records; }

/* One record from a token sequence: used when long enough, else counted as skipped. */
static speed_status_t take(loader_t *ld, const int32_t *ids, size_t n) {
    ld->set->n_read++;
    if ((int64_t)n < ld->n_prompt + ld->n_cont) {
        ld->set->n_skipped++;
        return SPEED_OK;
    }
    return speedctl_eval_set_add(ld->set, ids, ld->n_prompt, ld->n_cont, -1);
}

/* A text file: encoded whole (with the BOS), cut into windows of n_prompt + n_cont. */
static speed_status_t load_text(loader_t *ld, const char *data, size_t len) {
    speed_tok_ids_t ids = {0};
    SPEED_CHECK(speed_tok_encode(ld->tok, data, len, true, &ids));
    speed_status_t st = SPEED_OK;
    size_t w = (size_t)(ld->n_prompt + ld->n_cont);
    for (size_t at = 0; at < ids.n && st == SPEED_OK && !full(ld); at += w)
        st = take(ld, ids.ids + at, at + w <= ids.n ? w : ids.n - at);
    speed_tok_ids_free(&ids);
    return st;
}

/* One JSONL line: {"text": "..."} or {"ids": [...]}. */
static speed_status_t load_line(loader_t *ld, const char *path, int64_t line_no, const char *line, size_t len) {
    json_error_t jerr;
    json_t *j = json_loadb(line, len, 0, &jerr);
    speed_tok_ids_t ids = {0};
    speed_status_t st = SPEED_OK;
    json_t *text = j ? json_object_get(j, "text") : NULL, *arr = j ? json_object_get(j, "ids") : NULL;
    if (!j || !json_is_object(j)) {
        speedctl_fail("%s:%lld: not a JSON object%s%s", path, (long long)line_no, j ? "" : ": ", j ? "" : jerr.text);
        st = SPEED_ERR_PARSE;
    } else if (json_is_string(text) && !arr) {
        st = speed_tok_encode(ld->tok, json_string_value(text), json_string_length(text), true, &ids);
    } else if (json_is_array(arr) && !text) {
        size_t n = json_array_size(arr);
        ids.ids = speed_malloc((n ? n : 1) * sizeof *ids.ids);
        if (!ids.ids) st = SPEED_ERR_NO_MEMORY;
        for (size_t i = 0; st == SPEED_OK && i < n; i++) {
            json_t *v = json_array_get(arr, i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= ld->vocab) {
                speedctl_fail("%s:%lld: ids[%zu] is not a token id in 0..%d", path, (long long)line_no, i,
                              ld->vocab - 1);
                st = SPEED_ERR_PARSE;
            } else {
                ids.ids[ids.n++] = (int32_t)json_integer_value(v);
            }
        }
    } else {
        speedctl_fail("%s:%lld: expected {\"text\": \"...\"} or {\"ids\": [...]}", path, (long long)line_no);
        st = SPEED_ERR_PARSE;
    }
    if (st == SPEED_OK) st = take(ld, ids.ids, ids.n);
    speed_free(ids.ids);
    json_decref(j);
    return st;
}

static speed_status_t load_jsonl(loader_t *ld, const char *path, const char *data, size_t len) {
    int64_t line_no = 0;
    for (size_t at = 0; at < len && !full(ld);) {
        const char *nl = memchr(data + at, '\n', len - at);
        size_t end = nl ? (size_t)(nl - data) : len;
        line_no++;
        size_t b = at;
        while (b < end && (data[b] == ' ' || data[b] == '\t' || data[b] == '\r')) b++;
        if (b < end) SPEED_CHECK(load_line(ld, path, line_no, data + b, end - b));
        at = end + 1;
    }
    return SPEED_OK;
}

static bool ends_with(const char *s, size_t n, const char *suffix) {
    size_t k = strlen(suffix);
    return n >= k && strncmp(s + n - k, suffix, k) == 0;
}

speed_status_t speedctl_eval_data_load(const char *paths, const speed_tok_t *tok, int32_t vocab, int64_t n_prompt,
                                       int64_t n_cont, int64_t max_records, speedctl_eval_set_t *set) {
    loader_t ld = {tok, vocab, n_prompt, n_cont, max_records, set};
    char path[4096];
    for (const char *p = paths; *p && !full(&ld);) {
        size_t n = strcspn(p, ",");
        if (n == 0 || n >= sizeof path) {
            speedctl_fail("--data: '%.*s' is not a file name", (int)n, p);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        memcpy(path, p, n);
        path[n] = '\0';
        p += n + (p[n] == ',');
        char *data = NULL;
        size_t len = 0;
        SPEED_CHECK(speedctl_read_file(path, &data, &len));
        speed_status_t st = ends_with(path, n, ".jsonl") ? load_jsonl(&ld, path, data, len) : load_text(&ld, data, len);
        speed_free(data);
        SPEED_CHECK(st);
    }
    return SPEED_OK;
}
