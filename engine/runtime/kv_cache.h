/* speed_kv_cache: paged KV cache with one pool per layer group (docs/design.md §4).
 *
 * Pools. Layers < split_layer (the engine's C) live in the LOWER pool, layers >= split_layer
 * in the UPPER pool; each pool is an array of blocks of B tokens allocated once with
 * speed_backend_alloc and sized separately, so the upper pool really is smaller. Inside a
 * block, for each layer of the pool's group in order, K then V, each
 * [B][n_kv_heads][head_dim] in the cache dtype — exactly the speed_kv_layer_t layout
 * (backend.h). One layer's slice of one block (K then V, 2 * B * n_kv_heads * head_dim *
 * dtype size bytes, contiguous) is the canonical unit, the wire format of KV transfer.
 *
 * Sequences and entry spaces. A sequence has its own cutoff C (which may differ from
 * split_layer) and two entry counts: layers < C hold n_full entries (entry index =
 * position), layers >= C hold n_compact entries (anchors, tail and generated tokens in
 * position order: the compact index). Entry e of a layer lives in slot
 * table[e / B] * B + e % B, where table is the sequence's block table in that layer's pool.
 * Each pool's table is sized for the most entries any layer of that pool needs: the lower
 * pool always holds n_full (layer 0 < C); the upper pool holds n_compact when
 * C <= split_layer, n_full when C > split_layer. A sequence with C < split_layer
 * leaves the tail of its lower-pool blocks unused in layers C..split_layer-1 (the pool
 * has one block table per sequence, not one per layer) — the price of a per-request depth.
 *
 * Reservation is all or nothing: a sequence gets every block it asked for in both pools or
 * none (SPEED_ERR_CAPACITY, retryable). A block may be held by several sequences (the shared
 * prefix of speed_kv_cache_seq_create_shared): it counts its holders and is free again with
 * the last; a shared block is read-only. Byte accounting is exact: reserved = whole blocks,
 * used = entries actually stored, per pool, per sequence and for the cache.
 *
 * Host mirror (KV transfer from and into GPU memory). When the pools are device memory (the
 * CUDA backend) UCX without CUDA support cannot register or address them, so the cache keeps a
 * mirror: one pinned host buffer per pool (speed_backend_alloc_host), exactly the pool's layout
 * and size, zeroed at creation. A transfer registers and addresses the mirror instead of the
 * pools (speed_kv_cache_xfer_region / _xfer_block_addr); the sender copies a layer's blocks
 * pool -> mirror before putting them (speed_kv_cache_stage_out), the receiver copies a
 * sequence's prompt entries mirror -> pool once the notify says they arrived
 * (speed_kv_cache_stage_in, called by speed_engine_seq_kv_ready). The mirror costs host memory
 * equal to the pools (bytes_total of both), and nothing else: the forward pass never reads it.
 * It is on by default exactly when the backend's memory is not host memory
 * (speed_backend_host_memory); params.host_mirror forces it on (tests run the staging path on
 * CPU backends this way) or off (a CUDA-aware UCX registering device memory directly).
 *
 * Ownership: the cache owns the pools, the mirror and the sequence handles; a handle lives
 * until speed_kv_cache_seq_destroy or speed_kv_cache_destroy. Backend memory and mirror
 * addresses stay valid for the cache's life. Thread-safety: one thread at a time — the thread
 * that owns the backend (the engine's): the staging functions run backend copies. UCX may read
 * or write mirror bytes from its progress thread meanwhile; the blocks it touches are the ones
 * a transfer owns, never those being staged (see the staging functions).
 */
#ifndef SPEED_KV_CACHE_H
#define SPEED_KV_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "dtype.h"
#include "status.h"

typedef enum {
    SPEED_KV_POOL_LOWER = 0, /* layers < split_layer */
    SPEED_KV_POOL_UPPER = 1, /* layers >= split_layer */
    SPEED_KV_POOL_COUNT
} speed_kv_pool_t;

/* Whether a cache keeps a host mirror of its pools (above). */
typedef enum {
    SPEED_KV_MIRROR_AUTO = 0, /* on when the backend's memory is not host memory (CUDA) */
    SPEED_KV_MIRROR_ON,       /* always (CPU backends too: tests) */
    SPEED_KV_MIRROR_OFF,      /* never (CUDA-aware UCX registers device memory directly) */
} speed_kv_mirror_t;

