/* gRPC client: a shared channel; every call on its own completion queue.
 *
 * Unary calls start all six ops in one batch and wait for its single tag. Their completion
 * queues (for `next`, used by one thread at a time, so the pluck queue's limit of 6 waiters
 * never applies) are recycled through a small free list on the channel (creating one costs
 * a few allocations and a pollset). Streams own their queue: a start batch (send request, close,
 * receive initial metadata), a RECV_STATUS_ON_CLIENT batch started at once, and one
 * RECV_MESSAGE batch at a time; a NULL message means end of stream.
 */
#include <pthread.h>
#include <string.h>

#include <grpc/grpc_security.h>

#include "alloc.h"
#include "log.h"
#include "rpc_internal.h"

#define RPC_CQ_CACHE 64 /* idle unary completion queues kept per channel */

struct speed_rpc_channel {
    grpc_channel *channel;
    bool wait_for_ready;
    pthread_mutex_t lock;
    grpc_completion_queue *cq_free[RPC_CQ_CACHE];
    int n_cq_free;
};

struct speed_rpc_stream {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_byte_buffer *send_bb;
    grpc_byte_buffer *recv_bb;
    grpc_metadata_array md_initial, md_trailing;
    grpc_status_code status;
    grpc_slice details;
    const char *error_string;
    int n_outstanding; /* batches whose tag has not come back */
    bool recv_in_flight, messages_done, status_done, ended;
    speed_rpc_code_t code;
    char *message;
    char t_start, t_status, t_recv; /* tags: their addresses */
};

static void cq_drain_destroy(grpc_completion_queue *cq) {
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN) {}
    grpc_completion_queue_destroy(cq);
}

speed_rpc_channel_params_t speed_rpc_channel_default_params(void) {
    return (speed_rpc_channel_params_t){
        .max_message_bytes = SPEED_RPC_DEFAULT_MAX_MESSAGE_BYTES,
        .wait_for_ready = false,
        .keepalive_ms = 10000,
        .max_reconnect_backoff_ms = 1000,
        .tls = NULL,
        .tls_server_name = NULL,
    };
}

