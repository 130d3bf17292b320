/* speedctl top's model: where the endpoints are, scraping them, and turning two scrapes into a
 * frame (top.h).
 *
 * Metric names as docs/metrics.md lists them. The operator metrics (engine step time, batch
 * size, queue wait, tokens by depth, KV bytes saved, router TPOT and queue wait) are shown when
 * exported and "-" (JSON null) when not, so top also watches a cluster of an older build. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "http.h"
#include "speedctl.h"
#include "top.h"

/* ---- endpoints ------------------------------------------------------------------------------ */

static speed_status_t endpoints_alloc(speedctl_top_view_t *v, size_t n) {
    if (n > SPEEDCTL_TOP_MAX_NODES + 1) {
        speedctl_fail("top shows at most %d nodes (got %zu)", SPEEDCTL_TOP_MAX_NODES, n - (v->have_router ? 1 : 0));
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    v->endpoints = speed_calloc(n ? n : 1, sizeof *v->endpoints);
    v->cur = speed_calloc(n ? n : 1, sizeof *v->cur);
    v->prev = speed_calloc(n ? n : 1, sizeof *v->prev);
    if (!v->endpoints || !v->cur || !v->prev) return SPEED_ERR_NO_MEMORY;
    v->n_endpoints = n;
    v->timeout_ms = 800;
    v->t0_s = speed_clock_mono_s();
    return SPEED_OK;
}

/* An address that binds every interface is dialled at the cluster's host. */
static const char *dial_host(const char *listen, const char *host) {
    if (!listen || !*listen || strcmp(listen, "0.0.0.0") == 0 || strcmp(listen, "::") == 0) return host;
    return listen;
}

/* The last component of a path ("a/b/" and "a/b" give "b") into buf. */
static void basename_into(const char *path, char *buf, size_t size) {
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/') len--;
    size_t start = len;
    while (start > 0 && path[start - 1] != '/') start--;
    snprintf(buf, size, "%.*s", (int)(len - start), path + start);
}

speed_status_t speedctl_top_view_from_cluster(const speed_cluster_config_t *c, const char *file,
                                              speedctl_top_view_t *v) {
    memset(v, 0, sizeof *v);
    v->have_router = true;
    size_t n = 1 + (size_t)c->prefill.replicas + (size_t)c->decode.replicas;
    SPEED_CHECK(endpoints_alloc(v, n));
    speedctl_top_endpoint_t *r = &v->endpoints[0];
    r->role = SPEEDCTL_TOP_ROUTER;
    bool own = c->router_metrics_port > 0;
    snprintf(r->host, sizeof r->host, "%s", dial_host(own ? c->metrics_listen : c->router_listen, c->host));
    r->port = (int)(own ? c->router_metrics_port : c->router_port);
    size_t k = 1;
    for (int p = 0; p < 2; p++) {
        const speed_pool_config_t *pool = p ? &c->decode : &c->prefill;
        for (int64_t i = 0; i < pool->replicas; i++, k++) {
            speedctl_top_endpoint_t *e = &v->endpoints[k];
            e->role = p ? SPEEDCTL_TOP_DECODE : SPEEDCTL_TOP_PREFILL;
            speed_cluster_replica_host(c, pool, i, e->host, sizeof e->host);
            e->port = (int)(pool->http_port + i);
            speed_cluster_grpc_addr(c, pool, i, e->grpc_addr, sizeof e->grpc_addr);
        }
    }
    basename_into(file ? file : "cluster", v->name, sizeof v->name);
    if (c->served_model_name && *c->served_model_name)
        snprintf(v->model, sizeof v->model, "%s", c->served_model_name);
    else if (c->model && *c->model)
        basename_into(c->model, v->model, sizeof v->model);
    return SPEED_OK;
}

/* "host:port" or "[v6]:port" into e. */
static bool addr_parse(const char *s, size_t len, speedctl_top_endpoint_t *e) {
    char buf[sizeof e->host];
    if (len == 0 || len >= sizeof buf) return false;
    memcpy(buf, s, len);
    buf[len] = '\0';
    char *colon = strrchr(buf, ':');
    if (!colon || colon == buf) return false;
    *colon = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end || port < 1 || port > 65535) return false;
    char *host = buf;
    size_t hl = strlen(host);
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        host[hl - 1] = '\0';
        host++;
    }
    if (!*host || strchr(host, ' ')) return false;
    snprintf(e->host, sizeof e->host, "%s", host);
    e->port = (int)port;
    return true;
}

