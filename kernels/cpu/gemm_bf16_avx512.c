/* GEMM for bf16 weights with AVX512_BF16 (vdpbf16ps): out[n][m] (+)= x[n][k] · w[m][k]ᵀ.
 *
 * vdpbf16ps multiplies pairs of bf16 and adds both products to an f32 lane, so the k
 * dimension is consumed two at a time:
 *   - x rows are converted once per matmul to bf16 (round to nearest even) with zero padding
 *     to a multiple of 32 columns; a 32-bit broadcast of x[i][2p .. 2p+1] is one operand;
 *   - weights are packed per block of nc rows x kc columns into panels of NR = 64 rows laid out
 *     [kc/2][64] pairs, so one k-pair step is four 64-byte loads; packing is a 16 x 16 transpose
 *     of 32-bit pairs (masked loads zero the k tail and the rows past m);
 *   - the micro-kernel keeps MR x 4 = 24 zmm accumulators: per k pair 6 broadcasts, 4 loads and
 *     24 vdpbf16ps (64 flops each).
 * speed_cpu_gemv_bf16_avx512 is the few-row (decode batch) counterpart: every weight row is
 * read once and multiplied with up to 16 converted x rows by vdpbf16ps.
 * Rounding x to bf16 is the only deviation from the fp32 reference (see cpu_kernels.h).
 * Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; only called when
 * speed_cpu_isa_detect() reports SPEED_CPU_ISA_AVX512_BF16.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

#define MR  6
#define NRV 4
#define NR  (NRV * 16)
#define KC  256
#define NC  128

#define KINLINE static inline __attribute__((always_inline))

static int64_t bf16_xc_cols(int64_t k) { return (k + 31) / 32 * 32; }

static void bf16_convert_x(const speed_cpu_mm_t *mm, int64_t i0, int64_t i1, void *xc, int64_t ldxc) {
    const int64_t k = mm->k;
    for (int64_t i = i0; i < i1; i++) {
        const float *x = mm->x + i * mm->ldx;
        uint16_t *d = (uint16_t *)xc + i * ldxc;
        for (int64_t p = 0; p < ldxc; p += 32) {
            __m512 lo, hi;
            if (p + 32 <= k) {
                lo = _mm512_loadu_ps(x + p);
                hi = _mm512_loadu_ps(x + p + 16);
            } else {
                int64_t rem = k - p; /* may be <= 0 */
                __mmask16 mlo = rem >= 16 ? 0xffff : rem > 0 ? (__mmask16)((1u << rem) - 1) : 0;
                __mmask16 mhi = rem >= 32 ? 0xffff : rem > 16 ? (__mmask16)((1u << (rem - 16)) - 1) : 0;
                lo = _mm512_maskz_loadu_ps(mlo, x + p);
                hi = _mm512_maskz_loadu_ps(mhi, x + p + 16);
            }
            _mm512_storeu_si512((void *)(d + p), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

static size_t bf16_pack_bytes(int64_t nc, int64_t kc) {
    int64_t ncp = (nc + NR - 1) / NR * NR, kcp = (kc + 1) / 2 * 2;
    return (size_t)ncp * (size_t)kcp * sizeof(uint16_t);
}

/* 16 x 16 transpose of 32-bit elements. */
KINLINE void tr16(__m512i r[16]) {
    __m512i t[16];
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
    for (int j = 0; j < 4; j++) {
        __m512i u0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);
        __m512i u1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xee);
        __m512i u2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        __m512i u3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xee);
        t[0 + j] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Panel layout: packed[(jp / NR) * kcp * NR/2 ... ] as uint32 pairs [kcp / 2][NR]. */
static void bf16_pack_w(const speed_cpu_mm_t *mm, int64_t j0, int64_t nc, int64_t p0, int64_t kc, void *packed) {
    const int64_t kcp = (kc + 1) / 2 * 2, npairs = kcp / 2;
    const uint16_t *w = mm->w;
    for (int64_t jp = 0; jp < nc; jp += NR) {
        uint32_t *panel = (uint32_t *)packed + jp * npairs;
        for (int sub = 0; sub < NRV; sub++) {
            const int64_t jr = j0 + jp + (int64_t)sub * 16;
            const int64_t rows = jr >= mm->m ? 0 : (mm->m - jr < 16 ? mm->m - jr : 16);
            for (int64_t p = 0; p < kcp; p += 32) {
                const int64_t rem = kc - p;
                const __mmask32 mk = rem >= 32 ? 0xffffffffu : (__mmask32)((1u << rem) - 1);
                __m512i r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = i < rows ? _mm512_maskz_loadu_epi16(mk, w + (jr + i) * mm->ldw + p0 + p)
                                    : _mm512_setzero_si512();
                tr16(r);
                /* r[c] = pair (p/2 + c) of the 16 rows; pairs past kcp/2 are not stored */
                const int64_t nstore = npairs - p / 2 < 16 ? npairs - p / 2 : 16;
                for (int c = 0; c < nstore; c++)
                    _mm512_storeu_si512((void *)(panel + (p / 2 + c) * NR + sub * 16), r[c]);
            }
        }
    }
}

