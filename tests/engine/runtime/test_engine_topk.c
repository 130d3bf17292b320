/* The engine with output_topk: outputs carry the top k logits, their ids and the log-sum-exp
 * (speed_op_topk on the backend) instead of the whole vocabulary. Against the same engine with
 * full logits on the same backend and batch:
 *   - greedy tokens (topk_ids[0]) equal the argmax of the full logits;
 *   - topk_ids are the k largest full logits (descending, equal values by lower id) and
 *     topk_logits their values, bit for bit (same backend, same batch: same arithmetic);
 *   - lse equals the log-sum-exp of the full logits (double) within 1e-5 relative;
 *   - logits is NULL and n_topk = k; output_topk out of range is refused at creation.
 *
 *   test_engine_topk [cpu-ref|cpu|cuda]   (cuda: exit 77 only without an NVIDIA GPU)
 */
#include "engine_test_util.h"
#include "test_gpu.h"

#define TOPK_K 20
#define N_SEQS 3
#define N_GEN  6

typedef struct {
    int32_t gen[N_GEN];
    int32_t ids[N_GEN][TOPK_K];
    float vals[N_GEN][TOPK_K];
    float lse[N_GEN];
    int n_out;
    speed_seq_id_t id;
    bool done;
} topk_seq_t;

/* Greedy run of seqs[i] (prompts as in `full`) with output_topk set; records what came out. */
static speed_status_t run_topk(speed_engine_t *e, const et_seq_t *full, topk_seq_t *ts, int n) {
    for (int i = 0; i < n; i++) {
        memset(&ts[i], 0, sizeof ts[i]);
        SPEED_CHECK(speed_engine_seq_add(e, full[i].prompt, full[i].n_prompt, NULL, N_GEN, &ts[i].id));
    }
    int n_done = 0;
    for (int guard = 0; n_done < n && guard < 10000; guard++) {
        speed_engine_step_result_t r;
        SPEED_CHECK(speed_engine_step(e, &r));
        for (int o = 0; o < r.n_outputs; o++) {
            const speed_engine_output_t *out = &r.outputs[o];
            topk_seq_t *s = NULL;
            for (int i = 0; i < n; i++)
                if (ts[i].id == out->seq && !ts[i].done) s = &ts[i];
            if (!s || !out->topk_ids || !out->topk_logits || out->logits || out->n_topk != TOPK_K)
                return SPEED_ERR_INTERNAL;
            memcpy(s->ids[s->n_out], out->topk_ids, sizeof s->ids[0]);
            memcpy(s->vals[s->n_out], out->topk_logits, sizeof s->vals[0]);
            s->lse[s->n_out] = out->lse;
            s->gen[s->n_out] = out->topk_ids[0];
            if (++s->n_out == N_GEN) {
                SPEED_CHECK(speed_engine_seq_remove(e, s->id));
                s->done = true;
                n_done++;
            } else {
                SPEED_CHECK(speed_engine_seq_append(e, s->id, s->gen[s->n_out - 1]));
            }
        }
    }
    return n_done == n ? SPEED_OK : SPEED_ERR_INTERNAL;
}

/* Whether column a ranks before column b in x (larger, or equal and lower). */
static bool ranks_before(const float *x, int a, int b) { return x[a] > x[b] || (x[a] == x[b] && a < b); }

static void check_against_full(const et_seq_t *full, const topk_seq_t *ts, int vocab, const char *what) {
    for (int g = 0; g < N_GEN; g++) {
        const float *x = full->logits + (size_t)g * vocab;
        CHECK_MSG(ts->gen[g] == full->gen[g], "%s: token %d: %d with top-k, %d with full logits", what, g, ts->gen[g],
                  full->gen[g]);
        if (ts->gen[g] != full->gen[g]) return; /* the runs diverged: later logits differ */
        bool ok = true;
        for (int j = 0; j < TOPK_K && ok; j++) {
            int id = ts->ids[g][j];
            ok = id >= 0 && id < vocab && memcmp(&ts->vals[g][j], &x[id], sizeof(float)) == 0;
            if (ok && j > 0) ok = ranks_before(x, ts->ids[g][j - 1], id);
        }
        /* nothing outside the list ranks before its last entry */
        int last = ts->ids[g][TOPK_K - 1], n_before = 0;
        for (int c = 0; ok && c < vocab; c++) n_before += c != last && ranks_before(x, c, last);
        CHECK_MSG(ok && n_before == TOPK_K - 1, "%s: output %d: the top-k list is not the full logits' top %d", what, g,
                  TOPK_K);
        double m = -INFINITY, sum = 0;
        for (int c = 0; c < vocab; c++) m = fmax(m, x[c]);
        for (int c = 0; c < vocab; c++) sum += exp((double)x[c] - m);
        double lse = m + log(sum);
        CHECK_MSG(fabs(ts->lse[g] - lse) <= 1e-5 * fmax(fabs(lse), 1.0), "%s: output %d: lse %.9g, want %.9g", what, g,
                  (double)ts->lse[g], lse);
    }
}

