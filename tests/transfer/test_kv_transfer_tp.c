/* KV transfer between tensor-parallel head ranges: caches that hold different ranges of a
 * 4-head model's KV heads exchange blocks (the intersection only), in one process over the
 * transport given in argv (shm | tcp), the KV as the checked writes of a grant (argv[2] "puts":
 * descriptors without grants, one-sided puts).
 *
 *   TP 2 -> 1: senders [0, 2) and [2, 4) push into one receiver [0, 4), interleaved; the
 *              receiver's blocks equal a full reference cache byte for byte (every dtype)
 *   TP 1 -> 2: one sender [0, 4) pushes into receivers [0, 2) and [2, 4)
 *   overlap:   sender [0, 2) -> receiver [1, 3): exactly head 1 is put, pushed in chunks; the
 *              receiver's other head and unused slots keep their sentinel bytes
 *   refused:   ranges that do not overlap, another model head count (SPEED_ERR_PEER_PROTOCOL)
 *   same range [2, 4) -> [2, 4): the whole-unit path (puts counted), with the descriptor's model
 *              head count not stated (0, a control plane that does not carry it)
 * plus the cache parameters (head range validation) and the descriptor's head fields (built
 * from the cache's range; a range outside the model's heads refused by speed_kv_desc_check).
 * The head range's trip through the control plane's message is test_kv_transfer_desc's.
 *
 * Caches are used directly (cpu-ref backend, no model): L = 4 layers, head_dim 8, B = 4, the
 * sequence depth C = 2; senders split their pools at 2, receivers at 3. */
#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "test_log.h"
#include "kv_cache.h"
#include "kv_transfer.h"
#include "log.h"
#include "xfer_test_util.h"

#define L           4
#define C           2
#define B           4
#define HEAD_DIM    8
#define MODEL_HEADS 4
#define N_FULL      13 /* 4 blocks, the last partial */
#define N_COMPACT   2  /* anchor + tail */
#define SENTINEL    0xab

typedef struct {
    speed_kv_cache_t *cache;
    speed_kv_seq_t *seq;
    int head_begin, n_heads;
} node_t;

static speed_backend_t *g_be;
static speed_kv_transport_t g_tr;
static bool g_puts; /* argv[2] "puts": descriptors without grants, so one-sided puts */

static int64_t entries(int layer) { return layer < C ? N_FULL : N_COMPACT; }

static int node_init(node_t *n, int head_begin, int n_heads, int model_heads, speed_dtype_t dtype, int split) {
    memset(n, 0, sizeof *n);
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = g_be;
    p.n_layers = L;
    p.split_layer = split;
    p.n_kv_heads = n_heads;
    p.head_dim = HEAD_DIM;
    p.head_begin = head_begin;
    p.model_kv_heads = model_heads;
    p.dtype = dtype;
    p.block_tokens = B;
    p.n_blocks[0] = p.n_blocks[1] = 16;
    n->head_begin = head_begin;
    n->n_heads = n_heads;
    if (speed_kv_cache_create(&p, &n->cache) != SPEED_OK) return -1;
    if (speed_kv_cache_seq_create(n->cache, C, N_FULL, N_COMPACT, &n->seq) != SPEED_OK) return -1;
    return speed_kv_cache_seq_set_entries(n->cache, n->seq, N_FULL, N_COMPACT) == SPEED_OK ? 0 : -1;
}

static void node_cleanup(node_t *n) {
    if (n->cache) speed_kv_cache_seq_destroy(n->cache, n->seq);
    speed_kv_cache_destroy(n->cache);
    memset(n, 0, sizeof *n);
}

static size_t head_bytes(const node_t *n) {
    return (size_t)HEAD_DIM * speed_dtype_size(speed_kv_cache_layer(n->cache, 0).dtype);
}

/* Byte i of model head h of (layer, entry, half: 0 K, 1 V): the same in every cache, whatever
 * range of heads it holds. */
static uint8_t pat(int layer, int64_t e, int half, int h, size_t i, uint8_t seed) {
    return (uint8_t)(seed + 31 * layer + 7 * e + 101 * half + 53 * h + i);
}

