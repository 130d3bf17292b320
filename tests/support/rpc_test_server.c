/* The loopback test server of the speed_rpc tests: see rpc_test_server.h. */
#include "rpc_test_server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "test_clock.h"

/* One call's context, owned by whichever thread completes the call. */
typedef struct {
    tserver_t *ts;
    speed_rpc_call_t *call;
    uint8_t *data;
    size_t len;
    atomic_int cancelled;
} tctx_t;

static tctx_t *tctx_new(tserver_t *ts, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    tctx_t *c = speed_calloc(1, sizeof *c);
    if (!c) abort();
    c->ts = ts;
    c->call = call;
    if (len) {
        c->data = speed_malloc(len);
        if (!c->data) abort();
        memcpy(c->data, data, len);
        c->len = len;
    }
    atomic_fetch_add(&ts->live_contexts, 1);
    return c;
}

static void tctx_free(tctx_t *c) {
    atomic_fetch_sub(&c->ts->live_contexts, 1);
    speed_free(c->data);
    speed_free(c);
}

static void tserver_spawn(tserver_t *ts, void *(*fn)(void *), void *arg) {
    pthread_mutex_lock(&ts->lock);
    if (ts->n_threads >= (int)(sizeof ts->threads / sizeof ts->threads[0])) abort();
    if (pthread_create(&ts->threads[ts->n_threads], NULL, fn, arg) != 0) abort();
    ts->n_threads++;
    pthread_mutex_unlock(&ts->lock);
}

static void h_unary(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    (void)user;
    speed_rpc_call_reply(call, req, len);
}

static void *later_main(void *arg) {
    tctx_t *c = arg;
    sleep_ms(2);
    speed_rpc_call_reply(c->call, c->data, c->len);
    tctx_free(c);
    return NULL;
}

static void h_later(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    tserver_t *ts = user;
    tserver_spawn(ts, later_main, tctx_new(ts, call, req, len));
}

static void h_fail(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    (void)user;
    speed_status_t st = len ? (speed_status_t)(-(int)req[0]) : SPEED_ERR_INTERNAL;
    speed_rpc_call_fail(call, st, "test failure");
}

static void hang_cancelled(void *user, speed_rpc_call_t *call) {
    tctx_t *c = user;
    atomic_fetch_add(&c->ts->cancel_fired, 1);
    if (speed_rpc_call_fail(call, SPEED_ERR_CANCELLED, "cancelled") == SPEED_ERR_CANCELLED)
        atomic_fetch_add(&c->ts->finish_cancelled, 1);
    tctx_free(c);
}

static void h_hang(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    tserver_t *ts = user;
    tctx_t *c = tctx_new(ts, call, req, len);
    if (speed_rpc_call_on_cancel(call, hang_cancelled, c) != SPEED_OK) {
        speed_rpc_call_fail(call, SPEED_ERR_CANCELLED, "cancelled");
        tctx_free(c);
    }
}

static void *count_main(void *arg) {
    tctx_t *c = arg;
    char buf[32];
    memcpy(buf, c->data, c->len < sizeof buf - 1 ? c->len : sizeof buf - 1);
    buf[c->len < sizeof buf - 1 ? c->len : sizeof buf - 1] = '\0';
    int n = atoi(buf);
    for (int i = 0; i < n; i++) {
        char msg[32];
        int k = snprintf(msg, sizeof msg, "%d", i);
        if (speed_rpc_call_send(c->call, msg, (size_t)k) != SPEED_OK) break;
    }
    speed_rpc_call_finish(c->call, SPEED_RPC_OK, NULL);
    atomic_fetch_add(&c->ts->streams_ended, 1);
    tctx_free(c);
    return NULL;
}

static void h_count(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    tserver_t *ts = user;
    tserver_spawn(ts, count_main, tctx_new(ts, call, req, len));
}

static void endless_cancelled(void *user, speed_rpc_call_t *call) {
    tctx_t *c = user;
    (void)call;
    atomic_fetch_add(&c->ts->cancel_fired, 1);
    atomic_store(&c->cancelled, 1);
}

static void *endless_main(void *arg) {
    tctx_t *c = arg;
    char msg[256];
    memset(msg, 'x', sizeof msg);
    for (int i = 0; !atomic_load(&c->cancelled); i++) {
        /* keep the queue short, as a real producer would */
        if (speed_rpc_call_queued(c->call) < 8 && speed_rpc_call_send(c->call, msg, sizeof msg) == SPEED_ERR_CANCELLED)
            break;
        sleep_ms(1);
    }
    if (speed_rpc_call_finish(c->call, SPEED_RPC_OK, NULL) == SPEED_ERR_CANCELLED)
        atomic_fetch_add(&c->ts->finish_cancelled, 1);
    atomic_fetch_add(&c->ts->streams_ended, 1);
    tctx_free(c);
    return NULL;
}

static void h_endless(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    tserver_t *ts = user;
    tctx_t *c = tctx_new(ts, call, req, len);
    if (speed_rpc_call_on_cancel(call, endless_cancelled, c) != SPEED_OK) atomic_store(&c->cancelled, 1);
    tserver_spawn(ts, endless_main, c);
}

static void h_idle(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    tserver_t *ts = user;
    tctx_t *c = tctx_new(ts, call, req, len);
    speed_rpc_call_send(call, "idle", 4);
    if (speed_rpc_call_on_cancel(call, hang_cancelled, c) != SPEED_OK) {
        speed_rpc_call_fail(call, SPEED_ERR_CANCELLED, "cancelled");
        tctx_free(c);
    }
}

speed_status_t tserver_start(tserver_t *ts, size_t max_message_bytes) {
    memset(ts, 0, sizeof *ts);
    pthread_mutex_init(&ts->lock, NULL);
    speed_rpc_server_params_t p = speed_rpc_server_default_params();
    p.max_message_bytes = max_message_bytes;
    SPEED_CHECK(speed_rpc_server_create(&p, &ts->server));
    SPEED_CHECK(speed_rpc_server_add_method(ts->server, T_UNARY, SPEED_RPC_UNARY, h_unary, ts));
    SPEED_CHECK(speed_rpc_server_add_method(ts->server, T_LATER, SPEED_RPC_UNARY, h_later, ts));
    SPEED_CHECK(speed_rpc_server_add_method(ts->server, T_FAIL, SPEED_RPC_UNARY, h_fail, ts));
    SPEED_CHECK(speed_rpc_server_add_method(ts->server, T_HANG, SPEED_RPC_UNARY, h_hang, ts));
    SPEED_CHECK(speed_rpc_server_add_method(ts->server, T_COUNT, SPEED_RPC_STREAM, h_count, ts));
    SPEED_CHECK(speed_rpc_server_add_method(ts->server, T_ENDLESS, SPEED_RPC_STREAM, h_endless, ts));
    SPEED_CHECK(speed_rpc_server_add_method(ts->server, T_IDLE, SPEED_RPC_STREAM, h_idle, ts));
    SPEED_CHECK(speed_rpc_server_start(ts->server));
    ts->port = speed_rpc_server_port(ts->server);
    snprintf(ts->target, sizeof ts->target, "127.0.0.1:%d", ts->port);
    return SPEED_OK;
}

void tserver_stop(tserver_t *ts) {
    speed_rpc_server_destroy(ts->server);
    ts->server = NULL;
    for (int i = 0; i < ts->n_threads; i++) pthread_join(ts->threads[i], NULL);
    ts->n_threads = 0;
    pthread_mutex_destroy(&ts->lock);
}
