/* speedctl loadgen's parts without a server (loadgen.h): the seeded length distributions and
 * arrival processes against their parameters, the percentile, the trace parser and its errors,
 * exact-length prompts with a tokenizer, the URL and body, goodput, and the SSE reader against a
 * scripted server on a socketpair (llama-server style chunks without usage, with [DONE]; usage in
 * the last chunk; pings; error events; a stream cut short; an HTTP error; a non-streaming answer). */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "clock.h"
#include "http.h"
#include "loadgen.h"
#include "test_fs.h"
#include "test_proc.h"

/* ---- distributions and arrivals --------------------------------------------------------------- */

static void sample_stats(const char *spec, int64_t max, int n, double *mean, double *median, double *sd, int64_t *lo,
                         int64_t *hi) {
    speed_lg_dist_t d;
    char err[256];
    CHECK_MSG(speed_lg_dist_parse("--x", spec, &d, err, sizeof err) == SPEED_OK, "%s: %s", spec, err);
    double *v = malloc((size_t)n * sizeof *v);
    speed_lg_rng_t rng;
    speed_lg_rng_seed(&rng, 42, 0);
    double sum = 0, sum2 = 0;
    *lo = INT64_MAX;
    *hi = INT64_MIN;
    for (int i = 0; i < n; i++) {
        int64_t x = speed_lg_dist_sample(&d, &rng, max);
        v[i] = (double)x;
        sum += v[i];
        sum2 += v[i] * v[i];
        if (x < *lo) *lo = x;
        if (x > *hi) *hi = x;
    }
    *mean = sum / n;
    *sd = sqrt(sum2 / n - *mean * *mean);
    speed_lg_stats_t s = speed_lg_stats(v, (size_t)n);
    *median = s.p50;
    free(v);
}

static void test_distributions(void) {
    double mean, median, sd;
    int64_t lo, hi;
    const int n = 20000;
    sample_stats("fixed:7", 1000, n, &mean, &median, &sd, &lo, &hi);
    CHECK(lo == 7 && hi == 7);
    sample_stats("uniform:10,20", 1000, n, &mean, &median, &sd, &lo, &hi);
    CHECK_NEAR(mean, 15, 0.15);
    CHECK(lo == 10 && hi == 20); /* both ends drawn, nothing outside */
    sample_stats("normal:100,10", 1000, n, &mean, &median, &sd, &lo, &hi);
    CHECK_NEAR(mean, 100, 0.5);
    CHECK_NEAR(sd, 10, 0.4);
    /* lognormal:MEDIAN,SIGMA: the median is MEDIAN, the mean MEDIAN * exp(SIGMA^2 / 2) */
    sample_stats("lognormal:200,0.5", 100000, n, &mean, &median, &sd, &lo, &hi);
    CHECK_NEAR(median, 200, 4);
    CHECK_NEAR(mean, 200 * exp(0.125), 3);
    /* clamped to [1, max] */
    sample_stats("normal:5,100", 10, n, &mean, &median, &sd, &lo, &hi);
    CHECK(lo == 1 && hi == 10);
    sample_stats("lognormal:50,3", 64, n, &mean, &median, &sd, &lo, &hi);
    CHECK(lo >= 1 && hi == 64);

    /* bad specs: a clear reason naming the option */
    static const char *const bad[] = {"",
                                      "fixed",
                                      "fixed:",
                                      "fixed:0",
                                      "fixed:1.5",
                                      "fixed:3,4",
                                      "uniform:5",
                                      "uniform:9,3",
                                      "uniform:0,3",
                                      "normal:10",
                                      "normal:10,-1",
                                      "normal:x,1",
                                      "lognormal:0,1",
                                      "lognormal:10,-0.5",
                                      "poisson:3",
                                      "fixed:nan",
                                      "fixed:1e999",
                                      "uniform:1,2,3",
                                      "fixed:5 "};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        speed_lg_dist_t d;
        char err[256] = "";
        CHECK_MSG(speed_lg_dist_parse("--prompt-tokens", bad[i], &d, err, sizeof err) == SPEED_ERR_INVALID_ARGUMENT,
                  "'%s' accepted", bad[i]);
        CHECK_CONTAINS(err, "--prompt-tokens");
    }
    speed_lg_dist_t d;
    char err[256], txt[64];
    CHECK(speed_lg_dist_parse("--x", "lognormal:128,0.5", &d, err, sizeof err) == SPEED_OK);
    speed_lg_dist_format(&d, txt, sizeof txt);
    CHECK_STR_EQ(txt, "lognormal:128,0.5");
}

