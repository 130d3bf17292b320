/* The kinds of compute backend and their names — "cpu", "cpu-ref", "cuda" — owned by kernels/
 * (backend.h includes this). A header and a library (speed_backend_kind) of their own so that
 * what only names a kind, such as the cluster file's schema that the router links too, needs
 * neither the backends nor their API. */
#ifndef SPEED_BACKEND_KIND_H
#define SPEED_BACKEND_KIND_H

#include "status.h"

typedef enum {
    SPEED_BACKEND_CPU = 0,    /* the default */
    SPEED_BACKEND_CPU_REF,
    SPEED_BACKEND_CUDA,
} speed_backend_kind_t;

#define SPEED_BACKEND_KIND_COUNT 3

/* The kinds' names in enum order, NULL-terminated: "cpu", "cpu-ref", "cuda" — what --backend
 * and a cluster file's backend key accept. A config ENUM field (config.h) takes them as its
 * enum_names, and its stored index is then the speed_backend_kind_t. */
extern const char *const speed_backend_kind_names[SPEED_BACKEND_KIND_COUNT + 1];
/* "cpu", "cpu-ref", "cuda"; "?" for a value outside the enum. Never NULL. */
const char *speed_backend_kind_name(speed_backend_kind_t kind);
/* One of speed_backend_kind_names (case-sensitive). Returns SPEED_OK, or
 * SPEED_ERR_INVALID_ARGUMENT for NULL or any other name (nothing logged, *kind_p untouched). */
speed_status_t speed_backend_kind_parse(const char *name, speed_backend_kind_t *kind_p);

#endif /* SPEED_BACKEND_KIND_H */
