/* speed_prompt_hold: reserved prompts' block hashes until their Generate (see prompt_hold.h). */
#include "prompt_hold.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"

#define ID_MAX 128

typedef struct {
    char id[ID_MAX]; /* "" = free slot */
    uint64_t *hashes;
    size_t n;
    int64_t t_ms; /* when put (monotonic): the ttl */
    uint64_t seq; /* put order: the oldest goes first */
} entry_t;

struct speed_prompt_hold {
    pthread_mutex_t mu;
    entry_t *e; /* [n_max] */
    size_t n_max;
    int64_t ttl_ms;
    uint64_t seq;
};

speed_status_t speed_prompt_hold_create(size_t n_max, int64_t ttl_ms, speed_prompt_hold_t **hold_p) {
    if (!hold_p || n_max == 0 || n_max > ((size_t)1 << 20) || ttl_ms < 1) return SPEED_ERR_INVALID_ARGUMENT;
    speed_prompt_hold_t *h = speed_calloc(1, sizeof *h);
    if (h) h->e = speed_calloc(n_max, sizeof *h->e);
    if (!h || !h->e) {
        speed_free(h);
        return SPEED_ERR_NO_MEMORY;
    }
    pthread_mutex_init(&h->mu, NULL);
    h->n_max = n_max;
    h->ttl_ms = ttl_ms;
    *hold_p = h;
    return SPEED_OK;
}

static void entry_clear(entry_t *e) {
    speed_free(e->hashes);
    memset(e, 0, sizeof *e);
}

void speed_prompt_hold_destroy(speed_prompt_hold_t *h) {
    if (!h) return;
    for (size_t i = 0; i < h->n_max; i++) entry_clear(&h->e[i]);
    speed_free(h->e);
    pthread_mutex_destroy(&h->mu);
    speed_free(h);
}

void speed_prompt_hold_put(speed_prompt_hold_t *h, const char *request_id, const uint64_t *hashes, size_t n) {
    if (!h || !request_id || !request_id[0] || strlen(request_id) >= ID_MAX || (n > 0 && !hashes)) return;
    uint64_t *copy = NULL;
    if (n > 0) {
        copy = speed_malloc(n * sizeof *copy);
        if (!copy) return;
        memcpy(copy, hashes, n * sizeof *copy);
    }
    int64_t now = speed_clock_mono_ms();
    pthread_mutex_lock(&h->mu);
    entry_t *slot = NULL, *oldest = NULL;
    for (size_t i = 0; i < h->n_max; i++) {
        entry_t *e = &h->e[i];
        if (e->id[0] && (strcmp(e->id, request_id) == 0 || now - e->t_ms > h->ttl_ms)) entry_clear(e);
        if (!e->id[0]) {
            if (!slot) slot = e;
        } else if (!oldest || e->seq < oldest->seq) {
            oldest = e;
        }
    }
    if (!slot) { /* full of live entries: the oldest goes */
        entry_clear(oldest);
        slot = oldest;
    }
    snprintf(slot->id, sizeof slot->id, "%s", request_id);
    slot->hashes = copy;
    slot->n = n;
    slot->t_ms = now;
    slot->seq = ++h->seq;
    pthread_mutex_unlock(&h->mu);
}

bool speed_prompt_hold_take(speed_prompt_hold_t *h, const char *request_id, uint64_t **hashes_p, size_t *n_p) {
    if (!h || !request_id || !request_id[0]) return false;
    bool found = false;
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->n_max && !found; i++) {
        entry_t *e = &h->e[i];
        if (!e->id[0] || strcmp(e->id, request_id) != 0) continue;
        *hashes_p = e->hashes;
        *n_p = e->n;
        e->hashes = NULL;
        entry_clear(e);
        found = true;
    }
    pthread_mutex_unlock(&h->mu);
    return found;
}

size_t speed_prompt_hold_size(speed_prompt_hold_t *h) {
    if (!h) return 0;
    size_t n = 0;
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->n_max; i++) n += h->e[i].id[0] != 0;
    pthread_mutex_unlock(&h->mu);
    return n;
}
