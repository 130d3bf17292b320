/* The request worker: tokenize, admit, route, call the nodes, relay tokens to the client.
 *
 * One thread per request (router.h). Everything that can block (admission, RPCs) happens
 * here, never on an HTTP thread. Cancellation (client gone, shutdown) comes from other
 * threads through speed_router_req_cancel: it cancels the Generate stream at once and has
 * the housekeeping thread send Cancel RPCs to the legs in flight; the worker notices at its
 * next step and cleans up (it sends Cancel too: the RPC is idempotent on the nodes). */
#include "router_internal.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "log.h"
#include "speed_proto.h"

#define SUBSYS SPEED_SUBSYS_NET

int64_t speed_router_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

double speed_router_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- cancellation --------------------------------------------------------------------- */

void speed_router_req_cancel(rtr_req_t *r, speed_status_t why)
{
    cancel_job_t jobs[2];
    size_t n = 0;
    pthread_mutex_lock(&r->lock);
    if (r->cancelled) {
        pthread_mutex_unlock(&r->lock);
        return;
    }
    r->cancelled = true;
    r->cancel_status = why;
    if (r->gen) speed_rpc_stream_cancel(r->gen);
    if (r->decode_node >= 0 && r->decode_held) {
        jobs[n].pool = SPEED_ROUTER_POOL_DECODE;
        jobs[n++].node = (size_t)r->decode_node;
    }
    if (r->prefill_node >= 0 && r->prefill_active) {
        jobs[n].pool = SPEED_ROUTER_POOL_PREFILL;
        jobs[n++].node = (size_t)r->prefill_node;
    }
    pthread_mutex_unlock(&r->lock);
    for (size_t i = 0; i < n; i++) snprintf(jobs[i].id, sizeof jobs[i].id, "%s", r->id);
    if (n) speed_router_enqueue_cancel(r->rt, jobs, n);
}

static bool req_cancelled(rtr_req_t *r, speed_status_t *why_p)
{
    pthread_mutex_lock(&r->lock);
    bool c = r->cancelled;
    if (why_p) *why_p = r->cancel_status;
    pthread_mutex_unlock(&r->lock);
    return c;
}

/* Records a leg the request is about to start; false if the request was cancelled (then
 * the leg must not start). */
static bool req_leg_begin(rtr_req_t *r, speed_router_pool_id_t pool, size_t node)
{
    pthread_mutex_lock(&r->lock);
    bool ok = !r->cancelled;
    if (ok && pool == SPEED_ROUTER_POOL_DECODE) {
        r->decode_node = (int)node;
        r->decode_held = true;
    } else if (ok) {
        r->prefill_node = (int)node;
        r->prefill_active = true;
    }
    pthread_mutex_unlock(&r->lock);
    return ok;
}

static void req_leg_end(rtr_req_t *r, speed_router_pool_id_t pool)
{
    pthread_mutex_lock(&r->lock);
    if (pool == SPEED_ROUTER_POOL_DECODE) r->decode_held = false;
    else r->prefill_active = false;
    pthread_mutex_unlock(&r->lock);
}

static void send_cancel(speed_router_t *rt, speed_router_pool_id_t pool, size_t node,
                        const char *id)
{
    Speed__V1__CancelRequest m = SPEED__V1__CANCEL_REQUEST__INIT;
    m.request_id = (char *)id;
    uint8_t *buf = NULL;
    size_t len = 0;
    if (speed_proto_pack(&m.base, &buf, &len) != SPEED_OK) return;
    speed_rpc_reply_t reply = {0};
    const char *method = pool == SPEED_ROUTER_POOL_DECODE ? SPEED_METHOD_DECODE_CANCEL
                                                          : SPEED_METHOD_PREFILL_CANCEL;
    speed_status_t st = speed_rpc_unary(speed_router_nodes_channel(rt->nodes, pool, node), method,
                                        buf, len, SPEED_ROUTER_CANCEL_TIMEOUT_MS, &reply);
    if (st != SPEED_OK)
        speed_log(SPEED_LOG_DEBUG, SUBSYS, id, "cancel on %s node %s: %s",
                  speed_router_pool_name(pool), speed_router_nodes_address(rt->nodes, pool, node),
                  speed_status_string(st));
    speed_rpc_reply_cleanup(&reply);
    speed_free(buf);
}

/* ---- answering the client --------------------------------------------------------------- */

/* Writes bytes to the stream (streaming responses). SPEED_ERR_CANCELLED when the client is
 * gone (the request is then cancelled). */
static speed_status_t req_write(rtr_req_t *r, const char *data, size_t len)
{
    speed_status_t st = SPEED_ERR_CANCELLED;
    pthread_mutex_lock(&r->http_lock);
    if (r->stream) {
        st = speed_http_stream_write(r->stream, data, len);
        if (st == SPEED_OK) {
            r->committed = true;
            r->last_write_ms = speed_router_now_ms();
        }
    }
    pthread_mutex_unlock(&r->http_lock);
    if (st == SPEED_ERR_CANCELLED) {
        pthread_mutex_lock(&r->lock);
        r->client_gone = true;
        pthread_mutex_unlock(&r->lock);
        speed_router_req_cancel(r, SPEED_ERR_CANCELLED);
    }
    return st;
}

/* Counts the request in speed_router_requests_total, once, just before its answer is
 * complete: a client that has its answer finds it counted in /metrics. */
static void req_count(rtr_req_t *r)
{
    if (r->counted) return;
    r->counted = true;
    pthread_mutex_lock(&r->lock);
    if (r->client_gone) r->http_status = 499;
    pthread_mutex_unlock(&r->lock);
    char status[8];
    snprintf(status, sizeof status, "%u", r->http_status);
    const char *values[] = {r->route_label, status};
    speed_counter_t *c = NULL;
    if (speed_counter_labels(r->rt->m_requests, values, &c) == SPEED_OK) speed_counter_inc(c);
}

/* Gives back the admission slot and the active count, once, just before the answer's last
 * bytes go out: a client that sends its next request as soon as it has the answer must find
 * the room this one held (else a strictly sequential client could get 429). */
