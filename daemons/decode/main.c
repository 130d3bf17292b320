/* speed-decode: the decode node. Reserve hands out KV blocks (a descriptor the prefill node
 * writes into with UCX puts); Generate decodes at full depth with continuous batching and
 * streams tokens; Cancel and lease expiry free blocks. See decode-node/README.md.
 *
 *   speed-decode --config CLUSTER.yaml [--node.index I] [--model DIR] [options]
 */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "log.h"
#include "node.h"

typedef struct {
    speed_node_t *node;
    speed_rpc_call_t *call;
    char id[SPEED_BATCH_ID_MAX + 1];
    int n_top; /* top logprobs to return */
    bool logprobs;
    bool decode_only;
    int64_t n_resumed; /* GenerateRequest.resumed_ids: a migrated request's earlier tokens */
    speed_dtype_t kv_dtype;
    Speed__V1__GenerateRequest *req; /* owned until the batcher has copied what it needs */
} gen_t;

static speed_node_t g_node;

/* ---- Reserve -------------------------------------------------------------------------------- */

typedef struct {
    speed_node_t *node;
    int64_t n_prompt;
    const char *request_id;
    speed_depth_t depth; /* resolved */
    int64_t lease_ms;    /* the reservation's */
    int64_t n_cached;    /* prompt positions the prefix cache filled: the descriptor starts past them */
    speed_kv_desc_t *desc;
} desc_arg_t;

static speed_status_t build_desc(void *user, speed_kv_cache_t *cache, const speed_kv_seq_t *seq) {
    desc_arg_t *a = user;
    int64_t n_compact = a->depth.anchors + a->depth.tail;
    if (n_compact > a->n_prompt) n_compact = a->n_prompt;
    /* The grant: a fresh nonce for this reservation, which only the prefill node the router
     * picks learns; its notify must carry it or the KV is never marked ready. The grant lives
     * as long as the reservation can (an abort notify after a cancel needs it too). */
    speed_kv_desc_params_t p = {
        .transport = (speed_kv_transport_t)a->node->cfg.ucx_transport,
        .lease_ms = speed_node_desc_lease_ms(a->lease_ms),
        .cookie = 0,
        .grant_id = a->request_id,
        .grant_ms = a->lease_ms,
        .integrity = a->node->cfg.kv_integrity,
        /* a prefix cache hit: the prefill node writes only the blocks past it, and the grant
         * admits nothing below them (the hit's blocks may be shared read-only) */
        .from = speed_kv_from_cached(a->n_cached, a->n_prompt, a->depth.anchors),
    };
    return speed_kv_desc_build(a->node->xfer, cache, seq, a->n_prompt, n_compact, &p, &a->desc);
}

typedef struct {
    speed_node_t *node;
    speed_rpc_call_t *call;
    Speed__V1__ReserveRequest *req;
} reserve_t;

