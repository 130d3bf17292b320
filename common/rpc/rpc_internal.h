/* Private helpers shared by rpc_server.c and rpc_client.c. */
#ifndef SPEED_RPC_INTERNAL_H
#define SPEED_RPC_INTERNAL_H

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "rpc.h"

/* A byte buffer holding a copy of data[0, len). NULL only if grpc's allocator fails
 * (it aborts instead, so in practice never). */
grpc_byte_buffer *speed_rpc_bb_from(const void *data, size_t len);

/* Copy the contents of bb into one speed_malloc'd buffer (NULL for 0 bytes).
 * Returns SPEED_OK or SPEED_ERR_NO_MEMORY. Does not destroy bb. */
speed_status_t speed_rpc_bb_copy(grpc_byte_buffer *bb, uint8_t **data_p, size_t *len_p);

/* Absolute deadline `ms` from now on the monotonic clock; ms < 0 = infinitely far. */
gpr_timespec speed_rpc_deadline(int64_t ms);

/* Copy a slice into a speed_malloc'd NUL-terminated string (NULL on allocation failure). */
char *speed_rpc_slice_strdup(grpc_slice slice);

#endif /* SPEED_RPC_INTERNAL_H */
