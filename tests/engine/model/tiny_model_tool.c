/* Writes a synthetic model with speed_tiny_model_write, loads it back and reports the time.
 *   model_tiny_tool PRESET OUT_DIR [DTYPE] [N_SHARDS]
 * As the ctest "model_tiny_preset" (label perf) it writes tinyllama-1.1b (2.2 GB) into
 * $SPEED_TEST_TMP and removes it afterwards; that test is skipped unless SPEED_TEST_PERF=1. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "model.h"
#include "model_test_util.h"
#include "tiny_model.h"
#include "test_clock.h"

int main(int argc, char **argv) {
    bool as_test = argc == 2 && strcmp(argv[1], "--perf-test") == 0;
    if (!as_test && argc < 3) {
        fprintf(stderr, "usage: %s PRESET OUT_DIR [DTYPE] [N_SHARDS]\n", argv[0]);
        return 2;
    }
    const char *preset = as_test ? "tinyllama-1.1b" : argv[1];
    char dir[1200];
    if (as_test) {
        const char *perf = getenv("SPEED_TEST_PERF");
        if (!perf || strcmp(perf, "1") != 0) {
            fprintf(stderr, "SKIP: set SPEED_TEST_PERF=1 to write the 2.2 GB tinyllama-1.1b model\n");
            return 77;
        }
        snprintf(dir, sizeof dir, "%s/tinyllama", tu_tmp_init("model_tiny_preset"));
    } else {
        snprintf(dir, sizeof dir, "%s", argv[2]);
    }
    speed_tiny_model_params_t p;
    if (speed_tiny_model_preset(preset, &p) != SPEED_OK) return 1;
    if (!as_test && argc > 3 && speed_dtype_parse(argv[3], &p.dtype) != SPEED_OK) {
        fprintf(stderr, "unknown dtype %s\n", argv[3]);
        return 2;
    }
    if (!as_test && argc > 4) p.n_shards = atoi(argv[4]);

    double t0 = now_s();
    speed_status_t s = speed_tiny_model_write(dir, &p);
    double t1 = now_s();
    if (s != SPEED_OK) return 1;
    speed_model_t *m = NULL;
    s = speed_model_load(dir, NULL, &m);
    double t2 = now_s();
    if (s != SPEED_OK) return 1;
    printf("%s: %lld params, %.2f GB written in %.1f s (%.0f MB/s), loaded in %.3f s\n", preset,
           (long long)speed_model_n_params(m), (double)speed_model_n_bytes(m) / 1e9, t1 - t0,
           (double)speed_model_n_bytes(m) / 1e6 / (t1 - t0), t2 - t1);
    int rc = 0;
    if (as_test && speed_model_n_params(m) != 1100048384) {
        fprintf(stderr, "tinyllama-1.1b: %lld params, want 1100048384\n", (long long)speed_model_n_params(m));
        rc = 1;
    }
    speed_model_destroy(m);
    if (as_test) tu_rm_rf(tu_root);
    return rc;
}
