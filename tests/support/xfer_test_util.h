/* Helpers shared by the KV transfer tests: UCX environment, framed messages over a socket with
 * timeouts, a thread-safe inbox for decode-side notifies. */
#ifndef SPEED_XFER_TEST_UTIL_H
#define SPEED_XFER_TEST_UTIL_H

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kv_transfer.h"

/* Loopback only, reusable ports
 * (DEPENDENCIES.md section 1). Does not override what the caller set. UCX_WARN_UNUSED_ENV_VARS=n
 * must be in the environment before the process starts (ctest sets it): UCX reads it at load. */
static inline void xt_ucx_env(void) {
    setenv("UCX_NET_DEVICES", "lo", 0);
    setenv("UCX_TCP_CM_REUSEADDR", "y", 0);
}

static inline uint64_t xt_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

static inline uint64_t xt_realtime_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

static inline speed_kv_transport_t xt_transport(const char *name) {
    return strcmp(name, "tcp") == 0 ? SPEED_KV_TRANSPORT_TCP : SPEED_KV_TRANSPORT_SHM;
}

/* ---- framed messages: u64 length, bytes ------------------------------------------------------ */

static inline int xt_io(int fd, void *buf, size_t n, int writing, int timeout_ms) {
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

static inline int xt_send(int fd, const void *buf, size_t n) {
    uint64_t len = n;
    return xt_io(fd, &len, sizeof len, 1, 30000) || xt_io(fd, (void *)buf, n, 1, 30000) ? -1 : 0;
}

/* Receives one message into a malloc'd buffer (*buf_p, *n_p); -1 on timeout / EOF. */
static inline int xt_recv(int fd, void **buf_p, size_t *n_p, int timeout_ms) {
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

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n;                   /* notifies received */
    uint64_t cookie, bytes, epoch;
    char request_id[64];
    speed_status_t answer;   /* what the callback returns */
} xt_inbox_t;

static inline void xt_inbox_init(xt_inbox_t *b) {
    memset(b, 0, sizeof *b);
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
}

static inline void xt_inbox_cleanup(xt_inbox_t *b) {
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
}

/* notify_cb: runs on the progress thread; hands the event to the test's thread. */
static inline speed_status_t xt_inbox_cb(void *user, const speed_kv_notify_t *note) {
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

/* Waits until at least n notifies arrived; returns the count (< n on timeout). */
static inline int xt_inbox_wait(xt_inbox_t *b, int n, int timeout_ms) {
    uint64_t until = xt_now_ms() + (uint64_t)timeout_ms;
    pthread_mutex_lock(&b->mu);
    while (b->n < n && xt_now_ms() < until) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&b->cv, &b->mu, &ts);
    }
    int got = b->n;
    pthread_mutex_unlock(&b->mu);
    return got;
}

#endif /* SPEED_XFER_TEST_UTIL_H */
