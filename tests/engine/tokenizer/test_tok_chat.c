/* Special tokens, add_special, eos/bos and chat templates with the Llama 2 and Llama 3
 * tokenizers (chat_vectors.jsonl: rendered text and ids, and the alternation error). */
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tok_test_util.h"

#include "alloc.h"
#include "log.h"

static void encode_expect(const speed_tok_t *tok, const char *text, bool add_special, const int32_t *expect, size_t n) {
    speed_tok_ids_t ids = {0};
    CHECK_INT_EQ(speed_tok_encode(tok, text, strlen(text), add_special, &ids), SPEED_OK);
    int ok = ids.n == n;
    for (size_t i = 0; ok && i < n; i++) ok = ids.ids[i] == expect[i];
    CHECK_MSG(ok, "\"%s\" (add_special=%d)", text, (int)add_special);
    if (!ok) {
        for (size_t i = 0; i < ids.n; i++) fprintf(stderr, " %d", (int)ids.ids[i]);
        fprintf(stderr, "\n");
    }
    speed_tok_ids_free(&ids);
}

static char *render(const speed_tok_t *tok, const speed_chat_message_t *m, size_t n, bool gen, speed_status_t expect) {
    char *text = NULL;
    CHECK_INT_EQ(speed_tok_chat_render(tok, m, n, gen, &text), expect);
    return text;
}

/* A scratch model folder: tokenizer.json linked from `src`, tokenizer_config.json written. */
static int make_dir(const char *name, const char *src, const char *config, char *out, size_t size) {
    const char *tmp = getenv("SPEED_TEST_TMP");
    if (!tmp || !*tmp) return 0;
    snprintf(out, size, "%s/tok_chat_%s", tmp, name);
    mkdir(out, 0755);
    char a[1200], b[1200];
    snprintf(a, sizeof a, "%s/tokenizer.json", src);
    snprintf(b, sizeof b, "%s/tokenizer.json", out);
    unlink(b);
    if (symlink(a, b) != 0) return 0;
    snprintf(b, sizeof b, "%s/tokenizer_config.json", out);
    unlink(b);
    if (config) {
        FILE *f = fopen(b, "w");
        if (!f) return 0;
        fputs(config, f);
        fclose(f);
    }
    return 1;
}

