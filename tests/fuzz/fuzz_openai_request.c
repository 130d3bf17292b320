/* Fuzzes the router's OpenAI request path on a request body: speed_openai_request_parse
 * (daemons/router/openai_request.c over json_strict.c and jansson), then what the router does
 * with a parsed request before any node sees it: the model and context checks and the prompt's
 * tokenization (chat template included) with a small generated tokenizer. A refusal must come
 * with a well-formed OpenAI error JSON.
 *
 * Input: byte 0 chooses the API (bit 0: chat / completions), whether the deployment allows the
 * "speed" object (bit 1) and limits (bits 2-3); the rest is the body. With bit 4 set the rest
 * is an Authorization header value instead, checked by speed_openai_auth_check (the one thing
 * the router reads before a caller is authenticated) against a plain oracle. */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "alloc.h"
#include "fuzz_util.h"
#include "json_strict.h"
#include "openai.h"
#include "tokenizer.h"

#define N_LAYERS 32
#define N_VOCAB  300

static speed_tok_t *g_tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    char dir[] = "/tmp/speed-fuzz-tok-XXXXXX";
    if (!mkdtemp(dir) || speed_tok_write_default(dir, N_VOCAB) != SPEED_OK ||
        speed_tok_load(dir, NULL, &g_tok) != SPEED_OK) {
        fprintf(stderr, "fuzz_openai_request: cannot make the tokenizer in %s\n", dir);
        abort();
    }
    char path[300];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    unlink(path);
    rmdir(dir);
    return 0;
}

/* An error the router would send: its JSON must be valid JSON, whatever the input put in it. */
static void check_error(const speed_openai_error_t *err) {
    FZ_ASSERT(memchr(err->message, 0, sizeof err->message) && memchr(err->param, 0, sizeof err->param) &&
              memchr(err->code, 0, sizeof err->code));
    char *json = NULL;
    size_t len = 0;
    if (speed_openai_error_json(err, &json, &len) != SPEED_OK) return; /* NO_MEMORY */
    FZ_ASSERT(strlen(json) == len);
    FZ_ASSERT(speed_json_strict_check(json, len));
    speed_free(json);
}

static bool utf8_ok(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t k = speed_json_strict_utf8_len((const unsigned char *)s + i, n - i);
        if (k == 0) return false;
        i += k;
    }
    return true;
}

/* What the header promises about a parsed request. */
static void check_request(const speed_openai_request_t *r, speed_openai_api_t api, size_t body_len,
                          const speed_openai_parse_params_t *pp) {
    FZ_ASSERT(r->api == api);
    FZ_ASSERT(r->model && r->model[0]);
    FZ_ASSERT(strlen(r->model) <= body_len);
    if (api == SPEED_OPENAI_CHAT) {
        FZ_ASSERT(r->n_messages >= 1 && r->messages);
        for (size_t i = 0; i < r->n_messages; i++) {
            const speed_openai_message_t *m = &r->messages[i];
            FZ_ASSERT(m->content);
            FZ_ASSERT(m->content_len <= body_len);
            FZ_ASSERT(!memchr(m->content, 0, m->content_len));
            FZ_ASSERT(utf8_ok(m->content, m->content_len));
            FZ_ASSERT(strcmp(speed_openai_role_name(m->role), "unknown") != 0);
        }
    } else {
        FZ_ASSERT((r->prompt != NULL) != (r->prompt_ids != NULL));
        if (r->prompt) {
            FZ_ASSERT(r->prompt_len <= body_len);
            FZ_ASSERT(!memchr(r->prompt, 0, r->prompt_len));
            FZ_ASSERT(utf8_ok(r->prompt, r->prompt_len));
        } else {
            FZ_ASSERT(r->n_prompt_ids >= 1 && r->n_prompt_ids <= body_len);
            for (size_t i = 0; i < r->n_prompt_ids; i++) {
                FZ_ASSERT(r->prompt_ids[i] >= 0);
                if (pp->vocab_size) FZ_ASSERT(r->prompt_ids[i] < pp->vocab_size);
            }
        }
    }
    FZ_ASSERT(r->max_tokens == -1 || r->max_tokens >= 1);
    if (pp->max_tokens_limit) FZ_ASSERT(r->max_tokens <= pp->max_tokens_limit);
    FZ_ASSERT(r->temperature >= 0 && r->temperature <= 2);
    FZ_ASSERT(r->top_p > 0 && r->top_p <= 1);
    FZ_ASSERT(r->top_k >= 0);
    FZ_ASSERT(r->n_stop <= SPEED_OPENAI_MAX_STOP);
    for (size_t i = 0; i < r->n_stop; i++) FZ_ASSERT(r->stop[i] && r->stop[i][0] && utf8_ok(r->stop[i], strlen(r->stop[i])));
    FZ_ASSERT(r->top_logprobs >= 0 && r->top_logprobs <= SPEED_OPENAI_MAX_TOP_LOGPROBS);
    FZ_ASSERT(r->n == 1);
    if (r->speed.present) {
        FZ_ASSERT(pp->allow_speed);
        const speed_depth_t *d = &r->speed.resolved;
        FZ_ASSERT(d->prefill_layers >= 1 && d->prefill_layers <= N_LAYERS);
        FZ_ASSERT(d->anchors >= 0 && d->tail >= 1);
    }
}

