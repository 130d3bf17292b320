/* Allocation fault injection (SQLite style) over speed_model_load, the safetensors reader, the
 * config parser and the tiny writer: the Nth allocation fails for N = 0, 1, ... until the
 * operation succeeds; every failure must return SPEED_ERR_NO_MEMORY and leak nothing. */
#include <string.h>

#include "check.h"
#include "test_log.h"
#include "model.h"
#include "model_test_util.h"
#include "safetensors.h"
#include "tiny_model.h"

typedef speed_status_t (*op_cb_t)(const char *arg, void **out_p);
typedef void (*undo_cb_t)(void *out);

static speed_status_t op_load(const char *dir, void **out_p) {
    return speed_model_load(dir, NULL, (speed_model_t **)out_p);
}
static void undo_load(void *m) { speed_model_destroy(m); }

static speed_status_t op_st(const char *path, void **out_p) {
    return speed_safetensors_open(path, (speed_safetensors_t **)out_p);
}
static void undo_st(void *st) { speed_safetensors_close(st); }

static speed_status_t op_config(const char *path, void **out_p) {
    static speed_model_config_t c;
    *out_p = &c;
    return speed_model_config_load(path, &c);
}
static void undo_nothing(void *p) { (void)p; }

static speed_tiny_model_params_t g_write_params;
static speed_status_t op_write(const char *dir, void **out_p) {
    *out_p = NULL;
    return speed_tiny_model_write(dir, &g_write_params);
}

/* Returns the number of allocation sites exercised. */
static int inject(const char *what, op_cb_t op, undo_cb_t undo, const char *arg, int sticky) {
    int64_t base = speed_alloc_live_count();
    for (int n = 0; n < 10000; n++) {
        void *out = NULL;
        speed_alloc_fail_after(n, sticky);
        speed_status_t s = op(arg, &out);
        int64_t injected = speed_alloc_injected_failures();
        speed_alloc_fail_after(-1, 0);
        if (s == SPEED_OK) {
            CHECK_MSG(injected == 0, "%s: n=%d succeeded despite an injected failure", what, n);
            undo(out);
            CHECK_INT_EQ(speed_alloc_live_count(), base);
            fprintf(stderr, "%s (%s): ok after %d injected failures\n", what, sticky ? "sticky" : "once", n);
            return n;
        }
        CHECK_MSG(s == SPEED_ERR_NO_MEMORY, "%s: n=%d: status %d (%s)", what, n, s, speed_status_string(s));
        CHECK_MSG(injected >= 1, "%s: n=%d failed without an injected failure", what, n);
        CHECK_MSG(speed_alloc_live_count() == base, "%s: n=%d leaked %lld allocations", what, n,
                  (long long)(speed_alloc_live_count() - base));
    }
    CHECK_MSG(0, "%s: never succeeded", what);
    return -1;
}

/* Quiet sink: fault runs log hundreds of "out of memory" lines. */
int main(void) {
    tu_tmp_init("model_fault");
    speed_tiny_model_params_t p = speed_tiny_model_default_params();
    p.n_layers = 2;
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("one"), &p), SPEED_OK);
    p.n_shards = 3;
    p.tied = true;
    CHECK_INT_EQ(speed_tiny_model_write(tu_path("three"), &p), SPEED_OK);
    speed_log_set_sink(tu_log_discard, NULL);

    for (int sticky = 0; sticky < 2; sticky++) {
        CHECK(inject("load 1 shard", op_load, undo_load, tu_path("one"), sticky) > 5);
        CHECK(inject("load 3 shards", op_load, undo_load, tu_path("three"), sticky) > 10);
        CHECK(inject("safetensors", op_st, undo_st, tu_path("one/model.safetensors"), sticky) > 2);
        CHECK(inject("config", op_config, undo_nothing, tu_path("one/config.json"), sticky) > 0);
        g_write_params = p;
        CHECK(inject("write", op_write, undo_nothing, tu_path("written"), sticky) > 3);
    }
    speed_log_set_sink(NULL, NULL);
    /* what the fault run finally wrote loads */
    speed_model_t *m = NULL;
    CHECK_INT_EQ(speed_model_load(tu_path("written"), NULL, &m), SPEED_OK);
    speed_model_destroy(m);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
