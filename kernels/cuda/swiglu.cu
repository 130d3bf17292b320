/* swiglu: out = silu(gate) * up in f32 (expf: a few ulps from cpu-ref's double; for very
 * negative gates expf(-g) overflows to inf and silu is -0, the limit cpu-ref rounds to as
 * well). Same geometry as add.cu; out may alias gate or up. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

__global__ void swiglu_kernel(float *out, int64_t out_stride, const float *gate, int64_t gate_stride, const float *up,
                              int64_t up_stride, int64_t n, int64_t f) {
    for (int64_t r = blockIdx.y; r < n; r += gridDim.y)
        for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < f; c += (int64_t)gridDim.x * blockDim.x) {
            float g = gate[r * gate_stride + c];
            float silu = g / (1.0f + expf(-g));
            out[r * out_stride + c] = silu * up[r * up_stride + c];
        }
}

extern "C" cudaError_t speed_cuda_swiglu(cudaStream_t stream, float *out, int64_t out_stride, const float *gate,
                                         int64_t gate_stride, const float *up, int64_t up_stride, int64_t n,
                                         int64_t f) {
    int64_t col_blocks = (f + SPEED_CUDA_ROW_THREADS - 1) / SPEED_CUDA_ROW_THREADS;
    dim3 grid((unsigned)(col_blocks < 1024 ? col_blocks : 1024), speed_cuda_grid_rows(n));
    swiglu_kernel<<<grid, SPEED_CUDA_ROW_THREADS, 0, stream>>>(out, out_stride, gate, gate_stride, up, up_stride, n, f);
    return cudaGetLastError();
}
