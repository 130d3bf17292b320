/* KV-aware routing on a real 1P2D cluster (speed-router with router.kv_routing affinity →
 * speed-prefill → speed-decode ×2; docs/router.md#kv-aware-routing):
 *
 *  1. a first turn (64 tokens = 4 blocks) goes to some decode node X; X caches it and journals its
 *     4 prompt blocks as stored (speed_node_cache_events_total{kind="stored"}), and the router's prefix
 *     index learns them from X's status replies (speed_router_kv_index_blocks{node=X} = 4);
 *  2. three next turns (the same 64 tokens + 16 more) all go to X, counted as affinity;
 *  3. four unrelated prompts are spread over both decode nodes (balance: nobody holds them), and
 *     the router puts a completed prompt's blocks in the index ahead of the node's events;
 *  4. X is killed: the router forgets its blocks (gauge 0) as soon as it is down; restarted,
 *     it comes back with a new journal instance (a snapshot, empty), and the next turn is not
 *     sent to it for affinity (counted as balance);
 *  5. the decode-only route (a second router, every prompt short) caches its prompts too, and
 *     its next turn, sent to the node that holds the first, reuses it (the engine's prefix
 *     cache on the decode node: speed_prefix_cache_hits_total, _tokens_saved_total).
 * The decode nodes run their prefix cache (decode.prefix_cache_blocks): the journal is fed by
 * its events (a block stored once, whatever number of entries share it). */
#include <signal.h>

#include "log.h"
#include "model.h"
#include "openai_util.h"

#define BT     16
#define N_A    (4 * BT)
#define N_NEXT (N_A + BT)
#define N_D    (3 * BT)

static cu_cluster_t g_c;
static int g_rport;

static double routed(const char *reason) {
    char s[96];
    snprintf(s, sizeof s, "speed_router_kv_routed_total{reason=\"%s\"}", reason);
    return cu_metric0(g_rport, s);
}

static void complete(int port, const int32_t *ids, int n) {
    char *body = ou_completion_body("model", ids, n, 4, 0, false, NULL, NULL);
    cu_resp_t resp;
    CHECK(cu_http(port, "POST", "/v1/completions", body, NULL, NULL, 60000, &resp));
    CHECK_MSG(resp.status == 200, "HTTP %d: %s", resp.status, resp.body ? resp.body : "");
    cu_resp_free(&resp);
    speed_free(body);
}

/* Sends one completion to the router on port and says which decode node served it (-1: none or
 * both moved). */
static int complete_via(int port, const int32_t *ids, int n) {
    double before[CU_MAX_REPLICAS];
    cu_dec_served(&g_c, before);
    complete(port, ids, n);
    return cu_dec_served_since(&g_c, before);
}

static int complete_on(const int32_t *ids, int n) { return complete_via(g_rport, ids, n); }

