/* UCX KV transfer, the transfers (kv_transfer.h): creating one from a descriptor (the layout
 * checks), pushing a layer's blocks as checked writes (a descriptor with a grant's nonce: active
 * messages the receiver checks against the grant before copying, kv_grant.c) or as one-sided
 * puts (no nonce, or cuda_direct), finish (flush, then the notify), wait / poll /
 * cancel / info / destroy, and the UCX callbacks of those operations. The context they run in
 * is kv_xfer_ctx.c; the shared structures, the locking and the lifetimes are described in
 * kv_transfer_internal.h.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <ucp/api/ucp.h>

#include "alloc.h"
#include "kv_transfer.h"
#include "kv_transfer_internal.h"
#include "log.h"
#include "mac.h"

/* ---- ending a transfer ---------------------------------------------------------------------- */

const char *speed_kv_stage_name(speed_kv_stage_t s) {
    switch (s) {
    case SPEED_KV_STAGE_CONNECT: return "connect";
    case SPEED_KV_STAGE_PUT: return "put";
    case SPEED_KV_STAGE_FLUSH: return "flush";
    case SPEED_KV_STAGE_NOTIFY: return "notify";
    case SPEED_KV_STAGE_COUNT: break;
    }
    return "?";
}

/* Status of a failed UCX operation: a peer that went away, or a transfer error. */
static speed_status_t op_status(const kv_ep_t *e, ucs_status_t s) {
    if (e->failed) return SPEED_ERR_PEER_UNREACHABLE;
    switch (s) {
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED: return SPEED_ERR_PEER_UNREACHABLE;
    default: return SPEED_ERR_TRANSFER;
    }
}

/* Logs once, where the failure is noticed. */
void speed_kv_xfer_fail_locked(speed_kv_xfer_t *x, speed_status_t st, speed_kv_stage_t stage, const char *why) {
    if (ended(x)) return;
    speed_kv_xfer_ctx_t *c = x->ctx;
    x->state = SPEED_KV_XFER_FAILED;
    x->status = st;
    x->failed_stage = stage;
    x->t_end = speed_clock_mono_ns();
    x->ep->live--;
    if (st == SPEED_ERR_CANCELLED) {
        c->stats.n_cancelled++;
        speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, rid(x), "kv transfer cancelled");
    } else {
        c->stats.n_failed[stage]++;
        speed_log(c->closing ? SPEED_LOG_DEBUG : SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x),
                  "kv transfer failed at %s: %s (%s)", speed_kv_stage_name(stage), why, speed_status_string(st));
    }
    pthread_cond_broadcast(&c->cv);
}

void speed_kv_xfer_done_locked(speed_kv_xfer_t *x) {
    if (ended(x)) return;
    speed_kv_xfer_ctx_t *c = x->ctx;
    x->state = SPEED_KV_XFER_DONE;
    x->status = SPEED_OK;
    x->t_end = speed_clock_mono_ns();
    x->ep->live--;
    c->stats.n_done++;
    c->stats.done_ns += x->t_end - x->t_create;
    pthread_cond_broadcast(&c->cv);
}

/* ---- callbacks of the puts, the flush and the notify (progress thread, UCX worker lock held) -- */

static void put_cb(void *req, ucs_status_t status, void *user) {
    speed_kv_xfer_t *x = user;
    if (status != UCS_OK) {
        pthread_mutex_lock(&x->ctx->mu);
        speed_kv_xfer_fail_locked(x, op_status(x->ep, status), SPEED_KV_STAGE_PUT, ucs_status_string(status));
        pthread_mutex_unlock(&x->ctx->mu);
    }
    ucp_request_free(req);
    atomic_fetch_sub(&x->puts_pending, 1);
}

static void notify_sent_cb(void *req, ucs_status_t status, void *user) {
    speed_kv_xfer_t *x = user;
    ucp_request_free(req);
    pthread_mutex_lock(&x->ctx->mu);
    x->pending--;
    if (x->aborting && x->abort_sent && status == UCS_OK) x->ctx->stats.n_aborts_sent++;
    if (status != UCS_OK)
        speed_kv_xfer_fail_locked(x, op_status(x->ep, status), SPEED_KV_STAGE_NOTIFY, ucs_status_string(status));
    pthread_mutex_unlock(&x->ctx->mu);
}

/* Sends the notify; the caller made x NOTIFYING and counted one pending for it. Runs on the
 * caller's thread (finish, flush completed at once) or the progress thread (flush callback). */
static void send_notify(speed_kv_xfer_t *x) {
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS,
        .cb.send = notify_sent_cb,
        .user_data = x,
        .flags = UCP_AM_SEND_FLAG_REPLY,
    };
    if (x->aborting) { /* no ack for an abort: nobody waits for it */
        prm.op_attr_mask &= ~(uint32_t)UCP_OP_ATTR_FIELD_FLAGS;
        prm.flags = 0;
    }
    const void *buf = x->aborting ? (const void *)x->abort_wire : x->wire;
    size_t len = x->aborting ? sizeof x->abort_wire : x->wire_len;
    ucs_status_ptr_t r = ucp_am_send_nbx(x->ep->ep, AM_ID_NOTIFY, NULL, 0, buf, len, &prm);
    if (UCS_PTR_IS_PTR(r)) return;
    pthread_mutex_lock(&x->ctx->mu);
    x->pending--;
    if (x->aborting && x->abort_sent && !UCS_PTR_IS_ERR(r)) x->ctx->stats.n_aborts_sent++;
    if (UCS_PTR_IS_ERR(r))
        speed_kv_xfer_fail_locked(x, op_status(x->ep, UCS_PTR_STATUS(r)), SPEED_KV_STAGE_NOTIFY,
                                  ucs_status_string(UCS_PTR_STATUS(r)));
    pthread_mutex_unlock(&x->ctx->mu);
}

