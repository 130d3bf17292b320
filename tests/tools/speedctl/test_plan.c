/* speedctl plan's model (plan_profile, plan_workload, plan_sim) against closed forms, and the
 * verb as a user runs it ($SPEEDCTL): its table, its errors, and its cluster file loaded back
 * through the cluster config loader.
 *
 *   - the simulation: M/D/1 mean wait (Poisson arrivals, one prefill server of fixed service
 *     time), no queueing under deterministic arrivals, throughput = rate below saturation and
 *     saturation flagged above, processor sharing on a shared host, monotonicity in nodes and in
 *     rate, determinism;
 *   - rate matching on a hand-made profile;
 *   - bad inputs: corrupt or incomplete profiles, bad length specs and traces, impossible SLOs. */
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "check.h"
#include "cluster_config.h"
#include "config.h"
#include "plan_profile.h"
#include "plan_sim.h"
#include "plan_workload.h"
#include "test_fs.h"
#include "test_proc.h"

/* A model of L = 8 layers: prefill 0.1 ms per prompt token at C = 8 and 0.06 at C = 4 (linear
 * through the origin), decode steps of 1 + 0.5 x batch ms whatever the context, no transfer. */
static const char *const profile_text =
    "{\"schema\": \"speedserve-profile/1\", \"model\": {\"path\": \"/models/m\", \"layers\": 8, "
    "\"kv_bytes_per_token_layer\": 512, \"kv_dtype\": \"bf16\"}, \"backend\": \"cpu\", \"threads\": 1, "
    "\"tensor_parallel\": 1, \"engine\": {\"max_step_tokens\": 512, \"prefill_chunk\": 512}, \"repeat\": 1, "
    "\"depths\": ["
    "{\"prefill_layers\": 4, \"prefill\": [{\"tokens\": 1, \"ms\": 0.06}, {\"tokens\": 1024, \"ms\": 61.44}], "
    "\"decode\": [{\"batch\": 1, \"context\": 0, \"ms\": 1.5}, {\"batch\": 16, \"context\": 0, \"ms\": 9}]},"
    "{\"prefill_layers\": 8, \"prefill\": [{\"tokens\": 1, \"ms\": 0.1}, {\"tokens\": 1024, \"ms\": 102.4}], "
    "\"decode\": [{\"batch\": 1, \"context\": 0, \"ms\": 1.5}, {\"batch\": 16, \"context\": 0, \"ms\": 9}]}]}";

static speed_plan_profile_t prof;

static speed_plan_sim_params_t params(int c, int n_prefill, int n_decode) {
    return (speed_plan_sim_params_t){.depth = speed_plan_profile_depth(&prof, c),
                                     .n_layers = 8,
                                     .prefill_layers = c,
                                     .anchors = 1,
                                     .tail = 1,
                                     .kv_bytes_per_token_layer = 512,
                                     .n_prefill = n_prefill,
                                     .n_decode = n_decode,
                                     .prefill_max_running = 4,
                                     .max_step_tokens = 512,
                                     .prefill_chunk = 512,
                                     .decode_max_running = 16,
                                     .overhead_ms = 0,
                                     .host_cores = 0,
                                     .node_threads = 1};
}

/* n requests at rate of a fixed prompt and output. */
static speed_plan_request_t *fixed_workload(int n, double rate, speed_lg_arrival_t arrival, int64_t prompt,
                                            int64_t output, uint64_t seed) {
    speed_plan_request_t *r = speed_calloc((size_t)n, sizeof *r);
    speed_lg_dist_t p = {SPEED_LG_DIST_FIXED, (double)prompt, 0}, o = {SPEED_LG_DIST_FIXED, (double)output, 0};
    speed_plan_workload_make(&p, &o, rate, arrival, seed, r, n);
    return r;
}

static void test_profile_lookups(void) {
    const speed_plan_depth_t *d = speed_plan_profile_depth(&prof, 8);
    CHECK(d != NULL);
    CHECK(fabs(speed_plan_prefill_ms(d, 100) - 10.0) < 1e-9);
    CHECK(fabs(speed_plan_prefill_ms(d, 2048) - 204.8) < 1e-9); /* extrapolated */
    CHECK(fabs(speed_plan_decode_ms(d, 4, 300) - 3.0) < 1e-9);
    CHECK(speed_plan_transfer_ms(d, 1e6) == 0.0);
    CHECK(speed_plan_profile_depth(&prof, 5) == NULL);
}

static void test_md1(void) {
    /* one prefill server, one prompt at a time, service D = 10 ms, Poisson at 50/s (rho 0.5):
     * the mean wait is lambda D^2 / (2 (1 - rho)) = 5 ms */
    speed_plan_sim_params_t p = params(8, 1, 1);
    p.prefill_max_running = 1;
    p.decode_max_running = 4096;
    const int n = 40000;
    speed_plan_request_t *r = fixed_workload(n, 50, SPEED_LG_ARRIVAL_POISSON, 100, 1, 7);
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, n, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.prefill_wait_mean_ms - 5.0) < 0.25, "M/D/1 wait %.3f ms, expected 5", res.prefill_wait_mean_ms);
    CHECK_MSG(fabs(res.ttft_mean_ms - 15.0) < 0.3, "mean TTFT %.3f ms, expected 15", res.ttft_mean_ms);
    CHECK(!res.saturated);
    CHECK_MSG(fabs(res.throughput_rps / res.offered_rps - 1.0) < 0.02, "throughput %.2f vs offered %.2f",
              res.throughput_rps, res.offered_rps);
    CHECK_MSG(fabs(res.prefill_busy - 0.5) < 0.02, "prefill busy %.3f", res.prefill_busy);
    speed_free(r);
}

