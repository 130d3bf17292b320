/* speed_node: see node.h. */
#define _GNU_SOURCE 1
#include "node.h"

#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "block_hash.h"
#include "file.h"
#include "log.h"
#include "signals.h"

struct speed_node_work {
    speed_node_work_fn_t fn;
    void *arg;
    struct speed_node_work *next;
};

bool speed_node_accepting(const speed_node_t *n) { return atomic_load(&n->state) == SPEED_NODE_SERVING; }

/* ---- workers --------------------------------------------------------------------------------- */

static void *worker_main(void *arg) {
    speed_node_t *n = arg;
    for (;;) {
        pthread_mutex_lock(&n->work_mu);
        while (!n->work_head && !n->work_stop) pthread_cond_wait(&n->work_cv, &n->work_mu);
        speed_node_work_t *w = n->work_head;
        if (!w) {
            pthread_mutex_unlock(&n->work_mu);
            return NULL;
        }
        n->work_head = w->next;
        if (!n->work_head) n->work_tail = NULL;
        pthread_mutex_unlock(&n->work_mu);
        w->fn(w->arg);
        speed_free(w);
    }
}

speed_status_t speed_node_defer(speed_node_t *n, speed_node_work_fn_t fn, void *arg) {
    speed_node_work_t *w = speed_calloc(1, sizeof *w);
    if (!w) return SPEED_ERR_NO_MEMORY;
    w->fn = fn;
    w->arg = arg;
    pthread_mutex_lock(&n->work_mu);
    if (n->work_tail)
        n->work_tail->next = w;
    else
        n->work_head = w;
    n->work_tail = w;
    pthread_cond_signal(&n->work_cv);
    pthread_mutex_unlock(&n->work_mu);
    return SPEED_OK;
}

/* ---- RPC helpers ------------------------------------------------------------------------------ */

void speed_node_fail(speed_rpc_call_t *call, speed_status_t status, const char *message) {
    SPEED_INFO(SPEED_SUBSYS_NET, "rpc %s: %s: %s", speed_rpc_call_method(call), speed_status_string(status),
               message ? message : "");
    speed_rpc_call_fail(call, status, message ? message : speed_status_string(status));
}

void speed_node_count(speed_node_t *n, const char *status) {
    speed_counter_t *c;
    const char *lbl[] = {status};
    if (speed_counter_labels(n->m_requests, lbl, &c) == SPEED_OK) speed_counter_inc(c);
}

static speed_status_t pack(const ProtobufCMessage *msg, uint8_t **buf, size_t *len) {
    return speed_proto_pack(msg, buf, len);
}

speed_status_t speed_node_reply(speed_rpc_call_t *call, const ProtobufCMessage *msg) {
    uint8_t *buf = NULL;
    size_t len = 0;
    speed_status_t st = pack(msg, &buf, &len);
    if (st != SPEED_OK) {
        speed_rpc_call_fail(call, st, "cannot encode the reply");
        return st;
    }
    st = speed_rpc_call_reply(call, buf, len);
    speed_free(buf);
    return st;
}

speed_status_t speed_node_send(speed_rpc_call_t *call, const ProtobufCMessage *msg) {
    uint8_t *buf = NULL;
    size_t len = 0;
    SPEED_CHECK(pack(msg, &buf, &len));
    speed_status_t st = speed_rpc_call_send(call, buf, len);
    speed_free(buf);
    return st;
}

/* ---- Node service ----------------------------------------------------------------------------- */

static Speed__V1__NodeState proto_state(const speed_node_t *n) {
    switch (atomic_load(&n->state)) {
    case SPEED_NODE_SERVING: return SPEED__V1__NODE_STATE__NODE_STATE_SERVING;
    case SPEED_NODE_DRAINING: return SPEED__V1__NODE_STATE__NODE_STATE_DRAINING;
    default: return SPEED__V1__NODE_STATE__NODE_STATE_STARTING;
    }
}

static void on_health(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    (void)req, (void)len;
    speed_node_t *n = user;
    Speed__V1__HealthReply r = SPEED__V1__HEALTH_REPLY__INIT;
    r.state = proto_state(n);
    r.role = (char *)n->role;
    r.epoch = n->epoch;
    r.model_id = n->model_id;
    speed_node_reply(call, &r.base);
}

static void on_drain(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    (void)req, (void)len;
    speed_node_t *n = user;
    speed_batcher_stats_t s;
    speed_batcher_stats(n->batcher, &s);
    atomic_store(&n->drain_requested, true);
    Speed__V1__DrainReply r = SPEED__V1__DRAIN_REPLY__INIT;
    r.running = s.running + s.waiting;
    speed_node_reply(call, &r.base);
}

static double kv_usage_ratio(const speed_batcher_stats_t *s) {
    double used = 0, total = 0;
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        used += (double)s->kv_live.bytes_reserved[p]; /* cached entries make room when asked */
        total += (double)s->kv.bytes_total[p];
    }
    return total > 0 ? used / total : 0.0;
}

