/* speed_k8s_emit: Kubernetes manifests for a cluster file (see k8s_emit.h).
 *
 * Plain fprintf of YAML: every value that comes from the user (image, names, paths) is written
 * as a double-quoted scalar with escapes, every number as a number, so the output parses the
 * same whatever the input holds. The layout of each object follows the Kubernetes API field
 * names; tools/k8s-validate checks the result against the API schemas. */
#include "k8s_emit.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "backend_kind.h"

#define TLS_DIR                     "/etc/speedserve/tls"
#define CONFIG_DIR                  "/etc/speedserve/config"
#define CONFIG_FILE                 CONFIG_DIR "/cluster.yaml"
/* CoreDNS answers for a headless Service with a TTL of 5 s by default. */
#define DNS_TTL_S                   5
/* The router's metrics listener when the file sets none. */
#define ROUTER_METRICS_PORT_DEFAULT 9000

speed_k8s_emit_params_t speed_k8s_emit_default_params(void) {
    speed_k8s_emit_params_t p;
    memset(&p, 0, sizeof p);
    p.name = "speedserve";
    p.model_dir = "/models/model";
    p.shm_mib = 1024;
    p.drain_grace_s = 30;
    p.router_replicas = 1;
    return p;
}

static void set_err(char *err, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t size, const char *fmt, ...) {
    if (!err || !size) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
}

/* RFC 1123 label, at most 40 characters (room for "-prefill", "-tls-decode" and the pod
 * ordinal within 63). */
static bool dns_label(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 40 || s[0] == '-' || s[n - 1] == '-') return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '-')) return false;
    return true;
}

/* A Kubernetes quantity as we accept it: digits, an optional fraction, an optional binary or
 * decimal suffix. */
static bool quantity(const char *s) {
    size_t i = 0, digits = 0;
    while (s[i] >= '0' && s[i] <= '9') i++, digits++;
    if (s[i] == '.') {
        i++;
        while (s[i] >= '0' && s[i] <= '9') i++, digits++;
    }
    if (!digits) return false;
    static const char *const suffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T", "m"};
    for (size_t k = 0; k < sizeof suffixes / sizeof suffixes[0]; k++)
        if (strcmp(s + i, suffixes[k]) == 0) return true;
    return false;
}

