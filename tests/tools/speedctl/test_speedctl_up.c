/* speedctl up end to end: a real 1P1D cluster (speed-decode, speed-prefill, speed-router)
 * started from deploy/clusters/1p1d.yaml on ports taken from this test's pid, used through the
 * router's OpenAI API, stopped with SIGTERM; then the startup failures (bad model directory,
 * a port already taken with --no-restart, no speed-router next to speedctl, router.port 0); then
 * supervision on a 1P2D cluster: a SIGKILLed decode node and router restarted while the rest
 * serve, and a decode node that cannot start retried, then given up.
 *
 * Nothing here may hang: speedctl's stdout is read with a deadline, and every speedctl this
 * test starts is killed (with its process group's daemons, by pid) when a step fails. */
#include <errno.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "daemon_client.h"
#include "http.h"
#include "test_clock.h"
#include "test_fs.h"
#include "test_proc.h"
#include "tls.h"

#define MAX_PIDS 16

static const char *speedctl;
static char dir[600], model[700], src_dir[600];
static int port_base;

/* A running `speedctl up`: its stdout through a pipe (read with deadlines), stderr in a file.
 * out starts with a '\n', so that every whole line of it, the first too, reads "\nLINE\n". */
typedef struct {
    pid_t pid;
    int out_fd;
    char out[65536];
    size_t out_len;
    char err_path[800], log_dir[800];
    int rc;               /* exit code once waited; -1 before */
    pid_t pids[MAX_PIDS]; /* daemons, from its "started NAME (pid N)" lines */
    int n_pids;
} up_run_t;

/* Starts `BIN up CONFIG ARGS...` (extra NULL-terminated). 1p1d.yaml: ports ports..ports+4;
 * 1p2d.yaml: ports..ports+6 (the decode replicas take grpc +3, +4 and http +5, +6). */