static void on_status(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    speed_node_t *n = user;
    Speed__V1__NodeStatusRequest *sreq = NULL;
    if (speed_proto_unpack(&speed__v1__node_status_request__descriptor, req, len, (ProtobufCMessage **)&sreq) !=
        SPEED_OK) {
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT, "malformed NodeStatusRequest");
        return;
    }
    speed_batcher_stats_t s;
    speed_batcher_stats(n->batcher, &s);
    Speed__V1__NodeStatus r = SPEED__V1__NODE_STATUS__INIT;
    Speed__V1__KvPoolUsage pu[SPEED_KV_POOL_COUNT], *pp[SPEED_KV_POOL_COUNT];
    const char *names[SPEED_KV_POOL_COUNT] = {"lower", "upper"};
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        speed__v1__kv_pool_usage__init(&pu[p]);
        pu[p].name = (char *)names[p];
        pu[p].blocks_total = (uint32_t)s.kv.n_blocks[p];
        pu[p].blocks_free = (uint32_t)s.kv.n_blocks_free[p];
        pp[p] = &pu[p];
    }
    r.running = s.running + s.reserved;
    r.waiting = s.waiting;
    r.n_pools = SPEED_KV_POOL_COUNT;
    r.pools = pp;
    r.kv_usage_ratio = (float)kv_usage_ratio(&s);
    r.queue_limit = (int32_t)n->pool->max_waiting;
    r.state = proto_state(n);
    /* the requests' blocks: a prefix cache's entries are not load (they make room on demand) */
    r.active_blocks = (uint32_t)s.kv_live.n_blocks[0];
    /* KV-aware routing: the journal's events after the router's cursor (decode nodes); without
     * memory for them the reply goes out without events and the router asks again */
    speed_node_cache_events_t hold;
    speed_node_cache_events(n, sreq->cache, &hold, &r.cache);
    speed_node_reply(call, &r.base);
    speed_node_cache_events_cleanup(&hold);
    speed_proto_free(&sreq->base);
}

/* ---- HTTP ------------------------------------------------------------------------------------- */

static void on_http_health(void *user, speed_http_request_t *req) {
    speed_node_t *n = user;
    int st = atomic_load(&n->state);
    const char *text = st == SPEED_NODE_SERVING    ? "{\"status\":\"ok\"}\n"
                       : st == SPEED_NODE_DRAINING ? "{\"status\":\"draining\"}\n"
                                                   : "{\"status\":\"starting\"}\n";
    speed_http_respond(req, st == SPEED_NODE_SERVING ? 200 : 503, "application/json", text, strlen(text));
}

/* ---- metrics ---------------------------------------------------------------------------------- */

#define GAUGE_FN(fname, expr)                \
    static double fname(void *user) {        \
        speed_node_t *n = user;              \
        speed_batcher_stats_t s;             \
        speed_batcher_stats(n->batcher, &s); \
        return (expr);                       \
    }
GAUGE_FN(g_running, (double)s.running)
GAUGE_FN(g_waiting, (double)s.waiting)
GAUGE_FN(g_reserved, (double)s.reserved)
GAUGE_FN(g_kv_ratio, kv_usage_ratio(&s))
GAUGE_FN(g_blocks_reserved, (double)(s.kv_live.n_blocks[0] + s.kv_live.n_blocks[1]))
GAUGE_FN(g_blocks_total, (double)(s.kv.n_blocks[0] + s.kv.n_blocks[1]))
GAUGE_FN(g_kv_bytes_used, (double)(s.kv.usage.bytes_used[0] + s.kv.usage.bytes_used[1]))

/* The KV plane's counters of the UCX context (docs/security.md#the-kv-plane). Cumulative, exported as
 * gauges read at scrape time (the context keeps the counts). */
#define XFER_FN(fname, expr)                  \
    static double fname(void *user) {         \
        speed_node_t *n = user;               \
        speed_kv_xfer_ctx_stats_t s;          \
        speed_kv_xfer_ctx_stats(n->xfer, &s); \
        return (expr);                        \
    }
XFER_FN(g_nonce_refused, (double)s.n_nonce_rejected)
XFER_FN(g_integrity_failed, (double)s.n_integrity_failed)
XFER_FN(g_aborts, (double)(s.n_aborts_sent + s.n_aborts_received))
XFER_FN(g_writes_dropped, (double)s.n_writes_dropped)

static double g_state(void *user) { return (double)atomic_load(&((speed_node_t *)user)->state); }
GAUGE_FN(g_tokens_in_flight, (double)s.tokens_in_flight)

/* Engine thread, after each step: three histogram observations (atomics). */
static void on_step(void *user, const speed_batch_step_t *step) {
    speed_node_t *n = user;
    speed_histogram_observe(n->m_step_seconds, step->seconds);
    speed_histogram_observe(n->m_step_seqs, (double)step->n_seqs);
    speed_histogram_observe(n->m_step_tokens, (double)(step->n_prefill_rows + step->n_decode_rows));
    speed_node_cache_observe_step(n, &step->prefix);
}

