/* Error checks of the CUDA backend (host C code): a failing CUDA runtime or cuBLAS call is
 * logged once, where it happened (call text, file:line, the library's own error name and
 * message), and turned into a speed_status_t. NCCL's checks.h in spirit.
 *
 *   SPEED_CUDA_CHECK(call)    call returns cudaError_t (a launcher from cuda_kernels.h
 *                             returns cudaGetLastError() after its launches)
 *   SPEED_CUBLAS_CHECK(call)  call returns cublasStatus_t
 *
 * Both `return` the status from the enclosing function. Mapping: out of device memory
 * (cudaErrorMemoryAllocation, CUBLAS_STATUS_ALLOC_FAILED) -> SPEED_ERR_NO_MEMORY; no device or
 * driver (cudaErrorNoDevice, cudaErrorInsufficientDriver) -> SPEED_ERR_DEVICE; a kernel image
 * missing for this GPU (built for other CMAKE_CUDA_ARCHITECTURES) -> SPEED_ERR_UNSUPPORTED;
 * everything else -> SPEED_ERR_DEVICE. */
#ifndef SPEED_CUDA_CHECK_H
#define SPEED_CUDA_CHECK_H

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include "status.h"

speed_status_t speed_cuda_status(cudaError_t err, const char *call, const char *file, int line);
speed_status_t speed_cublas_status(cublasStatus_t st, const char *call, const char *file, int line);

#define SPEED_CUDA_CHECK(call)                                                                                    \
    do {                                                                                                          \
        cudaError_t speed_cuda_err_ = (call);                                                                     \
        if (speed_cuda_err_ != cudaSuccess) return speed_cuda_status(speed_cuda_err_, #call, __FILE__, __LINE__); \
    } while (0)

#define SPEED_CUBLAS_CHECK(call)                                                     \
    do {                                                                             \
        cublasStatus_t speed_cublas_st_ = (call);                                    \
        if (speed_cublas_st_ != CUBLAS_STATUS_SUCCESS)                               \
            return speed_cublas_status(speed_cublas_st_, #call, __FILE__, __LINE__); \
    } while (0)

#endif /* SPEED_CUDA_CHECK_H */
