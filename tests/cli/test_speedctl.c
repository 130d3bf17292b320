/* speedctl end to end: runs the real binary ($SPEEDCTL) as a user would and checks its
 * output, exit codes and error lines. With $SPEED_TEST_DATA it also checks that
 * `speedctl tokenize --jsonl` reproduces the Llama 3 and Llama 2 reference ids exactly. */
#include <jansson.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

static const char *speedctl, *tmp;

typedef struct {
    int rc;
    char *out; /* stdout */
    char *err; /* stderr */
} run_t;

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return calloc(1, 1);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = calloc(1, (size_t)n + 1);
    if (fread(b, 1, (size_t)n, f) != (size_t)n) b[0] = '\0';
    fclose(f);
    return b;
}

/* Runs `speedctl ARGS` through the shell; ARGS is printf-formatted. */
static run_t run(const char *fmt, ...) {
    char args[8192], cmd[12000], out_path[1100], err_path[1100];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(out_path, sizeof out_path, "%s/cli.out", tmp);
    snprintf(err_path, sizeof err_path, "%s/cli.err", tmp);
    snprintf(cmd, sizeof cmd, "'%s' %s >'%s' 2>'%s'", speedctl, args, out_path, err_path);
    int status = system(cmd);
    run_t r = {WIFEXITED(status) ? WEXITSTATUS(status) : 128, slurp(out_path), slurp(err_path)};
    return r;
}

static void run_free(run_t *r) {
    free(r->out);
    free(r->err);
}

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

static void test_usage(void) {
    run_t r = run("");
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "usage: speedctl VERB");
    run_free(&r);
    r = run("frobnicate");
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "unknown verb 'frobnicate'");
    run_free(&r);
    r = run("inspect --help");
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "prefill");
    run_free(&r);
    r = run("inspect --no-such-option x");
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "no-such-option");
    run_free(&r);
}

static void test_make_inspect(void) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/cli-tiny", tmp);
    run_t r = run("make-tiny-model '%s' --layers 4 --hidden 64 --heads 4 --kv-heads 2 --ffn 160 "
                  "--dtype f32 --tied --shards 2 --seed 7", dir);
    CHECK_MSG(r.rc == 0, "make-tiny-model failed: %s", r.err);
    CHECK_CONTAINS(r.out, "4 layers");
    run_free(&r);

    r = run("inspect '%s' --prefill-layers 0.75 --json", dir);
    CHECK_MSG(r.rc == 0, "inspect failed: %s", r.err);
    json_error_t jerr;
    json_t *j = json_loads(r.out, 0, &jerr);
    CHECK_MSG(j != NULL, "inspect --json is not JSON: %s", r.out);
    if (j) {
        int64_t L = json_integer_value(json_object_get(j, "layers"));
        int64_t hidden = json_integer_value(json_object_get(j, "hidden"));
        int64_t ffn = json_integer_value(json_object_get(j, "ffn"));
        int64_t vocab = json_integer_value(json_object_get(j, "vocab"));
        int64_t kvh = json_integer_value(json_object_get(j, "kv_heads"));
        int64_t hd = json_integer_value(json_object_get(j, "head_dim"));
        CHECK_INT_EQ(L, 4);
        CHECK_INT_EQ(hd, 16);
        CHECK(json_is_true(json_object_get(j, "tied")));
        /* tied Llama: embeddings + per layer (q,o: h*h; k,v: h*kv*hd; 3 MLP; 2 norms) + final norm */
        int64_t per_layer = 2 * hidden * hidden + 2 * hidden * kvh * hd + 3 * hidden * ffn + 2 * hidden;
        int64_t expect = vocab * hidden + L * per_layer + hidden;
        CHECK_INT_EQ(json_integer_value(json_object_get(j, "params")), expect);
        CHECK_INT_EQ(json_integer_value(json_object_get(j, "bytes")), expect * 4);
        json_t *kv = json_object_get(j, "kv");
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "prefill_layers")), 3);
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "bytes_per_token_full_depth")), 2 * L * kvh * hd * 2);
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "bytes_per_shallow_token")), 2 * 3 * kvh * hd * 2);
        /* ARCHITECTURE §1: layers < C hold all n tokens, layers >= C hold A + T of them */
        int64_t n = json_integer_value(json_object_get(kv, "prompt_tokens"));
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "prompt_bytes")),
                     (3 * n + 1 * 2) * 2 * kvh * hd * 2);
        CHECK(json_object_get(j, "tokenizer") != NULL);
        json_decref(j);
    }
    run_free(&r);

    r = run("inspect '%s'", dir);
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "grouped-query");
    CHECK_CONTAINS(r.out, "KV per token");
    run_free(&r);

    r = run("inspect '%s' --prefill-layers 9", dir);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "--prefill-layers");
    run_free(&r);

    /* The same options from the environment; --print-config says where they came from. */
    r = run("make-tiny-model x --print-config");
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "seed: 1");
    run_free(&r);
    setenv("SPEED_SEED", "42", 1);
    r = run("make-tiny-model x --print-config");
    CHECK_CONTAINS(r.out, "env:SPEED_SEED");
    run_free(&r);
    unsetenv("SPEED_SEED");
}

