/* Helpers shared by the KV transfer tests: see xfer_test_util.h. */
#include "xfer_test_util.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"

void xt_ucx_env(void) {
    setenv("UCX_NET_DEVICES", "lo", 0);
    setenv("UCX_TCP_CM_REUSEADDR", "y", 0);
}

speed_kv_transport_t xt_transport(const char *name) {
    return strcmp(name, "tcp") == 0 ? SPEED_KV_TRANSPORT_TCP : SPEED_KV_TRANSPORT_SHM;
}

/* ---- framed messages ------------------------------------------------------------------------- */

static int xt_io(int fd, void *buf, size_t n, int writing, int timeout_ms) {
    char *p = buf;
    while (n) {
        struct pollfd pfd = {.fd = fd, .events = writing ? POLLOUT : POLLIN};
        int r = poll(&pfd, 1, timeout_ms);
        if (r <= 0) return -1; /* timeout or error */
        ssize_t k = writing ? write(fd, p, n) : read(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

int xt_send(int fd, const void *buf, size_t n) {
    uint64_t len = n;
    return xt_io(fd, &len, sizeof len, 1, 30000) || xt_io(fd, (void *)buf, n, 1, 30000) ? -1 : 0;
}

int xt_recv(int fd, void **buf_p, size_t *n_p, int timeout_ms) {
    uint64_t len;
    if (xt_io(fd, &len, sizeof len, 0, timeout_ms) || len > (1u << 30)) return -1;
    void *b = malloc(len ? len : 1);
    if (xt_io(fd, b, len, 0, timeout_ms)) {
        free(b);
        return -1;
    }
    *buf_p = b;
    *n_p = len;
    return 0;
}

/* ---- decode-side inbox ----------------------------------------------------------------------- */

void xt_inbox_init(xt_inbox_t *b) {
    memset(b, 0, sizeof *b);
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
}

void xt_inbox_cleanup(xt_inbox_t *b) {
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
}

speed_status_t xt_inbox_cb(void *user, const speed_kv_notify_t *note) {
    xt_inbox_t *b = user;
    pthread_mutex_lock(&b->mu);
    b->n++;
    b->cookie = note->cookie;
    b->bytes = note->bytes;
    b->epoch = note->epoch;
    snprintf(b->request_id, sizeof b->request_id, "%s", note->request_id);
    speed_status_t st = b->answer;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return st;
}

int xt_inbox_wait(xt_inbox_t *b, int n, int timeout_ms) {
    double until = now_ms() + timeout_ms;
    pthread_mutex_lock(&b->mu);
    while (b->n < n && now_ms() < until) {
        /* Short slices: a notify that raced the first check is seen within 10 ms anyway. */
        struct timespec ts = realtime_after_ms(10);
        pthread_cond_timedwait(&b->cv, &b->mu, &ts);
    }
    int got = b->n;
    pthread_mutex_unlock(&b->mu);
    return got;
}

/* ---- resource ledger --------------------------------------------------------------------------- */

int64_t xt_xfers_in_flight(const speed_kv_xfer_ctx_stats_t *s) {
    uint64_t ended = s->n_done + s->n_cancelled;
    for (int st = SPEED_KV_STAGE_PUT; st < SPEED_KV_STAGE_COUNT; st++) ended += s->n_failed[st];
    return (int64_t)s->n_started - (int64_t)ended;
}

void xt_ledger_take(xt_ledger_t *l, const speed_kv_cache_t *const *caches, speed_kv_xfer_ctx_t *const *ctxs) {
    memset(l, 0, sizeof *l);
    for (int i = 0; caches && caches[i] && i < XT_LEDGER_MAX; i++) {
        speed_kv_cache_stats_t cs;
        speed_kv_cache_stats(caches[i], &cs);
        l->caches[i] = caches[i];
        for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) l->blocks_free[i][p] = cs.n_blocks_free[p];
        l->n_seqs[i] = cs.n_seqs;
        l->n_caches++;
    }
    for (int i = 0; ctxs && ctxs[i] && i < XT_LEDGER_MAX; i++) {
        speed_kv_xfer_ctx_stats_t xs;
        speed_kv_xfer_ctx_stats(ctxs[i], &xs);
        l->ctxs[i] = ctxs[i];
        l->n_endpoints[i] = xs.n_endpoints;
        l->n_ctxs++;
    }
    l->allocs = speed_alloc_live_count();
}

/* The allocation count the ledger expects now (endpoints may have come or gone). */
static int64_t ledger_want_allocs(const xt_ledger_t *base, int64_t *in_flight_p) {
    int64_t want = base->allocs, in_flight = 0;
    for (int i = 0; i < base->n_ctxs; i++) {
        speed_kv_xfer_ctx_stats_t xs;
        speed_kv_xfer_ctx_stats(base->ctxs[i], &xs);
        want += (int64_t)XT_ALLOCS_PER_ENDPOINT * (xs.n_endpoints - base->n_endpoints[i]);
        in_flight += xt_xfers_in_flight(&xs);
    }
    *in_flight_p = in_flight;
    return want;
}

static int ledger_check(const xt_ledger_t *base, const char *scenario, int64_t *held_p) {
    int before = check_failures_;
    int64_t in_flight = 0;
    WAIT_FOR(speed_alloc_live_count() == ledger_want_allocs(base, &in_flight) && in_flight == 0, 3000);
    int64_t want = ledger_want_allocs(base, &in_flight), got = speed_alloc_live_count();
    for (int i = 0; i < base->n_ctxs; i++) {
        speed_kv_xfer_ctx_stats_t xs;
        speed_kv_xfer_ctx_stats(base->ctxs[i], &xs);
        CHECK_MSG(xt_xfers_in_flight(&xs) == 0, "%s: context %d: %lld transfers still in flight", scenario, i,
                  (long long)xt_xfers_in_flight(&xs));
        CHECK_MSG(xs.n_endpoints >= 0, "%s: context %d: %d endpoints", scenario, i, xs.n_endpoints);
    }
    for (int i = 0; i < base->n_caches; i++) {
        speed_kv_cache_stats_t cs;
        speed_kv_cache_stats(base->caches[i], &cs);
        for (int p = 0; p < SPEED_KV_POOL_COUNT; p++)
            CHECK_MSG(cs.n_blocks_free[p] == base->blocks_free[i][p],
                      "%s: cache %d pool %d: %lld blocks free, %lld before", scenario, i, p,
                      (long long)cs.n_blocks_free[p], (long long)base->blocks_free[i][p]);
        CHECK_MSG(cs.n_seqs == base->n_seqs[i], "%s: cache %d: %d sequences, %d before", scenario, i, cs.n_seqs,
                  base->n_seqs[i]);
    }
    if (held_p) {
        *held_p = got - want;
        if (got != want)
            fprintf(stderr, "%s: %lld counted allocations held by transfers UCX has not released\n", scenario,
                    (long long)(got - want));
    }
    CHECK_MSG(held_p ? got >= want : got == want, "%s: %lld counted allocations live, %lld expected (%+lld)", scenario,
              (long long)got, (long long)want, (long long)(got - want));
    return check_failures_ - before;
}

int xt_ledger_check(const xt_ledger_t *base, const char *scenario) { return ledger_check(base, scenario, NULL); }

int xt_ledger_check_held(const xt_ledger_t *base, const char *scenario, int64_t *held_p) {
    return ledger_check(base, scenario, held_p);
}

double xt_time_transfer(speed_kv_xfer_ctx_t *ctx, const speed_kv_desc_t *d, speed_kv_cache_t *cache,
                        speed_kv_seq_t *seq, int64_t n_full, int64_t n_compact, const char *request_id) {
    double t0 = now_s();
    speed_kv_xfer_t *x = NULL;
    speed_status_t st = speed_kv_xfer_create(ctx, d, cache, seq, n_full, n_compact, request_id, &x);
    if (st == SPEED_OK) st = speed_kv_xfer_push_all(x);
    if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
    if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
    double dt = now_s() - t0;
    speed_kv_xfer_destroy(x);
    if (st != SPEED_OK) {
        fprintf(stderr, "transfer failed: %s\n", speed_status_string(st));
        return 0;
    }
    return dt;
}
