/* KV descriptor (kv_transfer.h): what a prefill node needs to write a decode node's reserved
 * blocks. Building one for a reserved sequence of a registered cache (decode side), checking one
 * that came from a peer (prefill side, and the control plane's conversion from its message),
 * freeing one.
 *
 * The descriptor has one wire form: the control plane's protobuf KvDescriptor (speed.proto,
 * converted by node/). Whatever carries it, a descriptor from a peer is untrusted until
 * speed_kv_desc_check accepts it: every remote address a transfer computes from it must lie
 * inside a region the peer registered, with no arithmetic overflow on the way.
 */
#include <string.h>

#include "alloc.h"
#include "kv_transfer.h"
#include "kv_transfer_internal.h"
#include "log.h"
#include "mac.h"

void speed_kv_desc_destroy(speed_kv_desc_t *d) {
    if (!d) return;
    speed_free(d->worker_addr);
    for (uint32_t i = 0; d->regions && i < d->n_regions; i++) speed_free(d->regions[i].rkey);
    speed_free(d->regions);
    for (uint32_t i = 0; d->pools && i < d->n_pools; i++) speed_free(d->pools[i].table);
    speed_free(d->pools);
    speed_free(d->layers);
    memset(d->nonce, 0, sizeof d->nonce);
    speed_free(d);
}

/* a + b, or false on overflow */
static bool add_u64(uint64_t a, uint64_t b, uint64_t *r) {
    if (a > UINT64_MAX - b) return false;
    *r = a + b;
    return true;
}

static bool mul_u64(uint64_t a, uint64_t b, uint64_t *r) {
    if (a && b > UINT64_MAX / a) return false;
    *r = a * b;
    return true;
}

/* ---- check ------------------------------------------------------------------------------- */

