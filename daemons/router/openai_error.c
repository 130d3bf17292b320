/* OpenAI error objects as values: the table from each error kind to its HTTP status, "type"
 * and default "code", filling a speed_openai_error_t (fixed buffers, never allocates), and
 * the table from a speed_status_t to a kind. Rendering an error as JSON or as an SSE event
 * is in openai_response.c with the other JSON output. */
#include "openai.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const struct {
    int http;
    const char *type;
    const char *code; /* default code, NULL = null */
} error_table[SPEED_OPENAI_ERR_KIND_COUNT] = {
    [SPEED_OPENAI_ERR_INVALID_REQUEST] = {400, "invalid_request_error", NULL},
    [SPEED_OPENAI_ERR_INVALID_API_KEY] = {401, "invalid_request_error", "invalid_api_key"},
    [SPEED_OPENAI_ERR_MODEL_NOT_FOUND] = {404, "invalid_request_error", "model_not_found"},
    [SPEED_OPENAI_ERR_CONTEXT_LENGTH] = {413, "invalid_request_error", "context_length_exceeded"},
    [SPEED_OPENAI_ERR_OVERLOADED] = {429, "requests", "rate_limit_exceeded"},
    [SPEED_OPENAI_ERR_UNAVAILABLE] = {503, "server_error", "service_unavailable"},
    [SPEED_OPENAI_ERR_INTERNAL] = {500, "server_error", NULL},
};

static bool kind_valid(speed_openai_error_kind_t kind) { return (int)kind >= 0 && kind < SPEED_OPENAI_ERR_KIND_COUNT; }

int speed_openai_error_http_status(speed_openai_error_kind_t kind) {
    return kind_valid(kind) ? error_table[kind].http : 500;
}

const char *speed_openai_error_type(speed_openai_error_kind_t kind) {
    return kind_valid(kind) ? error_table[kind].type : "server_error";
}

static void copy_trunc(char *dst, size_t cap, const char *src) {
    if (!src) src = "";
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

void speed_openai_error_setv(speed_openai_error_t *err, speed_openai_error_kind_t kind, const char *param,
                             const char *code, const char *fmt, va_list ap) {
    if (!err) return;
    err->kind = kind_valid(kind) ? kind : SPEED_OPENAI_ERR_INTERNAL;
    copy_trunc(err->param, sizeof err->param, param);
    copy_trunc(err->code, sizeof err->code, code ? code : error_table[err->kind].code);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
}

void speed_openai_error_set(speed_openai_error_t *err, speed_openai_error_kind_t kind, const char *param,
                            const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    speed_openai_error_setv(err, kind, param, code, fmt, ap);
    va_end(ap);
}

void speed_openai_error_from_status(speed_status_t status, const char *message, speed_openai_error_t *err) {
    speed_openai_error_kind_t kind;
    switch (status) {
    case SPEED_ERR_INVALID_ARGUMENT:
    case SPEED_ERR_PARSE:
    case SPEED_ERR_FORMAT:
    case SPEED_ERR_UNSUPPORTED: kind = SPEED_OPENAI_ERR_INVALID_REQUEST; break;
    case SPEED_ERR_NOT_FOUND: kind = SPEED_OPENAI_ERR_MODEL_NOT_FOUND; break;
    case SPEED_ERR_TOO_LONG: kind = SPEED_OPENAI_ERR_CONTEXT_LENGTH; break;
    case SPEED_ERR_CAPACITY: kind = SPEED_OPENAI_ERR_OVERLOADED; break;
    case SPEED_ERR_TIMEOUT:
    case SPEED_ERR_CANCELLED:
    case SPEED_ERR_NO_MEMORY:
    case SPEED_ERR_PEER_UNREACHABLE:
    case SPEED_ERR_PEER_PROTOCOL:
    case SPEED_ERR_TRANSFER: kind = SPEED_OPENAI_ERR_UNAVAILABLE; break;
    default: kind = SPEED_OPENAI_ERR_INTERNAL; break;
    }
    if (status == SPEED_OK) message = "internal error: no error to report";
    speed_openai_error_set(err, kind, NULL, NULL, "%s", message && message[0] ? message : speed_status_string(status));
}

const char *speed_openai_error_fallback_json(void) {
    return "{\"error\":{\"message\":\"internal error\",\"type\":\"server_error\","
           "\"param\":null,\"code\":null}}";
}
