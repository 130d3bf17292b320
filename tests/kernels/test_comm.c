/* Communicators (kernels/comm.h).
 *
 *   test_comm cpu    the cpu group: ranks on threads; all-reduce sums for 1..8 ranks and odd
 *                    sizes, every rank ends bit-identical, rank-order summation, many rounds in
 *                    a row, count mismatch and abort wake every rank, NCCL absent or present.
 *   test_comm nccl   NCCL across the GPUs of this machine (one thread per rank, one CUDA backend
 *                    each) against the same sums computed on the host; exit 77 without NCCL or
 *                    without a GPU.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "comm.h"
#include "log.h"
#include "test_gpu.h"

/* element i of rank r's contribution: values of very different magnitudes, so the order of
 * the summation shows in the low bits */
static float contribution(int r, int64_t i) {
    uint32_t h = (uint32_t)(i * 2654435761u) ^ (uint32_t)(r * 40503u + 17u);
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    float scale = (h & 3) == 0 ? 1e6f : (h & 3) == 1 ? 1.0f : 1e-3f;
    return scale * ((float)(h >> 8) / (float)(1u << 24) - 0.5f);
}

/* the sum in rank order, in f32, as the cpu group computes it */
static float rank_order_sum(int n, int64_t i) {
    float s = contribution(0, i);
    for (int r = 1; r < n; r++) s += contribution(r, i);
    return s;
}

typedef struct {
    speed_comm_t *comm;
    int64_t count;
    int rounds;
    float *buf;
    speed_status_t st;
    int mismatches;
} rank_job_t;

static void *rank_main(void *arg) {
    rank_job_t *j = arg;
    int r = speed_comm_rank(j->comm);
    for (int round = 0; round < j->rounds && j->st == SPEED_OK; round++) {
        for (int64_t i = 0; i < j->count; i++) j->buf[i] = contribution(r, i + round);
        j->st = speed_comm_all_reduce_sum(j->comm, j->buf, j->count);
        if (j->st != SPEED_OK) break;
        int n = speed_comm_size(j->comm);
        for (int64_t i = 0; i < j->count; i++)
            if (memcmp(&j->buf[i], &(float){rank_order_sum(n, i + round)}, sizeof(float)) != 0) j->mismatches++;
    }
    return NULL;
}

static void test_cpu_sums(void) {
    const int sizes[] = {1, 2, 3, 4, 8};
    const int64_t counts[] = {0, 1, 7, 1000, 4099};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        int n = sizes[si];
        speed_comm_group_t *g = NULL;
        CHECK_INT_EQ(speed_comm_group_cpu_create(n, &g), SPEED_OK);
        if (!g) continue;
        for (size_t ci = 0; ci < sizeof counts / sizeof counts[0]; ci++) {
            rank_job_t jobs[8];
            pthread_t t[8];
            for (int r = 0; r < n; r++) {
                jobs[r] = (rank_job_t){.comm = speed_comm_group_rank(g, r),
                                       .count = counts[ci],
                                       .rounds = 5,
                                       .buf = malloc((size_t)(counts[ci] + 1) * sizeof(float)),
                                       .st = SPEED_OK};
                CHECK_INT_EQ(speed_comm_rank(jobs[r].comm), r);
                CHECK_INT_EQ(speed_comm_size(jobs[r].comm), n);
                pthread_create(&t[r], NULL, rank_main, &jobs[r]);
            }
            for (int r = 0; r < n; r++) pthread_join(t[r], NULL);
            for (int r = 0; r < n; r++) {
                CHECK_MSG(jobs[r].st == SPEED_OK && jobs[r].mismatches == 0,
                          "%d ranks, %lld elements: rank %d: %s, %d elements differ from the rank-order sum", n,
                          (long long)counts[ci], r, speed_status_string(jobs[r].st), jobs[r].mismatches);
                free(jobs[r].buf);
            }
        }
        CHECK(speed_comm_group_rank(g, n) == NULL);
        CHECK(speed_comm_group_rank(g, -1) == NULL);
        speed_comm_group_destroy(g);
    }
    speed_comm_group_t *g = NULL;
    CHECK_INT_EQ(speed_comm_group_cpu_create(0, &g), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_comm_group_cpu_create(65, &g), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(g == NULL);
}

