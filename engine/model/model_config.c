#include "model_config.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"
#include "file.h"

#define CONFIG_MAX_BYTES (16u << 20)

typedef struct {
    const char *origin;
    json_t *root;
} cfg_ctx_t;

/* Returns the value of `key`, or NULL when it is absent or JSON null. */
static json_t *cfg_get(const cfg_ctx_t *c, const char *key) {
    json_t *v = json_object_get(c->root, key);
    return json_is_null(v) ? NULL : v;
}

static speed_status_t cfg_int(const cfg_ctx_t *c, const char *key, bool required, int64_t def, int64_t lo, int64_t hi,
                              int64_t *out_p) {
    json_t *v = cfg_get(c, key);
    if (!v) {
        if (required) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: missing", c->origin, key);
            return SPEED_ERR_FORMAT;
        }
        *out_p = def;
        return SPEED_OK;
    }
    if (!json_is_integer(v)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: expected an integer", c->origin, key);
        return SPEED_ERR_FORMAT;
    }
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: %lld is out of range [%lld, %lld]", c->origin, key, (long long)x,
                    (long long)lo, (long long)hi);
        return SPEED_ERR_FORMAT;
    }
    *out_p = x;
    return SPEED_OK;
}

static speed_status_t cfg_int32(const cfg_ctx_t *c, const char *key, bool required, int def, int lo, int hi,
                                int *out_p) {
    int64_t x;
    SPEED_CHECK(cfg_int(c, key, required, def, lo, hi, &x));
    *out_p = (int)x;
    return SPEED_OK;
}

/* A number (integer or real) in the open interval (lo, hi). */
static speed_status_t cfg_float(const cfg_ctx_t *c, const json_t *obj, const char *prefix, const char *key,
                                bool required, double def, double lo, double hi, float *out_p) {
    json_t *v = json_object_get(obj, key);
    if (json_is_null(v)) v = NULL;
    if (!v) {
        if (required) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s%s: missing", c->origin, prefix, key);
            return SPEED_ERR_FORMAT;
        }
        *out_p = (float)def;
        return SPEED_OK;
    }
    if (!json_is_number(v)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s%s: expected a number", c->origin, prefix, key);
        return SPEED_ERR_FORMAT;
    }
    double x = json_number_value(v);
    float f = (float)x;
    /* the float that is kept must be in range too: 1e-55 passes "> 0" as a double but is 0 as a float */
    if (!(x > lo && x < hi) || !(f > lo && f < hi)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s%s: %g is out of range (%g, %g)", c->origin, prefix, key, x, lo, hi);
        return SPEED_ERR_FORMAT;
    }
    *out_p = f;
    return SPEED_OK;
}

static speed_status_t cfg_bool(const cfg_ctx_t *c, const char *key, bool def, bool *out_p) {
    json_t *v = cfg_get(c, key);
    if (!v) {
        *out_p = def;
        return SPEED_OK;
    }
    if (!json_is_boolean(v)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: expected true or false", c->origin, key);
        return SPEED_ERR_FORMAT;
    }
    *out_p = json_is_true(v);
    return SPEED_OK;
}

static speed_status_t cfg_architecture(const cfg_ctx_t *c, speed_model_config_t *cfg) {
    json_t *archs = cfg_get(c, "architectures");
    json_t *type = cfg_get(c, "model_type");
    if (type) {
        if (!json_is_string(type)) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: model_type: expected a string", c->origin);
            return SPEED_ERR_FORMAT;
        }
        if (strcmp(json_string_value(type), "llama") != 0) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: model_type: \"%s\" is not supported (only the llama family)",
                        c->origin, json_string_value(type));
            return SPEED_ERR_UNSUPPORTED;
        }
    }
    if (archs) {
        if (!json_is_array(archs) || json_array_size(archs) == 0) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: architectures: expected a non-empty list", c->origin);
            return SPEED_ERR_FORMAT;
        }
        size_t i;
        json_t *a;
        json_array_foreach(archs, i, a) {
            if (!json_is_string(a)) {
                SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: architectures: expected strings", c->origin);
                return SPEED_ERR_FORMAT;
            }
            if (strcmp(json_string_value(a), "LlamaForCausalLM") != 0) {
                SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: architectures: \"%s\" is not supported (only LlamaForCausalLM)",
                            c->origin, json_string_value(a));
                return SPEED_ERR_UNSUPPORTED;
            }
        }
    } else if (!type) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: architectures: missing (and no model_type)", c->origin);
        return SPEED_ERR_FORMAT;
    }
    snprintf(cfg->architecture, sizeof cfg->architecture, "LlamaForCausalLM");
    return SPEED_OK;
}

