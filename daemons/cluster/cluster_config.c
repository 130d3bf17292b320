/* speed_cluster_config: see cluster_config.h. */
#include "cluster_config.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "backend_kind.h"
#include "dtype.h"
#include "kv_transport.h"
#include "log.h"

/* = speed_policy_t; dtypes, backends and KV transports are named by their owners */
static const char *const policy_names[] = {"round-robin", "least-loaded", NULL};
/* = speed_kv_routing_t */
static const char *const kv_routing_names[] = {"off", "affinity", NULL};

#define F(name, type, member, def, lo, hi, doc) \
    { name, SPEED_CONFIG_##type, offsetof(speed_cluster_config_t, member), def, lo, hi, NULL, doc }
#define FS(name, member, def, doc) \
    { name, SPEED_CONFIG_STRING, offsetof(speed_cluster_config_t, member), def, SPEED_CONFIG_UNBOUNDED, NULL, doc }
#define FE(name, member, def, names, doc) \
    { name, SPEED_CONFIG_ENUM, offsetof(speed_cluster_config_t, member), def, SPEED_CONFIG_UNBOUNDED, names, doc }
#define POOL(pool, grpc, http, running, kvtok)                                                                      \
    F(#pool ".replicas", INT, pool.replicas, "1", 0, 64, "replicas of the " #pool " pool (the node ratio)"),        \
        F(#pool ".tensor_parallel", INT, pool.tensor_parallel, "1", 1, 64, "ranks per " #pool " replica"),          \
        FS(#pool ".hosts", pool.hosts, "",                                                                          \
           "addresses peers dial for the replicas, comma-separated, replica i: entry i (one per replica); "         \
           "empty = host for every replica"),                                                                       \
        FS(#pool ".discovery", pool.discovery, "",                                                                  \
           "router: dns:NAME finds the " #pool " nodes in NAME's A/AAAA records at grpc_port (a headless "          \
           "Service) instead of replicas/hosts; empty = the static list"),                                          \
        F(#pool ".grpc_port", INT, pool.grpc_port, grpc, 1, 65535, "gRPC port of replica 0 (replica i: + i)"),      \
        F(#pool ".http_port", INT, pool.http_port, http, 1, 65535, "/metrics and /health port of replica 0 (+ i)"), \
        FE(#pool ".backend", pool.backend, "cpu", speed_backend_kind_names,                                         \
           "compute backend: cpu (fast), cpu-ref (the reference loops) or cuda (one GPU per replica)"),             \
        F(#pool ".device", INT, pool.device, "0", 0, 1023, "cuda: GPU of replica 0 (replica i: + i)"),              \
        F(#pool ".threads", INT, pool.threads, "1", 0, 1024,                                                        \
          "compute threads per replica (cpu backends); 0 = all cores"),                                             \
        F(#pool ".max_running", INT, pool.max_running, running, 1, 4096, "sequences in the engine at once"),        \
        F(#pool ".max_waiting", INT, pool.max_waiting, "64", 0, 1 << 20, "requests queued beyond max_running"),     \
        F(#pool ".kv_tokens", INT, pool.kv_tokens, kvtok, 16, 1e9,                                                  \
          "KV capacity in tokens at full depth (the upper pool gets SPEED's saving)"),                              \
        F(#pool ".max_step_tokens", INT, pool.max_step_tokens, "512", 16, 65536, "rows one engine step computes"),  \
        F(#pool ".prefill_chunk", INT, pool.prefill_chunk, "512", 1, 65536, "prompt tokens of one sequence per step")

static const speed_config_field_t fields[] = {
    FS("model", model, NULL, "model directory (Hugging Face layout)"),
    FS("served_model_name", served_model_name, NULL, "model id of the API (default: the directory name)"),
    FS("host", host, "127.0.0.1", "address peers dial (the nodes' gRPC and KV endpoints)"),
    FS("control.listen", control_listen, "127.0.0.1",
       "address the nodes' gRPC servers bind (port: the pool's grpc_port + i); 0.0.0.0 = every interface"),
    FS("tls.ca", tls_ca, "", "control plane: PEM file of the cluster CA (speedctl certs writes one)"),
    FS("tls.cert", tls_cert, "", "control plane: this process's certificate, PEM (CN = its identity)"),
    FS("tls.key", tls_key, "", "control plane: this process's private key, PEM (mode 0600)"),
    {"tls.insecure", SPEED_CONFIG_BOOL, offsetof(speed_cluster_config_t, tls_insecure), "false", SPEED_CONFIG_UNBOUNDED,
     NULL, "plaintext, unauthenticated gRPC between the processes (a private test network only)"},
    FS("metrics.listen", metrics_listen, "127.0.0.1",
       "bind address of every node's /metrics,/health listener and the router's metrics listener"),
    FS("log", log, "info", "log levels, e.g. info or warn,net=debug"),
    {"weights.hugepages", SPEED_CONFIG_BOOL, offsetof(speed_cluster_config_t, weights_hugepages), "false",
     SPEED_CONFIG_UNBOUNDED, NULL, "nodes read the weights into 2 MiB pages (a load-time copy; faster decode)"},
    FS("speed.prefill_layers", prefill_layers, "", "SPEED depth C: integer 1..L or fraction of L; empty = L (off)"),
    F("speed.anchors", INT, anchors, "1", 0, 1 << 20, "anchor tokens A kept at full depth"),
    F("speed.tail", INT, tail, "1", 1, 1 << 20, "last prompt tokens T kept at full depth"),
    {"speed.allow_request_override", SPEED_CONFIG_BOOL, offsetof(speed_cluster_config_t, allow_request_override),
     "true", SPEED_CONFIG_UNBOUNDED, NULL, "honour the `speed` object of a request"},
    FE("kv.dtype", kv_dtype, "auto", speed_kv_dtype_names,
       "KV cache element type; auto = the model's (its k/v projections' dtype: f32, bf16 or f16)"),
    F("kv.block_tokens", INT, kv_block_tokens, "16", 1, 1024, "tokens per KV block"),
    F("kv.lease_ms", INT, lease_ms, "30000", 10, 3600000,
      "reserved KV not claimed within this is freed; a prefill node may put into it for 3/4 of it"),
    {"kv.integrity", SPEED_CONFIG_BOOL, offsetof(speed_cluster_config_t, kv_integrity), "false", SPEED_CONFIG_UNBOUNDED,
     NULL, "decode nodes ask for an HMAC tag per layer with each KV transfer and verify it before the KV is used"},
    {"engine.batch_invariant", SPEED_CONFIG_BOOL, offsetof(speed_cluster_config_t, batch_invariant), "false",
     SPEED_CONFIG_UNBOUNDED, NULL,
     "every request's logits bit-identical whatever shares its batch, its chunking or its step, on every node "
     "(fixed-order cpu kernels; the cuda backend refuses it at startup)"},
    F("debug.prefill_layer_delay_ms", INT, debug_prefill_layer_delay_ms, "0", 0, 60000,
      "test knob: a prefill node waits this long before each layer's puts (slow-node tests); 0 in production"),
    F("router.port", INT, router_port, "8000", 0, 65535, "HTTP port of the OpenAI API (0 = any free port)"),
    F("router.threads", INT, router_threads, "4", 1, 256, "HTTP worker threads"),
    FS("router.listen", router_listen, "127.0.0.1", "bind address of the OpenAI API (0.0.0.0 / :: = all)"),
    F("router.metrics_port", INT, router_metrics_port, "0", 0, 65535,
      "the router's /metrics and /health listener on metrics.listen; 0 = none (they stay on the API port, "
      "behind a key when keys are set)"),
    FS("router.tls_cert", api_tls_cert, NULL, "PEM certificate (chain) of the API: HTTPS when set with router.tls_key"),
    FS("router.tls_key", api_tls_key, NULL, "PEM private key of router.tls_cert"),
    {"router.api_keys", SPEED_CONFIG_SECRET, offsetof(speed_cluster_config_t, api_keys), "", SPEED_CONFIG_UNBOUNDED,
     NULL,
     "comma-separated API keys (Bearer); empty = no authentication. A secret: not on the command line; "
     "use SPEED_ROUTER_API_KEYS or router.api_keys_file"},
    FS("router.api_keys_file", api_keys_file, NULL,
       "file of API keys, one per line (# comments; optional per-key limits, docs/router.md)"),
    F("router.key_max_in_flight", INT, key_max_in_flight, "0", 0, 1 << 20, "requests in flight per key; 0 = unlimited"),
    F("router.key_max_kv_tokens", INT, key_max_kv_tokens, "0", 0, 1e12,
      "KV tokens (prompt + max_tokens) reserved at once per key; 0 = unlimited"),
    F("router.key_rate", DOUBLE, key_rate, "0", 0, 1e9, "requests per second per key (token bucket); 0 = unlimited"),
    F("router.key_burst", INT, key_burst, "0", 0, 1 << 20, "token bucket depth per key; 0 = max(1, key_rate)"),
    F("router.max_body_bytes", INT, max_body_bytes, "33554432", 1024, 1 << 30, "larger request bodies get 413"),
    F("router.max_json_elements", INT, max_json_elements, "1048576", 16, 1 << 26,
      "JSON values in a request body (then 400, before it is parsed)"),
    F("router.stream_buffer_bytes", INT, stream_buffer_bytes, "1048576", 4096, 1 << 30,
      "SSE bytes waiting for one client; past it the client is cut off and its request cancelled"),
    F("router.max_connections_per_ip", INT, max_connections_per_ip, "64", 0, 1 << 20,
      "open API connections per client address; 0 = unlimited"),
    F("router.header_timeout_ms", INT, header_timeout_ms, "30000", 1000, 3600000,
      "an API connection idle this long (also while sending headers or a body) is closed"),
    FS("router.allowed_hosts", allowed_hosts, "",
       "comma-separated Host header values accepted (port optional); empty = any"),
    FS("router.cors_origins", cors_origins, "",
       "comma-separated Origins allowed cross-origin (\"*\" = any); empty = no CORS, and a request "
       "with another Origin gets 403"),
    {"router.content_special_tokens", SPEED_CONFIG_BOOL, offsetof(speed_cluster_config_t, content_special_tokens),
     "false", SPEED_CONFIG_UNBOUNDED, NULL, "chat message content may spell special tokens (off: it is text)"},
    F("router.max_in_flight", INT, max_in_flight, "64", 1, 1 << 20, "requests served at once"),
    F("router.max_queue", INT, max_queue, "256", 0, 1 << 20, "requests waiting beyond max_in_flight (then 429)"),
    F("router.queue_timeout_ms", INT, queue_timeout_ms, "30000", 1, 3600000, "wait in the queue at most (then 503)"),
    F("router.request_timeout_ms", INT, request_timeout_ms, "600000", 100, 86400000, "whole request deadline"),
    F("router.decode_only_below", INT, decode_only_below, "0", 0, 1 << 30,
      "prompts shorter than this go straight to a decode node; 0 = never"),
    FE("router.prefill_policy", prefill_policy, "least-loaded", policy_names, "prefill pool balancing"),
    FE("router.decode_policy", decode_policy, "least-loaded", policy_names, "decode pool balancing"),
    F("router.default_max_tokens", INT, default_max_tokens, "256", 1, 1 << 20, "max_tokens when a request has none"),
    F("router.max_context", INT, max_context, "0", 0, 1 << 24, "prompt + max_tokens limit; 0 = the model's"),
    F("router.status_interval_ms", INT, status_interval_ms, "500", 10, 60000, "node status polling period"),
    F("router.discovery_interval_ms", INT, discovery_interval_ms, "5000", 100, 3600000,
      "how often the router re-resolves the pools' discovery names"),
    F("router.discovery_max_nodes", INT, discovery_max_nodes, "64", 1, 256,
      "live addresses a discovered pool holds (a retired node's slot is reused; more are refused)"),
    F("router.prefill_retries", INT, prefill_retries, "1", 0, 16, "other prefill nodes tried before the first token"),
    F("router.max_migrations", INT, max_migrations, "3", 0, 16,
      "times a stream whose decode node dies is re-issued elsewhere and continued; 0 = end it with an error"),
    FE("router.kv_routing", kv_routing, "off", kv_routing_names,
       "decode node choice: off (router.decode_policy alone) or affinity (the prompt's prefix cached on a node, "
       "from its cache events, against its load; docs/router.md#kv-aware-routing)"),
    F("router.kv_affinity_weight", DOUBLE, kv_affinity_weight, "0.5", 0, 1,
      "kv_routing affinity: cost = w * blocks to prefill + (1 - w) * load in blocks; 1 = longest cached prefix "
      "wins, 0 = least loaded wins"),
    F("router.decode_local_max_new_tokens", INT, decode_local_max_new_tokens, "0", 0, 1 << 20,
      "kv_routing affinity: a prompt whose uncached part on the chosen decode node (by the router's prefix "
      "index) is at most this many tokens is prefilled there (decode-only) instead of on a prefill node; "
      "0 = never (docs/prefix-cache.md#the-threshold)"),
    F("router.kv_index_max_blocks", INT, kv_index_max_blocks, "65536", 1, 1 << 22,
      "block hashes the router keeps per decode node (more are refused and counted)"),
    F("cache_events.journal", INT, cache_events_journal, "16384", 16, 1 << 22,
      "decode nodes: cache events kept for the router's next status poll (a router further behind gets a "
      "snapshot)"),
    F("cache_events.max_per_reply", INT, cache_events_max_per_reply, "8192", 1, 1 << 22,
      "decode nodes: cache events in one status reply (the rest at the next poll)"),
    F("cache_events.max_blocks", INT, cache_events_max_blocks, "65536", 1, 1 << 22,
      "decode nodes: block hashes a snapshot lists at most (the node's held set; more are refused and counted)"),
    POOL(prefill, "8100", "8200", "4", "16384"),
    POOL(decode, "8300", "8400", "16", "65536"),
    F("decode.prefix_cache_blocks", INT, prefix_cache_blocks, "0", 0, 1 << 24,
      "decode nodes: KV blocks their prefix cache keeps of finished requests (added to the pools; entries are "
      "evicted least recently used past it and whenever a request needs the room); its events feed KV-aware "
      "routing. 0 = off (docs/prefix-cache.md)"),
    FE("ucx.transport", ucx_transport, "shm", speed_kv_transport_names,
       "KV transfer: shm (one host, shared memory) or tcp (between hosts, detects dead peers)"),
    FS("ucx.net_devices", ucx_net_devices, "lo", "UCX_NET_DEVICES for tcp, e.g. eth0"),
    {"ucx.cuda_direct", SPEED_CONFIG_BOOL, offsetof(speed_cluster_config_t, ucx_cuda_direct), "false",
     SPEED_CONFIG_UNBOUNDED, NULL,
     "cuda nodes: UCX reads/writes GPU KV memory directly (needs a UCX built with CUDA) instead of staging "
     "it through pinned host memory; KV then goes as one-sided puts, not checked writes: set it alike on every "
     "node"},
    F("node.index", INT, node_index, "0", 0, 63, "this process's replica index in its pool (set by speedctl up)"),
};

const speed_config_field_t *speed_cluster_config_fields(size_t *n_fields_p) {
    *n_fields_p = sizeof fields / sizeof fields[0];
    return fields;
}

const speed_pool_config_t *speed_cluster_pool(const speed_cluster_config_t *c, const char *role) {
    if (!role) return NULL;
    if (strcmp(role, "prefill") == 0) return &c->prefill;
    if (strcmp(role, "decode") == 0) return &c->decode;
    return NULL;
}

static bool ranges_overlap(int64_t a, int64_t na, int64_t b, int64_t nb) {
    return na > 0 && nb > 0 && a < b + nb && b < a + na;
}

static speed_status_t check_cluster(const speed_cluster_config_t *c, const char *role) {
    struct {
        const char *name;
        int64_t base, n;
    } r[6] = {
        {"prefill.grpc_port", c->prefill.grpc_port, c->prefill.replicas},
        {"prefill.http_port", c->prefill.http_port, c->prefill.replicas},
        {"decode.grpc_port", c->decode.grpc_port, c->decode.replicas},
        {"decode.http_port", c->decode.http_port, c->decode.replicas},
        {"router.port", c->router_port, c->router_port ? 1 : 0},
        {"router.metrics_port", c->router_metrics_port, c->router_metrics_port ? 1 : 0},
    };
    for (int i = 0; i < 6; i++)
        for (int j = i + 1; j < 6; j++)
            if (ranges_overlap(r[i].base, r[i].n, r[j].base, r[j].n)) {
                SPEED_ERROR(SPEED_SUBSYS_CORE, "cluster config: %s %lld..%lld overlaps %s %lld..%lld", r[i].name,
                            (long long)r[i].base, (long long)(r[i].base + r[i].n - 1), r[j].name, (long long)r[j].base,
                            (long long)(r[j].base + r[j].n - 1));
                return SPEED_ERR_INVALID_ARGUMENT;
            }
    for (int i = 0; i < 4; i++)
        if (r[i].base + r[i].n - 1 > 65535) {
            SPEED_ERROR(SPEED_SUBSYS_CORE, "cluster config: %s + replicas passes port 65535", r[i].name);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    const speed_pool_config_t *pools[2] = {&c->prefill, &c->decode};
    for (int p = 0; p < 2; p++) {
        const char *list = pools[p]->hosts;
        if (!list || !*list) continue;
        int64_t n = 0;
        char item[256];
        while (speed_cluster_list_item(list, n, item, sizeof item)) n++;
        if (n != pools[p]->replicas) {
            SPEED_ERROR(SPEED_SUBSYS_CORE, "cluster config: %s.hosts names %lld addresses for %lld replicas",
                        p == 0 ? "prefill" : "decode", (long long)n, (long long)pools[p]->replicas);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    for (int p = 0; p < 2; p++) {
        const char *d = pools[p]->discovery;
        if (!d || !*d) continue;
        const char *name = speed_cluster_discovery_name(pools[p]);
        size_t len = strlen(name);
        bool ok = strncmp(d, "dns:", 4) == 0 && len > 0 && len < 254 && name[0] != '.' && name[0] != '-';
        for (size_t k = 0; ok && k < len; k++)
            ok = (name[k] >= 'a' && name[k] <= 'z') || (name[k] >= 'A' && name[k] <= 'Z') ||
                 (name[k] >= '0' && name[k] <= '9') || name[k] == '.' || name[k] == '-' || name[k] == '_';
        if (!ok) {
            SPEED_ERROR(SPEED_SUBSYS_CORE, "cluster config: %s.discovery '%s' is not dns:NAME (a host name)",
                        p == 0 ? "prefill" : "decode", d);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    if (c->decode.replicas < 1) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "cluster config: decode.replicas must be >= 1 (decode nodes generate)");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const speed_pool_config_t *pool = speed_cluster_pool(c, role);
    if (pool && c->node_index >= pool->replicas) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "cluster config: node.index %lld but %s.replicas is %lld",
                    (long long)c->node_index, role, (long long)pool->replicas);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

speed_status_t speed_cluster_config_load(int argc, char **argv, const char *role, speed_cluster_config_t *cfg_out,
                                         speed_config_t **cfg_p) {
    speed_cluster_config_t c;
    memset(&c, 0, sizeof c);
    speed_config_t *cfg = NULL;
    *cfg_p = NULL; /* also when the load itself fails */
    SPEED_CHECK(speed_config_load(fields, sizeof fields / sizeof fields[0], &c, argc, argv, "SPEED_", &cfg));
    if (!speed_config_help_requested(cfg) && !speed_config_print_requested(cfg)) {
        speed_status_t st = check_cluster(&c, role);
        if (st != SPEED_OK) {
            speed_config_destroy(cfg);
            *cfg_p = NULL;
            return st;
        }
    }
    *cfg_out = c;
    *cfg_p = cfg;
    return SPEED_OK;
}

const char *speed_cluster_discovery_name(const speed_pool_config_t *pool) {
    const char *d = pool ? pool->discovery : NULL;
    if (!d || strncmp(d, "dns:", 4) != 0) return "";
    return d + 4;
}

bool speed_cluster_list_item(const char *list, int64_t i, char *buf, size_t size) {
    if (size) buf[0] = '\0';
    const char *p = list ? list : "";
    for (int64_t k = 0;; k++) {
        while (*p == ' ' || *p == ',') p++;
        if (!*p) return false;
        size_t len = strcspn(p, ", ");
        if (k == i) {
            snprintf(buf, size, "%.*s", (int)len, p);
            return true;
        }
        p += len;
    }
}

void speed_cluster_replica_host(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i, char *buf,
                                size_t size) {
    if (!pool->hosts || !speed_cluster_list_item(pool->hosts, i, buf, size)) snprintf(buf, size, "%s", c->host);
}

void speed_cluster_grpc_addr(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i, char *buf,
                             size_t size) {
    char host[256];
    speed_cluster_replica_host(c, pool, i, host, sizeof host);
    snprintf(buf, size, "%s:%lld", host, (long long)(pool->grpc_port + i));
}

void speed_cluster_grpc_listen_addr(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i,
                                    char *buf, size_t size) {
    const char *h = c->control_listen && c->control_listen[0] ? c->control_listen : c->host;
    /* an IPv6 literal needs brackets before the port */
    bool v6 = strchr(h, ':') && h[0] != '[';
    snprintf(buf, size, "%s%s%s:%lld", v6 ? "[" : "", h, v6 ? "]" : "", (long long)(pool->grpc_port + i));
}

static bool is_loopback(const char *h) {
    return h && (strncmp(h, "127.", 4) == 0 || strcmp(h, "::1") == 0 || strcmp(h, "localhost") == 0);
}

bool speed_cluster_control_unreachable(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i) {
    char host[256];
    if (pool)
        speed_cluster_replica_host(c, pool, i, host, sizeof host);
    else
        snprintf(host, sizeof host, "%s", c->host ? c->host : "");
    return is_loopback(c->control_listen) && host[0] && !is_loopback(host);
}

speed_status_t speed_cluster_tls_load(const speed_cluster_config_t *c, const char *prog, const char *identity,
                                      speed_tls_creds_t *creds_p) {
    memset(creds_p, 0, sizeof *creds_p);
    if (c->tls_insecure) {
        SPEED_WARN(SPEED_SUBSYS_NET,
                   "%s: tls.insecure is set: the control plane is plaintext and unauthenticated; anyone who reaches "
                   "a gRPC port can drain nodes, reserve KV and generate",
                   prog);
        return SPEED_OK;
    }
    if (!c->tls_cert || !c->tls_cert[0]) {
        fprintf(stderr,
                "%s: no certificate for the control plane: run `speedctl certs --config FILE --out DIR` and set "
                "tls.ca, tls.cert and tls.key, or set tls.insecure: true on a private test network\n",
                prog);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    char err[1024] = "";
    speed_status_t st = speed_tls_creds_load(c->tls_ca, c->tls_cert, c->tls_key, creds_p, err, sizeof err);
    if (st != SPEED_OK) {
        fprintf(stderr, "%s: %s\n", prog, err);
        return st;
    }
    if (identity && strcmp(identity, creds_p->cn) != 0)
        SPEED_WARN(SPEED_SUBSYS_NET, "%s: tls.cert is for '%s', not '%s': peers authorise calls by that name", prog,
                   creds_p->cn, identity);
    return SPEED_OK;
}

void speed_cluster_http_addr(const speed_cluster_config_t *c, const speed_pool_config_t *pool, int64_t i, char *buf,
                             size_t size) {
    char host[256];
    speed_cluster_replica_host(c, pool, i, host, sizeof host);
    snprintf(buf, size, "%s:%lld", host, (long long)(pool->http_port + i));
}

speed_status_t speed_cluster_config_depth(const speed_cluster_config_t *cfg, int n_layers, speed_depth_t *depth_p,
                                          char *err, size_t err_size) {
    char why[200] = "";
    speed_depth_request_t req = {.has_anchors = true, .anchors = cfg->anchors, .has_tail = true, .tail = cfg->tail};
    speed_status_t st = speed_cutoff_parse(cfg->prefill_layers, &req.prefill_layers, why, sizeof why);
    if (st == SPEED_OK) st = speed_depth_resolve(&req, NULL, n_layers, depth_p, why, sizeof why);
    if (st != SPEED_OK && err && err_size > 0) snprintf(err, err_size, "speed: %s", why);
    return st;
}
