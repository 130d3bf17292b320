/* speed_balance: node pools with balancing policies, and the router's admission limiter.
 *
 * A pool (speed_balance_pool_t) is one set of interchangeable nodes: the router keeps one
 * for prefill nodes and one for decode nodes, each with its own policy.
 *   - round robin: the next eligible node after the last pick;
 *   - least loaded: the lowest score, score = running + waiting (from the node's last
 *     status snapshot) + picks made since that snapshot (so a burst between two
 *     snapshots does not all land on one node); ties go to the lower KV usage, then
 *     rotate.
 * Eligible = state UP and not in the caller's exclude set (the nodes that already failed
 * this request). A node goes DOWN after a failure (speed_balance_pool_mark_down) and UP
 * again when a health check succeeds (speed_balance_pool_mark_up); DRAINING nodes take
 * no new requests.
 *
 * The admission limiter (speed_admission_t) bounds the requests in flight and the ones
 * waiting for a slot: a request beyond the waiting bound is refused at once (→ 429 with
 * Retry-After), one that waits longer than the timeout gives up (→ 503). Slots are handed
 * to waiters in arrival order.
 *
 * Holders. An index a caller picked (speed_balance_pool_pick, speed_balance_pool_take) is
 * held by that caller until it calls speed_balance_pool_release; a caller that already holds an
 * index may lend it to another (speed_balance_pool_hold, e.g. a Cancel queued for a background
 * thread). A pool whose nodes come and go (discovery, nodes.h) gives a retired entry to a new
 * address with speed_balance_pool_replace, which refuses while anyone holds it: the count is
 * taken in the same critical section as the pick, so "not UP and nobody holds it" can only
 * change again through the caller of replace (only an UP node is picked or taken).
 *
 * Threading: every function may be called from any number of threads at once (one mutex
 * per object; picks are O(n_nodes)). speed_admission_acquire blocks the calling thread.
 * Destroy functions must not race with other calls on the same object.
 *
 * Memory: objects come from speed_malloc; node addresses are copied.
 */
#ifndef SPEED_ROUTER_BALANCE_H
#define SPEED_ROUTER_BALANCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* ---- pools ------------------------------------------------------------------------- */

/* Users name a policy in the cluster file (router.prefill_policy: round-robin |
 * least-loaded), whose schema (cluster_config.h) holds the names; the router maps its choice
 * to these. */
typedef enum {
    SPEED_BALANCE_ROUND_ROBIN = 0,
    SPEED_BALANCE_LEAST_LOADED,
} speed_balance_policy_t;

typedef enum {
    SPEED_NODE_UP = 0,   /* takes requests */
    SPEED_NODE_DOWN,     /* failed; back UP after a successful health check */
    SPEED_NODE_DRAINING, /* finishing its requests, takes no new ones */
} speed_node_state_t;

/* A node's status snapshot (from its Health reply). */
typedef struct {
    int32_t n_running; /* requests being computed */
    int32_t n_waiting; /* requests queued on the node */
    double kv_usage;   /* KV cache usage ratio [0, 1] */
    /* KV blocks held by its requests (NodeStatus.active_blocks): KV-aware routing's load */
    int64_t active_blocks;
} speed_node_load_t;

typedef struct {
    speed_balance_policy_t policy;
    size_t n_nodes_max; /* capacity of the pool (entries are never removed, only replaced), >= 1 */
} speed_balance_pool_params_t;

/* ROUND_ROBIN, 64 nodes. */
speed_balance_pool_params_t speed_balance_pool_default_params(void);

typedef struct speed_balance_pool speed_balance_pool_t;

/* name (e.g. "decode") is copied; used in log lines. params may be NULL (defaults).
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (NULL pool_p, n_nodes_max 0, unknown
 * policy) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_balance_pool_create(const char *name, const speed_balance_pool_params_t *params,
                                         speed_balance_pool_t **pool_p);
void speed_balance_pool_destroy(speed_balance_pool_t *pool); /* NULL ok */

/* Adds a node (state UP, load zero); its index (0, 1, ...) is stable for the pool's life.
 * index_p may be NULL. Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (NULL or empty
 * address, or an address already in the pool), SPEED_ERR_CAPACITY (n_nodes_max reached)
 * or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_balance_pool_add(speed_balance_pool_t *pool, const char *address, size_t *index_p);

/* speed_balance_pool_add for a node that must pass a health check before it takes requests:
 * it starts DOWN (a node found by discovery). Same returns. */
