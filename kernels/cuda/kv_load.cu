/* kv_load: the inverse of kv_store, pool slots widened to f32 rows (exact). One block per row;
 * as in kv_store, a slot's view heads are contiguous and slots slot_heads * head_dim apart. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

template <typename DT> __global__ void kv_load_kernel(speed_cuda_kv_t kv, float *k, int64_t k_stride, float *v,
                                                      int64_t v_stride, const int32_t *slots, int64_t n) {
    typedef typename DT::storage S;
    const int64_t w = (int64_t)kv.n_kv_heads * kv.head_dim, slot_w = (int64_t)kv.slot_heads * kv.head_dim;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        int64_t slot = slots[i], b = slot / kv.block_tokens, o = slot % kv.block_tokens;
        const S *ks = (const S *)(kv.k_base + (size_t)b * kv.block_stride) + o * slot_w;
        const S *vs = (const S *)((const char *)ks + kv.v_offset);
        float *ki = k + i * k_stride, *vi = v + i * v_stride;
        for (int64_t c = threadIdx.x; c < w; c += blockDim.x) {
            ki[c] = DT::load(ks[c]);
            vi[c] = DT::load(vs[c]);
        }
    }
}

extern "C" cudaError_t speed_cuda_kv_load(cudaStream_t stream, speed_cuda_kv_t kv, float *k, int64_t k_stride, float *v,
                                          int64_t v_stride, const int32_t *slots, int64_t n) {
    dim3 grid(speed_cuda_grid_rows(n)), block(SPEED_CUDA_ROW_THREADS);
    switch (kv.dtype) {
    case SPEED_CUDA_DT_F32:
        kv_load_kernel<speed_dt_f32><<<grid, block, 0, stream>>>(kv, k, k_stride, v, v_stride, slots, n);
        break;
    case SPEED_CUDA_DT_BF16:
        kv_load_kernel<speed_dt_bf16><<<grid, block, 0, stream>>>(kv, k, k_stride, v, v_stride, slots, n);
        break;
    default: kv_load_kernel<speed_dt_f16><<<grid, block, 0, stream>>>(kv, k, k_stride, v, v_stride, slots, n); break;
    }
    return cudaGetLastError();
}