static void req_release_slot(rtr_req_t *r)
{
    if (atomic_exchange(&r->slot_released, true)) return;
    speed_router_t *rt = r->rt;
    if (r->admitted) speed_admission_release(rt->adm);
    pthread_mutex_lock(&rt->lock);
    rt->n_active--;
    pthread_mutex_unlock(&rt->lock);
}

/* Writes the final SSE bytes (an error event may precede): [DONE], after the slot is free. */
static void req_write_done(rtr_req_t *r)
{
    req_release_slot(r);
    size_t dlen = 0;
    const char *done = speed_openai_sse_done(&dlen);
    req_write(r, done, dlen);
}

/* Ends a stream normally (after [DONE]). */
static void req_close(rtr_req_t *r)
{
    req_release_slot(r);
    req_count(r);
    pthread_mutex_lock(&r->http_lock);
    speed_http_stream_t *s = r->stream;
    r->stream = NULL;
    if (s) speed_http_stream_close(s);
    pthread_mutex_unlock(&r->http_lock);
}

/* A complete answer (non-streaming success, or an error before anything was written). */
static void req_respond(rtr_req_t *r, unsigned status, const char *body, size_t len,
                        int retry_after_s)
{
    r->http_status = status;
    req_release_slot(r);
    req_count(r);
    pthread_mutex_lock(&r->http_lock);
    speed_http_stream_t *s = r->stream;
    r->stream = NULL;
    if (s) {
        if (retry_after_s > 0) {
            char v[16];
            snprintf(v, sizeof v, "%d", retry_after_s);
            speed_http_stream_add_header(s, "Retry-After", v);
        }
        speed_http_stream_respond(s, status, "application/json", body, len);
    }
    pthread_mutex_unlock(&r->http_lock);
}

/* Reports an error the way the response allows: an HTTP error with an OpenAI error object
 * while nothing was sent, else an SSE error event then [DONE]. */
static void req_fail(rtr_req_t *r, const speed_openai_error_t *err, int retry_after_s)
{
    unsigned status = (unsigned)speed_openai_error_http_status(err->kind);
    bool gone;
    pthread_mutex_lock(&r->lock);
    gone = r->client_gone;
    pthread_mutex_unlock(&r->lock);
    r->http_status = gone ? 499 : status;
    if (gone) {
        req_close(r);
        return;
    }
    pthread_mutex_lock(&r->http_lock);
    bool committed = r->committed;
    pthread_mutex_unlock(&r->http_lock);
    if (!committed) {
        char *body = NULL;
        size_t len = 0;
        if (speed_openai_error_json(err, &body, &len) == SPEED_OK) {
            req_respond(r, status, body, len, retry_after_s);
            speed_free(body);
        } else {
            const char *fb = speed_openai_error_fallback_json();
            r->http_status = 500;
            req_respond(r, 500, fb, strlen(fb), 0);
        }
        return;
    }
    char *sse = NULL;
    size_t len = 0;
    if (speed_openai_error_sse(err, &sse, &len) == SPEED_OK) {
        req_write(r, sse, len);
        speed_free(sse);
    }
    req_write_done(r);
    req_close(r);
}

static void req_fail_status(rtr_req_t *r, speed_status_t st, const char *message,
                            int retry_after_s)
{
    speed_openai_error_t err;
    speed_openai_error_from_status(st, message, &err);
    req_fail(r, &err, retry_after_s);
}

/* The error for a request that was cancelled by someone other than its client. */
static void req_fail_cancelled(rtr_req_t *r)
{
    speed_status_t why = SPEED_ERR_CANCELLED;
    pthread_mutex_lock(&r->lock);
    why = r->cancel_status;
    bool shutdown = r->shutdown;
    pthread_mutex_unlock(&r->lock);
    if (why == SPEED_ERR_TIMEOUT)
        req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
    else
        req_fail_status(r, SPEED_ERR_CANCELLED,
                        shutdown ? "the server is shutting down" : "the request was cancelled",
                        0);
}

/* ---- RPC helpers ------------------------------------------------------------------------ */

/* Milliseconds left before the request's deadline (>= 1 while it has not passed, 0 after). */
static int64_t req_remaining_ms(const rtr_req_t *r)
{
    int64_t left = r->deadline_ms - speed_router_now_ms();
    return left > 0 ? left : 0;
}

typedef struct {
    speed_status_t st;          /* speed_rpc_code_to_status(code), or a local error */
    int code;                   /* gRPC code; -1 for a local failure */
    char message[256];
    ProtobufCMessage *reply;    /* on success */
} call_result_t;

static void call_unary(rtr_req_t *r, speed_router_pool_id_t pool, size_t node,
                       const char *method, const ProtobufCMessage *msg, int64_t cap_ms,
                       const ProtobufCMessageDescriptor *reply_desc, call_result_t *res)
{
    memset(res, 0, sizeof(*res));
    res->code = -1;
    int64_t timeout = req_remaining_ms(r);
    if (timeout <= 0) {
        res->st = SPEED_ERR_TIMEOUT;
        snprintf(res->message, sizeof res->message, "request deadline passed");
        return;
    }
    if (cap_ms > 0 && timeout > cap_ms) timeout = cap_ms;
    uint8_t *buf = NULL;
    size_t len = 0;
    res->st = speed_proto_pack(msg, &buf, &len);
    if (res->st != SPEED_OK) {
        snprintf(res->message, sizeof res->message, "out of memory");
        return;
    }
    speed_rpc_reply_t reply = {0};
    res->st = speed_rpc_unary(speed_router_nodes_channel(r->rt->nodes, pool, node), method, buf,
                              len, timeout, &reply);
    speed_free(buf);
    res->code = reply.code;
    snprintf(res->message, sizeof res->message, "%s", reply.message ? reply.message : "");
    if (res->st == SPEED_OK) {
        speed_status_t ust = speed_proto_unpack(reply_desc, reply.data, reply.len, &res->reply);
        if (ust != SPEED_OK) {
            res->st = ust == SPEED_ERR_NO_MEMORY ? ust : SPEED_ERR_PEER_PROTOCOL;
            res->code = ust == SPEED_ERR_NO_MEMORY ? -1 : SPEED_RPC_INTERNAL;
            snprintf(res->message, sizeof res->message, "malformed reply");
        }
    } else if (res->st == SPEED_ERR_NO_MEMORY && reply.code == SPEED_RPC_OK) {
        res->code = -1;
    }
    speed_rpc_reply_cleanup(&reply);
}

