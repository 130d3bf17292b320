/* speedctl end to end: runs the real binary ($SPEEDCTL) as a user would and checks its
 * output, exit codes and error lines. With $SPEED_TEST_DATA it also checks that
 * `speedctl tokenize --jsonl` reproduces the Llama 3 and Llama 2 reference ids exactly. */
#include <ctype.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "test_fs.h"
#include "test_gpu.h"
#include "test_proc.h"

static const char *speedctl, *tmp;


static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

static void test_usage(void) {
    tu_run_t r = tu_run_tool(tmp, speedctl, "%s", "");
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "usage: speedctl VERB");
    tu_run_free(&r);
    r = tu_run_tool(tmp, speedctl, "frobnicate");
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "unknown verb 'frobnicate'");
    tu_run_free(&r);
    r = tu_run_tool(tmp, speedctl, "inspect --help");
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "prefill");
    tu_run_free(&r);
    r = tu_run_tool(tmp, speedctl, "inspect --no-such-option x");
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "no-such-option");
    tu_run_free(&r);
}

static void test_make_inspect(void) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/cli-tiny", tmp);
    tu_run_t r = tu_run_tool(tmp, speedctl,
                             "make-tiny-model '%s' --layers 4 --hidden 64 --heads 4 --kv-heads 2 --ffn 160 "
                             "--dtype f32 --tied --shards 2 --seed 7",
                             dir);
    CHECK_MSG(r.rc == 0, "make-tiny-model failed: %s", r.err);
    CHECK_CONTAINS(r.out, "4 layers");
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "inspect '%s' --prefill-layers 0.75 --json", dir);
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
        /* the cache dtype by default is the model's (auto): f32 here, 4 bytes an element */
        CHECK_STR_EQ(json_string_value(json_object_get(kv, "dtype")), "f32");
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "bytes_per_token_full_depth")), 2 * L * kvh * hd * 4);
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "bytes_per_shallow_token")), 2 * 3 * kvh * hd * 4);
        /* docs/design.md §1: layers < C hold all n tokens, layers >= C hold A + T of them */
        int64_t n = json_integer_value(json_object_get(kv, "prompt_tokens"));
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "prompt_bytes")), (3 * n + 1 * 2) * 2 * kvh * hd * 4);
        CHECK(json_object_get(j, "tokenizer") != NULL);
        json_decref(j);
    }
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "inspect '%s'", dir);
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "grouped-query");
    CHECK_CONTAINS(r.out, "KV per token");
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "inspect '%s' --prefill-layers 9", dir);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "--prefill-layers");
    tu_run_free(&r);

    /* The same options from the environment; --print-config says where they came from. */
    r = tu_run_tool(tmp, speedctl, "make-tiny-model x --print-config");
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "seed: 1");
    tu_run_free(&r);
    setenv("SPEED_SEED", "42", 1);
    r = tu_run_tool(tmp, speedctl, "make-tiny-model x --print-config");
    CHECK_CONTAINS(r.out, "env:SPEED_SEED");
    tu_run_free(&r);
    unsetenv("SPEED_SEED");
}