KINLINE void micro(const int mr, int64_t npairs, const uint16_t *a, int64_t lda, const uint32_t *b, float *c,
                   int64_t ldc, bool load_c) {
    __m512 acc[MR][NRV];
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NRV; v++) acc[i][v] = load_c ? _mm512_loadu_ps(c + i * ldc + v * 16) : _mm512_setzero_ps();
    for (int64_t pp = 0; pp < npairs; pp++) {
        __m512bh bv[NRV];
        for (int v = 0; v < NRV; v++) bv[v] = (__m512bh)_mm512_loadu_si512((const void *)(b + pp * NR + v * 16));
        for (int i = 0; i < mr; i++) {
            int32_t ai;
            memcpy(&ai, a + i * lda + 2 * pp, sizeof ai);
            __m512bh av = (__m512bh)_mm512_set1_epi32(ai);
            for (int v = 0; v < NRV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < NRV; v++) _mm512_storeu_ps(c + i * ldc + v * 16, acc[i][v]);
}

static void micro_any(int mr, int64_t npairs, const uint16_t *a, int64_t lda, const uint32_t *b, float *c, int64_t ldc,
                      bool load_c) {
    switch (mr) {
    case 6: micro(6, npairs, a, lda, b, c, ldc, load_c); break;
    case 5: micro(5, npairs, a, lda, b, c, ldc, load_c); break;
    case 4: micro(4, npairs, a, lda, b, c, ldc, load_c); break;
    case 3: micro(3, npairs, a, lda, b, c, ldc, load_c); break;
    case 2: micro(2, npairs, a, lda, b, c, ldc, load_c); break;
    default: micro(1, npairs, a, lda, b, c, ldc, load_c); break;
    }
}

static void bf16_compute(const speed_cpu_mm_t *mm, const void *xs, int64_t ldxs, const void *packed, int64_t i0,
                         int64_t i1, int64_t j0, int64_t nc, int64_t p0, int64_t kc, bool first) {
    const uint16_t *x = xs;
    const int64_t npairs = (kc + 1) / 2;
    const bool load_c = !first || mm->accumulate;
    for (int64_t jp = 0; jp < nc; jp += NR) {
        const uint32_t *panel = (const uint32_t *)packed + jp * npairs;
        const int64_t j = j0 + jp;
        const int64_t ncols = mm->m - j < NR ? mm->m - j : NR;
        for (int64_t i = i0; i < i1; i += MR) {
            const int mr = (int)(i1 - i < MR ? i1 - i : MR);
            const uint16_t *a = x + i * ldxs + p0;
            if (ncols == NR) {
                micro_any(mr, npairs, a, ldxs, panel, mm->out + i * mm->ldo + j, mm->ldo, load_c);
            } else {
                float tile[MR * NR] = {0};
                for (int r = 0; r < mr; r++)
                    for (int c = 0; c < NR; c++)
                        tile[r * NR + c] = load_c && c < ncols ? mm->out[(i + r) * mm->ldo + j + c] : 0.0f;
                micro_any(mr, npairs, a, ldxs, panel, tile, NR, true);
                for (int r = 0; r < mr; r++)
                    memcpy(mm->out + (i + r) * mm->ldo + j, tile + r * NR, (size_t)ncols * sizeof(float));
            }
        }
    }
}

/* ---- few rows: stream the weights once, vdpbf16ps against every x row ---------------------- */

/* rb weight rows j, j + jstep, ... times nx x rows from i0, u accumulator sets (rb * nx * u <= 16). With
 * several x rows the kernel is bound by loads (one x load per vdpbf16ps), so rb > 1 reuses each
 * x load for rb rows; with one or two x rows it is memory bound and rb = 1 keeps a single
 * sequential weight stream. The weight tail past k is masked to zero (xc is zero there, but
 * the weights' bytes there could be NaN patterns). */
KINLINE void gemv_tile(const speed_cpu_mm_t *mm, const uint16_t *xc, int64_t ldxc, int64_t j, const int rb,
                       int64_t jstep, int64_t i0, const int nx, const int u) {
    const int64_t k = mm->k, k32 = k / 32 * 32;
    const uint16_t *w[4];
    for (int r = 0; r < rb; r++) w[r] = (const uint16_t *)mm->w + (j + r * jstep) * mm->ldw;
    __m512 acc[16]; /* [rb][nx][u] */
#define ACC(r, i, uu) acc[((r)*nx + (i)) * u + (uu)]
    for (int a = 0; a < rb * nx * u; a++) acc[a] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 32 * u <= k32; p += 32 * u)
        for (int uu = 0; uu < u; uu++) {
            __m512bh wv[4];
            for (int r = 0; r < rb; r++) wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w[r] + p + 32 * uu));
            for (int i = 0; i < nx; i++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xc + (i0 + i) * ldxc + p + 32 * uu));
                for (int r = 0; r < rb; r++) ACC(r, i, uu) = _mm512_dpbf16_ps(ACC(r, i, uu), wv[r], xv);
            }
        }
    for (; p < k; p += 32) {
        const int64_t rem = k - p;
        const __mmask32 mk = rem >= 32 ? 0xffffffffu : (__mmask32)((1u << rem) - 1);
        for (int r = 0; r < rb; r++) {
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w[r] + p);
            for (int i = 0; i < nx; i++)
                ACC(r, i, 0) = _mm512_dpbf16_ps(ACC(r, i, 0), wv,
                                                (__m512bh)_mm512_loadu_si512((const void *)(xc + (i0 + i) * ldxc + p)));
        }
    }
    for (int r = 0; r < rb; r++)
        for (int i = 0; i < nx; i++) {
            __m512 t = ACC(r, i, 0);
            for (int uu = 1; uu < u; uu++) t = _mm512_add_ps(t, ACC(r, i, uu));
            float s = _mm512_reduce_add_ps(t);
            float *o = mm->out + (i0 + i) * mm->ldo + j + r * jstep;
            *o = mm->accumulate ? *o + s : s;
        }
