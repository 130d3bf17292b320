/* speedctl loadgen against a real 1P1D cluster (speed-decode, speed-prefill, speed-router on
 * loopback), run as a user runs it, its JSON report and per-request records checked:
 *   - open loop (Poisson, streaming, exact prompts through --tokenizer): every request completed,
 *     percentiles ordered and positive, prompt and output tokens what was asked and what the
 *     server's usage says, goodput <= throughput, a generous SLO's goodput = throughput;
 *   - closed loop without streaming (chat): e2e only; an impossible SLO gives goodput 0;
 *   - --prefill-layers reaches the server (fewer KV bytes shipped than at full depth);
 *   - a trace replay sends on its schedule; --duration ends a run by itself; multi-turn;
 *   - a server that never answers is cut off after the drain (no hang), an unreachable URL and a
 *     server answering errors are errors with exit 1; bad options exit 2 with a clear message;
 *   - the API key never shows in output, reports or records; progress only when asked;
 *   - HTTPS with --ca (another CA refused);
 *   - a llama-server-style endpoint (a scripted server here: no usage in its streams): plain
 *     requests (no speed object), the model from /v1/models, tokens counted from chunks.
 * Every speedctl run is bounded by `timeout`, so nothing here can hang the suite. */
#include <math.h>
#include <stdatomic.h>

#include "cluster_util.h"
#include "log.h"
#include "test_fs.h"
#include "tls_test_util.h"

static char g_url[128], g_model[128];
static int g_router_port;
static int g_dec_http; /* the decode node's /metrics */

typedef struct {
    int rc;
    double seconds;
    json_t *rep;     /* the --json report, or NULL */
    json_t *records; /* array of the --records lines */
    char *out, *err; /* stdout and stderr (malloc'd) */
} lg_run_t;

static void lg_free(lg_run_t *r) {
    json_decref(r->rep);
    json_decref(r->records);
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof *r);
}