typedef struct {
    speed_backend_t *backend;              /* borrowed; pools are its memory */
    int n_layers;                          /* L >= 1 */
    int split_layer;                       /* 1..L; L = no upper pool */
    int n_kv_heads, head_dim;              /* heads per token slot (this rank's share of the model's) */
    int head_begin;                        /* tensor parallelism: the cache holds the model's KV heads
                                 * [head_begin, head_begin + n_kv_heads); default 0 */
    int model_kv_heads;                    /* the model's KV heads, >= head_begin + n_kv_heads;
                                 * 0 (default) = n_kv_heads (no tensor parallelism) */
    speed_dtype_t dtype;                   /* f32, bf16, f16 */
    int block_tokens;                      /* B >= 1, default 16 */
    int64_t n_blocks[SPEED_KV_POOL_COUNT]; /* blocks per pool (>= 0); upper ignored when
                                            * split_layer == L */
    speed_kv_mirror_t host_mirror;         /* default AUTO */
} speed_kv_cache_params_t;

/* backend NULL, shapes 0, head range 0 of 0 (= all heads), f32, B 16, no blocks, mirror AUTO:
 * fill in the model and sizes. */
speed_kv_cache_params_t speed_kv_cache_default_params(void);

typedef struct speed_kv_cache speed_kv_cache_t;
typedef struct speed_kv_seq speed_kv_seq_t;

/* Entries a sequence needs per entry space, given its prompt, depth and later tokens:
 * n_full = n_prompt + n_extra; n_compact = min(anchors + tail, n_prompt) + n_extra
 * (anchors, tail clamped to >= 0). */
void speed_kv_entries_for(int64_t n_prompt, int anchors, int tail, int64_t n_extra, int64_t *n_full_p,
                          int64_t *n_compact_p);

/* Blocks a sequence of depth prefill_layers with these entry counts takes from each pool of a
 * cache split at split_layer (L = n_layers). Multiply by the number of sequences to size a
 * cache for a workload (speed_kv_cache_params_t.n_blocks). */
void speed_kv_cache_blocks_for(int n_layers, int split_layer, int block_tokens, int prefill_layers, int64_t n_full,
                               int64_t n_compact, int64_t n_blocks_p[SPEED_KV_POOL_COUNT]);

/* Allocates both pools (zeroed), the free lists and, if params.host_mirror says so, the host
 * mirror (zeroed).
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (a parameter out of range, logged),
 * SPEED_ERR_NO_MEMORY (host, pinned host or backend), SPEED_ERR_DEVICE. On error nothing is
 * allocated. */
speed_status_t speed_kv_cache_create(const speed_kv_cache_params_t *params, speed_kv_cache_t **cache_p);

/* Frees everything; NULL is a no-op. Sequences still alive are a leak of the caller: they are
 * reported (SPEED_WARN, subsystem "kv": how many sequences and blocks per pool) and freed. */
void speed_kv_cache_destroy(speed_kv_cache_t *cache);

/* The pool view of layer `layer` (0..L-1), for speed_op_kv_store / kv_load / attention. */
speed_kv_layer_t speed_kv_cache_layer(const speed_kv_cache_t *cache, int layer);
speed_kv_pool_t speed_kv_cache_layer_pool(const speed_kv_cache_t *cache, int layer);
int speed_kv_cache_block_tokens(const speed_kv_cache_t *cache);
int speed_kv_cache_n_layers(const speed_kv_cache_t *cache);
int speed_kv_cache_split_layer(const speed_kv_cache_t *cache);
/* The model's KV heads this cache holds: [head_begin, head_begin + n_kv_heads) of
 * model_kv_heads (params.model_kv_heads 0 reads back as n_kv_heads). Slot s of a block holds, in
 * K and in V, heads head_begin.. in order, each head_dim values: the slot stride is
 * n_kv_heads * head_dim * dtype size whatever the model's total. */
int speed_kv_cache_head_begin(const speed_kv_cache_t *cache);
int speed_kv_cache_model_kv_heads(const speed_kv_cache_t *cache);
/* Bytes of one layer's K and V of one token: 2 * n_kv_heads * head_dim * dtype size. */
size_t speed_kv_cache_token_bytes(const speed_kv_cache_t *cache);
/* Bytes of the canonical unit (one layer of one block, K then V): B * token_bytes. */
size_t speed_kv_cache_unit_bytes(const speed_kv_cache_t *cache);

/* ---- sequences ---------------------------------------------------------------------------- */

