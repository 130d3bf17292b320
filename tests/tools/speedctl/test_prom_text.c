/* speed_prom_text (tools/speedctl/prom_text.h), the reader speedctl top scrapes with:
 *
 *  1. a well-formed document: families, labels (escapes, spaces, a trailing comma), NaN/±Inf,
 *     timestamps, CRLF, comments;
 *  2. malformed lines are counted and skipped, the good lines around them kept;
 *  3. limits: bytes (refused), samples (truncated), labels per sample (a bad line);
 *  4. fuzz-like: every prefix of a document and 20000 random mutations parse without a crash,
 *     and whatever comes out is well-formed (names and labels readable, counts in bounds);
 *  5. histograms: buckets merged over label sets, quantiles interpolated as Prometheus'
 *     histogram_quantile (hand-computed values), window deltas, counter resets;
 *  6. counter rates, resets included. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "prom_text.h"

static const char doc_text[] = "# HELP speed_router_requests_total completion requests\n"
                               "# TYPE speed_router_requests_total counter\n"
                               "speed_router_requests_total{route=\"split\",status=\"200\"} 12\n"
                               "speed_router_requests_total{ route = \"split\" , status=\"503\", } 3 1700000000000\r\n"
                               "speed_router_requests_total{route=\"decode_only\",status=\"200\"} 5\n"
                               "\n"
                               "   # a comment that is not HELP or TYPE\n"
                               "# TYPE speed_kv_cache_usage_ratio gauge\n"
                               "speed_kv_cache_usage_ratio 0.25\n"
                               "odd{v=\"a\\\"b\\\\c\\nd\"} NaN\n"
                               "up_inf +Inf\n"
                               "down_inf -Inf\n"
                               "sci 1.5e3\n";

static void test_parse(void) {
    speed_prom_text_t d;
    CHECK_INT_EQ(speed_prom_text_parse(doc_text, strlen(doc_text), NULL, &d), SPEED_OK);
    CHECK_INT_EQ((int)d.n_samples, 8);
    CHECK_INT_EQ((int)d.n_bad_lines, 0);
    CHECK(!d.truncated);
    CHECK_INT_EQ((int)speed_prom_text_type(&d, "speed_router_requests_total"), SPEED_PROM_COUNTER);
    CHECK_INT_EQ((int)speed_prom_text_type(&d, "speed_kv_cache_usage_ratio"), SPEED_PROM_GAUGE);
    CHECK_INT_EQ((int)speed_prom_text_type(&d, "absent"), SPEED_PROM_UNTYPED);
    CHECK_NEAR(speed_prom_text_sum(&d, "speed_router_requests_total", NULL), 20, 0);
    const char *ok[] = {"status", "200", NULL};
    CHECK_NEAR(speed_prom_text_sum(&d, "speed_router_requests_total", ok), 17, 0);
    const char *split503[] = {"route", "split", "status", "503", NULL};
    CHECK_NEAR(speed_prom_text_sum(&d, "speed_router_requests_total", split503), 3, 0);
    const char *none[] = {"status", "404", NULL};
    CHECK(isnan(speed_prom_text_sum(&d, "speed_router_requests_total", none)));
    CHECK(isnan(speed_prom_text_sum(&d, "speed_router_requests", NULL))); /* a prefix is not a name */
    CHECK_NEAR(speed_prom_text_sum(&d, "speed_kv_cache_usage_ratio", NULL), 0.25, 0);
    CHECK_NEAR(speed_prom_text_sum(&d, "sci", NULL), 1500, 0);
    CHECK(isinf(speed_prom_text_sum(&d, "up_inf", NULL)) && speed_prom_text_sum(&d, "up_inf", NULL) > 0);
    CHECK(isinf(speed_prom_text_sum(&d, "down_inf", NULL)) && speed_prom_text_sum(&d, "down_inf", NULL) < 0);
    const speed_prom_sample_t *odd = NULL;
    for (size_t i = 0; i < d.n_samples; i++)
        if (strcmp(d.samples[i].name, "odd") == 0) odd = &d.samples[i];
    CHECK(odd && isnan(odd->value));
    if (odd) CHECK_STR_EQ(speed_prom_sample_label(odd, "v"), "a\"b\\c\nd");
    const speed_prom_sample_t *s1 = &d.samples[1];
    CHECK_INT_EQ((int)s1->n_labels, 2);
    CHECK_STR_EQ(s1->labels[0].name, "route");
    CHECK_STR_EQ(s1->labels[0].value, "split");
    CHECK_STR_EQ(speed_prom_sample_label(s1, "status"), "503");
    CHECK(speed_prom_sample_label(s1, "le") == NULL);
    CHECK(speed_prom_text_has_prefix(&d, "speed_kv_"));
    CHECK(!speed_prom_text_has_prefix(&d, "speed_decode_"));
    speed_prom_text_cleanup(&d);
    speed_prom_text_cleanup(&d); /* twice is safe */
    /* empty input */
    CHECK_INT_EQ(speed_prom_text_parse(NULL, 0, NULL, &d), SPEED_OK);
    CHECK_INT_EQ((int)d.n_samples, 0);
    speed_prom_text_cleanup(&d);
    CHECK_INT_EQ(speed_prom_text_parse(NULL, 3, NULL, &d), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_prom_text_parse("a 1", 3, NULL, NULL), SPEED_ERR_INVALID_ARGUMENT);
}

