/* Next-token sampling: temperature, top-k, top-p, seeded draws, logprobs. */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "alloc.h"
#include "log.h"

/* A candidate token: its raw logit and id. Order: higher logit first, then lower id — a
 * total order (ids are unique), so selection and sorting are deterministic. */
typedef struct {
    float logit;
    int32_t id;
} cand_t;

/* top-p without top-k: a histogram of log-weights finds the nucleus without a sort. */
#define TOP_P_BINS         4096
#define TOP_P_BINS_PER_NAT 64.0f /* bins cover log-weights 0 .. -64; the rest share the last */

struct speed_sampler {
    int32_t n_vocab_max;
    cand_t *cand;     /* [n_vocab_max] */
    float *w;         /* [n_vocab_max] temperature weights exp((x - max) / T) */
    double *bin_mass; /* [TOP_P_BINS] */
};

speed_sampling_params_t speed_sampling_default_params(void) {
    speed_sampling_params_t p = {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 0, .n_top_logprobs = 0};
    return p;
}

speed_status_t speed_sampling_params_validate(const speed_sampling_params_t *p) {
    if (!p) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampling: params are NULL");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampling: temperature %g is out of range (must be finite and >= 0)",
                    (double)p->temperature);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (p->top_k < 0) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampling: top_k %d is out of range (0 = off, or >= 1)", (int)p->top_k);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampling: top_p %g is out of range (0, 1]", (double)p->top_p);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (p->n_top_logprobs < 0 || p->n_top_logprobs > SPEED_SAMPLER_MAX_TOP_LOGPROBS) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampling: top logprobs %d is out of range 0..%d", p->n_top_logprobs,
                    SPEED_SAMPLER_MAX_TOP_LOGPROBS);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

speed_status_t speed_sampler_create(int32_t n_vocab_max, speed_sampler_t **sampler_p) {
    if (n_vocab_max < 1 || n_vocab_max > (1 << 30)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampler: vocabulary size %d is out of range 1..%d", (int)n_vocab_max,
                    1 << 30);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_sampler_t *s = speed_calloc(1, sizeof *s);
    if (!s) return SPEED_ERR_NO_MEMORY;
    s->n_vocab_max = n_vocab_max;
    s->cand = speed_malloc((size_t)n_vocab_max * sizeof *s->cand);
    s->w = speed_malloc((size_t)n_vocab_max * sizeof *s->w);
    s->bin_mass = speed_malloc(TOP_P_BINS * sizeof *s->bin_mass);
    if (!s->cand || !s->w || !s->bin_mass) {
        speed_sampler_destroy(s);
        return SPEED_ERR_NO_MEMORY;
    }
    *sampler_p = s;
    return SPEED_OK;
}

void speed_sampler_destroy(speed_sampler_t *s) {
    if (!s) return;
    speed_free(s->cand);
    speed_free(s->w);
    speed_free(s->bin_mass);
    speed_free(s);
}

static inline bool cand_better(cand_t a, cand_t b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); }

static int cand_cmp(const void *pa, const void *pb) {
    cand_t a = *(const cand_t *)pa, b = *(const cand_t *)pb;
    return cand_better(a, b) ? -1 : cand_better(b, a) ? 1 : 0;
}

static inline void cand_swap(cand_t *a, cand_t *b) {
    cand_t t = *a;
    *a = *b;
    *b = t;
}

/* Rearranges c[0..n) so that c[0..m) are the m best candidates (in no particular order).
 * Quickselect with a median-of-three pivot: O(n) on average. */
static void cand_select(cand_t *c, int64_t n, int64_t m) {
    if (m <= 0 || m >= n) return;
    int64_t lo = 0, hi = n - 1, target = m; /* after this, c[target] is the (m+1)-th best */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (cand_better(c[mid], c[lo])) cand_swap(&c[mid], &c[lo]);
        if (cand_better(c[hi], c[lo])) cand_swap(&c[hi], &c[lo]);
        if (cand_better(c[mid], c[hi])) cand_swap(&c[mid], &c[hi]);
        /* now c[lo] best, c[hi] the median of the three: the pivot */
        cand_t pivot = c[hi];
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++)
            if (cand_better(c[i], pivot)) cand_swap(&c[i], &c[store++]);
        cand_swap(&c[store], &c[hi]);
        if (store == target) return;
        if (store < target)
            lo = store + 1;
        else
            hi = store - 1;
    }
}

