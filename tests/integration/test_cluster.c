/* The whole cluster on loopback: real speed-router → speed-prefill (2 replicas) → UCX → speed-decode
 * (2 replicas), driven through the OpenAI HTTP API.
 *
 *  0. no node's control plane answers a client without a certificate of the cluster's CA;
 *  1. /v1/completions with token-id prompts, streamed and not, at C = L, C < L and a fractional C,
 *     and a chat completion: tokens and logprobs equal `speedctl generate`; usage.kv_bytes is the
 *     SPEED formula, kv_full_depth_bytes the C = L one, and the prefill nodes'
 *     speed_kv_transfer_bytes_total grows by exactly kv_bytes;
 *  2. 8 concurrent requests with round-robin policies reach both prefill and both decode nodes,
 *     and every one of them has the reference's tokens (logprobs within 3e-3: a batch of 8 is
 *     not bit-identical to batch 1);
 *  3. every bad request class gets its OpenAI error (400/404/405/413) through the real router;
 *  4. a client that closes a stream early: the KV blocks on every node return to 0;
 *  5. overload on a second router (max_in_flight 1, max_queue 1, API keys): 401 for a missing or
 *     wrong key, 429 + Retry-After beyond the queue, 503 after the queue timeout, and the
 *     request that held the slot still answers exactly (a stalled prefill pool, SIGSTOP/SIGCONT,
 *     holds it in flight deterministically);
 *  6. back-to-back requests from one client on a router with max_in_flight 1, max_queue 0 are
 *     never refused;
 *  7. SIGTERM to the second router during a stream (its decode node SIGSTOPped meanwhile, so the
 *     stream is surely in flight): /health and new requests 503, the stream completes
 *     ([DONE]), the router exits 0; then the other routers and the nodes exit 0 on SIGTERM. */
#include <pthread.h>

#include "log.h"
#include "model.h"
#include "openai_util.h"
#include "rpc.h"
#include "speed_methods.h"

#define N_PROMPT 40
#define N_GEN    8
#define LONG_GEN 4000

static speed_tok_t *g_tok;
static const speed_model_config_t *g_mc;
static int32_t g_prompt[N_PROMPT];
static char *g_csv;
static cu_cluster_t g_c;
static int g_rport; /* the main router */

static size_t kv_want(int C, int n) { return speed_kv_bytes_for_prompt(g_mc, C, 1, 1, n, SPEED_DTYPE_BF16); }

static double sum_nodes(bool prefill, const char *metric) {
    double s = 0;
    int n = prefill ? g_c.np : g_c.nd;
    for (int i = 0; i < n; i++) {
        double v = cu_metric_sum(prefill ? cu_pre_http(&g_c, i) : cu_dec_http(&g_c, i), metric);
        s += isnan(v) ? 0 : v;
    }
    return s;
}

/* Polls the sum over the prefill nodes of speed_kv_transfer_bytes_total until it equals want. */
static double wait_transfer_total(double want) {
    double t0 = now_s(), v;
    while ((v = sum_nodes(true, "speed_kv_transfer_bytes_total")) != want && now_s() - t0 < 3) usleep(20000);
    return v;
}

/* One completion (streamed or not) into *r; returns the HTTP status. */
static int complete(int port, const char *body, bool stream, const char *auth, ou_result_t *r) {
    if (!stream) {
        cu_resp_t resp;
        cu_http(port, "POST", "/v1/completions", body, auth, NULL, 60000, &resp);
        int st = resp.status;
        if (st == 200 && resp.json)
            ou_from_json(r, resp.json);
        else
            memset(r, 0, sizeof *r);
        if (st != 200) fprintf(stderr, "HTTP %d: %s\n", st, resp.body ? resp.body : "(none)");
        cu_resp_free(&resp);
        return st;
    }
    cu_sse_t s;
    if (!cu_sse_begin(port, "/v1/completions", body, auth, 30000, &s)) {
        memset(r, 0, sizeof *r);
        return 0;
    }
    int st = s.status;
    if (st == 200) {
        CHECK_CONTAINS(s.content_type, "text/event-stream");
        cu_sse_read(&s, -1, now_s() + 60);
        CHECK(s.ended);
    }
    ou_from_sse(r, &s);
    cu_sse_free(&s);
    return st;
}

