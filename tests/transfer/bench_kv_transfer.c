/* KV transfer throughput between two processes (a forked decode node), shm and tcp, against
 * memcpy of the same bytes in the same run.
 *
 * Layout: a TinyLlama-shaped layer (4 KV heads x 64, bf16: 1 KiB per token and layer), 22 layers,
 * one pool; units of B = 4, 16, 64 tokens = 4, 16, 64 KiB; ~64 MiB per transfer (every layer
 * holds the same number of whole blocks). One transfer = create + push_all + finish + wait for
 * the ack: what a prefill node pays per request once the KV is computed. Median of --reps.
 *
 * Then the strided path of tensor-parallel resharding (TP 2 -> 1): a sender holding heads [0, 2)
 * of the 4 pushes into the same receiver descriptor (heads [0, 4)): per token slot one 256-byte
 * run of K and one of V instead of one put per unit; half the bytes. Printed as GB/s of the
 * bytes each put, and the ratio strided / whole-unit GB/s.
 *
 * Then integrity mode (kv.integrity: an HMAC-SHA-256 tag per layer, computed by the sender over
 * its blocks at finish and verified by the receiver over what it received before the ack):
 * 16-token units, plain and integrity transfers alternated in one run (so both see the same
 * machine load), medians and the ratio integrity / plain GB/s. Both go as checked writes (their
 * descriptors carry grants).
 *
 * Then checked writes against one-sided puts (docs/security.md, "late writes"): the same
 * receiver cache and descriptor, once with its grant (the KV goes as active messages the decode
 * side checks against the grant and copies) and once without the nonce (UCX puts, the path
 * before), alternated, for units of 4, 16 and 64 tokens, medians and the ratio writes / puts.
 *
 * The first two tables are descriptors without grants: one-sided puts.
 *
 *   bench_kv_transfer [--mib 64] [--reps 7] [--writes-only]
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "kv_cache.h"
#include "kv_transfer.h"
#include "log.h"
#include "xfer_desc_wire.h"
#include "xfer_test_util.h"
#include "test_clock.h"
#include "test_stats.h"

#define N_LAYERS 22
#define MAX_REPS 64

static int g_mib = 64, g_reps = 7;

static int64_t entries_for(int B) {
    int64_t tokens = (int64_t)g_mib * 1024 * 1024 / (N_LAYERS * 1024);
    return tokens / B * B;
}

/* A cache holding heads [head_begin, head_begin + n_heads) of the model's 4. */
static speed_kv_cache_t *make_cache(speed_backend_t *be, int B, int head_begin, int n_heads, speed_kv_seq_t **seq_p) {
    speed_kv_cache_params_t p = speed_kv_cache_default_params();
    p.backend = be;
    p.n_layers = N_LAYERS;
    p.split_layer = N_LAYERS;
    p.n_kv_heads = n_heads;
    p.head_begin = head_begin;
    p.model_kv_heads = 4;
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

/* The decode node: per command {B, transport, mode} a fresh cache and its descriptor: mode 0 no
 * grant, 1 a grant "bench-int" in integrity mode, 2 a grant "bench-w", 3 both (two descriptors of
 * the cache: "bench-w", then "bench-int"); B 0 ends. */
static int decode_node(int fd) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CPU_REF;
    speed_backend_t *be = NULL;
    speed_kv_xfer_ctx_params_t cp = speed_kv_xfer_ctx_default_params();
    cp.op_timeout_ms = 120000; /* a loaded machine: slow, not failed */
    speed_kv_xfer_ctx_t *ctx = NULL;
    if (speed_backend_create(&bp, &be) != SPEED_OK || speed_kv_xfer_ctx_create(&cp, &ctx) != SPEED_OK) return 2;
    speed_kv_cache_t *cache = NULL;
    speed_kv_seq_t *seq = NULL;
    for (;;) {
        void *cmd = NULL;
        size_t n = 0;
        if (xt_recv(fd, &cmd, &n, 600000) != 0 || n != 3 * sizeof(int32_t)) break;
        int32_t c[3];
        memcpy(c, cmd, sizeof c);
        free(cmd);
        if (cache) {
            speed_kv_xfer_ctx_deregister_cache(ctx, cache);
            speed_kv_cache_seq_destroy(cache, seq);
            speed_kv_cache_destroy(cache);
            cache = NULL;
        }
        if (c[0] == 0) break;
        cache = make_cache(be, c[0], 0, 4, &seq);
        if (!cache || speed_kv_xfer_ctx_register_cache(ctx, cache) != SPEED_OK) return 3;
        speed_kv_xfer_ctx_grant_drop(ctx, "bench-int");
        speed_kv_xfer_ctx_grant_drop(ctx, "bench-w");
        for (int k = 0; k < (c[2] == 3 ? 2 : 1); k++) {
            speed_kv_desc_params_t dp = {.transport = (speed_kv_transport_t)c[1]};
            if (c[2] == 1 || (c[2] == 3 && k == 1)) {
                dp.grant_id = "bench-int";
                dp.integrity = true;
            } else if (c[2] == 2 || c[2] == 3) {
                dp.grant_id = "bench-w";
            }
            speed_kv_desc_t *d = NULL;
            uint8_t *bytes = NULL;
            size_t len = 0;
            if (speed_kv_desc_build(ctx, cache, seq, entries_for(c[0]), entries_for(c[0]), &dp, &d) != SPEED_OK ||
                xt_desc_pack(d, &bytes, &len) != SPEED_OK || xt_send(fd, bytes, len) != 0)
                return 4;
            speed_kv_desc_destroy(d);
            speed_free(bytes);
        }
    }
    speed_kv_xfer_ctx_destroy(ctx);
    speed_backend_destroy(be);
    return 0;
}

