/* Helpers shared by the engine tests: see engine_test_util.h. */
#include "engine_test_util.h"

/* ---- models and backends ---------------------------------------------------------------- */

/* The small test model: 4 layers, hidden 64, 4 heads, vocab 512, init_std large enough that
 * greedy choices are not ties. */
static speed_tiny_model_params_t et_tiny_params(const et_model_spec_t *spec) {
    speed_tiny_model_params_t p = speed_tiny_model_default_params();
    p.dtype = spec->dtype;
    p.tied = spec->tied;
    p.n_kv_heads = spec->n_kv_heads;
    p.rope_scaling = spec->rope_scaling;
    p.init_std = 0.15f;
    p.seed = 1234 + (uint64_t)spec->n_kv_heads * 7 + (spec->tied ? 1 : 0);
    return p;
}

speed_model_t *et_model_make(const et_model_spec_t *spec) {
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/%s", tu_root, spec->name);
    speed_tiny_model_params_t p = et_tiny_params(spec);
    if (speed_tiny_model_write(dir, &p) != SPEED_OK) return NULL;
    speed_model_t *m = NULL;
    if (speed_model_load(dir, NULL, &m) != SPEED_OK) return NULL;
    return m;
}

speed_backend_t *et_backend(const char *name) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = strncmp(name, "cpu", 3) == 0 && strcmp(name, "cpu-ref") != 0 ? SPEED_BACKEND_CPU : SPEED_BACKEND_CPU_REF;
    if (strcmp(name, "cpu-avx2") == 0) bp.cpu_isa_max = SPEED_CPU_ISA_AVX2;
    if (strcmp(name, "cpu-scalar") == 0) bp.cpu_isa_max = SPEED_CPU_ISA_SCALAR;
    if (bp.cpu_isa_max != SPEED_CPU_ISA_BEST && speed_cpu_isa_detect() < bp.cpu_isa_max) {
        fprintf(stderr, "backend %s: this CPU lacks the instruction set\n", name);
        return NULL;
    }
    bp.n_threads = 2;
    speed_backend_t *be = NULL;
    speed_status_t st = speed_backend_create(&bp, &be);
    if (st != SPEED_OK) {
        fprintf(stderr, "backend %s: %s\n", name, speed_status_string(st));
        return NULL;
    }
    return be;
}

/* ---- prompts ---------------------------------------------------------------------------- */

static uint64_t et_rand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

void et_prompt(int32_t *ids, int n, uint64_t seed, int vocab) {
    uint64_t s = seed * 2654435761u + 17;
    for (int i = 0; i < n; i++) ids[i] = i == 0 ? 1 : (int32_t)(3 + et_rand(&s) % (uint64_t)(vocab - 3));
}

/* ---- greedy driver ----------------------------------------------------------------------- */

int32_t et_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

void et_seq_free(et_seq_t *s) {
    free(s->logits);
    s->logits = NULL;
}

speed_status_t et_run(speed_engine_t *e, et_seq_t *seqs, int n) {
    int vocab = speed_engine_n_vocab(e);
    for (int i = 0; i < n; i++) {
        et_seq_t *s = &seqs[i];
        s->n_out = 0;
        s->done = false;
        free(s->logits);
        s->logits = malloc((size_t)s->n_gen * vocab * sizeof(float));
        speed_status_t st =
            speed_engine_seq_add(e, s->prompt, s->n_prompt, s->use_default ? NULL : &s->depth, s->n_gen, &s->id);
        if (st != SPEED_OK) return st;
    }
    int n_done = 0;
    for (int guard = 0; n_done < n && guard < 100000; guard++) {
        speed_engine_step_result_t r;
        speed_status_t st = speed_engine_step(e, &r);
        if (st != SPEED_OK) return st;
        if (r.n_seqs == 0) return SPEED_ERR_INTERNAL; /* nothing ran but sequences wait */
        for (int o = 0; o < r.n_outputs; o++) {
            et_seq_t *s = NULL;
            for (int i = 0; i < n; i++)
                if (seqs[i].id == r.outputs[o].seq && !seqs[i].done) s = &seqs[i];
            if (!s) return SPEED_ERR_INTERNAL;
            if (r.outputs[o].first != (s->n_out == 0)) return SPEED_ERR_INTERNAL;
            if (r.outputs[o].position != s->n_prompt - 1 + s->n_out) return SPEED_ERR_INTERNAL;
            memcpy(s->logits + (size_t)s->n_out * vocab, r.outputs[o].logits, (size_t)vocab * sizeof(float));
            s->gen[s->n_out] = et_argmax(r.outputs[o].logits, vocab);
            if (s->n_out == 0) speed_engine_seq_stats(e, s->id, &s->stats_after_prefill);
            s->n_out++;
            speed_engine_seq_stats(e, s->id, &s->stats_last);
            if (s->n_out == s->n_gen) {
                if (speed_engine_seq_remove(e, s->id) != SPEED_OK) return SPEED_ERR_INTERNAL;
                s->done = true;
                n_done++;
            } else {
                st = speed_engine_seq_append(e, s->id, s->gen[s->n_out - 1]);
                if (st != SPEED_OK) return st;
            }
        }
    }
    return n_done == n ? SPEED_OK : SPEED_ERR_INTERNAL;
}

