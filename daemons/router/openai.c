/* OpenAI-compatible request parsing, error objects and response builders. */
#include "openai.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "alloc.h"
#include "log.h"

/* ---- errors ------------------------------------------------------------------------ */

static const struct {
    int http;
    const char *type;
    const char *code;   /* default code, NULL = null */
} error_table[SPEED_OPENAI_ERR_KIND_COUNT] = {
    [SPEED_OPENAI_ERR_INVALID_REQUEST] = {400, "invalid_request_error", NULL},
    [SPEED_OPENAI_ERR_INVALID_API_KEY] = {401, "invalid_request_error", "invalid_api_key"},
    [SPEED_OPENAI_ERR_MODEL_NOT_FOUND] = {404, "invalid_request_error", "model_not_found"},
    [SPEED_OPENAI_ERR_CONTEXT_LENGTH]  = {413, "invalid_request_error",
                                          "context_length_exceeded"},
    [SPEED_OPENAI_ERR_OVERLOADED]      = {429, "requests", "rate_limit_exceeded"},
    [SPEED_OPENAI_ERR_UNAVAILABLE]     = {503, "server_error", "service_unavailable"},
    [SPEED_OPENAI_ERR_INTERNAL]        = {500, "server_error", NULL},
};

static bool kind_valid(speed_openai_error_kind_t kind)
{
    return (int)kind >= 0 && kind < SPEED_OPENAI_ERR_KIND_COUNT;
}

int speed_openai_error_http_status(speed_openai_error_kind_t kind)
{
    return kind_valid(kind) ? error_table[kind].http : 500;
}

const char *speed_openai_error_type(speed_openai_error_kind_t kind)
{
    return kind_valid(kind) ? error_table[kind].type : "server_error";
}

static void copy_trunc(char *dst, size_t cap, const char *src)
{
    if (!src) src = "";
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static void error_setv(speed_openai_error_t *err, speed_openai_error_kind_t kind,
                       const char *param, const char *code, const char *fmt, va_list ap)
{
    if (!err) return;
    err->kind = kind_valid(kind) ? kind : SPEED_OPENAI_ERR_INTERNAL;
    copy_trunc(err->param, sizeof err->param, param);
    copy_trunc(err->code, sizeof err->code, code ? code : error_table[err->kind].code);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
}

void speed_openai_error_set(speed_openai_error_t *err, speed_openai_error_kind_t kind,
                            const char *param, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_setv(err, kind, param, code, fmt, ap);
    va_end(ap);
}

void speed_openai_error_from_status(speed_status_t status, const char *message,
                                    speed_openai_error_t *err)
{
    speed_openai_error_kind_t kind;
    switch (status) {
    case SPEED_ERR_INVALID_ARGUMENT:
    case SPEED_ERR_PARSE:
    case SPEED_ERR_FORMAT:
    case SPEED_ERR_UNSUPPORTED:     kind = SPEED_OPENAI_ERR_INVALID_REQUEST; break;
    case SPEED_ERR_NOT_FOUND:       kind = SPEED_OPENAI_ERR_MODEL_NOT_FOUND; break;
    case SPEED_ERR_TOO_LONG:        kind = SPEED_OPENAI_ERR_CONTEXT_LENGTH; break;
    case SPEED_ERR_CAPACITY:        kind = SPEED_OPENAI_ERR_OVERLOADED; break;
    case SPEED_ERR_TIMEOUT:
    case SPEED_ERR_CANCELLED:
    case SPEED_ERR_NO_MEMORY:
    case SPEED_ERR_PEER_UNREACHABLE:
    case SPEED_ERR_PEER_PROTOCOL:
    case SPEED_ERR_TRANSFER:        kind = SPEED_OPENAI_ERR_UNAVAILABLE; break;
    default:                        kind = SPEED_OPENAI_ERR_INTERNAL; break;
    }
    if (status == SPEED_OK) message = "internal error: no error to report";
    speed_openai_error_set(err, kind, NULL, NULL, "%s",
                           message && message[0] ? message : speed_status_string(status));
}

const char *speed_openai_error_fallback_json(void)
{
    return "{\"error\":{\"message\":\"internal error\",\"type\":\"server_error\","
           "\"param\":null,\"code\":null}}";
}

/* ---- JSON output helpers ----------------------------------------------------------- */

#define DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))

/* Serializes root between prefix and suffix into one speed_malloc'd buffer (so the
 * caller frees with speed_free whatever allocator jansson was given). Steals root. */
static speed_status_t dump_owned(json_t *root, const char *prefix, const char *suffix,
                                 char **out_p, size_t *len_p)
{
    if (!root) return SPEED_ERR_NO_MEMORY;
    size_t np = strlen(prefix), ns = strlen(suffix);
    size_t nj = json_dumpb(root, NULL, 0, DUMP_FLAGS);
    if (nj == 0) {
        json_decref(root);
        return SPEED_ERR_NO_MEMORY;
    }
    char *buf = speed_malloc(np + nj + ns + 1);
    if (!buf) {
        json_decref(root);
        return SPEED_ERR_NO_MEMORY;
    }
    memcpy(buf, prefix, np);
    size_t got = json_dumpb(root, buf + np, nj, DUMP_FLAGS);
    json_decref(root);
    if (got != nj) {   /* the size query and the write disagree: only on OOM inside */
        speed_free(buf);
        return SPEED_ERR_NO_MEMORY;
    }
    memcpy(buf + np + nj, suffix, ns);
    buf[np + nj + ns] = '\0';
    *out_p = buf;
    if (len_p) *len_p = np + nj + ns;
    return SPEED_OK;
}

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return len;
}

static bool utf8_valid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq(u + i, n - i);
        if (!k) return false;
        i += k;
    }
    return true;
}

/* A JSON string of arbitrary bytes: invalid UTF-8 sequences become U+FFFD.
 * NULL only on allocation failure. */
static json_t *json_text(const char *s, size_t n)
{
    if (!s || n == 0) return json_string("");
    if (utf8_valid(s, n)) return json_stringn(s, n);
    char *buf = speed_malloc(n * 3 + 1);
    if (!buf) return NULL;
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq(u + i, n - i);
        if (k) {
            memcpy(buf + o, s + i, k);
            o += k;
            i += k;
        } else {
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += 1;
        }
    }
    json_t *j = json_stringn(buf, o);
    speed_free(buf);
    return j;
}

/* A token's text: as is when valid UTF-8, else "bytes:\xNN..." like OpenAI. */
static json_t *json_token(const char *s, size_t n)
{
    if (!s || n == 0) return json_string("");
    if (utf8_valid(s, n)) return json_stringn(s, n);
    char *buf = speed_malloc(6 + n * 4 + 1);
    if (!buf) return NULL;
    size_t o = 0;
    memcpy(buf, "bytes:", 6);
    o = 6;
    for (size_t i = 0; i < n; i++) {
        snprintf(buf + o, 5, "\\x%02x", (unsigned char)s[i]);
        o += 4;
    }
    json_t *j = json_stringn(buf, o);
    speed_free(buf);
    return j;
}

