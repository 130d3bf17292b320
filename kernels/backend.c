/* Backend creation and the public op wrappers: argument validation happens here once, so
 * every backend implementation may assume well-formed shapes. */
#include "backend.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "alloc.h"
#include "log.h"

speed_backend_params_t speed_backend_default_params(void) {
    return (speed_backend_params_t){
        .kind = SPEED_BACKEND_CPU,
        .n_threads = 0,
        .cpu_isa_max = SPEED_CPU_ISA_BEST,
        .device = 0,
    };
}

const char *speed_cpu_isa_name(speed_cpu_isa_t isa) {
    switch (isa) {
    case SPEED_CPU_ISA_SCALAR: return "scalar";
    case SPEED_CPU_ISA_AVX2: return "avx2";
    case SPEED_CPU_ISA_AVX512: return "avx512";
    case SPEED_CPU_ISA_AVX512_BF16: return "avx512-bf16";
    case SPEED_CPU_ISA_BEST: return "best";
    }
    return "?";
}

#if defined(__x86_64__) || defined(__i386__)
/* F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know "f16c". */
static bool cpu_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

speed_cpu_isa_t speed_cpu_isa_detect(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
        if (__builtin_cpu_supports("avx512bf16")) return SPEED_CPU_ISA_AVX512_BF16;
        return SPEED_CPU_ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c()) return SPEED_CPU_ISA_AVX2;
#endif
    return SPEED_CPU_ISA_SCALAR;
}

speed_status_t speed_backend_create(const speed_backend_params_t *params, speed_backend_t **backend_p) {
    speed_backend_params_t p = params ? *params : speed_backend_default_params();
    if (p.n_threads < 0 || p.n_threads > 1024) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend: %d threads is out of range [0, 1024]", p.n_threads);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (p.batch_invariant && p.kind == SPEED_BACKEND_CUDA) {
        /* Refused rather than run silently batch-dependent: the CUDA kernels pick their split
         * of k and of attention entries from the batch shape (and cuBLAS its algorithm). */
        SPEED_ERROR(SPEED_SUBSYS_ENGINE,
                    "backend cuda: batch-invariant mode is not implemented (its matmul and attention "
                    "kernels choose their reduction split by batch shape)");
        return SPEED_ERR_UNSUPPORTED;
    }
    switch (p.kind) {
    case SPEED_BACKEND_CPU_REF: return speed_backend_cpu_ref_create(&p, backend_p);
    case SPEED_BACKEND_CPU: return speed_backend_cpu_create(&p, backend_p);
    case SPEED_BACKEND_CUDA: return speed_backend_cuda_create(&p, backend_p);
    }
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend: unknown kind %d", (int)p.kind);
    return SPEED_ERR_INVALID_ARGUMENT;
}

void speed_backend_destroy(speed_backend_t *be) {
    if (!be) return;
    be->ops->destroy(be->ctx); /* frees be too: the context owns the struct */
}

const char *speed_backend_name(const speed_backend_t *be) { return be->ops->name(be->ctx); }

speed_status_t speed_backend_alloc(speed_backend_t *be, size_t bytes, void **ptr_p) {
    return be->ops->alloc(be->ctx, bytes, ptr_p);
}
void speed_backend_free(speed_backend_t *be, void *ptr) {
    if (ptr) be->ops->free(be->ctx, ptr);
}
bool speed_backend_host_memory(const speed_backend_t *be) {
    return be->ops->host_memory ? be->ops->host_memory(be->ctx) : true;
}
speed_status_t speed_backend_alloc_host(speed_backend_t *be, size_t bytes, void **ptr_p) {
    if (be->ops->alloc_host) return be->ops->alloc_host(be->ctx, bytes, ptr_p);
    void *p = speed_aligned_alloc(64, bytes ? bytes : 1);
    if (!p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend: cannot allocate %zu bytes of host memory", bytes);
        return SPEED_ERR_NO_MEMORY;
    }
    *ptr_p = p;
    return SPEED_OK;
}
void speed_backend_free_host(speed_backend_t *be, void *ptr) {
    if (!ptr) return;
    if (be->ops->free_host)
        be->ops->free_host(be->ctx, ptr);
    else
        speed_aligned_free(ptr);
}
speed_status_t speed_backend_upload(speed_backend_t *be, void *dst, const void *src, size_t bytes) {
    return bytes ? be->ops->upload(be->ctx, dst, src, bytes) : SPEED_OK;
}
speed_status_t speed_backend_download(speed_backend_t *be, void *dst, const void *src, size_t bytes) {
    return bytes ? be->ops->download(be->ctx, dst, src, bytes) : SPEED_OK;
}
speed_status_t speed_backend_memset_zero(speed_backend_t *be, void *dst, size_t bytes) {
    return bytes ? be->ops->memset_zero(be->ctx, dst, bytes) : SPEED_OK;
}
speed_status_t speed_backend_map_weights(speed_backend_t *be, const void *host, size_t bytes, const void **ptr_p) {
    return be->ops->map_weights(be->ctx, host, bytes, ptr_p);
}
void speed_backend_unmap_weights(speed_backend_t *be, const void *ptr) {
    if (ptr) be->ops->unmap_weights(be->ctx, ptr);
}
speed_status_t speed_backend_synchronize(speed_backend_t *be) { return be->ops->synchronize(be->ctx); }
bool speed_backend_supports_op(speed_backend_t *be, speed_op_t op, speed_dtype_t dtype) {
    return (unsigned)op < SPEED_OP_COUNT && be->ops->supports_op(be->ctx, op, dtype);
}