/* Flush done: the puts are complete at the target. Next: the notify. */
static void flush_done(speed_kv_xfer_t *x, ucs_status_t status) {
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    x->pending--;
    if (x->aborting) {
        /* An aborted transfer: its puts are all complete at the target, so the abort notify may
         * go (once: the finish's flush and the abort's own may both land here). A failed flush or
         * endpoint sends nothing: the decode node cannot know what may still arrive, and its
         * fence waits for the lease. */
        bool send = status == UCS_OK && !x->ep->failed && !x->abort_sent;
        if (send) {
            x->abort_sent = true;
            x->pending++;
        }
        pthread_mutex_unlock(&c->mu);
        if (send) send_notify(x);
        return;
    }
    if (x->state != SPEED_KV_XFER_FLUSHING) { /* timed out, failed or cancelled meanwhile */
        pthread_mutex_unlock(&c->mu);
        return;
    }
    if (status != UCS_OK) {
        speed_kv_xfer_fail_locked(x, op_status(x->ep, status), SPEED_KV_STAGE_FLUSH, ucs_status_string(status));
        pthread_mutex_unlock(&c->mu);
        return;
    }
    if (lease_passed(x->lease_end_ns)) {
        speed_kv_xfer_fail_locked(x, SPEED_ERR_TIMEOUT, SPEED_KV_STAGE_NOTIFY,
                                  "the lease deadline passed before the notify");
        pthread_mutex_unlock(&c->mu);
        return;
    }
    x->state = SPEED_KV_XFER_NOTIFYING;
    x->deadline_ns = speed_clock_mono_ns() + (uint64_t)c->p.op_timeout_ms * 1000000ull;
    x->pending++;
    pthread_mutex_unlock(&c->mu);
    send_notify(x);
}

static void flush_cb(void *req, ucs_status_t status, void *user) {
    ucp_request_free(req);
    flush_done(user, status);
}

void speed_kv_xfer_free(speed_kv_xfer_t *x) {
    for (uint32_t p = 0; p < x->n_pools; p++) {
        if (x->pools[p].rkey) ucp_rkey_destroy(x->pools[p].rkey);
        speed_free(x->pools[p].table);
    }
    speed_free(x->pools);
    speed_free(x->layers);
    if (x->wire) speed_free(x->wire);
    memset(&x->msg, 0, sizeof x->msg); /* the nonce */
    speed_free(x);
}

/* Gives x its token, links it into the context's list and counts it started (state PUSHING).
 * Caller holds c->mu. */
static void xfer_start_locked(speed_kv_xfer_ctx_t *c, speed_kv_xfer_t *x) {
    x->state = SPEED_KV_XFER_PUSHING;
    x->token = x->msg.token = c->next_token++;
    x->next = c->xfers;
    if (c->xfers) c->xfers->prev = x;
    c->xfers = x;
    c->stats.n_started++;
}

/* ---- transfers -------------------------------------------------------------------------------- */

#define REFUSE(st_, ...)                                                                               \
    do {                                                                                               \
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, request_id, "kv transfer refused: " __VA_ARGS__); \
        st = (st_);                                                                                    \
        goto refuse;                                                                                   \
    } while (0)

