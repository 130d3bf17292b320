/* speed_http: routing, headers, bodies and limits, keep-alive, SSE streaming, deferred
 * responses, 50 concurrent streams, the /metrics helper, and the client. */
#include <stdlib.h>

#include "http_test_util.h"
#include "log.h"
#include "prom_check.h"
#include "test_log.h"

static sem_t g_go; /* lets a WRITE_HANDSHAKE writer continue */

/* ---- handlers ------------------------------------------------------------------------- */

static void h_health(void *user, speed_http_request_t *req) {
    (void)user;
    const char *id = speed_http_request_header(req, "X-Request-Id");
    if (id) speed_http_request_add_header(req, "X-Request-Id", id);
    speed_http_respond(req, 200, "text/plain", "ok", 2);
}

static void h_echo(void *user, speed_http_request_t *req) {
    (void)user;
    size_t len;
    const char *body = speed_http_request_body(req, &len);
    const char *auth = speed_http_request_header(req, "authorization"); /* any case */
    const char *id = speed_http_request_header(req, "X-Request-Id");
    const char *ct = speed_http_request_header(req, "Content-Type");
    char *out = malloc(len + 512);
    int n = snprintf(out, len + 512, "%s|%s|%s|%s|%zu|%s", speed_http_request_method(req), auth ? auth : "-",
                     id ? id : "-", ct ? ct : "-", len, body);
    speed_http_request_add_header(req, "Retry-After", "1");
    if (id) speed_http_request_add_header(req, "X-Request-Id", id);
    speed_http_respond(req, 201, "text/plain", out, (size_t)n);
    free(out);
}

static void h_query(void *user, speed_http_request_t *req) {
    (void)user;
    const char *a = speed_http_request_query(req, "a");
    speed_http_respond(req, 200, "text/plain", a ? a : "(none)", strlen(a ? a : "(none)"));
}

static void h_silent(void *user, speed_http_request_t *req) {
    (void)user, (void)req; /* answers nothing: the library must send 500 */
}

static void h_sse(void *user, speed_http_request_t *req) {
    (void)user;
    const char *mode = speed_http_request_query(req, "mode");
    const char *n = speed_http_request_query(req, "n");
    const char *delay = speed_http_request_query(req, "delay");
    speed_http_stream_t *s;
    if (speed_http_respond_stream(req, 200, "text/event-stream", NULL, NULL, &s) != SPEED_OK) {
        speed_http_respond_error(req, 500, "server_error", "no stream");
        return;
    }
    writer_mode_t m = mode && strcmp(mode, "handshake") == 0 ? WRITE_HANDSHAKE : WRITE_EVENTS;
    writer_start(s, m, n ? atoi(n) : 5, delay ? atoi(delay) : 0, &g_go);
}

/* Answers synchronously with a stream it closes at once: one Content-Length response. */
static void h_sse_multi(void *user, speed_http_request_t *req) {
    (void)user;
    speed_http_stream_t *s;
    if (speed_http_respond_stream(req, 200, "text/event-stream", NULL, NULL, &s) != SPEED_OK) return;
    speed_http_stream_write(s, ": a comment\n\n", strlen(": a comment\n\n"));
    speed_http_stream_write_sse(s, "delta", "line1\nline2\r\n\nline4");
    speed_http_stream_write_sse(s, NULL, "[DONE]");
    speed_http_stream_close(s);
}

static void h_deferred(void *user, speed_http_request_t *req) {
    (void)user;
    speed_http_stream_t *s;
    if (speed_http_respond_stream(req, 200, NULL, NULL, NULL, &s) == SPEED_OK)
        writer_start(s, WRITE_DEFERRED, 0, 50, NULL);
}

