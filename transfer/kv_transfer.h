/* speed_kv_xfer: pushing a prompt's KV blocks from a prefill node into the blocks a decode node
 * reserved, with UCX one-sided puts (docs/design.md §3, §4; docs/dependencies.md §1).
 *
 *   decode node                                   prefill node
 *   -----------                                   ------------
 *   ctx = speed_kv_xfer_ctx_create(notify_cb)     ctx = speed_kv_xfer_ctx_create()
 *   speed_kv_xfer_ctx_register_cache(ctx, kv)     speed_kv_xfer_ctx_register_cache(ctx, kv)
 *   speed_engine_seq_reserve(...) -> seq
 *   speed_kv_desc_build_engine(ctx, eng, seq) --descriptor bytes (control plane)-->
 *                                                 speed_kv_xfer_create_engine(ctx, desc, eng, seq)
 *                                                 engine layer_cb -> speed_kv_xfer_push_layer
 *                                                 speed_kv_xfer_finish: flush, then notify
 *   notify_cb(request id, cookie, bytes, epoch)  <--AM notify {nonce, tags}--
 *   -> speed_engine_seq_kv_ready(seq)            --AM ack (status)-->  speed_kv_xfer_wait -> OK
 *
 * Transports, chosen per descriptor (per endpoint):
 *   SPEED_KV_TRANSPORT_SHM  error-handling mode NONE: UCX may use shared memory / CMA between
 *                           processes of one host (~8x faster than tcp here). UCX does not detect
 *                           a dead peer then: liveness comes from the control plane and leases,
 *                           and every wait is bounded by op_timeout_ms.
 *   SPEED_KV_TRANSPORT_TCP  error-handling mode PEER: works between hosts and reports a dead peer
 *                           (PEER mode disables the shared-memory transports, even on one host).
 *
 * Memory. Both sides register their KV cache pools once (speed_kv_xfer_ctx_register_cache). On
 * CPU backends the pools are host memory: puts read the prefill side's blocks and write straight
 * into the decode side's blocks; the decode side needs no copy and no call per block. When the
 * pools are GPU memory the cache has a pinned host mirror of them (kv_cache.h) and everything
 * here registers and addresses the mirror: push_layer first copies the layer's blocks pool ->
 * mirror (speed_kv_cache_stage_out, on the engine's thread, while earlier layers' puts are in
 * flight), and the decode side copies mirror -> pool when it marks the KV ready
 * (speed_engine_seq_kv_ready -> speed_kv_cache_stage_in). Either side may have a mirror or not:
 * descriptors carry the mirror's addresses and rkeys when the decode side has one.
 * cuda_direct (a CUDA-aware UCX) registers device pools without a mirror instead.
 * Every context runs a progress thread (event-driven: it sleeps on the worker's event fd), so a
 * node receiving puts always progresses its worker.
 *
 * Descriptor. speed_kv_desc_t (below) is a plain C struct: what a prefill node needs to write one
 * reserved sequence. Address of (layer l, block i) on the decode node:
 *   pools[layers[l].pool].base + table[i] * block_stride + layers[l].offset
 * The decode node's pool split may differ from the prefill node's: remote addresses always come
 * from the descriptor, local ones from the local cache. This library does not serialize it: the
 * control plane carries its fields in its own message (the protobuf KvDescriptor) and the
 * receiving side runs speed_kv_desc_check on what it rebuilt before trusting any address in it.
 *
 * Bytes. A transfer puts exactly the prompt's entries: layer l's n_entries(l) * token_bytes
 * (full blocks as one put each, the last partial block as two puts, K rows then V rows), so
 * the bytes put equal speed_kv_bytes_for_prompt (the section 1 formula); slots past the
 * entries are not sent. A partial transfer (speed_kv_desc_params_t.from: the decode node's
 * prefix cache holds the prompt's first positions) puts per layer only the blocks from the one
 * holding its first entry not in place (speed_kv_desc_layer_t.first_block): (n_entries(l) -
 * first_block * B) * token_bytes; the decode node accepts no write below first_block. With tensor parallelism each side holds a range of the model's KV heads
 * (speed_kv_cache_params_t.head_begin): a transfer puts the heads both hold, per token slot,
 * and its notify names that range (see speed_kv_notify_t: several senders may feed one node).
 *
 * Threading. A context is thread-safe: any thread may create, push, finish, wait, cancel and
 * destroy transfers (one thread per transfer at a time; push_layer is meant to run in the engine's
 * layer callback, on the engine's step thread). Callbacks (notify_cb) run on the context's
 * progress thread. The engine and the KV cache are not thread-safe: functions taking them
 * (register, desc_build*, xfer_create*, push_layer) must run on the thread that owns the engine,
 * between or inside its steps.
 *
 * Errors are logged once where they are detected (subsystem "net"), with the request id.
 * Statuses of a transfer (peer-group statuses end a transfer; see each function):
 *   SPEED_ERR_PEER_UNREACHABLE  no endpoint, the peer failed (tcp), or no ack in time
 *   SPEED_ERR_PEER_PROTOCOL     the descriptor does not fit the local layout, an rkey does not
 *                               unpack, the peer rejected the epoch, a malformed message
 *   SPEED_ERR_TRANSFER          a put or the flush failed or did not complete in time
 *   SPEED_ERR_TIMEOUT           the descriptor's lease deadline has passed (retryable: reserve
 *                               again)
 *   SPEED_ERR_CANCELLED         speed_kv_xfer_cancel
 */
