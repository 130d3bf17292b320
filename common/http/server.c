/* speed_http server: routes, bodies, simple responses and streams over libmicrohttpd.
 *
 * MHD calls the access handler several times per request: once when the headers are in
 * (we only attach a request context: answering here would cost keep-alive), once per body
 * chunk, and once more with no data when the body is complete. That last call routes and
 * runs the user's handler. A streaming answer that is not committed yet suspends the
 * connection; the writer's commit resumes it and MHD calls the handler again, which then
 * queues the response.
 *
 * Locks: server->lock guards the list of streams attached to live connections; each
 * stream's lock guards its buffer and flags. They are never nested. MHD_suspend_connection
 * and MHD_resume_connection are only called with the stream lock held, and only by whoever
 * flips stream->suspended, so each suspension is resumed exactly once and no wake-up is
 * lost. A suspended connection cannot complete (MHD neither polls nor times it out), so
 * stream->conn is valid whenever stream->suspended is set.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include <malloc.h>
#include <microhttpd.h>

#include "alloc.h"
#include "http_internal.h"
#include "log.h"

/* Request bodies at least this large are followed by malloc_trim when they are freed. */
#define SPEED_HTTP_TRIM_BYTES ((size_t)4 << 20)

/* ---- small helpers -------------------------------------------------------------------- */

bool speed_http_header_text_ok(const char *s) { return s && !strpbrk(s, "\r\n"); }

speed_status_t speed_http_header_push(header_t **list, const char *name, const char *value) {
    if (!speed_http_header_text_ok(name) || !*name || !speed_http_header_text_ok(value))
        return SPEED_ERR_INVALID_ARGUMENT;
    header_t *h = speed_calloc(1, sizeof(*h));
    if (!h) return SPEED_ERR_NO_MEMORY;
    h->name = speed_strdup(name);
    h->value = speed_strdup(value);
    if (!h->name || !h->value) {
        speed_free(h->name);
        speed_free(h->value);
        speed_free(h);
        return SPEED_ERR_NO_MEMORY;
    }
    /* append, to keep the caller's order */
    while (*list) list = &(*list)->next;
    *list = h;
    return SPEED_OK;
}

void speed_http_headers_free(header_t *h) {
    while (h) {
        header_t *next = h->next;
        speed_free(h->name);
        speed_free(h->value);
        speed_free(h);
        h = next;
    }
}

bool speed_http_headers_apply(struct MHD_Response *r, const header_t *h) {
    for (; h; h = h->next)
        if (MHD_add_response_header(r, h->name, h->value) != MHD_YES) return false;
    return true;
}

/* Appends s to a JSON string body, escaped. */
static size_t json_escape(char *out, size_t cap, const char *s) {
    size_t n = 0;
    for (; *s; s++) {
        char tmp[8];
        const char *rep = tmp;
        unsigned char c = (unsigned char)*s;
        if (c == '"')
            rep = "\\\"";
        else if (c == '\\')
            rep = "\\\\";
        else if (c == '\n')
            rep = "\\n";
        else if (c == '\r')
            rep = "\\r";
        else if (c == '\t')
            rep = "\\t";
        else if (c < 0x20)
            snprintf(tmp, sizeof(tmp), "\\u%04x", c);
        else {
            tmp[0] = (char)c;
            tmp[1] = '\0';
        }
        size_t k = strlen(rep);
        if (n + k + 1 > cap) break;
        memcpy(out + n, rep, k);
        n += k;
    }
    if (cap) out[n < cap ? n : cap - 1] = '\0';
    return n;
}

/* ---- requests ------------------------------------------------------------------------- */

const char *speed_http_request_method(const speed_http_request_t *request) { return request ? request->method : NULL; }

const char *speed_http_request_path(const speed_http_request_t *request) { return request ? request->path : NULL; }

const char *speed_http_request_header(const speed_http_request_t *request, const char *name) {
    if (!request || !name) return NULL;
    return MHD_lookup_connection_value(request->conn, MHD_HEADER_KIND, name);
}

