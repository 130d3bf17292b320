/* Helpers shared by the speed_http tests (library speed_test_http): waits on the allocation
 * count, raw sockets (for requests no well-behaved client sends), and stream writer threads
 * that play the handler side of a long-lived response.
 *
 * Includes test_clock.h (now_s, cpu_s, sleep_ms), which these tests time themselves with.
 *
 * Thread-safety: writer_start and writers_join may be called from any thread (the list of
 * writers is locked); a writer_t's fields belong to its thread until `done` is set, and may
 * be read once writers_join has joined it. The rest is reentrant.
 */
#ifndef SPEED_TESTS_HTTP_TEST_UTIL_H
#define SPEED_TESTS_HTTP_TEST_UTIL_H

#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "http.h"
#include "test_clock.h"

/* sem_wait with a timeout; 0 on success, -1 on timeout. */
int sem_wait_ms(sem_t *sem, int ms);

/* Waits up to ms until speed_alloc_live_count() == target (MHD frees responses a little after
 * the request completes). Returns the last count seen. */
int64_t wait_live_count(int64_t target, int ms);

/* The live allocation count once it has stopped changing for 100 ms (a request's context is
 * freed by MHD shortly after the client has its response). */
int64_t settled_live_count(void);

/* ---- raw sockets --------------------------------------------------------------------- */

/* A TCP connection to 127.0.0.1:port (close() it), or -1. */
int raw_connect(uint16_t port);

/* Sends all of data, stopping quietly at the first error (the peer may have closed on purpose). */
void raw_send(int fd, const void *data, size_t len);

/* Reads into buf (NUL-terminated, from its start) until the peer closes, `stop` (may be NULL)
 * appears, the buffer is full, or ms pass; returns the bytes read. */
size_t raw_read(int fd, char *buf, size_t cap, const char *stop, int ms);

/* ---- stream writers ------------------------------------------------------------------ */

typedef enum {
    WRITE_EVENTS,       /* write n_events events delay_ms apart, then close */
    WRITE_HANDSHAKE,    /* write one event, wait for `go`, then the rest, then close */
    WRITE_UNTIL_CANCEL, /* write an event every delay_ms until a write fails, then close */
    WRITE_HOLD,         /* write n_events (maybe 0: uncommitted), wait for `go`, write, close */
    WRITE_DEFERRED,     /* after delay_ms: status 429 + Retry-After, a body, close */
} writer_mode_t;

typedef struct writer {
    speed_http_stream_t *stream;
    writer_mode_t mode;
    int n_events;
    int delay_ms;
    sem_t *go;
    _Atomic int done;          /* set just before close */
    speed_status_t last_write; /* the status of the last write */
    speed_status_t close_status;
    int n_written;
    pthread_t thread;
    struct writer *next;
} writer_t;

/* Starts a thread that writes `stream` as `mode` says (go may be NULL for modes that do not
 * wait on it). The writer is freed by writers_join. */
writer_t *writer_start(speed_http_stream_t *stream, writer_mode_t mode, int n_events, int delay_ms, sem_t *go);

/* Joins every writer started so far, calls `each` (may be NULL) on each, and frees them. */
void writers_join(void (*each)(writer_t *w));

#endif /* SPEED_TESTS_HTTP_TEST_UTIL_H */
