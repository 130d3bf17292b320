/* speedctl eval's scoring (eval.h): every record through the serving engine at full depth and at
 * each cutoff, compared position by position.
 *
 * A record at depth C is one engine sequence: its prompt is added with depth {C, A, T} and
 * max_new_tokens n_cont, exactly as a prefill node adds a request (the engine runs the shallow
 * tokens through layers < C only); each output is then answered with the record's true next
 * token (teacher forcing), which the engine runs at full depth as a decode node runs generated
 * tokens. Output k follows position n_prompt - 1 + k and predicts ids[n_prompt + k]. The
 * full-depth sequence (C = L) is the reference, or with --reference-model a second model's
 * full-depth sequence of the same record, run on its own engine after the wave. All sequences of a wave of records step
 * together (continuous batching), so one engine step carries several records and cutoffs. */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "eval.h"
#include "log.h"
#include "speedctl.h"

/* Logits kept for one wave, at most (they are compared when the wave ends). */
#define WAVE_BYTES_MAX ((size_t)512 << 20)

typedef struct {
    speed_seq_id_t seq;
    size_t record;
    int C;
    int64_t k;     /* outputs received */
    float *logits; /* [n_cont][vocab] */
    bool alive;
} job_t;

void speedctl_eval_acc_cleanup(speedctl_eval_acc_t *acc) {
    speed_free(acc->kl);
    acc->kl = NULL;
    acc->n_pos = acc->cap = 0;
}

static speed_status_t acc_push(speedctl_eval_acc_t *acc, double kl) {
    if (acc->n_pos == acc->cap) {
        int64_t cap = acc->cap ? acc->cap * 2 : 1024;
        double *grown = speed_realloc(acc->kl, (size_t)cap * sizeof *grown);
        if (!grown) return SPEED_ERR_NO_MEMORY;
        acc->kl = grown;
        acc->cap = cap;
    }
    acc->kl[acc->n_pos++] = kl;
    return SPEED_OK;
}

