/* Two hosts (issue 11's 2-host scenario) on the netns test bed: the router and a prefill node on
 * host 0, a decode node on host 1, the control plane (gRPC, mutual TLS) and the KV (UCX over
 * tcp on eth0: ucx.transport tcp, ucx.net_devices eth0) across the veth link; the client on
 * host 0 talks HTTP to the router.
 *   1. the same cluster on one host (loopback, ucx tcp on lo) answers P prompts (one streamed);
 *      each answer equals `speedctl generate` (tokens, logprobs);
 *   2. the 2-host cluster answers the same prompts with the same tokens (text per token) and the
 *      same logprobs as the 1-host run and the reference; the KV bytes crossed host 1's eth0
 *      (its rx bytes grew by at least usage.kv_bytes); no KV block stays reserved;
 *   3. with 50 ms delay and 1% loss on host 1's link (each direction: the round trip grows by
 *      100 ms), the answers are still exact and each finishes within its deadline; nothing stays
 *      reserved.
 * Exits 77 where namespaces cannot be made (not root) or when not run by ctest.
 */
#include <math.h>

#include "alloc.h"
#include "log.h"
#include "model.h"
#include "netns_bed.h"
#include "openai_util.h"

#define N_PROMPTS  3
#define N_GEN      12
#define C_LAYERS   3
#define DEADLINE_S 60.0

static const int g_len[N_PROMPTS] = {40, 17, 64};
static int32_t g_ids[N_PROMPTS][128];
static char *g_csv[N_PROMPTS];
static speed_tok_t *g_tok;
static const speed_model_config_t *g_mc;

/* One greedy completion through the router on `port`; HTTP status, the answer into *r. */
static int complete(int port, int k, bool stream, ou_result_t *r, double *secs_p) {
    memset(r, 0, sizeof *r);
    char *body = ou_completion_body("model", g_ids[k], g_len[k], N_GEN, 2, stream, NULL, NULL);
    double t0 = now_s();
    int st = 0;
    if (!stream) {
        cu_resp_t resp;
        cu_http(port, "POST", "/v1/completions", body, NULL, NULL, (int)(DEADLINE_S * 1000), &resp);
        st = resp.status;
        if (st == 200 && resp.json) ou_from_json(r, resp.json);
        if (st != 200) fprintf(stderr, "prompt %d: HTTP %d: %s\n", k, st, resp.body ? resp.body : "(none)");
        cu_resp_free(&resp);
    } else {
        cu_sse_t s;
        if (cu_sse_begin(port, "/v1/completions", body, NULL, (int)(DEADLINE_S * 1000), &s)) {
            st = s.status;
            if (st == 200) cu_sse_read(&s, -1, t0 + DEADLINE_S);
            ou_from_sse(r, &s);
            CHECK_MSG(s.ended && r->done && !r->error, "prompt %d: the stream did not end cleanly", k);
        }
        cu_sse_free(&s);
    }
    *secs_p = now_s() - t0;
    speed_free(body);
    return st;
}

/* host 1's eth0 receive bytes (ip -s -j link), or -1 */
static double rx_bytes(nb_bed_t *b, int host) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "ip -n %s -s -j link show dev %s", nb_host_ns(b, host), NB_HOST_DEV);
    const char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    int fd = -1;
    tu_spawn_params_t p = {.stdout_fd_p = &fd};
    pid_t pid = tu_spawn(argv, &p);
    static char buf[16384];
    size_t len = 0;
    if (pid > 0) tu_read_until(fd, buf, sizeof buf, &len, NULL, now_s() + 10);
    if (fd >= 0) close(fd);
    if (pid > 0) waitpid(pid, NULL, 0);
    json_error_t err;
    json_t *j = json_loads(buf, 0, &err);
    json_t *v = json_object_get(json_object_get(json_object_get(json_array_get(j, 0), "stats64"), "rx"), "bytes");
    double bytes = json_is_integer(v) ? (double)json_integer_value(v) : -1;
    json_decref(j);
    return bytes;
}

