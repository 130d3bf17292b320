/* The partial transfer (docs/prefix-cache.md#in-the-cluster, docs/security.md#the-kv-plane): a
 * decode-side sequence whose first lower-pool blocks are shared read-only with a cached one (a
 * prefix cache hit of N_CACHED positions), and a prefill-side sequence holding the whole prompt.
 * Two contexts in one process (shm or tcp, argv[1]), the decode one as a decode node runs it
 * (require_grant, writes_only):
 *
 *  - speed_kv_from_cached: the first entry not in place per entry space;
 *  - building: a descriptor of the whole layout over the shared blocks is refused (a sender would
 *    write them); the partial one starts each layer at the block holding its first uncached
 *    entry, counts only those bytes, and round-trips through the control plane's message;
 *  - the transfer (plain, in integrity mode, and with host mirrors on both sides: staged out from
 *    the first block, staged in with the same `from`): lands exactly the blocks past the hit (the
 *    first of them whole, carrying the cached entries' equal bytes), puts the descriptor's total,
 *    and leaves the shared blocks and the rest of the cached sequence byte for byte as they were,
 *    in the pools and in the mirror;
 *  - the attack: a sender whose copy of the descriptor starts at block 0 (first_block lowered,
 *    total raised to match, so it passes every check on the sending side) aims writes at the
 *    shared blocks: each of them is dropped by the decode side's grant (counted), no byte of a
 *    shared block changes, and the notify is refused (the reservation's KV is incomplete);
 *  - a tag over the wrong layout (the sender's tags cover blocks from 0) is refused too;
 * and nothing leaked (xt_ledger). */
#include <stdatomic.h>
#include <string.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "kv_cache.h"
#include "kv_transfer.h"
#include "log.h"
#include "test_log.h"
#include "xfer_desc_wire.h"
#include "xfer_test_util.h"

#define L         4
#define C         3 /* the split too: lower layers 0..2 position-indexed, sharable */
#define B         4
#define N_FULL    14 /* 4 blocks, the last partial */
#define A         1
#define T         1
#define N_COMPACT (A + T)
#define N_CACHED  9 /* 2 whole blocks shared, position 8 copied (block 2 carries it again) */
#define N_SHARED  2

static speed_backend_t *g_be;

static struct { atomic_int ready, refused; } g_notes;

static speed_status_t note_cb(void *user, const speed_kv_notify_t *note) {
    (void)user;
    if (note->aborted || note->integrity_failed)
        atomic_fetch_add(&g_notes.refused, 1);
    else
        atomic_fetch_add(&g_notes.ready, 1);
    return SPEED_OK;
}

static speed_kv_cache_t *cache_new(bool mirror) {
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.host_mirror = mirror ? SPEED_KV_MIRROR_ON : SPEED_KV_MIRROR_AUTO;
    p.backend = g_be;
    p.n_layers = L;
    p.split_layer = C;
    p.n_kv_heads = 2;
    p.head_dim = 8;
    p.dtype = SPEED_DTYPE_F32;
    p.block_tokens = B;
    p.n_blocks[0] = p.n_blocks[1] = 16;
    speed_kv_cache_t *c = NULL;
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_OK);
    return c;
}

/* Writes a pattern into every block of seq's prompt entries. */
static void fill(speed_kv_cache_t *c, speed_kv_seq_t *s, uint8_t seed) {
    for (int l = 0; l < L; l++)
        for (int64_t i = 0; i * B < (l < C ? N_FULL : N_COMPACT); i++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(c, s, l, i, &blk, &unit);
            for (size_t k = 0; k < unit; k++) ((uint8_t *)blk)[k] = (uint8_t)(seed + 13 * l + 7 * i + k);
        }
}

/* The bytes of block i of layer l of seq (unit bytes), or NULL. */
static const uint8_t *unit_of(speed_kv_cache_t *c, const speed_kv_seq_t *s, int l, int64_t i) {
    void *blk = NULL;
    size_t unit;
    return speed_kv_cache_block_addr(c, s, l, i, &blk, &unit) == SPEED_OK ? blk : NULL;
}

/* The transfer region's copy of block i of layer l (the host mirror's when the cache has one). */
static const uint8_t *xfer_unit_of(speed_kv_cache_t *c, const speed_kv_seq_t *s, int l, int64_t i) {
    void *blk = NULL;
    size_t unit;
    return speed_kv_cache_xfer_block_addr(c, s, l, i, &blk, &unit) == SPEED_OK ? blk : NULL;
}

