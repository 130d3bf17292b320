/* The cluster config: the shipped examples load, the pools and ports come out right, and a
 * cluster that cannot work (overlapping ports, no decode node, a replica index past the pool)
 * is refused with one clear line. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "check.h"
#include "cluster_config.h"
#include "dtype.h"
#include "kv_transport.h"
#include "log.h"
#include "test_fs.h"

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

/* The pools' compute backend: cpu by default, cpu-ref / cuda and a device from the file, the
 * environment or the command line; anything else is refused with the choices listed. */
static void test_backend(void) {
    speed_cluster_config_t c;
    speed_config_t *cfg = NULL;
    CHECK_INT_EQ(load(NULL, &c, &cfg, 0), SPEED_OK);
    CHECK_INT_EQ(c.prefill.backend, SPEED_BACKEND_CPU);
    CHECK_INT_EQ(c.decode.backend, SPEED_BACKEND_CPU);
    CHECK_INT_EQ(c.decode.device, 0);
    CHECK_STR_EQ(speed_backend_kind_name(c.decode.backend), "cpu");
    speed_config_destroy(cfg);

    const char *path = tu_path("cluster.yaml");
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs("prefill:\n  backend: cpu-ref\n  threads: 2\n"
          "decode:\n  replicas: 2\n  backend: cuda\n  device: 2\n",
          f);
    fclose(f);
    CHECK_INT_EQ(load("decode", &c, &cfg, 4, "--config", path, "--node.index", "1"), SPEED_OK);
    CHECK_INT_EQ(c.prefill.backend, SPEED_BACKEND_CPU_REF);
    CHECK_INT_EQ(c.prefill.threads, 2);
    CHECK_INT_EQ(c.decode.backend, SPEED_BACKEND_CUDA);
    CHECK_INT_EQ(c.decode.device, 2); /* replica 1 runs on device 3: the node adds its index */
    CHECK_STR_EQ(speed_backend_kind_name(c.decode.backend), "cuda");
    CHECK_STR_EQ(speed_backend_kind_name(c.prefill.backend), "cpu-ref");
    const char *origin = NULL;
    CHECK_INT_EQ(speed_config_origin(cfg, "decode.backend", NULL, &origin), SPEED_OK);
    CHECK(origin && strncmp(origin, "file:", 5) == 0);
    /* --print-config writes the choice back by name */
    char *printed = NULL;
    size_t printed_len = 0;
    FILE *mem = open_memstream(&printed, &printed_len);
    CHECK_INT_EQ(speed_config_print(cfg, mem), SPEED_OK);
    fclose(mem);
    CHECK_CONTAINS(printed, "backend: cuda");
    CHECK_CONTAINS(printed, "backend: cpu-ref");
    CHECK_CONTAINS(printed, "device: 2");
    free(printed);
    speed_config_destroy(cfg);

    /* the environment overrides the file, the command line the environment */
    setenv("SPEED_DECODE_BACKEND", "CPU", 1);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--config", path), SPEED_OK);
    CHECK_INT_EQ(c.decode.backend, SPEED_BACKEND_CPU);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 4, "--config", path, "--decode.backend", "cpu-ref"), SPEED_OK);
    CHECK_INT_EQ(c.decode.backend, SPEED_BACKEND_CPU_REF);
    speed_config_destroy(cfg);
    unsetenv("SPEED_DECODE_BACKEND");

    /* a backend that does not exist, from any source, names the choices */
    f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs("decode:\n  backend: tpu\n", f);
    fclose(f);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--config", path), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(cfg == NULL);
    CHECK_CONTAINS(speed_log_last_error(), "decode.backend: 'tpu' is not one of cpu, cpu-ref, cuda");
    CHECK_CONTAINS(speed_log_last_error(), "cluster.yaml");
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--prefill.backend", "gpu"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "prefill.backend: 'gpu' is not one of cpu, cpu-ref, cuda (from cli)");
    setenv("SPEED_PREFILL_BACKEND", "metal", 1);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 0), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "'metal' is not one of cpu, cpu-ref, cuda (from env:SPEED_PREFILL_BACKEND)");
    unsetenv("SPEED_PREFILL_BACKEND");
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--decode.device", "-1"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "decode.device");
    CHECK_STR_EQ(speed_backend_kind_name((speed_backend_kind_t)7), "?");
}

