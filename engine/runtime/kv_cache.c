/* Paged two-pool KV cache (kv_cache.h). */
#include "kv_cache.h"

#include <string.h>

#include "alloc.h"
#include "log.h"

typedef struct {
    int layer_begin, n_layers; /* layers [layer_begin, layer_begin + n_layers) */
    int64_t n_blocks;
    size_t block_bytes; /* n_layers * unit */
    void *base;         /* backend memory [n_blocks][block_bytes]; NULL when empty */
    void *mirror;       /* pinned host copy of the same layout, or NULL (kv_cache.h) */
    int32_t *free_list; /* [n_blocks] stack of free block ids; top = n_free - 1 */
    int64_t n_free;
    int32_t *refs; /* [n_blocks] block tables holding the block (0 = free); > 1 = shared, read-only */
} kv_pool_t;

struct speed_kv_seq {
    int prefill_layers;                  /* C */
    int64_t n_full, n_compact;           /* entries stored */
    int64_t cap_full, cap_compact;       /* room */
    int32_t *table[SPEED_KV_POOL_COUNT]; /* [n_table[p]] block ids */
    int64_t n_table[SPEED_KV_POOL_COUNT];
    int block_tokens;
    int split_layer;
    struct speed_kv_seq *prev, *next; /* the cache's list of live sequences */
};

struct speed_kv_cache {
    speed_kv_cache_params_t p;
    size_t token_bytes; /* one layer, one token, K + V */
    size_t half_unit;   /* one layer, one block, K (or V) */
    kv_pool_t pool[SPEED_KV_POOL_COUNT];
    speed_kv_seq_t *seqs; /* live sequences (leak report) */
    int n_seqs;
    speed_kv_usage_t usage; /* sum over live sequences */
    bool mirrored;          /* the pools have host mirrors */
    void *stage;            /* host bounce buffer of one block's K (or V) for entry copies on device
                             * memory; allocated on first use */
};

static int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Drops one holder of a block; the last one returns it to the free list. */
static void block_unref(kv_pool_t *pool, int32_t b) {
    SPEED_ASSERT(pool->refs[b] > 0);
    if (--pool->refs[b] == 0) pool->free_list[pool->n_free++] = b;
}

speed_kv_cache_params_t speed_kv_cache_default_params(void) {
    return (speed_kv_cache_params_t){.dtype = SPEED_DTYPE_F32, .block_tokens = 16};
}

void speed_kv_entries_for(int64_t n_prompt, int anchors, int tail, int64_t n_extra, int64_t *n_full_p,
                          int64_t *n_compact_p) {
    if (n_prompt < 0) n_prompt = 0;
    if (n_extra < 0) n_extra = 0;
    int64_t kept = (int64_t)(anchors > 0 ? anchors : 0) + (tail > 0 ? tail : 0);
    if (kept > n_prompt) kept = n_prompt;
    *n_full_p = n_prompt + n_extra;
    *n_compact_p = kept + n_extra;
}

speed_kv_from_t speed_kv_from_cached(int64_t n_cached, int64_t n_prompt, int anchors) {
    if (n_cached < 0) n_cached = 0;
    int64_t a = anchors > 0 ? anchors : 0;
    if (a > n_prompt) a = n_prompt;
    return (speed_kv_from_t){n_cached, n_cached < a ? n_cached : a};
}

/* Entries the pool's table must hold for a sequence: the most any of its layers needs. */
static int64_t pool_entries(int n_layers, int split_layer, speed_kv_pool_t pool, int prefill_layers, int64_t n_full,
                            int64_t n_compact) {
    if (pool == SPEED_KV_POOL_LOWER) return n_full; /* layer 0 < C always */
    if (split_layer >= n_layers) return 0;
    return prefill_layers > split_layer ? n_full : n_compact;
}

void speed_kv_cache_blocks_for(int n_layers, int split_layer, int block_tokens, int prefill_layers, int64_t n_full,
                               int64_t n_compact, int64_t n_blocks_p[SPEED_KV_POOL_COUNT]) {
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++)
        n_blocks_p[p] =
            block_tokens > 0
                ? div_up(pool_entries(n_layers, split_layer, (speed_kv_pool_t)p, prefill_layers, n_full, n_compact),
                         block_tokens)
                : 0;
}

static void pool_cleanup(speed_backend_t *be, kv_pool_t *pool) {
    speed_backend_free_host(be, pool->mirror);
    speed_backend_free(be, pool->base);
    speed_free(pool->free_list);
    speed_free(pool->refs);
    memset(pool, 0, sizeof *pool);
}

