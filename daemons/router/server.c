/* speed_router: HTTP front end, request hand-off, housekeeping and lifecycle (router.h). */
#include "router_internal.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "block_hash.h"
#include "clock.h"
#include "file.h"
#include "log.h"

#define SUBSYS SPEED_SUBSYS_NET

/* At shutdown, answers already complete get this long to reach their clients. */
#define SPEED_ROUTER_FLUSH_WAIT_MS 5000

/* TLS certificate and key files are read whole; a chain is a few KiB. */
#define SPEED_ROUTER_TLS_FILE_MAX ((size_t)1 << 20)

/* ---- small helpers -------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* X-Request-Id: 1..64 characters of [A-Za-z0-9._:-]; anything else is replaced. */
static bool client_id_ok(const char *s) {
    if (!s) return false;
    size_t n = 0;
    for (; s[n]; n++) {
        unsigned char c = (unsigned char)s[n];
        if (n >= SPEED_ROUTER_CLIENT_ID_MAX) return false;
        if (!(isalnum(c) || c == '.' || c == '_' || c == ':' || c == '-')) return false;
    }
    return n > 0;
}

static void respond_json(speed_http_request_t *hr, unsigned status, const char *body, size_t len) {
    speed_http_respond(hr, status, "application/json", body, len);
}

static void count_request(speed_router_t *rt, const char *route, unsigned status) {
    char s[8];
    snprintf(s, sizeof s, "%u", status);
    const char *values[] = {route, s};
    speed_counter_t *c = NULL;
    if (speed_counter_labels(rt->m_requests, values, &c) == SPEED_OK) speed_counter_inc(c);
}

void speed_router_respond_error(speed_router_t *rt, speed_http_request_t *hr, const speed_openai_error_t *err,
                                unsigned status, int retry_after_s) {
    if (!status) status = (unsigned)speed_openai_error_http_status(err->kind);
    if (retry_after_s > 0) {
        char v[16];
        snprintf(v, sizeof v, "%d", retry_after_s);
        speed_http_request_add_header(hr, "Retry-After", v);
    }
    char *body = NULL;
    size_t len = 0;
    if (speed_openai_error_json(err, &body, &len) == SPEED_OK) {
        respond_json(hr, status, body, len);
        speed_free(body);
    } else {
        const char *fb = speed_openai_error_fallback_json();
        status = 500;
        respond_json(hr, 500, fb, strlen(fb));
    }
    count_request(rt, "none", status);
}

static void respond_error(speed_router_t *rt, speed_http_request_t *hr, const speed_openai_error_t *err,
                          int retry_after_s) {
    speed_router_respond_error(rt, hr, err, 0, retry_after_s);
}

void speed_router_count_key_limited(speed_router_t *rt, const speed_router_key_t *key, const char *limit) {
    const char *values[] = {speed_router_key_name(key), limit};
    speed_counter_t *c = NULL;
    if (speed_counter_labels(rt->m_key_limited, values, &c) == SPEED_OK) speed_counter_inc(c);
}

/* ---- handlers ------------------------------------------------------------------------- */

static void on_disconnect(void *user, speed_http_stream_t *stream) {
    rtr_req_t *r = user;
    (void)stream;
    pthread_mutex_lock(&r->lock);
    r->client_gone = true;
    pthread_mutex_unlock(&r->lock);
    speed_log(SPEED_LOG_INFO, SUBSYS, r->id, "client went away; cancelling");
    speed_router_req_cancel(r, SPEED_ERR_CANCELLED);
}