/* Median seconds of g_reps transfers (after one untimed run that connects); 0 on failure. */
static double time_one(speed_kv_xfer_ctx_t *ctx, const speed_kv_desc_t *d, speed_kv_cache_t *cache, speed_kv_seq_t *seq,
                       int64_t n, const char *id) {
    return xt_time_transfer(ctx, d, cache, seq, n, n, id);
}

static double time_xfers(speed_kv_xfer_ctx_t *ctx, const speed_kv_desc_t *d, speed_kv_cache_t *cache,
                         speed_kv_seq_t *seq, int64_t n, uint64_t *n_puts_p) {
    double tt[MAX_REPS];
    for (int r = 0; r < g_reps + 1; r++) {
        double t0 = now_s();
        speed_kv_xfer_t *x = NULL;
        speed_status_t st = speed_kv_xfer_create(ctx, d, cache, seq, n, n, NULL, &x);
        if (st == SPEED_OK) st = speed_kv_xfer_push_all(x);
        if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
        if (st == SPEED_OK) st = speed_kv_xfer_wait(x, -1);
        double dt = now_s() - t0;
        speed_kv_xfer_info_t info;
        if (x) speed_kv_xfer_info(x, &info);
        *n_puts_p = x ? info.n_puts : 0;
        speed_kv_xfer_destroy(x);
        if (st != SPEED_OK) {
            fprintf(stderr, "transfer failed: %s\n", speed_status_string(st));
            return 0;
        }
        if (r > 0) tt[r - 1] = dt;
    }
    return tu_median(tt, g_reps);
}

/* Fills every unit of the sequence with nonzero bytes. */
static void fill_units(speed_kv_cache_t *cache, speed_kv_seq_t *seq, int B) {
    for (int l = 0; l < N_LAYERS; l++)
        for (int64_t b = 0; b < entries_for(B) / B; b++) {
            void *a;
            size_t n;
            speed_kv_cache_block_addr(cache, seq, l, b, &a, &n);
            memset(a, (int)(l + b) | 1, n);
        }
}

/* The next descriptor the decode node sends; NULL on failure. */
static speed_kv_desc_t *recv_desc(int fd) {
    void *bytes = NULL;
    size_t len = 0;
    speed_kv_desc_t *d = NULL;
    if (xt_recv(fd, &bytes, &len, 60000) != 0 || xt_desc_unpack(bytes, len, &d) != SPEED_OK) d = NULL;
    free(bytes);
    return d;
}

