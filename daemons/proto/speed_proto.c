#include "speed_proto.h"

#include "alloc.h"

static void *proto_alloc(void *user, size_t size) {
    (void)user;
    /* protobuf-c asks for 0 bytes for empty repeated fields on some paths; keep it non-NULL
     * so a 0-byte request is not mistaken for a failure. */
    return speed_malloc(size ? size : 1);
}

static void proto_free(void *user, void *ptr) {
    (void)user;
    speed_free(ptr);
}

static ProtobufCAllocator g_proto_allocator = {
    .alloc = proto_alloc,
    .free = proto_free,
    .allocator_data = NULL,
};

ProtobufCAllocator *speed_proto_allocator(void) { return &g_proto_allocator; }

speed_status_t speed_proto_pack(const ProtobufCMessage *msg, uint8_t **data_p, size_t *len_p) {
    if (!msg || !data_p || !len_p) return SPEED_ERR_INVALID_ARGUMENT;
    size_t len = protobuf_c_message_get_packed_size(msg);
    uint8_t *data = speed_malloc(len ? len : 1);
    if (!data) return SPEED_ERR_NO_MEMORY;
    size_t written = protobuf_c_message_pack(msg, data);
    SPEED_ASSERT(written == len);
    *data_p = data;
    *len_p = len;
    return SPEED_OK;
}

speed_status_t speed_proto_unpack(const ProtobufCMessageDescriptor *desc, const void *data, size_t len,
                                  ProtobufCMessage **msg_p) {
    if (msg_p) *msg_p = NULL;
    if (!desc || !msg_p || (!data && len)) return SPEED_ERR_INVALID_ARGUMENT;
    static const uint8_t empty[1];
    /* Count allocations to tell an out-of-memory failure from a parse failure: protobuf-c
     * returns NULL for both. */
    int64_t injected = speed_alloc_injected_failures();
    ProtobufCMessage *msg =
        protobuf_c_message_unpack(desc, &g_proto_allocator, len, data ? (const uint8_t *)data : empty);
    if (!msg) {
        return speed_alloc_injected_failures() != injected ? SPEED_ERR_NO_MEMORY : SPEED_ERR_PARSE;
    }
    *msg_p = msg;
    return SPEED_OK;
}

void speed_proto_free(ProtobufCMessage *msg) {
    if (msg) protobuf_c_message_free_unpacked(msg, &g_proto_allocator);
}
