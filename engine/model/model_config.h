/* speed_model_config_t: the architecture of a Llama-family model, read from a Hugging
 * Face config.json.
 *
 * Accepted: architectures ["LlamaForCausalLM"] and/or model_type "llama" (Llama 2/3/3.1/3.2,
 * TinyLlama, SmolLM, ...). Anything else (Mistral, Qwen, ...) is SPEED_ERR_UNSUPPORTED, as are
 * rope_scaling types other than "llama3" (or "default"), hidden_act other than "silu", and
 * attention_bias / mlp_bias true.
 *
 * The struct is plain data (no heap pointers): copy it freely, nothing to release.
 * Thread-safety: speed_model_config_load is reentrant.
 */
#ifndef SPEED_MODEL_CONFIG_H
#define SPEED_MODEL_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "dtype.h"
#include "status.h"

#define SPEED_MODEL_MAX_EOS 8

/* Sanity limits: a config beyond them is rejected as nonsensical. */
#define SPEED_MODEL_MAX_LAYERS   1024
#define SPEED_MODEL_MAX_HIDDEN   (1 << 17)
#define SPEED_MODEL_MAX_HEADS    1024
#define SPEED_MODEL_MAX_HEAD_DIM 1024
#define SPEED_MODEL_MAX_FFN      (1 << 20)
#define SPEED_MODEL_MAX_VOCAB    (1 << 24)
#define SPEED_MODEL_MAX_POSITION (1 << 26)

typedef enum {
    SPEED_ROPE_SCALING_NONE = 0,
    SPEED_ROPE_SCALING_LLAMA3, /* Llama 3.1/3.2 frequency-dependent scaling */
} speed_rope_scaling_type_t;

typedef struct {
    speed_rope_scaling_type_t type;
    /* only meaningful for SPEED_ROPE_SCALING_LLAMA3: */
    float factor;              /* "factor", e.g. 8 */
    float low_freq_factor;     /* "low_freq_factor", e.g. 1 */
    float high_freq_factor;    /* "high_freq_factor", e.g. 4 */
    int original_max_position; /* "original_max_position_embeddings", e.g. 8192 */
} speed_rope_scaling_t;

typedef struct {
    char architecture[64]; /* "LlamaForCausalLM" */
    int n_layers;          /* num_hidden_layers (L) */
    int hidden;            /* hidden_size */
    int n_heads;           /* num_attention_heads */
    int n_kv_heads;        /* num_key_value_heads (default n_heads); divides n_heads */
    int head_dim;          /* head_dim (default hidden / n_heads); even */
    int ffn;               /* intermediate_size */
    int vocab_size;
    int max_position;   /* max_position_embeddings */
    float rope_theta;   /* default 10000 */
    float rms_norm_eps; /* default 1e-6 (the transformers default) */
    speed_rope_scaling_t rope_scaling;
    bool tie_word_embeddings;                   /* default false */
    int32_t bos_token_id;                       /* -1 when absent or null */
    int32_t eos_token_ids[SPEED_MODEL_MAX_EOS]; /* [n_eos]; eos_token_id as int or list */
    int n_eos;
    speed_dtype_t torch_dtype; /* "torch_dtype" (or newer "dtype"); F32 when absent */
    bool has_torch_dtype;
} speed_model_config_t;

/* Reads and validates `path` (a config.json) into *cfg_p.
 * Returns:
 *   SPEED_OK
 *   SPEED_ERR_NOT_FOUND       the file does not exist
 *   SPEED_ERR_IO              it cannot be read
 *   SPEED_ERR_INVALID_ARGUMENT the path is a directory
 *   SPEED_ERR_TOO_LONG        it is larger than any real config.json (16 MiB)
 *   SPEED_ERR_PARSE           it is not JSON (or a number is not representable)
 *   SPEED_ERR_FORMAT          a field is missing, of the wrong type, or nonsensical
 *                             (zero/negative/absurd sizes, heads that do not divide, ...)
 *   SPEED_ERR_UNSUPPORTED     not a Llama-family model, or a feature speedserve lacks
 *   SPEED_ERR_NO_MEMORY
 * Every error is logged once (SPEED_SUBSYS_MODEL) naming the file and the field;
 * *cfg_p is unspecified after an error. */
speed_status_t speed_model_config_load(const char *path, speed_model_config_t *cfg_p);

/* Same, from JSON text in memory; `origin` names it in error messages. */
speed_status_t speed_model_config_parse(const char *text, size_t len, const char *origin, speed_model_config_t *cfg_p);

#endif /* SPEED_MODEL_CONFIG_H */
