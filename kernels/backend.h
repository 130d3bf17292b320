/* Compute backends: one ops table per backend plus a context (ggml's ggml_backend_i).
 *
 * Kernels know nothing of models: they see matrices, index arrays and KV pool views. The
 * engine drives a forward pass through these calls and runs unchanged on any backend:
 *
 *   cpu-ref   kernels/cpu/ref: plain C loops, fp32 accumulation — the executable spec.
 *   cpu       kernels/cpu: thread pool + AVX-512 / AVX2 chosen at run time, scalar fallback.
 *   cuda      kernels/cuda (GPU issue).
 *
 * Memory. "Backend memory" is what speed_backend_alloc returns: host memory on CPU backends,
 * device memory on CUDA. Every speed_mat_t / speed_kv_layer_t data pointer handed to an op
 * is backend memory, except weights, which are made visible once with speed_backend_map_weights
 * (no copy on CPU: the mmap is used in place). Host <-> backend copies are explicit
 * (upload / download). Small integer arrays passed to ops (token ids, positions, slots, block
 * tables, row lists) are HOST memory, valid for the duration of the call; a device backend
 * copies what it needs.
 *
 * Activations are always f32. Weights are f32, bf16 or f16 (their file dtype; never converted
 * on the CPU path), accumulation is fp32. KV caches are f32, bf16 or f16.
 *
 * Ordering. Ops run in call order. On CPU every op has finished when it returns; on a device
 * backend ops are asynchronous and speed_backend_synchronize waits for them (download also
 * synchronizes). Code that is correct on both calls synchronize before reading results.
 *
 * Thread-safety: a backend is used by one thread at a time (the engine's step thread). A CPU
 * backend runs its own worker threads inside each op. Different backends are independent.
 *
 * Errors: ops return SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (shapes or dtypes that do not fit —
 * a bug in the caller, logged), SPEED_ERR_UNSUPPORTED (speed_backend_supports_op would have
 * said no), SPEED_ERR_NO_MEMORY (a backend that needs scratch could not get it), or
 * SPEED_ERR_DEVICE (device failure). Ops never abort on bad arguments.
 */
#ifndef SPEED_BACKEND_H
#define SPEED_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend_kind.h"
#include "dtype.h"
#include "status.h"

/* ---- views ------------------------------------------------------------------------ */

/* A row-major matrix in backend memory: element (r, c) is at
 * data + (r * row_stride + c) * speed_dtype_size(dtype). row_stride >= n_cols (elements). */
typedef struct {
    void *data;
    speed_dtype_t dtype;
    int64_t n_rows;
    int64_t n_cols;
    int64_t row_stride;
} speed_mat_t;

/* Contiguous matrix view helper. */
static inline speed_mat_t speed_mat(void *data, speed_dtype_t dtype, int64_t n_rows, int64_t n_cols) {
    speed_mat_t m = {data, dtype, n_rows, n_cols, n_cols};
    return m;
}

/* One layer of a paged KV pool (docs/design.md §4). A pool is an array of blocks of
 * `block_tokens` tokens; inside a block, each layer of the pool's layer group has K then V,
 * each [block_tokens][S][head_dim] in `dtype` — so one layer's slice of one block is the
 * contiguous canonical (wire) unit of 2 * block_bytes_kv bytes. S = slot_heads ? slot_heads :
 * n_kv_heads is the number of kv heads stored per token slot (speed_kv_layer_slot_heads).
 *
 *   K of token slot s (block b = s / B, offset o = s % B), kv head h, dim d:
 *     k_base + b * block_stride + ((o * S + h) * head_dim + d) * dtype_size
 *   V: the same address + v_offset.
 *
 * Head views (tensor parallelism). A view of heads [h0, h0 + n_kv_heads) of a pool that stores
 * slot_heads heads per token slot has k_base advanced by h0 * head_dim * dtype_size and
 * n_kv_heads the view's head count; ops then read and write only those heads (the view's heads
 * of one slot are still adjacent, slots are S * head_dim elements apart). slot_heads 0 (what a
 * zero-initialised view has) means the view covers every head of the slot: S = n_kv_heads.
 * Ops reject a nonzero slot_heads below n_kv_heads and a v_offset below B * S * head_dim * size
 * (SPEED_ERR_INVALID_ARGUMENT); that h0 + n_kv_heads <= slot_heads is the caller's to keep.
 */