/* The control plane keys: where gRPC binds (control.listen, apart from host), the TLS files, and
 * what a daemon does with them at startup (speed_cluster_tls_load). */
static void test_control_plane(void) {
    speed_cluster_config_t c;
    speed_config_t *cfg = NULL;
    char a[64];
    CHECK_INT_EQ(load("decode", &c, &cfg, 2, "--host", "10.0.0.5"), SPEED_OK);
    CHECK(!c.tls_insecure); /* secure by default */
    CHECK_STR_EQ(c.control_listen, "127.0.0.1");
    speed_cluster_grpc_listen_addr(&c, &c.decode, 1, a, sizeof a);
    CHECK_STR_EQ(a, "127.0.0.1:8301");
    speed_cluster_grpc_addr(&c, &c.decode, 1, a, sizeof a); /* what peers dial stays host */
    CHECK_STR_EQ(a, "10.0.0.5:8301");
    CHECK(speed_cluster_control_unreachable(&c, NULL, 0));
    /* no certificate and not insecure: refused, with the way out */
    speed_tls_creds_t creds;
    CHECK_INT_EQ(speed_cluster_tls_load(&c, "speed-decode", "decode-0", &creds), SPEED_ERR_INVALID_ARGUMENT);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load("decode", &c, &cfg, 4, "--control.listen", "::", "--tls.insecure", "true"), SPEED_OK);
    speed_cluster_grpc_listen_addr(&c, &c.decode, 0, a, sizeof a);
    CHECK_STR_EQ(a, "[::]:8300");
    CHECK(!speed_cluster_control_unreachable(&c, NULL, 0));
    CHECK_INT_EQ(speed_cluster_tls_load(&c, "speed-decode", "decode-0", &creds), SPEED_OK);
    CHECK(creds.cert == NULL); /* plaintext */
    speed_config_destroy(cfg);
    /* files that do not exist: refused naming the key and the file */
    CHECK_INT_EQ(load("decode", &c, &cfg, 6, "--tls.ca", "/nonexistent/ca.crt", "--tls.cert", "/nonexistent/d.crt",
                      "--tls.key", "/nonexistent/d.key"),
                 SPEED_OK);
    CHECK(speed_cluster_tls_load(&c, "speed-decode", "decode-0", &creds) != SPEED_OK);
    CHECK(creds.cert == NULL);
    speed_config_destroy(cfg);
}