static speed_status_t pool_init(speed_kv_cache_t *c, kv_pool_t *pool, int layer_begin, int n_layers, int64_t n_blocks) {
    pool->layer_begin = layer_begin;
    pool->n_layers = n_layers;
    pool->n_blocks = n_layers > 0 ? n_blocks : 0;
    pool->block_bytes = (size_t)n_layers * 2 * c->half_unit;
    if (pool->n_blocks == 0) return SPEED_OK;
    if ((uint64_t)pool->n_blocks > SIZE_MAX / pool->block_bytes) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: %lld blocks of %zu bytes do not fit in memory",
                    (long long)pool->n_blocks, pool->block_bytes);
        return SPEED_ERR_NO_MEMORY;
    }
    pool->free_list = speed_malloc((size_t)pool->n_blocks * sizeof(int32_t));
    pool->refs = speed_calloc((size_t)pool->n_blocks, sizeof(int32_t));
    if (!pool->free_list || !pool->refs) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: out of memory for the free list");
        return SPEED_ERR_NO_MEMORY;
    }
    size_t bytes = (size_t)pool->n_blocks * pool->block_bytes;
    SPEED_CHECK(speed_backend_alloc(c->p.backend, bytes, &pool->base));
    /* Zeroed so that the unused slots of a last partial block export deterministically. */
    SPEED_CHECK(speed_backend_memset_zero(c->p.backend, pool->base, bytes));
    if (c->mirrored) {
        SPEED_CHECK(speed_backend_alloc_host(c->p.backend, bytes, &pool->mirror));
        memset(pool->mirror, 0, bytes); /* as the pool: deterministic unused slots */
    }
    /* Block 0 on top: a fresh pool hands out blocks in ascending order. */
    for (int64_t i = 0; i < pool->n_blocks; i++) pool->free_list[i] = (int32_t)(pool->n_blocks - 1 - i);
    pool->n_free = pool->n_blocks;
    return SPEED_OK;
}

speed_status_t speed_kv_cache_create(const speed_kv_cache_params_t *params, speed_kv_cache_t **cache_p) {
    if (!params || !cache_p || !params->backend) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: no params, backend or output pointer");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const speed_kv_cache_params_t *p = params;
    const char *bad = NULL;
    if (p->n_layers < 1 || p->n_layers > 1 << 16)
        bad = "n_layers";
    else if (p->split_layer < 1 || p->split_layer > p->n_layers)
        bad = "split_layer (1..n_layers)";
    else if (p->n_kv_heads < 1 || p->head_dim < 1 || (int64_t)p->n_kv_heads * p->head_dim > 1 << 20)
        bad = "n_kv_heads / head_dim";
    else if (p->head_begin < 0 || p->model_kv_heads < 0 || p->model_kv_heads > 1 << 16 ||
             (int64_t)p->head_begin + p->n_kv_heads > (p->model_kv_heads ? p->model_kv_heads : p->n_kv_heads))
        bad = "head_begin / model_kv_heads (the head range must lie inside the model's heads)";
    else if (speed_dtype_size(p->dtype) == 0)
        bad = "dtype";
    else if (p->block_tokens < 1 || p->block_tokens > 1 << 16)
        bad = "block_tokens";
    else if (p->host_mirror != SPEED_KV_MIRROR_AUTO && p->host_mirror != SPEED_KV_MIRROR_ON &&
             p->host_mirror != SPEED_KV_MIRROR_OFF)
        bad = "host_mirror";
    else if (p->n_blocks[0] < 0 || p->n_blocks[1] < 0 || p->n_blocks[0] > INT32_MAX || p->n_blocks[1] > INT32_MAX)
        bad = "n_blocks";
    if (bad) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: %s is out of range", bad);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if ((int64_t)p->block_tokens * p->n_blocks[0] > INT32_MAX ||
        (int64_t)p->block_tokens * p->n_blocks[1] > INT32_MAX) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: more than 2^31 token slots in a pool");
        return SPEED_ERR_INVALID_ARGUMENT;
    }

    speed_kv_cache_t *c = speed_calloc(1, sizeof *c);
    if (!c) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }
    c->p = *p;
    if (!c->p.model_kv_heads) c->p.model_kv_heads = p->n_kv_heads;
    c->token_bytes = 2 * (size_t)p->n_kv_heads * (size_t)p->head_dim * speed_dtype_size(p->dtype);
    c->half_unit = (size_t)p->block_tokens * (c->token_bytes / 2);
    c->mirrored = p->host_mirror == SPEED_KV_MIRROR_ON ||
                  (p->host_mirror == SPEED_KV_MIRROR_AUTO && !speed_backend_host_memory(p->backend));
    speed_status_t st;
    SPEED_CHECK_GOTO(pool_init(c, &c->pool[SPEED_KV_POOL_LOWER], 0, p->split_layer, p->n_blocks[0]), st, fail);
    SPEED_CHECK_GOTO(
        pool_init(c, &c->pool[SPEED_KV_POOL_UPPER], p->split_layer, p->n_layers - p->split_layer, p->n_blocks[1]), st,
        fail);
    c->p.n_blocks[1] = c->pool[SPEED_KV_POOL_UPPER].n_blocks;
    SPEED_DEBUG(SPEED_SUBSYS_KV, "kv cache: lower pool %lld blocks x %zu bytes (layers 0..%d), upper %lld x %zu%s",
                (long long)c->pool[0].n_blocks, c->pool[0].block_bytes, p->split_layer - 1,
                (long long)c->pool[1].n_blocks, c->pool[1].block_bytes,
                c->mirrored ? ", with a pinned host mirror" : "");
    *cache_p = c;
    return SPEED_OK;
fail:
    pool_cleanup(p->backend, &c->pool[1]);
    pool_cleanup(p->backend, &c->pool[0]);
    speed_free(c);
    return st;
}

