/* The CUDA backend ("cuda"): the ops of backend.h on one GPU, one stream.
 *
 * Host C code (compiled by the C compiler, not nvcc): the context, device memory, copies, the
 * staging of host index arrays, weight mapping, cuBLAS, and the ops table. The kernels live in
 * one .cu file per op behind the launchers of cuda_kernels.h.
 *
 * Ordering. Everything is enqueued on one non-blocking stream in call order: uploads, memsets,
 * kernels and cuBLAS calls. download and synchronize wait for the stream.
 *
 * Host index arrays (ids, rows, slots, positions, block tables) are host memory valid only
 * during the call, and the engine rewrites them for the next layer while the GPU may still be
 * busy. Each op therefore packs what it needs into one region of a pinned staging ring and
 * enqueues one async copy to the matching region of a device ring. A region of the pinned ring
 * is reused only after the copy out of it has completed: when the ring wraps, the host waits
 * for the event recorded after the latest copy (rare: the ring is sized for many steps). The
 * device ring needs no wait: the copy that overwrites a region is ordered on the stream after
 * the kernels that read it. One region per op, so an op's arrays are never split across a wrap.
 *
 * Weights (speed_backend_map_weights) are copied to device memory once. The engine maps one
 * tensor at a time, so the backend cannot make one allocation for the whole model; it does the
 * next best thing: tensors of WEIGHT_OWN_MIN bytes or more get their own cudaMalloc (the
 * driver's 2 MiB granularity wastes < 13% at worst, ~0 for real matrices), smaller ones (norm
 * vectors, small models) are packed 256-byte aligned into slabs that grow geometrically from
 * 4 MiB to 64 MiB, freed when their last tensor is unmapped.
 *
 * Scratch (the 16-bit copy of x for matmul with bf16/f16 weights, split-K partials of
 * attention) is one device buffer that grows on demand (after a stream synchronize) and is
 * then reused: ops run in stream order, so they never use it at the same time. cuBLAS gets a
 * workspace sized once at creation.
 *
 * Matmul: cublasGemmEx with fp32 compute (CUBLAS_COMPUTE_32F: true fp32 for f32 weights, no
 * TF32). With bf16 / f16 weights the activations are rounded to the weight dtype first (the
 * tensor cores need both operands in one type): ~2^-9 (bf16) / 2^-12 (f16) relative per term,
 * within the tolerances of tests/kernels/test_backend_ops.c. f16 activations overflow past
 * 65504; models stored in f16 run with activations far below that.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "alloc.h"
#include "backend.h"
#include "cuda_backend_access.h"
#include "cuda_check.h"
#include "cuda_kernels.h"
#include "cuda_module.h"
#include "log.h"

_Static_assert(SPEED_DTYPE_F32 == 0 && SPEED_DTYPE_BF16 == 1 && SPEED_DTYPE_F16 == 2,
               "cuda_kernels.h passes speed_dtype_t values as int 0 / 1 / 2");
_Static_assert(sizeof(speed_cuda_attn_row_t) == 16, "attention row descriptors are 16 bytes");

#define SUBSYS SPEED_SUBSYS_ENGINE

#define STAGE_MIN_BYTES        ((size_t)1 << 20)  /* initial staging ring (pinned + device) */
#define CUBLAS_WORKSPACE_BYTES ((size_t)32 << 20) /* NVIDIA's recommendation for Hopper */
#define WEIGHT_OWN_MIN         ((size_t)16 << 20)
#define WEIGHT_SLAB_MIN        ((size_t)4 << 20)
#define WEIGHT_SLAB_MAX        ((size_t)64 << 20)
#define WEIGHT_ALIGN           256
#define ATTN_CHUNK_MIN         256 /* entries: below this a split costs more than it gains */

typedef struct weight_slab {
    struct weight_slab *next;
    char *base;
    size_t size, used;
    int n_live; /* tensors mapped in it */
} weight_slab_t;

typedef struct {
    const void *dev;
    weight_slab_t *slab;
} weight_map_t;

typedef struct {
    speed_backend_t backend;
    int device;
    int n_sm;
    char name[320]; /* "cuda:N (" + cudaDeviceProp.name (256) + ")" */
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *cublas_ws;
    /* staging ring */
    unsigned char *stage_host; /* pinned */
    unsigned char *stage_dev;
    size_t stage_size, stage_head;
    cudaEvent_t stage_event;
    bool stage_pending; /* stage_event was recorded after a copy */
    size_t stage_reserved;
    /* scratch */
    void *scratch;
    size_t scratch_size;
    /* weights */
    weight_slab_t *slabs; /* newest first; slabs->... the open small-tensor slab */
    weight_slab_t *open_slab;
    size_t next_slab_size;
    weight_map_t *maps;
    int n_maps, cap_maps;
} cuda_ctx_t;