static void up_start_cfg(up_run_t *r, const char *bin, const char *cfg, int ports, const char *const *extra) {
    memset(r, 0, sizeof *r);
    r->rc = -1;
    static int n_runs;
    snprintf(r->err_path, sizeof r->err_path, "%s/up-%d.err", dir, n_runs);
    snprintf(r->log_dir, sizeof r->log_dir, "%s/logs-%d", dir, n_runs++);
    bool two = strstr(cfg, "1p2d") != NULL;
    char p[5][16];
    for (int i = 0; i < 5; i++) snprintf(p[i], sizeof p[i], "%d", ports + (two && i == 4 ? 5 : i));
    const char *argv[64] = {bin,       "up",
                            cfg,       "--model",
                            model,     "--router.port",
                            p[0],      "--prefill.grpc_port",
                            p[1],      "--prefill.http_port",
                            p[2],      "--decode.grpc_port",
                            p[3],      "--decode.http_port",
                            p[4],      "--stop-timeout-s",
                            "20",      "--log-dir",
                            r->log_dir};
    int n = 19;
    for (int i = 0; extra && extra[i] && n < 62; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    r->out[0] = '\n';
    r->out_len = 1;
    tu_spawn_params_t sp = {.cwd = src_dir, .err_path = r->err_path, .stdout_fd_p = &r->out_fd};
    r->pid = tu_spawn(argv, &sp);
    if (r->pid < 0) exit(1);
}

static void up_start(up_run_t *r, const char *bin, int ports, const char *const *extra) {
    up_start_cfg(r, bin, "deploy/clusters/1p1d.yaml", ports, extra);
}

/* Reads speedctl's stdout until it holds `text` anywhere, EOF, or the deadline. */
static bool up_read_text(up_run_t *r, const char *text, double timeout_s) {
    if (r->out_fd >= 0 &&
        (tu_read_until(r->out_fd, r->out, sizeof r->out, &r->out_len, text, now_s() + timeout_s) < 0 ||
         r->out_len + 1 >= sizeof r->out)) {
        close(r->out_fd);
        r->out_fd = -1;
    }
    return strstr(r->out, text) != NULL;
}

/* Reads speedctl's stdout until `line` is a whole line of it, EOF, or the deadline. */
static bool up_read_until(up_run_t *r, const char *line, double timeout_s) {
    char want[128];
    snprintf(want, sizeof want, "\n%s\n", line);
    /* Stop reading at EOF, and when the buffer is full: with the pipe closed speedctl's next
     * write fails instead of blocking forever. */
    if (r->out_fd >= 0 &&
        (tu_read_until(r->out_fd, r->out, sizeof r->out, &r->out_len, want, now_s() + timeout_s) < 0 ||
         r->out_len + 1 >= sizeof r->out)) {
        close(r->out_fd);
        r->out_fd = -1;
    }
    return strstr(r->out, want) != NULL;
}

static void up_parse_pids(up_run_t *r) {
    r->n_pids = 0;
    for (const char *s = r->out; (s = strstr(s, "started ")) && r->n_pids < MAX_PIDS; s++) {
        const char *pid = strstr(s, "(pid ");
        const char *nl = strchr(s, '\n');
        if (pid && (!nl || pid < nl)) r->pids[r->n_pids++] = (pid_t)atoi(pid + 5);
    }
}

/* Waits up to timeout_s for speedctl to exit; on timeout kills it and its daemons. */
static int up_wait(up_run_t *r, double timeout_s) {
    double deadline = now_s() + timeout_s;
    for (;;) {
        if (r->out_fd >= 0) up_read_until(r, "\x01never", 0.05); /* keep the pipe drained */
        int st;
        if (tu_wait_pid(r->pid, 0, &st)) {
            r->rc = tu_exit_code(st);
            break;
        }
        if (now_s() > deadline) {
            fprintf(stderr, "speedctl up (pid %d) did not exit within %.0f s: killing it\n", (int)r->pid, timeout_s);
            up_parse_pids(r);
            for (int i = 0; i < r->n_pids; i++) kill(r->pids[i], SIGKILL);
            kill(r->pid, SIGKILL);
            waitpid(r->pid, &st, 0);
            r->rc = -1;
            break;
        }
        if (r->out_fd < 0) usleep(50000);
    }
    if (r->out_fd >= 0) up_read_until(r, "\x01never", 0.5);
    up_parse_pids(r);
    return r->rc;
}

static void up_show(up_run_t *r) {
    char *err = tu_read(r->err_path, NULL);
    fprintf(stderr, "---- speedctl up stdout ----%s---- stderr (%s) ----\n%s----\n", r->out, r->err_path,
            err ? err : "");
    free(err);
}

/* Every daemon speedctl started is gone (not even a zombie: speedctl reaped it). */
static bool pids_gone(up_run_t *r) {
    bool ok = true;
    for (int i = 0; i < r->n_pids; i++)
        if (kill(r->pids[i], 0) == 0 || errno != ESRCH) {
            fprintf(stderr, "daemon pid %d is still there\n", (int)r->pids[i]);
            ok = false;
        }
    return ok;
}

/* The first block of 5 ports from `start` (in steps of 5) that nothing on this host holds, so
 * a daemon some other test left behind cannot fail this one. */
static int free_block(int start) {
    for (int b = start; b < start + 100; b += 5)
        if (tu_ports_free(b, 5)) return b;
    return start;
}

static bool ports_closed(int base) {
    bool ok = true;
    for (int i = 0; i < 5; i++)
        if (tu_port_open(base + i)) {
            fprintf(stderr, "port %d still accepts connections\n", base + i);
            ok = false;
        }
    return ok;
}

/* "router: http://HOST:PORT" → port, or -1. */
static int router_port(const up_run_t *r) {
    const char *s = strstr(r->out, "\nrouter: http://");
    if (!s) return -1;
    const char *colon = strchr(s + 16, ':');
    return colon ? atoi(colon + 1) : -1;
}

/* The cluster's API key: speedctl up gets it from the environment and the router inherits it. */
#define UP_KEY "up-sekrit-key-1"

static json_t *http_json(int port, const char *method, const char *path, const char *body, int *status_p) {
    cu_resp_t r;
    cu_http(port, method, path, body, "Bearer " UP_KEY, NULL, 60000, &r);
    *status_p = r.status;
    json_t *j = r.json;
    if (r.status && !j) fprintf(stderr, "%s %s: %d, not JSON: %s\n", method, path, r.status, r.body);
    r.json = NULL;
    cu_resp_free(&r);
    return j;
}

/* ---- the cluster, used as a client would ---------------------------------------------------- */

/* The throwaway certificate directories `speedctl up` made under TMPDIR (= dir): any? */
static int cert_dirs(void) { return tu_system("ls -d '%s'/speedctl-certs-* > /dev/null 2>&1", dir) == 0 ? 1 : 0; }

static void test_cluster(void) {
    up_run_t r;
    int ports = free_block(port_base);
    /* With an API key (environment only) and the router's health on its metrics port. */
    char mport[16];
    snprintf(mport, sizeof mport, "%d", ports + 5);
    setenv("SPEED_ROUTER_API_KEYS", UP_KEY, 1);
    up_start(&r, speedctl, ports,
             (const char *const[]){"--start-timeout-s", "100", "--router.metrics_port", mport, NULL});
    unsetenv("SPEED_ROUTER_API_KEYS");
    bool ready = up_read_until(&r, "ready", 150);
    CHECK_MSG(ready, "speedctl up did not print 'ready' (is build/bin/speed-router built?)");
    int port = router_port(&r);
    CHECK_INT_EQ(port, ports);
    char want[64];
    snprintf(want, sizeof want, "\nrouter: http://127.0.0.1:%d\n", ports);
    CHECK_CONTAINS(r.out, want);
    up_parse_pids(&r);
    CHECK_INT_EQ(r.n_pids, 3);
    /* the control plane runs mTLS on throwaway certificates, private to this run */
    CHECK_CONTAINS(r.out, "\ncontrol plane: mutual TLS, throwaway certificates for this run\n");
    CHECK_INT_EQ(cert_dirs(), 1);
    CHECK_INT_EQ(tu_system("test \"$(stat -c %%a '%s'/speedctl-certs-*)\" = 700 && "
                           "test \"$(stat -c %%a '%s'/speedctl-certs-*/router.key)\" = 600",
                           dir, dir),
                 0);
    CHECK_INT_EQ(tu_system("grep -q -- '--tls.cert' /proc/%d/cmdline", (int)r.pids[0]), 0);
    if (ready && port > 0) {
        int status = 0;
        char *body = NULL;
        CHECK(speed_http_get("127.0.0.1", (uint16_t)(ports + 5), "/health", 5000, &status, &body) == SPEED_OK);
        CHECK_INT_EQ(status, 200);
        speed_free(body);
        /* the API wants the key, even for /health */
        CHECK(speed_http_get("127.0.0.1", (uint16_t)port, "/health", 5000, &status, NULL) == SPEED_OK);
        CHECK_INT_EQ(status, 401);
        /* no child carries the key on its command line */
        for (int i = 0; i < r.n_pids; i++) {
            char path[64];
            snprintf(path, sizeof path, "/proc/%d/cmdline", (int)r.pids[i]);
            size_t n = 0;
            char *cmd = tu_read(path, &n);
            CHECK(cmd != NULL);
            for (size_t k = 0; cmd && k < n; k++)
                if (cmd[k] == '\0') cmd[k] = ' ';
            CHECK_MSG(cmd && !strstr(cmd, "sekrit"), "pid %d has the key in its argv", (int)r.pids[i]);
            free(cmd);
        }

        json_t *models = http_json(port, "GET", "/v1/models", NULL, &status);
        CHECK_INT_EQ(status, 200);
        json_t *data = json_object_get(models, "data");
        CHECK(json_is_array(data) && json_array_size(data) == 1);
        CHECK_STR_EQ(json_string_value(json_object_get(json_array_get(data, 0), "id")), "model");
        json_decref(models);

        const char *req = "{\"model\": \"model\", \"max_tokens\": 8, \"temperature\": 0,"
                          " \"messages\": [{\"role\": \"user\", \"content\": \"Say hello to the cluster.\"}]}";
        json_t *chat = http_json(port, "POST", "/v1/chat/completions", req, &status);
        CHECK_INT_EQ(status, 200);
        json_t *choices = json_object_get(chat, "choices");
        CHECK(json_is_array(choices) && json_array_size(choices) == 1);
        json_t *msg = json_object_get(json_array_get(choices, 0), "message");
        CHECK(json_is_string(json_object_get(msg, "content")));
        json_t *usage = json_object_get(chat, "usage");
        CHECK(json_integer_value(json_object_get(usage, "completion_tokens")) >= 1);
        /* 1p1d.yaml runs SPEED at 0.75 of the layers: fewer bytes shipped than at full depth */
        json_int_t kv = json_integer_value(json_object_get(usage, "kv_bytes"));
        json_int_t full = json_integer_value(json_object_get(usage, "kv_full_depth_bytes"));
        CHECK_MSG(kv > 0 && kv < full, "usage.kv_bytes %lld, kv_full_depth_bytes %lld", (long long)kv, (long long)full);
        json_decref(chat);
    }

    kill(r.pid, SIGTERM);
    int rc = up_wait(&r, 90);
    CHECK_INT_EQ(rc, 0);
    CHECK_CONTAINS(r.out, "\nstopped\n");
    CHECK_CONTAINS(r.out, "stopped router");
    CHECK(pids_gone(&r));
    CHECK(ports_closed(ports));
    CHECK_INT_EQ(cert_dirs(), 0); /* removed at exit */
    if (check_failures_) up_show(&r);
}

/* speedctl certs: every identity of the cluster file, keys 0600, loadable against the CA; no
 * overwrite without --force; usage errors. */
static void test_certs(void) {
    char pki[800], path[900];
    snprintf(pki, sizeof pki, "%s/pki", dir);
    CHECK_INT_EQ(tu_system("cd '%s' && '%s' certs --config deploy/clusters/1p1d.yaml --out '%s' --host 10.1.2.3,"
                           "node1.internal > '%s/certs.out' 2>&1",
                           src_dir, speedctl, pki, dir),
                 0);
    const char *names[] = {"router", "admin", "prefill-0", "decode-0"};
    for (int i = 0; i < 4; i++) {
        char crt[900], key[900], err[512] = "";
        snprintf(path, sizeof path, "%s/ca.crt", pki);
        snprintf(crt, sizeof crt, "%s/%s.crt", pki, names[i]);
        snprintf(key, sizeof key, "%s/%s.key", pki, names[i]);
        speed_tls_creds_t c = {0};
        CHECK_MSG(speed_tls_creds_load(path, crt, key, &c, err, sizeof err) == SPEED_OK, "%s: %s", names[i], err);
        CHECK_STR_EQ(c.cn, names[i]);
        speed_tls_creds_cleanup(&c);
        struct stat st;
        CHECK(stat(key, &st) == 0 && (st.st_mode & 0777) == 0600);
    }
    struct stat st;
    snprintf(path, sizeof path, "%s/ca.key", pki);
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
    CHECK(stat(pki, &st) == 0 && (st.st_mode & 0777) == 0700);
    snprintf(path, sizeof path, "%s/prefill-1.crt", pki); /* 1p1d: one replica each */
    CHECK(stat(path, &st) != 0);
    /* again: refused, then --force */
    CHECK_INT_EQ(tu_system("cd '%s' && '%s' certs --config deploy/clusters/1p1d.yaml --out '%s' > '%s/certs2.out' 2>&1",
                           src_dir, speedctl, pki, dir),
                 1);
    CHECK_INT_EQ(tu_system("grep -q 'exists (use --force' '%s/certs2.out'", dir), 0);
    CHECK_INT_EQ(tu_system("cd '%s' && '%s' certs --config deploy/clusters/1p1d.yaml --out '%s' --force > /dev/null "
                           "2>&1",
                           src_dir, speedctl, pki),
                 0);
    CHECK_INT_EQ(tu_system("cd '%s' && '%s' certs --out '%s' > /dev/null 2>&1", src_dir, speedctl, pki), 2);
    CHECK_INT_EQ(
        tu_system("cd '%s' && '%s' certs --config deploy/clusters/1p1d.yaml > /dev/null 2>&1", src_dir, speedctl), 2);
}

/* ---- startup failures ------------------------------------------------------------------------ */

static void test_bad_model(void) {
    up_run_t r;
    char bad[800];
    snprintf(bad, sizeof bad, "%s/no-such-model", dir);
    /* --model given twice: the later one wins, as on any command line */
    up_start(&r, speedctl, port_base + 200, (const char *const[]){"--model", bad, NULL});
    int rc = up_wait(&r, 30);
    CHECK_INT_EQ(rc, 1);
    char *err = tu_read(r.err_path, NULL);
    CHECK_CONTAINS(err, "no-such-model");
    CHECK_CONTAINS(err, "does not exist");
    CHECK_INT_EQ(r.n_pids, 0);
    free(err);
}

static void test_port_taken(void) {
    int ports = free_block(port_base + 100);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)(ports + 2))}; /* prefill-0 http */
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 4) != 0) {
        fprintf(stderr, "SKIP port-taken case: cannot take port %d: %s\n", ports + 2, strerror(errno));
        close(fd);
        return;
    }
    up_run_t r;
    /* --no-restart: the behaviour before supervision, a failed start stops everything */
    up_start(&r, speedctl, ports, (const char *const[]){"--start-timeout-s", "60", "--no-restart", NULL});
    int rc = up_wait(&r, 120);
    close(fd);
    CHECK_INT_EQ(rc, 1);
    char *err = tu_read(r.err_path, NULL);
    CHECK_CONTAINS(err, "prefill-0");
    CHECK_CONTAINS(err, "during startup");
    CHECK_CONTAINS(err, "stopping the cluster");
    CHECK(r.n_pids >= 2); /* both nodes were started; the router never was */
    CHECK(strstr(r.out, "started router") == NULL);
    CHECK(pids_gone(&r));
    CHECK(ports_closed(ports));
    if (check_failures_) up_show(&r);
    free(err);
}