const char *speed_http_request_query(const speed_http_request_t *request, const char *key) {
    if (!request || !key) return NULL;
    return MHD_lookup_connection_value(request->conn, MHD_GET_ARGUMENT_KIND, key);
}

const char *speed_http_request_body(const speed_http_request_t *request, size_t *len_p) {
    if (len_p) *len_p = request && request->body ? request->body_len : 0;
    return request && request->body ? request->body : "";
}

void speed_http_request_set_user(speed_http_request_t *request, void *data, speed_http_request_end_cb_t on_end) {
    if (!request) return;
    request->user_data = data;
    request->on_end = on_end;
}

void *speed_http_request_user(const speed_http_request_t *request) { return request ? request->user_data : NULL; }

speed_status_t speed_http_request_add_header(speed_http_request_t *request, const char *name, const char *value) {
    if (!request) return SPEED_ERR_INVALID_ARGUMENT;
    return speed_http_header_push(&request->headers, name, value);
}

static bool request_answered(const speed_http_request_t *r) { return r->response || r->stream; }

speed_status_t speed_http_respond(speed_http_request_t *request, unsigned status, const char *content_type,
                                  const void *body, size_t body_len) {
    if (!request || status < 100 || status > 599 || (!body && body_len) || request_answered(request) ||
        (content_type && !speed_http_header_text_ok(content_type)))
        return SPEED_ERR_INVALID_ARGUMENT;
    struct MHD_Response *r = MHD_create_response_from_buffer(body_len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return SPEED_ERR_NO_MEMORY;
    if (content_type && MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, content_type) != MHD_YES) {
        MHD_destroy_response(r);
        return SPEED_ERR_NO_MEMORY;
    }
    request->response = r;
    request->status = status;
    return SPEED_OK;
}

speed_status_t speed_http_respond_error(speed_http_request_t *request, unsigned status, const char *type,
                                        const char *message) {
    if (!type || !message) return SPEED_ERR_INVALID_ARGUMENT;
    char msg[1024], typ[128], body[1400];
    json_escape(msg, sizeof(msg), message);
    json_escape(typ, sizeof(typ), type);
    int n =
        snprintf(body, sizeof(body), "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"code\":%u}}", msg, typ, status);
    if (n < 0 || (size_t)n >= sizeof(body)) return SPEED_ERR_INVALID_ARGUMENT;
    return speed_http_respond(request, status, "application/json", body, (size_t)n);
}

speed_status_t speed_http_respond_stream(speed_http_request_t *request, unsigned status, const char *content_type,
                                         speed_http_disconnect_cb_t on_disconnect, void *user,
                                         speed_http_stream_t **stream_p) {
    if (!request || !stream_p || status < 100 || status > 599 || request_answered(request) ||
        (content_type && !speed_http_header_text_ok(content_type)))
        return SPEED_ERR_INVALID_ARGUMENT;
    speed_http_stream_t *s = speed_calloc(1, sizeof(*s));
    if (!s) return SPEED_ERR_NO_MEMORY;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    atomic_init(&s->refs, 2); /* the writer's and the connection's */
    s->status = status;
    s->on_disconnect = on_disconnect;
    s->user = user;
    s->conn = request->conn;
    s->server = request->server;
    speed_status_t st = SPEED_OK;
    if (content_type) {
        s->content_type = speed_strdup(content_type);
        if (!s->content_type) st = SPEED_ERR_NO_MEMORY;
    }
    for (header_t *h = request->headers; h && st == SPEED_OK; h = h->next)
        st = speed_http_header_push(&s->headers, h->name, h->value);
    if (st == SPEED_OK && content_type && strncasecmp(content_type, "text/event-stream", 17) == 0)
        st = speed_http_header_push(&s->headers, "Cache-Control", "no-cache");
    if (st != SPEED_OK) {
        atomic_store(&s->refs, 1);
        speed_http_stream_unref(s);
        return st;
    }
    speed_http_server_t *srv = request->server;
    pthread_mutex_lock(&srv->lock);
    s->stopping = srv->stopping;
    s->next = srv->streams;
    if (srv->streams) srv->streams->prev = s;
    srv->streams = s;
    s->attached = true;
    pthread_mutex_unlock(&srv->lock);
    atomic_fetch_add(&srv->n_streams, 1);
    atomic_fetch_add(&srv->n_streams_attached, 1);
    request->stream = s;
    *stream_p = s;
    return SPEED_OK;
}

