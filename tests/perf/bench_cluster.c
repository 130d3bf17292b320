/* Cluster benchmark: a real 1P1D cluster (speed-prefill, speed-decode, speed-router) on loopback.
 *
 *   1. Router-added latency: a 1-token request (16-token prompt) through the router's HTTP API
 *      vs the same request driven straight over gRPC (Reserve → Prefill → Generate), medians of
 *      N interleaved pairs; the difference is what the router adds.
 *   2. TTFT through the cluster at C = L vs C = 0.75 L on a long prompt (default 2048 tokens),
 *      streamed, measured at the client: pairs interleaved, median of the per-pair ratios, and
 *      the KV bytes each ships (usage) against full depth.
 *
 *   bench_cluster [--model DIR | --shape "make-tiny-model options"] [--prompt-tokens N] [--repeat N] [--pairs N]
 *
 * Default model: a random-weight 24-layer, hidden-768 bf16 Llama (~175 M parameters) written
 * into a scratch dir (--shape changes it; --model uses an existing one). ctest runs it
 * with label perf only when SPEED_TEST_PERF=1 (it takes a few minutes). */
#include <math.h>
#include <pthread.h>

#include "cluster_util.h"
#include "log.h"
#include "model.h"
#include "rpc.h"
#include "speed_proto.h"
#include "test_stats.h"

static char *ids_json(const int32_t *ids, int n) {
    size_t cap = (size_t)n * 8 + 16, off = 0;
    char *s = malloc(cap);
    off += (size_t)snprintf(s + off, cap - off, "[");
    for (int i = 0; i < n; i++) off += (size_t)snprintf(s + off, cap - off, "%s%d", i ? "," : "", ids[i]);
    snprintf(s + off, cap - off, "]");
    return s;
}

/* POST /v1/completions; stream: returns the time to the first content event; else the total. */
static double router_request(int port, const char *model, const char *prompt_json, const char *speed, int max_tokens,
                             bool stream, uint64_t *kv_bytes, uint64_t *kv_full) {
    size_t cap = strlen(prompt_json) + 512;
    char *body = malloc(cap);
    snprintf(body, cap,
             "{\"model\":\"%s\",\"prompt\":%s,\"max_tokens\":%d,\"temperature\":0,\"stream\":%s,"
             "\"stream_options\":{\"include_usage\":true}%s%s}",
             model, prompt_json, max_tokens, stream ? "true" : "false", speed ? ",\"speed\":" : "", speed ? speed : "");
    if (!stream) {
        char *p = strstr(body, ",\"stream_options\"");
        if (p) memmove(p, strstr(p, "}") + 1, strlen(strstr(p, "}") + 1) + 1);
    }
    speed_http_client_t *c = NULL;
    double t0 = now_s(), t = -1;
    if (speed_http_client_connect("127.0.0.1", (uint16_t)port, 120000, &c) != SPEED_OK) goto out;
    speed_http_header_t h[] = {{"Content-Type", "application/json"}};
    const speed_http_response_t *resp = NULL;
    if (!stream) {
        if (speed_http_client_request(c, "POST", "/v1/completions", h, 1, body, strlen(body), &resp) == SPEED_OK &&
            resp->status == 200)
            t = now_s() - t0;
        if (resp && resp->body && kv_bytes) {
            json_error_t e;
            json_t *j = json_loads(resp->body, 0, &e);
            json_t *u = j ? json_object_get(j, "usage") : NULL;
            if (u) {
                *kv_bytes = (uint64_t)json_integer_value(json_object_get(u, "kv_bytes"));
                *kv_full = (uint64_t)json_integer_value(json_object_get(u, "kv_full_depth_bytes"));
            }
            json_decref(j);
        }
        goto out;
    }
    if (speed_http_client_request_begin(c, "POST", "/v1/completions", h, 1, body, strlen(body), &resp) != SPEED_OK ||
        resp->status != 200)
        goto out;
    for (;;) {
        const speed_http_sse_event_t *ev = NULL;
        if (speed_http_client_next_event(c, &ev) != SPEED_OK || !ev) break;
        if (strcmp(ev->data, "[DONE]") == 0) break;
        json_error_t e;
        json_t *j = json_loads(ev->data, 0, &e);
        if (!j) continue;
        json_t *ch = json_object_get(j, "choices");
        if (t < 0 && json_array_size(ch) > 0) {
            json_t *text = json_object_get(json_array_get(ch, 0), "text");
            if (text && json_string_length(text) > 0)
                t = now_s() - t0;
            else if (text && t < 0)
                t = now_s() - t0; /* a token whose text is held back still counts */
        }
        json_t *u = json_object_get(j, "usage");
        if (u && json_is_object(u) && kv_bytes) {
            *kv_bytes = (uint64_t)json_integer_value(json_object_get(u, "kv_bytes"));
            *kv_full = (uint64_t)json_integer_value(json_object_get(u, "kv_full_depth_bytes"));
        }
        json_decref(j);
    }
out:
    speed_http_client_destroy(c);
    free(body);
    return t;
}

