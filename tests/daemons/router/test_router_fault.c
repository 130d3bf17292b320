/* speed-router daemon under faults, against fake nodes: a failing prefill node (retried on
 * the other), a decode node that dies mid-stream (with router.max_migrations 0: SSE error event,
 * no hang, node marked down, the next requests go to the other node; by default the stream is
 * re-issued on the other node with the tokens already sent as resumed ones and goes on, no
 * token twice or missing, streamed and not, until router.max_migrations is reached), clients that go away mid-stream or during the
 * prefill (the decode node gets Cancel for that request id and the Generate stream is
 * cancelled, also when the nodes ignore Cancel RPCs), overload (429 with Retry-After,
 * queue timeout 503), no KV room anywhere (503 + Retry-After), and SIGTERM with a request in
 * flight (it completes, exit 0). Every scenario ends balanced (check_balanced): each
 * reservation a decode node granted was generated to its end or cancelled, no node is busy,
 * the router holds no request. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "router_test_util.h"

static char model_dir[512];
static char cluster[1024];
static fake_node_t pre[2], dec[2];
static int pbase, dbase;

static const char *CHAT = "{\"model\":\"tinymodel\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello there\"}],"
                          "\"max_tokens\":5}";
static const char *CHAT_STREAM = "{\"model\":\"tinymodel\",\"stream\":true,"
                                 "\"messages\":[{\"role\":\"user\",\"content\":\"Hello there\"}]}";

static void reset_fakes(void) {
    for (int i = 0; i < 2; i++) {
        fake_defaults(&pre[i]);
        fake_defaults(&dec[i]);
        fake_clear_ids(&pre[i]);
        fake_clear_ids(&dec[i]);
    }
}

/* The end of every scenario: what the decode nodes reserved was generated or cancelled, no
 * node is busy, and (router_port > 0: the router still runs) the router holds no request. */
static void check_balanced(const char *what, int router_port) {
    fake_check_balanced(what, dec, 2, pre, 2, router_port, 0, 10);
}

static int decode_nodes_up(int port) {
    cu_resp_t h;
    if (!cu_http(port, "GET", "/health", NULL, NULL, NULL, 30000, &h)) {
        cu_resp_free(&h);
        return -1;
    }
    json_t *j = json_of(h.body);
    int up = (int)jint(j, "decode_nodes_up");
    json_decref(j);
    cu_resp_free(&h);
    return up;
}

static bool start(router_proc_t *rp, const char *const *extra) {
    if (!router_start(rp, cluster, extra)) return false;
    if (!cu_wait_health(rp->port, 200, 10)) {
        fprintf(stderr, "router never became healthy\n");
        return false;
    }
    return true;
}