/* ---- MHD callbacks -------------------------------------------------------------------- */

static enum MHD_Result queue_and_release(speed_http_request_t *r, unsigned status, struct MHD_Response *resp) {
    enum MHD_Result ret = MHD_NO;
    if (speed_http_headers_apply(resp, r->headers)) ret = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    r->phase = PHASE_QUEUED;
    return ret;
}

static enum MHD_Result queue_error(speed_http_request_t *r, unsigned status, const char *type, const char *message) {
    if (r->response) {
        MHD_destroy_response(r->response);
        r->response = NULL;
    }
    if (speed_http_respond_error(r, status, type, message) != SPEED_OK) return MHD_NO;
    struct MHD_Response *resp = r->response;
    r->response = NULL;
    return queue_and_release(r, status, resp);
}

/* Queues the stream's response once it is committed; until then keeps the connection
 * suspended. Called on the final handler call and again after each resume. */
static enum MHD_Result queue_stream(speed_http_request_t *r) {
    speed_http_stream_t *s = r->stream;
    pthread_mutex_lock(&s->lock);
    if (!s->committed && !s->stopping) {
        speed_http_stream_suspend_locked(s);
        pthread_mutex_unlock(&s->lock);
        return MHD_YES;
    }
    if (!s->committed) { /* stopping before anything was decided */
        pthread_mutex_unlock(&s->lock);
        return queue_error(r, 503, "server_error", "server is shutting down");
    }
    struct MHD_Response *resp;
    if (s->closed) {
        /* All of it is here: one buffer with a Content-Length (no chunking). */
        resp = MHD_create_response_from_buffer(s->len - s->head, s->buf + s->head, MHD_RESPMEM_MUST_COPY);
        s->head = s->len = 0;
    } else {
        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, speed_http_stream_reader, s,
                                                 speed_http_stream_response_free);
        if (resp) speed_http_stream_ref(s);
    }
    bool ok = resp != NULL;
    if (ok && s->content_type)
        ok = MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, s->content_type) == MHD_YES;
    if (ok) ok = speed_http_headers_apply(resp, s->headers);
    unsigned status = s->status;
    pthread_mutex_unlock(&s->lock);
    if (!ok) {
        if (resp) MHD_destroy_response(resp);
        return MHD_NO;
    }
    enum MHD_Result ret = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    r->phase = PHASE_QUEUED;
    return ret;
}

