/* speed_cluster_config: the one YAML file that describes a speedserve cluster.
 *
 * Every daemon (speed-router, speed-prefill, speed-decode) and `speedctl up` load the same
 * file with the same table, so a key means the same thing everywhere and a typo is an error
 * in every program. Each daemon reads its own section plus the shared ones; `node.index`
 * says which replica of its pool a process is (speedctl up sets it on the command line).
 *
 *   model: /models/llama-3.1-8b        # Hugging Face layout (config.json, safetensors, tokenizer)
 *   speed:   {prefill_layers: "0.75", anchors: 1, tail: 1, allow_request_override: true}
 *   router:  {port: 8000, decode_only_below: 32, prefill_policy: least-loaded, ...}
 *   prefill: {replicas: 2, tensor_parallel: 1, grpc_port: 8100, http_port: 8200, ...}
 *   decode:  {replicas: 1, backend: cuda, device: 0, grpc_port: 8300, http_port: 8400, ...}
 *   ucx:     {transport: shm, net_devices: lo}
 *
 * Replica i of a pool listens on grpc_port + i (gRPC) and http_port + i (/metrics, /health),
 * at <pool>.hosts entry i when the pools span several hosts (else at host);
 * a port 0 base is not allowed for pools, because the router finds nodes by these numbers.
 * Likewise replica i of a cuda pool runs on GPU device + i.
 * Precedence as everywhere: defaults < file < SPEED_* environment < command line
 * (`--decode.replicas 2`). docs/cluster.md lists every key (--help prints them from this table
 * with defaults and bounds).
 *
 * Ownership: strings point into the speed_config_t returned by load; keep it until done.
 * Thread-safety: load once at startup; the struct is then read-only.
 */
#ifndef SPEED_CLUSTER_CONFIG_H
#define SPEED_CLUSTER_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "depth.h"
#include "status.h"
#include "tls.h"

typedef enum { SPEED_POLICY_ROUND_ROBIN = 0, SPEED_POLICY_LEAST_LOADED } speed_policy_t;
/* router.kv_routing (docs/router.md#kv-aware-routing): off = the decode policy alone; affinity = score
 * decode nodes by the prompt's cached prefix and their load (router.kv_affinity_weight). */
typedef enum { SPEED_KV_ROUTING_OFF = 0, SPEED_KV_ROUTING_AFFINITY } speed_kv_routing_t;

typedef struct {
    int64_t replicas;        /* >= 0 (prefill 0: every request takes the decode-only route) */
    int64_t tensor_parallel; /* ranks per replica (1 on CPU) */
    const char *hosts;       /* comma-separated address per replica peers dial; "" = host */
    const char *discovery;   /* router: "dns:NAME" = find the pool's nodes in NAME's A/AAAA records
                              * (port grpc_port) instead of replicas/hosts; "" = the static list */
    int64_t grpc_port, http_port;
    int backend;             /* speed_backend_kind_t (backend_kind.h) */
    int64_t device;          /* cuda: device of replica 0; replica i uses device + i */
    int64_t threads;         /* compute threads per replica (CPU backends); 0 = all cores */
    int64_t max_running;     /* sequences in the engine at once */
    int64_t max_waiting;     /* queued beyond max_running */
    int64_t kv_tokens;       /* KV capacity: prompt + generated tokens at full depth in the
                                * lower pool; the upper pool is sized with SPEED's saving */
    int64_t max_step_tokens; /* rows one engine step computes */
    int64_t prefill_chunk;   /* prompt tokens of one sequence per step */
} speed_pool_config_t;

