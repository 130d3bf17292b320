/* Machine roofline probes: read/copy bandwidth, fp32 FMA and bf16 dot-product peaks. */
#include "roofline.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ROOFLINE_X86 1
#endif

#define ROOFLINE_DEFAULT_BYTES ((size_t)1 << 30)
#define ROOFLINE_MIN_BYTES     ((size_t)1 << 20)
#define ROOFLINE_ACCS          12 /* independent accumulators: > FMA latency x issue width on current cores */

speed_roofline_params_t speed_roofline_default_params(void) {
    speed_roofline_params_t p = {
        .n_threads = 0, .read_bytes = 0, .repetitions = 0, .compute_ms = 0, .isa_max = SPEED_CPU_ISA_BEST};
    return p;
}

/* ---- kernels ------------------------------------------------------------------------
 * Streaming reads return a value derived from every element so the loads cannot be
 * removed; compute loops keep ROOFLINE_ACCS independent dependency chains in registers
 * (acc = acc * a + b converges to b / (1 - a) and never reaches denormals or infinity). */

static float read_scalar(const float *x, size_t n) {
    float a[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) a[k] += x[i + k];
    for (; i < n; i++) a[0] += x[i];
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

static float fma_scalar(int64_t iters) {
    float acc[ROOFLINE_ACCS];
    for (int k = 0; k < ROOFLINE_ACCS; k++) acc[k] = 0.5f + 0.01f * (float)k;
    const float a = 0.999999f, b = 1e-6f;
    for (int64_t i = 0; i < iters; i++)
        for (int k = 0; k < ROOFLINE_ACCS; k++) acc[k] = acc[k] * a + b;
    float s = 0.0f;
    for (int k = 0; k < ROOFLINE_ACCS; k++) s += acc[k];
    return s;
}

#ifdef ROOFLINE_X86
__attribute__((target("avx2"))) static float read_avx2(const float *x, size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(x + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(x + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(x + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(x + i + 24));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float s = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
    return s + read_scalar(x + i, n - i);
}

__attribute__((target("avx512f"))) static float read_avx512(const float *x, size_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(x + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(x + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(x + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(x + i + 48));
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    return s + read_scalar(x + i, n - i);
}

/* The compute loops keep their accumulators in an array that, fully unrolled, lives in
 * registers: ACCS_WIDE for AVX-512 (32 registers; covers a 6-cycle latency at 2 per cycle
 * with room to spare), ROOFLINE_ACCS for AVX2 (16 registers). */
#define ACCS_WIDE 24

__attribute__((target("avx2,fma"))) static float fma_avx2(int64_t iters) {
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-6f);
    __m256 c[ROOFLINE_ACCS];
    for (int k = 0; k < ROOFLINE_ACCS; k++) c[k] = _mm256_set1_ps(0.5f);
    for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 32
        for (int k = 0; k < ROOFLINE_ACCS; k++) c[k] = _mm256_fmadd_ps(c[k], a, b);
    }
    __m256 s = c[0];
    for (int k = 1; k < ROOFLINE_ACCS; k++) s = _mm256_add_ps(s, c[k]);
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    return lanes[0] + lanes[7];
}

__attribute__((target("avx512f"))) static float fma_avx512(int64_t iters) {
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-6f);
    __m512 c[ACCS_WIDE];
    for (int k = 0; k < ACCS_WIDE; k++) c[k] = _mm512_set1_ps(0.5f);
    for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 32
        for (int k = 0; k < ACCS_WIDE; k++) c[k] = _mm512_fmadd_ps(c[k], a, b);
    }
    __m512 s = c[0];
    for (int k = 1; k < ACCS_WIDE; k++) s = _mm512_add_ps(s, c[k]);
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512bf16"))) static float dpbf16_avx512(int64_t iters) {
    /* bf16 0.001 (0x3a83) in both halves of every fp32 lane: each step adds ~2e-6 per lane */
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3a83), b = (__m512bh)_mm512_set1_epi16(0x3a83);
    __m512 c[ACCS_WIDE];
    for (int k = 0; k < ACCS_WIDE; k++) c[k] = _mm512_set1_ps(0.5f);
    for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 32
        for (int k = 0; k < ACCS_WIDE; k++) c[k] = _mm512_dpbf16_ps(c[k], a, b);
    }
    __m512 s = c[0];
    for (int k = 1; k < ACCS_WIDE; k++) s = _mm512_add_ps(s, c[k]);
    return _mm512_reduce_add_ps(s);
}
#endif

