/* The names of the backend kinds (backend_kind.h). */
#include "backend_kind.h"

#include "names.h"

const char *const speed_backend_kind_names[SPEED_BACKEND_KIND_COUNT + 1] = {
    [SPEED_BACKEND_CPU] = "cpu",
    [SPEED_BACKEND_CPU_REF] = "cpu-ref",
    [SPEED_BACKEND_CUDA] = "cuda",
    [SPEED_BACKEND_KIND_COUNT] = NULL,
};

const char *speed_backend_kind_name(speed_backend_kind_t kind) {
    return speed_names_get(speed_backend_kind_names, SPEED_BACKEND_KIND_COUNT, (int)kind, "?");
}

speed_status_t speed_backend_kind_parse(const char *name, speed_backend_kind_t *kind_p) {
    int i = speed_names_find(speed_backend_kind_names, name);
    if (i < 0) return SPEED_ERR_INVALID_ARGUMENT;
    *kind_p = (speed_backend_kind_t)i;
    return SPEED_OK;
}
