/* speed_rpc: a small gRPC (C core) transport for the control plane.
 *
 * It moves bytes: requests and replies are opaque buffers (protobuf-c messages packed with
 * speed_proto_pack, see proto/). Two call shapes: unary, and server streaming (one request,
 * any number of replies, then a status).
 *
 * SERVER
 *   speed_rpc_server_create → speed_rpc_server_add_method (one per path) →
 *   speed_rpc_server_start → ... → speed_rpc_server_shutdown (optional) →
 *   speed_rpc_server_destroy.
 *   One completion-queue thread per server accepts calls and runs the handlers. Handlers
 *   must not block: they start work and return; the call is completed later, from any
 *   thread, with exactly one *terminal* function:
 *     unary:     speed_rpc_call_reply(call, bytes) | speed_rpc_call_finish/fail (error)
 *     streaming: speed_rpc_call_send(call, bytes)* then speed_rpc_call_finish/fail
 *   After the terminal function returns the call object must not be touched again.
 *   If the client cancels, disconnects or its deadline passes, or the server shuts down,
 *   before the terminal function was called, the call's cancel callback (if installed)
 *   runs once; the handler must still call a terminal function (it returns quickly).
 *
 * CLIENT
 *   speed_rpc_channel_create(target) gives a channel that any number of threads share.
 *   speed_rpc_unary blocks until the reply, an error or the deadline. Server streams:
 *   speed_rpc_stream_open → speed_rpc_stream_next (loop) → speed_rpc_stream_close, with
 *   speed_rpc_stream_cancel callable from another thread. Each call has its own
 *   completion queue, so calls never wait on one another.
 *
 * Message size limit: 64 MiB by default on both sides (gRPC's own default is 4 MiB), set
 * per server and per channel. Larger messages fail with RESOURCE_EXHAUSTED.
 *
 * Status: every call ends with a gRPC status code (speed_rpc_code_t, same numbers as
 * grpc_status_code) and a message. speed_rpc_code_from_status / speed_rpc_code_to_status
 * are the one place speedserve maps its speed_status_t to gRPC codes and back.
 *
 * Security: a server and a channel are either plaintext (tls NULL) or mutual TLS
 * (speed_rpc_tls_t: the cluster CA, this process's certificate and key, PEM text). A TLS server
 * requires every client to present a certificate signed by the CA (the handshake fails
 * otherwise, before any call), and the certificate's common name is the peer's identity
 * (speed_rpc_call_peer). speed_rpc_server_allow limits a method to some identities; other
 * peers get PERMISSION_DENIED before the handler runs. A plaintext server knows no identity:
 * rules are not applied and speed_rpc_call_peer is "".
 *
 * gRPC initialization: each server and channel holds one grpc_init reference, released by
 * its destroy; the process needs no global setup.
 */
#ifndef SPEED_RPC_H
#define SPEED_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* ---------------------------------------------------------------------------------------
 * Status codes */

/* gRPC status codes (numerically equal to grpc_status_code). */
typedef enum {
    SPEED_RPC_OK = 0,
    SPEED_RPC_CANCELLED = 1,
    SPEED_RPC_UNKNOWN = 2,
    SPEED_RPC_INVALID_ARGUMENT = 3,
    SPEED_RPC_DEADLINE_EXCEEDED = 4,
    SPEED_RPC_NOT_FOUND = 5,
    SPEED_RPC_ALREADY_EXISTS = 6,
    SPEED_RPC_PERMISSION_DENIED = 7,
    SPEED_RPC_RESOURCE_EXHAUSTED = 8,
    SPEED_RPC_FAILED_PRECONDITION = 9,
    SPEED_RPC_ABORTED = 10,
    SPEED_RPC_OUT_OF_RANGE = 11,
    SPEED_RPC_UNIMPLEMENTED = 12,
    SPEED_RPC_INTERNAL = 13,
    SPEED_RPC_UNAVAILABLE = 14,
    SPEED_RPC_DATA_LOSS = 15,
    SPEED_RPC_UNAUTHENTICATED = 16,
} speed_rpc_code_t;

