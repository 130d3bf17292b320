/* KV transfer staged through the cache's pinned host mirror (kv_cache.h "Host mirror"), the path
 * GPU nodes take with a UCX that has no CUDA support. Runs on CPU backends with the mirror forced
 * on, and on a "pretend-device" backend (cpu-ref whose memory claims not to be host memory), so
 * the automatic default is exercised too:
 *
 *   - stage_out copies exactly the requested units (sentinel bytes elsewhere in the mirror stay),
 *     with and without merged runs; stage_in copies the prompt units and nothing else;
 *   - a prefill engine and a decode engine in one process, mirror on both / on one side only /
 *     automatic, over shm or tcp: the sender's mirror holds its pool's units, the receiver's pool
 *     does NOT hold the prompt before speed_engine_seq_kv_ready (its mirror does), holds exactly
 *     the sender's entries after, and the decoded tokens and logits equal a colocated run;
 *   - errors: a failing stage-out ends the transfer (backend status, stage put), a failing
 *     stage-in leaves the sequence awaiting its KV (retry works), mirror allocation failures
 *     (fault injection), device pools without a mirror refused at registration, ucx.cuda_direct
 *     refused by a UCX without CUDA.
 *
 * argv: shm|tcp [cpu-ref|cuda] — cuda runs the end-to-end case on the GPU (mirror automatic) and
 * exits 77 without one. */
#include "engine_test_util.h"
#include "kv_transfer.h"
#include "test_gpu.h"
#include "xfer_test_util.h"

#define N_PROMPT 45
#define N_GEN    6
#define BLOCK    8

/* ---- a backend whose memory is "device memory" (cpu-ref underneath), with failing copies ---- */

static speed_backend_ops_t g_dev_ops;
static bool g_fail_copies; /* upload / download return SPEED_ERR_DEVICE */
static int g_n_downloads, g_n_uploads;
static const speed_backend_ops_t *g_ref_ops;

static bool dev_host_memory(void *ctx) {
    (void)ctx;
    return false;
}
static speed_status_t dev_download(void *ctx, void *dst, const void *src, size_t bytes) {
    g_n_downloads++;
    if (g_fail_copies) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "test device: download failed (injected)");
        return SPEED_ERR_DEVICE;
    }
    return g_ref_ops->download(ctx, dst, src, bytes);
}
static speed_status_t dev_upload(void *ctx, void *dst, const void *src, size_t bytes) {
    g_n_uploads++;
    if (g_fail_copies) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "test device: upload failed (injected)");
        return SPEED_ERR_DEVICE;
    }
    return g_ref_ops->upload(ctx, dst, src, bytes);
}

/* A view of `ref` (shares its context; never destroyed itself). */
static speed_backend_t dev_backend(speed_backend_t *ref) {
    g_ref_ops = ref->ops;
    g_dev_ops = *ref->ops;
    g_dev_ops.host_memory = dev_host_memory;
    g_dev_ops.download = dev_download;
    g_dev_ops.upload = dev_upload;
    return (speed_backend_t){.ops = &g_dev_ops, .ctx = ref->ctx, .kind = ref->kind};
}

/* ---- cache-level staging ------------------------------------------------------------------- */

static speed_kv_cache_params_t cache_params(speed_backend_t *be, int n_layers, int split, speed_kv_mirror_t m) {
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = be;
    p.n_layers = n_layers;
    p.split_layer = split;
    p.n_kv_heads = 2;
    p.head_dim = 8;
    p.block_tokens = 4;
    p.n_blocks[SPEED_KV_POOL_LOWER] = 12;
    p.n_blocks[SPEED_KV_POOL_UPPER] = 12;
    p.host_mirror = m;
    return p;
}

/* Whether byte `off` of pool p lies in the unit of `layer` of one of blocks[0..n). */
static bool in_units(const speed_kv_cache_t *c, speed_kv_pool_t p, int layer, const int32_t *blocks, int64_t n,
                     size_t off) {
    if (speed_kv_cache_layer_pool(c, layer) != p) return false;
    speed_kv_layer_t kl = speed_kv_cache_layer(c, layer),
                     k0 = speed_kv_cache_layer(c, p == 0 ? 0 : speed_kv_cache_split_layer(c));
    size_t loff = (size_t)((char *)kl.k_base - (char *)k0.k_base), unit = speed_kv_cache_unit_bytes(c);
    for (int64_t i = 0; i < n; i++) {
        size_t b = (size_t)blocks[i] * kl.block_stride + loff;
        if (off >= b && off < b + unit) return true;
    }
    return false;
}

/* Fills every pool with a byte pattern and the mirror with a sentinel; stages out blocks
 * [b0, b1) of `layer`; checks the mirror byte by byte. */