static json_t *json_bytes(const char *s, size_t n)
{
    json_t *a = json_array();
    if (!a) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (json_array_append_new(a, json_integer((unsigned char)s[i])) != 0) {
            json_decref(a);
            return NULL;
        }
    }
    return a;
}

/* jansson refuses non-finite reals; a -inf logprob is sent as -9999 (as vLLM does). */
static json_t *json_logprob(double lp)
{
    if (!isfinite(lp)) lp = lp > 0 ? 0.0 : -9999.0;
    return json_real(lp);
}

static const char *finish_name(speed_openai_finish_t f)
{
    switch (f) {
    case SPEED_OPENAI_FINISH_STOP:   return "stop";
    case SPEED_OPENAI_FINISH_LENGTH: return "length";
    default:                         return NULL;
    }
}

static json_t *json_finish(speed_openai_finish_t f)
{
    const char *name = finish_name(f);
    return name ? json_string(name) : json_null();
}

static json_t *usage_json(const speed_openai_usage_t *u)
{
    json_t *o = json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)u->prompt_tokens,
                          "completion_tokens", (json_int_t)u->completion_tokens,
                          "total_tokens",
                          (json_int_t)(u->prompt_tokens + u->completion_tokens));
    if (!o) return NULL;
    if (u->kv_bytes >= 0 &&
        json_object_set_new(o, "kv_bytes", json_integer(u->kv_bytes)) != 0) goto fail;
    if (u->kv_full_depth_bytes >= 0 &&
        json_object_set_new(o, "kv_full_depth_bytes", json_integer(u->kv_full_depth_bytes)) != 0)
        goto fail;
    return o;
fail:
    json_decref(o);
    return NULL;
}

/* Chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}. */
static json_t *chat_logprobs_json(const speed_openai_token_logprob_t *lp, size_t n)
{
    json_t *content = json_array();
    if (!content) return NULL;
    for (size_t i = 0; i < n; i++) {
        json_t *top = json_array();
        if (!top) goto fail;
        for (size_t k = 0; k < lp[i].n_top; k++) {
            const speed_openai_top_logprob_t *t = &lp[i].top[k];
            json_t *e = json_pack("{s:o, s:o, s:o}", "token", json_token(t->token, t->token_len),
                                  "logprob", json_logprob(t->logprob), "bytes",
                                  json_bytes(t->token, t->token_len));
            if (json_array_append_new(top, e) != 0) {
                json_decref(top);
                goto fail;
            }
        }
        json_t *e = json_pack("{s:o, s:o, s:o, s:o}", "token",
                              json_token(lp[i].token, lp[i].token_len), "logprob",
                              json_logprob(lp[i].logprob), "bytes",
                              json_bytes(lp[i].token, lp[i].token_len), "top_logprobs", top);
        if (json_array_append_new(content, e) != 0) goto fail;
    }
    return json_pack("{s:o}", "content", content);
fail:
    json_decref(content);
    return NULL;
}

/* Completions format: {tokens, token_logprobs, top_logprobs: [{tok: lp}], text_offset}. */
static json_t *completion_logprobs_json(const speed_openai_token_logprob_t *lp, size_t n,
                                        size_t offset)
{
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(),
           *offs = json_array();
    if (!tokens || !lps || !tops || !offs) goto fail;
    for (size_t i = 0; i < n; i++) {
        if (json_array_append_new(tokens, json_token(lp[i].token, lp[i].token_len)) != 0 ||
            json_array_append_new(lps, json_logprob(lp[i].logprob)) != 0 ||
            json_array_append_new(offs, json_integer((json_int_t)offset)) != 0)
            goto fail;
        offset += lp[i].token_len;
        json_t *d = json_object();
        if (json_array_append_new(tops, d) != 0) goto fail;
        for (size_t k = 0; k < lp[i].n_top; k++) {
            const speed_openai_top_logprob_t *t = &lp[i].top[k];
            json_t *key = json_token(t->token, t->token_len);
            if (!key) goto fail;
            int rc = json_object_setn_new(d, json_string_value(key), json_string_length(key),
                                          json_logprob(t->logprob));
            json_decref(key);
            if (rc != 0) goto fail;
        }
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps,
                     "top_logprobs", tops, "text_offset", offs);
fail:
    json_decref(tokens);
    json_decref(lps);
    json_decref(tops);
    json_decref(offs);
    return NULL;
}

static json_t *logprobs_json(speed_openai_api_t api, bool has,
                             const speed_openai_token_logprob_t *lp, size_t n, size_t offset)
{
    if (!has) return json_null();
    if (n > 0 && !lp) return NULL;
    return api == SPEED_OPENAI_CHAT ? chat_logprobs_json(lp, n)
                                    : completion_logprobs_json(lp, n, offset);
}

speed_status_t speed_openai_response_json(speed_openai_api_t api,
                                          const speed_openai_response_t *r, char **json_p,
                                          size_t *len_p)
{
    if (!r || !json_p || !r->id || !r->model) return SPEED_ERR_INTERNAL;
    json_t *choice;
    json_t *lp = logprobs_json(api, r->has_logprobs, r->logprobs, r->n_logprobs, 0);
    if (api == SPEED_OPENAI_CHAT) {
        choice = json_pack("{s:i, s:{s:s, s:o}, s:o, s:o}", "index", 0, "message", "role",
                           "assistant", "content", json_text(r->text, r->text_len), "logprobs",
                           lp, "finish_reason", json_finish(r->finish));
    } else {
        choice = json_pack("{s:i, s:o, s:o, s:o}", "index", 0, "text",
                           json_text(r->text, r->text_len), "logprobs", lp, "finish_reason",
                           json_finish(r->finish));
    }
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", r->id, "object",
                             api == SPEED_OPENAI_CHAT ? "chat.completion" : "text_completion",
                             "created", (json_int_t)r->created, "model", r->model, "choices",
                             choice);
    if (root && r->usage && json_object_set_new(root, "usage", usage_json(r->usage)) != 0) {
        json_decref(root);
        root = NULL;
    }
    speed_status_t st = dump_owned(root, "", "", json_p, len_p);
    if (st != SPEED_OK) speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, r->id,
                                  "openai: out of memory building a response");
    return st;
}

