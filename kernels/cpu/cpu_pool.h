/* A persistent thread pool for the fast CPU backend (internal to kernels/cpu).
 *
 * One job at a time: speed_cpu_pool_run(pool, fn, arg) calls fn(arg, i, n) once on each of the
 * pool's n threads — i = 0 on the calling thread, 1 .. n-1 on the workers — and returns when
 * every call has returned. Work splitting is up to fn (static ranges or an atomic counter).
 *
 * Latency: a decode step issues a few hundred small ops, so dispatch and the final join must
 * cost about a microsecond. Workers spin on a generation counter for a short while after each
 * job (SPEED_CPU_POOL_SPIN_NS) and only then sleep on a futex; the dispatcher issues a wake-up
 * system call only when some worker is actually asleep. The caller joins the same way: it
 * spins, then sleeps on the pending counter. A pool left idle for long holds no CPU.
 *
 * Thread-safety: one thread drives a pool at a time (the backend's user). fn must not call
 * speed_cpu_pool_run on the same pool.
 */
#ifndef SPEED_CPU_POOL_H
#define SPEED_CPU_POOL_H

#include "status.h"

typedef void (*speed_cpu_task_cb_t)(void *arg, int thread_index, int n_threads);

typedef struct speed_cpu_pool speed_cpu_pool_t;

/* n_threads >= 1 (the caller counts as one; n_threads - 1 workers are started).
 * SPEED_ERR_NO_MEMORY, or SPEED_ERR_INTERNAL when a thread cannot be started (logged). */
speed_status_t speed_cpu_pool_create(int n_threads, speed_cpu_pool_t **pool_p);

/* Stops and joins the workers. NULL is a no-op. Must not race with speed_cpu_pool_run. */
void speed_cpu_pool_destroy(speed_cpu_pool_t *pool);

int speed_cpu_pool_size(const speed_cpu_pool_t *pool);

/* Runs fn(arg, i, n) for every i in [0, n), n = pool size, and waits for all of them. With one
 * thread this is a plain call. Memory written by any fn call is visible to the caller after
 * return, and memory written by the caller before the call is visible to every fn. */
void speed_cpu_pool_run(speed_cpu_pool_t *pool, speed_cpu_task_cb_t fn, void *arg);

#endif /* SPEED_CPU_POOL_H */
