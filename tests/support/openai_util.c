/* Integration-test helpers for the router's OpenAI API: see openai_util.h. */
#include "openai_util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "test_proc.h"

void ou_result_free(ou_result_t *r) {
    for (int i = 0; i < r->n && i < OU_MAX_TOK; i++) {
        speed_free(r->tok[i]);
        for (int k = 0; k < r->top[i].n_top; k++) speed_free(r->top[i].top_str[k]);
    }
    speed_free(r->text);
    json_decref(r->usage);
    json_decref(r->error);
    memset(r, 0, sizeof *r);
}

static void ou_append_text(ou_result_t *r, const char *s, size_t n) {
    char *t = speed_malloc(r->text_len + n + 1);
    if (r->text_len) memcpy(t, r->text, r->text_len);
    memcpy(t + r->text_len, s, n);
    t[r->text_len + n] = '\0';
    speed_free(r->text);
    r->text = t;
    r->text_len += n;
}

static char *ou_dup_json_str(json_t *s) {
    return s && json_is_string(s) ? speed_strndup(json_string_value(s), json_string_length(s)) : speed_strndup("", 0);
}

/* Adds the logprobs of one choice (completions or chat format). */
static void ou_add_logprobs(ou_result_t *r, json_t *lp) {
    if (!json_is_object(lp)) return;
    json_t *content = json_object_get(lp, "content");
    if (json_is_array(content)) { /* chat */
        size_t i;
        json_t *e;
        json_array_foreach(content, i, e) {
            int k = r->n++;
            if (k >= OU_MAX_TOK) continue;
            r->tok[k] = ou_dup_json_str(json_object_get(e, "token"));
            r->lp[k] = json_number_value(json_object_get(e, "logprob"));
            json_t *tops = json_object_get(e, "top_logprobs");
            size_t j;
            json_t *t;
            json_array_foreach(tops, j, t) {
                ou_top_t *tp = &r->top[k];
                if (tp->n_top >= OU_MAX_TOP) break;
                tp->top_str[tp->n_top] = ou_dup_json_str(json_object_get(t, "token"));
                tp->top_lp[tp->n_top++] = json_number_value(json_object_get(t, "logprob"));
            }
        }
        return;
    }
    json_t *toks = json_object_get(lp, "tokens"), *lps = json_object_get(lp, "token_logprobs"),
           *tops = json_object_get(lp, "top_logprobs");
    for (size_t i = 0; i < json_array_size(toks); i++) {
        int k = r->n++;
        if (k >= OU_MAX_TOK) continue;
        r->tok[k] = ou_dup_json_str(json_array_get(toks, i));
        r->lp[k] = json_number_value(json_array_get(lps, i));
        json_t *d = json_array_get(tops, i);
        const char *key;
        json_t *v;
        json_object_foreach(d, key, v) {
            ou_top_t *tp = &r->top[k];
            if (tp->n_top >= OU_MAX_TOP) break;
            tp->top_str[tp->n_top] = speed_strndup(key, strlen(key));
            tp->top_lp[tp->n_top++] = json_number_value(v);
        }
    }
}

void ou_from_json(ou_result_t *r, json_t *root) {
    memset(r, 0, sizeof *r);
    ou_append_text(r, "", 0);
    json_t *ch = json_array_get(json_object_get(root, "choices"), 0);
    json_t *text = json_object_get(ch, "text");
    if (!text) text = json_object_get(json_object_get(ch, "message"), "content");
    if (json_is_string(text)) ou_append_text(r, json_string_value(text), json_string_length(text));
    ou_add_logprobs(r, json_object_get(ch, "logprobs"));
    json_t *fin = json_object_get(ch, "finish_reason");
    if (json_is_string(fin)) snprintf(r->finish, sizeof r->finish, "%s", json_string_value(fin));
    json_t *u = json_object_get(root, "usage");
    if (json_is_object(u)) r->usage = json_incref(u);
}

