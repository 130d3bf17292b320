/* The entry points of libspeed_cuda.so, the module that holds everything linked against the
 * CUDA runtime, cuBLAS and NCCL (kernels/cuda/CMakeLists.txt). cuda_loader.c (in speed_kernels)
 * opens the module on first use and calls these through dlsym; they behave exactly as the
 * public functions they stand behind (backend.h, comm.h). Internal to kernels/. */
#ifndef SPEED_CUDA_MODULE_H
#define SPEED_CUDA_MODULE_H

#include <stdint.h>

#include "backend.h"
#include "comm.h"

#define SPEED_CUDA_EXPORT __attribute__((visibility("default")))

/* speed_backend_cuda_create */
SPEED_CUDA_EXPORT speed_status_t speed_cuda_module_backend_create(const speed_backend_params_t *params,
                                                                  speed_backend_t **backend_p);
/* speed_comm_nccl_unique_id / speed_comm_nccl_create (SPEED_ERR_UNSUPPORTED when the module was
 * built without nccl.h) */
SPEED_CUDA_EXPORT speed_status_t speed_cuda_module_nccl_unique_id(uint8_t id[SPEED_COMM_ID_BYTES]);
SPEED_CUDA_EXPORT speed_status_t speed_cuda_module_nccl_create(const uint8_t id[SPEED_COMM_ID_BYTES], int size,
                                                               int rank, speed_backend_t *backend,
                                                               speed_comm_t **comm_p);

#endif /* SPEED_CUDA_MODULE_H */
