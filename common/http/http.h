/* speed_http: HTTP/1.1 server (libmicrohttpd) and a small blocking client.
 *
 * SERVER
 * ------
 * One server = one MHD daemon with an epoll internal thread and a thread pool
 * (params.n_threads), suspend/resume enabled, a connection limit and an idle timeout.
 * Lifecycle: speed_http_server_create (nothing listens yet) -> speed_http_server_route*
 * (any number) -> speed_http_server_start (binds; port 0 picks a free port, read it back
 * with speed_http_server_port) -> ... -> speed_http_server_destroy (stops and frees).
 * The route table is fixed once the server starts.
 *
 * Requests. Routes match the method and the exact path (the query string is not part of
 * the path). No route for the path -> 404; the path exists for other methods -> 405 with
 * an Allow header. HEAD is served by the GET route when no HEAD route exists. Request bodies
 * are collected up to params.max_body_bytes; a larger body gets 413 (a declared
 * Content-Length over the limit is answered at once and the connection closed; a larger
 * chunked body is read, discarded and answered, keeping the connection). Error responses
 * made by the library are OpenAI-style JSON: {"error":{"message":...,"type":...}}.
 * Responses are queued only after the request has been read completely, never on MHD's
 * first handler call, so keep-alive works (docs/dependencies.md §5).
 *
 * Handlers run on the MHD pool threads, several at once: they must be thread-safe and must
 * not block for long (a pool of 2 threads serves every connection). Inside a handler the
 * speed_http_request_t is valid, and only there: copy what another thread needs. A handler
 * answers in one of two ways:
 *   - speed_http_respond() / speed_http_respond_error(): a complete response;
 *   - speed_http_respond_stream(): a stream that any thread writes to later (SSE, or a
 *     response whose status is known only later).
 * A handler that does neither gets a 500 (and a warning is logged).
 *
 * Streams. A stream is reference counted. It is held by the writer (from
 * speed_http_respond_stream until speed_http_stream_close), by the connection, and by MHD's
 * response object, and is freed when the last of them lets go, so a writer thread and a
 * client disconnect may race freely. The response status and headers can change until the
 * stream is committed: the first speed_http_stream_write (even of 0 bytes) or
 * speed_http_stream_close / speed_http_stream_respond. Until then the connection is
 * suspended and nothing is sent. A stream completed by speed_http_stream_respond (or closed
 * before any write) is sent as one response with a Content-Length; otherwise the body goes
 * out with chunked transfer encoding as it is written. When MHD wants more bytes and none are pending, the connection is suspended
 * (no busy loop) until the next write or close resumes it.
 *
 * Disconnects. If the request ends before the stream was closed by its writer (the client
 * went away, a send failed, a timeout, or the server is being destroyed), the stream's
 * disconnect callback runs once, on an MHD thread (or in speed_http_server_destroy), and
 * later writes return SPEED_ERR_CANCELLED. Caveat from MHD: a suspended connection is not
 * polled, so a client that leaves while the stream is idle is noticed at the next write;
 * writers of long-idle streams should send SSE comments (": ping\n\n") now and then.
 *
 * Shutdown. speed_http_server_destroy marks every stream as stopping, resumes every
 * suspended connection (MHD forbids stopping with suspended connections), then stops the
 * daemon: open streams are cut off (the client sees a truncated body) and their disconnect
 * callbacks fire. Writers may still hold streams; those stay valid until closed.
 *
 * CLIENT
 * ------
 * speed_http_client_t is one blocking keep-alive connection over TCP (or TLS), for
 * tests, health polling (speedctl) and SSE consumption. Not thread-safe: one thread at a
 * time per client. Every socket wait is bounded by the client's timeout.
 *
 * Return codes used below (besides SPEED_OK):
 *   SPEED_ERR_INVALID_ARGUMENT  a NULL or malformed argument, or a call in the wrong state
 *   SPEED_ERR_NO_MEMORY         an allocation failed
 *   SPEED_ERR_IO                a socket could not be created or bound (server)
 *   SPEED_ERR_CANCELLED         the stream's request is over (client gone / server stopping)
 *   SPEED_ERR_PEER_UNREACHABLE  connect failed, or the server closed/reset the connection
 *   SPEED_ERR_PEER_PROTOCOL     the server sent something that is not HTTP/1.x
 *   SPEED_ERR_TOO_LONG          a response line, header block or body exceeds client limits
 *   SPEED_ERR_TIMEOUT           a socket wait exceeded the client's timeout
 */