static void usage_add(speed_kv_usage_t *dst, const speed_kv_usage_t *u, int sign) {
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        if (sign > 0) {
            dst->n_blocks[p] += u->n_blocks[p];
            dst->bytes_reserved[p] += u->bytes_reserved[p];
            dst->bytes_used[p] += u->bytes_used[p];
        } else {
            dst->n_blocks[p] -= u->n_blocks[p];
            dst->bytes_reserved[p] -= u->bytes_reserved[p];
            dst->bytes_used[p] -= u->bytes_used[p];
        }
    }
}

void speed_kv_cache_destroy(speed_kv_cache_t *c) {
    if (!c) return;
    if (c->n_seqs > 0) {
        SPEED_WARN(SPEED_SUBSYS_KV,
                   "kv cache destroyed with %d sequences still holding %lld lower + %lld upper blocks (%zu bytes): "
                   "a leak of the caller, freed now",
                   c->n_seqs, (long long)c->usage.n_blocks[0], (long long)c->usage.n_blocks[1],
                   c->usage.bytes_reserved[0] + c->usage.bytes_reserved[1]);
        while (c->seqs) speed_kv_cache_seq_destroy(c, c->seqs);
    }
    pool_cleanup(c->p.backend, &c->pool[1]);
    pool_cleanup(c->p.backend, &c->pool[0]);
    speed_free(c->stage);
    speed_free(c);
}

speed_kv_pool_t speed_kv_cache_layer_pool(const speed_kv_cache_t *c, int layer) {
    return layer < c->p.split_layer ? SPEED_KV_POOL_LOWER : SPEED_KV_POOL_UPPER;
}

speed_kv_layer_t speed_kv_cache_layer(const speed_kv_cache_t *c, int layer) {
    SPEED_ASSERT(layer >= 0 && layer < c->p.n_layers);
    const kv_pool_t *pool = &c->pool[speed_kv_cache_layer_pool(c, layer)];
    speed_kv_layer_t kv = {
        .k_base = pool->base ? (char *)pool->base + (size_t)(layer - pool->layer_begin) * 2 * c->half_unit : NULL,
        .block_stride = pool->block_bytes,
        .v_offset = c->half_unit,
        .block_tokens = c->p.block_tokens,
        .n_kv_heads = c->p.n_kv_heads,
        .head_dim = c->p.head_dim,
        .dtype = c->p.dtype,
    };
    return kv;
}

int speed_kv_cache_block_tokens(const speed_kv_cache_t *c) { return c->p.block_tokens; }
int speed_kv_cache_n_layers(const speed_kv_cache_t *c) { return c->p.n_layers; }
int speed_kv_cache_split_layer(const speed_kv_cache_t *c) { return c->p.split_layer; }
int speed_kv_cache_head_begin(const speed_kv_cache_t *c) { return c->p.head_begin; }
int speed_kv_cache_model_kv_heads(const speed_kv_cache_t *c) { return c->p.model_kv_heads; }
size_t speed_kv_cache_token_bytes(const speed_kv_cache_t *c) { return c->token_bytes; }
size_t speed_kv_cache_unit_bytes(const speed_kv_cache_t *c) { return 2 * c->half_unit; }

/* ---- sequences ---------------------------------------------------------------------------- */

static void seq_usage(const speed_kv_cache_t *c, const speed_kv_seq_t *s, speed_kv_usage_t *u) {
    memset(u, 0, sizeof *u);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        const kv_pool_t *pool = &c->pool[p];
        u->n_blocks[p] = s->n_table[p];
        u->bytes_reserved[p] = (size_t)s->n_table[p] * pool->block_bytes;
        /* layers of this pool below C hold n_full entries, the others n_compact */
        int lo = pool->layer_begin, hi = pool->layer_begin + pool->n_layers;
        int n_below = s->prefill_layers <= lo ? 0 : s->prefill_layers >= hi ? pool->n_layers : s->prefill_layers - lo;
        int n_above = pool->n_layers - n_below;
        u->bytes_used[p] =
            ((size_t)n_below * (size_t)s->n_full + (size_t)n_above * (size_t)s->n_compact) * c->token_bytes;
    }
}

/* Takes blocks so that the sequence's tables cover (n_full_max, n_compact_max). Host memory
 * first, blocks last, so that a failure leaves everything as it was. */
