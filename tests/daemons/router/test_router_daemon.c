/* speed-router daemon against fake nodes: the OpenAI API end to end (streamed and whole
 * answers, errors and their codes, API keys, /v1/models, /health, /metrics), both routes,
 * round robin over two decode nodes, the `speed` extension, X-Request-Id. */
#include "router_test_util.h"

static char model_dir[512];
static char cluster[1024];
static fake_node_t pre[2], dec[2];
static int pbase, dbase;

static const char *CHAT_STREAM = "{\"model\":\"tinymodel\",\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                                 "\"messages\":[{\"role\":\"user\",\"content\":\"Hello there, how are you today?\"}],"
                                 "\"max_tokens\":5}";
static const char *CHAT = "{\"model\":\"tinymodel\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                          "{\"role\":\"user\",\"content\":\"Hello there\"}],\"max_tokens\":5,\"temperature\":0}";

static int total(atomic_int *a, atomic_int *b) { return atomic_load(a) + atomic_load(b); }

static void test_streamed_chat(int port) {
    int gen0 = total(&dec[0].n_generate_first, &dec[1].n_generate_first);
    int res0 = total(&dec[0].n_reserve, &dec[1].n_reserve);
    int pre0 = total(&pre[0].n_prefill, &pre[1].n_prefill);
    sse_result_t s;
    CHECK(sse_post(port, "/v1/chat/completions", CHAT_STREAM, "my-req-1", &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK_CONTAINS(s.content_type, "text/event-stream");
    CHECK_STR_EQ(s.request_id, "my-req-1");
    CHECK(s.ended);
    CHECK_MSG(s.n >= 5, "%d events", s.n);
    if (s.n >= 5) {
        CHECK_STR_EQ(s.data[s.n - 1], "[DONE]");
        /* role, then content, ..., finish, usage */
        json_t *first = json_of(s.data[0]);
        CHECK_STR_EQ(jstr(first, "object"), "chat.completion.chunk");
        CHECK_STR_EQ(jstr(first, "id"), "chatcmpl-my-req-1");
        CHECK_STR_EQ(jstr(first, "choices[0].delta.role"), "assistant");
        CHECK_STR_EQ(jstr(first, "model"), "tinymodel");
        json_decref(first);
        char text[256] = "";
        const char *finish = NULL;
        json_t *usage_chunk = NULL;
        for (int i = 1; i < s.n - 1; i++) {
            json_t *j = json_of(s.data[i]);
            CHECK_MSG(j != NULL, "event %d is not JSON: %s", i, s.data[i]);
            const char *c = jstr(j, "choices[0].delta.content");
            if (c) strncat(text, c, sizeof text - strlen(text) - 1);
            const char *f = jstr(j, "choices[0].finish_reason");
            if (f) finish = f[0] == 'l' ? "length" : f[0] == 's' ? "stop" : "other";
            if (json_is_object(json_object_get(j, "usage"))) {
                json_decref(usage_chunk);
                usage_chunk = j;
            } else {
                json_decref(j);
            }
        }
        /* The first token comes from the prefill node ("F"), relayed by the decode node. */
        CHECK_STR_EQ(text, "Ft1 t2 t3 t4 ");
        CHECK_STR_EQ(finish, "length");
        CHECK_MSG(usage_chunk != NULL, "no usage chunk");
        if (usage_chunk) {
            CHECK_INT_EQ(json_array_size(json_object_get(usage_chunk, "choices")), 0);
            CHECK(jint(usage_chunk, "usage.prompt_tokens") > 5);
            CHECK_INT_EQ(jint(usage_chunk, "usage.completion_tokens"), 5);
            CHECK_INT_EQ(jint(usage_chunk, "usage.total_tokens"), jint(usage_chunk, "usage.prompt_tokens") + 5);
            CHECK_INT_EQ(jint(usage_chunk, "usage.kv_bytes"), 4096);
            CHECK_INT_EQ(jint(usage_chunk, "usage.kv_full_depth_bytes"), 8192);
            json_decref(usage_chunk);
        }
    }
    sse_result_free(&s);
    CHECK_INT_EQ(total(&dec[0].n_reserve, &dec[1].n_reserve), res0 + 1);
    CHECK_INT_EQ(total(&pre[0].n_prefill, &pre[1].n_prefill), pre0 + 1);
    CHECK_INT_EQ(total(&dec[0].n_generate_first, &dec[1].n_generate_first), gen0 + 1);
}

static void test_whole_answers(int port) {
    cu_resp_t r;
    CHECK(cu_post(port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 200);
    CHECK_CONTAINS(r.content_type, "application/json");
    CHECK(strlen(r.request_id) == 16); /* generated */
    json_t *j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "object"), "chat.completion");
    CHECK_STR_EQ(jstr(j, "choices[0].message.role"), "assistant");
    CHECK_STR_EQ(jstr(j, "choices[0].message.content"), "Ft1 t2 t3 t4 ");
    CHECK_STR_EQ(jstr(j, "choices[0].finish_reason"), "length");
    CHECK_INT_EQ(jint(j, "usage.completion_tokens"), 5);
    CHECK_INT_EQ(jint(j, "usage.kv_bytes"), 4096);
    char want_id[64];
    snprintf(want_id, sizeof want_id, "chatcmpl-%s", r.request_id);
    CHECK_STR_EQ(jstr(j, "id"), want_id);
    json_decref(j);
    cu_resp_free(&r);

    /* completions with logprobs (2 alternatives per position) */
    CHECK(cu_post(port, "/v1/completions",
                  "{\"model\":\"tinymodel\",\"prompt\":\"Once upon a time\",\"max_tokens\":5,"
                  "\"logprobs\":2}",
                  &r));
    CHECK_INT_EQ(r.status, 200);
    j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "object"), "text_completion");
    CHECK_STR_EQ(jstr(j, "choices[0].text"), "Ft1 t2 t3 t4 ");
    CHECK_INT_EQ(json_array_size(jget(j, "choices[0].logprobs.tokens")), 5);
    CHECK_INT_EQ(json_array_size(jget(j, "choices[0].logprobs.top_logprobs")), 5);
    CHECK_INT_EQ(json_object_size(jget(j, "choices[0].logprobs.top_logprobs[1]")), 2);
    CHECK_NEAR(json_real_value(jget(j, "choices[0].logprobs.token_logprobs[0]")), -0.25, 1e-6);
    json_decref(j);
    cu_resp_free(&r);

    /* streamed completions, prompt as token ids */
    sse_result_t s;
    CHECK(sse_post(port, "/v1/completions",
                   "{\"model\":\"tinymodel\",\"prompt\":[1,70,71,72,73,74,75,76],\"stream\":true}", NULL, &s));
    CHECK_INT_EQ(s.status, 200);
    CHECK(s.n >= 3 && strcmp(s.data[s.n - 1], "[DONE]") == 0);
    if (s.n >= 1) {
        json_t *c = json_of(s.data[0]);
        CHECK_STR_EQ(jstr(c, "object"), "text_completion");
        CHECK_STR_EQ(jstr(c, "choices[0].text"), "F");
        json_decref(c);
    }
    sse_result_free(&s);
    CHECK_INT_EQ(atomic_load(&pre[0].last_prefill_n_ids) + atomic_load(&pre[1].last_prefill_n_ids) > 0, 1);
}

