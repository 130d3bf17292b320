/* Real speed-prefill and speed-decode daemons on loopback, driven over gRPC the way the router
 * drives them: Reserve → Prefill (shallow prefill, KV pushed over UCX shared memory) → Generate.
 * The tokens and logprobs equal `speedctl generate` on the same model and parameters (C = L and
 * C < L), the bytes shipped equal the SPEED formula, cancel frees the blocks, bad requests get
 * clear statuses, and SIGTERM exits cleanly. */
#include <math.h>

#include "alloc.h"
#include "log.h"

#include "cluster_util.h"
#include "model.h"
#include "node_rpc_util.h"
#include "rpc.h"
#include "speed_proto.h"
#include "test_gpu.h"

#define N_GEN    8
#define N_PROMPT 40

static int32_t g_prompt[N_PROMPT];
static char g_prompt_text[512];

/* A channel to a node as `identity` ("router", "admin", "stranger": another CA's certificate;
 * NULL: plaintext; "" : TLS without a client certificate). */
static speed_rpc_channel_t *channel_as(int port, const char *identity) {
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", port);
    speed_rpc_channel_t *ch = NULL;
    speed_rpc_channel_params_t p = speed_rpc_channel_default_params();
    static speed_rpc_tls_t no_cert;
    if (identity && !identity[0]) {
        no_cert.ca = cu_rpc_tls("router")->ca;
        p.tls = &no_cert;
    } else if (identity) {
        p.tls = cu_rpc_tls(identity);
    }
    CHECK_INT_EQ(speed_rpc_channel_create(target, &p, &ch), SPEED_OK);
    return ch;
}

static speed_rpc_channel_t *channel(int port) { return channel_as(port, "router"); }

static Speed__V1__SamplingParams sampling(void) {
    Speed__V1__SamplingParams s = SPEED__V1__SAMPLING_PARAMS__INIT;
    s.max_tokens = N_GEN;
    s.temperature = 0;
    s.top_logprobs = 2;
    s.logprobs = 1;
    s.ignore_eos = 1;
    return s;
}

static void check_against_ref(const nr_gen_t *g, json_t *ref) {
    json_t *toks = json_object_get(ref, "tokens");
    CHECK(toks != NULL);
    CHECK_INT_EQ(g->n, (int)json_array_size(toks));
    for (int i = 0; i < g->n && i < (int)json_array_size(toks); i++) {
        json_t *t = json_array_get(toks, (size_t)i);
        CHECK_INT_EQ(g->ids[i], (int)json_integer_value(json_object_get(t, "id")));
        CHECK_NEAR(g->logprobs[i], json_real_value(json_object_get(t, "logprob")), 1e-4);
    }
}