typedef struct {
    void *k_base;        /* backend memory: this layer's K in block 0 (+ h0 * head_dim * size) */
    size_t block_stride; /* bytes from one block to the next */
    size_t v_offset;     /* bytes from a block's K to its V (= B * S * head_dim * size) */
    int block_tokens;    /* B */
    int n_kv_heads;      /* kv heads in this view */
    int head_dim;
    speed_dtype_t dtype;
    int slot_heads; /* kv heads stored per token slot in memory (>= n_kv_heads); 0 means
                            * n_kv_heads. A view of heads [h0, h0 + n_kv_heads) of a pool holding
                            * slot_heads heads per slot has k_base advanced by
                            * h0 * head_dim * dtype_size. */
} speed_kv_layer_t;

/* S of the address formula: kv heads per token slot in memory. */
static inline int speed_kv_layer_slot_heads(const speed_kv_layer_t *kv) {
    return kv->slot_heads ? kv->slot_heads : kv->n_kv_heads;
}

/* RoPE as Hugging Face Llama applies it: rotate-half layout (dims d and d + head_dim/2 form
 * a pair), inv_freq[i] = theta^(-2i/head_dim), optionally rescaled Llama 3.1 style. */
typedef struct {
    float theta;
    bool llama3_scaling;
    float factor, low_freq_factor, high_freq_factor; /* llama3 only */
    int original_max_position;                       /* llama3 only */
} speed_rope_t;

/* inv_freq of rotation pair i (0 <= i < head_dim/2), as transformers computes it (rope_type
 * "default" or "llama3"): evaluated in double and rounded once to f32. Every backend builds
 * its frequency table with this function so all agree bit for bit; the angle of position p is
 * then the f32 product (float)p * inv_freq, as in transformers. */
float speed_rope_inv_freq(const speed_rope_t *rope, int head_dim, int i);

/* Attention queries: `n_rows` query rows, each with its own visible KV entries. Row r
 * attends, causally already resolved by the caller, to entries 0 .. n_visible[r]-1 of the
 * sequence whose block table is block_table[r] (entry e lives in slot
 * block_table[r][e / B] * B + e % B). Rows of one sequence share a block-table pointer.
 * All arrays are host memory with n_rows entries. */
typedef struct {
    int64_t n_rows;
    const int32_t *const *block_table;
    const int32_t *n_visible;
} speed_attn_rows_t;

/* ---- backend ---------------------------------------------------------------------- */

/* speed_backend_kind_t and its names: backend_kind.h. */

/* CPU instruction sets, from least to most capable; the fast CPU backend uses the best one
 * the machine has unless capped by speed_backend_params_t.cpu_isa_max (tests run each). */
typedef enum {
    SPEED_CPU_ISA_SCALAR = 0,
    SPEED_CPU_ISA_AVX2,        /* AVX2 + FMA + F16C */
    SPEED_CPU_ISA_AVX512,      /* AVX-512 F/BW/VL */
    SPEED_CPU_ISA_AVX512_BF16, /* + AVX512_BF16 (vdpbf16ps) */
    SPEED_CPU_ISA_BEST,        /* as a cap: no cap */
} speed_cpu_isa_t;

typedef struct {
    speed_backend_kind_t kind;
    int n_threads; /* CPU: worker threads incl. the caller; 0 = online cores */
    speed_cpu_isa_t cpu_isa_max;
    int device; /* CUDA device index */
    /* Batch invariance (docs/cluster.md#batch-invariance): every output row of every op is
     * computed in one fixed reduction order that depends only on that row's own inputs — not
     * on how many rows share the call, how the caller chunked them, nor on n_threads. cpu:
     * every matmul takes the blocked GEMM (no few-row GEMV path) and attention never splits a
     * row's entries; cpu-ref is per-row already; cuda refuses it (SPEED_ERR_UNSUPPORTED at
     * creation). false (the default): the fastest kernel for each shape. */
    bool batch_invariant;
} speed_backend_params_t;

