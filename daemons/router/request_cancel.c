/* Cancellation of a request: the state other threads set (client gone, shutdown, deadline),
 * the legs in flight that a cancel must reach, and the Cancel RPC. A cancel from another
 * thread cancels the Generate stream at once and queues Cancel RPCs for the housekeeping
 * thread (server.c); the worker notices at its next step and sends Cancel too (the RPC is
 * idempotent on the nodes). */
#include "request_internal.h"

#include <stdio.h>

#include "alloc.h"
#include "log.h"

#define SUBSYS SPEED_SUBSYS_NET

void speed_router_req_cancel(rtr_req_t *r, speed_status_t why) {
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
    /* The jobs hold their nodes from here (the worker's own hold is still there: it lets go
     * only under this lock, speed_router_req_nodes_release), so a retired node's slot is not
     * given to another address before the Cancel is sent. */
    for (size_t i = 0; i < n; i++)
        speed_balance_pool_hold(speed_router_nodes_pool(r->rt->nodes, jobs[i].pool), jobs[i].node);
    pthread_mutex_unlock(&r->lock);
    for (size_t i = 0; i < n; i++) snprintf(jobs[i].id, sizeof jobs[i].id, "%s", r->id);
    if (n) speed_router_enqueue_cancel(r->rt, jobs, n);
}

void speed_router_req_cancel_later(rtr_req_t *r, speed_router_pool_id_t pool, size_t node) {
    cancel_job_t job = {.pool = pool, .node = node};
    snprintf(job.id, sizeof job.id, "%s", r->id);
    speed_balance_pool_hold(speed_router_nodes_pool(r->rt->nodes, pool), node); /* lent by the worker's hold */
    speed_router_enqueue_cancel(r->rt, &job, 1);
}

bool speed_router_req_cancelled(rtr_req_t *r, speed_status_t *why_p) {
    pthread_mutex_lock(&r->lock);
    bool c = r->cancelled;
    if (why_p) *why_p = r->cancel_status;
    pthread_mutex_unlock(&r->lock);
    return c;
}

/* Records a leg the request is about to start; false if the request was cancelled (then
 * the leg must not start). */
bool speed_router_req_leg_begin(rtr_req_t *r, speed_router_pool_id_t pool, size_t node) {
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

void speed_router_req_leg_end(rtr_req_t *r, speed_router_pool_id_t pool) {
    pthread_mutex_lock(&r->lock);
    if (pool == SPEED_ROUTER_POOL_DECODE)
        r->decode_held = false;
    else
        r->prefill_active = false;
    pthread_mutex_unlock(&r->lock);
}

void speed_router_req_nodes_release(rtr_req_t *r, speed_router_pool_id_t pool, const size_t *nodes, size_t n) {
    if (n == 0) return;
    /* Under `lock` first: a cancel from another thread lends a node to its Cancel job only
     * while the leg names it, i.e. before this hold goes. */
    pthread_mutex_lock(&r->lock);
    int *leg = pool == SPEED_ROUTER_POOL_DECODE ? &r->decode_node : &r->prefill_node;
    for (size_t i = 0; i < n; i++)
        if (*leg >= 0 && (size_t)*leg == nodes[i]) {
            *leg = -1;
            if (pool == SPEED_ROUTER_POOL_DECODE)
                r->decode_held = false;
            else
                r->prefill_active = false;
        }
    pthread_mutex_unlock(&r->lock);
    speed_balance_pool_t *bp = speed_router_nodes_pool(r->rt->nodes, pool);
    for (size_t i = 0; i < n; i++) speed_balance_pool_release(bp, nodes[i]);
}

void speed_router_cancel_send(speed_router_t *rt, speed_router_pool_id_t pool, size_t node, const char *id) {
    Speed__V1__CancelRequest m = SPEED__V1__CANCEL_REQUEST__INIT;
    m.request_id = (char *)id;
    uint8_t *buf = NULL;
    size_t len = 0;
    if (speed_proto_pack(&m.base, &buf, &len) != SPEED_OK) return;
    speed_rpc_reply_t reply = {0};
    const char *method = pool == SPEED_ROUTER_POOL_DECODE ? SPEED_METHOD_DECODE_CANCEL : SPEED_METHOD_PREFILL_CANCEL;
    speed_status_t st = speed_rpc_unary(speed_router_nodes_channel(rt->nodes, pool, node), method, buf, len,
                                        SPEED_ROUTER_CANCEL_TIMEOUT_MS, &reply);
    if (st != SPEED_OK)
        speed_log(SPEED_LOG_DEBUG, SUBSYS, id, "cancel on %s node %s: %s", speed_router_pool_name(pool),
                  speed_router_nodes_address(rt->nodes, pool, node), speed_status_string(st));
    speed_rpc_reply_cleanup(&reply);
    speed_free(buf);
}