/* ---- supervision: a 1P2D cluster that loses a process ------------------------------------------ */

static int free_block10(int start) {
    for (int b = start; b < start + 200; b += 10)
        if (tu_ports_free(b, 10)) return b;
    return start;
}

/* `started NAME (pid N)` lines for NAME in speedctl's output, in order; returns how many. */
static int started_pids(const up_run_t *r, const char *name, pid_t *out, int cap) {
    char want[64];
    snprintf(want, sizeof want, "\nstarted %s (pid ", name);
    int n = 0;
    for (const char *s = r->out; (s = strstr(s, want)) && n < cap; s++) out[n++] = (pid_t)atoi(s + strlen(want));
    return n;
}

static bool chat_ok(int port) {
    int status = 0;
    const char *req = "{\"model\": \"model\", \"max_tokens\": 4, \"temperature\": 0,"
                      " \"messages\": [{\"role\": \"user\", \"content\": \"Still there?\"}]}";
    json_t *j = http_json(port, "POST", "/v1/chat/completions", req, &status);
    json_decref(j);
    if (status != 200) fprintf(stderr, "chat through the router: %d\n", status);
    return status == 200;
}

/* Every node of the block idle: zero KV blocks reserved (prefill http +2, decode http +5, +6). */
static bool nodes_idle(int ports, bool decode1) {
    bool ok = cu_wait_metric(ports + 2, "speed_kv_blocks_reserved", 0, 20);
    ok &= cu_wait_metric(ports + 5, "speed_kv_blocks_reserved", 0, 20);
    if (decode1) ok &= cu_wait_metric(ports + 6, "speed_kv_blocks_reserved", 0, 20);
    return ok;
}

