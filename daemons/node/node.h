/* speed_node: what the prefill and decode daemons share.
 *
 * A node is: the cluster config (common/cluster_config.h) with this process's role and
 * replica index, the model and tokenizer, a compute backend, a speed_batcher (the engine
 * thread), a UCX transfer context with the batcher's KV pools registered, a gRPC server (the
 * role's methods plus Node.Health / Drain / Status), an HTTP server for /metrics and /health,
 * a metrics registry, and a few worker threads for RPC work that waits on the engine.
 *
 * Lifecycle (speed_node_main does all of it for a daemon):
 *   speed_signals_block_stop(&stop);            // first, before any thread exists (signals.h)
 *   speed_node_init(&n, "decode", argc, argv, &exit_code)   // config, model, engine, servers
 *   register the role's methods with speed_node_add_method
 *   speed_node_start(&n)                        // listen; state SERVING
 *   speed_node_run(&n)                          // until SIGTERM/SIGINT or Node.Drain: drain
 *   speed_node_cleanup(&n)                      // shutdown order: gRPC, HTTP, batcher, UCX
 *
 * The conversions between protobuf messages and the engine's types are in node_proto.h
 * (included here): they need no running node.
 *
 * Threading: init/start/run/cleanup on the main thread. Everything else (metrics, defer,
 * state) is thread-safe. RPC handlers run on the gRPC thread and must not block: work that
 * waits for the engine goes through speed_node_defer.
 */
#ifndef SPEED_NODE_H
#define SPEED_NODE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "batcher.h"
#include "cache_journal.h"
#include "cluster_config.h"
#include "http.h"
#include "kv_transfer.h"
#include "metrics.h"
#include "model.h"
#include "node_proto.h"
#include "rpc.h"
#include "speed_proto.h"
#include "tokenizer.h"

typedef enum { SPEED_NODE_STARTING = 0, SPEED_NODE_SERVING = 1, SPEED_NODE_DRAINING = 2 } speed_node_state_t;

typedef void (*speed_node_work_fn_t)(void *arg);

typedef struct speed_node_work speed_node_work_t;

typedef struct speed_node_s {
    const char *role; /* "prefill" | "decode" */
    speed_cluster_config_t cfg;
    speed_config_t *cfg_handle;
    speed_tls_creds_t tls; /* control plane credentials; tls.cert NULL = plaintext (tls.insecure) */
    const speed_pool_config_t *pool;
    char model_id[256];
    char grpc_addr[300], http_addr[300];

    speed_model_t *model;
    speed_tok_t *tok;
    speed_backend_t *backend;           /* rank 0's (the only one unless tensor_parallel > 1) */
    speed_backend_t *rank_backends[64]; /* [tensor_parallel]: [0] == backend */
    int n_ranks;
    speed_batcher_t *batcher;
    speed_kv_xfer_ctx_t *xfer;
    speed_rpc_server_t *rpc;
    speed_http_server_t *http;
    speed_metrics_t *metrics;

    /* The role's part of a Cancel, run before the batcher's (may be NULL): true when it found
     * the request. Set before speed_node_main; called on an RPC thread. */
    bool (*cancel_hook)(struct speed_node_s *node, const char *request_id);

    _Atomic int state; /* speed_node_state_t */
    _Atomic bool drain_requested;
    uint64_t epoch;

    /* metrics every node has */
    speed_counter_t *m_requests;      /* {status} */
    speed_counter_t *m_prompt_tokens; /* speed_<role>_prompt_tokens_total */
    speed_counter_t *m_generated_tokens;
    speed_counter_t *m_xfer_bytes;     /* speed_kv_transfer_bytes_total */
    speed_histogram_t *m_xfer_seconds; /* speed_kv_transfer_seconds */
    speed_counter_t *m_xfer_failures;  /* speed_kv_transfer_failures_total{stage} */
    /* operator metrics (docs/metrics.md), each the {role} series of its family */
    speed_histogram_t *m_step_seconds; /* speed_engine_step_duration_seconds */
    speed_histogram_t *m_step_seqs;    /* speed_engine_step_sequences */
    speed_histogram_t *m_step_tokens;  /* speed_engine_step_tokens */
    speed_histogram_t *m_queue_wait;   /* speed_engine_queue_wait_seconds */
    speed_counter_t *m_tokens_shallow; /* speed_engine_prompt_tokens_total{depth="shallow"} */
    speed_counter_t *m_tokens_full;    /* speed_engine_prompt_tokens_total{depth="full"} */
    speed_counter_t *m_kv_saved;       /* speed_kv_bytes_saved_total */
    speed_histogram_t *m_xfer_exposed; /* speed_kv_transfer_exposed_seconds */

    /* KV-aware routing (decode nodes; node_cache.c): the prefix-cache event journal the router
     * reads on its status poll, and the seed of this node's block hashes */
    speed_cache_journal_t *cache_journal;
    uint64_t cache_seed;
    speed_counter_t *m_cache_stored, *m_cache_evicted, *m_cache_refused; /* speed_node_cache_events_total{kind} */
    speed_counter_t *m_cache_snapshots;                                  /* speed_node_cache_snapshots_total */
    /* the engine's prefix cache (decode.prefix_cache_blocks): speed_prefix_cache_*_total, moved
     * by the difference of its stats at each step (engine thread: prefix_seen is its own) */
    speed_counter_t *m_prefix_lookups, *m_prefix_hits, *m_prefix_evictions, *m_prefix_tokens_saved;
    speed_prefix_cache_stats_t prefix_seen;

    /* worker threads for speed_node_defer */
    pthread_mutex_t work_mu;
    pthread_cond_t work_cv;
    speed_node_work_t *work_head, *work_tail;
    pthread_t workers[4];
    int n_workers;
    bool work_stop;
} speed_node_t;