static void test_deterministic_arrivals(void) {
    /* constant arrivals every 20 ms, 10 ms of prefill, 10 decode steps of 1.5 ms: nobody waits */
    speed_plan_sim_params_t p = params(8, 1, 1);
    p.overhead_ms = 2;
    speed_plan_request_t *r = fixed_workload(200, 50, SPEED_LG_ARRIVAL_CONSTANT, 100, 11, 1);
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, 200, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 12.0) < 1e-6 && fabs(res.ttft_p99_ms - 12.0) < 1e-6, "TTFT p50 %.6f p99 %.6f",
              res.ttft_p50_ms, res.ttft_p99_ms);
    CHECK_MSG(fabs(res.tpot_p90_ms - 1.5) < 1e-6, "TPOT p90 %.6f", res.tpot_p90_ms);
    CHECK(res.prefill_wait_mean_ms < 1e-9);
    CHECK(res.decode_running_max == 1);
    p.step_overhead_ms = 0.5; /* the node's own work per step: TPOT 1.5 + 0.5, TTFT unchanged */
    CHECK(speed_plan_sim_run(&p, r, 200, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.tpot_p90_ms - 2.0) < 1e-6 && fabs(res.ttft_p90_ms - 12.0) < 1e-6, "TPOT %.6f TTFT %.6f",
              res.tpot_p90_ms, res.ttft_p90_ms);
    speed_free(r);
}

static void test_saturation(void) {
    /* capacity 100/s (10 ms each, one at a time): 150/s cannot be served */
    speed_plan_sim_params_t p = params(8, 1, 1);
    p.prefill_max_running = 1;
    speed_plan_request_t *r = fixed_workload(2000, 150, SPEED_LG_ARRIVAL_POISSON, 100, 1, 3);
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, 2000, 0, 0, &res) == SPEED_OK);
    CHECK(res.saturated);
    CHECK_MSG(res.throughput_rps < 105, "throughput %.1f above the capacity", res.throughput_rps);
    speed_free(r);
    r = fixed_workload(2000, 60, SPEED_LG_ARRIVAL_POISSON, 100, 1, 3);
    CHECK(speed_plan_sim_run(&p, r, 2000, 0, 0, &res) == SPEED_OK);
    CHECK(!res.saturated);
    speed_free(r);
}

static void test_shared_cores(void) {
    /* two prefill nodes on one core: two prompts arriving together take 20 ms each, not 10 */
    speed_plan_sim_params_t p = params(8, 2, 1);
    p.host_cores = 1;
    speed_plan_request_t r[2] = {{0, 100, 1}, {0, 100, 1}};
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, 2, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 20.0) < 1e-6 && fabs(res.ttft_p99_ms - 20.0) < 1e-6, "TTFT %.6f / %.6f",
              res.ttft_p50_ms, res.ttft_p99_ms);
    /* beside 3 threads of other work on 2 cores, as when profiled: the profile's node had 2/4 of
     * a core; two busy nodes get 2/5 each, 0.8 of the profiled speed: 12.5 ms */
    p.host_cores = 2;
    p.host_background = 3;
    CHECK(speed_plan_sim_run(&p, r, 2, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p99_ms - 12.5) < 1e-6, "TTFT beside background work %.6f", res.ttft_p99_ms);
    p.host_background = 0;
    p.host_cores = 0; /* own hardware: in parallel */
    CHECK(speed_plan_sim_run(&p, r, 2, 0, 0, &res) == SPEED_OK);
    CHECK(fabs(res.ttft_p99_ms - 10.0) < 1e-6);
}

static void test_first_token_at_step_boundary(void) {
    /* A (100 tokens, prefill 10 ms) keeps the decode node stepping every 1.5 ms from 10 ms on; B
     * arrives at 10.2 ms, its prefill ends at 20.2 ms while a step runs (19 to 20.5): the decode
     * node takes it, and its first token reaches the client, at 20.5 ms: TTFT 10.3, not 10 */
    speed_plan_sim_params_t p = params(8, 1, 1);
    speed_plan_request_t r[2] = {{0, 100, 100}, {0.0102, 100, 4}};
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, 2, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 10.0) < 1e-6 && fabs(res.ttft_p99_ms - 10.3) < 1e-6,
              "TTFT %.6f (idle decode node) / %.6f (busy)", res.ttft_p50_ms, res.ttft_p99_ms);
}