static void handle_completions(void *user, speed_http_request_t *hr) {
    const api_route_t *ar = user;
    speed_router_t *rt = ar->rt;
    double t_arrival = speed_clock_mono_s();

    /* The request id, echoed on every answer to this request. */
    char client_id[SPEED_ROUTER_CLIENT_ID_MAX + 1];
    char node_id[SPEED_ROUTER_ID_MAX];
    uint64_t seq = atomic_fetch_add(&rt->id_seq, 1);
    const char *xid = speed_http_request_header(hr, "X-Request-Id");
    if (client_id_ok(xid)) {
        snprintf(client_id, sizeof client_id, "%s", xid);
        /* Clients may reuse ids; the nodes key requests by id, so make it unique. */
        snprintf(node_id, sizeof node_id, "%s.%llx", client_id, (unsigned long long)seq);
    } else {
        snprintf(client_id, sizeof client_id, "%016llx", (unsigned long long)splitmix64(rt->id_seed ^ seq));
        snprintf(node_id, sizeof node_id, "%s", client_id);
    }
    speed_http_request_add_header(hr, "X-Request-Id", client_id);

    speed_openai_error_t err;
    if (atomic_load(&rt->state) != RT_READY) {
        speed_openai_error_set(&err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, "service_unavailable",
                               "the server is shutting down");
        respond_error(rt, hr, &err, 1);
        return;
    }
    /* The gate checked the key and its rate and in-flight limits on the headers. */
    speed_router_key_t *key = speed_http_request_user(hr);
    size_t body_len = 0;
    const char *body = speed_http_request_body(hr, &body_len);
    speed_openai_request_t *req = NULL;
    if (speed_openai_request_parse(ar->api, body, body_len, &rt->parse, &req, &err) != SPEED_OK) {
        respond_error(rt, hr, &err, 0);
        return;
    }
    const char *models[] = {rt->p.model_id};
    if (speed_openai_check_model(req, models, 1, &err) != SPEED_OK) {
        speed_openai_request_destroy(req);
        respond_error(rt, hr, &err, 0);
        return;
    }

    rtr_req_t *r = speed_calloc(1, sizeof(*r));
    if (!r) {
        speed_openai_request_destroy(req);
        speed_openai_error_from_status(SPEED_ERR_NO_MEMORY, NULL, &err);
        respond_error(rt, hr, &err, 1);
        return;
    }
    r->rt = rt;
    r->req = req;
    r->key = key;
    r->api = ar->api;
    r->t_arrival = t_arrival;
    r->deadline_ms = speed_clock_mono_ms() + rt->cfg->request_timeout_ms;
    r->created_unix = speed_clock_wall_ms() / 1000;
    r->decode_node = r->prefill_node = -1;
    snprintf(r->id, sizeof r->id, "%s", node_id);
    snprintf(r->oai_id, sizeof r->oai_id, "%s%s", ar->api == SPEED_OPENAI_CHAT ? "chatcmpl-" : "cmpl-", client_id);
    pthread_mutex_init(&r->lock, NULL);
    pthread_mutex_init(&r->http_lock, NULL);

    /* Admission bound on threads: beyond max_in_flight + max_queue workers, refuse at once. */
    pthread_mutex_lock(&rt->lock);
    bool draining = atomic_load(&rt->state) != RT_READY;
    bool full = rt->n_active >= rt->max_workers;
    if (!draining && !full) {
        rt->n_workers++;
        rt->n_active++;
        r->next = rt->reqs;
        if (rt->reqs) rt->reqs->prev = r;
        rt->reqs = r;
    }
    pthread_mutex_unlock(&rt->lock);
    if (draining || full) {
        speed_router_req_free(r);
        if (draining)
            speed_openai_error_set(&err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, "service_unavailable",
                                   "the server is shutting down");
        else
            speed_openai_error_from_status(SPEED_ERR_CAPACITY, "too many requests; retry later", &err);
        respond_error(rt, hr, &err, speed_admission_retry_after(rt->adm));
        return;
    }

    speed_status_t st = speed_http_respond_stream(hr, 200, req->stream ? "text/event-stream" : "application/json",
                                                  on_disconnect, r, &r->stream);
    /* A client that stops reading is cut off once this much waits for it (its request is
     * then cancelled like a client that left), instead of buffering its whole answer. */
    if (st == SPEED_OK && req->stream)
        speed_http_stream_set_max_pending(r->stream, (size_t)rt->cfg->stream_buffer_bytes);
    pthread_attr_t attr;
    pthread_t th;
    bool spawned = false;
    if (st == SPEED_OK && pthread_attr_init(&attr) == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        spawned = pthread_create(&th, &attr, speed_router_worker_main, r) == 0;
        pthread_attr_destroy(&attr);
    }
    if (spawned) return;

    /* No worker: undo the registration and answer here. */
    speed_log(SPEED_LOG_ERROR, SUBSYS, r->id, "cannot start a request worker: %s",
              st == SPEED_OK ? strerror(errno) : speed_status_string(st));
    pthread_mutex_lock(&rt->lock);
    if (r->prev)
        r->prev->next = r->next;
    else
        rt->reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    rt->n_active--;
    if (--rt->n_workers == 0) pthread_cond_broadcast(&rt->idle_cond);
    pthread_mutex_unlock(&rt->lock);
    speed_openai_error_set(&err, SPEED_OPENAI_ERR_UNAVAILABLE, NULL, "service_unavailable",
                           "the router cannot take more requests now");
    char *json = NULL;
    size_t len = 0;
    if (r->stream) {
        if (speed_openai_error_json(&err, &json, &len) == SPEED_OK)
            speed_http_stream_respond(r->stream, 503, "application/json", json, len);
        else
            speed_http_stream_close(r->stream);
        speed_free(json);
        count_request(rt, "none", 503);
    } else {
        respond_error(rt, hr, &err, 1);
    }
    speed_router_req_free(r);
}