/* `speedctl loadgen ARGS --json F --records R` with env (may be ""), bounded by 120 s. */
static lg_run_t lg(const char *name, const char *env, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static lg_run_t lg(const char *name, const char *env, const char *fmt, ...) {
    char args[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    lg_run_t r = {0};
    char json[700], rec[700], out[700], err[700];
    snprintf(json, sizeof json, "%s/%s.json", cu_dir, name);
    snprintf(rec, sizeof rec, "%s/%s.records", cu_dir, name);
    snprintf(out, sizeof out, "%s/%s.out", cu_dir, name);
    snprintf(err, sizeof err, "%s/%s.err", cu_dir, name);
    unlink(json);
    unlink(rec);
    double t0 = now_s();
    r.rc = tu_system("%s timeout -s KILL 120 %s/speedctl loadgen %s --json %s --records %s > %s 2> %s", env, cu_bin,
                     args, json, rec, out, err);
    r.seconds = now_s() - t0;
    r.out = tu_read(out, NULL);
    r.err = tu_read(err, NULL);
    r.rep = json_load_file(json, 0, NULL);
    r.records = json_array();
    char *lines = tu_read(rec, NULL);
    for (char *s = lines, *nl; s && *s; s = nl + 1) {
        nl = strchr(s, '\n');
        if (!nl) break;
        *nl = '\0';
        json_t *o = json_loads(s, 0, NULL);
        CHECK_MSG(o != NULL, "%s: a records line is not JSON: %s", name, s);
        if (o) json_array_append_new(r.records, o);
    }
    free(lines);
    if (r.rc != 0 && r.rc != 1 && r.rc != 2) fprintf(stderr, "%s: exit %d\n%s\n", name, r.rc, r.err ? r.err : "");
    return r;
}

static double num(const json_t *o, const char *path) {
    char key[64];
    const json_t *v = o;
    for (const char *p = path; v && *p;) {
        size_t n = strcspn(p, ".");
        snprintf(key, sizeof key, "%.*s", (int)n, p);
        v = json_object_get(v, key);
        p += n + (p[n] == '.');
    }
    return v ? json_number_value(v) : NAN;
}

static void check_stats(const char *name, const json_t *rep, const char *which, bool want) {
    const json_t *s = json_object_get(json_object_get(rep, "latency_ms"), which);
    if (!want) {
        CHECK_MSG(s == NULL, "%s: latency_ms.%s should be absent", name, which);
        return;
    }
    double p50 = num(s, "p50"), p90 = num(s, "p90"), p99 = num(s, "p99"), mean = num(s, "mean");
    CHECK_MSG(num(s, "n") > 0 && p50 > 0 && p50 <= p90 && p90 <= p99 && mean > 0 && p99 <= num(s, "max") &&
                  num(s, "min") <= p50,
              "%s: %s n %g p50 %g p90 %g p99 %g mean %g", name, which, num(s, "n"), p50, p90, p99, mean);
}

/* The counts every successful run shows: all requested completed, none failed, cut off, dropped. */
static void check_all_ok(const char *name, const lg_run_t *r, int want) {
    CHECK_MSG(r->rc == 0, "%s: exit %d: %s", name, r->rc, r->err ? r->err : "");
    CHECK_MSG(r->rep != NULL, "%s: no JSON report", name);
    if (!r->rep) return;
    const json_t *q = json_object_get(r->rep, "requests");
    CHECK_MSG(num(q, "requested") == want && num(q, "completed") == want && num(q, "sent") == want &&
                  num(q, "failed") == 0 && num(q, "cut_off") == 0 && num(q, "dropped") == 0,
              "%s: requested %g sent %g completed %g failed %g cut %g dropped %g (want %d)", name, num(q, "requested"),
              num(q, "sent"), num(q, "completed"), num(q, "failed"), num(q, "cut_off"), num(q, "dropped"), want);
    CHECK_INT_EQ(json_array_size(r->records), want);
    double thr = num(r->rep, "throughput.requests_per_s"), good = num(r->rep, "goodput.requests_per_s");
    CHECK_MSG(thr > 0 && good <= thr + 1e-9, "%s: goodput %g, throughput %g", name, good, thr);
    CHECK(num(r->rep, "throughput.output_tokens_per_s") > 0 && num(r->rep, "duration_s") > 0);
}

static void test_open_loop(void) {
    /* no --model: asked of /v1/models */
    lg_run_t r = lg("open", "",
                    "--url %s --rate 25 --arrival poisson --requests 16 --tokenizer %s/model "
                    "--prompt-tokens uniform:8,40 --output-tokens uniform:2,12 --seed 3 --slo-ttft-ms 1e7 "
                    "--slo-tpot-ms 1e7 --slo-e2e-ms 1e7",
                    g_url, cu_dir);
    check_all_ok("open", &r, 16);
    if (r.rep) {
        snprintf(g_model, sizeof g_model, "%s",
                 json_string_value(json_object_get(json_object_get(r.rep, "config"), "model")));
        CHECK(g_model[0]);
        check_stats("open", r.rep, "ttft", true);
        check_stats("open", r.rep, "tpot", true);
        check_stats("open", r.rep, "itl", true);
        check_stats("open", r.rep, "e2e", true);
        /* a generous SLO: every request meets it */
        CHECK_NEAR(num(r.rep, "goodput.requests_per_s"), num(r.rep, "throughput.requests_per_s"), 1e-9);
        CHECK_NEAR(num(r.rep, "goodput.fraction"), 1, 1e-12);
        CHECK(num(r.rep, "latency_ms.ttft.p50") <= num(r.rep, "latency_ms.e2e.p50"));
    }
    /* each request: the exact prompt and output lengths asked, as the server's usage counts them;
     * a stream chunk carries one token or more (speedserve sends tokens whose text is not complete
     * UTF-8 yet with the next ones) */
    double out_sum = 0, in_sum = 0;
    for (size_t i = 0; i < json_array_size(r.records); i++) {
        const json_t *x = json_array_get(r.records, i);
        CHECK_MSG(num(x, "prompt_tokens") == num(x, "prompt_tokens_requested") &&
                      num(x, "output_tokens") == num(x, "output_tokens_requested") && num(x, "chunks") >= 1 &&
                      num(x, "chunks") <= num(x, "output_tokens"),
                  "request %g: prompt %g of %g, output %g of %g, chunks %g", num(x, "index"), num(x, "prompt_tokens"),
                  num(x, "prompt_tokens_requested"), num(x, "output_tokens"), num(x, "output_tokens_requested"),
                  num(x, "chunks"));
        CHECK(num(x, "sent_ms") >= num(x, "scheduled_ms") && num(x, "ttft_ms") > 0 &&
              num(x, "e2e_ms") >= num(x, "ttft_ms"));
        out_sum += num(x, "output_tokens");
        in_sum += num(x, "prompt_tokens");
    }
    CHECK_NEAR(num(r.rep, "tokens.output"), out_sum, 0);
    CHECK_NEAR(num(r.rep, "tokens.input"), in_sum, 0);
    CHECK_NEAR(num(r.rep, "tokens.output"), num(r.rep, "tokens.output_requested"), 0);
    /* the human table on stdout; no progress line on a stderr that is not a terminal */
    CHECK_CONTAINS(r.out, "latency (ms)");
    CHECK_CONTAINS(r.out, "goodput");
    CHECK(r.err && !strstr(r.err, "in flight"));
    lg_free(&r);
}

static void test_closed_loop(void) {
    lg_run_t r = lg("closed", "",
                    "--url %s --model %s --endpoint chat --concurrency 3 --requests 9 --no-stream "
                    "--prompt-tokens fixed:30 --output-tokens fixed:5 --tokenizer %s/model --progress",
                    g_url, g_model, cu_dir);
    check_all_ok("closed", &r, 9);
    check_stats("closed", r.rep, "e2e", true);
    check_stats("closed", r.rep, "ttft", false);
    for (size_t i = 0; i < json_array_size(r.records); i++) {
        const json_t *x = json_array_get(r.records, i);
        CHECK(num(x, "output_tokens") == 5 && num(x, "prompt_tokens") == 30 && !json_object_get(x, "ttft_ms"));
    }
    /* --progress asked: the line is there (not a terminal: one line per update) */
    CHECK_CONTAINS(r.err, "in flight");
    lg_free(&r);

    /* an impossible SLO: nothing meets it; --warmup: 3 more requests reach the server first, the
     * report shows the 4 */
    double before = cu_metric_sum(g_router_port, "speed_router_requests_total");
    r = lg("slo0", "",
           "--url %s --model %s --concurrency 2 --requests 4 --output-tokens fixed:3 --slo-ttft-ms 0.001 --warmup 3",
           g_url, g_model);
    check_all_ok("slo0", &r, 4);
    CHECK_NEAR(cu_metric_sum(g_router_port, "speed_router_requests_total") - before, 7, 0);
    CHECK(num(r.rep, "goodput.requests_per_s") == 0 && num(r.rep, "goodput.met") == 0);
    CHECK(num(r.rep, "throughput.requests_per_s") > 0);
    lg_free(&r);
}

/* Decode steps that held more than one sequence (the batch-size histogram's count above le=1). */
static double multi_sequence_steps(void) {
    return cu_metric0(g_dec_http, "speed_engine_step_sequences_count{role=\"decode\"}") -
           cu_metric0(g_dec_http, "speed_engine_step_sequences_bucket{role=\"decode\",le=\"1\"}");
}

/* --warmup sends one request alone, then the rest at once: the decode node runs batches of more
 * than one sequence before the (one-at-a-time) run starts, so the run's first requests to arrive
 * together find those paths warm. */
static void test_warmup(void) {
    double before = multi_sequence_steps();
    lg_run_t r =
        lg("warmup", "", "--url %s --model %s --concurrency 1 --requests 1 --output-tokens fixed:256 --warmup 6", g_url,
           g_model);
    check_all_ok("warmup", &r, 1);
    lg_free(&r);
    double steps = multi_sequence_steps() - before;
    CHECK_MSG(steps >= 1, "no decode step held more than one sequence: the warm-up was not concurrent (%g)", steps);
}

static void test_prefill_layers(void) {
    double kv[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        lg_run_t r = lg(k ? "c1" : "cfull", "",
                        "--url %s --model %s --concurrency 1 --requests 2 --prompt-tokens fixed:40 "
                        "--output-tokens fixed:2 --tokenizer %s/model %s",
                        g_url, g_model, cu_dir, k ? "--prefill-layers 1 --shared-prefix-tokens 16" : "");
        check_all_ok(k ? "c1" : "cfull", &r, 2);
        const json_t *x = json_array_get(r.records, 0);
        kv[k] = num(x, "kv_bytes");
        CHECK(num(x, "prompt_tokens") == 40 && num(json_array_get(r.records, 1), "prompt_tokens") == 40);
        CHECK(k == 0 || num(x, "prefill_layers") == 1);
        CHECK(k == 1 || !json_object_get(x, "prefill_layers"));
        CHECK(k == 0 || num(r.rep, "config.prefill_layers") == 1);
        lg_free(&r);
    }
    /* C = 1 of L layers ships less KV than the full depth */
    CHECK_MSG(kv[0] > 0 && kv[1] > 0 && kv[1] < kv[0], "kv bytes: full %g, C=1 %g", kv[0], kv[1]);
}

static void test_trace(void) {
    static const double at[] = {5000, 5000, 5250, 5600, 6100};
    char text[1024] = "# arrival offsets 0, 0, 250, 600, 1100 ms\n";
    for (int i = 0; i < 5; i++) {
        char line[160];
        snprintf(line, sizeof line, "{\"%s\": %g, \"input_tokens\": %d, \"output_tokens\": %d%s}\n",
                 i == 2 ? "timestamp" : "arrival_ms", at[i], 10 + i, 2 + i, i == 3 ? ", \"prefill_layers\": 1" : "");
        strcat(text, line);
    }
    char path[700];
    snprintf(path, sizeof path, "%s/trace.jsonl", cu_dir);
    tu_write_text(path, text);
    lg_run_t r = lg("trace", "", "--url %s --model %s --trace %s --tokenizer %s/model", g_url, g_model, path, cu_dir);
    check_all_ok("trace", &r, 5);
    double first = -1;
    for (size_t i = 0; i < json_array_size(r.records); i++) {
        const json_t *x = json_array_get(r.records, i);
        if (first < 0 || num(x, "sent_ms") < first) first = num(x, "sent_ms");
    }
    for (size_t i = 0; i < json_array_size(r.records); i++) {
        const json_t *x = json_array_get(r.records, i);
        int k = (int)num(x, "index");
        if (k < 0 || k > 4) {
            CHECK(false);
            continue;
        }
        double want = at[k] - at[0];
        /* scheduled on the trace's offsets; sent at them (not before, and not much after) */
        CHECK_NEAR(num(x, "scheduled_ms"), want, 1e-6);
        CHECK_MSG(num(x, "sent_ms") >= want && num(x, "sent_ms") - want < 150, "request %d: sent at %g ms, due %g", k,
                  num(x, "sent_ms"), want);
        CHECK(num(x, "prompt_tokens") == 10 + k && num(x, "output_tokens") == 2 + k);
        CHECK((k == 3) == (json_object_get(x, "prefill_layers") != NULL));
    }
    CHECK(num(r.rep, "send_lateness_ms.max") < 150);
    lg_free(&r);

    /* a bad line: exit 2 naming the line */
    snprintf(path, sizeof path, "%s/bad-trace.jsonl", cu_dir);
    tu_write_text(path, "{\"arrival_ms\": 0, \"input_tokens\": 3, \"output_tokens\": 2}\n"
                        "{\"arrival_ms\": 10, \"input_tokens\": \"many\", \"output_tokens\": 2}\n");
    r = lg("bad-trace", "", "--url %s --model %s --trace %s", g_url, g_model, path);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "line 2: \"input_tokens\" must be a whole number");
    lg_free(&r);
}

static void test_duration(void) {
    /* no request count: the run ends by itself when the 2.5 s are over; --progress without a
     * terminal: a line every 2 s and a last one */
    lg_run_t r = lg("duration", "",
                    "--url %s --model %s --rate 8 --arrival constant --duration 2.5 --output-tokens fixed:2 --progress",
                    g_url, g_model);
    CHECK_MSG(r.rc == 0, "exit %d: %s", r.rc, r.err);
    int n = (int)num(r.rep, "requests.requested");
    CHECK_MSG(n == 20, "%d requests in 2.5 s at 8/s (constant: at 0, 0.125, ..., 2.375 s)", n);
    int lines = 0;
    for (const char *s = r.err; s && (s = strstr(s, " in flight")); s++) lines++;
    CHECK_MSG(lines >= 2, "%d progress lines:\n%s", lines, r.err);
    check_all_ok("duration", &r, n);
    CHECK_MSG(r.seconds < 15, "took %.1f s", r.seconds);
    lg_free(&r);
}

/* Ctrl-C: sending ends, the requests in flight finish, the report is written, exit 0. */
static void test_sigint(int router_port) {
    char json[700], err[700];
    snprintf(json, sizeof json, "%s/sigint.json", cu_dir);
    snprintf(err, sizeof err, "%s/sigint.err", cu_dir);
    const char *argv[] = {NULL,         "loadgen", "--url",           g_url,     "--model", g_model, "--rate", "20",
                          "--duration", "120",     "--output-tokens", "fixed:4", "--json",  json,    NULL};
    char bin[700];
    snprintf(bin, sizeof bin, "%s/speedctl", cu_bin);
    argv[0] = bin;
    double before = cu_metric_sum(router_port, "speed_router_requests_total");
    tu_spawn_params_t sp = {.err_path = err, .die_with_parent = true};
    pid_t pid = tu_spawn(argv, &sp);
    CHECK(pid > 0);
    if (pid <= 0) return;
    /* wait until it has sent a few */
    double t0 = now_s();
    while (cu_metric_sum(router_port, "speed_router_requests_total") < before + 5 && now_s() - t0 < 30) usleep(20000);
    double t_int = now_s();
    kill(pid, SIGINT);
    int st = 0;
    bool exited = tu_wait_pid(pid, 20, &st);
    CHECK_MSG(exited, "loadgen did not stop on SIGINT");
    if (!exited) {
        kill(pid, SIGKILL);
        tu_wait_pid(pid, 5, &st);
        return;
    }
    CHECK_INT_EQ(tu_exit_code(st), 0);
    CHECK(now_s() - t_int < 10);
    json_t *rep = json_load_file(json, 0, NULL);
    CHECK_MSG(num(rep, "requests.completed") >= 5 && num(rep, "requests.completed") == num(rep, "requests.requested") &&
                  num(rep, "requests.completed") < 20 * 60,
              "completed %g of %g", num(rep, "requests.completed"), num(rep, "requests.requested"));
    json_decref(rep);
}

static void test_multi_turn(void) {
    lg_run_t r = lg("turns", "",
                    "--url %s --model %s --endpoint chat --conversations 3 --turns 3 --system-tokens 40 "
                    "--prompt-tokens fixed:10 --output-tokens fixed:4 --think-ms fixed:20",
                    g_url, g_model);
    check_all_ok("turns", &r, 9);
    const json_t *bt = json_object_get(r.rep, "latency_by_turn");
    CHECK_INT_EQ(json_array_size(bt), 3);
    for (size_t t = 0; t < json_array_size(bt); t++) CHECK(num(json_array_get(bt, t), "ttft.n") == 3);
    /* each turn resends the conversation: its prompt grows turn by turn */
    double last[3] = {0, 0, 0};
    int grew = 0;
    for (int turn = 0; turn < 3; turn++)
        for (size_t i = 0; i < json_array_size(r.records); i++) {
            const json_t *x = json_array_get(r.records, i);
            int c = (int)num(x, "conversation");
            if ((int)num(x, "turn") != turn || c < 0 || c > 2) continue;
            if (turn > 0) grew += num(x, "prompt_tokens") > last[c] + 4;
            last[c] = num(x, "prompt_tokens");
        }
    CHECK_INT_EQ(grew, 6);
    CHECK_CONTAINS(r.out, "ttft turn 3");
    lg_free(&r);
}

/* A server that accepts connections and never answers: the kernel completes the handshakes
 * (backlog) and takes the requests, nothing replies. */
static int silent_listener(int *port_p) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = 0};
    CHECK(bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && listen(fd, 16) == 0);
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port_p = ntohs(a.sin_port);
    return fd;
}

