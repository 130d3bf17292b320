/* topk (speed_op_topk): one block per row, exact radix select.
 *
 * Values are mapped to order-preserving uint32 keys (sign-flipped bits; -0 first made +0, so
 * keys compare as the floats do). Four passes over the row build a 256-bucket histogram of one
 * key byte each, high byte first, among the values that share the bytes chosen so far; after
 * them the block knows T, the key of the k-th largest value, and how many of the k have key
 * exactly T (the rest are strictly above T, fewer than k). A fifth pass collects the values
 * above T (any order, shared atomics) and the lowest-column values equal to T (in column order,
 * by a block-wide ballot prefix per chunk of columns), then a bitonic sort of the <= 256
 * candidates in shared memory by (value descending, column ascending) gives the op's order —
 * the same ids as cpu-ref, ties included.
 *
 * The log-sum-exp rides along: the max in the first pass, Σ exp(x - max) (f32 per thread,
 * double across the block) in the second. Each pass reads the row from L2 / HBM: ~5 reads of
 * V floats per row, against downloading them all over PCIe.
 */
#include <math.h>

#include "cuda_kernels.h"
#include "cuda_util.cuh"

#define TOPK_THREADS 256
#define TOPK_WARPS   (TOPK_THREADS / 32)

static __device__ __forceinline__ uint32_t topk_key(float x) {
    uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x); /* -0 == +0 as floats: one key */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* a (key ka, column ia) ranks before b: larger value, or equal value at a lower column. */
static __device__ __forceinline__ bool topk_before(uint32_t ka, int32_t ia, uint32_t kb, int32_t ib) {
    return ka > kb || (ka == kb && ia < ib);
}