/* ---- errors ---------------------------------------------------------------------------- */

speed_status_t speed_cuda_status(cudaError_t err, const char *call, const char *file, int line) {
    SPEED_ERROR(SUBSYS, "cuda: %s failed at %s:%d: %s (%s)", call, file, line, cudaGetErrorName(err),
                cudaGetErrorString(err));
    switch (err) {
    case cudaErrorMemoryAllocation: return SPEED_ERR_NO_MEMORY;
    case cudaErrorNoKernelImageForDevice: return SPEED_ERR_UNSUPPORTED;
    default: return SPEED_ERR_DEVICE;
    }
}

speed_status_t speed_cublas_status(cublasStatus_t st, const char *call, const char *file, int line) {
    SPEED_ERROR(SUBSYS, "cuda: %s failed at %s:%d: %s (%s)", call, file, line, cublasGetStatusName(st),
                cublasGetStatusString(st));
    switch (st) {
    case CUBLAS_STATUS_ALLOC_FAILED: return SPEED_ERR_NO_MEMORY;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH: return SPEED_ERR_UNSUPPORTED;
    default: return SPEED_ERR_DEVICE;
    }
}

/* Makes the context's device current for the calling thread (the CUDA runtime's current
 * device is per thread; the backend may be driven from a thread other than its creator's). */
static speed_status_t enter(cuda_ctx_t *c) {
    SPEED_CUDA_CHECK(cudaSetDevice(c->device));
    return SPEED_OK;
}

/* ---- staging of host index arrays ---------------------------------------------------------- */

static size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

static void stage_free(cuda_ctx_t *c) {
    if (c->stage_host) cudaFreeHost(c->stage_host);
    if (c->stage_dev) cudaFree(c->stage_dev);
    c->stage_host = NULL;
    c->stage_dev = NULL;
    c->stage_size = c->stage_head = 0;
    c->stage_pending = false;
}

static speed_status_t stage_alloc(cuda_ctx_t *c, size_t size) {
    void *host = NULL, *dev = NULL;
    SPEED_CUDA_CHECK(cudaMallocHost(&host, size));
    c->stage_host = host;
    SPEED_CUDA_CHECK(cudaMalloc(&dev, size));
    c->stage_dev = dev;
    c->stage_size = size;
    c->stage_head = 0;
    return SPEED_OK;
}

/* A region of `bytes` in the ring: *host_p to fill now, *dev_p for the op's kernels. Call
 * stage_commit after filling it (before any other stage_reserve). */
static speed_status_t stage_reserve(cuda_ctx_t *c, size_t bytes, void **host_p, void **dev_p) {
    bytes = align_up(bytes ? bytes : 1, 16);
    if (bytes > c->stage_size) { /* grow: nothing may still read or copy out of the old ring */
        size_t size = c->stage_size * 2 > bytes ? c->stage_size * 2 : align_up(bytes, STAGE_MIN_BYTES);
        SPEED_CUDA_CHECK(cudaStreamSynchronize(c->stream));
        stage_free(c);
        SPEED_CHECK(stage_alloc(c, size));
    } else if (c->stage_head + bytes > c->stage_size) { /* wrap: the last copy out of the ring is done */
        if (c->stage_pending) SPEED_CUDA_CHECK(cudaEventSynchronize(c->stage_event));
        c->stage_head = 0;
    }
    *host_p = c->stage_host + c->stage_head;
    *dev_p = c->stage_dev + c->stage_head;
    c->stage_reserved = bytes;
    return SPEED_OK;
}

static speed_status_t stage_commit(cuda_ctx_t *c) {
    size_t off = c->stage_head, bytes = c->stage_reserved;
    c->stage_head += bytes;
    SPEED_CUDA_CHECK(
        cudaMemcpyAsync(c->stage_dev + off, c->stage_host + off, bytes, cudaMemcpyHostToDevice, c->stream));
    SPEED_CUDA_CHECK(cudaEventRecord(c->stage_event, c->stream));
    c->stage_pending = true;
    return SPEED_OK;
}