/* A failure that says the node itself is in trouble (not the request, not capacity). */
static bool code_is_node_failure(int code)
{
    switch (code) {
    case SPEED_RPC_UNAVAILABLE:
    case SPEED_RPC_DEADLINE_EXCEEDED:
    case SPEED_RPC_INTERNAL:
    case SPEED_RPC_UNKNOWN:
    case SPEED_RPC_DATA_LOSS:
    case SPEED_RPC_UNIMPLEMENTED:
        return true;
    default:
        return false;
    }
}

/* A failure the request itself caused: answered as such, never retried. */
static bool code_is_request_error(int code)
{
    return code == SPEED_RPC_INVALID_ARGUMENT || code == SPEED_RPC_FAILED_PRECONDITION ||
           code == SPEED_RPC_OUT_OF_RANGE || code == SPEED_RPC_ALREADY_EXISTS;
}

static void fill_speed(const speed_openai_speed_t *s, Speed__V1__SpeedParams *m)
{
    if (s->prefill_layers > 0) {
        m->prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_LAYERS;
        m->prefill_layers = s->prefill_layers;
    }
    if (s->prefill_fraction > 0) {
        m->prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_FRACTION;
        m->prefill_fraction = s->prefill_fraction;
    }
    if (s->anchors >= 0) {
        m->anchors_opt_case = SPEED__V1__SPEED_PARAMS__ANCHORS_OPT_ANCHORS;
        m->anchors = s->anchors;
    }
    if (s->tail >= 0) {
        m->tail_opt_case = SPEED__V1__SPEED_PARAMS__TAIL_OPT_TAIL;
        m->tail = s->tail;
    }
}

/* ---- token relay ------------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static bool buf_append(buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *g = speed_realloc(b->p, cap);
        if (!g) return false;
        b->p = g;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return true;
}

/* Logprob entries with their own token strings. */
typedef struct {
    speed_openai_token_logprob_t *v;
    size_t n, cap;
} lp_list_t;

static void lp_list_clear(lp_list_t *l)
{
    for (size_t i = 0; i < l->n; i++) {
        speed_free((char *)l->v[i].token);
        for (size_t k = 0; k < l->v[i].n_top; k++) speed_free((char *)l->v[i].top[k].token);
        speed_free((void *)l->v[i].top);
    }
    l->n = 0;
}

static void lp_list_free(lp_list_t *l)
{
    lp_list_clear(l);
    speed_free(l->v);
    l->v = NULL;
    l->cap = 0;
}

/* The bytes of one token on its own (for logprobs): a token holding part of a multi-byte
 * character keeps those bytes (openai.c then shows it as "bytes:\xNN..." with its `bytes`, as
 * OpenAI does); an id the tokenizer does not know gives "". */
static char *token_string(const speed_tok_t *tok, int32_t id, size_t *len_p)
{
    char *s = NULL;
    *len_p = 0;
    if (id >= 0 && id < speed_tok_vocab_size(tok) &&
        speed_tok_decode_raw(tok, &id, 1, false, &s, len_p) == SPEED_OK)
        return s;
    return speed_strdup("");
}

static bool lp_list_add(lp_list_t *l, const speed_tok_t *tok, const Speed__V1__Token *t,
                        size_t n_top_max)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        speed_openai_token_logprob_t *g = speed_realloc(l->v, cap * sizeof(*g));
        if (!g) return false;
        l->v = g;
        l->cap = cap;
    }
    speed_openai_token_logprob_t *e = &l->v[l->n];
    memset(e, 0, sizeof(*e));
    e->token = token_string(tok, t->id, &e->token_len);
    if (!e->token) return false;
    e->logprob = t->logprob;
    size_t n_top = t->n_top_logprobs < n_top_max ? t->n_top_logprobs : n_top_max;
    if (n_top) {
        speed_openai_top_logprob_t *top = speed_calloc(n_top, sizeof(*top));
        if (!top) {
            speed_free((char *)e->token);
            return false;
        }
        for (size_t k = 0; k < n_top; k++) {
            top[k].token = token_string(tok, t->top_logprobs[k]->id, &top[k].token_len);
            top[k].logprob = t->top_logprobs[k]->logprob;
            if (!top[k].token) {
                for (size_t j = 0; j < k; j++) speed_free((char *)top[j].token);
                speed_free(top);
                speed_free((char *)e->token);
                return false;
            }
        }
        e->top = top;
        e->n_top = n_top;
    }
    l->n++;
    return true;
}

typedef enum {
    RELAY_DONE = 0,     /* the request is answered (success or an error sent) */
    RELAY_RETRY,        /* the decode node failed before anything came: try another */
} relay_result_t;

typedef struct {
    /* inputs */
    speed_router_pool_id_t pool;      /* always decode */
    size_t node;
    bool decode_only;
    int64_t n_prompt;
    uint64_t kv_bytes_sent;           /* from PrefillReply (disaggregated) */
    /* state */
    bool role_sent;
    int64_t n_generated;
    double t_last_token;
    buf_t text;                       /* non-streaming: the whole text */
    size_t text_total;                /* bytes of text relayed so far (text_offset) */
    lp_list_t lps;                    /* non-streaming: all; streaming: this event's */
    /* outcome */
    bool success;
    bool capacity;                    /* RELAY_RETRY because the node had no room */
    speed_openai_finish_t finish;
    speed_openai_usage_t usage;
} relay_t;

static void observe_tokens(rtr_req_t *r, relay_t *rl, size_t k)
{
    speed_router_t *rt = r->rt;
    double t = speed_router_now_s();
    size_t n_itl = k;
    if (rl->n_generated == 0 && k > 0) {
        speed_histogram_observe(rt->m_ttft, t - r->t_arrival);
        n_itl = k - 1;
    }
    if (n_itl > 0) {
        double gap = (t - rl->t_last_token) / (double)n_itl;
        for (size_t i = 0; i < n_itl; i++) speed_histogram_observe(rt->m_itl, gap);
    }
    rl->t_last_token = t;
    rl->n_generated += (int64_t)k;
    speed_counter_add(rt->m_generated_tokens, (double)k);
}