__global__ void __launch_bounds__(TOPK_THREADS)
    topk_kernel(float *vals, int64_t vals_stride, int32_t *ids, float *lse, const float *logits, int64_t logits_stride,
                int64_t n, int64_t V, int k) {
    __shared__ uint32_t hist[TOPK_WARPS][256];
    __shared__ uint32_t cand_key[SPEED_CUDA_TOPK_MAX];
    __shared__ int32_t cand_id[SPEED_CUDA_TOPK_MAX];
    __shared__ float red_f[TOPK_WARPS];
    __shared__ double red_d[TOPK_WARPS];
    __shared__ uint32_t s_prefix, s_mask, s_need, s_n_gt;
    __shared__ uint32_t warp_eq[TOPK_WARPS];
    __shared__ float s_max;

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        const float *x = logits + row * logits_stride;
        if (tid == 0) {
            s_prefix = 0;
            s_mask = 0;
            s_need = (uint32_t)k; /* of the k, how many are still to be found below the prefix */
        }
        float tmax = -INFINITY;
        double tsum = 0.0;

        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = lane; b < 256; b += 32) hist[warp][b] = 0;
            __syncthreads();
            const uint32_t prefix = s_prefix, mask = s_mask;
            if (shift == 24) {
                for (int64_t c = tid; c < V; c += TOPK_THREADS) {
                    float v = x[c];
                    tmax = fmaxf(tmax, v);
                    atomicAdd(&hist[warp][topk_key(v) >> 24], 1u);
                }
            } else {
                const float m = s_max;
                float part = 0.0f;
                for (int64_t c = tid; c < V; c += TOPK_THREADS) {
                    float v = x[c];
                    if (shift == 16) part += expf(v - m);
                    uint32_t u = topk_key(v);
                    if ((u & mask) == prefix) atomicAdd(&hist[warp][(u >> shift) & 255u], 1u);
                }
                if (shift == 16) tsum = (double)part;
            }
            if (shift == 24) { /* the row's max, for the lse shift of the next pass */
                for (int off = 16; off > 0; off /= 2) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
                if (lane == 0) red_f[warp] = tmax;
            }
            __syncthreads();
            for (int b = tid; b < 256; b += TOPK_THREADS) {
                uint32_t total = 0;
                for (int w = 0; w < TOPK_WARPS; w++) total += hist[w][b];
                hist[0][b] = total;
            }
            __syncthreads();
            if (tid == 0) {
                if (shift == 24) {
                    float m = red_f[0];
                    for (int w = 1; w < TOPK_WARPS; w++) m = fmaxf(m, red_f[w]);
                    s_max = m;
                }
                uint32_t need = s_need, above = 0;
                int b = 255;
                for (; b > 0; b--) { /* the bucket holding the need-th largest key of the prefix */
                    if (above + hist[0][b] >= need) break;
                    above += hist[0][b];
                }
                s_need = need - above;
                s_prefix = prefix | ((uint32_t)b << shift);
                s_mask = mask | (255u << shift);
            }
            __syncthreads();
        }

        /* lse: block sum of the per-thread exp sums of the second pass */
        for (int off = 16; off > 0; off /= 2) tsum += __shfl_xor_sync(0xffffffffu, tsum, off);
        if (lane == 0) red_d[warp] = tsum;

        const uint32_t T = s_prefix, need_eq = s_need;
        const uint32_t n_gt = (uint32_t)k - need_eq; /* keys > T: all of them are in the top k */
        if (tid == 0) s_n_gt = 0;
        __syncthreads();
        if (tid == 0) {
            const float m = s_max;
            double total = 0.0;
            for (int w = 0; w < TOPK_WARPS; w++) total += red_d[w];
            lse[row] = isinf(m) ? m : (float)((double)m + log(total));
        }

        /* collect: chunks of TOPK_THREADS consecutive columns, walked by the block together so
         * that the columns equal to T are numbered in column order. Every thread keeps the
         * running count of equal columns itself (the same sum of warp_eq in all of them). */
        uint32_t eq_base = 0;
        for (int64_t base = 0; base < V; base += TOPK_THREADS) {
            const int64_t c = base + tid;
            uint32_t u = 0;
            bool eq = false;
            if (c < V) {
                u = topk_key(x[c]);
                if (u > T) {
                    const uint32_t pos = atomicAdd(&s_n_gt, 1u);
                    cand_key[pos] = u;
                    cand_id[pos] = (int32_t)c;
                }
                eq = u == T;
            }
            const unsigned ballot = __ballot_sync(0xffffffffu, eq);
            if (lane == 0) warp_eq[warp] = (uint32_t)__popc(ballot);
            __syncthreads();
            uint32_t before = 0, total = 0;
            for (int w = 0; w < TOPK_WARPS; w++) {
                before += w < warp ? warp_eq[w] : 0u;
                total += warp_eq[w];
            }
            if (eq) {
                const uint32_t pos = eq_base + before + (uint32_t)__popc(ballot & ((1u << lane) - 1u));
                if (pos < need_eq) {
                    cand_key[n_gt + pos] = u;
                    cand_id[n_gt + pos] = (int32_t)c;
                }
            }
            eq_base += total;
            __syncthreads(); /* warp_eq is rewritten by the next chunk */
        }

        /* bitonic sort of the k candidates (padded to a power of two with entries that rank
         * last) into the op's order */
        int P = 1;
        while (P < k) P *= 2;
        for (int j = k + tid; j < P; j += TOPK_THREADS) {
            cand_key[j] = 0;
            cand_id[j] = INT32_MAX;
        }
        __syncthreads();
        for (int size = 2; size <= P; size *= 2) {
            for (int stride = size / 2; stride > 0; stride /= 2) {
                for (int t = tid; t < P / 2; t += TOPK_THREADS) {
                    const int i = 2 * stride * (t / stride) + t % stride, j = i + stride;
                    const bool swap = (i & size) == 0 ? topk_before(cand_key[j], cand_id[j], cand_key[i], cand_id[i])
                                                      : topk_before(cand_key[i], cand_id[i], cand_key[j], cand_id[j]);
                    if (swap) {
                        const uint32_t tk = cand_key[i];
                        const int32_t ti = cand_id[i];
                        cand_key[i] = cand_key[j];
                        cand_id[i] = cand_id[j];
                        cand_key[j] = tk;
                        cand_id[j] = ti;
                    }
                }
                __syncthreads();
            }
        }
        for (int j = tid; j < k; j += TOPK_THREADS) {
            const int32_t id = cand_id[j];
            ids[row * k + j] = id;
            vals[row * vals_stride + j] = x[id]; /* the value's own bits (-0 stays -0) */
        }
        __syncthreads(); /* shared state is reused by the next row */
    }
}

extern "C" cudaError_t speed_cuda_topk(cudaStream_t stream, float *vals, int64_t vals_stride, int32_t *ids, float *lse,
                                       const float *logits, int64_t logits_stride, int64_t n, int64_t V, int k) {
    topk_kernel<<<speed_cuda_grid_rows(n), TOPK_THREADS, 0, stream>>>(vals, vals_stride, ids, lse, logits,
                                                                      logits_stride, n, V, k);
    return cudaGetLastError();
}