speed_status_t speed_kv_xfer_create(speed_kv_xfer_ctx_t *c, const speed_kv_desc_t *d, const speed_kv_cache_t *cache,
                                    const speed_kv_seq_t *seq, int64_t n_full, int64_t n_compact,
                                    const char *request_id, speed_kv_xfer_t **xfer_p) {
    if (!c || !d || !cache || !seq || !xfer_p) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: create: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (request_id && !*request_id) request_id = NULL;
    speed_status_t st = SPEED_OK;
    speed_kv_xfer_t *x = NULL;
    const int L = speed_kv_cache_n_layers(cache), B = speed_kv_cache_block_tokens(cache);
    const int C = speed_kv_seq_prefill_layers(seq);
    const speed_kv_layer_t l0 = speed_kv_cache_layer(cache, 0);
    const size_t token_bytes = speed_kv_cache_token_bytes(cache);

    if (speed_kv_desc_check(d) != SPEED_OK) REFUSE(SPEED_ERR_PEER_PROTOCOL, "the descriptor is malformed");
    if (d->dtype != l0.dtype)
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "dtype %s, the local cache holds %s", speed_dtype_name(d->dtype),
               speed_dtype_name(l0.dtype));
    if (d->block_tokens != B) REFUSE(SPEED_ERR_PEER_PROTOCOL, "block_tokens %d, local %d", d->block_tokens, B);
    if (d->head_dim != l0.head_dim) REFUSE(SPEED_ERR_PEER_PROTOCOL, "head_dim %d, local %d", d->head_dim, l0.head_dim);
    /* heads: the model's total must agree; this transfer puts the intersection of the ranges */
    const int lb = speed_kv_cache_head_begin(cache), le = lb + l0.n_kv_heads;
    const int lm = speed_kv_cache_model_kv_heads(cache);
    if (d->model_kv_heads != lm && (d->model_kv_heads != 0 || d->head_end > lm))
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "heads [%d, %d) of a model with %d KV heads, the local cache's has %d",
               d->head_begin, d->head_end, d->model_kv_heads, lm);
    const int hb = d->head_begin > lb ? d->head_begin : lb, he = d->head_end < le ? d->head_end : le;
    if (hb >= he)
        REFUSE(SPEED_ERR_PEER_PROTOCOL,
               "heads [%d, %d) of %d, the local cache holds [%d, %d): the head ranges do not overlap, nothing to send",
               d->head_begin, d->head_end, lm, lb, le);
    const bool strided = d->head_begin != lb || d->head_end != le;
    if ((int)d->n_layers != L) REFUSE(SPEED_ERR_PEER_PROTOCOL, "%u layers, local %d", d->n_layers, L);
    if (!strided && d->unit_bytes != speed_kv_cache_unit_bytes(cache))
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "unit of %llu bytes, local %zu", (unsigned long long)d->unit_bytes,
               speed_kv_cache_unit_bytes(cache));
    /* what this sender puts per entry: K and V of the common heads (token_bytes when not strided) */
    const size_t head_bytes = (size_t)l0.head_dim * speed_dtype_size(l0.dtype);
    const size_t put_token_bytes = 2 * (size_t)(he - hb) * head_bytes;
    uint64_t total = 0, desc_total = 0;
    for (int l = 0; l < L; l++) {
        int64_t want = l < C ? n_full : n_compact;
        if (d->layers[l].entries != want)
            REFUSE(SPEED_ERR_PEER_PROTOCOL, "layer %d: %lld entries, the local sequence has %lld (depth C %d)", l,
                   (long long)d->layers[l].entries, (long long)want, C);
        if (want > speed_kv_seq_capacity(seq, l))
            REFUSE(SPEED_ERR_INVALID_ARGUMENT, "layer %d: %lld entries past the local room %lld", l, (long long)want,
                   (long long)speed_kv_seq_capacity(seq, l));
        /* a partial transfer: only the layer's blocks from first_block (the decode node holds the rest) */
        uint64_t sent = desc_layer_sent(&d->layers[l], B);
        total += sent * put_token_bytes;
        desc_total += sent * (uint64_t)d->n_kv_heads * 2 * head_bytes;
    }
    if (d->total_bytes != desc_total) /* desc_check verified it against the descriptor's shape */
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "total of %llu bytes, local %llu", (unsigned long long)d->total_bytes,
               (unsigned long long)desc_total);
    /* the lease counts from when this side received the descriptor, on this side's clock */
    const uint64_t t0 = d->received_ns ? d->received_ns : speed_clock_mono_ns();
    const uint64_t lease_end = d->lease_ms > 0 ? t0 + (uint64_t)d->lease_ms * 1000000ull : 0;
    if (lease_passed(lease_end))
        REFUSE(SPEED_ERR_TIMEOUT, "the lease of %lld ms ended %llu ms ago", (long long)d->lease_ms,
               (unsigned long long)((speed_clock_mono_ns() - lease_end) / 1000000ull));
    if (d->integrity && strided)
        REFUSE(SPEED_ERR_UNSUPPORTED, "integrity mode needs equal head ranges on both sides (no tensor-parallel "
                                      "resharding)");
    if (d->integrity && !d->has_nonce) REFUSE(SPEED_ERR_PEER_PROTOCOL, "integrity mode without a nonce");

    x = speed_calloc(1, sizeof *x);
    if (!x) REFUSE(SPEED_ERR_NO_MEMORY, "out of memory");
    x->ctx = c;
    x->cache = cache;
    x->seq = seq;
    x->n_layers = L;
    x->block_tokens = B;
    x->token_bytes = token_bytes;
    x->half_unit = speed_kv_cache_unit_bytes(cache) / 2;
    x->strided = strided;
    x->run = (size_t)(he - hb) * head_bytes;
    x->l_slot = (size_t)l0.n_kv_heads * head_bytes;
    x->l_head_off = (size_t)(hb - lb) * head_bytes;
    x->r_slot = (size_t)d->n_kv_heads * head_bytes;
    x->r_head_off = (size_t)(hb - d->head_begin) * head_bytes;
    x->r_half = (size_t)B * x->r_slot;
    x->total_bytes = total;
    x->lease_end_ns = lease_end;
    x->integrity = d->integrity;
    x->has_nonce = d->has_nonce;
    /* With a grant, the KV goes as writes the decode node checks against it before copying:
     * a write delayed past the reservation's end is dropped there (kv_grant.c). Puts remain
     * for descriptors without a nonce and for cuda_direct (GPU memory the receiver cannot copy
     * into; a cluster-wide setting). */
    x->am_write = d->has_nonce && !c->p.cuda_direct;
    x->t_create = speed_clock_mono_ns();
    if (request_id) snprintf(x->request_id, sizeof x->request_id, "%s", request_id);
    x->layers = speed_calloc((size_t)L, sizeof *x->layers);
    x->pools = speed_calloc(d->n_pools, sizeof *x->pools);
    if (!x->layers || !x->pools) REFUSE(SPEED_ERR_NO_MEMORY, "out of memory");
    x->n_pools = d->n_pools;
    for (uint32_t p = 0; p < d->n_pools; p++) {
        x->pools[p].base = d->pools[p].base;
        x->pools[p].stride = d->pools[p].block_stride;
        x->pools[p].n_blocks = d->pools[p].n_blocks;
        x->pools[p].table = speed_malloc((size_t)(d->pools[p].n_blocks ? d->pools[p].n_blocks : 1) * sizeof(int32_t));
        if (!x->pools[p].table) REFUSE(SPEED_ERR_NO_MEMORY, "out of memory");
        if (d->pools[p].n_blocks) memcpy(x->pools[p].table, d->pools[p].table, d->pools[p].n_blocks * sizeof(int32_t));
    }
    for (int l = 0; l < L; l++) {
        x->layers[l].pool = d->layers[l].pool;
        x->layers[l].offset = d->layers[l].offset;
        x->layers[l].entries = d->layers[l].entries;
        x->layers[l].first_block = x->layers[l].sent_blocks = d->layers[l].first_block;
        if (desc_layer_sent(&d->layers[l], B) == 0) {
            x->layers[l].done = true;
            x->n_layers_done++;
        }
    }
    pthread_mutex_lock(&c->mu);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        kv_region_t *r = speed_kv_xfer_ctx_region_find(c, cache, (speed_kv_pool_t)p);
        x->lmemh[p] = r ? r->memh : NULL;
    }
    pthread_mutex_unlock(&c->mu);
    for (int l = 0; l < L; l++)
        if (!x->lmemh[speed_kv_cache_layer_pool(cache, l)])
            REFUSE(SPEED_ERR_INVALID_ARGUMENT, "the local cache is not registered (speed_kv_xfer_ctx_register_cache)");

    /* connect: endpoint and rkeys */
    st = speed_kv_xfer_ctx_ep_get(c, d->worker_addr, d->worker_addr_len, d->transport, request_id, &x->ep);
    if (st != SPEED_OK) {
        pthread_mutex_lock(&c->mu);
        c->stats.n_failed[SPEED_KV_STAGE_CONNECT]++;
        pthread_mutex_unlock(&c->mu);
        speed_kv_xfer_free(x);
        return st;
    }
    for (uint32_t p = 0; p < d->n_pools && !x->am_write; p++) { /* checked writes need no rkeys */
        const speed_kv_desc_region_t *g = &d->regions[d->pools[p].region];
        ucs_status_t s = g->rkey_len ? ucp_ep_rkey_unpack(x->ep->ep, g->rkey, &x->pools[p].rkey) : UCS_ERR_UNSUPPORTED;
        if (s != UCS_OK) {
            x->pools[p].rkey = NULL;
            if (g->rkey_len == 0) /* a decode node that takes checked writes only; this side puts */
                speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, request_id,
                          "kv transfer: the descriptor carries no rkeys (its decode node takes checked writes "
                          "only), but this node sends puts (ucx.cuda_direct): set ucx.cuda_direct alike on both");
            else
                speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, request_id,
                          "kv transfer: rkey of region %u does not unpack: %s", d->pools[p].region,
                          ucs_status_string(s));
            pthread_mutex_lock(&c->mu);
            c->stats.n_failed[SPEED_KV_STAGE_CONNECT]++;
            x->ep->refs--;
            x->ep->live--;
            pthread_mutex_unlock(&c->mu);
            speed_kv_xfer_free(x);
            return SPEED_ERR_PEER_PROTOCOL;
        }
    }
    x->msg = (speed_kv_notify_wire_t){
        .cookie = d->cookie, .bytes = total, .epoch = d->epoch, .head_begin = hb, .head_end = he};
    snprintf(x->msg.request_id, sizeof x->msg.request_id, "%s", x->request_id);
    if (d->has_nonce) memcpy(x->msg.nonce, d->nonce, sizeof x->msg.nonce);
    pthread_mutex_lock(&c->mu);
    xfer_start_locked(c, x);
    pthread_mutex_unlock(&c->mu);
    speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, request_id,
              "kv transfer: %s, %llu bytes in %d layers, heads [%d, %d)%s", speed_kv_transport_name(d->transport),
              (unsigned long long)total, L, hb, he, strided ? " (strided: the head ranges differ)" : "");
    *xfer_p = x;
    return SPEED_OK;
