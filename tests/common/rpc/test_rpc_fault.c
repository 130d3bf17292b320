/* speed_rpc when things go wrong: deadlines, a server that is not there, a client that
 * cancels a stream, a server shut down with calls in flight, messages above the size limit.
 * Every case checks that the server's per-call resources are freed and nothing hangs. */
#include "check.h"
#include "rpc_test_server.h"

static void test_deadline(tserver_t *ts, speed_rpc_channel_t *ch) {
    int fired0 = atomic_load(&ts->cancel_fired);
    speed_rpc_reply_t r;
    double t0 = now_ms();
    speed_status_t st = speed_rpc_unary(ch, T_HANG, "x", 1, 200, &r);
    double ms = now_ms() - t0;
    CHECK_INT_EQ(st, SPEED_ERR_TIMEOUT);
    CHECK_INT_EQ(r.code, SPEED_RPC_DEADLINE_EXCEEDED);
    CHECK_MSG(ms >= 150 && ms < 2000, "deadline of 200 ms took %.0f ms", ms);
    speed_rpc_reply_cleanup(&r);
    /* the server side sees the deadline as a cancellation and frees the call */
    WAIT_FOR(atomic_load(&ts->cancel_fired) == fired0 + 1, 3000);
    CHECK_INT_EQ(atomic_load(&ts->cancel_fired), fired0 + 1);
    WAIT_FOR(atomic_load(&ts->live_contexts) == 0 && speed_rpc_server_active_calls(ts->server) == 0, 3000);
    CHECK_INT_EQ(atomic_load(&ts->live_contexts), 0);
    CHECK_INT_EQ(speed_rpc_server_active_calls(ts->server), 0);

    /* a stream's deadline ends it with DEADLINE_EXCEEDED after the messages sent so far */
    speed_rpc_stream_t *s = NULL;
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_ENDLESS, NULL, 0, 300, &s), SPEED_OK);
    int got = 0;
    uint8_t *data;
    size_t len;
    speed_rpc_next_t n;
    while ((n = speed_rpc_stream_next(s, 5000, &data, &len)) == SPEED_RPC_NEXT_MESSAGE) {
        got++;
        speed_free(data);
    }
    CHECK_INT_EQ(n, SPEED_RPC_NEXT_END);
    CHECK(got > 0);
    CHECK_INT_EQ(speed_rpc_stream_status(s, NULL), SPEED_RPC_DEADLINE_EXCEEDED);
    speed_rpc_stream_close(s);
    WAIT_FOR(atomic_load(&ts->live_contexts) == 0, 3000);
    CHECK_INT_EQ(atomic_load(&ts->live_contexts), 0);
}

static void test_no_server(void) {
    /* a port that was just free: bind a server, note its port, close it */
    speed_rpc_server_params_t p = speed_rpc_server_default_params();
    speed_rpc_server_t *srv = NULL;
    CHECK_INT_EQ(speed_rpc_server_create(&p, &srv), SPEED_OK);
    int port = speed_rpc_server_port(srv);
    speed_rpc_server_destroy(srv); /* never started: destroy must still be clean */

    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", port);
    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(target, NULL, &ch), SPEED_OK);
    for (int i = 0; i < 3; i++) {
        speed_rpc_reply_t r;
        double t0 = now_ms();
        speed_status_t st = speed_rpc_unary(ch, T_UNARY, "x", 1, 10000, &r);
        double ms = now_ms() - t0;
        CHECK_INT_EQ(st, SPEED_ERR_PEER_UNREACHABLE);
        CHECK_INT_EQ(r.code, SPEED_RPC_UNAVAILABLE);
        CHECK_MSG(ms < 1000, "call to a dead server took %.0f ms", ms);
        speed_rpc_reply_cleanup(&r);
    }
    speed_rpc_stream_t *s = NULL;
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_COUNT, "3", 1, 10000, &s), SPEED_OK);
    uint8_t *data;
    size_t len;
    CHECK_INT_EQ(speed_rpc_stream_next(s, 5000, &data, &len), SPEED_RPC_NEXT_END);
    CHECK_INT_EQ(speed_rpc_stream_status(s, NULL), SPEED_RPC_UNAVAILABLE);
    speed_rpc_stream_close(s);
    speed_rpc_channel_destroy(ch);

    /* wait_for_ready: the call waits for a server to appear (here: until its deadline) */
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.wait_for_ready = true;
    CHECK_INT_EQ(speed_rpc_channel_create(target, &cp, &ch), SPEED_OK);
    speed_rpc_reply_t r;
    double t0 = now_ms();
    CHECK_INT_EQ(speed_rpc_unary(ch, T_UNARY, "x", 1, 300, &r), SPEED_ERR_TIMEOUT);
    CHECK(now_ms() - t0 >= 250);
    speed_rpc_reply_cleanup(&r);
    speed_rpc_channel_destroy(ch);

    /* a bad listen address is an error, not a crash */
    p.address = "256.0.0.1:1";
    CHECK(speed_rpc_server_create(&p, &srv) != SPEED_OK);
    CHECK(srv == NULL);
}