static void test_bad_models(void) {
    char dir[1024], path[1200];
    tu_run_t r = tu_run_tool(tmp, speedctl, "inspect '%s/does-not-exist'", tmp);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "speedctl: error:");
    CHECK_INT_EQ(count_lines(r.err), 1);
    tu_run_free(&r);

    /* A model whose weights file is cut short. */
    snprintf(dir, sizeof dir, "%s/cli-truncated", tmp);
    r = tu_run_tool(tmp, speedctl, "make-tiny-model '%s' --layers 2 --hidden 32 --heads 2 --ffn 64 --dtype f16", dir);
    CHECK_INT_EQ(r.rc, 0);
    tu_run_free(&r);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(truncate(path, 1000) == 0);
    r = tu_run_tool(tmp, speedctl, "inspect '%s'", dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "model.safetensors");
    CHECK_INT_EQ(count_lines(r.err), 1);
    tu_run_free(&r);

    /* Invalid config.json */
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"architectures\": [\"LlamaForCausalLM\"], ", f);
    fclose(f);
    r = tu_run_tool(tmp, speedctl, "inspect '%s'", dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "config.json");
    tu_run_free(&r);
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

    tu_run_t r = tu_run_tool(tmp, speedctl, "tokenize --model '%s' --jsonl '%s'", dir, jpath);
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
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "tokenize --model '%s' --decode '%s' --json", dir, list);
    CHECK_INT_EQ(r.rc, 0);
    json_t *dec = json_loads(r.out, 0, NULL);
    json_t *want =
        json_loads("\"Hello, SPEED! \\u00fcn\\u00efc\\u00f6d\\u00e9 \\ud83d\\ude42 123456\"", JSON_DECODE_ANY, NULL);
    CHECK_STR_EQ(json_string_value(json_object_get(dec, "text")), json_string_value(want));
    json_decref(dec);
    json_decref(want);
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "tokenize --model '%s' --text 'Hello' --json", dir);
    CHECK_INT_EQ(r.rc, 0);
    CHECK(strncmp(r.out, "{\"ids\": [", 9) == 0);
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "tokenize --model '%s' --decode 1,2,99999999", dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "99999999");
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "tokenize --model '%s' --text a --decode 1", dir);
    CHECK_INT_EQ(r.rc, 2);
    tu_run_free(&r);

    r = tu_run_tool(tmp, speedctl, "tokenize --model '%s' --chat 'Hi there' --system 'Be brief.' --json", dir);
    CHECK_INT_EQ(r.rc, 0);
    CHECK_CONTAINS(r.out, "<|start_header_id|>system<|end_header_id|>");
    CHECK_CONTAINS(r.out, "<|start_header_id|>assistant<|end_header_id|>");
    tu_run_free(&r);
}

/* ---- generate and bench ------------------------------------------------------------ */

static char gen_dir[1024];

static int count_errors(const char *s) {
    int n = 0;
    for (const char *p = s; (p = strstr(p, "error:")); p++) n++;
    return n;
}

