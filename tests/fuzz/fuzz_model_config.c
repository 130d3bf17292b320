/* Fuzzes config.json parsing and validation (engine/model/model_config.c,
 * speed_model_config_parse) and checks the bounds model_config.h promises for every config
 * it accepts, which the loader and the engine then size their buffers by. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "model_config.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    speed_model_config_t c;
    memset(&c, 0xa5, sizeof c); /* "unspecified after an error": make stale fields visible */
    speed_status_t st = speed_model_config_parse((const char *)data, size, "fuzz/config.json", &c);
    if (st != SPEED_OK) {
        FZ_ASSERT(st == SPEED_ERR_PARSE || st == SPEED_ERR_FORMAT || st == SPEED_ERR_UNSUPPORTED ||
                  st == SPEED_ERR_NO_MEMORY || st == SPEED_ERR_TOO_LONG || st == SPEED_ERR_INVALID_ARGUMENT);
        return 0;
    }
    FZ_ASSERT(memchr(c.architecture, 0, sizeof c.architecture));
    FZ_ASSERT(c.n_layers >= 1 && c.n_layers <= SPEED_MODEL_MAX_LAYERS);
    FZ_ASSERT(c.hidden >= 1 && c.hidden <= SPEED_MODEL_MAX_HIDDEN);
    FZ_ASSERT(c.n_heads >= 1 && c.n_heads <= SPEED_MODEL_MAX_HEADS);
    FZ_ASSERT(c.n_kv_heads >= 1 && c.n_kv_heads <= c.n_heads && c.n_heads % c.n_kv_heads == 0);
    FZ_ASSERT(c.head_dim >= 2 && c.head_dim <= SPEED_MODEL_MAX_HEAD_DIM && c.head_dim % 2 == 0);
    FZ_ASSERT(c.ffn >= 1 && c.ffn <= SPEED_MODEL_MAX_FFN);
    FZ_ASSERT(c.vocab_size >= 1 && c.vocab_size <= SPEED_MODEL_MAX_VOCAB);
    FZ_ASSERT(c.max_position >= 1 && c.max_position <= SPEED_MODEL_MAX_POSITION);
    FZ_ASSERT(isfinite(c.rope_theta) && c.rope_theta > 0);
    FZ_ASSERT(isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0);
    if (c.rope_scaling.type == SPEED_ROPE_SCALING_LLAMA3) {
        FZ_ASSERT(isfinite(c.rope_scaling.factor) && c.rope_scaling.factor > 0);
        FZ_ASSERT(isfinite(c.rope_scaling.low_freq_factor) && isfinite(c.rope_scaling.high_freq_factor));
        FZ_ASSERT(c.rope_scaling.original_max_position >= 1);
    } else {
        FZ_ASSERT(c.rope_scaling.type == SPEED_ROPE_SCALING_NONE);
    }
    FZ_ASSERT(c.bos_token_id >= -1 && c.bos_token_id < c.vocab_size);
    FZ_ASSERT(c.n_eos >= 0 && c.n_eos <= SPEED_MODEL_MAX_EOS);
    for (int i = 0; i < c.n_eos; i++) FZ_ASSERT(c.eos_token_ids[i] >= 0 && c.eos_token_ids[i] < c.vocab_size);
    return 0;
}