static speed_status_t seq_reserve(speed_kv_cache_t *c, speed_kv_seq_t *s, int64_t n_full_max, int64_t n_compact_max) {
    int64_t want[SPEED_KV_POOL_COUNT];
    speed_kv_cache_blocks_for(c->p.n_layers, c->p.split_layer, c->p.block_tokens, s->prefill_layers, n_full_max,
                              n_compact_max, want);
    int64_t extra[SPEED_KV_POOL_COUNT];
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        extra[p] = want[p] > s->n_table[p] ? want[p] - s->n_table[p] : 0;
        if (extra[p] > c->pool[p].n_free) {
            SPEED_DEBUG(SPEED_SUBSYS_KV, "kv cache: %s pool has %lld free blocks, %lld needed",
                        p == 0 ? "lower" : "upper", (long long)c->pool[p].n_free, (long long)extra[p]);
            return SPEED_ERR_CAPACITY;
        }
    }
    int32_t *grown[SPEED_KV_POOL_COUNT] = {NULL, NULL};
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        if (!extra[p]) continue;
        grown[p] = speed_malloc((size_t)want[p] * sizeof(int32_t));
        if (!grown[p]) {
            speed_free(grown[0]);
            SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: out of memory for a block table");
            return SPEED_ERR_NO_MEMORY;
        }
    }
    speed_kv_usage_t before;
    seq_usage(c, s, &before);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        if (!extra[p]) continue;
        kv_pool_t *pool = &c->pool[p];
        if (s->n_table[p]) memcpy(grown[p], s->table[p], (size_t)s->n_table[p] * sizeof(int32_t));
        for (int64_t i = s->n_table[p]; i < want[p]; i++) {
            grown[p][i] = pool->free_list[--pool->n_free];
            pool->refs[grown[p][i]] = 1;
        }
        speed_free(s->table[p]);
        s->table[p] = grown[p];
        s->n_table[p] = want[p];
    }
    if (n_full_max > s->cap_full) s->cap_full = n_full_max;
    if (n_compact_max > s->cap_compact) s->cap_compact = n_compact_max;
    speed_kv_usage_t after;
    seq_usage(c, s, &after);
    usage_add(&c->usage, &before, -1);
    usage_add(&c->usage, &after, +1);
    return SPEED_OK;
}

speed_status_t speed_kv_cache_seq_create(speed_kv_cache_t *c, int prefill_layers, int64_t n_full_max,
                                         int64_t n_compact_max, speed_kv_seq_t **seq_p) {
    return speed_kv_cache_seq_create_shared(c, prefill_layers, n_full_max, n_compact_max, NULL, 0, seq_p);
}

speed_status_t speed_kv_cache_seq_create_shared(speed_kv_cache_t *c, int prefill_layers, int64_t n_full_max,
                                                int64_t n_compact_max, const speed_kv_seq_t *src, int64_t n_shared,
                                                speed_kv_seq_t **seq_p) {
    if (prefill_layers < 1 || prefill_layers > c->p.n_layers || n_full_max < 0 || n_compact_max < 0 ||
        n_compact_max > n_full_max || n_full_max > INT32_MAX) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: bad sequence (depth %d of %d layers, room %lld / %lld entries)",
                    prefill_layers, c->p.n_layers, (long long)n_full_max, (long long)n_compact_max);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    /* A shared block must hold only position-indexed entries in both sequences: a depth below
     * the split puts compact entries into lower-pool layers C..split-1 of the first blocks. */
    if (n_shared < 0 ||
        (n_shared > 0 && (!src || prefill_layers < c->p.split_layer || src->prefill_layers < c->p.split_layer ||
                          n_shared > src->n_table[SPEED_KV_POOL_LOWER] || n_shared * c->p.block_tokens > src->n_full ||
                          n_shared * c->p.block_tokens > n_full_max))) {
        SPEED_ERROR(SPEED_SUBSYS_KV,
                    "kv cache: cannot share %lld lower blocks (depths %d and %d, split %d, the source stores %lld "
                    "entries)",
                    (long long)n_shared, prefill_layers, src ? src->prefill_layers : 0, c->p.split_layer,
                    src ? (long long)src->n_full : 0LL);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_seq_t *s = speed_calloc(1, sizeof *s);
    int32_t *shared = n_shared > 0 ? speed_malloc((size_t)n_shared * sizeof(int32_t)) : NULL;
    if (!s || (n_shared > 0 && !shared)) {
        speed_free(s);
        speed_free(shared);
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: out of memory for a sequence");
        return SPEED_ERR_NO_MEMORY;
    }
    s->prefill_layers = prefill_layers;
    s->block_tokens = c->p.block_tokens;
    s->split_layer = c->p.split_layer;
    if (n_shared > 0) memcpy(shared, src->table[SPEED_KV_POOL_LOWER], (size_t)n_shared * sizeof(int32_t));
    s->table[SPEED_KV_POOL_LOWER] = shared;
    s->n_table[SPEED_KV_POOL_LOWER] = n_shared;
    /* seq_reserve adds only the blocks it takes to the cache's usage: the shared ones are
     * this sequence's too */
    speed_kv_usage_t shared_usage;
    seq_usage(c, s, &shared_usage);
    speed_status_t st = seq_reserve(c, s, n_full_max, n_compact_max);
    if (st != SPEED_OK) {
        speed_free(s->table[SPEED_KV_POOL_LOWER]);
        speed_free(s);
        return st;
    }
    usage_add(&c->usage, &shared_usage, +1);
    for (int64_t i = 0; i < n_shared; i++) c->pool[SPEED_KV_POOL_LOWER].refs[s->table[SPEED_KV_POOL_LOWER][i]]++;
    s->next = c->seqs;
    if (c->seqs) c->seqs->prev = s;
    c->seqs = s;
    c->n_seqs++;
    *seq_p = s;
    return SPEED_OK;
}