/* Address of byte 0 of local head j of (layer, slot s of block blk_i, half). */
static uint8_t *head_addr(const node_t *n, int layer, int64_t blk_i, int slot, int half, int j) {
    void *blk;
    size_t unit;
    if (speed_kv_cache_block_addr(n->cache, n->seq, layer, blk_i, &blk, &unit) != SPEED_OK) return NULL;
    size_t hb = head_bytes(n);
    return (uint8_t *)blk + (size_t)half * (unit / 2) + ((size_t)slot * (size_t)n->n_heads + (size_t)j) * hb;
}

/* Sets every byte of the sequence's blocks (entries and unused slots) to `byte`. */
static void clear(node_t *n, uint8_t byte) {
    for (int l = 0; l < L; l++)
        for (int64_t i = 0; i * B < entries(l); i++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(n->cache, n->seq, l, i, &blk, &unit);
            memset(blk, byte, unit);
        }
}

/* Writes the pattern into the entries of the node's heads. */
static void fill(node_t *n, uint8_t seed) {
    size_t hb = head_bytes(n);
    for (int l = 0; l < L; l++)
        for (int64_t e = 0; e < entries(l); e++)
            for (int half = 0; half < 2; half++)
                for (int j = 0; j < n->n_heads; j++) {
                    uint8_t *a = head_addr(n, l, e / B, (int)(e % B), half, j);
                    for (size_t i = 0; i < hb; i++) a[i] = pat(l, e, half, n->head_begin + j, i, seed);
                }
}

/* Every byte of the sequence's blocks: the pattern for entries of model heads in [cb, ce),
 * `other` elsewhere (other heads, unused slots). Returns mismatches. */
static long verify(const node_t *n, int cb, int ce, uint8_t seed, uint8_t other) {
    size_t hb = head_bytes(n);
    long bad = 0;
    for (int l = 0; l < L; l++)
        for (int64_t blk_i = 0; blk_i * B < entries(l); blk_i++)
            for (int slot = 0; slot < B; slot++)
                for (int half = 0; half < 2; half++)
                    for (int j = 0; j < n->n_heads; j++) {
                        int64_t e = blk_i * B + slot;
                        int h = n->head_begin + j;
                        bool covered = e < entries(l) && h >= cb && h < ce;
                        const uint8_t *a = head_addr(n, l, blk_i, slot, half, j);
                        for (size_t i = 0; i < hb; i++) bad += a[i] != (covered ? pat(l, e, half, h, i, seed) : other);
                    }
    return bad;
}

/* The sequence's blocks of a and b (same head range, same dtype) equal byte for byte. */
static bool same_blocks(const node_t *a, const node_t *b) {
    for (int l = 0; l < L; l++)
        for (int64_t i = 0; i * B < entries(l); i++) {
            void *pa, *pb;
            size_t ua, ub;
            if (speed_kv_cache_block_addr(a->cache, a->seq, l, i, &pa, &ua) != SPEED_OK ||
                speed_kv_cache_block_addr(b->cache, b->seq, l, i, &pb, &ub) != SPEED_OK || ua != ub ||
                memcmp(pa, pb, ua) != 0)
                return false;
        }
    return true;
}

/* Bytes a transfer of n_common heads puts: every entry, K and V. */
static uint64_t bytes_for(const node_t *n, int n_common) {
    return (uint64_t)(C * N_FULL + (L - C) * N_COMPACT) * 2 * (uint64_t)n_common * head_bytes(n);
}

/* ---- decode-side notifies: every one, with its head range ------------------------------------ */

#define MAX_NOTES 32

typedef struct {
    pthread_mutex_t mu;
    int n;
    speed_kv_notify_t notes[MAX_NOTES]; /* request_id not kept */
} notes_t;

static speed_status_t notes_cb(void *user, const speed_kv_notify_t *note) {
    notes_t *b = user;
    pthread_mutex_lock(&b->mu);
    if (b->n < MAX_NOTES) {
        b->notes[b->n] = *note;
        b->notes[b->n].request_id = NULL;
    }
    b->n++;
    pthread_mutex_unlock(&b->mu);
    return SPEED_OK;
}