/* ---- threads ------------------------------------------------------------------------ */

typedef enum { JOB_TOUCH, JOB_READ, JOB_COPY, JOB_FP32, JOB_BF16 } job_kind_t;

typedef struct {
    job_kind_t kind;
    int n_threads;
    int runs; /* 1 warm-up + repetitions */
    speed_cpu_isa_t isa;
    char *buf; /* bandwidth jobs */
    size_t bytes;
    int64_t iters; /* compute jobs, per thread per run */
    pthread_barrier_t barrier;
    pthread_mutex_t gate_lock; /* workers wait at the gate until every thread exists */
    pthread_cond_t gate_cond;
    int gate;         /* 0 closed, 1 go, -1 abandon (a thread failed to start) */
    double *times;    /* [runs], written by thread 0 */
    float sink[1024]; /* per-thread results, so no work is optimised away */
} job_t;

typedef struct {
    job_t *job;
    int tid;
} job_arg_t;

/* Thread tid's share of [0, n) in units of `align` bytes. */
static void slice(size_t n, size_t align, int tid, int n_threads, size_t *lo_p, size_t *hi_p) {
    size_t units = n / align;
    *lo_p = units * (size_t)tid / (size_t)n_threads * align;
    *hi_p = units * (size_t)(tid + 1) / (size_t)n_threads * align;
}

static float job_work(job_t *j, int tid) {
    size_t lo, hi;
    switch (j->kind) {
    case JOB_TOUCH:
        slice(j->bytes, 4096, tid, j->n_threads, &lo, &hi);
        memset(j->buf + lo, 0x3f, hi - lo); /* floats of ~0.75 */
        return 0.0f;
    case JOB_READ: {
        slice(j->bytes, 256, tid, j->n_threads, &lo, &hi);
        const float *x = (const float *)(const void *)(j->buf + lo);
        size_t n = (hi - lo) / sizeof(float);
#ifdef ROOFLINE_X86
        if (j->isa >= SPEED_CPU_ISA_AVX512) return read_avx512(x, n);
        if (j->isa >= SPEED_CPU_ISA_AVX2) return read_avx2(x, n);
#endif
        return read_scalar(x, n);
    }
    case JOB_COPY: {
        size_t half = j->bytes / 2 / 4096 * 4096;
        slice(half, 4096, tid, j->n_threads, &lo, &hi);
        memcpy(j->buf + half + lo, j->buf + lo, hi - lo);
        return (float)(unsigned char)j->buf[half + lo];
    }
    case JOB_FP32:
#ifdef ROOFLINE_X86
        if (j->isa >= SPEED_CPU_ISA_AVX512) return fma_avx512(j->iters);
        if (j->isa >= SPEED_CPU_ISA_AVX2) return fma_avx2(j->iters);
#endif
        return fma_scalar(j->iters);
    case JOB_BF16:
#ifdef ROOFLINE_X86
        if (j->isa >= SPEED_CPU_ISA_AVX512_BF16) return dpbf16_avx512(j->iters);
#endif
        return 0.0f; /* not called: no bf16 arithmetic on this machine */
    }
    return 0.0f;
}

static void job_thread_run(job_t *j, int tid) {
    float sink = 0.0f;
    for (int r = 0; r < j->runs; r++) {
        pthread_barrier_wait(&j->barrier);
        double t0 = tid == 0 ? speed_clock_mono_s() : 0.0;
        sink += job_work(j, tid);
        pthread_barrier_wait(&j->barrier);
        if (tid == 0) j->times[r] = speed_clock_mono_s() - t0;
    }
    j->sink[tid % 1024] = sink;
}