static void test_workload(void) {
    /* the same seed gives the same jobs; another seed other ones */
    speed_lg_workload_params_t p = {0};
    char err[128];
    CHECK(speed_lg_dist_parse("p", "uniform:1,1000", &p.prompt, err, sizeof err) == SPEED_OK);
    CHECK(speed_lg_dist_parse("o", "uniform:1,1000", &p.output, err, sizeof err) == SPEED_OK);
    p.rate = 10;
    p.seed = 5;
    speed_lg_workload_t a, b, c;
    speed_lg_workload_init(&a, &p);
    speed_lg_workload_init(&b, &p);
    p.seed = 6;
    speed_lg_workload_init(&c, &p);
    int same_c = 0;
    double sum_gap = 0, sum_gap2 = 0, last = 0;
    const int n = 20000;
    for (int i = 0; i < n; i++) {
        speed_lg_job_t ja, jb, jc;
        CHECK(speed_lg_workload_next(&a, &ja) && speed_lg_workload_next(&b, &jb) && speed_lg_workload_next(&c, &jc));
        if (i < 100) {
            CHECK(ja.prompt_tokens == jb.prompt_tokens && ja.output_tokens == jb.output_tokens &&
                  ja.arrival_s == jb.arrival_s && ja.prompt_seed == jb.prompt_seed);
            same_c += ja.prompt_tokens == jc.prompt_tokens;
        }
        CHECK(ja.index == i);
        double gap = ja.arrival_s - last;
        CHECK(gap >= 0);
        sum_gap += gap;
        sum_gap2 += gap * gap;
        last = ja.arrival_s;
    }
    CHECK(same_c < 10);
    /* Poisson at 10/s: exponential gaps, mean 0.1 s and sd 0.1 s */
    double mg = sum_gap / n, sdg = sqrt(sum_gap2 / n - mg * mg);
    CHECK_NEAR(mg, 0.1, 0.003);
    CHECK_NEAR(sdg, 0.1, 0.004);
    /* constant: exactly 1/rate apart, from 0 */
    p.arrival = SPEED_LG_ARRIVAL_CONSTANT;
    p.rate = 4;
    speed_lg_workload_init(&a, &p);
    for (int i = 0; i < 10; i++) {
        speed_lg_job_t j;
        CHECK(speed_lg_workload_next(&a, &j));
        CHECK_NEAR(j.arrival_s, i * 0.25, 1e-9);
    }
    /* every request's prompt seed differs */
    speed_lg_workload_init(&a, &p);
    uint64_t seeds[64];
    for (int i = 0; i < 64; i++) {
        speed_lg_job_t j;
        speed_lg_workload_next(&a, &j);
        seeds[i] = j.prompt_seed;
        for (int k = 0; k < i; k++) CHECK(seeds[k] != seeds[i]);
    }
}

/* ---- percentiles and the report --------------------------------------------------------------- */

static void test_percentile(void) {
    double v[] = {1, 2, 3, 4};
    CHECK_NEAR(speed_lg_percentile(v, 4, 50), 2.5, 1e-12);
    CHECK_NEAR(speed_lg_percentile(v, 4, 0), 1, 0);
    CHECK_NEAR(speed_lg_percentile(v, 4, 100), 4, 0);
    CHECK_NEAR(speed_lg_percentile(v, 4, 25), 1.75, 1e-12);
    CHECK_NEAR(speed_lg_percentile(v, 1, 99), 1, 0);
    CHECK_NEAR(speed_lg_percentile(v, 0, 50), 0, 0);
    double w[10];
    for (int i = 0; i < 10; i++) w[i] = 10 - i; /* unsorted: speed_lg_stats sorts */
    speed_lg_stats_t s = speed_lg_stats(w, 10);
    CHECK_NEAR(s.p50, 5.5, 1e-12);
    CHECK_NEAR(s.p90, 9.1, 1e-12);
    CHECK_NEAR(s.p99, 9.91, 1e-12);
    CHECK_NEAR(s.mean, 5.5, 1e-12);
    CHECK(s.min == 1 && s.max == 10 && s.n == 10);
}

