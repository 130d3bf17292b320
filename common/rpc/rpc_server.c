/* gRPC server: one completion queue, one thread draining it, asynchronous handlers.
 *
 * Every call is a small state machine guarded by its own mutex. gRPC allows one batch of each
 * op type in flight per call, so a call has at most: one RECV_CLOSE_ON_SERVER (started when
 * the call is accepted; it reports cancellation), one SEND_MESSAGE batch (streams; further
 * messages wait in a queue) and one SEND_STATUS_FROM_SERVER batch (after the queue drains).
 *
 * References to a call: the handler's (until its terminal function), gRPC's (until no batch
 * is in flight and the call is over: status sent or peer gone; then grpc_call_unref and the
 * call leaves the server's list), and short-lived ones taken around callbacks. The call is
 * freed when the last goes. Lock order: a call's lock, then the server's lock (only in
 * terminal(); everywhere else they are taken one at a time).
 *
 * Shutdown runs in two phases. Draining: calls in flight get up to the grace period to finish
 * while new calls are answered at once with UNAVAILABLE; the rest are then ended by us with
 * UNAVAILABLE. If any call finished normally in this phase, the connections stay open a
 * little longer (RPC_LINGER_MIN_MS..RPC_LINGER_MAX_MS) so that slow readers get the end of
 * their streams. Closing (the order of DEPENDENCIES.md section 2):
 * grpc_server_shutdown_and_notify; as a backstop grpc_server_cancel_all_calls; wait until no
 * accept is pending, no call is in flight and the notify tag arrived; grpc_server_destroy;
 * grpc_completion_queue_shutdown, and the CQ thread exits on GRPC_QUEUE_SHUTDOWN;
 * grpc_completion_queue_destroy; grpc_shutdown.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include <grpc/grpc_security.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"
#include "rpc_internal.h"

#define RPC_ACCEPTS_PER_METHOD 4          /* pending accepts kept armed per method */
#define RPC_CQ_POLL_MS 200                /* CQ thread wakes this often to re-arm / check */
#define RPC_BACKSTOP_MS 1000              /* after forced finishes, then cancel_all_calls */
/* Once a server has sent GOAWAY (grpc_server_shutdown_and_notify) and has no streams left,
 * gRPC closes the connection. A client still reading the tail of a finished stream keeps
 * sending window updates; they meet a closed socket, the reply is a TCP reset, and the
 * client's kernel drops the unread tail (seen in tests: 1300-1900 of 2000 messages). So no
 * GOAWAY goes out until calls that finished during the drain have had this long to be read:
 * at least RPC_LINGER_MIN_MS, and as much of the grace period as is left, up to
 * RPC_LINGER_MAX_MS. gRPC tells a server nothing of how far a client has read, hence a time. */
#define RPC_LINGER_MIN_MS 1000
#define RPC_LINGER_MAX_MS 3000

typedef enum {
    TAG_ACCEPT,     /* request_registered_call completed */
    TAG_CLOSE,      /* RECV_CLOSE_ON_SERVER */
    TAG_SEND,       /* SEND_MESSAGE (+ initial metadata) */
    TAG_STATUS,     /* SEND_STATUS_FROM_SERVER (+ initial metadata, + unary reply) */
    TAG_GENERIC,    /* grpc_server_request_call for an unregistered method completed */
    TAG_GENERIC_DONE,
    TAG_SHUTDOWN,   /* grpc_server_shutdown_and_notify */
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
    void *registered;            /* grpc_server_register_method handle */
    int n_pending;               /* accepts armed (server lock) */
} rpc_method_t;

typedef struct rpc_msg {
    struct rpc_msg *next;
    grpc_byte_buffer *bb;
} rpc_msg_t;

struct speed_rpc_call {
    pthread_mutex_t lock;
    pthread_cond_t cb_done;
    atomic_int refs;
    speed_rpc_server_t *server;  /* valid while the call is in the server's list */
    rpc_method_t *method;
    speed_rpc_kind_t kind;
    struct speed_rpc_call *prev, *next;   /* server list (server lock) */
    bool active;                 /* counted in n_active (server lock) */
    bool forced;                 /* picked by force_finish_all (server lock) */

    /* filled by grpc_server_request_registered_call */
    grpc_call *gcall;            /* NULL once released */
    gpr_timespec deadline;
    grpc_metadata_array req_md;
    grpc_byte_buffer *payload;
    int recv_cancelled;          /* RECV_CLOSE_ON_SERVER output */

    rpc_tag_t t_accept, t_close, t_send, t_status;

    /* state (call lock) */
    bool close_in_flight, send_in_flight, status_in_flight;
    bool md_sent;                /* initial metadata went out with an earlier batch */
    bool status_started;         /* a status batch was started (or is due after the queue) */
    bool status_due;             /* finish requested; status goes when the send completes */
    bool status_done;
    bool peer_gone;              /* RECV_CLOSE said cancelled: no more batches */
    bool cancelled;              /* visible to the handler: peer gone or ended by shutdown */
    bool handler_done;           /* the handler called its terminal function */
    bool cb_fired, cb_running;
    pthread_t cb_thread;
    speed_rpc_code_t fin_code;
    grpc_slice fin_details;
    bool fin_details_set;
    grpc_byte_buffer *send_bb;   /* in flight on TAG_SEND */
    grpc_byte_buffer *reply_bb;  /* in flight on TAG_STATUS (unary reply) */
    rpc_msg_t *q_head, *q_tail;
    size_t n_queued;             /* queue + the one in flight */

