/* The KV plane's trust boundary on a real 1P1D cluster (speed-router, speed-prefill, speed-decode
 * on loopback; docs/security.md#the-kv-plane): a request reads only KV that it wrote.
 *
 *  1. Reserve + Generate sent straight to the decode node, no prefill: refused with a clear error
 *     (before: it decoded over whatever the reused blocks held, the previous user's KV);
 *  2. a Prefill whose descriptor carries a wrong nonce: the decode node refuses the notify, the
 *     Prefill fails, and Generate on the reservation is refused; with the right nonce the same
 *     path works (the control); the Reserve reply carries no rkey (checked writes only);
 *  3. late puts: a prefill slowed past the router's request timeout (the test knob
 *     debug.prefill_layer_delay_ms) is cancelled by the router; as soon as the decode node has
 *     freed the cancelled reservation's blocks, a decode-only request (which takes freed blocks
 *     last-in-first-out) must give exactly the output it gives on an idle cluster. Repeated.
 *     (before: the decode node freed the blocks after a fixed 1 s while the prefill node kept
 *     putting for its whole lease, and the later request's greedy output changed);
 *  4. both nodes restarted with kv.integrity: the control request of scenario 2 gives the same
 *     tokens, its per-layer tags verified;
 *  every scenario ends with no KV block reserved on the decode node.
 *
 * On the code before the KV-plane work (commit 4b38f39, with only the delay knob added to run
 * scenario 3) this test failed: scenario 1 decoded 8 tokens over unwritten KV, scenario 2's
 * Prefill and Generate succeeded with a tampered nonce (there was none), and in scenario 3 the
 * decode-only output diverged from the idle run at token ~810 of 2000 in 3 of 3 rounds. */
#include <math.h>

#include "alloc.h"
#include "log.h"

#include "cluster_util.h"
#include "node_rpc_util.h"

#define N_PROMPT 40 /* >= the router's decode_only_below: disaggregated */
#define N_SHORT  24 /* below it: decode-only */
#define N_GEN    8
#define LONG_GEN 2000
#define ROUNDS   3

static int32_t g_prompt[N_PROMPT], g_short[N_SHORT];
static nr_gen_t g_ok_plain; /* scenario 2's control: the tokens of a plain transfer */
static cu_cluster_t g_c;

static double dec_reserved(void) {
    double v = cu_metric_sum(cu_dec_http(&g_c, 0), "speed_kv_blocks_reserved");
    return isnan(v) ? -1 : v;
}

/* Waits for the decode node to hold no KV block; returns the seconds it took (or -1). */
static double wait_no_blocks(double timeout_s) {
    double t0 = now_s();
    while (dec_reserved() != 0) {
        if (now_s() - t0 > timeout_s) return -1;
        usleep(10000);
    }
    return now_s() - t0;
}

static double metric(bool prefill, const char *name) {
    double v = cu_metric_sum(prefill ? cu_pre_http(&g_c, 0) : cu_dec_http(&g_c, 0), name);
    return isnan(v) ? 0 : v;
}

static Speed__V1__SamplingParams greedy(int max_tokens) {
    Speed__V1__SamplingParams s = SPEED__V1__SAMPLING_PARAMS__INIT;
    s.max_tokens = max_tokens;
    s.temperature = 0;
    s.ignore_eos = 1;
    return s;
}

static Speed__V1__ReserveReply *reserve(speed_rpc_channel_t *dec, const char *id) {
    Speed__V1__ReserveRequest rr = SPEED__V1__RESERVE_REQUEST__INIT;
    rr.request_id = (char *)id;
    rr.n_prompt = N_PROMPT;
    rr.max_tokens = N_GEN;
    Speed__V1__ReserveReply *res = NULL;
    char err[256];
    int code = nr_call(dec, SPEED_METHOD_DECODE_RESERVE, &rr.base, &speed__v1__reserve_reply__descriptor,
                       (ProtobufCMessage **)&res, err, sizeof err);
    CHECK_MSG(code == SPEED_RPC_OK && res && res->kv, "%s: Reserve: %d %s", id, code, err);
    return res;
}

/* Generate on a reservation from a first token; returns the gRPC code, *out what came. */
static int generate_reserved(speed_rpc_channel_t *dec, const char *id, uint64_t epoch, int32_t first, nr_gen_t *out) {
    Speed__V1__Token tok = SPEED__V1__TOKEN__INIT;
    tok.id = first;
    Speed__V1__SamplingParams smp = greedy(N_GEN);
    Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
    gr.request_id = (char *)id;
    gr.first = &tok;
    gr.sampling = &smp;
    gr.epoch = epoch;
    return nr_generate(dec, &gr, out);
}

