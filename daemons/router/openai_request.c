/* OpenAI requests: parsing and validating a /v1/chat/completions or /v1/completions body into
 * a speed_openai_request_t, then the checks that need the deployment (model name, context
 * length) and the prompt's tokenization. Bad input gives a 400 naming the field (openai.h). */
#include "openai.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "alloc.h"
#include "json_strict.h"
#include "log.h"

/* ---- request parsing --------------------------------------------------------------- */

typedef struct {
    speed_openai_api_t api;
    const speed_openai_parse_params_t *params;
    speed_openai_request_t *req;
    speed_openai_error_t *err;
} parse_ctx_t;

static speed_status_t bad(parse_ctx_t *c, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static speed_status_t bad(parse_ctx_t *c, const char *param, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    speed_openai_error_setv(c->err, SPEED_OPENAI_ERR_INVALID_REQUEST, param, code, fmt, ap);
    va_end(ap);
    return SPEED_ERR_INVALID_ARGUMENT;
}

static speed_status_t oom(speed_openai_error_t *err) {
    speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, NULL, "openai: out of memory parsing a request");
    speed_openai_error_set(err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, NULL, "The server ran out of memory; retry later.");
    return SPEED_ERR_NO_MEMORY;
}

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a decimal";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

static speed_status_t bad_type(parse_ctx_t *c, const char *param, const char *expected, const json_t *got) {
    return bad(c, param, "invalid_type", "Invalid type for '%s': expected %s, but got %s instead.", param, expected,
               type_name(got));
}

/* Optional-field getters: a missing key or JSON null leaves *present false. */

static const json_t *field(const json_t *obj, const char *name) {
    const json_t *v = json_object_get(obj, name);
    return v && !json_is_null(v) ? v : NULL;
}

static speed_status_t get_bool(parse_ctx_t *c, const json_t *obj, const char *name, const char *param, bool *out,
                               bool *present) {
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_boolean(v)) return bad_type(c, param, "a boolean", v);
    *out = json_is_true(v);
    return SPEED_OK;
}

static speed_status_t int_range(parse_ctx_t *c, const char *param, json_int_t x, int64_t min, int64_t max) {
    if (x < min)
        return bad(c, param, "integer_below_min_value",
                   "Invalid '%s': integer below minimum value. Expected a value >= %lld, but "
                   "got %lld instead.",
                   param, (long long)min, (long long)x);
    if (x > max)
        return bad(c, param, "integer_above_max_value",
                   "Invalid '%s': integer above maximum value. Expected a value <= %lld, but "
                   "got %lld instead.",
                   param, (long long)max, (long long)x);
    return SPEED_OK;
}

static speed_status_t get_int(parse_ctx_t *c, const json_t *obj, const char *name, int64_t min, int64_t max,
                              int64_t *out, bool *present) {
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_integer(v)) return bad_type(c, name, "an integer", v);
    json_int_t x = json_integer_value(v);
    SPEED_CHECK(int_range(c, name, x, min, max));
    *out = x;
    return SPEED_OK;
}

static speed_status_t get_number(parse_ctx_t *c, const json_t *obj, const char *name, double min, bool min_exclusive,
                                 double max, double *out, bool *present) {
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_number(v)) return bad_type(c, name, "a number", v);
    double x = json_number_value(v);
    if (x < min || (min_exclusive && x == min))
        return bad(c, name, "decimal_below_min_value",
                   "Invalid '%s': decimal below minimum value. Expected a value %s %g, but got "
                   "%g instead.",
                   name, min_exclusive ? ">" : ">=", min, x);
    if (x > max)
        return bad(c, name, "decimal_above_max_value",
                   "Invalid '%s': decimal above maximum value. Expected a value <= %g, but got "
                   "%g instead.",
                   name, max, x);
    *out = x;
    return SPEED_OK;
}

