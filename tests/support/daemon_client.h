/* A test's HTTP client of a running daemon (library speed_test_daemon): one request on a fresh
 * connection, a server-sent event stream read against a total deadline, waits for /health,
 * and /metrics samples. Used by the node, router and whole-cluster tests, and speedctl up's.
 *
 * Everything talks to 127.0.0.1:port, unless cu_port_host placed the port elsewhere (a daemon on
 * a host of the netns test bed, tests/chaos/netns_bed.h: the calling thread must then be inside
 * one of the bed's hosts, nb_host_enter). Bodies are speed_malloc'd (they count in the speed_alloc
 * live counts, as the daemons' own client code would).
 *
 * Thread-safety: reentrant; a cu_resp_t or cu_sse_t belongs to one thread at a time.
 */
#ifndef SPEED_TESTS_DAEMON_CLIENT_H
#define SPEED_TESTS_DAEMON_CLIENT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "http.h"

/* ---- where a port is ------------------------------------------------------------------------ */

/* From now on every helper here dials `addr` (an IPv4 literal) for `port`; NULL: back to
 * 127.0.0.1. Call before the threads that use the port start (the table is not locked). */
void cu_port_host(int port, const char *addr);

/* The address the helpers dial for port. */
const char *cu_port_addr(int port);

/* ---- one exchange ------------------------------------------------------------------------- */

typedef struct {
    int status;           /* 0: no answer (connect/read error) */
    char *body;           /* speed_malloc'd, NUL-terminated, or NULL */
    json_t *json;         /* parsed body (NULL if not JSON) */
    char retry_after[32]; /* these headers, "" when absent */
    char request_id[96];
    char allow[64];
    char content_type[96];
    double seconds; /* time taken */
} cu_resp_t;

/* Frees body and json and zeroes *r. */
void cu_resp_free(cu_resp_t *r);

/* `method path` with `body` (NULL: none; else sent as application/json) on a new connection;
 * `auth` and `xid` (may be NULL) are the Authorization and X-Request-Id values. timeout_ms
 * bounds the connect and every socket wait. Fills *out (free with cu_resp_free, also on
 * failure); returns false when no response arrived. */
bool cu_http(int port, const char *method, const char *path, const char *body, const char *auth, const char *xid,
             int timeout_ms, cu_resp_t *out);

/* cu_http POST without Authorization or X-Request-Id, 60 s timeout. */
bool cu_post(int port, const char *path, const char *body, cu_resp_t *out);

/* ---- server-sent events ------------------------------------------------------------------- */

/* A stream read through speed_http_client_read with its own parser, so that a total deadline
 * bounds it even if the server keeps sending ": ping" comments. (The router tests read streams
 * through speed_http_client_next_event instead: router_test_util.h.) */
#define CU_SSE_MAX 8192
typedef struct {
    speed_http_client_t *c;
    int status;
    char request_id[96];
    char content_type[96];
    char *buf; /* unparsed bytes */
    size_t len, cap;
    char *data[CU_SSE_MAX]; /* "data:" of each event, in order (speed_malloc'd) */
    int n;
    bool ended;    /* the body ended (server closed the stream) */
    bool done;     /* "[DONE]" seen */
    bool io_error; /* a socket error or timeout ended reading */
} cu_sse_t;

/* Starts a streaming POST of a JSON body (`auth` may be NULL); timeout_ms bounds every socket
 * wait. Returns false when no response head arrived. Free with cu_sse_free either way. */
bool cu_sse_begin(int port, const char *path, const char *body, const char *auth, int timeout_ms, cu_sse_t *s);

/* Reads until `want` more events arrived (want < 0: to the end of the body), the body ends,
 * an error, or deadline_s (an absolute now_s() time) passes. Returns the events added. */
int cu_sse_read(cu_sse_t *s, int want, double deadline_s);

/* Closes the connection (a client going away) and frees everything. */
void cu_sse_free(cu_sse_t *s);

/* ---- health and metrics ------------------------------------------------------------------- */

/* GETs /health every 50 ms until it answers `status` (200: serving, 503: loading or draining)
 * or timeout_s passes. True when it did. */
bool cu_wait_health(int port, int status, double timeout_s);

/* The /metrics page (speed_free it), or NULL when it cannot be fetched or is not a 200. */
char *cu_metrics(int port);

/* The value of one sample, `series` being the exact name{labels} text (prom_value), or NAN
 * when the page cannot be fetched or has no such sample. */
double cu_metric(int port, const char *series);

/* The sum of every sample named `name` whatever its labels, or NAN when there is none. */
double cu_metric_sum(int port, const char *name);

/* cu_metric and cu_metric_sum with 0 for a sample that is absent (a counter not yet touched)
 * or a page that cannot be fetched. */
double cu_metric0(int port, const char *series);
double cu_metric_sum0(int port, const char *name);

/* Polls cu_metric(port, series) until it equals want (within 1e-9) or timeout_s passes. */
bool cu_wait_metric(int port, const char *series, double want, double timeout_s);

#endif /* SPEED_TESTS_DAEMON_CLIENT_H */
