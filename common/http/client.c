/* speed_http client: blocking HTTP/1.1 over one non-blocking TCP socket with poll() timeouts.
 * Understands Content-Length, chunked and read-until-close bodies, and server-sent events. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "http_tls.h"
#include "http.h"
#include "log.h"

#define SUBSYS          SPEED_SUBSYS_NET
#define MAX_HEAD_BYTES  (64 * 1024)  /* status line + headers */
#define MAX_BODY_BYTES  (256u << 20) /* whole bodies read by speed_http_client_request */
#define MAX_EVENT_BYTES (16u << 20)  /* one SSE event */
#define RBUF_INITIAL    16384        /* the receive buffer exists from creation on: never NULL */

typedef enum { BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE } body_mode_t;

struct speed_http_client {
    int fd;
    speed_http_tls_t *tls; /* HTTPS: every byte goes through it; NULL for plain HTTP */
    int timeout_ms;
    char *host_header;
    bool broken; /* no further requests possible */

    char *rbuf; /* received, not consumed: rbuf[rpos, rlen) */
    size_t rpos, rlen, rcap;

    speed_http_response_t resp;
    speed_http_header_t *hdrs;
    size_t cap_hdrs;
    char *head; /* the response head; hdrs point into it */

    body_mode_t mode;
    uint64_t remaining; /* LENGTH: bytes left; CHUNKED: left in this chunk */
    bool chunk_started; /* CHUNKED: a chunk has been read (CRLF due before the next) */
    bool body_done;
    bool in_body; /* a response whose body is not fully consumed */

    char *body; /* whole body for speed_http_client_request */
    size_t body_len, body_cap;

    char *ev_raw; /* decoded body bytes not yet parsed as SSE lines */
    size_t ev_pos, ev_len, ev_cap;
    char *ev_data; /* the event being assembled */
    size_t ev_data_len, ev_data_cap;
    char ev_name[128];
    speed_http_sse_event_t event;
};

/* ---- socket I/O ----------------------------------------------------------------------- */

static speed_status_t wait_fd(speed_http_client_t *c, short events) {
    struct pollfd p = {.fd = c->fd, .events = events};
    for (;;) {
        int n = poll(&p, 1, c->timeout_ms);
        if (n > 0) return SPEED_OK;
        if (n == 0) return SPEED_ERR_TIMEOUT;
        if (errno != EINTR) return SPEED_ERR_PEER_UNREACHABLE;
    }
}

static ssize_t io_send(speed_http_client_t *c, const char *data, size_t len) {
    return c->tls ? speed_http_tls_send(c->tls, data, len) : send(c->fd, data, len, MSG_NOSIGNAL);
}

static ssize_t io_recv(speed_http_client_t *c, char *buf, size_t cap) {
    return c->tls ? speed_http_tls_recv(c->tls, buf, cap) : recv(c->fd, buf, cap, 0);
}

/* After EAGAIN: TLS may need to read while writing (and the reverse). */
static short io_wait_events(const speed_http_client_t *c, short plain) {
    if (!c->tls) return plain;
    return speed_http_tls_wants_write(c->tls) ? POLLOUT : POLLIN;
}

static speed_status_t send_all(speed_http_client_t *c, const char *data, size_t len) {
    while (len) {
        ssize_t n = io_send(c, data, len);
        if (n > 0) {
            data += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            SPEED_CHECK(wait_fd(c, io_wait_events(c, POLLOUT)));
            continue;
        }
        return SPEED_ERR_PEER_UNREACHABLE;
    }
    return SPEED_OK;
}

