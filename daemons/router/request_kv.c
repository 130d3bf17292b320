/* KV-aware routing on the request's side: the prompt's block hashes, each eligible decode
 * node's overlap (the prefix index, kv_index.h) and load, the choice (kv_route.h), its count
 * (docs/router.md#kv-aware-routing). */
#include "request_internal.h"

#include "alloc.h"
#include "block_hash.h"
#include "kv_route.h"
#include "log.h"

/* More decode nodes than this are not scored (the pool holds at most 256 anyway). */
#define KV_CANDIDATES_MAX 256

bool speed_router_kv_pick(rtr_req_t *r, plan_t *pl, const size_t *tried, size_t n_tried, size_t *dnode_p) {
    speed_router_t *rt = r->rt;
    speed_balance_pool_t *dpool = speed_router_nodes_pool(rt->nodes, SPEED_ROUTER_POOL_DECODE);
    speed_kv_index_t *idx = speed_router_nodes_kv_index(rt->nodes);
    pl->cached_tokens = 0;

    speed_balance_candidate_t *bc = speed_malloc(KV_CANDIDATES_MAX * sizeof *bc);
    speed_kv_candidate_t *kc = speed_malloc(KV_CANDIDATES_MAX * sizeof *kc);
    size_t b = (size_t)speed_kv_index_block_tokens(idx);
    size_t n_blocks = b ? pl->n_ids / b : 0;
    uint64_t *hashes = n_blocks ? speed_malloc(n_blocks * sizeof *hashes) : NULL;
    if (!bc || !kc || (n_blocks && !hashes)) {
        /* no memory to score: the pool's own policy still routes the request */
        speed_free(bc);
        speed_free(kc);
        speed_free(hashes);
        return speed_balance_pool_pick(dpool, tried, n_tried, dnode_p) == SPEED_OK;
    }
    n_blocks = speed_block_hash_prompt(speed_kv_index_seed(idx), pl->ids, pl->n_ids, b, hashes, n_blocks);

    size_t n = speed_balance_pool_candidates(dpool, tried, n_tried, bc, KV_CANDIDATES_MAX);
    for (size_t i = 0; i < n; i++) {
        const speed_balance_candidate_t *c = &bc[i];
        /* requests queued there and picks since its status will each hold about this prompt;
         * requests that ended there since then hold nothing any more */
        int64_t queued = (int64_t)c->load.n_waiting + c->pending;
        double blocks = (double)c->load.active_blocks + (double)queued * (double)(n_blocks ? n_blocks : 1) -
                        (double)c->finished_blocks;
        int64_t requests = (int64_t)c->load.n_running + queued - c->finished;
        kc[i] = (speed_kv_candidate_t){
            .node = c->index,
            .overlap_blocks = speed_kv_index_overlap(idx, c->index, hashes, n_blocks),
            .load_blocks = blocks > 0 ? blocks : 0,
            .load_requests = requests > 0 ? requests : 0,
        };
    }
    bool ok = n > 0;
    const char *reason = NULL;
    size_t k = ok ? speed_kv_route_pick(rt->cfg->kv_affinity_weight, n_blocks, kc, n, &reason) : 0;
    if (ok && speed_balance_pool_take(dpool, kc[k].node) != SPEED_OK) {
        /* it went out since it was listed (down, retired): the pool's own policy picks, and
         * never a node that is not UP (the take held nothing) */
        ok = false;
        if (speed_balance_pool_pick(dpool, tried, n_tried, dnode_p) == SPEED_OK) {
            speed_free(bc);
            speed_free(kc);
            speed_free(hashes);
            return true;
        }
    }
    if (ok) {
        *dnode_p = kc[k].node;
        pl->cached_tokens = (int32_t)(kc[k].overlap_blocks * b);
        speed_counter_inc(kc[k].overlap_blocks > 0 ? rt->m_kv_affinity : rt->m_kv_balance);
        speed_counter_add(rt->m_kv_blocks_cached, (double)kc[k].overlap_blocks);
        speed_counter_add(rt->m_kv_blocks_new, (double)(n_blocks - kc[k].overlap_blocks));
        speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, r->id,
                  "kv routing: decode node %s (%s): %zu of %zu prompt blocks cached there, load %.0f blocks",
                  speed_router_nodes_address(rt->nodes, SPEED_ROUTER_POOL_DECODE, kc[k].node), reason,
                  kc[k].overlap_blocks, n_blocks, kc[k].load_blocks);
    }
    speed_free(bc);
    speed_free(kc);
    speed_free(hashes);
    return ok;
}

void speed_router_kv_completed(rtr_req_t *r, const plan_t *pl, size_t dnode) {
    speed_router_t *rt = r->rt;
    speed_kv_index_t *idx = speed_router_nodes_kv_index(rt->nodes);
    size_t b = (size_t)speed_kv_index_block_tokens(idx);
    if (rt->cfg->kv_routing == SPEED_KV_ROUTING_OFF || !idx || b == 0 || pl->n_ids < b) return;
    size_t n_blocks = pl->n_ids / b;
    uint64_t *hashes = speed_malloc(n_blocks * sizeof *hashes);
    if (!hashes) return; /* the node's own events bring them at the next poll */
    n_blocks = speed_block_hash_prompt(speed_kv_index_seed(idx), pl->ids, pl->n_ids, b, hashes, n_blocks);
    speed_kv_index_anticipate(idx, dnode, hashes, n_blocks);
    speed_free(hashes);
}

void speed_router_decode_finished(rtr_req_t *r, const plan_t *pl, size_t dnode, int64_t n_generated) {
    speed_router_t *rt = r->rt;
    int64_t b = rt->cfg->kv_block_tokens > 0 ? rt->cfg->kv_block_tokens : 1;
    int64_t tokens = (int64_t)pl->n_ids + (n_generated > 0 ? n_generated : 0);
    speed_balance_pool_finish(speed_router_nodes_pool(rt->nodes, SPEED_ROUTER_POOL_DECODE), dnode,
                              (tokens + b - 1) / b);
}
