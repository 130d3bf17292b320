/* Launchers of the CUDA backend's kernels: one per op, one op per .cu file.
 *
 * This header is plain C (it is included by backend_cuda.c, compiled by the C compiler, and by
 * the .cu files). Every launcher enqueues its kernel(s) on `stream` and returns the result of
 * cudaGetLastError() after the last launch (cudaSuccess or a launch error: bad configuration,
 * no kernel image for this GPU); faults while the kernel runs surface at the next
 * synchronizing call. Launchers never block and never allocate.
 *
 * Pointers are device memory. Index arrays (ids, rows, slots, positions, block tables, row
 * descriptions) were copied to the device by the caller (backend_cuda.c, one staged copy per
 * op). Strides of f32 matrices are in elements; KV pool strides and offsets are in bytes
 * (speed_kv_layer_t). `dtype` is a speed_dtype_t value (0 f32, 1 bf16, 2 f16; checked by a
 * static assertion in backend_cuda.c).
 */
#ifndef SPEED_CUDA_KERNELS_H
#define SPEED_CUDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* out[i, :] = table[ids[i], :]   out f32 [n][d] (stride out_stride); table dtype [.][d] (table_stride) */
cudaError_t speed_cuda_embed(cudaStream_t stream, float *out, int64_t out_stride, const void *table, int dtype,
                             int64_t table_stride, const int32_t *ids, int64_t n, int64_t d);

/* HF LlamaRMSNorm; out may alias x.   out, x f32 [n][d]; weight dtype [d] */
cudaError_t speed_cuda_rmsnorm(cudaStream_t stream, float *out, int64_t out_stride, const float *x, int64_t x_stride,
                               const void *weight, int dtype, float eps, int64_t n, int64_t d);

/* dst [n][k] (contiguous, bf16 or f16 per dtype) = src f32 [n][k] (stride src_stride), rounded
 * to nearest even: the activation operand of a cuBLAS GEMM with 16-bit weights. */
cudaError_t speed_cuda_matmul_convert(cudaStream_t stream, void *dst, int dtype, const float *src, int64_t src_stride,
                                      int64_t n, int64_t k);

/* Rotate-half RoPE in place on x f32 [n][n_heads * head_dim]: row i by positions[i], pair j
 * by the angle (float)positions[i] * inv_freq[j] (inv_freq [head_dim / 2], from
 * speed_rope_inv_freq on the host). */
cudaError_t speed_cuda_rope(cudaStream_t stream, float *x, int64_t x_stride, int64_t n, int n_heads, int head_dim,
                            const int32_t *positions, const float *inv_freq);

/* out = silu(gate) * up, all f32 [n][f]; out may alias either input */
cudaError_t speed_cuda_swiglu(cudaStream_t stream, float *out, int64_t out_stride, const float *gate,
                              int64_t gate_stride, const float *up, int64_t up_stride, int64_t n, int64_t f);

/* out = a + b, all f32 [n][d]; out may alias either input */
cudaError_t speed_cuda_add(cudaStream_t stream, float *out, int64_t out_stride, const float *a, int64_t a_stride,
                           const float *b, int64_t b_stride, int64_t n, int64_t d);

/* out[i, :] = x[rows[i], :]   f32 */
cudaError_t speed_cuda_get_rows(cudaStream_t stream, float *out, int64_t out_stride, const float *x, int64_t x_stride,
                                const int32_t *rows, int64_t n, int64_t d);

/* One layer of a paged pool, as speed_kv_layer_t (byte strides). slot_heads is resolved (never
 * 0): kv heads per token slot in memory, >= n_kv_heads for a view of some heads of a pool. */
typedef struct {
    char *k_base;
    size_t block_stride;
    size_t v_offset;
    int block_tokens;
    int n_kv_heads;
    int head_dim;
    int dtype;
    int slot_heads;
} speed_cuda_kv_t;

/* pool slot slots[i] = k[i, :], v[i, :] rounded to the cache dtype (bit-exact with cpu-ref);
 * only the view's heads of each slot are written.   k, v f32 [n][n_kv_heads * head_dim] */
cudaError_t speed_cuda_kv_store(cudaStream_t stream, speed_cuda_kv_t kv, const float *k, int64_t k_stride,
                                const float *v, int64_t v_stride, const int32_t *slots, int64_t n);

/* k[i, :], v[i, :] = pool slot slots[i], widened to f32 */
cudaError_t speed_cuda_kv_load(cudaStream_t stream, speed_cuda_kv_t kv, float *k, int64_t k_stride, float *v,
                               int64_t v_stride, const int32_t *slots, int64_t n);

/* Per query row of attention (16 bytes, staged with the block tables). */
typedef struct {
    int32_t n_visible; /* entries 0 .. n_visible-1 are visible */
    int32_t table_off; /* the row's block table: tables[table_off ...] */
    int32_t n_split;   /* ceil(n_visible / chunk), 1 for an empty row */
    int32_t pad;
} speed_cuda_attn_row_t;

/* Largest head_dim the attention kernel handles. */
#define SPEED_CUDA_ATTN_MAX_HEAD_DIM 512
/* Entries per tile of the online softmax; chunks are multiples of it. */
#define SPEED_CUDA_ATTN_TILE         32

/* out[r, h] = softmax(scale * q[r, h] . K[e, h / group]) V over e < rows[r].n_visible,
 * entry e in slot tables[rows[r].table_off + e / B] * B + e % B. The entries of a row are cut
 * into chunks of `chunk` entries (a multiple of SPEED_CUDA_ATTN_TILE); a row with n_split > 1
 * has its chunks computed by separate blocks, which leave (acc[head_dim], max, sum) in
 * `partials` (f32 [n_rows * n_heads][max_split][head_dim + 2]; NULL when max_split is 1) for a
 * second kernel that merges them (split-K, flash-decoding). out must not alias q. */
cudaError_t speed_cuda_attention(cudaStream_t stream, float *out, int64_t out_stride, const float *q, int64_t q_stride,
                                 speed_cuda_kv_t kv, int n_heads, int64_t n_rows, const speed_cuda_attn_row_t *rows,
                                 const int32_t *tables, int chunk, int max_split, float scale, float *partials);

/* Largest k of speed_cuda_topk (= SPEED_TOPK_MAX, checked in backend_cuda.c). */
#define SPEED_CUDA_TOPK_MAX 256

/* Per row i of logits f32 [n][V]: the k largest values, descending, equal values by lower
 * column, into vals f32 [n][k] (stride vals_stride) and their columns into ids int32 [n][k]
 * (contiguous); lse[i] = log Σ exp(logits[i, :]) (max-shifted). 1 <= k <= min(V,
 * SPEED_CUDA_TOPK_MAX), V <= INT32_MAX. */
cudaError_t speed_cuda_topk(cudaStream_t stream, float *vals, int64_t vals_stride, int32_t *ids, float *lse,
                            const float *logits, int64_t logits_stride, int64_t n, int64_t V, int k);

#ifdef __cplusplus
}
#endif

#endif /* SPEED_CUDA_KERNELS_H */
