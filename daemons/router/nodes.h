/* speed_router_nodes: the router's view of the cluster's nodes.
 *
 * Two pools (prefill, decode) of speed_balance_pool_t, one gRPC channel per node, and one
 * poller thread that asks every node for Node.Health and Node.Status each
 * status_interval_ms:
 *   - SERVING  → the node is UP (back up after a failure), its load snapshot is refreshed;
 *   - DRAINING → DRAINING (finishes its requests, gets no new ones);
 *   - STARTING, a refused or broken connection → DOWN;
 *   - no answer within the timeout → DOWN only at the SPEED_ROUTER_HEALTH_TIMEOUTS_DOWN-th such
 *     check in a row (one late answer from a loaded host is not a dead node).
 * A request that sees a node-level failure calls speed_router_nodes_fail: the node is DOWN at
 * once and stays so until a health reply says SERVING again.
 * The gauge speed_router_node_up{pool,node} is 1 while a node is UP; the counter
 * speed_router_node_down_total{pool,node} counts the times the poller took it out.
 *
 * Node addresses: replica i of a pool is host:grpc_port + i, or entry i of the pool's hosts
 * list:grpc_port + i (cluster config) — the static list. A pool with a discovery name
 * (`<pool>.discovery: dns:NAME`) is instead the A/AAAA records of NAME at grpc_port, re-resolved
 * every discovery_interval_ms by a discovery thread (a slow resolver never holds up the health
 * checks or a request). The poller applies each new set at the start of its next round:
 *   - an address that appeared gets a node (channel, gauges) that starts DOWN: it takes
 *     requests once a health check says SERVING (a node not up yet simply stays DOWN);
 *   - a node whose address vanished is retired: DRAINING as if it drained itself (no new
 *     requests; the requests on it finish while it answers, and migrate/retry as after any node
 *     failure if it dies); health checks keep it DRAINING or DOWN, never UP again;
 *   - a retired address that reappears is the same node again (its index, channel, gauges).
 * A failed or empty resolution keeps the last set (a resolver outage never empties a pool).
 *
 * Slot reuse. A pool holds at most discovery_max_nodes *live* addresses: a new address takes
 * the slot of a retired node once nothing can still name that slot's index, else a fresh slot,
 * else it waits (every slot is taken but a retired one is still held: it is placed at the first
 * round after its last holder lets go) or, when every slot is a live node, it is refused (counted,
 * warned). Reusing slot i destroys the old channel and makes the new one, resets the balance
 * entry (speed_balance_pool_replace: DOWN, zero load and counts), the prefix index's entry
 * (forgotten, renamed) and the per-node series: the old address's speed_router_node_up and
 * speed_router_node_down_total children are removed, the new address's made.
 * Why that is safe. Request threads read a slot (speed_router_nodes_address, _channel, _fail)
 * only for an index they hold: every pick or take of the balance pool counts a holder in the
 * same critical section (pool mutex) in which it sees the node UP, and the request releases it
 * when it is done with the node on every path (request_internal.h,
 * speed_router_req_nodes_release; a queued Cancel holds its node until sent). The poller is the
 * only writer of slots and reuses one only through speed_balance_pool_replace, which, under that
 * mutex, refuses an entry that is held or UP and leaves it DOWN: a retired node is never UP
 * (retirement makes it DRAINING, health checks keep it DRAINING or DOWN), so no pick or take can
 * land on it, and only the poller, after the slot is rebuilt, makes it UP again. So no reader
 * can hold the index while its fields change, and the mutex orders the rebuild before any later
 * pick's reads. TLS: a discovered node's certificate must name NAME (a DNS SAN), not its address.
 * Counters speed_router_discovery_nodes_added_total{pool}, ..._removed_total{pool},
 * speed_router_discovery_failures_total{pool}, speed_router_discovery_refused_total{pool}.
 *
 * KV-aware routing (params.kv_index set): each Status request to a decode node carries the
 * cursor of the router's prefix index (kv_index.h) and the reply's cache events are applied to
 * it (a reply saying more events wait is followed by up to SPEED_ROUTER_KV_EXTRA_READS more
 * Status calls in the same round). The index forgets a node the moment it is taken DOWN (a
 * failed health check or request), retired by discovery, or restarted (its journal instance
 * changed).
 *
 * Threading: every function may be called from any thread after create, except start, stop
 * and destroy (one owner). Channels are shared by all request threads (speed_rpc channels
 * are thread-safe).
 *
 * Memory: everything from speed_malloc; destroy frees it all.
 */
#ifndef SPEED_ROUTER_NODES_H
#define SPEED_ROUTER_NODES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "balance.h"
#include "kv_index.h"
#include "metrics.h"
#include "rpc.h"
#include "status.h"

/* Health checks in a row that must time out before the poller takes an UP node out. */
#define SPEED_ROUTER_HEALTH_TIMEOUTS_DOWN 2
/* Extra Status calls in one poll round to a decode node whose cache events did not fit one
 * reply (cache_events.max_per_reply); the rest comes at the next round. */
#define SPEED_ROUTER_KV_EXTRA_READS       4

typedef enum {
    SPEED_ROUTER_POOL_PREFILL = 0,
    SPEED_ROUTER_POOL_DECODE,
    SPEED_ROUTER_POOL_COUNT
} speed_router_pool_id_t;

