/* gRPC server: one completion queue, one thread draining it, accepting calls and handing them
 * to the registered handlers; shutdown. A call's own state machine (its batches, their
 * completions, the functions a handler calls) is in rpc_call.c; rpc_internal.h has the
 * structures both use.
 *
 * Shutdown runs in two phases. Draining: calls in flight get up to the grace period to finish
 * while new calls are answered at once with UNAVAILABLE; the rest are then ended by us with
 * UNAVAILABLE. If any call finished normally in this phase, the connections stay open a
 * little longer (RPC_LINGER_MIN_MS..RPC_LINGER_MAX_MS) so that slow readers get the end of
 * their streams. Closing (the order of docs/dependencies.md §2):
 * grpc_server_shutdown_and_notify; as a backstop grpc_server_cancel_all_calls; wait until no
 * accept is pending, no call is in flight and the notify tag arrived; grpc_server_destroy;
 * grpc_completion_queue_shutdown, and the CQ thread exits on GRPC_QUEUE_SHUTDOWN;
 * grpc_completion_queue_destroy; grpc_shutdown.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <grpc/grpc_security.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"
#include "rpc_internal.h"

#define RPC_ACCEPTS_PER_METHOD 4    /* pending accepts kept armed per method */
#define RPC_CQ_POLL_MS         200  /* CQ thread wakes this often to re-arm / check */
#define RPC_BACKSTOP_MS        1000 /* after forced finishes, then cancel_all_calls */
/* Once a server has sent GOAWAY (grpc_server_shutdown_and_notify) and has no streams left,
 * gRPC closes the connection. A client still reading the tail of a finished stream keeps
 * sending window updates; they meet a closed socket, the reply is a TCP reset, and the
 * client's kernel drops the unread tail (seen in tests: 1300-1900 of 2000 messages). So no
 * GOAWAY goes out until calls that finished during the drain have had this long to be read:
 * at least RPC_LINGER_MIN_MS, and as much of the grace period as is left, up to
 * RPC_LINGER_MAX_MS. gRPC tells a server nothing of how far a client has read, hence a time. */
#define RPC_LINGER_MIN_MS      1000
#define RPC_LINGER_MAX_MS      3000

/* A call to a method nobody registered: answered UNIMPLEMENTED. */
typedef struct {
    grpc_call *gcall;
    grpc_call_details details;
    grpc_metadata_array md;
    int recv_cancelled;
    rpc_tag_t t_new, t_done;
} rpc_generic_t;

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
        speed_rpc_call_unref(call);
        return SPEED_ERR_CANCELLED;
    }
    grpc_call_error err =
        grpc_server_request_registered_call(srv->server, m->registered, &call->gcall, &call->deadline, &call->req_md,
                                            &call->payload, srv->cq, srv->cq, &call->t_accept);
    if (err == GRPC_CALL_OK) {
        m->n_pending++;
        srv->n_pending++;
    }
    pthread_mutex_unlock(&srv->lock);
    if (err != GRPC_CALL_OK) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot request calls: %s", m->path, grpc_call_error_to_string(err));
        speed_rpc_call_unref(call);
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
        err = grpc_server_request_call(srv->server, &g->gcall, &g->details, &g->md, srv->cq, srv->cq, &g->t_new);
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

/* ---- peers ------------------------------------------------------------------------------ */

/* The CN of the client certificate into call->peer. The handshake already required a certificate
 * signed by the CA; a certificate without a CN leaves "" (which no rule matches). */
static void peer_identify(speed_rpc_call_t *call) {
    call->peer[0] = '\0';
    grpc_auth_context *ctx = grpc_call_auth_context(call->gcall);
    if (!ctx) return;
    grpc_auth_property_iterator it = grpc_auth_context_find_properties_by_name(ctx, GRPC_X509_CN_PROPERTY_NAME);
    const grpc_auth_property *prop = grpc_auth_property_iterator_next(&it);
    if (prop && prop->value && prop->value_length < sizeof call->peer && !memchr(prop->value, 0, prop->value_length)) {
        memcpy(call->peer, prop->value, prop->value_length);
        call->peer[prop->value_length] = '\0';
    }
    grpc_auth_context_release(ctx);
}

static void deny(speed_rpc_call_t *call, const rpc_method_t *m) {
    char *addr = grpc_call_get_peer(call->gcall);
    SPEED_WARN(SPEED_SUBSYS_NET, "rpc %s: refused a call from '%s' at %s (allowed: %s)", m->path, call->peer,
               addr ? addr : "?", m->allow);
    gpr_free(addr);
    char msg[256];
    snprintf(msg, sizeof msg, "peer '%s' may not call %s", call->peer, m->path);
    speed_rpc_call_finish(call, SPEED_RPC_PERMISSION_DENIED, msg);
}

