/* Node pools (round robin / least loaded) and the admission limiter. */
#include "balance.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"

/* ---- pools ------------------------------------------------------------------------- */

/* Longest address a state-change log line shows (addresses are host:port, well below). */
#define SPEED_BALANCE_ADDRESS_LOG 320

typedef struct {
    char *address;
    speed_node_state_t state;
    speed_node_load_t load;
    int64_t pending;                                   /* picks since the last snapshot */
    int64_t finished;                                  /* requests that ended there since the last snapshot */
    int64_t finished_blocks;                           /* the KV blocks they held */
    bool polling;                                      /* a status request is out (speed_balance_pool_poll_begin) */
    int64_t finished_at_poll, finished_blocks_at_poll; /* the two counts when it left */
    int64_t held;                                      /* holders of the index (picks, holds - releases) */
} node_t;

struct speed_balance_pool {
    pthread_mutex_t mu;
    char *name;
    speed_balance_policy_t policy;
    node_t *nodes; /* [n_nodes_max], allocated once so addresses stay put */
    size_t n_nodes, n_nodes_max;
    size_t next; /* where the next scan starts (round robin, tie rotation) */
};

speed_balance_pool_params_t speed_balance_pool_default_params(void) {
    speed_balance_pool_params_t p = {SPEED_BALANCE_ROUND_ROBIN, 64};
    return p;
}

speed_status_t speed_balance_pool_create(const char *name, const speed_balance_pool_params_t *params,
                                         speed_balance_pool_t **pool_p) {
    speed_balance_pool_params_t p = params ? *params : speed_balance_pool_default_params();
    if (!pool_p || p.n_nodes_max == 0 ||
        (p.policy != SPEED_BALANCE_ROUND_ROBIN && p.policy != SPEED_BALANCE_LEAST_LOADED))
        return SPEED_ERR_INVALID_ARGUMENT;
    speed_balance_pool_t *pool = speed_calloc(1, sizeof *pool);
    if (!pool) return SPEED_ERR_NO_MEMORY;
    pool->name = speed_strdup(name ? name : "pool");
    pool->nodes = speed_calloc(p.n_nodes_max, sizeof *pool->nodes);
    if (!pool->name || !pool->nodes) {
        speed_free(pool->name);
        speed_free(pool->nodes);
        speed_free(pool);
        return SPEED_ERR_NO_MEMORY;
    }
    pthread_mutex_init(&pool->mu, NULL);
    pool->policy = p.policy;
    pool->n_nodes_max = p.n_nodes_max;
    *pool_p = pool;
    return SPEED_OK;
}

void speed_balance_pool_destroy(speed_balance_pool_t *pool) {
    if (!pool) return;
    for (size_t i = 0; i < pool->n_nodes; i++) speed_free(pool->nodes[i].address);
    speed_free(pool->nodes);
    speed_free(pool->name);
    pthread_mutex_destroy(&pool->mu);
    speed_free(pool);
}

/* The mutex is logically mutable state even behind a const pool. */
static void pool_lock(const speed_balance_pool_t *pool) { pthread_mutex_lock((pthread_mutex_t *)&pool->mu); }

static void pool_unlock(const speed_balance_pool_t *pool) { pthread_mutex_unlock((pthread_mutex_t *)&pool->mu); }

static speed_status_t pool_add(speed_balance_pool_t *pool, const char *address, speed_node_state_t state,
                               size_t *index_p) {
    if (!pool || !address || !address[0]) return SPEED_ERR_INVALID_ARGUMENT;
    char *copy = speed_strdup(address);
    if (!copy) return SPEED_ERR_NO_MEMORY;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    for (size_t i = 0; i < pool->n_nodes; i++)
        if (strcmp(pool->nodes[i].address, address) == 0) st = SPEED_ERR_INVALID_ARGUMENT;
    if (st == SPEED_OK && pool->n_nodes == pool->n_nodes_max) st = SPEED_ERR_CAPACITY;
    if (st == SPEED_OK) {
        size_t i = pool->n_nodes++;
        memset(&pool->nodes[i], 0, sizeof pool->nodes[i]);
        pool->nodes[i].address = copy;
        pool->nodes[i].state = state;
        if (index_p) *index_p = i;
    }
    pool_unlock(pool);
    if (st != SPEED_OK) speed_free(copy);
    return st;
}