/* 1. exactness and the KV bytes at one depth */
static void check_depth(const char *c_json, int C, bool stream) {
    char key[32], what[64];
    snprintf(key, sizeof key, "c%d", C);
    snprintf(what, sizeof what, "C=%s %s", c_json ? c_json : "default", stream ? "stream" : "whole");
    json_t *ref = ou_ref(key, "--prompt-ids %s --prefill-layers %d --max-tokens %d --top-logprobs 2", g_csv, C, N_GEN);
    double before = sum_nodes(true, "speed_kv_transfer_bytes_total");
    double router_before = cu_metric(g_rport, "speed_router_kv_bytes_shipped_total");
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 2, stream, c_json, NULL);
    ou_result_t r;
    CHECK_MSG(complete(g_rport, body, stream, NULL, &r) == 200, "%s", what);
    ou_check_ref(&r, ref, g_tok, false, what);
    if (stream) {
        CHECK_MSG(r.done && r.n_after_done == 0 && !r.bad_json && !r.error, "%s: stream shape", what);
        CHECK_MSG(r.n_finish == 1, "%s: %d finish chunks", what, r.n_finish);
    }
    CHECK_INT_EQ(ou_usage(&r, "prompt_tokens"), N_PROMPT);
    CHECK_INT_EQ(ou_usage(&r, "completion_tokens"), N_GEN);
    CHECK_INT_EQ(ou_usage(&r, "total_tokens"), N_PROMPT + N_GEN);
    CHECK_INT_EQ(ou_usage(&r, "kv_bytes"), kv_want(C, N_PROMPT));
    CHECK_INT_EQ(ou_usage(&r, "kv_full_depth_bytes"), kv_want(g_mc->n_layers, N_PROMPT));
    double after = wait_transfer_total(before + (double)kv_want(C, N_PROMPT));
    CHECK_MSG(after - before == (double)kv_want(C, N_PROMPT), "%s: prefill nodes shipped %.0f bytes, want %zu", what,
              after - before, kv_want(C, N_PROMPT));
    CHECK_NEAR(cu_metric(g_rport, "speed_router_kv_bytes_shipped_total") - router_before, (double)kv_want(C, N_PROMPT),
               0.5);
    ou_result_free(&r);
    speed_free(body);
    json_decref(ref);
}

/* a chat completion, whole and streamed, against `speedctl generate --chat` */
static void check_chat(void) {
    json_t *ref = ou_ref("chat", "--chat Hello --prefill-layers 3 --max-tokens %d --top-logprobs 2", N_GEN);
    const char *body = "{\"model\":\"model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],"
                       "\"max_tokens\":8,\"temperature\":0,\"logprobs\":true,\"top_logprobs\":2}";
    cu_resp_t resp;
    CHECK(cu_http(g_rport, "POST", "/v1/chat/completions", body, NULL, "chat-1", 60000, &resp));
    CHECK_INT_EQ(resp.status, 200);
    CHECK_STR_EQ(resp.request_id, "chat-1");
    if (resp.json) {
        CHECK_STR_EQ(json_string_value(json_object_get(resp.json, "id")), "chatcmpl-chat-1");
        CHECK_STR_EQ(json_string_value(json_object_get(resp.json, "object")), "chat.completion");
        ou_result_t r;
        ou_from_json(&r, resp.json);
        ou_check_ref(&r, ref, g_tok, true, "chat whole");
        json_t *pids = ref ? json_object_get(ref, "prompt_ids") : NULL;
        CHECK_INT_EQ(ou_usage(&r, "prompt_tokens"), (long long)json_array_size(pids));
        CHECK_INT_EQ(ou_usage(&r, "kv_bytes"), kv_want(3, (int)json_array_size(pids)));
        ou_result_free(&r);
    }
    cu_resp_free(&resp);
    const char *sbody = "{\"model\":\"model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],"
                        "\"max_tokens\":8,\"temperature\":0,\"logprobs\":true,\"top_logprobs\":2,\"stream\":true}";
    cu_sse_t s;
    CHECK(cu_sse_begin(g_rport, "/v1/chat/completions", sbody, NULL, 30000, &s));
    CHECK_INT_EQ(s.status, 200);
    cu_sse_read(&s, -1, now_s() + 60);
    ou_result_t r;
    ou_from_sse(&r, &s);
    CHECK(s.n > 0 && strstr(s.data[0], "\"role\":\"assistant\"") != NULL);
    ou_check_ref(&r, ref, g_tok, true, "chat stream");
    CHECK(r.done && r.usage == NULL); /* no include_usage: no usage chunk */
    ou_result_free(&r);
    cu_sse_free(&s);
    json_decref(ref);
}

/* ---- concurrent requests ------------------------------------------------------------------- */

typedef struct {
    int port;
    const char *body;
    const char *auth;
    cu_resp_t resp;
    pthread_t th;
} job_t;

static void *job_run(void *arg) {
    job_t *j = arg;
    cu_http(j->port, "POST", "/v1/completions", j->body, j->auth, NULL, 60000, &j->resp);
    return NULL;
}

static void job_start(job_t *j, int port, const char *body, const char *auth) {
    memset(j, 0, sizeof *j);
    j->port = port;
    j->body = body;
    j->auth = auth;
    pthread_create(&j->th, NULL, job_run, j);
}

