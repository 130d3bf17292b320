/* A naive full-recompute SPEED reference for the engine tests (library speed_test_engine).
 *
 * Plain C, independent of the engine and of the compute backends: the weights of a loaded
 * speed_model_t are converted once to f32 (common/dtype.h), and each call recomputes the
 * whole sequence from the token ids, applying docs/design.md §1 directly as a mask:
 *
 *   full(i)  = i < min(A, n) or i >= n - T or i >= n (generated);
 *   layer l  : the tokens that exist are all of them when l < C, else the full(i) ones;
 *              token i attends to the existing tokens j <= i of that layer;
 *   RoPE     : absolute positions, as Hugging Face Llama computes them (llama3 scaling too).
 *
 * Dot products and softmax sums accumulate in double. K and V are rounded through the cache
 * dtype (as the engine's cache stores them) so that a bf16 cache can be compared tightly.
 *
 * Because the model is causal (also under the SPEED mask, whose classes depend on n only),
 * one recompute of tokens[0..n_tokens) yields the logits that a from-scratch recompute of every
 * prefix would give for its last token: naive_ref_logits returns those of the last n_out
 * positions.
 */
#ifndef SPEED_TESTS_NAIVE_REF_H
#define SPEED_TESTS_NAIVE_REF_H

#include <stdint.h>

#include "dtype.h"
#include "model.h"

typedef struct naive_model naive_model_t;

/* f32 copy of the model's weights (plain malloc: not counted by speed_alloc). NULL on OOM. */
naive_model_t *naive_model_create(const speed_model_t *model);
void naive_model_destroy(naive_model_t *nm);

/* Logits f32 [n_out][vocab] of positions n_tokens - n_out .. n_tokens - 1 for the sequence
 * tokens[0..n_tokens) whose first n_prompt tokens are the prompt, at depth C (1..L), anchors
 * A >= 0, tail T >= 1. Those positions must be full depth (>= n_prompt - 1).
 * Returns 0, or -1 on bad arguments / out of memory (printed). */
int naive_ref_logits(const naive_model_t *nm, const int32_t *tokens, int n_tokens, int n_prompt, int C, int A, int T,
                     speed_dtype_t kv_dtype, int n_out, float *logits);

/* log-softmax of logits[0..n) into out (may alias), computed in double. */
void naive_log_softmax(const float *logits, int n, float *out);

#endif /* SPEED_TESTS_NAIVE_REF_H */
