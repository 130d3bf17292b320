/* Integration-test helpers: a scratch directory with a tiny model, real daemons started as
 * child processes on loopback ports unique to this test process, health waits, metrics reads,
 * and `speedctl generate --json` as the reference. */
#ifndef SPEED_CLUSTER_UTIL_H
#define SPEED_CLUSTER_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "http.h"

static char cu_dir[512];
static char cu_bin[512];      /* directory of speedctl and the daemons */
static int cu_port_base;

static inline double cu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Runs a shell command, returns its exit status (-1 if it did not exit). */
static inline int cu_system(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* True when every TCP port [base, base + n) on 127.0.0.1 can be bound now. */
static inline bool cu_ports_free(int base, int n) {
    for (int p = base; p < base + n; p++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) return false;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (!ok) return false;
    }
    return true;
}

/* Scratch dir, binaries dir (from $SPEEDCTL), a tiny model at <dir>/model, and a port base
 * unique to this process (so ctest -j runs tests side by side). Exits 77 when $SPEEDCTL is
 * not set (not run by ctest). */
static inline void cu_init(const char *name) {
    const char *speedctl = getenv("SPEEDCTL");
    if (!speedctl || !*speedctl) {
        fprintf(stderr, "SKIP: SPEEDCTL is not set (run through ctest)\n");
        exit(77);
    }
    snprintf(cu_bin, sizeof cu_bin, "%s", speedctl);
    char *slash = strrchr(cu_bin, '/');
    if (slash) *slash = '\0';
    const char *tmp = getenv("SPEED_TEST_TMP");
    snprintf(cu_dir, sizeof cu_dir, "%s/%s-XXXXXX", tmp && *tmp ? tmp : "/tmp", name);
    if (!mkdtemp(cu_dir)) {
        fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
        exit(1);
    }
    /* A block of 100 ports below the ephemeral range (32768+), from the pid; blocks with a
     * port already taken (another test, a leftover) are skipped. */
    for (int k = 0; k < 220; k++) {
        cu_port_base = 10000 + (int)((getpid() + k) % 220) * 100;
        if (cu_ports_free(cu_port_base, 100)) break;
    }
    if (cu_system("%s/speedctl make-tiny-model %s/model > %s/make-model.log 2>&1", cu_bin, cu_dir, cu_dir) != 0) {
        fprintf(stderr, "make-tiny-model failed (see %s/make-model.log)\n", cu_dir);
        exit(1);
    }
    setenv("UCX_TCP_CM_REUSEADDR", "y", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
    unsetenv("SPEED_CONFIG");
    unsetenv("SPEED_MODEL");
}

typedef struct {
    pid_t pid;
    char name[64];
} cu_proc_t;

/* Starts bin/<prog> with the NULL-terminated extra args; stdout+stderr go to <dir>/<name>.log. */
static inline cu_proc_t cu_spawn(const char *prog, const char *name, const char *const *args) {
    cu_proc_t p = {0};
    snprintf(p.name, sizeof p.name, "%s", name);
    char path[1024], log[1024];
    snprintf(path, sizeof path, "%s/%s", cu_bin, prog);
    snprintf(log, sizeof log, "%s/%s.log", cu_dir, name);
    const char *argv[64];
    int n = 0;
    argv[n++] = path;
    for (int i = 0; args[i] && n < 63; i++) argv[n++] = args[i];
    argv[n] = NULL;
    p.pid = fork();
    if (p.pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the test */
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(path, (char *const *)argv);
        _exit(127);
    }
    return p;
}

/* Waits up to timeout_s for the process to exit without signalling it (e.g. after a signal
 * sent earlier); returns as cu_stop, and kills it on timeout. */
static inline int cu_wait_exit(cu_proc_t *p, double timeout_s) {
    if (p->pid <= 0) return -1;
    double t0 = cu_now();
    for (;;) {
        int status;
        pid_t r = waitpid(p->pid, &status, WNOHANG);
        if (r == p->pid) {
            p->pid = 0;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        if (cu_now() - t0 > timeout_s) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &status, 0);
            p->pid = 0;
            return -1;
        }
        usleep(20000);
    }
}

