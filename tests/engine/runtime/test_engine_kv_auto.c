/* The KV cache dtype "auto" (the default): the cache takes the checkpoint's dtype, so an f32
 * model's greedy output with the default cache is the f32-cache output, bit for bit; a bf16
 * cache on the same model is the control that shows what the default protects (its logits
 * differ; where its greedy tokens first diverge is printed, not asserted: that depends on the
 * ISA's rounding). Also: f16 and bf16 checkpoints get f16 and bf16 caches, and the cache
 * bytes follow the resolved dtype. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine_test_util.h"

#define N_SEQS 3
#define N_GEN  ET_MAX_GEN

static void seqs_init(et_seq_t *seqs, int vocab) {
    memset(seqs, 0, N_SEQS * sizeof *seqs);
    for (int i = 0; i < N_SEQS; i++) {
        seqs[i].n_prompt = 20 + 7 * i;
        seqs[i].n_gen = N_GEN;
        seqs[i].use_default = true;
        et_prompt(seqs[i].prompt, seqs[i].n_prompt, 100 + (uint64_t)i, vocab);
    }
}

static speed_engine_params_t params(speed_backend_t *be, const speed_model_t *m, speed_dtype_t kv, bool set_kv) {
    speed_engine_params_t p = speed_engine_default_params();
    if (set_kv) p.kv_dtype = kv;
    p.backend = be;
    p.model = m;
    p.max_seqs = N_SEQS;
    return p;
}

/* The resolved dtype and the bytes per block, on an engine made with the default params. */
static void check_resolves(speed_backend_t *be, const speed_model_t *m, speed_dtype_t want) {
    speed_engine_params_t p = params(be, m, SPEED_DTYPE_F32, false);
    CHECK(p.kv_dtype == SPEED_KV_DTYPE_AUTO); /* the default */
    CHECK(speed_model_kv_dtype(m) == want);
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (!e) return;
    CHECK_INT_EQ(speed_engine_kv_dtype(e), want);
    int32_t ids[8] = {1, 5, 6, 7, 8, 9, 10, 11};
    speed_seq_id_t s;
    CHECK(speed_engine_seq_add(e, ids, 8, NULL, 1, &s) == SPEED_OK);
    speed_engine_step_result_t r;
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    speed_engine_seq_stats_t st;
    CHECK(speed_engine_seq_stats(e, s, &st) == SPEED_OK);
    CHECK_INT_EQ(st.kv_bytes_used, speed_kv_bytes_for_prompt(&m->config, m->config.n_layers, 1, 1, 8, want));
    speed_engine_destroy(e);
}

/* Teacher-forced logits [n_forced][vocab] of one prompt followed by `forced` tokens, with the
 * cache dtype kv (the same tokens whatever the cache: a measure of the cache alone). */
static void run_forced(speed_backend_t *be, const speed_model_t *m, speed_dtype_t kv, const int32_t *prompt,
                       int n_prompt, const int32_t *forced, int n_forced, float *logits) {
    speed_engine_params_t p = params(be, m, kv, true);
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (!e) return;
    const int V = m->config.vocab_size;
    speed_seq_id_t s;
    CHECK(speed_engine_seq_add(e, prompt, n_prompt, NULL, n_forced, &s) == SPEED_OK);
    int k = 0;
    for (int guard = 0; k < n_forced && guard < 10000; guard++) {
        speed_engine_step_result_t r;
        if (speed_engine_step(e, &r) != SPEED_OK) break;
        for (int o = 0; o < r.n_outputs; o++) {
            memcpy(logits + (size_t)k * V, r.outputs[o].logits, (size_t)V * sizeof(float));
            if (++k < n_forced) CHECK(speed_engine_seq_append(e, s, forced[k - 1]) == SPEED_OK);
        }
    }
    CHECK_INT_EQ(k, n_forced);
    speed_engine_destroy(e);
}

/* What each cache dtype costs on an f32 model: KL(f32 cache || X cache) and top-1 agreement over
 * teacher-forced positions (printed: the numbers of docs/config.md). */
