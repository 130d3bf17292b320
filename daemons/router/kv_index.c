/* speed_kv_index: the router's per-decode-node prefix index (see kv_index.h). */
#include "kv_index.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "alloc.h"
#include "block_set.h"
#include "log.h"

typedef struct {
    pthread_mutex_t mu;
    speed_block_set_t *set;
    uint64_t instance, next_seq; /* cursor; instance 0 = the next read is a snapshot */
    bool stores;                 /* this instance reported stored blocks (its cache is on) */
    bool mismatch_warned;
    speed_gauge_t *g_blocks; /* speed_router_kv_index_blocks{node}, NULL until named */
} kv_node_t;

struct speed_kv_index {
    speed_kv_index_params_t p;
    kv_node_t *nodes; /* [n_nodes_max] */
    _Atomic uint64_t n_stored, n_evicted, n_anticipated, n_snapshots, n_refused, n_ignored;
    speed_gauge_t *g_family;
    speed_counter_t *m_stored, *m_evicted, *m_anticipated, *m_snapshots, *m_refused;
};

static speed_status_t register_metrics(speed_kv_index_t *idx, speed_metrics_t *m) {
    static const char *const node_label[] = {"node"}, *const kind_label[] = {"kind"};
    SPEED_CHECK(speed_gauge_register(m, "speed_router_kv_index_blocks",
                                     "Block hashes the router's prefix index holds for the decode node", node_label, 1,
                                     &idx->g_family));
    speed_counter_t *events;
    SPEED_CHECK(speed_counter_register(m, "speed_router_kv_events_total",
                                       "Cache events (blocks stored / evicted) the router applied from decode nodes' "
                                       "status replies, and blocks of completed requests it added ahead of them "
                                       "(anticipated)",
                                       kind_label, 1, &events));
    SPEED_CHECK(speed_counter_labels(events, (const char *[]){"stored"}, &idx->m_stored));
    SPEED_CHECK(speed_counter_labels(events, (const char *[]){"evicted"}, &idx->m_evicted));
    SPEED_CHECK(speed_counter_labels(events, (const char *[]){"anticipated"}, &idx->m_anticipated));
    SPEED_CHECK(speed_counter_register(m, "speed_router_kv_snapshots_total",
                                       "Whole sets of block hashes the router took from a decode node (new router, "
                                       "node restart, too far behind)",
                                       NULL, 0, &idx->m_snapshots));
    SPEED_CHECK(speed_counter_register(m, "speed_router_kv_index_refused_total",
                                       "Block hashes the prefix index refused: the node's set held "
                                       "router.kv_index_max_blocks",
                                       NULL, 0, &idx->m_refused));
    return SPEED_OK;
}

speed_status_t speed_kv_index_create(const speed_kv_index_params_t *params, speed_kv_index_t **idx_p) {
    const size_t limit = (size_t)1 << 30;
    if (!params || !idx_p || params->n_nodes_max == 0 || params->n_nodes_max > limit || params->max_blocks == 0 ||
        params->max_blocks > limit || params->block_tokens < 1)
        return SPEED_ERR_INVALID_ARGUMENT;
    speed_kv_index_t *idx = speed_calloc(1, sizeof *idx);
    if (!idx) return SPEED_ERR_NO_MEMORY;
    idx->p = *params;
    idx->nodes = speed_calloc(params->n_nodes_max, sizeof *idx->nodes);
    speed_status_t st = idx->nodes ? SPEED_OK : SPEED_ERR_NO_MEMORY;
    size_t made = 0;
    for (; st == SPEED_OK && made < params->n_nodes_max; made++) {
        st = speed_block_set_create(params->max_blocks, &idx->nodes[made].set);
        if (st != SPEED_OK) break;
        pthread_mutex_init(&idx->nodes[made].mu, NULL);
    }
    if (st == SPEED_OK && params->metrics) st = register_metrics(idx, params->metrics);
    if (st != SPEED_OK) {
        for (size_t i = 0; i < made; i++) {
            speed_block_set_destroy(idx->nodes[i].set);
            pthread_mutex_destroy(&idx->nodes[i].mu);
        }
        speed_free(idx->nodes);
        speed_free(idx);
        return st;
    }
    *idx_p = idx;
    return SPEED_OK;
}