/* Runs generate --json and parses the object (NULL, with a failed check, if it is not one). */
static json_t *gen_json(const char *fmt, ...) {
    char args[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    tu_run_t r = tu_run_tool(tmp, speedctl, "generate --model '%s' --json %s", gen_dir, args);
    CHECK_MSG(r.rc == 0, "generate %s: exit %d: %s", args, r.rc, r.err);
    json_error_t jerr;
    json_t *j = r.rc == 0 ? json_loads(r.out, 0, &jerr) : NULL;
    CHECK_MSG(r.rc != 0 || j != NULL, "generate --json is not one JSON object: %s", r.out);
    tu_run_free(&r);
    return j;
}

/* The schema of the issue, and the logprob invariants. */
static void check_gen_schema(json_t *j, int64_t vocab, int want_top) {
    CHECK(json_is_array(json_object_get(j, "prompt_ids")));
    CHECK(json_array_size(json_object_get(j, "prompt_ids")) > 0);
    json_t *toks = json_object_get(j, "tokens");
    CHECK(json_is_array(toks));
    size_t i;
    json_t *t;
    json_array_foreach(toks, i, t) {
        json_t *id = json_object_get(t, "id"), *lp = json_object_get(t, "logprob"),
               *top = json_object_get(t, "top_logprobs");
        CHECK(json_is_integer(id) && json_integer_value(id) >= 0 && json_integer_value(id) < vocab);
        CHECK(json_is_string(json_object_get(t, "text")));
        CHECK(json_is_real(lp) && json_real_value(lp) <= 0.0);
        CHECK(json_is_array(top));
        CHECK_INT_EQ(json_array_size(top), want_top);
        double prev = 0.0;
        size_t k;
        json_t *e;
        json_array_foreach(top, k, e) {
            double v = json_real_value(json_object_get(e, "logprob"));
            CHECK(json_is_integer(json_object_get(e, "id")));
            CHECK(v <= 0.0 && (k == 0 || v <= prev));
            prev = v;
            /* the chosen token's logprob is the same number in both places */
            if (json_integer_value(json_object_get(e, "id")) == json_integer_value(id))
                CHECK_NEAR(v, json_real_value(lp), 1e-6);
        }
        if (want_top > 0) /* never more likely than the most likely */
            CHECK(json_real_value(lp) <= json_real_value(json_object_get(json_array_get(top, 0), "logprob")) + 1e-6);
    }
    const char *fr = json_string_value(json_object_get(j, "finish_reason"));
    CHECK(fr && (strcmp(fr, "length") == 0 || strcmp(fr, "stop") == 0));
    json_t *timing = json_object_get(j, "timing");
    CHECK(json_is_real(json_object_get(timing, "prefill_ms")) &&
          json_real_value(json_object_get(timing, "prefill_ms")) > 0.0);
    CHECK(json_is_real(json_object_get(timing, "decode_ms_per_token")) &&
          json_real_value(json_object_get(timing, "decode_ms_per_token")) >= 0.0);
    json_t *kv = json_object_get(j, "kv");
    CHECK(json_is_integer(json_object_get(kv, "bytes")) && json_integer_value(json_object_get(kv, "bytes")) > 0);
    CHECK(json_is_integer(json_object_get(kv, "full_depth_bytes")));
}

/* The ids of the tokens array, for comparisons. */
static void token_ids(json_t *j, char *out, size_t n) {
    out[0] = '\0';
    size_t i;
    json_t *t;
    json_array_foreach(json_object_get(j, "tokens"), i, t) {
        char num[32];
        snprintf(num, sizeof num, "%lld,", (long long)json_integer_value(json_object_get(t, "id")));
        if (strlen(out) + strlen(num) < n) strcat(out, num);
    }
}


/* --backend cpu-ref (the plain loops) and --tensor-parallel 2 generate the same greedy tokens as
 * --backend cpu, at full depth and with SPEED; --backend cuda on a machine without a GPU is one
 * clear error line. */
static void test_backends(void) {
    const char *prompts[] = {"1,2,3", "5,9,14,2,7,30,11,4,8,6,3,21", "40,41,42,43"};
    for (size_t i = 0; i < sizeof prompts / sizeof prompts[0]; i++) {
        const char *depth = i == 1 ? "--prefill-layers 2" : "";
        const char *common = "--max-tokens 8 --ignore-eos --kv-dtype f32";
        json_t *fast = gen_json("--prompt-ids %s %s %s --backend cpu", prompts[i], depth, common);
        json_t *others[] = {
            gen_json("--prompt-ids %s %s %s --backend cpu-ref --threads 1", prompts[i], depth, common),
            /* the model split over two ranks (2 kv heads: one each) */
            gen_json("--prompt-ids %s %s %s --backend cpu --tensor-parallel 2 --threads 2", prompts[i], depth, common),
        };
        const char *names[] = {"cpu-ref", "cpu with --tensor-parallel 2"};
        for (int o = 0; o < 2; o++) {
            json_t *ref = others[o];
            CHECK_MSG(ref != NULL, "prompt %s: %s failed", prompts[i], names[o]);
            if (fast && ref) {
                char a[512], b[512];
                token_ids(fast, a, sizeof a);
                token_ids(ref, b, sizeof b);
                CHECK_MSG(strcmp(a, b) == 0, "prompt %s: cpu %s, %s %s", prompts[i], a, names[o], b);
                json_t *ta = json_object_get(fast, "tokens"), *tb = json_object_get(ref, "tokens");
                CHECK_INT_EQ(json_array_size(ta), 8);
                for (size_t k = 0; k < json_array_size(ta) && k < json_array_size(tb); k++)
                    CHECK_NEAR(json_real_value(json_object_get(json_array_get(ta, k), "logprob")),
                               json_real_value(json_object_get(json_array_get(tb, k), "logprob")), 1e-3);
            }
            json_decref(ref);
        }
        json_decref(fast);
    }
    /* a split the model's heads do not allow, and GPU ranks: one line each, exit 1 */
    tu_run_t t = tu_run_tool(tmp, speedctl,
                             "generate --model '%s' --prompt-ids 1,2,3 --max-tokens 2 --tensor-parallel 3", gen_dir);
    CHECK_INT_EQ(t.rc, 1);
    CHECK_CONTAINS(t.err, "does not divide");
    tu_run_free(&t);
    t = tu_run_tool(tmp, speedctl,
                    "generate --model '%s' --prompt-ids 1,2,3 --max-tokens 2 --tensor-parallel 2 --backend cuda",
                    gen_dir);
    CHECK_INT_EQ(t.rc, 1);
    CHECK_CONTAINS(t.err, "--tensor-parallel 2 with --backend cuda");
    CHECK_MSG(count_lines(t.err) == 1, "not one line: %s", t.err);
    tu_run_free(&t);

    tu_run_t r =
        tu_run_tool(tmp, speedctl, "generate --model '%s' --prompt-ids 1,2,3 --max-tokens 2 --backend tpu", gen_dir);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "'tpu' is not one of cpu, cpu-ref, cuda");
    CHECK_STR_EQ(r.out, "");
    tu_run_free(&r);
    r = tu_run_tool(tmp, speedctl, "generate --model '%s' --prompt-ids 1,2,3 --max-tokens 2 --device -1", gen_dir);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_CONTAINS(r.err, "device");
    tu_run_free(&r);
    if (tu_nvidia_gpu_present(NULL, 0)) {
        /* the no-GPU errors cannot be shown here; --backend cuda must generate instead */
        if (!tu_cuda_required()) {
            fprintf(stderr, "note: a GPU is present and SPEED_TEST_CUDA_OPTIONAL=1: --backend cuda not exercised\n");
            return;
        }
        json_t *gpu = gen_json("--prompt-ids 1,2,3 --max-tokens 8 --ignore-eos --kv-dtype f32 --backend cuda");
        CHECK_MSG(gpu != NULL, "--backend cuda failed on a GPU machine");
        if (gpu) CHECK_INT_EQ(json_array_size(json_object_get(gpu, "tokens")), 8);
        json_decref(gpu);
        return;
    }
    const char *cuda_runs[] = {
        "generate --model '%s' --prompt-ids 1,2,3 --max-tokens 2 --backend cuda",
        "generate --model '%s' --prompt 'hello' --max-tokens 2 --backend cuda --device 1 --json",
        "bench --model '%s' --prompt-tokens 8 --gen-tokens 2 --repeat 1 --no-roofline --backend cuda",
    };
    for (size_t i = 0; i < sizeof cuda_runs / sizeof cuda_runs[0]; i++) {
        r = tu_run_tool(tmp, speedctl, cuda_runs[i], gen_dir);
        CHECK_MSG(r.rc == 1, "%s: exit %d, want 1: %s", cuda_runs[i], r.rc, r.err);
        CHECK_MSG(count_errors(r.err) == 1 && count_lines(r.err) == 1, "%s: not one error line: %s", cuda_runs[i],
                  r.err);
        CHECK_CONTAINS(r.err, i == 1 ? "backend cuda:1: " : "backend cuda:0: ");
        /* a CUDA build without a device, or a build without CUDA */
        CHECK_MSG(strstr(r.err, "needs a GPU") || strstr(r.err, "no CUDA backend"), "%s", r.err);
        CHECK_CONTAINS(r.err, "use --backend cpu");
        CHECK_STR_EQ(r.out, "");
        tu_run_free(&r);
    }
}

