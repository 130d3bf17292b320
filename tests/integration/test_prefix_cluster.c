/* The decode nodes' prefix cache in a real cluster (issue 14; docs/prefix-cache.md): a 1P2D
 * cluster of models/fortune-llama (a trained 8-layer model; argv[1] names another model dir)
 * at C = 6 of 8 with engine.batch_invariant on, decode.prefix_cache_blocks set, and a router
 * with KV-aware routing and router.decode_local_max_new_tokens 64:
 *
 *  1. turn 1 (64 tokens) goes disaggregated (prefill node → decode node X); X keeps the
 *     received KV (speed_batcher_reserve_keep) and its cache events tell the router; idle, X
 *     reports no load (Node.Status active_blocks, usage ratio) though its cache holds blocks;
 *  2. turn 2 (the same 64 tokens + 16) finds 64 of them cached on X: the router sends it
 *     decode-only to X (speed_router_decode_local_total), X's lookup hits and reuses at least
 *     the 64 positions (speed_prefix_cache_hits_total, _tokens_saved_total): only the suffix
 *     is computed;
 *  3. a prompt with another first token (a different prefix) never hits, on either node;
 *  4. X restarts: its cache is gone (the router's index of X empties, nothing hits), and turn
 *     2's prompt sent decode-only through a second router (kv_routing off) runs cold on a node
 *     that holds nothing of it: its tokens and every logprob and top logprob equal turn 2's to
 *     the last bit (the hit is exact under batch invariance).
 */
#include <signal.h>

#include "log.h"
#include "model.h"
#include "node_rpc_util.h"
#include "openai_util.h"
#include "speed_methods.h"

#define BT     16
#define N1     (4 * BT)
#define N2     (N1 + BT)
#define N_GEN  8
#define LAYERS "6"

static cu_cluster_t g_c;

/* One greedy completion with 2 top logprobs; the answer in *res; returns the decode node that
 * served it (-1: not exactly one). */
static int complete(int port, const int32_t *ids, int n, ou_result_t *res) {
    double before[CU_MAX_REPLICAS];
    cu_dec_served(&g_c, before);
    char *body = ou_completion_body("model", ids, n, N_GEN, 2, false, NULL, "\"ignore_eos\":true");
    ou_post_completion(port, body, N_GEN, res);
    speed_free(body);
    return cu_dec_served_since(&g_c, before);
}

/* Decode node d's load as its Node.Status reports it to the router: true when no request holds
 * a block (active_blocks 0, usage ratio 0) while its prefix cache holds some — cached entries
 * are not load. */
static bool idle_with_cache(int d) {
    speed_rpc_channel_t *ch = nr_channel(cu_dec_grpc(&g_c, d), cu_rpc_tls("router"));
    Speed__V1__NodeStatusRequest q = SPEED__V1__NODE_STATUS_REQUEST__INIT;
    Speed__V1__NodeStatus *st = NULL;
    bool idle = false;
    if (ch &&
        nr_call(ch, SPEED_METHOD_NODE_STATUS, &q.base, &speed__v1__node_status__descriptor, (ProtobufCMessage **)&st,
                NULL, 0) == 0 &&
        st)
        idle = st->active_blocks == 0 && st->kv_usage_ratio == 0 && st->running == 0;
    if (st) speed_proto_free(&st->base);
    speed_rpc_channel_destroy(ch);
    return idle && cu_metric0(cu_dec_http(&g_c, d), "speed_prefix_cache_blocks") >= 4 &&
           cu_metric0(cu_dec_http(&g_c, d), "speed_kv_blocks_reserved") == 0;
}

