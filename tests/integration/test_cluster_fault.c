/* Node failures under a real 2P2D cluster (speed-router → speed-prefill ×2 → UCX → speed-decode ×2),
 * on a wider tiny model (hidden 256) so a long prompt's prefill takes about a second:
 *
 *  1. a prefill node SIGKILLed while it prefills a long prompt: the router retries on the other
 *     prefill node (same reservation), the client still gets 200 with the exact tokens,
 *     speed_router_prefill_retries_total grows, the dead node is marked down, nothing stays
 *     reserved;
 *     (before that: a client that leaves a stream during its long prefill leaves nothing
 *     reserved and is counted as 499);
 *     the prefill node is SIGSTOPped as soon as it shows the long prompt running, so the kill
 *     and the client's leaving provably happen mid-prefill on any machine;
 *  2. a decode node SIGKILLed mid-stream: the stream is migrated (router.max_migrations): it
 *     goes on from the other decode node to its end within a bounded time, counted in
 *     speed_router_migrations_total (test_cluster_migrate checks the tokens are exact, and the
 *     error event with max_migrations 0); the router marks the node down and the next
 *     requests go to the other decode node and are exact;
 *  3. both dead nodes restarted: the router takes them back and spreads requests over all four;
 *  4. SIGTERM: the router and every node exit 0. */
#include <pthread.h>
#include <signal.h>

#include "log.h"
#include "model.h"
#include "openai_util.h"

#define N_SHORT  40
#define N_LONG   3900
#define N_GEN    8
#define LONG_GEN 3000

static speed_tok_t *g_tok;
static int32_t g_short[N_SHORT], g_long[N_LONG];
static cu_cluster_t g_c;
static int g_rport;
static json_t *g_ref_short, *g_ref_long;

typedef struct {
    const char *body;
    cu_resp_t resp;
    pthread_t th;
} job_t;

static void *job_run(void *arg) {
    job_t *j = arg;
    cu_http(g_rport, "POST", "/v1/completions", j->body, NULL, NULL, 120000, &j->resp);
    return NULL;
}

static double node_metric(bool prefill, int i, const char *name) {
    double v = cu_metric_sum(prefill ? cu_pre_http(&g_c, i) : cu_dec_http(&g_c, i), name);
    return isnan(v) ? 0 : v;
}

static char *node_up_name(bool prefill, int i, char *buf, size_t n) {
    snprintf(buf, n, "speed_router_node_up{pool=\"%s\",node=\"127.0.0.1:%d\"}", prefill ? "prefill" : "decode",
             prefill ? cu_pre_grpc(&g_c, i) : cu_dec_grpc(&g_c, i));
    return buf;
}

/* KV blocks reserved over every live node. */
static double blocks_reserved_total(void) {
    double s = 0;
    for (int i = 0; i < g_c.np; i++)
        if (g_c.pre[i].pid) s += node_metric(true, i, "speed_kv_blocks_reserved");
    for (int i = 0; i < g_c.nd; i++)
        if (g_c.dec[i].pid) s += node_metric(false, i, "speed_kv_blocks_reserved");
    return s;
}

/* Blocks reserved on every live node reach 0. */
static bool wait_no_blocks(double timeout_s) {
    WAIT_FOR(blocks_reserved_total() == 0, timeout_s * 1000);
    double s = blocks_reserved_total();
    if (s != 0) fprintf(stderr, "blocks still reserved: %.0f\n", s);
    return s == 0;
}

/* Reservations not claimed yet over the live decode nodes. */
static double decode_reserved_total(void) {
    double s = 0;
    for (int i = 0; i < g_c.nd; i++)
        if (g_c.dec[i].pid) s += node_metric(false, i, "speed_decode_reserved_requests");
    return s;
}

/* The prefill node whose /metrics shows a request running, or -1. */
static int prefill_running_node(void) {
    for (int i = 0; i < g_c.np; i++)
        if (g_c.pre[i].pid && node_metric(true, i, "speed_prefill_running_requests") > 0) return i;
    return -1;
}

/* n short requests, each exact. */
static void short_requests(int n, const char *what) {
    char *body = ou_completion_body("model", g_short, N_SHORT, N_GEN, 2, false, NULL, NULL);
    for (int k = 0; k < n; k++) {
        cu_resp_t r;
        cu_http(g_rport, "POST", "/v1/completions", body, NULL, NULL, 60000, &r);
        CHECK_MSG(r.status == 200, "%s %d: HTTP %d %s", what, k, r.status, r.body ? r.body : "");
        if (r.status == 200 && r.json) {
            ou_result_t res;
            ou_from_json(&res, r.json);
            ou_check_ref(&res, g_ref_short, g_tok, false, what);
            ou_result_free(&res);
        }
        cu_resp_free(&r);
    }
    speed_free(body);
}

