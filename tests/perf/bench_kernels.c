/* Kernel benchmark of the fast CPU backend against this machine's roofline, in one run.
 *
 *   bench_kernels [--quick] [--thp] [--threads N] [--reps N] [--isa scalar|avx2|avx512|avx512-bf16]
 *                 [--only decode|sweep|prefill|attention|small]
 *
 * First the machine probes of kernels/roofline.h with the same thread count: streaming-read
 * bandwidth, fp32 FMA peak, bf16 dot-product peak. Then each kernel, as the median over
 * --reps timed runs (after a warm-up), printed as achieved GB/s or GFLOP/s and as a fraction of
 * the matching roof:
 *
 *   decode (memory bound, GB/s of weights streamed vs read bandwidth)
 *     [1 x 2048]·[5632 x 2048]ᵀ bf16   MLP gate/up of TinyLlama-1.1B
 *     [1 x 5632]·[2048 x 5632]ᵀ bf16   MLP down
 *     [1 x 2048]·[32000 x 2048]ᵀ bf16  lm_head
 *     a decode layer sweep: the 7 matmuls of a TinyLlama layer at batch 1 over distinct layers
 *       (weights of several layers, far beyond the last-level cache), which is what a decode
 *       token costs; the target is >= 90% of the read roofline
 *   prefill (compute bound, GFLOP/s vs the bf16 / fp32 peak)
 *     [512 x 2048]·[5632 x 2048]ᵀ bf16 (target >= 60% of the bf16 peak), f16, f32
 *   attention: decode with a long context (KV bytes / s), causal prefill (GFLOP/s)
 *   small ops at decode size (µs per call: dispatch + barrier cost included), and the thread
 *   pool's own cost: an empty job dispatched and joined with the workers spinning, and after
 *   the caller was idle for 1 ms and 20 ms (the workers have gone to sleep: wake-up latency).
 * Decode weights are rotated over enough copies to exceed the last-level cache, so nothing is
 * served from it. The machine may be shared (other processes, other tenants of the memory
 * system): its bandwidth and free cores drift during a run. So every round of a matmul
 * benchmark first re-measures the matching roof (a short read probe, or a short compute
 * probe) and the fraction is taken per round; the medians over rounds are printed, next to
 * the full roofline measured once at the start.
 * --quick (the ctest run, label perf) uses a small roofline buffer, fewer repetitions and fewer
 * layers; it finishes in well under 20 s. Exit 0 unless something fails to run.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "clock.h"
#include "cpu_pool.h" /* white box: the fast backend's thread pool, for its dispatch cost */
#include "log.h"
#include "roofline.h"
#include "test_clock.h"
#include "test_stats.h"

/* TinyLlama-1.1B */
enum { D = 2048, F = 5632, VOCAB = 32000, N_HEADS = 32, N_KV = 4, HD = 64 };

static int g_reps = 7;
static speed_backend_t *g_be;
static speed_roofline_t g_roof;
static speed_roofline_params_t g_probe; /* the short per-round probes */

static void *xalloc(size_t bytes) {
    void *p = speed_aligned_alloc(64, bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "bench_kernels: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static uint64_t rng = 0x2545f4914f6cdd1dull;
static float frand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 40) / 16777216.0) * 2.0f - 1.0f;
}

static void fill_f32(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = frand() * scale;
}

/* --thp: weights in 2 MiB transparent huge pages (madvise), as a loader that copies the weights
 * into anonymous memory could provide. Default: 4 KiB pages, like the engine's mmap of the
 * safetensors file. */
static bool g_thp;

static void *weights_alloc(size_t bytes) {
    if (!g_thp) return xalloc(bytes);
    const size_t huge = (size_t)2 << 20, size = (bytes + huge - 1) / huge * huge;
    void *p = mmap(NULL, size + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "bench_kernels: mmap of %zu bytes failed\n", size + huge);
        exit(1);
    }
    char *a = (char *)(((uintptr_t)p + huge - 1) / huge * huge); /* 2 MiB aligned; the slack stays mapped */
    (void)madvise(a, size, MADV_HUGEPAGE);
    return a;
}

