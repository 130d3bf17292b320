/* Thread pool: generation counter + pending counter, each a futex word on its own cache line.
 *
 * Dispatch:  caller stores (fn, arg), sets pending = n - 1, increments gen (seq_cst), and
 *            wakes the gen futex only if a worker has announced it is going to sleep.
 * Worker:    spins until gen changes (bounded by time), else announces itself in n_sleeping,
 *            re-checks gen and sleeps on it. After fn it decrements pending; the one that
 *            reaches 0 wakes the caller if the caller announced it was sleeping.
 * Both sleep protocols are "announce, then re-check" against "publish, then check for
 * sleepers" with sequentially consistent atomics on both sides, so no wake-up is lost; the
 * futex itself re-checks the value atomically.
 */
#include "cpu_pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "alloc.h"
#include "clock.h"
#include "log.h"

/* How long a worker keeps spinning for the next job, and how long the caller spins for the
 * join before sleeping. Ops of one decode step follow each other within microseconds; the gap
 * between two steps (sampling, scheduling) is usually well under a millisecond. Waking a
 * sleeping worker costs a futex wake plus the OS (and, in a VM, the hypervisor) scheduling
 * it: measured 80-370 us on the 2-vCPU development VM, against 0.07 us for a dispatch + join
 * to spinning workers. So workers spin for 2 ms after each job — at most 2 ms of one core per
 * idle period — and then sleep. */
#define SPEED_CPU_POOL_SPIN_NS      2000000
#define SPEED_CPU_POOL_JOIN_SPIN_NS 2000000

#define CACHE_LINE 64

typedef struct {
    speed_cpu_pool_t *pool;
    int index;
    pthread_t thread;
} worker_t;

struct speed_cpu_pool {
    _Alignas(CACHE_LINE) _Atomic uint32_t gen; /* futex word: bumped once per job */
    _Atomic int n_sleeping;                    /* workers inside (or about to enter) futex wait */
    _Atomic int stop;
    speed_cpu_task_cb_t fn;
    void *arg;
    _Alignas(CACHE_LINE) _Atomic uint32_t pending; /* futex word: workers still running the job */
    _Atomic int caller_sleeping;
    _Alignas(CACHE_LINE) int n_threads;
    int n_started;
    worker_t *workers;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
}

static void futex_wait(_Atomic uint32_t *word, uint32_t expected) {
#if defined(__linux__)
    /* EAGAIN (value already changed) and EINTR both just mean "look again". */
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
#else
    (void)word;
    (void)expected;
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
#endif
}

static void futex_wake_all(_Atomic uint32_t *word) {
#if defined(__linux__)
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Spins until *word != value or the budget runs out; returns the last value seen. */
static uint32_t spin_while_equal(_Atomic uint32_t *word, uint32_t value, uint64_t budget_ns) {
    uint64_t start = 0;
    for (unsigned i = 1;; i++) {
        uint32_t v = atomic_load_explicit(word, memory_order_acquire);
        if (v != value) return v;
        cpu_relax();
        if ((i & 255) == 0) {
            uint64_t t = speed_clock_mono_ns();
            if (!start)
                start = t;
            else if (t - start > budget_ns)
                return v;
        }
    }
}

static void *worker_main(void *p) {
    worker_t *w = p;
    speed_cpu_pool_t *pool = w->pool;
    uint32_t seen = 0; /* gen's value at creation: a job published before this thread got here is not missed */
    for (;;) {
        uint32_t g = spin_while_equal(&pool->gen, seen, SPEED_CPU_POOL_SPIN_NS);
        while (g == seen) {
            atomic_fetch_add(&pool->n_sleeping, 1);
            g = atomic_load(&pool->gen);
            if (g == seen) futex_wait(&pool->gen, seen);
            atomic_fetch_sub(&pool->n_sleeping, 1);
            g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        }
        seen = g;
        if (atomic_load_explicit(&pool->stop, memory_order_acquire)) break;
        pool->fn(pool->arg, w->index, pool->n_threads);
        if (atomic_fetch_sub(&pool->pending, 1) == 1 && atomic_load(&pool->caller_sleeping))
            futex_wake_all(&pool->pending);
    }
    return NULL;
}

/* Publishes the current (fn, arg, stop) to every worker. */
static void publish(speed_cpu_pool_t *pool) {
    atomic_store_explicit(&pool->pending, (uint32_t)(pool->n_started), memory_order_relaxed);
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: orders the stores above before the bump */
    if (atomic_load(&pool->n_sleeping) > 0) futex_wake_all(&pool->gen);
}

static void join(speed_cpu_pool_t *pool) {
    uint64_t start = 0;
    for (unsigned i = 1; atomic_load_explicit(&pool->pending, memory_order_acquire) != 0; i++) {
        cpu_relax();
        if ((i & 255) == 0) {
            uint64_t t = speed_clock_mono_ns();
            if (!start)
                start = t;
            else if (t - start > SPEED_CPU_POOL_JOIN_SPIN_NS)
                break;
        }
    }
    uint32_t v = atomic_load_explicit(&pool->pending, memory_order_acquire);
    if (!v) return;
    atomic_store(&pool->caller_sleeping, 1);
    while ((v = atomic_load(&pool->pending)) != 0) futex_wait(&pool->pending, v);
    atomic_store(&pool->caller_sleeping, 0);
}

void speed_cpu_pool_run(speed_cpu_pool_t *pool, speed_cpu_task_cb_t fn, void *arg) {
    if (pool->n_started == 0) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    publish(pool);
    fn(arg, 0, pool->n_threads);
    join(pool);
}

int speed_cpu_pool_size(const speed_cpu_pool_t *pool) { return pool->n_threads; }

static void stop_workers(speed_cpu_pool_t *pool) {
    if (pool->n_started == 0) return;
    atomic_store_explicit(&pool->stop, 1, memory_order_release);
    publish(pool);
    for (int i = 0; i < pool->n_started; i++) pthread_join(pool->workers[i].thread, NULL);
}

speed_status_t speed_cpu_pool_create(int n_threads, speed_cpu_pool_t **pool_p) {
    if (n_threads < 1) n_threads = 1;
    speed_cpu_pool_t *pool = speed_aligned_alloc(CACHE_LINE, sizeof *pool);
    if (!pool) return SPEED_ERR_NO_MEMORY;
    memset(pool, 0, sizeof *pool);
    pool->n_threads = n_threads;
    if (n_threads > 1) {
        pool->workers = speed_calloc((size_t)n_threads - 1, sizeof *pool->workers);
        if (!pool->workers) {
            speed_aligned_free(pool);
            return SPEED_ERR_NO_MEMORY;
        }
    }
    for (int i = 0; i < n_threads - 1; i++) {
        worker_t *w = &pool->workers[i];
        w->pool = pool;
        w->index = i + 1;
        int rc = pthread_create(&w->thread, NULL, worker_main, w);
        if (rc) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "cpu backend: cannot start worker thread %d of %d: %s", i + 1,
                        n_threads - 1, strerror(rc));
            stop_workers(pool);
            speed_free(pool->workers);
            speed_aligned_free(pool);
            return SPEED_ERR_INTERNAL;
        }
        pool->n_started = i + 1;
    }
    *pool_p = pool;
    return SPEED_OK;
}

void speed_cpu_pool_destroy(speed_cpu_pool_t *pool) {
    if (!pool) return;
    stop_workers(pool);
    speed_free(pool->workers);
    speed_aligned_free(pool);
}