static void test_bad_models(void) {
    char dir[1024], path[1200];
    run_t r = run("inspect '%s/does-not-exist'", tmp);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "speedctl: error:");
    CHECK_INT_EQ(count_lines(r.err), 1);
    run_free(&r);

    /* A model whose weights file is cut short. */
    snprintf(dir, sizeof dir, "%s/cli-truncated", tmp);
    r = run("make-tiny-model '%s' --layers 2 --hidden 32 --heads 2 --ffn 64 --dtype f16", dir);
    CHECK_INT_EQ(r.rc, 0);
    run_free(&r);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(truncate(path, 1000) == 0);
    r = run("inspect '%s'", dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "model.safetensors");
    CHECK_INT_EQ(count_lines(r.err), 1);
    run_free(&r);

    /* Invalid config.json */
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"architectures\": [\"LlamaForCausalLM\"], ", f);
    fclose(f);
    r = run("inspect '%s'", dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "config.json");
    run_free(&r);
}

static void test_tokenize(void) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/cli-tiny", tmp);
    const char *text = "Hello, SPEED! \\u00fcn\\u00efc\\u00f6d\\u00e9 \\ud83d\\ude42 123456";
    char jpath[1100];
    snprintf(jpath, sizeof jpath, "%s/cli-input.jsonl", tmp);
    FILE *f = fopen(jpath, "w");
    fprintf(f, "{\"text\": \"%s\"}\n{\"text\": 5}\nnot json\n", text);
    fclose(f);

    run_t r = run("tokenize --model '%s' --jsonl '%s'", dir, jpath);
    CHECK_INT_EQ(r.rc, 1); /* two bad lines */
    CHECK_INT_EQ(count_lines(r.out), 3);
    CHECK_CONTAINS(r.out, "{\"error\": \"line 2:");
    CHECK_CONTAINS(r.out, "{\"error\": \"line 3: invalid JSON");
    json_t *line1 = json_loadb(r.out, strcspn(r.out, "\n"), 0, NULL);
    json_t *ids = json_object_get(line1, "ids");
    CHECK(json_array_size(ids) > 5);
    char list[4096] = "";
    size_t i;
    json_t *v;
    json_array_foreach(ids, i, v) {
        char num[32];
        snprintf(num, sizeof num, i ? ",%lld" : "%lld", (long long)json_integer_value(v));
        strcat(list, num);
    }
    json_decref(line1);
    run_free(&r);

    r = run("tokenize --model '%s' --decode '%s' --json", dir, list);
    CHECK_INT_EQ(r.rc, 0);
    json_t *dec = json_loads(r.out, 0, NULL);
    json_t *want = json_loads("\"Hello, SPEED! \\u00fcn\\u00efc\\u00f6d\\u00e9 \\ud83d\\ude42 123456\"",
                              JSON_DECODE_ANY, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(dec, "text")), json_string_value(want));
    json_decref(dec);
    json_decref(want);
    run_free(&r);

    r = run("tokenize --model '%s' --text 'Hello' --json", dir);
    CHECK_INT_EQ(r.rc, 0);
    CHECK(strncmp(r.out, "{\"ids\": [", 9) == 0);
    run_free(&r);

    r = run("tokenize --model '%s' --decode 1,2,99999999", dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "99999999");
    run_free(&r);

    r = run("tokenize --model '%s' --text a --decode 1", dir);
    CHECK_INT_EQ(r.rc, 2);
    run_free(&r);

    r = run("tokenize --model '%s' --chat 'Hi there' --system 'Be brief.' --json", dir);
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "<|start_header_id|>system<|end_header_id|>");
    CHECK_CONTAINS(r.out, "<|start_header_id|>assistant<|end_header_id|>");
    run_free(&r);
}