speed_status_t speed_openai_chunk_sse(speed_openai_api_t api, const speed_openai_chunk_t *c,
                                      char **sse_p, size_t *len_p)
{
    if (!c || !sse_p || !c->id || !c->model) return SPEED_ERR_INTERNAL;
    if (c->kind == SPEED_OPENAI_CHUNK_USAGE && !c->usage) return SPEED_ERR_INTERNAL;
    if (c->kind == SPEED_OPENAI_CHUNK_ROLE && api != SPEED_OPENAI_CHAT) return SPEED_ERR_INTERNAL;
    if ((int)c->kind < 0 || c->kind > SPEED_OPENAI_CHUNK_USAGE) return SPEED_ERR_INTERNAL;
    bool chat = api == SPEED_OPENAI_CHAT;

    json_t *choices;
    if (c->kind == SPEED_OPENAI_CHUNK_USAGE) {
        choices = json_array();
    } else {
        bool content = c->kind == SPEED_OPENAI_CHUNK_CONTENT;
        json_t *lp = content ? logprobs_json(api, c->has_logprobs, c->logprobs, c->n_logprobs,
                                             c->text_offset)
                             : json_null();
        json_t *fin = c->kind == SPEED_OPENAI_CHUNK_FINISH ? json_finish(c->finish) : json_null();
        json_t *choice;
        if (chat) {
            json_t *delta;
            if (c->kind == SPEED_OPENAI_CHUNK_ROLE)
                delta = json_pack("{s:s, s:s}", "role", "assistant", "content", "");
            else if (content)
                delta = json_pack("{s:o}", "content", json_text(c->text, c->text_len));
            else
                delta = json_object();
            choice = json_pack("{s:i, s:o, s:o, s:o}", "index", 0, "delta", delta, "logprobs",
                               lp, "finish_reason", fin);
        } else {
            choice = json_pack("{s:i, s:o, s:o, s:o}", "index", 0, "text",
                               content ? json_text(c->text, c->text_len) : json_string(""),
                               "logprobs", lp, "finish_reason", fin);
        }
        choices = json_pack("[o]", choice);
    }
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", c->id, "object",
                             chat ? "chat.completion.chunk" : "text_completion", "created",
                             (json_int_t)c->created, "model", c->model, "choices", choices);
    if (root) {
        json_t *usage = NULL;
        if (c->kind == SPEED_OPENAI_CHUNK_USAGE) usage = usage_json(c->usage);
        else if (c->include_usage) usage = json_null();
        if ((c->kind == SPEED_OPENAI_CHUNK_USAGE || c->include_usage) &&
            json_object_set_new(root, "usage", usage) != 0) {
            json_decref(root);
            root = NULL;
        }
    }
    speed_status_t st = dump_owned(root, "data: ", "\n\n", sse_p, len_p);
    if (st != SPEED_OK) speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, c->id,
                                  "openai: out of memory building a stream chunk");
    return st;
}

const char *speed_openai_sse_done(size_t *len_p)
{
    static const char done[] = "data: [DONE]\n\n";
    if (len_p) *len_p = sizeof done - 1;
    return done;
}

static json_t *error_object(const speed_openai_error_t *err)
{
    return json_pack("{s:{s:o, s:s, s:o, s:o}}", "error", "message",
                     json_text(err->message, strlen(err->message)), "type",
                     speed_openai_error_type(err->kind), "param",
                     err->param[0] ? json_text(err->param, strlen(err->param)) : json_null(),
                     "code",
                     err->code[0] ? json_text(err->code, strlen(err->code)) : json_null());
}

speed_status_t speed_openai_error_json(const speed_openai_error_t *err, char **json_p,
                                       size_t *len_p)
{
    if (!err || !json_p) return SPEED_ERR_INTERNAL;
    return dump_owned(error_object(err), "", "", json_p, len_p);
}

speed_status_t speed_openai_error_sse(const speed_openai_error_t *err, char **sse_p,
                                      size_t *len_p)
{
    if (!err || !sse_p) return SPEED_ERR_INTERNAL;
    return dump_owned(error_object(err), "data: ", "\n\n", sse_p, len_p);
}

speed_status_t speed_openai_models_json(const char *const *ids, size_t n_ids,
                                        int64_t created, const char *owned_by,
                                        char **json_p, size_t *len_p)
{
    if (!json_p || (n_ids > 0 && !ids)) return SPEED_ERR_INTERNAL;
    json_t *data = json_array();
    if (!data) return SPEED_ERR_NO_MEMORY;
    for (size_t i = 0; i < n_ids; i++) {
        if (!ids[i]) {
            json_decref(data);
            return SPEED_ERR_INTERNAL;
        }
        json_t *m = json_pack("{s:o, s:s, s:I, s:s}", "id", json_text(ids[i], strlen(ids[i])),
                              "object", "model", "created", (json_int_t)created, "owned_by",
                              owned_by ? owned_by : "speedserve");
        if (json_array_append_new(data, m) != 0) {
            json_decref(data);
            return SPEED_ERR_NO_MEMORY;
        }
    }
    return dump_owned(json_pack("{s:s, s:o}", "object", "list", "data", data), "", "", json_p,
                      len_p);
}

/* ---- request parsing --------------------------------------------------------------- */

typedef struct {
    speed_openai_api_t api;
    const speed_openai_parse_params_t *params;
    speed_openai_request_t *req;
    speed_openai_error_t *err;
} parse_ctx_t;

static speed_status_t bad(parse_ctx_t *c, const char *param, const char *code,
                          const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static speed_status_t bad(parse_ctx_t *c, const char *param, const char *code,
                          const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    error_setv(c->err, SPEED_OPENAI_ERR_INVALID_REQUEST, param, code, fmt, ap);
    va_end(ap);
    return SPEED_ERR_INVALID_ARGUMENT;
}

static speed_status_t oom(speed_openai_error_t *err)
{
    speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, NULL, "openai: out of memory parsing a request");
    speed_openai_error_set(err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, NULL,
                           "The server ran out of memory; retry later.");
    return SPEED_ERR_NO_MEMORY;
}

static const char *type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:  return "an object";
    case JSON_ARRAY:   return "an array";
    case JSON_STRING:  return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL:    return "a decimal";
    case JSON_TRUE:
    case JSON_FALSE:   return "a boolean";
    default:           return "null";
    }
}

static speed_status_t bad_type(parse_ctx_t *c, const char *param, const char *expected,
                               const json_t *got)
{
    return bad(c, param, "invalid_type",
               "Invalid type for '%s': expected %s, but got %s instead.", param, expected,
               type_name(got));
}

/* Optional-field getters: a missing key or JSON null leaves *present false. */

static const json_t *field(const json_t *obj, const char *name)
{
    const json_t *v = json_object_get(obj, name);
    return v && !json_is_null(v) ? v : NULL;
}

static speed_status_t get_bool(parse_ctx_t *c, const json_t *obj, const char *name,
                               const char *param, bool *out, bool *present)
{
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_boolean(v)) return bad_type(c, param, "a boolean", v);
    *out = json_is_true(v);
    return SPEED_OK;
}

static speed_status_t int_range(parse_ctx_t *c, const char *param, json_int_t x,
                                int64_t min, int64_t max)
{
    if (x < min)
        return bad(c, param, "integer_below_min_value",
                   "Invalid '%s': integer below minimum value. Expected a value >= %lld, but "
                   "got %lld instead.", param, (long long)min, (long long)x);
    if (x > max)
        return bad(c, param, "integer_above_max_value",
                   "Invalid '%s': integer above maximum value. Expected a value <= %lld, but "
                   "got %lld instead.", param, (long long)max, (long long)x);
    return SPEED_OK;
}

