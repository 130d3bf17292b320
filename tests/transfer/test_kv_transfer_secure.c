/* The KV plane's protections in the transfer library (docs/security.md#the-kv-plane), two contexts in
 * one process (shm and tcp):
 *  - the notify's bytes: round trip, and every malformed message the decoder refuses;
 *  - grants: a descriptor built with a grant carries a fresh 128-bit nonce (and, from a context
 *    with writes_only, no rkey: without its nonce such a descriptor is refused); a notify with the
 *    right nonce reaches the callback; a wrong nonce, or a request with no grant, is refused
 *    before the callback and the prefill side's wait fails; the grant survives a wrong guess;
 *  - the cancel fence's abort: a cancelled transfer with a nonce flushes and sends an abort
 *    notify, which the decode side accepts (and then drops the grant); without a nonce none;
 *  - integrity mode: tags verified over the received bytes; a block changed after its put (the
 *    tamper) fails the transfer, reports integrity_failed and drops the grant;
 *  - checked writes (docs/security.md, "late writes"): with a grant the KV goes as writes the
 *    decode side checks before copying. A transfer whose grant was dropped (the reservation
 *    ended: lease over, cancelled, generation started) or whose grant expired changes no byte
 *    of the pool and every write is counted dropped; so does one with a wrong nonce; a write
 *    aimed outside the reservation's blocks (a descriptor whose table names another request's
 *    block) is dropped and leaves that block as it was, while the rest of the transfer lands
 *    and the notify is refused (incomplete KV); deregistering the decode cache drops its
 *    grants, after which no write lands in it;
 *  - binding: a context limited to shared memory opens no tcp resource, one limited to tcp on
 *    "lo" opens no shared-memory one;
 * and after each scenario nothing leaked (xt_ledger). */
#include <stdatomic.h>
#include <string.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "kv_cache.h"
#include "kv_notify_wire.h"
#include "kv_transfer.h"
#include "log.h"
#include "test_log.h"
#include "xfer_test_util.h"

#define L         4
#define C         2
#define B         4
#define N_FULL    13
#define N_COMPACT 2

typedef struct {
    speed_kv_cache_t *cache;
    speed_kv_seq_t *seq;
} node_t;

static speed_backend_t *g_be;

static int node_init(node_t *n) {
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = g_be;
    p.n_layers = L;
    p.split_layer = C;
    p.n_kv_heads = 2;
    p.head_dim = 8;
    p.dtype = SPEED_DTYPE_F32;
    p.block_tokens = B;
    p.n_blocks[0] = p.n_blocks[1] = 16;
    if (speed_kv_cache_create(&p, &n->cache) != SPEED_OK) return -1;
    if (speed_kv_cache_seq_create(n->cache, C, N_FULL, N_COMPACT, &n->seq) != SPEED_OK) return -1;
    speed_kv_cache_seq_set_entries(n->cache, n->seq, N_FULL, N_COMPACT);
    return 0;
}

static void node_cleanup(node_t *n) {
    if (n->cache) speed_kv_cache_seq_destroy(n->cache, n->seq);
    speed_kv_cache_destroy(n->cache);
}

/* Writes a pattern into every block of the prefill sequence. */
static void fill(node_t *n, uint8_t seed) {
    for (int l = 0; l < L; l++)
        for (int64_t i = 0; i * B < (l < C ? N_FULL : N_COMPACT); i++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(n->cache, n->seq, l, i, &blk, &unit);
            for (size_t k = 0; k < unit; k++) ((uint8_t *)blk)[k] = (uint8_t)(seed + 13 * l + 7 * i + k);
        }
}

/* ---- the decode side's notifies ---------------------------------------------------------- */

static struct { atomic_int ready, aborted, integrity_failed; } g_notes;

static speed_status_t note_cb(void *user, const speed_kv_notify_t *note) {
    (void)user;
    if (note->aborted)
        atomic_fetch_add(&g_notes.aborted, 1);
    else if (note->integrity_failed)
        atomic_fetch_add(&g_notes.integrity_failed, 1);
    else
        atomic_fetch_add(&g_notes.ready, 1);
    return SPEED_OK;
}

static bool wait_int(atomic_int *v, int want, int timeout_ms) {
    uint64_t t0 = xt_now_ms();
    while (atomic_load(v) < want) {
        if (xt_now_ms() - t0 > (uint64_t)timeout_ms) return false;
        usleep(1000);
    }
    return true;
}

