/* The cluster config: the shipped examples load, the pools and ports come out right, and a
 * cluster that cannot work (overlapping ports, no decode node, a replica index past the pool)
 * is refused with one clear line. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cluster_config.h"
#include "log.h"

#ifndef SPEED_SOURCE_DIR
#error "SPEED_SOURCE_DIR must be defined"
#endif

static speed_status_t load(const char *role, speed_cluster_config_t *c, speed_config_t **cfg, int n, ...) {
    char *argv[16] = {"test"};
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n && i < 15; i++) argv[1 + i] = va_arg(ap, char *);
    va_end(ap);
    return speed_cluster_config_load(1 + n, argv, role, c, cfg);
}

int main(void) {
    speed_log_configure("error");
    /* the environment of the test runner must not leak into the configs */
    unsetenv("SPEED_CONFIG");
    unsetenv("SPEED_MODEL");
    speed_cluster_config_t c;
    speed_config_t *cfg = NULL;

    const char *files[3] = {"1p1d", "2p1d", "1p2d"};
    const int64_t np[3] = {1, 2, 1}, nd[3] = {1, 1, 2};
    for (int i = 0; i < 3; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/deploy/clusters/%s.yaml", SPEED_SOURCE_DIR, files[i]);
        CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--config", path), SPEED_OK);
        CHECK_INT_EQ(c.prefill.replicas, np[i]);
        CHECK_INT_EQ(c.decode.replicas, nd[i]);
        CHECK(strcmp(c.prefill_layers, "0.75") == 0);
        CHECK_INT_EQ(c.ucx_transport, SPEED_UCX_SHM);
        CHECK_INT_EQ(c.kv_dtype, SPEED_KV_DTYPE_BF16);
        char a[64];
        speed_cluster_grpc_addr(&c, &c.decode, nd[i] - 1, a, sizeof a);
        char want[64];
        snprintf(want, sizeof want, "127.0.0.1:%lld", (long long)(8300 + nd[i] - 1));
        CHECK(strcmp(a, want) == 0);
        speed_cluster_http_addr(&c, &c.prefill, 0, a, sizeof a);
        CHECK(strcmp(a, "127.0.0.1:8200") == 0);
        speed_config_destroy(cfg);
    }

    /* defaults and command-line overrides */
    CHECK_INT_EQ(load("decode", &c, &cfg, 4, "--decode.replicas", "3", "--node.index", "2"), SPEED_OK);
    CHECK_INT_EQ(c.decode.replicas, 3);
    CHECK_INT_EQ(c.node_index, 2);
    CHECK(speed_cluster_pool(&c, "decode") == &c.decode);
    CHECK(speed_cluster_pool(&c, "router") == NULL);
    CHECK_INT_EQ(c.prefill_policy, SPEED_POLICY_LEAST_LOADED);
    speed_config_destroy(cfg);

    /* clusters that cannot work */
    CHECK_INT_EQ(load("decode", &c, &cfg, 2, "--node.index", "1"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(cfg == NULL);
    CHECK_CONTAINS(speed_log_last_error(), "node.index 1 but decode.replicas is 1");
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--prefill.grpc_port", "8300"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "overlaps");
    CHECK_INT_EQ(load(NULL, &c, &cfg, 4, "--prefill.replicas", "3", "--prefill.grpc_port", "8198"),
                 SPEED_ERR_INVALID_ARGUMENT); /* 8198..8200 runs into prefill.http_port 8200 */
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--router.port", "8400"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--decode.replicas", "0"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--ucx.transport", "rdma"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--decode.replica", "2"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "decode.replicas");
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--decode.grpc_port", "65535"), SPEED_OK);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 4, "--decode.grpc_port", "65535", "--decode.replicas", "2"),
                 SPEED_ERR_INVALID_ARGUMENT);
    return CHECK_DONE();
}