static void test_client_work(void) {
    /* one core: a request's 10 ms of router/client work and its 10 ms prefill share it, both end
     * at 20 ms; the 2 ms TTFT overhead is CPU work at that moment's half share: 4 ms */
    speed_plan_sim_params_t p = params(8, 1, 1);
    p.host_cores = 1;
    p.overhead_ms = 2;
    p.client_ms_per_request = 10;
    speed_plan_request_t r[1] = {{0, 100, 1}};
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, 1, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 24.0) < 1e-6, "TTFT beside client work %.6f", res.ttft_p50_ms);
    /* 4 ms of client work: it ends at 8 ms, the prefill's last 6 ms run alone: 14 ms, overhead 2 */
    p.client_ms_per_request = 4;
    CHECK(speed_plan_sim_run(&p, r, 1, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 16.0) < 1e-6, "TTFT after client work %.6f", res.ttft_p50_ms);
    /* per token: a 3-token answer; each decode step (1.5 ms) makes one token and 1 ms of client work
     * that runs beside the next step. First token at 14 ms (+2), then client work 1 ms (first
     * token) shares with step 1: both at half speed for 2 ms (1 ms of client work done, 1 ms of the
     * step), the step's last 0.5 ms alone: step 1 ends at 16.5; step 2 the same: 19 ms; TPOT 2.5 */
    p.client_ms_per_token = 1;
    speed_plan_request_t r3[1] = {{0, 100, 3}};
    CHECK(speed_plan_sim_run(&p, r3, 1, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.tpot_p50_ms - 2.5) < 1e-6, "TPOT with per-token client work %.6f", res.tpot_p50_ms);
    /* own hardware (no --host-cores): client work costs the nodes nothing */
    p.host_cores = 0;
    p.client_ms_per_request = 10;
    CHECK(speed_plan_sim_run(&p, r, 1, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 12.0) < 1e-6, "TTFT on own hardware %.6f", res.ttft_p50_ms);
    p.client_ms_per_token = -1;
    CHECK(speed_plan_sim_run(&p, r, 1, 0, 0, &res) == SPEED_ERR_INVALID_ARGUMENT);
}

static void test_correction_factors(void) {
    /* A (100 tokens: prefill 10 ms, 4 tokens: 3 steps of 1.5 ms), overhead 2: TTFT 12, TPOT 1.5.
     * Factors 1.5 / 2 make them 18 and 3; an SLO of 15 ms TTFT then fails what it passed */
    speed_plan_sim_params_t p = params(8, 1, 1);
    p.overhead_ms = 2;
    speed_plan_request_t r[1] = {{0, 100, 4}};
    speed_plan_sim_result_t base, res;
    CHECK(speed_plan_sim_run(&p, r, 1, 15, 0, &base) == SPEED_OK);
    CHECK_MSG(fabs(base.ttft_p90_ms - 12.0) < 1e-6 && fabs(base.tpot_p90_ms - 1.5) < 1e-6 && base.goodput_rps > 0,
              "no factors: TTFT %.6f TPOT %.6f goodput %.3f", base.ttft_p90_ms, base.tpot_p90_ms, base.goodput_rps);
    p.ttft_factor = 1.5;
    p.tpot_factor = 2;
    CHECK(speed_plan_sim_run(&p, r, 1, 15, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p90_ms - 18.0) < 1e-6 && fabs(res.ttft_p50_ms - 18.0) < 1e-6 &&
                  fabs(res.tpot_p90_ms - 3.0) < 1e-6 && fabs(res.e2e_p90_ms - (18.0 + 9.0)) < 1e-6,
              "factors: TTFT %.6f TPOT %.6f e2e %.6f", res.ttft_p90_ms, res.tpot_p90_ms, res.e2e_p90_ms);
    CHECK_MSG(res.goodput_rps == 0, "a corrected TTFT over the SLO still counted as good (%.3f)", res.goodput_rps);
    p.tpot_factor = -1;
    CHECK(speed_plan_sim_run(&p, r, 1, 0, 0, &res) == SPEED_ERR_INVALID_ARGUMENT);
}

static void test_chunking(void) {
    /* two 400-token prompts at once, steps of at most 512 rows: the first step takes all of the
     * first prompt and 112 rows of the second (51.2 ms), the second step its last 288 (28.8 ms) */
    speed_plan_sim_params_t p = params(8, 1, 1);
    speed_plan_request_t r[2] = {{0, 400, 1}, {0, 400, 1}};
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, 2, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 51.2) < 1e-6, "first prompt %.6f ms", res.ttft_p50_ms);
    CHECK_MSG(fabs(res.ttft_p99_ms - 80.0) < 1e-6, "second prompt %.6f ms", res.ttft_p99_ms);
}

static void test_late_clock(void) {
    /* arrivals a million seconds apart: the clock's resolution there is coarser than a step's
     * last sliver of work; every request still finishes, each alone (10 ms prefill, 1.5 ms steps) */
    speed_plan_sim_params_t p = params(8, 1, 1);
    p.host_cores = 2;
    p.host_background = 0.7;
    speed_plan_request_t *r = fixed_workload(300, 1e-6, SPEED_LG_ARRIVAL_POISSON, 97, 5, 3);
    speed_plan_sim_result_t res;
    CHECK(speed_plan_sim_run(&p, r, 300, 0, 0, &res) == SPEED_OK);
    CHECK_MSG(fabs(res.ttft_p50_ms - 9.7) < 1e-3 && fabs(res.tpot_p90_ms - 1.5) < 1e-3, "TTFT %.6f TPOT %.6f",
              res.ttft_p50_ms, res.tpot_p90_ms);
    speed_free(r);
}