typedef struct {
    speed_comm_t *comm;
    int64_t count;
    int delay_ms;  /* before the call */
    bool do_abort; /* abort instead of calling */
    speed_status_t st;
    atomic_bool done;
} abort_job_t;

static void *abort_main(void *arg) {
    abort_job_t *j = arg;
    usleep((useconds_t)j->delay_ms * 1000);
    float buf[16] = {0};
    if (j->do_abort) {
        speed_comm_abort(j->comm);
        j->st = SPEED_ERR_CANCELLED;
    } else {
        j->st = speed_comm_all_reduce_sum(j->comm, buf, j->count);
    }
    atomic_store(&j->done, true);
    return NULL;
}

/* Ranks waiting in a collective when another aborts, or calls with another count, all return. */
static void test_cpu_failures(void) {
    for (int mode = 0; mode < 2; mode++) {
        speed_comm_group_t *g = NULL;
        CHECK_INT_EQ(speed_comm_group_cpu_create(3, &g), SPEED_OK);
        if (!g) return;
        abort_job_t jobs[3];
        pthread_t t[3];
        for (int r = 0; r < 3; r++) {
            jobs[r] = (abort_job_t){.comm = speed_comm_group_rank(g, r), .count = 16, .st = SPEED_OK};
            atomic_init(&jobs[r].done, false);
        }
        jobs[2].delay_ms = 100;
        if (mode == 0)
            jobs[2].do_abort = true; /* rank 2 gives up while 0 and 1 wait */
        else
            jobs[2].count = 8; /* rank 2 disagrees on the size */
        for (int r = 0; r < 3; r++) pthread_create(&t[r], NULL, abort_main, &jobs[r]);
        for (int w = 0; w < 200 && !(jobs[0].done && jobs[1].done && jobs[2].done); w++) usleep(10000);
        bool all_done = jobs[0].done && jobs[1].done && jobs[2].done;
        CHECK_MSG(all_done, "mode %d: ranks still waiting 2 s after the failure", mode);
        if (!all_done) speed_comm_abort(jobs[0].comm); /* let the test end */
        for (int r = 0; r < 3; r++) pthread_join(t[r], NULL);
        if (mode == 0) {
            CHECK_INT_EQ(jobs[0].st, SPEED_ERR_CANCELLED);
            CHECK_INT_EQ(jobs[1].st, SPEED_ERR_CANCELLED);
        } else {
            for (int r = 0; r < 3; r++)
                CHECK_MSG(jobs[r].st == SPEED_ERR_INVALID_ARGUMENT || jobs[r].st == SPEED_ERR_CANCELLED, "rank %d: %s",
                          r, speed_status_string(jobs[r].st));
            int n_invalid = 0;
            for (int r = 0; r < 3; r++) n_invalid += jobs[r].st == SPEED_ERR_INVALID_ARGUMENT;
            CHECK(n_invalid >= 1);
        }
        /* aborted for good: a later call fails at once */
        float x = 1;
        CHECK_INT_EQ(speed_comm_all_reduce_sum(speed_comm_group_rank(g, 0), &x, 1), SPEED_ERR_CANCELLED);
        speed_comm_group_destroy(g);
    }
    CHECK_INT_EQ(speed_comm_all_reduce_sum(NULL, NULL, 0), SPEED_ERR_INVALID_ARGUMENT);
    speed_comm_abort(NULL);
    speed_comm_destroy(NULL);
    speed_comm_group_destroy(NULL);
}