static void *job_thread(void *arg) {
    job_arg_t *a = arg;
    job_t *j = a->job;
    pthread_mutex_lock(&j->gate_lock);
    while (j->gate == 0) pthread_cond_wait(&j->gate_cond, &j->gate_lock);
    int go = j->gate > 0;
    pthread_mutex_unlock(&j->gate_lock);
    if (go) job_thread_run(j, a->tid);
    return NULL;
}

static void gate_open(job_t *j, int value) {
    pthread_mutex_lock(&j->gate_lock);
    j->gate = value;
    pthread_cond_broadcast(&j->gate_cond);
    pthread_mutex_unlock(&j->gate_lock);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Runs the job on n_threads threads (the caller is thread 0); *median_p = the median time of
 * the runs after the first. */
static speed_status_t job_run(job_t *j, double *median_p) {
    speed_status_t st = SPEED_OK;
    pthread_t *threads = speed_calloc((size_t)j->n_threads, sizeof *threads);
    job_arg_t *args = speed_calloc((size_t)j->n_threads, sizeof *args);
    j->times = speed_calloc((size_t)j->runs, sizeof *j->times);
    if (!threads || !args || !j->times) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    if (pthread_barrier_init(&j->barrier, NULL, (unsigned)j->n_threads) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "roofline: cannot create a barrier for %d threads", j->n_threads);
        st = SPEED_ERR_INTERNAL;
        goto out;
    }
    pthread_mutex_init(&j->gate_lock, NULL);
    pthread_cond_init(&j->gate_cond, NULL);
    j->gate = 0;
    int started = 1;
    for (; started < j->n_threads; started++) {
        args[started] = (job_arg_t){j, started};
        int rc = pthread_create(&threads[started], NULL, job_thread, &args[started]);
        if (rc != 0) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "roofline: cannot start thread %d of %d: %s", started, j->n_threads,
                        strerror(rc));
            st = SPEED_ERR_INTERNAL;
            break;
        }
    }
    gate_open(j, st == SPEED_OK ? 1 : -1);
    if (st == SPEED_OK) job_thread_run(j, 0);
    for (int t = 1; t < started; t++) pthread_join(threads[t], NULL);
    pthread_barrier_destroy(&j->barrier);
    pthread_cond_destroy(&j->gate_cond);
    pthread_mutex_destroy(&j->gate_lock);
    if (st == SPEED_OK && median_p) {
        int n = j->runs > 1 ? j->runs - 1 : 1;
        double *t = j->times + (j->runs > 1);
        qsort(t, (size_t)n, sizeof *t, cmp_double);
        *median_p = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
    }
out:
    speed_free(j->times);
    j->times = NULL;
    speed_free(args);
    speed_free(threads);
    return st;
}

/* ---- probes ------------------------------------------------------------------------- */

static speed_status_t params_resolve(const speed_roofline_params_t *in, speed_roofline_params_t *p) {
    *p = in ? *in : speed_roofline_default_params();
    if (p->n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        p->n_threads = n > 0 ? (int)(n < 1024 ? n : 1024) : 1;
    }
    if (!p->read_bytes) p->read_bytes = ROOFLINE_DEFAULT_BYTES;
    if (!p->repetitions) p->repetitions = 5;
    if (!(p->compute_ms > 0)) p->compute_ms = 50.0;
    if (p->n_threads < 1 || p->n_threads > 1024 || p->read_bytes < ROOFLINE_MIN_BYTES || p->repetitions < 1 ||
        p->repetitions > 1000 || p->compute_ms > 60000.0 || p->isa_max < SPEED_CPU_ISA_SCALAR ||
        p->isa_max > SPEED_CPU_ISA_BEST) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE,
                    "roofline: parameters out of range (threads %d in 1..1024, buffer %zu >= "
                    "%zu bytes, repetitions %d in 1..1000, compute %g ms <= 60000)",
                    p->n_threads, p->read_bytes, ROOFLINE_MIN_BYTES, p->repetitions, p->compute_ms);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

static speed_cpu_isa_t isa_pick(speed_cpu_isa_t cap) {
    speed_cpu_isa_t isa = speed_cpu_isa_detect();
    return cap < isa ? cap : isa;
}

