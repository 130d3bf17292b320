/* KV descriptor: the production wire format and speed_kv_desc_check against a malicious peer.
 *
 *   round trip: a descriptor built for a reservation (and one for a tensor-parallel head range)
 *              goes through the control plane's protobuf KvDescriptor (xfer_desc_wire.h) and
 *              comes back equal field for field (but the cookie, which the message does not
 *              carry); a transfer with the round-tripped descriptor lands byte for byte
 *   tampering: every field a peer controls, pushed just past what is safe (a block id one past
 *              the region's last block, negative ids, a region one byte short of its blocks,
 *              offsets and bases that overflow, counts, head ranges, shapes, totals, a partial
 *              transfer's first block): refused by speed_kv_desc_check with SPEED_ERR_FORMAT and
 *              its reason, refused by the production conversion, and refused by
 *              speed_kv_xfer_create; the untampered
 *              descriptor, and values exactly at the bounds, are accepted
 *
 * Caches are used directly (cpu-ref backend, no model): L = 4 layers, 2 heads of 8, f32, B = 4,
 * 24 blocks per pool; the decode cache is split at 3, the prefill cache at C = 2. */
#include <limits.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "kv_cache.h"
#include "kv_transfer.h"
#include "log.h"
#include "xfer_desc_wire.h"
#include "xfer_test_util.h"

#define L         4
#define C         2
#define B         4
#define N_BLOCKS  24
#define N_FULL    13 /* 4 blocks, the last partial */
#define N_COMPACT 2  /* anchor + tail */

typedef struct {
    speed_kv_cache_t *cache;
    speed_kv_seq_t *seq;
} node_t;

static speed_backend_t *g_be;

static void quiet_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                       const char *line) {
    (void)user, (void)level, (void)subsys, (void)request_id, (void)line;
}

static int node_init(node_t *n, int split, int head_begin, int n_heads, int model_heads) {
    memset(n, 0, sizeof *n);
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = g_be;
    p.n_layers = L;
    p.split_layer = split;
    p.n_kv_heads = n_heads;
    p.head_dim = 8;
    p.head_begin = head_begin;
    p.model_kv_heads = model_heads;
    p.dtype = SPEED_DTYPE_F32;
    p.block_tokens = B;
    p.n_blocks[0] = p.n_blocks[1] = N_BLOCKS;
    if (speed_kv_cache_create(&p, &n->cache) != SPEED_OK) return -1;
    return speed_kv_cache_seq_create(n->cache, C, N_FULL, N_COMPACT, &n->seq) == SPEED_OK ? 0 : -1;
}

static void node_cleanup(node_t *n) {
    if (n->cache) speed_kv_cache_seq_destroy(n->cache, n->seq);
    speed_kv_cache_destroy(n->cache);
    memset(n, 0, sizeof *n);
}

static int64_t entries(int layer) { return layer < C ? N_FULL : N_COMPACT; }

static int64_t div_up_(int64_t a, int64_t b) { return (a + b - 1) / b; }

static uint8_t pat(int layer, int64_t e, size_t i) { return (uint8_t)(3 + 31 * layer + 7 * e + i); }

/* The prefill sequence's entries hold the pattern (K and V rows alike). */
static void fill(node_t *n) {
    size_t tb = speed_kv_cache_token_bytes(n->cache);
    for (int l = 0; l < L; l++)
        for (int64_t e = 0; e < entries(l); e++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(n->cache, n->seq, l, e / B, &blk, &unit);
            for (int h = 0; h < 2; h++)
                for (size_t i = 0; i < tb / 2; i++)
                    ((uint8_t *)blk)[(size_t)h * (unit / 2) + (size_t)(e % B) * (tb / 2) + i] = pat(l, e, i);
        }
    speed_kv_cache_seq_set_entries(n->cache, n->seq, N_FULL, N_COMPACT);
}

/* Mismatches of the decode sequence's entries against the pattern. */
static int verify(node_t *n) {
    size_t tb = speed_kv_cache_token_bytes(n->cache);
    int bad = 0;
    for (int l = 0; l < L; l++)
        for (int64_t e = 0; e < entries(l); e++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(n->cache, n->seq, l, e / B, &blk, &unit);
            for (int h = 0; h < 2; h++)
                for (size_t i = 0; i < tb / 2; i++)
                    bad += ((uint8_t *)blk)[(size_t)h * (unit / 2) + (size_t)(e % B) * (tb / 2) + i] != pat(l, e, i);
        }
    return bad;
}

