/* Helpers shared by the KV transfer tests: see xfer_test_util.h. */
#include "xfer_test_util.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