static void reserve_work(void *arg) {
    reserve_t *r = arg;
    speed_node_t *n = r->node;
    char err[256] = "";
    speed_depth_t depth;
    speed_status_t st = speed_node_depth_from_proto(r->req->speed, n->model->config.n_layers,
                                                    speed_batcher_depth(n->batcher), &depth, err, sizeof err);
    if (st == SPEED_OK) st = speed_node_depth_resume(&depth, r->req->resume_tokens, r->req->n_prompt, err, sizeof err);
    speed_batch_reservation_t res;
    if (st == SPEED_OK && !speed_node_accepting(n)) {
        st = SPEED_ERR_CANCELLED;
        snprintf(err, sizeof err, "node is draining");
    }
    if (st == SPEED_OK) {
        speed_depth_request_t want = speed_depth_request_of(depth);
        /* With the prefix cache on, the reservation is looked up with the prompt's ids: a hit
         * fills the first res.n_cached positions here, the descriptor then asks the prefill node
         * for the blocks past them only (the partial transfer, docs/prefix-cache.md#in-the-cluster),
         * and the request is cached when it ends (its events then tell the router). */
        if (n->cfg.prefix_cache_blocks > 0 && r->req->n_prompt_ids == (size_t)r->req->n_prompt)
            st = speed_batcher_reserve_ids(n->batcher, r->req->request_id, r->req->prompt_ids, r->req->n_prompt,
                                           r->req->max_tokens, &want, &res);
        else
            st = speed_batcher_reserve(n->batcher, r->req->request_id, r->req->n_prompt, r->req->max_tokens, &want,
                                       &res);
        if (st != SPEED_OK)
            snprintf(err, sizeof err, "%s", st == SPEED_ERR_CAPACITY ? "no free KV blocks" : speed_log_last_error());
    }
    desc_arg_t da = {.node = n, .n_prompt = r->req->n_prompt, .request_id = r->req->request_id};
    if (st == SPEED_OK) {
        da.depth = res.depth;
        da.lease_ms = res.lease_ms;
        da.n_cached = res.n_cached;
        st = speed_batcher_with_kv(n->batcher, r->req->request_id, build_desc, &da);
        if (st != SPEED_OK) {
            snprintf(err, sizeof err, "cannot describe the KV blocks: %s", speed_log_last_error());
            speed_batcher_cancel(n->batcher, r->req->request_id);
            speed_batcher_release(n->batcher, r->req->request_id); /* nobody learned the descriptor */
        }
    }
    if (st == SPEED_OK) {
        Speed__V1__ReserveReply reply = SPEED__V1__RESERVE_REPLY__INIT;
        Speed__V1__KvDescriptor kd;
        st = speed_node_kv_desc_to_proto(da.desc, &res.depth, &kd);
        if (st == SPEED_OK) {
            reply.kv = &kd;
            reply.cached_tokens = (int32_t)res.n_cached;
            if (res.n_cached > 0)
                speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, r->req->request_id,
                          "reserve: %lld prompt positions cached, %llu of the KV bytes to come",
                          (long long)res.n_cached, (unsigned long long)da.desc->total_bytes);
            speed_node_reply(r->call, &reply.base);
            speed_node_kv_desc_proto_cleanup(&kd);
        } else {
            speed_batcher_cancel(n->batcher, r->req->request_id);
            speed_batcher_release(n->batcher, r->req->request_id); /* nobody learned the descriptor */
            speed_kv_xfer_ctx_grant_drop(n->xfer, r->req->request_id);
            speed_node_fail(r->call, st, "out of memory");
        }
    } else {
        speed_node_count(n, st == SPEED_ERR_CAPACITY ? "capacity" : "rejected");
        speed_node_fail(r->call, st, err);
    }
    speed_kv_desc_destroy(da.desc);
    speed_proto_free(&r->req->base);
    speed_free(r);
}

static void on_reserve(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    speed_node_t *n = user;
    Speed__V1__ReserveRequest *req = NULL;
    if (speed_proto_unpack(&speed__v1__reserve_request__descriptor, data, len, (ProtobufCMessage **)&req) != SPEED_OK) {
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT, "malformed ReserveRequest");
        return;
    }
    if (!req->request_id || !*req->request_id || req->n_prompt < 1 || req->max_tokens < 1) {
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT, "Reserve needs request_id, n_prompt >= 1, max_tokens >= 1");
        speed_proto_free(&req->base);
        return;
    }
    if (req->cached_tokens > 0) /* a hint for the prefix cache, which checks its own blocks */
        speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, req->request_id, "reserve: the router expects %d cached tokens",
                  req->cached_tokens);
    reserve_t *r = speed_calloc(1, sizeof *r);
    if (r) *r = (reserve_t){.node = n, .call = call, .req = req};
    if (!r || speed_node_defer(n, reserve_work, r) != SPEED_OK) {
        speed_free(r);
        speed_proto_free(&req->base);
        speed_node_fail(call, SPEED_ERR_NO_MEMORY, "out of memory");
    }
}

/* ---- Generate ------------------------------------------------------------------------------- */

