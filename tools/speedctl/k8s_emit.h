/* speed_k8s_emit: Kubernetes manifests (a Kustomize base) for a cluster file.
 *
 * What it writes into `dir` (created if missing; files are replaced):
 *   kustomization.yaml   the base: the files below, a namespace when one is given
 *   configmap.yaml       ConfigMap <name>-cluster: the cluster file verbatim (key cluster.yaml)
 *   router.yaml          Deployment <name>-router + Service <name>-router (API port and, when
 *                        router.metrics_port is set, the metrics port)
 *   prefill.yaml         StatefulSet <name>-prefill + headless Service <name>-prefill
 *                        (omitted when prefill.replicas is 0)
 *   decode.yaml          StatefulSet <name>-decode + headless Service <name>-decode
 *   podmonitor.yaml      PodMonitors (monitoring.coreos.com/v1) for the router and the nodes
 * The pods run the cluster file from the ConfigMap with the Kubernetes settings on their
 * command line (argv wins over the file): every node listens on its pool's grpc_port / http_port
 * (node.index 0: one replica per pod), binds 0.0.0.0, KV goes over ucx tcp on eth0, and the
 * router finds the nodes with `<pool>.discovery: dns:<name>-<pool>` (the headless Services).
 * Pods: readiness on /health, liveness, a preStop that lets the router see the pod leave
 * before SIGTERM drains it (terminationGracePeriodSeconds covers the drain), /dev/shm as a
 * memory emptyDir, `nvidia.com/gpu: tensor_parallel` for cuda pools, requests/limits (cpu:
 * <pool>.threads, at least 1),
 * prometheus.io scrape annotations, the mTLS files from the Secrets <name>-tls-router,
 * <name>-tls-prefill and <name>-tls-decode (keys ca.crt, tls.crt, tls.key; not written here:
 * they hold private keys — docs/kubernetes.md says how to make them; the node certificates must
 * name <name>-prefill / <name>-decode, the discovery names the router checks), the API keys from
 * the optional Secret <name>-api-keys (key `keys`), the model from the PersistentVolumeClaim
 * <name>-models mounted read-only at model_dir. Non-root (uid 10001), read-only root file system.
 *
 * Output is deterministic (same inputs, same bytes), so a committed base can be compared with
 * a fresh emit. The cluster file text is embedded as a YAML block scalar; it must be UTF-8 text.
 * The router's metrics listener is router.metrics_port, or 9000 when the file has none (readiness
 * and scraping then need no API key).
 *
 * Threading: no shared state; callable from any thread. Blocking: file I/O.
 */
#ifndef SPEED_K8S_EMIT_H
#define SPEED_K8S_EMIT_H

#include <stddef.h>
#include <stdint.h>

#include "cluster_config.h"
#include "status.h"

typedef struct {
    const speed_cluster_config_t *cluster; /* pools (replicas, tensor_parallel, ports, backend), router
                                              ports; borrowed; required */
    const char *cluster_yaml;              /* the cluster file's text for the ConfigMap; required */
    const char *image;                     /* container image of every pod; required */
    const char *name;                      /* object name prefix (DNS label); default "speedserve" */
    const char *k8s_namespace;             /* namespace for kustomization.yaml; NULL/"" = none */
    const char *model_dir;                 /* model directory inside the pods; default "/models/model" */
    int64_t shm_mib;                       /* /dev/shm (memory emptyDir) of a node pod, MiB; default 1024 */
    int64_t drain_grace_s;                 /* a node's drain after SIGTERM (speed_node_main: 30 s); default 30 */
    int64_t router_replicas;               /* router pods; default 1 */
    const char *memory_request;            /* per node pod, e.g. "8Gi"; NULL = "4Gi" */
    const char *memory_limit;              /* per node pod (counts /dev/shm); NULL = "8Gi" */
} speed_k8s_emit_params_t;

/* name "speedserve", model_dir "/models/model", shm_mib 1024, drain_grace_s 30, router_replicas 1,
 * the rest NULL. */
speed_k8s_emit_params_t speed_k8s_emit_default_params(void);

/* Writes the manifests listed above into dir.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL/missing required params, a name that is not a
 * DNS label, a bad resource quantity) with the reason in err; SPEED_ERR_IO (a directory or file
 * cannot be written; err names it and the cause) ; SPEED_ERR_NO_MEMORY. err may be NULL (size 0). */
speed_status_t speed_k8s_emit(const speed_k8s_emit_params_t *params, const char *dir, char *err, size_t err_size);

#endif /* SPEED_K8S_EMIT_H */