speed_status_t speed_balance_pool_add(speed_balance_pool_t *pool, const char *address, size_t *index_p) {
    return pool_add(pool, address, SPEED_NODE_UP, index_p);
}

speed_status_t speed_balance_pool_add_down(speed_balance_pool_t *pool, const char *address, size_t *index_p) {
    return pool_add(pool, address, SPEED_NODE_DOWN, index_p);
}

size_t speed_balance_pool_size(const speed_balance_pool_t *pool) {
    if (!pool) return 0;
    pool_lock(pool);
    size_t n = pool->n_nodes;
    pool_unlock(pool);
    return n;
}

const char *speed_balance_pool_address(const speed_balance_pool_t *pool, size_t index) {
    if (!pool) return NULL;
    pool_lock(pool);
    const char *a = index < pool->n_nodes ? pool->nodes[index].address : NULL;
    pool_unlock(pool);
    return a;
}

speed_status_t speed_balance_pool_set_load(speed_balance_pool_t *pool, size_t index, const speed_node_load_t *load) {
    if (!pool || !load) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    if (index < pool->n_nodes) {
        node_t *node = &pool->nodes[index];
        node->load = *load;
        node->pending = 0;
        /* the snapshot saw the ends before its request left, not those after */
        node->finished = node->polling ? node->finished - node->finished_at_poll : 0;
        node->finished_blocks = node->polling ? node->finished_blocks - node->finished_blocks_at_poll : 0;
        node->polling = false;
    } else {
        st = SPEED_ERR_INVALID_ARGUMENT;
    }
    pool_unlock(pool);
    return st;
}

/* Applies a state change; `from_mask` says which states it applies to. */
static speed_status_t set_state_changed(speed_balance_pool_t *pool, size_t index, unsigned from_mask,
                                        speed_node_state_t to, bool *changed_p) {
    *changed_p = false;
    if (!pool) return SPEED_ERR_INVALID_ARGUMENT;
    speed_node_state_t was = SPEED_NODE_UP;
    bool changed = false;
    pool_lock(pool);
    if (index >= pool->n_nodes) {
        pool_unlock(pool);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    node_t *n = &pool->nodes[index];
    was = n->state;
    if ((from_mask & (1u << was)) && was != to) {
        n->state = to;
        changed = true;
    }
    /* copied under the mutex: speed_balance_pool_replace may free the string once we let go */
    char address[SPEED_BALANCE_ADDRESS_LOG];
    snprintf(address, sizeof address, "%s", changed ? n->address : "");
    pool_unlock(pool);
    if (changed && to == SPEED_NODE_DOWN)
        speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, NULL, "%s pool: node %s marked down", pool->name, address);
    else if (changed && was == SPEED_NODE_DOWN)
        speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, NULL, "%s pool: node %s back up", pool->name, address);
    *changed_p = changed;
    return SPEED_OK;
}

static speed_status_t set_state(speed_balance_pool_t *pool, size_t index, unsigned from_mask, speed_node_state_t to) {
    bool changed;
    return set_state_changed(pool, index, from_mask, to, &changed);
}

#define STATE_BIT(s) (1u << (s))

bool speed_balance_pool_take_down(speed_balance_pool_t *pool, size_t index) {
    /* A draining node that fails is gone as well; health brings it back as UP. */
    bool changed;
    set_state_changed(pool, index, STATE_BIT(SPEED_NODE_UP) | STATE_BIT(SPEED_NODE_DRAINING), SPEED_NODE_DOWN,
                      &changed);
    return changed;
}

speed_status_t speed_balance_pool_mark_down(speed_balance_pool_t *pool, size_t index) {
    bool changed;
    return set_state_changed(pool, index, STATE_BIT(SPEED_NODE_UP) | STATE_BIT(SPEED_NODE_DRAINING), SPEED_NODE_DOWN,
                             &changed);
}

speed_status_t speed_balance_pool_mark_up(speed_balance_pool_t *pool, size_t index) {
    return set_state(pool, index, STATE_BIT(SPEED_NODE_DOWN), SPEED_NODE_UP);
}

speed_status_t speed_balance_pool_set_draining(speed_balance_pool_t *pool, size_t index, bool draining) {
    if (draining)
        return set_state(pool, index, STATE_BIT(SPEED_NODE_UP) | STATE_BIT(SPEED_NODE_DOWN), SPEED_NODE_DRAINING);
    return set_state(pool, index, STATE_BIT(SPEED_NODE_DRAINING), SPEED_NODE_UP);
}

