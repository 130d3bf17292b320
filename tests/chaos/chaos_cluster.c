/* The chaos suite's cluster: see chaos_cluster.h. */
#include "chaos_cluster.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *const role_names[2] = {"prefill", "decode"};

const char *ch_role_name(ch_role_t role) { return role_names[role]; }

int ch_n_nodes(const ch_cluster_t *k, ch_role_t role) { return role == CH_PREFILL ? k->c.np : k->c.nd; }

cu_proc_t *ch_node(ch_cluster_t *k, ch_role_t role, int i) { return role == CH_PREFILL ? &k->c.pre[i] : &k->c.dec[i]; }

static int node_http(const ch_cluster_t *k, ch_role_t role, int i) {
    return role == CH_PREFILL ? cu_pre_http(&k->c, i) : cu_dec_http(&k->c, i);
}

static int node_grpc(const ch_cluster_t *k, ch_role_t role, int i) {
    return role == CH_PREFILL ? cu_pre_grpc(&k->c, i) : cu_dec_grpc(&k->c, i);
}

static bool node_live(const ch_cluster_t *k, ch_role_t role, int i) {
    return (role == CH_PREFILL ? k->c.pre[i].pid : k->c.dec[i].pid) > 0;
}

/* ---- start and stop ----------------------------------------------------------------------- */

void ch_cluster_init(ch_cluster_t *k, int np, int nd, const char *const *extra) {
    memset(k, 0, sizeof *k);
    cu_cluster_init(&k->c, np, nd, extra);
}

bool ch_cluster_start(ch_cluster_t *k, double timeout_s) {
    if (!cu_cluster_start_nodes(&k->c, timeout_s)) {
        fprintf(stderr, "chaos: the nodes did not come up\n");
        return false;
    }
    bool ok = false;
    k->router = cu_cluster_router(&k->c, 0, NULL, timeout_s, &ok);
    k->rport = cu_router_port(&k->c, 0);
    if (!ok) fprintf(stderr, "chaos: the router did not come up or did not see every node\n");
    return ok;
}

bool ch_cluster_stop(ch_cluster_t *k) {
    bool ok = true;
    if (k->router.pid > 0) {
        int rc = cu_stop(&k->router, SIGTERM, 60);
        if (rc != 0) {
            fprintf(stderr, "chaos: router exit %d after SIGTERM\n", rc);
            cu_log_tail(k->router.name, 20);
            ok = false;
        }
    }
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < ch_n_nodes(k, (ch_role_t)r); i++) {
            cu_proc_t *p = ch_node(k, (ch_role_t)r, i);
            if (p->pid <= 0) continue;
            int rc = cu_stop(p, SIGTERM, 45);
            if (rc != 0) {
                fprintf(stderr, "chaos: %s exit %d after SIGTERM\n", p->name, rc);
                cu_log_tail(p->name, 20);
                ok = false;
            }
        }
    return ok;
}

/* ---- metrics ------------------------------------------------------------------------------ */

double ch_node_metric(const ch_cluster_t *k, ch_role_t role, int i, const char *name) {
    double v = cu_metric_sum(node_http(k, role, i), name);
    return isnan(v) ? 0 : v;
}

double ch_router_metric(const ch_cluster_t *k, const char *name) {
    double v = cu_metric_sum(k->rport, name);
    return isnan(v) ? 0 : v;
}

static void node_series(const ch_cluster_t *k, const char *metric, ch_role_t role, int i, char *buf, size_t n) {
    int port = node_grpc(k, role, i);
    snprintf(buf, n, "%s{pool=\"%s\",node=\"%s:%d\"}", metric, role_names[role], cu_port_addr(port), port);
}

double ch_router_node_down(const ch_cluster_t *k, ch_role_t role, int i) {
    char s[160];
    node_series(k, "speed_router_node_down_total", role, i, s, sizeof s);
    double v = cu_metric(k->rport, s);
    return isnan(v) ? 0 : v;
}

bool ch_router_wait_node_up(const ch_cluster_t *k, ch_role_t role, int i, bool up, double timeout_s) {
    char s[160];
    node_series(k, "speed_router_node_up", role, i, s, sizeof s);
    return cu_wait_metric(k->rport, s, up ? 1 : 0, timeout_s);
}

int ch_busy_node(const ch_cluster_t *k, ch_role_t role, double timeout_s) {
    char name[64];
    snprintf(name, sizeof name, "speed_%s_running_requests", role_names[role]);
    double t0 = now_s();
    do {
        for (int i = 0; i < ch_n_nodes(k, role); i++)
            if (node_live(k, role, i) && ch_node_metric(k, role, i, name) > 0) return i;
        sleep_ms(5);
    } while (now_s() - t0 < timeout_s);
    return -1;
}

/* Adds the value of every speed_router_requests_total sample to *all, and those with a 5xx
 * status to *errors. */
static void router_requests(const ch_cluster_t *k, double *all, double *errors) {
    *all = *errors = 0;
    char *page = cu_metrics(k->rport);
    if (!page) return;
    static const char name[] = "speed_router_requests_total{";
    for (char *line = page; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, name, sizeof name - 1) == 0) {
            char *close = strchr(line, '}');
            const char *st = strstr(line, "status=\"");
            double v = close ? strtod(close + 1, NULL) : 0;
            *all += v;
            if (st && (!close || st < close) && st[8] == '5') *errors += v;
        }
        line = nl ? nl + 1 : NULL;
    }
    speed_free(page);
}