static speed_status_t cfg_rope_scaling(const cfg_ctx_t *c, speed_model_config_t *cfg) {
    json_t *rs = cfg_get(c, "rope_scaling");
    memset(&cfg->rope_scaling, 0, sizeof cfg->rope_scaling);
    cfg->rope_scaling.type = SPEED_ROPE_SCALING_NONE;
    if (!rs) return SPEED_OK;
    if (!json_is_object(rs)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: rope_scaling: expected an object or null", c->origin);
        return SPEED_ERR_FORMAT;
    }
    json_t *t = json_object_get(rs, "rope_type");
    if (!t) t = json_object_get(rs, "type");
    if (!json_is_string(t)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: rope_scaling.rope_type: missing", c->origin);
        return SPEED_ERR_FORMAT;
    }
    const char *name = json_string_value(t);
    if (strcmp(name, "default") == 0) return SPEED_OK;
    if (strcmp(name, "llama3") != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: rope_scaling.rope_type: \"%s\" is not supported (only llama3)", c->origin,
                    name);
        return SPEED_ERR_UNSUPPORTED;
    }
    speed_rope_scaling_t *r = &cfg->rope_scaling;
    r->type = SPEED_ROPE_SCALING_LLAMA3;
    SPEED_CHECK(cfg_float(c, rs, "rope_scaling.", "factor", true, 0, 0, 1e6, &r->factor));
    SPEED_CHECK(cfg_float(c, rs, "rope_scaling.", "low_freq_factor", true, 0, 0, 1e6, &r->low_freq_factor));
    SPEED_CHECK(cfg_float(c, rs, "rope_scaling.", "high_freq_factor", true, 0, 0, 1e6, &r->high_freq_factor));
    if (!(r->high_freq_factor > r->low_freq_factor)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: rope_scaling.high_freq_factor: %g must exceed low_freq_factor %g",
                    c->origin, r->high_freq_factor, r->low_freq_factor);
        return SPEED_ERR_FORMAT;
    }
    json_t *o = json_object_get(rs, "original_max_position_embeddings");
    if (!json_is_integer(o) || json_integer_value(o) < 1 || json_integer_value(o) > SPEED_MODEL_MAX_POSITION) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: rope_scaling.original_max_position_embeddings: %s", c->origin,
                    o ? "expected an integer in range" : "missing");
        return SPEED_ERR_FORMAT;
    }
    r->original_max_position = (int)json_integer_value(o);
    return SPEED_OK;
}

static speed_status_t cfg_token_id(const cfg_ctx_t *c, const char *key, const json_t *v, int vocab, int32_t *out_p) {
    if (!json_is_integer(v)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: expected an integer token id", c->origin, key);
        return SPEED_ERR_FORMAT;
    }
    json_int_t x = json_integer_value(v);
    if (x < 0 || x >= vocab) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: %lld is outside the vocabulary [0, %d)", c->origin, key, (long long)x,
                    vocab);
        return SPEED_ERR_FORMAT;
    }
    *out_p = (int32_t)x;
    return SPEED_OK;
}

static speed_status_t cfg_special_tokens(const cfg_ctx_t *c, speed_model_config_t *cfg) {
    json_t *bos = cfg_get(c, "bos_token_id");
    cfg->bos_token_id = -1;
    if (bos) SPEED_CHECK(cfg_token_id(c, "bos_token_id", bos, cfg->vocab_size, &cfg->bos_token_id));

    json_t *eos = cfg_get(c, "eos_token_id");
    cfg->n_eos = 0;
    if (!eos) return SPEED_OK;
    if (json_is_array(eos)) {
        if (json_array_size(eos) > SPEED_MODEL_MAX_EOS) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: eos_token_id: more than %d ids", c->origin, SPEED_MODEL_MAX_EOS);
            return SPEED_ERR_FORMAT;
        }
        size_t i;
        json_t *v;
        json_array_foreach(eos, i, v) {
            SPEED_CHECK(cfg_token_id(c, "eos_token_id", v, cfg->vocab_size, &cfg->eos_token_ids[cfg->n_eos]));
            cfg->n_eos++;
        }
        return SPEED_OK;
    }
    SPEED_CHECK(cfg_token_id(c, "eos_token_id", eos, cfg->vocab_size, &cfg->eos_token_ids[0]));
    cfg->n_eos = 1;
    return SPEED_OK;
}

static speed_status_t cfg_features(const cfg_ctx_t *c) {
    json_t *act = cfg_get(c, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu") != 0)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: hidden_act: only \"silu\" is supported", c->origin);
        return SPEED_ERR_UNSUPPORTED;
    }
    static const char *const biases[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++) {
        bool b;
        SPEED_CHECK(cfg_bool(c, biases[i], false, &b));
        if (b) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: true is not supported", c->origin, biases[i]);
            return SPEED_ERR_UNSUPPORTED;
        }
    }
    return SPEED_OK;
}

static speed_status_t cfg_dtype(const cfg_ctx_t *c, speed_model_config_t *cfg) {
    const char *key = "torch_dtype";
    json_t *v = cfg_get(c, key);
    if (!v) {
        key = "dtype";
        v = cfg_get(c, key);
    }
    cfg->torch_dtype = SPEED_DTYPE_F32;
    cfg->has_torch_dtype = false;
    if (!v) return SPEED_OK;
    if (!json_is_string(v)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: expected a string", c->origin, key);
        return SPEED_ERR_FORMAT;
    }
    if (speed_dtype_parse(json_string_value(v), &cfg->torch_dtype) != SPEED_OK) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s: \"%s\" is not supported", c->origin, key, json_string_value(v));
        return SPEED_ERR_UNSUPPORTED;
    }
    cfg->has_torch_dtype = true;
    return SPEED_OK;
}