/* 2. spread over the pools */
static void check_spread(void) {
    json_t *ref = ou_ref("c3", "--prompt-ids %s --prefill-layers 3 --max-tokens %d --top-logprobs 2", g_csv, N_GEN);
    /* the nodes count a request just after they answer it: let the counts of the requests so
     * far settle (every one was disaggregated and answered 200) */
    double t0 = now_s();
    for (;;) {
        double done = cu_metric(g_rport, "speed_router_requests_total{route=\"disaggregated\",status=\"200\"}");
        if ((sum_nodes(true, "speed_prefill_requests_total") == done &&
             sum_nodes(false, "speed_decode_requests_total") == done) ||
            now_s() - t0 > 3)
            break;
        usleep(20000);
    }
    double pre0[CU_MAX_REPLICAS], dec0[CU_MAX_REPLICAS];
    for (int i = 0; i < g_c.np; i++) pre0[i] = cu_metric_sum(cu_pre_http(&g_c, i), "speed_prefill_requests_total");
    for (int i = 0; i < g_c.nd; i++) dec0[i] = cu_metric_sum(cu_dec_http(&g_c, i), "speed_decode_requests_total");
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 2, false, NULL, NULL);
    /* batched in one engine step (bf16 GEMM instead of batch-1 GEMV), the numbers are not
     * bit-identical to batch 1: the tokens must be (but at a near tie of the reference), the
     * logprobs within 3e-3 (the largest deviation is printed) */
    ou_tol = 3e-3;
    ou_near_tie = true;
    ou_max_dev = 0;
    job_t jobs[8];
    for (int k = 0; k < 8; k++) job_start(&jobs[k], g_rport, body, NULL);
    for (int k = 0; k < 8; k++) {
        pthread_join(jobs[k].th, NULL);
        CHECK_MSG(jobs[k].resp.status == 200, "request %d: HTTP %d %s", k, jobs[k].resp.status,
                  jobs[k].resp.body ? jobs[k].resp.body : "");
        if (jobs[k].resp.json) {
            ou_result_t r;
            ou_from_json(&r, jobs[k].resp.json);
            char what[32];
            snprintf(what, sizeof what, "concurrent %d", k);
            ou_check_ref(&r, ref, g_tok, false, what);
            ou_result_free(&r);
        }
        cu_resp_free(&jobs[k].resp);
    }
    fprintf(stderr, "concurrent: largest logprob deviation from batch 1: %.2g\n", ou_max_dev);
    ou_tol = 1e-4;
    ou_near_tie = false;
    t0 = now_s();
    bool all;
    do {
        all = true;
        for (int i = 0; i < g_c.np; i++)
            all = all && cu_metric_sum(cu_pre_http(&g_c, i), "speed_prefill_requests_total") > pre0[i];
        for (int i = 0; i < g_c.nd; i++)
            all = all && cu_metric_sum(cu_dec_http(&g_c, i), "speed_decode_requests_total") > dec0[i];
        if (!all) usleep(50000);
    } while (!all && now_s() - t0 < 3);
    for (int i = 0; i < g_c.np; i++)
        CHECK_MSG(cu_metric_sum(cu_pre_http(&g_c, i), "speed_prefill_requests_total") > pre0[i],
                  "prefill node %d got none of the 8 requests", i);
    for (int i = 0; i < g_c.nd; i++)
        CHECK_MSG(cu_metric_sum(cu_dec_http(&g_c, i), "speed_decode_requests_total") > dec0[i],
                  "decode node %d got none of the 8 requests", i);
    CHECK_NEAR(sum_nodes(true, "speed_prefill_requests_total") - (pre0[0] + pre0[1]), 8, 0.5);
    CHECK_NEAR(sum_nodes(false, "speed_decode_requests_total") - (dec0[0] + dec0[1]), 8, 0.5);
    speed_free(body);
    json_decref(ref);
}

/* ---- 3. bad requests ------------------------------------------------------------------------ */

static void bad(const char *path, const char *body, int status, const char *type, const char *code, const char *param,
                const char *what) {
    cu_resp_t r;
    CHECK_MSG(cu_http(g_rport, "POST", path, body, NULL, "bad-req", 30000, &r), "%s: no answer", what);
    ou_check_error(&r, status, type, code, param, what);
    CHECK_MSG(strcmp(r.request_id, "bad-req") == 0, "%s: X-Request-Id \"%s\"", what, r.request_id);
    cu_resp_free(&r);
}

