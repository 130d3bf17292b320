/* KV transfer: layout checks, byte-exact placement with different pool splits, epoch, lease,
 * refusal, cancel, a decode peer killed mid-transfer (tcp and shm; its descriptor shipped from
 * the child in the production wire format) and teardown with transfers in flight. Every scenario
 * ends with the resource ledger (xt_ledger_check): no transfer in flight, the KV blocks of both
 * caches free again, counted allocations back (endpoints aside, each accounted); registrations
 * are released by deregistration, and the whole test gives back every counted allocation once
 * the contexts are destroyed (ASan checks the uncounted ones: UCX's). Malformed descriptors are
 * test_kv_transfer_desc's.
 *
 * KV caches are used directly (cpu-ref backend, no model): L = 4 layers, 2 heads of 8, B = 4.
 * The prefill cache is split at C = 2, the decode cache at 3, the sequence depth is C = 2. */
#include <signal.h>
#include <sys/wait.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "clock.h"
#include "test_log.h"
#include "kv_cache.h"
#include "kv_transfer.h"
#include "log.h"
#include "xfer_desc_wire.h"
#include "xfer_test_util.h"

#define L         4
#define C         2
#define B         4
#define N_FULL    13 /* 4 blocks, the last partial */
#define N_COMPACT 2  /* anchor + tail */

typedef struct {
    speed_kv_cache_t *cache;
    speed_kv_seq_t *seq;
} node_t;

static speed_backend_t *g_be;

static int node_init(node_t *n, int split, speed_dtype_t dtype, int block_tokens, int64_t extra) {
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = g_be;
    p.n_layers = L;
    p.split_layer = split;
    p.n_kv_heads = 2;
    p.head_dim = 8;
    p.dtype = dtype;
    p.block_tokens = block_tokens;
    p.n_blocks[0] = p.n_blocks[1] = 24;
    if (speed_kv_cache_create(&p, &n->cache) != SPEED_OK) return -1;
    return speed_kv_cache_seq_create(n->cache, C, N_FULL + extra, N_COMPACT + extra, &n->seq) == SPEED_OK ? 0 : -1;
}

static void node_cleanup(node_t *n) {
    if (n->cache) speed_kv_cache_seq_destroy(n->cache, n->seq);
    speed_kv_cache_destroy(n->cache);
    memset(n, 0, sizeof *n);
}

static int64_t entries(int layer) { return layer < C ? N_FULL : N_COMPACT; }

/* Byte of (layer, entry, half (0 K, 1 V), i) in the pattern. */
static uint8_t pat(int layer, int64_t e, int half, size_t i, uint8_t seed) {
    return (uint8_t)(seed + 31 * layer + 7 * e + 101 * half + i);
}

/* Writes the pattern into the prefill sequence's entries (host memory on cpu-ref). */
static void fill(node_t *n, uint8_t seed) {
    size_t tb = speed_kv_cache_token_bytes(n->cache), half_unit = speed_kv_cache_unit_bytes(n->cache) / 2;
    for (int l = 0; l < L; l++)
        for (int64_t e = 0; e < entries(l); e++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(n->cache, n->seq, l, e / B, &blk, &unit);
            for (int h = 0; h < 2; h++)
                for (size_t i = 0; i < tb / 2; i++)
                    ((uint8_t *)blk)[h * half_unit + (size_t)(e % B) * (tb / 2) + i] = pat(l, e, h, i, seed);
        }
    speed_kv_cache_seq_set_entries(n->cache, n->seq, N_FULL, N_COMPACT);
}

/* Entries hold the pattern; the rest of each touched block is still zero. Returns mismatches. */
static int verify(node_t *n, uint8_t seed) {
    size_t tb = speed_kv_cache_token_bytes(n->cache), half_unit = speed_kv_cache_unit_bytes(n->cache) / 2;
    int bad = 0;
    for (int l = 0; l < L; l++)
        for (int64_t blk_i = 0; blk_i * B < entries(l); blk_i++) {
            void *blk;
            size_t unit;
            speed_kv_cache_block_addr(n->cache, n->seq, l, blk_i, &blk, &unit);
            for (int slot = 0; slot < B; slot++) {
                int64_t e = blk_i * B + slot;
                for (int h = 0; h < 2; h++)
                    for (size_t i = 0; i < tb / 2; i++) {
                        uint8_t want = e < entries(l) ? pat(l, e, h, i, seed) : 0;
                        bad += ((uint8_t *)blk)[h * half_unit + (size_t)slot * (tb / 2) + i] != want;
                    }
            }
        }
    return bad;
}

