/* router/openai: request validation (table of bad requests), parsed values, error
 * objects, response builders parsed back, SSE assembly, auth, tokenization, and
 * allocation fault injection on every parse/build path.
 *
 * `router_openai chat-vectors` instead checks the router's chat requests against the Llama 2
 * reference conversations ($SPEED_TEST_DATA/tokenizers/llama2/chat_vectors.jsonl): the ids the
 * router computes must be the file's, which were not made by our template code (exit 77 without
 * the data). */
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "test_log.h"
#include "log.h"
#include "openai.h"
#include "tokenizer.h"
#include "test_fs.h"
#include "tok_test_util.h"

#define CHAT(extra) "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]" extra "}"
#define COMP(extra) "{\"model\":\"m\",\"prompt\":\"hi\"" extra "}"
#define MSG(m)      "{\"model\":\"m\",\"messages\":[" m "]}"
#define PROMPT(p)   "{\"model\":\"m\",\"prompt\":" p "}"

enum { P_DEFAULT = 0, P_SPEED = 1, P_LIMITS = 2 };

typedef struct {
    speed_openai_api_t api;
    int params;       /* P_* flags */
    const char *body; /* NULL: use the generated body below */
    int http;
    const char *param; /* NULL = JSON null */
    const char *code;  /* NULL = JSON null */
} bad_case_t;

#define C       SPEED_OPENAI_CHAT
#define T       SPEED_OPENAI_COMPLETIONS
#define IT      "invalid_type"
#define MISSING "missing_required_parameter"
#define UNSUP   "unsupported_value"
#define IMIN    "integer_below_min_value"
#define IMAX    "integer_above_max_value"
#define DMIN    "decimal_below_min_value"
#define DMAX    "decimal_above_max_value"

static const bad_case_t bad_cases[] = {
    /* not JSON / not an object */
    {C, 0, "", 400, NULL, NULL},
    {C, 0, "not json", 400, NULL, NULL},
    {C, 0, "[1,2]", 400, NULL, NULL},
    {C, 0, "42", 400, NULL, NULL},
    {C, 0, "\"str\"", 400, NULL, NULL},
    {C, 0, "null", 400, NULL, NULL},
    {C, 0, "{\"model\":\"m\"", 400, NULL, NULL},
    {C, 0, CHAT("") " trailing", 400, NULL, NULL},
    {C, 0, "{\"model\":\"m\xff\xfe\",\"messages\":[]}", 400, NULL, NULL},
    {C, 0, MSG("{\"role\":\"user\",\"content\":\"a\xc3\"}"), 400, NULL, NULL},
    {C, 0, CHAT(",\"temperature\":NaN"), 400, NULL, NULL},
    {C, 0, CHAT(",\"temperature\":Infinity"), 400, NULL, NULL},
    {C, 0, CHAT(",\"temperature\":-inf"), 400, NULL, NULL},
    {C, 0, CHAT(",\"temperature\":1e400"), 400, NULL, NULL},
    {C, 0, MSG("{\"role\":\"user\",\"content\":\"a\\u0000b\"}"), 400, NULL, NULL},
    {C, 0, CHAT(",\"x\":'single'"), 400, NULL, NULL},
    /* huge integers: jansson rejects the document; the param is still found */
    {C, 0, CHAT(",\"seed\":18446744073709551615"), 400, "seed", IMAX},
    {C, 0, CHAT(",\"max_tokens\":-99999999999999999999"), 400, "max_tokens", IMIN},
    {C, 0, CHAT(",\"unknown_big\":99999999999999999999"), 400, NULL, NULL},
    {T, 0, PROMPT("[1,99999999999999999999]"), 400, "prompt", IMAX},
    /* model */
    {C, 0, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "model", MISSING},
    {C, 0, "{\"model\":5,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "model", IT},
    {C, 0, "{\"model\":\"\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "model", "invalid_value"},
    /* messages */
    {C, 0, "{\"model\":\"m\"}", 400, "messages", MISSING},
    {C, 0, "{\"model\":\"m\",\"messages\":null}", 400, "messages", MISSING},
    {C, 0, "{\"model\":\"m\",\"messages\":\"hi\"}", 400, "messages", IT},
    {C, 0, "{\"model\":\"m\",\"messages\":{}}", 400, "messages", IT},
    {C, 0, MSG(""), 400, "messages", "empty_array"},
    {C, 0, MSG("1"), 400, "messages[0]", IT},
    {C, 0, MSG("{\"role\":\"user\",\"content\":\"a\"},[]"), 400, "messages[1]", IT},
    {C, 0, MSG("{\"content\":\"a\"}"), 400, "messages[0].role", MISSING},
    {C, 0, MSG("{\"role\":3,\"content\":\"a\"}"), 400, "messages[0].role", IT},
    {C, 0, MSG("{\"role\":\"wizard\",\"content\":\"a\"}"), 400, "messages[0].role", "invalid_value"},
    {C, 0, MSG("{\"role\":\"User\",\"content\":\"a\"}"), 400, "messages[0].role", "invalid_value"},
    {C, 0, MSG("{\"role\":\"user\",\"content\":5}"), 400, "messages[0].content", IT},
    {C, 0, MSG("{\"role\":\"user\",\"content\":{}}"), 400, "messages[0].content", IT},
    {C, 0, MSG("{\"role\":\"user\"}"), 400, "messages[0].content", MISSING},
    {C, 0, MSG("{\"role\":\"system\",\"content\":null}"), 400, "messages[0].content", MISSING},
    {C, 0, MSG("{\"role\":\"user\",\"content\":[\"hi\"]}"), 400, "messages[0].content[0]", IT},
    {C, 0, MSG("{\"role\":\"user\",\"content\":[{\"text\":\"a\"}]}"), 400, "messages[0].content[0].type", MISSING},
    {C, 0, MSG("{\"role\":\"user\",\"content\":[{\"type\":1,\"text\":\"a\"}]}"), 400, "messages[0].content[0].type",
     IT},
    {C, 0,
     MSG("{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
         "{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}]}"),
     400, "messages[0].content[1].type", UNSUP},
    {C, 0, MSG("{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}"), 400, "messages[0].content[0].text", MISSING},
    {C, 0, MSG("{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":5}]}"), 400, "messages[0].content[0].text",
     IT},
    {C, 0, MSG("{\"role\":\"user\",\"content\":\"a\",\"name\":7}"), 400, "messages[0].name", IT},
    {C, 0, MSG("{\"role\":\"tool\",\"content\":\"a\",\"tool_call_id\":[]}"), 400, "messages[0].tool_call_id", IT},
    /* stream */
    {C, 0, CHAT(",\"stream\":\"yes\""), 400, "stream", IT},
    {C, 0, CHAT(",\"stream\":1"), 400, "stream", IT},
    /* ignore_eos (the llama-server / vLLM extension load generators send) */
    {C, 0, CHAT(",\"ignore_eos\":1"), 400, "ignore_eos", IT},
    {C, 0, CHAT(",\"stream\":true,\"stream_options\":1"), 400, "stream_options", IT},
    {C, 0, CHAT(",\"stream_options\":{\"include_usage\":true}"), 400, "stream_options", "invalid_value"},
    {C, 0, CHAT(",\"stream\":true,\"stream_options\":{\"include_usage\":\"y\"}"), 400, "stream_options.include_usage",
     IT},
    /* max_tokens */
    {C, 0, CHAT(",\"max_tokens\":\"10\""), 400, "max_tokens", IT},
    {C, 0, CHAT(",\"max_tokens\":1.5"), 400, "max_tokens", IT},
    {C, 0, CHAT(",\"max_tokens\":10.0"), 400, "max_tokens", IT},
    {C, 0, CHAT(",\"max_tokens\":0"), 400, "max_tokens", IMIN},
    {C, 0, CHAT(",\"max_tokens\":-5"), 400, "max_tokens", IMIN},
    {C, P_LIMITS, CHAT(",\"max_tokens\":5000"), 400, "max_tokens", IMAX},
    {C, 0, CHAT(",\"max_tokens\":9223372036854775807"), 400, "max_tokens", IMAX},
    {C, 0, CHAT(",\"max_completion_tokens\":\"x\""), 400, "max_completion_tokens", IT},
    {C, 0, CHAT(",\"max_completion_tokens\":0"), 400, "max_completion_tokens", IMIN},
    /* sampling */
    {C, 0, CHAT(",\"temperature\":\"hot\""), 400, "temperature", IT},
    {C, 0, CHAT(",\"temperature\":[1]"), 400, "temperature", IT},
    {C, 0, CHAT(",\"temperature\":2.5"), 400, "temperature", DMAX},
    {C, 0, CHAT(",\"temperature\":3"), 400, "temperature", DMAX},
    {C, 0, CHAT(",\"temperature\":-0.1"), 400, "temperature", DMIN},
    {C, 0, CHAT(",\"top_p\":0"), 400, "top_p", DMIN},
    {C, 0, CHAT(",\"top_p\":1.1"), 400, "top_p", DMAX},
    {C, 0, CHAT(",\"top_p\":true"), 400, "top_p", IT},
    {C, 0, CHAT(",\"top_k\":-1"), 400, "top_k", IMIN},
    {C, 0, CHAT(",\"top_k\":1.5"), 400, "top_k", IT},
    {C, 0, CHAT(",\"top_k\":4294967296"), 400, "top_k", IMAX},
    {C, 0, CHAT(",\"seed\":\"1\""), 400, "seed", IT},
    {C, 0, CHAT(",\"seed\":1.0"), 400, "seed", IT},
    /* stop */
    {C, 0, CHAT(",\"stop\":5"), 400, "stop", IT},
    {C, 0, CHAT(",\"stop\":{}"), 400, "stop", IT},
    {C, 0, CHAT(",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]"), 400, "stop", "array_above_max_length"},
    {C, 0, CHAT(",\"stop\":[\"a\",1]"), 400, "stop[1]", IT},
    {C, 0, CHAT(",\"stop\":[\"a\",null]"), 400, "stop[1]", IT},
    {C, 0, CHAT(",\"stop\":\"\""), 400, "stop", "invalid_value"},
    {C, 0, CHAT(",\"stop\":[\"a\",\"\"]"), 400, "stop[1]", "invalid_value"},
    /* logprobs */
    {C, 0, CHAT(",\"logprobs\":1"), 400, "logprobs", IT},
    {C, 0, CHAT(",\"top_logprobs\":3"), 400, "top_logprobs", "invalid_value"},
    {C, 0, CHAT(",\"logprobs\":false,\"top_logprobs\":3"), 400, "top_logprobs", "invalid_value"},
    {C, 0, CHAT(",\"logprobs\":true,\"top_logprobs\":21"), 400, "top_logprobs", IMAX},
    {C, 0, CHAT(",\"logprobs\":true,\"top_logprobs\":-1"), 400, "top_logprobs", IMIN},
    {C, 0, CHAT(",\"logprobs\":true,\"top_logprobs\":\"3\""), 400, "top_logprobs", IT},
    /* n, penalties, logit_bias, user */
    {C, 0, CHAT(",\"n\":2"), 400, "n", UNSUP},
    {C, 0, CHAT(",\"n\":0"), 400, "n", IMIN},
    {C, 0, CHAT(",\"n\":\"1\""), 400, "n", IT},
    {C, 0, CHAT(",\"presence_penalty\":0.5"), 400, "presence_penalty", UNSUP},
    {C, 0, CHAT(",\"presence_penalty\":-3"), 400, "presence_penalty", DMIN},
    {C, 0, CHAT(",\"frequency_penalty\":\"0\""), 400, "frequency_penalty", IT},
    {C, 0, CHAT(",\"frequency_penalty\":3"), 400, "frequency_penalty", DMAX},
    {C, 0, CHAT(",\"frequency_penalty\":-1"), 400, "frequency_penalty", UNSUP},
    {C, 0, CHAT(",\"logit_bias\":{\"1\":5}"), 400, "logit_bias", UNSUP},
    {C, 0, CHAT(",\"logit_bias\":[1]"), 400, "logit_bias", IT},
    {C, 0, CHAT(",\"user\":5"), 400, "user", IT},
    /* speed extension */
    {C, 0, CHAT(",\"speed\":{\"prefill_layers\":24}"), 400, "speed", "unsupported_parameter"},
    {C, P_SPEED, CHAT(",\"speed\":5"), 400, "speed", IT},
    /* ranges are speed_depth_resolve's, as on the nodes and in speedctl: one code for all */
    {C, P_SPEED, CHAT(",\"speed\":{\"prefill_layers\":0}"), 400, "speed.prefill_layers", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"prefill_layers\":-3}"), 400, "speed.prefill_layers", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"prefill_layers\":-0.5}"), 400, "speed.prefill_layers", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"prefill_layers\":1.5}"), 400, "speed.prefill_layers", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"prefill_layers\":0.0}"), 400, "speed.prefill_layers", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"prefill_layers\":\"half\"}"), 400, "speed.prefill_layers", IT},
    {C, P_SPEED | P_LIMITS, CHAT(",\"speed\":{\"prefill_layers\":40}"), 400, "speed.prefill_layers", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"anchors\":-1}"), 400, "speed.anchors", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"anchors\":1.0}"), 400, "speed.anchors", IT},
    {C, P_SPEED, CHAT(",\"speed\":{\"tail\":0}"), 400, "speed.tail", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"prefill_layers\":8,\"tail\":-2}"), 400, "speed.tail", "invalid_value"},
    {C, P_SPEED, CHAT(",\"speed\":{\"bogus\":1}"), 400, "speed.bogus", "unknown_parameter"},
    /* completions */
    {T, 0, "{\"model\":\"m\"}", 400, "prompt", MISSING},
    {T, 0, PROMPT("5"), 400, "prompt", IT},
    {T, 0, PROMPT("{}"), 400, "prompt", IT},
    {T, 0, PROMPT("[]"), 400, "prompt", "empty_array"},
    {T, 0, PROMPT("[\"a\",\"b\"]"), 400, "prompt", UNSUP},
    {T, 0, PROMPT("[\"a\",1]"), 400, "prompt[1]", IT},
    {T, 0, PROMPT("[1,\"a\"]"), 400, "prompt[1]", IT},
    {T, 0, PROMPT("[1,2.5]"), 400, "prompt[1]", IT},
    {T, 0, PROMPT("[1,true]"), 400, "prompt[1]", IT},
    {T, 0, PROMPT("[1,null]"), 400, "prompt[1]", IT},
    {T, 0, PROMPT("[1,-1]"), 400, "prompt[1]", IMIN},
    {T, 0, PROMPT("[1,99999999999]"), 400, "prompt[1]", IMAX},
    {T, P_LIMITS, PROMPT("[1,600]"), 400, "prompt[1]", IMAX},
    {T, 0, PROMPT("[[1,2],[3]]"), 400, "prompt", UNSUP},
    {T, 0, PROMPT("[[1,\"x\"]]"), 400, "prompt[0][1]", IT},
    {T, 0, PROMPT("[[]]"), 400, "prompt[0]", "empty_array"},
    {T, 0, PROMPT("[null]"), 400, "prompt[0]", IT},
    {T, 0, COMP(",\"logprobs\":true"), 400, "logprobs", IT},
    {T, 0, COMP(",\"logprobs\":21"), 400, "logprobs", IMAX},
    {T, 0, COMP(",\"logprobs\":-1"), 400, "logprobs", IMIN},
    {T, 0, COMP(",\"echo\":true"), 400, "echo", UNSUP},
    {T, 0, COMP(",\"echo\":\"no\""), 400, "echo", IT},
    {T, 0, COMP(",\"best_of\":3"), 400, "best_of", UNSUP},
    {T, 0, COMP(",\"suffix\":\"x\""), 400, "suffix", UNSUP},
    {T, 0, COMP(",\"suffix\":1"), 400, "suffix", IT},
    {T, 0, COMP(",\"n\":2"), 400, "n", UNSUP},
    {T, 0, COMP(",\"max_tokens\":\"1\""), 400, "max_tokens", IT},
    {T, 0, COMP(",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\"]"), 400, "stop", "array_above_max_length"},
    {T, 0, "[]", 400, NULL, NULL},
};

