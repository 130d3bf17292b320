/* config.json parsing: real Llama-family configs, and every kind of bad input with its message. */
#include <string.h>

#include "check.h"
#include "model_config.h"
#include "model_test_util.h"

/* Llama-2-7b-hf */
static const char *LLAMA2 = "{\"architectures\":[\"LlamaForCausalLM\"],\"bos_token_id\":1,\"eos_token_id\":2,"
                            "\"hidden_act\":\"silu\",\"hidden_size\":4096,\"initializer_range\":0.02,"
                            "\"intermediate_size\":11008,\"max_position_embeddings\":4096,\"model_type\":\"llama\","
                            "\"num_attention_heads\":32,\"num_hidden_layers\":32,\"num_key_value_heads\":32,"
                            "\"pretraining_tp\":1,\"rms_norm_eps\":1e-05,\"rope_scaling\":null,"
                            "\"tie_word_embeddings\":false,\"torch_dtype\":\"float16\","
                            "\"transformers_version\":\"4.31.0.dev0\",\"use_cache\":true,\"vocab_size\":32000}";

/* Meta-Llama-3-8B */
static const char *LLAMA3 =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,\"attention_dropout\":0.0,"
    "\"bos_token_id\":128000,\"eos_token_id\":128001,\"hidden_act\":\"silu\",\"hidden_size\":4096,"
    "\"initializer_range\":0.02,\"intermediate_size\":14336,\"max_position_embeddings\":8192,"
    "\"model_type\":\"llama\",\"num_attention_heads\":32,\"num_hidden_layers\":32,"
    "\"num_key_value_heads\":8,\"pretraining_tp\":1,\"rms_norm_eps\":1e-05,\"rope_scaling\":null,"
    "\"rope_theta\":500000.0,\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\","
    "\"transformers_version\":\"4.40.0.dev0\",\"use_cache\":true,\"vocab_size\":128256}";

/* Llama-3.1-8B-Instruct */
static const char *LLAMA31 =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,\"attention_dropout\":0.0,"
    "\"bos_token_id\":128000,\"eos_token_id\":[128001,128008,128009],\"hidden_act\":\"silu\","
    "\"hidden_size\":4096,\"initializer_range\":0.02,\"intermediate_size\":14336,"
    "\"max_position_embeddings\":131072,\"mlp_bias\":false,\"model_type\":\"llama\","
    "\"num_attention_heads\":32,\"num_hidden_layers\":32,\"num_key_value_heads\":8,"
    "\"pretraining_tp\":1,\"rms_norm_eps\":1e-05,\"rope_scaling\":{\"factor\":8.0,"
    "\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192,"
    "\"rope_type\":\"llama3\"},\"rope_theta\":500000.0,\"tie_word_embeddings\":false,"
    "\"torch_dtype\":\"bfloat16\",\"transformers_version\":\"4.42.3\",\"use_cache\":true,"
    "\"vocab_size\":128256}";

/* Llama-3.2-1B: tied, explicit head_dim, rope factor 32 */
static const char *LLAMA32 =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,\"attention_dropout\":0.0,"
    "\"bos_token_id\":128000,\"eos_token_id\":128001,\"head_dim\":64,\"hidden_act\":\"silu\","
    "\"hidden_size\":2048,\"initializer_range\":0.02,\"intermediate_size\":8192,"
    "\"max_position_embeddings\":131072,\"mlp_bias\":false,\"model_type\":\"llama\","
    "\"num_attention_heads\":32,\"num_hidden_layers\":16,\"num_key_value_heads\":8,"
    "\"pretraining_tp\":1,\"rms_norm_eps\":1e-05,\"rope_scaling\":{\"factor\":32.0,"
    "\"high_freq_factor\":4.0,\"low_freq_factor\":1.0,\"original_max_position_embeddings\":8192,"
    "\"rope_type\":\"llama3\"},\"rope_theta\":500000.0,\"tie_word_embeddings\":true,"
    "\"torch_dtype\":\"bfloat16\",\"transformers_version\":\"4.45.0.dev0\",\"use_cache\":true,"
    "\"vocab_size\":128256}";