speed_status_t speed_balance_pool_state(const speed_balance_pool_t *pool, size_t index, speed_node_state_t *state_p) {
    if (!pool || !state_p) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    if (index < pool->n_nodes)
        *state_p = pool->nodes[index].state;
    else
        st = SPEED_ERR_INVALID_ARGUMENT;
    pool_unlock(pool);
    return st;
}

speed_status_t speed_balance_pool_pending(const speed_balance_pool_t *pool, size_t index, int64_t *pending_p) {
    if (!pool || !pending_p) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    if (index < pool->n_nodes)
        *pending_p = pool->nodes[index].pending;
    else
        st = SPEED_ERR_INVALID_ARGUMENT;
    pool_unlock(pool);
    return st;
}

size_t speed_balance_pool_n_up(const speed_balance_pool_t *pool) {
    if (!pool) return 0;
    size_t n = 0;
    pool_lock(pool);
    for (size_t i = 0; i < pool->n_nodes; i++) n += pool->nodes[i].state == SPEED_NODE_UP;
    pool_unlock(pool);
    return n;
}

static bool excluded(const size_t *exclude, size_t n_exclude, size_t index) {
    for (size_t i = 0; i < n_exclude; i++)
        if (exclude[i] == index) return true;
    return false;
}

speed_status_t speed_balance_pool_pick(speed_balance_pool_t *pool, const size_t *exclude, size_t n_exclude,
                                       size_t *index_p) {
    if (!pool || !index_p || (n_exclude > 0 && !exclude)) return SPEED_ERR_INVALID_ARGUMENT;
    pool_lock(pool);
    size_t n = pool->n_nodes, best = SIZE_MAX;
    int64_t best_score = 0;
    double best_kv = 0;
    for (size_t k = 0; k < n; k++) {
        size_t i = (pool->next + k) % n;
        const node_t *node = &pool->nodes[i];
        if (node->state != SPEED_NODE_UP || excluded(exclude, n_exclude, i)) continue;
        if (pool->policy == SPEED_BALANCE_ROUND_ROBIN) {
            best = i;
            break;
        }
        int64_t score = (int64_t)node->load.n_running + node->load.n_waiting + node->pending - node->finished;
        if (score < 0) score = 0;
        if (best == SIZE_MAX || score < best_score || (score == best_score && node->load.kv_usage < best_kv)) {
            best = i;
            best_score = score;
            best_kv = node->load.kv_usage;
        }
    }
    if (best != SIZE_MAX) {
        pool->nodes[best].pending++;
        pool->nodes[best].held++; /* in the same critical section as the pick: see replace */
        pool->next = (best + 1) % n;
    }
    pool_unlock(pool);
    if (best == SIZE_MAX) return SPEED_ERR_PEER_UNREACHABLE;
    *index_p = best;
    return SPEED_OK;
}

size_t speed_balance_pool_candidates(speed_balance_pool_t *pool, const size_t *exclude, size_t n_exclude,
                                     speed_balance_candidate_t *out, size_t n_out_max) {
    if (!pool || !out || (n_exclude > 0 && !exclude)) return 0;
    size_t k = 0;
    pool_lock(pool);
    size_t n = pool->n_nodes;
    for (size_t j = 0; j < n && k < n_out_max; j++) {
        size_t i = (pool->next + j) % n;
        const node_t *node = &pool->nodes[i];
        bool eligible = node->state == SPEED_NODE_UP && !excluded(exclude, n_exclude, i);
        if (!eligible) continue;
        out[k].index = i;
        out[k].load = node->load;
        out[k].pending = node->pending;
        out[k].finished = node->finished;
        out[k].finished_blocks = node->finished_blocks;
        k++;
    }
    pool_unlock(pool);
    return k;
}

speed_status_t speed_balance_pool_take(speed_balance_pool_t *pool, size_t index) {
    if (!pool) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    if (index >= pool->n_nodes) {
        st = SPEED_ERR_INVALID_ARGUMENT;
    } else if (pool->nodes[index].state != SPEED_NODE_UP) {
        /* it went out (or was retired and its slot given to another address) since the
         * caller's speed_balance_pool_candidates: a take must never land where a pick cannot */
        st = SPEED_ERR_PEER_UNREACHABLE;
    } else {
        pool->nodes[index].pending++;
        pool->nodes[index].held++;
        pool->next = (index + 1) % pool->n_nodes;
    }
    pool_unlock(pool);
    return st;
}

