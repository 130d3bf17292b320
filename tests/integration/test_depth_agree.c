/* One value, three doors: the same `prefill_layers` sent through the router's OpenAI API, a
 * decode node's gRPC Reserve and `speedctl generate` gets the same answer from all three — the
 * same C, or a refusal carrying the same reason — and that answer is speed_depth_resolve's
 * (engine/depth). Before the depth module, the router clamped 6 of 5 layers to 5 where the node
 * refused it, and a fraction travelled as a float the node could round to another layer. */
#include <math.h>

#include "alloc.h"
#include "file.h"
#include "log.h"

#include "cluster_util.h"
#include "depth.h"
#include "model.h"
#include "rpc.h"
#include "speed_proto.h"

#define N_LAYERS 5
#define N_PROMPT 24

/* Counts, fractions, in and out of range; fractions whose f * L sits on a half (0.3, 0.5, 0.7,
 * 0.9 of 5) are where float and double rounding used to part. */
static const char *const g_values[] = {"1",   "3",   "5",   "0",   "-1",  "6",   "2147483647", "0.5", "0.3",
                                       "0.7", "0.9", "1.0", "0.1", "0.0", "1.5", "-0.5",       NULL};

static int32_t g_prompt[N_PROMPT];
static char g_prompt_csv[256];
static const speed_model_config_t *g_mc;

/* An answer: C in 1..L, or -1 and the text of the refusal. */
typedef struct {
    int c;
    char text[512];
} answer_t;

static bool is_fraction(const char *v) { return strchr(v, '.') != NULL; }

/* The C whose prompt KV is `bytes` (the router reports the bytes it shipped), or -1. */
static int c_of_kv_bytes(int64_t bytes, int64_t n_prompt) {
    for (int c = 1; c <= g_mc->n_layers; c++)
        if ((int64_t)speed_kv_bytes_for_prompt(g_mc, c, 1, 1, n_prompt, SPEED_DTYPE_BF16) == bytes) return c;
    return -1;
}

static answer_t via_router(int port, const char *v) {
    answer_t a = {-1, ""};
    char body[1024];
    snprintf(body, sizeof body,
             "{\"model\":\"model\",\"prompt\":[%s],\"max_tokens\":1,\"temperature\":0,"
             "\"speed\":{\"prefill_layers\":%s}}",
             g_prompt_csv, v);
    cu_resp_t r;
    if (!cu_post(port, "/v1/completions", body, &r)) {
        snprintf(a.text, sizeof a.text, "no answer from the router");
        return a;
    }
    if (r.status == 200) {
        json_t *u = json_object_get(r.json, "usage");
        a.c = c_of_kv_bytes(json_integer_value(json_object_get(u, "kv_bytes")),
                            json_integer_value(json_object_get(u, "prompt_tokens")));
    } else {
        json_t *e = json_object_get(r.json, "error");
        snprintf(a.text, sizeof a.text, "%d %s", r.status, json_string_value(json_object_get(e, "message")));
    }
    cu_resp_free(&r);
    return a;
}

static answer_t via_node(speed_rpc_channel_t *dec, const char *v, int i) {
    answer_t a = {-1, ""};
    Speed__V1__SpeedParams sp = SPEED__V1__SPEED_PARAMS__INIT;
    if (is_fraction(v)) {
        sp.prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_FRACTION;
        sp.prefill_fraction = strtod(v, NULL);
    } else {
        sp.prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_LAYERS;
        sp.prefill_layers = (int32_t)strtol(v, NULL, 10);
    }
    char id[32];
    snprintf(id, sizeof id, "agree-%d", i);
    Speed__V1__ReserveRequest rr = SPEED__V1__RESERVE_REQUEST__INIT;
    rr.request_id = id;
    rr.n_prompt = N_PROMPT;
    rr.max_tokens = 1;
    rr.speed = &sp;
    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_proto_pack(&rr.base, &buf, &len), SPEED_OK);
    speed_rpc_reply_t reply = {0};
    speed_rpc_unary(dec, SPEED_METHOD_DECODE_RESERVE, buf, len, 30000, &reply);
    speed_free(buf);
    if (reply.code == SPEED_RPC_OK) {
        Speed__V1__ReserveReply *res = NULL;
        if (speed_proto_unpack(&speed__v1__reserve_reply__descriptor, reply.data, reply.len,
                               (ProtobufCMessage **)&res) == SPEED_OK &&
            res && res->kv)
            a.c = res->kv->prefill_layers;
        if (res) speed_proto_free(&res->base);
        /* give the blocks back */
        Speed__V1__CancelRequest cr = SPEED__V1__CANCEL_REQUEST__INIT;
        cr.request_id = id;
        CHECK_INT_EQ(speed_proto_pack(&cr.base, &buf, &len), SPEED_OK);
        speed_rpc_reply_t cancel = {0};
        speed_rpc_unary(dec, SPEED_METHOD_DECODE_CANCEL, buf, len, 30000, &cancel);
        speed_free(buf);
        speed_rpc_reply_cleanup(&cancel);
    } else {
        snprintf(a.text, sizeof a.text, "%d %s", reply.code, reply.message ? reply.message : "");
    }
    speed_rpc_reply_cleanup(&reply);
    return a;
}