static void gen_free(gen_t *g) {
    if (g->req) speed_proto_free(&g->req->base);
    speed_free(g);
}

/* KV bytes the prefill node shipped for a disaggregated request: the prompt's (the section 1
 * formula) less, on a prefix cache hit, the entries of the blocks before each layer's first
 * uncached one (they were here already: the partial transfer, speed_kv_desc_layer_t). */
static uint64_t shipped_kv_bytes(speed_node_t *n, const speed_model_config_t *mc, const speed_batch_usage_t *u,
                                 speed_dtype_t dt) {
    const speed_depth_t *d = &u->depth;
    uint64_t all = speed_kv_bytes_for_prompt(mc, d->prefill_layers, d->anchors, d->tail, u->n_prompt, dt);
    if (u->n_cached <= 0) return all;
    const int64_t L = mc->n_layers, C = d->prefill_layers < 1 ? 1 : d->prefill_layers > L ? L : d->prefill_layers;
    const int64_t B = speed_kv_cache_block_tokens(speed_batcher_kv_cache(n->batcher));
    int64_t n_full, n_compact;
    speed_kv_entries_for(u->n_prompt, d->anchors, d->tail, 0, &n_full, &n_compact);
    speed_kv_from_t from = speed_kv_from_cached(u->n_cached, u->n_prompt, d->anchors);
    int64_t skip_full = from.full < n_full ? from.full / B * B : n_full;
    int64_t skip_compact = from.compact < n_compact ? from.compact / B * B : n_compact;
    uint64_t per = speed_kv_bytes_for_prompt(mc, (int)L, 0, 0, 1, dt) / (uint64_t)L; /* one layer, one token */
    uint64_t skipped = (uint64_t)(C * skip_full + (L - C) * skip_compact) * per;
    return skipped < all ? all - skipped : 0;
}

static void gen_event(void *user, const speed_batch_event_t *ev) {
    gen_t *g = user;
    speed_node_t *n = g->node;
    Speed__V1__GenerateEvent out = SPEED__V1__GENERATE_EVENT__INIT;
    if (ev->token) {
        Speed__V1__Token tok, *tp = &tok;
        Speed__V1__TopLogprob storage[SPEED_SAMPLER_MAX_TOP_LOGPROBS], *ptrs[SPEED_SAMPLER_MAX_TOP_LOGPROBS];
        speed_node_token_to_proto(ev->token, g->n_top, &tok, storage, ptrs);
        if (!g->logprobs) tok.logprob = 0;
        out.n_tokens = 1;
        out.tokens = &tp;
        speed_counter_inc(n->m_generated_tokens);
        if (speed_node_send(g->call, &out.base) == SPEED_ERR_CANCELLED) speed_batcher_cancel(n->batcher, g->id);
        return;
    }
    const speed_batch_usage_t *u = ev->usage;
    Speed__V1__Usage usage = SPEED__V1__USAGE__INIT;
    Speed__V1__Timing timing = SPEED__V1__TIMING__INIT;
    usage.prompt_tokens = (int32_t)(u->n_prompt - g->n_resumed); /* the client's prompt */
    usage.completion_tokens = (int32_t)u->n_generated;
    const speed_model_config_t *mc = &n->model->config;
    usage.kv_bytes = g->decode_only ? 0 : shipped_kv_bytes(n, mc, u, g->kv_dtype);
    usage.kv_full_depth_bytes = speed_kv_bytes_for_prompt(mc, mc->n_layers, 0, 0, u->n_prompt, g->kv_dtype);
    usage.kv_cache_bytes = u->kv_bytes;
    timing.queue_ms = u->queue_ms;
    timing.prefill_ms = u->prefill_ms;
    timing.decode_ms = u->decode_ms;
    out.usage = &usage;
    out.timing = &timing;
    const char *reason = ev->finish == SPEED_BATCH_STOP        ? "stop"
                         : ev->finish == SPEED_BATCH_LENGTH    ? "length"
                         : ev->finish == SPEED_BATCH_CANCELLED ? "cancelled"
                                                               : "error";
    out.finish_reason = (char *)reason;
    char err[256] = "";
    if (ev->finish == SPEED_BATCH_ERROR || ev->finish == SPEED_BATCH_EXPIRED) {
        snprintf(err, sizeof err, "%s", speed_status_string(ev->status));
        out.error = err;
        out.status = ev->status;
    }
    speed_node_count(n, reason);
    speed_node_observe_finish(n, ev, g->decode_only);
    speed_node_send(g->call, &out.base);
    speed_rpc_call_finish(g->call, SPEED_RPC_OK, NULL);
    gen_free(g);
}

