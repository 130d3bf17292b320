/* speedctl k8s: Kubernetes manifests (a Kustomize base) for a cluster file (k8s_emit.h,
 * docs/kubernetes.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "backend_kind.h"
#include "cluster_config.h"
#include "file.h"
#include "k8s_emit.h"
#include "speedctl.h"

#define K8S_USAGE            "speedctl k8s CLUSTER.yaml --out DIR --image IMAGE [--name N] [--namespace NS] [--model-dir PATH]"
/* A cluster file is a page of YAML; anything this big is not one. */
#define K8S_MAX_CLUSTER_FILE (1 << 20)

typedef struct {
    char *out, *image, *name, *ns, *model_dir, *memory_request, *memory_limit;
    int64_t shm_mib, router_replicas;
} k8s_opts_t;

static const speed_config_field_t k8s_fields[] = {
    SPEEDCTL_TEXT_OPT(k8s_opts_t, "out", out, "directory to write the manifests into (created if missing)"),
    SPEEDCTL_TEXT_OPT(k8s_opts_t, "image", image, "container image of every pod (deploy/Dockerfile builds one)"),
    SPEEDCTL_OPT(k8s_opts_t, "name", STRING, name, "speedserve", SPEED_CONFIG_UNBOUNDED, NULL,
                 "prefix of every object's name (a DNS label)"),
    SPEEDCTL_TEXT_OPT(k8s_opts_t, "namespace", ns, "namespace set in kustomization.yaml (default: none)"),
    SPEEDCTL_OPT(k8s_opts_t, "model-dir", STRING, model_dir, "/models/model", SPEED_CONFIG_UNBOUNDED, NULL,
                 "the model directory inside the pods (the volume <name>-models is mounted there)"),
    SPEEDCTL_OPT(k8s_opts_t, "shm-mib", INT, shm_mib, "1024", 64, 1 << 20, NULL,
                 "/dev/shm of a node pod in MiB (a memory emptyDir; UCX's shared memory)"),
    SPEEDCTL_OPT(k8s_opts_t, "router-replicas", INT, router_replicas, "1", 1, 64, NULL, "router pods"),
    SPEEDCTL_TEXT_OPT(k8s_opts_t, "memory-request", memory_request, "memory request of a node pod (default 4Gi)"),
    SPEEDCTL_TEXT_OPT(k8s_opts_t, "memory-limit", memory_limit,
                      "memory limit of a node pod, /dev/shm included (default 8Gi)"),
};

int speedctl_k8s(int argc, char **argv) {
    /* SPEED_CONFIG names a cluster file; the option loader would read it as this verb's options */
    unsetenv("SPEED_CONFIG");
    k8s_opts_t o;
    speed_config_t *cfg = NULL, *ccfg = NULL;
    bool done = false;
    int rc = speedctl_options_load("k8s", K8S_USAGE, k8s_fields, sizeof k8s_fields / sizeof k8s_fields[0], &o, argc,
                                   argv, &cfg, &done);
    if (done) return rc;
    rc = SPEEDCTL_EXIT_USAGE;
    char *const *pos = NULL;
    int n_pos = speed_config_positional(cfg, &pos);
    speed_cluster_config_t c;
    char *text = NULL;
    size_t len = 0;
    if (n_pos != 1) {
        speedctl_fail("one cluster file expected: %s", K8S_USAGE);
    } else if (!o.out || !o.out[0] || !o.image || !o.image[0]) {
        speedctl_fail("--out and --image are required: %s", K8S_USAGE);
    } else if (speed_file_read(pos[0], K8S_MAX_CLUSTER_FILE, SPEED_SUBSYS_CORE, 0, &text, &len) != SPEED_OK) {
        rc = SPEEDCTL_EXIT_FAIL; /* logged, naming the file */
    } else if (strlen(text) != len) {
        speedctl_fail("%s holds a NUL byte: not a cluster file", pos[0]);
    } else {
        char *cargv[] = {"k8s", "--config", (char *)pos[0], NULL};
        rc = SPEEDCTL_EXIT_FAIL;
        if (speed_cluster_config_load(3, cargv, "router", &c, &ccfg) == SPEED_OK) {
            speed_k8s_emit_params_t p = speed_k8s_emit_default_params();
            p.cluster = &c;
            p.cluster_yaml = text;
            p.image = o.image;
            p.name = o.name;
            p.k8s_namespace = o.ns;
            p.model_dir = o.model_dir;
            p.shm_mib = o.shm_mib;
            p.router_replicas = o.router_replicas;
            p.memory_request = o.memory_request;
            p.memory_limit = o.memory_limit;
            const speed_pool_config_t *pools[2] = {&c.prefill, &c.decode};
            for (int i = 0; i < 2; i++)
                if (pools[i]->backend == SPEED_BACKEND_CUDA && pools[i]->tensor_parallel > 1 && pools[i]->replicas > 0)
                    fprintf(stderr,
                            "speedctl: warning: %s: tensor_parallel %lld on cuda: the pods ask for %lld GPUs each, but "
                            "cuda nodes start with tensor_parallel 1 only today (docs/tensor-parallel.md)\n",
                            i == 0 ? "prefill" : "decode", (long long)pools[i]->tensor_parallel,
                            (long long)pools[i]->tensor_parallel);
            char err[1024];
            if (speed_k8s_emit(&p, o.out, err, sizeof err) != SPEED_OK) {
                speedctl_fail("%s", err);
            } else {
                printf("wrote %s/kustomization.yaml and its manifests (%lld prefill, %lld decode pods)\n"
                       "before `kubectl apply -k %s`: the Secrets %s-tls-{router,prefill,decode} and the volume "
                       "%s-models (docs/kubernetes.md)\n",
                       o.out, (long long)c.prefill.replicas, (long long)c.decode.replicas, o.out, o.name, o.name);
                rc = SPEEDCTL_EXIT_OK;
            }
        }
    }
    speed_free(text);
    speed_config_destroy(ccfg);
    speed_config_destroy(cfg);
    return rc;
}