/* Tokens that release no text yet (a partial UTF-8 character) still get a chunk each, with empty
 * text: a client sees every token arrive, and its time to first token is the first token's. */
static void test_streamed_textless_tokens(int port) {
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_textless, 3);
    for (int chat = 0; chat < 2; chat++) {
        sse_result_t s;
        CHECK(sse_post(port, chat ? "/v1/chat/completions" : "/v1/completions",
                       chat ? CHAT_STREAM
                            : "{\"model\":\"tinymodel\",\"prompt\":\"Hello\",\"stream\":true,\"max_tokens\":5}",
                       NULL, &s));
        CHECK_INT_EQ(s.status, 200);
        const char *path = chat ? "choices[0].delta.content" : "choices[0].text";
        int content = 0, empty = 0;
        char text[64] = "";
        for (int i = 0; i < s.n; i++) {
            json_t *j = json_of(s.data[i]);
            const char *c = j ? jstr(j, path) : NULL;
            if (c && !jstr(j, "choices[0].finish_reason") && !jstr(j, "choices[0].delta.role")) {
                content++;
                empty += c[0] == '\0';
                strncat(text, c, sizeof text - strlen(text) - 1);
            }
            json_decref(j);
        }
        /* 5 tokens, 5 events: F, three without text, "t4 " */
        CHECK_MSG(content == 5 && empty == 3, "%s: %d content chunks, %d empty", path, content, empty);
        CHECK_STR_EQ(text, "Ft4 ");
        sse_result_free(&s);
    }
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_textless, 0);
}

