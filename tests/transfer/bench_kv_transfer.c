/* KV transfer throughput between two processes (a forked decode node), shm and tcp, against
 * memcpy of the same bytes in the same run.
 *
 * Layout: a TinyLlama-shaped layer (4 KV heads x 64, bf16: 1 KiB per token and layer), 22 layers,
 * one pool; units of B = 4, 16, 64 tokens = 4, 16, 64 KiB; ~64 MiB per transfer (every layer
 * holds the same number of whole blocks). One transfer = create + push_all + finish + wait for
 * the ack: what a prefill node pays per request once the KV is computed. Median of --reps.
 *
 *   bench_kv_transfer [--mib 64] [--reps 7]
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "kv_cache.h"
#include "kv_transfer.h"
#include "log.h"
#include "xfer_test_util.h"

#define N_LAYERS 22
#define MAX_REPS 64

static int g_mib = 64, g_reps = 7;

static int64_t entries_for(int B) {
    int64_t tokens = (int64_t)g_mib * 1024 * 1024 / (N_LAYERS * 1024);
    return tokens / B * B;
}

static speed_kv_cache_t *make_cache(speed_backend_t *be, int B, speed_kv_seq_t **seq_p) {
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = be;
    p.n_layers = N_LAYERS;
    p.split_layer = N_LAYERS;
    p.n_kv_heads = 4;
    p.head_dim = 64;
    p.dtype = SPEED_DTYPE_BF16;
    p.block_tokens = B;
    p.n_blocks[0] = entries_for(B) / B;
    speed_kv_cache_t *c = NULL;
    if (speed_kv_cache_create(&p, &c) != SPEED_OK) return NULL;
    if (speed_kv_cache_seq_create(c, N_LAYERS, entries_for(B), entries_for(B), seq_p) != SPEED_OK) {
        speed_kv_cache_destroy(c);
        return NULL;
    }
    return c;
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The decode node: per command {B, transport} a fresh cache and its descriptor; B 0 ends. */
static int decode_node(int fd) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    speed_backend_t *be = NULL;
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    speed_kv_xfer_ctx_t *ctx = NULL;
    if (speed_backend_create(&bp, &be) != SPEED_OK || speed_kv_xfer_ctx_create(&cp, &ctx) != SPEED_OK) return 2;
    speed_kv_cache_t *cache = NULL;
    speed_kv_seq_t *seq = NULL;
    for (;;) {
        void *cmd = NULL;
        size_t n = 0;
        if (xt_recv(fd, &cmd, &n, 600000) != 0 || n != 2 * sizeof(int32_t)) break;
        int32_t c[2];
        memcpy(c, cmd, sizeof c);
        free(cmd);
        if (cache) {
            speed_kv_xfer_ctx_deregister_cache(ctx, cache);
            speed_kv_cache_seq_destroy(cache, seq);
            speed_kv_cache_destroy(cache);
            cache = NULL;
        }
        if (c[0] == 0) break;
        cache = make_cache(be, c[0], &seq);
        if (!cache || speed_kv_xfer_ctx_register_cache(ctx, cache) != SPEED_OK) return 3;
        speed_kv_desc_params_t dp = {.transport = (speed_kv_transport_t)c[1]};
        speed_kv_desc_t *d = NULL;
        uint8_t *bytes = NULL;
        size_t len = 0;
        if (speed_kv_desc_build(ctx, cache, seq, entries_for(c[0]), entries_for(c[0]), &dp, &d) != SPEED_OK ||
            speed_kv_desc_encode(d, &bytes, &len) != SPEED_OK || xt_send(fd, bytes, len) != 0)
            return 4;
        speed_kv_desc_destroy(d);
        speed_free(bytes);
    }
    speed_kv_xfer_ctx_destroy(ctx);
    speed_backend_destroy(be);
    return 0;
}

