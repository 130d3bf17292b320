/* Private to transfer/: not an API. The structures that kv_xfer_ctx.c (context, progress thread,
 * callbacks, registration, endpoints), kv_xfer.c (transfers) and kv_desc.c (building
 * descriptors) share, and the few functions one of them defines for the others. Only the files
 * of transfer/ include it (it sits in the library's one include directory, next to
 * kv_transfer.h, but it is no contract: fields and functions change with the implementation);
 * callers use kv_transfer.h.
 *
 * Locking. ctx->mu guards every field that callbacks touch (transfer states, endpoint flags,
 * counters). UCX calls are never made while holding ctx->mu: UCX runs callbacks with its worker
 * lock held, and callbacks take ctx->mu, so the only lock order is "worker, then mu". ctx->ep_mu
 * serialises endpoint creation among API threads (never taken by callbacks).
 *
 * Lifetimes. A transfer holds a reference on its endpoint; an endpoint that failed (error
 * callback, or a flush / ack timeout) is not handed out again, and the progress thread closes it
 * (forced) once no live transfer uses it, and frees it once no transfer points at it. A destroyed
 * transfer whose UCX requests are still pending (puts, flush, notify) becomes an orphan that the
 * progress thread frees when the last callback has run. Only the progress thread (and
 * ctx_destroy after joining it) closes endpoints and frees orphans, so nothing an API thread
 * is using can disappear under it.
 */
#ifndef SPEED_KV_TRANSFER_INTERNAL_H
#define SPEED_KV_TRANSFER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <ucp/api/ucp.h>

#include "clock.h"
#include "kv_notify_wire.h"
#include "kv_transfer.h"

/* ---- messages between the two contexts (UCX active messages) ------------------------------- */

#define AM_ID_NOTIFY 0x5301
#define AM_ID_ACK    0x5302
#define AM_ID_WRITE  0x5303 /* a KV write the receiver checks against its grant, then copies */
#define MSG_MAGIC    SPEED_KV_NOTIFY_MAGIC
#define REQ_ID_MAX   SPEED_KV_NOTIFY_ID_MAX

/* The notify's fields are speed_kv_notify_wire_t (kv_notify_wire.h), sent as its bytes. */

typedef struct {
    uint32_t magic;
    int32_t status;
    uint64_t token;
} ack_msg_t;

/* Decoding the ack a decode node sent back (kv_xfer_ctx.c; untrusted bytes, fuzzed by
 * tests/fuzz; the notify's decoder is kv_notify_wire.h's): exactly sizeof(ack_msg_t) bytes with
 * MSG_MAGIC; a status that is not a known speed_status_t reads as SPEED_ERR_PEER_PROTOCOL.
 * Returns false (nothing logged: an ack nobody waits for is dropped) or true with *a_p filled. */
bool speed_kv_ack_decode(const void *data, size_t length, ack_msg_t *a_p);

/* The header of a KV write (AM_ID_WRITE; the data follows as the message's payload, sent eager).
 * Where the bytes go is the sender's computation from the descriptor, as for a put; the
 * receiver copies them there only if the grant of request_id exists, the nonce is its own, and
 * [raddr, raddr + length) lies inside the unit of logical block `block` of `layer` of that
 * grant's reservation. */
#define WRITE_MAGIC 0x4b565752u /* "RWVK" */
typedef struct {
    uint32_t magic;
    uint32_t layer;
    int64_t block; /* logical block index in the layer */
    uint64_t raddr;
    char request_id[REQ_ID_MAX];
    uint8_t nonce[SPEED_KV_NONCE_BYTES];
} write_hdr_t;

typedef struct ack_buf {
    struct ack_buf *prev, *next;
    struct speed_kv_xfer_ctx *ctx;
    ack_msg_t msg;
} ack_buf_t;

/* ---- context state ------------------------------------------------------------------------- */

/* Decode side: a reservation's secret and its layout (the descriptor's addresses are this node's
 * own): to check every KV write against the reservation's blocks, and, in integrity mode, to
 * verify the notify's tags over the received bytes. */
typedef struct {
    uint64_t base, stride;
    int32_t *table; /* [n_blocks] */
    uint32_t n_blocks;
} grant_pool_t;

