/* speed_comm: the public wrappers and the CPU (threads of one process) communicator.
 *
 * CPU all-reduce, in two barriers: every rank publishes its buffer pointer; after the first
 * barrier rank r owns the slice [r*n/size, (r+1)*n/size) of the elements: it sums that slice
 * over all ranks' buffers in rank order and writes the sum back into every buffer; the second
 * barrier ends the call. Slices are disjoint, so no element is read and written by two ranks,
 * and every element is summed once, in the same order, whichever rank runs it. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#include "alloc.h"
#include "comm.h"
#include "log.h"

#define COMM_MAX_RANKS 64
#define COMM_SPIN      4000 /* polls (a few microseconds) before a waiting rank sleeps */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

typedef struct {
    speed_comm_group_t *group;
    int rank;
} cpu_rank_t;

struct speed_comm_group {
    int size;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int arrived;                 /* ranks waiting at the current barrier */
    _Atomic uint64_t generation; /* barriers passed (written under lock, read by spinners) */
    atomic_bool aborted;
    float *bufs[COMM_MAX_RANKS];
    int64_t counts[COMM_MAX_RANKS];
    cpu_rank_t ranks[COMM_MAX_RANKS];
    speed_comm_t handles[COMM_MAX_RANKS];
};

/* Returns false when the group is (or becomes) aborted. A rank that arrives early spins for a
 * few microseconds before sleeping: a step makes two all-reduces per layer, and a futex wake-up
 * per barrier would cost more than the reduction itself. */
static bool barrier(speed_comm_group_t *g) {
    pthread_mutex_lock(&g->lock);
    if (atomic_load(&g->aborted)) {
        pthread_mutex_unlock(&g->lock);
        return false;
    }
    uint64_t gen = atomic_load(&g->generation);
    if (++g->arrived == g->size) {
        g->arrived = 0;
        atomic_store(&g->generation, gen + 1);
        pthread_cond_broadcast(&g->cond);
        pthread_mutex_unlock(&g->lock);
        return true;
    }
    pthread_mutex_unlock(&g->lock);
    for (int spin = 0; spin < COMM_SPIN; spin++) {
        if (atomic_load_explicit(&g->generation, memory_order_acquire) != gen) return true;
        if (atomic_load_explicit(&g->aborted, memory_order_relaxed)) break;
        cpu_relax();
    }
    pthread_mutex_lock(&g->lock);
    while (atomic_load(&g->generation) == gen && !atomic_load(&g->aborted)) pthread_cond_wait(&g->cond, &g->lock);
    bool ok = atomic_load(&g->generation) != gen; /* passed, even if an abort came right after */
    pthread_mutex_unlock(&g->lock);
    return ok;
}

static void cpu_abort(void *ctx) {
    speed_comm_group_t *g = ((cpu_rank_t *)ctx)->group;
    pthread_mutex_lock(&g->lock);
    atomic_store(&g->aborted, true);
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

static speed_status_t cpu_all_reduce_sum(void *ctx, float *buf, int64_t count) {
    cpu_rank_t *self = ctx;
    speed_comm_group_t *g = self->group;
    const int n_ranks = g->size, r = self->rank;
    g->bufs[r] = buf;
    g->counts[r] = count;
    if (!barrier(g)) return SPEED_ERR_CANCELLED;
    for (int k = 0; k < n_ranks; k++) {
        if (g->counts[k] != count) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: all-reduce of %lld elements on rank %d, %lld on rank %d",
                        (long long)count, r, (long long)g->counts[k], k);
            cpu_abort(ctx);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    int64_t begin = count * r / n_ranks, end = count * (r + 1) / n_ranks;
    for (int64_t i = begin; i < end; i++) {
        float s = g->bufs[0][i];
        for (int k = 1; k < n_ranks; k++) s += g->bufs[k][i];
        for (int k = 0; k < n_ranks; k++) g->bufs[k][i] = s;
    }
    return barrier(g) ? SPEED_OK : SPEED_ERR_CANCELLED;
}

static void cpu_destroy(void *ctx) { (void)ctx; /* handles belong to the group */ }

static const speed_comm_ops_t cpu_ops = {
    .all_reduce_sum = cpu_all_reduce_sum,
    .abort = cpu_abort,
    .destroy = cpu_destroy,
};

speed_status_t speed_comm_group_cpu_create(int size, speed_comm_group_t **group_p) {
    if (!group_p || size < 1 || size > COMM_MAX_RANKS) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: group size %d is out of range [1, %d]", size, COMM_MAX_RANKS);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_comm_group_t *g = speed_calloc(1, sizeof *g);
    if (!g) return SPEED_ERR_NO_MEMORY;
    g->size = size;
    atomic_init(&g->generation, 0);
    atomic_init(&g->aborted, false);
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->cond, NULL);
    for (int r = 0; r < size; r++) {
        g->ranks[r] = (cpu_rank_t){g, r};
        g->handles[r] = (speed_comm_t){.ops = &cpu_ops, .ctx = &g->ranks[r], .rank = r, .size = size, .kind = "cpu"};
    }
    *group_p = g;
    return SPEED_OK;
}

speed_comm_t *speed_comm_group_rank(speed_comm_group_t *g, int rank) {
    if (!g || rank < 0 || rank >= g->size) return NULL;
    return &g->handles[rank];
}

void speed_comm_group_destroy(speed_comm_group_t *g) {
    if (!g) return;
    pthread_mutex_destroy(&g->lock);
    pthread_cond_destroy(&g->cond);
    speed_free(g);
}

/* ---- wrappers --------------------------------------------------------------------------------- */

speed_status_t speed_comm_all_reduce_sum(speed_comm_t *c, float *buf, int64_t count) {
    if (!c || count < 0 || (count > 0 && !buf)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: all-reduce without communicator or buffer, or count < 0");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return c->ops->all_reduce_sum(c->ctx, buf, count);
}

void speed_comm_abort(speed_comm_t *c) {
    if (c) c->ops->abort(c->ctx);
}

void speed_comm_destroy(speed_comm_t *c) {
    if (c) c->ops->destroy(c->ctx);
}

#ifndef SPEED_HAVE_CUDA
speed_status_t speed_comm_nccl_unique_id(uint8_t id[SPEED_COMM_ID_BYTES]) {
    (void)id;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: this build has no NCCL (built without CUDA)");
    return SPEED_ERR_UNSUPPORTED;
}

speed_status_t speed_comm_nccl_create(const uint8_t id[SPEED_COMM_ID_BYTES], int size, int rank,
                                      speed_backend_t *backend, speed_comm_t **comm_p) {
    (void)id, (void)size, (void)rank, (void)backend, (void)comm_p;
    SPEED_ERROR(SPEED_SUBSYS_ENGINE, "comm: this build has no NCCL (built without CUDA)");
    return SPEED_ERR_UNSUPPORTED;
}
#endif