static speed_lg_result_t fake_result(int i, double ttft_ms, double e2e_ms, int64_t tokens) {
    speed_lg_result_t r = {0};
    r.index = i;
    r.conversation = r.turn = -1;
    r.outcome = SPEED_LG_OK;
    r.t_sched = r.t_send = i * 0.1;
    r.t_first = r.t_send + ttft_ms / 1000;
    r.t_end = r.t_send + e2e_ms / 1000;
    r.output_tokens = r.output_tokens_req = tokens;
    r.prompt_tokens = r.prompt_tokens_req = 10;
    r.kv_bytes = -1;
    return r;
}

static void test_goodput(void) {
    speed_lg_result_t res[5];
    for (int i = 0; i < 4; i++) res[i] = fake_result(i, 10 + i * 10, 100 + i * 100, 11); /* tpot 9, 18, 27, 36 ms */
    res[4] = fake_result(4, 5, 50, 11);
    res[4].outcome = SPEED_LG_ERROR;
    snprintf(res[4].error, sizeof res[4].error, "http_503");
    json_t *cfg = json_object();
    speed_lg_report_params_t p = {cfg, 5, 2, 10.0, {0, 0, 0}, true};
    struct {
        speed_lg_slo_t slo;
        int met;
    } cases[] = {
        {{0, 0, 0}, 4},       {{25, 0, 0}, 2},    {{0, 20, 0}, 2},    {{0, 0, 300}, 3},
        {{1e9, 1e9, 1e9}, 4}, {{0.001, 0, 0}, 0}, {{30, 30, 250}, 2},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        p.slo = cases[k].slo;
        json_t *rep = speed_lg_report_json(&p, res, 5);
        json_t *g = json_object_get(rep, "goodput");
        CHECK_MSG(json_integer_value(json_object_get(g, "met")) == cases[k].met, "case %zu: met %lld, want %d", k,
                  (long long)json_integer_value(json_object_get(g, "met")), cases[k].met);
        CHECK_NEAR(json_real_value(json_object_get(g, "requests_per_s")), cases[k].met / 10.0, 1e-9);
        json_decref(rep);
    }
    p.slo = (speed_lg_slo_t){0, 0, 0};
    json_t *rep = speed_lg_report_json(&p, res, 5);
    json_t *rq = json_object_get(rep, "requests");
    CHECK_INT_EQ(json_integer_value(json_object_get(rq, "completed")), 4);
    CHECK_INT_EQ(json_integer_value(json_object_get(rq, "failed")), 1);
    CHECK_INT_EQ(json_integer_value(json_object_get(rq, "dropped")), 2);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(rq, "errors"), "http_503")), 1);
    CHECK_NEAR(json_real_value(json_object_get(json_object_get(rep, "throughput"), "requests_per_s")), 0.4, 1e-9);
    CHECK_NEAR(json_real_value(json_object_get(json_object_get(rep, "throughput"), "output_tokens_per_s")), 4.4, 1e-9);
    json_t *ttft = json_object_get(json_object_get(rep, "latency_ms"), "ttft");
    CHECK_NEAR(json_real_value(json_object_get(ttft, "p50")), 25, 1e-6);
    CHECK_NEAR(json_real_value(json_object_get(ttft, "mean")), 25, 1e-6);
    json_t *tpot = json_object_get(json_object_get(rep, "latency_ms"), "tpot");
    CHECK_NEAR(json_real_value(json_object_get(tpot, "p50")), 22.5, 1e-6);
    FILE *f = tmpfile();
    speed_lg_report_print(rep, f);
    CHECK(ftell(f) > 100);
    fclose(f);
    json_decref(rep);
    json_decref(cfg);
}

/* ---- the trace --------------------------------------------------------------------------------- */

