/* The fast CPU backend ("cpu"): the ops of backend.h on a persistent thread pool, with the
 * arithmetic in per-ISA kernel tables (cpu_kernels.h) chosen at creation from
 * speed_cpu_isa_detect(), capped by params->cpu_isa_max.
 *
 * This file decides how each op is split across threads; the kernels do one piece each:
 *   matmul, few rows          weight rows split into one contiguous range per thread: each
 *                             thread streams its share of the weights once, in order (n = 1,
 *                             or n <= gemv_max_n without AVX512_BF16: fp32 x, exact; bf16
 *                             weights with 2 .. 8 rows on AVX512_BF16: x rounded to bf16 and
 *                             vdpbf16ps, as the GEMM);
 *   matmul, more rows         blocks of nc weight rows (x all rows, or a row range when there
 *                             are few blocks) handed out by an atomic counter; each thread packs
 *                             its block k-slice by k-slice into its own buffer and multiplies;
 *   attention                 (block of query rows of one sequence, kv head) items by an atomic
 *                             counter, longest rows first; with fewer items than threads
 *                             (decode) every row's visible entries are also split across items
 *                             and the partial softmax states merged;
 *   row ops                   contiguous row ranges, run inline below a size where waking the
 *                             workers costs more than it saves.
 *   batch-invariant mode      every matmul reduces in the GEMM's order (the GEMM itself, or for
 *                             1 .. 8 rows a bi_gemv kernel that runs the GEMM's per-element chain
 *                             without packing the weights) and attention never splits a row, so
 *                             a row's result depends on that row only (backend.h).
 * Scratch (converted x, packed weights, attention partials) is owned by the context and grows
 * on demand; an op that cannot grow it returns SPEED_ERR_NO_MEMORY before touching its output.
 */
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "cpu_kernels.h"
#include "cpu_pool.h"
#include "log.h"

/* Below this many element-operations an op runs on the calling thread alone. */
#define SMALL_WORK      32768
/* Attention: split an item's entries only into chunks of at least this many entries. */
#define ATTN_SPLIT_MIN  128
/* Matmuls with bf16 weights and 2 .. this many rows use the vdpbf16ps few-row kernel. */
#define GEMV_BF16_MAX_N 8
/* Batch-invariant mode: matmuls with up to this many rows take the bi_gemv kernels (the GEMM's
 * order without packing the weights); with more, packing is shared by enough rows. */
#define BI_GEMV_MAX_N   8

typedef struct {
    bool valid;
    speed_rope_t params;
    int head_dim;
    float *inv_freq; /* [head_dim / 2] */
    int64_t n_pos;   /* rows of cs that are valid for pos; -1 = none */
    int64_t cap_pos;
    size_t cap_cs; /* floats */
    int32_t *pos;  /* [n_pos] positions the table below was built for */
    float *cs;     /* [n_pos][head_dim]: cos[head_dim / 2] then sin[head_dim / 2] */
} rope_cache_t;

typedef struct {
    speed_backend_t be; /* the public handle; be.ctx points back here */
    char name[64];
    speed_cpu_isa_t isa;
    const speed_cpu_kernels_t *k;
    speed_cpu_gemm_t gemm[SPEED_DTYPE_COUNT];
    bool batch_invariant; /* one reduction order per row whatever the batch (backend.h) */
    /* bf16 weights, 2 .. GEMV_BF16_MAX_N rows (AVX512_BF16 only, else NULL) */
    void (*gemv_bf16)(const speed_cpu_mm_t *mm, const void *xc, int64_t ldxc, int64_t j0, int64_t j1);
    /* the same rows in batch-invariant mode: the GEMM's order per element (NULL: take the GEMM) */
    void (*bi_gemv_bf16)(const speed_cpu_mm_t *mm, const void *xc, int64_t ldxc, int64_t j0, int64_t j1);
    speed_cpu_pool_t *pool;
    int n_threads;
    void *scratch; /* shared by the threads of one op */
    size_t scratch_bytes;
    void **tscratch; /* [n_threads] private buffers */
    size_t tscratch_bytes;
    rope_cache_t rope;
} cpu_ctx_t;

/* ---- scratch ------------------------------------------------------------------------ */

static speed_status_t scratch_reserve(cpu_ctx_t *c, size_t bytes) {
    if (bytes <= c->scratch_bytes) return SPEED_OK;
    bytes = bytes + bytes / 4 + 4096;
    void *p = speed_aligned_alloc(64, bytes);
    if (!p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu backend: cannot allocate %zu bytes of scratch", bytes);
        return SPEED_ERR_NO_MEMORY;
    }
    speed_aligned_free(c->scratch);
    c->scratch = p;
    c->scratch_bytes = bytes;
    return SPEED_OK;
}

static speed_status_t tscratch_reserve(cpu_ctx_t *c, size_t bytes) {
    if (bytes <= c->tscratch_bytes) return SPEED_OK;
    bytes = bytes + bytes / 4 + 4096;
    for (int t = 0; t < c->n_threads; t++) {
        speed_aligned_free(c->tscratch[t]);
        c->tscratch[t] = NULL;
    }
    c->tscratch_bytes = 0;
    for (int t = 0; t < c->n_threads; t++) {
        c->tscratch[t] = speed_aligned_alloc(64, bytes);
        if (!c->tscratch[t]) {
            for (int u = 0; u < t; u++) {
                speed_aligned_free(c->tscratch[u]);
                c->tscratch[u] = NULL;
            }
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu backend: cannot allocate %d x %zu bytes of thread scratch",
                        c->n_threads, bytes);
            return SPEED_ERR_NO_MEMORY;
        }
    }
    c->tscratch_bytes = bytes;
    return SPEED_OK;
}