/* inv_freq[i] for pair i of a head, as transformers computes it (rope_type "default" or
 * "llama3", _compute_llama3_parameters): evaluated in double and rounded once to f32, so it is
 * within an ulp of transformers' f32 tensor. A fast backend that builds its table the same way
 * (double, one rounding) gets the same angles bit for bit. */
float speed_rope_inv_freq(const speed_rope_t *rope, int head_dim, int i) {
    double inv_freq = (float)(1.0 / pow((double)rope->theta, (double)(2 * i) / (double)head_dim));
    if (!rope->llama3_scaling) return (float)inv_freq;

    double factor = rope->factor, low = rope->low_freq_factor, high = rope->high_freq_factor;
    double orig = rope->original_max_position;
    double low_freq_wavelen = orig / low, high_freq_wavelen = orig / high;
    double wavelen = 2.0 * 3.14159265358979323846 / inv_freq;
    if (wavelen < high_freq_wavelen) return (float)inv_freq;           /* high frequency: kept */
    if (wavelen > low_freq_wavelen) return (float)(inv_freq / factor); /* low frequency: scaled */
    double smooth = (orig / wavelen - low) / (high - low);             /* in between: blended */
    return (float)((1.0 - smooth) * inv_freq / factor + smooth * inv_freq);
}

/* ---- validation ------------------------------------------------------------------------ */

static const char *const op_names[SPEED_OP_COUNT] = {
    "embed", "rmsnorm", "matmul", "rope", "swiglu", "add", "get_rows", "kv_store", "kv_load", "attention", "topk",
};

static speed_status_t bad(speed_op_t op, const char *what) {
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "op %s: %s", op_names[op], what);
    return SPEED_ERR_INVALID_ARGUMENT;
}

static bool mat_ok(speed_mat_t m) {
    return m.data && m.n_rows >= 0 && m.n_cols > 0 && m.row_stride >= m.n_cols && speed_dtype_size(m.dtype) > 0;
}

static bool f32_ok(speed_mat_t m) { return mat_ok(m) && m.dtype == SPEED_DTYPE_F32; }

static bool same_shape(speed_mat_t a, speed_mat_t b) { return a.n_rows == b.n_rows && a.n_cols == b.n_cols; }

static speed_status_t check_supported(speed_backend_t *be, speed_op_t op, speed_dtype_t dtype) {
    if (be->ops->supports_op(be->ctx, op, dtype)) return SPEED_OK;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "op %s: not supported with %s on %s", op_names[op], speed_dtype_name(dtype),
                speed_backend_name(be));
    return SPEED_ERR_UNSUPPORTED;
}

static bool kv_ok(const speed_kv_layer_t *kv) {
    return kv && kv->k_base && kv->block_tokens > 0 && kv->n_kv_heads > 0 && kv->head_dim > 0 &&
           speed_dtype_size(kv->dtype) > 0 && (kv->slot_heads == 0 || kv->slot_heads >= kv->n_kv_heads) &&
           kv->v_offset >=
               (size_t)kv->block_tokens * speed_kv_layer_slot_heads(kv) * kv->head_dim * speed_dtype_size(kv->dtype);
}

speed_status_t speed_op_embed(speed_backend_t *be, speed_mat_t out, speed_mat_t table, const int32_t *ids) {
    if (!f32_ok(out) || !mat_ok(table) || out.n_cols != table.n_cols || (out.n_rows && !ids))
        return bad(SPEED_OP_EMBED, "bad shapes");
    for (int64_t i = 0; i < out.n_rows; i++)
        if (ids[i] < 0 || ids[i] >= table.n_rows) return bad(SPEED_OP_EMBED, "token id out of range");
    SPEED_CHECK(check_supported(be, SPEED_OP_EMBED, table.dtype));
    return out.n_rows ? be->ops->embed(be->ctx, out, table, ids) : SPEED_OK;
}