/* Streamed chat with logprobs: each content chunk carries its tokens' logprobs. */
static void test_streamed_logprobs(int port) {
    sse_result_t s;
    CHECK(sse_post(port, "/v1/chat/completions",
                   "{\"model\":\"tinymodel\",\"stream\":true,\"logprobs\":true,\"top_logprobs\":2,"
                   "\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":5}",
                   NULL, &s));
    CHECK_INT_EQ(s.status, 200);
    int n_lp = 0;
    for (int i = 0; i < s.n; i++) {
        json_t *j = json_of(s.data[i]);
        json_t *content = jget(j, "choices[0].logprobs.content");
        if (json_is_array(content) && json_array_size(content) == 1) {
            n_lp++;
            CHECK_NEAR(json_real_value(jget(j, "choices[0].logprobs.content[0].logprob")), -0.25, 1e-6);
            CHECK_INT_EQ(json_array_size(jget(j, "choices[0].logprobs.content[0].top_logprobs")), 2);
            CHECK_STR_EQ(jstr(j, "choices[0].logprobs.content[0].top_logprobs[1].token"), "b");
        }
        json_decref(j);
    }
    CHECK_INT_EQ(n_lp, 5);
    sse_result_free(&s);
}

static void expect_error(int port, const char *path, const char *body, int status, const char *type, const char *code,
                         const char *param) {
    cu_resp_t r;
    CHECK(cu_post(port, path, body, &r));
    CHECK_MSG(r.status == status, "%s -> %d, want %d (%s)", body, r.status, status, r.body ? r.body : "");
    json_t *j = json_of(r.body);
    CHECK_MSG(json_is_object(jget(j, "error")), "not an error object: %s", r.body ? r.body : "");
    CHECK(jstr(j, "error.message") != NULL);
    if (type) CHECK_STR_EQ(jstr(j, "error.type"), type);
    if (code) CHECK_STR_EQ(jstr(j, "error.code"), code);
    if (param) CHECK_STR_EQ(jstr(j, "error.param"), param);
    CHECK(r.request_id[0] != '\0');
    json_decref(j);
    cu_resp_free(&r);
}

