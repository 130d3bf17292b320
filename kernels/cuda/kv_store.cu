/* kv_store: K and V rows into their pool slots, rounded to the cache dtype exactly as
 * common/dtype.c rounds (the pool bytes equal cpu-ref's). One block per row; the view's
 * n_kv_heads * head_dim elements of a slot are contiguous (all of the slot's in the canonical
 * layout; adjacent heads of a head view), slots slot_heads * head_dim elements apart. */
#include "cuda_kernels.h"
#include "cuda_util.cuh"

template <typename DT> __global__ void kv_store_kernel(speed_cuda_kv_t kv, const float *k, int64_t k_stride,
                                                       const float *v, int64_t v_stride, const int32_t *slots,
                                                       int64_t n) {
    typedef typename DT::storage S;
    const int64_t w = (int64_t)kv.n_kv_heads * kv.head_dim, slot_w = (int64_t)kv.slot_heads * kv.head_dim;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        int64_t slot = slots[i], b = slot / kv.block_tokens, o = slot % kv.block_tokens;
        S *kd = (S *)(kv.k_base + (size_t)b * kv.block_stride) + o * slot_w;
        S *vd = (S *)((char *)kd + kv.v_offset);
        const float *ki = k + i * k_stride, *vi = v + i * v_stride;
        for (int64_t c = threadIdx.x; c < w; c += blockDim.x) {
            kd[c] = DT::store(ki[c]);
            vd[c] = DT::store(vi[c]);
        }
    }
}

extern "C" cudaError_t speed_cuda_kv_store(cudaStream_t stream, speed_cuda_kv_t kv, const float *k, int64_t k_stride,
                                           const float *v, int64_t v_stride, const int32_t *slots, int64_t n) {
    dim3 grid(speed_cuda_grid_rows(n)), block(SPEED_CUDA_ROW_THREADS);
    switch (kv.dtype) {
    case SPEED_CUDA_DT_F32:
        kv_store_kernel<speed_dt_f32><<<grid, block, 0, stream>>>(kv, k, k_stride, v, v_stride, slots, n);
        break;
    case SPEED_CUDA_DT_BF16:
        kv_store_kernel<speed_dt_bf16><<<grid, block, 0, stream>>>(kv, k, k_stride, v, v_stride, slots, n);
        break;
    default: kv_store_kernel<speed_dt_f16><<<grid, block, 0, stream>>>(kv, k, k_stride, v, v_stride, slots, n); break;
    }
    return cudaGetLastError();
}
