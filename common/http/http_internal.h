/* speed_http's private header: the server's, a stream's and a request's structures and the
 * helpers server.c and stream.c share. Not an API: nothing outside common/http includes it.
 * Locking is described at the top of server.c. */
#ifndef SPEED_HTTP_INTERNAL_H
#define SPEED_HTTP_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <microhttpd.h>

#include "http.h"

#define SUBSYS SPEED_SUBSYS_NET

typedef struct header {
    char *name;
    char *value;
    struct header *next;
} header_t;

typedef struct {
    char *method;
    char *path;
    speed_http_handler_cb_t handler;
    void *user;
} route_t;

struct speed_http_server {
    speed_http_server_params_t params;
    char *host;
    struct MHD_Daemon *daemon;
    uint16_t port;
    route_t *routes;
    size_t n_routes;
    size_t cap_routes;
    speed_http_gate_cb_t gate;
    void *gate_user;
    char *tls_cert, *tls_key; /* copies of the PEM texts, or NULL */

    pthread_mutex_t lock;         /* guards streams, stopping */
    speed_http_stream_t *streams; /* attached to live connections */
    bool stopping;

    _Atomic bool started; /* MHD is running (the logger runs on its threads) */
    _Atomic uint64_t n_connections;
    _Atomic uint64_t n_requests;
    _Atomic uint64_t n_streams;
    _Atomic uint64_t n_disconnects;
    _Atomic uint64_t n_streams_attached;
    _Atomic uint64_t n_streams_suspended;
};

struct speed_http_stream {
    pthread_mutex_t lock;
    pthread_cond_t cond; /* signalled when a disconnect callback returns */
    _Atomic int refs;
    speed_http_server_t *server; /* valid while attached */
    struct MHD_Connection *conn; /* NULL once the request is over */

    unsigned status;
    char *content_type;
    header_t *headers;

    char *buf; /* pending bytes are buf[head, len) */
    size_t head;
    size_t len;
    size_t cap;
    size_t max_pending; /* 0 = unbounded */

    bool overrun;   /* passed max_pending: bytes dropped, connection to be cut */
    bool committed; /* status and headers are final */
    bool closed;    /* the writer is done */
    bool suspended; /* we suspended the connection; resume before clearing */
    bool finished;  /* the request is over */
    bool cancelled; /* ... and ended before the writer closed */
    bool stopping;  /* the server is stopping: never suspend again */

    speed_http_disconnect_cb_t on_disconnect;
    void *user;
    bool cb_running;
    pthread_t cb_thread;

    speed_http_stream_t *prev, *next; /* in server->streams while attached */
    bool attached;
};

typedef enum { PHASE_BODY, PHASE_HANDLED, PHASE_QUEUED } phase_t;

/* One per request (MHD's con_cls). */
struct speed_http_request {
    speed_http_server_t *server;
    struct MHD_Connection *conn;
    const char *method; /* MHD's, valid for the request */
    const char *path;
    phase_t phase;

    char *body;
    size_t body_len;
    size_t body_cap;
    bool body_too_large;

    header_t *headers;             /* extra response headers */
    struct MHD_Response *response; /* a complete response made by the handler */
    unsigned status;
    speed_http_stream_t *stream; /* the connection's reference */

    void *user_data; /* speed_http_request_set_user */
    speed_http_request_end_cb_t on_end;
};

/* Header lists (server.c): text without CR/LF; push appends a copy (SPEED_ERR_INVALID_ARGUMENT,
 * SPEED_ERR_NO_MEMORY); apply adds every header to an MHD response. */
bool speed_http_header_text_ok(const char *s);
speed_status_t speed_http_header_push(header_t **list, const char *name, const char *value);
void speed_http_headers_free(header_t *h);
bool speed_http_headers_apply(struct MHD_Response *r, const header_t *h);

/* Streams (stream.c): references (the last unref frees), resuming a connection we suspended
 * (caller holds s->lock), and the MHD content reader and free callback of a stream response. */
void speed_http_stream_unref(speed_http_stream_t *s);
void speed_http_stream_ref(speed_http_stream_t *s);
void speed_http_stream_wake_locked(speed_http_stream_t *s);
void speed_http_stream_suspend_locked(speed_http_stream_t *s);
ssize_t speed_http_stream_reader(void *cls, uint64_t pos, char *out, size_t max);
void speed_http_stream_response_free(void *cls);

#endif /* SPEED_HTTP_INTERNAL_H */