/* speed_status_t → gRPC code, for servers:
 *   OK → OK; INVALID_ARGUMENT, PARSE, FORMAT → INVALID_ARGUMENT; NOT_FOUND → NOT_FOUND;
 *   UNSUPPORTED → UNIMPLEMENTED; TOO_LONG → OUT_OF_RANGE; CAPACITY, NO_MEMORY →
 *   RESOURCE_EXHAUSTED; CANCELLED → CANCELLED; TIMEOUT → DEADLINE_EXCEEDED;
 *   PEER_UNREACHABLE → UNAVAILABLE; TRANSFER → ABORTED; PEER_PROTOCOL, IO, DEVICE, INTERNAL
 *   and unknown values → INTERNAL. */
speed_rpc_code_t speed_rpc_code_from_status(speed_status_t status);

/* gRPC code → speed_status_t, for clients. A failure reported by a peer is at most a peer
 * error here (a peer's INTERNAL is not this node's bug):
 *   OK → OK; CANCELLED → CANCELLED; INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS,
 *   PERMISSION_DENIED, UNAUTHENTICATED → INVALID_ARGUMENT; DEADLINE_EXCEEDED → TIMEOUT;
 *   NOT_FOUND → NOT_FOUND; RESOURCE_EXHAUSTED → CAPACITY; ABORTED → TRANSFER;
 *   OUT_OF_RANGE → TOO_LONG; UNIMPLEMENTED → UNSUPPORTED; UNAVAILABLE → PEER_UNREACHABLE;
 *   UNKNOWN, INTERNAL, DATA_LOSS and unknown values → PEER_PROTOCOL. */
speed_status_t speed_rpc_code_to_status(int code);

/* "OK", "CANCELLED", ..., "UNAUTHENTICATED"; "UNKNOWN_CODE" for other values. Never NULL. */
const char *speed_rpc_code_name(int code);

/* Default for the message size limits below: 64 MiB. */
#define SPEED_RPC_DEFAULT_MAX_MESSAGE_BYTES (64u << 20)

/* How long one connection attempt (TCP connect, TLS handshake, HTTP/2 settings) may take
 * before the channel gives it up and backs off; calls still end at their own deadlines. */
#define SPEED_RPC_CONNECT_TIMEOUT_MS 5000

/* ---------------------------------------------------------------------------------------
 * Server */

typedef struct speed_rpc_server speed_rpc_server_t;
typedef struct speed_rpc_call speed_rpc_call_t; /* one incoming call, server side */

typedef enum {
    SPEED_RPC_UNARY = 0,  /* one request → one reply */
    SPEED_RPC_STREAM = 1, /* one request → zero or more messages → status */
} speed_rpc_kind_t;

/* Mutual TLS credentials, PEM text (NUL-terminated). gRPC copies them when the server or
 * channel is created; the caller keeps ownership. */
typedef struct {
    const char *ca;   /* the CA(s) the peer's certificate must be signed by */
    const char *cert; /* this process's certificate (chain); NULL on a channel = present none */
    const char *key;  /* its private key; NULL exactly when cert is */
} speed_rpc_tls_t;

typedef struct {
    const char *address;        /* "host:port"; port 0 = any free port. Default "127.0.0.1:0" */
    size_t max_message_bytes;   /* limit for received and sent messages; 0 = default (64 MiB) */
    const speed_rpc_tls_t *tls; /* NULL (default) = plaintext; else ca, cert and key are required
                                 * and clients must present a certificate signed by ca */
} speed_rpc_server_params_t;

speed_rpc_server_params_t speed_rpc_server_default_params(void);

/* A new call arrived for a method registered with this handler. Runs on the server's
 * completion-queue thread and must not block. `request` (len bytes; NULL when len is 0) is
 * valid only during the callback: copy or unpack it. The handler owns a reference to `call`
 * until it calls a terminal function (possibly from another thread, possibly inside this
 * callback). */
typedef void (*speed_rpc_handler_cb_t)(void *user, speed_rpc_call_t *call, const uint8_t *request, size_t len);

/* The call was cancelled before the handler completed it: the client cancelled or went
 * away, its deadline passed, or the server is shutting down. Runs once, on the server's
 * completion-queue thread or on the thread inside speed_rpc_server_shutdown/destroy, and
 * must not block. It may call a terminal function on `call` itself. */
typedef void (*speed_rpc_cancel_cb_t)(void *user, speed_rpc_call_t *call);

