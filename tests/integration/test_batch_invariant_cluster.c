/* Batch invariance through a whole cluster (issue 11): on a 1P2D cluster with
 * engine.batch_invariant on, 12 greedy streams sent at once give bit-identical answers (token
 * ids, text, every logprob to the last bit: the router prints 9 significant digits, which
 * round-trip a float) to the same 12 prompts sent one at a time, and to
 * `speedctl generate --batch-invariant` — one engine, no transfer, one sequence at a time.
 *
 * The control: the same 12 prompts on the same cluster with the mode off. There the batch a
 * request shares changes its logits' rounding (GEMV for one row, GEMM for more, split
 * attention), so some logprob differs between concurrent and sequential runs; the test asserts
 * that it does, which shows the comparison can fail and that requests really shared batches.
 *
 * The prompts have different lengths (so prefill chunks and decode batches mix prompts at
 * different positions) on a model wide enough (hidden 256) for the GEMM paths to be taken. */
#include <pthread.h>

#include "log.h"
#include "model.h"
#include "openai_util.h"

#define N_REQ   12
#define N_GEN   24
#define MAX_LEN 300

static speed_tok_t *g_tok;
static int32_t g_ids[N_REQ][MAX_LEN];
static int g_len[N_REQ];
static int g_rport;

typedef struct {
    int i;
    ou_result_t res;
    pthread_t th;
} job_t;

static char *body_for(int i) {
    return ou_completion_body("model", g_ids[i], g_len[i], N_GEN, 2, true, NULL, "\"ignore_eos\":true");
}

/* One streamed request; its answer in *res (zeroed on a transport failure, then CHECKed). */
static void run_one(int i, ou_result_t *res) {
    char *body = body_for(i);
    cu_sse_t s;
    memset(res, 0, sizeof *res);
    bool ok = cu_sse_begin(g_rport, "/v1/completions", body, NULL, 60000, &s);
    CHECK_MSG(ok && s.status == 200, "request %d: HTTP %d", i, ok ? s.status : -1);
    if (ok) {
        cu_sse_read(&s, -1, now_s() + 120);
        ou_from_sse(res, &s);
        CHECK_MSG(res->done && !res->error && res->n == N_GEN, "request %d: done %d error %d, %d tokens", i, res->done,
                  res->error != NULL, res->n);
        cu_sse_free(&s);
    }
    speed_free(body);
}

static void *job_run(void *arg) {
    job_t *j = arg;
    run_one(j->i, &j->res);
    return NULL;
}

static void run_concurrent(ou_result_t out[N_REQ]) {
    job_t jobs[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        jobs[i].i = i;
        CHECK_INT_EQ(pthread_create(&jobs[i].th, NULL, job_run, &jobs[i]), 0);
    }
    for (int i = 0; i < N_REQ; i++) {
        pthread_join(jobs[i].th, NULL);
        out[i] = jobs[i].res;
    }
}

/* Bit-exact equality of two answers (ou_diff_count). Returns the number of positions that
 * differ (0 = identical); prints the first. */
static int count_diffs(const ou_result_t *a, const ou_result_t *b, int req, const char *what, bool print) {
    char first[256];
    int diffs = ou_diff_count(a, b, first, sizeof first);
    if (diffs && print) fprintf(stderr, "%s: request %d differs at %s\n", what, req, first);
    return diffs;
}

/* speedctl generate --batch-invariant at the cluster's depth: the reference of request i. */
static json_t *ref_json(int i) {
    char *csv = ou_ids_csv(g_ids[i], g_len[i]);
    char key[32];
    snprintf(key, sizeof key, "bi%d", i);
    json_t *ref = ou_ref(key,
                         "--prompt-ids %s --prefill-layers 3 --max-tokens %d --top-logprobs 2 --ignore-eos "
                         "--batch-invariant",
                         csv, N_GEN);
    speed_free(csv);
    return ref;
}

/* Starts a 1P2D cluster (mode on or off), runs the 12 prompts concurrently and one at a time;
 * returns the number of requests whose concurrent answer differs from the sequential one. */
