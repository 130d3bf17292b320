#include "status.h"

#include <stdio.h>
#include <stdlib.h>

const char *speed_status_string(speed_status_t status) {
    switch (status) {
    case SPEED_OK: return "ok";
    case SPEED_ERR_INVALID_ARGUMENT: return "invalid argument";
    case SPEED_ERR_NOT_FOUND: return "not found";
    case SPEED_ERR_PARSE: return "parse error";
    case SPEED_ERR_FORMAT: return "format error";
    case SPEED_ERR_UNSUPPORTED: return "unsupported";
    case SPEED_ERR_TOO_LONG: return "too long";
    case SPEED_ERR_CAPACITY: return "out of capacity";
    case SPEED_ERR_CANCELLED: return "cancelled";
    case SPEED_ERR_TIMEOUT: return "timed out";
    case SPEED_ERR_NO_MEMORY: return "out of memory";
    case SPEED_ERR_PEER_UNREACHABLE: return "peer unreachable";
    case SPEED_ERR_PEER_PROTOCOL: return "peer protocol error";
    case SPEED_ERR_TRANSFER: return "transfer failed";
    case SPEED_ERR_IO: return "i/o error";
    case SPEED_ERR_DEVICE: return "device error";
    case SPEED_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

bool speed_status_is_retryable(speed_status_t status) {
    return status == SPEED_ERR_CAPACITY || status == SPEED_ERR_TIMEOUT || (status <= -100 && status > -200);
}

_Noreturn void speed_assert_fail(const char *expr, const char *file, int line) {
    fprintf(stderr, "speedserve: assertion failed: %s (%s:%d)\n", expr, file, line);
    fflush(stderr);
    abort();
}
