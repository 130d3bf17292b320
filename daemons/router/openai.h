/* speed_openai: the OpenAI-compatible HTTP API layer of the router, without sockets.
 *
 * - Parses and validates POST /v1/chat/completions and /v1/completions bodies into a
 *   speed_openai_request_t (strict types for known fields, unknown top-level fields
 *   ignored, as OpenAI clients send many).
 * - OpenAI error objects {"error": {"message", "type", "param", "code"}} and the HTTP
 *   status of each error kind; the one table that maps a speed_status_t to them.
 * - Response builders: chat.completion / text_completion objects, streaming chunks as
 *   SSE lines, the final "data: [DONE]", the GET /v1/models list.
 * - API key check (Authorization: Bearer KEY; constant-time compare).
 * - Prompt tokenization of a parsed request (chat template or prompt text or ids).
 *
 * One header, four files, one per section below: openai_error.c (error kinds and the
 * status table), openai_request.c (parsing, the checks after parsing, tokenization),
 * openai_response.c (every JSON body and SSE event, errors included), openai_auth.c (the
 * key check). Parsing also uses json_strict.h, a JSON syntax check with nothing
 * OpenAI-specific in it.
 *
 * JSON is jansson's. jansson allocates with malloc unless the process calls
 * json_set_alloc_funcs(speed_malloc, speed_free) at startup, before any JSON exists;
 * the daemon should, so that JSON memory is counted and fault injection reaches it.
 *
 * Threading: no global state; every function may be called from any thread. A request
 * object belongs to one thread at a time.
 *
 * Memory: the request object and every string or id array inside it are owned by the
 * request (speed_openai_request_destroy frees them). Builders return a new
 * NUL-terminated buffer the caller releases with speed_free.
 *
 * Errors: functions taking a speed_openai_error_t *err fill it whenever they return an
 * error status (err may be NULL). Client mistakes are not logged (they are the client's,
 * and the response says what is wrong); allocation failures are.
 */
#ifndef SPEED_ROUTER_OPENAI_H
#define SPEED_ROUTER_OPENAI_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "depth.h"
#include "json_budget.h"
#include "status.h"
#include "tokenizer.h"

typedef enum {
    SPEED_OPENAI_CHAT = 0,    /* POST /v1/chat/completions */
    SPEED_OPENAI_COMPLETIONS, /* POST /v1/completions */
} speed_openai_api_t;

/* ---- errors (openai_error.c; their JSON bodies: openai_response.c) ----------------- */

typedef enum {
    SPEED_OPENAI_ERR_INVALID_REQUEST = 0, /* 400 invalid_request_error */
    SPEED_OPENAI_ERR_INVALID_API_KEY,     /* 401 invalid_request_error, code invalid_api_key */
    SPEED_OPENAI_ERR_MODEL_NOT_FOUND,     /* 404 invalid_request_error, code model_not_found */
    SPEED_OPENAI_ERR_CONTEXT_LENGTH,      /* 413 invalid_request_error,
                                             code context_length_exceeded */
    SPEED_OPENAI_ERR_OVERLOADED,          /* 429 requests, code rate_limit_exceeded
                                             (send Retry-After) */
    SPEED_OPENAI_ERR_UNAVAILABLE,         /* 503 server_error, code service_unavailable */
    SPEED_OPENAI_ERR_INTERNAL,            /* 500 server_error */
    SPEED_OPENAI_ERR_KIND_COUNT
} speed_openai_error_kind_t;

#define SPEED_OPENAI_ERROR_MESSAGE_MAX 320
#define SPEED_OPENAI_ERROR_PARAM_MAX   96
#define SPEED_OPENAI_ERROR_CODE_MAX    48

/* Fixed buffers: filling an error never allocates (it must work when memory ran out).
 * Empty param / code mean JSON null. Longer texts are truncated. */
typedef struct {
    speed_openai_error_kind_t kind;
    char message[SPEED_OPENAI_ERROR_MESSAGE_MAX];
    char param[SPEED_OPENAI_ERROR_PARAM_MAX]; /* e.g. "messages[2].content" */
    char code[SPEED_OPENAI_ERROR_CODE_MAX];   /* e.g. "invalid_type" */
} speed_openai_error_t;

/* HTTP status of a kind: 400 401 404 413 429 503 500 (500 for values outside the enum). */
int speed_openai_error_http_status(speed_openai_error_kind_t kind);
/* The OpenAI "type" string of a kind (static). */
const char *speed_openai_error_type(speed_openai_error_kind_t kind);

