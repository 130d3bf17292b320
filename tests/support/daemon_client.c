/* A test's HTTP client of a running daemon: see daemon_client.h. */
#include "daemon_client.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "prom_check.h"
#include "test_clock.h"

/* ---- one exchange ------------------------------------------------------------------------- */

void cu_resp_free(cu_resp_t *r) {
    speed_free(r->body);
    json_decref(r->json);
    memset(r, 0, sizeof *r);
}

/* ---- where a port is ------------------------------------------------------------------------ */

#define CU_PORT_HOSTS_MAX 128
static struct {
    int port;
    char addr[64];
} g_port_hosts[CU_PORT_HOSTS_MAX];
static int g_n_port_hosts;

void cu_port_host(int port, const char *addr) {
    for (int i = 0; i < g_n_port_hosts; i++)
        if (g_port_hosts[i].port == port) {
            snprintf(g_port_hosts[i].addr, sizeof g_port_hosts[i].addr, "%s", addr ? addr : "127.0.0.1");
            return;
        }
    if (!addr || g_n_port_hosts == CU_PORT_HOSTS_MAX) return;
    g_port_hosts[g_n_port_hosts].port = port;
    snprintf(g_port_hosts[g_n_port_hosts].addr, sizeof g_port_hosts[0].addr, "%s", addr);
    g_n_port_hosts++;
}

const char *cu_port_addr(int port) {
    for (int i = 0; i < g_n_port_hosts; i++)
        if (g_port_hosts[i].port == port) return g_port_hosts[i].addr;
    return "127.0.0.1";
}

static void cu_hdr_copy(const speed_http_response_t *resp, const char *name, char *out, size_t cap) {
    const char *v = speed_http_response_header(resp, name);
    snprintf(out, cap, "%s", v ? v : "");
}

bool cu_http(int port, const char *method, const char *path, const char *body, const char *auth, const char *xid,
             int timeout_ms, cu_resp_t *out) {
    memset(out, 0, sizeof *out);
    double t0 = now_s();
    speed_http_client_t *c = NULL;
    if (speed_http_client_connect(cu_port_addr(port), (uint16_t)port, timeout_ms, &c) != SPEED_OK) return false;
    speed_http_header_t h[3];
    size_t nh = 0;
    if (body) h[nh++] = (speed_http_header_t){"Content-Type", "application/json"};
    if (auth) h[nh++] = (speed_http_header_t){"Authorization", auth};
    if (xid) h[nh++] = (speed_http_header_t){"X-Request-Id", xid};
    const speed_http_response_t *resp = NULL;
    speed_status_t st = speed_http_client_request(c, method, path, h, nh, body, body ? strlen(body) : 0, &resp);
    if (st == SPEED_OK) {
        out->status = resp->status;
        out->body = speed_strndup(resp->body ? resp->body : "", resp->body_len);
        json_error_t err;
        out->json = json_loadb(resp->body ? resp->body : "", resp->body_len, 0, &err);
        cu_hdr_copy(resp, "Retry-After", out->retry_after, sizeof out->retry_after);
        cu_hdr_copy(resp, "X-Request-Id", out->request_id, sizeof out->request_id);
        cu_hdr_copy(resp, "Allow", out->allow, sizeof out->allow);
        cu_hdr_copy(resp, "Content-Type", out->content_type, sizeof out->content_type);
    }
    speed_http_client_destroy(c);
    out->seconds = now_s() - t0;
    return st == SPEED_OK;
}

bool cu_post(int port, const char *path, const char *body, cu_resp_t *out) {
    return cu_http(port, "POST", path, body, NULL, NULL, 60000, out);
}

/* ---- server-sent events ------------------------------------------------------------------- */

bool cu_sse_begin(int port, const char *path, const char *body, const char *auth, int timeout_ms, cu_sse_t *s) {
    memset(s, 0, sizeof *s);
    if (speed_http_client_connect(cu_port_addr(port), (uint16_t)port, timeout_ms, &s->c) != SPEED_OK) return false;
    speed_http_header_t h[2] = {{"Content-Type", "application/json"}, {"Authorization", auth}};
    const speed_http_response_t *resp = NULL;
    if (speed_http_client_request_begin(s->c, "POST", path, h, auth ? 2 : 1, body, strlen(body), &resp) != SPEED_OK) {
        speed_http_client_destroy(s->c);
        s->c = NULL;
        return false;
    }
    s->status = resp->status;
    cu_hdr_copy(resp, "X-Request-Id", s->request_id, sizeof s->request_id);
    cu_hdr_copy(resp, "Content-Type", s->content_type, sizeof s->content_type);
    return true;
}