static void scenario(int vocab) {
    int32_t a[N_NEXT], d[4][N_D];
    ou_prompt(a, N_NEXT, vocab, 37);
    char series[160];

    /* 1. the first turn */
    const char *stored = "speed_node_cache_events_total{kind=\"stored\"}";
    /* what earlier conversations stored has reached this router's index (its status polls) */
    bool caught_up = false;
    for (double until = now_s() + 10; now_s() < until && !caught_up; sleep_ms(20)) {
        caught_up = true;
        for (int k = 0; k < 2; k++)
            caught_up = caught_up && cu_metric0(g_rport, cu_router_index_series(&g_c, k, series, sizeof series)) ==
                                         cu_metric0(cu_dec_http(&g_c, k), stored);
    }
    CHECK_MSG(caught_up, "the router's index never caught up with the nodes' stored blocks");
    double stored0[2] = {cu_metric0(cu_dec_http(&g_c, 0), stored), cu_metric0(cu_dec_http(&g_c, 1), stored)};
    double index0[2] = {cu_metric0(g_rport, cu_router_index_series(&g_c, 0, series, sizeof series)),
                        cu_metric0(g_rport, cu_router_index_series(&g_c, 1, series, sizeof series))};
    int x = complete_on(a, N_A);
    if (x < 0) return;
    int y = 1 - x;
    CHECK_NEAR(cu_metric0(cu_dec_http(&g_c, x), stored) - stored0[x], 4, 0);
    CHECK_NEAR(cu_metric0(cu_dec_http(&g_c, y), stored) - stored0[y], 0, 0);
    CHECK_MSG(cu_wait_metric(g_rport, cu_router_index_series(&g_c, x, series, sizeof series), index0[x] + 4, 10),
              "the router never learned X's 4 blocks");
    CHECK_NEAR(cu_metric0(g_rport, cu_router_index_series(&g_c, y, series, sizeof series)), index0[y], 0);

    /* 2. the next turns: the same prefix, to the same node, for affinity */
    double aff0 = routed("affinity");
    double cached0 = cu_metric0(g_rport, "speed_router_kv_prompt_blocks_total{where=\"cached\"}");
    for (int t = 0; t < 3; t++) {
        int who = complete_on(a, N_NEXT);
        CHECK_MSG(who == x, "turn %d went to decode node %d, not %d (which holds its prefix)", t + 2, who, x);
        /* the router holds this turn's 5 blocks before the next turn (turn 2 adds the fifth;
         * turns 3 and 4 store nothing new: the cache reports a hash once, whatever number of
         * entries hold it) */
        CHECK_MSG(cu_wait_metric(g_rport, cu_router_index_series(&g_c, x, series, sizeof series), index0[x] + 5, 10),
                  "the router never learned turn %d's blocks", t + 2);
    }
    CHECK_NEAR(routed("affinity") - aff0, 3, 0);
    /* each next turn (5 blocks) found 4 of them cached at X, then all 5 */
    CHECK_NEAR(cu_metric0(g_rport, "speed_router_kv_prompt_blocks_total{where=\"cached\"}") - cached0, 4 + 5 + 5, 0);
    CHECK(cu_metric_sum0(g_rport, "speed_router_kv_events_total") >= 5);

    /* 3. unrelated prompts: nobody holds them, they spread */
    double bal0 = routed("balance");
    const char *ant = "speed_router_kv_events_total{kind=\"anticipated\"}";
    double ant0 = cu_metric0(g_rport, ant);
    int on[2] = {0, 0};
    for (int k = 0; k < 4; k++) {
        ou_prompt(d[k], N_D, vocab, 11 + 2 * k);
        int who = complete_on(d[k], N_D);
        if (who >= 0) on[who]++;
    }
    CHECK_MSG(on[0] > 0 && on[1] > 0, "unrelated prompts all went to one node (%d / %d)", on[0], on[1]);
    CHECK_NEAR(routed("balance") - bal0, 4, 0);
    /* a prompt that completed on a node known to store blocks is in the index before that node's
     * next status reply says so (unless a poll came first: at least one of the four) */
    CHECK_MSG(cu_metric0(g_rport, ant) - ant0 >= 3, "anticipated %.0f blocks", cu_metric0(g_rport, ant) - ant0);

    /* 4. X dies: forgotten at once; restarted: a new instance, nothing of the old blocks */
    double snaps0 = cu_metric0(g_rport, "speed_router_kv_snapshots_total");
    CHECK_INT_EQ(cu_stop(&g_c.dec[x], SIGKILL, 10), 128 + SIGKILL);
    CHECK_MSG(cu_wait_metric(g_rport, cu_router_index_series(&g_c, x, series, sizeof series), 0, 10),
              "the router still holds the dead node's blocks");
    char idx[16];
    snprintf(idx, sizeof idx, "%d", x);
    const char *more[] = {"--node.index", idx, NULL};
    g_c.dec[x] = cu_cluster_spawn(&g_c, "speed-decode", x ? "decode1-again" : "decode0-again", more);
    CHECK_MSG(cu_router_wait_nodes(&g_c, g_rport, 1, 2, 30), "the restarted decode node is not back");
    /* its first status reply after the restart is a snapshot of its (empty) journal */
    for (double until = now_s() + 10;
         now_s() < until && cu_metric0(g_rport, "speed_router_kv_snapshots_total") <= snaps0;)
        sleep_ms(20);
    CHECK(cu_metric0(g_rport, "speed_router_kv_snapshots_total") > snaps0);
    CHECK_NEAR(cu_metric0(g_rport, cu_router_index_series(&g_c, x, series, sizeof series)), 0, 0);
    aff0 = routed("affinity");
    bal0 = routed("balance");
    complete_on(a, N_NEXT);
    CHECK_NEAR(routed("affinity") - aff0, 0, 0); /* nobody holds the conversation any more */
    CHECK_NEAR(routed("balance") - bal0, 1, 0);
}

