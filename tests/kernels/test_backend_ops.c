/* Every op of a backend against cpu-ref (ggml's test-backend-ops).
 *
 *   test_backend_ops cpu       the fast CPU backend, once per ISA this machine has
 *                              (scalar, avx2, avx512, avx512-bf16 via cpu_isa_max)
 *   test_backend_ops cuda      the CUDA backend
 *   test_backend_ops cpu-ref   a second cpu-ref: checks the harness itself (errors are 0)
 *
 * Exit 0 when every case is within tolerance, 1 otherwise, 77 when the backend cannot be
 * created here; for cuda only on a machine without an NVIDIA GPU (with a GPU, a cuda backend
 * that is not built or cannot be created is a failure: test_gpu.h). One line per (case, backend).
 *
 * Inputs are random from a fixed seed. Each case runs cpu-ref once (cpu-ref's backend memory is
 * host memory, so it runs on the host buffers directly) and then every backend under test
 * from uploaded copies; weights go through speed_backend_map_weights as the engine does.
 *
 * Error measure: err = max |out - ref| / (max |ref| + 1e-30) over the case's output, with
 * NaN anywhere counting as infinite error. Tolerances (err must be <= tol):
 *
 *   embed, add, get_rows, kv_store (pool bytes), kv_load      0 — copies and a defined
 *       rounding (nearest even), so every backend must agree bit for bit.
 *   rmsnorm, swiglu                                            1e-5 — elementwise f32 math
 *       (a sum of squares over d, an exp): a few ulps of the largest value.
 *   matmul, attention with f32 weights / KV                    2e-5 — fp32 accumulation
 *       over k <= ~6000 terms: random-sign rounding grows like sqrt(k) * 2^-24 (~1e-6)
 *       relative to the largest output; 2e-5 leaves margin for blocked sums.
 *   matmul, attention with f16 weights / KV                    2e-3 — a backend may round
 *       the activations (or the softmax weights) to f16 to use f16 hardware: 2^-11
 *       relative per term, ~1e-4 on the largest output; 2e-3 keeps a margin.
 *   matmul, attention with bf16 weights / KV                   1e-2 — the same with bf16's
 *       2^-8 (vdpbf16ps, tensor cores): ~2e-3 at most; a wrong row, tail or block is O(1).
 *   rope                                                       1e-5 + 2^-23 * max position —
 *       the angle is an f32 product pos * inv_freq; one ulp of difference in inv_freq
 *       (f32 pow vs double) moves it by up to pos * 2^-23 radians.
 * Off-by-one errors that a loose tolerance could hide on long rows are caught by the short
 * cases (1, 3, 17 entries), where one entry more or less is a large error.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "clock.h"
#include "log.h"
#include "test_clock.h"
#include "test_gpu.h"

/* ---- targets ------------------------------------------------------------------------- */

typedef struct {
    speed_backend_t *be;
    char label[96];
    bool slow; /* scalar code: the largest matmuls are skipped */
} target_t;

enum { MAX_TARGETS = 8 };
static target_t targets[MAX_TARGETS];
static int n_targets;
static speed_backend_t *ref;
static int n_cases, n_failed, n_skipped;

/* Works above this many multiply-adds are too slow for scalar code on a shared machine. */
#define SLOW_WORK_MAX 2.0e8

/* ---- random inputs ------------------------------------------------------------------- */

static uint64_t rng_state = 0x5eedf00dcafe1234ull;

static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_uniform(float lo, float hi) { /* [lo, hi) */
    return lo + (hi - lo) * (float)((double)(rng_next() >> 40) * (1.0 / 16777216.0));
}

static int64_t rng_below(int64_t n) { return (int64_t)(rng_next() % (uint64_t)n); }

static void fill_uniform(float *x, int64_t n, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) x[i] = rng_uniform(lo, hi);
}

/* A random permutation of 0..n-1. */
static void shuffle_ids(int32_t *ids, int64_t n) {
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)i;
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = rng_below(i + 1);
        int32_t t = ids[i];
        ids[i] = ids[j];
        ids[j] = t;
    }
}

/* Host memory that is never NULL (a test cannot go on without it). */
static void *host_alloc(size_t bytes) {
    void *p = speed_aligned_alloc(64, bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "out of host memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* f32 values rounded into `dtype`: a weight matrix as a file would hold it. */
static void *host_weights(speed_dtype_t dtype, int64_t n, float lo, float hi) {
    float *f = host_alloc((size_t)n * sizeof(float));
    fill_uniform(f, n, lo, hi);
    void *w = host_alloc((size_t)n * speed_dtype_size(dtype));
    speed_dtype_from_f32(dtype, f, w, (size_t)n);
    speed_aligned_free(f);
    return w;
}

/* ---- backend buffers ----------------------------------------------------------------- */

/* A copy of host bytes in backend memory; NULL (logged) on failure. */
static void *to_backend(speed_backend_t *be, const void *host, size_t bytes) {
    void *p = NULL;
    if (speed_backend_alloc(be, bytes ? bytes : 1, &p) != SPEED_OK) return NULL;
    if (speed_backend_upload(be, p, host, bytes) != SPEED_OK) {
        speed_backend_free(be, p);
        return NULL;
    }
    return p;
}

static speed_status_t from_backend(speed_backend_t *be, void *host, const void *dev, size_t bytes) {
    speed_status_t st = speed_backend_synchronize(be);
    return st != SPEED_OK ? st : speed_backend_download(be, host, dev, bytes);
}

/* ---- error and reporting ------------------------------------------------------------- */

/* max |got - want| / max |want| over [n_rows][n_cols] of two strided f32 arrays. */
static double norm_err(const float *got, int64_t got_stride, const float *want, int64_t want_stride, int64_t n_rows,
                       int64_t n_cols) {
    double max_diff = 0, max_ref = 0;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t c = 0; c < n_cols; c++) {
            double g = got[r * got_stride + c], w = want[r * want_stride + c];
            if (isnan(g) != isnan(w) || isinf(g) != isinf(w)) return INFINITY;
            if (isnan(w) || isinf(w)) continue;
            if (fabs(g - w) > max_diff) max_diff = fabs(g - w);
            if (fabs(w) > max_ref) max_ref = fabs(w);
        }
    return max_diff / (max_ref + 1e-30);
}

/* 1 if the bytes of the padding columns [n_cols, stride) of an f32 [n_rows][stride] buffer
 * differ between a and b (an op wrote outside its view). */
static bool padding_changed(const float *a, const float *b, int64_t n_rows, int64_t n_cols, int64_t stride) {
    for (int64_t r = 0; r < n_rows; r++)
        if (stride > n_cols &&
            memcmp(a + r * stride + n_cols, b + r * stride + n_cols, (size_t)(stride - n_cols) * sizeof(float)) != 0)
            return true;
    return false;
}

static void report(const target_t *t, const char *op, const char *desc, speed_status_t st, double err, double tol) {
    n_cases++;
    bool ok = st == SPEED_OK && err <= tol;
    if (!ok) n_failed++;
    CHECK_MSG(ok, "%s %s on %s", op, desc, t->label);
    if (st != SPEED_OK)
        printf("%-9s %-46s %-30s status %s  FAIL\n", op, desc, t->label, speed_status_string(st));
    else
        printf("%-9s %-46s %-30s err %.2e  tol %.1e  %s\n", op, desc, t->label, err, tol, ok ? "ok" : "FAIL");
    fflush(stdout);
}

static void report_skip(const target_t *t, const char *op, const char *desc, const char *why) {
    n_skipped++;
    printf("%-9s %-46s %-30s skipped: %s\n", op, desc, t->label, why);
}

/* Whether target t runs op with dtype; prints the skip line if not. */
static bool target_runs(const target_t *t, const char *op, const char *desc, speed_op_t o, speed_dtype_t dtype,
                        double work) {
    if (!speed_backend_supports_op(t->be, o, dtype)) {
        report_skip(t, op, desc, "unsupported by the backend");
        return false;
    }
    if (t->slow && work > SLOW_WORK_MAX) {
        report_skip(t, op, desc, "too slow for scalar code");
        return false;
    }
    return true;
}

static double tol_reduce(speed_dtype_t dtype) {
    switch (dtype) {
    case SPEED_DTYPE_F32: return 2e-5;
    case SPEED_DTYPE_F16: return 2e-3;
    case SPEED_DTYPE_BF16: return 1e-2;
    }
    return 0;
}

#define TOL_ELEMENTWISE 1e-5
#define TOL_EXACT       0.0

/* ---- embed --------------------------------------------------------------------------- */

static void case_embed(int64_t vocab, int64_t d, int64_t n, speed_dtype_t dtype) {
    char desc[96];
    snprintf(desc, sizeof desc, "vocab=%lld d=%lld n=%lld %s", (long long)vocab, (long long)d, (long long)n,
             speed_dtype_name(dtype));
    void *table = host_weights(dtype, vocab * d, -2, 2);
    int32_t *ids = host_alloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(i == 0 ? vocab - 1 : rng_below(vocab));
    size_t out_bytes = (size_t)(n * d) * sizeof(float);
    float *want = host_alloc(out_bytes), *got = host_alloc(out_bytes);
    SPEED_ASSERT(speed_op_embed(ref, speed_mat(want, SPEED_DTYPE_F32, n, d), speed_mat(table, dtype, vocab, d), ids) ==
                 SPEED_OK);
    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "embed", desc, SPEED_OP_EMBED, dtype, 0)) continue;
        const void *tw = NULL;
        void *out = NULL;
        speed_status_t st = speed_backend_map_weights(t->be, table, (size_t)(vocab * d) * speed_dtype_size(dtype), &tw);
        if (st == SPEED_OK) st = speed_backend_alloc(t->be, out_bytes, &out);
        if (st == SPEED_OK)
            st = speed_op_embed(t->be, speed_mat(out, SPEED_DTYPE_F32, n, d), speed_mat((void *)tw, dtype, vocab, d),
                                ids);
        if (st == SPEED_OK) st = from_backend(t->be, got, out, out_bytes);
        report(t, "embed", desc, st, st == SPEED_OK ? norm_err(got, d, want, d, n, d) : 0, TOL_EXACT);
        speed_backend_free(t->be, out);
        speed_backend_unmap_weights(t->be, tw);
    }
    speed_aligned_free(table);
    speed_aligned_free(ids);
    speed_aligned_free(want);
    speed_aligned_free(got);
}