typedef enum {
    SPEED_OP_EMBED = 0,
    SPEED_OP_RMSNORM,
    SPEED_OP_MATMUL,
    SPEED_OP_ROPE,
    SPEED_OP_SWIGLU,
    SPEED_OP_ADD,
    SPEED_OP_GET_ROWS,
    SPEED_OP_KV_STORE,
    SPEED_OP_KV_LOAD,
    SPEED_OP_ATTENTION,
    SPEED_OP_TOPK,
    SPEED_OP_COUNT
} speed_op_t;

typedef struct speed_backend speed_backend_t;

/* The ops table every backend fills. `ctx` is the backend's private context. Shapes are
 * documented on the public wrappers below; the wrappers validate shapes before calling, so
 * implementations may assume them. */
typedef struct {
    const char *(*name)(void *ctx);
    void (*destroy)(void *ctx);
    speed_status_t (*alloc)(void *ctx, size_t bytes, void **ptr_p);
    void (*free)(void *ctx, void *ptr);
    /* Page-locked host memory for staging copies (cudaHostAlloc on CUDA; the CPU backends'
     * alloc). NULL: speed_aligned_alloc / speed_aligned_free. */
    speed_status_t (*alloc_host)(void *ctx, size_t bytes, void **ptr_p);
    void (*free_host)(void *ctx, void *ptr);
    /* Whether alloc returns host memory (CPU-addressable). NULL: true. */
    bool (*host_memory)(void *ctx);
    speed_status_t (*upload)(void *ctx, void *dst, const void *src_host, size_t bytes);
    speed_status_t (*download)(void *ctx, void *dst_host, const void *src, size_t bytes);
    speed_status_t (*memset_zero)(void *ctx, void *dst, size_t bytes);
    speed_status_t (*map_weights)(void *ctx, const void *host, size_t bytes, const void **ptr_p);
    void (*unmap_weights)(void *ctx, const void *ptr);
    speed_status_t (*synchronize)(void *ctx);
    bool (*supports_op)(void *ctx, speed_op_t op, speed_dtype_t dtype);

    speed_status_t (*embed)(void *ctx, speed_mat_t out, speed_mat_t table, const int32_t *ids);
    speed_status_t (*rmsnorm)(void *ctx, speed_mat_t out, speed_mat_t x, speed_mat_t weight, float eps);
    speed_status_t (*matmul)(void *ctx, speed_mat_t out, speed_mat_t x, speed_mat_t w, bool accumulate);
    speed_status_t (*rope)(void *ctx, speed_mat_t x, int n_heads, int head_dim, const int32_t *positions,
                           const speed_rope_t *rope);
    speed_status_t (*swiglu)(void *ctx, speed_mat_t out, speed_mat_t gate, speed_mat_t up);
    speed_status_t (*add)(void *ctx, speed_mat_t out, speed_mat_t a, speed_mat_t b);
    speed_status_t (*get_rows)(void *ctx, speed_mat_t out, speed_mat_t x, const int32_t *rows);
    speed_status_t (*kv_store)(void *ctx, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                               const int32_t *slots);
    speed_status_t (*kv_load)(void *ctx, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                              const int32_t *slots);
    speed_status_t (*attention)(void *ctx, speed_mat_t out, speed_mat_t q, const speed_kv_layer_t *kv, int n_heads,
                                const speed_attn_rows_t *rows, float scale);
    speed_status_t (*topk)(void *ctx, speed_mat_t vals, int32_t *ids, float *lse, speed_mat_t logits, int k);
} speed_backend_ops_t;

struct speed_backend {
    const speed_backend_ops_t *ops;
    void *ctx;
    speed_backend_kind_t kind;
};

speed_backend_params_t speed_backend_default_params(void); /* CPU, all cores, best ISA */

/* Creates a backend. Returns SPEED_ERR_UNSUPPORTED for a kind not built in (CUDA without
 * nvcc), SPEED_ERR_DEVICE when the device is absent or fails (no GPU: cudaErrorInsufficientDriver),
 * SPEED_ERR_INVALID_ARGUMENT, SPEED_ERR_NO_MEMORY. */
