/* The cpu-ref backend against answers worked out by hand, and the op wrappers' validation.
 *
 * cpu-ref is the spec every other backend is compared with (test_backend_ops.c), so here it
 * is checked against something independent of it: tiny cases whose results are known in
 * closed form, formulas written out again in a different shape (RoPE llama3 scaling), and the
 * KV pool layout computed from the address formula in backend.h.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "log.h"

static speed_backend_t *be;

/* Errors logged by the wrappers are counted, not printed: bad-argument tests expect them. */
static int n_errors_logged;
static void count_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                       const char *line) {
    (void)user;
    (void)subsys;
    (void)request_id;
    (void)line;
    if (level == SPEED_LOG_ERROR) n_errors_logged++;
}

static uint16_t bf16(float f) { return speed_dtype_f32_to_bf16(f); }
static uint16_t f16(float f) { return speed_dtype_f32_to_f16(f); }

#define N_OF(a) ((int64_t)(sizeof(a) / sizeof((a)[0])))

/* ---- lifecycle and memory ------------------------------------------------------------ */

static void test_lifecycle(void) {
    speed_backend_t *b = NULL;
    speed_backend_params_t p = speed_backend_default_params();
    p.kind = SPEED_BACKEND_CPU_REF;
    int64_t live = speed_alloc_live_count();
    CHECK_INT_EQ(speed_backend_create(&p, &b), SPEED_OK);
    CHECK(b != NULL);
    if (!b) return;
    CHECK_STR_EQ(speed_backend_name(b), "cpu-ref");
    CHECK_INT_EQ(b->kind, SPEED_BACKEND_CPU_REF);

    void *m = NULL;
    CHECK_INT_EQ(speed_backend_alloc(b, 1000, &m), SPEED_OK);
    CHECK(m && (uintptr_t)m % 64 == 0);
    unsigned char src[1000], dst[1000];
    for (int i = 0; i < 1000; i++) src[i] = (unsigned char)(i * 7 + 1);
    CHECK_INT_EQ(speed_backend_upload(b, m, src, sizeof src), SPEED_OK);
    CHECK_INT_EQ(speed_backend_download(b, dst, m, sizeof dst), SPEED_OK);
    CHECK(memcmp(src, dst, sizeof src) == 0);
    CHECK_INT_EQ(speed_backend_memset_zero(b, m, 500), SPEED_OK);
    CHECK_INT_EQ(speed_backend_download(b, dst, m, sizeof dst), SPEED_OK);
    int zeros_ok = 1;
    for (int i = 0; i < 500; i++) zeros_ok &= dst[i] == 0;
    CHECK(zeros_ok && memcmp(dst + 500, src + 500, 500) == 0);
    CHECK_INT_EQ(speed_backend_synchronize(b), SPEED_OK);

    const void *w = NULL;
    CHECK_INT_EQ(speed_backend_map_weights(b, src, sizeof src, &w), SPEED_OK);
    CHECK(w == (const void *)src); /* no copy on CPU */
    speed_backend_unmap_weights(b, w);
    speed_backend_free(b, m);
    speed_backend_free(b, NULL);

    for (int d = 0; d < SPEED_DTYPE_COUNT; d++)
        for (int op = 0; op < SPEED_OP_COUNT; op++)
            CHECK(speed_backend_supports_op(b, (speed_op_t)op, (speed_dtype_t)d));
    CHECK(!speed_backend_supports_op(b, SPEED_OP_COUNT, SPEED_DTYPE_F32));
    CHECK(!speed_backend_supports_op(b, SPEED_OP_MATMUL, (speed_dtype_t)7));

    speed_backend_destroy(b);
    speed_backend_destroy(NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), live); /* the struct and its context went together */

    /* An injected allocation failure is a status, and leaks nothing. */
    b = NULL;
    speed_alloc_fail_after(0, 0);
    CHECK_INT_EQ(speed_backend_create(&p, &b), SPEED_ERR_NO_MEMORY);
    speed_alloc_fail_after(-1, 0);
    CHECK(b == NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

/* ---- embed, add, get_rows ------------------------------------------------------------ */

static void test_embed(void) {
    /* table [3][2], values exact in every dtype */
    const float vals[3][2] = {{1.5f, -2.25f}, {0.0f, 65504.0f}, {-0.125f, 3.0f}};
    float t32[6];
    uint16_t tb[6], th[6];
    for (int i = 0; i < 6; i++) {
        t32[i] = vals[i / 2][i % 2];
        tb[i] = bf16(t32[i]);
        th[i] = f16(t32[i]);
    }
    tb[3] = bf16(65536.0f); /* 65504 is not a bf16 value; 65536 is */
    const int32_t ids[4] = {2, 0, 2, 1};
    void *tables[3] = {t32, tb, th};
    for (int d = 0; d < SPEED_DTYPE_COUNT; d++) {
        float out[4][2];
        memset(out, 0xff, sizeof out);
        CHECK_INT_EQ(speed_op_embed(be, speed_mat(out, SPEED_DTYPE_F32, 4, 2),
                                    speed_mat(tables[d], (speed_dtype_t)d, 3, 2), ids),
                     SPEED_OK);
        for (int i = 0; i < 4; i++)
            for (int c = 0; c < 2; c++) {
                float want = vals[ids[i]][c];
                if (d == SPEED_DTYPE_BF16 && ids[i] == 1 && c == 1) want = 65536.0f;
                CHECK_MSG(out[i][c] == want, "%s [%d][%d]: %g != %g", speed_dtype_name((speed_dtype_t)d), i, c,
                          out[i][c], want);
            }
    }
}

static void test_add_get_rows(void) {
    float a[2][3] = {{1, 2, 3}, {4, 5, 6}}, b[2][3] = {{0.5f, -2, 10}, {-4, 0.25f, 1e30f}};
    float out[2][3];
    CHECK_INT_EQ(speed_op_add(be, speed_mat(out, SPEED_DTYPE_F32, 2, 3), speed_mat(a, SPEED_DTYPE_F32, 2, 3),
                              speed_mat(b, SPEED_DTYPE_F32, 2, 3)),
                 SPEED_OK);
    CHECK(out[0][0] == 1.5f && out[0][1] == 0 && out[0][2] == 13 && out[1][0] == 0 && out[1][1] == 5.25f &&
          out[1][2] == 1e30f);
    /* in place: a += a */
    CHECK_INT_EQ(speed_op_add(be, speed_mat(a, SPEED_DTYPE_F32, 2, 3), speed_mat(a, SPEED_DTYPE_F32, 2, 3),
                              speed_mat(a, SPEED_DTYPE_F32, 2, 3)),
                 SPEED_OK);
    CHECK(a[0][0] == 2 && a[1][2] == 12);

    /* get_rows from a strided view: x is the left 2 columns of a [3][4] buffer */
    float x[3][4] = {{1, 2, -1, -1}, {3, 4, -1, -1}, {5, 6, -1, -1}};
    speed_mat_t xv = {x, SPEED_DTYPE_F32, 3, 2, 4};
    const int32_t rows[4] = {2, 2, 0, 1};
    float g[4][2];
    CHECK_INT_EQ(speed_op_get_rows(be, speed_mat(g, SPEED_DTYPE_F32, 4, 2), xv, rows), SPEED_OK);
    CHECK(g[0][0] == 5 && g[0][1] == 6 && g[1][0] == 5 && g[2][0] == 1 && g[2][1] == 2 && g[3][0] == 3 && g[3][1] == 4);
}

/* ---- rmsnorm --------------------------------------------------------------------------- */

static void test_rmsnorm(void) {
    /* Constant vector: mean(x^2) = c^2, so out = c / sqrt(c^2 + eps) * w. */
    float x[2][4] = {{3, 3, 3, 3}, {-2, -2, -2, -2}};
    float w32[4] = {1, 2, 0.5f, -1};
    uint16_t wb[4], wh[4];
    for (int i = 0; i < 4; i++) {
        wb[i] = bf16(w32[i]);
        wh[i] = f16(w32[i]);
    }
    void *ws[3] = {w32, wb, wh};
    for (int d = 0; d < SPEED_DTYPE_COUNT; d++) {
        float out[2][4];
        CHECK_INT_EQ(speed_op_rmsnorm(be, speed_mat(out, SPEED_DTYPE_F32, 2, 4), speed_mat(x, SPEED_DTYPE_F32, 2, 4),
                                      speed_mat(ws[d], (speed_dtype_t)d, 1, 4), 0.0f),
                     SPEED_OK);
        for (int c = 0; c < 4; c++) {
            CHECK_NEAR(out[0][c], w32[c], 1e-7);
            CHECK_NEAR(out[1][c], -w32[c], 1e-7);
        }
    }
    /* With eps: 3 / sqrt(9 + 7) = 0.75 exactly. */
    float out[2][4];
    CHECK_INT_EQ(speed_op_rmsnorm(be, speed_mat(out, SPEED_DTYPE_F32, 2, 4), speed_mat(x, SPEED_DTYPE_F32, 2, 4),
                                  speed_mat(w32, SPEED_DTYPE_F32, 1, 4), 7.0f),
                 SPEED_OK);
    CHECK(out[0][0] == 0.75f && out[0][1] == 1.5f);
    /* [1, 2, 3, 4]: mean square 7.5; in place (out aliases x). */
    float y[4] = {1, 2, 3, 4};
    float ones[4] = {1, 1, 1, 1};
    CHECK_INT_EQ(speed_op_rmsnorm(be, speed_mat(y, SPEED_DTYPE_F32, 1, 4), speed_mat(y, SPEED_DTYPE_F32, 1, 4),
                                  speed_mat(ones, SPEED_DTYPE_F32, 1, 4), 1e-5f),
                 SPEED_OK);
    for (int c = 0; c < 4; c++) CHECK_NEAR(y[c], (c + 1) / sqrt(7.5 + 1e-5), 1e-6);
}

/* ---- matmul ---------------------------------------------------------------------------- */

static void test_matmul(void) {
    /* Identity in every dtype: out = x. */
    float x[2][3] = {{1, -2, 0.5f}, {4, 8, -16}};
    float id32[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
    uint16_t idb[9], idh[9];
    for (int i = 0; i < 9; i++) {
        idb[i] = bf16(((float *)id32)[i]);
        idh[i] = f16(((float *)id32)[i]);
    }
    void *ids[3] = {id32, idb, idh};
    for (int d = 0; d < SPEED_DTYPE_COUNT; d++) {
        float out[2][3];
        CHECK_INT_EQ(speed_op_matmul(be, speed_mat(out, SPEED_DTYPE_F32, 2, 3), speed_mat(x, SPEED_DTYPE_F32, 2, 3),
                                     speed_mat(ids[d], (speed_dtype_t)d, 3, 3), false),
                     SPEED_OK);
        CHECK(memcmp(out, x, sizeof x) == 0);
    }

    /* Known values, w is [m=2][k=3] (HF [out, in]): out = x · wᵀ.
     *   x0 = [1, -2, 0.5]: w0 = [1, 1, 1] -> -0.5; w1 = [2, 0, 4] -> 4
     *   x1 = [4, 8, -16]:  w0 -> -4;               w1 -> 8 - 64 = -56 */
    float w[2][3] = {{1, 1, 1}, {2, 0, 4}};
    uint16_t wb[6], wh[6];
    for (int i = 0; i < 6; i++) {
        wb[i] = bf16(((float *)w)[i]);
        wh[i] = f16(((float *)w)[i]);
    }
    void *ws[3] = {w, wb, wh};
    for (int d = 0; d < SPEED_DTYPE_COUNT; d++) {
        float out[2][2] = {{100, 100}, {100, 100}};
        CHECK_INT_EQ(speed_op_matmul(be, speed_mat(out, SPEED_DTYPE_F32, 2, 2), speed_mat(x, SPEED_DTYPE_F32, 2, 3),
                                     speed_mat(ws[d], (speed_dtype_t)d, 2, 3), false),
                     SPEED_OK);
        CHECK(out[0][0] == -0.5f && out[0][1] == 4 && out[1][0] == -4 && out[1][1] == -56);
        /* accumulate adds to what is there */
        CHECK_INT_EQ(speed_op_matmul(be, speed_mat(out, SPEED_DTYPE_F32, 2, 2), speed_mat(x, SPEED_DTYPE_F32, 2, 3),
                                     speed_mat(ws[d], (speed_dtype_t)d, 2, 3), true),
                     SPEED_OK);
        CHECK(out[0][0] == -1 && out[0][1] == 8 && out[1][0] == -8 && out[1][1] == -112);
    }

    /* Strided views everywhere: x is columns 0..2 of [2][5], w rows 0..1 of a [2][4] buffer
     * (column 3 is poison), out columns 0..1 of [2][3] (column 2 must stay untouched). */
    float xs[2][5] = {{1, -2, 0.5f, 99, 99}, {4, 8, -16, 99, 99}};
    float wsd[2][4] = {{1, 1, 1, 1e30f}, {2, 0, 4, 1e30f}};
    float os[2][3] = {{7, 7, 7}, {7, 7, 7}};
    speed_mat_t xv = {xs, SPEED_DTYPE_F32, 2, 3, 5}, wv = {wsd, SPEED_DTYPE_F32, 2, 3, 4},
                ov = {os, SPEED_DTYPE_F32, 2, 2, 3};
    CHECK_INT_EQ(speed_op_matmul(be, ov, xv, wv, false), SPEED_OK);
    CHECK(os[0][0] == -0.5f && os[0][1] == 4 && os[1][0] == -4 && os[1][1] == -56 && os[0][2] == 7 && os[1][2] == 7);

    /* k = 1000 of 0.1f: the sum is accumulated exactly enough that 1000 * 0.1f rounds right. */
    static float xl[1000], wl[1000];
    for (int i = 0; i < 1000; i++) {
        xl[i] = 0.1f;
        wl[i] = 1.0f;
    }
    float o1;
    CHECK_INT_EQ(speed_op_matmul(be, speed_mat(&o1, SPEED_DTYPE_F32, 1, 1), speed_mat(xl, SPEED_DTYPE_F32, 1, 1000),
                                 speed_mat(wl, SPEED_DTYPE_F32, 1, 1000), false),
                 SPEED_OK);
    CHECK(o1 == (float)(1000.0 * (double)0.1f));
}

/* ---- rope ------------------------------------------------------------------------------ */

static void test_rope_basic(void) {
    speed_rope_t rope = {.theta = 10000.0f};
    /* Position 0 is the identity, bit for bit. */
    float x[2][8], x0[2][8];
    for (int i = 0; i < 16; i++) ((float *)x)[i] = ((float *)x0)[i] = (float)(i * 0.37 - 2.1);
    const int32_t pos0[2] = {0, 0};
    CHECK_INT_EQ(speed_op_rope(be, speed_mat(x, SPEED_DTYPE_F32, 2, 8), 2, 4, pos0, &rope), SPEED_OK);
    CHECK(memcmp(x, x0, sizeof x) == 0);

    /* head_dim 2: one pair, inv_freq 1, angle = position. (1, 0) at position 1 -> (cos 1, sin 1);
     * (0, 1) at position 2 -> (-sin 2, cos 2). Two heads, each rotated the same way. */
    float y[2][4] = {{1, 0, 0, 1}, {0, 1, 1, 0}};
    const int32_t pos[2] = {1, 2};
    CHECK_INT_EQ(speed_op_rope(be, speed_mat(y, SPEED_DTYPE_F32, 2, 4), 2, 2, pos, &rope), SPEED_OK);
    CHECK_NEAR(y[0][0], cos(1.0), 1e-7);
    CHECK_NEAR(y[0][1], sin(1.0), 1e-7);
    CHECK_NEAR(y[0][2], -sin(1.0), 1e-7);
    CHECK_NEAR(y[0][3], cos(1.0), 1e-7);
    CHECK_NEAR(y[1][0], -sin(2.0), 1e-7);
    CHECK_NEAR(y[1][1], cos(2.0), 1e-7);
    CHECK_NEAR(y[1][2], cos(2.0), 1e-7);
    CHECK_NEAR(y[1][3], sin(2.0), 1e-7);

    /* head_dim 4, theta 10000: inv_freq = [1, 0.01]; pairs are (d0, d2) and (d1, d3), the
     * rotate-half layout, not interleaved (d0, d1). Position 100: angles 100 and 1. */
    float z[4] = {1, 1, 0, 0};
    const int32_t p100 = 100;
    CHECK_INT_EQ(speed_op_rope(be, speed_mat(z, SPEED_DTYPE_F32, 1, 4), 1, 4, &p100, &rope), SPEED_OK);
    double a0 = (double)(100.0f * 1.0f), a1 = (double)(100.0f * (float)(1.0 / pow(10000.0, 0.5)));
    CHECK_NEAR(z[0], cos(a0), 1e-6);
    CHECK_NEAR(z[2], sin(a0), 1e-6);
    CHECK_NEAR(z[1], cos(a1), 1e-6);
    CHECK_NEAR(z[3], sin(a1), 1e-6);
    CHECK_NEAR(a1, 1.0, 1e-6);

    /* A rotation keeps each pair's norm; and rotating by p then by q equals rotating by p + q. */
    float u[64], v[64];
    for (int i = 0; i < 64; i++) u[i] = v[i] = (float)sin(i * 1.3 + 0.2);
    const int32_t p5 = 5, p7 = 7, p12 = 12;
    CHECK_INT_EQ(speed_op_rope(be, speed_mat(u, SPEED_DTYPE_F32, 1, 64), 1, 64, &p5, &rope), SPEED_OK);
    CHECK_INT_EQ(speed_op_rope(be, speed_mat(u, SPEED_DTYPE_F32, 1, 64), 1, 64, &p7, &rope), SPEED_OK);
    CHECK_INT_EQ(speed_op_rope(be, speed_mat(v, SPEED_DTYPE_F32, 1, 64), 1, 64, &p12, &rope), SPEED_OK);
    for (int i = 0; i < 32; i++) {
        double n0 = sin(i * 1.3 + 0.2), n1 = sin((i + 32) * 1.3 + 0.2);
        CHECK_NEAR(hypot(u[i], u[i + 32]), hypot(n0, n1), 1e-6);
        CHECK_NEAR(u[i], v[i], 2e-6);
        CHECK_NEAR(u[i + 32], v[i + 32], 2e-6);
    }
}

/* Llama 3.1 frequency scaling, written out again from the paper's description rather than in
 * the reference's shape: a frequency is "high" when its wavelength is shorter than
 * orig / high_freq_factor, "low" when longer than orig / low_freq_factor, and in between its
 * scale goes linearly (in orig / wavelen) from 1/factor to 1. */
static double llama3_expected(double inv_freq, double factor, double low, double high, double orig, int *regime_p) {
    double wavelen = 2.0 * acos(-1.0) / inv_freq;
    if (wavelen < orig / high) {
        *regime_p = 0;
        return inv_freq;
    }
    if (wavelen > orig / low) {
        *regime_p = 2;
        return inv_freq / factor;
    }
    *regime_p = 1;
    double t = (orig / wavelen - low) / (high - low); /* 0 at the low edge, 1 at the high edge */
    return inv_freq * (1.0 / factor + t * (1.0 - 1.0 / factor));
}

static void test_rope_llama3(void) {
    const int hd = 128, half = hd / 2;
    speed_rope_t rope = {.theta = 500000.0f,
                         .llama3_scaling = true,
                         .factor = 8.0f,
                         .low_freq_factor = 1.0f,
                         .high_freq_factor = 4.0f,
                         .original_max_position = 8192};
    const int32_t positions[3] = {1, 37, 1000};
    int seen[3] = {0, 0, 0};
    for (int pi = 0; pi < 3; pi++) {
        /* one head; row i of the batch has a unit vector in pair i (x[i] = 1) */
        static float x[64][128];
        int32_t pos[64];
        memset(x, 0, sizeof x);
        for (int i = 0; i < half; i++) {
            x[i][i] = 1.0f;
            pos[i] = positions[pi];
        }
        CHECK_INT_EQ(speed_op_rope(be, speed_mat(x, SPEED_DTYPE_F32, half, hd), 1, hd, pos, &rope), SPEED_OK);
        for (int i = 0; i < half; i++) {
            int regime;
            double inv = llama3_expected(pow(500000.0, -2.0 * i / hd), 8, 1, 4, 8192, &regime);
            seen[regime]++;
            double angle = positions[pi] * inv;
            /* the reference rounds inv_freq and the angle to f32, as transformers does */
            double tol = 1e-6 + fabs(angle) * 3e-7;
            CHECK_MSG(fabs(x[i][i] - cos(angle)) <= tol && fabs(x[i][i + half] - sin(angle)) <= tol,
                      "pair %d (regime %d) at position %d: (%.9g, %.9g) vs (%.9g, %.9g)", i, regime, positions[pi],
                      x[i][i], x[i][i + half], cos(angle), sin(angle));
        }
    }
    /* The test exercised all three regimes: 128-dim Llama 3.1 has pairs 0..28 high, 29..34
     * blended, 35..63 low. */
    CHECK_INT_EQ(seen[0], 3 * 29);
    CHECK_INT_EQ(seen[1], 3 * 6);
    CHECK_INT_EQ(seen[2], 3 * 29);

    /* Known points: pair 0 is untouched (angle = position); the last pair is scaled by 1/8. */
    float y[128] = {0};
    y[half - 1] = 1.0f;
    const int32_t p = 1000000;
    CHECK_INT_EQ(speed_op_rope(be, speed_mat(y, SPEED_DTYPE_F32, 1, hd), 1, hd, &p, &rope), SPEED_OK);
    double last = (double)(1000000.0f * (float)(pow(500000.0, -126.0 / 128.0) / 8.0));
    CHECK_NEAR(y[half - 1], cos(last), 1e-6);
    CHECK_NEAR(y[hd - 1], sin(last), 1e-6);
}

/* ---- swiglu ---------------------------------------------------------------------------- */

static void test_swiglu(void) {
    float g[6] = {0, 1, -1, 100, -100, 2}, u[6] = {5, 2, 1, 3, 1, -0.5f};
    float out[6];
    CHECK_INT_EQ(speed_op_swiglu(be, speed_mat(out, SPEED_DTYPE_F32, 2, 3), speed_mat(g, SPEED_DTYPE_F32, 2, 3),
                                 speed_mat(u, SPEED_DTYPE_F32, 2, 3)),
                 SPEED_OK);
    CHECK(out[0] == 0);
    CHECK_NEAR(out[1], 2 * 0.7310585786300049, 1e-7); /* silu(1) = sigmoid(1) */
    CHECK_NEAR(out[2], -0.2689414213699951, 1e-7);    /* silu(-1) = -sigmoid(-1) */
    CHECK_NEAR(out[3], 300, 1e-4);
    CHECK_NEAR(out[4], 0, 1e-30);
    CHECK_NEAR(out[5], -0.5 * 2 / (1 + exp(-2.0)), 1e-7);
    /* in place over gate */
    CHECK_INT_EQ(speed_op_swiglu(be, speed_mat(g, SPEED_DTYPE_F32, 2, 3), speed_mat(g, SPEED_DTYPE_F32, 2, 3),
                                 speed_mat(u, SPEED_DTYPE_F32, 2, 3)),
                 SPEED_OK);
    CHECK(memcmp(g, out, sizeof out) == 0);
}

/* ---- KV pool --------------------------------------------------------------------------- */

/* A pool of n_blocks blocks of B tokens, two layers per block (so a layer's block_stride is
 * twice its own K+V): layer 1 is used, layer 0 must stay untouched. */
typedef struct {
    unsigned char *mem;
    size_t bytes;
    speed_kv_layer_t kv;
} pool_t;

static void pool_init(pool_t *p, int n_blocks, int B, int n_kv_heads, int head_dim, speed_dtype_t dtype) {
    size_t esz = speed_dtype_size(dtype);
    size_t half_bytes = (size_t)B * n_kv_heads * head_dim * esz; /* one layer's K (or V) per block */
    p->bytes = (size_t)n_blocks * 4 * half_bytes;
    p->mem = speed_aligned_alloc(64, p->bytes);
    memset(p->mem, 0xA5, p->bytes);
    p->kv = (speed_kv_layer_t){
        .k_base = p->mem + 2 * half_bytes, /* layer 1 of the group */
        .block_stride = 4 * half_bytes,
        .v_offset = half_bytes,
        .block_tokens = B,
        .n_kv_heads = n_kv_heads,
        .head_dim = head_dim,
        .dtype = dtype,
    };
}

/* The address in backend.h, spelled out: K of slot s, kv head h, dim d. */
static const unsigned char *pool_k(const pool_t *p, int s, int h, int d) {
    const speed_kv_layer_t *kv = &p->kv;
    int b = s / kv->block_tokens, o = s % kv->block_tokens;
    int S = kv->slot_heads ? kv->slot_heads : kv->n_kv_heads;
    return (const unsigned char *)kv->k_base + (size_t)b * kv->block_stride +
           ((size_t)(o * S + h) * kv->head_dim + d) * speed_dtype_size(kv->dtype);
}

static float read_elem(const unsigned char *p, speed_dtype_t dtype) {
    float f;
    uint16_t h;
    if (dtype == SPEED_DTYPE_F32) {
        memcpy(&f, p, 4);
        return f;
    }
    memcpy(&h, p, 2);
    return dtype == SPEED_DTYPE_BF16 ? speed_dtype_bf16_to_f32(h) : speed_dtype_f16_to_f32(h);
}

/* Cached value of v: what rounding to the cache dtype gives. */
static float rounded(float v, speed_dtype_t dtype) {
    if (dtype == SPEED_DTYPE_BF16) return speed_dtype_bf16_to_f32(bf16(v));
    if (dtype == SPEED_DTYPE_F16) return speed_dtype_f16_to_f32(f16(v));
    return v;
}

static void test_kv(void) {
    enum { B = 4, NB = 5, H = 2, D = 6, N = 7 };
    for (int dt = 0; dt < SPEED_DTYPE_COUNT; dt++) {
        speed_dtype_t dtype = (speed_dtype_t)dt;
        pool_t p;
        pool_init(&p, NB, B, H, D, dtype);
        float k[N][H * D], v[N][H * D];
        for (int i = 0; i < N; i++)
            for (int c = 0; c < H * D; c++) {
                k[i][c] = (float)(sin(i * 17.0 + c * 0.7) * 3.3);
                v[i][c] = (float)(cos(i * 5.0 + c * 1.1) * 0.01) + 1.0f / 3.0f;
            }
        /* slots out of order, across non-contiguous blocks: 19 = block 4 offset 3, 2, 8, ... */
        const int32_t slots[N] = {19, 2, 8, 13, 0, 11, 17};
        CHECK_INT_EQ(speed_op_kv_store(be, &p.kv, speed_mat(k, SPEED_DTYPE_F32, N, H * D),
                                       speed_mat(v, SPEED_DTYPE_F32, N, H * D), slots),
                     SPEED_OK);
        /* Layout: every element where backend.h says, rounded to nearest even. */
        int layout_ok = 1, rounding_ok = 1;
        size_t esz = speed_dtype_size(dtype);
        for (int i = 0; i < N; i++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < D; d++) {
                    float kc = read_elem(pool_k(&p, slots[i], h, d), dtype);
                    float vc = read_elem(pool_k(&p, slots[i], h, d) + p.kv.v_offset, dtype);
                    layout_ok &= kc == rounded(k[i][h * D + d], dtype) && vc == rounded(v[i][h * D + d], dtype);
                    double rel = dtype == SPEED_DTYPE_F32 ? 0 : dtype == SPEED_DTYPE_BF16 ? 1.0 / 256 : 1.0 / 2048;
                    rounding_ok &= fabs(kc - k[i][h * D + d]) <= rel * fabs(k[i][h * D + d]) &&
                                   fabs(vc - v[i][h * D + d]) <= rel * fabs(v[i][h * D + d]);
                }
        CHECK_MSG(layout_ok, "%s: pool layout", speed_dtype_name(dtype));
        CHECK_MSG(rounding_ok, "%s: rounding", speed_dtype_name(dtype));
        /* Nothing outside the stored slots changed: layer 0 of every block, unused slots. */
        size_t changed = 0;
        for (size_t off = 0; off < p.bytes; off++) changed += p.mem[off] != 0xA5;
        size_t max_changed = (size_t)N * 2 * H * D * esz;
        CHECK_MSG(changed <= max_changed, "%zu bytes changed, at most %zu written", changed, max_changed);
        for (int b = 0; b < NB; b++) {
            int untouched = 1;
            for (size_t off = 0; off < 2 * (size_t)B * H * D * esz; off++)
                untouched &= p.mem[(size_t)b * p.kv.block_stride + off] == 0xA5;
            CHECK_MSG(untouched, "layer 0 of block %d was written", b);
        }

        /* Round trip: f32 exact, bf16 / f16 equal to the rounded values. */
        float k2[N][H * D], v2[N][H * D];
        CHECK_INT_EQ(speed_op_kv_load(be, &p.kv, speed_mat(k2, SPEED_DTYPE_F32, N, H * D),
                                      speed_mat(v2, SPEED_DTYPE_F32, N, H * D), slots),
                     SPEED_OK);
        int trip_ok = 1;
        for (int i = 0; i < N; i++)
            for (int c = 0; c < H * D; c++)
                trip_ok &= k2[i][c] == rounded(k[i][c], dtype) && v2[i][c] == rounded(v[i][c], dtype);
        CHECK_MSG(trip_ok, "%s: round trip", speed_dtype_name(dtype));
        if (dtype == SPEED_DTYPE_F32) CHECK(memcmp(k, k2, sizeof k) == 0 && memcmp(v, v2, sizeof v) == 0);
        speed_aligned_free(p.mem);
    }

    /* Ties round to even: 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7. */
    pool_t p;
    pool_init(&p, 1, 1, 1, 2, SPEED_DTYPE_BF16);
    float kk[2] = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256}, vv[2] = {0, 0}, back[2], vb[2];
    const int32_t s0 = 0;
    CHECK_INT_EQ(
        speed_op_kv_store(be, &p.kv, speed_mat(kk, SPEED_DTYPE_F32, 1, 2), speed_mat(vv, SPEED_DTYPE_F32, 1, 2), &s0),
        SPEED_OK);
    CHECK_INT_EQ(
        speed_op_kv_load(be, &p.kv, speed_mat(back, SPEED_DTYPE_F32, 1, 2), speed_mat(vb, SPEED_DTYPE_F32, 1, 2), &s0),
        SPEED_OK);
    CHECK(back[0] == 1.0f && back[1] == 1.0f + 4.0f / 256);
    speed_aligned_free(p.mem);
}

/* A view of heads [h0, h0 + 2) of a pool storing 4 heads per slot (a tensor-parallel rank's
 * share): kv_store writes exactly those heads' bytes where backend.h puts them, every other
 * byte of the pool keeps its value, and kv_load reads the same heads back. */
static void test_kv_head_view(void) {
    enum { B = 3, NB = 4, SH = 4, H = 2, D = 5, N = 6 };
    const int32_t slots[N] = {11, 0, 7, 4, 9, 2};
    for (int dt = 0; dt < SPEED_DTYPE_COUNT; dt++)
        for (int h0 = 1; h0 + H <= SH; h0++) {
            speed_dtype_t dtype = (speed_dtype_t)dt;
            const size_t esz = speed_dtype_size(dtype);
            pool_t p; /* the whole pool: SH heads per slot */
            pool_init(&p, NB, B, SH, D, dtype);
            speed_kv_layer_t view = p.kv;
            view.k_base = (char *)p.kv.k_base + (size_t)h0 * D * esz;
            view.n_kv_heads = H;
            view.slot_heads = SH;
            float k[N][H * D], v[N][H * D];
            for (int i = 0; i < N; i++)
                for (int c = 0; c < H * D; c++) {
                    k[i][c] = (float)(sin(i * 13.0 + c * 0.3 + h0) * 2.7);
                    v[i][c] = (float)(cos(i * 3.0 + c * 0.9 - h0) * 0.05) + 0.2f;
                }
            /* the expected pool: 0xA5 everywhere but the view's heads of the stored slots */
            unsigned char *want = speed_aligned_alloc(64, p.bytes);
            memcpy(want, p.mem, p.bytes);
            for (int i = 0; i < N; i++)
                for (int h = 0; h < H; h++) {
                    size_t off = (size_t)(pool_k(&p, slots[i], h0 + h, 0) - p.mem);
                    speed_dtype_from_f32(dtype, &k[i][h * D], want + off, D);
                    speed_dtype_from_f32(dtype, &v[i][h * D], want + off + p.kv.v_offset, D);
                }
            CHECK_INT_EQ(speed_op_kv_store(be, &view, speed_mat(k, SPEED_DTYPE_F32, N, H * D),
                                           speed_mat(v, SPEED_DTYPE_F32, N, H * D), slots),
                         SPEED_OK);
            CHECK_MSG(memcmp(p.mem, want, p.bytes) == 0, "%s heads [%d, %d) of %d: pool bytes", speed_dtype_name(dtype),
                      h0, h0 + H, SH);
            float k2[N][H * D], v2[N][H * D];
            CHECK_INT_EQ(speed_op_kv_load(be, &view, speed_mat(k2, SPEED_DTYPE_F32, N, H * D),
                                          speed_mat(v2, SPEED_DTYPE_F32, N, H * D), slots),
                         SPEED_OK);
            int trip_ok = 1;
            for (int i = 0; i < N; i++)
                for (int c = 0; c < H * D; c++)
                    trip_ok &= k2[i][c] == rounded(k[i][c], dtype) && v2[i][c] == rounded(v[i][c], dtype);
            CHECK_MSG(trip_ok, "%s heads [%d, %d) of %d: round trip", speed_dtype_name(dtype), h0, h0 + H, SH);
            speed_aligned_free(want);
            speed_aligned_free(p.mem);
        }
}

/* ---- attention ------------------------------------------------------------------------- */

/* Writes K and V of `n` entries of one sequence through its block table (entry e at slot
 * table[e / B] * B + e % B). k, v f32 [n][n_kv_heads * head_dim]. */
static void store_seq(pool_t *p, const int32_t *table, int n, const float *k, const float *v) {
    int B = p->kv.block_tokens, w = p->kv.n_kv_heads * p->kv.head_dim;
    for (int e = 0; e < n; e++) {
        int32_t slot = table[e / B] * B + e % B;
        CHECK_INT_EQ(speed_op_kv_store(be, &p->kv, speed_mat((float *)k + (size_t)e * w, SPEED_DTYPE_F32, 1, w),
                                       speed_mat((float *)v + (size_t)e * w, SPEED_DTYPE_F32, 1, w), &slot),
                     SPEED_OK);
    }
}

static void test_attention(void) {
    enum { B = 2, NB = 6, KVH = 2, NH = 4, D = 4, NE = 5 };
    for (int dt = 0; dt < SPEED_DTYPE_COUNT; dt++) {
        speed_dtype_t dtype = (speed_dtype_t)dt;
        pool_t p;
        pool_init(&p, NB, B, KVH, D, dtype);
        /* Poison everything (large finite values) so a wrong slot shows. */
        for (size_t off = 0; off + 2 <= p.bytes; off += 2) {
            uint16_t big = dtype == SPEED_DTYPE_BF16 ? bf16(3000.0f) : f16(3000.0f);
            if (dtype == SPEED_DTYPE_F32) {
                if (off % 4 == 0) {
                    float fbig = 3000.0f;
                    memcpy(p.mem + off, &fbig, 4);
                }
            } else {
                memcpy(p.mem + off, &big, 2);
            }
        }
        /* Sequence of NE entries in non-contiguous blocks 4, 1, 3: entries 0,1 -> slots 8,9;
         * 2,3 -> 2,3; 4 -> 6. Values exact in every dtype. V of entry e, kv head h, dim d is
         * 10 e + 100 h + d; K is small so that scores stay finite and distinct. */
        const int32_t table[3] = {4, 1, 3};
        float k[NE][KVH * D], v[NE][KVH * D];
        for (int e = 0; e < NE; e++)
            for (int h = 0; h < KVH; h++)
                for (int d = 0; d < D; d++) {
                    k[e][h * D + d] = (d == e % D) ? 1.0f : 0.0f;
                    v[e][h * D + d] = (float)(10 * e + 100 * h + d);
                }
        store_seq(&p, table, NE, &k[0][0], &v[0][0]);

        /* Row r sees entries 0..nv[r]-1 (causal rows of one sequence); row 3 sees nothing. */
        const int32_t *tables[5] = {table, table, table, NULL, table};
        const int32_t nv[5] = {1, 2, 5, 0, 3};
        speed_attn_rows_t rows = {.n_rows = 5, .block_table = tables, .n_visible = nv};
        float q[5][NH * D], out[5][NH * D];
        memset(q, 0, sizeof q); /* q = 0: all scores equal, output = mean of visible V */
        memset(out, 0x7f, sizeof out);
        CHECK_INT_EQ(speed_op_attention(be, speed_mat(out, SPEED_DTYPE_F32, 5, NH * D),
                                        speed_mat(q, SPEED_DTYPE_F32, 5, NH * D), &p.kv, NH, &rows, 0.5f),
                     SPEED_OK);
        int mean_ok = 1;
        for (int r = 0; r < 5; r++)
            for (int h = 0; h < NH; h++)
                for (int d = 0; d < D; d++) {
                    /* GQA: query heads 0, 1 read kv head 0; 2, 3 read kv head 1 */
                    double want = 0;
                    for (int e = 0; e < nv[r]; e++) want += 10 * e + 100 * (h / 2) + d;
                    if (nv[r]) want /= nv[r];
                    mean_ok &= fabs(out[r][h * D + d] - want) <= 1e-4;
                }
        CHECK_MSG(mean_ok, "%s: equal scores give the mean of V (with GQA, causal rows, empty row)",
                  speed_dtype_name(dtype));
        /* Row 0 sees one entry: out = V of entry 0, exactly. */
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < D; d++) CHECK(out[0][h * D + d] == (float)(100 * (h / 2) + d));

        /* Known softmax: row 1 (entries 0, 1) with q of head h = t * e_0 scores entry 0 at
         * scale * t and entry 1 at 0 (K_1 = e_1). Weights: w0 = 1 / (1 + e^(-scale t)). */
        memset(q, 0, sizeof q);
        const float t[NH] = {0, 1, 2, -3};
        for (int h = 0; h < NH; h++) q[1][h * D + 0] = t[h];
        CHECK_INT_EQ(speed_op_attention(be, speed_mat(out, SPEED_DTYPE_F32, 5, NH * D),
                                        speed_mat(q, SPEED_DTYPE_F32, 5, NH * D), &p.kv, NH, &rows, 0.5f),
                     SPEED_OK);
        for (int h = 0; h < NH; h++) {
            double w0 = 1.0 / (1.0 + exp(-0.5 * t[h]));
            for (int d = 0; d < D; d++) {
                double want = w0 * (100 * (h / 2) + d) + (1 - w0) * (10 + 100 * (h / 2) + d);
                CHECK_NEAR(out[1][h * D + d], want, 1e-4);
            }
        }
        /* A large score dominates without overflow (max subtraction): q = 1000 e_2 on row 2. */
        memset(q, 0, sizeof q);
        for (int h = 0; h < NH; h++) q[2][h * D + 2] = 1000.0f;
        CHECK_INT_EQ(speed_op_attention(be, speed_mat(out, SPEED_DTYPE_F32, 5, NH * D),
                                        speed_mat(q, SPEED_DTYPE_F32, 5, NH * D), &p.kv, NH, &rows, 1.0f),
                     SPEED_OK);
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < D; d++) CHECK_NEAR(out[2][h * D + d], 20 + 100 * (h / 2) + d, 1e-3);

        /* A negative block id in a table is refused (the wrapper cannot see it). */
        const int32_t bad_table[3] = {4, -1, 3};
        const int32_t *bad_tables[5] = {table, table, bad_table, NULL, table};
        speed_attn_rows_t bad_rows = {.n_rows = 5, .block_table = bad_tables, .n_visible = nv};
        CHECK_INT_EQ(speed_op_attention(be, speed_mat(out, SPEED_DTYPE_F32, 5, NH * D),
                                        speed_mat(q, SPEED_DTYPE_F32, 5, NH * D), &p.kv, NH, &bad_rows, 1.0f),
                     SPEED_ERR_INVALID_ARGUMENT);
        speed_aligned_free(p.mem);
    }
}