static void test_errors(int port) {
    expect_error(port, "/v1/chat/completions", "{not json", 400, "invalid_request_error", NULL, NULL);
    expect_error(port, "/v1/chat/completions", "", 400, "invalid_request_error", NULL, NULL);
    expect_error(port, "/v1/chat/completions",
                 "{\"model\":\"tinymodel\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":2}", 400,
                 "invalid_request_error", NULL, "n");
    expect_error(port, "/v1/chat/completions", "{\"model\":\"tinymodel\"}", 400, "invalid_request_error",
                 "missing_required_parameter", "messages");
    expect_error(port, "/v1/completions", "{\"model\":\"tinymodel\",\"prompt\":\"x\",\"temperature\":\"hot\"}", 400,
                 "invalid_request_error", "invalid_type", "temperature");
    expect_error(port, "/v1/chat/completions",
                 "{\"model\":\"gpt-4\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", 404,
                 "invalid_request_error", "model_not_found", NULL);
    /* 128 positions: 200 prompt ids do not fit */
    char body[2048];
    int n = snprintf(body, sizeof body, "{\"model\":\"tinymodel\",\"prompt\":[");
    for (int i = 0; i < 200; i++) n += snprintf(body + n, sizeof body - (size_t)n, "%s%d", i ? "," : "", 70 + i % 20);
    snprintf(body + n, sizeof body - (size_t)n, "]}");
    expect_error(port, "/v1/completions", body, 413, "invalid_request_error", "context_length_exceeded", NULL);
    expect_error(port, "/v1/completions", "{\"model\":\"tinymodel\",\"prompt\":\"hello world\",\"max_tokens\":127}",
                 413, "invalid_request_error", NULL, NULL);
    /* a token id outside the vocabulary */
    expect_error(port, "/v1/completions", "{\"model\":\"tinymodel\",\"prompt\":[1,99999]}", 400,
                 "invalid_request_error", NULL, NULL);

    cu_resp_t r;
    CHECK(cu_http(port, "GET", "/v1/nothing", NULL, NULL, NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 404);
    cu_resp_free(&r);
    CHECK(cu_http(port, "GET", "/v1/chat/completions", NULL, NULL, NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 405);
    cu_resp_free(&r);
    /* an X-Request-Id that is not an id is replaced, never echoed */
    CHECK(cu_http(port, "POST", "/v1/chat/completions", "{bad", NULL, "bad id with spaces", 30000, &r));
    CHECK_INT_EQ(r.status, 400);
    CHECK(strcmp(r.request_id, "bad id with spaces") != 0 && strlen(r.request_id) == 16);
    cu_resp_free(&r);
}

static void test_models_health(int port) {
    cu_resp_t r;
    CHECK(cu_http(port, "GET", "/v1/models", NULL, NULL, NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 200);
    json_t *j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "object"), "list");
    CHECK_STR_EQ(jstr(j, "data[0].id"), "tinymodel");
    json_decref(j);
    cu_resp_free(&r);
    CHECK(cu_http(port, "GET", "/health", NULL, NULL, NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 200);
    j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "status"), "ok");
    CHECK_INT_EQ(jint(j, "decode_nodes_up"), 2);
    CHECK_INT_EQ(jint(j, "prefill_nodes_up"), 2);
    json_decref(j);
    cu_resp_free(&r);
}

static void test_round_robin(int port) {
    int d0 = atomic_load(&dec[0].n_generate), d1 = atomic_load(&dec[1].n_generate);
    int p0 = atomic_load(&pre[0].n_prefill), p1 = atomic_load(&pre[1].n_prefill);
    for (int i = 0; i < 6; i++) {
        cu_resp_t r;
        CHECK(cu_post(port, "/v1/chat/completions", CHAT, &r));
        CHECK_INT_EQ(r.status, 200);
        cu_resp_free(&r);
    }
    CHECK_INT_EQ(atomic_load(&dec[0].n_generate) - d0, 3);
    CHECK_INT_EQ(atomic_load(&dec[1].n_generate) - d1, 3);
    CHECK_INT_EQ(atomic_load(&pre[0].n_prefill) - p0, 3);
    CHECK_INT_EQ(atomic_load(&pre[1].n_prefill) - p1, 3);
}

typedef struct {
    int port, ok;
} conc_t;

static void *conc_main(void *arg) {
    conc_t *c = arg;
    for (int i = 0; i < 4; i++) {
        if (i % 2) {
            cu_resp_t r;
            if (cu_post(c->port, "/v1/chat/completions", CHAT, &r) && r.status == 200) c->ok++;
            cu_resp_free(&r);
        } else {
            sse_result_t s;
            if (sse_post(c->port, "/v1/chat/completions", CHAT_STREAM, NULL, &s) && s.status == 200 && s.n > 0 &&
                strcmp(s.data[s.n - 1], "[DONE]") == 0)
                c->ok++;
            sse_result_free(&s);
        }
    }
    return NULL;
}

/* 16 clients at once, streamed and whole answers mixed: all answered. */
static void test_concurrency(int port) {
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_delay_ms, 2);
    pthread_t th[16];
    conc_t c[16];
    for (int i = 0; i < 16; i++) {
        c[i].port = port;
        c[i].ok = 0;
        pthread_create(&th[i], NULL, conc_main, &c[i]);
    }
    int ok = 0;
    for (int i = 0; i < 16; i++) {
        pthread_join(th[i], NULL);
        ok += c[i].ok;
    }
    CHECK_INT_EQ(ok, 64);
    for (int i = 0; i < 2; i++) atomic_store(&dec[i].gen_delay_ms, 0);
}

