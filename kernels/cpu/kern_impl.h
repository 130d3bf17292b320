/* The fast CPU kernels, written once over kern_vec.h and compiled per ISA by kern_scalar.c,
 * kern_avx2.c and kern_avx512.c (each defines KERN_ISA and KERN_SUFFIX, then includes this).
 * See cpu_kernels.h for the contract of every function and the numerics. */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#include "kern_vec.h"

#define KCAT2_(a, b) a##_##b
#define KCAT2(a, b)  KCAT2_(a, b)
#define KFN(name)    KCAT2(name, KERN_SUFFIX)

/* Register blocking per ISA.
 *   GEMV: one weight row x up to GEMV_NX x rows, GEMV_ACC vector accumulators.
 *   GEMM: MR x rows by NR = NRV * VN weight rows (packed panel width).
 *   bi_gemv: VN weight rows x up to BI_NX x rows (accumulators next to a VN x VN transpose). */
#if KERN_ISA == KERN_ISA_AVX512
#define GEMV_NX  4
#define GEMV_ACC 8
#define GEMM_MR  6
#define GEMM_NRV 4
#define GEMM_KC  256
#define GEMM_NC  128
#define BI_NX    8
#elif KERN_ISA == KERN_ISA_AVX2
#define GEMV_NX  2
#define GEMV_ACC 4
#define GEMM_MR  6
#define GEMM_NRV 2
#define GEMM_KC  256
#define GEMM_NC  128
#define BI_NX    4
#else
#define GEMV_NX  4
#define GEMV_ACC 8
#define GEMM_MR  4
#define GEMM_NRV 4
#define GEMM_KC  256
#define GEMM_NC  64
#define BI_NX    8
#endif
#define GEMV_MAX_N 8
#define GEMM_NR    (GEMM_NRV * VN)

/* ==== conversions ===================================================================== */