    speed_rpc_cancel_cb_t cancel_cb;
    void *cancel_user;
    void *user;
};

/* A call to a method nobody registered: answered UNIMPLEMENTED. */
typedef struct {
    grpc_call *gcall;
    grpc_call_details details;
    grpc_metadata_array md;
    int recv_cancelled;
    rpc_tag_t t_new, t_done;
} rpc_generic_t;

struct speed_rpc_server {
    grpc_server *server;
    grpc_completion_queue *cq;
    pthread_t thread;
    bool thread_started;
    int port;
    size_t max_message_bytes;

    rpc_method_t *methods;
    int n_methods;

    pthread_mutex_t lock;
    pthread_cond_t changed;      /* any of the counters below changed */
    speed_rpc_call_t *live;      /* calls holding a grpc_call */
    int n_live;
    int n_active;                /* calls the handler has not completed */
    int n_pending;               /* accepts armed (registered + generic) */
    int n_generic_live;
    bool generic_armed;
    bool started;
    bool shutting_down;          /* draining: new calls are answered with UNAVAILABLE */
    bool closing;                /* GOAWAY sent: stop arming accepts */
    bool notified;               /* TAG_SHUTDOWN arrived */
    bool shutdown_done;
    rpc_tag_t t_shutdown;
    int n_ended_in_drain;        /* calls that finished normally while draining */
};

/* ------------------------------------------------------------------------------------- */

static void call_ref(speed_rpc_call_t *call) { atomic_fetch_add(&call->refs, 1); }

static void call_free(speed_rpc_call_t *call) {
    rpc_msg_t *m = call->q_head;
    while (m) {
        rpc_msg_t *next = m->next;
        grpc_byte_buffer_destroy(m->bb);
        speed_free(m);
        m = next;
    }
    if (call->payload) grpc_byte_buffer_destroy(call->payload);
    if (call->fin_details_set) grpc_slice_unref(call->fin_details);
    grpc_metadata_array_destroy(&call->req_md);
    pthread_mutex_destroy(&call->lock);
    pthread_cond_destroy(&call->cb_done);
    speed_free(call);
}

static void call_unref(speed_rpc_call_t *call) {
    if (atomic_fetch_sub(&call->refs, 1) == 1) call_free(call);
}

static void drop_queue_locked(speed_rpc_call_t *call) {
    rpc_msg_t *m = call->q_head;
    while (m) {
        rpc_msg_t *next = m->next;
        grpc_byte_buffer_destroy(m->bb);
        speed_free(m);
        call->n_queued--;
        m = next;
    }
    call->q_head = call->q_tail = NULL;
}

/* True when gRPC's part of the call is over; the caller then runs release_grpc after
 * unlocking. Sets gcall to NULL so that it happens once. */
static grpc_call *take_grpc_if_done_locked(speed_rpc_call_t *call) {
    if (!call->gcall || call->close_in_flight || call->send_in_flight || call->status_in_flight)
        return NULL;
    if (!(call->status_done || call->peer_gone)) return NULL;
    grpc_call *g = call->gcall;
    call->gcall = NULL;
    return g;
}

static void release_grpc(speed_rpc_call_t *call, grpc_call *g) {
    /* No batch is in flight any more, so these two fields are final. */
    bool clean = call->status_done && !call->peer_gone;
    speed_rpc_server_t *srv = call->server;
    pthread_mutex_lock(&srv->lock);
    if (srv->shutting_down && !srv->closing && clean && !call->forced) srv->n_ended_in_drain++;
    if (call->prev) call->prev->next = call->next;
    else srv->live = call->next;
    if (call->next) call->next->prev = call->prev;
    call->prev = call->next = NULL;
    srv->n_live--;
    if (call->active) {   /* the handler is late: the call stops counting as active now */
        call->active = false;
        srv->n_active--;
    }
    pthread_cond_broadcast(&srv->changed);
    pthread_mutex_unlock(&srv->lock);
    grpc_call_unref(g);
    call_unref(call);   /* gRPC's reference */
}

static speed_status_t start_status_locked(speed_rpc_call_t *call) {
    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!call->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    if (call->reply_bb) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = call->reply_bb;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.trailing_metadata_count = 0;
    ops[n].data.send_status_from_server.status = (grpc_status_code)call->fin_code;
    ops[n].data.send_status_from_server.status_details =
        call->fin_details_set ? &call->fin_details : NULL;
    n++;
    call->status_started = true;
    call->status_due = false;
    grpc_call_error err = grpc_call_start_batch(call->gcall, ops, n, &call->t_status, NULL);
    if (err != GRPC_CALL_OK) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot send status: %s", call->method->path,
                    grpc_call_error_to_string(err));
        grpc_call_cancel(call->gcall, NULL);
        call->status_done = true;
        return SPEED_ERR_INTERNAL;
    }
    call->md_sent = true;
    call->status_in_flight = true;
    return SPEED_OK;
}