/* ---- parallel helpers ----------------------------------------------------------------- */

/* Range [lo, hi) of thread t out of nt for n items, boundaries rounded to `align`. */
static void split_range(int64_t n, int t, int nt, int64_t align, int64_t *lo, int64_t *hi) {
    int64_t units = (n + align - 1) / align;
    *lo = units * t / nt * align;
    *hi = units * (t + 1) / nt * align;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

typedef void (*range_cb_t)(void *arg, int64_t i0, int64_t i1);

typedef struct {
    range_cb_t fn;
    void *arg;
    int64_t n, align;
} pfor_t;

static void pfor_task(void *p, int t, int nt) {
    pfor_t *f = p;
    int64_t lo, hi;
    split_range(f->n, t, nt, f->align, &lo, &hi);
    if (lo < hi) f->fn(f->arg, lo, hi);
}

/* fn over [0, n) in contiguous per-thread ranges; inline when the op is small. */
static void parallel_for(cpu_ctx_t *c, int64_t n, int64_t work_per_item, int64_t align, range_cb_t fn, void *arg) {
    if (c->n_threads == 1 || n <= 1 || n * work_per_item < SMALL_WORK) {
        fn(arg, 0, n);
        return;
    }
    pfor_t f = {fn, arg, n, align};
    speed_cpu_pool_run(c->pool, pfor_task, &f);
}

static inline size_t dsize(speed_dtype_t dt) { return speed_dtype_size(dt); }

static inline void *row_ptr(speed_mat_t m, int64_t r) {
    return (char *)m.data + (size_t)(r * m.row_stride) * dsize(m.dtype);
}

/* ---- trivial entry points --------------------------------------------------------------- */

static const char *cpu_name(void *ctx) { return ((cpu_ctx_t *)ctx)->name; }

static void cpu_destroy(void *ctx) {
    cpu_ctx_t *c = ctx;
    speed_cpu_pool_destroy(c->pool);
    if (c->tscratch)
        for (int t = 0; t < c->n_threads; t++) speed_aligned_free(c->tscratch[t]);
    speed_free(c->tscratch);
    speed_aligned_free(c->scratch);
    speed_free(c->rope.inv_freq);
    speed_free(c->rope.pos);
    speed_aligned_free(c->rope.cs);
    speed_aligned_free(c);
}

static speed_status_t cpu_alloc(void *ctx, size_t bytes, void **ptr_p) {
    (void)ctx;
    void *p = speed_aligned_alloc(64, bytes ? bytes : 1);
    if (!p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu backend: cannot allocate %zu bytes", bytes);
        return SPEED_ERR_NO_MEMORY;
    }
    *ptr_p = p;
    return SPEED_OK;
}

static void cpu_free(void *ctx, void *ptr) {
    (void)ctx;
    speed_aligned_free(ptr);
}

static bool cpu_host_memory(void *ctx) {
    (void)ctx;
    return true;
}

static speed_status_t cpu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    memmove(dst, src, bytes);
    return SPEED_OK;
}

static speed_status_t cpu_memset_zero(void *ctx, void *dst, size_t bytes) {
    (void)ctx;
    memset(dst, 0, bytes);
    return SPEED_OK;
}

static speed_status_t cpu_map_weights(void *ctx, const void *host, size_t bytes, const void **ptr_p) {
    (void)ctx;
    (void)bytes;
    *ptr_p = host; /* the mmap is used in place */
    return SPEED_OK;
}

static void cpu_unmap_weights(void *ctx, const void *ptr) {
    (void)ctx;
    (void)ptr;
}

static speed_status_t cpu_synchronize(void *ctx) {
    (void)ctx; /* every op has finished when it returns */
    return SPEED_OK;
}

static bool cpu_supports_op(void *ctx, speed_op_t op, speed_dtype_t dtype) {
    (void)ctx;
    return (unsigned)op < SPEED_OP_COUNT && speed_dtype_size(dtype) > 0;
}

/* ---- embed, rmsnorm, swiglu, add, get_rows ------------------------------------------------- */

typedef struct {
    cpu_ctx_t *c;
    speed_mat_t out, a, b;
    const int32_t *idx;
    float eps;
} rows_arg_t;

static void embed_rows(void *p, int64_t i0, int64_t i1) {
    rows_arg_t *a = p;
    for (int64_t i = i0; i < i1; i++)
        a->c->k->to_f32(a->a.dtype, row_ptr(a->a, a->idx[i]), row_ptr(a->out, i), a->out.n_cols);
}

static speed_status_t cpu_embed(void *ctx, speed_mat_t out, speed_mat_t table, const int32_t *ids) {
    rows_arg_t a = {.c = ctx, .out = out, .a = table, .idx = ids};
    parallel_for(ctx, out.n_rows, out.n_cols, 1, embed_rows, &a);
    return SPEED_OK;
}

static void rmsnorm_rows(void *p, int64_t i0, int64_t i1) {
    rows_arg_t *a = p;
    for (int64_t i = i0; i < i1; i++)
        a->c->k->rmsnorm_row(row_ptr(a->out, i), row_ptr(a->a, i), a->b.data, a->b.dtype, a->out.n_cols, a->eps);
}