static void cancel_decode(speed_rpc_channel_t *dec, const char *id) {
    Speed__V1__CancelRequest cr = SPEED__V1__CANCEL_REQUEST__INIT;
    cr.request_id = (char *)id;
    CHECK_INT_EQ(nr_call(dec, SPEED_METHOD_DECODE_CANCEL, &cr.base, NULL, NULL, NULL, 0), SPEED_RPC_OK);
}

/* Prefill with the given descriptor; returns the gRPC code and the first token (-1 if none). */
static int prefill(speed_rpc_channel_t *pre, const char *id, Speed__V1__KvDescriptor *kv, int32_t *first_p, char *err,
                   size_t err_size) {
    Speed__V1__SamplingParams smp = greedy(N_GEN);
    Speed__V1__PrefillRequest pq = SPEED__V1__PREFILL_REQUEST__INIT;
    pq.request_id = (char *)id;
    pq.n_prompt_ids = N_PROMPT;
    pq.prompt_ids = g_prompt;
    pq.sampling = &smp;
    pq.kv = kv;
    Speed__V1__PrefillReply *rep = NULL;
    int code = nr_call(pre, SPEED_METHOD_PREFILL_PREFILL, &pq.base, &speed__v1__prefill_reply__descriptor,
                       (ProtobufCMessage **)&rep, err, err_size);
    *first_p = rep && rep->first ? rep->first->id : -1;
    if (rep) speed_proto_free(&rep->base);
    return code;
}

/* 1. Reserve + Generate with no prefill */
static void no_prefill(speed_rpc_channel_t *dec) {
    Speed__V1__ReserveReply *res = reserve(dec, "np-1");
    if (!res) return;
    nr_gen_t g;
    int code = generate_reserved(dec, "np-1", res->kv->epoch, 5, &g);
    CHECK_MSG(code != SPEED_RPC_OK, "Generate without a prefill was accepted: %d tokens decoded over unwritten KV",
              g.n);
    CHECK_INT_EQ(g.n, 0);
    CHECK_MSG(strstr(g.error, "not ready") != NULL, "the refusal says why: \"%s\"", g.error);
    speed_proto_free(&res->base);
    cancel_decode(dec, "np-1");
}

/* 2. a wrong nonce, then the right one */
static void wrong_nonce(speed_rpc_channel_t *pre, speed_rpc_channel_t *dec) {
    double failures0 = metric(true, "speed_kv_transfer_failures_total");
    double refused0 = metric(false, "speed_kv_notifies_refused");
    Speed__V1__ReserveReply *res = reserve(dec, "wn-1");
    if (!res) return;
    CHECK_INT_EQ(res->kv->nonce.len, 16);
    /* no rkey in the reply: the pools are reachable only through the checked writes */
    for (size_t i = 0; i < res->kv->n_regions; i++)
        CHECK_MSG(res->kv->regions[i]->rkey.len == 0, "region %zu: an rkey of %zu bytes left the decode node", i,
                  res->kv->regions[i]->rkey.len);
    if (res->kv->nonce.len == 16) res->kv->nonce.data[7] ^= 0x10;
    int32_t first = -1;
    char err[256] = "";
    int code = prefill(pre, "wn-1", res->kv, &first, err, sizeof err);
    CHECK_MSG(code != SPEED_RPC_OK, "a Prefill with a wrong nonce succeeded (first token %d)", first);
    double failures = metric(true, "speed_kv_transfer_failures_total");
    CHECK_MSG(failures == failures0 + 1, "transfer failures %.0f -> %.0f: the notify was not refused", failures0,
              failures);
    CHECK_NEAR(metric(false, "speed_kv_notifies_refused"), refused0 + 1, 0.0);
    nr_gen_t g;
    code = generate_reserved(dec, "wn-1", res->kv->epoch, first >= 0 ? first : 5, &g);
    CHECK_MSG(code != SPEED_RPC_OK && g.n == 0, "Generate after a wrong-nonce notify: code %d, %d tokens", code, g.n);
    speed_proto_free(&res->base);
    cancel_decode(dec, "wn-1");

    /* the control: the same path with the nonce as the decode node issued it */
    res = reserve(dec, "ok-1");
    if (!res) return;
    code = prefill(pre, "ok-1", res->kv, &first, err, sizeof err);
    CHECK_MSG(code == SPEED_RPC_OK && first >= 0, "Prefill with the right nonce: %d %s", code, err);
    code = generate_reserved(dec, "ok-1", res->kv->epoch, first, &g_ok_plain);
    CHECK_MSG(code == SPEED_RPC_OK && g_ok_plain.n == N_GEN, "Generate after the right notify: code %d, %d tokens (%s)",
              code, g_ok_plain.n, g_ok_plain.error);
    speed_proto_free(&res->base);
}