static void route_request(speed_http_request_t *r) {
    speed_http_server_t *srv = r->server;
    const route_t *match = NULL, *get = NULL;
    char allow[256] = "";
    for (size_t i = 0; i < srv->n_routes; i++) {
        const route_t *rt = &srv->routes[i];
        if (strcmp(rt->path, r->path) != 0) continue;
        if (strcmp(rt->method, r->method) == 0) match = rt;
        if (strcmp(rt->method, "GET") == 0) get = rt;
        size_t n = strlen(allow);
        snprintf(allow + n, sizeof(allow) - n, "%s%s", n ? ", " : "", rt->method);
    }
    if (!match && get && strcmp(r->method, "HEAD") == 0) match = get;
    if (!match) {
        if (allow[0]) {
            speed_http_request_add_header(r, "Allow", allow);
            speed_http_respond_error(r, 405, "invalid_request_error", "method not allowed");
        } else {
            speed_http_respond_error(r, 404, "invalid_request_error", "not found");
        }
        return;
    }
    match->handler(match->user, r);
    if (!request_answered(r)) {
        SPEED_WARN(SUBSYS, "http: handler for %s %s gave no response", r->method, r->path);
        speed_http_respond_error(r, 500, "server_error", "handler gave no response");
    }
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                 const char *version, const char *upload_data, size_t *upload_data_size,
                                 void **con_cls) {
    speed_http_server_t *srv = cls;
    speed_http_request_t *r = *con_cls;
    (void)version;
    if (!r) {
        /* First call: headers only. Answering now would make MHD close the connection. */
        r = speed_calloc(1, sizeof(*r));
        if (!r) return MHD_NO;
        r->server = srv;
        r->conn = conn;
        r->method = method;
        r->path = url;
        *con_cls = r;
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl) {
            char *end;
            errno = 0;
            unsigned long long declared = strtoull(cl, &end, 10);
            if (errno == 0 && *end == '\0' && declared > srv->params.max_body_bytes) {
                /* Not reading a body we would throw away; MHD closes the connection. */
                atomic_fetch_add(&srv->n_requests, 1);
                return queue_error(r, 413, "invalid_request_error", "request body too large");
            }
        }
        if (srv->gate && !srv->gate(srv->gate_user, r)) {
            /* Refused on its headers: answered now, the body is never read. */
            atomic_fetch_add(&srv->n_requests, 1);
            if (r->stream) { /* a gate must not stream; treat it as a refusal */
                SPEED_WARN(SUBSYS, "http: the gate answered %s %s with a stream", r->method, r->path);
                return MHD_NO;
            }
            if (!r->response) return queue_error(r, 403, "invalid_request_error", "forbidden");
            struct MHD_Response *resp = r->response;
            r->response = NULL;
            return queue_and_release(r, r->status, resp);
        }
        return MHD_YES;
    }
    if (r->phase == PHASE_QUEUED) {
        *upload_data_size = 0; /* the rest of a body after an early answer */
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (r->body_too_large) return MHD_YES;
        if (r->body_len + n > srv->params.max_body_bytes) {
            r->body_too_large = true;
            speed_free(r->body);
            r->body = NULL;
            r->body_len = r->body_cap = 0;
            return MHD_YES;
        }
        if (r->body_len + n + 1 > r->body_cap) {
            size_t cap = r->body_cap ? r->body_cap : 1024;
            while (cap < r->body_len + n + 1) cap *= 2;
            char *grown = speed_realloc(r->body, cap);
            if (!grown) return MHD_NO;
            r->body = grown;
            r->body_cap = cap;
        }
        memcpy(r->body + r->body_len, upload_data, n);
        r->body_len += n;
        r->body[r->body_len] = '\0';
        return MHD_YES;
    }
    if (r->phase == PHASE_BODY) {
        r->phase = PHASE_HANDLED;
        atomic_fetch_add(&srv->n_requests, 1);
        if (r->body_too_large) return queue_error(r, 413, "invalid_request_error", "request body too large");
        route_request(r);
        if (r->response) {
            struct MHD_Response *resp = r->response;
            r->response = NULL;
            return queue_and_release(r, r->status, resp);
        }
    }
    if (!r->stream) return MHD_NO; /* not even an error response could be made */
    return queue_stream(r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
    speed_http_server_t *srv = cls;
    speed_http_request_t *r = *con_cls;
    (void)conn;
    if (!r) return;
    *con_cls = NULL;
    speed_http_stream_t *s = r->stream;
    if (s) {
        pthread_mutex_lock(&srv->lock);
        if (s->prev)
            s->prev->next = s->next;
        else
            srv->streams = s->next;
        if (s->next) s->next->prev = s->prev;
        s->prev = s->next = NULL;
        s->attached = false;
        pthread_mutex_unlock(&srv->lock);
        atomic_fetch_sub(&srv->n_streams_attached, 1);

        pthread_mutex_lock(&s->lock);
        SPEED_ASSERT(!s->suspended);
        s->finished = true;
        s->conn = NULL;
        s->server = NULL;
        bool fire = false;
        /* A request can only complete normally once the writer has closed (the reader
         * ends the body only then), except for the 503 sent when the server stops before
         * the stream was committed: either way, not closed means not delivered. */
        (void)toe;
        if (!s->closed) {
            s->cancelled = true;
            atomic_fetch_add(&srv->n_disconnects, 1);
            if (s->on_disconnect) {
                fire = true;
                s->cb_running = true;
                s->cb_thread = pthread_self();
            }
        }
        pthread_mutex_unlock(&s->lock);
        if (fire) {
            s->on_disconnect(s->user, s);
            pthread_mutex_lock(&s->lock);
            s->cb_running = false;
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->lock);
        }
        speed_http_stream_unref(s);
    }
    if (r->on_end) r->on_end(r->user_data);
    if (r->response) MHD_destroy_response(r->response);
    speed_http_headers_free(r->headers);
    /* A large body came from fresh pages (or raised glibc's mmap threshold so that the next
     * one will not): give them back now, so one big request does not stay resident. */
    bool large = r->body_cap >= SPEED_HTTP_TRIM_BYTES;
    speed_free(r->body);
    speed_free(r);
    if (large) malloc_trim(0);
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
    speed_http_server_t *srv = cls;
    (void)conn, (void)socket_context;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) atomic_fetch_add(&srv->n_connections, 1);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    speed_http_server_t *srv = cls;
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
    /* Before start, MHD reports why it cannot listen: that matters. Afterwards it mostly
     * reports clients that went away. */
    speed_log(atomic_load(&srv->started) ? SPEED_LOG_DEBUG : SPEED_LOG_WARN, SUBSYS, NULL, "mhd: %s", line);
}

