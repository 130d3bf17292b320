/* The CUDA backend and the NCCL communicator live in libspeed_cuda.so (kernels/cuda/
 * CMakeLists.txt); this file, part of speed_kernels, opens it on first use.
 *
 * Where: $SPEED_CUDA_MODULE if set, else the build tree's module (SPEED_CUDA_MODULE_PATH),
 * else <program dir>/../lib/libspeed_cuda.so, else "libspeed_cuda.so" on the loader's search
 * path. The first that loads wins; if none does, every entry point returns
 * SPEED_ERR_UNSUPPORTED with the loader's reason for the last one tried (typically a missing
 * libcudart on a machine without the CUDA runtime). The module stays loaded for the life of
 * the process. Thread-safe (pthread_once). */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "comm.h"
#include "log.h"

typedef speed_status_t (*backend_create_fn)(const speed_backend_params_t *, speed_backend_t **);
typedef speed_status_t (*nccl_id_fn)(uint8_t *);
typedef speed_status_t (*nccl_create_fn)(const uint8_t *, int, int, speed_backend_t *, speed_comm_t **);

static struct {
    pthread_once_t once;
    void *handle;
    backend_create_fn backend_create;
    nccl_id_fn nccl_unique_id;
    nccl_create_fn nccl_create;
    char why[512]; /* the reason the module could not be loaded */
} g_mod = {.once = PTHREAD_ONCE_INIT};

static void *try_open(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(g_mod.why, sizeof g_mod.why, "%.500s", e ? e : path);
    }
    return h;
}

static void module_load(void) {
    void *h = NULL;
    const char *env = getenv("SPEED_CUDA_MODULE");
    if (env && *env) {
        h = try_open(env);
    } else {
        h = try_open(SPEED_CUDA_MODULE_PATH);
        if (!h) { /* installed: <prefix>/bin/program and <prefix>/lib/libspeed_cuda.so */
            char exe[PATH_MAX];
            ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
            if (n > 0) {
                exe[n] = '\0';
                char *slash = strrchr(exe, '/');
                if (slash) {
                    *slash = '\0';
                    char path[PATH_MAX + 32];
                    snprintf(path, sizeof path, "%s/../lib/libspeed_cuda.so", exe);
                    h = try_open(path);
                }
            }
        }
        if (!h) h = try_open("libspeed_cuda.so");
    }
    if (!h) return;
    g_mod.backend_create = (backend_create_fn)dlsym(h, "speed_cuda_module_backend_create");
    g_mod.nccl_unique_id = (nccl_id_fn)dlsym(h, "speed_cuda_module_nccl_unique_id");
    g_mod.nccl_create = (nccl_create_fn)dlsym(h, "speed_cuda_module_nccl_create");
    if (!g_mod.backend_create || !g_mod.nccl_unique_id || !g_mod.nccl_create) {
        snprintf(g_mod.why, sizeof g_mod.why, "libspeed_cuda.so lacks its entry points (a module of another build?)");
        dlclose(h);
        return;
    }
    g_mod.handle = h;
}

static bool module_ready(const char *what) {
    pthread_once(&g_mod.once, module_load);
    if (g_mod.handle) return true;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "%s: cannot load the CUDA module: %s", what, g_mod.why);
    return false;
}

speed_status_t speed_backend_cuda_create(const speed_backend_params_t *params, speed_backend_t **backend_p) {
    if (!module_ready("backend: cuda")) return SPEED_ERR_UNSUPPORTED;
    return g_mod.backend_create(params, backend_p);
}

speed_status_t speed_comm_nccl_unique_id(uint8_t id[SPEED_COMM_ID_BYTES]) {
    if (!module_ready("comm: nccl")) return SPEED_ERR_UNSUPPORTED;
    return g_mod.nccl_unique_id(id);
}

speed_status_t speed_comm_nccl_create(const uint8_t id[SPEED_COMM_ID_BYTES], int size, int rank,
                                      speed_backend_t *backend, speed_comm_t **comm_p) {
    if (!module_ready("comm: nccl")) return SPEED_ERR_UNSUPPORTED;
    return g_mod.nccl_create(id, size, rank, backend, comm_p);
}
