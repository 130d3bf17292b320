/* The CUDA backend is a module loaded on first use (kernels/cuda/cuda_loader.c):
 *   1. a process that only uses CPU backends never maps the CUDA runtime or cuBLAS;
 *   2. asking for a cuda backend loads the module (CUDA builds: libspeed_cuda.so and the CUDA
 *      runtime are then mapped, and the backend is created or fails with SPEED_ERR_DEVICE
 *      without a GPU; builds without CUDA: SPEED_ERR_UNSUPPORTED, nothing mapped);
 *   3. a module that cannot be found ($SPEED_CUDA_MODULE naming a missing file, in a child
 *      process) is SPEED_ERR_UNSUPPORTED with the loader's reason, not a crash. */
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "file.h"
#include "log.h"
#include "test_gpu.h"

static bool mapped(const char *lib) {
    char *maps = NULL;
    size_t n = 0;
    if (speed_file_read("/proc/self/maps", 1 << 26, SPEED_SUBSYS_CORE, 0, &maps, &n) != SPEED_OK) return false;
    bool found = strstr(maps, lib) != NULL;
    speed_free(maps);
    return found;
}

static speed_status_t cuda_create(void) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CUDA;
    speed_backend_t *be = NULL;
    speed_status_t st = speed_backend_create(&bp, &be);
    speed_backend_destroy(be);
    return st;
}

int main(void) {
    speed_log_configure("error");
    speed_backend_params_t bp = speed_backend_default_params();
    bp.n_threads = 1;
    speed_backend_t *cpu = NULL;
    CHECK_INT_EQ(speed_backend_create(&bp, &cpu), SPEED_OK);
    speed_backend_destroy(cpu);
    CHECK_MSG(!mapped("libcudart"), "a CPU-only process maps the CUDA runtime");
    CHECK_MSG(!mapped("libcublas"), "a CPU-only process maps cuBLAS");
    CHECK(!mapped("libspeed_cuda"));

    /* 3, in a child: the first use decides where the module comes from */
    pid_t pid = fork();
    if (pid == 0) {
        setenv("SPEED_CUDA_MODULE", "/nonexistent/libspeed_cuda.so", 1);
        speed_status_t st = cuda_create();
        bool said = strstr(speed_log_last_error(), "cannot load the CUDA module") ||
                    strstr(speed_log_last_error(), "no CUDA backend");
        _exit(st == SPEED_ERR_UNSUPPORTED && said ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a missing module: status %d", status);

    /* 2 */
    speed_status_t st = cuda_create();
#ifdef SPEED_TEST_HAVE_CUDA
    /* without a GPU the module loads and the backend says DEVICE; with one it must come up */
    if (tu_cuda_required())
        CHECK_MSG(st == SPEED_OK, "a GPU is here but the cuda backend failed: %s (%s)", speed_status_string(st),
                  speed_log_last_error());
    else
        CHECK_MSG(st == SPEED_OK || st == SPEED_ERR_DEVICE, "cuda backend: %s (%s)", speed_status_string(st),
                  speed_log_last_error());
    CHECK_MSG(mapped("libspeed_cuda"), "the module was not loaded");
    CHECK_MSG(mapped("libcudart"), "the module did not bring the CUDA runtime");
#else
    CHECK_INT_EQ(st, SPEED_ERR_UNSUPPORTED);
    CHECK(!mapped("libcudart"));
#endif
    return CHECK_DONE();
}
