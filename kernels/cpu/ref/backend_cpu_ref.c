/* placeholder until the cpu-ref backend lands */
#include "backend.h"
#include "log.h"
speed_status_t speed_backend_cpu_ref_create(const speed_backend_params_t *params, speed_backend_t **backend_p) {
    (void)params; (void)backend_p;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "backend: cpu-ref not built yet");
    return SPEED_ERR_UNSUPPORTED;
}
