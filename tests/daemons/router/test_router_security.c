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
#include <sys/stat.h>
#include <sys/time.h>

#include "router_test_util.h"
#include "test_proc.h"
#include "test_stats.h"
#include "tls_test_util.h"

static char parent[512];
static char model_dir[600];
static char cluster[700];
static fake_node_t pre[1], dec[1];
static int pbase, dbase;

/* ---- process memory ----------------------------------------------------------------------- */

/* AddressSanitizer keeps freed memory in quarantine and never trims: the resident-memory
 * scenarios measure nothing there (and run many times slower), so they skip. */
#if defined(__SANITIZE_ADDRESS__)
#define MEMORY_MEASURABLE false
#else
#define MEMORY_MEASURABLE true
#endif

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
    const char *args[] = {"--served_model_name", "tinymodel", "--router.max_context", "1000000",
                          "--router.stream_buffer_bytes", "131072", "--router.max_in_flight", "64",
                          /* 50 streams at full speed load the fake node so much that it may miss
                           * a health poll; polling once at start keeps it in the pool */
                          "--router.status_interval_ms", "60000",
                          /* each stream lasts until it overruns, however loaded the machine is */
                          "--router.request_timeout_ms", "300000", NULL};
    CHECK(router_start(&rp, cluster, args));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(rp.port, 200, 10));
    fake_clear_ids(&dec[0]);
    int cancelled0 = atomic_load(&dec[0].n_gen_cancelled);
    atomic_store(&dec[0].gen_tokens, 60000);
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
    /* Each stream either is relayed to its end (60000 tokens, ~20 MB of SSE: more than the
     * kernel's socket buffers can absorb for a client that does not read, up to 4 MiB with
     * Linux's default tcp_wmem) or is cut off at its bound; the router counts each request
     * once it is over either way. */
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
    if (getenv("SPEED_TEST_VERBOSE")) {
        char *m = cu_metrics(rp.port);
        for (char *l = m ? strtok(m, "\n") : NULL; l; l = strtok(NULL, "\n"))
            if (strstr(l, "requests_total")) printf("  %s\n", l);
        speed_free(m);
    }
    printf("slow readers: %d Generate calls, %d ended by the router's cancel, %g overruns\n",
           atomic_load(&dec[0].n_generate), atomic_load(&dec[0].n_gen_cancelled) - cancelled0, overruns);
    printf("slow readers: baseline RSS %ld KiB, peak %ld KiB (+%ld KiB for %d streams)\n", base_rss, peak,
           peak - base_rss, N_SLOW);
    CHECK(done);
    /* 50 x 128 KiB of pending SSE is 6.4 MiB; the rest is gRPC's receive windows, thread
     * stacks and allocator slack. Without the bound the router held every answer (16 MB each). */
    CHECK_MSG(peak - base_rss < 64 * 1024, "router RSS grew by %ld KiB", peak - base_rss);
    /* Every stream that started was cut off and its request cancelled, each counted as a
     * client that left (499); the decode node got a Cancel for each (fake_check_balanced
     * below). */
    double n_499 = cu_metric(rp.port, "speed_router_requests_total{route=\"disaggregated\",status=\"499\"}");
    int n_gen = atomic_load(&dec[0].n_generate);
    CHECK_MSG(overruns == n_gen && n_499 == n_gen, "%d streams started, %g overruns, %g 499s", n_gen, overruns, n_499);
    CHECK_MSG(n_gen == N_SLOW, "%d of %d streams started", n_gen, N_SLOW);
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
    int rc = tu_system("'%s' --config '%s' --router.api_keys sekrit-on-argv --print-config > '%s' 2> '%s'", bin,
                       cluster, out_path, err_path);
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

/* ---- 4: per-key limits -------------------------------------------------------------------- */

typedef struct {
    int port;
    const char *body, *auth;
    int status;
    pthread_t th;
} post_job_t;