/* Stages one int32 array. */
static speed_status_t stage_i32(cuda_ctx_t *c, const int32_t *host, int64_t n, const int32_t **dev_p) {
    void *h, *d;
    SPEED_CHECK(stage_reserve(c, (size_t)n * sizeof(int32_t), &h, &d));
    memcpy(h, host, (size_t)n * sizeof(int32_t));
    SPEED_CHECK(stage_commit(c));
    *dev_p = d;
    return SPEED_OK;
}

/* ---- scratch ----------------------------------------------------------------------------- */

static speed_status_t scratch_get(cuda_ctx_t *c, size_t bytes, void **ptr_p) {
    if (bytes > c->scratch_size) {
        size_t size = align_up(bytes + bytes / 4, (size_t)1 << 20);
        SPEED_CUDA_CHECK(cudaStreamSynchronize(c->stream)); /* the old buffer may be in use */
        if (c->scratch) cudaFree(c->scratch);
        c->scratch = NULL;
        c->scratch_size = 0;
        SPEED_CUDA_CHECK(cudaMalloc(&c->scratch, size));
        c->scratch_size = size;
    }
    *ptr_p = c->scratch;
    return SPEED_OK;
}

/* ---- memory ------------------------------------------------------------------------------ */

static const char *cu_name(void *ctx) { return ((cuda_ctx_t *)ctx)->name; }

static void cu_destroy(void *ctx) {
    cuda_ctx_t *c = ctx;
    if (cudaSetDevice(c->device) == cudaSuccess && c->stream) cudaStreamSynchronize(c->stream);
    if (c->n_maps) SPEED_WARN(SUBSYS, "cuda: destroyed with %d weight tensors still mapped (freed now)", c->n_maps);
    while (c->slabs) {
        weight_slab_t *s = c->slabs;
        c->slabs = s->next;
        cudaFree(s->base);
        speed_free(s);
    }
    speed_free(c->maps);
    if (c->scratch) cudaFree(c->scratch);
    stage_free(c);
    if (c->stage_event) cudaEventDestroy(c->stage_event);
    if (c->cublas) cublasDestroy(c->cublas);
    if (c->cublas_ws) cudaFree(c->cublas_ws);
    if (c->stream) cudaStreamDestroy(c->stream);
    speed_free(c);
}

static speed_status_t cu_alloc(void *ctx, size_t bytes, void **ptr_p) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1); /* 256-byte aligned */
    if (err != cudaSuccess) {
        SPEED_ERROR(SUBSYS, "cuda: cannot allocate %zu bytes of device memory: %s", bytes, cudaGetErrorString(err));
        return err == cudaErrorMemoryAllocation ? SPEED_ERR_NO_MEMORY : SPEED_ERR_DEVICE;
    }
    *ptr_p = p;
    return SPEED_OK;
}

static void cu_free(void *ctx, void *ptr) {
    cuda_ctx_t *c = ctx;
    if (cudaSetDevice(c->device) != cudaSuccess) return;
    cudaError_t err = cudaFree(ptr); /* waits for the device: no op still uses ptr */
    if (err != cudaSuccess) SPEED_ERROR(SUBSYS, "cuda: cudaFree: %s", cudaGetErrorString(err));
}

/* From pageable host memory the async copy returns once the bytes are staged by the driver,
 * so the caller may reuse src at once. */
/* Pinned host memory: the KV mirror (kv_cache.h) that UCX registers and puts from / into;
 * page-locked, so upload / download of it are DMA at full PCIe speed. */
static speed_status_t cu_alloc_host(void *ctx, size_t bytes, void **ptr_p) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    void *p = NULL;
    cudaError_t err = cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocPortable);
    if (err != cudaSuccess) {
        SPEED_ERROR(SUBSYS, "cuda: cannot allocate %zu bytes of pinned host memory: %s", bytes,
                    cudaGetErrorString(err));
        return err == cudaErrorMemoryAllocation ? SPEED_ERR_NO_MEMORY : SPEED_ERR_DEVICE;
    }
    *ptr_p = p;
    return SPEED_OK;
}
static void cu_free_host(void *ctx, void *ptr) {
    cuda_ctx_t *c = ctx;
    if (cudaSetDevice(c->device) != cudaSuccess) return;
    cudaError_t err = cudaFreeHost(ptr); /* synchronizes: no copy still reads it */
    if (err != cudaSuccess) SPEED_ERROR(SUBSYS, "cuda: cudaFreeHost: %s", cudaGetErrorString(err));
}
static bool cu_host_memory(void *ctx) {
    (void)ctx;
    return false; /* cudaMalloc: device memory */
}
static speed_status_t cu_upload(void *ctx, void *dst, const void *src, size_t bytes) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
    return SPEED_OK;
}