static void weights_free(void *w, size_t bytes) {
    if (!w) return;
    if (!g_thp) {
        speed_aligned_free(w);
        return;
    }
    const size_t huge = (size_t)2 << 20, size = (bytes + huge - 1) / huge * huge;
    munmap(w, size); /* the unaligned head and tail of the mapping leak: a benchmark, < 4 MiB each */
}

/* Random weights in dtype (fast: one random f32 per 64 elements, varied by index). */
static void *make_weights(speed_dtype_t dt, size_t n) {
    void *w = weights_alloc(n * speed_dtype_size(dt));
    float buf[256];
    for (size_t i = 0; i < n; i += 256) {
        size_t m = n - i < 256 ? n - i : 256;
        float base = frand() * 0.05f;
        for (size_t j = 0; j < m; j++) buf[j] = base + 0.001f * (float)((j * 37) % 64) - 0.03f;
        speed_dtype_from_f32(dt, buf, (char *)w + i * speed_dtype_size(dt), m);
    }
    return w;
}

static void must(speed_status_t st, const char *what) {
    if (st != SPEED_OK) {
        fprintf(stderr, "bench_kernels: %s failed: %s (%s)\n", what, speed_status_string(st), speed_log_last_error());
        exit(1);
    }
}

/* Runs fn(arg, rep) once untimed and g_reps times timed; returns the median seconds. */
typedef void (*bench_cb_t)(void *arg, int rep);
static double time_median(bench_cb_t fn, void *arg, int reps) {
    double t[64];
    if (reps > 64) reps = 64;
    fn(arg, 0);
    for (int r = 0; r < reps; r++) {
        double t0 = speed_clock_mono_s();
        fn(arg, r + 1);
        t[r] = speed_clock_mono_s() - t0;
    }
    return tu_median(t, reps);
}

typedef enum { ROOF_READ, ROOF_FP32, ROOF_BF16 } roof_t;

static double probe(roof_t roof) {
    double v = 0, f32 = 0, bf16 = 0;
    if (roof == ROOF_READ) {
        must(speed_roofline_bandwidth(&g_probe, &v, NULL), "read probe");
        return v;
    }
    must(speed_roofline_compute(&g_probe, &f32, &bf16, NULL), "compute probe");
    return roof == ROOF_FP32 ? f32 : bf16;
}

static const char *roof_name(roof_t roof) {
    return roof == ROOF_READ ? "read bw" : roof == ROOF_FP32 ? "fp32" : "bf16";
}

/* Rounds of (probe the roof, time fn once); prints median time, median achieved rate and the
 * median per-round fraction. `amount` is bytes (ROOF_READ) or FLOPs per fn call. */
static void run_rounds(const char *name, bench_cb_t fn, void *arg, double per_call, double amount, roof_t roof,
                       int rounds) {
    double t[64], rate[64], frac[64];
    if (rounds > 64) rounds = 64;
    fn(arg, 0);
    for (int r = 0; r < rounds; r++) {
        double top = probe(roof);
        double t0 = speed_clock_mono_s();
        fn(arg, r + 1);
        t[r] = (speed_clock_mono_s() - t0) / per_call;
        rate[r] = amount / t[r] * 1e-9;
        frac[r] = rate[r] / top;
    }
    double tm = tu_median(t, rounds), rm = tu_median(rate, rounds), fm = tu_median(frac, rounds);
    if (roof == ROOF_READ)
        printf("  %-44s %9.3f ms %9.2f GB/s     %5.1f%% of read bw\n", name, tm * 1e3, rm, 100.0 * fm);
    else
        printf("  %-44s %9.3f ms %9.1f GFLOP/s  %5.1f%% of %s peak\n", name, tm * 1e3, rm, 100.0 * fm, roof_name(roof));
    fflush(stdout);
}

/* ---- matmul ---------------------------------------------------------------------------- */

typedef struct {
    int n_copies;
    void **w; /* [n_copies] weights [m][k] */
    speed_dtype_t dt;
    int64_t n, m, k;
    float *x, *out;
} mm_bench_t;

