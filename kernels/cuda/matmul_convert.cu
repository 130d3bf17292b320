/* matmul, the kernel half: cuBLAS multiplies operands of one type, so with bf16 / f16 weights
 * the f32 activations x [n][k] are rounded (nearest even) into a contiguous 16-bit copy first;
 * the GEMM itself (fp32 accumulation) is issued by backend_cuda.c. Rows in blockIdx.y. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

template <typename DT>
__global__ void convert_kernel(typename DT::storage *dst, const float *src, int64_t src_stride, int64_t n, int64_t k) {
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < k; c += (int64_t)gridDim.x * blockDim.x)
            dst[r * k + c] = DT::store(src[r * src_stride + c]);
}

extern "C" cudaError_t speed_cuda_matmul_convert(cudaStream_t stream, void *dst, int dtype, const float *src,
                                                 int64_t src_stride, int64_t n, int64_t k) {
    int64_t col_blocks = (k + SPEED_CUDA_ROW_THREADS - 1) / SPEED_CUDA_ROW_THREADS;
    dim3 grid((unsigned)(col_blocks < 1024 ? col_blocks : 1024), speed_cuda_grid_rows(n));
    if (dtype == SPEED_CUDA_DT_BF16)
        convert_kernel<speed_dt_bf16>
            <<<grid, SPEED_CUDA_ROW_THREADS, 0, stream>>>((uint16_t *)dst, src, src_stride, n, k);
    else
        convert_kernel<speed_dt_f16>
            <<<grid, SPEED_CUDA_ROW_THREADS, 0, stream>>>((uint16_t *)dst, src, src_stride, n, k);
    return cudaGetLastError();
}