static void check_stage_out(speed_kv_cache_t *c, speed_backend_t *be, const speed_kv_seq_t *s, int layer, int64_t b0,
                            int64_t b1) {
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        void *mb;
        size_t len;
        speed_kv_cache_xfer_region(c, (speed_kv_pool_t)p, &mb, &len);
        if (!mb) continue;
        unsigned char *pat = malloc(len);
        for (size_t i = 0; i < len; i++) pat[i] = (unsigned char)(i * 7 + 1 + p);
        CHECK(speed_backend_upload(be, speed_kv_cache_layer(c, p == 0 ? 0 : speed_kv_cache_split_layer(c)).k_base, pat,
                                   len) == SPEED_OK);
        memset(mb, 0xA5, len);
        free(pat);
    }
    CHECK(speed_kv_cache_stage_out(c, s, layer, b0, b1) == SPEED_OK);
    const int32_t *t = speed_kv_seq_block_table(s, layer);
    int bad_copied = 0, bad_kept = 0, n_copied = 0;
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        void *mb;
        size_t len;
        speed_kv_cache_xfer_region(c, (speed_kv_pool_t)p, &mb, &len);
        if (!mb) continue;
        const unsigned char *m = mb;
        for (size_t i = 0; i < len; i++) {
            if (in_units(c, (speed_kv_pool_t)p, layer, t + b0, b1 - b0, i)) {
                n_copied++;
                bad_copied += m[i] != (unsigned char)(i * 7 + 1 + p);
            } else {
                bad_kept += m[i] != 0xA5;
            }
        }
    }
    CHECK_INT_EQ(n_copied, (b1 - b0) * (int64_t)speed_kv_cache_unit_bytes(c));
    CHECK_MSG(bad_copied == 0, "layer %d blocks [%lld, %lld): %d staged bytes differ from the pool", layer,
              (long long)b0, (long long)b1, bad_copied);
    CHECK_MSG(bad_kept == 0, "layer %d blocks [%lld, %lld): %d mirror bytes outside them changed", layer, (long long)b0,
              (long long)b1, bad_kept);
}

