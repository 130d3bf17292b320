/* The monitoring files against a real Prometheus scraping a live cluster under load: no dashboard
 * panel, recording rule or alert that silently shows nothing (deploy/monitoring/README.md).
 *
 * A 1P1D cluster runs; two client threads keep completions (whole and streamed) going; a
 * `prometheus` server (Debian's package) scrapes the router and both nodes every second with the
 * repository's rule files (deploy/monitoring/rules) and its own storage in the test's scratch
 * directory, on a free port. Then, polling until every check passes or 40 s go by:
 *   - every target is up (the file-discovery targets, labelled by component as in prometheus.yml);
 *   - every rule is loaded and healthy (/api/v1/rules: health "ok", no lastError);
 *   - every PromQL expression of the Grafana dashboard (panels in rows included; $instance -> .*,
 *     $__rate_interval -> 1m, $__interval -> 5s; any other variable is a failure) returns at
 *     least one finite sample;
 *   - every recording rule's series returns at least one finite sample;
 *   - every alert's `signal` annotation (the quantity its expression compares, as it appears in
 *     the expression: checked) returns at least one finite sample, and the whole expression
 *     evaluates without an error (it may be empty: a healthy cluster fires nothing).
 * Skips (77) only when no `prometheus` binary is on PATH. Every process is stopped and the scratch
 * directory removed on every path (kept on failure for the logs). */
#include <ctype.h>
#include <pthread.h>

#include "log.h"
#include "model.h"
#include "openai_util.h"
#include "test_fs.h"

#define DEADLINE_S 40

static int g_rport, g_prom_port;
static _Atomic bool g_stop;
static int32_t g_prompt[24];
static int g_vocab;

/* ---- load ---------------------------------------------------------------------------------- */

static void *load_main(void *arg) {
    bool stream = (intptr_t)arg != 0;
    while (!g_stop) {
        char *body = ou_completion_body("model", g_prompt, 24, 12, 0, stream, NULL, NULL);
        if (stream) {
            cu_sse_t s;
            if (cu_sse_begin(g_rport, "/v1/completions", body, NULL, 30000, &s)) {
                cu_sse_read(&s, -1, now_s() + 30);
                cu_sse_free(&s);
            }
        } else {
            cu_resp_t r;
            cu_http(g_rport, "POST", "/v1/completions", body, NULL, NULL, 30000, &r);
            cu_resp_free(&r);
        }
        speed_free(body);
    }
    return NULL;
}

/* ---- Prometheus HTTP API --------------------------------------------------------------------- */

static void url_encode(const char *in, char *out, size_t cap) {
    static const char hex[] = "0123456789ABCDEF";
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && k + 4 < cap; p++) {
        if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || strchr("-_.~", *p)) {
            out[k++] = (char)*p;
        } else {
            out[k++] = '%';
            out[k++] = hex[*p >> 4];
            out[k++] = hex[*p & 15];
        }
    }
    out[k] = 0;
}

/* Evaluates `expr` now. Returns the number of samples (-1: an error, with the reason in err) and
 * in *n_finite those whose value is a finite number. */
static int prom_query(const char *expr, int *n_finite, char *err, size_t err_cap) {
    char path[8192] = "/api/v1/query?query=";
    url_encode(expr, path + strlen(path), sizeof path - strlen(path));
    cu_resp_t r;
    *n_finite = 0;
    if (!cu_http(g_prom_port, "GET", path, NULL, NULL, NULL, 10000, &r) || r.status != 200 || !r.json) {
        snprintf(err, err_cap, "HTTP %d: %.300s", r.status, r.body ? r.body : "(no answer)");
        cu_resp_free(&r);
        return -1;
    }
    json_t *result = json_object_get(json_object_get(r.json, "data"), "result");
    int n = -1;
    if (json_is_array(result)) {
        n = (int)json_array_size(result);
        size_t i;
        json_t *sample;
        json_array_foreach(result, i, sample) {
            const char *v = json_string_value(json_array_get(json_object_get(sample, "value"), 1));
            if (v && isfinite(strtod(v, NULL))) (*n_finite)++;
        }
    } else {
        snprintf(err, err_cap, "not a vector: %.300s", r.body);
    }
    cu_resp_free(&r);
    return n;
}

/* ---- what must show data ------------------------------------------------------------------- */