#ifndef SPEED_HTTP_H
#define SPEED_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metrics.h"
#include "status.h"

typedef struct speed_http_server speed_http_server_t;
typedef struct speed_http_request speed_http_request_t;
typedef struct speed_http_stream speed_http_stream_t;
typedef struct speed_http_client speed_http_client_t;

/* ======================================================================================
 * Server
 * ====================================================================================== */

typedef struct {
    const char *host;         /* numeric IPv4 or IPv6 address to bind; default "127.0.0.1";
                                 * "0.0.0.0" / "::" for all interfaces. Copied. */
    uint16_t port;            /* 0 = any free port; default 0 */
    unsigned n_threads;       /* MHD pool threads; default 2; 1 = a single epoll thread */
    unsigned max_connections; /* concurrent connections; default 1024 */
    unsigned idle_timeout_s;  /* close connections idle this long, 0 = never; default 60 */
    size_t max_body_bytes;    /* larger request bodies get 413; default 1 MiB */
    unsigned max_per_ip;      /* open connections per client address, 0 = unlimited; default 0 */
    const char *tls_cert_pem; /* PEM certificate (chain) and its key, in memory: both set =
                                 * HTTPS (GnuTLS through MHD), both NULL = plain HTTP. Copied. */
    const char *tls_key_pem;
} speed_http_server_params_t;

typedef struct {
    uint64_t connections_opened; /* TCP connections accepted so far */
    uint64_t requests;           /* requests that reached routing (any outcome) */
    uint64_t streams_opened;     /* speed_http_respond_stream calls */
    uint64_t disconnects;        /* streams whose request ended before the writer closed */
    uint64_t streams_attached;   /* streams whose request is still in progress */
    uint64_t streams_suspended;  /* attached streams whose connection waits for the writer (nothing
                                  * pending, or not committed yet): quiet, using no CPU */
} speed_http_server_stats_t;

/* Handles one request on an MHD pool thread; see "Requests" above. */
typedef void (*speed_http_handler_cb_t)(void *user, speed_http_request_t *request);

/* The gate: runs once per request when its headers are in and before any body byte is
 * read or buffered (speed_http_server_gate). It sees the method, path and headers. It
 * returns true to let the request go on (it may attach data with
 * speed_http_request_set_user and add response headers), or answers with
 * speed_http_respond / speed_http_respond_error and returns false: the answer goes out at
 * once, the body is not read, and MHD closes the connection. Returning false without an
 * answer gives a 403. Same threading rules as handlers. */
typedef bool (*speed_http_gate_cb_t)(void *user, speed_http_request_t *request);

/* Releases what a gate attached to a request; runs exactly once, on an MHD thread, when
 * the request is over (answered and sent, or the client gone), whatever happened. */
typedef void (*speed_http_request_end_cb_t)(void *data);

/* The client went away (or the server is stopping) before the writer closed `stream`. Runs
 * once, on an MHD thread; the stream stays valid (the writer still holds it). While it runs,
 * a speed_http_stream_close on another thread waits, so the callback sees the stream
 * cancelled and not closed (writes say SPEED_ERR_CANCELLED). May call
 * speed_http_stream_close. Must not call speed_http_server_destroy. */
typedef void (*speed_http_disconnect_cb_t)(void *user, speed_http_stream_t *stream);

speed_http_server_params_t speed_http_server_default_params(void);