static void handle_models(void *user, speed_http_request_t *hr) {
    speed_router_t *rt = user;
    const char *ids[] = {rt->p.model_id};
    char *json = NULL;
    size_t len = 0;
    if (speed_openai_models_json(ids, 1, rt->created_unix, NULL, &json, &len) != SPEED_OK) {
        speed_openai_error_t err;
        speed_openai_error_from_status(SPEED_ERR_NO_MEMORY, NULL, &err);
        respond_error(rt, hr, &err, 1);
        return;
    }
    respond_json(hr, 200, json, len);
    speed_free(json);
}

static void handle_health(void *user, speed_http_request_t *hr) {
    speed_router_t *rt = user;
    int state = atomic_load(&rt->state);
    size_t n_decode = speed_router_nodes_n_up(rt->nodes, SPEED_ROUTER_POOL_DECODE);
    size_t n_prefill = speed_router_nodes_n_up(rt->nodes, SPEED_ROUTER_POOL_PREFILL);
    const char *what = state == RT_DRAINING ? "draining"
                       : state != RT_READY  ? "starting"
                       : n_decode == 0      ? "no_decode_node"
                                            : "ok";
    unsigned status = strcmp(what, "ok") == 0 ? 200 : 503;
    char body[256];
    int n = snprintf(body, sizeof body,
                     "{\"status\":\"%s\",\"decode_nodes_up\":%zu,\"prefill_nodes_up\":%zu,"
                     "\"requests_running\":%d,\"requests_waiting\":%d}",
                     what, n_decode, n_prefill, speed_admission_in_flight(rt->adm), speed_admission_waiting(rt->adm));
    respond_json(hr, status, body, (size_t)n);
}

/* ---- housekeeping: Cancel RPCs for cancelled requests, SSE pings ------------------------ */

void speed_router_enqueue_cancel(speed_router_t *rt, const cancel_job_t *jobs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        cancel_job_t *j = speed_malloc(sizeof(*j));
        if (!j) { /* the worker sends its own Cancel when it notices */
            for (size_t k = i; k < n; k++)
                speed_balance_pool_release(speed_router_nodes_pool(rt->nodes, jobs[k].pool), jobs[k].node);
            return;
        }
        *j = jobs[i];
        pthread_mutex_lock(&rt->jobs_lock);
        j->next = rt->jobs;
        rt->jobs = j;
        pthread_cond_signal(&rt->hk_cond);
        pthread_mutex_unlock(&rt->jobs_lock);
    }
}

static void ping_streams(speed_router_t *rt) {
    static const char ping[] = ": ping\n\n";
    int64_t now = speed_clock_mono_ms();
    pthread_mutex_lock(&rt->lock);
    for (rtr_req_t *r = rt->reqs; r; r = r->next) {
        if (!r->req->stream) continue;
        bool gone = false;
        pthread_mutex_lock(&r->http_lock);
        if (r->stream && r->running && now - r->last_write_ms >= SPEED_ROUTER_SSE_PING_MS) {
            speed_status_t st = speed_http_stream_write(r->stream, ping, sizeof ping - 1);
            if (st == SPEED_OK) {
                r->committed = true;
                r->last_write_ms = now;
            }
            gone = st == SPEED_ERR_CANCELLED;
        }
        pthread_mutex_unlock(&r->http_lock);
        if (gone) {
            pthread_mutex_lock(&r->lock);
            r->client_gone = true;
            pthread_mutex_unlock(&r->lock);
            speed_router_req_cancel(r, SPEED_ERR_CANCELLED);
        }
    }
    pthread_mutex_unlock(&rt->lock);
}

static void *housekeeping_main(void *arg) {
    speed_router_t *rt = arg;
    for (;;) {
        struct timespec until = speed_clock_deadline(CLOCK_MONOTONIC, 1000);
        pthread_mutex_lock(&rt->jobs_lock);
        while (!rt->hk_stop && !rt->jobs && pthread_cond_timedwait(&rt->hk_cond, &rt->jobs_lock, &until) == 0) {}
        cancel_job_t *jobs = rt->jobs;
        rt->jobs = NULL;
        bool stop = rt->hk_stop;
        pthread_mutex_unlock(&rt->jobs_lock);
        while (jobs) {
            cancel_job_t *j = jobs;
            jobs = j->next;
            speed_router_cancel_send(rt, j->pool, j->node, j->id);
            speed_balance_pool_release(speed_router_nodes_pool(rt->nodes, j->pool), j->node);
            speed_free(j);
        }
        if (stop) break;
        ping_streams(rt);
    }
    return NULL;
}