static void test_cache_staging(speed_backend_t *be) {
    /* defaults: AUTO is off on a CPU backend, on when the memory is not host memory */
    speed_backend_t dev = dev_backend(be);
    speed_kv_cache_t *c = NULL;
    speed_kv_cache_params_t p = cache_params(be, 4, 2, SPEED_KV_MIRROR_AUTO);
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_OK);
    CHECK(!speed_kv_cache_host_mirror(c));
    CHECK(speed_kv_cache_host_memory(c));
    void *base;
    size_t len;
    speed_kv_cache_xfer_region(c, SPEED_KV_POOL_LOWER, &base, &len);
    CHECK(base == speed_kv_cache_layer(c, 0).k_base); /* no mirror: the pool itself */
    speed_kv_seq_t *s = NULL;
    CHECK(speed_kv_cache_seq_create(c, 4, 9, 2, &s) == SPEED_OK);
    CHECK(speed_kv_cache_stage_out(c, s, 0, 0, 1) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_stage_in(c, s, 9, 2) == SPEED_ERR_INVALID_ARGUMENT);
    speed_kv_cache_seq_destroy(c, s);
    speed_kv_cache_destroy(c);
    c = NULL;
    p = cache_params(&dev, 4, 2, SPEED_KV_MIRROR_AUTO);
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_OK);
    CHECK(c && speed_kv_cache_host_mirror(c) && !speed_kv_cache_host_memory(c));
    speed_kv_cache_destroy(c);
    c = NULL;
    p = cache_params(&dev, 4, 2, SPEED_KV_MIRROR_OFF);
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_OK);
    CHECK(c && !speed_kv_cache_host_mirror(c));
    speed_kv_cache_destroy(c);
    c = NULL;
    p.host_mirror = (speed_kv_mirror_t)7;
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_ERR_INVALID_ARGUMENT);

    /* two layers per pool: one download per unit (other layers' units lie between) */
    p = cache_params(be, 4, 2, SPEED_KV_MIRROR_ON);
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_OK);
    if (!c) return;
    CHECK(speed_kv_cache_host_mirror(c));
    speed_kv_cache_xfer_region(c, SPEED_KV_POOL_LOWER, &base, &len);
    CHECK(base != NULL && base != speed_kv_cache_layer(c, 0).k_base);
    speed_kv_cache_stats_t st;
    speed_kv_cache_stats(c, &st);
    CHECK_INT_EQ(len, st.bytes_total[0]);
    speed_kv_seq_t *s0 = NULL;
    CHECK(speed_kv_cache_seq_create(c, 3, 5, 1, &s0) == SPEED_OK); /* fragment the free lists */
    CHECK(speed_kv_cache_seq_create(c, 3, 18, 3, &s) == SPEED_OK); /* 5 lower, 5 upper blocks (C 3 > split) */
    speed_kv_cache_seq_destroy(c, s0);
    check_stage_out(c, be, s, 1, 1, 3);
    check_stage_out(c, be, s, 0, 0, 5);
    check_stage_out(c, be, s, 3, 4, 5);
    check_stage_out(c, be, s, 2, 2, 2); /* empty range: nothing */
    void *addr, *paddr;
    size_t ub;
    CHECK(speed_kv_cache_xfer_block_addr(c, s, 3, 1, &addr, &ub) == SPEED_OK);
    CHECK(speed_kv_cache_block_addr(c, s, 3, 1, &paddr, &ub) == SPEED_OK);
    CHECK(addr != paddr);
    CHECK(speed_kv_cache_xfer_block_addr(c, s, 3, 5, &addr, &ub) == SPEED_ERR_INVALID_ARGUMENT);
    /* bad arguments */
    CHECK(speed_kv_cache_stage_out(c, s, 4, 0, 1) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_stage_out(c, s, -1, 0, 1) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_stage_out(c, s, 0, 0, 6) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_stage_out(c, s, 0, 3, 2) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_stage_in(c, s, 19, 3) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_stage_in(c, s, 18, -1) == SPEED_ERR_INVALID_ARGUMENT);

    /* stage_in: exactly the units of the entries, per layer (C 3: layers 0-2 n_full, 3 n_compact) */
    for (int pl = 0; pl < SPEED_KV_POOL_COUNT; pl++) {
        void *mb;
        speed_kv_cache_xfer_region(c, (speed_kv_pool_t)pl, &mb, &len);
        for (size_t i = 0; i < len; i++) ((unsigned char *)mb)[i] = (unsigned char)(i * 13 + 5);
        CHECK(speed_backend_memset_zero(be, speed_kv_cache_layer(c, pl == 0 ? 0 : 2).k_base, len) == SPEED_OK);
    }
    const int64_t n_full = 10, n_compact = 2; /* 3 blocks below C, 1 above */
    CHECK(speed_kv_cache_stage_in(c, s, n_full, n_compact) == SPEED_OK);
    int bad_in = 0, bad_out = 0, n_in = 0;
    for (int pl = 0; pl < SPEED_KV_POOL_COUNT; pl++) {
        void *mb;
        speed_kv_cache_xfer_region(c, (speed_kv_pool_t)pl, &mb, &len);
        const unsigned char *pool = speed_kv_cache_layer(c, pl == 0 ? 0 : 2).k_base; /* host memory: cpu-ref */
        for (size_t i = 0; i < len; i++) {
            bool want = false;
            for (int l = 0; l < 4 && !want; l++)
                want = in_units(c, (speed_kv_pool_t)pl, l, speed_kv_seq_block_table(s, l), l < 3 ? 3 : 1, i);
            if (want) {
                n_in++;
                bad_in += pool[i] != (unsigned char)(i * 13 + 5);
            } else {
                bad_out += pool[i] != 0;
            }
        }
    }
    CHECK_INT_EQ(n_in, (3 * 3 + 1) * (int64_t)speed_kv_cache_unit_bytes(c));
    CHECK_INT_EQ(bad_in, 0);
    CHECK_MSG(bad_out == 0, "stage in wrote %d pool bytes outside the prompt units", bad_out);
    speed_kv_cache_seq_destroy(c, s);
    speed_kv_cache_destroy(c);

    /* one layer per pool: consecutive blocks are adjacent units, merged into one download */
    p = cache_params(&dev, 2, 1, SPEED_KV_MIRROR_AUTO);
    c = NULL;
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_OK);
    if (!c) return;
    CHECK(speed_kv_cache_seq_create(c, 2, 12, 12, &s0) == SPEED_OK); /* blocks 0, 1, 2 */
    speed_kv_seq_t *s1 = NULL;
    CHECK(speed_kv_cache_seq_create(c, 2, 8, 8, &s1) == SPEED_OK); /* 3, 4 */
    speed_kv_cache_seq_destroy(c, s0);
    CHECK(speed_kv_cache_seq_create(c, 2, 24, 24, &s) == SPEED_OK); /* 0, 1, 2 again, then 5, 6, 7 */
    const int32_t *t = speed_kv_seq_block_table(s, 0);
    CHECK(t[0] + 1 == t[1] && t[1] + 1 == t[2] && t[2] + 1 != t[3]);
    g_n_downloads = 0;
    check_stage_out(c, &dev, s, 0, 0, 6);
    CHECK_INT_EQ(g_n_downloads, 2); /* two runs of consecutive blocks */
    check_stage_out(c, &dev, s, 1, 1, 5);
    g_fail_copies = true;
    CHECK(speed_kv_cache_stage_out(c, s, 0, 0, 1) == SPEED_ERR_DEVICE);
    CHECK(speed_kv_cache_stage_in(c, s, 4, 4) == SPEED_ERR_DEVICE);
    g_fail_copies = false;
    speed_kv_cache_seq_destroy(c, s);
    speed_kv_cache_seq_destroy(c, s1);
    speed_kv_cache_destroy(c);
}

/* Mirror allocation failures: NO_MEMORY, nothing leaked; a cache with a mirror needs more
 * allocations than one without (the mirror's are among those that fail). */
static void test_mirror_faults(speed_backend_t *be) {
    int first_ok[2] = {-1, -1};
    for (int m = 0; m < 2; m++) {
        speed_kv_cache_params_t p = cache_params(be, 4, 2, m ? SPEED_KV_MIRROR_ON : SPEED_KV_MIRROR_OFF);
        for (int fail = 0; fail < 50 && first_ok[m] < 0; fail++) {
            int64_t live = speed_alloc_live_count();
            speed_kv_cache_t *c = NULL;
            speed_alloc_fail_after(fail, 0);
            speed_status_t st = speed_kv_cache_create(&p, &c);
            speed_alloc_fail_after(-1, 0);
            CHECK(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY);
            if (st == SPEED_OK) {
                first_ok[m] = fail;
                CHECK(speed_kv_cache_host_mirror(c) == (m == 1));
            } else {
                CHECK(c == NULL);
            }
            speed_kv_cache_destroy(c);
            CHECK_INT_EQ(speed_alloc_live_count(), live);
        }
    }
    CHECK(first_ok[0] >= 0 && first_ok[1] >= 0);
    CHECK_MSG(first_ok[1] == first_ok[0] + 2, "allocations: %d without the mirror, %d with it", first_ok[0],
              first_ok[1]);
}