refuse:
    pthread_mutex_lock(&c->mu);
    c->stats.n_refused++;
    pthread_mutex_unlock(&c->mu);
    if (x) speed_kv_xfer_free(x);
    return st;
}

speed_status_t speed_kv_xfer_create_engine(speed_kv_xfer_ctx_t *c, const speed_kv_desc_t *d, speed_engine_t *engine,
                                           speed_seq_id_t seq, const char *request_id, speed_kv_xfer_t **xfer_p) {
    if (!engine) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: NULL engine");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_seq_t *kv;
    int64_t n_full, n_compact;
    SPEED_CHECK(speed_kv_engine_seq_entries(engine, seq, &kv, &n_full, &n_compact));
    return speed_kv_xfer_create(c, d, speed_engine_kv_cache(engine), kv, n_full, n_compact, request_id, xfer_p);
}

typedef struct {
    speed_kv_xfer_t *x;
    write_hdr_t h; /* UCX 1.13 reads an AM header until the send completes */
} write_req_t;

static void write_req_free(write_req_t *w) {
    memset(&w->h, 0, sizeof w->h); /* the nonce */
    speed_free(w);
}

static void write_cb(void *req, ucs_status_t status, void *user) {
    write_req_t *w = user;
    speed_kv_xfer_t *x = w->x;
    if (status != UCS_OK) {
        pthread_mutex_lock(&x->ctx->mu);
        speed_kv_xfer_fail_locked(x, op_status(x->ep, status), SPEED_KV_STAGE_PUT, ucs_status_string(status));
        pthread_mutex_unlock(&x->ctx->mu);
    }
    ucp_request_free(req);
    write_req_free(w);
    atomic_fetch_sub(&x->puts_pending, 1);
}

