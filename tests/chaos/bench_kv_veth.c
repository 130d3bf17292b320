/* KV transfer throughput across the netns bed's veth link vs loopback, UCX over tcp both ways.
 *
 * A bed of 2 hosts. Two decode-side processes each hold a receiving cache: one on host 1 (UCX
 * on eth0: the prefill side reaches it through veth, bridge, veth), one on host 0 (UCX on lo).
 * The prefill side runs on host 0 with one UCX context per path and pushes the same filled
 * cache (TinyLlama-shaped: 22 layers x 1 KiB per token, 16-token units, ~--mib MiB) into each,
 * veth and loopback alternated so both see the same machine load, each path both ways: as
 * one-sided puts (the descriptor without its nonce) and as the checked writes of its grant
 * (docs/security.md, "Checked writes"). One transfer = create + push_all + finish + wait for the
 * ack. Prints the medians of --reps, GB/s, veth/loopback and writes/puts.
 *
 *   bench_kv_veth [--mib 64] [--reps 7]
 * ctest runs it (label perf) only with SPEED_TEST_PERF=1; it needs root (else 77).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "kv_cache.h"
#include "kv_transfer.h"
#include "log.h"
#include "netns_bed.h"
#include "test_clock.h"
#include "test_stats.h"
#include "xfer_desc_wire.h"
#include "xfer_test_util.h"

#define N_LAYERS 22
#define B        16
#define MAX_REPS 64

static int g_mib = 64, g_reps = 7;

static int64_t entries(void) { return (int64_t)g_mib * 1024 * 1024 / (N_LAYERS * 1024) / B * B; }

static speed_kv_cache_t *make_cache(speed_backend_t *be, speed_kv_seq_t **seq_p) {
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = be;
    p.n_layers = N_LAYERS;
    p.split_layer = N_LAYERS;
    p.n_kv_heads = 4;
    p.model_kv_heads = 4;
    p.head_dim = 64;
    p.dtype = SPEED_DTYPE_BF16;
    p.block_tokens = B;
    p.n_blocks[0] = entries() / B;
    speed_kv_cache_t *c = NULL;
    if (speed_kv_cache_create(&p, &c) != SPEED_OK) return NULL;
    if (speed_kv_cache_seq_create(c, N_LAYERS, entries(), entries(), seq_p) != SPEED_OK) {
        speed_kv_cache_destroy(c);
        return NULL;
    }
    return c;
}

static speed_kv_xfer_ctx_t *make_ctx(const char *dev) {
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.op_timeout_ms = 120000; /* a loaded machine: slow, not failed */
    cp.tls = "tcp,self";
    cp.net_devices = dev;
    speed_kv_xfer_ctx_t *ctx = NULL;
    return speed_kv_xfer_ctx_create(&cp, &ctx) == SPEED_OK ? ctx : NULL;
}

/* A decode side inside host `host`, UCX on `dev`: sends one descriptor of its cache, then waits
 * for the parent to close the socket. */
static int decode_side(nb_bed_t *b, int host, const char *dev, int fd) {
    if (nb_host_enter(b, host) != 0) return 2;
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    speed_backend_t *be = NULL;
    if (speed_backend_create(&bp, &be) != SPEED_OK) return 2;
    speed_kv_xfer_ctx_t *ctx = make_ctx(dev);
    speed_kv_seq_t *seq = NULL;
    speed_kv_cache_t *cache = make_cache(be, &seq);
    if (!ctx || !cache || speed_kv_xfer_ctx_register_cache(ctx, cache) != SPEED_OK) return 3;
    speed_kv_desc_params_t dp = {.transport = SPEED_KV_TRANSPORT_TCP, .grant_id = "bench-w"};
    speed_kv_desc_t *d = NULL;
    uint8_t *bytes = NULL;
    size_t len = 0;
    if (speed_kv_desc_build(ctx, cache, seq, entries(), entries(), &dp, &d) != SPEED_OK ||
        xt_desc_pack(d, &bytes, &len) != SPEED_OK || xt_send(fd, bytes, len) != 0)
        return 4;
    void *end = NULL;
    size_t n = 0;
    xt_recv(fd, &end, &n, 3600000); /* until the parent is done (EOF) */
    free(end);
    speed_kv_desc_destroy(d);
    speed_free(bytes);
    speed_kv_xfer_ctx_deregister_cache(ctx, cache);
    speed_kv_cache_seq_destroy(cache, seq);
    speed_kv_cache_destroy(cache);
    speed_kv_xfer_ctx_destroy(ctx);
    speed_backend_destroy(be);
    return 0;
}

static pid_t start_side(nb_bed_t *b, int host, const char *dev, int *fd_p) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    fflush(NULL);
    pid_t pid = fork(); /* before this process touches UCX */
    if (pid == 0) {
        close(sv[0]);
        _exit(decode_side(b, host, dev, sv[1])); /* _exit: the bed is the parent's to remove */
    }
    close(sv[1]);
    *fd_p = sv[0];
    return pid;
}