speed_status_t speed_balance_pool_add_down(speed_balance_pool_t *pool, const char *address, size_t *index_p);

size_t speed_balance_pool_size(const speed_balance_pool_t *pool);
/* The address given to add (owned by the pool, valid until destroy or until the entry is
 * replaced: read it only while holding the index); NULL if out of range. */
const char *speed_balance_pool_address(const speed_balance_pool_t *pool, size_t index);

/* The following return SPEED_OK or SPEED_ERR_INVALID_ARGUMENT (index out of range). */
/* Replaces the node's snapshot and forgets the picks counted since the previous one. */
speed_status_t speed_balance_pool_set_load(speed_balance_pool_t *pool, size_t index, const speed_node_load_t *load);
/* After a failure (logged at warn on the UP → DOWN transition). */
speed_status_t speed_balance_pool_mark_down(speed_balance_pool_t *pool, size_t index);
/* speed_balance_pool_mark_down that says whether this call took the node out (UP or DRAINING →
 * DOWN): of several threads that see the same node fail, exactly one gets true, so the one
 * counting it counts each outage once. False for an index out of range. */
bool speed_balance_pool_take_down(speed_balance_pool_t *pool, size_t index);
/* After a successful health check: DOWN → UP (a DRAINING node stays DRAINING). */
speed_status_t speed_balance_pool_mark_up(speed_balance_pool_t *pool, size_t index);
/* draining true: → DRAINING; false: DRAINING → UP. */
speed_status_t speed_balance_pool_set_draining(speed_balance_pool_t *pool, size_t index, bool draining);
speed_status_t speed_balance_pool_state(const speed_balance_pool_t *pool, size_t index, speed_node_state_t *state_p);
/* Picks made on the node since its last snapshot. */
speed_status_t speed_balance_pool_pending(const speed_balance_pool_t *pool, size_t index, int64_t *pending_p);

/* Picks a node by the pool's policy, skipping nodes not UP and the n_exclude indices in
 * exclude (may be NULL when n_exclude is 0); the caller holds the index it gets until it
 * calls speed_balance_pool_release. Returns SPEED_OK with *index_p set,
 * SPEED_ERR_PEER_UNREACHABLE when no node is eligible (→ 503), or
 * SPEED_ERR_INVALID_ARGUMENT (NULL arguments). */
speed_status_t speed_balance_pool_pick(speed_balance_pool_t *pool, const size_t *exclude, size_t n_exclude,
                                       size_t *index_p);
/* A node a caller may pick (speed_balance_pool_candidates). */
typedef struct {
    size_t index;
    speed_node_load_t load;  /* its last snapshot */
    int64_t pending;         /* picks since that snapshot */
    int64_t finished;        /* requests that ended there since that snapshot (speed_balance_pool_finish) */
    int64_t finished_blocks; /* and the KV blocks they held */
} speed_balance_candidate_t;

/* For a caller that scores nodes itself (KV-aware routing, kv_route.h): the eligible nodes
 * (UP, not excluded), at most n_out_max, in the pool's rotation order (the order a tie should
 * be broken in). Returns how many were written. The caller then commits its choice with
 * speed_balance_pool_take. */
size_t speed_balance_pool_candidates(speed_balance_pool_t *pool, const size_t *exclude, size_t n_exclude,
                                     speed_balance_candidate_t *out, size_t n_out_max);
/* Counts a pick of the node made outside speed_balance_pool_pick (its pending picks + 1) and
 * moves the rotation past it; the caller holds the index until speed_balance_pool_release.
 * Returns SPEED_OK, SPEED_ERR_PEER_UNREACHABLE (the node is no longer UP: it went out after
 * speed_balance_pool_candidates listed it; nothing is taken, choose again) or
 * SPEED_ERR_INVALID_ARGUMENT (index out of range). */
speed_status_t speed_balance_pool_take(speed_balance_pool_t *pool, size_t index);
/* One more holder of an index the caller holds already (it lends it to a job that may outlive
 * the caller's own hold). Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT (out of range). */
speed_status_t speed_balance_pool_hold(speed_balance_pool_t *pool, size_t index);
/* Ends one pick, take or hold of the index. A release without one is a broken invariant
 * (SPEED_ASSERT). An index out of range is ignored. */