static speed_status_t start_send_locked(speed_rpc_call_t *call, grpc_byte_buffer *bb) {
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!call->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = bb;
    n++;
    grpc_call_error err = grpc_call_start_batch(call->gcall, ops, n, &call->t_send, NULL);
    if (err != GRPC_CALL_OK) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot send a message: %s", call->method->path,
                    grpc_call_error_to_string(err));
        grpc_byte_buffer_destroy(bb);
        call->n_queued--;
        return SPEED_ERR_INTERNAL;
    }
    call->md_sent = true;
    call->send_in_flight = true;
    call->send_bb = bb;
    return SPEED_OK;
}

/* Record the final status; start it now, or after the message in flight. */
static speed_status_t set_status_locked(speed_rpc_call_t *call, speed_rpc_code_t code,
                                        const char *message) {
    call->fin_code = code;
    if (call->fin_details_set) grpc_slice_unref(call->fin_details);
    call->fin_details = grpc_slice_from_copied_string(message ? message : "");
    call->fin_details_set = true;
    if (call->send_in_flight) {
        call->status_due = true;
        call->status_started = true;
        return SPEED_OK;
    }
    return start_status_locked(call);
}

/* Run the cancel callback once, if the handler has not completed the call. The caller holds
 * a reference. */
static void fire_cancel(speed_rpc_call_t *call) {
    pthread_mutex_lock(&call->lock);
    if (call->handler_done || call->cb_fired || !call->cancel_cb) {
        call->cb_fired = true;
        pthread_mutex_unlock(&call->lock);
        return;
    }
    call->cb_fired = true;
    call->cb_running = true;
    call->cb_thread = pthread_self();
    speed_rpc_cancel_cb_t cb = call->cancel_cb;
    void *user = call->cancel_user;
    pthread_mutex_unlock(&call->lock);

    cb(user, call);

    pthread_mutex_lock(&call->lock);
    call->cb_running = false;
    pthread_cond_broadcast(&call->cb_done);
    pthread_mutex_unlock(&call->lock);
}

/* ---- accepting ------------------------------------------------------------------------ */

static speed_status_t arm_method(speed_rpc_server_t *srv, rpc_method_t *m) {
    speed_rpc_call_t *call = speed_calloc(1, sizeof *call);
    if (!call) return SPEED_ERR_NO_MEMORY;
    pthread_mutex_init(&call->lock, NULL);
    pthread_cond_init(&call->cb_done, NULL);
    atomic_init(&call->refs, 1);
    call->server = srv;
    call->method = m;
    call->kind = m->kind;
    grpc_metadata_array_init(&call->req_md);
    call->t_accept = (rpc_tag_t){TAG_ACCEPT, call};
    call->t_close = (rpc_tag_t){TAG_CLOSE, call};
    call->t_send = (rpc_tag_t){TAG_SEND, call};
    call->t_status = (rpc_tag_t){TAG_STATUS, call};

    pthread_mutex_lock(&srv->lock);
    if (srv->closing) {
        pthread_mutex_unlock(&srv->lock);
        call_unref(call);
        return SPEED_ERR_CANCELLED;
    }
    grpc_call_error err = grpc_server_request_registered_call(
        srv->server, m->registered, &call->gcall, &call->deadline, &call->req_md,
        &call->payload, srv->cq, srv->cq, &call->t_accept);
    if (err == GRPC_CALL_OK) {
        m->n_pending++;
        srv->n_pending++;
    }
    pthread_mutex_unlock(&srv->lock);
    if (err != GRPC_CALL_OK) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot request calls: %s", m->path,
                    grpc_call_error_to_string(err));
        call_unref(call);
        return SPEED_ERR_INTERNAL;
    }
    return SPEED_OK;
}

static speed_status_t arm_generic(speed_rpc_server_t *srv) {
    rpc_generic_t *g = speed_calloc(1, sizeof *g);
    if (!g) return SPEED_ERR_NO_MEMORY;
    grpc_call_details_init(&g->details);
    grpc_metadata_array_init(&g->md);
    g->t_new = (rpc_tag_t){TAG_GENERIC, g};
    g->t_done = (rpc_tag_t){TAG_GENERIC_DONE, g};
    pthread_mutex_lock(&srv->lock);
    grpc_call_error err = GRPC_CALL_ERROR;
    if (!srv->closing) {
        err = grpc_server_request_call(srv->server, &g->gcall, &g->details, &g->md, srv->cq,
                                       srv->cq, &g->t_new);
        if (err == GRPC_CALL_OK) {
            srv->n_pending++;
            srv->generic_armed = true;
        }
    }
    pthread_mutex_unlock(&srv->lock);
    if (err != GRPC_CALL_OK) {
        grpc_call_details_destroy(&g->details);
        grpc_metadata_array_destroy(&g->md);
        speed_free(g);
        return SPEED_ERR_INTERNAL;
    }
    return SPEED_OK;
}

/* Keep every method (and the catch-all) armed; called on the CQ thread. Allocation failures
 * are retried on the next poll. */
