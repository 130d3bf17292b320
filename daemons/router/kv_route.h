/* speed_kv_route: the decode node choice of KV-aware routing (router.kv_routing affinity;
 * docs/router.md#kv-aware-routing).
 *
 * Each eligible decode node is a candidate with the number of leading prompt blocks it holds
 * (its overlap, from the prefix index, kv_index.h) and its load in KV blocks. Its cost, in
 * blocks, weighs the prefill work the request would cost there against the work the node
 * already has (after Dynamo's KV router: new prefill blocks + active decode blocks):
 *
 *   cost = w * (prompt_blocks - overlap) + (1 - w) * load_blocks,   w = router.kv_affinity_weight
 *
 * The lowest cost wins. w = 1: the longest cached prefix wins whatever the load (ties: the less
 * loaded); w = 0: the least loaded wins (ties: the longer prefix); 0.5 counts a block to
 * prefill as much as a block of work already queued.
 * Ties (equal cost) go to the longer overlap, then to fewer requests (load_requests), then to
 * the earlier candidate (the caller lists them in its rotation order, so ties rotate).
 *
 * Threading: pure functions.
 */
#ifndef SPEED_KV_ROUTE_H
#define SPEED_KV_ROUTE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    size_t node;           /* the node's pool index (not interpreted here) */
    size_t overlap_blocks; /* leading prompt blocks the node holds, <= prompt_blocks */
    double load_blocks;    /* KV blocks of work the node has (>= 0) */
    int64_t load_requests; /* running + waiting + picked since its last status (ties) */
} speed_kv_candidate_t;

/* Reasons (static strings: the `reason` label of speed_router_kv_routed_total). */
#define SPEED_KV_ROUTE_REASON_AFFINITY "affinity" /* the chosen node holds a prefix of the prompt */
#define SPEED_KV_ROUTE_REASON_BALANCE  "balance"  /* it holds none: load (or nothing) decided */

/* The best of n >= 1 candidates (an index into cands), with *reason_p (may be NULL) set to
 * one of SPEED_KV_ROUTE_REASON_*. affinity_weight is clamped to [0, 1]. Returns 0 when n is 0. */
size_t speed_kv_route_pick(double affinity_weight, size_t prompt_blocks, const speed_kv_candidate_t *cands, size_t n,
                           const char **reason_p);

/* The cost above (exposed for tests and logs). */
double speed_kv_route_cost(double affinity_weight, size_t prompt_blocks, const speed_kv_candidate_t *cand);

#endif /* SPEED_KV_ROUTE_H */