static speed_openai_parse_params_t params_of(int flags) {
    speed_openai_parse_params_t p = speed_openai_default_parse_params();
    p.allow_speed = (flags & P_SPEED) != 0;
    if (flags & P_SPEED) p.n_layers = 32; /* a speed object is resolved against the model */
    if (flags & P_LIMITS) {
        p.n_layers = 32;
        p.max_tokens_limit = 4096;
        p.vocab_size = 512;
    }
    return p;
}

/* The error object as JSON, parsed back: the fields must match err. */
static void check_error_json(const speed_openai_error_t *err, int http, const char *param, const char *code,
                             const char *label) {
    char *body = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_openai_error_json(err, &body, &len), SPEED_OK);
    if (!body) return;
    CHECK_INT_EQ(strlen(body), len);
    json_error_t jerr;
    json_t *root = json_loadb(body, len, 0, &jerr);
    CHECK_MSG(root != NULL, "%s: error body does not parse: %s", label, body);
    json_t *e = json_object_get(root, "error");
    CHECK_MSG(json_is_object(e), "%s", label);
    CHECK_INT_EQ(json_object_size(e), 4);
    CHECK(json_is_string(json_object_get(e, "message")));
    CHECK_MSG(json_string_length(json_object_get(e, "message")) > 0, "%s", label);
    const char *type = json_string_value(json_object_get(e, "type"));
    /* the OpenAI "type" that goes with each status (daemons/router/openai_error.c's table);
     * a status not listed here is a test that needs updating, not a pass */
    const char *want_type = http == 400 || http == 401 || http == 404 || http == 413 ? "invalid_request_error"
                            : http == 429                                            ? "requests"
                            : http == 500 || http == 503                             ? "server_error"
                                                                                     : "(no type for this status)";
    CHECK_MSG(type && strcmp(type, want_type) == 0, "%s: HTTP %d has type %s, want %s", label, http,
              type ? type : "(none)", want_type);
    json_t *p = json_object_get(e, "param"), *c = json_object_get(e, "code");
    if (param)
        CHECK_MSG(json_is_string(p) && strcmp(json_string_value(p), param) == 0, "%s: param %s", label, body);
    else
        CHECK_MSG(json_is_null(p), "%s: param not null: %s", label, body);
    if (code)
        CHECK_MSG(json_is_string(c) && strcmp(json_string_value(c), code) == 0, "%s: code %s", label, body);
    else
        CHECK_MSG(json_is_null(c), "%s: code not null: %s", label, body);
    json_decref(root);
    speed_free(body);
}

static void test_bad_requests(void) {
    size_t n = sizeof bad_cases / sizeof bad_cases[0];
    int64_t live0 = speed_alloc_live_count();
    for (size_t i = 0; i < n; i++) {
        const bad_case_t *bc = &bad_cases[i];
        speed_openai_parse_params_t p = params_of(bc->params);
        speed_openai_request_t *req = NULL;
        speed_openai_error_t err;
        memset(&err, 0x5a, sizeof err);
        speed_status_t st = speed_openai_request_parse(bc->api, bc->body, strlen(bc->body), &p, &req, &err);
        char label[64];
        snprintf(label, sizeof label, "bad case %zu", i);
        CHECK_MSG(st == SPEED_ERR_INVALID_ARGUMENT, "%s (%s): status %d", label, bc->body, st);
        CHECK_MSG(req == NULL, "%s", label);
        if (st != SPEED_ERR_INVALID_ARGUMENT) {
            speed_openai_request_destroy(req);
            continue;
        }
        CHECK_INT_EQ(speed_openai_error_http_status(err.kind), bc->http);
        CHECK_STR_EQ(speed_openai_error_type(err.kind), "invalid_request_error");
        CHECK_MSG(strcmp(err.param, bc->param ? bc->param : "") == 0, "%s (%s): param \"%s\", want \"%s\" (%s)", label,
                  bc->body, err.param, bc->param ? bc->param : "", err.message);
        CHECK_MSG(strcmp(err.code, bc->code ? bc->code : "") == 0, "%s (%s): code \"%s\", want \"%s\" (%s)", label,
                  bc->body, err.code, bc->code ? bc->code : "", err.message);
        CHECK_MSG(err.message[0] != '\0', "%s", label);
        check_error_json(&err, bc->http, bc->param, bc->code, label);
    }
    CHECK_INT_EQ(speed_alloc_live_count(), live0);
    fprintf(stderr, "bad-request table: %zu cases\n", n);
}

/* A NUL byte in the body: jansson reads "[1\0,2]" as [1, 2], so such a body used to be
 * accepted (found by tests/fuzz/fuzz_openai_request). Every NUL is refused, wherever it is. */