static double reserved(const cu_cluster_t *c) {
    double d = cu_metric_sum(cu_dec_http(c, 0), "speed_kv_blocks_reserved");
    double p = cu_metric_sum(cu_pre_http(c, 0), "speed_kv_blocks_reserved");
    return isnan(d) || isnan(p) ? -1 : d + (p > 0 ? p : 0);
}

static void check_no_reserved(const cu_cluster_t *c, const char *what) {
    double until = now_s() + 15, v = -1;
    while ((v = reserved(c)) != 0 && now_s() < until) sleep_ms(50);
    CHECK_MSG(v == 0, "%s: %g KV blocks still reserved", what, v);
}

/* The two answers are the same tokens with the same logprobs. */
static void check_same(const ou_result_t *a, const ou_result_t *b, const char *what) {
    CHECK_MSG(a->n == b->n && a->n == N_GEN, "%s: %d vs %d tokens", what, a->n, b->n);
    for (int i = 0; i < a->n && i < b->n; i++) {
        CHECK_MSG(a->tok[i] && b->tok[i] && strcmp(a->tok[i], b->tok[i]) == 0, "%s: token %d differs", what, i);
        CHECK_MSG(fabs(a->lp[i] - b->lp[i]) <= 1e-6, "%s: token %d logprob %.9g vs %.9g", what, i, a->lp[i], b->lp[i]);
    }
    CHECK_MSG(a->text && b->text && strcmp(a->text, b->text) == 0, "%s: text differs", what);
}

static const char *const g_extra[] = {"--speed.prefill_layers",
                                      "3",
                                      "--decode.kv_tokens",
                                      "8192",
                                      "--prefill.kv_tokens",
                                      "8192",
                                      "--router.status_interval_ms",
                                      "200",
                                      "--ucx.transport",
                                      "tcp",
                                      NULL};

/* The cluster's arguments: UCX over tcp on net_devices. */
static void start(cu_cluster_t *c, const char *net_devices) {
    const char *args[32];
    int n = 0;
    for (int i = 0; g_extra[i]; i++) args[n++] = g_extra[i];
    args[n++] = "--ucx.net_devices";
    args[n++] = net_devices;
    args[n] = NULL;
    cu_cluster_init(c, 1, 1, args);
}

/* Starts the nodes and the router; false when they did not come up (logs printed). */
static bool up(cu_cluster_t *c, cu_proc_t *router) {
    bool ok = cu_cluster_start_nodes(c, 60);
    bool rok = false;
    if (ok) *router = cu_cluster_router(c, 0, NULL, 30, &rok);
    if (!ok || !rok) {
        cu_log_tail("decode0", 20);
        cu_log_tail("prefill0", 20);
        if (ok) cu_log_tail("router0", 20);
        return false;
    }
    return true;
}

static void down(cu_cluster_t *c, cu_proc_t *router) {
    cu_stop(router, SIGTERM, 20);
    cu_stop(&c->pre[0], SIGTERM, 20);
    cu_stop(&c->dec[0], SIGTERM, 20);
}

/* Every prompt through the router; answers into res[], checked against the reference. */
static void run_prompts(cu_cluster_t *c, ou_result_t res[N_PROMPTS], const char *what, double *max_s_p) {
    *max_s_p = 0;
    for (int k = 0; k < N_PROMPTS; k++) {
        char key[32], label[96];
        snprintf(key, sizeof key, "p%d", k);
        snprintf(label, sizeof label, "%s, prompt %d", what, k);
        json_t *ref = ou_ref(key, "--prompt-ids %s --prefill-layers %d --max-tokens %d --top-logprobs 2", g_csv[k],
                             C_LAYERS, N_GEN);
        double secs = 0;
        int st = complete(cu_router_port(c, 0), k, k == 1, &res[k], &secs);
        CHECK_MSG(st == 200, "%s: HTTP %d", label, st);
        CHECK_MSG(secs < DEADLINE_S, "%s: %.1f s", label, secs);
        if (secs > *max_s_p) *max_s_p = secs;
        if (st == 200) ou_check_ref(&res[k], ref, g_tok, false, label); /* also fails when ref is NULL */
        json_decref(ref);
    }
}