static void scenario(int vocab, int rport, int cold_port) {
    int32_t conv[N2], other[N2];
    ou_prompt(conv, N2, vocab, 41);
    char series[160];
    ou_result_t r1, r2, r3, cold;

    /* 1. turn 1: disaggregated, kept by X */
    double local0 = cu_metric0(rport, "speed_router_decode_local_total");
    int x = complete(rport, conv, N1, &r1);
    if (x < 0) return;
    CHECK_NEAR(cu_metric0(rport, "speed_router_decode_local_total") - local0, 0, 0);
    CHECK_NEAR(cu_metric0(cu_dec_http(&g_c, x), "speed_node_cache_events_total{kind=\"stored\"}"), 4, 0);
    CHECK_MSG(cu_wait_metric(rport, cu_router_index_series(&g_c, x, series, sizeof series), 4, 10),
              "the router never learned X's 4 blocks");
    bool idle = false;
    for (double until = now_s() + 10; now_s() < until && !idle; sleep_ms(20)) idle = idle_with_cache(x);
    CHECK_MSG(idle, "decode node %d reports its cached blocks as load", x);

    /* 2. turn 2: 64 of 80 tokens cached on X: decode-local there, computing the suffix only */
    double hits0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total"),
           saved0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total");
    int who = complete(rport, conv, N2, &r2);
    CHECK_MSG(who == x, "turn 2 went to decode node %d, not %d (which holds its prefix)", who, x);
    CHECK_NEAR(cu_metric0(rport, "speed_router_decode_local_total") - local0, 1, 0);
    CHECK(cu_metric0(cu_dec_http(&g_c, x), "speed_prefix_cache_hits_total") >= 1);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total") - hits0, 1, 0);
    CHECK_MSG(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0 >= N1,
              "saved %.0f prompt tokens", cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0);
    CHECK(ou_usage(&r2, "prompt_tokens") == N2);

    /* 3. another prefix (the first block differs): no hit anywhere */
    memcpy(other, conv, sizeof other);
    other[1] = (other[1] + 1) % vocab;
    hits0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total");
    complete(rport, other, N2, &r3);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total") - hits0, 0, 0);

    /* 4. X restarts: the cache is forgotten; the cold run of turn 2's prompt equals turn 2 */
    CHECK_INT_EQ(cu_stop(&g_c.dec[x], SIGTERM, 30), 0);
    char idx[16];
    snprintf(idx, sizeof idx, "%d", x);
    const char *more[] = {"--node.index", idx, NULL};
    g_c.dec[x] = cu_cluster_spawn(&g_c, "speed-decode", x ? "decode1-again" : "decode0-again", more);
    CHECK_MSG(cu_router_wait_nodes(&g_c, rport, 1, 2, 60), "the restarted decode node is not back");
    CHECK_MSG(cu_router_wait_nodes(&g_c, cold_port, 1, 2, 60), "the restarted decode node is not back (router 2)");
    CHECK_MSG(cu_wait_metric(rport, cu_router_index_series(&g_c, x, series, sizeof series), 0, 10),
              "the router still holds the restarted node's blocks");
    /* the other node never held this conversation (turns 1 and 2 ran on X) */
    hits0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total");
    double lookups0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_lookups_total");
    complete(cold_port, conv, N2, &cold);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_lookups_total") - lookups0, 1, 0);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total") - hits0, 0, 0);
    ou_check_same(&r2, &cold, "turn 2 (cache hit) vs a cold run");
    ou_result_free(&r1);
    ou_result_free(&r2);
    ou_result_free(&r3);
    ou_result_free(&cold);
}

int main(int argc, char **argv) {
    speed_log_configure("error");
    cu_init("prefix_cluster");
    cu_cluster_t *c = &g_c;
    const char *extra[] = {"--speed.prefill_layers",
                           LAYERS,
                           "--engine.batch_invariant",
                           "--kv.block_tokens",
                           "16",
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
    speed_model_destroy(model);

    bool ok = cu_cluster_start_nodes(c, 120);
    CHECK_MSG(ok, "nodes did not come up");
    bool rok = false, rok2 = false;
    const char *kv[] = {"--router.kv_routing",
                        "affinity",
                        "--router.status_interval_ms",
                        "50",
                        "--router.kv_affinity_weight",
                        "0.8",
                        "--router.decode_local_max_new_tokens",
                        "64",
                        NULL};
    cu_proc_t r = ok ? cu_cluster_router(c, 0, kv, 30, &rok) : (cu_proc_t){0};
    const char *cold[] = {"--router.decode_only_below", "1000000", NULL};
    cu_proc_t r2 = ok ? cu_cluster_router(c, 1, cold, 30, &rok2) : (cu_proc_t){0};
    CHECK_MSG(rok && rok2, "routers did not come up");
    if (ok && rok && rok2) scenario(vocab, cu_router_port(c, 0), cu_router_port(c, 1));
    if (r.pid > 0) CHECK_INT_EQ(cu_stop(&r, SIGTERM, 10), 0);
    if (r2.pid > 0) CHECK_INT_EQ(cu_stop(&r2, SIGTERM, 10), 0);
    for (int i = 0; i < c->np; i++)
        if (c->pre[i].pid > 0) CHECK_INT_EQ(cu_stop(&c->pre[i], SIGTERM, 30), 0);
    for (int i = 0; i < c->nd; i++)
        if (c->dec[i].pid > 0) CHECK_INT_EQ(cu_stop(&c->dec[i], SIGTERM, 30), 0);
    bool failed = check_failures_ > 0;
    if (failed) {
        cu_log_tail("router0", 30);
        cu_log_tail("decode0", 20);
        cu_log_tail("decode1", 20);
    }
    cu_cleanup(failed);
    return CHECK_DONE();
}