static void rearm(speed_rpc_server_t *srv) {
    for (int i = 0; i < srv->n_methods; i++) {
        rpc_method_t *m = &srv->methods[i];
        for (;;) {
            pthread_mutex_lock(&srv->lock);
            bool want = !srv->closing && m->n_pending < RPC_ACCEPTS_PER_METHOD;
            pthread_mutex_unlock(&srv->lock);
            if (!want || arm_method(srv, m) != SPEED_OK) break;
        }
    }
    pthread_mutex_lock(&srv->lock);
    bool want = !srv->closing && !srv->generic_armed;
    pthread_mutex_unlock(&srv->lock);
    if (want) arm_generic(srv);
}

static void on_accept(speed_rpc_server_t *srv, speed_rpc_call_t *call, bool ok) {
    rpc_method_t *m = call->method;
    pthread_mutex_lock(&srv->lock);
    m->n_pending--;
    srv->n_pending--;
    bool draining = srv->shutting_down;
    if (ok) {
        call->next = srv->live;
        if (srv->live) srv->live->prev = call;
        srv->live = call;
        srv->n_live++;
        srv->n_active++;
        call->active = true;
    }
    pthread_cond_broadcast(&srv->changed);
    pthread_mutex_unlock(&srv->lock);
    if (!ok) {   /* server shutting down: the accept was never matched */
        call_unref(call);
        return;
    }
    rearm(srv);

    /* refs: 1 (from arming) becomes gRPC's; one more for the handler */
    call_ref(call);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &call->recv_cancelled;
    pthread_mutex_lock(&call->lock);
    grpc_call_error err = grpc_call_start_batch(call->gcall, &op, 1, &call->t_close, NULL);
    if (err == GRPC_CALL_OK) {
        call->close_in_flight = true;
    } else {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot watch for close: %s", m->path,
                    grpc_call_error_to_string(err));
        grpc_call_cancel(call->gcall, NULL);
        call->peer_gone = call->cancelled = true;
    }
    pthread_mutex_unlock(&call->lock);

    uint8_t *data = NULL;
    size_t len = 0;
    speed_status_t st = SPEED_OK;
    if (call->payload) {
        st = speed_rpc_bb_copy(call->payload, &data, &len);
        grpc_byte_buffer_destroy(call->payload);
        call->payload = NULL;
    }
    if (st != SPEED_OK) {
        speed_rpc_call_fail(call, st, "cannot read the request");
        return;
    }
    if (draining) {   /* a call that arrived during the drain: the client should go elsewhere */
        speed_free(data);
        speed_rpc_call_finish(call, SPEED_RPC_UNAVAILABLE, "server shutting down");
        return;
    }
    m->handler(m->user, call, data, len);
    speed_free(data);
}

static void on_close(speed_rpc_call_t *call) {
    call_ref(call);
    pthread_mutex_lock(&call->lock);
    call->close_in_flight = false;
    bool fire = false;
    if (call->recv_cancelled) {
        call->peer_gone = true;
        if (!call->handler_done && !call->cancelled) fire = true;
        call->cancelled = true;
        drop_queue_locked(call);
        call->status_due = false;
    }
    pthread_mutex_unlock(&call->lock);
    if (fire) fire_cancel(call);
    pthread_mutex_lock(&call->lock);
    grpc_call *g = take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) release_grpc(call, g);
    call_unref(call);
}

static void on_send(speed_rpc_call_t *call, bool ok) {
    pthread_mutex_lock(&call->lock);
    call->send_in_flight = false;
    grpc_byte_buffer_destroy(call->send_bb);
    call->send_bb = NULL;
    call->n_queued--;
    if (!ok || call->peer_gone) {
        /* The stream is broken; RECV_CLOSE reports the cancellation. */
        drop_queue_locked(call);
        call->status_due = false;
    } else if (call->q_head) {
        rpc_msg_t *m = call->q_head;
        call->q_head = m->next;
        if (!call->q_head) call->q_tail = NULL;
        grpc_byte_buffer *bb = m->bb;
        speed_free(m);
        start_send_locked(call, bb);
    } else if (call->status_due) {
        start_status_locked(call);
    }
    grpc_call *g = take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) release_grpc(call, g);
}

static void on_status(speed_rpc_call_t *call) {
    pthread_mutex_lock(&call->lock);
    call->status_in_flight = false;
    call->status_done = true;
    if (call->reply_bb) {
        grpc_byte_buffer_destroy(call->reply_bb);
        call->reply_bb = NULL;
    }
    grpc_call *g = take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) release_grpc(call, g);
}

static void generic_free(rpc_generic_t *g) {
    grpc_call_details_destroy(&g->details);
    grpc_metadata_array_destroy(&g->md);
    speed_free(g);
}