/* ---- exponentials ----------------------------------------------------------------
 * exp(s) for s <= 0 by range reduction s = n ln2 + r, |r| <= ln2/2, and a degree-7 Taylor
 * polynomial for e^r (truncation error < 1e-8 relative), scaled by 2^n through the exponent
 * bits. s < -87 gives 0 (below the smallest normal float: nothing a softmax can see next to
 * the maximum's weight of 1). The SSE2 path (baseline on x86-64) computes the same
 * operations four at a time, so both paths give the same bits. Relative error ~2e-7. */
#define EXP_MIN     (-87.0f)
#define LOG2E       1.44269504088896341f
#define LN2_HI      0.693145751953125f /* ln 2 split so n * LN2_HI is exact */
#define LN2_LO      1.42860682030941723e-6f
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds to nearest even */

static inline float exp_neg(float s) {
    if (!(s >= EXP_MIN)) return 0.0f; /* also -inf */
    float t = s * LOG2E + ROUND_MAGIC;
    float n = t - ROUND_MAGIC;
    float r = (s - n * LN2_HI) - n * LN2_LO;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t ni = (int32_t)n, bits = (ni + 127) * (1 << 23);
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Scaled log-weight (x - max) / T, with 1/T possibly +inf (denormal T): 0 for the maximum,
 * never 0 * inf. */
static inline float scaled(float x, float max, float inv_t) {
    float d = x - max;
    return d < 0.0f ? d * inv_t : 0.0f;
}

static inline float weight(float x, float max, float inv_t) { return exp_neg(scaled(x, max, inv_t)); }

/* The vector paths below compute exactly the scalar operations (mul and add, never fused),
 * lane by lane, so every path gives the same weights. Each sums float lanes over at most 256
 * elements (weights <= 1) before adding them into a double. */
#define WEIGHTS_BLOCK 256

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
__attribute__((target("avx2"))) static int64_t weights_sum_avx2(const float *x, int64_t n, float max, float inv_t,
                                                                float *w, double *sum_p) {
    const __m256 vmax = _mm256_set1_ps(max), vinv = _mm256_set1_ps(inv_t), zero = _mm256_setzero_ps();
    const __m256 vmin = _mm256_set1_ps(EXP_MIN), vlog2e = _mm256_set1_ps(LOG2E), vmagic = _mm256_set1_ps(ROUND_MAGIC);
    const __m256 vhi = _mm256_set1_ps(LN2_HI), vlo = _mm256_set1_ps(LN2_LO);
    double sum = 0.0;
    int64_t i = 0;
    while (i + 8 <= n) {
        __m256 acc = zero;
        int64_t end = i + WEIGHTS_BLOCK < n ? i + WEIGHTS_BLOCK : n;
        for (; i + 8 <= end; i += 8) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vmax);
            __m256 sc = _mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_LT_OQ), _mm256_mul_ps(d, vinv));
            __m256 ok = _mm256_cmp_ps(sc, vmin, _CMP_GE_OQ);
            sc = _mm256_max_ps(sc, vmin);
            __m256 t = _mm256_add_ps(_mm256_mul_ps(sc, vlog2e), vmagic);
            __m256 nf = _mm256_sub_ps(t, vmagic);
            __m256 r = _mm256_sub_ps(_mm256_sub_ps(sc, _mm256_mul_ps(nf, vhi)), _mm256_mul_ps(nf, vlo));
            __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 720.0f));
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 120.0f));
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 24.0f));
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 6.0f));
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
            __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
            __m256 e = _mm256_and_ps(ok, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
            if (w) _mm256_storeu_ps(w + i, e);
            acc = _mm256_add_ps(acc, e);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        double part = 0.0;
        for (int k = 0; k < 8; k++) part += lanes[k];
        sum += part;
    }
    *sum_p = sum;
    return i;
}
#endif

