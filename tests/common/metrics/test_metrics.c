/* speed_metrics: exact exposition text, a strict format check of the output, concurrent
 * updates, name validation, allocation failures, removing series (also during scrapes). */
#include <pthread.h>

#include "alloc.h"
#include "check.h"
#include "test_log.h"
#include "log.h"
#include "metrics.h"
#include "prom_check.h"

static double callback_value(void *user) { return *(double *)user; }

static void test_exact_text(void) {
    speed_metrics_t *m = NULL;
    CHECK_INT_EQ(speed_metrics_create(&m), SPEED_OK);

    speed_counter_t *tokens, *requests, *req_ok, *req_err, *req_again;
    CHECK_INT_EQ(
        speed_counter_register(m, "speed_prefill_tokens_total", "Prompt tokens \"prefilled\".", NULL, 0, &tokens),
        SPEED_OK);
    const char *route_status[] = {"route", "status"};
    CHECK_INT_EQ(speed_counter_register(m, "speed_router_requests_total", "Requests by route and status.", route_status,
                                        2, &requests),
                 SPEED_OK);
    speed_counter_add(tokens, 1234);
    speed_counter_inc(tokens);
    CHECK_INT_EQ(speed_counter_labels(requests, (const char *[]){"disaggregated", "200"}, &req_ok), SPEED_OK);
    CHECK_INT_EQ(speed_counter_labels(requests, (const char *[]){"odd \"x\"\\y\nz", "503"}, &req_err), SPEED_OK);
    CHECK_INT_EQ(speed_counter_labels(req_ok, (const char *[]){"disaggregated", "200"}, &req_again), SPEED_OK);
    CHECK(req_again == req_ok);
    speed_counter_inc(req_ok);
    speed_counter_inc(req_ok);
    speed_counter_inc(req_err);
    speed_counter_add(req_err, -5);  /* ignored: counters only go up */
    speed_counter_add(req_err, NAN); /* ignored too: one NaN would poison the counter for good */
    CHECK_NEAR(speed_counter_get(req_err), 1, 0);
    CHECK_NEAR(speed_counter_get(req_ok), 2, 0);

    speed_gauge_t *running, *usage;
    CHECK_INT_EQ(
        speed_gauge_register(m, "speed_decode_running_requests", "Requests decoding.\nNow.", NULL, 0, &running),
        SPEED_OK);
    speed_gauge_set(running, 5);
    speed_gauge_inc(running);
    speed_gauge_dec(running);
    speed_gauge_dec(running);
    speed_gauge_add(running, 0.5);
    double ratio = 0.25;
    CHECK_INT_EQ(speed_gauge_register_callback(m, "speed_kv_cache_usage_ratio", "KV blocks in use / total.",
                                               callback_value, &ratio, &usage),
                 SPEED_OK);
    CHECK_NEAR(speed_gauge_get(usage), 0.25, 0);

    speed_histogram_t *ttft, *ttft_child;
    const char *route[] = {"route"};
    const double buckets[] = {0.1, 0.5, 1};
    CHECK_INT_EQ(speed_histogram_register(m, "speed_router_time_to_first_token_seconds", "Time to first token.", route,
                                          1, buckets, 3, &ttft),
                 SPEED_OK);
    CHECK_INT_EQ(speed_histogram_labels(ttft, (const char *[]){"disaggregated"}, &ttft_child), SPEED_OK);
    speed_histogram_observe(ttft_child, 0.05);
    speed_histogram_observe(ttft_child, 0.1); /* le is inclusive */
    speed_histogram_observe(ttft_child, 0.7);
    speed_histogram_observe(ttft_child, 3);
    speed_histogram_observe(ttft_child, NAN); /* ignored */

    speed_histogram_t *xfer;
    CHECK_INT_EQ(speed_histogram_register(m, "speed_kv_transfer_seconds", NULL, NULL, 0, NULL, 0, &xfer), SPEED_OK);
    speed_histogram_observe(xfer, 0.003);

    speed_gauge_t *empty;
    CHECK_INT_EQ(speed_gauge_register(m, "speed_empty_family", "No children yet.", route, 1, &empty), SPEED_OK);

    char *text = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_metrics_render(m, &text, &len), SPEED_OK);
    /* HELP escapes only \ and newline: its double quotes stay as they are (label values escape them) */
    const char *expected = "# HELP speed_prefill_tokens_total Prompt tokens \"prefilled\".\n"
                           "# TYPE speed_prefill_tokens_total counter\n"
                           "speed_prefill_tokens_total 1235\n"
                           "# HELP speed_router_requests_total Requests by route and status.\n"
                           "# TYPE speed_router_requests_total counter\n"
                           "speed_router_requests_total{route=\"disaggregated\",status=\"200\"} 2\n"
                           "speed_router_requests_total{route=\"odd \\\"x\\\"\\\\y\\nz\",status=\"503\"} 1\n"
                           "# HELP speed_decode_running_requests Requests decoding.\\nNow.\n"
                           "# TYPE speed_decode_running_requests gauge\n"
                           "speed_decode_running_requests 4.5\n"
                           "# HELP speed_kv_cache_usage_ratio KV blocks in use / total.\n"
                           "# TYPE speed_kv_cache_usage_ratio gauge\n"
                           "speed_kv_cache_usage_ratio 0.25\n"
                           "# HELP speed_router_time_to_first_token_seconds Time to first token.\n"
                           "# TYPE speed_router_time_to_first_token_seconds histogram\n"
                           "speed_router_time_to_first_token_seconds_bucket{route=\"disaggregated\",le=\"0.1\"} 2\n"
                           "speed_router_time_to_first_token_seconds_bucket{route=\"disaggregated\",le=\"0.5\"} 2\n"
                           "speed_router_time_to_first_token_seconds_bucket{route=\"disaggregated\",le=\"1\"} 3\n"
                           "speed_router_time_to_first_token_seconds_bucket{route=\"disaggregated\",le=\"+Inf\"} 4\n"
                           "speed_router_time_to_first_token_seconds_sum{route=\"disaggregated\"} 3.85\n"
                           "speed_router_time_to_first_token_seconds_count{route=\"disaggregated\"} 4\n"
                           "# TYPE speed_kv_transfer_seconds histogram\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.001\"} 0\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.0025\"} 0\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.005\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.01\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.025\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.05\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.1\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.25\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"0.5\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"1\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"2.5\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"5\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"10\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"30\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"60\"} 1\n"
                           "speed_kv_transfer_seconds_bucket{le=\"+Inf\"} 1\n"
                           "speed_kv_transfer_seconds_sum 0.003\n"
                           "speed_kv_transfer_seconds_count 1\n"
                           "# HELP speed_empty_family No children yet.\n"
                           "# TYPE speed_empty_family gauge\n";
    CHECK_STR_EQ(text, expected);
    CHECK_INT_EQ(len, strlen(expected));
    char err[256];
    CHECK_MSG(prom_check(text, err, sizeof(err)) == 0, "%s", err);
    speed_free(text);

    uint64_t count;
    double sum;
    speed_histogram_get(ttft_child, &count, &sum);
    CHECK_INT_EQ(count, 4);
    CHECK_NEAR(sum, 3.85, 1e-12);
    speed_metrics_destroy(m);
}

