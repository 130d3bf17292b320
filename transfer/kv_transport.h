/* The KV transports and their names — "shm", "tcp" — owned by transfer/ (kv_transfer.h includes
 * this). A header and a library (speed_kv_transport, linking speed_common alone) of their own so
 * that what only names a transport, such as the cluster file's schema that the router links too,
 * needs neither UCX nor the transfer API.
 *
 * Thread-safety: everything here is pure and may be called from any thread.
 */
#ifndef SPEED_KV_TRANSPORT_H
#define SPEED_KV_TRANSPORT_H

#include "status.h"

/* What a descriptor asks of the endpoint that writes into it (kv_transfer.h, "Transports"). */
typedef enum {
    SPEED_KV_TRANSPORT_SHM = 0, /* UCX error mode NONE: shm / cma on one host, tcp otherwise */
    SPEED_KV_TRANSPORT_TCP = 1, /* UCX error mode PEER: tcp (or RDMA), detects peer failure */
} speed_kv_transport_t;

#define SPEED_KV_TRANSPORT_COUNT 2

/* The transports' names in enum order, NULL-terminated: "shm", "tcp" — what a cluster file's
 * ucx.transport and a KvDescriptor's transport field hold. A config ENUM field (config.h) takes
 * them as its enum_names, and its stored index is then the speed_kv_transport_t. */
extern const char *const speed_kv_transport_names[SPEED_KV_TRANSPORT_COUNT + 1];
/* "shm", "tcp"; "?" for a value outside the enum. Never NULL. */
const char *speed_kv_transport_name(speed_kv_transport_t transport);
/* One of speed_kv_transport_names (case-sensitive). Returns SPEED_OK, or
 * SPEED_ERR_INVALID_ARGUMENT for NULL or any other name (nothing logged, *transport_p
 * untouched). */
speed_status_t speed_kv_transport_parse(const char *name, speed_kv_transport_t *transport_p);

#endif /* SPEED_KV_TRANSPORT_H */
