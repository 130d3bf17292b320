/* Helpers shared by the speed_http tests: see http_test_util.h. */
#include "http_test_util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "alloc.h"
#include "test_proc.h"

int sem_wait_ms(sem_t *sem, int ms) {
    struct timespec ts = realtime_after_ms(ms);
    while (sem_timedwait(sem, &ts) != 0) {
        if (errno != EINTR) return -1;
    }
    return 0;
}

int64_t wait_live_count(int64_t target, int ms) {
    double end = now_s() + ms / 1000.0;
    int64_t n;
    while ((n = speed_alloc_live_count()) != target && now_s() < end) sleep_ms(5);
    return n;
}

int64_t settled_live_count(void) {
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

int raw_connect(uint16_t port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

void raw_send(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n <= 0) return;
        p += n;
        len -= (size_t)n;
    }
}

size_t raw_read(int fd, char *buf, size_t cap, const char *stop, int ms) {
    size_t n = 0;
    tu_read_until(fd, buf, cap, &n, stop, now_s() + ms / 1000.0);
    return n;
}

/* ---- stream writers ------------------------------------------------------------------ */

/* Writers started and not yet joined, newest first. */
static pthread_mutex_t writers_lock = PTHREAD_MUTEX_INITIALIZER;
static writer_t *writers;

static void *writer_main(void *p) {
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
        w->close_status = speed_http_stream_respond(w->stream, 429, "application/json", "{\"error\":\"busy\"}", 17);
        w->last_write = SPEED_OK;
        return NULL;
    }
    w->last_write = st;
    atomic_store(&w->done, 1);
    w->close_status = speed_http_stream_close(w->stream);
    return NULL;
}

writer_t *writer_start(speed_http_stream_t *stream, writer_mode_t mode, int n_events, int delay_ms, sem_t *go) {
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

void writers_join(void (*each)(writer_t *w)) {
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