static speed_status_t write_chunk(rtr_req_t *r, const speed_openai_chunk_t *c)
{
    char *sse = NULL;
    size_t len = 0;
    speed_status_t st = speed_openai_chunk_sse(r->api, c, &sse, &len);
    if (st != SPEED_OK) return st;
    st = req_write(r, sse, len);
    speed_free(sse);
    return st;
}

static speed_openai_chunk_t chunk_base(rtr_req_t *r, speed_openai_chunk_kind_t kind)
{
    speed_openai_chunk_t c;
    memset(&c, 0, sizeof c);
    c.kind = kind;
    c.id = r->oai_id;
    c.model = r->rt->p.model_id;
    c.created = r->created_unix;
    c.include_usage = r->req->include_usage;
    return c;
}

/* Handles the tokens of one Generate event. Returns SPEED_OK, SPEED_ERR_CANCELLED (client
 * gone) or SPEED_ERR_NO_MEMORY. */
static speed_status_t relay_tokens(rtr_req_t *r, relay_t *rl, const Speed__V1__GenerateEvent *ev)
{
    const speed_openai_request_t *q = r->req;
    const speed_tok_t *tok = r->rt->p.tok;
    bool want_lp = q->logprobs || q->top_logprobs > 0;
    size_t k = ev->n_tokens;
    if (k == 0) return SPEED_OK;
    observe_tokens(r, rl, k);
    if (!q->stream) {
        for (size_t i = 0; i < k; i++) {
            const Speed__V1__Token *t = ev->tokens[i];
            if (t->text && !buf_append(&rl->text, t->text, strlen(t->text)))
                return SPEED_ERR_NO_MEMORY;
            if (want_lp && !lp_list_add(&rl->lps, tok, t, (size_t)q->top_logprobs))
                return SPEED_ERR_NO_MEMORY;
        }
        return SPEED_OK;
    }
    speed_status_t st = SPEED_OK;
    if (r->api == SPEED_OPENAI_CHAT && !rl->role_sent) {
        speed_openai_chunk_t c = chunk_base(r, SPEED_OPENAI_CHUNK_ROLE);
        SPEED_CHECK(write_chunk(r, &c));
        rl->role_sent = true;
    }
    buf_t piece = {0};
    lp_list_clear(&rl->lps);
    for (size_t i = 0; i < k && st == SPEED_OK; i++) {
        const Speed__V1__Token *t = ev->tokens[i];
        if (t->text && !buf_append(&piece, t->text, strlen(t->text))) st = SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK && want_lp && !lp_list_add(&rl->lps, tok, t, (size_t)q->top_logprobs))
            st = SPEED_ERR_NO_MEMORY;
    }
    if (st == SPEED_OK && (piece.len > 0 || want_lp)) {
        speed_openai_chunk_t c = chunk_base(r, SPEED_OPENAI_CHUNK_CONTENT);
        c.text = piece.p;
        c.text_len = piece.len;
        c.has_logprobs = want_lp;
        c.logprobs = rl->lps.v;
        c.n_logprobs = rl->lps.n;
        c.text_offset = rl->text_total;
        st = write_chunk(r, &c);
    }
    rl->text_total += piece.len;
    speed_free(piece.p);
    lp_list_clear(&rl->lps);
    return st;
}

static speed_openai_finish_t finish_kind(const char *reason)
{
    return strcmp(reason, "length") == 0 ? SPEED_OPENAI_FINISH_LENGTH : SPEED_OPENAI_FINISH_STOP;
}

/* Runs the Generate stream on decode node rl->node and answers the client (unless the result
 * is RELAY_RETRY, in which case nothing was sent). */