typedef struct {
    char what[200];
    char expr[2048];
    bool need_data; /* false: only no error */
} probe_t;

#define MAX_PROBES 200
static probe_t g_probes[MAX_PROBES];
static int g_n_probes;

static void probe_add(const char *what, const char *expr, bool need_data) {
    CHECK_MSG(g_n_probes < MAX_PROBES, "too many probes");
    if (g_n_probes >= MAX_PROBES) return;
    probe_t *p = &g_probes[g_n_probes++];
    snprintf(p->what, sizeof p->what, "%s", what);
    snprintf(p->expr, sizeof p->expr, "%s", expr);
    p->need_data = need_data;
}

/* Replaces the dashboard's template variables; false if one is left that the test does not know. */
static bool substitute(const char *in, char *out, size_t cap) {
    static const struct {
        const char *var, *value;
    } vars[] = {{"${instance}", ".*"},      {"$instance", ".*"},     {"${__rate_interval}", "1m"},
                {"$__rate_interval", "1m"}, {"${__interval}", "5s"}, {"$__interval", "5s"}};
    size_t k = 0;
    for (const char *p = in; *p && k + 1 < cap;) {
        size_t v = 0;
        while (v < sizeof vars / sizeof vars[0] && strncmp(p, vars[v].var, strlen(vars[v].var)) != 0) v++;
        if (v < sizeof vars / sizeof vars[0]) {
            k += (size_t)snprintf(out + k, cap - k, "%s", vars[v].value);
            p += strlen(vars[v].var);
            continue;
        }
        if (*p == '$') return false;
        out[k++] = *p++;
    }
    out[k < cap ? k : cap - 1] = 0;
    return true;
}

static void dashboard_panels(json_t *panels, int *n_exprs) {
    size_t i;
    json_t *panel;
    json_array_foreach(panels, i, panel) {
        json_t *inner = json_object_get(panel, "panels"); /* a collapsed row keeps its panels */
        if (json_is_array(inner)) dashboard_panels(inner, n_exprs);
        const char *title = json_string_value(json_object_get(panel, "title"));
        size_t j;
        json_t *target;
        json_array_foreach(json_object_get(panel, "targets"), j, target) {
            const char *expr = json_string_value(json_object_get(target, "expr"));
            char what[200], sub[2048];
            snprintf(what, sizeof what, "panel \"%s\" target %s", title ? title : "?",
                     json_string_value(json_object_get(target, "refId")));
            CHECK_MSG(expr && *expr, "%s: no expr", what);
            if (!expr) continue;
            CHECK_MSG(substitute(expr, sub, sizeof sub), "%s: unknown template variable in %s", what, expr);
            probe_add(what, sub, true);
            (*n_exprs)++;
        }
    }
}

static void load_dashboard(const char *src) {
    char path[700];
    snprintf(path, sizeof path, "%s/deploy/monitoring/grafana/dashboards/speedserve.json", src);
    json_error_t e;
    json_t *d = json_load_file(path, 0, &e);
    CHECK_MSG(d != NULL, "%s: %s (line %d)", path, e.text, e.line);
    if (!d) return;
    int n = 0;
    dashboard_panels(json_object_get(d, "panels"), &n);
    CHECK_MSG(n >= 20, "the dashboard has %d queries", n);
    json_decref(d);
}

/* Whitespace-free copy, to compare PromQL texts. */
static void squeeze(const char *in, char *out, size_t cap) {
    size_t k = 0;
    for (; *in && k + 1 < cap; in++)
        if (!isspace((unsigned char)*in)) out[k++] = *in;
    out[k] = 0;
}

