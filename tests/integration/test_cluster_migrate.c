/* Request migration on a real 1P2D cluster with engine.batch_invariant on (speed-router →
 * speed-prefill → UCX → speed-decode ×2), on the wider tiny model of test_cluster_fault:
 *
 *  1. node level, Decode.Generate on the decode-only route: a request resumed after k of its
 *     tokens (resumed_ids) produces exactly the tokens and the text a plain run produced after
 *     its k-th, for every k: with a stop string that spans token boundaries (held-back text
 *     comes out as it would have; resumed tokens that already completed the stop string give
 *     only the finish event), with max_tokens reached right after the point or at it, and with
 *     seeded sampling (the generator skips the resumed tokens' draws); usage counts the
 *     client's prompt and every generated token;
 *  2. a streamed greedy request whose decode node is SIGSTOPped (so the kill provably lands
 *     mid-stream) then SIGKILLed: 200, [DONE], no error, tokens, logprobs and text equal to
 *     `speedctl generate --batch_invariant` at the same depth: none twice, none missing;
 *     speed_router_migrations_total{outcome="ok"} grows; nothing stays reserved or running on
 *     the surviving nodes; the killed node is restarted and taken back;
 *     the same through a router whose route is decode-only (the re-issue prefills the resumed
 *     tokens on the decode node itself);
 *     seeded sampling at temperature 1 through the router equals `speedctl generate --seed`, with
 *     no fault (a disaggregated decode node skips the draw the prefill node used) and with a
 *     kill on either route (the re-issue skips the resumed tokens' draws);
 *  3. the same, not streamed;
 *  4. a second router with router.max_migrations 0: the same kill ends the stream with the
 *     clean OpenAI error event and [DONE], counted as outcome="failed". */
#include <pthread.h>
#include <signal.h>

#include "log.h"
#include "model.h"
#include "node_rpc_util.h"
#include "openai_util.h"

#define N_PROMPT  40
#define N_GEN     250 /* the migrated requests: long enough to be stopped mid-way (<= OU_MAX_TOK) */
#define NL_GEN    24  /* node-level runs */
#define N_ROUTERS 3   /* migration on; max_migrations 0; decode-only route */

static speed_tok_t *g_tok;
static int32_t g_prompt[N_PROMPT];
static cu_cluster_t g_c;
static json_t *g_ref, *g_ref_seeded;
#define SEED 4242

static double node_metric(bool prefill, int i, const char *name) {
    double v = cu_metric_sum(prefill ? cu_pre_http(&g_c, i) : cu_dec_http(&g_c, i), name);
    return isnan(v) ? 0 : v;
}

static double router_metric(int port, const char *name) {
    double v = cu_metric(port, name);
    return isnan(v) ? 0 : v;
}

/* Blocks reserved and requests running over every live node reach 0. */
static bool wait_nodes_idle(double timeout_s) {
    double s = 1;
    for (double until = now_s() + timeout_s; now_s() < until; sleep_ms(20)) {
        s = 0;
        for (int i = 0; i < g_c.np; i++)
            if (g_c.pre[i].pid)
                s += node_metric(true, i, "speed_kv_blocks_reserved") +
                     node_metric(true, i, "speed_prefill_running_requests");
        for (int i = 0; i < g_c.nd; i++)
            if (g_c.dec[i].pid)
                s += node_metric(false, i, "speed_kv_blocks_reserved") +
                     node_metric(false, i, "speed_decode_running_requests") +
                     node_metric(false, i, "speed_decode_reserved_requests");
        if (s == 0) return true;
    }
    fprintf(stderr, "blocks reserved + requests running on the live nodes: %.0f\n", s);
    return false;
}

/* ---- 1. node level ----------------------------------------------------------------------- */

typedef struct {
    const char *stop; /* NULL: none */
    int max_tokens;
    float temperature;
    uint64_t seed;
} nl_opts_t;