/* SIGKILL decode-1: speedctl says why it died, restarts it after the backoff (a new pid,
 * healthy on its port again), the others keep their pids and the router serves through
 * decode-0 meanwhile; its speed_router_node_up for decode-1 goes 0, then 1. */
static void test_decode_killed(void) {
    int ports = free_block10(port_base + 2000);
    char mport[16];
    snprintf(mport, sizeof mport, "%d", ports + 7);
    up_run_t r;
    /* a 3 s backoff: long enough for the router's health polls to see the node down */
    up_start_cfg(&r, speedctl, "deploy/clusters/1p2d.yaml", ports,
                 (const char *const[]){"--start-timeout-s", "100", "--router.metrics_port", mport,
                                       "--restart-backoff-ms", "3000", NULL});
    bool ready = up_read_until(&r, "ready", 150);
    CHECK_MSG(ready, "speedctl up (1p2d) did not print 'ready'");
    up_parse_pids(&r);
    CHECK_INT_EQ(r.n_pids, 4);
    pid_t d1[4] = {0}, others[3] = {0};
    started_pids(&r, "decode-0", &others[0], 1);
    started_pids(&r, "prefill-0", &others[1], 1);
    started_pids(&r, "router", &others[2], 1);
    CHECK_INT_EQ(started_pids(&r, "decode-1", d1, 4), 1);
    char up_series[128];
    snprintf(up_series, sizeof up_series, "speed_router_node_up{pool=\"decode\",node=\"127.0.0.1:%d\"}", ports + 4);
    if (ready && d1[0] > 0) {
        CHECK(chat_ok(ports));
        CHECK(cu_wait_metric(ports + 7, up_series, 1, 10));
        double t_kill = now_s();
        CHECK_INT_EQ(kill(d1[0], SIGKILL), 0);
        CHECK_MSG(cu_wait_metric(ports + 7, up_series, 0, 30), "the router never marked decode-1 down");
        CHECK(chat_ok(ports)); /* served by decode-0 */
        CHECK_MSG(up_read_text(&r, "decode-1 healthy again", 90), "decode-1 was not restarted");
        double waited = now_s() - t_kill;
        CHECK_MSG(waited >= 2.9, "decode-1 was healthy again %.1f s after its death, within the 3 s backoff", waited);
        CHECK_INT_EQ(started_pids(&r, "decode-1", d1, 4), 2);
        CHECK(d1[1] > 0 && d1[1] != d1[0] && kill(d1[1], 0) == 0);
        CHECK_MSG(cu_wait_metric(ports + 7, up_series, 1, 30), "the router never marked decode-1 up again");
        for (int i = 0; i < 3; i++) CHECK_MSG(kill(others[i], 0) == 0, "pid %d died with decode-1", (int)others[i]);
        CHECK(kill(r.pid, 0) == 0);
        for (int i = 0; i < 4; i++) CHECK(chat_ok(ports)); /* both decode nodes take requests */
        CHECK(nodes_idle(ports, true));
        /* the router too: restarted with the same certificates and its API port back */
        CHECK_INT_EQ(kill(others[2], SIGKILL), 0);
        CHECK_MSG(up_read_text(&r, "router healthy again", 90), "the router was not restarted");
        pid_t rp[4] = {0};
        CHECK_INT_EQ(started_pids(&r, "router", rp, 4), 2);
        CHECK(rp[1] > 0 && rp[1] != others[2]);
        CHECK(chat_ok(ports));
        for (int i = 0; i < 2; i++) CHECK(kill(others[i], 0) == 0);
    }
    char *err = tu_read(r.err_path, NULL);
    char want[96];
    snprintf(want, sizeof want, "decode-1 (pid %d) was killed by signal 9", (int)d1[0]);
    CHECK_CONTAINS(err, want);
    CHECK_CONTAINS(err, "restarting decode-1 in 3.0 s");
    free(err);
    kill(r.pid, SIGTERM);
    CHECK_INT_EQ(up_wait(&r, 90), 0);
    CHECK_CONTAINS(r.out, "\nstopped\n");
    CHECK(strstr(r.out, "stopped router") < strstr(r.out, "stopped decode-0")); /* in order */
    CHECK(pids_gone(&r));
    CHECK(ports_closed(ports) && ports_closed(ports + 5));
    if (check_failures_) up_show(&r);
}