/* ---- the /metrics helper -------------------------------------------------------------- */

static void metrics_handler(void *user, speed_http_request_t *request) {
    char *text = NULL;
    size_t len = 0;
    if (speed_metrics_render(user, &text, &len) != SPEED_OK) {
        speed_http_respond_error(request, 500, "server_error", "cannot render metrics");
        return;
    }
    speed_http_respond(request, 200, "text/plain; version=0.0.4", text, len);
    speed_free(text);
}

/* ---- server lifecycle ----------------------------------------------------------------- */

speed_http_server_params_t speed_http_server_default_params(void) {
    return (speed_http_server_params_t){
        .host = "127.0.0.1",
        .port = 0,
        .n_threads = 2,
        .max_connections = 1024,
        .idle_timeout_s = 60,
        .max_body_bytes = 1u << 20,
        .max_per_ip = 0,
        .tls_cert_pem = NULL,
        .tls_key_pem = NULL,
    };
}

/* The key is wiped before it is freed: it should not linger in freed heap pages. */
static void speed_http_server_free_tls(speed_http_server_t *srv) {
    if (srv->tls_key) {
        volatile char *k = srv->tls_key;
        for (size_t i = 0; k[i]; i++) k[i] = 0;
    }
    speed_free(srv->tls_key);
    speed_free(srv->tls_cert);
    srv->tls_key = srv->tls_cert = NULL;
}

