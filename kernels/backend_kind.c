/* The names of the backend kinds (backend_kind.h). */
#include "backend_kind.h"

#include <string.h>

const char *const speed_backend_kind_names[SPEED_BACKEND_KIND_COUNT + 1] = {
    [SPEED_BACKEND_CPU] = "cpu",
    [SPEED_BACKEND_CPU_REF] = "cpu-ref",
    [SPEED_BACKEND_CUDA] = "cuda",
    [SPEED_BACKEND_KIND_COUNT] = NULL,
};

const char *speed_backend_kind_name(speed_backend_kind_t kind) {
    return (unsigned)kind < SPEED_BACKEND_KIND_COUNT ? speed_backend_kind_names[kind] : "?";
}

speed_status_t speed_backend_kind_parse(const char *name, speed_backend_kind_t *kind_p) {
    if (!name) return SPEED_ERR_INVALID_ARGUMENT;
    for (int k = 0; k < SPEED_BACKEND_KIND_COUNT; k++) {
        if (strcmp(name, speed_backend_kind_names[k]) == 0) {
            *kind_p = (speed_backend_kind_t)k;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_INVALID_ARGUMENT;
}
