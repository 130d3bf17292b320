/* The bed's packet delay: see nb_delay.h.
 *
 * The kernel queues every packet the namespace's NB_LINK chain sends to NFQUEUE 0 and waits for
 * a verdict. This thread reads the queue (metadata only: the packets stay in the kernel), gives
 * each packet a due time now + delay +- jitter, keeps them in a min-heap by due time, and
 * accepts each one when it is due. With --queue-bypass on the rule, packets pass undelayed
 * while no thread is bound (between a stop and the next start).
 */
#define _GNU_SOURCE 1 /* setns */
#include "nb_delay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netfilter.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SPEED_NB_NO_NFQUEUE
#include <libnetfilter_queue/libnetfilter_queue.h>

#define HELD_MAX 65536 /* packets held at once; past it a packet passes undelayed */

typedef struct {
    int64_t due_ns;
    uint32_t id;
} held_t;

struct nb_delay {
    char ns_path[256];
    int64_t delay_ns, jitter_ns;
    pthread_t thread;
    atomic_bool stop;
    /* start-up hand-shake: the thread says whether it bound the queue */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ready; /* 0 starting, 1 bound, -1 failed */

    struct nfq_handle *h;
    struct nfq_q_handle *qh;
    held_t *heap;
    int n_held;
    uint64_t rng;
};

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void heap_push(nb_delay_t *d, held_t v) {
    int i = d->n_held++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (d->heap[parent].due_ns <= v.due_ns) break;
        d->heap[i] = d->heap[parent];
        i = parent;
    }
    d->heap[i] = v;
}

static held_t heap_pop(nb_delay_t *d) {
    held_t top = d->heap[0], last = d->heap[--d->n_held];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= d->n_held) break;
        if (c + 1 < d->n_held && d->heap[c + 1].due_ns < d->heap[c].due_ns) c++;
        if (last.due_ns <= d->heap[c].due_ns) break;
        d->heap[i] = d->heap[c];
        i = c;
    }
    if (d->n_held > 0) d->heap[i] = last;
    return top;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *user) {
    (void)msg;
    nb_delay_t *d = user;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph) return 0;
    uint32_t id = ntohl(ph->packet_id);
    int64_t delay = d->delay_ns;
    if (d->jitter_ns > 0) delay += (int64_t)(rng_next(&d->rng) % (uint64_t)(2 * d->jitter_ns + 1)) - d->jitter_ns;
    if (delay <= 0 || d->n_held == HELD_MAX) return nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
    heap_push(d, (held_t){.due_ns = mono_ns() + delay, .id = id});
    return 0;
}

static void set_ready(nb_delay_t *d, int v) {
    pthread_mutex_lock(&d->mu);
    d->ready = v;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static bool bind_queue(nb_delay_t *d) {
    int fd = open(d->ns_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
        fprintf(stderr, "netns bed: delay: cannot enter %s: %s\n", d->ns_path, strerror(errno));
        if (fd >= 0) close(fd);
        return false;
    }
    close(fd);
    d->h = nfq_open();
    if (!d->h) {
        fprintf(stderr, "netns bed: delay: nfq_open: %s\n", strerror(errno));
        return false;
    }
    nfq_unbind_pf(d->h, AF_INET); /* pre-3.8 kernels want this; later ones ignore it */
    if (nfq_bind_pf(d->h, AF_INET) < 0) {
        fprintf(stderr, "netns bed: delay: nfq_bind_pf: %s\n", strerror(errno));
        return false;
    }
    d->qh = nfq_create_queue(d->h, 0, on_packet, d);
    if (!d->qh || nfq_set_mode(d->qh, NFQNL_COPY_META, 0) < 0) {
        fprintf(stderr, "netns bed: delay: cannot bind NFQUEUE 0: %s\n", strerror(errno));
        return false;
    }
    nfq_set_queue_maxlen(d->qh, HELD_MAX);
    int one = 1, big = 8 << 20;
    /* A burst larger than the socket buffer must not stop the thread: the kernel drops what
     * does not fit (like a full netem queue) and says nothing. */
    setsockopt(nfq_fd(d->h), SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
    setsockopt(nfq_fd(d->h), SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    return true;
}

static void *delay_main(void *arg) {
    nb_delay_t *d = arg;
    if (!bind_queue(d)) {
        set_ready(d, -1);
        return NULL;
    }
    set_ready(d, 1);
    int fd = nfq_fd(d->h);
    enum { RBUF = 1 << 16 };
    char *rbuf = malloc(RBUF);
    while (!atomic_load(&d->stop)) {
        int64_t now = mono_ns();
        while (d->n_held > 0 && d->heap[0].due_ns <= now) nfq_set_verdict(d->qh, heap_pop(d).id, NF_ACCEPT, 0, NULL);
        int timeout_ms = 20; /* also how soon a stop is seen */
        if (d->n_held > 0) {
            int64_t wait = (d->heap[0].due_ns - now + 999999) / 1000000;
            if (wait < timeout_ms) timeout_ms = (int)wait;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, timeout_ms) <= 0) continue;
        for (;;) {
            ssize_t n = rbuf ? recv(fd, rbuf, RBUF, MSG_DONTWAIT) : -1;
            if (n <= 0) break;
            nfq_handle_packet(d->h, rbuf, (int)n);
        }
    }
    while (d->n_held > 0) nfq_set_verdict(d->qh, heap_pop(d).id, NF_ACCEPT, 0, NULL);
    free(rbuf);
    nfq_destroy_queue(d->qh);
    nfq_close(d->h);
    return NULL;
}

nb_delay_t *nb_delay_start(const char *ns_path, double delay_ms, double jitter_ms) {
    nb_delay_t *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->heap = malloc(sizeof(held_t) * HELD_MAX);
    if (!d->heap) {
        free(d);
        return NULL;
    }
    snprintf(d->ns_path, sizeof d->ns_path, "%s", ns_path);
    d->delay_ns = (int64_t)(delay_ms * 1e6);
    d->jitter_ns = (int64_t)(jitter_ms * 1e6);
    d->rng = (uint64_t)mono_ns() | 1;
    atomic_init(&d->stop, false);
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->cv, NULL);
    if (pthread_create(&d->thread, NULL, delay_main, d) != 0) {
        fprintf(stderr, "netns bed: delay: pthread_create failed\n");
        free(d->heap);
        free(d);
        return NULL;
    }
    pthread_mutex_lock(&d->mu);
    while (d->ready == 0) pthread_cond_wait(&d->cv, &d->mu);
    int ready = d->ready;
    pthread_mutex_unlock(&d->mu);
    if (ready < 0) {
        pthread_join(d->thread, NULL);
        if (d->qh) nfq_destroy_queue(d->qh);
        if (d->h) nfq_close(d->h);
        free(d->heap);
        free(d);
        return NULL;
    }
    return d;
}

void nb_delay_stop(nb_delay_t *d) {
    if (!d) return;
    atomic_store(&d->stop, true);
    pthread_join(d->thread, NULL);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv);
    free(d->heap);
    free(d);
}

#else /* built without libnetfilter_queue: no delay, said at the first use */

nb_delay_t *nb_delay_start(const char *ns_path, double delay_ms, double jitter_ms) {
    (void)ns_path, (void)delay_ms, (void)jitter_ms;
    fprintf(stderr, "netns bed: delay needs libnetfilter-queue-dev at build time (deploy/setup.sh)\n");
    return NULL;
}

void nb_delay_stop(nb_delay_t *d) { (void)d; }

#endif