/* 4. integrity mode end to end: the same request gives the same tokens, with tags verified */
static void integrity(speed_rpc_channel_t *pre, speed_rpc_channel_t *dec) {
    Speed__V1__ReserveReply *res = reserve(dec, "int-1");
    if (!res) return;
    CHECK(res->kv->integrity && res->kv->nonce.len == 16);
    int32_t first = -1;
    char err[256] = "";
    int code = prefill(pre, "int-1", res->kv, &first, err, sizeof err);
    CHECK_MSG(code == SPEED_RPC_OK && first >= 0, "Prefill in integrity mode: %d %s", code, err);
    nr_gen_t g;
    code = generate_reserved(dec, "int-1", res->kv->epoch, first, &g);
    CHECK_MSG(code == SPEED_RPC_OK && g.n == N_GEN, "Generate in integrity mode: code %d, %d tokens (%s)", code, g.n,
              g.error);
    CHECK_INT_EQ(g.n, g_ok_plain.n);
    for (int i = 0; i < g.n && i < g_ok_plain.n; i++) CHECK_INT_EQ(g.ids[i], g_ok_plain.ids[i]);
    CHECK_NEAR(metric(false, "speed_kv_integrity_failures"), 0.0, 0.0);
    speed_proto_free(&res->base);
}

/* A decode-only request (the decode node prefills the prompt itself: what the router sends for
 * a short prompt), greedy and past EOS so that it runs long enough to overlap late puts. */
static int decode_only(speed_rpc_channel_t *dec, const char *id, nr_gen_t *out) {
    Speed__V1__SamplingParams smp = greedy(LONG_GEN);
    Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
    gr.request_id = (char *)id;
    gr.prompt_ids = g_short;
    gr.n_prompt_ids = N_SHORT;
    gr.sampling = &smp;
    return nr_generate(dec, &gr, out);
}

/* 3. a cancelled prefill's late puts never reach the next request's blocks */
static void late_puts(int rport, speed_rpc_channel_t *dec) {
    static nr_gen_t ref, got;
    double aborts_pre0 = metric(true, "speed_kv_aborts"), aborts_dec0 = metric(false, "speed_kv_aborts");
    double t0 = now_s();
    CHECK_INT_EQ(decode_only(dec, "idle-ref", &ref), SPEED_RPC_OK);
    CHECK_INT_EQ(ref.n, LONG_GEN);
    fprintf(stderr, "idle decode-only reference: %d tokens in %.2f s\n", ref.n, now_s() - t0);
    char *csv = speed_malloc(N_PROMPT * 8 + 1);
    size_t off = 0;
    for (int i = 0; i < N_PROMPT; i++) off += (size_t)sprintf(csv + off, "%s%d", i ? "," : "", g_prompt[i]);
    char body[1024];
    snprintf(body, sizeof body, "{\"model\":\"model\",\"prompt\":[%s],\"max_tokens\":%d,\"temperature\":0}", csv,
             N_GEN);
    speed_free(csv);
    for (int round = 0; round < ROUNDS; round++) {
        /* the slow prefill: the router gives up after request_timeout_ms */
        cu_resp_t r;
        t0 = now_s();
        cu_http(rport, "POST", "/v1/completions", body, NULL, NULL, 60000, &r);
        CHECK_MSG(r.status == 504 || r.status == 408 || r.status == 503,
                  "round %d: the slow request got HTTP %d, want a timeout", round, r.status);
        cu_resp_free(&r);
        /* The moment the decode node hands the cancelled reservation's blocks out again: the
         * next request takes them (freed blocks are reused last-in-first-out). */
        double t = wait_no_blocks(30);
        CHECK_MSG(t >= 0, "round %d: the cancelled reservation was never freed", round);
        double t_free = now_s() - t0;
        /* The fence lifts on the prefill node's abort, sent when it stopped before its next
         * layer (250 ms apart): well before the 4 s its prompt takes and the 10 s lease. */
        CHECK_MSG(t_free < 2.5,
                  "round %d: the blocks were freed %.2f s after the request: the prefill node did not stop "
                  "at its next layer, or its abort did not lift the fence",
                  round, t_free);
        char id[32];
        snprintf(id, sizeof id, "after-%d", round);
        CHECK_INT_EQ(decode_only(dec, id, &got), SPEED_RPC_OK);
        int diverge = -1;
        for (int i = 0; i < ref.n && diverge < 0; i++)
            if (i >= got.n || got.ids[i] != ref.ids[i]) diverge = i;
        fprintf(stderr, "round %d: blocks free %.2f s after the request, next request done at %.2f s, %s\n", round,
                t_free, now_s() - t0, diverge < 0 ? "same output" : "DIFFERENT output");
        CHECK_MSG(diverge < 0,
                  "round %d: the decode-only output differs from the idle run from token %d on: a cancelled "
                  "prefill's late puts landed in its blocks",
                  round, diverge);
        CHECK_MSG(wait_no_blocks(30) >= 0, "round %d: blocks still reserved", round);
    }
    /* each cancelled prefill stopped and told the decode node so: one abort sent and accepted a round */
    CHECK_NEAR(metric(true, "speed_kv_aborts") - aborts_pre0, (double)ROUNDS, 0.0);
    CHECK_NEAR(metric(false, "speed_kv_aborts") - aborts_dec0, (double)ROUNDS, 0.0);
    CHECK_NEAR(metric(false, "speed_kv_notifies_refused"), 1.0, 0.0); /* only scenario 2's */
}

