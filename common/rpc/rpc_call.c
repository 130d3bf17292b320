/* A server call: the state machine behind speed_rpc_call_* (see rpc.h), and the completions
 * of its batches, which the server's CQ thread hands here.
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
 */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "alloc.h"
#include "log.h"
#include "rpc_internal.h"

/* ---- state (for rpc_server.c too) ------------------------------------------------------ */

void speed_rpc_call_ref(speed_rpc_call_t *call) { atomic_fetch_add(&call->refs, 1); }

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

void speed_rpc_call_unref(speed_rpc_call_t *call) {
    if (atomic_fetch_sub(&call->refs, 1) == 1) call_free(call);
}

void speed_rpc_call_drop_queue_locked(speed_rpc_call_t *call) {
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

/* True when gRPC's part of the call is over; the caller then runs speed_rpc_call_release_grpc after
 * unlocking. Sets gcall to NULL so that it happens once. */
grpc_call *speed_rpc_call_take_grpc_if_done_locked(speed_rpc_call_t *call) {
    if (!call->gcall || call->close_in_flight || call->send_in_flight || call->status_in_flight) return NULL;
    if (!(call->status_done || call->peer_gone)) return NULL;
    grpc_call *g = call->gcall;
    call->gcall = NULL;
    return g;
}

void speed_rpc_call_release_grpc(speed_rpc_call_t *call, grpc_call *g) {
    /* No batch is in flight any more, so these two fields are final. */
    bool clean = call->status_done && !call->peer_gone;
    speed_rpc_server_t *srv = call->server;
    pthread_mutex_lock(&srv->lock);
    if (srv->shutting_down && !srv->closing && clean && !call->forced) srv->n_ended_in_drain++;
    if (call->prev)
        call->prev->next = call->next;
    else
        srv->live = call->next;
    if (call->next) call->next->prev = call->prev;
    call->prev = call->next = NULL;
    srv->n_live--;
    if (call->active) { /* the handler is late: the call stops counting as active now */
        call->active = false;
        srv->n_active--;
    }
    pthread_cond_broadcast(&srv->changed);
    pthread_mutex_unlock(&srv->lock);
    grpc_call_unref(g);
    speed_rpc_call_unref(call); /* gRPC's reference */
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
    ops[n].data.send_status_from_server.status_details = call->fin_details_set ? &call->fin_details : NULL;
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
speed_status_t speed_rpc_call_set_status_locked(speed_rpc_call_t *call, speed_rpc_code_t code, const char *message) {
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
void speed_rpc_call_fire_cancel(speed_rpc_call_t *call) {
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

/* ---- completions of the call's batches (CQ thread) ------------------------------------ */

void speed_rpc_call_close_done(speed_rpc_call_t *call) {
    speed_rpc_call_ref(call);
    pthread_mutex_lock(&call->lock);
    call->close_in_flight = false;
    bool fire = false;
    if (call->recv_cancelled) {
        call->peer_gone = true;
        if (!call->handler_done && !call->cancelled) fire = true;
        call->cancelled = true;
        speed_rpc_call_drop_queue_locked(call);
        call->status_due = false;
    }
    pthread_mutex_unlock(&call->lock);
    if (fire) speed_rpc_call_fire_cancel(call);
    pthread_mutex_lock(&call->lock);
    grpc_call *g = speed_rpc_call_take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) speed_rpc_call_release_grpc(call, g);
    speed_rpc_call_unref(call);
}

void speed_rpc_call_send_done(speed_rpc_call_t *call, bool ok) {
    pthread_mutex_lock(&call->lock);
    call->send_in_flight = false;
    grpc_byte_buffer_destroy(call->send_bb);
    call->send_bb = NULL;
    call->n_queued--;
    if (!ok || call->peer_gone) {
        /* The stream is broken; RECV_CLOSE reports the cancellation. */
        speed_rpc_call_drop_queue_locked(call);
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
    grpc_call *g = speed_rpc_call_take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) speed_rpc_call_release_grpc(call, g);
}

void speed_rpc_call_status_done(speed_rpc_call_t *call) {
    pthread_mutex_lock(&call->lock);
    call->status_in_flight = false;
    call->status_done = true;
    if (call->reply_bb) {
        grpc_byte_buffer_destroy(call->reply_bb);
        call->reply_bb = NULL;
    }
    grpc_call *g = speed_rpc_call_take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) speed_rpc_call_release_grpc(call, g);
}

/* ---- public: calls -------------------------------------------------------------------- */

const char *speed_rpc_call_method(const speed_rpc_call_t *call) { return call ? call->method->path : ""; }

const char *speed_rpc_call_peer(const speed_rpc_call_t *call) { return call ? call->peer : ""; }

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

speed_status_t speed_rpc_call_on_cancel(speed_rpc_call_t *call, speed_rpc_cancel_cb_t cb, void *user) {
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
        if (call->q_tail)
            call->q_tail->next = m;
        else
            call->q_head = m;
        call->q_tail = m;
    }
    pthread_mutex_unlock(&call->lock);
    return st;
}

/* Mark the handler done; wait for a cancel callback running on another thread. Locked. */
static void handler_done_locked(speed_rpc_call_t *call) {
    SPEED_ASSERT(!call->handler_done); /* one terminal function per call */
    call->handler_done = true;
    while (call->cb_running && !pthread_equal(call->cb_thread, pthread_self()))
        pthread_cond_wait(&call->cb_done, &call->lock);
    call->cancel_cb = NULL;
}

static speed_status_t terminal(speed_rpc_call_t *call, const void *reply, size_t reply_len, bool has_reply,
                               speed_rpc_code_t code, const char *message) {
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
        speed_rpc_call_drop_queue_locked(call);
    } else if (has_reply && call->kind != SPEED_RPC_UNARY) {
        grpc_byte_buffer_destroy(bb);
        st = SPEED_ERR_INVALID_ARGUMENT;
        speed_rpc_call_set_status_locked(call, SPEED_RPC_INTERNAL, "reply on a streaming method");
    } else if (call->status_started) {
        if (bb) grpc_byte_buffer_destroy(bb);
        st = SPEED_ERR_INVALID_ARGUMENT;
    } else {
        call->reply_bb = bb;
        st = speed_rpc_call_set_status_locked(call, code, message);
    }
    grpc_call *g = speed_rpc_call_take_grpc_if_done_locked(call);
    pthread_mutex_unlock(&call->lock);
    if (g) speed_rpc_call_release_grpc(call, g);
    speed_rpc_call_unref(call); /* the handler's reference */
    return st;
}

speed_status_t speed_rpc_call_reply(speed_rpc_call_t *call, const void *data, size_t len) {
    if (!call) return SPEED_ERR_INVALID_ARGUMENT;
    if (!data && len) return terminal(call, NULL, 0, false, SPEED_RPC_INTERNAL, "bad reply");
    return terminal(call, data, len, true, SPEED_RPC_OK, NULL);
}

speed_status_t speed_rpc_call_finish(speed_rpc_call_t *call, speed_rpc_code_t code, const char *message) {
    if (!call) return SPEED_ERR_INVALID_ARGUMENT;
    return terminal(call, NULL, 0, false, code, message);
}

speed_status_t speed_rpc_call_fail(speed_rpc_call_t *call, speed_status_t status, const char *message) {
    return speed_rpc_call_finish(call, speed_rpc_code_from_status(status),
                                 message ? message : speed_status_string(status));
}
