/* The Generate leg and the relay of its tokens to the client: SSE chunks as tokens come
 * (streaming) or the whole text and logprobs kept for one object (non-streaming), TTFT / ITL
 * metrics, the ids relayed (a migration continues from them), and how the stream ended
 * (success, an error of the request, a node failure before anything came that another decode
 * node may retry, or after tokens came, which request_migrate.c may continue elsewhere). */
#include "request_internal.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"

#define SUBSYS SPEED_SUBSYS_NET

static bool buf_append(relay_buf_t *b, const char *s, size_t n) {
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
static void lp_list_clear(relay_lps_t *l) {
    for (size_t i = 0; i < l->n; i++) {
        speed_free((char *)l->v[i].token);
        for (size_t k = 0; k < l->v[i].n_top; k++) speed_free((char *)l->v[i].top[k].token);
        speed_free((void *)l->v[i].top);
    }
    l->n = 0;
}

static void lp_list_free(relay_lps_t *l) {
    lp_list_clear(l);
    speed_free(l->v);
    l->v = NULL;
    l->cap = 0;
}

/* The bytes of one token on its own (for logprobs): a token holding part of a multi-byte
 * character keeps those bytes (openai_response.c shows it as "bytes:\xNN..." with its
 * `bytes`, as OpenAI does); an id the tokenizer does not know gives "". */
static char *token_string(const speed_tok_t *tok, int32_t id, size_t *len_p) {
    char *s = NULL;
    *len_p = 0;
    if (id >= 0 && id < speed_tok_vocab_size(tok) && speed_tok_decode_raw(tok, &id, 1, false, &s, len_p) == SPEED_OK)
        return s;
    return speed_strdup("");
}

static bool lp_list_add(relay_lps_t *l, const speed_tok_t *tok, const Speed__V1__Token *t, size_t n_top_max) {
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

/* Keeps the ids the client has (or will have in the non-streamed answer): a re-issue after
 * the decode node's death starts from exactly these. */
static bool ids_append(relay_t *rl, const Speed__V1__GenerateEvent *ev) {
    if (rl->n_gen_ids + ev->n_tokens > rl->cap_gen_ids) {
        size_t cap = rl->cap_gen_ids ? rl->cap_gen_ids : 64;
        while (cap < rl->n_gen_ids + ev->n_tokens) cap *= 2;
        int32_t *g = speed_realloc(rl->gen_ids, cap * sizeof *g);
        if (!g) return false;
        rl->gen_ids = g;
        rl->cap_gen_ids = cap;
    }
    for (size_t i = 0; i < ev->n_tokens; i++) rl->gen_ids[rl->n_gen_ids++] = ev->tokens[i]->id;
    return true;
}

void speed_router_count_migration(rtr_req_t *r, const char *outcome) {
    const char *values[] = {outcome};
    speed_counter_t *c = NULL;
    if (speed_counter_labels(r->rt->m_migrations, values, &c) == SPEED_OK) speed_counter_inc(c);
}

static void observe_tokens(rtr_req_t *r, relay_t *rl, size_t k) {
    speed_router_t *rt = r->rt;
    double t = speed_clock_mono_s();
    size_t n_itl = k;
    if (rl->n_generated == 0 && k > 0) {
        speed_histogram_observe(rt->m_ttft, t - r->t_arrival);
        rl->t_first_token = t;
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

static speed_status_t write_chunk(rtr_req_t *r, const speed_openai_chunk_t *c) {
    char *sse = NULL;
    size_t len = 0;
    speed_status_t st = speed_openai_chunk_sse(r->api, c, &sse, &len);
    if (st != SPEED_OK) return st;
    st = speed_router_req_write(r, sse, len);
    speed_free(sse);
    return st;
}

static speed_openai_chunk_t chunk_base(rtr_req_t *r, speed_openai_chunk_kind_t kind) {
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
static speed_status_t relay_tokens(rtr_req_t *r, relay_t *rl, const Speed__V1__GenerateEvent *ev) {
    const speed_openai_request_t *q = r->req;
    const speed_tok_t *tok = r->rt->p.tok;
    bool want_lp = q->logprobs || q->top_logprobs > 0;
    size_t k = ev->n_tokens;
    if (k == 0) return SPEED_OK;
    if (!ids_append(rl, ev)) return SPEED_ERR_NO_MEMORY;
    observe_tokens(r, rl, k);
    if (!q->stream) {
        for (size_t i = 0; i < k; i++) {
            const Speed__V1__Token *t = ev->tokens[i];
            if (t->text && !buf_append(&rl->text, t->text, strlen(t->text))) return SPEED_ERR_NO_MEMORY;
            if (want_lp && !lp_list_add(&rl->lps, tok, t, (size_t)q->top_logprobs)) return SPEED_ERR_NO_MEMORY;
        }
        return SPEED_OK;
    }
    speed_status_t st = SPEED_OK;
    if (r->api == SPEED_OPENAI_CHAT && !rl->role_sent) {
        speed_openai_chunk_t c = chunk_base(r, SPEED_OPENAI_CHUNK_ROLE);
        SPEED_CHECK(write_chunk(r, &c));
        rl->role_sent = true;
    }
    relay_buf_t piece = {0};
    lp_list_clear(&rl->lps);
    for (size_t i = 0; i < k && st == SPEED_OK; i++) {
        const Speed__V1__Token *t = ev->tokens[i];
        if (t->text && !buf_append(&piece, t->text, strlen(t->text))) st = SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK && want_lp && !lp_list_add(&rl->lps, tok, t, (size_t)q->top_logprobs))
            st = SPEED_ERR_NO_MEMORY;
    }
    /* a chunk for every event, also when its tokens show no text yet (a partial UTF-8 character,
     * a special token): the client sees each token arrive, and TTFT is the first token's time */
    if (st == SPEED_OK) {
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

static speed_openai_finish_t finish_kind(const char *reason) {
    return strcmp(reason, "length") == 0 ? SPEED_OPENAI_FINISH_LENGTH : SPEED_OPENAI_FINISH_STOP;
}

/* Runs the Generate stream on decode node rl->node and answers the client (unless the result
 * is RELAY_RETRY, in which case nothing was sent). */
relay_result_t speed_router_relay_generate(rtr_req_t *r, relay_t *rl, const Speed__V1__GenerateRequest *gm) {
    speed_router_t *rt = r->rt;
    const char *addr = speed_router_nodes_address(rt->nodes, rl->pool, rl->node);
    uint8_t *buf = NULL;
    size_t len = 0;
    if (speed_router_req_remaining_ms(r) <= 0) {
        speed_router_req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
        return RELAY_DONE;
    }
    if (speed_proto_pack(&gm->base, &buf, &len) != SPEED_OK) {
        speed_router_req_fail_status(r, SPEED_ERR_NO_MEMORY, NULL, 0);
        return RELAY_DONE;
    }
    if (!speed_router_req_leg_begin(r, SPEED_ROUTER_POOL_DECODE, rl->node)) {
        speed_free(buf);
        speed_router_req_fail_cancelled(r);
        return RELAY_DONE;
    }
    speed_rpc_stream_t *gen = NULL;
    speed_status_t st =
        speed_rpc_stream_open(speed_router_nodes_channel(rt->nodes, rl->pool, rl->node), SPEED_METHOD_DECODE_GENERATE,
                              buf, len, speed_router_req_remaining_ms(r), &gen);
    speed_free(buf);
    if (st != SPEED_OK) {
        speed_router_req_fail_status(r, st, "cannot start the generation", 0);
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
    speed_status_t local = SPEED_OK; /* our own failure while relaying */

    for (;;) {
        uint8_t *data = NULL;
        size_t n = 0;
        speed_rpc_next_t nx = speed_rpc_stream_next(gen, finished ? 2000 : 500, &data, &n);
        if (nx == SPEED_RPC_NEXT_END) break;
        if (nx == SPEED_RPC_NEXT_WAIT) {
            if (finished) break; /* the node sent its last event; do not wait for more */
            continue;
        }
        if (finished || local != SPEED_OK) {
            speed_free(data);
            continue;
        }
        Speed__V1__GenerateEvent *ev = NULL;
        speed_status_t ust =
            speed_proto_unpack(&speed__v1__generate_event__descriptor, data, n, (ProtobufCMessage **)&ev);
        speed_free(data);
        if (ust != SPEED_OK) {
            local = ust == SPEED_ERR_NO_MEMORY ? ust : SPEED_ERR_PEER_PROTOCOL;
            speed_rpc_stream_cancel(gen);
            continue;
        }
        got_event = true;
        if (rl->migrating) { /* the re-issued request goes on on this node */
            rl->migrating = false;
            speed_router_count_migration(r, "ok");
        }
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
    bool cancelled = speed_router_req_cancelled(r, &why);
    bool ok_finish = finished && (strcmp(finish_reason, "stop") == 0 || strcmp(finish_reason, "length") == 0);
    if (ok_finish && local == SPEED_OK && !cancelled) {
        speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        rl->success = true;
        rl->finish = finish_kind(finish_reason);
        /* after a migration the node's prompt held the resumed tokens: the client's is ours */
        rl->usage.prompt_tokens =
            have_usage && usage.prompt_tokens > 0 && rl->n_migrations == 0 ? usage.prompt_tokens : rl->n_prompt;
        rl->usage.completion_tokens =
            have_usage && usage.completion_tokens > 0 ? usage.completion_tokens : rl->n_generated;
        if (rl->decode_only)
            rl->usage.kv_bytes = 0;
        else
            rl->usage.kv_bytes = (int64_t)(have_usage && usage.kv_bytes ? usage.kv_bytes : rl->kv_bytes_sent);
        rl->usage.kv_full_depth_bytes =
            have_usage && usage.kv_full_depth_bytes ? (int64_t)usage.kv_full_depth_bytes : -1;
        return RELAY_DONE;
    }
    /* Something went wrong: the decode node may still hold the sequence. */
    if (cancelled) {
        speed_router_req_fail_cancelled(r);
        return RELAY_DONE;
    }
    if (local != SPEED_OK) {
        speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "relay from decode node %s failed: %s", addr,
                  speed_status_string(local));
        speed_router_req_fail_status(
            r, local, local == SPEED_ERR_PEER_PROTOCOL ? "the decode node sent a malformed event" : NULL, 0);
        return RELAY_DONE;
    }
    if (finished) {
        /* The node ended the request itself: an error of this request, not of the node. */
        speed_status_t est = SPEED_ERR_PEER_PROTOCOL;
        if (strcmp(finish_reason, "error") == 0 && node_status < 0)
            est = (speed_status_t)node_status;
        else if (strcmp(finish_reason, "cancelled") == 0)
            est = SPEED_ERR_CANCELLED;
        char msg[320];
        snprintf(msg, sizeof msg, "generation failed on the decode node: %s",
                 node_error[0] ? node_error : finish_reason);
        speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "decode node %s ended the request: %s (%s)", addr, finish_reason,
                  node_error);
        speed_router_req_fail_status(r, est, msg, 0);
        return RELAY_DONE;
    }
    /* The stream ended without a final event. */
    if (code == SPEED_RPC_DEADLINE_EXCEEDED && speed_router_req_remaining_ms(r) <= 0) {
        speed_router_req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
        return RELAY_DONE;
    }
    char why_text[320];
    snprintf(why_text, sizeof why_text, "generate stream ended with %s%s%s", speed_rpc_code_name(code),
             status_text[0] ? ": " : "", status_text);
    if (code == SPEED_RPC_RESOURCE_EXHAUSTED && !got_event) {
        speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        rl->capacity = true;
        return RELAY_RETRY; /* no room on that node: another may have some */
    }
    if (speed_router_code_is_request_error(code)) {
        speed_openai_error_t err;
        speed_openai_error_from_status(speed_rpc_code_to_status(code), status_text, &err);
        speed_router_req_fail(r, &err, 0);
        return RELAY_DONE;
    }
    speed_router_nodes_fail(rt->nodes, rl->pool, rl->node, r->id, why_text);
    if (!got_event) return RELAY_RETRY;
    if (rl->n_migrations < rt->cfg->max_migrations) return RELAY_MIGRATE;
    speed_router_count_migration(r, "failed");
    speed_router_req_fail_status(r, SPEED_ERR_PEER_UNREACHABLE,
                                 rt->cfg->max_migrations > 0
                                     ? "the decode node failed during generation (router.max_migrations reached)"
                                     : "the decode node failed during generation",
                                 0);
    return RELAY_DONE;
}

/* Sends the last chunks (streaming) or the whole object (non-streaming). */
void speed_router_relay_answer(rtr_req_t *r, relay_t *rl) {
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
        speed_router_req_write_done(r);
        speed_router_req_close(r);
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
        speed_router_req_fail_status(r, st, NULL, 0);
        return;
    }
    speed_router_req_respond(r, 200, json, len, 0);
    speed_free(json);
}

void speed_router_relay_cleanup(relay_t *rl) {
    speed_free(rl->text.p);
    rl->text.p = NULL;
    rl->text.len = rl->text.cap = 0;
    lp_list_free(&rl->lps);
    speed_free(rl->gen_ids);
    rl->gen_ids = NULL;
    rl->n_gen_ids = rl->cap_gen_ids = 0;
}