/* Every unit of the sequence's blocks, concatenated, in the pools and then in the transfer
 * region (the same again without a mirror) (caller frees). */
static uint8_t *snapshot(speed_kv_cache_t *c, const speed_kv_seq_t *s, size_t *len_p) {
    const size_t unit = speed_kv_cache_unit_bytes(c);
    uint8_t *buf = speed_malloc((size_t)2 * L * 4 * unit);
    size_t len = 0;
    for (int x = 0; x < 2; x++)
        for (int l = 0; l < L; l++)
            for (int64_t i = 0; i * B < (l < C ? N_FULL : N_COMPACT); i++) {
                memcpy(buf + len, x ? xfer_unit_of(c, s, l, i) : unit_of(c, s, l, i), unit);
                len += unit;
            }
    *len_p = len;
    return buf;
}

static bool unchanged(speed_kv_cache_t *c, const speed_kv_seq_t *s, const uint8_t *snap, size_t len) {
    size_t n;
    uint8_t *now = snapshot(c, s, &n);
    bool same = n == len && memcmp(now, snap, len) == 0;
    speed_free(now);
    return same;
}

/* A whole transfer of desc under id; its status, the bytes it put in *bytes_p. */
static speed_status_t push(speed_kv_xfer_ctx_t *pctx, const speed_kv_desc_t *desc, speed_kv_cache_t *pc,
                           speed_kv_seq_t *ps, const char *id, uint64_t *bytes_p) {
    speed_kv_xfer_t *x = NULL;
    speed_status_t st = speed_kv_xfer_create(pctx, desc, pc, ps, N_FULL, N_COMPACT, id, &x);
    *bytes_p = 0;
    if (st != SPEED_OK) return st;
    st = speed_kv_xfer_push_all(x);
    if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
    if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
    speed_kv_xfer_info_t info;
    speed_kv_xfer_info(x, &info);
    *bytes_p = info.bytes_put;
    speed_kv_xfer_destroy(x);
    return st;
}

static bool wait_int(atomic_int *v, int want, int timeout_ms) {
    uint64_t t0 = xt_now_ms();
    while (atomic_load(v) < want) {
        if (xt_now_ms() - t0 > (uint64_t)timeout_ms) return false;
        usleep(1000);
    }
    return true;
}

static int64_t dropped_writes(speed_kv_xfer_ctx_t *dctx, uint64_t want) {
    speed_kv_xfer_ctx_stats_t s;
    uint64_t t0 = xt_now_ms();
    for (;;) { /* counted on the progress thread, a little after the refused notify */
        speed_kv_xfer_ctx_stats(dctx, &s);
        if (s.n_writes_dropped >= want || xt_now_ms() - t0 > 3000) return (int64_t)s.n_writes_dropped;
        usleep(1000);
    }
}

static void test_from(void) {
    speed_kv_from_t f = speed_kv_from_cached(9, 14, 1);
    CHECK(f.full == 9 && f.compact == 1);
    f = speed_kv_from_cached(0, 14, 1);
    CHECK(f.full == 0 && f.compact == 0);
    f = speed_kv_from_cached(3, 14, 4); /* fewer cached than anchors: the cached anchors only */
    CHECK(f.full == 3 && f.compact == 3);
    f = speed_kv_from_cached(5, 3, 4); /* anchors clamped to the prompt */
    CHECK(f.full == 5 && f.compact == 3);
}