static void *dup_bytes(const void *p, size_t n) {
    void *q = speed_malloc(n ? n : 1);
    if (n) memcpy(q, p, n);
    return q;
}

/* A deep copy to tamper with (freed with speed_kv_desc_destroy). */
static speed_kv_desc_t *clone(const speed_kv_desc_t *d) {
    speed_kv_desc_t *t = speed_calloc(1, sizeof *t);
    *t = *d;
    t->worker_addr = dup_bytes(d->worker_addr, d->worker_addr_len);
    t->regions = dup_bytes(d->regions, d->n_regions * sizeof *d->regions);
    t->pools = dup_bytes(d->pools, d->n_pools * sizeof *d->pools);
    t->layers = dup_bytes(d->layers, d->n_layers * sizeof *d->layers);
    for (uint32_t r = 0; r < d->n_regions; r++)
        t->regions[r].rkey = dup_bytes(d->regions[r].rkey, d->regions[r].rkey_len);
    for (uint32_t p = 0; p < d->n_pools; p++)
        t->pools[p].table = dup_bytes(d->pools[p].table, d->pools[p].n_blocks * sizeof(int32_t));
    return t;
}

/* Pack, unpack: what a prefill node makes of the descriptor (*back_p set on SPEED_OK only). */
static speed_status_t through_wire(const speed_kv_desc_t *d, speed_kv_desc_t **back_p) {
    uint8_t *buf = NULL;
    size_t len = 0;
    speed_status_t st = xt_desc_pack(d, &buf, &len);
    if (st == SPEED_OK) st = xt_desc_unpack(buf, len, back_p);
    speed_free(buf);
    return st;
}

/* ---- round trip ------------------------------------------------------------------------------ */

static void check_equal(const speed_kv_desc_t *a, const speed_kv_desc_t *b) {
    CHECK_INT_EQ(b->worker_addr_len, a->worker_addr_len);
    CHECK(memcmp(b->worker_addr, a->worker_addr, a->worker_addr_len) == 0);
    CHECK_INT_EQ(b->transport, a->transport);
    CHECK_INT_EQ(b->n_regions, a->n_regions);
    CHECK_INT_EQ(b->n_pools, a->n_pools);
    CHECK_INT_EQ(b->n_layers, a->n_layers);
    if (b->n_regions != a->n_regions || b->n_pools != a->n_pools || b->n_layers != a->n_layers) return;
    for (uint32_t r = 0; r < a->n_regions; r++) {
        CHECK_INT_EQ(b->regions[r].base, a->regions[r].base);
        CHECK_INT_EQ(b->regions[r].length, a->regions[r].length);
        CHECK_INT_EQ(b->regions[r].rkey_len, a->regions[r].rkey_len);
        CHECK(memcmp(b->regions[r].rkey, a->regions[r].rkey, a->regions[r].rkey_len) == 0);
    }
    for (uint32_t p = 0; p < a->n_pools; p++) {
        CHECK_INT_EQ(b->pools[p].region, a->pools[p].region);
        CHECK_INT_EQ(b->pools[p].base, a->pools[p].base);
        CHECK_INT_EQ(b->pools[p].block_stride, a->pools[p].block_stride);
        CHECK_INT_EQ(b->pools[p].n_blocks, a->pools[p].n_blocks);
        CHECK(memcmp(b->pools[p].table, a->pools[p].table, a->pools[p].n_blocks * sizeof(int32_t)) == 0);
    }
    for (uint32_t l = 0; l < a->n_layers; l++) {
        CHECK_INT_EQ(b->layers[l].pool, a->layers[l].pool);
        CHECK_INT_EQ(b->layers[l].offset, a->layers[l].offset);
        CHECK_INT_EQ(b->layers[l].entries, a->layers[l].entries);
        CHECK_INT_EQ(b->layers[l].first_block, a->layers[l].first_block);
    }
    CHECK_INT_EQ(b->block_tokens, a->block_tokens);
    CHECK_INT_EQ(b->n_kv_heads, a->n_kv_heads);
    CHECK_INT_EQ(b->head_dim, a->head_dim);
    CHECK_INT_EQ(b->head_begin, a->head_begin);
    CHECK_INT_EQ(b->head_end, a->head_end);
    CHECK_INT_EQ(b->model_kv_heads, a->model_kv_heads);
    CHECK_INT_EQ(b->dtype, a->dtype);
    CHECK_INT_EQ(b->unit_bytes, a->unit_bytes);
    CHECK_INT_EQ(b->total_bytes, a->total_bytes);
    CHECK_INT_EQ(b->epoch, a->epoch);
    CHECK_INT_EQ(b->lease_ms, a->lease_ms);
    CHECK_INT_EQ(b->cookie, 0); /* not in the message */
}

