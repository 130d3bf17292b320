/* The partial KV transfer on the disaggregated route (issue 14; docs/prefix-cache.md#in-the-cluster):
 * a 1P2D cluster of models/fortune-llama (argv[1] names another model dir) at C = 6 of 8 with
 * engine.batch_invariant, decode.prefix_cache_blocks set, kv.integrity on (so the per-layer tags
 * must cover exactly the partial layout), and a router with KV-aware routing and
 * router.decode_local_max_new_tokens 0 (never decode-local: every turn goes through the prefill
 * node):
 *
 *  1. turn 1 (64 tokens) goes disaggregated to decode node X, which caches it; the prefill node
 *     ships the whole prompt's KV (speed_kv_transfer_bytes_total on the prefill node, equal to the
 *     response's usage.kv_bytes);
 *  2. turn 2 (the same 64 tokens + 16) goes to X, still disaggregated: X's Reserve looks the
 *     prompt up (a hit of 64 positions), its descriptor starts each layer past the cached
 *     blocks, and the prefill node ships fewer bytes than for turn 1 although the prompt is
 *     longer — exactly the blocks past the hit (one block per layer below C here); no write is
 *     dropped on X (none aimed at the shared blocks), the KV is accepted (integrity tags);
 *  3. turn 3 (turn 2's 80 tokens + 16) hits turn 2's entry — itself made by a partial transfer,
 *     sharing turn 1's blocks — at 80 positions and ships again one block per layer below C;
 *  4. X restarts (its cache is gone), and turn 3's then (after another restart) turn 2's prompt
 *     run cold through the same route: each ships the whole prompt's KV, and its tokens and
 *     every logprob and top logprob equal the partial transfer's answer to the last bit (exact
 *     under batch invariance).
 */
#include <signal.h>

#include "log.h"
#include "model.h"
#include "node_rpc_util.h"
#include "openai_util.h"

#define BT     16
#define N1     (4 * BT)
#define N2     (N1 + BT)
#define N3     (N2 + BT)
#define N_GEN  8
#define C_LOW  6
#define LAYERS "6"

static cu_cluster_t g_c;

static double shipped(void) { return cu_metric0(cu_pre_http(&g_c, 0), "speed_kv_transfer_bytes_total"); }

/* One greedy completion with 2 top logprobs; the answer in *res, the KV bytes the prefill node
 * shipped for it in *bytes_p; returns the decode node that served it (-1: not exactly one). */
static int complete(int port, const int32_t *ids, int n, ou_result_t *res, double *bytes_p) {
    double before[CU_MAX_REPLICAS];
    cu_dec_served(&g_c, before);
    double b0 = shipped();
    char *body = ou_completion_body("model", ids, n, N_GEN, 2, false, NULL, "\"ignore_eos\":true");
    ou_post_completion(port, body, N_GEN, res);
    speed_free(body);
    *bytes_p = shipped() - b0; /* the prefill node counts a transfer before it replies */
    return cu_dec_served_since(&g_c, before);
}

