/* speedctl certs: the control plane's certificates for a cluster (docs/security.md#the-control-plane).
 *
 * One CA and one certificate per process of the cluster file: "router", "prefill-<i>",
 * "decode-<i>" and "admin" (speedctl's own, for operators). The common name is the identity the
 * nodes authorise calls by; the subject alternative names are the addresses the process is
 * dialled at (the cluster's host, loopback, and --host). speedctl up uses the same function
 * for a throwaway set in a private temporary directory. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "cluster_config.h"
#include "speedctl.h"
#include "tls.h"

#define CERTS_USAGE            "speedctl certs --config CLUSTER.yaml --out DIR [--host ADDR,...] [--days N] [--force]"
#define CERTS_MAX_HOST         16
#define SPEEDCTL_TMP_CERT_DAYS 30 /* speedctl up's throwaway set: a run, not a deployment */

typedef struct {
    char *out;
    char *host;
    int64_t days;
    bool force;
} certs_opts_t;

static const speed_config_field_t certs_fields[] = {
    SPEEDCTL_TEXT_OPT(certs_opts_t, "out", out, "directory to write ca.crt, ca.key and <process>.crt/.key into"),
    SPEEDCTL_TEXT_OPT(certs_opts_t, "host", host,
                      "more addresses or DNS names the processes are reached at (comma-separated), besides the "
                      "cluster's host, control.listen and loopback"),
    SPEEDCTL_OPT(certs_opts_t, "days", INT, days, "365", 1, 36500, NULL, "validity of the process certificates"),
    SPEEDCTL_OPT(certs_opts_t, "force", BOOL, force, "false", SPEED_CONFIG_UNBOUNDED, NULL,
                 "overwrite files that exist"),
};

/* Adds `h` to the list unless it is empty, a wildcard or already there. */
static void host_add(const char **hosts, int *n, const char *h) {
    if (!h || !h[0] || strcmp(h, "0.0.0.0") == 0 || strcmp(h, "::") == 0 || *n >= CERTS_MAX_HOST) return;
    for (int i = 0; i < *n; i++)
        if (strcmp(hosts[i], h) == 0) return;
    hosts[(*n)++] = h;
}

static speed_status_t write_one(const speed_tls_pem_t *ca, const char *dir, const char *name, const char *const *hosts,
                                int n_hosts, int64_t days, bool force, char *err, size_t size) {
    speed_tls_cert_params_t p = {.cn = name, .hosts = hosts, .n_hosts = n_hosts, .days = days};
    speed_tls_pem_t pem = {0};
    SPEED_CHECK(speed_tls_cert_issue(ca, &p, &pem, err, size));
    char crt[4096], key[4096];
    snprintf(crt, sizeof crt, "%s/%s.crt", dir, name);
    snprintf(key, sizeof key, "%s/%s.key", dir, name);
    speed_status_t st = speed_tls_pem_write(&pem, crt, key, force, err, size);
    speed_tls_pem_cleanup(&pem);
    return st;
}

speed_status_t speedctl_certs_write(const speed_cluster_config_t *c, const char *dir, const char *extra_hosts,
                                    int64_t days, bool force, char *err, size_t size) {
    /* SANs: what peers dial (host), what the servers bind when it is an address, loopback */
    char *extra = speed_strdup(extra_hosts ? extra_hosts : "");
    if (!extra) return SPEED_ERR_NO_MEMORY;
    const char *hosts[CERTS_MAX_HOST];
    int n_hosts = 0;
    host_add(hosts, &n_hosts, c->host);
    host_add(hosts, &n_hosts, c->control_listen);
    /* the pools' per-replica hosts (the lists are copied: host_add keeps pointers) */
    char items[CERTS_MAX_HOST][256];
    int n_items = 0;
    const speed_pool_config_t *pools[2] = {&c->prefill, &c->decode};
    for (int p = 0; p < 2; p++)
        for (int64_t i = 0; i < pools[p]->replicas && n_items < CERTS_MAX_HOST &&
                            speed_cluster_list_item(pools[p]->hosts, i, items[n_items], sizeof items[0]);
             i++)
            host_add(hosts, &n_hosts, items[n_items++]);
    /* a discovered pool is dialled at addresses no one knows ahead of time: the router checks
     * its nodes' certificates for the discovery name (a DNS SAN) instead */
    for (int p = 0; p < 2; p++)
        if (speed_cluster_discovery_name(pools[p])[0])
            host_add(hosts, &n_hosts, speed_cluster_discovery_name(pools[p]));
    host_add(hosts, &n_hosts, "127.0.0.1");
    host_add(hosts, &n_hosts, "::1");
    host_add(hosts, &n_hosts, "localhost");
    for (char *save = NULL, *h = strtok_r(extra, ", ", &save); h; h = strtok_r(NULL, ", ", &save))
        host_add(hosts, &n_hosts, h);

    speed_tls_cert_params_t cap = {.cn = "speedserve cluster CA", .days = SPEED_TLS_CA_DAYS};
    speed_tls_pem_t ca = {0};
    char crt[4096], key[4096], name[48];
    speed_status_t st = speed_tls_ca_create(&cap, &ca, err, size);
    if (st == SPEED_OK) {
        snprintf(crt, sizeof crt, "%s/ca.crt", dir);
        snprintf(key, sizeof key, "%s/ca.key", dir);
        st = speed_tls_pem_write(&ca, crt, key, force, err, size);
    }
    if (st == SPEED_OK) st = write_one(&ca, dir, "router", hosts, n_hosts, days, force, err, size);
    if (st == SPEED_OK) st = write_one(&ca, dir, "admin", hosts, n_hosts, days, force, err, size);
    for (int64_t i = 0; st == SPEED_OK && i < c->prefill.replicas; i++) {
        snprintf(name, sizeof name, "prefill-%lld", (long long)i);
        st = write_one(&ca, dir, name, hosts, n_hosts, days, force, err, size);
    }
    for (int64_t i = 0; st == SPEED_OK && i < c->decode.replicas; i++) {
        snprintf(name, sizeof name, "decode-%lld", (long long)i);
        st = write_one(&ca, dir, name, hosts, n_hosts, days, force, err, size);
    }
    speed_tls_pem_cleanup(&ca);
    speed_free(extra);
    return st;
}