static speed_http_server_t *start_server(size_t max_body, speed_metrics_t *metrics) {
    speed_http_server_params_t p = speed_http_server_default_params();
    p.max_body_bytes = max_body;
    speed_http_server_t *srv = NULL;
    CHECK_INT_EQ(speed_http_server_create(&p, &srv), SPEED_OK);
    if (!srv) return NULL;
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/health", h_health, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "POST", "/echo", h_echo, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "PUT", "/echo", h_echo, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/query", h_query, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/silent", h_silent, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/sse", h_sse, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/deferred", h_deferred, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/sse-multi", h_sse_multi, NULL), SPEED_OK);
    if (metrics) CHECK_INT_EQ(speed_http_server_route_metrics(srv, "/metrics", metrics), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/health", h_health, NULL),
                 SPEED_ERR_INVALID_ARGUMENT); /* duplicate */
    CHECK_INT_EQ(speed_http_server_start(srv), SPEED_OK);
    CHECK(speed_http_server_port(srv) != 0);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/late", h_health, NULL),
                 SPEED_ERR_INVALID_ARGUMENT); /* after start */
    return srv;
}

static speed_http_client_t *connect_to(speed_http_server_t *srv) {
    speed_http_client_t *c = NULL;
    CHECK_INT_EQ(speed_http_client_connect("127.0.0.1", speed_http_server_port(srv), 10000, &c), SPEED_OK);
    return c;
}

/* ---- tests ---------------------------------------------------------------------------- */