/* ---- rmsnorm ------------------------------------------------------------------------- */

static void case_rmsnorm(int64_t n, int64_t d, speed_dtype_t dtype, float eps, bool in_place) {
    char desc[96];
    snprintf(desc, sizeof desc, "n=%lld d=%lld w=%s eps=%g%s", (long long)n, (long long)d, speed_dtype_name(dtype),
             (double)eps, in_place ? " in-place" : "");
    size_t bytes = (size_t)(n * d) * sizeof(float);
    float *x = host_alloc(bytes), *want = host_alloc(bytes), *got = host_alloc(bytes);
    fill_uniform(x, n * d, -3, 3);
    void *w = host_weights(dtype, d, 0.5f, 1.5f);
    SPEED_ASSERT(speed_op_rmsnorm(ref, speed_mat(want, SPEED_DTYPE_F32, n, d), speed_mat(x, SPEED_DTYPE_F32, n, d),
                                  speed_mat(w, dtype, 1, d), eps) == SPEED_OK);
    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "rmsnorm", desc, SPEED_OP_RMSNORM, dtype, 0)) continue;
        const void *tw = NULL;
        void *dx = to_backend(t->be, x, bytes), *dout = NULL;
        speed_status_t st = dx ? SPEED_OK : SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK) st = speed_backend_map_weights(t->be, w, (size_t)d * speed_dtype_size(dtype), &tw);
        if (st == SPEED_OK && !in_place) st = speed_backend_alloc(t->be, bytes, &dout);
        void *o = in_place ? dx : dout;
        if (st == SPEED_OK)
            st = speed_op_rmsnorm(t->be, speed_mat(o, SPEED_DTYPE_F32, n, d), speed_mat(dx, SPEED_DTYPE_F32, n, d),
                                  speed_mat((void *)tw, dtype, 1, d), eps);
        if (st == SPEED_OK) st = from_backend(t->be, got, o, bytes);
        report(t, "rmsnorm", desc, st, st == SPEED_OK ? norm_err(got, d, want, d, n, d) : 0, TOL_ELEMENTWISE);
        speed_backend_free(t->be, dx);
        speed_backend_free(t->be, dout);
        speed_backend_unmap_weights(t->be, tw);
    }
    speed_aligned_free(x);
    speed_aligned_free(w);
    speed_aligned_free(want);
    speed_aligned_free(got);
}

/* ---- matmul -------------------------------------------------------------------------- */

/* out [n][m] (row stride m + o_pad) (+)= x [n][k] (row stride k + x_pad) · w [m][k]ᵀ.
 * When n is large only n_ref_rows sampled rows are computed by cpu-ref and compared. */
static void case_matmul(int64_t n, int64_t k, int64_t m, speed_dtype_t dtype, bool accumulate, int64_t x_pad,
                        int64_t o_pad, int64_t n_ref_rows) {
    char desc[96];
    snprintf(desc, sizeof desc, "[%lld x %lld]*[%lld x %lld]^T %s%s%s", (long long)n, (long long)k, (long long)m,
             (long long)k, speed_dtype_name(dtype), accumulate ? " acc" : "", x_pad || o_pad ? " strided" : "");
    const int64_t xs = k + x_pad, os = m + o_pad;
    size_t x_bytes = (size_t)(n * xs) * sizeof(float), o_bytes = (size_t)(n * os) * sizeof(float);
    size_t w_bytes = (size_t)(m * k) * speed_dtype_size(dtype);
    float *x = host_alloc(x_bytes), *out0 = host_alloc(o_bytes), *got = host_alloc(o_bytes);
    fill_uniform(x, n * xs, -1, 1);
    fill_uniform(out0, n * os, -1, 1); /* the accumulator, and the padding that must stay */
    void *w = host_weights(dtype, m * k, -1, 1);

    /* cpu-ref on the sampled rows (all of them when n_ref_rows >= n): first, last, random. */
    if (n_ref_rows > n) n_ref_rows = n;
    int32_t *rows = host_alloc((size_t)n_ref_rows * sizeof(int32_t));
    for (int64_t i = 0; i < n_ref_rows; i++)
        rows[i] = (int32_t)(n_ref_rows == n ? i : i == 0 ? 0 : i == 1 ? n - 1 : rng_below(n));
    float *rx = host_alloc((size_t)(n_ref_rows * k) * sizeof(float));
    float *want = host_alloc((size_t)(n_ref_rows * m) * sizeof(float));
    for (int64_t i = 0; i < n_ref_rows; i++) {
        memcpy(rx + i * k, x + rows[i] * xs, (size_t)k * sizeof(float));
        memcpy(want + i * m, out0 + rows[i] * os, (size_t)m * sizeof(float));
    }
    SPEED_ASSERT(speed_op_matmul(ref, speed_mat(want, SPEED_DTYPE_F32, n_ref_rows, m),
                                 speed_mat(rx, SPEED_DTYPE_F32, n_ref_rows, k), speed_mat(w, dtype, m, k),
                                 accumulate) == SPEED_OK);
    float *got_rows = host_alloc((size_t)(n_ref_rows * m) * sizeof(float));

    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "matmul", desc, SPEED_OP_MATMUL, dtype, (double)n * k * m)) continue;
        const void *tw = NULL;
        void *dx = to_backend(t->be, x, x_bytes), *dout = to_backend(t->be, out0, o_bytes);
        speed_status_t st = dx && dout ? SPEED_OK : SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK) st = speed_backend_map_weights(t->be, w, w_bytes, &tw);
        speed_mat_t xv = {dx, SPEED_DTYPE_F32, n, k, xs}, ov = {dout, SPEED_DTYPE_F32, n, m, os};
        if (st == SPEED_OK) st = speed_op_matmul(t->be, ov, xv, speed_mat((void *)tw, dtype, m, k), accumulate);
        if (st == SPEED_OK) st = from_backend(t->be, got, dout, o_bytes);
        double err = 0;
        if (st == SPEED_OK) {
            for (int64_t i = 0; i < n_ref_rows; i++)
                memcpy(got_rows + i * m, got + rows[i] * os, (size_t)m * sizeof(float));
            err = norm_err(got_rows, m, want, m, n_ref_rows, m);
            if (padding_changed(got, out0, n, m, os)) err = INFINITY;
        }
        report(t, "matmul", desc, st, err, tol_reduce(dtype));
        speed_backend_free(t->be, dx);
        speed_backend_free(t->be, dout);
        speed_backend_unmap_weights(t->be, tw);
    }
    speed_aligned_free(x);
    speed_aligned_free(out0);
    speed_aligned_free(got);
    speed_aligned_free(w);
    speed_aligned_free(rows);
    speed_aligned_free(rx);
    speed_aligned_free(want);
    speed_aligned_free(got_rows);
}

