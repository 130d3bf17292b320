/* Request migration: a stream whose decode node died after the client got tokens is
 * re-issued on a healthy path and goes on in the same client stream (docs/router.md
 * #request-migration).
 *
 * The re-issue's prompt is the client's prompt followed by every token id the router relayed
 * (request_relay.c keeps them), marked as resumed: the nodes add them to the tail T, so they
 * run at full depth as generated tokens did (SPEED keeps only anchors and the tail of a prompt
 * deep), and the decode node feeds them silently through its text pipeline and skips their
 * random draws, so the continuation is the one the dead node would have produced (bit for
 * bit with engine.batch_invariant). The request keeps its admission slot, its per-key counts
 * and its deadline: to the client and to the limits it is still one request. */
#include "request_internal.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

#define SUBSYS SPEED_SUBSYS_NET

bool speed_router_migrate(rtr_req_t *r, relay_t *rl, plan_t *pl, speed_route_kind_t *kind_p) {
    speed_router_t *rt = r->rt;
    /* The failed node is marked down and stays out of this request's picks; if it is alive
     * after all (a broken stream), the Cancel frees what it holds. Queued for the
     * housekeeping thread: a dead node must not hold up the re-issue. */
    pthread_mutex_lock(&r->lock);
    bool held = r->decode_held;
    pthread_mutex_unlock(&r->lock);
    if (held) speed_router_req_cancel_later(r, SPEED_ROUTER_POOL_DECODE, rl->node);
    speed_router_req_leg_end(r, SPEED_ROUTER_POOL_DECODE);
    rl->n_migrations++;
    rl->migrating = true;

    size_t n = pl->n_client + rl->n_gen_ids;
    int32_t *ids = speed_malloc(n * sizeof *ids);
    if (!ids) {
        speed_router_req_fail_status(r, SPEED_ERR_NO_MEMORY, NULL, 0);
        return false;
    }
    memcpy(ids, pl->ids, pl->n_client * sizeof *ids);
    memcpy(ids + pl->n_client, rl->gen_ids, rl->n_gen_ids * sizeof *ids);
    speed_free(pl->owned);
    pl->owned = pl->ids = ids;
    pl->n_ids = n;
    pl->n_resume = (int64_t)rl->n_gen_ids;

    speed_route_decision_t d =
        speed_route_decide(&rt->route, (int64_t)n, speed_router_nodes_n_up(rt->nodes, SPEED_ROUTER_POOL_PREFILL));
    speed_log(SPEED_LOG_INFO, SUBSYS, r->id,
              "decode node %s failed after %zu tokens: re-issuing (migration %lld of at most %lld), route %s (%s)",
              speed_router_nodes_address(rt->nodes, rl->pool, rl->node), rl->n_gen_ids, (long long)rl->n_migrations,
              (long long)rt->cfg->max_migrations, speed_route_kind_name(d.kind), d.reason);
    if (!d.ok) {
        speed_router_req_fail_status(r, SPEED_ERR_PEER_UNREACHABLE,
                                     "the decode node failed during generation and no prefill node is available", 0);
        return false;
    }
    *kind_p = d.kind;
    rl->decode_only = d.kind == SPEED_ROUTE_DECODE_ONLY;
    rl->kv_bytes_sent = 0;
    return true;
}
