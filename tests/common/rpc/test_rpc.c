/* speed_rpc on loopback: unary calls (small, 1 MiB, 8 MiB), replies from another thread,
 * server streams, errors and their mapping, unknown methods, many threads on one channel,
 * and a latency benchmark line. */
#include "check.h"
#include "rpc_test_server.h"
#include "test_stats.h"

static void fill(uint8_t *p, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = (uint8_t)(x >> 24);
    }
}

static void test_echo(speed_rpc_channel_t *ch, const char *method, size_t n) {
    uint8_t *req = speed_malloc(n ? n : 1);
    fill(req, n, (uint32_t)n);
    speed_rpc_reply_t r;
    speed_status_t st = speed_rpc_unary(ch, method, req, n, 10000, &r);
    CHECK_MSG(st == SPEED_OK, "%s %zu bytes: %s (%s)", method, n, speed_status_string(st), r.message);
    CHECK_INT_EQ(r.code, SPEED_RPC_OK);
    CHECK_INT_EQ(r.len, n);
    CHECK(r.len == n && (n == 0 || memcmp(r.data, req, n) == 0));
    speed_rpc_reply_cleanup(&r);
    speed_free(req);
}

static void test_stream(speed_rpc_channel_t *ch, int n) {
    char req[16];
    int k = snprintf(req, sizeof req, "%d", n);
    speed_rpc_stream_t *s = NULL;
    CHECK_INT_EQ(speed_rpc_stream_open(ch, T_COUNT, req, (size_t)k, 10000, &s), SPEED_OK);
    if (!s) return;
    int got = 0, in_order = 1;
    for (;;) {
        uint8_t *data;
        size_t len;
        speed_rpc_next_t r = speed_rpc_stream_next(s, 5000, &data, &len);
        if (r == SPEED_RPC_NEXT_WAIT) {
            CHECK_MSG(0, "stream stalled after %d messages", got);
            break;
        }
        if (r == SPEED_RPC_NEXT_END) break;
        char buf[32];
        snprintf(buf, sizeof buf, "%.*s", (int)len, (const char *)data);
        if (atoi(buf) != got) in_order = 0;
        got++;
        speed_free(data);
    }
    const char *msg;
    CHECK_INT_EQ(speed_rpc_stream_status(s, &msg), SPEED_RPC_OK);
    CHECK_INT_EQ(got, n);
    CHECK(in_order);
    uint8_t *data;
    size_t len;
    CHECK_INT_EQ(speed_rpc_stream_next(s, 0, &data, &len), SPEED_RPC_NEXT_END);
    speed_rpc_stream_close(s);
}

