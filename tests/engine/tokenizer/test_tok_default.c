/* speed_tok_write_default: writes, loads back, round trips, is deterministic; and
 * allocation fault injection on loading it (every failure → SPEED_ERR_NO_MEMORY, no
 * leaks), and on encode/decode/render/stream with it. */
#include <sys/stat.h>

#include "tok_test_util.h"

#include "alloc.h"
#include "file.h"
#include "log.h"
#include "test_fs.h"

static const char *const texts[] = {
    "",
    "Hello world",
    "The keeper climbed the ninety-two steps to light the lamp at 6 o'clock.",
    "  leading spaces\tand tabs\n\nand\r\nCRLF   ",
    ("Unicode: h\xC3\xA9llo w\xC3\xB6rld \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\xA6\x99 "
     "\xD9\x85\xD8\xB1\xD8\xAD\xD8\xA8\xD8\xA7"),
    "It's, we'll, they're; DON'T",
    "12345678901234567890 3.14159",
};

static void round_trip(const speed_tok_t *tok, const char *text, size_t len) {
    speed_tok_ids_t ids = {0};
    CHECK_INT_EQ(speed_tok_encode(tok, text, len, true, &ids), SPEED_OK);
    CHECK(ids.n >= 1 && ids.ids[0] == speed_tok_bos_id(tok));
    char *back = NULL;
    size_t blen = 0;
    CHECK_INT_EQ(speed_tok_decode(tok, ids.ids, ids.n, true, &back, &blen), SPEED_OK);
    CHECK_MSG(back && blen == len && memcmp(back, text, len) == 0, "round trip \"%s\"", tok_test_show(text, len));
    speed_free(back);
    speed_tok_ids_free(&ids);
}