/* One checked write (AM_ID_WRITE, eager: the receiver gets the bytes with the header and
 * decides before they touch its pool); false on an immediate error (*err set). */
static bool write_one(speed_kv_xfer_t *x, ucp_ep_h ep, int layer, int64_t block, const void *src, size_t len,
                      uint64_t raddr, ucs_status_t *err) {
    write_req_t *w = speed_malloc(sizeof *w);
    if (!w) {
        *err = UCS_ERR_NO_MEMORY;
        return false;
    }
    w->x = x;
    w->h = (write_hdr_t){.magic = WRITE_MAGIC, .layer = (uint32_t)layer, .block = block, .raddr = raddr};
    memcpy(w->h.request_id, x->msg.request_id, sizeof w->h.request_id);
    memcpy(w->h.nonce, x->msg.nonce, sizeof w->h.nonce);
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS,
        .cb.send = write_cb,
        .user_data = w,
        .flags = UCP_AM_SEND_FLAG_EAGER,
    };
    atomic_fetch_add(&x->puts_pending, 1);
    ucs_status_ptr_t r = ucp_am_send_nbx(ep, AM_ID_WRITE, &w->h, sizeof w->h, src, len, &prm);
    if (UCS_PTR_IS_PTR(r)) return true;
    atomic_fetch_sub(&x->puts_pending, 1);
    write_req_free(w);
    if (UCS_PTR_IS_ERR(r)) {
        *err = UCS_PTR_STATUS(r);
        return false;
    }
    return true;
}

/* One put, or one checked write (x->am_write); false on an immediate error (*err set). */
static bool put_one(speed_kv_xfer_t *x, ucp_ep_h ep, int layer, int64_t block, const void *src, size_t len,
                    uint64_t raddr, ucp_rkey_h rkey, ucp_mem_h memh, ucs_status_t *err) {
    if (x->am_write) return write_one(x, ep, layer, block, src, len, raddr, err);
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH,
        .cb.send = put_cb,
        .user_data = x,
        .memh = memh,
    };
    atomic_fetch_add(&x->puts_pending, 1);
    ucs_status_ptr_t r = ucp_put_nbx(ep, src, len, raddr, rkey, &prm);
    if (UCS_PTR_IS_PTR(r)) return true;
    atomic_fetch_sub(&x->puts_pending, 1);
    if (UCS_PTR_IS_ERR(r)) {
        *err = UCS_PTR_STATUS(r);
        return false;
    }
    return true;
}