/* Reserves blocks for a sequence of depth prefill_layers (1..L) with room for n_full_max and
 * n_compact_max entries (n_compact_max <= n_full_max), entry counts 0.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (ranges); SPEED_ERR_CAPACITY (a pool lacks free
 * blocks: nothing reserved, logged at debug level only since the caller decides what it
 * means); SPEED_ERR_NO_MEMORY. */
speed_status_t speed_kv_cache_seq_create(speed_kv_cache_t *cache, int prefill_layers, int64_t n_full_max,
                                         int64_t n_compact_max, speed_kv_seq_t **seq_p);

/* As speed_kv_cache_seq_create, but the first n_shared blocks of the new sequence's lower-pool
 * table are src's first n_shared lower-pool blocks, shared, not copied (prefix caching,
 * prefix_cache.h): each block counts its holders (speed_kv_cache_block_refs) and returns to the
 * pool with the last. A shared block is read-only: nobody writes it again (the new sequence
 * stores entries from position n_shared * B on; src must be done writing them:
 * speed_kv_cache_seq_copy_entries refuses to write a shared block). Sharing needs
 * position-indexed entries in every lower-pool layer of both sequences: both depths >= the
 * split, src storing at least n_shared * B entries, n_shared * B <= n_full_max. Only the blocks
 * not shared are taken from the pools. Per-sequence usage counts a shared block in each holder.
 * Returns as speed_kv_cache_seq_create; SPEED_ERR_INVALID_ARGUMENT also when sharing is not
 * allowed as above (logged). n_shared 0 (src may be NULL) is speed_kv_cache_seq_create. */
speed_status_t speed_kv_cache_seq_create_shared(speed_kv_cache_t *cache, int prefill_layers, int64_t n_full_max,
                                                int64_t n_compact_max, const speed_kv_seq_t *src, int64_t n_shared,
                                                speed_kv_seq_t **seq_p);

/* Shrinks the room to the stored entries: blocks past those the stored entries need go back to
 * the pools (when this was their last holder). For a sequence that will never grow again
 * (kept in a prefix cache). */
void speed_kv_cache_seq_trim(speed_kv_cache_t *cache, speed_kv_seq_t *seq);

/* Copies n entries of `layer` from src (entries [src_entry, src_entry + n), stored) into dst
 * (entries [dst_entry, dst_entry + n), within its room), K and V, byte for byte: a device copy
 * through a one-block host buffer when the pools are not host memory (synchronized before it
 * returns). The caller then counts them with speed_kv_cache_seq_set_entries.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (ranges, or a destination block that is shared:
 * logged); SPEED_ERR_NO_MEMORY; the backend's status. */
speed_status_t speed_kv_cache_seq_copy_entries(speed_kv_cache_t *cache, speed_kv_seq_t *dst, int64_t dst_entry,
                                               const speed_kv_seq_t *src, int64_t src_entry, int layer, int64_t n);

/* Block tables holding `block` of pool p (0 = free, > 1 = shared); -1 for a block id out of
 * range. For tests and accounting. */
int32_t speed_kv_cache_block_refs(const speed_kv_cache_t *cache, speed_kv_pool_t p, int32_t block);

/* Grows the room to at least these counts (never shrinks). All or nothing, returns as above. */
speed_status_t speed_kv_cache_seq_grow(speed_kv_cache_t *cache, speed_kv_seq_t *seq, int64_t n_full_max,
                                       int64_t n_compact_max);

/* Returns the sequence's blocks to the pools; NULL is a no-op. */
void speed_kv_cache_seq_destroy(speed_kv_cache_t *cache, speed_kv_seq_t *seq);

/* Records how many entries are stored (for accounting and export); the caller wrote them with
 * speed_op_kv_store at the slots of speed_kv_cache_seq_slot. Must fit the room.
 * Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT. */
speed_status_t speed_kv_cache_seq_set_entries(speed_kv_cache_t *cache, speed_kv_seq_t *seq, int64_t n_full,
                                              int64_t n_compact);

int speed_kv_seq_prefill_layers(const speed_kv_seq_t *seq);
/* Entries stored in `layer`: n_full for layer < C, else n_compact. */
int64_t speed_kv_seq_entries(const speed_kv_seq_t *seq, int layer);
/* Room (entries) of `layer`. */
int64_t speed_kv_seq_capacity(const speed_kv_seq_t *seq, int layer);
/* The block table used by `layer` ([capacity / B rounded up] block ids of its pool). */
const int32_t *speed_kv_seq_block_table(const speed_kv_seq_t *seq, int layer);
/* Slot of entry `entry` (< capacity) of `layer`: table[entry / B] * B + entry % B. */
int32_t speed_kv_seq_slot(const speed_kv_seq_t *seq, int layer, int64_t entry);