/* decode-1 cannot start (its gRPC port is taken): retried --restart-max times with backoff,
 * then given up with a message, while the rest of the cluster comes up and serves. */
static void test_node_given_up(void) {
    int ports = free_block10(port_base + 2200);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)(ports + 4))}; /* decode-1 grpc */
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 4) != 0) {
        fprintf(stderr, "SKIP given-up case: cannot take port %d: %s\n", ports + 4, strerror(errno));
        close(fd);
        return;
    }
    up_run_t r;
    up_start_cfg(
        &r, speedctl, "deploy/clusters/1p2d.yaml", ports,
        (const char *const[]){"--start-timeout-s", "100", "--restart-max", "2", "--restart-backoff-ms", "100", NULL});
    bool ready = up_read_until(&r, "ready", 60);
    CHECK_MSG(ready, "speedctl up did not come up without decode-1");
    pid_t d1[8];
    CHECK_INT_EQ(started_pids(&r, "decode-1", d1, 8), 3); /* the start and 2 restarts */
    CHECK_CONTAINS(r.out, "\ndecode-1: given up");
    if (ready) {
        CHECK(chat_ok(ports));
        CHECK(nodes_idle(ports, false));
        CHECK(kill(r.pid, 0) == 0);
    }
    kill(r.pid, SIGTERM);
    int rc = up_wait(&r, 90);
    close(fd);
    CHECK_INT_EQ(rc, 1); /* the cluster was not whole */
    char *err = tu_read(r.err_path, NULL);
    CHECK_CONTAINS(err, "giving up on decode-1: it failed 3 times in a row (--restart-max 2)");
    CHECK_CONTAINS(err, "restarting decode-1 in 0.1 s");
    CHECK_CONTAINS(err, "restarting decode-1 in 0.2 s"); /* doubled */
    CHECK(pids_gone(&r));
    CHECK(ports_closed(ports));
    if (check_failures_) up_show(&r);
    free(err);
}