static void test_round_trip(speed_kv_xfer_ctx_t *dctx, const speed_kv_desc_t *desc) {
    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK(xt_desc_pack(desc, &buf, &len) == SPEED_OK);
    fprintf(stderr, "descriptor of %u layers, %u pools: %zu bytes as a KvDescriptor (worker address %u, rkeys %u)\n",
            desc->n_layers, desc->n_pools, len, desc->worker_addr_len, desc->regions[0].rkey_len);
    speed_free(buf);
    speed_kv_desc_t *back = NULL;
    CHECK(through_wire(desc, &back) == SPEED_OK);
    if (back) check_equal(desc, back);
    speed_kv_desc_destroy(back);

    /* a tensor-parallel rank's descriptor: heads [1, 3) of 4 */
    node_t r;
    CHECK(node_init(&r, 3, 1, 2, 4) == 0);
    CHECK(speed_kv_xfer_ctx_register_cache(dctx, r.cache) == SPEED_OK);
    speed_kv_desc_params_t dp = {.transport = SPEED_KV_TRANSPORT_TCP, .lease_ms = 12345};
    speed_kv_desc_t *tp = NULL;
    CHECK(speed_kv_desc_build(dctx, r.cache, r.seq, N_FULL, N_COMPACT, &dp, &tp) == SPEED_OK);
    back = NULL;
    CHECK(tp && through_wire(tp, &back) == SPEED_OK);
    if (back) {
        check_equal(tp, back);
        CHECK_INT_EQ(back->head_begin, 1);
        CHECK_INT_EQ(back->head_end, 3);
        CHECK_INT_EQ(back->model_kv_heads, 4);
        CHECK_INT_EQ(back->transport, SPEED_KV_TRANSPORT_TCP);
        CHECK_INT_EQ(back->lease_ms, 12345);
    }
    speed_kv_desc_destroy(back);
    speed_kv_desc_destroy(tp);
    speed_kv_xfer_ctx_deregister_cache(dctx, r.cache);
    node_cleanup(&r);

    /* bytes that are no KvDescriptor */
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    back = NULL;
    CHECK(xt_desc_unpack(junk, sizeof junk, &back) == SPEED_ERR_PARSE && !back);
}

/* ---- tampering ------------------------------------------------------------------------------- */

/* Bytes from the region's base to the end of the furthest unit that the layers of pool p use:
 * the shortest region length that holds them. */
static uint64_t units_end(const speed_kv_desc_t *d, uint32_t p) {
    const speed_kv_desc_pool_t *pl = &d->pools[p];
    uint64_t end = 0;
    for (uint32_t l = 0; l < d->n_layers; l++) {
        if (d->layers[l].pool != p) continue;
        for (int64_t i = 0; i * d->block_tokens < d->layers[l].entries; i++) {
            uint64_t e = pl->base + (uint64_t)pl->table[i] * pl->block_stride + d->layers[l].offset + d->unit_bytes;
            if (e > end) end = e;
        }
    }
    return end - d->regions[pl->region].base;
}

/* The pool of layer 0 (the lower pool: it holds the full-depth layers' 4 blocks). */
#define P0(t) (&(t)->pools[(t)->layers[0].pool])
#define R0(t) (&(t)->regions[P0(t)->region])

typedef struct {
    const char *what;
    speed_status_t check; /* speed_kv_desc_check's verdict */
    speed_status_t wire;  /* the production conversion's; NOT_SENT: arrays shorter than the
                            * tampered counts (to_proto would read past them), or empty ones
                            * (to_proto does not free its element storage for a count of 0) */
    const char *reason;   /* in the logged error */
} tamper_t;

#define NOT_SENT ((speed_status_t)(SPEED_OK + 1))
#define FMT      SPEED_ERR_FORMAT
#define PROTO    SPEED_ERR_PEER_PROTOCOL

#define T(...) \
    return (tamper_t) { __VA_ARGS__ }

