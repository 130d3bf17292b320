/* daemons/node/node_cache.c: the decode node's side of the prefix cache, without a daemon.
 *   - the engine cache's events go to the journal: stored hashes join the set, evicted ones
 *     leave it (a reader's snapshot lists exactly the rest), counted in
 *     speed_node_cache_events_total{kind};
 *   - speed_node_cache_observe_step moves the speed_prefix_cache_*_total counters by what the
 *     cache's stats moved since the last step (never backwards). */
#include <string.h>

#include "check.h"
#include "metrics.h"
#include "node.h"

static bool in_reply(const speed_cache_journal_reply_t *r, uint64_t h) {
    for (size_t i = 0; i < r->n; i++)
        if (r->hashes[i] == h) return true;
    return false;
}

int main(void) {
    static speed_node_t n; /* zeroed: only what node_cache.c reads is set */
    n.epoch = 7;
    n.cfg.cache_events_journal = 64;
    n.cfg.cache_events_max_blocks = 64;
    n.cfg.cache_events_max_per_reply = 64;
    n.cfg.kv_block_tokens = 16;
    snprintf(n.model_id, sizeof n.model_id, "model");
    CHECK_INT_EQ(speed_metrics_create(&n.metrics), SPEED_OK);
    CHECK_INT_EQ(speed_node_cache_init(&n), SPEED_OK);
    if (!n.cache_journal) return CHECK_DONE();

    const uint64_t stored[] = {11, 12, 13}, evicted[] = {12};
    speed_node_cache_on_event(&n, SPEED_PREFIX_EVENT_STORED, stored, 3);
    speed_node_cache_on_event(&n, SPEED_PREFIX_EVENT_EVICTED, evicted, 1);
    speed_node_cache_on_event(&n, SPEED_PREFIX_EVENT_STORED, NULL, 0); /* nothing */
    speed_cache_journal_reply_t r;
    CHECK_INT_EQ(speed_cache_journal_read(n.cache_journal, 0, 0, 64, &r), SPEED_OK);
    CHECK(r.snapshot);
    CHECK_INT_EQ(r.n, 2);
    CHECK(in_reply(&r, 11) && in_reply(&r, 13) && !in_reply(&r, 12));
    speed_cache_journal_reply_cleanup(&r);
    /* the events in order: three stored, one evicted */
    CHECK_INT_EQ(speed_cache_journal_read(n.cache_journal, 7, 2, 64, &r), SPEED_OK); /* events 2.. */
    CHECK(!r.snapshot);
    CHECK_INT_EQ(r.n, 3);
    if (r.n == 3) CHECK(r.kinds[2] == SPEED_CACHE_EVENT_EVICTED && r.hashes[2] == 12);
    speed_cache_journal_reply_cleanup(&r);
    CHECK_NEAR(speed_counter_get(n.m_cache_stored), 3, 0);
    CHECK_NEAR(speed_counter_get(n.m_cache_evicted), 1, 0);

    speed_prefix_cache_stats_t s = {.n_lookups = 4, .n_hits = 3, .n_hit_tokens = 100, .n_evicted = 1};
    speed_node_cache_observe_step(&n, &s);
    s.n_lookups = 6;
    s.n_hit_tokens = 130;
    speed_node_cache_observe_step(&n, &s);
    speed_node_cache_observe_step(&n, &s); /* no change: nothing added */
    CHECK_NEAR(speed_counter_get(n.m_prefix_lookups), 6, 0);
    CHECK_NEAR(speed_counter_get(n.m_prefix_hits), 3, 0);
    CHECK_NEAR(speed_counter_get(n.m_prefix_tokens_saved), 130, 0);
    CHECK_NEAR(speed_counter_get(n.m_prefix_evictions), 1, 0);

    speed_node_cache_cleanup(&n);
    speed_metrics_destroy(n.metrics);
    return CHECK_DONE();
}