/* Strings cannot hold NUL here (the body is parsed without JSON_ALLOW_NUL). */
static speed_status_t dup_string(parse_ctx_t *c, const json_t *v, char **out, size_t *len_p) {
    size_t n = json_string_length(v);
    char *s = speed_strndup(json_string_value(v), n);
    if (!s) return oom(c->err);
    *out = s;
    if (len_p) *len_p = n;
    return SPEED_OK;
}

static speed_status_t get_string(parse_ctx_t *c, const json_t *obj, const char *name, const char *param, char **out,
                                 bool *present) {
    const json_t *v = field(obj, name);
    if (present) *present = v != NULL;
    if (!v) return SPEED_OK;
    if (!json_is_string(v)) return bad_type(c, param, "a string", v);
    return dup_string(c, v, out, NULL);
}

/* A field accepted only at its neutral value. */
static speed_status_t unsupported(parse_ctx_t *c, const char *param, const char *what) {
    return bad(c, param, "unsupported_value", "Unsupported value for '%s': %s.", param, what);
}

static speed_status_t parse_role(parse_ctx_t *c, const json_t *v, const char *param, speed_openai_role_t *role) {
    if (!v) return bad(c, param, "missing_required_parameter", "Missing required parameter: '%s'.", param);
    if (!json_is_string(v)) return bad_type(c, param, "a string", v);
    static const struct {
        const char *name;
        speed_openai_role_t role;
    } roles[] = {
        {"system", SPEED_OPENAI_ROLE_SYSTEM}, {"developer", SPEED_OPENAI_ROLE_SYSTEM},
        {"user", SPEED_OPENAI_ROLE_USER},     {"assistant", SPEED_OPENAI_ROLE_ASSISTANT},
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
               "Invalid value for '%s': expected one of 'system', 'user', 'assistant', 'tool'.", param);
}