void speed_kv_index_destroy(speed_kv_index_t *idx) {
    if (!idx) return;
    for (size_t i = 0; i < idx->p.n_nodes_max; i++) {
        speed_block_set_destroy(idx->nodes[i].set);
        pthread_mutex_destroy(&idx->nodes[i].mu);
    }
    speed_free(idx->nodes);
    speed_free(idx);
}

static kv_node_t *node_at(speed_kv_index_t *idx, size_t node) {
    return idx && node < idx->p.n_nodes_max ? &idx->nodes[node] : NULL;
}

speed_status_t speed_kv_index_name_node(speed_kv_index_t *idx, size_t node, const char *address) {
    kv_node_t *kn = node_at(idx, node);
    if (!kn || !address) return SPEED_ERR_INVALID_ARGUMENT;
    if (!idx->g_family) return SPEED_OK;
    speed_gauge_t *g = NULL;
    SPEED_CHECK(speed_gauge_labels(idx->g_family, (const char *[]){address}, &g));
    pthread_mutex_lock(&kn->mu);
    speed_gauge_t *old = kn->g_blocks;
    kn->g_blocks = g;
    speed_gauge_set(g, (double)speed_block_set_size(kn->set));
    /* a renamed slot (discovery gave it to another address): the old series goes, only this
     * index used it and only under kn->mu */
    if (old && old != g) speed_gauge_remove(old);
    pthread_mutex_unlock(&kn->mu);
    return SPEED_OK;
}

void speed_kv_index_cursor(speed_kv_index_t *idx, size_t node, Speed__V1__CacheCursor *cursor) {
    speed__v1__cache_cursor__init(cursor);
    kv_node_t *kn = node_at(idx, node);
    if (!kn) return;
    pthread_mutex_lock(&kn->mu);
    cursor->instance = kn->instance;
    cursor->next_seq = kn->next_seq;
    pthread_mutex_unlock(&kn->mu);
}

/* Under kn->mu. */
static void reset_locked(kv_node_t *kn) {
    speed_block_set_clear(kn->set);
    kn->instance = 0;
    kn->next_seq = 0;
    kn->stores = false;
    if (kn->g_blocks) speed_gauge_set(kn->g_blocks, 0);
}

void speed_kv_index_forget(speed_kv_index_t *idx, size_t node) {
    kv_node_t *kn = node_at(idx, node);
    if (!kn) return;
    pthread_mutex_lock(&kn->mu);
    reset_locked(kn);
    pthread_mutex_unlock(&kn->mu);
}

static void count(speed_counter_t *c, _Atomic uint64_t *n, uint64_t v) {
    if (!v) return;
    atomic_fetch_add(n, v);
    if (c) speed_counter_add(c, (double)v);
}

