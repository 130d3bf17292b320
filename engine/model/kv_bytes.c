/* The KV bytes a SPEED depth buys (docs/design.md §1); the depth itself is engine/depth. */

#include "model.h"

static size_t kv_bytes_per_layer_token(const speed_model_config_t *cfg, speed_dtype_t dtype) {
    return 2u * (size_t)cfg->n_kv_heads * (size_t)cfg->head_dim * speed_dtype_size(dtype);
}

size_t speed_kv_bytes_per_token(const speed_model_config_t *cfg, int prefill_layers, speed_dtype_t cache_dtype) {
    int c = prefill_layers < 0 ? 0 : prefill_layers > cfg->n_layers ? cfg->n_layers : prefill_layers;
    return (size_t)c * kv_bytes_per_layer_token(cfg, cache_dtype);
}

size_t speed_kv_bytes_for_prompt(const speed_model_config_t *cfg, int C, int anchors, int tail, int64_t n_prompt,
                                 speed_dtype_t cache_dtype) {
    if (n_prompt <= 0) return 0;
    int64_t L = cfg->n_layers;
    int64_t c = C < 1 ? 1 : C > L ? L : C;
    int64_t kept = (int64_t)(anchors > 0 ? anchors : 0) + (tail > 0 ? tail : 0);
    if (kept > n_prompt) kept = n_prompt;
    uint64_t layer_tokens = (uint64_t)(c * n_prompt) + (uint64_t)((L - c) * kept);
    return (size_t)(layer_tokens * kv_bytes_per_layer_token(cfg, cache_dtype));
}