static int notes_wait(notes_t *b, int n) {
    uint64_t until = xt_now_ms() + 5000;
    int got;
    for (;;) {
        pthread_mutex_lock(&b->mu);
        got = b->n;
        pthread_mutex_unlock(&b->mu);
        if (got >= n || xt_now_ms() >= until) return got;
        usleep(1000);
    }
}

/* Whether a notify from the from-th on covered [hb, he) with these bytes. */
static bool notes_have(notes_t *b, int from, int hb, int he, uint64_t bytes) {
    bool found = false;
    pthread_mutex_lock(&b->mu);
    for (int i = from; i < b->n && i < MAX_NOTES; i++)
        if (b->notes[i].head_begin == hb && b->notes[i].head_end == he && b->notes[i].bytes == bytes) found = true;
    pthread_mutex_unlock(&b->mu);
    return found;
}

typedef struct {
    speed_kv_xfer_ctx_t *ctx;
    notes_t notes;
} rank_t;

static void rank_init(rank_t *r, bool decode) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->notes.mu, NULL);
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.op_timeout_ms = 5000;
    if (decode) {
        cp.notify_cb = notes_cb;
        cp.notify_user = &r->notes;
    }
    CHECK(speed_kv_xfer_ctx_create(&cp, &r->ctx) == SPEED_OK);
}

static void rank_cleanup(rank_t *r) {
    speed_kv_xfer_ctx_destroy(r->ctx);
    pthread_mutex_destroy(&r->notes.mu);
}

/* grant: the request id the transfers will carry, for a descriptor with a grant (its KV then goes
 * as the checked writes, strided per slot run), unless g_puts (argv "puts": one-sided puts). */
static speed_kv_desc_t *describe(rank_t *r, node_t *n, uint64_t cookie, const char *grant) {
    speed_kv_desc_params_t dp = {
        .transport = g_tr, .lease_ms = 60000, .cookie = cookie, .grant_id = g_puts ? NULL : grant};
    speed_kv_desc_t *desc = NULL;
    CHECK(speed_kv_xfer_ctx_register_cache(r->ctx, n->cache) == SPEED_OK);
    CHECK(speed_kv_desc_build(r->ctx, n->cache, n->seq, N_FULL, N_COMPACT, &dp, &desc) == SPEED_OK);
    return desc;
}

/* One whole transfer; *info_p (may be NULL) gets its accounting. */
static speed_status_t run_xfer(rank_t *r, const speed_kv_desc_t *desc, node_t *p, const char *id,
                               speed_kv_xfer_info_t *info_p) {
    speed_kv_xfer_t *x = NULL;
    CHECK(speed_kv_xfer_ctx_register_cache(r->ctx, p->cache) == SPEED_OK);
    speed_status_t st = speed_kv_xfer_create(r->ctx, desc, p->cache, p->seq, N_FULL, N_COMPACT, id, &x);
    if (st != SPEED_OK) return st;
    st = speed_kv_xfer_push_all(x);
    if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
    if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
    if (info_p) speed_kv_xfer_info(x, info_p);
    speed_kv_xfer_destroy(x);
    return st;
}

/* ---- cache parameters, descriptor codec ------------------------------------------------------ */

static void test_cache_params(void) {
    node_t n;
    CHECK(node_init(&n, 2, 2, MODEL_HEADS, SPEED_DTYPE_F32, 2) == 0);
    CHECK_INT_EQ(speed_kv_cache_head_begin(n.cache), 2);
    CHECK_INT_EQ(speed_kv_cache_model_kv_heads(n.cache), MODEL_HEADS);
    CHECK_INT_EQ(speed_kv_cache_token_bytes(n.cache), 2 * 2 * HEAD_DIM * 4); /* its own heads only */
    node_cleanup(&n);
    CHECK(node_init(&n, 0, 3, 0, SPEED_DTYPE_F32, 2) == 0); /* model 0 = its heads */
    CHECK_INT_EQ(speed_kv_cache_head_begin(n.cache), 0);
    CHECK_INT_EQ(speed_kv_cache_model_kv_heads(n.cache), 3);
    node_cleanup(&n);
    speed_log_set_sink(tu_log_discard, NULL);
    CHECK(node_init(&n, 3, 2, MODEL_HEADS, SPEED_DTYPE_F32, 2) != 0); /* [3, 5) of 4 */
    CHECK(!n.cache);
    CHECK(node_init(&n, -1, 2, MODEL_HEADS, SPEED_DTYPE_F32, 2) != 0);
    CHECK(node_init(&n, 1, 2, 0, SPEED_DTYPE_F32, 2) != 0); /* [1, 3) of 2 */
    CHECK(node_init(&n, 0, 2, -4, SPEED_DTYPE_F32, 2) != 0);
    speed_log_set_sink(NULL, NULL);
}

