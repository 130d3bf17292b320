/* The chaos suite's load source: see chaos_load.h. */
#include "chaos_load.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const outcome_names[CH_N_OUTCOMES] = {"complete",  "clean_error", "hang",
                                                         "truncated", "malformed",   "wrong"};

const char *ch_outcome_name(ch_outcome_t o) { return o < CH_N_OUTCOMES ? outcome_names[o] : "?"; }

/* ---- prompts and references --------------------------------------------------------------- */

bool ch_prompt_init(ch_prompt_t *p, int n, int mul, int vocab, int max_tokens, const char *prefill_layers) {
    memset(p, 0, sizeof *p);
    if (n > CH_MAX_PROMPT) n = CH_MAX_PROMPT;
    ou_prompt(p->ids, n, vocab, mul);
    p->n = n;
    p->max_tokens = max_tokens;
    char key[96];
    snprintf(key, sizeof key, "chaos-%d-%d-%d-%s", n, mul, max_tokens, prefill_layers);
    char *csv = ou_ids_csv(p->ids, n);
    /* --batch_invariant: the cluster runs engine.batch_invariant, whose numerics are the
     * reference's in this mode (a batch-1 answer without it may differ in the last bits) */
    json_t *ref = ou_ref(key, "--prompt-ids %s --prefill-layers %s --max-tokens %d --batch_invariant", csv,
                         prefill_layers, max_tokens);
    speed_free(csv);
    if (!ref) return false;
    json_t *text = json_object_get(ref, "text");
    const char *fin = json_string_value(json_object_get(ref, "finish_reason"));
    bool ok = json_is_string(text) && fin;
    if (ok) {
        p->ref_text = speed_strndup(json_string_value(text), json_string_length(text));
        snprintf(p->ref_finish, sizeof p->ref_finish, "%s", fin);
    } else {
        fprintf(stderr, "chaos: reference %s has no text or finish_reason\n", key);
    }
    json_decref(ref);
    return ok;
}

void ch_prompt_cleanup(ch_prompt_t *p) {
    speed_free(p->ref_text);
    p->ref_text = NULL;
}

/* ---- totals ------------------------------------------------------------------------------- */

long long ch_totals_violations(const ch_totals_t *t) {
    long long v = 0;
    for (int o = CH_HANG; o < CH_N_OUTCOMES; o++) v += t->outcomes[o];
    return v;
}

static void totals_add_error(ch_totals_t *t, const char *kind, long long n) {
    for (int i = 0; i < t->n_error_kinds; i++)
        if (strcmp(t->errors[i].kind, kind) == 0) {
            t->errors[i].n += n;
            return;
        }
    /* the last slot collects whatever does not fit */
    int i = t->n_error_kinds;
    if (i >= CH_MAX_ERROR_KINDS - 1) {
        i = CH_MAX_ERROR_KINDS - 1;
        kind = "other";
    }
    if (i == t->n_error_kinds) {
        t->n_error_kinds++;
        snprintf(t->errors[i].kind, sizeof t->errors[i].kind, "%s", kind);
    }
    t->errors[i].n += n;
}

void ch_totals_diff(const ch_totals_t *a, const ch_totals_t *b, ch_totals_t *out) {
    ch_totals_t d;
    memset(&d, 0, sizeof d);
    d.n_requests = a->n_requests - b->n_requests;
    d.n_streamed = a->n_streamed - b->n_streamed;
    for (int o = 0; o < CH_N_OUTCOMES; o++) d.outcomes[o] = a->outcomes[o] - b->outcomes[o];
    for (int i = 0; i < a->n_error_kinds; i++) {
        long long n = a->errors[i].n;
        for (int j = 0; j < b->n_error_kinds; j++)
            if (strcmp(a->errors[i].kind, b->errors[j].kind) == 0) n -= b->errors[j].n;
        if (n) totals_add_error(&d, a->errors[i].kind, n);
    }
    d.max_seconds = a->max_seconds;
    *out = d;
}

