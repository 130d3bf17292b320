/* The planner's discrete-event simulation of a speedserve cluster (docs/operations.md, "How plan
 * works"): the queues as the router and the nodes run them, timed by a profile.
 *
 *   arrival -> router: waits for a decode slot (decode max_running per node, least loaded), then
 *              goes to the least-loaded prefill node (fewest queued + running)
 *   prefill node: FIFO queue, up to max_running prompts in the engine; a step takes rows from
 *              them in order (each at most prefill_chunk, in all at most max_step_tokens) and
 *              lasts the profile's prefill time of that many rows at C; a prompt done in a step
 *              is done at the step's end
 *   transfer:  its KV (C layers of every prompt token, L - C of A + T) then travels for the
 *              profile's transfer time of those bytes; the decode node takes the request at its
 *              next step boundary (at once when idle) and the prefill's first token reaches the
 *              client then (TTFT = that + overhead_ms), as speedserve's batcher starts a request
 *              between two steps
 *   decode node: continuous batching: a step runs every sequence that was ready when it began,
 *              lasting the profile's step time at that batch and their mean context; a
 *              sequence is done after output - 1 steps (the first token came from the prefill)
 *
 * Shared cores (host_cores > 0): every node in a step wants node_threads cores; when the busy
 * nodes want more than host_cores, each runs at host_cores / wanted of its speed (processor
 * sharing), which is how nodes of one small host slow each other down. host_background counts
 * other runnable threads on the host (a build, a load generator): every thread gets its fair
 * share, relative to the share the profile's one node had beside the same background. The
 * router's and the clients' own CPU (client_ms_per_request at each arrival, client_ms_per_token
 * for each token made) is one more thread of work while any is pending; and the fixed TTFT
 * overhead (HTTP, router, RPCs: CPU work too) stretches by the same sharing, taken at the moment
 * the first token is made.
 *
 * Single-threaded, allocates per run; deterministic for given inputs. */
#ifndef SPEED_PLAN_SIM_H
#define SPEED_PLAN_SIM_H

#include <stdbool.h>

#include "plan_profile.h"
#include "plan_workload.h"
#include "status.h"

typedef struct {
    const speed_plan_depth_t *depth; /* the profile's tables at C (borrowed) */
    int n_layers, prefill_layers, anchors, tail;
    double kv_bytes_per_token_layer;
    int n_prefill, n_decode;
    int prefill_max_running, max_step_tokens, prefill_chunk;
    int decode_max_running;
    double overhead_ms;           /* added to every TTFT: HTTP, router, control RPCs */
    double step_overhead_ms;      /* added to every decode step: the node's work per step outside the engine
                              * (token events, the stream to the router, SSE), which TPOT sees */
    double host_cores;            /* 0: every node has its own hardware */
    double node_threads;          /* cores a busy node wants (host_cores > 0) */
    double host_background;       /* host_cores > 0: threads of other work that keep the host's cores busy,
                             * as when the profile was measured (fair sharing: a node runs at
                             * min(1, cores / (background + wanted)) relative to
                             * min(1, cores / (background + node_threads)), the profile's speed) */
    double client_ms_per_request; /* host_cores > 0: CPU the router and the clients on the same host spend */
    double client_ms_per_token;   /* per request (at its arrival) and per streamed token (when made) */
    double ttft_factor;           /* correction factors (0 = 1): every request's simulated TTFT, and TPOT, is */
    double tpot_factor;           /* multiplied by them — measured / simulated p90 on a loaded calibration
                                   * cluster of the same host (the tails the model does not produce:
                                   * scheduling of many processes on few cores, RPC wake-ups) */
} speed_plan_sim_params_t;

typedef struct {
    int n; /* requests simulated */
    double ttft_mean_ms, ttft_p50_ms, ttft_p90_ms, ttft_p99_ms;
    double tpot_mean_ms, tpot_p50_ms, tpot_p90_ms, tpot_p99_ms; /* requests with output > 1 */
    double e2e_p90_ms;
    double prefill_wait_mean_ms;                /* router + prefill queue, before the first prefill step */
    double offered_rps, throughput_rps;         /* over the arrival span / until the last finish */
    double goodput_rps;                         /* requests within both SLOs, per second of the run */
    double prefill_busy, decode_busy;           /* fraction of the arrival span the pool's nodes stepped */
    int decode_running_max, decode_running_p99; /* sequences in one decode node at once */
    int prefill_waiting_p99;                    /* requests queued at one prefill node (p99 over arrivals) */
    bool saturated; /* the queues grow through the run: mean TTFT of the last quarter of the arrivals
                     * above 2x the first half's + the first tenth's (n >= 40) */
} speed_plan_sim_result_t;

/* Simulates reqs[n] (arrival_s non-decreasing) through the cluster of params. slo_*_ms define
 * goodput (0: no bound). SPEED_ERR_INVALID_ARGUMENT for bad params (counts < 1, no depth),
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_plan_sim_run(const speed_plan_sim_params_t *p, const speed_plan_request_t *reqs, int n,
                                  double slo_ttft_ms, double slo_tpot_ms, speed_plan_sim_result_t *res);

/* KV bytes of a prompt of n tokens at the depth of p (what a transfer moves). */
double speed_plan_kv_bytes(const speed_plan_sim_params_t *p, double n_prompt);

/* Rate matching: the requests per second one prefill node serves at full steps (rows =
 * min(max_step_tokens, prefill_max_running x mean_prompt)), and one decode node at
 * decode_max_running sequences of context mean_prompt + mean_output / 2 (each needs
 * mean_output - 1 steps; INFINITY when mean_output <= 1). */
void speed_plan_rate_match(const speed_plan_depth_t *d, int max_step_tokens, int prefill_max_running,
                           int decode_max_running, double mean_prompt, double mean_output, double *prefill_rps,
                           double *decode_rps);

#endif /* SPEED_PLAN_SIM_H */