static void test_fail_mapping(speed_rpc_channel_t *ch) {
    static const struct {
        speed_status_t sent;
        speed_rpc_code_t code;
        speed_status_t got;
    } cases[] = {
        {SPEED_ERR_CAPACITY, SPEED_RPC_RESOURCE_EXHAUSTED, SPEED_ERR_CAPACITY},
        {SPEED_ERR_NOT_FOUND, SPEED_RPC_NOT_FOUND, SPEED_ERR_NOT_FOUND},
        {SPEED_ERR_INVALID_ARGUMENT, SPEED_RPC_INVALID_ARGUMENT, SPEED_ERR_INVALID_ARGUMENT},
        {SPEED_ERR_TIMEOUT, SPEED_RPC_DEADLINE_EXCEEDED, SPEED_ERR_TIMEOUT},
        {SPEED_ERR_PEER_UNREACHABLE, SPEED_RPC_UNAVAILABLE, SPEED_ERR_PEER_UNREACHABLE},
        {SPEED_ERR_TOO_LONG, SPEED_RPC_OUT_OF_RANGE, SPEED_ERR_TOO_LONG},
        {SPEED_ERR_UNSUPPORTED, SPEED_RPC_UNIMPLEMENTED, SPEED_ERR_UNSUPPORTED},
        {SPEED_ERR_TRANSFER, SPEED_RPC_ABORTED, SPEED_ERR_TRANSFER},
        {SPEED_ERR_INTERNAL, SPEED_RPC_INTERNAL, SPEED_ERR_PEER_PROTOCOL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t b = (uint8_t)(-(int)cases[i].sent);
        speed_rpc_reply_t r;
        speed_status_t st = speed_rpc_unary(ch, T_FAIL, &b, 1, 5000, &r);
        CHECK_MSG(st == cases[i].got, "%s -> %s", speed_status_string(cases[i].sent), speed_status_string(st));
        CHECK_MSG(r.code == cases[i].code, "%s -> %s", speed_status_string(cases[i].sent), speed_rpc_code_name(r.code));
        CHECK_STR_EQ(r.message, "test failure");
        CHECK(r.data == NULL && r.len == 0);
        speed_rpc_reply_cleanup(&r);
    }
    /* the table is its own inverse wherever that is possible */
    for (int s = -202; s <= 0; s++) {
        speed_rpc_code_t c = speed_rpc_code_from_status((speed_status_t)s);
        CHECK(c >= SPEED_RPC_OK && c <= SPEED_RPC_UNAUTHENTICATED);
    }
    CHECK_INT_EQ(speed_rpc_code_to_status(99), SPEED_ERR_PEER_PROTOCOL);
    CHECK_STR_EQ(speed_rpc_code_name(14), "UNAVAILABLE");
    CHECK_STR_EQ(speed_rpc_code_name(-1), "UNKNOWN_CODE");
}

static void test_unknown_method(speed_rpc_channel_t *ch) {
    speed_rpc_reply_t r;
    double t0 = now_ms();
    speed_status_t st = speed_rpc_unary(ch, "/t.Echo/Nope", "x", 1, 5000, &r);
    double ms = now_ms() - t0;
    CHECK_INT_EQ(st, SPEED_ERR_UNSUPPORTED);
    CHECK_INT_EQ(r.code, SPEED_RPC_UNIMPLEMENTED);
    CHECK_MSG(ms < 1000, "unknown method took %.0f ms", ms);
    speed_rpc_reply_cleanup(&r);
    /* a stream to an unknown method ends at once with the same status */
    speed_rpc_stream_t *s = NULL;
    CHECK_INT_EQ(speed_rpc_stream_open(ch, "/t.Echo/Nope", NULL, 0, 5000, &s), SPEED_OK);
    uint8_t *data;
    size_t len;
    CHECK_INT_EQ(speed_rpc_stream_next(s, 5000, &data, &len), SPEED_RPC_NEXT_END);
    CHECK_INT_EQ(speed_rpc_stream_status(s, NULL), SPEED_RPC_UNIMPLEMENTED);
    speed_rpc_stream_close(s);
}

/* ---- many threads ---- */

typedef struct {
    speed_rpc_channel_t *ch;
    int n_calls;
    int id;
    int failures;
    double *lat_us;
} worker_t;

static void *worker_main(void *arg) {
    worker_t *w = arg;
    for (int i = 0; i < w->n_calls; i++) {
        char req[64];
        int k = snprintf(req, sizeof req, "thread %d call %d", w->id, i);
        speed_rpc_reply_t r;
        double t0 = now_ms();
        speed_status_t st = speed_rpc_unary(w->ch, (i & 7) == 7 ? T_LATER : T_UNARY, req, (size_t)k, 20000, &r);
        if (w->lat_us) w->lat_us[i] = (now_ms() - t0) * 1e3;
        if (st != SPEED_OK || r.len != (size_t)k || memcmp(r.data, req, (size_t)k) != 0) {
            if (w->failures++ < 3)
                fprintf(stderr, "thread %d call %d: %s %s\n", w->id, i, speed_status_string(st),
                        r.message ? r.message : "");
        }
        speed_rpc_reply_cleanup(&r);
    }
    return NULL;
}

static void test_threads(speed_rpc_channel_t *ch, int n_threads, int n_calls) {
    pthread_t t[64];
    worker_t w[64];
    double t0 = now_ms();
    for (int i = 0; i < n_threads; i++) {
        w[i] = (worker_t){.ch = ch, .n_calls = n_calls, .id = i};
        pthread_create(&t[i], NULL, worker_main, &w[i]);
    }
    int failures = 0;
    for (int i = 0; i < n_threads; i++) {
        pthread_join(t[i], NULL);
        failures += w[i].failures;
    }
    double ms = now_ms() - t0;
    CHECK_INT_EQ(failures, 0);
    printf("rpc: %d threads x %d unary calls: %.0f ms, %.0f calls/s\n", n_threads, n_calls, ms,
           n_threads * n_calls / (ms / 1e3));
}

static void bench_unary(speed_rpc_channel_t *ch, int n) {
    double *lat = speed_malloc((size_t)n * sizeof *lat);
    for (int i = 0; i < n; i++) {
        speed_rpc_reply_t r;
        double t0 = now_ms();
        speed_status_t st = speed_rpc_unary(ch, T_UNARY, "ping", 4, 5000, &r);
        lat[i] = (now_ms() - t0) * 1e3;
        if (st != SPEED_OK) CHECK_MSG(0, "bench call %d: %s", i, speed_status_string(st));
        speed_rpc_reply_cleanup(&r);
    }
    tu_sort_doubles(lat, (size_t)n);
    printf("rpc: unary round trip (4 bytes, sequential, %d calls): median %.1f us, "
           "p90 %.1f us, p99 %.1f us\n",
           n, lat[n / 2], lat[n * 9 / 10], lat[n * 99 / 100]);

    /* 1 MiB round trip */
    size_t big = 1u << 20;
    uint8_t *req = speed_calloc(1, big);
    int m = 20;
    for (int i = 0; i < m; i++) {
        speed_rpc_reply_t r;
        double t0 = now_ms();
        speed_rpc_unary(ch, T_UNARY, req, big, 5000, &r);
        lat[i] = (now_ms() - t0) * 1e3;
        speed_rpc_reply_cleanup(&r);
    }
    tu_sort_doubles(lat, (size_t)m);
    printf("rpc: unary echo of 1 MiB: median %.0f us (%.2f GB/s each way)\n", lat[m / 2],
           2.0 * (double)big / (lat[m / 2] * 1e3));
    speed_free(req);
    speed_free(lat);
}

int main(void) {
    int64_t live0 = speed_alloc_live_count();
    tserver_t ts;
    speed_status_t st = tserver_start(&ts, 0);
    CHECK_INT_EQ(st, SPEED_OK);
    if (st != SPEED_OK) return CHECK_DONE();
    CHECK(ts.port > 0);

    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(ts.target, NULL, &ch), SPEED_OK);

    test_echo(ch, T_UNARY, 0);
    test_echo(ch, T_UNARY, 5);
    test_echo(ch, T_UNARY, 1u << 20);
    test_echo(ch, T_UNARY, 8u << 20); /* above gRPC's 4 MiB default */
    test_echo(ch, T_LATER, 100);      /* reply from another thread, after the handler */
    test_echo(ch, T_LATER, 8u << 20);

    test_stream(ch, 0);
    test_stream(ch, 1);
    test_stream(ch, 500);

    test_fail_mapping(ch);
    test_unknown_method(ch);

    test_threads(ch, 16, 200);
    bench_unary(ch, 2000);

    WAIT_FOR(atomic_load(&ts.live_contexts) == 0, 5000);
    CHECK_INT_EQ(atomic_load(&ts.live_contexts), 0);
    CHECK_INT_EQ(speed_rpc_server_active_calls(ts.server), 0);
    CHECK_INT_EQ(atomic_load(&ts.cancel_fired), 0);

    speed_rpc_channel_destroy(ch);
    tserver_stop(&ts);
    CHECK_INT_EQ(speed_alloc_live_count(), live0);
    return CHECK_DONE();
}