/* A double-quoted YAML scalar. */
static void q(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\x%02x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

typedef struct {
    const speed_k8s_emit_params_t *p;
    const speed_cluster_config_t *c;
    const char *name;
    int64_t router_metrics_port;
    int64_t prestop_s; /* the router must see a leaving pod before SIGTERM drains it */
} emit_t;

static FILE *open_out(const char *dir, const char *file, char *path, size_t size, char *err, size_t err_size) {
    snprintf(path, size, "%s/%s", dir, file);
    FILE *f = fopen(path, "w");
    if (!f) set_err(err, err_size, "cannot write %s: %s", path, strerror(errno));
    return f;
}

static speed_status_t close_out(FILE *f, const char *path, char *err, size_t err_size) {
    bool bad = ferror(f) != 0;
    if (fclose(f) != 0) bad = true;
    if (bad) {
        set_err(err, err_size, "cannot write %s: %s", path, strerror(errno));
        return SPEED_ERR_IO;
    }
    return SPEED_OK;
}

static void labels(FILE *f, const emit_t *e, const char *component, int indent) {
    fprintf(f, "%*sapp.kubernetes.io/name: speedserve\n", indent, "");
    fprintf(f, "%*sapp.kubernetes.io/instance: ", indent, "");
    q(f, e->name);
    fprintf(f, "\n%*sapp.kubernetes.io/component: %s\n", indent, "", component);
}

/* metadata with name "<name>-<suffix>" */
static void meta_named(FILE *f, const emit_t *e, const char *suffix, const char *component) {
    fprintf(f, "metadata:\n  name: %s-%s\n  labels:\n", e->name, suffix);
    labels(f, e, component, 4);
}

static void arg(FILE *f, const char *a) {
    fprintf(f, "            - ");
    q(f, a);
    fputc('\n', f);
}

static void arg_int(FILE *f, int64_t v) { fprintf(f, "            - \"%lld\"\n", (long long)v); }

static void tls_args(FILE *f) {
    arg(f, "--tls.ca");
    arg(f, TLS_DIR "/ca.crt");
    arg(f, "--tls.cert");
    arg(f, TLS_DIR "/tls.crt");
    arg(f, "--tls.key");
    arg(f, TLS_DIR "/tls.key");
}

static void common_volumes(FILE *f, const emit_t *e, const char *tls_suffix, bool shm) {
    fprintf(f, "      volumes:\n");
    fprintf(f, "        - name: cluster\n          configMap:\n            name: %s-cluster\n", e->name);
    fprintf(f,
            "        - name: tls\n          secret:\n            secretName: %s-tls-%s\n            defaultMode: 288 # "
            "0440: group-readable for fsGroup\n",
            e->name, tls_suffix);
    fprintf(f,
            "        - name: models\n          persistentVolumeClaim:\n            claimName: %s-models\n"
            "            readOnly: true\n",
            e->name);
    fprintf(f, "        - name: tmp\n          emptyDir:\n            sizeLimit: 64Mi\n");
    if (shm)
        fprintf(f,
                "        - name: shm\n          emptyDir:\n            medium: Memory\n            sizeLimit: %lldMi\n",
                (long long)e->p->shm_mib);
}

static void common_mounts(FILE *f, const emit_t *e, bool shm) {
    fprintf(f, "          volumeMounts:\n");
    fprintf(f, "            - name: cluster\n              mountPath: %s\n              readOnly: true\n", CONFIG_DIR);
    fprintf(f, "            - name: tls\n              mountPath: %s\n              readOnly: true\n", TLS_DIR);
    fprintf(f, "            - name: models\n              mountPath: ");
    q(f, e->p->model_dir);
    fprintf(f, "\n              readOnly: true\n");
    fprintf(f, "            - name: tmp\n              mountPath: /tmp\n"); /* the root file system is read-only */
    if (shm) fprintf(f, "            - name: shm\n              mountPath: /dev/shm\n");
}

static void security(FILE *f) {
    fprintf(f, "      securityContext:\n        runAsNonRoot: true\n        runAsUser: 10001\n"
               "        runAsGroup: 10001\n        fsGroup: 10001\n");
}

static void container_security(FILE *f) {
    fprintf(f, "          securityContext:\n            allowPrivilegeEscalation: false\n"
               "            readOnlyRootFilesystem: true\n            capabilities:\n              drop: [\"ALL\"]\n");
}

static void scrape_annotations(FILE *f, int64_t port) {
    fprintf(f,
            "      annotations:\n        prometheus.io/scrape: \"true\"\n        prometheus.io/port: \"%lld\"\n"
            "        prometheus.io/path: /metrics\n",
            (long long)port);
}

/* ---- files ----------------------------------------------------------------------------- */

static speed_status_t emit_configmap(const emit_t *e, const char *dir, char *err, size_t es) {
    char path[4200];
    FILE *f = open_out(dir, "configmap.yaml", path, sizeof path, err, es);
    if (!f) return SPEED_ERR_IO;
    fprintf(f, "# The cluster file every pod runs (speedctl k8s). No key material: the mTLS files are Secrets.\n");
    fprintf(f, "apiVersion: v1\nkind: ConfigMap\n");
    meta_named(f, e, "cluster", "config");
    fprintf(f, "data:\n  cluster.yaml: |\n");
    const char *t = e->p->cluster_yaml;
    while (*t) {
        size_t n = strcspn(t, "\n");
        if (n) fprintf(f, "    %.*s", (int)n, t);
        fputc('\n', f);
        t += n;
        if (*t == '\n') t++;
    }
    return close_out(f, path, err, es);
}

static speed_status_t emit_router(const emit_t *e, const char *dir, char *err, size_t es) {
    const speed_cluster_config_t *c = e->c;
    int64_t api_port = c->router_port ? c->router_port : 8000;
    char path[4200];
    FILE *f = open_out(dir, "router.yaml", path, sizeof path, err, es);
    if (!f) return SPEED_ERR_IO;
    fprintf(f, "# The router: the OpenAI API behind a Service; it finds the nodes through the pools' headless\n"
               "# Services (<pool>.discovery: dns:NAME) and keeps finding them as the pools scale.\n");
    fprintf(f, "apiVersion: apps/v1\nkind: Deployment\n");
    meta_named(f, e, "router", "router");
    fprintf(f, "spec:\n  replicas: %lld\n  selector:\n    matchLabels:\n", (long long)e->p->router_replicas);
    labels(f, e, "router", 6);
    fprintf(f, "  template:\n    metadata:\n      labels:\n");
    labels(f, e, "router", 8);
    scrape_annotations(f, e->router_metrics_port);
    fprintf(f, "    spec:\n      terminationGracePeriodSeconds: 60\n");
    security(f);
    fprintf(f, "      containers:\n        - name: router\n          image: ");
    q(f, e->p->image);
    fprintf(f, "\n          imagePullPolicy: IfNotPresent\n          command: [\"/usr/local/bin/speed-router\"]\n"
               "          args:\n");
    arg(f, "--config");
    arg(f, CONFIG_FILE);
    arg(f, "--model");
    arg(f, e->p->model_dir);
    arg(f, "--router.listen");
    arg(f, "0.0.0.0");
    arg(f, "--router.port");
    arg_int(f, api_port);
    arg(f, "--metrics.listen");
    arg(f, "0.0.0.0");
    arg(f, "--router.metrics_port");
    arg_int(f, e->router_metrics_port);
    if (c->prefill.replicas > 0) {
        char d[128];
        snprintf(d, sizeof d, "dns:%s-prefill", e->name);
        arg(f, "--prefill.discovery");
        arg(f, d);
    }
    char d[128];
    snprintf(d, sizeof d, "dns:%s-decode", e->name);
    arg(f, "--decode.discovery");
    arg(f, d);
    tls_args(f);
    fprintf(f,
            "          env:\n            - name: SPEED_ROUTER_API_KEYS\n              valueFrom:\n"
            "                secretKeyRef:\n                  name: %s-api-keys\n                  key: keys\n"
            "                  optional: true\n",
            e->name);
    fprintf(f,
            "          ports:\n            - name: http\n              containerPort: %lld\n"
            "            - name: metrics\n              containerPort: %lld\n",
            (long long)api_port, (long long)e->router_metrics_port);
    fprintf(
        f, "          readinessProbe:\n            httpGet:\n              path: /health\n              port: metrics\n"
           "            periodSeconds: 5\n            failureThreshold: 2\n");
    fprintf(f, "          livenessProbe:\n            tcpSocket:\n              port: metrics\n"
               "            periodSeconds: 10\n            failureThreshold: 6\n");
    /* the Service stops sending before SIGTERM; the router then drains (<= 30 s, main.c) */
    fprintf(f,
            "          lifecycle:\n            preStop:\n              exec:\n"
            "                command: [\"/bin/sleep\", \"%d\"]\n",
            DNS_TTL_S);
    fprintf(f, "          resources:\n            requests:\n              cpu: \"1\"\n              memory: 512Mi\n"
               "            limits:\n              memory: 2Gi\n");
    container_security(f);
    common_mounts(f, e, false);
    common_volumes(f, e, "router", false);
    fprintf(f, "---\napiVersion: v1\nkind: Service\n");
    meta_named(f, e, "router", "router");
    fprintf(f, "spec:\n  type: ClusterIP\n  selector:\n");
    labels(f, e, "router", 4);
    fprintf(f,
            "  ports:\n    - name: http\n      port: %lld\n      targetPort: http\n"
            "    - name: metrics\n      port: %lld\n      targetPort: metrics\n",
            (long long)api_port, (long long)e->router_metrics_port);
    return close_out(f, path, err, es);
}

static speed_status_t emit_pool(const emit_t *e, const char *role, const speed_pool_config_t *pool, const char *dir,
                                char *err, size_t es) {
    char file[32], path[4200];
    snprintf(file, sizeof file, "%s.yaml", role);
    FILE *f = open_out(dir, file, path, sizeof path, err, es);
    if (!f) return SPEED_ERR_IO;
    bool cuda = pool->backend == SPEED_BACKEND_CUDA;
    fprintf(f,
            "# The %s pool: one replica per pod, all on %s.grpc_port; the headless Service's DNS\n"
            "# records are what the router's %s.discovery resolves. Scale with\n"
            "# `kubectl scale statefulset %s-%s --replicas N` (a removed pod drains: preStop, then SIGTERM).\n",
            role, role, role, e->name, role);
    fprintf(f, "apiVersion: apps/v1\nkind: StatefulSet\n");
    meta_named(f, e, role, role);
    fprintf(f,
            "spec:\n  serviceName: %s-%s\n  replicas: %lld\n  podManagementPolicy: Parallel\n"
            "  selector:\n    matchLabels:\n",
            e->name, role, (long long)pool->replicas);
    labels(f, e, role, 6);
    fprintf(f, "  template:\n    metadata:\n      labels:\n");
    labels(f, e, role, 8);
    scrape_annotations(f, pool->http_port);
    /* preStop keeps the pod serving while its address leaves DNS and the router re-resolves;
     * then SIGTERM drains it (running requests finish, up to drain_grace_s) */
    fprintf(f, "    spec:\n      terminationGracePeriodSeconds: %lld\n",
            (long long)(e->prestop_s + e->p->drain_grace_s + 15));
    security(f);
    fprintf(f, "      containers:\n        - name: %s\n          image: ", role);
    q(f, e->p->image);
    fprintf(f,
            "\n          imagePullPolicy: IfNotPresent\n          command: [\"/usr/local/bin/speed-%s\"]\n"
            "          args:\n",
            role);
    arg(f, "--config");
    arg(f, CONFIG_FILE);
    arg(f, "--model");
    arg(f, e->p->model_dir);
    arg(f, "--node.index");
    arg(f, "0");
    arg(f, "--host");
    arg(f, "$(POD_IP)");
    arg(f, "--control.listen");
    arg(f, "0.0.0.0");
    arg(f, "--metrics.listen");
    arg(f, "0.0.0.0");
    arg(f, "--ucx.transport");
    arg(f, "tcp");
    arg(f, "--ucx.net_devices");
    arg(f, "eth0");
    if (cuda) {
        char key[48];
        snprintf(key, sizeof key, "--%s.device", role);
        arg(f, key); /* the pod sees only its own GPUs, from 0 */
        arg(f, "0");
    }
    tls_args(f);
    fprintf(f, "          env:\n            - name: POD_IP\n              valueFrom:\n                fieldRef:\n"
               "                  fieldPath: status.podIP\n");
    fprintf(f,
            "          ports:\n            - name: grpc\n              containerPort: %lld\n"
            "            - name: metrics\n              containerPort: %lld\n",
            (long long)pool->grpc_port, (long long)pool->http_port);
    /* /health: 503 while loading and draining, so a pod is in the Service's DNS only while it
     * serves; the liveness probe only asks that the listener answers */
    fprintf(f, "          startupProbe:\n            tcpSocket:\n              port: metrics\n"
               "            periodSeconds: 5\n            failureThreshold: 120\n");
    fprintf(
        f, "          readinessProbe:\n            httpGet:\n              path: /health\n              port: metrics\n"
           "            periodSeconds: 5\n            failureThreshold: 2\n");
    fprintf(f, "          livenessProbe:\n            tcpSocket:\n              port: metrics\n"
               "            periodSeconds: 10\n            failureThreshold: 6\n");
    fprintf(f,
            "          lifecycle:\n            preStop:\n              exec:\n"
            "                command: [\"/bin/sleep\", \"%lld\"]\n",
            (long long)e->prestop_s);
    int64_t cpu = pool->threads > 0 ? pool->threads : 1;
    long long gpus = (long long)pool->tensor_parallel; /* one GPU per rank */
    const char *mem_req = e->p->memory_request ? e->p->memory_request : "4Gi";
    const char *mem_lim = e->p->memory_limit ? e->p->memory_limit : "8Gi";
    fprintf(f, "          resources:\n            requests:\n              cpu: \"%lld\"\n              memory: ",
            (long long)cpu);
    q(f, mem_req);
    if (cuda) fprintf(f, "\n              nvidia.com/gpu: \"%lld\"", gpus);
    fprintf(f, "\n            limits:\n              memory: ");
    q(f, mem_lim);
    if (cuda) fprintf(f, "\n              nvidia.com/gpu: \"%lld\"", gpus);
    fputc('\n', f);
    container_security(f);
    common_mounts(f, e, true);
    common_volumes(f, e, role, true);
    fprintf(f, "---\napiVersion: v1\nkind: Service\n");
    meta_named(f, e, role, role);
    fprintf(f, "spec:\n  clusterIP: None\n  publishNotReadyAddresses: false\n  selector:\n");
    labels(f, e, role, 4);
    fprintf(f,
            "  ports:\n    - name: grpc\n      port: %lld\n      targetPort: grpc\n"
            "    - name: metrics\n      port: %lld\n      targetPort: metrics\n",
            (long long)pool->grpc_port, (long long)pool->http_port);
    return close_out(f, path, err, es);
}

static speed_status_t emit_podmonitor(const emit_t *e, const char *dir, char *err, size_t es) {
    char path[4200];
    FILE *f = open_out(dir, "podmonitor.yaml", path, sizeof path, err, es);
    if (!f) return SPEED_ERR_IO;
    fprintf(f, "# Prometheus operator: scrape /metrics of the router and of every node (the pods also carry\n"
               "# prometheus.io/* annotations for a Prometheus without the operator).\n");
    fprintf(f, "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\n");
    meta_named(f, e, "pods", "monitoring");
    fprintf(f, "spec:\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: speedserve\n"
               "      app.kubernetes.io/instance: ");
    q(f, e->name);
    fprintf(f, "\n  podMetricsEndpoints:\n    - port: metrics\n      path: /metrics\n      interval: 15s\n");
    return close_out(f, path, err, es);
}

static speed_status_t emit_kustomization(const emit_t *e, const char *dir, char *err, size_t es) {
    char path[4200];
    FILE *f = open_out(dir, "kustomization.yaml", path, sizeof path, err, es);
    if (!f) return SPEED_ERR_IO;
    fprintf(f,
            "# Written by `speedctl k8s` (docs/kubernetes.md). Secrets and the model volume are not here:\n"
            "# create %s-tls-{router,prefill,decode} and the PersistentVolumeClaim %s-models first.\n",
            e->name, e->name);
    fprintf(f, "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n");
    if (e->p->k8s_namespace && e->p->k8s_namespace[0]) {
        fprintf(f, "namespace: ");
        q(f, e->p->k8s_namespace);
        fputc('\n', f);
    }
    fprintf(f, "resources:\n  - configmap.yaml\n  - router.yaml\n");
    if (e->c->prefill.replicas > 0) fprintf(f, "  - prefill.yaml\n");
    fprintf(f, "  - decode.yaml\n  - podmonitor.yaml\n");
    return close_out(f, path, err, es);
}

speed_status_t speed_k8s_emit(const speed_k8s_emit_params_t *params, const char *dir, char *err, size_t err_size) {
    if (err && err_size) err[0] = '\0';
    if (!params || !dir || !dir[0] || !params->cluster || !params->cluster_yaml || !params->image ||
        !params->image[0]) {
        set_err(err, err_size, "the cluster, its file's text, an image and an output directory are required");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const char *name = params->name ? params->name : "speedserve";
    if (!dns_label(name)) {
        set_err(err, err_size, "name '%s' is not a DNS label of at most 40 characters (a-z, 0-9, '-')", name);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (params->k8s_namespace && params->k8s_namespace[0] && !dns_label(params->k8s_namespace)) {
        set_err(err, err_size, "namespace '%s' is not a DNS label", params->k8s_namespace);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const char *quantities[] = {params->memory_request, params->memory_limit};
    for (int i = 0; i < 2; i++)
        if (quantities[i] && !quantity(quantities[i])) {
            set_err(err, err_size, "'%s' is not a Kubernetes quantity (e.g. 8Gi)", quantities[i]);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    const char *model_dir = params->model_dir ? params->model_dir : "/models/model";
    if (model_dir[0] != '/' || params->shm_mib < 1 || params->drain_grace_s < 1 || params->router_replicas < 1 ||
        strchr(params->image, '\n')) {
        set_err(err, err_size,
                "model_dir must be an absolute path, shm_mib, drain_grace_s and router_replicas at least 1, the image "
                "one line");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_k8s_emit_params_t p = *params;
    p.name = name;
    p.model_dir = model_dir;
    const speed_cluster_config_t *c = params->cluster;
    emit_t e = {&p, c, name, c->router_metrics_port ? c->router_metrics_port : ROUTER_METRICS_PORT_DEFAULT, 0};
    /* DNS TTL + one re-resolution + one health poll, rounded up, + 1 s of slack */
    e.prestop_s = DNS_TTL_S + (c->discovery_interval_ms + c->status_interval_ms + 999) / 1000 + 1;

    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        set_err(err, err_size, "cannot create %s: %s", dir, strerror(errno));
        return SPEED_ERR_IO;
    }
    speed_status_t st = emit_configmap(&e, dir, err, err_size);
    if (st == SPEED_OK) st = emit_router(&e, dir, err, err_size);
    if (st == SPEED_OK && c->prefill.replicas > 0) st = emit_pool(&e, "prefill", &c->prefill, dir, err, err_size);
    if (st == SPEED_OK) st = emit_pool(&e, "decode", &c->decode, dir, err, err_size);
    if (st == SPEED_OK) st = emit_podmonitor(&e, dir, err, err_size);
    if (st == SPEED_OK) st = emit_kustomization(&e, dir, err, err_size);
    return st;
}