/* Every vectors file line's ids must come back exactly from `tokenize --jsonl`. */
static void check_vectors(const char *model_dir, const char *vectors) {
    run_t r = run("tokenize --model '%s' --jsonl '%s'", model_dir, vectors);
    CHECK_MSG(r.rc == 0, "tokenize --jsonl %s failed: %s", vectors, r.err);
    FILE *f = fopen(vectors, "rb");
    char *line = NULL;
    size_t cap = 0;
    const char *got = r.out;
    int n = 0, bad = 0;
    while (getline(&line, &cap, f) > 0 && *got) {
        json_t *want = json_loads(line, JSON_ALLOW_NUL, NULL);
        size_t got_len = strcspn(got, "\n");
        json_t *have = json_loadb(got, got_len, 0, NULL);
        if (!json_equal(json_object_get(want, "ids"), json_object_get(have, "ids"))) {
            if (bad++ < 3) fprintf(stderr, "%s: line %d differs: got %.*s\n", vectors, n + 1, (int)got_len, got);
        }
        json_decref(want);
        json_decref(have);
        got += got_len + (got[got_len] == '\n');
        n++;
    }
    free(line);
    fclose(f);
    CHECK_MSG(bad == 0, "%s: %d of %d cases differ", vectors, bad, n);
    CHECK(n > 40);
    fprintf(stderr, "%s: %d cases, %d differ\n", vectors, n, bad);
    run_free(&r);
}

static void test_vectors(const char *data) {
    char dir[1024], src[1024], vec[1100];
    static const char *const names[] = {"llama3", "llama2"};
    for (int k = 0; k < 2; k++) {
        snprintf(src, sizeof src, "%s/tokenizers/%s", data, names[k]);
        snprintf(dir, sizeof dir, "%s/cli-%s", tmp, names[k]);
        run_t r = run("make-tiny-model '%s' --layers 1 --hidden 32 --heads 2 --ffn 64 --tokenizer '%s'", dir, src);
        CHECK_MSG(r.rc == 0, "make-tiny-model --tokenizer %s: %s", src, r.err);
        run_free(&r);
        r = run("inspect '%s' --json", dir);
        CHECK_CONTAINS(r.out, k == 0 ? "\"vocab\": 128256" : "\"vocab\": 32000");
        run_free(&r);
        snprintf(vec, sizeof vec, "%s/vectors.jsonl", src);
        check_vectors(dir, vec);
        if (k == 1) {
            snprintf(vec, sizeof vec, "%s/vectors_extra.jsonl", src);
            check_vectors(dir, vec);
        }
    }
}

/* argv[1] "vectors": only the reference-vector check (a separate ctest test that is
 * skipped when the shared data folder is absent). */
int main(int argc, char **argv) {
    speedctl = getenv("SPEEDCTL");
    const char *tmp_root = getenv("SPEED_TEST_TMP");
    if (!speedctl || !*speedctl || !tmp_root || !*tmp_root)
        SKIP_TEST("SPEEDCTL and SPEED_TEST_TMP must be set (run through ctest)");
    /* own scratch folder per mode: ctest may run both at once */
    static char tmp_dir[1024];
    snprintf(tmp_dir, sizeof tmp_dir, "%s/speedctl-%s", tmp_root, argc > 1 ? argv[1] : "cli");
    mkdir(tmp_dir, 0755);
    tmp = tmp_dir;
    if (argc > 1 && strcmp(argv[1], "vectors") == 0) {
        const char *data = getenv("SPEED_TEST_DATA");
        struct stat st;
        char probe[1024];
        snprintf(probe, sizeof probe, "%s/tokenizers/llama3/vectors.jsonl", data ? data : "");
        if (!data || !*data || stat(probe, &st) != 0)
            SKIP_TEST("SPEED_TEST_DATA does not point at a folder with tokenizers/ (../shared/data)");
        test_vectors(data);
        return CHECK_DONE();
    }
    test_usage();
    test_make_inspect();
    test_bad_models();
    test_tokenize();
    return CHECK_DONE();
}
