/* Self-contained checks of the pieces: the patched pre-tokenizer regex against the HF
 * splits measured for docs/dependencies.md §8, Split behaviours, Metaspace + unk + fuse_unk, the chat
 * templates' names. */
#include <sys/stat.h>

#include "tok_test_util.h"

#include "alloc.h"
#include "log.h"
#include "tok_internal.h"

#define LLAMA3_REGEX                                                            \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?" \
    "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/* Splits text as the encoder does and joins the pieces with '|'. */
static void split_expect(const tok_regex_t *re, const char *text, const char *expect) {
    size_t len = strlen(text);
    const pcre2_code *code = re->full && tok_text_needs_full_regex(text, len) ? re->full : re->fast;
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    char out[512];
    size_t o = 0;
    for (size_t start = 0; start < len;) {
        int rc = pcre2_match(code, (PCRE2_SPTR)text, len, start, PCRE2_NO_UTF_CHECK, md, NULL);
        CHECK(rc > 0);
        if (rc <= 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        CHECK_INT_EQ(ov[0], start); /* no gaps */
        if (o) out[o++] = '|';
        memcpy(out + o, text + ov[0], ov[1] - ov[0]);
        o += ov[1] - ov[0];
        start = ov[1];
    }
    out[o] = '\0';
    CHECK_STR_EQ(out, expect);
    pcre2_match_data_free(md);
}

static void test_regex(void) {
    pcre2_general_context *g = tok_pcre2_context_create();
    tok_regex_t re = {0};
    CHECK_INT_EQ(tok_regex_compile(g, LLAMA3_REGEX, strlen(LLAMA3_REGEX), false, "test", &re), SPEED_OK);
    CHECK(re.fast && re.full);
    split_expect(&re, "Hello world", "Hello| world");
    split_expect(&re, "I'm here, it's 12345!\n\n ok", "I|'m| here|,| it|'s| |123|45|!\n\n| ok");
    /* contractions fold case by Unicode: 'ſ is 's */
    split_expect(&re, "a'\xC5\xBFx", "a|'\xC5\xBF|x");
    split_expect(&re, "A'LL", "A|'LL");
    /* U+180E is not White_Space: one piece (PCRE2's UCP \s would split it) */
    split_expect(&re, "!\xE1\xA0\x8E\xE1\xA0\x8E!", "!\xE1\xA0\x8E\xE1\xA0\x8E!");
    /* NBSP is whitespace: 4 pieces (ASCII \s would give 1) */
    split_expect(&re, "!\xC2\xA0\xC2\xA0!", "!|\xC2\xA0|\xC2\xA0|!");
    /* Nag Mundari letters (Unicode 15) are letters for HF: the full regex is used */
    const char *nag = "!\xF0\x9E\x93\x90\xF0\x9E\x93\x90!";
    CHECK(tok_text_needs_full_regex(nag, strlen(nag)));
    split_expect(&re, nag, "!\xF0\x9E\x93\x90\xF0\x9E\x93\x90|!");
    /* Unicode 15 digits U+1E4F0.. are \p{N}: groups of three */
    split_expect(&re, "\xF0\x9E\x93\xB0\xF0\x9E\x93\xB1\xF0\x9E\x93\xB2\xF0\x9E\x93\xB3",
                 "\xF0\x9E\x93\xB0\xF0\x9E\x93\xB1\xF0\x9E\x93\xB2|\xF0\x9E\x93\xB3");
    CHECK(!tok_text_needs_full_regex("plain ascii", 11));
    CHECK(!tok_text_needs_full_regex("\xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\xA6\x99", 10));
    CHECK(tok_text_needs_full_regex("x\xE1\xB2\x89", 4)); /* U+1C89 */
    tok_regex_free(&re);
    pcre2_general_context_free(g);
}

static void write_tok(const char *dir, const char *json) {
    mkdir(dir, 0755);
    char path[1200];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) return;
    fputs(json, f);
    fclose(f);
}

static void encode_expect(const speed_tok_t *tok, const char *text, const int32_t *expect, size_t n, const char *what) {
    speed_tok_ids_t ids = {0};
    CHECK_INT_EQ(speed_tok_encode(tok, text, strlen(text), false, &ids), SPEED_OK);
    int ok = ids.n == n;
    for (size_t i = 0; ok && i < n; i++) ok = ids.ids[i] == expect[i];
    CHECK_MSG(ok, "%s: \"%s\"", what, text);
    if (!ok) {
        for (size_t i = 0; i < ids.n; i++) fprintf(stderr, " %d", (int)ids.ids[i]);
        fprintf(stderr, "\n");
    }
    speed_tok_ids_free(&ids);
}

