/* speedctl top against a live 1P1D cluster (real daemons on loopback, cluster_util.h).
 *
 * `test_speedctl_top json`:
 *   1. after N completions, `top CLUSTER.yaml --once --json`: the router and both nodes up, the
 *      router's request count N with no errors, its generated tokens the sum of the responses'
 *      completion_tokens, the nodes' request counts N, the router sees both nodes; the operator
 *      metrics: the share of prompt tokens run shallow exactly (P - 2N) / P at C = 3 of 4 layers
 *      with one anchor and one tail token, KV bytes saved, TPOT, engine step time and batch;
 *   2. the same nodes given as --router/--node: their roles read from their metrics;
 *   3. a stopped (SIGSTOP) prefill node: shown unreachable within --timeout-ms, top does not hang;
 *   4. a killed decode node: shown down (and, once the router noticed, not routed to);
 *   5. the live view with stdout a pipe: --iterations 2 draws two frames, gives the screen back;
 *   6. bad command lines: usage errors (exit 2).
 * `test_speedctl_top tmux` (exit 77 without tmux): `speedctl top CLUSTER.yaml` in a detached
 *   tmux session of 120x40 on a private socket while the test sends load: the screen shows both
 *   nodes up, a non-zero request rate and KV in use; no line is wider than the pane; the killed
 *   decode node's row turns down; a resized window (72 columns) gets frames cut to it; `q` ends top with 0 and the terminal back in cooked mode
 *   (stty run after it in the same pane); then Ctrl-C in a 60-column pane (every line cut to
 *   60) and SIGTERM to top do the same. The tmux server is killed on every way out (atexit). */
#include <ctype.h>
#include <pthread.h>
#include <stdatomic.h>

#include "cluster_util.h"
#include "log.h"
#include "test_fs.h"

static cu_cluster_t g_c;
static int g_rport;
static cu_proc_t g_router;
static char g_yaml[700];
static char g_sock[64];

/* ---- running speedctl top --------------------------------------------------------------- */

typedef struct {
    int rc;
    double seconds;
    char out[1 << 16];
    json_t *json;
} top_run_t;

/* `speedctl top ARGS...` (NULL-terminated) with stdout captured; killed after timeout_s. */
static void top_run(top_run_t *r, double timeout_s, const char *const *args) {
    const char *argv[32] = {getenv("SPEEDCTL"), "top"};
    int n = 2;
    for (int i = 0; args[i] && n < 30; i++) argv[n++] = args[i];
    argv[n] = NULL;
    memset(r, 0, sizeof *r);
    int fd = -1;
    char err[800];
    snprintf(err, sizeof err, "%s/top.err", cu_dir);
    tu_spawn_params_t sp = {.stdout_fd_p = &fd, .err_path = err, .die_with_parent = true};
    double t0 = now_s();
    pid_t pid = tu_spawn(argv, &sp);
    if (pid < 0) exit(1);
    size_t len = 0;
    tu_read_until(fd, r->out, sizeof r->out, &len, NULL, t0 + timeout_s);
    close(fd);
    int st;
    if (!tu_wait_pid(pid, t0 + timeout_s - now_s() > 0 ? t0 + timeout_s - now_s() : 0.1, &st)) {
        kill(pid, SIGKILL);
        tu_wait_pid(pid, 5, &st);
        r->rc = -1;
    } else {
        r->rc = tu_exit_code(st);
    }
    r->seconds = now_s() - t0;
    r->json = json_loads(r->out, 0, NULL);
    if (r->rc != 0) {
        char *e = tu_read(err, NULL);
        fprintf(stderr, "speedctl top exited %d; stderr:\n%s\n", r->rc, e ? e : "");
        free(e);
    }
}

/* The first node of `role` in top's JSON, or NULL. */
static json_t *node_of(json_t *j, const char *role) {
    size_t i;
    json_t *n;
    json_array_foreach(json_object_get(j, "nodes"), i, n) {
        const char *r = json_string_value(json_object_get(n, "role"));
        if (r && strcmp(r, role) == 0) return n;
    }
    return NULL;
}