static void mm_run(void *p, int rep) {
    (void)rep;
    mm_bench_t *b = p;
    for (int c = 0; c < b->n_copies; c++)
        must(speed_op_matmul(g_be, speed_mat(b->out, SPEED_DTYPE_F32, b->n, b->m),
                             speed_mat(b->x, SPEED_DTYPE_F32, b->n, b->k), speed_mat(b->w[c], b->dt, b->m, b->k),
                             false),
             "matmul");
}

/* min_bytes: enough distinct weight buffers that one pass over them exceeds the LLC (decode);
 * 0 for one copy (prefill: compute bound, the weights may as well be cached). */
static void bench_matmul(const char *name, int64_t n, int64_t m, int64_t k, speed_dtype_t dt, double min_bytes,
                         roof_t roof, int rounds) {
    const double bytes = (double)(m * k) * (double)speed_dtype_size(dt);
    int copies = min_bytes > 0 ? (int)ceil(min_bytes / bytes) : 1;
    mm_bench_t b = {.n_copies = copies, .dt = dt, .n = n, .m = m, .k = k};
    b.w = xalloc(sizeof(void *) * (size_t)copies);
    for (int c = 0; c < copies; c++) b.w[c] = make_weights(dt, (size_t)(m * k));
    b.x = xalloc(sizeof(float) * (size_t)(n * k));
    b.out = xalloc(sizeof(float) * (size_t)(n * m));
    fill_f32(b.x, (size_t)(n * k), 1.0f);
    run_rounds(name, mm_run, &b, copies, roof == ROOF_READ ? bytes : 2.0 * (double)n * (double)m * (double)k, roof,
               rounds);
    for (int c = 0; c < copies; c++) weights_free(b.w[c], (size_t)(m * k) * speed_dtype_size(dt));
    speed_aligned_free(b.w);
    speed_aligned_free(b.x);
    speed_aligned_free(b.out);
}

/* ---- decode layer sweep ------------------------------------------------------------------ */

typedef struct {
    int n_layers;
    void *(*w)[7]; /* per layer: q, k, v, o, gate, up, down */
    float *h, *hn, *q, *k, *v, *att, *g, *u;
} sweep_t;

static const int64_t sweep_shape[7][2] = {{D, D}, {N_KV * HD, D}, {N_KV * HD, D}, {D, D}, {F, D}, {F, D}, {D, F}};

static void sweep_run(void *p, int rep) {
    (void)rep;
    sweep_t *s = p;
    const speed_dtype_t bf = SPEED_DTYPE_BF16, f = SPEED_DTYPE_F32;
    for (int l = 0; l < s->n_layers; l++) {
        void **w = s->w[l];
        must(speed_op_matmul(g_be, speed_mat(s->q, f, 1, D), speed_mat(s->hn, f, 1, D), speed_mat(w[0], bf, D, D),
                             false),
             "q");
        must(speed_op_matmul(g_be, speed_mat(s->k, f, 1, N_KV * HD), speed_mat(s->hn, f, 1, D),
                             speed_mat(w[1], bf, N_KV * HD, D), false),
             "k");
        must(speed_op_matmul(g_be, speed_mat(s->v, f, 1, N_KV * HD), speed_mat(s->hn, f, 1, D),
                             speed_mat(w[2], bf, N_KV * HD, D), false),
             "v");
        must(speed_op_matmul(g_be, speed_mat(s->h, f, 1, D), speed_mat(s->att, f, 1, D), speed_mat(w[3], bf, D, D),
                             true),
             "o");
        must(speed_op_matmul(g_be, speed_mat(s->g, f, 1, F), speed_mat(s->hn, f, 1, D), speed_mat(w[4], bf, F, D),
                             false),
             "gate");
        must(speed_op_matmul(g_be, speed_mat(s->u, f, 1, F), speed_mat(s->hn, f, 1, D), speed_mat(w[5], bf, F, D),
                             false),
             "up");
        must(speed_op_swiglu(g_be, speed_mat(s->g, f, 1, F), speed_mat(s->g, f, 1, F), speed_mat(s->u, f, 1, F)),
             "swiglu");
        must(speed_op_matmul(g_be, speed_mat(s->h, f, 1, D), speed_mat(s->g, f, 1, F), speed_mat(w[6], bf, D, F), true),
             "down");
    }
}