speed_status_t speed_roofline_bandwidth(const speed_roofline_params_t *params, double *read_gbs_p, double *copy_gbs_p) {
    speed_roofline_params_t p;
    SPEED_CHECK(params_resolve(params, &p));
    size_t bytes = p.read_bytes / 4096 * 4096;
    const size_t huge = (size_t)2 << 20;
    char *buf = speed_aligned_alloc(huge, bytes);
    if (!buf) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "roofline: cannot allocate the %zu-byte bandwidth buffer", bytes);
        return SPEED_ERR_NO_MEMORY;
    }
#ifdef MADV_HUGEPAGE
    (void)madvise(buf, bytes, MADV_HUGEPAGE); /* best effort: fewer TLB misses, as a roofline should */
#endif
    job_t *j = speed_calloc(1, sizeof *j);
    speed_status_t st = j ? SPEED_OK : SPEED_ERR_NO_MEMORY;
    double t_read = 0.0, t_copy = 0.0;
    if (st == SPEED_OK) {
        *j = (job_t){.kind = JOB_TOUCH,
                     .n_threads = p.n_threads,
                     .runs = 1,
                     .isa = isa_pick(p.isa_max),
                     .buf = buf,
                     .bytes = bytes};
        st = job_run(j, NULL);
    }
    if (st == SPEED_OK) {
        j->kind = JOB_READ;
        j->runs = p.repetitions + 1;
        st = job_run(j, &t_read);
    }
    if (st == SPEED_OK && copy_gbs_p) {
        j->kind = JOB_COPY;
        st = job_run(j, &t_copy);
    }
    if (st == SPEED_OK) {
        if (read_gbs_p) *read_gbs_p = (double)bytes / t_read / 1e9;
        if (copy_gbs_p) *copy_gbs_p = (double)(bytes / 2 / 4096 * 4096) / t_copy / 1e9;
    }
    speed_free(j);
    speed_aligned_free(buf);
    return st;
}

/* FLOPs one thread does per iteration of a compute kernel. */
static double flops_per_iter(job_kind_t kind, speed_cpu_isa_t isa) {
#ifdef ROOFLINE_X86
    if (isa >= SPEED_CPU_ISA_AVX512) return ACCS_WIDE * 16.0 * (kind == JOB_BF16 ? 4.0 : 2.0);
    if (isa >= SPEED_CPU_ISA_AVX2) return ROOFLINE_ACCS * 8.0 * 2.0;
#endif
    (void)kind;
    (void)isa;
    return ROOFLINE_ACCS * 2.0;
}

/* Median GFLOP/s of a compute kernel on p->n_threads threads. */
static speed_status_t compute_probe(const speed_roofline_params_t *p, job_kind_t kind, speed_cpu_isa_t isa,
                                    double *gflops_p) {
    job_t *j = speed_calloc(1, sizeof *j);
    if (!j) return SPEED_ERR_NO_MEMORY;
    /* Calibrate on one thread: iterations for compute_ms. */
    *j = (job_t){.kind = kind, .n_threads = 1, .runs = 2, .isa = isa, .iters = 1 << 14};
    double t = 0.0;
    speed_status_t st = SPEED_OK;
    while (st == SPEED_OK) {
        st = job_run(j, &t);
        if (st != SPEED_OK || t > 2e-3 || j->iters > ((int64_t)1 << 40)) break;
        j->iters *= 8;
    }
    if (st == SPEED_OK) {
        double per_iter = t / (double)j->iters;
        int64_t iters = (int64_t)(p->compute_ms * 1e-3 / per_iter);
        j->iters = iters > 1024 ? iters : 1024;
        j->n_threads = p->n_threads;
        j->runs = p->repetitions + 1;
        st = job_run(j, &t);
    }
    if (st == SPEED_OK) *gflops_p = flops_per_iter(kind, isa) * (double)j->iters * (double)p->n_threads / t / 1e9;
    speed_free(j);
    return st;
}