typedef struct {
    speed_rpc_stream_t *s;
    int delay_ms;
} canceller_t;

static void *canceller_main(void *arg) {
    canceller_t *c = arg;
    /* the delay is the scenario: the cancel lands while the reader is blocked in next() (or
     * just before; either way next() must end promptly) */
    sleep_ms(c->delay_ms);
    speed_rpc_stream_cancel(c->s);
    return NULL;
}

static void test_client_cancel(tserver_t *ts, speed_rpc_channel_t *ch) {
    int fired0 = atomic_load(&ts->cancel_fired);
    int ended0 = atomic_load(&ts->streams_ended);
    int cancelled0 = atomic_load(&ts->finish_cancelled);
    speed_rpc_stream_t *s = NULL;
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_ENDLESS, NULL, 0, 30000, &s), SPEED_OK);
    uint8_t *data;
    size_t len;
    int got = 0;
    for (; got < 5; got++) {
        if (speed_rpc_stream_next(s, 5000, &data, &len) != SPEED_RPC_NEXT_MESSAGE) break;
        speed_free(data);
    }
    CHECK_INT_EQ(got, 5);
    /* cancel from another thread while this one waits in next() */
    canceller_t c = {s, 20};
    pthread_t t;
    pthread_create(&t, NULL, canceller_main, &c);
    speed_rpc_next_t n;
    double t0 = now_ms();
    while ((n = speed_rpc_stream_next(s, 5000, &data, &len)) == SPEED_RPC_NEXT_MESSAGE) speed_free(data);
    pthread_join(t, NULL);
    CHECK_INT_EQ(n, SPEED_RPC_NEXT_END);
    CHECK_INT_EQ(speed_rpc_stream_status(s, NULL), SPEED_RPC_CANCELLED);
    CHECK_MSG(now_ms() - t0 < 2000, "cancel took %.0f ms", now_ms() - t0);
    speed_rpc_stream_close(s);

    /* the server was told, its producer stopped and freed its context */
    WAIT_FOR(atomic_load(&ts->streams_ended) == ended0 + 1, 3000);
    CHECK(atomic_load(&ts->cancel_fired) <= fired0 + 1); /* or send() said CANCELLED first */
    CHECK_INT_EQ(atomic_load(&ts->streams_ended), ended0 + 1);
    CHECK_INT_EQ(atomic_load(&ts->finish_cancelled), cancelled0 + 1);
    WAIT_FOR(atomic_load(&ts->live_contexts) == 0 && speed_rpc_server_active_calls(ts->server) == 0, 3000);
    CHECK_INT_EQ(atomic_load(&ts->live_contexts), 0);
    CHECK_INT_EQ(speed_rpc_server_active_calls(ts->server), 0);

    /* a stream whose producer is idle learns of the cancellation only from the callback */
    fired0 = atomic_load(&ts->cancel_fired);
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_IDLE, NULL, 0, 30000, &s), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_stream_next(s, 5000, &data, &len), SPEED_RPC_NEXT_MESSAGE);
    speed_free(data);
    CHECK_INT_EQ(speed_rpc_server_active_calls(ts->server), 1);
    speed_rpc_stream_cancel(s);
    CHECK_INT_EQ(speed_rpc_stream_next(s, 5000, &data, &len), SPEED_RPC_NEXT_END);
    CHECK_INT_EQ(speed_rpc_stream_status(s, NULL), SPEED_RPC_CANCELLED);
    speed_rpc_stream_close(s);
    WAIT_FOR(atomic_load(&ts->cancel_fired) == fired0 + 1, 3000);
    CHECK_INT_EQ(atomic_load(&ts->cancel_fired), fired0 + 1);
    WAIT_FOR(atomic_load(&ts->live_contexts) == 0 && speed_rpc_server_active_calls(ts->server) == 0, 3000);
    CHECK_INT_EQ(atomic_load(&ts->live_contexts), 0);
    CHECK_INT_EQ(speed_rpc_server_active_calls(ts->server), 0);

    /* closing a running stream without reading it to the end cancels it too */
    fired0 = atomic_load(&ts->cancel_fired);
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_ENDLESS, NULL, 0, 30000, &s), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_stream_next(s, 5000, &data, &len), SPEED_RPC_NEXT_MESSAGE);
    speed_free(data);
    speed_rpc_stream_close(s);
    WAIT_FOR(atomic_load(&ts->live_contexts) == 0, 3000);
    CHECK(atomic_load(&ts->cancel_fired) <= fired0 + 1);
    CHECK_INT_EQ(atomic_load(&ts->finish_cancelled), cancelled0 + 3);
    CHECK_INT_EQ(atomic_load(&ts->live_contexts), 0);

    /* a client that never reads: the server's queue is bounded by the producer, and closing
     * the stream still releases everything */
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_ENDLESS, NULL, 0, 30000, &s), SPEED_OK);
    /* the 300 ms without reading is the scenario (the producer runs against a reader that
     * never comes), not a wait for an event: whatever it managed to queue, close must free it */
    sleep_ms(300);
    speed_rpc_stream_close(s);
    WAIT_FOR(atomic_load(&ts->live_contexts) == 0, 3000);
    CHECK_INT_EQ(atomic_load(&ts->live_contexts), 0);
}