int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--mib") == 0) g_mib = atoi(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0) g_reps = atoi(argv[++i]);
    }
    if (g_mib < 1 || g_reps < 1 || g_reps > MAX_REPS) {
        fprintf(stderr, "usage: %s [--mib N >= 1] [--reps 1..%d]\n", argv[0], MAX_REPS);
        return 2;
    }
    xt_ucx_env();
    if (getenv("SPEED_LOG")) speed_log_configure(getenv("SPEED_LOG")); /* net=debug prints the UCX lanes */
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 1;
    fflush(NULL);
    pid_t pid = fork(); /* before this process touches UCX */
    if (pid == 0) {
        close(sv[0]);
        _exit(decode_node(sv[1]));
    }
    close(sv[1]);
    int fd = sv[0];

    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    speed_backend_t *be = NULL;
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    speed_kv_xfer_ctx_t *ctx = NULL;
    if (speed_backend_create(&bp, &be) != SPEED_OK || speed_kv_xfer_ctx_create(&cp, &ctx) != SPEED_OK) return 1;

    printf("KV transfer, 2 processes, %d layers x 1 KiB/token (4 kv heads x 64, bf16), ~%d MiB per transfer, "
           "median of %d\n", N_LAYERS, g_mib, g_reps);
    printf("%-5s %8s %10s %10s %11s %11s %9s %9s\n", "xport", "unit", "MiB", "ms", "GB/s", "memcpy GB/s", "ratio",
           "puts");
    const int units[] = {4, 16, 64};
    int rc = 0;
    for (int u = 0; u < 3 && !rc; u++) {
        int B = units[u];
        speed_kv_seq_t *seq = NULL;
        speed_kv_cache_t *cache = make_cache(be, B, &seq);
        if (!cache || speed_kv_xfer_ctx_register_cache(ctx, cache) != SPEED_OK) {
            rc = 1;
            break;
        }
        speed_kv_cache_seq_set_entries(cache, seq, entries_for(B), entries_for(B));
        for (int l = 0; l < N_LAYERS; l++) /* nonzero bytes */
            for (int64_t b = 0; b < entries_for(B) / B; b++) {
                void *a;
                size_t n;
                speed_kv_cache_block_addr(cache, seq, l, b, &a, &n);
                memset(a, (int)(l + b) | 1, n);
            }
        /* memcpy of the same units into another buffer, unit by unit */
        size_t total = (size_t)N_LAYERS * (size_t)entries_for(B) * 1024;
        char *dst = malloc(total);
        memset(dst, 0, total);
        double mc[MAX_REPS];
        for (int r = 0; r < g_reps; r++) {
            double t0 = seconds();
            char *o = dst;
            for (int l = 0; l < N_LAYERS; l++)
                for (int64_t b = 0; b < entries_for(B) / B; b++) {
                    void *a;
                    size_t n;
                    speed_kv_cache_block_addr(cache, seq, l, b, &a, &n);
                    memcpy(o, a, n);
                    o += n;
                }
            mc[r] = seconds() - t0;
        }
        volatile char sink = dst[total / 2];
        (void)sink;
        free(dst);
        double mc_med = median(mc, g_reps);
        for (int t = 0; t < 2 && !rc; t++) {
            int32_t cmd[2] = {B, t};
            void *bytes = NULL;
            size_t len = 0;
            speed_kv_desc_t *d = NULL;
            if (xt_send(fd, cmd, sizeof cmd) != 0 || xt_recv(fd, &bytes, &len, 60000) != 0 ||
                speed_kv_desc_decode(bytes, len, &d) != SPEED_OK) {
                rc = 1;
                free(bytes);
                break;
            }
            free(bytes);
            double tt[MAX_REPS];
            uint64_t n_puts = 0;
            for (int r = 0; r < g_reps + 1 && !rc; r++) { /* the first run connects: not timed */
                double t0 = seconds();
                speed_kv_xfer_t *x = NULL;
                speed_status_t st = speed_kv_xfer_create(ctx, d, cache, seq, entries_for(B), entries_for(B), NULL, &x);
                if (st == SPEED_OK) st = speed_kv_xfer_push_all(x);
                if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
                if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
                double dt = seconds() - t0;
                if (st != SPEED_OK) {
                    fprintf(stderr, "transfer failed: %s\n", speed_status_string(st));
                    rc = 1;
                }
                speed_kv_xfer_info_t info;
                if (x) speed_kv_xfer_info(x, &info);
                n_puts = x ? info.n_puts : 0;
                speed_kv_xfer_destroy(x);
                if (r > 0) tt[r - 1] = dt;
            }
            speed_kv_desc_destroy(d);
            if (rc) break;
            double med = median(tt, g_reps);
            printf("%-5s %6d K %10.1f %10.2f %11.2f %11.2f %9.3f %9llu\n", t ? "tcp" : "shm", B, total / 1048576.0,
                   med * 1e3, total / med / 1e9, total / mc_med / 1e9, mc_med / med, (unsigned long long)n_puts);
            fflush(stdout);
        }
        speed_kv_xfer_ctx_deregister_cache(ctx, cache);
        speed_kv_cache_seq_destroy(cache, seq);
        speed_kv_cache_destroy(cache);
    }
    int32_t stop[2] = {0, 0};
    xt_send(fd, stop, sizeof stop);
    int status = 0;
    waitpid(pid, &status, 0);
    close(fd);
    speed_kv_xfer_ctx_destroy(ctx);
    speed_backend_destroy(be);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "decode node exited with 0x%x\n", status);
        rc = 1;
    }
    printf("ratio = memcpy time / transfer time (1.0 = as fast as a local copy)\n");
    return rc;
}
