/* speedctl loadgen: load an OpenAI-compatible endpoint and report latency, throughput and goodput
 * (docs/speedctl.md#loadgen). This file is the verb: its options, their checks, and the steps
 * (target, workload, run, report); the parts are in loadgen_*.c (loadgen.h). */
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "loadgen.h"
#include "log.h"
#include "speedctl.h"

typedef struct {
    char *url, *ca, *model, *api_key, *api_key_file;
    int endpoint; /* 0 completions, 1 chat */
    double rate;
    int arrival;
    int64_t concurrency, max_in_flight, requests;
    double duration, drain_timeout, request_timeout;
    int64_t seed;
    char *prompt_tokens, *output_tokens;
    int64_t length_max;
    char *trace;
    double time_scale;
    char *tokenizer;
    double words_per_token;
    bool ignore_eos, stream, progress;
    int64_t prefill_layers;
    double slo_ttft_ms, slo_tpot_ms, slo_e2e_ms;
    char *json, *records;
    int64_t conversations, turns, system_tokens, shared_prefix_tokens, warmup;
    char *think_ms;
} lg_opts_t;

static const char *const endpoint_names[] = {"completions", "chat", NULL};
static const char *const arrival_names[] = {"poisson", "constant", NULL};

#define OPT(...) SPEEDCTL_OPT(lg_opts_t, __VA_ARGS__)
static const speed_config_field_t lg_target_fields[] = {
    SPEEDCTL_TEXT_OPT(lg_opts_t, "url", url, "the server: http://HOST:PORT or https://HOST:PORT (required)"),
    SPEEDCTL_TEXT_OPT(lg_opts_t, "ca", ca,
                      "https: the CA certificate (PEM) the server's must chain to (default: the "
                      "system's trust store)"),
    OPT("endpoint", ENUM, endpoint, "completions", SPEED_CONFIG_UNBOUNDED, endpoint_names,
        "/v1/completions (a text prompt) or /v1/chat/completions (one user message)"),
    SPEEDCTL_TEXT_OPT(lg_opts_t, "model", model, "the model name to send (default: the first of GET /v1/models)"),
    {"api_key", SPEED_CONFIG_SECRET, offsetof(lg_opts_t, api_key), NULL, SPEED_CONFIG_UNBOUNDED, NULL,
     "the API key, sent as a Bearer token: from the environment (SPEED_API_KEY) or a config file, never argv"},
    SPEEDCTL_TEXT_OPT(lg_opts_t, "api_key_file", api_key_file, "read the API key from this file (one line)"),
};
static const speed_config_field_t lg_load_fields[] = {
    OPT("rate", DOUBLE, rate, "0", 0, 1e6, NULL, "open loop: requests per second (0 = not open loop)"),
    OPT("arrival", ENUM, arrival, "poisson", SPEED_CONFIG_UNBOUNDED, arrival_names,
        "open loop: Poisson arrivals (exponential gaps) or a constant gap of 1/rate"),
    OPT("max_in_flight", INT, max_in_flight, "256", 1, 100000, NULL,
        "open loop: at most this many requests at once; arrivals beyond it are dropped (counted)"),
    OPT("concurrency", INT, concurrency, "0", 0, 100000, NULL,
        "closed loop: this many requests at once, each sent when the last one ended (0 = not closed loop)"),
    OPT("requests", INT, requests, "0", 0, INT64_MAX, NULL, "send this many requests (0 = no count bound)"),
    OPT("duration", DOUBLE, duration, "0", 0, 1e7, NULL, "send for this many seconds (0 = no time bound)"),
    OPT("drain_timeout", DOUBLE, drain_timeout, "60", 0, 1e6, NULL,
        "after sending ends, wait this many seconds for requests in flight, then cut them off"),
    OPT("request_timeout", DOUBLE, request_timeout, "120", 0.1, 1e6, NULL,
        "seconds a request may wait on its socket (connect, or between two bytes)"),
    OPT("warmup", INT, warmup, "0", 0, 1000000, NULL,
        "first send this many requests, left out of the report: one alone, then the rest at once (warms connections, "
        "caches and batch paths)"),
    OPT("seed", INT, seed, "1", 0, INT64_MAX, NULL, "seed of arrivals, lengths and prompts"),
};
static const speed_config_field_t lg_workload_fields[] = {
    OPT("prompt_tokens", STRING, prompt_tokens, "fixed:128", SPEED_CONFIG_UNBOUNDED, NULL,
        "prompt length SPEC: fixed:N, uniform:A,B, normal:MEAN,SD or lognormal:MEDIAN,SIGMA"),
    OPT("output_tokens", STRING, output_tokens, "fixed:64", SPEED_CONFIG_UNBOUNDED, NULL,
        "output length SPEC (sent as max_tokens, with ignore_eos)"),
    OPT("length_max", INT, length_max, "32768", 1, 1 << 24, NULL, "lengths drawn from a SPEC are clamped to [1, this]"),
    SPEEDCTL_TEXT_OPT(lg_opts_t, "trace", trace,
                      "replay this JSONL trace (arrival_ms, input_tokens, output_tokens, prefill_layers) instead"),
    OPT("time_scale", DOUBLE, time_scale, "1", 1e-6, 1e6, NULL, "--trace: multiply its arrival offsets by this"),
    SPEEDCTL_TEXT_OPT(lg_opts_t, "tokenizer", tokenizer,
                      "a model directory whose tokenizer makes prompts of exactly the drawn length"),
    OPT("words_per_token", DOUBLE, words_per_token, "1", 0.01, 100, NULL,
        "without --tokenizer: prompt words per wanted token (the server's usage says the truth)"),
    OPT("shared_prefix_tokens", INT, shared_prefix_tokens, "0", 0, 1 << 24, NULL,
        "every prompt starts with the same text of this many tokens (a prefix cache's workload; 0 = none)"),
    OPT("ignore_eos", BOOL, ignore_eos, "true", SPEED_CONFIG_UNBOUNDED, NULL,
        "send ignore_eos so that the output has max_tokens tokens (--no-ignore-eos for servers that refuse it)"),
    OPT("prefill_layers", INT, prefill_layers, "0", 0, 100000, NULL,
        "send \"speed\": {\"prefill_layers\": C} with every request (speedserve's SPEED depth; 0 = not sent)"),
    OPT("stream", BOOL, stream, "true", SPEED_CONFIG_UNBOUNDED, NULL,
        "stream the answers (TTFT, ITL, TPOT); --no-stream measures end-to-end only"),
    OPT("conversations", INT, conversations, "0", 0, 1000000, NULL,
        "multi-turn: this many conversations (closed loop over conversations; --concurrency at once, default all)"),
    OPT("turns", INT, turns, "2", 1, 10000, NULL, "multi-turn: turns per conversation"),
    SPEEDCTL_TEXT_OPT(lg_opts_t, "think_ms", think_ms,
                      "multi-turn: a SPEC of milliseconds between turns (default none)"),
    OPT("system_tokens", INT, system_tokens, "0", 0, 1 << 24, NULL,
        "multi-turn: a system prompt of this many tokens shared by every conversation"),
};
static const speed_config_field_t lg_report_fields[] = {
    OPT("slo_ttft_ms", DOUBLE, slo_ttft_ms, "0", 0, 1e9, NULL, "goodput: time to first token at most this (0 = none)"),
    OPT("slo_tpot_ms", DOUBLE, slo_tpot_ms, "0", 0, 1e9, NULL, "goodput: time per output token at most this"),
    OPT("slo_e2e_ms", DOUBLE, slo_e2e_ms, "0", 0, 1e9, NULL, "goodput: end-to-end latency at most this"),
    SPEEDCTL_TEXT_OPT(lg_opts_t, "json", json, "write the JSON report to FILE ('-': stdout, the table then on stderr)"),
    SPEEDCTL_TEXT_OPT(lg_opts_t, "records", records, "write one JSON line per request to FILE"),
    OPT("progress", BOOL, progress, "false", SPEED_CONFIG_UNBOUNDED, NULL,
        "a progress line on stderr (default: on when stderr is a terminal)"),
};
#undef OPT
static const speedctl_options_part_t lg_parts[] = {
    SPEEDCTL_OWN_PART(lg_target_fields),
    SPEEDCTL_OWN_PART(lg_load_fields),
    SPEEDCTL_OWN_PART(lg_workload_fields),
    SPEEDCTL_OWN_PART(lg_report_fields),
};

