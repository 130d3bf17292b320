/* OpenAI response bodies: chat.completion / text_completion objects, streaming chunks as SSE
 * events, usage, logprobs in each API's format, error objects (as a body or an SSE event) and
 * the /v1/models list. Everything is compact JSON in one speed_malloc'd buffer. */
#include "openai.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "alloc.h"
#include "json_strict.h"
#include "log.h"

/* ---- JSON output helpers ----------------------------------------------------------- */

#define DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))

/* Serializes root between prefix and suffix into one speed_malloc'd buffer (so the
 * caller frees with speed_free whatever allocator jansson was given). Steals root. */
static speed_status_t dump_owned(json_t *root, const char *prefix, const char *suffix, char **out_p, size_t *len_p) {
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
    if (got != nj) { /* the size query and the write disagree: only on OOM inside */
        speed_free(buf);
        return SPEED_ERR_NO_MEMORY;
    }
    memcpy(buf + np + nj, suffix, ns);
    buf[np + nj + ns] = '\0';
    *out_p = buf;
    if (len_p) *len_p = np + nj + ns;
    return SPEED_OK;
}

/* Well-formed UTF-8 by the rule jansson applies to strings (json_strict.h). */
static bool utf8_valid(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = speed_json_strict_utf8_len(u + i, n - i);
        if (!k) return false;
        i += k;
    }
    return true;
}

/* A JSON string of arbitrary bytes: invalid UTF-8 sequences become U+FFFD.
 * NULL only on allocation failure. */
static json_t *json_text(const char *s, size_t n) {
    if (!s || n == 0) return json_string("");
    if (utf8_valid(s, n)) return json_stringn(s, n);
    char *buf = speed_malloc(n * 3 + 1);
    if (!buf) return NULL;
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = speed_json_strict_utf8_len(u + i, n - i);
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
static json_t *json_token(const char *s, size_t n) {
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

static json_t *json_bytes(const char *s, size_t n) {
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
static json_t *json_logprob(double lp) {
    if (!isfinite(lp)) lp = lp > 0 ? 0.0 : -9999.0;
    return json_real(lp);
}

static const char *finish_name(speed_openai_finish_t f) {
    switch (f) {
    case SPEED_OPENAI_FINISH_STOP: return "stop";
    case SPEED_OPENAI_FINISH_LENGTH: return "length";
    default: return NULL;
    }
}

static json_t *json_finish(speed_openai_finish_t f) {
    const char *name = finish_name(f);
    return name ? json_string(name) : json_null();
}

static json_t *usage_json(const speed_openai_usage_t *u) {
    json_t *o = json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)u->prompt_tokens, "completion_tokens",
                          (json_int_t)u->completion_tokens, "total_tokens",
                          (json_int_t)(u->prompt_tokens + u->completion_tokens));
    if (!o) return NULL;
    if (u->kv_bytes >= 0 && json_object_set_new(o, "kv_bytes", json_integer(u->kv_bytes)) != 0) goto fail;
    if (u->kv_full_depth_bytes >= 0 &&
        json_object_set_new(o, "kv_full_depth_bytes", json_integer(u->kv_full_depth_bytes)) != 0)
        goto fail;
    return o;
fail:
    json_decref(o);
    return NULL;
}

/* Chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}. */
static json_t *chat_logprobs_json(const speed_openai_token_logprob_t *lp, size_t n) {
    json_t *content = json_array();
    if (!content) return NULL;
    for (size_t i = 0; i < n; i++) {
        json_t *top = json_array();
        if (!top) goto fail;
        for (size_t k = 0; k < lp[i].n_top; k++) {
            const speed_openai_top_logprob_t *t = &lp[i].top[k];
            json_t *e = json_pack("{s:o, s:o, s:o}", "token", json_token(t->token, t->token_len), "logprob",
                                  json_logprob(t->logprob), "bytes", json_bytes(t->token, t->token_len));
            if (json_array_append_new(top, e) != 0) {
                json_decref(top);
                goto fail;
            }
        }
        json_t *e = json_pack("{s:o, s:o, s:o, s:o}", "token", json_token(lp[i].token, lp[i].token_len), "logprob",
                              json_logprob(lp[i].logprob), "bytes", json_bytes(lp[i].token, lp[i].token_len),
                              "top_logprobs", top);
        if (json_array_append_new(content, e) != 0) goto fail;
    }
    return json_pack("{s:o}", "content", content);
fail:
    json_decref(content);
    return NULL;
}

/* Completions format: {tokens, token_logprobs, top_logprobs: [{tok: lp}], text_offset}. */
static json_t *completion_logprobs_json(const speed_openai_token_logprob_t *lp, size_t n, size_t offset) {
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
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
            int rc = json_object_setn_new(d, json_string_value(key), json_string_length(key), json_logprob(t->logprob));
            json_decref(key);
            if (rc != 0) goto fail;
        }
    }
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps, "top_logprobs", tops,
                     "text_offset", offs);
fail:
    json_decref(tokens);
    json_decref(lps);
    json_decref(tops);
    json_decref(offs);
    return NULL;
}

static json_t *logprobs_json(speed_openai_api_t api, bool has, const speed_openai_token_logprob_t *lp, size_t n,
                             size_t offset) {
    if (!has) return json_null();
    if (n > 0 && !lp) return NULL;
    return api == SPEED_OPENAI_CHAT ? chat_logprobs_json(lp, n) : completion_logprobs_json(lp, n, offset);
}