static void test_monotone(void) {
    speed_lg_dist_t pl, ol;
    char err[256];
    CHECK(speed_lg_dist_parse("p", "uniform:32,400", &pl, err, sizeof err) == SPEED_OK);
    CHECK(speed_lg_dist_parse("o", "normal:24,8", &ol, err, sizeof err) == SPEED_OK);
    const int n = 3000;
    speed_plan_request_t *r = speed_calloc(n, sizeof *r);
    /* more nodes never worse */
    speed_plan_workload_make(&pl, &ol, 30, SPEED_LG_ARRIVAL_POISSON, 11, r, n);
    double prev_ttft = INFINITY, prev_tpot = INFINITY;
    for (int k = 1; k <= 4; k++) {
        speed_plan_sim_params_t p = params(8, k, k);
        speed_plan_sim_result_t res;
        CHECK(speed_plan_sim_run(&p, r, n, 0, 0, &res) == SPEED_OK);
        CHECK_MSG(res.ttft_p90_ms <= prev_ttft * 1.001 && res.tpot_p90_ms <= prev_tpot * 1.001,
                  "%d+%d nodes: TTFT p90 %.2f (before %.2f), TPOT p90 %.3f (before %.3f)", k, k, res.ttft_p90_ms,
                  prev_ttft, res.tpot_p90_ms, prev_tpot);
        prev_ttft = res.ttft_p90_ms;
        prev_tpot = res.tpot_p90_ms;
    }
    /* a higher rate never better */
    prev_ttft = 0;
    for (double rate = 5; rate <= 40; rate += 5) {
        speed_plan_workload_make(&pl, &ol, rate, SPEED_LG_ARRIVAL_POISSON, 11, r, n);
        speed_plan_sim_params_t p = params(8, 1, 1);
        speed_plan_sim_result_t res;
        CHECK(speed_plan_sim_run(&p, r, n, 0, 0, &res) == SPEED_OK);
        CHECK_MSG(res.ttft_p90_ms >= prev_ttft * 0.999, "rate %.0f: TTFT p90 %.2f below %.2f at a lower rate", rate,
                  res.ttft_p90_ms, prev_ttft);
        prev_ttft = res.ttft_p90_ms;
    }
    speed_free(r);
}

static void test_determinism(void) {
    speed_lg_dist_t pl = {SPEED_LG_DIST_LOGNORMAL, 200, 0.5}, ol = {SPEED_LG_DIST_UNIFORM, 8, 40};
    speed_plan_request_t *a = speed_calloc(500, sizeof *a), *b = speed_calloc(500, sizeof *b);
    speed_plan_workload_make(&pl, &ol, 20, SPEED_LG_ARRIVAL_POISSON, 42, a, 500);
    speed_plan_workload_make(&pl, &ol, 20, SPEED_LG_ARRIVAL_POISSON, 42, b, 500);
    CHECK(memcmp(a, b, 500 * sizeof *a) == 0);
    speed_plan_sim_params_t p = params(4, 2, 1);
    speed_plan_sim_result_t ra, rb;
    CHECK(speed_plan_sim_run(&p, a, 500, 100, 10, &ra) == SPEED_OK);
    CHECK(speed_plan_sim_run(&p, b, 500, 100, 10, &rb) == SPEED_OK);
    CHECK(memcmp(&ra, &rb, sizeof ra) == 0);
    speed_plan_workload_make(&pl, &ol, 20, SPEED_LG_ARRIVAL_POISSON, 43, b, 500);
    CHECK(memcmp(a, b, 500 * sizeof *a) != 0);
    /* lengths: a lognormal's sample mean near its mean; uniform within bounds */
    double sum = 0;
    for (int i = 0; i < 500; i++) {
        sum += (double)a[i].prompt;
        CHECK(a[i].output >= 8 && a[i].output <= 40);
    }
    CHECK_MSG(fabs(sum / 500 - speed_plan_len_mean(&pl)) < 20, "lognormal mean %.1f, expected %.1f", sum / 500,
              speed_plan_len_mean(&pl));
    speed_free(a);
    speed_free(b);
}

