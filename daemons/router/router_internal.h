/* Internals shared by server.c (HTTP front end, lifecycle) and the request worker's files
 * (request*.c; what only they share is in request_internal.h).
 * Not an API: nothing outside router/ includes this. */
#ifndef SPEED_ROUTER_INTERNAL_H
#define SPEED_ROUTER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "api_keys.h"
#include "balance.h"
#include "http.h"
#include "metrics.h"
#include "nodes.h"
#include "openai.h"
#include "route.h"
#include "router.h"
#include "rpc.h"

/* Streaming requests that wrote nothing for this long get an SSE comment, so that a client
 * that went away is noticed (MHD does not poll suspended connections). */
#define SPEED_ROUTER_SSE_PING_MS        5000
/* Cancel RPCs are best effort and must not hold a worker long. */
#define SPEED_ROUTER_CANCEL_TIMEOUT_MS  1000
/* Reserve is a table lookup on the decode node. */
#define SPEED_ROUTER_RESERVE_TIMEOUT_MS 10000
/* A prefill retry is not tried with less than this left of the descriptor's put window (it
 * could not finish its puts in time anyway). */
#define SPEED_ROUTER_MIN_PUT_WINDOW_MS  100
/* A request whose decode node failed under it (a retry or a migration) and that finds no
 * decode node up waits this long for one (a node restarting, a health check that flapped)
 * before it fails; a fresh request does not wait. */
#define SPEED_ROUTER_NODE_WAIT_MS       5000
/* Request ids: X-Request-Id up to this many characters; node ids add a suffix. */
#define SPEED_ROUTER_CLIENT_ID_MAX      64
#define SPEED_ROUTER_ID_MAX             96

typedef enum { RT_STARTING = 0, RT_READY, RT_DRAINING } rt_state_t;

typedef struct rtr_req rtr_req_t;

/* A Cancel RPC the housekeeping thread sends for a request that was cancelled while a
 * worker may be blocked in a call to that node, or whose Reserve on that node failed in a
 * way that may still have left a reservation there (request.c). */
typedef struct cancel_job {
    struct cancel_job *next;
    speed_router_pool_id_t pool;
    size_t node;
    char id[SPEED_ROUTER_ID_MAX];
} cancel_job_t;

/* The user pointer of a completions route. */
typedef struct {
    speed_router_t *rt;
    speed_openai_api_t api;
} api_route_t;

struct speed_router {
    speed_router_params_t p;
    const speed_cluster_config_t *cfg;

    speed_metrics_t *metrics;
    speed_router_nodes_t *nodes;
    speed_admission_t *adm;
    speed_http_server_t *http;         /* the OpenAI API (router.listen:router.port) */
    speed_http_server_t *http_metrics; /* /metrics,/health on metrics.listen, or NULL */
    api_route_t *routes;               /* [2]: chat, completions */

    speed_router_keys_t *keys; /* API keys and their limits (api_keys.h) */
    speed_openai_parse_params_t parse;
    speed_route_params_t route;
    int64_t created_unix;
    uint64_t id_seed;
    _Atomic uint64_t id_seq;
    int64_t max_workers; /* max_in_flight + max_queue */

    _Atomic int state; /* rt_state_t */

    pthread_mutex_t lock;     /* registry, n_workers, state changes */
    pthread_cond_t idle_cond; /* CLOCK_MONOTONIC; n_workers reached 0 */
    rtr_req_t *reqs;          /* every request that has a worker */
    int n_workers;            /* workers alive (shutdown waits for 0) */
    int n_active;             /* requests not yet answered: the 429 bound counts these, so
                                      * a request stops counting before its last bytes go out */

    pthread_mutex_t jobs_lock; /* leaf lock: jobs, hk_stop */
    pthread_cond_t hk_cond;    /* CLOCK_MONOTONIC */
    cancel_job_t *jobs;
    bool hk_stop;
    pthread_t hk_thread;
    bool hk_started;

    /* metrics */
    speed_histogram_t *m_ttft, *m_itl, *m_e2e;
    speed_histogram_t *m_tpot;          /* speed_router_time_per_output_token_seconds */
    speed_histogram_t *m_queue_wait;    /* speed_router_queue_wait_seconds */
    speed_counter_t *m_requests;        /* {route,status} */
    speed_counter_t *m_route_decisions; /* {route,reason} */
    speed_counter_t *m_prefill_retries;
    speed_counter_t *m_decode_retries; /* requests started over on another decode node */
    speed_counter_t *m_decode_local;   /* sent decode-only for their cached prefix (request.c) */
    speed_counter_t *m_migrations;     /* {outcome}: streams re-issued after their decode node died */
    speed_counter_t *m_kv_bytes;
    speed_counter_t *m_prompt_tokens;
    speed_counter_t *m_generated_tokens;
    speed_counter_t *m_overrun;     /* streams cut off: the client did not read */
    speed_counter_t *m_key_limited; /* {key,limit}: 429s of the per-key limits (key = its name) */
    /* speed_router_kv_routed_total{reason}: KV-aware routing's choices */
    speed_counter_t *m_kv_affinity, *m_kv_balance;
    /* speed_router_kv_prompt_blocks_total{where}: routed prompts' blocks the node held or not */
    speed_counter_t *m_kv_blocks_cached, *m_kv_blocks_new;
};