typedef struct kv_grant {
    struct kv_grant *next;
    char id[REQ_ID_MAX];
    uint8_t nonce[SPEED_KV_NONCE_BYTES];
    uint64_t deadline_ns;          /* CLOCK_MONOTONIC: dropped after it */
    const speed_kv_cache_t *cache; /* the one desc was built on: deregistering it drops the grant */
    bool integrity;
    bool device;        /* the pools are device memory (cuda_direct): writes cannot be copied, puts only */
    bool checking;      /* its notify's tags are being verified (progress thread, ctx->mu not held) */
    bool orphan;        /* unlinked (dropped, expired) while checking: the checker frees it */
    uint64_t n_refused; /* writes with the right nonce that were refused (outside the units, device
                         * pools): the KV is incomplete, its notify is refused */
    int block_tokens;
    uint64_t unit_bytes;
    uint32_t n_layers, n_pools;
    speed_kv_desc_layer_t *layers; /* [n_layers] */
    grant_pool_t *pools;           /* [n_pools] */
} kv_grant_t;

typedef struct kv_region {
    struct kv_region *next;
    const speed_kv_cache_t *cache;
    speed_kv_pool_t pool;
    void *base;
    size_t length;
    ucp_mem_h memh;
    void *rkey; /* packed */
    size_t rkey_len;
} kv_region_t;

typedef struct kv_ep {
    struct kv_ep *next;
    struct speed_kv_xfer_ctx *ctx;
    uint8_t *addr;
    size_t addr_len;
    speed_kv_transport_t transport;
    ucp_ep_h ep;
    bool failed; /* not handed out again */
    bool closed; /* ucp_ep_close_nbx issued; ep is gone */
    int refs;    /* transfers pointing at it */
    int live;    /* of which not ended */
    int in_use;  /* API threads inside a UCX call on it */
} kv_ep_t;

struct speed_kv_xfer_ctx {
    speed_kv_xfer_ctx_params_t p;
    uint64_t epoch;
    ucp_context_h ucp;
    ucp_worker_h worker;
    uint8_t *addr;
    size_t addr_len;
    int efd;
    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t ep_mu;
    bool closing; /* teardown: error callbacks are expected */
    kv_region_t *regions;
    kv_ep_t *eps;
    speed_kv_xfer_t *xfers;
    ack_buf_t *acks;    /* acks being sent */
    kv_grant_t *grants; /* decode side: reservations' nonces */
    void **close_reqs;  /* ucp_ep_close_nbx requests not completed */
    int n_close_reqs, cap_close_reqs;
    uint64_t next_token;
    speed_kv_xfer_ctx_stats_t stats;
};

/* ---- transfer state ------------------------------------------------------------------------ */

typedef struct {
    uint32_t pool;
    uint64_t offset;
    int64_t entries;
    int64_t first_block; /* the descriptor's: blocks before it are never put */
    int64_t sent_blocks; /* blocks put so far, counted from 0 (starts at first_block) */
    bool done;
} xfer_layer_t;

typedef struct {
    uint64_t base, stride;
    int32_t *table;
    uint32_t n_blocks;
    ucp_rkey_h rkey;
} xfer_pool_t;