/* The whole disaggregated path for one depth. */
static void run_depth(speed_rpc_channel_t *pre, speed_rpc_channel_t *dec, const speed_model_config_t *mc, int C,
                      const char *id) {
    char cs[16];
    snprintf(cs, sizeof cs, "%d", C);
    json_t *ref = cu_generate_ref(g_prompt_text, cs, N_GEN);
    CHECK(ref != NULL);
    if (!ref) return;
    size_t want = speed_kv_bytes_for_prompt(mc, C, 1, 1, N_PROMPT, SPEED_DTYPE_BF16);

    Speed__V1__SpeedParams sp = SPEED__V1__SPEED_PARAMS__INIT;
    sp.prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_LAYERS;
    sp.prefill_layers = C;
    Speed__V1__ReserveRequest rr = SPEED__V1__RESERVE_REQUEST__INIT;
    rr.request_id = (char *)id;
    rr.n_prompt = N_PROMPT;
    rr.max_tokens = N_GEN;
    rr.speed = &sp;
    Speed__V1__ReserveReply *res = NULL;
    char err[256];
    CHECK_INT_EQ(nr_call(dec, SPEED_METHOD_DECODE_RESERVE, &rr.base, &speed__v1__reserve_reply__descriptor,
                         (ProtobufCMessage **)&res, err, sizeof err),
                 SPEED_RPC_OK);
    if (!res) return;
    CHECK_INT_EQ(res->kv->total_bytes, want);
    CHECK_INT_EQ(res->kv->prefill_layers, C);

    Speed__V1__SamplingParams smp = sampling();
    Speed__V1__PrefillRequest pr = SPEED__V1__PREFILL_REQUEST__INIT;
    pr.request_id = (char *)id;
    pr.n_prompt_ids = N_PROMPT;
    pr.prompt_ids = g_prompt;
    pr.speed = &sp;
    pr.sampling = &smp;
    pr.kv = res->kv;
    Speed__V1__PrefillReply *pre_reply = NULL;
    int code = nr_call(pre, SPEED_METHOD_PREFILL_PREFILL, &pr.base, &speed__v1__prefill_reply__descriptor,
                       (ProtobufCMessage **)&pre_reply, err, sizeof err);
    CHECK_INT_EQ(code, SPEED_RPC_OK);
    if (code != SPEED_RPC_OK) fprintf(stderr, "Prefill: %s\n", err);
    if (!pre_reply) {
        speed_proto_free(&res->base);
        return;
    }
    CHECK_INT_EQ(pre_reply->kv_bytes_sent, want);

    Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
    gr.request_id = (char *)id;
    gr.first = pre_reply->first;
    gr.sampling = &smp;
    gr.epoch = res->kv->epoch;
    nr_gen_t g;
    CHECK_INT_EQ(nr_generate(dec, &gr, &g), SPEED_RPC_OK);
    check_against_ref(&g, ref);
    CHECK(strcmp(g.finish, "length") == 0);
    CHECK_INT_EQ(g.usage.kv_bytes, want);
    CHECK_INT_EQ(g.usage.kv_full_depth_bytes,
                 speed_kv_bytes_for_prompt(mc, mc->n_layers, 1, 1, N_PROMPT, SPEED_DTYPE_BF16));
    CHECK_INT_EQ(g.usage.completion_tokens, N_GEN);
    CHECK_INT_EQ(g.usage.prompt_tokens, N_PROMPT);

    /* the same request id again: the reservation is gone */
    code = nr_generate(dec, &gr, &g);
    CHECK_INT_EQ(code, SPEED_RPC_NOT_FOUND);
    speed_proto_free(&pre_reply->base);
    speed_proto_free(&res->base);
    json_decref(ref);
}

/* One unary call on a fresh channel as `identity` (channel_as); returns the code. */
static int call_as(int port, const char *identity, const char *method, const ProtobufCMessage *msg, char *err,
                   size_t err_size) {
    speed_rpc_channel_t *ch = channel_as(port, identity);
    int code = nr_call(ch, method, msg, NULL, NULL, err, err_size);
    speed_rpc_channel_destroy(ch);
    return code;
}

/* The control plane's trust boundary, on both nodes: a peer without a certificate of the
 * cluster's CA (plaintext, TLS without a certificate, another CA's "router") reaches no method
 * at all; a peer of the cluster with the wrong role is refused each method it has no business
 * calling (PERMISSION_DENIED); and the nodes keep serving the router afterwards. */