/* Operator metrics of a request's finish event (engine thread, cheap: atomics only): the
 * queue wait of a request the engine took, and for a request whose prompt was computed here
 * (prompt_computed) and completed, its prompt tokens by depth and the KV bytes SPEED saved. */
void speed_node_observe_finish(speed_node_t *node, const speed_batch_event_t *event, bool prompt_computed);

/* Loads the config (argv: cluster options, e.g. --config FILE --node.index 1 --model DIR) and
 * brings up everything except listening. --help / --print-config: prints, returns
 * SPEED_ERR_CANCELLED with *exit_code_p 0. On error: logs one line, cleans up, returns the
 * status with *exit_code_p 1 (2 for a usage error). */
speed_status_t speed_node_init(speed_node_t *node, const char *role, int argc, char **argv, int *exit_code_p);

/* The identities allowed to call `path` on a node (comma-separated certificate CNs, matched as
 * speed_rpc_server_allow does): Node.Health/Status "router,admin", Node.Drain "admin", every
 * other method "router". Static. */
const char *speed_node_callers(const char *path);

/* Registers a method (before start), callable only by speed_node_callers(path) when the
 * control plane runs TLS. */
speed_status_t speed_node_add_method(speed_node_t *node, const char *path, speed_rpc_kind_t kind,
                                     speed_rpc_handler_cb_t handler, void *user);

/* Starts the gRPC and HTTP servers; state SERVING; logs the endpoints. */
speed_status_t speed_node_start(speed_node_t *node);

/* Waits for SIGTERM/SIGINT (blocked by speed_signals_block_stop before any thread was started,
 * taken here with speed_signals_wait) or a Drain request, then drains: state DRAINING (health 503,
 * new work refused), running requests finish (up to grace_ms), then returns. */
void speed_node_run(speed_node_t *node, int64_t grace_ms);

/* Stops and frees everything, in order; safe after a failed init. */
void speed_node_cleanup(speed_node_t *node);

/* Runs fn(arg) on a node worker thread. Returns SPEED_OK or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_node_defer(speed_node_t *node, speed_node_work_fn_t fn, void *arg);

/* True while new requests are taken. */
bool speed_node_accepting(const speed_node_t *node);

/* speed_<role>_requests_total{status} += 1. */
void speed_node_count(speed_node_t *node, const char *status);