static void bench_sweep(int n_layers, int reps) {
    sweep_t s = {.n_layers = n_layers};
    s.w = xalloc(sizeof *s.w * (size_t)n_layers);
    double bytes = 0;
    for (int l = 0; l < n_layers; l++)
        for (int i = 0; i < 7; i++) {
            s.w[l][i] = make_weights(SPEED_DTYPE_BF16, (size_t)(sweep_shape[i][0] * sweep_shape[i][1]));
            bytes += 2.0 * (double)(sweep_shape[i][0] * sweep_shape[i][1]);
        }
    float **bufs[] = {&s.h, &s.hn, &s.q, &s.k, &s.v, &s.att, &s.g, &s.u};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i] = xalloc(sizeof(float) * F);
        fill_f32(*bufs[i], F, 0.1f);
    }
    char name[96];
    snprintf(name, sizeof name, "decode sweep, %d layers x 7 matmuls (%.0f MB)", n_layers, bytes * 1e-6);
    run_rounds(name, sweep_run, &s, 1, bytes, ROOF_READ, reps);
    for (int l = 0; l < n_layers; l++)
        for (int i = 0; i < 7; i++) weights_free(s.w[l][i], 2 * (size_t)(sweep_shape[i][0] * sweep_shape[i][1]));
    speed_aligned_free(s.w);
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) speed_aligned_free(*bufs[i]);
}

/* ---- attention ------------------------------------------------------------------------------ */

typedef struct {
    speed_kv_layer_t kv;
    void *pool;
    int32_t *table;
    const int32_t **tables;
    int32_t *n_visible;
    int64_t n_rows;
    float *q, *out;
} attn_bench_t;

static void attn_run(void *p, int rep) {
    (void)rep;
    attn_bench_t *a = p;
    speed_attn_rows_t rows = {a->n_rows, a->tables, a->n_visible};
    must(speed_op_attention(g_be, speed_mat(a->out, SPEED_DTYPE_F32, a->n_rows, N_HEADS * HD),
                            speed_mat(a->q, SPEED_DTYPE_F32, a->n_rows, N_HEADS * HD), &a->kv, N_HEADS, &rows,
                            1.0f / sqrtf((float)HD)),
         "attention");
}

/* One sequence of ctx entries; rows = the last n_rows positions (causal). */
static double bench_attention(int ctx, int64_t n_rows, speed_dtype_t dt, int reps, double *flops_p, double *bytes_p) {
    attn_bench_t a = {.n_rows = n_rows};
    const int B = 16, n_blocks = (ctx + B - 1) / B;
    const size_t es = speed_dtype_size(dt), half = (size_t)B * N_KV * HD * es;
    a.kv = (speed_kv_layer_t){
        .block_stride = 2 * half, .v_offset = half, .block_tokens = B, .n_kv_heads = N_KV, .head_dim = HD, .dtype = dt};
    a.pool = make_weights(dt, (size_t)n_blocks * 2 * half / es);
    a.kv.k_base = a.pool;
    a.table = xalloc(sizeof(int32_t) * (size_t)n_blocks);
    for (int i = 0; i < n_blocks; i++) a.table[i] = (i * 7919) % n_blocks == i ? i : i; /* identity: locality */
    a.tables = xalloc(sizeof(void *) * (size_t)n_rows);
    a.n_visible = xalloc(sizeof(int32_t) * (size_t)n_rows);
    double flops = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        a.tables[r] = a.table;
        a.n_visible[r] = (int32_t)(ctx - n_rows + r + 1);
        flops += 4.0 * N_HEADS * HD * a.n_visible[r];
    }
    a.q = xalloc(sizeof(float) * (size_t)(n_rows * N_HEADS * HD));
    a.out = xalloc(sizeof(float) * (size_t)(n_rows * N_HEADS * HD));
    fill_f32(a.q, (size_t)(n_rows * N_HEADS * HD), 1.0f);
    double t = time_median(attn_run, &a, reps);
    *flops_p = flops;
    *bytes_p = (double)ctx * 2 * N_KV * HD * es;
    weights_free(a.pool, (size_t)n_blocks * 2 * half);
    speed_aligned_free(a.table);
    speed_aligned_free(a.tables);
    speed_aligned_free(a.n_visible);
    speed_aligned_free(a.q);
    speed_aligned_free(a.out);
    return t;
}

