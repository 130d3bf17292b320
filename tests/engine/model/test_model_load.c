/* speed_model_load over directories written by speed_tiny_model_write: round trips for every
 * dtype/tying/sharding, and every way a model directory can be wrong. */
#include <jansson.h>
#include <string.h>

#include "check.h"
#include "model.h"
#include "model_test_util.h"
#include "safetensors.h"
#include "tiny_model.h"

static int64_t g_base;

typedef struct {
    const speed_tensor_t *t;
    const char *name;
    int64_t d0, d1;
} expect_t;

/* Every tensor of `m` has the shape and exactly the bytes the writer promises. */
static void check_weights(const speed_model_t *m, const speed_tiny_model_params_t *p) {
    const speed_model_config_t *c = &m->config;
    int64_t q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim;
    size_t esize = speed_dtype_size(p->dtype);
    float *vals = malloc((size_t)c->vocab_size * (size_t)c->hidden * sizeof(float) + 4096 * 4);
    unsigned char *want = malloc((size_t)c->vocab_size * (size_t)c->hidden * 4 + 4096 * 4);
    int64_t n_params = 0;
    int bad = 0;
    expect_t list[2 + 1 + 9 * 16];
    int n = 0;
    list[n++] = (expect_t){m->tok_embeddings, "model.embed_tokens.weight", c->vocab_size, c->hidden};
    list[n++] = (expect_t){m->norm, "model.norm.weight", c->hidden, 0};
    if (!p->tied) list[n++] = (expect_t){m->lm_head, "lm_head.weight", c->vocab_size, c->hidden};
    static char names[16][9][96];
    for (int l = 0; l < c->n_layers && l < 16; l++) {
        const speed_layer_weights_t *w = &m->layers[l];
        const char *sfx[9] = {"input_layernorm",  "self_attn.q_proj", "self_attn.k_proj",
                              "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm",
                              "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
        const speed_tensor_t *ts[9] = {w->attn_norm, w->wq,     w->wk,   w->wv,    w->wo,
                                       w->ffn_norm,  w->w_gate, w->w_up, w->w_down};
        int64_t d[9][2] = {{c->hidden, 0}, {q, c->hidden},      {kv, c->hidden},     {kv, c->hidden},    {c->hidden, q},
                           {c->hidden, 0}, {c->ffn, c->hidden}, {c->ffn, c->hidden}, {c->hidden, c->ffn}};
        for (int i = 0; i < 9; i++) {
            snprintf(names[l][i], 96, "model.layers.%d.%s.weight", l, sfx[i]);
            list[n++] = (expect_t){ts[i], names[l][i], d[i][0], d[i][1]};
        }
    }
    for (int i = 0; i < n; i++) {
        const speed_tensor_t *t = list[i].t;
        if (!t) {
            bad++;
            continue;
        }
        int nd = list[i].d1 ? 2 : 1;
        int64_t ne = list[i].d0 * (nd == 2 ? list[i].d1 : 1);
        CHECK_STR_EQ(t->name, list[i].name);
        CHECK_INT_EQ(t->n_dims, nd);
        CHECK_INT_EQ(t->shape[0], list[i].d0);
        if (nd == 2) CHECK_INT_EQ(t->shape[1], list[i].d1);
        CHECK_INT_EQ(t->dtype, p->dtype);
        CHECK_INT_EQ(t->n_bytes, (size_t)ne * esize);
        CHECK((uintptr_t)t->data % esize == 0);
        speed_tiny_model_tensor_values(p, list[i].name, vals, (size_t)ne);
        speed_dtype_from_f32(p->dtype, vals, want, (size_t)ne);
        if (memcmp(t->data, want, t->n_bytes) != 0) {
            fprintf(stderr, "bytes differ: %s\n", list[i].name);
            bad++;
        }
        /* sanity of the values themselves */
        double sum = 0, sq = 0;
        for (int64_t k = 0; k < ne; k++) sum += vals[k], sq += (double)vals[k] * vals[k];
        double mean = sum / (double)ne, sd = sqrt(sq / (double)ne - mean * mean);
        if (nd == 1)
            CHECK_MSG(fabs(mean - 1.0) < 0.01 && sd < 3 * p->init_std, "%s: %g %g", list[i].name, mean, sd);
        else
            CHECK_MSG(fabs(mean) < 0.01 && fabs(sd - p->init_std) < 0.2 * p->init_std, "%s: %g %g", list[i].name, mean,
                      sd);
        n_params += ne;
    }
    CHECK_INT_EQ(bad, 0);
    if (p->tied)
        CHECK(m->lm_head == m->tok_embeddings);
    else
        CHECK(m->lm_head != m->tok_embeddings);
    CHECK_INT_EQ(speed_model_n_params(m), n_params);
    CHECK_INT_EQ(speed_model_n_bytes(m), (size_t)n_params * esize);
    free(vals);
    free(want);
}

static void test_round_trip(void) {
    const speed_dtype_t dtypes[] = {SPEED_DTYPE_F32, SPEED_DTYPE_BF16, SPEED_DTYPE_F16};
    for (int d = 0; d < 3; d++) {
        for (int tied = 0; tied < 2; tied++) {
            for (int shards = 1; shards <= 3; shards += 2) {
                speed_tiny_model_params_t p = speed_tiny_model_default_params();
                p.dtype = dtypes[d];
                p.tied = tied;
                p.n_shards = shards;
                p.seed = 1000 + (uint64_t)(d * 10 + tied * 2 + shards);
                const char *dir = tu_path("rt-%s-%d-%d", speed_dtype_name(p.dtype), tied, shards);
                CHECK_INT_EQ(speed_tiny_model_write(dir, &p), SPEED_OK);
                CHECK_INT_EQ(speed_alloc_live_count(), g_base);
                speed_model_t *m = NULL;
                tu_warnings_reset();
                CHECK_INT_EQ(speed_model_load(dir, NULL, &m), SPEED_OK);
                CHECK_INT_EQ(tu_n_warnings, 0);
                if (!m) continue;
                CHECK_INT_EQ(m->config.n_layers, 4);
                CHECK_INT_EQ(m->config.hidden, 64);
                CHECK_INT_EQ(m->config.n_heads, 4);
                CHECK_INT_EQ(m->config.n_kv_heads, 2);
                CHECK_INT_EQ(m->config.head_dim, 16);
                CHECK_INT_EQ(m->config.ffn, 172);
                CHECK_INT_EQ(m->config.vocab_size, 512);
                CHECK_INT_EQ(m->config.max_position, 4096);
                CHECK_INT_EQ(m->config.torch_dtype, p.dtype);
                CHECK_INT_EQ(m->config.tie_word_embeddings, tied);
                CHECK_INT_EQ(m->config.bos_token_id, 1);
                CHECK_INT_EQ(m->config.n_eos, 1);
                CHECK_INT_EQ(m->config.eos_token_ids[0], 2);
                CHECK_NEAR(m->config.rms_norm_eps, 1e-5, 1e-12);
                check_weights(m, &p);
                if (shards == 3) {
                    struct stat sb;
                    CHECK(stat(tu_path("rt-%s-%d-3/model-00003-of-00003.safetensors", speed_dtype_name(p.dtype), tied),
                               &sb) == 0);
                    CHECK(stat(tu_path("rt-%s-%d-3/model.safetensors", speed_dtype_name(p.dtype), tied), &sb) != 0);
                }
                speed_model_destroy(m);
                CHECK_INT_EQ(speed_alloc_live_count(), g_base);
            }
        }
    }

    /* rope scaling, explicit head_dim (n_heads * head_dim != hidden), several eos ids, no bos */
    speed_tiny_model_params_t p = speed_tiny_model_default_params();
    p.head_dim = 32;
    p.n_kv_heads = 1;
    p.rope_scaling = true;
    p.rope_theta = 500000.0f;
    p.n_eos = 3, p.eos_token_ids[0] = 5, p.eos_token_ids[1] = 6, p.eos_token_ids[2] = 7;
    p.bos_token_id = -1;
    p.dtype = SPEED_DTYPE_BF16;
    p.n_shards = 2;
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("llama3ish"), &p), SPEED_OK);
    speed_model_t *m = NULL;
    CHECK_INT_EQ(speed_model_load(tu_path("llama3ish"), NULL, &m), SPEED_OK);
    if (m) {
        CHECK_INT_EQ(m->config.head_dim, 32);
        CHECK_INT_EQ(m->layers[0].wq->shape[0], 128);
        CHECK_INT_EQ(m->layers[0].wo->shape[1], 128);
        CHECK_INT_EQ(m->layers[3].wk->shape[0], 32);
        CHECK_INT_EQ(m->config.rope_scaling.type, SPEED_ROPE_SCALING_LLAMA3);
        CHECK_NEAR(m->config.rope_scaling.factor, 8, 0);
        CHECK_NEAR(m->config.rope_scaling.low_freq_factor, 1, 0);
        CHECK_NEAR(m->config.rope_scaling.high_freq_factor, 4, 0);
        CHECK_INT_EQ(m->config.rope_scaling.original_max_position, 8192);
        CHECK_NEAR(m->config.rope_theta, 500000.0, 0);
        CHECK_INT_EQ(m->config.n_eos, 3);
        CHECK_INT_EQ(m->config.eos_token_ids[2], 7);
        CHECK_INT_EQ(m->config.bos_token_id, -1);
        check_weights(m, &p);
        CHECK(speed_model_tensor_find(m, "model.norm.weight") == m->norm);
        CHECK(speed_model_tensor_find(m, "nope") == NULL);
    }
    speed_model_destroy(m);

    /* same seed, same bytes; rewriting a directory with another layout replaces it */
    p = speed_tiny_model_default_params();
    p.n_shards = 3;
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("relayout"), &p), SPEED_OK);
    p.n_shards = 1;
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("relayout"), &p), SPEED_OK);
    struct stat sb;
    CHECK(stat(tu_path("relayout/model.safetensors.index.json"), &sb) != 0);
    CHECK(stat(tu_path("relayout/model-00001-of-00003.safetensors"), &sb) != 0);
    CHECK_INT_EQ(speed_model_load(tu_path("relayout"), NULL, &m), SPEED_OK);
    if (m) check_weights(m, &p);
    speed_model_destroy(m);
    speed_model_destroy(NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

static void test_writer(void) {
    speed_tiny_model_params_t p;
    CHECK_INT_EQ(speed_tiny_model_preset("tinyllama-1.1b", &p), SPEED_OK);
    CHECK_INT_EQ(p.n_layers, 22);
    CHECK_INT_EQ(p.hidden, 2048);
    CHECK_INT_EQ(p.n_heads, 32);
    CHECK_INT_EQ(p.n_kv_heads, 4);
    CHECK_INT_EQ(p.ffn, 5632);
    CHECK_INT_EQ(p.vocab_size, 32000);
    CHECK_INT_EQ(p.max_position, 2048);
    CHECK_INT_EQ(p.dtype, SPEED_DTYPE_BF16);
    CHECK_NEAR(p.rope_theta, 10000, 0);
    CHECK_INT_EQ(speed_tiny_model_preset("tiny", &p), SPEED_OK);
    CHECK_INT_EQ(p.n_layers, 4);
    CHECK_INT_EQ(p.hidden, 64);
    CHECK_INT_EQ(p.ffn, 172);
    CHECK_INT_EQ(speed_tiny_model_preset("smollm-135m", &p), SPEED_OK);
    CHECK(p.tied);
    CHECK_INT_EQ(speed_tiny_model_preset("gpt-2", &p), SPEED_ERR_NOT_FOUND);
    CHECK_CONTAINS(speed_log_last_error(), "\"gpt-2\" unknown");

    /* invalid params are refused before anything is written */
    const char *dir = tu_path("refused");
    p = speed_tiny_model_default_params();
    p.n_kv_heads = 3;
    CHECK_INT_EQ(speed_tiny_model_write(dir, &p), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "num_key_value_heads: 3 does not divide");
    p = speed_tiny_model_default_params();
    p.eos_token_ids[0] = 512;
    CHECK_INT_EQ(speed_tiny_model_write(dir, &p), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "eos_token_id: 512 is outside the vocabulary");
    p = speed_tiny_model_default_params();
    p.n_shards = 1000;
    CHECK_INT_EQ(speed_tiny_model_write(dir, &p), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "1000 shards for 39 tensors");
    p = speed_tiny_model_default_params();
    p.n_shards = 0;
    CHECK_INT_EQ(speed_tiny_model_write(dir, &p), SPEED_ERR_INVALID_ARGUMENT);
    p = speed_tiny_model_default_params();
    p.hidden = 0;
    CHECK_INT_EQ(speed_tiny_model_write(dir, &p), SPEED_ERR_INVALID_ARGUMENT);
    struct stat sb;
    CHECK(stat(dir, &sb) != 0);
    p = speed_tiny_model_default_params();
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("no/such/parent"), &p), SPEED_ERR_NOT_FOUND);
    tu_write_text(tu_path("a-file"), "x");
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("a-file"), &p), SPEED_ERR_IO);

    /* as many shards as tensors: every shard non-empty */
    p.n_shards = 39;
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("many"), &p), SPEED_OK);
    speed_model_t *m = NULL;
    CHECK_INT_EQ(speed_model_load(tu_path("many"), NULL, &m), SPEED_OK);
    if (m) check_weights(m, &p);
    speed_model_destroy(m);

    /* the config.json text is real HF */
    char *text = tu_read(tu_path("many/config.json"), NULL);
    CHECK_CONTAINS(text, "\"architectures\": [\n    \"LlamaForCausalLM\"\n  ]");
    CHECK_CONTAINS(text, "\"rms_norm_eps\": 1e-05,");
    CHECK_CONTAINS(text, "\"rope_theta\": 10000.0,");
    CHECK_CONTAINS(text, "\"torch_dtype\": \"float32\"");
    CHECK_CONTAINS(text, "\"tie_word_embeddings\": false");
    free(text);
    text = tu_read(tu_path("many/model.safetensors.index.json"), NULL);
    CHECK_CONTAINS(text, "\"total_size\": ");
    CHECK_CONTAINS(text, "\"lm_head.weight\": \"model-00039-of-00039.safetensors\"");
    free(text);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