typedef struct {
    int64_t n_blocks[SPEED_KV_POOL_COUNT];      /* reserved */
    size_t bytes_reserved[SPEED_KV_POOL_COUNT]; /* n_blocks * block bytes of the pool */
    size_t bytes_used[SPEED_KV_POOL_COUNT];     /* Σ over the pool's layers of entries * token bytes */
} speed_kv_usage_t;

void speed_kv_cache_seq_usage(const speed_kv_cache_t *cache, const speed_kv_seq_t *seq, speed_kv_usage_t *usage_p);

typedef struct {
    int n_layers[SPEED_KV_POOL_COUNT];
    size_t block_bytes[SPEED_KV_POOL_COUNT]; /* n_layers * unit bytes */
    int64_t n_blocks[SPEED_KV_POOL_COUNT];   /* pool size */
    int64_t n_blocks_free[SPEED_KV_POOL_COUNT];
    size_t bytes_total[SPEED_KV_POOL_COUNT]; /* n_blocks * block_bytes: the allocation */
    speed_kv_usage_t usage;                  /* sum over live sequences */
    int n_seqs;
} speed_kv_cache_stats_t;

void speed_kv_cache_stats(const speed_kv_cache_t *cache, speed_kv_cache_stats_t *stats_p);

/* ---- transfer -------------------------------------------------------------------------------
 * Canonical layout of a sequence: for layer 0..L-1, for block i < ceil(entries(layer) / B),
 * the unit (K then V of that layer in that block). */

/* Backend-memory address and size (unit bytes) of (sequence, layer, block i), i < the number
 * of blocks of the layer's table. Returns SPEED_OK or SPEED_ERR_INVALID_ARGUMENT. Without a
 * host mirror this is what a UCX put targets (decode side) or reads (prefill side); with one,
 * see speed_kv_cache_xfer_block_addr. */
speed_status_t speed_kv_cache_block_addr(const speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int layer,
                                         int64_t block, void **addr_p, size_t *bytes_p);

/* ---- host mirror and staging (see the top of this file) --------------------------------------
 * Blocks of layer `layer` are the entries of its block table (speed_kv_seq_block_table), in
 * entry order; block i holds entries [i * B, (i + 1) * B). */

/* Whether the cache has a host mirror; whether its pools are host memory. */
bool speed_kv_cache_host_mirror(const speed_kv_cache_t *cache);
bool speed_kv_cache_host_memory(const speed_kv_cache_t *cache);

/* The memory a transfer registers and addresses for pool p: the mirror of the pool when the
 * cache has one, else the pool itself. *base_p NULL and *len_p 0 for an empty pool. The layout
 * is the pool's: a unit at offset o of the pool is at offset o of the region. Owned by the
 * cache, valid for its life. */
void speed_kv_cache_xfer_region(const speed_kv_cache_t *cache, speed_kv_pool_t p, void **base_p, size_t *len_p);

/* speed_kv_cache_block_addr in the transfer region: the mirror's copy of the unit when the cache
 * has a mirror, else the pool's unit (then equal to speed_kv_cache_block_addr). Host memory
 * unless the cache has no mirror and its pools are device memory. */
speed_status_t speed_kv_cache_xfer_block_addr(const speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int layer,
                                              int64_t block, void **addr_p, size_t *bytes_p);

/* Sender side: copies the unit of `layer` in blocks [block_begin, block_end) of the sequence
 * from the pool to the mirror (speed_backend_download: waits for the copy, and so for the ops
 * before it), nothing else — the mirror's other bytes are untouched, so puts still reading
 * other layers' or other blocks' units are not disturbed. One download per unit, one per run
 * of consecutive blocks when the pool holds a single layer (units adjacent). Whole units: a
 * partial last block copies its unused slots too. Call on the backend's thread, after the
 * layer's entries are stored, before the puts of those blocks are posted.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (no mirror, layer or blocks out of range;
 * logged); the backend's status (SPEED_ERR_DEVICE). */
speed_status_t speed_kv_cache_stage_out(const speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int layer,
                                        int64_t block_begin, int64_t block_end);

/* Receiver side: copies the sequence's first n_full entries of layers < its depth and n_compact
 * of the others — the prompt entries a transfer put into the mirror — from the mirror into the
 * pool (whole units, speed_backend_upload), then synchronizes the backend, so that when it
 * returns the pool holds them and the mirror's blocks may be written again. Does not change
 * the entry counts (speed_kv_cache_seq_set_entries does). Call on the backend's thread, after
 * the transfer's notify (the puts are complete).
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (no mirror, counts past the room; logged); the
 * backend's status. */