static relay_result_t relay_generate(rtr_req_t *r, relay_t *rl, const Speed__V1__GenerateRequest *gm)
{
    speed_router_t *rt = r->rt;
    const char *addr = speed_router_nodes_address(rt->nodes, rl->pool, rl->node);
    uint8_t *buf = NULL;
    size_t len = 0;
    if (req_remaining_ms(r) <= 0) {
        req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
        return RELAY_DONE;
    }
    if (speed_proto_pack(&gm->base, &buf, &len) != SPEED_OK) {
        req_fail_status(r, SPEED_ERR_NO_MEMORY, NULL, 0);
        return RELAY_DONE;
    }
    if (!req_leg_begin(r, SPEED_ROUTER_POOL_DECODE, rl->node)) {
        speed_free(buf);
        req_fail_cancelled(r);
        return RELAY_DONE;
    }
    speed_rpc_stream_t *gen = NULL;
    speed_status_t st = speed_rpc_stream_open(speed_router_nodes_channel(rt->nodes, rl->pool, rl->node),
                                              SPEED_METHOD_DECODE_GENERATE, buf, len,
                                              req_remaining_ms(r), &gen);
    speed_free(buf);
    if (st != SPEED_OK) {
        req_fail_status(r, st, "cannot start the generation", 0);
        return RELAY_DONE;
    }
    pthread_mutex_lock(&r->lock);
    r->gen = gen;
    if (r->cancelled) speed_rpc_stream_cancel(gen);
    pthread_mutex_unlock(&r->lock);

    bool got_event = false, finished = false;
    char finish_reason[16] = "";
    char node_error[256] = "";
    int32_t node_status = 0;
    bool have_usage = false;
    Speed__V1__Usage usage = SPEED__V1__USAGE__INIT;
    speed_status_t local = SPEED_OK;   /* our own failure while relaying */

    for (;;) {
        uint8_t *data = NULL;
        size_t n = 0;
        speed_rpc_next_t nx = speed_rpc_stream_next(gen, finished ? 2000 : 500, &data, &n);
        if (nx == SPEED_RPC_NEXT_END) break;
        if (nx == SPEED_RPC_NEXT_WAIT) {
            if (finished) break;     /* the node sent its last event; do not wait for more */
            continue;
        }
        if (finished || local != SPEED_OK) {
            speed_free(data);
            continue;
        }
        Speed__V1__GenerateEvent *ev = NULL;
        speed_status_t ust = speed_proto_unpack(&speed__v1__generate_event__descriptor, data, n,
                                                (ProtobufCMessage **)&ev);
        speed_free(data);
        if (ust != SPEED_OK) {
            local = ust == SPEED_ERR_NO_MEMORY ? ust : SPEED_ERR_PEER_PROTOCOL;
            speed_rpc_stream_cancel(gen);
            continue;
        }
        got_event = true;
        speed_status_t rst = relay_tokens(r, rl, ev);
        if (rst != SPEED_OK && rst != SPEED_ERR_CANCELLED) local = rst;
        if (rst != SPEED_OK) speed_rpc_stream_cancel(gen);
        if (ev->finish_reason && ev->finish_reason[0]) {
            finished = true;
            snprintf(finish_reason, sizeof finish_reason, "%s", ev->finish_reason);
            if (ev->error) snprintf(node_error, sizeof node_error, "%s", ev->error);
            node_status = ev->status;
            if (ev->usage) {
                have_usage = true;
                usage.prompt_tokens = ev->usage->prompt_tokens;
                usage.completion_tokens = ev->usage->completion_tokens;
                usage.kv_bytes = ev->usage->kv_bytes;
                usage.kv_full_depth_bytes = ev->usage->kv_full_depth_bytes;
            }
        }
        speed_proto_free(&ev->base);
    }
    const char *status_msg = "";
    int code = speed_rpc_stream_status(gen, &status_msg);
    char status_text[256];
    snprintf(status_text, sizeof status_text, "%s", status_msg ? status_msg : "");
    pthread_mutex_lock(&r->lock);
    r->gen = NULL;
    pthread_mutex_unlock(&r->lock);
    speed_rpc_stream_close(gen);

    speed_status_t why = SPEED_OK;
    bool cancelled = req_cancelled(r, &why);
    bool ok_finish = finished && (strcmp(finish_reason, "stop") == 0 ||
                                  strcmp(finish_reason, "length") == 0);
    if (ok_finish && local == SPEED_OK && !cancelled) {
        req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        rl->success = true;
        rl->finish = finish_kind(finish_reason);
        rl->usage.prompt_tokens = have_usage && usage.prompt_tokens > 0 ? usage.prompt_tokens : rl->n_prompt;
        rl->usage.completion_tokens = have_usage && usage.completion_tokens > 0 ? usage.completion_tokens
                                                                             : rl->n_generated;
        if (rl->decode_only) rl->usage.kv_bytes = 0;
        else rl->usage.kv_bytes = (int64_t)(have_usage && usage.kv_bytes ? usage.kv_bytes : rl->kv_bytes_sent);
        rl->usage.kv_full_depth_bytes =
            have_usage && usage.kv_full_depth_bytes ? (int64_t)usage.kv_full_depth_bytes : -1;
        return RELAY_DONE;
    }
    /* Something went wrong: the decode node may still hold the sequence. */
    if (cancelled) {
        req_fail_cancelled(r);
        return RELAY_DONE;
    }
    if (local != SPEED_OK) {
        speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "relay from decode node %s failed: %s", addr,
                  speed_status_string(local));
        req_fail_status(r, local, local == SPEED_ERR_PEER_PROTOCOL
                                      ? "the decode node sent a malformed event" : NULL, 0);
        return RELAY_DONE;
    }
    if (finished) {
        /* The node ended the request itself: an error of this request, not of the node. */
        speed_status_t est = SPEED_ERR_PEER_PROTOCOL;
        if (strcmp(finish_reason, "error") == 0 && node_status < 0) est = (speed_status_t)node_status;
        else if (strcmp(finish_reason, "cancelled") == 0) est = SPEED_ERR_CANCELLED;
        char msg[320];
        snprintf(msg, sizeof msg, "generation failed on the decode node: %s",
                 node_error[0] ? node_error : finish_reason);
        speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "decode node %s ended the request: %s (%s)",
                  addr, finish_reason, node_error);
        req_fail_status(r, est, msg, 0);
        return RELAY_DONE;
    }
    /* The stream ended without a final event. */
    if (code == SPEED_RPC_DEADLINE_EXCEEDED && req_remaining_ms(r) <= 0) {
        req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
        return RELAY_DONE;
    }
    char why_text[320];
    snprintf(why_text, sizeof why_text, "generate stream ended with %s%s%s",
             speed_rpc_code_name(code), status_text[0] ? ": " : "", status_text);
    if (code == SPEED_RPC_RESOURCE_EXHAUSTED && !got_event) {
        req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        rl->capacity = true;
        return RELAY_RETRY;  /* no room on that node: another may have some */
    }
    if (code_is_request_error(code)) {
        speed_openai_error_t err;
        speed_openai_error_from_status(speed_rpc_code_to_status(code), status_text, &err);
        req_fail(r, &err, 0);
        return RELAY_DONE;
    }
    speed_router_nodes_fail(rt->nodes, rl->pool, rl->node, r->id, why_text);
    if (!got_event) return RELAY_RETRY;
    req_fail_status(r, SPEED_ERR_PEER_UNREACHABLE, "the decode node failed during generation", 0);
    return RELAY_DONE;
}

/* Sends the last chunks (streaming) or the whole object (non-streaming). */
static void answer_success(rtr_req_t *r, relay_t *rl)
{
    r->http_status = 200;
    if (r->req->stream) {
        if (r->api == SPEED_OPENAI_CHAT && !rl->role_sent) {
            speed_openai_chunk_t c = chunk_base(r, SPEED_OPENAI_CHUNK_ROLE);
            write_chunk(r, &c);
        }
        speed_openai_chunk_t c = chunk_base(r, SPEED_OPENAI_CHUNK_FINISH);
        c.finish = rl->finish;
        write_chunk(r, &c);
        if (r->req->include_usage) {
            speed_openai_chunk_t u = chunk_base(r, SPEED_OPENAI_CHUNK_USAGE);
            u.usage = &rl->usage;
            write_chunk(r, &u);
        }
        req_write_done(r);
        req_close(r);
        return;
    }
    speed_openai_response_t resp;
    memset(&resp, 0, sizeof resp);
    resp.id = r->oai_id;
    resp.model = r->rt->p.model_id;
    resp.created = r->created_unix;
    resp.text = rl->text.p ? rl->text.p : "";
    resp.text_len = rl->text.len;
    resp.finish = rl->finish;
    resp.has_logprobs = r->req->logprobs || r->req->top_logprobs > 0;
    resp.logprobs = rl->lps.v;
    resp.n_logprobs = rl->lps.n;
    resp.usage = &rl->usage;
    char *json = NULL;
    size_t len = 0;
    speed_status_t st = speed_openai_response_json(r->api, &resp, &json, &len);
    if (st != SPEED_OK) {
        req_fail_status(r, st, NULL, 0);
        return;
    }
    req_respond(r, 200, json, len, 0);
    speed_free(json);
}