static speed_status_t cu_download(void *ctx, void *dst, const void *src, size_t bytes) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    SPEED_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return SPEED_OK;
}

static speed_status_t cu_memset_zero(void *ctx, void *dst, size_t bytes) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, c->stream));
    return SPEED_OK;
}

static speed_status_t cu_synchronize(void *ctx) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return SPEED_OK;
}

/* ---- weights ----------------------------------------------------------------------------- */

static speed_status_t slab_new(cuda_ctx_t *c, size_t size, weight_slab_t **slab_p) {
    weight_slab_t *s = speed_calloc(1, sizeof *s);
    if (!s) {
        SPEED_ERROR(SUBSYS, "cuda: out of host memory");
        return SPEED_ERR_NO_MEMORY;
    }
    cudaError_t err = cudaMalloc((void **)&s->base, size);
    if (err != cudaSuccess) {
        speed_free(s);
        SPEED_ERROR(SUBSYS, "cuda: cannot allocate %zu bytes of device memory for weights: %s", size,
                    cudaGetErrorString(err));
        return err == cudaErrorMemoryAllocation ? SPEED_ERR_NO_MEMORY : SPEED_ERR_DEVICE;
    }
    s->size = size;
    s->next = c->slabs;
    c->slabs = s;
    *slab_p = s;
    return SPEED_OK;
}

static void slab_release(cuda_ctx_t *c, weight_slab_t *slab) {
    if (--slab->n_live > 0) return;
    for (weight_slab_t **pp = &c->slabs; *pp; pp = &(*pp)->next) {
        if (*pp == slab) {
            *pp = slab->next;
            break;
        }
    }
    if (c->open_slab == slab) c->open_slab = NULL;
    cudaFree(slab->base); /* waits for the device */
    speed_free(slab);
}

static speed_status_t cu_map_weights(void *ctx, const void *host, size_t bytes, const void **ptr_p) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    if (c->n_maps == c->cap_maps) {
        int cap = c->cap_maps ? 2 * c->cap_maps : 64;
        weight_map_t *maps = speed_realloc(c->maps, (size_t)cap * sizeof *maps);
        if (!maps) {
            SPEED_ERROR(SUBSYS, "cuda: out of host memory");
            return SPEED_ERR_NO_MEMORY;
        }
        c->maps = maps;
        c->cap_maps = cap;
    }
    size_t need = align_up(bytes ? bytes : 1, WEIGHT_ALIGN);
    weight_slab_t *slab;
    if (need >= WEIGHT_OWN_MIN) {
        SPEED_CHECK(slab_new(c, need, &slab));
    } else {
        slab = c->open_slab;
        if (!slab || slab->used + need > slab->size) {
            size_t size = c->next_slab_size ? c->next_slab_size : WEIGHT_SLAB_MIN;
            if (size < need) size = need;
            SPEED_CHECK(slab_new(c, size, &slab));
            c->open_slab = slab;
            c->next_slab_size = size * 2 < WEIGHT_SLAB_MAX ? size * 2 : WEIGHT_SLAB_MAX;
        }
    }
    char *dev = slab->base + slab->used;
    slab->used += need;
    slab->n_live++;
    cudaError_t err = cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, c->stream);
    if (err != cudaSuccess) {
        slab_release(c, slab);
        return speed_cuda_status(err, "cudaMemcpyAsync (weights)", __FILE__, __LINE__);
    }
    c->maps[c->n_maps++] = (weight_map_t){.dev = dev, .slab = slab};
    *ptr_p = dev;
    return SPEED_OK;
}

static void cu_unmap_weights(void *ctx, const void *ptr) {
    cuda_ctx_t *c = ctx;
    for (int i = 0; i < c->n_maps; i++) {
        if (c->maps[i].dev == ptr) {
            weight_slab_t *slab = c->maps[i].slab;
            c->maps[i] = c->maps[--c->n_maps];
            if (cudaSetDevice(c->device) == cudaSuccess) slab_release(c, slab);
            return;
        }
    }
    SPEED_ERROR(SUBSYS, "cuda: unmap_weights of %p, which is not mapped", ptr);
}