static int nl_generate(speed_rpc_channel_t *dec, const char *id, const int32_t *resumed, int n_resumed,
                       const nl_opts_t *o, nr_gen_t *out) {
    Speed__V1__SamplingParams s = SPEED__V1__SAMPLING_PARAMS__INIT;
    s.max_tokens = o->max_tokens;
    s.temperature = o->temperature;
    s.seed_opt_case = SPEED__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    s.seed = o->seed;
    char *stops[1] = {(char *)o->stop};
    if (o->stop) {
        s.n_stop = 1;
        s.stop = stops;
    }
    Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
    gr.request_id = (char *)id;
    gr.n_prompt_ids = N_PROMPT;
    gr.prompt_ids = g_prompt;
    gr.sampling = &s;
    gr.n_resumed_ids = (size_t)n_resumed;
    gr.resumed_ids = (int32_t *)resumed;
    return nr_generate(dec, &gr, out);
}

/* The run resumed after each k of `plain`'s tokens equals the rest of `plain`. */
static void nl_check_resumed(speed_rpc_channel_t *dec, const nr_gen_t *plain, const nl_opts_t *o, const char *what) {
    static nr_gen_t r; /* big */
    for (int k = 1; k <= plain->n; k++) {
        char id[64];
        snprintf(id, sizeof id, "nl-%s-%d", what, k);
        int code = nl_generate(dec, id, plain->ids, k, o, &r);
        CHECK_MSG(code == SPEED_RPC_OK, "%s k=%d: code %d %s", what, k, code, r.error);
        CHECK_MSG(r.n == plain->n - k, "%s k=%d: %d tokens, want %d", what, k, r.n, plain->n - k);
        bool same = r.n == plain->n - k;
        for (int i = 0; same && i < r.n; i++) same = r.ids[i] == plain->ids[k + i];
        CHECK_MSG(same, "%s k=%d: other tokens than the plain run's", what, k);
        const char *want = plain->text + plain->text_end[k - 1];
        CHECK_MSG(strcmp(r.text, want) == 0, "%s k=%d: text \"%s\", want \"%s\"", what, k, r.text, want);
        CHECK_MSG(strcmp(r.finish, plain->finish) == 0, "%s k=%d: finish %s, want %s", what, k, r.finish,
                  plain->finish);
        CHECK_INT_EQ(r.usage.prompt_tokens, N_PROMPT);
        CHECK_INT_EQ(r.usage.completion_tokens, plain->n);
    }
}

/* A stop string of about 4 bytes around the end of token j's text, on UTF-8 boundaries. */
static void stop_around(const nr_gen_t *g, int j, char *out, size_t cap) {
    size_t mid = g->text_end[j], a = mid >= 2 ? mid - 2 : 0, b = mid + 2 < g->text_len ? mid + 2 : g->text_len;
    while (a > 0 && ((unsigned char)g->text[a] & 0xC0) == 0x80) a--;
    while (b < g->text_len && ((unsigned char)g->text[b] & 0xC0) == 0x80) b++;
    snprintf(out, cap, "%.*s", (int)(b - a), g->text + a);
}