#define BAD(...)                                                      \
    do {                                                              \
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: " __VA_ARGS__); \
        return SPEED_ERR_FORMAT;                                      \
    } while (0)

speed_status_t speed_kv_desc_check(const speed_kv_desc_t *d) {
    if (!d) BAD("NULL");
    if ((unsigned)d->transport >= SPEED_KV_TRANSPORT_COUNT) BAD("unknown transport %d", (int)d->transport);
    if ((unsigned)d->dtype >= SPEED_DTYPE_COUNT) BAD("unknown dtype %d", (int)d->dtype);
    if (!d->worker_addr || d->worker_addr_len == 0 || d->worker_addr_len > SPEED_KV_DESC_MAX_BLOB)
        BAD("worker address of %u bytes", d->worker_addr_len);
    if (d->block_tokens < 1 || d->n_kv_heads < 1 || d->head_dim < 1 || d->block_tokens > 1 << 16 ||
        d->n_kv_heads > 1 << 16 || d->head_dim > 1 << 16)
        BAD("shape B %d, heads %d, head_dim %d out of range", d->block_tokens, d->n_kv_heads, d->head_dim);
    if (d->head_begin < 0 || d->head_end <= d->head_begin || d->head_end - d->head_begin != d->n_kv_heads)
        BAD("head range [%d, %d) does not hold %d heads", d->head_begin, d->head_end, d->n_kv_heads);
    if (d->model_kv_heads < 0 || (d->model_kv_heads && d->model_kv_heads < d->head_end) || d->model_kv_heads > 1 << 16)
        BAD("head range [%d, %d) of a model with %d KV heads", d->head_begin, d->head_end, d->model_kv_heads);
    uint64_t token_bytes = 2ull * (uint64_t)d->n_kv_heads * (uint64_t)d->head_dim * speed_dtype_size(d->dtype);
    if (d->unit_bytes != token_bytes * (uint64_t)d->block_tokens)
        BAD("unit of %llu bytes, the shape gives %llu", (unsigned long long)d->unit_bytes,
            (unsigned long long)(token_bytes * (uint64_t)d->block_tokens));
    if (d->n_regions < 1 || d->n_regions > SPEED_KV_DESC_MAX_REGIONS || !d->regions) BAD("%u regions", d->n_regions);
    if (d->n_pools < 1 || d->n_pools > SPEED_KV_DESC_MAX_POOLS || !d->pools) BAD("%u pools", d->n_pools);
    if (d->n_layers < 1 || d->n_layers > SPEED_KV_DESC_MAX_LAYERS || !d->layers) BAD("%u layers", d->n_layers);
    for (uint32_t r = 0; r < d->n_regions; r++) {
        const speed_kv_desc_region_t *g = &d->regions[r];
        uint64_t end;
        /* no rkey only with a nonce: a decode node that takes checked writes only */
        if ((g->rkey_len && !g->rkey) || (g->rkey_len == 0 && !d->has_nonce) || g->rkey_len > SPEED_KV_DESC_MAX_BLOB)
            BAD("region %u: rkey of %u bytes", r, g->rkey_len);
        if (g->length == 0 || !add_u64(g->base, g->length, &end)) BAD("region %u: bad extent", r);
    }
    for (uint32_t p = 0; p < d->n_pools; p++) {
        const speed_kv_desc_pool_t *pl = &d->pools[p];
        if (pl->region >= d->n_regions) BAD("pool %u: region %u of %u", p, pl->region, d->n_regions);
        if (pl->n_blocks > SPEED_KV_DESC_MAX_BLOCKS || (pl->n_blocks && !pl->table))
            BAD("pool %u: %u blocks", p, pl->n_blocks);
        if (pl->block_stride < d->unit_bytes)
            BAD("pool %u: block stride %llu < unit", p, (unsigned long long)pl->block_stride);
    }
    uint64_t total = 0;
    for (uint32_t l = 0; l < d->n_layers; l++) {
        const speed_kv_desc_layer_t *ly = &d->layers[l];
        if (ly->pool >= d->n_pools) BAD("layer %u: pool %u of %u", l, ly->pool, d->n_pools);
        const speed_kv_desc_pool_t *pl = &d->pools[ly->pool];
        const speed_kv_desc_region_t *g = &d->regions[pl->region];
        if (ly->entries < 0) BAD("layer %u: %lld entries", l, (long long)ly->entries);
        if (ly->offset > pl->block_stride - d->unit_bytes)
            BAD("layer %u: offset %llu past the block", l, (unsigned long long)ly->offset);
        uint64_t nb = ((uint64_t)ly->entries + (uint64_t)d->block_tokens - 1) / (uint64_t)d->block_tokens;
        if (nb > pl->n_blocks)
            BAD("layer %u: %llu blocks, the pool table has %u", l, (unsigned long long)nb, pl->n_blocks);
        if (ly->first_block < 0 || (uint64_t)ly->first_block > nb)
            BAD("layer %u: first block %lld of %llu", l, (long long)ly->first_block, (unsigned long long)nb);
        for (uint64_t i = 0; i < nb; i++) {
            uint64_t a, end;
            if (pl->table[i] < 0 || !mul_u64((uint64_t)pl->table[i], pl->block_stride, &a) ||
                !add_u64(a, pl->base, &a) || !add_u64(a, ly->offset, &a) || !add_u64(a, d->unit_bytes, &end) ||
                a < g->base || end > g->base + g->length)
                BAD("layer %u block %llu (id %d) lies outside region %u", l, (unsigned long long)i, pl->table[i],
                    pl->region);
        }
        uint64_t bytes;
        if (!mul_u64(desc_layer_sent(ly, d->block_tokens), token_bytes, &bytes) || !add_u64(total, bytes, &total))
            BAD("byte total overflows");
    }
    if (total != d->total_bytes)
        BAD("total of %llu bytes, the layers give %llu", (unsigned long long)d->total_bytes, (unsigned long long)total);
    return SPEED_OK;
}

/* ---- building (decode side) --------------------------------------------------------------- */

/* The first block a sender writes of a layer with `entries` entries whose first `in_place` are
 * there already: the block holding entry in_place (its entries before in_place are carried
 * again: the same bytes), or past the last block when nothing is missing. As kv_cache.c's
 * partial-transfer span, so that the grant and what the engine awaits agree. */
static int64_t first_block_of(int64_t in_place, int64_t entries, int B) {
    return in_place < entries ? in_place / B : div_up(entries, B);
}

/* Pool address of the pool's block 0 (layer offsets are relative to it, in the pool and in the
 * mirror alike). */
static const char *pool_base(const speed_kv_cache_t *cache, speed_kv_pool_t p) {
    int first = p == SPEED_KV_POOL_LOWER ? 0 : speed_kv_cache_split_layer(cache);
    return speed_kv_cache_layer(cache, first).k_base;
}

speed_status_t speed_kv_desc_build(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache, const speed_kv_seq_t *seq,
                                   int64_t n_full, int64_t n_compact, const speed_kv_desc_params_t *params,
                                   speed_kv_desc_t **desc_p) {
    if (!c || !cache || !seq || !params || !desc_p) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if ((unsigned)params->transport >= SPEED_KV_TRANSPORT_COUNT) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: unknown transport %d", (int)params->transport);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const int L = speed_kv_cache_n_layers(cache), B = speed_kv_cache_block_tokens(cache);
    const int C = speed_kv_seq_prefill_layers(seq);
    const speed_kv_layer_t l0 = speed_kv_cache_layer(cache, 0);
    const size_t token_bytes = speed_kv_cache_token_bytes(cache);
    kv_region_t *reg[SPEED_KV_POOL_COUNT];
    int pool_index[SPEED_KV_POOL_COUNT] = {-1, -1};
    int64_t pool_entries[SPEED_KV_POOL_COUNT] = {0, 0};
    uint32_t n_pools = 0;
    const speed_kv_from_t from = params->from;
    pthread_mutex_lock(&c->mu);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) reg[p] = speed_kv_xfer_ctx_region_find(c, cache, (speed_kv_pool_t)p);
    pthread_mutex_unlock(&c->mu);
    for (int l = 0; l < L; l++) {
        int64_t e = l < C ? n_full : n_compact;
        speed_kv_pool_t p = speed_kv_cache_layer_pool(cache, l);
        if (e < 0 || e > speed_kv_seq_capacity(seq, l)) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: layer %d needs %lld entries, the sequence has room for %lld",
                        l, (long long)e, (long long)speed_kv_seq_capacity(seq, l));
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (!reg[p]) {
            SPEED_ERROR(SPEED_SUBSYS_NET,
                        "kv descriptor: the cache's %s pool is not registered "
                        "(speed_kv_xfer_ctx_register_cache)",
                        p == 0 ? "lower" : "upper");
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        int64_t f = l < C ? from.full : from.compact;
        if (f < 0 || f > e) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: layer %d: %lld entries in place of %lld", l, (long long)f,
                        (long long)e);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        /* The blocks a sender will write must be this sequence's alone: a prefix cache hit
         * shares whole blocks read-only, and only before its first entry not in place. */
        const int32_t *table = speed_kv_seq_block_table(seq, l);
        for (int64_t b = first_block_of(f, e, B); b < div_up(e, B); b++)
            if (speed_kv_cache_block_refs(cache, p, table[b]) > 1) {
                SPEED_ERROR(SPEED_SUBSYS_NET,
                            "kv descriptor: layer %d block %lld is shared (a prefix cache hit): a sender must not "
                            "write it (%lld entries in place)",
                            l, (long long)b, (long long)f);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        if (pool_index[p] < 0) pool_index[p] = (int)n_pools++;
        if (e > pool_entries[p]) pool_entries[p] = e;
    }
    speed_kv_desc_t *d = speed_calloc(1, sizeof *d);
    if (!d) goto nomem;
    d->worker_addr = speed_malloc(c->addr_len);
    d->regions = speed_calloc(n_pools, sizeof *d->regions);
    d->pools = speed_calloc(n_pools, sizeof *d->pools);
    d->layers = speed_calloc((size_t)L, sizeof *d->layers);
    if (!d->worker_addr || !d->regions || !d->pools || !d->layers) goto nomem;
    d->n_regions = d->n_pools = n_pools;
    d->n_layers = (uint32_t)L;
    memcpy(d->worker_addr, c->addr, c->addr_len);
    d->worker_addr_len = (uint32_t)c->addr_len;
    d->transport = params->transport;
    d->block_tokens = B;
    d->n_kv_heads = l0.n_kv_heads;
    d->head_dim = l0.head_dim;
    d->head_begin = speed_kv_cache_head_begin(cache);
    d->head_end = d->head_begin + l0.n_kv_heads;
    d->model_kv_heads = speed_kv_cache_model_kv_heads(cache);
    d->dtype = l0.dtype;
    d->unit_bytes = speed_kv_cache_unit_bytes(cache);
    d->epoch = c->epoch;
    d->lease_ms = params->lease_ms > 0 ? params->lease_ms : 0;
    d->cookie = params->cookie;
    d->integrity = params->integrity;
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        if (pool_index[p] < 0) continue;
        int i = pool_index[p];
        kv_region_t *r = reg[p];
        d->regions[i].base = (uint64_t)(uintptr_t)r->base;
        d->regions[i].length = r->length;
        d->regions[i].rkey_len = (uint32_t)r->rkey_len;
        if (!(d->regions[i].rkey = speed_malloc(r->rkey_len))) goto nomem;
        memcpy(d->regions[i].rkey, r->rkey, r->rkey_len);
        int first = p == SPEED_KV_POOL_LOWER ? 0 : speed_kv_cache_split_layer(cache);
        speed_kv_layer_t kl = speed_kv_cache_layer(cache, first);
        d->pools[i].region = (uint32_t)i;
        d->pools[i].base = (uint64_t)(uintptr_t)r->base;
        d->pools[i].block_stride = kl.block_stride;
        d->pools[i].n_blocks = (uint32_t)div_up(pool_entries[p], B);
        if (!(d->pools[i].table =
                  speed_malloc((size_t)(d->pools[i].n_blocks ? d->pools[i].n_blocks : 1) * sizeof(int32_t))))
            goto nomem;
        if (d->pools[i].n_blocks)
            memcpy(d->pools[i].table, speed_kv_seq_block_table(seq, first), d->pools[i].n_blocks * sizeof(int32_t));
    }
    uint64_t total = 0;
    for (int l = 0; l < L; l++) {
        speed_kv_pool_t p = speed_kv_cache_layer_pool(cache, l);
        speed_kv_layer_t kl = speed_kv_cache_layer(cache, l);
        d->layers[l].pool = (uint32_t)pool_index[p];
        d->layers[l].offset = (uint64_t)((const char *)kl.k_base - pool_base(cache, p));
        d->layers[l].entries = l < C ? n_full : n_compact;
        d->layers[l].first_block = first_block_of(l < C ? from.full : from.compact, d->layers[l].entries, B);
        total += desc_layer_sent(&d->layers[l], B) * token_bytes;
    }
    d->total_bytes = total;
    if (speed_kv_desc_check(d) != SPEED_OK) { /* a bug: logged there */
        speed_kv_desc_destroy(d);
        return SPEED_ERR_INTERNAL;
    }
    if (params->grant_id) {
        /* the reservation's secret: whoever writes these blocks must prove it learned it */
        speed_status_t st = speed_random_bytes(d->nonce, sizeof d->nonce);
        if (st == SPEED_OK) {
            d->has_nonce = true;
            /* device pools (cuda_direct, no mirror): the receiver cannot copy a write there */
            bool device = !speed_kv_cache_host_mirror(cache) && !speed_kv_cache_host_memory(cache);
            st = speed_kv_grant_add(c, params->grant_id, d, params->grant_ms, cache, device);
        }
        if (st != SPEED_OK) {
            speed_kv_desc_destroy(d);
            return st;
        }
        if (c->p.writes_only) /* no capability leaves the node: only the checked writes reach the pools */
            for (uint32_t i = 0; i < d->n_regions; i++) {
                speed_free(d->regions[i].rkey);
                d->regions[i].rkey = NULL;
                d->regions[i].rkey_len = 0;
            }
    } else if (params->integrity) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: integrity mode needs a grant (grant_id)");
        speed_kv_desc_destroy(d);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    *desc_p = d;
    return SPEED_OK;
