/* The NCCL communicator (kernels/comm.h): one rank per GPU, all-reduce on the rank's CUDA
 * backend stream.
 *
 * libnccl is about 220 MB: it is not linked. The first NCCL call loads libnccl.so.2 with dlopen
 * and resolves the few functions used here, so CPU-only processes never map it, and a machine
 * with the CUDA runtime but without NCCL gets SPEED_ERR_UNSUPPORTED with the loader's reason
 * instead of a binary that does not start. nccl.h is included only for its types. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "alloc.h"
#include "comm.h"
#include "cuda_backend_access.h"
#include "cuda_module.h"
#include "log.h"

typedef struct {
    ncclResult_t (*get_unique_id)(ncclUniqueId *);
    ncclResult_t (*comm_init_rank)(ncclComm_t *, int, ncclUniqueId, int);
    ncclResult_t (*all_reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*comm_abort)(ncclComm_t);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    const char *(*error_string)(ncclResult_t);
} nccl_api_t;

static nccl_api_t g_nccl;
static speed_status_t g_nccl_status = SPEED_ERR_UNSUPPORTED;
static pthread_once_t g_nccl_once = PTHREAD_ONCE_INIT;

static void nccl_load(void) {
    void *h = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: cannot load NCCL: %s", dlerror());
        return;
    }
    struct {
        const char *name;
        void **fn;
    } syms[] = {
        {"ncclGetUniqueId", (void **)&g_nccl.get_unique_id}, {"ncclCommInitRank", (void **)&g_nccl.comm_init_rank},
        {"ncclAllReduce", (void **)&g_nccl.all_reduce},      {"ncclCommAbort", (void **)&g_nccl.comm_abort},
        {"ncclCommDestroy", (void **)&g_nccl.comm_destroy},  {"ncclGetErrorString", (void **)&g_nccl.error_string},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].fn = dlsym(h, syms[i].name);
        if (!*syms[i].fn) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: libnccl.so.2 lacks %s", syms[i].name);
            dlclose(h);
            memset(&g_nccl, 0, sizeof g_nccl);
            return;
        }
    }
    g_nccl_status = SPEED_OK; /* the library stays loaded for the life of the process */
}

static speed_status_t nccl_ready(void) {
    pthread_once(&g_nccl_once, nccl_load);
    if (g_nccl_status != SPEED_OK)
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: NCCL is not available (libnccl.so.2 could not be loaded)");
    return g_nccl_status;
}

static speed_status_t nccl_status(ncclResult_t r, const char *call) {
    if (r == ncclSuccess) return SPEED_OK;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: %s: %s", call, g_nccl.error_string ? g_nccl.error_string(r) : "failed");
    return r == ncclInvalidArgument || r == ncclInvalidUsage ? SPEED_ERR_INVALID_ARGUMENT : SPEED_ERR_DEVICE;
}

typedef struct {
    speed_comm_t comm;
    ncclComm_t nccl;
    atomic_bool aborted; /* ncclCommAbort was called: the handle is gone */
    int device;
    cudaStream_t stream;
} nccl_ctx_t;

static speed_status_t nccl_all_reduce_sum(void *ctx, float *buf, int64_t count) {
    nccl_ctx_t *c = ctx;
    if (atomic_load(&c->aborted)) return SPEED_ERR_CANCELLED;
    if (count == 0) return SPEED_OK;
    if (cudaSetDevice(c->device) != cudaSuccess) return SPEED_ERR_DEVICE;
    ncclResult_t r = g_nccl.all_reduce(buf, buf, (size_t)count, ncclFloat32, ncclSum, c->nccl, c->stream);
    if (r != ncclSuccess && atomic_load(&c->aborted)) return SPEED_ERR_CANCELLED;
    return nccl_status(r, "ncclAllReduce");
}

static void nccl_abort(void *ctx) {
    nccl_ctx_t *c = ctx;
    if (!atomic_exchange(&c->aborted, true)) g_nccl.comm_abort(c->nccl); /* frees the handle */
}

static void nccl_destroy(void *ctx) {
    nccl_ctx_t *c = ctx;
    if (!atomic_load(&c->aborted)) {
        cudaSetDevice(c->device);
        g_nccl.comm_destroy(c->nccl);
    }
    speed_free(c);
}

static const speed_comm_ops_t nccl_ops = {
    .all_reduce_sum = nccl_all_reduce_sum,
    .abort = nccl_abort,
    .destroy = nccl_destroy,
};

speed_status_t speed_cuda_module_nccl_unique_id(uint8_t id[SPEED_COMM_ID_BYTES]) {
    _Static_assert(sizeof(ncclUniqueId) == SPEED_COMM_ID_BYTES, "ncclUniqueId size");
    if (!id) return SPEED_ERR_INVALID_ARGUMENT;
    SPEED_CHECK(nccl_ready());
    ncclUniqueId u;
    SPEED_CHECK(nccl_status(g_nccl.get_unique_id(&u), "ncclGetUniqueId"));
    memcpy(id, &u, sizeof u);
    return SPEED_OK;
}

speed_status_t speed_cuda_module_nccl_create(const uint8_t id[SPEED_COMM_ID_BYTES], int size, int rank,
                                             speed_backend_t *backend, speed_comm_t **comm_p) {
    if (!id || !comm_p || size < 1 || rank < 0 || rank >= size) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: nccl: rank %d of %d, or a NULL argument", rank, size);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    int device;
    void *stream;
    if (!speed_backend_cuda_device_stream(backend, &device, &stream)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: nccl needs a cuda backend");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    SPEED_CHECK(nccl_ready());
    nccl_ctx_t *c = speed_calloc(1, sizeof *c);
    if (!c) return SPEED_ERR_NO_MEMORY;
    atomic_init(&c->aborted, false);
    c->device = device;
    c->stream = (cudaStream_t)stream;
    if (cudaSetDevice(device) != cudaSuccess) {
        speed_free(c);
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: nccl: cannot select device %d", device);
        return SPEED_ERR_DEVICE;
    }
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    speed_status_t st = nccl_status(g_nccl.comm_init_rank(&c->nccl, size, u, rank), "ncclCommInitRank");
    if (st != SPEED_OK) {
        speed_free(c);
        return st;
    }
    c->comm = (speed_comm_t){.ops = &nccl_ops, .ctx = c, .rank = rank, .size = size, .kind = "nccl"};
    *comm_p = &c->comm;
    return SPEED_OK;
}
