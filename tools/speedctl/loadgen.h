/* speedctl loadgen: a load generator for OpenAI-compatible endpoints (speedserve's router,
 * llama.cpp's llama-server, vLLM). The verb (cli_loadgen.c) is built from four parts, each in
 * its own file and usable on its own (the unit tests drive them directly):
 *
 *   loadgen_workload.c  seeded random numbers, length distributions (SPECs), the JSONL trace,
 *                       and the workload: job i (its lengths, depth and scheduled arrival)
 *   loadgen_prompt.c    prompt text of a wanted token count (exact with a tokenizer)
 *   loadgen_client.c    one request over HTTP(S): the body, the SSE stream, the timings
 *   loadgen_run.c       the run: open loop (arrivals on a schedule, a bounded pool of request
 *                       threads) or closed loop (N threads back to back), duration, drain, cut-off
 *   loadgen_report.c    percentiles, the summary, the table, the JSON report, per-request records
 *
 * Times are seconds on the monotonic clock since the run's start (t = 0) unless named _ms.
 * Nothing here calls exit(); errors come back as a status with a one-line reason in err.
 */
#ifndef SPEED_LOADGEN_H
#define SPEED_LOADGEN_H

#include <jansson.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "status.h"
#include "tokenizer.h"

/* ---- random numbers (loadgen_workload.c) ------------------------------------------------------
 * splitmix64: tiny, seedable, good enough for workloads; one generator per stream (the lengths of
 * request i come from stream i, so they do not depend on which thread asks first). */
typedef struct {
    uint64_t s;
} speed_lg_rng_t;

void speed_lg_rng_seed(speed_lg_rng_t *rng, uint64_t seed, uint64_t stream);
uint64_t speed_lg_rng_next(speed_lg_rng_t *rng);
double speed_lg_rng_uniform(speed_lg_rng_t *rng); /* [0, 1) */
double speed_lg_rng_normal(speed_lg_rng_t *rng);  /* mean 0, sd 1 (Box-Muller) */
double speed_lg_rng_exp(speed_lg_rng_t *rng);     /* mean 1 */

/* ---- length distributions ----------------------------------------------------------------------
 * SPEC                    draws
 *   fixed:N               N
 *   uniform:A,B           an integer uniformly in [A, B] (both included)
 *   normal:MEAN,SD        round(MEAN + SD * z), z standard normal
 *   lognormal:MEDIAN,SIGMA round(MEDIAN * exp(SIGMA * z)): ln(x) has mean ln(MEDIAN) and sd SIGMA
 * Every draw is clamped to [1, max]. */
typedef enum {
    SPEED_LG_DIST_FIXED,
    SPEED_LG_DIST_UNIFORM,
    SPEED_LG_DIST_NORMAL,
    SPEED_LG_DIST_LOGNORMAL,
} speed_lg_dist_kind_t;

typedef struct {
    speed_lg_dist_kind_t kind;
    double a, b; /* N | A,B | MEAN,SD | MEDIAN,SIGMA */
} speed_lg_dist_t;

/* Parses a SPEC. SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT with the reason in err (naming `what`,
 * the option). */
speed_status_t speed_lg_dist_parse(const char *what, const char *spec, speed_lg_dist_t *dist_p, char *err,
                                   size_t err_size);
int64_t speed_lg_dist_sample(const speed_lg_dist_t *d, speed_lg_rng_t *rng, int64_t max);
/* The SPEC back as text ("lognormal:128,0.5"). */
void speed_lg_dist_format(const speed_lg_dist_t *d, char *out, size_t size);

/* ---- the trace ---------------------------------------------------------------------------------
 * JSONL, one request per line: {"arrival_ms": 0, "input_tokens": 512, "output_tokens": 64,
 * "prefill_layers": 12}; "timestamp" (ms) is accepted for arrival_ms; prefill_layers is optional.
 * Blank lines and lines starting with '#' are skipped. Arrivals are offsets from the first line's
 * (which need not be 0) and must not decrease. */
typedef struct {
    double arrival_s; /* from the first entry's arrival */
    int64_t input_tokens, output_tokens;
    int32_t prefill_layers; /* 0 = not given */
} speed_lg_trace_entry_t;

typedef struct {
    speed_lg_trace_entry_t *entries;
    size_t n;
} speed_lg_trace_t;

/* Parses `len` bytes of JSONL. SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (err: "line N: why");
 * SPEED_ERR_NO_MEMORY. On error *trace is empty. Free with speed_lg_trace_free. */
speed_status_t speed_lg_trace_parse(const char *data, size_t len, speed_lg_trace_t *trace, char *err, size_t err_size);
void speed_lg_trace_free(speed_lg_trace_t *trace);

/* ---- the workload ------------------------------------------------------------------------------ */
typedef enum { SPEED_LG_ARRIVAL_POISSON, SPEED_LG_ARRIVAL_CONSTANT } speed_lg_arrival_t;

