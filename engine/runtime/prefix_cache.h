/* speed_prefix_cache: the KV of finished sequences, kept so that a new sequence whose prompt
 * starts with the same tokens computes only the rest (docs/prefix-cache.md).
 *
 * What is kept. An entry is a finished sequence's KV handle (kv_cache.h, trimmed to its stored
 * entries), its tokens (prompt, then the generated tokens it processed) and its SPEED classes.
 * Every full block of B tokens of an entry is indexed by a chained hash: the hash of block k
 * covers tokens [0, (k + 1) B), so one hash names the whole prefix. A lookup walks the new
 * prompt's block hashes, and ALWAYS compares the token ids of a candidate with the prompt's
 * (a request never sees KV of another prefix, whatever the hash says), then extends the match
 * token by token past the last full block (a hit may end mid-block).
 *
 * What a hit may reuse: the SPEED rule (docs/prefix-cache.md). Write have(i) for the layers
 * [0, have) in which the entry's KV of position i is the ordinary causal one — L for its
 * anchors (i < a) and for every token when it had no shallow token, else its C — and need(i)
 * for the layers a new sequence needs there with ordinary causal KV — L for its anchors, else
 * its C (its shallow tokens exist only below C; its tail is always computed). Position i is
 * reusable iff have(i) >= need(i); a hit covers the longest run of reusable positions from 0,
 * capped at the token match and at the new tail. So an entry made at C serves a request at
 * C' <= C (layers < C'), an entry made at C = L (or with no shallow token) serves any C, and a
 * request at C' > C gets at most the entry's anchors. The entry's upper-layer KV of its tail
 * and generated tokens (restricted attention) is never reused.
 *
 * Keys. Besides the tokens, KV depends on the model weights, the cache dtype, the tensor
 * parallel head range and RoPE; a cache belongs to one engine (one KV cache), where all of
 * those are fixed, so they are not part of the key. A cache shared across engines would have
 * to add them.
 *
 * Memory. Entries hold blocks of the engine's pools; params.max_blocks bounds the blocks they
 * hold (a block shared with a live sequence counts too). Least recently used entries (inserted
 * or hit) are evicted past the bound, and on demand when a reservation lacks free blocks
 * (speed_prefix_cache_evict_one). An entry pinned by a lookup (until speed_prefix_cache_release)
 * is never evicted; blocks a live sequence shares (speed_kv_cache_seq_create_shared) stay
 * allocated after their entry is evicted, until that sequence frees them: eviction never takes
 * memory a sequence uses.
 *
 * Ownership: the cache borrows the KV cache (it must outlive it) and owns its entries: their
 * KV handles are destroyed at eviction, clear and destroy. Thread-safety: one thread at a time,
 * the KV cache's (the engine's).
 */
#ifndef SPEED_PREFIX_CACHE_H
#define SPEED_PREFIX_CACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "kv_cache.h"
#include "status.h"

/* What a cache event says about block hashes (for KV-aware routing: the node publishes them). */
typedef enum {
    SPEED_PREFIX_EVENT_STORED = 0,  /* the cache now holds KV under these hashes */
    SPEED_PREFIX_EVENT_EVICTED = 1, /* it no longer holds any under these */
} speed_prefix_event_t;

/* Called on the cache's thread with n >= 1 block hashes (full 64-bit chained hashes of
 * hash_next, whatever hash_bits is). A hash is reported STORED when the first entry indexing
 * it arrives and EVICTED when the last one goes (entries of one conversation share their
 * first blocks' hashes: they are reported once). Must not call back into the cache or the
 * engine. */
typedef void (*speed_prefix_event_cb_t)(void *user, speed_prefix_event_t kind, const uint64_t *hashes, size_t n);

/* The chained block hash: the hash of a block of n ids whose prefix hashes to prev (the seed
 * for block 0). Must be deterministic. */
typedef uint64_t (*speed_prefix_hash_fn_t)(uint64_t prev, const int32_t *ids, size_t n);

typedef struct {
    int64_t max_blocks; /* blocks the entries may hold, both pools; 0 = the cache is off */
    int hash_bits;      /* bits of the block hash kept, 0..64; 64 (default). Fewer only in tests,
                         * to force collisions (0: every block hashes to 0, and token
                         * verification alone keeps prefixes apart) */
    /* The block hash and its seed. NULL = speed_block_hash_next (common/block_hash.h, the
     * definition the router's prefix index uses); 0 = speed_block_hash_seed("", B). A node
     * passes speed_block_hash_seed(served model name, B), as the router computes it, so its
     * events name the router's keys. Tests may pass another chain. The hash is a key, never a
     * proof: ids are always compared. */
    speed_prefix_hash_fn_t hash_next;
    uint64_t hash_seed;
    speed_prefix_event_cb_t event_cb; /* optional: stored / evicted hashes */
    void *event_user;
} speed_prefix_cache_params_t;

/* max_blocks 0 (off), hash_bits 64, the cluster's block hash with the seed of model "", no events. */
speed_prefix_cache_params_t speed_prefix_cache_default_params(void);

/* A sequence's SPEED classes as the reuse rule sees them (engine_internal.h's engine_seq_t):
 * anchors [0, a), shallow [a, tail_start), tail [tail_start, n_prompt), then generated. */