struct speed_kv_xfer {
    struct speed_kv_xfer *prev, *next; /* ctx->xfers */
    struct speed_kv_xfer_ctx *ctx;
    kv_ep_t *ep;
    uint64_t token;
    char request_id[REQ_ID_MAX];
    const speed_kv_cache_t *cache;
    const speed_kv_seq_t *seq;
    ucp_mem_h lmemh[SPEED_KV_POOL_COUNT];
    int n_layers;
    xfer_layer_t *layers;
    xfer_pool_t *pools;
    uint32_t n_pools;
    int n_layers_done;
    int block_tokens;
    size_t token_bytes, half_unit;
    /* Head ranges differ (tensor-parallel resharding): per token slot, one run of the common
     * heads for K and one for V, at each side's own slot stride and head offset. */
    bool strided;
    size_t run;                        /* n_common * head_dim * dtype size */
    size_t l_slot, l_head_off;         /* local slot stride, offset of the common heads in a slot */
    size_t r_slot, r_head_off, r_half; /* the same remote; r_half = B * r_slot (K -> V) */
    uint64_t total_bytes;
    uint64_t lease_end_ns;                      /* CLOCK_MONOTONIC; 0 = no lease */
    speed_kv_notify_wire_t msg;                 /* the notify's fields */
    bool integrity;                             /* compute a tag per layer at finish */
    bool has_nonce;                             /* a cancel sends an abort notify */
    bool am_write;                              /* KV goes as checked writes (AM_ID_WRITE), not puts */
    bool aborting;                              /* cancelled: flushing, then sending the abort notify */
    bool abort_sent;                            /* the abort notify went out (once) */
    uint8_t abort_wire[SPEED_KV_NOTIFY_HEADER]; /* its bytes (x->wire may still be in flight) */
    uint8_t *wire;                              /* [wire_len] the notify's bytes; must live until its send completes */
    size_t wire_len;
    /* under ctx->mu */
    speed_kv_xfer_state_t state;
    speed_status_t status;
    speed_kv_stage_t failed_stage;
    uint64_t deadline_ns; /* of the current flush / ack wait */
    int pending;          /* flush and notify requests whose callbacks reference this */
    bool orphan;          /* destroyed by the user, freed when pending and puts are 0 */
    uint64_t bytes_put, n_puts;
    uint64_t t_create, t_push, t_finish, t_end;
    atomic_int puts_pending; /* put (or write) requests not completed */
};

/* ---- small helpers ------------------------------------------------------------------------- */

/* Whether a lease (its end on this host's monotonic clock; 0 = none) has ended. */
static inline bool lease_passed(uint64_t lease_end_ns) { return lease_end_ns && speed_clock_mono_ns() >= lease_end_ns; }

/* The transfer's request id for logs, NULL when it has none. */
static inline const char *rid(const speed_kv_xfer_t *x) { return x->request_id[0] ? x->request_id : NULL; }

static inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Entries a sender puts for a descriptor layer: those of its blocks from first_block on (the
 * first of them whole from its first slot); 0 when first_block is past the last. */
static inline uint64_t desc_layer_sent(const speed_kv_desc_layer_t *ly, int B) {
    int64_t skipped = ly->first_block * (int64_t)B;
    return ly->entries > skipped ? (uint64_t)(ly->entries - skipped) : 0;
}

static inline bool ended(const speed_kv_xfer_t *x) {
    return x->state == SPEED_KV_XFER_DONE || x->state == SPEED_KV_XFER_FAILED;
}

/* ---- defined in kv_xfer_ctx.c -------------------------------------------------------------- */

/* The registration of a pool of the cache, or NULL. ctx->mu held. */
kv_region_t *speed_kv_xfer_ctx_region_find(speed_kv_xfer_ctx_t *ctx, const speed_kv_cache_t *cache,
                                           speed_kv_pool_t pool);

/* A healthy cached endpoint to addr in this mode, or a new one; with a reference taken (refs and
 * live). Returns SPEED_OK, SPEED_ERR_PEER_UNREACHABLE or SPEED_ERR_NO_MEMORY (logged with
 * request_id). ctx->mu not held. */
speed_status_t speed_kv_xfer_ctx_ep_get(speed_kv_xfer_ctx_t *ctx, const uint8_t *addr, size_t addr_len,
                                        speed_kv_transport_t transport, const char *request_id, kv_ep_t **ep_p);

/* ---- defined in kv_xfer.c ------------------------------------------------------------------ */

/* Ends a running transfer with an error, once (no-op if it has ended); logs it. ctx->mu held. */
void speed_kv_xfer_fail_locked(speed_kv_xfer_t *xfer, speed_status_t status, speed_kv_stage_t stage, const char *why);

/* Ends a running transfer with SPEED_OK (the ack said so). ctx->mu held. */
void speed_kv_xfer_done_locked(speed_kv_xfer_t *xfer);

/* Frees a transfer that is unlinked from ctx->xfers (or the context is going away) and that no
 * UCX request references any more. */
void speed_kv_xfer_free(speed_kv_xfer_t *xfer);

/* ---- defined in kv_grant.c ----------------------------------------------------------------- */