static void test_strangers(int pre_port, int dec_port, int pre_http, int dec_http) {
    char err[256];
    Speed__V1__DrainRequest drain = SPEED__V1__DRAIN_REQUEST__INIT;
    Speed__V1__HealthRequest health = SPEED__V1__HEALTH_REQUEST__INIT;
    Speed__V1__ReserveRequest rr = SPEED__V1__RESERVE_REQUEST__INIT;
    rr.request_id = "stranger";
    rr.n_prompt = N_PROMPT;
    rr.max_tokens = N_GEN;
    Speed__V1__CancelRequest cr = SPEED__V1__CANCEL_REQUEST__INIT;
    cr.request_id = "stranger";
    Speed__V1__SamplingParams smp = sampling();
    Speed__V1__PrefillRequest pr = SPEED__V1__PREFILL_REQUEST__INIT;
    pr.request_id = "stranger";
    pr.n_prompt_ids = N_PROMPT;
    pr.prompt_ids = g_prompt;
    pr.sampling = &smp;
    Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
    gr.request_id = "stranger-gen";
    gr.n_prompt_ids = N_PROMPT;
    gr.prompt_ids = g_prompt;
    gr.sampling = &smp;
    nr_gen_t g;

    const char *strangers[] = {NULL, "", "stranger"};
    for (int s = 0; s < 3; s++) {
        const char *who = strangers[s] ? (strangers[s][0] ? strangers[s] : "no certificate") : "plaintext";
        int ports[2] = {pre_port, dec_port};
        for (int k = 0; k < 2; k++) {
            int code = call_as(ports[k], strangers[s], SPEED_METHOD_NODE_DRAIN, &drain.base, err, sizeof err);
            CHECK_MSG(code == SPEED_RPC_UNAVAILABLE, "%s: Drain on port %d gave %s (%s)", who, ports[k],
                      speed_rpc_code_name(code), err);
            code = call_as(ports[k], strangers[s], SPEED_METHOD_NODE_HEALTH, &health.base, err, sizeof err);
            CHECK_MSG(code == SPEED_RPC_UNAVAILABLE, "%s: Health gave %s", who, speed_rpc_code_name(code));
        }
        int code = call_as(dec_port, strangers[s], SPEED_METHOD_DECODE_RESERVE, &rr.base, err, sizeof err);
        CHECK_MSG(code == SPEED_RPC_UNAVAILABLE, "%s: Reserve gave %s", who, speed_rpc_code_name(code));
        code = call_as(pre_port, strangers[s], SPEED_METHOD_PREFILL_PREFILL, &pr.base, err, sizeof err);
        CHECK_MSG(code == SPEED_RPC_UNAVAILABLE, "%s: Prefill gave %s", who, speed_rpc_code_name(code));
        speed_rpc_channel_t *ch = channel_as(dec_port, strangers[s]);
        code = nr_generate(ch, &gr, &g);
        CHECK_MSG(code == SPEED_RPC_UNAVAILABLE, "%s: Generate gave %s", who, speed_rpc_code_name(code));
        CHECK_INT_EQ(g.n, 0);
        speed_rpc_channel_destroy(ch);
    }

    /* cluster members with the wrong role */
    CHECK_INT_EQ(call_as(dec_port, "admin", SPEED_METHOD_DECODE_RESERVE, &rr.base, err, sizeof err),
                 SPEED_RPC_PERMISSION_DENIED);
    CHECK_CONTAINS(err, "peer 'admin' may not call /speed.v1.Decode/Reserve");
    CHECK_INT_EQ(call_as(dec_port, "prefill-0", SPEED_METHOD_DECODE_CANCEL, &cr.base, err, sizeof err),
                 SPEED_RPC_PERMISSION_DENIED);
    CHECK_INT_EQ(call_as(pre_port, "decode-0", SPEED_METHOD_PREFILL_PREFILL, &pr.base, err, sizeof err),
                 SPEED_RPC_PERMISSION_DENIED);
    CHECK_INT_EQ(call_as(pre_port, "admin", SPEED_METHOD_PREFILL_CANCEL, &cr.base, err, sizeof err),
                 SPEED_RPC_PERMISSION_DENIED);
    CHECK_INT_EQ(call_as(dec_port, "router", SPEED_METHOD_NODE_DRAIN, &drain.base, err, sizeof err),
                 SPEED_RPC_PERMISSION_DENIED);
    CHECK_INT_EQ(call_as(pre_port, "prefill-0", SPEED_METHOD_NODE_DRAIN, &drain.base, err, sizeof err),
                 SPEED_RPC_PERMISSION_DENIED);
    speed_rpc_channel_t *ch = channel_as(dec_port, "admin");
    CHECK_INT_EQ(nr_generate(ch, &gr, &g), SPEED_RPC_PERMISSION_DENIED);
    speed_rpc_channel_destroy(ch);
    /* admin may read health */
    CHECK_INT_EQ(call_as(dec_port, "admin", SPEED_METHOD_NODE_HEALTH, &health.base, err, sizeof err), SPEED_RPC_OK);
    CHECK_INT_EQ(call_as(pre_port, "admin", SPEED_METHOD_NODE_HEALTH, &health.base, err, sizeof err), SPEED_RPC_OK);

    /* nothing was reserved, nothing drained: both nodes still serve the router */
    CHECK_NEAR(cu_metric(dec_http, "speed_kv_blocks_reserved"), 0.0, 0.0);
    CHECK(cu_wait_health(dec_http, 200, 5) && cu_wait_health(pre_http, 200, 5));
    CHECK_INT_EQ(call_as(dec_port, "router", SPEED_METHOD_NODE_HEALTH, &health.base, err, sizeof err), SPEED_RPC_OK);
    CHECK_INT_EQ(call_as(dec_port, "router", SPEED_METHOD_DECODE_RESERVE, &rr.base, err, sizeof err), SPEED_RPC_OK);
    CHECK_INT_EQ(call_as(dec_port, "router", SPEED_METHOD_DECODE_CANCEL, &cr.base, err, sizeof err), SPEED_RPC_OK);
}