void ou_from_sse(ou_result_t *r, const cu_sse_t *s) {
    memset(r, 0, sizeof *r);
    ou_append_text(r, "", 0);
    for (int i = 0; i < s->n; i++) {
        if (r->done) {
            r->n_after_done++;
            continue;
        }
        if (strcmp(s->data[i], "[DONE]") == 0) {
            r->done = true;
            continue;
        }
        json_error_t err;
        json_t *ev = json_loads(s->data[i], 0, &err);
        if (!ev) {
            r->bad_json = true;
            continue;
        }
        json_t *e = json_object_get(ev, "error");
        if (e && !r->error) r->error = json_incref(e);
        json_t *choices = json_object_get(ev, "choices");
        json_t *u = json_object_get(ev, "usage");
        if (json_is_object(u)) {
            json_decref(r->usage);
            r->usage = json_incref(u);
        }
        json_t *ch = json_array_get(choices, 0);
        if (ch) {
            json_t *text = json_object_get(ch, "text");
            if (!text) text = json_object_get(json_object_get(ch, "delta"), "content");
            if (json_is_string(text) && json_string_length(text) > 0) {
                ou_append_text(r, json_string_value(text), json_string_length(text));
            }
            json_t *lp = json_object_get(ch, "logprobs");
            if (json_is_object(lp))
                r->n_chunks++;
            else if (json_is_string(text) && json_string_length(text) > 0)
                r->n_chunks++;
            ou_add_logprobs(r, lp);
            json_t *fin = json_object_get(ch, "finish_reason");
            if (json_is_string(fin)) {
                snprintf(r->finish, sizeof r->finish, "%s", json_string_value(fin));
                r->n_finish++;
            }
        }
        json_decref(ev);
    }
}

/* ---- the reference ------------------------------------------------------------------------ */