static speed_status_t get_int(parse_ctx_t *c, const json_t *obj, const char *name,
                              int64_t min, int64_t max, int64_t *out, bool *present)
{
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_integer(v)) return bad_type(c, name, "an integer", v);
    json_int_t x = json_integer_value(v);
    SPEED_CHECK(int_range(c, name, x, min, max));
    *out = x;
    return SPEED_OK;
}

static speed_status_t get_number(parse_ctx_t *c, const json_t *obj, const char *name,
                                 double min, bool min_exclusive, double max, double *out,
                                 bool *present)
{
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_number(v)) return bad_type(c, name, "a number", v);
    double x = json_number_value(v);
    if (x < min || (min_exclusive && x == min))
        return bad(c, name, "decimal_below_min_value",
                   "Invalid '%s': decimal below minimum value. Expected a value %s %g, but got "
                   "%g instead.", name, min_exclusive ? ">" : ">=", min, x);
    if (x > max)
        return bad(c, name, "decimal_above_max_value",
                   "Invalid '%s': decimal above maximum value. Expected a value <= %g, but got "
                   "%g instead.", name, max, x);
    *out = x;
    return SPEED_OK;
}

/* Strings cannot hold NUL here (the body is parsed without JSON_ALLOW_NUL). */
static speed_status_t dup_string(parse_ctx_t *c, const json_t *v, char **out, size_t *len_p)
{
    size_t n = json_string_length(v);
    char *s = speed_strndup(json_string_value(v), n);
    if (!s) return oom(c->err);
    *out = s;
    if (len_p) *len_p = n;
    return SPEED_OK;
}

static speed_status_t get_string(parse_ctx_t *c, const json_t *obj, const char *name,
                                 const char *param, char **out, bool *present)
{
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_string(v)) return bad_type(c, param, "a string", v);
    return dup_string(c, v, out, NULL);
}

/* A field accepted only at its neutral value. */
static speed_status_t unsupported(parse_ctx_t *c, const char *param, const char *what)
{
    return bad(c, param, "unsupported_value", "Unsupported value for '%s': %s.", param, what);
}

static speed_status_t parse_role(parse_ctx_t *c, const json_t *v, const char *param,
                                 speed_openai_role_t *role)
{
    if (!v) return bad(c, param, "missing_required_parameter",
                       "Missing required parameter: '%s'.", param);
    if (!json_is_string(v)) return bad_type(c, param, "a string", v);
    static const struct {
        const char *name;
        speed_openai_role_t role;
    } roles[] = {
        {"system", SPEED_OPENAI_ROLE_SYSTEM},     {"developer", SPEED_OPENAI_ROLE_SYSTEM},
        {"user", SPEED_OPENAI_ROLE_USER},         {"assistant", SPEED_OPENAI_ROLE_ASSISTANT},
        {"tool", SPEED_OPENAI_ROLE_TOOL},
    };
    const char *s = json_string_value(v);
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++) {
        if (strcmp(s, roles[i].name) == 0) {
            *role = roles[i].role;
            return SPEED_OK;
        }
    }
    return bad(c, param, "invalid_value",
               "Invalid value for '%s': expected one of 'system', 'user', 'assistant', 'tool'.",
               param);
}

