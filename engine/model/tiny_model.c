#include "tiny_model.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"
#include "model_config.h"
#include "file.h"
#include "tensor.h"

#define CHUNK_ELEMENTS ((size_t)1 << 20)
#define TINY_NAME_MAX  96

typedef struct {
    char name[TINY_NAME_MAX];
    int n_dims;
    int64_t shape[2];
    int shard;
    uint64_t n_bytes;
} tiny_tensor_t;

/* ---- text building ------------------------------------------------------ */

typedef struct {
    char *buf;
    size_t len, cap;
    bool oom;
} tiny_text_t;

__attribute__((format(printf, 2, 3))) static void text_printf(tiny_text_t *t, const char *fmt, ...) {
    if (t->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->buf ? t->buf + t->len : NULL, t->buf ? t->cap - t->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            t->oom = true;
            return;
        }
        if (t->buf && t->len + (size_t)n < t->cap) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap ? t->cap : 1024;
        while (cap <= t->len + (size_t)n) cap *= 2;
        char *b = speed_realloc(t->buf, cap);
        if (!b) {
            t->oom = true;
            return;
        }
        t->buf = b;
        t->cap = cap;
    }
}

/* Shortest decimal that reads back as the same float, with a ".0" if it looks integral. */
static void float_format(float v, char *buf, size_t size) {
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, size, "%.*g", prec, (double)v);
        if (strtof(buf, NULL) == v) break;
    }
    if (!strpbrk(buf, ".eEn")) strncat(buf, ".0", size - strlen(buf) - 1);
}

/* ---- deterministic weights ---------------------------------------------- */

typedef struct {
    uint64_t state;
    double spare;
    bool has_spare;
} tiny_rng_t;

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_init(tiny_rng_t *r, uint64_t seed, const char *name) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (const unsigned char *c = (const unsigned char *)name; *c; c++) h = (h ^ *c) * 0x100000001b3ull;
    r->state = seed;
    r->state = splitmix64(&r->state) ^ h;
    r->has_spare = false;
}

/* Box-Muller: two independent standard normals per two uniforms. */
static double rng_normal(tiny_rng_t *r) {
    if (r->has_spare) {
        r->has_spare = false;
        return r->spare;
    }
    double u1 = (double)((splitmix64(&r->state) >> 11) + 1) * 0x1p-53; /* (0, 1] */
    double u2 = (double)(splitmix64(&r->state) >> 11) * 0x1p-53;       /* [0, 1) */
    double rad = sqrt(-2.0 * log(u1));
    double theta = 6.283185307179586 * u2;
    r->spare = rad * sin(theta);
    r->has_spare = true;
    return rad * cos(theta);
}

static bool is_norm_name(const char *name) {
    size_t n = strlen(name);
    return n >= 11 && strcmp(name + n - 11, "norm.weight") == 0;
}

static void rng_fill(tiny_rng_t *r, bool norm, float std, float *out, size_t n) {
    double base = norm ? 1.0 : 0.0;
    for (size_t i = 0; i < n; i++) out[i] = (float)(base + std * rng_normal(r));
}

void speed_tiny_model_tensor_values(const speed_tiny_model_params_t *p, const char *name, float *out,
                                    size_t n_elements) {
    tiny_rng_t r;
    rng_init(&r, p->seed, name);
    rng_fill(&r, is_norm_name(name), p->init_std, out, n_elements);
}

/* ---- params ---------------------------------------------------------------- */

speed_tiny_model_params_t speed_tiny_model_default_params(void) {
    return (speed_tiny_model_params_t){
        .n_layers = 4,
        .hidden = 64,
        .n_heads = 4,
        .n_kv_heads = 2,
        .ffn = 172,
        .vocab_size = 512,
        .max_position = 4096,
        .head_dim = 0,
        .dtype = SPEED_DTYPE_F32,
        .tied = false,
        .rope_scaling = false,
        .n_shards = 1,
        .seed = 42,
        .rope_theta = 10000.0f,
        .rms_norm_eps = 1e-5f,
        .init_std = 0.02f,
        .bos_token_id = 1,
        .eos_token_ids = {2},
        .n_eos = 1,
    };
}