static void test_failures(void) {
    /* nothing listens: connect errors, exit 1, quickly */
    int port;
    int fd = silent_listener(&port);
    close(fd);
    lg_run_t r = lg("unreachable", "", "--url http://127.0.0.1:%d --model m --rate 50 --requests 5", port);
    CHECK_INT_EQ(r.rc, 1);
    CHECK(num(r.rep, "requests.failed") == 5 && num(r.rep, "requests.errors.connect") == 5 &&
          num(r.rep, "requests.completed") == 0);
    CHECK_CONTAINS(r.err, "5 of 5 requests failed");
    CHECK(r.seconds < 20);
    lg_free(&r);
    /* no model given and nothing to ask: exit 1 with the way out */
    r = lg("unreachable-model", "", "--url http://127.0.0.1:%d --rate 5 --requests 1", port);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "give --model NAME");
    lg_free(&r);

    /* a server that never answers: the requests in flight when the run ends are cut off after
     * the drain timeout (their sockets shut down), long before the 120 s request timeout */
    fd = silent_listener(&port);
    r = lg("silent", "", "--url http://127.0.0.1:%d --model m --concurrency 2 --duration 0.3 --drain-timeout 0.5",
           port);
    CHECK_INT_EQ(r.rc, 1); /* nothing completed */
    CHECK_MSG(num(r.rep, "requests.cut_off") == 2 && num(r.rep, "requests.failed") == 0, "cut off %g, failed %g",
              num(r.rep, "requests.cut_off"), num(r.rep, "requests.failed"));
    CHECK_MSG(r.seconds < 10, "took %.1f s", r.seconds);
    for (size_t i = 0; i < json_array_size(r.records); i++)
        CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(r.records, i), "outcome")), "cut_off");
    lg_free(&r);
    /* open loop against it: --max-in-flight bounds the requests, later arrivals are dropped */
    r = lg("dropped", "",
           "--url http://127.0.0.1:%d --model m --rate 200 --arrival constant --requests 20 --max-in-flight 3 "
           "--drain-timeout 0.2",
           port);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_MSG(num(r.rep, "requests.dropped") == 17 && num(r.rep, "requests.cut_off") == 3 &&
                  num(r.rep, "requests.requested") == 20,
              "dropped %g cut %g requested %g", num(r.rep, "requests.dropped"), num(r.rep, "requests.cut_off"),
              num(r.rep, "requests.requested"));
    lg_free(&r);
    close(fd);

    /* the server answers errors: a prompt longer than the model's context (a 413 from speedserve) */
    r = lg("errors", "", "--url %s --model %s --concurrency 2 --requests 3 --prompt-tokens fixed:5000", g_url, g_model);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_MSG(num(r.rep, "requests.errors.http_413") == 3, "%s", r.out);
    const json_t *x = json_array_get(r.records, 0);
    CHECK(num(x, "http_status") == 413 && json_string_length(json_object_get(x, "detail")) > 0);
    lg_free(&r);
}

