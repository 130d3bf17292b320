/* Helpers shared by the KV transfer tests (library speed_test_xfer): the UCX environment for
 * one host, framed messages over a socket with timeouts (how the two sides of a test swap
 * descriptors), and a thread-safe inbox for the decode side's notifies.
 *
 * Thread-safety: xt_inbox_cb runs on the transfer progress thread and xt_inbox_wait on the
 * test's; the inbox's lock orders them. The rest is reentrant.
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

#endif /* SPEED_XFER_TEST_UTIL_H */