static void test_prefill_retry(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    atomic_store(&pre[0].prefill_code, SPEED_RPC_UNAVAILABLE);
    int ok = 0;
    int p1 = atomic_load(&pre[1].n_prefill), p0 = atomic_load(&pre[0].n_prefill);
    for (int i = 0; i < 4; i++) {
        cu_resp_t r;
        CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
        ok += r.status == 200;
        cu_resp_free(&r);
    }
    CHECK_INT_EQ(ok, 4);
    CHECK(atomic_load(&pre[0].n_prefill) > p0);           /* it was tried ... */
    CHECK_INT_EQ(atomic_load(&pre[1].n_prefill) - p1, 4); /* ... and node 1 answered all */
    char *m = cu_metrics(rp.port);
    CHECK(prom_value(m, "speed_router_prefill_retries_total") >= 1);
    speed_free(m);

    /* Every prefill node fails: 503 after the retries, and the reservation is freed. */
    atomic_store(&pre[1].prefill_code, SPEED_RPC_INTERNAL);
    int c0 = atomic_load(&dec[0].n_cancel) + atomic_load(&dec[1].n_cancel);
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    json_t *j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "error.type"), "server_error");
    json_decref(j);
    cu_resp_free(&r);
    CHECK(atomic_load(&dec[0].n_cancel) + atomic_load(&dec[1].n_cancel) > c0);
    check_balanced("prefill retry", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* A Reserve that fails at the node level (INTERNAL here; a timeout or a broken call alike) may
 * have left a reservation on the node (a slow node answers after the router gave up): the
 * router tries another decode node and also sends the first one a Cancel for the request, so
 * nothing stays reserved there until its lease. */
static void test_reserve_failure_cancels(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    atomic_store(&dec[0].reserve_code, SPEED_RPC_INTERNAL);
    int rsv0 = atomic_load(&dec[0].n_reserve), c0 = atomic_load(&dec[0].n_cancel);
    for (int i = 0; i < 4 && atomic_load(&dec[0].n_reserve) == rsv0; i++) {
        cu_resp_t r;
        CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
        CHECK_INT_EQ(r.status, 200); /* node 1 served it */
        cu_resp_free(&r);
    }
    CHECK_MSG(atomic_load(&dec[0].n_reserve) > rsv0, "the failing decode node was never tried");
    WAIT_FOR(atomic_load(&dec[0].n_cancel) > c0, 5000);
    CHECK_MSG(atomic_load(&dec[0].n_cancel) > c0, "no Cancel reached the node whose Reserve failed");
    check_balanced("reserve failure", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* The content pieces of a streamed chat answer from the fakes, checked token by token: piece
 * i is "t<i> " or "F" (a first token from a prefill node): none repeated, none missing. Returns
 * how many there were, or -1 (printed) when the sequence breaks. *n_first_p: how many "F". */
static int check_fake_pieces(const sse_result_t *s, int *n_first_p) {
    int i = 0;
    *n_first_p = 0;
    for (int e = 0; e < s->n; e++) {
        json_t *j = json_of(s->data[e]);
        const char *piece = jstr(j, "choices[0].delta.content");
        if (piece && piece[0]) { /* the role chunk has "" */
            char want[32];
            snprintf(want, sizeof want, "t%d ", i);
            if (strcmp(piece, "F") == 0) {
                (*n_first_p)++;
            } else if (strcmp(piece, want) != 0) {
                fprintf(stderr, "piece %d is \"%s\", expected \"%s\" or \"F\"\n", i, piece, want);
                json_decref(j);
                return -1;
            }
            i++;
        }
        json_decref(j);
    }
    return i;
}

static double migrations(int port, const char *outcome) {
    char *m = cu_metrics(port);
    char series[96];
    snprintf(series, sizeof series, "speed_router_migrations_total{outcome=\"%s\"}", outcome);
    double v = prom_value(m, series);
    speed_free(m);
    return v;
}

/* A streamed completion that ends with an error event whose message contains `why`, then [DONE]. */
static void stream_ends_with_error(int port, const char *why) {
    const char *body = "{\"model\":\"tinymodel\",\"stream\":true,\"prompt\":\"Hello there\",\"max_tokens\":40}";
    sse_result_t s;
    CHECK(sse_post(port, "/v1/completions", body, NULL, &s));
    CHECK(s.n >= 2);
    if (s.n >= 2) {
        CHECK_STR_EQ(s.data[s.n - 1], "[DONE]");
        json_t *e = json_of(s.data[s.n - 2]);
        const char *m = jstr(e, "error.message");
        CHECK_MSG(m && strstr(m, why), "not the error \"%s\": %s", why, s.data[s.n - 2]);
        json_decref(e);
    }
    sse_result_free(&s);
}

/* A decode node dies mid-stream: the router re-issues the rest (the client's prompt + the
 * tokens it relayed, resumed) on the other decode node through the normal route (Reserve and
 * Prefill with resume_tokens) and the same stream goes on, no token twice, none missing. */
static void test_decode_dies_migrates(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL)); /* router.max_migrations: 3 (default) */
    if (rp.exited || !rp.pid) return;
    CHECK(migrations(rp.port, "ok") == 0 && migrations(rp.port, "failed") == 0);
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 40);
        atomic_store(&dec[i].gen_delay_ms, 30);
    }
    speed_http_client_t *c = NULL;
    sse_result_t s;
    CHECK(sse_begin(rp.port, "/v1/chat/completions", CHAT_STREAM, NULL, &c, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(sse_read(c, &s, 4)); /* role + 3 content chunks */
    int victim = atomic_load(&dec[0].n_gen_active) > 0 ? 0 : 1;
    CHECK(atomic_load(&dec[victim].n_gen_active) == 1);
    fake_kill(&dec[victim]);
    CHECK(sse_read(c, &s, -1));
    CHECK(s.ended);
    int n_first = 0;
    int n = check_fake_pieces(&s, &n_first);
    CHECK_INT_EQ(n, 40);
    CHECK_INT_EQ(n_first, 2); /* one first token from each prefill */
    int other = 1 - victim;
    int k = atomic_load(&dec[other].last_generate_resumed);
    CHECK_MSG(k >= 3 && k < 40, "the re-issue resumed %d tokens", k);
    CHECK_INT_EQ(atomic_load(&dec[other].last_reserve_resume), k);
    CHECK_INT_EQ(atomic_load(&pre[0].last_prefill_resume) + atomic_load(&pre[1].last_prefill_resume), k);
    if (s.n >= 3) {
        CHECK_STR_EQ(s.data[s.n - 1], "[DONE]");
        json_t *e = json_of(s.data[s.n - 2]);
        CHECK_MSG(!jget(e, "error"), "an error event: %s", s.data[s.n - 2]);
        CHECK_STR_EQ(jstr(e, "choices[0].finish_reason"), "length");
        json_decref(e);
    }
    sse_result_free(&s);
    speed_http_client_destroy(c);
    CHECK(migrations(rp.port, "ok") == 1 && migrations(rp.port, "failed") == 0);

    /* Non-streamed: the other node breaks its stream after 6 tokens; the victim is back. */
    CHECK(fake_start(&dec[victim], "decode-again", dbase + victim) == SPEED_OK);
    WAIT_FOR(decode_nodes_up(rp.port) == 2, 10000);
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 12);
        atomic_store(&dec[i].gen_delay_ms, 0);
        atomic_store(&dec[i].gen_break_after, -1);
        atomic_store(&dec[i].last_generate_resumed, -1);
    }
    atomic_store(&dec[0].gen_break_after, 6);
    atomic_store(&dec[1].gen_break_after, 6);
    const char *plain = "{\"model\":\"tinymodel\",\"prompt\":\"Hello there\",\"max_tokens\":12}";
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/completions", plain, &r));
    /* both nodes break after 6: the first re-issue goes on to 12 on the other node */
    CHECK_INT_EQ(r.status, 200);
    json_t *j = json_of(r.body);
    const char *text = jstr(j, "choices[0].text");
    CHECK_STR_EQ(text, "Ft1 t2 t3 t4 t5 Ft7 t8 t9 t10 t11 ");
    CHECK_INT_EQ(jint(j, "usage.completion_tokens"), 12);
    CHECK_INT_EQ(jint(j, "usage.prompt_tokens") > 0, 1);
    json_decref(j);
    cu_resp_free(&r);
    CHECK(migrations(rp.port, "ok") == 2);
    /* No healthy path left: both nodes break after 3 tokens. Each re-issue may go to either
     * node once it is up again (the one that broke is down until its next health poll says
     * SERVING, and the request waits for it rather than fail at once), so the request migrates
     * until router.max_migrations (3) and then ends with an error event, counted. */
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_break_after, 3);
        atomic_store(&dec[i].gen_tokens, 40);
    }
    WAIT_FOR(decode_nodes_up(rp.port) == 2, 10000);
    stream_ends_with_error(rp.port, "router.max_migrations reached");
    CHECK_MSG(migrations(rp.port, "ok") == 5 && migrations(rp.port, "failed") == 1, "migrations ok %g, failed %g",
              migrations(rp.port, "ok"), migrations(rp.port, "failed"));
    WAIT_FOR(decode_nodes_up(rp.port) == 2, 10000);
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_break_after, -1);
    check_balanced("decode node died, stream migrated", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);

    /* The limit: router.max_migrations 1, the re-issue breaks too. */
    const char *one[] = {"--router.max_migrations", "1", NULL};
    CHECK(start(&rp, one));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_break_after, 3);
    WAIT_FOR(decode_nodes_up(rp.port) == 2, 10000);
    stream_ends_with_error(rp.port, "router.max_migrations reached");
    CHECK(migrations(rp.port, "ok") == 1 && migrations(rp.port, "failed") == 1);
    WAIT_FOR(decode_nodes_up(rp.port) == 2, 10000);
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_break_after, -1);
    check_balanced("migration limit", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* Every prefill attempt failed in its KV transfer (ABORTED: the decode node froze or died, or
 * its link did): the prefill nodes are not at fault, so the router starts over on the other
 * decode node with a new reservation instead of answering 503, and marks nobody down. */
static void test_transfer_failures_try_other_decode(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) atomic_store(&pre[i].prefill_code, SPEED_RPC_ABORTED);
    int r0 = atomic_load(&dec[0].n_reserve) + atomic_load(&dec[1].n_reserve);
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    cu_resp_free(&r);
    CHECK_MSG(atomic_load(&dec[0].n_reserve) + atomic_load(&dec[1].n_reserve) - r0 == 2,
              "%d reservations for one request whose transfers failed: want one on each decode node",
              atomic_load(&dec[0].n_reserve) + atomic_load(&dec[1].n_reserve) - r0);
    CHECK_INT_EQ(decode_nodes_up(rp.port), 2);
    char *m = cu_metrics(rp.port);
    CHECK_MSG(prom_value(m, "speed_router_decode_retries_total") == 2, "speed_router_decode_retries_total %g",
              prom_value(m, "speed_router_decode_retries_total"));
    speed_free(m);
    /* with one prefill node healthy again the next request is served */
    atomic_store(&pre[1].prefill_code, 0);
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    check_balanced("transfer failures", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* A decode node that refuses a Reserve because it drains (CANCELLED "node is draining") is not
 * a failed node: the request goes to the other one, and speed_router_node_down_total stays 0. */
static void test_reserve_draining(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    atomic_store(&dec[0].reserve_code, SPEED_RPC_CANCELLED);
    int rsv0 = atomic_load(&dec[0].n_reserve);
    for (int i = 0; i < 4 && atomic_load(&dec[0].n_reserve) == rsv0; i++) {
        cu_resp_t r;
        CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
        CHECK_INT_EQ(r.status, 200);
        cu_resp_free(&r);
    }
    CHECK_MSG(atomic_load(&dec[0].n_reserve) > rsv0, "the draining decode node was never tried");
    char *m = cu_metrics(rp.port);
    char series[160];
    snprintf(series, sizeof series, "speed_router_node_down_total{pool=\"decode\",node=\"127.0.0.1:%d\"}", dbase);
    CHECK_MSG(prom_value(m, series) == 0, "%s = %g: a draining node was counted as failed", series,
              prom_value(m, series));
    speed_free(m);
    check_balanced("reserve draining", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* A prefill retry gets only what is left of the descriptor's put window, counted from the
 * Reserve reply, and none is tried once it is (nearly) over: the decode node frees the blocks
 * at its lease end, and a late retry with a fresh window put into blocks a running request
 * had been given (test_chaos freeze-decode: wrong tokens). */
static void test_prefill_retry_put_window(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].desc_lease_ms, 1000);
        atomic_store(&pre[i].prefill_code, SPEED_RPC_INTERNAL);
        atomic_store(&pre[i].last_prefill_lease_ms, -1);
    }
    /* the first attempt fails quickly: the retry gets the rest of the window */
    for (int i = 0; i < 2; i++) atomic_store(&pre[i].prefill_delay_ms, 300);
    int n0 = atomic_load(&pre[0].n_prefill) + atomic_load(&pre[1].n_prefill);
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    cu_resp_free(&r);
    CHECK_INT_EQ(atomic_load(&pre[0].n_prefill) + atomic_load(&pre[1].n_prefill) - n0, 2);
    int l0 = atomic_load(&pre[0].last_prefill_lease_ms), l1 = atomic_load(&pre[1].last_prefill_lease_ms);
    int lo = l0 < l1 ? l0 : l1, hi = l0 < l1 ? l1 : l0;
    CHECK_MSG(hi == 1000, "the first attempt's window: %d ms, want 1000", hi);
    CHECK_MSG(lo > 0 && lo <= 700, "the retry's window: %d ms, want at most 1000 - 300", lo);
    /* the first attempt outlasts the window: no retry */
    for (int i = 0; i < 2; i++) atomic_store(&pre[i].prefill_delay_ms, 1100);
    n0 = atomic_load(&pre[0].n_prefill) + atomic_load(&pre[1].n_prefill);
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    CHECK_CONTAINS(r.body ? r.body : "", "put window");
    cu_resp_free(&r);
    CHECK_INT_EQ(atomic_load(&pre[0].n_prefill) + atomic_load(&pre[1].n_prefill) - n0, 1);
    check_balanced("prefill retry put window", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* router.max_migrations 0: the old behaviour, an error event ends the stream. */
static void test_decode_dies_mid_stream(void) {
    reset_fakes();
    router_proc_t rp;
    const char *no_migration[] = {"--router.max_migrations", "0", NULL};
    CHECK(start(&rp, no_migration));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 40);
        atomic_store(&dec[i].gen_delay_ms, 50);
    }
    speed_http_client_t *c = NULL;
    sse_result_t s;
    CHECK(sse_begin(rp.port, "/v1/chat/completions", CHAT_STREAM, NULL, &c, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(sse_read(c, &s, 3)); /* role + 2 content chunks */
    int victim = atomic_load(&dec[0].n_gen_active) > 0 ? 0 : 1;
    CHECK(atomic_load(&dec[victim].n_gen_active) == 1);
    double t0 = now_s();
    fake_kill(&dec[victim]);
    CHECK(sse_read(c, &s, -1));
    CHECK_MSG(now_s() - t0 < 5, "the stream took %.1f s to end", now_s() - t0);
    CHECK(s.ended);
    CHECK(s.n >= 5);
    if (s.n >= 2) {
        CHECK_STR_EQ(s.data[s.n - 1], "[DONE]");
        json_t *e = json_of(s.data[s.n - 2]);
        CHECK_MSG(json_is_object(jget(e, "error")), "no error event: %s", s.data[s.n - 2]);
        CHECK_STR_EQ(jstr(e, "error.type"), "server_error");
        json_decref(e);
    }
    sse_result_free(&s);
    speed_http_client_destroy(c);

    /* The node is down: every request now goes to the other one. */
    int other = 1 - victim;
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_tokens, 5), atomic_store(&dec[i].gen_delay_ms, 0);
    int g0 = atomic_load(&dec[other].n_generate);
    for (int i = 0; i < 4; i++) {
        cu_resp_t r;
        CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
        CHECK_INT_EQ(r.status, 200);
        cu_resp_free(&r);
    }
    CHECK_INT_EQ(atomic_load(&dec[other].n_generate) - g0, 4);
    char *m = cu_metrics(rp.port);
    char series[128];
    snprintf(series, sizeof series, "speed_router_node_up{pool=\"decode\",node=\"127.0.0.1:%d\"}", dbase + victim);
    CHECK(prom_value(m, series) == 0);
    snprintf(series, sizeof series, "speed_router_node_up{pool=\"decode\",node=\"127.0.0.1:%d\"}", dbase + other);
    CHECK(prom_value(m, series) == 1);
    /* taken out by the request that saw it die (not by the poller): counted once all the same */
    snprintf(series, sizeof series, "speed_router_node_down_total{pool=\"decode\",node=\"127.0.0.1:%d\"}",
             dbase + victim);
    CHECK_MSG(prom_value(m, series) == 1, "%s = %g", series, prom_value(m, series));
    CHECK(prom_value(m, "speed_router_requests_total{route=\"disaggregated\",status=\"503\"}") == 1);
    speed_free(m);
    cu_resp_t h;
    CHECK(cu_http(rp.port, "GET", "/health", NULL, NULL, NULL, 30000, &h));
    json_t *j = json_of(h.body);
    CHECK_INT_EQ(jint(j, "decode_nodes_up"), 1);
    json_decref(j);
    cu_resp_free(&h);

    /* The node comes back: health SERVING brings it back into rotation. */
    CHECK(fake_start(&dec[victim], "decode-again", dbase + victim) == SPEED_OK);
    WAIT_FOR(decode_nodes_up(rp.port) == 2, 10000);
    CHECK_INT_EQ(decode_nodes_up(rp.port), 2);
    int gv = atomic_load(&dec[victim].n_generate);
    for (int i = 0; i < 2; i++) {
        cu_resp_t r;
        CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
        CHECK_INT_EQ(r.status, 200);
        cu_resp_free(&r);
    }
    CHECK_INT_EQ(atomic_load(&dec[victim].n_generate) - gv, 1);
    check_balanced("decode node died and came back", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);

    /* Every decode node dead: /health 503, requests 503. */
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    fake_kill(&dec[0]);
    fake_kill(&dec[1]);
    CHECK(cu_wait_health(rp.port, 503, 10));
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    CHECK(r.retry_after[0] != '\0');
    cu_resp_free(&r);
    check_balanced("every decode node dead", rp.port); /* the prefill nodes and the router */
    CHECK_INT_EQ(router_stop(&rp), 0);
    CHECK(fake_start(&dec[0], "decode0", dbase) == SPEED_OK);
    CHECK(fake_start(&dec[1], "decode1", dbase + 1) == SPEED_OK);
}

/* The decode node that reserved the request the client sent as X-Request-Id `xid` (-1: none
 * or both); its node-side id goes to id. */
static int reserving_node(const char *xid, char *id, size_t cap) {
    char prefix[96];
    snprintf(prefix, sizeof prefix, "%s.", xid);
    int found = -1, n_found = 0;
    for (int i = 0; i < 2; i++)
        if (fake_find_id(&dec[i], FAKE_IDS_RESERVED, prefix, id, cap)) found = i, n_found++;
    return n_found == 1 ? found : -1;
}

/* A streaming chat request written on a raw socket: the router sends its response head
 * with the first token, after the prefill, so no client call could return before that. */
static int raw_stream_request(int port, const char *xid) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    char head[512];
    int hl = snprintf(head, sizeof head,
                      "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "X-Request-Id: %s\r\nContent-Length: %zu\r\n\r\n",
                      xid, strlen(CHAT_STREAM));
    if (write(fd, head, (size_t)hl) != hl ||
        write(fd, CHAT_STREAM, strlen(CHAT_STREAM)) != (ssize_t)strlen(CHAT_STREAM)) {
        close(fd);
        return -1;
    }
    return fd;
}

static const char *GONE_SERIES = "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}";

/* A client that goes away must cancel its request's decode leg: the decode node that
 * reserved it gets Cancel for that very id (the Generate stream ending is not enough: the
 * reservation is what must be freed), whether it leaves mid-stream or during the prefill. */
static void test_client_disconnect(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 200);
        atomic_store(&dec[i].gen_delay_ms, 30);
    }
    int x0 = atomic_load(&dec[0].n_gen_cancelled) + atomic_load(&dec[1].n_gen_cancelled);
    speed_http_client_t *c = NULL;
    sse_result_t s;
    CHECK(sse_begin(rp.port, "/v1/chat/completions", CHAT_STREAM, "gone-1", &c, &s));
    CHECK_STR_EQ(s.request_id, "gone-1");
    CHECK(sse_read(c, &s, 3));
    char id[128] = "";
    int k = reserving_node("gone-1", id, sizeof id);
    CHECK_MSG(k >= 0, "no single decode node reserved gone-1");
    if (k >= 0) CHECK_MSG(atomic_load(&dec[k].n_gen_active) == 1, "%s is not generating %s", dec[k].name, id);
    speed_http_client_destroy(c); /* the client goes away mid-stream */
    sse_result_free(&s);
    if (k >= 0) {
        WAIT_FOR(fake_has_id(&dec[k], FAKE_IDS_CANCELLED, id), 10000);
        CHECK_MSG(fake_has_id(&dec[k], FAKE_IDS_CANCELLED, id),
                  "%s got no Cancel for %s after its client left mid-stream", dec[k].name, id);
        CHECK_MSG(!fake_has_id(&dec[k], FAKE_IDS_GENERATED, id), "%s ran to its end", id);
    }
    WAIT_FOR(atomic_load(&dec[0].n_gen_cancelled) + atomic_load(&dec[1].n_gen_cancelled) > x0, 10000);
    CHECK_MSG(atomic_load(&dec[0].n_gen_cancelled) + atomic_load(&dec[1].n_gen_cancelled) > x0,
              "the Generate stream was not cancelled");
    /* The router counts it as 499 and keeps serving. */
    CHECK(cu_wait_metric(rp.port, GONE_SERIES, 1, 10));
    check_balanced("client gone mid-stream", rp.port);

    /* Gone while the prefill runs: the prefill nodes hold every Prefill at their gate, so the
     * client leaves while the prefill is provably in progress (the router has a reservation
     * on a decode node and no first token). */
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 5);
        atomic_store(&dec[i].gen_delay_ms, 0);
        atomic_store(&pre[i].prefill_gate, true);
    }
    int fd = raw_stream_request(rp.port, "gone-2");
    CHECK(fd >= 0);
    WAIT_FOR(atomic_load(&pre[0].n_prefill_gated) + atomic_load(&pre[1].n_prefill_gated) == 1, 10000);
    CHECK_INT_EQ(atomic_load(&pre[0].n_prefill_gated) + atomic_load(&pre[1].n_prefill_gated), 1);
    k = reserving_node("gone-2", id, sizeof id);
    CHECK_MSG(k >= 0, "no single decode node reserved gone-2");
    int kp = fake_has_id(&pre[0], FAKE_IDS_PREFILL, id) ? 0 : 1;
    CHECK_MSG(fake_has_id(&pre[kp], FAKE_IDS_PREFILL, id), "no prefill node got %s", id);
    if (fd >= 0) close(fd); /* gone mid-prefill */
    if (k >= 0) {
        WAIT_FOR(fake_has_id(&dec[k], FAKE_IDS_CANCELLED, id), 10000);
        CHECK_MSG(fake_has_id(&dec[k], FAKE_IDS_CANCELLED, id),
                  "%s got no Cancel for %s after its client left during the prefill", dec[k].name, id);
        WAIT_FOR(fake_has_id(&pre[kp], FAKE_IDS_CANCELLED, id), 10000);
        CHECK_MSG(fake_has_id(&pre[kp], FAKE_IDS_CANCELLED, id), "%s got no Cancel for %s", pre[kp].name, id);
        CHECK_MSG(!fake_has_id(&dec[k], FAKE_IDS_GENERATED, id), "%s was generated after its client left", id);
    }
    CHECK(cu_wait_metric(rp.port, GONE_SERIES, 2, 10));
    check_balanced("client gone during the prefill", rp.port); /* the gate let go of the cancelled prefill */
    reset_fakes();
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* A client that leaves cancels each leg itself, at once: not only through the node that
 * obeys a Cancel RPC. (1) The prefill nodes ignore Cancel and hold the prefill at their gate:
 * the decode node holding the reservation still gets Cancel while the prefill runs. (2) The
 * decode nodes ignore Cancel and a generation stalls: the router still cancels the Generate
 * stream itself, well before the stall ends. */