static void KFN(to_f32)(speed_dtype_t dt, const void *src, float *dst, int64_t n) {
    int64_t i = 0;
    switch (dt) {
    case SPEED_DTYPE_BF16:
        for (; i + VN <= n; i += VN) vf_store(dst + i, vf_load_bf16((const uint16_t *)src + i));
        break;
    case SPEED_DTYPE_F16:
        for (; i + VN <= n; i += VN) vf_store(dst + i, vf_load_f16((const uint16_t *)src + i));
        break;
    default:
        if ((const float *)src != dst) memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    for (; i < n; i++) dst[i] = dt_get(dt, src, i);
}

static void KFN(from_f32)(speed_dtype_t dt, const float *src, void *dst, int64_t n) {
    int64_t i = 0;
    switch (dt) {
    case SPEED_DTYPE_BF16:
        for (; i + VN <= n; i += VN) vf_store_bf16((uint16_t *)dst + i, vf_load(src + i));
        break;
    case SPEED_DTYPE_F16:
        for (; i + VN <= n; i += VN) vf_store_f16((uint16_t *)dst + i, vf_load(src + i));
        break;
    default:
        if (src != (const float *)dst) memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    for (; i < n; i++) dt_set(dt, dst, i, src[i]);
}

/* ==== elementwise and rows ============================================================ */

static void KFN(add)(float *out, const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    for (; i + VN <= n; i += VN) vf_store(out + i, vf_add(vf_load(a + i), vf_load(b + i)));
    for (; i < n; i++) out[i] = a[i] + b[i];
}

/* silu(g) * u = g * u / (1 + exp(-g)); exp(-g) = inf for very negative g gives -0 / +0. */
static void KFN(swiglu)(float *out, const float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    for (; i + VN <= n; i += VN) {
        vf g = vf_load(gate + i), u = vf_load(up + i);
        vf e = vf_exp(vf_sub(vf_zero(), g));
        vf_store(out + i, vf_mul(vf_div(g, vf_add(vf_set1(1.0f), e)), u));
    }
    for (; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

KERN_INLINE void rmsnorm_scale_row(float *out, const float *x, const void *w, const speed_dtype_t wt, int64_t d,
                                   float scale) {
    vf s = vf_set1(scale);
    int64_t i = 0;
    for (; i + VN <= d; i += VN) vf_store(out + i, vf_mul(dt_load(wt, w, i), vf_mul(vf_load(x + i), s)));
    for (; i < d; i++) out[i] = dt_get(wt, w, i) * (x[i] * scale);
}

static void KFN(rmsnorm_row)(float *out, const float *x, const void *w, speed_dtype_t wt, int64_t d, float eps) {
    vf a0 = vf_zero(), a1 = vf_zero();
    int64_t i = 0;
    for (; i + 2 * VN <= d; i += 2 * VN) {
        vf v0 = vf_load(x + i), v1 = vf_load(x + i + VN);
        a0 = vf_fma(v0, v0, a0);
        a1 = vf_fma(v1, v1, a1);
    }
    for (; i + VN <= d; i += VN) {
        vf v0 = vf_load(x + i);
        a0 = vf_fma(v0, v0, a0);
    }
    float ss = vf_hsum(vf_add(a0, a1));
    for (; i < d; i++) ss += x[i] * x[i];
    /* as Hugging Face (and cpu-ref): f32 variance, 1/sqrt rounded to f32, x * inv, then * w */
    float variance = ss / (float)d;
    float scale = (float)(1.0 / sqrt((double)(variance + eps)));
    switch (wt) {
    case SPEED_DTYPE_BF16: rmsnorm_scale_row(out, x, w, SPEED_DTYPE_BF16, d, scale); break;
    case SPEED_DTYPE_F16: rmsnorm_scale_row(out, x, w, SPEED_DTYPE_F16, d, scale); break;
    default: rmsnorm_scale_row(out, x, w, SPEED_DTYPE_F32, d, scale); break;
    }
}

/* Rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with x1 = x[i], x2 = x[i + half]. */
static void KFN(rope_row)(float *x, int n_heads, int head_dim, const float *cs) {
    const int half = head_dim / 2;
    const float *c = cs, *s = cs + half;
    for (int h = 0; h < n_heads; h++) {
        float *x1 = x + (int64_t)h * head_dim, *x2 = x1 + half;
        int i = 0;
        for (; i + VN <= half; i += VN) {
            vf a = vf_load(x1 + i), b = vf_load(x2 + i), cv = vf_load(c + i), sv = vf_load(s + i);
            vf_store(x1 + i, vf_fnma(b, sv, vf_mul(a, cv)));
            vf_store(x2 + i, vf_fma(a, sv, vf_mul(b, cv)));
        }
        for (; i < half; i++) {
            float a = x1[i], b = x2[i];
            x1[i] = a * c[i] - b * s[i];
            x2[i] = b * c[i] + a * s[i];
        }
    }
}

/* ==== matmul, few rows ================================================================ */
/* Memory-bound: each weight row is read once and multiplied with all n (<= 8) x rows. For
 * bf16 weights x is repacked so that one 2*VN-element weight load splits into its even and
 * odd elements with a shift and a mask (no cross-lane conversion): xp row i holds, per chunk
 * of 2*VN columns, the VN even columns then the VN odd ones. */

KERN_INLINE int64_t gemv_kp(int64_t k) { return k / (2 * VN) * (2 * VN); }

static size_t KFN(gemv_xpack_floats)(const speed_cpu_mm_t *mm) {
    if (VN == 1 || mm->wtype != SPEED_DTYPE_BF16) return 0;
    return (size_t)mm->n * (size_t)gemv_kp(mm->k);
}

static void KFN(gemv_pack_x)(const speed_cpu_mm_t *mm, float *xp) {
    const int64_t kp = gemv_kp(mm->k);
    for (int64_t i = 0; i < mm->n; i++) {
        const float *x = mm->x + i * mm->ldx;
        float *d = xp + i * kp;
        for (int64_t p = 0; p < kp; p += 2 * VN)
            for (int l = 0; l < VN; l++) {
                d[p + l] = x[p + 2 * l];
                d[p + VN + l] = x[p + 2 * l + 1];
            }
    }
}

/* One weight row j times nx x rows starting at i0. Each thread walks its weight rows in order,
 * so it reads one sequential stream (several concurrent streams per thread measured ~30%
 * slower here: the prefetchers restart at every 4 KiB page of each stream). u independent
 * accumulator sets along k (even and odd halves apart for bf16) keep 2 * u * nx FMA chains in
 * flight. */
KERN_INLINE void gemv_row(const speed_cpu_mm_t *mm, int64_t j, int64_t i0, const int nx, const int u,
                          const speed_dtype_t wt) {
    const int64_t k = mm->k;
    const size_t es = wt == SPEED_DTYPE_F32 ? 4 : 2;
    const char *wrow = (const char *)mm->w + (size_t)(j * mm->ldw) * es;
    const float *xr[GEMV_NX];
    for (int i = 0; i < nx; i++) xr[i] = mm->x + (i0 + i) * mm->ldx;

    vf acc[GEMV_ACC]; /* [nx][2u]: small enough to stay in registers */
#define ACC(i, a) acc[(i)*2 * u + (a)]
    for (int a = 0; a < 2 * u * nx; a++) acc[a] = vf_zero();

    int64_t p = 0;
    if (wt == SPEED_DTYPE_BF16 && VN > 1) {
        const int64_t kp = gemv_kp(k);
        const float *xpr[GEMV_NX];
        for (int i = 0; i < nx; i++) xpr[i] = mm->xp + (i0 + i) * kp;
        for (; p + u * 2 * VN <= kp; p += u * 2 * VN)
            for (int uu = 0; uu < u; uu++) {
                const int64_t q = p + uu * 2 * VN;
                vf we, wo;
                vf_load_bf16_eo((const uint16_t *)wrow + q, &we, &wo);
                for (int i = 0; i < nx; i++) {
                    ACC(i, 2 * uu) = vf_fma(we, vf_load(xpr[i] + q), ACC(i, 2 * uu));
                    ACC(i, 2 * uu + 1) = vf_fma(wo, vf_load(xpr[i] + q + VN), ACC(i, 2 * uu + 1));
                }
            }
        for (; p < kp; p += 2 * VN) {
            vf we, wo;
            vf_load_bf16_eo((const uint16_t *)wrow + p, &we, &wo);
            for (int i = 0; i < nx; i++) {
                ACC(i, 0) = vf_fma(we, vf_load(xpr[i] + p), ACC(i, 0));
                ACC(i, 1) = vf_fma(wo, vf_load(xpr[i] + p + VN), ACC(i, 1));
            }
        }
    } else {
        for (; p + u * 2 * VN <= k; p += u * 2 * VN)
            for (int a = 0; a < 2 * u; a++) {
                const int64_t q = p + a * VN;
                vf w = dt_load(wt, wrow, q);
                for (int i = 0; i < nx; i++) ACC(i, a) = vf_fma(w, vf_load(xr[i] + q), ACC(i, a));
            }
        for (; p + VN <= k; p += VN) {
            vf w = dt_load(wt, wrow, p);
            for (int i = 0; i < nx; i++) ACC(i, 0) = vf_fma(w, vf_load(xr[i] + p), ACC(i, 0));
        }
    }
    for (int i = 0; i < nx; i++) {
        vf t = ACC(i, 0);
        for (int a = 1; a < 2 * u; a++) t = vf_add(t, ACC(i, a));
        float s = vf_hsum(t);
        for (int64_t q = p; q < k; q++) s += dt_get(wt, wrow, q) * xr[i][q];
        float *o = mm->out + (i0 + i) * mm->ldo + j;
        *o = mm->accumulate ? *o + s : s;
    }
#undef ACC
}

/* Weight row outer, blocks of x rows inner: a row is read from memory once and, for n > GEMV_NX,
 * re-read from L1 for the next block. */
KERN_INLINE void gemv_dt(const speed_cpu_mm_t *mm, int64_t j0, int64_t j1, const speed_dtype_t wt) {
    const int64_t n = mm->n;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t i0 = 0; i0 < n; i0 += GEMV_NX) {
            switch (n - i0 < GEMV_NX ? n - i0 : GEMV_NX) { /* u: 2 * u * nx accumulators fill GEMV_ACC */
            case 1: gemv_row(mm, j, i0, 1, GEMV_ACC / 2 >= 4 ? 4 : GEMV_ACC / 2, wt); break;
#if GEMV_NX >= 2
            case 2: gemv_row(mm, j, i0, 2, GEMV_ACC / 4 >= 2 ? 2 : 1, wt); break;
#endif
#if GEMV_NX >= 4
            case 3: gemv_row(mm, j, i0, 3, 1, wt); break;
            case 4: gemv_row(mm, j, i0, 4, 1, wt); break;
#endif
            default: break;
            }
        }
}

static void KFN(gemv)(const speed_cpu_mm_t *mm, int64_t j0, int64_t j1) {
    switch (mm->wtype) {
    case SPEED_DTYPE_BF16: gemv_dt(mm, j0, j1, SPEED_DTYPE_BF16); break;
    case SPEED_DTYPE_F16: gemv_dt(mm, j0, j1, SPEED_DTYPE_F16); break;
    default: gemv_dt(mm, j0, j1, SPEED_DTYPE_F32); break;
    }
}

/* ==== matmul, many rows: blocked FMA GEMM ============================================= */
/* Weights are packed (converted to f32) into panels of NR rows: panel[p][c] = w[j + c][p0 + p],
 * so one k step of the micro-kernel is NRV vector loads of the panel and MR broadcasts of x. */

static size_t KFN(gemm_pack_bytes)(int64_t nc, int64_t kc) {
    int64_t ncp = (nc + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
    return (size_t)ncp * (size_t)kc * sizeof(float);
}

KERN_INLINE void gemm_pack_dt(const speed_cpu_mm_t *mm, int64_t j0, int64_t nc, int64_t p0, int64_t kc, float *packed,
                              const speed_dtype_t wt) {
    const size_t es = wt == SPEED_DTYPE_F32 ? 4 : 2;
    for (int64_t jp = 0; jp < nc; jp += GEMM_NR) {
        float *panel = packed + jp * kc;
        for (int sub = 0; sub < GEMM_NRV; sub++) {
            const int64_t jr = j0 + jp + (int64_t)sub * VN; /* first weight row of this sub-panel */
            const int64_t rows = jr >= mm->m ? 0 : (mm->m - jr < VN ? mm->m - jr : VN);
            int64_t p = 0;
            if (rows == VN) {
                for (; p + VN <= kc; p += VN) {
                    vf t[VN];
                    for (int r = 0; r < VN; r++)
                        t[r] = dt_load(wt, (const char *)mm->w + (size_t)((jr + r) * mm->ldw) * es, p0 + p);
                    vf_transpose(t);
                    for (int c = 0; c < VN; c++) vf_store(panel + (p + c) * GEMM_NR + sub * VN, t[c]);
                }
            }
            for (; p < kc; p++)
                for (int r = 0; r < VN; r++)
                    panel[p * GEMM_NR + sub * VN + r] =
                        r < rows ? dt_get(wt, (const char *)mm->w + (size_t)((jr + r) * mm->ldw) * es, p0 + p) : 0.0f;
        }
    }
}

static void KFN(gemm_pack_w)(const speed_cpu_mm_t *mm, int64_t j0, int64_t nc, int64_t p0, int64_t kc, void *packed) {
    switch (mm->wtype) {
    case SPEED_DTYPE_BF16: gemm_pack_dt(mm, j0, nc, p0, kc, packed, SPEED_DTYPE_BF16); break;
    case SPEED_DTYPE_F16: gemm_pack_dt(mm, j0, nc, p0, kc, packed, SPEED_DTYPE_F16); break;
    default: gemm_pack_dt(mm, j0, nc, p0, kc, packed, SPEED_DTYPE_F32); break;
    }
}

/* C[mr][NR] (+)= A[mr][kc] · panel; c has row stride ldc and NR valid columns. */
KERN_INLINE void gemm_micro(const int mr, int64_t kc, const float *a, int64_t lda, const float *b, float *c,
                            int64_t ldc, bool load_c) {
    vf acc[GEMM_MR][GEMM_NRV];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < GEMM_NRV; v++) acc[i][v] = load_c ? vf_load(c + i * ldc + v * VN) : vf_zero();
    for (int64_t p = 0; p < kc; p++) {
        vf bv[GEMM_NRV];
        for (int v = 0; v < GEMM_NRV; v++) bv[v] = vf_load(b + p * GEMM_NR + v * VN);
        for (int i = 0; i < mr; i++) {
            vf av = vf_set1(a[i * lda + p]);
            for (int v = 0; v < GEMM_NRV; v++) acc[i][v] = vf_fma(av, bv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < GEMM_NRV; v++) vf_store(c + i * ldc + v * VN, acc[i][v]);
}

static void gemm_micro_any(int mr, int64_t kc, const float *a, int64_t lda, const float *b, float *c, int64_t ldc,
                           bool load_c) {
    switch (mr) {
#if GEMM_MR >= 6
    case 6: gemm_micro(6, kc, a, lda, b, c, ldc, load_c); break;
    case 5: gemm_micro(5, kc, a, lda, b, c, ldc, load_c); break;
#endif
    case 4: gemm_micro(4, kc, a, lda, b, c, ldc, load_c); break;
    case 3: gemm_micro(3, kc, a, lda, b, c, ldc, load_c); break;
    case 2: gemm_micro(2, kc, a, lda, b, c, ldc, load_c); break;
    default: gemm_micro(1, kc, a, lda, b, c, ldc, load_c); break;
    }
}

static void KFN(gemm_compute)(const speed_cpu_mm_t *mm, const void *xs, int64_t ldxs, const void *packed, int64_t i0,
                              int64_t i1, int64_t j0, int64_t nc, int64_t p0, int64_t kc, bool first) {
    const float *x = xs;
    const bool load_c = !first || mm->accumulate;
    for (int64_t jp = 0; jp < nc; jp += GEMM_NR) {
        const float *panel = (const float *)packed + jp * kc;
        const int64_t j = j0 + jp;
        const int64_t ncols = mm->m - j < GEMM_NR ? mm->m - j : GEMM_NR;
        for (int64_t i = i0; i < i1; i += GEMM_MR) {
            const int mr = (int)(i1 - i < GEMM_MR ? i1 - i : GEMM_MR);
            const float *a = x + i * ldxs + p0;
            if (ncols == GEMM_NR) {
                gemm_micro_any(mr, kc, a, ldxs, panel, mm->out + i * mm->ldo + j, mm->ldo, load_c);
            } else { /* right edge: go through a full-width tile */
                float tile[GEMM_MR * GEMM_NR] = {0};
                for (int r = 0; r < mr; r++)
                    for (int c = 0; c < GEMM_NR; c++)
                        tile[r * GEMM_NR + c] = load_c && c < ncols ? mm->out[(i + r) * mm->ldo + j + c] : 0.0f;
                gemm_micro_any(mr, kc, a, ldxs, panel, tile, GEMM_NR, true);
                for (int r = 0; r < mr; r++)
                    memcpy(mm->out + (i + r) * mm->ldo + j, tile + r * GEMM_NR, (size_t)ncols * sizeof(float));
            }
        }
    }
}

/* ==== matmul, few rows, batch-invariant: the GEMM's order per element ==================== */
/* The GEMM above computes every output element as one chain: acc = out (accumulate) or 0, then
 * acc = vf_fma(x[i][p], w[j][p], acc) for p = 0 .. k - 1 in order, with w converted to f32
 * exactly; the kc blocks hand acc on through out (stored and reloaded as f32, exact), so the
 * block boundaries change nothing. bi_gemv runs the same chain with the same operands for VN
 * weight rows at a time, transposing VN x VN blocks in registers as gemm_pack_dt does instead of
 * packing them to memory on every call, which was most of a few-row GEMM's time. */
KERN_INLINE void bi_tile_dt(const speed_cpu_mm_t *mm, int64_t j, int64_t j1, int64_t i0, const int nx,
                            const speed_dtype_t wt) {
    const size_t es = wt == SPEED_DTYPE_F32 ? 4 : 2;
    const int64_t k = mm->k;
    const int rows = mm->m - j < VN ? (int)(mm->m - j) : VN, ncols = j1 - j < VN ? (int)(j1 - j) : VN;
    const char *w = (const char *)mm->w + (size_t)(j * mm->ldw) * es;
    const float *x = mm->x + i0 * mm->ldx;
    float *o = mm->out + i0 * mm->ldo + j;
    float edge[VN];
    vf acc[BI_NX];
    for (int i = 0; i < nx; i++) {
        if (!mm->accumulate) {
            acc[i] = vf_zero();
        } else if (ncols == VN) {
            acc[i] = vf_load(o + i * mm->ldo);
        } else {
            memset(edge, 0, sizeof edge);
            memcpy(edge, o + i * mm->ldo, (size_t)ncols * sizeof(float));
            acc[i] = vf_load(edge);
        }
    }
    int64_t p = 0;
    if (rows == VN)
        for (; p + VN <= k; p += VN) {
            vf t[VN];
            for (int r = 0; r < VN; r++) t[r] = dt_load(wt, w + (size_t)(r * mm->ldw) * es, p);
            vf_transpose(t);
            for (int c = 0; c < VN; c++)
                for (int i = 0; i < nx; i++) acc[i] = vf_fma(vf_set1(x[i * mm->ldx + p + c]), t[c], acc[i]);
        }
    for (; p < k; p++) { /* the k tail, and every column of a tile with fewer than VN rows */
        for (int r = 0; r < VN; r++) edge[r] = r < rows ? dt_get(wt, w + (size_t)(r * mm->ldw) * es, p) : 0.0f;
        const vf b = vf_load(edge);
        for (int i = 0; i < nx; i++) acc[i] = vf_fma(vf_set1(x[i * mm->ldx + p]), b, acc[i]);
    }
    for (int i = 0; i < nx; i++) {
        if (ncols == VN) {
            vf_store(o + i * mm->ldo, acc[i]);
        } else {
            vf_store(edge, acc[i]);
            memcpy(o + i * mm->ldo, edge, (size_t)ncols * sizeof(float));
        }
    }
}

KERN_INLINE void bi_gemv_dt(const speed_cpu_mm_t *mm, int64_t j0, int64_t j1, const speed_dtype_t wt) {
    for (int64_t i0 = 0; i0 < mm->n; i0 += BI_NX) {
        const int64_t nx = mm->n - i0 < BI_NX ? mm->n - i0 : BI_NX;
        for (int64_t j = j0; j < j1; j += VN) switch (nx) {
            case 1: bi_tile_dt(mm, j, j1, i0, 1, wt); break;
            case 2: bi_tile_dt(mm, j, j1, i0, 2, wt); break;
            case 3: bi_tile_dt(mm, j, j1, i0, 3, wt); break;
#if BI_NX > 4
            case 4: bi_tile_dt(mm, j, j1, i0, 4, wt); break;
            case 5: bi_tile_dt(mm, j, j1, i0, 5, wt); break;
            case 6: bi_tile_dt(mm, j, j1, i0, 6, wt); break;
            case 7: bi_tile_dt(mm, j, j1, i0, 7, wt); break;
#endif
            default: bi_tile_dt(mm, j, j1, i0, BI_NX, wt); break;
            }
    }
}

static void KFN(bi_gemv)(const speed_cpu_mm_t *mm, int64_t j0, int64_t j1) {
    switch (mm->wtype) {
    case SPEED_DTYPE_BF16: bi_gemv_dt(mm, j0, j1, SPEED_DTYPE_BF16); break;
    case SPEED_DTYPE_F16: bi_gemv_dt(mm, j0, j1, SPEED_DTYPE_F16); break;
    default: bi_gemv_dt(mm, j0, j1, SPEED_DTYPE_F32); break;
    }
}

/* ==== attention ======================================================================= */
/* One item = nr query rows of one sequence x one kv head: QV = nr * group query vectors that
 * all read the same K and V entries, like a small GEMM (flash attention on a CPU). Per tile of
 * T entries:
 *   K tile, converted to f32 and transposed to Kt[d][t]   S[qv][t] = Σ_d Qs[qv][d] Kt[d][t]
 *     (broadcast q, vector over t: no horizontal sums);
 *   online softmax per query vector (entries past the row's n_visible masked to -inf);
 *   V tile converted to Vt[t][d]                           O[qv][d] = corr O + Σ_t P[qv][t] Vt[t][d].
 * Query vector qv = row i * group + g; scale is folded into Qs. head_dim is padded to a multiple
 * of VN with zeros in Qs, Kt, Vt, O so that the inner loops are whole vectors. */

#if KERN_ISA == KERN_ISA_AVX512
#define ATTN_MR 4
#elif KERN_ISA == KERN_ISA_AVX2
#define ATTN_MR 2
#else
#define ATTN_MR 2
#endif
#define ATTN_T  SPEED_CPU_ATTN_TILE
#define ATTN_TV (ATTN_T / VN) /* vectors per tile row */
#define ATTN_DV 4             /* head_dim vectors per pass of the P·V kernel */

/* S[q0 .. q0+mr)[0 .. T) = Qs · Kt over hdp dims. */
KERN_INLINE void attn_qk(const int mr, const float *qs, int hdp, const float *kt, float *s) {
    vf acc[ATTN_MR][ATTN_TV];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < ATTN_TV; v++) acc[i][v] = vf_zero();
    for (int d = 0; d < hdp; d++) {
        vf kv[ATTN_TV];
        for (int v = 0; v < ATTN_TV; v++) kv[v] = vf_load(kt + d * ATTN_T + v * VN);
        for (int i = 0; i < mr; i++) {
            vf q = vf_set1(qs[i * hdp + d]);
            for (int v = 0; v < ATTN_TV; v++) acc[i][v] = vf_fma(q, kv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < ATTN_TV; v++) vf_store(s + i * ATTN_T + v * VN, acc[i][v]);
}

/* O[q0 .. q0+mr)[d0 .. d0 + dv*VN) = corr * O + P · Vt over nt entries. */
KERN_INLINE void attn_pv(const int mr, const int dv, const float *p, const float *corr, int nt, const float *vt,
                         int hdp, float *o) {
    vf acc[ATTN_MR][ATTN_DV];
    for (int i = 0; i < mr; i++) {
        vf c = vf_set1(corr[i]);
        for (int v = 0; v < dv; v++) acc[i][v] = vf_mul(vf_load(o + i * hdp + v * VN), c);
    }
    for (int t = 0; t < nt; t++) {
        vf vv[ATTN_DV];
        for (int v = 0; v < dv; v++) vv[v] = vf_load(vt + t * hdp + v * VN);
        for (int i = 0; i < mr; i++) {
            vf pv = vf_set1(p[i * ATTN_T + t]);
            for (int v = 0; v < dv; v++) acc[i][v] = vf_fma(pv, vv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < dv; v++) vf_store(o + i * hdp + v * VN, acc[i][v]);
}

static void attn_qk_any(int mr, const float *qs, int hdp, const float *kt, float *s) {
    switch (mr) {
#if ATTN_MR >= 4
    case 4: attn_qk(4, qs, hdp, kt, s); break;
    case 3: attn_qk(3, qs, hdp, kt, s); break;
#endif
    case 2: attn_qk(2, qs, hdp, kt, s); break;
    default: attn_qk(1, qs, hdp, kt, s); break;
    }
}

static void attn_pv_any(int mr, int dv, const float *p, const float *corr, int nt, const float *vt, int hdp, float *o) {
#define PV_DV(MR)                                            \
    switch (dv) {                                            \
    case 4: attn_pv(MR, 4, p, corr, nt, vt, hdp, o); break;  \
    case 3: attn_pv(MR, 3, p, corr, nt, vt, hdp, o); break;  \
    case 2: attn_pv(MR, 2, p, corr, nt, vt, hdp, o); break;  \
    default: attn_pv(MR, 1, p, corr, nt, vt, hdp, o); break; \
    }
    switch (mr) {
#if ATTN_MR >= 4
    case 4: PV_DV(4); break;
    case 3: PV_DV(3); break;
#endif
    case 2: PV_DV(2); break;
    default: PV_DV(1); break;
    }
#undef PV_DV
}

KERN_INLINE void attn_dt(const speed_cpu_attn_t *a, int64_t r0, int nr, int h, int32_t e0, int32_t e1, float *scratch,
                         float *part, const speed_dtype_t dt) {
    const speed_kv_layer_t *kv = a->kv;
    const int hd = kv->head_dim, G = a->group, B = kv->block_tokens;
    const int hdp = (hd + VN - 1) / VN * VN, hdv = hd / VN * VN, nq = nr * G;
    const size_t es = speed_dtype_size(dt);
    float *qs = scratch;                   /* [nq][hdp] q * scale */
    float *o = qs + (size_t)nq * hdp;      /* [nq][hdp] */
    float *sc = o + (size_t)nq * hdp;      /* [nq][T] scores, then probabilities */
    float *mx = sc + (size_t)nq * ATTN_T;  /* [nq] running max */
    float *lsum = mx + nq;                 /* [nq] running sum */
    float *corr = lsum + nq;               /* [nq] rescale of this tile */
    float *kt = corr + nq;                 /* [hdp][T] */
    float *vt = kt + (size_t)hdp * ATTN_T; /* [T][hdp] */
    const char *kp[ATTN_T];
    int32_t nvis[SPEED_CPU_ATTN_QV]; /* per row: end of its entries (<= e1) */

    int32_t emax = e0;
    for (int i = 0; i < nr; i++) {
        int32_t nv = a->rows->n_visible[r0 + i];
        nvis[i] = nv < e1 ? nv : e1;
        if (nvis[i] > emax) emax = nvis[i];
    }
    const vf vscale = vf_set1(a->scale);
    for (int i = 0; i < nr; i++) {
        const float *qrow = a->q + (r0 + i) * a->ldq + (int64_t)h * G * hd;
        for (int g = 0; g < G; g++) {
            float *qd = qs + (size_t)(i * G + g) * hdp;
            int d = 0;
            for (; d < hdv; d += VN) vf_store(qd + d, vf_mul(vf_load(qrow + g * hd + d), vscale));
            for (; d < hd; d++) qd[d] = qrow[g * hd + d] * a->scale;
            for (; d < hdp; d++) qd[d] = 0.0f;
        }
    }
    memset(o, 0, (size_t)nq * hdp * sizeof(float));
    for (int q = 0; q < nq; q++) {
        mx[q] = -INFINITY;
        lsum[q] = 0.0f;
    }

    const int32_t *bt = a->rows->block_table[r0];
    const size_t head_off = (size_t)h * hd * es, tok_bytes = (size_t)speed_kv_layer_slot_heads(kv) * hd * es;
    const size_t row_bytes = (size_t)hd * es;
    /* K/V addresses of the next tile are computed (block by block, no division per entry) and
     * prefetched one tile ahead: the entries of one kv head are scattered (slot_heads interleaved
     * per token, V a block stride away), which the hardware prefetchers do not follow well. */
    const char *kpn[ATTN_T];
    int32_t eb = e0 / B, eo = e0 % B; /* block and offset of the next entry to address */
    int ntn = 0;
#define ATTN_ADDR_TILE(t0_)                                                                                            \
    do {                                                                                                               \
        ntn = emax - (t0_) < ATTN_T ? emax - (t0_) : ATTN_T;                                                           \
        for (int t = 0; t < ntn; t++) {                                                                                \
            kpn[t] = (const char *)kv->k_base + (size_t)bt[eb] * kv->block_stride + (size_t)eo * tok_bytes + head_off; \
            for (size_t l = 0; l < row_bytes; l += 64) {                                                               \
                __builtin_prefetch(kpn[t] + l, 0, 3);                                                                  \
                __builtin_prefetch(kpn[t] + kv->v_offset + l, 0, 3);                                                   \
            }                                                                                                          \
            if (++eo == B) {                                                                                           \
                eo = 0;                                                                                                \
                eb++;                                                                                                  \
            }                                                                                                          \
        }                                                                                                              \
    } while (0)
    if (e0 < emax) ATTN_ADDR_TILE(e0);
    for (int32_t t0 = e0; t0 < emax; t0 += ATTN_T) {
        const int nt = ntn;
        memcpy(kp, kpn, (size_t)nt * sizeof kp[0]);
        if (t0 + ATTN_T < emax) ATTN_ADDR_TILE(t0 + ATTN_T);
        /* Kt[d][t]: VN x VN blocks transposed in registers; entries past nt are zeros */
        for (int tb = 0; tb < ATTN_T; tb += VN) {
            int d = 0;
            for (; d < hdv; d += VN) {
                vf blk[VN];
                for (int t = 0; t < VN; t++) blk[t] = tb + t < nt ? dt_load(dt, kp[tb + t], d) : vf_zero();
                vf_transpose(blk);
                for (int c = 0; c < VN; c++) vf_store(kt + (d + c) * ATTN_T + tb, blk[c]);
            }
            for (; d < hdp; d++)
                for (int t = 0; t < VN; t++)
                    kt[d * ATTN_T + tb + t] = tb + t < nt && d < hd ? dt_get(dt, kp[tb + t], d) : 0.0f;
        }
        for (int t = 0; t < nt; t++) {
            float *vr = vt + (size_t)t * hdp;
            const char *vsrc = kp[t] + kv->v_offset;
            int d = 0;
            for (; d < hdv; d += VN) vf_store(vr + d, dt_load(dt, vsrc, d));
            for (; d < hd; d++) vr[d] = dt_get(dt, vsrc, d);
            for (; d < hdp; d++) vr[d] = 0.0f;
        }
        /* scores */
        for (int q0 = 0; q0 < nq; q0 += ATTN_MR)
            attn_qk_any(nq - q0 < ATTN_MR ? nq - q0 : ATTN_MR, qs + (size_t)q0 * hdp, hdp, kt,
                        sc + (size_t)q0 * ATTN_T);
        /* online softmax, one rescale per tile and query vector */
        for (int q = 0; q < nq; q++) {
            float *s = sc + (size_t)q * ATTN_T;
            const int valid = nvis[q / G] - t0; /* entries of this row in the tile */
            for (int t = valid < 0 ? 0 : valid; t < ATTN_T; t++) s[t] = -INFINITY;
            vf m = vf_set1(-INFINITY);
            for (int t = 0; t < ATTN_T; t += VN) m = vf_max(m, vf_load(s + t));
            float mt = vf_hmax(m);
            float mnew = mx[q] > mt ? mx[q] : mt;
            if (mnew == -INFINITY) { /* nothing visible yet for this row */
                corr[q] = 1.0f;
                memset(s, 0, ATTN_T * sizeof(float));
                continue;
            }
            corr[q] = expf(mx[q] - mnew); /* 0 on the first visible tile */
            vf vm = vf_set1(mnew), sum = vf_zero();
            for (int t = 0; t < ATTN_T; t += VN) {
                vf pv = vf_exp(vf_sub(vf_load(s + t), vm));
                vf_store(s + t, pv);
                sum = vf_add(sum, pv);
            }
            lsum[q] = lsum[q] * corr[q] + vf_hsum(sum);
            mx[q] = mnew;
        }
        /* O = corr O + P V */
        for (int d0 = 0; d0 < hdp; d0 += ATTN_DV * VN) {
            const int dv = (hdp - d0) / VN < ATTN_DV ? (hdp - d0) / VN : ATTN_DV;
            for (int q0 = 0; q0 < nq; q0 += ATTN_MR)
                attn_pv_any(nq - q0 < ATTN_MR ? nq - q0 : ATTN_MR, dv, sc + (size_t)q0 * ATTN_T, corr + q0, nt, vt + d0,
                            hdp, o + (size_t)q0 * hdp + d0);
        }
    }

#undef ATTN_ADDR_TILE
    if (part) { /* nr == 1 */
        const size_t stride = (size_t)hd + 2;
        for (int g = 0; g < G; g++) {
            float *pg = part + g * stride;
            pg[0] = mx[g];
            pg[1] = lsum[g];
            memcpy(pg + 2, o + (size_t)g * hdp, (size_t)hd * sizeof(float));
        }
        return;
    }
    for (int q = 0; q < nq; q++) {
        float *orow = a->out + (r0 + q / G) * a->ldo + ((int64_t)h * G + q % G) * hd;
        const float inv = lsum[q] > 0.0f ? 1.0f / lsum[q] : 0.0f; /* no visible entry: zeros */
        const vf vi = vf_set1(inv);
        const float *oq = o + (size_t)q * hdp;
        int d = 0;
        for (; d < hdv; d += VN) vf_store(orow + d, vf_mul(vf_load(oq + d), vi));
        for (; d < hd; d++) orow[d] = oq[d] * inv;
    }
}

static void KFN(attn)(const speed_cpu_attn_t *a, int64_t r0, int nr, int h, int32_t e0, int32_t e1, float *scratch,
                      float *part) {
    switch (a->kv->dtype) {
    case SPEED_DTYPE_BF16: attn_dt(a, r0, nr, h, e0, e1, scratch, part, SPEED_DTYPE_BF16); break;
    case SPEED_DTYPE_F16: attn_dt(a, r0, nr, h, e0, e1, scratch, part, SPEED_DTYPE_F16); break;
    default: attn_dt(a, r0, nr, h, e0, e1, scratch, part, SPEED_DTYPE_F32); break;
    }
}

/* ==== top-k and log-sum-exp ============================================================ */

static float KFN(max_row)(const float *x, int64_t n) {
    int64_t i = 0;
    float m = -INFINITY;
    if (n >= 4 * VN) {
        vf m0 = vf_load(x), m1 = vf_load(x + VN), m2 = vf_load(x + 2 * VN), m3 = vf_load(x + 3 * VN);
        for (i = 4 * VN; i + 4 * VN <= n; i += 4 * VN) {
            m0 = vf_max(m0, vf_load(x + i));
            m1 = vf_max(m1, vf_load(x + i + VN));
            m2 = vf_max(m2, vf_load(x + i + 2 * VN));
            m3 = vf_max(m3, vf_load(x + i + 3 * VN));
        }
        m = vf_hmax(vf_max(vf_max(m0, m1), vf_max(m2, m3)));
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Block of values summed in fp32 lanes before the block's sum is added in double. */
#define SUM_EXP_BLOCK 2048

static double KFN(sum_exp_row)(const float *x, int64_t n, float shift) {
    const vf s = vf_set1(shift);
    double total = 0.0;
    for (int64_t b = 0; b < n; b += SUM_EXP_BLOCK) {
        const int64_t e = b + SUM_EXP_BLOCK < n ? b + SUM_EXP_BLOCK : n;
        vf a0 = vf_zero(), a1 = vf_zero();
        int64_t i = b;
        for (; i + 2 * VN <= e; i += 2 * VN) {
            a0 = vf_add(a0, vf_exp(vf_sub(vf_load(x + i), s)));
            a1 = vf_add(a1, vf_exp(vf_sub(vf_load(x + i + VN), s)));
        }
        float part = vf_hsum(vf_add(a0, a1));
        for (; i < e; i++) part += expf(x[i] - shift);
        total += (double)part;
    }
    return total;
}

static int64_t KFN(next_above)(const float *x, int64_t i, int64_t n, float thr) {
    for (; i + 4 * VN <= n; i += 4 * VN) {
        vf m = vf_max(vf_max(vf_load(x + i), vf_load(x + i + VN)),
                      vf_max(vf_load(x + i + 2 * VN), vf_load(x + i + 3 * VN)));
        if (!(vf_hmax(m) > thr)) continue;
        for (int64_t j = i; j < i + 4 * VN; j++)
            if (x[j] > thr) return j;
    }
    for (; i < n; i++)
        if (x[i] > thr) return i;
    return n;
}

/* ==== the table ======================================================================= */

const speed_cpu_kernels_t KCAT2(speed_cpu_kernels, KERN_SUFFIX) =
    {
        .isa = KERN_ISA_ENUM,
        .gemv_max_n = GEMV_MAX_N,
        .gemv_xpack_floats = KFN(gemv_xpack_floats),
        .gemv_pack_x = KFN(gemv_pack_x),
        .gemv = KFN(gemv),
        .bi_gemv = KFN(bi_gemv),
        .gemm =
            {
                [SPEED_DTYPE_F32] = {GEMM_NC, GEMM_KC, NULL, NULL, 0, KFN(gemm_pack_bytes), KFN(gemm_pack_w),
                                     KFN(gemm_compute)},
                [SPEED_DTYPE_BF16] = {GEMM_NC, GEMM_KC, NULL, NULL, 0, KFN(gemm_pack_bytes), KFN(gemm_pack_w),
                                      KFN(gemm_compute)},
                [SPEED_DTYPE_F16] = {GEMM_NC, GEMM_KC, NULL, NULL, 0, KFN(gemm_pack_bytes), KFN(gemm_pack_w),
                                     KFN(gemm_compute)},
            },
        .attn = KFN(attn),
        .rmsnorm_row = KFN(rmsnorm_row),
        .rope_row = KFN(rope_row),
        .swiglu = KFN(swiglu),
        .add = KFN(add),
        .to_f32 = KFN(to_f32),
        .from_f32 = KFN(from_f32),
        .max_row = KFN(max_row),
        .sum_exp_row = KFN(sum_exp_row),
        .next_above = KFN(next_above),
};
