/* The decode side's grants (a reservation's nonce, and its layout in integrity mode) and the
 * per-layer integrity tag both sides compute (kv_transfer_internal.h).
 *
 * Why grants live in the context: a notify is authenticated on the progress thread, before the
 * node sees it, so that a notify with a wrong nonce can never mark KV ready whatever the node
 * does with it; and every KV write is checked there against the grant before its bytes touch
 * the pool, so that a write that arrives after the reservation ended (a sender frozen, a link
 * partitioned while TCP held its data) finds no grant and is dropped instead of landing in
 * blocks that belong to another request by then. A grant stays in the list while its notify's
 * tags are verified (hashing the blocks takes time; ctx->mu is not held meanwhile), marked
 * `checking`: a drop or expiry meanwhile unlinks it and leaves the free to the checker.
 */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "kv_transfer_internal.h"
#include "log.h"
#include "mac.h"

/* ---- the tag ------------------------------------------------------------------------------- */

speed_status_t speed_kv_layer_tag(const uint8_t nonce[SPEED_KV_NONCE_BYTES], int layer, int64_t entries,
                                  int64_t first_block, int B, uint64_t unit_bytes, kv_block_addr_fn addr, void *user,
                                  uint8_t tag[SPEED_KV_TAG_BYTES]) {
    speed_mac_t m;
    SPEED_CHECK(speed_mac_begin(&m, nonce, SPEED_KV_NONCE_BYTES));
    uint8_t head[20];
    for (int i = 0; i < 4; i++) head[i] = (uint8_t)((uint32_t)layer >> (8 * i));
    for (int i = 0; i < 8; i++) head[4 + i] = (uint8_t)((uint64_t)entries >> (8 * i));
    for (int i = 0; i < 8; i++) head[12 + i] = (uint8_t)((uint64_t)first_block >> (8 * i));
    speed_status_t st = speed_mac_update(&m, head, sizeof head);
    const uint64_t half = unit_bytes / 2, token_half = half / (uint64_t)B;
    const int64_t n_blocks = div_up(entries, B);
    for (int64_t i = first_block; st == SPEED_OK && i < n_blocks; i++) {
        const uint8_t *u = addr(user, i);
        if (!u) {
            st = SPEED_ERR_INTERNAL;
            break;
        }
        int64_t n = entries - i * B < B ? entries - i * B : B;
        if (n == B) {
            st = speed_mac_update(&m, u, unit_bytes);
        } else {
            st = speed_mac_update(&m, u, (size_t)n * token_half);
            if (st == SPEED_OK) st = speed_mac_update(&m, u + half, (size_t)n * token_half);
        }
    }
    if (st != SPEED_OK) {
        speed_mac_abort(&m);
        return st;
    }
    speed_mac_end(&m, tag);
    return SPEED_OK;
}

/* ---- grants ------------------------------------------------------------------------------- */

static void grant_free(kv_grant_t *g) {
    if (!g) return;
    for (uint32_t p = 0; p < g->n_pools; p++)
        if (g->pools) speed_free(g->pools[p].table);
    speed_free(g->pools);
    speed_free(g->layers);
    memset(g->nonce, 0, sizeof g->nonce);
    speed_free(g);
}

/* Unlinks g (found at *pp) and frees it, or leaves it to its checker. ctx->mu held. */
static void unlink_locked(speed_kv_xfer_ctx_t *c, kv_grant_t **pp) {
    kv_grant_t *g = *pp;
    *pp = g->next;
    c->stats.n_grants--;
    if (g->checking)
        g->orphan = true;
    else
        grant_free(g);
}

/* Unlinks and frees grants whose time is over. ctx->mu held. */
static void purge_locked(speed_kv_xfer_ctx_t *c, uint64_t now) {
    kv_grant_t **pp = &c->grants;
    while (*pp) {
        if ((*pp)->deadline_ns <= now)
            unlink_locked(c, pp);
        else
            pp = &(*pp)->next;
    }
}

/* The link pointing at the grant of id (NULL if none). ctx->mu held. */
static kv_grant_t **find_locked(speed_kv_xfer_ctx_t *c, const char *id) {
    for (kv_grant_t **pp = &c->grants; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->id, id) == 0) return pp;
    return NULL;
}

static void put_locked(speed_kv_xfer_ctx_t *c, kv_grant_t *g) {
    g->next = c->grants;
    c->grants = g;
    c->stats.n_grants++;
}

