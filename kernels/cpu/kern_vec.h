/* A thin vector layer for kern_impl.h: `vf` is VN f32 lanes of the ISA the including file is
 * compiled for (KERN_ISA). Only what the kernels need; everything is static inline.
 *
 *   KERN_ISA_SCALAR  vf = float, VN = 1 (portable C, no flags)
 *   KERN_ISA_AVX2    vf = __m256, VN = 8 (-mavx2 -mfma -mf16c)
 *   KERN_ISA_AVX512  vf = __m512, VN = 16 (-mavx512f -mavx512bw -mavx512vl -mfma -mf16c)
 *
 * bf16 -> f32 is exact (a shift); f32 -> bf16 rounds to nearest even and quiets NaN exactly as
 * speed_dtype_f32_to_bf16 does; f16 conversions are the hardware ones (IEEE, round to nearest
 * even, subnormals exact), which match speed_dtype_f32_to_f16 / speed_dtype_f16_to_f32.
 */
#ifndef SPEED_KERN_VEC_H
#define SPEED_KERN_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"

#define KERN_ISA_SCALAR 0
#define KERN_ISA_AVX2   1
#define KERN_ISA_AVX512 2

#define KERN_INLINE static inline __attribute__((always_inline))

#if KERN_ISA != KERN_ISA_SCALAR
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------------------ */
#if KERN_ISA == KERN_ISA_AVX512

typedef __m512 vf;
#define VN 16

KERN_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
KERN_INLINE vf vf_set1(float a) { return _mm512_set1_ps(a); }
KERN_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
KERN_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
KERN_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
KERN_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
KERN_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
KERN_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
/* max/min return b when either is NaN (x86 semantics; the scalar layer copies them). */
KERN_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
KERN_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
KERN_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
KERN_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a*b */
KERN_INLINE float vf_hsum(vf v) { return _mm512_reduce_add_ps(v); }
KERN_INLINE float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }
KERN_INLINE vf vf_round(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n for integral n in [-126, 127] */
KERN_INLINE vf vf_pow2i(__m512i n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
}
KERN_INLINE vf vf_ldexp_round(vf p, vf n) { /* p * 2^n, n integral in [-252, 254] */
    __m512i ni = _mm512_cvtps_epi32(n);
    __m512i n1 = _mm512_srai_epi32(ni, 1);
    __m512i n2 = _mm512_sub_epi32(ni, n1);
    return _mm512_mul_ps(_mm512_mul_ps(p, vf_pow2i(n1)), vf_pow2i(n2));
}
KERN_INLINE vf vf_load_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
/* 2*VN consecutive bf16 -> their even and odd elements. */
KERN_INLINE void vf_load_bf16_eo(const uint16_t *p, vf *even, vf *odd) {
    __m512i w = _mm512_loadu_si512((const void *)p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
}
KERN_INLINE vf vf_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
KERN_INLINE void vf_store_bf16(uint16_t *p, vf v) {
    __m512i x = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
KERN_INLINE void vf_store_f16(uint16_t *p, vf v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
/* In-register transpose of VN x VN 32-bit elements. */
KERN_INLINE void vf_transpose(vf m[VN]) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_castps_si512(m[i]);
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* r[4i + j], 128-bit lane L = column 4L + j of rows 4i .. 4i+3: transpose the lanes. */
    for (int j = 0; j < 4; j++) {
        __m512i u0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);
        __m512i u1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xee);
        __m512i u2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        __m512i u3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xee);
        m[0 + j] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(u0, u2, 0x88));
        m[4 + j] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(u0, u2, 0xdd));
        m[8 + j] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(u1, u3, 0x88));
        m[12 + j] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(u1, u3, 0xdd));
    }
}

/* ------------------------------------------------------------------------------------ */
#elif KERN_ISA == KERN_ISA_AVX2

typedef __m256 vf;
#define VN 8