static void test_format_value(void) {
    char buf[64];
    struct {
        double v;
        const char *s;
    } cases[] = {
        {0, "0"},
        {1, "1"},
        {-3, "-3"},
        {0.1, "0.1"},
        {2.5, "2.5"},
        {1e-6, "1e-06"},
        {1.0 / 3, "0.3333333333333333"},
        {1e20, "1e+20"},
        {INFINITY, "+Inf"},
        {-INFINITY, "-Inf"},
        {NAN, "NaN"},
        {123456789012.0, "123456789012"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        speed_metrics_format_value(cases[i].v, buf, sizeof(buf));
        CHECK_STR_EQ(buf, cases[i].s);
    }
}

/* The checker must reject what promtool rejects, or passing it means nothing. */
static void test_checker_rejects(void) {
    const char *bad[] = {
        "x 1",                                                            /* no newline */
        "# TYPE x gauge\n\nx 1\n",                                        /* blank line */
        "x 1\n",                                                          /* no TYPE */
        "# TYPE 1x gauge\n",                                              /* bad name */
        "# TYPE x gaug\n",                                                /* bad type */
        "# TYPE x gauge\n# TYPE x gauge\n",                               /* second TYPE */
        "# TYPE x gauge\nx{a=\"1\",} 1\n",                                /* trailing comma */
        "# TYPE x gauge\nx{a=\"1\",a=\"2\"} 1\n",                         /* label twice */
        "# TYPE x gauge\nx{a=\"\\t\"} 1\n",                               /* bad escape */
        "# TYPE x gauge\nx{__a=\"1\" 1\n",                                /* unterminated */
        "# TYPE x gauge\nx one\n",                                        /* bad value */
        "# TYPE x gauge\nx inf\n",                                        /* Go spelling only */
        "# TYPE x gauge\nx 1\nx 2\n",                                     /* duplicate series */
        "# TYPE x_total counter\nx_total -1\n",                           /* negative counter */
        "# TYPE x counter\nx 1\n",                                        /* no _total */
        "# TYPE x gauge\ny 1\n",                                          /* wrong family */
        "# TYPE x gauge\nx 1\n# TYPE y gauge\ny 1\nx{a=\"b\"} 1\n",       /* interleaved */
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", /* no +Inf */
        "# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\n"
        "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", /* le order */
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
        "h_sum 1\nh_count 1\n",                                              /* decreasing */
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n", /* count */
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",          /* no sum */
        "# TYPE h histogram\nh_bucket 1\n",                                  /* no le */
    };
    char err[256];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK_MSG(prom_check(bad[i], err, sizeof(err)) != 0, "accepted bad text #%zu", i);
    const char *good = "# a free comment\n"
                       "# HELP h Latency \\\\ in s.\n# TYPE h histogram\n"
                       "h_bucket{a=\"x\",le=\"0.5\"} 1\nh_bucket{a=\"x\",le=\"+Inf\"} 3\n"
                       "h_sum{a=\"x\"} 2.5 1700000000000\nh_count{a=\"x\"} 3\n"
                       "# TYPE g gauge\ng NaN\ng{b=\"\\\"\\n\\\\\"} -Inf\n";
    CHECK_MSG(prom_check(good, err, sizeof(err)) == 0, "%s", err);
}

static void test_bad_names(void) {
    speed_metrics_t *m = NULL;
    CHECK_INT_EQ(speed_metrics_create(&m), SPEED_OK);
    speed_log_set_sink(tu_log_discard, NULL); /* the rejections below log, as they should */
    speed_counter_t *c;
    speed_gauge_t *g;
    speed_histogram_t *h;
    const char *bad_names[] = {"", "1abc", "a-b", "a b", "é_total", "a.b"};
    for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++) {
        CHECK_INT_EQ(speed_gauge_register(m, bad_names[i], NULL, NULL, 0, &g), SPEED_ERR_INVALID_ARGUMENT);
    }
    CHECK(speed_metrics_name_is_valid("a:b_c9"));
    CHECK(speed_metrics_name_is_valid("_x"));
    CHECK(!speed_metrics_label_name_is_valid("a:b"));
    CHECK(!speed_metrics_label_name_is_valid("__name__"));
    CHECK_INT_EQ(speed_counter_register(m, "speed_requests", NULL, NULL, 0, &c),
                 SPEED_ERR_INVALID_ARGUMENT); /* no _total */
    const char *bad_label[] = {"9x"};
    CHECK_INT_EQ(speed_gauge_register(m, "g1", NULL, bad_label, 1, &g), SPEED_ERR_INVALID_ARGUMENT);
    const char *reserved[] = {"__x"};
    CHECK_INT_EQ(speed_gauge_register(m, "g1", NULL, reserved, 1, &g), SPEED_ERR_INVALID_ARGUMENT);
    const char *twice[] = {"a", "a"};
    CHECK_INT_EQ(speed_gauge_register(m, "g1", NULL, twice, 2, &g), SPEED_ERR_INVALID_ARGUMENT);
    const char *le[] = {"le"};
    CHECK_INT_EQ(speed_histogram_register(m, "h1", NULL, le, 1, NULL, 0, &h), SPEED_ERR_INVALID_ARGUMENT);
    const double unsorted[] = {1, 0.5}, inf[] = {1, INFINITY}, dup[] = {1, 1};
    CHECK_INT_EQ(speed_histogram_register(m, "h1", NULL, NULL, 0, unsorted, 2, &h), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_histogram_register(m, "h1", NULL, NULL, 0, inf, 2, &h), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_histogram_register(m, "h1", NULL, NULL, 0, dup, 2, &h), SPEED_ERR_INVALID_ARGUMENT);

    /* duplicates, including sample names a histogram produces */
    CHECK_INT_EQ(speed_gauge_register(m, "dup", NULL, NULL, 0, &g), SPEED_OK);
    CHECK_INT_EQ(speed_gauge_register(m, "dup", NULL, NULL, 0, &g), SPEED_ERR_FORMAT);
    CHECK_INT_EQ(speed_counter_register(m, "x_total", NULL, NULL, 0, &c), SPEED_OK);
    CHECK_INT_EQ(speed_counter_register(m, "x_total", NULL, NULL, 0, &c), SPEED_ERR_FORMAT);
    CHECK_INT_EQ(speed_histogram_register(m, "lat", NULL, NULL, 0, NULL, 0, &h), SPEED_OK);
    CHECK_INT_EQ(speed_gauge_register(m, "lat_count", NULL, NULL, 0, &g), SPEED_ERR_FORMAT);
    CHECK_INT_EQ(speed_histogram_register(m, "dup", NULL, NULL, 0, NULL, 0, &h), SPEED_ERR_FORMAT);

    /* label values: count is the family's; invalid UTF-8 rejected; unlabelled has no children */
    const char *one[] = {"route"};
    speed_counter_t *fam, *child;
    CHECK_INT_EQ(speed_counter_register(m, "y_total", NULL, one, 1, &fam), SPEED_OK);
    CHECK_INT_EQ(speed_counter_labels(fam, (const char *[]){"\xff"}, &child), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_counter_labels(fam, (const char *[]){"\xc3\xa9t\xc3\xa9"}, &child), SPEED_OK);
    CHECK_INT_EQ(speed_counter_labels(fam, (const char *[]){NULL}, &child), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_counter_labels(c, (const char *[]){"a"}, &child), SPEED_ERR_INVALID_ARGUMENT);

    char *text;
    CHECK_INT_EQ(speed_metrics_render(m, &text, NULL), SPEED_OK);
    char err[256];
    CHECK_MSG(prom_check(text, err, sizeof(err)) == 0, "%s", err);
    speed_free(text);
    speed_log_set_sink(NULL, NULL);
    speed_metrics_destroy(m);
}

