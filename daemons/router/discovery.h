/* speed_router_discovery: the addresses behind a pool's discovery name.
 *
 * A pool configured with `<pool>.discovery: dns:NAME` is the set of A/AAAA records of NAME (in
 * Kubernetes a headless Service: one record per ready pod), each at the pool's grpc_port.
 * Resolution goes through getaddrinfo, so /etc/hosts, DNS and any NSS source count alike (with
 * glibc's `multi on`, every /etc/hosts line of a name is returned).
 *
 * Threading: reentrant (getaddrinfo is); blocks for as long as the resolver does.
 */
#ifndef SPEED_ROUTER_DISCOVERY_H
#define SPEED_ROUTER_DISCOVERY_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* "192.0.2.7:8300" / "[2001:db8::7]:8300": a gRPC target. */
#define SPEED_ROUTER_ADDRESS_MAX 64

/* Resolves `name` into up to n_max distinct "address:port" targets, in the resolver's order
 * (duplicates, e.g. one per socket type, dropped). *n_p is set on every return.
 * Returns SPEED_OK with at least one address; SPEED_ERR_NOT_FOUND (the name has no address:
 * NXDOMAIN, no such /etc/hosts line); SPEED_ERR_PEER_UNREACHABLE (the resolver failed or timed
 * out); SPEED_ERR_INVALID_ARGUMENT (NULL, empty name, port out of 1..65535); SPEED_ERR_CAPACITY
 * (more than n_max addresses: the first n_max are in addrs, *n_p = n_max). `why` (may be NULL
 * with why_size 0) gets the resolver's message on failure. */
speed_status_t speed_router_discovery_resolve(const char *name, int64_t port, char (*addrs)[SPEED_ROUTER_ADDRESS_MAX],
                                              size_t n_max, size_t *n_p, char *why, size_t why_size);

#endif /* SPEED_ROUTER_DISCOVERY_H */