/* ---- small ops -------------------------------------------------------------------------------- */

typedef struct {
    int op;
    int64_t n;
    float *a, *b, *o, *w;
    int32_t *pos;
    speed_rope_t rope;
} small_t;

static void small_run(void *p, int rep) {
    small_t *s = p;
    const speed_dtype_t f = SPEED_DTYPE_F32;
    for (int i = 0; i < 100; i++) {
        switch (s->op) {
        case 0:
            must(speed_op_rmsnorm(g_be, speed_mat(s->o, f, s->n, D), speed_mat(s->a, f, s->n, D),
                                  speed_mat(s->w, f, 1, D), 1e-5f),
                 "rmsnorm");
            break;
        case 1:
            s->pos[0] = rep * 100 + i; /* a new position each call: the table is rebuilt */
            must(speed_op_rope(g_be, speed_mat(s->o, f, s->n, D), N_HEADS, HD, s->pos, &s->rope), "rope");
            break;
        case 2:
            must(speed_op_swiglu(g_be, speed_mat(s->o, f, s->n, F), speed_mat(s->a, f, s->n, F),
                                 speed_mat(s->b, f, s->n, F)),
                 "swiglu");
            break;
        case 3:
            must(speed_op_add(g_be, speed_mat(s->o, f, s->n, D), speed_mat(s->a, f, s->n, D),
                              speed_mat(s->b, f, s->n, D)),
                 "add");
            break;
        }
    }
}

static void bench_small(int64_t n, int reps) {
    small_t s = {.n = n, .rope = {.theta = 10000.0f}};
    size_t cnt = (size_t)(n * F);
    s.a = xalloc(cnt * sizeof(float));
    s.b = xalloc(cnt * sizeof(float));
    s.o = xalloc(cnt * sizeof(float));
    s.w = xalloc(D * sizeof(float));
    s.pos = xalloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) s.pos[i] = (int32_t)i;
    fill_f32(s.a, cnt, 4.0f);
    fill_f32(s.b, cnt, 1.0f);
    fill_f32(s.o, cnt, 1.0f);
    fill_f32(s.w, D, 1.0f);
    static const char *names[] = {"rmsnorm [n x 2048]", "rope [n x 32*64], new position", "swiglu [n x 5632]",
                                  "add [n x 2048]"};
    for (int op = 0; op < 4; op++) {
        s.op = op;
        double t = time_median(small_run, &s, reps) / 100;
        char name[96];
        snprintf(name, sizeof name, "%s, n=%lld", names[op], (long long)n);
        printf("  %-44s %9.2f us\n", name, t * 1e6);
    }
    speed_aligned_free(s.a);
    speed_aligned_free(s.b);
    speed_aligned_free(s.o);
    speed_aligned_free(s.w);
    speed_aligned_free(s.pos);
}

/* ---- thread pool ------------------------------------------------------------------------------- */

static void nop_task(void *arg, int i, int n) {
    (void)arg;
    (void)i;
    (void)n;
}