/* Asks the decode node for {B, transport, mode} (see decode_node); 0 on success. */
static int ask(int fd, int B, int t, int mode) {
    int32_t cmd[3] = {B, t, mode};
    return xt_send(fd, cmd, sizeof cmd) != 0;
}

/* Integrity mode against plain transfers, alternated, 16-token units. The decode node keeps one
 * cache at a time, so each side of a pair gets a fresh descriptor into the same cache shape. */
static int bench_integrity(int fd, speed_kv_xfer_ctx_t *ctx, speed_backend_t *be) {
    const int B = 16;
    speed_kv_seq_t *seq = NULL;
    speed_kv_cache_t *cache = make_cache(be, B, 0, 4, &seq);
    if (!cache || speed_kv_xfer_ctx_register_cache(ctx, cache) != SPEED_OK) return 1;
    speed_kv_cache_seq_set_entries(cache, seq, entries_for(B), entries_for(B));
    fill_units(cache, seq, B);
    size_t total = (size_t)N_LAYERS * (size_t)entries_for(B) * 1024;
    printf("\nintegrity mode (HMAC-SHA-256 tag per layer, sender at finish + receiver before the ack), %d K units, "
           "plain and integrity alternated, median of %d\n%-5s %11s %11s %11s %11s %9s\n",
           B, g_reps, "xport", "plain ms", "integ ms", "plain GB/s", "integ GB/s", "ratio");
    int rc = 0;
    for (int t = 0; t < 2 && !rc; t++) {
        /* Two descriptors of the decode node's cache, each with its grant: "bench-w" plain,
         * "bench-int" in integrity mode. Both go as checked writes. */
        speed_kv_desc_t *dw = ask(fd, B, t, 3) ? NULL : recv_desc(fd), *d = dw ? recv_desc(fd) : NULL;
        if (!dw || !d) {
            speed_kv_desc_destroy(dw);
            rc = 1;
            break;
        }
        double plain[MAX_REPS], integ[MAX_REPS];
        for (int r = 0; r < g_reps + 1 && !rc; r++) {
            double a = time_one(ctx, dw, cache, seq, entries_for(B), "bench-w");
            double b = time_one(ctx, d, cache, seq, entries_for(B), "bench-int");
            if (a <= 0 || b <= 0) rc = 1;
            if (r > 0) {
                plain[r - 1] = a;
                integ[r - 1] = b;
            }
        }
        if (!rc) {
            double mp = tu_median(plain, g_reps), mi = tu_median(integ, g_reps);
            printf("%-5s %11.2f %11.2f %11.2f %11.2f %9.3f\n", t ? "tcp" : "shm", mp * 1e3, mi * 1e3, total / mp / 1e9,
                   total / mi / 1e9, mp / mi);
        }
        speed_kv_desc_destroy(d);
        speed_kv_desc_destroy(dw);
    }
    printf("ratio = integrity GB/s / plain GB/s\n");
    speed_kv_xfer_ctx_deregister_cache(ctx, cache);
    speed_kv_cache_seq_destroy(cache, seq);
    speed_kv_cache_destroy(cache);
    return rc;
}

/* Checked writes against one-sided puts, alternated: the same descriptor (with the grant
 * "bench-w") once as it is (writes) and once without its nonce (puts, no grant involved). */
