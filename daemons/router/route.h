/* speed_route: which path a request takes through the cluster.
 *
 *   disaggregated  prefill pool (shallow prefill, KV pushed) → decode pool (generation)
 *   decode_only    the decode node prefills the prompt itself (colocated path)
 *
 * A short prompt is cheaper to prefill where it will be decoded than to reserve, ship
 * and claim its KV; a prompt goes decode-only when it has fewer tokens than the
 * configured threshold, or when no prefill node can take it. The decision carries a
 * reason, a static string for the `reason` label of the router's route metric.
 *
 * Threading: pure functions, callable from any thread.
 */
#ifndef SPEED_ROUTER_ROUTE_H
#define SPEED_ROUTER_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    SPEED_ROUTE_DISAGGREGATED = 0,
    SPEED_ROUTE_DECODE_ONLY,
} speed_route_kind_t;

typedef struct {
    int64_t decode_only_below; /* prompts with fewer tokens go decode-only; 0 = never */
    bool decode_only_fallback; /* no prefill node UP → decode-only instead of failing */
} speed_route_params_t;

/* decode_only_below 0 (always disaggregated), fallback on. */
speed_route_params_t speed_route_default_params(void);

/* Reasons (static strings, metric label values). */
#define SPEED_ROUTE_REASON_SHORT_PROMPT        "short_prompt"
#define SPEED_ROUTE_REASON_NO_PREFILL_NODE     "no_prefill_node"
#define SPEED_ROUTE_REASON_LONG_PROMPT         "long_prompt"
#define SPEED_ROUTE_REASON_PREFILL_UNAVAILABLE "prefill_unavailable"

typedef struct {
    speed_route_kind_t kind;
    const char *reason; /* one of SPEED_ROUTE_REASON_*, static */
    bool ok;            /* false: no route (no prefill node and no fallback) → 503 */
} speed_route_decision_t;

/* params NULL = defaults. n_prefill_up is the number of prefill nodes UP (the caller
 * reads it from the prefill pool). Order of the rules:
 *   n_prompt < decode_only_below            → decode_only, "short_prompt"
 *   n_prefill_up == 0 and fallback          → decode_only, "no_prefill_node"
 *   n_prefill_up == 0 and no fallback       → disaggregated, "prefill_unavailable", ok false
 *   otherwise                               → disaggregated, "long_prompt" */
speed_route_decision_t speed_route_decide(const speed_route_params_t *params, int64_t n_prompt, size_t n_prefill_up);

/* "disaggregated" / "decode_only" (static; "unknown" outside the enum): the `route`
 * label of speed_router_requests_total. */
const char *speed_route_kind_name(speed_route_kind_t kind);

#endif /* SPEED_ROUTER_ROUTE_H */