static void test_split_behaviors(const char *tmp) {
    static const struct {
        const char *behavior;
        int32_t ids[12];
        size_t n;
    } cases[] = {
        {"Isolated", {17, 3, 18, 3, 3, 16}, 6},     {"Removed", {17, 18, 16}, 3},
        {"MergedWithPrevious", {14, 15, 3, 16}, 4}, {"MergedWithNext", {17, 3, 4, 5, 6, 7, 8, 3, 19}, 9},
        {"Contiguous", {17, 3, 18, 3, 3, 16}, 6},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char json[2048], dir[1200];
        snprintf(json, sizeof json,
                 "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \"-\"}, "
                 "\"behavior\": \"%s\", \"invert\": false}, \"model\": {\"type\": \"BPE\", "
                 "\"ignore_merges\": true, \"vocab\": {\"t\": 0, \"h\": 1, \"e\": 2, \"-\": 3, "
                 "\"f\": 4, \"i\": 5, \"n\": 6, \"a\": 7, \"l\": 8, \"c\": 9, \"o\": 10, \"u\": 11, "
                 "\"d\": 12, \"w\": 13, \"the-\": 14, \"final-\": 15, \"countdown\": 16, "
                 "\"the\": 17, \"final\": 18, \"-countdown\": 19}, \"merges\": []}}",
                 cases[i].behavior);
        snprintf(dir, sizeof dir, "%s/tok_unit_split_%s", tmp, cases[i].behavior);
        write_tok(dir, json);
        speed_tok_t *tok = NULL;
        CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
        if (!tok) continue;
        encode_expect(tok, "the-final--countdown", cases[i].ids, cases[i].n, cases[i].behavior);
        speed_tok_destroy(tok);
    }
}