static speed_status_t cpu_rmsnorm(void *ctx, speed_mat_t out, speed_mat_t x, speed_mat_t weight, float eps) {
    rows_arg_t a = {.c = ctx, .out = out, .a = x, .b = weight, .eps = eps};
    parallel_for(ctx, out.n_rows, 2 * out.n_cols, 1, rmsnorm_rows, &a);
    return SPEED_OK;
}

static void swiglu_rows(void *p, int64_t i0, int64_t i1) {
    rows_arg_t *a = p;
    for (int64_t i = i0; i < i1; i++)
        a->c->k->swiglu(row_ptr(a->out, i), row_ptr(a->a, i), row_ptr(a->b, i), a->out.n_cols);
}

static speed_status_t cpu_swiglu(void *ctx, speed_mat_t out, speed_mat_t gate, speed_mat_t up) {
    rows_arg_t a = {.c = ctx, .out = out, .a = gate, .b = up};
    parallel_for(ctx, out.n_rows, 4 * out.n_cols, 1, swiglu_rows, &a);
    return SPEED_OK;
}

static void add_rows(void *p, int64_t i0, int64_t i1) {
    rows_arg_t *a = p;
    for (int64_t i = i0; i < i1; i++)
        a->c->k->add(row_ptr(a->out, i), row_ptr(a->a, i), row_ptr(a->b, i), a->out.n_cols);
}

static speed_status_t cpu_add(void *ctx, speed_mat_t out, speed_mat_t a_, speed_mat_t b) {
    rows_arg_t a = {.c = ctx, .out = out, .a = a_, .b = b};
    parallel_for(ctx, out.n_rows, out.n_cols, 1, add_rows, &a);
    return SPEED_OK;
}

static void get_rows_rows(void *p, int64_t i0, int64_t i1) {
    rows_arg_t *a = p;
    for (int64_t i = i0; i < i1; i++)
        memcpy(row_ptr(a->out, i), row_ptr(a->a, a->idx[i]), (size_t)a->out.n_cols * sizeof(float));
}

static speed_status_t cpu_get_rows(void *ctx, speed_mat_t out, speed_mat_t x, const int32_t *rows) {
    rows_arg_t a = {.c = ctx, .out = out, .a = x, .idx = rows};
    parallel_for(ctx, out.n_rows, out.n_cols, 1, get_rows_rows, &a);
    return SPEED_OK;
}

/* ---- rope -------------------------------------------------------------------------------- */

typedef struct {
    cpu_ctx_t *c;
    speed_mat_t x;
    int n_heads, head_dim;
} rope_arg_t;

static void rope_table_rows(void *p, int64_t i0, int64_t i1) {
    rope_arg_t *a = p;
    rope_cache_t *rc = &a->c->rope;
    const int half = rc->head_dim / 2;
    for (int64_t i = i0; i < i1; i++) {
        float *cs = rc->cs + i * rc->head_dim;
        for (int d = 0; d < half; d++) {
            float ang = (float)rc->pos[i] * rc->inv_freq[d]; /* the f32 angle, as transformers */
            cs[d] = (float)cos((double)ang);
            cs[half + d] = (float)sin((double)ang);
        }
    }
}

static void rope_rows(void *p, int64_t i0, int64_t i1) {
    rope_arg_t *a = p;
    for (int64_t i = i0; i < i1; i++)
        a->c->k->rope_row(row_ptr(a->x, i), a->n_heads, a->head_dim, a->c->rope.cs + i * a->head_dim);
}

static bool rope_same(const speed_rope_t *a, const speed_rope_t *b) {
    return a->theta == b->theta && a->llama3_scaling == b->llama3_scaling &&
           (!a->llama3_scaling ||
            (a->factor == b->factor && a->low_freq_factor == b->low_freq_factor &&
             a->high_freq_factor == b->high_freq_factor && a->original_max_position == b->original_max_position));
}

/* The cos/sin table depends only on (rope params, head_dim, positions): q and k of every
 * layer of a step share it, so it is built once per step. */
static speed_status_t rope_prepare(cpu_ctx_t *c, int head_dim, const int32_t *positions, int64_t n,
                                   const speed_rope_t *rope, rope_arg_t *arg) {
    rope_cache_t *rc = &c->rope;
    if (!rc->valid || rc->head_dim != head_dim || !rope_same(&rc->params, rope)) {
        rc->valid = false;
        float *f = speed_realloc(rc->inv_freq, (size_t)(head_dim / 2) * sizeof(float));
        if (!f) return SPEED_ERR_NO_MEMORY;
        rc->inv_freq = f;
        for (int i = 0; i < head_dim / 2; i++) f[i] = speed_rope_inv_freq(rope, head_dim, i);
        rc->params = *rope;
        rc->head_dim = head_dim;
        rc->n_pos = -1;
        rc->valid = true;
    }
    if (rc->n_pos == n && memcmp(rc->pos, positions, (size_t)n * sizeof *positions) == 0) return SPEED_OK;
    rc->n_pos = -1;
    if (n > rc->cap_pos) {
        int32_t *pos = speed_realloc(rc->pos, (size_t)n * sizeof *pos);
        if (!pos) return SPEED_ERR_NO_MEMORY;
        rc->pos = pos;
        rc->cap_pos = n;
    }
    if ((size_t)n * (size_t)head_dim > rc->cap_cs) {
        speed_aligned_free(rc->cs);
        rc->cap_cs = 0;
        rc->cs = speed_aligned_alloc(64, (size_t)n * (size_t)head_dim * sizeof(float));
        if (!rc->cs) return SPEED_ERR_NO_MEMORY;
        rc->cap_cs = (size_t)n * (size_t)head_dim;
    }
    memcpy(rc->pos, positions, (size_t)n * sizeof *positions);
    parallel_for(c, n, 16 * head_dim, 1, rope_table_rows, arg);
    rc->n_pos = n;
    return SPEED_OK;
}

