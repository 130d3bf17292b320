/* The machine probes that speedctl bench prints (kernels/roofline.h): positive, plausible
 * numbers on 1 and 2 threads and with the ISA capped, bad parameters rejected. Small buffer and
 * short compute runs: this checks the probes work, not how fast the machine is. */
#include "alloc.h"
#include "check.h"
#include "test_log.h"
#include "log.h"
#include "roofline.h"

static speed_roofline_params_t small(int n_threads, speed_cpu_isa_t cap) {
    speed_roofline_params_t p = speed_roofline_default_params();
    p.n_threads = n_threads;
    p.read_bytes = (size_t)64 << 20;
    p.repetitions = 3;
    p.compute_ms = 5.0;
    p.isa_max = cap;
    return p;
}

int main(void) {
    int64_t live = speed_alloc_live_count();
    speed_cpu_isa_t best = speed_cpu_isa_detect();
    const speed_cpu_isa_t caps[] = {SPEED_CPU_ISA_BEST, SPEED_CPU_ISA_AVX2, SPEED_CPU_ISA_SCALAR};
    for (int t = 1; t <= 2; t++) {
        for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
            if (caps[c] != SPEED_CPU_ISA_BEST && caps[c] > best) continue;
            speed_roofline_params_t p = small(t, caps[c]);
            speed_roofline_t r;
            speed_status_t st = speed_roofline_measure(&p, &r);
            CHECK_MSG(st == SPEED_OK, "measure: %s", speed_log_last_error());
            if (st != SPEED_OK) continue;
            fprintf(stderr,
                    "threads %d isa %-12s read %7.2f GB/s copy %7.2f GB/s fp32 %8.1f GFLOP/s (%s) "
                    "bf16 %8.1f GFLOP/s (%s)\n",
                    r.n_threads, speed_cpu_isa_name(r.isa), r.read_gbs, r.copy_gbs, r.fp32_gflops, r.fp32_kernel,
                    r.bf16_gflops, r.bf16_kernel);
            CHECK_INT_EQ(r.n_threads, t);
            CHECK_INT_EQ(r.read_bytes, (size_t)64 << 20);
            CHECK(r.isa <= best && (caps[c] == SPEED_CPU_ISA_BEST || r.isa <= caps[c]));
            /* plausible: from a slow VM core to a large server socket */
            CHECK_MSG(r.read_gbs > 0.3 && r.read_gbs < 5000, "read %g GB/s", r.read_gbs);
            CHECK_MSG(r.copy_gbs > 0.1 && r.copy_gbs < 5000, "copy %g GB/s", r.copy_gbs);
            CHECK_MSG(r.fp32_gflops > 0.1 && r.fp32_gflops < 1e6, "fp32 %g GFLOP/s", r.fp32_gflops);
            CHECK_MSG(r.bf16_gflops > 0.1 && r.bf16_gflops < 1e6, "bf16 %g GFLOP/s", r.bf16_gflops);
            if (r.isa >= SPEED_CPU_ISA_AVX512_BF16) {
                /* its own probe (a neighbour on the shared host can halve one timing, so the
                 * bf16-vs-fp32 ratio is the benchmark's business, not this test's) */
                CHECK_CONTAINS(r.bf16_kernel, "vdpbf16ps");
            } else {
                CHECK(r.bf16_gflops == r.fp32_gflops);
                CHECK_CONTAINS(r.bf16_kernel, "none");
            }
            if (r.isa >= SPEED_CPU_ISA_AVX2) /* at least 8 lanes x 2 FLOPs at a few hundred MHz */
                CHECK_MSG(r.fp32_gflops > 2.0, "fp32 %g GFLOP/s with %s", r.fp32_gflops, r.fp32_kernel);
        }
    }
    /* the parts alone */
    speed_roofline_params_t p = small(1, SPEED_CPU_ISA_BEST);
    double rd = 0, fp = 0;
    CHECK_INT_EQ(speed_roofline_bandwidth(&p, &rd, NULL), SPEED_OK);
    CHECK(rd > 0);
    CHECK_INT_EQ(speed_roofline_compute(&p, &fp, NULL, NULL), SPEED_OK);
    CHECK(fp > 0);

    speed_log_set_sink(tu_log_discard, NULL);
    speed_roofline_t r;
    p.read_bytes = 1000;
    CHECK_INT_EQ(speed_roofline_measure(&p, &r), SPEED_ERR_INVALID_ARGUMENT);
    p = small(2000, SPEED_CPU_ISA_BEST);
    CHECK_INT_EQ(speed_roofline_measure(&p, &r), SPEED_ERR_INVALID_ARGUMENT);
    p = small(1, SPEED_CPU_ISA_BEST);
    p.repetitions = -1;
    CHECK_INT_EQ(speed_roofline_measure(&p, &r), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "roofline");

    /* the persistent probe: same answer kind as the one-shot bandwidth probe, reusable */
    p = small(2, SPEED_CPU_ISA_BEST);
    speed_roofline_probe_t *probe = NULL;
    CHECK_INT_EQ(speed_roofline_probe_create(&p, &probe), SPEED_OK);
    double g1 = 0, g2 = 0;
    CHECK_INT_EQ(speed_roofline_probe_read(probe, 1, &g1), SPEED_OK);
    CHECK_INT_EQ(speed_roofline_probe_read(probe, 3, &g2), SPEED_OK);
    CHECK(g1 > 0 && g2 > 0 && g1 < 1e4 && g2 < 1e4); /* GB/s: positive and finite */
    CHECK_INT_EQ(speed_roofline_probe_read(probe, 0, &g1), SPEED_ERR_INVALID_ARGUMENT);
    speed_roofline_probe_destroy(probe);
    speed_roofline_probe_destroy(NULL);
    p.read_bytes = 1000;
    CHECK_INT_EQ(speed_roofline_probe_create(&p, &probe), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