/* A next turn sent the moment the previous one ends goes to the node that holds it, although the
 * router's last status of that node cannot know the first turn is over: the router counts the
 * end itself (speed_balance_pool_finish). Without that, the first turn still loads the node by
 * its 5 blocks (a status taken while it ran, or its pick since the last one), and at the default
 * weight 0.5 the idle node wins (0.5 x 5 new blocks against 0.5 x 1 + 0.5 x 5). The router polls
 * every 300 ms: a poll landing between the two turns makes the load fresh and the turn passes
 * either way; an end counted while a poll is out outlives its reply (speed_balance_pool_poll_begin). */
static void next_turn_at_once(int vocab, int rport) {
    /* both nodes store blocks first, and the router has heard so: it anticipates a completed
     * request's blocks only on a node whose cache reported storing */
    char series[2][160];
    int32_t w[N_NEXT];
    bool on[2] = {false, false};
    for (int k = 0; k < 8 && !(on[0] && on[1]); k++) {
        ou_prompt(w, N_A, vocab, 91 + k);
        int who = complete_via(rport, w, N_A);
        if (who >= 0) on[who] = true;
    }
    CHECK_MSG(on[0] && on[1], "warm-up prompts did not reach both decode nodes");
    for (int d = 0; d < 2; d++) {
        cu_router_index_series(&g_c, d, series[d], sizeof series[d]);
        bool heard = false;
        for (double until = now_s() + 10; now_s() < until && !heard; sleep_ms(20))
            heard = cu_metric0(rport, series[d]) >= 1;
        CHECK_MSG(heard, "the router never heard decode node %d store", d);
    }
    for (int k = 0; k < 2; k++) {
        int32_t e[N_NEXT];
        ou_prompt(e, N_NEXT, vocab, 71 + k);
        int first = complete_via(rport, e, N_A);
        int next = complete_via(rport, e, N_NEXT);
        CHECK_MSG(first >= 0 && next == first, "conversation %d: turn 1 on decode node %d, turn 2 sent at once on %d",
                  k, first, next);
    }
}

/* The decode-only route (a router whose every prompt is short) caches its prompts too, and a
 * next turn sent to the node that holds the first computes only its suffix there: the engine's
 * prefix cache, its events and its counters. */
