/* The decode node's side of the KV plane (docs/security.md#the-kv-plane): what an authenticated
 * notify does to a reservation. The transfer context has already checked the nonce (and the
 * integrity tags) before this runs, so everything here is about a reservation whose writer
 * proved it was chosen by the router.
 *
 * Runs on the transfer context's progress thread: nothing here waits for the engine (batcher
 * commands are queued with the non-waiting variants, which keep their order).
 */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"
#include "node.h"

/* Heads notified so far for one reservation whose senders each cover part of this node's
 * range (tensor-parallel prefill ranks feeding one decode rank). */
typedef struct kv_cover {
    struct kv_cover *next;
    char id[SPEED_BATCH_ID_MAX + 1];
    int covered; /* heads of this node's range notified (senders never overlap) */
    int64_t until_ms;
} kv_cover_t;

static pthread_mutex_t g_cover_mu = PTHREAD_MUTEX_INITIALIZER;
static kv_cover_t *g_cover;

/* Adds n heads for id; true once the whole range of `want` heads is covered (the entry is
 * then gone). Entries older than the lease are dropped on the way. */
static bool cover_add(const char *id, int n, int want, int64_t lease_ms) {
    int64_t now = speed_clock_mono_ms();
    bool done = false, found = false;
    pthread_mutex_lock(&g_cover_mu);
    for (kv_cover_t **pp = &g_cover; *pp;) {
        kv_cover_t *c = *pp;
        bool match = strcmp(c->id, id) == 0;
        if (match && !found) {
            found = true;
            c->covered += n;
            done = c->covered >= want;
        }
        if ((match && done) || c->until_ms <= now) {
            *pp = c->next;
            speed_free(c);
            continue;
        }
        pp = &c->next;
    }
    if (!found) {
        kv_cover_t *c = speed_calloc(1, sizeof *c);
        if (c) {
            snprintf(c->id, sizeof c->id, "%s", id);
            c->covered = n;
            c->until_ms = now + lease_ms;
            c->next = g_cover;
            g_cover = c;
        }
    }
    pthread_mutex_unlock(&g_cover_mu);
    return done;
}

speed_status_t speed_node_on_kv_notify(void *user, const speed_kv_notify_t *note) {
    speed_node_t *n = user;
    const char *id = note->request_id;
    if (!id || !*id || strlen(id) > SPEED_BATCH_ID_MAX) return SPEED_ERR_INVALID_ARGUMENT;
    if (note->aborted || note->integrity_failed) {
        /* The prefill side flushed and stopped (abort), or its bytes failed their tags: nothing
         * more will land in these blocks, and what is there is useless. Cancel puts a reservation
         * behind the fence; release lifts it (both queued, in this order). */
        speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, id, "kv: %s: reservation freed",
                  note->aborted ? "the prefill node cancelled its transfer" : "integrity check failed");
        speed_batcher_cancel(n->batcher, id);
        speed_batcher_release(n->batcher, id);
        return SPEED_OK;
    }
    const speed_kv_cache_t *cache = speed_batcher_kv_cache(n->batcher);
    int lb = speed_kv_cache_head_begin(cache), le = lb + speed_kv_cache_layer(cache, 0).n_kv_heads;
    int hb = note->head_begin > lb ? note->head_begin : lb, he = note->head_end < le ? note->head_end : le;
    if (hb >= he) return SPEED_ERR_PEER_PROTOCOL;
    if (he - hb < le - lb && !cover_add(id, he - hb, le - lb, n->cfg.lease_ms))
        return SPEED_OK; /* more senders to come */
    return speed_batcher_kv_ready_post(n->batcher, id);
}