/* speedctl alone in a directory with the nodes but no router: a clear error, nothing started. */
static void test_no_router(void) {
    char bin_dir[800];
    snprintf(bin_dir, sizeof bin_dir, "%s/bin", dir);
    char speedctl_dir[600];
    snprintf(speedctl_dir, sizeof speedctl_dir, "%s", speedctl);
    char *slash = strrchr(speedctl_dir, '/');
    if (slash) *slash = '\0';
    if (tu_system("mkdir -p '%s' && cp '%s' '%s/speed-decode' '%s/speed-prefill' '%s/'", bin_dir, speedctl,
                  speedctl_dir, speedctl_dir, bin_dir) != 0) {
        fprintf(stderr, "SKIP no-router case: cannot copy the binaries\n");
        return;
    }
    char bin[900];
    snprintf(bin, sizeof bin, "%s/speedctl", bin_dir);
    up_run_t r;
    up_start(&r, bin, port_base + 205, NULL);
    CHECK_INT_EQ(up_wait(&r, 30), 1);
    char *err = tu_read(r.err_path, NULL);
    CHECK_CONTAINS(err, "speed-router not found next to speedctl");
    CHECK_INT_EQ(r.n_pids, 0);
    free(err);
}

/* A key on speedctl's command line would be on the router's too: refused, nothing started. */
static void test_key_on_argv(void) {
    up_run_t r;
    up_start(&r, speedctl, port_base + 220, (const char *const[]){"--router.api_keys", "sekrit-argv", NULL});
    CHECK_INT_EQ(up_wait(&r, 30), 2);
    char *err = tu_read(r.err_path, NULL);
    CHECK_CONTAINS(err, "SPEED_ROUTER_API_KEYS");
    CHECK(err && !strstr(err, "sekrit"));
    CHECK_INT_EQ(r.n_pids, 0);
    free(err);
    /* keys without a metrics port for speedctl to watch the router: refused too */
    setenv("SPEED_ROUTER_API_KEYS", "sekrit-env", 1);
    up_start(&r, speedctl, port_base + 230, NULL);
    unsetenv("SPEED_ROUTER_API_KEYS");
    CHECK_INT_EQ(up_wait(&r, 30), 2);
    err = tu_read(r.err_path, NULL);
    CHECK_CONTAINS(err, "router.metrics_port");
    free(err);
}