/* TinyLlama-1.1B-Chat-v1.0 */
static const char *TINYLLAMA =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,\"bos_token_id\":1,"
    "\"eos_token_id\":2,\"hidden_act\":\"silu\",\"hidden_size\":2048,\"initializer_range\":0.02,"
    "\"intermediate_size\":5632,\"max_position_embeddings\":2048,\"model_type\":\"llama\","
    "\"num_attention_heads\":32,\"num_hidden_layers\":22,\"num_key_value_heads\":4,"
    "\"pretraining_tp\":1,\"rms_norm_eps\":1e-05,\"rope_scaling\":null,\"rope_theta\":10000.0,"
    "\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\","
    "\"transformers_version\":\"4.35.0\",\"use_cache\":true,\"vocab_size\":32000}";

/* SmolLM-135M: tied, 9 heads of 64, 3 kv heads */
static const char *SMOLLM =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"attention_bias\":false,\"attention_dropout\":0.0,"
    "\"bos_token_id\":0,\"eos_token_id\":0,\"hidden_act\":\"silu\",\"hidden_size\":576,"
    "\"initializer_range\":0.02,\"intermediate_size\":1536,\"max_position_embeddings\":2048,"
    "\"model_type\":\"llama\",\"num_attention_heads\":9,\"num_hidden_layers\":30,"
    "\"num_key_value_heads\":3,\"pretraining_tp\":1,\"rms_norm_eps\":1e-05,\"rope_scaling\":null,"
    "\"rope_theta\":10000.0,\"tie_word_embeddings\":true,\"torch_dtype\":\"float32\","
    "\"transformers_version\":\"4.39.3\",\"use_cache\":true,\"vocab_size\":49152}";

static int64_t g_base;

static speed_status_t parse(const char *text, speed_model_config_t *c) {
    speed_log_clear_last_error();
    memset(c, 0x5a, sizeof *c);
    return speed_model_config_parse(text, strlen(text), "test/config.json", c);
}