speed_status_t speed_op_rmsnorm(speed_backend_t *be, speed_mat_t out, speed_mat_t x, speed_mat_t weight, float eps) {
    if (!f32_ok(out) || !f32_ok(x) || !same_shape(out, x) || !mat_ok(weight) || weight.n_rows != 1 ||
        weight.n_cols != x.n_cols || !(eps >= 0))
        return bad(SPEED_OP_RMSNORM, "bad shapes");
    SPEED_CHECK(check_supported(be, SPEED_OP_RMSNORM, weight.dtype));
    return out.n_rows ? be->ops->rmsnorm(be->ctx, out, x, weight, eps) : SPEED_OK;
}

speed_status_t speed_op_matmul(speed_backend_t *be, speed_mat_t out, speed_mat_t x, speed_mat_t w, bool accumulate) {
    if (!f32_ok(out) || !f32_ok(x) || !mat_ok(w) || x.n_cols != w.n_cols || out.n_rows != x.n_rows ||
        out.n_cols != w.n_rows || out.data == x.data)
        return bad(SPEED_OP_MATMUL, "bad shapes");
    SPEED_CHECK(check_supported(be, SPEED_OP_MATMUL, w.dtype));
    return out.n_rows ? be->ops->matmul(be->ctx, out, x, w, accumulate) : SPEED_OK;
}

speed_status_t speed_op_rope(speed_backend_t *be, speed_mat_t x, int n_heads, int head_dim, const int32_t *positions,
                             const speed_rope_t *rope) {
    if (!f32_ok(x) || n_heads <= 0 || head_dim <= 0 || head_dim % 2 || x.n_cols != (int64_t)n_heads * head_dim ||
        !rope || !(rope->theta > 0) || (x.n_rows && !positions))
        return bad(SPEED_OP_ROPE, "bad shapes");
    if (rope->llama3_scaling &&
        !(rope->factor > 0 && rope->original_max_position > 0 && rope->high_freq_factor > rope->low_freq_factor))
        return bad(SPEED_OP_ROPE, "bad llama3 scaling parameters");
    SPEED_CHECK(check_supported(be, SPEED_OP_ROPE, SPEED_DTYPE_F32));
    return x.n_rows ? be->ops->rope(be->ctx, x, n_heads, head_dim, positions, rope) : SPEED_OK;
}

speed_status_t speed_op_swiglu(speed_backend_t *be, speed_mat_t out, speed_mat_t gate, speed_mat_t up) {
    if (!f32_ok(out) || !f32_ok(gate) || !f32_ok(up) || !same_shape(out, gate) || !same_shape(out, up))
        return bad(SPEED_OP_SWIGLU, "bad shapes");
    SPEED_CHECK(check_supported(be, SPEED_OP_SWIGLU, SPEED_DTYPE_F32));
    return out.n_rows ? be->ops->swiglu(be->ctx, out, gate, up) : SPEED_OK;
}

speed_status_t speed_op_add(speed_backend_t *be, speed_mat_t out, speed_mat_t a, speed_mat_t b) {
    if (!f32_ok(out) || !f32_ok(a) || !f32_ok(b) || !same_shape(out, a) || !same_shape(out, b))
        return bad(SPEED_OP_ADD, "bad shapes");
    SPEED_CHECK(check_supported(be, SPEED_OP_ADD, SPEED_DTYPE_F32));
    return out.n_rows ? be->ops->add(be->ctx, out, a, b) : SPEED_OK;
}

speed_status_t speed_op_get_rows(speed_backend_t *be, speed_mat_t out, speed_mat_t x, const int32_t *rows) {
    if (!f32_ok(out) || !f32_ok(x) || out.n_cols != x.n_cols || (out.n_rows && !rows) || out.data == x.data)
        return bad(SPEED_OP_GET_ROWS, "bad shapes");
    for (int64_t i = 0; i < out.n_rows; i++)
        if (rows[i] < 0 || rows[i] >= x.n_rows) return bad(SPEED_OP_GET_ROWS, "row index out of range");
    SPEED_CHECK(check_supported(be, SPEED_OP_GET_ROWS, SPEED_DTYPE_F32));
    return out.n_rows ? be->ops->get_rows(be->ctx, out, x, rows) : SPEED_OK;
}

static speed_status_t kv_rows_check(speed_op_t op, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                    const int32_t *slots) {
    if (!kv_ok(kv) || !f32_ok(k) || !f32_ok(v) || !same_shape(k, v) ||
        k.n_cols != (int64_t)kv->n_kv_heads * kv->head_dim || (k.n_rows && !slots))
        return bad(op, "bad shapes");
    for (int64_t i = 0; i < k.n_rows; i++)
        if (slots[i] < 0) return bad(op, "negative slot");
    return SPEED_OK;
}