/* ---- nccl ---------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *id;
    int size, rank;
    speed_backend_t *be;
    int64_t count;
    speed_status_t st;
    int mismatches;
    double max_rel;
} nccl_job_t;

static void *nccl_main(void *arg) {
    nccl_job_t *j = arg;
    speed_comm_t *c = NULL;
    j->st = speed_comm_nccl_create(j->id, j->size, j->rank, j->be, &c);
    if (j->st != SPEED_OK) return NULL;
    float *host = malloc((size_t)j->count * sizeof(float));
    void *dev = NULL;
    j->st = speed_backend_alloc(j->be, (size_t)j->count * sizeof(float), &dev);
    for (int64_t i = 0; j->st == SPEED_OK && i < j->count; i++) host[i] = contribution(j->rank, i);
    if (j->st == SPEED_OK) j->st = speed_backend_upload(j->be, dev, host, (size_t)j->count * sizeof(float));
    if (j->st == SPEED_OK) j->st = speed_comm_all_reduce_sum(c, dev, j->count);
    if (j->st == SPEED_OK) j->st = speed_backend_download(j->be, host, dev, (size_t)j->count * sizeof(float));
    for (int64_t i = 0; j->st == SPEED_OK && i < j->count; i++) {
        double want = 0, mag = 0;
        for (int r = 0; r < j->size; r++) {
            want += contribution(r, i);
            mag += fabs(contribution(r, i));
        }
        double rel = fabs(host[i] - want) / (mag > 0 ? mag : 1);
        if (rel > j->max_rel) j->max_rel = rel;
        if (rel > 1e-6) j->mismatches++;
    }
    speed_backend_free(j->be, dev);
    free(host);
    speed_comm_destroy(c);
    return NULL;
}

static int test_nccl(void) {
    uint8_t id[SPEED_COMM_ID_BYTES];
    speed_status_t st = speed_comm_nccl_unique_id(id);
    if (st == SPEED_ERR_UNSUPPORTED) tu_cuda_unavailable_exit("test_comm_nccl", "built without NCCL");
    speed_backend_t *bes[8] = {0};
    int n = 0;
    for (; n < 8; n++) {
        speed_backend_params_t bp = speed_backend_default_params();
        bp.kind = SPEED_BACKEND_CUDA;
        bp.device = n;
        if (speed_backend_create(&bp, &bes[n]) != SPEED_OK) break;
    }
    if (n == 0) {
        char detail[256];
        snprintf(detail, sizeof detail, "no CUDA device could be opened: %s", speed_log_last_error());
        tu_cuda_unavailable_exit("test_comm_nccl", detail); /* skips only without a GPU */
    }
    CHECK_MSG(st == SPEED_OK, "ncclGetUniqueId: %s (%s)", speed_status_string(st), speed_log_last_error());
    nccl_job_t jobs[8];
    pthread_t t[8];
    for (int r = 0; r < n; r++) {
        jobs[r] = (nccl_job_t){.id = id, .size = n, .rank = r, .be = bes[r], .count = 100003, .st = SPEED_OK};
        pthread_create(&t[r], NULL, nccl_main, &jobs[r]);
    }
    for (int r = 0; r < n; r++) pthread_join(t[r], NULL);
    for (int r = 0; r < n; r++) {
        CHECK_MSG(jobs[r].st == SPEED_OK && jobs[r].mismatches == 0, "%d GPUs: rank %d: %s (%s), %d mismatches", n, r,
                  speed_status_string(jobs[r].st), speed_log_last_error(), jobs[r].mismatches);
        fprintf(stderr, "nccl %d GPU(s): rank %d max relative error %.2e\n", n, r, jobs[r].max_rel);
    }
    for (int r = 0; r < n; r++) speed_backend_destroy(bes[r]);
    return CHECK_DONE();
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "cpu";
    if (strcmp(mode, "nccl") == 0) return test_nccl();
    test_cpu_sums();
    test_cpu_failures();
    uint8_t id[SPEED_COMM_ID_BYTES];
    speed_status_t st = speed_comm_nccl_unique_id(id);
    CHECK_MSG(st == SPEED_OK || st == SPEED_ERR_UNSUPPORTED || st == SPEED_ERR_DEVICE, "nccl unique id: %s",
              speed_status_string(st));
    return CHECK_DONE();
}