speed_status_t speed_rpc_channel_create(const char *target, const speed_rpc_channel_params_t *params,
                                        speed_rpc_channel_t **channel_p) {
    if (!target || !target[0] || !channel_p) return SPEED_ERR_INVALID_ARGUMENT;
    *channel_p = NULL;
    speed_rpc_channel_params_t p = params ? *params : speed_rpc_channel_default_params();
    if (p.keepalive_ms < 0 || p.max_reconnect_backoff_ms < 0) return SPEED_ERR_INVALID_ARGUMENT;
    if (p.tls && (!p.tls->ca || !p.tls->cert != !p.tls->key)) return SPEED_ERR_INVALID_ARGUMENT;
    size_t max_bytes = p.max_message_bytes ? p.max_message_bytes : SPEED_RPC_DEFAULT_MAX_MESSAGE_BYTES;
    int max_int = max_bytes > (size_t)INT32_MAX ? INT32_MAX : (int)max_bytes;

    speed_rpc_channel_t *ch = speed_calloc(1, sizeof *ch);
    if (!ch) return SPEED_ERR_NO_MEMORY;
    ch->wait_for_ready = p.wait_for_ready;
    pthread_mutex_init(&ch->lock, NULL);

    grpc_arg args[10];
    memset(args, 0, sizeof args);
    size_t n = 0;
#define ADD_INT(k, v)                    \
    do {                                 \
        args[n].type = GRPC_ARG_INTEGER; \
        args[n].key = (char *)(k);       \
        args[n].value.integer = (v);     \
        n++;                             \
    } while (0)
    ADD_INT(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, max_int);
    ADD_INT(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, max_int);
    /* No transparent retries: callers decide (and retry buffering copies every request). */
    ADD_INT(GRPC_ARG_ENABLE_RETRIES, 0);
    if (p.keepalive_ms > 0) {
        ADD_INT(GRPC_ARG_KEEPALIVE_TIME_MS, p.keepalive_ms);
        ADD_INT(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, p.keepalive_ms < 5000 ? p.keepalive_ms : 5000);
        ADD_INT(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    }
    if (p.max_reconnect_backoff_ms > 0) {
        int initial = p.max_reconnect_backoff_ms < 100 ? p.max_reconnect_backoff_ms : 100;
        ADD_INT(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, initial);
        ADD_INT(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, p.max_reconnect_backoff_ms);
        /* Despite its name, gRPC core uses this as the floor of each connection attempt's
         * deadline (TCP connect + TLS handshake + HTTP/2 settings), not of the backoff. At the
         * 100 ms backoff it cut every attempt short on a loaded host or a distant one, and a
         * node looked down for seconds (tests/common/rpc/test_rpc_tls.c, test_slow_link). */
        ADD_INT(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, SPEED_RPC_CONNECT_TIMEOUT_MS);
    }
#undef ADD_INT
    if (p.tls && p.tls_server_name) {
        args[n].type = GRPC_ARG_STRING;
        args[n].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[n].value.string = (char *)p.tls_server_name;
        n++;
    }
    grpc_channel_args chargs = {.num_args = n, .args = args};

    grpc_init();
    grpc_channel_credentials *creds = NULL;
    if (p.tls) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = p.tls->key, .cert_chain = p.tls->cert};
        creds = grpc_ssl_credentials_create(p.tls->ca, p.tls->cert ? &pair : NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    ch->channel = creds ? grpc_channel_create(target, creds, &chargs) : NULL;
    if (creds) grpc_channel_credentials_release(creds);
    if (!ch->channel) {
        pthread_mutex_destroy(&ch->lock);
        speed_free(ch);
        grpc_shutdown();
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    *channel_p = ch;
    return SPEED_OK;
}

void speed_rpc_channel_destroy(speed_rpc_channel_t *ch) {
    if (!ch) return;
    grpc_channel_destroy(ch->channel);
    for (int i = 0; i < ch->n_cq_free; i++) cq_drain_destroy(ch->cq_free[i]);
    pthread_mutex_destroy(&ch->lock);
    speed_free(ch);
    grpc_shutdown();
}

static grpc_completion_queue *cq_acquire(speed_rpc_channel_t *ch) {
    grpc_completion_queue *cq = NULL;
    pthread_mutex_lock(&ch->lock);
    if (ch->n_cq_free > 0) cq = ch->cq_free[--ch->n_cq_free];
    pthread_mutex_unlock(&ch->lock);
    return cq ? cq : grpc_completion_queue_create_for_next(NULL);
}

static void cq_release(speed_rpc_channel_t *ch, grpc_completion_queue *cq) {
    pthread_mutex_lock(&ch->lock);
    bool kept = ch->n_cq_free < RPC_CQ_CACHE;
    if (kept) ch->cq_free[ch->n_cq_free++] = cq;
    pthread_mutex_unlock(&ch->lock);
    if (!kept) cq_drain_destroy(cq);
}

static gpr_timespec call_deadline(int64_t timeout_ms) { return speed_rpc_deadline(timeout_ms > 0 ? timeout_ms : -1); }

static uint32_t initial_md_flags(const speed_rpc_channel_t *ch) {
    return ch->wait_for_ready
               ? GRPC_INITIAL_METADATA_WAIT_FOR_READY | GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET
               : 0;
}

static grpc_call *create_call(speed_rpc_channel_t *ch, grpc_completion_queue *cq, const char *method,
                              int64_t timeout_ms) {
    grpc_slice path = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, path, NULL,
                                               call_deadline(timeout_ms), NULL);
    grpc_slice_unref(path);
    return call;
}

/* Status message: the server's details, or gRPC's own description of a local failure. */
static char *status_message(grpc_slice details, const char *error_string) {
    if (GRPC_SLICE_LENGTH(details) == 0 && error_string) return speed_strdup(error_string);
    return speed_rpc_slice_strdup(details);
}

void speed_rpc_reply_cleanup(speed_rpc_reply_t *reply) {
    if (!reply) return;
    speed_free(reply->message);
    speed_free(reply->data);
    memset(reply, 0, sizeof *reply);
}

/* Fill a reply for a failure that happened before gRPC ran the call. */
static speed_status_t local_failure(speed_rpc_reply_t *reply, speed_rpc_code_t code, const char *message,
                                    speed_status_t status) {
    reply->code = code;
    reply->message = speed_strdup(message);
    return reply->message ? status : SPEED_ERR_NO_MEMORY;
}

speed_status_t speed_rpc_unary(speed_rpc_channel_t *ch, const char *method, const void *request, size_t len,
                               int64_t timeout_ms, speed_rpc_reply_t *reply) {
    if (!reply) return SPEED_ERR_INVALID_ARGUMENT;
    memset(reply, 0, sizeof *reply);
    if (!ch || !method || (!request && len))
        return local_failure(reply, SPEED_RPC_INVALID_ARGUMENT, "bad arguments", SPEED_ERR_INVALID_ARGUMENT);

    grpc_completion_queue *cq = cq_acquire(ch);
    grpc_call *call = create_call(ch, cq, method, timeout_ms);
    grpc_byte_buffer *send_bb = speed_rpc_bb_from(request, len);
    grpc_byte_buffer *recv_bb = NULL;
    grpc_metadata_array md_initial, md_trailing;
    grpc_metadata_array_init(&md_initial);
    grpc_metadata_array_init(&md_trailing);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].flags = initial_md_flags(ch);
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &md_trailing;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    ops[5].data.recv_status_on_client.error_string = &error_string;

    speed_status_t st;
    char tag;
    grpc_call_error err = grpc_call_start_batch(call, ops, 6, &tag, NULL);
    if (err != GRPC_CALL_OK) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot start the call: %s", method, grpc_call_error_to_string(err));
        st = local_failure(reply, SPEED_RPC_INTERNAL, grpc_call_error_to_string(err), SPEED_ERR_INTERNAL);
    } else {
        /* The queue is this call's alone, so its only event is our tag. */
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        SPEED_ASSERT(ev.type == GRPC_OP_COMPLETE && ev.tag == &tag);
        reply->code = (speed_rpc_code_t)status;
        reply->message = status_message(details, error_string);
        st = reply->message ? speed_rpc_code_to_status(status) : SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK && recv_bb) {
            st = speed_rpc_bb_copy(recv_bb, &reply->data, &reply->len);
            if (st != SPEED_OK) {
                speed_free(reply->message);
                reply->message = NULL;
                local_failure(reply, SPEED_RPC_RESOURCE_EXHAUSTED, "cannot copy the reply", st);
            }
        }
    }

    if (recv_bb) grpc_byte_buffer_destroy(recv_bb);
    grpc_byte_buffer_destroy(send_bb);
    grpc_slice_unref(details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&md_initial);
    grpc_metadata_array_destroy(&md_trailing);
    grpc_call_unref(call);
    cq_release(ch, cq);
    return st;
}

