/* kernels/backend_kind.c: every backend kind's name parses back to it, unknown names are
 * refused, and the names array is what a config ENUM field needs. Linked against
 * speed_backend_kind alone: naming a kind must not need the backends. */
#include <string.h>

#include "backend.h"
#include "check.h"
#include "config.h"

int main(void) {
    for (int k = 0; k < SPEED_BACKEND_KIND_COUNT; k++) {
        speed_backend_kind_t kind = (speed_backend_kind_t)k, got = (speed_backend_kind_t)99;
        CHECK_STR_EQ(speed_backend_kind_name(kind), speed_backend_kind_names[k]);
        CHECK_INT_EQ(speed_backend_kind_parse(speed_backend_kind_name(kind), &got), SPEED_OK);
        CHECK_INT_EQ(got, kind);
        for (int j = 0; j < k; j++) CHECK(strcmp(speed_backend_kind_names[k], speed_backend_kind_names[j]) != 0);
    }
    CHECK(speed_backend_kind_names[SPEED_BACKEND_KIND_COUNT] == NULL);
    CHECK_STR_EQ(speed_backend_kind_name(SPEED_BACKEND_CPU), "cpu");
    CHECK_STR_EQ(speed_backend_kind_name(SPEED_BACKEND_CPU_REF), "cpu-ref");
    CHECK_STR_EQ(speed_backend_kind_name(SPEED_BACKEND_CUDA), "cuda");
    CHECK_STR_EQ(speed_backend_kind_name((speed_backend_kind_t)SPEED_BACKEND_KIND_COUNT), "?");
    CHECK_STR_EQ(speed_backend_kind_name((speed_backend_kind_t)-1), "?");

    const char *bad[] = {"", "CPU", "cpu_ref", "cpuref", "cuda:0", "gpu", NULL};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        speed_backend_kind_t got = SPEED_BACKEND_CUDA;
        CHECK_INT_EQ(speed_backend_kind_parse(bad[i], &got), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(got, SPEED_BACKEND_CUDA);
    }

    /* As a config field's choices: the stored index is the kind. */
    int index = -1;
    CHECK_INT_EQ(speed_config_parse_enum("cpu-ref", speed_backend_kind_names, &index), SPEED_OK);
    CHECK_INT_EQ(index, SPEED_BACKEND_CPU_REF);
    /* cpu, the default kind, is kind 0: a zeroed params struct asks for it. */
    CHECK_INT_EQ(SPEED_BACKEND_CPU, 0);
    return CHECK_DONE();
}