typedef struct {
    int n_layers;       /* L */
    int prefill_layers; /* C, 1..L */
    int64_t a;          /* min(A, n_prompt) */
    int64_t tail_start; /* max(n_prompt - T, a); == a: no shallow token */
} speed_prefix_depth_t;

/* The rule (above). Layers [0, have) of position pos of a cached sequence hold its ordinary
 * causal KV; layers [0, need) of position pos of a new sequence need it. Pure. */
int speed_prefix_layers_have(const speed_prefix_depth_t *cached, int64_t pos);
int speed_prefix_layers_need(const speed_prefix_depth_t *fresh, int64_t pos);

/* Positions [0, result) of `fresh` reusable from `cached` when their first n_match tokens are
 * equal: the longest run from 0 with have >= need, at most n_match and fresh->tail_start. */
int64_t speed_prefix_reusable(const speed_prefix_depth_t *cached, const speed_prefix_depth_t *fresh, int64_t n_match);

typedef struct speed_prefix_cache speed_prefix_cache_t;
typedef struct speed_prefix_entry speed_prefix_entry_t;

/* Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL pointer, max_blocks < 0, hash_bits out of
 * 0..64; logged); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_prefix_cache_create(const speed_prefix_cache_params_t *params, speed_kv_cache_t *kv,
                                         speed_prefix_cache_t **cache_p);

/* Destroys every entry (their blocks go back to the pools unless a live sequence shares them)
 * and the cache; NULL is a no-op. No entry may be pinned (a broken invariant: asserted). */
void speed_prefix_cache_destroy(speed_prefix_cache_t *cache);

/* Takes ownership of `seq` (a finished sequence of the KV cache, done writing) and keeps it as
 * an entry for tokens[0, n_tokens) (copied; n_tokens = the entries stored in its layers < C)
 * at depth `depth`: trims it (speed_kv_cache_seq_trim), indexes its full blocks, drops the
 * entries it covers (their tokens a prefix of its tokens, its KV ordinary in at least as many
 * layers at each of their positions: a conversation's earlier turn), then evicts least recently
 * used entries while the cache holds more than max_blocks (the new entry last).
 * A sequence with no full block, or a cache that is off, is destroyed at once.
 * Returns SPEED_OK (seq now belongs to the cache, or is gone); SPEED_ERR_NO_MEMORY (seq was
 * destroyed, nothing is cached). */
speed_status_t speed_prefix_cache_insert(speed_prefix_cache_t *cache, speed_kv_seq_t *seq, const int32_t *tokens,
                                         int64_t n_tokens, const speed_prefix_depth_t *depth);

/* A lookup's result: the entry, pinned until speed_prefix_cache_release. */
typedef struct {
    speed_prefix_entry_t *entry;
    const speed_kv_seq_t *seq;  /* the entry's KV: copy or share positions [0, n_reuse) from it */
    speed_prefix_depth_t depth; /* the entry's classes */
    int64_t n_match;            /* tokens equal to the prompt's */
    int64_t n_reuse;            /* positions reusable under the rule, >= 1 */
} speed_prefix_hit_t;

/* Finds the entry that lets the sequence of `depth` with prompt tokens[0, n_tokens) reuse the
 * most positions (ties: the most recently used) and pins it; marks it used. Returns true with
 * *hit_p filled, or false (no entry shares a whole first block, or none is reusable: *hit_p
 * zeroed). Counts lookups and hits. */
bool speed_prefix_cache_lookup(speed_prefix_cache_t *cache, const int32_t *tokens, int64_t n_tokens,
                               const speed_prefix_depth_t *depth, speed_prefix_hit_t *hit_p);

/* The positions a lookup would reuse now, without pinning, touching the LRU order or counting:
 * for a node deciding where to compute a prompt's suffix. 0 on a miss. */
int64_t speed_prefix_cache_peek(speed_prefix_cache_t *cache, const int32_t *tokens, int64_t n_tokens,
                                const speed_prefix_depth_t *depth);

/* Unpins the entry of a hit; the hit must not be used afterwards. NULL entry: no-op. */
void speed_prefix_cache_release(speed_prefix_cache_t *cache, speed_prefix_hit_t *hit);

/* Evicts the least recently used entry not pinned. Returns false when there is none. */
bool speed_prefix_cache_evict_one(speed_prefix_cache_t *cache);

/* Evicts every entry not pinned. */
void speed_prefix_cache_clear(speed_prefix_cache_t *cache);

typedef struct {
    int64_t n_entries;
    int64_t n_blocks;   /* held by the entries, both pools (shared blocks counted in each) */
    int64_t max_blocks; /* the bound */
    uint64_t n_lookups, n_hits;
    uint64_t n_hit_tokens; /* Σ n_reuse of the hits */
    uint64_t n_inserted, n_evicted;
    uint64_t n_replaced;   /* entries dropped because a newer one covers them (not in n_evicted) */
    uint64_t n_collisions; /* hash equal, tokens not: candidates refused by verification */
} speed_prefix_cache_stats_t;

void speed_prefix_cache_stats(const speed_prefix_cache_t *cache, speed_prefix_cache_stats_t *stats_p);

#endif /* SPEED_PREFIX_CACHE_H */