speed_status_t speed_kv_grant_add(speed_kv_xfer_ctx_t *c, const char *id, const speed_kv_desc_t *d, int64_t grant_ms,
                                  const speed_kv_cache_t *cache, bool device) {
    if (!id || !*id || strlen(id) >= REQ_ID_MAX) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv grant: a request id of 1..%d bytes is needed", REQ_ID_MAX - 1);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    kv_grant_t *g = speed_calloc(1, sizeof *g);
    if (!g) return SPEED_ERR_NO_MEMORY;
    snprintf(g->id, sizeof g->id, "%s", id);
    memcpy(g->nonce, d->nonce, sizeof g->nonce);
    if (grant_ms < d->lease_ms) grant_ms = d->lease_ms;
    g->deadline_ns = grant_ms > 0 ? speed_clock_mono_ns() + (uint64_t)grant_ms * 1000000ull : UINT64_MAX;
    g->integrity = d->integrity;
    g->cache = cache;
    g->device = device;
    g->block_tokens = d->block_tokens;
    g->unit_bytes = d->unit_bytes;
    /* the layout, always: every write is checked against it */
    g->layers = speed_calloc(d->n_layers ? d->n_layers : 1, sizeof *g->layers);
    g->pools = speed_calloc(d->n_pools ? d->n_pools : 1, sizeof *g->pools);
    if (!g->layers || !g->pools) goto nomem;
    g->n_layers = d->n_layers;
    g->n_pools = d->n_pools;
    memcpy(g->layers, d->layers, d->n_layers * sizeof *g->layers);
    for (uint32_t p = 0; p < d->n_pools; p++) {
        g->pools[p].base = d->pools[p].base;
        g->pools[p].stride = d->pools[p].block_stride;
        g->pools[p].n_blocks = d->pools[p].n_blocks;
        g->pools[p].table = speed_malloc((size_t)(d->pools[p].n_blocks ? d->pools[p].n_blocks : 1) * sizeof(int32_t));
        if (!g->pools[p].table) goto nomem;
        if (d->pools[p].n_blocks) memcpy(g->pools[p].table, d->pools[p].table, d->pools[p].n_blocks * sizeof(int32_t));
    }
    pthread_mutex_lock(&c->mu);
    purge_locked(c, speed_clock_mono_ns());
    bool dup = false;
    for (kv_grant_t *o = c->grants; o && !dup; o = o->next) dup = strcmp(o->id, id) == 0;
    if (!dup) put_locked(c, g);
    pthread_mutex_unlock(&c->mu);
    if (dup) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv grant: request '%s' already holds a grant", id);
        grant_free(g);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
nomem:
    grant_free(g);
    SPEED_ERROR(SPEED_SUBSYS_NET, "kv grant: out of memory");
    return SPEED_ERR_NO_MEMORY;
}

void speed_kv_xfer_ctx_grant_drop(speed_kv_xfer_ctx_t *c, const char *id) {
    if (!c || !id) return;
    pthread_mutex_lock(&c->mu);
    kv_grant_t **pp = find_locked(c, id);
    if (pp) unlink_locked(c, pp); /* under mu: no write is being copied now, none will be after */
    pthread_mutex_unlock(&c->mu);
}

void speed_kv_grant_drop_cache(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache) {
    pthread_mutex_lock(&c->mu);
    for (kv_grant_t **pp = &c->grants; *pp;) {
        if ((*pp)->cache == cache)
            unlink_locked(c, pp);
        else
            pp = &(*pp)->next;
    }
    pthread_mutex_unlock(&c->mu);
}

/* Whether [raddr, raddr + len) lies inside the unit of logical block `block` of `layer` of g's
 * reservation. The layout is this node's own descriptor's (checked when it was built). */
static bool write_in_grant(const kv_grant_t *g, uint32_t layer, int64_t block, uint64_t raddr, uint64_t len) {
    if (layer >= g->n_layers || len == 0 || len > g->unit_bytes) return false;
    const speed_kv_desc_layer_t *ly = &g->layers[layer];
    /* below first_block: in place before the transfer (a prefix cache hit), perhaps shared
     * read-only with other sequences: never this sender's to write */
    if (block < ly->first_block || block >= div_up(ly->entries, g->block_tokens) || ly->pool >= g->n_pools)
        return false;
    const grant_pool_t *p = &g->pools[ly->pool];
    if ((uint64_t)block >= p->n_blocks) return false;
    uint64_t start = p->base + (uint64_t)p->table[block] * p->stride + ly->offset;
    return raddr >= start && raddr - start <= g->unit_bytes - len;
}