/* Startup: a node with no certificate (and tls.insecure false) refuses to start with the way
 * out; with tls.insecure it serves plaintext and warns that the control plane is open. */
static void test_tls_startup(const char *model_dir, int B) {
    char grpc[16], http[16];
    snprintf(grpc, sizeof grpc, "%d", B + 50);
    snprintf(http, sizeof http, "%d", B + 60);
    const char *none[] = {"--model", model_dir, "--decode.grpc_port", grpc, "--decode.http_port", http, "--tls.ca",
                          "",        NULL};
    cu_proc_t d = cu_spawn("speed-decode", "decode-nocert", none);
    CHECK_INT_EQ(cu_wait_exit(&d, 30), 2);
    CHECK_MSG(tu_system("grep -q 'no certificate for the control plane: run .speedctl certs' %s/decode-nocert.log",
                        cu_dir) == 0,
              "decode-nocert.log lacks the way out");
    const char *open_args[] = {"--model", model_dir,        "--decode.grpc_port", grpc, "--decode.http_port",
                               http,      "--tls.insecure", "--decode.threads",   "1",  NULL};
    d = cu_spawn("speed-decode", "decode-insecure", open_args);
    CHECK(cu_wait_up(&d, B + 60, 30));
    char err[256];
    Speed__V1__HealthRequest health = SPEED__V1__HEALTH_REQUEST__INIT;
    CHECK_INT_EQ(call_as(B + 50, NULL, SPEED_METHOD_NODE_HEALTH, &health.base, err, sizeof err), SPEED_RPC_OK);
    CHECK_INT_EQ(call_as(B + 50, "router", SPEED_METHOD_NODE_HEALTH, &health.base, err, sizeof err),
                 SPEED_RPC_UNAVAILABLE);
    CHECK_INT_EQ(cu_stop(&d, SIGTERM, 20), 0);
    CHECK_MSG(tu_system("grep -q ' W net .*control plane is plaintext and unauthenticated' %s/decode-insecure.log",
                        cu_dir) == 0,
              "decode-insecure.log lacks the warning");
}

/* The pool's `backend` key: a cpu-ref node serves; a cuda node on a machine without a GPU exits
 * 1 at startup with the line that says why and what to do (never a crash, nothing leaked: an
 * ASan build would exit 23 and print its report). */
