/* speed_sampler: greedy, temperature, top-k, top-p, seeds, the sampled distribution,
 * logprobs, bad logits and bad parameters. */

#include "alloc.h"
#include "check.h"
#include "test_log.h"
#include "log.h"
#include "sampler.h"
#include "test_clock.h"

static speed_sampler_t *sampler;

static speed_sample_t sample(const speed_sampling_params_t *p, speed_rng_t *rng, const float *logits, int n) {
    speed_sample_t out = {.id = -1};
    speed_status_t st = speed_sampler_sample(sampler, p, rng, logits, n, &out);
    CHECK_MSG(st == SPEED_OK, "sample failed: %s", speed_log_last_error());
    return out;
}

/* Deterministic pseudo-random logits in [-scale, scale). */
static void logits_fill(float *x, int n, uint64_t seed, float scale) {
    speed_rng_t r;
    speed_rng_init(&r, seed);
    for (int i = 0; i < n; i++) x[i] = (float)((speed_rng_uniform(&r) * 2.0 - 1.0) * scale);
}

static void test_greedy(void) {
    float x[] = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f};
    speed_sampling_params_t p = speed_sampling_default_params();
    p.temperature = 0.0f;
    speed_sample_t s = sample(&p, NULL, x, 5);
    CHECK_INT_EQ(s.id, 1); /* tie between 1 and 3: the lowest id */
    CHECK_INT_EQ(s.n_top, 0);
    /* greedy does not advance the generator */
    speed_rng_t a, b;
    speed_rng_init(&a, 9);
    b = a;
    s = sample(&p, &a, x, 5);
    CHECK(memcmp(&a, &b, sizeof a) == 0);
    /* one-token vocabulary */
    s = sample(&p, NULL, x + 2, 1);
    CHECK_INT_EQ(s.id, 0);
    CHECK_NEAR(s.logprob, 0.0, 1e-7);
}

static void test_temperature_limit(void) {
    enum { N = 1000 };
    static float x[N];
    logits_fill(x, N, 5, 4.0f);
    x[777] = 4.5f; /* unique maximum, but close to others */
    speed_sampling_params_t p = speed_sampling_default_params();
    const float temps[] = {1e-3f, 1e-6f, 1e-30f, 1e-45f /* denormal: 1/T overflows */};
    speed_rng_t rng;
    speed_rng_init(&rng, 1);
    int bad = 0;
    for (size_t t = 0; t < sizeof temps / sizeof temps[0]; t++) {
        p.temperature = temps[t];
        for (int i = 0; i < 200; i++) bad += sample(&p, &rng, x, N).id != 777;
    }
    CHECK_INT_EQ(bad, 0);
    /* and a high temperature spreads the choices */
    p.temperature = 100.0f;
    int distinct_hits = 0;
    static char seen[N];
    for (int i = 0; i < 500; i++) {
        int id = sample(&p, &rng, x, N).id;
        distinct_hits += !seen[id];
        seen[id] = 1;
    }
    CHECK_MSG(distinct_hits > 200, "%d distinct ids at temperature 100", distinct_hits);
}

static void test_top_k1_is_greedy(void) {
    enum { N = 5000 };
    static float x[N];
    speed_rng_t rng;
    speed_rng_init(&rng, 77);
    int bad = 0;
    for (int round = 0; round < 50; round++) {
        logits_fill(x, N, 100 + (uint64_t)round, 3.0f);
        if (round % 2) x[N - 1] = x[round] = 3.5f; /* a tie: the lower id wins */
        speed_sampling_params_t g = speed_sampling_default_params(), k1 = g;
        g.temperature = 0.0f;
        k1.top_k = 1;
        k1.temperature = 1.5f;
        bad += sample(&g, NULL, x, N).id != sample(&k1, &rng, x, N).id;
        k1.top_p = 0.3f; /* both truncations together */
        bad += sample(&g, NULL, x, N).id != sample(&k1, &rng, x, N).id;
    }
    CHECK_INT_EQ(bad, 0);
}

