/* speedctl loadgen: one request to an OpenAI-compatible server (loadgen.h) — the body, the
 * connection, the server-sent events of a stream, and what each request measured.
 *
 * Streams are read event by event (speed_http_client_next_event skips SSE comments and pings).
 * Servers differ in what they send: speedserve and vLLM send a last chunk with "usage" when
 * stream_options.include_usage is asked; llama-server may send usage inside the last choice
 * chunk, or none; some end with "data: [DONE]", some just close. A chunk counts as a token
 * arrival when it carries generated tokens, with or without visible text (token_arrival); the
 * token count is usage.completion_tokens when the server gave it, else the number of such chunks. An error arrives as a non-200 answer, as an "error" event,
 * or as a chunk with an "error" object. */
#include "loadgen.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "clock.h"
#include "http.h"

/* ---- target ------------------------------------------------------------------------------------ */

speed_status_t speed_lg_url_parse(const char *url, speed_lg_target_t *t, char *err, size_t err_size) {
    const char *p = url;
    if (strncmp(p, "http://", 7) == 0) {
        t->tls = false;
        p += 7;
    } else if (strncmp(p, "https://", 8) == 0) {
        t->tls = true;
        p += 8;
    } else {
        snprintf(err, err_size, "--url: '%s' must start with http:// or https://", url);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const char *host = p, *host_end;
    if (*p == '[') {
        host = p + 1;
        host_end = strchr(host, ']');
        if (!host_end) {
            snprintf(err, err_size, "--url: '%s': unclosed '[' in the host", url);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        p = host_end + 1;
    } else {
        host_end = p + strcspn(p, ":/");
        p = host_end;
    }
    size_t hl = (size_t)(host_end - host);
    if (hl == 0 || hl >= sizeof t->host) {
        snprintf(err, err_size, "--url: '%s': no host", url);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    memcpy(t->host, host, hl);
    t->host[hl] = '\0';
    long port = t->tls ? 443 : 80;
    if (*p == ':') {
        char *end;
        errno = 0;
        port = strtol(p + 1, &end, 10);
        if (end == p + 1 || errno || port < 1 || port > 65535) {
            snprintf(err, err_size, "--url: '%s': the port must be 1..65535", url);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        p = end;
    }
    if (*p == '/') p++;
    if (*p) {
        snprintf(err, err_size, "--url: '%s': give only scheme, host and port (the API paths are /v1/...)", url);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    t->port = (uint16_t)port;
    return SPEED_OK;
}

/* ---- results and cancellation ------------------------------------------------------------------ */

void speed_lg_result_cleanup(speed_lg_result_t *r) {
    speed_free(r->itl_ms);
    speed_free(r->text);
    r->itl_ms = NULL;
    r->text = NULL;
    r->n_itl = 0;
}

void speed_lg_cancel_init(speed_lg_cancel_t *c) {
    pthread_mutex_init(&c->mu, NULL);
    c->fd = -1;
    c->cancelled = false;
}

void speed_lg_cancel_cleanup(speed_lg_cancel_t *c) { pthread_mutex_destroy(&c->mu); }

void speed_lg_cancel_reset(speed_lg_cancel_t *c) {
    pthread_mutex_lock(&c->mu);
    c->cancelled = false;
    c->fd = -1;
    pthread_mutex_unlock(&c->mu);
}

void speed_lg_cancel_fire(speed_lg_cancel_t *c) {
    pthread_mutex_lock(&c->mu);
    c->cancelled = true;
    /* wakes a poll() on it with POLLHUP; the request's thread closes the fd, under this lock */
    if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR);
    pthread_mutex_unlock(&c->mu);
}

static bool cancelled(speed_lg_cancel_t *c) {
    if (!c) return false;
    pthread_mutex_lock(&c->mu);
    bool x = c->cancelled;
    pthread_mutex_unlock(&c->mu);
    return x;
}

/* ---- the body ---------------------------------------------------------------------------------- */

speed_status_t speed_lg_body_make(const speed_lg_target_t *t, const char *prompt, json_t *messages, int64_t max_tokens,
                                  int32_t prefill_layers, char **body_p) {
    *body_p = NULL;
    json_t *o = json_object();
    if (!o) return SPEED_ERR_NO_MEMORY;
    int bad = json_object_set_new(o, "model", json_string(t->model ? t->model : ""));
    if (t->chat) {
        json_t *msgs = messages ? json_incref(messages) : json_array();
        if (!messages) bad |= json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content", prompt));
        bad |= json_object_set_new(o, "messages", msgs);
    } else {
        bad |= json_object_set_new(o, "prompt", json_string(prompt));
    }
    bad |= json_object_set_new(o, "max_tokens", json_integer(max_tokens));
    /* the output length is the workload's: servers that know ignore_eos (speedserve, vLLM,
     * llama-server) keep going past end-of-sequence; min_tokens is vLLM's way to the same */
    if (t->ignore_eos) {
        bad |= json_object_set_new(o, "ignore_eos", json_true());
    }
    bad |= json_object_set_new(o, "temperature", json_real(0.0));
    if (t->stream) {
        bad |= json_object_set_new(o, "stream", json_true());
        bad |= json_object_set_new(o, "stream_options", json_pack("{s:b}", "include_usage", 1));
    }
    if (prefill_layers > 0)
        bad |= json_object_set_new(o, "speed", json_pack("{s:i}", "prefill_layers", prefill_layers));
    char *s = bad ? NULL : json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s) return SPEED_ERR_NO_MEMORY;
    *body_p = s;
    return SPEED_OK;
}

/* ---- one exchange ------------------------------------------------------------------------------ */

static void fail(speed_lg_result_t *r, speed_lg_cancel_t *cancel, const char *type, const char *detail) {
    if (cancelled(cancel)) {
        r->outcome = SPEED_LG_CUT_OFF;
        snprintf(r->error, sizeof r->error, "cut_off");
        snprintf(r->detail, sizeof r->detail, "still running when the run ended");
        return;
    }
    r->outcome = SPEED_LG_ERROR;
    snprintf(r->error, sizeof r->error, "%s", type);
    snprintf(r->detail, sizeof r->detail, "%s", detail ? detail : "");
}

static const char *io_error_type(speed_status_t st) {
    switch (st) {
    case SPEED_ERR_TIMEOUT: return "timeout";
    case SPEED_ERR_PEER_PROTOCOL: return "protocol";
    case SPEED_ERR_TOO_LONG: return "too_long";
    case SPEED_ERR_NO_MEMORY: return "no_memory";
    default: return "disconnected";
    }
}

/* An OpenAI error object's message, else the body's start. */
static void error_detail(const char *body, size_t len, char *out, size_t size) {
    json_t *j = body ? json_loadb(body, len, 0, NULL) : NULL;
    const json_t *e = json_object_get(j, "error");
    const char *msg = json_is_string(e) ? json_string_value(e) : json_string_value(json_object_get(e, "message"));
    if (msg)
        snprintf(out, size, "%s", msg);
    else
        snprintf(out, size, "%.*s", (int)(len < size ? len : size - 1), body ? body : "");
    json_decref(j);
}

static void usage_take(const json_t *root, speed_lg_result_t *r) {
    const json_t *u = json_object_get(root, "usage");
    if (!json_is_object(u)) return;
    const json_t *v;
    if (json_is_integer(v = json_object_get(u, "prompt_tokens"))) r->prompt_tokens = json_integer_value(v);
    if (json_is_integer(v = json_object_get(u, "completion_tokens"))) r->output_tokens = json_integer_value(v);
    if (json_is_integer(v = json_object_get(u, "kv_bytes"))) r->kv_bytes = json_integer_value(v);
}

/* The generated text of choice 0 of a chunk (delta.content / text) or of a whole response
 * (message.content / text). */
static const char *choice_text(const json_t *root, bool chat, bool stream, size_t *len_p) {
    const json_t *c0 = json_array_get(json_object_get(root, "choices"), 0);
    const json_t *s = chat ? json_object_get(json_object_get(c0, stream ? "delta" : "message"), "content")
                           : json_object_get(c0, "text");
    *len_p = json_string_length(s);
    return json_string_value(s);
}

/* Whether a stream chunk brings generated tokens: its choice carries text, or carries an empty
 * text field that is neither the chat role announcement (a delta with "role") nor the finish
 * notice (a finish_reason with no text). Servers send a chunk per token even when the token's
 * text is still held back (a partial UTF-8 character, a special token: speedserve, vLLM), so the
 * first such chunk is the first token even before any text shows. */
static bool token_arrival(const json_t *c0, bool chat, const char *text, size_t len) {
    if (!text) return false;
    if (len > 0) return true;
    if (json_is_string(json_object_get(c0, "finish_reason"))) return false;
    return !(chat && json_object_get(json_object_get(c0, "delta"), "role"));
}

static bool text_append(speed_lg_result_t *r, size_t *cap, const char *s, size_t n) {
    size_t have = r->text ? strlen(r->text) : 0;
    if (have + n + 1 > *cap) {
        size_t c = (*cap ? *cap * 2 : 256) + n;
        char *g = speed_realloc(r->text, c);
        if (!g) return false;
        r->text = g;
        *cap = c;
    }
    memcpy(r->text + have, s, n);
    r->text[have + n] = '\0';
    return true;
}

static void stream_read(speed_http_client_t *client, const speed_lg_target_t *t, double t0, speed_lg_cancel_t *cancel,
                        bool keep_text, speed_lg_result_t *r) {
    size_t itl_cap = 0, text_cap = 0;
    double t_last = -1;
    bool done = false, finished = false;
    int64_t n_chunks = 0;
    for (;;) {
        const speed_http_sse_event_t *ev = NULL;
        speed_status_t st = speed_http_client_next_event(client, &ev);
        double now = speed_clock_mono_s() - t0;
        if (st != SPEED_OK) {
            r->t_end = now;
            fail(r, cancel, io_error_type(st), "the stream broke off");
            return;
        }
        if (cancelled(cancel)) {
            r->t_end = now;
            fail(r, cancel, "cut_off", NULL);
            return;
        }
        if (!ev) break; /* end of the body */
        if (strcmp(ev->event, "error") == 0) {
            r->t_end = now;
            char d[160];
            error_detail(ev->data, ev->data_len, d, sizeof d);
            fail(r, cancel, "stream_error", d);
            return;
        }
        if (ev->data_len == 6 && memcmp(ev->data, "[DONE]", 6) == 0) {
            /* the answer is over even if the server keeps the body open */
            done = true;
            break;
        }
        if (ev->data_len == 0) continue;
        json_t *j = json_loadb(ev->data, ev->data_len, 0, NULL);
        if (!j) {
            r->t_end = now;
            fail(r, cancel, "protocol", "a stream chunk is not JSON");
            return;
        }
        if (json_object_get(j, "error")) {
            char d[160];
            error_detail(ev->data, ev->data_len, d, sizeof d);
            json_decref(j);
            r->t_end = now;
            fail(r, cancel, "stream_error", d);
            return;
        }
        size_t tl = 0;
        const char *text = choice_text(j, t->chat, true, &tl);
        const json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
        const json_t *fr = json_object_get(c0, "finish_reason");
        if (json_is_string(fr)) finished = true;
        if (token_arrival(c0, t->chat, text, tl)) {
            if (r->t_first < 0) {
                r->t_first = now;
            } else {
                if (r->n_itl == itl_cap) {
                    size_t c = itl_cap ? itl_cap * 2 : 64;
                    float *g = speed_realloc(r->itl_ms, c * sizeof *g);
                    if (!g) {
                        json_decref(j);
                        fail(r, cancel, "no_memory", NULL);
                        return;
                    }
                    r->itl_ms = g;
                    itl_cap = c;
                }
                r->itl_ms[r->n_itl++] = (float)((now - t_last) * 1000.0);
            }
            t_last = now;
            n_chunks++;
            if (keep_text && !text_append(r, &text_cap, text, tl)) {
                json_decref(j);
                fail(r, cancel, "no_memory", NULL);
                return;
            }
        }
        usage_take(j, r);
        json_decref(j);
    }
    r->t_end = speed_clock_mono_s() - t0;
    r->n_chunks = n_chunks;
    if (!done && !finished) {
        fail(r, cancel, "truncated", "the stream ended without [DONE] or a finish_reason");
        return;
    }
    if (r->output_tokens < 0) r->output_tokens = n_chunks;
    r->outcome = SPEED_LG_OK;
}

void speed_lg_request_on(speed_http_client_t *client, const speed_lg_target_t *t, const char *body, size_t body_len,
                         double t0, speed_lg_cancel_t *cancel, bool keep_text, speed_lg_result_t *r) {
    char auth[1024];
    speed_http_header_t h[3];
    size_t nh = 0;
    h[nh++] = (speed_http_header_t){"Content-Type", "application/json"};
    if (t->stream) h[nh++] = (speed_http_header_t){"Accept", "text/event-stream"};
    if (t->api_key) {
        snprintf(auth, sizeof auth, "Bearer %s", t->api_key);
        h[nh++] = (speed_http_header_t){"Authorization", auth};
    }
    const char *path = t->chat ? "/v1/chat/completions" : "/v1/completions";
    const speed_http_response_t *resp = NULL;
    r->t_send = speed_clock_mono_s() - t0;
    speed_status_t st = t->stream ? speed_http_client_request_begin(client, "POST", path, h, nh, body, body_len, &resp)
                                  : speed_http_client_request(client, "POST", path, h, nh, body, body_len, &resp);
    memset(auth, 0, sizeof auth);
    if (st != SPEED_OK) {
        r->t_end = speed_clock_mono_s() - t0;
        fail(r, cancel, io_error_type(st), "no answer");
        return;
    }
    r->http_status = resp->status;
    if (resp->status != 200) {
        char buf[4096];
        size_t n = 0;
        const char *b = resp->body;
        size_t bl = resp->body_len;
        if (t->stream) { /* the body of a failed stream request is one JSON error */
            size_t got = 0;
            while (n + 1 < sizeof buf &&
                   speed_http_client_read(client, buf + n, sizeof buf - 1 - n, &got) == SPEED_OK && got > 0)
                n += got;
            buf[n] = '\0';
            b = buf;
            bl = n;
        }
        r->t_end = speed_clock_mono_s() - t0;
        char type[32], d[160];
        snprintf(type, sizeof type, "http_%d", resp->status);
        error_detail(b, bl, d, sizeof d);
        fail(r, cancel, type, d);
        return;
    }
    if (t->stream) {
        stream_read(client, t, t0, cancel, keep_text, r);
        return;
    }
    r->t_end = speed_clock_mono_s() - t0;
    json_t *j = json_loadb(resp->body ? resp->body : "", resp->body_len, 0, NULL);
    if (!j) {
        fail(r, cancel, "protocol", "the answer is not JSON");
        return;
    }
    size_t tl = 0;
    const char *text = choice_text(j, t->chat, false, &tl);
    usage_take(j, r);
    if (keep_text && text) {
        size_t cap = 0;
        if (!text_append(r, &cap, text, tl)) {
            json_decref(j);
            fail(r, cancel, "no_memory", NULL);
            return;
        }
    }
    json_decref(j);
    if (r->output_tokens < 0) {
        fail(r, cancel, "protocol", "the answer has no usage.completion_tokens");
        return;
    }
    r->outcome = SPEED_LG_OK;
}

/* A plain TCP connection within timeout_ms: the socket is ours, so that a cut-off can shut it
 * down from another thread. -1 with why set on failure. */
static int tcp_connect(const char *host, uint16_t port, int timeout_ms, char *why, size_t why_size) {
    char ps[8];
    snprintf(ps, sizeof ps, "%u", (unsigned)port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(host, ps, &hints, &res);
    if (gai != 0) {
        snprintf(why, why_size, "%.100s: %.100s", host, gai_strerror(gai));
        return -1;
    }
    int fd = -1;
    snprintf(why, why_size, "no address");
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            snprintf(why, why_size, "socket: %s", strerror(errno));
            continue;
        }
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            struct pollfd p = {fd, POLLOUT, 0};
            int pr;
            while ((pr = poll(&p, 1, timeout_ms)) < 0 && errno == EINTR) {}
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (pr == 0) {
                soerr = ETIMEDOUT;
            } else if (pr < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0) {
                soerr = errno;
            }
            rc = soerr ? -1 : 0;
            errno = soerr;
        }
        if (rc != 0) {
            snprintf(why, why_size, "connect to %.100s:%u: %.100s", host, (unsigned)port, strerror(errno));
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    return fd;
}

void speed_lg_request_run(const speed_lg_target_t *t, const char *body, size_t body_len, double t0,
                          speed_lg_cancel_t *cancel, bool keep_text, speed_lg_result_t *r) {
    speed_http_client_t *client = NULL;
    char why[256] = "";
    r->t_send = speed_clock_mono_s() - t0;
    if (t->tls) {
        speed_status_t st = speed_http_client_connect_tls(t->host, t->port, t->timeout_ms, t->ca_pem, NULL, &client);
        if (st != SPEED_OK) {
            r->t_end = speed_clock_mono_s() - t0;
            fail(r, cancel,
                 st == SPEED_ERR_PEER_PROTOCOL ? "tls"
                 : st == SPEED_ERR_TIMEOUT     ? "timeout"
                                               : "connect",
                 st == SPEED_ERR_PEER_PROTOCOL ? "TLS handshake or certificate check failed" : "could not connect");
            return;
        }
    } else {
        int fd = tcp_connect(t->host, t->port, t->timeout_ms, why, sizeof why);
        if (fd < 0) {
            r->t_end = speed_clock_mono_s() - t0;
            fail(r, cancel, "connect", why);
            return;
        }
        bool ok = true;
        if (cancel) {
            pthread_mutex_lock(&cancel->mu);
            ok = !cancel->cancelled;
            if (ok) cancel->fd = fd;
            pthread_mutex_unlock(&cancel->mu);
        }
        if (!ok) {
            close(fd);
            r->t_end = speed_clock_mono_s() - t0;
            fail(r, cancel, "cut_off", NULL);
            return;
        }
        char host[300];
        snprintf(host, sizeof host, strchr(t->host, ':') ? "[%s]:%u" : "%s:%u", t->host, (unsigned)t->port);
        if (speed_http_client_adopt(fd, host, t->timeout_ms, &client) != SPEED_OK) {
            if (cancel) {
                pthread_mutex_lock(&cancel->mu);
                cancel->fd = -1;
                pthread_mutex_unlock(&cancel->mu);
            }
            fail(r, cancel, "no_memory", NULL);
            return;
        }
    }
    speed_lg_request_on(client, t, body, body_len, t0, cancel, keep_text, r);
    if (cancel) {
        /* the fd must not be shut down once the client closed it (it may be reused) */
        pthread_mutex_lock(&cancel->mu);
        cancel->fd = -1;
        speed_http_client_destroy(client);
        pthread_mutex_unlock(&cancel->mu);
    } else {
        speed_http_client_destroy(client);
    }
}

speed_status_t speed_lg_model_discover(const speed_lg_target_t *t, char *out, size_t size, char *err, size_t err_size) {
    speed_http_client_t *client = NULL;
    speed_status_t st = t->tls
                            ? speed_http_client_connect_tls(t->host, t->port, t->timeout_ms, t->ca_pem, NULL, &client)
                            : speed_http_client_connect(t->host, t->port, t->timeout_ms, &client);
    if (st != SPEED_OK) {
        snprintf(err, err_size, "cannot reach %s:%u to ask /v1/models (%s); give --model NAME", t->host,
                 (unsigned)t->port, speed_status_string(st));
        return st;
    }
    char auth[1024];
    speed_http_header_t h[1];
    size_t nh = 0;
    if (t->api_key) {
        snprintf(auth, sizeof auth, "Bearer %s", t->api_key);
        h[nh++] = (speed_http_header_t){"Authorization", auth};
    }
    const speed_http_response_t *resp = NULL;
    st = speed_http_client_request(client, "GET", "/v1/models", h, nh, NULL, 0, &resp);
    memset(auth, 0, sizeof auth);
    if (st == SPEED_OK && resp->status != 200) {
        snprintf(err, err_size, "GET /v1/models answered %d; give --model NAME", resp->status);
        st = SPEED_ERR_PEER_PROTOCOL;
    } else if (st != SPEED_OK) {
        snprintf(err, err_size, "GET /v1/models failed (%s); give --model NAME", speed_status_string(st));
    } else {
        json_t *j = json_loadb(resp->body ? resp->body : "", resp->body_len, 0, NULL);
        const char *id = json_string_value(json_object_get(json_array_get(json_object_get(j, "data"), 0), "id"));
        if (id && strlen(id) < size) {
            snprintf(out, size, "%s", id);
        } else {
            snprintf(err, err_size, "GET /v1/models named no model; give --model NAME");
            st = SPEED_ERR_PEER_PROTOCOL;
        }
        json_decref(j);
    }
    speed_http_client_destroy(client);
    return st;
}