static void test_junk(void) {
    static const char *const bad[] = {
        "{",
        "name{",
        "name{a=b} 1",
        "name{a=\"x} 1",
        "name{a=\"x\" 1",
        "name{a=\"x\"}",
        "name 1 2 3",
        "name abc",
        "9abc 1",
        "name{a=\"\\q\"} 1",
        "name 1x",
        "name{=\"x\"} 1",
        "name{a=\"x\",,b=\"y\"} 1",
        "na-me 1",
        "name 1 12ab",
        "name\x01 1",
        "# TYPE",
        "# TYPE x",
    };
    size_t n_bad = sizeof bad / sizeof bad[0];
    char text[4096];
    size_t len = 0;
    for (size_t i = 0; i < n_bad; i++) {
        len += (size_t)snprintf(text + len, sizeof text - len, "good_%zu %zu\n%s\n", i, i, bad[i]);
    }
    speed_prom_text_t d;
    CHECK_INT_EQ(speed_prom_text_parse(text, len, NULL, &d), SPEED_OK);
    CHECK_INT_EQ((int)d.n_samples, (int)n_bad);
    /* "# TYPE x" (no type) is a bad line; a bare "# TYPE" is just a comment */
    CHECK_INT_EQ((int)d.n_bad_lines, (int)n_bad - 1);
    for (size_t i = 0; i < n_bad && i < d.n_samples; i++) {
        char want[32];
        snprintf(want, sizeof want, "good_%zu", i);
        CHECK_STR_EQ(d.samples[i].name, want);
        CHECK_NEAR(d.samples[i].value, (double)i, 0);
        CHECK_INT_EQ((int)d.samples[i].n_labels, 0);
    }
    speed_prom_text_cleanup(&d);
    /* a NUL byte in the middle ends its line's content; the next lines still count */
    static const char with_nul[] = "a 1\nb\0junk 2\nc 3\n";
    CHECK_INT_EQ(speed_prom_text_parse(with_nul, sizeof with_nul - 1, NULL, &d), SPEED_OK);
    CHECK_NEAR(speed_prom_text_sum(&d, "a", NULL), 1, 0);
    CHECK_NEAR(speed_prom_text_sum(&d, "c", NULL), 3, 0);
    CHECK_INT_EQ((int)d.n_bad_lines, 1);
    speed_prom_text_cleanup(&d);
}

static void test_limits(void) {
    speed_prom_limits_t lim = speed_prom_default_limits();
    lim.max_samples = 3;
    lim.max_labels = 2;
    const char *t = "a 1\nb{x=\"1\",y=\"2\",z=\"3\"} 2\nc{x=\"1\",y=\"2\"} 3\nd 4\ne 5\nf 6\n";
    speed_prom_text_t d;
    CHECK_INT_EQ(speed_prom_text_parse(t, strlen(t), &lim, &d), SPEED_OK);
    CHECK_INT_EQ((int)d.n_samples, 3);
    CHECK(d.truncated);
    CHECK_INT_EQ((int)d.n_bad_lines, 1); /* b: three labels */
    CHECK_STR_EQ(d.samples[1].name, "c");
    CHECK_INT_EQ((int)d.samples[1].n_labels, 2);
    CHECK_STR_EQ(speed_prom_sample_label(&d.samples[1], "y"), "2");
    CHECK_STR_EQ(d.samples[2].name, "d");
    speed_prom_text_cleanup(&d);
    lim.max_bytes = 10;
    CHECK_INT_EQ(speed_prom_text_parse(t, strlen(t), &lim, &d), SPEED_ERR_TOO_LONG);
    CHECK_INT_EQ((int)d.n_samples, 0);
    speed_prom_text_cleanup(&d);
}