static void test_routing(speed_http_server_t *srv) {
    speed_http_client_t *c = connect_to(srv);
    const speed_http_response_t *r;
    speed_http_header_t id[] = {{"X-Request-Id", "req-42"}};
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/health", id, 1, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 200);
    CHECK_STR_EQ(r->body, "ok");
    CHECK_STR_EQ(speed_http_response_header(r, "content-type"), "text/plain");
    CHECK_STR_EQ(speed_http_response_header(r, "X-Request-Id"), "req-42");

    speed_http_header_t hs[] = {
        {"Authorization", "Bearer sk-test"}, {"X-Request-Id", "abc"}, {"Content-Type", "application/json"}};
    const char *body = "{\"prompt\":\"hi\"}";
    CHECK_INT_EQ(speed_http_client_request(c, "POST", "/echo", hs, 3, body, strlen(body), &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 201);
    CHECK_STR_EQ(r->body, "POST|Bearer sk-test|abc|application/json|15|{\"prompt\":\"hi\"}");
    CHECK_STR_EQ(speed_http_response_header(r, "Retry-After"), "1");
    CHECK_STR_EQ(speed_http_response_header(r, "X-Request-Id"), "abc");
    CHECK(speed_http_response_header(r, "Content-Length") != NULL);

    CHECK_INT_EQ(speed_http_client_request(c, "PUT", "/echo", NULL, 0, "", 0, &r), SPEED_OK);
    CHECK_STR_EQ(r->body, "PUT|-|-|-|0|");

    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/query?a=hello%20world&b=2", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_STR_EQ(r->body, "hello world");

    CHECK_INT_EQ(speed_http_client_request(c, "HEAD", "/health", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 200);
    CHECK_INT_EQ(r->body_len, 0);

    /* 404, 405 with Allow, 500 for a handler that answers nothing */
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/nope", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 404);
    CHECK_CONTAINS(r->body, "\"type\":\"invalid_request_error\"");
    CHECK_STR_EQ(speed_http_response_header(r, "Content-Type"), "application/json");
    CHECK_INT_EQ(speed_http_client_request(c, "POST", "/health", NULL, 0, "x", 1, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 405);
    CHECK_STR_EQ(speed_http_response_header(r, "Allow"), "GET");
    CHECK_INT_EQ(speed_http_client_request(c, "DELETE", "/echo", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 405);
    CHECK_CONTAINS(speed_http_response_header(r, "Allow"), "POST");
    CHECK_CONTAINS(speed_http_response_header(r, "Allow"), "PUT");
    speed_log_set_sink(NULL, NULL);
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/silent", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 500);
    CHECK(r->keep_alive); /* every answer above kept the connection */
    speed_http_client_destroy(c);

    int status = 0;
    char *text = NULL;
    CHECK_INT_EQ(speed_http_get("127.0.0.1", speed_http_server_port(srv), "/health", 5000, &status, &text), SPEED_OK);
    CHECK_INT_EQ(status, 200);
    CHECK_STR_EQ(text, "ok");
    speed_free(text);
}

static void test_keepalive(speed_http_server_t *srv) {
    speed_http_server_stats_t before, after;
    speed_http_server_stats(srv, &before);
    speed_http_client_t *c = connect_to(srv);
    const speed_http_response_t *r;
    for (int i = 0; i < 3; i++) {
        if (i == 1)
            CHECK_INT_EQ(speed_http_client_request(c, "POST", "/echo", NULL, 0, "a", 1, &r), SPEED_OK);
        else
            CHECK_INT_EQ(speed_http_client_request(c, "GET", "/health", NULL, 0, NULL, 0, &r), SPEED_OK);
        CHECK(r->keep_alive);
        const char *conn = speed_http_response_header(r, "Connection");
        CHECK_MSG(!conn || strcasecmp(conn, "close") != 0, "Connection: %s", conn);
    }
    speed_http_server_stats(srv, &after);
    CHECK_INT_EQ(after.connections_opened - before.connections_opened, 1);
    CHECK_INT_EQ(after.requests - before.requests, 3);
    speed_http_client_destroy(c);
}

static void test_body_limit(void) {
    speed_http_server_t *srv = start_server(1024, NULL);
    uint16_t port = speed_http_server_port(srv);
    speed_http_client_t *c = connect_to(srv);
    const speed_http_response_t *r;
    char *big = malloc(4096);
    memset(big, 'x', 4096);
    CHECK_INT_EQ(speed_http_client_request(c, "POST", "/echo", NULL, 0, big, 1024, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 201); /* exactly at the limit */
    CHECK_INT_EQ(r->body_len, 1024 + strlen("POST|-|-|-|1024|"));
    /* A declared Content-Length over the limit is refused without reading the body. */
    CHECK_INT_EQ(speed_http_client_request(c, "POST", "/echo", NULL, 0, big, 1025, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 413);
    CHECK_CONTAINS(r->body, "too large");
    speed_http_client_destroy(c);

    /* A chunked body over the limit is read, dropped and answered; the connection stays. */
    int fd = raw_connect(port);
    CHECK(fd >= 0);
    const char *head = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    raw_send(fd, head, strlen(head));
    for (int i = 0; i < 3; i++) {
        raw_send(fd, "400\r\n", 5);
        raw_send(fd, big, 0x400);
        raw_send(fd, "\r\n", 2);
    }
    raw_send(fd, "0\r\n\r\n", 5);
    char buf[8192];
    raw_read(fd, buf, sizeof(buf), "}}", 5000);
    CHECK_CONTAINS(buf, "HTTP/1.1 413");
    const char *again = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    raw_send(fd, again, strlen(again));
    raw_read(fd, buf, sizeof(buf), "\r\n\r\nok", 5000);
    CHECK_CONTAINS(buf, "HTTP/1.1 200");
    close(fd);
    free(big);
    speed_http_server_destroy(srv);
}

static void test_sse(speed_http_server_t *srv) {
    speed_http_client_t *c = connect_to(srv);
    const speed_http_response_t *r;
    const int n = 10;
    char path[64];
    snprintf(path, sizeof(path), "/sse?mode=handshake&n=%d", n);
    CHECK_INT_EQ(speed_http_client_request_begin(c, "GET", path, NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 200);
    CHECK_STR_EQ(speed_http_response_header(r, "Content-Type"), "text/event-stream");
    CHECK_STR_EQ(speed_http_response_header(r, "Cache-Control"), "no-cache");
    CHECK_STR_EQ(speed_http_response_header(r, "Transfer-Encoding"), "chunked");

    /* The first event arrives while the writer is blocked waiting for us: incremental. */
    const speed_http_sse_event_t *ev;
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev != NULL);
    if (ev) CHECK_STR_EQ(ev->data, "{\"i\":0}");

    /* While nothing is written the connection is suspended: no CPU is burnt. */
    double cpu0 = cpu_s();
    sleep_ms(300);
    double burnt = cpu_s() - cpu0;
    CHECK_MSG(burnt < 0.1, "idle stream used %.3f s of CPU in 0.3 s", burnt);
    speed_http_server_stats_t st;
    speed_http_server_stats(srv, &st);
    CHECK_INT_EQ(st.streams_suspended, 1);

    sem_post(&g_go);
    for (int i = 1; i < n; i++) {
        CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
        char want[32];
        snprintf(want, sizeof(want), "{\"i\":%d}", i);
        CHECK(ev != NULL);
        if (ev) CHECK_STR_EQ(ev->data, want);
    }
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev && strcmp(ev->data, "[DONE]") == 0);
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev == NULL); /* end of body */
    speed_http_server_stats(srv, &st);
    CHECK_INT_EQ(st.streams_suspended, 0); /* every suspension was resumed */

    /* The same connection serves the next request after a chunked stream. */
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/health", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 200);

    /* Multi-line data, named events and comments round-trip. */
    CHECK_INT_EQ(speed_http_client_request_begin(c, "GET", "/sse-multi", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK(speed_http_response_header(r, "Content-Length") != NULL); /* closed before commit */
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev != NULL);
    if (ev) {
        CHECK_STR_EQ(ev->event, "delta");
        CHECK_STR_EQ(ev->data, "line1\nline2\n\nline4");
        CHECK_INT_EQ(ev->data_len, strlen("line1\nline2\n\nline4"));
    }
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev && strcmp(ev->data, "[DONE]") == 0 && ev->event[0] == '\0');
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev == NULL);
    speed_http_client_destroy(c);
    writers_join(NULL);
}

static void test_deferred(speed_http_server_t *srv) {
    speed_http_client_t *c = connect_to(srv);
    const speed_http_response_t *r;
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/deferred", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 429);
    CHECK_STR_EQ(speed_http_response_header(r, "Retry-After"), "7");
    CHECK_STR_EQ(speed_http_response_header(r, "Content-Type"), "application/json");
    CHECK_STR_EQ(speed_http_response_header(r, "Content-Length"), "17");
    CHECK(speed_http_response_header(r, "Transfer-Encoding") == NULL);
    CHECK_STR_EQ(r->body, "{\"error\":\"busy\"}");
    CHECK(r->keep_alive);
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/health", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 200);
    speed_http_client_destroy(c);
    writers_join(NULL);
}

#define N_STREAMS 50
#define N_EVENTS  20

typedef struct {
    uint16_t port;
    int events;
    bool done;
    speed_status_t status;
} stream_client_t;

static void *stream_client_main(void *p) {
    stream_client_t *sc = p;
    speed_http_client_t *c;
    sc->status = speed_http_client_connect("127.0.0.1", sc->port, 20000, &c);
    if (sc->status != SPEED_OK) return NULL;
    const speed_http_response_t *r;
    char path[64];
    snprintf(path, sizeof(path), "/sse?n=%d&delay=5", N_EVENTS);
    sc->status = speed_http_client_request_begin(c, "GET", path, NULL, 0, NULL, 0, &r);
    while (sc->status == SPEED_OK) {
        const speed_http_sse_event_t *ev;
        sc->status = speed_http_client_next_event(c, &ev);
        if (sc->status != SPEED_OK || !ev) break;
        if (strcmp(ev->data, "[DONE]") == 0)
            sc->done = true;
        else
            sc->events++;
    }
    speed_http_client_destroy(c);
    return NULL;
}

static void test_many_streams(speed_http_server_t *srv) {
    pthread_t th[N_STREAMS];
    stream_client_t sc[N_STREAMS];
    double t0 = now_s();
    for (int i = 0; i < N_STREAMS; i++) {
        sc[i] = (stream_client_t){.port = speed_http_server_port(srv)};
        pthread_create(&th[i], NULL, stream_client_main, &sc[i]);
    }
    int complete = 0;
    for (int i = 0; i < N_STREAMS; i++) {
        pthread_join(th[i], NULL);
        CHECK_INT_EQ(sc[i].status, SPEED_OK);
        complete += sc[i].done && sc[i].events == N_EVENTS;
    }
    CHECK_INT_EQ(complete, N_STREAMS);
    writers_join(NULL);
    fprintf(stderr, "%d concurrent streams x %d events: %.2f s\n", N_STREAMS, N_EVENTS, now_s() - t0);
    /* MHD reports completion a little after the client has read the last chunk */
    speed_http_server_stats_t st;
    double end = now_s() + 2;
    do {
        speed_http_server_stats(srv, &st);
        if (st.streams_attached) sleep_ms(5);
    } while (st.streams_attached && now_s() < end);
    CHECK_INT_EQ(st.streams_attached, 0);
}

static void test_metrics_route(void) {
    speed_metrics_t *m;
    CHECK_INT_EQ(speed_metrics_create(&m), SPEED_OK);
    speed_counter_t *req;
    speed_histogram_t *lat;
    CHECK_INT_EQ(speed_counter_register(m, "speed_router_requests_total", "Requests.", NULL, 0, &req), SPEED_OK);
    CHECK_INT_EQ(
        speed_histogram_register(m, "speed_router_e2e_request_latency_seconds", "End to end.", NULL, 0, NULL, 0, &lat),
        SPEED_OK);
    speed_counter_add(req, 3);
    speed_histogram_observe(lat, 0.2);
    speed_http_server_t *srv = start_server(1 << 20, m);
    speed_http_client_t *c = connect_to(srv);
    const speed_http_response_t *r;
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/metrics", NULL, 0, NULL, 0, &r), SPEED_OK);
    CHECK_INT_EQ(r->status, 200);
    CHECK_STR_EQ(speed_http_response_header(r, "Content-Type"), "text/plain; version=0.0.4");
    CHECK_CONTAINS(r->body, "speed_router_requests_total 3\n");
    CHECK_CONTAINS(r->body, "speed_router_e2e_request_latency_seconds_count 1\n");
    char err[256];
    CHECK_MSG(prom_check(r->body, err, sizeof(err)) == 0, "%s", err);
    speed_http_client_destroy(c);
    speed_http_server_destroy(srv);
    speed_metrics_destroy(m);
}

static void test_server_misc(speed_http_server_t *srv) {
    speed_http_server_params_t p = speed_http_server_default_params();
    speed_http_server_t *other = NULL;
    p.host = "localhost"; /* not numeric */
    speed_log_set_sink(tu_log_discard, NULL);
    CHECK_INT_EQ(speed_http_server_create(&p, &other), SPEED_ERR_INVALID_ARGUMENT);
    p = speed_http_server_default_params();
    p.port = speed_http_server_port(srv);
    CHECK_INT_EQ(speed_http_server_create(&p, &other), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_start(other), SPEED_ERR_IO); /* port taken */
    speed_log_set_sink(NULL, NULL);
    CHECK_INT_EQ(speed_http_server_port(other), 0);
    speed_http_server_destroy(other);
    speed_http_server_destroy(NULL);

    /* one thread, IPv6 loopback */
    p = speed_http_server_default_params();
    p.host = "::1";
    p.n_threads = 1;
    CHECK_INT_EQ(speed_http_server_create(&p, &other), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(other, "GET", "/health", h_health, NULL), SPEED_OK);
    if (speed_http_server_start(other) == SPEED_OK) {
        int status = 0;
        CHECK_INT_EQ(speed_http_get("::1", speed_http_server_port(other), "/health", 5000, &status, NULL), SPEED_OK);
        CHECK_INT_EQ(status, 200);
    } else {
        fprintf(stderr, "note: no IPv6 loopback here, skipped that part\n");
    }
    speed_http_server_destroy(other);

    /* client errors: nobody listening */
    speed_http_client_t *c = NULL;
    int fd = raw_connect(speed_http_server_port(srv));
    close(fd);
    CHECK_INT_EQ(speed_http_client_connect("127.0.0.1", 1, 2000, &c), SPEED_ERR_PEER_UNREACHABLE);
}

/* ---- the gate and the pending-bytes bound ---------------------------------------------------- */

static atomic_int g_gate_calls, g_gate_ends;
static int g_bound_st[4];

static void gate_end(void *data) {
    CHECK(data == (void *)&g_gate_calls);
    atomic_fetch_add(&g_gate_ends, 1);
}

static bool h_gate(void *user, speed_http_request_t *req) {
    (void)user;
    atomic_fetch_add(&g_gate_calls, 1);
    if (strcmp(speed_http_request_path(req), "/refused") == 0) {
        speed_http_respond_error(req, 401, "invalid_request_error", "no");
        return false;
    }
    if (strcmp(speed_http_request_path(req), "/forbidden") == 0) return false; /* no answer: 403 */
    speed_http_request_set_user(req, &g_gate_calls, gate_end);
    return true;
}

static void h_bound(void *user, speed_http_request_t *req) {
    (void)user;
    CHECK(speed_http_request_user(req) == (void *)&g_gate_calls);
    speed_http_stream_t *s;
    if (speed_http_respond_stream(req, 200, "text/event-stream", NULL, NULL, &s) != SPEED_OK) return;
    speed_http_stream_set_max_pending(s, 1000);
    char chunk[600];
    memset(chunk, 'x', sizeof chunk);
    /* nothing is sent before the handler returns: the second write passes the bound */
    g_bound_st[0] = speed_http_stream_write(s, chunk, sizeof chunk);
    g_bound_st[1] = speed_http_stream_write(s, chunk, sizeof chunk);
    g_bound_st[2] = speed_http_stream_is_overrun(s) && speed_http_stream_pending(s) == 0;
    g_bound_st[3] = speed_http_stream_write(s, "y", 1);
    speed_http_stream_close(s);
}

static void test_gate_and_bound(void) {
    speed_http_server_params_t p = speed_http_server_default_params();
    speed_http_server_t *srv = NULL;
    CHECK_INT_EQ(speed_http_server_create(&p, &srv), SPEED_OK);
    if (!srv) return;
    CHECK_INT_EQ(speed_http_server_gate(srv, h_gate, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "GET", "/bound", h_bound, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_route(srv, "POST", "/refused", h_echo, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_start(srv), SPEED_OK);
    CHECK_INT_EQ(speed_http_server_gate(srv, h_gate, NULL), SPEED_ERR_INVALID_ARGUMENT); /* after start */

    /* Refused on its headers: the answer comes although the 512 KiB body was never sent. */
    speed_http_client_t *c = connect_to(srv);
    const speed_http_response_t *resp = NULL;
    if (c) {
        speed_http_header_t h[1] = {{"Content-Length", "524288"}};
        CHECK_INT_EQ(speed_http_client_request_begin(c, "POST", "/refused", h, 1, NULL, 0, &resp), SPEED_OK);
        CHECK_INT_EQ(resp->status, 401);
        speed_http_client_destroy(c);
    }
    int status = 0;
    CHECK_INT_EQ(speed_http_get("127.0.0.1", speed_http_server_port(srv), "/forbidden", 10000, &status, NULL),
                 SPEED_OK);
    CHECK_INT_EQ(status, 403);

    /* The bound: the write that passes it fails, drops the bytes, and so do later ones. */
    char *body = NULL;
    speed_http_get("127.0.0.1", speed_http_server_port(srv), "/bound", 10000, &status, &body);
    speed_free(body);
    CHECK_INT_EQ(g_bound_st[0], SPEED_OK);
    CHECK_INT_EQ(g_bound_st[1], SPEED_ERR_CANCELLED);
    CHECK_INT_EQ(g_bound_st[2], 1);
    CHECK_INT_EQ(g_bound_st[3], SPEED_ERR_CANCELLED);
    speed_http_server_destroy(srv);
    /* every request the gate let through had its end callback, once */
    CHECK_INT_EQ(atomic_load(&g_gate_calls), 3);
    CHECK_INT_EQ(atomic_load(&g_gate_ends), 1);
}

int main(void) {
    sem_init(&g_go, 0, 0);
    int64_t live = speed_alloc_live_count();
    speed_http_server_t *srv = start_server(1 << 20, NULL);
    if (!srv) return CHECK_DONE();
    test_routing(srv);
    test_keepalive(srv);
    test_sse(srv);
    test_deferred(srv);
    test_many_streams(srv);
    test_server_misc(srv);
    speed_http_server_destroy(srv);
    test_body_limit();
    test_metrics_route();
    test_gate_and_bound();
    writers_join(NULL);
    CHECK_INT_EQ(wait_live_count(live, 2000), live);
    sem_destroy(&g_go);
    return CHECK_DONE();
}
