/* The names of the backend kinds (backend_kind.h). */
#include "backend_kind.h"

#include "names.h"

const char *const speed_backend_kind_names[SPEED_BACKEND_KIND_COUNT + 1] = {
    [SPEED_BACKEND_CPU] = "cpu",
    [SPEED_BACKEND_CPU_REF] = "cpu-ref",
    [SPEED_BACKEND_CUDA] = "cuda",
    [SPEED_BACKEND_KIND_COUNT] = NULL,
};

SPEED_NAMES_DEFINE(speed_backend_kind, speed_backend_kind_t, SPEED_BACKEND_KIND_COUNT)