static speed_status_t parse_content(parse_ctx_t *c, size_t i, const json_t *v,
                                    speed_openai_message_t *m)
{
    char param[SPEED_OPENAI_ERROR_PARAM_MAX];
    snprintf(param, sizeof param, "messages[%zu].content", i);
    if (!v) {
        if (m->role == SPEED_OPENAI_ROLE_ASSISTANT) {   /* e.g. a tool_calls message */
            m->content = speed_strdup("");
            return m->content ? SPEED_OK : oom(c->err);
        }
        return bad(c, param, "missing_required_parameter",
                   "Missing required parameter: '%s'.", param);
    }
    if (json_is_string(v)) return dup_string(c, v, &m->content, &m->content_len);
    if (!json_is_array(v)) return bad_type(c, param, "a string or an array of parts", v);

    size_t total = 0, n = json_array_size(v);
    for (size_t k = 0; k < n; k++) {
        const json_t *part = json_array_get(v, k);
        char pp[SPEED_OPENAI_ERROR_PARAM_MAX], tp[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(pp, sizeof pp, "messages[%zu].content[%zu]", i, k);
        if (!json_is_object(part)) return bad_type(c, pp, "an object", part);
        const json_t *type = json_object_get(part, "type");
        snprintf(tp, sizeof tp, "messages[%zu].content[%zu].type", i, k);
        if (!type) return bad(c, tp, "missing_required_parameter",
                              "Missing required parameter: '%s'.", tp);
        if (!json_is_string(type)) return bad_type(c, tp, "a string", type);
        if (strcmp(json_string_value(type), "text") != 0)
            return unsupported(c, tp, "only 'text' content parts are supported");
        const json_t *text = json_object_get(part, "text");
        snprintf(tp, sizeof tp, "messages[%zu].content[%zu].text", i, k);
        if (!text) return bad(c, tp, "missing_required_parameter",
                              "Missing required parameter: '%s'.", tp);
        if (!json_is_string(text)) return bad_type(c, tp, "a string", text);
        total += json_string_length(text) + (k > 0);
    }
    char *s = speed_malloc(total + 1);
    if (!s) return oom(c->err);
    size_t o = 0;
    for (size_t k = 0; k < n; k++) {
        const json_t *text = json_object_get(json_array_get(v, k), "text");
        if (k > 0) s[o++] = '\n';
        memcpy(s + o, json_string_value(text), json_string_length(text));
        o += json_string_length(text);
    }
    s[o] = '\0';
    m->content = s;
    m->content_len = o;
    return SPEED_OK;
}

static speed_status_t parse_messages(parse_ctx_t *c, const json_t *root)
{
    const json_t *v = json_object_get(root, "messages");
    if (!v || json_is_null(v))
        return bad(c, "messages", "missing_required_parameter",
                   "Missing required parameter: 'messages'.");
    if (!json_is_array(v)) return bad_type(c, "messages", "an array", v);
    size_t n = json_array_size(v);
    if (n == 0)
        return bad(c, "messages", "empty_array",
                   "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                   "but got an empty array instead.");
    speed_openai_request_t *r = c->req;
    r->messages = speed_calloc(n, sizeof *r->messages);
    if (!r->messages) return oom(c->err);
    for (size_t i = 0; i < n; i++) {
        const json_t *mj = json_array_get(v, i);
        char param[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(mj)) return bad_type(c, param, "an object", mj);
        speed_openai_message_t *m = &r->messages[i];
        r->n_messages = i + 1;   /* destroy frees what this message got so far */
        snprintf(param, sizeof param, "messages[%zu].role", i);
        SPEED_CHECK(parse_role(c, json_object_get(mj, "role"), param, &m->role));
        SPEED_CHECK(parse_content(c, i, field(mj, "content"), m));
        snprintf(param, sizeof param, "messages[%zu].name", i);
        SPEED_CHECK(get_string(c, mj, "name", param, &m->name, NULL));
        snprintf(param, sizeof param, "messages[%zu].tool_call_id", i);
        SPEED_CHECK(get_string(c, mj, "tool_call_id", param, &m->tool_call_id, NULL));
    }
    return SPEED_OK;
}

static speed_status_t token_id(parse_ctx_t *c, const json_t *v, const char *param,
                               int32_t *out)
{
    if (!json_is_integer(v)) return bad_type(c, param, "an integer token id", v);
    int64_t max = c->params->vocab_size > 0 ? c->params->vocab_size - 1 : INT32_MAX;
    SPEED_CHECK(int_range(c, param, json_integer_value(v), 0, max));
    *out = (int32_t)json_integer_value(v);
    return SPEED_OK;
}

static speed_status_t parse_prompt_ids(parse_ctx_t *c, const json_t *arr, const char *param)
{
    speed_openai_request_t *r = c->req;
    size_t n = json_array_size(arr);
    if (n == 0)
        return bad(c, param, "empty_array",
                   "Invalid '%s': empty array. Expected at least one token id.", param);
    for (size_t i = 0; i < n; i++) {   /* validate before allocating */
        char p[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(p, sizeof p, "%s[%zu]", param, i);
        int32_t id;
        SPEED_CHECK(token_id(c, json_array_get(arr, i), p, &id));
    }
    r->prompt_ids = speed_malloc(n * sizeof *r->prompt_ids);
    if (!r->prompt_ids) return oom(c->err);
    for (size_t i = 0; i < n; i++) r->prompt_ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    r->n_prompt_ids = n;
    return SPEED_OK;
}

static speed_status_t parse_prompt(parse_ctx_t *c, const json_t *root)
{
    const json_t *v = json_object_get(root, "prompt");
    if (!v || json_is_null(v))
        return bad(c, "prompt", "missing_required_parameter",
                   "Missing required parameter: 'prompt'.");
    if (json_is_string(v)) return dup_string(c, v, &c->req->prompt, &c->req->prompt_len);
    if (!json_is_array(v))
        return bad_type(c, "prompt", "a string, an array of strings or an array of token ids",
                        v);
    size_t n = json_array_size(v);
    if (n == 0)
        return bad(c, "prompt", "empty_array",
                   "Invalid 'prompt': empty array. Expected an array with minimum length 1, but "
                   "got an empty array instead.");
    const json_t *first = json_array_get(v, 0);
    if (json_is_string(first) || json_is_array(first)) {   /* a batch of prompts */
        for (size_t i = 0; i < n; i++) {
            const json_t *e = json_array_get(v, i);
            char p[SPEED_OPENAI_ERROR_PARAM_MAX];
            snprintf(p, sizeof p, "prompt[%zu]", i);
            if (json_typeof(e) != json_typeof(first))
                return bad_type(c, p, json_is_string(first) ? "a string" : "an array", e);
        }
        if (n != 1)
            return unsupported(c, "prompt", "only one prompt per request is supported (n = 1)");
        if (json_is_string(first))
            return dup_string(c, first, &c->req->prompt, &c->req->prompt_len);
        return parse_prompt_ids(c, first, "prompt[0]");
    }
    return parse_prompt_ids(c, v, "prompt");
}

static speed_status_t parse_stop(parse_ctx_t *c, const json_t *root)
{
    const json_t *v = field(root, "stop");
    if (!v) return SPEED_OK;
    speed_openai_request_t *r = c->req;
    if (json_is_string(v)) {
        if (json_string_length(v) == 0)
            return bad(c, "stop", "invalid_value", "Invalid 'stop': empty string.");
        SPEED_CHECK(dup_string(c, v, &r->stop[0], NULL));
        r->n_stop = 1;
        return SPEED_OK;
    }
    if (!json_is_array(v)) return bad_type(c, "stop", "a string or an array of strings", v);
    size_t n = json_array_size(v);
    if (n > SPEED_OPENAI_MAX_STOP)
        return bad(c, "stop", "array_above_max_length",
                   "Invalid 'stop': array too long. Expected an array with maximum length %d, "
                   "but got an array with length %zu instead.", SPEED_OPENAI_MAX_STOP, n);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(v, i);
        char p[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(p, sizeof p, "stop[%zu]", i);
        if (!json_is_string(e)) return bad_type(c, p, "a string", e);
        if (json_string_length(e) == 0)
            return bad(c, p, "invalid_value", "Invalid '%s': empty string.", p);
        SPEED_CHECK(dup_string(c, e, &r->stop[i], NULL));
        r->n_stop = i + 1;
    }
    return SPEED_OK;
}

static speed_status_t parse_speed(parse_ctx_t *c, const json_t *root)
{
    const json_t *v = field(root, "speed");
    if (!v) return SPEED_OK;
    if (!json_is_object(v)) return bad_type(c, "speed", "an object", v);
    if (!c->params->allow_speed)
        return bad(c, "speed", "unsupported_parameter",
                   "Unsupported parameter: 'speed'. This deployment does not allow per-request "
                   "SPEED settings (prefill_layers, anchors, tail); remove the object.");
    speed_openai_speed_t *s = &c->req->speed;
    s->present = true;
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)v, key, val) {
        char p[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(p, sizeof p, "speed.%s", key);
        if (json_is_null(val)) continue;
        if (strcmp(key, "prefill_layers") == 0) {
            if (json_is_integer(val)) {
                int64_t max = c->params->n_layers > 0 ? c->params->n_layers : INT32_MAX;
                SPEED_CHECK(int_range(c, p, json_integer_value(val), 1, max));
                s->prefill_layers = (int32_t)json_integer_value(val);
            } else if (json_is_real(val)) {
                double f = json_real_value(val);
                if (!(f > 0.0 && f <= 1.0))
                    return bad(c, p, "invalid_value",
                               "Invalid '%s': a fraction must be in (0, 1], got %g; give a "
                               "layer count as an integer.", p, f);
                s->prefill_fraction = f;
            } else {
                return bad_type(c, p, "an integer layer count or a fraction", val);
            }
        } else if (strcmp(key, "anchors") == 0 || strcmp(key, "tail") == 0) {
            bool tail = key[0] == 't';
            if (!json_is_integer(val)) return bad_type(c, p, "an integer", val);
            SPEED_CHECK(int_range(c, p, json_integer_value(val), tail ? 1 : 0, INT32_MAX));
            *(tail ? &s->tail : &s->anchors) = (int32_t)json_integer_value(val);
        } else {
            return bad(c, p, "unknown_parameter",
                       "Unknown parameter: '%s'. The speed object takes prefill_layers, "
                       "anchors and tail.", p);
        }
    }
    return SPEED_OK;
}

/* A strict JSON syntax check that allocates nothing, with jansson's rules (UTF-8, no
 * raw control characters, no \u0000, paired surrogates, depth limit, one value then
 * only whitespace). jansson does not always report an allocation failure as such (a
 * failed key copy reads as "string expected"): when jansson fails on a body this check
 * accepts, the failure was memory, not the client. */
#define SYNTAX_MAX_DEPTH 2000   /* below jansson's JSON_PARSER_MAX_DEPTH (2048) */

typedef struct {
    const unsigned char *p, *end;
} syn_t;

static void syn_ws(syn_t *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int syn_hex4(syn_t *s)
{
    if (s->end - s->p < 4) return -1;
    int v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = s->p[i];
        int d = c >= '0' && c <= '9' ? c - '0'
              : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    s->p += 4;
    return v;
}

static bool syn_string(syn_t *s)
{
    s->p++;   /* opening quote */
    while (s->p < s->end) {
        unsigned char c = *s->p;
        if (c == '"') {
            s->p++;
            return true;
        }
        if (c < 0x20) return false;
        if (c == '\\') {
            if (++s->p >= s->end) return false;
            c = *s->p++;
            if (c == 'u') {
                int u = syn_hex4(s);
                if (u <= 0 || (u >= 0xDC00 && u <= 0xDFFF)) return false;   /* NUL, lone low */
                if (u >= 0xD800 && u <= 0xDBFF) {
                    if (s->end - s->p < 2 || s->p[0] != '\\' || s->p[1] != 'u') return false;
                    s->p += 2;
                    int lo = syn_hex4(s);
                    if (lo < 0xDC00 || lo > 0xDFFF) return false;
                }
            } else if (!strchr("\"\\/bfnrt", c) || c == '\0') {
                return false;
            }
            continue;
        }
        size_t k = utf8_seq(s->p, (size_t)(s->end - s->p));
        if (!k) return false;
        s->p += k;
    }
    return false;
}

static bool syn_digits(syn_t *s)
{
    const unsigned char *start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    return s->p > start;
}

static bool syn_number(syn_t *s)
{
    if (*s->p == '-') s->p++;
    if (s->p < s->end && *s->p == '0') s->p++;
    else if (!syn_digits(s)) return false;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!syn_digits(s)) return false;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) s->p++;
        if (!syn_digits(s)) return false;
    }
    return true;
}