/* ---- transfer level ----------------------------------------------------------------------- */

typedef struct {
    speed_kv_xfer_t *xfer;
    speed_seq_id_t seq;
    int n_errors;
} push_ctx_t;

static speed_status_t on_layer(void *user, speed_seq_id_t seq, int layer, int64_t n_done, int64_t n_total) {
    push_ctx_t *pc = user;
    if (pc->xfer && seq == pc->seq && speed_kv_xfer_push_layer(pc->xfer, layer, n_done, n_total) != SPEED_OK)
        pc->n_errors++;
    return SPEED_OK;
}

static speed_engine_params_t eng_params(speed_backend_t *be, const speed_model_t *m, int split, speed_kv_mirror_t mir) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = be;
    p.model = m;
    p.kv_dtype = SPEED_DTYPE_F32; /* the byte counts below are in f32 (the default, auto, is the model's) */
    p.block_tokens = BLOCK;
    p.prefill_chunk = 16; /* 3 chunks: layers are pushed in pieces */
    p.max_step_tokens = 32;
    p.max_seqs = 2;
    p.depth = (speed_depth_t){split, 1, 1};
    p.n_blocks_lower = p.n_blocks_upper = 24;
    p.kv_host_mirror = mir;
    return p;
}

typedef struct {
    speed_backend_t *pre_be, *dec_be;
    const speed_model_t *model;
    speed_depth_t depth;
    speed_kv_transport_t transport;
    const int32_t *prompt;
    /* decode node */
    speed_engine_t *deng;
    speed_kv_xfer_ctx_t *dctx;
    speed_seq_id_t dseq;
    xt_inbox_t inbox;
    /* prefill node */
    speed_engine_t *peng;
    speed_kv_xfer_ctx_t *pctx;
    push_ctx_t pc;
    speed_kv_desc_t *desc;
    const char *grant; /* the descriptor's grant (NULL: none, the KV goes as puts) */
} pair_t;

static int pair_up(pair_t *r, speed_kv_mirror_t pre_m, speed_kv_mirror_t dec_m, bool push_from_cb) {
    const int L = r->model->config.n_layers;
    speed_engine_params_t dp = eng_params(r->dec_be, r->model, L / 2 + 1, dec_m); /* another pool split */
    CHECK(speed_engine_create(&dp, &r->deng) == SPEED_OK);
    xt_inbox_init(&r->inbox);
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.notify_cb = xt_inbox_cb;
    cp.notify_user = &r->inbox;
    CHECK(speed_kv_xfer_ctx_create(&cp, &r->dctx) == SPEED_OK);
    speed_engine_params_t pp = eng_params(r->pre_be, r->model, r->depth.prefill_layers, pre_m);
    if (push_from_cb) {
        pp.layer_cb = on_layer;
        pp.layer_cb_user = &r->pc;
    }
    CHECK(speed_engine_create(&pp, &r->peng) == SPEED_OK);
    speed_kv_xfer_ctx_params_t xp = speed_kv_xfer_ctx_default_params();
    CHECK(speed_kv_xfer_ctx_create(&xp, &r->pctx) == SPEED_OK);
    if (!r->deng || !r->dctx || !r->peng || !r->pctx) return -1;
    CHECK(speed_kv_xfer_ctx_register_cache(r->dctx, speed_engine_kv_cache(r->deng)) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(r->pctx, speed_engine_kv_cache(r->peng)) == SPEED_OK);
    CHECK(speed_engine_seq_reserve(r->deng, N_PROMPT, &r->depth, N_GEN, &r->dseq) == SPEED_OK);
    speed_kv_desc_params_t dsp = {.transport = r->transport, .lease_ms = 60000, .cookie = 77, .grant_id = r->grant};
    CHECK(speed_kv_desc_build_engine(r->dctx, r->deng, r->dseq, &dsp, &r->desc) == SPEED_OK);
    if (!r->desc) return -1;
    /* the descriptor names the decode side's transfer memory: its mirror when it has one */
    void *base;
    size_t len;
    speed_kv_cache_xfer_region(speed_engine_kv_cache(r->deng), SPEED_KV_POOL_LOWER, &base, &len);
    CHECK(r->desc->regions[0].base == (uint64_t)(uintptr_t)base);
    CHECK_INT_EQ(r->desc->regions[0].length, len);
    CHECK(speed_engine_seq_add(r->peng, r->prompt, N_PROMPT, &r->depth, 1, &r->pc.seq) == SPEED_OK);
    return 0;
}

