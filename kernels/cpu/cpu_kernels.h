/* Kernel tables of the fast CPU backend (internal to kernels/cpu).
 *
 * backend_cpu.c owns the ops table, threading and work splitting; the kernels here do the
 * arithmetic on one piece of work (a range of rows, a GEMM block, one attention item). One
 * source, kern_impl.h, is compiled three times — scalar (no flags), AVX2 (+FMA, F16C) and
 * AVX-512 (F/BW/VL) — into speed_cpu_kernels_{scalar,avx2,avx512}; gemm_bf16_avx512.c adds the
 * AVX512_BF16 GEMM. backend_cpu.c picks a table after speed_cpu_isa_detect() and never calls
 * into a file compiled for an ISA the machine lacks.
 *
 * Numerics (compared against cpu-ref by tests/kernels/test_backend_ops.c):
 *   - everything accumulates in fp32; summation order differs from the reference (vector
 *     lanes, blocking), so results agree to fp32 rounding, not bit for bit;
 *   - weights are converted exactly (bf16/f16 -> f32) except in the AVX512_BF16 paths for
 *     bf16 weights with more than one x row (GEMM, and the few-row matmul of batched decode),
 *     which round the activations x to bf16 (round to nearest even) so that vdpbf16ps can
 *     multiply them with the bf16 weights: the result differs from the reference by the bf16
 *     rounding of x (relative error ~2^-9 per product, averaging out over k; ~1.5e-3 of the
 *     largest output measured) — within the bf16 weight tolerance (1e-2). One-row matmuls
 *     (decode at batch 1) keep fp32 x exactly outside batch-invariant mode (in it they round x
 *     as the GEMM does), and so do f32 and f16 weights;
 *   - exp is a vectorised Cody-Waite + degree-7 polynomial (about 1-2 ulp, gradual underflow,
 *     inf/NaN propagated); the scalar table uses libm expf.
 */
#ifndef SPEED_CPU_KERNELS_H
#define SPEED_CPU_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

/* One matmul: out[n][m] (+)= x[n][k] · w[m][k]ᵀ (see speed_op_matmul). */
typedef struct {
    int64_t n, m, k;
    const float *x; /* [n][k], row stride ldx */
    int64_t ldx;
    const float *xp; /* x repacked by gemv_pack_x (only when gemv_xpack_floats > 0) */
    const void *w;   /* [m][k] in wtype, row stride ldw (elements) */
    int64_t ldw;
    speed_dtype_t wtype;
    float *out; /* [n][m], row stride ldo */
    int64_t ldo;
    bool accumulate;
} speed_cpu_mm_t;

/* Blocked GEMM for one weight dtype. The driver walks blocks of nc weight rows x kc columns:
 * pack_w packs one block into `packed` (pack_bytes(nc, kc) bytes), then compute multiplies
 * rows [i0, i1) of the (possibly converted) x by it into out. */
typedef struct {
    int nc, kc; /* block sizes: nc a multiple of the micro-tile width, kc even */
    /* Optional: x is first converted, rows [i0, i1) into xc with row stride ldxc elements of
     * xc_elem bytes; ldxc = xc_cols(k). NULL: compute reads the f32 x in place. */
    void (*convert_x)(const speed_cpu_mm_t *mm, int64_t i0, int64_t i1, void *xc, int64_t ldxc);
    int64_t (*xc_cols)(int64_t k);
    size_t xc_elem;
    size_t (*pack_bytes)(int64_t nc, int64_t kc);
    void (*pack_w)(const speed_cpu_mm_t *mm, int64_t j0, int64_t nc, int64_t p0, int64_t kc, void *packed);
    /* first: this is the first k block (out is overwritten unless mm->accumulate). */
    void (*compute)(const speed_cpu_mm_t *mm, const void *xs, int64_t ldxs, const void *packed, int64_t i0, int64_t i1,
                    int64_t j0, int64_t nc, int64_t p0, int64_t kc, bool first);
} speed_cpu_gemm_t;

/* Attention work: query rows x kv heads, each item covering a range of visible entries. */
typedef struct {
    const float *q; /* [n_rows][n_heads * head_dim], row stride ldq */
    int64_t ldq;
    float *out; /* same shape, row stride ldo */
    int64_t ldo;
    const speed_kv_layer_t *kv;
    const speed_attn_rows_t *rows;
    int n_heads;
    int group; /* query heads per kv head */
    float scale;
} speed_cpu_attn_t;

/* Entries per tile, and query vectors (rows x heads of a group) per work item. */
#define SPEED_CPU_ATTN_TILE 32
#define SPEED_CPU_ATTN_QV   64

/* Query rows per item for this group size (rows of one sequence are blocked together). */
static inline int speed_cpu_attn_rows_per_item(int group) {
    return group >= SPEED_CPU_ATTN_QV ? 1 : SPEED_CPU_ATTN_QV / group;
}