/* Applies tampering k to t; returns its description, or what == NULL past the last one. */
static tamper_t tamper(speed_kv_desc_t *t, int k) {
    speed_kv_desc_pool_t *p0 = P0(t);
    speed_kv_desc_region_t *r0 = R0(t);
    const uint32_t last = p0->n_blocks - 1;
    const uint64_t room = (r0->base + r0->length - p0->base) / p0->block_stride; /* blocks the region holds */
    switch (k) {
    /* block ids and the region bound */
    case 0: p0->table[last] = (int32_t)room; T("block id one past the region's last block", FMT, FMT, "outside region");
    case 1: p0->table[last] = (int32_t)room - 1; T("block id of the region's last block", SPEED_OK, SPEED_OK, NULL);
    case 2: p0->table[0] = -1; T("negative block id", FMT, FMT, "outside region");
    case 3: p0->table[0] = INT32_MIN; T("most negative block id", FMT, FMT, "outside region");
    case 4: p0->table[0] = INT32_MAX; T("largest block id", FMT, FMT, "outside region");
    case 5:
        r0->length = units_end(t, t->layers[0].pool) - 1;
        T("region one byte shorter than its blocks", FMT, FMT, "outside region");
    case 6:
        r0->length = units_end(t, t->layers[0].pool);
        T("region exactly as long as its blocks", SPEED_OK, SPEED_OK, NULL);
    case 7:
        p0->base = r0->base - p0->block_stride;
        p0->table[0] = 0;
        T("pool base below the region (block 0 before it)", FMT, FMT, "outside region");
    case 8:
        p0->table[0] = 0;
        r0->base += 1;
        r0->length -= 1;
        T("region starting one byte after the pool", FMT, FMT, "outside region");
    /* overflows */
    case 9: p0->base = UINT64_MAX - 16; T("pool base + block overflows", FMT, FMT, "outside region");
    case 10:
        p0->block_stride = UINT64_MAX / 2 + 1;
        T("block stride 2^63: ids past 1 overflow", FMT, FMT, "outside region");
    case 11: t->layers[0].offset = UINT64_MAX - 8; T("layer offset overflows", FMT, FMT, "past the block");
    case 12:
        t->layers[0].offset = p0->block_stride - t->unit_bytes + 1;
        T("unit sticking out of its block", FMT, FMT, "past the block");
    case 13: r0->length = UINT64_MAX - r0->base + 1; T("region extent overflows", FMT, FMT, "bad extent");
    case 14: r0->length = 0; T("empty region", FMT, FMT, "bad extent");
    /* counts and indices */
    case 15: p0->n_blocks = last; T("pool table one block short of the entries", FMT, FMT, "the pool table has");
    case 16: p0->n_blocks = SPEED_KV_DESC_MAX_BLOCKS + 1; T("pool table past the limit", FMT, NOT_SENT, "blocks");
    case 17: t->layers[2].pool = t->n_pools; T("layer's pool index out of range", FMT, FMT, "layer 2: pool");
    case 18: p0->region = t->n_regions; T("pool's region index out of range", FMT, FMT, ": region");
    case 19: t->n_layers = SPEED_KV_DESC_MAX_LAYERS + 1; T("layers past the limit", FMT, NOT_SENT, "layers");
    case 20: t->n_pools = SPEED_KV_DESC_MAX_POOLS + 1; T("pools past the limit", FMT, NOT_SENT, "pools");
    case 21: t->n_regions = SPEED_KV_DESC_MAX_REGIONS + 1; T("regions past the limit", FMT, NOT_SENT, "regions");
    case 22: t->n_layers = 0; T("no layers", FMT, NOT_SENT, "layers");
    case 23: t->n_pools = 0; T("no pools", FMT, NOT_SENT, "pools");
    case 24: t->n_regions = 0; T("no regions", FMT, NOT_SENT, "regions");
    case 25: t->worker_addr_len = 0; T("empty worker address", FMT, FMT, "worker address");
    case 26:
        t->worker_addr_len = SPEED_KV_DESC_MAX_BLOB + 1;
        T("worker address past the limit", FMT, NOT_SENT, "worker address");
    case 27: r0->rkey_len = 0; T("empty rkey", FMT, FMT, "rkey");
    /* entries and totals */
    case 28: t->layers[0].entries = -1; T("negative entries", FMT, FMT, "entries");
    case 29: t->layers[0].entries = INT64_MAX; T("entries past any table", FMT, FMT, "the pool table has");
    case 30: t->layers[3].entries += 1; T("entries that the total does not count", FMT, FMT, "total");
    case 31: t->total_bytes += 1; T("total bytes", FMT, FMT, "total");
    /* head ranges */
    case 32:
        t->head_begin = -1;
        t->head_end = 1;
        T("negative head_begin", FMT, FMT, "head range");
    case 33: t->head_end = t->head_begin; T("empty head range", FMT, FMT, "head range");
    case 34:
        t->head_end += 1;
        t->model_kv_heads = t->head_end; /* the model has the heads: only n_kv_heads refuses it */
        T("head range one wider than n_kv_heads", FMT, FMT, "does not hold");
    case 35:
        t->head_begin = INT32_MAX - 2;
        t->head_end = INT32_MAX;
        T("head range past the model's heads", FMT, FMT, "of a model with");
    case 36: t->model_kv_heads = t->head_end - 1; T("model with fewer heads than the range", FMT, FMT, "head range");
    case 37: t->model_kv_heads = -1; T("negative model head count", FMT, FMT, "head range");
    case 38: t->model_kv_heads = 0; T("model head count not stated", SPEED_OK, SPEED_OK, NULL);
    /* shape */
    case 39: t->block_tokens = 0; T("B = 0", FMT, FMT, "shape");
    case 40:
        t->n_kv_heads = 1 << 17;
        t->head_begin = 0;
        t->head_end = 1 << 17;
        t->model_kv_heads = 0;
        T("n_kv_heads past the limit", FMT, FMT, "shape");
    case 41: t->head_dim = -8; T("negative head_dim", FMT, FMT, "shape");
    case 42: t->unit_bytes /= 2; T("unit bytes not the shape's", FMT, FMT, "unit of");
    case 43: p0->block_stride = t->unit_bytes - 1; T("block stride below a unit", FMT, FMT, "stride");
    case 44: t->transport = (speed_kv_transport_t)7; T("unknown transport", FMT, PROTO, "transport");
    case 45: t->dtype = (speed_dtype_t)SPEED_DTYPE_COUNT; T("unknown dtype", FMT, PROTO, "dtype");
    /* a partial transfer's first block (a prefix cache hit on the decode node) */
    case 46: t->layers[0].first_block = -1; T("negative first block", FMT, FMT, "first block");
    case 47:
        t->layers[0].first_block = div_up_(t->layers[0].entries, t->block_tokens) + 1;
        T("first block past the layer's last", FMT, FMT, "first block");
    case 48: t->layers[0].first_block = 1; T("first block the total still counts", FMT, FMT, "total");
    case 49:
        t->layers[0].first_block = 1;
        t->total_bytes -= t->unit_bytes; /* one whole block of layer 0 (full: N_FULL > B) */
        T("first block 1, the total without it", SPEED_OK, SPEED_OK, NULL);
    case 50:
        t->layers[0].first_block = div_up_(t->layers[0].entries, t->block_tokens);
        t->total_bytes -= (uint64_t)t->layers[0].entries * (t->unit_bytes / (uint64_t)t->block_tokens);
        T("nothing to send for layer 0", SPEED_OK, SPEED_OK, NULL);
    }
    return (tamper_t){NULL, SPEED_OK, SPEED_OK, NULL};
}