static bool syn_word(syn_t *s, const char *w)
{
    size_t n = strlen(w);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, w, n) != 0) return false;
    s->p += n;
    return true;
}

static bool syn_value(syn_t *s, int depth)
{
    syn_ws(s);
    if (s->p >= s->end) return false;
    unsigned char c = *s->p;
    if (c == '"') return syn_string(s);
    if (c == '-' || (c >= '0' && c <= '9')) return syn_number(s);
    if (c == 't') return syn_word(s, "true");
    if (c == 'f') return syn_word(s, "false");
    if (c == 'n') return syn_word(s, "null");
    if (c != '[' && c != '{') return false;
    if (depth >= SYNTAX_MAX_DEPTH) return false;
    unsigned char close = c == '[' ? ']' : '}';
    s->p++;
    syn_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return true;
    }
    for (;;) {
        if (close == '}') {
            syn_ws(s);
            if (s->p >= s->end || *s->p != '"' || !syn_string(s)) return false;
            syn_ws(s);
            if (s->p >= s->end || *s->p != ':') return false;
            s->p++;
        }
        if (!syn_value(s, depth + 1)) return false;
        syn_ws(s);
        if (s->p >= s->end) return false;
        if (*s->p == close) {
            s->p++;
            return true;
        }
        if (*s->p != ',') return false;
        s->p++;
    }
}

static bool json_syntax_ok(const char *body, size_t len)
{
    syn_t s = {(const unsigned char *)body, (const unsigned char *)body + len};
    if (!syn_value(&s, 0)) return false;
    syn_ws(&s);
    return s.p == s.end;
}

/* Which known numeric field holds a number jansson could not store as an integer.
 * Only on the error path: re-reads the body with integers as reals. */
static speed_status_t diagnose_overflow(parse_ctx_t *c, const char *body, size_t len,
                                        const json_error_t *jerr)
{
    static const char *const fields[] = {
        "max_tokens", "max_completion_tokens", "seed", "top_k", "n", "logprobs",
        "top_logprobs", "best_of", "temperature", "top_p", "presence_penalty",
        "frequency_penalty",
    };
    json_error_t e2;
    memset(&e2, 0, sizeof e2);
    json_t *root = json_loadb(body, len, JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, &e2);
    /* the body was read once already, so only a real overflow (1e400) is the client's */
    if (!root && json_error_code(&e2) != json_error_numeric_overflow) return oom(c->err);
    const char *param = NULL;
    double x = 0;
    if (json_is_object(root)) {
        for (size_t i = 0; i < sizeof fields / sizeof fields[0] && !param; i++) {
            const json_t *v = json_object_get(root, fields[i]);
            if (json_is_real(v) && fabs(json_real_value(v)) >= 9.2e18) {
                param = fields[i];
                x = json_real_value(v);
            }
        }
        const json_t *p = json_object_get(root, "prompt");
        if (!param && json_is_array(p)) {
            if (json_is_array(json_array_get(p, 0))) p = json_array_get(p, 0);
            for (size_t i = 0; i < json_array_size(p) && !param; i++) {
                const json_t *v = json_array_get(p, i);
                if (json_is_real(v) && fabs(json_real_value(v)) >= 9.2e18) {
                    param = "prompt";
                    x = json_real_value(v);
                }
            }
        }
    }
    json_decref(root);
    if (param)
        return bad(c, param, x > 0 ? "integer_above_max_value" : "integer_below_min_value",
                   "Invalid '%s': number out of range (%g); integers must fit in 64 bits.",
                   param, x);
    return bad(c, NULL, NULL,
               "We could not parse the JSON body of your request: %s (line %d, column %d).",
               jerr->text, jerr->line, jerr->column);
}