static void gen_cancelled(void *user, speed_rpc_call_t *call) {
    (void)call;
    gen_t *g = user;
    speed_batcher_cancel(g->node->batcher, g->id);
}

static void generate_work(void *arg) {
    gen_t *g = arg;
    speed_node_t *n = g->node;
    const Speed__V1__GenerateRequest *req = g->req;
    char err[512] = "";
    speed_batch_request_t q = {.request_id = g->id, .on_event = gen_event, .user = g};
    speed_status_t st = speed_node_gen_from_proto(req->sampling, &q.gen, err, sizeof err);
    if (st == SPEED_OK && req->sampling) {
        g->logprobs = req->sampling->logprobs || req->sampling->top_logprobs > 0;
        g->n_top = req->sampling->top_logprobs;
    }
    if (st == SPEED_OK) {
        q.gen.resume_ids = req->resumed_ids;
        q.gen.n_resume = (int64_t)req->n_resumed_ids;
    }
    if (st == SPEED_OK) speed_rpc_call_on_cancel(g->call, gen_cancelled, g);
    int32_t *prompt = NULL; /* decode-only with resumed tokens: prompt_ids + resumed_ids */
    if (st == SPEED_OK && g->decode_only) {
        if (!speed_node_accepting(n)) {
            st = SPEED_ERR_CANCELLED;
            snprintf(err, sizeof err, "node is draining");
        } else {
            speed_depth_t depth;
            st = speed_node_depth_from_proto(req->speed, n->model->config.n_layers, speed_batcher_depth(n->batcher),
                                             &depth, err, sizeof err);
            int64_t n_all = (int64_t)(req->n_prompt_ids + req->n_resumed_ids);
            if (st == SPEED_OK) st = speed_node_depth_resume(&depth, g->n_resumed, n_all, err, sizeof err);
            q.depth = speed_depth_request_of(depth);
        }
        if (st == SPEED_OK && g->n_resumed > 0) {
            prompt = speed_malloc((req->n_prompt_ids + req->n_resumed_ids) * sizeof *prompt);
            if (!prompt) {
                st = SPEED_ERR_NO_MEMORY;
                snprintf(err, sizeof err, "out of memory");
            } else {
                memcpy(prompt, req->prompt_ids, req->n_prompt_ids * sizeof *prompt);
                memcpy(prompt + req->n_prompt_ids, req->resumed_ids, req->n_resumed_ids * sizeof *prompt);
            }
        }
        if (st == SPEED_OK) {
            q.prompt = prompt ? prompt : req->prompt_ids;
            q.n_prompt = (int64_t)(req->n_prompt_ids + req->n_resumed_ids);
            /* after a successful submit, events own g (and req): touch neither */
            speed_counter_t *prompt_tokens = n->m_prompt_tokens;
            double n_prompt = (double)req->n_prompt_ids;
            st = speed_batcher_submit(n->batcher, &q);
            if (st == SPEED_OK)
                speed_counter_add(prompt_tokens, n_prompt);
            else
                snprintf(err, sizeof err, "%s",
                         st == SPEED_ERR_CAPACITY ? "decode node is full" : speed_log_last_error());
        }
        speed_free(prompt); /* the batcher copied it */
    } else if (st == SPEED_OK) {
        if (req->epoch != 0 && req->epoch != n->epoch) {
            st = SPEED_ERR_PEER_PROTOCOL;
            snprintf(err, sizeof err, "reservation epoch %llu is not this node's (%llu): the node restarted",
                     (unsigned long long)req->epoch, (unsigned long long)n->epoch);
        } else {
            speed_batch_token_t first;
            speed_node_token_from_proto(req->first, &first);
            /* Never kv_ready=true here: only an authenticated notify (the reservation's nonce,
             * after the prefill node's flush) marks the KV ready. A Generate without it would
             * decode over whatever the reused blocks hold: refused. */
            char id[sizeof g->id];
            snprintf(id, sizeof id, "%s", g->id); /* g belongs to the events once started */
            st = speed_batcher_start(n->batcher, &q, &first, false);
            if (st == SPEED_ERR_NOT_FOUND)
                snprintf(err, sizeof err, "no reservation '%s' (expired or never made)", id);
            else if (st == SPEED_ERR_INVALID_ARGUMENT)
                snprintf(err, sizeof err,
                         "reservation '%s' cannot start: its KV is not ready (no prefill node delivered it: Generate "
                         "needs a completed Prefill), or it was already started, or the first token is invalid",
                         id);
            else if (st != SPEED_OK)
                snprintf(err, sizeof err, "%s", speed_status_string(st));
            if (st == SPEED_OK) speed_kv_xfer_ctx_grant_drop(n->xfer, id); /* no notify is valid now */
        }
    }
    if (st != SPEED_OK) {
        speed_node_count(n, "rejected");
        speed_node_fail(g->call, st, err);
        gen_free(g);
        return;
    }
    /* the batcher copied the prompt and stop strings; events own g from here */
}