/* Waits until a context counter (read by `field`) reaches want; returns it. The counters move on
 * the progress threads, a little after the callbacks the test waits on. */
#define WAIT_STAT(ctx, field, want)                                                      \
    ({                                                                                   \
        speed_kv_xfer_ctx_stats_t s_;                                                    \
        uint64_t t0_ = xt_now_ms();                                                      \
        for (;;) {                                                                       \
            speed_kv_xfer_ctx_stats(ctx, &s_);                                           \
            if ((int64_t)s_.field >= (int64_t)(want) || xt_now_ms() - t0_ > 3000) break; \
            usleep(1000);                                                                \
        }                                                                                \
        (int64_t) s_.field;                                                              \
    })

static speed_kv_desc_t *describe(speed_kv_xfer_ctx_t *dctx, node_t *d, speed_kv_transport_t t, const char *grant,
                                 bool integrity) {
    speed_kv_desc_params_t dp = {.transport = t, .lease_ms = 60000, .grant_id = grant, .integrity = integrity};
    speed_kv_desc_t *desc = NULL;
    CHECK(speed_kv_desc_build(dctx, d->cache, d->seq, N_FULL, N_COMPACT, &dp, &desc) == SPEED_OK);
    return desc;
}

static speed_status_t run_xfer(speed_kv_xfer_ctx_t *pctx, const speed_kv_desc_t *desc, node_t *p, const char *id,
                               bool tamper) {
    speed_kv_xfer_t *x = NULL;
    speed_status_t st = speed_kv_xfer_create(pctx, desc, p->cache, p->seq, N_FULL, N_COMPACT, id, &x);
    if (st != SPEED_OK) return st;
    st = speed_kv_xfer_push_all(x);
    if (st == SPEED_OK) st = speed_kv_xfer_wait(x, 0) == SPEED_ERR_TIMEOUT ? SPEED_OK : SPEED_ERR_INTERNAL;
    if (tamper) {
        /* The tamper: one byte of layer 1's block 2 changes after its put was posted, as if the
         * bytes had been altered on the way: the receiver has the original, the sender's tags
         * (computed at finish) cover the changed byte. Units this small (512 bytes) are copied
         * into UCX's buffers when the put is posted (short/bcopy puts), so the change never
         * reaches the receiver. */
        void *blk;
        size_t unit;
        speed_kv_cache_block_addr(p->cache, p->seq, 1, 2, &blk, &unit);
        ((uint8_t *)blk)[5] ^= 0x40;
    }
    if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
    if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
    speed_kv_xfer_destroy(x);
    return st;
}

/* ---- the notify's bytes ------------------------------------------------------------------ */