static void bench_pool(int n_threads, int reps) {
    speed_cpu_pool_t *pool;
    must(speed_cpu_pool_create(n_threads ? n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN), &pool), "pool");
    double t[64];
    if (reps > 64) reps = 64;
    for (int r = 0; r < reps; r++) {
        const int n = 10000;
        double t0 = speed_clock_mono_s();
        for (int i = 0; i < n; i++) speed_cpu_pool_run(pool, nop_task, NULL);
        t[r] = (speed_clock_mono_s() - t0) / n;
    }
    printf("  %-44s %9.3f us\n", "pool dispatch + join, empty job", tu_median(t, reps) * 1e6);
    const long idle_us[2] = {1000, 20000};
    for (int k = 0; k < 2; k++) {
        for (int r = 0; r < reps; r++) {
            struct timespec ts = {0, idle_us[k] * 1000};
            nanosleep(&ts, NULL);
            double t0 = speed_clock_mono_s();
            speed_cpu_pool_run(pool, nop_task, NULL);
            t[r] = speed_clock_mono_s() - t0;
        }
        char name[96];
        snprintf(name, sizeof name, "  the same after %ld ms idle", idle_us[k] / 1000);
        printf("  %-44s %9.3f us\n", name, tu_median(t, reps) * 1e6);
    }
    speed_cpu_pool_destroy(pool);
}

/* ---- main ---------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    bool quick = false;
    int n_threads = 0, reps = -1;
    const char *only = NULL;
    speed_cpu_isa_t isa = SPEED_CPU_ISA_BEST;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = true;
        else if (!strcmp(argv[i], "--thp"))
            g_thp = true;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            n_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--only") && i + 1 < argc)
            only = argv[++i];
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            const char *s = argv[++i];
            for (int k = 0; k <= SPEED_CPU_ISA_BEST; k++)
                if (!strcmp(s, speed_cpu_isa_name((speed_cpu_isa_t)k))) isa = (speed_cpu_isa_t)k;
        } else {
            fprintf(stderr,
                    "usage: %s [--quick] [--thp] [--threads N] [--reps N] [--isa scalar|avx2|avx512|avx512-bf16] "
                    "[--only decode|sweep|prefill|attention|small]\n",
                    argv[0]);
            return 2;
        }
    }
    g_reps = reps > 0 ? reps : quick ? 3 : 9;
    const double llc_beyond = quick ? 128e6 : 256e6; /* decode weights rotated over at least this */

    speed_roofline_params_t rp = speed_roofline_default_params();
    rp.n_threads = n_threads;
    rp.isa_max = isa;
    if (quick) {
        rp.read_bytes = (size_t)256 << 20;
        rp.repetitions = 3;
        rp.compute_ms = 20;
    } else {
        rp.repetitions = g_reps;
    }
    must(speed_roofline_measure(&rp, &g_roof), "roofline");
    g_probe = rp;
    g_probe.read_bytes = (size_t)(quick ? 64 : 256) << 20;
    g_probe.repetitions = 1;
    g_probe.compute_ms = quick ? 5 : 20;

    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU;
    bp.n_threads = n_threads;
    bp.cpu_isa_max = isa;
    must(speed_backend_create(&bp, &g_be), "backend");

    printf("bench_kernels: %s%s, weights in %s pages\n", speed_backend_name(g_be), quick ? " (quick)" : "",
           g_thp ? "2 MiB (THP)" : "4 KiB");
    printf("roofline (%d threads, median of %d): read %.2f GB/s, copy %.2f GB/s, fp32 %.1f GFLOP/s (%s), "
           "bf16 %.1f GFLOP/s (%s)\n",
           g_roof.n_threads, g_roof.repetitions, g_roof.read_gbs, g_roof.copy_gbs, g_roof.fp32_gflops,
           g_roof.fp32_kernel, g_roof.bf16_gflops, g_roof.bf16_kernel);