static void test_tampering(speed_kv_xfer_ctx_t *pctx, node_t *pre, const speed_kv_desc_t *desc) {
    CHECK(speed_kv_desc_check(desc) == SPEED_OK);
    CHECK_INT_EQ(P0(desc)->n_blocks, 4);
    CHECK(P0(desc)->base == R0(desc)->base); /* block 0 of the pool starts the region */
    int n = 0;
    xt_ledger_t base;
    xt_ledger_take(&base, (const speed_kv_cache_t *const[]){pre->cache, NULL},
                   (speed_kv_xfer_ctx_t *const[]){pctx, NULL});
    for (int k = 0;; k++) {
        const int64_t live0 = speed_alloc_live_count();
        speed_kv_desc_t *t = clone(desc);
        const uint32_t n_regions = t->n_regions, n_pools = t->n_pools, n_layers = t->n_layers;
        const uint32_t n_blocks = P0(t)->n_blocks;
        tamper_t tp = tamper(t, k);
        if (!tp.what) {
            speed_kv_desc_destroy(t);
            break;
        }
        n++;
        speed_log_set_sink(quiet_sink, NULL);
        speed_log_clear_last_error();
        speed_status_t st = speed_kv_desc_check(t);
        const char *err = speed_log_last_error();
        CHECK_MSG(st == tp.check, "%s: check says %s", tp.what, speed_status_string(st));
        if (tp.reason)
            CHECK_MSG(err && strstr(err, tp.reason), "%s: logged \"%s\", want \"%s\"", tp.what, err, tp.reason);
        if (tp.wire != NOT_SENT) {
            speed_kv_desc_t *back = NULL;
            speed_status_t ws = through_wire(t, &back);
            CHECK_MSG(ws == tp.wire, "%s: the wire path says %s", tp.what, speed_status_string(ws));
            if (ws == SPEED_OK)
                speed_kv_desc_destroy(back);
            else
                CHECK_MSG(back == NULL, "%s: a refused conversion set a descriptor", tp.what);
        }
        if (tp.check != SPEED_OK) { /* the sender refuses it too, before any UCX call */
            speed_kv_xfer_t *x = NULL;
            st = speed_kv_xfer_create(pctx, t, pre->cache, pre->seq, N_FULL, N_COMPACT, "req-tampered", &x);
            CHECK_MSG(st == SPEED_ERR_PEER_PROTOCOL && !x, "%s: create says %s", tp.what, speed_status_string(st));
            speed_kv_xfer_destroy(x);
        }
        speed_log_set_sink(NULL, NULL);
        t->n_regions = n_regions, t->n_pools = n_pools, t->n_layers = n_layers;
        P0(t)->n_blocks = n_blocks;
        speed_kv_desc_destroy(t);
        /* a refusal anywhere (check, wire conversion, create) leaves nothing allocated */
        CHECK_MSG(speed_alloc_live_count() == live0, "%s: %lld allocations left behind", tp.what,
                  (long long)(speed_alloc_live_count() - live0));
    }
    CHECK_INT_EQ(n, 51);
    xt_ledger_check(&base, "tampered descriptors refused"); /* no transfer, blocks and sequences as before */
    speed_kv_xfer_ctx_stats_t ps;
    speed_kv_xfer_ctx_stats(pctx, &ps);
    CHECK_INT_EQ(ps.n_started, 0);
    CHECK_INT_EQ(ps.bytes_put, 0);
}