/* Sum of weight(x[i]) over i < n (in double), storing each weight in w[i] when w != NULL. */
static double weights_sum(const float *x, int64_t n, float max, float inv_t, float *w) {
    double sum = 0.0;
    int64_t i = 0;
#ifdef HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2"))
        i = weights_sum_avx2(x, n, max, inv_t, w, &sum); /* a load of libgcc's cpu model */
#endif
#ifdef __SSE2__
    const __m128 vmax = _mm_set1_ps(max), vinv = _mm_set1_ps(inv_t), zero = _mm_setzero_ps();
    const __m128 vmin = _mm_set1_ps(EXP_MIN), vlog2e = _mm_set1_ps(LOG2E), vmagic = _mm_set1_ps(ROUND_MAGIC);
    const __m128 vhi = _mm_set1_ps(LN2_HI), vlo = _mm_set1_ps(LN2_LO);
    while (i + 4 <= n) {
        __m128 acc = zero;
        int64_t end = i + WEIGHTS_BLOCK < n ? i + WEIGHTS_BLOCK : n;
        for (; i + 4 <= end; i += 4) {
            __m128 d = _mm_sub_ps(_mm_loadu_ps(x + i), vmax);
            __m128 sc = _mm_and_ps(_mm_cmplt_ps(d, zero), _mm_mul_ps(d, vinv));
            __m128 ok = _mm_cmpge_ps(sc, vmin);
            sc = _mm_max_ps(sc, vmin);
            __m128 t = _mm_add_ps(_mm_mul_ps(sc, vlog2e), vmagic);
            __m128 nf = _mm_sub_ps(t, vmagic);
            __m128 r = _mm_sub_ps(_mm_sub_ps(sc, _mm_mul_ps(nf, vhi)), _mm_mul_ps(nf, vlo));
            __m128 p = _mm_set1_ps(1.0f / 5040.0f);
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 720.0f));
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 120.0f));
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 24.0f));
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 6.0f));
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0.5f));
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
            __m128i bits = _mm_slli_epi32(_mm_add_epi32(_mm_cvtps_epi32(nf), _mm_set1_epi32(127)), 23);
            __m128 e = _mm_and_ps(ok, _mm_mul_ps(p, _mm_castsi128_ps(bits)));
            if (w) _mm_storeu_ps(w + i, e);
            acc = _mm_add_ps(acc, e);
        }
        float lanes[4];
        _mm_storeu_ps(lanes, acc);
        sum += ((double)lanes[0] + lanes[1]) + ((double)lanes[2] + lanes[3]);
    }
#endif
    for (; i < n; i++) {
        float e = weight(x[i], max, inv_t);
        if (w) w[i] = e;
        sum += e;
    }
    return sum;
}

/* The m best finite logits of x[0..n), sorted (logit descending, then id ascending), into
 * top[0..m); returns how many there are (< m only if fewer are finite). One pass: a vector
 * compare against the current m-th best skips almost every element, the rest are inserted
 * into the sorted list (O(m) each; about m * ln(n / m) of them for unordered logits). */
static int64_t top_collect(const float *x, int32_t n, int64_t m, cand_t *top) {
    int64_t count = 0;
    float thr = -INFINITY; /* an element must beat this to enter */
    int32_t i = 0;
#define TOP_INSERT(idx)                              \
    do {                                             \
        float v_ = x[idx];                           \
        if (!(v_ > thr)) break;                      \
        int64_t at_ = count < m ? count : m - 1;     \
        while (at_ > 0 && top[at_ - 1].logit < v_) { \
            top[at_] = top[at_ - 1];                 \
            at_--;                                   \
        }                                            \
        top[at_] = (cand_t){v_, (idx)};              \
        if (count < m) count++;                      \
        if (count == m) thr = top[m - 1].logit;      \
    } while (0)
#ifdef __SSE2__
    for (; i + 4 <= n; i += 4) {
        int mask = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(x + i), _mm_set1_ps(thr)));
        if (!mask) continue;
        for (int k = 0; k < 4; k++)
            if (mask & (1 << k)) TOP_INSERT(i + k);
    }
#endif
    for (; i < n; i++) TOP_INSERT(i);
#undef TOP_INSERT
    return count;
}

/* top_k up to this many uses top_collect; larger k a quickselect over all candidates. */
#define TOP_COLLECT_MAX 256