/* ---- streams -------------------------------------------------------------------------- */

speed_status_t speed_rpc_stream_open(speed_rpc_channel_t *ch, const char *method, const void *request, size_t len,
                                     int64_t timeout_ms, speed_rpc_stream_t **stream_p) {
    if (!stream_p) return SPEED_ERR_INVALID_ARGUMENT;
    *stream_p = NULL;
    if (!ch || !method || (!request && len)) return SPEED_ERR_INVALID_ARGUMENT;
    speed_rpc_stream_t *s = speed_calloc(1, sizeof *s);
    if (!s) return SPEED_ERR_NO_MEMORY;
    s->cq = grpc_completion_queue_create_for_next(NULL);
    s->call = create_call(ch, s->cq, method, timeout_ms);
    s->send_bb = speed_rpc_bb_from(request, len);
    grpc_metadata_array_init(&s->md_initial);
    grpc_metadata_array_init(&s->md_trailing);
    s->details = grpc_empty_slice();
    s->status = GRPC_STATUS_UNKNOWN;
    s->code = SPEED_RPC_UNKNOWN;

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].flags = initial_md_flags(ch);
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = s->send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_initial;
    grpc_call_error err = grpc_call_start_batch(s->call, ops, 4, &s->t_start, NULL);
    if (err == GRPC_CALL_OK) {
        s->n_outstanding++;
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[0].data.recv_status_on_client.trailing_metadata = &s->md_trailing;
        ops[0].data.recv_status_on_client.status = &s->status;
        ops[0].data.recv_status_on_client.status_details = &s->details;
        ops[0].data.recv_status_on_client.error_string = &s->error_string;
        err = grpc_call_start_batch(s->call, ops, 1, &s->t_status, NULL);
        if (err == GRPC_CALL_OK) s->n_outstanding++;
    }
    if (err != GRPC_CALL_OK) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot start the stream: %s", method, grpc_call_error_to_string(err));
        s->ended = true;
        speed_rpc_stream_close(s);
        return SPEED_ERR_INTERNAL;
    }
    *stream_p = s;
    return SPEED_OK;
}