#ifndef SPEED_KV_TRANSFER_H
#define SPEED_KV_TRANSFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "engine.h"
#include "kv_cache.h"
#include "kv_transport.h" /* speed_kv_transport_t and its names */
#include "status.h"

/* ---- descriptor ------------------------------------------------------------------------------ */

#define SPEED_KV_DESC_MAX_REGIONS 16
#define SPEED_KV_DESC_MAX_POOLS   16
#define SPEED_KV_DESC_MAX_LAYERS  4096
#define SPEED_KV_DESC_MAX_BLOB    4096      /* worker address and rkey bytes */
#define SPEED_KV_DESC_MAX_BLOCKS  (1 << 24) /* blocks of one pool table */
#define SPEED_KV_NONCE_BYTES      16        /* 128-bit reservation secret (getrandom) */
#define SPEED_KV_TAG_BYTES        16        /* integrity tag per layer (speed_mac) */

typedef struct {
    uint64_t base;   /* remote virtual address of the registered region */
    uint64_t length; /* bytes */
    uint8_t *rkey;   /* [rkey_len] packed UCX rkey (ucp_rkey_pack) */
    uint32_t rkey_len;
} speed_kv_desc_region_t;

typedef struct {
    uint32_t region;       /* index into regions[] */
    uint64_t base;         /* remote address of block 0 of the pool */
    uint64_t block_stride; /* bytes from one block to the next */
    int32_t *table;        /* [n_blocks] block ids of the sequence, in entry order */
    uint32_t n_blocks;     /* blocks the prompt entries need: ceil(max entries of the pool's layers / B) */
} speed_kv_desc_pool_t;

typedef struct {
    uint32_t pool;       /* index into pools[] */
    uint64_t offset;     /* bytes from a block's start to this layer's unit (K then V) */
    int64_t entries;     /* prompt entries of this layer (n_prompt below C, else min(A+T, n)) */
    int64_t first_block; /* a partial transfer (a prefix cache hit on the decode node): the
                          * layer's logical blocks [0, first_block) are in place there and are
                          * never written (the hit may share them read-only); the sender puts
                          * blocks [first_block, ceil(entries / B)), the first of them whole
                          * from its first slot. 0 = the whole layer; at most ceil(entries / B)
                          * (nothing to send) */
} speed_kv_desc_layer_t;