static void test_real_configs(void) {
    speed_model_config_t c;
    CHECK_INT_EQ(parse(LLAMA2, &c), SPEED_OK);
    CHECK_STR_EQ(c.architecture, "LlamaForCausalLM");
    CHECK_INT_EQ(c.n_layers, 32);
    CHECK_INT_EQ(c.hidden, 4096);
    CHECK_INT_EQ(c.n_heads, 32);
    CHECK_INT_EQ(c.n_kv_heads, 32);
    CHECK_INT_EQ(c.head_dim, 128);
    CHECK_INT_EQ(c.ffn, 11008);
    CHECK_INT_EQ(c.vocab_size, 32000);
    CHECK_INT_EQ(c.max_position, 4096);
    CHECK_NEAR(c.rope_theta, 10000.0, 0); /* default */
    CHECK_NEAR(c.rms_norm_eps, 1e-5, 1e-12);
    CHECK_INT_EQ(c.rope_scaling.type, SPEED_ROPE_SCALING_NONE);
    CHECK(!c.tie_word_embeddings);
    CHECK_INT_EQ(c.bos_token_id, 1);
    CHECK_INT_EQ(c.n_eos, 1);
    CHECK_INT_EQ(c.eos_token_ids[0], 2);
    CHECK(c.has_torch_dtype);
    CHECK_INT_EQ(c.torch_dtype, SPEED_DTYPE_F16);

    CHECK_INT_EQ(parse(LLAMA3, &c), SPEED_OK);
    CHECK_INT_EQ(c.n_kv_heads, 8);
    CHECK_INT_EQ(c.ffn, 14336);
    CHECK_NEAR(c.rope_theta, 500000.0, 0);
    CHECK_INT_EQ(c.bos_token_id, 128000);
    CHECK_INT_EQ(c.n_eos, 1);
    CHECK_INT_EQ(c.eos_token_ids[0], 128001);
    CHECK_INT_EQ(c.torch_dtype, SPEED_DTYPE_BF16);

    CHECK_INT_EQ(parse(LLAMA31, &c), SPEED_OK);
    CHECK_INT_EQ(c.max_position, 131072);
    CHECK_INT_EQ(c.rope_scaling.type, SPEED_ROPE_SCALING_LLAMA3);
    CHECK_NEAR(c.rope_scaling.factor, 8.0, 0);
    CHECK_NEAR(c.rope_scaling.low_freq_factor, 1.0, 0);
    CHECK_NEAR(c.rope_scaling.high_freq_factor, 4.0, 0);
    CHECK_INT_EQ(c.rope_scaling.original_max_position, 8192);
    CHECK_INT_EQ(c.n_eos, 3);
    CHECK_INT_EQ(c.eos_token_ids[0], 128001);
    CHECK_INT_EQ(c.eos_token_ids[1], 128008);
    CHECK_INT_EQ(c.eos_token_ids[2], 128009);

    CHECK_INT_EQ(parse(LLAMA32, &c), SPEED_OK);
    CHECK_INT_EQ(c.n_layers, 16);
    CHECK_INT_EQ(c.head_dim, 64);
    CHECK(c.tie_word_embeddings);
    CHECK_NEAR(c.rope_scaling.factor, 32.0, 0);

    CHECK_INT_EQ(parse(TINYLLAMA, &c), SPEED_OK);
    CHECK_INT_EQ(c.n_layers, 22);
    CHECK_INT_EQ(c.n_kv_heads, 4);
    CHECK_INT_EQ(c.head_dim, 64);
    CHECK_INT_EQ(c.ffn, 5632);

    CHECK_INT_EQ(parse(SMOLLM, &c), SPEED_OK);
    CHECK_INT_EQ(c.n_heads, 9);
    CHECK_INT_EQ(c.n_kv_heads, 3);
    CHECK_INT_EQ(c.head_dim, 64);
    CHECK(c.tie_word_embeddings);
    CHECK_INT_EQ(c.bos_token_id, 0);
    CHECK_INT_EQ(c.eos_token_ids[0], 0);
    CHECK_INT_EQ(c.torch_dtype, SPEED_DTYPE_F32);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

/* Minimal configs: defaults, model_type without architectures, explicit head_dim. */
static void test_variants(void) {
    speed_model_config_t c;
    CHECK_INT_EQ(parse("{\"model_type\":\"llama\",\"num_hidden_layers\":2,\"hidden_size\":64,"
                       "\"num_attention_heads\":4,\"intermediate_size\":128,\"vocab_size\":100,"
                       "\"max_position_embeddings\":64}",
                       &c),
                 SPEED_OK);
    CHECK_INT_EQ(c.n_kv_heads, 4); /* default n_heads */
    CHECK_INT_EQ(c.head_dim, 16);  /* hidden / n_heads */
    CHECK_NEAR(c.rope_theta, 10000.0, 0);
    CHECK_NEAR(c.rms_norm_eps, 1e-6, 1e-12);
    CHECK_INT_EQ(c.bos_token_id, -1);
    CHECK_INT_EQ(c.n_eos, 0);
    CHECK(!c.has_torch_dtype);
    CHECK(!c.tie_word_embeddings);

    /* head_dim * n_heads != hidden is fine when head_dim is explicit */
    CHECK_INT_EQ(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"num_hidden_layers\":2,"
                       "\"hidden_size\":100,\"num_attention_heads\":3,\"head_dim\":48,"
                       "\"num_key_value_heads\":1,\"intermediate_size\":128,\"vocab_size\":100,"
                       "\"max_position_embeddings\":64,\"dtype\":\"bfloat16\","
                       "\"bos_token_id\":null,\"eos_token_id\":[5,7],"
                       "\"rope_scaling\":{\"type\":\"llama3\",\"factor\":2,\"low_freq_factor\":1,"
                       "\"high_freq_factor\":4,\"original_max_position_embeddings\":32}}",
                       &c),
                 SPEED_OK);
    CHECK_INT_EQ(c.head_dim, 48);
    CHECK_INT_EQ(c.torch_dtype, SPEED_DTYPE_BF16);
    CHECK_INT_EQ(c.bos_token_id, -1);
    CHECK_INT_EQ(c.n_eos, 2);
    CHECK_INT_EQ(c.rope_scaling.type, SPEED_ROPE_SCALING_LLAMA3);
    CHECK_NEAR(c.rope_scaling.factor, 2.0, 0);

    /* rope_type "default" means no scaling */
    CHECK_INT_EQ(parse("{\"model_type\":\"llama\",\"num_hidden_layers\":2,\"hidden_size\":64,"
                       "\"num_attention_heads\":4,\"intermediate_size\":128,\"vocab_size\":100,"
                       "\"max_position_embeddings\":64,\"rope_scaling\":{\"rope_type\":\"default\"}}",
                       &c),
                 SPEED_OK);
    CHECK_INT_EQ(c.rope_scaling.type, SPEED_ROPE_SCALING_NONE);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

/* A base config with one key replaced (value NULL = removed). */
static char *with_key(const char *key, const char *value) {
    static char buf[4096];
    static const char *keys[] = {"architectures",       "model_type",          "num_hidden_layers",
                                 "hidden_size",         "num_attention_heads", "num_key_value_heads",
                                 "intermediate_size",   "vocab_size",          "max_position_embeddings",
                                 "rms_norm_eps",        "rope_theta",          "bos_token_id",
                                 "eos_token_id",        "torch_dtype",         "rope_scaling",
                                 "tie_word_embeddings", "hidden_act"};
    static const char *vals[] = {"[\"LlamaForCausalLM\"]",
                                 "\"llama\"",
                                 "4",
                                 "64",
                                 "4",
                                 "2",
                                 "128",
                                 "100",
                                 "64",
                                 "1e-5",
                                 "10000.0",
                                 "1",
                                 "2",
                                 "\"bfloat16\"",
                                 "null",
                                 "false",
                                 "\"silu\""};
    size_t n = 0;
    bool used = false;
    n += (size_t)sprintf(buf + n, "{");
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *v = vals[i];
        if (strcmp(keys[i], key) == 0) {
            v = value;
            used = true;
        }
        if (!v) continue;
        n += (size_t)sprintf(buf + n, "%s\"%s\":%s", n > 1 ? "," : "", keys[i], v);
    }
    if (!used && value) n += (size_t)sprintf(buf + n, ",\"%s\":%s", key, value);
    sprintf(buf + n, "}");
    return buf;
}

