/* speed_kv_route: the cost of KV-aware routing (see kv_route.h). */
#include "kv_route.h"

#include <math.h>
#include <stdbool.h>

static double clamp_weight(double w) { return !(w >= 0) ? 0 : w > 1 ? 1 : w; }

double speed_kv_route_cost(double affinity_weight, size_t prompt_blocks, const speed_kv_candidate_t *c) {
    double w = clamp_weight(affinity_weight);
    size_t overlap = c->overlap_blocks < prompt_blocks ? c->overlap_blocks : prompt_blocks;
    double load = c->load_blocks > 0 ? c->load_blocks : 0;
    return w * (double)(prompt_blocks - overlap) + (1 - w) * load;
}

size_t speed_kv_route_pick(double affinity_weight, size_t prompt_blocks, const speed_kv_candidate_t *cands, size_t n,
                           const char **reason_p) {
    size_t best = 0;
    double best_cost = 0;
    for (size_t i = 0; i < n; i++) {
        double cost = speed_kv_route_cost(affinity_weight, prompt_blocks, &cands[i]);
        if (i == 0) {
            best_cost = cost;
            continue;
        }
        const speed_kv_candidate_t *c = &cands[i], *b = &cands[best];
        /* costs are sums of small integers times w: a relative epsilon tells a real tie */
        double eps = 1e-9 * (1 + fabs(best_cost));
        bool better = cost < best_cost - eps;
        if (!better && fabs(cost - best_cost) <= eps)
            better = c->overlap_blocks > b->overlap_blocks ||
                     (c->overlap_blocks == b->overlap_blocks && c->load_requests < b->load_requests);
        if (better) {
            best = i;
            best_cost = cost;
        }
    }
    if (reason_p)
        *reason_p = n > 0 && cands[best].overlap_blocks > 0 && prompt_blocks > 0 ? SPEED_KV_ROUTE_REASON_AFFINITY
                                                                                 : SPEED_KV_ROUTE_REASON_BALANCE;
    return best;
}