static void test_desc_heads(rank_t *dec) {
    node_t r;
    CHECK(node_init(&r, 1, 2, MODEL_HEADS, SPEED_DTYPE_BF16, 3) == 0);
    speed_kv_desc_t *d = describe(dec, &r, 7, NULL);
    if (!d) return;
    CHECK_INT_EQ(d->head_begin, 1);
    CHECK_INT_EQ(d->head_end, 3);
    CHECK_INT_EQ(d->n_kv_heads, 2);
    CHECK_INT_EQ(d->model_kv_heads, MODEL_HEADS);
    CHECK_INT_EQ(d->total_bytes, bytes_for(&r, 2));
    /* the head range must lie inside the model's heads */
    speed_kv_desc_t t = *d;
    speed_log_set_sink(tu_log_discard, NULL);
    t.model_kv_heads = 2;
    CHECK(speed_kv_desc_check(&t) == SPEED_ERR_FORMAT);
    t.model_kv_heads = -1;
    CHECK(speed_kv_desc_check(&t) == SPEED_ERR_FORMAT);
    speed_log_set_sink(NULL, NULL);
    t.model_kv_heads = 0; /* not stated: accepted */
    CHECK(speed_kv_desc_check(&t) == SPEED_OK);
    speed_kv_desc_destroy(d);
    speed_kv_xfer_ctx_deregister_cache(dec->ctx, r.cache);
    node_cleanup(&r);
}

/* ---- transfers ----------------------------------------------------------------------------- */

/* TP 2 -> 1: two senders (two prefill ranks), pushes interleaved layer by layer. */
static void test_two_into_one(rank_t *p0, rank_t *p1, rank_t *dec, speed_dtype_t dtype, uint8_t seed) {
    node_t s0, s1, r, ref;
    CHECK(node_init(&s0, 0, 2, MODEL_HEADS, dtype, 2) == 0);
    CHECK(node_init(&s1, 2, 2, MODEL_HEADS, dtype, 2) == 0);
    CHECK(node_init(&r, 0, 4, MODEL_HEADS, dtype, 3) == 0);
    CHECK(node_init(&ref, 0, 4, MODEL_HEADS, dtype, 2) == 0);
    fill(&s0, seed);
    fill(&s1, seed);
    fill(&ref, seed);
    int before = dec->notes.n;
    speed_kv_desc_t *d = describe(dec, &r, 100 + seed, "req-tp2to1");
    speed_kv_xfer_t *x0 = NULL, *x1 = NULL;
    CHECK(speed_kv_xfer_ctx_register_cache(p0->ctx, s0.cache) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(p1->ctx, s1.cache) == SPEED_OK);
    CHECK(d && speed_kv_xfer_create(p0->ctx, d, s0.cache, s0.seq, N_FULL, N_COMPACT, "req-tp2to1", &x0) == SPEED_OK);
    CHECK(d && speed_kv_xfer_create(p1->ctx, d, s1.cache, s1.seq, N_FULL, N_COMPACT, "req-tp2to1", &x1) == SPEED_OK);
    if (x0 && x1) {
        for (int l = 0; l < L; l++) {
            CHECK(speed_kv_xfer_push_layer(x1, l, entries(l), entries(l)) == SPEED_OK);
            CHECK(speed_kv_xfer_push_layer(x0, l, entries(l), entries(l)) == SPEED_OK);
        }
        CHECK(speed_kv_xfer_finish(x0) == SPEED_OK);
        CHECK(speed_kv_xfer_finish(x1) == SPEED_OK);
        speed_status_t st0 = speed_kv_xfer_wait(x0, -1), st1 = speed_kv_xfer_wait(x1, -1);
        CHECK_MSG(st0 == SPEED_OK && st1 == SPEED_OK, "%s: %s, %s", speed_dtype_name(dtype), speed_status_string(st0),
                  speed_status_string(st1));
        speed_kv_xfer_info_t i0, i1;
        speed_kv_xfer_info(x0, &i0);
        speed_kv_xfer_info(x1, &i1);
        CHECK_INT_EQ(i0.bytes_put, bytes_for(&r, 2));
        CHECK_INT_EQ(i0.total_bytes, bytes_for(&r, 2));
        CHECK_INT_EQ(i1.bytes_put, bytes_for(&r, 2));
        CHECK_INT_EQ(i0.bytes_put + i1.bytes_put, d->total_bytes);
        CHECK_INT_EQ(i0.n_puts, 2 * (C * N_FULL + (L - C) * N_COMPACT)); /* a K and a V run per slot */
        CHECK_INT_EQ(notes_wait(&dec->notes, before + 2), before + 2);
        CHECK(notes_have(&dec->notes, before, 0, 2, bytes_for(&r, 2)));
        CHECK(notes_have(&dec->notes, before, 2, 4, bytes_for(&r, 2)));
        CHECK_MSG(same_blocks(&r, &ref), "%s: the receiver differs from the full reference", speed_dtype_name(dtype));
        CHECK_INT_EQ(verify(&r, 0, 4, seed, 0), 0);
    }
    speed_kv_xfer_destroy(x0);
    speed_kv_xfer_destroy(x1);
    speed_kv_xfer_ctx_grant_drop(dec->ctx, "req-tp2to1");
    speed_kv_desc_destroy(d);
    speed_kv_xfer_ctx_deregister_cache(p0->ctx, s0.cache);
    speed_kv_xfer_ctx_deregister_cache(p1->ctx, s1.cache);
    speed_kv_xfer_ctx_deregister_cache(dec->ctx, r.cache);
    node_cleanup(&s0);
    node_cleanup(&s1);
    node_cleanup(&r);
    node_cleanup(&ref);
}