typedef struct {
    speed_lg_dist_t prompt, output;
    int64_t max_tokens_clamp;      /* draws are clamped to [1, this] */
    const speed_lg_trace_t *trace; /* NULL: the distributions and the arrival process */
    double rate;                   /* open loop: requests per second (0 = closed loop) */
    speed_lg_arrival_t arrival;
    double time_scale;      /* trace: arrival offsets are multiplied by it (1 = as recorded) */
    int32_t prefill_layers; /* sent with every request (0 = none); a trace line's own wins */
    uint64_t seed;
} speed_lg_workload_params_t;

typedef struct {
    int64_t index;
    double arrival_s; /* scheduled send time (open loop / trace); 0 in closed loop */
    int64_t prompt_tokens, output_tokens;
    int32_t prefill_layers; /* 0 = none */
    uint64_t prompt_seed;   /* what makes this request's prompt distinct */
} speed_lg_job_t;

typedef struct {
    speed_lg_workload_params_t p;
    int64_t next;        /* the next job's index */
    speed_lg_rng_t rng;  /* the arrival process */
    double next_arrival; /* seconds */
} speed_lg_workload_t;

void speed_lg_workload_init(speed_lg_workload_t *w, const speed_lg_workload_params_t *p);
/* The next job; false when a trace is exhausted. Not thread-safe (the caller serialises). */
bool speed_lg_workload_next(speed_lg_workload_t *w, speed_lg_job_t *job);

/* ---- prompts (loadgen_prompt.c) ----------------------------------------------------------------
 * Text of common English words drawn from a seed, so that two requests share no prefix. With a
 * tokenizer the text is adjusted until the server would count exactly n tokens (completions: the
 * text encoded with BOS, as speedserve's router does; chat: one user message rendered with the
 * chat template); without one it has n * words_per_token words and the count is the server's. */
typedef struct {
    const speed_tok_t *tok; /* NULL: approximate */
    bool chat;
    double words_per_token;
} speed_lg_prompter_t;

/* *text_p: speed_free it. *n_exact_p: the token count when known (tokenizer), else -1.
 * SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (err: no text of exactly n tokens was found, e.g. n is
 * below the chat template's own tokens); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_lg_prompt_make(const speed_lg_prompter_t *pr, int64_t n, uint64_t seed, char **text_p,
                                    int64_t *n_exact_p, char *err, size_t err_size);
/* Appends `n_words` seeded words (each with a leading space unless the buffer is empty). */
speed_status_t speed_lg_words_append(char **buf, size_t *len, size_t *cap, int64_t n_words, uint64_t seed);

/* ---- one request (loadgen_client.c) ------------------------------------------------------------ */
typedef struct {
    char host[256];
    uint16_t port;
    bool tls;
    char *ca_pem; /* --ca FILE's contents (NULL: the system's trust store) */
    bool chat;    /* /v1/chat/completions, else /v1/completions */
    const char *model;
    const char *api_key; /* NULL: no Authorization header */
    bool stream, ignore_eos;
    int timeout_ms; /* every socket wait */
} speed_lg_target_t;

/* Parses "http://host:port" / "https://[::1]:8443" (default ports 80 / 443; a trailing '/'
 * allowed). SPEED_OK or SPEED_ERR_INVALID_ARGUMENT (err says why). */
speed_status_t speed_lg_url_parse(const char *url, speed_lg_target_t *t, char *err, size_t err_size);

typedef enum { SPEED_LG_OK, SPEED_LG_ERROR, SPEED_LG_CUT_OFF } speed_lg_outcome_t;

typedef struct {
    int64_t index;
    int64_t conversation, turn; /* multi-turn: which conversation and turn (0-based); else -1 */
    speed_lg_outcome_t outcome;
    int http_status;  /* 0: no response */
    char error[96];   /* error type: "http_503", "connect", "timeout", "protocol", "stream_error"... */
    char detail[160]; /* the server's message or the cause, for the records */
    double t_sched, t_send, t_first, t_end; /* t_first < 0: no token seen */
    int64_t prompt_tokens_req, output_tokens_req;
    int64_t prompt_tokens;  /* usage.prompt_tokens; -1 = not reported */
    int64_t output_tokens;  /* usage.completion_tokens, else the chunks with content */
    int64_t n_chunks;       /* stream chunks carrying content */
    int64_t kv_bytes;       /* speedserve's usage.kv_bytes; -1 = not reported */
    int32_t prefill_layers; /* what was sent (0 = none) */
    float *itl_ms;          /* gaps between content chunks (n_chunks - 1), speed_malloc'd */
    size_t n_itl;
    char *text; /* the generated text when keep_text was asked (multi-turn) */
} speed_lg_result_t;

void speed_lg_result_cleanup(speed_lg_result_t *r);

/* Lets another thread stop a request that is waiting on its socket (the run's cut-off): plain
 * HTTP connections are shut down at once; HTTPS ones notice at the next event or socket timeout. */
typedef struct {
    pthread_mutex_t mu;
    int fd; /* the plain connection's socket while a request runs, else -1 */
    bool cancelled;
} speed_lg_cancel_t;