#define N_THREADS 8
#define N_ITERS   100000

typedef struct {
    speed_counter_t *family;
    speed_gauge_t *gauge;
    speed_histogram_t *hist;
    int id;
} worker_arg_t;

static void *worker(void *p) {
    worker_arg_t *a = p;
    speed_counter_t *mine, *shared;
    char id[16];
    snprintf(id, sizeof(id), "t%d", a->id % 4); /* two threads per child, four children */
    speed_counter_labels(a->family, (const char *[]){id}, &mine);
    speed_counter_labels(a->family, (const char *[]){"all"}, &shared);
    for (int i = 0; i < N_ITERS; i++) {
        speed_counter_inc(shared);
        speed_counter_add(mine, 2);
        speed_gauge_inc(a->gauge);
        speed_gauge_dec(a->gauge);
        speed_gauge_inc(a->gauge);
        speed_histogram_observe(a->hist, (double)(i % 4) * 0.25); /* sums stay exact */
    }
    return NULL;
}

/* Renders n times, each page checked against the exposition format. */
static void scrape_checked(speed_metrics_t *m, int n) {
    char err[256];
    for (int i = 0; i < n; i++) {
        char *text;
        if (speed_metrics_render(m, &text, NULL) != SPEED_OK) continue;
        if (prom_check(text, err, sizeof(err)) != 0) {
            fprintf(stderr, "scrape %d: %s\n", i, err);
            check_failures_++;
        }
        speed_free(text);
    }
}