/* 1. */
static int kill_prefill_mid_prefill(void) {
    double retries0 = cu_metric(g_rport, "speed_router_prefill_retries_total");
    char *body = ou_completion_body("model", g_long, N_LONG, N_GEN, 2, false, NULL, NULL);
    job_t a = {.body = body};
    pthread_create(&a.th, NULL, job_run, &a);
    int victim = -1;
    double t0 = now_s();
    WAIT_FOR((victim = prefill_running_node()) >= 0, 30000);
    CHECK_MSG(victim >= 0, "the long prompt never showed up running on a prefill node");
    if (victim >= 0) {
        /* The gate: a stopped node cannot finish its prefill, however fast the machine, so
         * the kill lands mid-prefill (the retry counted below proves it did). */
        CHECK(kill(g_c.pre[victim].pid, SIGSTOP) == 0);
        CHECK_INT_EQ(cu_stop(&g_c.pre[victim], SIGKILL, 10), 128 + SIGKILL);
        fprintf(stderr, "killed prefill%d mid-prefill after %.2f s\n", victim, now_s() - t0);
    }
    pthread_join(a.th, NULL);
    CHECK_MSG(a.resp.status == 200, "the request on the killed prefill node: HTTP %d %s", a.resp.status,
              a.resp.body ? a.resp.body : "");
    if (a.resp.status == 200 && a.resp.json) {
        ou_result_t res;
        ou_from_json(&res, a.resp.json);
        ou_check_ref(&res, g_ref_long, g_tok, false, "retried prefill");
        CHECK_INT_EQ(ou_usage(&res, "prompt_tokens"), N_LONG);
        ou_result_free(&res);
    }
    cu_resp_free(&a.resp);
    CHECK_MSG(cu_metric(g_rport, "speed_router_prefill_retries_total") >= retries0 + 1,
              "prefill retries %.0f -> %.0f: the killed node's prefill was not cut short", retries0,
              cu_metric(g_rport, "speed_router_prefill_retries_total"));
    if (victim >= 0) {
        char name[160];
        CHECK_MSG(cu_wait_metric(g_rport, node_up_name(true, victim, name, sizeof name), 0, 5),
                  "the killed prefill node is not marked down");
    }
    CHECK(wait_no_blocks(10));
    CHECK(cu_wait_metric(g_rport, "speed_router_requests_running", 0, 5)); /* nothing left in the router */
    CHECK(cu_wait_health(g_rport, 200, 5));
    speed_free(body);
    return victim;
}

/* A client that leaves a stream while its long prompt is being prefilled: nothing stays reserved
 * on any node, and the router counts a 499. */
static void leave_during_prefill(void) {
    double gone0 = cu_metric(g_rport, "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}");
    if (isnan(gone0)) gone0 = 0;
    char *body = ou_completion_body("model", g_long, N_LONG, 150, 0, true, NULL, NULL);
    /* a raw socket: the router sends the headers with the first token, after the prefill */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_rport)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\n\r\n",
                      strlen(body));
    CHECK(write(fd, head, (size_t)hl) == hl);
    CHECK(write(fd, body, strlen(body)) == (ssize_t)strlen(body));
    int node = -1;
    WAIT_FOR((node = prefill_running_node()) >= 0, 30000);
    CHECK_MSG(node >= 0, "the long prompt never showed up on a prefill node");
    /* The gate: the node is stopped while the client leaves, so the prefill is provably still
     * running when it does. The router's Prefill call waits for the node, but the decode
     * node's reservation must go at once: the router sends it Cancel when the client leaves. */
    if (node >= 0) CHECK(kill(g_c.pre[node].pid, SIGSTOP) == 0);
    CHECK_NEAR(decode_reserved_total(), 1, 0.5);
    close(fd); /* gone mid-prefill */
    double t0 = now_s();
    WAIT_FOR(decode_reserved_total() == 0, 15000);
    CHECK_MSG(decode_reserved_total() == 0, "the decode reservation outlived its client (no Cancel)");
    fprintf(stderr, "left during the prefill: decode reservation cancelled after %.2f s\n", now_s() - t0);
    if (node >= 0) CHECK(kill(g_c.pre[node].pid, SIGCONT) == 0);
    CHECK(
        cu_wait_metric(g_rport, "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}", gone0 + 1, 15));
    CHECK_MSG(wait_no_blocks(15), "blocks still reserved after a client left during the prefill");
    fprintf(stderr, "left during the prefill: blocks free after %.2f s\n", now_s() - t0);
    CHECK(cu_wait_metric(g_rport, "speed_router_requests_running", 0, 5));
    speed_free(body);
}

