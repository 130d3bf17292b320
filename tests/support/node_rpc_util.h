/* Talking to real node daemons over gRPC the way the router does (library speed_test_node):
 * a channel, a unary call with packing and unpacking, and a Generate stream read to its end.
 * For the tests that drive nodes directly (tests/integration/test_kv_plane.c).
 *
 * Thread-safety: every function is reentrant. Failures to pack or unpack are CHECK failures.
 */
#ifndef SPEED_NODE_RPC_UTIL_H
#define SPEED_NODE_RPC_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "rpc.h"
#include "speed_proto.h"

/* A channel to 127.0.0.1:port (destroy with speed_rpc_channel_destroy), presenting `tls` (the
 * caller's identity, e.g. cu_rpc_tls("router"); NULL = plaintext, for tls.insecure nodes). */
speed_rpc_channel_t *nr_channel(int port, const speed_rpc_tls_t *tls);

/* Packs msg, calls method (60 s deadline), unpacks an OK reply with desc into *reply_p (may be
 * NULL: not unpacked). err (may be NULL) gets the status message. Returns the gRPC code. */
int nr_call(speed_rpc_channel_t *ch, const char *method, const ProtobufCMessage *msg,
            const ProtobufCMessageDescriptor *desc, ProtobufCMessage **reply_p, char *err, size_t err_size);

/* What a Generate stream delivered. */
typedef struct {
    int n;
    int32_t ids[4096];
    float logprobs[4096];
    char text[16384]; /* the tokens' texts, concatenated (cut at the buffer's end) */
    size_t text_len;
    size_t text_end[4096]; /* text_len after token i */
    char finish[32];
    Speed__V1__Usage usage; /* the last usage an event carried */
    char error[256];        /* the last event's error text, or the stream's status message */
} nr_gen_t;

/* Runs Decode.Generate to its end. Returns the stream's gRPC code. */
int nr_generate(speed_rpc_channel_t *ch, const Speed__V1__GenerateRequest *req, nr_gen_t *out);

#endif /* SPEED_NODE_RPC_UTIL_H */