/* Counts draws per id over n_draws; returns counts in `counts`. */
static void draw_counts(const speed_sampling_params_t *p, const float *x, int n, int n_draws, int *counts) {
    speed_rng_t rng;
    speed_rng_init(&rng, p->seed);
    memset(counts, 0, (size_t)n * sizeof *counts);
    for (int i = 0; i < n_draws; i++) {
        speed_sample_t s = sample(p, &rng, x, n);
        if (s.id >= 0 && s.id < n) counts[s.id]++;
    }
}

/* Pearson chi-square of counts against probabilities `want` (ids with want 0 must get 0). */
static double chi_square(const int *counts, const double *want, int n, int n_draws, int *impossible_p) {
    double chi = 0.0;
    *impossible_p = 0;
    for (int i = 0; i < n; i++) {
        if (want[i] == 0.0) {
            *impossible_p += counts[i];
            continue;
        }
        double e = want[i] * n_draws;
        chi += (counts[i] - e) * (counts[i] - e) / e;
    }
    return chi;
}

/* The distribution sampling should give, computed plainly from sampler.h's rule: weights
 * exp((x - max) / T); the k best (logit descending, ties to the lower id); of those, the
 * shortest prefix whose mass reaches top_p of the k's mass (at least one token); renormalised.
 * Also returns, in *margin_p, how close any prefix mass came to the top_p cut (relative): a case
 * must keep away from the cut, or float rounding could legitimately flip one token in or out. */