/* TP 1 -> 2: one sender, two decode ranks. */
static void test_one_into_two(rank_t *pre, rank_t *d0, rank_t *d1, speed_dtype_t dtype, uint8_t seed) {
    node_t s, r0, r1, ref0, ref1;
    CHECK(node_init(&s, 0, 4, MODEL_HEADS, dtype, 2) == 0);
    CHECK(node_init(&r0, 0, 2, MODEL_HEADS, dtype, 3) == 0);
    CHECK(node_init(&r1, 2, 2, MODEL_HEADS, dtype, 3) == 0);
    CHECK(node_init(&ref0, 0, 2, MODEL_HEADS, dtype, 2) == 0);
    CHECK(node_init(&ref1, 2, 2, MODEL_HEADS, dtype, 2) == 0);
    fill(&s, seed);
    fill(&ref0, seed);
    fill(&ref1, seed);
    int b0 = d0->notes.n, b1 = d1->notes.n;
    speed_kv_desc_t *dd0 = describe(d0, &r0, 1, "req-tp1to2"), *dd1 = describe(d1, &r1, 2, "req-tp1to2");
    speed_kv_xfer_info_t info;
    CHECK(dd0 && run_xfer(pre, dd0, &s, "req-tp1to2", &info) == SPEED_OK);
    CHECK_INT_EQ(info.bytes_put, bytes_for(&s, 2));
    CHECK(dd1 && run_xfer(pre, dd1, &s, "req-tp1to2", &info) == SPEED_OK);
    CHECK_INT_EQ(info.bytes_put, bytes_for(&s, 2));
    CHECK_INT_EQ(notes_wait(&d0->notes, b0 + 1), b0 + 1);
    CHECK_INT_EQ(notes_wait(&d1->notes, b1 + 1), b1 + 1);
    CHECK(notes_have(&d0->notes, b0, 0, 2, bytes_for(&s, 2)));
    CHECK(notes_have(&d1->notes, b1, 2, 4, bytes_for(&s, 2)));
    CHECK(same_blocks(&r0, &ref0));
    CHECK(same_blocks(&r1, &ref1));
    CHECK_INT_EQ(verify(&r0, 0, 2, seed, 0), 0);
    CHECK_INT_EQ(verify(&r1, 2, 4, seed, 0), 0);
    speed_kv_xfer_ctx_grant_drop(d0->ctx, "req-tp1to2");
    speed_kv_xfer_ctx_grant_drop(d1->ctx, "req-tp1to2");
    speed_kv_desc_destroy(dd0);
    speed_kv_desc_destroy(dd1);
    speed_kv_xfer_ctx_deregister_cache(pre->ctx, s.cache);
    speed_kv_xfer_ctx_deregister_cache(d0->ctx, r0.cache);
    speed_kv_xfer_ctx_deregister_cache(d1->ctx, r1.cache);
    node_cleanup(&s);
    node_cleanup(&r0);
    node_cleanup(&r1);
    node_cleanup(&ref0);
    node_cleanup(&ref1);
}