speed_status_t speed_openai_response_json(speed_openai_api_t api, const speed_openai_response_t *r, char **json_p,
                                          size_t *len_p) {
    if (!r || !json_p || !r->id || !r->model) return SPEED_ERR_INTERNAL;
    json_t *choice;
    json_t *lp = logprobs_json(api, r->has_logprobs, r->logprobs, r->n_logprobs, 0);
    if (api == SPEED_OPENAI_CHAT) {
        choice = json_pack("{s:i, s:{s:s, s:o}, s:o, s:o}", "index", 0, "message", "role", "assistant", "content",
                           json_text(r->text, r->text_len), "logprobs", lp, "finish_reason", json_finish(r->finish));
    } else {
        choice = json_pack("{s:i, s:o, s:o, s:o}", "index", 0, "text", json_text(r->text, r->text_len), "logprobs", lp,
                           "finish_reason", json_finish(r->finish));
    }
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", r->id, "object",
                             api == SPEED_OPENAI_CHAT ? "chat.completion" : "text_completion", "created",
                             (json_int_t)r->created, "model", r->model, "choices", choice);
    if (root && r->usage && json_object_set_new(root, "usage", usage_json(r->usage)) != 0) {
        json_decref(root);
        root = NULL;
    }
    speed_status_t st = dump_owned(root, "", "", json_p, len_p);
    if (st != SPEED_OK)
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, r->id, "openai: out of memory building a response");
    return st;
}

speed_status_t speed_openai_chunk_sse(speed_openai_api_t api, const speed_openai_chunk_t *c, char **sse_p,
                                      size_t *len_p) {
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
        json_t *lp =
            content ? logprobs_json(api, c->has_logprobs, c->logprobs, c->n_logprobs, c->text_offset) : json_null();
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
            choice =
                json_pack("{s:i, s:o, s:o, s:o}", "index", 0, "delta", delta, "logprobs", lp, "finish_reason", fin);
        } else {
            choice = json_pack("{s:i, s:o, s:o, s:o}", "index", 0, "text",
                               content ? json_text(c->text, c->text_len) : json_string(""), "logprobs", lp,
                               "finish_reason", fin);
        }
        choices = json_pack("[o]", choice);
    }
    json_t *root = json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", c->id, "object",
                             chat ? "chat.completion.chunk" : "text_completion", "created", (json_int_t)c->created,
                             "model", c->model, "choices", choices);
    if (root) {
        json_t *usage = NULL;
        if (c->kind == SPEED_OPENAI_CHUNK_USAGE)
            usage = usage_json(c->usage);
        else if (c->include_usage)
            usage = json_null();
        if ((c->kind == SPEED_OPENAI_CHUNK_USAGE || c->include_usage) &&
            json_object_set_new(root, "usage", usage) != 0) {
            json_decref(root);
            root = NULL;
        }
    }
    speed_status_t st = dump_owned(root, "data: ", "\n\n", sse_p, len_p);
    if (st != SPEED_OK)
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, c->id, "openai: out of memory building a stream chunk");
    return st;
}

const char *speed_openai_sse_done(size_t *len_p) {
    static const char done[] = "data: [DONE]\n\n";
    if (len_p) *len_p = sizeof done - 1;
    return done;
}

static json_t *error_object(const speed_openai_error_t *err) {
    return json_pack("{s:{s:o, s:s, s:o, s:o}}", "error", "message", json_text(err->message, strlen(err->message)),
                     "type", speed_openai_error_type(err->kind), "param",
                     err->param[0] ? json_text(err->param, strlen(err->param)) : json_null(), "code",
                     err->code[0] ? json_text(err->code, strlen(err->code)) : json_null());
}

speed_status_t speed_openai_error_json(const speed_openai_error_t *err, char **json_p, size_t *len_p) {
    if (!err || !json_p) return SPEED_ERR_INTERNAL;
    return dump_owned(error_object(err), "", "", json_p, len_p);
}

speed_status_t speed_openai_error_sse(const speed_openai_error_t *err, char **sse_p, size_t *len_p) {
    if (!err || !sse_p) return SPEED_ERR_INTERNAL;
    return dump_owned(error_object(err), "data: ", "\n\n", sse_p, len_p);
}

speed_status_t speed_openai_models_json(const char *const *ids, size_t n_ids, int64_t created, const char *owned_by,
                                        char **json_p, size_t *len_p) {
    if (!json_p || (n_ids > 0 && !ids)) return SPEED_ERR_INTERNAL;
    json_t *data = json_array();
    if (!data) return SPEED_ERR_NO_MEMORY;
    for (size_t i = 0; i < n_ids; i++) {
        if (!ids[i]) {
            json_decref(data);
            return SPEED_ERR_INTERNAL;
        }
        json_t *m = json_pack("{s:o, s:s, s:I, s:s}", "id", json_text(ids[i], strlen(ids[i])), "object", "model",
                              "created", (json_int_t)created, "owned_by", owned_by ? owned_by : "speedserve");
        if (json_array_append_new(data, m) != 0) {
            json_decref(data);
            return SPEED_ERR_NO_MEMORY;
        }
    }
    return dump_owned(json_pack("{s:s, s:o}", "object", "list", "data", data), "", "", json_p, len_p);
}