static void on_generic(speed_rpc_server_t *srv, rpc_generic_t *g, bool ok) {
    pthread_mutex_lock(&srv->lock);
    srv->n_pending--;
    srv->generic_armed = false;
    if (ok) srv->n_generic_live++;
    pthread_cond_broadcast(&srv->changed);
    pthread_mutex_unlock(&srv->lock);
    if (!ok) {
        generic_free(g);
        return;
    }
    rearm(srv);
    char *method = speed_rpc_slice_strdup(g->details.method);
    SPEED_DEBUG(SPEED_SUBSYS_NET, "rpc: unknown method %s", method ? method : "?");
    speed_free(method);

    grpc_op ops[3];
    memset(ops, 0, sizeof ops);
    grpc_slice details = grpc_slice_from_static_string("unknown method");
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = GRPC_STATUS_UNIMPLEMENTED;
    ops[1].data.send_status_from_server.status_details = &details;
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &g->recv_cancelled;
    grpc_call_error err = grpc_call_start_batch(g->gcall, ops, 3, &g->t_done, NULL);
    if (err != GRPC_CALL_OK) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc: cannot answer an unknown method: %s",
                    grpc_call_error_to_string(err));
        grpc_call_cancel(g->gcall, NULL);
        grpc_call_unref(g->gcall);
        generic_free(g);
        pthread_mutex_lock(&srv->lock);
        srv->n_generic_live--;
        pthread_cond_broadcast(&srv->changed);
        pthread_mutex_unlock(&srv->lock);
    }
}

static void on_generic_done(speed_rpc_server_t *srv, rpc_generic_t *g) {
    grpc_call_unref(g->gcall);
    generic_free(g);
    pthread_mutex_lock(&srv->lock);
    srv->n_generic_live--;
    pthread_cond_broadcast(&srv->changed);
    pthread_mutex_unlock(&srv->lock);
}

static void dispatch(speed_rpc_server_t *srv, grpc_event ev) {
    rpc_tag_t *tag = ev.tag;
    bool ok = ev.success != 0;
    switch (tag->kind) {
    case TAG_ACCEPT:       on_accept(srv, tag->obj, ok); break;
    case TAG_CLOSE:        on_close(tag->obj); break;
    case TAG_SEND:         on_send(tag->obj, ok); break;
    case TAG_STATUS:       on_status(tag->obj); break;
    case TAG_GENERIC:      on_generic(srv, tag->obj, ok); break;
    case TAG_GENERIC_DONE: on_generic_done(srv, tag->obj); break;
    case TAG_SHUTDOWN:
        pthread_mutex_lock(&srv->lock);
        srv->notified = true;
        pthread_cond_broadcast(&srv->changed);
        pthread_mutex_unlock(&srv->lock);
        break;
    }
}

static void *cq_thread_main(void *arg) {
    speed_rpc_server_t *srv = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(srv->cq, speed_rpc_deadline(RPC_CQ_POLL_MS),
                                                   NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            rearm(srv);   /* recovers from allocation failures while re-arming */
            continue;
        }
        dispatch(srv, ev);
    }
    return NULL;
}

/* ---- public: server ------------------------------------------------------------------- */

speed_rpc_server_params_t speed_rpc_server_default_params(void) {
    return (speed_rpc_server_params_t){
        .address = "127.0.0.1:0",
        .max_message_bytes = SPEED_RPC_DEFAULT_MAX_MESSAGE_BYTES,
    };
}

static int clamp_int(size_t v) { return v > (size_t)INT32_MAX ? INT32_MAX : (int)v; }

