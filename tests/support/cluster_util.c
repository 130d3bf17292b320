/* Helpers for the tests that run real daemons: see cluster_util.h. */
#include "cluster_util.h"

#include <sys/wait.h>

#include "test_fs.h"
#include "tls_test_util.h"

char cu_dir[512];
char cu_bin[512];
int cu_port_base;

void cu_init(const char *name) {
    const char *speedctl = getenv("SPEEDCTL");
    if (!speedctl || !*speedctl) {
        fprintf(stderr, "SKIP: SPEEDCTL is not set (run through ctest)\n");
        exit(77);
    }
    snprintf(cu_bin, sizeof cu_bin, "%s", speedctl);
    char *slash = strrchr(cu_bin, '/');
    if (slash) *slash = '\0';
    snprintf(cu_dir, sizeof cu_dir, "%s", tu_tmp_init(name));
    /* A block of 100 ports below the ephemeral range (32768+), from the pid; blocks with a
     * port already taken (another test, a leftover) are skipped. */
    for (int k = 0; k < 220; k++) {
        cu_port_base = 10000 + (int)((getpid() + k) % 220) * 100;
        if (tu_ports_free(cu_port_base, 100)) break;
    }
    if (tu_system("%s/speedctl make-tiny-model %s/model > %s/make-model.log 2>&1", cu_bin, cu_dir, cu_dir) != 0) {
        fprintf(stderr, "make-tiny-model failed (see %s/make-model.log)\n", cu_dir);
        exit(1);
    }
    tt_certs_write(tu_path("certs"));
    setenv("UCX_TCP_CM_REUSEADDR", "y", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
    unsetenv("SPEED_CONFIG");
    unsetenv("SPEED_MODEL");
    unsetenv("SPEED_TLS_CA");
    unsetenv("SPEED_TLS_CERT");
    unsetenv("SPEED_TLS_KEY");
    unsetenv("SPEED_TLS_INSECURE");
}

/* The identity a daemon's certificate carries: "router", or "<role>-<node.index>". NULL for
 * programs that are not daemons. */
static const char *daemon_identity(const char *prog, const char *const *args, char *buf, size_t size) {
    const char *role = strcmp(prog, "speed-decode") == 0    ? "decode"
                       : strcmp(prog, "speed-prefill") == 0 ? "prefill"
                                                            : NULL;
    if (strcmp(prog, "speed-router") == 0) return "router";
    if (!role) return NULL;
    const char *index = "0";
    for (int i = 0; args[i]; i++)
        if (strcmp(args[i], "--node.index") == 0 && args[i + 1]) index = args[i + 1];
    snprintf(buf, size, "%s-%s", role, index);
    return buf;
}

static bool has_arg(const char *const *args, const char *prefix) {
    for (int i = 0; args[i]; i++)
        if (strncmp(args[i], prefix, strlen(prefix)) == 0) return true;
    return false;
}

const speed_rpc_tls_t *cu_rpc_tls(const char *identity) {
    static struct {
        char name[32];
        speed_tls_creds_t creds;
        speed_rpc_tls_t tls;
    } cache[8];
    static int n_cache;
    for (int i = 0; i < n_cache; i++)
        if (strcmp(cache[i].name, identity) == 0) return &cache[i].tls;
    if (n_cache == 8) {
        fprintf(stderr, "cu_rpc_tls: too many identities\n");
        exit(1);
    }
    snprintf(cache[n_cache].name, sizeof cache[n_cache].name, "%s", identity);
    tt_creds_load(tu_path("certs"), identity, &cache[n_cache].creds);
    cache[n_cache].tls = tt_rpc_tls(&cache[n_cache].creds);
    return &cache[n_cache++].tls;
}

void cu_init_model(const char *name, const char *model_opts) {
    cu_init(name);
    if (model_opts && *model_opts) {
        tu_rm_rf(tu_path("model"));
        if (tu_system("%s/speedctl make-tiny-model %s/model %s > %s/make-model.log 2>&1", cu_bin, cu_dir, model_opts,
                      cu_dir) != 0) {
            fprintf(stderr, "make-tiny-model %s failed (see %s/make-model.log)\n", model_opts, cu_dir);
            exit(1);
        }
    }
}

void cu_cleanup(bool keep) {
    const char *k = getenv("SPEED_KEEP_TEST_LOGS");
    if (k && *k && strcmp(k, "0") != 0) keep = true;
    if (!keep)
        tu_rm_rf(cu_dir);
    else
        fprintf(stderr, "logs kept in %s\n", cu_dir);
}

void cu_log_tail(const char *name, int lines) {
    tu_system("echo '--- %s.log (tail) ---' >&2; tail -n %d %s/%s.log >&2", name, lines, cu_dir, name);
}

/* ---- daemons ------------------------------------------------------------------------------ */

cu_proc_t cu_spawn(const char *prog, const char *name, const char *const *args) {
    return cu_spawn_in(NULL, prog, name, args);
}

cu_proc_t cu_spawn_in(const char *netns, const char *prog, const char *name, const char *const *args) {
    cu_proc_t p = {0};
    snprintf(p.name, sizeof p.name, "%s", name);
    char path[1024], log[1024];
    snprintf(path, sizeof path, "%s/%s", cu_bin, prog);
    snprintf(log, sizeof log, "%s/%s.log", cu_dir, name);
    const char *argv[72];
    int n = 0;
    argv[n++] = path;
    for (int i = 0; args[i] && n < 63; i++) argv[n++] = args[i];
    /* Every daemon runs the control plane with mTLS and its own certificate, unless the test
     * chose (tls.insecure, or certificates of its own). */
    char id[48], ca[1024], crt[1024], key[1024];
    const char *identity = daemon_identity(prog, args, id, sizeof id);
    if (identity && !has_arg(args, "--tls.") && !has_arg(args, "--no-tls.")) {
        snprintf(ca, sizeof ca, "%s/certs/ca.crt", cu_dir);
        snprintf(crt, sizeof crt, "%s/certs/%s.crt", cu_dir, identity);
        snprintf(key, sizeof key, "%s/certs/%s.key", cu_dir, identity);
        argv[n++] = "--tls.ca";
        argv[n++] = ca;
        argv[n++] = "--tls.cert";
        argv[n++] = crt;
        argv[n++] = "--tls.key";
        argv[n++] = key;
    }
    argv[n] = NULL;
    tu_spawn_params_t sp = {.log_path = log, .die_with_parent = true, .netns = netns && *netns ? netns : NULL};
    p.pid = tu_spawn(argv, &sp);
    return p;
}

int cu_wait_exit(cu_proc_t *p, double timeout_s) {
    if (p->pid <= 0) return -1;
    int status;
    if (!tu_wait_pid(p->pid, timeout_s, &status)) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, &status, 0);
        p->pid = 0;
        return -1;
    }
    p->pid = 0;
    return tu_exit_code(status);
}