static void test_generate(void) {
    snprintf(gen_dir, sizeof gen_dir, "%s/cli-gen", tmp);
    tu_run_t r = tu_run_tool(tmp, speedctl,
                             "make-tiny-model '%s' --layers 4 --hidden 64 --heads 4 --kv-heads 2 --ffn 160 --dtype f32 "
                             "--max-position 96 --seed 3",
                             gen_dir);
    CHECK_MSG(r.rc == 0, "make-tiny-model: %s", r.err);
    tu_run_free(&r);
    r = tu_run_tool(tmp, speedctl, "inspect '%s' --json", gen_dir);
    json_t *info = json_loads(r.out, 0, NULL);
    tu_run_free(&r);
    int64_t vocab = json_integer_value(json_object_get(info, "vocab"));
    int64_t bos = json_integer_value(json_object_get(json_object_get(info, "tokenizer"), "bos"));
    int64_t L = json_integer_value(json_object_get(info, "layers"));
    int64_t per_layer_token = 2 * json_integer_value(json_object_get(info, "kv_heads")) *
                              json_integer_value(json_object_get(info, "head_dim")) *
                              4; /* f32 cache: auto, the model's */
    json_decref(info);

    /* schema, token count, logprobs; --prompt starts with the tokenizer's BOS */
    json_t *a = gen_json("--prompt 'The quick brown fox' --max-tokens 6 --top-logprobs 3 --ignore-eos");
    if (a) {
        check_gen_schema(a, vocab, 3);
        CHECK_INT_EQ(json_array_size(json_object_get(a, "tokens")), 6);
        CHECK_STR_EQ(json_string_value(json_object_get(a, "finish_reason")), "length");
        CHECK_INT_EQ(json_integer_value(json_array_get(json_object_get(a, "prompt_ids"), 0)), bos);
        /* greedy: the chosen token is the most likely one */
        size_t i;
        json_t *t;
        json_array_foreach(json_object_get(a, "tokens"), i, t) {
            json_t *top0 = json_array_get(json_object_get(t, "top_logprobs"), 0);
            CHECK_INT_EQ(json_integer_value(json_object_get(t, "id")), json_integer_value(json_object_get(top0, "id")));
        }
        /* C = L: the KV is the full-depth KV */
        json_t *kv = json_object_get(a, "kv");
        CHECK_INT_EQ(json_integer_value(json_object_get(kv, "bytes")),
                     json_integer_value(json_object_get(kv, "full_depth_bytes")));
    }
    /* greedy is deterministic */
    json_t *b = gen_json("--prompt 'The quick brown fox' --max-tokens 6 --top-logprobs 3 --ignore-eos");
    if (a && b) CHECK(json_equal(json_object_get(a, "tokens"), json_object_get(b, "tokens")));
    json_decref(b);

    /* without --ignore-eos: at most max tokens; fewer only by an end-of-sequence token */
    b = gen_json("--prompt-ids 1,2,3,4,5 --max-tokens 12");
    if (b) {
        check_gen_schema(b, vocab, 0);
        size_t n = json_array_size(json_object_get(b, "tokens"));
        CHECK(n >= 1 && n <= 12);
        CHECK_STR_EQ(json_string_value(json_object_get(b, "finish_reason")), n < 12 ? "stop" : "length");
        /* --prompt-ids adds nothing */
        CHECK_INT_EQ(json_array_size(json_object_get(b, "prompt_ids")), 5);
    }
    json_decref(b);

    /* seeds: same seed, same tokens; another seed, other tokens */
    char s1[2048], s2[2048], s3[2048];
    const char *sample = "--prompt 'Once upon a time' --max-tokens 16 --temperature 1 --top-p 0.95 --ignore-eos";
    b = gen_json("%s --seed 5", sample);
    token_ids(b, s1, sizeof s1);
    json_decref(b);
    b = gen_json("%s --seed 5", sample);
    token_ids(b, s2, sizeof s2);
    json_decref(b);
    b = gen_json("%s --seed 6", sample);
    token_ids(b, s3, sizeof s3);
    json_decref(b);
    CHECK_STR_EQ(s1, s2);
    CHECK_MSG(strcmp(s1, s3) != 0, "seeds 5 and 6 gave the same tokens %s", s1);

    /* SPEED: fewer KV bytes below L, exactly the formula; equal at C = L */
    const char *ids = "7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26";
    for (int c = 1; c <= L; c++) {
        b = gen_json("--prompt-ids %s --max-tokens 4 --ignore-eos --prefill-layers %d --anchors 1 --tail 2", ids, c);
        if (!b) continue;
        json_t *kv = json_object_get(b, "kv");
        CHECK_STR_EQ(json_string_value(json_object_get(kv, "dtype")), "f32"); /* auto: the f32 model's */
        int64_t bytes = json_integer_value(json_object_get(kv, "bytes"));
        int64_t full = json_integer_value(json_object_get(kv, "full_depth_bytes"));
        /* 20 prompt tokens + 3 generated tokens stored (the 4th is never fed back) */
        int64_t n = 20, g = 3;
        CHECK_INT_EQ(full, L * (n + g) * per_layer_token);
        CHECK_INT_EQ(bytes, (c * (n + g) + (L - c) * (1 + 2 + g)) * per_layer_token);
        if (c < L)
            CHECK(bytes < full);
        else
            CHECK_INT_EQ(bytes, full);
        CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(b, "speed"), "prefill_layers")), c);
        json_decref(b);
    }
    b = gen_json("--prompt-ids %s --max-tokens 2 --prefill-layers 0.5", ids);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(b, "speed"), "prefill_layers")), L / 2);
    json_decref(b);

    /* --stop: cut the greedy output before the first occurrence of a piece of it */
    if (a) {
        const char *full = json_string_value(json_object_get(a, "text"));
        char stop[8] = "";
        for (size_t i = 2; full && full[i] && full[i + 1]; i++)
            if (isalnum((unsigned char)full[i]) && isalnum((unsigned char)full[i + 1])) {
                memcpy(stop, full + i, 2);
                stop[2] = '\0';
                break;
            }
        if (stop[0]) {
            json_t *c = gen_json("--prompt 'The quick brown fox' --max-tokens 6 --ignore-eos --stop '%s'", stop);
            const char *cut = strstr(full, stop);
            CHECK_STR_EQ(json_string_value(json_object_get(c, "finish_reason")), "stop");
            const char *got = json_string_value(json_object_get(c, "text"));
            CHECK_MSG(got && strlen(got) == (size_t)(cut - full) && strncmp(got, full, (size_t)(cut - full)) == 0,
                      "stop '%s' in '%s' gave '%s'", stop, full, got ? got : "(null)");
            /* the streamed plain output is the same text */
            tu_run_t p = tu_run_tool(tmp, speedctl,
                                     "generate --model '%s' --prompt 'The quick brown fox' --max-tokens 6 --ignore-eos "
                                     "--stop '%s'",
                                     gen_dir, stop);
            CHECK_INT_EQ(p.rc, 0);
            CHECK(got && strncmp(p.out, got, strlen(got)) == 0 && strcmp(p.out + strlen(got), "\n") == 0);
            CHECK_CONTAINS(p.err, "KV");
            CHECK_CONTAINS(p.err, "prefill");
            tu_run_free(&p);
            json_decref(c);
        } else {
            fprintf(stderr, "note: no two-letter piece in '%s'; --stop not exercised\n", full ? full : "");
        }
    }
    json_decref(a);

    /* the reference backend runs the same request */
    b = gen_json("--prompt-ids 1,2,3 --max-tokens 3 --backend cpu-ref --threads 1 --kv-dtype f32");
    if (b) CHECK_INT_EQ(json_array_size(json_object_get(b, "tokens")) >= 1, 1);
    json_decref(b);
    test_backends();

    /* --chat renders the template, which carries the one BOS */
    b = gen_json("--chat 'Hi there' --system 'Be brief.' --max-tokens 2");
    if (b) {
        json_t *p = json_object_get(b, "prompt_ids");
        CHECK_INT_EQ(json_integer_value(json_array_get(p, 0)), bos);
        CHECK(json_integer_value(json_array_get(p, 1)) != bos);
    }
    json_decref(b);

    /* bad input: one error line and the right exit code */
    struct {
        const char *args;
        int rc;
        const char *says;
    } bad[] = {
        {"--prompt-ids 1,2,99999 --max-tokens 2", 1, "99999"},
        {"--prompt-ids 1,2,x", 1, "--prompt-ids"},
        {"--prompt 'hello' --max-tokens 95", 1, "context"},
        {"--prefill-layers 9 --prompt hi", 2, "--prefill-layers"},
        {"--prefill-layers 0 --prompt hi", 2, "--prefill-layers"},
        {"--prefill-layers 1.5 --prompt hi", 2, "--prefill-layers"},
        {"--max-tokens 0 --prompt hi", 2, "max_tokens"},
        {"--top-p 1.5 --prompt hi", 2, "top_p"},
        {"--temperature -1 --prompt hi", 2, "temperature"},
        {"--top-logprobs 21 --prompt hi", 2, "top_logprobs"},
        {"--max-tokens 3", 2, "exactly one of"},
        {"--prompt a --prompt-ids 1", 2, "exactly one of"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        r = tu_run_tool(tmp, speedctl, "generate --model '%s' %s", gen_dir, bad[i].args);
        CHECK_MSG(r.rc == bad[i].rc, "generate %s: exit %d, want %d (%s)", bad[i].args, r.rc, bad[i].rc, r.err);
        CHECK_MSG(count_errors(r.err) == 1, "generate %s: %d error lines: %s", bad[i].args, count_errors(r.err), r.err);
        CHECK_CONTAINS(r.err, bad[i].says);
        CHECK_STR_EQ(r.out, "");
        tu_run_free(&r);
    }
    /* a prompt longer than the context */
    char many[1024] = "1";
    for (int i = 1; i < 100; i++) strcat(many, ",1");
    r = tu_run_tool(tmp, speedctl, "generate --model '%s' --prompt-ids %s --max-tokens 1", gen_dir, many);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_INT_EQ(count_errors(r.err), 1);
    tu_run_free(&r);
}