speed_status_t speed_rpc_server_create(const speed_rpc_server_params_t *params,
                                       speed_rpc_server_t **server_p) {
    if (!params || !server_p || !params->address || !params->address[0])
        return SPEED_ERR_INVALID_ARGUMENT;
    *server_p = NULL;
    speed_rpc_server_t *srv = speed_calloc(1, sizeof *srv);
    if (!srv) return SPEED_ERR_NO_MEMORY;
    srv->max_message_bytes =
        params->max_message_bytes ? params->max_message_bytes : SPEED_RPC_DEFAULT_MAX_MESSAGE_BYTES;
    pthread_mutex_init(&srv->lock, NULL);
    pthread_cond_init(&srv->changed, NULL);
    srv->t_shutdown = (rpc_tag_t){TAG_SHUTDOWN, srv};

    grpc_init();
    grpc_arg args[4];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = clamp_int(srv->max_message_bytes);
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = clamp_int(srv->max_message_bytes);
    /* Clients ping every few seconds on idle streams (keepalive); do not punish them. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS;
    args[2].value.integer = 1000;
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = GRPC_ARG_HTTP2_MAX_PING_STRIKES;
    args[3].value.integer = 0;
    grpc_channel_args chargs = {.num_args = 4, .args = args};
    srv->server = grpc_server_create(&chargs, NULL);
    srv->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(srv->server, srv->cq, NULL);

    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    srv->port = grpc_server_add_http2_port(srv->server, params->address, creds);
    grpc_server_credentials_release(creds);
    if (srv->port <= 0) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc: cannot listen on %s (address in use or invalid)",
                    params->address);
        speed_rpc_server_destroy(srv);
        return SPEED_ERR_IO;
    }
    *server_p = srv;
    return SPEED_OK;
}

speed_status_t speed_rpc_server_add_method(speed_rpc_server_t *srv, const char *path,
                                           speed_rpc_kind_t kind,
                                           speed_rpc_handler_cb_t handler, void *user) {
    if (!srv || !path || path[0] != '/' || !handler || srv->started ||
        (kind != SPEED_RPC_UNARY && kind != SPEED_RPC_STREAM))
        return SPEED_ERR_INVALID_ARGUMENT;
    for (int i = 0; i < srv->n_methods; i++)
        if (strcmp(srv->methods[i].path, path) == 0) return SPEED_ERR_INVALID_ARGUMENT;
    rpc_method_t *methods =
        speed_realloc(srv->methods, (size_t)(srv->n_methods + 1) * sizeof *methods);
    if (!methods) return SPEED_ERR_NO_MEMORY;
    srv->methods = methods;
    rpc_method_t *m = &methods[srv->n_methods];
    memset(m, 0, sizeof *m);
    m->path = speed_strdup(path);
    if (!m->path) return SPEED_ERR_NO_MEMORY;
    m->kind = kind;
    m->handler = handler;
    m->user = user;
    /* gRPC keeps the method string: it lives as long as the server. */
    m->registered = grpc_server_register_method(srv->server, m->path, NULL,
                                                GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    if (!m->registered) {
        speed_free(m->path);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    srv->n_methods++;
    return SPEED_OK;
}

speed_status_t speed_rpc_server_start(speed_rpc_server_t *srv) {
    if (!srv || srv->started) return SPEED_ERR_INVALID_ARGUMENT;
    grpc_server_start(srv->server);
    srv->started = true;
    for (int i = 0; i < srv->n_methods; i++) {
        for (int k = 0; k < RPC_ACCEPTS_PER_METHOD; k++) {
            speed_status_t st = arm_method(srv, &srv->methods[i]);
            if (st != SPEED_OK) return st;   /* destroy cleans up what was armed */
        }
    }
    SPEED_CHECK(arm_generic(srv));
    int rc = pthread_create(&srv->thread, NULL, cq_thread_main, srv);
    if (rc != 0) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc: cannot start the server thread: %s", strerror(rc));
        return SPEED_ERR_INTERNAL;
    }
    srv->thread_started = true;
    SPEED_INFO(SPEED_SUBSYS_NET, "rpc: serving %d method(s) on port %d", srv->n_methods,
               srv->port);
    return SPEED_OK;
}

int speed_rpc_server_port(const speed_rpc_server_t *srv) { return srv ? srv->port : 0; }

int speed_rpc_server_active_calls(const speed_rpc_server_t *srv) {
    if (!srv) return 0;
    speed_rpc_server_t *s = (speed_rpc_server_t *)srv;
    pthread_mutex_lock(&s->lock);
    int n = s->n_active;
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* Every call is over (armed accepts may be pending). */
static bool no_calls_locked(const speed_rpc_server_t *srv) {
    return srv->n_live == 0 && srv->n_generic_live == 0;
}

/* Every call is over and no accept is pending. */
static bool drained_locked(const speed_rpc_server_t *srv) {
    return srv->n_live == 0 && srv->n_pending == 0 && srv->n_generic_live == 0;
}

static bool quiet_locked(const speed_rpc_server_t *srv) {
    return drained_locked(srv) && srv->notified;
}

/* Wait on srv->changed until pred holds or the absolute CLOCK_REALTIME deadline passes
 * (NULL = no deadline). Returns whether pred holds. */
static bool wait_until(speed_rpc_server_t *srv, bool (*pred)(const speed_rpc_server_t *),
                       const struct timespec *until) {
    pthread_mutex_lock(&srv->lock);
    while (!pred(srv)) {
        if (!until) {
            pthread_cond_wait(&srv->changed, &srv->lock);
        } else if (pthread_cond_timedwait(&srv->changed, &srv->lock, until) == ETIMEDOUT) {
            break;
        }
    }
    bool ok = pred(srv);
    pthread_mutex_unlock(&srv->lock);
    return ok;
}

/* End every call the handler still owns: cancel callback, then UNAVAILABLE to the client. */
static void force_finish_all(speed_rpc_server_t *srv) {
    for (;;) {
        speed_rpc_call_t *victim = NULL;
        pthread_mutex_lock(&srv->lock);
        for (speed_rpc_call_t *c = srv->live; c; c = c->next) {
            if (c->active && !c->forced) {
                c->forced = true;
                victim = c;
                call_ref(c);
                break;
            }
        }
        pthread_mutex_unlock(&srv->lock);
        if (!victim) return;

        pthread_mutex_lock(&victim->lock);
        bool end = !victim->handler_done && !victim->cancelled;
        if (end) {
            victim->cancelled = true;
            drop_queue_locked(victim);
        }
        if (end && !victim->peer_gone && victim->gcall && !victim->status_started) {
            if (victim->reply_bb) {
                grpc_byte_buffer_destroy(victim->reply_bb);
                victim->reply_bb = NULL;
            }
            set_status_locked(victim, SPEED_RPC_UNAVAILABLE, "server shutting down");
        }
        grpc_call *g = take_grpc_if_done_locked(victim);
        pthread_mutex_unlock(&victim->lock);
        if (g) release_grpc(victim, g);
        fire_cancel(victim);
        call_unref(victim);
    }
}

void speed_rpc_server_shutdown(speed_rpc_server_t *srv, int64_t grace_ms) {
    if (!srv) return;
    pthread_mutex_lock(&srv->lock);
    bool first = !srv->shutting_down;
    srv->shutting_down = true;
    pthread_mutex_unlock(&srv->lock);
    if (!first) {
        /* A concurrent or earlier shutdown does the work; wait for it. */
        pthread_mutex_lock(&srv->lock);
        while (!srv->shutdown_done) pthread_cond_wait(&srv->changed, &srv->lock);
        pthread_mutex_unlock(&srv->lock);
        return;
    }

    if (srv->thread_started) {
        int64_t grace_end_ms = speed_clock_mono_ms() + (grace_ms > 0 ? grace_ms : 0);
        if (grace_ms > 0) {
            /* wait for calls to be over on the wire, not just completed by their handlers:
             * a finished stream may still be flushing its queue to a slow reader */
            struct timespec until = speed_clock_deadline(CLOCK_REALTIME, grace_ms);
            wait_until(srv, no_calls_locked, &until);
        }
        force_finish_all(srv);
        struct timespec until = speed_clock_deadline(CLOCK_REALTIME, RPC_BACKSTOP_MS);
        wait_until(srv, no_calls_locked, &until);
        pthread_mutex_lock(&srv->lock);
        int n_ended = srv->n_ended_in_drain;
        pthread_mutex_unlock(&srv->lock);
        if (n_ended > 0) {
            int64_t grace_left = grace_end_ms - speed_clock_mono_ms();
            int64_t hold = grace_left < RPC_LINGER_MIN_MS   ? RPC_LINGER_MIN_MS
                           : grace_left > RPC_LINGER_MAX_MS ? RPC_LINGER_MAX_MS
                                                            : grace_left;
            speed_clock_sleep_ms(hold);
        }
    }

    pthread_mutex_lock(&srv->lock);
    srv->closing = true;
    pthread_mutex_unlock(&srv->lock);
    grpc_server_shutdown_and_notify(srv->server, srv->cq, &srv->t_shutdown);
    if (!srv->thread_started) {
        /* Never started (or start failed): drain here until gRPC returns every tag. */
        grpc_server_cancel_all_calls(srv->server);
        for (;;) {
            pthread_mutex_lock(&srv->lock);
            bool quiet = quiet_locked(srv);
            pthread_mutex_unlock(&srv->lock);
            if (quiet) break;
            grpc_event ev = grpc_completion_queue_next(srv->cq,
                                                       gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            if (ev.type == GRPC_OP_COMPLETE) dispatch(srv, ev);
        }
    } else {
        /* calls that slipped in before GOAWAY are ended like the rest */
        force_finish_all(srv);
        struct timespec until = speed_clock_deadline(CLOCK_REALTIME, RPC_BACKSTOP_MS);
        if (!wait_until(srv, quiet_locked, &until)) {
            grpc_server_cancel_all_calls(srv->server);
            wait_until(srv, quiet_locked, NULL);
        }
    }
    grpc_server_destroy(srv->server);
    srv->server = NULL;
    grpc_completion_queue_shutdown(srv->cq);
    if (srv->thread_started) {
        pthread_join(srv->thread, NULL);   /* it exits on GRPC_QUEUE_SHUTDOWN */
        srv->thread_started = false;
    } else {
        while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL)
                   .type != GRPC_QUEUE_SHUTDOWN) {
        }
    }
    grpc_completion_queue_destroy(srv->cq);
    srv->cq = NULL;
    pthread_mutex_lock(&srv->lock);
    srv->shutdown_done = true;
    pthread_cond_broadcast(&srv->changed);
    pthread_mutex_unlock(&srv->lock);
}

void speed_rpc_server_destroy(speed_rpc_server_t *srv) {
    if (!srv) return;
    if (srv->server) speed_rpc_server_shutdown(srv, 0);
    for (int i = 0; i < srv->n_methods; i++) speed_free(srv->methods[i].path);
    speed_free(srv->methods);
    pthread_mutex_destroy(&srv->lock);
    pthread_cond_destroy(&srv->changed);
    speed_free(srv);
    grpc_shutdown();
}

/* ---- public: calls -------------------------------------------------------------------- */

const char *speed_rpc_call_method(const speed_rpc_call_t *call) {
    return call ? call->method->path : "";
}

void speed_rpc_call_set_user(speed_rpc_call_t *call, void *user) {
    pthread_mutex_lock(&call->lock);
    call->user = user;
    pthread_mutex_unlock(&call->lock);
}

void *speed_rpc_call_user(const speed_rpc_call_t *call) {
    speed_rpc_call_t *c = (speed_rpc_call_t *)call;
    pthread_mutex_lock(&c->lock);
    void *user = c->user;
    pthread_mutex_unlock(&c->lock);
    return user;
}

speed_status_t speed_rpc_call_on_cancel(speed_rpc_call_t *call, speed_rpc_cancel_cb_t cb,
                                        void *user) {
    if (!call) return SPEED_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&call->lock);
    speed_status_t st = SPEED_OK;
    if (call->cancelled) {
        st = SPEED_ERR_CANCELLED;
    } else {
        call->cancel_cb = cb;
        call->cancel_user = user;
    }
    pthread_mutex_unlock(&call->lock);
    return st;
}

