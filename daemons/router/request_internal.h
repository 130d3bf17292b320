/* Internals shared by the request worker's files; server.c needs only router_internal.h.
 *
 *   request.c         the flow: tokenize, admit, route, Reserve / Prefill with retries
 *   request_relay.c   the Generate leg: decode events relayed to the client
 *   request_http.c    the client side: writes, the answer, errors, slot and count bookkeeping
 *   request_rpc.c     the node side: deadline-bounded calls, gRPC code classes, messages
 *   request_cancel.c  cancellation state, legs in flight, the Cancel RPC
 *   request_migrate.c a stream whose decode node died, re-issued on another path
 *   request_kv.c      KV-aware routing: the decode node by cached prefix and load
 *
 * Every function here runs on the request's worker thread unless it says otherwise.
 * Not an API: nothing outside router/ includes this. */
#ifndef SPEED_ROUTER_REQUEST_INTERNAL_H
#define SPEED_ROUTER_REQUEST_INTERNAL_H

#include "router_internal.h"
#include "speed_proto.h"

/* What the nodes are asked to compute for a request. ids is the prompt they compute: the
 * client's, then (after a migration) the tokens the request already generated. */
typedef struct {
    int32_t *ids; /* [n_ids] */
    size_t n_ids;
    size_t n_client;  /* the client's prompt: ids[0, n_client) */
    int64_t n_resume; /* ids[n_client, n_ids): tokens the request generated before */
    int32_t *owned;   /* ids, once a migration made them (the caller frees it) */
    int64_t max_tokens;
    Speed__V1__SamplingParams sampling; /* max_tokens stays the request's total */
    Speed__V1__SpeedParams speed;       /* the request's `speed` object */
    bool has_speed;
    int32_t cached_tokens; /* KV-aware routing: prompt tokens the picked decode node holds (hint) */
} plan_t;

/* ---- request_kv.c ------------------------------------------------------------------ */

/* KV-aware routing (router.kv_routing affinity; kv_route.h): picks the decode node for
 * pl->ids among the UP nodes not in tried[], by the prefix each holds (the prefix index) and
 * its load, counts the pick (speed_router_kv_routed_total{reason}, the pool's pending picks)
 * and sets pl->cached_tokens. The request holds the node it gets (speed_balance_pool_release).
 * Returns false when no node is eligible (as speed_balance_pool_pick's
 * SPEED_ERR_PEER_UNREACHABLE). */
bool speed_router_kv_pick(rtr_req_t *r, plan_t *pl, const size_t *tried, size_t n_tried, size_t *dnode_p);
/* The request completed on decode node dnode: its prompt's blocks go into that node's index
 * ahead of the node's events (speed_kv_index_anticipate). No-op with KV-aware routing off. */
void speed_router_kv_completed(rtr_req_t *r, const plan_t *pl, size_t dnode);
/* The request's leg on decode node dnode ended (answered, failed or cancelled there) after
 * n_generated tokens: until the node's next status, its load as the router sees it no longer
 * counts the request and the blocks of its prompt and answer (speed_balance_pool_finish). */
void speed_router_decode_finished(rtr_req_t *r, const plan_t *pl, size_t dnode, int64_t n_generated);

/* ---- request_cancel.c -------------------------------------------------------------- */

/* Queues a Cancel RPC for this request to one node, sent by the housekeeping thread (never
 * blocks the worker): for a node that may hold something of the request although the request
 * no longer has a leg there (a Reserve that failed late, a node a migration left). The worker
 * must hold the node (it picked it); the job holds it too until the Cancel is sent. */
void speed_router_req_cancel_later(rtr_req_t *r, speed_router_pool_id_t pool, size_t node);
/* True once the request was cancelled; *why_p (may be NULL) gets the cancel status. */
bool speed_router_req_cancelled(rtr_req_t *r, speed_status_t *why_p);
/* Records a leg the request is about to start, so that a cancel reaches it; false if the
 * request was cancelled (then the leg must not start). */
