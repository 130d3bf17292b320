/* Fuzzes speedctl top's Prometheus text reader (tools/speedctl/prom_text.c) with what a metrics
 * endpoint could send: any bytes. Byte 0 picks small limits (so the truncation and label-limit
 * paths run) or the defaults; the rest is the document. Beyond "no crash, no leak, no UB": every
 * sample has a well-formed name, at most max_labels labels with readable names and values, the
 * counts stay within the limits, and the histogram and quantile arithmetic on every family named
 * by a # TYPE histogram line gives a quantile inside its bounds or NaN. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "prom_text.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

static bool name_ok(const char *s) {
    size_t n = strlen(s);
    return n > 0 && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:0123456789") == n &&
           !(s[0] >= '0' && s[0] <= '9');
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    speed_prom_limits_t lim = speed_prom_default_limits();
    if (data[0] & 1) {
        lim.max_samples = 1 + (data[0] >> 4);
        lim.max_labels = (data[0] >> 1) & 7;
    }
    speed_prom_text_t d;
    speed_status_t st = speed_prom_text_parse((const char *)data + 1, size - 1, &lim, &d);
    FZ_ASSERT(st == SPEED_OK || st == SPEED_ERR_TOO_LONG || st == SPEED_ERR_NO_MEMORY);
    FZ_ASSERT(d.n_samples <= lim.max_samples);
    for (size_t i = 0; i < d.n_samples; i++) {
        const speed_prom_sample_t *s = &d.samples[i];
        FZ_ASSERT(name_ok(s->name));
        FZ_ASSERT(s->n_labels <= lim.max_labels);
        for (size_t k = 0; k < s->n_labels; k++) {
            FZ_ASSERT(name_ok(s->labels[k].name));
            FZ_ASSERT(strlen(s->labels[k].value) < size);
        }
    }
    for (size_t f = 0; f < d.n_families; f++) {
        FZ_ASSERT(name_ok(d.families[f].name));
        if (d.families[f].type != SPEED_PROM_HISTOGRAM) continue;
        speed_prom_hist_t h, w;
        if (speed_prom_text_histogram(&d, d.families[f].name, NULL, &h) != SPEED_OK) continue;
        FZ_ASSERT(h.n_buckets >= 1 && h.n_buckets <= SPEED_PROM_HIST_MAX_BUCKETS && isinf(h.le[h.n_buckets - 1]));
        for (size_t k = 1; k < h.n_buckets; k++) FZ_ASSERT(h.le[k - 1] < h.le[k]);
        speed_prom_hist_delta(&h, &h, &w);
        FZ_ASSERT(speed_prom_hist_count(&w) == 0 || isnan(speed_prom_hist_count(&w)));
        for (int q = 0; q <= 10; q++) {
            double v = speed_prom_hist_quantile(&h, q / 10.0);
            /* finite bucket bounds and counts give a value inside [min(0, first bound), last finite bound] */
            bool finite = true;
            for (size_t k = 0; k < h.n_buckets; k++)
                finite &= isfinite(h.count[k]) && (k + 1 == h.n_buckets || isfinite(h.le[k]));
            if (finite && !isnan(v) && h.n_buckets >= 2) {
                double lo = h.le[0] < 0 ? h.le[0] : 0;
                FZ_ASSERT(v >= lo - 1e-9 * fabs(lo) && v <= h.le[h.n_buckets - 2] + 1e-9 * fabs(h.le[h.n_buckets - 2]));
            }
        }
    }
    speed_prom_text_cleanup(&d);
    return 0;
}
