/* Tensor parallelism inside one process (CPU ranks on threads, the cpu communicator): an engine
 * of TP = 2 or 4 must give the tokens and logprobs of the same engine at TP = 1 and of the naive
 * reference, for every depth, and a prompt prefilled at one TP size must decode at another.
 *
 *   1. Batches (prompts shorter than a block, longer than a chunk, > 256 entries) at C = L,
 *      C = L/2 and C = 1 with A = 4, T = 3; f32 and bf16 caches; models with MHA and GQA,
 *      f32/bf16/f16 weights. Each sequence against the TP = 1 run (et_compare_runs: logprobs
 *      within 2 tol, equal greedy tokens up to a near tie) and against the naive reference.
 *   2. Prefill on TP = a, export the KV (the canonical layout: all heads), import into a
 *      reserved sequence of TP = b and decode: the tokens of an unsplit TP = 1 run, for
 *      (a, b) = (2, 1), (1, 2), (2, 4), (4, 2).
 *   3. Refusals: a TP size that does not divide the heads, missing or shared rank backends,
 *      a non-CPU backend kind; a failing rank does not hang the others (the step fails, the
 *      next one runs).
 *
 * Tolerances as in test_engine_cuda: only the order of the partial sums changes with the split,
 * so f32 weights agree to 1e-3; 16-bit weights see activations rounded to the weight dtype. */
#include <pthread.h>

#include "engine_test_util.h"

enum { N_SEQS = 3, N_GEN = 12 };

static double tolerance(speed_dtype_t weights, speed_dtype_t kv) {
    double t = weights == SPEED_DTYPE_BF16 ? 1.5e-1 : weights == SPEED_DTYPE_F16 ? 5e-2 : 1e-3;
    return kv == SPEED_DTYPE_F32 ? t : t + 2e-2;
}

/* `n` single-threaded cpu backends (a rank each). */
static bool make_backends(int n, speed_backend_t **bes) {
    for (int r = 0; r < n; r++) {
        speed_backend_params_t bp = speed_backend_default_params();
        bp.kind = SPEED_BACKEND_CPU;
        bp.n_threads = 1;
        bes[r] = NULL;
        if (speed_backend_create(&bp, &bes[r]) != SPEED_OK) return false;
    }
    return true;
}

static void free_backends(int n, speed_backend_t **bes) {
    for (int r = 0; r < n; r++) speed_backend_destroy(bes[r]);
}

static speed_engine_params_t tp_params(const speed_model_t *m, int tp, speed_backend_t *const *bes, speed_depth_t depth,
                                       speed_dtype_t kv_dtype) {
    speed_engine_params_t p = speed_engine_default_params();
    p.model = m;
    p.tp_size = tp;
    if (tp > 1)
        p.tp_backends = bes;
    else
        p.backend = bes[0];
    p.kv_dtype = kv_dtype;
    p.block_tokens = 16;
    p.prefill_chunk = 48;
    p.max_step_tokens = 96;
    p.max_seqs = N_SEQS;
    p.depth = depth;
    CHECK(speed_engine_params_fit_kv(&p, N_SEQS, ET_MAX_PROMPT, N_GEN) == SPEED_OK);
    return p;
}

static speed_status_t run_batch(const speed_model_t *m, int tp, speed_backend_t *const *bes, speed_depth_t depth,
                                speed_dtype_t kv_dtype, et_seq_t *seqs, int n_seqs) {
    speed_engine_params_t p = tp_params(m, tp, bes, depth, kv_dtype);
    return et_run_engine(&p, seqs, n_seqs);
}

/* ---- 1. batches at TP = 2, 4 against TP = 1 and the reference ------------------------------ */