/* "prefill" / "decode" (static; "unknown" outside the enum). */
const char *speed_router_pool_name(speed_router_pool_id_t pool);

typedef struct {
    const char *host;                               /* address every node listens on (copied) */
    const char *discovery[SPEED_ROUTER_POOL_COUNT]; /* the pool's "dns:NAME" (copied), NULL/"" = static list
                                                       (n_nodes, hosts); cluster <pool>.discovery */
    int64_t discovery_interval_ms;                  /* re-resolution period, >= 10 (discovery pools) */
    int64_t discovery_max_nodes;                    /* addresses a discovery pool holds, 1..256 */
    const char *hosts[SPEED_ROUTER_POOL_COUNT];     /* per replica instead ("a,b": replica i at entry i;
                                                   NULL / "" = host); cluster <pool>.hosts */
    int64_t n_nodes[SPEED_ROUTER_POOL_COUNT];       /* replicas; prefill may be 0 */
    int64_t grpc_port[SPEED_ROUTER_POOL_COUNT];     /* replica i listens on grpc_port + i */
    speed_balance_policy_t policy[SPEED_ROUTER_POOL_COUNT];
    int64_t status_interval_ms; /* poll period, >= 10 */
    speed_metrics_t *metrics;   /* registers speed_router_node_up; borrowed, must
                                            outlive the nodes object */
    const speed_rpc_tls_t *tls; /* mTLS to the nodes (PEM copied by gRPC); NULL = plaintext */
    /* KV-aware routing: the prefix index of the decode pool (kv_index.h) is made with these
     * (n_nodes_max and metrics are set here; NULL = no index), and fed by the poller when
     * kv_events is set (otherwise it stays empty: its metrics exist, at 0) */
    const speed_kv_index_params_t *kv_index;
    bool kv_events;
} speed_router_nodes_params_t;

typedef struct speed_router_nodes speed_router_nodes_t;

/* Creates the pools and the static nodes' channels (no connection is made yet). Every static
 * node starts UP; discovery pools start empty.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (no decode node and no decode discovery, NULL
 * arguments, more nodes than a pool holds, a discovery that is not dns:NAME) or
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_router_nodes_create(const speed_router_nodes_params_t *params, speed_router_nodes_t **nodes_p);

/* Resolves the discovery names once and polls every node once, synchronously (nodes that do
 * not answer SERVING are DOWN when it returns), then starts the poller thread (and the
 * discovery thread when a pool has a discovery name). Returns SPEED_OK or SPEED_ERR_INTERNAL
 * (a thread cannot start; logged). */
speed_status_t speed_router_nodes_start(speed_router_nodes_t *nodes);

/* Stops the poller and discovery threads (returns within one RPC timeout, or one resolution).
 * Idempotent. */
void speed_router_nodes_stop(speed_router_nodes_t *nodes);

/* Stops, then frees pools and channels. No RPC may be in flight on the channels. NULL ok. */
void speed_router_nodes_destroy(speed_router_nodes_t *nodes);

/* The pool (owned by nodes; never NULL for a valid id). */
speed_balance_pool_t *speed_router_nodes_pool(speed_router_nodes_t *nodes, speed_router_pool_id_t pool);
/* Slots the pool has filled (grows as discovery finds addresses, up to discovery_max_nodes;
 * retired nodes are counted until their slot is reused). */
size_t speed_router_nodes_count(const speed_router_nodes_t *nodes, speed_router_pool_id_t pool);
/* The node's channel / "host:port" address (owned by nodes), NULL when out of range. Only for
 * an index the caller holds (picked from the pool and not yet released), or on the poller: a
 * discovered slot may be given to another address once nobody holds it. */
speed_rpc_channel_t *speed_router_nodes_channel(speed_router_nodes_t *nodes, speed_router_pool_id_t pool, size_t index);
const char *speed_router_nodes_address(const speed_router_nodes_t *nodes, speed_router_pool_id_t pool, size_t index);

/* A request saw a node-level failure (unreachable, deadline, broken stream): DOWN now.
 * `request_id` (may be NULL) and `why` go to the log line. */
void speed_router_nodes_fail(speed_router_nodes_t *nodes, speed_router_pool_id_t pool, size_t index,
                             const char *request_id, const char *why);

/* Nodes UP in the pool (the decode count gates /health). */
size_t speed_router_nodes_n_up(speed_router_nodes_t *nodes, speed_router_pool_id_t pool);

/* The decode pool's prefix index (owned by nodes), NULL when KV-aware routing is off. */
speed_kv_index_t *speed_router_nodes_kv_index(speed_router_nodes_t *nodes);

/* Polls completed since start (tests and logs). */
uint64_t speed_router_nodes_polls(const speed_router_nodes_t *nodes);

/* Holders of every node of both pools (speed_balance_pool_holders summed): 0 once every request
 * and Cancel job has ended (the router checks it at destroy). 0 for NULL. */
int64_t speed_router_nodes_holders(const speed_router_nodes_t *nodes);

/* True when the node's address left its pool's discovery set (false for static nodes). */
bool speed_router_nodes_retired(const speed_router_nodes_t *nodes, speed_router_pool_id_t pool, size_t index);

#endif /* SPEED_ROUTER_NODES_H */