typedef struct {
    const char *model;             /* model directory (required by daemons) */
    const char *served_model_name; /* the "model" the API expects; NULL = directory name */
    const char *host;              /* address peers dial (nodes' gRPC, KV) */
    const char *control_listen;    /* address the nodes' gRPC servers bind (default 127.0.0.1) */
    const char *metrics_listen;    /* bind address of every /metrics,/health listener */
    const char *log;               /* log spec, e.g. "info" or "warn,net=debug" */
    bool weights_hugepages;        /* read the weights into 2 MiB pages instead of mapping them */

    /* SPEED */
    const char *prefill_layers; /* "" or NULL = L (off); "24" or "0.75" */
    int64_t anchors, tail;
    bool allow_request_override; /* honour a request's `speed` object */

    /* KV cache */
    int kv_dtype; /* speed_dtype_t or SPEED_KV_DTYPE_AUTO (dtype.h) */
    int64_t kv_block_tokens;
    int64_t lease_ms;                     /* a reservation not claimed in time is freed */
    bool kv_integrity;                    /* integrity mode of the KV plane (per-layer HMAC tags) */
    int64_t debug_prefill_layer_delay_ms; /* test knob: slow prefill node */

    /* engine */
    bool batch_invariant; /* engine.batch_invariant: the nodes' backends reduce each row in one
                           * order whatever the batch (speed_backend_params_t.batch_invariant) */

    /* router */
    int64_t router_port, router_threads;
    const char *router_listen;              /* bind address of the OpenAI API */
    int64_t router_metrics_port;            /* the router's own /metrics,/health listener; 0 = none */
    const char *api_tls_cert, *api_tls_key; /* router.tls_*: PEM files, HTTPS on the API when both are set */
    const char *api_keys;                   /* SECRET: comma-separated; "" = no authentication (env or file only) */
    const char *api_keys_file;              /* one key per line, optional per-key limits (docs/router.md) */
    int64_t key_max_in_flight, key_max_kv_tokens, key_burst; /* per key; 0 = unlimited */
    double key_rate;                                         /* requests/s per key; 0 = unlimited */
    int64_t max_body_bytes, max_json_elements;
    int64_t stream_buffer_bytes;    /* SSE bytes pending for one client before it is cut off */
    int64_t max_connections_per_ip; /* 0 = unlimited */
    int64_t header_timeout_ms;      /* a connection idle this long (headers included) is closed */
    const char *allowed_hosts;      /* comma-separated Host values; "" = any */
    const char *cors_origins;       /* comma-separated Origins allowed; "" = no CORS */
    bool content_special_tokens;    /* chat content may spell special tokens */
    int64_t max_in_flight, max_queue, queue_timeout_ms, request_timeout_ms;
    int64_t decode_only_below;         /* prompts shorter than this skip the prefill pool; 0 = never */
    int prefill_policy, decode_policy; /* speed_policy_t */
    int64_t default_max_tokens, max_context;
    int64_t status_interval_ms;          /* node status polling */
    int64_t discovery_interval_ms;       /* re-resolution of the pools' discovery names */
    int64_t discovery_max_nodes;         /* addresses a discovered pool holds at most */
    int64_t prefill_retries;             /* other prefill nodes tried before the first token */
    int64_t max_migrations;              /* re-issues of a stream whose decode node died; 0 = error */
    int kv_routing;                      /* speed_kv_routing_t */
    double kv_affinity_weight;           /* 1 = cached prefix only, 0 = load only */
    int64_t kv_index_max_blocks;         /* block hashes the router keeps per decode node */
    int64_t decode_local_max_new_tokens; /* uncached prompt tokens a decode node prefills itself; 0 = never */

    /* decode nodes' cache event journal (KV-aware routing) */
    int64_t cache_events_journal;       /* events kept for the router's next read */
    int64_t cache_events_max_per_reply; /* events in one status reply */
    int64_t cache_events_max_blocks;    /* hashes a snapshot (the node's held set) lists at most */

    speed_pool_config_t prefill, decode;
    int64_t prefix_cache_blocks; /* decode.prefix_cache_blocks: the decode nodes' prefix cache; 0 = off */

    /* UCX */
    int ucx_transport;           /* speed_kv_transport_t (kv_transport.h) */
    const char *ucx_net_devices; /* UCX_NET_DEVICES for tcp ("lo" for one host) */
    bool ucx_cuda_direct;        /* cuda nodes: register GPU KV pools with UCX (CUDA-aware UCX)
                                    * instead of the pinned host mirror; refused at startup by a
                                    * UCX without CUDA */

    /* control plane: mutual TLS (docs/security.md#the-control-plane) */
    const char *tls_ca, *tls_cert, *tls_key; /* PEM files; "" = unset */
    bool tls_insecure;                       /* plaintext gRPC, no identities (warned at startup) */

    /* this process */
    int64_t node_index; /* replica index within its pool */
} speed_cluster_config_t;