bool speed_rpc_peer_matches(const char *peers, const char *peer) {
    if (!peers || !peer || !peer[0]) return false;
    size_t n_peer = strlen(peer);
    for (const char *e = peers; *e;) {
        while (*e == ',' || *e == ' ') e++;
        size_t n = strcspn(e, ", ");
        if (n > 0 && n <= n_peer && memcmp(e, peer, n) == 0) {
            if (n == n_peer) return true;
            /* "<entry>-<digits>": a replica of that role */
            const char *rest = peer + n;
            if (rest[0] == '-' && rest[1]) {
                size_t digits = strspn(rest + 1, "0123456789");
                if (digits == strlen(rest + 1)) return true;
            }
        }
        e += n;
    }
    return false;
}

/* ---- accepted calls ---------------------------------------------------------------------- */

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
    if (!ok) { /* server shutting down: the accept was never matched */
        speed_rpc_call_unref(call);
        return;
    }
    rearm(srv);

    /* refs: 1 (from arming) becomes gRPC's; one more for the handler */
    speed_rpc_call_ref(call);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &call->recv_cancelled;
    pthread_mutex_lock(&call->lock);
    grpc_call_error err = grpc_call_start_batch(call->gcall, &op, 1, &call->t_close, NULL);
    if (err == GRPC_CALL_OK) {
        call->close_in_flight = true;
    } else {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc %s: cannot watch for close: %s", m->path, grpc_call_error_to_string(err));
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
    if (draining) { /* a call that arrived during the drain: the client should go elsewhere */
        speed_free(data);
        speed_rpc_call_finish(call, SPEED_RPC_UNAVAILABLE, "server shutting down");
        return;
    }
    if (srv->tls) {
        peer_identify(call);
        if (m->allow && !speed_rpc_peer_matches(m->allow, call->peer)) {
            speed_free(data);
            deny(call, m);
            return;
        }
    }
    m->handler(m->user, call, data, len);
    speed_free(data);
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
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc: cannot answer an unknown method: %s", grpc_call_error_to_string(err));
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
    case TAG_ACCEPT: on_accept(srv, tag->obj, ok); break;
    case TAG_CLOSE: speed_rpc_call_close_done(tag->obj); break;
    case TAG_SEND: speed_rpc_call_send_done(tag->obj, ok); break;
    case TAG_STATUS: speed_rpc_call_status_done(tag->obj); break;
    case TAG_GENERIC: on_generic(srv, tag->obj, ok); break;
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
        grpc_event ev = grpc_completion_queue_next(srv->cq, speed_rpc_deadline(RPC_CQ_POLL_MS), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            rearm(srv); /* recovers from allocation failures while re-arming */
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
        .tls = NULL,
    };
}

static int clamp_int(size_t v) { return v > (size_t)INT32_MAX ? INT32_MAX : (int)v; }

speed_status_t speed_rpc_server_create(const speed_rpc_server_params_t *params, speed_rpc_server_t **server_p) {
    if (!params || !server_p || !params->address || !params->address[0]) return SPEED_ERR_INVALID_ARGUMENT;
    if (params->tls && (!params->tls->ca || !params->tls->cert || !params->tls->key)) return SPEED_ERR_INVALID_ARGUMENT;
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

    grpc_server_credentials *creds = NULL;
    if (params->tls) {
        /* Mutual TLS: the handshake itself refuses a client without a certificate signed by
         * the CA, so no call from a stranger ever reaches accept. */
        grpc_ssl_pem_key_cert_pair pair = {.private_key = params->tls->key, .cert_chain = params->tls->cert};
        creds = grpc_ssl_server_credentials_create_ex(params->tls->ca, &pair, 1,
                                                      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY, NULL);
        srv->tls = true;
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    srv->port = creds ? grpc_server_add_http2_port(srv->server, params->address, creds) : 0;
    if (creds) grpc_server_credentials_release(creds);
    if (srv->port <= 0) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc: cannot listen on %s (address in use or invalid%s)", params->address,
                    params->tls ? ", or TLS credentials refused" : "");
        speed_rpc_server_destroy(srv);
        return SPEED_ERR_IO;
    }
    *server_p = srv;
    return SPEED_OK;
}

