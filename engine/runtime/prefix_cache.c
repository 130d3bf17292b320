/* Prefix cache (prefix_cache.h): the reuse rule, the block-hash index, LRU eviction. */
#include "prefix_cache.h"

#include <string.h>

#include "alloc.h"
#include "block_hash.h"
#include "log.h"

/* One indexed full block: block k of an entry, named by the chained hash of tokens [0, (k+1)B). */
typedef struct prefix_node {
    uint64_t full; /* the chained hash */
    uint64_t hash; /* full & hash_mask: the index key */
    int64_t k;
    speed_prefix_entry_t *entry;
    struct prefix_node *next; /* bucket chain */
} prefix_node_t;

struct speed_prefix_entry {
    speed_kv_seq_t *seq;
    int32_t *tokens; /* [n_tokens] */
    int64_t n_tokens;
    speed_prefix_depth_t depth;
    prefix_node_t *nodes; /* [n_nodes] = n_tokens / B */
    int64_t n_nodes;
    int64_t n_blocks; /* held, both pools */
    int pins;
    uint64_t last_use;
    speed_prefix_entry_t *older, *newer; /* LRU list */
};

struct speed_prefix_cache {
    speed_prefix_cache_params_t p;
    speed_kv_cache_t *kv;
    int block_tokens;
    uint64_t hash_mask;
    prefix_node_t **buckets; /* [n_buckets], a power of two */
    uint64_t n_buckets;
    speed_prefix_entry_t *oldest, *newest;
    uint64_t clock; /* use counter: the LRU order */
    speed_prefix_cache_stats_t st;
};

/* ---- the rule ------------------------------------------------------------------------------ */

int speed_prefix_layers_have(const speed_prefix_depth_t *c, int64_t pos) {
    /* anchors attend only earlier anchors, i.e. every earlier token: ordinary in all layers;
     * with no shallow token nothing was ever hidden from anyone */
    if (pos < c->a || c->tail_start == c->a) return c->n_layers;
    return c->prefill_layers;
}

int speed_prefix_layers_need(const speed_prefix_depth_t *f, int64_t pos) {
    return pos < f->a ? f->n_layers : f->prefill_layers;
}

int64_t speed_prefix_reusable(const speed_prefix_depth_t *cached, const speed_prefix_depth_t *fresh, int64_t n_match) {
    int64_t end = n_match < fresh->tail_start ? n_match : fresh->tail_start;
    if (cached->n_layers != fresh->n_layers) return 0;
    int64_t i = 0;
    while (i < end && speed_prefix_layers_have(cached, i) >= speed_prefix_layers_need(fresh, i)) i++;
    return i;
}

/* ---- hashing ------------------------------------------------------------------------------- */

/* One definition of a block's key for the whole cluster (common/block_hash.h): the router
 * indexes prompts with the same chain, so a node's cache events name keys it understands. */

/* ---- events: a hash is stored while some node of the index carries it -------------------------- */

typedef struct {
    uint64_t hashes[64];
    size_t n;
    speed_prefix_event_t kind;
} event_batch_t;

static void events_flush(const speed_prefix_cache_t *c, event_batch_t *b) {
    if (b->n > 0 && c->p.event_cb) c->p.event_cb(c->p.event_user, b->kind, b->hashes, b->n);
    b->n = 0;
}

static void events_add(const speed_prefix_cache_t *c, event_batch_t *b, uint64_t h) {
    if (!c->p.event_cb) return;
    if (b->n == sizeof b->hashes / sizeof b->hashes[0]) events_flush(c, b);
    b->hashes[b->n++] = h;
}

/* Whether a node other than `self` carries the chained hash of `self` (same block index). */
static bool hash_held_elsewhere(const speed_prefix_cache_t *c, const prefix_node_t *self) {
    for (const prefix_node_t *n = c->buckets[self->hash & (c->n_buckets - 1)]; n; n = n->next)
        if (n != self && n->full == self->full && n->k == self->k) return true;
    return false;
}

/* ---- create / destroy ---------------------------------------------------------------------- */

speed_prefix_cache_params_t speed_prefix_cache_default_params(void) {
    return (speed_prefix_cache_params_t){.max_blocks = 0, .hash_bits = 64};
}