static bool cu_supports_op(void *ctx, speed_op_t op, speed_dtype_t dtype) {
    (void)ctx;
    (void)op;
    return dtype == SPEED_DTYPE_F32 || dtype == SPEED_DTYPE_BF16 || dtype == SPEED_DTYPE_F16;
}

/* ---- ops --------------------------------------------------------------------------------- */

static speed_status_t cu_embed(void *ctx, speed_mat_t out, speed_mat_t table, const int32_t *ids) {
    cuda_ctx_t *c = ctx;
    const int32_t *d_ids;
    SPEED_CHECK(enter(c));
    SPEED_CHECK(stage_i32(c, ids, out.n_rows, &d_ids));
    SPEED_CUDA_CHECK(speed_cuda_embed(c->stream, out.data, out.row_stride, table.data, (int)table.dtype,
                                      table.row_stride, d_ids, out.n_rows, out.n_cols));
    return SPEED_OK;
}

static speed_status_t cu_rmsnorm(void *ctx, speed_mat_t out, speed_mat_t x, speed_mat_t weight, float eps) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(speed_cuda_rmsnorm(c->stream, out.data, out.row_stride, x.data, x.row_stride, weight.data,
                                        (int)weight.dtype, eps, x.n_rows, x.n_cols));
    return SPEED_OK;
}

static speed_status_t cu_matmul(void *ctx, speed_mat_t out, speed_mat_t x, speed_mat_t w, bool accumulate) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    if (x.n_rows > INT_MAX || x.n_cols > INT_MAX || w.n_rows > INT_MAX || x.row_stride > INT_MAX ||
        w.row_stride > INT_MAX || out.row_stride > INT_MAX) {
        SPEED_ERROR(SUBSYS, "cuda: matmul: a dimension exceeds cuBLAS's int range");
        return SPEED_ERR_UNSUPPORTED;
    }
    const int n = (int)x.n_rows, k = (int)x.n_cols, m = (int)w.n_rows;
    const void *b = x.data;
    int ldb = (int)x.row_stride;
    cudaDataType_t type = CUDA_R_32F;
    if (w.dtype != SPEED_DTYPE_F32) {
        void *xh;
        type = w.dtype == SPEED_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
        SPEED_CHECK(scratch_get(c, (size_t)n * (size_t)k * 2, &xh));
        SPEED_CUDA_CHECK(speed_cuda_matmul_convert(c->stream, xh, (int)w.dtype, x.data, x.row_stride, n, k));
        b = xh;
        ldb = k;
    }
    /* Row-major out[n][m] is column-major outᵀ (m x n, ld = row stride); outᵀ = W · xᵀ where
     * row-major W [m][k] is column-major Wᵀ (hence OP_T) and row-major x [n][k] column-major xᵀ. */
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    SPEED_CUBLAS_CHECK(cublasGemmEx(c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w.data, type,
                                    (int)w.row_stride, b, type, ldb, &beta, out.data, CUDA_R_32F, (int)out.row_stride,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return SPEED_OK;
}

static speed_status_t cu_rope(void *ctx, speed_mat_t x, int n_heads, int head_dim, const int32_t *positions,
                              const speed_rope_t *rope) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    const int half = head_dim / 2;
    size_t pos_bytes = align_up((size_t)x.n_rows * sizeof(int32_t), 16);
    void *h, *d;
    SPEED_CHECK(stage_reserve(c, pos_bytes + (size_t)half * sizeof(float), &h, &d));
    memcpy(h, positions, (size_t)x.n_rows * sizeof(int32_t));
    float *inv_freq = (float *)((char *)h + pos_bytes);
    for (int i = 0; i < half; i++) inv_freq[i] = speed_rope_inv_freq(rope, head_dim, i); /* as cpu-ref */
    SPEED_CHECK(stage_commit(c));
    SPEED_CUDA_CHECK(speed_cuda_rope(c->stream, x.data, x.row_stride, x.n_rows, n_heads, head_dim, d,
                                     (const float *)((char *)d + pos_bytes)));
    return SPEED_OK;
}

static speed_status_t cu_swiglu(void *ctx, speed_mat_t out, speed_mat_t gate, speed_mat_t up) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(speed_cuda_swiglu(c->stream, out.data, out.row_stride, gate.data, gate.row_stride, up.data,
                                       up.row_stride, out.n_rows, out.n_cols));
    return SPEED_OK;
}