/* Parses complete events out of s->buf. */
static void cu_sse_parse(cu_sse_t *s) {
    for (;;) {
        char *end = NULL;
        size_t sep = 0;
        for (size_t i = 0; i + 1 < s->len; i++) {
            if (s->buf[i] == '\n' && s->buf[i + 1] == '\n') {
                end = s->buf + i;
                sep = 2;
                break;
            }
        }
        if (!end) return;
        size_t elen = (size_t)(end - s->buf);
        /* join the data: lines of this event */
        char *data = speed_malloc(elen + 1);
        size_t dl = 0;
        bool has_data = false;
        for (char *line = s->buf; line < end;) {
            char *nl = memchr(line, '\n', (size_t)(end - line));
            size_t ll = nl ? (size_t)(nl - line) : (size_t)(end - line);
            if (ll >= 5 && strncmp(line, "data:", 5) == 0) {
                const char *v = line + 5;
                size_t vl = ll - 5;
                if (vl && *v == ' ') v++, vl--;
                if (has_data) data[dl++] = '\n';
                memcpy(data + dl, v, vl);
                dl += vl;
                has_data = true;
            }
            line = nl ? nl + 1 : end;
        }
        data[dl] = '\0';
        if (has_data && s->n < CU_SSE_MAX) {
            if (strcmp(data, "[DONE]") == 0) s->done = true;
            s->data[s->n++] = data;
        } else {
            speed_free(data);
        }
        memmove(s->buf, end + sep, s->len - elen - sep);
        s->len -= elen + sep;
    }
}

int cu_sse_read(cu_sse_t *s, int want, double deadline_s) {
    int n0 = s->n;
    char tmp[16384];
    while (!s->ended && !s->io_error && (want < 0 || s->n - n0 < want)) {
        if (now_s() > deadline_s) break;
        size_t got = 0;
        if (speed_http_client_read(s->c, tmp, sizeof tmp, &got) != SPEED_OK) {
            s->io_error = true;
            break;
        }
        if (got == 0) {
            s->ended = true;
            break;
        }
        if (s->len + got + 1 > s->cap) {
            size_t cap = (s->cap ? s->cap * 2 : 65536) + got;
            char *nb = speed_malloc(cap);
            if (s->len) memcpy(nb, s->buf, s->len);
            speed_free(s->buf);
            s->buf = nb;
            s->cap = cap;
        }
        memcpy(s->buf + s->len, tmp, got);
        s->len += got;
        cu_sse_parse(s);
    }
    return s->n - n0;
}

void cu_sse_free(cu_sse_t *s) {
    speed_http_client_destroy(s->c);
    for (int i = 0; i < s->n; i++) speed_free(s->data[i]);
    speed_free(s->buf);
    memset(s, 0, sizeof *s);
}

/* ---- health and metrics ------------------------------------------------------------------- */

bool cu_wait_health(int port, int status, double timeout_s) {
    double until = now_s() + timeout_s;
    for (;;) {
        int got = 0;
        char *body = NULL;
        /* A GET may take up to a second: a daemon busy starting answers late rather than not. */
        if (speed_http_get(cu_port_addr(port), (uint16_t)port, "/health", 1000, &got, &body) == SPEED_OK) {
            speed_free(body);
            if (got == status) return true;
        }
        if (now_s() >= until) return false;
        sleep_ms(50);
    }
}

char *cu_metrics(int port) {
    int status = 0;
    char *body = NULL;
    if (speed_http_get(cu_port_addr(port), (uint16_t)port, "/metrics", 5000, &status, &body) != SPEED_OK ||
        status != 200) {
        speed_free(body);
        return NULL;
    }
    return body;
}

double cu_metric(int port, const char *series) {
    char *body = cu_metrics(port);
    double v = prom_value(body, series);
    speed_free(body);
    return v;
}

double cu_metric_sum(int port, const char *name) {
    char *body = cu_metrics(port);
    double v = NAN;
    if (!body) return v;
    size_t n = strlen(name);
    for (char *line = body; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, name, n) == 0 && (line[n] == ' ' || line[n] == '{')) {
            char *sp = line[n] == ' ' ? line + n : strstr(line + n, "} ");
            if (sp) {
                double x = strtod(sp + (*sp == '}' ? 2 : 1), NULL);
                v = isnan(v) ? x : v + x;
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    speed_free(body);
    return v;
}

bool cu_wait_metric(int port, const char *series, double want, double timeout_s) {
    double until = now_s() + timeout_s;
    for (;;) {
        if (fabs(cu_metric(port, series) - want) < 1e-9) return true;
        if (now_s() >= until) return false;
        sleep_ms(20);
    }
}

double cu_metric0(int port, const char *series) {
    double v = cu_metric(port, series);
    return isnan(v) ? 0 : v;
}

double cu_metric_sum0(int port, const char *name) {
    double v = cu_metric_sum(port, name);
    return isnan(v) ? 0 : v;
}
