/* The whole engine on the CUDA backend: tiny models run greedily on the GPU must give the
 * tokens and logprobs of the CPU backend and of the naive full-recompute SPEED reference, at
 * C = L (the standard model) and C < L, with f32 and bf16 caches, a batch of sequences whose
 * prompts are shorter than a block, longer than a prefill chunk, and long enough (> 256
 * entries) that decode rows take the attention kernel's split-K path.
 *
 * Usage: test_engine_cuda [cuda|cpu|cpu-ref]   backend under test (default cuda); exit 77 only
 * on a machine without an NVIDIA GPU (with one, a cuda backend that is not built or cannot be
 * created fails: test_gpu.h). The other names run the same harness on a CPU backend, which is
 * how the harness itself is checked everywhere (ctest test_engine_cuda_selfcheck).
 *
 * Checks per sequence:
 *   1. against the naive reference, teacher-forced on the backend's own greedy tokens
 *      (et_compare): max |logprob difference| over the vocabulary and every step <= tol, and
 *      no greedy choice that differs unless the reference's top two are within 2 tol;
 *   2. against the CPU backend ("cpu") run of the same batch: greedy tokens equal, and
 *      logprobs within 2 tol, up to the first step where either side's top two are within
 *      2 tol (after a near tie the two continuations are different texts).
 * Tolerances (logprobs, natural log): f32 weights 1e-3; f16 weights 5e-2 and bf16 weights
 * 1.5e-1 (cuBLAS multiplies 16-bit weights with activations rounded to the weight dtype, as the
 * AVX512-BF16 CPU path does: measured up to 0.11 there for bf16); + 2e-2 with a bf16 cache. */
#include "engine_test_util.h"
#include "test_gpu.h"

enum { N_SEQS = 3, N_GEN = 16 };

static const char *g_backend = "cuda";

static double tolerance(speed_dtype_t weights, speed_dtype_t kv) {
    double t = weights == SPEED_DTYPE_BF16 ? 1.5e-1 : weights == SPEED_DTYPE_F16 ? 5e-2 : 1e-3;
    return kv == SPEED_DTYPE_F32 ? t : t + 2e-2;
}

static speed_backend_t *backend_under_test(const char *name) {
    if (strcmp(name, "cuda") != 0) return et_backend(name);
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CUDA;
    bp.device = 0;
    speed_backend_t *be = NULL;
    speed_status_t st = speed_backend_create(&bp, &be);
    if (st != SPEED_OK) {
        char detail[512];
        snprintf(detail, sizeof detail, "%s (%s)", speed_status_string(st), speed_log_last_error());
        tu_cuda_unavailable_exit("test_engine_cuda", detail); /* skips only without a GPU */
    }
    return be;
}

static speed_status_t run_batch(speed_backend_t *be, const speed_model_t *m, speed_depth_t depth,
                                speed_dtype_t kv_dtype, et_seq_t *seqs) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = be;
    p.model = m;
    p.kv_dtype = kv_dtype;
    p.block_tokens = 16;
    p.prefill_chunk = 48;
    p.max_step_tokens = 96;
    p.max_seqs = N_SEQS;
    p.depth = depth;
    CHECK(speed_engine_params_fit_kv(&p, N_SEQS, ET_MAX_PROMPT, N_GEN) == SPEED_OK);
    return et_run_engine(&p, seqs, N_SEQS);
}