static speed_status_t parse_root(parse_ctx_t *c, const json_t *root)
{
    speed_openai_request_t *r = c->req;
    bool chat = c->api == SPEED_OPENAI_CHAT;
    bool present;

    const json_t *model = json_object_get(root, "model");
    if (!model || json_is_null(model))
        return bad(c, "model", "missing_required_parameter",
                   "Missing required parameter: 'model'.");
    if (!json_is_string(model)) return bad_type(c, "model", "a string", model);
    if (json_string_length(model) == 0)
        return bad(c, "model", "invalid_value", "Invalid 'model': empty string.");
    SPEED_CHECK(dup_string(c, model, &r->model, NULL));

    if (chat) SPEED_CHECK(parse_messages(c, root));
    else SPEED_CHECK(parse_prompt(c, root));

    SPEED_CHECK(get_bool(c, root, "stream", "stream", &r->stream, NULL));
    const json_t *so = field(root, "stream_options");
    if (so) {
        if (!json_is_object(so)) return bad_type(c, "stream_options", "an object", so);
        if (!r->stream)
            return bad(c, "stream_options", "invalid_value",
                       "Invalid value for 'stream_options': only allowed when 'stream' is "
                       "true.");
        SPEED_CHECK(get_bool(c, so, "include_usage", "stream_options.include_usage",
                             &r->include_usage, NULL));
    }

    int64_t max = c->params->max_tokens_limit > 0 ? c->params->max_tokens_limit : INT32_MAX;
    SPEED_CHECK(get_int(c, root, "max_tokens", 1, max, &r->max_tokens, NULL));
    if (chat) SPEED_CHECK(get_int(c, root, "max_completion_tokens", 1, max, &r->max_tokens, NULL));

    SPEED_CHECK(get_number(c, root, "temperature", 0.0, false, 2.0, &r->temperature, NULL));
    SPEED_CHECK(get_number(c, root, "top_p", 0.0, true, 1.0, &r->top_p, NULL));
    int64_t x = 0;
    SPEED_CHECK(get_int(c, root, "top_k", 0, INT32_MAX, &x, &present));
    if (present) r->top_k = (int32_t)x;
    SPEED_CHECK(get_int(c, root, "seed", INT64_MIN, INT64_MAX, &r->seed, &r->has_seed));
    SPEED_CHECK(parse_stop(c, root));

    if (chat) {
        SPEED_CHECK(get_bool(c, root, "logprobs", "logprobs", &r->logprobs, NULL));
        SPEED_CHECK(get_int(c, root, "top_logprobs", 0, SPEED_OPENAI_MAX_TOP_LOGPROBS, &x,
                            &present));
        if (present) {
            if (!r->logprobs)
                return bad(c, "top_logprobs", "invalid_value",
                           "Invalid value for 'top_logprobs': 'logprobs' must be true when "
                           "'top_logprobs' is given.");
            r->top_logprobs = (int32_t)x;
        }
    } else {
        SPEED_CHECK(get_int(c, root, "logprobs", 0, SPEED_OPENAI_MAX_TOP_LOGPROBS, &x,
                            &present));
        if (present) {
            r->logprobs = true;
            r->top_logprobs = (int32_t)x;
        }
        bool echo = false;
        SPEED_CHECK(get_bool(c, root, "echo", "echo", &echo, NULL));
        if (echo) return unsupported(c, "echo", "echoing the prompt is not supported");
        SPEED_CHECK(get_int(c, root, "best_of", 1, INT32_MAX, &x, &present));
        if (present && x != 1) return unsupported(c, "best_of", "only best_of = 1 is supported");
        const json_t *suffix = field(root, "suffix");
        if (suffix && !json_is_string(suffix)) return bad_type(c, "suffix", "a string", suffix);
        if (suffix && json_string_length(suffix) > 0)
            return unsupported(c, "suffix", "suffixes (insertion) are not supported");
    }

    SPEED_CHECK(get_int(c, root, "n", 1, INT32_MAX, &x, &present));
    if (present && x != 1) return unsupported(c, "n", "only n = 1 is supported");

    static const char *const penalties[] = {"presence_penalty", "frequency_penalty"};
    for (size_t i = 0; i < 2; i++) {
        double p = 0;
        SPEED_CHECK(get_number(c, root, penalties[i], -2.0, false, 2.0, &p, NULL));
        if (p != 0.0) return unsupported(c, penalties[i], "only 0 is supported");
    }
    const json_t *bias = field(root, "logit_bias");
    if (bias && !json_is_object(bias)) return bad_type(c, "logit_bias", "an object", bias);
    if (bias && json_object_size(bias) > 0)
        return unsupported(c, "logit_bias", "logit biases are not supported");

    SPEED_CHECK(get_string(c, root, "user", "user", &r->user, NULL));
    return parse_speed(c, root);
}

speed_openai_parse_params_t speed_openai_default_parse_params(void)
{
    speed_openai_parse_params_t p = {0};
    return p;
}

speed_status_t speed_openai_request_parse(speed_openai_api_t api, const char *body,
                                          size_t len,
                                          const speed_openai_parse_params_t *params,
                                          speed_openai_request_t **req_p,
                                          speed_openai_error_t *err)
{
    if ((!body && len > 0) || !req_p ||
        (api != SPEED_OPENAI_CHAT && api != SPEED_OPENAI_COMPLETIONS)) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL,
                               "internal error: bad arguments to the request parser");
        return SPEED_ERR_INTERNAL;
    }
    speed_openai_parse_params_t defaults = speed_openai_default_parse_params();
    parse_ctx_t c = {api, params ? params : &defaults, NULL, err};

    /* jansson does not reset the error code when it fails without a message (a failed
     * allocation): start from "unknown" rather than stack garbage. */
    json_error_t jerr;
    memset(&jerr, 0, sizeof jerr);
    json_t *root = json_loadb(body ? body : "", len, JSON_DECODE_ANY, &jerr);
    if (!root) {
        enum json_error_code code = json_error_code(&jerr);
        if (code == json_error_numeric_overflow) return diagnose_overflow(&c, body, len, &jerr);
        if (code == json_error_out_of_memory || json_syntax_ok(body, len)) return oom(err);
        return bad(&c, NULL, NULL,
                   "We could not parse the JSON body of your request: %s (line %d, column %d).",
                   jerr.text, jerr.line, jerr.column);
    }
    if (!json_is_object(root)) {
        speed_status_t st = bad(&c, NULL, NULL,
                                "The request body must be a JSON object, got %s.",
                                type_name(root));
        json_decref(root);
        return st;
    }
    speed_openai_request_t *r = speed_calloc(1, sizeof *r);
    if (!r) {
        json_decref(root);
        return oom(err);
    }
    r->api = api;
    r->max_tokens = -1;
    r->temperature = 1.0;
    r->top_p = 1.0;
    r->n = 1;
    r->speed.anchors = -1;
    r->speed.tail = -1;
    c.req = r;
    speed_status_t st = parse_root(&c, root);
    json_decref(root);
    if (st != SPEED_OK) {
        speed_openai_request_destroy(r);
        return st;
    }
    *req_p = r;
    return SPEED_OK;
}

void speed_openai_request_destroy(speed_openai_request_t *req)
{
    if (!req) return;
    speed_free(req->model);
    for (size_t i = 0; i < req->n_messages; i++) {
        speed_free(req->messages[i].content);
        speed_free(req->messages[i].name);
        speed_free(req->messages[i].tool_call_id);
    }
    speed_free(req->messages);
    speed_free(req->prompt);
    speed_free(req->prompt_ids);
    for (size_t i = 0; i < req->n_stop; i++) speed_free(req->stop[i]);
    speed_free(req->user);
    speed_free(req);
}

const char *speed_openai_role_name(speed_openai_role_t role)
{
    switch (role) {
    case SPEED_OPENAI_ROLE_SYSTEM:    return "system";
    case SPEED_OPENAI_ROLE_USER:      return "user";
    case SPEED_OPENAI_ROLE_ASSISTANT: return "assistant";
    case SPEED_OPENAI_ROLE_TOOL:      return "tool";
    default:                          return "unknown";
    }
}