bool speedctl_certs_tmp_make(const speed_cluster_config_t *c, char *dir, size_t size) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, size, "%s/speedctl-certs-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) { /* mode 0700 */
        speedctl_fail("cannot create a certificate directory %s: %s", dir, strerror(errno));
        dir[0] = '\0';
        return false;
    }
    char err[1024] = "";
    if (speedctl_certs_write(c, dir, NULL, SPEEDCTL_TMP_CERT_DAYS, false, err, sizeof err) != SPEED_OK) {
        speedctl_fail("control plane certificates: %s", err);
        return false; /* the caller still removes dir */
    }
    return true;
}

void speedctl_certs_tmp_remove(char *dir) {
    if (!dir || !dir[0]) return;
    DIR *d = opendir(dir);
    if (d) {
        char path[PATH_MAX + 300];
        for (struct dirent *e = readdir(d); e; e = readdir(d)) {
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    if (rmdir(dir) != 0) speedctl_fail("cannot remove %s: %s", dir, strerror(errno));
    dir[0] = '\0';
}

/* Takes "--config FILE" (or --config=FILE) out of argv: it names the cluster file here, not a
 * file of this verb's options. Returns the file or NULL; *argc_p shrinks. */
static const char *take_config(int *argc_p, char **argv) {
    const char *file = NULL;
    int n = 1;
    for (int i = 1; i < *argc_p; i++) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < *argc_p) {
            file = argv[++i];
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            file = argv[i] + 9;
        } else {
            argv[n++] = argv[i];
        }
    }
    argv[n] = NULL;
    *argc_p = n;
    return file;
}

int speedctl_certs(int argc, char **argv) {
    char **args = speed_calloc((size_t)argc + 1, sizeof *args);
    if (!args) return SPEEDCTL_EXIT_FAIL;
    memcpy(args, argv, (size_t)argc * sizeof *args);
    const char *file = take_config(&argc, args);
    /* SPEED_CONFIG names the cluster file too; the option loader would read it as this verb's */
    char env_file[4096] = "";
    const char *env = getenv("SPEED_CONFIG");
    if (env) {
        snprintf(env_file, sizeof env_file, "%s", env);
        unsetenv("SPEED_CONFIG");
        if (!file) file = env_file;
    }

    certs_opts_t o;
    speed_config_t *cfg = NULL, *ccfg = NULL;
    bool done = false;
    int rc = speedctl_options_load("certs", CERTS_USAGE, certs_fields, sizeof certs_fields / sizeof certs_fields[0], &o,
                                   argc, args, &cfg, &done);
    if (done) {
        speed_free(args);
        return rc;
    }
    rc = SPEEDCTL_EXIT_USAGE;
    char *const *pos = NULL;
    speed_cluster_config_t c;
    if (speed_config_positional(cfg, &pos) > 0) {
        speedctl_fail("unexpected argument '%s' (see speedctl certs --help)", pos[0]);
    } else if (!file) {
        speedctl_fail("no cluster file: %s", CERTS_USAGE);
    } else if (!o.out || !o.out[0]) {
        speedctl_fail("no output directory: %s", CERTS_USAGE);
    } else {
        char *cargv[] = {"certs", "--config", (char *)file, NULL};
        if (speed_cluster_config_load(3, cargv, NULL, &c, &ccfg) == SPEED_OK) rc = SPEEDCTL_EXIT_FAIL;
    }
    if (rc == SPEEDCTL_EXIT_FAIL) {
        if (mkdir(o.out, 0700) != 0 && errno != EEXIST) {
            speedctl_fail("cannot create %s: %s", o.out, strerror(errno));
        } else {
            char err[1024] = "";
            if (speedctl_certs_write(&c, o.out, o.host, o.days, o.force, err, sizeof err) != SPEED_OK) {
                speedctl_fail("%s", err);
            } else {
                printf("wrote %s/ca.crt, ca.key (keep it offline), and a certificate + key for router, admin, "
                       "%lld prefill and %lld decode replica(s)\n"
                       "give each process its own: --tls.ca %s/ca.crt --tls.cert %s/<name>.crt --tls.key "
                       "%s/<name>.key\n",
                       o.out, (long long)c.prefill.replicas, (long long)c.decode.replicas, o.out, o.out, o.out);
                rc = SPEEDCTL_EXIT_OK;
            }
        }
    }
    speed_config_destroy(ccfg);
    speed_config_destroy(cfg);
    speed_free(args);
    return rc;
}