KERN_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
KERN_INLINE vf vf_set1(float a) { return _mm256_set1_ps(a); }
KERN_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
KERN_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
KERN_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
KERN_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
KERN_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
KERN_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
KERN_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
KERN_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
KERN_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
KERN_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
KERN_INLINE float vf_hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
KERN_INLINE float vf_hmax(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
KERN_INLINE vf vf_round(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
KERN_INLINE vf vf_pow2i(__m256i n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}
KERN_INLINE vf vf_ldexp_round(vf p, vf n) {
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i n1 = _mm256_srai_epi32(ni, 1);
    __m256i n2 = _mm256_sub_epi32(ni, n1);
    return _mm256_mul_ps(_mm256_mul_ps(p, vf_pow2i(n1)), vf_pow2i(n2));
}
KERN_INLINE vf vf_load_bf16(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
KERN_INLINE void vf_load_bf16_eo(const uint16_t *p, vf *even, vf *odd) {
    __m256i w = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xffff0000u)));
}
KERN_INLINE vf vf_load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
KERN_INLINE void vf_store_bf16(uint16_t *p, vf v) {
    __m256i x = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    /* |x| > inf as signed compare: both sides are non-negative */
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    __m256i q = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, q, nan);
    __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(pk));
}
KERN_INLINE void vf_store_f16(uint16_t *p, vf v) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
KERN_INLINE void vf_transpose(vf m[VN]) {
    __m256 t0 = _mm256_unpacklo_ps(m[0], m[1]), t1 = _mm256_unpackhi_ps(m[0], m[1]);
    __m256 t2 = _mm256_unpacklo_ps(m[2], m[3]), t3 = _mm256_unpackhi_ps(m[2], m[3]);
    __m256 t4 = _mm256_unpacklo_ps(m[4], m[5]), t5 = _mm256_unpackhi_ps(m[4], m[5]);
    __m256 t6 = _mm256_unpacklo_ps(m[6], m[7]), t7 = _mm256_unpackhi_ps(m[6], m[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
    m[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    m[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    m[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    m[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    m[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    m[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    m[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    m[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* ------------------------------------------------------------------------------------ */
#else /* scalar */

typedef float vf;
#define VN 1

KERN_INLINE vf vf_zero(void) { return 0.0f; }
KERN_INLINE vf vf_set1(float a) { return a; }
KERN_INLINE vf vf_load(const float *p) { return *p; }
KERN_INLINE void vf_store(float *p, vf v) { *p = v; }
KERN_INLINE vf vf_add(vf a, vf b) { return a + b; }
KERN_INLINE vf vf_sub(vf a, vf b) { return a - b; }
KERN_INLINE vf vf_mul(vf a, vf b) { return a * b; }
KERN_INLINE vf vf_div(vf a, vf b) { return a / b; }
KERN_INLINE vf vf_max(vf a, vf b) { return a > b ? a : b; }
KERN_INLINE vf vf_min(vf a, vf b) { return a < b ? a : b; }
KERN_INLINE vf vf_fma(vf a, vf b, vf c) { return a * b + c; }
KERN_INLINE vf vf_fnma(vf a, vf b, vf c) { return c - a * b; }
KERN_INLINE float vf_hsum(vf v) { return v; }
KERN_INLINE float vf_hmax(vf v) { return v; }
KERN_INLINE vf vf_load_bf16(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
KERN_INLINE void vf_load_bf16_eo(const uint16_t *p, vf *even, vf *odd) {
    *even = vf_load_bf16(p);
    *odd = vf_load_bf16(p + 1);
}
KERN_INLINE vf vf_load_f16(const uint16_t *p) { return speed_dtype_f16_to_f32(*p); }
KERN_INLINE void vf_store_bf16(uint16_t *p, vf v) { *p = speed_dtype_f32_to_bf16(v); }
KERN_INLINE void vf_store_f16(uint16_t *p, vf v) { *p = speed_dtype_f32_to_f16(v); }
KERN_INLINE void vf_transpose(vf m[VN]) { (void)m; }

#endif

/* ---- shared helpers ------------------------------------------------------------------ */

/* exp(x): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial
 * (truncation < 1e-8 relative), p * 2^n applied in two steps so that results down to the
 * subnormal range underflow gradually. NaN propagates (the clamps keep it), +inf for
 * x > 88.73, 0 below -103.98. */
#if KERN_ISA == KERN_ISA_SCALAR
KERN_INLINE vf vf_exp(vf x) { return expf(x); }
#else
KERN_INLINE vf vf_exp(vf x) {
    x = vf_min(vf_set1(89.0f), vf_max(vf_set1(-104.0f), x));
    vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnma(n, vf_set1(0.693359375f), x);
    r = vf_fnma(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.0f / 5040.0f);
    p = vf_fma(p, r, vf_set1(1.0f / 720.0f));
    p = vf_fma(p, r, vf_set1(1.0f / 120.0f));
    p = vf_fma(p, r, vf_set1(1.0f / 24.0f));
    p = vf_fma(p, r, vf_set1(1.0f / 6.0f));
    p = vf_fma(p, r, vf_set1(0.5f));
    p = vf_fma(p, r, vf_set1(1.0f));
    p = vf_fma(p, r, vf_set1(1.0f));
    return vf_ldexp_round(p, n);
}
#endif

/* One element of a weight / cache row as f32. */
KERN_INLINE float dt_get(speed_dtype_t dt, const void *base, int64_t i) {
    switch (dt) {
    case SPEED_DTYPE_BF16: {
        uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    case SPEED_DTYPE_F16: return speed_dtype_f16_to_f32(((const uint16_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

/* VN elements starting at element i of a row in dt, as f32. */
KERN_INLINE vf dt_load(speed_dtype_t dt, const void *base, int64_t i) {
    switch (dt) {
    case SPEED_DTYPE_BF16: return vf_load_bf16((const uint16_t *)base + i);
    case SPEED_DTYPE_F16: return vf_load_f16((const uint16_t *)base + i);
    default: return vf_load((const float *)base + i);
    }
}

KERN_INLINE void dt_store(speed_dtype_t dt, void *base, int64_t i, vf v) {
    switch (dt) {
    case SPEED_DTYPE_BF16: vf_store_bf16((uint16_t *)base + i, v); break;
    case SPEED_DTYPE_F16: vf_store_f16((uint16_t *)base + i, v); break;
    default: vf_store((float *)base + i, v); break;
    }
}

KERN_INLINE void dt_set(speed_dtype_t dt, void *base, int64_t i, float v) {
    switch (dt) {
    case SPEED_DTYPE_BF16: ((uint16_t *)base)[i] = speed_dtype_f32_to_bf16(v); break;
    case SPEED_DTYPE_F16: ((uint16_t *)base)[i] = speed_dtype_f32_to_f16(v); break;
    default: ((float *)base)[i] = v; break;
    }
}

#endif /* SPEED_KERN_VEC_H */