typedef struct {
    uint8_t *worker_addr; /* [worker_addr_len] UCX worker address of the decode node */
    uint32_t worker_addr_len;
    speed_kv_transport_t transport;
    speed_kv_desc_region_t *regions; /* [n_regions] */
    uint32_t n_regions;
    speed_kv_desc_pool_t *pools; /* [n_pools] */
    uint32_t n_pools;
    speed_kv_desc_layer_t *layers; /* [n_layers]: every layer of the model, in order */
    uint32_t n_layers;
    int32_t block_tokens; /* B */
    int32_t n_kv_heads;   /* heads of one token slot in a unit: head_end - head_begin */
    int32_t head_dim;
    int32_t head_begin, head_end; /* heads [head_begin, head_end) of the model's KV heads held
                                   * (a tensor-parallel rank's share) */
    int32_t model_kv_heads;       /* the model's KV heads (>= head_end); a sender must agree.
                             * 0 = not stated (a control plane that does not carry it): the
                             * sender assumes its own model's */
    speed_dtype_t dtype;
    uint64_t unit_bytes;                 /* one layer of one block: 2 * B * n_kv_heads * head_dim * dtype size */
    uint64_t total_bytes;                /* Σ layers (entries - first_block * B) * unit_bytes / B: the
                             * whole head range; a sender holding only part of it puts its share */
    uint64_t epoch;                      /* the decode node's epoch (changes when it restarts) */
    int64_t lease_ms;                    /* how long the prefill side may put into these blocks, counted from when
                       * it received the descriptor (received_ns); 0 = no limit. A duration,
                       * never a wall-clock time: the two hosts' clocks are never compared. The
                       * decode node keeps the blocks at least this long plus a margin. */
    uint64_t received_ns;                /* local CLOCK_MONOTONIC ns when this side got the descriptor (not on
                           * the wire; the receiver stamps it); 0 = at speed_kv_xfer_create */
    bool has_nonce;                      /* the reservation is nonce-protected (a grant on the decode side) */
    uint8_t nonce[SPEED_KV_NONCE_BYTES]; /* secret: only the decode node, the router and the
                                          * chosen prefill node learn it; never logged. The
                                          * notify must carry it to mark the KV ready. */
    bool integrity;                      /* the decode node wants a tag per layer with the notify (integrity mode) */
    uint64_t cookie;                     /* opaque to the prefill side, echoed in the notify (e.g. the decode
                      * engine's sequence id). The protobuf KvDescriptor does not carry it:
                      * the node daemons build with 0 and match notifies by request id */
} speed_kv_desc_t;

/* Frees a descriptor from speed_kv_desc_build* (or one a control-plane conversion assembled from
 * speed_malloc'd arrays); NULL is a no-op. */
void speed_kv_desc_destroy(speed_kv_desc_t *desc);

/* Validates a descriptor that came from a peer, before anything uses it (speed_kv_xfer_create
 * calls it too): known transport and dtype; worker address and rkeys of 1..SPEED_KV_DESC_MAX_BLOB
 * bytes; counts of regions, pools, layers and blocks within the limits above and every index
 * (pool -> region, layer -> pool) in range; B, n_kv_heads, head_dim in 1..65536; the head range
 * holding n_kv_heads heads inside model_kv_heads; unit_bytes equal to the shape's; block stride
 * >= unit and each layer's unit inside a block; a region's extent without overflow; the pool
 * table holding every block the layer's entries need; every such block a non-negative id whose
 * unit (base + id * stride + offset, unit_bytes long, computed without overflow) lies inside
 * the pool's registered region; total_bytes equal to the layers' entries times the token bytes,
 * without overflow; each layer's first_block in 0..ceil(entries / B). Every remote address a
 * transfer computes lies inside a registered region.
 * Returns SPEED_OK or SPEED_ERR_FORMAT (logged with the first fault). */
speed_status_t speed_kv_desc_check(const speed_kv_desc_t *desc);

/* ---- context ------------------------------------------------------------------------------- */

typedef struct speed_kv_xfer_ctx speed_kv_xfer_ctx_t;
typedef struct speed_kv_xfer speed_kv_xfer_t;