static void check_bad_requests(void) {
    const char *C = "/v1/completions", *CH = "/v1/chat/completions";
    const char *ire = "invalid_request_error";
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,", 400, ire, NULL, NULL, "truncated JSON");
    bad(C, "not json at all", 400, ire, NULL, NULL, "not JSON");
    bad(C, "[1,2]", 400, ire, NULL, NULL, "not an object");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"max_tokens\":\"ten\"}", 400, ire, "invalid_type", "max_tokens",
        "max_tokens a string");
    bad(C, "{\"model\":\"model\",\"prompt\":5}", 400, ire, NULL, "prompt", "prompt a number");
    bad(C, "{\"model\":\"model\"}", 400, ire, "missing_required_parameter", "prompt", "no prompt");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"temperature\":\"hot\"}", 400, ire, "invalid_type", "temperature",
        "temperature a string");
    bad(CH, "{\"model\":\"model\",\"messages\":\"hi\"}", 400, ire, NULL, "messages", "messages a string");
    bad(CH, "{\"model\":\"model\",\"messages\":[{\"role\":\"user\",\"content\":7}]}", 400, ire, NULL, NULL,
        "content a number");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"stream\":\"yes\"}", 400, ire, "invalid_type", "stream",
        "stream a string");
    /* unknown model, unknown path, wrong method */
    bad(C, "{\"model\":\"gpt-4\",\"prompt\":[1,2,3]}", 404, ire, "model_not_found", NULL, "unknown model");
    bad(CH, "{\"model\":\"nope\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 404, ire, "model_not_found",
        NULL, "unknown model (chat)");
    {
        cu_resp_t r;
        cu_http(g_rport, "POST", "/v1/embeddings", "{}", NULL, NULL, 30000, &r);
        CHECK_INT_EQ(r.status, 404);
        cu_resp_free(&r);
        cu_http(g_rport, "GET", "/v1/completions", NULL, NULL, NULL, 30000, &r);
        CHECK_INT_EQ(r.status, 405);
        CHECK_CONTAINS(r.allow, "POST");
        cu_resp_free(&r);
        cu_http(g_rport, "GET", "/v1/models", NULL, NULL, NULL, 30000, &r);
        CHECK_INT_EQ(r.status, 200);
        CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(json_object_get(r.json, "data"), 0), "id")),
                     "model");
        cu_resp_free(&r);
    }
    /* too long: a prompt beyond the context (4096), and a prompt + max_tokens beyond it */
    {
        int n = 4200;
        int32_t *ids = speed_malloc(sizeof(int32_t) * (size_t)n);
        ou_prompt(ids, n, g_mc->vocab_size, 37);
        char *b = ou_completion_body("model", ids, n, 8, 0, false, NULL, NULL);
        bad(C, b, 413, ire, "context_length_exceeded", NULL, "prompt beyond the context");
        speed_free(b);
        b = ou_completion_body("model", ids, 4000, 200, 0, false, NULL, NULL);
        bad(C, b, 413, ire, "context_length_exceeded", NULL, "prompt + max_tokens beyond the context");
        speed_free(b);
        b = ou_completion_body("model", ids, 4000, 200, 0, true, NULL, NULL);
        bad(C, b, 413, ire, "context_length_exceeded", NULL, "too long, streamed");
        speed_free(b);
        speed_free(ids);
    }
    /* bad parameters */
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"temperature\":5}", 400, ire, NULL, "temperature",
        "temperature 5");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"n\":2}", 400, ire, NULL, "n", "n 2");
    bad(CH, "{\"model\":\"model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"top_logprobs\":2}", 400, ire,
        NULL, "top_logprobs", "top_logprobs without logprobs");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"max_tokens\":-1}", 400, ire, NULL, "max_tokens", "max_tokens -1");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"top_p\":0}", 400, ire, NULL, "top_p", "top_p 0");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,99999]}", 400, ire, NULL, NULL, "token id beyond the vocabulary");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"speed\":{\"prefill_layers\":9}}", 400, ire, NULL,
        "speed.prefill_layers", "prefill_layers > L");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"speed\":{\"tail\":0}}", 400, ire, NULL, "speed.tail", "tail 0");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"speed\":{\"layers\":2}}", 400, ire, NULL, NULL,
        "unknown speed key");
    bad(C, "{\"model\":\"model\",\"prompt\":[1,2,3],\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", 400, ire, NULL, "stop",
        "5 stop strings");
    /* the router and the nodes are still fine */
    CHECK(cu_wait_health(g_rport, 200, 5));
    CHECK_NEAR(cu_metric(g_rport, "speed_router_requests_running"), 0, 0);
}

/* ---- 4. a client that leaves mid-stream ----------------------------------------------------- */

static double blocks_reserved_all(void) {
    return sum_nodes(true, "speed_kv_blocks_reserved") + sum_nodes(false, "speed_kv_blocks_reserved");
}