static void test_nul_bytes(void) {
    static const char body[] = "{\"model\":\"m\",\"prompt\":[1\0,2,3],\"max_tokens\":4}";
    speed_openai_request_t *req = NULL;
    speed_openai_error_t err;
    CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_COMPLETIONS, body, sizeof body - 1, NULL, &req, &err),
                 SPEED_ERR_INVALID_ARGUMENT);
    CHECK(req == NULL);
    CHECK_CONTAINS(err.message, "NUL byte at offset 24");
    speed_openai_request_destroy(req);
    static const char tail[] = "{\"model\":\"m\",\"prompt\":\"x\"}\0";
    CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_COMPLETIONS, tail, sizeof tail - 1, NULL, &req, &err),
                 SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_COMPLETIONS, tail, sizeof tail - 2, NULL, &req, &err),
                 SPEED_OK);
    speed_openai_request_destroy(req);
}

/* Deep nesting (past jansson's depth limit) and a large valid nesting in an unknown
 * field. */
static void test_nesting(void) {
    for (int depth = 100; depth <= 100000; depth *= 1000) {
        size_t n = (size_t)depth * 2 + 64;
        char *b = malloc(n);
        size_t o = (size_t)snprintf(b, n, "{\"model\":\"m\",\"prompt\":\"x\",\"extra\":");
        for (int i = 0; i < depth; i++) b[o++] = '[';
        for (int i = 0; i < depth; i++) b[o++] = ']';
        b[o++] = '}';
        speed_openai_request_t *req = NULL;
        speed_openai_error_t err;
        speed_status_t st = speed_openai_request_parse(SPEED_OPENAI_COMPLETIONS, b, o, NULL, &req, &err);
        if (depth == 100) {
            CHECK_INT_EQ(st, SPEED_OK); /* unknown fields are ignored, whatever they hold */
        } else {
            CHECK_INT_EQ(st, SPEED_ERR_INVALID_ARGUMENT);
            CHECK_INT_EQ(speed_openai_error_http_status(err.kind), 400);
            /* Refused by the JSON budget, before jansson builds anything. */
            CHECK_CONTAINS(err.message, "nesting levels");
        }
        speed_openai_request_destroy(req);
        free(b);
    }
}

/* The JSON budget (json_budget.h): containers and elements are counted before parsing. */
static void test_json_budget(void) {
    speed_openai_parse_params_t p = params_of(P_DEFAULT);
    p.json.max_containers = 10;
    p.json.max_elements = 40;
    /* 9 containers and few elements: fine */
    static const char ok[] = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"a,[{}]\"}],"
                             "\"stop\":[\"x\"]}";
    speed_openai_request_t *req = NULL;
    speed_openai_error_t err = {0};
    CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_CHAT, ok, strlen(ok), &p, &req, &err), SPEED_OK);
    speed_openai_request_destroy(req);
    req = NULL;
    static const char many[] = "{\"model\":\"m\",\"prompt\":\"x\",\"extra\":[{},{},{},{},{},{},{},{},{},{},{}]}";
    CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_COMPLETIONS, many, strlen(many), &p, &req, &err),
                 SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err.message, "objects and arrays");
    CHECK_STR_EQ(err.code, "json_too_complex");
    char ids[512];
    size_t n = (size_t)snprintf(ids, sizeof ids, "{\"model\":\"m\",\"prompt\":[1");
    for (int i = 0; i < 45; i++) n += (size_t)snprintf(ids + n, sizeof ids - n, ",1");
    snprintf(ids + n, sizeof ids - n, "]}");
    CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_COMPLETIONS, ids, strlen(ids), &p, &req, &err),
                 SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err.message, "JSON values");
    /* commas inside strings (escaped quotes too) do not count */
    char str[512];
    n = (size_t)snprintf(str, sizeof str, "{\"model\":\"m\",\"prompt\":\"\\\",");
    for (int i = 0; i < 60; i++) str[n++] = ',';
    snprintf(str + n, sizeof str - n, "\"}");
    CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_COMPLETIONS, str, strlen(str), &p, &req, &err), SPEED_OK);
    speed_openai_request_destroy(req);
}

static speed_openai_request_t *parse_ok(speed_openai_api_t api, const char *body, int flags) {
    speed_openai_parse_params_t p = params_of(flags);
    speed_openai_request_t *req = NULL;
    speed_openai_error_t err = {0};
    speed_status_t st = speed_openai_request_parse(api, body, strlen(body), &p, &req, &err);
    CHECK_MSG(st == SPEED_OK, "parse failed (%d): %s [param %s] for %s", st, err.message, err.param, body);
    return req;
}

static void test_valid_chat(void) {
    const char *body =
        "{\"model\":\"llama\",\"messages\":["
        "{\"role\":\"system\",\"content\":\"be brief\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"caf\\u00e9\"},"
        "{\"type\":\"text\",\"text\":\"\xf0\x9f\x98\x80 two\"}],\"name\":\"bob\"},"
        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\"}]},"
        "{\"role\":\"tool\",\"content\":\"42\",\"tool_call_id\":\"c1\"},"
        "{\"role\":\"developer\",\"content\":\"\"}],"
        "\"stream\":true,\"stream_options\":{\"include_usage\":true},"
        "\"max_tokens\":100,\"max_completion_tokens\":64,\"temperature\":0.7,\"top_p\":0.9,"
        "\"top_k\":40,\"seed\":-7,\"stop\":[\"\\n\\n\",\"END\"],\"logprobs\":true,"
        "\"top_logprobs\":5,\"n\":1,\"presence_penalty\":0,\"frequency_penalty\":0.0,"
        "\"user\":\"u-1\",\"ignore_eos\":true,\"speed\":{\"prefill_layers\":0.75,\"anchors\":2,\"tail\":3},"
        "\"tools\":[{\"type\":\"function\"}],\"response_format\":{\"type\":\"text\"},"
        "\"parallel_tool_calls\":false,\"logit_bias\":{},\"whatever\":[1,{\"a\":null}]}";
    speed_openai_request_t *r = parse_ok(SPEED_OPENAI_CHAT, body, P_SPEED | P_LIMITS);
    if (!r) return;
    CHECK_INT_EQ(r->api, SPEED_OPENAI_CHAT);
    CHECK_STR_EQ(r->model, "llama");
    CHECK_INT_EQ(r->n_messages, 5);
    CHECK_INT_EQ(r->messages[0].role, SPEED_OPENAI_ROLE_SYSTEM);
    CHECK_STR_EQ(r->messages[0].content, "be brief");
    CHECK_INT_EQ(r->messages[1].role, SPEED_OPENAI_ROLE_USER);
    CHECK_STR_EQ(r->messages[1].content, "caf\xc3\xa9\n\xf0\x9f\x98\x80 two");
    CHECK_INT_EQ(r->messages[1].content_len, strlen("caf\xc3\xa9\n\xf0\x9f\x98\x80 two"));
    CHECK_STR_EQ(r->messages[1].name, "bob");
    CHECK_INT_EQ(r->messages[2].role, SPEED_OPENAI_ROLE_ASSISTANT);
    CHECK_STR_EQ(r->messages[2].content, "");
    CHECK_INT_EQ(r->messages[3].role, SPEED_OPENAI_ROLE_TOOL);
    CHECK_STR_EQ(r->messages[3].tool_call_id, "c1");
    CHECK_INT_EQ(r->messages[4].role, SPEED_OPENAI_ROLE_SYSTEM);
    CHECK(r->messages[4].content && r->messages[4].content_len == 0);
    CHECK(r->messages[0].name == NULL);
    CHECK(r->stream);
    CHECK(r->include_usage);
    CHECK_INT_EQ(r->max_tokens, 64); /* max_completion_tokens wins */
    CHECK_NEAR(r->temperature, 0.7, 0);
    CHECK_NEAR(r->top_p, 0.9, 0);
    CHECK_INT_EQ(r->top_k, 40);
    CHECK(r->has_seed);
    CHECK_INT_EQ(r->seed, -7);
    CHECK_INT_EQ(r->n_stop, 2);
    CHECK_STR_EQ(r->stop[0], "\n\n");
    CHECK_STR_EQ(r->stop[1], "END");
    CHECK(r->logprobs);
    CHECK_INT_EQ(r->top_logprobs, 5);
    CHECK_INT_EQ(r->n, 1);
    CHECK_STR_EQ(r->user, "u-1");
    CHECK(r->ignore_eos);
    CHECK(r->speed.present);
    CHECK_INT_EQ(r->speed.depth.prefill_layers.kind, SPEED_CUTOFF_FRACTION);
    CHECK_NEAR(r->speed.depth.prefill_layers.fraction, 0.75, 0);
    CHECK(r->speed.depth.has_anchors && r->speed.depth.anchors == 2);
    CHECK(r->speed.depth.has_tail && r->speed.depth.tail == 3);
    /* resolved against the model (32 layers) as every node would: 0.75 of 32 = 24 */
    CHECK_INT_EQ(r->speed.resolved.prefill_layers, 24);
    CHECK_INT_EQ(r->speed.resolved.anchors, 2);
    CHECK_INT_EQ(r->speed.resolved.tail, 3);
    CHECK(r->prompt == NULL && r->prompt_ids == NULL);
    speed_openai_request_destroy(r);

    /* defaults, and nulls meaning "not given" */
    r = parse_ok(SPEED_OPENAI_CHAT,
                 CHAT(",\"stop\":null,\"seed\":null,\"temperature\":null,\"speed\":null,"
                      "\"stream_options\":null,\"top_logprobs\":null,\"n\":1"),
                 0);
    if (r) {
        CHECK(!r->stream && !r->include_usage && !r->ignore_eos);
        CHECK_INT_EQ(r->max_tokens, -1);
        CHECK_NEAR(r->temperature, 1.0, 0);
        CHECK_NEAR(r->top_p, 1.0, 0);
        CHECK_INT_EQ(r->top_k, 0);
        CHECK(!r->has_seed);
        CHECK_INT_EQ(r->n_stop, 0);
        CHECK(!r->logprobs);
        CHECK_INT_EQ(r->top_logprobs, 0);
        CHECK(!r->speed.present);
        CHECK_INT_EQ(r->speed.depth.prefill_layers.kind, SPEED_CUTOFF_UNSET);
        CHECK(!r->speed.depth.has_anchors && !r->speed.depth.has_tail);
        CHECK(r->user == NULL);
        CHECK_INT_EQ(r->messages[0].content_len, 2);
    }
    speed_openai_request_destroy(r);

    /* integer temperature, temperature 0 and 2, top_p 1, stop as a string, seed limits */
    r = parse_ok(SPEED_OPENAI_CHAT,
                 CHAT(",\"temperature\":2,\"top_p\":1,\"stop\":\"x\","
                      "\"seed\":9223372036854775807,\"logprobs\":false,\"max_tokens\":1"),
                 0);
    if (r) {
        CHECK_NEAR(r->temperature, 2.0, 0);
        CHECK_INT_EQ(r->n_stop, 1);
        CHECK_STR_EQ(r->stop[0], "x");
        CHECK(r->seed == INT64_MAX);
        CHECK_INT_EQ(r->max_tokens, 1);
    }
    speed_openai_request_destroy(r);
    r = parse_ok(SPEED_OPENAI_CHAT, CHAT(",\"temperature\":0,\"speed\":{\"prefill_layers\":32}"), P_SPEED | P_LIMITS);
    if (r) {
        CHECK_NEAR(r->temperature, 0.0, 0);
        CHECK_INT_EQ(r->speed.resolved.prefill_layers, 32);
    }
    speed_openai_request_destroy(r);
    /* over the deployment's depth: what the request leaves unset comes from there */
    {
        speed_openai_parse_params_t p = params_of(P_SPEED);
        p.depth = (speed_depth_t){8, 2, 3};
        const char *b = CHAT(",\"speed\":{\"anchors\":0}");
        speed_openai_error_t err = {0};
        r = NULL;
        CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_CHAT, b, strlen(b), &p, &r, &err), SPEED_OK);
        if (r)
            CHECK(r->speed.resolved.prefill_layers == 8 && r->speed.resolved.anchors == 0 &&
                  r->speed.resolved.tail == 3);
        speed_openai_request_destroy(r);
        /* the message is the resolver's reason, word for word as a node or speedctl gives it */
        b = CHAT(",\"speed\":{\"prefill_layers\":40}");
        r = NULL;
        CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_CHAT, b, strlen(b), &p, &r, &err),
                     SPEED_ERR_INVALID_ARGUMENT);
        CHECK_CONTAINS(err.message, "prefill_layers 40 is outside 1..32");
        speed_openai_request_destroy(r);
        b = CHAT(",\"speed\":{\"prefill_layers\":1.5}");
        r = NULL;
        CHECK_INT_EQ(speed_openai_request_parse(SPEED_OPENAI_CHAT, b, strlen(b), &p, &r, &err),
                     SPEED_ERR_INVALID_ARGUMENT);
        CHECK_CONTAINS(err.message, "prefill_layers 1.5 is not a fraction in (0, 1]");
        speed_openai_request_destroy(r);
    }
    /* duplicate keys: the last one wins, as Python's json does */
    r = parse_ok(SPEED_OPENAI_CHAT, CHAT(",\"max_tokens\":5,\"max_tokens\":7"), 0);
    if (r) CHECK_INT_EQ(r->max_tokens, 7);
    speed_openai_request_destroy(r);
}