/* The role's Cancel method (Decode.Cancel / Prefill.Cancel): runs the node's cancel_hook, else
 * ends the request in the batcher (its finish event completes the request's own call), and
 * replies {found}. user = the node. */
void speed_node_on_cancel(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len);

/* The decode node's notify callback (node_kv.c; user = the node): a notify whose nonce (and
 * integrity tags) the transfer context accepted marks the reservation's KV ready once every
 * head of this node's range was notified; an abort or an integrity failure frees the
 * reservation's blocks (the cancel fence lifts). Progress thread; never waits for the engine.
 * Returns SPEED_OK, or the batcher's status (SPEED_ERR_NOT_FOUND: no such reservation), sent
 * back to the prefill node as the ack. */
speed_status_t speed_node_on_kv_notify(void *user, const speed_kv_notify_t *note);

/* The lease a descriptor carries: 3/4 of the reservation's (kv.lease_ms), so that the prefill
 * node, counting from when it received the descriptor, stops putting before this node's lease
 * ends even when the control plane took a quarter of the lease to deliver it. */
static inline int64_t speed_node_desc_lease_ms(int64_t lease_ms) { return lease_ms - lease_ms / 4; }

/* ---- the cache event journal (node_cache.c; decode nodes) ---- */

/* Creates the journal (instance = the node's epoch, bounds cache_events.*), the seed of the
 * node's block hashes (served model name, kv.block_tokens), the speed_node_cache_* and the
 * speed_prefix_cache_* metrics (registered whether the prefix cache is on or not: 0 when off).
 * Called by speed_node_init for the decode role. Returns SPEED_OK or what create/register
 * return. */
speed_status_t speed_node_cache_init(speed_node_t *node);
void speed_node_cache_cleanup(speed_node_t *node);

/* The engine prefix cache's event callback (speed_prefix_cache_params_t.event_cb, user = the
 * node): STORED / EVICTED hashes go to the journal (the cache reports a hash evicted only when
 * no entry holds it any more). Engine thread; no-op without a journal. */
void speed_node_cache_on_event(void *user, speed_prefix_event_t kind, const uint64_t *hashes, size_t n);

/* The prefix cache's counters after an engine step (engine thread): adds what its stats moved
 * since the last call. */
void speed_node_cache_observe_step(speed_node_t *node, const speed_prefix_cache_stats_t *prefix);

/* The cache events of a status reply, for the router's cursor (NULL: none asked, *out stays
 * NULL). On success *out points into `hold`, which owns every allocation until
 * speed_node_cache_events_cleanup. Returns SPEED_OK or SPEED_ERR_NO_MEMORY (no events sent). */
typedef struct {
    Speed__V1__CacheEvents msg;
    Speed__V1__CacheEventRun *runs;    /* [n_runs] */
    Speed__V1__CacheEventRun **ptrs;   /* [n_runs] */
    speed_cache_journal_reply_t reply; /* the hashes the runs point into */
} speed_node_cache_events_t;
speed_status_t speed_node_cache_events(speed_node_t *node, const Speed__V1__CacheCursor *cursor,
                                       speed_node_cache_events_t *hold, Speed__V1__CacheEvents **out);
void speed_node_cache_events_cleanup(speed_node_cache_events_t *hold);

/* A role method for speed_node_main. */
typedef struct {
    const char *path;
    speed_rpc_kind_t kind;
    speed_rpc_handler_cb_t handler;
} speed_node_method_t;

/* The whole main of a node daemon: block signals, init, register the methods (user = node),
 * start, run until SIGTERM/SIGINT/Drain (grace 30 s), clean up. Returns the exit code. */
int speed_node_main(speed_node_t *node, const char *role, const speed_node_method_t *methods, int n_methods, int argc,
                    char **argv);

/* Replies with an error status from any handler (logs at info). */
void speed_node_fail(speed_rpc_call_t *call, speed_status_t status, const char *message);

/* Packs and replies / sends; frees nothing of msg. */
speed_status_t speed_node_reply(speed_rpc_call_t *call, const ProtobufCMessage *msg);
speed_status_t speed_node_send(speed_rpc_call_t *call, const ProtobufCMessage *msg);

#endif /* SPEED_NODE_H */