#undef ACC
}

/* Rows [j0, j1) for x rows [i0, i0 + nx). With RB > 1 the range is cut into RB contiguous parts
 * walked side by side (rows j, j + h, ...): RB long sequential streams, which the prefetchers
 * follow far better than RB adjacent rows (short streams exactly a row apart; measured 0.81 vs
 * 0.61 of the read roof at batch 4 on 2 threads). */
#define GEMV_ROWS(RB, NX, U)                                                                                 \
    do {                                                                                                     \
        const int64_t h = (j1 - j0) / (RB);                                                                  \
        for (int64_t j = j0; j < j0 + h; j++) gemv_tile(mm, xc, ldxc, j, (RB), h, i0, (NX), (U));            \
        for (int64_t j = j0 + h * (RB); j < j1; j++) gemv_tile(mm, xc, ldxc, j, 1, 1, i0, (NX), (U) * (RB)); \
    } while (0)

void speed_cpu_gemv_bf16_avx512(const speed_cpu_mm_t *mm, const void *xcv, int64_t ldxc, int64_t j0, int64_t j1) {
    const uint16_t *xc = xcv;
    for (int64_t i0 = 0; i0 < mm->n; i0 += 8) {
        switch (mm->n - i0 < 8 ? mm->n - i0 : 8) {
        case 1: GEMV_ROWS(1, 1, 8); break;
        case 2: GEMV_ROWS(1, 2, 4); break;
        case 3: GEMV_ROWS(2, 3, 2); break;
        case 4: GEMV_ROWS(2, 4, 2); break;
        case 5: GEMV_ROWS(3, 5, 1); break;
        case 6: GEMV_ROWS(2, 6, 1); break;
        case 7: GEMV_ROWS(2, 7, 1); break;
        default: GEMV_ROWS(2, 8, 1); break;
        }
    }
}

/* ---- few rows, batch-invariant: the GEMM's order per element, weights read in place ------- */

/* What the GEMM above computes for one output element (i, j), whatever its blocks: acc starts
 * at 0 (or out[i][j] with accumulate), then for every k pair pp = 0 .. ceil(k/2) - 1 in order
 * acc = vdpbf16ps(acc, x pair pp broadcast, w[j] pair pp) in the lane of column j, with the
 * weight half past k zeroed. Partial sums cross the kc blocks through out (stored and reloaded
 * as f32, exact) and kc is a multiple of 32, so the block boundaries change nothing. This kernel
 * runs that same chain with the same operands, but transposes 16 weight rows x 16 pairs in
 * registers (tr16, as bf16_pack_w) and feeds them to vdpbf16ps at once instead of storing a
 * packed block: for few rows the packing store and reload were most of the time. */

/* One k chunk of 32 columns (16 pairs) of 16 weight rows from wr into nx accumulators: nst pairs
 * (16 but at the end of k), rows past `rows` and columns past k zero, as bf16_pack_w leaves them. */
KINLINE void bi_chunk(const uint16_t *wr, int64_t ldw, int rows, __mmask32 mk, int nst, const uint16_t *xc,
                      int64_t ldxc, const int nx, __m512 *acc) {
    __m512i r[16];
    for (int q = 0; q < 16; q++) r[q] = q < rows ? _mm512_maskz_loadu_epi16(mk, wr + q * ldw) : _mm512_setzero_si512();
    tr16(r);
    for (int c = 0; c < 16; c++) {
        if (c >= nst) break;
        for (int i = 0; i < nx; i++) {
            int32_t ai;
            memcpy(&ai, xc + i * ldxc + 2 * c, sizeof ai);
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(ai), (__m512bh)r[c]);
        }
    }
}