static void *post_main(void *arg) {
    post_job_t *j = arg;
    cu_resp_t r;
    cu_http(j->port, "POST", "/v1/chat/completions", j->body, j->auth, NULL, 60000, &r);
    j->status = r.status;
    cu_resp_free(&r);
    return NULL;
}

static void post_start(post_job_t *j, int port, const char *body, const char *auth) {
    j->port = port;
    j->body = body;
    j->auth = auth;
    j->status = 0;
    pthread_create(&j->th, NULL, post_main, j);
}

/* A free port for a metrics listener. */
static int free_port(void) {
    for (int tries = 0; tries < 500; tries++) {
        int p = 20000 + (int)(((unsigned)getpid() * 7919u + (unsigned)tries * 104729u) % 40000u);
        if (tu_ports_free(p, 1)) return p;
    }
    return 0;
}

static void expect_429(cu_resp_t *r, const char *what, const char *in_message) {
    CHECK_MSG(r->status == 429, "%s: status %d", what, r->status);
    CHECK_MSG(atoi(r->retry_after) >= 1, "%s: Retry-After \"%s\"", what, r->retry_after);
    json_t *j = json_of(r->body);
    CHECK_STR_EQ(jstr(j, "error.code"), "rate_limit_exceeded");
    CHECK_CONTAINS(jstr(j, "error.message") ? jstr(j, "error.message") : "", in_message);
    json_decref(j);
}

static const char *SMALL_CHAT = "{\"model\":\"tinymodel\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
                                "\"max_tokens\":60}";