/* What a decode node learns when a transfer into its blocks completed (the puts were flushed
 * before the notify was sent, so the bytes are in memory).
 *
 * Tensor parallelism. A transfer writes only the heads both sides hold, [head_begin, head_end):
 * a decode rank may be fed by several prefill ranks (TP 2 -> 1: two senders, each covering half
 * of the decode rank's heads), each sending its own notify with the same cookie. The decode node
 * must mark the sequence's KV ready only once the union of the notified ranges covers its own
 * range [speed_kv_cache_head_begin, + n_kv_heads): count coverage per cookie (the library does
 * not, node/ does). When one prefill rank feeds several decode ranks (TP 1 -> 2) each decode rank
 * gets its own notify covering its whole range. */
typedef struct {
    const char *request_id;       /* NUL-terminated, valid during the callback */
    uint64_t cookie;              /* the descriptor's cookie */
    uint64_t bytes;               /* bytes the prefill side put: entries * 2 * (head_end - head_begin) *
                             * head_dim * dtype size, summed over the layers (a partial transfer:
                             * the entries from each layer's first_block on) */
    uint64_t epoch;               /* equals this context's epoch (mismatches never reach the callback) */
    int32_t head_begin, head_end; /* the model's KV heads this transfer wrote (the intersection of
                                   * the sender's and this node's ranges) */
    bool aborted;                 /* the prefill side cancelled the transfer: it flushed what it had posted and
                   * will put nothing more into the reservation's blocks (the cancel fence may
                   * lift); no ack is sent. The KV is NOT ready. */
    bool integrity_failed;        /* integrity mode: a layer's tag did not match the bytes received.
                            * The transfer is refused (the prefill side's wait fails) and the
                            * reservation should be freed: the KV is NOT ready. */
} speed_kv_notify_t;

/* Runs on the progress thread; must not block or call back into this context. Its return
 * value is sent back as the transfer's result: SPEED_OK, or e.g. SPEED_ERR_NOT_FOUND when the
 * reservation is gone (the prefill side's wait returns it). The engine is not thread-safe:
 * hand the sequence over to the engine's thread (a queue) rather than touching it here. */
typedef speed_status_t (*speed_kv_notify_cb_t)(void *user, const speed_kv_notify_t *note);

typedef struct {
    uint64_t epoch;                 /* 0 = derived from the realtime clock and the pid */
    int op_timeout_ms;              /* bound on flush and on notify->ack; default 10000 */
    speed_kv_notify_cb_t notify_cb; /* decode side; NULL = accept every notify (counted only) */
    void *notify_user;
    bool require_grant;      /* decode side: accept a notify only for a reservation built with a
                         * grant (speed_kv_desc_params_t.grant_id) and carrying its nonce
                         * (compared in constant time); others are refused and never reach
                         * notify_cb. The node daemons set it; default false (tests). */
    const char *tls;         /* UCX_TLS for this context (e.g. "sm,self" for shm: no TCP at all);
                              * NULL = UCX's default or the environment's */
    const char *net_devices; /* UCX_NET_DEVICES (e.g. "eth0"); NULL = UCX's default / environment */
    bool cuda_direct;        /* register caches whose pools are device memory and have no host
                                * mirror (speed_engine_params_t.kv_host_mirror OFF) as CUDA memory
                                * (ucp_mem_map memory_type UCS_MEMORY_TYPE_CUDA): needs a UCX built
                                * with CUDA; ctx_create refuses otherwise. Default false: device
                                * pools are moved through the cache's pinned host mirror. */
    bool writes_only;        /* decode side: descriptors built with a grant carry no rkeys, so a
                              * peer can reach the pools only through the checked writes (no
                              * one-sided put, however late or wherever aimed). For nodes without
                              * cuda_direct (which needs the rkeys for its puts). Default false. */
} speed_kv_xfer_ctx_params_t;

/* epoch 0 (auto), op_timeout_ms 10000, no callback, no grants required, UCX's transports and
 * devices, cuda_direct false, writes_only false. */
speed_kv_xfer_ctx_params_t speed_kv_xfer_ctx_default_params(void);

