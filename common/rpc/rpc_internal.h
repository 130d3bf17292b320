/* Private to speed_rpc; not an API. Helpers every file uses, and the server's structures,
 * shared by rpc_server.c (lifecycle, accepting, shutdown) and rpc_call.c (a call's state
 * machine and the speed_rpc_call_* functions). */
#ifndef SPEED_RPC_INTERNAL_H
#define SPEED_RPC_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "rpc.h"

/* A byte buffer holding a copy of data[0, len). NULL only if grpc's allocator fails
 * (it aborts instead, so in practice never). */
grpc_byte_buffer *speed_rpc_bb_from(const void *data, size_t len);

/* Copy the contents of bb into one speed_malloc'd buffer (NULL for 0 bytes).
 * Returns SPEED_OK or SPEED_ERR_NO_MEMORY. Does not destroy bb. */
speed_status_t speed_rpc_bb_copy(grpc_byte_buffer *bb, uint8_t **data_p, size_t *len_p);

/* Absolute deadline `ms` from now on the monotonic clock; ms < 0 = infinitely far. */
gpr_timespec speed_rpc_deadline(int64_t ms);

/* Copy a slice into a speed_malloc'd NUL-terminated string (NULL on allocation failure). */
char *speed_rpc_slice_strdup(grpc_slice slice);

/* ---- server structures (rpc_server.c, rpc_call.c) ----------------------------------- */

typedef enum {
    TAG_ACCEPT,  /* request_registered_call completed */
    TAG_CLOSE,   /* RECV_CLOSE_ON_SERVER */
    TAG_SEND,    /* SEND_MESSAGE (+ initial metadata) */
    TAG_STATUS,  /* SEND_STATUS_FROM_SERVER (+ initial metadata, + unary reply) */
    TAG_GENERIC, /* grpc_server_request_call for an unregistered method completed */
    TAG_GENERIC_DONE,
    TAG_SHUTDOWN, /* grpc_server_shutdown_and_notify */
} tag_kind_t;

typedef struct {
    tag_kind_t kind;
    void *obj;
} rpc_tag_t;

typedef struct rpc_method {
    char *path;
    speed_rpc_kind_t kind;
    speed_rpc_handler_cb_t handler;
    void *user;
    void *registered; /* grpc_server_register_method handle */
    char *allow;      /* speed_rpc_server_allow's peer list; NULL = any authenticated peer */
    int n_pending;    /* accepts armed (server lock) */
} rpc_method_t;

typedef struct rpc_msg {
    struct rpc_msg *next;
    grpc_byte_buffer *bb;
} rpc_msg_t;

struct speed_rpc_call {
    pthread_mutex_t lock;
    pthread_cond_t cb_done;
    atomic_int refs;
    speed_rpc_server_t *server; /* valid while the call is in the server's list */
    rpc_method_t *method;
    speed_rpc_kind_t kind;
    char peer[64];                      /* the client certificate's CN ("" on a plaintext server), set on accept */
    struct speed_rpc_call *prev, *next; /* server list (server lock) */
    bool active;                        /* counted in n_active (server lock) */
    bool forced;                        /* picked by force_finish_all (server lock) */

    /* filled by grpc_server_request_registered_call */
    grpc_call *gcall; /* NULL once released */
    gpr_timespec deadline;
    grpc_metadata_array req_md;
    grpc_byte_buffer *payload;
    int recv_cancelled; /* RECV_CLOSE_ON_SERVER output */

    rpc_tag_t t_accept, t_close, t_send, t_status;

    /* state (call lock) */
    bool close_in_flight, send_in_flight, status_in_flight;
    bool md_sent;        /* initial metadata went out with an earlier batch */
    bool status_started; /* a status batch was started (or is due after the queue) */
    bool status_due;     /* finish requested; status goes when the send completes */
    bool status_done;
    bool peer_gone;    /* RECV_CLOSE said cancelled: no more batches */
    bool cancelled;    /* visible to the handler: peer gone or ended by shutdown */
    bool handler_done; /* the handler called its terminal function */
    bool cb_fired, cb_running;
    pthread_t cb_thread;
    speed_rpc_code_t fin_code;
    grpc_slice fin_details;
    bool fin_details_set;
    grpc_byte_buffer *send_bb;  /* in flight on TAG_SEND */
    grpc_byte_buffer *reply_bb; /* in flight on TAG_STATUS (unary reply) */
    rpc_msg_t *q_head, *q_tail;
    size_t n_queued; /* queue + the one in flight */

    speed_rpc_cancel_cb_t cancel_cb;
    void *cancel_user;
    void *user;
};

struct speed_rpc_server {
    grpc_server *server;
    grpc_completion_queue *cq;
    pthread_t thread;
    bool thread_started;
    int port;
    size_t max_message_bytes;
    bool tls; /* mutual TLS: calls carry a peer identity and allow rules apply */

    rpc_method_t *methods;
    int n_methods;

    pthread_mutex_t lock;
    pthread_cond_t changed; /* any of the counters below changed */
    speed_rpc_call_t *live; /* calls holding a grpc_call */
    int n_live;
    int n_active;  /* calls the handler has not completed */
    int n_pending; /* accepts armed (registered + generic) */
    int n_generic_live;
    bool generic_armed;
    bool started;
    bool shutting_down; /* draining: new calls are answered with UNAVAILABLE */
    bool closing;       /* GOAWAY sent: stop arming accepts */
    bool notified;      /* TAG_SHUTDOWN arrived */
    bool shutdown_done;
    rpc_tag_t t_shutdown;
    int n_ended_in_drain; /* calls that finished normally while draining */
};

/* ---- rpc_call.c: a call's state, for the server ----------------------------------- */

/* References (see rpc_call.c): the last unref frees the call. */
void speed_rpc_call_ref(speed_rpc_call_t *call);
void speed_rpc_call_unref(speed_rpc_call_t *call);

/* Drop the messages queued behind the one in flight. Call lock held. */
void speed_rpc_call_drop_queue_locked(speed_rpc_call_t *call);

/* True when gRPC's part of the call is over; the caller then runs
 * speed_rpc_call_release_grpc after unlocking. Sets gcall to NULL so that it happens once.
 * Call lock held. */
grpc_call *speed_rpc_call_take_grpc_if_done_locked(speed_rpc_call_t *call);

/* Unlink the call from its server, unref the grpc_call and drop gRPC's reference. Takes the
 * server lock; call lock not held. */
void speed_rpc_call_release_grpc(speed_rpc_call_t *call, grpc_call *g);

/* Record the final status; start it now, or after the message in flight. Call lock held.
 * Returns SPEED_OK or SPEED_ERR_INTERNAL (the batch could not start; logged). */
speed_status_t speed_rpc_call_set_status_locked(speed_rpc_call_t *call, speed_rpc_code_t code, const char *message);

/* Run the cancel callback once, if the handler has not completed the call. The caller holds
 * a reference and no lock. */
void speed_rpc_call_fire_cancel(speed_rpc_call_t *call);

/* Completions of the call's batches, on the CQ thread: RECV_CLOSE_ON_SERVER, SEND_MESSAGE
 * (ok = the message went out) and SEND_STATUS_FROM_SERVER. */
void speed_rpc_call_close_done(speed_rpc_call_t *call);
void speed_rpc_call_send_done(speed_rpc_call_t *call, bool ok);
void speed_rpc_call_status_done(speed_rpc_call_t *call);

#endif /* SPEED_RPC_INTERNAL_H */