void speed_balance_pool_release(speed_balance_pool_t *pool, size_t index);
/* Holders of the index now (0 out of range): tests and logs. */
int64_t speed_balance_pool_holders(const speed_balance_pool_t *pool, size_t index);
/* Gives entry `index` to a new address (copied): state DOWN (a health check brings it UP), load,
 * pending and finished counts zero, the old address string freed. Only for an entry nobody holds
 * and that is not UP (a node retired by discovery: DRAINING or DOWN). Returns SPEED_OK,
 * SPEED_ERR_CAPACITY (the entry is held or UP: nothing changed, try again later),
 * SPEED_ERR_INVALID_ARGUMENT (NULL / empty address, index out of range, or the address is
 * another entry's) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_balance_pool_replace(speed_balance_pool_t *pool, size_t index, const char *address);
/* A status request to the node is about to leave: the snapshot it brings back
 * (speed_balance_pool_set_load) already reflects the ends counted so far, not those counted
 * while it is out, which keep counting until the next one. Without it, set_load forgets every
 * end. Thread-safe; an index out of range is ignored. */
void speed_balance_pool_poll_begin(speed_balance_pool_t *pool, size_t index);
/* A request the router sent to the node ended (its answer complete, or cancelled there) and
 * freed about `blocks` KV blocks. Until the node's next snapshot its load counts that much less:
 * least-loaded picks subtract the finished requests, KV-aware routing (request_kv.c) their
 * blocks. Without it a client's next turn, sent at once, finds the node holding its prefix
 * still loaded by the previous turn (the snapshot is up to router.status_interval_ms old) and
 * goes elsewhere. An end counted while a status request is out (speed_balance_pool_poll_begin)
 * outlives the snapshot it brings: the node may have taken that snapshot before the end; when it
 * took it after, the node looks one request lighter until the next snapshot. Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT (index out of
 * range, blocks < 0). Thread-safe. */
speed_status_t speed_balance_pool_finish(speed_balance_pool_t *pool, size_t index, int64_t blocks);

/* Number of UP nodes. */
size_t speed_balance_pool_n_up(const speed_balance_pool_t *pool);

/* ---- admission --------------------------------------------------------------------- */

typedef struct {
    int32_t max_in_flight;   /* requests holding a slot, >= 1 */
    int32_t max_waiting;     /* requests queued for a slot, >= 0 (0 = refuse at once) */
    int64_t wait_timeout_ms; /* longest wait in the queue, >= 0 */
    int32_t retry_after_s;   /* Retry-After seconds to send with a 429, >= 1 */
} speed_admission_params_t;

/* 256 in flight, 1024 waiting, 30 s timeout, Retry-After 1 s. */
speed_admission_params_t speed_admission_default_params(void);

typedef struct speed_admission speed_admission_t;

/* params may be NULL (defaults). Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (bounds
 * above violated) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_admission_create(const speed_admission_params_t *params, speed_admission_t **adm_p);
/* No thread may be waiting in acquire (call speed_admission_close and let them return
 * first). NULL ok. */
void speed_admission_destroy(speed_admission_t *adm);

/* Takes a slot, waiting in FIFO order if all are busy. Blocks up to wait_timeout_ms.
 * Returns SPEED_OK (the caller holds a slot and must release it), SPEED_ERR_CAPACITY
 * (the waiting queue is full: refused at once, → 429 with Retry-After),
 * SPEED_ERR_TIMEOUT (waited wait_timeout_ms, → 503), SPEED_ERR_CANCELLED (the limiter
 * was closed) or SPEED_ERR_INVALID_ARGUMENT (NULL). */
speed_status_t speed_admission_acquire(speed_admission_t *adm);
/* Returns a slot: handed straight to the oldest waiter if there is one. */
void speed_admission_release(speed_admission_t *adm);
/* Refuses new requests and wakes every waiter with SPEED_ERR_CANCELLED (shutdown). Held
 * slots are unaffected and must still be released. */
void speed_admission_close(speed_admission_t *adm);

int32_t speed_admission_in_flight(speed_admission_t *adm);
int32_t speed_admission_waiting(speed_admission_t *adm);
int32_t speed_admission_retry_after(const speed_admission_t *adm); /* seconds */

#endif /* SPEED_ROUTER_BALANCE_H */