void speed_node_observe_finish(speed_node_t *n, const speed_batch_event_t *ev, bool prompt_computed) {
    const speed_batch_usage_t *u = ev->usage;
    if (!u) return;
    /* A request the engine never took (cancelled or expired while waiting) ran no step. */
    if (u->prefill_ms > 0 || u->decode_ms > 0) speed_histogram_observe(n->m_queue_wait, u->queue_ms / 1e3);
    if (!prompt_computed || (ev->finish != SPEED_BATCH_STOP && ev->finish != SPEED_BATCH_LENGTH)) return;
    /* Prompt rows above the cutoff: the anchors and the tail (all of them when C = L). */
    int n_layers = n->model->config.n_layers;
    int64_t a_t = (int64_t)u->depth.anchors + u->depth.tail;
    int64_t full = u->depth.prefill_layers >= n_layers || a_t > u->n_prompt ? u->n_prompt : a_t;
    speed_counter_add(n->m_tokens_full, (double)full);
    speed_counter_add(n->m_tokens_shallow, (double)(u->n_prompt - full));
    if (u->kv_bytes_full_depth > u->kv_bytes)
        speed_counter_add(n->m_kv_saved, (double)(u->kv_bytes_full_depth - u->kv_bytes));
}

/* The {role} series of a new histogram family. */
static speed_status_t role_histogram(speed_node_t *n, const char *name, const char *help, const double *b, size_t nb,
                                     speed_histogram_t **child_p) {
    static const char *const label[] = {"role"};
    speed_histogram_t *h;
    SPEED_CHECK(speed_histogram_register(n->metrics, name, help, label, 1, b, nb, &h));
    return speed_histogram_labels(h, (const char *[]){n->role}, child_p);
}

static speed_status_t operator_metrics_init(speed_node_t *n) {
    speed_metrics_t *m = n->metrics;
    static const double step_b[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
    static const double seq_b[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
    static const double tok_b[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384};
    const size_t n_step = sizeof step_b / sizeof step_b[0], n_seq = sizeof seq_b / sizeof seq_b[0];
    const size_t n_tok = sizeof tok_b / sizeof tok_b[0];
    size_t nb;
    const double *lat = speed_histogram_latency_buckets(&nb);
    SPEED_CHECK(role_histogram(n, "speed_engine_step_duration_seconds", "Wall time of one engine step", step_b, n_step,
                               &n->m_step_seconds));
    SPEED_CHECK(role_histogram(n, "speed_engine_step_sequences", "Sequences with rows in one engine step (batch size)",
                               seq_b, n_seq, &n->m_step_seqs));
    SPEED_CHECK(role_histogram(n, "speed_engine_step_tokens", "Tokens (prompt and generated rows) in one engine step",
                               tok_b, n_tok, &n->m_step_tokens));
    SPEED_CHECK(role_histogram(n, "speed_engine_queue_wait_seconds",
                               "Time from submit (or a reservation's start) until the engine took the request", lat, nb,
                               &n->m_queue_wait));
    SPEED_CHECK(role_histogram(n, "speed_kv_transfer_exposed_seconds",
                               "Time from the end of a prefill until its KV transfer was acknowledged (the part that "
                               "did not overlap compute)",
                               lat, nb, &n->m_xfer_exposed));
    static const char *const role_depth[] = {"role", "depth"};
    speed_counter_t *tokens;
    SPEED_CHECK(speed_counter_register(m, "speed_engine_prompt_tokens_total",
                                       "Prompt tokens of completed prefills computed here, by depth: shallow (through "
                                       "the lower C layers) or full (anchors, tail, or C = L)",
                                       role_depth, 2, &tokens));
    SPEED_CHECK(speed_counter_labels(tokens, (const char *[]){n->role, "shallow"}, &n->m_tokens_shallow));
    SPEED_CHECK(speed_counter_labels(tokens, (const char *[]){n->role, "full"}, &n->m_tokens_full));
    static const char *const role_label[] = {"role"};
    speed_counter_t *saved;
    SPEED_CHECK(speed_counter_register(m, "speed_kv_bytes_saved_total",
                                       "KV bytes the prompts computed here did not need because of SPEED (full-depth "
                                       "bytes minus the bytes stored)",
                                       role_label, 1, &saved));
    SPEED_CHECK(speed_counter_labels(saved, (const char *[]){n->role}, &n->m_kv_saved));
    SPEED_CHECK(speed_gauge_register_callback_labeled(
        m, "speed_engine_tokens_in_flight",
        "Prompt plus generated-so-far tokens of the requests running or reserved in the engine", role_label,
        (const char *[]){n->role}, 1, g_tokens_in_flight, n, NULL));
    SPEED_CHECK(speed_gauge_register_callback_labeled(m, "speed_node_state", "0 starting, 1 serving, 2 draining",
                                                      role_label, (const char *[]){n->role}, 1, g_state, n, NULL));
    return SPEED_OK;
}

static speed_status_t metrics_init(speed_node_t *n) {
    char name[128];
    SPEED_CHECK(speed_metrics_create(&n->metrics));
    speed_metrics_t *m = n->metrics;
    const char *role = n->role;
    snprintf(name, sizeof name, "speed_%s_requests_total", role);
    const char *status_label[] = {"status"};
    SPEED_CHECK(speed_counter_register(m, name, "Requests by final status", status_label, 1, &n->m_requests));
    /* docs/design.md §6 names the prefill pool's counter speed_prefill_tokens_total */
    snprintf(name, sizeof name, strcmp(role, "prefill") == 0 ? "speed_%s_tokens_total" : "speed_%s_prompt_tokens_total",
             role);
    SPEED_CHECK(speed_counter_register(m, name, "Prompt tokens computed here", NULL, 0, &n->m_prompt_tokens));
    snprintf(name, sizeof name, "speed_%s_generated_tokens_total", role);
    SPEED_CHECK(speed_counter_register(m, name, "Tokens generated", NULL, 0, &n->m_generated_tokens));
    snprintf(name, sizeof name, "speed_%s_running_requests", role);
    SPEED_CHECK(speed_gauge_register_callback(m, name, "Requests in the engine", g_running, n, NULL));
    snprintf(name, sizeof name, "speed_%s_waiting_requests", role);
    SPEED_CHECK(speed_gauge_register_callback(m, name, "Requests waiting for room in the engine", g_waiting, n, NULL));
    snprintf(name, sizeof name, "speed_%s_reserved_requests", role);
    SPEED_CHECK(speed_gauge_register_callback(m, name, "Reservations not claimed yet", g_reserved, n, NULL));
    snprintf(name, sizeof name, "speed_%s_node_state", role);
    SPEED_CHECK(speed_gauge_register_callback(m, name, "0 starting, 1 serving, 2 draining", g_state, n, NULL));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_kv_cache_usage_ratio", "Reserved / total KV bytes", g_kv_ratio,
                                              n, NULL));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_kv_blocks_reserved", "KV blocks held by requests",
                                              g_blocks_reserved, n, NULL));
    SPEED_CHECK(
        speed_gauge_register_callback(m, "speed_kv_blocks_total", "KV blocks in the pools", g_blocks_total, n, NULL));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_kv_cache_used_bytes", "KV bytes holding entries",
                                              g_kv_bytes_used, n, NULL));
    SPEED_CHECK(speed_counter_register(m, "speed_kv_transfer_bytes_total", "KV bytes moved over UCX", NULL, 0,
                                       &n->m_xfer_bytes));
    size_t nb;
    const double *b = speed_histogram_latency_buckets(&nb);
    SPEED_CHECK(speed_histogram_register(m, "speed_kv_transfer_seconds", "KV transfer time per request", NULL, 0, b, nb,
                                         &n->m_xfer_seconds));
    const char *stage_label[] = {"stage"};
    SPEED_CHECK(speed_counter_register(m, "speed_kv_transfer_failures_total", "KV transfers that failed, by stage",
                                       stage_label, 1, &n->m_xfer_failures));
    for (int stage = 0; stage < SPEED_KV_STAGE_COUNT; stage++) { /* every series from the start, at 0 */
        speed_counter_t *c;
        SPEED_CHECK(speed_counter_labels(n->m_xfer_failures, (const char *[]){speed_kv_stage_name(stage)}, &c));
    }
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_kv_notifies_refused",
                                              "KV notifies refused for a missing grant or a wrong nonce (since start)",
                                              g_nonce_refused, n, NULL));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_kv_integrity_failures",
                                              "KV transfers whose integrity tags did not match (since start)",
                                              g_integrity_failed, n, NULL));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_kv_aborts",
                                              "Cancelled transfers' abort notifies sent (prefill) or accepted "
                                              "(decode), since start",
                                              g_aborts, n, NULL));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_kv_writes_dropped",
                                              "KV writes the decode node dropped: no live grant (the reservation "
                                              "ended: a late write), a wrong nonce, or outside the reservation's "
                                              "blocks (since start)",
                                              g_writes_dropped, n, NULL));
    return operator_metrics_init(n);
}