/* Allocates a server; nothing listens until speed_http_server_start.
 * SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL, host not a numeric address, n_threads,
 * max_connections or max_body_bytes 0);
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_server_create(const speed_http_server_params_t *params, speed_http_server_t **server_p);

/* Adds a route: `method` ("GET", "POST", ...) and exact `path` ("/v1/completions"), both
 * copied. Only before start. SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL, path not starting
 * with '/', the pair already routed, or the server started); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_server_route(speed_http_server_t *server, const char *method, const char *path,
                                       speed_http_handler_cb_t handler, void *user);

/* Sets the gate (at most one; NULL removes it). Only before start. SPEED_OK;
 * SPEED_ERR_INVALID_ARGUMENT (NULL server, or started). */
speed_status_t speed_http_server_gate(speed_http_server_t *server, speed_http_gate_cb_t gate, void *user);

/* Routes GET `path` to a handler rendering `metrics` (borrowed: it must outlive the server)
 * with Content-Type "text/plain; version=0.0.4". Same returns as speed_http_server_route. */
speed_status_t speed_http_server_route_metrics(speed_http_server_t *server, const char *path, speed_metrics_t *metrics);

/* Binds and starts the MHD threads. SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (already started);
 * SPEED_ERR_IO (bind/listen failed, e.g. the port is taken; logged). */
speed_status_t speed_http_server_start(speed_http_server_t *server);

/* The bound port after a successful start (the real one when params.port was 0), else 0. */
uint16_t speed_http_server_port(const speed_http_server_t *server);

/* Counters since start; any thread. */
void speed_http_server_stats(const speed_http_server_t *server, speed_http_server_stats_t *stats_p);

/* Stops (see "Shutdown"), waits for the MHD threads and frees the server. NULL is a no-op.
 * Must not be called from a handler or a callback of this server. Blocks until MHD's
 * threads have exited; handlers that are running finish first. */
void speed_http_server_destroy(speed_http_server_t *server);

/* ---- requests: only inside the handler ------------------------------------------------ */

const char *speed_http_request_method(const speed_http_request_t *request);
/* The path without the query string. */
const char *speed_http_request_path(const speed_http_request_t *request);
/* A request header by case-insensitive name ("Authorization", "X-Request-Id",
 * "Content-Type"), or NULL. */
const char *speed_http_request_header(const speed_http_request_t *request, const char *name);
/* Attaches `data` to the request (gate or handler), replacing what was there (whose
 * on_end then does not run); on_end (may be NULL) runs once when the request is over. */
void speed_http_request_set_user(speed_http_request_t *request, void *data, speed_http_request_end_cb_t on_end);
/* What speed_http_request_set_user attached, or NULL. */
void *speed_http_request_user(const speed_http_request_t *request);

/* A query-string argument (decoded), or NULL. */
const char *speed_http_request_query(const speed_http_request_t *request, const char *key);
/* The request body (NUL-terminated for convenience; may contain NULs) and its length;
 * "" with length 0 when there is none. */
const char *speed_http_request_body(const speed_http_request_t *request, size_t *len_p);

/* Adds a response header (copied) to whatever response this request gets (also copied into
 * a stream it starts). Before or after speed_http_respond, inside the handler.
 * SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL, CR/LF in name or value); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_request_add_header(speed_http_request_t *request, const char *name, const char *value);

/* A complete response: `status` (100..599), `content_type` (NULL: none), `body` copied.
 * Once per request. SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (already answered, bad status);
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_respond(speed_http_request_t *request, unsigned status, const char *content_type,
                                  const void *body, size_t body_len);

/* A JSON error: {"error":{"message":"<message>","type":"<type>","code":<status>}} with
 * message and type JSON-escaped. Same returns as speed_http_respond. */
speed_status_t speed_http_respond_error(speed_http_request_t *request, unsigned status, const char *type,
                                        const char *message);