static void test_client_disconnect_cancel_ignored(void) {
    reset_fakes();
    router_proc_t rp;
    /* the request deadline (20 s in the harness) would also end the stream, inside the 20 s
     * this test allows the cancel: put it far away so only the cancel can */
    const char *args[] = {"--router.request_timeout_ms", "120000", NULL};
    CHECK(start(&rp, args));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) {
        atomic_store(&pre[i].cancel_ignored, true);
        atomic_store(&pre[i].prefill_gate, true);
    }
    int fd = raw_stream_request(rp.port, "gone-3");
    CHECK(fd >= 0);
    WAIT_FOR(atomic_load(&pre[0].n_prefill_gated) + atomic_load(&pre[1].n_prefill_gated) == 1, 10000);
    char id[128] = "";
    int k = reserving_node("gone-3", id, sizeof id);
    CHECK_MSG(k >= 0, "no single decode node reserved gone-3");
    if (fd >= 0) close(fd); /* gone mid-prefill */
    if (k >= 0) {
        /* Before its first token the router learns the client left at its next SSE ping
         * (SPEED_ROUTER_SSE_PING_MS, 5 s); the worker waits on the prefill all along, so only
         * the cancel itself can send this Cancel. */
        WAIT_FOR(fake_has_id(&dec[k], FAKE_IDS_CANCELLED, id), 10000);
        CHECK_MSG(fake_has_id(&dec[k], FAKE_IDS_CANCELLED, id),
                  "%s got no Cancel for %s after its client left, the prefill still running", dec[k].name, id);
    }
    CHECK_INT_EQ(atomic_load(&pre[0].n_prefill_gated) + atomic_load(&pre[1].n_prefill_gated), 1); /* still running */
    for (int i = 0; i < 2; i++) atomic_store(&pre[i].prefill_gate, false);                        /* the prefill ends */
    CHECK(cu_wait_metric(rp.port, GONE_SERIES, 1, 10));
    check_balanced("client gone, prefill node ignores Cancel", rp.port);

    reset_fakes();
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].cancel_ignored, true);
        atomic_store(&dec[i].gen_tokens, 10);
        atomic_store(&dec[i].gen_stall_after, 3); /* the worker then waits on the stream */
    }
    speed_http_client_t *c = NULL;
    sse_result_t s;
    CHECK(sse_begin(rp.port, "/v1/chat/completions", CHAT_STREAM, "gone-4", &c, &s));
    CHECK(sse_read(c, &s, 3));
    k = reserving_node("gone-4", id, sizeof id);
    CHECK_MSG(k >= 0, "no single decode node reserved gone-4");
    speed_http_client_destroy(c); /* the client goes away mid-stream */
    sse_result_free(&s);
    if (k >= 0) {
        /* The router learns the client left from its SSE pings (SPEED_ROUTER_SSE_PING_MS, 5 s
         * apart; the first one still fits the socket, the second fails). The cancel must reach
         * the stream then, not when the worker next writes (after the stall, FAKE_STALL_MS). */
        double t0 = now_s();
        WAIT_FOR(fake_has_id(&dec[k], FAKE_IDS_STREAM_CANCELLED, id), 20000);
        CHECK_MSG(fake_has_id(&dec[k], FAKE_IDS_STREAM_CANCELLED, id),
                  "the Generate stream of %s on %s was not cancelled within 20 s of its client leaving", id,
                  dec[k].name);
        fprintf(stderr, "stream cancelled %.1f s after the client left\n", now_s() - t0);
    }
    CHECK(cu_wait_metric(rp.port, GONE_SERIES, 2, 10));
    check_balanced("client gone, decode node ignores Cancel", rp.port);
    reset_fakes();
    CHECK_INT_EQ(router_stop(&rp), 0);
}

