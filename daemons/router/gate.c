/* The router's gate: what every API request must pass on its headers alone, before any body
 * byte is read (speed_http_gate_cb_t). In order:
 *
 *   1. Host: with router.allowed_hosts set, the Host header must be one of them (a DNS
 *      rebinding page reaches the API under its own host name);
 *   2. Origin: a request carrying Origin (a browser page) must come from one of
 *      router.cors_origins, else 403; an allowed one gets the CORS response headers. With
 *      no cors_origins no CORS header is ever sent. A preflight (OPTIONS) from an allowed
 *      origin goes on to the OPTIONS route, which answers 204;
 *   3. the API key (401 at once), on every path but the preflight; /health and /metrics on
 *      the API port need a key too when keys are set (router.metrics_port serves them
 *      without one on the metrics network);
 *   4. the key's rate and in-flight limits (429 with Retry-After at once). The key's slot is
 *      held until the request is over (speed_http_request_set_user's end callback).
 */
#include "router_internal.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "clock.h"
#include "log.h"

#define SUBSYS SPEED_SUBSYS_NET

/* Is `value` (len n) one of the comma-separated items of `list`? Spaces around items are
 * ignored; comparison ignores case (host names and origins are case-insensitive). */
static bool list_has(const char *list, const char *value, size_t n) {
    for (const char *p = list; p && *p;) {
        const char *comma = strchr(p, ',');
        const char *e = comma ? comma : p + strlen(p);
        while (p < e && (*p == ' ' || *p == '\t')) p++;
        const char *b = e;
        while (b > p && (b[-1] == ' ' || b[-1] == '\t')) b--;
        if ((size_t)(b - p) == n && strncasecmp(p, value, n) == 0) return true;
        p = comma ? comma + 1 : e;
    }
    return false;
}

static bool host_allowed(const char *allowed, const char *host) {
    if (!allowed || !allowed[0]) return true;
    if (!host || !host[0]) return false;
    size_t n = strlen(host);
    if (list_has(allowed, host, n)) return true;
    /* "name:port" matches an entry "name"; "[v6]:port" matches "[v6]". */
    const char *colon = strrchr(host, ':');
    if (colon && (host[0] != '[' || colon > strchr(host, ']'))) return list_has(allowed, host, (size_t)(colon - host));
    return false;
}

static bool origin_allowed(const char *cors, const char *origin) {
    if (!cors || !cors[0]) return false;
    return list_has(cors, "*", 1) || list_has(cors, origin, strlen(origin));
}

static void refuse(speed_router_t *rt, speed_http_request_t *hr, const char *why) {
    speed_openai_error_t err;
    speed_openai_error_set(&err, SPEED_OPENAI_ERR_INVALID_REQUEST, NULL, "forbidden", "%s", why);
    speed_router_respond_error(rt, hr, &err, 403, 0);
}

static void key_end(void *data) { speed_router_key_leave(data); }

bool speed_router_gate(void *user, speed_http_request_t *hr) {
    speed_router_t *rt = user;
    const speed_cluster_config_t *cfg = rt->cfg;
    if (!host_allowed(cfg->allowed_hosts, speed_http_request_header(hr, "Host"))) {
        refuse(rt, hr, "This Host is not served here (router.allowed_hosts).");
        return false;
    }
    const char *origin = speed_http_request_header(hr, "Origin");
    if (origin) {
        if (!origin_allowed(cfg->cors_origins, origin)) {
            refuse(rt, hr, "Cross-origin requests from this Origin are not allowed (router.cors_origins).");
            return false;
        }
        speed_http_request_add_header(hr, "Access-Control-Allow-Origin", origin);
        speed_http_request_add_header(hr, "Vary", "Origin");
        speed_http_request_add_header(hr, "Access-Control-Expose-Headers", "X-Request-Id, Retry-After");
    }
    const char *method = speed_http_request_method(hr);
    if (strcmp(method, "OPTIONS") == 0) return true; /* a preflight carries no credentials */

    speed_openai_error_t err;
    speed_router_key_t *key = NULL;
    if (!speed_router_keys_check(rt->keys, speed_http_request_header(hr, "Authorization"), &key, &err)) {
        speed_router_respond_error(rt, hr, &err, 0, 0);
        return false;
    }
    if (!key) return true;
    int retry = 1;
    const char *limit = "";
    if (!speed_router_key_enter(key, speed_clock_mono_s(), &err, &retry, &limit)) {
        speed_router_count_key_limited(rt, key, limit);
        speed_router_respond_error(rt, hr, &err, 0, retry);
        return false;
    }
    speed_http_request_set_user(hr, key, key_end);
    return true;
}

/* OPTIONS on an API path: the gate let only an allowed origin (or a request without Origin)
 * through. */
void speed_router_handle_preflight(void *user, speed_http_request_t *hr) {
    speed_router_t *rt = user;
    if (!speed_http_request_header(hr, "Origin") || !rt->cfg->cors_origins || !rt->cfg->cors_origins[0]) {
        speed_http_request_add_header(hr, "Allow", "GET, POST, OPTIONS");
        speed_http_respond(hr, 204, NULL, NULL, 0);
        return;
    }
    speed_http_request_add_header(hr, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
    speed_http_request_add_header(hr, "Access-Control-Allow-Headers", "Authorization, Content-Type, X-Request-Id");
    speed_http_request_add_header(hr, "Access-Control-Max-Age", "600");
    speed_http_respond(hr, 204, NULL, NULL, 0);
}