speed_status_t speed_tiny_model_preset(const char *name, speed_tiny_model_params_t *p) {
    speed_tiny_model_params_t q = speed_tiny_model_default_params();
    if (name && strcmp(name, "tiny") == 0) {
        /* defaults */
    } else if (name && strcmp(name, "tinyllama-1.1b") == 0) {
        q.n_layers = 22, q.hidden = 2048, q.n_heads = 32, q.n_kv_heads = 4, q.ffn = 5632;
        q.vocab_size = 32000, q.max_position = 2048, q.dtype = SPEED_DTYPE_BF16;
    } else if (name && strcmp(name, "smollm-135m") == 0) {
        q.n_layers = 30, q.hidden = 576, q.n_heads = 9, q.n_kv_heads = 3, q.ffn = 1536;
        q.vocab_size = 49152, q.max_position = 2048, q.dtype = SPEED_DTYPE_BF16, q.tied = true;
        q.bos_token_id = 0, q.eos_token_ids[0] = 0;
    } else {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "tiny model preset \"%s\" unknown (tiny, tinyllama-1.1b, smollm-135m)",
                    name ? name : "(null)");
        return SPEED_ERR_NOT_FOUND;
    }
    *p = q;
    return SPEED_OK;
}

/* config.json text, HF field names in HF's (sorted) order. */
static void config_text(const speed_tiny_model_params_t *p, tiny_text_t *t) {
    char f[32];
    text_printf(t, "{\n  \"architectures\": [\n    \"LlamaForCausalLM\"\n  ],\n");
    text_printf(t, "  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n");
    if (p->bos_token_id >= 0)
        text_printf(t, "  \"bos_token_id\": %d,\n", (int)p->bos_token_id);
    else
        text_printf(t, "  \"bos_token_id\": null,\n");
    if (p->n_eos == 1) {
        text_printf(t, "  \"eos_token_id\": %d,\n", (int)p->eos_token_ids[0]);
    } else if (p->n_eos == 0) {
        text_printf(t, "  \"eos_token_id\": null,\n");
    } else {
        text_printf(t, "  \"eos_token_id\": [\n");
        for (int i = 0; i < p->n_eos; i++)
            text_printf(t, "    %d%s\n", (int)p->eos_token_ids[i], i + 1 < p->n_eos ? "," : "");
        text_printf(t, "  ],\n");
    }
    if (p->head_dim) text_printf(t, "  \"head_dim\": %d,\n", p->head_dim);
    text_printf(t, "  \"hidden_act\": \"silu\",\n  \"hidden_size\": %d,\n", p->hidden);
    float_format(p->init_std, f, sizeof f);
    text_printf(t, "  \"initializer_range\": %s,\n", f);
    text_printf(t, "  \"intermediate_size\": %d,\n", p->ffn);
    text_printf(t, "  \"max_position_embeddings\": %d,\n", p->max_position);
    text_printf(t, "  \"mlp_bias\": false,\n  \"model_type\": \"llama\",\n");
    text_printf(t, "  \"num_attention_heads\": %d,\n", p->n_heads);
    text_printf(t, "  \"num_hidden_layers\": %d,\n", p->n_layers);
    text_printf(t, "  \"num_key_value_heads\": %d,\n", p->n_kv_heads);
    text_printf(t, "  \"pretraining_tp\": 1,\n");
    float_format(p->rms_norm_eps, f, sizeof f);
    text_printf(t, "  \"rms_norm_eps\": %s,\n", f);
    if (p->rope_scaling)
        text_printf(t, "  \"rope_scaling\": {\n    \"factor\": 8.0,\n    \"high_freq_factor\": 4.0,\n"
                       "    \"low_freq_factor\": 1.0,\n"
                       "    \"original_max_position_embeddings\": 8192,\n"
                       "    \"rope_type\": \"llama3\"\n  },\n");
    else
        text_printf(t, "  \"rope_scaling\": null,\n");
    float_format(p->rope_theta, f, sizeof f);
    text_printf(t, "  \"rope_theta\": %s,\n", f);
    text_printf(t, "  \"tie_word_embeddings\": %s,\n", p->tied ? "true" : "false");
    text_printf(t, "  \"torch_dtype\": \"%s\",\n", speed_dtype_torch_name(p->dtype));
    text_printf(t, "  \"use_cache\": true,\n  \"vocab_size\": %d\n}\n", p->vocab_size);
}