/* ---- the request flow ------------------------------------------------------------------- */

typedef struct {
    int32_t *ids;
    size_t n_ids;
    int64_t max_tokens;
    Speed__V1__SamplingParams sampling;
    Speed__V1__SpeedParams speed;       /* the request's `speed` object */
    bool has_speed;
} plan_t;

static void plan_sampling(const speed_openai_request_t *q, int64_t max_tokens,
                          Speed__V1__SamplingParams *s)
{
    Speed__V1__SamplingParams init = SPEED__V1__SAMPLING_PARAMS__INIT;
    *s = init;
    s->max_tokens = max_tokens > INT32_MAX ? INT32_MAX : (int32_t)max_tokens;
    s->temperature = (float)q->temperature;
    s->top_p = (float)q->top_p;
    s->top_k = q->top_k;
    if (q->has_seed) {
        s->seed_opt_case = SPEED__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        s->seed = (uint64_t)q->seed;
    }
    s->logprobs = q->logprobs || q->top_logprobs > 0;
    s->top_logprobs = q->top_logprobs;
    s->n_stop = q->n_stop;
    s->stop = (char **)q->stop;
}

/* Decode.Reserve + Prefill.Prefill (with retries on other prefill nodes). On success
 * *first_p (owned by *prefill_p) and *epoch_p are set and SPEED_OK returned; otherwise the
 * client was answered (or RELAY_RETRY-style: SPEED_ERR_PEER_UNREACHABLE with *try_next set
 * means the decode node failed and another may be tried; SPEED_ERR_CAPACITY with *try_next
 * means it had no room). */