/* Creates the UCP context (RMA, AM, WAKEUP), one worker (thread mode MULTI) and the progress
 * thread. UCX reads its UCX_* environment variables here (tests: UCX_NET_DEVICES=lo,
 * UCX_TCP_CM_REUSEADDR=y; deployments: UCX_NET_DEVICES=<nic>).
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT, SPEED_ERR_NO_MEMORY, SPEED_ERR_IO (UCX or
 * thread creation failed: logged with UCX's reason), SPEED_ERR_UNSUPPORTED (cuda_direct with a
 * UCX that has no CUDA memory support, e.g. Debian's: logged with the way out). */
speed_status_t speed_kv_xfer_ctx_create(const speed_kv_xfer_ctx_params_t *params, speed_kv_xfer_ctx_t **ctx_p);

/* Stops the progress thread and frees everything: transfers not yet destroyed are ended
 * (their handles become invalid), endpoints are closed (flush mode when idle, forced when an
 * operation is stuck: the peer's error callbacks during teardown are expected and logged at
 * debug level), registrations are released. Bounded by op_timeout_ms. NULL is a no-op.
 * No other thread may use the context or its transfers during or after this call. */
void speed_kv_xfer_ctx_destroy(speed_kv_xfer_ctx_t *ctx);

/* The worker address to send to peers (out of band, through the control plane). Owned by the
 * context, valid for its life. */
void speed_kv_xfer_ctx_address(const speed_kv_xfer_ctx_t *ctx, const uint8_t **addr_p, size_t *len_p);
uint64_t speed_kv_xfer_ctx_epoch(const speed_kv_xfer_ctx_t *ctx);

/* Registers the cache's transfer memory (speed_kv_cache_xfer_region: the pools' pinned host
 * mirror when the cache has one, else the pools; ucp_mem_map, the memory stays the cache's).
 * Needed on both sides: the decode side to offer rkeys, the prefill side to put from
 * registered memory. Registering a cache twice is SPEED_OK (no-op). The cache must stay alive
 * until deregistered or the context is destroyed.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT, SPEED_ERR_NO_MEMORY, SPEED_ERR_IO (UCX refused),
 * SPEED_ERR_UNSUPPORTED (pools in device memory, no mirror, and cuda_direct off: logged). */
speed_status_t speed_kv_xfer_ctx_register_cache(speed_kv_xfer_ctx_t *ctx, const speed_kv_cache_t *cache);

/* Releases the registrations of the cache and drops the grants of descriptors built on it (no
 * KV write may be copied into it after this returns); no transfer using it may be in flight.
 * Unknown caches are ignored. */
void speed_kv_xfer_ctx_deregister_cache(speed_kv_xfer_ctx_t *ctx, const speed_kv_cache_t *cache);

typedef enum {
    SPEED_KV_STAGE_CONNECT = 0, /* endpoint, rkeys */
    SPEED_KV_STAGE_PUT,
    SPEED_KV_STAGE_FLUSH,
    SPEED_KV_STAGE_NOTIFY, /* notify send and the peer's ack */
    SPEED_KV_STAGE_COUNT
} speed_kv_stage_t;

const char *speed_kv_stage_name(speed_kv_stage_t stage);

typedef struct {
    /* prefill side */
    uint64_t n_started;                      /* transfers created */
    uint64_t n_done;                         /* acknowledged OK */
    uint64_t n_failed[SPEED_KV_STAGE_COUNT]; /* ended with an error, by stage */
    uint64_t n_refused;                      /* refused at creation: layout mismatch, lease past */
    uint64_t n_cancelled;
    uint64_t bytes_put; /* all puts posted */
    uint64_t done_ns;   /* Σ create -> ack of the transfers done */
    /* decode side */
    uint64_t n_notified;         /* notifies accepted (callback returned OK) */
    uint64_t n_notify_rejected;  /* epoch mismatch, malformed, or the callback said no */
    uint64_t n_nonce_rejected;   /* of which: no grant for the request, or a wrong nonce */
    uint64_t n_integrity_failed; /* of which: integrity tags missing or not matching */
    uint64_t n_aborts_sent;      /* prefill side: abort notifies sent by cancelled transfers */
    uint64_t n_aborts_received;  /* decode side: abort notifies accepted (right nonce) */
    int n_grants;                /* decode side: grants held now */
    uint64_t n_writes;           /* decode side: KV writes checked and copied into the pools */
    uint64_t bytes_written;      /* their bytes */
    uint64_t n_writes_dropped;   /* KV writes refused: no (live) grant for the request, wrong nonce,
                                  * outside the reservation's blocks, or malformed */
    uint64_t bytes_notified;     /* Σ bytes of accepted notifies */
    /* endpoints */
    int n_endpoints;          /* cached now */
    uint64_t n_peer_failures; /* endpoint error callbacks (outside teardown) */
} speed_kv_xfer_ctx_stats_t;