typedef struct {
    int port;
    cu_resp_t r;
    bool ok;
} bg_post_t;

static void *bg_post(void *arg) {
    bg_post_t *b = arg;
    b->ok = cu_post(b->port, "/v1/chat/completions", CHAT, &b->r);
    return NULL;
}

static void test_overload(void) {
    reset_fakes();
    router_proc_t rp;
    const char *args[] = {
        "--router.max_in_flight", "1", "--router.max_queue", "1", "--router.queue_timeout_ms", "700", NULL};
    CHECK(start(&rp, args));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 20);
        atomic_store(&dec[i].gen_delay_ms, 100); /* 2 s per request */
    }
    speed_http_client_t *c = NULL;
    sse_result_t s;
    CHECK(sse_begin(rp.port, "/v1/chat/completions", CHAT_STREAM, NULL, &c, &s)); /* holds the slot */
    CHECK_INT_EQ(s.status, 200);
    bg_post_t b = {rp.port, {0}, false};
    pthread_t th;
    double t0 = now_s();
    pthread_create(&th, NULL, bg_post, &b); /* queued */
    WAIT_FOR(cu_metric(rp.port, "speed_router_requests_waiting") == 1, 10000);
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r)); /* refused */
    CHECK_INT_EQ(r.status, 429);
    CHECK_STR_EQ(r.retry_after, "1");
    json_t *j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "error.type"), "requests");
    CHECK_STR_EQ(jstr(j, "error.code"), "rate_limit_exceeded");
    json_decref(j);
    cu_resp_free(&r);
    char *m = cu_metrics(rp.port);
    CHECK(prom_value(m, "speed_router_requests_running") == 1);
    CHECK(prom_value(m, "speed_router_requests_waiting") == 1);
    speed_free(m);
    pthread_join(th, NULL);
    CHECK(b.ok);
    CHECK_INT_EQ(b.r.status, 503);
    CHECK(b.r.retry_after[0] != '\0');
    CHECK_MSG(now_s() - t0 >= 0.6 && now_s() - t0 < 1.9, "queue wait %.2f s", now_s() - t0);
    j = json_of(b.r.body);
    CHECK_STR_EQ(jstr(j, "error.type"), "server_error");
    json_decref(j);
    cu_resp_free(&b.r);
    CHECK(sse_read(c, &s, -1));
    CHECK(s.n >= 2 && strcmp(s.data[s.n - 1], "[DONE]") == 0);
    sse_result_free(&s);
    speed_http_client_destroy(c);

    /* No KV room on any decode node: 503 with Retry-After. */
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].reserve_code, SPEED_RPC_RESOURCE_EXHAUSTED);
    int r0 = atomic_load(&dec[0].n_reserve) + atomic_load(&dec[1].n_reserve);
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    CHECK_STR_EQ(r.retry_after, "1");
    cu_resp_free(&r);
    CHECK_INT_EQ(atomic_load(&dec[0].n_reserve) + atomic_load(&dec[1].n_reserve) - r0, 2);
    /* ... and that is not the nodes' fault: both stay up */
    CHECK(cu_wait_health(rp.port, 200, 1));
    check_balanced("overload", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

static void test_sigterm_drain(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 15);
        atomic_store(&dec[i].gen_delay_ms, 100);
    }
    speed_http_client_t *c = NULL;
    sse_result_t s;
    CHECK(sse_begin(rp.port, "/v1/chat/completions", CHAT_STREAM, NULL, &c, &s));
    CHECK(sse_read(c, &s, 2));
    kill(rp.pid, SIGTERM);
    CHECK(cu_wait_health(rp.port, 503, 3)); /* draining */
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    cu_resp_free(&r);
    CHECK(sse_read(c, &s, -1));
    CHECK(s.ended);
    CHECK_MSG(s.n == 1 + 15 + 1 + 1, "%d events", s.n); /* role, 15 tokens, finish, [DONE] */
    if (s.n >= 1) CHECK_STR_EQ(s.data[s.n - 1], "[DONE]");
    sse_result_free(&s);
    speed_http_client_destroy(c);
    CHECK(router_wait(&rp, 10));
    CHECK_MSG(WIFEXITED(rp.status) && WEXITSTATUS(rp.status) == 0, "exit %d, signal %d",
              WIFEXITED(rp.status) ? WEXITSTATUS(rp.status) : -1, WIFSIGNALED(rp.status) ? WTERMSIG(rp.status) : 0);
    check_balanced("SIGTERM drain", 0); /* the router is gone: its gauge with it */
}