int main(void) {
    xt_ucx_env();
    if (getenv("SPEED_LOG")) speed_log_configure(getenv("SPEED_LOG"));
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    CHECK(speed_backend_create(&bp, &g_be) == SPEED_OK);
    if (!g_be) return CHECK_DONE();
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    speed_kv_xfer_ctx_t *pctx = NULL, *dctx = NULL;
    CHECK(speed_kv_xfer_ctx_create(&cp, &pctx) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_create(&cp, &dctx) == SPEED_OK);
    node_t pre, dec;
    CHECK(node_init(&pre, C, 0, 2, 2) == 0);
    CHECK(node_init(&dec, 3, 0, 2, 2) == 0);
    if (!pctx || !dctx || !pre.cache || !dec.cache) return CHECK_DONE();
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, pre.cache) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(dctx, dec.cache) == SPEED_OK);
    speed_kv_desc_params_t dp = {.transport = SPEED_KV_TRANSPORT_SHM, .cookie = 42};
    speed_kv_desc_t *desc = NULL;
    CHECK(speed_kv_desc_build(dctx, dec.cache, dec.seq, N_FULL, N_COMPACT, &dp, &desc) == SPEED_OK);
    if (!desc) return CHECK_DONE();

    test_round_trip(dctx, desc);
    test_tampering(pctx, &pre, desc);

    /* the untampered descriptor, after the trip, carries a transfer that lands byte for byte */
    speed_kv_desc_t *back = NULL;
    CHECK(through_wire(desc, &back) == SPEED_OK);
    fill(&pre);
    speed_kv_xfer_t *x = NULL;
    CHECK(back && speed_kv_xfer_create(pctx, back, pre.cache, pre.seq, N_FULL, N_COMPACT, "req-wire", &x) == SPEED_OK);
    if (x) {
        CHECK(speed_kv_xfer_push_all(x) == SPEED_OK);
        CHECK(speed_kv_xfer_finish(x) == SPEED_OK);
        CHECK(speed_kv_xfer_wait(x, -1) == SPEED_OK);
        CHECK_INT_EQ(verify(&dec), 0);
    }
    speed_kv_xfer_destroy(x);
    speed_kv_desc_destroy(back);

    speed_kv_desc_destroy(desc);
    speed_kv_xfer_ctx_destroy(pctx);
    speed_kv_xfer_ctx_destroy(dctx);
    node_cleanup(&pre);
    node_cleanup(&dec);
    speed_backend_destroy(g_be);
    return CHECK_DONE();
}
