/* add: out = a + b (f32, exact: one rounding, as cpu-ref). Rows in blockIdx.y (looping past
 * the grid limit), columns across blockIdx.x; out may alias a or b (same element, same thread). */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

__global__ void add_kernel(float *out, int64_t out_stride, const float *a, int64_t a_stride, const float *b,
                           int64_t b_stride, int64_t n, int64_t d) {
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < d; c += (int64_t)gridDim.x * blockDim.x)
            out[r * out_stride + c] = a[r * a_stride + c] + b[r * b_stride + c];
}

extern "C" cudaError_t speed_cuda_add(cudaStream_t stream, float *out, int64_t out_stride, const float *a,
                                      int64_t a_stride, const float *b, int64_t b_stride, int64_t n, int64_t d) {
    int64_t col_blocks = (d + SPEED_CUDA_ROW_THREADS - 1) / SPEED_CUDA_ROW_THREADS;
    dim3 grid((unsigned)(col_blocks < 1024 ? col_blocks : 1024), speed_cuda_grid_rows(n));
    add_kernel<<<grid, SPEED_CUDA_ROW_THREADS, 0, stream>>>(out, out_stride, a, a_stride, b, b_stride, n, d);
    return cudaGetLastError();
}