speed_status_t speed_http_server_create(const speed_http_server_params_t *params, speed_http_server_t **server_p) {
    if (!params || !server_p || params->n_threads == 0 || params->max_body_bytes == 0 || params->max_connections == 0)
        return SPEED_ERR_INVALID_ARGUMENT;
    const char *host = params->host ? params->host : "127.0.0.1";
    unsigned char probe[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, host, probe) != 1 && inet_pton(AF_INET6, host, probe) != 1) {
        SPEED_ERROR(SUBSYS, "http: \"%s\" is not a numeric IPv4 or IPv6 address", host);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_http_server_t *srv = speed_calloc(1, sizeof(*srv));
    if (!srv) return SPEED_ERR_NO_MEMORY;
    srv->host = speed_strdup(host);
    if (!srv->host) {
        speed_free(srv);
        return SPEED_ERR_NO_MEMORY;
    }
    if ((params->tls_cert_pem == NULL) != (params->tls_key_pem == NULL)) {
        SPEED_ERROR(SUBSYS, "http: TLS needs both a certificate and its key");
        speed_free(srv->host);
        speed_free(srv);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (params->tls_cert_pem) {
        srv->tls_cert = speed_strdup(params->tls_cert_pem);
        srv->tls_key = speed_strdup(params->tls_key_pem);
        if (!srv->tls_cert || !srv->tls_key) {
            speed_http_server_free_tls(srv);
            speed_free(srv->host);
            speed_free(srv);
            return SPEED_ERR_NO_MEMORY;
        }
    }
    srv->params = *params;
    srv->params.host = srv->host;
    srv->params.tls_cert_pem = srv->tls_cert;
    srv->params.tls_key_pem = srv->tls_key;
    pthread_mutex_init(&srv->lock, NULL);
    *server_p = srv;
    return SPEED_OK;
}

speed_status_t speed_http_server_route(speed_http_server_t *server, const char *method, const char *path,
                                       speed_http_handler_cb_t handler, void *user) {
    if (!server || !method || !*method || !path || path[0] != '/' || !handler || server->daemon)
        return SPEED_ERR_INVALID_ARGUMENT;
    for (size_t i = 0; i < server->n_routes; i++) {
        if (strcmp(server->routes[i].method, method) == 0 && strcmp(server->routes[i].path, path) == 0)
            return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (server->n_routes == server->cap_routes) {
        size_t cap = server->cap_routes ? 2 * server->cap_routes : 8;
        route_t *grown = speed_realloc(server->routes, cap * sizeof(*grown));
        if (!grown) return SPEED_ERR_NO_MEMORY;
        server->routes = grown;
        server->cap_routes = cap;
    }
    route_t *rt = &server->routes[server->n_routes];
    rt->method = speed_strdup(method);
    rt->path = speed_strdup(path);
    if (!rt->method || !rt->path) {
        speed_free(rt->method);
        speed_free(rt->path);
        return SPEED_ERR_NO_MEMORY;
    }
    rt->handler = handler;
    rt->user = user;
    server->n_routes++;
    return SPEED_OK;
}

speed_status_t speed_http_server_gate(speed_http_server_t *server, speed_http_gate_cb_t gate, void *user) {
    if (!server || server->daemon) return SPEED_ERR_INVALID_ARGUMENT;
    server->gate = gate;
    server->gate_user = user;
    return SPEED_OK;
}

speed_status_t speed_http_server_route_metrics(speed_http_server_t *server, const char *path,
                                               speed_metrics_t *metrics) {
    if (!metrics) return SPEED_ERR_INVALID_ARGUMENT;
    return speed_http_server_route(server, "GET", path, metrics_handler, metrics);
}

speed_status_t speed_http_server_start(speed_http_server_t *server) {
    if (!server || server->daemon) return SPEED_ERR_INVALID_ARGUMENT;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
    struct sockaddr *addr;
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    memset(&v4, 0, sizeof(v4));
    memset(&v6, 0, sizeof(v6));
    if (inet_pton(AF_INET, server->host, &v4.sin_addr) == 1) {
        v4.sin_family = AF_INET;
        v4.sin_port = htons(server->params.port);
        addr = (struct sockaddr *)&v4;
    } else {
        inet_pton(AF_INET6, server->host, &v6.sin6_addr);
        v6.sin6_family = AF_INET6;
        v6.sin6_port = htons(server->params.port);
        addr = (struct sockaddr *)&v6;
        flags |= MHD_USE_IPv6;
    }
    /* The logger goes first so that MHD routes every message through it. */
    struct MHD_OptionItem opts[14];
    size_t n = 0;
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)on_mhd_log, server};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_SOCK_ADDR, 0, addr};
    if (server->params.n_threads > 1)
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_THREAD_POOL_SIZE, (intptr_t)server->params.n_threads, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT, (intptr_t)server->params.max_connections, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT, (intptr_t)server->params.idle_timeout_s, NULL};
    if (server->params.max_per_ip)
        opts[n++] =
            (struct MHD_OptionItem){MHD_OPTION_PER_IP_CONNECTION_LIMIT, (intptr_t)server->params.max_per_ip, NULL};
    if (server->tls_cert) {
        flags |= MHD_USE_TLS;
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, server->tls_key};
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, server->tls_cert};
    }
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, server};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, server};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    server->daemon = MHD_start_daemon(flags, server->params.port, NULL, NULL, on_access, server, MHD_OPTION_ARRAY, opts,
                                      MHD_OPTION_END);
    if (!server->daemon) {
        SPEED_ERROR(SUBSYS, "http: cannot listen on %s:%u%s", server->host, (unsigned)server->params.port,
                    server->tls_cert ? " with TLS (is the certificate/key pair valid PEM?)" : "");
        return SPEED_ERR_IO;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(server->daemon, MHD_DAEMON_INFO_BIND_PORT);
    server->port = info ? info->port : server->params.port;
    atomic_store(&server->started, true);
    SPEED_DEBUG(SUBSYS, "http: listening on %s:%u (%u threads)", server->host, (unsigned)server->port,
                server->params.n_threads);
    return SPEED_OK;
}