static void test_usage_errors(void) {
    struct {
        const char *args, *want;
    } bad[] = {
        {"--rate 1 --requests 1", "--url is required"},
        {"--url %s --requests 3", "give --rate R (open loop), --concurrency N"},
        {"--url %s --rate 2 --concurrency 2 --requests 3", "give one of --rate, --concurrency"},
        {"--url %s --rate 2", "give --requests N and/or --duration S"},
        {"--url %s --rate 2 --requests 2 --prompt-tokens lognormal:100", "--prompt-tokens: 'lognormal:100': expected"},
        {"--url %s --rate 2 --requests 2 --output-tokens gauss:1,2",
         "--output-tokens: 'gauss:1,2' is not a length spec"},
        {"--url ftp://x --rate 2 --requests 2", "must start with http:// or https://"},
        {"--url %s --ca /nonexistent --rate 2 --requests 2", "--ca is for https:// URLs"},
        {"--url %s --rate -1 --requests 2", "rate"},
        {"--url %s --rate 2 --requests 2 --api-key sekrit-argv", "api_key"},
        {"--url %s --rate 2 --requests 2 --endpoint grpc", "endpoint"},
        {"--url %s --conversations 2 --endpoint completions", "--conversations needs --endpoint chat"},
        {"--url %s --rate 2 --requests 2 --bogus", "bogus"},
        {"--url %s --conversations 2 --endpoint chat --shared-prefix-tokens 3", "not --shared-prefix-tokens"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char args[512];
        snprintf(args, sizeof args, bad[i].args, g_url);
        lg_run_t r = lg("usage", "", "%s", args);
        CHECK_MSG(r.rc == 2, "'%s': exit %d", args, r.rc);
        CHECK_CONTAINS(r.err, bad[i].want);
        CHECK_MSG(!strstr(r.err ? r.err : "", "sekrit-argv"), "'%s' echoed the key", args);
        CHECK(r.rep == NULL); /* nothing was run */
        lg_free(&r);
    }
}

static void test_api_key(void) {
    char keyfile[700];
    snprintf(keyfile, sizeof keyfile, "%s/key", cu_dir);
    tu_write_text(keyfile, "sekrit-from-file\n");
    lg_run_t r = lg("key-env", "SPEED_API_KEY=sekrit-from-env",
                    "--url %s --model %s --concurrency 1 --requests 1 --output-tokens fixed:2", g_url, g_model);
    check_all_ok("key-env", &r, 1);
    char *json = r.rep ? json_dumps(r.rep, 0) : NULL;
    CHECK(json && !strstr(json, "sekrit") && !strstr(r.out, "sekrit") && !strstr(r.err, "sekrit"));
    free(json);
    lg_free(&r);
    r = lg("key-file", "", "--url %s --model %s --concurrency 1 --requests 1 --api-key-file %s --output-tokens fixed:2",
           g_url, g_model, keyfile);
    check_all_ok("key-file", &r, 1);
    lg_free(&r);
    r = lg("key-both", "SPEED_API_KEY=sekrit-from-env",
           "--url %s --model %s --concurrency 1 --requests 1 --api-key-file %s", g_url, g_model, keyfile);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "not both");
    lg_free(&r);
    /* --print-config shows that a key is set, never which */
    char out[700];
    snprintf(out, sizeof out, "%s/print-config.out", cu_dir);
    CHECK_INT_EQ(tu_system("SPEED_API_KEY=sekrit-from-env %s/speedctl loadgen --url %s --print-config > %s 2>&1",
                           cu_bin, g_url, out),
                 0);
    char *text = tu_read(out, NULL);
    CHECK(text && strstr(text, "<redacted>") && !strstr(text, "sekrit"));
    free(text);
}

