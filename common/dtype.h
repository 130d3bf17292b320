/* Element types of model weights and KV caches: their names, sizes and scalar conversions.
 *
 * Names. This file owns every spelling of a dtype: ours ("bf16": options, config files, logs,
 * JSON output), torch's ("bfloat16": config.json's torch_dtype) and the safetensors format's
 * ("BF16"). Adding a dtype is an edit here (and its conversions); no other file lists them.
 *
 * bf16 and f16 values are carried as their raw 16-bit patterns (uint16_t).
 * Conversions from f32 round to nearest, ties to even; NaN stays NaN (quiet),
 * infinities stay infinite, f16 subnormals are produced and read exactly.
 *
 * Thread-safety: everything here is pure and may be called from any thread.
 */
#ifndef SPEED_DTYPE_H
#define SPEED_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef enum {
    SPEED_DTYPE_F32,
    SPEED_DTYPE_BF16,
    SPEED_DTYPE_F16,
} speed_dtype_t;

#define SPEED_DTYPE_COUNT 3

/* Bytes per element: 4, 2, 2. 0 for a value outside the enum. */
size_t speed_dtype_size(speed_dtype_t dtype);

/* Our names in enum order, NULL-terminated: "f32", "bf16", "f16". A config ENUM field
 * (config.h) takes them as its enum_names, and its stored index is then the speed_dtype_t. */
extern const char *const speed_dtype_names[SPEED_DTYPE_COUNT + 1];

/* The KV cache's dtype as configured (kv.dtype, --kv-dtype, speed_engine_params_t.kv_dtype): a
 * speed_dtype_t, or SPEED_KV_DTYPE_AUTO = the dtype of the checkpoint's K/V projections
 * (speed_model_kv_dtype, engine/model), so an f32 or f16 model keeps the precision it was
 * made with and a bf16 model gets a bf16 cache. The names are speed_dtype_names plus "auto",
 * whose index is SPEED_KV_DTYPE_AUTO: a config ENUM field with these names stores the choice. */
#define SPEED_KV_DTYPE_AUTO ((speed_dtype_t)SPEED_DTYPE_COUNT)
extern const char *const speed_kv_dtype_names[SPEED_DTYPE_COUNT + 2];

/* "f32", "bf16", "f16"; "?" for a value outside the enum. Never NULL. */
const char *speed_dtype_name(speed_dtype_t dtype);
/* torch's names, as config.json's torch_dtype has them: "float32", "bfloat16", "float16";
 * "?" outside the enum. */
const char *speed_dtype_torch_name(speed_dtype_t dtype);
/* The safetensors format's names: "F32", "BF16", "F16"; "?" outside the enum. */
const char *speed_dtype_safetensors_name(speed_dtype_t dtype);

/* Accepts our names and torch's (f32/bf16/f16, float32/bfloat16/float16), case-insensitive.
 * Returns SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT (nothing logged, *out_p untouched)
 * for NULL or any other name. */
speed_status_t speed_dtype_parse(const char *name, speed_dtype_t *out_p);
/* Accepts the safetensors names only, case-sensitive as the format is ("F32", not "f32").
 * Returns as speed_dtype_parse. */
speed_status_t speed_dtype_safetensors_parse(const char *name, speed_dtype_t *out_p);

/* Scalar conversions. */
uint16_t speed_dtype_f32_to_bf16(float value);
float speed_dtype_bf16_to_f32(uint16_t bits);
uint16_t speed_dtype_f32_to_f16(float value);
float speed_dtype_f16_to_f32(uint16_t bits);

/* Converts n elements of `dtype` at src (any alignment) to f32 at dst. */
void speed_dtype_to_f32(speed_dtype_t dtype, const void *src, float *dst, size_t n);
/* Converts n f32 values to `dtype` at dst (any alignment), rounding as above. */
void speed_dtype_from_f32(speed_dtype_t dtype, const float *src, void *dst, size_t n);

#endif /* SPEED_DTYPE_H */
