/* gRPC calls to node daemons for tests (node_rpc_util.h). */
#include "node_rpc_util.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "check.h"

speed_rpc_channel_t *nr_channel(int port, const speed_rpc_tls_t *tls) {
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", port);
    speed_rpc_channel_t *ch = NULL;
    speed_rpc_channel_params_t p = speed_rpc_channel_default_params();
    p.tls = tls;
    CHECK_INT_EQ(speed_rpc_channel_create(target, &p, &ch), SPEED_OK);
    return ch;
}

int nr_call(speed_rpc_channel_t *ch, const char *method, const ProtobufCMessage *msg,
            const ProtobufCMessageDescriptor *desc, ProtobufCMessage **reply_p, char *err, size_t err_size) {
    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_proto_pack(msg, &buf, &len), SPEED_OK);
    speed_rpc_reply_t reply = {0};
    speed_rpc_unary(ch, method, buf, len, 60000, &reply);
    speed_free(buf);
    int code = reply.code;
    if (err) snprintf(err, err_size, "%s", reply.message ? reply.message : "");
    if (code == SPEED_RPC_OK && reply_p)
        CHECK_INT_EQ(speed_proto_unpack(desc, reply.data, reply.len, reply_p), SPEED_OK);
    speed_rpc_reply_cleanup(&reply);
    return code;
}

int nr_generate(speed_rpc_channel_t *ch, const Speed__V1__GenerateRequest *req, nr_gen_t *out) {
    memset(out, 0, sizeof *out);
    uint8_t *buf = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_proto_pack(&req->base, &buf, &len), SPEED_OK);
    speed_rpc_stream_t *s = NULL;
    CHECK_INT_EQ(speed_rpc_stream_open(ch, SPEED_METHOD_DECODE_GENERATE, buf, len, 60000, &s), SPEED_OK);
    speed_free(buf);
    for (;;) {
        uint8_t *data = NULL;
        size_t dlen = 0;
        speed_rpc_next_t r = speed_rpc_stream_next(s, 60000, &data, &dlen);
        if (r == SPEED_RPC_NEXT_END) break;
        if (r == SPEED_RPC_NEXT_WAIT) {
            CHECK(!"Generate stream stalled for 60 s");
            break;
        }
        Speed__V1__GenerateEvent *ev = NULL;
        CHECK_INT_EQ(speed_proto_unpack(&speed__v1__generate_event__descriptor, data, dlen, (ProtobufCMessage **)&ev),
                     SPEED_OK);
        speed_free(data);
        if (!ev) break;
        for (size_t i = 0; i < ev->n_tokens && out->n < (int)(sizeof out->ids / sizeof out->ids[0]); i++) {
            const char *t = ev->tokens[i]->text ? ev->tokens[i]->text : "";
            size_t tl = strlen(t);
            if (out->text_len + tl >= sizeof out->text) tl = sizeof out->text - 1 - out->text_len;
            memcpy(out->text + out->text_len, t, tl);
            out->text_len += tl;
            out->text[out->text_len] = '\0';
            out->text_end[out->n] = out->text_len;
            out->ids[out->n] = ev->tokens[i]->id;
            out->logprobs[out->n++] = ev->tokens[i]->logprob;
        }
        if (ev->usage) {
            out->usage = *ev->usage;
            out->usage.base.unknown_fields = NULL; /* the event is freed below */
            out->usage.base.n_unknown_fields = 0;
        }
        if (ev->finish_reason && *ev->finish_reason) snprintf(out->finish, sizeof out->finish, "%s", ev->finish_reason);
        if (ev->error && *ev->error) snprintf(out->error, sizeof out->error, "%s", ev->error);
        speed_proto_free(&ev->base);
    }
    const char *msg = NULL;
    int code = speed_rpc_stream_status(s, &msg);
    if (code != SPEED_RPC_OK && msg && !out->error[0]) snprintf(out->error, sizeof out->error, "%s", msg);
    speed_rpc_stream_close(s);
    return code;
}