/* ---- lifecycle -------------------------------------------------------------------------------- */

static void silent_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                        const char *line) {
    (void)user, (void)level, (void)subsys, (void)request_id, (void)line;
}

/* The pool's backend; replica i of a cuda pool takes GPU device + i. A backend that cannot be
 * created is reported as one line naming the backend, the cause and the way out. */
static speed_status_t backend_create(speed_node_t *n) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = (speed_backend_kind_t)n->pool->backend;
    bp.n_threads = (int)n->pool->threads;
    bp.device = (int)(n->pool->device + n->cfg.node_index);
    bp.batch_invariant = n->cfg.batch_invariant; /* prefill and decode nodes alike: one order per row */
    n->n_ranks = (int)n->pool->tensor_parallel;
    if (n->n_ranks > 1 && bp.kind == SPEED_BACKEND_CUDA) {
        SPEED_ERROR(SPEED_SUBSYS_CORE,
                    "%s: tensor_parallel %d with backend cuda: GPU ranks run one process each over NCCL, which "
                    "the nodes do not start yet (docs/tensor-parallel.md); use tensor_parallel: 1 per GPU, or a "
                    "cpu backend",
                    n->role, n->n_ranks);
        return SPEED_ERR_UNSUPPORTED;
    }
    if (n->n_ranks > 1) { /* the replica's threads are shared out among its ranks */
        int total = bp.n_threads > 0 ? bp.n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
        bp.n_threads = total / n->n_ranks > 0 ? total / n->n_ranks : 1;
    }
    char label[32];
    speed_backend_label(&bp, label, sizeof label);
    /* The backend logs its cause; it is folded into our line instead of printed as another.
     * Nothing else runs yet, so the sink can be swapped. */
    speed_log_clear_last_error();
    speed_log_set_sink(silent_sink, NULL);
    speed_status_t st = speed_backend_create(&bp, &n->backend);
    speed_log_set_sink(NULL, NULL);
    n->rank_backends[0] = n->backend;
    for (int r = 1; st == SPEED_OK && r < n->n_ranks; r++) st = speed_backend_create(&bp, &n->rank_backends[r]);
    if (st == SPEED_OK) {
        if (n->n_ranks > 1)
            SPEED_INFO(SPEED_SUBSYS_CORE, "%s: backend %s, tensor parallel: %d ranks", n->role,
                       speed_backend_name(n->backend), n->n_ranks);
        else
            SPEED_INFO(SPEED_SUBSYS_CORE, "%s: backend %s", n->role, speed_backend_name(n->backend));
        return SPEED_OK;
    }
    const char *cause = speed_backend_failure(st);
    char hint[96] = "";
    if (st == SPEED_ERR_DEVICE)
        snprintf(hint, sizeof hint, " (the cuda backend needs a GPU; use %s.backend: cpu)", n->role);
    else if (st == SPEED_ERR_UNSUPPORTED)
        snprintf(hint, sizeof hint, "; use %s.backend: cpu", n->role);
    char line[1024];
    snprintf(line, sizeof line, "%s", cause); /* cause lives in the buffer SPEED_ERROR rewrites */
    SPEED_ERROR(SPEED_SUBSYS_CORE, "%s: backend %s: %s%s", n->role, label, line, hint);
    return st;
}