/* Create a server listening on params->address (bound now, so the port is known; calls are
 * accepted only after speed_rpc_server_start).
 * Returns SPEED_OK and *server_p; SPEED_ERR_INVALID_ARGUMENT (NULL arguments, no address, tls
 * without ca, cert or key); SPEED_ERR_IO when the address cannot be bound (in use, bad host) or
 * gRPC refuses the TLS credentials (check them first with speed_tls_creds_load);
 * SPEED_ERR_NO_MEMORY.
 * Not thread-safe with respect to the same server until start. */
speed_status_t speed_rpc_server_create(const speed_rpc_server_params_t *params, speed_rpc_server_t **server_p);

/* Register `path` (exactly as on the wire, e.g. "/speed.v1.Decode/Reserve"; copied). Only
 * before speed_rpc_server_start. Calls to paths not registered end with UNIMPLEMENTED.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL, path not starting with '/', path
 * already registered, server already started); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_rpc_server_add_method(speed_rpc_server_t *server, const char *path, speed_rpc_kind_t kind,
                                           speed_rpc_handler_cb_t handler, void *user);

/* Allow `path` (a registered method) only to the peers named in `peers`, a comma-separated
 * list of identities (certificate common names): an entry matches a peer of exactly that
 * name, or that name followed by "-" and digits ("prefill" matches "prefill-0", "prefill-12";
 * "router" matches "router"). Without a rule, any peer with a valid certificate may call the
 * method. Calls from other peers end with PERMISSION_DENIED "<peer> may not call <path>"
 * before the handler runs (logged at warn). On a plaintext server rules are kept but not
 * applied (there is no identity). Only before speed_rpc_server_start; a second rule for the
 * same path replaces the first.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL, empty list, server started);
 * SPEED_ERR_NOT_FOUND (path not registered); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_rpc_server_allow(speed_rpc_server_t *server, const char *path, const char *peers);

/* True when `peer` matches an entry of the comma-separated `peers` (the rule above). */
bool speed_rpc_peer_matches(const char *peers, const char *peer);

/* Whether the server runs mutual TLS. */
bool speed_rpc_server_is_tls(const speed_rpc_server_t *server);

/* Start accepting calls: starts the completion-queue thread.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT if already started; SPEED_ERR_NO_MEMORY;
 * SPEED_ERR_INTERNAL if gRPC refuses a request or the thread cannot start. */
speed_status_t speed_rpc_server_start(speed_rpc_server_t *server);

/* The bound TCP port (the chosen one when the address asked for port 0). */
int speed_rpc_server_port(const speed_rpc_server_t *server);

/* Calls accepted and not yet completed by their handler, while gRPC still holds them (a
 * cancelled call stops counting once gRPC lets go of it, even if its handler is late). */
int speed_rpc_server_active_calls(const speed_rpc_server_t *server);

/* Stop accepting calls, give calls in flight up to grace_ms to complete normally (handler
 * finished and every queued message delivered), then end
 * the rest: their cancel callbacks run (on this thread) and their clients receive
 * UNAVAILABLE "server shutting down"; queued stream messages not yet sent are dropped.
 * Blocks until gRPC has let go of every call (bounded: after the grace period, calls that
 * still do not finish are cancelled at the transport). Handlers may still hold call
 * references afterwards: every function on those calls then returns SPEED_ERR_CANCELLED,
 * and the terminal function frees them. Idempotent; call from any thread except the
 * completion-queue thread (i.e. not from a handler or cancel callback).
 * If calls completed normally during the shutdown, their connections are held open 1-3 s
 * more (what is left of grace_ms, at least 1 s) so slow readers get the end of their
 * streams: gRPC gives no signal of how far a client has read. */
void speed_rpc_server_shutdown(speed_rpc_server_t *server, int64_t grace_ms);

/* speed_rpc_server_shutdown(server, 0) if not yet done, then release everything.
 * Handler-held calls stay valid as described above. NULL is a no-op. */
void speed_rpc_server_destroy(speed_rpc_server_t *server);

/* ---- server calls (every function is thread-safe) ---- */

/* The method path of the call ("/pkg.Service/Method"); valid until the terminal call, and
 * only while the server exists. */
const char *speed_rpc_call_method(const speed_rpc_call_t *call);

/* The caller's identity: the common name of the client certificate it presented (TLS
 * servers; a call is only accepted with one), "" on a plaintext server. Valid as long as the
 * call is. */
const char *speed_rpc_call_peer(const speed_rpc_call_t *call);

