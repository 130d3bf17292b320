/* Whether a test of the cuda backend may skip (test_gpu.h). */
#include "test_gpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

bool tu_nvidia_gpu_present(char *why, size_t cap) {
    /* the device node of the first GPU, or the driver's proc tree (present once the kernel
     * module has found a GPU; containers often show one without the other) */
    static const char *const paths[] = {"/dev/nvidia0", "/proc/driver/nvidia"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        if (access(paths[i], F_OK) == 0) {
            if (why) snprintf(why, cap, "%s exists", paths[i]);
            return true;
        }
    }
    if (why) snprintf(why, cap, "neither /dev/nvidia0 nor /proc/driver/nvidia exists");
    return false;
}

static bool cuda_optional(void) {
    const char *optional = getenv("SPEED_TEST_CUDA_OPTIONAL");
    return optional && strcmp(optional, "1") == 0;
}

bool tu_cuda_required(void) { return tu_nvidia_gpu_present(NULL, 0) && !cuda_optional(); }

void tu_cuda_unavailable_exit(const char *test, const char *detail) {
    char why[128];
    bool gpu = tu_nvidia_gpu_present(why, sizeof why);
    bool allowed = cuda_optional();
    fflush(stdout);
    if (!gpu) {
        fprintf(stderr, "SKIP: %s: no NVIDIA GPU on this machine (%s); the cuda backend: %s\n", test, why, detail);
        exit(77);
    }
    if (allowed) {
        fprintf(stderr, "SKIP: %s: an NVIDIA GPU is here (%s) but SPEED_TEST_CUDA_OPTIONAL=1; the cuda backend: %s\n",
                test, why, detail);
        exit(77);
    }
    fprintf(stderr,
            "FAIL: %s: an NVIDIA GPU is here (%s) but the cuda backend is unavailable: %s (a build without "
            "CUDA on a GPU machine tests nothing; set SPEED_TEST_CUDA_OPTIONAL=1 to skip on purpose)\n",
            test, why, detail);
    exit(1);
}