/* Draws one candidate from c[0..n) with weights w[0..n) summing to `total`. */
static int32_t draw(const cand_t *c, const float *w, int64_t n, double total, speed_rng_t *rng) {
    double u = speed_rng_uniform(rng) * total, cum = 0.0;
    int64_t last = 0;
    for (int64_t i = 0; i < n; i++) {
        if (w[i] <= 0.0f) continue;
        cum += w[i];
        last = i;
        if (u < cum) return c[i].id;
    }
    return c[last].id; /* rounding pushed u past the sum */
}

/* Max of x[0..n) and whether any element is NaN. */
static float logits_max(const float *x, int64_t n, bool *nan_p) {
    float max = -INFINITY;
    bool nan = false;
    int64_t i = 0;
#ifdef __SSE2__
    __m128 vmax = _mm_set1_ps(-INFINITY), vnan = _mm_setzero_ps();
    for (; i + 4 <= n; i += 4) {
        __m128 v = _mm_loadu_ps(x + i);
        vnan = _mm_or_ps(vnan, _mm_cmpunord_ps(v, v));
        vmax = _mm_max_ps(vmax, v);
    }
    float lanes[4];
    _mm_storeu_ps(lanes, vmax);
    for (int k = 0; k < 4; k++) max = lanes[k] > max ? lanes[k] : max;
    nan = _mm_movemask_ps(vnan) != 0;
#endif
    for (; i < n; i++) {
        nan |= isnan(x[i]);
        if (x[i] > max) max = x[i];
    }
    *nan_p = nan;
    return max;
}

/* top-p without top-k: the nucleus from a histogram of log-weights. Tokens in bins above the
 * one where the cumulative mass reaches top_p are in; only that bin is sorted. Writes the
 * kept candidates to s->cand / s->w and returns how many; *kept_p is their mass. */

static inline int top_p_bin(float x, float max, float inv_t) {
    float v = -scaled(x, max, inv_t) * TOP_P_BINS_PER_NAT;
    return v < (float)(TOP_P_BINS - 1) ? (int)v : TOP_P_BINS - 1;
}

static int64_t top_p_nucleus(speed_sampler_t *s, const float *logits, int32_t n_vocab, float max, float inv_t,
                             float top_p, double *kept_p) {
    double *mass = s->bin_mass;
    memset(mass, 0, TOP_P_BINS * sizeof *mass);
    double total = weights_sum(logits, n_vocab, max, inv_t, s->w); /* s->w indexed by id here */
    for (int32_t i = 0; i < n_vocab; i++)
        if (s->w[i] > 0.0f) mass[top_p_bin(logits[i], max, inv_t)] += s->w[i];
    double limit = (double)top_p * total, cum = 0.0;
    int cut = 0;
    while (cut < TOP_P_BINS - 1 && cum + mass[cut] < limit) cum += mass[cut++];
    /* Gather: bins above the cut in id order (all in), then the cut bin, sorted. The weights
     * move along with the candidates (s->w is reused in place: writes never pass reads). */
    int64_t n_in = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        if (s->w[i] <= 0.0f) continue;
        int b = top_p_bin(logits[i], max, inv_t);
        if (b < cut) {
            s->cand[n_in] = (cand_t){logits[i], i};
            s->w[n_in++] = s->w[i];
        }
    }
    int64_t n_cut = 0;
    cand_t *tail = s->cand + n_in;
    for (int32_t i = 0; i < n_vocab; i++)
        if (logits[i] != -INFINITY && top_p_bin(logits[i], max, inv_t) == cut) tail[n_cut++] = (cand_t){logits[i], i};
    qsort(tail, (size_t)n_cut, sizeof *tail, cand_cmp);
    int64_t n = n_in;
    for (int64_t j = 0; j < n_cut && (n == 0 || cum < limit); j++) {
        float w = weight(tail[j].logit, max, inv_t);
        s->cand[n] = tail[j];
        s->w[n++] = w;
        cum += w;
    }
    *kept_p = cum;
    return n;
}