speed_status_t speed_roofline_compute(const speed_roofline_params_t *params, double *fp32_gflops_p,
                                      double *bf16_gflops_p, speed_cpu_isa_t *isa_p) {
    speed_roofline_params_t p;
    SPEED_CHECK(params_resolve(params, &p));
    speed_cpu_isa_t isa = isa_pick(p.isa_max);
    double fp32 = 0.0, bf16 = 0.0;
    SPEED_CHECK(compute_probe(&p, JOB_FP32, isa, &fp32));
    if (isa >= SPEED_CPU_ISA_AVX512_BF16 && bf16_gflops_p)
        SPEED_CHECK(compute_probe(&p, JOB_BF16, isa, &bf16));
    else
        bf16 = fp32;
    if (fp32_gflops_p) *fp32_gflops_p = fp32;
    if (bf16_gflops_p) *bf16_gflops_p = bf16;
    if (isa_p) *isa_p = isa;
    return SPEED_OK;
}

speed_status_t speed_roofline_measure(const speed_roofline_params_t *params, speed_roofline_t *out) {
    speed_roofline_params_t p;
    SPEED_CHECK(params_resolve(params, &p));
    speed_roofline_t r = {
        .n_threads = p.n_threads, .read_bytes = p.read_bytes / 4096 * 4096, .repetitions = p.repetitions};
    SPEED_CHECK(speed_roofline_bandwidth(&p, &r.read_gbs, &r.copy_gbs));
    SPEED_CHECK(speed_roofline_compute(&p, &r.fp32_gflops, &r.bf16_gflops, &r.isa));
    r.fp32_kernel = r.isa >= SPEED_CPU_ISA_AVX512 ? "avx512 vfmadd231ps zmm"
                    : r.isa >= SPEED_CPU_ISA_AVX2 ? "avx2 vfmadd231ps ymm"
                                                  : "scalar";
    r.bf16_kernel = r.isa >= SPEED_CPU_ISA_AVX512_BF16 ? "avx512-bf16 vdpbf16ps zmm" : "none (bf16 widened to fp32)";
    *out = r;
    return SPEED_OK;
}

/* ---- persistent read probe ---------------------------------------------------------- */

struct speed_roofline_probe {
    speed_roofline_params_t p;
    char *buf;
    size_t bytes;
    job_t job;
};

speed_status_t speed_roofline_probe_create(const speed_roofline_params_t *params, speed_roofline_probe_t **probe_p) {
    if (!probe_p) return SPEED_ERR_INVALID_ARGUMENT;
    speed_roofline_probe_t *pr = speed_calloc(1, sizeof *pr);
    if (!pr) return SPEED_ERR_NO_MEMORY;
    speed_status_t st = params_resolve(params, &pr->p);
    if (st != SPEED_OK) {
        speed_free(pr);
        return st;
    }
    pr->bytes = pr->p.read_bytes / 4096 * 4096;
    pr->buf = speed_aligned_alloc((size_t)2 << 20, pr->bytes);
    if (!pr->buf) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "roofline: cannot allocate the %zu-byte probe buffer", pr->bytes);
        speed_free(pr);
        return SPEED_ERR_NO_MEMORY;
    }
#ifdef MADV_HUGEPAGE
    (void)madvise(pr->buf, pr->bytes, MADV_HUGEPAGE);
#endif
    pr->job = (job_t){.kind = JOB_TOUCH,
                      .n_threads = pr->p.n_threads,
                      .runs = 1,
                      .isa = isa_pick(pr->p.isa_max),
                      .buf = pr->buf,
                      .bytes = pr->bytes};
    st = job_run(&pr->job, NULL);
    if (st != SPEED_OK) {
        speed_roofline_probe_destroy(pr);
        return st;
    }
    *probe_p = pr;
    return SPEED_OK;
}

speed_status_t speed_roofline_probe_read(speed_roofline_probe_t *pr, int repetitions, double *read_gbs_p) {
    if (!pr || !read_gbs_p || repetitions < 1) return SPEED_ERR_INVALID_ARGUMENT;
    pr->job.kind = JOB_READ;
    pr->job.runs = repetitions + 1;
    double t = 0.0;
    SPEED_CHECK(job_run(&pr->job, &t));
    *read_gbs_p = (double)pr->bytes / t / 1e9;
    return SPEED_OK;
}

void speed_roofline_probe_destroy(speed_roofline_probe_t *pr) {
    if (!pr) return;
    speed_aligned_free(pr->buf);
    speed_free(pr);
}