/* ---- rope ---------------------------------------------------------------------------- */

static void case_rope(int64_t n, int n_heads, int head_dim, int32_t max_pos, bool llama3, int64_t x_pad) {
    char desc[96];
    snprintf(desc, sizeof desc, "n=%lld heads=%d hd=%d pos<%d%s%s", (long long)n, n_heads, head_dim, max_pos,
             llama3 ? " llama3" : "", x_pad ? " strided" : "");
    speed_rope_t rope = {.theta = 10000.0f};
    if (llama3)
        rope = (speed_rope_t){.theta = 500000.0f,
                              .llama3_scaling = true,
                              .factor = 8.0f,
                              .low_freq_factor = 1.0f,
                              .high_freq_factor = 4.0f,
                              .original_max_position = 8192};
    const int64_t d = (int64_t)n_heads * head_dim, xs = d + x_pad;
    size_t bytes = (size_t)(n * xs) * sizeof(float);
    float *x = host_alloc(bytes), *want = host_alloc(bytes), *got = host_alloc(bytes);
    fill_uniform(x, n * xs, -2, 2);
    memcpy(want, x, bytes);
    int32_t *pos = host_alloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) pos[i] = (int32_t)(i == 0 ? max_pos - 1 : rng_below(max_pos));
    speed_mat_t rv = {want, SPEED_DTYPE_F32, n, d, xs};
    SPEED_ASSERT(speed_op_rope(ref, rv, n_heads, head_dim, pos, &rope) == SPEED_OK);
    double tol = 1e-5 + ldexp((double)max_pos, -23);
    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "rope", desc, SPEED_OP_ROPE, SPEED_DTYPE_F32, 0)) continue;
        void *dx = to_backend(t->be, x, bytes);
        speed_status_t st = dx ? SPEED_OK : SPEED_ERR_NO_MEMORY;
        speed_mat_t xv = {dx, SPEED_DTYPE_F32, n, d, xs};
        if (st == SPEED_OK) st = speed_op_rope(t->be, xv, n_heads, head_dim, pos, &rope);
        if (st == SPEED_OK) st = from_backend(t->be, got, dx, bytes);
        double err = 0;
        if (st == SPEED_OK) {
            err = norm_err(got, xs, want, xs, n, d);
            if (padding_changed(got, x, n, d, xs)) err = INFINITY;
        }
        report(t, "rope", desc, st, err, tol);
        speed_backend_free(t->be, dx);
    }
    speed_aligned_free(x);
    speed_aligned_free(want);
    speed_aligned_free(got);
    speed_aligned_free(pos);
}

/* ---- swiglu, add --------------------------------------------------------------------- */

/* alias: 0 separate out, 1 out = first input, 2 out = second input */
static void case_binary(speed_op_t op, int64_t n, int64_t f, int alias, bool extremes) {
    const char *name = op == SPEED_OP_SWIGLU ? "swiglu" : "add";
    char desc[96];
    snprintf(desc, sizeof desc, "n=%lld f=%lld%s%s", (long long)n, (long long)f,
             alias == 1   ? " out=a"
             : alias == 2 ? " out=b"
                          : "",
             extremes ? " extremes" : "");
    size_t bytes = (size_t)(n * f) * sizeof(float);
    float *a = host_alloc(bytes), *b = host_alloc(bytes), *want = host_alloc(bytes), *got = host_alloc(bytes);
    fill_uniform(a, n * f, -8, 8);
    fill_uniform(b, n * f, -2, 2);
    if (extremes) { /* gates where exp(-g) overflows or underflows in f32 */
        static const float big[] = {-200, -100, -89, -88, -30, 30, 88, 89, 100, 200, 1e-30f, -1e-30f, 0};
        for (int64_t i = 0; i < n * f; i++) a[i] = big[i % (int64_t)(sizeof big / sizeof big[0])];
    }
    speed_mat_t wa = speed_mat(a, SPEED_DTYPE_F32, n, f), wb = speed_mat(b, SPEED_DTYPE_F32, n, f),
                wo = speed_mat(want, SPEED_DTYPE_F32, n, f);
    speed_status_t rst = op == SPEED_OP_SWIGLU ? speed_op_swiglu(ref, wo, wa, wb) : speed_op_add(ref, wo, wa, wb);
    SPEED_ASSERT(rst == SPEED_OK);
    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, name, desc, op, SPEED_DTYPE_F32, 0)) continue;
        void *da = to_backend(t->be, a, bytes), *db = to_backend(t->be, b, bytes), *dout = NULL;
        speed_status_t st = da && db ? SPEED_OK : SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK && alias == 0) st = speed_backend_alloc(t->be, bytes, &dout);
        void *o = alias == 1 ? da : alias == 2 ? db : dout;
        speed_mat_t ma = speed_mat(da, SPEED_DTYPE_F32, n, f), mb = speed_mat(db, SPEED_DTYPE_F32, n, f),
                    mo = speed_mat(o, SPEED_DTYPE_F32, n, f);
        if (st == SPEED_OK)
            st = op == SPEED_OP_SWIGLU ? speed_op_swiglu(t->be, mo, ma, mb) : speed_op_add(t->be, mo, ma, mb);
        if (st == SPEED_OK) st = from_backend(t->be, got, o, bytes);
        report(t, name, desc, st, st == SPEED_OK ? norm_err(got, f, want, f, n, f) : 0,
               op == SPEED_OP_ADD ? TOL_EXACT : TOL_ELEMENTWISE);
        speed_backend_free(t->be, da);
        speed_backend_free(t->be, db);
        speed_backend_free(t->be, dout);
    }
    speed_aligned_free(a);
    speed_aligned_free(b);
    speed_aligned_free(want);
    speed_aligned_free(got);
}

/* ---- get_rows ------------------------------------------------------------------------ */

static void case_get_rows(int64_t n_x, int64_t d, int64_t n) {
    char desc[96];
    snprintf(desc, sizeof desc, "x=[%lld x %lld] n=%lld", (long long)n_x, (long long)d, (long long)n);
    size_t x_bytes = (size_t)(n_x * d) * sizeof(float), o_bytes = (size_t)(n * d) * sizeof(float);
    float *x = host_alloc(x_bytes), *want = host_alloc(o_bytes), *got = host_alloc(o_bytes);
    fill_uniform(x, n_x * d, -5, 5);
    int32_t *rows = host_alloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) rows[i] = (int32_t)(i == 0 ? n_x - 1 : rng_below(n_x));
    SPEED_ASSERT(speed_op_get_rows(ref, speed_mat(want, SPEED_DTYPE_F32, n, d), speed_mat(x, SPEED_DTYPE_F32, n_x, d),
                                   rows) == SPEED_OK);
    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "get_rows", desc, SPEED_OP_GET_ROWS, SPEED_DTYPE_F32, 0)) continue;
        void *dx = to_backend(t->be, x, x_bytes), *dout = NULL;
        speed_status_t st = dx ? speed_backend_alloc(t->be, o_bytes, &dout) : SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK)
            st = speed_op_get_rows(t->be, speed_mat(dout, SPEED_DTYPE_F32, n, d),
                                   speed_mat(dx, SPEED_DTYPE_F32, n_x, d), rows);
        if (st == SPEED_OK) st = from_backend(t->be, got, dout, o_bytes);
        report(t, "get_rows", desc, st, st == SPEED_OK ? norm_err(got, d, want, d, n, d) : 0, TOL_EXACT);
        speed_backend_free(t->be, dx);
        speed_backend_free(t->be, dout);
    }
    speed_aligned_free(x);
    speed_aligned_free(want);
    speed_aligned_free(got);
    speed_aligned_free(rows);
}

/* ---- KV pool ------------------------------------------------------------------------- */

/* A pool of n_blocks blocks, two layers per block, slot_heads kv heads per token slot; the ops
 * see heads [h0, h0 + n_kv_heads) of layer 1 (all of them when slot_heads == n_kv_heads, as
 * the engine's views; fewer for a tensor-parallel rank's head view). A layer's block_stride
 * is twice its own K + V, and layer 0 and the heads outside the view must stay untouched. */
