/* speed_cache_journal: a decode node's journal of prefix-cache events, read by the router for
 * KV-aware routing (docs/prefix-cache.md#routing, docs/router.md#kv-aware-routing).
 *
 * The producer (the prefix cache, through the node) records that blocks were stored (their
 * block hashes, block_hash.h, now name KV the node holds) or evicted. Each hash recorded is one
 * event with a sequence number 1, 2, 3, ... The journal keeps:
 *   - the last n_events_max events in a ring (older ones are overwritten);
 *   - the set of hashes stored and not evicted since it started (at most n_blocks_max of them:
 *     a stored hash beyond that is refused and counted, so the set, and the snapshot made of
 *     it, stay bounded; its event is still journaled);
 *   - an instance id (the node's incarnation, new at each start), so a reader can tell a
 *     restarted node from one whose journal went on.
 *
 * The reader (the router, piggy-backed on its status poll) says which instance and which next
 * sequence number it has; speed_cache_journal_read answers with at most n_max events after
 * that, or with a snapshot (the whole set, as "stored" entries) when the reader cannot
 * continue: a different instance, a cursor 0 (a reader that knows nothing), one older than
 * the ring holds (too far behind), or one ahead of the journal (nonsense). After a snapshot the
 * reader continues from its next_seq.
 *
 * The producer is the engine's prefix cache (decode.prefix_cache_blocks): its event callback
 * (speed_node_cache_on_event) records a hash stored when the first cache entry holding it
 * arrives and evicted when the last one goes. A full set refuses more stored hashes (counted).
 *
 * Threading: every function may be called from any thread (one mutex; record is O(n),
 * read is O(n_max), a snapshot O(set size)).
 * Memory: from speed_malloc; the ring and the set are bounded by the params.
 */
#ifndef SPEED_CACHE_JOURNAL_H
#define SPEED_CACHE_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef enum {
    SPEED_CACHE_EVENT_STORED = 0,
    SPEED_CACHE_EVENT_EVICTED = 1,
} speed_cache_event_kind_t;

typedef struct {
    uint64_t instance;   /* the node's incarnation, != 0 (the decode node passes its epoch) */
    size_t n_events_max; /* ring size, >= 1 */
    size_t n_blocks_max; /* hashes the set (and so a snapshot) holds at most, >= 1 */
} speed_cache_journal_params_t;

typedef struct speed_cache_journal speed_cache_journal_t;

/* Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (instance 0, a bound 0 or above 2^30) or
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_cache_journal_create(const speed_cache_journal_params_t *params, speed_cache_journal_t **j_p);
void speed_cache_journal_destroy(speed_cache_journal_t *j); /* NULL ok */

/* Records n hashes as stored / evicted, in order (0 hashes are skipped). A stored hash the set
 * cannot hold is counted in n_refused (its event still goes out: the reader may hold it);
 * record_stored returns how many this call refused. */
size_t speed_cache_journal_record_stored(speed_cache_journal_t *j, const uint64_t *hashes, size_t n);
void speed_cache_journal_record_evicted(speed_cache_journal_t *j, const uint64_t *hashes, size_t n);

/* One answer to a reader. entries[i] is an event of kinds[i]; in a snapshot every kind is
 * STORED. */
typedef struct {
    uint64_t instance;
    uint64_t next_seq; /* the reader's cursor for its next read */
    bool snapshot;     /* the reader must forget what it holds of this node and take entries */
    bool more;         /* events after next_seq wait already */
    size_t n;
    uint64_t *hashes; /* [n], speed_malloc'd (NULL when n is 0) */
    uint8_t *kinds;   /* [n], speed_cache_event_kind_t */
} speed_cache_journal_reply_t;

/* Events after (instance, next_seq), at most n_max (>= 1), or a snapshot (see the top). The
 * reply owns its arrays: speed_cache_journal_reply_cleanup. Returns SPEED_OK,
 * SPEED_ERR_INVALID_ARGUMENT (NULL, n_max 0) or SPEED_ERR_NO_MEMORY (reply empty). */
speed_status_t speed_cache_journal_read(speed_cache_journal_t *j, uint64_t instance, uint64_t next_seq, size_t n_max,
                                        speed_cache_journal_reply_t *reply);
void speed_cache_journal_reply_cleanup(speed_cache_journal_reply_t *reply);

typedef struct {
    uint64_t n_stored, n_evicted; /* events recorded */
    uint64_t n_refused;           /* stored hashes the full set refused */
    uint64_t n_snapshots;         /* snapshots read */
    uint64_t next_seq;            /* sequence number of the next event */
    size_t n_blocks;              /* hashes in the set now */
} speed_cache_journal_stats_t;

void speed_cache_journal_stats(speed_cache_journal_t *j, speed_cache_journal_stats_t *stats_p);

#endif /* SPEED_CACHE_JOURNAL_H */