/* The tensors of a model with config c, in file order. Returns a speed_malloc'd array. */
static tiny_tensor_t *tensor_list(const speed_model_config_t *c, const speed_tiny_model_params_t *p, int *n_p) {
    int n = 2 + (c->tie_word_embeddings ? 0 : 1) + 9 * c->n_layers;
    tiny_tensor_t *ts = speed_calloc((size_t)n, sizeof *ts);
    if (!ts) return NULL;
    int64_t q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim;
    int i = 0;
#define TINY_ADD(nd, d0, d1, ...)                                                                       \
    do {                                                                                                \
        snprintf(ts[i].name, TINY_NAME_MAX, __VA_ARGS__);                                               \
        ts[i].n_dims = (nd);                                                                            \
        ts[i].shape[0] = (d0);                                                                          \
        ts[i].shape[1] = (d1);                                                                          \
        ts[i].n_bytes = (uint64_t)(d0) * (uint64_t)((nd) == 2 ? (d1) : 1) * speed_dtype_size(p->dtype); \
        i++;                                                                                            \
    } while (0)
    TINY_ADD(2, c->vocab_size, c->hidden, "model.embed_tokens.weight");
    for (int l = 0; l < c->n_layers; l++) {
        TINY_ADD(1, c->hidden, 0, "model.layers.%d.input_layernorm.weight", l);
        TINY_ADD(2, c->hidden, c->ffn, "model.layers.%d.mlp.down_proj.weight", l);
        TINY_ADD(2, c->ffn, c->hidden, "model.layers.%d.mlp.gate_proj.weight", l);
        TINY_ADD(2, c->ffn, c->hidden, "model.layers.%d.mlp.up_proj.weight", l);
        TINY_ADD(1, c->hidden, 0, "model.layers.%d.post_attention_layernorm.weight", l);
        TINY_ADD(2, kv, c->hidden, "model.layers.%d.self_attn.k_proj.weight", l);
        TINY_ADD(2, c->hidden, q, "model.layers.%d.self_attn.o_proj.weight", l);
        TINY_ADD(2, q, c->hidden, "model.layers.%d.self_attn.q_proj.weight", l);
        TINY_ADD(2, kv, c->hidden, "model.layers.%d.self_attn.v_proj.weight", l);
    }
    TINY_ADD(1, c->hidden, 0, "model.norm.weight");
    if (!c->tie_word_embeddings) TINY_ADD(2, c->vocab_size, c->hidden, "lm_head.weight");
#undef TINY_ADD
    *n_p = i;
    return ts;
}

/* Contiguous groups of about equal bytes; every shard gets at least one tensor. */
static void shards_assign(tiny_tensor_t *ts, int n, int n_shards) {
    uint64_t total = 0, cum = 0;
    for (int i = 0; i < n; i++) total += ts[i].n_bytes;
    int s = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && s < n_shards - 1 &&
            (cum >= (uint64_t)(s + 1) * (total / (uint64_t)n_shards) || n - i == n_shards - 1 - s))
            s++;
        ts[i].shard = s;
        cum += ts[i].n_bytes;
    }
}

/* ---- files ----------------------------------------------------------------- */

static void shard_name(int s, int n_shards, char *buf, size_t size) {
    if (n_shards == 1)
        snprintf(buf, size, "model.safetensors");
    else
        snprintf(buf, size, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
}

static speed_status_t file_write_all(FILE *fp, const char *path, const void *data, size_t n) {
    if (n && fwrite(data, 1, n, fp) != n) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: write: %s", path, strerror(errno));
        return SPEED_ERR_IO;
    }
    return SPEED_OK;
}

/* Writes `text` to dir/name through a temporary file. */
static speed_status_t text_file_write(const char *dir, const char *name, const tiny_text_t *t) {
    speed_status_t status = SPEED_OK;
    char *path = speed_path_join(dir, name);
    char *tmp = path ? speed_malloc(strlen(path) + 5) : NULL;
    if (!tmp) {
        speed_free(path);
        return SPEED_ERR_NO_MEMORY;
    }
    sprintf(tmp, "%s.tmp", path);
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s", tmp, strerror(errno));
        status = SPEED_ERR_IO;
        goto out;
    }
    status = file_write_all(fp, tmp, t->buf, t->len);
    if (fclose(fp) != 0 && status == SPEED_OK) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: close: %s", tmp, strerror(errno));
        status = SPEED_ERR_IO;
    }
    if (status == SPEED_OK && rename(tmp, path) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: rename: %s", path, strerror(errno));
        status = SPEED_ERR_IO;
    }
    if (status != SPEED_OK) unlink(tmp);