/* 2. */
static int kill_decode_mid_stream(void) {
    double migrated0 = cu_metric(g_rport, "speed_router_migrations_total{outcome=\"ok\"}");
    char *body = ou_completion_body("model", g_short, N_SHORT, LONG_GEN, 0, true, NULL, NULL);
    cu_sse_t s;
    CHECK(cu_sse_begin(g_rport, "/v1/completions", body, NULL, 15000, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(cu_sse_read(&s, 3, now_s() + 30) >= 3);
    int victim = -1;
    for (int i = 0; i < g_c.nd && victim < 0; i++)
        if (node_metric(false, i, "speed_decode_running_requests") > 0) victim = i;
    CHECK_MSG(victim >= 0, "no decode node is running the stream");
    double t_kill = now_s();
    if (victim >= 0) CHECK_INT_EQ(cu_stop(&g_c.dec[victim], SIGKILL, 10), 128 + SIGKILL);
    /* the rest of the stream: bounded, whatever happens */
    cu_sse_read(&s, -1, now_s() + 30);
    double dt = now_s() - t_kill;
    ou_result_t res;
    ou_from_sse(&res, &s);
    fprintf(stderr, "after the decode kill: %d events, ended %d, [DONE] %d, error %s, finish \"%s\", %.2f s\n", s.n,
            s.ended, res.done, res.error ? json_string_value(json_object_get(res.error, "code")) : "none", res.finish,
            dt);
    CHECK_MSG(dt < 30 && !s.io_error, "the stream did not end within 30 s of the kill (io_error %d)", s.io_error);
    CHECK_MSG(s.ended || res.done, "the stream neither ended nor sent [DONE]");
    /* router.max_migrations (default 3): the rest was re-issued on the other decode node and
     * the same stream went on to its end (exactness: test_cluster_migrate) */
    CHECK_MSG(!res.error, "the stream ended with an error instead of migrating");
    CHECK_STR_EQ(res.finish, "length");
    CHECK_INT_EQ(ou_usage(&res, "completion_tokens"), LONG_GEN);
    CHECK_MSG(res.done, "no [DONE]");
    CHECK_INT_EQ(res.n_after_done, 0);
    CHECK_MSG(cu_metric(g_rport, "speed_router_migrations_total{outcome=\"ok\"}") == migrated0 + 1,
              "migrations ok %.0f -> %.0f: the kill came too late to prove anything", migrated0,
              cu_metric(g_rport, "speed_router_migrations_total{outcome=\"ok\"}"));
    CHECK_MSG(!res.bad_json, "an event that is not JSON");
    ou_result_free(&res);
    cu_sse_free(&s);
    if (victim >= 0) {
        char name[160];
        CHECK_MSG(cu_wait_metric(g_rport, node_up_name(false, victim, name, sizeof name), 0, 5),
                  "the killed decode node is not marked down");
        int other = 1 - victim;
        double before = node_metric(false, other, "speed_decode_requests_total");
        CHECK(cu_wait_health(g_rport, 200, 5));
        short_requests(4, "after the decode kill");
        WAIT_FOR(node_metric(false, other, "speed_decode_requests_total") >= before + 4, 10000);
        CHECK_NEAR(node_metric(false, other, "speed_decode_requests_total") - before, 4, 0.5);
    }
    CHECK(wait_no_blocks(10));
    CHECK(cu_wait_metric(g_rport, "speed_router_requests_running", 0, 5)); /* nothing left in the router */
    speed_free(body);
    return victim;
}

int main(void) {
    speed_log_configure("error");
    double t_start = now_s();
    cu_init_model("cluster-fault", "--hidden 256 --heads 8 --kv_heads 2 --ffn 688");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &g_tok), SPEED_OK);
    if (!model || !g_tok) return CHECK_DONE();
    const speed_model_config_t *mc = &model->config;
    ou_prompt(g_short, N_SHORT, mc->vocab_size, 37);
    ou_prompt(g_long, N_LONG, mc->vocab_size, 53);

    const char *extra[] = {"--speed.prefill_layers",
                           "3",
                           "--decode.kv_tokens",
                           "16384",
                           "--prefill.kv_tokens",
                           "8192",
                           "--router.prefill_policy",
                           "round-robin",
                           "--router.decode_policy",
                           "round-robin",
                           "--router.status_interval_ms",
                           "200",
                           "--router.prefill_retries",
                           "1",
                           "--log",
                           "info",
                           NULL};
    cu_cluster_init(&g_c, 2, 2, extra);
    bool ok = cu_cluster_start_nodes(&g_c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool ok0 = false;
    cu_proc_t router = cu_cluster_router(&g_c, 0, NULL, 30, &ok0);
    CHECK_MSG(ok0, "the router did not come up");
    g_rport = cu_router_port(&g_c, 0);
    /* references (the long one takes a second or two) */
    char *csv = ou_ids_csv(g_short, N_SHORT);
    g_ref_short = ou_ref("short", "--prompt-ids %s --prefill-layers 3 --max-tokens %d --top-logprobs 2", csv, N_GEN);
    speed_free(csv);
    csv = ou_ids_csv(g_long, N_LONG);
    g_ref_long = ou_ref("long", "--prompt-ids %s --prefill-layers 3 --max-tokens %d --top-logprobs 2", csv, N_GEN);
    speed_free(csv);
    fprintf(stderr, "cluster and references ready after %.1f s\n", now_s() - t_start);

    if (ok && ok0 && g_ref_short && g_ref_long) {
        double t = now_s();
        short_requests(2, "warm-up");
        leave_during_prefill();
        fprintf(stderr, "leave during prefill: %.1f s\n", now_s() - t);
        t = now_s();
        int pv = kill_prefill_mid_prefill();
        fprintf(stderr, "prefill kill: %.1f s\n", now_s() - t);
        t = now_s();
        int dv = kill_decode_mid_stream();
        fprintf(stderr, "decode kill: %.1f s\n", now_s() - t);
        t = now_s();
        /* 3. restart both: the router takes them back */
        char idx[16];
        if (pv >= 0) {
            snprintf(idx, sizeof idx, "%d", pv);
            const char *more[] = {"--node.index", idx, NULL};
            g_c.pre[pv] = cu_cluster_spawn(&g_c, "speed-prefill", pv ? "prefill1-again" : "prefill0-again", more);
        }
        if (dv >= 0) {
            snprintf(idx, sizeof idx, "%d", dv);
            const char *more[] = {"--node.index", idx, NULL};
            g_c.dec[dv] = cu_cluster_spawn(&g_c, "speed-decode", dv ? "decode1-again" : "decode0-again", more);
        }
        CHECK_MSG(cu_router_wait_nodes(&g_c, g_rport, g_c.np, g_c.nd, 30), "restarted nodes not back in the router");
        double p0[2], d0[2];
        for (int i = 0; i < 2; i++) {
            p0[i] = node_metric(true, i, "speed_prefill_requests_total");
            d0[i] = node_metric(false, i, "speed_decode_requests_total");
        }
        short_requests(4, "after the restarts");
        bool all = false;
        WAIT_FOR((all = node_metric(true, 0, "speed_prefill_requests_total") > p0[0] &&
                        node_metric(true, 1, "speed_prefill_requests_total") > p0[1] &&
                        node_metric(false, 0, "speed_decode_requests_total") > d0[0] &&
                        node_metric(false, 1, "speed_decode_requests_total") > d0[1]),
                 10000);
        CHECK_MSG(all, "after the restarts the requests did not reach all four nodes");
        CHECK(wait_no_blocks(10));
        fprintf(stderr, "restarts: %.1f s\n", now_s() - t);
    }
    /* 4. */
    int rc = cu_stop(&router, SIGTERM, 60);
    CHECK_MSG(rc == 0, "router exit %d", rc);
    for (int i = 0; i < g_c.np; i++) {
        rc = cu_stop(&g_c.pre[i], SIGTERM, 30);
        CHECK_MSG(rc == 0, "prefill%d exit %d", i, rc);
    }
    for (int i = 0; i < g_c.nd; i++) {
        rc = cu_stop(&g_c.dec[i], SIGTERM, 30);
        CHECK_MSG(rc == 0, "decode%d exit %d", i, rc);
    }
    json_decref(g_ref_short);
    json_decref(g_ref_long);
    speed_tok_destroy(g_tok);
    speed_model_destroy(model);
    fprintf(stderr, "total %.1f s\n", now_s() - t_start);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