/* Receives more bytes into rbuf. *eof_p is set when the peer closed cleanly. */
static speed_status_t fill(speed_http_client_t *c, bool *eof_p) {
    *eof_p = false;
    if (c->rpos == c->rlen) c->rpos = c->rlen = 0;
    if (c->rpos > 0 && c->rlen == c->rcap) {
        memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
        c->rlen -= c->rpos;
        c->rpos = 0;
    }
    if (c->rlen == c->rcap) {
        size_t cap = 2 * c->rcap;
        char *grown = speed_realloc(c->rbuf, cap);
        if (!grown) return SPEED_ERR_NO_MEMORY;
        c->rbuf = grown;
        c->rcap = cap;
    }
    for (;;) {
        ssize_t n = io_recv(c, c->rbuf + c->rlen, c->rcap - c->rlen);
        if (n > 0) {
            c->rlen += (size_t)n;
            return SPEED_OK;
        }
        if (n == 0) {
            *eof_p = true;
            return SPEED_OK;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            SPEED_CHECK(wait_fd(c, io_wait_events(c, POLLIN)));
            continue;
        }
        return SPEED_ERR_PEER_UNREACHABLE;
    }
}

/* Returns the next line (without CR LF) in a NUL-terminated copy in `out`. */
static speed_status_t read_line(speed_http_client_t *c, char *out, size_t cap) {
    for (;;) {
        char *nl = memchr(c->rbuf + c->rpos, '\n', c->rlen - c->rpos);
        if (nl) {
            size_t n = (size_t)(nl - (c->rbuf + c->rpos));
            size_t k = n && nl[-1] == '\r' ? n - 1 : n;
            if (k >= cap) return SPEED_ERR_TOO_LONG;
            memcpy(out, c->rbuf + c->rpos, k);
            out[k] = '\0';
            c->rpos += n + 1;
            return SPEED_OK;
        }
        if (c->rlen - c->rpos >= cap) return SPEED_ERR_TOO_LONG;
        bool eof;
        SPEED_CHECK(fill(c, &eof));
        if (eof) return SPEED_ERR_PEER_UNREACHABLE;
    }
}

/* ---- connect / destroy ---------------------------------------------------------------- */

static speed_status_t tls_wait(void *user, bool want_write) { return wait_fd(user, want_write ? POLLOUT : POLLIN); }

speed_status_t speed_http_client_connect_tls(const char *host, uint16_t port, int timeout_ms, const char *ca_pem,
                                             const char *server_name, speed_http_client_t **client_p) {
    speed_http_client_t *c = NULL;
    SPEED_CHECK(speed_http_client_connect(host, port, timeout_ms, &c));
    speed_status_t st = speed_http_tls_open(c->fd, ca_pem, server_name ? server_name : host, tls_wait, c, &c->tls);
    if (st != SPEED_OK) {
        speed_http_client_destroy(c);
        return st;
    }
    *client_p = c;
    return SPEED_OK;
}