/* The address of block i of a layer (its unit) for a tag: the caller's layout. */
typedef const uint8_t *(*kv_block_addr_fn)(void *user, int64_t i);

/* The integrity tag of one layer: speed_mac keyed by the nonce over u32 layer, i64 entries,
 * i64 first_block, then the bytes a transfer puts for it, in put order (per block from
 * first_block on: the whole unit when full; the last partial block's n K rows, then its n V
 * rows). A partial transfer's tag covers exactly what it writes, and the layout it was made
 * for. unit_bytes = 2 * B * token half. Returns SPEED_OK or the MAC's status. */
speed_status_t speed_kv_layer_tag(const uint8_t nonce[SPEED_KV_NONCE_BYTES], int layer, int64_t entries,
                                  int64_t first_block, int B, uint64_t unit_bytes, kv_block_addr_fn addr, void *user,
                                  uint8_t tag[SPEED_KV_TAG_BYTES]);

/* Records a grant for desc (built by this context): id, nonce, lease, the layout, and whether
 * the pools are device memory (cache: the one desc describes). Drops expired grants first. Returns SPEED_OK,
 * SPEED_ERR_INVALID_ARGUMENT (id already granted) or SPEED_ERR_NO_MEMORY. ctx->mu not held. */
speed_status_t speed_kv_grant_add(speed_kv_xfer_ctx_t *ctx, const char *id, const speed_kv_desc_t *desc,
                                  int64_t grant_ms, const speed_kv_cache_t *cache, bool device);

/* Drops every grant of descriptors built on cache (it is being deregistered). ctx->mu not held. */
void speed_kv_grant_drop_cache(speed_kv_xfer_ctx_t *ctx, const speed_kv_cache_t *cache);

/* A KV write that arrived (progress thread; h NULL when the message was malformed): copies the
 * data to h->raddr if the grant of h->request_id exists and has not expired, h->nonce is its
 * nonce (constant time), its pools are host memory, and [raddr, raddr + length) lies inside the
 * unit of block h->block of layer h->layer of that reservation; else drops it and counts it
 * (n_writes_dropped; a debug log, never the nonce). A write with the right nonce that is refused
 * all the same (outside the units, device pools) also marks the grant, whose notify is then
 * refused: the sender proved it is the reservation's, so its KV is incomplete. The copy happens under ctx->mu, so once
 * speed_kv_xfer_ctx_grant_drop has returned no write for that grant touches the pool any more.
 * ctx->mu not held. */
void speed_kv_grant_write(speed_kv_xfer_ctx_t *ctx, const write_hdr_t *h, const void *data, size_t length);

/* Checks a decoded notify against its grant (progress thread): the grant exists and the nonce
 * matches (constant time) -> an abort drops the grant and returns SPEED_OK; otherwise the KV is
 * refused if any of the reservation's writes was (speed_kv_grant_write), and in integrity mode
 * the tags are verified over the local blocks. Returns SPEED_OK, SPEED_ERR_NOT_FOUND (no grant),
 * SPEED_ERR_PEER_PROTOCOL (wrong nonce), SPEED_ERR_TRANSFER (writes refused, or tags missing or
 * not matching: the grant is dropped; n_integrity_failed counted for the tags). Logs the
 * refusals but NOT_FOUND (never the nonce).
 * ctx->mu not held. */
speed_status_t speed_kv_grant_check(speed_kv_xfer_ctx_t *ctx, const speed_kv_notify_wire_t *m);

/* Frees every grant (ctx_destroy). */
void speed_kv_grant_free_all(speed_kv_xfer_ctx_t *ctx);

/* ---- defined in kv_desc.c ------------------------------------------------------------------ */

/* Prompt entries of an engine sequence (its prompt length and depth) and its KV sequence.
 * Returns SPEED_OK or the engine's status (SPEED_ERR_NOT_FOUND). */
speed_status_t speed_kv_engine_seq_entries(speed_engine_t *engine, speed_seq_id_t seq, speed_kv_seq_t **kv_p,
                                           int64_t *n_full_p, int64_t *n_compact_p);

#endif /* SPEED_KV_TRANSFER_INTERNAL_H */