/* <pool>.discovery: "dns:NAME" or empty; anything else is refused naming the key. */
static void test_discovery_keys(void) {
    speed_cluster_config_t c;
    speed_config_t *cfg = NULL;
    CHECK_INT_EQ(load("router", &c, &cfg, 4, "--decode.discovery", "dns:speed-decode.ns.svc.cluster.local",
                      "--router.discovery_interval_ms", "250"),
                 SPEED_OK);
    CHECK_STR_EQ(speed_cluster_discovery_name(&c.decode), "speed-decode.ns.svc.cluster.local");
    CHECK_STR_EQ(speed_cluster_discovery_name(&c.prefill), "");
    CHECK_INT_EQ(c.discovery_interval_ms, 250);
    CHECK_INT_EQ(c.discovery_max_nodes, 64);
    speed_config_destroy(cfg);
    static const char *const bad[] = {"speed-decode", "dns:", "srv:x", "dns:a b", "dns:-x", "dns:a/b"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_INT_EQ(load("router", &c, &cfg, 2, "--prefill.discovery", bad[i]), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_CONTAINS(speed_log_last_error(), "prefill.discovery");
        speed_config_destroy(cfg);
    }
    CHECK(load("router", &c, &cfg, 2, "--router.discovery_max_nodes", "257") != SPEED_OK);
    speed_config_destroy(cfg);
}

/* Pools on several hosts: <pool>.hosts names the address of each replica (what the router dials,
 * what a node logs); a list that does not name every replica, or names too many, is refused. */
static void test_pool_hosts(void) {
    speed_cluster_config_t c;
    speed_config_t *cfg = NULL;
    char a[64];
    CHECK_INT_EQ(load("decode", &c, &cfg, 6, "--decode.replicas", "2", "--decode.hosts", "10.0.0.2, 10.0.0.3", "--host",
                      "10.0.0.9"),
                 SPEED_OK);
    speed_cluster_grpc_addr(&c, &c.decode, 0, a, sizeof a);
    CHECK_STR_EQ(a, "10.0.0.2:8300");
    speed_cluster_grpc_addr(&c, &c.decode, 1, a, sizeof a);
    CHECK_STR_EQ(a, "10.0.0.3:8301");
    speed_cluster_http_addr(&c, &c.decode, 1, a, sizeof a);
    CHECK_STR_EQ(a, "10.0.0.3:8401");
    speed_cluster_grpc_addr(&c, &c.prefill, 0, a, sizeof a); /* no list: host */
    CHECK_STR_EQ(a, "10.0.0.9:8100");
    CHECK(speed_cluster_control_unreachable(&c, &c.decode, 1)); /* binds loopback, dialled at 10.0.0.3 */
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load("decode", &c, &cfg, 4, "--decode.hosts", "127.0.0.1", "--host", "10.0.0.9"), SPEED_OK);
    CHECK(!speed_cluster_control_unreachable(&c, &c.decode, 0)); /* its own entry is loopback */
    CHECK(speed_cluster_control_unreachable(&c, &c.prefill, 0));
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load("router", &c, &cfg, 4, "--decode.replicas", "2", "--decode.hosts", "10.0.0.2"),
                 SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "decode.hosts names 1 addresses for 2 replicas");
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load("router", &c, &cfg, 2, "--prefill.hosts", "a,b"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "prefill.hosts");
    speed_config_destroy(cfg);
    /* the list reader: separators, empty items, past the end */
    CHECK(speed_cluster_list_item(" ,a,,b ", 1, a, sizeof a));
    CHECK_STR_EQ(a, "b");
    CHECK(!speed_cluster_list_item(" ,a,,b ", 2, a, sizeof a));
    CHECK_STR_EQ(a, "");
    CHECK(!speed_cluster_list_item(NULL, 0, a, sizeof a));
    CHECK(!speed_cluster_list_item("", 0, a, sizeof a));
}

int main(void) {
    tu_tmp_init("cluster_config");
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
        CHECK_INT_EQ(c.ucx_transport, SPEED_KV_TRANSPORT_SHM);
        CHECK_INT_EQ(c.kv_dtype, SPEED_KV_DTYPE_AUTO); /* the model's dtype */
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
    CHECK(!c.ucx_cuda_direct);                     /* cuda nodes stage KV through pinned host memory by default */
    CHECK_INT_EQ(c.kv_dtype, SPEED_KV_DTYPE_AUTO); /* the cache takes the model's dtype by default */
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load("decode", &c, &cfg, 2, "--kv.dtype", "f16"), SPEED_OK);
    CHECK_INT_EQ(c.kv_dtype, SPEED_DTYPE_F16);
    speed_config_destroy(cfg);
    cfg = NULL;
    CHECK(load("decode", &c, &cfg, 2, "--kv.dtype", "f64") != SPEED_OK);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--ucx.cuda_direct", "true"), SPEED_OK);
    CHECK(c.ucx_cuda_direct);
    speed_config_destroy(cfg);
    /* engine.batch_invariant: off unless asked for (the nodes pass it to their backends) */
    CHECK_INT_EQ(load(NULL, &c, &cfg, 0), SPEED_OK);
    CHECK(!c.batch_invariant);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--engine.batch_invariant", "true"), SPEED_OK);
    CHECK(c.batch_invariant);
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
    /* ucx.transport takes transfer/'s names and stores its speed_kv_transport_t */
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--ucx.transport", "tcp"), SPEED_OK);
    CHECK_INT_EQ(c.ucx_transport, SPEED_KV_TRANSPORT_TCP);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--ucx.transport", "rdma"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--decode.replica", "2"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "decode.replicas");
    CHECK_INT_EQ(load(NULL, &c, &cfg, 2, "--decode.grpc_port", "65535"), SPEED_OK);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load(NULL, &c, &cfg, 4, "--decode.grpc_port", "65535", "--decode.replicas", "2"),
                 SPEED_ERR_INVALID_ARGUMENT);
    test_backend();
    test_control_plane();
    test_pool_hosts();
    test_discovery_keys();
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