/* ---- metrics ------------------------------------------------------------------------------ */

static double gauge_running(void *user) { return speed_admission_in_flight(((speed_router_t *)user)->adm); }

static double gauge_waiting(void *user) { return speed_admission_waiting(((speed_router_t *)user)->adm); }

static speed_status_t register_metrics(speed_router_t *rt) {
    speed_metrics_t *m = rt->metrics;
    static const double itl_buckets[] = {0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
                                         0.075, 0.1,    0.15,  0.2,  0.3,   0.5,  1,    2.5};
    static const double e2e_buckets[] = {0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800};
    static const char *const route_status[] = {"route", "status"};
    static const char *const route_reason[] = {"route", "reason"};
    SPEED_CHECK(speed_histogram_register(m, "speed_router_time_to_first_token_seconds",
                                         "time from the request's arrival at the router to its first token leaving it",
                                         NULL, 0, NULL, 0, &rt->m_ttft));
    SPEED_CHECK(speed_histogram_register(m, "speed_router_inter_token_latency_seconds",
                                         "time between consecutive tokens of a request, at the router", NULL, 0,
                                         itl_buckets, sizeof itl_buckets / sizeof itl_buckets[0], &rt->m_itl));
    SPEED_CHECK(speed_histogram_register(m, "speed_router_e2e_request_latency_seconds",
                                         "time from arrival to the last token of successful requests", NULL, 0,
                                         e2e_buckets, sizeof e2e_buckets / sizeof e2e_buckets[0], &rt->m_e2e));
    SPEED_CHECK(speed_histogram_register(m, "speed_router_time_per_output_token_seconds",
                                         "per successful request of two or more tokens: time from its first to its "
                                         "last token over the tokens after the first",
                                         NULL, 0, itl_buckets, sizeof itl_buckets / sizeof itl_buckets[0],
                                         &rt->m_tpot));
    SPEED_CHECK(speed_histogram_register(m, "speed_router_queue_wait_seconds",
                                         "time admitted requests waited for an admission slot (router.max_in_flight)",
                                         NULL, 0, NULL, 0, &rt->m_queue_wait));
    SPEED_CHECK(speed_counter_register(m, "speed_router_requests_total",
                                       "completion requests by route and HTTP status (499: the client went away)",
                                       route_status, 2, &rt->m_requests));
    SPEED_CHECK(speed_counter_register(m, "speed_router_route_decisions_total", "route decisions by route and reason",
                                       route_reason, 2, &rt->m_route_decisions));
    SPEED_CHECK(speed_counter_register(m, "speed_router_prefill_retries_total",
                                       "prefill calls retried on another prefill node", NULL, 0,
                                       &rt->m_prefill_retries));
    SPEED_CHECK(speed_counter_register(m, "speed_router_decode_retries_total",
                                       "requests started over on another decode node before their first token (the "
                                       "node failed in Reserve, in the KV transfer into it, or before its stream "
                                       "sent anything)",
                                       NULL, 0, &rt->m_decode_retries));
    SPEED_CHECK(
        speed_counter_register(m, "speed_router_decode_local_total",
                               "requests routed disaggregated but sent decode-only, because the chosen decode "
                               "node's cached prefix left at most router.decode_local_max_new_tokens to compute",
                               NULL, 0, &rt->m_decode_local));
    static const char *const outcome[] = {"outcome"};
    SPEED_CHECK(speed_counter_register(m, "speed_router_migrations_total",
                                       "streams whose decode node died after their first token, by outcome: ok "
                                       "(re-issued and continued on another path), failed (ended with an error)",
                                       outcome, 1, &rt->m_migrations));
    for (size_t i = 0; i < 2; i++) { /* both series from the start, at 0 */
        const char *v[] = {i ? "failed" : "ok"};
        speed_counter_t *c = NULL;
        SPEED_CHECK(speed_counter_labels(rt->m_migrations, v, &c));
    }
    static const char *const key_limit[] = {"key", "limit"};
    SPEED_CHECK(speed_counter_register(m, "speed_router_streams_overrun_total",
                                       "streamed requests cancelled because the client stopped reading "
                                       "(router.stream_buffer_bytes)",
                                       NULL, 0, &rt->m_overrun));
    SPEED_CHECK(speed_counter_register(m, "speed_router_key_limited_total",
                                       "requests refused (429) by a per-key limit, by key name and limit", key_limit, 2,
                                       &rt->m_key_limited));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_router_requests_running", "requests holding an admission slot",
                                              gauge_running, rt, NULL));
    SPEED_CHECK(speed_gauge_register_callback(m, "speed_router_requests_waiting",
                                              "requests queued for an admission slot", gauge_waiting, rt, NULL));
    SPEED_CHECK(speed_counter_register(m, "speed_router_kv_bytes_shipped_total",
                                       "KV bytes shipped from prefill to decode nodes", NULL, 0, &rt->m_kv_bytes));
    SPEED_CHECK(speed_counter_register(m, "speed_router_prompt_tokens_total", "prompt tokens of routed requests", NULL,
                                       0, &rt->m_prompt_tokens));
    SPEED_CHECK(speed_counter_register(m, "speed_router_generated_tokens_total", "tokens relayed to clients", NULL, 0,
                                       &rt->m_generated_tokens));
    static const char *const reason[] = {"reason"};
    speed_counter_t *kv_routed;
    SPEED_CHECK(speed_counter_register(m, "speed_router_kv_routed_total",
                                       "decode node choices of KV-aware routing (router.kv_routing affinity): affinity "
                                       "(the node held a prefix of the prompt) or balance (it held none)",
                                       reason, 1, &kv_routed));
    SPEED_CHECK(speed_counter_labels(kv_routed, (const char *[]){"affinity"}, &rt->m_kv_affinity));
    SPEED_CHECK(speed_counter_labels(kv_routed, (const char *[]){"balance"}, &rt->m_kv_balance));
    static const char *const where[] = {"where"};
    speed_counter_t *kv_blocks;
    SPEED_CHECK(speed_counter_register(m, "speed_router_kv_prompt_blocks_total",
                                       "full blocks of the prompts KV-aware routing placed: cached (the chosen decode "
                                       "node's prefix index held them) or new (to prefill)",
                                       where, 1, &kv_blocks));
    SPEED_CHECK(speed_counter_labels(kv_blocks, (const char *[]){"cached"}, &rt->m_kv_blocks_cached));
    SPEED_CHECK(speed_counter_labels(kv_blocks, (const char *[]){"new"}, &rt->m_kv_blocks_new));
    return SPEED_OK;
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