/* Answers with a stream (see "Streams"). `content_type` e.g. "text/event-stream" (which
 * also adds Cache-Control: no-cache). `on_disconnect` may be NULL. *stream_p is the
 * writer's reference: pass it to any thread, end it with speed_http_stream_close.
 * Once per request. SPEED_OK; SPEED_ERR_INVALID_ARGUMENT; SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_respond_stream(speed_http_request_t *request, unsigned status, const char *content_type,
                                         speed_http_disconnect_cb_t on_disconnect, void *user,
                                         speed_http_stream_t **stream_p);

/* ---- streams: any thread, while the caller holds the writer reference ------------------- */

/* Before commit only: change the status or add a header. SPEED_OK;
 * SPEED_ERR_INVALID_ARGUMENT (already committed, bad input); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_stream_set_status(speed_http_stream_t *stream, unsigned status);
speed_status_t speed_http_stream_add_header(speed_http_stream_t *stream, const char *name, const char *value);

/* Queues `len` bytes (copied; never blocks on the network) and commits the stream.
 * SPEED_OK; SPEED_ERR_CANCELLED (request over, or the pending bound was passed: stop
 * producing); SPEED_ERR_INVALID_ARGUMENT (NULL, or after close); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_stream_write(speed_http_stream_t *stream, const void *data, size_t len);

/* Writes one SSE event: "event: <event>\n" (if event is non-NULL) then one "data: " line
 * per line of `data`, then a blank line. Same returns as speed_http_stream_write. */
speed_status_t speed_http_stream_write_sse(speed_http_stream_t *stream, const char *event, const char *data);

/* Bytes written but not yet handed to the socket. */
size_t speed_http_stream_pending(speed_http_stream_t *stream);

/* Bounds the pending bytes (0 = unbounded, the default). A write that would pass the bound
 * overruns the stream instead: the pending bytes are dropped, the write and every later one
 * return SPEED_ERR_CANCELLED, and the connection is cut (at once when MHD is waiting for
 * bytes; otherwise when its socket drains or its idle timeout passes). A client that stops
 * reading thus costs at most `max_bytes` of memory. The writer still closes the stream. */
void speed_http_stream_set_max_pending(speed_http_stream_t *stream, size_t max_bytes);

/* True once the stream overran its bound. */
bool speed_http_stream_is_overrun(speed_http_stream_t *stream);

/* True once the request is over without the writer having closed (disconnect), or the
 * server is stopping: the producer should stop and close. */
bool speed_http_stream_is_cancelled(speed_http_stream_t *stream);

/* Completes a stream that is not committed yet as one ordinary response: sets the status
 * and content type (NULL keeps the stream's), queues `body` (copied) and closes. It is sent
 * with a Content-Length. This is how a handler answers later from another thread when the
 * status is not known in the handler (e.g. a non-streaming completion): respond_stream in
 * the handler, speed_http_stream_respond when the result is in. Always releases the
 * writer's reference, like speed_http_stream_close. SPEED_OK; SPEED_ERR_INVALID_ARGUMENT
 * (already committed: the stream is closed as it was; or bad arguments: closed unchanged);
 * SPEED_ERR_CANCELLED (the client is gone); SPEED_ERR_NO_MEMORY (closed without the body). */
speed_status_t speed_http_stream_respond(speed_http_stream_t *stream, unsigned status, const char *content_type,
                                         const void *body, size_t body_len);

/* Ends the body after the pending bytes, and releases the writer's reference: the caller
 * must not touch `stream` afterwards. Once it returns, the disconnect callback will not run
 * (if it is running on another thread, close waits for it; close from inside the callback
 * is allowed). SPEED_OK; SPEED_ERR_CANCELLED (the client was already gone; the reference
 * is released all the same). NULL is a no-op returning SPEED_OK. */
speed_status_t speed_http_stream_close(speed_http_stream_t *stream);

/* ======================================================================================
 * Client
 * ====================================================================================== */

typedef struct {
    const char *name;
    const char *value;
} speed_http_header_t;

typedef struct {
    int status; /* e.g. 200 */
    const speed_http_header_t *headers;
    size_t n_headers;
    const char *body; /* NUL-terminated; NULL after request_begin */
    size_t body_len;
    bool keep_alive; /* false: the server will close after this response */
} speed_http_response_t;