/* 16 weight rows from j (masked past m; lanes at or past j1 are not stored) times nx x rows
 * from i0. While it reads its 16 rows column by column (16 streams 2k bytes apart), it prefetches
 * the next tile's rows into L2 in address order, 1 KiB per chunk: one sequential stream, which
 * the 16 strided ones are not for the hardware prefetchers (15% faster on the development VM). */
KINLINE void bi_tile(const speed_cpu_mm_t *mm, const uint16_t *xc, int64_t ldxc, int64_t j, int64_t j1, int64_t i0,
                     const int nx) {
    const int64_t k = mm->k, npairs = (k + 1) / 2, k32 = k / 32 * 32, ldw = mm->ldw;
    const int rows = mm->m - j < 16 ? (int)(mm->m - j) : 16;
    const __mmask16 om = (__mmask16)((1u << (j1 - j < 16 ? j1 - j : 16)) - 1);
    float *o = mm->out + i0 * mm->ldo + j;
    __m512 acc[8];
    for (int i = 0; i < nx; i++)
        acc[i] = mm->accumulate ? _mm512_maskz_loadu_ps(om, o + i * mm->ldo) : _mm512_setzero_ps();
    const uint16_t *w = (const uint16_t *)mm->w + j * ldw, *x = xc + i0 * ldxc;
    int64_t p = 0;
    if (rows == 16) { /* the bulk: constant trip counts, everything in registers */
        const char *next = (const char *)(w + 16 * ldw);
        for (; p < k32; p += 32) {
            for (int l = 0; l < 16; l++) _mm_prefetch(next + p * 32 + 64 * l, _MM_HINT_T1);
            bi_chunk(w + p, ldw, 16, 0xffffffffu, 16, x + p, ldxc, nx, acc);
        }
    }
    for (; p < k; p += 32) {
        const int64_t rem = k - p;
        const __mmask32 mk = rem >= 32 ? 0xffffffffu : (__mmask32)((1u << rem) - 1);
        const int nst = npairs - p / 2 < 16 ? (int)(npairs - p / 2) : 16;
        bi_chunk(w + p, ldw, rows, mk, nst, x + p, ldxc, nx, acc);
    }
    for (int i = 0; i < nx; i++) _mm512_mask_storeu_ps(o + i * mm->ldo, om, acc[i]);
}

/* Weight rows [j0, j1) (any range) for all n rows, 16 weight rows by up to 8 x rows at a time.
 * Measured alternatives, all slower here (AMD EPYC, AVX512_BF16): two or four tiles side by side (more
 * vdpbf16ps chains in flight; one chain is bound by its latency, ~2 ns per k pair, but 32 or 64
 * strided row streams lost more in memory than that won), the 128-bit blocks of the transpose
 * gathered by masked broadcast loads (half the shuffles, but the masked broadcasts cost more),
 * and prefetching each row a few lines ahead. */
void speed_cpu_bi_gemv_bf16_avx512(const speed_cpu_mm_t *mm, const void *xcv, int64_t ldxc, int64_t j0, int64_t j1) {
    const uint16_t *xc = xcv;
    for (int64_t i0 = 0; i0 < mm->n; i0 += 8) {
        const int64_t nx = mm->n - i0 < 8 ? mm->n - i0 : 8;
        for (int64_t j = j0; j < j1; j += 16) switch (nx) {
            case 1: bi_tile(mm, xc, ldxc, j, j1, i0, 1); break;
            case 2: bi_tile(mm, xc, ldxc, j, j1, i0, 2); break;
            case 3: bi_tile(mm, xc, ldxc, j, j1, i0, 3); break;
            case 4: bi_tile(mm, xc, ldxc, j, j1, i0, 4); break;
            case 5: bi_tile(mm, xc, ldxc, j, j1, i0, 5); break;
            case 6: bi_tile(mm, xc, ldxc, j, j1, i0, 6); break;
            case 7: bi_tile(mm, xc, ldxc, j, j1, i0, 7); break;
            default: bi_tile(mm, xc, ldxc, j, j1, i0, 8); break;
            }
    }
}

const speed_cpu_gemm_t speed_cpu_gemm_bf16_avx512 = {
    .nc = NC,
    .kc = KC,
    .convert_x = bf16_convert_x,
    .xc_cols = bf16_xc_cols,
    .xc_elem = sizeof(uint16_t),
    .pack_bytes = bf16_pack_bytes,
    .pack_w = bf16_pack_w,
    .compute = bf16_compute,
};