/* The batcher is about to free a request's KV blocks (its end, a cancel, its lease end): revoke
 * the reservation's grant first, so that a KV write still on its way (a prefill node frozen, a
 * partitioned link whose TCP delivers it later) is dropped by the transfer context instead of
 * landing in blocks another request may get next. Batcher thread; the context exists before
 * any request does. */
static void on_kv_free(void *user, const char *request_id) {
    speed_node_t *n = user;
    if (n->xfer) speed_kv_xfer_ctx_grant_drop(n->xfer, request_id);
}

static speed_status_t load_model(speed_node_t *n) {
    const speed_cluster_config_t *c = &n->cfg;
    if (!c->model || !*c->model) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "%s: no model: set `model:` in the cluster config or pass --model DIR", n->role);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    SPEED_CHECK(backend_create(n)); /* first: a missing GPU fails before gigabytes are read */
    speed_model_params_t mp = speed_model_default_params();
    mp.hugepages = c->weights_hugepages;
    SPEED_CHECK(speed_model_load(c->model, &mp, &n->model));
    speed_tok_params_t tp = speed_tok_default_params();
    SPEED_CHECK(speed_tok_load(c->model, &tp, &n->tok));
    if (c->served_model_name && *c->served_model_name)
        snprintf(n->model_id, sizeof n->model_id, "%s", c->served_model_name);
    else
        snprintf(n->model_id, sizeof n->model_id, "%s", speed_path_base(c->model));


    speed_batcher_params_t p = speed_batcher_default_params();
    p.backend = n->backend;
    p.model = n->model;
    p.tokenizer = n->tok;
    p.lease_ms = c->lease_ms;
    p.max_waiting = (int)n->pool->max_waiting;
    p.engine.kv_dtype = (speed_dtype_t)c->kv_dtype;
    p.engine.block_tokens = (int)c->kv_block_tokens;
    p.engine.max_seqs = (int)n->pool->max_running;
    p.engine.max_step_tokens = (int)n->pool->max_step_tokens;
    p.engine.prefill_chunk = (int)n->pool->prefill_chunk;
    if (c->max_context > 0) p.engine.max_context = (int)c->max_context;
    char why[256];
    if (speed_cluster_config_depth(c, n->model->config.n_layers, &p.engine.depth, why, sizeof why) != SPEED_OK) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "%s: %s", n->role, why);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    p.engine.model = n->model;
    p.engine.backend = n->backend;
    p.engine.tp_size = n->n_ranks;
    p.engine.tp_backends = n->rank_backends;
    /* KV transfer from/into GPU pools: through the cache's pinned host mirror, on by itself
     * for a cuda backend (AUTO; cpu nodes have none), unless UCX addresses GPU memory itself. */
    p.engine.kv_host_mirror = c->ucx_cuda_direct ? SPEED_KV_MIRROR_OFF : SPEED_KV_MIRROR_AUTO;
    /* Pools: kv_tokens at full depth split over max_running sequences, 3/4 prompt and 1/4
     * generated; the upper pool then holds only anchors, tail and generated tokens. */
    int64_t per_seq = n->pool->kv_tokens / n->pool->max_running;
    if (per_seq < 2) per_seq = 2;
    int64_t n_new = per_seq / 4 > 0 ? per_seq / 4 : 1;
    SPEED_CHECK(speed_engine_params_fit_kv(&p.engine, n->pool->max_running, per_seq - n_new, n_new));
    if (strcmp(n->role, "decode") == 0 && c->prefix_cache_blocks > 0) {
        /* The prefix cache (docs/prefix-cache.md): its blocks come on top of what kv_tokens sizes,
         * so that entries take no room running requests were sized for (and a request short of
         * blocks evicts entries anyway). Entries hold lower-pool blocks for every token and
         * upper-pool ones for their anchors, tail and answer: a quarter as many of those. Keys
         * are the cluster's block hashes, so that the events name the router's keys. */
        p.engine.prefix_cache.max_blocks = c->prefix_cache_blocks;
        p.engine.prefix_cache.hash_next = speed_block_hash_next;
        p.engine.prefix_cache.hash_seed = speed_block_hash_seed(n->model_id, (int32_t)c->kv_block_tokens);
        p.engine.prefix_cache.event_cb = speed_node_cache_on_event;
        p.engine.prefix_cache.event_user = n;
        p.engine.n_blocks_lower += c->prefix_cache_blocks;
        p.engine.n_blocks_upper += c->prefix_cache_blocks / 4 + 1;
    }
    if (strcmp(n->role, "decode") == 0) {
        p.on_kv_free = on_kv_free; /* the grant goes before the blocks do */
        p.kv_free_user = n;
    }
    p.on_step = on_step;
    p.step_user = n;
    SPEED_CHECK(speed_batcher_create(&p, &n->batcher));

    speed_kv_xfer_ctx_params_t xp = speed_kv_xfer_ctx_default_params();
    xp.cuda_direct = c->ucx_cuda_direct;
    /* Binding: shm nodes open shared memory (and loopback to themselves) only, never a TCP
     * socket; tcp nodes only the configured devices. */
    if (c->ucx_transport == SPEED_KV_TRANSPORT_SHM) {
        xp.tls = "sm,self";
    } else {
        xp.tls = "tcp,self";
        if (c->ucx_net_devices && *c->ucx_net_devices) xp.net_devices = c->ucx_net_devices;
    }
    if (strcmp(n->role, "decode") == 0) {
        /* a notify marks KV ready only with the reservation's nonce (grants from Reserve) */
        xp.require_grant = true;
        /* and no rkey in a Reserve reply: KV reaches the pools only as checked writes, unless
         * the pools are GPU memory the receiver cannot copy into (cuda_direct: puts) */
        xp.writes_only = !c->ucx_cuda_direct;
        xp.notify_cb = speed_node_on_kv_notify;
        xp.notify_user = n;
    }
    SPEED_CHECK(speed_kv_xfer_ctx_create(&xp, &n->xfer));
    n->epoch = speed_kv_xfer_ctx_epoch(n->xfer);
    SPEED_CHECK(speed_kv_xfer_ctx_register_cache(n->xfer, speed_batcher_kv_cache(n->batcher)));
    return SPEED_OK;
}