/* HTTPS: a second router with an API certificate; loadgen with --ca trusts it, with another CA it
 * refuses it (errors of type tls, exit 1). */
static void test_https(cu_cluster_t *c) {
    char cert[700], key[700], ca[700], other_cert[700], other_key[700], other_ca[700], port[16];
    snprintf(cert, sizeof cert, "%s/api.crt", cu_dir);
    snprintf(key, sizeof key, "%s/api.key", cu_dir);
    snprintf(ca, sizeof ca, "%s/api-ca.crt", cu_dir);
    snprintf(other_cert, sizeof other_cert, "%s/other.crt", cu_dir);
    snprintf(other_key, sizeof other_key, "%s/other.key", cu_dir);
    snprintf(other_ca, sizeof other_ca, "%s/other-ca.crt", cu_dir);
    char *pem = NULL, *other_pem = NULL;
    if (!tu_tls_make_cert(cert, key, &pem) || !tu_tls_make_cert(other_cert, other_key, &other_pem)) {
        CHECK(false);
        free(pem);
        return;
    }
    tu_write_text(ca, pem);
    tu_write_text(other_ca, other_pem);
    free(pem);
    free(other_pem);
    int p = cu_router_port(c, 1);
    snprintf(port, sizeof port, "%d", p);
    const char *more[] = {"--router.port", port, "--router.tls_cert", cert, "--router.tls_key", key, NULL};
    cu_proc_t r = cu_cluster_spawn(c, "speed-router", "router1", more);
    /* until the router answers and sees the nodes: one request, retried */
    lg_run_t x = {0};
    double t0 = now_s();
    do {
        lg_free(&x);
        x = lg("https-wait", "",
               "--url https://127.0.0.1:%d --ca %s --model %s --concurrency 1 --requests 1 "
               "--output-tokens fixed:2",
               p, ca, g_model);
    } while (x.rc != 0 && now_s() - t0 < 30 && cu_alive(&r));
    lg_free(&x);
    x = lg("https", "",
           "--url https://127.0.0.1:%d/ --ca %s --model %s --concurrency 2 --requests 4 --output-tokens fixed:3", p, ca,
           g_model);
    check_all_ok("https", &x, 4);
    check_stats("https", x.rep, "ttft", true);
    lg_free(&x);
    x = lg("https-bad-ca", "", "--url https://127.0.0.1:%d --ca %s --model %s --concurrency 1 --requests 2", p,
           other_ca, g_model);
    CHECK_INT_EQ(x.rc, 1);
    CHECK_MSG(num(x.rep, "requests.errors.tls") == 2, "%s", x.out);
    lg_free(&x);
    if (r.pid > 0) CHECK_INT_EQ(cu_stop(&r, SIGTERM, 30), 0);
}