static void test_valid_completions(void) {
    speed_openai_request_t *r = parse_ok(SPEED_OPENAI_COMPLETIONS,
                                         COMP(",\"max_tokens\":16,\"logprobs\":3,\"echo\":false,\"best_of\":1,"
                                              "\"suffix\":null,\"stream\":false"),
                                         0);
    if (r) {
        CHECK_STR_EQ(r->prompt, "hi");
        CHECK_INT_EQ(r->prompt_len, 2);
        CHECK(r->prompt_ids == NULL);
        CHECK(r->logprobs);
        CHECK_INT_EQ(r->top_logprobs, 3);
        CHECK_INT_EQ(r->max_tokens, 16);
        CHECK(r->messages == NULL && r->n_messages == 0);
    }
    speed_openai_request_destroy(r);

    r = parse_ok(SPEED_OPENAI_COMPLETIONS, COMP(",\"logprobs\":0"), 0);
    if (r) {
        CHECK(r->logprobs);
        CHECK_INT_EQ(r->top_logprobs, 0);
    }
    speed_openai_request_destroy(r);

    r = parse_ok(SPEED_OPENAI_COMPLETIONS, PROMPT("[1, 2, 511, 0]"), P_LIMITS);
    if (r) {
        CHECK(r->prompt == NULL);
        CHECK_INT_EQ(r->n_prompt_ids, 4);
        CHECK(r->prompt_ids && r->prompt_ids[0] == 1 && r->prompt_ids[2] == 511 && r->prompt_ids[3] == 0);
    }
    speed_openai_request_destroy(r);

    r = parse_ok(SPEED_OPENAI_COMPLETIONS, PROMPT("[[7, 8]]"), 0);
    if (r) {
        CHECK_INT_EQ(r->n_prompt_ids, 2);
        CHECK(r->prompt_ids && r->prompt_ids[1] == 8);
    }
    speed_openai_request_destroy(r);

    r = parse_ok(SPEED_OPENAI_COMPLETIONS, PROMPT("[\"only one\"]"), 0);
    if (r) CHECK_STR_EQ(r->prompt, "only one");
    speed_openai_request_destroy(r);

    r = parse_ok(SPEED_OPENAI_COMPLETIONS, PROMPT("\"\""), 0);
    if (r) CHECK(r->prompt && r->prompt_len == 0);
    speed_openai_request_destroy(r);

    /* "messages" is just an unknown field for /v1/completions */
    r = parse_ok(SPEED_OPENAI_COMPLETIONS, COMP(",\"messages\":5,\"top_logprobs\":\"x\""), 0);
    speed_openai_request_destroy(r);
}

static void test_errors(void) {
    static const struct {
        speed_openai_error_kind_t kind;
        int http;
        const char *type;
        const char *code;
    } kinds[] = {
        {SPEED_OPENAI_ERR_INVALID_REQUEST, 400, "invalid_request_error", ""},
        {SPEED_OPENAI_ERR_INVALID_API_KEY, 401, "invalid_request_error", "invalid_api_key"},
        {SPEED_OPENAI_ERR_MODEL_NOT_FOUND, 404, "invalid_request_error", "model_not_found"},
        {SPEED_OPENAI_ERR_CONTEXT_LENGTH, 413, "invalid_request_error", "context_length_exceeded"},
        {SPEED_OPENAI_ERR_OVERLOADED, 429, "requests", "rate_limit_exceeded"},
        {SPEED_OPENAI_ERR_UNAVAILABLE, 503, "server_error", "service_unavailable"},
        {SPEED_OPENAI_ERR_INTERNAL, 500, "server_error", ""},
    };
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        CHECK_INT_EQ(speed_openai_error_http_status(kinds[i].kind), kinds[i].http);
        CHECK_STR_EQ(speed_openai_error_type(kinds[i].kind), kinds[i].type);
        speed_openai_error_t err;
        speed_openai_error_set(&err, kinds[i].kind, NULL, NULL, "x %d", 5);
        CHECK_STR_EQ(err.code, kinds[i].code);
        CHECK_STR_EQ(err.message, "x 5");
    }
    CHECK_INT_EQ(speed_openai_error_http_status((speed_openai_error_kind_t)99), 500);

    static const struct {
        speed_status_t st;
        int http;
    } table[] = {
        {SPEED_ERR_INVALID_ARGUMENT, 400},
        {SPEED_ERR_PARSE, 400},
        {SPEED_ERR_FORMAT, 400},
        {SPEED_ERR_UNSUPPORTED, 400},
        {SPEED_ERR_NOT_FOUND, 404},
        {SPEED_ERR_TOO_LONG, 413},
        {SPEED_ERR_CAPACITY, 429},
        {SPEED_ERR_TIMEOUT, 503},
        {SPEED_ERR_CANCELLED, 503},
        {SPEED_ERR_NO_MEMORY, 503},
        {SPEED_ERR_PEER_UNREACHABLE, 503},
        {SPEED_ERR_PEER_PROTOCOL, 503},
        {SPEED_ERR_TRANSFER, 503},
        {SPEED_ERR_IO, 500},
        {SPEED_ERR_DEVICE, 500},
        {SPEED_ERR_INTERNAL, 500},
        {SPEED_OK, 500},
        {(speed_status_t)-77, 500},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        speed_openai_error_t err;
        speed_openai_error_from_status(table[i].st, NULL, &err);
        CHECK_MSG(speed_openai_error_http_status(err.kind) == table[i].http, "status %d → %d", table[i].st,
                  speed_openai_error_http_status(err.kind));
        CHECK(err.message[0] != '\0');
    }
    speed_openai_error_t err;
    speed_openai_error_from_status(SPEED_ERR_NOT_FOUND, "no such model", &err);
    CHECK_STR_EQ(err.code, "model_not_found");
    CHECK_STR_EQ(err.message, "no such model");
    check_error_json(&err, 404, NULL, "model_not_found", "from_status");

    /* a long message is truncated, not overflowed */
    char big[1000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    speed_openai_error_set(&err, SPEED_OPENAI_ERR_INVALID_REQUEST, big, big, "%s", big);
    CHECK_INT_EQ(strlen(err.message), SPEED_OPENAI_ERROR_MESSAGE_MAX - 1);
    CHECK_INT_EQ(strlen(err.param), SPEED_OPENAI_ERROR_PARAM_MAX - 1);
    speed_openai_error_set(NULL, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL, "ignored");

    json_t *fb = json_loads(speed_openai_error_fallback_json(), 0, NULL);
    CHECK(fb && json_is_object(json_object_get(fb, "error")));
    json_decref(fb);

    char *sse = NULL;
    size_t len;
    speed_openai_error_set(&err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, NULL, "decode node lost");
    CHECK_INT_EQ(speed_openai_error_sse(&err, &sse, &len), SPEED_OK);
    CHECK(sse && strncmp(sse, "data: {\"error\":", 15) == 0);
    CHECK(sse && len > 2 && strcmp(sse + len - 2, "\n\n") == 0);
    speed_free(sse);

    /* a message with invalid UTF-8 (e.g. from a peer) still gives valid JSON */
    speed_openai_error_set(&err, SPEED_OPENAI_ERR_INTERNAL, NULL, NULL, "bad \xff byte");
    char *body = NULL;
    CHECK_INT_EQ(speed_openai_error_json(&err, &body, NULL), SPEED_OK);
    CHECK_CONTAINS(body, "bad \xef\xbf\xbd byte");
    speed_free(body);
}