speed_status_t speed_backend_create(const speed_backend_params_t *params, speed_backend_t **backend_p);

/* How messages name the backend `params` asks for: "cuda:N" for a GPU, else the kind's name
 * ("cpu", "cpu-ref"). Writes into buf and returns it. */
const char *speed_backend_label(const speed_backend_params_t *params, char *buf, size_t size);

/* Why speed_backend_create just failed with `status`, in a few words for one error line: the
 * cause it logged, without its "backend: " / "cuda: " prefixes, or the status's own text when
 * it logged nothing. Read it right after the call, on the same thread (speed_log_last_error). */
const char *speed_backend_failure(speed_status_t status);
void speed_backend_destroy(speed_backend_t *backend); /* NULL ok; waits for outstanding work */

/* "cpu-ref", "cpu (avx512-bf16, 2 threads)", "cuda:0 (NVIDIA H100 ...)". Owned by the backend. */
const char *speed_backend_name(const speed_backend_t *backend);
const char *speed_cpu_isa_name(speed_cpu_isa_t isa);
speed_cpu_isa_t speed_cpu_isa_detect(void); /* what this CPU supports */

/* Backend memory, at least 64-byte aligned, uninitialised. */
speed_status_t speed_backend_alloc(speed_backend_t *be, size_t bytes, void **ptr_p);
void speed_backend_free(speed_backend_t *be, void *ptr); /* NULL ok */
/* Whether backend memory is host memory: true on the CPU backends, false on CUDA (device
 * memory: not readable by the CPU, and registrable with UCX only if UCX was built with CUDA).
 * Callers that hand backend memory to host code or to the network check this (kv_cache.h: the
 * host mirror). */
bool speed_backend_host_memory(const speed_backend_t *be);
/* Page-locked ("pinned") host memory, at least 64-byte aligned, uninitialised: what staging
 * buffers between backend memory and the network use (cudaHostAlloc on CUDA, so upload /
 * download run at full PCIe speed; ordinary aligned memory on the CPU backends). Host memory
 * whatever the backend; free it with speed_backend_free_host (NULL ok). Returns SPEED_OK,
 * SPEED_ERR_NO_MEMORY (logged) or SPEED_ERR_DEVICE. */
speed_status_t speed_backend_alloc_host(speed_backend_t *be, size_t bytes, void **ptr_p);
void speed_backend_free_host(speed_backend_t *be, void *ptr);
speed_status_t speed_backend_upload(speed_backend_t *be, void *dst, const void *src_host, size_t bytes);
speed_status_t speed_backend_download(speed_backend_t *be, void *dst_host, const void *src, size_t bytes);
speed_status_t speed_backend_memset_zero(speed_backend_t *be, void *dst, size_t bytes);
/* Makes read-only host data (mapped weights) usable by ops: CPU returns `host` itself, a device
 * backend copies it to device memory. Undo with speed_backend_unmap_weights. */
speed_status_t speed_backend_map_weights(speed_backend_t *be, const void *host, size_t bytes, const void **ptr_p);
void speed_backend_unmap_weights(speed_backend_t *be, const void *ptr);
speed_status_t speed_backend_synchronize(speed_backend_t *be);
/* Whether `op` runs with weights / cache of `dtype` on this backend. */
bool speed_backend_supports_op(speed_backend_t *be, speed_op_t op, speed_dtype_t dtype);

/* ---- ops (shapes: n = rows/tokens) -------------------------------------------------- */

/* out[i, :] = table[ids[i], :]            out f32 [n][d]; table [vocab][d] (any dtype); ids [n] host */
speed_status_t speed_op_embed(speed_backend_t *be, speed_mat_t out, speed_mat_t table, const int32_t *ids);

/* out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight   out, x f32 [n][d]; weight [1][d]
 * out may alias x. */
speed_status_t speed_op_rmsnorm(speed_backend_t *be, speed_mat_t out, speed_mat_t x, speed_mat_t weight, float eps);