/* What any parse must leave: names that are names, readable labels, counts in bounds. */
static void check_well_formed(const speed_prom_text_t *d, const speed_prom_limits_t *lim) {
    CHECK(d->n_samples <= lim->max_samples);
    for (size_t i = 0; i < d->n_samples; i++) {
        const speed_prom_sample_t *s = &d->samples[i];
        size_t n = strlen(s->name);
        if (n == 0 || strspn(s->name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:0123456789") != n) {
            CHECK_MSG(false, "sample %zu has a bad name '%s'", i, s->name);
            return;
        }
        if (s->n_labels > lim->max_labels || (s->n_labels && !s->labels)) {
            CHECK_MSG(false, "sample %zu: %zu labels", i, s->n_labels);
            return;
        }
        for (size_t k = 0; k < s->n_labels; k++) (void)(strlen(s->labels[k].name) + strlen(s->labels[k].value));
    }
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static void test_fuzz(void) {
    static const char seed[] =
        "# TYPE h histogram\n"
        "h_bucket{le=\"0.1\",route=\"a\"} 1\nh_bucket{le=\"+Inf\",route=\"a\"} 2\nh_sum 0.3\nh_count 2\n"
        "c_total{a=\"x\\\"y\",b=\"\"} 7 123\n";
    speed_prom_limits_t lim = speed_prom_default_limits();
    lim.max_samples = 8;
    lim.max_labels = 4;
    size_t n = strlen(seed);
    for (size_t cut = 0; cut <= n; cut++) { /* every prefix: torn reads */
        speed_prom_text_t d;
        CHECK_INT_EQ(speed_prom_text_parse(seed, cut, &lim, &d), SPEED_OK);
        check_well_formed(&d, &lim);
        speed_prom_text_cleanup(&d);
    }
    static const char alphabet[] = "{}=\",\\ \n#\tabcle_+-.eE0123456789InfNa\r\0\x7f\xff";
    char buf[512];
    int failures_before = check_failures_;
    for (int iter = 0; iter < 20000 && check_failures_ == failures_before; iter++) {
        size_t len = n;
        memcpy(buf, seed, n);
        int edits = 1 + (int)(rnd() % 8);
        for (int e = 0; e < edits; e++) {
            size_t at = len ? rnd() % len : 0;
            char c = alphabet[rnd() % (sizeof alphabet - 1)];
            switch (rnd() % 3) {
            case 0: buf[at] = c; break;
            case 1:
                if (len + 1 < sizeof buf) {
                    memmove(buf + at + 1, buf + at, len - at);
                    buf[at] = c;
                    len++;
                }
                break;
            default:
                if (len) {
                    memmove(buf + at, buf + at + 1, len - at - 1);
                    len--;
                }
            }
        }
        speed_prom_text_t d;
        speed_status_t st = speed_prom_text_parse(buf, len, &lim, &d);
        CHECK_INT_EQ(st, SPEED_OK);
        check_well_formed(&d, &lim);
        speed_prom_hist_t h;
        if (speed_prom_text_histogram(&d, "h", NULL, &h) == SPEED_OK) {
            double q = speed_prom_hist_quantile(&h, 0.5);
            (void)q;
        }
        speed_prom_text_cleanup(&d);
    }
}

static void test_histogram(void) {
    /* two routes' histograms; buckets written out of order */
    const char *t = "# TYPE lat histogram\n"
                    "lat_bucket{route=\"a\",le=\"0.5\"} 4\n"
                    "lat_bucket{route=\"a\",le=\"0.1\"} 1\n"
                    "lat_bucket{route=\"a\",le=\"1\"} 5\n"
                    "lat_bucket{route=\"a\",le=\"+Inf\"} 6\n"
                    "lat_sum{route=\"a\"} 2.5\nlat_count{route=\"a\"} 6\n"
                    "lat_bucket{route=\"b\",le=\"0.1\"} 1\n"
                    "lat_bucket{route=\"b\",le=\"0.5\"} 2\n"
                    "lat_bucket{route=\"b\",le=\"1\"} 3\n"
                    "lat_bucket{route=\"b\",le=\"+Inf\"} 4\n"
                    "lat_sum{route=\"b\"} 1.5\nlat_count{route=\"b\"} 4\n"
                    "bad_bucket{le=\"x\"} 1\n"
                    "noinf_bucket{le=\"1\"} 1\n";
    speed_prom_text_t d;
    CHECK_INT_EQ(speed_prom_text_parse(t, strlen(t), NULL, &d), SPEED_OK);
    speed_prom_hist_t h;
    CHECK_INT_EQ(speed_prom_text_histogram(&d, "lat", NULL, &h), SPEED_OK);
    /* merged: le 0.1: 2, 0.5: 6, 1: 8, +Inf: 10 */
    CHECK_INT_EQ((int)h.n_buckets, 4);
    CHECK_NEAR(h.le[0], 0.1, 0);
    CHECK_NEAR(h.le[2], 1, 0);
    CHECK(isinf(h.le[3]));
    CHECK_NEAR(h.count[0], 2, 0);
    CHECK_NEAR(h.count[1], 6, 0);
    CHECK_NEAR(h.count[2], 8, 0);
    CHECK_NEAR(h.count[3], 10, 0);
    CHECK_NEAR(h.sum, 4, 1e-12);
    CHECK_NEAR(h.count_total, 10, 0);
    CHECK_NEAR(speed_prom_hist_count(&h), 10, 0);
    /* rank 5 in (0.1, 0.5] holding 2..6: 0.1 + 0.4 * (5 - 2) / 4 = 0.4 */
    CHECK_NEAR(speed_prom_hist_quantile(&h, 0.5), 0.4, 1e-12);
    /* rank 1 in the first bucket (0, 0.1] holding 2: 0.05 */
    CHECK_NEAR(speed_prom_hist_quantile(&h, 0.1), 0.05, 1e-12);
    /* rank 7 in (0.5, 1] holding 6..8: 0.5 + 0.5 * 1 / 2 = 0.75 */
    CHECK_NEAR(speed_prom_hist_quantile(&h, 0.7), 0.75, 1e-12);
    /* rank 9 in +Inf: the highest finite bound */
    CHECK_NEAR(speed_prom_hist_quantile(&h, 0.9), 1, 0);
    CHECK_NEAR(speed_prom_hist_quantile(&h, 1), 1, 0);
    CHECK(isnan(speed_prom_hist_quantile(&h, 1.5)));
    CHECK(isnan(speed_prom_hist_quantile(&h, -0.1)));
    /* one route only */
    const char *ra[] = {"route", "a", NULL};
    CHECK_INT_EQ(speed_prom_text_histogram(&d, "lat", ra, &h), SPEED_OK);
    CHECK_NEAR(h.count[3], 6, 0);
    /* rank 3 in (0.1, 0.5] holding 1..4: 0.1 + 0.4 * 2 / 3 */
    CHECK_NEAR(speed_prom_hist_quantile(&h, 0.5), 0.1 + 0.4 * 2 / 3, 1e-12);
    speed_prom_hist_t tmp;
    CHECK_INT_EQ(speed_prom_text_histogram(&d, "bad", NULL, &tmp), SPEED_ERR_FORMAT);
    CHECK_INT_EQ(speed_prom_text_histogram(&d, "noinf", NULL, &tmp), SPEED_ERR_NOT_FOUND);
    CHECK_INT_EQ(speed_prom_text_histogram(&d, "absent", NULL, &tmp), SPEED_ERR_NOT_FOUND);

    /* the window: cur {2,6,8,10} - prev {0,4,6,6} = {2,2,2,4} */
    speed_prom_hist_t cur, prev, win;
    CHECK_INT_EQ(speed_prom_text_histogram(&d, "lat", NULL, &cur), SPEED_OK);
    prev = cur;
    prev.count[0] = 0, prev.count[1] = 4, prev.count[2] = 6, prev.count[3] = 6;
    prev.sum = 3, prev.count_total = 6;
    speed_prom_hist_delta(&cur, &prev, &win);
    CHECK_NEAR(win.count[0], 2, 0);
    CHECK_NEAR(win.count[3], 4, 0);
    CHECK_NEAR(win.sum, 1, 1e-12);
    CHECK_NEAR(win.count_total, 4, 0);
    /* rank 2 fills the first bucket: 0.1; rank 1: 0.05; rank 3.6 in +Inf: 1 */
    CHECK_NEAR(speed_prom_hist_quantile(&win, 0.5), 0.1, 1e-12);
    CHECK_NEAR(speed_prom_hist_quantile(&win, 0.25), 0.05, 1e-12);
    CHECK_NEAR(speed_prom_hist_quantile(&win, 0.9), 1, 0);
    /* the totals would say 0.4 for the median: the window's differs */
    CHECK_NEAR(speed_prom_hist_quantile(&cur, 0.5), 0.4, 1e-12);
    /* an empty window */
    speed_prom_hist_delta(&cur, &cur, &win);
    CHECK_NEAR(speed_prom_hist_count(&win), 0, 0);
    CHECK(isnan(speed_prom_hist_quantile(&win, 0.5)));
    /* a reset (prev above cur): the window is cur */
    prev.count[3] = 20;
    speed_prom_hist_delta(&cur, &prev, &win);
    CHECK_NEAR(win.count[3], 10, 0);
    CHECK_NEAR(speed_prom_hist_quantile(&win, 0.5), 0.4, 1e-12);
    /* other bounds: cur */
    prev = cur;
    prev.le[1] = 0.25;
    speed_prom_hist_delta(&cur, &prev, &win);
    CHECK_NEAR(win.count[1], 6, 0);
    /* no prev: cur; in place */
    win = cur;
    speed_prom_hist_delta(&win, NULL, &win);
    CHECK_NEAR(win.count[1], 6, 0);
    speed_prom_text_cleanup(&d);

    /* a first bound at 0 or below is returned as is; torn (falling) buckets do not go negative */
    speed_prom_hist_t z = {.le = {0, 1, INFINITY}, .count = {4, 4, 4}, .n_buckets = 3};
    CHECK_NEAR(speed_prom_hist_quantile(&z, 0.5), 0, 0);
    speed_prom_hist_t torn = {.le = {0.1, 0.2, 0.4, INFINITY}, .count = {4, 2, 6, 8}, .n_buckets = 4};
    /* running maximum {4,4,6,8}: rank 5 in (0.2, 0.4] holding 4..6: 0.3 */
    CHECK_NEAR(speed_prom_hist_quantile(&torn, 0.625), 0.3, 1e-12);
    /* a "-Inf" bucket first (the fuzzer's find: it read le[-1]) is a bound at or below zero */
    speed_prom_hist_t neg = {.le = {-INFINITY, 1, INFINITY}, .count = {2, 2, 4}, .n_buckets = 3};
    CHECK(isinf(speed_prom_hist_quantile(&neg, 0.25)) && speed_prom_hist_quantile(&neg, 0.25) < 0);
    CHECK_NEAR(speed_prom_hist_quantile(&neg, 1), 1, 0);
    speed_prom_hist_t one = {.le = {INFINITY}, .count = {3}, .n_buckets = 1};
    CHECK(isnan(speed_prom_hist_quantile(&one, 0.5)));
}

static void test_rate(void) {
    CHECK_NEAR(speed_prom_rate(15, 5, 2), 5, 0);
    CHECK_NEAR(speed_prom_rate(5, 5, 2), 0, 0);
    CHECK_NEAR(speed_prom_rate(3, 10, 2), 1.5, 0); /* reset: counted from 0 */
    CHECK(isnan(speed_prom_rate(NAN, 1, 1)));
    CHECK(isnan(speed_prom_rate(1, NAN, 1)));
    CHECK(isnan(speed_prom_rate(2, 1, 0)));
    CHECK(isnan(speed_prom_rate(2, 1, -1)));
}

int main(void) {
    test_parse();
    test_junk();
    test_limits();
    test_fuzz();
    test_histogram();
    test_rate();
    return CHECK_DONE();
}
