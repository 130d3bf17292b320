/* The request worker's flow: tokenize, check the context length, admit, route, then pick
 * decode nodes until one serves the request (Decode.Reserve + Prefill.Prefill with retries
 * on other prefill nodes for a disaggregated route; then the Generate leg, request_relay.c;
 * a stream whose decode node dies mid-way is re-issued, request_migrate.c).
 *
 * One thread per request (router.h). Everything that can block (admission, RPCs) happens
 * here, never on an HTTP thread. Cancellation (client gone, shutdown) comes from other
 * threads through speed_router_req_cancel (request_cancel.c); the worker notices at its next
 * step and cleans up. Answers go out through request_http.c, calls through request_rpc.c. */
#include "request_internal.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"

#define SUBSYS SPEED_SUBSYS_NET

/* ---- the request flow ------------------------------------------------------------------- */

/* Decode.Reserve + Prefill.Prefill (with retries on other prefill nodes). On success
 * *first_p (owned by *prefill_p) and *epoch_p are set and SPEED_OK returned; otherwise the
 * client was answered (or RELAY_RETRY-style: SPEED_ERR_PEER_UNREACHABLE with *try_next set
 * means the decode node failed and another may be tried; SPEED_ERR_CAPACITY with *try_next
 * means it had no room). */
/* The prefill nodes one run_prefill picked (each held until run_prefill_held releases them). */
typedef struct {
    size_t node[17];
    size_t n;
} prefill_tried_t;