/* [0, 2) -> [1, 3): head 1 only, pushed in chunks as an engine's layer callback would. */
static void test_overlap_one(rank_t *pre, rank_t *dec, speed_dtype_t dtype, uint8_t seed) {
    node_t s, r;
    CHECK(node_init(&s, 0, 2, MODEL_HEADS, dtype, 2) == 0);
    CHECK(node_init(&r, 1, 2, MODEL_HEADS, dtype, 3) == 0);
    fill(&s, seed);
    clear(&r, SENTINEL);
    int before = dec->notes.n;
    speed_kv_desc_t *d = describe(dec, &r, 3, "req-overlap");
    speed_kv_xfer_t *x = NULL;
    CHECK(speed_kv_xfer_ctx_register_cache(pre->ctx, s.cache) == SPEED_OK);
    CHECK(d && speed_kv_xfer_create(pre->ctx, d, s.cache, s.seq, N_FULL, N_COMPACT, "req-overlap", &x) == SPEED_OK);
    if (x) {
        const int64_t chunks[] = {5, 9, 9 /* a redone step */, N_FULL};
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < C; l++) CHECK(speed_kv_xfer_push_layer(x, l, chunks[k], N_FULL) == SPEED_OK);
        speed_kv_xfer_info_t info;
        speed_kv_xfer_info(x, &info);
        CHECK_INT_EQ(info.n_puts, C * 2 * N_FULL); /* whole blocks, then the rest: every slot once */
        for (int l = C; l < L; l++) CHECK(speed_kv_xfer_push_layer(x, l, N_COMPACT, N_COMPACT) == SPEED_OK);
        CHECK(speed_kv_xfer_finish(x) == SPEED_OK);
        CHECK(speed_kv_xfer_wait(x, -1) == SPEED_OK);
        speed_kv_xfer_info(x, &info);
        CHECK_INT_EQ(info.bytes_put, bytes_for(&s, 1));
        CHECK_INT_EQ(info.total_bytes, bytes_for(&s, 1));
        CHECK_INT_EQ(info.n_puts, 2 * (C * N_FULL + (L - C) * N_COMPACT));
        CHECK_INT_EQ(notes_wait(&dec->notes, before + 1), before + 1);
        CHECK(notes_have(&dec->notes, before, 1, 2, bytes_for(&s, 1)));
        CHECK_INT_EQ(verify(&r, 1, 2, seed, SENTINEL), 0); /* head 2 and unused slots untouched */
    }
    speed_kv_xfer_destroy(x);
    speed_kv_xfer_ctx_grant_drop(dec->ctx, "req-overlap");
    speed_kv_desc_destroy(d);
    speed_kv_xfer_ctx_deregister_cache(pre->ctx, s.cache);
    speed_kv_xfer_ctx_deregister_cache(dec->ctx, r.cache);
    node_cleanup(&s);
    node_cleanup(&r);
}

