/* rmsnorm (Hugging Face LlamaRMSNorm with f32 input): one block per row. The sum of squares
 * is accumulated in double (a row is read once, so the extra cost hides behind memory) and the
 * variance and 1/sqrt(variance + eps) are rounded to f32 as cpu-ref does: the result is within
 * an ulp or two of the reference. out may alias x: the row is reduced before it is written. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

template <typename DT> __global__ void rmsnorm_kernel(float *out, int64_t out_stride, const float *x, int64_t x_stride,
                                                      const typename DT::storage *weight, float eps, int64_t n,
                                                      int64_t d) {
    __shared__ double partial[SPEED_CUDA_ROW_THREADS / 32];
    __shared__ float inv_shared;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const float *xi = x + i * x_stride;
        double ss = 0.0;
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) ss += (double)xi[c] * (double)xi[c];
        for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
        if (lane == 0) partial[warp] = ss;
        __syncthreads();
        if (threadIdx.x == 0) {
            double total = 0.0;
            for (int w = 0; w < (int)(blockDim.x / 32); w++) total += partial[w];
            float variance = (float)(total / (double)d);
            inv_shared = (float)(1.0 / sqrt((double)(variance + eps)));
        }
        __syncthreads();
        const float inv = inv_shared;
        float *oi = out + i * out_stride;
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
            float normed = xi[c] * inv;
            oi[c] = DT::load(weight[c]) * normed;
        }
        __syncthreads(); /* partial / inv_shared are reused by the next row */
    }
}

extern "C" cudaError_t speed_cuda_rmsnorm(cudaStream_t stream, float *out, int64_t out_stride, const float *x,
                                          int64_t x_stride, const void *weight, int dtype, float eps, int64_t n,
                                          int64_t d) {
    dim3 grid(speed_cuda_grid_rows(n)), block(SPEED_CUDA_ROW_THREADS);
    switch (dtype) {
    case SPEED_CUDA_DT_F32:
        rmsnorm_kernel<speed_dt_f32>
            <<<grid, block, 0, stream>>>(out, out_stride, x, x_stride, (const float *)weight, eps, n, d);
        break;
    case SPEED_CUDA_DT_BF16:
        rmsnorm_kernel<speed_dt_bf16>
            <<<grid, block, 0, stream>>>(out, out_stride, x, x_stride, (const uint16_t *)weight, eps, n, d);
        break;
    default:
        rmsnorm_kernel<speed_dt_f16>
            <<<grid, block, 0, stream>>>(out, out_stride, x, x_stride, (const uint16_t *)weight, eps, n, d);
        break;
    }
    return cudaGetLastError();
}