int cu_stop(cu_proc_t *p, int sig, double timeout_s) {
    if (p->pid <= 0) return -1;
    kill(p->pid, sig);
    return cu_wait_exit(p, timeout_s);
}

bool cu_alive(cu_proc_t *p) {
    if (p->pid <= 0) return false;
    int status;
    if (tu_wait_pid(p->pid, 0, &status)) {
        fprintf(stderr, "%s exited (%s %d); see %s/%s.log\n", p->name, WIFEXITED(status) ? "status" : "signal",
                WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), cu_dir, p->name);
        p->pid = 0;
        return false;
    }
    return true;
}

bool cu_wait_up(cu_proc_t *p, int port, double timeout_s) {
    double t0 = now_s();
    while (now_s() - t0 < timeout_s) {
        if (cu_wait_health(port, 200, 0.5)) return true;
        if (!cu_alive(p)) return false;
    }
    return false;
}

json_t *cu_generate_ref(const char *prompt_ids, const char *prefill_layers, int max_tokens) {
    char out[1024];
    snprintf(out, sizeof out, "%s/ref-%s-%d.json", cu_dir, prefill_layers, max_tokens);
    if (tu_system("%s/speedctl generate --model %s/model --prompt-ids %s --prefill-layers %s --max-tokens %d "
                  "--top-logprobs 2 --threads 1 --json > %s 2>&1",
                  cu_bin, cu_dir, prompt_ids, prefill_layers, max_tokens, out) != 0) {
        fprintf(stderr, "speedctl generate failed, see %s\n", out);
        return NULL;
    }
    json_error_t err;
    return json_load_file(out, 0, &err);
}