static speed_status_t run_prefill(rtr_req_t *r, plan_t *pl, size_t dnode, bool *try_next,
                                  Speed__V1__PrefillReply **prefill_p, uint64_t *epoch_p)
{
    speed_router_t *rt = r->rt;
    *try_next = false;
    *prefill_p = NULL;

    Speed__V1__ReserveRequest rq = SPEED__V1__RESERVE_REQUEST__INIT;
    rq.request_id = r->id;
    rq.n_prompt = (int32_t)pl->n_ids;
    rq.max_tokens = pl->sampling.max_tokens;
    if (pl->has_speed) rq.speed = &pl->speed;
    if (!req_leg_begin(r, SPEED_ROUTER_POOL_DECODE, dnode)) {
        req_fail_cancelled(r);
        return SPEED_ERR_CANCELLED;
    }
    call_result_t res;
    call_unary(r, SPEED_ROUTER_POOL_DECODE, dnode, SPEED_METHOD_DECODE_RESERVE, &rq.base,
               SPEED_ROUTER_RESERVE_TIMEOUT_MS, &speed__v1__reserve_reply__descriptor, &res);
    if (res.st != SPEED_OK) {
        req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        if (req_cancelled(r, NULL)) {
            req_fail_cancelled(r);
            return SPEED_ERR_CANCELLED;
        }
        if (res.code == SPEED_RPC_RESOURCE_EXHAUSTED) {
            *try_next = true;
            return SPEED_ERR_CAPACITY;
        }
        if (res.code == -1 || res.st == SPEED_ERR_TIMEOUT) {
            if (req_remaining_ms(r) <= 0) {
                req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
                return SPEED_ERR_TIMEOUT;
            }
        }
        if (res.code == -1) {
            req_fail_status(r, res.st, NULL, 0);
            return res.st;
        }
        if (code_is_request_error(res.code)) {
            speed_openai_error_t err;
            speed_openai_error_from_status(res.st, res.message, &err);
            req_fail(r, &err, 0);
            return res.st;
        }
        char why[320];
        snprintf(why, sizeof why, "Reserve: %s %s", speed_rpc_code_name(res.code), res.message);
        speed_router_nodes_fail(rt->nodes, SPEED_ROUTER_POOL_DECODE, dnode, r->id, why);
        *try_next = true;
        return SPEED_ERR_PEER_UNREACHABLE;
    }
    Speed__V1__ReserveReply *rr = (Speed__V1__ReserveReply *)res.reply;
    if (!rr->kv) {
        speed_proto_free(res.reply);
        send_cancel(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
        req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        speed_router_nodes_fail(rt->nodes, SPEED_ROUTER_POOL_DECODE, dnode, r->id,
                                "Reserve reply without a KV descriptor");
        *try_next = true;
        return SPEED_ERR_PEER_PROTOCOL;
    }
    *epoch_p = rr->kv->epoch;

    /* Prefill: the resolved depth goes back to the prefill node with the descriptor. */
    Speed__V1__SpeedParams resolved = SPEED__V1__SPEED_PARAMS__INIT;
    resolved.prefill_layers = rr->kv->prefill_layers;
    resolved.anchors_opt_case = SPEED__V1__SPEED_PARAMS__ANCHORS_OPT_ANCHORS;
    resolved.anchors = rr->kv->anchors;
    resolved.tail_opt_case = SPEED__V1__SPEED_PARAMS__TAIL_OPT_TAIL;
    resolved.tail = rr->kv->tail;
    Speed__V1__PrefillRequest pq = SPEED__V1__PREFILL_REQUEST__INIT;
    pq.request_id = r->id;
    pq.n_prompt_ids = pl->n_ids;
    pq.prompt_ids = pl->ids;
    pq.speed = &resolved;
    pq.sampling = &pl->sampling;
    pq.kv = rr->kv;

    speed_balance_pool_t *ppool = speed_router_nodes_pool(rt->nodes, SPEED_ROUTER_POOL_PREFILL);
    size_t tried[17];
    size_t n_tried = 0;
    int64_t attempts = 1 + rt->cfg->prefill_retries;
    char last_error[320] = "no prefill node is available";
    speed_status_t last_st = SPEED_ERR_PEER_UNREACHABLE;
    bool capacity = false;
    for (int64_t a = 0; a < attempts && n_tried < sizeof tried / sizeof tried[0]; a++) {
        size_t pnode;
        if (speed_balance_pool_pick(ppool, tried, n_tried, &pnode) != SPEED_OK) break;
        tried[n_tried++] = pnode;
        if (a > 0) speed_counter_inc(rt->m_prefill_retries);
        if (!req_leg_begin(r, SPEED_ROUTER_POOL_PREFILL, pnode)) break;
        call_unary(r, SPEED_ROUTER_POOL_PREFILL, pnode, SPEED_METHOD_PREFILL_PREFILL, &pq.base, 0,
                   &speed__v1__prefill_reply__descriptor, &res);
        req_leg_end(r, SPEED_ROUTER_POOL_PREFILL);
        if (res.st == SPEED_OK) {
            *prefill_p = (Speed__V1__PrefillReply *)res.reply;
            if (!(*prefill_p)->first) {
                speed_proto_free(res.reply);
                *prefill_p = NULL;
                res.st = SPEED_ERR_PEER_PROTOCOL;
                res.code = SPEED_RPC_INTERNAL;
                snprintf(res.message, sizeof res.message, "Prefill reply without a first token");
            } else {
                break;
            }
        }
        if (req_cancelled(r, NULL)) break;
        last_st = res.st;
        snprintf(last_error, sizeof last_error, "prefill node %s: %s %s",
                 speed_router_nodes_address(rt->nodes, SPEED_ROUTER_POOL_PREFILL, pnode),
                 res.code >= 0 ? speed_rpc_code_name(res.code) : speed_status_string(res.st),
                 res.message);
        if (res.code == -1) {
            if (res.st == SPEED_ERR_TIMEOUT) break; /* the request's own deadline */
            break;                                  /* our own failure (memory) */
        }
        if (code_is_request_error(res.code)) break;
        if (res.code == SPEED_RPC_DEADLINE_EXCEEDED && req_remaining_ms(r) <= 0) break;
        if (res.code == SPEED_RPC_RESOURCE_EXHAUSTED) {
            capacity = true;
            continue;
        }
        if (code_is_node_failure(res.code))
            speed_router_nodes_fail(rt->nodes, SPEED_ROUTER_POOL_PREFILL, pnode, r->id, last_error);
        else
            speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "%s; trying another prefill node", last_error);
        /* The node may hold half a prefill of this request. */
        if (res.code != SPEED_RPC_UNAVAILABLE)
            send_cancel(rt, SPEED_ROUTER_POOL_PREFILL, pnode, r->id);
    }
    if (*prefill_p) {
        speed_proto_free(&rr->base);
        return SPEED_OK;
    }
    /* No first token: free the reservation. */
    speed_proto_free(&rr->base);
    send_cancel(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
    req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
    if (req_cancelled(r, NULL)) {
        if (n_tried) send_cancel(rt, SPEED_ROUTER_POOL_PREFILL, tried[n_tried - 1], r->id);
        req_fail_cancelled(r);
        return SPEED_ERR_CANCELLED;
    }
    if (last_st == SPEED_ERR_TIMEOUT && req_remaining_ms(r) <= 0) {
        req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
        return SPEED_ERR_TIMEOUT;
    }
    if (code_is_request_error(res.code)) {
        speed_openai_error_t err;
        speed_openai_error_from_status(res.st, res.message, &err);
        req_fail(r, &err, 0);
        return res.st;
    }
    speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "prefill failed after %zu attempt(s): %s", n_tried,
              last_error);
    char msg[400];
    snprintf(msg, sizeof msg, "prefill failed: %s", last_error);
    req_fail_status(r, capacity ? SPEED_ERR_CAPACITY : SPEED_ERR_PEER_UNREACHABLE, msg,
                    capacity ? speed_admission_retry_after(rt->adm) : 0);
    return SPEED_ERR_PEER_UNREACHABLE;
}