static void *scraper(void *p) {
    scrape_checked(p, 50);
    return NULL;
}

static void test_concurrent(void) {
    speed_metrics_t *m = NULL;
    CHECK_INT_EQ(speed_metrics_create(&m), SPEED_OK);
    worker_arg_t args[N_THREADS];
    speed_counter_t *fam;
    speed_gauge_t *gauge;
    speed_histogram_t *hist;
    const char *who[] = {"who"};
    const double buckets[] = {0.25, 0.5};
    CHECK_INT_EQ(speed_counter_register(m, "speed_test_ops_total", "ops", who, 1, &fam), SPEED_OK);
    CHECK_INT_EQ(speed_gauge_register(m, "speed_test_level", "level", NULL, 0, &gauge), SPEED_OK);
    CHECK_INT_EQ(speed_histogram_register(m, "speed_test_seconds", "lat", NULL, 0, buckets, 2, &hist), SPEED_OK);
    pthread_t th[N_THREADS], scr;
    pthread_create(&scr, NULL, scraper, m);
    for (int i = 0; i < N_THREADS; i++) {
        args[i] = (worker_arg_t){fam, gauge, hist, i};
        pthread_create(&th[i], NULL, worker, &args[i]);
    }
    for (int i = 0; i < N_THREADS; i++) pthread_join(th[i], NULL);
    pthread_join(scr, NULL);

    speed_counter_t *c;
    CHECK_INT_EQ(speed_counter_labels(fam, (const char *[]){"all"}, &c), SPEED_OK);
    CHECK_NEAR(speed_counter_get(c), (double)N_THREADS * N_ITERS, 0);
    for (int t = 0; t < 4; t++) {
        char id[16];
        snprintf(id, sizeof(id), "t%d", t);
        CHECK_INT_EQ(speed_counter_labels(fam, (const char *[]){id}, &c), SPEED_OK);
        CHECK_NEAR(speed_counter_get(c), 2.0 * 2 * N_ITERS, 0);
    }
    CHECK_NEAR(speed_gauge_get(gauge), (double)N_THREADS * N_ITERS, 0);
    uint64_t count;
    double sum;
    speed_histogram_get(hist, &count, &sum);
    CHECK_INT_EQ(count, (uint64_t)N_THREADS * N_ITERS);
    CHECK_NEAR(sum, N_THREADS * (N_ITERS / 4) * 1.5, 0);

    char *text;
    CHECK_INT_EQ(speed_metrics_render(m, &text, NULL), SPEED_OK);
    char line[256];
    snprintf(line, sizeof(line), "speed_test_seconds_bucket{le=\"0.25\"} %d\n", N_THREADS * N_ITERS / 2);
    CHECK_CONTAINS(text, line);
    snprintf(line, sizeof(line), "speed_test_ops_total{who=\"all\"} %d\n", N_THREADS * N_ITERS);
    CHECK_CONTAINS(text, line);
    char err[256];
    CHECK_MSG(prom_check(text, err, sizeof(err)) == 0, "%s", err);
    speed_free(text);
    speed_metrics_destroy(m);
}

