/* The kinds of compute backend and their names — "cpu", "cpu-ref", "cuda" — owned by kernels/
 * (backend.h includes this). A header and a library (speed_backend_kind) of their own so that
 * what only names a kind, such as the cluster file's schema that the router links too, needs
 * neither the backends nor their API. */
#ifndef SPEED_BACKEND_KIND_H
#define SPEED_BACKEND_KIND_H

#include "names.h"
#include "status.h"

typedef enum {
    SPEED_BACKEND_CPU = 0, /* the default */
    SPEED_BACKEND_CPU_REF,
    SPEED_BACKEND_CUDA,
} speed_backend_kind_t;

#define SPEED_BACKEND_KIND_COUNT 3

/* speed_backend_kind_names ("cpu", "cpu-ref", "cuda": what --backend and a cluster file's
 * backend key accept), speed_backend_kind_name and speed_backend_kind_parse, as names.h says. */
SPEED_NAMES_DECLARE(speed_backend_kind, speed_backend_kind_t, SPEED_BACKEND_KIND_COUNT);

#endif /* SPEED_BACKEND_KIND_H */