speed_status_t speed_prefix_cache_create(const speed_prefix_cache_params_t *params, speed_kv_cache_t *kv,
                                         speed_prefix_cache_t **cache_p) {
    if (!params || !kv || !cache_p || params->max_blocks < 0 || params->hash_bits < 0 || params->hash_bits > 64) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "prefix cache: bad parameters (max_blocks %lld, hash_bits %d)",
                    params ? (long long)params->max_blocks : 0LL, params ? params->hash_bits : 0);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_prefix_cache_t *c = speed_calloc(1, sizeof *c);
    if (!c) goto oom;
    c->p = *params;
    c->kv = kv;
    c->block_tokens = speed_kv_cache_block_tokens(kv);
    c->hash_mask = params->hash_bits == 64 ? ~0ULL : (1ULL << params->hash_bits) - 1; /* 0 bits: all 0 */
    if (!c->p.hash_next) c->p.hash_next = speed_block_hash_next;
    if (!c->p.hash_seed) c->p.hash_seed = speed_block_hash_seed("", (int32_t)c->block_tokens);
    /* one bucket per block the entries may hold (an entry indexes at most its lower blocks) */
    c->n_buckets = 64;
    while (c->n_buckets < (uint64_t)params->max_blocks && c->n_buckets < (1ULL << 22)) c->n_buckets <<= 1;
    c->buckets = speed_calloc(c->n_buckets, sizeof *c->buckets);
    if (!c->buckets) goto oom;
    c->st.max_blocks = params->max_blocks;
    *cache_p = c;
    return SPEED_OK;
oom:
    if (c) speed_free(c->buckets);
    speed_free(c);
    SPEED_ERROR(SPEED_SUBSYS_KV, "prefix cache: out of memory");
    return SPEED_ERR_NO_MEMORY;
}

static void lru_unlink(speed_prefix_cache_t *c, speed_prefix_entry_t *e) {
    if (e->older)
        e->older->newer = e->newer;
    else
        c->oldest = e->newer;
    if (e->newer)
        e->newer->older = e->older;
    else
        c->newest = e->older;
    e->older = e->newer = NULL;
}

static void lru_push_newest(speed_prefix_cache_t *c, speed_prefix_entry_t *e) {
    e->older = c->newest;
    e->newer = NULL;
    if (c->newest)
        c->newest->newer = e;
    else
        c->oldest = e;
    c->newest = e;
    e->last_use = ++c->clock;
}

static void entry_free(speed_prefix_cache_t *c, speed_prefix_entry_t *e) {
    event_batch_t ev = {.kind = SPEED_PREFIX_EVENT_EVICTED};
    for (int64_t k = 0; k < e->n_nodes; k++) {
        prefix_node_t **pp = &c->buckets[e->nodes[k].hash & (c->n_buckets - 1)];
        while (*pp != &e->nodes[k]) pp = &(*pp)->next;
        *pp = e->nodes[k].next;
        if (!hash_held_elsewhere(c, &e->nodes[k])) events_add(c, &ev, e->nodes[k].full);
    }
    events_flush(c, &ev);
    lru_unlink(c, e);
    speed_kv_cache_seq_destroy(c->kv, e->seq);
    c->st.n_entries--;
    c->st.n_blocks -= e->n_blocks;
    speed_free(e->nodes);
    speed_free(e->tokens);
    speed_free(e);
}

void speed_prefix_cache_destroy(speed_prefix_cache_t *c) {
    if (!c) return;
    while (c->oldest) {
        SPEED_ASSERT(c->oldest->pins == 0);
        entry_free(c, c->oldest);
    }
    speed_free(c->buckets);
    speed_free(c);
}

bool speed_prefix_cache_evict_one(speed_prefix_cache_t *c) {
    for (speed_prefix_entry_t *e = c->oldest; e; e = e->newer) {
        if (e->pins) continue;
        SPEED_DEBUG(SPEED_SUBSYS_KV, "prefix cache: evicting an entry of %lld tokens (%lld blocks)",
                    (long long)e->n_tokens, (long long)e->n_blocks);
        entry_free(c, e);
        c->st.n_evicted++;
        return true;
    }
    return false;
}

void speed_prefix_cache_clear(speed_prefix_cache_t *c) {
    while (speed_prefix_cache_evict_one(c)) {}
}

/* ---- insert -------------------------------------------------------------------------------- */

/* Whether entry `big` serves every lookup `small` serves at least as well: small's tokens are a
 * prefix of big's and big's KV is ordinary in as many layers at each of those positions. */