bool speed_router_req_leg_begin(rtr_req_t *r, speed_router_pool_id_t pool, size_t node);
/* The leg has ended (decode: the node no longer holds the request). */
void speed_router_req_leg_end(rtr_req_t *r, speed_router_pool_id_t pool);
/* The worker is done with these nodes of the pool, which it picked (speed_balance_pool_pick or
 * _take: each one once): no call, log line or Cancel of this request names them any more. A leg
 * still naming one of them is ended (a later cancel sends nothing there), then every pick is
 * released (speed_balance_pool_release): from then on a retired node's slot may be given to
 * another address (nodes.h). Every node a request picks is released this way, on every path. */
void speed_router_req_nodes_release(rtr_req_t *r, speed_router_pool_id_t pool, const size_t *nodes, size_t n);

/* ---- request_http.c ---------------------------------------------------------------- */

/* Every function below takes http_lock for the stream and `lock` for client_gone (never
 * both at once); the slot and the count are given back at most once. */

/* Writes bytes to the stream (streaming responses). SPEED_ERR_CANCELLED when the client is
 * gone (the request is then cancelled). */
speed_status_t speed_router_req_write(rtr_req_t *r, const char *data, size_t len);
/* Counts the request in speed_router_requests_total, once, just before its answer is
 * complete: a client that has its answer finds it counted in /metrics. */
void speed_router_req_count(rtr_req_t *r);
/* Gives back the admission slot and the active count, once, just before the answer's last
 * bytes go out. */
void speed_router_req_release_slot(rtr_req_t *r);
/* Writes the final SSE bytes, [DONE], after the slot is free. */
void speed_router_req_write_done(rtr_req_t *r);
/* Ends a stream normally (after [DONE]). */
void speed_router_req_close(rtr_req_t *r);
/* A complete answer (non-streaming success, or an error before anything was written);
 * retry_after_s > 0 adds Retry-After. */
void speed_router_req_respond(rtr_req_t *r, unsigned status, const char *body, size_t len, int retry_after_s);
/* Reports an error the way the response allows: an HTTP error with an OpenAI error object
 * while nothing was sent, else an SSE error event then [DONE]. */
void speed_router_req_fail(rtr_req_t *r, const speed_openai_error_t *err, int retry_after_s);
/* The same from a status (speed_openai_error_from_status); message may be NULL. */
void speed_router_req_fail_status(rtr_req_t *r, speed_status_t st, const char *message, int retry_after_s);
/* The error for a request that was cancelled by someone other than its client (timeout,
 * shutdown). */
void speed_router_req_fail_cancelled(rtr_req_t *r);

/* ---- request_rpc.c ----------------------------------------------------------------- */

typedef struct {
    speed_status_t st; /* speed_rpc_code_to_status(code), or a local error */
    int code;          /* gRPC code; -1 for a local failure */
    char message[256];
    ProtobufCMessage *reply; /* on success */
} call_result_t;

/* Milliseconds left before the request's deadline (>= 1 while it has not passed, 0 after). */
int64_t speed_router_req_remaining_ms(const rtr_req_t *r);
/* One unary call to a node, its timeout the time left before the deadline (at most cap_ms
 * when > 0). Blocks. On success (res->st SPEED_OK) res->reply is the unpacked reply, which
 * the caller frees with speed_proto_free; otherwise st, code and message say what failed. */
void speed_router_req_call_unary(rtr_req_t *r, speed_router_pool_id_t pool, size_t node, const char *method,
                                 const ProtobufCMessage *msg, int64_t cap_ms,
                                 const ProtobufCMessageDescriptor *reply_desc, call_result_t *res);