speed_status_t speed_kv_cache_seq_grow(speed_kv_cache_t *c, speed_kv_seq_t *s, int64_t n_full_max,
                                       int64_t n_compact_max) {
    if (n_full_max < 0 || n_compact_max < 0 || n_full_max > INT32_MAX) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: bad room %lld / %lld", (long long)n_full_max, (long long)n_compact_max);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (n_full_max < s->cap_full) n_full_max = s->cap_full;
    if (n_compact_max < s->cap_compact) n_compact_max = s->cap_compact;
    if (n_compact_max > n_full_max) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: compact room %lld exceeds full room %lld", (long long)n_compact_max,
                    (long long)n_full_max);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return seq_reserve(c, s, n_full_max, n_compact_max);
}

void speed_kv_cache_seq_destroy(speed_kv_cache_t *c, speed_kv_seq_t *s) {
    if (!s) return;
    speed_kv_usage_t u;
    seq_usage(c, s, &u);
    usage_add(&c->usage, &u, -1);
    /* Return in reverse so that a create/destroy pair leaves the free list as it was. A shared
     * block goes back only with its last holder. */
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        kv_pool_t *pool = &c->pool[p];
        for (int64_t i = s->n_table[p] - 1; i >= 0; i--) block_unref(pool, s->table[p][i]);
        SPEED_ASSERT(pool->n_free <= pool->n_blocks);
        speed_free(s->table[p]);
    }
    if (s->prev)
        s->prev->next = s->next;
    else
        c->seqs = s->next;
    if (s->next) s->next->prev = s->prev;
    c->n_seqs--;
    speed_free(s);
}

speed_status_t speed_kv_cache_seq_set_entries(speed_kv_cache_t *c, speed_kv_seq_t *s, int64_t n_full,
                                              int64_t n_compact) {
    if (n_full < 0 || n_compact < 0 || n_full > s->cap_full || n_compact > s->cap_compact) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: %lld / %lld entries do not fit the room %lld / %lld", (long long)n_full,
                    (long long)n_compact, (long long)s->cap_full, (long long)s->cap_compact);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    /* Layers >= C in the upper pool use the full-size table when C > split. */
    speed_kv_usage_t before, after;
    seq_usage(c, s, &before);
    s->n_full = n_full;
    s->n_compact = n_compact;
    seq_usage(c, s, &after);
    usage_add(&c->usage, &before, -1);
    usage_add(&c->usage, &after, +1);
    return SPEED_OK;
}

void speed_kv_cache_seq_trim(speed_kv_cache_t *c, speed_kv_seq_t *s) {
    int64_t want[SPEED_KV_POOL_COUNT];
    speed_kv_cache_blocks_for(c->p.n_layers, c->p.split_layer, c->p.block_tokens, s->prefill_layers, s->n_full,
                              s->n_compact, want);
    speed_kv_usage_t before, after;
    seq_usage(c, s, &before);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        kv_pool_t *pool = &c->pool[p];
        for (int64_t i = s->n_table[p] - 1; i >= want[p]; i--) {
            block_unref(pool, s->table[p][i]);
        }
        if (want[p] < s->n_table[p]) s->n_table[p] = want[p];
    }
    s->cap_full = s->n_full;
    s->cap_compact = s->n_compact;
    seq_usage(c, s, &after);
    usage_add(&c->usage, &before, -1);
    usage_add(&c->usage, &after, +1);
}

int32_t speed_kv_cache_block_refs(const speed_kv_cache_t *c, speed_kv_pool_t p, int32_t block) {
    SPEED_ASSERT(p == SPEED_KV_POOL_LOWER || p == SPEED_KV_POOL_UPPER);
    const kv_pool_t *pool = &c->pool[p];
    return block >= 0 && block < pool->n_blocks ? pool->refs[block] : -1;
}

/* Copies `bytes` of backend memory: in place on host memory, through the bounce buffer on a
 * device (download waits for the copy; the upload is synchronized before the buffer is reused). */
static speed_status_t copy_backend(speed_kv_cache_t *c, void *dst, const void *src, size_t bytes) {
    if (speed_backend_host_memory(c->p.backend)) {
        memcpy(dst, src, bytes);
        return SPEED_OK;
    }
    if (!c->stage && !(c->stage = speed_malloc(c->half_unit))) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: out of memory for the copy buffer");
        return SPEED_ERR_NO_MEMORY;
    }
    SPEED_ASSERT(bytes <= c->half_unit);
    SPEED_CHECK(speed_backend_download(c->p.backend, c->stage, src, bytes));
    SPEED_CHECK(speed_backend_upload(c->p.backend, dst, c->stage, bytes));
    return speed_backend_synchronize(c->p.backend);
}

