/* attention over the paged KV pool, one query row at a time, as speed_attn_rows_t describes
 * it: each row has its own visible entry count and block table, so prefill rows (causal within
 * their chunk), decode rows and SPEED's compact upper-layer entries all take the same path.
 *
 * Kernel 1 (attn_chunk_kernel): one block of ATTN_THREADS threads per (row, query head, chunk).
 * The chunk's entries are walked in tiles of SPEED_CUDA_ATTN_TILE: each warp computes the dot
 * products of a quarter of the tile (lanes across head_dim, shuffle reduction), then the tile's
 * maximum updates the running (max, sum) of an online softmax and every thread rescales and
 * accumulates its own head_dim elements of P.V (coalesced V reads). No score matrix exists
 * beyond one tile. A row with one chunk writes its output directly.
 *
 * Kernel 2 (attn_merge_kernel), only when some row has several chunks (split-K for long
 * contexts, so a decode batch of few rows still fills the GPU): merges the chunks' partial
 * (acc, max, sum) into the output.
 *
 * Numerics: fp32 dot products and accumulators, expf; cpu-ref accumulates in double. The
 * query is not pre-scaled: scale multiplies the finished dot product, as cpu-ref does.
 *
 * Not done (the next step for prefill speed): query tiles that share K/V tiles in shared
 * memory across rows of one sequence and the heads of a GQA group, with tensor-core MMA. */
#include <math.h>

#include "cuda_kernels.h"
#include "cuda_util.cuh"

#define ATTN_THREADS 128
#define ATTN_WARPS   (ATTN_THREADS / 32)
#define ATTN_ACC     (SPEED_CUDA_ATTN_MAX_HEAD_DIM / ATTN_THREADS) /* head_dim elements per thread */

template <typename DT> __global__ void __launch_bounds__(ATTN_THREADS)
    attn_chunk_kernel(float *out, int64_t out_stride, const float *q, int64_t q_stride, speed_cuda_kv_t kv, int n_heads,
                      const speed_cuda_attn_row_t *rows, const int32_t *tables, int chunk, int max_split, float scale,
                      float *partials) {
    typedef typename DT::storage S;
    const int TILE = SPEED_CUDA_ATTN_TILE;
    extern __shared__ float q_sh[]; /* [head_dim] */
    __shared__ float p_sh[SPEED_CUDA_ATTN_TILE];
    __shared__ int64_t off_sh[SPEED_CUDA_ATTN_TILE]; /* byte offset of each entry's K head */

    const int64_t rh = blockIdx.x;
    const int64_t r = rh / n_heads;
    const int h = (int)(rh % n_heads);
    const int split = blockIdx.y;
    const speed_cuda_attn_row_t row = rows[r];
    const int hd = kv.head_dim;
    float *o = out + r * out_stride + (int64_t)h * hd;
    if (split >= row.n_split) return;
    if (row.n_visible == 0) {
        for (int d = threadIdx.x; d < hd; d += ATTN_THREADS) o[d] = 0.0f;
        return;
    }
    const int kvh = h / (n_heads / kv.n_kv_heads);
    const int e_begin = split * chunk;
    const int e_end = min(e_begin + chunk, row.n_visible);
    const int32_t *table = tables + row.table_off;
    const float *qh = q + r * q_stride + (int64_t)h * hd;
    for (int d = threadIdx.x; d < hd; d += ATTN_THREADS) q_sh[d] = qh[d];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t head_off = (int64_t)kvh * hd * (int64_t)sizeof(S);
    const int64_t slot_bytes = (int64_t)kv.slot_heads * hd * (int64_t)sizeof(S);
    float m = -INFINITY, l = 0.0f;
    float acc[ATTN_ACC];
#pragma unroll
    for (int a = 0; a < ATTN_ACC; a++) acc[a] = 0.0f;
    __syncthreads();

    for (int t0 = e_begin; t0 < e_end; t0 += TILE) {
        const int n_t = min(TILE, e_end - t0);
        /* scores: warp w takes entries w, w + ATTN_WARPS, ... of the tile */
        for (int j = warp; j < n_t; j += ATTN_WARPS) {
            const int e = t0 + j;
            const int64_t off = (int64_t)table[e / kv.block_tokens] * (int64_t)kv.block_stride +
                                (int64_t)(e % kv.block_tokens) * slot_bytes + head_off;
            const S *ke = (const S *)(kv.k_base + off);
            float dot = 0.0f;
            for (int d = lane; d < hd; d += 32) dot += q_sh[d] * DT::load(ke[d]);
#pragma unroll
            for (int s = 16; s > 0; s /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, s);
            if (lane == 0) {
                p_sh[j] = dot * scale;
                off_sh[j] = off;
            }
        }
        __syncthreads();
        /* online softmax: every thread computes the same tile max and running state */
        float tile_max = -INFINITY;
        for (int j = 0; j < n_t; j++) tile_max = fmaxf(tile_max, p_sh[j]);
        const float m_new = fmaxf(m, tile_max);
        const float corr = expf(m - m_new); /* 0 on the first tile (m = -inf) */
        __syncthreads();
        if (threadIdx.x < n_t) p_sh[threadIdx.x] = expf(p_sh[threadIdx.x] - m_new);
        __syncthreads();
        float tile_sum = 0.0f;
        for (int j = 0; j < n_t; j++) tile_sum += p_sh[j];
        l = l * corr + tile_sum;
        m = m_new;
#pragma unroll
        for (int a = 0; a < ATTN_ACC; a++) {
            const int d = threadIdx.x + a * ATTN_THREADS;
            if (d < hd) {
                float sum = acc[a] * corr;
                for (int j = 0; j < n_t; j++) {
                    const S *ve = (const S *)(kv.k_base + off_sh[j] + (int64_t)kv.v_offset);
                    sum += p_sh[j] * DT::load(ve[d]);
                }
                acc[a] = sum;
            }
        }
        __syncthreads(); /* p_sh / off_sh are rewritten by the next tile */
    }

    if (row.n_split == 1) {
        const float inv = 1.0f / l;
#pragma unroll
        for (int a = 0; a < ATTN_ACC; a++) {
            const int d = threadIdx.x + a * ATTN_THREADS;
            if (d < hd) o[d] = acc[a] * inv;
        }
        return;
    }
    float *part = partials + (rh * max_split + split) * (int64_t)(hd + 2);
#pragma unroll
    for (int a = 0; a < ATTN_ACC; a++) {
        const int d = threadIdx.x + a * ATTN_THREADS;
        if (d < hd) part[d] = acc[a];
    }
    if (threadIdx.x == 0) {
        part[hd] = m;
        part[hd + 1] = l;
    }
}

