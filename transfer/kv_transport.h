/* The KV transports and their names — "shm", "tcp" — owned by transfer/ (kv_transfer.h includes
 * this). A header and a library (speed_kv_transport, linking speed_common alone) of their own so
 * that what only names a transport, such as the cluster file's schema that the router links too,
 * needs neither UCX nor the transfer API.
 *
 * Thread-safety: everything here is pure and may be called from any thread.
 */
#ifndef SPEED_KV_TRANSPORT_H
#define SPEED_KV_TRANSPORT_H

#include "names.h"
#include "status.h"

/* What a descriptor asks of the endpoint that writes into it (kv_transfer.h, "Transports"). */
typedef enum {
    SPEED_KV_TRANSPORT_SHM = 0, /* UCX error mode NONE: shm / cma on one host, tcp otherwise */
    SPEED_KV_TRANSPORT_TCP = 1, /* UCX error mode PEER: tcp (or RDMA), detects peer failure */
} speed_kv_transport_t;

#define SPEED_KV_TRANSPORT_COUNT 2

/* speed_kv_transport_names ("shm", "tcp": a cluster file's ucx.transport, a KvDescriptor's
 * transport field), speed_kv_transport_name and speed_kv_transport_parse, as names.h says. */
SPEED_NAMES_DECLARE(speed_kv_transport, speed_kv_transport_t, SPEED_KV_TRANSPORT_COUNT);

#endif /* SPEED_KV_TRANSPORT_H */
