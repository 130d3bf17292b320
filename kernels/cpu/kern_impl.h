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
#define KCAT2(a, b) KCAT2_(a, b)
#define KFN(name) KCAT2(name, KERN_SUFFIX)

/* Register blocking per ISA.
 *   GEMV: one weight row x up to GEMV_NX x rows, GEMV_ACC vector accumulators.
 *   GEMM: MR x rows by NR = NRV * VN weight rows (packed panel width). */
#if KERN_ISA == KERN_ISA_AVX512
#define GEMV_NX 4
#define GEMV_ACC 8
#define GEMM_MR 6
#define GEMM_NRV 4
#define GEMM_KC 256
#define GEMM_NC 128
#elif KERN_ISA == KERN_ISA_AVX2
#define GEMV_NX 2
#define GEMV_ACC 4
#define GEMM_MR 6
#define GEMM_NRV 2
#define GEMM_KC 256
#define GEMM_NC 128
#else
#define GEMV_NX 4
#define GEMV_ACC 8
#define GEMM_MR 4
#define GEMM_NRV 4
#define GEMM_KC 256
#define GEMM_NC 64
#endif
#define GEMV_MAX_N 8
#define GEMM_NR (GEMM_NRV * VN)

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
#define ACC(i, a) acc[(i) * 2 * u + (a)]
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

