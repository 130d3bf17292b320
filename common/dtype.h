/* Element types of model weights and KV caches, and scalar conversions.
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

/* "f32", "bf16", "f16"; "?" for a value outside the enum. Never NULL. */
const char *speed_dtype_name(speed_dtype_t dtype);

/* Accepts f32/bf16/f16 and the torch spellings float32/bfloat16/float16 (case-insensitive).
 * Returns SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT (nothing logged, *out_p untouched)
 * for NULL or any other name. */
speed_status_t speed_dtype_parse(const char *name, speed_dtype_t *out_p);

/* Scalar conversions. */
uint16_t speed_dtype_f32_to_bf16(float value);
float    speed_dtype_bf16_to_f32(uint16_t bits);
uint16_t speed_dtype_f32_to_f16(float value);
float    speed_dtype_f16_to_f32(uint16_t bits);

/* Converts n elements of `dtype` at src (any alignment) to f32 at dst. */
void speed_dtype_to_f32(speed_dtype_t dtype, const void *src, float *dst, size_t n);
/* Converts n f32 values to `dtype` at dst (any alignment), rounding as above. */
void speed_dtype_from_f32(speed_dtype_t dtype, const float *src, void *dst, size_t n);

#endif /* SPEED_DTYPE_H */
