/* Writer of small (or full-size) synthetic Llama models in the Hugging Face layout, for tests,
 * benchmarks and demos without downloading weights.
 *
 * speed_tiny_model_write produces config.json (real LlamaForCausalLM fields) and either
 * model.safetensors or n_shards files model-00001-of-0000N.safetensors plus
 * model.safetensors.index.json, with HF tensor names and shapes. Weights are deterministic
 * pseudo-random numbers from `seed`: every tensor has its own stream (seeded by the seed and
 * the tensor's name, so sharding does not change values), matrices and embeddings are
 * normal(0, init_std), norm weights are 1 + normal(0, init_std). Values are produced in f32
 * and rounded to `dtype` (nearest even).
 *
 * Writing streams tensor by tensor in fixed-size chunks (a few MB of memory whatever the
 * model size); each file is written under a temporary name and renamed when complete.
 * Stale weight files of another layout in out_dir (model.safetensors, the index, shards) are
 * removed so that the directory always loads as what was written last.
 *
 * Thread-safety: reentrant; two writers must not share an out_dir.
 */
#ifndef SPEED_TINY_MODEL_H
#define SPEED_TINY_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "status.h"

typedef struct {
    int n_layers, hidden, n_heads, n_kv_heads, ffn, vocab_size, max_position;
    int head_dim;        /* 0 = hidden / n_heads (and no head_dim in config.json) */
    speed_dtype_t dtype; /* of every tensor, and torch_dtype */
    bool tied;           /* tie_word_embeddings: no lm_head.weight written */
    bool rope_scaling;   /* a llama3 rope_scaling block: factor 8, low 1, high 4, original 8192 */
    int n_shards;        /* 1 = model.safetensors; N > 1 = N shards + index */
    uint64_t seed;
    float rope_theta, rms_norm_eps, init_std;
    int32_t bos_token_id;     /* -1 = none (null) */
    int32_t eos_token_ids[4]; /* [n_eos]; one id is written as an int, several as a list */
    int n_eos;
} speed_tiny_model_params_t;

/* Small: 4 layers, hidden 64, 4 heads, 2 kv heads, ffn 172, vocab 512, max_position 4096, f32,
 * untied, 1 shard, seed 42, rope_theta 10000, rms_norm_eps 1e-5, init_std 0.02, bos 1, eos 2. */
speed_tiny_model_params_t speed_tiny_model_default_params(void);

/* Fills *p from a named preset:
 *   "tiny"            the defaults above;
 *   "tinyllama-1.1b"  TinyLlama-1.1B's shapes: 22 layers, hidden 2048, 32 heads, 4 kv heads,
 *                     ffn 5632, vocab 32000, max_position 2048, bf16, rope_theta 10000,
 *                     eps 1e-5, bos 1, eos 2 (1.1 B parameters, 2.2 GB);
 *   "smollm-135m"     SmolLM-135M's shapes: 30 layers, hidden 576, 9 heads, 3 kv heads, ffn 1536,
 *                     vocab 49152, max_position 2048, tied, bf16, bos 0, eos 0.
 * Returns SPEED_OK or SPEED_ERR_NOT_FOUND (unknown name, logged; *p untouched). */
speed_status_t speed_tiny_model_preset(const char *name, speed_tiny_model_params_t *p);

/* Writes the model into out_dir, creating it if needed (its parent must exist).
 * Returns:
 *   SPEED_OK
 *   SPEED_ERR_INVALID_ARGUMENT  p describes no valid model (sizes, heads that do not divide,
 *                               token ids outside the vocabulary, n_shards < 1 or more than
 *                               the number of tensors, ...)
 *   SPEED_ERR_NOT_FOUND         the parent of out_dir does not exist
 *   SPEED_ERR_IO                a file could not be created or written (disk full, ...)
 *   SPEED_ERR_NO_MEMORY
 * Errors are logged once (SPEED_SUBSYS_MODEL). After an error out_dir may hold the files
 * completed before it, but no partially written file. */
speed_status_t speed_tiny_model_write(const char *out_dir, const speed_tiny_model_params_t *p);

/* The f32 values (before rounding to p->dtype) that speed_tiny_model_write puts in the
 * tensor called `name` (an HF name such as "model.layers.0.mlp.up_proj.weight"): the first
 * n_elements of its stream, in row-major order. Any name works: names ending in "norm.weight"
 * get norm values, others normal(0, init_std). For tests. */
void speed_tiny_model_tensor_values(const speed_tiny_model_params_t *p, const char *name, float *out,
                                    size_t n_elements);

#endif /* SPEED_TINY_MODEL_H */