static void check_disconnect(void) {
    double gone0 = cu_metric_sum(g_rport, "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}");
    if (isnan(gone0)) gone0 = 0;
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, LONG_GEN, 0, true, NULL, NULL);
    cu_sse_t s;
    CHECK(cu_sse_begin(g_rport, "/v1/completions", body, NULL, 30000, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(cu_sse_read(&s, 3, now_s() + 30) >= 3);
    double held = sum_nodes(false, "speed_kv_blocks_reserved");
    CHECK_MSG(held > 0, "no decode blocks held during the stream");
    cu_sse_free(&s); /* the client goes away */
    double t0 = now_s();
    while (blocks_reserved_all() > 0 && now_s() - t0 < 15) usleep(50000);
    double dt = now_s() - t0;
    CHECK_MSG(blocks_reserved_all() == 0, "blocks still reserved %.1f s after the disconnect: prefill %.0f decode %.0f",
              dt, sum_nodes(true, "speed_kv_blocks_reserved"), sum_nodes(false, "speed_kv_blocks_reserved"));
    CHECK_MSG(dt < 5, "blocks freed only after %.1f s", dt);
    CHECK(cu_wait_metric(g_rport, "speed_router_requests_running", 0, 5));
    double t_run = now_s();
    while (sum_nodes(false, "speed_decode_running_requests") != 0 && now_s() - t_run < 5) usleep(20000);
    CHECK_NEAR(sum_nodes(false, "speed_decode_running_requests"), 0, 0);
    /* counted as a client that went away, not as a finished request */
    t0 = now_s();
    double gone;
    while ((gone = cu_metric(g_rport, "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}")) <
               gone0 + 1 &&
           now_s() - t0 < 5)
        usleep(50000);
    CHECK_NEAR(gone, gone0 + 1, 0.5);
    speed_free(body);
}

/* ---- 5. overload and API keys on a second router -------------------------------------------- */

/* g_mport: the keyed router's metrics listener (router.metrics_port): with keys, /health and
 * /metrics on the API port need one, on the metrics port they are open. */
static int g_mport;

static void check_overload(int port) {
    int mport = g_mport;
    CHECK(cu_wait_health(mport, 200, 5));
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 2, false, NULL, NULL);
    cu_resp_t r;
    cu_http(port, "POST", "/v1/completions", body, NULL, NULL, 30000, &r);
    ou_check_error(&r, 401, "invalid_request_error", NULL, NULL, "no API key");
    cu_resp_free(&r);
    cu_http(port, "POST", "/v1/completions", body, "Bearer sekrit-wrong", NULL, 30000, &r);
    ou_check_error(&r, 401, "invalid_request_error", "invalid_api_key", NULL, "wrong API key");
    CHECK(r.body && !strstr(r.body, "sekrit-wrong"));
    cu_resp_free(&r);
    cu_http(port, "POST", "/v1/completions", body, "Basic k1", NULL, 30000, &r);
    CHECK_INT_EQ(r.status, 401);
    cu_resp_free(&r);
    cu_http(port, "GET", "/v1/models", NULL, NULL, NULL, 30000, &r);
    CHECK_INT_EQ(r.status, 401);
    cu_resp_free(&r);
    json_t *ref = ou_ref("c3", "--prompt-ids %s --prefill-layers 3 --max-tokens %d --top-logprobs 2", g_csv, N_GEN);
    ou_result_t res;
    CHECK_INT_EQ(complete(port, body, false, "Bearer k2", &res), 200);
    ou_check_ref(&res, ref, g_tok, false, "second key");
    ou_result_free(&res);

    /* the router counts a request until its worker has finished after the answer: wait for
     * that (see check_back_to_back) */
    CHECK(cu_wait_metric(mport, "speed_router_requests_running", 0, 5));
    /* and the nodes have let go of it (a node releases just after its last reply): the
     * prefill pool must not be stopped while it still holds that request */
    WAIT_FOR(blocks_reserved_all() == 0 && sum_nodes(false, "speed_decode_running_requests") == 0, 5000);
    CHECK_MSG(blocks_reserved_all() == 0, "blocks still reserved after the second-key request");
    /* hold the only slot: the prefill pool stalls (SIGSTOP), so A waits in Prefill */
    for (int i = 0; i < g_c.np; i++) kill(g_c.pre[i].pid, SIGSTOP);
    job_t a, b;
    job_start(&a, port, body, "Bearer k1");
    bool running = cu_wait_metric(mport, "speed_router_requests_running", 1, 10);
    CHECK_MSG(running, "request A never held the slot");
    job_start(&b, port, body, "Bearer k1");
    bool waiting = cu_wait_metric(mport, "speed_router_requests_waiting", 1, 10);
    CHECK_MSG(waiting, "request B never queued");
    /* C: beyond max_in_flight + max_queue */
    cu_http(port, "POST", "/v1/completions", body, "Bearer k1", NULL, 30000, &r);
    ou_check_error(&r, 429, "requests", "rate_limit_exceeded", NULL, "over the queue");
    CHECK_MSG(r.retry_after[0] && atoi(r.retry_after) >= 1, "429 Retry-After \"%s\"", r.retry_after);
    CHECK_MSG(r.seconds < 2, "the 429 took %.2f s", r.seconds);
    cu_resp_free(&r);
    cu_sse_t s;
    CHECK(cu_sse_begin(port, "/v1/completions", "{\"model\":\"model\",\"prompt\":[1,2,3],\"stream\":true}", "Bearer k1",
                       30000, &s));
    CHECK_INT_EQ(s.status, 429);
    cu_sse_free(&s);
    /* a bad key is still a 401 when full */
    cu_http(port, "POST", "/v1/completions", body, "Bearer nope", NULL, 30000, &r);
    CHECK_INT_EQ(r.status, 401);
    cu_resp_free(&r);
    /* B: queued past the queue timeout → 503 */
    pthread_join(b.th, NULL);
    ou_check_error(&b.resp, 503, "server_error", "service_unavailable", NULL, "queue timeout");
    CHECK_MSG(b.resp.seconds > 1.0 && b.resp.seconds < 10, "the 503 came after %.2f s (queue timeout 1.5 s)",
              b.resp.seconds);
    cu_resp_free(&b.resp);
    /* the prefill pool comes back; A finishes, exact */
    for (int i = 0; i < g_c.np; i++) kill(g_c.pre[i].pid, SIGCONT);
    pthread_join(a.th, NULL);
    CHECK_MSG(a.resp.status == 200, "A: HTTP %d %s", a.resp.status, a.resp.body ? a.resp.body : "");
    if (a.resp.json) {
        ou_from_json(&res, a.resp.json);
        ou_check_ref(&res, ref, g_tok, false, "request that held the slot");
        ou_result_free(&res);
    }
    cu_resp_free(&a.resp);
    CHECK(cu_wait_metric(mport, "speed_router_requests_running", 0, 5));
    double n429 = cu_metric(mport, "speed_router_requests_total{route=\"none\",status=\"429\"}");
    CHECK_NEAR(n429, 2, 0.5);
    if (n429 != 2) tu_system("curl -s http://127.0.0.1:%d/metrics | grep requests_total >&2", port);
    /* the main router sees the prefill nodes again */
    CHECK(cu_router_wait_nodes(&g_c, g_rport, g_c.np, g_c.nd, 10));
    speed_free(body);
    json_decref(ref);
}

