/* What other parts of kernels/ (the NCCL communicator) may learn of a CUDA backend. Internal. */
#ifndef SPEED_CUDA_BACKEND_ACCESS_H
#define SPEED_CUDA_BACKEND_ACCESS_H

#include <stdbool.h>

#include "backend.h"

/* The device index and cudaStream_t (as void *) of a CUDA backend; false for any other kind
 * or NULL. The stream belongs to the backend. */
bool speed_backend_cuda_device_stream(speed_backend_t *backend, int *device_p, void **stream_p);

#endif /* SPEED_CUDA_BACKEND_ACCESS_H */