static void node_level(void) {
    speed_rpc_channel_t *dec = nr_channel(cu_dec_grpc(&g_c, 0), cu_rpc_tls("router"));
    static nr_gen_t plain;
    nl_opts_t o = {.stop = NULL, .max_tokens = NL_GEN, .temperature = 0, .seed = 1};

    /* max_tokens: resumed at NL_GEN - 1 one token is left, at NL_GEN none */
    CHECK_INT_EQ(nl_generate(dec, "nl-plain", NULL, 0, &o, &plain), SPEED_RPC_OK);
    fprintf(stderr, "node level: plain run %d tokens, finish %s, text \"%s\"\n", plain.n, plain.finish, plain.text);
    CHECK_MSG(plain.n > 12 && plain.text_len > 8, "the plain run is too short to test anything");
    nl_check_resumed(dec, &plain, &o, "length");

    /* seeded sampling: the generator skips the resumed tokens' draws */
    o.temperature = 1.0f;
    o.seed = 12345;
    static nr_gen_t sampled;
    CHECK_INT_EQ(nl_generate(dec, "nl-seeded", NULL, 0, &o, &sampled), SPEED_RPC_OK);
    fprintf(stderr, "node level: sampled run %d tokens, text \"%s\"\n", sampled.n, sampled.text);
    int n_other = 0;
    for (int i = 0; i < sampled.n && i < plain.n; i++) n_other += sampled.ids[i] != plain.ids[i];
    CHECK_MSG(n_other > 0, "temperature 1 chose the greedy tokens throughout: the test proves nothing");
    nl_check_resumed(dec, &sampled, &o, "seeded");

    /* a stop string over the boundary of two tokens that both show text (the greedy output of
     * the random model repeats one byte; the sampled one has text): held-back text over the
     * migration point */
    int j = -1;
    for (int i = 4; i + 1 < sampled.n && j < 0; i++)
        if (sampled.text_end[i] >= 2 && sampled.text_end[i] > sampled.text_end[i - 1] &&
            sampled.text_end[i + 1] > sampled.text_end[i] + 1)
            j = i;
    CHECK_MSG(j >= 0, "no two neighbouring tokens with text in \"%s\"", sampled.text);
    if (j >= 0) {
        char stop[32];
        stop_around(&sampled, j, stop, sizeof stop);
        o.stop = stop;
        static nr_gen_t with_stop;
        CHECK_INT_EQ(nl_generate(dec, "nl-stop", NULL, 0, &o, &with_stop), SPEED_RPC_OK);
        fprintf(stderr, "node level: stop \"%s\" (around token %d): %d tokens, finish %s\n", stop, j, with_stop.n,
                with_stop.finish);
        CHECK_STR_EQ(with_stop.finish, "stop");
        CHECK(with_stop.n <= j + 2 && with_stop.n < sampled.n);
        nl_check_resumed(dec, &with_stop, &o, "stop");
        o.stop = NULL;
    }

    /* bad input: more resumed tokens than max_tokens allows, a resumed id outside the vocabulary */
    o.temperature = 0;
    static nr_gen_t bad;
    int32_t too_many[NL_GEN + 1];
    for (int i = 0; i <= NL_GEN; i++) too_many[i] = plain.ids[i % plain.n];
    CHECK_INT_EQ(nl_generate(dec, "nl-bad1", too_many, NL_GEN + 1, &o, &bad), SPEED_RPC_INVALID_ARGUMENT);
    int32_t outside[1] = {1 << 30};
    CHECK_INT_EQ(nl_generate(dec, "nl-bad2", outside, 1, &o, &bad), SPEED_RPC_INVALID_ARGUMENT);
    speed_rpc_channel_destroy(dec);
    CHECK(wait_nodes_idle(10));
}

/* ---- 2.-4. through the router ---------------------------------------------------------- */

typedef struct {
    int port;
    const char *body;
    cu_resp_t resp;
    pthread_t th;
} job_t;

static void *job_run(void *arg) {
    job_t *j = arg;
    cu_http(j->port, "POST", "/v1/completions", j->body, NULL, NULL, 120000, &j->resp);
    return NULL;
}

/* The decode node running a request, SIGSTOPped (it cannot finish) then SIGKILLed; -1 if none
 * showed one within 30 s. */
static int kill_running_decode(void) {
    int victim = -1;
    WAIT_FOR((victim = node_metric(false, 0, "speed_decode_running_requests") > 0   ? 0
                       : node_metric(false, 1, "speed_decode_running_requests") > 0 ? 1
                                                                                    : -1) >= 0,
             30000);
    if (victim < 0) return -1;
    CHECK(kill(g_c.dec[victim].pid, SIGSTOP) == 0);
    CHECK_INT_EQ(cu_stop(&g_c.dec[victim], SIGKILL, 10), 128 + SIGKILL);
    return victim;
}