/* A client that sends its requests one after the other never has more than one at once, so
 * a router with max_in_flight 1 and max_queue 0 must never refuse it. */
static void check_back_to_back(int port) {
    char *body = ou_completion_body("model", g_prompt, 8, 2, 0, false, NULL, NULL);
    int n429 = 0, n_other = 0;
    for (int k = 0; k < 200; k++) {
        cu_resp_t r;
        cu_http(port, "POST", "/v1/completions", body, NULL, NULL, 30000, &r);
        if (r.status == 429)
            n429++;
        else if (r.status != 200)
            n_other++;
        cu_resp_free(&r);
    }
    CHECK_MSG(n429 == 0, "%d of 200 back-to-back requests from one client got 429 (max_in_flight 1, max_queue 0)",
              n429);
    CHECK_INT_EQ(n_other, 0);
    speed_free(body);
}

/* ---- 6. SIGTERM to the router during a stream ------------------------------------------------ */

/* On the second router (it polls the nodes once a minute, so a stalled node is not noticed):
 * the decode node serving the stream is stopped (SIGSTOP) for the length of the drain checks,
 * so the stream is certainly still in flight while they run; then it goes on and completes. */
/* The control plane of every node refuses strangers: plaintext, TLS without a client certificate,
 * and a "router" certificate of another CA get no Health and no Drain; every node keeps
 * serving (the exactness checks that follow run through all of them). */