/* Equal partial ranges: the whole-unit path, not the strided one. */
static void test_same_range(rank_t *pre, rank_t *dec, uint8_t seed) {
    node_t s, r;
    CHECK(node_init(&s, 2, 2, MODEL_HEADS, SPEED_DTYPE_F16, 2) == 0);
    CHECK(node_init(&r, 2, 2, MODEL_HEADS, SPEED_DTYPE_F16, 3) == 0);
    fill(&s, seed);
    int before = dec->notes.n;
    speed_kv_desc_t *d = describe(dec, &r, 4, "req-same");
    if (d) d->model_kv_heads = 0; /* not stated: the sender assumes its own count */
    speed_kv_xfer_info_t info;
    CHECK(d && run_xfer(pre, d, &s, "req-same", &info) == SPEED_OK);
    CHECK_INT_EQ(info.bytes_put, bytes_for(&s, 2));
    /* C layers: 3 full blocks + a partial one (2 puts); the others: one partial block (2 puts) */
    CHECK_INT_EQ(info.n_puts, C * (3 + 2) + (L - C) * 2);
    CHECK_INT_EQ(notes_wait(&dec->notes, before + 1), before + 1);
    CHECK(notes_have(&dec->notes, before, 2, 4, bytes_for(&s, 2)));
    CHECK_INT_EQ(verify(&r, 2, 4, seed, 0), 0);
    speed_kv_xfer_ctx_grant_drop(dec->ctx, "req-same");
    speed_kv_desc_destroy(d);
    speed_kv_xfer_ctx_deregister_cache(pre->ctx, s.cache);
    speed_kv_xfer_ctx_deregister_cache(dec->ctx, r.cache);
    node_cleanup(&s);
    node_cleanup(&r);
}

static void test_refused(rank_t *pre, rank_t *dec) {
    node_t s, r, r8;
    CHECK(node_init(&s, 0, 2, MODEL_HEADS, SPEED_DTYPE_F32, 2) == 0);
    CHECK(node_init(&r, 2, 2, MODEL_HEADS, SPEED_DTYPE_F32, 3) == 0);
    CHECK(node_init(&r8, 0, 2, 8, SPEED_DTYPE_F32, 3) == 0);
    CHECK(speed_kv_xfer_ctx_register_cache(pre->ctx, s.cache) == SPEED_OK);
    speed_kv_desc_t *d = describe(dec, &r, 5, NULL), *d8 = describe(dec, &r8, 6, NULL);
    speed_kv_xfer_ctx_stats_t before, after;
    speed_kv_xfer_ctx_stats(pre->ctx, &before);
    speed_kv_xfer_t *x = NULL;
    speed_log_set_sink(tu_log_discard, NULL);
    CHECK(d && speed_kv_xfer_create(pre->ctx, d, s.cache, s.seq, N_FULL, N_COMPACT, "req-disjoint", &x) ==
                   SPEED_ERR_PEER_PROTOCOL);
    speed_log_set_sink(NULL, NULL);
    CHECK_CONTAINS(speed_log_last_error(), "do not overlap");
    CHECK_CONTAINS(speed_log_last_error(), "[2, 4)");
    speed_log_set_sink(tu_log_discard, NULL);
    CHECK(d8 && speed_kv_xfer_create(pre->ctx, d8, s.cache, s.seq, N_FULL, N_COMPACT, "req-model", &x) ==
                    SPEED_ERR_PEER_PROTOCOL);
    speed_log_set_sink(NULL, NULL);
    CHECK_CONTAINS(speed_log_last_error(), "8 KV heads");
    if (d) { /* the model's count not stated, a range past the sender's model */
        d->head_begin = 4;
        d->head_end = 6;
        d->model_kv_heads = 0;
        speed_log_set_sink(tu_log_discard, NULL);
        CHECK(speed_kv_xfer_create(pre->ctx, d, s.cache, s.seq, N_FULL, N_COMPACT, "req-past", &x) ==
              SPEED_ERR_PEER_PROTOCOL);
        speed_log_set_sink(NULL, NULL);
        CHECK_CONTAINS(speed_log_last_error(), "[4, 6)");
    }
    CHECK(x == NULL);
    speed_kv_xfer_ctx_stats(pre->ctx, &after);
    CHECK_INT_EQ(after.n_refused, before.n_refused + 3);
    CHECK_INT_EQ(after.n_started, before.n_started);
    speed_kv_desc_destroy(d);
    speed_kv_desc_destroy(d8);
    speed_kv_xfer_ctx_deregister_cache(pre->ctx, s.cache);
    speed_kv_xfer_ctx_deregister_cache(dec->ctx, r.cache);
    speed_kv_xfer_ctx_deregister_cache(dec->ctx, r8.cache);
    node_cleanup(&s);
    node_cleanup(&r);
    node_cleanup(&r8);
}