static void test_trace(void) {
    const char *good =
        "# a comment\n"
        "{\"arrival_ms\": 1000, \"input_tokens\": 12, \"output_tokens\": 3}\n"
        "\n"
        "  {\"timestamp\": 1250.5, \"input_tokens\": 7, \"output_tokens\": 1, \"prefill_layers\": 2}\r\n"
        "{\"arrival_ms\": 1250.5, \"input_tokens\": 8.0, \"output_tokens\": 2, \"prefill_layers\": null}";
    speed_lg_trace_t t;
    char err[256] = "";
    CHECK_MSG(speed_lg_trace_parse(good, strlen(good), &t, err, sizeof err) == SPEED_OK, "%s", err);
    CHECK_INT_EQ(t.n, 3);
    if (t.n == 3) {
        CHECK_NEAR(t.entries[0].arrival_s, 0, 0);
        CHECK_NEAR(t.entries[1].arrival_s, 0.2505, 1e-12);
        CHECK(t.entries[0].input_tokens == 12 && t.entries[0].output_tokens == 3 && t.entries[0].prefill_layers == 0);
        CHECK(t.entries[1].prefill_layers == 2 && t.entries[2].input_tokens == 8);
    }
    /* the workload follows it */
    speed_lg_workload_params_t p = {0};
    p.trace = &t;
    p.time_scale = 2;
    p.prefill_layers = 5;
    speed_lg_workload_t w;
    speed_lg_workload_init(&w, &p);
    speed_lg_job_t j;
    CHECK(speed_lg_workload_next(&w, &j) && j.prompt_tokens == 12 && j.prefill_layers == 5);
    CHECK(speed_lg_workload_next(&w, &j) && fabs(j.arrival_s - 0.501) < 1e-12 && j.prefill_layers == 2);
    CHECK(speed_lg_workload_next(&w, &j));
    CHECK(!speed_lg_workload_next(&w, &j));
    speed_lg_trace_free(&t);

    struct {
        const char *text, *want;
    } bad[] = {
        {"{\"arrival_ms\":0,\"input_tokens\":1,\"output_tokens\":1}\n{\"arrival_ms\":1,\"input_tokens\":1}",
         "line 2: missing \"output_tokens\""},
        {"\n\n{oops}", "line 3: invalid JSON"},
        {"[1,2]", "line 1: expected a JSON object"},
        {"{\"input_tokens\":1,\"output_tokens\":1}", "line 1: missing \"arrival_ms\""},
        {"{\"arrival_ms\":-1,\"input_tokens\":1,\"output_tokens\":1}", "line 1: \"arrival_ms\" must be"},
        {"{\"arrival_ms\":\"5\",\"input_tokens\":1,\"output_tokens\":1}", "line 1: \"arrival_ms\" must be"},
        {"{\"arrival_ms\":0,\"input_tokens\":0,\"output_tokens\":1}", "line 1: \"input_tokens\" must be"},
        {"{\"arrival_ms\":0,\"input_tokens\":2.5,\"output_tokens\":1}", "line 1: \"input_tokens\" must be"},
        {"{\"arrival_ms\":0,\"input_tokens\":2,\"output_tokens\":1,\"prefill_layers\":0}",
         "line 1: \"prefill_layers\" must be"},
        {"{\"arrival_ms\":9,\"input_tokens\":1,\"output_tokens\":1}\n{\"arrival_ms\":3,\"input_tokens\":1,"
         "\"output_tokens\":1}",
         "line 2: arrival 3.000 ms is before"},
        {"# only a comment\n\n", "no requests"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        CHECK_MSG(speed_lg_trace_parse(bad[i].text, strlen(bad[i].text), &t, err, sizeof err) ==
                      SPEED_ERR_INVALID_ARGUMENT,
                  "case %zu accepted", i);
        CHECK_CONTAINS(err, bad[i].want);
        CHECK(t.n == 0 && t.entries == NULL);
    }
}

/* ---- prompts ----------------------------------------------------------------------------------- */

static void test_prompts(void) {
    const char *dir = tu_path("tok");
    tu_system("mkdir -p %s", dir);
    CHECK_INT_EQ(speed_tok_write_default(dir, 512), SPEED_OK);
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (!tok) return;
    speed_tok_ids_t ids = {0};
    for (int chat = 0; chat < 2; chat++) {
        speed_lg_prompter_t pr = {tok, chat, 1.0, NULL};
        int64_t first = chat ? 24 : 1; /* the Llama 3 template takes about 20 */
        for (int64_t n = first; n < first + 60; n += (n < first + 30 ? 1 : 7)) {
            char *text = NULL, err[256] = "";
            int64_t exact = -1;
            speed_status_t st = speed_lg_prompt_make(&pr, n, (uint64_t)n * 77, &text, &exact, err, sizeof err);
            CHECK_MSG(st == SPEED_OK, "chat %d n %lld: %s", chat, (long long)n, err);
            if (st != SPEED_OK) continue;
            ids.n = 0;
            if (chat) {
                speed_chat_message_t m = {"user", text};
                CHECK(speed_tok_chat_encode(tok, &m, 1, true, false, &ids) == SPEED_OK);
            } else {
                CHECK(speed_tok_encode(tok, text, strlen(text), true, &ids) == SPEED_OK);
            }
            CHECK_MSG((int64_t)ids.n == n && exact == n, "chat %d: wanted %lld tokens, got %zu (said %lld): '%s'", chat,
                      (long long)n, ids.n, (long long)exact, text);
            speed_free(text);
        }
        /* 400 tokens, and a chat prompt shorter than its template refused with a reason */
        char *text = NULL, err[256] = "";
        int64_t exact = -1;
        CHECK(speed_lg_prompt_make(&pr, 400, 3, &text, &exact, err, sizeof err) == SPEED_OK && exact == 400);
        speed_free(text);
        if (chat) {
            text = NULL;
            CHECK(speed_lg_prompt_make(&pr, 2, 3, &text, &exact, err, sizeof err) == SPEED_ERR_INVALID_ARGUMENT);
            CHECK_CONTAINS(err, "exactly 2 tokens");
            CHECK(text == NULL);
        }
    }
    /* a shared prefix: every prompt starts with it and is still exactly n tokens */
    speed_lg_prompter_t pp = {tok, false, 1.0, NULL};
    char *prefix = NULL, err[256] = "";
    int64_t exact = -1;
    CHECK(speed_lg_prompt_make(&pp, 30, 99, &prefix, &exact, err, sizeof err) == SPEED_OK && exact == 30);
    for (int chat = 0; chat < 2 && prefix; chat++) {
        speed_lg_prompter_t pr = {tok, chat, 1.0, prefix};
        for (int64_t n = 60; n < 70; n++) {
            char *text = NULL;
            CHECK_MSG(speed_lg_prompt_make(&pr, n, (uint64_t)n, &text, &exact, err, sizeof err) == SPEED_OK, "%s", err);
            if (!text) continue;
            CHECK(strncmp(text, prefix, strlen(prefix)) == 0 && text[strlen(prefix)] == ' ');
            ids.n = 0;
            speed_chat_message_t m = {"user", text};
            CHECK(chat ? speed_tok_chat_encode(tok, &m, 1, true, false, &ids) == SPEED_OK
                       : speed_tok_encode(tok, text, strlen(text), true, &ids) == SPEED_OK);
            CHECK_MSG((int64_t)ids.n == n && exact == n, "prefixed, chat %d: %zu tokens, wanted %lld", chat, ids.n,
                      (long long)n);
            speed_free(text);
        }
        /* shorter than the prefix: refused */
        char *text = NULL;
        CHECK(speed_lg_prompt_make(&pr, 20, 1, &text, &exact, err, sizeof err) == SPEED_ERR_INVALID_ARGUMENT);
    }
    speed_free(prefix);
    speed_tok_ids_free(&ids);
    speed_tok_destroy(tok);
    /* without a tokenizer: words_per_token words; seeds make prompts differ from the first word,
     * the same seed gives the same text */
    speed_lg_prompter_t pr = {NULL, false, 0.5, NULL};
    char *a = NULL, *b = NULL, *c = NULL;
    int64_t ex;
    CHECK(speed_lg_prompt_make(&pr, 40, 1, &a, &ex, err, sizeof err) == SPEED_OK && ex == -1);
    CHECK(speed_lg_prompt_make(&pr, 40, 1, &b, &ex, err, sizeof err) == SPEED_OK);
    CHECK(speed_lg_prompt_make(&pr, 40, 2, &c, &ex, err, sizeof err) == SPEED_OK);
    int words = 1;
    for (const char *s = a; *s; s++) words += *s == ' ';
    CHECK_INT_EQ(words, 20);
    CHECK_STR_EQ(a, b);
    CHECK(strcmp(a, c) != 0);
    /* distinct first words for most seeds: no shared prefix longer than a word or two */
    int shared2 = 0;
    for (uint64_t s = 0; s < 200; s++) {
        char *x = NULL, *y = NULL;
        speed_lg_prompt_make(&pr, 10, s, &x, &ex, err, sizeof err);
        speed_lg_prompt_make(&pr, 10, s + 1000, &y, &ex, err, sizeof err);
        const char *sx = strchr(strchr(x, ' ') + 1, ' '), *sy = strchr(strchr(y, ' ') + 1, ' ');
        if (sx - x == sy - y && memcmp(x, y, (size_t)(sx - x)) == 0) shared2++;
        speed_free(x);
        speed_free(y);
    }
    CHECK_MSG(shared2 <= 2, "%d of 200 prompt pairs share their first two words", shared2);
    speed_free(a);
    speed_free(b);
    speed_free(c);
    /* approximate with a prefix: its words count toward the total */
    speed_lg_prompter_t px = {NULL, false, 1.0, "alpha beta gamma"};
    CHECK(speed_lg_prompt_make(&px, 10, 1, &a, &ex, err, sizeof err) == SPEED_OK);
    CHECK(speed_lg_prompt_make(&px, 10, 2, &b, &ex, err, sizeof err) == SPEED_OK);
    words = 1;
    for (const char *s = a; *s; s++) words += *s == ' ';
    CHECK_INT_EQ(words, 10);
    CHECK(strncmp(a, "alpha beta gamma ", 17) == 0 && strncmp(b, "alpha beta gamma ", 17) == 0 && strcmp(a, b) != 0);
    speed_free(a);
    speed_free(b);
}

/* ---- URL and body ------------------------------------------------------------------------------ */

static void test_url_body(void) {
    speed_lg_target_t t = {0};
    char err[256];
    CHECK(speed_lg_url_parse("http://127.0.0.1:8080", &t, err, sizeof err) == SPEED_OK);
    CHECK(!t.tls && t.port == 8080 && strcmp(t.host, "127.0.0.1") == 0);
    CHECK(speed_lg_url_parse("https://[::1]:8443/", &t, err, sizeof err) == SPEED_OK);
    CHECK(t.tls && t.port == 8443 && strcmp(t.host, "::1") == 0);
    CHECK(speed_lg_url_parse("https://example.org", &t, err, sizeof err) == SPEED_OK && t.port == 443);
    CHECK(speed_lg_url_parse("http://h", &t, err, sizeof err) == SPEED_OK && t.port == 80);
    static const char *const bad[] = {"ftp://x",        "127.0.0.1:80",   "http://",     "http://h:0",
                                      "http://h:70000", "http://h:80/v1", "http://[::1", "http://h:x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK_MSG(speed_lg_url_parse(bad[i], &t, err, sizeof err) == SPEED_ERR_INVALID_ARGUMENT, "%s", bad[i]);

    speed_lg_target_t c = {.chat = true, .model = "m", .stream = true, .ignore_eos = true};
    char *body = NULL;
    CHECK(speed_lg_body_make(&c, "hi there", NULL, 17, 3, &body) == SPEED_OK);
    json_t *j = json_loads(body, 0, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(j, "model")), "m");
    CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(json_object_get(j, "messages"), 0), "content")),
                 "hi there");
    CHECK_INT_EQ(json_integer_value(json_object_get(j, "max_tokens")), 17);
    CHECK(json_is_true(json_object_get(j, "ignore_eos")) && json_is_true(json_object_get(j, "stream")));
    CHECK(json_is_true(json_object_get(json_object_get(j, "stream_options"), "include_usage")));
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(j, "speed"), "prefill_layers")), 3);
    json_decref(j);
    free(body);
    /* a plain request for other servers: no speed object, no ignore_eos, no stream fields */
    speed_lg_target_t p = {.chat = false, .model = "m"};
    CHECK(speed_lg_body_make(&p, "x", NULL, 1, 0, &body) == SPEED_OK);
    j = json_loads(body, 0, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(j, "prompt")), "x");
    CHECK(!json_object_get(j, "speed") && !json_object_get(j, "ignore_eos") && !json_object_get(j, "stream") &&
          !json_object_get(j, "stream_options") && !json_object_get(j, "messages"));
    json_decref(j);
    free(body);
}