/* Restarts the killed node and waits until every router takes it back (a router that still
 * has it down would have no node left for the next migration). */
static void restart_decode(int victim) {
    if (victim < 0) return;
    char idx[16];
    snprintf(idx, sizeof idx, "%d", victim);
    const char *more[] = {"--node.index", idx, NULL};
    g_c.dec[victim] = cu_cluster_spawn(&g_c, "speed-decode", victim ? "decode1-again" : "decode0-again", more);
    for (int k = 0; k < N_ROUTERS; k++)
        CHECK_MSG(cu_router_wait_nodes(&g_c, cu_router_port(&g_c, k), g_c.np, g_c.nd, 30),
                  "the restarted decode node is not back in router %d", k);
}

/* A streamed completion body, greedy or seeded sampling at temperature 1 (seed >= 0). */
static char *stream_body(int64_t seed) {
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 2, true, "3", NULL);
    if (seed < 0) return body;
    const char *greedy = "\"temperature\":0";
    char *at = strstr(body, greedy);
    CHECK(at != NULL);
    if (!at) return body;
    size_t cap = strlen(body) + 64;
    char *b = speed_malloc(cap);
    snprintf(b, cap, "%.*s\"temperature\":1,\"seed\":%lld%s", (int)(at - body), body, (long long)seed,
             at + strlen(greedy));
    speed_free(body);
    return b;
}