static void test_speed_extension(int port) {
    cu_resp_t r;
    CHECK(cu_post(port, "/v1/completions",
                  "{\"model\":\"tinymodel\",\"prompt\":\"Once upon a time\",\"max_tokens\":3,"
                  "\"speed\":{\"prefill_layers\":2}}",
                  &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    CHECK(atomic_load(&dec[0].last_reserve_prefill_layers) == 2 ||
          atomic_load(&dec[1].last_reserve_prefill_layers) == 2);
    expect_error(port, "/v1/completions", "{\"model\":\"tinymodel\",\"prompt\":\"x\",\"speed\":{\"prefill_layers\":9}}",
                 400, "invalid_request_error", NULL, NULL);
    /* ignore_eos reaches the decode node's sampling params (and is off unless asked) */
    for (int want = 1; want >= 0; want--) {
        for (int i = 0; i < 2; i++) atomic_store(&dec[i].last_generate_ignore_eos, -1);
        char body[200];
        snprintf(body, sizeof body, "{\"model\":\"tinymodel\",\"prompt\":\"Once\",\"max_tokens\":2%s}",
                 want ? ",\"ignore_eos\":true" : "");
        CHECK(cu_post(port, "/v1/completions", body, &r));
        CHECK_INT_EQ(r.status, 200);
        cu_resp_free(&r);
        CHECK(atomic_load(&dec[0].last_generate_ignore_eos) == want ||
              atomic_load(&dec[1].last_generate_ignore_eos) == want);
    }
}

static void test_metrics(int port, int n_ok_min) {
    /* A worker lets go of its admission slot just after the answer's last byte. */
    CHECK(cu_wait_metric(port, "speed_router_requests_running", 0, 5));
    char *m = cu_metrics(port);
    CHECK(m != NULL);
    if (!m) return;
    char err[256];
    CHECK_MSG(prom_check(m, err, sizeof err) == 0, "/metrics: %s", err);
    double ok = prom_value(m, "speed_router_requests_total{route=\"disaggregated\",status=\"200\"}");
    CHECK_MSG(ok >= n_ok_min, "requests_total 200 = %g, want >= %d", ok, n_ok_min);
    CHECK(prom_value(m, "speed_router_requests_total{route=\"none\",status=\"400\"}") >= 1);
    CHECK(prom_value(m, "speed_router_requests_total{route=\"none\",status=\"404\"}") >= 1);
    CHECK(prom_value(m, "speed_router_requests_total{route=\"none\",status=\"413\"}") >= 1);
    CHECK(prom_value(m, "speed_router_route_decisions_total{route=\"disaggregated\",reason=\"long_prompt\"}") >=
          n_ok_min);
    CHECK(prom_value(m, "speed_router_time_to_first_token_seconds_count") >= n_ok_min);
    CHECK(prom_value(m, "speed_router_inter_token_latency_seconds_count") >= 4.0 * n_ok_min);
    CHECK(prom_value(m, "speed_router_e2e_request_latency_seconds_count") >= n_ok_min);
    CHECK(prom_value(m, "speed_router_kv_bytes_shipped_total") >= 4096.0 * n_ok_min);
    CHECK(prom_value(m, "speed_router_generated_tokens_total") >= 5.0 * n_ok_min);
    CHECK(prom_value(m, "speed_router_prompt_tokens_total") > n_ok_min);
    CHECK(prom_value(m, "speed_router_requests_running") == 0);
    CHECK(prom_value(m, "speed_router_requests_waiting") == 0);
    CHECK(prom_value(m, "speed_router_prefill_retries_total") == 0);
    char series[256];
    snprintf(series, sizeof series, "speed_router_node_up{pool=\"decode\",node=\"127.0.0.1:%d\"}", dbase + 1);
    CHECK(prom_value(m, series) == 1);
    snprintf(series, sizeof series, "speed_router_node_up{pool=\"prefill\",node=\"127.0.0.1:%d\"}", pbase);
    CHECK(prom_value(m, series) == 1);
    speed_free(m);
}

/* Decode-only: below the threshold, Generate carries the prompt and nothing is reserved. */
static void test_decode_only(void) {
    router_proc_t rp;
    const char *args[] = {"--router.decode_only_below", "1000", "--served_model_name", "tinymodel", NULL};
    CHECK(router_start(&rp, cluster, args));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(rp.port, 200, 10));
    int res0 = total(&dec[0].n_reserve, &dec[1].n_reserve);
    int pre0 = total(&pre[0].n_prefill, &pre[1].n_prefill);
    int gp0 = total(&dec[0].n_generate_prompt, &dec[1].n_generate_prompt);
    cu_resp_t r;
    CHECK(cu_post(rp.port, "/v1/chat/completions", CHAT, &r));
    CHECK_INT_EQ(r.status, 200);
    json_t *j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "choices[0].message.content"), "t0 t1 t2 t3 t4 ");
    CHECK_INT_EQ(jint(j, "usage.kv_bytes"), 0);
    json_decref(j);
    cu_resp_free(&r);
    CHECK_INT_EQ(total(&dec[0].n_reserve, &dec[1].n_reserve), res0);
    CHECK_INT_EQ(total(&pre[0].n_prefill, &pre[1].n_prefill), pre0);
    CHECK_INT_EQ(total(&dec[0].n_generate_prompt, &dec[1].n_generate_prompt), gp0 + 1);
    char *m = cu_metrics(rp.port);
    CHECK(prom_value(m, "speed_router_route_decisions_total{route=\"decode_only\",reason=\"short_prompt\"}") == 1);
    CHECK(prom_value(m, "speed_router_requests_total{route=\"decode_only\",status=\"200\"}") == 1);
    speed_free(m);
    CHECK_INT_EQ(router_stop(&rp), 0);

    /* No prefill pool at all: decode-only, reason no_prefill_node. */
    char cl[1100];
    snprintf(cl, sizeof cl, "%s.noprefill.yaml", cluster);
    CHECK(write_cluster(cl, model_dir, 0, pbase, 2, dbase));
    const char *args2[] = {"--served_model_name", "tinymodel", NULL};
    CHECK(router_start(&rp, cl, args2));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(rp.port, 200, 10));
    CHECK(cu_post(rp.port, "/v1/completions",
                  "{\"model\":\"tinymodel\",\"prompt\":\"Once upon a time\",\"max_tokens\":5}", &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    CHECK_INT_EQ(total(&dec[0].n_generate_prompt, &dec[1].n_generate_prompt), gp0 + 2);
    m = cu_metrics(rp.port);
    CHECK(prom_value(m, "speed_router_route_decisions_total{route=\"decode_only\",reason=\"no_prefill_node\"}") == 1);
    speed_free(m);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

static void test_api_keys(void) {
    router_proc_t rp;
    /* Keys are secrets: the environment (or a keys file), never argv. */
    const char *args[] = {"--served_model_name", "tinymodel", "--speed.allow_request_override=false", NULL};
    setenv("SPEED_ROUTER_API_KEYS", "key-one, key-two", 1);
    CHECK(router_start(&rp, cluster, args));
    unsetenv("SPEED_ROUTER_API_KEYS");
    if (!rp.pid || rp.exited) return;
    /* With keys, /health and /metrics on the API port want one too. */
    cu_resp_t h;
    CHECK(cu_http(rp.port, "GET", "/health", NULL, NULL, NULL, 30000, &h));
    CHECK_INT_EQ(h.status, 401);
    cu_resp_free(&h);
    CHECK(cu_http(rp.port, "GET", "/metrics", NULL, NULL, NULL, 30000, &h));
    CHECK_INT_EQ(h.status, 401);
    cu_resp_free(&h);
    for (double until = now_s() + 10; now_s() < until; sleep_ms(50)) {
        CHECK(cu_http(rp.port, "GET", "/health", NULL, "Bearer key-one", NULL, 30000, &h));
        bool up = h.status == 200;
        cu_resp_free(&h);
        if (up) break;
    }
    cu_resp_t r;
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions", CHAT, NULL, NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 401);
    json_t *j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "error.type"), "invalid_request_error");
    json_decref(j);
    cu_resp_free(&r);
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions", CHAT, "Bearer key-three", NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 401);
    j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "error.code"), "invalid_api_key");
    CHECK(strstr(r.body, "key-three") == NULL);
    json_decref(j);
    cu_resp_free(&r);
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions", CHAT, "Bearer key-two", NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    CHECK(cu_http(rp.port, "GET", "/v1/models", NULL, NULL, NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 401);
    cu_resp_free(&r);
    CHECK(cu_http(rp.port, "GET", "/v1/models", NULL, "bearer key-one", NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    CHECK(cu_http(rp.port, "GET", "/health", NULL, "Bearer key-two", NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    /* the deployment does not allow the speed object */
    CHECK(cu_http(rp.port, "POST", "/v1/completions",
                  "{\"model\":\"tinymodel\",\"prompt\":\"x\",\"speed\":{\"prefill_layers\":2}}", "Bearer key-one", NULL,
                  30000, &r));
    CHECK_INT_EQ(r.status, 400);
    j = json_of(r.body);
    CHECK_STR_EQ(jstr(j, "error.param"), "speed");
    json_decref(j);
    cu_resp_free(&r);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

static void test_cli(void) {
    /* --print-config and a bad option, without starting anything */
    const char *bin = getenv("SPEED_ROUTER");
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --print-config > /dev/null", bin, cluster);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 0);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --router.nope 1 2> /dev/null", bin, cluster);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof cmd, "'%s' --help > /dev/null", bin);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 0);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --model /nonexistent 2> /dev/null", bin, cluster);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 1);
    /* the control plane: no certificate (and not insecure) is refused with the way out; a
     * certificate of another CA is refused naming the file */
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --tls.cert '' 2> '%s.err'", bin, cluster, cluster);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof cmd,
             "grep -q 'speed-router: no certificate for the control plane: run .speedctl certs' '%s.err'", cluster);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 0);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --tls.cert '%s' --tls.key '%s' 2> '%s.err'", bin, cluster,
             tu_path("certs/stranger.crt"), tu_path("certs/stranger.key"), cluster);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 2);
    snprintf(cmd, sizeof cmd, "grep -q 'stranger.crt is not signed by the cluster CA' '%s.err'", cluster);
    CHECK_INT_EQ(WEXITSTATUS(system(cmd)), 0);
}