/* Fills *err (no-op if err is NULL). param and code may be NULL (JSON null). */
void speed_openai_error_set(speed_openai_error_t *err, speed_openai_error_kind_t kind, const char *param,
                            const char *code, const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* The same with a va_list (for callers that wrap it in their own printf-like helper). */
void speed_openai_error_setv(speed_openai_error_t *err, speed_openai_error_kind_t kind, const char *param,
                             const char *code, const char *fmt, va_list ap) __attribute__((format(printf, 5, 0)));

/* The table from a project status to an OpenAI error: INVALID_ARGUMENT, PARSE, FORMAT,
 * UNSUPPORTED → 400; NOT_FOUND → 404 (model_not_found); TOO_LONG → 413; CAPACITY →
 * 429; TIMEOUT, CANCELLED, NO_MEMORY and peer errors → 503; IO, DEVICE, INTERNAL and
 * unknown values → 500. `message` may be NULL (then the status's own text is used).
 * SPEED_OK gives a 500 "internal error" (a caller bug, reported not crashed). */
void speed_openai_error_from_status(speed_status_t status, const char *message, speed_openai_error_t *err);

/* Compact JSON body of an error. Returns SPEED_OK or NO_MEMORY; *json_p is speed_free'd
 * by the caller, *len_p (may be NULL) excludes the NUL. */
speed_status_t speed_openai_error_json(const speed_openai_error_t *err, char **json_p, size_t *len_p);

/* A static body for when even building an error failed (500, no allocation). */
const char *speed_openai_error_fallback_json(void);

/* ---- requests (openai_request.c) --------------------------------------------------- */

#define SPEED_OPENAI_MAX_STOP         4
#define SPEED_OPENAI_MAX_TOP_LOGPROBS 20

typedef enum {
    SPEED_OPENAI_ROLE_SYSTEM = 0, /* "system" (and "developer", its newer OpenAI name) */
    SPEED_OPENAI_ROLE_USER,
    SPEED_OPENAI_ROLE_ASSISTANT,
    SPEED_OPENAI_ROLE_TOOL,
} speed_openai_role_t;

/* "system" "user" "assistant" "tool" (static); "unknown" outside the enum. */
const char *speed_openai_role_name(speed_openai_role_t role);

typedef struct {
    speed_openai_role_t role;
    char *content; /* UTF-8 without NUL; text parts joined with "\n"; "" when an
                             assistant message has null content */
    size_t content_len;
    char *name;         /* optional "name", else NULL */
    char *tool_call_id; /* optional (tool messages), else NULL */
} speed_openai_message_t;

/* The per-request SPEED extension object {"speed": {...}}. */
typedef struct {
    bool present;                /* the request carried a "speed" object */
    speed_depth_request_t depth; /* what it states; unset parts take the deployment's */
    speed_depth_t resolved;      /* present: depth over the deployment's for the model, by
                                    * speed_depth_resolve (C in 1..L) — what the router sends */
} speed_openai_speed_t;

typedef struct {
    speed_openai_api_t api;
    char *model; /* required, non-empty */

    /* chat: n_messages >= 1 */
    speed_openai_message_t *messages;
    size_t n_messages;

    /* completions: exactly one of prompt (text) and prompt_ids is set */
    char *prompt; /* UTF-8 without NUL, may be ""; NULL if ids */
    size_t prompt_len;
    int32_t *prompt_ids; /* token ids >= 0 (< vocab_size when checked) */
    size_t n_prompt_ids;

    bool stream;
    bool include_usage; /* stream_options.include_usage */
    int64_t max_tokens; /* >= 1; -1 = not given (fill the context) */
    double temperature; /* [0, 2], default 1 */
    double top_p;       /* (0, 1], default 1 */
    int32_t top_k;      /* >= 0, 0 = off (extension) */
    bool has_seed;
    int64_t seed;
    char *stop[SPEED_OPENAI_MAX_STOP]; /* non-empty UTF-8 strings without NUL */
    size_t n_stop;
    bool logprobs;        /* return logprobs of the sampled tokens */
    int32_t top_logprobs; /* 0..20 alternatives per position (chat:
                                          top_logprobs; completions: the logprobs int) */
    int32_t n;            /* always 1 */
    bool ignore_eos;      /* keep generating past end-of-sequence tokens up to max_tokens (the
                           * extension llama-server and vLLM take; load generators use it) */
    char *user;           /* optional, else NULL */
    speed_openai_speed_t speed;
    bool content_special_tokens; /* from the parse params: tokenize lets chat content spell
                                  * special tokens */
} speed_openai_request_t;

typedef struct {
    bool allow_speed;            /* deployment lets requests carry the "speed" object */
    int32_t n_layers;            /* model depth L: a "speed" object is resolved against it (a
                                * deployment that allows the object must set it) */
    speed_depth_t depth;         /* the deployment's depth (speed_cluster_config_depth);
                                * default speed_depth_default() */
    int64_t max_tokens_limit;    /* max_tokens above this → 400; 0 = no limit */
    int32_t vocab_size;          /* prompt token ids must be below this; 0 = unchecked */
    speed_json_budget_t json;    /* a body over it is refused (400) before jansson parses it */
    bool content_special_tokens; /* chat content may spell special tokens (issue 10: off, so
                                  * a message cannot forge a turn); copied into the request */
} speed_openai_parse_params_t;

/* JSON budget of the default parse params: generous for any real request, and what a
 * body can make jansson allocate stays a few hundred MiB at most (json_budget.h). */
#define SPEED_OPENAI_JSON_MAX_ELEMENTS   (1u << 20)
#define SPEED_OPENAI_JSON_MAX_CONTAINERS (1u << 16)
#define SPEED_OPENAI_JSON_MAX_DEPTH      256

/* allow_speed false, the JSON budget above, content_special_tokens false, everything else
 * 0 (unchecked). */
speed_openai_parse_params_t speed_openai_default_parse_params(void);

/* Parses and validates a request body of `len` bytes (need not be NUL-terminated).
 * params may be NULL (defaults).
 * Returns SPEED_OK (*req_p owns a new request), SPEED_ERR_INVALID_ARGUMENT (a 400:
 * bad JSON, not an object, a missing/wrong-typed/out-of-range field, or a field whose
 * value speedserve does not support, e.g. n = 2 — *err says which, with `param`),
 * SPEED_ERR_NO_MEMORY (*err is a 503), or SPEED_ERR_INTERNAL for NULL arguments. */
speed_status_t speed_openai_request_parse(speed_openai_api_t api, const char *body, size_t len,
                                          const speed_openai_parse_params_t *params, speed_openai_request_t **req_p,
                                          speed_openai_error_t *err);
void speed_openai_request_destroy(speed_openai_request_t *req); /* NULL ok */

/* 404 model_not_found unless req->model is one of models[0..n_models). Returns SPEED_OK
 * or SPEED_ERR_NOT_FOUND. */
speed_status_t speed_openai_check_model(const speed_openai_request_t *req, const char *const *models, size_t n_models,
                                        speed_openai_error_t *err);

/* Context limit: n_prompt must leave room for at least one token, and with max_tokens
 * given, n_prompt + max_tokens <= n_ctx. *max_tokens_p (may be NULL) receives the
 * effective generation budget (max_tokens, or n_ctx - n_prompt when not given).
 * Returns SPEED_OK or SPEED_ERR_TOO_LONG (*err: 413 context_length_exceeded). */
speed_status_t speed_openai_check_length(const speed_openai_request_t *req, int64_t n_prompt, int64_t n_ctx,
                                         int64_t *max_tokens_p, speed_openai_error_t *err);

/* The prompt's token ids appended to *ids: chat → the tokenizer's chat template with the
 * generation prompt, encoded without added specials; completions text → encoded with
 * add_special; completions ids → copied (checked against the vocabulary).
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (400: an id out of range, a conversation
 * the template rejects, e.g. Llama 2 alternation); SPEED_ERR_UNSUPPORTED (500: the
 * tokenizer has no chat template); SPEED_ERR_NO_MEMORY (503). On error *ids keeps its
 * previous content. */
speed_status_t speed_openai_request_tokenize(const speed_openai_request_t *req, const speed_tok_t *tok,
                                             speed_tok_ids_t *ids, speed_openai_error_t *err);

/* ---- responses (openai_response.c) ------------------------------------------------- */

typedef enum {
    SPEED_OPENAI_FINISH_NONE = 0, /* null (still generating) */
    SPEED_OPENAI_FINISH_STOP,     /* "stop": EOS or a stop string */
    SPEED_OPENAI_FINISH_LENGTH,   /* "length": max_tokens or the context */
} speed_openai_finish_t;

/* Token text is raw bytes: a byte-level token may be part of a UTF-8 character. Valid
 * UTF-8 is sent as is; otherwise the token string is "bytes:\xNN..." (as OpenAI does) and
 * the chat "bytes" array still carries the real bytes. */
typedef struct {
    const char *token;
    size_t token_len;
    double logprob;
} speed_openai_top_logprob_t;

typedef struct {
    const char *token;
    size_t token_len;
    double logprob;
    const speed_openai_top_logprob_t *top; /* n_top alternatives, best first */
    size_t n_top;
} speed_openai_token_logprob_t;

typedef struct {
    int64_t prompt_tokens;
    int64_t completion_tokens;
    int64_t kv_bytes;            /* KV bytes shipped prefill → decode; < 0 = omitted */
    int64_t kv_full_depth_bytes; /* what C = L would have shipped; < 0 = omitted */
} speed_openai_usage_t;

/* A finished non-streaming response (one choice). Strings are borrowed. */
typedef struct {
    const char *id; /* "chatcmpl-..." / "cmpl-..." made by the caller */
    const char *model;
    int64_t created;  /* unix seconds */
    const char *text; /* generated text (invalid UTF-8 becomes U+FFFD) */
    size_t text_len;
    speed_openai_finish_t finish;
    bool has_logprobs; /* false → "logprobs": null */
    const speed_openai_token_logprob_t *logprobs;
    size_t n_logprobs;
    const speed_openai_usage_t *usage; /* NULL → no usage member */
} speed_openai_response_t;

/* chat.completion (choices[0].message {role, content}) or text_completion
 * (choices[0].text) as compact JSON. Chat logprobs: {"content": [{token, logprob,
 * bytes, top_logprobs: [{token, logprob, bytes}]}]}; completions logprobs: {tokens,
 * token_logprobs, top_logprobs (one {token: logprob} object per position), text_offset
 * (byte offsets into the generated text, from 0)}. usage: prompt_tokens,
 * completion_tokens, total_tokens, kv_bytes, kv_full_depth_bytes.
 * Returns SPEED_OK, SPEED_ERR_INTERNAL (NULL arguments) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_openai_response_json(speed_openai_api_t api, const speed_openai_response_t *r, char **json_p,
                                          size_t *len_p);

typedef enum {
    SPEED_OPENAI_CHUNK_ROLE = 0, /* chat only: first chunk, delta {role: assistant,
                                      content: ""} */
    SPEED_OPENAI_CHUNK_CONTENT,  /* a text piece (chat delta.content / completions text) */
    SPEED_OPENAI_CHUNK_FINISH,   /* empty delta / text "" with finish_reason */
    SPEED_OPENAI_CHUNK_USAGE,    /* choices [] with usage (stream_options.include_usage) */
} speed_openai_chunk_kind_t;