static void scenario(int vocab, int rport) {
    int32_t conv[N3];
    ou_prompt(conv, N3, vocab, 43);
    char series[160];
    ou_result_t r1, r2, r3, cold, cold3;
    double b1 = 0, b2 = 0, b3 = 0, bc = 0, bc3 = 0;

    /* 1. turn 1: disaggregated, the whole prompt shipped, kept by X */
    int x = complete(rport, conv, N1, &r1, &b1);
    if (x < 0) return;
    CHECK_NEAR(cu_metric0(rport, "speed_router_decode_local_total"), 0, 0);
    CHECK_MSG(b1 > 0, "turn 1 shipped no KV");
    CHECK_NEAR((double)ou_usage(&r1, "kv_bytes"), b1, 0);
    CHECK_MSG(cu_wait_metric(rport, cu_router_index_series(&g_c, x, series, sizeof series), 4, 10),
              "the router never learned X's 4 blocks");

    /* 2. turn 2: 64 of 80 tokens cached on X; disaggregated all the same, shipping only the rest */
    double hits0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total"),
           saved0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total");
    double dropped0 = cu_metric0(cu_dec_http(&g_c, x), "speed_kv_writes_dropped");
    int who = complete(rport, conv, N2, &r2, &b2);
    CHECK_MSG(who == x, "turn 2 went to decode node %d, not %d (which holds its prefix)", who, x);
    CHECK_NEAR(cu_metric0(rport, "speed_router_decode_local_total"), 0, 0);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total") - hits0, 1, 0);
    CHECK_MSG(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0 >= N1,
              "saved %.0f prompt tokens", cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0);
    CHECK_MSG(b2 > 0 && b2 < b1, "turn 2 (%d tokens, %d cached) shipped %.0f KV bytes, turn 1 (%d tokens) %.0f", N2, N1,
              b2, N1, b1);
    CHECK_NEAR((double)ou_usage(&r2, "kv_bytes"), b2, 0);
    CHECK_NEAR(cu_metric0(cu_dec_http(&g_c, x), "speed_kv_writes_dropped") - dropped0, 0, 0);
    CHECK(ou_usage(&r2, "prompt_tokens") == N2);

    /* 3. turn 3 hits turn 2's entry (80 positions): again one block per lower layer shipped */
    CHECK_MSG(cu_wait_metric(rport, cu_router_index_series(&g_c, x, series, sizeof series), 5, 10),
              "the router never learned X's 5 blocks");
    saved0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total");
    who = complete(rport, conv, N3, &r3, &b3);
    CHECK_MSG(who == x, "turn 3 went to decode node %d, not %d", who, x);
    CHECK_MSG(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0 >= N2,
              "turn 3 saved %.0f prompt tokens",
              cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0);
    CHECK_NEAR(b3, b2, 0); /* one block of 16 past the hit below C, the upper layers' A + T alike */
    CHECK_NEAR(cu_metric0(cu_dec_http(&g_c, x), "speed_kv_writes_dropped") - dropped0, 0, 0);

    /* 4. X restarts: nothing cached anywhere; the same prompts cold ship everything and answer
     * exactly what the partial transfers' requests answered */
    char idx[16];
    snprintf(idx, sizeof idx, "%d", x);
    const char *more[] = {"--node.index", idx, NULL};
    CHECK_INT_EQ(cu_stop(&g_c.dec[x], SIGTERM, 30), 0);
    g_c.dec[x] = cu_cluster_spawn(&g_c, "speed-decode", x ? "decode1-again" : "decode0-again", more);
    CHECK_MSG(cu_router_wait_nodes(&g_c, rport, 1, 2, 60), "the restarted decode node is not back");
    CHECK_MSG(cu_wait_metric(rport, cu_router_index_series(&g_c, x, series, sizeof series), 0, 10),
              "the router still holds the restarted node's blocks");
    hits0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total");
    int y = complete(rport, conv, N3, &cold3, &bc3);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total") - hits0, 0, 0);
    ou_check_same(&r3, &cold3, "turn 3 (partial transfer past a partial transfer's entry) vs a cold run");
    if (y >= 0) { /* the node that ran it cold now holds it: forget it before turn 2's cold run */
        snprintf(idx, sizeof idx, "%d", y);
        CHECK_INT_EQ(cu_stop(&g_c.dec[y], SIGTERM, 30), 0);
        g_c.dec[y] = cu_cluster_spawn(&g_c, "speed-decode", y ? "decode1-third" : "decode0-third", more);
        CHECK_MSG(cu_router_wait_nodes(&g_c, rport, 1, 2, 60), "the restarted decode node is not back");
        CHECK_MSG(cu_wait_metric(rport, cu_router_index_series(&g_c, y, series, sizeof series), 0, 10),
                  "the router still holds the restarted node's blocks");
    }
    hits0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total");
    complete(rport, conv, N2, &cold, &bc);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total") - hits0, 0, 0);
    /* the cold run ships every block; turn 2 shipped, per layer below C, the blocks past the
     * 64 cached positions (one of five), and the upper layers' anchors and tail whole */
    CHECK_MSG(b2 < bc && bc > b1, "cold %.0f bytes, turn 2 %.0f, turn 1 %.0f", bc, b2, b1);
    double per_layer_token = (bc - b1) / (double)(C_LOW * (N2 - N1)); /* the upper layers' entries are equal */
    CHECK_NEAR(bc - b2, C_LOW * N1 * per_layer_token, 0.5);
    CHECK_NEAR(bc3 - b3, C_LOW * N2 * per_layer_token, 0.5);
    fprintf(stderr,
            "kv bytes shipped: turn 1 %.0f, turn 2 (partial) %.0f, turn 3 (partial) %.0f, cold turn 2 %.0f, cold turn "
            "3 %.0f\n",
            b1, b2, b3, bc, bc3);
    ou_check_same(&r2, &cold, "turn 2 (partial transfer) vs a cold run");
    ou_result_free(&r1);
    ou_result_free(&r2);
    ou_result_free(&r3);
    ou_result_free(&cold);
    ou_result_free(&cold3);
}

int main(int argc, char **argv) {
    speed_log_configure("error");
    cu_init("prefix_partial");
    cu_cluster_t *c = &g_c;
    const char *extra[] = {"--speed.prefill_layers",
                           LAYERS,
                           "--engine.batch_invariant",
                           "--kv.block_tokens",
                           "16",
                           "--kv.integrity",
                           "--decode.prefix_cache_blocks",
                           "512",
                           "--served_model_name",
                           "model",
                           "--log",
                           "info",
                           NULL};
    cu_cluster_init(c, 1, 2, extra);
    cu_cluster_use_model(c, argc > 1 ? argv[1] : SPEED_FORTUNE_DIR);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(c->model_dir, NULL, &model), SPEED_OK);
    if (!model) return CHECK_DONE();
    int vocab = model->config.vocab_size;
    CHECK_INT_EQ(model->config.n_layers, 8); /* C_LOW of 8: the byte arithmetic below */
    speed_model_destroy(model);

    bool ok = cu_cluster_start_nodes(c, 120);
    CHECK_MSG(ok, "nodes did not come up");
    bool rok = false;
    const char *kv[] = {"--router.kv_routing",
                        "affinity",
                        "--router.status_interval_ms",
                        "50",
                        "--router.kv_affinity_weight",
                        "0.8",
                        "--router.decode_local_max_new_tokens",
                        "0",
                        NULL};
    cu_proc_t r = ok ? cu_cluster_router(c, 0, kv, 30, &rok) : (cu_proc_t){0};
    CHECK_MSG(rok, "the router did not come up");
    if (ok && rok) scenario(vocab, cu_router_port(c, 0));
    if (r.pid > 0) CHECK_INT_EQ(cu_stop(&r, SIGTERM, 10), 0);
    for (int i = 0; i < c->np; i++)
        if (c->pre[i].pid > 0) CHECK_INT_EQ(cu_stop(&c->pre[i], SIGTERM, 30), 0);
    for (int i = 0; i < c->nd; i++)
        if (c->dec[i].pid > 0) CHECK_INT_EQ(cu_stop(&c->dec[i], SIGTERM, 30), 0);
    bool failed = check_failures_ > 0;
    if (failed) {
        cu_log_tail("router0", 30);
        cu_log_tail("prefill0", 20);
        cu_log_tail("decode0", 20);
        cu_log_tail("decode1", 20);
    }
    cu_cleanup(failed);
    return CHECK_DONE();
}