/* router.request_timeout_ms bounds every leg: a slow prefill gives a 503 and frees the
 * reservation; a slow generation ends with an SSE error event. */
static void test_request_timeout(void) {
    reset_fakes();
    router_proc_t rp;
    const char *args[] = {"--router.request_timeout_ms", "600", NULL};
    CHECK(start(&rp, args));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) atomic_store(&pre[i].prefill_delay_ms, 3000);
    int c0 = atomic_load(&dec[0].n_cancel) + atomic_load(&dec[1].n_cancel);
    double t0 = now_s();
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 503);
    CHECK_MSG(now_s() - t0 < 2.5, "took %.2f s", now_s() - t0);
    CHECK_CONTAINS(r.body, "request_timeout_ms");
    cu_resp_free(&r);
    CHECK(atomic_load(&dec[0].n_cancel) + atomic_load(&dec[1].n_cancel) > c0);

    for (int i = 0; i < 2; i++) {
        atomic_store(&pre[i].prefill_delay_ms, 0);
        atomic_store(&dec[i].gen_tokens, 100);
        atomic_store(&dec[i].gen_delay_ms, 50);
    }
    sse_result_t s;
    t0 = now_s();
    CHECK(sse_post(rp.port, "/v1/chat/completions", CHAT_STREAM, NULL, &s));
    CHECK_MSG(now_s() - t0 < 2.5, "took %.2f s", now_s() - t0);
    CHECK(s.ended && s.n >= 3);
    if (s.n >= 2) {
        CHECK_STR_EQ(s.data[s.n - 1], "[DONE]");
        CHECK_CONTAINS(s.data[s.n - 2], "\"error\"");
    }
    sse_result_free(&s);
    /* A deadline is the request's problem, not the nodes': they stay up. */
    CHECK(cu_wait_health(rp.port, 200, 1));
    char *m = cu_metrics(rp.port);
    char series[128];
    snprintf(series, sizeof series, "speed_router_node_up{pool=\"decode\",node=\"127.0.0.1:%d\"}", dbase);
    CHECK(prom_value(m, series) == 1);
    speed_free(m);
    check_balanced("request timeout", rp.port);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* A second signal during the drain exits at once. */