/* out = (accumulate ? out : 0) + x · wᵀ   out f32 [n][m]; x f32 [n][k]; w [m][k] (HF [out, in]);
 * out must not alias x */
speed_status_t speed_op_matmul(speed_backend_t *be, speed_mat_t out, speed_mat_t x, speed_mat_t w, bool accumulate);

/* In place on x f32 [n][n_heads * head_dim]: rotate each head of row i by position positions[i]. */
speed_status_t speed_op_rope(speed_backend_t *be, speed_mat_t x, int n_heads, int head_dim, const int32_t *positions,
                             const speed_rope_t *rope);

/* out = silu(gate) * up                  all f32 [n][f]; out may alias gate or up */
speed_status_t speed_op_swiglu(speed_backend_t *be, speed_mat_t out, speed_mat_t gate, speed_mat_t up);

/* out = a + b                            all f32 [n][d]; out may alias a or b */
speed_status_t speed_op_add(speed_backend_t *be, speed_mat_t out, speed_mat_t a, speed_mat_t b);

/* out[i, :] = x[rows[i], :]              out, x f32; rows [out.n_rows] host. out must not alias x. */
speed_status_t speed_op_get_rows(speed_backend_t *be, speed_mat_t out, speed_mat_t x, const int32_t *rows);

/* Writes K and V rows into the pool: slot slots[i] gets k[i, :], v[i, :], converted to the
 * cache dtype.   k, v f32 [n][n_kv_heads * head_dim]; slots [n] host (slot = block * B + offset) */
speed_status_t speed_op_kv_store(speed_backend_t *be, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                 const int32_t *slots);

/* The inverse: k[i, :], v[i, :] (f32) = the cache entries at slots[i]. For tests and export. */
speed_status_t speed_op_kv_load(speed_backend_t *be, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                const int32_t *slots);

/* Scaled dot-product attention with grouped-query heads (query head h uses kv head
 * h / (n_heads / n_kv_heads)), softmax in fp32:
 *   out[r, h] = Σ_e softmax_e(scale · q[r, h] · K[e, h']) V[e, h']   over e < rows->n_visible[r]
 * out, q f32 [n_rows][n_heads * head_dim]. A row with n_visible 0 gets zeros. */
speed_status_t speed_op_attention(speed_backend_t *be, speed_mat_t out, speed_mat_t q, const speed_kv_layer_t *kv,
                                  int n_heads, const speed_attn_rows_t *rows, float scale);

/* Largest k of speed_op_topk. */
#define SPEED_TOPK_MAX 256

/* The k largest logits of each row and the row's log-sum-exp, so that a device backend hands
 * the sampler k values per row instead of the whole vocabulary:
 *   vals[i, j] = the j-th largest value of logits[i, :] (descending; equal values: lower
 *                column first), ids[i * k + j] = its column;
 *   lse[i]     = log Σ_c exp(logits[i, c]), max-shifted, accumulated in f32 or better
 *                (-inf for a row of -inf, +inf when the row holds +inf).
 * logits f32 [n][V] (V <= INT32_MAX); vals f32 [n][k]; ids int32 [n][k], contiguous (row stride
 * k: there is no int32 speed_dtype_t); lse f32 [n]. vals, ids and lse are backend memory and
 * must not overlap logits. 1 <= k <= min(V, SPEED_TOPK_MAX). Rows holding NaN give unspecified
 * (but memory-safe) results. Selection is exact (no approximation): every backend returns the
 * same ids and the same value bits; lse agrees to f32 rounding. */
speed_status_t speed_op_topk(speed_backend_t *be, speed_mat_t vals, int32_t *ids, float *lse, speed_mat_t logits,
                             int k);

/* ---- registration (internal to kernels/) ------------------------------------------- */
speed_status_t speed_backend_cpu_ref_create(const speed_backend_params_t *params, speed_backend_t **backend_p);
speed_status_t speed_backend_cpu_create(const speed_backend_params_t *params, speed_backend_t **backend_p);
speed_status_t speed_backend_cuda_create(const speed_backend_params_t *params, speed_backend_t **backend_p);

#endif /* SPEED_BACKEND_H */