int main(int argc, char **argv) {
    const char *transport = argc > 1 ? argv[1] : "shm";
    if (strcmp(transport, "shm") != 0 && strcmp(transport, "tcp") != 0) {
        fprintf(stderr, "usage: %s shm|tcp [puts]\n", argv[0]);
        return 2;
    }
    g_puts = argc > 2 && strcmp(argv[2], "puts") == 0;
    g_tr = xt_transport(transport);
    xt_ucx_env();
    if (getenv("SPEED_LOG")) speed_log_configure(getenv("SPEED_LOG"));
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    CHECK(speed_backend_create(&bp, &g_be) == SPEED_OK);
    if (!g_be) return CHECK_DONE();
    const int64_t allocs_at_start = speed_alloc_live_count();
    test_cache_params();
    CHECK_INT_EQ(speed_alloc_live_count(), allocs_at_start);

    rank_t pre0, pre1, dec0, dec1;
    rank_init(&pre0, false);
    rank_init(&pre1, false);
    rank_init(&dec0, true);
    rank_init(&dec1, true);
    if (pre0.ctx && pre1.ctx && dec0.ctx && dec1.ctx) {
        /* each scenario makes and frees its own caches: the ledger holds it to the contexts'
         * transfers in flight and the allocation count (caches, sequences, regions, endpoints) */
        speed_kv_xfer_ctx_t *const ctxs[] = {pre0.ctx, pre1.ctx, dec0.ctx, dec1.ctx, NULL};
        xt_ledger_t base;
        xt_ledger_take(&base, NULL, ctxs);
        test_desc_heads(&dec0);
        xt_ledger_check(&base, "descriptor heads");
        const speed_dtype_t dtypes[] = {SPEED_DTYPE_F32, SPEED_DTYPE_BF16, SPEED_DTYPE_F16};
        for (int k = 0; k < 3; k++) {
            xt_ledger_take(&base, NULL, ctxs);
            test_two_into_one(&pre0, &pre1, &dec0, dtypes[k], (uint8_t)(10 + k));
            xt_ledger_check(&base, "two into one");
        }
        xt_ledger_take(&base, NULL, ctxs);
        test_one_into_two(&pre0, &dec0, &dec1, SPEED_DTYPE_BF16, 20);
        xt_ledger_check(&base, "one into two");
        xt_ledger_take(&base, NULL, ctxs);
        test_overlap_one(&pre1, &dec1, SPEED_DTYPE_F32, 30);
        test_overlap_one(&pre1, &dec1, SPEED_DTYPE_F16, 31);
        xt_ledger_check(&base, "one-head overlap");
        xt_ledger_take(&base, NULL, ctxs);
        test_same_range(&pre0, &dec0, 40);
        xt_ledger_check(&base, "same range");
        xt_ledger_take(&base, NULL, ctxs);
        test_refused(&pre0, &dec0);
        xt_ledger_check(&base, "refused");
        speed_kv_xfer_ctx_stats_t ps;
        speed_kv_xfer_ctx_stats(pre0.ctx, &ps);
        CHECK_INT_EQ(ps.n_failed[SPEED_KV_STAGE_PUT] + ps.n_failed[SPEED_KV_STAGE_FLUSH] +
                         ps.n_failed[SPEED_KV_STAGE_NOTIFY] + ps.n_failed[SPEED_KV_STAGE_CONNECT],
                     0);
    }
    rank_cleanup(&pre0);
    rank_cleanup(&pre1);
    rank_cleanup(&dec0);
    rank_cleanup(&dec1);
    /* every context gone: endpoints and all */
    CHECK_MSG(speed_alloc_live_count() == allocs_at_start, "teardown: %lld counted allocations live, %lld at start",
              (long long)speed_alloc_live_count(), (long long)allocs_at_start);
    speed_backend_destroy(g_be);
    return CHECK_DONE();
}