__global__ void __launch_bounds__(ATTN_THREADS)
    attn_merge_kernel(float *out, int64_t out_stride, int n_heads, int hd, const speed_cuda_attn_row_t *rows,
                      int max_split, const float *partials) {
    const int64_t rh = blockIdx.x;
    const int64_t r = rh / n_heads;
    const int h = (int)(rh % n_heads);
    const int n_split = rows[r].n_split;
    if (n_split <= 1) return; /* written by the chunk kernel */
    const float *part = partials + rh * max_split * (int64_t)(hd + 2);
    float m = -INFINITY;
    for (int s = 0; s < n_split; s++) m = fmaxf(m, part[s * (int64_t)(hd + 2) + hd]);
    float l = 0.0f;
    for (int s = 0; s < n_split; s++) {
        const float *ps = part + s * (int64_t)(hd + 2);
        l += ps[hd + 1] * expf(ps[hd] - m);
    }
    const float inv = 1.0f / l;
    float *o = out + r * out_stride + (int64_t)h * hd;
    for (int d = threadIdx.x; d < hd; d += ATTN_THREADS) {
        float sum = 0.0f;
        for (int s = 0; s < n_split; s++) {
            const float *ps = part + s * (int64_t)(hd + 2);
            sum += ps[d] * expf(ps[hd] - m);
        }
        o[d] = sum * inv;
    }
}

extern "C" cudaError_t speed_cuda_attention(cudaStream_t stream, float *out, int64_t out_stride, const float *q,
                                            int64_t q_stride, speed_cuda_kv_t kv, int n_heads, int64_t n_rows,
                                            const speed_cuda_attn_row_t *rows, const int32_t *tables, int chunk,
                                            int max_split, float scale, float *partials) {
    dim3 grid((unsigned)(n_rows * n_heads), (unsigned)max_split);
    size_t shared = (size_t)kv.head_dim * sizeof(float);
    switch (kv.dtype) {
    case SPEED_CUDA_DT_F32:
        attn_chunk_kernel<speed_dt_f32><<<grid, ATTN_THREADS, shared, stream>>>(
            out, out_stride, q, q_stride, kv, n_heads, rows, tables, chunk, max_split, scale, partials);
        break;
    case SPEED_CUDA_DT_BF16:
        attn_chunk_kernel<speed_dt_bf16><<<grid, ATTN_THREADS, shared, stream>>>(
            out, out_stride, q, q_stride, kv, n_heads, rows, tables, chunk, max_split, scale, partials);
        break;
    default:
        attn_chunk_kernel<speed_dt_f16><<<grid, ATTN_THREADS, shared, stream>>>(
            out, out_stride, q, q_stride, kv, n_heads, rows, tables, chunk, max_split, scale, partials);
        break;
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || max_split <= 1) return err;
    attn_merge_kernel<<<(unsigned)(n_rows * n_heads), ATTN_THREADS, 0, stream>>>(out, out_stride, n_heads, kv.head_dim,
                                                                                 rows, max_split, partials);
    return cudaGetLastError();
}