/* ---- SSE against a scripted server ------------------------------------------------------------- */

typedef struct {
    int fd;
    const char *const *parts; /* written one by one, gap_ms apart */
    int gap_ms;
} script_t;

static void *script_main(void *arg) {
    script_t *s = arg;
    for (size_t i = 0; s->parts[i]; i++) {
        if (i > 0 && s->gap_ms) speed_clock_sleep_ms(s->gap_ms);
        size_t n = strlen(s->parts[i]);
        if (write(s->fd, s->parts[i], n) != (ssize_t)n) break;
    }
    shutdown(s->fd, SHUT_WR);
    /* read (and drop) the request until the client closes */
    char buf[4096];
    while (read(s->fd, buf, sizeof buf) > 0) {}
    close(s->fd);
    return NULL;
}

#define SSE_HEAD "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"

static speed_lg_result_t scripted(const char *const *parts, int gap_ms, bool chat, bool stream) {
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    script_t s = {sv[1], parts, gap_ms};
    pthread_t th;
    pthread_create(&th, NULL, script_main, &s);
    speed_http_client_t *client = NULL;
    CHECK(speed_http_client_adopt(sv[0], "test", 5000, &client) == SPEED_OK);
    speed_lg_target_t t = {.chat = chat, .model = "m", .stream = stream, .timeout_ms = 5000};
    speed_lg_result_t r = {0};
    r.t_first = -1;
    r.prompt_tokens = r.output_tokens = r.kv_bytes = -1;
    double t0 = speed_clock_mono_s();
    speed_lg_request_on(client, &t, "{}", 2, t0, NULL, true, &r);
    speed_http_client_destroy(client);
    pthread_join(th, NULL);
    return r;
}