speed_status_t speed_sampler_sample(speed_sampler_t *s, const speed_sampling_params_t *p, speed_rng_t *rng,
                                    const float *logits, int32_t n_vocab, speed_sample_t *out) {
    SPEED_CHECK(speed_sampling_params_validate(p));
    if (!s || !logits || !out || n_vocab < 1 || n_vocab > s->n_vocab_max) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampler: bad arguments (vocabulary %d, workspace for %d)", (int)n_vocab,
                    s ? (int)s->n_vocab_max : 0);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    bool greedy = p->temperature == 0.0f;
    if (!greedy && !rng) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampler: temperature %g needs a random generator", (double)p->temperature);
        return SPEED_ERR_INVALID_ARGUMENT;
    }

    /* Validity, max and argmax (the first maximum: lowest id wins ties). */
    bool nan;
    float max = logits_max(logits, n_vocab, &nan);
    if (nan || max == INFINITY) {
        int32_t bad = 0;
        while (!(isnan(logits[bad]) || logits[bad] == INFINITY)) bad++;
        SPEED_ERROR(SPEED_SUBSYS_ENGINE,
                    "sampler: logit of token %d is %s (the forward pass produced a "
                    "non-finite value)",
                    (int)bad, isnan(logits[bad]) ? "NaN" : "+inf");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (max == -INFINITY) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "sampler: every logit is -inf (all %d tokens masked)", (int)n_vocab);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    int32_t argmax = 0;
    while (logits[argmax] != max) argmax++;

    /* The logprob normaliser: log-sum-exp of the raw logits. With temperature 1 and no
     * truncation the same exponentials are the sampling weights. */
    bool full_draw = !greedy && p->top_k == 0 && p->top_p >= 1.0f;
    bool keep_w = full_draw && p->temperature == 1.0f;
    double sum = weights_sum(logits, n_vocab, max, 1.0f, keep_w ? s->w : NULL);
    double lse = (double)max + log(sum);
    cand_t top[SPEED_SAMPLER_MAX_TOP_LOGPROBS];
    int n_top = p->n_top_logprobs > 0 ? (int)top_collect(logits, n_vocab, p->n_top_logprobs, top) : 0;

    int32_t chosen = argmax;
    float inv_t = greedy ? 0.0f : 1.0f / p->temperature; /* inf for a denormal T: see scaled() */
    if (greedy) {
        /* argmax already */
    } else if (full_draw) {
        double total = keep_w ? sum : weights_sum(logits, n_vocab, max, inv_t, s->w);
        /* Scan in id order. */
        double u = speed_rng_uniform(rng) * total, cum = 0.0;
        int32_t last = argmax;
        chosen = -1;
        for (int32_t i = 0; i < n_vocab; i++) {
            if (s->w[i] <= 0.0f) continue;
            cum += s->w[i];
            last = i;
            if (u < cum) {
                chosen = i;
                break;
            }
        }
        if (chosen < 0) chosen = last;
    } else if (p->top_k == 0) {
        double kept;
        int64_t n_keep = top_p_nucleus(s, logits, n_vocab, max, inv_t, p->top_p, &kept);
        chosen = draw(s->cand, s->w, n_keep, kept, rng);
    } else {
        /* top-k (then top-p over the renormalised top k), sorted best first. */
        int64_t k;
        if (p->top_k <= TOP_COLLECT_MAX) {
            k = top_collect(logits, n_vocab, p->top_k, s->cand);
        } else {
            int64_t n_c = 0;
            for (int32_t i = 0; i < n_vocab; i++)
                if (logits[i] != -INFINITY) s->cand[n_c++] = (cand_t){logits[i], i};
            k = p->top_k < n_c ? p->top_k : n_c;
            cand_select(s->cand, n_c, k);
            qsort(s->cand, (size_t)k, sizeof *s->cand, cand_cmp);
        }
        double kept = 0.0;
        for (int64_t i = 0; i < k; i++) kept += s->w[i] = weight(s->cand[i].logit, max, inv_t);
        int64_t n_keep = k;
        if (p->top_p < 1.0f) {
            /* Nucleus: tokens whose preceding mass is still below top_p of the top-k mass. */
            double limit = (double)p->top_p * kept, cum = 0.0;
            n_keep = 0;
            while (n_keep < k && (n_keep == 0 || cum < limit)) cum += s->w[n_keep++];
            kept = cum;
        }
        chosen = draw(s->cand, s->w, n_keep, kept, rng);
    }

    out->id = chosen;
    out->logprob = (float)((double)logits[chosen] - lse);
    out->n_top = n_top;
    for (int i = 0; i < n_top; i++) {
        out->top[i].id = top[i].id;
        out->top[i].logprob = (float)((double)top[i].logit - lse);
    }
    return SPEED_OK;
}
