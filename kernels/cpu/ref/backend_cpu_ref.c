/* cpu-ref: the executable spec of every op in backend.h.
 *
 * Plain loops, one element at a time, no threads, no intrinsics. Reductions (dot products,
 * sums of squares, softmax sums) accumulate in double so that the reference is as close to
 * the exact value as the inputs allow: a fast backend's error against it is then its own
 * fp32 error, not the sum of two. Where Hugging Face rounds an intermediate to f32 and the
 * rounding is part of what the model was trained with (RoPE angles, RMSNorm's normalised
 * value before the weight), the same f32 rounding is made here and said so.
 *
 * Memory is host memory (speed_aligned_alloc, 64-byte aligned); weights are used in place.
 * The wrappers in backend.c have validated shapes; what they cannot see (block ids, which
 * need the pool size) is checked where it is cheap.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "backend.h"
#include "log.h"

/* The backend struct and its context are one allocation: destroy frees both. */
typedef struct {
    speed_backend_t backend;
} cpu_ref_t;

/* ---- element access -------------------------------------------------------------- */

/* Element i of a row of `dtype` at `row` (any alignment), widened exactly to f32. */
static float load_elem(const void *row, speed_dtype_t dtype, int64_t i) {
    const unsigned char *p = row;
    uint16_t h;
    float f;
    switch (dtype) {
    case SPEED_DTYPE_F32: memcpy(&f, p + 4 * i, 4); return f;
    case SPEED_DTYPE_BF16: memcpy(&h, p + 2 * i, 2); return speed_dtype_bf16_to_f32(h);
    case SPEED_DTYPE_F16: memcpy(&h, p + 2 * i, 2); return speed_dtype_f16_to_f32(h);
    }
    return NAN;
}

/* Stores v as element i of a row of `dtype`, rounding to nearest even for bf16 / f16. */
static void store_elem(void *row, speed_dtype_t dtype, int64_t i, float v) {
    unsigned char *p = row;
    uint16_t h;
    switch (dtype) {
    case SPEED_DTYPE_F32: memcpy(p + 4 * i, &v, 4); return;
    case SPEED_DTYPE_BF16:
        h = speed_dtype_f32_to_bf16(v);
        memcpy(p + 2 * i, &h, 2);
        return;
    case SPEED_DTYPE_F16:
        h = speed_dtype_f32_to_f16(v);
        memcpy(p + 2 * i, &h, 2);
        return;
    }
}

/* Row r of m. */
static const void *mat_row(speed_mat_t m, int64_t r) {
    return (const char *)m.data + (size_t)(r * m.row_stride) * speed_dtype_size(m.dtype);
}

/* Row r of an f32 matrix. */
static float *f32_row(speed_mat_t m, int64_t r) { return (float *)m.data + r * m.row_stride; }

/* K of pool slot `slot`, kv head h of the view: head_dim elements of kv->dtype. V is at
 * + v_offset. The address of backend.h, with S heads per slot in memory. */
static char *kv_k_head(const speed_kv_layer_t *kv, int64_t slot, int h) {
    int64_t b = slot / kv->block_tokens, o = slot % kv->block_tokens;
    int64_t S = speed_kv_layer_slot_heads(kv);
    return (char *)kv->k_base + (size_t)b * kv->block_stride +
           (size_t)((o * S + h) * kv->head_dim) * speed_dtype_size(kv->dtype);
}

/* ---- memory ---------------------------------------------------------------------- */

static const char *ref_name(void *ctx) {
    (void)ctx;
    return "cpu-ref";
}

static void ref_destroy(void *ctx) { speed_free(ctx); }

static speed_status_t ref_alloc(void *ctx, size_t bytes, void **ptr_p) {
    (void)ctx;
    void *p = speed_aligned_alloc(64, bytes);
    if (!p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu-ref: cannot allocate %zu bytes", bytes);
        return SPEED_ERR_NO_MEMORY;
    }
    *ptr_p = p;
    return SPEED_OK;
}

static void ref_free(void *ctx, void *ptr) {
    (void)ctx;
    speed_aligned_free(ptr);
}