static void test_sse(void) {
    /* llama-server style: a role chunk without text, a ping comment, 4 content chunks 30 ms apart,
     * a finish chunk, [DONE]; no usage: tokens are the content chunks */
    const char *const llama[] = {
        SSE_HEAD "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        ": ping\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wor\"},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ld\"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n",
        NULL};
    speed_lg_result_t r = scripted(llama, 30, true, true);
    CHECK_MSG(r.outcome == SPEED_LG_OK, "%s %s", r.error, r.detail);
    CHECK_INT_EQ(r.n_chunks, 4);
    CHECK_INT_EQ(r.output_tokens, 4);
    CHECK_INT_EQ(r.prompt_tokens, -1);
    CHECK_INT_EQ(r.n_itl, 3);
    CHECK_STR_EQ(r.text, "Hello world");
    /* the first content came with the second write (30 ms in), then 30 ms gaps */
    CHECK(r.t_first - r.t_send >= 0.025 && r.t_end >= r.t_first);
    for (size_t i = 0; i < r.n_itl; i++) CHECK_MSG(r.itl_ms[i] >= 25 && r.itl_ms[i] < 500, "itl %f", r.itl_ms[i]);
    speed_lg_result_cleanup(&r);

    /* completions chunks with usage in a last chunk without choices (speedserve, vLLM); usage wins */
    const char *const usage[] = {
        SSE_HEAD "data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":null}]}\n\n"
                 "data: {\"choices\":[{\"index\":0,\"text\":\"bc\",\"finish_reason\":\"length\"}]}\n\n"
                 "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"kv_bytes\":4096}}\n\n"
                 "data: [DONE]\n\n",
        NULL};
    r = scripted(usage, 0, false, true);
    CHECK_MSG(r.outcome == SPEED_LG_OK, "%s %s", r.error, r.detail);
    CHECK(r.n_chunks == 2 && r.output_tokens == 3 && r.prompt_tokens == 9 && r.kv_bytes == 4096);
    speed_lg_result_cleanup(&r);

    /* tokens before any text (a partial UTF-8 character held back): chunks with empty text are
     * token arrivals, the role announcement and the finish notice are not. TTFT is the first
     * empty chunk's (the second write, 30 ms in), not the first text's (60 ms in). */
    const char *const textless[] = {
        SSE_HEAD "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\u00e9\"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"stop\"}]}\n\n"
        "data: [DONE]\n\n",
        NULL};
    r = scripted(textless, 30, true, true);
    CHECK_MSG(r.outcome == SPEED_LG_OK, "%s %s", r.error, r.detail);
    CHECK_INT_EQ(r.n_chunks, 2);
    CHECK_INT_EQ(r.output_tokens, 2);
    CHECK_INT_EQ(r.n_itl, 1);
    CHECK_STR_EQ(r.text, "\xc3\xa9");
    CHECK_MSG(r.t_first - r.t_send >= 0.025 && r.t_first - r.t_send < 0.055, "ttft %.1f ms",
              (r.t_first - r.t_send) * 1e3);
    speed_lg_result_cleanup(&r);

    /* no [DONE], but a finish_reason: complete (older llama-server closes the stream) */
    const char *const nodone[] = {SSE_HEAD "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"stop\"}]}\n\n",
                                  NULL};
    r = scripted(nodone, 0, false, true);
    CHECK(r.outcome == SPEED_LG_OK && r.output_tokens == 1);
    speed_lg_result_cleanup(&r);

    /* cut short: neither */
    const char *const cut[] = {SSE_HEAD "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":null}]}\n\n", NULL};
    r = scripted(cut, 0, false, true);
    CHECK(r.outcome == SPEED_LG_ERROR);
    CHECK_STR_EQ(r.error, "truncated");
    speed_lg_result_cleanup(&r);

    /* an error event, and an error chunk */
    const char *const everr[] = {
        SSE_HEAD
        "data: {\"choices\":[{\"text\":\"a\"}]}\n\nevent: error\ndata: {\"error\":{\"message\":\"node lost\"}}\n\n",
        NULL};
    r = scripted(everr, 0, false, true);
    CHECK(r.outcome == SPEED_LG_ERROR);
    CHECK_STR_EQ(r.error, "stream_error");
    CHECK_STR_EQ(r.detail, "node lost");
    speed_lg_result_cleanup(&r);
    const char *const chunkerr[] = {SSE_HEAD "data: {\"error\":{\"message\":\"oops\",\"code\":500}}\n\n", NULL};
    r = scripted(chunkerr, 0, false, true);
    CHECK(r.outcome == SPEED_LG_ERROR && strcmp(r.error, "stream_error") == 0 && strcmp(r.detail, "oops") == 0);
    speed_lg_result_cleanup(&r);
    const char *const notjson[] = {SSE_HEAD "data: {nope\n\n", NULL};
    r = scripted(notjson, 0, false, true);
    CHECK(r.outcome == SPEED_LG_ERROR && strcmp(r.error, "protocol") == 0);
    speed_lg_result_cleanup(&r);

    /* an HTTP error answer to a stream request */
    const char *const e503[] = {"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                "Content-Length: 47\r\nConnection: close\r\n\r\n"
                                "{\"error\":{\"message\":\"overloaded\",\"code\":503}}",
                                NULL};
    r = scripted(e503, 0, false, true);
    CHECK(r.outcome == SPEED_LG_ERROR && r.http_status == 503);
    CHECK_STR_EQ(r.error, "http_503");
    CHECK_STR_EQ(r.detail, "overloaded");
    speed_lg_result_cleanup(&r);

    /* a non-streaming answer: e2e and usage only */
    const char *body = "{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":\"xyz\"}}],"
                       "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6}}";
    char whole[512];
    snprintf(whole, sizeof whole,
             "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
             strlen(body), body);
    const char *const plain[] = {whole, NULL};
    r = scripted(plain, 0, true, false);
    CHECK(r.outcome == SPEED_LG_OK && r.output_tokens == 6 && r.prompt_tokens == 5 && r.t_first < 0);
    CHECK_STR_EQ(r.text, "xyz");
    speed_lg_result_cleanup(&r);
    /* the server closing without an answer */
    const char *const nothing[] = {"", NULL};
    r = scripted(nothing, 0, false, true);
    CHECK(r.outcome == SPEED_LG_ERROR && r.http_status == 0);
    CHECK_STR_EQ(r.error, "disconnected");
    speed_lg_result_cleanup(&r);
}

int main(void) {
    tu_tmp_init("loadgen-unit");
    test_distributions();
    test_workload();
    test_percentile();
    test_goodput();
    test_trace();
    test_prompts();
    test_url_body();
    test_sse();
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
