/* Device helpers shared by the .cu files: element loads and stores per dtype that round
 * exactly as common/dtype.c does (so kv_store is bit-identical to cpu-ref, NaN included), and
 * the launch geometry of row-wise kernels. Header-only device code: every function is
 * `static __device__ inline`, compiled into each .cu that uses it. */
#ifndef SPEED_CUDA_UTIL_CUH
#define SPEED_CUDA_UTIL_CUH

#include <stdint.h>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

enum { SPEED_CUDA_DT_F32 = 0, SPEED_CUDA_DT_BF16 = 1, SPEED_CUDA_DT_F16 = 2 };

/* Rows of a row-wise grid: blockIdx.x walks the rows, this many at most per launch (a kernel
 * loops for more). */
#define SPEED_CUDA_MAX_GRID_ROWS 65535

static __device__ __forceinline__ float speed_bf16_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

static __device__ __forceinline__ uint16_t speed_f32_to_bf16(float f) {
    uint32_t x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);                                             /* nearest even */
    return (uint16_t)(x >> 16);
}

/* f16 -> f32 is exact, so the hardware conversion equals common/dtype.c's (NaN payloads too). */
static __device__ __forceinline__ float speed_f16_to_f32(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

static __device__ __forceinline__ uint16_t speed_f32_to_f16(float value) {
    uint32_t x = __float_as_uint(value);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (exp == 0xff) {
        if (mant) return (uint16_t)(sign | 0x7e00u | (mant >> 13));
        return (uint16_t)(sign | 0x7c00u);
    }
    int32_t e = (int32_t)exp - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return sign;
        uint32_t full = mant | 0x800000u;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t m = full >> shift;
        uint32_t rem = full & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (m & 1u))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

/* Element types as template parameters: f32 is float, bf16 and f16 their raw bits. */
struct speed_dt_f32 {
    typedef float storage;
    static __device__ __forceinline__ float load(storage v) { return v; }
    static __device__ __forceinline__ storage store(float v) { return v; }
};
struct speed_dt_bf16 {
    typedef uint16_t storage;
    static __device__ __forceinline__ float load(storage v) { return speed_bf16_to_f32(v); }
    static __device__ __forceinline__ storage store(float v) { return speed_f32_to_bf16(v); }
};
struct speed_dt_f16 {
    typedef uint16_t storage;
    static __device__ __forceinline__ float load(storage v) { return speed_f16_to_f32(v); }
    static __device__ __forceinline__ storage store(float v) { return speed_f32_to_f16(v); }
};

/* Threads per block of the row-wise kernels: enough for d in the thousands, a power of two
 * (the reductions halve it). */
#define SPEED_CUDA_ROW_THREADS 256

static inline unsigned speed_cuda_grid_rows(int64_t n) {
    return (unsigned)(n < SPEED_CUDA_MAX_GRID_ROWS ? n : SPEED_CUDA_MAX_GRID_ROWS);
}

#endif /* SPEED_CUDA_UTIL_CUH */