/* A failure that says the node itself is in trouble (not the request, not capacity). */
bool speed_router_code_is_node_failure(int code);
/* A failure the request itself caused: answered as such, never retried. */
bool speed_router_code_is_request_error(int code);
/* The request's `speed` object as SpeedParams (only the fields it gave). */
void speed_router_speed_params_fill(const speed_openai_speed_t *s, Speed__V1__SpeedParams *m);
/* The sampling settings of a request. s->stop borrows q->stop: q must outlive s. */
void speed_router_sampling_params_fill(const speed_openai_request_t *q, int64_t max_tokens,
                                       Speed__V1__SamplingParams *s);

/* ---- request_relay.c --------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
} relay_buf_t;

/* Logprob entries with their own token strings. */
typedef struct {
    speed_openai_token_logprob_t *v;
    size_t n, cap;
} relay_lps_t;

typedef enum {
    RELAY_DONE = 0, /* the request is answered (success or an error sent) */
    RELAY_RETRY,    /* the decode node failed before anything came: try another */
    RELAY_MIGRATE,  /* the decode node failed after tokens went out, nothing was sent about
                     * it and router.max_migrations allows another re-issue: the caller
                     * continues the stream from rl->gen_ids (request_migrate.c) */
} relay_result_t;

typedef struct {
    /* inputs */
    speed_router_pool_id_t pool; /* always decode */
    size_t node;
    bool decode_only;
    int64_t n_prompt;
    uint64_t kv_bytes_sent; /* from PrefillReply (disaggregated) */
    /* state */
    bool role_sent;
    int64_t n_generated;
    double t_last_token;
    double t_first_token; /* monotonic seconds; 0 until the first token */
    relay_buf_t text;     /* non-streaming: the whole text */
    size_t text_total;    /* bytes of text relayed so far (text_offset) */
    relay_lps_t lps;      /* non-streaming: all; streaming: this event's */
    /* migration (request_migrate.c) */
    int32_t *gen_ids; /* [n_gen_ids] every token id relayed so far, over all attempts */
    size_t n_gen_ids, cap_gen_ids;
    int64_t n_migrations; /* re-issues so far */
    bool migrating;       /* a re-issue is under way: counted ok at its first event */
    /* outcome */
    bool success;
    bool capacity; /* RELAY_RETRY because the node had no room */
    speed_openai_finish_t finish;
    speed_openai_usage_t usage;
} relay_t;

/* Runs the Generate stream gm on decode node rl->node, relaying tokens as they come.
 * RELAY_RETRY: nothing was sent, the caller may try another decode node. RELAY_MIGRATE:
 * tokens went out before the node failed; the caller re-issues the rest. RELAY_DONE with
 * rl->success: the caller ends the answer with speed_router_relay_answer. RELAY_DONE
 * without it: the client was answered with an error. */
relay_result_t speed_router_relay_generate(rtr_req_t *r, relay_t *rl, const Speed__V1__GenerateRequest *gm);
/* Sends the last chunks (streaming) or the whole object (non-streaming). */
void speed_router_relay_answer(rtr_req_t *r, relay_t *rl);
/* Frees what the relay accumulated (text, logprobs); rl may be used again after. */
void speed_router_relay_cleanup(relay_t *rl);
/* speed_router_migrations_total{outcome} += 1 (outcome "ok" or "failed"). */
void speed_router_count_migration(rtr_req_t *r, const char *outcome);

/* ---- request_migrate.c ------------------------------------------------------------- */

/* After RELAY_MIGRATE: lets go of the failed decode node, makes pl the re-issue (the
 * client's prompt + rl->gen_ids, resumed) and picks its route as for a fresh request of that
 * length (*kind_p). Returns true when the caller should run pl again (rl->migrating is set:
 * counted ok at the re-issue's first event, failed if it never gets one); false when the
 * client was answered with an error. */
bool speed_router_migrate(rtr_req_t *r, relay_t *rl, plan_t *pl, speed_route_kind_t *kind_p);

#endif /* SPEED_ROUTER_REQUEST_INTERNAL_H */