static void test_write_load(const char *dir) {
    CHECK_INT_EQ(speed_tok_write_default(dir, SPEED_TOK_DEFAULT_N_VOCAB), SPEED_OK);
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (!tok) return;
    CHECK_INT_EQ(speed_tok_vocab_size(tok), SPEED_TOK_DEFAULT_N_VOCAB);
    int32_t bos = speed_tok_bos_id(tok);
    CHECK_STR_EQ(speed_tok_token_text(tok, bos), "<|begin_of_text|>");
    const int32_t *eos;
    size_t n_eos = speed_tok_eos_ids(tok, &eos);
    CHECK(n_eos == 2);
    CHECK_STR_EQ(speed_tok_token_text(tok, eos[0]), "<|end_of_text|>");
    CHECK_STR_EQ(speed_tok_token_text(tok, eos[1]), "<|eot_id|>");
    CHECK_STR_EQ(speed_tok_token_text(tok, 32), "\xC4\xA0"); /* byte ' ' is 'Ġ' */
    CHECK_INT_EQ(speed_tok_chat_template(tok), SPEED_CHAT_TEMPLATE_LLAMA3);
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) round_trip(tok, texts[i], strlen(texts[i]));
    round_trip(tok, "a\0b\0", 4); /* NUL bytes */
    /* common words became single tokens; English compresses */
    speed_tok_ids_t ids = {0};
    CHECK_INT_EQ(speed_tok_encode(tok, texts[2], strlen(texts[2]), false, &ids), SPEED_OK);
    CHECK_MSG(ids.n * 2 < strlen(texts[2]), "%zu tokens for %zu bytes", ids.n, strlen(texts[2]));
    speed_tok_ids_free(&ids);
    CHECK_INT_EQ(speed_tok_encode(tok, " the", 4, false, &ids), SPEED_OK);
    CHECK_INT_EQ(ids.n, 1);
    speed_tok_ids_free(&ids);
    /* invalid UTF-8 is refused with a clear error */
    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_tok_encode(tok, "ab\xC3(", 4, false, &ids), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "not valid UTF-8");
    CHECK_CONTAINS(speed_log_last_error(), "offset 2");
    CHECK_INT_EQ(speed_tok_encode(tok, "\xED\xA0\x80", 3, false, &ids), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_tok_encode(tok, "\xC0\x80", 2, false, &ids), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(ids.n, 0);
    CHECK_INT_EQ(speed_tok_encode(tok, NULL, 0, false, &ids), SPEED_OK);
    CHECK_INT_EQ(speed_tok_encode(NULL, "a", 1, false, &ids), SPEED_ERR_INVALID_ARGUMENT);
    /* decode of ids outside the vocabulary */
    int32_t bad[] = {1, 512};
    char *text = NULL;
    CHECK_INT_EQ(speed_tok_decode(tok, bad, 2, false, &text, NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(text == NULL);
    /* chat */
    speed_chat_message_t m[] = {{"user", "Hi there"}};
    CHECK_INT_EQ(speed_tok_chat_render(tok, m, 1, true, &text), SPEED_OK);
    CHECK_STR_EQ(text, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there"
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    if (text) {
        CHECK_INT_EQ(speed_tok_encode(tok, text, strlen(text), false, &ids), SPEED_OK);
        CHECK(ids.n > 5 && ids.ids[0] == bos && ids.ids[ids.n - 1] != bos);
        speed_tok_ids_free(&ids);
    }
    speed_free(text);
    speed_tok_destroy(tok);
}

static void test_sizes(const char *tmp) {
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/tok_default_sizes", tmp);
    mkdir(dir, 0755);
    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_tok_write_default(dir, 260), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "at least 261");
    CHECK_INT_EQ(speed_tok_write_default(dir, -5), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_tok_write_default(NULL, 512), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_tok_write_default("/nonexistent/dir", 512), SPEED_ERR_IO);
    const int32_t sizes[] = {261, 300, 4096};
    for (size_t i = 0; i < 3; i++) {
        CHECK_INT_EQ(speed_tok_write_default(dir, sizes[i]), SPEED_OK);
        speed_tok_t *tok = NULL;
        CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
        CHECK_INT_EQ(speed_tok_vocab_size(tok), sizes[i]);
        for (size_t k = 0; tok && k < sizeof texts / sizeof texts[0]; k++) round_trip(tok, texts[k], strlen(texts[k]));
        speed_tok_destroy(tok);
    }
    /* deterministic output */
    char a[1300], b[1300];
    snprintf(a, sizeof a, "%s/tokenizer.json", dir);
    CHECK_INT_EQ(speed_tok_write_default(dir, 700), SPEED_OK);
    size_t la = 0, lb = 0;
    char *x = tu_read(a, &la);
    CHECK_INT_EQ(speed_tok_write_default(dir, 700), SPEED_OK);
    char *y = tu_read(a, &lb);
    CHECK(x && y && la == lb && memcmp(x, y, la) == 0);
    free(x);
    free(y);
    snprintf(b, sizeof b, "%s/tokenizer_config.json", dir);
    x = tu_read(b, &la);
    CHECK(x && strstr(x, "chat_template"));
    free(x);
}

/* Fails the n-th allocation of `op` for n = 0, 1, ... until it succeeds untouched. */
#define FAULT_LOOP(name, setup, op, on_ok, cleanup)                                                   \
    do {                                                                                              \
        int n_fail = 0, done = 0;                                                                     \
        for (int64_t n = 0; n < 100000 && !done; n++) {                                               \
            setup;                                                                                    \
            int64_t live = speed_alloc_live_count();                                                  \
            speed_alloc_fail_after(n, 0);                                                             \
            speed_status_t st = (op);                                                                 \
            int injected = speed_alloc_injected_failures() > 0;                                       \
            speed_alloc_fail_after(-1, 0);                                                            \
            if (st == SPEED_OK) {                                                                     \
                on_ok;                                                                                \
                if (!injected) done = 1;                                                              \
            } else {                                                                                  \
                n_fail++;                                                                             \
                CHECK_MSG(st == SPEED_ERR_NO_MEMORY, "%s n=%lld: status %d", name, (long long)n, st); \
                CHECK_MSG(injected, "%s n=%lld failed without injection", name, (long long)n);        \
            }                                                                                         \
            cleanup;                                                                                  \
            CHECK_MSG(speed_alloc_live_count() == live, "%s n=%lld: leaked %lld", name, (long long)n, \
                      (long long)(speed_alloc_live_count() - live));                                  \
        }                                                                                             \
        CHECK_MSG(done, "%s never succeeded", name);                                                  \
        fprintf(stderr, "%s: %d injected failures, all clean\n", name, n_fail);                       \
    } while (0)

/* Streams all ids; *text_p gets the concatenated output (speed_free). */
static speed_status_t stream_all(const speed_tok_t *tok, const speed_tok_ids_t *ids, char **text_p) {
    speed_tok_stream_t *s = NULL;
    SPEED_CHECK(speed_tok_stream_create(tok, true, &s));
    speed_status_t st = SPEED_OK;
    char *acc = speed_malloc(1);
    size_t n = 0;
    if (!acc) st = SPEED_ERR_NO_MEMORY;
    for (size_t i = 0; st == SPEED_OK && i <= ids->n; i++) {
        const char *t;
        size_t len;
        st = i < ids->n ? speed_tok_stream_push(s, ids->ids[i], &t, &len) : speed_tok_stream_flush(s, &t, &len);
        if (st != SPEED_OK) break;
        char *p = speed_realloc(acc, n + len + 1);
        if (!p) {
            st = SPEED_ERR_NO_MEMORY;
            break;
        }
        acc = p;
        memcpy(acc + n, t, len);
        n += len;
        acc[n] = '\0';
    }
    speed_tok_stream_destroy(s);
    if (st != SPEED_OK)
        speed_free(acc);
    else
        *text_p = acc;
    return st;
}

static void discard_log(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                        const char *line) {
    (void)user, (void)level, (void)subsys, (void)request_id, (void)line;
}

static void test_faults(const char *dir) {
    speed_log_set_sink(discard_log, NULL); /* hundreds of expected out-of-memory lines */
    speed_tok_t *tok = NULL;
    FAULT_LOOP("load", tok = NULL, speed_tok_load(dir, NULL, &tok), (void)0, (speed_tok_destroy(tok), tok = NULL));

    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (!tok) return;
    const char *text = texts[4];
    speed_tok_ids_t ids = {0};
    FAULT_LOOP("encode", (void)0, speed_tok_encode(tok, text, strlen(text), true, &ids), CHECK(ids.n > 0),
               speed_tok_ids_free(&ids));
    CHECK_INT_EQ(speed_tok_encode(tok, text, strlen(text), true, &ids), SPEED_OK);
    char *out = NULL;
    FAULT_LOOP("decode", out = NULL, speed_tok_decode(tok, ids.ids, ids.n, true, &out, NULL), CHECK_STR_EQ(out, text),
               speed_free(out));
    speed_chat_message_t m[] = {{"system", "Be kind."}, {"user", "Hi"}};
    FAULT_LOOP("chat", out = NULL, speed_tok_chat_render(tok, m, 2, true, &out), CHECK(out != NULL), speed_free(out));
    FAULT_LOOP("stream", out = NULL, stream_all(tok, &ids, &out), CHECK_STR_EQ(out, text), speed_free(out));
    speed_tok_ids_free(&ids);
    speed_tok_destroy(tok);
    speed_log_set_sink(NULL, NULL);
}

/* speed_tok_load_memory gives the tokenizer speed_tok_load reads from the same files. */
static void test_memory(const char *dir) {
    char path[1300], *tj = NULL, *cj = NULL;
    size_t tn = 0, cn = 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    CHECK_INT_EQ(speed_file_read(path, 1 << 26, SPEED_SUBSYS_TOK, SPEED_FILE_READ_DEFAULT, &tj, &tn), SPEED_OK);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    CHECK_INT_EQ(speed_file_read(path, 1 << 26, SPEED_SUBSYS_TOK, SPEED_FILE_READ_DEFAULT, &cj, &cn), SPEED_OK);
    speed_tok_t *a = NULL, *b = NULL, *c = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &a), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load_memory(tj, tn, cj, cn, NULL, &b), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load_memory(tj, tn, NULL, 0, NULL, &c), SPEED_OK); /* no config */
    if (a && b && c) {
        CHECK_INT_EQ(speed_tok_vocab_size(b), speed_tok_vocab_size(a));
        CHECK_INT_EQ(speed_tok_bos_id(b), speed_tok_bos_id(a));
        CHECK_INT_EQ(speed_tok_chat_template(b), SPEED_CHAT_TEMPLATE_LLAMA3);
        CHECK_INT_EQ(speed_tok_chat_template(c), SPEED_CHAT_TEMPLATE_AUTO); /* the template is the config's */
        for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
            speed_tok_ids_t x = {0}, y = {0};
            CHECK_INT_EQ(speed_tok_encode(a, texts[i], strlen(texts[i]), true, &x), SPEED_OK);
            CHECK_INT_EQ(speed_tok_encode(b, texts[i], strlen(texts[i]), true, &y), SPEED_OK);
            CHECK(x.n == y.n && (x.n == 0 || !memcmp(x.ids, y.ids, x.n * sizeof *x.ids)));
            speed_tok_ids_free(&x);
            speed_tok_ids_free(&y);
        }
    }
    speed_tok_destroy(a);
    speed_tok_destroy(b);
    speed_tok_destroy(c);
    /* errors name the text, as the file loader names the file */
    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_tok_load_memory("{", 1, NULL, 0, NULL, &a), SPEED_ERR_PARSE);
    CHECK_CONTAINS(speed_log_last_error(), "tokenizer.json (memory)");
    CHECK_INT_EQ(speed_tok_load_memory(tj, tn, "[]", 2, NULL, &a), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(speed_log_last_error(), "tokenizer_config.json (memory)");
    CHECK_INT_EQ(speed_tok_load_memory(NULL, 0, NULL, 0, NULL, &a), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_tok_load_memory(NULL, 5, NULL, 0, NULL, &a), SPEED_ERR_INVALID_ARGUMENT);
    speed_free(tj);
    speed_free(cj);
}

int main(void) {
    const char *tmp = getenv("SPEED_TEST_TMP");
    if (!tmp || !*tmp) SKIP_TEST("SPEED_TEST_TMP is not set");
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/tok_default", tmp);
    mkdir(dir, 0755);
    int64_t live = speed_alloc_live_count();
    test_write_load(dir);
    test_memory(dir);
    test_sizes(tmp);
    test_faults(dir);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