static void check_strangers(void) {
    static speed_rpc_tls_t no_cert;
    no_cert.ca = cu_rpc_tls("router")->ca;
    const speed_rpc_tls_t *who[] = {NULL, &no_cert, cu_rpc_tls("stranger")};
    const char *names[] = {"plaintext", "no certificate", "another CA"};
    for (int k = 0; k < 2 * (g_c.np + g_c.nd); k++) {
        int node = k / 2;
        int port = node < g_c.np ? cu_pre_grpc(&g_c, node) : cu_dec_grpc(&g_c, node - g_c.np);
        const char *method = k % 2 ? SPEED_METHOD_NODE_DRAIN : SPEED_METHOD_NODE_HEALTH;
        char target[64];
        snprintf(target, sizeof target, "127.0.0.1:%d", port);
        for (int s = 0; s < 3; s++) {
            speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
            cp.tls = who[s];
            speed_rpc_channel_t *ch = NULL;
            CHECK_INT_EQ(speed_rpc_channel_create(target, &cp, &ch), SPEED_OK);
            speed_rpc_reply_t r;
            speed_rpc_unary(ch, method, NULL, 0, 5000, &r);
            CHECK_MSG(r.code == SPEED_RPC_UNAVAILABLE, "%s: %s on port %d gave %s", names[s], method, port,
                      speed_rpc_code_name(r.code));
            speed_rpc_reply_cleanup(&r);
            speed_rpc_channel_destroy(ch);
        }
    }
    for (int i = 0; i < g_c.np; i++) CHECK(cu_wait_health(cu_pre_http(&g_c, i), 200, 5));
    for (int i = 0; i < g_c.nd; i++) CHECK(cu_wait_health(cu_dec_http(&g_c, i), 200, 5));
}

static void check_drain(cu_proc_t *router, int port, const char *auth) {
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, LONG_GEN, 0, true, NULL, NULL);
    cu_sse_t s;
    CHECK(cu_sse_begin(port, "/v1/completions", body, auth, 30000, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(cu_sse_read(&s, 2, now_s() + 30) >= 2);
    int held = -1;
    for (int i = 0; i < g_c.nd && held < 0; i++)
        if (cu_metric(cu_dec_http(&g_c, i), "speed_decode_running_requests") > 0) held = i;
    CHECK_MSG(held >= 0, "no decode node runs the stream");
    if (held >= 0) kill(g_c.dec[held].pid, SIGSTOP);
    kill(router->pid, SIGTERM);
    /* during the drain: /health 503, new requests 503 */
    double t0 = now_s();
    int hs = 0;
    while (now_s() - t0 < 5) {
        if (speed_http_get("127.0.0.1", (uint16_t)g_mport, "/health", 2000, &hs, NULL) == SPEED_OK && hs == 503) break;
        usleep(10000);
    }
    CHECK_MSG(hs == 503, "/health during the drain: %d", hs);
    char *small = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 0, false, NULL, NULL);
    cu_resp_t r;
    cu_http(port, "POST", "/v1/completions", small, auth, NULL, 30000, &r);
    ou_check_error(&r, 503, "server_error", "service_unavailable", NULL, "request during the drain");
    cu_resp_free(&r);
    cu_http(port, "POST", "/v1/chat/completions",
            "{\"model\":\"model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}", auth, NULL,
            30000, &r);
    CHECK_INT_EQ(r.status, 503);
    cu_resp_free(&r);
    /* the router must stay up while its stream is held: a while with nothing to wait on is the
     * check itself (the held decode node keeps the stream from ending) */
    usleep(300000);
    CHECK_MSG(cu_alive(router), "the router exited with a stream in flight");
    if (held >= 0) kill(g_c.dec[held].pid, SIGCONT);
    /* the stream in flight completes normally */
    cu_sse_read(&s, -1, now_s() + 90);
    ou_result_t res;
    ou_from_sse(&res, &s);
    CHECK_MSG(s.ended && res.done && !res.error && res.n_after_done == 0, "drained stream: ended %d done %d error %s",
              s.ended, res.done, res.error ? "yes" : "no");
    CHECK_MSG(res.finish[0] && res.n_finish == 1, "drained stream: finish \"%s\"", res.finish);
    CHECK_INT_EQ(ou_usage(&res, "completion_tokens"), LONG_GEN);
    ou_result_free(&res);
    cu_sse_free(&s);
    int rc = cu_wait_exit(router, 60);
    CHECK_MSG(rc == 0, "router exit %d after SIGTERM", rc);
    if (rc != 0) cu_log_tail(router->name, 30);
    speed_free(small);
    speed_free(body);
}