typedef struct {
    size_t bytes;
    size_t half;         /* bytes of one layer's K (or V) in a block */
    size_t layer_offset; /* bytes from a block to the view's first head of layer 1's K */
    int slot_heads, h0;
    speed_kv_layer_t kv; /* k_base relative to NULL: add the pool's base */
} pool_shape_t;

static pool_shape_t pool_shape_heads(int n_blocks, int B, int slot_heads, int h0, int n_kv_heads, int head_dim,
                                     speed_dtype_t dtype) {
    SPEED_ASSERT(h0 >= 0 && h0 + n_kv_heads <= slot_heads);
    const size_t es = speed_dtype_size(dtype), half = (size_t)B * slot_heads * head_dim * es;
    return (pool_shape_t){
        .bytes = (size_t)n_blocks * 4 * half,
        .half = half,
        .layer_offset = 2 * half + (size_t)h0 * head_dim * es,
        .slot_heads = slot_heads,
        .h0 = h0,
        .kv = {.block_stride = 4 * half,
               .v_offset = half,
               .block_tokens = B,
               .n_kv_heads = n_kv_heads,
               .head_dim = head_dim,
               .dtype = dtype,
               .slot_heads = slot_heads == n_kv_heads ? 0 : slot_heads},
    };
}

static pool_shape_t pool_shape(int n_blocks, int B, int n_kv_heads, int head_dim, speed_dtype_t dtype) {
    return pool_shape_heads(n_blocks, B, n_kv_heads, 0, n_kv_heads, head_dim, dtype);
}

/* The same pool seen whole: every head of layer 1, contiguous slots. */
static pool_shape_t pool_shape_whole(const pool_shape_t *ps) {
    pool_shape_t w = *ps;
    w.layer_offset = 2 * ps->half;
    w.h0 = 0;
    w.kv.n_kv_heads = ps->slot_heads;
    w.kv.slot_heads = 0;
    return w;
}

/* " heads [h0, h1) of S" for a head view, "" otherwise. */
static const char *heads_desc(const pool_shape_t *ps, char *buf, size_t size) {
    if (ps->slot_heads == ps->kv.n_kv_heads) return "";
    snprintf(buf, size, " heads[%d,%d)/%d", ps->h0, ps->h0 + ps->kv.n_kv_heads, ps->slot_heads);
    return buf;
}

/* Whether byte `off` of the pool belongs to the view (layer 1, heads [h0, h0 + n_kv_heads)). */
static bool pool_byte_in_view(const pool_shape_t *ps, size_t off) {
    size_t in_block = off % ps->kv.block_stride;
    if (in_block < 2 * ps->half) return false; /* layer 0 */
    const size_t head_bytes = (size_t)ps->kv.head_dim * speed_dtype_size(ps->kv.dtype);
    const size_t h = (in_block - 2 * ps->half) % ps->half % ((size_t)ps->slot_heads * head_bytes) / head_bytes;
    return h >= (size_t)ps->h0 && h < (size_t)(ps->h0 + ps->kv.n_kv_heads);
}

static speed_kv_layer_t pool_layer(const pool_shape_t *ps, void *base) {
    speed_kv_layer_t kv = ps->kv;
    kv.k_base = (char *)base + ps->layer_offset;
    return kv;
}

/* kv_store of n rows into random distinct slots, then kv_load of those slots and of a few
 * never written. k, v are column slices of one fused [n][q | k | v] buffer when fused. */
static void case_kv_heads(int n_blocks, int B, int slot_heads, int h0, int n_kv_heads, int head_dim,
                          speed_dtype_t dtype, int64_t n, bool fused) {
    char desc[96], hdesc[48];
    pool_shape_t ps = pool_shape_heads(n_blocks, B, slot_heads, h0, n_kv_heads, head_dim, dtype);
    snprintf(desc, sizeof desc, "B=%d blocks=%d kvh=%d hd=%d n=%lld %s%s%s", B, n_blocks, n_kv_heads, head_dim,
             (long long)n, speed_dtype_name(dtype), fused ? " fused" : "", heads_desc(&ps, hdesc, sizeof hdesc));
    const int64_t w = (int64_t)n_kv_heads * head_dim, q_cols = fused ? 2 * w : 0, stride = fused ? q_cols + 2 * w : w;
    SPEED_ASSERT(n <= (int64_t)n_blocks * B);
    /* host: kvbuf holds k and v (fused: q | k | v per row; else k rows then v rows) */
    size_t kv_bytes = (size_t)(n * stride) * sizeof(float) * (fused ? 1 : 2);
    float *kvbuf = host_alloc(kv_bytes);
    fill_uniform(kvbuf, (int64_t)(kv_bytes / sizeof(float)), -4, 4);
    int64_t k_off = fused ? q_cols : 0, v_off = fused ? q_cols + w : n * w;
    int32_t *perm = host_alloc((size_t)n_blocks * B * sizeof(int32_t));
    shuffle_ids(perm, (int64_t)n_blocks * B);
    int64_t n_load = n + 3 <= (int64_t)n_blocks * B ? n + 3 : n; /* + slots never stored */
    int32_t *slots = perm;                                       /* the first n_load of the permutation */

    unsigned char *pool0 = host_alloc(ps.bytes), *want_pool = host_alloc(ps.bytes), *got_pool = host_alloc(ps.bytes);
    memset(pool0, 0xA5, ps.bytes);
    memcpy(want_pool, pool0, ps.bytes);
    speed_kv_layer_t rkv = pool_layer(&ps, want_pool);
    speed_mat_t hk = {kvbuf + k_off, SPEED_DTYPE_F32, n, w, stride},
                hv = {kvbuf + v_off, SPEED_DTYPE_F32, n, w, stride};
    SPEED_ASSERT(speed_op_kv_store(ref, &rkv, hk, hv, slots) == SPEED_OK);
    size_t l_bytes = (size_t)(n_load * w) * sizeof(float);
    float *want_k = host_alloc(l_bytes), *want_v = host_alloc(l_bytes), *got_k = host_alloc(l_bytes),
          *got_v = host_alloc(l_bytes);
    SPEED_ASSERT(speed_op_kv_load(ref, &rkv, speed_mat(want_k, SPEED_DTYPE_F32, n_load, w),
                                  speed_mat(want_v, SPEED_DTYPE_F32, n_load, w), slots) == SPEED_OK);
    if (slot_heads != n_kv_heads) {
        /* The reference itself, against the layout: cpu-ref wrote inside the view only, and
         * what it loads through the view is the view's columns of a load of whole slots. */
        size_t n_outside = 0;
        for (size_t i = 0; i < ps.bytes; i++) n_outside += want_pool[i] != pool0[i] && !pool_byte_in_view(&ps, i);
        CHECK_MSG(n_outside == 0, "cpu-ref kv_store %s: %zu bytes changed outside the view", desc, n_outside);
        pool_shape_t whole = pool_shape_whole(&ps);
        speed_kv_layer_t wkv = pool_layer(&whole, want_pool);
        const int64_t ww = (int64_t)slot_heads * head_dim;
        float *all_k = host_alloc((size_t)(n_load * ww) * sizeof(float)),
              *all_v = host_alloc((size_t)(n_load * ww) * sizeof(float));
        SPEED_ASSERT(speed_op_kv_load(ref, &wkv, speed_mat(all_k, SPEED_DTYPE_F32, n_load, ww),
                                      speed_mat(all_v, SPEED_DTYPE_F32, n_load, ww), slots) == SPEED_OK);
        const int64_t c0 = (int64_t)h0 * head_dim;
        CHECK_MSG(norm_err(all_k + c0, ww, want_k, w, n_load, w) == 0 &&
                      norm_err(all_v + c0, ww, want_v, w, n_load, w) == 0,
                  "cpu-ref kv_load %s: not the view's columns of the whole slots", desc);
        speed_aligned_free(all_k);
        speed_aligned_free(all_v);
    }

    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "kv_store", desc, SPEED_OP_KV_STORE, dtype, 0)) continue;
        void *dpool = to_backend(t->be, pool0, ps.bytes), *dkv = to_backend(t->be, kvbuf, kv_bytes);
        void *dk = NULL, *dv = NULL;
        speed_status_t st = dpool && dkv ? SPEED_OK : SPEED_ERR_NO_MEMORY;
        speed_kv_layer_t tkv = pool_layer(&ps, dpool);
        speed_mat_t mk = {(float *)dkv + k_off, SPEED_DTYPE_F32, n, w, stride},
                    mv = {(float *)dkv + v_off, SPEED_DTYPE_F32, n, w, stride};
        if (st == SPEED_OK) st = speed_op_kv_store(t->be, &tkv, mk, mv, slots);
        if (st == SPEED_OK) st = from_backend(t->be, got_pool, dpool, ps.bytes);
        double err = 0;
        if (st == SPEED_OK) {
            size_t n_diff = 0;
            for (size_t i = 0; i < ps.bytes; i++) n_diff += got_pool[i] != want_pool[i];
            err = n_diff ? INFINITY : 0; /* byte-exact, including bytes that must not change */
        }
        report(t, "kv_store", desc, st, err, TOL_EXACT);

        if (st == SPEED_OK && target_runs(t, "kv_load", desc, SPEED_OP_KV_LOAD, dtype, 0)) {
            st = speed_backend_alloc(t->be, l_bytes, &dk);
            if (st == SPEED_OK) st = speed_backend_alloc(t->be, l_bytes, &dv);
            if (st == SPEED_OK)
                st = speed_op_kv_load(t->be, &tkv, speed_mat(dk, SPEED_DTYPE_F32, n_load, w),
                                      speed_mat(dv, SPEED_DTYPE_F32, n_load, w), slots);
            if (st == SPEED_OK) st = from_backend(t->be, got_k, dk, l_bytes);
            if (st == SPEED_OK) st = from_backend(t->be, got_v, dv, l_bytes);
            err = 0;
            if (st == SPEED_OK) err = memcmp(got_k, want_k, l_bytes) || memcmp(got_v, want_v, l_bytes) ? INFINITY : 0;
            report(t, "kv_load", desc, st, err, TOL_EXACT);
        }
        speed_backend_free(t->be, dpool);
        speed_backend_free(t->be, dkv);
        speed_backend_free(t->be, dk);
        speed_backend_free(t->be, dv);
    }
    speed_aligned_free(kvbuf);
    speed_aligned_free(perm);
    speed_aligned_free(pool0);
    speed_aligned_free(want_pool);
    speed_aligned_free(got_pool);
    speed_aligned_free(want_k);
    speed_aligned_free(want_v);
    speed_aligned_free(got_k);
    speed_aligned_free(got_v);
}