int main(void) {
    json_set_alloc_funcs(speed_malloc, speed_free);
    if (!getenv("SPEED_ROUTER")) SKIP_TEST("SPEED_ROUTER (the speed-router binary) is not set");
    const char *parent = tu_tmp_init("router-daemon");
    snprintf(model_dir, sizeof model_dir, "%s/tinymodel", parent);
    CHECK(make_model_dir(model_dir));
    CHECK(fake_start_pool(pre, 2, "prefill", &pbase));
    CHECK(fake_start_pool(dec, 2, "decode", &dbase));
    snprintf(cluster, sizeof cluster, "%s/cluster.yaml", parent);
    CHECK(write_cluster(cluster, model_dir, 2, pbase, 2, dbase));

    router_proc_t rp;
    /* The served name defaults to the model directory's base name: "tinymodel". */
    CHECK(router_start(&rp, cluster, NULL));
    if (rp.pid && !rp.exited) {
        CHECK(cu_wait_health(rp.port, 200, 10));
        test_models_health(rp.port);
        test_streamed_chat(rp.port);
        test_streamed_logprobs(rp.port);
        test_streamed_textless_tokens(rp.port);
        test_whole_answers(rp.port);
        test_errors(rp.port);
        test_round_robin(rp.port);
        test_speed_extension(rp.port);
        test_metrics(rp.port, 1 + 1 + 3 + 6 + 1);
        test_concurrency(rp.port);
        CHECK_INT_EQ(router_stop(&rp), 0);
    }
    test_decode_only();
    test_api_keys();
    test_cli();

    for (int i = 0; i < 2; i++) {
        fake_stop(&pre[i]);
        fake_stop(&dec[i]);
    }
    tu_rm_rf(parent);
    return CHECK_DONE();
}