/* A PEM file for MHD (which wants the text in memory). */
static speed_status_t read_pem(const char *path, char **text_p) {
    size_t len = 0;
    return speed_file_read(path, SPEED_ROUTER_TLS_FILE_MAX, SUBSYS, SPEED_FILE_READ_DEFAULT, text_p, &len);
}

static void free_pem(char *text) {
    if (!text) return;
    volatile char *w = text;
    for (size_t i = 0; w[i]; i++) w[i] = 0;
    speed_free(text);
}

static speed_balance_policy_t policy_of(int cfg_policy) {
    return cfg_policy == SPEED_POLICY_LEAST_LOADED ? SPEED_BALANCE_LEAST_LOADED : SPEED_BALANCE_ROUND_ROBIN;
}

speed_status_t speed_router_create(const speed_router_params_t *params, speed_router_t **rt_p) {
    if (!params || !rt_p || !params->cfg || !params->tok || !params->model_id || params->n_layers < 1 ||
        params->n_ctx < 2)
        return SPEED_ERR_INVALID_ARGUMENT;
    const speed_cluster_config_t *cfg = params->cfg;
    speed_router_t *rt = speed_calloc(1, sizeof(*rt));
    if (!rt) return SPEED_ERR_NO_MEMORY;
    rt->p = *params;
    rt->cfg = cfg;
    pthread_mutex_init(&rt->lock, NULL);
    pthread_mutex_init(&rt->jobs_lock, NULL);
    speed_clock_cond_init(&rt->idle_cond);
    speed_clock_cond_init(&rt->hk_cond);
    atomic_init(&rt->state, RT_STARTING);
    rt->created_unix = speed_clock_wall_ms() / 1000;
    struct timespec ts = speed_clock_now(CLOCK_REALTIME);
    rt->id_seed = splitmix64(((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 16));
    rt->max_workers = cfg->max_in_flight + cfg->max_queue;

    rt->parse = speed_openai_default_parse_params();
    rt->parse.allow_speed = cfg->allow_request_override;
    rt->parse.n_layers = params->n_layers;
    rt->parse.max_tokens_limit = params->n_ctx;
    rt->parse.vocab_size = speed_tok_vocab_size(params->tok);
    rt->route = speed_route_default_params();
    rt->route.decode_only_below = cfg->decode_only_below;
    rt->route.decode_only_fallback = true;

    char why[256];
    speed_status_t st = speed_cluster_config_depth(cfg, params->n_layers, &rt->parse.depth, why, sizeof why);
    if (st != SPEED_OK) SPEED_ERROR(SPEED_SUBSYS_CORE, "router: %s", why);
    rt->parse.json.max_elements = (uint64_t)cfg->max_json_elements;
    rt->parse.content_special_tokens = cfg->content_special_tokens;
    if (st == SPEED_OK) {
        speed_router_key_limits_t kl = {cfg->key_max_in_flight, cfg->key_max_kv_tokens, cfg->key_rate, cfg->key_burst};
        st = speed_router_keys_create(cfg->api_keys, cfg->api_keys_file, &kl, &rt->keys);
    }
    if (st == SPEED_OK) st = speed_metrics_create(&rt->metrics);
    if (st == SPEED_OK) st = register_metrics(rt);
    if (st == SPEED_OK) {
        speed_router_nodes_params_t np;
        memset(&np, 0, sizeof np);
        np.host = cfg->host;
        np.hosts[SPEED_ROUTER_POOL_PREFILL] = cfg->prefill.hosts;
        np.hosts[SPEED_ROUTER_POOL_DECODE] = cfg->decode.hosts;
        np.n_nodes[SPEED_ROUTER_POOL_PREFILL] = cfg->prefill.replicas;
        np.n_nodes[SPEED_ROUTER_POOL_DECODE] = cfg->decode.replicas;
        np.grpc_port[SPEED_ROUTER_POOL_PREFILL] = cfg->prefill.grpc_port;
        np.grpc_port[SPEED_ROUTER_POOL_DECODE] = cfg->decode.grpc_port;
        np.policy[SPEED_ROUTER_POOL_PREFILL] = policy_of(cfg->prefill_policy);
        np.policy[SPEED_ROUTER_POOL_DECODE] = policy_of(cfg->decode_policy);
        np.status_interval_ms = cfg->status_interval_ms;
        np.discovery[SPEED_ROUTER_POOL_PREFILL] = cfg->prefill.discovery;
        np.discovery[SPEED_ROUTER_POOL_DECODE] = cfg->decode.discovery;
        np.discovery_interval_ms = cfg->discovery_interval_ms;
        np.discovery_max_nodes = cfg->discovery_max_nodes;
        np.metrics = rt->metrics;
        np.tls = params->tls;
        /* KV-aware routing: the index always exists (its metrics too); it is fed only when on */
        speed_kv_index_params_t kp = {
            .max_blocks = (size_t)cfg->kv_index_max_blocks,
            .seed = speed_block_hash_seed(params->model_id, (int32_t)cfg->kv_block_tokens),
            .block_tokens = (int32_t)cfg->kv_block_tokens,
        };
        np.kv_index = &kp;
        np.kv_events = cfg->kv_routing != SPEED_KV_ROUTING_OFF;
        st = speed_router_nodes_create(&np, &rt->nodes);
    }
    if (st == SPEED_OK) {
        speed_admission_params_t ap = speed_admission_default_params();
        ap.max_in_flight = (int32_t)cfg->max_in_flight;
        ap.max_waiting = (int32_t)cfg->max_queue;
        ap.wait_timeout_ms = cfg->queue_timeout_ms;
        ap.retry_after_s = 1;
        st = speed_admission_create(&ap, &rt->adm);
    }
    char *cert = NULL, *key = NULL;
    bool tls = cfg->api_tls_cert && cfg->api_tls_cert[0];
    if (st == SPEED_OK && tls != (cfg->api_tls_key && cfg->api_tls_key[0])) {
        SPEED_ERROR(SUBSYS, "router: HTTPS needs both router.tls_cert and router.tls_key");
        st = SPEED_ERR_INVALID_ARGUMENT;
    }
    if (st == SPEED_OK && tls) st = read_pem(cfg->api_tls_cert, &cert);
    if (st == SPEED_OK && tls) st = read_pem(cfg->api_tls_key, &key);
    if (st == SPEED_OK) {
        speed_http_server_params_t hp = speed_http_server_default_params();
        hp.host = cfg->router_listen;
        hp.port = (uint16_t)cfg->router_port;
        hp.n_threads = (unsigned)cfg->router_threads;
        hp.max_body_bytes = (size_t)cfg->max_body_bytes;
        hp.max_per_ip = (unsigned)cfg->max_connections_per_ip;
        hp.idle_timeout_s = (unsigned)((cfg->header_timeout_ms + 999) / 1000);
        hp.tls_cert_pem = cert;
        hp.tls_key_pem = key;
        st = speed_http_server_create(&hp, &rt->http);
    }
    free_pem(cert);
    free_pem(key);
    if (st == SPEED_OK) st = speed_http_server_gate(rt->http, speed_router_gate, rt);
    if (st == SPEED_OK && cfg->router_metrics_port > 0) {
        speed_http_server_params_t mp = speed_http_server_default_params();
        mp.host = cfg->metrics_listen;
        mp.port = (uint16_t)cfg->router_metrics_port;
        mp.n_threads = 1;
        mp.max_connections = 64;
        mp.max_body_bytes = 4096;
        st = speed_http_server_create(&mp, &rt->http_metrics);
        if (st == SPEED_OK) st = speed_http_server_route(rt->http_metrics, "GET", "/health", handle_health, rt);
        if (st == SPEED_OK) st = speed_http_server_route_metrics(rt->http_metrics, "/metrics", rt->metrics);
    }
    /* Each router has its own route contexts. */
    api_route_t *routes = NULL;
    if (st == SPEED_OK) {
        routes = speed_calloc(2, sizeof(*routes));
        if (!routes) st = SPEED_ERR_NO_MEMORY;
    }
    if (st == SPEED_OK) {
        routes[0].rt = rt;
        routes[0].api = SPEED_OPENAI_CHAT;
        routes[1].rt = rt;
        routes[1].api = SPEED_OPENAI_COMPLETIONS;
        rt->routes = routes;
        st = speed_http_server_route(rt->http, "POST", "/v1/chat/completions", handle_completions, &routes[0]);
    }
    if (st == SPEED_OK)
        st = speed_http_server_route(rt->http, "POST", "/v1/completions", handle_completions, &routes[1]);
    if (st == SPEED_OK) st = speed_http_server_route(rt->http, "GET", "/v1/models", handle_models, rt);
    static const char *const preflight_paths[] = {"/v1/chat/completions", "/v1/completions", "/v1/models"};
    for (size_t i = 0; i < 3 && st == SPEED_OK; i++)
        st = speed_http_server_route(rt->http, "OPTIONS", preflight_paths[i], speed_router_handle_preflight, rt);
    if (st == SPEED_OK) st = speed_http_server_route(rt->http, "GET", "/health", handle_health, rt);
    if (st == SPEED_OK) st = speed_http_server_route_metrics(rt->http, "/metrics", rt->metrics);
    if (st != SPEED_OK) {
        SPEED_ERROR(SUBSYS, "router: cannot set up: %s", speed_status_string(st));
        speed_router_destroy(rt);
        return st;
    }
    *rt_p = rt;
    return SPEED_OK;
}

speed_status_t speed_router_start(speed_router_t *rt) {
    if (!rt) return SPEED_ERR_INVALID_ARGUMENT;
    SPEED_CHECK(speed_router_nodes_start(rt->nodes));
    if (pthread_create(&rt->hk_thread, NULL, housekeeping_main, rt) != 0) {
        SPEED_ERROR(SUBSYS, "router: cannot start the housekeeping thread");
        return SPEED_ERR_INTERNAL;
    }
    rt->hk_started = true;
    if (rt->http_metrics) SPEED_CHECK(speed_http_server_start(rt->http_metrics));
    SPEED_CHECK(speed_http_server_start(rt->http));
    atomic_store(&rt->state, RT_READY);
    if (speed_router_keys_count(rt->keys) == 0 && strcmp(rt->cfg->router_listen, "127.0.0.1") != 0 &&
        strcmp(rt->cfg->router_listen, "::1") != 0)
        SPEED_WARN(SUBSYS, "router: the API listens on %s without API keys: anyone who reaches it can use it",
                   rt->cfg->router_listen);
    SPEED_INFO(SUBSYS, "router: serving %s on %s%s:%u (%zu prefill, %zu decode nodes; %zu decode up)", rt->p.model_id,
               rt->cfg->api_tls_cert && rt->cfg->api_tls_cert[0] ? "https://" : "", rt->cfg->router_listen,
               (unsigned)speed_http_server_port(rt->http),
               speed_router_nodes_count(rt->nodes, SPEED_ROUTER_POOL_PREFILL),
               speed_router_nodes_count(rt->nodes, SPEED_ROUTER_POOL_DECODE),
               speed_router_nodes_n_up(rt->nodes, SPEED_ROUTER_POOL_DECODE));
    return SPEED_OK;
}

uint16_t speed_router_port(const speed_router_t *rt) { return rt && rt->http ? speed_http_server_port(rt->http) : 0; }

uint16_t speed_router_metrics_port(const speed_router_t *rt) {
    return rt && rt->http_metrics ? speed_http_server_port(rt->http_metrics) : 0;
}

void speed_router_drain(speed_router_t *rt) {
    if (!rt) return;
    pthread_mutex_lock(&rt->lock);
    int was = atomic_exchange(&rt->state, RT_DRAINING);
    int n = rt->n_workers;
    pthread_mutex_unlock(&rt->lock);
    if (rt->adm) speed_admission_close(rt->adm);
    if (was != RT_DRAINING) SPEED_INFO(SUBSYS, "router: draining (%d request(s) in flight)", n);
}

bool speed_router_wait_idle(speed_router_t *rt, int64_t timeout_ms) {
    struct timespec until = speed_clock_deadline(CLOCK_MONOTONIC, timeout_ms);
    pthread_mutex_lock(&rt->lock);
    while (rt->n_workers > 0) {
        if (timeout_ms < 0)
            pthread_cond_wait(&rt->idle_cond, &rt->lock);
        else if (timeout_ms == 0 || pthread_cond_timedwait(&rt->idle_cond, &rt->lock, &until) == ETIMEDOUT)
            break;
    }
    bool idle = rt->n_workers == 0;
    pthread_mutex_unlock(&rt->lock);
    return idle;
}

int speed_router_n_workers(speed_router_t *rt) {
    pthread_mutex_lock(&rt->lock);
    int n = rt->n_workers;
    pthread_mutex_unlock(&rt->lock);
    return n;
}

void speed_router_cancel_all(speed_router_t *rt) {
    if (!rt) return;
    pthread_mutex_lock(&rt->lock);
    for (rtr_req_t *r = rt->reqs; r; r = r->next) {
        pthread_mutex_lock(&r->lock);
        r->shutdown = true;
        pthread_mutex_unlock(&r->lock);
        speed_router_req_cancel(r, SPEED_ERR_CANCELLED);
    }
    pthread_mutex_unlock(&rt->lock);
}

bool speed_router_destroy(speed_router_t *rt) {
    if (!rt) return true;
    speed_router_drain(rt);
    if (!speed_router_wait_idle(rt, 0)) {
        speed_router_cancel_all(rt);
        if (!speed_router_wait_idle(rt, 10000)) {
            SPEED_ERROR(SUBSYS, "router: %d request worker(s) did not stop; exiting without cleanup",
                        speed_router_n_workers(rt));
            return false;
        }
    }
    /* Housekeeping last sends the Cancel RPCs still queued. */
    if (rt->hk_started) {
        pthread_mutex_lock(&rt->jobs_lock);
        rt->hk_stop = true;
        pthread_cond_signal(&rt->hk_cond);
        pthread_mutex_unlock(&rt->jobs_lock);
        pthread_join(rt->hk_thread, NULL);
    }
    while (rt->jobs) {
        cancel_job_t *j = rt->jobs;
        rt->jobs = j->next;
        if (rt->nodes) speed_balance_pool_release(speed_router_nodes_pool(rt->nodes, j->pool), j->node);
        speed_free(j);
    }
    /* A closed stream may still have bytes on their way to the client (the tail of an
     * answer, [DONE]): let MHD deliver them before the server goes, bounded. */
    if (rt->http) {
        for (int i = 0; i < SPEED_ROUTER_FLUSH_WAIT_MS / 10; i++) {
            speed_http_server_stats_t hs;
            speed_http_server_stats(rt->http, &hs);
            if (hs.streams_attached == 0) break;
            speed_clock_sleep_ms(10);
        }
    }
    /* HTTP first (no handler runs afterwards), then the node side. */
    speed_http_server_destroy(rt->http);
    speed_http_server_destroy(rt->http_metrics);
    /* Every worker has ended and every Cancel job is gone: a node still held is a request path
     * that never let go of its pick (a retired slot it names could never be reused). */
    int64_t held = speed_router_nodes_holders(rt->nodes);
    if (held != 0) SPEED_ERROR(SUBSYS, "router: %lld node picks never released", (long long)held);
    SPEED_ASSERT(held == 0);
    speed_router_nodes_destroy(rt->nodes);
    speed_admission_destroy(rt->adm);
    speed_metrics_destroy(rt->metrics);
    speed_free(rt->routes);
    speed_router_keys_destroy(rt->keys);
    pthread_cond_destroy(&rt->hk_cond);
    pthread_cond_destroy(&rt->idle_cond);
    pthread_mutex_destroy(&rt->jobs_lock);
    pthread_mutex_destroy(&rt->lock);
    speed_free(rt);
    return true;
}
