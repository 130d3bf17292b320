/* A weight tensor as stored in a safetensors file: a view, never a copy.
 *
 * Ownership: the tensor, its name and its data belong to the object that produced it
 * (a speed_safetensors_t or a speed_model_t) and live exactly as long as it.
 * Thread-safety: read-only; may be shared by any number of threads.
 */
#ifndef SPEED_TENSOR_H
#define SPEED_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

#define SPEED_TENSOR_MAX_DIMS 4

typedef struct {
    const char *name; /* e.g. "model.layers.3.self_attn.k_proj.weight" */
    speed_dtype_t dtype;
    int n_dims;                           /* 0..SPEED_TENSOR_MAX_DIMS (0 = scalar) */
    int64_t shape[SPEED_TENSOR_MAX_DIMS]; /* HF (row-major) order, e.g. [out, in]; unused dims 0 */
    const void *data;                     /* points into the read-only mmap, never copied; aligned to the
                             * element size (not dereferenceable when n_bytes == 0) */
    size_t n_bytes;                       /* product(shape) * speed_dtype_size(dtype) */
} speed_tensor_t;

/* Product of the shape (1 for a scalar). */
int64_t speed_tensor_n_elements(const speed_tensor_t *t);

/* Writes the shape as "[256, 2048]" into buf (always NUL-terminated when size > 0). */
void speed_tensor_shape_format(const int64_t *shape, int n_dims, char *buf, size_t size);

#endif /* SPEED_TENSOR_H */