static const char lg_usage[] =
    "speedctl loadgen --url http[s]://HOST:PORT (--rate R [--arrival poisson|constant] | --concurrency N | "
    "--trace FILE | --conversations N) [--requests N] [--duration S] [options]";

/* SIGINT ends sending as --duration would: the requests in flight are drained and the report is
 * printed. The handler is reset by the first signal, so a second Ctrl-C ends the process. */
static volatile sig_atomic_t g_stop;

static void on_sigint(int sig) {
    (void)sig;
    g_stop = 1;
}

/* The API key from --api-key-file: its first line, without the newline. */
static char *key_file_read(const char *path) {
    char *data = NULL;
    size_t len = 0;
    if (speedctl_read_file(path, &data, &len) != SPEED_OK) return NULL;
    data[strcspn(data, "\r\n")] = '\0';
    if (!data[0]) {
        speedctl_fail("--api-key-file %s: the file is empty", path);
        speed_free(data);
        return NULL;
    }
    return data;
}

static bool given(const speed_config_t *cfg, const char *name) {
    speed_config_source_t src = SPEED_CONFIG_SOURCE_DEFAULT;
    speed_config_origin(cfg, name, &src, NULL);
    return src != SPEED_CONFIG_SOURCE_DEFAULT;
}

/* The settings the report repeats (never the API key). */
static json_t *config_json(const lg_opts_t *o, const speed_lg_target_t *t, const char *mode) {
    json_t *c = json_pack(
        "{s:s,s:s,s:s,s:s,s:b,s:b,s:I,s:s,s:s}", "url", o->url, "endpoint", endpoint_names[o->endpoint], "model",
        t->model, "mode", mode, "stream", o->stream, "ignore_eos", o->ignore_eos, "seed", (json_int_t)o->seed,
        "prompt_tokens", o->trace ? "trace" : o->prompt_tokens, "output_tokens", o->trace ? "trace" : o->output_tokens);
    if (!c) return NULL;
    if (o->rate > 0) {
        json_object_set_new(c, "rate", json_real(o->rate));
        json_object_set_new(c, "arrival", json_string(arrival_names[o->arrival]));
    }
    if (o->rate > 0 || o->trace) json_object_set_new(c, "max_in_flight", json_integer(o->max_in_flight));
    if (o->concurrency > 0) json_object_set_new(c, "concurrency", json_integer(o->concurrency));
    if (o->requests > 0) json_object_set_new(c, "requests", json_integer(o->requests));
    if (o->duration > 0) json_object_set_new(c, "duration_s", json_real(o->duration));
    if (o->trace) {
        json_object_set_new(c, "trace", json_string(o->trace));
        json_object_set_new(c, "time_scale", json_real(o->time_scale));
    }
    if (o->prefill_layers > 0) json_object_set_new(c, "prefill_layers", json_integer(o->prefill_layers));
    if (o->shared_prefix_tokens > 0)
        json_object_set_new(c, "shared_prefix_tokens", json_integer(o->shared_prefix_tokens));
    if (o->warmup > 0) json_object_set_new(c, "warmup", json_integer(o->warmup));
    json_object_set_new(c, "exact_prompts", json_boolean(o->tokenizer != NULL));
    if (o->conversations > 0) {
        json_object_set_new(c, "conversations", json_integer(o->conversations));
        json_object_set_new(c, "turns", json_integer(o->turns));
        json_object_set_new(c, "system_tokens", json_integer(o->system_tokens));
        if (o->think_ms) json_object_set_new(c, "think_ms", json_string(o->think_ms));
    }
    return c;
}