/* ---- a cluster of real daemons ---------------------------------------------------------- */

int cu_pre_grpc(const cu_cluster_t *c, int i) { return c->B + i; }
int cu_pre_http(const cu_cluster_t *c, int i) { return c->B + 10 + i; }
int cu_dec_grpc(const cu_cluster_t *c, int i) { return c->B + 20 + i; }
int cu_dec_http(const cu_cluster_t *c, int i) { return c->B + 30 + i; }
int cu_router_port(const cu_cluster_t *c, int k) { return c->B + 40 + k; }

static void cu_cluster_arg(cu_cluster_t *c, const char *a) {
    if (c->n_common < 32) snprintf(c->common[c->n_common++], sizeof c->common[0], "%s", a);
}

void cu_cluster_init(cu_cluster_t *c, int np, int nd, const char *const *extra) {
    memset(c, 0, sizeof *c);
    c->B = cu_port_base;
    c->np = np;
    c->nd = nd;
    snprintf(c->model_dir, sizeof c->model_dir, "%s/model", cu_dir);
    char v[32];
    cu_cluster_arg(c, "--model");
    cu_cluster_arg(c, c->model_dir);
#define CU_ARG_INT(key, val)                     \
    do {                                         \
        cu_cluster_arg(c, key);                  \
        snprintf(v, sizeof v, "%d", (int)(val)); \
        cu_cluster_arg(c, v);                    \
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

void cu_cluster_place(cu_cluster_t *c, const char *role, int i, const char *netns, const char *addr) {
    if (i < 0 || i >= CU_MAX_REPLICAS) {
        fprintf(stderr, "cu_cluster_place: index %d\n", i);
        exit(1);
    }
    cu_place_t *at = strcmp(role, "prefill") == 0  ? &c->at_pre[i]
                     : strcmp(role, "decode") == 0 ? &c->at_dec[i]
                     : strcmp(role, "router") == 0 ? &c->at_router[i]
                                                   : NULL;
    if (!at) {
        fprintf(stderr, "cu_cluster_place: role '%s'\n", role);
        exit(1);
    }
    snprintf(at->netns, sizeof at->netns, "%s", netns ? netns : "");
    snprintf(at->addr, sizeof at->addr, "%s", addr ? addr : "");
    c->placed = true;
    const char *a = addr && *addr ? addr : NULL;
    if (at == &c->at_pre[i]) {
        cu_port_host(cu_pre_grpc(c, i), a);
        cu_port_host(cu_pre_http(c, i), a);
    } else if (at == &c->at_dec[i]) {
        cu_port_host(cu_dec_grpc(c, i), a);
        cu_port_host(cu_dec_http(c, i), a);
    } else {
        cu_port_host(cu_router_port(c, i), a);
    }
}

/* The value after `key` in args, or NULL. */
static const char *arg_value(const char *const *args, const char *key) {
    for (int i = 0; args && args[i]; i++)
        if (strcmp(args[i], key) == 0) return args[i + 1];
    return NULL;
}

static void hosts_list(const cu_place_t *at, int n, char *buf, size_t size) {
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && len < size; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s%s", i ? "," : "", at[i].addr[0] ? at[i].addr : "127.0.0.1");
}

cu_proc_t cu_cluster_spawn(cu_cluster_t *c, const char *prog, const char *name, const char *const *more) {
    const char *args[72];
    int n = 0;
    for (int i = 0; i < c->n_common && n < 62; i++) args[n++] = c->common[i];
    for (int i = 0; more && more[i] && n < 62; i++) args[n++] = more[i];
    const cu_place_t *at = NULL;
    char pre_hosts[600], dec_hosts[600];
    if (c->placed) {
        const char *idx = arg_value(more, "--node.index"), *port = arg_value(more, "--router.port");
        int k = idx ? atoi(idx) : 0;
        if (strcmp(prog, "speed-prefill") == 0 && k >= 0 && k < CU_MAX_REPLICAS) at = &c->at_pre[k];
        if (strcmp(prog, "speed-decode") == 0 && k >= 0 && k < CU_MAX_REPLICAS) at = &c->at_dec[k];
        if (strcmp(prog, "speed-router") == 0) {
            k = port ? atoi(port) - cu_router_port(c, 0) : 0;
            if (k >= 0 && k < CU_MAX_REPLICAS) at = &c->at_router[k];
        }
        hosts_list(c->at_pre, c->np, pre_hosts, sizeof pre_hosts);
        hosts_list(c->at_dec, c->nd, dec_hosts, sizeof dec_hosts);
        if (c->np > 0) {
            args[n++] = "--prefill.hosts";
            args[n++] = pre_hosts;
        }
        args[n++] = "--decode.hosts";
        args[n++] = dec_hosts;
        if (at && at->addr[0]) {
            args[n++] = strcmp(prog, "speed-router") == 0 ? "--router.listen" : "--control.listen";
            args[n++] = at->addr;
            args[n++] = "--metrics.listen";
            args[n++] = at->addr;
        }
    }
    args[n] = NULL;
    return cu_spawn_in(at ? at->netns : NULL, prog, name, args);
}

bool cu_cluster_start_nodes(cu_cluster_t *c, double timeout_s) {
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
    for (int i = 0; i < c->nd; i++) ok = ok && cu_wait_health(cu_dec_http(c, i), 200, timeout_s);
    for (int i = 0; i < c->np; i++) ok = ok && cu_wait_health(cu_pre_http(c, i), 200, timeout_s);
    return ok;
}

bool cu_router_wait_nodes(const cu_cluster_t *c, int port, int want_pre, int want_dec, double timeout_s) {
    double t0 = now_s();
    char name[160];
    for (;;) {
        int up_p = 0, up_d = 0;
        for (int i = 0; i < c->np; i++) {
            snprintf(name, sizeof name, "speed_router_node_up{pool=\"prefill\",node=\"%s:%d\"}",
                     cu_port_addr(cu_pre_grpc(c, i)), cu_pre_grpc(c, i));
            if (cu_metric(port, name) == 1.0) up_p++;
        }
        for (int i = 0; i < c->nd; i++) {
            snprintf(name, sizeof name, "speed_router_node_up{pool=\"decode\",node=\"%s:%d\"}",
                     cu_port_addr(cu_dec_grpc(c, i)), cu_dec_grpc(c, i));
            if (cu_metric(port, name) == 1.0) up_d++;
        }
        if (up_p >= want_pre && up_d >= want_dec) return true;
        if (now_s() - t0 > timeout_s) return false;
        sleep_ms(50);
    }
}

cu_proc_t cu_cluster_router(cu_cluster_t *c, int k, const char *const *more, double timeout_s, bool *ok) {
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
    *ok = cu_wait_health(cu_router_port(c, k), 200, timeout_s) &&
          cu_router_wait_nodes(c, cu_router_port(c, k), c->np, c->nd, timeout_s);
    return p;
}

void cu_dec_served(const cu_cluster_t *c, double *counts) {
    for (int d = 0; d < c->nd; d++) counts[d] = cu_metric_sum0(cu_dec_http(c, d), "speed_decode_requests_total");
}

int cu_dec_served_since(const cu_cluster_t *c, const double *before) {
    double now[CU_MAX_REPLICAS];
    cu_dec_served(c, now);
    int who = -1, moved = 0;
    for (int d = 0; d < c->nd; d++)
        if (now[d] > before[d]) {
            who = d;
            moved++;
        }
    CHECK_MSG(moved == 1, "%d decode nodes counted the request", moved);
    return moved == 1 ? who : -1;
}

const char *cu_router_index_series(const cu_cluster_t *c, int d, char *buf, size_t cap) {
    snprintf(buf, cap, "speed_router_kv_index_blocks{node=\"127.0.0.1:%d\"}", cu_dec_grpc(c, d));
    return buf;
}

void cu_cluster_use_model(cu_cluster_t *c, const char *dir) {
    for (int i = 0; i + 1 < c->n_common; i++)
        if (strcmp(c->common[i], "--model") == 0) snprintf(c->common[i + 1], sizeof c->common[i + 1], "%s", dir);
    snprintf(c->model_dir, sizeof c->model_dir, "%s", dir);
}

double cu_dec_metric_sum0(const cu_cluster_t *c, const char *name) {
    double sum = 0;
    for (int d = 0; d < c->nd; d++) sum += cu_metric_sum0(cu_dec_http(c, d), name);
    return sum;
}