/* Adds the rules Prometheus loaded; returns false (with why) while they are not all healthy. */
static bool rules_healthy(bool add, char *why, size_t cap) {
    cu_resp_t r;
    if (!cu_http(g_prom_port, "GET", "/api/v1/rules", NULL, NULL, NULL, 10000, &r) || r.status != 200 || !r.json) {
        snprintf(why, cap, "/api/v1/rules: HTTP %d", r.status);
        cu_resp_free(&r);
        return false;
    }
    bool ok = true;
    int n_rec = 0, n_alert = 0;
    size_t i, j;
    json_t *group, *rule;
    json_array_foreach(json_object_get(json_object_get(r.json, "data"), "groups"), i, group) {
        json_array_foreach(json_object_get(group, "rules"), j, rule) {
            const char *name = json_string_value(json_object_get(rule, "name"));
            const char *type = json_string_value(json_object_get(rule, "type"));
            const char *query = json_string_value(json_object_get(rule, "query"));
            const char *health = json_string_value(json_object_get(rule, "health"));
            const char *last = json_string_value(json_object_get(rule, "lastError"));
            if (!name || !type || !query) continue;
            if (!health || strcmp(health, "ok") != 0) {
                snprintf(why, cap, "rule %s: health %s %s", name, health ? health : "?", last ? last : "");
                ok = false;
            }
            if (!add) continue;
            char what[200];
            if (strcmp(type, "recording") == 0) {
                snprintf(what, sizeof what, "recording rule %s", name);
                probe_add(what, name, true);
                n_rec++;
                continue;
            }
            n_alert++;
            const char *signal = json_string_value(json_object_get(json_object_get(rule, "annotations"), "signal"));
            CHECK_MSG(signal != NULL, "alert %s has no signal annotation", name);
            if (!signal) continue;
            char sq[2048], qq[4096];
            squeeze(signal, sq, sizeof sq);
            squeeze(query, qq, sizeof qq);
            CHECK_MSG(strstr(qq, sq) != NULL, "alert %s: its signal %s is not in its expression %s", name, signal,
                      query);
            snprintf(what, sizeof what, "alert %s signal", name);
            probe_add(what, signal, true);
            snprintf(what, sizeof what, "alert %s expression", name);
            probe_add(what, query, false);
        }
    }
    cu_resp_free(&r);
    if (add) {
        CHECK_MSG(n_rec >= 20 && n_alert >= 10, "Prometheus loaded %d recording and %d alerting rules", n_rec, n_alert);
    }
    return ok;
}

/* One round over the probes; prints the failures when `report`. Returns how many failed. */
static int probe_round(bool report) {
    int failed = 0;
    for (int i = 0; i < g_n_probes; i++) {
        char err[400] = "";
        int finite = 0;
        int n = prom_query(g_probes[i].expr, &finite, err, sizeof err);
        bool ok = n >= 0 && (!g_probes[i].need_data || finite > 0);
        if (!ok) {
            failed++;
            if (report)
                CHECK_MSG(false, "%s: %s -> %s", g_probes[i].what, g_probes[i].expr,
                          n < 0    ? err
                          : n == 0 ? "no data"
                                   : "no finite value");
        }
    }
    return failed;
}

/* ---- set-up ------------------------------------------------------------------------------- */

static bool find_prometheus(char *path, size_t cap) {
    const char *env = getenv("PATH");
    char dirs[4096];
    snprintf(dirs, sizeof dirs, "%s", env ? env : "/usr/bin:/bin");
    char *save = NULL;
    for (char *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        snprintf(path, cap, "%s/prometheus", d);
        if (access(path, X_OK) == 0) return true;
    }
    return false;
}

static void write_config(const char *src, int pre, int dec) {
    char targets[700], config[700];
    snprintf(targets, sizeof targets, "%s/targets.json", cu_dir);
    char text[4096];
    snprintf(text, sizeof text,
             "[{\"targets\": [\"127.0.0.1:%d\"], \"labels\": {\"component\": \"router\"}},\n"
             " {\"targets\": [\"127.0.0.1:%d\"], \"labels\": {\"component\": \"prefill\"}},\n"
             " {\"targets\": [\"127.0.0.1:%d\"], \"labels\": {\"component\": \"decode\"}}]\n",
             g_rport, pre, dec);
    tu_write_text(targets, text);
    /* deploy/monitoring/prometheus.yml with a 1 s scrape and evaluation, the rule files by
     * absolute path and the test's targets file */
    snprintf(text, sizeof text,
             "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
             "rule_files:\n  - %s/deploy/monitoring/rules/recording.yml\n"
             "  - %s/deploy/monitoring/rules/alerts.yml\n"
             "scrape_configs:\n  - job_name: speedserve\n    metrics_path: /metrics\n"
             "    file_sd_configs:\n      - files: ['%s']\n",
             src, src, targets);
    snprintf(config, sizeof config, "%s/prometheus.yml", cu_dir);
    tu_write_text(config, text);
}

