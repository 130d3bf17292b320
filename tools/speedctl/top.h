/* speedctl top's model of a cluster (top_frame.c) and its two renderings (top_render.c): what
 * cli_top.c scrapes, computes and draws every --interval.
 *
 * A view holds the endpoints (the router's /metrics and each node's /metrics,/health), the last
 * two scrapes of each, and the frame computed from them: counter rates over the window between
 * the two scrapes, histogram quantiles from the window's bucket deltas (from the totals when the
 * window saw no observation: the first frame, an idle cluster). Nothing here draws on a
 * terminal or installs signal handlers; that is cli_top.c's.
 *
 * Thread-safety: one thread drives a view; speedctl_top_scrape fetches the endpoints on threads
 * of its own and joins them before it returns.
 */
#ifndef SPEEDCTL_TOP_H
#define SPEEDCTL_TOP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "cluster_config.h"
#include "prom_text.h"
#include "status.h"

#define SPEEDCTL_TOP_MAX_NODES 256

typedef enum {
    SPEEDCTL_TOP_ROUTER = 0,
    SPEEDCTL_TOP_PREFILL,
    SPEEDCTL_TOP_DECODE,
    SPEEDCTL_TOP_NODE
} speedctl_top_role_t;

typedef struct {
    speedctl_top_role_t role; /* SPEEDCTL_TOP_NODE: a --node whose role its metrics tell */
    char host[256];
    int port;
    char grpc_addr[300]; /* the router's name for the node (speed_router_node_up's node label); "" = unknown */
} speedctl_top_endpoint_t;

/* One fetch of one endpoint. */
typedef struct {
    bool answered;         /* /metrics answered 200 */
    int health;            /* /health's HTTP status; 0 when it did not answer */
    speed_status_t err;    /* why /metrics did not answer (SPEED_OK when it did) */
    int metrics_status;    /* /metrics' HTTP status (0: no answer) */
    double t_s;            /* monotonic time of the fetch */
    speed_prom_text_t doc; /* the metrics (empty unless answered) */
} speedctl_top_scrape_t;

/* What one row of the node table shows. NaN: not exported / not known. */
typedef struct {
    speedctl_top_role_t role; /* PREFILL or DECODE once known; NODE while never answered */
    char addr[300];
    const char *state; /* "up", "starting", "draining", "down" (refused: nothing listens),
                          "unreachable" (timeout or no route), "unhealthy" (answers, /health not 200) */
    double running, waiting, reserved;
    double kv_used_ratio;
    double tokens_per_s; /* decode: generated; prefill: prompt tokens computed */
    double tokens_total;
    double requests_total; /* every final status */
    double xfer_failures_total, xfer_bytes_per_s;
    int router_up; /* the router's speed_router_node_up: 1, 0, or -1 unknown */
    /* operator metrics (issue 12), shown when exported */
    /* speed_engine_step_duration_seconds' p50, speed_engine_step_sequences' mean (an integer
     * histogram: a quantile interpolated inside bucket (0, 1] would say 0.5 for batches of 1),
     * speed_engine_queue_wait_seconds' p50 */
    double step_p50_s, batch_mean, queue_wait_p50_s;
    double tokens_in_flight;
} speedctl_top_node_t;

typedef struct {
    double p50, p90;
    double mean; /* sum / count of the same observations */
    bool window; /* from the window's observations (false: from the totals) */
    bool present;
} speedctl_top_quantiles_t;

#define SPEEDCTL_TOP_MAX_CODES 16

typedef struct {
    char addr[300];
    const char *state; /* as a node's */
    double requests_total, requests_per_s;
    struct {
        char code[8];
        double total, per_s;
    } errors[SPEEDCTL_TOP_MAX_CODES]; /* HTTP statuses >= 400 */
    size_t n_errors;
    double running, waiting;
    speedctl_top_quantiles_t ttft, itl, tpot, e2e, queue_wait;
    double generated_per_s, generated_total;
    double kv_shipped_per_s, kv_shipped_total;
    double kv_saved_per_s, kv_saved_total; /* SPEED savings (NaN when not exported) */
} speedctl_top_router_t;

typedef struct {
    char name[128], model[256];
    double uptime_s, window_s; /* since the view began; between the frame's two scrapes (0 on the first) */
    bool have_router;
    speedctl_top_router_t router;
    speedctl_top_node_t nodes[SPEEDCTL_TOP_MAX_NODES];
    size_t n_nodes;
    size_t n_up;          /* nodes whose state is "up" */
    double shallow_share; /* prompt tokens the nodes computed shallow / all (window, else since
                             start; NaN when not exported) */
} speedctl_top_frame_t;

typedef struct {
    speedctl_top_endpoint_t *endpoints; /* [0] is the router when have_router */
    size_t n_endpoints;
    bool have_router;
    speedctl_top_scrape_t *cur, *prev; /* [n_endpoints] each */
    bool have_prev;
    int timeout_ms;
    double t0_s;
    char name[128], model[256];
} speedctl_top_view_t;

/* Endpoints from a cluster file: the router (router.metrics_port, else router.port, at
 * metrics.listen / router.listen, or host when that binds every address) and every replica of
 * both pools at its <pool>.hosts entry (else host), http_port + i. */
speed_status_t speedctl_top_view_from_cluster(const speed_cluster_config_t *c, const char *file,
                                              speedctl_top_view_t *v);

/* Endpoints from --router HOST:PORT (NULL or "": none) and --node HOST:PORT,... (NULL: none).
 * SPEED_ERR_INVALID_ARGUMENT (reason printed) when an address is malformed or nothing is given. */
speed_status_t speedctl_top_view_from_list(const char *router, const char *nodes, speedctl_top_view_t *v);

/* Fetches every endpoint (in parallel, each bounded by timeout_ms), the previous scrape kept
 * for the rates. SPEED_OK or SPEED_ERR_NO_MEMORY. */
speed_status_t speedctl_top_scrape(speedctl_top_view_t *v);

/* The frame of the last two scrapes (or the only one) into *f. */
void speedctl_top_frame(const speedctl_top_view_t *v, speedctl_top_frame_t *f);

void speedctl_top_view_cleanup(speedctl_top_view_t *v);

/* The frame as text for a terminal of cols columns and rows rows (rows <= 0: no limit): every
 * line cut to cols, nodes beyond the rows summarized in one line. `color`: bold headers and
 * red/green states with ANSI SGR. Lines end in "\r\n" when raw (a terminal in raw mode),
 * else "\n". Writes to f. */
void speedctl_top_render_text(const speedctl_top_frame_t *fr, int cols, int rows, bool color, bool raw, FILE *f);

/* The frame as one JSON object (caller json_decref()s; NULL when out of memory). Field names in
 * docs/speedctl.md#top. */
json_t *speedctl_top_render_json(const speedctl_top_frame_t *fr);

#endif /* SPEEDCTL_TOP_H */