static void case_kv(int n_blocks, int B, int n_kv_heads, int head_dim, speed_dtype_t dtype, int64_t n, bool fused) {
    case_kv_heads(n_blocks, B, n_kv_heads, 0, n_kv_heads, head_dim, dtype, n, fused);
}

/* ---- attention ----------------------------------------------------------------------- */

/* One sequence of a batch: `n_cached` entries already in the pool, then `n_new` query rows
 * that see them and, causally, themselves. n_new = -1: one row that sees nothing. */
typedef struct {
    int n_cached, n_new;
} seq_t;

/* With slot_heads > n_kv_heads the backends under test attend through a head view (heads
 * [h0, h0 + n_kv_heads)) of a pool holding slot_heads heads per slot, and cpu-ref computes the
 * expected output on a separate contiguous pool holding only the view's heads. */
static void case_attention_heads(const char *what, int n_heads, int slot_heads, int h0, int n_kv_heads, int head_dim,
                                 int B, speed_dtype_t dtype, const seq_t *seqs, int n_seqs, float q_scale,
                                 int64_t q_pad) {
    char desc[96], hdesc[48];
    /* blocks: each sequence's entries in its own random, non-contiguous blocks */
    int64_t n_rows = 0, n_blocks = 1; /* one spare block nobody owns */
    for (int s = 0; s < n_seqs; s++) {
        int n_e = seqs[s].n_cached + (seqs[s].n_new > 0 ? seqs[s].n_new : 0);
        n_blocks += (n_e + B - 1) / B;
        n_rows += seqs[s].n_new > 0 ? seqs[s].n_new : 1;
    }
    const bool view = slot_heads != n_kv_heads;
    pool_shape_t ps = pool_shape_heads((int)n_blocks, B, slot_heads, h0, n_kv_heads, head_dim, dtype);
    pool_shape_t whole = pool_shape_whole(&ps);                                  /* ps, every head */
    pool_shape_t cs = pool_shape((int)n_blocks, B, n_kv_heads, head_dim, dtype); /* the view's heads alone */
    snprintf(desc, sizeof desc, "%s h=%d/%d hd=%d B=%d %s%s%s", what, n_heads, n_kv_heads, head_dim, B,
             speed_dtype_name(dtype), q_pad ? " strided" : "", heads_desc(&ps, hdesc, sizeof hdesc));
    int32_t *perm = host_alloc((size_t)n_blocks * sizeof(int32_t));
    shuffle_ids(perm, n_blocks);
    int32_t **tables = host_alloc((size_t)n_seqs * sizeof(int32_t *));
    const int32_t **row_table = host_alloc((size_t)n_rows * sizeof(int32_t *));
    int32_t *n_visible = host_alloc((size_t)n_rows * sizeof(int32_t));

    /* fill the pool through cpu-ref's kv_store: K, V uniform in [-1, 1); for a head view, the
     * view's heads also into the contiguous pool cpu-ref attends over */
    unsigned char *pool = host_alloc(ps.bytes), *cpool = view ? host_alloc(cs.bytes) : pool;
    memset(pool, 0xA5, ps.bytes);
    memset(cpool, 0xA5, cs.bytes);
    speed_kv_layer_t wkv = pool_layer(&whole, pool), rkv = pool_layer(&cs, cpool);
    const int64_t w = (int64_t)n_kv_heads * head_dim, ww = (int64_t)slot_heads * head_dim;
    int64_t next_block = 0, r = 0;
    for (int s = 0; s < n_seqs; s++) {
        int n_e = seqs[s].n_cached + (seqs[s].n_new > 0 ? seqs[s].n_new : 0);
        int nb = (n_e + B - 1) / B;
        tables[s] = host_alloc((size_t)(nb ? nb : 1) * sizeof(int32_t));
        for (int b = 0; b < nb; b++) tables[s][b] = perm[next_block++];
        if (n_e) {
            float *k = host_alloc((size_t)(n_e * ww) * sizeof(float)),
                  *v = host_alloc((size_t)(n_e * ww) * sizeof(float));
            int32_t *slots = host_alloc((size_t)n_e * sizeof(int32_t));
            fill_uniform(k, n_e * ww, -1, 1);
            fill_uniform(v, n_e * ww, -1, 1);
            for (int e = 0; e < n_e; e++) slots[e] = tables[s][e / B] * B + e % B;
            SPEED_ASSERT(speed_op_kv_store(ref, &wkv, speed_mat(k, SPEED_DTYPE_F32, n_e, ww),
                                           speed_mat(v, SPEED_DTYPE_F32, n_e, ww), slots) == SPEED_OK);
            if (view) {
                const int64_t c0 = (int64_t)h0 * head_dim;
                speed_mat_t kc = {k + c0, SPEED_DTYPE_F32, n_e, w, ww}, vc = {v + c0, SPEED_DTYPE_F32, n_e, w, ww};
                SPEED_ASSERT(speed_op_kv_store(ref, &rkv, kc, vc, slots) == SPEED_OK);
            }
            speed_aligned_free(k);
            speed_aligned_free(v);
            speed_aligned_free(slots);
        }
        if (seqs[s].n_new < 0) {
            row_table[r] = NULL;
            n_visible[r++] = 0;
        }
        for (int i = 0; i < seqs[s].n_new; i++) {
            row_table[r] = tables[s];
            n_visible[r++] = seqs[s].n_cached + i + 1;
        }
    }
    speed_attn_rows_t rows = {.n_rows = n_rows, .block_table = row_table, .n_visible = n_visible};

    const int64_t d = (int64_t)n_heads * head_dim, qs = d + q_pad;
    size_t q_bytes = (size_t)(n_rows * qs) * sizeof(float), o_bytes = (size_t)(n_rows * d) * sizeof(float);
    float *q = host_alloc(q_bytes), *want = host_alloc(o_bytes), *got = host_alloc(o_bytes);
    fill_uniform(q, n_rows * qs, -q_scale, q_scale);
    float scale = (float)(1.0 / sqrt((double)head_dim));
    speed_mat_t qv = {q, SPEED_DTYPE_F32, n_rows, d, qs};
    SPEED_ASSERT(speed_op_attention(ref, speed_mat(want, SPEED_DTYPE_F32, n_rows, d), qv, &rkv, n_heads, &rows,
                                    scale) == SPEED_OK);

    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "attention", desc, SPEED_OP_ATTENTION, dtype, 0)) continue;
        void *dpool = to_backend(t->be, pool, ps.bytes), *dq = to_backend(t->be, q, q_bytes), *dout = NULL;
        speed_status_t st = dpool && dq ? speed_backend_alloc(t->be, o_bytes, &dout) : SPEED_ERR_NO_MEMORY;
        speed_kv_layer_t tkv = pool_layer(&ps, dpool);
        speed_mat_t tq = {dq, SPEED_DTYPE_F32, n_rows, d, qs};
        if (st == SPEED_OK)
            st =
                speed_op_attention(t->be, speed_mat(dout, SPEED_DTYPE_F32, n_rows, d), tq, &tkv, n_heads, &rows, scale);
        if (st == SPEED_OK) st = from_backend(t->be, got, dout, o_bytes);
        report(t, "attention", desc, st, st == SPEED_OK ? norm_err(got, d, want, d, n_rows, d) : 0, tol_reduce(dtype));
        speed_backend_free(t->be, dpool);
        speed_backend_free(t->be, dq);
        speed_backend_free(t->be, dout);
    }
    for (int s = 0; s < n_seqs; s++) speed_aligned_free(tables[s]);
    speed_aligned_free(tables);
    speed_aligned_free(row_table);
    speed_aligned_free(n_visible);
    speed_aligned_free(perm);
    speed_aligned_free(pool);
    if (view) speed_aligned_free(cpool);
    speed_aligned_free(q);
    speed_aligned_free(want);
    speed_aligned_free(got);
}