speed_status_t speed_rpc_server_add_method(speed_rpc_server_t *srv, const char *path, speed_rpc_kind_t kind,
                                           speed_rpc_handler_cb_t handler, void *user) {
    if (!srv || !path || path[0] != '/' || !handler || srv->started ||
        (kind != SPEED_RPC_UNARY && kind != SPEED_RPC_STREAM))
        return SPEED_ERR_INVALID_ARGUMENT;
    for (int i = 0; i < srv->n_methods; i++)
        if (strcmp(srv->methods[i].path, path) == 0) return SPEED_ERR_INVALID_ARGUMENT;
    rpc_method_t *methods = speed_realloc(srv->methods, (size_t)(srv->n_methods + 1) * sizeof *methods);
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
    m->registered =
        grpc_server_register_method(srv->server, m->path, NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    if (!m->registered) {
        speed_free(m->path);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    srv->n_methods++;
    return SPEED_OK;
}

speed_status_t speed_rpc_server_allow(speed_rpc_server_t *srv, const char *path, const char *peers) {
    if (!srv || !path || !peers || !peers[strspn(peers, ", ")] || srv->started) return SPEED_ERR_INVALID_ARGUMENT;
    for (int i = 0; i < srv->n_methods; i++) {
        rpc_method_t *m = &srv->methods[i];
        if (strcmp(m->path, path) != 0) continue;
        char *copy = speed_strdup(peers);
        if (!copy) return SPEED_ERR_NO_MEMORY;
        speed_free(m->allow);
        m->allow = copy;
        return SPEED_OK;
    }
    return SPEED_ERR_NOT_FOUND;
}

bool speed_rpc_server_is_tls(const speed_rpc_server_t *srv) { return srv && srv->tls; }

speed_status_t speed_rpc_server_start(speed_rpc_server_t *srv) {
    if (!srv || srv->started) return SPEED_ERR_INVALID_ARGUMENT;
    grpc_server_start(srv->server);
    srv->started = true;
    for (int i = 0; i < srv->n_methods; i++) {
        for (int k = 0; k < RPC_ACCEPTS_PER_METHOD; k++) {
            speed_status_t st = arm_method(srv, &srv->methods[i]);
            if (st != SPEED_OK) return st; /* destroy cleans up what was armed */
        }
    }
    SPEED_CHECK(arm_generic(srv));
    int rc = pthread_create(&srv->thread, NULL, cq_thread_main, srv);
    if (rc != 0) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "rpc: cannot start the server thread: %s", strerror(rc));
        return SPEED_ERR_INTERNAL;
    }
    srv->thread_started = true;
    SPEED_INFO(SPEED_SUBSYS_NET, "rpc: serving %d method(s) on port %d", srv->n_methods, srv->port);
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
static bool no_calls_locked(const speed_rpc_server_t *srv) { return srv->n_live == 0 && srv->n_generic_live == 0; }

/* Every call is over and no accept is pending. */
static bool drained_locked(const speed_rpc_server_t *srv) {
    return srv->n_live == 0 && srv->n_pending == 0 && srv->n_generic_live == 0;
}

static bool quiet_locked(const speed_rpc_server_t *srv) { return drained_locked(srv) && srv->notified; }

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
                speed_rpc_call_ref(c);
                break;
            }
        }
        pthread_mutex_unlock(&srv->lock);
        if (!victim) return;

        pthread_mutex_lock(&victim->lock);
        bool end = !victim->handler_done && !victim->cancelled;
        if (end) {
            victim->cancelled = true;
            speed_rpc_call_drop_queue_locked(victim);
        }
        if (end && !victim->peer_gone && victim->gcall && !victim->status_started) {
            if (victim->reply_bb) {
                grpc_byte_buffer_destroy(victim->reply_bb);
                victim->reply_bb = NULL;
            }
            speed_rpc_call_set_status_locked(victim, SPEED_RPC_UNAVAILABLE, "server shutting down");
        }
        grpc_call *g = speed_rpc_call_take_grpc_if_done_locked(victim);
        pthread_mutex_unlock(&victim->lock);
        if (g) speed_rpc_call_release_grpc(victim, g);
        speed_rpc_call_fire_cancel(victim);
        speed_rpc_call_unref(victim);
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
            grpc_event ev = grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
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
        pthread_join(srv->thread, NULL); /* it exits on GRPC_QUEUE_SHUTDOWN */
        srv->thread_started = false;
    } else {
        while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {}
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
    for (int i = 0; i < srv->n_methods; i++) {
        speed_free(srv->methods[i].path);
        speed_free(srv->methods[i].allow);
    }
    speed_free(srv->methods);
    pthread_mutex_destroy(&srv->lock);
    pthread_cond_destroy(&srv->changed);
    speed_free(srv);
    grpc_shutdown();
}