/* The field table (for --help and docs). */
const speed_config_field_t *speed_cluster_config_fields(size_t *n_fields_p);

/* Loads defaults < file (--config / SPEED_CONFIG) < env < argv into *cfg_out.
 * Then checks the cluster as a whole (ports of different pools and the router must not
 * overlap, replicas in range, node.index < the pool's replicas for `role` ("prefill" or
 * "decode"; NULL or "router" skips that check)).
 * Returns what speed_config_load returns, or SPEED_ERR_INVALID_ARGUMENT for a bad cluster
 * (logged, one line). *cfg_p as in speed_config_load. */
speed_status_t speed_cluster_config_load(int argc, char **argv, const char *role, speed_cluster_config_t *cfg_out,
                                         speed_config_t **cfg_p);

/* The pool of a role ("prefill" / "decode"), NULL otherwise. */
const speed_pool_config_t *speed_cluster_pool(const speed_cluster_config_t *c, const char *role);

/* Entry i (from 0) of a comma-separated list into buf; false (buf "") when the list has no
 * entry i. */
bool speed_cluster_list_item(const char *list, int64_t i, char *buf, size_t size);

/* The address peers dial for replica i of a pool: entry i of <pool>.hosts, or host when that
 * is empty (several hosts: docs/cluster.md). */
void speed_cluster_replica_host(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i, char *buf,
                                size_t size);

/* The name of a pool's `dns:NAME` discovery ("" when the pool has a static list). */
const char *speed_cluster_discovery_name(const speed_pool_config_t *pool);

/* "host:port" of replica i's gRPC / HTTP endpoint into buf (its replica host). */
void speed_cluster_grpc_addr(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i, char *buf,
                             size_t size);
void speed_cluster_http_addr(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i, char *buf,
                             size_t size);

/* "listen:port" the gRPC server of replica i binds: control.listen (host when empty) and the
 * pool's grpc_port + i. */
void speed_cluster_grpc_listen_addr(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i,
                                    char *buf, size_t size);

/* True when replica i of `pool` binds its gRPC on a loopback address (control.listen) while
 * peers dial it at a non-loopback address (its <pool>.hosts entry, or host; pool NULL: host):
 * the router will not reach it. Nodes warn about it. */
bool speed_cluster_control_unreachable(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i);

/* The control plane credentials of a daemon, at startup. `prog` names it in messages
 * ("speed-decode"); `identity` is the name its certificate should carry ("router", "decode-1";
 * NULL = any; a different CN is warned about, not refused).
 *   tls.insecure: warns that the control plane is unauthenticated; *creds_p stays zeroed
 *     (creds_p->cert NULL = plaintext) and SPEED_OK.
 *   no tls.cert: prints a one-line error telling to run `speedctl certs` or set tls.insecure;
 *     SPEED_ERR_INVALID_ARGUMENT.
 *   else speed_tls_creds_load's result (its one-line error printed to stderr, prefixed with prog).
 * Release with speed_tls_creds_cleanup. */
speed_status_t speed_cluster_tls_load(const speed_cluster_config_t *c, const char *prog, const char *identity,
                                      speed_tls_creds_t *creds_p);

/* The deployment's depth: the `speed:` section (prefill_layers as text, anchors, tail) resolved
 * by speed_depth_resolve for a model of n_layers. Every daemon calls this, so the router and the
 * nodes start from the same default. Returns SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT with the
 * reason (naming speed.prefill_layers) in err. */
speed_status_t speed_cluster_config_depth(const speed_cluster_config_t *cfg, int n_layers, speed_depth_t *depth_p,
                                          char *err, size_t err_size);

#endif /* SPEED_CLUSTER_CONFIG_H */