speed_status_t speed_kv_xfer_push_layer(speed_kv_xfer_t *x, int layer, int64_t n_done, int64_t n_total) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    if (ended(x)) {
        speed_status_t st = x->status;
        pthread_mutex_unlock(&c->mu);
        return st;
    }
    const char *bad = NULL;
    if (x->state != SPEED_KV_XFER_PUSHING)
        bad = "push after finish";
    else if (layer < 0 || layer >= x->n_layers)
        bad = "layer out of range";
    else if (n_total != x->layers[layer].entries)
        bad = "n_total differs from the descriptor's entries";
    else if (n_done < 0 || n_done > n_total)
        bad = "n_done out of [0, n_total]";
    if (bad) {
        pthread_mutex_unlock(&c->mu);
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x), "kv transfer: %s (layer %d, %lld of %lld)", bad, layer,
                  (long long)n_done, (long long)n_total);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (lease_passed(x->lease_end_ns)) {
        speed_kv_xfer_fail_locked(x, SPEED_ERR_TIMEOUT, SPEED_KV_STAGE_PUT,
                                  "the lease deadline passed during the transfer");
        pthread_mutex_unlock(&c->mu);
        return SPEED_ERR_TIMEOUT;
    }
    xfer_layer_t *ly = &x->layers[layer];
    const int64_t B = x->block_tokens;
    int64_t to = n_done == n_total ? div_up(n_total, B) : n_done / B;
    int64_t from = ly->sent_blocks;
    if (to <= from) {
        pthread_mutex_unlock(&c->mu);
        return SPEED_OK;
    }
    x->ep->in_use++;
    ucp_ep_h ep = x->ep->ep;
    pthread_mutex_unlock(&c->mu);

    const xfer_pool_t *pl = &x->pools[ly->pool];
    ucp_mem_h memh = x->lmemh[speed_kv_cache_layer_pool(x->cache, layer)];
    uint64_t bytes = 0, n_puts = 0;
    ucs_status_t err = UCS_OK;
    bool ok = true;
    /* Host mirror (GPU pools): copy these blocks' units of the layer pool -> mirror first, on
     * this (the engine's) thread; the puts then read the mirror. Earlier layers' puts keep
     * running on the progress thread meanwhile: they read other units of the mirror. */
    speed_status_t stage_st = SPEED_OK;
    if (speed_kv_cache_host_mirror(x->cache)) {
        stage_st = speed_kv_cache_stage_out(x->cache, x->seq, layer, from, to);
        ok = stage_st == SPEED_OK;
    }
    int64_t i = from;
    for (; ok && i < to; i++) {
        void *src;
        size_t unit;
        if (speed_kv_cache_xfer_block_addr(x->cache, x->seq, layer, i, &src, &unit) != SPEED_OK) {
            err = UCS_ERR_INVALID_PARAM;
            ok = false;
            break;
        }
        uint64_t raddr = pl->base + (uint64_t)pl->table[i] * pl->stride + ly->offset;
        int64_t n = n_total - i * B < B ? n_total - i * B : B;
        if (x->strided) {
            /* UCX 1.13 puts are contiguous on both sides: one run per slot for K, one for V */
            const char *k = (const char *)src + x->l_head_off, *v = k + x->half_unit;
            uint64_t rk = raddr + x->r_head_off, rv = rk + x->r_half;
            for (int64_t s = 0; ok && s < n; s++)
                ok = put_one(x, ep, layer, i, k + (size_t)s * x->l_slot, x->run, rk + (uint64_t)s * x->r_slot, pl->rkey,
                             memh, &err) &&
                     put_one(x, ep, layer, i, v + (size_t)s * x->l_slot, x->run, rv + (uint64_t)s * x->r_slot, pl->rkey,
                             memh, &err);
            bytes += 2 * (uint64_t)n * x->run;
            n_puts += 2 * (uint64_t)n;
        } else if (n == B) {
            ok = put_one(x, ep, layer, i, src, unit, raddr, pl->rkey, memh, &err);
            bytes += unit;
            n_puts++;
        } else { /* partial last block: K rows, then V rows */
            size_t half = (size_t)n * x->token_bytes / 2;
            ok = put_one(x, ep, layer, i, src, half, raddr, pl->rkey, memh, &err) &&
                 put_one(x, ep, layer, i, (char *)src + x->half_unit, half, raddr + x->half_unit, pl->rkey, memh, &err);
            bytes += 2 * half;
            n_puts += 2;
        }
    }
    ucp_worker_signal(c->worker);

    pthread_mutex_lock(&c->mu);
    x->ep->in_use--;
    x->bytes_put += bytes;
    x->n_puts += n_puts;
    c->stats.bytes_put += bytes;
    x->t_push = speed_clock_mono_ns();
    speed_status_t st = SPEED_OK;
    if (stage_st != SPEED_OK) {
        speed_kv_xfer_fail_locked(x, stage_st, SPEED_KV_STAGE_PUT,
                                  "copying the layer's blocks to the host mirror failed");
        st = x->status;
    } else if (!ok) {
        speed_kv_xfer_fail_locked(x, err == UCS_ERR_INVALID_PARAM ? SPEED_ERR_INTERNAL : op_status(x->ep, err),
                                  SPEED_KV_STAGE_PUT, ucs_status_string(err));
        st = x->status;
    } else {
        ly->sent_blocks = to;
        if (n_done == n_total && !ly->done) {
            ly->done = true;
            x->n_layers_done++;
        }
        if (ended(x)) st = x->status; /* a put callback or the peer failed meanwhile */
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

speed_status_t speed_kv_xfer_push_all(speed_kv_xfer_t *x) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    for (int l = 0; l < x->n_layers; l++) {
        int64_t e = x->layers[l].entries;
        SPEED_CHECK(speed_kv_xfer_push_layer(x, l, e, e));
    }
    return SPEED_OK;
}

typedef struct {
    speed_kv_xfer_t *x;
    int layer;
} local_addr_t;

static const uint8_t *local_block(void *user, int64_t i) {
    const local_addr_t *a = user;
    void *src;
    size_t unit;
    if (speed_kv_cache_xfer_block_addr(a->x->cache, a->x->seq, a->layer, i, &src, &unit) != SPEED_OK) return NULL;
    return src;
}