/* A streamed request whose decode node dies mid-stream equals `ref` (kill false: no fault). */
static void streamed(int port, const char *what, int64_t seed, json_t *ref, bool kill_it) {
    double ok0 = router_metric(port, "speed_router_migrations_total{outcome=\"ok\"}");
    char *body = stream_body(seed);
    cu_sse_t s;
    CHECK(cu_sse_begin(port, "/v1/completions", body, NULL, 30000, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(cu_sse_read(&s, 2, now_s() + 30) >= 2);
    int victim = kill_it ? kill_running_decode() : -1;
    CHECK_MSG(victim >= 0 || !kill_it, "no decode node showed the stream running");
    cu_sse_read(&s, -1, now_s() + 60);
    ou_result_t res;
    ou_from_sse(&res, &s);
    fprintf(stderr, "%s: killed decode%d; %d tokens, [DONE] %d, error %s\n", what, victim, res.n, res.done,
            res.error ? json_dumps(res.error, 0) : "none");
    CHECK_MSG(!res.error, "the migrated stream ended with an error");
    CHECK(res.done);
    CHECK_INT_EQ(res.n_after_done, 0);
    ou_check_ref(&res, ref, g_tok, false, what);
    CHECK_INT_EQ(ou_usage(&res, "prompt_tokens"), N_PROMPT);
    CHECK_INT_EQ(ou_usage(&res, "completion_tokens"), res.n);
    ou_result_free(&res);
    cu_sse_free(&s);
    CHECK_MSG(router_metric(port, "speed_router_migrations_total{outcome=\"ok\"}") == ok0 + (kill_it ? 1 : 0),
              "migrations ok %.0f -> %.0f: the kill did not land mid-stream, or no migration", ok0,
              router_metric(port, "speed_router_migrations_total{outcome=\"ok\"}"));
    CHECK(wait_nodes_idle(10));
    CHECK(cu_wait_metric(port, "speed_router_requests_running", 0, 5));
    restart_decode(victim);
    speed_free(body);
}

static void not_streamed(int port) {
    double ok0 = router_metric(port, "speed_router_migrations_total{outcome=\"ok\"}");
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 2, false, "3", NULL);
    job_t j = {.port = port, .body = body};
    pthread_create(&j.th, NULL, job_run, &j);
    int victim = kill_running_decode();
    CHECK_MSG(victim >= 0, "no decode node showed the request running");
    pthread_join(j.th, NULL);
    CHECK_MSG(j.resp.status == 200, "HTTP %d %s", j.resp.status, j.resp.body ? j.resp.body : "");
    if (j.resp.status == 200 && j.resp.json) {
        ou_result_t res;
        ou_from_json(&res, j.resp.json);
        ou_check_ref(&res, g_ref, g_tok, false, "migrated, not streamed");
        CHECK_INT_EQ(ou_usage(&res, "prompt_tokens"), N_PROMPT);
        ou_result_free(&res);
    }
    cu_resp_free(&j.resp);
    CHECK_MSG(router_metric(port, "speed_router_migrations_total{outcome=\"ok\"}") == ok0 + 1,
              "migrations ok %.0f -> %.0f", ok0, router_metric(port, "speed_router_migrations_total{outcome=\"ok\"}"));
    CHECK(wait_nodes_idle(10));
    restart_decode(victim);
    speed_free(body);
}

static void no_migration(int port) {
    double failed0 = router_metric(port, "speed_router_migrations_total{outcome=\"failed\"}");
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 2, true, "3", NULL);
    cu_sse_t s;
    CHECK(cu_sse_begin(port, "/v1/completions", body, NULL, 30000, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(cu_sse_read(&s, 2, now_s() + 30) >= 2);
    int victim = kill_running_decode();
    CHECK_MSG(victim >= 0, "no decode node showed the stream running");
    cu_sse_read(&s, -1, now_s() + 30);
    ou_result_t res;
    ou_from_sse(&res, &s);
    CHECK_MSG(res.error != NULL, "max_migrations 0: no error event");
    if (res.error) {
        const char *m = json_string_value(json_object_get(res.error, "message"));
        CHECK_MSG(m && strstr(m, "the decode node failed during generation"), "error: %s", m ? m : "(none)");
        CHECK_STR_EQ(json_string_value(json_object_get(res.error, "type")), "server_error");
    }
    CHECK(res.done);
    CHECK(res.n < N_GEN);
    ou_result_free(&res);
    cu_sse_free(&s);
    CHECK(router_metric(port, "speed_router_migrations_total{outcome=\"failed\"}") == failed0 + 1);
    CHECK(wait_nodes_idle(10));
    CHECK(cu_wait_metric(port, "speed_router_requests_running", 0, 5));
    restart_decode(victim);
    speed_free(body);
}

int main(void) {
    speed_log_configure("error");
    double t_start = now_s();
    cu_init_model("cluster-migrate", "--hidden 256 --heads 8 --kv_heads 2 --ffn 688");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &g_tok), SPEED_OK);
    if (!model || !g_tok) return CHECK_DONE();
    ou_prompt(g_prompt, N_PROMPT, model->config.vocab_size, 37);

    const char *extra[] = {"--speed.prefill_layers",
                           "3",
                           "--engine.batch_invariant",
                           "--router.decode_policy",
                           "round-robin",
                           "--router.status_interval_ms",
                           "200",
                           "--log",
                           "info",
                           NULL};
    cu_cluster_init(&g_c, 1, 2, extra);
    bool ok = cu_cluster_start_nodes(&g_c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool ok0 = false, ok1 = false;
    cu_proc_t router = cu_cluster_router(&g_c, 0, NULL, 30, &ok0);
    const char *off[] = {"--router.max_migrations", "0", NULL};
    cu_proc_t router_off = cu_cluster_router(&g_c, 1, off, 30, &ok1);
    bool ok2 = false;
    const char *decode_only[] = {"--router.decode_only_below", "100000", NULL};
    cu_proc_t router_do = cu_cluster_router(&g_c, 2, decode_only, 30, &ok2);
    CHECK_MSG(ok0 && ok1 && ok2, "the routers did not come up");
    char *csv = ou_ids_csv(g_prompt, N_PROMPT);
    g_ref = ou_ref("migrate", "--prompt-ids %s --prefill-layers 3 --max-tokens %d --top-logprobs 2 --batch_invariant",
                   csv, N_GEN);
    g_ref_seeded = ou_ref("migrate-seeded",
                          "--prompt-ids %s --prefill-layers 3 --max-tokens %d --top-logprobs 2 --batch_invariant "
                          "--temperature 1 --seed %d",
                          csv, N_GEN, SEED);
    speed_free(csv);
    if (g_ref)
        fprintf(stderr, "reference: %zu tokens, finish %s\n", json_array_size(json_object_get(g_ref, "tokens")),
                json_string_value(json_object_get(g_ref, "finish_reason")));
    fprintf(stderr, "cluster and reference ready after %.1f s\n", now_s() - t_start);

    if (ok && ok0 && ok1 && ok2 && g_ref && g_ref_seeded) {
        double t = now_s();
        node_level();
        fprintf(stderr, "node level: %.1f s\n", now_s() - t);
        t = now_s();
        streamed(cu_router_port(&g_c, 0), "streamed", -1, g_ref, true);
        fprintf(stderr, "streamed: %.1f s\n", now_s() - t);
        t = now_s();
        CHECK(cu_router_wait_nodes(&g_c, cu_router_port(&g_c, 2), g_c.np, g_c.nd, 30));
        streamed(cu_router_port(&g_c, 2), "streamed, decode-only route", -1, g_ref, true);
        CHECK(router_metric(cu_router_port(&g_c, 2),
                            "speed_router_route_decisions_total{route=\"decode_only\",reason=\"short_prompt\"}") == 1);
        fprintf(stderr, "streamed, decode-only: %.1f s\n", now_s() - t);
        t = now_s();
        /* seeded sampling: token k takes draw k on every route (a disaggregated decode node
         * skips the prefill node's draw), and a re-issue skips the resumed tokens' draws */
        streamed(cu_router_port(&g_c, 0), "seeded", SEED, g_ref_seeded, false);
        streamed(cu_router_port(&g_c, 0), "seeded, migrated", SEED, g_ref_seeded, true);
        streamed(cu_router_port(&g_c, 2), "seeded, decode-only, migrated", SEED, g_ref_seeded, true);
        fprintf(stderr, "seeded: %.1f s\n", now_s() - t);
        t = now_s();
        not_streamed(cu_router_port(&g_c, 0));
        fprintf(stderr, "not streamed: %.1f s\n", now_s() - t);
        t = now_s();
        CHECK(cu_router_wait_nodes(&g_c, cu_router_port(&g_c, 1), g_c.np, g_c.nd, 30));
        no_migration(cu_router_port(&g_c, 1));
        fprintf(stderr, "max_migrations 0: %.1f s\n", now_s() - t);
    }
    int rc = cu_stop(&router, SIGTERM, 60);
    CHECK_MSG(rc == 0, "router exit %d", rc);
    rc = cu_stop(&router_off, SIGTERM, 60);
    CHECK_MSG(rc == 0, "router 2 exit %d", rc);
    rc = cu_stop(&router_do, SIGTERM, 60);
    CHECK_MSG(rc == 0, "router 3 exit %d", rc);
    for (int i = 0; i < g_c.np; i++) {
        rc = cu_stop(&g_c.pre[i], SIGTERM, 30);
        CHECK_MSG(rc == 0, "prefill%d exit %d", i, rc);
    }
    for (int i = 0; i < g_c.nd; i++) {
        rc = cu_stop(&g_c.dec[i], SIGTERM, 30);
        CHECK_MSG(rc == 0, "decode%d exit %d", i, rc);
    }
    json_decref(g_ref);
    json_decref(g_ref_seeded);
    speed_tok_destroy(g_tok);
    speed_model_destroy(model);
    fprintf(stderr, "total %.1f s\n", now_s() - t_start);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