void speed_kv_xfer_ctx_stats(speed_kv_xfer_ctx_t *ctx, speed_kv_xfer_ctx_stats_t *stats_p);

/* The UCX transports this context opened resources on, comma-separated without repeats (e.g.
 * "self,sysv,posix,cma" for shm: what ucp_context_print_info lists). For checks that a node
 * binds only what it was configured for. Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT,
 * SPEED_ERR_NO_MEMORY or SPEED_ERR_TOO_LONG (buf too small: truncated). */
speed_status_t speed_kv_xfer_ctx_transports(speed_kv_xfer_ctx_t *ctx, char *buf, size_t size);

/* ---- decode side: descriptors -------------------------------------------------------------- */

typedef struct {
    speed_kv_transport_t transport;
    int64_t lease_ms; /* the descriptor's lease (a duration), 0 = none */
    uint64_t cookie;
    /* Grant. Non-NULL: the descriptor gets a fresh random nonce and this context records a
     * grant {grant_id, nonce, layout}: a notify for grant_id is accepted only with that nonce.
     * The grant lives until speed_kv_xfer_ctx_grant_drop, an abort notify, or grant_ms. */
    const char *grant_id; /* the request id the prefill side names in its notify (<= 63 bytes) */
    int64_t grant_ms;     /* how long the grant lives, >= lease_ms; 0 = lease_ms */
    bool integrity;       /* ask for per-layer tags, verified before the notify is accepted */
    /* A partial transfer: the first entries of each entry space are in place already (a prefix
     * cache hit, speed_kv_from_cached(n_cached, ...)); each layer's units start at the block
     * holding its first entry not in place (speed_kv_desc_layer_t.first_block), the grant covers
     * only those blocks, and no written block may be shared. {0, 0} = the whole layout. */
    speed_kv_from_t from;
} speed_kv_desc_params_t;

/* Builds the descriptor of a reserved sequence of a registered cache for n_full / n_compact
 * prompt entries (speed_kv_entries_for with n_extra 0): every layer, its pool, offset, entries
 * and first block to write (params->from); per pool the first ceil(entries / B) blocks of the
 * sequence's table; this context's address, epoch and the pools' rkeys.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (cache not registered, entries past the room,
 * params->from outside [0, entries], a block to be written that is shared with another holder
 * (a partial transfer must start past a prefix cache hit's shared blocks), bad transport) or
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_kv_desc_build(speed_kv_xfer_ctx_t *ctx, const speed_kv_cache_t *cache, const speed_kv_seq_t *seq,
                                   int64_t n_full, int64_t n_compact, const speed_kv_desc_params_t *params,
                                   speed_kv_desc_t **desc_p);

/* The same for a sequence reserved with speed_engine_seq_reserve (entries from its prompt
 * length and depth) or speed_engine_seq_reserve_cached (params->from is then ignored and set
 * from its n_cached: only the units the engine awaits are described). Returns as above, or
 * SPEED_ERR_NOT_FOUND (no such sequence). */
speed_status_t speed_kv_desc_build_engine(speed_kv_xfer_ctx_t *ctx, speed_engine_t *engine, speed_seq_id_t seq,
                                          const speed_kv_desc_params_t *params, speed_kv_desc_t **desc_p);

/* Drops the grant of request_id (the reservation started or ended: no notify for it is valid
 * any more). Unknown ids are ignored. Any thread. */
void speed_kv_xfer_ctx_grant_drop(speed_kv_xfer_ctx_t *ctx, const char *request_id);

/* ---- prefill side: transfers ---------------------------------------------------------------- */

