/* get_rows: out[i, :] = x[rows[i], :] (f32 copy). One block per row. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

__global__ void get_rows_kernel(float *out, int64_t out_stride, const float *x, int64_t x_stride, const int32_t *rows,
                                int64_t n, int64_t d) {
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const float *src = x + (int64_t)rows[i] * x_stride;
        float *dst = out + i * out_stride;
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
    }
}

extern "C" cudaError_t speed_cuda_get_rows(cudaStream_t stream, float *out, int64_t out_stride, const float *x,
                                           int64_t x_stride, const int32_t *rows, int64_t n, int64_t d) {
    get_rows_kernel<<<speed_cuda_grid_rows(n), SPEED_CUDA_ROW_THREADS, 0, stream>>>(out, out_stride, x, x_stride, rows,
                                                                                    n, d);
    return cudaGetLastError();
}