void ch_totals_add(ch_totals_t *acc, const ch_totals_t *t) {
    acc->n_requests += t->n_requests;
    acc->n_streamed += t->n_streamed;
    for (int o = 0; o < CH_N_OUTCOMES; o++) acc->outcomes[o] += t->outcomes[o];
    for (int i = 0; i < t->n_error_kinds; i++) totals_add_error(acc, t->errors[i].kind, t->errors[i].n);
    if (t->max_seconds > acc->max_seconds) acc->max_seconds = t->max_seconds;
}

void ch_totals_print(const ch_totals_t *t, const char *label) {
    fprintf(stderr, "%s requests %lld (streamed %lld), slowest answer %.1f s\n", label, t->n_requests, t->n_streamed,
            t->max_seconds);
    for (int o = 0; o < CH_N_OUTCOMES; o++)
        fprintf(stderr, "%s   %-12s %lld\n", label, outcome_names[o], t->outcomes[o]);
    for (int i = 0; i < t->n_error_kinds; i++)
        if (t->errors[i].n) fprintf(stderr, "%s   error %-24s %lld\n", label, t->errors[i].kind, t->errors[i].n);
}

/* ---- one request -------------------------------------------------------------------------- */

/* A valid OpenAI error object: message (non-empty string), type (string), code and param
 * present. Writes its code (or "none") into kind. */
static bool openai_error_ok(json_t *e, char *code, size_t code_len) {
    if (!json_is_object(e)) return false;
    json_t *m = json_object_get(e, "message"), *t = json_object_get(e, "type"), *c = json_object_get(e, "code");
    snprintf(code, code_len, "%s", json_is_string(c) ? json_string_value(c) : "none");
    return json_is_string(m) && json_string_length(m) > 0 && json_is_string(t) && c != NULL &&
           json_object_get(e, "param") != NULL;
}

static ch_outcome_t check_complete(const ch_prompt_t *p, const ou_result_t *res, const char *id, char *detail,
                                   size_t dl) {
    const char *text = res->text ? res->text : "";
    if (strcmp(text, p->ref_text) != 0 || strcmp(res->finish, p->ref_finish) != 0) {
        size_t same = 0;
        while (text[same] && text[same] == p->ref_text[same]) same++;
        snprintf(detail, dl,
                 "request %s (prompt of %d tokens, max_tokens %d): answer of %zu bytes (finish %s) differs from the "
                 "reference of %zu (finish %s) from byte %zu",
                 id, p->n, p->max_tokens, res->text_len, res->finish, strlen(p->ref_text), p->ref_finish, same);
        return CH_WRONG;
    }
    snprintf(detail, dl, "complete, %zu bytes", res->text_len);
    return CH_COMPLETE;
}

static bool finish_ok(const char *f) { return strcmp(f, "stop") == 0 || strcmp(f, "length") == 0; }

static ch_outcome_t classify_whole(int port, const char *body, const ch_prompt_t *p, double deadline_s, char *kind,
                                   char *detail, size_t dl) {
    double t0 = now_s();
    cu_resp_t r;
    bool got = cu_http(port, "POST", "/v1/completions", body, NULL, NULL, (int)(deadline_s * 1000), &r);
    double dt = now_s() - t0;
    ch_outcome_t o;
    if (!got || r.status == 0) {
        o = dt >= deadline_s - 0.5 ? CH_HANG : CH_MALFORMED;
        snprintf(detail, dl, "no answer after %.1f s", dt);
    } else if (dt > deadline_s) {
        o = CH_HANG;
        snprintf(detail, dl, "HTTP %d after %.1f s, past the deadline (id %s)", r.status, dt, r.request_id);
    } else if (r.status == 200) {
        json_t *ch = r.json ? json_array_get(json_object_get(r.json, "choices"), 0) : NULL;
        if (!ch) {
            o = CH_MALFORMED;
            snprintf(detail, dl, "200 without choices (id %s): %.200s", r.request_id, r.body ? r.body : "");
        } else {
            ou_result_t res;
            ou_from_json(&res, r.json);
            if (!finish_ok(res.finish)) {
                o = CH_MALFORMED;
                snprintf(detail, dl, "200 with finish_reason \"%s\" (id %s)", res.finish, r.request_id);
            } else {
                o = check_complete(p, &res, r.request_id, detail, dl);
            }
            ou_result_free(&res);
        }
    } else {
        char code[48];
        if (r.json && openai_error_ok(json_object_get(r.json, "error"), code, sizeof code)) {
            o = CH_CLEAN_ERROR;
            snprintf(kind, 64, "%d:%s", r.status, code);
            snprintf(detail, dl, "HTTP %d %s (id %s)", r.status, code, r.request_id);
        } else {
            o = CH_MALFORMED;
            snprintf(detail, dl, "HTTP %d without an OpenAI error object (id %s): %.200s", r.status, r.request_id,
                     r.body ? r.body : "");
        }
    }
    cu_resp_free(&r);
    return o;
}