void speed_kv_grant_write(speed_kv_xfer_ctx_t *c, const write_hdr_t *h, const void *data, size_t length) {
    const char *why = "malformed";
    pthread_mutex_lock(&c->mu);
    if (h) {
        kv_grant_t **pp = find_locked(c, h->request_id);
        kv_grant_t *g = pp ? *pp : NULL;
        bool own = false; /* the nonce matched: the reservation's own sender */
        if (!g || g->deadline_ns <= speed_clock_mono_ns())
            why = "no grant (the reservation ended, started, or never was)";
        else if (!(own = speed_mac_equal(g->nonce, h->nonce, SPEED_KV_NONCE_BYTES)))
            why = "wrong reservation nonce";
        else if (g->device)
            why = "the pools are device memory (ucx.cuda_direct must be set on both sides: puts)";
        else if (!write_in_grant(g, h->layer, h->block, h->raddr, length))
            why = "outside the reservation's blocks";
        else
            why = NULL;
        if (why && own) g->n_refused++; /* its KV will be incomplete: the notify is refused */
    }
    if (!why) {
        /* the grant holds: these blocks are this reservation's, and stay so while mu is held */
        memcpy((void *)(uintptr_t)h->raddr, data, length);
        c->stats.n_writes++;
        c->stats.bytes_written += length;
    } else {
        c->stats.n_writes_dropped++;
    }
    pthread_mutex_unlock(&c->mu);
    if (why)
        speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, h && h->request_id[0] ? h->request_id : NULL,
                  "kv write of %zu bytes dropped: %s", length, why);
}

typedef struct {
    const kv_grant_t *g;
    const speed_kv_desc_layer_t *layer;
} grant_addr_t;

static const uint8_t *grant_block(void *user, int64_t i) {
    const grant_addr_t *a = user;
    const grant_pool_t *p = &a->g->pools[a->layer->pool];
    if (i < 0 || (uint64_t)i >= p->n_blocks) return NULL;
    return (const uint8_t *)(uintptr_t)(p->base + (uint64_t)p->table[i] * p->stride + a->layer->offset);
}

/* Whether the tags match the blocks. The layout came from this node's own descriptor (checked
 * when it was built), so every address is inside a registered region. */
static bool tags_verify(const kv_grant_t *g, const speed_kv_notify_wire_t *m) {
    if (m->n_tags != g->n_layers) return false;
    bool ok = true;
    for (uint32_t l = 0; l < g->n_layers; l++) {
        uint8_t tag[SPEED_KV_TAG_BYTES];
        grant_addr_t a = {.g = g, .layer = &g->layers[l]};
        if (speed_kv_layer_tag(g->nonce, (int)l, g->layers[l].entries, g->layers[l].first_block, g->block_tokens,
                               g->unit_bytes, grant_block, &a, tag) != SPEED_OK)
            return false;
        /* every layer is checked: how far a mismatch is tells nothing */
        ok &= speed_mac_equal(tag, m->tags + (size_t)l * SPEED_KV_TAG_BYTES, SPEED_KV_TAG_BYTES);
    }
    return ok;
}

speed_status_t speed_kv_grant_check(speed_kv_xfer_ctx_t *c, const speed_kv_notify_wire_t *m) {
    const char *rid = m->request_id;
    pthread_mutex_lock(&c->mu);
    purge_locked(c, speed_clock_mono_ns());
    kv_grant_t **pp = find_locked(c, rid);
    kv_grant_t *g = pp ? *pp : NULL;
    if (g) g->checking = true; /* stays listed: its writes still land while the tags are hashed */
    pthread_mutex_unlock(&c->mu);
    if (!g) return SPEED_ERR_NOT_FOUND; /* logged by the caller, who knows whether grants are required */
    speed_status_t st = SPEED_OK;
    bool keep = true;
    if (!speed_mac_equal(g->nonce, m->nonce, SPEED_KV_NONCE_BYTES)) {
        speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, rid, "kv transfer: notify refused: wrong reservation nonce");
        st = SPEED_ERR_PEER_PROTOCOL;
    } else if (m->flags & SPEED_KV_NOTIFY_FLAG_ABORT) {
        keep = false;          /* nothing more may come for this reservation */
    } else if (g->n_refused) { /* written under ctx->mu by this thread's write handler: no race */
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid,
                  "kv transfer: %llu of the reservation's writes were refused (outside its blocks, or device "
                  "pools); the KV is refused",
                  (unsigned long long)g->n_refused);
        st = SPEED_ERR_TRANSFER;
        keep = false;
    } else if (g->integrity && !tags_verify(g, m)) {
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid, "kv transfer: integrity check failed: %s; the KV is refused",
                  m->n_tags ? "a layer's tag does not match the bytes received" : "the notify carries no tags");
        st = SPEED_ERR_TRANSFER;
        keep = false;
    }
    pthread_mutex_lock(&c->mu);
    if (st == SPEED_ERR_TRANSFER && !g->n_refused) c->stats.n_integrity_failed++;
    g->checking = false;
    if (g->orphan) {
        grant_free(g); /* dropped or expired meanwhile: already unlinked */
    } else if (!keep) {
        pp = find_locked(c, rid);
        SPEED_ASSERT(pp && *pp == g);
        unlink_locked(c, pp);
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

void speed_kv_grant_free_all(speed_kv_xfer_ctx_t *c) {
    while (c->grants) {
        kv_grant_t *g = c->grants;
        c->grants = g->next;
        grant_free(g);
    }
    c->stats.n_grants = 0;
}