bool speed_rpc_call_is_cancelled(const speed_rpc_call_t *call) {
    speed_rpc_call_t *c = (speed_rpc_call_t *)call;
    pthread_mutex_lock(&c->lock);
    bool cancelled = c->cancelled;
    pthread_mutex_unlock(&c->lock);
    return cancelled;
}

size_t speed_rpc_call_queued(const speed_rpc_call_t *call) {
    speed_rpc_call_t *c = (speed_rpc_call_t *)call;
    pthread_mutex_lock(&c->lock);
    size_t n = c->n_queued;
    pthread_mutex_unlock(&c->lock);
    return n;
}

speed_status_t speed_rpc_call_send(speed_rpc_call_t *call, const void *data, size_t len) {
    if (!call || (!data && len)) return SPEED_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&call->lock);
    speed_status_t st = SPEED_OK;
    if (call->kind != SPEED_RPC_STREAM || call->handler_done || call->status_started) {
        st = call->cancelled ? SPEED_ERR_CANCELLED : SPEED_ERR_INVALID_ARGUMENT;
    } else if (call->cancelled || !call->gcall) {
        st = SPEED_ERR_CANCELLED;
    }
    pthread_mutex_unlock(&call->lock);
    if (st != SPEED_OK) return st;

    rpc_msg_t *m = speed_malloc(sizeof *m);
    if (!m) return SPEED_ERR_NO_MEMORY;
    m->next = NULL;
    m->bb = speed_rpc_bb_from(data, len);

    pthread_mutex_lock(&call->lock);
    if (call->cancelled || !call->gcall || call->status_started || call->handler_done) {
        /* cancelled while we copied */
        pthread_mutex_unlock(&call->lock);
        grpc_byte_buffer_destroy(m->bb);
        speed_free(m);
        return SPEED_ERR_CANCELLED;
    }
    call->n_queued++;
    if (!call->send_in_flight) {
        grpc_byte_buffer *bb = m->bb;
        speed_free(m);
        st = start_send_locked(call, bb);
    } else {
        if (call->q_tail) call->q_tail->next = m;
        else call->q_head = m;
        call->q_tail = m;
    }
    pthread_mutex_unlock(&call->lock);
    return st;
}