static answer_t via_speedctl(const char *v) {
    answer_t a = {-1, ""};
    char out[1024], err[1024];
    snprintf(out, sizeof out, "%s/speedctl-%s.json", cu_dir, v);
    snprintf(err, sizeof err, "%s/speedctl-%s.err", cu_dir, v);
    /* --prefill-layers=V: a value may start with '-' */
    int rc = tu_system("%s/speedctl generate --model %s/model --prompt-ids %s --prefill-layers=%s --max-tokens 1 "
                       "--threads 1 --json > %s 2> %s",
                       cu_bin, cu_dir, g_prompt_csv, v, out, err);
    if (rc == 0) {
        json_error_t je;
        json_t *j = json_load_file(out, 0, &je);
        a.c = (int)json_integer_value(json_object_get(json_object_get(j, "speed"), "prefill_layers"));
        json_decref(j);
    } else {
        char *text = NULL;
        size_t n = 0;
        if (speed_file_read(err, 1 << 16, SPEED_SUBSYS_CORE, 0, &text, &n) == SPEED_OK) {
            snprintf(a.text, sizeof a.text, "exit %d %s", rc, text);
            speed_free(text);
        }
    }
    return a;
}

int main(void) {
    speed_log_configure("error");
    char opts[64];
    snprintf(opts, sizeof opts, "--layers %d", N_LAYERS);
    cu_init_model("depth-agree", opts);
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    if (!model) return CHECK_DONE();
    g_mc = &model->config;
    CHECK_INT_EQ(g_mc->n_layers, N_LAYERS);
    size_t off = 0;
    for (int i = 0; i < N_PROMPT; i++) {
        g_prompt[i] = i == 0 ? 1 : 3 + (i * 29) % (g_mc->vocab_size - 3);
        off += (size_t)snprintf(g_prompt_csv + off, sizeof g_prompt_csv - off, "%s%d", i ? "," : "", g_prompt[i]);
    }

    /* a short lease: the reservations this test cancels without a prefill stay behind the
     * cancel fence until it ends */
    const char *extra[] = {"--speed.allow_request_override",
                           "--router.decode_only_below",
                           "0",
                           "--log",
                           "info",
                           "--kv.lease_ms",
                           "8000",
                           NULL};
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, extra);
    bool ok = cu_cluster_start_nodes(&c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool ok_r = false;
    cu_proc_t r = ok ? cu_cluster_router(&c, 0, NULL, 30, &ok_r) : (cu_proc_t){0};
    CHECK_MSG(ok_r, "router did not come up");
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", cu_dec_grpc(&c, 0));
    speed_rpc_channel_t *dec = NULL;
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.tls = cu_rpc_tls("router");
    CHECK_INT_EQ(speed_rpc_channel_create(target, &cp, &dec), SPEED_OK);

    int n_accepted = 0, n_refused = 0;
    for (int i = 0; ok && ok_r && dec && g_values[i]; i++) {
        const char *v = g_values[i];
        /* what the one resolution says, in this process */
        char why[256] = "";
        speed_depth_request_t q = {0};
        speed_depth_t d = {0, 0, 0};
        bool want_ok = speed_cutoff_parse(v, &q.prefill_layers, why, sizeof why) == SPEED_OK &&
                       speed_depth_resolve(&q, NULL, N_LAYERS, &d, why, sizeof why) == SPEED_OK;
        answer_t ar = via_router(cu_router_port(&c, 0), v);
        answer_t an = via_node(dec, v, i);
        answer_t as = via_speedctl(v);
        if (want_ok) {
            n_accepted++;
            CHECK_MSG(ar.c == d.prefill_layers && an.c == d.prefill_layers && as.c == d.prefill_layers,
                      "%s: C = %d; router %d (%s), node %d (%s), speedctl %d (%s)", v, d.prefill_layers, ar.c, ar.text,
                      an.c, an.text, as.c, as.text);
        } else {
            n_refused++;
            CHECK_MSG(ar.c < 0 && strstr(ar.text, "400 ") == ar.text && strstr(ar.text, why),
                      "%s: router: \"%s\", want a 400 saying \"%s\"", v, ar.text, why);
            char code[16];
            snprintf(code, sizeof code, "%d ", SPEED_RPC_INVALID_ARGUMENT);
            CHECK_MSG(an.c < 0 && strstr(an.text, code) == an.text && strstr(an.text, why),
                      "%s: node: \"%s\", want INVALID_ARGUMENT saying \"%s\"", v, an.text, why);
            CHECK_MSG(as.c < 0 && strstr(as.text, "exit 2 ") == as.text && strstr(as.text, why),
                      "%s: speedctl: \"%s\", want exit 2 saying \"%s\"", v, as.text, why);
        }
    }
    /* both kinds of answer were exercised */
    CHECK(n_accepted >= 8 && n_refused >= 6);
    /* every reservation was given back */
    double t0 = now_s(), held;
    while ((held = cu_metric_sum(cu_dec_http(&c, 0), "speed_kv_blocks_reserved")) != 0 && now_s() - t0 < 20)
        usleep(20000);
    CHECK_MSG(held == 0, "%.0f decode blocks still reserved", held);

    speed_rpc_channel_destroy(dec);
    CHECK_INT_EQ(cu_stop(&r, SIGTERM, 30), 0);
    CHECK_INT_EQ(cu_stop(&c.pre[0], SIGTERM, 30), 0);
    CHECK_INT_EQ(cu_stop(&c.dec[0], SIGTERM, 30), 0);
    speed_model_destroy(model);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
