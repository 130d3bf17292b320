/* speed_node: the decode node's cache event journal and its part of Node.Status (KV-aware
 * routing; see node.h and cache_journal.h). */
#include <string.h>

#include "alloc.h"
#include "block_hash.h"
#include "log.h"
#include "node.h"

static double g_prefix_blocks(void *user) {
    speed_node_t *n = user;
    speed_batcher_stats_t s;
    speed_batcher_stats(n->batcher, &s);
    return (double)s.prefix.n_blocks;
}

speed_status_t speed_node_cache_init(speed_node_t *n) {
    speed_cache_journal_params_t p = {
        .instance = n->epoch ? n->epoch : 1,
        .n_events_max = (size_t)n->cfg.cache_events_journal,
        .n_blocks_max = (size_t)n->cfg.cache_events_max_blocks,
    };
    SPEED_CHECK(speed_cache_journal_create(&p, &n->cache_journal));
    /* the router derives the same seed from the same two values (router/main.c) */
    n->cache_seed = speed_block_hash_seed(n->model_id, (int32_t)n->cfg.kv_block_tokens);
    static const char *const kind[] = {"kind"};
    speed_counter_t *events;
    SPEED_CHECK(
        speed_counter_register(n->metrics, "speed_node_cache_events_total",
                               "Prefix-cache events this decode node journaled for the router: blocks stored "
                               "or evicted, and stored blocks its bounded set refused (cache_events.max_blocks)",
                               kind, 1, &events));
    SPEED_CHECK(speed_counter_labels(events, (const char *[]){"stored"}, &n->m_cache_stored));
    SPEED_CHECK(speed_counter_labels(events, (const char *[]){"evicted"}, &n->m_cache_evicted));
    SPEED_CHECK(speed_counter_labels(events, (const char *[]){"refused"}, &n->m_cache_refused));
    SPEED_CHECK(speed_counter_register(n->metrics, "speed_node_cache_snapshots_total",
                                       "Whole sets of block hashes sent to a router that could not continue from its "
                                       "cursor (new router, node restart, too far behind)",
                                       NULL, 0, &n->m_cache_snapshots));
    /* the engine's prefix cache (decode.prefix_cache_blocks), read by the scrape or moved at steps */
    SPEED_CHECK(speed_counter_register(n->metrics, "speed_prefix_cache_lookups_total",
                                       "Requests this decode node looked up in its prefix cache (admitted with their "
                                       "prompt: decode-local prefills)",
                                       NULL, 0, &n->m_prefix_lookups));
    SPEED_CHECK(speed_counter_register(n->metrics, "speed_prefix_cache_hits_total",
                                       "Lookups that reused a cached prefix (hit rate: hits / lookups)", NULL, 0,
                                       &n->m_prefix_hits));
    SPEED_CHECK(speed_counter_register(n->metrics, "speed_prefix_cache_evictions_total",
                                       "Prefix cache entries evicted (least recently used, past "
                                       "decode.prefix_cache_blocks or for a request's room)",
                                       NULL, 0, &n->m_prefix_evictions));
    SPEED_CHECK(speed_counter_register(n->metrics, "speed_prefix_cache_tokens_saved_total",
                                       "Prompt tokens reused from the prefix cache: prefill tokens not computed", NULL,
                                       0, &n->m_prefix_tokens_saved));
    SPEED_CHECK(speed_gauge_register_callback(n->metrics, "speed_prefix_cache_blocks",
                                              "KV blocks the prefix cache's entries hold (both pools)", g_prefix_blocks,
                                              n, NULL));
    return SPEED_OK;
}

void speed_node_cache_cleanup(speed_node_t *n) {
    speed_cache_journal_destroy(n->cache_journal);
    n->cache_journal = NULL;
}