static void reference_dist(const float *x, int n, float temperature, int top_k, float top_p, double *want,
                           double *margin_p) {
    int order[64];
    double w[64], max = -INFINITY;
    for (int i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
    for (int i = 0; i < n; i++) {
        order[i] = i;
        w[i] = exp(((double)x[i] - max) / (double)temperature);
    }
    for (int i = 1; i < n; i++) /* insertion sort: logit descending, then id ascending */
        for (int j = i;
             j > 0 && (x[order[j]] > x[order[j - 1]] || (x[order[j]] == x[order[j - 1]] && order[j] < order[j - 1]));
             j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    int k = top_k > 0 && top_k < n ? top_k : n;
    double mass_k = 0.0;
    for (int r = 0; r < k; r++) mass_k += w[order[r]];
    double limit = (double)top_p * mass_k, cum = 0.0;
    int keep = 0;
    *margin_p = 1.0;
    while (keep < k && (keep == 0 || cum < limit)) {
        cum += w[order[keep++]];
        double m = fabs(cum - limit) / mass_k;
        if (top_p < 1.0f) *margin_p = m < *margin_p ? m : *margin_p; /* 1 = off: no cut */
    }
    for (int i = 0; i < n; i++) want[i] = 0.0;
    for (int r = 0; r < keep; r++) want[order[r]] = w[order[r]] / cum;
}

/* top_k and top_p together (and each alone) against the exact distribution above: a chi-square
 * bound on the counts, a bound on the largest frequency error, and no draw outside the kept set.
 * The cases make the top-p cut land on a different token for every plausible misreading of the
 * rule: top-p over the whole vocabulary's mass instead of the k's, a cut at (1 - top_p), a cut
 * that stops one token early or late, top-p before top-k, ties broken by the higher id. */
static void test_top_k_top_p_distribution(void) {
    enum { N = 10 };
    /* a: spread out, with real mass outside the top k; b: ties at the top-k boundary (ids 2, 5
     * and 7 share a logit: the lower ids win) */
    static const float xa[N] = {2.0f, 0.3f, 1.4f, -0.5f, 1.9f, 0.9f, -1.2f, 1.1f, 0.0f, 0.6f};
    static const float xb[N] = {1.0f, -0.3f, 0.5f, 1.6f, -1.0f, 0.5f, 0.2f, 0.5f, -2.0f, 1.2f};
    const struct {
        const float *x;
        float temperature;
        int top_k;
        float top_p;
    } cases[] = {
        {xa, 1.0f, 5, 0.8f},  {xa, 1.0f, 6, 0.6f}, {xa, 0.7f, 4, 0.9f}, {xa, 1.6f, 7, 0.75f},
        {xa, 1.0f, 3, 0.97f}, {xa, 2.5f, 8, 0.5f}, {xb, 1.0f, 4, 0.7f}, {xb, 0.8f, 5, 0.85f},
        {xb, 1.3f, 6, 0.9f},  {xa, 1.0f, 5, 1.0f}, {xa, 1.0f, 0, 0.7f},
    };
    const int n_draws = 60000;
    int counts[N];
    double want[N];
    double worst_chi = 0.0, worst_diff = 0.0;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        speed_sampling_params_t p = speed_sampling_default_params();
        p.temperature = cases[c].temperature;
        p.top_k = cases[c].top_k;
        p.top_p = cases[c].top_p;
        p.seed = 7000 + (uint64_t)c * 31; /* a different generator per case */
        double margin;
        reference_dist(cases[c].x, N, p.temperature, p.top_k, p.top_p, want, &margin);
        /* the case itself: the cut is clear of rounding (relative mass 1e-3 >> float error) */
        CHECK_MSG(margin > 1e-3, "case %zu: a prefix mass is within %g of the top_p cut", c, margin);
        draw_counts(&p, cases[c].x, N, n_draws, counts);
        int impossible;
        double chi = chi_square(counts, want, N, n_draws, &impossible), diff = 0.0;
        for (int i = 0; i < N; i++) {
            double d = fabs((double)counts[i] / n_draws - want[i]);
            diff = d > diff ? d : diff;
        }
        worst_chi = chi > worst_chi ? chi : worst_chi;
        worst_diff = diff > worst_diff ? diff : worst_diff;
        /* Fixed seeds make this deterministic. df <= 7: the chi-square's 99.99th percentile is
         * about 29, and 40 is what test_distribution allows. A frequency's standard error is at
         * most sqrt(0.25 / 60000) = 0.002: 0.012 is 6 of them, while the misreadings above move
         * some probability by 0.05 or more (a token in or out of a nucleus of <= 8). */
        CHECK_MSG(impossible == 0, "case %zu (T %g top_k %d top_p %g): %d draws outside the kept set", c,
                  (double)p.temperature, p.top_k, (double)p.top_p, impossible);
        CHECK_MSG(chi < 40.0 && diff < 0.012, "case %zu (T %g top_k %d top_p %g): chi-square %.1f, max |freq - p| %.4f",
                  c, (double)p.temperature, p.top_k, (double)p.top_p, chi, diff);
    }
    fprintf(stderr,
            "top_k + top_p: %zu cases x %d draws, worst chi-square %.1f (bound 40), worst |freq - p| %.4f "
            "(bound 0.012)\n",
            sizeof cases / sizeof cases[0], n_draws, worst_chi, worst_diff);
}

static void test_top_p_mass(void) {
    /* probabilities 0.5 0.3 0.15 0.05 at temperature 1 */
    float x[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    int counts[4];
    speed_sampling_params_t p = speed_sampling_default_params();
    p.seed = 3;
    const int n_draws = 40000;
    struct {
        float top_p;
        double want[4];
    } cases[] = {
        {0.5f, {1, 0, 0, 0}},                 /* the first token already holds 0.5 */
        {0.7f, {0.5 / 0.8, 0.3 / 0.8, 0, 0}}, /* 0.5 < 0.7 → the second joins */
        {0.81f, {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0}},
        {1.0f, {0.5, 0.3, 0.15, 0.05}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        p.top_p = cases[c].top_p;
        draw_counts(&p, x, 4, n_draws, counts);
        int impossible;
        double chi = chi_square(counts, cases[c].want, 4, n_draws, &impossible);
        CHECK_MSG(impossible == 0, "top_p %g: %d draws outside the nucleus", (double)p.top_p, impossible);
        CHECK_MSG(chi < 30.0, "top_p %g: chi-square %.1f (counts %d %d %d %d)", (double)p.top_p, chi, counts[0],
                  counts[1], counts[2], counts[3]);
    }

    /* Ten nearly equal tokens share one histogram bin: the cut bin is sorted exactly. */
    float flat[10];
    for (int i = 0; i < 10; i++) flat[i] = -0.0001f * (float)((i * 7) % 10); /* ids 0,3,6,9,2,... best first */
    int fc[10];
    p.top_p = 0.35f;
    p.seed = 8;
    draw_counts(&p, flat, 10, 20000, fc);
    /* best four: logits 0 (id 0), -0.0001 (id 3), -0.0002 (id 6), -0.0003 (id 9) */
    CHECK_MSG(fc[0] + fc[3] + fc[6] + fc[9] == 20000, "draws outside the 4-token nucleus: %d",
              20000 - (fc[0] + fc[3] + fc[6] + fc[9]));
    CHECK(fc[0] > 4000 && fc[3] > 4000 && fc[6] > 4000 && fc[9] > 4000);

    /* A 128k vocabulary: every draw lies in the nucleus computed by a full sort. */
    enum { V = 128256 };
    float *big = malloc(V * sizeof *big);
    logits_fill(big, V, 11, 6.0f);
    p.top_p = 0.9f;
    p.temperature = 0.7f;
    /* reference nucleus: probabilities at T, sorted */
    double *pr = malloc(V * sizeof *pr), z = 0.0, max = -1e30;
    for (int i = 0; i < V; i++) max = big[i] > max ? big[i] : max;
    for (int i = 0; i < V; i++) z += pr[i] = exp((big[i] - max) / 0.7);
    double *sorted = malloc(V * sizeof *sorted);
    for (int i = 0; i < V; i++) sorted[i] = pr[i] / z;
    /* selection sort of the top is too slow; a threshold is enough: find the probability of
     * the last token in the nucleus by bisection on the mass above a threshold */
    double lo = 0.0, hi = 1.0;
    for (int it = 0; it < 200; it++) {
        double mid = 0.5 * (lo + hi), mass = 0.0;
        for (int i = 0; i < V; i++) mass += sorted[i] > mid ? sorted[i] : 0.0;
        if (mass >= 0.9)
            lo = mid;
        else
            hi = mid;
    }
    /* tokens with probability > hi are certainly in; those below lo certainly out */
    speed_rng_t rng;
    speed_rng_init(&rng, 5);
    int outside = 0;
    for (int i = 0; i < 3000; i++) {
        speed_sample_t s = sample(&p, &rng, big, V);
        outside += sorted[s.id] < lo * 0.999;
    }
    CHECK_INT_EQ(outside, 0);
    free(sorted);
    free(pr);
    free(big);
}

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y ? 1 : 0;
}

/* top_k below and above the single-pass limit (256): draws stay within the k best. */
static void test_top_k_sets(void) {
    enum { N = 3000 };
    static float x[N], sorted[N];
    logits_fill(x, N, 31, 1.0f);
    memcpy(sorted, x, sizeof x);
    qsort(sorted, N, sizeof *sorted, cmp_desc);
    const int ks[] = {2, 40, 256, 257, 1000, 2999, 3000, 5000};
    speed_rng_t rng;
    speed_rng_init(&rng, 4);
    for (size_t t = 0; t < sizeof ks / sizeof ks[0]; t++) {
        speed_sampling_params_t p = speed_sampling_default_params();
        p.top_k = ks[t];
        float kth = sorted[(ks[t] < N ? ks[t] : N) - 1];
        int outside = 0;
        static char hit[N];
        memset(hit, 0, sizeof hit);
        int distinct = 0;
        for (int i = 0; i < 4000; i++) {
            int id = sample(&p, &rng, x, N).id;
            outside += x[id] < kth;
            distinct += !hit[id];
            hit[id] = 1;
        }
        CHECK_MSG(outside == 0, "top_k %d: %d draws outside", ks[t], outside);
        CHECK_MSG(ks[t] > 40 || distinct == ks[t], "top_k %d: %d distinct", ks[t], distinct);
    }
}

static void test_seeds(void) {
    enum { N = 32000, T = 300 };
    static float x[N];
    logits_fill(x, N, 21, 2.0f);
    speed_sampling_params_t p = speed_sampling_default_params();
    p.temperature = 0.9f;
    p.top_p = 0.95f;
    p.top_k = 200;
    int a[T], b[T], c[T];
    speed_rng_t r1, r2, r3;
    speed_rng_init(&r1, 1234);
    speed_rng_init(&r2, 1234);
    speed_rng_init(&r3, 1235);
    for (int i = 0; i < T; i++) {
        a[i] = sample(&p, &r1, x, N).id;
        b[i] = sample(&p, &r2, x, N).id;
        c[i] = sample(&p, &r3, x, N).id;
    }
    CHECK(memcmp(a, b, sizeof a) == 0);
    int same = 0;
    for (int i = 0; i < T; i++) same += a[i] == c[i];
    CHECK_MSG(same < T / 2, "seeds 1234 and 1235 agree on %d of %d draws", same, T);
    /* the full-vocabulary path too */
    p.top_k = 0;
    p.top_p = 1.0f;
    speed_rng_init(&r1, 99);
    speed_rng_init(&r2, 99);
    int diff = 0;
    for (int i = 0; i < T; i++) diff += sample(&p, &r1, x, N).id != sample(&p, &r2, x, N).id;
    CHECK_INT_EQ(diff, 0);
    /* seed 0 is a seed like any other (splitmix seeding) */
    speed_rng_init(&r1, 0);
    CHECK(speed_rng_next(&r1) != 0 || speed_rng_next(&r1) != 0);
}

static void test_distribution(void) {
    enum { N = 8 };
    float x[N] = {1.0f, 0.5f, 0.0f, -0.5f, 2.0f, 2.0f, -3.0f, 0.25f};
    const int n_draws = 100000;
    int counts[N];
    double want[N];
    speed_sampling_params_t p = speed_sampling_default_params();
    const float temps[] = {1.0f, 0.5f, 2.0f};
    for (size_t t = 0; t < 3; t++) {
        for (int k = 0; k <= 3; k += 3) {
            p.temperature = temps[t];
            p.top_k = k;
            p.seed = 1000 + t * 10 + (uint64_t)k;
            /* expected: softmax(x / T) over the top k (ids 4, 5, 0 for k = 3) */
            double z = 0.0;
            for (int i = 0; i < N; i++) {
                bool in = k == 0 || i == 4 || i == 5 || i == 0;
                want[i] = in ? exp(x[i] / temps[t]) : 0.0;
                z += want[i];
            }
            for (int i = 0; i < N; i++) want[i] /= z;
            draw_counts(&p, x, N, n_draws, counts);
            int impossible;
            double chi = chi_square(counts, want, N, n_draws, &impossible);
            /* df <= 7: the 99.99th percentile is about 29; allow more */
            CHECK_MSG(chi < 40.0 && impossible == 0, "T %g top_k %d: chi-square %.1f, %d impossible draws",
                      (double)temps[t], k, chi, impossible);
        }
    }
}

static void test_logprobs(void) {
    enum { N = 16 };
    float x[N];
    logits_fill(x, N, 8, 5.0f);
    speed_sampling_params_t p = speed_sampling_default_params();
    p.n_top_logprobs = N;
    p.temperature = 0.3f; /* logprobs do not depend on it */
    speed_rng_t rng;
    speed_rng_init(&rng, 2);
    speed_sample_t s = sample(&p, &rng, x, N);
    CHECK_INT_EQ(s.n_top, N);
    double mass = 0.0;
    bool sorted = true, found = false;
    for (int i = 0; i < s.n_top; i++) {
        mass += exp(s.top[i].logprob);
        CHECK(s.top[i].logprob <= 0.0f);
        if (i) sorted &= s.top[i - 1].logprob >= s.top[i].logprob;
        if (s.top[i].id == s.id) {
            found = true;
            CHECK_NEAR(s.top[i].logprob, s.logprob, 1e-6);
        }
    }
    CHECK_NEAR(mass, 1.0, 1e-5);
    CHECK(sorted);
    CHECK(found);
    /* same logprob at another temperature / with truncation, for the same chosen token */
    speed_sampling_params_t g = speed_sampling_default_params();
    g.temperature = 0.0f;
    g.n_top_logprobs = 3;
    speed_sample_t sg = sample(&g, NULL, x, N);
    CHECK_INT_EQ(sg.id, s.top[0].id);
    CHECK_NEAR(sg.logprob, s.top[0].logprob, 1e-6);
    CHECK_INT_EQ(sg.n_top, 3);
    CHECK_INT_EQ(sg.top[0].id, sg.id);
    /* exact value: log softmax */
    double z = 0.0;
    for (int i = 0; i < N; i++) z += exp((double)x[i]);
    CHECK_NEAR(sg.logprob, x[sg.id] - log(z), 1e-5);
    /* ties in top logprobs: lower id first */
    float t[5] = {1.0f, 2.0f, 2.0f, 0.0f, 2.0f};
    g.n_top_logprobs = 4;
    sg = sample(&g, NULL, t, 5);
    CHECK(sg.top[0].id == 1 && sg.top[1].id == 2 && sg.top[2].id == 4 && sg.top[3].id == 0);
    /* a large logit range stays finite and normalised */
    float w[3] = {80.0f, -80.0f, 0.0f};
    g.n_top_logprobs = 3;
    sg = sample(&g, NULL, w, 3);
    CHECK_NEAR(sg.logprob, 0.0, 1e-6);
    CHECK(isfinite(sg.top[2].logprob) && sg.top[2].logprob < -150.0f);
}

static void test_bad_logits(void) {
    float x[6] = {0.0f, 1.0f, 2.0f, 0.5f, -1.0f, 0.0f};
    speed_sampling_params_t p = speed_sampling_default_params();
    speed_rng_t rng;
    speed_rng_init(&rng, 1);
    speed_sample_t out = {.id = 12345};
    x[3] = NAN;
    CHECK_INT_EQ(speed_sampler_sample(sampler, &p, &rng, x, 6, &out), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "NaN");
    CHECK_CONTAINS(speed_log_last_error(), "token 3");
    CHECK_INT_EQ(out.id, 12345); /* untouched */
    x[3] = INFINITY;
    CHECK_INT_EQ(speed_sampler_sample(sampler, &p, &rng, x, 6, &out), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "+inf");
    /* -inf masks a token */
    x[3] = -INFINITY;
    x[2] = -INFINITY;
    p.n_top_logprobs = 6;
    int hits2 = 0;
    for (int i = 0; i < 2000; i++) {
        speed_sample_t s = sample(&p, &rng, x, 6);
        hits2 += s.id == 2 || s.id == 3;
        CHECK(s.n_top == 4);
    }
    p.top_k = 5;
    p.top_p = 0.99f;
    for (int i = 0; i < 2000; i++) hits2 += sample(&p, &rng, x, 6).id == 2;
    CHECK_INT_EQ(hits2, 0);
    for (int i = 0; i < 6; i++) x[i] = -INFINITY;
    CHECK_INT_EQ(speed_sampler_sample(sampler, &p, &rng, x, 6, &out), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "-inf");
    /* vocabulary larger than the workspace; sampling without a generator */
    x[0] = 0.0f;
    CHECK_INT_EQ(speed_sampler_sample(sampler, &p, &rng, x, 200000, &out), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_sampler_sample(sampler, &p, NULL, x, 6, &out), SPEED_ERR_INVALID_ARGUMENT);
}

static void test_bad_params(void) {
    speed_sampling_params_t ok = speed_sampling_default_params(), p;
    CHECK_INT_EQ(speed_sampling_params_validate(&ok), SPEED_OK);
    p = ok;
    p.temperature = -0.1f;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "temperature");
    p = ok;
    p.temperature = NAN;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    p = ok;
    p.temperature = INFINITY;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    p = ok;
    p.top_p = 0.0f;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "top_p");
    p = ok;
    p.top_p = 1.0001f;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    p = ok;
    p.top_p = NAN;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    p = ok;
    p.top_k = -1;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "top_k");
    p = ok;
    p.n_top_logprobs = 21;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    p = ok;
    p.n_top_logprobs = -1;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_ERR_INVALID_ARGUMENT);
    p = ok;
    p.n_top_logprobs = 20;
    p.top_k = 1000000;
    p.top_p = 1e-9f;
    p.temperature = 0.0f;
    CHECK_INT_EQ(speed_sampling_params_validate(&p), SPEED_OK);
    float x[3] = {0, 1, 2};
    speed_sample_t out;
    p = ok;
    p.top_p = 2.0f;
    CHECK_INT_EQ(speed_sampler_sample(sampler, &p, NULL, x, 3, &out), SPEED_ERR_INVALID_ARGUMENT);
    speed_sampler_t *s2 = NULL;
    CHECK_INT_EQ(speed_sampler_create(0, &s2), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(s2 == NULL);
    speed_sampler_destroy(NULL);
}