static void test_rate_match(void) {
    /* prefill at C = 8: rows min(512, 4 x 100) = 400 -> 40 ms -> 10 prompts/40 ms... = 100/s;
     * at C = 4: 24 ms -> 166.7/s. decode: 16 per 9 ms step, 31 steps a request -> 57.3/s */
    double prps, drps;
    speed_plan_rate_match(speed_plan_profile_depth(&prof, 8), 512, 4, 16, 100, 32, &prps, &drps);
    CHECK_MSG(fabs(prps - 100.0) < 1e-6, "prefill %.6f", prps);
    CHECK_MSG(fabs(drps - 16.0 / 9.0 * 1000.0 / 31.0) < 1e-6, "decode %.6f", drps);
    speed_plan_rate_match(speed_plan_profile_depth(&prof, 4), 512, 4, 16, 100, 32, &prps, &drps);
    CHECK_MSG(fabs(prps - 1000.0 / 6.0) < 1e-6, "prefill at C=4 %.6f", prps);
    speed_plan_rate_match(speed_plan_profile_depth(&prof, 8), 512, 4, 16, 100, 1, &prps, &drps);
    CHECK(isinf(drps));
    /* a fixed 5 ms per step: four prompts of 100 share it (45 ms for 400 rows -> 88.9/s) */
    speed_plan_depth_t d = {.prefill_layers = 8, .n_prefill = 2, .n_decode = 1};
    d.prefill[0] = (speed_plan_point_t){1, 5.1};
    d.prefill[1] = (speed_plan_point_t){1024, 107.4};
    d.decode[0] = (speed_plan_decode_point_t){1, 0, 1};
    speed_plan_rate_match(&d, 512, 4, 16, 100, 32, &prps, &drps);
    CHECK_MSG(fabs(prps - 400.0 / 45.0 * 1000.0 / 100.0) < 1e-6, "prefill with a fixed step cost %.6f", prps);
}

static void test_bad_profiles(void) {
    speed_plan_profile_t p;
    char err[512];
    CHECK(speed_plan_profile_parse("{\"schema\": ", "x", &p, err, sizeof err) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "not valid JSON") != NULL);
    CHECK(speed_plan_profile_parse("{\"schema\": \"other/1\"}", "x", &p, err, sizeof err) ==
          SPEED_ERR_INVALID_ARGUMENT);
    CHECK(strstr(err, "schema") != NULL);
    /* every edit below breaks one field */
    static const char *const breaks[][2] = {
        {"\"layers\": 8", "\"layers\": 0"},
        {"\"kv_bytes_per_token_layer\": 512", "\"kv_bytes_per_token_layer\": \"x\""},
        {"{\"tokens\": 1024, \"ms\": 61.44}", "{\"tokens\": 1, \"ms\": 61.44}"},
        {"{\"tokens\": 1, \"ms\": 0.06}", "{\"tokens\": 1, \"ms\": -1}"},
        {"\"prefill_layers\": 4", "\"prefill_layers\": 9"},
        {"\"prefill_layers\": 4", "\"prefill_layers\": 8"},
        {"{\"batch\": 16, \"context\": 0, \"ms\": 9}]},", "{\"batch\": 1, \"context\": 0, \"ms\": 9}]},"},
        {"\"max_step_tokens\": 512", "\"max_step_tokens\": null"},
    };
    for (size_t i = 0; i < sizeof breaks / sizeof breaks[0]; i++) {
        const char *at = strstr(profile_text, breaks[i][0]);
        CHECK(at != NULL);
        if (!at) continue;
        char text[4096];
        snprintf(text, sizeof text, "%.*s%s%s", (int)(at - profile_text), profile_text, breaks[i][1],
                 at + strlen(breaks[i][0]));
        err[0] = '\0';
        CHECK_MSG(speed_plan_profile_parse(text, "bad.json", &p, err, sizeof err) == SPEED_ERR_INVALID_ARGUMENT,
                  "edit %zu accepted", i);
        CHECK_MSG(strncmp(err, "bad.json: ", 10) == 0, "edit %zu: error '%s'", i, err);
    }
    CHECK(speed_plan_profile_load("/nonexistent/p.json", &p, err, sizeof err) == SPEED_ERR_IO);
}

static void test_workload_is_loadgens(void) {
    /* the plan simulates exactly the requests speedctl loadgen sends with the same SPECs and seed */
    speed_lg_dist_t pl = {SPEED_LG_DIST_UNIFORM, 16, 64}, ol = {SPEED_LG_DIST_FIXED, 32, 0};
    speed_plan_request_t r[50];
    speed_plan_workload_make(&pl, &ol, 8, SPEED_LG_ARRIVAL_POISSON, 7, r, 50);
    speed_lg_workload_params_t wp = {.prompt = pl,
                                     .output = ol,
                                     .max_tokens_clamp = SPEED_PLAN_LENGTH_MAX,
                                     .rate = 8,
                                     .arrival = SPEED_LG_ARRIVAL_POISSON,
                                     .time_scale = 1,
                                     .seed = 7};
    speed_lg_workload_t w;
    speed_lg_workload_init(&w, &wp);
    for (int i = 0; i < 50; i++) {
        speed_lg_job_t job;
        CHECK(speed_lg_workload_next(&w, &job));
        CHECK(job.prompt_tokens == r[i].prompt && job.output_tokens == r[i].output && job.arrival_s == r[i].arrival_s);
    }
    CHECK(speed_plan_len_mean(&pl) == 40);
    speed_lg_dist_t ln = {SPEED_LG_DIST_LOGNORMAL, 100, 0.5};
    CHECK(fabs(speed_plan_len_mean(&ln) - 100 * exp(0.125)) < 1e-9);
}