speed_status_t speedctl_top_view_from_list(const char *router, const char *nodes, speedctl_top_view_t *v) {
    memset(v, 0, sizeof *v);
    v->have_router = router && *router;
    size_t n = v->have_router ? 1 : 0;
    for (const char *p = nodes; p && *p; p++) n += *p == ',';
    if (nodes && *nodes) n++;
    if (n == 0) {
        speedctl_fail("top needs a cluster file, or --router HOST:PORT and/or --node HOST:PORT,...");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    SPEED_CHECK(endpoints_alloc(v, n));
    size_t k = 0;
    if (v->have_router) {
        v->endpoints[0].role = SPEEDCTL_TOP_ROUTER;
        if (!addr_parse(router, strlen(router), &v->endpoints[k++])) {
            speedctl_fail("--router: '%s' is not HOST:PORT", router);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    for (const char *p = nodes; p && *p && k < n;) {
        size_t len = strcspn(p, ",");
        const char *item = p;
        size_t ilen = len;
        while (ilen && *item == ' ') item++, ilen--;
        while (ilen && item[ilen - 1] == ' ') ilen--;
        speedctl_top_endpoint_t *e = &v->endpoints[k++];
        e->role = SPEEDCTL_TOP_NODE;
        if (!addr_parse(item, ilen, e)) {
            speedctl_fail("--node: '%.*s' is not HOST:PORT", (int)len, p);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        p += len;
        if (*p == ',') p++;
    }
    v->n_endpoints = k;
    snprintf(v->name, sizeof v->name, "%s", v->have_router ? router : "nodes");
    return SPEED_OK;
}

void speedctl_top_view_cleanup(speedctl_top_view_t *v) {
    for (size_t i = 0; v->cur && i < v->n_endpoints; i++) speed_prom_text_cleanup(&v->cur[i].doc);
    for (size_t i = 0; v->prev && i < v->n_endpoints; i++) speed_prom_text_cleanup(&v->prev[i].doc);
    speed_free(v->endpoints);
    speed_free(v->cur);
    speed_free(v->prev);
    memset(v, 0, sizeof *v);
}

/* ---- scraping ------------------------------------------------------------------------------- */

typedef struct {
    const speedctl_top_endpoint_t *e;
    speedctl_top_scrape_t *s;
    int timeout_ms;
} fetch_t;

static void fetch_one(const speedctl_top_endpoint_t *e, speedctl_top_scrape_t *s, int timeout_ms) {
    char *body = NULL;
    int status = 0;
    s->t_s = speed_clock_mono_s();
    s->err = speed_http_get(e->host, (uint16_t)e->port, "/metrics", timeout_ms, &status, &body);
    s->metrics_status = s->err == SPEED_OK ? status : 0;
    if (s->err == SPEED_OK && status == 200) {
        /* a document that does not parse is shown as an endpoint without metrics */
        if (speed_prom_text_parse(body, strlen(body), NULL, &s->doc) == SPEED_OK) s->answered = true;
    }
    speed_free(body);
    if (s->err == SPEED_OK) {
        int hs = 0;
        s->health = speed_http_get(e->host, (uint16_t)e->port, "/health", timeout_ms, &hs, NULL) == SPEED_OK ? hs : 0;
    }
}

static void *fetch_thread(void *arg) {
    fetch_t *f = arg;
    fetch_one(f->e, f->s, f->timeout_ms);
    return NULL;
}

speed_status_t speedctl_top_scrape(speedctl_top_view_t *v) {
    speedctl_top_scrape_t *old = v->prev;
    for (size_t i = 0; i < v->n_endpoints; i++) speed_prom_text_cleanup(&old[i].doc);
    v->prev = v->cur;
    v->cur = old;
    v->have_prev = v->prev[0].t_s > 0;
    memset(v->cur, 0, v->n_endpoints * sizeof *v->cur);
    fetch_t *jobs = speed_calloc(v->n_endpoints, sizeof *jobs);
    pthread_t *threads = speed_calloc(v->n_endpoints, sizeof *threads);
    bool *started = speed_calloc(v->n_endpoints, sizeof *started);
    if (!jobs || !threads || !started) {
        speed_free(jobs);
        speed_free(threads);
        speed_free(started);
        return SPEED_ERR_NO_MEMORY;
    }
    for (size_t i = 0; i < v->n_endpoints; i++) {
        jobs[i] = (fetch_t){&v->endpoints[i], &v->cur[i], v->timeout_ms};
        started[i] = pthread_create(&threads[i], NULL, fetch_thread, &jobs[i]) == 0;
        if (!started[i]) fetch_one(&v->endpoints[i], &v->cur[i], v->timeout_ms); /* no thread: do it here */
    }
    for (size_t i = 0; i < v->n_endpoints; i++)
        if (started[i]) pthread_join(threads[i], NULL);
    speed_free(jobs);
    speed_free(threads);
    speed_free(started);
    return SPEED_OK;
}

/* ---- the frame ------------------------------------------------------------------------------ */

static const speed_prom_text_t *prev_doc(const speedctl_top_view_t *v, size_t i) {
    return v->have_prev && v->prev[i].answered ? &v->prev[i].doc : NULL;
}

/* The rate of counter (name, match) between the two scrapes of endpoint i; NaN without both. */
static double counter_rate(const speedctl_top_view_t *v, size_t i, const char *name, const char *const *match) {
    const speed_prom_text_t *pd = prev_doc(v, i);
    if (!pd || !v->cur[i].answered) return NAN;
    double cur = speed_prom_text_sum(&v->cur[i].doc, name, match);
    double prev = speed_prom_text_sum(pd, name, match);
    if (isnan(prev) && !isnan(cur)) prev = 0; /* a labelled series born in the window */
    return speed_prom_rate(cur, prev, v->cur[i].t_s - v->prev[i].t_s);
}

static double nan0(double x) { return isnan(x) ? 0 : x; }

static void quantiles(const speedctl_top_view_t *v, size_t i, const char *name, speedctl_top_quantiles_t *q) {
    speed_prom_hist_t cur, prev, win;
    q->p50 = q->p90 = q->mean = NAN;
    q->present = q->window = false;
    if (!v->cur[i].answered || speed_prom_text_histogram(&v->cur[i].doc, name, NULL, &cur) != SPEED_OK) return;
    q->present = true;
    const speed_prom_text_t *pd = prev_doc(v, i);
    const speed_prom_hist_t *use = &cur;
    if (pd && speed_prom_text_histogram(pd, name, NULL, &prev) == SPEED_OK) {
        speed_prom_hist_delta(&cur, &prev, &win);
        if (speed_prom_hist_count(&win) > 0) {
            use = &win;
            q->window = true;
        }
    }
    q->p50 = speed_prom_hist_quantile(use, 0.5);
    q->p90 = speed_prom_hist_quantile(use, 0.9);
    double n = speed_prom_hist_count(use);
    q->mean = n > 0 ? use->sum / n : NAN;
}

/* p50 (or the mean) of histogram `name` of endpoint i, over the window as quantiles() takes it. */
static double window_p50(const speedctl_top_view_t *v, size_t i, const char *name, bool mean) {
    speedctl_top_quantiles_t q;
    quantiles(v, i, name, &q);
    return mean ? q.mean : q.p50;
}

/* Prompt tokens computed shallow and in all on endpoint i: over the window when it saw some,
 * else since start (added to *shallow, *all). */
static void depth_tokens(const speedctl_top_view_t *v, size_t i, double *shallow, double *all) {
    static const char *const sh[] = {"depth", "shallow", NULL};
    const char *name = "speed_engine_prompt_tokens_total";
    double s = speed_prom_text_sum(&v->cur[i].doc, name, sh), a = speed_prom_text_sum(&v->cur[i].doc, name, NULL);
    if (isnan(a)) return;
    const speed_prom_text_t *pd = prev_doc(v, i);
    if (pd) {
        double ps = nan0(speed_prom_text_sum(pd, name, sh)), pa = nan0(speed_prom_text_sum(pd, name, NULL));
        if (a > pa && s >= ps) {
            s -= ps;
            a -= pa;
        }
    }
    *shallow += nan0(s);
    *all += a;
}

/* The sum and rate of every counter sample whose name says it counts KV bytes SPEED saved. */
static void saved_bytes(const speedctl_top_view_t *v, size_t i, double *total, double *per_s) {
    const speed_prom_text_t *doc = &v->cur[i].doc;
    for (size_t s = 0; s < doc->n_samples; s++) {
        const char *n = doc->samples[s].name;
        size_t len = strlen(n);
        if (len < 6 || strcmp(n + len - 6, "_total") != 0 || !strstr(n, "bytes") || !strstr(n, "saved")) continue;
        /* each name once: add the whole series then skip its other samples */
        bool seen = false;
        for (size_t t = 0; t < s && !seen; t++) seen = strcmp(doc->samples[t].name, n) == 0;
        if (seen) continue;
        *total = nan0(*total) + speed_prom_text_sum(doc, n, NULL);
        double r = counter_rate(v, i, n, NULL);
        if (!isnan(r)) *per_s = nan0(*per_s) + r;
    }
}

static const char *down_state(const speedctl_top_scrape_t *s) {
    return s->err == SPEED_ERR_TIMEOUT ? "unreachable" : "down";
}

static void router_frame(const speedctl_top_view_t *v, speedctl_top_router_t *r) {
    const speedctl_top_scrape_t *s = &v->cur[0];
    const speedctl_top_endpoint_t *e = &v->endpoints[0];
    memset(r, 0, sizeof *r);
    snprintf(r->addr, sizeof r->addr, "%s:%d", e->host, e->port);
    double *nans[] = {&r->requests_total,  &r->requests_per_s,  &r->running,          &r->waiting,
                      &r->generated_per_s, &r->generated_total, &r->kv_shipped_per_s, &r->kv_shipped_total,
                      &r->kv_saved_per_s,  &r->kv_saved_total};
    for (size_t k = 0; k < sizeof nans / sizeof nans[0]; k++) *nans[k] = NAN;
    speedctl_top_quantiles_t none = {NAN, NAN, NAN, false, false};
    r->ttft = r->itl = r->tpot = r->e2e = r->queue_wait = none;
    if (s->err != SPEED_OK) {
        r->state = down_state(s);
        return;
    }
    r->state = !s->answered ? "unhealthy" : s->health == 200 ? "up" : "unhealthy";
    if (!s->answered) return;
    const speed_prom_text_t *doc = &s->doc;
    r->requests_total = speed_prom_text_sum(doc, "speed_router_requests_total", NULL);
    r->requests_per_s = counter_rate(v, 0, "speed_router_requests_total", NULL);
    for (size_t k = 0; k < doc->n_samples; k++) { /* errors by code, merged over routes */
        const speed_prom_sample_t *smp = &doc->samples[k];
        if (strcmp(smp->name, "speed_router_requests_total") != 0) continue;
        const char *code = speed_prom_sample_label(smp, "status");
        if (!code || atoi(code) < 400) continue;
        size_t j = 0;
        while (j < r->n_errors && strcmp(r->errors[j].code, code) != 0) j++;
        if (j == r->n_errors) {
            if (r->n_errors == SPEEDCTL_TOP_MAX_CODES) continue;
            snprintf(r->errors[j].code, sizeof r->errors[j].code, "%s", code);
            const char *match[] = {"status", code, NULL};
            r->errors[j].total = speed_prom_text_sum(doc, "speed_router_requests_total", match);
            r->errors[j].per_s = counter_rate(v, 0, "speed_router_requests_total", match);
            r->n_errors++;
        }
    }
    r->running = speed_prom_text_sum(doc, "speed_router_requests_running", NULL);
    r->waiting = speed_prom_text_sum(doc, "speed_router_requests_waiting", NULL);
    quantiles(v, 0, "speed_router_time_to_first_token_seconds", &r->ttft);
    quantiles(v, 0, "speed_router_inter_token_latency_seconds", &r->itl);
    quantiles(v, 0, "speed_router_e2e_request_latency_seconds", &r->e2e);
    quantiles(v, 0, "speed_router_time_per_output_token_seconds", &r->tpot);
    quantiles(v, 0, "speed_router_queue_wait_seconds", &r->queue_wait);
    r->generated_total = speed_prom_text_sum(doc, "speed_router_generated_tokens_total", NULL);
    r->generated_per_s = counter_rate(v, 0, "speed_router_generated_tokens_total", NULL);
    r->kv_shipped_total = speed_prom_text_sum(doc, "speed_router_kv_bytes_shipped_total", NULL);
    r->kv_shipped_per_s = counter_rate(v, 0, "speed_router_kv_bytes_shipped_total", NULL);
    saved_bytes(v, 0, &r->kv_saved_total, &r->kv_saved_per_s);
}

static void node_frame(const speedctl_top_view_t *v, size_t i, speedctl_top_node_t *n) {
    const speedctl_top_scrape_t *s = &v->cur[i];
    const speedctl_top_endpoint_t *e = &v->endpoints[i];
    memset(n, 0, sizeof *n);
    n->role = e->role;
    snprintf(n->addr, sizeof n->addr, "%s:%d", e->host, e->port);
    double *nans[] = {&n->running,          &n->waiting,      &n->reserved,       &n->kv_used_ratio,
                      &n->tokens_per_s,     &n->tokens_total, &n->requests_total, &n->xfer_failures_total,
                      &n->xfer_bytes_per_s, &n->step_p50_s,   &n->batch_mean,     &n->queue_wait_p50_s,
                      &n->tokens_in_flight};
    for (size_t k = 0; k < sizeof nans / sizeof nans[0]; k++) *nans[k] = NAN;
    n->router_up = -1;
    if (v->have_router && e->grpc_addr[0] && v->cur[0].answered) {
        const char *match[] = {"node", e->grpc_addr, NULL};
        double up = speed_prom_text_sum(&v->cur[0].doc, "speed_router_node_up", match);
        if (!isnan(up)) n->router_up = up > 0.5;
    }
    if (s->err != SPEED_OK) {
        n->state = down_state(s);
        return;
    }
    if (!s->answered) {
        n->state = "unhealthy";
        return;
    }
    const speed_prom_text_t *doc = &s->doc;
    if (n->role == SPEEDCTL_TOP_NODE) {
        if (speed_prom_text_has_prefix(doc, "speed_prefill_")) n->role = SPEEDCTL_TOP_PREFILL;
        if (speed_prom_text_has_prefix(doc, "speed_decode_")) n->role = SPEEDCTL_TOP_DECODE;
    }
    const char *role = n->role == SPEEDCTL_TOP_PREFILL ? "prefill" : n->role == SPEEDCTL_TOP_DECODE ? "decode" : "";
    char name[128];
    snprintf(name, sizeof name, "speed_%s_node_state", role);
    double state = speed_prom_text_sum(doc, name, NULL);
    n->state = s->health == 200 ? "up" : state == 2 ? "draining" : state == 0 ? "starting" : "unhealthy";
    if (s->health == 200 && state == 2) n->state = "draining";
    snprintf(name, sizeof name, "speed_%s_running_requests", role);
    n->running = speed_prom_text_sum(doc, name, NULL);
    snprintf(name, sizeof name, "speed_%s_waiting_requests", role);
    n->waiting = speed_prom_text_sum(doc, name, NULL);
    snprintf(name, sizeof name, "speed_%s_reserved_requests", role);
    n->reserved = speed_prom_text_sum(doc, name, NULL);
    n->kv_used_ratio = speed_prom_text_sum(doc, "speed_kv_cache_usage_ratio", NULL);
    /* a prefill node's work is the prompt tokens it computes; a decode node's the tokens it generates */
    snprintf(name, sizeof name,
             n->role == SPEEDCTL_TOP_PREFILL ? "speed_%s_tokens_total" : "speed_%s_generated_tokens_total", role);
    n->tokens_total = speed_prom_text_sum(doc, name, NULL);
    n->tokens_per_s = counter_rate(v, i, name, NULL);
    snprintf(name, sizeof name, "speed_%s_requests_total", role);
    n->requests_total = speed_prom_text_sum(doc, name, NULL);
    n->xfer_failures_total = nan0(speed_prom_text_sum(doc, "speed_kv_transfer_failures_total", NULL));
    n->xfer_bytes_per_s = counter_rate(v, i, "speed_kv_transfer_bytes_total", NULL);
    n->step_p50_s = window_p50(v, i, "speed_engine_step_duration_seconds", false);
    n->batch_mean = window_p50(v, i, "speed_engine_step_sequences", true);
    n->queue_wait_p50_s = window_p50(v, i, "speed_engine_queue_wait_seconds", false);
    n->tokens_in_flight = speed_prom_text_sum(doc, "speed_engine_tokens_in_flight", NULL);
}

void speedctl_top_frame(const speedctl_top_view_t *v, speedctl_top_frame_t *f) {
    memset(f, 0, sizeof *f);
    snprintf(f->name, sizeof f->name, "%s", v->name);
    snprintf(f->model, sizeof f->model, "%s", v->model);
    f->uptime_s = speed_clock_mono_s() - v->t0_s;
    size_t first = 0;
    if (v->have_router && v->n_endpoints) {
        f->have_router = true;
        router_frame(v, &f->router);
        first = 1;
        if (v->have_prev) f->window_s = v->cur[0].t_s - v->prev[0].t_s;
    } else if (v->have_prev && v->n_endpoints) {
        f->window_s = v->cur[0].t_s - v->prev[0].t_s;
    }
    for (size_t i = first; i < v->n_endpoints && f->n_nodes < SPEEDCTL_TOP_MAX_NODES; i++) {
        speedctl_top_node_t *n = &f->nodes[f->n_nodes++];
        node_frame(v, i, n);
        f->n_up += strcmp(n->state, "up") == 0;
    }
    /* SPEED savings: the router's when it exports them, else the nodes' summed */
    if (f->have_router && isnan(f->router.kv_saved_total))
        for (size_t i = first; i < v->n_endpoints; i++)
            if (v->cur[i].answered) saved_bytes(v, i, &f->router.kv_saved_total, &f->router.kv_saved_per_s);
    double shallow = 0, all = 0;
    for (size_t i = first; i < v->n_endpoints; i++)
        if (v->cur[i].answered) depth_tokens(v, i, &shallow, &all);
    f->shallow_share = all > 0 ? shallow / all : NAN;
}