static speed_status_t cpu_rope(void *ctx, speed_mat_t x, int n_heads, int head_dim, const int32_t *positions,
                               const speed_rope_t *rope) {
    cpu_ctx_t *c = ctx;
    rope_arg_t a = {c, x, n_heads, head_dim};
    speed_status_t st = rope_prepare(c, head_dim, positions, x.n_rows, rope, &a);
    if (st != SPEED_OK) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu backend: rope: out of memory for %lld positions", (long long)x.n_rows);
        return st;
    }
    parallel_for(c, x.n_rows, 2 * x.n_cols, 1, rope_rows, &a);
    return SPEED_OK;
}

/* ---- kv_store / kv_load -------------------------------------------------------------------- */

typedef struct {
    cpu_ctx_t *c;
    const speed_kv_layer_t *kv;
    speed_mat_t k, v;
    const int32_t *slots;
} kv_arg_t;

/* K of the view's first head in `slot`: the view's n_kv_heads * head_dim elements follow
 * contiguously (a head view's heads are adjacent in the slot); slots are S heads apart. */
static inline char *kv_slot(const speed_kv_layer_t *kv, int32_t slot) {
    const size_t row_bytes = (size_t)speed_kv_layer_slot_heads(kv) * kv->head_dim * dsize(kv->dtype);
    return (char *)kv->k_base + (size_t)(slot / kv->block_tokens) * kv->block_stride +
           (size_t)(slot % kv->block_tokens) * row_bytes;
}

static void kv_store_rows(void *p, int64_t i0, int64_t i1) {
    kv_arg_t *a = p;
    const int64_t w = a->k.n_cols;
    for (int64_t i = i0; i < i1; i++) {
        char *dst = kv_slot(a->kv, a->slots[i]);
        a->c->k->from_f32(a->kv->dtype, row_ptr(a->k, i), dst, w);
        a->c->k->from_f32(a->kv->dtype, row_ptr(a->v, i), dst + a->kv->v_offset, w);
    }
}

static void kv_load_rows(void *p, int64_t i0, int64_t i1) {
    kv_arg_t *a = p;
    const int64_t w = a->k.n_cols;
    for (int64_t i = i0; i < i1; i++) {
        const char *src = kv_slot(a->kv, a->slots[i]);
        a->c->k->to_f32(a->kv->dtype, src, row_ptr(a->k, i), w);
        a->c->k->to_f32(a->kv->dtype, src + a->kv->v_offset, row_ptr(a->v, i), w);
    }
}

static speed_status_t cpu_kv_store(void *ctx, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                   const int32_t *slots) {
    kv_arg_t a = {ctx, kv, k, v, slots};
    parallel_for(ctx, k.n_rows, 2 * k.n_cols, 1, kv_store_rows, &a);
    return SPEED_OK;
}

static speed_status_t cpu_kv_load(void *ctx, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                  const int32_t *slots) {
    kv_arg_t a = {ctx, kv, k, v, slots};
    parallel_for(ctx, k.n_rows, 2 * k.n_cols, 1, kv_load_rows, &a);
    return SPEED_OK;
}

/* ---- matmul ------------------------------------------------------------------------------ */

typedef struct {
    cpu_ctx_t *c;
    speed_cpu_mm_t mm;
    const speed_cpu_gemm_t *g;
    const void *xs; /* x as the gemm compute reads it */
    int64_t ldxs;
    int64_t nj, ni; /* blocks of weight rows, row ranges of x */
    int64_t chunk;  /* gemv: weight rows per work item */
    /* gemv with converted x (xs != NULL): gemv_bf16 or bi_gemv_bf16 */
    void (*gemv_xc)(const speed_cpu_mm_t *mm, const void *xc, int64_t ldxc, int64_t j0, int64_t j1);
    /* gemv on the f32 x (xs == NULL): the table's gemv or bi_gemv */
    void (*gemv)(const speed_cpu_mm_t *mm, int64_t j0, int64_t j1);
    _Atomic int64_t next;
} mm_arg_t;

/* Weight rows in chunks of a->chunk taken by an atomic counter: each chunk is one long
 * sequential stream (>= 16 rows), and a thread slowed by a noisy neighbour simply takes fewer
 * chunks instead of making the others wait at the join (a static split lost ~5% of the read
 * roof to that wait on the shared 2-core VMs). */
