/* embed: out[i, :] = table[ids[i], :] widened to f32 (exact). One block per row. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

template <typename DT> __global__ void embed_kernel(float *out, int64_t out_stride, const typename DT::storage *table,
                                                    int64_t table_stride, const int32_t *ids, int64_t n, int64_t d) {
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const typename DT::storage *src = table + (int64_t)ids[i] * table_stride;
        float *dst = out + i * out_stride;
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = DT::load(src[c]);
    }
}

extern "C" cudaError_t speed_cuda_embed(cudaStream_t stream, float *out, int64_t out_stride, const void *table,
                                        int dtype, int64_t table_stride, const int32_t *ids, int64_t n, int64_t d) {
    dim3 grid(speed_cuda_grid_rows(n)), block(SPEED_CUDA_ROW_THREADS);
    switch (dtype) {
    case SPEED_CUDA_DT_F32:
        embed_kernel<speed_dt_f32>
            <<<grid, block, 0, stream>>>(out, out_stride, (const float *)table, table_stride, ids, n, d);
        break;
    case SPEED_CUDA_DT_BF16:
        embed_kernel<speed_dt_bf16>
            <<<grid, block, 0, stream>>>(out, out_stride, (const uint16_t *)table, table_stride, ids, n, d);
        break;
    default:
        embed_kernel<speed_dt_f16>
            <<<grid, block, 0, stream>>>(out, out_stride, (const uint16_t *)table, table_stride, ids, n, d);
        break;
    }
    return cudaGetLastError();
}