speed_status_t et_run_engine(const speed_engine_params_t *p, et_seq_t *seqs, int n) {
    speed_engine_t *e = NULL;
    speed_status_t st = speed_engine_create(p, &e);
    if (st != SPEED_OK) return st;
    st = et_run(e, seqs, n);
    speed_engine_stats_t es;
    speed_engine_stats(e, &es);
    CHECK_INT_EQ(es.kv.n_blocks_free[0], es.kv.n_blocks[0]);
    CHECK_INT_EQ(es.kv.n_blocks_free[1], es.kv.n_blocks[1]);
    speed_engine_destroy(e);
    return st;
}

/* ---- comparison ---------------------------------------------------------------------------- */

/* The largest of x[0..n) (the first on ties) and its gap to the runner-up. */
static void et_top2(const float *x, int n, int *best_p, double *gap_p) {
    int b = 0, s = -1;
    for (int i = 1; i < n; i++) {
        if (x[i] > x[b]) {
            s = b;
            b = i;
        } else if (s < 0 || x[i] > x[s]) {
            s = i;
        }
    }
    *best_p = b;
    *gap_p = s < 0 ? INFINITY : (double)x[b] - x[s];
}

int et_compare(const naive_model_t *nm, int vocab, const et_seq_t *s, int C, speed_dtype_t kv_dtype, double tol,
               double tie_eps, et_cmp_t *cmp) {
    int N = s->n_prompt + s->n_gen - 1;
    int32_t *toks = malloc((size_t)N * sizeof(int32_t));
    float *ref = malloc((size_t)s->n_gen * vocab * sizeof(float));
    float *lpe = malloc((size_t)vocab * sizeof(float));
    memcpy(toks, s->prompt, (size_t)s->n_prompt * sizeof(int32_t));
    for (int g = 0; g + 1 < s->n_gen; g++) toks[s->n_prompt + g] = s->gen[g];
    int rc = naive_ref_logits(nm, toks, N, s->n_prompt, C, s->depth.anchors, s->depth.tail, kv_dtype, s->n_gen, ref);
    for (int g = 0; rc == 0 && g < s->n_gen; g++) {
        float *lpr = ref + (size_t)g * vocab;
        naive_log_softmax(s->logits + (size_t)g * vocab, vocab, lpe);
        naive_log_softmax(lpr, vocab, lpr);
        for (int i = 0; i < vocab; i++) {
            double d = fabs((double)lpe[i] - lpr[i]);
            if (d > cmp->max_lp_diff) cmp->max_lp_diff = d;
        }
        int32_t chosen = s->gen[g], want = et_argmax(lpr, vocab);
        double dc = fabs((double)lpe[chosen] - lpr[chosen]);
        if (dc > cmp->max_chosen_diff) cmp->max_chosen_diff = dc;
        if (chosen != want) {
            /* excused only when the reference itself nearly ties the two tokens */
            double gap = (double)lpr[want] - lpr[chosen];
            if (gap <= tie_eps) {
                cmp->near_ties++;
                if (gap > cmp->max_tie_gap) cmp->max_tie_gap = gap;
            } else {
                cmp->token_mismatch++;
                if (cmp->min_mismatch_gap == 0 || gap < cmp->min_mismatch_gap) cmp->min_mismatch_gap = gap;
            }
        }
    }
    free(toks);
    free(ref);
    free(lpe);
    return rc;
}

void et_compare_runs(const et_seq_t *d, const et_seq_t *c, int vocab, double tol, const char *what,
                     double *max_diff_p) {
    float *lpd = malloc((size_t)vocab * sizeof(float)), *lpc = malloc((size_t)vocab * sizeof(float));
    for (int g = 0; g < d->n_gen; g++) {
        naive_log_softmax(d->logits + (size_t)g * vocab, vocab, lpd);
        naive_log_softmax(c->logits + (size_t)g * vocab, vocab, lpc);
        double diff = 0;
        for (int i = 0; i < vocab; i++)
            if (fabs((double)lpd[i] - lpc[i]) > diff) diff = fabs((double)lpd[i] - lpc[i]);
        if (diff > *max_diff_p) *max_diff_p = diff;
        CHECK_MSG(diff <= 2 * tol, "%s: step %d: logprobs differ from the other run's by %.3g (tol %.3g)", what, g,
                  diff, 2 * tol);
        int bd, bc;
        double gd, gc;
        et_top2(lpd, vocab, &bd, &gd);
        et_top2(lpc, vocab, &bc, &gc);
        if (gd <= 2 * tol || gc <= 2 * tol) break; /* a near tie: the continuations may part here */
        CHECK_MSG(bd == bc && d->gen[g] == c->gen[g], "%s: step %d: token %d vs the other run's %d", what, g, d->gen[g],
                  c->gen[g]);
        if (d->gen[g] != c->gen[g]) break;
    }
    free(lpd);
    free(lpc);
}