struct rtr_req {
    speed_router_t *rt;
    rtr_req_t *prev, *next; /* rt->reqs, under rt->lock */

    char id[SPEED_ROUTER_ID_MAX];          /* sent to the nodes and in log lines */
    char oai_id[SPEED_ROUTER_ID_MAX + 16]; /* "chatcmpl-..." / "cmpl-..." */
    speed_openai_api_t api;
    speed_openai_request_t *req;
    speed_router_key_t *key; /* the caller's API key (NULL: authentication off) */
    int64_t key_kv_tokens;   /* KV tokens reserved against the key (worker only) */
    double t_arrival;        /* monotonic seconds */
    int64_t deadline_ms;     /* monotonic ms */
    int64_t created_unix;

    /* HTTP side. http_lock is held around every use of `stream` (worker and housekeeping
     * thread); it is never taken while holding `lock` or jobs_lock. */
    pthread_mutex_t http_lock;
    speed_http_stream_t *stream; /* the writer's reference; NULL once answered */
    bool committed;              /* bytes were written: status 200 is final */
    bool running;                /* admitted: pings may be sent */
    bool overrun_counted;        /* the stream overran its bound (counted once) */
    int64_t last_write_ms;

    /* Cancellation state, under `lock` (a leaf lock, but for the balance pools' mutexes:
     * speed_router_req_cancel lends the leg's node to its Cancel job inside it). */
    pthread_mutex_t lock;
    bool cancelled;
    speed_status_t cancel_status; /* CANCELLED (client gone, shutdown) or TIMEOUT */
    bool client_gone;
    bool shutdown;
    speed_rpc_stream_t *gen; /* Generate stream in flight */
    int decode_node;         /* -1: none */
    bool decode_held;        /* the decode node holds a reservation / sequence */
    int prefill_node;        /* -1: none */
    bool prefill_active;     /* a Prefill call is in flight */

    /* outcome, for metrics (worker only) */
    const char *route_label;    /* "disaggregated" / "decode_only" / "none" */
    unsigned http_status;       /* status label; 499 = client went away */
    bool counted;               /* speed_router_requests_total has this request */
    bool admitted;              /* holds an admission slot (worker only) */
    _Atomic bool slot_released; /* admission slot and n_active given back */
};

/* request.c */
void *speed_router_worker_main(void *arg);
void speed_router_req_free(rtr_req_t *r);

/* request_cancel.c */
/* Cancels a request from any thread (client gone, shutdown); `why` becomes its
 * cancel_status (CANCELLED, or TIMEOUT). Only the first call counts. Cancels the Generate stream at once and queues
 * Cancel RPCs for the legs in flight (speed_router_enqueue_cancel); takes only leaf locks
 * and never waits for I/O. */
void speed_router_req_cancel(rtr_req_t *r, speed_status_t why);
/* Sends Cancel for request `id` to one node (best effort, bounded by
 * SPEED_ROUTER_CANCEL_TIMEOUT_MS; a failure is logged at debug level). Blocks. */
void speed_router_cancel_send(speed_router_t *rt, speed_router_pool_id_t pool, size_t node, const char *id);

/* server.c */
/* Queues Cancel RPCs for the housekeeping thread. Each job comes with one hold of its node
 * (speed_balance_pool_hold), which the queue takes over and releases once the Cancel is sent
 * (or dropped: no memory, shutdown). */
void speed_router_enqueue_cancel(speed_router_t *rt, const cancel_job_t *jobs, size_t n);
/* Answers an OpenAI error from an HTTP thread (gate or handler): status 0 = the kind's,
 * retry_after_s > 0 adds Retry-After. Counted in requests_total as route "none". */
void speed_router_respond_error(speed_router_t *rt, speed_http_request_t *hr, const speed_openai_error_t *err,
                                unsigned status, int retry_after_s);
/* speed_router_key_limited_total{key=<name>,limit=...} += 1. */
void speed_router_count_key_limited(speed_router_t *rt, const speed_router_key_t *key, const char *limit);

/* gate.c */
bool speed_router_gate(void *user, speed_http_request_t *hr);
void speed_router_handle_preflight(void *user, speed_http_request_t *hr);

#endif /* SPEED_ROUTER_INTERNAL_H */
