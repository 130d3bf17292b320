/* speed_sampler: next-token choice from a row of logits, with logprobs.
 *
 * One call turns f32 logits [n_vocab] into the chosen token id, its logprob and the
 * n_top_logprobs most likely tokens with theirs. Sampling applies, in this order:
 *   1. temperature: weights exp((x - max) / temperature); temperature 0 is greedy (argmax,
 *      ties go to the lowest id; the RNG is not advanced);
 *   2. top_k: keep the k highest logits (ties broken by lower id), 0 = off;
 *   3. top_p: keep the smallest set of the remaining tokens, most likely first, whose
 *      renormalised mass reaches top_p (always at least one token), 1 = off;
 *   4. draw one token from what is left, proportionally to its weight, with one
 *      speed_rng_uniform() of the request's generator.
 *
 * Logprobs are the model's: the natural-log softmax of the *raw* logits,
 *   logprob(i) = x_i - log(sum_j exp(x_j)),
 * independent of temperature, top_k and top_p (as vLLM's default and OpenAI's API report
 * them). So the chosen token's logprob says how likely the model found it, which is what a
 * SPEED-vs-full-depth divergence measurement needs, and it never becomes -inf because a
 * truncation removed a token. top logprobs are sorted by logprob descending, ties by lower
 * id, and include only tokens with a finite logprob.
 *
 * Logits may contain -inf (a masked token: probability 0). NaN and +inf are rejected
 * (SPEED_ERR_INVALID_ARGUMENT naming the first bad id), as is a row that is all -inf.
 *
 * Cost per call: a few O(n_vocab) passes (max, exp-sum with a vectorised exp), never a sort of
 * the vocabulary. top_k: quickselect, then a sort of the k kept. top_p alone: a histogram of
 * log-weights (1/64-nat bins) finds the bin where the cumulative mass reaches top_p; only that
 * bin's tokens are sorted. No truncation: the draw is one linear scan. About 0.1-0.3 ms per
 * token for a 128k vocabulary on one core, up to ~1 ms with top_p alone over a nearly flat
 * distribution whose nucleus is most of the vocabulary (tests/sampler prints the numbers).
 *
 * Ownership and threads: a speed_sampler_t is a workspace (O(n_vocab) scratch) for one
 * thread at a time, reusable across requests and vocabularies up to the size it was made
 * for. The per-request state is the speed_rng_t the caller passes in. Errors are logged
 * once (subsystem "engine").
 */
#ifndef SPEED_SAMPLER_H
#define SPEED_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rng.h"
#include "status.h"

#define SPEED_SAMPLER_MAX_TOP_LOGPROBS 20

typedef struct {
    float temperature;  /* >= 0, finite; 0 = greedy */
    int32_t top_k;      /* >= 0; 0 = off */
    float top_p;        /* in (0, 1]; 1 = off */
    uint64_t seed;      /* initial state of the request's speed_rng_t */
    int n_top_logprobs; /* 0 .. SPEED_SAMPLER_MAX_TOP_LOGPROBS */
} speed_sampling_params_t;

/* temperature 1, top_k 0, top_p 1, seed 0, no top logprobs. */
speed_sampling_params_t speed_sampling_default_params(void);

/* Checks the ranges above. Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT (logged, naming
 * the field and the value, e.g. "top_p 1.5 is out of range (0, 1]"). */
speed_status_t speed_sampling_params_validate(const speed_sampling_params_t *params);

typedef struct {
    int32_t id;
    float logprob; /* natural log, <= 0 */
} speed_token_logprob_t;

typedef struct {
    int32_t id;    /* the chosen token */
    float logprob; /* its logprob under the raw logits */
    int n_top;     /* entries of top[] filled: min(n_top_logprobs, finite logits) */
    speed_token_logprob_t top[SPEED_SAMPLER_MAX_TOP_LOGPROBS]; /* logprob descending */
} speed_sample_t;

typedef struct speed_sampler speed_sampler_t;

/* Creates a workspace for vocabularies of up to n_vocab_max tokens.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (n_vocab_max < 1 or > 2^30) or
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_sampler_create(int32_t n_vocab_max, speed_sampler_t **sampler_p);
void speed_sampler_destroy(speed_sampler_t *sampler); /* NULL ok */

/* Chooses the next token from logits [n_vocab] (host memory).
 * rng: the request's generator (advanced by one draw unless greedy); may be NULL only when
 * params->temperature == 0.
 * Returns SPEED_OK (*out filled), or SPEED_ERR_INVALID_ARGUMENT: bad params, n_vocab outside
 * 1..n_vocab_max, a NaN/+inf logit, every logit -inf, or a NULL rng when sampling. *out is
 * written only on success. */
speed_status_t speed_sampler_sample(speed_sampler_t *sampler, const speed_sampling_params_t *params, speed_rng_t *rng,
                                    const float *logits, int32_t n_vocab, speed_sample_t *out);

#endif /* SPEED_SAMPLER_H */