static void test_backend_choice(const char *model_dir, int B) {
    char grpc[16], http[16];
    snprintf(grpc, sizeof grpc, "%d", B + 50);
    snprintf(http, sizeof http, "%d", B + 60);
    const char *ref_args[] = {"--model",
                              model_dir,
                              "--decode.grpc_port",
                              grpc,
                              "--decode.http_port",
                              http,
                              "--decode.backend",
                              "cpu-ref",
                              "--decode.threads",
                              "1",
                              NULL};
    cu_proc_t ref = cu_spawn("speed-decode", "decode-cpu-ref", ref_args);
    CHECK(cu_wait_up(&ref, B + 60, 30));
    CHECK_INT_EQ(cu_stop(&ref, SIGTERM, 20), 0);
    CHECK_INT_EQ(tu_system("grep -q 'decode: backend cpu-ref' %s/decode-cpu-ref.log", cu_dir), 0);

    /* a value after a boolean flag is a stray argument: a usage error (2), not silently dropped */
    const char *stray_args[] = {"--model", model_dir, "--ucx.cuda_direct", "maybe", NULL};
    cu_proc_t stray = cu_spawn("speed-decode", "decode-stray", stray_args);
    CHECK_INT_EQ(cu_wait_exit(&stray, 30), 2);
    CHECK_MSG(tu_system("grep -q \"unexpected argument 'maybe'\" %s/decode-stray.log", cu_dir) == 0,
              "decode-stray.log lacks the stray argument");

    /* ucx.cuda_direct with a UCX that has no CUDA support (Debian's): refused at startup, with
     * the way out (a cpu node too: the transfer context checks UCX, not the backend) */
    if (tu_system("ucx_info -d 2>/dev/null | grep -q cuda_copy") == 0) {
        fprintf(stderr, "note: this UCX has CUDA support; the ucx.cuda_direct refusal is not exercised\n");
    } else {
        const char *direct_args[] = {
            "--model",          model_dir, "--decode.grpc_port", grpc, "--decode.http_port", http,
            "--decode.backend", "cpu-ref", "--decode.threads",   "1",  "--ucx.cuda_direct",  NULL};
        cu_proc_t dd = cu_spawn("speed-decode", "decode-cuda-direct", direct_args);
        CHECK_INT_EQ(cu_wait_exit(&dd, 30), 1);
        CHECK_MSG(tu_system("grep -q 'ucx.cuda_direct needs a UCX built with CUDA.*set ucx.cuda_direct: false' "
                            "%s/decode-cuda-direct.log",
                            cu_dir) == 0,
                  "decode-cuda-direct.log lacks the cuda_direct refusal");
        CHECK(tu_system("grep -q 'Sanitizer\\|ready: grpc' %s/decode-cuda-direct.log", cu_dir) != 0);
    }

    const char *dec_args[] = {
        "--model", model_dir, "--decode.grpc_port", grpc, "--decode.http_port", http, "--decode.backend", "cuda", NULL};
    if (tu_nvidia_gpu_present(NULL, 0)) {
        /* a GPU here: the no-GPU exit cannot be shown, and a cuda node must serve instead
         * (unless SPEED_TEST_CUDA_OPTIONAL=1 says this build has no CUDA on purpose) */
        if (!tu_cuda_required()) {
            fprintf(stderr, "note: a GPU is present and SPEED_TEST_CUDA_OPTIONAL=1: cuda nodes not exercised\n");
            return;
        }
        cu_proc_t gpu = cu_spawn("speed-decode", "decode-cuda", dec_args);
        CHECK_MSG(cu_wait_up(&gpu, atoi(http), 120), "a cuda decode node did not come up on this GPU machine");
        if (!cu_alive(&gpu)) cu_log_tail("decode-cuda", 20);
        CHECK_INT_EQ(cu_stop(&gpu, SIGTERM, 30), 0);
        return;
    }
    cu_proc_t dec = cu_spawn("speed-decode", "decode-cuda", dec_args);
    CHECK_INT_EQ(cu_wait_exit(&dec, 30), 1);
    /* replica 1 of a pool whose first device is 2 takes device 3 */
    const char *pre_args[] = {"--model",
                              model_dir,
                              "--prefill.backend",
                              "cuda",
                              "--prefill.device",
                              "2",
                              "--prefill.replicas",
                              "2",
                              "--node.index",
                              "1",
                              NULL};
    cu_proc_t pre = cu_spawn("speed-prefill", "prefill-cuda", pre_args);
    CHECK_INT_EQ(cu_wait_exit(&pre, 30), 1);
    const char *logs[2][3] = {{"decode-cuda", "decode", "cuda:0"}, {"prefill-cuda", "prefill", "cuda:3"}};
    for (int i = 0; i < 2; i++) {
        const char *log = logs[i][0], *role = logs[i][1], *dev = logs[i][2];
        /* a CUDA build without a device, or a build without CUDA; and the way out */
        CHECK_MSG(tu_system("grep -q '%s: backend %s: .*\\(needs a GPU\\|no CUDA backend\\)' %s/%s.log", role, dev,
                            cu_dir, log) == 0,
                  "%s.log lacks 'backend %s'", log, dev);
        CHECK_MSG(tu_system("grep -q 'use %s.backend: cpu' %s/%s.log", role, cu_dir, log) == 0,
                  "%s.log does not say how to fix it", log);
        CHECK_MSG(tu_system("grep -q 'Sanitizer\\|ready: grpc' %s/%s.log", cu_dir, log) != 0,
                  "%s.log: a sanitizer report or a node that started", log);
    }
}