/* The same 1-token request over gRPC, straight to the nodes. */
static double direct_request(speed_rpc_channel_t *pc, speed_rpc_channel_t *dc, const int32_t *ids, int n, int k) {
    char id[64];
    snprintf(id, sizeof id, "direct-%d", k);
    double t0 = now_s();
    Speed__V1__ReserveRequest rr = SPEED__V1__RESERVE_REQUEST__INIT;
    rr.request_id = id;
    rr.n_prompt = n;
    rr.max_tokens = 1;
    uint8_t *buf;
    size_t len;
    speed_proto_pack(&rr.base, &buf, &len);
    speed_rpc_reply_t rep = {0};
    speed_rpc_unary(dc, SPEED_METHOD_DECODE_RESERVE, buf, len, 60000, &rep);
    speed_free(buf);
    Speed__V1__ReserveReply *res = NULL;
    if (rep.code != SPEED_RPC_OK || speed_proto_unpack(&speed__v1__reserve_reply__descriptor, rep.data, rep.len,
                                                       (ProtobufCMessage **)&res) != SPEED_OK) {
        speed_rpc_reply_cleanup(&rep);
        return -1;
    }
    speed_rpc_reply_cleanup(&rep);
    Speed__V1__SamplingParams sp = SPEED__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 1;
    Speed__V1__PrefillRequest pr = SPEED__V1__PREFILL_REQUEST__INIT;
    pr.request_id = id;
    pr.n_prompt_ids = (size_t)n;
    pr.prompt_ids = (int32_t *)ids;
    pr.sampling = &sp;
    pr.kv = res->kv;
    speed_proto_pack(&pr.base, &buf, &len);
    speed_rpc_unary(pc, SPEED_METHOD_PREFILL_PREFILL, buf, len, 60000, &rep);
    speed_free(buf);
    Speed__V1__PrefillReply *pre = NULL;
    double t = -1;
    if (rep.code == SPEED_RPC_OK && speed_proto_unpack(&speed__v1__prefill_reply__descriptor, rep.data, rep.len,
                                                       (ProtobufCMessage **)&pre) == SPEED_OK) {
        Speed__V1__GenerateRequest gr = SPEED__V1__GENERATE_REQUEST__INIT;
        gr.request_id = id;
        gr.first = pre->first;
        gr.sampling = &sp;
        gr.epoch = res->kv->epoch;
        speed_proto_pack(&gr.base, &buf, &len);
        speed_rpc_stream_t *s = NULL;
        if (speed_rpc_stream_open(dc, SPEED_METHOD_DECODE_GENERATE, buf, len, 60000, &s) == SPEED_OK) {
            for (;;) {
                uint8_t *d = NULL;
                size_t dl = 0;
                speed_rpc_next_t r = speed_rpc_stream_next(s, 60000, &d, &dl);
                speed_free(d);
                if (r != SPEED_RPC_NEXT_MESSAGE) break;
            }
            if (speed_rpc_stream_status(s, NULL) == SPEED_RPC_OK) t = now_s() - t0;
            speed_rpc_stream_close(s);
        }
        speed_free(buf);
        speed_proto_free(&pre->base);
    }
    speed_rpc_reply_cleanup(&rep);
    speed_proto_free(&res->base);
    return t;
}