/* Prefills on the prefill engine; returns the first token. */
static int32_t pair_prefill(pair_t *r) {
    const int V = r->model->config.vocab_size;
    int32_t first = -1;
    for (int guard = 0; guard < 100 && first < 0; guard++) {
        speed_engine_step_result_t sr;
        if (speed_engine_step(r->peng, &sr) != SPEED_OK) {
            CHECK(0);
            break;
        }
        if (sr.n_outputs == 1) first = et_argmax(sr.outputs[0].logits, V);
    }
    CHECK(first >= 0);
    return first;
}

static void pair_down(pair_t *r) {
    speed_kv_xfer_destroy(r->pc.xfer);
    r->pc.xfer = NULL;
    if (r->peng) speed_engine_seq_remove(r->peng, r->pc.seq);
    if (r->deng) speed_engine_seq_remove(r->deng, r->dseq);
    if (r->pctx && r->peng) speed_kv_xfer_ctx_deregister_cache(r->pctx, speed_engine_kv_cache(r->peng));
    if (r->dctx && r->deng) speed_kv_xfer_ctx_deregister_cache(r->dctx, speed_engine_kv_cache(r->deng));
    speed_kv_xfer_ctx_destroy(r->pctx);
    speed_kv_xfer_ctx_destroy(r->dctx);
    speed_engine_destroy(r->peng);
    speed_engine_destroy(r->deng);
    speed_kv_desc_destroy(r->desc);
    xt_inbox_cleanup(&r->inbox);
}

typedef struct {
    int pool_rows_differ;   /* decode pool rows != prefill pool rows */
    int mirror_rows_differ; /* decode mirror rows != prefill pool rows (-1: no decode mirror) */
    int src_mirror_differ;  /* prefill mirror rows != prefill pool rows (-1: no prefill mirror) */
    int rows;
} cmp_t;

/* Compares the prompt entries (K rows and V rows of every block of every layer) of the prefill
 * sequence's pool with the decode sequence's pool and mirror, reading backend memory through
 * speed_backend_download (device memory on the cuda variant). */
static cmp_t pair_compare(pair_t *r) {
    cmp_t out = {0, 0, 0, 0};
    speed_kv_cache_t *pc = speed_engine_kv_cache(r->peng), *dc = speed_engine_kv_cache(r->deng);
    speed_kv_seq_t *ps = NULL, *ds = NULL;
    CHECK(speed_engine_seq_kv(r->peng, r->pc.seq, &ps) == SPEED_OK);
    CHECK(speed_engine_seq_kv(r->deng, r->dseq, &ds) == SPEED_OK);
    if (!ps || !ds) return out;
    const bool dm = speed_kv_cache_host_mirror(dc), pm = speed_kv_cache_host_mirror(pc);
    if (!dm) out.mirror_rows_differ = -1;
    if (!pm) out.src_mirror_differ = -1;
    const size_t unit = speed_kv_cache_unit_bytes(pc), half = unit / 2, tok = speed_kv_cache_token_bytes(pc) / 2;
    unsigned char *a = malloc(unit), *b = malloc(unit);
    const int L = r->model->config.n_layers;
    for (int l = 0; l < L; l++) {
        int64_t e = l < r->depth.prefill_layers ? N_PROMPT : r->depth.anchors + r->depth.tail;
        for (int64_t i = 0; i * BLOCK < e; i++) {
            int64_t n = e - i * BLOCK < BLOCK ? e - i * BLOCK : BLOCK;
            void *pa, *da, *dma, *pma;
            size_t ub;
            CHECK(speed_kv_cache_block_addr(pc, ps, l, i, &pa, &ub) == SPEED_OK);
            CHECK(speed_kv_cache_block_addr(dc, ds, l, i, &da, &ub) == SPEED_OK);
            CHECK(speed_kv_cache_xfer_block_addr(dc, ds, l, i, &dma, &ub) == SPEED_OK);
            CHECK(speed_kv_cache_xfer_block_addr(pc, ps, l, i, &pma, &ub) == SPEED_OK);
            CHECK(speed_backend_download(r->pre_be, a, pa, unit) == SPEED_OK);
            CHECK(speed_backend_download(r->dec_be, b, da, unit) == SPEED_OK);
            for (int kv = 0; kv < 2; kv++) {
                size_t off = kv ? half : 0, len = (size_t)n * tok;
                out.rows++;
                out.pool_rows_differ += memcmp(a + off, b + off, len) != 0;
                if (dm) out.mirror_rows_differ += memcmp(a + off, (char *)dma + off, len) != 0;
                if (pm) out.src_mirror_differ += memcmp(a + off, (char *)pma + off, len) != 0;
            }
        }
    }
    free(a);
    free(b);
    return out;
}

/* One prompt from a prefill engine to a decode engine with the given mirrors; decode equals the
 * colocated reference `ref` (tokens and logits, bit for bit: same backend on both sides). */
