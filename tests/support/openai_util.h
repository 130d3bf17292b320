/* Integration-test helpers for the router's OpenAI API (library speed_test_openai): request
 * bodies with token-id prompts, answers (one JSON object or an SSE stream, completions or
 * chat) collected into one shape, and the comparison with `speedctl generate --json` (tokens
 * by their text, logprobs and top logprobs to ou_tol, text, finish reason).
 *
 * Builds on cluster_util.h (cu_dir, cu_bin, cu_resp_t, cu_sse_t). Strings in an ou_result_t
 * and the bodies returned are speed_malloc'd.
 *
 * Failed comparisons are CHECKs (check.h): they fail the calling test.
 * Thread-safety: ou_check_ref updates the process-wide ou_n_near_ties / ou_max_dev: call it
 * from one thread at a time. The rest is reentrant.
 */
#ifndef SPEED_OPENAI_UTIL_H
#define SPEED_OPENAI_UTIL_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "cluster_util.h"
#include "tokenizer.h"

#define OU_MAX_TOK 256
#define OU_MAX_TOP 8

typedef struct {
    int n_top;
    char *top_str[OU_MAX_TOP];
    double top_lp[OU_MAX_TOP];
} ou_top_t;

/* One answer, streamed or not. */
typedef struct {
    int n; /* tokens (content positions with logprobs) */
    char *tok[OU_MAX_TOK];
    double lp[OU_MAX_TOK];
    ou_top_t top[OU_MAX_TOK];
    char *text; /* speed_malloc'd, the concatenated text */
    size_t text_len;
    char finish[32];  /* "" if none seen */
    int n_finish;     /* finish chunks seen (stream) */
    json_t *usage;    /* the usage object, or NULL */
    json_t *error;    /* an error object seen in the stream, or NULL */
    int n_chunks;     /* content chunks (stream) */
    int n_after_done; /* events after [DONE] (must be 0) */
    bool done;        /* [DONE] seen */
    bool bad_json;    /* an event that is not JSON */
} ou_result_t;

/* Frees what *r holds and zeroes it. */
void ou_result_free(ou_result_t *r);

/* Fills *r (overwritten, not freed first) from a whole (non-streamed) answer's JSON. */
void ou_from_json(ou_result_t *r, json_t *root);

/* Fills *r (overwritten, not freed first) from an SSE stream's events. */
void ou_from_sse(ou_result_t *r, const cu_sse_t *s);

/* Bit-exact comparison of two answers: every token's text and logprob, every top logprob (value
 * and string), the whole text. Returns how many positions differ (0 = identical; a different
 * token count or text counts one more) and describes the first difference in first (may be
 * NULL). */
int ou_diff_count(const ou_result_t *a, const ou_result_t *b, char *first, size_t first_cap);
/* CHECKs that a and b are bit-identical (ou_diff_count 0), naming `what` and the first difference. */
void ou_check_same(const ou_result_t *a, const ou_result_t *b, const char *what);

/* POSTs body (a /v1/completions request, not streamed) to port and parses the answer into *res
 * (zeroed first). CHECKs HTTP 200, and n_tokens tokens when n_tokens > 0. Returns true on a 200. */
bool ou_post_completion(int port, const char *body, int n_tokens, ou_result_t *res);

/* ---- the reference ------------------------------------------------------------------------ */

/* Runs `speedctl generate --model <cu_dir>/model --threads 1 --json <printf(fmt, ...)>` once per
 * key (cached in <cu_dir>/ref-<key>.json) and returns the parsed JSON (caller json_decref()s),
 * or NULL (printed). */
json_t *ou_ref(const char *key, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The logprob tolerance of ou_check_ref (default 1e-4). */
extern double ou_tol;
/* Batched runs are not bit-identical to batch 1: with ou_near_tie set, a different token is
 * accepted where the reference's best two alternatives are within 2 * ou_tol of each other
 * (a near tie that rounding may flip); the comparison stops there and ou_n_near_ties counts
 * it. */
extern bool ou_near_tie;
extern int ou_n_near_ties;
/* The largest logprob deviation ou_check_ref has seen. */
extern double ou_max_dev;

/* CHECKs that the answer equals the reference: same token count, each token's text (decoded
 * alone with `tok`), logprob to ou_tol, every top logprob shown matches a reference
 * alternative with that text (completions collapse alternatives with equal text into one
 * key; `chat` says which format), the text and the finish reason. `what` labels failures. */
void ou_check_ref(const ou_result_t *r, json_t *ref, const speed_tok_t *tok, bool chat, const char *what);

/* usage.<key> as an integer, or -1. */
long long ou_usage(const ou_result_t *r, const char *key);

/* CHECKs that the response is HTTP `status` with an OpenAI error object of this type, code
 * (NULL: not checked) and param (NULL: only present). */
void ou_check_error(const cu_resp_t *r, int status, const char *type, const char *code, const char *param,
                    const char *what);

/* ---- request bodies ----------------------------------------------------------------------- */

/* A prompt of n token ids: 1 (BoS-like) then a spread of ids < vocab (ids[i] = 3 + i * mul
 * mod (vocab - 3)). */
void ou_prompt(int32_t *ids, int n, int vocab, int mul);

/* "1,2,3" (speed_free it). */
char *ou_ids_csv(const int32_t *ids, int n);

/* A /v1/completions body: the prompt as ids, greedy, logprobs (0: none), stream or not,
 * speed.prefill_layers (NULL: none; a JSON number as text, e.g. "3" or "0.5"), and `more`
 * (extra top-level members without braces, e.g. "\"n\":2", or NULL). speed_free it. */
char *ou_completion_body(const char *model, const int32_t *ids, int n, int max_tokens, int logprobs, bool stream,
                         const char *prefill_layers, const char *more);

#endif /* SPEED_OPENAI_UTIL_H */