/* --batch-invariant (docs/cluster.md#batch-invariance): generate --json gives the same tokens
 * and logprobs (every number, bit for bit as printed) on 1 and 2 threads, with a prompt long
 * enough that decode attention would split a row across the threads without it; bench --batch 3
 * gives every sequence of the batch exactly the batch-1 run's tokens and logprobs; the cuda
 * backend refuses the mode with one error line that says so. */
static void test_batch_invariant(void) {
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/cli-bi", tmp);
    tu_run_t r =
        tu_run_tool(tmp, speedctl,
                    "make-tiny-model '%s' --layers 2 --hidden 128 --heads 4 --kv-heads 2 --ffn 256 --max-position 512 "
                    "--seed 5",
                    dir);
    CHECK_MSG(r.rc == 0, "make-tiny-model: %s", r.err);
    tu_run_free(&r);
    char ids[2048] = "1";
    for (int i = 1; i < 300; i++) {
        char num[16];
        snprintf(num, sizeof num, ",%d", 3 + (i * 37) % 200);
        strcat(ids, num);
    }
    json_t *tok[2] = {NULL, NULL};
    for (int t = 0; t < 2; t++) {
        r = tu_run_tool(tmp, speedctl,
                        "generate --model '%s' --json --prompt-ids %s --max-tokens 12 --ignore-eos --top-logprobs 3 "
                        "--batch-invariant --threads %d",
                        dir, ids, t + 1);
        CHECK_MSG(r.rc == 0, "generate --batch-invariant --threads %d: %s", t + 1, r.err);
        json_t *j = r.rc == 0 ? json_loads(r.out, 0, NULL) : NULL;
        tu_run_free(&r);
        tok[t] = j ? json_incref(json_object_get(j, "tokens")) : NULL;
        json_decref(j);
    }
    CHECK(json_array_size(tok[0]) == 12);
    CHECK_MSG(tok[0] && tok[1] && json_equal(tok[0], tok[1]),
              "generate --batch-invariant: tokens or logprobs differ between 1 and 2 threads");
    json_decref(tok[0]);
    json_decref(tok[1]);

    r = tu_run_tool(tmp, speedctl,
                    "bench --model '%s' --prompt-tokens 280 --gen-tokens 10 --batch 3 --repeat 1 --no-roofline --json "
                    "--batch-invariant --threads 2",
                    dir);
    CHECK_MSG(r.rc == 0, "bench --batch-invariant: %s", r.err);
    json_t *j = r.rc == 0 ? json_loads(r.out, 0, NULL) : NULL;
    tu_run_free(&r);
    json_t *m = json_object_get(json_array_get(json_object_get(j, "runs"), 0), "batch_matches_batch1");
    CHECK_MSG(json_is_true(m), "bench --batch 3 --batch-invariant: the batch's tokens/logprobs differ from batch 1's");
    json_decref(j);

    r = tu_run_tool(tmp, speedctl,
                    "generate --model '%s' --prompt-ids 1,2,3 --max-tokens 2 --backend cuda --batch-invariant", dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_INT_EQ(count_errors(r.err), 1);
    CHECK_MSG(strstr(r.err, "batch-invariant") != NULL, "cuda --batch-invariant: %s", r.err);
    tu_run_free(&r);
}

static void test_bench(void) {
    tu_run_t r =
        tu_run_tool(tmp, speedctl,
                    "bench --model '%s' --prompt-tokens 24 --gen-tokens 4 --batch 2 --repeat 1 --prefill-layers 2 "
                    "--compare --roofline-mib 16 --json",
                    gen_dir);
    CHECK_MSG(r.rc == 0, "bench: %s", r.err);
    json_t *j = json_loads(r.out, 0, NULL);
    CHECK_MSG(j != NULL, "bench --json is not JSON: %s", r.out);
    tu_run_free(&r);
    if (j) {
        json_t *runs = json_object_get(j, "runs");
        CHECK_INT_EQ(json_array_size(runs), 2);
        size_t i;
        json_t *x;
        json_array_foreach(runs, i, x) {
            CHECK(json_real_value(json_object_get(x, "prefill_ms")) > 0);
            CHECK(json_real_value(json_object_get(x, "prefill_tokens_per_s")) > 0);
            CHECK(json_real_value(json_object_get(x, "ttft_ms")) > 0);
            CHECK(json_real_value(json_object_get(x, "decode_ms_per_token")) > 0);
            CHECK(json_real_value(json_object_get(x, "batch_decode_tokens_per_s")) > 0);
            json_t *kv = json_object_get(x, "kv");
            CHECK_INT_EQ(json_integer_value(json_object_get(kv, "prompt_bytes")),
                         json_integer_value(json_object_get(kv, "formula_bytes")));
            json_t *f = json_object_get(x, "roofline_fraction");
            CHECK(json_real_value(json_object_get(f, "decode_of_read_bandwidth")) > 0);
            CHECK(json_real_value(json_object_get(f, "prefill_of_compute_peak")) > 0);
        }
        CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(runs, 0), "prefill_layers")), 4);
        CHECK_INT_EQ(json_integer_value(json_object_get(json_array_get(runs, 1), "prefill_layers")), 2);
        CHECK(json_integer_value(json_object_get(json_object_get(json_array_get(runs, 1), "kv"), "prompt_bytes")) <
              json_integer_value(json_object_get(json_object_get(json_array_get(runs, 0), "kv"), "prompt_bytes")));
        json_t *c = json_object_get(j, "compare");
        CHECK(json_real_value(json_object_get(c, "kv_ratio")) > 0 &&
              json_real_value(json_object_get(c, "kv_ratio")) < 1);
        CHECK(json_real_value(json_object_get(c, "prefill_time_ratio")) > 0);
        json_t *mem = json_object_get(j, "memory");
        CHECK(json_integer_value(json_object_get(mem, "peak_rss_bytes")) > 0);
        CHECK(json_integer_value(json_object_get(mem, "kv_pool_bytes")) > 0);
        CHECK(json_integer_value(json_object_get(mem, "weight_bytes")) > 0);
        json_t *rf = json_object_get(j, "roofline");
        CHECK(json_real_value(json_object_get(rf, "read_gbs")) > 0);
        CHECK(json_real_value(json_object_get(rf, "bf16_gflops")) > 0);
        json_decref(j);
    }
    r = tu_run_tool(tmp, speedctl, "bench --model '%s' --prompt-tokens 16 --gen-tokens 3 --repeat 1 --no-roofline",
                    gen_dir);
    CHECK_MSG(r.rc == 0, "bench: %s", r.err);
    CHECK_CONTAINS(r.out, "prefill");
    CHECK_CONTAINS(r.out, "decode b=1");
    CHECK_CONTAINS(r.out, "peak RSS");
    tu_run_free(&r);
    r = tu_run_tool(tmp, speedctl, "bench --model '%s' --compare", gen_dir);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_INT_EQ(count_errors(r.err), 1);
    tu_run_free(&r);
    r = tu_run_tool(tmp, speedctl, "bench --model '%s' --prompt-tokens 90 --gen-tokens 10", gen_dir);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_CONTAINS(r.err, "context");
    tu_run_free(&r);
}

