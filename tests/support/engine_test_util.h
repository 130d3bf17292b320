/* Helpers shared by the engine tests (library speed_test_engine, with the naive reference of
 * naive_ref.h): scratch models, backends by name, prompts, a greedy driver for a batch of
 * sequences, and the comparisons against the reference and between runs.
 *
 * Includes test_fs.h: models are written under the test's scratch directory (tu_tmp_init
 * first).
 *
 * Failed expectations inside these helpers are CHECKs (check.h): they fail the calling test.
 * Thread-safety: run from the test's main thread (the engine itself may use threads).
 */
#ifndef SPEED_ENGINE_TEST_UTIL_H
#define SPEED_ENGINE_TEST_UTIL_H

#include <stdbool.h>
#include <stdint.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <errno.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "backend.h"
#include "check.h"
#include "engine.h"
#include "log.h"
#include "model.h"
#include "naive_ref.h"
#include "test_fs.h"
#include "tiny_model.h"

/* ---- models and backends ---------------------------------------------------------------- */

typedef struct {
    const char *name;
    speed_dtype_t dtype;
    bool tied;
    int n_kv_heads;    /* 4 = MHA, 2 = GQA */
    bool rope_scaling; /* llama3 rope_scaling block (factor 8, original 8192) */
} et_model_spec_t;

/* Writes the small test model of `spec` (4 layers, hidden 64, 4 heads, vocab 512, init_std
 * large enough that greedy choices are not ties) to <tu_root>/<spec->name> and loads it.
 * Returns the model (speed_model_destroy it), or NULL when writing or loading failed (logged). */
speed_model_t *et_model_make(const et_model_spec_t *spec);

/* "cpu-ref", "cpu" (best ISA), "cpu-avx2" or "cpu-scalar" (ISA capped), 2 threads; NULL (and a
 * message) when the backend is not available here. speed_backend_destroy it. */
speed_backend_t *et_backend(const char *name);

/* ---- prompts ---------------------------------------------------------------------------- */

/* ids[0] = 1 (BoS), ids[1..n) pseudo-random ids in [3, vocab) drawn from `seed`. */
void et_prompt(int32_t *ids, int n, uint64_t seed, int vocab);

/* ---- greedy driver ----------------------------------------------------------------------- */

#define ET_MAX_GEN    32
#define ET_MAX_PROMPT 256

typedef struct {
    /* in */
    speed_depth_t depth; /* passed as the override (C 0 = L) */
    bool use_default;    /* pass NULL instead */
    int n_prompt, n_gen;
    int32_t prompt[ET_MAX_PROMPT];
    /* out */
    speed_seq_id_t id;
    int n_out;
    int32_t gen[ET_MAX_GEN];
    float *logits; /* [n_gen][vocab], malloc; et_seq_free */
    speed_engine_seq_stats_t stats_after_prefill;
    speed_engine_seq_stats_t stats_last;
    bool done;
} et_seq_t;

/* The index of the largest of x[0..n) (the first on ties). */
int32_t et_argmax(const float *x, int n);

/* Frees s->logits (s itself is the caller's). */
void et_seq_free(et_seq_t *s);

/* Adds every sequence, steps until each produced n_gen tokens greedily, removes them.
 * Returns the first failing status (SPEED_OK when all ran; SPEED_ERR_INTERNAL when the
 * engine's outputs broke the step contract). */
speed_status_t et_run(speed_engine_t *e, et_seq_t *seqs, int n);

/* Creates an engine with `p`, runs the batch greedily (et_run), CHECKs that every KV block is
 * free again, destroys it. Returns the creation's or the run's status. */
speed_status_t et_run_engine(const speed_engine_params_t *p, et_seq_t *seqs, int n);

/* ---- comparison ---------------------------------------------------------------------------- */

typedef struct {
    double max_lp_diff;      /* max |logprob_engine - logprob_naive| over steps and vocabulary */
    double max_chosen_diff;  /* the same for the greedy token only */
    int token_mismatch;      /* greedy choices that differ and are not an excused near tie */
    int near_ties;           /* differing choices excused as near ties (see et_compare) */
    double max_tie_gap;      /* the largest reference gap (logprob) best - chosen among the excused */
    double min_mismatch_gap; /* the smallest such gap among the mismatches (0: none) */
} et_cmp_t;

/* Compares a finished sequence's logits with the naive reference (teacher-forced on the
 * engine's greedy tokens), accumulating into *cmp. C is the resolved depth. A greedy token that
 * differs from the reference's is excused (counted in near_ties; the caller bounds how many)
 * only when the reference's logprob of its own best token exceeds that of the engine's choice
 * by at most tie_eps; any other difference is a token_mismatch. Returns naive_ref_logits'
 * result (0, or -1). */
int et_compare(const naive_model_t *nm, int vocab, const et_seq_t *s, int C, speed_dtype_t kv_dtype, double tol,
               double tie_eps, et_cmp_t *cmp);

/* CHECKs run `d` of a sequence against run `c` of the same sequence on another backend or
 * layout: logprobs within 2 tol, greedy tokens equal, up to the first step where either side's
 * top two are within 2 tol (after a near tie the two continuations are different texts).
 * `what` labels failures; *max_diff_p is raised to the largest logprob difference seen. */
void et_compare_runs(const et_seq_t *d, const et_seq_t *c, int vocab, double tol, const char *what, double *max_diff_p);

#endif /* SPEED_ENGINE_TEST_UTIL_H */
