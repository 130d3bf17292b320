/* speed_model_t: a Llama-family model's configuration and weights, loaded from a Hugging Face
 * directory (config.json + model.safetensors, or shards listed by model.safetensors.index.json).
 *
 * Weights are memory-mapped read-only (PROT_READ, MAP_PRIVATE) and never copied: every
 * speed_tensor_t.data points into a mapping owned by the model. Before the model is handed
 * out, every expected tensor's name, dtype (F32/BF16/F16, mixed per tensor allowed) and shape
 * are checked against config.json; loading never half-succeeds.
 *
 * Ownership: speed_model_load returns a model the caller destroys with speed_model_destroy;
 * every pointer reachable from it (tensors, names, layers) lives exactly as long as it.
 * Thread-safety: a loaded model is immutable and may be shared by any number of threads.
 * Loading and destroying are reentrant (no global state).
 *
 * Also here: the KV-cache size formulas of docs/design.md §1 (kv_bytes.c); the SPEED depth
 * itself is engine/depth.
 */
#ifndef SPEED_MODEL_H
#define SPEED_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "model_config.h"
#include "status.h"
#include "tensor.h"

typedef struct {
    const speed_tensor_t *attn_norm; /* [hidden]                          input_layernorm */
    const speed_tensor_t *wq;        /* [n_heads*head_dim, hidden]        self_attn.q_proj */
    const speed_tensor_t *wk;        /* [n_kv_heads*head_dim, hidden]     self_attn.k_proj */
    const speed_tensor_t *wv;        /* [n_kv_heads*head_dim, hidden]     self_attn.v_proj */
    const speed_tensor_t *wo;        /* [hidden, n_heads*head_dim]        self_attn.o_proj */
    const speed_tensor_t *ffn_norm;  /* [hidden]                          post_attention_layernorm */
    const speed_tensor_t *w_gate;    /* [ffn, hidden]                     mlp.gate_proj */
    const speed_tensor_t *w_up;      /* [ffn, hidden]                     mlp.up_proj */
    const speed_tensor_t *w_down;    /* [hidden, ffn]                     mlp.down_proj */
} speed_layer_weights_t;

struct speed_model_files; /* private: mapped files and the tensor table */

typedef struct speed_model {
    speed_model_config_t config;
    const speed_tensor_t *tok_embeddings; /* [vocab, hidden]  model.embed_tokens */
    const speed_tensor_t *norm;           /* [hidden]         model.norm */
    const speed_tensor_t *lm_head;        /* [vocab, hidden]  lm_head; == tok_embeddings when tied */
    speed_layer_weights_t *layers;        /* [n_layers] */
    struct speed_model_files *files_;     /* private */
} speed_model_t;

typedef struct {
    bool allow_extra_tensors; /* default true: unexpected tensors are a warning, not an error */
    bool hugepages;           /* default false: map the files. true: read the weights into
                               * anonymous memory in 2 MiB pages (transparent huge pages,
                               * madvise mode) — a copy at load time, then decode streams the
                               * weights with far fewer TLB misses (a few % of the memory
                               * roof on these machines) */
} speed_model_params_t;

speed_model_params_t speed_model_default_params(void);

/* Loads the model in directory `dir`. params may be NULL (defaults).
 * Weights: `model.safetensors` if present, else `model.safetensors.index.json` whose
 * weight_map names the shard of every tensor (each shard must exist and hold the tensors the
 * index puts there). Tied models may carry lm_head.weight (used only to check its shape);
 * `*.rotary_emb.inv_freq` buffers are ignored; other unexpected tensors are logged with
 * SPEED_WARN (or are an error when !allow_extra_tensors).
 * Returns:
 *   SPEED_OK
 *   SPEED_ERR_NOT_FOUND        dir, config.json, the weights, a shard or an expected tensor missing
 *   SPEED_ERR_INVALID_ARGUMENT dir is not a directory
 *   SPEED_ERR_PARSE            config.json, the index or a safetensors header is not JSON
 *   SPEED_ERR_FORMAT           a nonsensical config, bad index or safetensors file, a tensor of
 *                              the wrong shape, an extra tensor when !allow_extra_tensors
 *   SPEED_ERR_UNSUPPORTED      not a Llama-family model, or an unsupported dtype/feature
 *   SPEED_ERR_IO               a file cannot be opened or mapped
 *   SPEED_ERR_NO_MEMORY
 * Every error is logged once (SPEED_SUBSYS_MODEL) naming the file and the field or tensor,
 * e.g. "model.safetensors: model.layers.3.self_attn.k_proj.weight: expected [256, 2048], got
 * [2048, 2048]". On error nothing stays mapped or allocated and *model_p is untouched. */
speed_status_t speed_model_load(const char *dir, const speed_model_params_t *params, speed_model_t **model_p);

/* Unmaps and frees everything; NULL is a no-op. No other thread may still use the model. */
void speed_model_destroy(speed_model_t *model);

/* Looks up any tensor of the loaded files by HF name (including ignored extras); NULL if
 * absent. */
const speed_tensor_t *speed_model_tensor_find(const speed_model_t *m, const char *name);

/* Parameters (elements) of the weights used; a tied lm_head counts once. */
int64_t speed_model_n_params(const speed_model_t *m);
/* Bytes of the weights used (as stored); a tied lm_head counts once. */
size_t speed_model_n_bytes(const speed_model_t *m);

/* The cache dtype that SPEED_KV_DTYPE_AUTO (dtype.h) means for this model: the dtype the
 * checkpoint stores its K and V projections in — f32 when any layer's k_proj or v_proj is f32
 * (the cache then loses nothing the weights carry), else layer 0's k_proj dtype. */
speed_dtype_t speed_model_kv_dtype(const speed_model_t *m);

/* kv_dtype (a speed_dtype_t or SPEED_KV_DTYPE_AUTO) resolved for the model: AUTO becomes
 * speed_model_kv_dtype(m), anything else is returned as it is. */
speed_dtype_t speed_model_kv_dtype_resolve(const speed_model_t *m, speed_dtype_t kv_dtype);

/* Bytes of K and V that one *shallow* prompt token occupies in the cache:
 * 2 * C * n_kv_heads * head_dim * dtype size. With C = n_layers this is the size of a
 * full-depth token. prefill_layers is clamped to [0, n_layers]. */
size_t speed_kv_bytes_per_token(const speed_model_config_t *cfg, int prefill_layers, speed_dtype_t cache_dtype);

/* Bytes of K and V for a prompt of n_prompt tokens (docs/design.md §1): layers < C
 * hold every prompt token; layers >= C hold only the min(A + T, n) anchor and tail tokens:
 *   per_layer_token * (C * n + (L - C) * min(A + T, n)),  per_layer_token = 2*n_kv_heads*head_dim*size.
 * C is clamped to [1, L]; negative anchors/tail count as 0; n_prompt <= 0 gives 0.
 * Generated tokens (always full depth) are not included. */
size_t speed_kv_bytes_for_prompt(const speed_model_config_t *cfg, int C, int anchors, int tail, int64_t n_prompt,
                                 speed_dtype_t cache_dtype);

/* FLOPs of a prefill of n_prompt tokens at depth {C, A, T}: every layer's projections for the
 * rows it computes (n below C, the min(A + T, n) full-depth tokens from C up), causal attention
 * over the pairs each layer sees (2 FLOPs per multiply-add of QK^T and of PV), and the output
 * projection for the one row that makes logits. C is clamped to [1, L]. */
double speed_prefill_flops(const speed_model_config_t *cfg, int C, int anchors, int tail, int64_t n_prompt);

#endif /* SPEED_MODEL_H */