/* ---- topk ------------------------------------------------------------------------------ */

static void test_topk(void) {
    const float inf = INFINITY;
    /* logits [6][5], row stride 6 (the last column is padding that must be ignored) */
    float x[6][6] = {
        {1, 3, 2, 3, -inf, 99},                  /* a tie at the top: column 1 before column 3 */
        {-inf, -inf, -inf, -inf, -inf, 99},      /* all -inf: lse -inf, columns in order */
        {0, inf, 5, -inf, 7, 99},                /* +inf: lse +inf */
        {3e38f, -0.0f, 3e38f, 0.0f, -3e38f, 99}, /* no overflow in the shift; -0 ties +0 */
        {-1, -1, -1, -1, -1, 99},                /* all equal */
        {10, 20, 30, 40, 50, 99},                /* ascending */
    };
    float vals[6][4]; /* k = 3, row stride 4 */
    int32_t ids[6][3];
    float lse[6];
    for (int r = 0; r < 6; r++) vals[r][3] = 123.0f;
    speed_mat_t xm = {x, SPEED_DTYPE_F32, 6, 5, 6}, vm = {vals, SPEED_DTYPE_F32, 6, 3, 4};
    CHECK_INT_EQ(speed_op_topk(be, vm, &ids[0][0], lse, xm, 3), SPEED_OK);

    static const int32_t want_ids[6][3] = {{1, 3, 2}, {0, 1, 2}, {1, 4, 2}, {0, 2, 1}, {0, 1, 2}, {4, 3, 2}};
    static const float want_vals[6][3] = {{3, 3, 2},        {-INFINITY, -INFINITY, -INFINITY},
                                          {INFINITY, 7, 5}, {3e38f, 3e38f, -0.0f},
                                          {-1, -1, -1},     {50, 40, 30}};
    for (int r = 0; r < 6; r++) {
        for (int j = 0; j < 3; j++) {
            CHECK_MSG(ids[r][j] == want_ids[r][j], "row %d rank %d: id %d, want %d", r, j, ids[r][j], want_ids[r][j]);
            CHECK_MSG(memcmp(&vals[r][j], &want_vals[r][j], sizeof(float)) == 0, "row %d rank %d: %g, want %g", r, j,
                      (double)vals[r][j], (double)want_vals[r][j]);
        }
        CHECK(vals[r][3] == 123.0f); /* padding of vals untouched */
    }
    /* lse worked out by hand: log(e^1 + 2 e^3 + e^2 + 0) = 3 + log(e^-2 + 2 + e^-1) */
    CHECK(fabs(lse[0] - (3.0 + log(exp(-2.0) + 2.0 + exp(-1.0)))) < 1e-6);
    CHECK(isinf(lse[1]) && lse[1] < 0);
    CHECK(isinf(lse[2]) && lse[2] > 0);
    CHECK(lse[3] == (float)(3e38 + log(2.0))); /* = 3e38f: the log 2 is far below an ulp */
    CHECK(fabs(lse[4] - (-1.0 + log(5.0))) < 1e-6);
    CHECK(fabs(lse[5] - (50.0 + log(1.0 + exp(-10.0) + exp(-20.0) + exp(-30.0) + exp(-40.0)))) < 1e-5);

    /* k = V = 1 and k = V */
    float one = -7.5f, v1 = 0, e1 = 0;
    int32_t i1 = -1;
    CHECK_INT_EQ(
        speed_op_topk(be, speed_mat(&v1, SPEED_DTYPE_F32, 1, 1), &i1, &e1, speed_mat(&one, SPEED_DTYPE_F32, 1, 1), 1),
        SPEED_OK);
    CHECK(v1 == -7.5f && i1 == 0 && e1 == -7.5f);
    float row[4] = {2, 4, 1, 3}, v4[4];
    int32_t i4[4];
    CHECK_INT_EQ(
        speed_op_topk(be, speed_mat(v4, SPEED_DTYPE_F32, 1, 4), i4, &e1, speed_mat(row, SPEED_DTYPE_F32, 1, 4), 4),
        SPEED_OK);
    CHECK(i4[0] == 1 && i4[1] == 3 && i4[2] == 0 && i4[3] == 2 && v4[0] == 4 && v4[3] == 1);
    CHECK(fabs(e1 - log(exp(2.0) + exp(4.0) + exp(1.0) + exp(3.0))) < 1e-5);
}