int main(int argc, char **argv) {
    if (argc > 1) g_backend = argv[1];
    tu_tmp_init("engine-cuda");
    speed_backend_t *be = backend_under_test(g_backend);
    if (!be) {
        tu_rm_rf(tu_root);
        SKIP_TEST("backend %s is not available here", g_backend);
    }
    speed_backend_t *cpu = et_backend("cpu");
    CHECK(cpu != NULL);
    if (!cpu) return CHECK_DONE();
    fprintf(stderr, "backend under test: %s; compared with %s\n", speed_backend_name(be), speed_backend_name(cpu));

    const et_model_spec_t specs[] = {
        {"f32-gqa-untied", SPEED_DTYPE_F32, false, 2, false},
        {"bf16-gqa-tied", SPEED_DTYPE_BF16, true, 2, false},
        {"f16-mha-untied", SPEED_DTYPE_F16, false, 4, false},
        {"f32-gqa-llama3rope", SPEED_DTYPE_F32, false, 2, true},
    };
    const speed_dtype_t kv_dtypes[] = {SPEED_DTYPE_F32, SPEED_DTYPE_BF16};
    const int lens[N_SEQS] = {5, 61, 250}; /* < block; > chunk; decode rows see > 256 entries */
    for (size_t mi = 0; mi < sizeof specs / sizeof specs[0]; mi++) {
        speed_model_t *m = et_model_make(&specs[mi]);
        CHECK(m != NULL);
        if (!m) continue;
        naive_model_t *nm = naive_model_create(m);
        CHECK(nm != NULL);
        const int L = m->config.n_layers, vocab = m->config.vocab_size;
        const speed_depth_t depths[] = {{L, 1, 1}, {L / 2, 1, 1}, {1, 4, 3}};
        for (size_t ki = 0; ki < sizeof kv_dtypes / sizeof kv_dtypes[0]; ki++) {
            const double tol = tolerance(specs[mi].dtype, kv_dtypes[ki]);
            double max_ref = 0, max_cpu = 0;
            int n_cases = 0;
            for (size_t di = 0; di < sizeof depths / sizeof depths[0]; di++) {
                char what[160];
                snprintf(what, sizeof what, "%s/%s cache/C=%d A=%d T=%d", specs[mi].name,
                         speed_dtype_name(kv_dtypes[ki]), depths[di].prefill_layers, depths[di].anchors,
                         depths[di].tail);
                et_seq_t dev[N_SEQS], ref[N_SEQS];
                memset(dev, 0, sizeof dev);
                for (int i = 0; i < N_SEQS; i++) {
                    dev[i].depth = depths[di];
                    dev[i].n_prompt = lens[i];
                    dev[i].n_gen = N_GEN;
                    et_prompt(dev[i].prompt, lens[i], (uint64_t)(mi * 1000 + di * 10 + (size_t)i), vocab);
                }
                memcpy(ref, dev, sizeof dev);
                speed_status_t st = run_batch(be, m, depths[di], kv_dtypes[ki], dev);
                CHECK_MSG(st == SPEED_OK, "%s: %s run: %s (%s)", what, g_backend, speed_status_string(st),
                          speed_log_last_error());
                speed_status_t st_cpu = run_batch(cpu, m, depths[di], kv_dtypes[ki], ref);
                CHECK_MSG(st_cpu == SPEED_OK, "%s: cpu run: %s", what, speed_status_string(st_cpu));
                for (int i = 0; st == SPEED_OK && i < N_SEQS; i++) {
                    et_cmp_t cmp = {0};
                    int C = depths[di].prefill_layers;
                    CHECK(et_compare(nm, vocab, &dev[i], C, kv_dtypes[ki], tol, 2 * tol, &cmp) == 0);
                    CHECK_MSG(cmp.max_lp_diff <= tol && cmp.token_mismatch == 0,
                              "%s: n=%d: vs reference: max logprob diff %.3g (tol %.3g), %d token mismatches", what,
                              lens[i], cmp.max_lp_diff, tol, cmp.token_mismatch);
                    if (cmp.max_lp_diff > max_ref) max_ref = cmp.max_lp_diff;
                    if (st_cpu == SPEED_OK) et_compare_runs(&dev[i], &ref[i], vocab, tol, what, &max_cpu);
                    n_cases++;
                }
                for (int i = 0; i < N_SEQS; i++) {
                    et_seq_free(&dev[i]);
                    et_seq_free(&ref[i]);
                }
            }
            fprintf(stderr, "%-8s %-18s %s cache: %2d seqs, max |dlogprob| vs reference %.2e, vs cpu %.2e (tol %.1e)\n",
                    g_backend, specs[mi].name, speed_dtype_name(kv_dtypes[ki]), n_cases, max_ref, max_cpu, tol);
        }
        naive_model_destroy(nm);
        speed_model_destroy(m);
    }
    speed_backend_destroy(cpu);
    speed_backend_destroy(be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