static void case_attention(const char *what, int n_heads, int n_kv_heads, int head_dim, int B, speed_dtype_t dtype,
                           const seq_t *seqs, int n_seqs, float q_scale, int64_t q_pad) {
    case_attention_heads(what, n_heads, n_kv_heads, 0, n_kv_heads, head_dim, B, dtype, seqs, n_seqs, q_scale, q_pad);
}

/* ---- the cases ----------------------------------------------------------------------- */

/* ---- topk ---------------------------------------------------------------------------- */

typedef enum {
    TOPK_RANDOM,    /* uniform in [-20, 20): distinct values */
    TOPK_TIES,      /* five levels: the top k are mostly ties, which go to the lowest columns */
    TOPK_EXTREMES,  /* per row: -inf and ±3e38 sprinkled; all -inf; a +inf; one finite value */
    TOPK_ASCENDING, /* every column displaces the current worst (the heap's worst case) */
} topk_mode_t;

static const char *const topk_mode_names[] = {"random", "ties", "extremes", "ascending"};

static void topk_fill(float *x, int64_t n, int64_t V, int64_t stride, topk_mode_t mode) {
    for (int64_t r = 0; r < n; r++) {
        float *row = x + r * stride;
        for (int64_t c = 0; c < V; c++) {
            switch (mode) {
            case TOPK_RANDOM: row[c] = rng_uniform(-20, 20); break;
            case TOPK_TIES: row[c] = (float)rng_below(5) - 2.0f; break;
            case TOPK_ASCENDING: row[c] = (float)c * 0.25f - 1000.0f; break;
            case TOPK_EXTREMES:
                switch (r % 4) {
                case 0: {
                    int64_t u = rng_below(100);
                    row[c] = u < 5 ? -INFINITY : u < 7 ? 3e38f : u < 9 ? -3e38f : rng_uniform(-5, 5);
                    break;
                }
                case 1: row[c] = -INFINITY; break;
                case 2: row[c] = c == V / 2 ? INFINITY : c % 3 == 0 ? -INFINITY : rng_uniform(-5, 5); break;
                default: row[c] = c == V - 1 ? 1.5f : -INFINITY; break;
                }
                break;
            }
        }
        for (int64_t c = V; c < stride; c++) row[c] = 1e30f; /* padding: never a candidate */
    }
}

/* lse error: |got - want| / max(|want|, 1) (relative, absolute near 0); infinities must match. */
static double lse_err(float got, float want) {
    if (isinf(want) || isinf(got) || isnan(want) || isnan(got))
        return (isinf(want) && got == want) || (isnan(want) && isnan(got)) ? 0 : INFINITY;
    return fabs((double)got - want) / fmax(fabs((double)want), 1.0);
}

/* Ids and value bits must equal cpu-ref's exactly (the selection is exact and ties are ordered by
 * column); err is the largest lse error. logits have row stride V + l_pad, vals k + v_pad. */
static void case_topk(int64_t n, int64_t V, int k, topk_mode_t mode, int64_t l_pad, int64_t v_pad) {
    char desc[96];
    snprintf(desc, sizeof desc, "n=%lld V=%lld k=%d %s%s", (long long)n, (long long)V, k, topk_mode_names[mode],
             l_pad || v_pad ? " strided" : "");
    const int64_t ls = V + l_pad, vs = k + v_pad;
    const size_t l_bytes = (size_t)(n * ls) * sizeof(float), v_bytes = (size_t)(n * vs) * sizeof(float);
    const size_t i_bytes = (size_t)(n * k) * sizeof(int32_t), e_bytes = (size_t)n * sizeof(float);
    float *x = host_alloc(l_bytes);
    topk_fill(x, n, V, ls, mode);
    float *want_v = host_alloc(v_bytes), *got_v = host_alloc(v_bytes), *want_e = host_alloc(e_bytes),
          *got_e = host_alloc(e_bytes), *v0 = host_alloc(v_bytes);
    int32_t *want_i = host_alloc(i_bytes), *got_i = host_alloc(i_bytes);
    fill_uniform(v0, n * vs, -1, 1); /* the padding of vals must stay */
    memcpy(want_v, v0, v_bytes);
    SPEED_ASSERT(speed_op_topk(ref, (speed_mat_t){want_v, SPEED_DTYPE_F32, n, k, vs}, want_i, want_e,
                               (speed_mat_t){x, SPEED_DTYPE_F32, n, V, ls}, k) == SPEED_OK);
    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        if (!target_runs(t, "topk", desc, SPEED_OP_TOPK, SPEED_DTYPE_F32, 0)) continue;
        void *dx = to_backend(t->be, x, l_bytes), *dv = to_backend(t->be, v0, v_bytes), *di = NULL, *de = NULL;
        speed_status_t st = dx && dv ? SPEED_OK : SPEED_ERR_NO_MEMORY;
        if (st == SPEED_OK) st = speed_backend_alloc(t->be, i_bytes, &di);
        if (st == SPEED_OK) st = speed_backend_alloc(t->be, e_bytes, &de);
        if (st == SPEED_OK)
            st = speed_op_topk(t->be, (speed_mat_t){dv, SPEED_DTYPE_F32, n, k, vs}, di, de,
                               (speed_mat_t){dx, SPEED_DTYPE_F32, n, V, ls}, k);
        if (st == SPEED_OK) st = from_backend(t->be, got_v, dv, v_bytes);
        if (st == SPEED_OK) st = from_backend(t->be, got_i, di, i_bytes);
        if (st == SPEED_OK) st = from_backend(t->be, got_e, de, e_bytes);
        double err = 0;
        if (st == SPEED_OK) {
            for (int64_t r = 0; r < n && err != INFINITY; r++) {
                double e = lse_err(got_e[r], want_e[r]);
                if (e > err) err = e;
                for (int j = 0; j < k; j++) {
                    const float gv = got_v[r * vs + j], wv = want_v[r * vs + j];
                    if (got_i[r * k + j] != want_i[r * k + j] || memcmp(&gv, &wv, sizeof gv) != 0) {
                        printf("  row %lld rank %d: id %d value %g, cpu-ref id %d value %g\n", (long long)r, j,
                               got_i[r * k + j], (double)gv, want_i[r * k + j], (double)wv);
                        err = INFINITY;
                        break;
                    }
                }
            }
            if (memcmp(got_v, want_v, v_bytes) != 0 && err != INFINITY) err = INFINITY; /* padding written */
        }
        report(t, "topk", desc, st, err, TOL_ELEMENTWISE);
        speed_backend_free(t->be, dx);
        speed_backend_free(t->be, dv);
        speed_backend_free(t->be, di);
        speed_backend_free(t->be, de);
    }
    speed_aligned_free(x);
    speed_aligned_free(want_v);
    speed_aligned_free(got_v);
    speed_aligned_free(want_e);
    speed_aligned_free(got_e);
    speed_aligned_free(v0);
    speed_aligned_free(want_i);
    speed_aligned_free(got_i);
}