static void test_pair(speed_backend_t *pre_be, speed_backend_t *dec_be, const speed_model_t *m, speed_depth_t depth,
                      speed_kv_transport_t tr, const int32_t *prompt, speed_kv_mirror_t pre_m, speed_kv_mirror_t dec_m,
                      const et_seq_t *ref, const char *what) {
    const int V = m->config.vocab_size;
    const int64_t live0 = speed_alloc_live_count();
    pair_t r;
    memset(&r, 0, sizeof r);
    r.pre_be = pre_be;
    r.dec_be = dec_be;
    r.model = m;
    r.depth = depth;
    r.transport = tr;
    r.prompt = prompt;
    r.grant = "req-mirror"; /* checked writes into the decode side's mirror */
    if (pair_up(&r, pre_m, dec_m, true) != 0) {
        pair_down(&r);
        return;
    }
    const bool pm = speed_kv_cache_host_mirror(speed_engine_kv_cache(r.peng));
    const bool dm = speed_kv_cache_host_mirror(speed_engine_kv_cache(r.deng));
    CHECK(speed_kv_xfer_create_engine(r.pctx, r.desc, r.peng, r.pc.seq, "req-mirror", &r.pc.xfer) == SPEED_OK);
    int32_t first = pair_prefill(&r);
    CHECK_INT_EQ(first, ref->gen[0]);
    CHECK_INT_EQ(r.pc.n_errors, 0);
    if (r.pc.xfer) {
        CHECK(speed_kv_xfer_finish(r.pc.xfer) == SPEED_OK);
        speed_status_t st = speed_kv_xfer_wait(r.pc.xfer, -1);
        CHECK_MSG(st == SPEED_OK, "%s: transfer %s", what, speed_status_string(st));
        speed_kv_xfer_info_t info;
        speed_kv_xfer_info(r.pc.xfer, &info);
        size_t want = speed_kv_bytes_for_prompt(&m->config, depth.prefill_layers, depth.anchors, depth.tail, N_PROMPT,
                                                SPEED_DTYPE_F32);
        CHECK_INT_EQ(info.bytes_put, want);
    }
    CHECK_INT_EQ(xt_inbox_wait(&r.inbox, 1, 30000), 1);

    /* before kv_ready: the bytes are in the decode side's transfer memory */
    cmp_t before = pair_compare(&r);
    CHECK(before.rows > 0);
    if (pm)
        CHECK_MSG(before.src_mirror_differ == 0, "%s: %d rows of the prefill mirror differ from its pool", what,
                  before.src_mirror_differ);
    if (dm) {
        CHECK_MSG(before.mirror_rows_differ == 0, "%s: %d rows of the decode mirror differ", what,
                  before.mirror_rows_differ);
        /* not staged in yet: the pool does not hold the prompt (the test of the stage-in) */
        CHECK_MSG(before.pool_rows_differ == before.rows,
                  "%s: %d of %d pool rows already hold the data before kv_ready", what,
                  before.rows - before.pool_rows_differ, before.rows);
    } else {
        CHECK_MSG(before.pool_rows_differ == 0, "%s: %d rows differ", what, before.pool_rows_differ);
    }
    CHECK(speed_engine_seq_kv_ready(r.deng, r.dseq) == SPEED_OK);
    cmp_t after = pair_compare(&r);
    CHECK_MSG(after.pool_rows_differ == 0, "%s: %d of %d rows of the decode pool differ after kv_ready", what,
              after.pool_rows_differ, after.rows);

    /* decode: equal to the colocated run */
    int32_t gen[N_GEN];
    gen[0] = first;
    double maxd = 0;
    CHECK(speed_engine_seq_append(r.deng, r.dseq, first) == SPEED_OK);
    int n = 1;
    for (int guard = 0; n < N_GEN && guard < 200; guard++) {
        speed_engine_step_result_t sr;
        if (speed_engine_step(r.deng, &sr) != SPEED_OK) {
            CHECK(0);
            break;
        }
        for (int o = 0; o < sr.n_outputs; o++) {
            for (int i = 0; i < V; i++)
                maxd = fmax(maxd, fabs((double)sr.outputs[o].logits[i] - ref->logits[(size_t)n * V + i]));
            gen[n] = et_argmax(sr.outputs[o].logits, V);
            if (n + 1 < N_GEN) CHECK(speed_engine_seq_append(r.deng, r.dseq, gen[n]) == SPEED_OK);
            n++;
        }
    }
    CHECK_INT_EQ(n, N_GEN);
    int diff = 0;
    for (int g = 0; g < n; g++) diff += gen[g] != ref->gen[g];
    CHECK_MSG(diff == 0, "%s: %d tokens differ from the colocated run", what, diff);
    CHECK_MSG(maxd == 0.0, "%s: logits differ from the colocated run by %g", what, maxd);
    fprintf(stderr,
            "%s: mirror prefill %s, decode %s; %d rows equal, decode pool before kv_ready %d/%d rows differ; "
            "%d tokens equal, max |dlogit| %g\n",
            what, pm ? "on" : "off", dm ? "on" : "off", after.rows, before.pool_rows_differ, before.rows, N_GEN, maxd);
    pair_down(&r);
    CHECK_MSG(speed_alloc_live_count() == live0, "%s: %lld allocations left after the pair was torn down", what,
              (long long)(speed_alloc_live_count() - live0));
}

