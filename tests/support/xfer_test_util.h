/* Helpers shared by the KV transfer tests (library speed_test_xfer): the UCX environment for
 * one host, framed messages over a socket with timeouts (how the two sides of a test swap
 * descriptors), a thread-safe inbox for the decode side's notifies, and the resource ledger
 * a scenario is checked against when it ends (nothing leaked).
 *
 * Thread-safety: xt_inbox_cb runs on the transfer progress thread and xt_inbox_wait on the
 * test's; the inbox's lock orders them. The ledger functions are for the test's thread, with
 * no transfer call running on another. The rest is reentrant.
 */
#ifndef SPEED_XFER_TEST_UTIL_H
#define SPEED_XFER_TEST_UTIL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kv_cache.h"
#include "kv_transfer.h"
#include "test_clock.h"

/* Loopback only, reusable ports (docs/dependencies.md §1). Does not override what the caller
 * set. UCX_WARN_UNUSED_ENV_VARS=n must be in the environment before the process starts (ctest
 * sets it): UCX reads it at load. */
void xt_ucx_env(void);

/* The transfer tests' names for the clocks of test_clock.h. */
#define xt_now_ms()      ((uint64_t)now_ms())
#define xt_realtime_ms() realtime_ms()

/* "tcp" -> SPEED_KV_TRANSPORT_TCP; anything else -> SPEED_KV_TRANSPORT_SHM. */
speed_kv_transport_t xt_transport(const char *name);

/* ---- framed messages: u64 length, bytes ------------------------------------------------------ */

/* Sends one message (blocking, 30 s per wait). 0, or -1 on a timeout or error. */
int xt_send(int fd, const void *buf, size_t n);

/* Receives one message into a malloc'd buffer (*buf_p, the caller free()s it; *n_p its length).
 * 0, or -1 on a timeout (timeout_ms per wait), EOF, an error or a length over 1 GiB. */
int xt_recv(int fd, void **buf_p, size_t *n_p, int timeout_ms);

/* ---- decode-side inbox ----------------------------------------------------------------------- */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n; /* notifies received */
    uint64_t cookie, bytes, epoch;
    char request_id[64];
    speed_status_t answer; /* what the callback returns */
} xt_inbox_t;

void xt_inbox_init(xt_inbox_t *b);
void xt_inbox_cleanup(xt_inbox_t *b);

/* A notify_cb (user = the inbox): records the latest notify, wakes xt_inbox_wait, and returns
 * b->answer. Runs on the progress thread. */
speed_status_t xt_inbox_cb(void *user, const speed_kv_notify_t *note);

/* Waits until at least n notifies arrived; returns the count (< n on timeout). */
int xt_inbox_wait(xt_inbox_t *b, int n, int timeout_ms);

/* ---- resource ledger: what a scenario must give back ----------------------------------------
 * Taken before a scenario, checked at its end: counted allocations (speed_alloc_live_count),
 * each cache's free blocks and live sequences, each context's transfers in flight and cached
 * endpoints.
 *
 * The transfer API has no count of transfers in flight nor of registered regions: in flight
 * is derived from the context's counters (xt_xfers_in_flight); a region is a counted
 * allocation of the context, so a registration that outlives its deregistration shows in the
 * allocation count. Endpoints are cached for the context's life (reused by the next transfer to
 * the same peer) and closed when their peer fails, so a scenario may add or drop some: each
 * one holds XT_ALLOCS_PER_ENDPOINT counted allocations, and the count must move by exactly
 * that much per endpoint. Endpoints back to 0 is the end of the test: every context destroyed,
 * the count back to what it was before the first one was created. */

#define XT_LEDGER_MAX          4
/* An endpoint's record and its copy of the peer's worker address (transfer/kv_xfer_ctx.c). */
#define XT_ALLOCS_PER_ENDPOINT 2

typedef struct {
    int64_t allocs;
    int n_caches, n_ctxs;
    const speed_kv_cache_t *caches[XT_LEDGER_MAX];
    int64_t blocks_free[XT_LEDGER_MAX][SPEED_KV_POOL_COUNT];
    int n_seqs[XT_LEDGER_MAX];
    speed_kv_xfer_ctx_t *ctxs[XT_LEDGER_MAX];
    int n_endpoints[XT_LEDGER_MAX];
} xt_ledger_t;

/* Seconds one whole transfer of the sequence takes (create, push every layer, finish, wait for
 * the decode side's ack), for the benchmarks; 0 when it fails (printed). */
double xt_time_transfer(speed_kv_xfer_ctx_t *ctx, const speed_kv_desc_t *d, speed_kv_cache_t *cache,
                        speed_kv_seq_t *seq, int64_t n_full, int64_t n_compact, const char *request_id);

/* Transfers created and not yet ended (done, failed after creation, cancelled). Connect
 * failures and refusals happen before a transfer is counted as started. */
int64_t xt_xfers_in_flight(const speed_kv_xfer_ctx_stats_t *s);

/* Records the state of up to XT_LEDGER_MAX caches and contexts (NULL-terminated lists; either
 * may be NULL). The caches and contexts must outlive the matching xt_ledger_check. */
void xt_ledger_take(xt_ledger_t *l, const speed_kv_cache_t *const *caches, speed_kv_xfer_ctx_t *const *ctxs);

/* CHECKs, labelled `scenario`, that since `base`: no transfer is in flight in any context,
 * every cache has its free blocks and live sequences back, and the counted allocations are
 * back to base + XT_ALLOCS_PER_ENDPOINT x (endpoints now - endpoints then). Waits up to 3 s for
 * the progress thread to settle (acks, orphaned transfers and failed endpoints are released
 * there, a little after the API call that ended them). Returns the number of failed checks. */
int xt_ledger_check(const xt_ledger_t *base, const char *scenario);

/* The same, except that allocations may stay above the expectation (never below): for a
 * scenario whose transfers ended while UCX still held their requests (a stuck shared-memory
 * path after a dead peer), which the context keeps until its teardown. The surplus is printed
 * and returned in *held_p; the caller checks it is given back when the contexts are destroyed. */
int xt_ledger_check_held(const xt_ledger_t *base, const char *scenario, int64_t *held_p);

#endif /* SPEED_XFER_TEST_UTIL_H */
