/* Tensor-parallel nodes in a real cluster (router → prefill → UCX → decode on loopback):
 *
 *  1. prefill.tensor_parallel 2 feeding a decode node at 1, then prefill at 1 feeding decode at
 *     2: completions at C = L, C < L and the deployment's C, whole and streamed, have the tokens
 *     of `speedctl generate` (one rank) and its logprobs within 3e-3 (the split changes only the
 *     order of partial sums); the KV the prefill node ships is exactly the SPEED formula's bytes
 *     (the cache layout does not depend on the TP size, so nothing is resharded);
 *  2. a node whose tensor_parallel does not divide the model's heads, and a cuda pool with
 *     tensor_parallel > 1, exit non-zero at start with one line saying why;
 *  3. every node exits 0 on SIGTERM. */
#include "file.h"
#include "log.h"
#include "model.h"
#include "openai_util.h"

#define N_PROMPT 40
#define N_GEN    8

static speed_tok_t *g_tok;
static const speed_model_config_t *g_mc;
static int32_t g_prompt[N_PROMPT];
static char *g_csv;

static size_t kv_want(int C) { return speed_kv_bytes_for_prompt(g_mc, C, 1, 1, N_PROMPT, SPEED_DTYPE_BF16); }

/* One completion through the router against the one-rank reference at depth C. */
static void check_completion(int rport, int pre_http, int C, const char *c_json, bool stream, const char *what) {
    char key[32], label[160];
    snprintf(key, sizeof key, "c%d", C);
    snprintf(label, sizeof label, "%s: C=%s %s", what, c_json ? c_json : "default", stream ? "stream" : "whole");
    json_t *ref = ou_ref(key, "--prompt-ids %s --prefill-layers %d --max-tokens %d --top-logprobs 2", g_csv, C, N_GEN);
    double before = cu_metric_sum(pre_http, "speed_kv_transfer_bytes_total");
    if (isnan(before)) before = 0;
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, N_GEN, 2, stream, c_json, NULL);
    ou_result_t r;
    memset(&r, 0, sizeof r);
    if (stream) {
        cu_sse_t s;
        CHECK_MSG(cu_sse_begin(rport, "/v1/completions", body, NULL, 30000, &s), "%s: no stream", label);
        CHECK_INT_EQ(s.status, 200);
        cu_sse_read(&s, -1, now_s() + 60);
        CHECK_MSG(s.ended, "%s: stream did not end", label);
        ou_from_sse(&r, &s);
        cu_sse_free(&s);
    } else {
        cu_resp_t resp;
        cu_http(rport, "POST", "/v1/completions", body, NULL, NULL, 60000, &resp);
        CHECK_MSG(resp.status == 200, "%s: HTTP %d: %s", label, resp.status, resp.body ? resp.body : "");
        if (resp.status == 200 && resp.json) ou_from_json(&r, resp.json);
        cu_resp_free(&resp);
    }
    ou_check_ref(&r, ref, g_tok, false, label);
    CHECK_INT_EQ(ou_usage(&r, "kv_bytes"), kv_want(C));
    double t0 = now_s(), after = before;
    while ((after = cu_metric_sum(pre_http, "speed_kv_transfer_bytes_total")) < before + (double)kv_want(C) &&
           now_s() - t0 < 3)
        usleep(20000);
    CHECK_MSG(after - before == (double)kv_want(C), "%s: the prefill node shipped %.0f bytes, want %zu", label,
              after - before, kv_want(C));
    ou_result_free(&r);
    speed_free(body);
    json_decref(ref);
}

static bool log_contains(const char *name, const char *needle) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.log", cu_dir, name);
    char *text = NULL;
    size_t n = 0;
    if (speed_file_read(path, 1 << 24, SPEED_SUBSYS_CORE, 0, &text, &n) != SPEED_OK) return false;
    bool found = strstr(text, needle) != NULL;
    speed_free(text);
    return found;
}