speed_status_t speed_kv_cache_seq_copy_entries(speed_kv_cache_t *c, speed_kv_seq_t *dst, int64_t dst_entry,
                                               const speed_kv_seq_t *src, int64_t src_entry, int layer, int64_t n) {
    if (layer < 0 || layer >= c->p.n_layers || n < 0 || dst_entry < 0 || src_entry < 0 ||
        dst_entry + n > speed_kv_seq_capacity(dst, layer) || src_entry + n > speed_kv_seq_entries(src, layer)) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: copy of %lld entries of layer %d (%lld -> %lld) is out of range",
                    (long long)n, layer, (long long)src_entry, (long long)dst_entry);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const speed_kv_pool_t p = speed_kv_cache_layer_pool(c, layer);
    const int B = c->p.block_tokens;
    for (int64_t b = dst_entry / B; n > 0 && b <= (dst_entry + n - 1) / B; b++) {
        if (c->pool[p].refs[dst->table[p][b]] != 1) {
            SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: copy into block %lld of layer %d, which is shared (read-only)",
                        (long long)b, layer);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    const speed_kv_layer_t kv = speed_kv_cache_layer(c, layer);
    const size_t slot_bytes = c->token_bytes / 2;
    while (n > 0) {
        int64_t so = src_entry % B, d_o = dst_entry % B;
        int64_t run = n;
        if (run > B - so) run = B - so;
        if (run > B - d_o) run = B - d_o;
        char *d = (char *)kv.k_base + (size_t)dst->table[p][dst_entry / B] * kv.block_stride + (size_t)d_o * slot_bytes;
        const char *s =
            (const char *)kv.k_base + (size_t)src->table[p][src_entry / B] * kv.block_stride + (size_t)so * slot_bytes;
        SPEED_CHECK(copy_backend(c, d, s, (size_t)run * slot_bytes));                             /* K */
        SPEED_CHECK(copy_backend(c, d + kv.v_offset, s + kv.v_offset, (size_t)run * slot_bytes)); /* V */
        src_entry += run;
        dst_entry += run;
        n -= run;
    }
    return SPEED_OK;
}

int speed_kv_seq_prefill_layers(const speed_kv_seq_t *s) { return s->prefill_layers; }

int64_t speed_kv_seq_entries(const speed_kv_seq_t *s, int layer) {
    return layer < s->prefill_layers ? s->n_full : s->n_compact;
}

int64_t speed_kv_seq_capacity(const speed_kv_seq_t *s, int layer) {
    return layer < s->prefill_layers ? s->cap_full : s->cap_compact;
}

const int32_t *speed_kv_seq_block_table(const speed_kv_seq_t *s, int layer) {
    return s->table[layer < s->split_layer ? SPEED_KV_POOL_LOWER : SPEED_KV_POOL_UPPER];
}

int32_t speed_kv_seq_slot(const speed_kv_seq_t *s, int layer, int64_t entry) {
    const int32_t *t = speed_kv_seq_block_table(s, layer);
    SPEED_ASSERT(entry >= 0 && entry < speed_kv_seq_capacity(s, layer));
    return t[entry / s->block_tokens] * s->block_tokens + (int32_t)(entry % s->block_tokens);
}

void speed_kv_cache_seq_usage(const speed_kv_cache_t *c, const speed_kv_seq_t *s, speed_kv_usage_t *u) {
    seq_usage(c, s, u);
}

void speed_kv_cache_stats(const speed_kv_cache_t *c, speed_kv_cache_stats_t *st) {
    memset(st, 0, sizeof *st);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        st->n_layers[p] = c->pool[p].n_layers;
        st->block_bytes[p] = c->pool[p].block_bytes;
        st->n_blocks[p] = c->pool[p].n_blocks;
        st->n_blocks_free[p] = c->pool[p].n_free;
        st->bytes_total[p] = (size_t)c->pool[p].n_blocks * c->pool[p].block_bytes;
    }
    st->usage = c->usage;
    st->n_seqs = c->n_seqs;
}

/* ---- transfer ------------------------------------------------------------------------------ */

speed_status_t speed_kv_cache_block_addr(const speed_kv_cache_t *c, const speed_kv_seq_t *s, int layer, int64_t block,
                                         void **addr_p, size_t *bytes_p) {
    if (layer < 0 || layer >= c->p.n_layers) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: layer %d is out of range [0, %d)", layer, c->p.n_layers);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_pool_t p = speed_kv_cache_layer_pool(c, layer);
    if (block < 0 || block >= s->n_table[p]) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: block %lld of layer %d is out of range [0, %lld)", (long long)block,
                    layer, (long long)s->n_table[p]);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_layer_t kv = speed_kv_cache_layer(c, layer);
    *addr_p = (char *)kv.k_base + (size_t)s->table[p][block] * kv.block_stride;
    *bytes_p = 2 * c->half_unit;
    return SPEED_OK;
}

/* The blocks [*b0_p, *b1_p) of `layer` that hold its entries [from, n) (from = from.full below
 * the sequence's C, from.compact above; n likewise): the canonical units a (partial) transfer
 * carries. Empty when from >= n. */
static void layer_span(const speed_kv_cache_t *c, const speed_kv_seq_t *s, int layer, speed_kv_from_t from,
                       int64_t n_full, int64_t n_compact, int64_t *b0_p, int64_t *b1_p) {
    int64_t begin = layer < s->prefill_layers ? from.full : from.compact;
    int64_t end = layer < s->prefill_layers ? n_full : n_compact;
    *b0_p = begin < end ? begin / c->p.block_tokens : 0;
    *b1_p = begin < end ? div_up(end, c->p.block_tokens) : 0;
}

static bool from_ok(const speed_kv_seq_t *s, speed_kv_from_t from, int64_t n_full, int64_t n_compact) {
    return from.full >= 0 && from.compact >= 0 && from.full <= n_full && from.compact <= n_compact &&
           n_full <= s->cap_full && n_compact <= s->cap_compact;
}