static speed_status_t parse_content(parse_ctx_t *c, size_t i, const json_t *v, speed_openai_message_t *m) {
    char param[SPEED_OPENAI_ERROR_PARAM_MAX];
    snprintf(param, sizeof param, "messages[%zu].content", i);
    if (!v) {
        if (m->role == SPEED_OPENAI_ROLE_ASSISTANT) { /* e.g. a tool_calls message */
            m->content = speed_strdup("");
            return m->content ? SPEED_OK : oom(c->err);
        }
        return bad(c, param, "missing_required_parameter", "Missing required parameter: '%s'.", param);
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
        if (!type) return bad(c, tp, "missing_required_parameter", "Missing required parameter: '%s'.", tp);
        if (!json_is_string(type)) return bad_type(c, tp, "a string", type);
        if (strcmp(json_string_value(type), "text") != 0)
            return unsupported(c, tp, "only 'text' content parts are supported");
        const json_t *text = json_object_get(part, "text");
        snprintf(tp, sizeof tp, "messages[%zu].content[%zu].text", i, k);
        if (!text) return bad(c, tp, "missing_required_parameter", "Missing required parameter: '%s'.", tp);
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

static speed_status_t parse_messages(parse_ctx_t *c, const json_t *root) {
    const json_t *v = json_object_get(root, "messages");
    if (!v || json_is_null(v))
        return bad(c, "messages", "missing_required_parameter", "Missing required parameter: 'messages'.");
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
        r->n_messages = i + 1; /* destroy frees what this message got so far */
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

static speed_status_t token_id(parse_ctx_t *c, const json_t *v, const char *param, int32_t *out) {
    if (!json_is_integer(v)) return bad_type(c, param, "an integer token id", v);
    int64_t max = c->params->vocab_size > 0 ? c->params->vocab_size - 1 : INT32_MAX;
    SPEED_CHECK(int_range(c, param, json_integer_value(v), 0, max));
    *out = (int32_t)json_integer_value(v);
    return SPEED_OK;
}

static speed_status_t parse_prompt_ids(parse_ctx_t *c, const json_t *arr, const char *param) {
    speed_openai_request_t *r = c->req;
    size_t n = json_array_size(arr);
    if (n == 0)
        return bad(c, param, "empty_array", "Invalid '%s': empty array. Expected at least one token id.", param);
    for (size_t i = 0; i < n; i++) { /* validate before allocating */
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

static speed_status_t parse_prompt(parse_ctx_t *c, const json_t *root) {
    const json_t *v = json_object_get(root, "prompt");
    if (!v || json_is_null(v))
        return bad(c, "prompt", "missing_required_parameter", "Missing required parameter: 'prompt'.");
    if (json_is_string(v)) return dup_string(c, v, &c->req->prompt, &c->req->prompt_len);
    if (!json_is_array(v)) return bad_type(c, "prompt", "a string, an array of strings or an array of token ids", v);
    size_t n = json_array_size(v);
    if (n == 0)
        return bad(c, "prompt", "empty_array",
                   "Invalid 'prompt': empty array. Expected an array with minimum length 1, but "
                   "got an empty array instead.");
    const json_t *first = json_array_get(v, 0);
    if (json_is_string(first) || json_is_array(first)) { /* a batch of prompts */
        for (size_t i = 0; i < n; i++) {
            const json_t *e = json_array_get(v, i);
            char p[SPEED_OPENAI_ERROR_PARAM_MAX];
            snprintf(p, sizeof p, "prompt[%zu]", i);
            if (json_typeof(e) != json_typeof(first))
                return bad_type(c, p, json_is_string(first) ? "a string" : "an array", e);
        }
        if (n != 1) return unsupported(c, "prompt", "only one prompt per request is supported (n = 1)");
        if (json_is_string(first)) return dup_string(c, first, &c->req->prompt, &c->req->prompt_len);
        return parse_prompt_ids(c, first, "prompt[0]");
    }
    return parse_prompt_ids(c, v, "prompt");
}

static speed_status_t parse_stop(parse_ctx_t *c, const json_t *root) {
    const json_t *v = field(root, "stop");
    if (!v) return SPEED_OK;
    speed_openai_request_t *r = c->req;
    if (json_is_string(v)) {
        if (json_string_length(v) == 0) return bad(c, "stop", "invalid_value", "Invalid 'stop': empty string.");
        SPEED_CHECK(dup_string(c, v, &r->stop[0], NULL));
        r->n_stop = 1;
        return SPEED_OK;
    }
    if (!json_is_array(v)) return bad_type(c, "stop", "a string or an array of strings", v);
    size_t n = json_array_size(v);
    if (n > SPEED_OPENAI_MAX_STOP)
        return bad(c, "stop", "array_above_max_length",
                   "Invalid 'stop': array too long. Expected an array with maximum length %d, "
                   "but got an array with length %zu instead.",
                   SPEED_OPENAI_MAX_STOP, n);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(v, i);
        char p[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(p, sizeof p, "stop[%zu]", i);
        if (!json_is_string(e)) return bad_type(c, p, "a string", e);
        if (json_string_length(e) == 0) return bad(c, p, "invalid_value", "Invalid '%s': empty string.", p);
        SPEED_CHECK(dup_string(c, e, &r->stop[i], NULL));
        r->n_stop = i + 1;
    }
    return SPEED_OK;
}

static speed_status_t parse_speed(parse_ctx_t *c, const json_t *root) {
    const json_t *v = field(root, "speed");
    if (!v) return SPEED_OK;
    if (!json_is_object(v)) return bad_type(c, "speed", "an object", v);
    if (!c->params->allow_speed)
        return bad(c, "speed", "unsupported_parameter",
                   "Unsupported parameter: 'speed'. This deployment does not allow per-request "
                   "SPEED settings (prefill_layers, anchors, tail); remove the object.");
    speed_openai_speed_t *s = &c->req->speed;
    speed_depth_request_t *q = &s->depth;
    s->present = true;
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)v, key, val) {
        char p[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(p, sizeof p, "speed.%s", key);
        if (json_is_null(val)) continue;
        if (strcmp(key, "prefill_layers") == 0) {
            if (json_is_integer(val))
                q->prefill_layers = speed_cutoff_layers(json_integer_value(val));
            else if (json_is_real(val))
                q->prefill_layers = speed_cutoff_fraction(json_real_value(val));
            else
                return bad_type(c, p, "an integer layer count or a fraction", val);
        } else if (strcmp(key, "anchors") == 0 || strcmp(key, "tail") == 0) {
            if (!json_is_integer(val)) return bad_type(c, p, "an integer", val);
            if (key[0] == 't') {
                q->has_tail = true;
                q->tail = json_integer_value(val);
            } else {
                q->has_anchors = true;
                q->anchors = json_integer_value(val);
            }
        } else {
            return bad(c, p, "unknown_parameter",
                       "Unknown parameter: '%s'. The speed object takes prefill_layers, "
                       "anchors and tail.",
                       p);
        }
    }
    /* The one resolution (depth.h), as the nodes and speedctl do it: same value, same answer.
     * Its reason starts with the part it refuses. */
    char why[200];
    if (speed_depth_resolve(q, &c->params->depth, c->params->n_layers, &s->resolved, why, sizeof why) != SPEED_OK) {
        char part[SPEED_OPENAI_ERROR_PARAM_MAX];
        snprintf(part, sizeof part, "speed.%s", speed_depth_error_part(why));
        return bad(c, part, "invalid_value", "Invalid '%s': %s.", part, why);
    }
    return SPEED_OK;
}

/* Which known numeric field holds a number jansson could not store as an integer.
 * Only on the error path: re-reads the body with integers as reals. */
static speed_status_t diagnose_overflow(parse_ctx_t *c, const char *body, size_t len, const json_error_t *jerr) {
    static const char *const fields[] = {
        "max_tokens",       "max_completion_tokens", "seed",    "top_k",       "n",
        "logprobs",         "top_logprobs",          "best_of", "temperature", "top_p",
        "presence_penalty", "frequency_penalty",
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
                   "Invalid '%s': number out of range (%g); integers must fit in 64 bits.", param, x);
    return bad(c, NULL, NULL, "We could not parse the JSON body of your request: %s (line %d, column %d).", jerr->text,
               jerr->line, jerr->column);
}

static speed_status_t parse_root(parse_ctx_t *c, const json_t *root) {
    speed_openai_request_t *r = c->req;
    bool chat = c->api == SPEED_OPENAI_CHAT;
    bool present;

    const json_t *model = json_object_get(root, "model");
    if (!model || json_is_null(model))
        return bad(c, "model", "missing_required_parameter", "Missing required parameter: 'model'.");
    if (!json_is_string(model)) return bad_type(c, "model", "a string", model);
    if (json_string_length(model) == 0) return bad(c, "model", "invalid_value", "Invalid 'model': empty string.");
    SPEED_CHECK(dup_string(c, model, &r->model, NULL));

    if (chat)
        SPEED_CHECK(parse_messages(c, root));
    else
        SPEED_CHECK(parse_prompt(c, root));

    SPEED_CHECK(get_bool(c, root, "stream", "stream", &r->stream, NULL));
    const json_t *so = field(root, "stream_options");
    if (so) {
        if (!json_is_object(so)) return bad_type(c, "stream_options", "an object", so);
        if (!r->stream)
            return bad(c, "stream_options", "invalid_value",
                       "Invalid value for 'stream_options': only allowed when 'stream' is "
                       "true.");
        SPEED_CHECK(get_bool(c, so, "include_usage", "stream_options.include_usage", &r->include_usage, NULL));
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
        SPEED_CHECK(get_int(c, root, "top_logprobs", 0, SPEED_OPENAI_MAX_TOP_LOGPROBS, &x, &present));
        if (present) {
            if (!r->logprobs)
                return bad(c, "top_logprobs", "invalid_value",
                           "Invalid value for 'top_logprobs': 'logprobs' must be true when "
                           "'top_logprobs' is given.");
            r->top_logprobs = (int32_t)x;
        }
    } else {
        SPEED_CHECK(get_int(c, root, "logprobs", 0, SPEED_OPENAI_MAX_TOP_LOGPROBS, &x, &present));
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
    if (bias && json_object_size(bias) > 0) return unsupported(c, "logit_bias", "logit biases are not supported");

    SPEED_CHECK(get_string(c, root, "user", "user", &r->user, NULL));
    SPEED_CHECK(get_bool(c, root, "ignore_eos", "ignore_eos", &r->ignore_eos, NULL));
    return parse_speed(c, root);
}

speed_openai_parse_params_t speed_openai_default_parse_params(void) {
    speed_openai_parse_params_t p = {0};
    p.depth = speed_depth_default();
    p.json.max_elements = SPEED_OPENAI_JSON_MAX_ELEMENTS;
    p.json.max_containers = SPEED_OPENAI_JSON_MAX_CONTAINERS;
    p.json.max_depth = SPEED_OPENAI_JSON_MAX_DEPTH;
    return p;
}

speed_status_t speed_openai_request_parse(speed_openai_api_t api, const char *body, size_t len,
                                          const speed_openai_parse_params_t *params, speed_openai_request_t **req_p,
                                          speed_openai_error_t *err) {
    if ((!body && len > 0) || !req_p || (api != SPEED_OPENAI_CHAT && api != SPEED_OPENAI_COMPLETIONS)) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL,
                               "internal error: bad arguments to the request parser");
        return SPEED_ERR_INTERNAL;
    }
    speed_openai_parse_params_t defaults = speed_openai_default_parse_params();
    parse_ctx_t c = {api, params ? params : &defaults, NULL, err};

    /* jansson does not reset the error code when it fails without a message (a failed
     * allocation): start from "unknown" rather than stack garbage. */
    /* No JSON text holds a raw NUL, but jansson reads "[1\0,2]" as [1, 2] (a NUL after a number
     * ends it and is skipped): refuse any, so that what we accept is JSON (found by fuzzing). */
    const char *nul = len ? memchr(body, '\0', len) : NULL;
    if (nul)
        return bad(&c, NULL, NULL, "We could not parse the JSON body of your request: a NUL byte at offset %zu.",
                   (size_t)(nul - body));
    speed_json_budget_use_t use;
    const char *which = NULL;
    if (!speed_json_budget_check(body, len, &c.params->json, &use, &which)) {
        unsigned long long limit = strcmp(which, "depth") == 0        ? c.params->json.max_depth
                                   : strcmp(which, "containers") == 0 ? c.params->json.max_containers
                                                                      : c.params->json.max_elements;
        const char *what = strcmp(which, "depth") == 0        ? "nesting levels"
                           : strcmp(which, "containers") == 0 ? "objects and arrays"
                                                              : "JSON values";
        return bad(&c, NULL, "json_too_complex",
                   "The request body has more than %llu %s; this server accepts at most that.", limit, what);
    }
    json_error_t jerr;
    memset(&jerr, 0, sizeof jerr);
    json_t *root = json_loadb(body ? body : "", len, JSON_DECODE_ANY, &jerr);
    if (!root) {
        enum json_error_code code = json_error_code(&jerr);
        if (code == json_error_numeric_overflow) return diagnose_overflow(&c, body, len, &jerr);
        /* jansson does not always say that a failure was memory: a body the strict
         * check accepts failed for want of memory, not for its syntax (json_strict.h). */
        if (code == json_error_out_of_memory || speed_json_strict_check(body, len)) return oom(err);
        return bad(&c, NULL, NULL, "We could not parse the JSON body of your request: %s (line %d, column %d).",
                   jerr.text, jerr.line, jerr.column);
    }
    if (!json_is_object(root)) {
        speed_status_t st = bad(&c, NULL, NULL, "The request body must be a JSON object, got %s.", type_name(root));
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
    r->content_special_tokens = c.params->content_special_tokens;
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

void speed_openai_request_destroy(speed_openai_request_t *req) {
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

const char *speed_openai_role_name(speed_openai_role_t role) {
    switch (role) {
    case SPEED_OPENAI_ROLE_SYSTEM: return "system";
    case SPEED_OPENAI_ROLE_USER: return "user";
    case SPEED_OPENAI_ROLE_ASSISTANT: return "assistant";
    case SPEED_OPENAI_ROLE_TOOL: return "tool";
    default: return "unknown";
    }
}

/* ---- checks after parsing ---------------------------------------------------------- */

speed_status_t speed_openai_check_model(const speed_openai_request_t *req, const char *const *models, size_t n_models,
                                        speed_openai_error_t *err) {
    if (req && req->model) {
        for (size_t i = 0; i < n_models; i++)
            if (models && models[i] && strcmp(models[i], req->model) == 0) return SPEED_OK;
    }
    speed_openai_error_set(err, SPEED_OPENAI_ERR_MODEL_NOT_FOUND, "model", "model_not_found",
                           "The model '%.200s' does not exist or you do not have access to it.",
                           req && req->model ? req->model : "");
    return SPEED_ERR_NOT_FOUND;
}

speed_status_t speed_openai_check_length(const speed_openai_request_t *req, int64_t n_prompt, int64_t n_ctx,
                                         int64_t *max_tokens_p, speed_openai_error_t *err) {
    const char *param = req && req->api == SPEED_OPENAI_CHAT ? "messages" : "prompt";
    const char *what = req && req->api == SPEED_OPENAI_CHAT ? "messages" : "prompt";
    if (!req || n_prompt >= n_ctx) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_CONTEXT_LENGTH, param, "context_length_exceeded",
                               "This model's maximum context length is %lld tokens. However, "
                               "your %s resulted in %lld tokens, leaving no room for the "
                               "completion.",
                               (long long)n_ctx, what, (long long)n_prompt);
        return SPEED_ERR_TOO_LONG;
    }
    if (req->max_tokens > 0 && n_prompt + req->max_tokens > n_ctx) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_CONTEXT_LENGTH, param, "context_length_exceeded",
                               "This model's maximum context length is %lld tokens. However, "
                               "you requested %lld tokens (%lld in the %s, %lld in the "
                               "completion). Please reduce the length of the %s or the "
                               "completion.",
                               (long long)n_ctx, (long long)(n_prompt + req->max_tokens), (long long)n_prompt, what,
                               (long long)req->max_tokens, what);
        return SPEED_ERR_TOO_LONG;
    }
    if (max_tokens_p) *max_tokens_p = req->max_tokens > 0 ? req->max_tokens : n_ctx - n_prompt;
    return SPEED_OK;
}

speed_status_t speed_openai_request_tokenize(const speed_openai_request_t *req, const speed_tok_t *tok,
                                             speed_tok_ids_t *ids, speed_openai_error_t *err) {
    if (!req || !tok || !ids) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL, "internal error: bad arguments to tokenize");
        return SPEED_ERR_INTERNAL;
    }
    if (req->api == SPEED_OPENAI_COMPLETIONS && req->prompt_ids) {
        int32_t vocab = speed_tok_vocab_size(tok);
        for (size_t i = 0; i < req->n_prompt_ids; i++) {
            if (req->prompt_ids[i] >= vocab) {
                speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_REQUEST, "prompt", "invalid_value",
                                       "Invalid 'prompt': token id %d at index %zu is outside "
                                       "the vocabulary (size %d).",
                                       req->prompt_ids[i], i, vocab);
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
        /* Content is text unless the deployment opted in (issue 10: a forged turn). */
        st = speed_tok_chat_encode(tok, msgs, req->n_messages, true, req->content_special_tokens, ids);
        speed_free(msgs);
    }
    switch (st) {
    case SPEED_OK: return SPEED_OK;
    case SPEED_ERR_NO_MEMORY: return oom(err);
    case SPEED_ERR_INVALID_ARGUMENT:
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_REQUEST, param, "invalid_value", "Invalid '%s': %s", param,
                               speed_log_last_error());
        return st;
    default:
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL,
                               "The server cannot tokenize this request: %s", speed_log_last_error());
        return st;
    }
}