static void test_llama2(const char *dir) {
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (!tok) return;
    CHECK_INT_EQ(speed_tok_vocab_size(tok), 32000);
    CHECK_INT_EQ(speed_tok_bos_id(tok), 1);
    const int32_t *eos;
    size_t n_eos = speed_tok_eos_ids(tok, &eos);
    CHECK(n_eos >= 1 && eos[0] == 2);
    CHECK_STR_EQ(speed_tok_token_text(tok, 15043), "\xE2\x96\x81"
                                                   "Hello");
    CHECK(speed_tok_token_text(tok, 32000) == NULL);
    CHECK(speed_tok_token_text(tok, -1) == NULL);
    CHECK_INT_EQ(speed_tok_token_id(tok, "<s>", 3), 1);
    CHECK(speed_tok_is_special(tok, 2));
    CHECK(!speed_tok_is_special(tok, 15043));

    /* add_special puts <s> first (TemplateProcessing + add_bos_token) */
    encode_expect(tok, "Hello world", true, (const int32_t[]){1, 15043, 3186}, 3);
    encode_expect(tok, "Hello world", false, (const int32_t[]){15043, 3186}, 2);
    encode_expect(tok, "", true, (const int32_t[]){1}, 1);
    /* special tokens written in the text (README: HF splits them out first) */
    encode_expect(tok, "<s>", false, (const int32_t[]){1}, 1);
    encode_expect(tok, "a<s>b", false, (const int32_t[]){263, 1, 289}, 3);
    encode_expect(tok, "Hello <s> world", false, (const int32_t[]){15043, 29871, 1, 29871, 3186}, 5);
    encode_expect(tok, "</s><s>", false, (const int32_t[]){2, 1}, 2);
    encode_expect(tok, "<unk>", false, (const int32_t[]){0}, 1);

    /* decode: skip_special drops <s> and </s> */
    int32_t ids[] = {1, 15043, 3186, 2};
    char *text = NULL;
    CHECK_INT_EQ(speed_tok_decode(tok, ids, 4, true, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, "Hello world");
    speed_free(text);
    CHECK_INT_EQ(speed_tok_decode(tok, ids, 4, false, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, "<s> Hello world</s>");
    speed_free(text);

    CHECK_INT_EQ(speed_tok_chat_template(tok), SPEED_CHAT_TEMPLATE_LLAMA2);
    char path[1200];
    snprintf(path, sizeof path, "%s/chat_vectors.jsonl", dir);
    json_t *cases = tok_test_read_jsonl(path);
    CHECK(cases != NULL);
    size_t i, n_cases = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *msgs = json_object_get(c, "messages");
        speed_chat_message_t m[16];
        size_t n = json_array_size(msgs);
        for (size_t k = 0; k < n && k < 16; k++) {
            m[k].role = json_string_value(json_object_get(json_array_get(msgs, k), "role"));
            m[k].content = json_string_value(json_object_get(json_array_get(msgs, k), "content"));
        }
        for (int gen = 0; gen < 2; gen++) { /* the template ignores add_generation_prompt */
            char *r = render(tok, m, n, gen, SPEED_OK);
            CHECK_STR_EQ(r, json_string_value(json_object_get(c, "text")));
            if (r && !gen) {
                speed_tok_ids_t out = {0};
                CHECK_INT_EQ(speed_tok_encode(tok, r, strlen(r), false, &out), SPEED_OK);
                char what[64];
                snprintf(what, sizeof what, "chat case %zu", i);
                CHECK(tok_test_ids_equal(&out, 0, json_object_get(c, "ids"), what));
                speed_tok_ids_free(&out);
            }
            speed_free(r);
        }
        n_cases++;
    }
    CHECK_INT_EQ(n_cases, 8);
    json_decref(cases);

    /* alternation error */
    speed_chat_message_t bad[] = {{"assistant", "hi"}, {"user", "hello"}};
    speed_log_clear_last_error();
    CHECK(render(tok, bad, 2, true, SPEED_ERR_INVALID_ARGUMENT) == NULL);
    CHECK_CONTAINS(speed_log_last_error(), "alternate");
    speed_chat_message_t bad2[] = {{"system", "s"}, {"user", "a"}, {"user", "b"}};
    CHECK(render(tok, bad2, 3, true, SPEED_ERR_INVALID_ARGUMENT) == NULL);
    speed_chat_message_t nul[] = {{"user", NULL}};
    CHECK(render(tok, nul, 1, true, SPEED_ERR_INVALID_ARGUMENT) == NULL);
    speed_tok_destroy(tok);

    /* Unicode whitespace is stripped as Python's str.strip() does */
    tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    speed_chat_message_t ws[] = {{"user", "\xC2\xA0\xE3\x80\x80 hi\t\xE2\x80\xA8"}};
    char *r = render(tok, ws, 1, true, SPEED_OK);
    CHECK_STR_EQ(r, "<s>[INST] hi [/INST]");
    speed_free(r);
    speed_tok_destroy(tok);
}

static void test_llama3(const char *dir) {
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (!tok) return;
    CHECK_INT_EQ(speed_tok_vocab_size(tok), 128256);
    CHECK_INT_EQ(speed_tok_bos_id(tok), 128000);
    const int32_t *eos;
    size_t n_eos = speed_tok_eos_ids(tok, &eos);
    int has_eot = 0, has_eot_text = 0;
    for (size_t i = 0; i < n_eos; i++) {
        has_eot |= eos[i] == 128009;
        has_eot_text |= eos[i] == 128001;
    }
    CHECK(n_eos >= 2 && eos[0] == 128001 && has_eot && has_eot_text);
    CHECK_STR_EQ(speed_tok_token_text(tok, 128009), "<|eot_id|>");

    /* post_processor ByteLevel: add_special adds nothing */
    encode_expect(tok, "Hello world", true, (const int32_t[]){9906, 1917}, 2);
    encode_expect(tok, "Hello world", false, (const int32_t[]){9906, 1917}, 2);
    encode_expect(tok, "<|begin_of_text|>Hello<|eot_id|>", false, (const int32_t[]){128000, 9906, 128009}, 3);
    encode_expect(tok, "a<|eot_id|><|eot_id|> b", false, (const int32_t[]){64, 128009, 128009, 293}, 4);
    /* an unfinished special token is plain text */
    encode_expect(tok, "<|eot_id", false, (const int32_t[]){27, 91, 68, 354, 851}, 5);

    int32_t ids[] = {128000, 9906, 1917, 128009};
    char *text = NULL;
    CHECK_INT_EQ(speed_tok_decode(tok, ids, 4, true, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, "Hello world");
    speed_free(text);
    CHECK_INT_EQ(speed_tok_decode(tok, ids, 4, false, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, "<|begin_of_text|>Hello world<|eot_id|>");
    speed_free(text);

    CHECK_INT_EQ(speed_tok_chat_template(tok), SPEED_CHAT_TEMPLATE_LLAMA3);
    speed_chat_message_t m[] = {
        {"system", "  Be brief. "}, {"user", "Hi!\n"}, {"assistant", "Hello."}, {"user", "2+2?"}};
    const char *expect = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n";
    /* This template has no add_generation_prompt condition: the header is always there. */
    for (int gen = 0; gen < 2; gen++) {
        char *r = render(tok, m, 4, gen, SPEED_OK);
        CHECK_STR_EQ(r, expect);
        if (r) {
            speed_tok_ids_t out = {0};
            CHECK_INT_EQ(speed_tok_encode(tok, r, strlen(r), false, &out), SPEED_OK);
            CHECK(out.n > 10 && out.ids[0] == 128000 && out.ids[1] == 128006 && out.ids[out.n - 1] == 271 &&
                  out.ids[out.n - 2] == 128007);
            speed_tok_ids_free(&out);
        }
        speed_free(r);
    }
    char *r = render(tok, NULL, 0, true, SPEED_OK);
    CHECK_STR_EQ(r, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    speed_free(r);
    speed_tok_destroy(tok);

    /* chat_template named in params wins over the recognised one */
    speed_tok_params_t p = speed_tok_default_params();
    p.chat_template = SPEED_CHAT_TEMPLATE_CHATML;
    tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, &p, &tok), SPEED_OK);
    CHECK_INT_EQ(speed_tok_chat_template(tok), SPEED_CHAT_TEMPLATE_CHATML);
    r = render(tok, m + 1, 1, true, SPEED_OK);
    CHECK_STR_EQ(r, "<|im_start|>user\nHi!\n<|im_end|>\n<|im_start|>assistant\n");
    speed_free(r);
    r = render(tok, m + 1, 1, false, SPEED_OK);
    CHECK_STR_EQ(r, "<|im_start|>user\nHi!\n<|im_end|>\n");
    speed_free(r);
    speed_tok_destroy(tok);
}

static void test_variants(const char *l3dir, const char *l2dir) {
    char dir[1200];
    speed_tok_t *tok = NULL;
    /* Llama 3.1-style template that tests add_generation_prompt: the flag is honoured */
    const char *cfg31 = "{\"bos_token\": \"<|begin_of_text|>\", \"eos_token\": \"<|eot_id|>\", "
                        "\"model_max_length\": 1000000000000000019884624838656, \"chat_template\": "
                        "\"{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + "
                        "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
                        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant"
                        "<|end_header_id|>\\n\\n' }}{%- endif %}\"}";
    if (!make_dir("llama31", l3dir, cfg31, dir, sizeof dir)) {
        fprintf(stderr, "no SPEED_TEST_TMP or symlink failed: variant tests skipped\n");
        return;
    }
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (tok) {
        CHECK_INT_EQ(speed_tok_chat_template(tok), SPEED_CHAT_TEMPLATE_LLAMA3);
        const int32_t *eos;
        CHECK(speed_tok_eos_ids(tok, &eos) >= 1 && eos[0] == 128009);
        speed_chat_message_t m[] = {{"user", "Hi"}};
        char *r = render(tok, m, 1, false, SPEED_OK);
        CHECK_STR_EQ(r, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
        speed_free(r);
        r = render(tok, m, 1, true, SPEED_OK);
        CHECK_STR_EQ(r, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n");
        speed_free(r);
        speed_tok_destroy(tok);
    }

    /* no chat template: UNSUPPORTED at render time, unless one is named */
    tok = NULL;
    CHECK(make_dir("notemplate", l2dir,
                   "{\"bos_token\": {\"content\": \"<s>\"}, \"eos_token\": "
                   "\"</s>\", \"add_bos_token\": false}",
                   dir, sizeof dir));
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (tok) {
        CHECK_INT_EQ(speed_tok_chat_template(tok), SPEED_CHAT_TEMPLATE_AUTO);
        speed_chat_message_t m[] = {{"user", "Hi"}};
        speed_log_clear_last_error();
        CHECK(render(tok, m, 1, true, SPEED_ERR_UNSUPPORTED) == NULL);
        CHECK_CONTAINS(speed_log_last_error(), "no chat_template");
        CHECK_CONTAINS(speed_log_last_error(), "name a built-in one");
        /* add_bos_token false overrides the post-processor */
        encode_expect(tok, "Hello", true, (const int32_t[]){15043}, 1);
        CHECK_INT_EQ(speed_tok_bos_id(tok), 1);
        speed_tok_destroy(tok);
    }
    speed_tok_params_t p = speed_tok_default_params();
    p.chat_template = SPEED_CHAT_TEMPLATE_LLAMA2;
    tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, &p, &tok), SPEED_OK);
    if (tok) {
        speed_chat_message_t m[] = {{"user", "Hi"}, {"assistant", "Yo"}};
        char *r = render(tok, m, 2, true, SPEED_OK);
        CHECK_STR_EQ(r, "<s>[INST] Hi [/INST] Yo </s>");
        speed_free(r);
        speed_tok_destroy(tok);
    }

    /* an unrecognised template */
    tok = NULL;
    CHECK(make_dir("othertemplate", l2dir,
                   "{\"chat_template\": \"{% for m in messages %}"
                   "{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}\"}",
                   dir, sizeof dir));
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (tok) {
        speed_chat_message_t m[] = {{"user", "Hi"}};
        speed_log_clear_last_error();
        CHECK(render(tok, m, 1, true, SPEED_ERR_UNSUPPORTED) == NULL);
        CHECK_CONTAINS(speed_log_last_error(), "not one this server recognises");
        speed_tok_destroy(tok);
    }

    /* no tokenizer_config.json at all: fine, BOS from the post-processor */
    tok = NULL;
    CHECK(make_dir("noconfig", l2dir, NULL, dir, sizeof dir));
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (tok) {
        CHECK_INT_EQ(speed_tok_bos_id(tok), 1);
        encode_expect(tok, "Hello", true, (const int32_t[]){1, 15043}, 2);
        const int32_t *eos;
        CHECK(speed_tok_eos_ids(tok, &eos) >= 1 && eos[0] == 2);
        speed_tok_destroy(tok);
    }
}

int main(void) {
    char l2[1024], l3[1024];
    if (!tok_test_dir("llama2", l2, sizeof l2)) SKIP_TEST("SPEED_TEST_DATA is not set");
    tok_test_dir("llama3", l3, sizeof l3);
    int64_t live = speed_alloc_live_count();

    speed_chat_template_t t;
    CHECK_INT_EQ(speed_chat_template_parse("chatml", &t), SPEED_OK);
    CHECK_INT_EQ(t, SPEED_CHAT_TEMPLATE_CHATML);
    CHECK_INT_EQ(speed_chat_template_parse("llama3", &t), SPEED_OK);
    CHECK_INT_EQ(t, SPEED_CHAT_TEMPLATE_LLAMA3);
    CHECK_INT_EQ(speed_chat_template_parse("Llama3", &t), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(speed_chat_template_name(SPEED_CHAT_TEMPLATE_LLAMA2), "llama2");
    CHECK_STR_EQ(speed_chat_template_name(SPEED_CHAT_TEMPLATE_AUTO), "auto");
    CHECK_STR_EQ(speed_chat_template_name((speed_chat_template_t)42), "unknown");

    test_llama2(l2);
    test_llama3(l3);
    test_variants(l3, l2);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