static int bench_writes(int fd, speed_kv_xfer_ctx_t *ctx, speed_backend_t *be) {
    printf("\nchecked writes (active messages the receiver checks against the grant and copies) against one-sided "
           "puts, alternated, median of %d\n%-5s %8s %11s %11s %11s %11s %9s\n",
           g_reps, "xport", "unit", "puts ms", "writes ms", "puts GB/s", "writes GB/s", "ratio");
    const int units[] = {4, 16, 64};
    int rc = 0;
    for (int u = 0; u < 3 && !rc; u++) {
        const int B = units[u];
        speed_kv_seq_t *seq = NULL;
        speed_kv_cache_t *cache = make_cache(be, B, 0, 4, &seq);
        if (!cache || speed_kv_xfer_ctx_register_cache(ctx, cache) != SPEED_OK) return 1;
        speed_kv_cache_seq_set_entries(cache, seq, entries_for(B), entries_for(B));
        fill_units(cache, seq, B);
        size_t total = (size_t)N_LAYERS * (size_t)entries_for(B) * 1024;
        for (int t = 0; t < 2 && !rc; t++) {
            speed_kv_desc_t *d = ask(fd, B, t, 2) ? NULL : recv_desc(fd);
            if (!d) {
                rc = 1;
                break;
            }
            double puts[MAX_REPS], writes[MAX_REPS];
            for (int r = 0; r < g_reps + 1 && !rc; r++) {
                d->has_nonce = false;
                double a = time_one(ctx, d, cache, seq, entries_for(B), "bench-puts");
                d->has_nonce = true;
                double b = time_one(ctx, d, cache, seq, entries_for(B), "bench-w");
                if (a <= 0 || b <= 0) rc = 1;
                if (r > 0) {
                    puts[r - 1] = a;
                    writes[r - 1] = b;
                }
            }
            if (!rc) {
                double mp = tu_median(puts, g_reps), mw = tu_median(writes, g_reps);
                printf("%-5s %6d K %11.2f %11.2f %11.2f %11.2f %9.3f\n", t ? "tcp" : "shm", B, mp * 1e3, mw * 1e3,
                       total / mp / 1e9, total / mw / 1e9, mp / mw);
                fflush(stdout);
            }
            speed_kv_desc_destroy(d);
        }
        speed_kv_xfer_ctx_deregister_cache(ctx, cache);
        speed_kv_cache_seq_destroy(cache, seq);
        speed_kv_cache_destroy(cache);
    }
    printf("ratio = writes GB/s / puts GB/s\n");
    return rc;
}