int main(void) {
    speed_log_configure("error");
    setvbuf(stderr, NULL, _IONBF, 0);
    nb_bed_t *b = nb_create(2);
    cu_init("two_host");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    CHECK_INT_EQ(speed_tok_load(model_dir, NULL, &g_tok), SPEED_OK);
    if (!model || !g_tok) return CHECK_DONE();
    g_mc = &model->config;
    for (int k = 0; k < N_PROMPTS; k++) {
        ou_prompt(g_ids[k], g_len[k], g_mc->vocab_size, 37 + 6 * k);
        g_csv[k] = ou_ids_csv(g_ids[k], g_len[k]);
    }

    /* 1. one host: everything on loopback (the test's own namespace) */
    cu_cluster_t one;
    cu_proc_t r1 = {0};
    start(&one, "lo");
    ou_result_t ref_run[N_PROMPTS], res[N_PROMPTS];
    double max_s = 0;
    if (!up(&one, &r1)) {
        CHECK_MSG(false, "the 1-host cluster did not come up");
        down(&one, &r1);
        nb_destroy(b);
        return CHECK_DONE();
    }
    run_prompts(&one, ref_run, "1 host", &max_s);
    check_no_reserved(&one, "1 host");
    down(&one, &r1);

    /* 2. two hosts: router + prefill on host 0, decode on host 1; the client on host 0 */
    CHECK(nb_host_enter(b, 0) == 0);
    cu_cluster_t two;
    cu_proc_t r2 = {0};
    start(&two, NB_HOST_DEV);
    cu_cluster_place(&two, "router", 0, nb_host_ns(b, 0), nb_host_addr(b, 0));
    cu_cluster_place(&two, "prefill", 0, nb_host_ns(b, 0), nb_host_addr(b, 0));
    cu_cluster_place(&two, "decode", 0, nb_host_ns(b, 1), nb_host_addr(b, 1));
    if (!up(&two, &r2)) {
        CHECK_MSG(false, "the 2-host cluster did not come up");
    } else {
        double rx0 = rx_bytes(b, 1);
        run_prompts(&two, res, "2 hosts", &max_s);
        double kv = 0;
        for (int k = 0; k < N_PROMPTS; k++) {
            char what[64];
            snprintf(what, sizeof what, "2 hosts vs 1 host, prompt %d", k);
            check_same(&res[k], &ref_run[k], what);
            kv += (double)ou_usage(&res[k], "kv_bytes");
        }
        double rx1 = rx_bytes(b, 1);
        fprintf(stderr, "2 hosts: %.0f KV bytes shipped, host 1's eth0 received %.0f bytes\n", kv, rx1 - rx0);
        CHECK_MSG(kv > 0 && rx0 >= 0 && rx1 - rx0 >= kv, "KV %g bytes, host 1 received %g", kv, rx1 - rx0);
        check_no_reserved(&two, "2 hosts");
        for (int k = 0; k < N_PROMPTS; k++) ou_result_free(&res[k]);

        /* 3. a slow, lossy link to the decode host */
        nb_link_t wan = {.delay_ms = 50, .loss = 0.01};
        CHECK(nb_link_set(b, 1, &wan) == 0);
        run_prompts(&two, res, "50 ms + 1% loss", &max_s);
        fprintf(stderr, "50 ms delay + 1%% loss on the decode host's link: slowest answer %.2f s\n", max_s);
        for (int k = 0; k < N_PROMPTS; k++) {
            char what[64];
            snprintf(what, sizeof what, "lossy link vs 1 host, prompt %d", k);
            check_same(&res[k], &ref_run[k], what);
            ou_result_free(&res[k]);
        }
        CHECK(nb_link_clear(b, 1) == 0);
        check_no_reserved(&two, "50 ms + 1% loss");
    }
    if (check_failures_) {
        cu_log_tail("router0", 15);
        cu_log_tail("prefill0", 15);
        cu_log_tail("decode0", 15);
    }
    down(&two, &r2);
    CHECK(nb_host_leave(b) == 0);
    nb_destroy(b);
    for (int k = 0; k < N_PROMPTS; k++) {
        ou_result_free(&ref_run[k]);
        speed_free(g_csv[k]);
    }
    speed_tok_destroy(g_tok);
    speed_model_destroy(model);
    cu_cleanup(check_failures_ > 0);
    return CHECK_DONE();
}