/* A failing stage-out ends the transfer; a failing stage-in leaves the sequence awaiting KV. */
static void test_stage_failures(speed_backend_t *dev, const speed_model_t *m, speed_depth_t depth,
                                speed_kv_transport_t tr, const int32_t *prompt) {
    const int64_t live0 = speed_alloc_live_count();
    pair_t r;
    memset(&r, 0, sizeof r);
    r.pre_be = r.dec_be = dev;
    r.model = m;
    r.depth = depth;
    r.transport = tr;
    r.prompt = prompt;
    if (pair_up(&r, SPEED_KV_MIRROR_AUTO, SPEED_KV_MIRROR_AUTO, false) != 0) {
        pair_down(&r);
        return;
    }
    CHECK(speed_kv_cache_host_mirror(speed_engine_kv_cache(r.peng)));
    CHECK(speed_kv_cache_host_mirror(speed_engine_kv_cache(r.deng)));
    pair_prefill(&r); /* the whole prompt is in the pool: push_all afterwards */
    /* both sides as they stand with the reservation made and the prompt computed: the failures
     * below must leave exactly this behind (no transfer in flight, blocks and sequences as
     * here, allocations only for the endpoint the retry opens) */
    xt_ledger_t base;
    speed_kv_cache_t *const caches[] = {speed_engine_kv_cache(r.peng), speed_engine_kv_cache(r.deng), NULL};
    xt_ledger_take(&base, (const speed_kv_cache_t *const *)caches,
                   (speed_kv_xfer_ctx_t *const[]){r.pctx, r.dctx, NULL});

    speed_kv_xfer_t *x = NULL;
    CHECK(speed_kv_xfer_create_engine(r.pctx, r.desc, r.peng, r.pc.seq, "req-fail", &x) == SPEED_OK);
    g_fail_copies = true;
    speed_status_t st = x ? speed_kv_xfer_push_all(x) : SPEED_ERR_INTERNAL;
    g_fail_copies = false;
    CHECK_MSG(st == SPEED_ERR_DEVICE, "push_all with a failing stage-out: %s", speed_status_string(st));
    if (x) {
        speed_status_t fs;
        CHECK(speed_kv_xfer_poll(x, &fs) == SPEED_KV_XFER_FAILED);
        CHECK(fs == SPEED_ERR_DEVICE);
        speed_kv_xfer_info_t info;
        speed_kv_xfer_info(x, &info);
        CHECK(info.failed_stage == SPEED_KV_STAGE_PUT);
        CHECK_INT_EQ(info.n_puts, 0); /* nothing was put from a mirror that was not filled */
        CHECK(speed_kv_xfer_finish(x) == SPEED_ERR_DEVICE);
        speed_kv_xfer_destroy(x);
    }
    speed_kv_xfer_ctx_stats_t cs;
    speed_kv_xfer_ctx_stats(r.pctx, &cs);
    CHECK_INT_EQ(cs.n_failed[SPEED_KV_STAGE_PUT], 1);

    /* the same reservation, again: succeeds */
    x = NULL;
    CHECK(speed_kv_xfer_create_engine(r.pctx, r.desc, r.peng, r.pc.seq, "req-retry", &x) == SPEED_OK);
    if (x) {
        CHECK(speed_kv_xfer_push_all(x) == SPEED_OK);
        CHECK(speed_kv_xfer_finish(x) == SPEED_OK);
        CHECK(speed_kv_xfer_wait(x, -1) == SPEED_OK);
        speed_kv_xfer_destroy(x);
    }
    CHECK_INT_EQ(xt_inbox_wait(&r.inbox, 1, 30000), 1);
    g_fail_copies = true;
    st = speed_engine_seq_kv_ready(r.deng, r.dseq);
    g_fail_copies = false;
    CHECK_MSG(st == SPEED_ERR_DEVICE, "kv_ready with a failing stage-in: %s", speed_status_string(st));
    speed_engine_seq_stats_t ss;
    CHECK(speed_engine_seq_stats(r.deng, r.dseq, &ss) == SPEED_OK);
    CHECK(ss.state == SPEED_SEQ_AWAIT_KV);
    CHECK(speed_engine_seq_kv_ready(r.deng, r.dseq) == SPEED_OK);
    cmp_t after = pair_compare(&r);
    CHECK_INT_EQ(after.pool_rows_differ, 0);
    xt_ledger_check(&base, "stage-out and stage-in failures");
    pair_down(&r);
    CHECK_MSG(speed_alloc_live_count() == live0, "stage failures: %lld allocations left after teardown",
              (long long)(speed_alloc_live_count() - live0));
}