/* One transfer: as puts (the descriptor without its nonce) or as checked writes (with it). */
static double time_one(speed_kv_xfer_ctx_t *ctx, speed_kv_desc_t *d, speed_kv_cache_t *cache, speed_kv_seq_t *seq,
                       bool writes) {
    d->has_nonce = writes;
    return xt_time_transfer(ctx, d, cache, seq, entries(), entries(), writes ? "bench-w" : "bench-puts");
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--mib") == 0)
            g_mib = atoi(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0)
            g_reps = atoi(argv[++i]);
    }
    if (g_mib < 1 || g_reps < 1 || g_reps > MAX_REPS) {
        fprintf(stderr, "usage: %s [--mib N >= 1] [--reps 1..%d]\n", argv[0], MAX_REPS);
        return 2;
    }
    if (argc == 1 && getenv("SPEED_TEST_PERF") == NULL && getenv("SPEEDCTL")) {
        fprintf(stderr, "SKIP: the veth benchmark runs only with SPEED_TEST_PERF=1\n");
        return 77;
    }
    xt_ucx_env();
    nb_bed_t *b = nb_create(2);
    int fd_veth = -1, fd_lo = -1;
    pid_t p_veth = start_side(b, 1, NB_HOST_DEV, &fd_veth), p_lo = start_side(b, 0, "lo", &fd_lo);
    int rc = 1;
    speed_backend_t *be = NULL;
    speed_kv_xfer_ctx_t *ctx_veth = NULL, *ctx_lo = NULL;
    speed_kv_cache_t *cache = NULL;
    speed_kv_seq_t *seq = NULL;
    speed_kv_desc_t *d_veth = NULL, *d_lo = NULL;
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    if (p_veth > 0 && p_lo > 0 && nb_host_enter(b, 0) == 0 && speed_backend_create(&bp, &be) == SPEED_OK &&
        (ctx_veth = make_ctx(NB_HOST_DEV)) && (ctx_lo = make_ctx("lo")) && (cache = make_cache(be, &seq)) &&
        speed_kv_xfer_ctx_register_cache(ctx_veth, cache) == SPEED_OK &&
        speed_kv_xfer_ctx_register_cache(ctx_lo, cache) == SPEED_OK) {
        void *bytes = NULL;
        size_t len = 0;
        if (xt_recv(fd_veth, &bytes, &len, 60000) == 0) xt_desc_unpack(bytes, len, &d_veth);
        free(bytes);
        bytes = NULL;
        if (xt_recv(fd_lo, &bytes, &len, 60000) == 0) xt_desc_unpack(bytes, len, &d_lo);
        free(bytes);
    }
    if (d_veth && d_lo) {
        speed_kv_cache_seq_set_entries(cache, seq, entries(), entries());
        for (int l = 0; l < N_LAYERS; l++)
            for (int64_t k = 0; k < entries() / B; k++) {
                void *a;
                size_t n;
                speed_kv_cache_block_addr(cache, seq, l, k, &a, &n);
                memset(a, (int)(l + k) | 1, n);
            }
        double t[4][MAX_REPS]; /* veth puts, veth writes, loopback puts, loopback writes */
        rc = 0;
        for (int r = 0; r < g_reps + 1 && !rc; r++) { /* the first round connects: untimed */
            for (int k = 0; k < 4 && !rc; k++) {
                double dt =
                    k < 2 ? time_one(ctx_veth, d_veth, cache, seq, k == 1) : time_one(ctx_lo, d_lo, cache, seq, k == 3);
                if (dt <= 0) rc = 1;
                if (r > 0) t[k][r - 1] = dt;
            }
        }
        if (!rc) {
            double total = (double)N_LAYERS * (double)entries() * 1024, m[4];
            for (int k = 0; k < 4; k++) m[k] = tu_median(t[k], g_reps);
            printf(
                "KV transfer, UCX tcp, %d layers x 1 KiB/token, %d-token units, %.1f MiB per transfer, median of %d, "
                "alternated\n",
                N_LAYERS, B, total / (1 << 20), g_reps);
            printf("%-36s %9s %9s\n", "path", "ms", "GB/s");
            const char *names[4] = {"veth (host 0 -> host 1), puts", "veth, checked writes",
                                    "loopback (host 0 -> host 0), puts", "loopback, checked writes"};
            for (int k = 0; k < 4; k++) printf("%-36s %9.2f %9.3f\n", names[k], m[k] * 1e3, total / m[k] / 1e9);
            printf("ratio veth / loopback GB/s: puts %.3f, writes %.3f\n", m[2] / m[0], m[3] / m[1]);
            printf("ratio writes / puts GB/s: veth %.3f, loopback %.3f\n", m[0] / m[1], m[2] / m[3]);
        }
    }
    if (rc) fprintf(stderr, "bench_kv_veth: set-up or a transfer failed\n");
    speed_kv_desc_destroy(d_veth);
    speed_kv_desc_destroy(d_lo);
    if (fd_veth >= 0) close(fd_veth);
    if (fd_lo >= 0) close(fd_lo);
    if (cache) {
        speed_kv_xfer_ctx_deregister_cache(ctx_veth, cache);
        speed_kv_xfer_ctx_deregister_cache(ctx_lo, cache);
        speed_kv_cache_seq_destroy(cache, seq);
        speed_kv_cache_destroy(cache);
    }
    speed_kv_xfer_ctx_destroy(ctx_veth);
    speed_kv_xfer_ctx_destroy(ctx_lo);
    speed_backend_destroy(be);
    if (p_veth > 0) waitpid(p_veth, NULL, 0);
    if (p_lo > 0) waitpid(p_lo, NULL, 0);
    nb_host_leave(b);
    nb_destroy(b);
    return rc;
}