/* Picks decode nodes until one serves the request or none is left. */
static void run_routed(rtr_req_t *r, plan_t *pl, speed_route_kind_t kind)
{
    speed_router_t *rt = r->rt;
    speed_balance_pool_t *dpool = speed_router_nodes_pool(rt->nodes, SPEED_ROUTER_POOL_DECODE);
    size_t tried[64];
    size_t n_tried = 0;
    bool capacity = false;
    relay_t rl;
    memset(&rl, 0, sizeof rl);
    rl.pool = SPEED_ROUTER_POOL_DECODE;
    rl.n_prompt = (int64_t)pl->n_ids;
    rl.decode_only = kind == SPEED_ROUTE_DECODE_ONLY;

    for (;;) {
        if (req_cancelled(r, NULL)) {
            req_fail_cancelled(r);
            break;
        }
        size_t dnode;
        if (n_tried >= sizeof tried / sizeof tried[0] ||
            speed_balance_pool_pick(dpool, tried, n_tried, &dnode) != SPEED_OK) {
            /* No KV room anywhere is the cluster's state, not the client's rate: 503 with
             * Retry-After (the status table would say 429). */
            speed_openai_error_t err;
            speed_openai_error_set(&err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, "service_unavailable",
                                   "%s", capacity ? "no decode node has room for this request now"
                                                  : "no decode node is available");
            req_fail(r, &err, speed_admission_retry_after(rt->adm));
            break;
        }
        tried[n_tried++] = dnode;
        rl.node = dnode;

        Speed__V1__GenerateRequest gm = SPEED__V1__GENERATE_REQUEST__INIT;
        gm.request_id = r->id;
        gm.sampling = &pl->sampling;
        Speed__V1__PrefillReply *prefill = NULL;
        if (kind == SPEED_ROUTE_DECODE_ONLY) {
            gm.n_prompt_ids = pl->n_ids;
            gm.prompt_ids = pl->ids;
            if (pl->has_speed) gm.speed = &pl->speed;
        } else {
            bool try_next = false;
            uint64_t epoch = 0;
            speed_status_t st = run_prefill(r, pl, dnode, &try_next, &prefill, &epoch);
            if (st != SPEED_OK) {
                if (try_next) {
                    capacity = capacity || st == SPEED_ERR_CAPACITY;
                    continue;
                }
                break; /* answered */
            }
            gm.first = prefill->first;
            gm.epoch = epoch;
            rl.kv_bytes_sent = prefill->kv_bytes_sent;
        }
        relay_result_t rr = relay_generate(r, &rl, &gm);
        speed_proto_free(prefill ? &prefill->base : NULL);
        if (rr == RELAY_RETRY) {
            capacity = capacity || rl.capacity;
            /* The reservation (if any) went with the node, or was refused: start over. */
            send_cancel(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
            req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
            continue;
        }
        if (rl.success) {
            speed_counter_add(rt->m_kv_bytes, (double)(rl.usage.kv_bytes > 0 ? rl.usage.kv_bytes : 0));
            speed_histogram_observe(rt->m_e2e, speed_router_now_s() - r->t_arrival);
            answer_success(r, &rl);
        } else {
            /* The decode node may still hold the sequence (error, cancel, client gone). */
            pthread_mutex_lock(&r->lock);
            bool held = r->decode_held;
            pthread_mutex_unlock(&r->lock);
            if (held) send_cancel(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
            req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        }
        break;
    }
    speed_free(rl.text.p);
    lp_list_free(&rl.lps);
}

static void run_request(rtr_req_t *r)
{
    speed_router_t *rt = r->rt;
    const speed_openai_request_t *q = r->req;
    speed_openai_error_t err;
    speed_tok_ids_t ids = {0};

    speed_status_t st = speed_openai_request_tokenize(q, rt->p.tok, &ids, &err);
    if (st != SPEED_OK) {
        req_fail(r, &err, 0);
        return;
    }
    int64_t max_tokens = 0;
    st = speed_openai_check_length(q, (int64_t)ids.n, rt->p.n_ctx, &max_tokens, &err);
    if (st != SPEED_OK) {
        speed_tok_ids_free(&ids);
        req_fail(r, &err, 0);
        return;
    }
    if (q->max_tokens < 0 && max_tokens > rt->cfg->default_max_tokens)
        max_tokens = rt->cfg->default_max_tokens;

    st = speed_admission_acquire(rt->adm);
    if (st != SPEED_OK) {
        speed_tok_ids_free(&ids);
        if (st == SPEED_ERR_CAPACITY)
            req_fail_status(r, st, "too many requests; retry later", speed_admission_retry_after(rt->adm));
        else if (st == SPEED_ERR_TIMEOUT)
            req_fail_status(r, st, "the request waited too long in the router's queue",
                            speed_admission_retry_after(rt->adm));
        else
            req_fail_status(r, SPEED_ERR_CANCELLED, "the server is shutting down", 0);
        return;
    }
    r->admitted = true;
    pthread_mutex_lock(&r->http_lock);
    r->running = true;
    r->last_write_ms = speed_router_now_ms();
    pthread_mutex_unlock(&r->http_lock);

    speed_route_decision_t d =
        speed_route_decide(&rt->route, (int64_t)ids.n,
                           speed_router_nodes_n_up(rt->nodes, SPEED_ROUTER_POOL_PREFILL));
    r->route_label = speed_route_kind_name(d.kind);
    {
        const char *values[] = {r->route_label, d.reason};
        speed_counter_t *c = NULL;
        if (speed_counter_labels(rt->m_route_decisions, values, &c) == SPEED_OK) speed_counter_inc(c);
    }
    speed_counter_add(rt->m_prompt_tokens, (double)ids.n);
    speed_log(SPEED_LOG_DEBUG, SUBSYS, r->id, "%zu prompt tokens, max_tokens %lld, route %s (%s)",
              ids.n, (long long)max_tokens, r->route_label, d.reason);
    if (!d.ok) {
        req_fail_status(r, SPEED_ERR_PEER_UNREACHABLE, "no prefill node is available", 1);
    } else {
        plan_t pl;
        memset(&pl, 0, sizeof pl);
        pl.ids = ids.ids;
        pl.n_ids = ids.n;
        pl.max_tokens = max_tokens;
        plan_sampling(q, max_tokens, &pl.sampling);
        Speed__V1__SpeedParams sp = SPEED__V1__SPEED_PARAMS__INIT;
        pl.speed = sp;
        if (q->speed.present) {
            fill_speed(&q->speed, &pl.speed);
            pl.has_speed = true;
        }
        run_routed(r, &pl, d.kind);
    }
    req_release_slot(r); /* normally done as the answer completed */
    speed_tok_ids_free(&ids);
}

void speed_router_req_free(rtr_req_t *r)
{
    if (!r) return;
    speed_openai_request_destroy(r->req);
    pthread_mutex_destroy(&r->lock);
    pthread_mutex_destroy(&r->http_lock);
    speed_free(r);
}

void *speed_router_worker_main(void *arg)
{
    rtr_req_t *r = arg;
    speed_router_t *rt = r->rt;
    r->route_label = "none";
    r->http_status = 500;
    run_request(r);

    /* Whatever happened, the client gets an answer and the stream reference goes. */
    pthread_mutex_lock(&r->http_lock);
    bool open = r->stream != NULL;
    pthread_mutex_unlock(&r->http_lock);
    if (open) {
        speed_log(SPEED_LOG_ERROR, SUBSYS, r->id, "request ended without an answer");
        req_fail_status(r, SPEED_ERR_INTERNAL, NULL, 0);
    }
    req_release_slot(r);
    req_count(r);

    pthread_mutex_lock(&rt->lock);
    if (r->prev) r->prev->next = r->next;
    else rt->reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    pthread_mutex_unlock(&rt->lock);
    speed_router_req_free(r);

    pthread_mutex_lock(&rt->lock);
    if (--rt->n_workers == 0) pthread_cond_broadcast(&rt->idle_cond);
    pthread_mutex_unlock(&rt->lock);
    return NULL;
}