typedef struct {
    const char *event; /* "" when the event had no "event:" field */
    const char *data;  /* "data:" lines joined with '\n' */
    size_t data_len;
} speed_http_sse_event_t;

/* Connects to host:port (a numeric address or a name). `timeout_ms` bounds the connect and
 * every later socket wait (<= 0: 30 s). SPEED_OK; SPEED_ERR_INVALID_ARGUMENT;
 * SPEED_ERR_PEER_UNREACHABLE; SPEED_ERR_TIMEOUT; SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_client_connect(const char *host, uint16_t port, int timeout_ms,
                                         speed_http_client_t **client_p);

/* Like speed_http_client_connect, then a TLS handshake (HTTPS): the server's certificate must
 * chain to ca_pem (PEM text; NULL = the system's trust store) and name server_name (NULL =
 * host; a numeric address is matched against the certificate's IP address entries).
 * Everything afterwards is as for a plain client. Same returns, plus SPEED_ERR_PEER_PROTOCOL
 * when the handshake or the verification fails. */
speed_status_t speed_http_client_connect_tls(const char *host, uint16_t port, int timeout_ms, const char *ca_pem,
                                             const char *server_name, speed_http_client_t **client_p);

/* A client over a socket the caller already connected (a Unix socket, one end of a
 * socketpair: tests and tests/fuzz feed it scripted responses this way). The client owns fd
 * from the call on, also when it fails (fd is closed then), and makes it non-blocking. `host`
 * is the Host header value to send. Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (fd < 0,
 * host NULL or empty, fcntl failed) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_client_adopt(int fd, const char *host, int timeout_ms, speed_http_client_t **client_p);

/* Closes the socket and frees. NULL is a no-op. */
void speed_http_client_destroy(speed_http_client_t *client);

/* Sends a request and reads the whole response. Adds Host (unless `headers` has one), and
 * Content-Length when `body` is non-NULL; `headers` (may be NULL) are sent as given. *response_p is owned by the
 * client and valid until its next call. After a response with keep_alive false, or any
 * error, the connection is unusable (further calls return SPEED_ERR_PEER_UNREACHABLE).
 * Returns as listed at the top of this file; an HTTP error status is still SPEED_OK. */
speed_status_t speed_http_client_request(speed_http_client_t *client, const char *method, const char *path,
                                         const speed_http_header_t *headers, size_t n_headers, const void *body,
                                         size_t body_len, const speed_http_response_t **response_p);

/* Like speed_http_client_request but returns after the status line and headers; read the
 * body with speed_http_client_read or speed_http_client_next_event. A new request on the
 * same client first discards the rest of the body. */
speed_status_t speed_http_client_request_begin(speed_http_client_t *client, const char *method, const char *path,
                                               const speed_http_header_t *headers, size_t n_headers, const void *body,
                                               size_t body_len, const speed_http_response_t **response_p);

/* Reads up to `cap` decoded body bytes as soon as any are available; *n_p = 0 at the end
 * of the body. */
speed_status_t speed_http_client_read(speed_http_client_t *client, void *buf, size_t cap, size_t *n_p);

/* Reads the next server-sent event of the body. *event_p is NULL at the end of the body,
 * else points into the client (valid until its next call). Comments are skipped. */
speed_status_t speed_http_client_next_event(speed_http_client_t *client, const speed_http_sse_event_t **event_p);

/* A response header by case-insensitive name, or NULL. */
const char *speed_http_response_header(const speed_http_response_t *response, const char *name);

/* One-shot GET on a fresh connection: *status_p gets the status, *body_p (may be NULL)
 * a copy of the body (speed_free it). Returns as speed_http_client_request. */
speed_status_t speed_http_get(const char *host, uint16_t port, const char *path, int timeout_ms, int *status_p,
                              char **body_p);

#endif /* SPEED_HTTP_H */