speed_status_t speed_balance_pool_hold(speed_balance_pool_t *pool, size_t index) {
    if (!pool) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    if (index < pool->n_nodes)
        pool->nodes[index].held++;
    else
        st = SPEED_ERR_INVALID_ARGUMENT;
    pool_unlock(pool);
    return st;
}

void speed_balance_pool_release(speed_balance_pool_t *pool, size_t index) {
    if (!pool) return;
    pool_lock(pool);
    if (index < pool->n_nodes) {
        SPEED_ASSERT(pool->nodes[index].held > 0); /* a release without its pick or hold */
        pool->nodes[index].held--;
    }
    pool_unlock(pool);
}

int64_t speed_balance_pool_holders(const speed_balance_pool_t *pool, size_t index) {
    if (!pool) return 0;
    pool_lock(pool);
    int64_t n = index < pool->n_nodes ? pool->nodes[index].held : 0;
    pool_unlock(pool);
    return n;
}

speed_status_t speed_balance_pool_replace(speed_balance_pool_t *pool, size_t index, const char *address) {
    if (!pool || !address || !address[0]) return SPEED_ERR_INVALID_ARGUMENT;
    char *copy = speed_strdup(address);
    if (!copy) return SPEED_ERR_NO_MEMORY;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    if (index >= pool->n_nodes) st = SPEED_ERR_INVALID_ARGUMENT;
    for (size_t i = 0; st == SPEED_OK && i < pool->n_nodes; i++)
        if (i != index && strcmp(pool->nodes[i].address, address) == 0) st = SPEED_ERR_INVALID_ARGUMENT;
    /* Checked under the mutex every pick and take holds: no holder now, and none can come while
     * the entry is not UP (picks and takes skip it), so the caller may rebuild what the index
     * names before anyone reads it again. */
    if (st == SPEED_OK && (pool->nodes[index].held > 0 || pool->nodes[index].state == SPEED_NODE_UP))
        st = SPEED_ERR_CAPACITY;
    char *old = NULL;
    if (st == SPEED_OK) {
        node_t *node = &pool->nodes[index];
        old = node->address;
        memset(node, 0, sizeof *node);
        node->address = copy;
        node->state = SPEED_NODE_DOWN;
    }
    pool_unlock(pool);
    speed_free(st == SPEED_OK ? old : copy);
    return st;
}

void speed_balance_pool_poll_begin(speed_balance_pool_t *pool, size_t index) {
    if (!pool) return;
    pool_lock(pool);
    if (index < pool->n_nodes) {
        node_t *node = &pool->nodes[index];
        node->polling = true;
        node->finished_at_poll = node->finished;
        node->finished_blocks_at_poll = node->finished_blocks;
    }
    pool_unlock(pool);
}

speed_status_t speed_balance_pool_finish(speed_balance_pool_t *pool, size_t index, int64_t blocks) {
    if (!pool || blocks < 0) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pool_lock(pool);
    if (index < pool->n_nodes) {
        pool->nodes[index].finished++;
        pool->nodes[index].finished_blocks += blocks;
    } else {
        st = SPEED_ERR_INVALID_ARGUMENT;
    }
    pool_unlock(pool);
    return st;
}

/* ---- admission --------------------------------------------------------------------- */

typedef struct waiter {
    pthread_cond_t cv;
    bool granted;   /* a released slot was handed to this waiter */
    bool cancelled; /* the limiter was closed */
    struct waiter *next;
} waiter_t;

struct speed_admission {
    pthread_mutex_t mu;
    speed_admission_params_t params;
    int32_t in_flight;
    int32_t n_waiting;
    waiter_t *head, *tail; /* FIFO of waiters (their structs live on their stacks) */
    bool closed;
};

speed_admission_params_t speed_admission_default_params(void) {
    speed_admission_params_t p = {256, 1024, 30000, 1};
    return p;
}