/* One health check that answers late (a loaded host, a pause of the node) does not take the node
 * out; SPEED_ROUTER_HEALTH_TIMEOUTS_DOWN in a row do. speed_router_node_down_total counts it. */
enum { HEALTH_TIMEOUTS_DOWN = 2 }; /* SPEED_ROUTER_HEALTH_TIMEOUTS_DOWN, daemons/router/nodes.h */

static void test_late_health(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    char down[160];
    snprintf(down, sizeof down, "speed_router_node_down_total{pool=\"prefill\",node=\"127.0.0.1:%d\"}", pbase);
    double d0 = cu_metric(rp.port, down);
    CHECK(d0 >= 0); /* the series exists */

    /* one late answer, then on time: the node stays in */
    int h0 = atomic_load(&pre[0].n_health);
    atomic_store(&pre[0].health_slow, 1);
    WAIT_FOR(atomic_load(&pre[0].n_health) >= h0 + 3, 10000); /* the late one and two after it */
    CHECK_MSG(atomic_load(&pre[0].n_health) >= h0 + 3, "the router stopped polling prefill-0");
    CHECK_MSG(cu_metric(rp.port, down) == d0, "one late health answer took the node out (%g times)",
              cu_metric(rp.port, down) - d0);

    /* late twice in a row: out (and back in once it answers on time) */
    h0 = atomic_load(&pre[0].n_health);
    atomic_store(&pre[0].health_slow, HEALTH_TIMEOUTS_DOWN);
    CHECK(cu_wait_metric(rp.port, down, d0 + 1, 10));
    char up[160];
    snprintf(up, sizeof up, "speed_router_node_up{pool=\"prefill\",node=\"127.0.0.1:%d\"}", pbase);
    CHECK(cu_wait_metric(rp.port, up, 1, 10));
    CHECK_INT_EQ(router_stop(&rp), 0);
}