typedef enum {
    SPEED_KV_XFER_PUSHING = 0, /* accepting push_layer */
    SPEED_KV_XFER_FLUSHING,    /* finish called: waiting for the puts to complete remotely */
    SPEED_KV_XFER_NOTIFYING,   /* notify sent, waiting for the ack */
    SPEED_KV_XFER_DONE,        /* acknowledged OK */
    SPEED_KV_XFER_FAILED,      /* ended with an error (status) */
} speed_kv_xfer_state_t;

/* Starts a transfer of a local sequence (n_full / n_compact prompt entries) of a registered
 * cache into the descriptor's blocks. Checks the descriptor against the local layout (dtype, B,
 * head_dim, the model's KV head count, head ranges, layer count, per-layer entries, unit and
 * total bytes), its address arithmetic, and the lease; gets a cached endpoint to the peer (or
 * creates one) and unpacks the rkeys.
 * Head ranges (tensor parallelism): the descriptor's range [head_begin, head_end) and the local
 * cache's must overlap; the transfer puts their intersection only. Equal ranges: whole units
 * (one put per full block). Different ranges: per token slot one put of the common heads' K and
 * one of their V, each at its own side's slot stride (UCX puts are contiguous on both sides), so
 * 2 * entries puts per layer; bytes = entries * 2 * n_common * head_dim * dtype size. request_id (<= 63 bytes, may be NULL) names it in logs and the notify.
 * The local blocks must stay allocated until the transfer ends (DONE / FAILED) or is destroyed.
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULLs, cache not registered);
 * SPEED_ERR_PEER_PROTOCOL (layout mismatch, head ranges that do not overlap, another model head
 * count, bad descriptor, rkey unpack failed);
 * SPEED_ERR_TIMEOUT (lease past); SPEED_ERR_PEER_UNREACHABLE (endpoint creation failed);
 * SPEED_ERR_NO_MEMORY. Every error is logged with the field and both values. */
speed_status_t speed_kv_xfer_create(speed_kv_xfer_ctx_t *ctx, const speed_kv_desc_t *desc,
                                    const speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int64_t n_full,
                                    int64_t n_compact, const char *request_id, speed_kv_xfer_t **xfer_p);

/* The same for an engine sequence added with speed_engine_seq_add (entries from its prompt
 * and depth). Returns as above, or SPEED_ERR_NOT_FOUND. */
speed_status_t speed_kv_xfer_create_engine(speed_kv_xfer_ctx_t *ctx, const speed_kv_desc_t *desc,
                                           speed_engine_t *engine, speed_seq_id_t seq, const char *request_id,
                                           speed_kv_xfer_t **xfer_p);

/* Layer `layer` now holds n_done of its n_total prompt entries (the engine's layer callback
 * arguments): posts non-blocking puts of the blocks completed since the last call (full blocks;
 * everything, including a partial last block, once n_done == n_total), never of the blocks
 * before the descriptor's first_block (a partial transfer: the local sequence holds the whole
 * prompt, the decode node only lacks the rest). Never waits for the
 * network. Repeating a call (a redone step) posts nothing new. With a host mirror it first
 * copies those blocks' units of the layer to the mirror (a backend copy: engine thread; a
 * failing copy ends the transfer with the backend's status, stage PUT).
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (layer out of range, n_total not the
 * descriptor's entries, n_done > n_total, called after finish); or the transfer's status if it
 * has ended (failed, cancelled, lease past: SPEED_ERR_TIMEOUT). */
speed_status_t speed_kv_xfer_push_layer(speed_kv_xfer_t *xfer, int layer, int64_t n_done, int64_t n_total);

/* push_layer(l, entries, entries) for every layer: the whole prompt KV at once (a prefill that
 * already finished). Returns as push_layer. */
speed_status_t speed_kv_xfer_push_all(speed_kv_xfer_t *xfer);