uint16_t speed_http_server_port(const speed_http_server_t *server) {
    return server && server->daemon ? server->port : 0;
}

void speed_http_server_stats(const speed_http_server_t *server, speed_http_server_stats_t *stats_p) {
    if (!server || !stats_p) return;
    speed_http_server_t *s = (speed_http_server_t *)server;
    stats_p->connections_opened = atomic_load(&s->n_connections);
    stats_p->requests = atomic_load(&s->n_requests);
    stats_p->streams_opened = atomic_load(&s->n_streams);
    stats_p->disconnects = atomic_load(&s->n_disconnects);
    stats_p->streams_attached = atomic_load(&s->n_streams_attached);
    stats_p->streams_suspended = atomic_load(&s->n_streams_suspended);
}

/* MHD must not be stopped with suspended connections: flag every attached stream so that
 * nothing suspends again, and resume those that are suspended. */
static void server_stop_streams(speed_http_server_t *srv) {
    speed_http_stream_t **held = NULL;
    size_t n = 0;
    pthread_mutex_lock(&srv->lock);
    srv->stopping = true;
    for (speed_http_stream_t *s = srv->streams; s; s = s->next) n++;
    if (n) held = speed_calloc(n, sizeof(*held));
    size_t k = 0;
    for (speed_http_stream_t *s = srv->streams; s; s = s->next) {
        if (held) {
            speed_http_stream_ref(s);
            held[k++] = s;
        } else {
            /* No memory for the list: do it under the server lock (MHD_resume_connection
             * takes only MHD's own locks, never ours). */
            pthread_mutex_lock(&s->lock);
            s->stopping = true;
            speed_http_stream_wake_locked(s);
            pthread_mutex_unlock(&s->lock);
        }
    }
    pthread_mutex_unlock(&srv->lock);
    for (size_t i = 0; i < k; i++) {
        speed_http_stream_t *s = held[i];
        pthread_mutex_lock(&s->lock);
        s->stopping = true;
        speed_http_stream_wake_locked(s);
        pthread_mutex_unlock(&s->lock);
        speed_http_stream_unref(s);
    }
    speed_free(held);
}

void speed_http_server_destroy(speed_http_server_t *server) {
    if (!server) return;
    if (server->daemon) {
        server_stop_streams(server);
        MHD_stop_daemon(server->daemon);
        server->daemon = NULL;
    }
    SPEED_ASSERT(server->streams == NULL);
    for (size_t i = 0; i < server->n_routes; i++) {
        speed_free(server->routes[i].method);
        speed_free(server->routes[i].path);
    }
    speed_free(server->routes);
    speed_http_server_free_tls(server);
    speed_free(server->host);
    pthread_mutex_destroy(&server->lock);
    speed_free(server);
}