static void test_model_and_length(void) {
    speed_openai_request_t *r = parse_ok(SPEED_OPENAI_CHAT, CHAT(",\"max_tokens\":100"), 0);
    if (!r) return;
    const char *models[] = {"other", "m"};
    speed_openai_error_t err;
    CHECK_INT_EQ(speed_openai_check_model(r, models, 2, &err), SPEED_OK);
    CHECK_INT_EQ(speed_openai_check_model(r, models, 1, &err), SPEED_ERR_NOT_FOUND);
    CHECK_INT_EQ(speed_openai_error_http_status(err.kind), 404);
    CHECK_STR_EQ(err.code, "model_not_found");
    CHECK_STR_EQ(err.param, "model");
    check_error_json(&err, 404, "model", "model_not_found", "model");

    int64_t mt = 0;
    CHECK_INT_EQ(speed_openai_check_length(r, 900, 1000, &mt, &err), SPEED_OK);
    CHECK_INT_EQ(mt, 100);
    CHECK_INT_EQ(speed_openai_check_length(r, 901, 1000, &mt, &err), SPEED_ERR_TOO_LONG);
    CHECK_INT_EQ(speed_openai_error_http_status(err.kind), 413);
    CHECK_STR_EQ(err.code, "context_length_exceeded");
    CHECK_STR_EQ(err.param, "messages");
    CHECK_CONTAINS(err.message, "1001 tokens");
    check_error_json(&err, 413, "messages", "context_length_exceeded", "length");
    r->max_tokens = -1;
    CHECK_INT_EQ(speed_openai_check_length(r, 999, 1000, &mt, &err), SPEED_OK);
    CHECK_INT_EQ(mt, 1);
    CHECK_INT_EQ(speed_openai_check_length(r, 1000, 1000, &mt, &err), SPEED_ERR_TOO_LONG);
    speed_openai_request_destroy(r);
}

static void test_auth(void) {
    const char *keys[] = {"sk-alpha", "sk-beta-longer"};
    speed_openai_error_t err;
    CHECK(speed_openai_auth_check(NULL, NULL, 0, &err)); /* auth off */
    CHECK(speed_openai_auth_check("Bearer sk-alpha", keys, 2, &err));
    CHECK(speed_openai_auth_check("bearer   sk-beta-longer  ", keys, 2, &err));
    CHECK(speed_openai_auth_check("BEARER\tsk-alpha", keys, 2, &err));
    static const char *const bad[] = {
        "Bearer sk-alph",  "Bearer sk-alphaX", "Bearer sk-beta",
        "Bearer SK-ALPHA", "Basic sk-alpha",   "sk-alpha",
        "Bearer",          "Bearer ",          "",
        "Bearersk-alpha",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&err, 0, sizeof err);
        CHECK_MSG(!speed_openai_auth_check(bad[i], keys, 2, &err), "accepted \"%s\"", bad[i]);
        CHECK_INT_EQ(speed_openai_error_http_status(err.kind), 401);
        CHECK_STR_EQ(speed_openai_error_type(err.kind), "invalid_request_error");
    }
    CHECK(!speed_openai_auth_check(NULL, keys, 2, &err));
    CHECK_STR_EQ(err.code, ""); /* missing key: code null */
    check_error_json(&err, 401, NULL, NULL, "auth missing");
    CHECK(!speed_openai_auth_check("Bearer nope", keys, 2, &err));
    CHECK_STR_EQ(err.code, "invalid_api_key");
    CHECK(!strstr(err.message, "nope")); /* the presented key is not echoed */
}

/* ---- response builders ------------------------------------------------------------- */

static const speed_openai_top_logprob_t tops0[] = {{"Hel", 3, -0.1}, {"He", 2, -2.5}};
static const speed_openai_top_logprob_t tops1[] = {{"\xe6\x97", 2, -0.2}, {"lo", 2, -INFINITY}};
static const speed_openai_token_logprob_t lps[] = {
    {"Hel", 3, -0.1, tops0, 2},
    {"\xe6\x97", 2, -0.2, tops1, 2}, /* half of 日: a byte-level token */
    {"\xa5", 1, -0.3, NULL, 0},
};

static json_t *load_checked(const char *s, size_t len) {
    json_error_t jerr;
    json_t *j = json_loadb(s, len, 0, &jerr);
    CHECK_MSG(j != NULL, "does not parse (%s): %.*s", jerr.text, (int)len, s);
    return j;
}

static void test_chat_response(void) {
    speed_openai_usage_t usage = {12, 3, 4096, 5120};
    speed_openai_response_t r = {
        .id = "chatcmpl-1",
        .model = "m",
        .created = 1700000000,
        .text = "Hel\xe6\x97\xa5",
        .text_len = 6,
        .finish = SPEED_OPENAI_FINISH_STOP,
        .has_logprobs = true,
        .logprobs = lps,
        .n_logprobs = 3,
        .usage = &usage,
    };
    char *s = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_openai_response_json(SPEED_OPENAI_CHAT, &r, &s, &len), SPEED_OK);
    if (!s) return;
    CHECK_INT_EQ(strlen(s), len);
    CHECK(!strchr(s, '\n') && !strstr(s, ": ")); /* compact */
    json_t *j = load_checked(s, len);
    CHECK_STR_EQ(json_string_value(json_object_get(j, "id")), "chatcmpl-1");
    CHECK_STR_EQ(json_string_value(json_object_get(j, "object")), "chat.completion");
    CHECK_INT_EQ(json_integer_value(json_object_get(j, "created")), 1700000000);
    CHECK_STR_EQ(json_string_value(json_object_get(j, "model")), "m");
    json_t *ch = json_array_get(json_object_get(j, "choices"), 0);
    CHECK_INT_EQ(json_array_size(json_object_get(j, "choices")), 1);
    CHECK_INT_EQ(json_integer_value(json_object_get(ch, "index")), 0);
    CHECK_STR_EQ(json_string_value(json_object_get(ch, "finish_reason")), "stop");
    json_t *msg = json_object_get(ch, "message");
    CHECK_STR_EQ(json_string_value(json_object_get(msg, "role")), "assistant");
    CHECK_STR_EQ(json_string_value(json_object_get(msg, "content")), "Hel\xe6\x97\xa5");
    json_t *content = json_object_get(json_object_get(ch, "logprobs"), "content");
    CHECK_INT_EQ(json_array_size(content), 3);
    json_t *t0 = json_array_get(content, 0), *t1 = json_array_get(content, 1);
    CHECK_STR_EQ(json_string_value(json_object_get(t0, "token")), "Hel");
    CHECK_NEAR(json_real_value(json_object_get(t0, "logprob")), -0.1, 1e-9);
    CHECK_INT_EQ(json_array_size(json_object_get(t0, "bytes")), 3);
    CHECK_INT_EQ(json_integer_value(json_array_get(json_object_get(t0, "bytes"), 0)), 'H');
    CHECK_INT_EQ(json_array_size(json_object_get(t0, "top_logprobs")), 2);
    json_t *top01 = json_array_get(json_object_get(t0, "top_logprobs"), 1);
    CHECK_STR_EQ(json_string_value(json_object_get(top01, "token")), "He");
    CHECK_NEAR(json_real_value(json_object_get(top01, "logprob")), -2.5, 1e-9);
    CHECK_STR_EQ(json_string_value(json_object_get(t1, "token")), "bytes:\\xe6\\x97");
    CHECK_INT_EQ(json_integer_value(json_array_get(json_object_get(t1, "bytes"), 0)), 0xe6);
    CHECK_INT_EQ(json_integer_value(json_array_get(json_object_get(t1, "bytes"), 1)), 0x97);
    json_t *top11 = json_array_get(json_object_get(t1, "top_logprobs"), 1);
    CHECK_NEAR(json_real_value(json_object_get(top11, "logprob")), -9999.0, 0);
    CHECK_INT_EQ(json_array_size(json_object_get(json_array_get(content, 2), "top_logprobs")), 0);
    json_t *u = json_object_get(j, "usage");
    CHECK_INT_EQ(json_integer_value(json_object_get(u, "prompt_tokens")), 12);
    CHECK_INT_EQ(json_integer_value(json_object_get(u, "completion_tokens")), 3);
    CHECK_INT_EQ(json_integer_value(json_object_get(u, "total_tokens")), 15);
    CHECK_INT_EQ(json_integer_value(json_object_get(u, "kv_bytes")), 4096);
    CHECK_INT_EQ(json_integer_value(json_object_get(u, "kv_full_depth_bytes")), 5120);
    json_decref(j);
    speed_free(s);

    /* no logprobs, no usage, finish length, invalid UTF-8 text, KV fields omitted */
    speed_openai_usage_t u2 = {1, 2, -1, -1};
    r.has_logprobs = false;
    r.usage = &u2;
    r.finish = SPEED_OPENAI_FINISH_LENGTH;
    r.text = "a\xff";
    r.text_len = 2;
    CHECK_INT_EQ(speed_openai_response_json(SPEED_OPENAI_CHAT, &r, &s, &len), SPEED_OK);
    j = load_checked(s, len);
    ch = json_array_get(json_object_get(j, "choices"), 0);
    CHECK(json_is_null(json_object_get(ch, "logprobs")));
    CHECK_STR_EQ(json_string_value(json_object_get(ch, "finish_reason")), "length");
    CHECK_STR_EQ(json_string_value(json_object_get(json_object_get(ch, "message"), "content")), "a\xef\xbf\xbd");
    u = json_object_get(j, "usage");
    CHECK(json_object_get(u, "kv_bytes") == NULL);
    CHECK_INT_EQ(json_object_size(u), 3);
    json_decref(j);
    speed_free(s);

    r.usage = NULL;
    r.finish = SPEED_OPENAI_FINISH_NONE;
    CHECK_INT_EQ(speed_openai_response_json(SPEED_OPENAI_CHAT, &r, &s, &len), SPEED_OK);
    j = load_checked(s, len);
    CHECK(json_object_get(j, "usage") == NULL);
    CHECK(json_is_null(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "finish_reason")));
    json_decref(j);
    speed_free(s);
    CHECK_INT_EQ(speed_openai_response_json(SPEED_OPENAI_CHAT, NULL, &s, &len), SPEED_ERR_INTERNAL);
}