int main(void) {
    cu_init_model("kv-plane", "--layers 16"); /* many layers: a slow prefill puts often */
    for (int i = 0; i < N_PROMPT; i++) g_prompt[i] = i == 0 ? 1 : 3 + (i * 37) % 200;
    for (int i = 0; i < N_SHORT; i++) g_short[i] = i == 0 ? 1 : 3 + (i * 53) % 200;
    const char *extra[] = {"--kv.lease_ms", "10000", "--router.decode_only_below", "32", "--log", "info", NULL};
    cu_cluster_init(&g_c, 1, 1, extra);
    bool ok = cu_cluster_start_nodes(&g_c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    if (!ok) {
        cu_log_tail("decode0", 30);
        cu_log_tail("prefill0", 30);
        cu_cleanup(true);
        return CHECK_DONE();
    }
    speed_rpc_channel_t *pre = nr_channel(cu_pre_grpc(&g_c, 0), cu_rpc_tls("router")),
                        *dec = nr_channel(cu_dec_grpc(&g_c, 0), cu_rpc_tls("router"));

    no_prefill(dec);
    wrong_nonce(pre, dec);
    /* the cancelled reservations nobody wrote stay fenced until their lease (10 s) */
    CHECK_MSG(wait_no_blocks(20) >= 0, "reservations of scenarios 1-2 never freed: %.0f blocks", dec_reserved());

    /* 3: the prefill node again, slowed to 250 ms per layer (4 s a prompt); the router gives up
     * after 1 s */
    CHECK_INT_EQ(cu_stop(&g_c.pre[0], SIGTERM, 30), 0);
    const char *slow[] = {"--node.index", "0", "--debug.prefill_layer_delay_ms", "250", NULL};
    g_c.pre[0] = cu_cluster_spawn(&g_c, "speed-prefill", "prefill0-slow", slow);
    CHECK(cu_wait_up(&g_c.pre[0], cu_pre_http(&g_c, 0), 60));
    const char *rmore[] = {"--router.request_timeout_ms", "1000", NULL};
    bool r_ok = false;
    cu_proc_t router = cu_cluster_router(&g_c, 0, rmore, 60, &r_ok);
    CHECK_MSG(r_ok, "router did not come up");
    if (r_ok) late_puts(cu_router_port(&g_c, 0), dec);
    CHECK_MSG(wait_no_blocks(20) >= 0, "blocks still reserved at the end: %.0f", dec_reserved());

    CHECK_INT_EQ(cu_stop(&router, SIGTERM, 30), 0);

    /* 4: both nodes again with kv.integrity on */
    speed_rpc_channel_destroy(pre);
    speed_rpc_channel_destroy(dec);
    CHECK_INT_EQ(cu_stop(&g_c.pre[0], SIGTERM, 30), 0);
    CHECK_INT_EQ(cu_stop(&g_c.dec[0], SIGTERM, 30), 0);
    const char *dmore[] = {"--node.index", "0", "--kv.integrity", NULL};
    g_c.dec[0] = cu_cluster_spawn(&g_c, "speed-decode", "decode0-int", dmore);
    const char *pmore[] = {"--node.index", "0", NULL};
    g_c.pre[0] = cu_cluster_spawn(&g_c, "speed-prefill", "prefill0-int", pmore);
    CHECK(cu_wait_up(&g_c.dec[0], cu_dec_http(&g_c, 0), 60) && cu_wait_up(&g_c.pre[0], cu_pre_http(&g_c, 0), 60));
    pre = nr_channel(cu_pre_grpc(&g_c, 0), cu_rpc_tls("router"));
    dec = nr_channel(cu_dec_grpc(&g_c, 0), cu_rpc_tls("router"));
    integrity(pre, dec);
    CHECK_MSG(wait_no_blocks(20) >= 0, "integrity: blocks still reserved: %.0f", dec_reserved());
    speed_rpc_channel_destroy(pre);
    speed_rpc_channel_destroy(dec);
    CHECK_INT_EQ(cu_stop(&g_c.pre[0], SIGTERM, 30), 0);
    CHECK_INT_EQ(cu_stop(&g_c.dec[0], SIGTERM, 30), 0);
    if (check_failures_) {
        cu_log_tail("decode0", 40);
        cu_log_tail("prefill0-slow", 40);
        cu_log_tail("decode0-int", 20);
    }
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