/* A 1-prefill 1-decode cluster with the given tensor_parallel sizes, checked end to end. */
static void run_cluster(int tp_prefill, int tp_decode) {
    char what[64], tpp[8], tpd[8];
    snprintf(what, sizeof what, "prefill TP %d -> decode TP %d", tp_prefill, tp_decode);
    snprintf(tpp, sizeof tpp, "%d", tp_prefill);
    snprintf(tpd, sizeof tpd, "%d", tp_decode);
    const char *extra[] = {"--speed.prefill_layers",
                           "3",
                           "--prefill.tensor_parallel",
                           tpp,
                           "--decode.tensor_parallel",
                           tpd,
                           "--prefill.threads",
                           "2",
                           "--decode.threads",
                           "2",
                           "--log",
                           "info",
                           NULL};
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, extra);
    bool ok = cu_cluster_start_nodes(&c, 60);
    CHECK_MSG(ok, "%s: nodes did not come up", what);
    bool ok_r = false;
    cu_proc_t r = cu_cluster_router(&c, 0, NULL, 30, &ok_r);
    CHECK_MSG(ok_r, "%s: router did not come up", what);
    if (ok && ok_r) {
        const char *tp_line = "tensor parallel: 2 ranks";
        CHECK_MSG(log_contains(tp_prefill > 1 ? "prefill0" : "decode0", tp_line), "%s: no \"%s\" in the log", what,
                  tp_line);
        int rport = cu_router_port(&c, 0), pre_http = cu_pre_http(&c, 0);
        check_completion(rport, pre_http, g_mc->n_layers, "4", false, what);
        check_completion(rport, pre_http, 3, "3", true, what);
        check_completion(rport, pre_http, 2, "0.5", false, what);
        check_completion(rport, pre_http, 3, NULL, true, what); /* the deployment's C */
        /* a node releases a request's blocks just after its last reply: give it a moment */
        double t0 = now_s(), held;
        while ((held = cu_metric_sum(cu_dec_http(&c, 0), "speed_kv_blocks_reserved")) != 0 && now_s() - t0 < 5)
            usleep(20000);
        CHECK_MSG(held == 0, "%s: %.0f decode blocks still reserved 5 s after the last request", what, held);
    } else {
        cu_log_tail("prefill0", 20);
        cu_log_tail("decode0", 20);
    }
    int rc = cu_stop(&r, SIGTERM, 30);
    CHECK_MSG(rc == 0, "%s: router exit %d", what, rc);
    rc = cu_stop(&c.pre[0], SIGTERM, 30);
    CHECK_MSG(rc == 0, "%s: prefill exit %d", what, rc);
    rc = cu_stop(&c.dec[0], SIGTERM, 30);
    CHECK_MSG(rc == 0, "%s: decode exit %d", what, rc);
}

/* A decode node that cannot start with these arguments: exit code non-zero, the reason logged. */
static void check_refused(const char *const *args, const char *needle) {
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, args);
    const char *more[] = {"--node.index", "0", NULL};
    cu_proc_t p = cu_cluster_spawn(&c, "speed-decode", "decode-refused", more);
    int rc = cu_wait_exit(&p, 60);
    CHECK_MSG(rc != 0 && rc != -1, "%s: exit %d", needle, rc);
    CHECK_MSG(log_contains("decode-refused", needle), "no \"%s\" in the log", needle);
    if (!log_contains("decode-refused", needle)) cu_log_tail("decode-refused", 10);
}

int main(void) {
    speed_log_configure("error");
    cu_init("cluster-tp");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &g_tok), SPEED_OK);
    if (!model || !g_tok) return CHECK_DONE();
    g_mc = &model->config;
    CHECK_MSG(g_mc->n_kv_heads % 2 == 0 && g_mc->n_heads % 2 == 0, "the tiny model's heads do not split in two");
    ou_prompt(g_prompt, N_PROMPT, g_mc->vocab_size, 41);
    g_csv = ou_ids_csv(g_prompt, N_PROMPT);
    ou_tol = 3e-3;
    ou_near_tie = true;

    double t = now_s();
    run_cluster(2, 1);
    fprintf(stderr, "prefill TP 2 -> decode TP 1: %.1f s\n", now_s() - t);
    t = now_s();
    run_cluster(1, 2);
    fprintf(stderr, "prefill TP 1 -> decode TP 2: %.1f s, largest logprob deviation %.2g, %d near ties\n", now_s() - t,
            ou_max_dev, ou_n_near_ties);

    char odd[16];
    snprintf(odd, sizeof odd, "%d", g_mc->n_kv_heads + 1);
    const char *bad_tp[] = {"--decode.tensor_parallel", odd, NULL};
    check_refused(bad_tp, "does not divide");
    const char *cuda_tp[] = {"--decode.tensor_parallel", "2", "--decode.backend", "cuda", NULL};
    check_refused(cuda_tp, "tensor_parallel 2 with backend cuda");

    speed_free(g_csv);
    speed_tok_destroy(g_tok);
    speed_model_destroy(model);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