/* x->wire: the notify (flags, tags) from x->msg. Not under ctx->mu (hashing takes time). */
static speed_status_t wire_encode(speed_kv_xfer_t *x, uint32_t flags, const uint8_t *tags, uint32_t n_tags) {
    x->msg.flags = flags;
    x->msg.tags = tags;
    x->msg.n_tags = n_tags;
    size_t len = speed_kv_notify_wire_size(n_tags);
    uint8_t *w = speed_malloc(len);
    if (!w) return SPEED_ERR_NO_MEMORY;
    speed_kv_notify_encode(&x->msg, w);
    x->msg.tags = NULL;
    speed_free(x->wire); /* finish runs once: no send uses the old one */
    x->wire = w;
    x->wire_len = len;
    return SPEED_OK;
}

static speed_status_t notify_build(speed_kv_xfer_t *x) {
    if (!x->integrity) return wire_encode(x, 0, NULL, 0);
    uint8_t *tags = speed_malloc((size_t)x->n_layers * SPEED_KV_TAG_BYTES);
    if (!tags) return SPEED_ERR_NO_MEMORY;
    speed_status_t st = SPEED_OK;
    const uint64_t unit = 2 * x->half_unit;
    for (int l = 0; l < x->n_layers && st == SPEED_OK; l++) {
        local_addr_t a = {.x = x, .layer = l};
        st = speed_kv_layer_tag(x->msg.nonce, l, x->layers[l].entries, x->layers[l].first_block, x->block_tokens, unit,
                                local_block, &a, tags + (size_t)l * SPEED_KV_TAG_BYTES);
    }
    if (st == SPEED_OK) st = wire_encode(x, 0, tags, (uint32_t)x->n_layers);
    speed_free(tags);
    return st;
}

speed_status_t speed_kv_xfer_finish(speed_kv_xfer_t *x) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    if (ended(x)) {
        speed_status_t st = x->status;
        pthread_mutex_unlock(&c->mu);
        return st;
    }
    if (x->state != SPEED_KV_XFER_PUSHING || x->n_layers_done != x->n_layers) {
        int l = 0;
        while (l < x->n_layers && x->layers[l].done) l++;
        pthread_mutex_unlock(&c->mu);
        if (l < x->n_layers)
            speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x), "kv transfer: finish with layer %d incomplete", l);
        else
            speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x), "kv transfer: finish called twice");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    pthread_mutex_unlock(&c->mu);
    /* The notify's bytes (with a tag per layer in integrity mode), made before the flush: the
     * local blocks are final, and a failure here fails the transfer before anything is sent. */
    speed_status_t wst = notify_build(x);
    pthread_mutex_lock(&c->mu);
    if (wst != SPEED_OK) speed_kv_xfer_fail_locked(x, wst, SPEED_KV_STAGE_NOTIFY, "the integrity tags failed");
    if (ended(x)) {
        speed_status_t st = x->status;
        pthread_mutex_unlock(&c->mu);
        return st;
    }
    x->state = SPEED_KV_XFER_FLUSHING;
    x->t_finish = speed_clock_mono_ns();
    x->deadline_ns = x->t_finish + (uint64_t)c->p.op_timeout_ms * 1000000ull;
    x->pending++;
    x->ep->in_use++;
    ucp_ep_h ep = x->ep->ep;
    pthread_mutex_unlock(&c->mu);

    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.send = flush_cb,
        .user_data = x,
    };
    ucs_status_ptr_t r = ucp_ep_flush_nbx(ep, &prm);
    if (!UCS_PTR_IS_PTR(r)) flush_done(x, UCS_PTR_STATUS(r)); /* completed (or failed) at once */
    ucp_worker_signal(c->worker);
    pthread_mutex_lock(&c->mu);
    x->ep->in_use--;
    speed_status_t st = ended(x) && x->status != SPEED_OK ? x->status : SPEED_OK;
    pthread_mutex_unlock(&c->mu);
    return st;
}

speed_status_t speed_kv_xfer_wait(speed_kv_xfer_t *x, int timeout_ms) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    speed_kv_xfer_ctx_t *c = x->ctx;
    /* c->cv measures CLOCK_MONOTONIC (speed_clock_cond_init); unused when timeout_ms < 0 */
    struct timespec until = speed_clock_deadline(CLOCK_MONOTONIC, timeout_ms);
    pthread_mutex_lock(&c->mu);
    while (!ended(x)) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&c->cv, &c->mu);
        } else if (pthread_cond_timedwait(&c->cv, &c->mu, &until) == ETIMEDOUT) {
            break;
        }
    }
    speed_status_t st = ended(x) ? x->status : SPEED_ERR_TIMEOUT;
    pthread_mutex_unlock(&c->mu);
    return st;
}

speed_kv_xfer_state_t speed_kv_xfer_poll(speed_kv_xfer_t *x, speed_status_t *status_p) {
    pthread_mutex_lock(&x->ctx->mu);
    speed_kv_xfer_state_t s = x->state;
    if (status_p) *status_p = ended(x) ? x->status : SPEED_OK;
    pthread_mutex_unlock(&x->ctx->mu);
    return s;
}

