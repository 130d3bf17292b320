/* speed_node: the decode node's cache event journal and its part of Node.Status (KV-aware
 * routing; see node.h and cache_journal.h). */
#include <string.h>

#include "alloc.h"
#include "block_hash.h"
#include "log.h"
#include "node.h"

speed_status_t speed_node_cache_init(speed_node_t *n) {
    speed_cache_journal_params_t p = {
        .instance = n->epoch ? n->epoch : 1,
        .n_events_max = (size_t)n->cfg.cache_events_journal,
        .n_blocks_max = (size_t)n->cfg.cache_events_max_blocks,
    };
    SPEED_CHECK(speed_cache_journal_create(&p, &n->cache_journal));
    /* a reservation lives at most its lease; twice that covers a Generate that comes late */
    size_t n_held = (size_t)(n->pool->max_running + n->pool->max_waiting) + 16;
    SPEED_CHECK(speed_prompt_hold_create(n_held, 2 * n->cfg.lease_ms + 1000, &n->cache_hold));
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
    return SPEED_OK;
}

void speed_node_cache_cleanup(speed_node_t *n) {
    speed_cache_journal_destroy(n->cache_journal);
    n->cache_journal = NULL;
    speed_prompt_hold_destroy(n->cache_hold);
    n->cache_hold = NULL;
}

/* The prompt's full blocks' hashes (speed_malloc'd), NULL when it has none or on no memory. */
static uint64_t *prompt_hashes(speed_node_t *n, const int32_t *ids, size_t n_ids, size_t *n_blocks_p) {
    size_t b = (size_t)n->cfg.kv_block_tokens;
    *n_blocks_p = 0;
    if (!ids || b == 0 || n_ids < b) return NULL;
    size_t n_blocks = n_ids / b;
    uint64_t *h = speed_malloc(n_blocks * sizeof *h);
    if (h) *n_blocks_p = speed_block_hash_prompt(n->cache_seed, ids, n_ids, b, h, n_blocks);
    return h; /* NULL: a hint lost, the router routes without these blocks */
}

void speed_node_cache_record_hashes(speed_node_t *n, const uint64_t *hashes, size_t n_hashes) {
    if (!n->cache_journal || !hashes || n_hashes == 0) return;
    size_t refused = speed_cache_journal_record_stored(n->cache_journal, hashes, n_hashes);
    speed_counter_add(n->m_cache_stored, (double)n_hashes);
    if (refused) speed_counter_add(n->m_cache_refused, (double)refused);
}

void speed_node_cache_record_prompt(speed_node_t *n, const int32_t *ids, size_t n_ids) {
    if (!n->cache_journal) return;
    size_t n_blocks;
    uint64_t *h = prompt_hashes(n, ids, n_ids, &n_blocks);
    speed_node_cache_record_hashes(n, h, n_blocks);
    speed_free(h);
}

void speed_node_cache_hold_prompt(speed_node_t *n, const char *request_id, const int32_t *ids, size_t n_ids) {
    if (!n->cache_journal) return;
    size_t n_blocks;
    uint64_t *h = prompt_hashes(n, ids, n_ids, &n_blocks);
    if (h) speed_prompt_hold_put(n->cache_hold, request_id, h, n_blocks);
    speed_free(h);
}

bool speed_node_cache_take_held(speed_node_t *n, const char *request_id, uint64_t **hashes_p, size_t *n_p) {
    return n->cache_hold && speed_prompt_hold_take(n->cache_hold, request_id, hashes_p, n_p);
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