/* Whether a block of the span is shared (read-only): a transfer must not write it. */
static bool span_shared(const speed_kv_cache_t *c, const speed_kv_seq_t *s, int layer, int64_t b0, int64_t b1) {
    speed_kv_pool_t p = speed_kv_cache_layer_pool(c, layer);
    for (int64_t b = b0; b < b1; b++)
        if (c->pool[p].refs[s->table[p][b]] > 1) return true;
    return false;
}

/* ---- host mirror and staging ------------------------------------------------------------------ */

bool speed_kv_cache_host_mirror(const speed_kv_cache_t *c) { return c->mirrored; }
bool speed_kv_cache_host_memory(const speed_kv_cache_t *c) { return speed_backend_host_memory(c->p.backend); }

void speed_kv_cache_xfer_region(const speed_kv_cache_t *c, speed_kv_pool_t p, void **base_p, size_t *len_p) {
    SPEED_ASSERT(p == SPEED_KV_POOL_LOWER || p == SPEED_KV_POOL_UPPER);
    const kv_pool_t *pool = &c->pool[p];
    *base_p = c->mirrored ? pool->mirror : pool->base;
    *len_p = *base_p ? (size_t)pool->n_blocks * pool->block_bytes : 0;
}

/* The mirror's address of a pool address. */
static void *mirror_of(const speed_kv_cache_t *c, speed_kv_pool_t p, const void *pool_addr) {
    const kv_pool_t *pool = &c->pool[p];
    return (char *)pool->mirror + ((const char *)pool_addr - (const char *)pool->base);
}

speed_status_t speed_kv_cache_xfer_block_addr(const speed_kv_cache_t *c, const speed_kv_seq_t *s, int layer,
                                              int64_t block, void **addr_p, size_t *bytes_p) {
    void *addr;
    SPEED_CHECK(speed_kv_cache_block_addr(c, s, layer, block, &addr, bytes_p));
    *addr_p = c->mirrored ? mirror_of(c, speed_kv_cache_layer_pool(c, layer), addr) : addr;
    return SPEED_OK;
}

speed_status_t speed_kv_cache_stage_out(const speed_kv_cache_t *c, const speed_kv_seq_t *s, int layer,
                                        int64_t block_begin, int64_t block_end) {
    if (!c->mirrored) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: stage out without a host mirror");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (layer < 0 || layer >= c->p.n_layers) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: stage out of layer %d, out of range [0, %d)", layer, c->p.n_layers);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_pool_t p = speed_kv_cache_layer_pool(c, layer);
    if (block_begin < 0 || block_end < block_begin || block_end > s->n_table[p]) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: stage out of blocks [%lld, %lld) of layer %d, the table has %lld",
                    (long long)block_begin, (long long)block_end, layer, (long long)s->n_table[p]);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const kv_pool_t *pool = &c->pool[p];
    const size_t unit = 2 * c->half_unit;
    /* Units of consecutive blocks are adjacent only when the pool holds one layer; otherwise
     * other layers' units lie between them, which puts may be reading: never copy those. */
    const bool adjacent = pool->block_bytes == unit;
    const int32_t *t = s->table[p];
    for (int64_t i = block_begin; i < block_end;) {
        int64_t j = i + 1;
        while (adjacent && j < block_end && t[j] == t[j - 1] + 1) j++;
        void *src;
        size_t bytes;
        SPEED_CHECK(speed_kv_cache_block_addr(c, s, layer, i, &src, &bytes));
        SPEED_CHECK(speed_backend_download(c->p.backend, mirror_of(c, p, src), src, (size_t)(j - i) * unit));
        i = j;
    }
    return SPEED_OK;
}

speed_status_t speed_kv_cache_stage_in(speed_kv_cache_t *c, const speed_kv_seq_t *s, int64_t n_full,
                                       int64_t n_compact) {
    return speed_kv_cache_stage_in_from(c, s, (speed_kv_from_t){0, 0}, n_full, n_compact);
}

speed_status_t speed_kv_cache_stage_in_from(speed_kv_cache_t *c, const speed_kv_seq_t *s, speed_kv_from_t from,
                                            int64_t n_full, int64_t n_compact) {
    if (!c->mirrored) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: stage in without a host mirror");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (n_full < 0 || n_compact < 0 || !from_ok(s, from, n_full, n_compact)) {
        SPEED_ERROR(SPEED_SUBSYS_KV,
                    "kv cache: stage in of entries %lld / %lld to %lld / %lld does not fit the room %lld / %lld",
                    (long long)from.full, (long long)from.compact, (long long)n_full, (long long)n_compact,
                    (long long)s->cap_full, (long long)s->cap_compact);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const size_t unit = 2 * c->half_unit;
    for (int l = 0; l < c->p.n_layers; l++) {
        speed_kv_pool_t p = speed_kv_cache_layer_pool(c, l);
        const bool adjacent = c->pool[p].block_bytes == unit;
        const int32_t *t = s->table[p];
        int64_t i0, nb;
        layer_span(c, s, l, from, n_full, n_compact, &i0, &nb);
        if (span_shared(c, s, l, i0, nb)) {
            SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: stage in would write a shared block of layer %d", l);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        for (int64_t i = i0; i < nb;) {
            int64_t j = i + 1;
            while (adjacent && j < nb && t[j] == t[j - 1] + 1) j++;
            void *dst;
            size_t bytes;
            SPEED_CHECK(speed_kv_cache_block_addr(c, s, l, i, &dst, &bytes));
            SPEED_CHECK(speed_backend_upload(c->p.backend, dst, mirror_of(c, p, dst), (size_t)(j - i) * unit));
            i = j;
        }
    }
    /* uploads may be asynchronous (CUDA): the mirror's blocks are reusable only once they ran */
    return speed_backend_synchronize(c->p.backend);
}