speed_status_t speed_admission_create(const speed_admission_params_t *params, speed_admission_t **adm_p) {
    speed_admission_params_t p = params ? *params : speed_admission_default_params();
    if (!adm_p || p.max_in_flight < 1 || p.max_waiting < 0 || p.wait_timeout_ms < 0 || p.retry_after_s < 1)
        return SPEED_ERR_INVALID_ARGUMENT;
    speed_admission_t *a = speed_calloc(1, sizeof *a);
    if (!a) return SPEED_ERR_NO_MEMORY;
    pthread_mutex_init(&a->mu, NULL);
    a->params = p;
    *adm_p = a;
    return SPEED_OK;
}

void speed_admission_destroy(speed_admission_t *adm) {
    if (!adm) return;
    SPEED_ASSERT(adm->head == NULL);
    pthread_mutex_destroy(&adm->mu);
    speed_free(adm);
}

static void unlink_waiter(speed_admission_t *a, waiter_t *w) {
    waiter_t *prev = NULL;
    for (waiter_t *it = a->head; it; prev = it, it = it->next) {
        if (it != w) continue;
        if (prev)
            prev->next = it->next;
        else
            a->head = it->next;
        if (a->tail == it) a->tail = prev;
        a->n_waiting--;
        return;
    }
}

speed_status_t speed_admission_acquire(speed_admission_t *adm) {
    if (!adm) return SPEED_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&adm->mu);
    if (adm->closed) {
        pthread_mutex_unlock(&adm->mu);
        return SPEED_ERR_CANCELLED;
    }
    if (adm->in_flight < adm->params.max_in_flight && !adm->head) {
        adm->in_flight++;
        pthread_mutex_unlock(&adm->mu);
        return SPEED_OK;
    }
    if (adm->n_waiting >= adm->params.max_waiting) {
        pthread_mutex_unlock(&adm->mu);
        return SPEED_ERR_CAPACITY;
    }

    waiter_t w = {.granted = false, .cancelled = false, .next = NULL};
    speed_clock_cond_init(&w.cv);
    if (adm->tail)
        adm->tail->next = &w;
    else
        adm->head = &w;
    adm->tail = &w;
    adm->n_waiting++;

    struct timespec deadline = speed_clock_deadline(CLOCK_MONOTONIC, adm->params.wait_timeout_ms);
    int rc = 0;
    while (!w.granted && !w.cancelled && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&w.cv, &adm->mu, &deadline);

    speed_status_t st;
    if (w.granted)
        st = SPEED_OK; /* a slot arrived, even if at the deadline */
    else if (w.cancelled)
        st = SPEED_ERR_CANCELLED;
    else {
        unlink_waiter(adm, &w);
        st = SPEED_ERR_TIMEOUT;
    }
    pthread_mutex_unlock(&adm->mu);
    pthread_cond_destroy(&w.cv);
    return st;
}

void speed_admission_release(speed_admission_t *adm) {
    if (!adm) return;
    pthread_mutex_lock(&adm->mu);
    waiter_t *w = adm->head;
    if (w) { /* hand the slot over: in_flight stays the same */
        adm->head = w->next;
        if (!adm->head) adm->tail = NULL;
        adm->n_waiting--;
        w->granted = true;
        pthread_cond_signal(&w->cv);
    } else {
        SPEED_ASSERT(adm->in_flight > 0);
        adm->in_flight--;
    }
    pthread_mutex_unlock(&adm->mu);
}

void speed_admission_close(speed_admission_t *adm) {
    if (!adm) return;
    pthread_mutex_lock(&adm->mu);
    adm->closed = true;
    for (waiter_t *w = adm->head; w;) {
        waiter_t *next = w->next;
        w->cancelled = true;
        pthread_cond_signal(&w->cv);
        w = next;
    }
    adm->head = adm->tail = NULL;
    adm->n_waiting = 0;
    pthread_mutex_unlock(&adm->mu);
}

int32_t speed_admission_in_flight(speed_admission_t *adm) {
    if (!adm) return 0;
    pthread_mutex_lock(&adm->mu);
    int32_t n = adm->in_flight;
    pthread_mutex_unlock(&adm->mu);
    return n;
}

int32_t speed_admission_waiting(speed_admission_t *adm) {
    if (!adm) return 0;
    pthread_mutex_lock(&adm->mu);
    int32_t n = adm->n_waiting;
    pthread_mutex_unlock(&adm->mu);
    return n;
}

int32_t speed_admission_retry_after(const speed_admission_t *adm) { return adm ? adm->params.retry_after_s : 1; }