typedef struct {
    speed_openai_chunk_kind_t kind;
    const char *id;
    const char *model;
    int64_t created;
    const char *text; /* CONTENT: the piece; may be NULL with text_len 0 */
    size_t text_len;
    const speed_openai_token_logprob_t *logprobs; /* CONTENT: logprobs of its tokens */
    size_t n_logprobs;
    bool has_logprobs;                 /* CONTENT: false → "logprobs": null */
    size_t text_offset;                /* CONTENT, completions: byte offset of this piece in the
                                  whole generated text (starts the text_offset list) */
    speed_openai_finish_t finish;      /* FINISH */
    const speed_openai_usage_t *usage; /* USAGE: required */
    bool include_usage;                /* non-USAGE chunks carry "usage": null (as OpenAI does when
                                  stream_options.include_usage is set) */
} speed_openai_chunk_t;

/* One SSE event "data: {...}\n\n" (chat.completion.chunk or text_completion).
 * Returns SPEED_OK, SPEED_ERR_INTERNAL (NULL arguments, a USAGE chunk without usage, a
 * ROLE chunk for completions) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_openai_chunk_sse(speed_openai_api_t api, const speed_openai_chunk_t *c, char **sse_p,
                                      size_t *len_p);

/* "data: [DONE]\n\n" (static). len_p may be NULL. */
const char *speed_openai_sse_done(size_t *len_p);