/* log Σ exp(x), in double. */
static double log_sum_exp(const float *x, int n) {
    double m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    double s = 0.0;
    for (int i = 0; i < n; i++) s += exp((double)x[i] - m);
    return m + log(s);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Adds the comparison of one record's cutoff job against its full-depth job. */
static speed_status_t compare(const speedctl_eval_record_t *r, const job_t *full, const job_t *cut, int vocab,
                              speedctl_eval_acc_t *acc) {
    bool retrieved = true;
    for (int64_t k = 0; k < r->n_cont; k++) {
        const float *f = full->logits + (size_t)k * (size_t)vocab, *c = cut->logits + (size_t)k * (size_t)vocab;
        double lse_f = log_sum_exp(f, vocab), lse_c = log_sum_exp(c, vocab), kl = 0.0;
        for (int v = 0; v < vocab; v++) {
            double lf = (double)f[v] - lse_f;
            kl += exp(lf) * (lf - ((double)c[v] - lse_c));
        }
        int top = argmax(c, vocab);
        int32_t truth = r->ids[r->n_prompt + k];
        retrieved = retrieved && top == truth;
        if (r->probe_depth >= 0) continue;               /* probe records count only as retrieved or not */
        SPEED_CHECK(acc_push(acc, kl > 0.0 ? kl : 0.0)); /* rounding can make an exact 0 slightly negative */
        acc->n_top1_same += top == argmax(f, vocab);
        acc->nll_sum += lse_c - (double)c[truth];
    }
    if (r->probe_depth >= 0 && r->probe_depth < SPEEDCTL_EVAL_MAX_DEPTHS) {
        acc->probe_n[r->probe_depth]++;
        acc->probe_hits[r->probe_depth] += retrieved;
    }
    return SPEED_OK;
}

static void progress_draw(const char *what, size_t done, size_t total) {
    const int width = 30;
    int fill = total ? (int)((double)width * (double)done / (double)total) : width;
    fprintf(stderr, "\r  eval %-8s [", what);
    for (int i = 0; i < width; i++) fputc(i < fill ? '#' : '.', stderr);
    fprintf(stderr, "] %zu/%zu", done, total);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

/* Runs jobs[0..n_jobs) to completion: steps, keeps each output's logits and feeds the true
 * token back until the record's continuation is scored. Removes every sequence it added. */
static speed_status_t wave_run(speed_engine_t *eng, const speedctl_eval_run_t *run, const speedctl_eval_set_t *set,
                               job_t *jobs, int n_jobs, int vocab) {
    speed_status_t st = SPEED_OK;
    int n_alive = 0;
    for (int j = 0; j < n_jobs && st == SPEED_OK; j++) {
        const speedctl_eval_record_t *r = &set->v[jobs[j].record];
        speed_depth_t d = {jobs[j].C, run->anchors, run->tail};
        st = speed_engine_seq_add(eng, r->ids, r->n_prompt, &d, r->n_cont, &jobs[j].seq);
        jobs[j].alive = st == SPEED_OK;
        jobs[j].k = 0;
        n_alive += jobs[j].alive;
    }
    while (st == SPEED_OK && n_alive > 0) {
        speed_engine_step_result_t res;
        if ((st = speed_engine_step(eng, &res)) != SPEED_OK) break;
        for (int o = 0; o < res.n_outputs && st == SPEED_OK; o++) {
            job_t *jb = NULL;
            for (int j = 0; j < n_jobs && !jb; j++)
                if (jobs[j].alive && jobs[j].seq == res.outputs[o].seq) jb = &jobs[j];
            SPEED_ASSERT(jb != NULL);
            const speedctl_eval_record_t *r = &set->v[jb->record];
            memcpy(jb->logits + (size_t)jb->k * (size_t)vocab, res.outputs[o].logits, (size_t)vocab * sizeof(float));
            jb->k++;
            if (jb->k < r->n_cont) {
                st = speed_engine_seq_append(eng, jb->seq, r->ids[r->n_prompt + jb->k - 1]);
            } else {
                speed_engine_seq_remove(eng, jb->seq);
                jb->alive = false;
                n_alive--;
            }
        }
    }
    for (int j = 0; j < n_jobs; j++)
        if (jobs[j].alive) speed_engine_seq_remove(eng, jobs[j].seq);
    return st;
}

speed_status_t speedctl_eval_score(const speedctl_eval_run_t *run, const speedctl_eval_set_t *set,
                                   speedctl_eval_acc_t *accs, int n_accs) {
    if (set->n == 0) return SPEED_OK;
    const int L = run->n_layers, vocab = speed_engine_n_vocab(run->engine);
    const bool ref = run->reference != NULL;
    if (ref && speed_engine_n_vocab(run->reference) != vocab) return SPEED_ERR_INVALID_ARGUMENT;
    /* the cutoffs to run besides full depth: each distinct C < L once */
    int cuts[SPEEDCTL_EVAL_MAX_CUTOFFS + 1], n_cuts = 1;
    cuts[0] = L;
    for (int i = 0; i < n_accs; i++) {
        bool seen = false;
        for (int c = 0; c < n_cuts; c++) seen = seen || cuts[c] == accs[i].prefill_layers;
        if (!seen) cuts[n_cuts++] = accs[i].prefill_layers;
    }
    int64_t max_cont = 1;
    for (size_t i = 0; i < set->n; i++) max_cont = set->v[i].n_cont > max_cont ? set->v[i].n_cont : max_cont;
    size_t job_bytes = (size_t)max_cont * (size_t)vocab * sizeof(float);
    int per_record = n_cuts + ref; /* with a reference, its full-depth job comes along */
    int per_wave = run->max_seqs / n_cuts;
    if (ref && run->reference_max_seqs < per_wave) per_wave = run->reference_max_seqs;
    if ((size_t)per_wave * (size_t)per_record * job_bytes > WAVE_BYTES_MAX)
        per_wave = (int)(WAVE_BYTES_MAX / ((size_t)per_record * job_bytes));
    if (per_wave < 1) per_wave = 1; /* the engine must take n_cuts sequences (cli_eval sizes it) */
    int max_jobs = per_wave * per_record;

    job_t *jobs = speed_calloc((size_t)max_jobs, sizeof *jobs);
    float *buf = speed_malloc((size_t)max_jobs * job_bytes);
    speed_status_t st = jobs && buf ? SPEED_OK : SPEED_ERR_NO_MEMORY;
    job_t *ref_jobs = jobs + (size_t)per_wave * (size_t)n_cuts; /* the reference's, after the model's */
    bool bar = run->progress && isatty(STDERR_FILENO);
    for (size_t first = 0; first < set->n && st == SPEED_OK; first += (size_t)per_wave) {
        size_t last = first + (size_t)per_wave < set->n ? first + (size_t)per_wave : set->n;
        int n_jobs = 0, n_ref = 0;
        for (size_t r = first; r < last; r++)
            for (int c = 0; c < n_cuts; c++, n_jobs++)
                jobs[n_jobs] = (job_t){
                    .record = r, .C = cuts[c], .logits = buf + (size_t)n_jobs * (size_t)max_cont * (size_t)vocab};
        for (size_t r = first; ref && r < last; r++, n_ref++)
            ref_jobs[n_ref] =
                (job_t){.record = r,
                        .C = run->reference_layers,
                        .logits = buf + (size_t)(ref_jobs - jobs + n_ref) * (size_t)max_cont * (size_t)vocab};
        st = wave_run(run->engine, run, set, jobs, n_jobs, vocab);
        if (st == SPEED_OK && ref) st = wave_run(run->reference, run, set, ref_jobs, n_ref, vocab);
        for (int j = 0; j < n_jobs && st == SPEED_OK; j++) {
            /* each record's jobs start with its full-depth one; a reference replaces it */
            const job_t *full = ref ? &ref_jobs[j / n_cuts] : &jobs[j - j % n_cuts];
            for (int i = 0; i < n_accs && st == SPEED_OK; i++)
                if (accs[i].prefill_layers == jobs[j].C)
                    st = compare(&set->v[jobs[j].record], full, &jobs[j], vocab, &accs[i]);
        }
        if (bar && st == SPEED_OK) progress_draw(run->what, last, set->n);
    }
    if (bar && st != SPEED_OK) fputc('\n', stderr);
    speed_free(buf);
    speed_free(jobs);
    return st;
}
