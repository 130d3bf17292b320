/* speed_node conversions: protobuf messages (speed.proto) ↔ the engine's and the transfer's
 * types, for the prefill and decode daemons.
 *
 * They know nothing of a running node: what they need from one (the model's layer count, the
 * node's default depth) comes in as plain values, so they are tested on their own
 * (tests/daemons/node/test_node_proto.c).
 *
 * Requests are checked here only as far as the conversion needs (ranges the engine would not
 * catch with a clear message); the batcher checks the rest (stop strings, ids, capacity).
 *
 * Threading: every function is reentrant and touches only its arguments (and the thread's last
 * error text, common/log.h, through speed_sampling_params_validate and the descriptor checks).
 */
#ifndef SPEED_NODE_PROTO_H
#define SPEED_NODE_PROTO_H

#include <stddef.h>

#include "batcher.h"
#include "kv_transfer.h"
#include "speed_proto.h"

/* The depth a request states, unresolved: sp NULL or nothing set states nothing; a layer count
 * or a fraction (the prefill_layers oneof), anchors and tail each when present. */
speed_depth_request_t speed_node_depth_request_from_proto(const Speed__V1__SpeedParams *sp);

/* The depth a request asks for, resolved by speed_depth_resolve (depth.h: the one resolution the
 * router and speedctl use too) over node_depth (the node's resolved default, speed_batcher_depth)
 * for a model of n_layers: C in 1..n_layers. Returns SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT with
 * the resolver's reason in err (nothing logged: the message is the caller's reply). */
speed_status_t speed_node_depth_from_proto(const Speed__V1__SpeedParams *sp, int n_layers, speed_depth_t node_depth,
                                           speed_depth_t *depth_p, char *err, size_t err_size);

/* A migrated request (resume_tokens of its prompt are tokens it generated before, which ran
 * at full depth then): adds them to the resolved tail T, so the same positions run at full
 * depth again. Returns SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT with a message in err when
 * resume_tokens is negative or not below n_prompt (the prompt keeps at least one of its own
 * tokens) or the tail would overflow. */
speed_status_t speed_node_depth_resume(speed_depth_t *depth, int64_t resume_tokens, int64_t n_prompt, char *err,
                                       size_t err_size);

/* SamplingParams → batcher generation parameters. sp NULL: the sampler's defaults (seed 0
 * included), 16 tokens. top_p 0 reads as 1 (off); an unset seed is taken from the wall clock. The stop strings
 * point into sp (valid while sp lives). Returns SPEED_OK, or SPEED_ERR_INVALID_ARGUMENT with a
 * message in err: max_tokens < 1, or what speed_sampling_params_validate refuses (temperature
 * negative or not finite, top_k < 0, top_p outside (0, 1], top_logprobs outside
 * 0..SPEED_SAMPLER_MAX_TOP_LOGPROBS). */
speed_status_t speed_node_gen_from_proto(const Speed__V1__SamplingParams *sp, speed_batch_gen_t *gen_p, char *err,
                                         size_t err_size);

/* Token conversions. to_proto: the first min(n_top, t->n_top) alternatives; out's text and top
 * array point into t and storage, which must hold SPEED_SAMPLER_MAX_TOP_LOGPROBS entries and
 * pointers. from_proto: at most SPEED_SAMPLER_MAX_TOP_LOGPROBS alternatives; out->text NULL. */
void speed_node_token_to_proto(const speed_batch_token_t *t, int n_top, Speed__V1__Token *out,
                               Speed__V1__TopLogprob *storage, Speed__V1__TopLogprob **ptrs);
void speed_node_token_from_proto(const Speed__V1__Token *t, speed_batch_token_t *out);

/* KV descriptor, C struct → proto. `out` points into desc (valid while desc lives) and holds
 * allocations freed by speed_node_kv_desc_proto_cleanup; depth (NULL = zeros) fills the
 * resolved C, A, T. The cookie is not carried. Returns SPEED_OK or SPEED_ERR_NO_MEMORY (out
 * then needs no cleanup). */
speed_status_t speed_node_kv_desc_to_proto(const speed_kv_desc_t *desc, const speed_depth_t *depth,
                                           Speed__V1__KvDescriptor *out);
void speed_node_kv_desc_proto_cleanup(Speed__V1__KvDescriptor *out);

/* KV descriptor, proto → a new C struct (free with speed_kv_desc_destroy), checked with
 * speed_kv_desc_check. The lease counts from now (received_ns = this host's monotonic clock);
 * the nonce, when present, is 16 bytes; integrity needs a nonce. Returns SPEED_OK,
 * SPEED_ERR_INVALID_ARGUMENT (in NULL), SPEED_ERR_PEER_PROTOCOL (more regions, pools, layers,
 * blocks of a pool or address / rkey bytes than kv_transfer.h allows; a transport other than
 * "shm" or "tcp" (NULL reads as "shm"); an unknown dtype), SPEED_ERR_FORMAT (a nonce of another
 * length, integrity without a nonce, what speed_kv_desc_check refuses:
 * missing parts, inconsistent shape or counts, indices or blocks out of range) or
 * SPEED_ERR_NO_MEMORY. Errors are logged; *desc_p is untouched on error. */
speed_status_t speed_node_kv_desc_from_proto(const Speed__V1__KvDescriptor *in, speed_kv_desc_t **desc_p);

#endif /* SPEED_NODE_PROTO_H */
