/* Batch-invariant matmul on the cpu backend: with speed_backend_params_t.batch_invariant, the
 * few-row matmul (n = 1 .. 8 rows, decode) must give every row bit for bit (memcmp) what the
 * blocked GEMM gives the same row inside a bigger matmul (N_BIG rows, which always takes the
 * GEMM). Checked on every ISA level this CPU runs (the cap cpu_isa_max), on 1 and 2 threads (the
 * second splits the weight rows over the pool when the matmul is big enough), for f32, bf16 and
 * f16 weights, over shapes that hit every edge of the kernels:
 *   - k not a multiple of 32 (the masked pair tail), odd k (a half pair), k across several kc
 *     blocks of 256 and not a multiple of it;
 *   - m not a multiple of 16 or of the GEMM's 64-row panel (masked rows, the GEMM's edge tile);
 *   - accumulate on and off (out starts from random values);
 *   - strided x and out (views inside wider rows; the padding of out must stay untouched) and
 *     weight rows with a stride past k whose padding holds NaN bit patterns, which no kernel
 *     may let into a result.
 * With the mode off the same comparison is made and the differing rows are counted and printed
 * (not asserted: nothing promises the few-row paths differ).
 *
 *   test_matmul_batch_invariant          (every ISA level up to what the CPU has)
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "dtype.h"

#define N_BIG 24 /* rows of the reference matmul: more than any few-row path takes */
#define N_FEW 8

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static float rand_unit(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

/* Weights [m][k] with row stride ldw; the columns past k hold NaN patterns. */
static void *make_weights(speed_dtype_t dt, int64_t m, int64_t k, int64_t ldw) {
    const size_t es = speed_dtype_size(dt);
    unsigned char *w = malloc((size_t)(m * ldw) * es);
    SPEED_ASSERT(w != NULL);
    memset(w, 0xff, (size_t)(m * ldw) * es); /* all ones: NaN in f32, bf16 and f16 */
    for (int64_t j = 0; j < m; j++)
        for (int64_t p = 0; p < k; p++) {
            float v = rand_unit();
            void *d = w + (size_t)(j * ldw + p) * es;
            if (dt == SPEED_DTYPE_F32) {
                memcpy(d, &v, 4);
            } else {
                uint16_t h = dt == SPEED_DTYPE_BF16 ? speed_dtype_f32_to_bf16(v) : speed_dtype_f32_to_f16(v);
                memcpy(d, &h, 2);
            }
        }
    return w;
}

typedef struct {
    int64_t k, m;
    int64_t x_pad, o_pad, w_pad; /* row strides past k / m / k */
} shape_t;

static const shape_t shapes[] = {
    {1, 1, 0, 0, 0},     {2, 17, 0, 0, 0},     {31, 16, 0, 0, 0},    {33, 63, 3, 5, 0},  {64, 64, 0, 0, 0},
    {255, 65, 0, 0, 7},  {256, 128, 0, 0, 0},  {257, 129, 1, 0, 1},  {300, 15, 0, 0, 0}, {513, 200, 16, 3, 4},
    {1000, 97, 0, 0, 0}, {1003, 256, 0, 0, 9}, {2048, 160, 0, 0, 0},
};
#define N_SHAPES ((int)(sizeof shapes / sizeof shapes[0]))

/* One shape, one dtype, one accumulate: the big matmul, then every n = 1 .. N_FEW at two row
 * offsets. Returns how many (n, offset) results differ from the big one's rows (0 in the mode). */
static int case_run(speed_backend_t *be, const char *who, const shape_t *s, speed_dtype_t dt, bool acc,
                    bool must_match) {
    const int64_t k = s->k, m = s->m, ldx = k + s->x_pad, ldo = m + s->o_pad, ldw = k + s->w_pad;
    const size_t xb = (size_t)(N_BIG * ldx) * sizeof(float), ob = (size_t)(N_BIG * ldo) * sizeof(float);
    float *x = NULL, *out0 = malloc(ob), *big = NULL, *few = NULL;
    SPEED_ASSERT(out0 != NULL);
    SPEED_ASSERT(speed_backend_alloc(be, xb, (void **)&x) == SPEED_OK);
    SPEED_ASSERT(speed_backend_alloc(be, ob, (void **)&big) == SPEED_OK);
    SPEED_ASSERT(speed_backend_alloc(be, ob, (void **)&few) == SPEED_OK);
    for (int64_t i = 0; i < N_BIG * ldx; i++) x[i] = rand_unit();
    for (int64_t i = 0; i < N_BIG * ldo; i++) out0[i] = rand_unit();
    void *w = make_weights(dt, m, k, ldw);
    const void *wm = NULL;
    SPEED_ASSERT(speed_backend_map_weights(be, w, (size_t)(m * ldw) * speed_dtype_size(dt), &wm) == SPEED_OK);
    const speed_mat_t wv = {(void *)wm, dt, m, k, ldw};

    memcpy(big, out0, ob);
    speed_status_t st = speed_op_matmul(be, (speed_mat_t){big, SPEED_DTYPE_F32, N_BIG, m, ldo},
                                        (speed_mat_t){x, SPEED_DTYPE_F32, N_BIG, k, ldx}, wv, acc);
    CHECK_MSG(st == SPEED_OK, "%s: big matmul: %s", who, speed_status_string(st));
    int n_diff = 0;
    for (int n = 1; n <= N_FEW && st == SPEED_OK; n++)
        for (int64_t r0 = 0; r0 + n <= N_BIG; r0 += N_BIG - n) { /* the first rows, the last rows */
            memcpy(few, out0, ob);
            st = speed_op_matmul(be, (speed_mat_t){few + r0 * ldo, SPEED_DTYPE_F32, n, m, ldo},
                                 (speed_mat_t){x + r0 * ldx, SPEED_DTYPE_F32, n, k, ldx}, wv, acc);
            CHECK_MSG(st == SPEED_OK, "%s: matmul of %d rows: %s", who, n, speed_status_string(st));
            if (st != SPEED_OK) break;
            /* every row of `few` outside [r0, r0 + n), and every padding column, must be out0 */
            const bool same = memcmp(few + r0 * ldo, big + r0 * ldo, (size_t)((n - 1) * ldo + m) * sizeof(float)) == 0;
            bool pad_ok = memcmp(few, out0, (size_t)(r0 * ldo) * sizeof(float)) == 0 &&
                          memcmp(few + (r0 + n) * ldo, out0 + (r0 + n) * ldo,
                                 (size_t)((N_BIG - r0 - n) * ldo) * sizeof(float)) == 0;
            for (int64_t i = r0; i < r0 + n; i++)
                for (int64_t c = m; c < ldo; c++) pad_ok = pad_ok && few[i * ldo + c] == out0[i * ldo + c];
            bool finite = true;
            for (int64_t i = r0; i < r0 + n; i++)
                for (int64_t c = 0; c < m; c++) finite = finite && isfinite(few[i * ldo + c]);
            CHECK_MSG(pad_ok && finite, "%s: k %lld m %lld %s%s, %d rows: %s", who, (long long)k, (long long)m,
                      speed_dtype_name(dt), acc ? " acc" : "", n,
                      pad_ok ? "non-finite result (weight padding read?)" : "wrote outside its rows");
            if (!same) n_diff++;
            if (must_match)
                CHECK_MSG(same,
                          "%s: k %lld m %lld %s%s: rows %lld .. %lld alone differ from the same rows in a "
                          "%d-row matmul",
                          who, (long long)k, (long long)m, speed_dtype_name(dt), acc ? " acc" : "", (long long)r0,
                          (long long)(r0 + n - 1), N_BIG);
        }
    speed_backend_unmap_weights(be, wm);
    free(w);
    free(out0);
    speed_backend_free(be, x);
    speed_backend_free(be, big);
    speed_backend_free(be, few);
    return n_diff;
}

int main(void) {
    const speed_cpu_isa_t best = speed_cpu_isa_detect();
    const speed_dtype_t dts[] = {SPEED_DTYPE_BF16, SPEED_DTYPE_F32, SPEED_DTYPE_F16};
    for (int isa = SPEED_CPU_ISA_SCALAR; isa <= (int)best; isa++) {
#if !defined(__x86_64__)
        if (isa > SPEED_CPU_ISA_SCALAR) break;
#endif
        for (int threads = 1; threads <= 2; threads++)
            for (int mode = 1; mode >= 0; mode--) {
                speed_backend_params_t bp = speed_backend_default_params();
                bp.kind = SPEED_BACKEND_CPU;
                bp.cpu_isa_max = (speed_cpu_isa_t)isa;
                bp.n_threads = threads;
                bp.batch_invariant = mode == 1;
                speed_backend_t *be = NULL;
                speed_status_t st = speed_backend_create(&bp, &be);
                CHECK_MSG(st == SPEED_OK, "cpu %s: %s", speed_cpu_isa_name((speed_cpu_isa_t)isa),
                          speed_status_string(st));
                if (st != SPEED_OK) continue;
                char who[96];
                snprintf(who, sizeof who, "cpu %s, %d thread%s, mode %s", speed_cpu_isa_name((speed_cpu_isa_t)isa),
                         threads, threads == 1 ? "" : "s", mode ? "on" : "off");
                int n_diff = 0, n_cases = 0;
                for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++)
                    for (int si = 0; si < N_SHAPES; si++)
                        for (int acc = 0; acc <= 1; acc++) {
                            n_diff += case_run(be, who, &shapes[si], dts[d], acc == 1, mode == 1);
                            n_cases += 2 * N_FEW;
                        }
                fprintf(stderr, "%-40s %4d of %d few-row matmuls differ from the same rows in the GEMM\n", who, n_diff,
                        n_cases);
                speed_backend_destroy(be);
            }
    }
    return CHECK_DONE();
}