typedef struct {
    int rc;
    char *out, *err;
} run_t;

static const char *speedctl;

static run_t run(const char *fmt, ...) {
    char args[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    run_t r = {0};
    r.rc = tu_system("'%s' %s >'%s' 2>'%s'", speedctl, args, tu_path("out"), tu_path("err"));
    r.out = tu_read(tu_path("out"), NULL);
    r.err = tu_read(tu_path("err"), NULL);
    if (!r.out) r.out = calloc(1, 1);
    if (!r.err) r.err = calloc(1, 1);
    return r;
}

static void run_free(run_t *r) {
    free(r->out);
    free(r->err);
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

/* speedctl profile for real on a tiny model (default --kv-dtype auto), and plan reading it */
static void test_profile_cli(void) {
    char model[1024], prof_path[1024];
    snprintf(model, sizeof model, "%s", tu_path("tiny"));
    snprintf(prof_path, sizeof prof_path, "%s", tu_path("real-profile.json"));
    run_t r = run("make-tiny-model '%s' --layers 4 --hidden 64 --heads 4 --kv-heads 2 --ffn 128 --dtype bf16", model);
    CHECK_MSG(r.rc == 0, "make-tiny-model: %s", r.err);
    run_free(&r);
    r = run("profile --model '%s' --threads 1 --prefill-layers 2,4 --prompt-tokens 8,16 --batch-sizes 1,2 "
            "--context-tokens 16 --repeat 1 --decode-steps 2 --out '%s'",
            model, prof_path);
    CHECK_MSG(r.rc == 0, "profile failed (%d): %s", r.rc, r.err);
    run_free(&r);
    json_error_t je;
    json_t *p = json_load_file(prof_path, 0, &je);
    CHECK_MSG(p != NULL, "profile JSON: %s", je.text);
    json_t *m = json_object_get(p, "model");
    /* K and V of one token in one layer: 2 x 2 KV heads x head dim 16 x 2 bytes (bf16, the checkpoint's) */
    CHECK_MSG(json_number_value(json_object_get(m, "kv_bytes_per_token_layer")) == 2 * 2 * 16 * 2,
              "kv_bytes_per_token_layer %g", json_number_value(json_object_get(m, "kv_bytes_per_token_layer")));
    CHECK_STR_EQ(json_string_value(json_object_get(m, "kv_dtype")), "bf16");
    json_decref(p);
    r = run("plan --profile '%s' --rate 5 --prompt-tokens fixed:16 --output-tokens fixed:4 --slo-ttft-p90-ms 10000 "
            "--slo-tpot-p90-ms 10000 --max-nodes 2 --requests 100",
            prof_path);
    CHECK_MSG(r.rc == 0 && strstr(r.out, "<- recommended"), "plan on a measured profile (%d): %s%s", r.rc, r.out,
              r.err);
    run_free(&r);
}

static void test_cli(void) {
    char prof_path[1024], dir[1024], yaml[1100];
    snprintf(prof_path, sizeof prof_path, "%s", tu_path("profile.json"));
    snprintf(dir, sizeof dir, "%s", tu_path("plan"));
    write_text(prof_path, profile_text);
    /* 60/s of 100-token prompts: C = 8 needs 1 prefill node (100/s, 60% busy); the planner
     * recommends the fewest nodes that meet the SLOs */
    run_t r =
        run("plan --profile '%s' --rate 60 --prompt-tokens fixed:100 --output-tokens fixed:16 --slo-ttft-p90-ms 80 "
            "--slo-tpot-p90-ms 20 --max-nodes 4 --out '%s' --requests 1000",
            prof_path, dir);
    CHECK_MSG(r.rc == 0, "plan failed (%d): %s", r.rc, r.err);
    CHECK(strstr(r.out, "<- recommended") != NULL);
    CHECK(strstr(r.out, "rate matching") != NULL);
    CHECK(strstr(r.out, "C = L") != NULL);
    CHECK(strstr(r.out, "recommended  1 prefill + 1 decode node(s), TP 1, C = 4 of 8") != NULL);
    run_free(&r);
    /* the cluster file loads through the cluster config loader as speedctl up reads it */
    snprintf(yaml, sizeof yaml, "%s/cluster.yaml", dir);
    char *argv[] = {"speed-test", "--config", yaml, NULL};
    speed_cluster_config_t c;
    speed_config_t *cfg = NULL;
    CHECK(speed_cluster_config_load(3, argv, "router", &c, &cfg) == SPEED_OK);
    if (cfg) {
        CHECK_INT_EQ(c.prefill.replicas, 1);
        CHECK_INT_EQ(c.decode.replicas, 1);
        CHECK_STR_EQ(c.prefill_layers, "4");
        CHECK_STR_EQ(c.model, "/models/m");
        CHECK(c.decode.max_running >= 4 && c.decode.max_running <= 16);
        CHECK_INT_EQ(c.prefill.max_running, 4);
        speed_config_destroy(cfg);
    }
    /* plan.json: the candidates, the recommendation first */
    char pj[1100];
    snprintf(pj, sizeof pj, "%s/plan.json", dir);
    json_error_t je;
    json_t *plan = json_load_file(pj, 0, &je);
    CHECK(plan != NULL);
    json_t *cands = json_object_get(plan, "candidates"), *first = json_array_get(cands, 0);
    CHECK(json_array_size(cands) >= 3);
    CHECK_INT_EQ(json_integer_value(json_object_get(first, "prefill")), 1);
    CHECK(json_is_true(json_object_get(first, "meets_slos")));
    CHECK(json_real_value(json_object_get(first, "max_rate_rps")) >= 60);
    double max1 = json_real_value(json_object_get(first, "max_rate_rps"));
    CHECK(json_is_true(json_object_get(first, "headroom_ok")));
    json_decref(plan);
    /* --headroom: at 90 % of 1P1D's max rate it meets the SLOs with less than the default 25 % to
     * spare, so a bigger cluster is recommended; with --headroom 0 the smallest one that meets */
    r = run("plan --profile '%s' --rate %.3f --prompt-tokens fixed:100 --output-tokens fixed:16 --slo-ttft-p90-ms 80 "
            "--slo-tpot-p90-ms 20 --max-nodes 4 --requests 1000 --prefill-layers 4",
            prof_path, 0.9 * max1);
    CHECK_MSG(r.rc == 0, "plan failed (%d): %s", r.rc, r.err);
    CHECK_MSG(strstr(r.out, "recommended  1 prefill + 1 decode") == NULL && strstr(r.out, "meets, no headroom"), "%s",
              r.out);
    run_free(&r);
    r = run("plan --profile '%s' --rate %.3f --prompt-tokens fixed:100 --output-tokens fixed:16 --slo-ttft-p90-ms 80 "
            "--slo-tpot-p90-ms 20 --max-nodes 4 --requests 1000 --prefill-layers 4 --headroom 0",
            prof_path, 0.9 * max1);
    CHECK_MSG(r.rc == 0 && strstr(r.out, "recommended  1 prefill + 1 decode"), "%s%s", r.out, r.err);
    run_free(&r);
    /* only 2 nodes allowed: none has the headroom, the one that meets is recommended, and says so */
    r = run("plan --profile '%s' --rate %.3f --prompt-tokens fixed:100 --output-tokens fixed:16 --slo-ttft-p90-ms 80 "
            "--slo-tpot-p90-ms 20 --max-nodes 2 --requests 1000 --prefill-layers 4",
            prof_path, 0.9 * max1);
    CHECK_MSG(r.rc == 0 && strstr(r.out, "recommended  1 prefill + 1 decode") && strstr(r.out, "headroom     none"),
              "%s%s", r.out, r.err);
    run_free(&r);
    /* a rate that one prefill node at C = 8 cannot serve, but at C = 4 can: SPEED needs fewer */
    r = run("plan --profile '%s' --rate 120 --prompt-tokens fixed:100 --output-tokens fixed:4 --slo-ttft-p90-ms 200 "
            "--slo-tpot-p90-ms 50 --max-nodes 4 --requests 1000",
            prof_path);
    CHECK_MSG(r.rc == 0, "plan failed (%d): %s", r.rc, r.err);
    CHECK_MSG(strstr(r.out, "C = L needs 2 prefill") != NULL, "%s", r.out);
    run_free(&r);
    /* at C = L alone, one prefill node cannot keep up with 120/s: the fewest nodes that meet the
     * SLOs are two prefill nodes, not the smallest cluster */
    r = run("plan --profile '%s' --rate 120 --prompt-tokens fixed:100 --output-tokens fixed:4 --slo-ttft-p90-ms 200 "
            "--slo-tpot-p90-ms 50 --max-nodes 3 --requests 1000 --prefill-layers 8",
            prof_path);
    CHECK_MSG(r.rc == 0, "plan failed (%d): %s", r.rc, r.err);
    CHECK_MSG(strstr(r.out, "recommended  2 prefill + 1 decode") != NULL, "%s", r.out);
    run_free(&r);
    /* a TTFT SLO one prefill node misses (queueing) though rate matching admits it: the fewer
     * nodes lose to the candidate that meets the SLOs */
    r = run("plan --profile '%s' --rate 60 --prompt-tokens fixed:100 --output-tokens fixed:16 --slo-ttft-p90-ms 16 "
            "--slo-tpot-p90-ms 20 --max-nodes 3 --requests 1000 --prefill-layers 8",
            prof_path);
    CHECK_MSG(r.rc == 0, "plan failed (%d): %s", r.rc, r.err);
    CHECK_MSG(strstr(r.out, "recommended  2 prefill + 1 decode") != NULL, "%s", r.out);
    run_free(&r);
    /* --slowdown 2: every step twice as long, so one prefill node at C = 4 serves half as much */
    r = run("plan --profile '%s' --rate 10 --prompt-tokens fixed:100 --output-tokens fixed:16 --slowdown 2", prof_path);
    CHECK_MSG(r.rc == 0 && strstr(r.out, "     4   1        83.33"), "%s%s", r.out, r.err);
    run_free(&r);
    /* impossible SLOs: a clear message, exit 1 */
    r = run("plan --profile '%s' --rate 10 --prompt-tokens fixed:100 --output-tokens fixed:16 --slo-ttft-p90-ms 1 "
            "--slo-tpot-p90-ms 20 --max-nodes 3 --requests 200",
            prof_path);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_MSG(strstr(r.err, "error: no candidate within 3 nodes meets") != NULL, "%s", r.err);
    run_free(&r);
    /* a corrupt profile */
    char bad[1100];
    snprintf(bad, sizeof bad, "%s", tu_path("bad.json"));
    write_text(bad, "{\"schema\": \"speedserve-profile/1\", \"model\": [");
    r = run("plan --profile '%s' --rate 10 --prompt-tokens fixed:100 --output-tokens fixed:16", bad);
    CHECK_INT_EQ(r.rc, 1);
    CHECK_MSG(strstr(r.err, "not valid JSON") != NULL, "%s", r.err);
    run_free(&r);
    /* usage errors: a bad spec, a cutoff not profiled, no workload */
    r = run("plan --profile '%s' --rate 10 --prompt-tokens uniform:9 --output-tokens fixed:16", prof_path);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_MSG(strstr(r.err, "--prompt-tokens") != NULL, "%s", r.err);
    run_free(&r);
    r = run("plan --profile '%s' --rate 10 --prompt-tokens fixed:10 --output-tokens fixed:16 --prefill-layers 6",
            prof_path);
    CHECK_INT_EQ(r.rc, 2);
    CHECK(strstr(r.err, "C = 6 is not in the profile") != NULL);
    run_free(&r);
    r = run("plan --profile '%s'", prof_path);
    CHECK_INT_EQ(r.rc, 2);
    run_free(&r);
    /* a trace: its own rate; a bad line is named */
    char trace[1100];
    snprintf(trace, sizeof trace, "%s", tu_path("trace.jsonl"));
    FILE *f = fopen(trace, "w");
    for (int i = 0; f && i < 200; i++)
        fprintf(f, "{\"arrival_ms\": %d, \"input_tokens\": %d, \"output_tokens\": 8}\n", 1000 + i * 50, 50 + i % 50);
    if (f) fclose(f);
    r = run("plan --profile '%s' --trace '%s' --slo-ttft-p90-ms 100 --slo-tpot-p90-ms 20 --max-nodes 2", prof_path,
            trace);
    CHECK_MSG(r.rc == 0, "trace plan failed: %s", r.err);
    CHECK(strstr(r.out, "workload     20 requests/s") != NULL);
    run_free(&r);
    f = fopen(trace, "a");
    if (f) {
        fputs("# a comment\n{\"arrival_ms\": 99999, \"input_tokens\": 5}\n", f);
        fclose(f);
    }
    r = run("plan --profile '%s' --trace '%s'", prof_path, trace);
    CHECK_INT_EQ(r.rc, 2);
    CHECK_MSG(strstr(r.err, "line 202") != NULL, "%s", r.err);
    run_free(&r);
    /* --emit k8s: the manifests of the recommendation beside its cluster file */
    r = run("plan --profile '%s' --rate 10 --prompt-tokens fixed:10 --output-tokens fixed:16 --emit k8s --out '%s'",
            prof_path, dir);
    CHECK_INT_EQ(r.rc, 2);
    CHECK(strstr(r.err, "--image") != NULL);
    run_free(&r);
    r = run("plan --profile '%s' --rate 120 --prompt-tokens fixed:100 --output-tokens fixed:4 --slo-ttft-p90-ms 200 "
            "--slo-tpot-p90-ms 50 --max-nodes 3 --requests 1000 --prefill-layers 8 --emit k8s --image speedserve:test "
            "--out '%s'",
            prof_path, dir);
    CHECK_MSG(r.rc == 0, "plan --emit k8s failed: %s", r.err);
    char *kust = tu_read(tu_path("plan/k8s/kustomization.yaml"), NULL),
         *pre = tu_read(tu_path("plan/k8s/prefill.yaml"), NULL);
    CHECK(kust != NULL && pre != NULL);
    CHECK_MSG(pre && strstr(pre, "replicas: 2") && strstr(pre, "speedserve:test"), "%s", pre ? pre : "");
    free(kust);
    free(pre);
    run_free(&r);
}

int main(void) {
    char err[512];
    if (speed_plan_profile_parse(profile_text, "test", &prof, err, sizeof err) != SPEED_OK) {
        fprintf(stderr, "the test's profile: %s\n", err);
        return 1;
    }
    test_profile_lookups();
    test_md1();
    test_deterministic_arrivals();
    test_saturation();
    test_shared_cores();
    test_client_work();
    test_first_token_at_step_boundary();
    test_correction_factors();
    test_chunking();
    test_late_clock();
    test_monotone();
    test_determinism();
    test_rate_match();
    test_bad_profiles();
    test_workload_is_loadgens();
    speedctl = getenv("SPEEDCTL");
    if (speedctl && tu_tmp_init("test_plan")) {
        test_cli();
        test_profile_cli();
    } else
        fprintf(stderr, "SPEEDCTL not set: the CLI checks are skipped\n");
    return CHECK_DONE();
}