json_t *ou_ref(const char *key, const char *fmt, ...) {
    char args[65536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    char out[1024];
    snprintf(out, sizeof out, "%s/ref-%s.json", cu_dir, key);
    int rc = 0;
    if (access(out, R_OK) != 0)
        rc = tu_system("%s/speedctl generate --model %s/model --threads 1 --json %s > %s 2>%s.err", cu_bin, cu_dir,
                       args, out, out);
    if (rc != 0) {
        fprintf(stderr, "speedctl generate failed, see %s.err\n", out);
        unlink(out);
        return NULL;
    }
    json_error_t err;
    json_t *j = json_load_file(out, 0, &err);
    if (!j) fprintf(stderr, "%s: %s\n", out, err.text);
    return j;
}

/* A token id decoded alone, as the router shows it (speed_free it): its own bytes, and when
 * they are not valid UTF-8 (part of a character) OpenAI's "bytes:\xNN..." form. */
static char *ou_tok_str(const speed_tok_t *tok, int32_t id) {
    char *s = NULL;
    size_t n = 0;
    if (speed_tok_decode_raw(tok, &id, 1, false, &s, &n) != SPEED_OK) return speed_strndup("?", 1);
    char *repaired = NULL;
    size_t rn = 0;
    bool valid =
        speed_tok_decode(tok, &id, 1, false, &repaired, &rn) == SPEED_OK && rn == n && memcmp(repaired, s, n) == 0;
    speed_free(repaired);
    if (valid) return s;
    char *b = speed_malloc(6 + 4 * n + 1);
    if (!b) return s;
    size_t o = (size_t)snprintf(b, 7, "bytes:");
    for (size_t i = 0; i < n; i++) o += (size_t)snprintf(b + o, 5, "\\x%02x", (unsigned char)s[i]);
    speed_free(s);
    return b;
}

double ou_tol = 1e-4;
bool ou_near_tie;
int ou_n_near_ties;
double ou_max_dev;

void ou_check_ref(const ou_result_t *r, json_t *ref, const speed_tok_t *tok, bool chat, const char *what) {
    CHECK_MSG(ref != NULL, "%s: no reference", what);
    if (!ref) return;
    json_t *toks = json_object_get(ref, "tokens");
    int n_ref = (int)json_array_size(toks);
    CHECK_MSG(r->n == n_ref, "%s: %d tokens, reference %d", what, r->n, n_ref);
    int bad = 0;
    for (int i = 0; i < r->n && i < n_ref && i < OU_MAX_TOK; i++) {
        json_t *t = json_array_get(toks, (size_t)i);
        int32_t id = (int32_t)json_integer_value(json_object_get(t, "id"));
        char *want = ou_tok_str(tok, id);
        double lp = json_number_value(json_object_get(t, "logprob"));
        json_t *rt0 = json_object_get(t, "top_logprobs");
        if (ou_near_tie && strcmp(want, r->tok[i]) != 0 && json_array_size(rt0) >= 2 &&
            fabs(json_number_value(json_object_get(json_array_get(rt0, 0), "logprob")) -
                 json_number_value(json_object_get(json_array_get(rt0, 1), "logprob"))) <= 2 * ou_tol) {
            fprintf(stderr, "%s: token %d differs at a near tie of the reference: not compared further\n", what, i);
            ou_n_near_ties++;
            speed_free(want);
            return;
        }
        if (fabs(lp - r->lp[i]) > ou_max_dev) ou_max_dev = fabs(lp - r->lp[i]);
        if (strcmp(want, r->tok[i]) != 0 || fabs(lp - r->lp[i]) > ou_tol) {
            if (bad++ < 3)
                CHECK_MSG(0, "%s: token %d is \"%s\" %.6f, reference id %d \"%s\" %.6f", what, i, r->tok[i], r->lp[i],
                          id, want, lp);
        }
        speed_free(want);
        /* top logprobs */
        json_t *rt = json_object_get(t, "top_logprobs");
        int n_rt = (int)json_array_size(rt);
        char *rs[OU_MAX_TOP];
        int n_distinct = 0;
        for (int j = 0; j < n_rt && j < OU_MAX_TOP; j++) {
            rs[j] = ou_tok_str(tok, (int32_t)json_integer_value(json_object_get(json_array_get(rt, (size_t)j), "id")));
            bool seen = false;
            for (int q = 0; q < j; q++) seen = seen || strcmp(rs[q], rs[j]) == 0;
            if (!seen) n_distinct++;
        }
        const ou_top_t *tp = &r->top[i];
        int want_n = chat ? n_rt : n_distinct;
        if (tp->n_top != want_n && bad++ < 3)
            CHECK_MSG(0, "%s: token %d has %d top logprobs, reference %d", what, i, tp->n_top, want_n);
        for (int k = 0; k < tp->n_top; k++) {
            bool match = false;
            for (int j = 0; j < n_rt && j < OU_MAX_TOP && !match; j++) {
                double v = json_number_value(json_object_get(json_array_get(rt, (size_t)j), "logprob"));
                match = strcmp(rs[j], tp->top_str[k]) == 0 && fabs(v - tp->top_lp[k]) <= ou_tol;
            }
            if (!match && bad++ < 3)
                CHECK_MSG(0, "%s: token %d top \"%s\" %.6f is not in the reference", what, i, tp->top_str[k],
                          tp->top_lp[k]);
        }
        for (int j = 0; j < n_rt && j < OU_MAX_TOP; j++) speed_free(rs[j]);
    }
    CHECK_MSG(bad == 0, "%s: %d token mismatches", what, bad);
    json_t *text = json_object_get(ref, "text");
    CHECK_MSG(r->text && json_is_string(text) && strcmp(r->text, json_string_value(text)) == 0,
              "%s: text differs from the reference", what);
    const char *fin = json_string_value(json_object_get(ref, "finish_reason"));
    CHECK_MSG(fin && strcmp(r->finish, fin) == 0, "%s: finish_reason \"%s\", reference \"%s\"", what, r->finish,
              fin ? fin : "(null)");
}

long long ou_usage(const ou_result_t *r, const char *key) {
    json_t *v = r->usage ? json_object_get(r->usage, key) : NULL;
    return json_is_integer(v) ? (long long)json_integer_value(v) : -1;
}

void ou_check_error(const cu_resp_t *r, int status, const char *type, const char *code, const char *param,
                    const char *what) {
    CHECK_MSG(r->status == status, "%s: HTTP %d, want %d (body %s)", what, r->status, status,
              r->body ? r->body : "(none)");
    json_t *e = r->json ? json_object_get(r->json, "error") : NULL;
    CHECK_MSG(json_is_object(e), "%s: no error object (body %s)", what, r->body ? r->body : "(none)");
    if (!json_is_object(e)) return;
    json_t *msg = json_object_get(e, "message");
    CHECK_MSG(json_is_string(msg) && json_string_length(msg) > 0, "%s: no message", what);
    const char *t = json_string_value(json_object_get(e, "type"));
    CHECK_MSG(t && strcmp(t, type) == 0, "%s: type %s, want %s", what, t ? t : "(null)", type);
    json_t *c = json_object_get(e, "code");
    if (code)
        CHECK_MSG(json_is_string(c) && strcmp(json_string_value(c), code) == 0, "%s: code %s, want %s", what,
                  json_is_string(c) ? json_string_value(c) : "(not a string)", code);
    CHECK_MSG(json_object_get(e, "param") != NULL, "%s: no param key", what);
    if (param) {
        json_t *p = json_object_get(e, "param");
        CHECK_MSG(json_is_string(p) && strcmp(json_string_value(p), param) == 0, "%s: param %s, want %s", what,
                  json_is_string(p) ? json_string_value(p) : "(not a string)", param);
    }
}

void ou_prompt(int32_t *ids, int n, int vocab, int mul) {
    for (int i = 0; i < n; i++) ids[i] = i == 0 ? 1 : 3 + (i * mul) % (vocab - 3);
}

char *ou_ids_csv(const int32_t *ids, int n) {
    char *s = speed_malloc((size_t)n * 12 + 2);
    size_t off = 0;
    s[0] = '\0';
    for (int i = 0; i < n; i++) off += (size_t)sprintf(s + off, "%s%d", i ? "," : "", ids[i]);
    return s;
}

char *ou_completion_body(const char *model, const int32_t *ids, int n, int max_tokens, int logprobs, bool stream,
                         const char *prefill_layers, const char *more) {
    char *csv = ou_ids_csv(ids, n);
    size_t cap = strlen(csv) + 1024 + (more ? strlen(more) : 0);
    char *b = speed_malloc(cap);
    size_t off = (size_t)snprintf(b, cap, "{\"model\":\"%s\",\"prompt\":[%s],\"max_tokens\":%d,\"temperature\":0",
                                  model, csv, max_tokens);
    if (logprobs > 0) off += (size_t)snprintf(b + off, cap - off, ",\"logprobs\":%d", logprobs);
    if (stream)
        off += (size_t)snprintf(b + off, cap - off, ",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    if (prefill_layers)
        off += (size_t)snprintf(b + off, cap - off, ",\"speed\":{\"prefill_layers\":%s}", prefill_layers);
    if (more) off += (size_t)snprintf(b + off, cap - off, ",%s", more);
    snprintf(b + off, cap - off, "}");
    speed_free(csv);
    return b;
}

int ou_diff_count(const ou_result_t *a, const ou_result_t *b, char *first, size_t first_cap) {
    int diffs = 0;
    if (first && first_cap) first[0] = '\0';
    if (a->n != b->n) {
        if (first) snprintf(first, first_cap, "%d tokens vs %d", a->n, b->n);
        diffs++;
    }
    for (int t = 0; t < a->n && t < b->n; t++) {
        bool same = a->tok[t] && b->tok[t] && strcmp(a->tok[t], b->tok[t]) == 0 && a->lp[t] == b->lp[t] &&
                    a->top[t].n_top == b->top[t].n_top;
        for (int k = 0; same && k < a->top[t].n_top; k++)
            same = a->top[t].top_lp[k] == b->top[t].top_lp[k] && a->top[t].top_str[k] && b->top[t].top_str[k] &&
                   strcmp(a->top[t].top_str[k], b->top[t].top_str[k]) == 0;
        if (!same && diffs++ == 0 && first)
            snprintf(first, first_cap, "token %d: \"%s\" %.9g vs \"%s\" %.9g", t, a->tok[t] ? a->tok[t] : "(none)",
                     a->lp[t], b->tok[t] ? b->tok[t] : "(none)", b->lp[t]);
    }
    if (a->text_len != b->text_len ||
        (a->text_len && (!a->text || !b->text || memcmp(a->text, b->text, a->text_len)))) {
        if (diffs++ == 0 && first) snprintf(first, first_cap, "the text");
    }
    return diffs;
}

void ou_check_same(const ou_result_t *a, const ou_result_t *b, const char *what) {
    char first[256];
    int diffs = ou_diff_count(a, b, first, sizeof first);
    CHECK_MSG(diffs == 0, "%s: %d difference(s), the first at %s", what, diffs, first);
}

bool ou_post_completion(int port, const char *body, int n_tokens, ou_result_t *res) {
    cu_resp_t resp;
    memset(res, 0, sizeof *res);
    CHECK(cu_http(port, "POST", "/v1/completions", body, NULL, NULL, 120000, &resp));
    CHECK_MSG(resp.status == 200, "HTTP %d: %s", resp.status, resp.body ? resp.body : "");
    bool ok = resp.status == 200;
    if (ok && resp.body) {
        json_t *root = json_loads(resp.body, 0, NULL);
        CHECK(root != NULL);
        if (root) ou_from_json(res, root);
        json_decref(root);
        if (n_tokens > 0) CHECK_INT_EQ(res->n, n_tokens);
    }
    cu_resp_free(&resp);
    return ok;
}