static void test_batches(speed_backend_t **bes) {
    const struct {
        et_model_spec_t spec;
        int tps[2];
    } cases[] = {
        {{"f32-gqa-untied", SPEED_DTYPE_F32, false, 2, false}, {2, 0}},
        {{"f32-mha-llama3rope", SPEED_DTYPE_F32, false, 4, true}, {2, 4}},
        {{"bf16-mha-tied", SPEED_DTYPE_BF16, true, 4, false}, {2, 4}},
        {{"f16-gqa-untied", SPEED_DTYPE_F16, false, 2, false}, {2, 0}},
    };
    const speed_dtype_t kv_dtypes[] = {SPEED_DTYPE_F32, SPEED_DTYPE_BF16};
    const int lens[N_SEQS] = {5, 61, 250};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const et_model_spec_t *spec = &cases[ci].spec;
        speed_model_t *m = et_model_make(spec);
        CHECK(m != NULL);
        if (!m) continue;
        naive_model_t *nm = naive_model_create(m);
        CHECK(nm != NULL);
        const int L = m->config.n_layers, vocab = m->config.vocab_size;
        const speed_depth_t depths[] = {{L, 1, 1}, {L / 2, 1, 1}, {1, 4, 3}};
        for (size_t ki = 0; ki < sizeof kv_dtypes / sizeof kv_dtypes[0]; ki++) {
            const double tol = tolerance(spec->dtype, kv_dtypes[ki]);
            for (int ti = 0; ti < 2 && cases[ci].tps[ti]; ti++) {
                const int tp = cases[ci].tps[ti];
                double max_ref = 0, max_tp1 = 0;
                for (size_t di = 0; di < sizeof depths / sizeof depths[0]; di++) {
                    char what[160];
                    snprintf(what, sizeof what, "%s/%s cache/TP=%d/C=%d A=%d T=%d", spec->name,
                             speed_dtype_name(kv_dtypes[ki]), tp, depths[di].prefill_layers, depths[di].anchors,
                             depths[di].tail);
                    et_seq_t par[N_SEQS], one[N_SEQS];
                    memset(par, 0, sizeof par);
                    for (int i = 0; i < N_SEQS; i++) {
                        par[i].depth = depths[di];
                        par[i].n_prompt = lens[i];
                        par[i].n_gen = N_GEN;
                        et_prompt(par[i].prompt, lens[i], (uint64_t)(ci * 1000 + di * 10 + (size_t)i), vocab);
                    }
                    memcpy(one, par, sizeof par);
                    speed_status_t st = run_batch(m, tp, bes, depths[di], kv_dtypes[ki], par, N_SEQS);
                    CHECK_MSG(st == SPEED_OK, "%s: %s (%s)", what, speed_status_string(st), speed_log_last_error());
                    speed_status_t st1 = run_batch(m, 1, bes, depths[di], kv_dtypes[ki], one, N_SEQS);
                    CHECK_MSG(st1 == SPEED_OK, "%s: TP=1 run: %s", what, speed_status_string(st1));
                    for (int i = 0; st == SPEED_OK && st1 == SPEED_OK && i < N_SEQS; i++) {
                        et_cmp_t cmp = {0};
                        CHECK(et_compare(nm, vocab, &par[i], depths[di].prefill_layers, kv_dtypes[ki], tol, 2 * tol,
                                         &cmp) == 0);
                        CHECK_MSG(cmp.max_lp_diff <= tol && cmp.token_mismatch == 0,
                                  "%s: n=%d: vs reference: max logprob diff %.3g (tol %.3g), %d token mismatches", what,
                                  lens[i], cmp.max_lp_diff, tol, cmp.token_mismatch);
                        if (cmp.max_lp_diff > max_ref) max_ref = cmp.max_lp_diff;
                        et_compare_runs(&par[i], &one[i], vocab, tol, what, &max_tp1);
                    }
                    for (int i = 0; i < N_SEQS; i++) {
                        et_seq_free(&par[i]);
                        et_seq_free(&one[i]);
                    }
                }
                fprintf(stderr, "TP=%d %-20s %s cache: max |dlogprob| vs reference %.2e, vs TP=1 %.2e (tol %.1e)\n", tp,
                        spec->name, speed_dtype_name(kv_dtypes[ki]), max_ref, max_tp1, tol);
            }
        }
        naive_model_destroy(nm);
        speed_model_destroy(m);
    }
}

/* ---- 2. prefill at one TP size, decode at another ------------------------------------------- */

/* Greedy: prefill `prompt` on engine ep, move its KV to a reservation on engine ed, decode
 * N_GEN tokens there. */