speed_status_t speed_http_client_connect(const char *host, uint16_t port, int timeout_ms,
                                         speed_http_client_t **client_p) {
    if (!host || !*host || !client_p || port == 0) return SPEED_ERR_INVALID_ARGUMENT;
    speed_http_client_t *c = speed_calloc(1, sizeof(*c));
    if (!c) return SPEED_ERR_NO_MEMORY;
    c->fd = -1;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 30000;
    size_t hl = strlen(host) + 16;
    c->host_header = speed_malloc(hl);
    c->rbuf = speed_malloc(RBUF_INITIAL);
    if (!c->host_header || !c->rbuf) {
        speed_free(c->host_header);
        speed_free(c->rbuf);
        speed_free(c);
        return SPEED_ERR_NO_MEMORY;
    }
    c->rcap = RBUF_INITIAL;
    if (strchr(host, ':'))
        snprintf(c->host_header, hl, "[%s]:%u", host, (unsigned)port);
    else
        snprintf(c->host_header, hl, "%s:%u", host, (unsigned)port);

    char service[8];
    snprintf(service, sizeof(service), "%u", (unsigned)port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *list = NULL;
    speed_status_t st = SPEED_ERR_PEER_UNREACHABLE;
    if (getaddrinfo(host, service, &hints, &list) != 0) {
        SPEED_DEBUG(SUBSYS, "http client: cannot resolve %s", host);
        speed_http_client_destroy(c);
        return SPEED_ERR_PEER_UNREACHABLE;
    }
    for (struct addrinfo *ai = list; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        c->fd = fd;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            st = SPEED_OK;
        } else if (errno == EINPROGRESS) {
            st = wait_fd(c, POLLOUT);
            int err = 0;
            socklen_t len = sizeof(err);
            if (st == SPEED_OK && (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err))
                st = SPEED_ERR_PEER_UNREACHABLE;
        } else {
            st = SPEED_ERR_PEER_UNREACHABLE;
        }
        if (st == SPEED_OK) break;
        close(fd);
        c->fd = -1;
    }
    freeaddrinfo(list);
    if (st != SPEED_OK) {
        SPEED_DEBUG(SUBSYS, "http client: cannot connect to %s", c->host_header);
        speed_http_client_destroy(c);
        return st;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    *client_p = c;
    return SPEED_OK;
}

speed_status_t speed_http_client_adopt(int fd, const char *host, int timeout_ms, speed_http_client_t **client_p) {
    if (fd < 0 || !host || !*host || !client_p) {
        if (fd >= 0) close(fd);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) { /* the waits poll() */
        SPEED_DEBUG(SUBSYS, "http client: fcntl on an adopted socket: %s", strerror(errno));
        close(fd);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_http_client_t *c = speed_calloc(1, sizeof(*c));
    if (c) {
        c->host_header = speed_strdup(host);
        c->rbuf = speed_malloc(RBUF_INITIAL);
    }
    if (!c || !c->host_header || !c->rbuf) {
        if (c) speed_free(c->host_header), speed_free(c->rbuf);
        speed_free(c);
        close(fd);
        return SPEED_ERR_NO_MEMORY;
    }
    c->rcap = RBUF_INITIAL;
    c->fd = fd;
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : 30000;
    *client_p = c;
    return SPEED_OK;
}

void speed_http_client_destroy(speed_http_client_t *client) {
    if (!client) return;
    speed_http_tls_close(client->tls);
    if (client->fd >= 0) close(client->fd);
    speed_free(client->host_header);
    speed_free(client->rbuf);
    speed_free(client->hdrs);
    speed_free(client->head);
    speed_free(client->body);
    speed_free(client->ev_raw);
    speed_free(client->ev_data);
    speed_free(client);
}

static void client_break(speed_http_client_t *c) {
    c->broken = true;
    c->in_body = false;
    speed_http_tls_close(c->tls);
    c->tls = NULL;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

/* ---- response head -------------------------------------------------------------------- */

const char *speed_http_response_header(const speed_http_response_t *response, const char *name) {
    if (!response || !name) return NULL;
    for (size_t i = 0; i < response->n_headers; i++)
        if (strcasecmp(response->headers[i].name, name) == 0) return response->headers[i].value;
    return NULL;
}

static bool header_has_token(const char *value, const char *token) {
    size_t n = strlen(token);
    for (const char *p = value; p && *p;) {
        while (*p == ' ' || *p == '\t' || *p == ',') p++;
        if (strncasecmp(p, token, n) == 0 && (p[n] == '\0' || p[n] == ',' || p[n] == ' ')) return true;
        p = strchr(p, ',');
    }
    return false;
}

/* Reads the status line and headers (skipping 1xx responses) and sets up the body. */
static speed_status_t read_head(speed_http_client_t *c, bool head_request) {
    for (;;) {
        /* find the blank line that ends the head */
        size_t end = 0;
        for (;;) {
            const char *base = c->rbuf + c->rpos;
            size_t avail = c->rlen - c->rpos;
            for (size_t i = 0; i + 1 < avail; i++) {
                if (base[i] == '\n' &&
                    (base[i + 1] == '\n' || (i + 2 < avail && base[i + 1] == '\r' && base[i + 2] == '\n'))) {
                    end = i + (base[i + 1] == '\n' ? 2 : 3);
                    break;
                }
            }
            if (end) break;
            if (avail > MAX_HEAD_BYTES) return SPEED_ERR_TOO_LONG;
            bool eof;
            SPEED_CHECK(fill(c, &eof));
            if (eof) return SPEED_ERR_PEER_UNREACHABLE;
        }
        speed_free(c->head);
        c->head = speed_malloc(end + 1);
        if (!c->head) return SPEED_ERR_NO_MEMORY;
        memcpy(c->head, c->rbuf + c->rpos, end);
        c->head[end] = '\0';
        c->rpos += end;
        /* the head is parsed as C strings below: a NUL inside would hide the line ends after it */
        if (memchr(c->head, '\0', end)) return SPEED_ERR_PEER_PROTOCOL;

        /* status line */
        char *line = c->head, *next = strchr(line, '\n');
        *next = '\0';
        int major = 0, minor = 0, status = 0, used = 0;
        if (sscanf(line, "HTTP/%d.%d %3d%n", &major, &minor, &status, &used) != 3 || major != 1 || status < 100 ||
            status > 599)
            return SPEED_ERR_PEER_PROTOCOL;
        /* headers */
        size_t n = 0;
        for (line = next + 1; *line && *line != '\r' && *line != '\n'; line = next + 1) {
            next = strchr(line, '\n');
            if (!next) return SPEED_ERR_PEER_PROTOCOL;
            *next = '\0';
            if (next > line && next[-1] == '\r') next[-1] = '\0';
            char *colon = strchr(line, ':');
            if (!colon || colon == line) return SPEED_ERR_PEER_PROTOCOL;
            *colon = '\0';
            char *value = colon + 1;
            while (*value == ' ' || *value == '\t') value++;
            size_t vl = strlen(value);
            while (vl && (value[vl - 1] == ' ' || value[vl - 1] == '\t')) value[--vl] = '\0';
            if (n == c->cap_hdrs) {
                size_t cap = c->cap_hdrs ? 2 * c->cap_hdrs : 16;
                speed_http_header_t *grown = speed_realloc(c->hdrs, cap * sizeof(*grown));
                if (!grown) return SPEED_ERR_NO_MEMORY;
                c->hdrs = grown;
                c->cap_hdrs = cap;
            }
            c->hdrs[n].name = line;
            c->hdrs[n].value = value;
            n++;
        }
        if (status < 200) continue; /* 100 Continue and friends: the real answer follows */

        c->resp = (speed_http_response_t){.status = status, .headers = c->hdrs, .n_headers = n};
        const char *conn = speed_http_response_header(&c->resp, "Connection");
        c->resp.keep_alive =
            minor >= 1 ? !(conn && header_has_token(conn, "close")) : (conn && header_has_token(conn, "keep-alive"));
        const char *te = speed_http_response_header(&c->resp, "Transfer-Encoding");
        const char *cl = speed_http_response_header(&c->resp, "Content-Length");
        c->remaining = 0;
        c->chunk_started = false;
        c->body_done = false;
        if (head_request || status == 204 || status == 304) {
            c->mode = BODY_NONE;
        } else if (te && header_has_token(te, "chunked")) {
            c->mode = BODY_CHUNKED;
        } else if (cl) {
            char *e;
            errno = 0;
            unsigned long long v = strtoull(cl, &e, 10);
            if (errno || *e || *cl == '-') return SPEED_ERR_PEER_PROTOCOL;
            c->mode = BODY_LENGTH;
            c->remaining = v;
        } else {
            c->mode = BODY_CLOSE;
            c->resp.keep_alive = false;
        }
        if (c->mode == BODY_NONE || (c->mode == BODY_LENGTH && c->remaining == 0)) c->body_done = true;
        c->in_body = true;
        c->ev_pos = c->ev_len = 0;
        c->ev_data_len = 0;
        c->ev_name[0] = '\0';
        c->event.data = NULL;
        return SPEED_OK;
    }
}

/* ---- body ----------------------------------------------------------------------------- */

static void body_finished(speed_http_client_t *c) {
    c->body_done = true;
    c->in_body = false;
    if (!c->resp.keep_alive) client_break(c);
}

/* Up to cap decoded body bytes; *n_p = 0 only at the end of the body. */
static speed_status_t body_read(speed_http_client_t *c, char *out, size_t cap, size_t *n_p) {
    *n_p = 0;
    while (!c->body_done) {
        if (c->mode == BODY_CHUNKED && c->remaining == 0) {
            char line[128];
            if (c->chunk_started) {
                SPEED_CHECK(read_line(c, line, sizeof(line)));
                if (line[0]) return SPEED_ERR_PEER_PROTOCOL;
            }
            SPEED_CHECK(read_line(c, line, sizeof(line)));
            char *e;
            errno = 0;
            unsigned long long size = strtoull(line, &e, 16);
            if (e == line || errno || (*e && *e != ';' && *e != ' ')) return SPEED_ERR_PEER_PROTOCOL;
            c->chunk_started = true;
            if (size == 0) {
                do { /* trailers, up to the blank line */
                    SPEED_CHECK(read_line(c, line, sizeof(line)));
                } while (line[0]);
                body_finished(c);
                return SPEED_OK;
            }
            c->remaining = size;
        }
        size_t avail = c->rlen - c->rpos;
        if (avail == 0) {
            bool eof;
            SPEED_CHECK(fill(c, &eof));
            if (eof) {
                if (c->mode != BODY_CLOSE) return SPEED_ERR_PEER_UNREACHABLE;
                body_finished(c);
                return SPEED_OK;
            }
            continue;
        }
        size_t k = avail < cap ? avail : cap;
        if (c->mode != BODY_CLOSE && k > c->remaining) k = (size_t)c->remaining;
        memcpy(out, c->rbuf + c->rpos, k);
        c->rpos += k;
        if (c->mode != BODY_CLOSE) c->remaining -= k;
        *n_p = k;
        if (c->mode == BODY_LENGTH && c->remaining == 0) body_finished(c);
        return SPEED_OK;
    }
    return SPEED_OK;
}

speed_status_t speed_http_client_read(speed_http_client_t *client, void *buf, size_t cap, size_t *n_p) {
    if (!client || !buf || !cap || !n_p) return SPEED_ERR_INVALID_ARGUMENT;
    *n_p = 0;
    if (!client->in_body) return SPEED_OK;
    speed_status_t st = body_read(client, buf, cap, n_p);
    if (st != SPEED_OK) client_break(client);
    return st;
}

/* ---- requests ------------------------------------------------------------------------- */

static speed_status_t send_request(speed_http_client_t *c, const char *method, const char *path,
                                   const speed_http_header_t *headers, size_t n_headers, const void *body,
                                   size_t body_len) {
    size_t size = strlen(method) + strlen(path) + strlen(c->host_header) + 64;
    for (size_t i = 0; i < n_headers; i++) size += strlen(headers[i].name) + strlen(headers[i].value) + 4;
    char *head = speed_malloc(size);
    if (!head) return SPEED_ERR_NO_MEMORY;
    /* A Host among the caller's headers replaces ours (a test of a server's Host check). */
    bool own_host = false;
    for (size_t i = 0; i < n_headers; i++) own_host = own_host || strcasecmp(headers[i].name, "Host") == 0;
    size_t n = (size_t)snprintf(head, size, "%s %s HTTP/1.1\r\n", method, path);
    if (!own_host) n += (size_t)snprintf(head + n, size - n, "Host: %s\r\n", c->host_header);
    for (size_t i = 0; i < n_headers; i++)
        n += (size_t)snprintf(head + n, size - n, "%s: %s\r\n", headers[i].name, headers[i].value);
    if (body) n += (size_t)snprintf(head + n, size - n, "Content-Length: %zu\r\n", body_len);
    n += (size_t)snprintf(head + n, size - n, "\r\n");
    speed_status_t st = send_all(c, head, n);
    speed_free(head);
    if (st == SPEED_OK && body_len) st = send_all(c, body, body_len);
    return st;
}

speed_status_t speed_http_client_request_begin(speed_http_client_t *client, const char *method, const char *path,
                                               const speed_http_header_t *headers, size_t n_headers, const void *body,
                                               size_t body_len, const speed_http_response_t **response_p) {
    if (!client || !method || !path || !response_p || (n_headers && !headers) || (!body && body_len))
        return SPEED_ERR_INVALID_ARGUMENT;
    for (size_t i = 0; i < n_headers; i++)
        if (!headers[i].name || !headers[i].value || strpbrk(headers[i].name, "\r\n") ||
            strpbrk(headers[i].value, "\r\n"))
            return SPEED_ERR_INVALID_ARGUMENT;
    if (client->broken) return SPEED_ERR_PEER_UNREACHABLE;
    speed_status_t st = SPEED_OK;
    char scratch[4096];
    while (client->in_body && st == SPEED_OK) { /* discard the rest of the previous body */
        size_t n;
        st = body_read(client, scratch, sizeof(scratch), &n);
    }
    if (st == SPEED_OK && client->broken) st = SPEED_ERR_PEER_UNREACHABLE;
    if (st == SPEED_OK) st = send_request(client, method, path, headers, n_headers, body, body_len);
    if (st == SPEED_OK) st = read_head(client, strcmp(method, "HEAD") == 0);
    if (st != SPEED_OK) {
        client_break(client);
        return st;
    }
    client->resp.body = NULL;
    client->resp.body_len = 0;
    if (client->body_done) body_finished(client);
    *response_p = &client->resp;
    return SPEED_OK;
}

speed_status_t speed_http_client_request(speed_http_client_t *client, const char *method, const char *path,
                                         const speed_http_header_t *headers, size_t n_headers, const void *body,
                                         size_t body_len, const speed_http_response_t **response_p) {
    const speed_http_response_t *r;
    SPEED_CHECK(speed_http_client_request_begin(client, method, path, headers, n_headers, body, body_len, &r));
    client->body_len = 0;
    speed_status_t st = SPEED_OK;
    for (;;) {
        if (client->body_cap - client->body_len < 4096 + 1) {
            size_t cap = client->body_cap ? 2 * client->body_cap : 8192;
            if (cap > MAX_BODY_BYTES) {
                st = SPEED_ERR_TOO_LONG;
                break;
            }
            char *grown = speed_realloc(client->body, cap);
            if (!grown) {
                st = SPEED_ERR_NO_MEMORY;
                break;
            }
            client->body = grown;
            client->body_cap = cap;
        }
        size_t n;
        if (!client->in_body) break;
        st = body_read(client, client->body + client->body_len, client->body_cap - client->body_len - 1, &n);
        if (st != SPEED_OK || n == 0) break;
        client->body_len += n;
    }
    if (st != SPEED_OK) {
        client_break(client);
        return st;
    }
    client->body[client->body_len] = '\0';
    client->resp.body = client->body;
    client->resp.body_len = client->body_len;
    *response_p = &client->resp;
    return SPEED_OK;
}

/* ---- server-sent events --------------------------------------------------------------- */

static speed_status_t ev_data_append(speed_http_client_t *c, const char *s, size_t n) {
    if (c->ev_data_len + n + 2 > c->ev_data_cap) {
        size_t cap = c->ev_data_cap ? c->ev_data_cap : 1024;
        while (cap < c->ev_data_len + n + 2) cap *= 2;
        if (cap > MAX_EVENT_BYTES) return SPEED_ERR_TOO_LONG;
        char *grown = speed_realloc(c->ev_data, cap);
        if (!grown) return SPEED_ERR_NO_MEMORY;
        c->ev_data = grown;
        c->ev_data_cap = cap;
    }
    memcpy(c->ev_data + c->ev_data_len, s, n);
    c->ev_data_len += n;
    c->ev_data[c->ev_data_len] = '\0';
    return SPEED_OK;
}

/* Handles one line; sets *dispatch when it completes an event. */
static speed_status_t ev_line(speed_http_client_t *c, char *line, size_t n, bool *dispatch) {
    if (n && line[n - 1] == '\r') line[--n] = '\0';
    if (n == 0) {
        if (c->ev_data_len == 0) { /* nothing to dispatch: reset */
            c->ev_name[0] = '\0';
            return SPEED_OK;
        }
        c->ev_data[--c->ev_data_len] = '\0'; /* drop the last '\n' */
        *dispatch = true;
        return SPEED_OK;
    }
    if (line[0] == ':') return SPEED_OK; /* comment */
    char *colon = memchr(line, ':', n);
    const char *value = "";
    size_t vn = 0;
    if (colon) {
        *colon = '\0';
        value = colon + 1;
        if (*value == ' ') value++;
        vn = n - (size_t)(value - line);
    }
    if (strcmp(line, "data") == 0) {
        SPEED_CHECK(ev_data_append(c, value, vn));
        SPEED_CHECK(ev_data_append(c, "\n", 1));
    } else if (strcmp(line, "event") == 0) {
        snprintf(c->ev_name, sizeof(c->ev_name), "%s", value);
    }
    return SPEED_OK;
}

speed_status_t speed_http_client_next_event(speed_http_client_t *client, const speed_http_sse_event_t **event_p) {
    if (!client || !event_p) return SPEED_ERR_INVALID_ARGUMENT;
    *event_p = NULL;
    speed_http_client_t *c = client;
    if (c->event.data) { /* the previous event was handed out: start a new one */
        c->ev_data_len = 0;
        c->ev_name[0] = '\0';
        c->event.data = NULL;
    }
    speed_status_t st = SPEED_OK;
    for (;;) {
        char *base = c->ev_len > c->ev_pos ? c->ev_raw + c->ev_pos : NULL; /* ev_raw is NULL until the first read */
        char *nl = base ? memchr(base, '\n', c->ev_len - c->ev_pos) : NULL;
        if (nl) {
            *nl = '\0';
            size_t n = (size_t)(nl - base);
            c->ev_pos += n + 1;
            bool dispatch = false;
            st = ev_line(c, base, n, &dispatch);
            if (st != SPEED_OK) break;
            if (dispatch) {
                c->event.event = c->ev_name;
                c->event.data = c->ev_data;
                c->event.data_len = c->ev_data_len;
                *event_p = &c->event;
                return SPEED_OK;
            }
            continue;
        }
        if (!c->in_body) return SPEED_OK; /* end of body; a partial event is dropped */
        /* need more bytes: compact, grow, read */
        if (c->ev_pos) {
            memmove(c->ev_raw, c->ev_raw + c->ev_pos, c->ev_len - c->ev_pos);
            c->ev_len -= c->ev_pos;
            c->ev_pos = 0;
        }
        if (c->ev_cap - c->ev_len < 4096) {
            size_t cap = c->ev_cap ? 2 * c->ev_cap : 16384;
            if (cap > MAX_EVENT_BYTES) {
                st = SPEED_ERR_TOO_LONG;
                break;
            }
            char *grown = speed_realloc(c->ev_raw, cap);
            if (!grown) {
                st = SPEED_ERR_NO_MEMORY;
                break;
            }
            c->ev_raw = grown;
            c->ev_cap = cap;
        }
        size_t n;
        st = body_read(c, c->ev_raw + c->ev_len, c->ev_cap - c->ev_len, &n);
        if (st != SPEED_OK) break;
        c->ev_len += n;
    }
    client_break(c);
    return st;
}

/* ---- one-shot ------------------------------------------------------------------------- */

speed_status_t speed_http_get(const char *host, uint16_t port, const char *path, int timeout_ms, int *status_p,
                              char **body_p) {
    if (!status_p || !path) return SPEED_ERR_INVALID_ARGUMENT;
    speed_http_client_t *c;
    SPEED_CHECK(speed_http_client_connect(host, port, timeout_ms, &c));
    const speed_http_response_t *r;
    speed_status_t st = speed_http_client_request(c, "GET", path, NULL, 0, NULL, 0, &r);
    if (st == SPEED_OK) {
        *status_p = r->status;
        if (body_p) {
            *body_p = speed_strndup(r->body, r->body_len);
            if (!*body_p) st = SPEED_ERR_NO_MEMORY;
        }
    }
    speed_http_client_destroy(c);
    return st;
}