int main(int argc, char **argv) {
    const char *model_arg = NULL;
    const char *shape = "--layers 24 --hidden 768 --heads 12 --kv-heads 4 --ffn 2048 --max-position 8192 --dtype bf16";
    int n_prompt = 2048, repeat = 3, pairs = 40;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--model") == 0)
            model_arg = argv[i + 1];
        else if (strcmp(argv[i], "--shape") == 0)
            shape = argv[i + 1];
        else if (strcmp(argv[i], "--prompt-tokens") == 0)
            n_prompt = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--repeat") == 0)
            repeat = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--pairs") == 0)
            pairs = atoi(argv[i + 1]);
        else {
            fprintf(stderr,
                    "usage: %s [--model DIR | --shape 'make-tiny-model options'] [--prompt-tokens N] [--repeat N] "
                    "[--pairs N]\n",
                    argv[0]);
            return 2;
        }
    }
    if (argc == 1 && getenv("SPEED_TEST_PERF") == NULL && getenv("SPEEDCTL")) {
        fprintf(stderr, "SKIP: cluster benchmark runs only with SPEED_TEST_PERF=1 (minutes)\n");
        return 77;
    }
    speed_log_configure("error");
    cu_init("bench-cluster");
    char model_dir[700];
    if (model_arg) {
        snprintf(model_dir, sizeof model_dir, "%s", model_arg);
    } else {
        snprintf(model_dir, sizeof model_dir, "%s/bench-model", cu_dir);
        if (tu_system("%s/speedctl make-tiny-model %s %s > /dev/null 2>&1", cu_bin, model_dir, shape) != 0) {
            fprintf(stderr, "make-tiny-model %s failed\n", shape);
            return 1;
        }
    }
    speed_model_t *model = NULL;
    if (speed_model_load(model_dir, NULL, &model) != SPEED_OK) {
        fprintf(stderr, "cannot load %s\n", model_dir);
        return 1;
    }
    const int L = model->config.n_layers, vocab = model->config.vocab_size;
    const char *name = strrchr(model_dir, '/') ? strrchr(model_dir, '/') + 1 : model_dir;

    const int B = cu_port_base;
    char pg[16], ph[16], dg[16], dh[16], rp[16], ctx[16];
    snprintf(pg, sizeof pg, "%d", B);
    snprintf(ph, sizeof ph, "%d", B + 10);
    snprintf(dg, sizeof dg, "%d", B + 20);
    snprintf(dh, sizeof dh, "%d", B + 30);
    snprintf(rp, sizeof rp, "%d", B + 40);
    snprintf(ctx, sizeof ctx, "%d", n_prompt + 64 > 4096 ? n_prompt + 64 : 4096);
    const char *args[] = {"--model",
                          model_dir,
                          "--prefill.grpc_port",
                          pg,
                          "--prefill.http_port",
                          ph,
                          "--decode.grpc_port",
                          dg,
                          "--decode.http_port",
                          dh,
                          "--router.port",
                          rp,
                          "--prefill.threads",
                          "2",
                          "--decode.threads",
                          "1",
                          "--prefill.kv_tokens",
                          "8192",
                          "--decode.kv_tokens",
                          "16384",
                          "--log",
                          "warn",
                          NULL};
    cu_proc_t dec = cu_spawn("speed-decode", "decode", args);
    cu_proc_t pre = cu_spawn("speed-prefill", "prefill", args);
    cu_proc_t rtr = {0};
    bool up = cu_wait_up(&dec, B + 30, 120) && cu_wait_up(&pre, B + 10, 120);
    if (up) {
        rtr = cu_spawn("speed-router", "router", args);
        up = cu_wait_up(&rtr, B + 40, 60);
    }
    if (!up) {
        fprintf(stderr, "cluster did not come up; logs in %s\n", cu_dir);
        cu_stop(&rtr, SIGKILL, 5), cu_stop(&pre, SIGKILL, 5), cu_stop(&dec, SIGKILL, 5);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("bench_cluster: model %s (%d layers), 1P1D on loopback, UCX shm; prefill 2 threads, decode 1\n", name, L);

    /* 1. router-added latency */
    int32_t small[16];
    for (int i = 0; i < 16; i++) small[i] = 1 + (i * 131) % (vocab - 1);
    char *small_json = ids_json(small, 16);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", B);
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.tls = cu_rpc_tls("router");
    speed_rpc_channel_t *pc = NULL, *dc = NULL;
    speed_rpc_channel_create(target, &cp, &pc);
    snprintf(target, sizeof target, "127.0.0.1:%d", B + 20);
    speed_rpc_channel_create(target, &cp, &dc);
    double *via = calloc((size_t)pairs, sizeof *via), *dir = calloc((size_t)pairs, sizeof *dir);
    double *diff = calloc((size_t)pairs, sizeof *diff);
    int ok = 0;
    for (int k = 0; k < pairs + 3; k++) {
        double a = router_request(B + 40, name, small_json, NULL, 1, false, NULL, NULL);
        double b = direct_request(pc, dc, small, 16, k);
        if (k < 3 || a < 0 || b < 0) continue; /* warm-up */
        via[ok] = a, dir[ok] = b, diff[ok] = a - b;
        ok++;
    }
    if (ok > 0) {
        double mv = tu_median(via, ok), md = tu_median(dir, ok), mdiff = tu_median(diff, ok);
        printf("router latency   1-token request, 16-token prompt, %d pairs: via router %.2f ms, direct gRPC %.2f ms "
               "(median); router adds %.2f ms per request (median of pair differences) = %.2fx\n",
               ok, mv * 1e3, md * 1e3, mdiff * 1e3, mv / md);
    } else {
        printf("router latency   failed (see logs in %s)\n", cu_dir);
    }

    /* 2. TTFT at C = L vs 0.75 L */
    int32_t *ids = malloc((size_t)n_prompt * sizeof *ids);
    uint64_t s = 12345;
    for (int i = 0; i < n_prompt; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = i == 0 ? 1 : (int32_t)(3 + (s >> 33) % (uint64_t)(vocab - 3));
    }
    char *long_json = ids_json(ids, n_prompt);
    char full_speed[64];
    snprintf(full_speed, sizeof full_speed, "{\"prefill_layers\":%d}", L);
    const char *speed75 = "{\"prefill_layers\":0.75}";
    router_request(B + 40, name, long_json, speed75, 2, true, NULL, NULL); /* warm-up */
    double *tf = calloc((size_t)repeat, sizeof *tf), *ts = calloc((size_t)repeat, sizeof *ts);
    double *ratio = calloc((size_t)repeat, sizeof *ratio);
    uint64_t kv_full = 0, kv_speed = 0, kv_fd = 0;
    int n_ok = 0;
    for (int r = 0; r < repeat; r++) {
        double a = router_request(B + 40, name, long_json, full_speed, 2, true, &kv_full, &kv_fd);
        double b = router_request(B + 40, name, long_json, speed75, 2, true, &kv_speed, &kv_fd);
        if (a <= 0 || b <= 0) continue;
        tf[n_ok] = a, ts[n_ok] = b, ratio[n_ok] = b / a;
        n_ok++;
    }
    if (n_ok > 0) {
        int C = (int)floor(0.75 * L + 0.5);
        double mf = tu_median(tf, n_ok), ms = tu_median(ts, n_ok), mr = tu_median(ratio, n_ok);
        printf("TTFT             %d-token prompt, streamed through the router, %d interleaved pairs: C=%d (full) "
               "%.1f ms, C=%d %.1f ms (medians); ratio %.3fx (median of pair ratios)\n",
               n_prompt, n_ok, L, mf * 1e3, C, ms * 1e3, mr);
        printf("KV shipped       C=%d: %llu B; C=%d: %llu B = %.3fx (formula %.3fx)\n", L, (unsigned long long)kv_full,
               C, (unsigned long long)kv_speed, kv_full ? (double)kv_speed / (double)kv_full : 0.0,
               (double)speed_kv_bytes_for_prompt(&model->config, C, 1, 1, n_prompt, SPEED_DTYPE_BF16) /
                   (double)speed_kv_bytes_for_prompt(&model->config, L, 1, 1, n_prompt, SPEED_DTYPE_BF16));
    } else {
        printf("TTFT             failed (see logs in %s)\n", cu_dir);
    }
    double xfer_bytes = cu_metric(B + 10, "speed_kv_transfer_bytes_total");
    printf("transfer         %.0f bytes pushed by the prefill node in all\n", xfer_bytes);

    speed_rpc_channel_destroy(pc);
    speed_rpc_channel_destroy(dc);
    /* stop all three, whatever each one returns */
    bool stopped_rtr = cu_stop(&rtr, SIGTERM, 30) == 0;
    bool stopped_pre = cu_stop(&pre, SIGTERM, 30) == 0;
    bool stopped_dec = cu_stop(&dec, SIGTERM, 30) == 0;
    int rc = stopped_rtr && stopped_pre && stopped_dec;
    free(small_json), free(long_json), free(ids), free(via), free(dir), free(diff), free(tf), free(ts), free(ratio);
    speed_model_destroy(model);
    (void)check_count_, (void)check_failures_; /* cluster_util.h brings the test counters */
    cu_cleanup(!rc || ok == 0 || n_ok == 0);
    return rc && ok > 0 && n_ok > 0 ? 0 : 1;
}