nomem:
    SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: out of memory");
    speed_kv_desc_destroy(d);
    return SPEED_ERR_NO_MEMORY;
}

speed_status_t speed_kv_engine_seq_entries(speed_engine_t *engine, speed_seq_id_t seq, speed_kv_seq_t **kv_p,
                                           int64_t *n_full_p, int64_t *n_compact_p) {
    speed_engine_seq_stats_t ss;
    SPEED_CHECK(speed_engine_seq_stats(engine, seq, &ss));
    SPEED_CHECK(speed_engine_seq_kv(engine, seq, kv_p));
    speed_kv_entries_for(ss.n_prompt, ss.depth.anchors, ss.depth.tail, 0, n_full_p, n_compact_p);
    return SPEED_OK;
}

speed_status_t speed_kv_desc_build_engine(speed_kv_xfer_ctx_t *c, speed_engine_t *engine, speed_seq_id_t seq,
                                          const speed_kv_desc_params_t *params, speed_kv_desc_t **desc_p) {
    if (!engine) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: NULL engine");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (!params) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: NULL params");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_seq_t *kv;
    int64_t n_full, n_compact;
    SPEED_CHECK(speed_kv_engine_seq_entries(engine, seq, &kv, &n_full, &n_compact));
    speed_engine_seq_stats_t ss;
    SPEED_CHECK(speed_engine_seq_stats(engine, seq, &ss));
    /* what the engine awaits: the units past its prefix cache hit (none: the whole layout) */
    speed_kv_desc_params_t p = *params;
    p.from = speed_kv_from_cached(ss.n_cached, ss.n_prompt, ss.depth.anchors);
    return speed_kv_desc_build(c, speed_engine_kv_cache(engine), kv, n_full, n_compact, &p, desc_p);
}