static void test_wire(void) {
    uint8_t tags[3 * SPEED_KV_TAG_BYTES];
    for (size_t i = 0; i < sizeof tags; i++) tags[i] = (uint8_t)i;
    speed_kv_notify_wire_t m = {.flags = SPEED_KV_NOTIFY_FLAG_ABORT,
                                .token = 7,
                                .cookie = 8,
                                .bytes = 9,
                                .epoch = 10,
                                .head_begin = 1,
                                .head_end = 3,
                                .n_tags = 3,
                                .tags = tags};
    snprintf(m.request_id, sizeof m.request_id, "req-wire");
    for (int i = 0; i < SPEED_KV_NONCE_BYTES; i++) m.nonce[i] = (uint8_t)(0xa0 + i);
    size_t n = speed_kv_notify_wire_size(3);
    CHECK_INT_EQ(n, SPEED_KV_NOTIFY_HEADER + 3 * SPEED_KV_TAG_BYTES);
    uint8_t *buf = speed_malloc(n + 1);
    speed_kv_notify_encode(&m, buf);
    speed_kv_notify_wire_t o;
    const char *why = NULL;
    CHECK_INT_EQ(speed_kv_notify_decode(buf, n, &o, &why), SPEED_OK);
    CHECK(o.flags == m.flags && o.token == 7 && o.cookie == 8 && o.bytes == 9 && o.epoch == 10);
    CHECK(o.head_begin == 1 && o.head_end == 3 && o.n_tags == 3 && strcmp(o.request_id, "req-wire") == 0);
    CHECK(memcmp(o.nonce, m.nonce, SPEED_KV_NONCE_BYTES) == 0 && o.tags && memcmp(o.tags, tags, sizeof tags) == 0);
    /* each fault on its own */
    CHECK_INT_EQ(speed_kv_notify_decode(buf, n - 1, &o, &why), SPEED_ERR_FORMAT);
    CHECK_INT_EQ(speed_kv_notify_decode(buf, n + 1, &o, &why), SPEED_ERR_FORMAT);
    CHECK_INT_EQ(speed_kv_notify_decode(buf, 10, &o, &why), SPEED_ERR_FORMAT);
    CHECK_INT_EQ(speed_kv_notify_decode(NULL, 0, &o, &why), SPEED_ERR_FORMAT);
    struct {
        size_t off;
        uint8_t val;
        const char *what;
    } faults[] = {{0, 0x00, "magic"},      {4, 0x02, "version"},     {8, 0x06, "flags"},
                  {14, 0x01, "tag count"}, {48, 0x05, "head begin"}, {55, 0x80, "head end"}};
    for (size_t f = 0; f < sizeof faults / sizeof faults[0]; f++) {
        uint8_t keep = buf[faults[f].off];
        buf[faults[f].off] = faults[f].val;
        CHECK_MSG(speed_kv_notify_decode(buf, n, &o, &why) == SPEED_ERR_FORMAT, "%s accepted", faults[f].what);
        buf[faults[f].off] = keep;
    }
    memset(buf + 56, 'x', SPEED_KV_NOTIFY_ID_MAX); /* no NUL in the request id */
    CHECK_INT_EQ(speed_kv_notify_decode(buf, n, &o, &why), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(why, "terminated");
    speed_free(buf);
}

/* ---- checked writes ---------------------------------------------------------------------- */

/* The bytes of every unit of seq's prompt blocks, concatenated (caller frees). */
static uint8_t *snapshot(node_t *n, const speed_kv_seq_t *seq, size_t *len_p) {
    size_t cap = 0, len = 0;
    uint8_t *buf = NULL;
    for (int l = 0; l < L; l++)
        for (int64_t i = 0; i * B < (l < C ? N_FULL : N_COMPACT); i++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(n->cache, seq, l, i, &blk, &unit);
            if (len + unit > cap) {
                cap = 2 * (len + unit);
                buf = speed_realloc(buf, cap);
            }
            memcpy(buf + len, blk, unit);
            len += unit;
        }
    *len_p = len;
    return buf;
}

/* Whether seq's prompt blocks still hold the bytes of snap. */
static bool unchanged(node_t *n, const speed_kv_seq_t *seq, const uint8_t *snap, size_t len) {
    size_t now_len;
    uint8_t *now = snapshot(n, seq, &now_len);
    bool same = now_len == len && memcmp(now, snap, len) == 0;
    speed_free(now);
    return same;
}

/* A whole transfer of desc under id; returns its status and the writes it posted. */
static speed_status_t push_counted(speed_kv_xfer_ctx_t *pctx, const speed_kv_desc_t *desc, node_t *p, const char *id,
                                   uint64_t *n_writes_p) {
    speed_kv_xfer_t *x = NULL;
    speed_status_t st = speed_kv_xfer_create(pctx, desc, p->cache, p->seq, N_FULL, N_COMPACT, id, &x);
    *n_writes_p = 0;
    if (st != SPEED_OK) return st;
    st = speed_kv_xfer_push_all(x);
    if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
    if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
    speed_kv_xfer_info_t info;
    speed_kv_xfer_info(x, &info);
    *n_writes_p = info.n_puts;
    speed_kv_xfer_destroy(x);
    return st;
}

static void test_checked_writes(speed_kv_xfer_ctx_t *pctx, speed_kv_xfer_ctx_t *dctx, node_t *p, node_t *d,
                                speed_kv_transport_t tr) {
    speed_kv_xfer_ctx_stats_t s0, s;
    uint64_t n_w = 0;
    size_t len;
    fill(p, 21);
    fill(d, 90); /* what the decode side holds before: must stay */
    uint8_t *before = snapshot(d, d->seq, &len);

    /* the grant dropped (the reservation ended) before the writes arrive: all dropped */
    speed_kv_desc_t *d1 = describe(dctx, d, tr, "req-late", false);
    if (!d1) return;
    speed_kv_xfer_ctx_grant_drop(dctx, "req-late");
    speed_kv_xfer_ctx_stats(dctx, &s0);
    CHECK_INT_EQ(push_counted(pctx, d1, p, "req-late", &n_w), SPEED_ERR_NOT_FOUND); /* the notify too */
    CHECK(n_w > 0);
    CHECK_INT_EQ(WAIT_STAT(dctx, n_writes_dropped, s0.n_writes_dropped + n_w), s0.n_writes_dropped + n_w);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_writes, s0.n_writes);
    CHECK_MSG(unchanged(d, d->seq, before, len), "a write after the grant was dropped changed the pool");
    speed_kv_desc_destroy(d1);

    /* the grant expired (its lease is over) while the sender still holds a live lease */
    speed_kv_desc_params_t dp = {.transport = tr, .lease_ms = 50, .grant_id = "req-expired", .grant_ms = 50};
    d1 = NULL;
    CHECK(speed_kv_desc_build(dctx, d->cache, d->seq, N_FULL, N_COMPACT, &dp, &d1) == SPEED_OK);
    if (!d1) return;
    uint64_t t0 = xt_now_ms();
    while (xt_now_ms() - t0 < 80) usleep(5000); /* the grant's lifetime passes: what is tested */
    d1->lease_ms = 60000;
    d1->received_ns = 0;
    speed_kv_xfer_ctx_stats(dctx, &s0);
    CHECK_INT_EQ(push_counted(pctx, d1, p, "req-expired", &n_w), SPEED_ERR_NOT_FOUND);
    CHECK_INT_EQ(WAIT_STAT(dctx, n_writes_dropped, s0.n_writes_dropped + n_w), s0.n_writes_dropped + n_w);
    CHECK_MSG(unchanged(d, d->seq, before, len), "a write after the grant expired changed the pool");
    speed_kv_desc_destroy(d1);

    /* a wrong nonce: dropped, the grant stays */
    d1 = describe(dctx, d, tr, "req-guess", false);
    if (!d1) return;
    d1->nonce[0] ^= 0x80;
    speed_kv_xfer_ctx_stats(dctx, &s0);
    CHECK_INT_EQ(push_counted(pctx, d1, p, "req-guess", &n_w), SPEED_ERR_PEER_PROTOCOL);
    CHECK_INT_EQ(WAIT_STAT(dctx, n_writes_dropped, s0.n_writes_dropped + n_w), s0.n_writes_dropped + n_w);
    CHECK_MSG(unchanged(d, d->seq, before, len), "a write with a wrong nonce changed the pool");
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, s0.n_grants);
    speed_kv_xfer_ctx_grant_drop(dctx, "req-guess");
    speed_kv_desc_destroy(d1);

    /* outside the reservation: the descriptor's first lower-pool block names another request's
     * block; the writes aimed there (layers 0 and 1, block 0) are dropped, the rest land, and
     * the notify is refused (the right nonce: the reservation's KV is incomplete) */
    speed_kv_seq_t *victim = NULL;
    CHECK(speed_kv_cache_seq_create(d->cache, C, N_FULL, N_COMPACT, &victim) == SPEED_OK);
    if (!victim) return;
    speed_kv_cache_seq_set_entries(d->cache, victim, N_FULL, N_COMPACT);
    size_t vlen;
    uint8_t *vbefore = snapshot(d, victim, &vlen);
    d1 = describe(dctx, d, tr, "req-aim", false);
    if (d1) {
        const speed_kv_desc_pool_t *pl = &d1->pools[d1->layers[0].pool];
        void *vblk;
        size_t unit;
        speed_kv_cache_block_addr(d->cache, victim, 0, 0, &vblk, &unit);
        int64_t vi = (int64_t)(((uint64_t)(uintptr_t)vblk - pl->base - d1->layers[0].offset) / pl->block_stride);
        d1->pools[d1->layers[0].pool].table[0] = (int32_t)vi;
        speed_kv_xfer_ctx_stats(dctx, &s0);
        int failed0 = atomic_load(&g_notes.integrity_failed), ready0 = atomic_load(&g_notes.ready);
        CHECK_INT_EQ(push_counted(pctx, d1, p, "req-aim", &n_w), SPEED_ERR_TRANSFER);
        CHECK(wait_int(&g_notes.integrity_failed, failed0 + 1, 3000)); /* the node is told: it frees */
        CHECK_INT_EQ(atomic_load(&g_notes.ready), ready0);
        CHECK_INT_EQ(WAIT_STAT(dctx, n_writes_dropped, s0.n_writes_dropped + 2), s0.n_writes_dropped + 2);
        speed_kv_xfer_ctx_stats(dctx, &s);
        CHECK_INT_EQ(s.n_writes, s0.n_writes + n_w - 2);
        CHECK_MSG(unchanged(d, victim, vbefore, vlen), "a write outside the reservation changed another's block");
        CHECK_MSG(!unchanged(d, d->seq, before, len), "the writes inside the reservation did not land");
        CHECK_INT_EQ(s.n_grants, s0.n_grants - 1); /* the refused KV consumed its grant */
        CHECK_INT_EQ(s.n_integrity_failed, s0.n_integrity_failed); /* not a tag mismatch */
        speed_kv_desc_destroy(d1);
    }
    speed_kv_cache_seq_destroy(d->cache, victim);
    speed_free(vbefore);
    speed_free(before);
}