static void test_completion_response(void) {
    speed_openai_usage_t usage = {5, 3, 100, 200};
    speed_openai_response_t r = {
        .id = "cmpl-9",
        .model = "m",
        .created = 1,
        .text = "Hel\xe6\x97\xa5",
        .text_len = 6,
        .finish = SPEED_OPENAI_FINISH_LENGTH,
        .has_logprobs = true,
        .logprobs = lps,
        .n_logprobs = 3,
        .usage = &usage,
    };
    char *s = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_openai_response_json(SPEED_OPENAI_COMPLETIONS, &r, &s, &len), SPEED_OK);
    if (!s) return;
    json_t *j = load_checked(s, len);
    CHECK_STR_EQ(json_string_value(json_object_get(j, "object")), "text_completion");
    json_t *ch = json_array_get(json_object_get(j, "choices"), 0);
    CHECK_STR_EQ(json_string_value(json_object_get(ch, "text")), "Hel\xe6\x97\xa5");
    CHECK_STR_EQ(json_string_value(json_object_get(ch, "finish_reason")), "length");
    json_t *lp = json_object_get(ch, "logprobs");
    CHECK_INT_EQ(json_array_size(json_object_get(lp, "tokens")), 3);
    CHECK_STR_EQ(json_string_value(json_array_get(json_object_get(lp, "tokens"), 0)), "Hel");
    CHECK_STR_EQ(json_string_value(json_array_get(json_object_get(lp, "tokens"), 2)), "bytes:\\xa5");
    CHECK_NEAR(json_real_value(json_array_get(json_object_get(lp, "token_logprobs"), 1)), -0.2, 1e-9);
    json_t *tops = json_object_get(lp, "top_logprobs");
    CHECK_INT_EQ(json_array_size(tops), 3);
    CHECK_NEAR(json_real_value(json_object_get(json_array_get(tops, 0), "He")), -2.5, 1e-9);
    CHECK_NEAR(json_real_value(json_object_get(json_array_get(tops, 1), "bytes:\\xe6\\x97")), -0.2, 1e-9);
    CHECK_INT_EQ(json_object_size(json_array_get(tops, 2)), 0);
    json_t *off = json_object_get(lp, "text_offset");
    CHECK_INT_EQ(json_integer_value(json_array_get(off, 0)), 0);
    CHECK_INT_EQ(json_integer_value(json_array_get(off, 1)), 3);
    CHECK_INT_EQ(json_integer_value(json_array_get(off, 2)), 5);
    CHECK(json_object_get(ch, "message") == NULL);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(j, "usage"), "total_tokens")), 8);
    json_decref(j);
    speed_free(s);
}

/* Splits an SSE stream into events; every event must be "data: ...\n\n". Returns the
 * number of events and the JSON of each (NULL for [DONE]). */
static size_t sse_split(const char *stream, json_t **events, size_t max, bool *done) {
    size_t n = 0;
    *done = false;
    const char *p = stream;
    while (*p) {
        CHECK_MSG(strncmp(p, "data: ", 6) == 0, "event does not start with data: %s", p);
        const char *end = strstr(p, "\n\n");
        CHECK(end != NULL);
        if (!end || n == max) break;
        const char *payload = p + 6;
        size_t plen = (size_t)(end - payload);
        CHECK(!memchr(payload, '\n', plen)); /* one line per event */
        if (plen == 6 && strncmp(payload, "[DONE]", 6) == 0) {
            *done = true;
            CHECK(end[2] == '\0'); /* nothing after [DONE] */
            events[n++] = NULL;
        } else {
            events[n++] = load_checked(payload, plen);
        }
        p = end + 2;
    }
    return n;
}

static void append(char **buf, size_t *len, const char *s, size_t n) {
    *buf = realloc(*buf, *len + n + 1);
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[*len] = '\0';
}

static void add_chunk(speed_openai_api_t api, const speed_openai_chunk_t *c, char **stream, size_t *len) {
    char *s = NULL;
    size_t n = 0;
    CHECK_INT_EQ(speed_openai_chunk_sse(api, c, &s, &n), SPEED_OK);
    if (!s) return;
    CHECK_INT_EQ(strlen(s), n);
    append(stream, len, s, n);
    speed_free(s);
}

static void test_chat_stream(void) {
    speed_openai_usage_t usage = {7, 3, 10, 20};
    const char *pieces[] = {"Hel", "lo", " \xe6\x97\xa5"};
    char *stream = NULL;
    size_t len = 0;
    speed_openai_chunk_t c = {.id = "chatcmpl-s", .model = "m", .created = 42, .include_usage = true};
    c.kind = SPEED_OPENAI_CHUNK_ROLE;
    add_chunk(SPEED_OPENAI_CHAT, &c, &stream, &len);
    for (size_t i = 0; i < 3; i++) {
        c.kind = SPEED_OPENAI_CHUNK_CONTENT;
        c.text = pieces[i];
        c.text_len = strlen(pieces[i]);
        c.has_logprobs = i == 0;
        c.logprobs = lps;
        c.n_logprobs = 1;
        add_chunk(SPEED_OPENAI_CHAT, &c, &stream, &len);
    }
    c.kind = SPEED_OPENAI_CHUNK_FINISH;
    c.finish = SPEED_OPENAI_FINISH_STOP;
    add_chunk(SPEED_OPENAI_CHAT, &c, &stream, &len);
    c.kind = SPEED_OPENAI_CHUNK_USAGE;
    c.usage = &usage;
    add_chunk(SPEED_OPENAI_CHAT, &c, &stream, &len);
    size_t dl;
    const char *done = speed_openai_sse_done(&dl);
    CHECK_STR_EQ(done, "data: [DONE]\n\n");
    CHECK_INT_EQ(dl, 14);
    append(&stream, &len, done, dl);

    json_t *ev[16];
    bool got_done;
    size_t n = sse_split(stream, ev, 16, &got_done);
    CHECK_INT_EQ(n, 7);
    CHECK(got_done);
    char text[64] = "";
    for (size_t i = 0; i + 1 < n; i++) {
        json_t *e = ev[i];
        CHECK_STR_EQ(json_string_value(json_object_get(e, "object")), "chat.completion.chunk");
        CHECK_STR_EQ(json_string_value(json_object_get(e, "id")), "chatcmpl-s");
        CHECK_INT_EQ(json_integer_value(json_object_get(e, "created")), 42);
        json_t *choices = json_object_get(e, "choices");
        if (i == n - 2) { /* usage chunk */
            CHECK_INT_EQ(json_array_size(choices), 0);
            json_t *u = json_object_get(e, "usage");
            CHECK_INT_EQ(json_integer_value(json_object_get(u, "total_tokens")), 10);
            CHECK_INT_EQ(json_integer_value(json_object_get(u, "kv_bytes")), 10);
            continue;
        }
        CHECK(json_is_null(json_object_get(e, "usage")));
        json_t *ch = json_array_get(choices, 0);
        json_t *delta = json_object_get(ch, "delta");
        CHECK(json_is_object(delta));
        if (i == 0) {
            CHECK_STR_EQ(json_string_value(json_object_get(delta, "role")), "assistant");
            CHECK_STR_EQ(json_string_value(json_object_get(delta, "content")), "");
        } else {
            CHECK(json_object_get(delta, "role") == NULL);
        }
        const char *piece = json_string_value(json_object_get(delta, "content"));
        if (piece) strncat(text, piece, sizeof text - strlen(text) - 1);
        json_t *fr = json_object_get(ch, "finish_reason");
        if (i == n - 3) {
            CHECK_STR_EQ(json_string_value(fr), "stop");
            CHECK_INT_EQ(json_object_size(delta), 0);
        } else {
            CHECK(json_is_null(fr));
        }
        json_t *lp = json_object_get(ch, "logprobs");
        if (i == 1) {
            CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(json_object_get(lp, "content"), 0), "token")),
                         "Hel");
        } else {
            CHECK(json_is_null(lp));
        }
    }
    CHECK_STR_EQ(text, "Hello \xe6\x97\xa5");
    for (size_t i = 0; i < n; i++) json_decref(ev[i]);
    free(stream);

    /* without include_usage there is no usage member at all */
    speed_openai_chunk_t c2 = {.kind = SPEED_OPENAI_CHUNK_CONTENT, .id = "x", .model = "m", .text = "a", .text_len = 1};
    char *s = NULL;
    size_t sl;
    CHECK_INT_EQ(speed_openai_chunk_sse(SPEED_OPENAI_CHAT, &c2, &s, &sl), SPEED_OK);
    CHECK(s && !strstr(s, "usage"));
    speed_free(s);
    c2.kind = SPEED_OPENAI_CHUNK_USAGE; /* without usage: a caller bug */
    CHECK_INT_EQ(speed_openai_chunk_sse(SPEED_OPENAI_CHAT, &c2, &s, &sl), SPEED_ERR_INTERNAL);
    c2.kind = SPEED_OPENAI_CHUNK_ROLE;
    CHECK_INT_EQ(speed_openai_chunk_sse(SPEED_OPENAI_COMPLETIONS, &c2, &s, &sl), SPEED_ERR_INTERNAL);
}

static void test_completion_stream(void) {
    speed_openai_usage_t usage = {2, 2, -1, -1};
    char *stream = NULL;
    size_t len = 0;
    speed_openai_chunk_t c = {.id = "cmpl-s", .model = "m", .created = 1};
    c.kind = SPEED_OPENAI_CHUNK_CONTENT;
    c.text = "Hel";
    c.text_len = 3;
    c.has_logprobs = true;
    c.logprobs = lps;
    c.n_logprobs = 1;
    add_chunk(SPEED_OPENAI_COMPLETIONS, &c, &stream, &len);
    c.text = "\xe6\x97\xa5";
    c.text_len = 3;
    c.logprobs = lps + 1;
    c.n_logprobs = 2;
    c.text_offset = 3;
    add_chunk(SPEED_OPENAI_COMPLETIONS, &c, &stream, &len);
    c.kind = SPEED_OPENAI_CHUNK_FINISH;
    c.finish = SPEED_OPENAI_FINISH_LENGTH;
    add_chunk(SPEED_OPENAI_COMPLETIONS, &c, &stream, &len);
    c.kind = SPEED_OPENAI_CHUNK_USAGE;
    c.usage = &usage;
    add_chunk(SPEED_OPENAI_COMPLETIONS, &c, &stream, &len);
    append(&stream, &len, speed_openai_sse_done(NULL), 14);

    json_t *ev[8];
    bool got_done;
    size_t n = sse_split(stream, ev, 8, &got_done);
    CHECK_INT_EQ(n, 5);
    CHECK(got_done);
    char text[32] = "";
    for (size_t i = 0; i < 3 && i < n; i++) {
        CHECK_STR_EQ(json_string_value(json_object_get(ev[i], "object")), "text_completion");
        json_t *ch = json_array_get(json_object_get(ev[i], "choices"), 0);
        strncat(text, json_string_value(json_object_get(ch, "text")), 8);
        if (i == 1) {
            json_t *off = json_object_get(json_object_get(ch, "logprobs"), "text_offset");
            CHECK_INT_EQ(json_integer_value(json_array_get(off, 0)), 3);
            CHECK_INT_EQ(json_integer_value(json_array_get(off, 1)), 5);
        }
        json_t *fr = json_object_get(ch, "finish_reason");
        if (i == 2)
            CHECK_STR_EQ(json_string_value(fr), "length");
        else
            CHECK(json_is_null(fr));
    }
    CHECK_STR_EQ(text, "Hel\xe6\x97\xa5");
    if (n == 5) {
        CHECK_INT_EQ(json_array_size(json_object_get(ev[3], "choices")), 0);
        CHECK_INT_EQ(json_object_size(json_object_get(ev[3], "usage")), 3);
    }
    for (size_t i = 0; i < n; i++) json_decref(ev[i]);
    free(stream);
}