static const char *node_state(json_t *j, const char *role) {
    const char *s = json_string_value(json_object_get(node_of(j, role), "state"));
    return s ? s : "";
}

static double num(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static void write_yaml(void) {
    snprintf(g_yaml, sizeof g_yaml, "%s/cluster.yaml", cu_dir);
    char text[1024];
    snprintf(text, sizeof text,
             "host: 127.0.0.1\nmodel: %s/model\nrouter: {port: %d}\n"
             "prefill: {replicas: 1, grpc_port: %d, http_port: %d}\n"
             "decode: {replicas: 1, grpc_port: %d, http_port: %d}\n",
             cu_dir, g_rport, cu_pre_grpc(&g_c, 0), cu_pre_http(&g_c, 0), cu_dec_grpc(&g_c, 0), cu_dec_http(&g_c, 0));
    tu_write_text(g_yaml, text);
}

static bool start_cluster(void) {
    const char *extra[] = {"--decode.kv_tokens",
                           "16384",
                           "--prefill.kv_tokens",
                           "8192",
                           "--router.status_interval_ms",
                           "200",
                           "--speed.prefill_layers",
                           "3",
                           "--speed.anchors",
                           "1",
                           "--speed.tail",
                           "1",
                           NULL};
    cu_cluster_init(&g_c, 1, 1, extra);
    if (!cu_cluster_start_nodes(&g_c, 60)) return false;
    bool ok = false;
    g_router = cu_cluster_router(&g_c, 0, NULL, 30, &ok);
    g_rport = cu_router_port(&g_c, 0);
    write_yaml();
    return ok;
}

/* One completion; its completion_tokens, or -1. */
static int complete(int max_tokens) {
    char body[256];
    snprintf(body, sizeof body,
             "{\"model\":\"model\",\"prompt\":\"hello world, this is speedctl top\",\"max_tokens\":%d}", max_tokens);
    cu_resp_t r;
    bool ok = cu_post(g_rport, "/v1/completions", body, &r) && r.status == 200;
    int n = ok ? (int)json_integer_value(json_object_get(json_object_get(r.json, "usage"), "completion_tokens")) : -1;
    cu_resp_free(&r);
    return n;
}

/* ---- json ------------------------------------------------------------------------------- */

static int test_json(void) {
    CHECK_MSG(start_cluster(), "the cluster did not start");
    enum { N = 6 };
    int generated = 0;
    for (int i = 0; i < N; i++) {
        int k = complete(8 + i);
        CHECK(k > 0);
        generated += k;
    }
    /* 1 */
    top_run_t *r = speed_malloc(sizeof *r);
    const char *a1[] = {g_yaml, "--once", "--json", "--interval", "200", NULL};
    top_run(r, 20, a1);
    CHECK_INT_EQ(r->rc, 0);
    CHECK_MSG(r->json, "not JSON: %s", r->out);
    if (r->json) {
        json_t *rt = json_object_get(r->json, "router");
        CHECK_STR_EQ(json_string_value(json_object_get(rt, "state")), "up");
        CHECK_NEAR(num(rt, "requests_total"), N, 0);
        CHECK_INT_EQ((int)json_object_size(json_object_get(rt, "errors")), 0);
        CHECK_NEAR(num(rt, "generated_tokens_total"), generated, 0);
        CHECK_NEAR(num(rt, "requests_per_s"), 0, 0); /* idle during the window */
        CHECK(num(rt, "kv_bytes_shipped_total") > 0);
        json_t *ttft = json_object_get(rt, "ttft_s");
        CHECK(num(ttft, "p50") > 0 && num(ttft, "p90") >= num(ttft, "p50"));
        CHECK(json_is_false(json_object_get(ttft, "window"))); /* nothing in the window: the totals */
        CHECK_NEAR(num(r->json, "nodes_up"), 2, 0);
        CHECK_STR_EQ(node_state(r->json, "prefill"), "up");
        CHECK_STR_EQ(node_state(r->json, "decode"), "up");
        json_t *pre = node_of(r->json, "prefill"), *dec = node_of(r->json, "decode");
        CHECK_NEAR(num(pre, "requests_total"), N, 0);
        CHECK_NEAR(num(dec, "requests_total"), N, 0);
        CHECK_NEAR(num(dec, "tokens_total"), generated, 0);
        CHECK(json_is_true(json_object_get(pre, "router_up")) && json_is_true(json_object_get(dec, "router_up")));
        CHECK_NEAR(num(dec, "kv_used_ratio"), 0, 0);
        CHECK(r->seconds < 10);
        /* the operator metrics: C = 3 of 4 layers, one anchor and one tail token at full depth,
         * so of P prompt tokens in N prompts P - 2N ran shallow */
        double P = cu_metric(g_rport, "speed_router_prompt_tokens_total");
        CHECK(P > 2 * N);
        CHECK_NEAR(num(r->json, "shallow_prompt_token_share"), (P - 2 * N) / P, 1e-9);
        CHECK(num(rt, "kv_bytes_saved_total") > 0);
        CHECK(json_is_object(json_object_get(rt, "tpot_s")) && num(json_object_get(rt, "tpot_s"), "p50") > 0);
        CHECK(num(dec, "step_p50_s") > 0 && num(pre, "step_p50_s") > 0);
        CHECK(num(dec, "batch_mean") >= 1);
        CHECK_NEAR(num(dec, "tokens_in_flight"), 0, 0);
    }
    json_decref(r->json);

    /* 2: the same endpoints by hand */
    char router[64], nodes[128];
    snprintf(router, sizeof router, "127.0.0.1:%d", g_rport);
    snprintf(nodes, sizeof nodes, "127.0.0.1:%d, 127.0.0.1:%d", cu_dec_http(&g_c, 0), cu_pre_http(&g_c, 0));
    const char *a2[] = {"--router", router, "--node", nodes, "--once", "--json", "--interval", "100", NULL};
    top_run(r, 20, a2);
    CHECK_INT_EQ(r->rc, 0);
    if (r->json) {
        json_t *n0 = json_array_get(json_object_get(r->json, "nodes"), 0);
        CHECK_STR_EQ(json_string_value(json_object_get(n0, "role")), "decode");
        CHECK_STR_EQ(node_state(r->json, "prefill"), "up");
        CHECK_NEAR(num(json_object_get(r->json, "router"), "requests_total"), N, 0);
        CHECK(json_is_null(json_object_get(n0, "router_up"))); /* unknown without the gRPC address */
    }
    json_decref(r->json);

    /* 3: a node that accepts but never answers */
    kill(g_c.pre[0].pid, SIGSTOP);
    const char *a3[] = {g_yaml, "--once", "--json", "--interval", "100", "--timeout-ms", "300", NULL};
    top_run(r, 20, a3);
    kill(g_c.pre[0].pid, SIGCONT);
    CHECK_INT_EQ(r->rc, 0);
    CHECK_STR_EQ(node_state(r->json, "prefill"), "unreachable");
    CHECK_STR_EQ(node_state(r->json, "decode"), "up");
    CHECK_MSG(r->seconds < 4, "top took %.1f s with a stopped node", r->seconds);
    json_decref(r->json);

    /* 4: a dead decode node */
    CHECK_INT_EQ(cu_stop(&g_c.dec[0], SIGKILL, 10), 128 + SIGKILL);
    double t0 = now_s();
    const char *a4[] = {g_yaml, "--once", "--json", "--interval", "100", NULL};
    for (;;) { /* down at once; the router's view follows its next status poll */
        top_run(r, 20, a4);
        CHECK_INT_EQ(r->rc, 0);
        CHECK_STR_EQ(node_state(r->json, "decode"), "down");
        bool routed = json_is_true(json_object_get(node_of(r->json, "decode"), "router_up"));
        if (!routed || now_s() - t0 > 20 || check_failures_) {
            CHECK_MSG(!routed, "the router still routes to the dead decode node");
            break;
        }
        json_decref(r->json);
    }
    CHECK_NEAR(num(r->json, "nodes_up"), 1, 0);
    CHECK_STR_EQ(node_state(r->json, "prefill"), "up");
    json_decref(r->json);

    /* the live view without a terminal: --iterations frames, then the screen given back */
    const char *a5[] = {g_yaml, "--iterations", "2", "--interval", "100", NULL};
    top_run(r, 20, a5);
    CHECK_INT_EQ(r->rc, 0);
    const char *second = strstr(r->out, "speedctl top - cluster.yaml");
    CHECK(second && strstr(second + 1, "speedctl top - cluster.yaml"));
    CHECK(strstr(r->out, "\033[?1049l") != NULL);
    json_decref(r->json);

    /* 6 */
    const char *b1[] = {g_yaml, "--json", NULL};
    top_run(r, 10, b1);
    CHECK_INT_EQ(r->rc, 2);
    const char *b2[] = {"--once", NULL};
    top_run(r, 10, b2);
    CHECK_INT_EQ(r->rc, 2);
    const char *b3[] = {"--router", "nocolon", "--once", NULL};
    top_run(r, 10, b3);
    CHECK_INT_EQ(r->rc, 2);
    const char *b4[] = {"--node", "127.0.0.1:99999", "--once", NULL};
    top_run(r, 10, b4);
    CHECK_INT_EQ(r->rc, 2);
    const char *b5[] = {g_yaml, "--bogus", "--once", NULL};
    top_run(r, 10, b5);
    CHECK_INT_EQ(r->rc, 2);
    speed_free(r);
    return 0;
}

/* ---- tmux ------------------------------------------------------------------------------- */

static void tmux_kill(void) {
    if (g_sock[0]) tu_system("tmux -L %s kill-server >/dev/null 2>&1", g_sock);
}

static atomic_bool g_load_stop;

static void *load_thread(void *arg) {
    (void)arg;
    while (!atomic_load(&g_load_stop)) complete(1500);
    return NULL;
}

/* The pane's text (joined lines: a wrapped line shows as one longer than the pane). */
static char *capture(const char *session) {
    char path[700];
    snprintf(path, sizeof path, "%s/pane.txt", cu_dir);
    if (tu_system("tmux -L %s capture-pane -p -J -t %s > %s 2>/dev/null", g_sock, session, path) != 0) return NULL;
    return tu_read(path, NULL);
}

/* The pane line that starts with `start`, copied into buf ("" when none). */
static const char *pane_line(const char *pane, const char *start, char *buf, size_t size) {
    buf[0] = '\0';
    for (const char *p = pane; p && *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (strncmp(p, start, strlen(start)) == 0) {
            snprintf(buf, size, "%.*s", (int)len, p);
            return buf;
        }
        p = nl ? nl + 1 : NULL;
    }
    return buf;
}

static int longest_line(const char *pane) {
    int best = 0;
    for (const char *p = pane; p && *p;) {
        const char *nl = strchr(p, '\n');
        int len = nl ? (int)(nl - p) : (int)strlen(p);
        if (len > best) best = len;
        p = nl ? nl + 1 : NULL;
    }
    return best;
}

typedef struct {
    bool nodes_up, rate, kv, decode_down, header;
    char last[8192];
} screen_t;

static void screen_read(const char *session, screen_t *s) {
    char *pane = capture(session);
    memset(s, 0, sizeof *s);
    if (!pane) return;
    snprintf(s->last, sizeof s->last, "%s", pane);
    char pre[512], dec[512], rt[512];
    pane_line(pane, "prefill ", pre, sizeof pre);
    pane_line(pane, "decode ", dec, sizeof dec);
    pane_line(pane, "router ", rt, sizeof rt);
    s->header = strstr(pane, "speedctl top - cluster.yaml") != NULL;
    s->nodes_up = strstr(pre, " up ") && strstr(dec, " up ");
    const char *q = strstr(rt, "req/s ");
    s->rate = q && atof(q + 6) > 0;
    s->kv = strstr(dec, "[#") != NULL;
    s->decode_down = strstr(dec, " down ") != NULL;
    free(pane);
}

/* Starts top in a new detached session `name` of cols x 40: its exit code goes to <name>.rc
 * and `stty -a` run right after it (same terminal) to <name>.stty (renamed into place whole). */
static bool session_start(const char *name, int cols) {
    return tu_system("cd %s && tmux -L %s new-session -d -s %s -c . -x %d -y 40 "
                     "\"'%s' top '%s' --interval 250; echo \\$? > %s.rc; stty -a > %s.tmp; mv %s.tmp %s.stty\"",
                     cu_dir, g_sock, name, cols, getenv("SPEEDCTL"), g_yaml, name, name, name, name) == 0;
}

/* Whether stty's output has `word` on (a whole word, not "-word"). */
static bool has_word(const char *text, const char *word) {
    size_t n = strlen(word);
    for (const char *p = text; (p = strstr(p, word)); p += n) {
        bool start = p == text || p[-1] == ' ' || p[-1] == '\n';
        bool end = !p[n] || p[n] == ' ' || p[n] == '\n' || p[n] == ';';
        if (start && end) return true;
    }
    return false;
}

/* Waits for <name>.rc; checks top exited 0 and left the terminal in cooked mode with echo. */
static void session_check_exit(const char *name) {
    char rc_path[700], stty_path[700];
    snprintf(rc_path, sizeof rc_path, "%s/%s.rc", cu_dir, name);
    snprintf(stty_path, sizeof stty_path, "%s/%s.stty", cu_dir, name);
    double t0 = now_s();
    char *stty = NULL;
    while (now_s() - t0 < 15 && !(stty = tu_read(stty_path, NULL))) usleep(50000);
    char *rc = tu_read(rc_path, NULL);
    CHECK_MSG(rc && atoi(rc) == 0 && isdigit((unsigned char)rc[0]), "%s: top did not exit 0 (rc file: %s)", name,
              rc ? rc : "missing");
    CHECK_MSG(stty && has_word(stty, "icanon") && has_word(stty, "echo") && has_word(stty, "isig"),
              "%s: the terminal was left in raw mode: %s", name, stty ? stty : "(no stty output)");
    free(rc);
    free(stty);
}

/* The pid of top: the child of the pane's shell. */
static pid_t top_pid(const char *session) {
    char path[700];
    snprintf(path, sizeof path, "%s/pane.pid", cu_dir);
    if (tu_system("tmux -L %s display-message -p -t %s '#{pane_pid}' > %s", g_sock, session, path) != 0) return -1;
    char *s = tu_read(path, NULL);
    int shell = s ? atoi(s) : 0;
    free(s);
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", shell, shell);
    s = tu_read(path, NULL);
    pid_t pid = s ? (pid_t)atoi(s) : -1;
    free(s);
    return pid > 0 ? pid : -1;
}

static int test_tmux(void) {
    if (tu_system("tmux -V >/dev/null 2>&1") != 0) {
        fprintf(stderr, "SKIP: tmux is not installed (deploy/setup.sh installs it)\n");
        return 77;
    }
    snprintf(g_sock, sizeof g_sock, "speedtop-%d", (int)getpid());
    atexit(tmux_kill);
    CHECK_MSG(start_cluster(), "the cluster did not start");
    if (check_failures_) return 1;
    /* a session that outlives top's, so that the server stays up between them (a new server
     * racing the exit of the last one can refuse the next session) */
    CHECK_MSG(tu_system("tmux -L %s new-session -d -s hold 'sleep 600'", g_sock) == 0, "tmux new-session failed");
    CHECK_MSG(session_start("a", 120), "tmux new-session failed");
    pthread_t load[2];
    for (int i = 0; i < 2; i++) pthread_create(&load[i], NULL, load_thread, NULL);
    /* both nodes up, a request rate, KV in use: each shows within a few frames of load */
    screen_t s;
    bool seen_up = false, seen_rate = false, seen_kv = false;
    double t0 = now_s();
    while (now_s() - t0 < 40 && !(seen_up && seen_rate && seen_kv)) {
        screen_read("a", &s);
        seen_up |= s.nodes_up;
        seen_rate |= s.rate;
        seen_kv |= s.kv;
        CHECK_MSG(longest_line(s.last) <= 120, "a line is wider than the pane:\n%s", s.last);
        usleep(100000);
    }
    CHECK_MSG(s.header, "no header:\n%s", s.last);
    CHECK_MSG(seen_up, "the nodes never showed up:\n%s", s.last);
    CHECK_MSG(seen_rate, "no request rate:\n%s", s.last);
    CHECK_MSG(seen_kv, "no KV use:\n%s", s.last);
    atomic_store(&g_load_stop, true);
    /* a killed decode node: its row turns down */
    CHECK_INT_EQ(cu_stop(&g_c.dec[0], SIGKILL, 10), 128 + SIGKILL);
    for (int i = 0; i < 2; i++) pthread_join(load[i], NULL);
    t0 = now_s();
    do {
        screen_read("a", &s);
        if (!s.decode_down) usleep(100000);
    } while (!s.decode_down && now_s() - t0 < 15);
    CHECK_MSG(s.decode_down, "the dead decode node is not shown down:\n%s", s.last);
    /* a narrower window (SIGWINCH): the next frame fits it */
    CHECK_INT_EQ(tu_system("tmux -L %s resize-window -t a -x 72 -y 30", g_sock), 0);
    t0 = now_s();
    do {
        screen_read("a", &s);
        if (longest_line(s.last) > 72) usleep(100000);
    } while (longest_line(s.last) > 72 && now_s() - t0 < 10);
    CHECK_MSG(longest_line(s.last) <= 72 && s.header, "the frame did not follow the resize:\n%s", s.last);
    tu_system("tmux -L %s send-keys -t a q", g_sock);
    session_check_exit("a");

    /* Ctrl-C in a narrow pane */
    CHECK_MSG(session_start("b", 60), "tmux new-session failed");
    t0 = now_s();
    do {
        screen_read("b", &s);
        if (!strstr(s.last, "prefill ")) usleep(100000);
    } while (!strstr(s.last, "prefill ") && now_s() - t0 < 15);
    CHECK_MSG(strstr(s.last, "speedctl top - cluster.yaml"), "no frame in the narrow pane:\n%s", s.last);
    CHECK_MSG(longest_line(s.last) <= 60, "a line is wider than the 60-column pane:\n%s", s.last);
    tu_system("tmux -L %s send-keys -t b C-c", g_sock);
    session_check_exit("b");

    /* SIGTERM */
    CHECK_MSG(session_start("c", 100), "tmux new-session failed");
    t0 = now_s();
    do {
        screen_read("c", &s);
        if (!strstr(s.last, "prefill ")) usleep(100000);
    } while (!strstr(s.last, "prefill ") && now_s() - t0 < 15);
    pid_t pid = top_pid("c");
    CHECK_MSG(pid > 0, "no top process in pane c");
    if (pid > 0) kill(pid, SIGTERM);
    session_check_exit("c");
    tmux_kill();
    CHECK_MSG(tu_system("tmux -L %s has-session >/dev/null 2>&1", g_sock) != 0, "the tmux server is still running");
    g_sock[0] = '\0';
    return 0;
}

int main(int argc, char **argv) {
    speed_log_configure("error");
    bool tmux = argc > 1 && strcmp(argv[1], "tmux") == 0;
    if (tmux && tu_system("tmux -V >/dev/null 2>&1") != 0) {
        fprintf(stderr, "SKIP: tmux is not installed (deploy/setup.sh installs it)\n");
        return 77;
    }
    cu_init(tmux ? "top-tmux" : "top-json");
    int rc = tmux ? test_tmux() : test_json();
    if (rc == 77) return 77;
    if (g_router.pid > 0) cu_stop(&g_router, SIGTERM, 10);
    for (int i = 0; i < g_c.np; i++) cu_stop(&g_c.pre[i], SIGTERM, 10);
    for (int i = 0; i < g_c.nd; i++) cu_stop(&g_c.dec[i], SIGTERM, 10);
    tmux_kill();
    int done = CHECK_DONE();
    cu_cleanup(done != 0);
    return done;
}