/* Mark the handler done; wait for a cancel callback running on another thread. Locked. */
static void handler_done_locked(speed_rpc_call_t *call) {
    SPEED_ASSERT(!call->handler_done);   /* one terminal function per call */
    call->handler_done = true;
    while (call->cb_running && !pthread_equal(call->cb_thread, pthread_self()))
        pthread_cond_wait(&call->cb_done, &call->lock);
    call->cancel_cb = NULL;
}

static speed_status_t terminal(speed_rpc_call_t *call, const void *reply, size_t reply_len,
                               bool has_reply, speed_rpc_code_t code, const char *message) {
    grpc_byte_buffer *bb = has_reply ? speed_rpc_bb_from(reply, reply_len) : NULL;
    pthread_mutex_lock(&call->lock);
    handler_done_locked(call);
    if (call->gcall) {
        /* Still in the server's list (release needs this lock), so the server is alive. */
        speed_rpc_server_t *srv = call->server;
        pthread_mutex_lock(&srv->lock);
        if (call->active) {
            call->active = false;
            srv->n_active--;
            pthread_cond_broadcast(&srv->changed);
        }
        pthread_mutex_unlock(&srv->lock);
    }
    speed_status_t st = SPEED_OK;
    if (call->cancelled || !call->gcall || call->peer_gone) {
        st = SPEED_ERR_CANCELLED;
        if (bb) grpc_byte_buffer_destroy(bb);
        drop_queue_locked(call);
    } else if (has_reply && call->kind != SPEED_RPC_UNARY) {
        grpc_byte_buffer_destroy(bb);
        st = SPEED_ERR_INVALID_ARGUMENT;
        set_status_locked(call, SPEED_RPC_INTERNAL, "reply on a streaming method");
    } else if (call->status_started) {
        if (bb) grpc_byte_buffer_destroy(bb);
        st = SPEED_ERR_INVALID_ARGUMENT;
    } else {
        call->reply_bb = bb;
        st = set_status_locked(call, code, message);
    }
    grpc_call *g = take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) release_grpc(call, g);
    call_unref(call);   /* the handler's reference */
    return st;
}

speed_status_t speed_rpc_call_reply(speed_rpc_call_t *call, const void *data, size_t len) {
    if (!call) return SPEED_ERR_INVALID_ARGUMENT;
    if (!data && len) return terminal(call, NULL, 0, false, SPEED_RPC_INTERNAL, "bad reply");
    return terminal(call, data, len, true, SPEED_RPC_OK, NULL);
}

speed_status_t speed_rpc_call_finish(speed_rpc_call_t *call, speed_rpc_code_t code,
                                     const char *message) {
    if (!call) return SPEED_ERR_INVALID_ARGUMENT;
    return terminal(call, NULL, 0, false, code, message);
}

speed_status_t speed_rpc_call_fail(speed_rpc_call_t *call, speed_status_t status,
                                   const char *message) {
    return speed_rpc_call_finish(call, speed_rpc_code_from_status(status),
                                 message ? message : speed_status_string(status));
}