static bool entry_covers(const speed_prefix_entry_t *big, const speed_prefix_entry_t *small) {
    if (small->n_tokens > big->n_tokens || small->depth.n_layers != big->depth.n_layers ||
        memcmp(small->tokens, big->tokens, (size_t)small->n_tokens * sizeof(int32_t)) != 0)
        return false;
    for (int64_t i = 0; i < small->n_tokens; i++)
        if (speed_prefix_layers_have(&big->depth, i) < speed_prefix_layers_have(&small->depth, i)) return false;
    return true;
}

/* Evicts the entries the new entry e covers (turn k's entry once turn k + 1's arrives): they
 * would never win a lookup again. Blocks they share with e stay, e holds them. Pinned ones stay. */
static void drop_covered(speed_prefix_cache_t *c, speed_prefix_entry_t *e) {
    for (int64_t k = 0; k < e->n_nodes; k++) {
        prefix_node_t *n = c->buckets[e->nodes[k].hash & (c->n_buckets - 1)];
        while (n) {
            speed_prefix_entry_t *o = n->entry;
            if (o != e && n->k == k && n->full == e->nodes[k].full && o->n_nodes == k + 1 && !o->pins &&
                entry_covers(e, o)) {
                entry_free(c, o);
                c->st.n_replaced++;
                n = c->buckets[e->nodes[k].hash & (c->n_buckets - 1)]; /* the chain changed */
                continue;
            }
            n = n->next;
        }
    }
}

speed_status_t speed_prefix_cache_insert(speed_prefix_cache_t *c, speed_kv_seq_t *seq, const int32_t *tokens,
                                         int64_t n_tokens, const speed_prefix_depth_t *depth) {
    const int B = c->block_tokens;
    if (c->p.max_blocks == 0 || n_tokens < B || !tokens) {
        speed_kv_cache_seq_destroy(c->kv, seq);
        return SPEED_OK;
    }
    SPEED_ASSERT(speed_kv_seq_entries(seq, 0) == n_tokens); /* layer 0 < C: every token */
    speed_prefix_entry_t *e = speed_calloc(1, sizeof *e);
    int64_t n_nodes = n_tokens / B;
    if (e) e->tokens = speed_malloc((size_t)n_tokens * sizeof(int32_t));
    if (e) e->nodes = speed_calloc((size_t)n_nodes, sizeof *e->nodes);
    if (!e || !e->tokens || !e->nodes) {
        if (e) {
            speed_free(e->tokens);
            speed_free(e->nodes);
        }
        speed_free(e);
        speed_kv_cache_seq_destroy(c->kv, seq);
        SPEED_ERROR(SPEED_SUBSYS_KV, "prefix cache: out of memory for an entry of %lld tokens", (long long)n_tokens);
        return SPEED_ERR_NO_MEMORY;
    }
    speed_kv_cache_seq_trim(c->kv, seq);
    speed_kv_usage_t u;
    speed_kv_cache_seq_usage(c->kv, seq, &u);
    e->seq = seq;
    memcpy(e->tokens, tokens, (size_t)n_tokens * sizeof(int32_t));
    e->n_tokens = n_tokens;
    e->depth = *depth;
    e->n_nodes = n_nodes;
    e->n_blocks = u.n_blocks[SPEED_KV_POOL_LOWER] + u.n_blocks[SPEED_KV_POOL_UPPER];
    event_batch_t ev = {.kind = SPEED_PREFIX_EVENT_STORED};
    uint64_t h = c->p.hash_seed;
    for (int64_t k = 0; k < n_nodes; k++) {
        h = c->p.hash_next(h, tokens + k * B, (size_t)B);
        prefix_node_t *n = &e->nodes[k];
        n->full = h;
        n->hash = h & c->hash_mask;
        n->k = k;
        n->entry = e;
        if (!hash_held_elsewhere(c, n)) events_add(c, &ev, h);
        prefix_node_t **bucket = &c->buckets[n->hash & (c->n_buckets - 1)];
        n->next = *bucket;
        *bucket = n;
    }
    events_flush(c, &ev);
    lru_push_newest(c, e);
    c->st.n_entries++;
    c->st.n_blocks += e->n_blocks;
    c->st.n_inserted++;
    drop_covered(c, e);
    while (c->st.n_blocks > c->p.max_blocks && speed_prefix_cache_evict_one(c)) {}
    return SPEED_OK;
}

