/* Helpers shared by the speed_http tests: stream writer threads, timed waits, raw sockets. */
#ifndef SPEED_TESTS_HTTP_TEST_UTIL_H
#define SPEED_TESTS_HTTP_TEST_UTIL_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "http.h"

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* sem_wait with a timeout; 0 on success, -1 on timeout. */
static inline int sem_wait_ms(sem_t *sem, int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    while (sem_timedwait(sem, &ts) != 0) {
        if (errno != EINTR) return -1;
    }
    return 0;
}

/* Waits until speed_alloc_live_count() == target (MHD frees responses a little after the
 * request completes). Returns the last count seen. */
static inline int64_t wait_live_count(int64_t target, int ms)
{
    double end = now_s() + ms / 1000.0;
    int64_t n;
    while ((n = speed_alloc_live_count()) != target && now_s() < end) sleep_ms(5);
    return n;
}

/* The live allocation count once it has stopped changing for 100 ms (a request's context
 * is freed by MHD shortly after the client has its response). */
static inline int64_t settled_live_count(void)
{
    int64_t last = speed_alloc_live_count();
    for (int stable = 0; stable < 5;) {
        sleep_ms(20);
        int64_t n = speed_alloc_live_count();
        stable = n == last ? stable + 1 : 0;
        last = n;
    }
    return last;
}

/* ---- raw sockets --------------------------------------------------------------------- */

static inline int raw_connect(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static inline void raw_send(int fd, const void *data, size_t len)
{
    const char *p = data;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n <= 0) return;
        p += n;
        len -= (size_t)n;
    }
}

/* Reads until the peer closes, `stop` appears, or ms pass; returns bytes read. */
static inline size_t raw_read(int fd, char *buf, size_t cap, const char *stop, int ms)
{
    size_t n = 0;
    double end = now_s() + ms / 1000.0;
    buf[0] = '\0';
    while (n + 1 < cap) {
        int left = (int)((end - now_s()) * 1000);
        if (left <= 0) break;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, left) <= 0) break;
        ssize_t k = recv(fd, buf + n, cap - 1 - n, 0);
        if (k <= 0) break;
        n += (size_t)k;
        buf[n] = '\0';
        if (stop && strstr(buf, stop)) break;
    }
    return n;
}

/* ---- stream writers ------------------------------------------------------------------ */

typedef enum {
    WRITE_EVENTS,        /* write n_events events delay_ms apart, then close */
    WRITE_HANDSHAKE,     /* write one event, wait for `go`, then the rest, then close */
    WRITE_UNTIL_CANCEL,  /* write an event every delay_ms until a write fails, then close */
    WRITE_HOLD,          /* write n_events (maybe 0: uncommitted), wait for `go`, write, close */
    WRITE_DEFERRED,      /* after delay_ms: status 429 + Retry-After, a body, close */
} writer_mode_t;

typedef struct writer {
    speed_http_stream_t *stream;
    writer_mode_t mode;
    int n_events;
    int delay_ms;
    sem_t *go;
    _Atomic int done;               /* set just before close */
    speed_status_t last_write;      /* the status of the last write */
    speed_status_t close_status;
    int n_written;
    pthread_t thread;
    struct writer *next;
} writer_t;

static pthread_mutex_t writers_lock = PTHREAD_MUTEX_INITIALIZER;
static writer_t *writers;

static inline void *writer_main(void *p)
{
    writer_t *w = p;
    char data[128];
    speed_status_t st = SPEED_OK;
    switch (w->mode) {
    case WRITE_EVENTS:
    case WRITE_HANDSHAKE:
        for (int i = 0; i < w->n_events && st == SPEED_OK; i++) {
            snprintf(data, sizeof(data), "{\"i\":%d}", i);
            st = speed_http_stream_write_sse(w->stream, NULL, data);
            if (st == SPEED_OK) w->n_written++;
            if (w->mode == WRITE_HANDSHAKE && i == 0) {
                if (sem_wait_ms(w->go, 10000) != 0) st = SPEED_ERR_TIMEOUT;
            } else if (w->delay_ms) {
                sleep_ms(w->delay_ms);
            }
        }
        if (st == SPEED_OK) st = speed_http_stream_write_sse(w->stream, NULL, "[DONE]");
        break;
    case WRITE_UNTIL_CANCEL: {
        double end = now_s() + 10;
        for (int i = 0; st == SPEED_OK && now_s() < end; i++) {
            snprintf(data, sizeof(data), "{\"i\":%d}", i);
            st = speed_http_stream_write_sse(w->stream, NULL, data);
            if (st == SPEED_OK) w->n_written++;
            sleep_ms(w->delay_ms);
        }
        break;
    }
    case WRITE_HOLD:
        for (int i = 0; i < w->n_events && st == SPEED_OK; i++) {
            st = speed_http_stream_write_sse(w->stream, NULL, "{\"held\":true}");
            if (st == SPEED_OK) w->n_written++;
        }
        sem_wait_ms(w->go, 20000);
        st = speed_http_stream_write_sse(w->stream, NULL, "{\"late\":true}");
        break;
    case WRITE_DEFERRED:
        sleep_ms(w->delay_ms);
        speed_http_stream_add_header(w->stream, "Retry-After", "7");
        atomic_store(&w->done, 1);
        w->close_status = speed_http_stream_respond(
            w->stream, 429, "application/json", "{\"error\":\"busy\"}", 17);
        w->last_write = SPEED_OK;
        return NULL;
    }
    w->last_write = st;
    atomic_store(&w->done, 1);
    w->close_status = speed_http_stream_close(w->stream);
    return NULL;
}

/* Starts a writer thread for `stream`; joined by writers_join(). */
static inline writer_t *writer_start(speed_http_stream_t *stream, writer_mode_t mode, int n_events,
                              int delay_ms, sem_t *go)
{
    writer_t *w = calloc(1, sizeof(*w));
    w->stream = stream;
    w->mode = mode;
    w->n_events = n_events;
    w->delay_ms = delay_ms;
    w->go = go;
    pthread_mutex_lock(&writers_lock);
    w->next = writers;
    writers = w;
    pthread_mutex_unlock(&writers_lock);
    pthread_create(&w->thread, NULL, writer_main, w);
    return w;
}

/* Joins every writer; returns how many ended with each close status via the callback. */
static inline void writers_join(void (*each)(writer_t *w))
{
    pthread_mutex_lock(&writers_lock);
    writer_t *list = writers;
    writers = NULL;
    pthread_mutex_unlock(&writers_lock);
    while (list) {
        writer_t *next = list->next;
        pthread_join(list->thread, NULL);
        if (each) each(list);
        free(list);
        list = next;
    }
}

#endif /* SPEED_TESTS_HTTP_TEST_UTIL_H */