/* Attach the handler's own context, returned by speed_rpc_call_user. */
void speed_rpc_call_set_user(speed_rpc_call_t *call, void *user);
void *speed_rpc_call_user(const speed_rpc_call_t *call);

/* Install the cancel callback (replacing any earlier one). Returns SPEED_OK; or
 * SPEED_ERR_CANCELLED when the call is already cancelled, in which case the callback is not
 * installed and will never run (act on it directly). Guarantee: once a terminal function has
 * returned, the callback is not running and will not start. */
speed_status_t speed_rpc_call_on_cancel(speed_rpc_call_t *call, speed_rpc_cancel_cb_t cb, void *user);

/* True once the call is cancelled (see speed_rpc_cancel_cb_t). Polling alternative to the
 * callback. */
bool speed_rpc_call_is_cancelled(const speed_rpc_call_t *call);

/* Unary: send the reply (`len` bytes copied) with status OK. Terminal.
 * Returns SPEED_OK; SPEED_ERR_CANCELLED if the call was already cancelled (nothing is sent;
 * the call is released anyway); SPEED_ERR_INVALID_ARGUMENT if the method is streaming
 * (the call is then failed with INTERNAL and released); SPEED_ERR_NO_MEMORY (the call is
 * failed with RESOURCE_EXHAUSTED if possible, and released). */
speed_status_t speed_rpc_call_reply(speed_rpc_call_t *call, const void *data, size_t len);

/* Streaming: queue one message (`len` bytes copied). Messages go out in order, one write in
 * flight at a time; the rest wait in the call's queue. Not terminal.
 * Returns SPEED_OK; SPEED_ERR_CANCELLED once the call is cancelled (stop producing and call
 * finish); SPEED_ERR_INVALID_ARGUMENT on a unary call or after the call was finished;
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_rpc_call_send(speed_rpc_call_t *call, const void *data, size_t len);

/* Messages queued by speed_rpc_call_send and not yet written to the transport (including
 * the one in flight): a slow reader shows here. */
size_t speed_rpc_call_queued(const speed_rpc_call_t *call);

/* End the call with `code` and `message` (NULL = ""), after the queued messages. For a
 * unary call a non-OK code is the normal error path; OK without a reply sends no message
 * (the client sees an empty reply). Terminal.
 * Returns SPEED_OK; SPEED_ERR_CANCELLED if the call was already cancelled (the call is
 * released anyway); SPEED_ERR_NO_MEMORY (the call is cancelled and released). */
speed_status_t speed_rpc_call_finish(speed_rpc_call_t *call, speed_rpc_code_t code, const char *message);

/* speed_rpc_call_finish(call, speed_rpc_code_from_status(status), message). Terminal. */
speed_status_t speed_rpc_call_fail(speed_rpc_call_t *call, speed_status_t status, const char *message);

/* ---------------------------------------------------------------------------------------
 * Client */

typedef struct speed_rpc_channel speed_rpc_channel_t;
typedef struct speed_rpc_stream speed_rpc_stream_t;

typedef struct {
    size_t max_message_bytes; /* 0 = default (64 MiB) */
    /* false (default): a call to a server that cannot be reached fails at once with
     * UNAVAILABLE. true: calls wait (up to their deadline) for the server to come up. */
    bool wait_for_ready;
    /* HTTP/2 keepalive ping interval while calls are open, so a stream to a host that died
     * without closing its sockets ends with UNAVAILABLE; 0 = off. Default 10000. A missing
     * ping ack for 5 s (or keepalive_ms, if smaller) closes the connection. Servers made by
     * speed_rpc_server_create accept pings down to 1 s apart. */
    int keepalive_ms;
    /* Upper bound of gRPC's reconnect backoff after a connection failure: a restarted server
     * is noticed within about this long. Default 1000; 0 = gRPC's own (120 s). */
    int max_reconnect_backoff_ms;
    /* NULL (default) = plaintext. Else TLS: the server's certificate must be signed by tls->ca
     * and name the target's host (an IP SAN for an address); tls->cert/key, when set, are
     * presented to the server (required by speed_rpc servers with TLS). */
    const speed_rpc_tls_t *tls;
    /* TLS: check the server's certificate for this name instead of the target's host (e.g.
     * dialling an address the certificate does not list). NULL = the target's host. */
    const char *tls_server_name;
} speed_rpc_channel_params_t;

speed_rpc_channel_params_t speed_rpc_channel_default_params(void);