/* ---- a llama-server-style endpoint ------------------------------------------------------------
 * A scripted server in this process (speed_http): /v1/models names one model; a streamed
 * completion sends max_tokens chunks of one token each, a finish chunk and [DONE], never usage
 * (as llama-server does without include_usage support). It records what the requests held. */
typedef struct {
    atomic_int n, n_ignore_eos, n_speed, n_bad_model, tokens;
} llama_seen_t;

static void llama_models(void *user, speed_http_request_t *rq) {
    (void)user;
    const char *body = "{\"object\":\"list\",\"data\":[{\"id\":\"llama-model.gguf\",\"object\":\"model\"}]}";
    speed_http_respond(rq, 200, "application/json", body, strlen(body));
}

static void llama_completions(void *user, speed_http_request_t *rq) {
    llama_seen_t *seen = user;
    size_t len = 0;
    const char *b = speed_http_request_body(rq, &len);
    json_t *j = json_loadb(b, len, 0, NULL);
    atomic_fetch_add(&seen->n, 1);
    if (json_is_true(json_object_get(j, "ignore_eos"))) atomic_fetch_add(&seen->n_ignore_eos, 1);
    if (json_object_get(j, "speed")) atomic_fetch_add(&seen->n_speed, 1);
    if (strcmp(json_string_value(json_object_get(j, "model")) ? json_string_value(json_object_get(j, "model")) : "",
               "llama-model.gguf") != 0)
        atomic_fetch_add(&seen->n_bad_model, 1);
    int n = (int)json_integer_value(json_object_get(j, "max_tokens"));
    json_decref(j);
    speed_http_stream_t *st = NULL;
    if (speed_http_respond_stream(rq, 200, "text/event-stream", NULL, NULL, &st) != SPEED_OK) return;
    speed_http_stream_write(st, ": ping\n\n", 8);
    for (int i = 0; i < n; i++) {
        char chunk[200];
        snprintf(chunk, sizeof chunk,
                 "{\"choices\":[{\"text\":\"tok%d \",\"index\":0,\"logprobs\":null,\"finish_reason\":null}],"
                 "\"object\":\"text_completion\",\"model\":\"llama-model.gguf\"}",
                 i);
        speed_http_stream_write_sse(st, NULL, chunk);
    }
    speed_http_stream_write_sse(st, NULL, "{\"choices\":[{\"text\":\"\",\"index\":0,\"finish_reason\":\"length\"}]}");
    speed_http_stream_write_sse(st, NULL, "[DONE]");
    speed_http_stream_close(st);
    atomic_fetch_add(&seen->tokens, n);
}