speed_status_t speed_kv_cache_stage_in(speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int64_t n_full,
                                       int64_t n_compact);

/* ---- partial transfers (a prefix cache hit: kv_cache.h's canonical layout, from an entry on) ----
 * A sequence whose first entries are already in place (speed_kv_cache_seq_copy_entries or shared
 * blocks of a prefix cache hit) receives only the rest. `from` names the first entry not in
 * place in each entry space; each layer's units then start at the block holding its first such
 * entry (from.full below the sequence's C, from.compact above) and end with its last entry's
 * block. The first unit also carries entries before `from` in that block: the sender must hold
 * them too (the same bytes: they are the same prefix's). Shared blocks are never written: a hit
 * shares only whole blocks before `from`. {0, 0} is the whole layout (the functions above). */
typedef struct {
    int64_t full;    /* first entry not in place in layers < C */
    int64_t compact; /* ... in layers >= C */
} speed_kv_from_t;

/* The `from` of a sequence whose first n_cached prompt positions are in place (a prefix cache
 * hit; n_cached at most the first tail position): position n_cached below C; at and above C the
 * compact space holds the anchors first and a hit never covers the tail, so min(n_cached, a)
 * with a = min(anchors, n_prompt). n_cached 0 gives {0, 0}, the whole layout. The one
 * definition: the engine (its partial transfers) and a decode node describing the blocks a
 * sender must fill (transfer/, speed_kv_desc_params_t.from) both use it. */
speed_kv_from_t speed_kv_from_cached(int64_t n_cached, int64_t n_prompt, int anchors);

/* Bytes of the units of entries [from, n) per layer (0 for a layer with nothing past from). */
size_t speed_kv_cache_seq_wire_bytes_from(const speed_kv_cache_t *cache, const speed_kv_seq_t *seq,
                                          speed_kv_from_t from, int64_t n_full, int64_t n_compact);
/* speed_kv_cache_seq_export of the units of the stored entries from `from` on.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (from negative, size), or the backend's status. */
speed_status_t speed_kv_cache_seq_export_from(speed_kv_cache_t *cache, const speed_kv_seq_t *seq, speed_kv_from_t from,
                                              void *buf, size_t size);
/* speed_kv_cache_seq_import of those units (size must equal speed_kv_cache_seq_wire_bytes_from),
 * then the counts become n_full / n_compact. Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (from
 * outside [0, n], counts past the room, size, a unit in a shared block: nothing written); the
 * backend's status. */
speed_status_t speed_kv_cache_seq_import_from(speed_kv_cache_t *cache, speed_kv_seq_t *seq, speed_kv_from_t from,
                                              int64_t n_full, int64_t n_compact, const void *buf, size_t size);
/* speed_kv_cache_stage_in of those units only (mirror -> pool): the entries in place before
 * `from` in the pool are not overwritten by the mirror's (stale) copy, except in the first unit
 * of a layer, which the transfer wrote whole. Returns as speed_kv_cache_stage_in, and
 * SPEED_ERR_INVALID_ARGUMENT for a unit in a shared block. */
speed_status_t speed_kv_cache_stage_in_from(speed_kv_cache_t *cache, const speed_kv_seq_t *seq, speed_kv_from_t from,
                                            int64_t n_full, int64_t n_compact);

/* Bytes of the canonical layout for entry counts (n_full, n_compact) at this sequence's depth. */
size_t speed_kv_cache_seq_wire_bytes(const speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int64_t n_full,
                                     int64_t n_compact);

/* Downloads the stored entries (current counts) in canonical layout into host `buf` of `size`
 * bytes (>= speed_kv_cache_seq_wire_bytes of the current counts).
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (size), or the backend's status. */
speed_status_t speed_kv_cache_seq_export(speed_kv_cache_t *cache, const speed_kv_seq_t *seq, void *buf, size_t size);

/* Uploads n_full / n_compact entries in canonical layout from host `buf` (size must equal
 * speed_kv_cache_seq_wire_bytes) and sets the counts. Must fit the room.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT, or the backend's status (counts unchanged). */
speed_status_t speed_kv_cache_seq_import(speed_kv_cache_t *cache, speed_kv_seq_t *seq, int64_t n_full,
                                         int64_t n_compact, const void *buf, size_t size);

#endif /* SPEED_KV_CACHE_H */