/* An SSE event carrying an error object (a failure after the stream started). */
speed_status_t speed_openai_error_sse(const speed_openai_error_t *err, char **sse_p, size_t *len_p);

/* GET /v1/models: {"object":"list","data":[{"id","object":"model","created","owned_by"}]}.
 * owned_by NULL → "speedserve". Returns SPEED_OK, INTERNAL (NULL ids with n > 0) or
 * NO_MEMORY. */
speed_status_t speed_openai_models_json(const char *const *ids, size_t n_ids, int64_t created, const char *owned_by,
                                        char **json_p, size_t *len_p);

/* ---- authentication (openai_auth.c) ------------------------------------------------ */

/* Checks an Authorization header value ("Bearer KEY", scheme case-insensitive) against
 * keys[0..n_keys). n_keys == 0 means authentication is off: always true. The comparison
 * takes time that depends on the presented key's length and n_keys only, not on how
 * much of a configured key matches. header may be NULL (missing). On false, *err (may be
 * NULL) is the 401. */
bool speed_openai_auth_check(const char *header, const char *const *keys, size_t n_keys, speed_openai_error_t *err);

/* The same check that also says which key matched (*index_p, written only on true; keys
 * are distinct). n_keys == 0 is a refusal here. */
bool speed_openai_auth_match(const char *header, const char *const *keys, size_t n_keys, size_t *index_p,
                             speed_openai_error_t *err);

#endif /* SPEED_ROUTER_OPENAI_H */