/* Sends sig and waits up to timeout_s; returns the exit code, 128+signal, or -1 on timeout
 * (then the process is killed). */
static inline int cu_stop(cu_proc_t *p, int sig, double timeout_s) {
    if (p->pid <= 0) return -1;
    kill(p->pid, sig);
    return cu_wait_exit(p, timeout_s);
}

/* True while the child runs (reaps it when it has exited). */
static inline bool cu_alive(cu_proc_t *p) {
    if (p->pid <= 0) return false;
    int status;
    if (waitpid(p->pid, &status, WNOHANG) == p->pid) {
        fprintf(stderr, "%s exited (%s %d); see %s/%s.log\n", p->name, WIFEXITED(status) ? "status" : "signal",
                WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), cu_dir, p->name);
        p->pid = 0;
        return false;
    }
    return true;
}

/* GET http://127.0.0.1:port/path until it answers 200 or timeout_s passes. */
static inline bool cu_wait_ok(int port, const char *path, double timeout_s) {
    double t0 = cu_now();
    while (cu_now() - t0 < timeout_s) {
        int status = 0;
        char *body = NULL;
        if (speed_http_get("127.0.0.1", (uint16_t)port, path, 1000, &status, &body) == SPEED_OK) {
            speed_free(body);
            if (status == 200) return true;
        }
        usleep(100000);
    }
    return false;
}

/* cu_wait_ok that gives up as soon as the process is gone. */
static inline bool cu_wait_up(cu_proc_t *p, int port, double timeout_s) {
    double t0 = cu_now();
    while (cu_now() - t0 < timeout_s) {
        if (cu_wait_ok(port, "/health", 0.5)) return true;
        if (!cu_alive(p)) return false;
    }
    return false;
}

/* Value of an unlabelled sample in a /metrics page, or NAN. */
static inline double cu_metric(int port, const char *name) {
    int status = 0;
    char *body = NULL;
    double v = 0.0 / 0.0;
    if (speed_http_get("127.0.0.1", (uint16_t)port, "/metrics", 2000, &status, &body) != SPEED_OK) return v;
    size_t n = strlen(name);
    for (char *line = body; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, name, n) == 0 && line[n] == ' ') {
            v = strtod(line + n + 1, NULL);
            break;
        }
        line = nl ? nl + 1 : NULL;
    }
    speed_free(body);
    return v;
}

/* `speedctl generate --json` on the tiny model: the reference tokens and logprobs. */
static inline json_t *cu_generate_ref(const char *prompt_ids, const char *prefill_layers, int max_tokens) {
    char out[1024];
    snprintf(out, sizeof out, "%s/ref-%s-%d.json", cu_dir, prefill_layers, max_tokens);
    if (cu_system("%s/speedctl generate --model %s/model --prompt-ids %s --prefill-layers %s --max-tokens %d "
                  "--top-logprobs 2 --threads 1 --json > %s 2>&1",
                  cu_bin, cu_dir, prompt_ids, prefill_layers, max_tokens, out) != 0) {
        fprintf(stderr, "speedctl generate failed, see %s\n", out);
        return NULL;
    }
    json_error_t err;
    return json_load_file(out, 0, &err);
}

/* ---- more helpers for the router-level tests (test_cluster*.c) ------------------------- */

/* Like cu_init with extra `speedctl make-tiny-model` options (e.g. a wider model). */
static inline void cu_init_model(const char *name, const char *model_opts) {
    cu_init(name);
    if (model_opts && *model_opts) {
        cu_system("rm -rf %s/model", cu_dir);
        if (cu_system("%s/speedctl make-tiny-model %s/model %s > %s/make-model.log 2>&1", cu_bin, cu_dir, model_opts,
                      cu_dir) != 0) {
            fprintf(stderr, "make-tiny-model %s failed (see %s/make-model.log)\n", model_opts, cu_dir);
            exit(1);
        }
    }
}