static void on_generate(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    speed_node_t *n = user;
    Speed__V1__GenerateRequest *req = NULL;
    if (speed_proto_unpack(&speed__v1__generate_request__descriptor, data, len, (ProtobufCMessage **)&req) !=
        SPEED_OK) {
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT, "malformed GenerateRequest");
        return;
    }
    bool decode_only = req->n_prompt_ids > 0;
    if (!req->request_id || !*req->request_id || strlen(req->request_id) > SPEED_BATCH_ID_MAX ||
        (!decode_only && !req->first)) {
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT,
                        "Generate needs a request_id and either prompt_ids or the first token");
        speed_proto_free(&req->base);
        return;
    }
    if (decode_only && req->cached_tokens > 0)
        speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, req->request_id, "generate: the router expects %d cached tokens",
                  req->cached_tokens);
    gen_t *g = speed_calloc(1, sizeof *g);
    if (!g) {
        speed_proto_free(&req->base);
        speed_node_fail(call, SPEED_ERR_NO_MEMORY, "out of memory");
        return;
    }
    g->node = n;
    g->call = call;
    g->req = req;
    g->decode_only = decode_only;
    g->n_resumed = (int64_t)req->n_resumed_ids;
    /* the schema stores the speed_dtype_t or auto, which the engine resolved against the model */
    g->kv_dtype = speed_model_kv_dtype_resolve(n->model, (speed_dtype_t)n->cfg.kv_dtype);
    snprintf(g->id, sizeof g->id, "%s", req->request_id);
    if (speed_node_defer(n, generate_work, g) != SPEED_OK) {
        gen_free(g);
        speed_node_fail(call, SPEED_ERR_NO_MEMORY, "out of memory");
    }
}

int main(int argc, char **argv) {
    static const speed_node_method_t methods[] = {
        {SPEED_METHOD_DECODE_RESERVE, SPEED_RPC_UNARY, on_reserve},
        {SPEED_METHOD_DECODE_GENERATE, SPEED_RPC_STREAM, on_generate},
        {SPEED_METHOD_DECODE_CANCEL, SPEED_RPC_UNARY, speed_node_on_cancel},
    };
    return speed_node_main(&g_node, "decode", methods, (int)(sizeof methods / sizeof methods[0]), argc, argv);
}
