/* Status code mapping (the one table between speed_status_t and gRPC codes) and byte
 * buffer helpers. */
#include <string.h>

#include "alloc.h"
#include "rpc_internal.h"

speed_rpc_code_t speed_rpc_code_from_status(speed_status_t status) {
    switch (status) {
    case SPEED_OK: return SPEED_RPC_OK;
    case SPEED_ERR_INVALID_ARGUMENT:
    case SPEED_ERR_PARSE:
    case SPEED_ERR_FORMAT: return SPEED_RPC_INVALID_ARGUMENT;
    case SPEED_ERR_NOT_FOUND: return SPEED_RPC_NOT_FOUND;
    case SPEED_ERR_UNSUPPORTED: return SPEED_RPC_UNIMPLEMENTED;
    case SPEED_ERR_TOO_LONG: return SPEED_RPC_OUT_OF_RANGE;
    case SPEED_ERR_CAPACITY:
    case SPEED_ERR_NO_MEMORY: return SPEED_RPC_RESOURCE_EXHAUSTED;
    case SPEED_ERR_CANCELLED: return SPEED_RPC_CANCELLED;
    case SPEED_ERR_TIMEOUT: return SPEED_RPC_DEADLINE_EXCEEDED;
    case SPEED_ERR_PEER_UNREACHABLE: return SPEED_RPC_UNAVAILABLE;
    case SPEED_ERR_TRANSFER: return SPEED_RPC_ABORTED;
    case SPEED_ERR_PEER_PROTOCOL:
    case SPEED_ERR_IO:
    case SPEED_ERR_DEVICE:
    case SPEED_ERR_INTERNAL: return SPEED_RPC_INTERNAL;
    }
    return SPEED_RPC_INTERNAL;
}

speed_status_t speed_rpc_code_to_status(int code) {
    switch (code) {
    case SPEED_RPC_OK: return SPEED_OK;
    case SPEED_RPC_CANCELLED: return SPEED_ERR_CANCELLED;
    case SPEED_RPC_INVALID_ARGUMENT:
    case SPEED_RPC_FAILED_PRECONDITION:
    case SPEED_RPC_ALREADY_EXISTS:
    case SPEED_RPC_PERMISSION_DENIED:
    case SPEED_RPC_UNAUTHENTICATED: return SPEED_ERR_INVALID_ARGUMENT;
    case SPEED_RPC_DEADLINE_EXCEEDED: return SPEED_ERR_TIMEOUT;
    case SPEED_RPC_NOT_FOUND: return SPEED_ERR_NOT_FOUND;
    case SPEED_RPC_RESOURCE_EXHAUSTED: return SPEED_ERR_CAPACITY;
    case SPEED_RPC_ABORTED: return SPEED_ERR_TRANSFER;
    case SPEED_RPC_OUT_OF_RANGE: return SPEED_ERR_TOO_LONG;
    case SPEED_RPC_UNIMPLEMENTED: return SPEED_ERR_UNSUPPORTED;
    case SPEED_RPC_UNAVAILABLE: return SPEED_ERR_PEER_UNREACHABLE;
    default: return SPEED_ERR_PEER_PROTOCOL;
    }
}

const char *speed_rpc_code_name(int code) {
    static const char *const names[] = {
        "OK",        "CANCELLED",       "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
        "NOT_FOUND", "ALREADY_EXISTS",  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED",   "OUT_OF_RANGE",    "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
        "DATA_LOSS", "UNAUTHENTICATED",
    };
    if (code < 0 || code >= (int)(sizeof names / sizeof names[0])) return "UNKNOWN_CODE";
    return names[code];
}

grpc_byte_buffer *speed_rpc_bb_from(const void *data, size_t len) {
    grpc_slice slice = grpc_slice_malloc(len);
    if (len) memcpy(GRPC_SLICE_START_PTR(slice), data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

speed_status_t speed_rpc_bb_copy(grpc_byte_buffer *bb, uint8_t **data_p, size_t *len_p) {
    *data_p = NULL;
    *len_p = 0;
    size_t len = grpc_byte_buffer_length(bb);
    if (len == 0) return SPEED_OK;
    uint8_t *data = speed_malloc(len);
    if (!data) return SPEED_ERR_NO_MEMORY;
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb)) {
        speed_free(data);
        return SPEED_ERR_PEER_PROTOCOL; /* compressed with an unknown algorithm */
    }
    size_t off = 0;
    grpc_slice slice;
    while (grpc_byte_buffer_reader_next(&reader, &slice)) {
        size_t n = GRPC_SLICE_LENGTH(slice);
        SPEED_ASSERT(off + n <= len);
        memcpy(data + off, GRPC_SLICE_START_PTR(slice), n);
        off += n;
        grpc_slice_unref(slice);
    }
    grpc_byte_buffer_reader_destroy(&reader);
    SPEED_ASSERT(off == len);
    *data_p = data;
    *len_p = len;
    return SPEED_OK;
}

gpr_timespec speed_rpc_deadline(int64_t ms) {
    if (ms < 0) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

char *speed_rpc_slice_strdup(grpc_slice slice) {
    return speed_strndup((const char *)GRPC_SLICE_START_PTR(slice), GRPC_SLICE_LENGTH(slice));
}