static void gemv_task(void *p, int t, int nt) {
    (void)t;
    mm_arg_t *a = p;
    const int64_t m = a->mm.m;
    int64_t lo = atomic_load_explicit(&a->next, memory_order_relaxed);
    for (;;) {
        /* guided: take half of this thread's share of what is left (at least a->chunk rows,
         * a multiple of 16), so the chunks shrink toward the end and the threads finish
         * together instead of one waiting out the other's last big chunk */
        if (lo >= m) break;
        int64_t take = (m - lo) / (2 * (int64_t)nt);
        take = take < a->chunk ? a->chunk : (take + 15) / 16 * 16;
        if (!atomic_compare_exchange_weak_explicit(&a->next, &lo, lo + take, memory_order_relaxed,
                                                   memory_order_relaxed))
            continue; /* lo now holds the current value */
        int64_t hi = m - lo < take ? m : lo + take;
        if (a->xs)
            a->gemv_xc(&a->mm, a->xs, a->ldxs, lo, hi);
        else
            a->gemv(&a->mm, lo, hi);
        lo = atomic_load_explicit(&a->next, memory_order_relaxed);
    }
}

/* Smallest chunk for gemv_task: a 32nd of a thread's share, a multiple of 16 rows. */
static int64_t gemv_chunk_rows(int64_t m, int n_threads) {
    int64_t want = (m + 32 * (int64_t)n_threads - 1) / (32 * (int64_t)n_threads);
    return (want + 15) / 16 * 16;
}

static void convert_x_rows(void *p, int64_t i0, int64_t i1) {
    mm_arg_t *a = p;
    a->g->convert_x(&a->mm, i0, i1, (void *)a->xs, a->ldxs);
}

static void gemm_task(void *p, int t, int nt) {
    (void)nt;
    mm_arg_t *a = p;
    const speed_cpu_gemm_t *g = a->g;
    const speed_cpu_mm_t *mm = &a->mm;
    void *packed = a->c->tscratch[t];
    for (;;) {
        int64_t item = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (item >= a->nj * a->ni) break;
        int64_t jb = item / a->ni, ib = item % a->ni;
        int64_t j0 = jb * g->nc, nc = mm->m - j0 < g->nc ? mm->m - j0 : g->nc;
        int64_t i0, i1;
        split_range(mm->n, (int)ib, (int)a->ni, 8, &i0, &i1);
        if (i0 >= i1) continue;
        for (int64_t p0 = 0; p0 < mm->k; p0 += g->kc) {
            int64_t kc = mm->k - p0 < g->kc ? mm->k - p0 : g->kc;
            g->pack_w(mm, j0, nc, p0, kc, packed);
            g->compute(mm, a->xs, a->ldxs, packed, i0, i1, j0, nc, p0, kc, p0 == 0);
        }
    }
}

static speed_status_t cpu_matmul(void *ctx, speed_mat_t out, speed_mat_t x, speed_mat_t w, bool accumulate) {
    cpu_ctx_t *c = ctx;
    mm_arg_t a = {
        .c = c,
        .mm = {.n = x.n_rows,
               .m = w.n_rows,
               .k = x.n_cols,
               .x = x.data,
               .ldx = x.row_stride,
               .w = w.data,
               .ldw = w.row_stride,
               .wtype = w.dtype,
               .out = out.data,
               .ldo = out.row_stride,
               .accumulate = accumulate},
    };
    const int T = c->n_threads;

    /* Batch-invariant mode: every n reduces in the order of the blocked GEMM below. Its
     * micro-kernels accumulate each output element over k in one order fixed by k alone (the row
     * tile a row lands in, the row ranges and the threads change nothing per element), while
     * the mode-off few-row paths reduce in vector lanes (fp32 x) or round x differently (n >= 2).
     * Up to BI_GEMV_MAX_N rows take a bi_gemv kernel instead: the GEMM's own per-element chain
     * with the weights read in place (bi_gemv_bf16 for the AVX512_BF16 GEMM of bf16 weights, the
     * table's bi_gemv for the table's GEMM), bit for bit the GEMM's result. */
    const bool few_rows_ok = !c->batch_invariant;
    const bool bi_few = c->batch_invariant && a.mm.n <= BI_GEMV_MAX_N;
    const bool bi_bf16 = bi_few && c->bi_gemv_bf16 && w.dtype == SPEED_DTYPE_BF16;
    if ((few_rows_ok && c->gemv_bf16 && w.dtype == SPEED_DTYPE_BF16 && a.mm.n >= 2 && a.mm.n <= GEMV_BF16_MAX_N) ||
        bi_bf16) {
        const speed_cpu_gemm_t *g = &c->gemm[SPEED_DTYPE_BF16];
        a.g = g;
        a.gemv_xc = bi_bf16 ? c->bi_gemv_bf16 : c->gemv_bf16;
        a.ldxs = g->xc_cols(a.mm.k);
        SPEED_CHECK(scratch_reserve(c, (size_t)a.mm.n * (size_t)a.ldxs * g->xc_elem));
        a.xs = c->scratch;
        g->convert_x(&a.mm, 0, a.mm.n, c->scratch, a.ldxs);
        if (T == 1 || a.mm.m * a.mm.k * a.mm.n < 4 * SMALL_WORK || a.mm.m < 32) {
            a.gemv_xc(&a.mm, a.xs, a.ldxs, 0, a.mm.m);
        } else {
            a.chunk = gemv_chunk_rows(a.mm.m, T);
            atomic_init(&a.next, 0);
            speed_cpu_pool_run(c->pool, gemv_task, &a);
        }
        return SPEED_OK;
    }
    /* the table's bi_gemv reproduces the table's GEMM only (guard against a replaced one) */
    const bool bi_table = bi_few && !bi_bf16 && c->gemm[w.dtype].compute == c->k->gemm[w.dtype].compute;
    if ((few_rows_ok && a.mm.n <= c->k->gemv_max_n) || bi_table) {
        a.gemv = bi_table ? c->k->bi_gemv : c->k->gemv;
        size_t xpf = bi_table ? 0 : c->k->gemv_xpack_floats(&a.mm);
        if (xpf) {
            SPEED_CHECK(scratch_reserve(c, xpf * sizeof(float)));
            c->k->gemv_pack_x(&a.mm, c->scratch);
            a.mm.xp = c->scratch;
        }
        if (T == 1 || a.mm.m * a.mm.k * a.mm.n < 4 * SMALL_WORK || a.mm.m < 32) {
            a.gemv(&a.mm, 0, a.mm.m);
        } else {
            a.chunk = gemv_chunk_rows(a.mm.m, T);
            atomic_init(&a.next, 0);
            speed_cpu_pool_run(c->pool, gemv_task, &a);
        }
        return SPEED_OK;
    }

    const speed_cpu_gemm_t *g = &c->gemm[w.dtype];
    a.g = g;
    SPEED_CHECK(tscratch_reserve(c, g->pack_bytes(g->nc, g->kc)));
    if (g->convert_x) {
        int64_t ld = g->xc_cols(a.mm.k);
        SPEED_CHECK(scratch_reserve(c, (size_t)a.mm.n * (size_t)ld * g->xc_elem));
        a.xs = c->scratch;
        a.ldxs = ld;
        parallel_for(c, a.mm.n, 2 * a.mm.k, 1, convert_x_rows, &a);
    } else {
        a.xs = a.mm.x;
        a.ldxs = a.mm.ldx;
    }
    a.nj = (a.mm.m + g->nc - 1) / g->nc;
    a.ni = 1;
    if (a.nj < 4 * T) { /* few weight blocks: also split the rows of x */
        int64_t want = (4 * T + a.nj - 1) / a.nj, most = (a.mm.n + 7) / 8;
        a.ni = want < most ? want : most;
    }
    atomic_init(&a.next, 0);
    /* the few-row matmuls the batch-invariant mode sends here stay on the caller when small,
     * as the GEMV path keeps them (waking the workers would cost more than it saves) */
    const bool small = c->batch_invariant && a.mm.m * a.mm.k * a.mm.n < 4 * SMALL_WORK;
    if (T == 1 || a.nj * a.ni == 1 || small)
        gemm_task(&a, 0, 1);
    else
        speed_cpu_pool_run(c->pool, gemm_task, &a);
    return SPEED_OK;
}