static void measure_cost(speed_backend_t *be, const speed_model_t *m) {
    enum { N_PROMPTS = 4, N_P = 96, N_F = 32 };
    const int V = m->config.vocab_size;
    float *ref = malloc((size_t)N_F * V * sizeof(float)), *got = malloc((size_t)N_F * V * sizeof(float));
    static const speed_dtype_t kvs[] = {SPEED_DTYPE_BF16, SPEED_DTYPE_F16};
    double kl_sum[2] = {0}, kl_max[2] = {0};
    int same[2] = {0}, n = 0;
    for (int i = 0; i < N_PROMPTS; i++) {
        int32_t prompt[N_P], forced[N_F];
        et_prompt(prompt, N_P, 500 + (uint64_t)i, V);
        et_prompt(forced, N_F, 900 + (uint64_t)i, V);
        forced[0] = 7;
        run_forced(be, m, SPEED_DTYPE_F32, prompt, N_P, forced, N_F, ref);
        for (int d = 0; d < 2; d++) {
            run_forced(be, m, kvs[d], prompt, N_P, forced, N_F, got);
            for (int k = 0; k < N_F; k++) {
                const float *a = ref + (size_t)k * V, *b = got + (size_t)k * V;
                double ma = a[0], mb = b[0], sa = 0, sb = 0, kl = 0;
                for (int v = 1; v < V; v++) ma = fmax(ma, a[v]), mb = fmax(mb, b[v]);
                for (int v = 0; v < V; v++) sa += exp(a[v] - ma), sb += exp(b[v] - mb);
                for (int v = 0; v < V; v++) {
                    double la = a[v] - ma - log(sa), lb = b[v] - mb - log(sb);
                    kl += exp(la) * (la - lb);
                }
                kl_sum[d] += kl;
                kl_max[d] = fmax(kl_max[d], kl);
                same[d] += et_argmax(a, V) == et_argmax(b, V);
            }
        }
        n += N_F;
    }
    for (int d = 0; d < 2; d++) {
        printf("cache %-4s vs f32 on the f32 model: mean KL %.3e nats (max %.3e), top-1 agreement %.2f%% over %d "
               "positions\n",
               speed_dtype_name(kvs[d]), kl_sum[d] / n, kl_max[d], 100.0 * same[d] / n, n);
        CHECK(kl_sum[d] > 0.0); /* the rounding is real */
    }
    free(ref);
    free(got);
}

int main(void) {
    tu_tmp_init("engine-kv-auto");
    speed_backend_t *be = et_backend("cpu");
    if (!be) SKIP_TEST("no cpu backend");
    const et_model_spec_t f32 = {"f32", SPEED_DTYPE_F32, false, 2, false};
    const et_model_spec_t f16 = {"f16", SPEED_DTYPE_F16, false, 2, false};
    const et_model_spec_t bf16 = {"bf16", SPEED_DTYPE_BF16, true, 4, false};
    speed_model_t *m = et_model_make(&f32), *mh = et_model_make(&f16), *mb = et_model_make(&bf16);
    CHECK(m && mh && mb);
    if (m && mh && mb) {
        check_resolves(be, m, SPEED_DTYPE_F32);
        check_resolves(be, mh, SPEED_DTYPE_F16);
        check_resolves(be, mb, SPEED_DTYPE_BF16);

        /* f32 model: default == f32 cache exactly; the bf16 cache is the control */
        const int vocab = m->config.vocab_size;
        et_seq_t dflt[N_SEQS], exact[N_SEQS], lossy[N_SEQS];
        seqs_init(dflt, vocab), seqs_init(exact, vocab), seqs_init(lossy, vocab);
        speed_engine_params_t pd = params(be, m, SPEED_DTYPE_F32, false), pf = params(be, m, SPEED_DTYPE_F32, true),
                              pb = params(be, m, SPEED_DTYPE_BF16, true);
        CHECK(et_run_engine(&pd, dflt, N_SEQS) == SPEED_OK);
        CHECK(et_run_engine(&pf, exact, N_SEQS) == SPEED_OK);
        CHECK(et_run_engine(&pb, lossy, N_SEQS) == SPEED_OK);
        double max_bf16 = 0.0;
        for (int i = 0; i < N_SEQS; i++) {
            CHECK_INT_EQ(dflt[i].n_out, N_GEN);
            CHECK(memcmp(dflt[i].gen, exact[i].gen, sizeof dflt[i].gen) == 0);
            CHECK(memcmp(dflt[i].logits, exact[i].logits, (size_t)N_GEN * vocab * sizeof(float)) == 0);
            int diverge = -1;
            for (int k = 0; k < N_GEN && diverge < 0; k++)
                if (lossy[i].gen[k] != exact[i].gen[k]) diverge = k;
            /* until the first divergence the two saw the same tokens: compare those logits */
            int upto = diverge < 0 ? N_GEN : diverge + 1;
            for (size_t x = 0; x < (size_t)upto * vocab; x++)
                max_bf16 = fmax(max_bf16, fabs((double)lossy[i].logits[x] - (double)exact[i].logits[x]));
            printf("seq %d (prompt %d): bf16 cache greedy tokens %s%d of %d\n", i, exact[i].n_prompt,
                   diverge < 0 ? "match all " : "diverge at token ", diverge < 0 ? N_GEN : diverge, N_GEN);
        }
        printf("f32 model: default cache == f32 cache (bit-identical logits); bf16 cache max |dlogit| %.3e\n",
               max_bf16);
        CHECK(max_bf16 > 0.0); /* the control: a bf16 cache does round this model's K and V */
        for (int i = 0; i < N_SEQS; i++) et_seq_free(&dflt[i]), et_seq_free(&exact[i]), et_seq_free(&lossy[i]);
        measure_cost(be, m);
    }
    speed_model_destroy(m);
    speed_model_destroy(mh);
    speed_model_destroy(mb);
    speed_backend_destroy(be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