static speed_status_t cfg_read(const cfg_ctx_t *c, speed_model_config_t *cfg) {
    memset(cfg, 0, sizeof *cfg);
    SPEED_CHECK(cfg_architecture(c, cfg));
    SPEED_CHECK(cfg_features(c));
    SPEED_CHECK(cfg_int32(c, "num_hidden_layers", true, 0, 1, SPEED_MODEL_MAX_LAYERS, &cfg->n_layers));
    SPEED_CHECK(cfg_int32(c, "hidden_size", true, 0, 1, SPEED_MODEL_MAX_HIDDEN, &cfg->hidden));
    SPEED_CHECK(cfg_int32(c, "num_attention_heads", true, 0, 1, SPEED_MODEL_MAX_HEADS, &cfg->n_heads));
    SPEED_CHECK(cfg_int32(c, "num_key_value_heads", false, cfg->n_heads, 1, SPEED_MODEL_MAX_HEADS, &cfg->n_kv_heads));
    if (cfg->n_heads % cfg->n_kv_heads != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: num_key_value_heads: %d does not divide num_attention_heads %d", c->origin,
                    cfg->n_kv_heads, cfg->n_heads);
        return SPEED_ERR_FORMAT;
    }
    if (cfg_get(c, "head_dim")) {
        SPEED_CHECK(cfg_int32(c, "head_dim", true, 0, 1, SPEED_MODEL_MAX_HEAD_DIM, &cfg->head_dim));
    } else {
        if (cfg->hidden % cfg->n_heads != 0) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL,
                        "%s: num_attention_heads: %d does not divide hidden_size %d (and no "
                        "head_dim)",
                        c->origin, cfg->n_heads, cfg->hidden);
            return SPEED_ERR_FORMAT;
        }
        cfg->head_dim = cfg->hidden / cfg->n_heads;
        if (cfg->head_dim > SPEED_MODEL_MAX_HEAD_DIM) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: hidden_size: head dim %d exceeds %d", c->origin, cfg->head_dim,
                        SPEED_MODEL_MAX_HEAD_DIM);
            return SPEED_ERR_FORMAT;
        }
    }
    if (cfg->head_dim % 2 != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: head_dim: %d is odd (rotary embedding needs pairs)", c->origin,
                    cfg->head_dim);
        return SPEED_ERR_FORMAT;
    }
    SPEED_CHECK(cfg_int32(c, "intermediate_size", true, 0, 1, SPEED_MODEL_MAX_FFN, &cfg->ffn));
    SPEED_CHECK(cfg_int32(c, "vocab_size", true, 0, 1, SPEED_MODEL_MAX_VOCAB, &cfg->vocab_size));
    SPEED_CHECK(cfg_int32(c, "max_position_embeddings", true, 0, 1, SPEED_MODEL_MAX_POSITION, &cfg->max_position));
    SPEED_CHECK(cfg_float(c, c->root, "", "rope_theta", false, 10000.0, 0, 1e12, &cfg->rope_theta));
    SPEED_CHECK(cfg_float(c, c->root, "", "rms_norm_eps", false, 1e-6, 0, 1, &cfg->rms_norm_eps));
    SPEED_CHECK(cfg_rope_scaling(c, cfg));
    SPEED_CHECK(cfg_bool(c, "tie_word_embeddings", false, &cfg->tie_word_embeddings));
    SPEED_CHECK(cfg_special_tokens(c, cfg));
    SPEED_CHECK(cfg_dtype(c, cfg));
    return SPEED_OK;
}

speed_status_t speed_model_config_parse(const char *text, size_t len, const char *origin, speed_model_config_t *cfg_p) {
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory parsing JSON", origin);
            return SPEED_ERR_NO_MEMORY;
        }
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: not valid JSON: %s at line %d column %d", origin, jerr.text, jerr.line,
                    jerr.column);
        return SPEED_ERR_PARSE;
    }
    speed_status_t status;
    if (!json_is_object(root)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: expected a JSON object", origin);
        status = SPEED_ERR_FORMAT;
    } else {
        cfg_ctx_t c = {.origin = origin, .root = root};
        status = cfg_read(&c, cfg_p);
    }
    json_decref(root);
    return status;
}

speed_status_t speed_model_config_load(const char *path, speed_model_config_t *cfg_p) {
    char *text = NULL;
    size_t len = 0;
    SPEED_CHECK(speed_file_read(path, CONFIG_MAX_BYTES, SPEED_SUBSYS_MODEL, SPEED_FILE_READ_DEFAULT, &text, &len));
    speed_status_t status = speed_model_config_parse(text, len, path, cfg_p);
    speed_free(text);
    return status;
}