/* Every layer complete: flushes the endpoint (the puts complete at the target), then sends the
 * notify {request id, cookie, bytes, epoch}; the decode side answers with an ack. Does not
 * block; speed_kv_xfer_wait / _poll give the outcome. Both steps are bounded by op_timeout_ms
 * (flush -> SPEED_ERR_TRANSFER, ack -> SPEED_ERR_PEER_UNREACHABLE), enforced by the progress
 * thread even if nobody waits.
 * Returns SPEED_OK (started); SPEED_ERR_INVALID_ARGUMENT (a layer is incomplete, or already
 * finishing); or the transfer's status if it has ended. */
speed_status_t speed_kv_xfer_finish(speed_kv_xfer_t *xfer);

/* Waits until the transfer ends or timeout_ms passes (< 0: until it ends, which finish bounds).
 * Returns the final status (SPEED_OK when acknowledged; the ack's status when the decode side
 * refused it: SPEED_ERR_PEER_PROTOCOL for a stale epoch; the statuses at the top of this file),
 * or SPEED_ERR_TIMEOUT if it is still running after timeout_ms (the transfer is unaffected;
 * see speed_kv_xfer_poll). */
speed_status_t speed_kv_xfer_wait(speed_kv_xfer_t *xfer, int timeout_ms);

/* Current state; *status_p (may be NULL) = the final status once DONE / FAILED, else SPEED_OK. */
speed_kv_xfer_state_t speed_kv_xfer_poll(speed_kv_xfer_t *xfer, speed_status_t *status_p);

/* Ends the transfer with SPEED_ERR_CANCELLED unless it already ended: no further puts, no
 * notify (if the notify was already sent, the decode side may still see it). Puts already posted
 * may still land in the decode node's blocks: the decode node must not reuse a cancelled
 * reservation's blocks before the lease ends or an abort (below) arrived. Use it when the
 * reservation may still be filled by another sender (a retry); speed_kv_xfer_abort when the
 * request is over. */
void speed_kv_xfer_cancel(speed_kv_xfer_t *xfer);

/* Cancels the transfer (as above) and, when the descriptor carries a nonce and the transfer was
 * still running, flushes the endpoint (every put posted is then complete at the target) and
 * sends an abort notify carrying the nonce (no ack): the decode node's cancel fence lifts and
 * the reservation is freed. Without it (no nonce, peer gone, flush failed) the decode node keeps
 * the blocks until the lease ends. Non-blocking: the abort runs on the progress thread, and the
 * transfer stays allocated until it is done, even if the handle is destroyed. */
void speed_kv_xfer_abort(speed_kv_xfer_t *xfer);

/* The abort notify for a request that never created a transfer (cancelled while queued): tells
 * the decode node of desc that nothing was and nothing will be put for request_id. SPEED_OK
 * (sent in the background, or nothing to send: no nonce), SPEED_ERR_INVALID_ARGUMENT,
 * SPEED_ERR_PEER_PROTOCOL (bad descriptor), SPEED_ERR_PEER_UNREACHABLE, SPEED_ERR_NO_MEMORY. */
speed_status_t speed_kv_xfer_ctx_abort_desc(speed_kv_xfer_ctx_t *ctx, const speed_kv_desc_t *desc,
                                            const char *request_id);

typedef struct {
    speed_kv_xfer_state_t state;
    speed_status_t status;
    speed_kv_stage_t failed_stage; /* valid when state == FAILED and status != CANCELLED */
    uint64_t bytes_put;            /* bytes of the puts posted */
    uint64_t n_puts;
    uint64_t total_bytes; /* what this transfer puts: the descriptor's total when the
                                     * head ranges are equal, this sender's share otherwise */
    uint64_t push_ns;     /* create -> last put posted */
    uint64_t finish_ns;   /* finish -> ack (0 while running) */
    uint64_t total_ns;    /* create -> end (0 while running) */
} speed_kv_xfer_info_t;

void speed_kv_xfer_info(speed_kv_xfer_t *xfer, speed_kv_xfer_info_t *info_p);

/* Releases the handle; valid in any state (a running transfer is cancelled first). Memory that
 * UCX callbacks still reference is freed when they have run. NULL is a no-op. */
void speed_kv_xfer_destroy(speed_kv_xfer_t *xfer);

#endif /* SPEED_KV_TRANSFER_H */
