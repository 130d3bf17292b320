/* Batch invariance (speed_backend_params_t.batch_invariant, docs/cluster.md#batch-invariance):
 * with the mode on, one sequence's logits at every step are bit for bit (memcmp) the same
 *   - alone and with 1 .. 3 other sequences in its batch (it is added first or last),
 *   - with different prefill_chunk / max_step_tokens (its prompt in 1 step or in many, its
 *     decode rows sharing steps with the others' prompt chunks),
 *   - on 1 and on 2 threads,
 * for an f32 GQA and a bf16 MHA model. Its prompt is long enough (250 tokens) that the cpu
 * backend's decode attention would split a row's entries across threads when the mode is off.
 * With the mode off the same runs are made and how many differ is printed: that they may
 * differ is documented, not asserted (nothing promises they do).
 *
 *   test_engine_batch_invariant [cpu|cpu-avx2|cpu-scalar|cpu-ref]   (77: the CPU lacks the ISA)
 */
#include "engine_test_util.h"

#define N_GEN       20
#define N_OTHERS    3
#define LONG_PROMPT 250

typedef struct {
    int threads;
    int n_others;
    bool target_last; /* the target is added after the others */
    int prefill_chunk, max_step_tokens;
} bi_run_t;

/* The reference first: alone, 1 thread, the prompt in one step. */
static const bi_run_t runs[] = {
    {1, 0, false, 512, 512}, {2, 0, false, 512, 512}, {1, 1, true, 512, 512},  {2, 3, false, 64, 96},
    {2, 2, true, 7, 16},     {1, 3, true, 33, 48},    {2, 1, false, 250, 256},
};
#define N_RUNS ((int)(sizeof runs / sizeof runs[0]))

static speed_backend_t *make_backend(const char *name, int threads, bool invariant) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = strcmp(name, "cpu-ref") == 0 ? SPEED_BACKEND_CPU_REF : SPEED_BACKEND_CPU;
    if (strcmp(name, "cpu-avx2") == 0) bp.cpu_isa_max = SPEED_CPU_ISA_AVX2;
    if (strcmp(name, "cpu-scalar") == 0) bp.cpu_isa_max = SPEED_CPU_ISA_SCALAR;
    bp.n_threads = threads;
    bp.batch_invariant = invariant;
    speed_backend_t *be = NULL;
    return speed_backend_create(&bp, &be) == SPEED_OK ? be : NULL;
}

/* Runs runs[r] on `be`; the target's logits ([N_GEN][vocab]) go to *logits_p (malloc). */
static speed_status_t run_one(speed_backend_t *be, speed_model_t *m, const bi_run_t *r, float **logits_p) {
    const int V = m->config.vocab_size;
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = be;
    p.model = m;
    p.max_seqs = 1 + N_OTHERS;
    p.max_step_tokens = r->max_step_tokens;
    p.prefill_chunk = r->prefill_chunk;
    SPEED_CHECK(speed_engine_params_fit_kv(&p, 1 + N_OTHERS, LONG_PROMPT, N_GEN));

    et_seq_t seqs[1 + N_OTHERS];
    memset(seqs, 0, sizeof seqs);
    const int target = r->target_last ? r->n_others : 0;
    for (int i = 0, o = 0; i <= r->n_others; i++) {
        et_seq_t *s = &seqs[i];
        s->use_default = true;
        if (i == target) {
            s->n_prompt = LONG_PROMPT;
            s->n_gen = N_GEN;
            et_prompt(s->prompt, s->n_prompt, 4242, V);
        } else { /* others of varied lengths, some still in prefill while the target decodes */
            s->n_prompt = 5 + 61 * o;
            s->n_gen = 3 + 7 * o;
            et_prompt(s->prompt, s->n_prompt, 100 + (uint64_t)o, V);
            o++;
        }
    }
    speed_status_t st = et_run_engine(&p, seqs, r->n_others + 1);
    if (st == SPEED_OK && seqs[target].n_out == N_GEN) {
        *logits_p = seqs[target].logits;
        seqs[target].logits = NULL;
    } else if (st == SPEED_OK) {
        st = SPEED_ERR_INTERNAL;
    }
    for (int i = 0; i <= r->n_others; i++) et_seq_free(&seqs[i]);
    return st;
}

/* Runs every configuration with the mode on or off; returns how many differ from runs[0]
 * (the first differing step of each is reported when `must_match`). */
static int run_all(const char *name, speed_model_t *m, bool invariant, bool must_match) {
    speed_backend_t *be[3] = {NULL, NULL, NULL}; /* by thread count */
    for (int t = 1; t <= 2; t++) {
        be[t] = make_backend(name, t, invariant);
        CHECK_MSG(be[t] != NULL, "%s: backend with %d thread(s) cannot be created", name, t);
        if (!be[t]) return -1;
    }
    const size_t V = (size_t)m->config.vocab_size;
    float *ref = NULL;
    int n_diff = 0;
    for (int r = 0; r < N_RUNS; r++) {
        float *lg = NULL;
        speed_status_t st = run_one(be[runs[r].threads], m, &runs[r], &lg);
        CHECK_MSG(st == SPEED_OK, "%s: run %d: %s", name, r, speed_status_string(st));
        if (st != SPEED_OK) break;
        if (r == 0) {
            ref = lg;
            continue;
        }
        int first = -1;
        for (int g = 0; g < N_GEN && first < 0; g++)
            if (memcmp(lg + g * V, ref + g * V, V * sizeof(float)) != 0) first = g;
        if (first >= 0) n_diff++;
        if (must_match)
            CHECK_MSG(first < 0,
                      "%s, batch-invariant: run %d (%d thread(s), %d others, chunk %d, step %d): logits of step %d "
                      "differ from the sequence alone",
                      name, r, runs[r].threads, runs[r].n_others, runs[r].prefill_chunk, runs[r].max_step_tokens,
                      first);
        free(lg);
    }
    free(ref);
    speed_backend_destroy(be[1]);
    speed_backend_destroy(be[2]);
    return n_diff;
}

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "cpu";
    if ((strcmp(name, "cpu-avx2") == 0 && speed_cpu_isa_detect() < SPEED_CPU_ISA_AVX2)) {
        fprintf(stderr, "%s: this CPU lacks the instruction set\n", name);
        return 77;
    }
    tu_tmp_init("engine-batch-invariant");
    const et_model_spec_t specs[] = {
        {"f32-gqa-untied", SPEED_DTYPE_F32, false, 2, false},
        {"bf16-mha-tied", SPEED_DTYPE_BF16, true, 4, false},
    };
    for (size_t mi = 0; mi < sizeof specs / sizeof specs[0]; mi++) {
        speed_model_t *m = et_model_make(&specs[mi]);
        CHECK(m != NULL);
        if (!m) continue;
        int on = run_all(name, m, true, true);
        int off = run_all(name, m, false, false);
        fprintf(stderr, "%-10s %-16s batch-invariant: %d of %d runs differ from alone; mode off: %d differ\n", name,
                specs[mi].name, on, N_RUNS - 1, off);
        speed_model_destroy(m);
    }
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