/* Not a timed test: prints the cost per token for a Llama 3 sized vocabulary. */
static void bench_large_vocab(void) {
    enum { V = 128256, REPS = 200 };
    float *x = malloc(V * sizeof *x);
    logits_fill(x, V, 3, 8.0f);
    struct {
        const char *name;
        float t, top_p;
        int top_k, n_top;
    } modes[] = {{"greedy", 0.0f, 1.0f, 0, 0},          {"greedy + 5 logprobs", 0.0f, 1.0f, 0, 5},
                 {"T=0.8", 0.8f, 1.0f, 0, 0},           {"T=0.8 top_k=40", 0.8f, 1.0f, 40, 0},
                 {"T=0.8 top_p=0.9", 0.8f, 0.9f, 0, 0}, {"T=0.8 top_k=50 top_p=0.9 20 logprobs", 0.8f, 0.9f, 50, 20}};
    speed_rng_t rng;
    speed_rng_init(&rng, 1);
    for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        speed_sampling_params_t p = speed_sampling_default_params();
        p.temperature = modes[m].t;
        p.top_p = modes[m].top_p;
        p.top_k = modes[m].top_k;
        p.n_top_logprobs = modes[m].n_top;
        double t0 = now_s();
        for (int i = 0; i < REPS; i++) sample(&p, &rng, x, V);
        double us = (now_s() - t0) * 1e6 / REPS;
        fprintf(stderr, "vocab %d, %-40s %8.1f us/token\n", V, modes[m].name, us);
    }
    free(x);
}

int main(void) {
    speed_log_set_sink(tu_log_discard, NULL); /* expected errors; read back with speed_log_last_error */
    if (speed_sampler_create(131072, &sampler) != SPEED_OK) return 1;
    int64_t live = speed_alloc_live_count();
    test_greedy();
    test_temperature_limit();
    test_top_k1_is_greedy();
    test_top_p_mass();
    test_top_k_top_p_distribution();
    test_top_k_sets();
    test_seeds();
    test_distribution();
    test_logprobs();
    test_bad_logits();
    test_bad_params();
    bench_large_vocab();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    speed_sampler_destroy(sampler);
    return CHECK_DONE();
}