static void expect_bad(const char *key, const char *value, speed_status_t want, const char *msg) {
    speed_model_config_t c;
    speed_status_t s = parse(with_key(key, value), &c);
    CHECK_MSG(s == want, "%s=%s: status %d, want %d", key, value ? value : "(removed)", s, want);
    if (want == SPEED_OK) return;
    CHECK_CONTAINS(speed_log_last_error(), "test/config.json: ");
    CHECK_CONTAINS(speed_log_last_error(), msg);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

static void test_bad(void) {
    speed_model_config_t c;
    CHECK_INT_EQ(parse(with_key("x", NULL), &c), SPEED_OK); /* the base is good */

    expect_bad("num_hidden_layers", NULL, SPEED_ERR_FORMAT, "num_hidden_layers: missing");
    expect_bad("hidden_size", NULL, SPEED_ERR_FORMAT, "hidden_size: missing");
    expect_bad("num_attention_heads", NULL, SPEED_ERR_FORMAT, "num_attention_heads: missing");
    expect_bad("intermediate_size", NULL, SPEED_ERR_FORMAT, "intermediate_size: missing");
    expect_bad("vocab_size", NULL, SPEED_ERR_FORMAT, "vocab_size: missing");
    expect_bad("max_position_embeddings", NULL, SPEED_ERR_FORMAT, "max_position_embeddings: missing");
    expect_bad("num_hidden_layers", "0", SPEED_ERR_FORMAT, "num_hidden_layers: 0 is out of range");
    expect_bad("hidden_size", "-64", SPEED_ERR_FORMAT, "hidden_size: -64 is out of range");
    expect_bad("hidden_size", "\"64\"", SPEED_ERR_FORMAT, "hidden_size: expected an integer");
    expect_bad("hidden_size", "64.5", SPEED_ERR_FORMAT, "hidden_size: expected an integer");
    expect_bad("vocab_size", "1000000000", SPEED_ERR_FORMAT, "vocab_size: 1000000000 is out of range");
    expect_bad("num_hidden_layers", "100000", SPEED_ERR_FORMAT, "num_hidden_layers: 100000 is out of range");
    expect_bad("num_key_value_heads", "3", SPEED_ERR_FORMAT,
               "num_key_value_heads: 3 does not divide num_attention_heads 4");
    expect_bad("num_key_value_heads", "8", SPEED_ERR_FORMAT,
               "num_key_value_heads: 8 does not divide num_attention_heads 4");
    expect_bad("num_attention_heads", "6", SPEED_ERR_FORMAT,
               "num_attention_heads: 6 does not divide hidden_size 64 (and no head_dim)");
    expect_bad("head_dim", "15", SPEED_ERR_FORMAT, "head_dim: 15 is odd");
    expect_bad("head_dim", "0", SPEED_ERR_FORMAT, "head_dim: 0 is out of range");
    expect_bad("rms_norm_eps", "0", SPEED_ERR_FORMAT, "rms_norm_eps: 0 is out of range");
    expect_bad("rms_norm_eps", "\"small\"", SPEED_ERR_FORMAT, "rms_norm_eps: expected a number");
    /* positive as a double, 0 as the float that is kept (found by fuzz_model_config) */
    expect_bad("rms_norm_eps", "1e-55", SPEED_ERR_FORMAT, "rms_norm_eps: 1e-55 is out of range");
    expect_bad("rope_theta", "1e-300", SPEED_ERR_FORMAT, "rope_theta: 1e-300 is out of range");
    expect_bad("rope_theta", "-1", SPEED_ERR_FORMAT, "rope_theta: -1 is out of range");
    expect_bad("bos_token_id", "100", SPEED_ERR_FORMAT, "bos_token_id: 100 is outside the vocabulary");
    expect_bad("eos_token_id", "[2,-1]", SPEED_ERR_FORMAT, "eos_token_id: -1 is outside");
    expect_bad("eos_token_id", "\"</s>\"", SPEED_ERR_FORMAT, "eos_token_id: expected an integer");
    expect_bad("eos_token_id", "[1,2,3,4,5,6,7,8,9]", SPEED_ERR_FORMAT, "eos_token_id: more than 8");
    expect_bad("tie_word_embeddings", "1", SPEED_ERR_FORMAT, "tie_word_embeddings: expected true or false");
    expect_bad("architectures", "[\"MistralForCausalLM\"]", SPEED_ERR_UNSUPPORTED,
               "architectures: \"MistralForCausalLM\" is not supported");
    expect_bad("model_type", "\"qwen2\"", SPEED_ERR_UNSUPPORTED, "model_type: \"qwen2\" is not supported");
    expect_bad("architectures", "[]", SPEED_ERR_FORMAT, "architectures: expected a non-empty list");
    expect_bad("architectures", "\"LlamaForCausalLM\"", SPEED_ERR_FORMAT, "architectures: expected");
    expect_bad("torch_dtype", "\"float64\"", SPEED_ERR_UNSUPPORTED, "torch_dtype: \"float64\" is not supported");
    expect_bad("hidden_act", "\"gelu\"", SPEED_ERR_UNSUPPORTED, "hidden_act: only \"silu\"");
    expect_bad("attention_bias", "true", SPEED_ERR_UNSUPPORTED, "attention_bias: true is not supported");
    expect_bad("mlp_bias", "true", SPEED_ERR_UNSUPPORTED, "mlp_bias: true is not supported");
    expect_bad("rope_scaling", "{\"type\":\"linear\",\"factor\":2.0}", SPEED_ERR_UNSUPPORTED,
               "rope_scaling.rope_type: \"linear\" is not supported");
    expect_bad("rope_scaling", "{\"rope_type\":\"yarn\",\"factor\":4.0}", SPEED_ERR_UNSUPPORTED,
               "\"yarn\" is not supported");
    expect_bad("rope_scaling",
               "{\"rope_type\":\"llama3\",\"low_freq_factor\":1,\"high_freq_factor\":4,"
               "\"original_max_position_embeddings\":8192}",
               SPEED_ERR_FORMAT, "rope_scaling.factor: missing");
    expect_bad("rope_scaling",
               "{\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":4,"
               "\"high_freq_factor\":1,\"original_max_position_embeddings\":8192}",
               SPEED_ERR_FORMAT, "rope_scaling.high_freq_factor");
    expect_bad("rope_scaling",
               "{\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":1,"
               "\"high_freq_factor\":4}",
               SPEED_ERR_FORMAT, "rope_scaling.original_max_position_embeddings: missing");
    expect_bad("rope_scaling", "[]", SPEED_ERR_FORMAT, "rope_scaling: expected an object or null");
    expect_bad("architectures", NULL, SPEED_OK, ""); /* model_type alone is enough */

    /* neither architectures nor model_type */
    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_model_config_parse("{\"hidden_size\":64}", 18, "x.json", &c), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(speed_log_last_error(), "x.json: architectures: missing");

    /* not JSON, not an object, duplicate keys, big integers */
    CHECK_INT_EQ(parse("{\"hidden_size\": 64,", &c), SPEED_ERR_PARSE);
    CHECK_CONTAINS(speed_log_last_error(), "test/config.json: not valid JSON");
    CHECK_INT_EQ(parse("[1, 2]", &c), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(speed_log_last_error(), "expected a JSON object");
    CHECK_INT_EQ(parse("{\"hidden_size\":64,\"hidden_size\":32}", &c), SPEED_ERR_PARSE);
    CHECK_INT_EQ(parse(with_key("vocab_size", "18446744073709551616"), &c), SPEED_ERR_PARSE);
    CHECK_INT_EQ(parse("", &c), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

static void test_files(void) {
    speed_model_config_t c;
    tu_write_text(tu_path("config.json"), LLAMA31);
    CHECK_INT_EQ(speed_model_config_load(tu_path("config.json"), &c), SPEED_OK);
    CHECK_INT_EQ(c.n_eos, 3);

    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_model_config_load(tu_path("absent.json"), &c), SPEED_ERR_NOT_FOUND);
    CHECK_CONTAINS(speed_log_last_error(), "absent.json: No such file");

    CHECK_INT_EQ(speed_model_config_load(tu_root, &c), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "is a directory, expected a file");

    tu_write_text(tu_path("bad.json"), "{\"architectures\": [\"LlamaForCausalLM\"], \"num_hidden_layers\": -2}");
    CHECK_INT_EQ(speed_model_config_load(tu_path("bad.json"), &c), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(speed_log_last_error(), tu_path("bad.json"));
    CHECK_CONTAINS(speed_log_last_error(), "num_hidden_layers: -2 is out of range");

    tu_write_text(tu_path("garbage.json"), "\x89PNG\r\n");
    CHECK_INT_EQ(speed_model_config_load(tu_path("garbage.json"), &c), SPEED_ERR_PARSE);
    CHECK_CONTAINS(speed_log_last_error(), "garbage.json: not valid JSON");
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

int main(void) {
    tu_log_capture();
    tu_tmp_init("model_config");
    g_base = speed_alloc_live_count();
    test_real_configs();
    test_variants();
    test_bad();
    test_files();
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