speed_status_t speed_node_init(speed_node_t *n, const char *role, int argc, char **argv, int *exit_code_p) {
    bool (*cancel_hook)(speed_node_t *, const char *) = n->cancel_hook; /* the role set it */
    memset(n, 0, sizeof *n);
    n->cancel_hook = cancel_hook;
    n->role = role;
    atomic_init(&n->state, SPEED_NODE_STARTING);
    atomic_init(&n->drain_requested, false);
    pthread_mutex_init(&n->work_mu, NULL);
    pthread_cond_init(&n->work_cv, NULL);
    json_set_alloc_funcs(speed_malloc, speed_free);
    *exit_code_p = 1;

    speed_status_t st = speed_cluster_config_load(argc, argv, role, &n->cfg, &n->cfg_handle);
    if (st != SPEED_OK) {
        fprintf(stderr, "speed-%s: %s\n", role, speed_log_last_error());
        *exit_code_p = 2;
        return st;
    }
    if (speed_config_help_requested(n->cfg_handle)) {
        size_t nf;
        const speed_config_field_t *f = speed_cluster_config_fields(&nf);
        printf("usage: speed-%s --config CLUSTER.yaml [--node.index I] [--model DIR] [options]\n\n", role);
        speed_config_print_help(f, nf, "SPEED_", stdout);
        *exit_code_p = 0;
        return SPEED_ERR_CANCELLED;
    }
    if (speed_config_print_requested(n->cfg_handle)) {
        speed_config_print(n->cfg_handle, stdout);
        *exit_code_p = 0;
        return SPEED_ERR_CANCELLED;
    }
    char *const *pos = NULL;
    if (speed_config_positional(n->cfg_handle, &pos) > 0) { /* e.g. a value after a boolean flag */
        fprintf(stderr,
                "speed-%s: unexpected argument '%s' (options are --key value; booleans are --key or --no-key)\n", role,
                pos[0]);
        *exit_code_p = 2;
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (n->cfg.log && speed_log_configure(n->cfg.log) != SPEED_OK) {
        fprintf(stderr, "speed-%s: bad log spec '%s'\n", role, n->cfg.log);
        *exit_code_p = 2;
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    n->pool = speed_cluster_pool(&n->cfg, role);
    /* The control plane's credentials before the (slow) model load: a node without them says so
     * at once. */
    char prog[32], identity[48];
    snprintf(prog, sizeof prog, "speed-%s", role);
    snprintf(identity, sizeof identity, "%s-%lld", role, (long long)n->cfg.node_index);
    if (speed_cluster_tls_load(&n->cfg, prog, identity, &n->tls) != SPEED_OK) {
        *exit_code_p = 2;
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (n->cfg.ucx_transport == SPEED_KV_TRANSPORT_TCP && n->cfg.ucx_net_devices && *n->cfg.ucx_net_devices)
        setenv("UCX_NET_DEVICES", n->cfg.ucx_net_devices, 0);
    setenv("UCX_TCP_CM_REUSEADDR", "y", 0);

    st = load_model(n);
    if (st == SPEED_OK) st = metrics_init(n);
    if (st == SPEED_OK && strcmp(role, "decode") == 0) st = speed_node_cache_init(n);
    if (st == SPEED_OK) {
        speed_cluster_grpc_listen_addr(&n->cfg, n->pool, n->cfg.node_index, n->grpc_addr, sizeof n->grpc_addr);
        speed_cluster_http_addr(&n->cfg, n->pool, n->cfg.node_index, n->http_addr, sizeof n->http_addr);
        speed_rpc_server_params_t rp = speed_rpc_server_default_params();
        rp.address = n->grpc_addr;
        char dial[300];
        speed_cluster_grpc_addr(&n->cfg, n->pool, n->cfg.node_index, dial, sizeof dial);
        if (speed_cluster_control_unreachable(&n->cfg, n->pool, n->cfg.node_index))
            SPEED_WARN(SPEED_SUBSYS_NET,
                       "speed-%s: gRPC binds %s (control.listen) but peers dial %s: set control.listen to this "
                       "host's private address",
                       role, n->cfg.control_listen, dial);
        speed_rpc_tls_t tls = {.ca = n->tls.ca, .cert = n->tls.cert, .key = n->tls.key};
        rp.tls = n->tls.cert ? &tls : NULL;
        st = speed_rpc_server_create(&rp, &n->rpc);
    }
    if (st == SPEED_OK) st = speed_node_add_method(n, SPEED_METHOD_NODE_HEALTH, SPEED_RPC_UNARY, on_health, n);
    if (st == SPEED_OK) st = speed_node_add_method(n, SPEED_METHOD_NODE_DRAIN, SPEED_RPC_UNARY, on_drain, n);
    if (st == SPEED_OK) st = speed_node_add_method(n, SPEED_METHOD_NODE_STATUS, SPEED_RPC_UNARY, on_status, n);
    if (st == SPEED_OK) {
        speed_http_server_params_t hp = speed_http_server_default_params();
        hp.host = n->cfg.metrics_listen; /* the metrics network, not the control plane's */
        hp.port = (uint16_t)(n->pool->http_port + n->cfg.node_index);
        hp.n_threads = 1;
        st = speed_http_server_create(&hp, &n->http);
    }
    if (st == SPEED_OK) st = speed_http_server_route(n->http, "GET", "/health", on_http_health, n);
    if (st == SPEED_OK) st = speed_http_server_route_metrics(n->http, "/metrics", n->metrics);
    for (int i = 0; st == SPEED_OK && i < 4; i++) {
        if (pthread_create(&n->workers[i], NULL, worker_main, n) != 0)
            st = SPEED_ERR_INTERNAL;
        else
            n->n_workers++;
    }
    if (st != SPEED_OK) {
        fprintf(stderr, "speed-%s: %s: %s\n", role, speed_status_string(st), speed_log_last_error());
        return st;
    }
    *exit_code_p = 0;
    return SPEED_OK;
}

/* Who may call what (certificate common names, speed_rpc_server_allow's matching: "prefill"
 * is any prefill replica). The router drives requests and polls health and status; speedctl's
 * "admin" certificate reads health and status and drains. No node calls another over gRPC
 * today: a method added for that must be listed here. Anything not listed: the router only. */
static const struct {
    const char *path;
    const char *callers;
} node_callers[] = {
    {SPEED_METHOD_NODE_HEALTH, "router,admin"},
    {SPEED_METHOD_NODE_STATUS, "router,admin"},
    {SPEED_METHOD_NODE_DRAIN, "admin"},
};
#define NODE_DEFAULT_CALLERS "router"

const char *speed_node_callers(const char *path) {
    for (size_t i = 0; i < sizeof node_callers / sizeof node_callers[0]; i++)
        if (strcmp(node_callers[i].path, path) == 0) return node_callers[i].callers;
    return NODE_DEFAULT_CALLERS;
}

speed_status_t speed_node_add_method(speed_node_t *n, const char *path, speed_rpc_kind_t kind,
                                     speed_rpc_handler_cb_t handler, void *user) {
    SPEED_CHECK(speed_rpc_server_add_method(n->rpc, path, kind, handler, user));
    return speed_rpc_server_allow(n->rpc, path, speed_node_callers(path));
}

speed_status_t speed_node_start(speed_node_t *n) {
    speed_status_t st = speed_rpc_server_start(n->rpc);
    if (st == SPEED_OK) st = speed_http_server_start(n->http);
    if (st != SPEED_OK) {
        fprintf(stderr, "speed-%s: cannot listen (%s / %s): %s\n", n->role, n->grpc_addr, n->http_addr,
                speed_log_last_error());
        return st;
    }
    atomic_store(&n->state, SPEED_NODE_SERVING);
    speed_depth_t d = speed_batcher_depth(n->batcher);
    SPEED_INFO(SPEED_SUBSYS_CORE,
               "speed-%s %lld ready: grpc %s, http %s, model %s (%d layers, C=%d A=%d T=%d), epoch %llu", n->role,
               (long long)n->cfg.node_index, n->grpc_addr, n->http_addr, n->model_id, n->model->config.n_layers,
               d.prefill_layers, d.anchors, d.tail, (unsigned long long)n->epoch);
    return SPEED_OK;
}

void speed_node_run(speed_node_t *n, int64_t grace_ms) {
    sigset_t set; /* blocked by speed_node_main (or the daemon's own main) before any thread */
    speed_signals_stop_set(&set);
    for (;;) {
        int sig = speed_signals_wait(&set, 200);
        if (sig == SIGINT || sig == SIGTERM) {
            SPEED_INFO(SPEED_SUBSYS_CORE, "speed-%s: %s: draining", n->role, sig == SIGINT ? "SIGINT" : "SIGTERM");
            break;
        }
        if (atomic_load(&n->drain_requested)) {
            SPEED_INFO(SPEED_SUBSYS_CORE, "speed-%s: drain requested", n->role);
            break;
        }
    }
    atomic_store(&n->state, SPEED_NODE_DRAINING);
    speed_batcher_drain(n->batcher);
    /* running requests finish; a second signal (or the grace period) cuts the drain short */
    for (int64_t waited = 0;; waited += 200) {
        if (speed_batcher_wait_idle(n->batcher, 0)) return;
        if (waited >= grace_ms) {
            SPEED_WARN(SPEED_SUBSYS_CORE, "speed-%s: requests still running after %lld ms; cancelling them", n->role,
                       (long long)grace_ms);
            return;
        }
        int sig = speed_signals_wait(&set, 200);
        if (sig == SIGINT || sig == SIGTERM) {
            SPEED_WARN(SPEED_SUBSYS_CORE, "speed-%s: second signal: cancelling the running requests", n->role);
            return;
        }
    }
}

void speed_node_cleanup(speed_node_t *n) {
    if (n->rpc) speed_rpc_server_shutdown(n->rpc, 2000);
    if (n->xfer && n->batcher) speed_kv_xfer_ctx_deregister_cache(n->xfer, speed_batcher_kv_cache(n->batcher));
    /* the batcher's finish events complete the calls the shutdown left */
    speed_batcher_destroy(n->batcher);
    n->batcher = NULL;
    pthread_mutex_lock(&n->work_mu);
    n->work_stop = true;
    pthread_cond_broadcast(&n->work_cv);
    pthread_mutex_unlock(&n->work_mu);
    for (int i = 0; i < n->n_workers; i++) pthread_join(n->workers[i], NULL);
    while (n->work_head) { /* never ran: nothing to do but free */
        speed_node_work_t *w = n->work_head;
        n->work_head = w->next;
        speed_free(w);
    }
    speed_rpc_server_destroy(n->rpc);
    speed_http_server_destroy(n->http);
    speed_node_cache_cleanup(n);
    if (n->xfer) speed_kv_xfer_ctx_destroy(n->xfer);
    for (int r = 1; r < n->n_ranks; r++) speed_backend_destroy(n->rank_backends[r]);
    speed_backend_destroy(n->backend);
    speed_tok_destroy(n->tok);
    speed_model_destroy(n->model);
    speed_metrics_destroy(n->metrics);
    speed_tls_creds_cleanup(&n->tls);
    speed_config_destroy(n->cfg_handle);
    pthread_mutex_destroy(&n->work_mu);
    pthread_cond_destroy(&n->work_cv);
    memset(n, 0, sizeof *n);
}

void speed_node_on_cancel(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    speed_node_t *n = user;
    Speed__V1__CancelRequest *req = NULL;
    if (speed_proto_unpack(&speed__v1__cancel_request__descriptor, data, len, (ProtobufCMessage **)&req) != SPEED_OK ||
        !req->request_id || !*req->request_id || strlen(req->request_id) > SPEED_BATCH_ID_MAX) {
        if (req) speed_proto_free(&req->base);
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT, "malformed CancelRequest");
        return;
    }
    Speed__V1__CancelReply reply = SPEED__V1__CANCEL_REPLY__INIT;
    reply.found = n->cancel_hook && n->cancel_hook(n, req->request_id);
    if (!reply.found) reply.found = speed_batcher_cancel(n->batcher, req->request_id) == SPEED_OK;
    speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, req->request_id, "cancel: %s", reply.found ? "ended" : "not found");
    speed_node_reply(call, &reply.base);
    speed_proto_free(&req->base);
}

int speed_node_main(speed_node_t *n, const char *role, const speed_node_method_t *methods, int n_methods, int argc,
                    char **argv) {
    sigset_t stop;
    speed_signals_block_stop(&stop); /* before any thread exists: every thread inherits the mask */
    int code;
    if (speed_node_init(n, role, argc, argv, &code) != SPEED_OK) {
        speed_node_cleanup(n);
        return code;
    }
    speed_status_t st = SPEED_OK;
    for (int i = 0; i < n_methods && st == SPEED_OK; i++)
        st = speed_node_add_method(n, methods[i].path, methods[i].kind, methods[i].handler, n);
    if (st == SPEED_OK) st = speed_node_start(n);
    if (st != SPEED_OK) {
        speed_node_cleanup(n);
        return 1;
    }
    speed_node_run(n, 30000);
    speed_node_cleanup(n);
    return 0;
}