static speed_status_t load_expect(const char *dir, speed_status_t want, const char *msg) {
    speed_model_t *m = (speed_model_t *)0x1;
    speed_log_clear_last_error();
    speed_status_t s = speed_model_load(dir, NULL, &m);
    CHECK_MSG(s == want, "%s: status %d (%s), want %d", dir, s, speed_status_string(s), want);
    CHECK(m == (speed_model_t *)0x1);
    if (msg) CHECK_CONTAINS(speed_log_last_error(), msg);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
    return s;
}

static void write_tiny(const char *dir, bool tied, int n_shards, int n_kv_heads) {
    speed_tiny_model_params_t p = speed_tiny_model_default_params();
    p.tied = tied;
    p.n_shards = n_shards;
    p.n_kv_heads = n_kv_heads;
    if (speed_tiny_model_write(dir, &p) != SPEED_OK) {
        fprintf(stderr, "cannot write %s\n", dir);
        exit(1);
    }
}

/* Replaces the first occurrence of `from` in dir/config.json by `to`. */
static void config_edit(const char *dir, const char *from, const char *to) {
    char path[768];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = tu_read(path, NULL);
    char *at = strstr(text, from);
    if (!at) {
        fprintf(stderr, "config_edit: %s not found\n", from);
        exit(1);
    }
    char out[8192];
    snprintf(out, sizeof out, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    tu_write_text(path, out);
    free(text);
}

/* Rewrites path with the tensors of the file minus `drop`, plus `add` (may be NULL). */
static void repack(const char *path, const char *drop, const tu_st_entry_t *add, int n_add) {
    speed_safetensors_t *st = NULL;
    if (speed_safetensors_open(path, &st) != SPEED_OK) exit(1);
    int n = speed_safetensors_n_tensors(st);
    tu_st_entry_t *e = calloc((size_t)(n + n_add), sizeof *e);
    char **copies = calloc((size_t)n, sizeof *copies);
    int k = 0;
    static const char *st_names[] = {"F32", "BF16", "F16"};
    for (int i = 0; i < n; i++) {
        const speed_tensor_t *t = speed_safetensors_tensor(st, i);
        if (drop && strcmp(t->name, drop) == 0) continue;
        copies[i] = malloc(t->n_bytes + strlen(t->name) + 1);
        memcpy(copies[i], t->data, t->n_bytes);
        strcpy(copies[i] + t->n_bytes, t->name);
        e[k] = (tu_st_entry_t){copies[i] + t->n_bytes,
                               st_names[t->dtype],
                               t->n_dims,
                               {t->shape[0], t->shape[1], t->shape[2], t->shape[3]},
                               copies[i],
                               t->n_bytes};
        k++;
    }
    for (int i = 0; i < n_add; i++) e[k++] = add[i];
    speed_safetensors_close(st);
    tu_st_write(path, e, k);
    for (int i = 0; i < n; i++) free(copies[i]);
    free(copies);
    free(e);
}

static void test_bad_dirs(void) {
    load_expect(tu_path("absent"), SPEED_ERR_NOT_FOUND, "absent: No such file");
    tu_write_text(tu_path("plain-file"), "x");
    load_expect(tu_path("plain-file"), SPEED_ERR_INVALID_ARGUMENT, "plain-file: not a directory");

    mkdir(tu_path("empty"), 0755);
    load_expect(tu_path("empty"), SPEED_ERR_NOT_FOUND, "empty/config.json: No such file");

    write_tiny(tu_path("badcfg"), false, 1, 2);
    tu_write_text(tu_path("badcfg/config.json"), "{\"architectures\": [\"LlamaForCausalLM\"],");
    load_expect(tu_path("badcfg"), SPEED_ERR_PARSE, "badcfg/config.json: not valid JSON");
    tu_write_text(tu_path("badcfg/config.json"), "{\"architectures\": [\"MistralForCausalLM\"]}");
    load_expect(tu_path("badcfg"), SPEED_ERR_UNSUPPORTED, "\"MistralForCausalLM\" is not supported");

    write_tiny(tu_path("noweights"), false, 1, 2);
    unlink(tu_path("noweights/model.safetensors"));
    load_expect(tu_path("noweights"), SPEED_ERR_NOT_FOUND, "no model.safetensors or model.safetensors.index.json");

    /* shape: the files have 4 kv heads, the config says 2 */
    write_tiny(tu_path("shape"), false, 1, 4);
    config_edit(tu_path("shape"), "\"num_key_value_heads\": 4", "\"num_key_value_heads\": 2");
    load_expect(tu_path("shape"), SPEED_ERR_FORMAT,
                "model.safetensors: model.layers.0.self_attn.k_proj.weight: expected [32, 64], got [64, 64]");
    config_edit(tu_path("shape"), "\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4");
    config_edit(tu_path("shape"), "\"intermediate_size\": 172", "\"intermediate_size\": 128");
    load_expect(tu_path("shape"), SPEED_ERR_FORMAT,
                "model.layers.0.mlp.gate_proj.weight: expected [128, 64], got [172, 64]");
    config_edit(tu_path("shape"), "\"intermediate_size\": 128", "\"intermediate_size\": 172");
    config_edit(tu_path("shape"), "\"vocab_size\": 512", "\"vocab_size\": 500");
    load_expect(tu_path("shape"), SPEED_ERR_FORMAT, "model.embed_tokens.weight: expected [500, 64], got [512, 64]");
    config_edit(tu_path("shape"), "\"vocab_size\": 500", "\"vocab_size\": 512");
    config_edit(tu_path("shape"), "\"num_hidden_layers\": 4", "\"num_hidden_layers\": 5");
    load_expect(tu_path("shape"), SPEED_ERR_NOT_FOUND,
                "model.safetensors: missing tensor model.layers.4.input_layernorm.weight");
    config_edit(tu_path("shape"), "\"num_hidden_layers\": 5", "\"num_hidden_layers\": 3");
    tu_warnings_reset();
    speed_model_t *m = NULL;
    CHECK_INT_EQ(speed_model_load(tu_path("shape"), NULL, &m), SPEED_OK); /* layer 3 is extra */
    CHECK_INT_EQ(tu_n_warnings, 9);                                       /* 8 named, then a count */
    CHECK_CONTAINS(tu_last_warning, "model.safetensors: 1 more unexpected tensors ignored");
    speed_model_destroy(m);
    speed_model_params_t strict = speed_model_default_params();
    CHECK(strict.allow_extra_tensors);
    strict.allow_extra_tensors = false;
    m = (speed_model_t *)0x1;
    CHECK_INT_EQ(speed_model_load(tu_path("shape"), &strict, &m), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(speed_log_last_error(), "unexpected tensor model.layers.3.");
    CHECK(m == (speed_model_t *)0x1);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);

    /* missing lm_head: written tied, config says untied */
    write_tiny(tu_path("nohead"), true, 1, 2);
    config_edit(tu_path("nohead"), "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    load_expect(tu_path("nohead"), SPEED_ERR_NOT_FOUND, "missing tensor lm_head.weight");

    /* tied config, lm_head.weight present and matching: fine, no warning */
    write_tiny(tu_path("tiedhead"), false, 1, 2);
    config_edit(tu_path("tiedhead"), "\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true");
    tu_warnings_reset();
    m = NULL;
    CHECK_INT_EQ(speed_model_load(tu_path("tiedhead"), NULL, &m), SPEED_OK);
    CHECK_INT_EQ(tu_n_warnings, 0);
    if (m) CHECK(m->lm_head == m->tok_embeddings);
    speed_model_destroy(m);

    /* dropped tensor; extra tensors (warn), inv_freq buffers (silent); a wrong-shape lm_head
     * on a tied model */
    write_tiny(tu_path("edit"), false, 1, 2);
    repack(tu_path("edit/model.safetensors"), "model.layers.2.mlp.up_proj.weight", NULL, 0);
    load_expect(tu_path("edit"), SPEED_ERR_NOT_FOUND,
                "model.safetensors: missing tensor model.layers.2.mlp.up_proj.weight");
    write_tiny(tu_path("edit"), false, 1, 2);
    float zeros[64] = {0};
    tu_st_entry_t extra[] = {
        {"model.layers.0.self_attn.q_proj.bias", "F32", 1, {64}, zeros, sizeof zeros},
        {"model.layers.1.self_attn.rotary_emb.inv_freq", "F32", 1, {8}, zeros, 32},
    };
    repack(tu_path("edit/model.safetensors"), NULL, extra, 2);
    tu_warnings_reset();
    m = NULL;
    CHECK_INT_EQ(speed_model_load(tu_path("edit"), NULL, &m), SPEED_OK);
    CHECK_INT_EQ(tu_n_warnings, 1);
    CHECK_CONTAINS(tu_last_warning,
                   "model.safetensors: unexpected tensor model.layers.0.self_attn.q_proj.bias ignored");
    if (m) {
        CHECK(speed_model_tensor_find(m, "model.layers.0.self_attn.q_proj.bias") != NULL);
        speed_tiny_model_params_t p = speed_tiny_model_default_params();
        check_weights(m, &p);
    }
    speed_model_destroy(m);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);

    write_tiny(tu_path("badhead"), true, 1, 2);
    float head[2 * 64] = {0};
    tu_st_entry_t bad_head[] = {{"lm_head.weight", "F32", 2, {2, 64}, head, sizeof head}};
    repack(tu_path("badhead/model.safetensors"), NULL, bad_head, 1);
    load_expect(tu_path("badhead"), SPEED_ERR_FORMAT, "lm_head.weight: expected [512, 64], got [2, 64]");

    /* mixed dtypes per tensor are fine (f32 norms, bf16 matrices) */
    write_tiny(tu_path("mixed"), false, 1, 2);
    uint16_t norm_bf16[64];
    for (int i = 0; i < 64; i++) norm_bf16[i] = 0x3f80;
    tu_st_entry_t mixed[] = {{"model.norm.weight", "BF16", 1, {64}, norm_bf16, sizeof norm_bf16}};
    repack(tu_path("mixed/model.safetensors"), "model.norm.weight", mixed, 1);
    m = NULL;
    CHECK_INT_EQ(speed_model_load(tu_path("mixed"), NULL, &m), SPEED_OK);
    if (m) {
        CHECK_INT_EQ(m->norm->dtype, SPEED_DTYPE_BF16);
        CHECK_INT_EQ(m->tok_embeddings->dtype, SPEED_DTYPE_F32);
    }
    speed_model_destroy(m);

    /* a corrupt weights file */
    write_tiny(tu_path("corrupt"), false, 1, 2);
    size_t n = 0;
    char *whole = tu_read(tu_path("corrupt/model.safetensors"), &n);
    tu_write(tu_path("corrupt/model.safetensors"), whole, n / 2);
    free(whole);
    load_expect(tu_path("corrupt"), SPEED_ERR_FORMAT, "out of range");
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

static void index_rewrite(const char *dir, const char *tensor, const char *shard) {
    char path[768];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_t *root = json_load_file(path, 0, NULL);
    json_t *map = json_object_get(root, "weight_map");
    if (shard)
        json_object_set_new(map, tensor, json_string(shard));
    else
        json_object_del(map, tensor);
    json_dump_file(root, path, JSON_INDENT(2));
    json_decref(root);
}

static void test_bad_shards(void) {
    const char *dir = tu_path("sharded");
    write_tiny(dir, false, 3, 2);
    unlink(tu_path("sharded/model-00002-of-00003.safetensors"));
    load_expect(dir, SPEED_ERR_NOT_FOUND,
                "model.safetensors.index.json: shard model-00002-of-00003.safetensors does not exist");

    write_tiny(dir, false, 3, 2);
    index_rewrite(dir, "lm_head.weight", "model-00001-of-00003.safetensors");
    load_expect(dir, SPEED_ERR_FORMAT,
                "model.safetensors.index.json: tensor lm_head.weight is listed in shard "
                "model-00001-of-00003.safetensors but not found there");

    write_tiny(dir, false, 3, 2);
    index_rewrite(dir, "model.norm.weight", "../model-00003-of-00003.safetensors");
    load_expect(dir, SPEED_ERR_FORMAT, "weight_map: model.norm.weight: expected a file name");

    /* a tensor missing from the index is missing, even though its shard holds it */
    write_tiny(dir, false, 3, 2);
    index_rewrite(dir, "model.norm.weight", NULL);
    tu_warnings_reset();
    load_expect(dir, SPEED_ERR_NOT_FOUND, "model.safetensors.index.json: missing tensor model.norm.weight");
    CHECK_INT_EQ(tu_n_warnings, 1);
    CHECK_CONTAINS(tu_last_warning, "1 tensors not listed for it");

    write_tiny(dir, false, 3, 2);
    tu_write_text(tu_path("sharded/model.safetensors.index.json"), "{\"weight_map\": ");
    load_expect(dir, SPEED_ERR_PARSE, "model.safetensors.index.json: not valid JSON");
    tu_write_text(tu_path("sharded/model.safetensors.index.json"), "{\"metadata\": {}}");
    load_expect(dir, SPEED_ERR_FORMAT, "weight_map: missing, empty or not an object");
    tu_write_text(tu_path("sharded/model.safetensors.index.json"), "{\"weight_map\": {\"a\": 3}}");
    load_expect(dir, SPEED_ERR_FORMAT, "weight_map: a: expected a file name");

    write_tiny(dir, false, 3, 2);
    tu_write(tu_path("sharded/model-00003-of-00003.safetensors"), "\xff\xff\xff\xff\0\0\0\0{}", 10);
    load_expect(dir, SPEED_ERR_FORMAT, "model-00003-of-00003.safetensors: header length 4294967295 past end of file");
}

/* The weights read into 2 MiB pages equal the mapped ones, tensor by tensor, sharded too. */
static void test_hugepages(void) {
    for (int shards = 1; shards <= 3; shards += 2) {
        const char *dir = tu_path(shards == 1 ? "hp1" : "hp3");
        speed_tiny_model_params_t p = speed_tiny_model_default_params();
        p.n_shards = shards;
        CHECK_INT_EQ(speed_tiny_model_write(dir, &p), SPEED_OK);
        speed_model_params_t mp = speed_model_default_params();
        speed_model_t *a = NULL, *b = NULL;
        CHECK_INT_EQ(speed_model_load(dir, &mp, &a), SPEED_OK);
        mp.hugepages = true;
        CHECK_INT_EQ(speed_model_load(dir, &mp, &b), SPEED_OK);
        if (!a || !b) continue;
        const speed_tensor_t *ta[] = {a->tok_embeddings, a->norm, a->lm_head, a->layers[0].wq, a->layers[3].w_down};
        const speed_tensor_t *tb[] = {b->tok_embeddings, b->norm, b->lm_head, b->layers[0].wq, b->layers[3].w_down};
        for (int i = 0; i < 5; i++) {
            CHECK(ta[i]->data != tb[i]->data); /* a copy, not the mapping */
            CHECK_INT_EQ(ta[i]->n_bytes, tb[i]->n_bytes);
            CHECK(memcmp(ta[i]->data, tb[i]->data, ta[i]->n_bytes) == 0);
        }
        speed_model_destroy(a);
        speed_model_destroy(b);
    }
}

int main(void) {
    tu_log_capture();
    tu_tmp_init("model_load");
    g_base = speed_alloc_live_count();
    test_round_trip();
    test_writer();
    test_bad_dirs();
    test_bad_shards();
    test_hugepages();
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