/* Every vectors file line's ids must come back exactly from `tokenize --jsonl`. */
static void check_vectors(const char *model_dir, const char *vectors) {
    tu_run_t r = tu_run_tool(tmp, speedctl, "tokenize --model '%s' --jsonl '%s'", model_dir, vectors);
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
    tu_run_free(&r);
}

static void test_vectors(const char *data) {
    char dir[1024], src[1024], vec[1100];
    static const char *const names[] = {"llama3", "llama2"};
    for (int k = 0; k < 2; k++) {
        snprintf(src, sizeof src, "%s/tokenizers/%s", data, names[k]);
        snprintf(dir, sizeof dir, "%s/cli-%s", tmp, names[k]);
        tu_run_t r = tu_run_tool(
            tmp, speedctl, "make-tiny-model '%s' --layers 1 --hidden 32 --heads 2 --ffn 64 --tokenizer '%s'", dir, src);
        CHECK_MSG(r.rc == 0, "make-tiny-model --tokenizer %s: %s", src, r.err);
        tu_run_free(&r);
        r = tu_run_tool(tmp, speedctl, "inspect '%s' --json", dir);
        CHECK_CONTAINS(r.out, k == 0 ? "\"vocab\": 128256" : "\"vocab\": 32000");
        tu_run_free(&r);
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
    test_generate();
    test_bench();
    test_batch_invariant();
    return CHECK_DONE();
}
