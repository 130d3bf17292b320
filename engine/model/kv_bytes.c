/* The KV bytes and prefill FLOPs a SPEED depth buys (docs/design.md §1), and the cache dtype "auto" means for a
 * model; the depth itself is engine/depth. */

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

speed_dtype_t speed_model_kv_dtype(const speed_model_t *m) {
    for (int l = 0; l < m->config.n_layers; l++)
        if (m->layers[l].wk->dtype == SPEED_DTYPE_F32 || m->layers[l].wv->dtype == SPEED_DTYPE_F32)
            return SPEED_DTYPE_F32;
    return m->layers[0].wk->dtype;
}

speed_dtype_t speed_model_kv_dtype_resolve(const speed_model_t *m, speed_dtype_t kv_dtype) {
    return kv_dtype == SPEED_KV_DTYPE_AUTO ? speed_model_kv_dtype(m) : kv_dtype;
}

double speed_prefill_flops(const speed_model_config_t *c, int C, int anchors, int tail, int64_t n) {
    if (n <= 0) return 0.0;
    int L = c->n_layers, cut = C < 1 ? 1 : C > L ? L : C;
    double q = (double)c->n_heads * c->head_dim, kv = (double)c->n_kv_heads * c->head_dim, h = c->hidden;
    double per_row = 2.0 * (h * q + 2.0 * h * kv + q * h + 3.0 * h * c->ffn);
    int64_t kept = (int64_t)(anchors > 0 ? anchors : 0) + (tail > 0 ? tail : 0);
    double full = (double)(kept < n ? kept : n), nn = (double)n;
    double flops = 0.0;
    for (int l = 0; l < L; l++) {
        double rows = l < cut ? nn : full;
        double pairs = rows * (rows + 1.0) / 2.0; /* full-depth tokens see each other causally */
        flops += rows * per_row + 4.0 * q * pairs;
    }
    return flops + 2.0 * h * c->vocab_size;
}