static void stream_end(speed_rpc_stream_t *s, speed_rpc_code_t code, const char *message) {
    s->ended = true;
    s->code = code;
    speed_free(s->message);
    s->message = speed_strdup(message);
}

/* Handle one event of the stream's queue. Returns true when it delivered a message. */
static bool stream_event(speed_rpc_stream_t *s, grpc_event ev, uint8_t **data_p, size_t *len_p) {
    s->n_outstanding--;
    if (ev.tag == &s->t_start) {
        grpc_byte_buffer_destroy(s->send_bb);
        s->send_bb = NULL;
    } else if (ev.tag == &s->t_status) {
        s->status_done = true;
    } else if (ev.tag == &s->t_recv) {
        s->recv_in_flight = false;
        if (!ev.success || !s->recv_bb) {
            s->messages_done = true;
        } else {
            grpc_byte_buffer *bb = s->recv_bb;
            s->recv_bb = NULL;
            speed_status_t st = speed_rpc_bb_copy(bb, data_p, len_p);
            grpc_byte_buffer_destroy(bb);
            if (st == SPEED_OK) return true;
            grpc_call_cancel(s->call, NULL);
            s->messages_done = true;
            if (!s->ended) stream_end(s, SPEED_RPC_RESOURCE_EXHAUSTED, "cannot copy a message");
        }
    }
    return false;
}

speed_rpc_next_t speed_rpc_stream_next(speed_rpc_stream_t *s, int64_t wait_ms, uint8_t **data_p, size_t *len_p) {
    *data_p = NULL;
    *len_p = 0;
    gpr_timespec until = speed_rpc_deadline(wait_ms);
    for (;;) {
        if (s->ended) return SPEED_RPC_NEXT_END;
        if (s->messages_done && s->status_done) {
            char *msg = status_message(s->details, s->error_string);
            stream_end(s, (speed_rpc_code_t)s->status, msg ? msg : "");
            speed_free(msg);
            return SPEED_RPC_NEXT_END;
        }
        if (!s->messages_done && !s->recv_in_flight) {
            grpc_op op;
            memset(&op, 0, sizeof op);
            op.op = GRPC_OP_RECV_MESSAGE;
            op.data.recv_message.recv_message = &s->recv_bb;
            grpc_call_error err = grpc_call_start_batch(s->call, &op, 1, &s->t_recv, NULL);
            if (err != GRPC_CALL_OK) {
                s->messages_done = true; /* the status batch still reports how it ended */
                continue;
            }
            s->recv_in_flight = true;
            s->n_outstanding++;
        }
        grpc_event ev = grpc_completion_queue_next(s->cq, until, NULL);
        if (ev.type == GRPC_QUEUE_TIMEOUT) return SPEED_RPC_NEXT_WAIT;
        SPEED_ASSERT(ev.type == GRPC_OP_COMPLETE);
        if (stream_event(s, ev, data_p, len_p)) return SPEED_RPC_NEXT_MESSAGE;
    }
}

speed_rpc_code_t speed_rpc_stream_status(const speed_rpc_stream_t *s, const char **message_p) {
    if (message_p) *message_p = s->ended && s->message ? s->message : "";
    return s->ended ? s->code : SPEED_RPC_UNKNOWN;
}

void speed_rpc_stream_cancel(speed_rpc_stream_t *s) {
    if (s && s->call) grpc_call_cancel(s->call, NULL);
}

void speed_rpc_stream_close(speed_rpc_stream_t *s) {
    if (!s) return;
    if (s->call) {
        if (!(s->messages_done && s->status_done)) grpc_call_cancel(s->call, NULL);
        while (s->n_outstanding > 0) {
            grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            SPEED_ASSERT(ev.type == GRPC_OP_COMPLETE);
            uint8_t *data = NULL;
            size_t len = 0;
            if (stream_event(s, ev, &data, &len)) speed_free(data);
        }
        grpc_call_unref(s->call);
    }
    cq_drain_destroy(s->cq);
    if (s->send_bb) grpc_byte_buffer_destroy(s->send_bb);
    if (s->recv_bb) grpc_byte_buffer_destroy(s->recv_bb);
    grpc_metadata_array_destroy(&s->md_initial);
    grpc_metadata_array_destroy(&s->md_trailing);
    grpc_slice_unref(s->details);
    gpr_free((void *)s->error_string);
    speed_free(s->message);
    speed_free(s);
}