int main(void) {
    speed_log_configure("error");
    char prom[600];
    if (!find_prometheus(prom, sizeof prom)) {
        fprintf(stderr, "SKIP: no prometheus binary on PATH (Debian package prometheus; deploy/setup.sh)\n");
        return 77;
    }
    const char *src = getenv("SPEED_SOURCE_DIR");
    if (!src) {
        fprintf(stderr, "SPEED_SOURCE_DIR is not set\n");
        return 1;
    }
    double t_start = now_s();
    cu_init("prometheus");
    const char *extra[] = {"--speed.prefill_layers", "3", "--decode.kv_tokens", "8192", NULL};
    cu_cluster_t c;
    cu_cluster_init(&c, 1, 1, extra);
    bool ok = cu_cluster_start_nodes(&c, 60);
    CHECK_MSG(ok, "nodes did not come up");
    bool rok = false;
    cu_proc_t r = ok ? cu_cluster_router(&c, 0, NULL, 30, &rok) : (cu_proc_t){0};
    CHECK_MSG(rok, "router did not come up");
    g_rport = cu_router_port(&c, 0);
    g_prom_port = cu_port_base + 90;
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    g_vocab = model ? model->config.vocab_size : 2;
    speed_model_destroy(model);
    ou_prompt(g_prompt, 24, g_vocab, 13);

    pid_t prom_pid = -1;
    pthread_t load[2];
    int n_load = 0;
    if (ok && rok) {
        write_config(src, cu_pre_http(&c, 0), cu_dec_http(&c, 0));
        char a_config[720], a_tsdb[720], a_listen[64], log[720];
        snprintf(a_config, sizeof a_config, "--config.file=%s/prometheus.yml", cu_dir);
        snprintf(a_tsdb, sizeof a_tsdb, "--storage.tsdb.path=%s/tsdb", cu_dir);
        snprintf(a_listen, sizeof a_listen, "--web.listen-address=127.0.0.1:%d", g_prom_port);
        snprintf(log, sizeof log, "%s/prometheus.log", cu_dir);
        const char *argv[] = {prom, a_config, a_tsdb, a_listen, "--log.level=warn", NULL};
        tu_spawn_params_t sp = {.log_path = log, .die_with_parent = true};
        prom_pid = tu_spawn(argv, &sp);
        CHECK_MSG(prom_pid > 0, "cannot start %s", prom);
        for (int i = 0; i < 2; i++)
            if (pthread_create(&load[n_load], NULL, load_main, (void *)(intptr_t)i) == 0) n_load++;
    }
    if (prom_pid > 0) {
        char why[600] = "";
        bool up = false;
        while (!up && now_s() - t_start < DEADLINE_S) { /* all three targets scraped, rules loaded */
            int finite = 0;
            char err[400];
            up = prom_query("up{job=\"speedserve\"} == 1", &finite, err, sizeof err) == 3 &&
                 rules_healthy(false, why, sizeof why);
            if (!up) usleep(200000);
        }
        CHECK_MSG(up, "Prometheus did not scrape the three targets with healthy rules in time: %s", why);
        if (up) {
            load_dashboard(src);
            rules_healthy(true, why, sizeof why);
            int failed = 1;
            while (failed > 0 && now_s() - t_start < DEADLINE_S) {
                failed = probe_round(false);
                if (failed) usleep(500000);
            }
            CHECK_MSG(rules_healthy(false, why, sizeof why), "%s", why);
            probe_round(true);
            fprintf(stderr, "%d queries (dashboard, recording rules, alerts) returned data after %.1f s\n", g_n_probes,
                    now_s() - t_start);
        }
    }
    g_stop = true;
    for (int i = 0; i < n_load; i++) pthread_join(load[i], NULL);
    if (prom_pid > 0) {
        kill(prom_pid, SIGTERM);
        if (!tu_wait_pid(prom_pid, 10, NULL)) {
            kill(prom_pid, SIGKILL);
            tu_wait_pid(prom_pid, 5, NULL);
        }
    }
    if (r.pid > 0) cu_stop(&r, SIGTERM, 10);
    for (int i = 0; i < c.np; i++) cu_stop(&c.pre[i], SIGTERM, 10);
    for (int i = 0; i < c.nd; i++) cu_stop(&c.dec[i], SIGTERM, 10);
    bool failed = check_failures_ > 0;
    if (failed) {
        cu_log_tail("router0", 10);
        cu_log_tail("prometheus", 20);
    }
    cu_cleanup(failed);
    return CHECK_DONE();
}