/* ---- attention ---------------------------------------------------------------------------- */

typedef struct {
    int64_t r0;
    int nr;
} attn_block_t;

typedef struct {
    cpu_ctx_t *c;
    speed_cpu_attn_t at;
    attn_block_t *blocks; /* query rows grouped by sequence, at most rows_per_item each */
    int64_t n_blocks;
    int64_t n_items;
    int n_split;  /* chunks per (row, kv head); 1 = no split (then blocks may hold rows) */
    float *parts; /* [n_rows][n_kv][n_split][part_floats] */
    size_t part_floats;
    _Atomic int64_t next;
} attn_arg_t;

static void attn_task(void *p, int t, int nt) {
    (void)nt;
    attn_arg_t *a = p;
    const int n_kv = a->at.kv->n_kv_heads, S = a->n_split;
    float *scratch = a->c->tscratch[t];
    for (;;) {
        int64_t it = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (it >= a->n_items) break;
        it = a->n_items - 1 - it; /* later rows see more entries: start with them */
        const int64_t bh = it / S;
        const int s = (int)(it % S), h = (int)(bh % n_kv);
        const attn_block_t *b = &a->blocks[bh / n_kv];
        if (S == 1) {
            a->c->k->attn(&a->at, b->r0, b->nr, h, 0, INT32_MAX, scratch, NULL);
        } else { /* one row per block */
            const int32_t nv = a->at.rows->n_visible[b->r0], len = (nv + S - 1) / S;
            const int32_t e0 = s * len < nv ? s * len : nv, e1 = e0 + len < nv ? e0 + len : nv;
            a->c->k->attn(&a->at, b->r0, 1, h, e0, e1, scratch, a->parts + (size_t)it * a->part_floats);
        }
    }
}

/* Combines the n_split partial softmax states of every (row, query head). */
static void attn_merge_rows(void *p, int64_t r0, int64_t r1) {
    attn_arg_t *a = p;
    const int n_kv = a->at.kv->n_kv_heads, G = a->at.group, hd = a->at.kv->head_dim, S = a->n_split;
    const size_t stride = (size_t)hd + 2;
    for (int64_t r = r0; r < r1; r++)
        for (int h = 0; h < n_kv; h++) {
            const float *pr = a->parts + (size_t)(r * n_kv + h) * S * a->part_floats;
            for (int g = 0; g < G; g++) {
                float *o = a->at.out + r * a->at.ldo + ((int64_t)h * G + g) * hd;
                float m = -INFINITY;
                for (int s = 0; s < S; s++) {
                    const float *ps = pr + s * a->part_floats + g * stride;
                    if (ps[1] > 0.0f && ps[0] > m) m = ps[0];
                }
                memset(o, 0, (size_t)hd * sizeof(float));
                if (m == -INFINITY) continue; /* nothing visible */
                float l = 0.0f;
                for (int s = 0; s < S; s++) {
                    const float *ps = pr + s * a->part_floats + g * stride;
                    if (!(ps[1] > 0.0f)) continue;
                    float wgt = expf(ps[0] - m);
                    l += ps[1] * wgt;
                    for (int d = 0; d < hd; d++) o[d] += ps[2 + d] * wgt;
                }
                float inv = 1.0f / l;
                for (int d = 0; d < hd; d++) o[d] *= inv;
            }
        }
}