/* TTFT percentiles per turn number (multi-turn). */
static json_t *by_turn_json(const speed_lg_result_t *res, size_t n, int64_t turns) {
    json_t *a = json_array();
    double *v = speed_malloc((n + 1) * sizeof *v);
    for (int64_t t = 0; a && v && t < turns; t++) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (res[i].turn == t && res[i].outcome == SPEED_LG_OK && res[i].t_first >= 0)
                v[k++] = (res[i].t_first - res[i].t_send) * 1000.0;
        speed_lg_stats_t s = speed_lg_stats(v, k);
        json_array_append_new(a, json_pack("{s:I,s:{s:I,s:f,s:f,s:f,s:f}}", "turn", (json_int_t)(t + 1), "ttft", "n",
                                           (json_int_t)s.n, "mean", s.mean, "p50", s.p50, "p90", s.p90, "p99", s.p99));
    }
    speed_free(v);
    return a;
}

/* One pass of the warm-up: n requests, `concurrency` at a time. False (said why) on a failure. */
static bool warmup_pass(const speed_lg_run_params_t *run, int64_t n, int64_t concurrency, uint64_t salt) {
    speed_lg_run_params_t w = *run;
    w.workload.trace = NULL;
    w.workload.rate = 0;
    w.workload.seed = run->workload.seed ^ salt;
    if (run->workload.trace) { /* the trace's first line's lengths */
        w.workload.prompt =
            (speed_lg_dist_t){SPEED_LG_DIST_FIXED, (double)run->workload.trace->entries[0].input_tokens, 0};
        w.workload.output =
            (speed_lg_dist_t){SPEED_LG_DIST_FIXED, (double)run->workload.trace->entries[0].output_tokens, 0};
    }
    w.concurrency = concurrency;
    w.requests = n;
    w.duration_s = 0;
    w.conversations = 0;
    w.progress = false;
    speed_lg_run_out_t out = {0};
    char err[256] = "";
    speed_status_t st = speed_lg_run(&w, &out, err, sizeof err);
    bool ok = st == SPEED_OK;
    if (!ok) speedctl_fail("warm-up: %s", err);
    for (size_t i = 0; ok && i < out.n; i++)
        if (out.results[i].outcome != SPEED_LG_OK) {
            speedctl_fail("warm-up request %zu failed: %s %s", i, out.results[i].error, out.results[i].detail);
            ok = false;
        }
    speed_lg_run_out_cleanup(&out);
    return ok;
}