/* ---- lookup -------------------------------------------------------------------------------- */

/* The best entry for a prompt (see speed_prefix_cache_lookup), or NULL; *reuse_p, *match_p. */
static speed_prefix_entry_t *find_best(speed_prefix_cache_t *c, const int32_t *tokens, int64_t n_tokens,
                                       const speed_prefix_depth_t *depth, int64_t *reuse_p, int64_t *match_p) {
    const int B = c->block_tokens;
    *reuse_p = *match_p = 0;
    /* only blocks that end before the tail can matter: the tail is always computed */
    int64_t m = (depth->tail_start < n_tokens ? depth->tail_start : n_tokens) / B;
    if (m == 0 || !c->oldest) return NULL;
    uint64_t *hashes = speed_malloc((size_t)m * sizeof *hashes);
    if (!hashes) return NULL; /* a miss is always correct */
    uint64_t h = c->p.hash_seed;
    for (int64_t k = 0; k < m; k++) {
        h = c->p.hash_next(h, tokens + k * B, (size_t)B);
        hashes[k] = h & c->hash_mask;
    }
    speed_prefix_entry_t *best = NULL;
    int64_t best_reuse = 0, best_match = 0;
    /* From the longest prefix down: an entry first found at block k matches fewer than
     * (k + 2) B tokens, so once a hit reaches (k + 2) B the shorter prefixes cannot beat it. */
    for (int64_t k = m - 1; k >= 0 && best_reuse < (k + 2) * B; k--) {
        for (prefix_node_t *n = c->buckets[hashes[k] & (c->n_buckets - 1)]; n; n = n->next) {
            if (n->hash != hashes[k] || n->k != k) continue; /* the masked key: tests force collisions */
            speed_prefix_entry_t *e = n->entry;
            int64_t covered = (k + 1) * B;
            /* the trust boundary: equal hashes are not equal prefixes */
            if (memcmp(e->tokens, tokens, (size_t)covered * sizeof(int32_t)) != 0) {
                c->st.n_collisions++;
                continue;
            }
            int64_t j = covered, lim = e->n_tokens < n_tokens ? e->n_tokens : n_tokens;
            while (j < lim && e->tokens[j] == tokens[j]) j++;
            int64_t reuse = speed_prefix_reusable(&e->depth, depth, j);
            if (reuse > best_reuse || (reuse == best_reuse && reuse > 0 && e->last_use > best->last_use)) {
                best = e;
                best_reuse = reuse;
                best_match = j;
            }
        }
    }
    speed_free(hashes);
    *reuse_p = best_reuse;
    *match_p = best_match;
    return best;
}

bool speed_prefix_cache_lookup(speed_prefix_cache_t *c, const int32_t *tokens, int64_t n_tokens,
                               const speed_prefix_depth_t *depth, speed_prefix_hit_t *hit_p) {
    memset(hit_p, 0, sizeof *hit_p);
    c->st.n_lookups++;
    int64_t reuse, match;
    speed_prefix_entry_t *best = find_best(c, tokens, n_tokens, depth, &reuse, &match);
    if (!best) return false;
    best->pins++;
    lru_unlink(c, best);
    lru_push_newest(c, best);
    c->st.n_hits++;
    c->st.n_hit_tokens += (uint64_t)reuse;
    *hit_p =
        (speed_prefix_hit_t){.entry = best, .seq = best->seq, .depth = best->depth, .n_match = match, .n_reuse = reuse};
    return true;
}

int64_t speed_prefix_cache_peek(speed_prefix_cache_t *c, const int32_t *tokens, int64_t n_tokens,
                                const speed_prefix_depth_t *depth) {
    int64_t reuse, match;
    uint64_t collisions = c->st.n_collisions; /* a peek leaves no trace */
    (void)find_best(c, tokens, n_tokens, depth, &reuse, &match);
    c->st.n_collisions = collisions;
    return reuse;
}

void speed_prefix_cache_release(speed_prefix_cache_t *c, speed_prefix_hit_t *hit) {
    (void)c;
    if (!hit || !hit->entry) return;
    SPEED_ASSERT(hit->entry->pins > 0);
    hit->entry->pins--;
    memset(hit, 0, sizeof *hit);
}

void speed_prefix_cache_stats(const speed_prefix_cache_t *c, speed_prefix_cache_stats_t *st) { *st = c->st; }