/* Floats of per-thread scratch the attention kernel needs (head_dim padded to 16). */
static inline size_t speed_cpu_attn_scratch_floats(int group, int head_dim) {
    size_t qv = (size_t)group * (size_t)speed_cpu_attn_rows_per_item(group), hdp = ((size_t)head_dim + 15) / 16 * 16;
    return qv * (2 * hdp + SPEED_CPU_ATTN_TILE + 4) + 2 * hdp * SPEED_CPU_ATTN_TILE + 64;
}

/* Partial result layout for split attention items: per query head of the group,
 * [0] = running max, [1] = sum of exp, [2 ..] = unnormalised acc[head_dim]. */
static inline size_t speed_cpu_attn_part_floats(int group, int head_dim) {
    return (size_t)group * ((size_t)head_dim + 2);
}

typedef struct {
    speed_cpu_isa_t isa;

    /* ---- matmul with few rows (n <= gemv_max_n): stream the weights once ---- */
    int gemv_max_n;
    /* Floats of repacked x the gemv needs for this matmul (0: none). */
    size_t (*gemv_xpack_floats)(const speed_cpu_mm_t *mm);
    void (*gemv_pack_x)(const speed_cpu_mm_t *mm, float *xp);
    /* Output columns (weight rows) [j0, j1) for all n rows. */
    void (*gemv)(const speed_cpu_mm_t *mm, int64_t j0, int64_t j1);
    /* The same for batch-invariant mode (any n; used for n <= 8): every output element bit for
     * bit what gemm[mm->wtype] computes (its reduction order), the weights read in place. */
    void (*bi_gemv)(const speed_cpu_mm_t *mm, int64_t j0, int64_t j1);

    /* ---- matmul with many rows, per weight dtype ---- */
    speed_cpu_gemm_t gemm[SPEED_DTYPE_COUNT];

    /* ---- attention ---- */
    /* Query rows r0 .. r0 + nr - 1 (nr <= attn_rows_per_item; they share one block table) with
     * the group of query heads of kv head h, against entries [e0, min(e1, n_visible[r])) of
     * each row. part == NULL: the normalised result goes to out (e0 = 0, e1 >= every row's
     * n_visible); otherwise (nr = 1) the partial (max, sum, acc) goes to part.
     * scratch: attn_scratch_floats. */
    void (*attn)(const speed_cpu_attn_t *a, int64_t r0, int nr, int h, int32_t e0, int32_t e1, float *scratch,
                 float *part);

    /* ---- rows and elementwise ---- */
    void (*rmsnorm_row)(float *out, const float *x, const void *w, speed_dtype_t wtype, int64_t d, float eps);
    /* x [n_heads * head_dim] in place; cs = cos[head_dim / 2] then sin[head_dim / 2]. */
    void (*rope_row)(float *x, int n_heads, int head_dim, const float *cs);
    void (*swiglu)(float *out, const float *gate, const float *up, int64_t n);
    void (*add)(float *out, const float *a, const float *b, int64_t n);
    void (*to_f32)(speed_dtype_t dtype, const void *src, float *dst, int64_t n);
    void (*from_f32)(speed_dtype_t dtype, const float *src, void *dst, int64_t n);

    /* ---- top-k (speed_op_topk) ---- */
    /* max over x[0 .. n) (n >= 1; NaN: unspecified). */
    float (*max_row)(const float *x, int64_t n);
    /* Σ exp(x[c] - shift) over [0, n): fp32 vector partial sums of blocks of a few thousand
     * values, added in double (a 128K-entry row stays within ~1e-7 relative). */
    double (*sum_exp_row)(const float *x, int64_t n, float shift);
    /* The first index c in [i, n) with x[c] > thr, or n: the top-k scan skips the (many)
     * values that cannot enter its heap a vector at a time. */
    int64_t (*next_above)(const float *x, int64_t i, int64_t n, float thr);
} speed_cpu_kernels_t;

extern const speed_cpu_kernels_t speed_cpu_kernels_scalar;
#if defined(__x86_64__)
extern const speed_cpu_kernels_t speed_cpu_kernels_avx2;
extern const speed_cpu_kernels_t speed_cpu_kernels_avx512;
/* The AVX512_BF16 GEMM for bf16 weights (gemm_bf16_avx512.c). */
extern const speed_cpu_gemm_t speed_cpu_gemm_bf16_avx512;
/* Few-row matmul for bf16 weights with vdpbf16ps: weight rows [j0, j1) against x converted by
 * speed_cpu_gemm_bf16_avx512.convert_x (xc, row stride ldxc). */
void speed_cpu_gemv_bf16_avx512(const speed_cpu_mm_t *mm, const void *xc, int64_t ldxc, int64_t j0, int64_t j1);
/* The batch-invariant few-row matmul for bf16 weights: the same arguments, and for every output
 * element bit for bit what speed_cpu_gemm_bf16_avx512 computes (its reduction order), with the
 * weights read in place instead of packed. */
void speed_cpu_bi_gemv_bf16_avx512(const speed_cpu_mm_t *mm, const void *xc, int64_t ldxc, int64_t j0, int64_t j1);
#endif

#endif /* SPEED_CPU_KERNELS_H */