out:
    speed_free(tmp);
    speed_free(path);
    return status;
}

typedef struct {
    float *values;      /* [CHUNK_ELEMENTS] */
    unsigned char *out; /* [CHUNK_ELEMENTS * 4] */
} tiny_buffers_t;

static speed_status_t shard_write(const char *dir, const speed_tiny_model_params_t *p, const tiny_tensor_t *ts, int n,
                                  int s, tiny_buffers_t *b) {
    char name[64];
    shard_name(s, p->n_shards, name, sizeof name);
    speed_status_t status = SPEED_OK;
    tiny_text_t h = {0};
    FILE *fp = NULL;
    char *path = speed_path_join(dir, name);
    char *tmp = path ? speed_malloc(strlen(path) + 5) : NULL;
    if (!tmp) {
        status = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    sprintf(tmp, "%s.tmp", path);

    uint64_t offset = 0;
    text_printf(&h, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        if (ts[i].shard != s) continue;
        text_printf(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld", ts[i].name, speed_dtype_safetensors_name(p->dtype),
                    (long long)ts[i].shape[0]);
        if (ts[i].n_dims == 2) text_printf(&h, ",%lld", (long long)ts[i].shape[1]);
        text_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                    (unsigned long long)(offset + ts[i].n_bytes));
        offset += ts[i].n_bytes;
    }
    text_printf(&h, "}");
    while ((8 + h.len) % 8) text_printf(&h, " "); /* the data area starts 8-aligned */
    if (h.oom) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory for the header", path);
        status = SPEED_ERR_NO_MEMORY;
        goto out;
    }

    fp = fopen(tmp, "wb");
    if (!fp) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s", tmp, strerror(errno));
        status = SPEED_ERR_IO;
        goto out;
    }
    uint64_t hlen = h.len; /* little-endian host (see safetensors.c) */
    SPEED_CHECK_GOTO(file_write_all(fp, tmp, &hlen, 8), status, out);
    SPEED_CHECK_GOTO(file_write_all(fp, tmp, h.buf, h.len), status, out);
    size_t esize = speed_dtype_size(p->dtype);
    for (int i = 0; i < n; i++) {
        if (ts[i].shard != s) continue;
        tiny_rng_t r;
        rng_init(&r, p->seed, ts[i].name);
        bool norm = is_norm_name(ts[i].name);
        size_t left = (size_t)(ts[i].n_bytes / esize);
        while (left) {
            size_t k = left < CHUNK_ELEMENTS ? left : CHUNK_ELEMENTS;
            rng_fill(&r, norm, p->init_std, b->values, k);
            speed_dtype_from_f32(p->dtype, b->values, b->out, k);
            SPEED_CHECK_GOTO(file_write_all(fp, tmp, b->out, k * esize), status, out);
            left -= k;
        }
    }
    int rc = fclose(fp);
    fp = NULL;
    if (rc != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: close: %s", tmp, strerror(errno));
        status = SPEED_ERR_IO;
        goto out;
    }
    if (rename(tmp, path) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: rename: %s", path, strerror(errno));
        status = SPEED_ERR_IO;
    }
out:
    if (fp) fclose(fp);
    if (status != SPEED_OK && tmp) unlink(tmp);
    speed_free(h.buf);
    speed_free(tmp);
    speed_free(path);
    return status;
}

static speed_status_t index_write(const char *dir, const speed_tiny_model_params_t *p, const tiny_tensor_t *ts, int n) {
    tiny_text_t t = {0};
    uint64_t total = 0;
    for (int i = 0; i < n; i++) total += ts[i].n_bytes;
    text_printf(&t, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {\n",
                (unsigned long long)total);
    for (int i = 0; i < n; i++) {
        char name[64];
        shard_name(ts[i].shard, p->n_shards, name, sizeof name);
        text_printf(&t, "    \"%s\": \"%s\"%s\n", ts[i].name, name, i + 1 < n ? "," : "");
    }
    text_printf(&t, "  }\n}\n");
    speed_status_t status;
    if (t.oom) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory for the index", dir);
        status = SPEED_ERR_NO_MEMORY;
    } else {
        status = text_file_write(dir, "model.safetensors.index.json", &t);
    }
    speed_free(t.buf);
    return status;
}