/* --warmup: n requests of the workload's lengths (other seeds), not reported: the first alone
 * (connections, endpoints, first-touch memory), then the other n - 1 at once (what a batch of
 * several sequences touches that a lone request does not: without it the run's first requests
 * to arrive together still pay for it). A warm-up that fails says why and stops the run. */
static bool warmup_run(const speed_lg_run_params_t *run, int64_t n) {
    if (!warmup_pass(run, 1, 1, 0x7761726dULL)) return false;
    return n < 2 || warmup_pass(run, n - 1, n - 1, 0x7761726e00000000ULL);
}

static int lg_main(lg_opts_t *o, speed_config_t *cfg) {
    char err[512] = "";
    /* ---- checks: every usage error before anything is sent */
    speed_lg_target_t t = {0};
    if (!o->url) {
        speedctl_fail("--url is required (e.g. --url http://127.0.0.1:8080)");
        return SPEEDCTL_EXIT_USAGE;
    }
    if (speed_lg_url_parse(o->url, &t, err, sizeof err) != SPEED_OK) {
        speedctl_fail("%s", err);
        return SPEEDCTL_EXIT_USAGE;
    }
    if (o->ca && !t.tls) {
        speedctl_fail("--ca is for https:// URLs");
        return SPEEDCTL_EXIT_USAGE;
    }
    int modes =
        (o->rate > 0) + (o->concurrency > 0 && o->conversations == 0) + (o->trace != NULL) + (o->conversations > 0);
    if (modes != 1) {
        speedctl_fail(modes ? "give one of --rate, --concurrency, --trace and --conversations"
                            : "give --rate R (open loop), --concurrency N (closed loop), --trace FILE or "
                              "--conversations N");
        return SPEEDCTL_EXIT_USAGE;
    }
    if (!o->trace && o->conversations == 0 && o->requests == 0 && o->duration == 0) {
        speedctl_fail("give --requests N and/or --duration S: a run must end by itself");
        return SPEEDCTL_EXIT_USAGE;
    }
    if (o->trace && (given(cfg, "prompt_tokens") || given(cfg, "output_tokens"))) {
        speedctl_fail("--trace gives the lengths: drop --prompt-tokens / --output-tokens");
        return SPEEDCTL_EXIT_USAGE;
    }
    if (o->conversations > 0 && !o->stream) {
        speedctl_fail("--conversations needs --stream (it reports TTFT by turn)");
        return SPEEDCTL_EXIT_USAGE;
    }
    if (o->conversations > 0 && o->endpoint != 1) {
        speedctl_fail("--conversations needs --endpoint chat (each turn resends the conversation as messages)");
        return SPEEDCTL_EXIT_USAGE;
    }
    speed_lg_run_params_t rp = {0};
    speed_lg_workload_params_t *wp = &rp.workload;
    if (speed_lg_dist_parse("--prompt-tokens", o->prompt_tokens, &wp->prompt, err, sizeof err) != SPEED_OK ||
        speed_lg_dist_parse("--output-tokens", o->output_tokens, &wp->output, err, sizeof err) != SPEED_OK ||
        (o->think_ms && speed_lg_dist_parse("--think-ms", o->think_ms, &rp.think_ms, err, sizeof err) != SPEED_OK)) {
        speedctl_fail("%s", err);
        return SPEEDCTL_EXIT_USAGE;
    }
    if (o->conversations > 0 && o->shared_prefix_tokens > 0) {
        speedctl_fail("--conversations shares a prefix through --system-tokens, not --shared-prefix-tokens");
        return SPEEDCTL_EXIT_USAGE;
    }
    if (o->api_key && o->api_key_file) {
        speedctl_fail("the API key comes from SPEED_API_KEY or --api-key-file, not both");
        return SPEEDCTL_EXIT_USAGE;
    }

    /* ---- resources */
    int rc = SPEEDCTL_EXIT_FAIL;
    char *key = NULL, *ca = NULL, *trace_data = NULL, *prefix = NULL;
    speed_lg_trace_t trace = {0};
    speed_tok_t *tok = NULL;
    json_t *report = NULL, *conf = NULL;
    speed_lg_run_out_t out = {0};
    char model[256];
    if (o->api_key_file && !(key = key_file_read(o->api_key_file))) goto done;
    t.api_key = key ? key : o->api_key;
    if (o->ca) {
        size_t n;
        if (speedctl_read_file(o->ca, &ca, &n) != SPEED_OK) goto done;
        t.ca_pem = ca;
    }
    if (o->trace) {
        size_t n;
        if (speedctl_read_file(o->trace, &trace_data, &n) != SPEED_OK) goto done;
        speed_status_t st = speed_lg_trace_parse(trace_data, n, &trace, err, sizeof err);
        if (st != SPEED_OK) {
            speedctl_fail("--trace %s: %s", o->trace, err);
            rc = st == SPEED_ERR_INVALID_ARGUMENT ? SPEEDCTL_EXIT_USAGE : SPEEDCTL_EXIT_FAIL;
            goto done;
        }
    }
    if (o->tokenizer && speed_tok_load(o->tokenizer, NULL, &tok) != SPEED_OK) goto done; /* logged */
    t.chat = o->endpoint == 1;
    t.stream = o->stream;
    t.ignore_eos = o->ignore_eos;
    t.timeout_ms = (int)(o->request_timeout * 1000);
    if (o->model) {
        t.model = o->model;
    } else {
        if (speed_lg_model_discover(&t, model, sizeof model, err, sizeof err) != SPEED_OK) {
            speedctl_fail("%s", err);
            goto done;
        }
        t.model = model;
    }
    const char *mode = o->trace ? "trace" : o->conversations > 0 ? "conversations" : o->rate > 0 ? "open" : "closed";
    conf = config_json(o, &t, mode);

    /* ---- the run */
    speed_lg_prompter_t pr = {tok, t.chat, o->words_per_token, NULL};
    if (o->shared_prefix_tokens > 0) {
        /* its own seed, apart from every request's: the same for every request of the run */
        speed_lg_prompter_t pp = {tok, false, o->words_per_token, NULL};
        int64_t n_exact;
        if (speed_lg_prompt_make(&pp, o->shared_prefix_tokens, (uint64_t)o->seed ^ 0x7072656678ULL, &prefix, &n_exact,
                                 err, sizeof err) != SPEED_OK) {
            speedctl_fail("--shared-prefix-tokens: %s", err);
            goto done;
        }
        pr.prefix = prefix;
    }
    wp->max_tokens_clamp = o->length_max;
    wp->trace = o->trace ? &trace : NULL;
    wp->rate = o->rate;
    wp->arrival = (speed_lg_arrival_t)o->arrival;
    wp->time_scale = o->time_scale;
    wp->prefill_layers = (int32_t)o->prefill_layers;
    wp->seed = (uint64_t)o->seed;
    rp.target = &t;
    rp.prompter = &pr;
    rp.concurrency = o->conversations > 0      ? (o->concurrency > 0 ? o->concurrency : o->conversations)
                     : o->rate > 0 || o->trace ? 0
                                               : o->concurrency;
    rp.max_in_flight = o->max_in_flight;
    rp.requests = o->requests;
    rp.duration_s = o->duration;
    rp.drain_s = o->drain_timeout;
    rp.conversations = o->conversations;
    rp.turns = o->turns;
    rp.system_tokens = o->system_tokens;
    rp.think = o->think_ms != NULL;
    rp.stop = &g_stop;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    /* a server closing a connection while a request is written must be an error of that request,
     * not the end of the process (TLS writes do not pass MSG_NOSIGNAL) */
    signal(SIGPIPE, SIG_IGN);
    bool tty = isatty(STDERR_FILENO);
    rp.progress = given(cfg, "progress") ? o->progress : tty;
    rp.progress_tty = tty;
    if (o->warmup > 0 && !warmup_run(&rp, o->warmup)) goto done;
    if (speed_lg_run(&rp, &out, err, sizeof err) != SPEED_OK) {
        speedctl_fail("%s", err);
        goto done;
    }

    /* ---- the report */
    speed_lg_report_params_t rep = {conf,
                                    out.requested,
                                    out.dropped,
                                    out.t_last_end - out.t_first_send,
                                    {o->slo_ttft_ms, o->slo_tpot_ms, o->slo_e2e_ms},
                                    o->stream};
    report = speed_lg_report_json(&rep, out.results, out.n);
    if (!report) {
        speedctl_fail("out of memory making the report");
        goto done;
    }
    if (o->conversations > 0)
        json_object_set_new(report, "latency_by_turn", by_turn_json(out.results, out.n, o->turns));
    bool json_stdout = o->json && strcmp(o->json, "-") == 0;
    speed_lg_report_print(report, json_stdout ? stderr : stdout);
    if (o->json) {
        int flags = JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(10);
        int bad = json_stdout ? json_dumpf(report, stdout, flags) || fputc('\n', stdout) == EOF
                              : json_dump_file(report, o->json, flags);
        if (bad) {
            speedctl_fail("--json %s: cannot write the report", o->json);
            goto done;
        }
    }
    if (o->records) {
        FILE *f = fopen(o->records, "w");
        speed_status_t st = f ? speed_lg_records_write(out.results, out.n, f) : SPEED_ERR_IO;
        if (f && fclose(f) != 0) st = SPEED_ERR_IO;
        if (st != SPEED_OK) {
            speedctl_fail("--records %s: cannot write the records", o->records);
            goto done;
        }
    }
    const json_t *rq = json_object_get(report, "requests");
    int64_t failed = json_integer_value(json_object_get(rq, "failed"));
    int64_t completed = json_integer_value(json_object_get(rq, "completed"));
    if (failed > 0 || completed == 0) {
        speedctl_fail("%" PRId64 " of %zu requests failed%s", failed, out.n,
                      completed == 0 ? " and none completed" : "");
        rc = SPEEDCTL_EXIT_FAIL;
    } else {
        rc = SPEEDCTL_EXIT_OK;
    }
done:
    json_decref(report);
    json_decref(conf);
    speed_lg_run_out_cleanup(&out);
    speed_tok_destroy(tok);
    speed_lg_trace_free(&trace);
    speed_free(trace_data);
    speed_free(prefix);
    speed_free(ca);
    if (key) {
        memset(key, 0, strlen(key));
        speed_free(key);
    }
    return rc;
}

int speedctl_loadgen(int argc, char **argv) {
    lg_opts_t o;
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "loadgen", lg_usage, lg_parts, SPEEDCTL_N_PARTS(lg_parts), &o, argc, argv))
        return opts.exit_code;
    int rc = lg_main(&o, opts.cfg);
    speed_config_destroy(opts.cfg);
    return rc;
}