static void test_key_limits(void) {
    const char *keys = tu_path("keys.txt");
    char keys_path[1024];
    snprintf(keys_path, sizeof keys_path, "%s", keys);
    tu_write_text(keys_path, "# the team's keys\n"
                             "\n"
                             "alpha-key-0001 name=alpha max_in_flight=1\n"
                             "beta-key-0002  name=beta max_kv_tokens=100   # a comment after the options\n"
                             "gamma-key-0003 name=gamma rate=1 burst=2\n"
                             "delta-key-0004\n");
    chmod(keys_path, 0600);
    int mport = free_port();
    char mport_text[16];
    snprintf(mport_text, sizeof mport_text, "%d", mport);
    router_proc_t rp;
    const char *args[] = {"--served_model_name",
                          "tinymodel",
                          "--router.api_keys_file",
                          keys_path,
                          "--router.metrics_port",
                          mport_text,
                          NULL};
    CHECK(router_start(&rp, cluster, args));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(mport, 200, 10));
    cu_resp_t r;

    /* in flight: alpha holds one request at the prefill gate; a second one is refused at once,
     * while another key goes through. */
    atomic_store(&pre[0].prefill_gate, true);
    post_job_t a, c;
    post_start(&a, rp.port, SMALL_CHAT, "Bearer alpha-key-0001");
    WAIT_FOR(atomic_load(&pre[0].n_prefill_gated) == 1, 10000);
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions", SMALL_CHAT, "Bearer alpha-key-0001", NULL, 30000, &r));
    expect_429(&r, "alpha's second request", "in flight");
    CHECK(r.seconds < 5);
    cu_resp_free(&r);
    post_start(&c, rp.port, SMALL_CHAT, "Bearer delta-key-0004");
    WAIT_FOR(atomic_load(&pre[0].n_prefill_gated) == 2, 10000);
    CHECK_INT_EQ(atomic_load(&pre[0].n_prefill_gated), 2);

    /* KV tokens: beta may hold 100; one request of ~70 waits at the gate, a second is refused. */
    post_job_t b;
    post_start(&b, rp.port, SMALL_CHAT, "Bearer beta-key-0002");
    WAIT_FOR(atomic_load(&pre[0].n_prefill_gated) == 3, 10000);
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions", SMALL_CHAT, "Bearer beta-key-0002", NULL, 30000, &r));
    expect_429(&r, "beta's second request", "KV tokens");
    cu_resp_free(&r);
    /* larger than the whole budget */
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions",
                  "{\"model\":\"tinymodel\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":101}",
                  "Bearer beta-key-0002", NULL, 30000, &r));
    expect_429(&r, "beta's oversized request", "more than this API key may hold");
    cu_resp_free(&r);

    atomic_store(&pre[0].prefill_gate, false);
    pthread_join(a.th, NULL);
    pthread_join(b.th, NULL);
    pthread_join(c.th, NULL);
    CHECK_INT_EQ(a.status, 200);
    CHECK_INT_EQ(b.status, 200);
    CHECK_INT_EQ(c.status, 200);
    /* both budgets are back */
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions", SMALL_CHAT, "Bearer alpha-key-0001", NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    CHECK(cu_http(rp.port, "POST", "/v1/chat/completions", SMALL_CHAT, "Bearer beta-key-0002", NULL, 30000, &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);

    /* rate: 1/s with a burst of 2 */
    int ok = 0, limited = 0;
    for (int i = 0; i < 3; i++) {
        CHECK(cu_http(rp.port, "GET", "/v1/models", NULL, "Bearer gamma-key-0003", NULL, 30000, &r));
        if (r.status == 200) ok++;
        if (r.status == 429) {
            limited++;
            expect_429(&r, "gamma's third request", "per second");
        }
        cu_resp_free(&r);
    }
    CHECK_MSG(ok == 2 && limited == 1, "%d ok, %d limited", ok, limited);

    /* Counters by key name; the metrics never show a key. */
    char *m = cu_metrics(mport);
    CHECK(m && prom_value(m, "speed_router_key_limited_total{key=\"alpha\",limit=\"in_flight\"}") == 1);
    CHECK(m && prom_value(m, "speed_router_key_limited_total{key=\"beta\",limit=\"kv_tokens\"}") == 2);
    CHECK(m && prom_value(m, "speed_router_key_limited_total{key=\"gamma\",limit=\"rate\"}") == 1);
    CHECK(m && !strstr(m, "key-000"));
    speed_free(m);
    CHECK_INT_EQ(router_stop(&rp), 0);

    /* A bad line: the router refuses to start, naming the file and line, not the key. */
    tu_write_text(keys_path, "ok-key-1\nsekrit-key-9 rate=fast\n");
    const char *bin = getenv("SPEED_ROUTER");
    const char *err_file = tu_path("keys.err");
    char err_path[1024];
    snprintf(err_path, sizeof err_path, "%s", err_file);
    int rc = tu_system("'%s' --config '%s' --router.api_keys_file '%s' > /dev/null 2> '%s'", bin, cluster, keys_path,
                       err_path);
    CHECK_INT_EQ(rc, 1);
    char *e = tu_read(err_path, NULL);
    CHECK_CONTAINS(e ? e : "", "keys.txt:2");
    CHECK_CONTAINS(e ? e : "", "rate=");
    CHECK(e && !strstr(e, "sekrit"));
    free(e);
    /* two keys on one line: the second is not shown either */
    tu_write_text(keys_path, "ok-key-1 sekrit-key-10\n");
    rc = tu_system("'%s' --config '%s' --router.api_keys_file '%s' > /dev/null 2> '%s'", bin, cluster, keys_path,
                   err_path);
    CHECK_INT_EQ(rc, 1);
    e = tu_read(err_path, NULL);
    CHECK_CONTAINS(e ? e : "", "keys.txt:1");
    CHECK(e && !strstr(e, "sekrit"));
    free(e);
}

/* ---- 5: browsers, slowloris, listeners ------------------------------------------------------ */