bool speed_kv_index_apply(speed_kv_index_t *idx, size_t node, const Speed__V1__CacheEvents *ev) {
    kv_node_t *kn = node_at(idx, node);
    if (!kn || !ev) return false;
    pthread_mutex_lock(&kn->mu);
    if (ev->hash_seed != idx->p.seed || ev->block_tokens != (uint32_t)idx->p.block_tokens) {
        /* Another model or block size: its hashes name other keys. Hold nothing of it, and keep
         * the cursor at 0 (its snapshots are as useless; a restart with the right model fixes
         * it). */
        bool warn = !kn->mismatch_warned;
        kn->mismatch_warned = true;
        reset_locked(kn);
        pthread_mutex_unlock(&kn->mu);
        atomic_fetch_add(&idx->n_ignored, 1);
        if (warn)
            SPEED_WARN(SPEED_SUBSYS_NET,
                       "decode node %zu: its cache events use another model or block size (seed %016llx, %u tokens; "
                       "the router's: %016llx, %d): KV-aware routing ignores them",
                       node, (unsigned long long)ev->hash_seed, ev->block_tokens, (unsigned long long)idx->p.seed,
                       idx->p.block_tokens);
        return false;
    }
    kn->mismatch_warned = false;
    if (ev->snapshot || ev->instance != kn->instance) {
        /* A snapshot replaces the set; events of an instance the cursor did not name cannot be
         * applied to what the index holds (the node restarted without sending one): forget. */
        reset_locked(kn);
        if (!ev->snapshot) {
            pthread_mutex_unlock(&kn->mu);
            return true; /* ask again: the next read is a snapshot */
        }
        atomic_fetch_add(&idx->n_snapshots, 1);
        if (idx->m_snapshots) speed_counter_inc(idx->m_snapshots);
    }
    uint64_t stored = 0, evicted = 0, refused = 0;
    for (size_t r = 0; r < ev->n_runs; r++) {
        const Speed__V1__CacheEventRun *run = ev->runs[r];
        if (!run) continue;
        bool evict = run->kind == SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_EVICTED;
        for (size_t i = 0; i < run->n_hashes; i++) {
            if (evict) {
                speed_block_set_remove(kn->set, run->hashes[i]);
                evicted++;
            } else {
                speed_status_t st = speed_block_set_add(kn->set, run->hashes[i]);
                if (st == SPEED_ERR_CAPACITY || st == SPEED_ERR_NO_MEMORY) refused++;
                stored++;
            }
        }
    }
    kn->instance = ev->instance;
    kn->next_seq = ev->next_seq;
    kn->stores = kn->stores || stored > 0;
    if (kn->g_blocks) speed_gauge_set(kn->g_blocks, (double)speed_block_set_size(kn->set));
    pthread_mutex_unlock(&kn->mu);
    count(idx->m_stored, &idx->n_stored, stored);
    count(idx->m_evicted, &idx->n_evicted, evicted);
    count(idx->m_refused, &idx->n_refused, refused);
    return ev->more;
}

size_t speed_kv_index_anticipate(speed_kv_index_t *idx, size_t node, const uint64_t *hashes, size_t n) {
    kv_node_t *kn = node_at(idx, node);
    if (!kn || !hashes) return 0;
    size_t added = 0, refused = 0;
    pthread_mutex_lock(&kn->mu);
    if (kn->stores) {
        for (size_t i = 0; i < n; i++) {
            bool had = speed_block_set_has(kn->set, hashes[i]);
            speed_status_t st = speed_block_set_add(kn->set, hashes[i]);
            if (st == SPEED_OK && !had) added++;
            if (st == SPEED_ERR_CAPACITY || st == SPEED_ERR_NO_MEMORY) refused++;
        }
        if (kn->g_blocks) speed_gauge_set(kn->g_blocks, (double)speed_block_set_size(kn->set));
    }
    pthread_mutex_unlock(&kn->mu);
    count(idx->m_anticipated, &idx->n_anticipated, added);
    count(idx->m_refused, &idx->n_refused, refused);
    return added;
}

size_t speed_kv_index_overlap(speed_kv_index_t *idx, size_t node, const uint64_t *prompt, size_t n) {
    kv_node_t *kn = node_at(idx, node);
    if (!kn || !prompt) return 0;
    size_t k = 0;
    pthread_mutex_lock(&kn->mu);
    while (k < n && speed_block_set_has(kn->set, prompt[k])) k++;
    pthread_mutex_unlock(&kn->mu);
    return k;
}

size_t speed_kv_index_size(speed_kv_index_t *idx, size_t node) {
    kv_node_t *kn = node_at(idx, node);
    if (!kn) return 0;
    pthread_mutex_lock(&kn->mu);
    size_t n = speed_block_set_size(kn->set);
    pthread_mutex_unlock(&kn->mu);
    return n;
}

uint64_t speed_kv_index_seed(const speed_kv_index_t *idx) { return idx ? idx->p.seed : 0; }

int32_t speed_kv_index_block_tokens(const speed_kv_index_t *idx) { return idx ? idx->p.block_tokens : 0; }

void speed_kv_index_stats(speed_kv_index_t *idx, speed_kv_index_stats_t *s) {
    memset(s, 0, sizeof *s);
    if (!idx) return;
    s->n_stored = atomic_load(&idx->n_stored);
    s->n_evicted = atomic_load(&idx->n_evicted);
    s->n_anticipated = atomic_load(&idx->n_anticipated);
    s->n_snapshots = atomic_load(&idx->n_snapshots);
    s->n_refused = atomic_load(&idx->n_refused);
    s->n_ignored = atomic_load(&idx->n_ignored);
}