static void test_llama_style(void) {
    llama_seen_t seen = {0};
    speed_http_server_params_t hp = speed_http_server_default_params();
    speed_http_server_t *srv = NULL;
    CHECK(speed_http_server_create(&hp, &srv) == SPEED_OK);
    if (!srv) return;
    speed_http_server_route(srv, "GET", "/v1/models", llama_models, NULL);
    speed_http_server_route(srv, "POST", "/v1/completions", llama_completions, &seen);
    CHECK(speed_http_server_start(srv) == SPEED_OK);
    /* no --model (asked of /v1/models), no --prefill-layers: plain OpenAI requests */
    lg_run_t r = lg("llama", "", "--url http://127.0.0.1:%u --rate 30 --requests 10 --output-tokens uniform:3,9",
                    (unsigned)speed_http_server_port(srv));
    check_all_ok("llama", &r, 10);
    CHECK_INT_EQ(atomic_load(&seen.n), 10);
    CHECK_INT_EQ(atomic_load(&seen.n_ignore_eos), 10);
    CHECK_INT_EQ(atomic_load(&seen.n_speed), 0);
    CHECK_INT_EQ(atomic_load(&seen.n_bad_model), 0);
    /* tokens counted from the chunks (no usage), input tokens unknown */
    CHECK_NEAR(num(r.rep, "tokens.output"), atomic_load(&seen.tokens), 0);
    CHECK_NEAR(num(r.rep, "tokens.output"), num(r.rep, "tokens.output_requested"), 0);
    CHECK(json_is_false(json_object_get(json_object_get(r.rep, "tokens"), "input_known")));
    CHECK(!json_object_get(json_object_get(r.rep, "tokens"), "input"));
    check_stats("llama", r.rep, "ttft", true);
    for (size_t i = 0; i < json_array_size(r.records); i++) {
        const json_t *x = json_array_get(r.records, i);
        CHECK(num(x, "chunks") == num(x, "output_tokens") && num(x, "prompt_tokens") == -1);
    }
    lg_free(&r);
    speed_http_server_destroy(srv);
}

