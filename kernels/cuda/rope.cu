/* rope: rotate-half RoPE in place, one block per row. Thread j owns pair j of every head:
 * the angle (float)pos * inv_freq[j] is an f32 product as in transformers (inv_freq comes from
 * speed_rope_inv_freq on the host, bit-identical to cpu-ref's), cos and sin are evaluated in
 * double once per (row, pair) and reused across heads, and the rotation is rounded once:
 * cpu-ref's arithmetic exactly, up to the last bit of the device's sincos. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

__global__ void rope_kernel(float *x, int64_t x_stride, int64_t n, int n_heads, int head_dim, const int32_t *positions,
                            const float *inv_freq) {
    const int half = head_dim / 2;
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        float *xr = x + r * x_stride;
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            float angle = (float)positions[r] * inv_freq[j];
            double s, c;
            sincos((double)angle, &s, &c);
            for (int h = 0; h < n_heads; h++) {
                float *head = xr + (int64_t)h * head_dim;
                double a = head[j], b = head[j + half];
                head[j] = (float)(a * c - b * s);
                head[j + half] = (float)(b * c + a * s);
            }
        }
    }
}

extern "C" cudaError_t speed_cuda_rope(cudaStream_t stream, float *x, int64_t x_stride, int64_t n, int n_heads,
                                       int head_dim, const int32_t *positions, const float *inv_freq) {
    int half = head_dim / 2, threads = half < 128 ? (half + 31) / 32 * 32 : 128;
    rope_kernel<<<speed_cuda_grid_rows(n), threads, 0, stream>>>(x, x_stride, n, n_heads, head_dim, positions,
                                                                 inv_freq);
    return cudaGetLastError();
}