#define RUN(part) (!only || !strcmp(only, part))
    if (RUN("decode") || RUN("sweep"))
        printf("decode matmul (weights streamed once per call, rotated beyond the LLC):\n");
    struct {
        const char *name;
        int64_t n, m, k;
        speed_dtype_t dt;
    } dec[] = {{"[1 x 2048]*[5632 x 2048]^T bf16", 1, F, D, SPEED_DTYPE_BF16},
               {"[1 x 5632]*[2048 x 5632]^T bf16", 1, D, F, SPEED_DTYPE_BF16},
               {"[1 x 2048]*[2048 x 2048]^T bf16", 1, D, D, SPEED_DTYPE_BF16},
               {"[1 x 2048]*[256 x 2048]^T bf16", 1, N_KV * HD, D, SPEED_DTYPE_BF16},
               {"[1 x 2048]*[32000 x 2048]^T bf16 lm_head", 1, VOCAB, D, SPEED_DTYPE_BF16},
               {"[4 x 2048]*[5632 x 2048]^T bf16 (batch 4)", 4, F, D, SPEED_DTYPE_BF16},
               {"[8 x 2048]*[5632 x 2048]^T bf16 (batch 8)", 8, F, D, SPEED_DTYPE_BF16},
               {"[1 x 2048]*[5632 x 2048]^T f16", 1, F, D, SPEED_DTYPE_F16},
               {"[1 x 2048]*[5632 x 2048]^T f32", 1, F, D, SPEED_DTYPE_F32}};
    for (size_t i = 0; RUN("decode") && i < sizeof dec / sizeof dec[0]; i++)
        bench_matmul(dec[i].name, dec[i].n, dec[i].m, dec[i].k, dec[i].dt, llc_beyond, ROOF_READ, g_reps);
    if (RUN("decode") || RUN("sweep")) bench_sweep(quick ? 4 : 22, quick ? 3 : g_reps);

    if (RUN("prefill")) {
        printf("prefill matmul:\n");
        const int64_t n = quick ? 256 : 512;
        char name[96];
        int r = quick ? 3 : g_reps;
        snprintf(name, sizeof name, "[%lld x 2048]*[5632 x 2048]^T bf16", (long long)n);
        bench_matmul(name, n, F, D, SPEED_DTYPE_BF16, 0, ROOF_BF16, r);
        snprintf(name, sizeof name, "[%lld x 2048]*[5632 x 2048]^T f16", (long long)n);
        bench_matmul(name, n, F, D, SPEED_DTYPE_F16, 0, ROOF_FP32, r);
        snprintf(name, sizeof name, "[%lld x 2048]*[5632 x 2048]^T f32", (long long)n);
        bench_matmul(name, n, F, D, SPEED_DTYPE_F32, 0, ROOF_FP32, r);
        if (!quick) {
            bench_matmul("[64 x 2048]*[5632 x 2048]^T bf16", 64, F, D, SPEED_DTYPE_BF16, 0, ROOF_BF16, r);
            bench_matmul("[16 x 2048]*[5632 x 2048]^T bf16", 16, F, D, SPEED_DTYPE_BF16, 0, ROOF_BF16, r);
        }
    }

    if (RUN("attention")) {
        printf("attention (32 heads / 4 kv heads, head_dim 64, B = 16):\n");
        double flops, bytes, t;
        int ctx = quick ? 2048 : 4096;
        char name[96];
        for (int dt = SPEED_DTYPE_BF16; dt >= SPEED_DTYPE_F32; dt -= 1) {
            t = bench_attention(ctx, 1, (speed_dtype_t)dt, g_reps, &flops, &bytes);
            snprintf(name, sizeof name, "decode, 1 row x %d entries, %s KV", ctx, speed_dtype_name((speed_dtype_t)dt));
            printf("  %-44s %9.3f ms %9.2f GB/s KV   %6.1f GFLOP/s\n", name, t * 1e3, bytes / t * 1e-9,
                   flops / t * 1e-9);
        }
        int n = quick ? 256 : 512;
        t = bench_attention(n, n, SPEED_DTYPE_BF16, quick ? 3 : g_reps, &flops, &bytes);
        snprintf(name, sizeof name, "prefill, %d rows causal, bf16 KV", n);
        printf("  %-44s %9.3f ms %9.1f GFLOP/s  %5.1f%% of fp32 peak (start of run)\n", name, t * 1e3, flops / t * 1e-9,
               100.0 * flops / t * 1e-9 / g_roof.fp32_gflops);
    }

    if (RUN("small")) {
        printf("small ops (per call):\n");
        bench_small(1, g_reps);
        bench_small(64, g_reps);
        bench_pool(n_threads, g_reps);
    }

    speed_backend_destroy(g_be);
    return 0;
}