int32_t speed_openai_speed_prefill_layers(const speed_openai_speed_t *s, int32_t n_layers,
                                          int32_t deflt)
{
    if (!s || !s->present) return deflt;
    if (s->prefill_layers > 0) return s->prefill_layers < n_layers ? s->prefill_layers : n_layers;
    if (s->prefill_fraction > 0) {
        int32_t c = (int32_t)lround(s->prefill_fraction * n_layers);
        if (c < 1) c = 1;
        return c < n_layers ? c : n_layers;
    }
    return deflt;
}

/* ---- checks after parsing ---------------------------------------------------------- */

speed_status_t speed_openai_check_model(const speed_openai_request_t *req,
                                        const char *const *models, size_t n_models,
                                        speed_openai_error_t *err)
{
    if (req && req->model) {
        for (size_t i = 0; i < n_models; i++)
            if (models && models[i] && strcmp(models[i], req->model) == 0) return SPEED_OK;
    }
    speed_openai_error_set(err, SPEED_OPENAI_ERR_MODEL_NOT_FOUND, "model", "model_not_found",
                           "The model '%.200s' does not exist or you do not have access to it.",
                           req && req->model ? req->model : "");
    return SPEED_ERR_NOT_FOUND;
}

speed_status_t speed_openai_check_length(const speed_openai_request_t *req, int64_t n_prompt,
                                         int64_t n_ctx, int64_t *max_tokens_p,
                                         speed_openai_error_t *err)
{
    const char *param = req && req->api == SPEED_OPENAI_CHAT ? "messages" : "prompt";
    const char *what = req && req->api == SPEED_OPENAI_CHAT ? "messages" : "prompt";
    if (!req || n_prompt >= n_ctx) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_CONTEXT_LENGTH, param,
                               "context_length_exceeded",
                               "This model's maximum context length is %lld tokens. However, "
                               "your %s resulted in %lld tokens, leaving no room for the "
                               "completion.", (long long)n_ctx, what, (long long)n_prompt);
        return SPEED_ERR_TOO_LONG;
    }
    if (req->max_tokens > 0 && n_prompt + req->max_tokens > n_ctx) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_CONTEXT_LENGTH, param,
                               "context_length_exceeded",
                               "This model's maximum context length is %lld tokens. However, "
                               "you requested %lld tokens (%lld in the %s, %lld in the "
                               "completion). Please reduce the length of the %s or the "
                               "completion.", (long long)n_ctx,
                               (long long)(n_prompt + req->max_tokens), (long long)n_prompt,
                               what, (long long)req->max_tokens, what);
        return SPEED_ERR_TOO_LONG;
    }
    if (max_tokens_p) *max_tokens_p = req->max_tokens > 0 ? req->max_tokens : n_ctx - n_prompt;
    return SPEED_OK;
}

speed_status_t speed_openai_request_tokenize(const speed_openai_request_t *req,
                                             const speed_tok_t *tok, speed_tok_ids_t *ids,
                                             speed_openai_error_t *err)
{
    if (!req || !tok || !ids) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL,
                               "internal error: bad arguments to tokenize");
        return SPEED_ERR_INTERNAL;
    }
    if (req->api == SPEED_OPENAI_COMPLETIONS && req->prompt_ids) {
        int32_t vocab = speed_tok_vocab_size(tok);
        for (size_t i = 0; i < req->n_prompt_ids; i++) {
            if (req->prompt_ids[i] >= vocab) {
                speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_REQUEST, "prompt",
                                       "invalid_value",
                                       "Invalid 'prompt': token id %d at index %zu is outside "
                                       "the vocabulary (size %d).", req->prompt_ids[i], i,
                                       vocab);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
        size_t need = ids->n + req->n_prompt_ids;
        if (need > ids->cap) {
            int32_t *p = speed_realloc(ids->ids, need * sizeof *p);
            if (!p) return oom(err);
            ids->ids = p;
            ids->cap = need;
        }
        memcpy(ids->ids + ids->n, req->prompt_ids, req->n_prompt_ids * sizeof *ids->ids);
        ids->n = need;
        return SPEED_OK;
    }

    speed_status_t st;
    const char *param;
    if (req->api == SPEED_OPENAI_COMPLETIONS) {
        param = "prompt";
        st = speed_tok_encode(tok, req->prompt ? req->prompt : "", req->prompt_len, true, ids);
    } else {
        param = "messages";
        speed_chat_message_t *msgs = speed_malloc(req->n_messages * sizeof *msgs + 1);
        if (!msgs) return oom(err);
        for (size_t i = 0; i < req->n_messages; i++) {
            msgs[i].role = speed_openai_role_name(req->messages[i].role);
            msgs[i].content = req->messages[i].content;
        }
        char *text = NULL;
        st = speed_tok_chat_render(tok, msgs, req->n_messages, true, &text);
        speed_free(msgs);
        if (st == SPEED_OK) {
            st = speed_tok_encode(tok, text, strlen(text), false, ids);
            speed_free(text);
        }
    }
    switch (st) {
    case SPEED_OK:
        return SPEED_OK;
    case SPEED_ERR_NO_MEMORY:
        return oom(err);
    case SPEED_ERR_INVALID_ARGUMENT:
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_REQUEST, param, "invalid_value",
                               "Invalid '%s': %s", param, speed_log_last_error());
        return st;
    default:
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL,
                               "The server cannot tokenize this request: %s",
                               speed_log_last_error());
        return st;
    }
}

/* ---- authentication ---------------------------------------------------------------- */

/* Compares without branching on content: the loop runs over the presented key's length
 * whatever the configured key holds. */
static unsigned key_differs(const unsigned char *a, size_t na, const char *key)
{
    size_t nk = strlen(key);
    volatile unsigned diff = na != nk;
    for (size_t i = 0; i < na; i++) {
        unsigned char kc = i < nk ? (unsigned char)key[i] : 0;
        diff |= (unsigned)(a[i] ^ kc);
    }
    return diff;
}

bool speed_openai_auth_check(const char *header, const char *const *keys, size_t n_keys,
                             speed_openai_error_t *err)
{
    if (n_keys == 0) return true;
    const char *p = header;
    if (p) {
        while (*p == ' ' || *p == '\t') p++;
        if (strncasecmp(p, "Bearer", 6) == 0 && (p[6] == ' ' || p[6] == '\t')) {
            p += 6;
            while (*p == ' ' || *p == '\t') p++;
        } else {
            p = NULL;
        }
    }
    size_t n = p ? strlen(p) : 0;
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t')) n--;
    if (!p || n == 0) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_API_KEY, NULL, "",
                               "You didn't provide an API key. You need to provide your API "
                               "key in an Authorization header using Bearer auth (i.e. "
                               "Authorization: Bearer YOUR_KEY).");
        return false;
    }
    unsigned match = 0;
    for (size_t i = 0; i < n_keys; i++)
        if (keys && keys[i]) match |= key_differs((const unsigned char *)p, n, keys[i]) == 0;
    if (match) return true;
    speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_API_KEY, NULL, "invalid_api_key",
                           "Incorrect API key provided.");
    return false;
}