static void test_browsers(void) {
    router_proc_t rp;
    const char *args[] = {
        "--served_model_name", "tinymodel", "--router.allowed_hosts", "127.0.0.1, api.example", "--router.cors_origins",
        "https://app.example", NULL};
    CHECK(router_start(&rp, cluster, args));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(rp.port, 200, 10));
    speed_http_client_t *c = NULL;
    const speed_http_response_t *resp = NULL;
    struct {
        const char *host, *origin, *method;
        int status;
        bool cors;
    } cases[] = {
        {"api.example:8000", NULL, "GET", 200, false},
        {"evil.example", NULL, "GET", 403, false}, /* DNS rebinding */
        {"127.0.0.1", "https://evil.example", "GET", 403, false},
        {"127.0.0.1", "https://app.example", "GET", 200, true},
        {"127.0.0.1", "https://app.example", "OPTIONS", 204, true}, /* preflight */
        {"127.0.0.1", "https://evil.example", "OPTIONS", 403, false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CHECK(speed_http_client_connect("127.0.0.1", (uint16_t)rp.port, 10000, &c) == SPEED_OK);
        if (!c) continue;
        speed_http_header_t h[3] = {
            {"Host", cases[i].host}, {"Access-Control-Request-Method", "POST"}, {"Origin", cases[i].origin}};
        const char *path = strcmp(cases[i].method, "OPTIONS") == 0 ? "/v1/chat/completions" : "/v1/models";
        speed_status_t st =
            speed_http_client_request(c, cases[i].method, path, h, cases[i].origin ? 3 : 2, NULL, 0, &resp);
        CHECK_INT_EQ(st, SPEED_OK);
        if (st == SPEED_OK) {
            CHECK_MSG(resp->status == cases[i].status, "case %zu: status %d, want %d", i, resp->status,
                      cases[i].status);
            const char *acao = speed_http_response_header(resp, "Access-Control-Allow-Origin");
            CHECK_MSG((acao != NULL) == cases[i].cors, "case %zu: Access-Control-Allow-Origin %s", i,
                      acao ? acao : "(none)");
            if (acao) CHECK_STR_EQ(acao, "https://app.example");
            if (resp->status == 204)
                CHECK_CONTAINS(speed_http_response_header(resp, "Access-Control-Allow-Headers"), "Authorization");
        }
        speed_http_client_destroy(c);
        c = NULL;
    }
    CHECK_INT_EQ(router_stop(&rp), 0);

    /* Without router.cors_origins no CORS header is sent, and any Origin is refused. */
    const char *args2[] = {"--served_model_name", "tinymodel", NULL};
    CHECK(router_start(&rp, cluster, args2));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(rp.port, 200, 10));
    CHECK(speed_http_client_connect("127.0.0.1", (uint16_t)rp.port, 10000, &c) == SPEED_OK);
    if (c) {
        speed_http_header_t h[1] = {{"Origin", "https://app.example"}};
        CHECK(speed_http_client_request(c, "GET", "/v1/models", h, 1, NULL, 0, &resp) == SPEED_OK);
        CHECK_INT_EQ(resp->status, 403);
        CHECK(speed_http_response_header(resp, "Access-Control-Allow-Origin") == NULL);
        speed_http_client_destroy(c);
    }
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* Slowloris: connections past router.max_connections_per_ip are refused at once, and a
 * connection that sends half a header block is closed after router.header_timeout_ms. */