/* The API key check against a plain reading of its contract: "Bearer" (any case), blanks,
 * one of the keys exactly, optional blanks around; anything else is refused. */
static bool auth_oracle(const char *h, const char *const *keys, size_t n_keys) {
    while (*h == ' ' || *h == '\t') h++;
    if (strncasecmp(h, "bearer", 6) != 0 || (h[6] != ' ' && h[6] != '\t')) return false;
    h += 6;
    while (*h == ' ' || *h == '\t') h++;
    size_t n = strlen(h);
    while (n && (h[n - 1] == ' ' || h[n - 1] == '\t')) n--;
    for (size_t i = 0; n && i < n_keys; i++)
        if (strlen(keys[i]) == n && memcmp(keys[i], h, n) == 0) return true;
    return false;
}

static void check_auth(const char *header, size_t len) {
    static const char *const keys[] = {"sk-test-1", "sk-other-key"};
    char *h = malloc(len + 1); /* a header value is a C string (MHD stops at NUL) */
    if (!h) return;
    memcpy(h, header, len);
    h[len] = '\0';
    speed_openai_error_t err;
    memset(&err, 0, sizeof err);
    bool ok = speed_openai_auth_check(h, keys, 2, &err);
    FZ_ASSERT(ok == auth_oracle(h, keys, 2));
    if (!ok) {
        FZ_ASSERT(speed_openai_error_http_status(err.kind) == 401);
        check_error(&err);
    }
    FZ_ASSERT(speed_openai_auth_check(h, keys, 0, NULL)); /* no keys: authentication is off */
    free(h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t mode = data[0];
    if (mode & 0x10) { /* the Authorization header instead of a body */
        check_auth((const char *)data + 1, size - 1);
        return 0;
    }
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    speed_openai_api_t api = (mode & 1) ? SPEED_OPENAI_COMPLETIONS : SPEED_OPENAI_CHAT;
    speed_openai_parse_params_t pp = speed_openai_default_parse_params();
    pp.allow_speed = mode & 2;
    pp.n_layers = N_LAYERS;
    if (mode & 4) pp.max_tokens_limit = 64;
    if (mode & 8) pp.vocab_size = N_VOCAB;

    speed_openai_request_t *req = NULL;
    speed_openai_error_t err;
    memset(&err, 0, sizeof err);
    speed_status_t st = speed_openai_request_parse(api, body, len, &pp, &req, &err);
    if (st != SPEED_OK) {
        FZ_ASSERT(st == SPEED_ERR_INVALID_ARGUMENT || st == SPEED_ERR_NO_MEMORY);
        FZ_ASSERT(!req);
        check_error(&err);
        return 0;
    }
    FZ_ASSERT(req);
    /* jansson took it, so the strict syntax check (which promises to accept no less) must too */
    FZ_ASSERT(speed_json_strict_check(body, len));
    check_request(req, api, len, &pp);

    static const char *const models[] = {"speed", "llama"};
    memset(&err, 0, sizeof err);
    if (speed_openai_check_model(req, models, 2, &err) != SPEED_OK) check_error(&err);

    speed_tok_ids_t ids = {0};
    memset(&err, 0, sizeof err);
    st = speed_openai_request_tokenize(req, g_tok, &ids, &err);
    if (st == SPEED_OK) {
        for (size_t i = 0; i < ids.n; i++) FZ_ASSERT(ids.ids[i] >= 0 && ids.ids[i] < speed_tok_vocab_size(g_tok));
        int64_t budget = 0;
        memset(&err, 0, sizeof err);
        if (speed_openai_check_length(req, (int64_t)ids.n, 4096, &budget, &err) == SPEED_OK)
            FZ_ASSERT(budget >= 1 && (int64_t)ids.n + budget <= 4096);
        else
            check_error(&err);
    } else {
        check_error(&err);
    }
    speed_tok_ids_free(&ids);
    speed_openai_request_destroy(req);
    return 0;
}