void speed_lg_cancel_init(speed_lg_cancel_t *c);
void speed_lg_cancel_cleanup(speed_lg_cancel_t *c);
void speed_lg_cancel_reset(speed_lg_cancel_t *c);
void speed_lg_cancel_fire(speed_lg_cancel_t *c);

/* The request body for `prompt` (NUL-terminated) as one user message or a completions prompt
 * (messages: a JSON array of {role, content} used instead when non-NULL). *body_p: free(). */
speed_status_t speed_lg_body_make(const speed_lg_target_t *t, const char *prompt, json_t *messages, int64_t max_tokens,
                                  int32_t prefill_layers, char **body_p);

/* Sends one request and reads the answer, filling r's outcome, status, times (t0: the run's
 * start on speed_clock_mono_s), tokens and ITLs. keep_text: r->text gets the generated text.
 * Always returns with r filled (an error is an outcome, not a status). */
void speed_lg_request_run(const speed_lg_target_t *t, const char *body, size_t body_len, double t0,
                          speed_lg_cancel_t *cancel, bool keep_text, speed_lg_result_t *r);

/* The same over a client the caller made (the SSE tests: speed_http_client_adopt on a
 * socketpair). The client is the caller's to destroy. */
struct speed_http_client;
void speed_lg_request_on(struct speed_http_client *client, const speed_lg_target_t *t, const char *body,
                         size_t body_len, double t0, speed_lg_cancel_t *cancel, bool keep_text, speed_lg_result_t *r);

/* GET /v1/models: the first model's id into out. SPEED_OK or an error with err set. */
speed_status_t speed_lg_model_discover(const speed_lg_target_t *t, char *out, size_t size, char *err, size_t err_size);

/* ---- report (loadgen_report.c) ----------------------------------------------------------------- */

/* The p-th percentile (0..100) of sorted[0..n) by linear interpolation between closest ranks
 * (p50 of {1,2,3,4} is 2.5); 0 for n = 0. */
double speed_lg_percentile(const double *sorted, size_t n, double p);

typedef struct {
    size_t n;
    double mean, min, max, p50, p90, p99;
} speed_lg_stats_t;

/* Sorts values in place and summarises them. */
speed_lg_stats_t speed_lg_stats(double *values, size_t n);

typedef struct {
    double ttft_ms, tpot_ms, e2e_ms; /* 0 = not given */
} speed_lg_slo_t;

/* What the report shows besides the results: the run's settings as given (for its "config"). */
typedef struct {
    json_t *config;    /* borrowed: the settings object put in the report */
    int64_t requested; /* jobs the workload meant to send (-1: unbounded: duration only) */
    int64_t dropped;   /* open loop: arrivals refused at --max-in-flight */
    double duration_s; /* from the first send to the last answer */
    speed_lg_slo_t slo;
    bool stream;
} speed_lg_report_params_t;

/* Builds the JSON report of results[0..n) (the field names are in docs/speedctl.md#loadgen).
 * NULL on allocation failure. */
json_t *speed_lg_report_json(const speed_lg_report_params_t *p, const speed_lg_result_t *results, size_t n);
/* Prints the human table of a report made by speed_lg_report_json. */
void speed_lg_report_print(const json_t *report, FILE *f);
/* One JSON object per line per request. SPEED_OK or SPEED_ERR_IO. */
speed_status_t speed_lg_records_write(const speed_lg_result_t *results, size_t n, FILE *f);

/* ---- the run (loadgen_run.c) ------------------------------------------------------------------- */
typedef struct {
    const speed_lg_target_t *target;
    speed_lg_workload_params_t workload;
    const speed_lg_prompter_t *prompter;
    int64_t concurrency;   /* closed loop: this many requests back to back (0 = open loop) */
    int64_t max_in_flight; /* open loop: arrivals beyond it are dropped */
    int64_t requests;      /* stop after sending this many (0 = no bound) */
    double duration_s;     /* stop sending after this long (0 = no bound) */
    double drain_s;        /* then wait this long for in-flight requests before cutting them off */
    /* multi-turn (conversations > 0): that many conversations of `turns` turns each, run by
     * `concurrency` threads (0: all at once); each turn resends the conversation so far */
    int64_t conversations, turns, system_tokens;
    bool think; /* wait think_ms between turns */
    speed_lg_dist_t think_ms;
    bool progress;     /* a progress line on stderr */
    bool progress_tty; /* rewrite it in place (stderr is a terminal) */
} speed_lg_run_params_t;

typedef struct {
    speed_lg_result_t *results; /* in completion order */
    size_t n;
    int64_t requested; /* -1: unbounded */
    int64_t dropped;
    double t_first_send, t_last_end;
} speed_lg_run_out_t;

/* Runs the load. SPEED_OK once every request is accounted for (errors are results); an error
 * status (err set) only when the run could not start (no memory, no thread). */
speed_status_t speed_lg_run(const speed_lg_run_params_t *p, speed_lg_run_out_t *out, char *err, size_t err_size);
void speed_lg_run_out_cleanup(speed_lg_run_out_t *out);

#endif /* SPEED_LOADGEN_H */