/* ---- binding ------------------------------------------------------------------------------ */

static void test_binding(void) {
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.tls = "sm,self";
    speed_kv_xfer_ctx_t *c = NULL;
    char tls[512];
    CHECK(speed_kv_xfer_ctx_create(&cp, &c) == SPEED_OK);
    if (c) {
        CHECK_INT_EQ(speed_kv_xfer_ctx_transports(c, tls, sizeof tls), SPEED_OK);
        fprintf(stderr, "shm context transports: %s\n", tls);
        CHECK_MSG(!strstr(tls, "tcp") && strstr(tls, "self"), "shm: \"%s\"", tls);
        speed_kv_xfer_ctx_destroy(c);
    }
    cp.tls = "tcp,self";
    cp.net_devices = "lo";
    c = NULL;
    CHECK(speed_kv_xfer_ctx_create(&cp, &c) == SPEED_OK);
    if (c) {
        CHECK_INT_EQ(speed_kv_xfer_ctx_transports(c, tls, sizeof tls), SPEED_OK);
        fprintf(stderr, "tcp context transports: %s\n", tls);
        CHECK_MSG(strstr(tls, "tcp") && !strstr(tls, "posix") && !strstr(tls, "sysv") && !strstr(tls, "cma"),
                  "tcp: \"%s\"", tls);
        speed_kv_xfer_ctx_destroy(c);
    }
}