int main(void) {
    speed_log_configure("error");
    cu_init("loadgen");
    const char *extra[] = {"--speed.allow_request_override", NULL};
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, extra);
    bool ok = cu_cluster_start_nodes(&c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool ok_r = false;
    cu_proc_t router = ok ? cu_cluster_router(&c, 0, NULL, 30, &ok_r) : (cu_proc_t){0};
    CHECK_MSG(ok_r, "router did not come up");
    snprintf(g_url, sizeof g_url, "http://127.0.0.1:%d", cu_router_port(&c, 0));
    g_router_port = cu_router_port(&c, 0);
    g_dec_http = cu_dec_http(&c, 0);
    test_llama_style();
    if (ok && ok_r) {
        test_usage_errors();
        test_open_loop();
        if (g_model[0]) {
            test_closed_loop();
            test_warmup();
            test_prefill_layers();
            test_trace();
            test_duration();
            test_sigint(cu_router_port(&c, 0));
            test_multi_turn();
            test_failures();
            test_api_key();
            test_https(&c);
        }
    }
    if (router.pid > 0) CHECK_INT_EQ(cu_stop(&router, SIGTERM, 30), 0);
    if (c.pre[0].pid > 0) CHECK_INT_EQ(cu_stop(&c.pre[0], SIGTERM, 30), 0);
    if (c.dec[0].pid > 0) CHECK_INT_EQ(cu_stop(&c.dec[0], SIGTERM, 30), 0);
    int failures = check_failures_;
    if (failures) {
        cu_log_tail("router0", 30);
        cu_log_tail("prefill0", 20);
        cu_log_tail("decode0", 20);
    }
    cu_cleanup(failures != 0);
    return CHECK_DONE();
}