static bool ref_host_memory(void *ctx) {
    (void)ctx;
    return true;
}

static speed_status_t ref_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    memmove(dst, src, bytes);
    return SPEED_OK;
}

static speed_status_t ref_memset_zero(void *ctx, void *dst, size_t bytes) {
    (void)ctx;
    memset(dst, 0, bytes);
    return SPEED_OK;
}

/* Host memory is backend memory: the mapped weights are used where they are. */
static speed_status_t ref_map_weights(void *ctx, const void *host, size_t bytes, const void **ptr_p) {
    (void)ctx;
    (void)bytes;
    *ptr_p = host;
    return SPEED_OK;
}

static void ref_unmap_weights(void *ctx, const void *ptr) {
    (void)ctx;
    (void)ptr;
}

static speed_status_t ref_synchronize(void *ctx) {
    (void)ctx;
    return SPEED_OK;
}

static bool ref_supports_op(void *ctx, speed_op_t op, speed_dtype_t dtype) {
    (void)ctx;
    (void)op;
    return dtype == SPEED_DTYPE_F32 || dtype == SPEED_DTYPE_BF16 || dtype == SPEED_DTYPE_F16;
}

/* ---- ops ------------------------------------------------------------------------- */

static speed_status_t ref_embed(void *ctx, speed_mat_t out, /* f32 [n][d] */
                                speed_mat_t table,          /* any dtype [vocab][d] */
                                const int32_t *ids) {       /* [n] host, 0 <= id < vocab */
    (void)ctx;
    for (int64_t i = 0; i < out.n_rows; i++) {
        const void *src = mat_row(table, ids[i]);
        float *dst = f32_row(out, i);
        for (int64_t c = 0; c < out.n_cols; c++) dst[c] = load_elem(src, table.dtype, c);
    }
    return SPEED_OK;
}

/* Hugging Face LlamaRMSNorm with f32 input: variance and the normalised value are f32
 * tensors there, so both are rounded to f32 here before the weight multiplies. */
static speed_status_t ref_rmsnorm(void *ctx, speed_mat_t out, /* f32 [n][d], may alias x */
                                  speed_mat_t x,              /* f32 [n][d] */
                                  speed_mat_t weight,         /* any dtype [1][d] */
                                  float eps) {
    (void)ctx;
    const void *w = mat_row(weight, 0);
    for (int64_t i = 0; i < x.n_rows; i++) {
        const float *xi = f32_row(x, i);
        float *oi = f32_row(out, i);
        double ss = 0.0;
        for (int64_t c = 0; c < x.n_cols; c++) ss += (double)xi[c] * xi[c];
        float variance = (float)(ss / (double)x.n_cols);
        float inv = (float)(1.0 / sqrt((double)(variance + eps)));
        for (int64_t c = 0; c < x.n_cols; c++) {
            float normed = xi[c] * inv;
            oi[c] = load_elem(w, weight.dtype, c) * normed;
        }
    }
    return SPEED_OK;
}

/* The product is rounded to f32 before it is added to out, like a separate residual add. */
static speed_status_t ref_matmul(void *ctx, speed_mat_t out, /* f32 [n][m], must not overlap x */
                                 speed_mat_t x,              /* f32 [n][k] */
                                 speed_mat_t w,              /* any dtype [m][k] (HF [out, in]) */
                                 bool accumulate) {          /* out += x·wᵀ instead of out = x·wᵀ */
    (void)ctx;
    for (int64_t i = 0; i < x.n_rows; i++) {
        const float *xi = f32_row(x, i);
        float *oi = f32_row(out, i);
        for (int64_t j = 0; j < w.n_rows; j++) {
            const void *wj = mat_row(w, j);
            double acc = 0.0;
            for (int64_t c = 0; c < x.n_cols; c++) acc += (double)xi[c] * load_elem(wj, w.dtype, c);
            oi[j] = (accumulate ? oi[j] : 0.0f) + (float)acc;
        }
    }
    return SPEED_OK;
}