static bool is_weight_file(const char *name) {
    unsigned a, b;
    char rest[32];
    if (strcmp(name, "model.safetensors") == 0 || strcmp(name, "model.safetensors.index.json") == 0) return true;
    return sscanf(name, "model-%5u-of-%5u.safetensor%31s", &a, &b, rest) == 3 &&
           (strcmp(rest, "s") == 0 || strcmp(rest, "s.tmp") == 0);
}

static speed_status_t stale_remove(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s", dir, strerror(errno));
        return SPEED_ERR_IO;
    }
    speed_status_t status = SPEED_OK;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!is_weight_file(e->d_name)) continue;
        char *path = speed_path_join(dir, e->d_name);
        if (!path) {
            status = SPEED_ERR_NO_MEMORY;
            break;
        }
        if (unlink(path) != 0 && errno != ENOENT) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: unlink: %s", path, strerror(errno));
            status = SPEED_ERR_IO;
        }
        speed_free(path);
        if (status != SPEED_OK) break;
    }
    closedir(d);
    return status;
}

static speed_status_t dir_make(const char *dir) {
    if (mkdir(dir, 0755) == 0) return SPEED_OK;
    int e = errno;
    struct stat sb;
    if (e == EEXIST && stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode)) return SPEED_OK;
    if (e == EEXIST) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: exists and is not a directory", dir);
        return SPEED_ERR_IO;
    }
    SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: mkdir: %s", dir, strerror(e));
    return e == ENOENT ? SPEED_ERR_NOT_FOUND : SPEED_ERR_IO;
}

speed_status_t speed_tiny_model_write(const char *out_dir, const speed_tiny_model_params_t *p) {
    speed_status_t status = SPEED_OK;
    tiny_text_t cfg_text = {0};
    tiny_tensor_t *ts = NULL;
    tiny_buffers_t b = {0};
    speed_model_config_t cfg;
    int n = 0;

    if (p->n_eos < 0 || p->n_eos > 4 || !(p->init_std > 0.0f && p->init_std < 1e3f) ||
        speed_dtype_size(p->dtype) == 0 || p->n_shards < 1 || p->head_dim < 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL,
                    "tiny model: bad params (n_eos %d, init_std %g, dtype %d, n_shards %d, head_dim %d)", p->n_eos,
                    (double)p->init_std, (int)p->dtype, p->n_shards, p->head_dim);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    /* Validate by the same rules the loader applies to the config.json we will write. */
    config_text(p, &cfg_text);
    if (cfg_text.oom) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "tiny model: out of memory");
        status = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    status = speed_model_config_parse(cfg_text.buf, cfg_text.len, "tiny model params", &cfg);
    if (status != SPEED_OK) {
        if (status != SPEED_ERR_NO_MEMORY) status = SPEED_ERR_INVALID_ARGUMENT;
        goto out;
    }
    ts = tensor_list(&cfg, p, &n);
    b.values = speed_malloc(CHUNK_ELEMENTS * sizeof(float));
    b.out = speed_malloc(CHUNK_ELEMENTS * sizeof(float));
    if (!ts || !b.values || !b.out) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "tiny model: out of memory");
        status = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    if (p->n_shards > n) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "tiny model: %d shards for %d tensors", p->n_shards, n);
        status = SPEED_ERR_INVALID_ARGUMENT;
        goto out;
    }
    shards_assign(ts, n, p->n_shards);

    SPEED_CHECK_GOTO(dir_make(out_dir), status, out);
    SPEED_CHECK_GOTO(stale_remove(out_dir), status, out);
    for (int s = 0; s < p->n_shards; s++) SPEED_CHECK_GOTO(shard_write(out_dir, p, ts, n, s, &b), status, out);
    if (p->n_shards > 1) SPEED_CHECK_GOTO(index_write(out_dir, p, ts, n), status, out);
    SPEED_CHECK_GOTO(text_file_write(out_dir, "config.json", &cfg_text), status, out);
out:
    speed_free(b.values);
    speed_free(b.out);
    speed_free(ts);
    speed_free(cfg_text.buf);
    return status;
}