static speed_status_t run_prefill(rtr_req_t *r, plan_t *pl, size_t dnode, bool *try_next,
                                  Speed__V1__PrefillReply **prefill_p, uint64_t *epoch_p, prefill_tried_t *pt) {
    speed_router_t *rt = r->rt;
    *try_next = false;
    *prefill_p = NULL;

    Speed__V1__ReserveRequest rq = SPEED__V1__RESERVE_REQUEST__INIT;
    rq.request_id = r->id;
    rq.n_prompt = (int32_t)pl->n_ids;
    /* a migrated request: room for what is left to generate; its resumed tokens join the tail */
    rq.max_tokens = pl->sampling.max_tokens - (int32_t)pl->n_resume;
    if (rq.max_tokens < 1) rq.max_tokens = 1;
    rq.resume_tokens = (int32_t)pl->n_resume;
    rq.cached_tokens = pl->cached_tokens;
    rq.n_prompt_ids = pl->n_ids; /* for the decode node's prefix cache and its cache events */
    rq.prompt_ids = pl->ids;
    if (pl->has_speed) rq.speed = &pl->speed;
    if (!speed_router_req_leg_begin(r, SPEED_ROUTER_POOL_DECODE, dnode)) {
        speed_router_req_fail_cancelled(r);
        return SPEED_ERR_CANCELLED;
    }
    call_result_t res;
    speed_router_req_call_unary(r, SPEED_ROUTER_POOL_DECODE, dnode, SPEED_METHOD_DECODE_RESERVE, &rq.base,
                                SPEED_ROUTER_RESERVE_TIMEOUT_MS, &speed__v1__reserve_reply__descriptor, &res);
    if (res.st != SPEED_OK) {
        speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        /* No reply (a timeout, a broken call) or a node-level error: the node may have made the
         * reservation all the same (a slow node answers after the router gave up). Cancel it
         * in the background rather than leave it stranded until its lease; the node answers
         * "not found" when there is nothing. A refusal (no room, a bad request) reserved
         * nothing. */
        if (res.code != SPEED_RPC_RESOURCE_EXHAUSTED && !speed_router_code_is_request_error(res.code))
            speed_router_req_cancel_later(r, SPEED_ROUTER_POOL_DECODE, dnode);
        if (speed_router_req_cancelled(r, NULL)) {
            speed_router_req_fail_cancelled(r);
            return SPEED_ERR_CANCELLED;
        }
        if (res.code == SPEED_RPC_RESOURCE_EXHAUSTED) {
            *try_next = true;
            return SPEED_ERR_CAPACITY;
        }
        if (res.code == SPEED_RPC_CANCELLED) {
            /* The node refused because it drains (our own cancel was handled above): it is
             * not failed, only out of new picks until a health poll finds it serving again. */
            speed_log(SPEED_LOG_INFO, SUBSYS, r->id, "decode node %s: %s; trying another",
                      speed_router_nodes_address(rt->nodes, SPEED_ROUTER_POOL_DECODE, dnode), res.message);
            speed_balance_pool_set_draining(speed_router_nodes_pool(rt->nodes, SPEED_ROUTER_POOL_DECODE), dnode, true);
            *try_next = true;
            return SPEED_ERR_PEER_UNREACHABLE;
        }
        if (res.code == -1 || res.st == SPEED_ERR_TIMEOUT) {
            if (speed_router_req_remaining_ms(r) <= 0) {
                speed_router_req_fail_status(r, SPEED_ERR_TIMEOUT,
                                             "the request took longer than router.request_timeout_ms", 0);
                return SPEED_ERR_TIMEOUT;
            }
        }
        if (res.code == -1) {
            speed_router_req_fail_status(r, res.st, NULL, 0);
            return res.st;
        }
        if (speed_router_code_is_request_error(res.code)) {
            speed_openai_error_t err;
            speed_openai_error_from_status(res.st, res.message, &err);
            speed_router_req_fail(r, &err, 0);
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
        speed_router_cancel_send(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
        speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        speed_router_nodes_fail(rt->nodes, SPEED_ROUTER_POOL_DECODE, dnode, r->id,
                                "Reserve reply without a KV descriptor");
        *try_next = true;
        return SPEED_ERR_PEER_PROTOCOL;
    }
    *epoch_p = rr->kv->epoch;
    if (rr->cached_tokens > 0) /* the descriptor's layers start past them: the prefill node ships the rest */
        speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, r->id, "reserve: %d prompt tokens cached on the decode node",
                  (int)rr->cached_tokens);
    /* The descriptor lets a prefill node put for lease_ms counted from when it receives it. A
     * retry hands the same blocks to another prefill node: it gets only what is left of that
     * time, measured from the Reserve reply, so no attempt puts past the first one's window
     * (the decode node frees the blocks at its own lease end and may give them to a running
     * request; a fresh window on a late retry wrote into them). */
    int64_t t_reserved = speed_clock_mono_ms();
    int64_t put_window_ms = rr->kv->lease_ms;

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
    pq.resume_tokens = (int32_t)pl->n_resume;

    speed_balance_pool_t *ppool = speed_router_nodes_pool(rt->nodes, SPEED_ROUTER_POOL_PREFILL);
    size_t *tried = pt->node;
    size_t n_tried = 0;
    int64_t attempts = 1 + rt->cfg->prefill_retries;
    char last_error[320] = "no prefill node is available";
    speed_status_t last_st = SPEED_ERR_PEER_UNREACHABLE;
    bool capacity = false;
    int n_aborted = 0; /* attempts whose KV transfer failed (ABORTED): the decode side's fault */
    for (int64_t a = 0; a < attempts && n_tried < sizeof pt->node / sizeof pt->node[0]; a++) {
        if (a > 0 && put_window_ms > 0) {
            int64_t left = put_window_ms - (speed_clock_mono_ms() - t_reserved);
            if (left < SPEED_ROUTER_MIN_PUT_WINDOW_MS) {
                size_t l = strlen(last_error);
                snprintf(last_error + l, sizeof last_error - l,
                         "; the reservation's put window ended before another prefill node could be tried");
                break;
            }
            rr->kv->lease_ms = (uint32_t)left;
        }
        size_t pnode;
        if (speed_balance_pool_pick(ppool, tried, n_tried, &pnode) != SPEED_OK) break;
        tried[n_tried++] = pnode;
        pt->n = n_tried; /* held: released by the caller, whatever happens below */
        if (a > 0) speed_counter_inc(rt->m_prefill_retries);
        if (!speed_router_req_leg_begin(r, SPEED_ROUTER_POOL_PREFILL, pnode)) break;
        speed_router_req_call_unary(r, SPEED_ROUTER_POOL_PREFILL, pnode, SPEED_METHOD_PREFILL_PREFILL, &pq.base, 0,
                                    &speed__v1__prefill_reply__descriptor, &res);
        speed_router_req_leg_end(r, SPEED_ROUTER_POOL_PREFILL);
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
        if (speed_router_req_cancelled(r, NULL)) break;
        last_st = res.st;
        snprintf(last_error, sizeof last_error, "prefill node %s: %s %s",
                 speed_router_nodes_address(rt->nodes, SPEED_ROUTER_POOL_PREFILL, pnode),
                 res.code >= 0 ? speed_rpc_code_name(res.code) : speed_status_string(res.st), res.message);
        if (res.code == -1) {
            if (res.st == SPEED_ERR_TIMEOUT) break; /* the request's own deadline */
            break;                                  /* our own failure (memory) */
        }
        if (speed_router_code_is_request_error(res.code)) break;
        if (res.code == SPEED_RPC_DEADLINE_EXCEEDED && speed_router_req_remaining_ms(r) <= 0) break;
        if (res.code == SPEED_RPC_RESOURCE_EXHAUSTED) {
            capacity = true;
            continue;
        }
        if (res.code == SPEED_RPC_ABORTED) n_aborted++;
        if (speed_router_code_is_node_failure(res.code))
            speed_router_nodes_fail(rt->nodes, SPEED_ROUTER_POOL_PREFILL, pnode, r->id, last_error);
        else
            speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "%s; trying another prefill node", last_error);
        /* The node may hold half a prefill of this request. */
        if (res.code != SPEED_RPC_UNAVAILABLE) speed_router_cancel_send(rt, SPEED_ROUTER_POOL_PREFILL, pnode, r->id);
    }
    if (*prefill_p) {
        speed_proto_free(&rr->base);
        return SPEED_OK;
    }
    /* No first token. A prefill cut short by a cancel or the request's deadline may still be
     * pushing KV: Prefill.Cancel first (its node stops before the next layer and tells the
     * decode node, whose fence then lifts), then free the reservation. */
    speed_proto_free(&rr->base);
    bool cut_short =
        speed_router_req_cancelled(r, NULL) || last_st == SPEED_ERR_TIMEOUT || res.code == SPEED_RPC_DEADLINE_EXCEEDED;
    if (n_tried && cut_short) speed_router_cancel_send(rt, SPEED_ROUTER_POOL_PREFILL, tried[n_tried - 1], r->id);
    speed_router_cancel_send(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
    speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
    if (speed_router_req_cancelled(r, NULL)) {
        speed_router_req_fail_cancelled(r);
        return SPEED_ERR_CANCELLED;
    }
    if (last_st == SPEED_ERR_TIMEOUT && speed_router_req_remaining_ms(r) <= 0) {
        speed_router_req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
        return SPEED_ERR_TIMEOUT;
    }
    if (speed_router_code_is_request_error(res.code)) {
        speed_openai_error_t err;
        speed_openai_error_from_status(res.st, res.message, &err);
        speed_router_req_fail(r, &err, 0);
        return res.st;
    }
    if (n_aborted > 0 && (size_t)n_aborted == n_tried && !capacity) {
        /* Every attempt failed in the KV transfer into this decode node (it froze, died, or its
         * link did): the prefill nodes are fine. Start over on another decode node with a new
         * reservation, as for a failed Reserve, without marking this one down (its health poll
         * decides that). */
        speed_log(SPEED_LOG_WARN, SUBSYS, r->id,
                  "KV transfer into decode node %s failed in %zu attempt(s): %s; "
                  "trying another decode node",
                  speed_router_nodes_address(rt->nodes, SPEED_ROUTER_POOL_DECODE, dnode), n_tried, last_error);
        *try_next = true;
        return SPEED_ERR_PEER_UNREACHABLE;
    }
    speed_log(SPEED_LOG_WARN, SUBSYS, r->id, "prefill failed after %zu attempt(s): %s", n_tried, last_error);
    char msg[400];
    snprintf(msg, sizeof msg, "prefill failed: %s", last_error);
    speed_router_req_fail_status(r, capacity ? SPEED_ERR_CAPACITY : SPEED_ERR_PEER_UNREACHABLE, msg,
                                 capacity ? speed_admission_retry_after(rt->adm) : 0);
    return SPEED_ERR_PEER_UNREACHABLE;
}

/* run_prefill, then the prefill nodes it picked are released (every path: they are named by
 * its log lines and Cancels only until it returns). */
static speed_status_t run_prefill_held(rtr_req_t *r, plan_t *pl, size_t dnode, bool *try_next,
                                       Speed__V1__PrefillReply **prefill_p, uint64_t *epoch_p) {
    prefill_tried_t pt = {.n = 0};
    speed_status_t st = run_prefill(r, pl, dnode, try_next, prefill_p, epoch_p, &pt);
    speed_router_req_nodes_release(r, SPEED_ROUTER_POOL_PREFILL, pt.node, pt.n);
    return st;
}

/* Picks a decode node not in tried[] (by router.decode_policy, or by KV-aware routing:
 * request_kv.c); when none is up and `wait`, polls for up to SPEED_ROUTER_NODE_WAIT_MS (within
 * the request's deadline, until it is cancelled). */
static bool pick_decode(rtr_req_t *r, plan_t *pl, speed_balance_pool_t *dpool, const size_t *tried, size_t n_tried,
                        bool wait, size_t *dnode_p) {
    int64_t waited = 0;
    bool kv = r->rt->cfg->kv_routing != SPEED_KV_ROUTING_OFF;
    for (;;) {
        if (kv ? speed_router_kv_pick(r, pl, tried, n_tried, dnode_p)
               : speed_balance_pool_pick(dpool, tried, n_tried, dnode_p) == SPEED_OK) {
            if (waited > 0)
                speed_log(SPEED_LOG_INFO, SUBSYS, r->id, "a decode node is up again after %lld ms", (long long)waited);
            return true;
        }
        /* worth waiting only while some node is not up (it may come back); nodes that are up
         * but were tried already will not change their answer */
        speed_router_nodes_t *nodes = r->rt->nodes;
        bool some_down = speed_router_nodes_n_up(nodes, SPEED_ROUTER_POOL_DECODE) <
                         speed_router_nodes_count(nodes, SPEED_ROUTER_POOL_DECODE);
        if (!wait || !some_down || waited >= SPEED_ROUTER_NODE_WAIT_MS || speed_router_req_remaining_ms(r) <= 50 ||
            speed_router_req_cancelled(r, NULL))
            return false;
        speed_clock_sleep_ms(50);
        waited += 50;
    }
}

/* Picks decode nodes until one serves the request or none is left; a stream whose decode
 * node dies after its first token is re-issued (request_migrate.c) and goes on here. */
static void run_routed(rtr_req_t *r, plan_t *pl, speed_route_kind_t kind) {
    speed_router_t *rt = r->rt;
    speed_balance_pool_t *dpool = speed_router_nodes_pool(rt->nodes, SPEED_ROUTER_POOL_DECODE);
    size_t tried[64];
    size_t n_tried = 0;
    bool capacity = false;
    bool node_failed = false; /* a decode node failed under this request: wait for one if none is up */
    relay_t rl;
    memset(&rl, 0, sizeof rl);
    rl.pool = SPEED_ROUTER_POOL_DECODE;
    rl.n_prompt = (int64_t)pl->n_ids;
    rl.decode_only = kind == SPEED_ROUTE_DECODE_ONLY;

    for (;;) {
        if (speed_router_req_cancelled(r, NULL)) {
            speed_router_req_fail_cancelled(r);
            break;
        }
        size_t dnode;
        if (n_tried >= sizeof tried / sizeof tried[0] ||
            !pick_decode(r, pl, dpool, tried, n_tried, node_failed, &dnode)) {
            /* No KV room anywhere is the cluster's state, not the client's rate: 503 with
             * Retry-After (the status table would say 429). */
            speed_openai_error_t err;
            speed_openai_error_set(&err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, "service_unavailable", "%s",
                                   capacity ? "no decode node has room for this request now"
                                            : "no decode node is available");
            speed_router_req_fail(r, &err, speed_admission_retry_after(rt->adm));
            break;
        }
        tried[n_tried++] = dnode;
        rl.node = dnode;
        /* The chosen node holds all of the prompt but a short suffix (its cache events, the
         * router's index): it computes the suffix itself, a decode-local prefill, cheaper than a
         * prefill node's full prompt and transfer (router.decode_local_max_new_tokens;
         * docs/prefix-cache.md#the-threshold). Not for a migrated request (its resumed ids). */
        speed_route_kind_t attempt = kind;
        int64_t local_max = rt->cfg->decode_local_max_new_tokens;
        if (kind == SPEED_ROUTE_DISAGGREGATED && local_max > 0 && pl->cached_tokens > 0 && pl->n_resume == 0 &&
            (int64_t)pl->n_ids - pl->cached_tokens <= local_max) {
            attempt = SPEED_ROUTE_DECODE_ONLY;
            speed_counter_inc(rt->m_decode_local);
        }
        rl.decode_only = attempt == SPEED_ROUTE_DECODE_ONLY;

        Speed__V1__GenerateRequest gm = SPEED__V1__GENERATE_REQUEST__INIT;
        gm.request_id = r->id;
        gm.sampling = &pl->sampling;
        gm.cached_tokens = pl->cached_tokens;
        Speed__V1__PrefillReply *prefill = NULL;
        /* a migrated request: the tokens the client has, for the node's text pipeline */
        gm.n_resumed_ids = (size_t)pl->n_resume;
        gm.resumed_ids = pl->n_resume ? pl->ids + pl->n_client : NULL;
        if (attempt == SPEED_ROUTE_DECODE_ONLY) {
            gm.n_prompt_ids = pl->n_client; /* the node appends the resumed ids */
            gm.prompt_ids = pl->ids;
            if (pl->has_speed) gm.speed = &pl->speed;
        } else {
            bool try_next = false;
            uint64_t epoch = 0;
            speed_status_t st = run_prefill_held(r, pl, dnode, &try_next, &prefill, &epoch);
            if (st != SPEED_OK) {
                if (try_next) {
                    capacity = capacity || st == SPEED_ERR_CAPACITY;
                    node_failed = node_failed || st != SPEED_ERR_CAPACITY;
                    if (st != SPEED_ERR_CAPACITY) speed_counter_inc(rt->m_decode_retries);
                    continue;
                }
                break; /* answered */
            }
            gm.first = prefill->first;
            gm.epoch = epoch;
            rl.kv_bytes_sent = prefill->kv_bytes_sent;
        }
        rl.capacity = false; /* this attempt's */
        relay_result_t rr = speed_router_relay_generate(r, &rl, &gm);
        speed_proto_free(prefill ? &prefill->base : NULL);
        if (rr == RELAY_MIGRATE) {
            if (!speed_router_migrate(r, &rl, pl, &kind)) break; /* answered */
            capacity = false;
            node_failed = true;
            /* a new attempt: every node may serve it again once up (the dead one is down until
             * its health poll finds it serving, e.g. restarted); the ones tried so far are let go */
            speed_router_req_nodes_release(r, SPEED_ROUTER_POOL_DECODE, tried, n_tried);
            n_tried = 0;
            continue;
        }
        if (rr == RELAY_RETRY) {
            capacity = capacity || rl.capacity;
            node_failed = node_failed || !rl.capacity;
            if (!rl.capacity) speed_counter_inc(rt->m_decode_retries);
            /* The reservation (if any) went with the node, or was refused: start over. */
            speed_router_cancel_send(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
            speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
            continue;
        }
        if (rl.success) {
            speed_counter_add(rt->m_kv_bytes, (double)(rl.usage.kv_bytes > 0 ? rl.usage.kv_bytes : 0));
            double t_end = speed_clock_mono_s();
            speed_histogram_observe(rt->m_e2e, t_end - r->t_arrival);
            if (rl.n_generated > 1 && rl.t_first_token > 0)
                speed_histogram_observe(rt->m_tpot, (t_end - rl.t_first_token) / (double)(rl.n_generated - 1));
            /* before the answer: a client's next turn may follow at once */
            speed_router_kv_completed(r, pl, dnode);
            speed_router_decode_finished(r, pl, dnode, rl.n_generated);
            speed_router_relay_answer(r, &rl);
        } else {
            /* The decode node may still hold the sequence (error, cancel, client gone). */
            pthread_mutex_lock(&r->lock);
            bool held = r->decode_held;
            pthread_mutex_unlock(&r->lock);
            if (held) speed_router_cancel_send(rt, SPEED_ROUTER_POOL_DECODE, dnode, r->id);
            speed_router_decode_finished(r, pl, dnode, rl.n_generated);
            speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
        }
        break;
    }
    if (rl.migrating) speed_router_count_migration(r, "failed"); /* the re-issue never got going */
    speed_router_relay_cleanup(&rl);
    speed_router_req_nodes_release(r, SPEED_ROUTER_POOL_DECODE, tried, n_tried); /* each pick since a migration */
}

static void run_request(rtr_req_t *r) {
    speed_router_t *rt = r->rt;
    const speed_openai_request_t *q = r->req;
    speed_openai_error_t err;
    speed_tok_ids_t ids = {0};

    speed_status_t st = speed_openai_request_tokenize(q, rt->p.tok, &ids, &err);
    if (st != SPEED_OK) {
        speed_router_req_fail(r, &err, 0);
        return;
    }
    int64_t max_tokens = 0;
    st = speed_openai_check_length(q, (int64_t)ids.n, rt->p.n_ctx, &max_tokens, &err);
    if (st != SPEED_OK) {
        speed_tok_ids_free(&ids);
        speed_router_req_fail(r, &err, 0);
        return;
    }
    if (q->max_tokens < 0 && max_tokens > rt->cfg->default_max_tokens) max_tokens = rt->cfg->default_max_tokens;

    /* The key's share of the KV: the router's estimate of what the nodes will reserve. */
    int64_t kv_tokens = (int64_t)ids.n + max_tokens;
    if (!speed_router_key_kv_reserve(r->key, kv_tokens, &err)) {
        speed_tok_ids_free(&ids);
        speed_router_count_key_limited(rt, r->key, "kv_tokens");
        speed_router_req_fail(r, &err, 1);
        return;
    }
    r->key_kv_tokens = r->key ? kv_tokens : 0;

    double t_queued = speed_clock_mono_s();
    st = speed_admission_acquire(rt->adm);
    if (st == SPEED_OK) speed_histogram_observe(rt->m_queue_wait, speed_clock_mono_s() - t_queued);
    if (st != SPEED_OK) {
        speed_tok_ids_free(&ids);
        if (st == SPEED_ERR_CAPACITY)
            speed_router_req_fail_status(r, st, "too many requests; retry later", speed_admission_retry_after(rt->adm));
        else if (st == SPEED_ERR_TIMEOUT)
            speed_router_req_fail_status(r, st, "the request waited too long in the router's queue",
                                         speed_admission_retry_after(rt->adm));
        else
            speed_router_req_fail_status(r, SPEED_ERR_CANCELLED, "the server is shutting down", 0);
        return;
    }
    r->admitted = true;
    pthread_mutex_lock(&r->http_lock);
    r->running = true;
    r->last_write_ms = speed_clock_mono_ms();
    pthread_mutex_unlock(&r->http_lock);

    speed_route_decision_t d =
        speed_route_decide(&rt->route, (int64_t)ids.n, speed_router_nodes_n_up(rt->nodes, SPEED_ROUTER_POOL_PREFILL));
    r->route_label = speed_route_kind_name(d.kind);
    {
        const char *values[] = {r->route_label, d.reason};
        speed_counter_t *c = NULL;
        if (speed_counter_labels(rt->m_route_decisions, values, &c) == SPEED_OK) speed_counter_inc(c);
    }
    speed_counter_add(rt->m_prompt_tokens, (double)ids.n);
    speed_log(SPEED_LOG_DEBUG, SUBSYS, r->id, "%zu prompt tokens, max_tokens %lld, route %s (%s)", ids.n,
              (long long)max_tokens, r->route_label, d.reason);
    if (!d.ok) {
        speed_router_req_fail_status(r, SPEED_ERR_PEER_UNREACHABLE, "no prefill node is available", 1);
    } else {
        plan_t pl;
        memset(&pl, 0, sizeof pl);
        pl.ids = ids.ids;
        pl.n_ids = ids.n;
        pl.n_client = ids.n;
        pl.max_tokens = max_tokens;
        speed_router_sampling_params_fill(q, max_tokens, &pl.sampling);
        Speed__V1__SpeedParams sp = SPEED__V1__SPEED_PARAMS__INIT;
        pl.speed = sp;
        if (q->speed.present) {
            speed_router_speed_params_fill(&q->speed, &pl.speed);
            pl.has_speed = true;
        }
        run_routed(r, &pl, d.kind);
        speed_free(pl.owned);
    }
    speed_router_req_release_slot(r); /* normally done as the answer completed */
    speed_tok_ids_free(&ids);
}

void speed_router_req_free(rtr_req_t *r) {
    if (!r) return;
    speed_openai_request_destroy(r->req);
    pthread_mutex_destroy(&r->lock);
    pthread_mutex_destroy(&r->http_lock);
    speed_free(r);
}

void *speed_router_worker_main(void *arg) {
    rtr_req_t *r = arg;
    speed_router_t *rt = r->rt;
    r->route_label = "none";
    r->http_status = 500;
    run_request(r);
    speed_router_key_kv_release(r->key, r->key_kv_tokens);
    r->key_kv_tokens = 0;

    /* Whatever happened, the client gets an answer and the stream reference goes. */
    pthread_mutex_lock(&r->http_lock);
    bool open = r->stream != NULL;
    pthread_mutex_unlock(&r->http_lock);
    if (open) {
        speed_log(SPEED_LOG_ERROR, SUBSYS, r->id, "request ended without an answer");
        speed_router_req_fail_status(r, SPEED_ERR_INTERNAL, NULL, 0);
    }
    speed_router_req_release_slot(r);
    speed_router_req_count(r);

    pthread_mutex_lock(&rt->lock);
    if (r->prev)
        r->prev->next = r->next;
    else
        rt->reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    pthread_mutex_unlock(&rt->lock);
    speed_router_req_free(r);

    pthread_mutex_lock(&rt->lock);
    if (--rt->n_workers == 0) pthread_cond_broadcast(&rt->idle_cond);
    pthread_mutex_unlock(&rt->lock);
    return NULL;
}