static speed_backend_t *make_backend(const char *name) {
    if (strcmp(name, "cuda") != 0) return et_backend(name);
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = SPEED_BACKEND_CUDA;
    speed_backend_t *be = NULL;
    speed_status_t st = speed_backend_create(&bp, &be);
    if (st != SPEED_OK) {
        char detail[512];
        snprintf(detail, sizeof detail, "%s (%s)", speed_status_string(st), speed_log_last_error());
        tu_cuda_unavailable_exit("test_engine_topk cuda", detail); /* skips only without a GPU */
    }
    return be;
}

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "cpu-ref";
    tu_tmp_init("engine-topk");
    speed_backend_t *be = make_backend(name);
    if (!be) {
        tu_rm_rf(tu_root);
        fprintf(stderr, "backend %s cannot be created\n", name);
        return 1;
    }
    const et_model_spec_t specs[] = {
        {"f32-gqa-untied", SPEED_DTYPE_F32, false, 2, false},
        {"bf16-mha-tied", SPEED_DTYPE_BF16, true, 4, false},
    };
    for (size_t mi = 0; mi < sizeof specs / sizeof specs[0]; mi++) {
        speed_model_t *m = et_model_make(&specs[mi]);
        CHECK(m != NULL);
        if (!m) continue;
        const int V = m->config.vocab_size;
        speed_engine_params_t p = speed_engine_default_params();
        p.backend = be;
        p.model = m;
        p.max_seqs = 4;
        p.max_step_tokens = 48;
        p.prefill_chunk = 12; /* prompts over several steps, decode rows alongside prefill chunks */
        CHECK(speed_engine_params_fit_kv(&p, N_SEQS, 40, N_GEN) == SPEED_OK);

        et_seq_t full[N_SEQS];
        memset(full, 0, sizeof full);
        for (int i = 0; i < N_SEQS; i++) {
            full[i].use_default = true;
            full[i].n_prompt = 9 + 13 * i;
            full[i].n_gen = N_GEN;
            et_prompt(full[i].prompt, full[i].n_prompt, 77 + (uint64_t)i, V);
        }
        CHECK(et_run_engine(&p, full, N_SEQS) == SPEED_OK);

        speed_engine_params_t pk = p;
        pk.output_topk = TOPK_K;
        speed_engine_t *e = NULL;
        CHECK(speed_engine_create(&pk, &e) == SPEED_OK);
        topk_seq_t ts[N_SEQS];
        if (e) {
            CHECK(run_topk(e, full, ts, N_SEQS) == SPEED_OK);
            for (int i = 0; i < N_SEQS; i++) {
                char what[96];
                snprintf(what, sizeof what, "%s on %s, sequence %d", specs[mi].name, name, i);
                check_against_full(&full[i], &ts[i], V, what);
            }
            speed_engine_destroy(e);
        }

        /* out of range: negative, above SPEED_TOPK_MAX, above the vocabulary (a tiny one would
         * need another model: the model's 512 is above 256, so the limit is SPEED_TOPK_MAX) */
        const int bad[] = {-1, SPEED_TOPK_MAX + 1, V + 1};
        for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
            pk.output_topk = bad[b];
            e = NULL;
            CHECK_INT_EQ(speed_engine_create(&pk, &e), SPEED_ERR_INVALID_ARGUMENT);
            CHECK(e == NULL);
        }
        pk.output_topk = V < SPEED_TOPK_MAX ? V : SPEED_TOPK_MAX; /* the largest allowed */
        CHECK_INT_EQ(speed_engine_create(&pk, &e), SPEED_OK);
        speed_engine_destroy(e);

        fprintf(stderr, "%-8s %-16s %d sequences x %d tokens: top-%d outputs match the full logits\n", name,
                specs[mi].name, N_SEQS, N_GEN, TOPK_K);
        for (int i = 0; i < N_SEQS; i++) et_seq_free(&full[i]);
        speed_model_destroy(m);
    }
    speed_backend_destroy(be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