static void test_router_port_zero(void) {
    up_run_t r;
    up_start(&r, speedctl, port_base + 210, (const char *const[]){"--router.port", "0", NULL});
    CHECK_INT_EQ(up_wait(&r, 30), 2);
    char *err = tu_read(r.err_path, NULL);
    CHECK_CONTAINS(err, "router.port is 0");
    free(err);
}

int main(void) {
    speedctl = getenv("SPEEDCTL");
    if (!speedctl || !*speedctl) {
        fprintf(stderr, "SKIP: SPEEDCTL is not set (run through ctest)\n");
        return SPEED_TEST_SKIP;
    }
    /* deploy/clusters/1p1d.yaml is found from the source tree (SPEED_SOURCE_DIR from CMake) */
    const char *src = getenv("SPEED_SOURCE_DIR");
    snprintf(src_dir, sizeof src_dir, "%s", src && *src ? src : ".");
    snprintf(dir, sizeof dir, "%s", tu_tmp_init("up"));
    snprintf(model, sizeof model, "%s/model", dir);
    if (tu_system("'%s' make-tiny-model '%s' > '%s/make-model.log' 2>&1", speedctl, model, dir) != 0) {
        fprintf(stderr, "make-tiny-model failed (see %s/make-model.log)\n", dir);
        return 1;
    }
    /* below the ephemeral range (32768+), so a client socket cannot hold one of ours */
    port_base = 20000 + (int)(getpid() % 40) * 300;
    unsetenv("SPEED_CONFIG");
    unsetenv("SPEED_MODEL");
    setenv("TMPDIR", dir, 1); /* where speedctl up puts its throwaway certificates */

    test_certs();
    test_bad_model();
    test_router_port_zero();
    test_key_on_argv();
    test_no_router();
    test_port_taken();
    test_cluster();
    test_decode_killed();
    test_node_given_up();

    if (check_failures_)
        fprintf(stderr, "logs kept in %s\n", dir);
    else
        tu_rm_rf(dir);
    return CHECK_DONE();
}