static void test_metaspace(const char *tmp) {
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/tok_unit_metaspace", tmp);
    write_tok(dir, "{\"added_tokens\": [{\"id\": 0, \"content\": \"<unk>\", \"special\": true}, "
                   "{\"id\": 7, \"content\": \"<sep>\", \"special\": true, \"lstrip\": true, "
                   "\"rstrip\": true}], "
                   "\"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"\xE2\x96\x81\", "
                   "\"prepend_scheme\": \"first\", \"split\": true}, "
                   "\"decoder\": {\"type\": \"Metaspace\", \"replacement\": \"\xE2\x96\x81\", "
                   "\"prepend_scheme\": \"first\", \"split\": true}, "
                   "\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": true, "
                   "\"vocab\": {\"<unk>\": 0, \"\xE2\x96\x81\": 1, \"a\": 2, \"b\": 3, "
                   "\"\xE2\x96\x81"
                   "a\": 4, \"ab\": 5, \"\xE2\x96\x81"
                   "ab\": 6}, "
                   "\"merges\": [\"\xE2\x96\x81 a\", \"a b\", \"\xE2\x96\x81"
                   "a b\"]}}");
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (!tok) return;
    encode_expect(tok, "ab ab", (const int32_t[]){6, 6}, 2, "metaspace");
    encode_expect(tok, "xx ab", (const int32_t[]){1, 0, 6}, 3, "metaspace unk fused");
    encode_expect(tok, "bab", (const int32_t[]){1, 3, 5}, 3, "metaspace merge order");
    /* lstrip/rstrip eat the spaces around <sep>; the text after it is not "first" */
    encode_expect(tok, "ab <sep> ab", (const int32_t[]){6, 7, 5}, 3, "metaspace sep");
    encode_expect(tok, "ab<sep>ab", (const int32_t[]){6, 7, 5}, 3, "metaspace sep 2");
    int32_t ids[] = {6, 1, 6};
    char *text = NULL;
    CHECK_INT_EQ(speed_tok_decode(tok, ids, 3, false, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, "ab  ab");
    speed_free(text);
    speed_tok_destroy(tok);
}

/* GPT-2 style: ByteLevel pre-tokenizer with its own regex and add_prefix_space, merges as
 * [a, b] arrays, add_eos_token from the config. */
static void test_gpt2_style(const char *tmp) {
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/tok_unit_gpt2", tmp);
    write_tok(dir, "{\"added_tokens\": [{\"id\": 9, \"content\": \"<|endoftext|>\", \"special\": true}], "
                   "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, "
                   "\"use_regex\": true}, \"decoder\": {\"type\": \"ByteLevel\"}, "
                   "\"post_processor\": {\"type\": \"ByteLevel\"}, "
                   "\"model\": {\"type\": \"BPE\", \"vocab\": {\"\xC4\xA0\": 0, \"H\": 1, \"i\": 2, "
                   "\"!\": 3, \"\xC4\xA0H\": 4, \"\xC4\xA0Hi\": 5, \"o\": 6, \"\xC4\x8A\": 7, "
                   "\"\xC3\xA2\": 8}, "
                   "\"merges\": [[\"\xC4\xA0\", \"H\"], [\"\xC4\xA0H\", \"i\"]]}}");
    char path[1300];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs("{\"eos_token\": \"<|endoftext|>\", \"add_eos_token\": true}", f);
        fclose(f);
    }
    speed_tok_t *tok = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (!tok) return;
    /* " Hi" + "!" + " Hi" + "\n" (regex pieces after the prefix space) */
    encode_expect(tok, "Hi! Hi\n", (const int32_t[]){5, 3, 5, 7}, 4, "gpt2");
    speed_tok_ids_t ids = {0};
    CHECK_INT_EQ(speed_tok_encode(tok, "Hi", 2, true, &ids), SPEED_OK);
    CHECK(ids.n == 2 && ids.ids[0] == 5 && ids.ids[1] == 9); /* add_eos_token */
    CHECK_INT_EQ(speed_tok_bos_id(tok), -1);
    char *text = NULL;
    CHECK_INT_EQ(speed_tok_decode(tok, ids.ids, ids.n, false, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, " Hi<|endoftext|>");
    speed_free(text);
    /* token 8 is the lone byte 0xE2 (the first byte of a 3-byte character): decode repairs it
     * to U+FFFD, decode_raw keeps the byte (logprobs show a token's own bytes) */
    int32_t lone[] = {8, 1};
    size_t n = 0;
    CHECK_INT_EQ(speed_tok_decode(tok, lone, 2, false, &text, &n), SPEED_OK);
    CHECK(n == 4 && memcmp(text, "\xEF\xBF\xBDH", 4) == 0);
    speed_free(text);
    CHECK_INT_EQ(speed_tok_decode_raw(tok, lone, 2, false, &text, &n), SPEED_OK);
    CHECK(n == 2 && memcmp(text, "\xE2H", 3) == 0); /* NUL-terminated */
    speed_free(text);
    CHECK_INT_EQ(speed_tok_decode_raw(tok, ids.ids, ids.n, true, &text, &n), SPEED_OK);
    CHECK_STR_EQ(text, " Hi");
    speed_free(text);
    int32_t bad = 99;
    CHECK_INT_EQ(speed_tok_decode_raw(tok, &bad, 1, false, &text, &n), SPEED_ERR_INVALID_ARGUMENT);
    speed_tok_ids_free(&ids);
    speed_tok_destroy(tok);
}

/* Every template's name parses back to it; the names array is the config's choices; unknown
 * names are refused with the list of valid ones. */
static void test_chat_template_names(void) {
    for (int i = 0; i < SPEED_CHAT_TEMPLATE_COUNT; i++) {
        speed_chat_template_t t = (speed_chat_template_t)99;
        CHECK_STR_EQ(speed_chat_template_name((speed_chat_template_t)i), speed_chat_template_names[i]);
        CHECK_INT_EQ(speed_chat_template_parse(speed_chat_template_names[i], &t), SPEED_OK);
        CHECK_INT_EQ(t, i);
        for (int j = 0; j < i; j++) CHECK(strcmp(speed_chat_template_names[i], speed_chat_template_names[j]) != 0);
    }
    CHECK(speed_chat_template_names[SPEED_CHAT_TEMPLATE_COUNT] == NULL);
    CHECK_STR_EQ(speed_chat_template_name(SPEED_CHAT_TEMPLATE_CHATML), "chatml");
    CHECK_STR_EQ(speed_chat_template_name(SPEED_CHAT_TEMPLATE_COUNT), "unknown");
    const char *bad[] = {"", "Llama3", "llama", "chatml ", "mistral"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        speed_chat_template_t t = SPEED_CHAT_TEMPLATE_LLAMA2;
        speed_log_clear_last_error();
        CHECK_INT_EQ(speed_chat_template_parse(bad[i], &t), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(t, SPEED_CHAT_TEMPLATE_LLAMA2);
        CHECK_CONTAINS(speed_log_last_error(), "(expected auto, llama3, llama2 or chatml)");
    }
}

int main(void) {
    const char *tmp = getenv("SPEED_TEST_TMP");
    int64_t live = speed_alloc_live_count();
    test_regex();
    test_chat_template_names();
    if (tmp && *tmp) {
        test_split_behaviors(tmp);
        test_metaspace(tmp);
        test_gpt2_style(tmp);
    } else {
        fprintf(stderr, "SPEED_TEST_TMP unset: file-based checks skipped\n");
    }
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