static void test_second_signal(void) {
    reset_fakes();
    router_proc_t rp;
    CHECK(start(&rp, NULL));
    if (rp.exited || !rp.pid) return;
    for (int i = 0; i < 2; i++) {
        atomic_store(&dec[i].gen_tokens, 1000);
        atomic_store(&dec[i].gen_delay_ms, 50);
    }
    speed_http_client_t *c = NULL;
    sse_result_t s;
    CHECK(sse_begin(rp.port, "/v1/chat/completions", CHAT_STREAM, NULL, &c, &s));
    CHECK(sse_read(c, &s, 2));
    kill(rp.pid, SIGTERM);
    CHECK(cu_wait_health(rp.port, 503, 3));
    double t0 = now_s();
    kill(rp.pid, SIGINT);
    CHECK(router_wait(&rp, 5));
    CHECK_MSG(now_s() - t0 < 3, "took %.2f s", now_s() - t0);
    CHECK(WIFEXITED(rp.status) && WEXITSTATUS(rp.status) == 1);
    sse_result_free(&s);
    speed_http_client_destroy(c);
    /* A second signal exits at once, without Cancel RPCs: the Generate stream that ends
     * with the router's connection is what releases the decode node's sequence. */
    fake_check_balanced("second signal", dec, 2, pre, 2, 0, FAKE_BALANCE_STREAM_END, 10);
}

