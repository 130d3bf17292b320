/* speed_router: the speed-router daemon without its main (HTTP front end, request workers,
 * node table, metrics). main.c loads the configuration, the tokenizer and the model's shape,
 * handles signals and drives the lifecycle:
 *
 *   create → start → READY ... signal → drain (health 503, new requests 503, queue closed)
 *   → wait_idle(grace) → cancel_all (if requests remain) → wait_idle → destroy
 *
 * Requests. Each admitted /v1/completions or /v1/chat/completions request runs on its own
 * worker thread (bounded: at most max_in_flight + max_queue workers exist; beyond that
 * a request is refused at once with 429). The HTTP thread only parses and validates the
 * body, then hands the request over; the worker tokenizes, takes an admission slot, routes
 * (decode-only or disaggregated), calls the nodes and answers through a speed_http stream
 * (SSE when streaming, one delayed JSON response otherwise). See docs/router.md.
 *
 * Threading: create/start/drain/wait_idle/cancel_all/destroy are called by one owner thread
 * (main). Everything else runs on the daemon's own threads.
 *
 * Memory: the router borrows the config, tokenizer and model name given at create; they must
 * outlive it.
 */
#ifndef SPEED_ROUTER_H
#define SPEED_ROUTER_H

#include <stdbool.h>
#include <stdint.h>

#include "cluster_config.h"
#include "rpc.h"
#include "status.h"
#include "tokenizer.h"

typedef struct {
    const speed_cluster_config_t *cfg; /* router.*, speed.*, pools, host */
    const speed_tok_t *tok;
    const char *model_id;       /* the served model name (the API's "model") */
    int32_t n_layers;           /* model depth L (checks speed.prefill_layers) */
    int64_t n_ctx;              /* prompt + generated tokens limit */
    const speed_rpc_tls_t *tls; /* control plane mTLS to the nodes; NULL = plaintext (tls.insecure) */
} speed_router_params_t;

typedef struct speed_router speed_router_t;

/* Builds everything (metrics, node table, admission, HTTP routes); nothing listens yet.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (bad params, logged) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_router_create(const speed_router_params_t *params, speed_router_t **rt_p);

/* Polls the nodes once, starts the node poller, the housekeeping thread and the HTTP server.
 * Returns SPEED_OK, SPEED_ERR_IO (the port cannot be bound; logged) or SPEED_ERR_INTERNAL. */
speed_status_t speed_router_start(speed_router_t *rt);

/* The HTTP port (the bound one when router.port is 0), 0 before start. */
uint16_t speed_router_port(const speed_router_t *rt);

/* The metrics/health listener's port (router.metrics_port), 0 when there is none. */
uint16_t speed_router_metrics_port(const speed_router_t *rt);

/* Stop admitting: /health answers 503, new requests 503, requests waiting for a slot get
 * 503. Requests in flight continue. Idempotent. */
void speed_router_drain(speed_router_t *rt);

/* Waits up to timeout_ms (< 0: no limit) for every request worker to end. True if none is
 * left. */
bool speed_router_wait_idle(speed_router_t *rt, int64_t timeout_ms);

/* Ends every request in flight now (the client gets an error; nodes get Cancel). */
void speed_router_cancel_all(speed_router_t *rt);

/* Request workers still running. */
int speed_router_n_workers(speed_router_t *rt);

/* Drains, cancels what is left, stops HTTP, then the node poller and the channels. If workers
 * do not end within a few seconds after cancellation it gives up, leaks the router (logged)
 * and returns false, so the process can still exit. NULL ok (true). */
bool speed_router_destroy(speed_router_t *rt);

#endif /* SPEED_ROUTER_H */
