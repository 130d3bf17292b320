/* Fuzzes every protobuf message a process of the cluster unpacks from a peer: the requests a
 * node serves (Decode.Reserve / Generate / Cancel, Prefill.Prefill / Cancel, Node.Drain) and
 * the replies and stream events the router reads back. Each is unpacked with speed_proto_unpack
 * (daemons/proto, protobuf-c) and then converted as its handler does (daemons/node/node_proto.c:
 * depth, sampling, first token, KV descriptor). Invariants: a message that unpacked packs again,
 * and if that unpacks, it packs to the same bytes (canonical after one round); conversions that
 * succeed give values in the ranges node_proto.h states.
 *
 * Input: byte 0 picks the message (modulo the table below); the rest is its wire bytes. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "depth.h"
#include "fuzz_util.h"
#include "kv_transfer.h"
#include "node_proto.h"
#include "speed_proto.h"

#define N_LAYERS 32

static const ProtobufCMessageDescriptor *const k_messages[] = {
    &speed__v1__reserve_request__descriptor,  &speed__v1__generate_request__descriptor,
    &speed__v1__cancel_request__descriptor,   &speed__v1__prefill_request__descriptor,
    &speed__v1__drain_request__descriptor,    &speed__v1__reserve_reply__descriptor,
    &speed__v1__prefill_reply__descriptor,    &speed__v1__generate_event__descriptor,
    &speed__v1__health_reply__descriptor,     &speed__v1__node_status__descriptor,
    &speed__v1__cancel_reply__descriptor,     &speed__v1__drain_reply__descriptor,
};
#define N_MESSAGES (sizeof k_messages / sizeof k_messages[0])

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

static void check_depth(const Speed__V1__SpeedParams *sp) {
    speed_depth_t node = {.prefill_layers = 16, .anchors = 1, .tail = 1}, d;
    char err[256];
    if (speed_node_depth_from_proto(sp, N_LAYERS, node, &d, err, sizeof err) == SPEED_OK) {
        FZ_ASSERT(d.prefill_layers >= 1 && d.prefill_layers <= N_LAYERS);
        FZ_ASSERT(d.anchors >= 0 && d.tail >= 1);
    } else {
        FZ_ASSERT(memchr(err, 0, sizeof err));
    }
}

static void check_sampling(const Speed__V1__SamplingParams *sp) {
    speed_batch_gen_t g;
    char err[256];
    if (speed_node_gen_from_proto(sp, &g, err, sizeof err) != SPEED_OK) return;
    FZ_ASSERT(g.max_tokens >= 1);
    FZ_ASSERT(isfinite(g.sampling.temperature) && g.sampling.temperature >= 0);
    FZ_ASSERT(g.sampling.top_k >= 0);
    FZ_ASSERT(g.sampling.top_p > 0 && g.sampling.top_p <= 1);
    FZ_ASSERT(g.sampling.n_top_logprobs >= 0 && g.sampling.n_top_logprobs <= SPEED_SAMPLER_MAX_TOP_LOGPROBS);
    for (size_t i = 0; i < g.n_stop; i++) FZ_ASSERT(g.stop[i]);
}

static void check_token(const Speed__V1__Token *t) {
    speed_batch_token_t out;
    speed_node_token_from_proto(t, &out);
    FZ_ASSERT(out.n_top >= 0 && out.n_top <= SPEED_SAMPLER_MAX_TOP_LOGPROBS);
}

static void check_kv(const Speed__V1__KvDescriptor *kv) {
    speed_kv_desc_t *d = NULL;
    if (speed_node_kv_desc_from_proto(kv, &d) != SPEED_OK) return;
    FZ_ASSERT(speed_kv_desc_check(d) == SPEED_OK); /* from_proto promises a checked descriptor */
    speed_kv_desc_destroy(d);
}

/* Packs msg, unpacks the bytes, packs again: both encodings must be identical. */
static void check_round_trip(const ProtobufCMessage *msg) {
    uint8_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    if (speed_proto_pack(msg, &a, &na) != SPEED_OK) return;
    ProtobufCMessage *again = NULL;
    /* protobuf-c keeps unknown fields as they came, field number 0 included, and packs them
     * back; its unpack then refuses that number. Nothing of ours re-sends a peer's unknown
     * fields as ours (a refused unpack is a clean error), so only a success is compared. */
    if (speed_proto_unpack(msg->descriptor, a, na, &again) != SPEED_OK) {
        speed_free(a);
        return;
    }
    if (speed_proto_pack(again, &b, &nb) == SPEED_OK) {
        FZ_ASSERT(na == nb && (na == 0 || memcmp(a, b, na) == 0));
        speed_free(b);
    }
    speed_proto_free(again);
    speed_free(a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const ProtobufCMessageDescriptor *desc = k_messages[data[0] % N_MESSAGES];
    ProtobufCMessage *msg = NULL;
    if (speed_proto_unpack(desc, data + 1, size - 1, &msg) != SPEED_OK) {
        FZ_ASSERT(!msg);
        return 0;
    }
    FZ_ASSERT(msg && msg->descriptor == desc);
    if (desc == &speed__v1__reserve_request__descriptor) {
        Speed__V1__ReserveRequest *r = (Speed__V1__ReserveRequest *)msg;
        check_depth(r->speed);
    } else if (desc == &speed__v1__generate_request__descriptor) {
        Speed__V1__GenerateRequest *r = (Speed__V1__GenerateRequest *)msg;
        check_depth(r->speed);
        check_sampling(r->sampling);
        if (r->first) check_token(r->first);
    } else if (desc == &speed__v1__prefill_request__descriptor) {
        Speed__V1__PrefillRequest *r = (Speed__V1__PrefillRequest *)msg;
        check_depth(r->speed);
        check_sampling(r->sampling);
        if (r->kv) check_kv(r->kv);
    } else if (desc == &speed__v1__reserve_reply__descriptor) {
        Speed__V1__ReserveReply *r = (Speed__V1__ReserveReply *)msg;
        if (r->kv) check_kv(r->kv);
    } else if (desc == &speed__v1__prefill_reply__descriptor) {
        Speed__V1__PrefillReply *r = (Speed__V1__PrefillReply *)msg;
        if (r->first) check_token(r->first);
    } else if (desc == &speed__v1__generate_event__descriptor) {
        Speed__V1__GenerateEvent *r = (Speed__V1__GenerateEvent *)msg;
        for (size_t i = 0; i < r->n_tokens; i++) check_token(r->tokens[i]);
    }
    check_round_trip(msg);
    speed_proto_free(msg);
    return 0;
}
