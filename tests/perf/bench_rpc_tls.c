/* The cost of mutual TLS on the control plane: the latency of a small unary call (a 64-byte
 * request, a 64-byte reply, the size class of Reserve/Cancel/Health) over a plaintext channel
 * and over an mTLS one, to two servers in this process on loopback.
 *
 *   bench_rpc_tls [--calls N]      (default 5000; ctest runs --calls 300)
 *
 * Calls alternate plaintext / mTLS, one of each per round, after a warm-up that opens both
 * connections (the handshake is paid once per channel, not per call, and is timed apart: a
 * fresh channel's first call). Printed: the median and p90 of each, the ratio of the medians and
 * the median difference per round. A shared machine drifts; alternating keeps the drift out of
 * the comparison. */
#include <stdlib.h>

#include "alloc.h"
#include "check.h"
#include "log.h"
#include "rpc.h"
#include "test_clock.h"
#include "test_fs.h"
#include "test_stats.h"
#include "tls_test_util.h"

#define ECHO "/b.Echo/Unary"

static void on_echo(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    (void)user;
    speed_rpc_call_reply(call, req, len);
}

static speed_rpc_server_t *server(const speed_rpc_tls_t *tls, char *target, size_t size) {
    speed_rpc_server_params_t p = speed_rpc_server_default_params();
    p.tls = tls;
    speed_rpc_server_t *srv = NULL;
    CHECK_INT_EQ(speed_rpc_server_create(&p, &srv), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_add_method(srv, ECHO, SPEED_RPC_UNARY, on_echo, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_allow(srv, ECHO, "router"), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_start(srv), SPEED_OK);
    snprintf(target, size, "127.0.0.1:%d", speed_rpc_server_port(srv));
    return srv;
}

static double call_us(speed_rpc_channel_t *ch) {
    uint8_t req[64] = {0};
    speed_rpc_reply_t r;
    double t0 = now_s();
    speed_status_t st = speed_rpc_unary(ch, ECHO, req, sizeof req, 10000, &r);
    double us = (now_s() - t0) * 1e6;
    CHECK_INT_EQ(st, SPEED_OK);
    CHECK_INT_EQ(r.len, sizeof req);
    speed_rpc_reply_cleanup(&r);
    return us;
}

static double p90(double *v, int n) {
    tu_sort_doubles(v, (size_t)n);
    return v[(int)(0.9 * (n - 1))];
}

int main(int argc, char **argv) {
    int n = 5000;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--calls") == 0 && i + 1 < argc) n = atoi(argv[++i]);
    if (n < 10) n = 10;
    tu_tmp_init("bench-rpc-tls");
    speed_log_configure("warn");
    tt_certs_write(tu_path("certs"));
    speed_tls_creds_t node, router;
    tt_creds_load(tu_path("certs"), "decode-0", &node);
    tt_creds_load(tu_path("certs"), "router", &router);
    speed_rpc_tls_t t_node = tt_rpc_tls(&node), t_router = tt_rpc_tls(&router);

    char plain_target[64], tls_target[64];
    speed_rpc_server_t *plain_srv = server(NULL, plain_target, sizeof plain_target);
    speed_rpc_server_t *tls_srv = server(&t_node, tls_target, sizeof tls_target);

    /* the handshake: the first call of fresh channels, a few times */
    enum { N_CONNECT = 20 };
    double first_plain[N_CONNECT], first_tls[N_CONNECT];
    for (int k = 0; k < N_CONNECT; k++) {
        speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
        speed_rpc_channel_t *a = NULL, *b = NULL;
        CHECK_INT_EQ(speed_rpc_channel_create(plain_target, &cp, &a), SPEED_OK);
        first_plain[k] = call_us(a);
        cp.tls = &t_router;
        CHECK_INT_EQ(speed_rpc_channel_create(tls_target, &cp, &b), SPEED_OK);
        first_tls[k] = call_us(b);
        speed_rpc_channel_destroy(a);
        speed_rpc_channel_destroy(b);
    }

    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    speed_rpc_channel_t *plain = NULL, *tls = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(plain_target, &cp, &plain), SPEED_OK);
    cp.tls = &t_router;
    CHECK_INT_EQ(speed_rpc_channel_create(tls_target, &cp, &tls), SPEED_OK);
    for (int k = 0; k < 50; k++) {
        call_us(plain);
        call_us(tls);
    }
    double *a = calloc((size_t)n, sizeof *a), *b = calloc((size_t)n, sizeof *b), *d = calloc((size_t)n, sizeof *d);
    for (int k = 0; k < n; k++) {
        if (k % 2) { /* alternate which goes first, too */
            a[k] = call_us(plain);
            b[k] = call_us(tls);
        } else {
            b[k] = call_us(tls);
            a[k] = call_us(plain);
        }
        d[k] = b[k] - a[k];
    }
    double ma = tu_median(a, n), mb = tu_median(b, n), md = tu_median(d, n);
    double pa = p90(a, n), pb = p90(b, n);
    double ca = tu_median(first_plain, N_CONNECT), cb = tu_median(first_tls, N_CONNECT);
    printf("unary call, 64 B each way, %d calls each, alternated, loopback:\n", n);
    printf("  plaintext  median %7.1f us   p90 %7.1f us\n", ma, pa);
    printf("  mTLS       median %7.1f us   p90 %7.1f us\n", mb, pb);
    printf("  mTLS / plaintext (medians) %.2fx; median added per call %+.1f us\n", mb / ma, md);
    printf("  first call on a new channel (connect + handshake), median of %d: plaintext %.0f us, mTLS %.0f us\n",
           N_CONNECT, ca, cb);
    free(a);
    free(b);
    free(d);
    speed_rpc_channel_destroy(plain);
    speed_rpc_channel_destroy(tls);
    speed_rpc_server_destroy(plain_srv);
    speed_rpc_server_destroy(tls_srv);
    speed_tls_creds_cleanup(&router);
    speed_tls_creds_cleanup(&node);
    return CHECK_DONE();
}