static void test_models(void) {
    const char *ids[] = {"llama-3.1-8b", "tiny"};
    char *s = NULL;
    size_t len;
    CHECK_INT_EQ(speed_openai_models_json(ids, 2, 123, NULL, &s, &len), SPEED_OK);
    json_t *j = load_checked(s, len);
    CHECK_STR_EQ(json_string_value(json_object_get(j, "object")), "list");
    json_t *data = json_object_get(j, "data");
    CHECK_INT_EQ(json_array_size(data), 2);
    json_t *m1 = json_array_get(data, 1);
    CHECK_STR_EQ(json_string_value(json_object_get(m1, "id")), "tiny");
    CHECK_STR_EQ(json_string_value(json_object_get(m1, "object")), "model");
    CHECK_INT_EQ(json_integer_value(json_object_get(m1, "created")), 123);
    CHECK_STR_EQ(json_string_value(json_object_get(m1, "owned_by")), "speedserve");
    json_decref(j);
    speed_free(s);
    CHECK_INT_EQ(speed_openai_models_json(NULL, 0, 0, "me", &s, &len), SPEED_OK);
    CHECK_STR_EQ(s, "{\"object\":\"list\",\"data\":[]}");
    speed_free(s);
}

/* ---- tokenization ------------------------------------------------------------------ */

static speed_tok_t *load_tokenizer(char *dir, size_t cap) {
    snprintf(dir, cap, "%s", tu_tmp_init("router_openai"));
    if (speed_tok_write_default(dir, SPEED_TOK_DEFAULT_N_VOCAB) != SPEED_OK) return NULL;
    speed_tok_t *tok = NULL;
    if (speed_tok_load(dir, NULL, &tok) != SPEED_OK) return NULL;
    return tok;
}

static void test_tokenize(speed_tok_t *tok) {
    speed_openai_error_t err;
    speed_openai_request_t *r = parse_ok(SPEED_OPENAI_CHAT,
                                         MSG("{\"role\":\"system\",\"content\":\"Be short.\"},"
                                             "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hello\"},"
                                             "{\"type\":\"text\",\"text\":\"there\"}]}"),
                                         0);
    if (!r) return;
    speed_tok_ids_t ids = {0};
    CHECK_INT_EQ(speed_openai_request_tokenize(r, tok, &ids, &err), SPEED_OK);
    /* the same as rendering and encoding by hand */
    speed_chat_message_t msgs[] = {{"system", "Be short."}, {"user", "Hello\nthere"}};
    char *text = NULL;
    CHECK_INT_EQ(speed_tok_chat_render(tok, msgs, 2, true, &text), SPEED_OK);
    speed_tok_ids_t want = {0};
    CHECK_INT_EQ(speed_tok_encode(tok, text, strlen(text), false, &want), SPEED_OK);
    CHECK_INT_EQ(ids.n, want.n);
    CHECK(ids.n == want.n && memcmp(ids.ids, want.ids, ids.n * sizeof *ids.ids) == 0);
    CHECK(ids.n > 0 && ids.ids[0] == speed_tok_bos_id(tok));
    speed_free(text);
    speed_tok_ids_free(&want);
    speed_openai_request_destroy(r);

    /* text prompt: appended to what *ids holds, with the BOS */
    size_t before = ids.n;
    r = parse_ok(SPEED_OPENAI_COMPLETIONS, PROMPT("\"Hello there\""), 0);
    CHECK_INT_EQ(speed_openai_request_tokenize(r, tok, &ids, &err), SPEED_OK);
    CHECK(ids.n > before + 1 && ids.ids[before] == speed_tok_bos_id(tok));
    speed_openai_request_destroy(r);

    /* ids: copied; out of the vocabulary → 400 and *ids unchanged */
    r = parse_ok(SPEED_OPENAI_COMPLETIONS, PROMPT("[5, 6, 7]"), 0);
    before = ids.n;
    CHECK_INT_EQ(speed_openai_request_tokenize(r, tok, &ids, &err), SPEED_OK);
    CHECK(ids.n == before + 3 && ids.ids[before + 2] == 7);
    speed_openai_request_destroy(r);
    r = parse_ok(SPEED_OPENAI_COMPLETIONS, PROMPT("[5, 512]"), 0);
    before = ids.n;
    CHECK_INT_EQ(speed_openai_request_tokenize(r, tok, &ids, &err), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_openai_error_http_status(err.kind), 400);
    CHECK_STR_EQ(err.param, "prompt");
    CHECK_INT_EQ(ids.n, before);
    speed_openai_request_destroy(r);
    speed_tok_ids_free(&ids);
}

/* Each reference conversation sent as an OpenAI chat request: the router's token ids equal
 * the reference ids of the data file (Jinja2-rendered Llama 2 template, tokenised by Hugging
 * Face and checked against Meta's dialog encoding; README.md beside it). The empty
 * conversation has no request form: the router refuses it (400, "messages"). */
static int test_chat_vectors(void) {
    char dir[1024], path[1200];
    if (!tok_test_dir("llama2", dir, sizeof dir)) {
        fprintf(stderr, "skipped: $SPEED_TEST_DATA is not set (the Llama 2 chat vectors are there)\n");
        return 77;
    }
    snprintf(path, sizeof path, "%s/chat_vectors.jsonl", dir);
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "skipped: %s is missing\n", path);
        return 77;
    }
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    json_t *cases = tok_test_read_jsonl(path);
    CHECK(cases != NULL);
    if (!tok || !cases) {
        speed_tok_destroy(tok);
        json_decref(cases);
        return CHECK_DONE();
    }
    static char body[65536];
    size_t i, n_checked = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *req = json_pack("{s:s, s:O}", "model", "m", "messages", json_object_get(c, "messages"));
        size_t len = req ? json_dumpb(req, body, sizeof body - 1, JSON_COMPACT) : 0;
        json_decref(req);
        CHECK(len > 0 && len < sizeof body - 1);
        if (len == 0 || len >= sizeof body - 1) continue;
        body[len] = '\0';
        speed_openai_parse_params_t p = params_of(P_DEFAULT);
        speed_openai_request_t *r = NULL;
        speed_openai_error_t err = {0};
        speed_status_t st = speed_openai_request_parse(SPEED_OPENAI_CHAT, body, len, &p, &r, &err);
        if (json_array_size(json_object_get(c, "messages")) == 0) {
            CHECK_INT_EQ(st, SPEED_ERR_INVALID_ARGUMENT);
            CHECK_INT_EQ(speed_openai_error_http_status(err.kind), 400);
            CHECK_STR_EQ(err.param, "messages");
            speed_openai_request_destroy(r);
            continue;
        }
        CHECK_MSG(st == SPEED_OK, "chat case %zu: parse failed: %s", i, err.message);
        speed_tok_ids_t ids = {0};
        if (r) CHECK_INT_EQ(speed_openai_request_tokenize(r, tok, &ids, &err), SPEED_OK);
        char what[64];
        snprintf(what, sizeof what, "router, chat case %zu", i);
        CHECK(tok_test_ids_equal(&ids, 0, json_object_get(c, "ids"), what));
        speed_tok_ids_free(&ids);
        speed_openai_request_destroy(r);
        n_checked++;
    }
    CHECK_INT_EQ(n_checked, 7); /* 8 conversations, one empty */
    fprintf(stderr, "router chat requests equal to the reference ids: %zu\n", n_checked);
    json_decref(cases);
    speed_tok_destroy(tok);
    return CHECK_DONE();
}

/* ---- fault injection --------------------------------------------------------------- */

/* jansson's memory goes through speed_malloc (counted, failures injected) unless
 * json_exempt is set: then it comes from plain malloc, counted here, and never fails.
 *
 * Why exempt: jansson 2.14's lexer ignores a failed growth of its token buffer. A token
 * (quotes included) longer than 15 bytes then loses characters silently ("prefill_layers"
 * became "prefill_lyers", a 20-digit number lost a digit) and one of exactly 16, 32,
 * 64... bytes makes it write past the buffer. Production never sees that failure
 * (speed_malloc aborts on a real one), so: bodies whose tokens are all <= 15 bytes run
 * with jansson's allocations failing too; longer bodies run with only speedserve's own
 * allocations failing. */
typedef union {
    struct {
        uint32_t magic;
    } h;
    max_align_t align_;
} json_hdr_t;

#define JSON_MAGIC_COUNTED 0x6a736f6eu
#define JSON_MAGIC_PLAIN   0x706c616eu
static bool json_exempt;
static int64_t json_plain_live;

static void *test_json_malloc(size_t n) {
    json_hdr_t *h;
    if (json_exempt) {
        h = malloc(sizeof *h + n);
        if (!h) abort();
        h->h.magic = JSON_MAGIC_PLAIN;
        json_plain_live++;
    } else {
        h = speed_malloc(sizeof *h + n);
        if (!h) return NULL;
        h->h.magic = JSON_MAGIC_COUNTED;
    }
    return h + 1;
}

static void test_json_free(void *p) {
    if (!p) return;
    json_hdr_t *h = (json_hdr_t *)p - 1;
    if (h->h.magic == JSON_MAGIC_PLAIN) {
        json_plain_live--;
        free(h);
    } else {
        if (h->h.magic != JSON_MAGIC_COUNTED) abort();
        speed_free(h);
    }
}

typedef speed_status_t (*op_fn)(void *arg, speed_openai_error_t *err);

/* Fails the 0th, 1st, ... allocation of op until it runs clean, then everything at once
 * (sticky). A failure must give NO_MEMORY (a 503 when op reports an error), or for an op
 * whose clean run is a client error (`clean`), that same status; nothing may stay
 * allocated. Returns the number of injected failures. */