static ch_outcome_t classify_stream(int port, const char *body, const ch_prompt_t *p, double deadline_s, char *kind,
                                    char *detail, size_t dl) {
    double t0 = now_s(), deadline = t0 + deadline_s;
    cu_sse_t *s = speed_malloc(sizeof *s); /* 64 KiB of event pointers: not on a worker's stack */
    ch_outcome_t o;
    if (!cu_sse_begin(port, "/v1/completions", body, NULL, (int)(deadline_s * 1000), s)) {
        double dt = now_s() - t0;
        o = dt >= deadline_s - 0.5 ? CH_HANG : CH_MALFORMED;
        snprintf(detail, dl, "stream: no response head after %.1f s", dt);
        cu_sse_free(s);
        speed_free(s);
        return o;
    }
    cu_sse_read(s, -1, deadline);
    double dt = now_s() - t0;
    if (s->status != 200) {
        /* an error answered before the stream began: a JSON body, no events */
        char code[48];
        json_t *j = NULL;
        if (s->buf && s->len) {
            json_error_t err;
            j = json_loadb(s->buf, s->len, 0, &err);
        }
        if (dt > deadline_s) {
            o = CH_HANG;
            snprintf(detail, dl, "stream: HTTP %d after %.1f s (id %s)", s->status, dt, s->request_id);
        } else if (j && openai_error_ok(json_object_get(j, "error"), code, sizeof code)) {
            o = CH_CLEAN_ERROR;
            snprintf(kind, 64, "%d:%s", s->status, code);
            snprintf(detail, dl, "stream: HTTP %d %s (id %s)", s->status, code, s->request_id);
        } else {
            o = CH_MALFORMED;
            snprintf(detail, dl, "stream: HTTP %d without an OpenAI error object (id %s)", s->status, s->request_id);
        }
        json_decref(j);
        cu_sse_free(s);
        speed_free(s);
        return o;
    }
    ou_result_t res;
    ou_from_sse(&res, s);
    char code[48] = "";
    if (!s->ended && !res.done) {
        o = now_s() >= deadline - 0.05 ? CH_HANG : CH_TRUNCATED;
        snprintf(detail, dl, "stream: %d events, no end after %.1f s (io_error %d, id %s)", s->n, dt, s->io_error,
                 s->request_id);
    } else if (res.bad_json || res.n_after_done > 0) {
        o = CH_MALFORMED;
        snprintf(detail, dl, "stream: bad JSON %d, %d events after [DONE] (id %s)", res.bad_json, res.n_after_done,
                 s->request_id);
    } else if (res.error) {
        if (openai_error_ok(res.error, code, sizeof code)) {
            o = CH_CLEAN_ERROR;
            snprintf(kind, 64, "sse:%s", code);
            snprintf(detail, dl, "stream: error event %s after %d content chunks (id %s)", code, res.n_chunks,
                     s->request_id);
        } else {
            o = CH_MALFORMED;
            snprintf(detail, dl, "stream: an error event that is not an OpenAI error object (id %s)", s->request_id);
        }
    } else if (!res.done || res.n_finish != 1 || !finish_ok(res.finish)) {
        o = CH_TRUNCATED;
        snprintf(detail, dl, "stream: ended (%d events) with [DONE] %d, %d finish chunks \"%s\", no error (id %s)",
                 s->n, res.done, res.n_finish, res.finish, s->request_id);
    } else {
        o = check_complete(p, &res, s->request_id, detail, dl);
        if (o == CH_WRONG) {
            size_t l = strlen(detail);
            snprintf(detail + l, dl - l, " (stream)");
        }
    }
    ou_result_free(&res);
    cu_sse_free(s);
    speed_free(s);
    return o;
}