/* ---- validation ------------------------------------------------------------------------ */

static void test_bad_arguments(void) {
    float a[4][8] = {{0}}, b[4][8] = {{0}}, c[4][8] = {{0}};
    speed_mat_t m48 = speed_mat(a, SPEED_DTYPE_F32, 4, 8), n48 = speed_mat(b, SPEED_DTYPE_F32, 4, 8),
                o48 = speed_mat(c, SPEED_DTYPE_F32, 4, 8);
    speed_mat_t m38 = speed_mat(b, SPEED_DTYPE_F32, 3, 8), m47 = speed_mat(b, SPEED_DTYPE_F32, 4, 7);
    speed_mat_t null48 = speed_mat(NULL, SPEED_DTYPE_F32, 4, 8);
    speed_mat_t w18 = speed_mat(c, SPEED_DTYPE_F32, 1, 8), w28 = speed_mat(c, SPEED_DTYPE_F32, 2, 8);
    speed_mat_t bf48 = speed_mat(b, SPEED_DTYPE_BF16, 4, 8);
    speed_mat_t baddtype = speed_mat(b, (speed_dtype_t)9, 4, 8);
    speed_mat_t badstride = {b, SPEED_DTYPE_F32, 4, 8, 7};
    speed_mat_t negrows = {b, SPEED_DTYPE_F32, -1, 8, 8};
    const int32_t ids_ok[4] = {0, 1, 2, 3}, ids_big[4] = {0, 1, 2, 4}, ids_neg[4] = {0, -1, 2, 3};
    int before = n_errors_logged;
    int n_bad = 0;
#define BAD(call)                                         \
    do {                                                  \
        n_bad++;                                          \
        CHECK_INT_EQ((call), SPEED_ERR_INVALID_ARGUMENT); \
    } while (0)

    /* embed: table [4][8] */
    BAD(speed_op_embed(be, m48, n48, ids_big));
    BAD(speed_op_embed(be, m48, n48, ids_neg));
    BAD(speed_op_embed(be, m48, n48, NULL));
    BAD(speed_op_embed(be, m48, m47, ids_ok));
    BAD(speed_op_embed(be, bf48, n48, ids_ok)); /* out must be f32 */
    BAD(speed_op_embed(be, null48, n48, ids_ok));
    BAD(speed_op_embed(be, m48, null48, ids_ok));
    BAD(speed_op_embed(be, m48, baddtype, ids_ok));
    /* rmsnorm */
    BAD(speed_op_rmsnorm(be, m48, m38, w18, 1e-5f));
    BAD(speed_op_rmsnorm(be, m48, n48, w28, 1e-5f));
    BAD(speed_op_rmsnorm(be, m48, n48, speed_mat(c, SPEED_DTYPE_F32, 1, 7), 1e-5f));
    BAD(speed_op_rmsnorm(be, m48, n48, w18, -1.0f));
    BAD(speed_op_rmsnorm(be, m48, n48, w18, NAN));
    BAD(speed_op_rmsnorm(be, m48, null48, w18, 1e-5f));
    BAD(speed_op_rmsnorm(be, m48, badstride, w18, 1e-5f));
    /* matmul: x [4][8], w [m][8] -> out [4][m] */
    BAD(speed_op_matmul(be, m48, n48, m47, false));                                 /* k mismatch */
    BAD(speed_op_matmul(be, m48, n48, speed_mat(c, SPEED_DTYPE_F32, 2, 8), false)); /* out cols != m */
    BAD(speed_op_matmul(be, m48, m38, o48, false));                                 /* out rows != x rows */
    BAD(speed_op_matmul(be, m48, bf48, o48, false));                                /* x must be f32 */
    BAD(speed_op_matmul(be, m48, n48, null48, false));
    BAD(speed_op_matmul(be, m48, negrows, o48, false));
    /* rope */
    speed_rope_t rope = {.theta = 10000.0f};
    BAD(speed_op_rope(be, m48, 2, 3, ids_ok, &rope)); /* odd head_dim */
    BAD(speed_op_rope(be, m48, 3, 2, ids_ok, &rope)); /* n_cols != n_heads * head_dim */
    BAD(speed_op_rope(be, m48, 0, 8, ids_ok, &rope));
    BAD(speed_op_rope(be, m48, 2, 4, NULL, &rope));
    BAD(speed_op_rope(be, m48, 2, 4, ids_ok, NULL));
    speed_rope_t bad_theta = {.theta = 0};
    BAD(speed_op_rope(be, m48, 2, 4, ids_ok, &bad_theta));
    speed_rope_t bad_l3 = {.theta = 500000.0f,
                           .llama3_scaling = true,
                           .factor = 8,
                           .low_freq_factor = 4,
                           .high_freq_factor = 1,
                           .original_max_position = 8192};
    BAD(speed_op_rope(be, m48, 2, 4, ids_ok, &bad_l3));
    bad_l3 = (speed_rope_t){.theta = 500000.0f,
                            .llama3_scaling = true,
                            .factor = 8,
                            .low_freq_factor = 1,
                            .high_freq_factor = 4,
                            .original_max_position = 0};
    BAD(speed_op_rope(be, m48, 2, 4, ids_ok, &bad_l3));
    /* swiglu, add */
    BAD(speed_op_swiglu(be, m48, n48, m38));
    BAD(speed_op_swiglu(be, m48, m47, o48));
    BAD(speed_op_swiglu(be, m48, null48, o48));
    BAD(speed_op_add(be, m48, n48, m47));
    BAD(speed_op_add(be, m38, n48, o48));
    BAD(speed_op_add(be, m48, bf48, o48));
    /* get_rows */
    BAD(speed_op_get_rows(be, m48, n48, ids_big));
    BAD(speed_op_get_rows(be, m48, n48, ids_neg));
    BAD(speed_op_get_rows(be, m48, n48, NULL));
    BAD(speed_op_get_rows(be, m48, m48, ids_ok)); /* out aliases x */
    BAD(speed_op_get_rows(be, m48, m47, ids_ok));
    /* topk: logits [4][8]; vals [4][k], ids [4][k], lse [4] */
    int32_t tk_ids[4 * 8];
    float tk_lse[4];
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 0), tk_ids, tk_lse, m48, 0)); /* k = 0 */
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 9), tk_ids, tk_lse, m48, 9)); /* k > V */
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 3), tk_ids, tk_lse, m48, 4)); /* vals cols != k */
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 3), tk_ids, tk_lse, m48, -3));
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 3, 3), tk_ids, tk_lse, m48, 3));  /* rows differ */
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 3), tk_ids, tk_lse, bf48, 3)); /* logits not f32 */
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 3), NULL, tk_lse, m48, 3));
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 3), tk_ids, NULL, m48, 3));
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 3), tk_ids, tk_lse, null48, 3));
    BAD(speed_op_topk(be, speed_mat(a, SPEED_DTYPE_F32, 4, 3), tk_ids, tk_lse, m48, 3));   /* vals overlap logits */
    BAD(speed_op_topk(be, speed_mat(c, SPEED_DTYPE_F32, 4, 3), tk_ids, &a[3][7], m48, 3)); /* lse overlaps */
    {
        static float wide[2][300];
        static float wv[2][257];
        int32_t wi[2 * 257];
        BAD(speed_op_topk(be, speed_mat(wv, SPEED_DTYPE_F32, 2, 257), wi, tk_lse,
                          speed_mat(wide, SPEED_DTYPE_F32, 2, 300), 257)); /* k > SPEED_TOPK_MAX */
    }

    /* kv_store / kv_load: n_kv_heads 2, head_dim 4 -> rows of 8 */
    pool_t p;
    pool_init(&p, 2, 2, 2, 4, SPEED_DTYPE_F16);
    const int32_t slots_neg[4] = {0, 1, -2, 3};
    BAD(speed_op_kv_store(be, &p.kv, m48, n48, slots_neg));
    BAD(speed_op_kv_store(be, &p.kv, m48, n48, NULL));
    BAD(speed_op_kv_store(be, &p.kv, m48, m38, ids_ok));
    BAD(speed_op_kv_store(be, &p.kv, m47, m47, ids_ok));
    BAD(speed_op_kv_store(be, NULL, m48, n48, ids_ok));
    BAD(speed_op_kv_load(be, &p.kv, m48, n48, slots_neg));
    BAD(speed_op_kv_load(be, &p.kv, m48, null48, ids_ok));
    speed_kv_layer_t kv_bad = p.kv;
    kv_bad.v_offset = 8; /* V would overlap K */
    BAD(speed_op_kv_store(be, &kv_bad, m48, n48, ids_ok));
    kv_bad = p.kv;
    kv_bad.k_base = NULL;
    BAD(speed_op_kv_load(be, &kv_bad, m48, n48, ids_ok));
    kv_bad = p.kv;
    kv_bad.dtype = (speed_dtype_t)5;
    BAD(speed_op_kv_store(be, &kv_bad, m48, n48, ids_ok));
    kv_bad = p.kv;
    kv_bad.slot_heads = 1; /* fewer heads per slot than the view has */
    BAD(speed_op_kv_store(be, &kv_bad, m48, n48, ids_ok));
    BAD(speed_op_kv_load(be, &kv_bad, m48, n48, ids_ok));
    kv_bad.slot_heads = -2;
    BAD(speed_op_kv_store(be, &kv_bad, m48, n48, ids_ok));
    kv_bad.slot_heads = 4; /* v_offset (B * 2 heads * head_dim) would overlap K of 4 heads */
    BAD(speed_op_kv_load(be, &kv_bad, m48, n48, ids_ok));
    speed_kv_layer_t kv_same = p.kv;
    kv_same.slot_heads = 2; /* = n_kv_heads: the same as 0 */
    CHECK_INT_EQ(speed_op_kv_store(be, &kv_same, m48, n48, ids_ok), SPEED_OK);

    /* attention: q, out [4][n_heads * 4] */
    const int32_t table[2] = {0, 1};
    const int32_t *tables[4] = {table, table, table, table};
    const int32_t nv_ok[4] = {1, 2, 3, 4}, nv_neg[4] = {1, -2, 3, 4};
    speed_attn_rows_t rows = {.n_rows = 4, .block_table = tables, .n_visible = nv_ok};
    CHECK_INT_EQ(speed_op_attention(be, m48, n48, &p.kv, 2, &rows, 0.5f), SPEED_OK); /* the good call */
    BAD(speed_op_attention(be, m48, n48, &p.kv, 3, &rows, 0.5f));                    /* 3 heads % 2 kv heads */
    BAD(speed_op_attention(be, m48, n48, &p.kv, 4, &rows, 0.5f));                    /* cols != 4 heads * 4 */
    BAD(speed_op_attention(be, m48, m48, &p.kv, 2, &rows, 0.5f));                    /* out aliases q */
    BAD(speed_op_attention(be, m48, m38, &p.kv, 2, &rows, 0.5f));
    BAD(speed_op_attention(be, m48, n48, NULL, 2, &rows, 0.5f));
    BAD(speed_op_attention(be, m48, n48, &p.kv, 2, NULL, 0.5f));
    kv_bad = p.kv;
    kv_bad.slot_heads = 1;
    BAD(speed_op_attention(be, m48, n48, &kv_bad, 2, &rows, 0.5f));
    kv_bad.slot_heads = 3; /* v_offset too small for 3 heads per slot */
    BAD(speed_op_attention(be, m48, n48, &kv_bad, 2, &rows, 0.5f));
    speed_attn_rows_t rows_bad = rows;
    rows_bad.n_rows = 3;
    BAD(speed_op_attention(be, m48, n48, &p.kv, 2, &rows_bad, 0.5f));
    rows_bad = rows;
    rows_bad.n_visible = nv_neg;
    BAD(speed_op_attention(be, m48, n48, &p.kv, 2, &rows_bad, 0.5f));
    rows_bad = rows;
    rows_bad.n_visible = NULL;
    BAD(speed_op_attention(be, m48, n48, &p.kv, 2, &rows_bad, 0.5f));
    rows_bad = rows;
    rows_bad.block_table = NULL;
    BAD(speed_op_attention(be, m48, n48, &p.kv, 2, &rows_bad, 0.5f));
    const int32_t *tables_null[4] = {table, NULL, table, table};
    rows_bad = rows;
    rows_bad.block_table = tables_null;
    BAD(speed_op_attention(be, m48, n48, &p.kv, 2, &rows_bad, 0.5f));
    speed_aligned_free(p.mem);