void speed_node_cache_on_event(void *user, speed_prefix_event_t kind, const uint64_t *hashes, size_t n_hashes) {
    speed_node_t *n = user;
    if (!n->cache_journal || !hashes || n_hashes == 0) return;
    if (kind == SPEED_PREFIX_EVENT_EVICTED) {
        speed_cache_journal_record_evicted(n->cache_journal, hashes, n_hashes);
        speed_counter_add(n->m_cache_evicted, (double)n_hashes);
        return;
    }
    size_t refused = speed_cache_journal_record_stored(n->cache_journal, hashes, n_hashes);
    speed_counter_add(n->m_cache_stored, (double)n_hashes);
    if (refused) speed_counter_add(n->m_cache_refused, (double)refused);
}

/* stats only grow; a smaller value (never expected) moves nothing */
static void add_delta(speed_counter_t *c, uint64_t now, uint64_t *seen) {
    if (now > *seen) speed_counter_add(c, (double)(now - *seen));
    *seen = now;
}

void speed_node_cache_observe_step(speed_node_t *n, const speed_prefix_cache_stats_t *p) {
    if (!n->m_prefix_lookups) return; /* not a decode node */
    speed_prefix_cache_stats_t *seen = &n->prefix_seen;
    add_delta(n->m_prefix_lookups, p->n_lookups, &seen->n_lookups);
    add_delta(n->m_prefix_hits, p->n_hits, &seen->n_hits);
    add_delta(n->m_prefix_evictions, p->n_evicted, &seen->n_evicted);
    add_delta(n->m_prefix_tokens_saved, p->n_hit_tokens, &seen->n_hit_tokens);
}

speed_status_t speed_node_cache_events(speed_node_t *n, const Speed__V1__CacheCursor *cursor,
                                       speed_node_cache_events_t *hold, Speed__V1__CacheEvents **out) {
    memset(hold, 0, sizeof *hold);
    *out = NULL;
    if (!cursor || !n->cache_journal) return SPEED_OK;
    speed_cache_journal_reply_t *r = &hold->reply;
    SPEED_CHECK(speed_cache_journal_read(n->cache_journal, cursor->instance, cursor->next_seq,
                                         (size_t)n->cfg.cache_events_max_per_reply, r));
    size_t n_runs = 0;
    for (size_t i = 0; i < r->n; i++) n_runs += i == 0 || r->kinds[i] != r->kinds[i - 1];
    if (n_runs) {
        hold->runs = speed_calloc(n_runs, sizeof *hold->runs);
        hold->ptrs = speed_calloc(n_runs, sizeof *hold->ptrs);
        if (!hold->runs || !hold->ptrs) {
            speed_node_cache_events_cleanup(hold);
            return SPEED_ERR_NO_MEMORY;
        }
    }
    size_t k = 0;
    for (size_t i = 0; i < r->n;) {
        size_t end = i + 1;
        while (end < r->n && r->kinds[end] == r->kinds[i]) end++;
        Speed__V1__CacheEventRun *run = &hold->runs[k];
        speed__v1__cache_event_run__init(run);
        run->kind = r->kinds[i] == SPEED_CACHE_EVENT_EVICTED ? SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_EVICTED
                                                             : SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_STORED;
        run->n_hashes = end - i;
        run->hashes = r->hashes + i;
        hold->ptrs[k++] = run;
        i = end;
    }
    Speed__V1__CacheEvents *m = &hold->msg;
    speed__v1__cache_events__init(m);
    m->instance = r->instance;
    m->next_seq = r->next_seq;
    m->snapshot = r->snapshot;
    m->more = r->more;
    m->n_runs = n_runs;
    m->runs = hold->ptrs;
    m->hash_seed = n->cache_seed;
    m->block_tokens = (uint32_t)n->cfg.kv_block_tokens;
    if (r->snapshot) speed_counter_inc(n->m_cache_snapshots);
    *out = m;
    return SPEED_OK;
}

void speed_node_cache_events_cleanup(speed_node_cache_events_t *hold) {
    if (!hold) return;
    speed_free(hold->runs);
    speed_free(hold->ptrs);
    speed_cache_journal_reply_cleanup(&hold->reply);
    memset(hold, 0, sizeof *hold);
}