/* Rotate-half RoPE: pair (x[i], x[i + hd/2]) is rotated by angle pos * inv_freq[i]. The
 * angle is an f32 product, as in transformers (inv_freq @ position_ids in f32): at large
 * positions its rounding is part of the model's behaviour. cos/sin of that angle are
 * evaluated exactly (double) and the rotation is rounded once. */
static speed_status_t ref_rope(void *ctx, speed_mat_t x,  /* f32 [n][n_heads * head_dim], in place */
                               int n_heads, int head_dim, /* head_dim even */
                               const int32_t *positions,  /* [n] host */
                               const speed_rope_t *rope) {
    (void)ctx;
    int half = head_dim / 2;
    for (int64_t r = 0; r < x.n_rows; r++) {
        float *xr = f32_row(x, r);
        for (int i = 0; i < half; i++) {
            float angle = (float)positions[r] * speed_rope_inv_freq(rope, head_dim, i);
            double c = cos((double)angle), s = sin((double)angle);
            for (int h = 0; h < n_heads; h++) {
                float *head = xr + (int64_t)h * head_dim;
                double a = head[i], b = head[i + half];
                head[i] = (float)(a * c - b * s);
                head[i + half] = (float)(b * c + a * s);
            }
        }
    }
    return SPEED_OK;
}

static speed_status_t ref_swiglu(void *ctx, speed_mat_t out, /* f32 [n][f], may alias gate or up */
                                 speed_mat_t gate,           /* f32 [n][f] */
                                 speed_mat_t up) {           /* f32 [n][f] */
    (void)ctx;
    for (int64_t i = 0; i < out.n_rows; i++) {
        const float *g = f32_row(gate, i), *u = f32_row(up, i);
        float *o = f32_row(out, i);
        for (int64_t c = 0; c < out.n_cols; c++) {
            double gc = g[c];
            double silu = gc / (1.0 + exp(-gc)); /* exp overflow for gc < -709 gives -0: the limit */
            o[c] = (float)(silu * u[c]);
        }
    }
    return SPEED_OK;
}

static speed_status_t ref_add(void *ctx, speed_mat_t out, /* f32 [n][d], may alias a or b */
                              speed_mat_t a,              /* f32 [n][d] */
                              speed_mat_t b) {            /* f32 [n][d] */
    (void)ctx;
    for (int64_t i = 0; i < out.n_rows; i++) {
        const float *ai = f32_row(a, i), *bi = f32_row(b, i);
        float *oi = f32_row(out, i);
        for (int64_t c = 0; c < out.n_cols; c++) oi[c] = ai[c] + bi[c];
    }
    return SPEED_OK;
}

static speed_status_t ref_get_rows(void *ctx, speed_mat_t out, /* f32 [n][d], not overlapping x */
                                   speed_mat_t x,              /* f32 [rows_x][d] */
                                   const int32_t *rows) {      /* [n] host, 0 <= row < rows_x */
    (void)ctx;
    for (int64_t i = 0; i < out.n_rows; i++) {
        const float *src = f32_row(x, rows[i]);
        float *dst = f32_row(out, i);
        for (int64_t c = 0; c < out.n_cols; c++) dst[c] = src[c];
    }
    return SPEED_OK;
}

static speed_status_t ref_kv_store(void *ctx, const speed_kv_layer_t *kv, /* pool layer, kv->dtype */
                                   speed_mat_t k,                         /* f32 [n][n_kv_heads * head_dim] */
                                   speed_mat_t v,                         /* f32 [n][n_kv_heads * head_dim] */
                                   const int32_t *slots) {                /* [n] host, slot = block * B + offset */
    (void)ctx;
    for (int64_t i = 0; i < k.n_rows; i++) {
        const float *ki = f32_row(k, i), *vi = f32_row(v, i);
        for (int h = 0; h < kv->n_kv_heads; h++) {
            char *kd = kv_k_head(kv, slots[i], h), *vd = kd + kv->v_offset;
            for (int d = 0; d < kv->head_dim; d++) {
                store_elem(kd, kv->dtype, d, ki[(int64_t)h * kv->head_dim + d]);
                store_elem(vd, kv->dtype, d, vi[(int64_t)h * kv->head_dim + d]);
            }
        }
    }
    return SPEED_OK;
}