static speed_status_t cpu_attention(void *ctx, speed_mat_t out, speed_mat_t q, const speed_kv_layer_t *kv, int n_heads,
                                    const speed_attn_rows_t *rows, float scale) {
    cpu_ctx_t *c = ctx;
    const int T = c->n_threads, n_kv = kv->n_kv_heads, G = n_heads / n_kv, hd = kv->head_dim;
    attn_arg_t a = {
        .c = c,
        .at = {.q = q.data,
               .ldq = q.row_stride,
               .out = out.data,
               .ldo = out.row_stride,
               .kv = kv,
               .rows = rows,
               .n_heads = n_heads,
               .group = G,
               .scale = scale},
        .n_split = 1,
    };
    const int64_t n = q.n_rows, base = n * n_kv;
    int64_t max_vis = 0, total_vis = 0;
    for (int64_t r = 0; r < n; r++) {
        if (rows->n_visible[r] > max_vis) max_vis = rows->n_visible[r];
        total_vis += rows->n_visible[r];
    }
    /* Splitting a row's entries merges partial softmax states: a different order from the
     * unsplit online softmax, chosen by the thread count and the batch, so never when batch
     * invariant (rows are then blocked per sequence, which the kernel computes row by row). */
    if (!c->batch_invariant && T > 1 && base < 4 * T && max_vis >= 2 * ATTN_SPLIT_MIN) {
        int64_t s = (4 * T + base - 1) / base, most = max_vis / ATTN_SPLIT_MIN;
        a.n_split = (int)(s < most ? s : most);
    }
    a.part_floats = speed_cpu_attn_part_floats(G, hd);
    const size_t parts_bytes = a.n_split > 1 ? (size_t)base * a.n_split * a.part_floats * sizeof(float) : 0;
    SPEED_CHECK(tscratch_reserve(c, speed_cpu_attn_scratch_floats(G, hd) * sizeof(float)));
    SPEED_CHECK(scratch_reserve(c, parts_bytes + (size_t)n * sizeof(attn_block_t)));
    a.parts = c->scratch;
    a.blocks = (attn_block_t *)((char *)c->scratch + parts_bytes);

    /* Rows of one sequence share a block-table pointer: consecutive ones go into one block. */
    const int per_item = a.n_split > 1 ? 1 : speed_cpu_attn_rows_per_item(G);
    for (int64_t r = 0; r < n; r++) {
        attn_block_t *last = a.n_blocks ? &a.blocks[a.n_blocks - 1] : NULL;
        if (last && last->nr < per_item && rows->block_table[r] == rows->block_table[last->r0] &&
            rows->n_visible[r] > 0 && rows->n_visible[last->r0] > 0)
            last->nr++;
        else
            a.blocks[a.n_blocks++] = (attn_block_t){r, 1};
    }
    a.n_items = a.n_blocks * n_kv * a.n_split;
    atomic_init(&a.next, 0);
    if (T == 1 || a.n_items == 1 || total_vis * n_heads * hd < SMALL_WORK)
        attn_task(&a, 0, 1);
    else
        speed_cpu_pool_run(c->pool, attn_task, &a);
    if (a.n_split > 1) attn_merge_rows(&a, 0, n);
    return SPEED_OK;
}

/* ---- topk ---------------------------------------------------------------------------------- */

typedef struct {
    float v;
    int32_t id;
} topk_entry_t;

/* a ranks after b: smaller value, or the same value at a higher column. */
static inline bool topk_worse(topk_entry_t a, topk_entry_t b) { return a.v < b.v || (a.v == b.v && a.id > b.id); }