static speed_status_t prefill_then_decode(speed_engine_t *ep, speed_engine_t *ed, const int32_t *prompt, int n,
                                          const speed_depth_t *depth, int32_t *gen) {
    int vocab = speed_engine_n_vocab(ep);
    speed_seq_id_t sp, sd;
    SPEED_CHECK(speed_engine_seq_add(ep, prompt, n, depth, 1, &sp));
    speed_engine_step_result_t r;
    int first = -1;
    while (first < 0) {
        SPEED_CHECK(speed_engine_step(ep, &r));
        if (r.n_seqs == 0) return SPEED_ERR_INTERNAL;
        if (r.n_outputs == 1) first = et_argmax(r.outputs[0].logits, vocab);
    }
    size_t wire = 0;
    SPEED_CHECK(speed_engine_seq_kv_size(ep, sp, &wire));
    void *buf = malloc(wire);
    speed_status_t st = speed_engine_seq_kv_export(ep, sp, buf, wire);
    speed_engine_seq_remove(ep, sp);
    if (st == SPEED_OK) st = speed_engine_seq_reserve(ed, n, depth, N_GEN, &sd);
    if (st == SPEED_OK) st = speed_engine_seq_kv_import(ed, sd, buf, wire);
    free(buf);
    SPEED_CHECK(st);
    gen[0] = first;
    for (int g = 1; g < N_GEN; g++) {
        SPEED_CHECK(speed_engine_seq_append(ed, sd, gen[g - 1]));
        SPEED_CHECK(speed_engine_step(ed, &r));
        if (r.n_outputs != 1) return SPEED_ERR_INTERNAL;
        gen[g] = et_argmax(r.outputs[0].logits, vocab);
    }
    return speed_engine_seq_remove(ed, sd);
}

static void test_cross_tp(speed_backend_t **bes) {
    const et_model_spec_t spec = {"f32-mha-cross", SPEED_DTYPE_F32, false, 4, false};
    speed_model_t *m = et_model_make(&spec);
    CHECK(m != NULL);
    if (!m) return;
    const int L = m->config.n_layers, vocab = m->config.vocab_size;
    const int pairs[][2] = {{2, 1}, {1, 2}, {2, 4}, {4, 2}};
    const speed_depth_t depths[] = {{L, 1, 1}, {L / 2, 2, 2}};
    enum { N = 70 };
    int32_t prompt[N];
    et_prompt(prompt, N, 77, vocab);
    for (size_t di = 0; di < sizeof depths / sizeof depths[0]; di++) {
        /* the unsplit run */
        et_seq_t want = {.depth = depths[di], .n_prompt = N, .n_gen = N_GEN};
        memcpy(want.prompt, prompt, sizeof prompt);
        CHECK(run_batch(m, 1, bes, depths[di], SPEED_DTYPE_BF16, &want, 1) == SPEED_OK);
        for (size_t pi = 0; pi < sizeof pairs / sizeof pairs[0]; pi++) {
            const int a = pairs[pi][0], b = pairs[pi][1];
            /* the prefill engine's ranks use backends [0, a), the decode engine's [a, a + b) */
            speed_engine_params_t pp = tp_params(m, a, bes, depths[di], SPEED_DTYPE_BF16);
            speed_engine_params_t pd = tp_params(m, b, bes + a, depths[di], SPEED_DTYPE_BF16);
            speed_engine_t *ep = NULL, *ed = NULL;
            CHECK(speed_engine_create(&pp, &ep) == SPEED_OK);
            CHECK(speed_engine_create(&pd, &ed) == SPEED_OK);
            int32_t gen[N_GEN] = {0};
            speed_status_t st =
                ep && ed ? prefill_then_decode(ep, ed, prompt, N, &depths[di], gen) : SPEED_ERR_INTERNAL;
            CHECK_MSG(st == SPEED_OK, "TP %d -> %d, C=%d: %s (%s)", a, b, depths[di].prefill_layers,
                      speed_status_string(st), speed_log_last_error());
            int same = 0;
            while (same < N_GEN && gen[same] == want.gen[same]) same++;
            CHECK_MSG(same == N_GEN, "TP %d prefill -> TP %d decode, C=%d: token %d is %d, TP=1 gives %d", a, b,
                      depths[di].prefill_layers, same, same < N_GEN ? gen[same] : -1,
                      same < N_GEN ? want.gen[same] : -1);
            speed_engine_destroy(ep);
            speed_engine_destroy(ed);
        }
        et_seq_free(&want);
    }
    fprintf(stderr, "prefill at TP a -> decode at TP b: %zu pairs x %zu depths checked\n",
            sizeof pairs / sizeof pairs[0], sizeof depths / sizeof depths[0]);
    speed_model_destroy(m);
}

/* ---- 3. refusals and failures --------------------------------------------------------------- */