static void run(speed_kv_transport_t tr, bool integrity, bool mirror) {
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.op_timeout_ms = 3000;
    speed_kv_xfer_ctx_t *pctx = NULL, *dctx = NULL;
    CHECK(speed_kv_xfer_ctx_create(&cp, &pctx) == SPEED_OK);
    cp.notify_cb = note_cb;
    cp.require_grant = true;
    cp.writes_only = true;
    CHECK(speed_kv_xfer_ctx_create(&cp, &dctx) == SPEED_OK);
    speed_kv_cache_t *pc = cache_new(mirror), *dc = cache_new(mirror);
    if (!pctx || !dctx || !pc || !dc) return;
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, pc) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(dctx, dc) == SPEED_OK);
    speed_kv_xfer_ctx_t *const ctxs[] = {pctx, dctx, NULL};
    const speed_kv_cache_t *const caches[] = {pc, dc, NULL};
    xt_ledger_t base;
    xt_ledger_take(&base, caches, ctxs);

    /* the prefill side holds the whole prompt; the decode side a cached sequence (turn 1) and
     * the new reservation sharing its first N_SHARED lower-pool blocks */
    speed_kv_seq_t *ps = NULL, *cached = NULL, *ds = NULL;
    CHECK(speed_kv_cache_seq_create(pc, C, N_FULL, N_COMPACT, &ps) == SPEED_OK);
    CHECK(speed_kv_cache_seq_create(dc, C, N_FULL, N_COMPACT, &cached) == SPEED_OK);
    if (!ps || !cached) return;
    speed_kv_cache_seq_set_entries(pc, ps, N_FULL, N_COMPACT);
    speed_kv_cache_seq_set_entries(dc, cached, N_FULL, N_COMPACT);
    fill(pc, ps, 11);
    fill(dc, cached, 11); /* the same prefix's bytes */
    CHECK(speed_kv_cache_seq_create_shared(dc, C, N_FULL, N_COMPACT, cached, N_SHARED, &ds) == SPEED_OK);
    if (!ds) return;
    for (int64_t i = 0; i < N_SHARED; i++)
        CHECK_INT_EQ(speed_kv_cache_block_refs(dc, SPEED_KV_POOL_LOWER, speed_kv_seq_block_table(ds, 0)[i]), 2);
    fill(pc, ps, 11);
    /* the sender's bytes of the uncached part differ from what the decode side's blocks hold */
    for (int l = 0; l < L; l++) {
        int64_t first = l < C ? N_CACHED / B : 0;
        for (int64_t i = first; i * B < (l < C ? N_FULL : N_COMPACT); i++)
            ((uint8_t *)unit_of(pc, ps, l, i))[3] ^= 0x5a;
    }
    size_t snap_len;
    uint8_t *snap = snapshot(dc, cached, &snap_len);

    /* the whole layout over shared blocks: refused at build */
    speed_kv_desc_params_t dp = {.transport = tr, .lease_ms = 60000, .grant_id = "req-whole", .integrity = integrity};
    speed_kv_desc_t *whole = NULL;
    speed_log_set_sink(tu_log_discard, NULL);
    CHECK_INT_EQ(speed_kv_desc_build(dctx, dc, ds, N_FULL, N_COMPACT, &dp, &whole), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(whole == NULL);
    /* from past the entries: refused */
    dp.from = (speed_kv_from_t){N_FULL + 1, 0};
    CHECK_INT_EQ(speed_kv_desc_build(dctx, dc, ds, N_FULL, N_COMPACT, &dp, &whole), SPEED_ERR_INVALID_ARGUMENT);
    speed_log_set_sink(NULL, NULL);
    speed_kv_xfer_ctx_stats_t s0, s;
    speed_kv_xfer_ctx_stats(dctx, &s0);
    CHECK_INT_EQ(s0.n_grants, 0);

    /* the partial descriptor */
    dp.grant_id = "req-partial";
    dp.from = speed_kv_from_cached(N_CACHED, N_FULL, A);
    speed_kv_desc_t *desc = NULL;
    CHECK(speed_kv_desc_build(dctx, dc, ds, N_FULL, N_COMPACT, &dp, &desc) == SPEED_OK);
    if (!desc) return;
    const uint64_t token_bytes = speed_kv_cache_token_bytes(dc);
    for (int l = 0; l < L; l++) CHECK_INT_EQ(desc->layers[l].first_block, l < C ? N_CACHED / B : 0);
    const uint64_t want_total = (uint64_t)(C * (N_FULL - N_CACHED / B * B) + (L - C) * N_COMPACT) * token_bytes;
    CHECK_INT_EQ(desc->total_bytes, want_total);
    /* the control plane's message carries it (and a prefill node checks it) */
    uint8_t *wire = NULL;
    size_t wire_len = 0;
    speed_kv_desc_t *back = NULL;
    CHECK(xt_desc_pack(desc, &wire, &wire_len) == SPEED_OK);
    CHECK(xt_desc_unpack(wire, wire_len, &back) == SPEED_OK);
    speed_free(wire);
    if (!back) return;
    for (int l = 0; l < L; l++) CHECK_INT_EQ(back->layers[l].first_block, desc->layers[l].first_block);

    /* the transfer: exactly the blocks past the hit land; the shared ones are untouched */
    uint64_t bytes = 0;
    int ready0 = atomic_load(&g_notes.ready);
    CHECK_INT_EQ(push(pctx, back, pc, ps, "req-partial", &bytes), SPEED_OK);
    CHECK(wait_int(&g_notes.ready, ready0 + 1, 3000));
    CHECK_INT_EQ(bytes, want_total);
    /* with a host mirror the bytes are in the mirror: the decode engine's kv_ready stages the
     * units past the hit in (speed_kv_cache_stage_in_from, the same `from`) */
    if (mirror) CHECK_INT_EQ(speed_kv_cache_stage_in_from(dc, ds, dp.from, N_FULL, N_COMPACT), SPEED_OK);
    const size_t unit = speed_kv_cache_unit_bytes(dc);
    for (int l = 0; l < L; l++) {
        const int64_t n = l < C ? N_FULL : N_COMPACT, first = l < C ? N_CACHED / B : 0;
        for (int64_t i = first; i * B < n; i++) {
            const int64_t in_block = n - i * B < B ? n - i * B : B;
            const size_t half = unit / 2, rows = (size_t)in_block * (half / B);
            const uint8_t *a = unit_of(pc, ps, l, i), *b = unit_of(dc, ds, l, i);
            CHECK_MSG(memcmp(a, b, rows) == 0 && memcmp(a + half, b + half, rows) == 0,
                      "layer %d block %lld did not land", l, (long long)i);
        }
    }
    CHECK_MSG(unchanged(dc, cached, snap, snap_len), "the partial transfer changed the cached sequence's blocks");
    speed_kv_xfer_ctx_grant_drop(dctx, "req-partial"); /* as Generate's start does */
    speed_kv_desc_destroy(back);
    speed_kv_desc_destroy(desc);

    /* the attack: the sender's copy starts every lower layer at block 0 */
    dp.grant_id = "req-aim";
    desc = NULL;
    CHECK(speed_kv_desc_build(dctx, dc, ds, N_FULL, N_COMPACT, &dp, &desc) == SPEED_OK);
    if (!desc) return;
    for (int l = 0; l < C; l++) {
        desc->total_bytes += (uint64_t)desc->layers[l].first_block * B * token_bytes;
        desc->layers[l].first_block = 0;
    }
    CHECK_INT_EQ(speed_kv_desc_check(desc), SPEED_OK); /* nothing on the sending side can tell */
    speed_kv_xfer_ctx_stats(dctx, &s0);
    int refused0 = atomic_load(&g_notes.refused);
    ready0 = atomic_load(&g_notes.ready);
    speed_log_set_sink(tu_log_discard, NULL);
    CHECK_INT_EQ(push(pctx, desc, pc, ps, "req-aim", &bytes), SPEED_ERR_TRANSFER);
    speed_log_set_sink(NULL, NULL);
    CHECK(wait_int(&g_notes.refused, refused0 + 1, 3000)); /* the node is told: it frees the reservation */
    CHECK_INT_EQ(atomic_load(&g_notes.ready), ready0);
    /* the writes below first_block: N_CACHED / B blocks of each lower layer, all whole units */
    const uint64_t aimed = (uint64_t)C * (N_CACHED / B);
    CHECK_INT_EQ(dropped_writes(dctx, s0.n_writes_dropped + aimed), s0.n_writes_dropped + aimed);
    CHECK_MSG(unchanged(dc, cached, snap, snap_len), "a write aimed at a shared block changed it");
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, s0.n_grants - 1);
    speed_kv_desc_destroy(desc);

    speed_kv_cache_seq_destroy(dc, ds);
    speed_kv_cache_seq_destroy(dc, cached);
    speed_kv_cache_seq_destroy(pc, ps);
    speed_free(snap);
    xt_ledger_check(&base, mirror ? "partial, host mirror" : integrity ? "partial, integrity" : "partial");
    speed_kv_xfer_ctx_destroy(pctx);
    speed_kv_xfer_ctx_destroy(dctx);
    speed_kv_cache_destroy(pc);
    speed_kv_cache_destroy(dc);
}

int main(int argc, char **argv) {
    speed_kv_transport_t tr = xt_transport(argc > 1 ? argv[1] : "shm");
    xt_ucx_env();
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    CHECK(speed_backend_create(&bp, &g_be) == SPEED_OK);
    if (!g_be) return CHECK_DONE();
    test_from();
    run(tr, false, false);
    run(tr, true, false);
    run(tr, true, true); /* both sides with a host mirror (as GPU pools have): staged out and in */
    speed_backend_destroy(g_be);
    return CHECK_DONE();
}
