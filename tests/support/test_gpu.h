/* Whether a test of the cuda backend may skip: only on a machine without an NVIDIA GPU.
 *
 * A cuda test that cannot create its backend used to skip (exit 77) whenever the build had no
 * CUDA backend, so a GPU machine with a CPU-only build reported every cuda test as skipped and
 * the suite passed. The rule now: no GPU here, skip; a GPU here, the backend must come up, and a
 * backend that is not built or cannot be created is a failure.
 *
 * Thread-safety: any thread; reads the file system only. */
#ifndef SPEED_TEST_GPU_H
#define SPEED_TEST_GPU_H

#include <stdbool.h>
#include <stddef.h>

/* True when this machine has an NVIDIA GPU: /dev/nvidia0 or /proc/driver/nvidia exists.
 * Writes the path that said so (or why not) into why[cap] when why is not NULL. */
bool tu_nvidia_gpu_present(char *why, size_t cap);

/* For a cuda test whose backend could not be created (`detail` says why, for the message):
 * exits 77 (skip) when there is no GPU, 1 (fail) when there is one. Never returns.
 * SPEED_TEST_CUDA_OPTIONAL=1 in the environment makes it skip on a GPU machine too, for a
 * deliberate CPU-only build there (the skip message says so). */
void tu_cuda_unavailable_exit(const char *test, const char *detail) __attribute__((noreturn));

/* True when the cuda backend must work here: a GPU is present and SPEED_TEST_CUDA_OPTIONAL is
 * not 1. Tests whose no-GPU branch checks the refusal use it to check the GPU branch instead. */
bool tu_cuda_required(void);

#endif /* SPEED_TEST_GPU_H */