/* Registration of device pools without a mirror, and ucx.cuda_direct, with this UCX. */
static void test_refusals(speed_backend_t *dev) {
    speed_kv_cache_params_t p = cache_params(dev, 4, 2, SPEED_KV_MIRROR_OFF);
    speed_kv_cache_t *c = NULL;
    CHECK(speed_kv_cache_create(&p, &c) == SPEED_OK);
    speed_kv_xfer_ctx_params_t xp = speed_kv_xfer_ctx_default_params();
    speed_kv_xfer_ctx_t *x = NULL;
    CHECK(speed_kv_xfer_ctx_create(&xp, &x) == SPEED_OK);
    if (c && x) {
        CHECK(speed_kv_xfer_ctx_register_cache(x, c) == SPEED_ERR_UNSUPPORTED);
        CHECK_CONTAINS(speed_log_last_error(), "device memory");
        speed_kv_seq_t *s = NULL;
        CHECK(speed_kv_cache_seq_create(c, 4, 8, 2, &s) == SPEED_OK);
        speed_kv_desc_params_t dsp = {.transport = SPEED_KV_TRANSPORT_SHM};
        speed_kv_desc_t *d = NULL;
        CHECK(speed_kv_desc_build(x, c, s, 8, 2, &dsp, &d) == SPEED_ERR_INVALID_ARGUMENT); /* not registered */
        speed_kv_cache_seq_destroy(c, s);
    }
    speed_kv_xfer_ctx_destroy(x);
    speed_kv_cache_destroy(c);

    xp.cuda_direct = true;
    x = NULL;
    speed_status_t st = speed_kv_xfer_ctx_create(&xp, &x);
    if (st == SPEED_ERR_UNSUPPORTED) {
        CHECK(x == NULL);
        CHECK_CONTAINS(speed_log_last_error(), "ucx.cuda_direct");
        fprintf(stderr, "cuda_direct refused by this UCX, as expected: %s\n", speed_log_last_error());
    } else {
        CHECK_MSG(st == SPEED_OK, "cuda_direct: %s", speed_status_string(st));
        fprintf(stderr, "this UCX supports CUDA memory: cuda_direct accepted\n");
    }
    speed_kv_xfer_ctx_destroy(x);
}

static speed_backend_t *cuda_backend(void) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CUDA;
    speed_backend_t *be = NULL;
    speed_status_t st = speed_backend_create(&bp, &be);
    if (st == SPEED_OK) return be;
    char detail[256];
    snprintf(detail, sizeof detail, "backend cuda: %s (%s)", speed_status_string(st), speed_log_last_error());
    tu_cuda_unavailable_exit("test_kv_transfer_mirror cuda", detail); /* skips only without a GPU */
}

int main(int argc, char **argv) {
    const char *transport = argc > 1 ? argv[1] : "shm";
    const char *backend = argc > 2 ? argv[2] : "cpu-ref";
    const bool cuda = strcmp(backend, "cuda") == 0;
    xt_ucx_env();
    speed_backend_t *be = cuda ? cuda_backend() : et_backend(backend);
    if (!be) SKIP_TEST("backend %s is not available here", backend);
    tu_tmp_init("kv-mirror");
    const speed_kv_transport_t tr = xt_transport(transport);

    speed_backend_t *ref_be = et_backend("cpu-ref");
    speed_backend_t dev = ref_be ? dev_backend(ref_be) : (speed_backend_t){0};
    if (!cuda && ref_be) {
        test_cache_staging(ref_be);
        test_mirror_faults(ref_be);
        test_refusals(&dev);
    }

    et_model_spec_t spec = {"bf16-gqa", SPEED_DTYPE_BF16, false, 2, false};
    speed_model_t *m = et_model_make(&spec);
    CHECK(m != NULL);
    if (m) {
        const int L = m->config.n_layers, V = m->config.vocab_size;
        speed_depth_t depth = {L / 2, 1, 1};
        int32_t prompt[N_PROMPT];
        et_prompt(prompt, N_PROMPT, 9, V);
        /* colocated reference on the backend under test */
        et_seq_t ref;
        memset(&ref, 0, sizeof ref);
        ref.depth = depth;
        ref.n_prompt = N_PROMPT;
        ref.n_gen = N_GEN;
        memcpy(ref.prompt, prompt, sizeof prompt);
        speed_engine_params_t p = eng_params(be, m, depth.prefill_layers, SPEED_KV_MIRROR_AUTO);
        CHECK(et_run_engine(&p, &ref, 1) == SPEED_OK);
        if (cuda) {
            /* the GPU path as nodes run it: mirror automatic on both sides */
            test_pair(be, be, m, depth, tr, prompt, SPEED_KV_MIRROR_AUTO, SPEED_KV_MIRROR_AUTO, &ref, "cuda");
        } else {
            test_pair(be, be, m, depth, tr, prompt, SPEED_KV_MIRROR_ON, SPEED_KV_MIRROR_ON, &ref, "both");
            test_pair(be, be, m, depth, tr, prompt, SPEED_KV_MIRROR_ON, SPEED_KV_MIRROR_OFF, &ref, "prefill only");
            test_pair(be, be, m, depth, tr, prompt, SPEED_KV_MIRROR_OFF, SPEED_KV_MIRROR_ON, &ref, "decode only");
            test_pair(be, be, m, depth, tr, prompt, SPEED_KV_MIRROR_AUTO, SPEED_KV_MIRROR_AUTO, &ref, "none");
            /* the automatic default on "device" memory, both sides */
            test_pair(&dev, &dev, m, depth, tr, prompt, SPEED_KV_MIRROR_AUTO, SPEED_KV_MIRROR_AUTO, &ref, "auto");
            test_stage_failures(&dev, m, depth, tr, prompt);
        }
        et_seq_free(&ref);
        speed_model_destroy(m);
    }
    speed_backend_destroy(ref_be);
    if (be != ref_be) speed_backend_destroy(be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