static int fault_loop(const char *name, op_fn op, void *arg, speed_status_t clean) {
    int n;
    for (n = 0; n < 100000; n++) {
        int64_t live = speed_alloc_live_count(), plain = json_plain_live;
        speed_openai_error_t err;
        memset(&err, 0, sizeof err);
        speed_alloc_fail_after(n, 0);
        speed_status_t st = op(arg, &err);
        int64_t injected = speed_alloc_injected_failures();
        speed_alloc_fail_after(-1, 0);
        CHECK_MSG(speed_alloc_live_count() == live && json_plain_live == plain, "%s: leak at failure %d (%lld live)",
                  name, n, (long long)(speed_alloc_live_count() - live + json_plain_live - plain));
        if (injected == 0) {
            CHECK_MSG(st == clean, "%s: clean run gave %d, want %d (%s)", name, st, clean, err.message);
            break;
        }
        CHECK_MSG(st == SPEED_ERR_NO_MEMORY || (clean != SPEED_OK && st == clean), "%s: failure %d gave status %d (%s)",
                  name, n, st, err.message);
        if (st == SPEED_ERR_NO_MEMORY && err.message[0]) CHECK_INT_EQ(speed_openai_error_http_status(err.kind), 503);
    }
    int64_t live = speed_alloc_live_count(), plain = json_plain_live;
    speed_openai_error_t err;
    speed_alloc_fail_after(0, 1);
    speed_status_t st = op(arg, &err);
    speed_alloc_fail_after(-1, 0);
    CHECK_MSG(st == SPEED_ERR_NO_MEMORY || (clean != SPEED_OK && st == clean), "%s: sticky failure gave %d", name, st);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    CHECK_INT_EQ(json_plain_live, plain);
    return n;
}

typedef struct {
    speed_openai_api_t api;
    const char *body;
    int flags;
    speed_status_t clean;
} parse_arg_t;

static speed_status_t op_parse(void *p, speed_openai_error_t *err) {
    const parse_arg_t *a = p;
    speed_openai_parse_params_t pp = params_of(a->flags);
    speed_openai_request_t *r = NULL;
    speed_status_t st = speed_openai_request_parse(a->api, a->body, strlen(a->body), &pp, &r, err);
    speed_openai_request_destroy(r);
    return st;
}

static speed_status_t op_response(void *p, speed_openai_error_t *err) {
    speed_openai_usage_t usage = {1, 2, 3, 4};
    speed_openai_response_t r = {.id = "i",
                                 .model = "m",
                                 .text = "Hel\xe6\x97",
                                 .text_len = 5,
                                 .has_logprobs = true,
                                 .logprobs = lps,
                                 .n_logprobs = 3,
                                 .usage = &usage};
    char *s = NULL;
    speed_status_t st = speed_openai_response_json(*(speed_openai_api_t *)p, &r, &s, NULL);
    speed_free(s);
    return st;
}

static speed_status_t op_chunks(void *p, speed_openai_error_t *err) {
    speed_openai_api_t api = *(speed_openai_api_t *)p;
    speed_openai_usage_t usage = {1, 2, 3, 4};
    speed_openai_chunk_t c = {.id = "i",
                              .model = "m",
                              .text = "x\xff",
                              .text_len = 2,
                              .has_logprobs = true,
                              .logprobs = lps,
                              .n_logprobs = 3,
                              .usage = &usage,
                              .include_usage = true,
                              .finish = SPEED_OPENAI_FINISH_STOP};
    for (int k = api == SPEED_OPENAI_CHAT ? 0 : 1; k <= SPEED_OPENAI_CHUNK_USAGE; k++) {
        c.kind = (speed_openai_chunk_kind_t)k;
        char *s = NULL;
        speed_status_t st = speed_openai_chunk_sse(api, &c, &s, NULL);
        speed_free(s);
        if (st != SPEED_OK) return st;
    }
    return SPEED_OK;
}

static speed_status_t op_misc(void *p, speed_openai_error_t *e) {
    const char *ids[] = {"a", "b\xff"};
    char *s = NULL;
    SPEED_CHECK(speed_openai_models_json(ids, 2, 0, NULL, &s, NULL));
    speed_free(s);
    speed_openai_error_t err;
    speed_openai_error_set(&err, SPEED_OPENAI_ERR_INVALID_REQUEST, "x", "y", "bad");
    SPEED_CHECK(speed_openai_error_json(&err, &s, NULL));
    speed_free(s);
    SPEED_CHECK(speed_openai_error_sse(&err, &s, NULL));
    speed_free(s);
    return SPEED_OK;
}

typedef struct {
    speed_tok_t *tok;
    const char *body;
    speed_openai_api_t api;
} tok_arg_t;

static speed_status_t op_tokenize(void *p, speed_openai_error_t *err) {
    const tok_arg_t *a = p;
    speed_openai_request_t *r = NULL;
    speed_status_t st = speed_openai_request_parse(a->api, a->body, strlen(a->body), NULL, &r, err);
    if (st != SPEED_OK) return st;
    speed_tok_ids_t ids = {0};
    st = speed_openai_request_tokenize(r, a->tok, &ids, err);
    speed_tok_ids_free(&ids);
    speed_openai_request_destroy(r);
    return st;
}

static void test_fault_injection(speed_tok_t *tok) {
    const speed_status_t BAD = SPEED_ERR_INVALID_ARGUMENT;
    /* every token <= 15 bytes: jansson's allocations fail too */
    static const parse_arg_t short_tokens[] = {
        {SPEED_OPENAI_CHAT,
         "{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":\"s\",\"name\":\"n\"},"
         "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\","
         "\"text\":\"b\"}]},{\"role\":\"assistant\",\"content\":null},{\"role\":\"tool\","
         "\"content\":\"x\",\"tool_call_id\":\"t\"}],\"stop\":[\"a\",\"b\"],\"user\":\"u\","
         "\"speed\":{\"anchors\":1,\"tail\":2},\"stream\":true,\"logprobs\":true,"
         "\"top_logprobs\":2,\"tools\":[{\"a\":[1,2,{}]}],\"seed\":12345}",
         P_SPEED, SPEED_OK},
        {SPEED_OPENAI_COMPLETIONS, PROMPT("[[1,2,3]]"), 0, SPEED_OK},
        {SPEED_OPENAI_COMPLETIONS, COMP(",\"stop\":\"s\",\"logprobs\":2"), 0, SPEED_OK},
        {SPEED_OPENAI_CHAT, CHAT(",\"n\":2,\"stop\":[\"a\",\"b\"]"), 0, SPEED_ERR_INVALID_ARGUMENT},
        {SPEED_OPENAI_CHAT, MSG("{\"role\":\"x\",\"content\":\"a\"}"), 0, SPEED_ERR_INVALID_ARGUMENT},
        {SPEED_OPENAI_CHAT, "{\"model\":", 0, SPEED_ERR_INVALID_ARGUMENT},
        {SPEED_OPENAI_CHAT, "[1,2]", 0, SPEED_ERR_INVALID_ARGUMENT},
    };
    /* longer tokens: only speedserve's own allocations fail */
    static const parse_arg_t long_tokens[] = {
        {SPEED_OPENAI_CHAT,
         CHAT(",\"stream\":true,\"stream_options\":{\"include_usage\":true},"
              "\"speed\":{\"prefill_layers\":0.5},\"max_completion_tokens\":5,"
              "\"user\":\"a-rather-long-user-identifier\""),
         P_SPEED, SPEED_OK},
        {SPEED_OPENAI_CHAT, CHAT(",\"seed\":18446744073709551615"), 0, BAD},
        {SPEED_OPENAI_COMPLETIONS, PROMPT("[1,99999999999999999999]"), 0, BAD},
        {SPEED_OPENAI_CHAT, CHAT(",\"temperature\":1e400"), 0, BAD},
    };
    int total = 0;
    char name[48];
    for (size_t i = 0; i < sizeof short_tokens / sizeof short_tokens[0]; i++) {
        snprintf(name, sizeof name, "parse (jansson failing) %zu", i);
        total += fault_loop(name, op_parse, (void *)&short_tokens[i], short_tokens[i].clean);
    }
    json_exempt = true;
    for (size_t i = 0; i < sizeof short_tokens / sizeof short_tokens[0]; i++) {
        snprintf(name, sizeof name, "parse (jansson exempt) %zu", i);
        total += fault_loop(name, op_parse, (void *)&short_tokens[i], short_tokens[i].clean);
    }
    for (size_t i = 0; i < sizeof long_tokens / sizeof long_tokens[0]; i++) {
        snprintf(name, sizeof name, "parse long (jansson exempt) %zu", i);
        total += fault_loop(name, op_parse, (void *)&long_tokens[i], long_tokens[i].clean);
    }
    json_exempt = false;

    speed_openai_api_t chat = SPEED_OPENAI_CHAT, comp = SPEED_OPENAI_COMPLETIONS;
    total += fault_loop("chat response", op_response, &chat, SPEED_OK);
    total += fault_loop("completion response", op_response, &comp, SPEED_OK);
    total += fault_loop("chat chunks", op_chunks, &chat, SPEED_OK);
    total += fault_loop("completion chunks", op_chunks, &comp, SPEED_OK);
    total += fault_loop("models/error json", op_misc, NULL, SPEED_OK);
    if (tok) {
        tok_arg_t ta = {tok, MSG("{\"role\":\"user\",\"content\":\"Hello there\"}"), SPEED_OPENAI_CHAT};
        total += fault_loop("tokenize chat", op_tokenize, &ta, SPEED_OK);
        tok_arg_t tb = {tok, PROMPT("\"Hello\""), SPEED_OPENAI_COMPLETIONS};
        total += fault_loop("tokenize text", op_tokenize, &tb, SPEED_OK);
        tok_arg_t tc = {tok, PROMPT("[1,2,3]"), SPEED_OPENAI_COMPLETIONS};
        total += fault_loop("tokenize ids", op_tokenize, &tc, SPEED_OK);
    }
    fprintf(stderr, "fault injection: %d injected allocation failures\n", total);
}

int main(int argc, char **argv) {
    /* JSON memory through the counted allocator: leaks and injected failures reach it. */
    json_set_alloc_funcs(test_json_malloc, test_json_free);
    speed_log_configure("error");
    if (argc > 1 && strcmp(argv[1], "chat-vectors") == 0) return test_chat_vectors();

    test_bad_requests();
    test_nesting();
    test_json_budget();
    test_nul_bytes();
    test_valid_chat();
    test_valid_completions();
    test_errors();
    test_model_and_length();
    test_auth();
    test_chat_response();
    test_completion_response();
    test_chat_stream();
    test_completion_stream();
    test_models();

    char dir[256];
    speed_tok_t *tok = load_tokenizer(dir, sizeof dir);
    CHECK_MSG(tok != NULL, "cannot make the default tokenizer in %s", dir);
    if (tok) test_tokenize(tok);
    speed_log_set_sink(tu_log_discard, NULL); /* the expected out-of-memory lines */
    test_fault_injection(tok);
    speed_log_set_sink(NULL, NULL);
    speed_tok_destroy(tok);
    tu_rm_rf(dir);
    return CHECK_DONE();
}