static void decode_only(int vocab) {
    int32_t p[N_D + BT];
    ou_prompt(p, N_D, vocab, 53);
    const char *stored = "speed_node_cache_events_total{kind=\"stored\"}";
    double before[2] = {cu_metric0(cu_dec_http(&g_c, 0), stored), cu_metric0(cu_dec_http(&g_c, 1), stored)};
    int rport = cu_router_port(&g_c, 1);
    char series[2][160];
    double index0[2];
    for (int d = 0; d < 2; d++)
        index0[d] = cu_metric0(rport, cu_router_index_series(&g_c, d, series[d], sizeof series[d]));
    complete(rport, p, N_D);
    /* 48 prompt tokens + 3 generated tokens fed back: 3 full blocks stored, on one node */
    int k = cu_metric0(cu_dec_http(&g_c, 1), stored) > before[1];
    CHECK_NEAR(cu_metric0(cu_dec_http(&g_c, k), stored) - before[k], 3, 0);
    CHECK_NEAR(cu_metric0(cu_dec_http(&g_c, 1 - k), stored) - before[1 - k], 0, 0);
    bool learned = false; /* at least: the index may also be catching up on older events */
    for (double until = now_s() + 10; now_s() < until && !learned; sleep_ms(10))
        learned = cu_metric0(rport, series[k]) >= index0[k] + 3;
    CHECK_MSG(learned, "the second router never learned the decode-only prompt's blocks");
    double hits0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total"),
           saved0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total");
    double lookups0 = cu_dec_metric_sum0(&g_c, "speed_prefix_cache_lookups_total");
    ou_prompt(p + N_D, BT, vocab, 54);
    complete(rport, p, N_D + BT);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_lookups_total") - lookups0, 1, 0);
    CHECK_NEAR(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_hits_total") - hits0, 1, 0);
    CHECK_MSG(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0 >= N_D,
              "saved %.0f prompt tokens", cu_dec_metric_sum0(&g_c, "speed_prefix_cache_tokens_saved_total") - saved0);
    CHECK(cu_dec_metric_sum0(&g_c, "speed_prefix_cache_blocks") >= 4);
}

int main(void) {
    speed_log_configure("error");
    cu_init("kv_routing");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    if (!model) return CHECK_DONE();
    int vocab = model->config.vocab_size;
    speed_model_destroy(model);

    const char *extra[] = {"--kv.block_tokens", "16", "--decode.prefix_cache_blocks", "256", "--log", "info", NULL};
    cu_cluster_init(&g_c, 1, 2, extra);
    bool ok = cu_cluster_start_nodes(&g_c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool rok = false, rok2 = false;
    /* weight 0.8: a node's load as the router last saw it may still count the previous turn
     * (its status poll came during the request); the cached prefix must outweigh that */
    const char *kv[] = {"--router.kv_routing",
                        "affinity",
                        "--router.status_interval_ms",
                        "50",
                        "--router.kv_affinity_weight",
                        "0.8",
                        NULL};
    cu_proc_t r = ok ? cu_cluster_router(&g_c, 0, kv, 30, &rok) : (cu_proc_t){0};
    const char *dec_only[] = {"--router.decode_only_below",
                              "100000",
                              "--router.kv_routing",
                              "affinity",
                              "--router.status_interval_ms",
                              "50",
                              "--router.kv_affinity_weight",
                              "0.8",
                              NULL};
    cu_proc_t r2 = ok ? cu_cluster_router(&g_c, 1, dec_only, 30, &rok2) : (cu_proc_t){0};
    bool rok3 = false;
    const char *slow_status[] = {"--router.kv_routing", "affinity", "--router.status_interval_ms", "300", NULL};
    cu_proc_t r3 = ok ? cu_cluster_router(&g_c, 2, slow_status, 30, &rok3) : (cu_proc_t){0};
    CHECK_MSG(rok && rok2 && rok3, "routers did not come up");
    g_rport = cu_router_port(&g_c, 0);
    if (ok && rok && rok2 && rok3) {
        next_turn_at_once(vocab, cu_router_port(&g_c, 2));
        scenario(vocab);
        decode_only(vocab);
    }
    if (r.pid > 0) CHECK_INT_EQ(cu_stop(&r, SIGTERM, 10), 0);
    if (r2.pid > 0) CHECK_INT_EQ(cu_stop(&r2, SIGTERM, 10), 0);
    if (r3.pid > 0) CHECK_INT_EQ(cu_stop(&r3, SIGTERM, 10), 0);
    for (int i = 0; i < g_c.np; i++)
        if (g_c.pre[i].pid > 0) CHECK_INT_EQ(cu_stop(&g_c.pre[i], SIGTERM, 10), 0);
    for (int i = 0; i < g_c.nd; i++)
        if (g_c.dec[i].pid > 0) CHECK_INT_EQ(cu_stop(&g_c.dec[i], SIGTERM, 10), 0);
    bool failed = check_failures_ > 0;
    if (failed) {
        cu_log_tail("router0", 30);
        cu_log_tail("decode0", 20);
        cu_log_tail("decode1", 20);
    }
    cu_cleanup(failed);
    return CHECK_DONE();
}