/* Every allocation failure during registration and child creation returns NO_MEMORY and
 * leaves nothing behind. */
static void test_alloc_failures(void) {
    speed_log_configure("error,core=error");
    int64_t before = speed_alloc_live_count();
    for (int64_t n = 0; n < 40; n++) {
        speed_metrics_t *m = NULL;
        speed_alloc_fail_after(n, 0);
        speed_status_t st = speed_metrics_create(&m);
        if (st == SPEED_OK) {
            speed_histogram_t *h, *child = NULL;
            const char *l[] = {"a", "b"};
            st = speed_histogram_register(m, "h", "help", l, 2, NULL, 0, &h);
            if (st == SPEED_OK) st = speed_histogram_labels(h, (const char *[]){"x", "y"}, &child);
            if (st == SPEED_OK) speed_histogram_observe(child, 1);
            if (st == SPEED_OK) {
                char *text;
                st = speed_metrics_render(m, &text, NULL);
                if (st == SPEED_OK) speed_free(text);
            }
        }
        CHECK(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY);
        speed_alloc_fail_after(-1, 0);
        speed_metrics_destroy(m);
        CHECK_INT_EQ(speed_alloc_live_count(), before);
    }
    speed_log_configure("info");
}

/* A callback gauge with constant labels: one series with those labels, read through the
 * callback at each render; bad label values refused; allocation failures leave nothing. */