int main(void) {
    json_set_alloc_funcs(speed_malloc, speed_free);
    if (!getenv("SPEED_ROUTER")) SKIP_TEST("SPEED_ROUTER (the speed-router binary) is not set");
    const char *parent = tu_tmp_init("router-fault");
    snprintf(model_dir, sizeof model_dir, "%s/tinymodel", parent);
    CHECK(make_model_dir(model_dir));
    CHECK(fake_start_pool(pre, 2, "prefill", &pbase));
    CHECK(fake_start_pool(dec, 2, "decode", &dbase));
    snprintf(cluster, sizeof cluster, "%s/cluster.yaml", parent);
    CHECK(write_cluster(cluster, model_dir, 2, pbase, 2, dbase));

    test_prefill_retry();
    test_reserve_failure_cancels();
    test_prefill_retry_put_window();
    test_transfer_failures_try_other_decode();
    test_reserve_draining();
    test_decode_dies_mid_stream();
    test_decode_dies_migrates();
    test_client_disconnect();
    test_client_disconnect_cancel_ignored();
    test_overload();
    test_sigterm_drain();
    test_request_timeout();
    test_late_health();
    test_second_signal();

    for (int i = 0; i < 2; i++) {
        fake_stop(&pre[i]);
        fake_stop(&dec[i]);
    }
    tu_rm_rf(parent);
    return CHECK_DONE();
}