int main(void) {
    speed_log_configure("error");
    cu_init("nodes");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    const speed_model_config_t *mc = &model->config;
    const int L = mc->n_layers;

    for (int i = 0; i < N_PROMPT; i++) g_prompt[i] = i == 0 ? 1 : 3 + (i * 37) % (mc->vocab_size - 3);
    size_t off = 0;
    for (int i = 0; i < N_PROMPT; i++)
        off += (size_t)snprintf(g_prompt_text + off, sizeof g_prompt_text - off, "%s%d", i ? "," : "", g_prompt[i]);

    const int B = cu_port_base;
    test_backend_choice(model_dir, B);
    test_tls_startup(model_dir, B);
    char p_grpc[16], p_http[16], d_grpc[16], d_http[16], r_port[16];
    snprintf(p_grpc, sizeof p_grpc, "%d", B);
    snprintf(p_http, sizeof p_http, "%d", B + 10);
    snprintf(d_grpc, sizeof d_grpc, "%d", B + 20);
    snprintf(d_http, sizeof d_http, "%d", B + 30);
    snprintf(r_port, sizeof r_port, "%d", B + 40);
    char lease[] = "5000";
    const char *args[] = {"--model",
                          model_dir,
                          "--prefill.grpc_port",
                          p_grpc,
                          "--prefill.http_port",
                          p_http,
                          "--decode.grpc_port",
                          d_grpc,
                          "--decode.http_port",
                          d_http,
                          "--router.port",
                          r_port,
                          "--speed.prefill_layers",
                          "3",
                          "--decode.kv_tokens",
                          "4096",
                          "--prefill.kv_tokens",
                          "2048",
                          "--kv.lease_ms",
                          lease,
                          "--log",
                          "info",
                          NULL};
    cu_proc_t dec = cu_spawn("speed-decode", "decode", args);
    cu_proc_t pre = cu_spawn("speed-prefill", "prefill", args);
    bool up = cu_wait_health(B + 30, 200, 30) && cu_wait_health(B + 10, 200, 30);
    CHECK(up);
    if (!up) {
        cu_stop(&dec, SIGKILL, 5);
        cu_stop(&pre, SIGKILL, 5);
        cu_cleanup(true);
        return CHECK_DONE();
    }
    speed_rpc_channel_t *pc = channel(B), *dc = channel(B + 20);

    /* 1. disaggregated, C = L and C < L */
    run_depth(pc, dc, mc, L, "full-depth");
    run_depth(pc, dc, mc, 3, "speed-3");
    CHECK_NEAR(cu_metric(B + 10, "speed_kv_transfer_bytes_total"),
               (double)(speed_kv_bytes_for_prompt(mc, L, 1, 1, N_PROMPT, SPEED_DTYPE_BF16) +
                        speed_kv_bytes_for_prompt(mc, 3, 1, 1, N_PROMPT, SPEED_DTYPE_BF16)),
               0.5);
    CHECK_NEAR(cu_metric(B + 10, "speed_prefill_tokens_total"), 2.0 * N_PROMPT, 0.5);

    /* 2. decode-only route: the decode node prefills itself at its default depth (3) */
    {
        json_t *ref = cu_generate_ref(g_prompt_text, "3", N_GEN);
        Speed__V1__SamplingParams smp = sampling();
        Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
        gr.request_id = "decode-only";
        gr.n_prompt_ids = N_PROMPT;
        gr.prompt_ids = g_prompt;
        gr.sampling = &smp;
        nr_gen_t g;
        CHECK_INT_EQ(nr_generate(dc, &gr, &g), SPEED_RPC_OK);
        if (ref) check_against_ref(&g, ref);
        CHECK_INT_EQ(g.usage.kv_bytes, 0);
        json_decref(ref);
    }

    /* 3. cancel frees a reservation at once; an unclaimed one is freed at its lease */
    {
        Speed__V1__ReserveRequest rr = SPEED__V1__RESERVE_REQUEST__INIT;
        rr.request_id = "to-cancel";
        rr.n_prompt = N_PROMPT;
        rr.max_tokens = N_GEN;
        Speed__V1__ReserveReply *res = NULL;
        CHECK_INT_EQ(nr_call(dc, SPEED_METHOD_DECODE_RESERVE, &rr.base, &speed__v1__reserve_reply__descriptor,
                             (ProtobufCMessage **)&res, NULL, 0),
                     SPEED_RPC_OK);
        if (res) speed_proto_free(&res->base);
        WAIT_FOR(cu_metric(B + 30, "speed_kv_blocks_reserved") > 0, 5000);
        CHECK(cu_metric(B + 30, "speed_kv_blocks_reserved") > 0);
        Speed__V1__CancelRequest cr = SPEED__V1__CANCEL_REQUEST__INIT;
        cr.request_id = "to-cancel";
        Speed__V1__CancelReply *cre = NULL;
        CHECK_INT_EQ(nr_call(dc, SPEED_METHOD_DECODE_CANCEL, &cr.base, &speed__v1__cancel_reply__descriptor,
                             (ProtobufCMessage **)&cre, NULL, 0),
                     SPEED_RPC_OK);
        CHECK(cre && cre->found);
        if (cre) speed_proto_free(&cre->base);
        /* The cancel fence: a prefill node that learned the descriptor could still be putting
         * into these blocks, and none said it stopped, so they stay out of circulation until
         * the lease ends (5 s here), not a fixed 1 s (the old quarantine). */
        double tc = now_s();
        while (cu_metric(B + 30, "speed_kv_blocks_reserved") > 0 && now_s() - tc < 15) usleep(50000);
        CHECK_NEAR(cu_metric(B + 30, "speed_kv_blocks_reserved"), 0.0, 0.0);
        CHECK_MSG(now_s() - tc > 2.5, "a cancelled reservation's blocks were freed after %.1f s, before its lease",
                  now_s() - tc);

        rr.request_id = "to-expire";
        res = NULL;
        CHECK_INT_EQ(nr_call(dc, SPEED_METHOD_DECODE_RESERVE, &rr.base, &speed__v1__reserve_reply__descriptor,
                             (ProtobufCMessage **)&res, NULL, 0),
                     SPEED_RPC_OK);
        if (res) speed_proto_free(&res->base);
        /* the lease runs from the reservation: measure from here, before polling */
        double t0 = now_s();
        WAIT_FOR(cu_metric(B + 30, "speed_kv_blocks_reserved") > 0, 3000);
        CHECK(cu_metric(B + 30, "speed_kv_blocks_reserved") > 0);
        while (cu_metric(B + 30, "speed_kv_blocks_reserved") > 0 && now_s() - t0 < 10) usleep(100000);
        CHECK_NEAR(cu_metric(B + 30, "speed_kv_blocks_reserved"), 0.0, 0.0);
        CHECK(now_s() - t0 > 3.5); /* not before the 5 s lease */
    }

    /* 4. bad requests: a clear status, the daemons stay up */
    {
        char err[256];
        Speed__V1__ReserveRequest rr = SPEED__V1__RESERVE_REQUEST__INIT;
        rr.request_id = "bad";
        rr.n_prompt = 0;
        rr.max_tokens = 4;
        CHECK_INT_EQ(nr_call(dc, SPEED_METHOD_DECODE_RESERVE, &rr.base, NULL, NULL, err, sizeof err),
                     SPEED_RPC_INVALID_ARGUMENT);
        rr.n_prompt = 1 << 30;
        CHECK(nr_call(dc, SPEED_METHOD_DECODE_RESERVE, &rr.base, NULL, NULL, err, sizeof err) != SPEED_RPC_OK);
        Speed__V1__SpeedParams sp = SPEED__V1__SPEED_PARAMS__INIT;
        sp.prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_LAYERS;
        sp.prefill_layers = L + 1;
        rr.n_prompt = 8;
        rr.speed = &sp;
        CHECK_INT_EQ(nr_call(dc, SPEED_METHOD_DECODE_RESERVE, &rr.base, NULL, NULL, err, sizeof err),
                     SPEED_RPC_INVALID_ARGUMENT);
        CHECK_CONTAINS(err, "prefill_layers");
        /* garbage bytes */
        speed_rpc_reply_t reply = {0};
        speed_rpc_unary(dc, SPEED_METHOD_DECODE_RESERVE, "\xff\xff\xff", 3, 5000, &reply);
        CHECK_INT_EQ(reply.code, SPEED_RPC_INVALID_ARGUMENT);
        speed_rpc_reply_cleanup(&reply);
        speed_rpc_unary(pc, SPEED_METHOD_PREFILL_PREFILL, "\x0a\x05hello\x12", 8, 5000, &reply);
        CHECK_INT_EQ(reply.code, SPEED_RPC_INVALID_ARGUMENT);
        speed_rpc_reply_cleanup(&reply);
        /* a prefill with a descriptor that does not fit this model */
        Speed__V1__KvDescriptor kd = SPEED__V1__KV_DESCRIPTOR__INIT;
        kd.dtype = "bf16";
        kd.transport = "shm";
        kd.prefill_layers = 3;
        kd.anchors = 1;
        kd.tail = 1;
        Speed__V1__SamplingParams smp = sampling();
        Speed__V1__PrefillRequest pr = SPEED__V1__PREFILL_REQUEST__INIT;
        pr.request_id = "bad-desc";
        pr.n_prompt_ids = N_PROMPT;
        pr.prompt_ids = g_prompt;
        pr.sampling = &smp;
        pr.kv = &kd;
        int code = nr_call(pc, SPEED_METHOD_PREFILL_PREFILL, &pr.base, NULL, NULL, err, sizeof err);
        CHECK(code != SPEED_RPC_OK);
        /* Generate for a reservation that never existed */
        Speed__V1__Token first = SPEED__V1__TOKEN__INIT;
        Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
        gr.request_id = "never-reserved";
        gr.first = &first;
        gr.sampling = &smp;
        nr_gen_t g;
        CHECK_INT_EQ(nr_generate(dc, &gr, &g), SPEED_RPC_NOT_FOUND);
        CHECK(cu_wait_health(B + 30, 200, 5) && cu_wait_health(B + 10, 200, 5));
    }

    /* 5. strangers and wrong roles on the control plane */
    test_strangers(B, B + 20, B + 10, B + 30);

    speed_rpc_channel_destroy(pc);
    speed_rpc_channel_destroy(dc);
    /* the operator's admin certificate drains a node: it exits 0 on its own */
    {
        char err[256];
        Speed__V1__DrainRequest drain = SPEED__V1__DRAIN_REQUEST__INIT;
        CHECK_INT_EQ(call_as(B, "admin", SPEED_METHOD_NODE_DRAIN, &drain.base, err, sizeof err), SPEED_RPC_OK);
        CHECK_INT_EQ(cu_wait_exit(&pre, 20), 0);
    }
    CHECK_INT_EQ(cu_stop(&pre, SIGTERM, 20), -1); /* already gone */
    CHECK_INT_EQ(cu_stop(&dec, SIGTERM, 20), 0);
    speed_model_destroy(model);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
