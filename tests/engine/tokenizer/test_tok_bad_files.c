/* Broken and unsupported tokenizer files: each gives a status and one clear error line
 * naming the file, never a crash, and leaks nothing. */
#include <sys/stat.h>

#include "tok_test_util.h"

#include "alloc.h"
#include "log.h"

/* A tiny valid byte-level BPE to derive broken variants from (%s slots: model type,
 * normalizer, pre_tokenizer, decoder, merges). */
static const char *const base_fmt =
    "{\"version\": \"1.0\", \"added_tokens\": [{\"id\": 5, \"content\": \"<|eot|>\", "
    "\"special\": true}], \"normalizer\": %s, \"pre_tokenizer\": %s, \"post_processor\": null, "
    "\"decoder\": %s, \"model\": {\"type\": \"%s\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2, "
    "\"c\": 3, \"abc\": 4}, \"merges\": %s}}";

static char g_tmp[1024];

static void write_file(const char *dir, const char *name, const char *text) {
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    CHECK_MSG(f != NULL, "cannot write %s", path);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

/* Writes a case folder and loads it; checks status, message and leaks. */
static void expect(const char *name, const char *tok_json, const char *cfg_json, speed_status_t want,
                   const char *msg_part) {
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/tok_bad_%s", g_tmp, name);
    mkdir(dir, 0755);
    char path[1300];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    remove(path);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    remove(path);
    if (tok_json) write_file(dir, "tokenizer.json", tok_json);
    if (cfg_json) write_file(dir, "tokenizer_config.json", cfg_json);
    int64_t live = speed_alloc_live_count();
    speed_log_clear_last_error();
    speed_tok_t *tok = NULL;
    speed_status_t st = speed_tok_load(dir, NULL, &tok);
    CHECK_MSG(st == want, "%s: status %d (%s), want %d", name, st, speed_status_string(st), want);
    if (want != SPEED_OK) {
        CHECK_MSG(tok == NULL, "%s", name);
        const char *err = speed_log_last_error();
        CHECK_CONTAINS(err, msg_part);
        CHECK_MSG(strchr(err, '\n') == NULL, "%s: multi-line message", name);
    }
    speed_tok_destroy(tok);
    CHECK_MSG(speed_alloc_live_count() == live, "%s leaked %lld allocations", name,
              (long long)(speed_alloc_live_count() - live));
}

static char *fmt_base(const char *norm, const char *pre, const char *dec, const char *type, const char *merges) {
    static char buf[4096];
    snprintf(buf, sizeof buf, base_fmt, norm, pre, dec, type, merges);
    return buf;
}

int main(void) {
    const char *tmp = getenv("SPEED_TEST_TMP");
    if (!tmp || !*tmp) SKIP_TEST("SPEED_TEST_TMP is not set");
    snprintf(g_tmp, sizeof g_tmp, "%s", tmp);
    const char *ok_merges = "[\"a b\", [\"ab\", \"c\"]]";

    /* the base itself loads and works (merges as strings and as arrays) */
    expect("ok", fmt_base("null", "null", "null", "BPE", ok_merges), NULL, SPEED_OK, "");
    {
        char dir[1200];
        snprintf(dir, sizeof dir, "%s/tok_bad_ok", g_tmp);
        speed_tok_t *tok = NULL;
        CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
        speed_tok_ids_t ids = {0};
        CHECK_INT_EQ(speed_tok_encode(tok, "abcab<|eot|>x", 13, true, &ids), SPEED_OK);
        /* x is not in the vocabulary and there is no unk: dropped, as HF does */
        CHECK(ids.n == 3 && ids.ids[0] == 4 && ids.ids[1] == 2 && ids.ids[2] == 5);
        char *text = NULL;
        CHECK_INT_EQ(speed_tok_decode(tok, ids.ids, ids.n, false, &text, NULL), SPEED_OK);
        CHECK_STR_EQ(text, "abc ab <|eot|>"); /* no decoder: joined with spaces */
        speed_free(text);
        speed_tok_ids_free(&ids);
        speed_tok_destroy(tok);
    }

    /* missing files */
    expect("missing", NULL, NULL, SPEED_ERR_NOT_FOUND, "tokenizer.json");
    speed_tok_t *tok = NULL;
    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_tok_load("/nonexistent/dir", NULL, &tok), SPEED_ERR_NOT_FOUND);
    CHECK_CONTAINS(speed_log_last_error(), "/nonexistent/dir/tokenizer.json");
    CHECK_INT_EQ(speed_tok_load(NULL, NULL, &tok), SPEED_ERR_INVALID_ARGUMENT);

    /* malformed JSON */
    expect("empty", "", NULL, SPEED_ERR_PARSE, "tokenizer.json: invalid JSON");
    expect("truncated", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0", NULL, SPEED_ERR_PARSE,
           "tokenizer.json: invalid JSON at line 1");
    expect("garbage", "\x01\x02 not json", NULL, SPEED_ERR_PARSE, "invalid JSON");
    expect("trailing", "{} {}", NULL, SPEED_ERR_PARSE, "invalid JSON");
    expect("array", "[1, 2]", NULL, SPEED_ERR_FORMAT, "not a JSON object");
    expect("nomodel", "{\"version\": \"1.0\"}", NULL, SPEED_ERR_FORMAT, "no \"model\"");

    /* unsupported model types */
    expect("wordpiece", fmt_base("null", "null", "null", "WordPiece", "[]"), NULL, SPEED_ERR_UNSUPPORTED,
           "model type \"WordPiece\" is not supported");
    expect("unigram",
           "{\"model\": {\"type\": \"Unigram\", \"unk_id\": 0, \"vocab\": [[\"a\", "
           "-1.0]]}}",
           NULL, SPEED_ERR_UNSUPPORTED, "tokenizer.json: model type \"Unigram\"");

    /* unknown normalizer / pre-tokenizer / decoder / post-processor types */
    expect("norm", fmt_base("{\"type\": \"Lowercase\"}", "null", "null", "BPE", ok_merges), NULL, SPEED_ERR_UNSUPPORTED,
           "normalizer type \"Lowercase\" is not supported");
    expect("norm_seq",
           fmt_base("{\"type\": \"Sequence\", \"normalizers\": [{\"type\": "
                    "\"Prepend\", \"prepend\": \"x\"}, {\"type\": \"NFKC\"}]}",
                    "null", "null", "BPE", ok_merges),
           NULL, SPEED_ERR_UNSUPPORTED, "normalizer type \"NFKC\"");
    expect("pre", fmt_base("null", "{\"type\": \"Whitespace\"}", "null", "BPE", ok_merges), NULL, SPEED_ERR_UNSUPPORTED,
           "pre_tokenizer type \"Whitespace\" is not supported");
    expect("dec", fmt_base("null", "null", "{\"type\": \"WordPiece\"}", "BPE", ok_merges), NULL, SPEED_ERR_UNSUPPORTED,
           "decoder type \"WordPiece\" is not supported");
    expect("post",
           "{\"post_processor\": {\"type\": \"BertProcessing\"}, \"model\": {\"type\": "
           "\"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
           NULL, SPEED_ERR_UNSUPPORTED, "post_processor type \"BertProcessing\"");
    expect("notype", fmt_base("{\"prepend\": \"x\"}", "null", "null", "BPE", ok_merges), NULL, SPEED_ERR_FORMAT,
           "normalizer has no \"type\"");

    /* structurally wrong BPE */
    expect("badmerge", fmt_base("null", "null", "null", "BPE", "[\"a c\"]"), NULL, SPEED_ERR_FORMAT,
           "the result is not in the vocabulary");
    expect("badmerge2", fmt_base("null", "null", "null", "BPE", "[\"a z\"]"), NULL, SPEED_ERR_FORMAT,
           "the right part is not in the vocabulary");
    expect("badmerge3", fmt_base("null", "null", "null", "BPE", "[\"ab\"]"), NULL, SPEED_ERR_FORMAT,
           "is not \"left right\"");
    expect("badmerge4", fmt_base("null", "null", "null", "BPE", "[42]"), NULL, SPEED_ERR_FORMAT, "model.merges[0]");
    expect("vocabarr", "{\"model\": {\"type\": \"BPE\", \"vocab\": [\"a\"], \"merges\": []}}", NULL, SPEED_ERR_FORMAT,
           "model.vocab is not an object");
    expect("vocabneg", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -3}, \"merges\": []}}", NULL,
           SPEED_ERR_FORMAT, "id of \"a\"");
    expect("vocabdup",
           "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}, "
           "\"merges\": []}}",
           NULL, SPEED_ERR_FORMAT, "id 0 is used twice");
    expect("unk",
           "{\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"vocab\": "
           "{\"a\": 0}, \"merges\": []}}",
           NULL, SPEED_ERR_FORMAT, "unk_token \"<unk>\"");
    expect("added",
           "{\"added_tokens\": [{\"content\": \"x\"}], \"model\": {\"type\": \"BPE\", "
           "\"vocab\": {\"a\": 0}, \"merges\": []}}",
           NULL, SPEED_ERR_FORMAT, "added_tokens[0]");
    expect("regex",
           fmt_base("null",
                    "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"(a|\"}, "
                    "\"behavior\": \"Isolated\"}",
                    "null", "BPE", ok_merges),
           NULL, SPEED_ERR_FORMAT, "does not compile");
    expect("behavior",
           fmt_base("null",
                    "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, "
                    "\"behavior\": \"Sideways\"}",
                    "null", "BPE", ok_merges),
           NULL, SPEED_ERR_FORMAT, "unknown behavior \"Sideways\"");
    expect("dropout",
           "{\"model\": {\"type\": \"BPE\", \"dropout\": 0.1, \"vocab\": {\"a\": 0}, "
           "\"merges\": []}}",
           NULL, SPEED_ERR_UNSUPPORTED, "dropout");

    /* tokenizer_config.json problems name that file */
    const char *good = fmt_base("null", "null", "null", "BPE", ok_merges);
    expect("cfg_parse", good, "{\"bos_token\": ", SPEED_ERR_PARSE, "tokenizer_config.json: invalid JSON");
    expect("cfg_bos", good, "{\"bos_token\": \"<nope>\"}", SPEED_ERR_FORMAT,
           "tokenizer_config.json: bos_token \"<nope>\" is not in the vocabulary");
    expect("cfg_type", good, "{\"add_bos_token\": \"yes\"}", SPEED_ERR_FORMAT,
           "tokenizer_config.json: tokenizer_config: \"add_bos_token\" must be true or false");
    expect("cfg_tmpl", good, "{\"chat_template\": 3}", SPEED_ERR_FORMAT, "chat_template");
    /* big integers are fine (read as reals), and a NUL escape too */
    expect("cfg_big", good,
           "{\"model_max_length\": 1000000000000000019884624838656, "
           "\"x\": \"a\\u0000b\", \"eos_token\": {\"content\": \"<|eot|>\"}}",
           SPEED_OK, "");

    return CHECK_DONE();
}