/* Restores the heap below position i (the worst entry at the root). */
static void topk_sift_down(topk_entry_t *h, int n, int i) {
    for (;;) {
        int w = i, l = 2 * i + 1, r = l + 1;
        if (l < n && topk_worse(h[l], h[w])) w = l;
        if (r < n && topk_worse(h[r], h[w])) w = r;
        if (w == i) return;
        topk_entry_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

typedef struct {
    cpu_ctx_t *c;
    speed_mat_t vals, logits;
    int32_t *ids;
    float *lse;
    int k;
} topk_arg_t;

/* Rows [i0, i1) with heap h (k entries of scratch). Columns are visited in increasing order, so
 * a value equal to the heap's worst ranks after it (higher column): only values strictly above
 * the worst can enter, which is what next_above skips to. */
static void topk_rows(const topk_arg_t *a, topk_entry_t *h, int64_t i0, int64_t i1) {
    const speed_cpu_kernels_t *kt = a->c->k;
    const int k = a->k;
    const int64_t V = a->logits.n_cols;
    for (int64_t i = i0; i < i1; i++) {
        const float *x = row_ptr(a->logits, i);
        for (int j = 0; j < k; j++) { /* the first k columns, sifted up */
            int p = j;
            h[p] = (topk_entry_t){x[j], j};
            while (p > 0 && topk_worse(h[p], h[(p - 1) / 2])) {
                topk_entry_t t = h[p];
                h[p] = h[(p - 1) / 2];
                h[(p - 1) / 2] = t;
                p = (p - 1) / 2;
            }
        }
        for (int64_t col = kt->next_above(x, k, V, h[0].v); col < V; col = kt->next_above(x, col + 1, V, h[0].v)) {
            h[0] = (topk_entry_t){x[col], (int32_t)col};
            topk_sift_down(h, k, 0);
        }
        float *v = row_ptr(a->vals, i);
        int32_t *id = a->ids + i * k;
        for (int n = k; n > 0; n--) { /* pop worst first: fills the row from its end */
            v[n - 1] = h[0].v;
            id[n - 1] = h[0].id;
            h[0] = h[n - 1];
            topk_sift_down(h, n - 1, 0);
        }

        const float m = kt->max_row(x, V);
        a->lse[i] = isinf(m) ? m : (float)((double)m + log(kt->sum_exp_row(x, V, m)));
    }
}

static void topk_task(void *p, int t, int nt) {
    topk_arg_t *a = p;
    int64_t lo, hi;
    split_range(a->logits.n_rows, t, nt, 1, &lo, &hi);
    if (lo < hi) topk_rows(a, a->c->tscratch[t], lo, hi);
}

static speed_status_t cpu_topk(void *ctx, speed_mat_t vals, int32_t *ids, float *lse, speed_mat_t logits, int k) {
    cpu_ctx_t *c = ctx;
    SPEED_CHECK(tscratch_reserve(c, (size_t)k * sizeof(topk_entry_t)));
    topk_arg_t a = {.c = c, .vals = vals, .logits = logits, .ids = ids, .lse = lse, .k = k};
    if (c->n_threads == 1 || logits.n_rows == 1 || logits.n_rows * logits.n_cols < SMALL_WORK)
        topk_rows(&a, c->tscratch[0], 0, logits.n_rows);
    else
        speed_cpu_pool_run(c->pool, topk_task, &a);
    return SPEED_OK;
}

/* ---- creation ------------------------------------------------------------------------------ */

static const speed_backend_ops_t cpu_ops = {
    .name = cpu_name,
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .alloc_host = cpu_alloc,
    .free_host = cpu_free,
    .host_memory = cpu_host_memory,
    .upload = cpu_copy,
    .download = cpu_copy,
    .memset_zero = cpu_memset_zero,
    .map_weights = cpu_map_weights,
    .unmap_weights = cpu_unmap_weights,
    .synchronize = cpu_synchronize,
    .supports_op = cpu_supports_op,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .get_rows = cpu_get_rows,
    .kv_store = cpu_kv_store,
    .kv_load = cpu_kv_load,
    .attention = cpu_attention,
    .topk = cpu_topk,
};

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 1024 ? 1024 : (int)n;
}

speed_status_t speed_backend_cpu_create(const speed_backend_params_t *params, speed_backend_t **backend_p) {
    speed_backend_params_t p = params ? *params : speed_backend_default_params();
    if (p.n_threads < 0 || (unsigned)p.cpu_isa_max > SPEED_CPU_ISA_BEST) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu backend: bad parameters (%d threads, isa cap %d)", p.n_threads,
                    (int)p.cpu_isa_max);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    cpu_ctx_t *c = speed_aligned_alloc(64, sizeof *c);
    if (!c) return SPEED_ERR_NO_MEMORY;
    memset(c, 0, sizeof *c);
    c->n_threads = p.n_threads ? p.n_threads : online_cpus();
    c->batch_invariant = p.batch_invariant;

    speed_cpu_isa_t isa = speed_cpu_isa_detect();
    if (isa > p.cpu_isa_max) isa = p.cpu_isa_max;
    c->isa = isa;
    c->k = &speed_cpu_kernels_scalar;
#if defined(__x86_64__)
    if (isa >= SPEED_CPU_ISA_AVX512)
        c->k = &speed_cpu_kernels_avx512;
    else if (isa >= SPEED_CPU_ISA_AVX2)
        c->k = &speed_cpu_kernels_avx2;
#endif
    memcpy(c->gemm, c->k->gemm, sizeof c->gemm);
#if defined(__x86_64__)
    if (isa >= SPEED_CPU_ISA_AVX512_BF16) {
        c->gemm[SPEED_DTYPE_BF16] = speed_cpu_gemm_bf16_avx512;
        c->gemv_bf16 = speed_cpu_gemv_bf16_avx512;
        c->bi_gemv_bf16 = speed_cpu_bi_gemv_bf16_avx512;
    }
#endif
    snprintf(c->name, sizeof c->name, "cpu (%s, %d thread%s%s)", speed_cpu_isa_name(isa), c->n_threads,
             c->n_threads == 1 ? "" : "s", c->batch_invariant ? ", batch-invariant" : "");

    speed_status_t st = SPEED_ERR_NO_MEMORY;
    c->tscratch = speed_calloc((size_t)c->n_threads, sizeof *c->tscratch);
    if (!c->tscratch) goto fail;
    SPEED_CHECK_GOTO(speed_cpu_pool_create(c->n_threads, &c->pool), st, fail);

    c->be.ops = &cpu_ops;
    c->be.ctx = c;
    c->be.kind = SPEED_BACKEND_CPU;
    *backend_p = &c->be;
    return SPEED_OK;

fail:
    cpu_destroy(c);
    return st;
}