size_t speed_kv_cache_seq_wire_bytes(const speed_kv_cache_t *c, const speed_kv_seq_t *s, int64_t n_full,
                                     int64_t n_compact) {
    return speed_kv_cache_seq_wire_bytes_from(c, s, (speed_kv_from_t){0, 0}, n_full, n_compact);
}

size_t speed_kv_cache_seq_wire_bytes_from(const speed_kv_cache_t *c, const speed_kv_seq_t *s, speed_kv_from_t from,
                                          int64_t n_full, int64_t n_compact) {
    size_t n_units = 0;
    for (int l = 0; l < c->p.n_layers; l++) {
        int64_t b0, b1;
        layer_span(c, s, l, from, n_full, n_compact, &b0, &b1);
        n_units += (size_t)(b1 - b0);
    }
    return n_units * 2 * c->half_unit;
}

speed_status_t speed_kv_cache_seq_export(speed_kv_cache_t *c, const speed_kv_seq_t *s, void *buf, size_t size) {
    return speed_kv_cache_seq_export_from(c, s, (speed_kv_from_t){0, 0}, buf, size);
}

speed_status_t speed_kv_cache_seq_export_from(speed_kv_cache_t *c, const speed_kv_seq_t *s, speed_kv_from_t from,
                                              void *buf, size_t size) {
    if (from.full < 0 || from.compact < 0) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: export from a negative entry");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    size_t need = speed_kv_cache_seq_wire_bytes_from(c, s, from, s->n_full, s->n_compact);
    if (size < need || (need && !buf)) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: export needs %zu bytes, the buffer has %zu", need, size);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    char *dst = buf;
    for (int l = 0; l < c->p.n_layers; l++) {
        int64_t b0, nb;
        layer_span(c, s, l, from, s->n_full, s->n_compact, &b0, &nb);
        for (int64_t b = b0; b < nb; b++) {
            void *src;
            size_t bytes;
            SPEED_CHECK(speed_kv_cache_block_addr(c, s, l, b, &src, &bytes));
            SPEED_CHECK(speed_backend_download(c->p.backend, dst, src, bytes));
            dst += bytes;
        }
    }
    return SPEED_OK;
}

speed_status_t speed_kv_cache_seq_import(speed_kv_cache_t *c, speed_kv_seq_t *s, int64_t n_full, int64_t n_compact,
                                         const void *buf, size_t size) {
    return speed_kv_cache_seq_import_from(c, s, (speed_kv_from_t){0, 0}, n_full, n_compact, buf, size);
}

speed_status_t speed_kv_cache_seq_import_from(speed_kv_cache_t *c, speed_kv_seq_t *s, speed_kv_from_t from,
                                              int64_t n_full, int64_t n_compact, const void *buf, size_t size) {
    if (n_full < 0 || n_compact < 0 || !from_ok(s, from, n_full, n_compact)) {
        SPEED_ERROR(SPEED_SUBSYS_KV,
                    "kv cache: import of entries %lld / %lld to %lld / %lld does not fit the room %lld / %lld",
                    (long long)from.full, (long long)from.compact, (long long)n_full, (long long)n_compact,
                    (long long)s->cap_full, (long long)s->cap_compact);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    size_t need = speed_kv_cache_seq_wire_bytes_from(c, s, from, n_full, n_compact);
    if (size != need || (need && !buf)) {
        SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: import of %lld / %lld entries needs %zu bytes, got %zu",
                    (long long)n_full, (long long)n_compact, need, size);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    for (int l = 0; l < c->p.n_layers; l++) {
        int64_t b0, b1;
        layer_span(c, s, l, from, n_full, n_compact, &b0, &b1);
        if (span_shared(c, s, l, b0, b1)) {
            SPEED_ERROR(SPEED_SUBSYS_KV, "kv cache: import would write a shared block of layer %d", l);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    const char *src = buf;
    for (int l = 0; l < c->p.n_layers; l++) {
        int64_t b0, nb;
        layer_span(c, s, l, from, n_full, n_compact, &b0, &nb);
        for (int64_t b = b0; b < nb; b++) {
            void *dst;
            size_t bytes;
            SPEED_CHECK(speed_kv_cache_block_addr(c, s, l, b, &dst, &bytes));
            SPEED_CHECK(speed_backend_upload(c->p.backend, dst, src, bytes));
            src += bytes;
        }
    }
    return speed_kv_cache_seq_set_entries(c, s, n_full, n_compact);
}