static void test_slowloris(void) {
    router_proc_t rp;
    const char *args[] = {"--served_model_name",
                          "tinymodel",
                          "--router.max_connections_per_ip",
                          "4",
                          "--router.header_timeout_ms",
                          "3000",
                          NULL};
    CHECK(router_start(&rp, cluster, args));
    if (!rp.pid || rp.exited) return;
    CHECK(cu_wait_health(rp.port, 200, 10));
    static const char half[] = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    int fds[4];
    for (int i = 0; i < 4; i++) fds[i] = raw_send(rp.port, half, sizeof half - 1);
    /* the fifth connection from this address is closed at once, long before the timeout */
    int fifth = raw_send(rp.port, half, sizeof half - 1);
    CHECK(fifth >= 0);
    char buf[64];
    struct timeval tv = {5, 0};
    if (fifth >= 0) {
        setsockopt(fifth, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        double t0 = now_s();
        ssize_t k = recv(fifth, buf, sizeof buf, 0);
        CHECK_MSG(k <= 0 && now_s() - t0 < 1.5, "fifth connection: recv %zd after %.1f s", k, now_s() - t0);
        close(fifth);
    }
    /* the four half-open ones are closed after about 3 s (MHD's timer has 1 s granularity) */
    double t0 = now_s();
    for (int i = 0; i < 4; i++) {
        if (fds[i] < 0) continue;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ssize_t k = recv(fds[i], buf, sizeof buf, 0);
        CHECK_MSG(k <= 0, "half-sent request %d got %zd bytes", i, k);
        close(fds[i]);
    }
    double took = now_s() - t0;
    printf("slowloris: half-sent requests closed after %.1f s\n", took);
    CHECK_MSG(took > 1.5 && took < 6.5, "closed after %.1f s", took);
    /* and the router still serves */
    cu_resp_t r;
    CHECK(cu_http(rp.port, "GET", "/v1/models", NULL, NULL, NULL, 10000, &r));
    CHECK_INT_EQ(r.status, 200);
    cu_resp_free(&r);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* router.listen and metrics.listen bind where they say (127.0.0.2 and 127.0.0.3 are loopback
 * addresses of their own on Linux): the API is not on 127.0.0.1, the metrics are only on
 * their address, without a key, while the API port wants one for them. */
static void test_listeners(void) {
    int mport = free_port();
    char mport_text[16];
    snprintf(mport_text, sizeof mport_text, "%d", mport);
    router_proc_t rp;
    const char *args[] = {"--served_model_name",
                          "tinymodel",
                          "--router.listen",
                          "127.0.0.2",
                          "--metrics.listen",
                          "127.0.0.3",
                          "--router.metrics_port",
                          mport_text,
                          NULL};
    setenv("SPEED_ROUTER_API_KEYS", "listen-key", 1);
    bool up = router_start(&rp, cluster, args);
    unsetenv("SPEED_ROUTER_API_KEYS");
    CHECK(up);
    if (!up) return;
    int status = 0;
    CHECK_INT_EQ(speed_http_get("127.0.0.3", (uint16_t)mport, "/health", 5000, &status, NULL), SPEED_OK);
    for (double until = now_s() + 10; status != 200 && now_s() < until; sleep_ms(50))
        speed_http_get("127.0.0.3", (uint16_t)mport, "/health", 5000, &status, NULL);
    CHECK_INT_EQ(status, 200);
    CHECK_INT_EQ(speed_http_get("127.0.0.3", (uint16_t)mport, "/metrics", 5000, &status, NULL), SPEED_OK);
    CHECK_INT_EQ(status, 200);
    CHECK(speed_http_get("127.0.0.1", (uint16_t)mport, "/health", 2000, &status, NULL) != SPEED_OK);
    CHECK(speed_http_get("127.0.0.1", (uint16_t)rp.port, "/health", 2000, &status, NULL) != SPEED_OK);
    CHECK_INT_EQ(speed_http_get("127.0.0.2", (uint16_t)rp.port, "/metrics", 5000, &status, NULL), SPEED_OK);
    CHECK_INT_EQ(status, 401);
    CHECK_INT_EQ(router_stop(&rp), 0);
}

/* ---- 6: HTTPS ---------------------------------------------------------------------------------- */

static char cert_path[1024], key_path[1024];
static char *cert_pem;

static bool start_tls_router(router_proc_t *rp) {
    const char *args[] = {
        "--served_model_name", "tinymodel", "--router.tls_cert", cert_path, "--router.tls_key", key_path, NULL};
    return router_start(rp, cluster, args);
}

static void test_https(void) {
    router_proc_t rp;
    CHECK(start_tls_router(&rp));
    if (!rp.pid || rp.exited) return;
    speed_http_client_t *c = NULL;
    const speed_http_response_t *resp = NULL;
    CHECK(speed_http_client_connect_tls("127.0.0.1", (uint16_t)rp.port, 10000, cert_pem, NULL, &c) == SPEED_OK);
    if (c) {
        CHECK(speed_http_client_request(c, "GET", "/v1/models", NULL, 0, NULL, 0, &resp) == SPEED_OK);
        CHECK_INT_EQ(resp->status, 200);
        CHECK_CONTAINS(resp->body, "tinymodel");
        /* a streamed completion on the same (keep-alive) TLS connection */
        const char *body =
            "{\"model\":\"tinymodel\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}";
        speed_http_header_t h[1] = {{"Content-Type", "application/json"}};
        CHECK(speed_http_client_request_begin(c, "POST", "/v1/chat/completions", h, 1, body, strlen(body), &resp) ==
              SPEED_OK);
        CHECK_INT_EQ(resp->status, 200);
        int n = 0;
        bool done = false;
        const speed_http_sse_event_t *ev = NULL;
        while (speed_http_client_next_event(c, &ev) == SPEED_OK && ev) {
            n++;
            done = strcmp(ev->data, "[DONE]") == 0;
        }
        CHECK_MSG(n >= 3 && done, "%d events, [DONE] %d", n, done);
        speed_http_client_destroy(c);
    }
    /* plain HTTP to the HTTPS port gets no HTTP answer */
    cu_resp_t r;
    cu_http(rp.port, "GET", "/v1/models", NULL, NULL, NULL, 5000, &r);
    CHECK_MSG(r.status == 0 || r.status == 400, "plain HTTP on the TLS port: %d", r.status);
    cu_resp_free(&r);
    /* a client that trusts another CA refuses the server */
    char other_cert[1100], other_key[1100];
    snprintf(other_cert, sizeof other_cert, "%s.other", cert_path);
    snprintf(other_key, sizeof other_key, "%s.other", key_path);
    char *other_pem = NULL;
    CHECK(tu_tls_make_cert(other_cert, other_key, &other_pem));
    c = NULL;
    CHECK_INT_EQ(speed_http_client_connect_tls("127.0.0.1", (uint16_t)rp.port, 10000, other_pem, NULL, &c),
                 SPEED_ERR_PEER_PROTOCOL);
    speed_http_client_destroy(c);
    free(other_pem);
    /* and the right CA under another name is refused too */
    c = NULL;
    CHECK_INT_EQ(speed_http_client_connect_tls("127.0.0.1", (uint16_t)rp.port, 10000, cert_pem, "api.example", &c),
                 SPEED_ERR_PEER_PROTOCOL);
    speed_http_client_destroy(c);
    CHECK_INT_EQ(router_stop(&rp), 0);

    /* a key file that is not a key: the router does not start */
    const char *bad[] = {"--router.tls_cert", cert_path, "--router.tls_key", cert_path, NULL};
    router_proc_t bp;
    CHECK(!router_start(&bp, cluster, bad));
}

/* HTTPS against HTTP on the same router build, alternated: keep-alive GETs of /v1/models
 * (requests/s and p50), a new connection per GET (the handshake), and short completions. */
typedef struct {
    double rps, p50_ms;
} bench_t;

static bench_t bench_round(int port, bool tls, int mode, int n) {
    double *lat = calloc((size_t)n, sizeof *lat);
    speed_http_client_t *c = NULL;
    const speed_http_response_t *resp = NULL;
    const char *body =
        "{\"model\":\"tinymodel\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":5}";
    speed_http_header_t h[1] = {{"Content-Type", "application/json"}};
    double t0 = now_s();
    int done = 0;
    for (int i = 0; i < n; i++) {
        double t = now_s();
        if (!c) {
            speed_status_t st =
                tls ? speed_http_client_connect_tls("127.0.0.1", (uint16_t)port, 10000, cert_pem, NULL, &c)
                    : speed_http_client_connect("127.0.0.1", (uint16_t)port, 10000, &c);
            if (st != SPEED_OK) break;
        }
        speed_status_t st =
            mode == 2 ? speed_http_client_request(c, "POST", "/v1/chat/completions", h, 1, body, strlen(body), &resp)
                      : speed_http_client_request(c, "GET", "/v1/models", NULL, 0, NULL, 0, &resp);
        if (st != SPEED_OK || resp->status != 200) break;
        if (mode == 1) {
            speed_http_client_destroy(c);
            c = NULL;
        }
        lat[done++] = (now_s() - t) * 1e3;
    }
    double el = now_s() - t0;
    speed_http_client_destroy(c);
    bench_t b = {done == n ? done / el : 0, done ? tu_median(lat, done) : 0};
    free(lat);
    return b;
}

static void test_tls_bench(void) {
    router_proc_t plain, tls;
    const char *args[] = {"--served_model_name", "tinymodel", NULL};
    CHECK(router_start(&plain, cluster, args));
    CHECK(start_tls_router(&tls));
    if (!plain.pid || plain.exited || !tls.pid || tls.exited) return;
    CHECK(cu_wait_health(plain.port, 200, 10));
    static const char *const names[] = {"GET /v1/models, keep-alive", "GET /v1/models, new connection each",
                                        "chat completion (5 tokens), keep-alive"};
    static const int counts[] = {400, 100, 40};
    enum { ROUNDS = 5 };
    for (int mode = 0; mode < 3; mode++) {
        double rps[2][ROUNDS], p50[2][ROUNDS];
        for (int k = 0; k < ROUNDS; k++)
            for (int t = 0; t < 2; t++) { /* alternated: plain, TLS, plain, TLS ... */
                bench_t b = bench_round(t ? tls.port : plain.port, t, mode, counts[mode]);
                CHECK_MSG(b.rps > 0, "%s %s: a request failed", names[mode], t ? "https" : "http");
                rps[t][k] = b.rps;
                p50[t][k] = b.p50_ms;
            }
        double r_http = tu_median(rps[0], ROUNDS), r_https = tu_median(rps[1], ROUNDS);
        double l_http = tu_median(p50[0], ROUNDS), l_https = tu_median(p50[1], ROUNDS);
        printf("tls bench: %-40s http %8.0f req/s p50 %.3f ms | https %8.0f req/s p50 %.3f ms | "
               "https/http %.2fx req/s, +%.3f ms p50\n",
               names[mode], r_http, l_http, r_https, l_https, r_http > 0 ? r_https / r_http : 0, l_https - l_http);
    }
    CHECK_INT_EQ(router_stop(&plain), 0);
    CHECK_INT_EQ(router_stop(&tls), 0);
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
    if (!MEMORY_MEASURABLE && only && (strcmp(only, "big-body") == 0 || strcmp(only, "slow-readers") == 0)) {
        fake_stop(&pre[0]);
        fake_stop(&dec[0]);
        tu_rm_rf(parent);
        SKIP_TEST("a sanitizer build: resident memory is not measurable");
    }
    if ((!only && MEMORY_MEASURABLE) || (only && strcmp(only, "big-body") == 0)) test_big_body();
    if ((!only && MEMORY_MEASURABLE) || (only && strcmp(only, "slow-readers") == 0)) test_slow_readers();
    if (!only || strcmp(only, "secrets") == 0) test_secrets();
    if (!only || strcmp(only, "key-limits") == 0) test_key_limits();
    if (!only || strcmp(only, "browsers") == 0) test_browsers();
    if (!only || strcmp(only, "slowloris") == 0) test_slowloris();
    if (!only || strcmp(only, "listeners") == 0) test_listeners();
    snprintf(cert_path, sizeof cert_path, "%s/api.crt", parent);
    snprintf(key_path, sizeof key_path, "%s/api.key", parent);
    if (!only || strcmp(only, "https") == 0 || strcmp(only, "tls-bench") == 0)
        CHECK(tu_tls_make_cert(cert_path, key_path, &cert_pem));
    if (!only || strcmp(only, "https") == 0) test_https();
    /* not in the default run: ctest runs it as router_tls_bench (label perf) */
    if (only && strcmp(only, "tls-bench") == 0) test_tls_bench();
    free(cert_pem);

    fake_stop(&pre[0]);
    fake_stop(&dec[0]);
    tu_rm_rf(parent);
    return CHECK_DONE();
}