int main(void) {
    speed_log_configure("error");
    double t_start = now_s();
    cu_init("cluster");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &g_tok), SPEED_OK);
    if (!model || !g_tok) return CHECK_DONE();
    g_mc = &model->config;
    CHECK_INT_EQ(g_mc->n_layers, 4);
    ou_prompt(g_prompt, N_PROMPT, g_mc->vocab_size, 37);
    g_csv = ou_ids_csv(g_prompt, N_PROMPT);

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
                           "--log",
                           "info",
                           NULL};
    cu_cluster_init(&g_c, 2, 2, extra);
    bool ok = cu_cluster_start_nodes(&g_c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool ok0 = false, ok1 = false;
    cu_proc_t r0 = cu_cluster_router(&g_c, 0, NULL, 30, &ok0);
    /* Router 1 has keys (from the environment: a secret is refused on argv) and its /health
     * and /metrics on their own listener. */
    char mport_text[16];
    for (int tries = 0; tries < 200 && !g_mport; tries++) {
        int p = 20000 + (int)((unsigned)(getpid() * 7919 + tries * 104729) % 40000);
        if (tu_ports_free(p, 1)) g_mport = p;
    }
    snprintf(mport_text, sizeof mport_text, "%d", g_mport);
    setenv("SPEED_ROUTER_API_KEYS", " k1 , k2", 1);
    const char *r1_args[] = {"--router.max_in_flight",
                             "1",
                             "--router.max_queue",
                             "1",
                             "--router.queue_timeout_ms",
                             "1500",
                             "--router.metrics_port",
                             mport_text,
                             "--router.status_interval_ms",
                             "60000",
                             "--router.request_timeout_ms",
                             "60000",
                             NULL};
    /* Its API port answers /health only with a key: wait on the metrics port instead. */
    cu_proc_t r1 = cu_cluster_router(&g_c, 1, r1_args, 0.1, &ok1);
    unsetenv("SPEED_ROUTER_API_KEYS");
    ok1 = cu_wait_health(g_mport, 200, 30) && cu_router_wait_nodes(&g_c, g_mport, g_c.np, g_c.nd, 30);
    const char *r2_args[] = {"--router.max_in_flight", "1", "--router.max_queue", "0", NULL};
    bool ok2 = false;
    cu_proc_t r2 = cu_cluster_router(&g_c, 2, r2_args, 30, &ok2);
    CHECK_MSG(ok0 && ok1 && ok2, "routers did not come up");
    g_rport = cu_router_port(&g_c, 0);
    fprintf(stderr, "cluster up after %.1f s\n", now_s() - t_start);
    if (ok && ok0 && ok1 && ok2) {
        double t = now_s();
        check_strangers();
        fprintf(stderr, "strangers: %.1f s\n", now_s() - t);
        t = now_s();
        check_depth("4", 4, false);
        check_depth("4", 4, true);
        check_depth("3", 3, false);
        check_depth("3", 3, true);
        check_depth("0.5", 2, true);
        check_depth(NULL, 3, false); /* the deployment's default C */
        check_chat();
        fprintf(stderr, "exactness: %.1f s\n", now_s() - t);
        t = now_s();
        check_spread();
        fprintf(stderr, "spread: %.1f s\n", now_s() - t);
        t = now_s();
        check_bad_requests();
        fprintf(stderr, "bad requests: %.1f s\n", now_s() - t);
        t = now_s();
        check_disconnect();
        fprintf(stderr, "disconnect: %.1f s\n", now_s() - t);
        t = now_s();
        check_overload(cu_router_port(&g_c, 1));
        fprintf(stderr, "overload: %.1f s\n", now_s() - t);
        t = now_s();
        check_back_to_back(cu_router_port(&g_c, 2));
        fprintf(stderr, "back to back: %.1f s\n", now_s() - t);
        t = now_s();
        /* a node releases a request's blocks just after its last reply, so the count may lag
         * the last response by a moment */
        double t_free = now_s();
        while (blocks_reserved_all() > 0 && now_s() - t_free < 5) usleep(20000);
        CHECK_MSG(blocks_reserved_all() == 0, "blocks still reserved %.1f s after the last request", now_s() - t_free);
        check_drain(&r1, cu_router_port(&g_c, 1), "Bearer k1");
        fprintf(stderr, "drain: %.1f s\n", now_s() - t);
    }
    /* the other routers, then the nodes: SIGTERM, exit 0 */
    if (r1.pid) cu_stop(&r1, SIGKILL, 5);
    int rc = cu_stop(&r0, SIGTERM, 30);
    CHECK_MSG(rc == 0, "router0 exit %d", rc);
    rc = cu_stop(&r2, SIGTERM, 30);
    CHECK_MSG(rc == 0, "router2 exit %d", rc);
    CHECK(cu_wait_metric(cu_dec_http(&g_c, 0), "speed_kv_blocks_reserved", 0, 5));
    for (int i = 0; i < g_c.np; i++) {
        rc = cu_stop(&g_c.pre[i], SIGTERM, 30);
        CHECK_MSG(rc == 0, "prefill%d exit %d", i, rc);
    }
    for (int i = 0; i < g_c.nd; i++) {
        rc = cu_stop(&g_c.dec[i], SIGTERM, 30);
        CHECK_MSG(rc == 0, "decode%d exit %d", i, rc);
    }
    speed_free(g_csv);
    speed_tok_destroy(g_tok);
    speed_model_destroy(model);
    fprintf(stderr, "total %.1f s\n", now_s() - t_start);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
