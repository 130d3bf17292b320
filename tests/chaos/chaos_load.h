/* The chaos suite's load source (library speed_test_chaos): worker threads that keep a mix of
 * streamed and non-streamed greedy /v1/completions requests in flight against a router, each
 * with its own deadline, and classify every answer:
 *
 *   complete     200 with finish_reason stop/length (a stream: exactly one finish, then [DONE]);
 *                its text is then compared with the prompt's reference (`speedctl generate`
 *                at the same depth): a different text is a violation (CH_WRONG)
 *   clean error  an HTTP error with an OpenAI error object, or a stream whose error event
 *                (an OpenAI error object) is followed by [DONE] or the end of the stream
 *   violation    a hang (no end by the deadline), a truncated stream (the body ended without
 *                [DONE] or without an error event), a malformed answer (not JSON, no error
 *                object, events after [DONE], no answer at all), or a wrong answer
 *
 * Prompts are token ids, so the references are exact; the cluster runs with
 * engine.batch_invariant so a batched answer equals the batch-1 reference bit for bit.
 *
 * Thread-safety: ch_load_start / ch_load_stop on one thread (the scenario's); ch_load_snapshot
 * from any thread (counts are taken under the load's lock). Violations are printed to stderr
 * as they happen (the first CH_MAX_REPORTS of each kind in full).
 */
#ifndef SPEED_CHAOS_LOAD_H
#define SPEED_CHAOS_LOAD_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "openai_util.h"

typedef enum {
    CH_COMPLETE = 0,
    CH_CLEAN_ERROR,
    CH_HANG,      /* violation: no end by the deadline */
    CH_TRUNCATED, /* violation: the stream ended without [DONE] or an error event */
    CH_MALFORMED, /* violation: not JSON, no error object, events after [DONE], no answer */
    CH_WRONG,     /* violation: a complete answer that differs from the reference */
    CH_N_OUTCOMES
} ch_outcome_t;

/* Its name ("complete", "clean_error", "hang", ...). */
const char *ch_outcome_name(ch_outcome_t o);

/* A prompt and its reference answer. */
#define CH_MAX_PROMPT 512
typedef struct {
    int32_t ids[CH_MAX_PROMPT];
    int n;
    int max_tokens;
    char *ref_text;      /* speed_malloc'd */
    char ref_finish[16]; /* "stop" or "length" */
} ch_prompt_t;

/* Fills p with n ids (ou_prompt with `mul`) and max_tokens, and its reference from `speedctl
 * generate --batch_invariant` at prefill_layers (cached under cu_dir). False (printed) when the
 * reference could not be made. Main thread. */
bool ch_prompt_init(ch_prompt_t *p, int n, int mul, int vocab, int max_tokens, const char *prefill_layers);

/* Frees what p holds. */
void ch_prompt_cleanup(ch_prompt_t *p);

/* Clean errors are counted by "<http status>:<error code>" (streams: "sse:<code>"). */
#define CH_MAX_ERROR_KINDS 24
typedef struct {
    char kind[64];
    long long n;
} ch_error_kind_t;

/* What the load saw (a snapshot; subtract two to get a window). */
typedef struct {
    long long n_requests; /* answers classified */
    long long n_streamed;
    long long outcomes[CH_N_OUTCOMES];
    ch_error_kind_t errors[CH_MAX_ERROR_KINDS];
    int n_error_kinds;
    double max_seconds; /* the slowest answer */
} ch_totals_t;

/* Violations in t (every outcome but complete and clean error). */
long long ch_totals_violations(const ch_totals_t *t);

/* a - b, kind by kind (into *out). */
void ch_totals_diff(const ch_totals_t *a, const ch_totals_t *b, ch_totals_t *out);

/* acc += t, kind by kind. */
void ch_totals_add(ch_totals_t *acc, const ch_totals_t *t);

/* Prints one line per non-zero count, each prefixed with `label`. */
void ch_totals_print(const ch_totals_t *t, const char *label);

#define CH_MAX_WORKERS 16
#define CH_MAX_REPORTS 3

typedef struct {
    int port;                   /* the router's API port */
    const ch_prompt_t *prompts; /* borrowed; must outlive the load */
    int n_prompts;
    int n_workers;     /* requests in flight at once (<= CH_MAX_WORKERS) */
    double deadline_s; /* per request, from sending it */
    unsigned seed;
} ch_load_params_t;

typedef struct {
    ch_load_params_t p;
    pthread_t threads[CH_MAX_WORKERS];
    int n_threads;
    _Atomic bool stop;
    pthread_mutex_t lock;
    ch_totals_t totals;          /* under lock */
    int reported[CH_N_OUTCOMES]; /* under lock */
} ch_load_t;

/* Starts p->n_workers threads that each send one request after another until ch_load_stop:
 * worker k streams every other request (k odd starts with a stream), prompts in turn from a
 * per-worker seed. Returns false (printed) when a thread could not be started; the load is
 * then stopped. */
bool ch_load_start(ch_load_t *l, const ch_load_params_t *p);

/* Stops the load: the workers finish their request in flight (each bounded by its deadline)
 * and are joined. The totals stay readable. Idempotent. */
void ch_load_stop(ch_load_t *l);

/* Copies the totals so far into *out. */
void ch_load_snapshot(ch_load_t *l, ch_totals_t *out);

/* Sends one request now (on the calling thread) and classifies its answer; counts it in the
 * load's totals too when l is not NULL. `detail` (may be NULL) gets a one-line description. */
ch_outcome_t ch_request_once(ch_load_t *l, int port, const ch_prompt_t *p, bool stream, double deadline_s, char *detail,
                             size_t detail_len);

#endif /* SPEED_CHAOS_LOAD_H */
