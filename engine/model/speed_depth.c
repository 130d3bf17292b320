/* SPEED depth parameters (ARCHITECTURE.md section 1): prefill_layers and the KV bytes they buy. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "model.h"

speed_status_t speed_prefill_layers_parse(const char *text, int n_layers, int *c_p) {
    if (!text || n_layers < 1) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "prefill_layers: no value (or a model with %d layers)",
                    n_layers);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    size_t len = strlen(text), digits = strspn(text, "0123456789");
    if (len > 0 && digits == len) {
        if (len <= 9) {
            long c = strtol(text, NULL, 10);
            if (c >= 1 && c <= n_layers) {
                *c_p = (int)c;
                return SPEED_OK;
            }
        }
    } else if (len > 1 && len < 32 && text[digits] == '.' &&
               strspn(text + digits + 1, "0123456789") == len - digits - 1) {
        double f = strtod(text, NULL);
        if (f > 0.0 && f <= 1.0) {
            int c = (int)floor(f * n_layers + 0.5);
            *c_p = c < 1 ? 1 : c;
            return SPEED_OK;
        }
    }
    SPEED_ERROR(SPEED_SUBSYS_MODEL,
                "prefill_layers: \"%s\" is neither a layer count in 1..%d nor a fraction in (0, 1]",
                text, n_layers);
    return SPEED_ERR_INVALID_ARGUMENT;
}

static size_t kv_bytes_per_layer_token(const speed_model_config_t *cfg, speed_dtype_t dtype) {
    return 2u * (size_t)cfg->n_kv_heads * (size_t)cfg->head_dim * speed_dtype_size(dtype);
}

size_t speed_kv_bytes_per_token(const speed_model_config_t *cfg, int prefill_layers,
                                speed_dtype_t cache_dtype) {
    int c = prefill_layers < 0 ? 0 : prefill_layers > cfg->n_layers ? cfg->n_layers : prefill_layers;
    return (size_t)c * kv_bytes_per_layer_token(cfg, cache_dtype);
}

size_t speed_kv_bytes_for_prompt(const speed_model_config_t *cfg, int C, int anchors, int tail,
                                 int64_t n_prompt, speed_dtype_t cache_dtype) {
    if (n_prompt <= 0) return 0;
    int64_t L = cfg->n_layers;
    int64_t c = C < 1 ? 1 : C > L ? L : C;
    int64_t kept = (int64_t)(anchors > 0 ? anchors : 0) + (tail > 0 ? tail : 0);
    if (kept > n_prompt) kept = n_prompt;
    uint64_t layer_tokens = (uint64_t)(c * n_prompt) + (uint64_t)((L - c) * kept);
    return (size_t)(layer_tokens * kv_bytes_per_layer_token(cfg, cache_dtype));
}