static void test_refusals(speed_backend_t **bes) {
    const et_model_spec_t spec = {"f32-gqa-errors", SPEED_DTYPE_F32, false, 2, false};
    speed_model_t *m = et_model_make(&spec);
    CHECK(m != NULL);
    if (!m) return;
    speed_engine_t *e = NULL;
    speed_depth_t d = speed_depth_default();
    speed_engine_params_t p = tp_params(m, 4, bes, d, SPEED_DTYPE_F32); /* 2 kv heads: 4 ranks cannot split */
    CHECK_INT_EQ(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(strstr(speed_log_last_error(), "divide") != NULL);
    p = tp_params(m, 2, bes, d, SPEED_DTYPE_F32);
    p.tp_backends = NULL;
    CHECK_INT_EQ(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT);
    speed_backend_t *same[2] = {bes[0], bes[0]};
    p = tp_params(m, 2, same, d, SPEED_DTYPE_F32);
    CHECK_INT_EQ(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(strstr(speed_log_last_error(), "share") != NULL);
    speed_backend_t fake = *bes[1];
    fake.kind = SPEED_BACKEND_CUDA; /* never used: refused before any op */
    speed_backend_t *mixed[2] = {bes[0], &fake};
    p = tp_params(m, 2, mixed, d, SPEED_DTYPE_F32);
    CHECK_INT_EQ(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(strstr(speed_log_last_error(), "CPU backends") != NULL);
    p = tp_params(m, 0, bes, d, SPEED_DTYPE_F32);
    CHECK_INT_EQ(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(e == NULL);
    speed_model_destroy(m);
}

/* A layer callback that fails once, in the middle of a prefill: rank 0 leaves the step while
 * rank 1 is about to wait in an all-reduce; the step must fail (not hang) and the retried step
 * must give the same result as an undisturbed run. */
typedef struct {
    int calls, fail_at;
} fail_cb_t;

static speed_status_t failing_cb(void *user, speed_seq_id_t seq, int layer, int64_t n_done, int64_t n_total) {
    (void)seq, (void)layer, (void)n_done, (void)n_total;
    fail_cb_t *f = user;
    return ++f->calls == f->fail_at ? SPEED_ERR_IO : SPEED_OK;
}

static void test_rank_failure(speed_backend_t **bes) {
    const et_model_spec_t spec = {"f32-mha-fail", SPEED_DTYPE_F32, false, 4, false};
    speed_model_t *m = et_model_make(&spec);
    CHECK(m != NULL);
    if (!m) return;
    const int vocab = m->config.vocab_size;
    speed_depth_t d = speed_depth_default();
    fail_cb_t f = {0, 2};
    speed_engine_params_t p = tp_params(m, 2, bes, d, SPEED_DTYPE_F32);
    p.layer_cb = failing_cb;
    p.layer_cb_user = &f;
    speed_engine_t *e = NULL, *e1 = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    speed_engine_params_t p1 = tp_params(m, 1, bes + 2, d, SPEED_DTYPE_F32);
    CHECK(speed_engine_create(&p1, &e1) == SPEED_OK);
    if (!e || !e1) {
        speed_engine_destroy(e);
        speed_engine_destroy(e1);
        speed_model_destroy(m);
        return;
    }
    int32_t prompt[20];
    et_prompt(prompt, 20, 5, vocab);
    speed_seq_id_t s, s1;
    CHECK(speed_engine_seq_add(e, prompt, 20, NULL, 2, &s) == SPEED_OK);
    CHECK(speed_engine_seq_add(e1, prompt, 20, NULL, 2, &s1) == SPEED_OK);
    speed_engine_step_result_t r, r1;
    CHECK_INT_EQ(speed_engine_step(e, &r), SPEED_ERR_IO);
    CHECK_INT_EQ(r.n_outputs, 0);
    CHECK_INT_EQ(speed_engine_step(e, &r), SPEED_OK); /* redone: the group was remade */
    CHECK_INT_EQ(r.n_outputs, 1);
    CHECK_INT_EQ(speed_engine_step(e1, &r1), SPEED_OK);
    CHECK_INT_EQ(r1.n_outputs, 1);
    if (r.n_outputs == 1 && r1.n_outputs == 1) {
        double diff = 0;
        for (int i = 0; i < vocab; i++)
            if (fabs((double)r.outputs[0].logits[i] - r1.outputs[0].logits[i]) > diff)
                diff = fabs((double)r.outputs[0].logits[i] - r1.outputs[0].logits[i]);
        CHECK_MSG(diff < 1e-3, "logits after the redone step differ from TP=1 by %.3g", diff);
    }
    speed_engine_destroy(e);
    speed_engine_destroy(e1);
    speed_model_destroy(m);
}

int main(void) {
    tu_tmp_init("engine-tp");
    speed_backend_t *bes[6] = {0};
    CHECK(make_backends(6, bes));
    if (bes[5]) {
        test_batches(bes);
        test_cross_tp(bes);
        test_refusals(bes);
        test_rank_failure(bes);
    }
    free_backends(6, bes);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