static int n_errors_logged;
static void count_errors(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                         const char *line) {
    (void)user;
    (void)subsys;
    (void)request_id;
    (void)line;
    if (level == SPEED_LOG_ERROR) n_errors_logged++;
}

/* Shapes the wrapper must refuse (logged once each) on every backend, before any work. */
static void case_topk_invalid(void) {
    for (int ti = 0; ti < n_targets; ti++) {
        const target_t *t = &targets[ti];
        void *dx = NULL, *dv = NULL, *di = NULL, *de = NULL;
        speed_status_t st = speed_backend_alloc(t->be, 4 * 300 * sizeof(float), &dx);
        if (st == SPEED_OK) st = speed_backend_alloc(t->be, 4 * 300 * sizeof(float), &dv);
        if (st == SPEED_OK) st = speed_backend_alloc(t->be, 4 * 300 * sizeof(int32_t), &di);
        if (st == SPEED_OK) st = speed_backend_alloc(t->be, 4 * sizeof(float), &de);
        int n_bad = 0, n_rejected = 0;
#define TOPK_BAD(vals, ids, lse, logits, k)                                                          \
    do {                                                                                             \
        n_bad++;                                                                                     \
        n_rejected += speed_op_topk(t->be, vals, ids, lse, logits, k) == SPEED_ERR_INVALID_ARGUMENT; \
    } while (0)
        if (st == SPEED_OK) {
            speed_mat_t x7 = speed_mat(dx, SPEED_DTYPE_F32, 4, 7), x300 = speed_mat(dx, SPEED_DTYPE_F32, 4, 300);
            speed_log_set_sink(count_errors, NULL); /* the expected errors are counted, not printed */
            n_errors_logged = 0;
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 0), di, de, x7, 0);       /* k = 0 */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 8), di, de, x7, 8);       /* k > V */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 257), di, de, x300, 257); /* k > 256 */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 3), di, de, x7, -1);
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 4), di, de, x7, 3);  /* vals columns != k */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 3, 3), di, de, x7, 3);  /* rows differ */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_BF16, 4, 3), di, de, x7, 3); /* vals not f32 */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 3), di, de, speed_mat(dx, SPEED_DTYPE_F16, 4, 7), 3);
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 3), NULL, de, x7, 3);
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 3), di, NULL, x7, 3);
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 3), di, de, speed_mat(NULL, SPEED_DTYPE_F32, 4, 7), 3);
            TOPK_BAD(speed_mat(dx, SPEED_DTYPE_F32, 4, 3), di, de, x7, 3); /* vals overlap logits */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 3), dx, de, x7, 3); /* ids overlap logits */
            TOPK_BAD(speed_mat(dv, SPEED_DTYPE_F32, 4, 3), di, (float *)dx + 27, x7, 3);
            speed_log_set_sink(NULL, NULL);
            if (n_errors_logged != n_bad) n_rejected = -1;
        }
#undef TOPK_BAD
        char desc[64];
        snprintf(desc, sizeof desc, "%d invalid calls rejected", n_bad);
        report(t, "topk", desc, st, n_rejected == n_bad ? 0 : INFINITY, TOL_EXACT);
        speed_backend_free(t->be, dx);
        speed_backend_free(t->be, dv);
        speed_backend_free(t->be, di);
        speed_backend_free(t->be, de);
    }
}