#undef BAD
    CHECK_MSG(n_errors_logged - before == n_bad, "%d errors logged for %d bad calls", n_errors_logged - before, n_bad);

    /* Zero rows is a valid no-op. */
    speed_mat_t empty = {a, SPEED_DTYPE_F32, 0, 8, 8};
    CHECK_INT_EQ(speed_op_add(be, empty, empty, empty), SPEED_OK);
    CHECK_INT_EQ(speed_op_embed(be, empty, n48, NULL), SPEED_OK);
}

int main(void) {
    speed_log_set_sink(count_sink, NULL);
    speed_backend_params_t p = speed_backend_default_params();
    p.kind = SPEED_BACKEND_CPU_REF;
    if (speed_backend_create(&p, &be) != SPEED_OK) {
        speed_log_set_sink(NULL, NULL);
        fprintf(stderr, "cannot create the cpu-ref backend\n");
        return 1;
    }
    int64_t live = speed_alloc_live_count();
    test_lifecycle();
    test_embed();
    test_add_get_rows();
    test_rmsnorm();
    test_matmul();
    test_rope_basic();
    test_rope_llama3();
    test_swiglu();
    test_kv();
    test_kv_head_view();
    test_attention();
    test_topk();
    test_bad_arguments();
    CHECK_INT_EQ(speed_alloc_live_count(), live); /* ops leave no allocation behind */
    speed_backend_destroy(be);
    speed_log_set_sink(NULL, NULL);
    return CHECK_DONE();
}
