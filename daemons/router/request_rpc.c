/* The node side of a request: one unary call bounded by the request's deadline, the classes
 * of gRPC codes that decide retries, and the SamplingParams / SpeedParams messages built
 * from the OpenAI request. */
#include "request_internal.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"

/* Milliseconds left before the request's deadline (>= 1 while it has not passed, 0 after). */
int64_t speed_router_req_remaining_ms(const rtr_req_t *r) {
    int64_t left = r->deadline_ms - speed_clock_mono_ms();
    return left > 0 ? left : 0;
}

void speed_router_req_call_unary(rtr_req_t *r, speed_router_pool_id_t pool, size_t node, const char *method,
                                 const ProtobufCMessage *msg, int64_t cap_ms,
                                 const ProtobufCMessageDescriptor *reply_desc, call_result_t *res) {
    memset(res, 0, sizeof(*res));
    res->code = -1;
    int64_t timeout = speed_router_req_remaining_ms(r);
    if (timeout <= 0) {
        res->st = SPEED_ERR_TIMEOUT;
        snprintf(res->message, sizeof res->message, "request deadline passed");
        return;
    }
    if (cap_ms > 0 && timeout > cap_ms) timeout = cap_ms;
    uint8_t *buf = NULL;
    size_t len = 0;
    res->st = speed_proto_pack(msg, &buf, &len);
    if (res->st != SPEED_OK) {
        snprintf(res->message, sizeof res->message, "out of memory");
        return;
    }
    speed_rpc_reply_t reply = {0};
    res->st = speed_rpc_unary(speed_router_nodes_channel(r->rt->nodes, pool, node), method, buf, len, timeout, &reply);
    speed_free(buf);
    res->code = reply.code;
    snprintf(res->message, sizeof res->message, "%s", reply.message ? reply.message : "");
    if (res->st == SPEED_OK) {
        speed_status_t ust = speed_proto_unpack(reply_desc, reply.data, reply.len, &res->reply);
        if (ust != SPEED_OK) {
            res->st = ust == SPEED_ERR_NO_MEMORY ? ust : SPEED_ERR_PEER_PROTOCOL;
            res->code = ust == SPEED_ERR_NO_MEMORY ? -1 : SPEED_RPC_INTERNAL;
            snprintf(res->message, sizeof res->message, "malformed reply");
        }
    } else if (res->st == SPEED_ERR_NO_MEMORY && reply.code == SPEED_RPC_OK) {
        res->code = -1;
    }
    speed_rpc_reply_cleanup(&reply);
}

/* A failure that says the node itself is in trouble (not the request, not capacity). */
bool speed_router_code_is_node_failure(int code) {
    switch (code) {
    case SPEED_RPC_UNAVAILABLE:
    case SPEED_RPC_DEADLINE_EXCEEDED:
    case SPEED_RPC_INTERNAL:
    case SPEED_RPC_UNKNOWN:
    case SPEED_RPC_DATA_LOSS:
    case SPEED_RPC_UNIMPLEMENTED: return true;
    default: return false;
    }
}

/* A failure the request itself caused: answered as such, never retried. */
bool speed_router_code_is_request_error(int code) {
    return code == SPEED_RPC_INVALID_ARGUMENT || code == SPEED_RPC_FAILED_PRECONDITION ||
           code == SPEED_RPC_OUT_OF_RANGE || code == SPEED_RPC_ALREADY_EXISTS;
}

void speed_router_speed_params_fill(const speed_openai_speed_t *s, Speed__V1__SpeedParams *m) {
    /* The depth the router resolved, stated whole: a count, never a fraction, so no node has
     * to round anything and every leg runs at the C the client was told about. */
    if (!s->present) return;
    m->prefill_layers_opt_case = SPEED__V1__SPEED_PARAMS__PREFILL_LAYERS_OPT_PREFILL_LAYERS;
    m->prefill_layers = s->resolved.prefill_layers;
    m->anchors_opt_case = SPEED__V1__SPEED_PARAMS__ANCHORS_OPT_ANCHORS;
    m->anchors = s->resolved.anchors;
    m->tail_opt_case = SPEED__V1__SPEED_PARAMS__TAIL_OPT_TAIL;
    m->tail = s->resolved.tail;
}

void speed_router_sampling_params_fill(const speed_openai_request_t *q, int64_t max_tokens,
                                       Speed__V1__SamplingParams *s) {
    Speed__V1__SamplingParams init = SPEED__V1__SAMPLING_PARAMS__INIT;
    *s = init;
    s->max_tokens = max_tokens > INT32_MAX ? INT32_MAX : (int32_t)max_tokens;
    s->temperature = (float)q->temperature;
    s->top_p = (float)q->top_p;
    s->top_k = q->top_k;
    if (q->has_seed) {
        s->seed_opt_case = SPEED__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        s->seed = (uint64_t)q->seed;
    }
    s->logprobs = q->logprobs || q->top_logprobs > 0;
    s->top_logprobs = q->top_logprobs;
    s->ignore_eos = q->ignore_eos;
    s->n_stop = q->n_stop;
    s->stop = (char **)q->stop;
}