/* ---- shutdown with calls in flight ---- */

typedef struct {
    const char *target;
    const char *method;
    bool stream;
    speed_rpc_code_t code;
    atomic_int messages; /* counted by the call's thread, polled by the test */
    double ms;
} inflight_t;

static void *inflight_main(void *arg) {
    inflight_t *f = arg;
    speed_rpc_channel_t *ch = NULL;
    if (speed_rpc_channel_create(f->target, NULL, &ch) != SPEED_OK) return NULL;
    double t0 = now_ms();
    if (!f->stream) {
        speed_rpc_reply_t r;
        speed_rpc_unary(ch, f->method, "x", 1, 60000, &r);
        f->code = r.code;
        speed_rpc_reply_cleanup(&r);
    } else {
        speed_rpc_stream_t *s = NULL;
        if (speed_rpc_stream_open(ch, f->method, NULL, 0, 60000, &s) == SPEED_OK) {
            uint8_t *data;
            size_t len;
            while (speed_rpc_stream_next(s, 60000, &data, &len) == SPEED_RPC_NEXT_MESSAGE) {
                atomic_fetch_add(&f->messages, 1);
                speed_free(data);
            }
            f->code = speed_rpc_stream_status(s, NULL);
            speed_rpc_stream_close(s);
        }
    }
    f->ms = now_ms() - t0;
    speed_rpc_channel_destroy(ch);
    return NULL;
}

static void *shutdown_main(void *arg) {
    speed_rpc_server_shutdown(arg, 10000);
    return NULL;
}