static speed_status_t cu_add(void *ctx, speed_mat_t out, speed_mat_t a, speed_mat_t b) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(speed_cuda_add(c->stream, out.data, out.row_stride, a.data, a.row_stride, b.data, b.row_stride,
                                    out.n_rows, out.n_cols));
    return SPEED_OK;
}

static speed_status_t cu_get_rows(void *ctx, speed_mat_t out, speed_mat_t x, const int32_t *rows) {
    cuda_ctx_t *c = ctx;
    const int32_t *d_rows;
    SPEED_CHECK(enter(c));
    SPEED_CHECK(stage_i32(c, rows, out.n_rows, &d_rows));
    SPEED_CUDA_CHECK(
        speed_cuda_get_rows(c->stream, out.data, out.row_stride, x.data, x.row_stride, d_rows, out.n_rows, out.n_cols));
    return SPEED_OK;
}

_Static_assert(SPEED_CUDA_TOPK_MAX == SPEED_TOPK_MAX, "topk limits differ");

static speed_status_t cu_topk(void *ctx, speed_mat_t vals, int32_t *ids, float *lse, speed_mat_t logits, int k) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    SPEED_CUDA_CHECK(speed_cuda_topk(c->stream, vals.data, vals.row_stride, ids, lse, logits.data, logits.row_stride,
                                     logits.n_rows, logits.n_cols, k));
    return SPEED_OK;
}

static speed_cuda_kv_t kv_view(const speed_kv_layer_t *kv) {
    return (speed_cuda_kv_t){.k_base = kv->k_base,
                             .block_stride = kv->block_stride,
                             .v_offset = kv->v_offset,
                             .block_tokens = kv->block_tokens,
                             .n_kv_heads = kv->n_kv_heads,
                             .head_dim = kv->head_dim,
                             .dtype = (int)kv->dtype,
                             .slot_heads = speed_kv_layer_slot_heads(kv)};
}

static speed_status_t cu_kv_store(void *ctx, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                  const int32_t *slots) {
    cuda_ctx_t *c = ctx;
    const int32_t *d_slots;
    SPEED_CHECK(enter(c));
    SPEED_CHECK(stage_i32(c, slots, k.n_rows, &d_slots));
    SPEED_CUDA_CHECK(
        speed_cuda_kv_store(c->stream, kv_view(kv), k.data, k.row_stride, v.data, v.row_stride, d_slots, k.n_rows));
    return SPEED_OK;
}

static speed_status_t cu_kv_load(void *ctx, const speed_kv_layer_t *kv, speed_mat_t k, speed_mat_t v,
                                 const int32_t *slots) {
    cuda_ctx_t *c = ctx;
    const int32_t *d_slots;
    SPEED_CHECK(enter(c));
    SPEED_CHECK(stage_i32(c, slots, k.n_rows, &d_slots));
    SPEED_CUDA_CHECK(
        speed_cuda_kv_load(c->stream, kv_view(kv), k.data, k.row_stride, v.data, v.row_stride, d_slots, k.n_rows));
    return SPEED_OK;
}

/* Rows of one sequence share their block-table pointer (backend.h) and the engine passes them
 * adjacent, so each run of rows with one pointer stages (and checks) its table once, as long as
 * its longest row needs; a pointer that comes back later is simply staged again. */
static int64_t run_end(const speed_attn_rows_t *rows, int64_t r, int64_t B, int64_t *n_blocks_p) {
    int64_t r_end = r, nb = 0;
    while (r_end < rows->n_rows && rows->block_table[r_end] == rows->block_table[r]) {
        int64_t nbr = (rows->n_visible[r_end] + B - 1) / B;
        if (nbr > nb) nb = nbr;
        r_end++;
    }
    *n_blocks_p = nb;
    return r_end;
}