static void test_labeled_callback(void) {
    speed_metrics_t *m = NULL;
    CHECK_INT_EQ(speed_metrics_create(&m), SPEED_OK);
    double v = 7;
    speed_gauge_t *g = NULL;
    const char *names[] = {"role", "pool"};
    const char *values[] = {"prefill", "a\"b"};
    CHECK_INT_EQ(
        speed_gauge_register_callback_labeled(m, "speed_x_tokens", "Tokens.", names, values, 2, callback_value, &v, &g),
        SPEED_OK);
    CHECK_NEAR(speed_gauge_get(g), 7, 0);
    v = 9.5;
    char *text = NULL;
    CHECK_INT_EQ(speed_metrics_render(m, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, "# HELP speed_x_tokens Tokens.\n# TYPE speed_x_tokens gauge\n"
                       "speed_x_tokens{role=\"prefill\",pool=\"a\\\"b\"} 9.5\n");
    char err[256];
    CHECK_MSG(prom_check(text, err, sizeof(err)) == 0, "%s", err);
    speed_free(text);
    speed_log_configure("error,core=error");
    CHECK_INT_EQ(speed_gauge_register_callback_labeled(m, "speed_y", NULL, names, NULL, 2, callback_value, &v, NULL),
                 SPEED_ERR_INVALID_ARGUMENT);
    const char *bad[] = {"ok", "\xff"};
    CHECK_INT_EQ(speed_gauge_register_callback_labeled(m, "speed_y", NULL, names, bad, 2, callback_value, &v, NULL),
                 SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_gauge_register_callback_labeled(m, "speed_y", NULL, names, values, 2, NULL, &v, NULL),
                 SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(
        speed_gauge_register_callback_labeled(m, "speed_x_tokens", NULL, names, values, 2, callback_value, &v, NULL),
        SPEED_ERR_FORMAT);
    speed_metrics_destroy(m);
    int64_t before = speed_alloc_live_count();
    for (int64_t n = 0; n < 20; n++) {
        m = NULL;
        speed_alloc_fail_after(n, 0);
        speed_status_t st = speed_metrics_create(&m);
        if (st == SPEED_OK)
            st = speed_gauge_register_callback_labeled(m, "speed_x_tokens", "h", names, values, 2, callback_value, &v,
                                                       NULL);
        CHECK(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY);
        speed_alloc_fail_after(-1, 0);
        speed_metrics_destroy(m);
        CHECK_INT_EQ(speed_alloc_live_count(), before);
    }
    speed_log_configure("info");
}

/* speed_*_remove: the series leaves the output, the others keep their order, the same values
 * make a new series from zero; bad handles are refused; removals race with scrapes. */
static void *remove_scraper(void *p) {
    scrape_checked(p, 200);
    return NULL;
}

static void test_remove(void) {
    speed_metrics_t *m = NULL;
    CHECK_INT_EQ(speed_metrics_create(&m), SPEED_OK);
    const char *node[] = {"node"};
    speed_gauge_t *up = NULL, *a = NULL, *b = NULL, *c = NULL;
    speed_counter_t *down = NULL, *da = NULL;
    speed_histogram_t *lat = NULL, *la = NULL;
    static const double buckets[] = {1};
    CHECK_INT_EQ(speed_gauge_register(m, "speed_x_up", NULL, node, 1, &up), SPEED_OK);
    CHECK_INT_EQ(speed_counter_register(m, "speed_x_down_total", NULL, node, 1, &down), SPEED_OK);
    CHECK_INT_EQ(speed_histogram_register(m, "speed_x_seconds", NULL, node, 1, buckets, 1, &lat), SPEED_OK);
    CHECK_INT_EQ(speed_gauge_labels(up, (const char *[]){"a"}, &a), SPEED_OK);
    CHECK_INT_EQ(speed_gauge_labels(up, (const char *[]){"b"}, &b), SPEED_OK);
    CHECK_INT_EQ(speed_gauge_labels(up, (const char *[]){"c"}, &c), SPEED_OK);
    CHECK_INT_EQ(speed_counter_labels(down, (const char *[]){"a"}, &da), SPEED_OK);
    CHECK_INT_EQ(speed_histogram_labels(lat, (const char *[]){"a"}, &la), SPEED_OK);
    speed_gauge_set(a, 1);
    speed_gauge_set(b, 2);
    speed_gauge_set(c, 3);
    speed_counter_add(da, 4);
    speed_histogram_observe(la, 0.5);
    CHECK_INT_EQ(speed_gauge_remove(b), SPEED_OK);
    CHECK_INT_EQ(speed_counter_remove(da), SPEED_OK);
    CHECK_INT_EQ(speed_histogram_remove(la), SPEED_OK);
    char *text = NULL;
    CHECK_INT_EQ(speed_metrics_render(m, &text, NULL), SPEED_OK);
    CHECK_STR_EQ(text, "# TYPE speed_x_up gauge\nspeed_x_up{node=\"a\"} 1\nspeed_x_up{node=\"c\"} 3\n"
                       "# TYPE speed_x_down_total counter\n# TYPE speed_x_seconds histogram\n");
    speed_free(text);
    /* the same values again: a new series, from zero, after the older ones */
    speed_gauge_t *b2 = NULL;
    CHECK_INT_EQ(speed_gauge_labels(up, (const char *[]){"b"}, &b2), SPEED_OK);
    CHECK_NEAR(speed_gauge_get(b2), 0, 0);
    CHECK_INT_EQ(speed_counter_labels(down, (const char *[]){"a"}, &da), SPEED_OK);
    CHECK_NEAR(speed_counter_get(da), 0, 0);
    CHECK_INT_EQ(speed_metrics_render(m, &text, NULL), SPEED_OK);
    CHECK(strstr(text, "speed_x_up{node=\"c\"} 3\nspeed_x_up{node=\"b\"} 0\n") != NULL);
    CHECK(strstr(text, "speed_x_down_total{node=\"a\"} 0\n") != NULL);
    speed_free(text);
    /* handles that are not a removable series */
    CHECK_INT_EQ(speed_gauge_remove(NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_gauge_remove(up), SPEED_ERR_INVALID_ARGUMENT); /* the family */
    speed_counter_t *plain = NULL;
    CHECK_INT_EQ(speed_counter_register(m, "speed_x_plain_total", NULL, NULL, 0, &plain), SPEED_OK);
    CHECK_INT_EQ(speed_counter_remove(plain), SPEED_ERR_INVALID_ARGUMENT); /* unlabelled */
    double v = 1;
    speed_gauge_t *cb = NULL;
    CHECK_INT_EQ(speed_gauge_register_callback_labeled(m, "speed_x_cb", NULL, node, (const char *[]){"x"}, 1,
                                                       callback_value, &v, &cb),
                 SPEED_OK);
    CHECK_INT_EQ(speed_gauge_remove(cb), SPEED_ERR_INVALID_ARGUMENT); /* a callback's series */
    /* many series come and go while scrapes run: every scrape is well-formed, none is kept */
    pthread_t th;
    CHECK(pthread_create(&th, NULL, remove_scraper, m) == 0);
    for (int i = 0; i < 2000; i++) {
        char id[16];
        snprintf(id, sizeof id, "n%d", i);
        speed_gauge_t *g = NULL;
        CHECK_INT_EQ(speed_gauge_labels(up, (const char *[]){id}, &g), SPEED_OK);
        speed_gauge_set(g, 1);
        CHECK_INT_EQ(speed_gauge_remove(g), SPEED_OK);
    }
    pthread_join(th, NULL);
    CHECK_INT_EQ(speed_metrics_render(m, &text, NULL), SPEED_OK);
    CHECK(strstr(text, "node=\"n") == NULL);
    speed_free(text);
    speed_metrics_destroy(m);
}

int main(void) {
    int64_t live = speed_alloc_live_count();
    test_exact_text();
    test_format_value();
    test_checker_rejects();
    test_bad_names();
    test_concurrent();
    test_alloc_failures();
    test_labeled_callback();
    test_remove();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