static void test_shutdown_in_flight(void) {
    tserver_t ts;
    CHECK_INT_EQ(tserver_start(&ts, 0), SPEED_OK);
    enum { N = 6 };
    inflight_t f[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
        f[i] = (inflight_t){
            .target = ts.target, .method = (i & 1) ? T_ENDLESS : T_HANG, .stream = (i & 1) != 0, .code = SPEED_RPC_OK};
        pthread_create(&t[i], NULL, inflight_main, &f[i]);
    }
    WAIT_FOR(speed_rpc_server_active_calls(ts.server) == N, 5000);
    CHECK_INT_EQ(speed_rpc_server_active_calls(ts.server), N);
    /* every stream has delivered a message before the shutdown cuts it */
    WAIT_FOR(atomic_load(&f[1].messages) > 0 && atomic_load(&f[3].messages) > 0 && atomic_load(&f[5].messages) > 0,
             5000);

    double t0 = now_ms();
    speed_rpc_server_shutdown(ts.server, 0);
    double ms = now_ms() - t0;
    CHECK_MSG(ms < 2000, "shutdown took %.0f ms", ms);
    for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < N; i++) {
        CHECK_MSG(f[i].code == SPEED_RPC_UNAVAILABLE, "call %d (%s) ended with %s", i, f[i].method,
                  speed_rpc_code_name(f[i].code));
        CHECK_MSG(f[i].ms < 3000, "call %d took %.0f ms", i, f[i].ms);
        if (f[i].stream) CHECK(atomic_load(&f[i].messages) > 0);
    }
    /* The unary handlers learn of the shutdown only through their cancel callback. A stream
     * producer learns it from the callback or from send() returning CANCELLED, whichever
     * comes first (the callback does not run once the handler has completed the call). */
    CHECK(atomic_load(&ts.cancel_fired) >= N / 2);
    tserver_stop(&ts); /* joins the stream producers: they saw the cancel and finished */
    CHECK_INT_EQ(atomic_load(&ts.streams_ended), N / 2);
    CHECK_INT_EQ(atomic_load(&ts.finish_cancelled), N);
    CHECK_INT_EQ(atomic_load(&ts.live_contexts), 0);

    /* grace: a stream that completes within the grace period completes normally */
    CHECK_INT_EQ(tserver_start(&ts, 0), SPEED_OK);
    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(ts.target, NULL, &ch), SPEED_OK);
    speed_rpc_stream_t *s = NULL;
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_COUNT, "2000", 4, 30000, &s), SPEED_OK);
    uint8_t *data;
    size_t len;
    CHECK_INT_EQ(speed_rpc_stream_next(s, 5000, &data, &len), SPEED_RPC_NEXT_MESSAGE);
    speed_free(data);
    pthread_t shutter;
    pthread_create(&shutter, NULL, shutdown_main, ts.server);
    int got = 1;
    while (speed_rpc_stream_next(s, 5000, &data, &len) == SPEED_RPC_NEXT_MESSAGE) {
        got++;
        speed_free(data);
    }
    const char *why = NULL;
    speed_rpc_code_t code = speed_rpc_stream_status(s, &why);
    CHECK_INT_EQ(got, 2000);
    CHECK_MSG(code == SPEED_RPC_OK, "%s: %s", speed_rpc_code_name(code), why);
    speed_rpc_stream_close(s);
    /* the server is still draining (it holds connections open a while after the last call
     * ended): a new call is turned away at once, it does not wait for the shutdown */
    speed_rpc_reply_t r;
    double t0a = now_ms();
    CHECK_INT_EQ(speed_rpc_unary(ch, T_UNARY, "x", 1, 5000, &r), SPEED_ERR_PEER_UNREACHABLE);
    CHECK(now_ms() - t0a < 500);
    CHECK_MSG(r.code == SPEED_RPC_UNAVAILABLE && strstr(r.message, "shutting down"), "%s: %s",
              speed_rpc_code_name(r.code), r.message);
    speed_rpc_reply_cleanup(&r);
    pthread_join(shutter, NULL);
    /* new calls after shutdown fail fast */
    double t0b = now_ms();
    CHECK_INT_EQ(speed_rpc_unary(ch, T_UNARY, "x", 1, 5000, &r), SPEED_ERR_PEER_UNREACHABLE);
    CHECK(now_ms() - t0b < 1000);
    speed_rpc_reply_cleanup(&r);
    speed_rpc_channel_destroy(ch);
    tserver_stop(&ts);
}

static void test_size_limit(void) {
    tserver_t ts;
    CHECK_INT_EQ(tserver_start(&ts, 1u << 20), SPEED_OK);
    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(ts.target, NULL, &ch), SPEED_OK);
    size_t n = 2u << 20;
    uint8_t *big = speed_calloc(1, n);
    speed_rpc_reply_t r;
    /* the server refuses a request above its limit */
    CHECK_INT_EQ(speed_rpc_unary(ch, T_UNARY, big, n, 5000, &r), SPEED_ERR_CAPACITY);
    CHECK_INT_EQ(r.code, SPEED_RPC_RESOURCE_EXHAUSTED);
    speed_rpc_reply_cleanup(&r);
    CHECK_INT_EQ(speed_rpc_unary(ch, T_UNARY, big, 1000, 5000, &r), SPEED_OK);
    speed_rpc_reply_cleanup(&r);
    speed_rpc_channel_destroy(ch);

    /* a client refuses a reply above its own limit */
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.max_message_bytes = 1000;
    CHECK_INT_EQ(speed_rpc_channel_create(ts.target, &cp, &ch), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_unary(ch, T_UNARY, big, 900, 5000, &r), SPEED_OK);
    speed_rpc_reply_cleanup(&r);
    speed_status_t st = speed_rpc_unary(ch, T_UNARY, big, 5000, 5000, &r);
    CHECK_MSG(st == SPEED_ERR_CAPACITY, "%s: %s", speed_status_string(st), r.message);
    speed_rpc_reply_cleanup(&r);
    speed_rpc_channel_destroy(ch);
    speed_free(big);
    WAIT_FOR(speed_rpc_server_active_calls(ts.server) == 0, 3000);
    tserver_stop(&ts);
}

int main(void) {
    int64_t live0 = speed_alloc_live_count();
    tserver_t ts;
    speed_status_t st = tserver_start(&ts, 0);
    CHECK_INT_EQ(st, SPEED_OK);
    if (st != SPEED_OK) return CHECK_DONE();
    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(ts.target, NULL, &ch), SPEED_OK);

    test_deadline(&ts, ch);
    test_client_cancel(&ts, ch);

    speed_rpc_channel_destroy(ch);
    tserver_stop(&ts);

    test_no_server();
    test_shutdown_in_flight();
    test_size_limit();

    CHECK_INT_EQ(speed_alloc_live_count(), live0);
    return CHECK_DONE();
}