int main(int argc, char **argv) {
    speed_kv_transport_t tr = xt_transport(argc > 1 ? argv[1] : "shm");
    xt_ucx_env();
    test_wire();
    test_binding();

    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    CHECK(speed_backend_create(&bp, &g_be) == SPEED_OK);
    if (!g_be) return CHECK_DONE();
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.op_timeout_ms = 3000;
    speed_kv_xfer_ctx_t *pctx = NULL, *dctx = NULL;
    CHECK(speed_kv_xfer_ctx_create(&cp, &pctx) == SPEED_OK);
    cp.notify_cb = note_cb;
    cp.require_grant = true;
    cp.writes_only = true; /* as a decode node: descriptors with grants carry no rkeys */
    CHECK(speed_kv_xfer_ctx_create(&cp, &dctx) == SPEED_OK);
    if (!pctx || !dctx) return CHECK_DONE();
    node_t p = {0}, d = {0};
    CHECK(node_init(&p) == 0 && node_init(&d) == 0);
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, p.cache) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(dctx, d.cache) == SPEED_OK);
    fill(&p, 3);
    const speed_kv_cache_t *const caches[] = {p.cache, d.cache, NULL};
    speed_kv_xfer_ctx_t *const ctxs[] = {pctx, dctx, NULL};
    xt_ledger_t base;
    speed_kv_xfer_ctx_stats_t s0, s;

    /* grants: a fresh nonce each; the right one is accepted */
    xt_ledger_take(&base, caches, ctxs);
    speed_kv_desc_t *d1 = describe(dctx, &d, tr, "req-a", false), *d2 = describe(dctx, &d, tr, "req-b", false);
    if (!d1 || !d2) return CHECK_DONE();
    CHECK(d1->has_nonce && d2->has_nonce && memcmp(d1->nonce, d2->nonce, SPEED_KV_NONCE_BYTES) != 0);
    /* writes_only: no rkey leaves the node, and a descriptor without rkeys needs its nonce */
    for (uint32_t i = 0; i < d1->n_regions; i++) CHECK(d1->regions[i].rkey_len == 0 && !d1->regions[i].rkey);
    CHECK_INT_EQ(speed_kv_desc_check(d1), SPEED_OK);
    d1->has_nonce = false;
    speed_log_set_sink(tu_log_discard, NULL);
    CHECK_INT_EQ(speed_kv_desc_check(d1), SPEED_ERR_FORMAT);
    speed_kv_xfer_t *xr = NULL;
    CHECK_INT_EQ(speed_kv_xfer_create(pctx, d1, p.cache, p.seq, N_FULL, N_COMPACT, "req-a", &xr), SPEED_ERR_PEER_PROTOCOL);
    speed_log_set_sink(NULL, NULL);
    d1->has_nonce = true;
    speed_kv_xfer_ctx_stats(dctx, &s0);
    CHECK_INT_EQ(s0.n_grants, 2);
    CHECK_INT_EQ(run_xfer(pctx, d1, &p, "req-a", false), SPEED_OK);
    CHECK(wait_int(&g_notes.ready, 1, 3000));

    /* a wrong nonce: refused before the callback, the grant stays, the right one still works */
    d2->nonce[SPEED_KV_NONCE_BYTES - 1] ^= 1;
    CHECK_INT_EQ(run_xfer(pctx, d2, &p, "req-b", false), SPEED_ERR_PEER_PROTOCOL);
    CHECK_INT_EQ(atomic_load(&g_notes.ready), 1);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_nonce_rejected, s0.n_nonce_rejected + 1);
    CHECK_INT_EQ(s.n_grants, 2);
    d2->nonce[SPEED_KV_NONCE_BYTES - 1] ^= 1;
    CHECK_INT_EQ(run_xfer(pctx, d2, &p, "req-b", false), SPEED_OK);
    CHECK(wait_int(&g_notes.ready, 2, 3000));
    /* the right nonce under another request's name: no grant for that name */
    CHECK_INT_EQ(run_xfer(pctx, d2, &p, "req-c", false), SPEED_ERR_NOT_FOUND);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_nonce_rejected, s0.n_nonce_rejected + 2);
    CHECK_INT_EQ(atomic_load(&g_notes.ready), 2);
    speed_kv_xfer_ctx_grant_drop(dctx, "req-a");
    speed_kv_xfer_ctx_grant_drop(dctx, "req-b");
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, 0);
    speed_kv_desc_destroy(d1);
    speed_kv_desc_destroy(d2);
    xt_ledger_check(&base, "grants");

    /* the abort: a cancelled transfer flushes and tells the decode side, which drops the grant */
    xt_ledger_take(&base, caches, ctxs);
    d1 = describe(dctx, &d, tr, "req-abort", false);
    speed_kv_xfer_t *x = NULL;
    CHECK(d1 && speed_kv_xfer_create(pctx, d1, p.cache, p.seq, N_FULL, N_COMPACT, "req-abort", &x) == SPEED_OK);
    if (x) {
        CHECK(speed_kv_xfer_push_layer(x, 0, N_FULL, N_FULL) == SPEED_OK);
        speed_kv_xfer_abort(x);
        CHECK(wait_int(&g_notes.aborted, 1, 3000));
        speed_kv_xfer_destroy(x);
    }
    CHECK_INT_EQ(WAIT_STAT(pctx, n_aborts_sent, 1), 1);
    CHECK_INT_EQ(WAIT_STAT(dctx, n_aborts_received, 1), 1);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, 0);
    speed_kv_desc_destroy(d1);
    /* no nonce (a descriptor without a grant): no abort to send */
    speed_kv_desc_params_t dp = {.transport = tr, .lease_ms = 60000};
    d1 = NULL;
    CHECK(speed_kv_desc_build(dctx, d.cache, d.seq, N_FULL, N_COMPACT, &dp, &d1) == SPEED_OK);
    x = NULL;
    CHECK(d1 && !d1->has_nonce &&
          speed_kv_xfer_create(pctx, d1, p.cache, p.seq, N_FULL, N_COMPACT, "req-nononce", &x) == SPEED_OK);
    if (x) {
        CHECK(speed_kv_xfer_push_layer(x, 0, N_FULL, N_FULL) == SPEED_OK);
        speed_kv_xfer_abort(x);
        speed_kv_xfer_destroy(x);
    }
    speed_kv_xfer_ctx_stats(pctx, &s);
    CHECK_INT_EQ(s.n_aborts_sent, 1);
    speed_kv_desc_destroy(d1);
    /* a plain cancel (the reservation may be retried by another sender): no abort */
    d1 = describe(dctx, &d, tr, "req-retry", false);
    x = NULL;
    CHECK(d1 && speed_kv_xfer_create(pctx, d1, p.cache, p.seq, N_FULL, N_COMPACT, "req-retry", &x) == SPEED_OK);
    if (x) {
        CHECK(speed_kv_xfer_push_layer(x, 0, N_FULL, N_FULL) == SPEED_OK);
        speed_kv_xfer_cancel(x);
        speed_kv_xfer_destroy(x);
    }
    /* the abort of a request that never made a transfer (cancelled while queued) */
    CHECK_INT_EQ(speed_kv_xfer_ctx_abort_desc(pctx, d1, "req-retry"), SPEED_OK);
    CHECK(wait_int(&g_notes.aborted, 2, 3000));
    CHECK_INT_EQ(WAIT_STAT(pctx, n_aborts_sent, 2), 2);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, 0);
    speed_kv_desc_destroy(d1);
    xt_ledger_check(&base, "abort");

    /* integrity: verified tags pass; a tampered block fails the transfer and drops the grant */
    xt_ledger_take(&base, caches, ctxs);
    fill(&p, 9);
    d1 = describe(dctx, &d, tr, "req-int", true);
    CHECK(d1 && d1->integrity);
    int ready0 = atomic_load(&g_notes.ready);
    CHECK_INT_EQ(run_xfer(pctx, d1, &p, "req-int", false), SPEED_OK);
    CHECK(wait_int(&g_notes.ready, ready0 + 1, 3000));
    speed_kv_xfer_ctx_grant_drop(dctx, "req-int");
    speed_kv_desc_destroy(d1);
    d1 = describe(dctx, &d, tr, "req-tamper", true);
    speed_kv_xfer_ctx_stats(dctx, &s0);
    CHECK_INT_EQ(run_xfer(pctx, d1, &p, "req-tamper", true), SPEED_ERR_TRANSFER);
    CHECK(wait_int(&g_notes.integrity_failed, 1, 3000));
    CHECK_INT_EQ(atomic_load(&g_notes.ready), ready0 + 1);
    CHECK_INT_EQ(WAIT_STAT(dctx, n_integrity_failed, s0.n_integrity_failed + 1), s0.n_integrity_failed + 1);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, 0);
    speed_kv_desc_destroy(d1);
    /* integrity without a grant is refused at build */
    dp.integrity = true;
    d1 = NULL;
    CHECK_INT_EQ(speed_kv_desc_build(dctx, d.cache, d.seq, N_FULL, N_COMPACT, &dp, &d1), SPEED_ERR_INVALID_ARGUMENT);
    xt_ledger_check(&base, "integrity");

    xt_ledger_take(&base, caches, ctxs);
    speed_log_set_sink(tu_log_discard, NULL); /* the refused notifies warn */
    test_checked_writes(pctx, dctx, &p, &d, tr);
    speed_log_set_sink(NULL, NULL);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, 0);
    xt_ledger_check(&base, "checked writes");

    /* deregistering the decode cache drops its grants: no write lands in it afterwards */
    d1 = describe(dctx, &d, tr, "req-dereg", false);
    speed_kv_xfer_ctx_stats(dctx, &s0);
    CHECK_INT_EQ(s0.n_grants, 1);
    speed_kv_xfer_ctx_deregister_cache(dctx, d.cache);
    speed_kv_xfer_ctx_stats(dctx, &s);
    CHECK_INT_EQ(s.n_grants, 0);
    if (d1) {
        size_t dlen;
        uint8_t *dbefore = snapshot(&d, d.seq, &dlen);
        uint64_t n_w = 0;
        speed_log_set_sink(tu_log_discard, NULL);
        CHECK_INT_EQ(push_counted(pctx, d1, &p, "req-dereg", &n_w), SPEED_ERR_NOT_FOUND);
        speed_log_set_sink(NULL, NULL);
        CHECK_INT_EQ(WAIT_STAT(dctx, n_writes_dropped, s0.n_writes_dropped + n_w), s0.n_writes_dropped + n_w);
        CHECK_MSG(unchanged(&d, d.seq, dbefore, dlen), "a write landed in a deregistered cache");
        speed_free(dbefore);
        speed_kv_desc_destroy(d1);
    }

    node_cleanup(&p);
    node_cleanup(&d);
    speed_kv_xfer_ctx_destroy(pctx);
    speed_kv_xfer_ctx_destroy(dctx);
    speed_backend_destroy(g_be);
    return CHECK_DONE();
}