static speed_kv_desc_t *describe(speed_kv_xfer_ctx_t *dctx, node_t *d, speed_kv_transport_t t, int64_t lease_ms) {
    speed_kv_desc_params_t dp = {.transport = t, .lease_ms = lease_ms, .cookie = 42};
    speed_kv_desc_t *desc = NULL;
    CHECK(speed_kv_desc_build(dctx, d->cache, d->seq, N_FULL, N_COMPACT, &dp, &desc) == SPEED_OK);
    return desc;
}

static speed_status_t run_xfer(speed_kv_xfer_ctx_t *pctx, const speed_kv_desc_t *desc, node_t *p, const char *id) {
    speed_kv_xfer_t *x = NULL;
    speed_status_t st = speed_kv_xfer_create(pctx, desc, p->cache, p->seq, N_FULL, N_COMPACT, id, &x);
    if (st != SPEED_OK) return st;
    st = speed_kv_xfer_push_all(x);
    if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
    if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
    speed_kv_xfer_destroy(x);
    return st;
}

/* ---- layout mismatches --------------------------------------------------------------------- */

static void test_mismatch(speed_kv_xfer_ctx_t *pctx, const speed_kv_desc_t *desc) {
    xt_ledger_t base;
    xt_ledger_take(&base, NULL, (speed_kv_xfer_ctx_t *const[]){pctx, NULL});
    node_t p16 = {0}, p8 = {0}, same = {0}; /* same: the descriptor's layout */
    CHECK(node_init(&p16, C, SPEED_DTYPE_BF16, B, 0) == 0);
    CHECK(node_init(&p8, C, SPEED_DTYPE_F32, 8, 0) == 0);
    CHECK(node_init(&same, C, SPEED_DTYPE_F32, B, 0) == 0);
    int64_t unregistered = speed_alloc_live_count();
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, p16.cache) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, p8.cache) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, same.cache) == SPEED_OK);
    int64_t registered = speed_alloc_live_count();
    CHECK_MSG(registered > unregistered, "registering three caches recorded no region (%lld -> %lld)",
              (long long)unregistered, (long long)registered);
    speed_kv_xfer_t *x = NULL;
    CHECK(speed_kv_xfer_create(pctx, desc, p16.cache, p16.seq, N_FULL, N_COMPACT, "req-dtype", &x) ==
          SPEED_ERR_PEER_PROTOCOL);
    CHECK_CONTAINS(speed_log_last_error(), "dtype");
    CHECK(speed_kv_xfer_create(pctx, desc, p8.cache, p8.seq, N_FULL, N_COMPACT, "req-b", &x) ==
          SPEED_ERR_PEER_PROTOCOL);
    CHECK_CONTAINS(speed_log_last_error(), "block_tokens");
    speed_kv_xfer_ctx_deregister_cache(pctx, p16.cache);
    speed_kv_xfer_ctx_deregister_cache(pctx, p8.cache);
    speed_kv_xfer_ctx_deregister_cache(pctx, same.cache);
    /* deregistration released the regions: their records are gone and the cache is unknown again */
    CHECK_MSG(speed_alloc_live_count() == unregistered, "deregistered: %lld counted allocations, %lld unregistered",
              (long long)speed_alloc_live_count(), (long long)unregistered);
    speed_log_clear_last_error();
    CHECK(speed_kv_xfer_create(pctx, desc, same.cache, same.seq, N_FULL, N_COMPACT, "req-dereg", &x) ==
          SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "not registered");
    node_cleanup(&p16);
    node_cleanup(&p8);
    node_cleanup(&same);
    CHECK(x == NULL);
    xt_ledger_check(&base, "layout mismatch");
}

/* A decode node in a child process: forked before this process initialises UCX (a child of a
 * process with UCX threads cannot use UCX), it registers a cache, sends its descriptor and
 * waits to be killed. */
typedef struct {
    pid_t pid;
    int fd;
} kid_t;