static void load_count(ch_load_t *l, bool stream, ch_outcome_t o, const char *kind, const char *detail, double dt) {
    pthread_mutex_lock(&l->lock);
    l->totals.n_requests++;
    if (stream) l->totals.n_streamed++;
    l->totals.outcomes[o]++;
    if (o == CH_CLEAN_ERROR) totals_add_error(&l->totals, kind, 1);
    if (dt > l->totals.max_seconds) l->totals.max_seconds = dt;
    bool report = o >= CH_HANG && l->reported[o]++ < CH_MAX_REPORTS;
    pthread_mutex_unlock(&l->lock);
    if (report) fprintf(stderr, "chaos: VIOLATION %s: %s\n", ch_outcome_name(o), detail);
}

ch_outcome_t ch_request_once(ch_load_t *l, int port, const ch_prompt_t *p, bool stream, double deadline_s, char *detail,
                             size_t detail_len) {
    char kind[64] = "", local[512];
    if (!detail) {
        detail = local;
        detail_len = sizeof local;
    }
    detail[0] = '\0';
    char *body = ou_completion_body("model", p->ids, p->n, p->max_tokens, 0, stream, NULL, NULL);
    double t0 = now_s();
    ch_outcome_t o = stream ? classify_stream(port, body, p, deadline_s, kind, detail, detail_len)
                            : classify_whole(port, body, p, deadline_s, kind, detail, detail_len);
    speed_free(body);
    if (l) load_count(l, stream, o, kind, detail, now_s() - t0);
    return o;
}

/* ---- the workers -------------------------------------------------------------------------- */

typedef struct {
    ch_load_t *l;
    int k;
} worker_arg_t;

static void *worker_main(void *arg) {
    worker_arg_t *w = arg;
    ch_load_t *l = w->l;
    unsigned seed = l->p.seed * 7919u + (unsigned)w->k * 104729u;
    bool stream = w->k % 2 == 1;
    while (!atomic_load(&l->stop)) {
        const ch_prompt_t *p = &l->p.prompts[rand_r(&seed) % (unsigned)l->p.n_prompts];
        ch_request_once(l, l->p.port, p, stream, l->p.deadline_s, NULL, 0);
        stream = !stream;
    }
    speed_free(w);
    return NULL;
}

bool ch_load_start(ch_load_t *l, const ch_load_params_t *p) {
    memset(l, 0, sizeof *l);
    l->p = *p;
    if (l->p.n_workers > CH_MAX_WORKERS) l->p.n_workers = CH_MAX_WORKERS;
    pthread_mutex_init(&l->lock, NULL);
    for (int k = 0; k < l->p.n_workers; k++) {
        worker_arg_t *w = speed_malloc(sizeof *w);
        w->l = l;
        w->k = k;
        if (pthread_create(&l->threads[k], NULL, worker_main, w) != 0) {
            fprintf(stderr, "chaos: cannot start load worker %d\n", k);
            speed_free(w);
            ch_load_stop(l);
            return false;
        }
        l->n_threads++;
    }
    return true;
}

void ch_load_stop(ch_load_t *l) {
    atomic_store(&l->stop, true);
    for (int k = 0; k < l->n_threads; k++) pthread_join(l->threads[k], NULL);
    l->n_threads = 0;
}

void ch_load_snapshot(ch_load_t *l, ch_totals_t *out) {
    pthread_mutex_lock(&l->lock);
    *out = l->totals;
    pthread_mutex_unlock(&l->lock);
}