/* Ends a running transfer as cancelled; when it carries a nonce, starts the abort: flush the
 * endpoint (every put posted is then complete at the target), then send the abort notify, so
 * the decode node may reuse the blocks before the lease ends. The transfer stays allocated
 * (pending) until the abort's callbacks have run, even when its handle is destroyed. */
static void cancel_and_abort(speed_kv_xfer_t *x, const char *why, bool want_abort) {
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    bool was_running = !ended(x);
    speed_kv_xfer_fail_locked(x, SPEED_ERR_CANCELLED, SPEED_KV_STAGE_PUT, why);
    bool abort = want_abort && was_running && x->has_nonce && !x->aborting && !x->ep->failed && !c->closing;
    if (abort) {
        speed_kv_notify_wire_t m = x->msg;
        m.flags = SPEED_KV_NOTIFY_FLAG_ABORT;
        m.n_tags = 0;
        m.tags = NULL;
        speed_kv_notify_encode(&m, x->abort_wire);
        memset(&m, 0, sizeof m);
        x->aborting = true;
        x->pending++; /* the flush */
        x->ep->in_use++;
    }
    pthread_mutex_unlock(&c->mu);
    if (!abort) return;
    ucp_ep_h ep = x->ep->ep;
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.send = flush_cb,
        .user_data = x,
    };
    ucs_status_ptr_t r = ucp_ep_flush_nbx(ep, &prm);
    if (!UCS_PTR_IS_PTR(r)) flush_done(x, UCS_PTR_STATUS(r));
    ucp_worker_signal(c->worker);
    pthread_mutex_lock(&c->mu);
    x->ep->in_use--;
    pthread_mutex_unlock(&c->mu);
}

void speed_kv_xfer_cancel(speed_kv_xfer_t *x) {
    if (!x) return;
    cancel_and_abort(x, "cancelled", false);
}

void speed_kv_xfer_abort(speed_kv_xfer_t *x) {
    if (!x) return;
    cancel_and_abort(x, "aborted", true);
}

speed_status_t speed_kv_xfer_ctx_abort_desc(speed_kv_xfer_ctx_t *c, const speed_kv_desc_t *d, const char *request_id) {
    if (!c || !d || !request_id || !*request_id) return SPEED_ERR_INVALID_ARGUMENT;
    if (!d->has_nonce) return SPEED_OK; /* nobody to prove anything to: the lease frees the blocks */
    if (speed_kv_desc_check(d) != SPEED_OK) return SPEED_ERR_PEER_PROTOCOL;
    /* A transfer with no layers and no blocks, carried by the same machinery as any abort: it
     * holds the endpoint, is freed by the progress thread once its flush and send are done. */
    speed_kv_xfer_t *x = speed_calloc(1, sizeof *x);
    if (!x) return SPEED_ERR_NO_MEMORY;
    x->ctx = c;
    snprintf(x->request_id, sizeof x->request_id, "%s", request_id);
    x->has_nonce = true;
    x->t_create = speed_clock_mono_ns();
    x->msg = (speed_kv_notify_wire_t){.epoch = d->epoch, .head_begin = d->head_begin, .head_end = d->head_end};
    snprintf(x->msg.request_id, sizeof x->msg.request_id, "%s", request_id);
    memcpy(x->msg.nonce, d->nonce, sizeof x->msg.nonce);
    speed_status_t st =
        speed_kv_xfer_ctx_ep_get(c, d->worker_addr, d->worker_addr_len, d->transport, request_id, &x->ep);
    if (st != SPEED_OK) {
        speed_kv_xfer_free(x);
        return st;
    }
    pthread_mutex_lock(&c->mu);
    xfer_start_locked(c, x); /* and counted cancelled just below: the counters stay balanced */
    pthread_mutex_unlock(&c->mu);
    cancel_and_abort(x, "aborted before any put", true);
    pthread_mutex_lock(&c->mu);
    x->orphan = true;
    pthread_mutex_unlock(&c->mu);
    ucp_worker_signal(c->worker);
    return SPEED_OK;
}

void speed_kv_xfer_info(speed_kv_xfer_t *x, speed_kv_xfer_info_t *info_p) {
    pthread_mutex_lock(&x->ctx->mu);
    *info_p = (speed_kv_xfer_info_t){
        .state = x->state,
        .status = ended(x) ? x->status : SPEED_OK,
        .failed_stage = x->failed_stage,
        .bytes_put = x->bytes_put,
        .n_puts = x->n_puts,
        .total_bytes = x->total_bytes,
        .push_ns = x->t_push ? x->t_push - x->t_create : 0,
        .finish_ns = x->t_finish && x->t_end ? x->t_end - x->t_finish : 0,
        .total_ns = x->t_end ? x->t_end - x->t_create : 0,
    };
    pthread_mutex_unlock(&x->ctx->mu);
}

void speed_kv_xfer_destroy(speed_kv_xfer_t *x) {
    if (!x) return;
    speed_kv_xfer_ctx_t *c = x->ctx;
    cancel_and_abort(x, "destroyed while running", false);
    pthread_mutex_lock(&c->mu);
    x->orphan = true; /* the progress thread frees it once no UCX request refers to it */
    pthread_mutex_unlock(&c->mu);
    ucp_worker_signal(c->worker);
}