static kid_t spawn_decode_node(speed_kv_transport_t tr) {
    kid_t k = {-1, -1};
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return k;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        speed_kv_xfer_ctx_params_t ccp = speed_kv_xfer_ctx_default_params();
        speed_kv_xfer_ctx_t *cctx = NULL;
        node_t cd = {0};
        if (speed_kv_xfer_ctx_create(&ccp, &cctx) != SPEED_OK || node_init(&cd, 3, SPEED_DTYPE_F32, B, 0) != 0 ||
            speed_kv_xfer_ctx_register_cache(cctx, cd.cache) != SPEED_OK)
            _exit(2);
        speed_kv_desc_t *cdesc = describe(cctx, &cd, tr, 0);
        uint8_t *bytes = NULL;
        size_t len = 0;
        if (!cdesc || xt_desc_pack(cdesc, &bytes, &len) != SPEED_OK || xt_send(sv[1], bytes, len) != 0) _exit(3);
        char c;
        (void)!read(sv[1], &c, 1); /* until killed (or the parent closes the socket) */
        _exit(0);
    }
    close(sv[1]);
    k.pid = pid;
    k.fd = sv[0];
    return k;
}

int main(void) {
    xt_ucx_env();
    if (getenv("SPEED_LOG")) speed_log_configure(getenv("SPEED_LOG"));
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    CHECK(speed_backend_create(&bp, &g_be) == SPEED_OK);
    if (!g_be) return CHECK_DONE();
    const int64_t allocs_at_start = speed_alloc_live_count(); /* no context, no cache yet */
    kid_t kids[2] = {spawn_decode_node(SPEED_KV_TRANSPORT_SHM), spawn_decode_node(SPEED_KV_TRANSPORT_TCP)};
    CHECK(kids[0].pid > 0 && kids[1].pid > 0);

    xt_inbox_t inbox;
    xt_inbox_init(&inbox);
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.op_timeout_ms = 2000;
    speed_kv_xfer_ctx_t *pctx = NULL, *dctx = NULL;
    CHECK(speed_kv_xfer_ctx_create(&cp, &pctx) == SPEED_OK);
    cp.notify_cb = xt_inbox_cb;
    cp.notify_user = &inbox;
    CHECK(speed_kv_xfer_ctx_create(&cp, &dctx) == SPEED_OK);
    if (!pctx || !dctx) return CHECK_DONE();
    CHECK(speed_kv_xfer_ctx_epoch(pctx) != speed_kv_xfer_ctx_epoch(dctx));

    node_t p = {0}, d = {0};
    CHECK(node_init(&p, C, SPEED_DTYPE_F32, B, 0) == 0);
    CHECK(node_init(&d, 3, SPEED_DTYPE_F32, B, 5) == 0); /* other split, room for 5 generated */
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, p.cache) == SPEED_OK);
    CHECK(speed_kv_xfer_ctx_register_cache(pctx, p.cache) == SPEED_OK); /* twice: no-op */
    CHECK(speed_kv_xfer_ctx_register_cache(dctx, d.cache) == SPEED_OK);
    fill(&p, 1);
    const size_t want_bytes = (size_t)(C * N_FULL + (L - C) * N_COMPACT) * speed_kv_cache_token_bytes(p.cache);

    speed_kv_desc_t *desc = describe(dctx, &d, SPEED_KV_TRANSPORT_SHM, 0);
    if (!desc) return CHECK_DONE();
    CHECK_INT_EQ(desc->total_bytes, want_bytes);
    const speed_kv_cache_t *const caches[] = {p.cache, d.cache, NULL};
    speed_kv_xfer_ctx_t *const ctxs[] = {pctx, dctx, NULL};
    xt_ledger_t base;
    test_mismatch(pctx, desc);

    /* a descriptor whose per-layer entries differ from the local sequence */
    xt_ledger_take(&base, caches, ctxs);
    speed_kv_xfer_t *x = NULL;
    CHECK(speed_kv_xfer_create(pctx, desc, p.cache, p.seq, N_FULL - 1, N_COMPACT, "req-entries", &x) ==
          SPEED_ERR_PEER_PROTOCOL);
    CHECK_CONTAINS(speed_log_last_error(), "entries");
    desc->head_begin = 1;
    desc->head_end = 3;
    CHECK(speed_kv_xfer_create(pctx, desc, p.cache, p.seq, N_FULL, N_COMPACT, "req-heads", &x) ==
          SPEED_ERR_PEER_PROTOCOL);
    desc->head_begin = 0;
    desc->head_end = 2;
    xt_ledger_check(&base, "refused at creation");

    /* both transports, byte exact into a differently split cache; the endpoint is reused */
    xt_ledger_take(&base, caches, ctxs);
    for (int t = 0; t < 2; t++) {
        speed_kv_transport_t tr = t ? SPEED_KV_TRANSPORT_TCP : SPEED_KV_TRANSPORT_SHM;
        speed_kv_desc_t *dd = describe(dctx, &d, tr, 60000);
        for (int rep = 0; rep < 2 && dd; rep++) {
            memset(speed_kv_cache_layer(d.cache, 0).k_base, 0, 24 * speed_kv_cache_unit_bytes(d.cache) * 3);
            memset(speed_kv_cache_layer(d.cache, 3).k_base, 0, 24 * speed_kv_cache_unit_bytes(d.cache));
            fill(&p, (uint8_t)(10 + rep + 2 * t));
            int before = inbox.n;
            speed_status_t st = run_xfer(pctx, dd, &p, "req-ok");
            CHECK_MSG(st == SPEED_OK, "%s: %s", speed_kv_transport_name(tr), speed_status_string(st));
            CHECK_INT_EQ(xt_inbox_wait(&inbox, before + 1, 5000), before + 1);
            CHECK_INT_EQ(inbox.bytes, want_bytes);
            CHECK_INT_EQ(inbox.cookie, 42);
            CHECK_INT_EQ(verify(&d, (uint8_t)(10 + rep + 2 * t)), 0);
        }
        speed_kv_desc_destroy(dd);
    }
    speed_kv_xfer_ctx_stats_t ps;
    speed_kv_xfer_ctx_stats(pctx, &ps);
    CHECK_INT_EQ(ps.n_done, 4);
    CHECK_INT_EQ(ps.n_endpoints, 2); /* one per transport, reused */
    CHECK_INT_EQ(ps.bytes_put, 4 * want_bytes);
    CHECK(ps.n_refused >= 4);
    xt_ledger_check(&base, "transfers done (two endpoints kept)");

    /* epoch mismatch: the decode node refuses the notify, the callback never sees it */
    xt_ledger_take(&base, caches, ctxs);
    {
        int before = inbox.n;
        desc->epoch ^= 1;
        CHECK(run_xfer(pctx, desc, &p, "req-epoch") == SPEED_ERR_PEER_PROTOCOL);
        desc->epoch ^= 1;
        speed_kv_xfer_ctx_stats_t ds;
        speed_kv_xfer_ctx_stats(dctx, &ds);
        CHECK_INT_EQ(ds.n_notify_rejected, 1);
        CHECK_INT_EQ(inbox.n, before);
    }
    /* the decode node's callback says the reservation is gone */
    xt_ledger_check(&base, "epoch mismatch");
    xt_ledger_take(&base, caches, ctxs);
    inbox.answer = SPEED_ERR_NOT_FOUND;
    CHECK(run_xfer(pctx, desc, &p, "req-gone") == SPEED_ERR_NOT_FOUND);
    inbox.answer = SPEED_OK;
    xt_ledger_check(&base, "reservation gone");

    /* lease: past at creation; passing during the pushes */
    xt_ledger_take(&base, caches, ctxs);
    {
        /* a 1 ms lease received 50 ms ago (on this host's monotonic clock) */
        speed_kv_desc_t *dd = describe(dctx, &d, SPEED_KV_TRANSPORT_SHM, 1);
        if (dd) dd->received_ns = speed_clock_mono_ns() - 50000000ull;
        CHECK(dd &&
              speed_kv_xfer_create(pctx, dd, p.cache, p.seq, N_FULL, N_COMPACT, "req-lease", &x) == SPEED_ERR_TIMEOUT);
        speed_kv_desc_destroy(dd);
        dd = describe(dctx, &d, SPEED_KV_TRANSPORT_SHM, 300);
        x = NULL;
        CHECK(dd && speed_kv_xfer_create(pctx, dd, p.cache, p.seq, N_FULL, N_COMPACT, "req-lease2", &x) == SPEED_OK);
        CHECK(speed_kv_xfer_push_layer(x, 0, N_FULL, N_FULL) == SPEED_OK);
        usleep(400 * 1000); /* the thing under test: the 300 ms lease passes between two pushes */
        CHECK(speed_kv_xfer_push_layer(x, 1, N_FULL, N_FULL) == SPEED_ERR_TIMEOUT);
        CHECK(speed_kv_xfer_finish(x) == SPEED_ERR_TIMEOUT);
        CHECK(speed_kv_xfer_wait(x, 0) == SPEED_ERR_TIMEOUT);
        speed_kv_xfer_destroy(x);
        speed_kv_desc_destroy(dd);
    }
    xt_ledger_check(&base, "lease");

    /* misuse and cancel */
    xt_ledger_take(&base, caches, ctxs);
    x = NULL;
    CHECK(speed_kv_xfer_create(pctx, desc, p.cache, p.seq, N_FULL, N_COMPACT, "req-cancel", &x) == SPEED_OK);
    if (x) {
        CHECK(speed_kv_xfer_push_layer(x, 0, 9, N_FULL) == SPEED_OK); /* 2 whole blocks */
        CHECK(speed_kv_xfer_push_layer(x, 0, 9, N_FULL) == SPEED_OK); /* a redone step: nothing new */
        CHECK(speed_kv_xfer_push_layer(x, 0, 9, N_FULL + 1) == SPEED_ERR_INVALID_ARGUMENT);
        CHECK(speed_kv_xfer_push_layer(x, L, 1, 1) == SPEED_ERR_INVALID_ARGUMENT);
        CHECK(speed_kv_xfer_finish(x) == SPEED_ERR_INVALID_ARGUMENT); /* layers incomplete */
        CHECK(speed_kv_xfer_wait(x, 10) == SPEED_ERR_TIMEOUT);        /* still running */
        speed_kv_xfer_info_t info;
        speed_kv_xfer_info(x, &info);
        CHECK_INT_EQ(info.bytes_put, 2 * speed_kv_cache_unit_bytes(p.cache));
        speed_kv_xfer_cancel(x);
        CHECK(speed_kv_xfer_push_layer(x, 1, N_FULL, N_FULL) == SPEED_ERR_CANCELLED);
        CHECK(speed_kv_xfer_finish(x) == SPEED_ERR_CANCELLED);
        CHECK(speed_kv_xfer_wait(x, -1) == SPEED_ERR_CANCELLED);
        CHECK(speed_kv_xfer_poll(x, NULL) == SPEED_KV_XFER_FAILED);
        speed_kv_xfer_destroy(x);
    }
    xt_ledger_check(&base, "cancel");

    /* a decode peer killed mid-transfer: a bounded, peer-group failure; the next transfer to a
     * live peer works (tcp: PEER mode reports the failure; shm: the ack timeout does) */
    int extra_failures = 0;
    for (int t = 0; t < 2; t++) {
        speed_kv_transport_t tr = t ? SPEED_KV_TRANSPORT_TCP : SPEED_KV_TRANSPORT_SHM;
        pid_t pid = kids[t].pid;
        xt_ledger_take(&base, caches, ctxs); /* the endpoint to the child: made and maybe closed here */
        int sv[2] = {kids[t].fd, -1};
        void *bytes = NULL;
        size_t len = 0;
        speed_kv_desc_t *kd = NULL;
        CHECK(xt_recv(sv[0], &bytes, &len, 30000) == 0);
        CHECK(bytes && xt_desc_unpack(bytes, len, &kd) == SPEED_OK);
        free(bytes);
        x = NULL;
        /* a first transfer connects and completes; the peer dies during the second */
        CHECK(kd && run_xfer(pctx, kd, &p, "req-before-kill") == SPEED_OK);
        CHECK(kd && speed_kv_xfer_create(pctx, kd, p.cache, p.seq, N_FULL, N_COMPACT, "req-killed", &x) == SPEED_OK);
        if (x) {
            CHECK(speed_kv_xfer_push_layer(x, 0, N_FULL, N_FULL) == SPEED_OK);
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            uint64_t t0 = xt_now_ms();
            speed_log_set_sink(tu_log_discard, NULL); /* the expected failure */
            for (int l = 1; l < L; l++) speed_kv_xfer_push_layer(x, l, entries(l), entries(l));
            speed_kv_xfer_finish(x);
            speed_status_t st = speed_kv_xfer_wait(x, -1);
            speed_log_set_sink(NULL, NULL);
            uint64_t dt = xt_now_ms() - t0;
            speed_kv_xfer_info_t info;
            speed_kv_xfer_info(x, &info);
            CHECK_MSG(st == SPEED_ERR_PEER_UNREACHABLE || st == SPEED_ERR_TRANSFER, "%s: %s",
                      speed_kv_transport_name(tr), speed_status_string(st));
            CHECK(dt < 3 * (uint64_t)cp.op_timeout_ms);
            fprintf(stderr, "%s peer killed: %s at %s after %llu ms\n", speed_kv_transport_name(tr),
                    speed_status_string(st), speed_kv_stage_name(info.failed_stage), (unsigned long long)dt);
            speed_kv_xfer_destroy(x);
        }
        speed_kv_desc_destroy(kd);
        close(sv[0]);
        /* a live peer afterwards: works */
        speed_kv_desc_t *dd = describe(dctx, &d, tr, 0);
        fill(&p, 77);
        speed_status_t after = dd ? run_xfer(pctx, dd, &p, "req-after") : SPEED_ERR_INTERNAL;
        if (tr == SPEED_KV_TRANSPORT_TCP) {
            CHECK(after == SPEED_OK);
            CHECK_INT_EQ(verify(&d, 77), 0);
        } else {
            /* UCX 1.13, mode NONE: a dead shm peer can leave the worker's shared-memory path stuck
             * (3 of 10 runs here); then this ends by the flush timeout, still bounded. */
            CHECK(after == SPEED_OK || after == SPEED_ERR_TRANSFER);
            if (after == SPEED_OK)
                CHECK_INT_EQ(verify(&d, 77), 0);
            else
                extra_failures++;
            fprintf(stderr, "shm transfer to a live peer after a dead one: %s\n", speed_status_string(after));
        }
        speed_kv_desc_destroy(dd);
        if (tr == SPEED_KV_TRANSPORT_TCP) {
            xt_ledger_check(&base, "tcp peer killed");
        } else {
            /* shm (error mode NONE): the killed transfer's puts to the dead peer never complete,
             * so its destroyed record stays with the context until the teardown (7 counted
             * allocations here; more when the path is stuck). The end of the test checks that
             * the teardown gives them back. */
            int64_t held = 0;
            xt_ledger_check_held(&base, "shm peer killed", &held);
        }
    }
    speed_kv_xfer_ctx_stats(pctx, &ps);
    CHECK_INT_EQ(ps.n_failed[SPEED_KV_STAGE_PUT] + ps.n_failed[SPEED_KV_STAGE_FLUSH] +
                     ps.n_failed[SPEED_KV_STAGE_NOTIFY],
                 5 + extra_failures); /* epoch, not found, lease passed, 2 killed */

    /* teardown with transfers in flight: pushing, finishing, and a destroyed (orphaned) one */
    speed_kv_xfer_t *a = NULL, *b = NULL, *c = NULL;
    CHECK(speed_kv_xfer_create(pctx, desc, p.cache, p.seq, N_FULL, N_COMPACT, "req-a", &a) == SPEED_OK);
    CHECK(speed_kv_xfer_create(pctx, desc, p.cache, p.seq, N_FULL, N_COMPACT, "req-b", &b) == SPEED_OK);
    CHECK(speed_kv_xfer_create(pctx, desc, p.cache, p.seq, N_FULL, N_COMPACT, "req-c", &c) == SPEED_OK);
    if (a && b && c) {
        CHECK(speed_kv_xfer_push_layer(a, 0, 8, N_FULL) == SPEED_OK);
        CHECK(speed_kv_xfer_push_all(b) == SPEED_OK);
        CHECK(speed_kv_xfer_finish(b) == SPEED_OK);
        CHECK(speed_kv_xfer_push_all(c) == SPEED_OK);
        speed_kv_xfer_destroy(c);
    }
    speed_kv_xfer_ctx_destroy(pctx); /* a and b end with it */
    speed_kv_desc_destroy(desc);
    speed_kv_xfer_ctx_destroy(dctx);
    node_cleanup(&p);
    node_cleanup(&d);
    xt_inbox_cleanup(&inbox);
    /* every context gone: endpoints, regions, transfers (orphans included) and caches gave back
     * every counted allocation */
    CHECK_MSG(speed_alloc_live_count() == allocs_at_start, "teardown: %lld counted allocations live, %lld at start",
              (long long)speed_alloc_live_count(), (long long)allocs_at_start);
    speed_backend_destroy(g_be);
    return CHECK_DONE();
}