static speed_status_t ref_kv_load(void *ctx, const speed_kv_layer_t *kv, /* pool layer, kv->dtype */
                                  speed_mat_t k,                         /* f32 [n][n_kv_heads * head_dim], out */
                                  speed_mat_t v,                         /* f32 [n][n_kv_heads * head_dim], out */
                                  const int32_t *slots) {                /* [n] host */
    (void)ctx;
    for (int64_t i = 0; i < k.n_rows; i++) {
        float *ki = f32_row(k, i), *vi = f32_row(v, i);
        for (int h = 0; h < kv->n_kv_heads; h++) {
            const char *ks = kv_k_head(kv, slots[i], h), *vs = ks + kv->v_offset;
            for (int d = 0; d < kv->head_dim; d++) {
                ki[(int64_t)h * kv->head_dim + d] = load_elem(ks, kv->dtype, d);
                vi[(int64_t)h * kv->head_dim + d] = load_elem(vs, kv->dtype, d);
            }
        }
    }
    return SPEED_OK;
}

/* Softmax attention in the plainest form: all scores of a (row, head), their max, the
 * exponentials relative to it, their sum, then the weighted sum of V. */
static speed_status_t ref_attention(void *ctx, speed_mat_t out,    /* f32 [n_rows][n_heads * head_dim] */
                                    speed_mat_t q,                 /* f32 [n_rows][n_heads * head_dim] */
                                    const speed_kv_layer_t *kv,    /* pool layer holding K, V */
                                    int n_heads,                   /* multiple of kv->n_kv_heads */
                                    const speed_attn_rows_t *rows, /* per row: block table, n_visible */
                                    float scale) {
    (void)ctx;
    const int hd = kv->head_dim, B = kv->block_tokens;
    const int group = n_heads / kv->n_kv_heads;

    int64_t max_visible = 0;
    for (int64_t r = 0; r < rows->n_rows; r++) {
        if (rows->n_visible[r] > max_visible) max_visible = rows->n_visible[r];
        for (int64_t b = 0; b * B < rows->n_visible[r]; b++) {
            if (rows->block_table[r][b] < 0) {
                SPEED_ERROR(SPEED_SUBSYS_ENGINE, "op attention: row %lld: block %lld of its table is %d", (long long)r,
                            (long long)b, rows->block_table[r][b]);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
    }
    double *scores = speed_malloc((size_t)(max_visible + 1) * sizeof(double)); /* [max_visible] */
    double *acc = speed_malloc((size_t)hd * sizeof(double));                   /* [head_dim] */
    if (!scores || !acc) {
        speed_free(scores);
        speed_free(acc);
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu-ref: attention: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }

    for (int64_t r = 0; r < rows->n_rows; r++) {
        const int32_t nv = rows->n_visible[r];
        const int32_t *table = rows->block_table[r];
        const float *qr = f32_row(q, r);
        float *or_ = f32_row(out, r);
        for (int h = 0; h < n_heads; h++) {
            const int kvh = h / group;
            const float *qh = qr + (int64_t)h * hd;
            float *oh = or_ + (int64_t)h * hd;
            if (nv == 0) {
                for (int d = 0; d < hd; d++) oh[d] = 0.0f;
                continue;
            }
            double max_score = -INFINITY;
            for (int32_t e = 0; e < nv; e++) {
                int64_t slot = (int64_t)table[e / B] * B + e % B;
                const char *ke = kv_k_head(kv, slot, kvh);
                double dot = 0.0;
                for (int d = 0; d < hd; d++) dot += (double)qh[d] * load_elem(ke, kv->dtype, d);
                scores[e] = (double)scale * dot;
                if (scores[e] > max_score) max_score = scores[e];
            }
            double sum = 0.0;
            for (int32_t e = 0; e < nv; e++) {
                scores[e] = exp(scores[e] - max_score);
                sum += scores[e];
            }
            for (int d = 0; d < hd; d++) acc[d] = 0.0;
            for (int32_t e = 0; e < nv; e++) {
                int64_t slot = (int64_t)table[e / B] * B + e % B;
                const char *ve = kv_k_head(kv, slot, kvh) + kv->v_offset;
                for (int d = 0; d < hd; d++) acc[d] += scores[e] * load_elem(ve, kv->dtype, d);
            }
            for (int d = 0; d < hd; d++) oh[d] = (float)(acc[d] / sum);
        }
    }
    speed_free(scores);
    speed_free(acc);
    return SPEED_OK;
}

/* Whether logit value a at column ia ranks before value b at column ib: larger first, and
 * among equal values the lower column first. */
static bool ref_ranks_before(float a, int32_t ia, float b, int32_t ib) { return a > b || (a == b && ia < ib); }

/* Top-k by insertion: the row is walked once, each value is slid into a sorted list of the k
 * best seen so far (a value ranking below the list's last is dropped at once). The log-sum-exp
 * is max-shifted and summed in double. */
static speed_status_t ref_topk(void *ctx, speed_mat_t vals, /* f32 [n][k], out */
                               int32_t *ids,                /* [n][k] contiguous, out */
                               float *lse,                  /* [n], out */
                               speed_mat_t logits,          /* f32 [n][V] */
                               int k) {                     /* 1 .. min(V, SPEED_TOPK_MAX) */
    (void)ctx;
    const int64_t V = logits.n_cols;
    for (int64_t i = 0; i < logits.n_rows; i++) {
        const float *x = f32_row(logits, i);
        float *v = f32_row(vals, i);
        int32_t *id = ids + i * k;
        int n = 0; /* entries of the list so far */
        for (int64_t c = 0; c < V; c++) {
            if (n == k && !ref_ranks_before(x[c], (int32_t)c, v[k - 1], id[k - 1])) continue;
            int j = n < k ? n++ : k - 1; /* the slot freed at the end */
            while (j > 0 && ref_ranks_before(x[c], (int32_t)c, v[j - 1], id[j - 1])) {
                v[j] = v[j - 1];
                id[j] = id[j - 1];
                j--;
            }
            v[j] = x[c];
            id[j] = (int32_t)c;
        }

        double max = -INFINITY;
        for (int64_t c = 0; c < V; c++)
            if (x[c] > max) max = x[c];
        if (isinf(max)) { /* all -inf, or some +inf: the shift would give inf - inf */
            lse[i] = (float)max;
            continue;
        }
        double sum = 0.0;
        for (int64_t c = 0; c < V; c++) sum += exp((double)x[c] - max);
        lse[i] = (float)(max + log(sum));
    }
    return SPEED_OK;
}

/* ---- creation -------------------------------------------------------------------- */

static const speed_backend_ops_t cpu_ref_ops = {
    .name = ref_name,
    .destroy = ref_destroy,
    .alloc = ref_alloc,
    .free = ref_free,
    .alloc_host = ref_alloc,
    .free_host = ref_free,
    .host_memory = ref_host_memory,
    .upload = ref_copy,
    .download = ref_copy,
    .memset_zero = ref_memset_zero,
    .map_weights = ref_map_weights,
    .unmap_weights = ref_unmap_weights,
    .synchronize = ref_synchronize,
    .supports_op = ref_supports_op,
    .embed = ref_embed,
    .rmsnorm = ref_rmsnorm,
    .matmul = ref_matmul,
    .rope = ref_rope,
    .swiglu = ref_swiglu,
    .add = ref_add,
    .get_rows = ref_get_rows,
    .kv_store = ref_kv_store,
    .kv_load = ref_kv_load,
    .attention = ref_attention,
    .topk = ref_topk,
};

speed_status_t speed_backend_cpu_ref_create(const speed_backend_params_t *params, speed_backend_t **backend_p) {
    (void)params; /* one thread, no ISA choice: nothing to configure */
    if (!backend_p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend: cpu-ref: NULL output pointer");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    cpu_ref_t *ref = speed_calloc(1, sizeof *ref);
    if (!ref) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend: cpu-ref: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }
    ref->backend.ops = &cpu_ref_ops;
    ref->backend.ctx = ref;
    ref->backend.kind = SPEED_BACKEND_CPU_REF;
    *backend_p = &ref->backend;
    return SPEED_OK;
}