void ch_router_snap(const ch_cluster_t *k, ch_router_snap_t *out) {
    memset(out, 0, sizeof *out);
    out->prefill_retries = ch_router_metric(k, "speed_router_prefill_retries_total");
    out->decode_retries = ch_router_metric(k, "speed_router_decode_retries_total");
    out->migrations = ch_router_metric(k, "speed_router_migrations_total");
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < ch_n_nodes(k, (ch_role_t)r); i++) out->node_down[r][i] = ch_router_node_down(k, r, i);
    router_requests(k, &out->requests, &out->errors_5xx);
}

/* ---- restart ------------------------------------------------------------------------------ */

bool ch_node_restart(ch_cluster_t *k, ch_role_t role, int i, double timeout_s) {
    cu_proc_t *p = ch_node(k, role, i);
    if (p->pid > 0) {
        fprintf(stderr, "chaos: %s%d is still running; not restarted\n", role_names[role], i);
        return false;
    }
    char idx[16], name[48];
    snprintf(idx, sizeof idx, "%d", i);
    snprintf(name, sizeof name, "%s%d-again%d", role_names[role], i, ++k->n_restarts);
    const char *more[] = {"--node.index", idx, NULL};
    *p = cu_cluster_spawn(&k->c, role == CH_PREFILL ? "speed-prefill" : "speed-decode", name, more);
    if (!cu_wait_up(p, node_http(k, role, i), timeout_s)) {
        fprintf(stderr, "chaos: restarted %s did not come up\n", name);
        cu_log_tail(name, 20);
        return false;
    }
    if (!ch_router_wait_node_up(k, role, i, true, timeout_s)) {
        fprintf(stderr, "chaos: the router did not take restarted %s back\n", name);
        return false;
    }
    return true;
}

/* ---- invariants --------------------------------------------------------------------------- */

static void leftover_take(const ch_cluster_t *k, ch_leftover_t *l, bool print) {
    memset(l, 0, sizeof *l);
    char name[64];
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < ch_n_nodes(k, (ch_role_t)r); i++) {
            if (!node_live(k, (ch_role_t)r, i)) continue;
            double b = ch_node_metric(k, r, i, "speed_kv_blocks_reserved");
            snprintf(name, sizeof name, "speed_%s_running_requests", role_names[r]);
            double run = ch_node_metric(k, r, i, name);
            snprintf(name, sizeof name, "speed_%s_waiting_requests", role_names[r]);
            double w = ch_node_metric(k, r, i, name);
            snprintf(name, sizeof name, "speed_%s_reserved_requests", role_names[r]);
            double res = ch_node_metric(k, r, i, name);
            l->blocks += b;
            l->running += run;
            l->waiting += w;
            l->reserved += res;
            if (print && (b || run || w || res))
                fprintf(stderr, "chaos: %s%d holds %.0f blocks, %.0f running, %.0f waiting, %.0f reserved\n",
                        role_names[r], i, b, run, w, res);
        }
}

bool ch_nodes_quiet(const ch_cluster_t *k, double timeout_s, ch_leftover_t *left) {
    double t0 = now_s();
    for (;;) {
        leftover_take(k, left, false);
        if (!left->blocks && !left->running && !left->waiting && !left->reserved) return true;
        if (now_s() - t0 > timeout_s) break;
        sleep_ms(50);
    }
    leftover_take(k, left, true);
    return false;
}

bool ch_nodes_serve(ch_cluster_t *k, const ch_prompt_t *p) {
    double before[2][CU_MAX_REPLICAS];
    char name[64];
    for (int r = 0; r < 2; r++) {
        snprintf(name, sizeof name, "speed_%s_requests_total", role_names[r]);
        for (int i = 0; i < ch_n_nodes(k, (ch_role_t)r); i++) before[r][i] = ch_node_metric(k, r, i, name);
    }
    int n = 2 * (k->c.np > k->c.nd ? k->c.np : k->c.nd);
    bool ok = true;
    for (int q = 0; q < n; q++) {
        char detail[512];
        ch_outcome_t o = ch_request_once(NULL, k->rport, p, q % 2 == 1, 60, detail, sizeof detail);
        if (o != CH_COMPLETE) {
            fprintf(stderr, "chaos: a request after the scenario: %s: %s\n", ch_outcome_name(o), detail);
            ok = false;
        }
    }
    /* each node counts its request when it ends, a moment after the client has its answer */
    for (int r = 0; r < 2; r++) {
        snprintf(name, sizeof name, "speed_%s_requests_total", role_names[r]);
        for (int i = 0; i < ch_n_nodes(k, (ch_role_t)r); i++) {
            bool grew = false;
            WAIT_FOR((grew = ch_node_metric(k, r, i, name) > before[r][i]), 10000);
            if (!grew) {
                fprintf(stderr, "chaos: %s%d served none of %d new requests\n", role_names[r], i, n);
                ok = false;
            }
        }
    }
    return ok;
}