static int run_cluster(bool invariant, ou_result_t conc[N_REQ], ou_result_t seq[N_REQ]) {
    const char *extra[] = {"--speed.prefill_layers",
                           "3",
                           invariant ? "--engine.batch_invariant" : "--no-engine.batch_invariant",
                           "--decode.kv_tokens",
                           "16384",
                           "--router.decode_policy",
                           "round-robin",
                           "--log",
                           "error",
                           NULL};
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 2, extra);
    bool ok = cu_cluster_start_nodes(&c, 60), ok_r = false;
    CHECK_MSG(ok, "nodes did not come up");
    cu_proc_t router = cu_cluster_router(&c, 0, NULL, 30, &ok_r);
    CHECK_MSG(ok_r, "the router did not come up");
    g_rport = cu_router_port(&c, 0);
    int differ = -1;
    if (ok && ok_r) {
        run_one(0, &seq[0]); /* warm-up, also the first sequential answer */
        for (int i = 1; i < N_REQ; i++) run_one(i, &seq[i]);
        run_concurrent(conc);
        differ = 0;
        for (int i = 0; i < N_REQ; i++)
            differ += count_diffs(&conc[i], &seq[i], i, "concurrent vs sequential", invariant) > 0;
        /* both decode nodes took part, so the streams were batched on each */
        for (int d = 0; d < 2; d++)
            CHECK_MSG(cu_metric_sum(cu_dec_http(&c, d), "speed_decode_requests_total") >= N_REQ / 2,
                      "decode node %d served fewer than %d requests", d, N_REQ / 2);
    }
    CHECK_INT_EQ(cu_stop(&router, SIGTERM, 30), 0);
    for (int i = 0; i < c.nd; i++) CHECK_INT_EQ(cu_stop(&c.dec[i], SIGTERM, 30), 0);
    CHECK_INT_EQ(cu_stop(&c.pre[0], SIGTERM, 30), 0);
    return differ;
}

int main(void) {
    speed_log_configure("error");
    cu_init_model("batch-invariant-cluster", "--hidden 256 --heads 8 --kv_heads 2 --ffn 688");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &g_tok), SPEED_OK);
    if (!model || !g_tok) return CHECK_DONE();
    for (int i = 0; i < N_REQ; i++) {
        g_len[i] = 20 + (i * 97) % (MAX_LEN - 20);
        ou_prompt(g_ids[i], g_len[i], model->config.vocab_size, 31 + 2 * i);
    }

    ou_result_t conc[N_REQ], seq[N_REQ];
    double t0 = now_s();
    int differ_on = run_cluster(true, conc, seq);
    fprintf(stderr, "mode on: %d of %d concurrent answers differ from sequential (%.1f s)\n", differ_on, N_REQ,
            now_s() - t0);
    CHECK_INT_EQ(differ_on, 0);
    /* bit for bit: logprobs with tolerance 0, no near ties allowed */
    ou_tol = 0;
    ou_near_tie = false;
    for (int i = 0; i < N_REQ; i++) {
        json_t *ref = ref_json(i);
        CHECK_MSG(ref != NULL, "no reference for request %d", i);
        char what[64];
        snprintf(what, sizeof what, "request %d vs speedctl generate --batch-invariant", i);
        if (ref) ou_check_ref(&seq[i], ref, g_tok, false, what);
        json_decref(ref);
    }
    for (int i = 0; i < N_REQ; i++) {
        ou_result_free(&conc[i]);
        ou_result_free(&seq[i]);
    }

    t0 = now_s();
    int differ_off = run_cluster(false, conc, seq);
    fprintf(stderr, "control, mode off: %d of %d concurrent answers differ from sequential (%.1f s)\n", differ_off,
            N_REQ, now_s() - t0);
    CHECK_MSG(differ_off > 0, "with the mode off every concurrent answer equalled its sequential run to the last bit: "
                              "the comparison cannot tell batched from unbatched runs");
    for (int i = 0; i < N_REQ; i++) {
        ou_result_free(&conc[i]);
        ou_result_free(&seq[i]);
    }
    speed_tok_destroy(g_tok);
    speed_model_destroy(model);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