speed_status_t speed_op_kv_store(speed_backend_t *be, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                 const int32_t *slots) {
    SPEED_CHECK(kv_rows_check(SPEED_OP_KV_STORE, kv, k, v, slots));
    SPEED_CHECK(check_supported(be, SPEED_OP_KV_STORE, kv->dtype));
    return k.n_rows ? be->ops->kv_store(be->ctx, kv, k, v, slots) : SPEED_OK;
}

speed_status_t speed_op_kv_load(speed_backend_t *be, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                const int32_t *slots) {
    SPEED_CHECK(kv_rows_check(SPEED_OP_KV_LOAD, kv, k, v, slots));
    SPEED_CHECK(check_supported(be, SPEED_OP_KV_LOAD, kv->dtype));
    return k.n_rows ? be->ops->kv_load(be->ctx, kv, k, v, slots) : SPEED_OK;
}

speed_status_t speed_op_attention(speed_backend_t *be, speed_mat_t out, speed_mat_t q, const speed_kv_layer_t *kv,
                                  int n_heads, const speed_attn_rows_t *rows, float scale) {
    if (!f32_ok(out) || !f32_ok(q) || !same_shape(out, q) || !kv_ok(kv) || n_heads <= 0 || n_heads % kv->n_kv_heads ||
        q.n_cols != (int64_t)n_heads * kv->head_dim || !rows || rows->n_rows != q.n_rows ||
        (q.n_rows && (!rows->block_table || !rows->n_visible)) || out.data == q.data)
        return bad(SPEED_OP_ATTENTION, "bad shapes");
    for (int64_t r = 0; r < rows->n_rows; r++)
        if (rows->n_visible[r] < 0 || (rows->n_visible[r] > 0 && !rows->block_table[r]))
            return bad(SPEED_OP_ATTENTION, "bad row description");
    SPEED_CHECK(check_supported(be, SPEED_OP_ATTENTION, kv->dtype));
    return q.n_rows ? be->ops->attention(be->ctx, out, q, kv, n_heads, rows, scale) : SPEED_OK;
}

/* True when [a, a + an) and [b, b + bn) bytes overlap. */
static bool overlaps(const void *a, size_t an, const void *b, size_t bn) {
    const char *pa = a, *pb = b;
    return pa < pb + bn && pb < pa + an;
}

speed_status_t speed_op_topk(speed_backend_t *be, speed_mat_t vals, int32_t *ids, float *lse, speed_mat_t logits,
                             int k) {
    if (!f32_ok(vals) || !f32_ok(logits) || vals.n_rows != logits.n_rows || logits.n_cols > INT32_MAX ||
        (vals.n_rows && (!ids || !lse)))
        return bad(SPEED_OP_TOPK, "bad shapes");
    if (k < 1 || k > SPEED_TOPK_MAX || k > logits.n_cols || vals.n_cols != k)
        return bad(SPEED_OP_TOPK, "k out of range (1 .. min(vocabulary, 256), = vals columns)");
    const size_t n = (size_t)logits.n_rows;
    if (n) {
        const size_t lbytes = ((n - 1) * (size_t)logits.row_stride + (size_t)logits.n_cols) * sizeof(float);
        const size_t vbytes = ((n - 1) * (size_t)vals.row_stride + (size_t)k) * sizeof(float);
        if (overlaps(vals.data, vbytes, logits.data, lbytes) ||
            overlaps(ids, n * (size_t)k * sizeof(int32_t), logits.data, lbytes) ||
            overlaps(lse, n * sizeof(float), logits.data, lbytes))
            return bad(SPEED_OP_TOPK, "outputs overlap the logits");
    }
    SPEED_CHECK(check_supported(be, SPEED_OP_TOPK, SPEED_DTYPE_F32));
    return n ? be->ops->topk(be->ctx, vals, ids, lse, logits, k) : SPEED_OK;
}

#if !defined(SPEED_HAVE_CUDA)
speed_status_t speed_backend_cuda_create(const speed_backend_params_t *params, speed_backend_t **backend_p) {
    (void)params;
    (void)backend_p;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend: this build has no CUDA backend (configure with nvcc and SPEED_CUDA=ON)");
    return SPEED_ERR_UNSUPPORTED;
}
#endif

const char *speed_backend_label(const speed_backend_params_t *params, char *buf, size_t size) {
    if (params->kind == SPEED_BACKEND_CUDA)
        snprintf(buf, size, "cuda:%d", params->device);
    else
        snprintf(buf, size, "%s", speed_backend_kind_name(params->kind));
    return buf;
}

const char *speed_backend_failure(speed_status_t status) {
    const char *cause = speed_log_last_error();
    if (strncmp(cause, "backend: ", 9) == 0) cause += 9;
    if (strncmp(cause, "cuda: ", 6) == 0) cause += 6;
    return *cause ? cause : speed_status_string(status);
}