/* A channel to `target` ("host:port"; connects lazily, reconnects on its own).
 * params may be NULL (defaults). Thread-safe: any number of threads may make calls on it.
 * A failed TLS handshake (server certificate not signed by tls->ca or not for the target;
 * server refusing our certificate) shows as UNAVAILABLE on the calls.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (also tls without ca, or cert without key);
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_rpc_channel_create(const char *target, const speed_rpc_channel_params_t *params,
                                        speed_rpc_channel_t **channel_p);

/* Every call and stream made on the channel must be finished/closed first. NULL is a no-op. */
void speed_rpc_channel_destroy(speed_rpc_channel_t *channel);

/* Outcome of a unary call. Release with speed_rpc_reply_cleanup. */
typedef struct {
    speed_rpc_code_t code; /* gRPC status */
    char *message;         /* status message, never NULL after a call ("" if none) */
    uint8_t *data;         /* reply bytes (speed_malloc'd), NULL when len is 0 or on error */
    size_t len;
} speed_rpc_reply_t;

/* Frees message and data and zeroes the struct. Safe on a zeroed struct. */
void speed_rpc_reply_cleanup(speed_rpc_reply_t *reply);

/* Call `method` with `len` bytes of request and block until the reply, an error, or
 * timeout_ms (> 0; <= 0 means no deadline) pass. Thread-safe.
 * *reply_p is always filled (code, message; data on success) and must be cleaned up.
 * Returns speed_rpc_code_to_status(reply_p->code): SPEED_OK on success; SPEED_ERR_TIMEOUT
 * (DEADLINE_EXCEEDED), SPEED_ERR_PEER_UNREACHABLE (UNAVAILABLE: no server), ... for a
 * status from the server or the transport; SPEED_ERR_INVALID_ARGUMENT for NULL arguments;
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_rpc_unary(speed_rpc_channel_t *channel, const char *method, const void *request, size_t len,
                               int64_t timeout_ms, speed_rpc_reply_t *reply_p);

/* Start a server-streaming call: sends the request and returns at once.
 * timeout_ms bounds the whole stream (<= 0: no deadline).
 * Returns SPEED_OK and *stream_p; SPEED_ERR_INVALID_ARGUMENT; SPEED_ERR_NO_MEMORY;
 * SPEED_ERR_INTERNAL if gRPC refuses the call. Errors from the server arrive through
 * speed_rpc_stream_next. */
speed_status_t speed_rpc_stream_open(speed_rpc_channel_t *channel, const char *method, const void *request, size_t len,
                                     int64_t timeout_ms, speed_rpc_stream_t **stream_p);

typedef enum {
    SPEED_RPC_NEXT_MESSAGE = 0, /* *data_p and *len_p hold one message (caller frees with speed_free) */
    SPEED_RPC_NEXT_END = 1,     /* the stream is over; speed_rpc_stream_status tells how */
    SPEED_RPC_NEXT_WAIT = 2,    /* wait_ms passed without a message; call again */
} speed_rpc_next_t;

/* Wait up to wait_ms (< 0: until something happens) for the next message. One thread at a
 * time per stream. After END every further call returns END.
 * A message that cannot be copied (out of memory) cancels the stream: END, status
 * RESOURCE_EXHAUSTED. *data_p is NULL and *len_p 0 unless the result is MESSAGE. */
speed_rpc_next_t speed_rpc_stream_next(speed_rpc_stream_t *stream, int64_t wait_ms, uint8_t **data_p, size_t *len_p);

/* After END: the final status code (and, when message_p is non-NULL, its message, valid
 * until close). Before END: SPEED_RPC_UNKNOWN and "". Same thread as speed_rpc_stream_next.
 * speed_rpc_code_to_status maps it to a speed_status_t. */
speed_rpc_code_t speed_rpc_stream_status(const speed_rpc_stream_t *stream, const char **message_p);

/* Cancel the stream: the server's cancel callback runs and next() soon returns END with
 * CANCELLED (unless the stream had already ended). Callable from any thread, any number of
 * times, until speed_rpc_stream_close starts. */
void speed_rpc_stream_cancel(speed_rpc_stream_t *stream);

/* Cancel if still running, wait for gRPC to let go, free everything. NULL is a no-op. */
void speed_rpc_stream_close(speed_rpc_stream_t *stream);

#endif /* SPEED_RPC_H */