static void run_all(void) {
    static const speed_dtype_t dtypes[3] = {SPEED_DTYPE_F32, SPEED_DTYPE_BF16, SPEED_DTYPE_F16};

    for (int di = 0; di < 3; di++) {
        speed_dtype_t dt = dtypes[di];
        case_embed(1, 1, 1, dt);
        case_embed(17, 3, 5, dt);
        case_embed(1000, 127, 33, dt);
        case_embed(3001, 2048, 9, dt);
    }

    for (int di = 0; di < 3; di++) {
        speed_dtype_t dt = dtypes[di];
        case_rmsnorm(1, 1, dt, 1e-5f, false);
        case_rmsnorm(3, 17, dt, 1e-6f, false);
        case_rmsnorm(5, 64, dt, 1e-5f, true);
        case_rmsnorm(7, 2048, dt, 1e-5f, false);
        case_rmsnorm(2, 1003, dt, 1e-6f, true);
    }

    for (int di = 0; di < 3; di++) {
        speed_dtype_t dt = dtypes[di];
        case_matmul(1, 1, 1, dt, false, 0, 0, 1);
        case_matmul(3, 17, 5, dt, false, 0, 0, 3);
        case_matmul(1, 64, 127, dt, true, 0, 0, 1);
        case_matmul(17, 127, 3, dt, false, 0, 0, 17);
        case_matmul(5, 1000, 33, dt, true, 0, 0, 5);
        case_matmul(7, 96, 40, dt, true, 4, 8, 7); /* views: x, out inside wider rows */
        case_matmul(3, 1003, 129, dt, false, 0, 0, 3);
        case_matmul(64, 256, 704, dt, false, 0, 0, 64);
        case_matmul(1, 2048, 2048, dt, false, 0, 0, 1);   /* decode: one token, a 2048² weight */
        case_matmul(4, 2048, 2048, dt, true, 0, 0, 4);    /* small decode batch, residual add */
        case_matmul(512, 2048, 5632, dt, false, 0, 0, 6); /* prefill, MLP up: ref checks 6 rows */
    }

    for (int l3 = 0; l3 < 2; l3++) {
        case_rope(1, 1, 2, 1, l3, 0);
        case_rope(3, 3, 6, 17, l3, 0);
        case_rope(17, 32, 64, 4096, l3, 0);
        case_rope(5, 8, 128, 131072, l3, 0);
        case_rope(64, 4, 128, 1000, l3, 0);
        case_rope(7, 5, 34, 300, l3, 24); /* q heads inside a fused qkv row */
        case_rope(2, 3, 18, 64, l3, 0);
    }

    case_binary(SPEED_OP_SWIGLU, 1, 1, 0, false);
    case_binary(SPEED_OP_SWIGLU, 3, 17, 0, false);
    case_binary(SPEED_OP_SWIGLU, 7, 1000, 1, false);
    case_binary(SPEED_OP_SWIGLU, 2, 5632, 2, false);
    case_binary(SPEED_OP_SWIGLU, 3, 127, 0, true);
    case_binary(SPEED_OP_ADD, 1, 1, 0, false);
    case_binary(SPEED_OP_ADD, 3, 17, 1, false);
    case_binary(SPEED_OP_ADD, 64, 2048, 2, false);
    case_binary(SPEED_OP_ADD, 5, 1003, 0, false);

    case_get_rows(1, 1, 1);
    case_get_rows(17, 3, 5);
    case_get_rows(100, 1000, 100);
    case_get_rows(512, 2048, 7);

    for (int di = 0; di < 3; di++) {
        speed_dtype_t dt = dtypes[di];
        case_kv(1, 1, 1, 2, dt, 1, false);
        case_kv(6, 3, 2, 17 * 2, dt, 17, true);
        case_kv(8, 16, 8, 64, dt, 100, false);
        case_kv(4, 16, 4, 128, dt, 64, true);
        /* head views (a tensor-parallel rank's heads of a shared pool): only those heads move */
        case_kv_heads(6, 3, 4, 1, 2, 17 * 2, dt, 17, true);
        case_kv_heads(8, 16, 4, 2, 2, 64, dt, 100, false);
        case_kv_heads(4, 16, 8, 3, 1, 128, dt, 40, false);
    }

    for (int di = 0; di < 3; di++) {
        speed_dtype_t dt = dtypes[di];
        /* decode: one row per sequence, lengths 1 .. 1000+, one empty row */
        const seq_t decode[7] = {{0, 1}, {2, 1}, {16, 1}, {63, 1}, {126, 1}, {1100, 1}, {0, -1}};
        case_attention("decode", 32, 8, 64, 16, dt, decode, 7, 1.0f, 0);
        case_attention("decode", 14, 2, 64, 7, dt, decode, 7, 4.0f, 0);
        /* prefill of 33 new rows on top of a 100-entry cached prefix, and a fresh prompt */
        const seq_t prefill[2] = {{100, 33}, {0, 17}};
        case_attention("prefill", 8, 8, 128, 16, dt, prefill, 2, 1.0f, 0);
        case_attention("prefill", 4, 1, 34, 1, dt, prefill, 2, 2.0f, 0);
        /* a mixed batch with q as a slice of a fused qkv row */
        const seq_t mixed[4] = {{0, 3}, {5, 1}, {40, 2}, {0, -1}};
        case_attention("mixed", 6, 2, 80, 3, dt, mixed, 4, 1.0f, 2 * 2 * 80);
        /* head views of a pool with 4 kv heads per slot, against a pool of the view's heads */
        case_attention_heads("decode", 8, 4, 1, 2, 64, 16, dt, decode, 7, 1.0f, 0);
        case_attention_heads("prefill", 4, 4, 2, 2, 128, 16, dt, prefill, 2, 1.0f, 0);
        case_attention_heads("mixed", 6, 4, 1, 2, 80, 3, dt, mixed, 4, 1.0f, 2 * 2 * 80);
    }

    /* topk: vocabularies 1 .. Llama 3's 128256, k 1 .. 256, rows 1 .. 9 */
    {
        static const int64_t vocab[] = {1, 7, 1000, 32000, 128256};
        static const int ks[] = {1, 5, 20, 64, 256};
        int rows = 1;
        for (int vi = 0; vi < 5; vi++)
            for (int ki = 0; ki < 5; ki++) {
                if (ks[ki] > vocab[vi]) continue;
                case_topk(rows, vocab[vi], ks[ki], TOPK_RANDOM, 0, 0);
                rows = rows % 9 + 1;
            }
        for (int mode = TOPK_TIES; mode <= TOPK_ASCENDING; mode++) {
            case_topk(4, 7, 5, (topk_mode_t)mode, 0, 0);
            case_topk(8, 1000, 20, (topk_mode_t)mode, 0, 0);
            case_topk(4, 32000, 256, (topk_mode_t)mode, 0, 0);
            case_topk(5, 128256, 64, (topk_mode_t)mode, 0, 0);
            case_topk(9, 128256, 256, (topk_mode_t)mode, 0, 0);
        }
        case_topk(3, 1000, 64, TOPK_RANDOM, 5, 3);
        case_topk(6, 4099, 256, TOPK_TIES, 1, 2);
        case_topk_invalid();
    }

    /* Paths of device backends the shapes above may not reach (cheap on the CPU too): more rows
     * than one CUDA grid dimension launches (65535), so kernels loop over rows; decode rows so
     * long and so few that attention splits them across blocks (split-K) and merges the parts;
     * head_dim above one thread's share of a block (256) up to the CUDA kernel's limit (512). */
    const int64_t many = 70001;
    case_embed(17, 3, many, SPEED_DTYPE_BF16);
    case_rmsnorm(many, 5, SPEED_DTYPE_F16, 1e-5f, true);
    case_rope(many, 1, 6, 5000, true, 0);
    case_binary(SPEED_OP_SWIGLU, many, 3, 1, false);
    case_binary(SPEED_OP_ADD, many, 3, 2, false);
    case_get_rows(many, 3, many);
    case_matmul(many, 3, 5, SPEED_DTYPE_F32, true, 0, 0, 64);
    case_kv(4400, 16, 1, 2, SPEED_DTYPE_F16, many, false);
    case_topk(many, 3, 2, TOPK_TIES, 0, 0);
    for (int di = 0; di < 3; di++) {
        speed_dtype_t dt = dtypes[di];
        const seq_t long_decode[3] = {{5000, 1}, {4099, 1}, {257, 1}};
        case_attention("long decode", 4, 1, 128, 16, dt, long_decode, 3, 2.0f, 0);
        case_attention("long decode", 1, 1, 64, 32, dt, long_decode, 1, 4.0f, 0);
        const seq_t wide[2] = {{300, 2}, {0, 1}};
        case_attention("wide heads", 4, 2, 256, 16, dt, wide, 2, 1.0f, 0);
        case_attention("wide heads", 2, 1, 512, 8, dt, wide, 2, 1.0f, 0);
        case_attention("odd heads", 3, 3, 96 + 6, 5, dt, wide, 2, 1.0f, 0);
        case_attention_heads("long decode", 4, 4, 3, 1, 128, 16, dt, long_decode, 3, 2.0f, 0); /* split-K */
    }
}

/* ---- main ---------------------------------------------------------------------------- */

static int usage(void) {
    fprintf(stderr, "usage: test_backend_ops cpu|cuda|cpu-ref\n");
    return 1;
}

static speed_status_t add_target(const speed_backend_params_t *p, bool slow) {
    speed_backend_t *be = NULL;
    speed_status_t st = speed_backend_create(p, &be);
    if (st != SPEED_OK) return st;
    target_t *t = &targets[n_targets++];
    t->be = be;
    t->slow = slow;
    snprintf(t->label, sizeof t->label, "%s", speed_backend_name(be));
    return SPEED_OK;
}

int main(int argc, char **argv) {
    if (argc != 2) return usage();
    speed_backend_params_t rp = speed_backend_default_params();
    rp.kind = SPEED_BACKEND_CPU_REF;
    if (speed_backend_create(&rp, &ref) != SPEED_OK) {
        fprintf(stderr, "cannot create cpu-ref\n");
        return 1;
    }

    speed_backend_params_t p = speed_backend_default_params();
    speed_status_t st = SPEED_OK;
    if (strcmp(argv[1], "cpu") == 0) {
        p.kind = SPEED_BACKEND_CPU;
        p.n_threads = 2;
        speed_cpu_isa_t best = speed_cpu_isa_detect();
        for (int isa = SPEED_CPU_ISA_SCALAR; isa <= SPEED_CPU_ISA_AVX512_BF16 && st == SPEED_OK; isa++) {
            if (isa > (int)best) {
                printf("skipping isa %s: this cpu has only %s\n", speed_cpu_isa_name((speed_cpu_isa_t)isa),
                       speed_cpu_isa_name(best));
                continue;
            }
            p.cpu_isa_max = (speed_cpu_isa_t)isa;
            st = add_target(&p, isa == SPEED_CPU_ISA_SCALAR);
        }
    } else if (strcmp(argv[1], "cuda") == 0) {
        p.kind = SPEED_BACKEND_CUDA;
        st = add_target(&p, false);
    } else if (strcmp(argv[1], "cpu-ref") == 0) {
        p.kind = SPEED_BACKEND_CPU_REF;
        st = add_target(&p, true);
    } else {
        speed_backend_destroy(ref);
        return usage();
    }
    if (st != SPEED_OK) {
        bool some = n_targets > 0; /* one ISA worked and a later one did not: a bug, not absence */
        for (int i = 0; i < n_targets; i++) speed_backend_destroy(targets[i].be);
        speed_backend_destroy(ref);
        if (some) {
            fprintf(stderr, "backend '%s' was created with a lower ISA cap but not with cap %s: %s\n", argv[1],
                    speed_cpu_isa_name(p.cpu_isa_max), speed_status_string(st));
            return 1;
        }
        /* cuda: skipped only on a machine without a GPU; with one, a backend that is not built
         * (UNSUPPORTED) or cannot be created fails (test_gpu.h) */
        if (p.kind == SPEED_BACKEND_CUDA) {
            char detail[512];
            snprintf(detail, sizeof detail, "%s (%s)", speed_status_string(st), speed_log_last_error());
            tu_cuda_unavailable_exit("test_backend_ops cuda", detail);
        }
        SKIP_TEST("backend '%s' cannot be created here: %s (%s)", argv[1], speed_status_string(st),
                  speed_log_last_error());
    }

    double t0 = now_s();
    for (int i = 0; i < n_targets; i++) printf("backend under test: %s\n", targets[i].label);
    run_all();
    printf("%d cases, %d failed, %d skipped, %.1f s\n", n_cases, n_failed, n_skipped, now_s() - t0);

    for (int i = 0; i < n_targets; i++) speed_backend_destroy(targets[i].be);
    speed_backend_destroy(ref);
    return CHECK_DONE();
}