static speed_status_t cu_attention(void *ctx, speed_mat_t out, speed_mat_t q, const speed_kv_layer_t *kv, int n_heads,
                                   const speed_attn_rows_t *rows, float scale) {
    cuda_ctx_t *c = ctx;
    SPEED_CHECK(enter(c));
    const int64_t n = rows->n_rows, B = kv->block_tokens;
    if (kv->head_dim > SPEED_CUDA_ATTN_MAX_HEAD_DIM) {
        SPEED_ERROR(SUBSYS, "cuda: attention: head_dim %d > %d is not implemented", kv->head_dim,
                    SPEED_CUDA_ATTN_MAX_HEAD_DIM);
        return SPEED_ERR_UNSUPPORTED;
    }
    if (n * n_heads > INT_MAX) {
        SPEED_ERROR(SUBSYS, "cuda: attention: %lld rows x %d heads is too many", (long long)n, n_heads);
        return SPEED_ERR_UNSUPPORTED;
    }
    /* pass 1: table entries to stage, the longest row, block ids that cannot be right (ids past
     * the pool cannot be seen here: the pool's size is not part of the view) */
    int64_t n_table = 0, max_visible = 0;
    for (int64_t r = 0; r < n; r++)
        if (rows->n_visible[r] > max_visible) max_visible = rows->n_visible[r];
    for (int64_t r = 0, nb, r_end; r < n; r = r_end) {
        r_end = run_end(rows, r, B, &nb);
        for (int64_t b = 0; b < nb; b++) {
            if (rows->block_table[r][b] < 0) {
                SPEED_ERROR(SUBSYS, "op attention: row %lld: block %lld of its table is %d", (long long)r, (long long)b,
                            rows->block_table[r][b]);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
        n_table += nb;
    }
    if (n_table > INT32_MAX) {
        SPEED_ERROR(SUBSYS, "cuda: attention: block tables too large");
        return SPEED_ERR_UNSUPPORTED;
    }
    /* split-K: enough (row, head, chunk) blocks for ~2 waves over the SMs when rows are few */
    const int64_t base_blocks = n * n_heads;
    int64_t want_split = (2 * (int64_t)c->n_sm + base_blocks - 1) / base_blocks;
    if (want_split < 1) want_split = 1;
    int64_t chunk = (max_visible + want_split - 1) / want_split;
    if (chunk < ATTN_CHUNK_MIN) chunk = ATTN_CHUNK_MIN;
    chunk = (int64_t)align_up((size_t)chunk, SPEED_CUDA_ATTN_TILE);
    const int max_split = max_visible ? (int)((max_visible + chunk - 1) / chunk) : 1;

    /* pass 2: row descriptors then tables, one staged region */
    size_t desc_bytes = (size_t)n * sizeof(speed_cuda_attn_row_t);
    void *h, *d;
    SPEED_CHECK(stage_reserve(c, desc_bytes + (size_t)n_table * sizeof(int32_t), &h, &d));
    speed_cuda_attn_row_t *desc = h;
    int32_t *tables = (int32_t *)((char *)h + desc_bytes);
    int32_t off = 0;
    for (int64_t r = 0, nb, r_end; r < n; r = r_end) {
        r_end = run_end(rows, r, B, &nb);
        if (nb) memcpy(tables + off, rows->block_table[r], (size_t)nb * sizeof(int32_t));
        for (int64_t i = r; i < r_end; i++) {
            const int32_t nv = rows->n_visible[i];
            desc[i] = (speed_cuda_attn_row_t){
                .n_visible = nv, .table_off = off, .n_split = nv ? (int32_t)((nv + chunk - 1) / chunk) : 1};
        }
        off += (int32_t)nb;
    }
    SPEED_CHECK(stage_commit(c));

    float *partials = NULL;
    if (max_split > 1) {
        void *p;
        SPEED_CHECK(scratch_get(c, (size_t)base_blocks * max_split * (kv->head_dim + 2) * sizeof(float), &p));
        partials = p;
    }
    SPEED_CUDA_CHECK(speed_cuda_attention(c->stream, out.data, out.row_stride, q.data, q.row_stride, kv_view(kv),
                                          n_heads, n, d, (const int32_t *)((char *)d + desc_bytes), (int)chunk,
                                          max_split, scale, partials));
    return SPEED_OK;
}

/* ---- creation ---------------------------------------------------------------------------- */

static const speed_backend_ops_t cuda_ops = {
    .name = cu_name,
    .destroy = cu_destroy,
    .alloc = cu_alloc,
    .free = cu_free,
    .alloc_host = cu_alloc_host,
    .free_host = cu_free_host,
    .host_memory = cu_host_memory,
    .upload = cu_upload,
    .download = cu_download,
    .memset_zero = cu_memset_zero,
    .map_weights = cu_map_weights,
    .unmap_weights = cu_unmap_weights,
    .synchronize = cu_synchronize,
    .supports_op = cu_supports_op,
    .embed = cu_embed,
    .rmsnorm = cu_rmsnorm,
    .matmul = cu_matmul,
    .rope = cu_rope,
    .swiglu = cu_swiglu,
    .add = cu_add,
    .get_rows = cu_get_rows,
    .kv_store = cu_kv_store,
    .kv_load = cu_kv_load,
    .attention = cu_attention,
    .topk = cu_topk,
};

static speed_status_t cuda_init(cuda_ctx_t *c) {
    struct cudaDeviceProp prop;
    SPEED_CUDA_CHECK(cudaSetDevice(c->device));
    SPEED_CUDA_CHECK(cudaGetDeviceProperties(&prop, c->device));
    c->n_sm = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    snprintf(c->name, sizeof c->name, "cuda:%d (%s, sm_%d%d, %d SMs)", c->device, prop.name, prop.major, prop.minor,
             c->n_sm);
    SPEED_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    SPEED_CUDA_CHECK(cudaEventCreateWithFlags(&c->stage_event, cudaEventDisableTiming));
    SPEED_CHECK(stage_alloc(c, STAGE_MIN_BYTES));
    SPEED_CUBLAS_CHECK(cublasCreate(&c->cublas));
    SPEED_CUBLAS_CHECK(cublasSetStream(c->cublas, c->stream));
    SPEED_CUBLAS_CHECK(cublasSetMathMode(c->cublas, CUBLAS_DEFAULT_MATH)); /* no TF32 for f32 weights */
    SPEED_CUDA_CHECK(cudaMalloc(&c->cublas_ws, CUBLAS_WORKSPACE_BYTES));
    SPEED_CUBLAS_CHECK(cublasSetWorkspace(c->cublas, c->cublas_ws, CUBLAS_WORKSPACE_BYTES));
    return SPEED_OK;
}

speed_status_t speed_cuda_module_backend_create(const speed_backend_params_t *params, speed_backend_t **backend_p) {
    if (!params || !backend_p) {
        SPEED_ERROR(SUBSYS, "backend: cuda: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    int count = 0; /* cudaGetDeviceCount leaves it untouched on error */
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count <= 0) {
        SPEED_ERROR(SUBSYS, "backend: cuda: no usable CUDA device: %s",
                    err != cudaSuccess ? cudaGetErrorString(err) : "the driver reports 0 devices");
        cudaGetLastError(); /* not sticky, but leave nothing behind */
        return SPEED_ERR_DEVICE;
    }
    if (params->device < 0 || params->device >= count) {
        SPEED_ERROR(SUBSYS, "backend: cuda: device %d does not exist (%d device%s)", params->device, count,
                    count == 1 ? "" : "s");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    cuda_ctx_t *c = speed_calloc(1, sizeof *c);
    if (!c) {
        SPEED_ERROR(SUBSYS, "backend: cuda: out of host memory");
        return SPEED_ERR_NO_MEMORY;
    }
    c->device = params->device;
    speed_status_t st = cuda_init(c);
    if (st != SPEED_OK) {
        cu_destroy(c);
        return st;
    }
    c->backend.ops = &cuda_ops;
    c->backend.ctx = c;
    c->backend.kind = SPEED_BACKEND_CUDA;
    SPEED_INFO(SUBSYS, "backend: %s", c->name);
    *backend_p = &c->backend;
    return SPEED_OK;
}

bool speed_backend_cuda_device_stream(speed_backend_t *be, int *device_p, void **stream_p) {
    if (!be || be->kind != SPEED_BACKEND_CUDA) return false;
    const cuda_ctx_t *c = be->ctx;
    *device_p = c->device;
    *stream_p = c->stream;
    return true;
}

#ifndef SPEED_HAVE_NCCL
speed_status_t speed_cuda_module_nccl_unique_id(uint8_t id[SPEED_COMM_ID_BYTES]) {
    (void)id;
    SPEED_ERROR(SUBSYS, "comm: this build has no NCCL (nccl.h was not found)");
    return SPEED_ERR_UNSUPPORTED;
}

speed_status_t speed_cuda_module_nccl_create(const uint8_t id[SPEED_COMM_ID_BYTES], int size, int rank,
                                             speed_backend_t *backend, speed_comm_t **comm_p) {
    (void)id, (void)size, (void)rank, (void)backend, (void)comm_p;
    SPEED_ERROR(SUBSYS, "comm: this build has no NCCL (nccl.h was not found)");
    return SPEED_ERR_UNSUPPORTED;
}
#endif
