/* Communicators: the collectives tensor parallelism needs, behind one small ops table.
 *
 * A tensor-parallel group of `size` ranks runs the same forward pass on different slices of
 * the weights (engine/runtime/forward.c); after the attention output projection and after the
 * MLP down projection each rank holds a partial sum of the residual update, and one all-reduce
 * gives every rank the whole. Two implementations:
 *
 *   cpu    ranks are threads of one process, sharing memory: the group object is shared, each
 *          thread holds its rank's handle. Reduction is deterministic: every element is summed
 *          in rank order by exactly one rank and the result copied to all, so every rank ends
 *          with bit-identical buffers (replicated residual streams never drift apart).
 *   nccl   one rank per GPU (kernels/cuda/comm_nccl.c, CUDA builds): ncclAllReduce on the rank's
 *          backend stream. Ranks find each other through a unique id that rank 0 creates
 *          (speed_comm_nccl_unique_id) and hands to the others out of band (the node's control
 *          plane); every rank then calls speed_comm_nccl_create collectively.
 *
 * Buffers are backend memory of the rank's backend (host memory on CPU backends, device memory
 * on CUDA). A collective is called by every rank of the group, in the same order, with the same
 * count; it returns when the rank's buffer holds the result (CPU) or when the reduction is
 * ordered on the rank's stream after the work already queued there (NCCL).
 *
 * Failure. A rank that cannot go on (an op failed mid-step) must not leave the others waiting in
 * a collective: it calls speed_comm_abort, and every collective in flight or called later, on
 * every rank, returns SPEED_ERR_CANCELLED. An aborted group stays aborted; the owner recreates
 * it. (NCCL: ncclCommAbort.)
 *
 * Thread-safety: a rank's handle is used by one thread at a time; different ranks' handles are
 * used concurrently (that is the point). speed_comm_abort may be called from any thread.
 */
#ifndef SPEED_COMM_H
#define SPEED_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "status.h"

typedef struct speed_comm speed_comm_t;

typedef struct {
    speed_status_t (*all_reduce_sum)(void *ctx, float *buf, int64_t count);
    void (*abort)(void *ctx);
    void (*destroy)(void *ctx);
} speed_comm_ops_t;

struct speed_comm {
    const speed_comm_ops_t *ops;
    void *ctx;
    int rank, size;
    const char *kind; /* "cpu", "nccl" */
};

/* ---- cpu: threads of one process ------------------------------------------------------------ */

typedef struct speed_comm_group speed_comm_group_t;

/* A group of `size` ranks (1..64) and one handle per rank (speed_comm_group_rank).
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT, SPEED_ERR_NO_MEMORY. */
speed_status_t speed_comm_group_cpu_create(int size, speed_comm_group_t **group_p);

/* Rank r's handle, owned by the group (do not destroy it; speed_comm_destroy on it is a no-op). */
speed_comm_t *speed_comm_group_rank(speed_comm_group_t *group, int rank);

/* No rank may be inside a collective. NULL is a no-op. */
void speed_comm_group_destroy(speed_comm_group_t *group);

/* ---- nccl: one rank per GPU (CUDA builds) --------------------------------------------------- */

#define SPEED_COMM_ID_BYTES 128

/* Rank 0 creates the id the ranks meet with. Returns SPEED_OK, SPEED_ERR_UNSUPPORTED (built
 * without CUDA/NCCL), SPEED_ERR_DEVICE (NCCL failed: no device, no network). */
speed_status_t speed_comm_nccl_unique_id(uint8_t id[SPEED_COMM_ID_BYTES]);

/* Joins rank `rank` of a group of `size` on the device and stream of `backend` (a CUDA
 * backend; it must outlive the communicator). Blocks until every rank has joined.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (not a CUDA backend, rank out of range),
 * SPEED_ERR_UNSUPPORTED (built without CUDA/NCCL), SPEED_ERR_DEVICE, SPEED_ERR_NO_MEMORY. */
speed_status_t speed_comm_nccl_create(const uint8_t id[SPEED_COMM_ID_BYTES], int size, int rank,
                                      speed_backend_t *backend, speed_comm_t **comm_p);

/* ---- use ------------------------------------------------------------------------------------ */

/* buf[i] = Σ over ranks of buf[i], for i < count, on every rank.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (NULL buffer with count > 0, count < 0),
 * SPEED_ERR_CANCELLED (the group was aborted), SPEED_ERR_DEVICE (NCCL failed). */
speed_status_t speed_comm_all_reduce_sum(speed_comm_t *comm, float *buf, int64_t count);

/* See "Failure" above. NULL is a no-op. */
void speed_comm_abort(speed_comm_t *comm);

/* Frees a communicator made by speed_comm_nccl_create; a group's handles are freed with the
 * group. NULL is a no-op. */
void speed_comm_destroy(speed_comm_t *comm);

static inline int speed_comm_rank(const speed_comm_t *comm) { return comm ? comm->rank : 0; }
static inline int speed_comm_size(const speed_comm_t *comm) { return comm ? comm->size : 1; }

#endif /* SPEED_COMM_H */
