/* speed_cache_journal: the decode node's prefix-cache event journal (see cache_journal.h). */
#include "cache_journal.h"

#include <pthread.h>
#include <string.h>

#include "alloc.h"
#include "block_set.h"

struct speed_cache_journal {
    pthread_mutex_t mu;
    uint64_t instance;
    uint64_t *ring_hash; /* [n_events_max]: event seq s at (s - 1) % n_events_max */
    uint8_t *ring_kind;
    size_t n_events_max;
    uint64_t next_seq; /* the next event's number; events [first_seq(), next_seq) are in the ring */
    speed_block_set_t *set;
    uint64_t n_stored, n_evicted, n_refused, n_snapshots;
};

speed_status_t speed_cache_journal_create(const speed_cache_journal_params_t *p, speed_cache_journal_t **j_p) {
    const size_t limit = (size_t)1 << 30;
    if (!p || !j_p || p->instance == 0 || p->n_events_max == 0 || p->n_events_max > limit || p->n_blocks_max == 0 ||
        p->n_blocks_max > limit)
        return SPEED_ERR_INVALID_ARGUMENT;
    speed_cache_journal_t *j = speed_calloc(1, sizeof *j);
    if (!j) return SPEED_ERR_NO_MEMORY;
    j->instance = p->instance;
    j->n_events_max = p->n_events_max;
    j->next_seq = 1;
    j->ring_hash = speed_malloc(p->n_events_max * sizeof *j->ring_hash);
    j->ring_kind = speed_malloc(p->n_events_max);
    speed_status_t st =
        j->ring_hash && j->ring_kind ? speed_block_set_create(p->n_blocks_max, &j->set) : SPEED_ERR_NO_MEMORY;
    if (st != SPEED_OK) {
        speed_free(j->ring_hash);
        speed_free(j->ring_kind);
        speed_free(j);
        return st;
    }
    pthread_mutex_init(&j->mu, NULL);
    *j_p = j;
    return SPEED_OK;
}

void speed_cache_journal_destroy(speed_cache_journal_t *j) {
    if (!j) return;
    speed_block_set_destroy(j->set);
    speed_free(j->ring_hash);
    speed_free(j->ring_kind);
    pthread_mutex_destroy(&j->mu);
    speed_free(j);
}

static uint64_t first_seq(const speed_cache_journal_t *j) {
    return j->next_seq > j->n_events_max ? j->next_seq - j->n_events_max : 1;
}

static size_t record(speed_cache_journal_t *j, const uint64_t *hashes, size_t n, speed_cache_event_kind_t kind) {
    if (!j || !hashes) return 0;
    size_t refused = 0;
    pthread_mutex_lock(&j->mu);
    for (size_t i = 0; i < n; i++) {
        uint64_t h = hashes[i];
        if (h == 0) continue;
        if (kind == SPEED_CACHE_EVENT_STORED) {
            /* out of memory reads like a full set: the hash goes unlisted in snapshots */
            if (speed_block_set_add(j->set, h) != SPEED_OK) refused++;
            j->n_stored++;
        } else {
            speed_block_set_remove(j->set, h);
            j->n_evicted++;
        }
        size_t slot = (size_t)((j->next_seq - 1) % j->n_events_max);
        j->ring_hash[slot] = h;
        j->ring_kind[slot] = (uint8_t)kind;
        j->next_seq++;
    }
    j->n_refused += refused;
    pthread_mutex_unlock(&j->mu);
    return refused;
}

size_t speed_cache_journal_record_stored(speed_cache_journal_t *j, const uint64_t *hashes, size_t n) {
    return record(j, hashes, n, SPEED_CACHE_EVENT_STORED);
}

void speed_cache_journal_record_evicted(speed_cache_journal_t *j, const uint64_t *hashes, size_t n) {
    record(j, hashes, n, SPEED_CACHE_EVENT_EVICTED);
}

speed_status_t speed_cache_journal_read(speed_cache_journal_t *j, uint64_t instance, uint64_t next_seq, size_t n_max,
                                        speed_cache_journal_reply_t *reply) {
    if (!reply) return SPEED_ERR_INVALID_ARGUMENT;
    memset(reply, 0, sizeof *reply);
    if (!j || n_max == 0) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pthread_mutex_lock(&j->mu);
    reply->instance = j->instance;
    bool can_continue = instance == j->instance && next_seq >= 1 && next_seq >= first_seq(j) && next_seq <= j->next_seq;
    if (!can_continue) {
        /* The whole set, as of next_seq: events after it are the reader's next read. */
        size_t n = speed_block_set_size(j->set);
        reply->snapshot = true;
        reply->next_seq = j->next_seq;
        if (n > 0) {
            reply->hashes = speed_malloc(n * sizeof *reply->hashes);
            reply->kinds = speed_calloc(n, 1); /* all STORED (0) */
            if (!reply->hashes || !reply->kinds) {
                st = SPEED_ERR_NO_MEMORY;
            } else {
                reply->n = speed_block_set_list(j->set, reply->hashes, n);
            }
        }
        if (st == SPEED_OK) j->n_snapshots++;
    } else {
        uint64_t avail = j->next_seq - next_seq;
        size_t n = avail > n_max ? n_max : (size_t)avail;
        reply->next_seq = next_seq + n;
        reply->more = avail > n;
        if (n > 0) {
            reply->hashes = speed_malloc(n * sizeof *reply->hashes);
            reply->kinds = speed_malloc(n);
            if (!reply->hashes || !reply->kinds) {
                st = SPEED_ERR_NO_MEMORY;
            } else {
                for (size_t i = 0; i < n; i++) {
                    size_t slot = (size_t)((next_seq + i - 1) % j->n_events_max);
                    reply->hashes[i] = j->ring_hash[slot];
                    reply->kinds[i] = j->ring_kind[slot];
                }
                reply->n = n;
            }
        }
    }
    pthread_mutex_unlock(&j->mu);
    if (st != SPEED_OK) speed_cache_journal_reply_cleanup(reply);
    return st;
}

void speed_cache_journal_reply_cleanup(speed_cache_journal_reply_t *reply) {
    if (!reply) return;
    speed_free(reply->hashes);
    speed_free(reply->kinds);
    memset(reply, 0, sizeof *reply);
}

void speed_cache_journal_stats(speed_cache_journal_t *j, speed_cache_journal_stats_t *s) {
    memset(s, 0, sizeof *s);
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    s->n_stored = j->n_stored;
    s->n_evicted = j->n_evicted;
    s->n_refused = j->n_refused;
    s->n_snapshots = j->n_snapshots;
    s->next_seq = j->next_seq;
    s->n_blocks = speed_block_set_size(j->set);
    pthread_mutex_unlock(&j->mu);
}
