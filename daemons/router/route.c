/* The route decision: decode-only for short prompts, disaggregated otherwise. */
#include "route.h"

speed_route_params_t speed_route_default_params(void) {
    speed_route_params_t p = {0, true};
    return p;
}

speed_route_decision_t speed_route_decide(const speed_route_params_t *params, int64_t n_prompt, size_t n_prefill_up) {
    speed_route_params_t p = params ? *params : speed_route_default_params();
    speed_route_decision_t d = {SPEED_ROUTE_DISAGGREGATED, SPEED_ROUTE_REASON_LONG_PROMPT, true};
    if (n_prompt < p.decode_only_below) {
        d.kind = SPEED_ROUTE_DECODE_ONLY;
        d.reason = SPEED_ROUTE_REASON_SHORT_PROMPT;
    } else if (n_prefill_up == 0 && p.decode_only_fallback) {
        d.kind = SPEED_ROUTE_DECODE_ONLY;
        d.reason = SPEED_ROUTE_REASON_NO_PREFILL_NODE;
    } else if (n_prefill_up == 0) {
        d.reason = SPEED_ROUTE_REASON_PREFILL_UNAVAILABLE;
        d.ok = false;
    }
    return d;
}

const char *speed_route_kind_name(speed_route_kind_t kind) {
    switch (kind) {
    case SPEED_ROUTE_DISAGGREGATED: return "disaggregated";
    case SPEED_ROUTE_DECODE_ONLY: return "decode_only";
    default: return "unknown";
    }
}
