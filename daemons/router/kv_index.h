/* speed_kv_index: the router's prefix index for KV-aware routing (docs/router.md#kv-aware-routing).
 *
 * Per decode node (by its index in the decode pool), the set of block hashes (block_hash.h) the
 * node holds, as its cache events said (daemons/node/cache_journal.h), and the cursor of the
 * router's next read of its journal (instance, next_seq). The status poller (nodes.c) feeds it
 * with each poll's CacheEvents (speed_kv_index_apply); request workers ask how many leading
 * blocks of a prompt each node holds (speed_kv_index_overlap).
 *
 * What the index forgets, and when (a node's hashes are only hints: a wrong hint routes a request
 * to a node that computes more than expected, never to a wrong answer):
 *   - everything of a node when it goes down (a failed poll or request), is retired by discovery,
 *     or restarts (its journal's instance changed): speed_kv_index_forget; its cursor goes back
 *     to 0 so the next read is a snapshot;
 *   - a node's whole set when a snapshot arrives (replaced by the snapshot's hashes).
 * Bounds: at most max_blocks hashes per node (router.kv_index_max_blocks); hashes beyond that
 * are refused and counted (speed_router_kv_index_refused_total), so no node can make the
 * router's memory grow without bound. A node whose hash seed or block size differs from the
 * router's is ignored (its hashes name other keys; warned once).
 *
 * Metrics (when created with a registry): speed_router_kv_index_blocks{node} (hashes held per
 * node), speed_router_kv_events_total{kind="stored|evicted|anticipated"}, speed_router_kv_snapshots_total,
 * speed_router_kv_index_refused_total.
 *
 * Threading: every function may be called from any thread (one mutex per node: the poller
 * writes a node while workers read the others). Overlap is O(prompt blocks) per node.
 * Memory: from speed_malloc; sets grow with their content up to the bound.
 */
#ifndef SPEED_KV_INDEX_H
#define SPEED_KV_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "metrics.h"
#include "speed_proto.h"
#include "status.h"

typedef struct {
    size_t n_nodes_max;       /* decode pool capacity, >= 1 */
    size_t max_blocks;        /* hashes per node, >= 1 */
    uint64_t seed;            /* speed_block_hash_seed(model, block_tokens) */
    int32_t block_tokens;     /* B, >= 1 */
    speed_metrics_t *metrics; /* NULL = no metrics */
} speed_kv_index_params_t;

typedef struct speed_kv_index speed_kv_index_t;

/* Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (a bound 0 or above 2^30, block_tokens < 1) or
 * SPEED_ERR_NO_MEMORY / a metric registration error. */
speed_status_t speed_kv_index_create(const speed_kv_index_params_t *params, speed_kv_index_t **idx_p);
void speed_kv_index_destroy(speed_kv_index_t *idx); /* NULL ok */

/* A node of the decode pool got index `node` with this address (the {node} label of its gauge).
 * Naming an index again (discovery reused the slot for another address) removes the old name's
 * series. Nodes without a name are tracked all the same (no gauge). Returns SPEED_OK,
 * SPEED_ERR_INVALID_ARGUMENT (node out of range) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_kv_index_name_node(speed_kv_index_t *idx, size_t node, const char *address);

/* The cursor the next status request to the node carries. */
void speed_kv_index_cursor(speed_kv_index_t *idx, size_t node, Speed__V1__CacheCursor *cursor);

/* Applies one status reply's events (NULL: the node sent none; nothing changes). Returns true
 * when events wait after the new cursor (CacheEvents.more: poll again soon). */
bool speed_kv_index_apply(speed_kv_index_t *idx, size_t node, const Speed__V1__CacheEvents *events);

/* A request the router sent to the node completed there: its prompt's blocks are what the node
 * stores next. Adds them now, ahead of the node's own events (which confirm them, or evict them),
 * so that a conversation's next turn sent before the next status poll finds them. Only for a
 * node whose current journal instance has reported stored blocks (its cache is on: a node that
 * never stores would otherwise keep blocks nobody holds). Counted as
 * speed_router_kv_events_total{kind="anticipated"}. Returns how many were added (refusals of a
 * full set are counted as usual). */
size_t speed_kv_index_anticipate(speed_kv_index_t *idx, size_t node, const uint64_t *hashes, size_t n);

/* Forgets everything of the node (down, retired, restarted); its next read is a snapshot. */
void speed_kv_index_forget(speed_kv_index_t *idx, size_t node);

/* Leading hashes of prompt[0..n-1] the node holds: the first k with prompt[k] absent (a block
 * held after a missing one does not count: its KV is unusable without the blocks before it). */
size_t speed_kv_index_overlap(speed_kv_index_t *idx, size_t node, const uint64_t *prompt, size_t n);

/* Hashes held for the node. */
size_t speed_kv_index_size(speed_kv_index_t *idx, size_t node);

uint64_t speed_kv_index_seed(const speed_kv_index_t *idx);
int32_t speed_kv_index_block_tokens(const speed_kv_index_t *idx);

typedef struct {
    uint64_t n_stored, n_evicted; /* events applied */
    uint64_t n_anticipated;       /* hashes added ahead of the node's events */
    uint64_t n_snapshots;         /* snapshots applied */
    uint64_t n_refused;           /* hashes refused: a node's set was full */
    uint64_t n_ignored;           /* replies ignored: another seed or block size */
} speed_kv_index_stats_t;

void speed_kv_index_stats(speed_kv_index_t *idx, speed_kv_index_stats_t *stats_p);

#endif /* SPEED_KV_INDEX_H */