KERN_INLINE void gemm_pack_dt(const speed_cpu_mm_t *mm, int64_t j0, int64_t nc, int64_t p0, int64_t kc,
                              float *packed, const speed_dtype_t wt) {
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

static void KFN(gemm_pack_w)(const speed_cpu_mm_t *mm, int64_t j0, int64_t nc, int64_t p0, int64_t kc,
                             void *packed) {
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

static void KFN(gemm_compute)(const speed_cpu_mm_t *mm, const void *xs, int64_t ldxs, const void *packed,
                              int64_t i0, int64_t i1, int64_t j0, int64_t nc, int64_t p0, int64_t kc, bool first) {
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

/* ==== attention ======================================================================= */
/* One item = one query row x one kv head (its `group` query heads) x a range of entries,
 * processed in tiles of SPEED_CPU_ATTN_TILE entries: scores for the tile, one online-softmax
 * rescale per tile, then the V accumulation streaming the tile once per head_dim chunk. */

#define ATTN_GB 8 /* query heads held in registers at once */

KERN_INLINE void attn_dt(const speed_cpu_attn_t *a, int64_t r, int h, int32_t e0, int32_t e1, float *scratch,
                         float *part, const speed_dtype_t dt) {
    const speed_kv_layer_t *kv = a->kv;
    const int hd = kv->head_dim, G = a->group, B = kv->block_tokens;
    const size_t es = speed_dtype_size(dt);
    const int hdv = hd / VN * VN;
    enum { T = SPEED_CPU_ATTN_TILE };
    float *qs = scratch;                 /* [G][hd] q * scale */
    float *acc = qs + (size_t)G * hd;    /* [G][hd] */
    float *sc = acc + (size_t)G * hd;    /* [G][T] scores, then probabilities */
    float *mx = sc + (size_t)G * T;      /* [G] */
    float *lsum = mx + G;                /* [G] */
    const char *kp[T];

    const float *qrow = a->q + r * a->ldq + (int64_t)h * G * hd;
    const vf vscale = vf_set1(a->scale);
    for (int g = 0; g < G; g++) {
        int d = 0;
        for (; d < hdv; d += VN) vf_store(qs + g * hd + d, vf_mul(vf_load(qrow + g * hd + d), vscale));
        for (; d < hd; d++) qs[g * hd + d] = qrow[g * hd + d] * a->scale;
        mx[g] = -INFINITY;
        lsum[g] = 0.0f;
    }
    memset(acc, 0, (size_t)G * hd * sizeof(float));

    const int32_t *bt = a->rows->block_table[r];
    const size_t head_off = (size_t)h * hd * es, tok_bytes = (size_t)kv->n_kv_heads * hd * es;
    for (int32_t t0 = e0; t0 < e1; t0 += T) {
        const int nt = e1 - t0 < T ? e1 - t0 : T;
        for (int t = 0; t < nt; t++) {
            const int32_t e = t0 + t;
            kp[t] = (const char *)kv->k_base + (size_t)bt[e / B] * kv->block_stride + (size_t)(e % B) * tok_bytes +
                    head_off;
        }
        /* scores */
        for (int g0 = 0; g0 < G; g0 += ATTN_GB) {
            const int gn = G - g0 < ATTN_GB ? G - g0 : ATTN_GB;
            for (int t = 0; t < nt; t++) {
                vf s[ATTN_GB];
                for (int g = 0; g < gn; g++) s[g] = vf_zero();
                int d = 0;
                for (; d < hdv; d += VN) {
                    vf kvec = dt_load(dt, kp[t], d);
                    for (int g = 0; g < gn; g++) s[g] = vf_fma(vf_load(qs + (g0 + g) * hd + d), kvec, s[g]);
                }
                for (int g = 0; g < gn; g++) {
                    float v = vf_hsum(s[g]);
                    for (int dd = d; dd < hd; dd++) v += qs[(g0 + g) * hd + dd] * dt_get(dt, kp[t], dd);
                    sc[(g0 + g) * T + t] = v;
                }
            }
        }
        /* online softmax, one rescale per tile */
        const int ntv = (nt + VN - 1) / VN * VN;
        for (int g = 0; g < G; g++) {
            float *s = sc + g * T;
            for (int t = nt; t < ntv; t++) s[t] = -INFINITY;
            vf m = vf_set1(-INFINITY);
            for (int t = 0; t < ntv; t += VN) m = vf_max(m, vf_load(s + t));
            float mt = vf_hmax(m);
            float mnew = mx[g] > mt ? mx[g] : mt;
            float corr = expf(mx[g] - mnew); /* 0 on the first tile (-inf) */
            vf vm = vf_set1(mnew), sum = vf_zero();
            for (int t = 0; t < ntv; t += VN) {
                vf pv = vf_exp(vf_sub(vf_load(s + t), vm));
                vf_store(s + t, pv);
                sum = vf_add(sum, pv);
            }
            lsum[g] = lsum[g] * corr + vf_hsum(sum);
            mx[g] = mnew;
            if (corr != 1.0f) {
                vf vc = vf_set1(corr);
                float *ag = acc + g * hd;
                int d = 0;
                for (; d < hdv; d += VN) vf_store(ag + d, vf_mul(vf_load(ag + d), vc));
                for (; d < hd; d++) ag[d] *= corr;
            }
        }
        /* acc += P · V */
        for (int g0 = 0; g0 < G; g0 += ATTN_GB) {
            const int gn = G - g0 < ATTN_GB ? G - g0 : ATTN_GB;
            int d = 0;
            for (; d < hdv; d += VN) {
                vf av[ATTN_GB];
                for (int g = 0; g < gn; g++) av[g] = vf_load(acc + (g0 + g) * hd + d);
                for (int t = 0; t < nt; t++) {
                    vf vv = dt_load(dt, kp[t] + kv->v_offset, d);
                    for (int g = 0; g < gn; g++) av[g] = vf_fma(vf_set1(sc[(g0 + g) * T + t]), vv, av[g]);
                }
                for (int g = 0; g < gn; g++) vf_store(acc + (g0 + g) * hd + d, av[g]);
            }
            for (; d < hd; d++)
                for (int t = 0; t < nt; t++) {
                    float vv = dt_get(dt, kp[t] + kv->v_offset, d);
                    for (int g = 0; g < gn; g++) acc[(g0 + g) * hd + d] += sc[(g0 + g) * T + t] * vv;
                }
        }
    }

    if (part) {
        const size_t stride = (size_t)hd + 2;
        for (int g = 0; g < G; g++) {
            float *pg = part + g * stride;
            pg[0] = mx[g];
            pg[1] = lsum[g];
            memcpy(pg + 2, acc + g * hd, (size_t)hd * sizeof(float));
        }
        return;
    }
    float *orow = a->out + r * a->ldo + (int64_t)h * G * hd;
    for (int g = 0; g < G; g++) {
        const float inv = lsum[g] > 0.0f ? 1.0f / lsum[g] : 0.0f;
        const vf vi = vf_set1(inv);
        int d = 0;
        for (; d < hdv; d += VN) vf_store(orow + g * hd + d, vf_mul(vf_load(acc + g * hd + d), vi));
        for (; d < hd; d++) orow[g * hd + d] = acc[g * hd + d] * inv;
    }
}

static void KFN(attn)(const speed_cpu_attn_t *a, int64_t r, int h, int32_t e0, int32_t e1, float *scratch,
                      float *part) {
    switch (a->kv->dtype) {
    case SPEED_DTYPE_BF16: attn_dt(a, r, h, e0, e1, scratch, part, SPEED_DTYPE_BF16); break;
    case SPEED_DTYPE_F16: attn_dt(a, r, h, e0, e1, scratch, part, SPEED_DTYPE_F16); break;
    default: attn_dt(a, r, h, e0, e1, scratch, part, SPEED_DTYPE_F32); break;
    }
}

/* ==== the table ======================================================================= */

const speed_cpu_kernels_t KCAT2(speed_cpu_kernels, KERN_SUFFIX) = {
    .isa = KERN_ISA_ENUM,
    .gemv_max_n = GEMV_MAX_N,
    .gemv_xpack_floats = KFN(gemv_xpack_floats),
    .gemv_pack_x = KFN(gemv_pack_x),
    .gemv = KFN(gemv),
    .gemm = {
        [SPEED_DTYPE_F32] = {GEMM_NC, GEMM_KC, NULL, NULL, 0, KFN(gemm_pack_bytes), KFN(gemm_pack_w), KFN(gemm_compute)},
        [SPEED_DTYPE_BF16] = {GEMM_NC, GEMM_KC, NULL, NULL, 0, KFN(gemm_pack_bytes), KFN(gemm_pack_w), KFN(gemm_compute)},
        [SPEED_DTYPE_F16] = {GEMM_NC, GEMM_KC, NULL, NULL, 0, KFN(gemm_pack_bytes), KFN(gemm_pack_w), KFN(gemm_compute)},
    },
    .attn = KFN(attn),
    .rmsnorm_row = KFN(rmsnorm_row),
    .rope_row = KFN(rope_row),
    .swiglu = KFN(swiglu),
    .add = KFN(add),
    .to_f32 = KFN(to_f32),
    .from_f32 = KFN(from_f32),
};
