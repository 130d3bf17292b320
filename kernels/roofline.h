/* Machine roofline probes: how fast this machine can read memory and multiply-add, measured
 * with the same thread count as the engine, so that benchmarks (speedctl bench, kernel
 * benchmarks) can print every result as a fraction of what the hardware allows:
 *
 *   decode (memory bound)   bytes read per token / time   vs  read_gbs
 *   prefill (compute bound) FLOPs / time                  vs  bf16_gflops (or fp32_gflops)
 *
 * Probes (all with n_threads threads started for the probe, each on its own slice):
 *   read   a streaming sum over a buffer much larger than the last-level cache (default 1 GiB;
 *          vector loads, several accumulators); bytes read / time.
 *   copy   memcpy from one half of the buffer to the other; bytes copied / time (the memory
 *          traffic is 2x that, 3x with write-allocate).
 *   fp32   a register-only loop of independent fused multiply-adds (AVX-512 or AVX2 FMA;
 *          a scalar loop without them); 2 FLOPs per lane per FMA.
 *   bf16   a register-only loop of AVX512_BF16 vdpbf16ps (per fp32 lane: 2 bf16 products and
 *          2 adds = 4 FLOPs); without AVX512_BF16 the machine has no bf16 arithmetic and
 *          bf16 matrix kernels widen to fp32, so bf16_gflops = fp32_gflops (bf16_kernel says so).
 * Every number is the median over `repetitions` timed runs (after one untimed warm-up); the
 * buffer is first touched by the thread that reads it and asked for transparent huge pages.
 *
 * ISA: each probe variant is compiled for its instruction set with a per-function target
 * attribute and chosen at run time from speed_cpu_isa_detect() (capped by isa_max), so the
 * binary runs on any x86-64 (and, with the scalar loops, elsewhere).
 *
 * Cost: about (2 + 3 * repetitions) passes over the buffer plus 2 * (repetitions + 1) *
 * compute_ms of compute: ~1-2 s with the defaults. Blocking; uses n_threads cores
 * exclusively while it runs (do not run it next to other work you are timing).
 * Thread-safety: reentrant (no global state). Errors are logged once (subsystem "engine").
 */
#ifndef SPEED_ROOFLINE_H
#define SPEED_ROOFLINE_H

#include <stddef.h>

#include "backend.h"
#include "status.h"

typedef struct {
    int n_threads;           /* 1..1024; 0 = the online cores */
    size_t read_bytes;       /* bandwidth buffer; 0 = 1 GiB; at least 1 MiB */
    int repetitions;         /* timed runs per probe (median); 0 = 5 */
    double compute_ms;       /* target length of one compute run; 0 = 50 */
    speed_cpu_isa_t isa_max; /* highest ISA the compute probes may use; SPEED_CPU_ISA_BEST = any */
} speed_roofline_params_t;

/* n_threads 0, 1 GiB, 5 repetitions, 50 ms, any ISA. */
speed_roofline_params_t speed_roofline_default_params(void);

typedef struct {
    int n_threads;
    size_t read_bytes;
    int repetitions;
    speed_cpu_isa_t isa;     /* used by the compute probes */
    double read_gbs;         /* streaming read, 1e9 bytes / s */
    double copy_gbs;         /* memcpy, 1e9 bytes copied / s */
    double fp32_gflops;      /* FMA peak, 1e9 FLOP / s */
    double bf16_gflops;      /* bf16 dot-product peak (= fp32_gflops without AVX512_BF16) */
    const char *fp32_kernel; /* static strings: "avx512 vfmadd231ps zmm", "avx2 vfmadd231ps ymm", "scalar" */
    const char *bf16_kernel; /* "avx512-bf16 vdpbf16ps zmm" or "none (bf16 widened to fp32)" */
} speed_roofline_t;

/* Runs every probe. Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (parameters out of range),
 * SPEED_ERR_NO_MEMORY (the buffer) or SPEED_ERR_INTERNAL (a thread could not be started).
 * *out is written only on success. */
speed_status_t speed_roofline_measure(const speed_roofline_params_t *params, speed_roofline_t *out);

/* The memory probes alone (read_gbs, copy_gbs; either output may be NULL). */
speed_status_t speed_roofline_bandwidth(const speed_roofline_params_t *params, double *read_gbs_p, double *copy_gbs_p);

/* The compute probes alone (either output may be NULL; *isa_p may be NULL). */
speed_status_t speed_roofline_compute(const speed_roofline_params_t *params, double *fp32_gflops_p,
                                      double *bf16_gflops_p, speed_cpu_isa_t *isa_p);

/* A read-bandwidth probe that keeps its buffer (read_bytes, 2 MiB pages, touched once), for
 * measurements interleaved with the work they judge: on a shared host whose bandwidth drifts
 * by tens of percent from one second to the next, a probe taken right after each decode step
 * is the fair roof for that step. */
typedef struct speed_roofline_probe speed_roofline_probe_t;

/* Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT, SPEED_ERR_NO_MEMORY, SPEED_ERR_INTERNAL. */
speed_status_t speed_roofline_probe_create(const speed_roofline_params_t *params, speed_roofline_probe_t **probe_p);

/* Reads the buffer `repetitions` times (after one warm-up read) on the probe's threads;
 * *read_gbs_p = bytes / median time. Returns SPEED_OK or SPEED_ERR_INTERNAL / NO_MEMORY. */
speed_status_t speed_roofline_probe_read(speed_roofline_probe_t *probe, int repetitions, double *read_gbs_p);

void speed_roofline_probe_destroy(speed_roofline_probe_t *probe); /* NULL ok */

#endif /* SPEED_ROOFLINE_H */