/* Sum of every sample of a metric family member `name` (any labels), or NAN if none. */
static inline double cu_metric_sum(int port, const char *name) {
    int status = 0;
    char *body = NULL;
    double v = 0.0 / 0.0;
    if (speed_http_get("127.0.0.1", (uint16_t)port, "/metrics", 2000, &status, &body) != SPEED_OK) return v;
    size_t n = strlen(name);
    for (char *line = body; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, name, n) == 0 && (line[n] == ' ' || line[n] == '{')) {
            char *sp = line[n] == ' ' ? line + n : strstr(line + n, "} ");
            if (sp) {
                double x = strtod(sp + (*sp == '}' ? 2 : 1), NULL);
                v = isnan(v) ? x : v + x;
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    speed_free(body);
    return v;
}

/* Polls cu_metric(port, name) until it equals want (within 1e-9) or timeout_s passes. */
static inline bool cu_wait_metric(int port, const char *name, double want, double timeout_s) {
    double t0 = cu_now();
    for (;;) {
        double v = cu_metric(port, name);
        if (fabs(v - want) < 1e-9) return true;
        if (cu_now() - t0 > timeout_s) return false;
        usleep(20000);
    }
}

/* One HTTP exchange on a fresh connection. */
typedef struct {
    int status;            /* 0: no answer (connect/read error) */
    char *body;            /* speed_malloc'd, NUL-terminated, or NULL */
    json_t *json;          /* parsed body (NULL if not JSON) */
    char retry_after[32];
    char request_id[96];
    char allow[64];
    double seconds;        /* time taken */
} cu_resp_t;

static inline void cu_resp_free(cu_resp_t *r) {
    speed_free(r->body);
    json_decref(r->json);
    memset(r, 0, sizeof *r);
}

static inline void cu_hdr_copy(const speed_http_response_t *resp, const char *name, char *out, size_t cap) {
    const char *v = speed_http_response_header(resp, name);
    snprintf(out, cap, "%s", v ? v : "");
}

/* `auth` and `xid` may be NULL (no Authorization / X-Request-Id header). */
static inline bool cu_http(int port, const char *method, const char *path, const char *body, const char *auth,
                           const char *xid, int timeout_ms, cu_resp_t *out) {
    memset(out, 0, sizeof *out);
    double t0 = cu_now();
    speed_http_client_t *c = NULL;
    if (speed_http_client_connect("127.0.0.1", (uint16_t)port, timeout_ms, &c) != SPEED_OK) return false;
    speed_http_header_t h[3];
    size_t nh = 0;
    if (body) h[nh++] = (speed_http_header_t){"Content-Type", "application/json"};
    if (auth) h[nh++] = (speed_http_header_t){"Authorization", auth};
    if (xid) h[nh++] = (speed_http_header_t){"X-Request-Id", xid};
    const speed_http_response_t *resp = NULL;
    speed_status_t st =
        speed_http_client_request(c, method, path, h, nh, body, body ? strlen(body) : 0, &resp);
    if (st == SPEED_OK) {
        out->status = resp->status;
        out->body = speed_strndup(resp->body ? resp->body : "", resp->body_len);
        json_error_t err;
        out->json = json_loadb(resp->body ? resp->body : "", resp->body_len, 0, &err);
        cu_hdr_copy(resp, "Retry-After", out->retry_after, sizeof out->retry_after);
        cu_hdr_copy(resp, "X-Request-Id", out->request_id, sizeof out->request_id);
        cu_hdr_copy(resp, "Allow", out->allow, sizeof out->allow);
    }
    speed_http_client_destroy(c);
    out->seconds = cu_now() - t0;
    return st == SPEED_OK;
}

static inline bool cu_post(int port, const char *path, const char *body, cu_resp_t *out) {
    return cu_http(port, "POST", path, body, NULL, NULL, 60000, out);
}

/* A server-sent event stream read through speed_http_client_read with our own parser, so a
 * total deadline bounds it even if the server keeps sending ": ping" comments. */
#define CU_SSE_MAX 8192
typedef struct {
    speed_http_client_t *c;
    int status;
    char request_id[96];
    char content_type[96];
    char *buf;             /* unparsed bytes */
    size_t len, cap;
    char *data[CU_SSE_MAX];   /* "data:" of each event, in order */
    int n;
    bool ended;            /* the body ended (server closed the stream) */
    bool done;             /* "[DONE]" seen */
    bool io_error;         /* a socket error or timeout ended reading */
} cu_sse_t;

/* Starts a streaming POST. timeout_ms bounds every socket wait. */
static inline bool cu_sse_begin(int port, const char *path, const char *body, const char *auth, int timeout_ms,
                                cu_sse_t *s) {
    memset(s, 0, sizeof *s);
    if (speed_http_client_connect("127.0.0.1", (uint16_t)port, timeout_ms, &s->c) != SPEED_OK) return false;
    speed_http_header_t h[2] = {{"Content-Type", "application/json"}, {"Authorization", auth}};
    const speed_http_response_t *resp = NULL;
    if (speed_http_client_request_begin(s->c, "POST", path, h, auth ? 2 : 1, body, strlen(body), &resp) !=
        SPEED_OK) {
        speed_http_client_destroy(s->c);
        s->c = NULL;
        return false;
    }
    s->status = resp->status;
    cu_hdr_copy(resp, "X-Request-Id", s->request_id, sizeof s->request_id);
    cu_hdr_copy(resp, "Content-Type", s->content_type, sizeof s->content_type);
    return true;
}

/* Parses complete events out of s->buf. */
static inline void cu_sse_parse(cu_sse_t *s) {
    for (;;) {
        char *end = NULL;
        size_t sep = 0;
        for (size_t i = 0; i + 1 < s->len; i++) {
            if (s->buf[i] == '\n' && s->buf[i + 1] == '\n') {
                end = s->buf + i;
                sep = 2;
                break;
            }
        }
        if (!end) return;
        size_t elen = (size_t)(end - s->buf);
        /* join the data: lines of this event */
        char *data = speed_malloc(elen + 1);
        size_t dl = 0;
        bool has_data = false;
        for (char *line = s->buf; line < end;) {
            char *nl = memchr(line, '\n', (size_t)(end - line));
            size_t ll = nl ? (size_t)(nl - line) : (size_t)(end - line);
            if (ll >= 5 && strncmp(line, "data:", 5) == 0) {
                const char *v = line + 5;
                size_t vl = ll - 5;
                if (vl && *v == ' ') v++, vl--;
                if (has_data) data[dl++] = '\n';
                memcpy(data + dl, v, vl);
                dl += vl;
                has_data = true;
            }
            line = nl ? nl + 1 : end;
        }
        data[dl] = '\0';
        if (has_data && s->n < CU_SSE_MAX) {
            if (strcmp(data, "[DONE]") == 0) s->done = true;
            s->data[s->n++] = data;
        } else {
            speed_free(data);
        }
        memmove(s->buf, end + sep, s->len - elen - sep);
        s->len -= elen + sep;
    }
}

/* Reads until `want` more events arrived (want < 0: to the end of the body), the body ends,
 * an error, or deadline_s (absolute cu_now() time) passes. Returns the events added. */
static inline int cu_sse_read(cu_sse_t *s, int want, double deadline_s) {
    int n0 = s->n;
    char tmp[16384];
    while (!s->ended && !s->io_error && (want < 0 || s->n - n0 < want)) {
        if (cu_now() > deadline_s) break;
        size_t got = 0;
        if (speed_http_client_read(s->c, tmp, sizeof tmp, &got) != SPEED_OK) {
            s->io_error = true;
            break;
        }
        if (got == 0) {
            s->ended = true;
            break;
        }
        if (s->len + got + 1 > s->cap) {
            size_t cap = (s->cap ? s->cap * 2 : 65536) + got;
            char *nb = speed_malloc(cap);
            if (s->len) memcpy(nb, s->buf, s->len);
            speed_free(s->buf);
            s->buf = nb;
            s->cap = cap;
        }
        memcpy(s->buf + s->len, tmp, got);
        s->len += got;
        cu_sse_parse(s);
    }
    return s->n - n0;
}

/* Closes the connection (a client going away) and frees everything. */
static inline void cu_sse_free(cu_sse_t *s) {
    speed_http_client_destroy(s->c);
    for (int i = 0; i < s->n; i++) speed_free(s->data[i]);
    speed_free(s->buf);
    memset(s, 0, sizeof *s);
}

/* ---- a cluster of real daemons ---------------------------------------------------------- */

/* Port layout from a base B: prefill i gRPC B+i, HTTP B+10+i; decode i gRPC B+20+i,
 * HTTP B+30+i; the routers B+40, B+41, ... (each router gets its --router.port; the nodes keep the
 * default router port, which overlaps none of these). */
#define CU_MAX_REPLICAS 4
typedef struct {
    int B, np, nd;
    cu_proc_t pre[CU_MAX_REPLICAS], dec[CU_MAX_REPLICAS];
    char model_dir[600];
    char common[32][640];   /* the cluster arguments every process gets */
    int n_common;
} cu_cluster_t;

static inline int cu_pre_grpc(const cu_cluster_t *c, int i) { return c->B + i; }
static inline int cu_pre_http(const cu_cluster_t *c, int i) { return c->B + 10 + i; }
static inline int cu_dec_grpc(const cu_cluster_t *c, int i) { return c->B + 20 + i; }
static inline int cu_dec_http(const cu_cluster_t *c, int i) { return c->B + 30 + i; }
static inline int cu_router_port(const cu_cluster_t *c, int k) { return c->B + 40 + k; }

static inline void cu_cluster_arg(cu_cluster_t *c, const char *a) {
    if (c->n_common < 32) snprintf(c->common[c->n_common++], sizeof c->common[0], "%s", a);
}

/* Sets up the arguments of a np-prefill nd-decode cluster on the model in cu_dir; `extra`
 * (NULL-terminated, may be NULL) are more cluster arguments for every process. */
static inline void cu_cluster_init(cu_cluster_t *c, int np, int nd, const char *const *extra) {
    memset(c, 0, sizeof *c);
    c->B = cu_port_base;
    c->np = np;
    c->nd = nd;
    snprintf(c->model_dir, sizeof c->model_dir, "%s/model", cu_dir);
    char v[32];
    cu_cluster_arg(c, "--model");
    cu_cluster_arg(c, c->model_dir);
#define CU_ARG_INT(key, val)          \
    do {                              \
        cu_cluster_arg(c, key);       \
        snprintf(v, sizeof v, "%d", (int)(val)); \
        cu_cluster_arg(c, v);         \
    } while (0)
    CU_ARG_INT("--prefill.replicas", np);
    CU_ARG_INT("--decode.replicas", nd);
    CU_ARG_INT("--prefill.grpc_port", c->B);
    CU_ARG_INT("--prefill.http_port", c->B + 10);
    CU_ARG_INT("--decode.grpc_port", c->B + 20);
    CU_ARG_INT("--decode.http_port", c->B + 30);
#undef CU_ARG_INT
    for (int i = 0; extra && extra[i]; i++) cu_cluster_arg(c, extra[i]);
}

/* Spawns prog with the cluster arguments, then `more` (NULL-terminated, may be NULL). */
static inline cu_proc_t cu_cluster_spawn(cu_cluster_t *c, const char *prog, const char *name,
                                         const char *const *more) {
    const char *args[64];
    int n = 0;
    for (int i = 0; i < c->n_common && n < 62; i++) args[n++] = c->common[i];
    for (int i = 0; more && more[i] && n < 62; i++) args[n++] = more[i];
    args[n] = NULL;
    return cu_spawn(prog, name, args);
}

/* Starts every node and waits for their /health. */
static inline bool cu_cluster_start_nodes(cu_cluster_t *c, double timeout_s) {
    char idx[16], name[32];
    for (int i = 0; i < c->nd; i++) {
        snprintf(idx, sizeof idx, "%d", i);
        snprintf(name, sizeof name, "decode%d", i);
        const char *more[] = {"--node.index", idx, NULL};
        c->dec[i] = cu_cluster_spawn(c, "speed-decode", name, more);
    }
    for (int i = 0; i < c->np; i++) {
        snprintf(idx, sizeof idx, "%d", i);
        snprintf(name, sizeof name, "prefill%d", i);
        const char *more[] = {"--node.index", idx, NULL};
        c->pre[i] = cu_cluster_spawn(c, "speed-prefill", name, more);
    }
    bool ok = true;
    for (int i = 0; i < c->nd; i++) ok = ok && cu_wait_ok(cu_dec_http(c, i), "/health", timeout_s);
    for (int i = 0; i < c->np; i++) ok = ok && cu_wait_ok(cu_pre_http(c, i), "/health", timeout_s);
    return ok;
}

/* Router k (port B+40+k) with more arguments; waits until its /health is 200 and every node
 * is up in its speed_router_node_up (all nodes expected up). */
static inline bool cu_router_wait_nodes(const cu_cluster_t *c, int port, int want_pre, int want_dec,
                                        double timeout_s) {
    double t0 = cu_now();
    char name[160];
    for (;;) {
        int up_p = 0, up_d = 0;
        for (int i = 0; i < c->np; i++) {
            snprintf(name, sizeof name, "speed_router_node_up{pool=\"prefill\",node=\"127.0.0.1:%d\"}",
                     cu_pre_grpc(c, i));
            if (cu_metric(port, name) == 1.0) up_p++;
        }
        for (int i = 0; i < c->nd; i++) {
            snprintf(name, sizeof name, "speed_router_node_up{pool=\"decode\",node=\"127.0.0.1:%d\"}",
                     cu_dec_grpc(c, i));
            if (cu_metric(port, name) == 1.0) up_d++;
        }
        if (up_p >= want_pre && up_d >= want_dec) return true;
        if (cu_now() - t0 > timeout_s) return false;
        usleep(50000);
    }
}

static inline cu_proc_t cu_cluster_router(cu_cluster_t *c, int k, const char *const *more, double timeout_s,
                                          bool *ok) {
    char port[16], name[32];
    snprintf(port, sizeof port, "%d", cu_router_port(c, k));
    snprintf(name, sizeof name, "router%d", k);
    const char *args[32];
    int n = 0;
    args[n++] = "--router.port";
    args[n++] = port;
    for (int i = 0; more && more[i] && n < 30; i++) args[n++] = more[i];
    args[n] = NULL;
    cu_proc_t p = cu_cluster_spawn(c, "speed-router", name, args);
    *ok = cu_wait_ok(cu_router_port(c, k), "/health", timeout_s) &&
          cu_router_wait_nodes(c, cu_router_port(c, k), c->np, c->nd, timeout_s);
    return p;
}

/* Prints the tail of a process log (for failures). */
static inline void cu_log_tail(const char *name, int lines) {
    cu_system("echo '--- %s.log (tail) ---' >&2; tail -n %d %s/%s.log >&2", name, lines, cu_dir, name);
}

static inline void cu_cleanup(bool keep) {
    const char *k = getenv("SPEED_KEEP_TEST_LOGS");
    if (k && *k && strcmp(k, "0") != 0) keep = true;
    if (!keep) cu_system("rm -rf %s", cu_dir);
    else fprintf(stderr, "logs kept in %s\n", cu_dir);
}

#endif /* SPEED_CLUSTER_UTIL_H */