int main(int argc, char **argv) {
    bool writes_only = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--mib") == 0 && i + 1 < argc)
            g_mib = atoi(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc)
            g_reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--writes-only") == 0)
            writes_only = true;
        else
            g_mib = 0; /* the usage below */
    }
    if (g_mib < 1 || g_reps < 1 || g_reps > MAX_REPS) {
        fprintf(stderr, "usage: %s [--mib N >= 1] [--reps 1..%d] [--writes-only]\n", argv[0], MAX_REPS);
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
    cp.op_timeout_ms = 120000; /* a loaded machine: slow, not failed */
    speed_kv_xfer_ctx_t *ctx = NULL;
    if (speed_backend_create(&bp, &be) != SPEED_OK || speed_kv_xfer_ctx_create(&cp, &ctx) != SPEED_OK) return 1;

    printf("KV transfer, 2 processes, %d layers x 1 KiB/token (4 kv heads x 64, bf16), ~%d MiB per transfer, "
           "median of %d\n",
           N_LAYERS, g_mib, g_reps);
    printf("%-5s %8s %10s %10s %11s %11s %9s %9s\n", "xport", "unit", "MiB", "ms", "GB/s", "memcpy GB/s", "ratio",
           "puts");
    const int units[] = {4, 16, 64};
    double whole_gbs[3][2] = {{0}}, strided_gbs[3][2] = {{0}}, strided_ms[3][2] = {{0}};
    uint64_t strided_puts[3][2] = {{0}};
    int rc = 0;
    for (int u = 0; u < 3 && !rc && !writes_only; u++) {
        int B = units[u];
        speed_kv_seq_t *seq = NULL, *half_seq = NULL;
        speed_kv_cache_t *cache = make_cache(be, B, 0, 4, &seq), *half = make_cache(be, B, 0, 2, &half_seq);
        if (!cache || !half || speed_kv_xfer_ctx_register_cache(ctx, cache) != SPEED_OK ||
            speed_kv_xfer_ctx_register_cache(ctx, half) != SPEED_OK) {
            rc = 1;
            break;
        }
        speed_kv_cache_seq_set_entries(cache, seq, entries_for(B), entries_for(B));
        speed_kv_cache_seq_set_entries(half, half_seq, entries_for(B), entries_for(B));
        fill_units(cache, seq, B);
        fill_units(half, half_seq, B);
        /* memcpy of the same units into another buffer, unit by unit */
        size_t total = (size_t)N_LAYERS * (size_t)entries_for(B) * 1024;
        char *dst = malloc(total);
        memset(dst, 0, total);
        double mc[MAX_REPS];
        for (int r = 0; r < g_reps; r++) {
            double t0 = now_s();
            char *o = dst;
            for (int l = 0; l < N_LAYERS; l++)
                for (int64_t b = 0; b < entries_for(B) / B; b++) {
                    void *a;
                    size_t n;
                    speed_kv_cache_block_addr(cache, seq, l, b, &a, &n);
                    memcpy(o, a, n);
                    o += n;
                }
            mc[r] = now_s() - t0;
        }
        volatile char sink = dst[total / 2];
        (void)sink;
        free(dst);
        double mc_med = tu_median(mc, g_reps);
        for (int t = 0; t < 2 && !rc; t++) {
            int32_t cmd[3] = {B, t, 0};
            void *bytes = NULL;
            size_t len = 0;
            speed_kv_desc_t *d = NULL;
            if (xt_send(fd, cmd, sizeof cmd) != 0 || xt_recv(fd, &bytes, &len, 60000) != 0 ||
                xt_desc_unpack(bytes, len, &d) != SPEED_OK) {
                rc = 1;
                free(bytes);
                break;
            }
            free(bytes);
            uint64_t n_puts = 0;
            double med = time_xfers(ctx, d, cache, seq, entries_for(B), &n_puts);
            /* the same receiver fed by a TP 2 rank: heads [0, 2) of [0, 4) */
            double med2 = med > 0 ? time_xfers(ctx, d, half, half_seq, entries_for(B), &strided_puts[u][t]) : 0;
            speed_kv_desc_destroy(d);
            if (med <= 0 || med2 <= 0) {
                rc = 1;
                break;
            }
            whole_gbs[u][t] = total / med / 1e9;
            strided_gbs[u][t] = total / 2 / med2 / 1e9;
            strided_ms[u][t] = med2 * 1e3;
            printf("%-5s %6d K %10.1f %10.2f %11.2f %11.2f %9.3f %9llu\n", t ? "tcp" : "shm", B, total / 1048576.0,
                   med * 1e3, total / med / 1e9, total / mc_med / 1e9, mc_med / med, (unsigned long long)n_puts);
            fflush(stdout);
        }
        speed_kv_xfer_ctx_deregister_cache(ctx, cache);
        speed_kv_xfer_ctx_deregister_cache(ctx, half);
        speed_kv_cache_seq_destroy(cache, seq);
        speed_kv_cache_seq_destroy(half, half_seq);
        speed_kv_cache_destroy(cache);
        speed_kv_cache_destroy(half);
    }
    if (!rc && !writes_only) {
        printf("\nTP 2 -> 1 (sender heads [0, 2) of [0, 4): per slot one 256-byte K run and one V run), half the "
               "bytes\n%-5s %8s %10s %11s %11s %9s %9s\n",
               "xport", "unit", "ms", "GB/s", "whole GB/s", "ratio", "puts");
        for (int u = 0; u < 3; u++)
            for (int t = 0; t < 2; t++)
                printf("%-5s %6d K %10.2f %11.2f %11.2f %9.3f %9llu\n", t ? "tcp" : "shm", units[u], strided_ms[u][t],
                       strided_gbs[u][t], whole_gbs[u][t], strided_gbs[u][t] / whole_gbs[u][t],
                       (unsigned long long)strided_puts[u][t]);
        printf("ratio = strided GB/s / whole-unit GB/s (bytes each put)\n");
    }
    if (!rc && !writes_only) rc = bench_integrity(fd, ctx, be);
    if (!rc) rc = bench_writes(fd, ctx, be);
    int32_t stop[3] = {0, 0, 0};
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
