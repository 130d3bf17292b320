/* router/balance: round robin evenness, least loaded minimum, exclusions, down/up and
 * draining nodes, holders and speed_balance_pool_replace (also racing with pickers),
 * concurrent picks from 8 threads; admission limiter bounds, FIFO
 * hand-off, timeout and close; router/route: the decode-only decision. */
#include <pthread.h>
#include <stdatomic.h>

#include "alloc.h"
#include "balance.h"
#include "check.h"
#include "clock.h"
#include "log.h"
#include "route.h"
#include "test_clock.h"

static speed_balance_pool_t *make_pool(speed_balance_policy_t policy, size_t n) {
    speed_balance_pool_params_t p = speed_balance_pool_default_params();
    p.policy = policy;
    speed_balance_pool_t *pool = NULL;
    CHECK_INT_EQ(speed_balance_pool_create("test", &p, &pool), SPEED_OK);
    for (size_t i = 0; i < n; i++) {
        char addr[32];
        snprintf(addr, sizeof addr, "10.0.0.%zu:7000", i);
        size_t idx = 99;
        CHECK_INT_EQ(speed_balance_pool_add(pool, addr, &idx), SPEED_OK);
        CHECK_INT_EQ(idx, i);
    }
    return pool;
}

static void test_pool_basics(void) {
    speed_balance_pool_t *pool = NULL;
    speed_balance_pool_params_t p = {SPEED_BALANCE_ROUND_ROBIN, 2};
    CHECK_INT_EQ(speed_balance_pool_create("decode", &p, &pool), SPEED_OK);
    size_t idx;
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_ERR_PEER_UNREACHABLE);
    CHECK_INT_EQ(speed_balance_pool_add(pool, "a:1", NULL), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_add(pool, "a:1", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_add(pool, "", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_add(pool, NULL, NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_add(pool, "b:2", NULL), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_add(pool, "c:3", NULL), SPEED_ERR_CAPACITY);
    CHECK_INT_EQ(speed_balance_pool_size(pool), 2);
    CHECK_STR_EQ(speed_balance_pool_address(pool, 1), "b:2");
    CHECK(speed_balance_pool_address(pool, 2) == NULL);
    speed_node_load_t load = {1, 2, 0.5, 0};
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 5, &load), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_mark_down(pool, 5), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 1, &idx), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_pick(NULL, NULL, 0, &idx), SPEED_ERR_INVALID_ARGUMENT);
    speed_balance_pool_destroy(pool);
    speed_balance_pool_destroy(NULL);

    p.n_nodes_max = 0;
    CHECK_INT_EQ(speed_balance_pool_create("x", &p, &pool), SPEED_ERR_INVALID_ARGUMENT);
    p.n_nodes_max = 4;
    p.policy = (speed_balance_policy_t)9;
    CHECK_INT_EQ(speed_balance_pool_create("x", &p, &pool), SPEED_ERR_INVALID_ARGUMENT);

    /* allocation failures in create/add: a status, nothing leaked */
    for (int n = 0; n < 10; n++) {
        int64_t live = speed_alloc_live_count();
        speed_alloc_fail_after(n, 0);
        speed_balance_pool_t *q = NULL;
        speed_status_t st = speed_balance_pool_create("f", NULL, &q);
        if (st == SPEED_OK) st = speed_balance_pool_add(q, "x:1", NULL);
        int64_t injected = speed_alloc_injected_failures();
        speed_alloc_fail_after(-1, 0);
        CHECK(injected == 0 ? st == SPEED_OK : st == SPEED_ERR_NO_MEMORY);
        speed_balance_pool_destroy(q);
        CHECK_INT_EQ(speed_alloc_live_count(), live);
        if (!injected) break;
    }
}

static void test_round_robin(void) {
    speed_balance_pool_t *pool = make_pool(SPEED_BALANCE_ROUND_ROBIN, 4);
    int counts[4] = {0};
    size_t last = 99;
    for (int i = 0; i < 400; i++) {
        size_t idx;
        CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
        if (idx < 4) counts[idx]++;
        if (last != 99) CHECK_INT_EQ(idx, (last + 1) % 4);
        last = idx;
    }
    for (int i = 0; i < 4; i++) CHECK_INT_EQ(counts[i], 100);

    /* node 1 down: the others share evenly, 1 is never picked */
    CHECK_INT_EQ(speed_balance_pool_mark_down(pool, 1), SPEED_OK);
    speed_node_state_t st;
    CHECK_INT_EQ(speed_balance_pool_state(pool, 1, &st), SPEED_OK);
    CHECK_INT_EQ(st, SPEED_NODE_DOWN);
    CHECK_INT_EQ(speed_balance_pool_n_up(pool), 3);
    int c2[4] = {0};
    for (int i = 0; i < 300; i++) {
        size_t idx;
        CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
        if (idx < 4) c2[idx]++;
    }
    CHECK_INT_EQ(c2[1], 0);
    CHECK(c2[0] == 100 && c2[2] == 100 && c2[3] == 100);

    /* exclusions: the retry after a failure goes elsewhere */
    size_t ex[] = {0, 2};
    for (int i = 0; i < 10; i++) {
        size_t idx;
        CHECK_INT_EQ(speed_balance_pool_pick(pool, ex, 2, &idx), SPEED_OK);
        CHECK_INT_EQ(idx, 3);
    }
    size_t ex3[] = {0, 2, 3};
    size_t idx;
    CHECK_INT_EQ(speed_balance_pool_pick(pool, ex3, 3, &idx), SPEED_ERR_PEER_UNREACHABLE);

    /* health check brings 1 back; draining takes 2 out; draining survives mark_up */
    CHECK_INT_EQ(speed_balance_pool_mark_up(pool, 1), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_set_draining(pool, 2, true), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_mark_up(pool, 2), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_state(pool, 2, &st), SPEED_OK);
    CHECK_INT_EQ(st, SPEED_NODE_DRAINING);
    int c3[4] = {0};
    for (int i = 0; i < 300; i++) {
        CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
        if (idx < 4) c3[idx]++;
    }
    CHECK(c3[0] == 100 && c3[1] == 100 && c3[2] == 0 && c3[3] == 100);
    CHECK_INT_EQ(speed_balance_pool_set_draining(pool, 2, false), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_n_up(pool), 4);
    for (size_t i = 0; i < 4; i++) speed_balance_pool_mark_down(pool, i);
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_ERR_PEER_UNREACHABLE);
    speed_balance_pool_destroy(pool);
}

static void test_least_loaded(void) {
    speed_balance_pool_t *pool = make_pool(SPEED_BALANCE_LEAST_LOADED, 4);
    speed_node_load_t loads[4] = {{5, 1, 0.5, 0}, {2, 0, 0.9, 0}, {1, 3, 0.1, 0}, {7, 0, 0.0, 0}};
    for (size_t i = 0; i < 4; i++) CHECK_INT_EQ(speed_balance_pool_set_load(pool, i, &loads[i]), SPEED_OK);
    /* scores 6, 2, 4, 7: node 1 */
    size_t idx;
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 1);
    int64_t pending;
    CHECK_INT_EQ(speed_balance_pool_pending(pool, 1, &pending), SPEED_OK);
    CHECK_INT_EQ(pending, 1);
    /* node 1 now scores 3 (one pick since the snapshot): still the min */
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 1);
    /* node 1 at 4 ties node 2 at 4: the lower KV usage wins (node 2, 0.1) */
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 2);
    /* a new snapshot forgets the pending picks */
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 1, &loads[1]), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_pending(pool, 1, &pending), SPEED_OK);
    CHECK_INT_EQ(pending, 0);
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 1);
    /* excluded and down nodes are skipped even when least loaded */
    size_t ex[] = {1};
    CHECK_INT_EQ(speed_balance_pool_pick(pool, ex, 1, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 2); /* 2 scores 5 (4 + 1 pending) vs 6 and 7 */
    CHECK_INT_EQ(speed_balance_pool_mark_down(pool, 1), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_mark_down(pool, 2), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 0);

    /* a burst on equal nodes spreads out (pending counts + rotation) */
    for (size_t i = 0; i < 4; i++) {
        speed_node_load_t zero = {0, 0, 0.0, 0};
        speed_balance_pool_set_load(pool, i, &zero);
        speed_balance_pool_mark_up(pool, i);
    }
    int counts[4] = {0};
    for (int i = 0; i < 40; i++) {
        CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
        if (idx < 4) counts[idx]++;
    }
    for (int i = 0; i < 4; i++) CHECK_INT_EQ(counts[i], 10);
    speed_balance_pool_destroy(pool);
}

/* A request that ended on a node since its snapshot no longer loads it: the next pick (a
 * client's next turn, sent at once) sees the node as the end left it, not as the stale snapshot
 * says; a new snapshot forgets the ends (it saw them). */
static void test_finished(void) {
    speed_balance_pool_t *pool = make_pool(SPEED_BALANCE_LEAST_LOADED, 2);
    speed_node_load_t busy = {2, 0, 0.5, 30}, one = {1, 0, 0.2, 10};
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 0, &busy), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 1, &one), SPEED_OK);
    size_t idx;
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 1); /* 2 against 1 */
    /* both of node 0's requests end: it scores 0 against node 1's 2 (1 + the pick) */
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 0, 12), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 0, 8), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 0);
    speed_balance_candidate_t c[2];
    CHECK_INT_EQ(speed_balance_pool_candidates(pool, NULL, 0, c, 2), 2);
    for (int i = 0; i < 2; i++)
        if (c[i].index == 0) CHECK(c[i].finished == 2 && c[i].finished_blocks == 20 && c[i].pending == 1);
    /* more ends than the snapshot knew never make a negative load: a third pick still balances */
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 0, 5), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 0); /* 0 (2 + 1 - 3) against 2 */
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 0, &busy), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_candidates(pool, NULL, 0, c, 2), 2);
    for (int i = 0; i < 2; i++)
        if (c[i].index == 0) CHECK(c[i].finished == 0 && c[i].finished_blocks == 0 && c[i].pending == 0);
    /* an end counted while a status request is out outlives the snapshot it brings back (the
     * node may have taken it before the end); an end from before the request left does not */
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 0, 4), SPEED_OK); /* before: the snapshot knows */
    speed_balance_pool_poll_begin(pool, 0);
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 0, 6), SPEED_OK); /* while it is out */
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 0, &busy), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_candidates(pool, NULL, 0, c, 2), 2);
    for (int i = 0; i < 2; i++)
        if (c[i].index == 0) CHECK(c[i].finished == 1 && c[i].finished_blocks == 6);
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 0, &busy), SPEED_OK); /* a snapshot not polled for */
    CHECK_INT_EQ(speed_balance_pool_candidates(pool, NULL, 0, c, 2), 2);
    for (int i = 0; i < 2; i++)
        if (c[i].index == 0) CHECK(c[i].finished == 0 && c[i].finished_blocks == 0);
    speed_balance_pool_poll_begin(pool, 9); /* ignored */
    speed_balance_pool_poll_begin(NULL, 0);
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 7, 1), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 0, -1), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_finish(NULL, 0, 1), SPEED_ERR_INVALID_ARGUMENT);
    speed_balance_pool_destroy(pool);
}

/* speed_balance_pool_replace: refused while the entry is held or UP, then a fresh DOWN entry
 * with the new address and no load, pending or finished counts; takes only land on UP nodes. */
static void test_replace(void) {
    speed_balance_pool_t *pool = make_pool(SPEED_BALANCE_LEAST_LOADED, 3);
    speed_node_load_t busy = {3, 2, 0.7, 40}, light = {5, 5, 0.9, 90};
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 0, &light), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 1, &busy), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_set_load(pool, 2, &light), SPEED_OK);
    size_t idx = 9;
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 1);
    CHECK_INT_EQ(speed_balance_pool_holders(pool, 1), 1);
    CHECK_INT_EQ(speed_balance_pool_finish(pool, 1, 7), SPEED_OK);
    /* UP: refused even without a holder elsewhere */
    CHECK_INT_EQ(speed_balance_pool_replace(pool, 0, "new:1"), SPEED_ERR_CAPACITY);
    /* retired (DRAINING) but held: refused, nothing changed */
    CHECK_INT_EQ(speed_balance_pool_set_draining(pool, 1, true), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_replace(pool, 1, "new:1"), SPEED_ERR_CAPACITY);
    CHECK_STR_EQ(speed_balance_pool_address(pool, 1), "10.0.0.1:7000");
    /* a second holder (a queued Cancel): still refused after the first lets go */
    CHECK_INT_EQ(speed_balance_pool_hold(pool, 1), SPEED_OK);
    speed_balance_pool_release(pool, 1);
    CHECK_INT_EQ(speed_balance_pool_holders(pool, 1), 1);
    CHECK_INT_EQ(speed_balance_pool_replace(pool, 1, "new:1"), SPEED_ERR_CAPACITY);
    speed_balance_pool_release(pool, 1);
    CHECK_INT_EQ(speed_balance_pool_holders(pool, 1), 0);
    /* bad arguments */
    CHECK_INT_EQ(speed_balance_pool_replace(pool, 1, "10.0.0.2:7000"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_replace(pool, 3, "new:1"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_replace(pool, 1, ""), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_replace(NULL, 1, "new:1"), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_balance_pool_hold(pool, 3), SPEED_ERR_INVALID_ARGUMENT);
    speed_balance_pool_release(pool, 3); /* ignored */
    /* nobody holds it, not UP: the entry is the new node's, DOWN, with nothing of the old one */
    CHECK_INT_EQ(speed_balance_pool_replace(pool, 1, "new:1"), SPEED_OK);
    CHECK_STR_EQ(speed_balance_pool_address(pool, 1), "new:1");
    speed_node_state_t state = SPEED_NODE_UP;
    CHECK_INT_EQ(speed_balance_pool_state(pool, 1, &state), SPEED_OK);
    CHECK_INT_EQ(state, SPEED_NODE_DOWN);
    CHECK_INT_EQ(speed_balance_pool_n_up(pool), 2);
    int64_t pending = -1;
    CHECK_INT_EQ(speed_balance_pool_pending(pool, 1, &pending), SPEED_OK);
    CHECK_INT_EQ(pending, 0);
    CHECK_INT_EQ(speed_balance_pool_take(pool, 1), SPEED_ERR_PEER_UNREACHABLE); /* not UP: no take */
    CHECK_INT_EQ(speed_balance_pool_holders(pool, 1), 0);
    CHECK_INT_EQ(speed_balance_pool_mark_up(pool, 1), SPEED_OK);
    speed_balance_candidate_t c[3];
    CHECK_INT_EQ(speed_balance_pool_candidates(pool, NULL, 0, c, 3), 3);
    for (int i = 0; i < 3; i++)
        if (c[i].index == 1)
            CHECK(c[i].load.n_running == 0 && c[i].load.n_waiting == 0 && c[i].load.active_blocks == 0 &&
                  c[i].load.kv_usage == 0 && c[i].pending == 0 && c[i].finished == 0 && c[i].finished_blocks == 0);
    /* the fresh entry is the least loaded now; the old address is gone from the pool */
    CHECK_INT_EQ(speed_balance_pool_pick(pool, NULL, 0, &idx), SPEED_OK);
    CHECK_INT_EQ(idx, 1);
    speed_balance_pool_release(pool, 1);
    CHECK_INT_EQ(speed_balance_pool_take(pool, 2), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_holders(pool, 2), 1);
    speed_balance_pool_release(pool, 2);
    size_t added = 0;
    CHECK_INT_EQ(speed_balance_pool_add(pool, "10.0.0.1:7000", &added), SPEED_OK);
    CHECK_INT_EQ(added, 3);
    speed_balance_pool_destroy(pool);
}

/* Pickers hold node 0 and read its address twice while another thread retires it and replaces
 * it again and again: a holder must never see its node's address change under it. */
typedef struct {
    speed_balance_pool_t *pool;
    _Atomic bool stop;
    _Atomic int changed, picks, replaced;
} replace_race_t;

static void *replace_picker(void *arg) {
    replace_race_t *t = arg;
    while (!atomic_load(&t->stop)) {
        size_t idx;
        if (speed_balance_pool_pick(t->pool, NULL, 0, &idx) != SPEED_OK) continue;
        char seen[64];
        snprintf(seen, sizeof seen, "%s", speed_balance_pool_address(t->pool, idx));
        for (volatile int spin = 0; spin < 200; spin++) {}
        if (strcmp(seen, speed_balance_pool_address(t->pool, idx)) != 0) atomic_fetch_add(&t->changed, 1);
        atomic_fetch_add(&t->picks, 1);
        speed_balance_pool_release(t->pool, idx);
    }
    return NULL;
}

static void test_replace_race(void) {
    replace_race_t t = {.pool = make_pool(SPEED_BALANCE_ROUND_ROBIN, 1)};
    atomic_init(&t.stop, false);
    atomic_init(&t.changed, 0);
    atomic_init(&t.picks, 0);
    atomic_init(&t.replaced, 0);
    pthread_t th[4];
    for (int i = 0; i < 4; i++) CHECK(pthread_create(&th[i], NULL, replace_picker, &t) == 0);
    for (int round = 0; round < 20000 || atomic_load(&t.replaced) < 100; round++) {
        char addr[32];
        snprintf(addr, sizeof addr, "10.1.%d.%d:7000", (round / 250) % 250, round % 250);
        speed_balance_pool_set_draining(t.pool, 0, true); /* retired: no new picks */
        if (speed_balance_pool_replace(t.pool, 0, addr) == SPEED_OK) atomic_fetch_add(&t.replaced, 1);
        speed_balance_pool_mark_up(t.pool, 0);
        speed_balance_pool_set_draining(t.pool, 0, false);
        if (round > 2000000) break;
    }
    atomic_store(&t.stop, true);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    fprintf(stderr, "replace race: %d picks, %d replacements\n", atomic_load(&t.picks), atomic_load(&t.replaced));
    CHECK(atomic_load(&t.replaced) >= 100 && atomic_load(&t.picks) > 0);
    CHECK_INT_EQ(atomic_load(&t.changed), 0);
    CHECK_INT_EQ(speed_balance_pool_holders(t.pool, 0), 0);
    speed_balance_pool_destroy(t.pool);
}

#define N_THREADS        8
#define PICKS_PER_THREAD 20000

typedef struct {
    speed_balance_pool_t *pool;
    int counts[6];
    int errors;
} picker_t;

static void *picker(void *arg) {
    picker_t *p = arg;
    for (int i = 0; i < PICKS_PER_THREAD; i++) {
        size_t idx;
        size_t ex = 5; /* node 5 is always excluded */
        if (speed_balance_pool_pick(p->pool, &ex, 1, &idx) != SPEED_OK || idx >= 6 || idx == 5)
            p->errors++;
        else
            p->counts[idx]++;
    }
    return NULL;
}

static void *flapper(void *arg) {
    speed_balance_pool_t *pool = arg;
    for (int i = 0; i < 2000; i++) {
        speed_balance_pool_mark_down(pool, 4);
        speed_node_load_t l = {i % 3, 0, 0.1, 0};
        speed_balance_pool_set_load(pool, 0, &l);
        speed_balance_pool_mark_up(pool, 4);
    }
    speed_balance_pool_mark_down(pool, 4);
    return NULL;
}

static void test_concurrent(speed_balance_policy_t policy) {
    speed_balance_pool_t *pool = make_pool(policy, 6);
    picker_t pk[N_THREADS];
    pthread_t th[N_THREADS], fl;
    for (int t = 0; t < N_THREADS; t++) {
        memset(&pk[t], 0, sizeof pk[t]);
        pk[t].pool = pool;
        pthread_create(&th[t], NULL, picker, &pk[t]);
    }
    bool flap = policy == SPEED_BALANCE_LEAST_LOADED;
    if (flap) pthread_create(&fl, NULL, flapper, pool);
    for (int t = 0; t < N_THREADS; t++) pthread_join(th[t], NULL);
    if (flap) pthread_join(fl, NULL);
    int total[6] = {0}, errors = 0;
    for (int t = 0; t < N_THREADS; t++) {
        errors += pk[t].errors;
        for (int i = 0; i < 6; i++) total[i] += pk[t].counts[i];
    }
    CHECK_INT_EQ(errors, 0);
    CHECK_INT_EQ(total[5], 0);
    int sum = 0;
    for (int i = 0; i < 6; i++) sum += total[i];
    CHECK_INT_EQ(sum, N_THREADS * PICKS_PER_THREAD);
    if (policy == SPEED_BALANCE_ROUND_ROBIN) {
        /* picks are serialised: five eligible nodes share exactly */
        for (int i = 0; i < 5; i++) CHECK_INT_EQ(total[i], N_THREADS * PICKS_PER_THREAD / 5);
    } else {
        /* pending counts grow with every pick: nodes 1-3 (never reset) stay level */
        CHECK(abs(total[1] - total[2]) <= 1 && abs(total[2] - total[3]) <= 1);
        int64_t pending = 0;
        speed_balance_pool_pending(pool, 1, &pending);
        CHECK_INT_EQ(pending, total[1]);
    }
    speed_balance_pool_destroy(pool);
}

/* ---- admission --------------------------------------------------------------------- */

typedef struct {
    speed_admission_t *adm;
    int id;
    speed_status_t st;
    double waited_ms;
} waiter_arg_t;

static atomic_int grant_order[8];
static atomic_int n_granted;

static void *waiter(void *arg) {
    waiter_arg_t *w = arg;
    double t0 = 1e3 * speed_clock_mono_s();
    w->st = speed_admission_acquire(w->adm);
    w->waited_ms = 1e3 * speed_clock_mono_s() - t0;
    if (w->st == SPEED_OK) grant_order[atomic_fetch_add(&n_granted, 1)] = w->id;
    return NULL;
}

static void wait_for_waiting(speed_admission_t *adm, int n) {
    for (int i = 0; i < 5000 && speed_admission_waiting(adm) != n; i++) speed_clock_sleep_ms(1);
    CHECK_INT_EQ(speed_admission_waiting(adm), n);
}

static void test_admission(void) {
    speed_admission_params_t p = {2, 3, 10000, 2};
    speed_admission_t *adm = NULL;
    CHECK_INT_EQ(speed_admission_create(&p, &adm), SPEED_OK);
    CHECK_INT_EQ(speed_admission_retry_after(adm), 2);
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_OK);
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_OK);
    CHECK_INT_EQ(speed_admission_in_flight(adm), 2);

    /* three waiters queue in a known order */
    waiter_arg_t w[3];
    pthread_t th[3];
    atomic_store(&n_granted, 0);
    for (int i = 0; i < 3; i++) {
        w[i] = (waiter_arg_t){adm, i, SPEED_ERR_INTERNAL, 0};
        pthread_create(&th[i], NULL, waiter, &w[i]);
        wait_for_waiting(adm, i + 1);
    }
    /* the queue is full: refused at once */
    double t0 = 1e3 * speed_clock_mono_s();
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_ERR_CAPACITY);
    CHECK(1e3 * speed_clock_mono_s() - t0 < 100);

    /* each release hands the slot to the oldest waiter */
    speed_admission_release(adm);
    for (int i = 0; i < 5000 && atomic_load(&n_granted) < 1; i++) speed_clock_sleep_ms(1);
    CHECK_INT_EQ(atomic_load(&n_granted), 1);
    CHECK_INT_EQ(grant_order[0], 0);
    CHECK_INT_EQ(speed_admission_waiting(adm), 2);
    CHECK_INT_EQ(speed_admission_in_flight(adm), 2);
    /* one release at a time: a waiter records its grant after it wakes, so two releases
     * in a row could be recorded out of order even though they were handed out in order */
    for (int k = 2; k <= 3; k++) {
        speed_admission_release(adm);
        for (int i = 0; i < 5000 && atomic_load(&n_granted) < k; i++) speed_clock_sleep_ms(1);
        CHECK_INT_EQ(atomic_load(&n_granted), k);
    }
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    CHECK_INT_EQ(atomic_load(&n_granted), 3);
    CHECK(grant_order[0] == 0 && grant_order[1] == 1 && grant_order[2] == 2);
    for (int i = 0; i < 3; i++) CHECK_INT_EQ(w[i].st, SPEED_OK);
    CHECK_INT_EQ(speed_admission_in_flight(adm), 2);
    speed_admission_release(adm);
    speed_admission_release(adm);
    CHECK_INT_EQ(speed_admission_in_flight(adm), 0);
    CHECK_INT_EQ(speed_admission_waiting(adm), 0);
    speed_admission_destroy(adm);

    /* timeout: a waiter gives up after wait_timeout_ms and leaves the queue */
    speed_admission_params_t pt = {1, 4, 80, 1};
    CHECK_INT_EQ(speed_admission_create(&pt, &adm), SPEED_OK);
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_OK);
    t0 = 1e3 * speed_clock_mono_s();
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_ERR_TIMEOUT);
    double waited = 1e3 * speed_clock_mono_s() - t0;
    CHECK_MSG(waited >= 79 && waited < 2000, "waited %.1f ms", waited);
    CHECK_INT_EQ(speed_admission_waiting(adm), 0);
    /* a timed-out waiter in the middle does not break the FIFO for the others */
    waiter_arg_t a = {adm, 0, SPEED_ERR_INTERNAL, 0};
    pthread_t ta;
    atomic_store(&n_granted, 0);
    pthread_create(&ta, NULL, waiter, &a);
    wait_for_waiting(adm, 1);
    pthread_join(ta, NULL);
    CHECK_INT_EQ(a.st, SPEED_ERR_TIMEOUT);
    speed_admission_release(adm);
    CHECK_INT_EQ(speed_admission_in_flight(adm), 0);
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_OK);

    /* close wakes waiters with CANCELLED and refuses new requests */
    speed_admission_params_t pc = {1, 4, 60000, 1};
    speed_admission_t *adm2 = NULL;
    CHECK_INT_EQ(speed_admission_create(&pc, &adm2), SPEED_OK);
    CHECK_INT_EQ(speed_admission_acquire(adm2), SPEED_OK);
    waiter_arg_t b = {adm2, 0, SPEED_ERR_INTERNAL, 0};
    pthread_t tb;
    pthread_create(&tb, NULL, waiter, &b);
    wait_for_waiting(adm2, 1);
    speed_admission_close(adm2);
    pthread_join(tb, NULL);
    CHECK_INT_EQ(b.st, SPEED_ERR_CANCELLED);
    CHECK(b.waited_ms < 30000);
    CHECK_INT_EQ(speed_admission_acquire(adm2), SPEED_ERR_CANCELLED);
    speed_admission_release(adm2);
    speed_admission_destroy(adm2);
    speed_admission_release(adm);
    speed_admission_destroy(adm);

    /* max_waiting 0: no queue at all */
    speed_admission_params_t p0 = {1, 0, 1000, 1};
    CHECK_INT_EQ(speed_admission_create(&p0, &adm), SPEED_OK);
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_OK);
    CHECK_INT_EQ(speed_admission_acquire(adm), SPEED_ERR_CAPACITY);
    speed_admission_release(adm);
    speed_admission_destroy(adm);

    speed_admission_params_t bad = {0, 1, 1, 1};
    CHECK_INT_EQ(speed_admission_create(&bad, &adm), SPEED_ERR_INVALID_ARGUMENT);
    bad = (speed_admission_params_t){1, -1, 1, 1};
    CHECK_INT_EQ(speed_admission_create(&bad, &adm), SPEED_ERR_INVALID_ARGUMENT);
    bad = (speed_admission_params_t){1, 1, 1, 0};
    CHECK_INT_EQ(speed_admission_create(&bad, &adm), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_admission_acquire(NULL), SPEED_ERR_INVALID_ARGUMENT);
    speed_admission_destroy(NULL);

    speed_alloc_fail_after(0, 0);
    CHECK_INT_EQ(speed_admission_create(NULL, &adm), SPEED_ERR_NO_MEMORY);
    speed_alloc_fail_after(-1, 0);
}

/* Many threads through a small limiter: never more than max_in_flight inside. */
#define STRESS_THREADS 8
static atomic_int inside, max_inside, stress_ok, stress_refused;

static void *stress(void *arg) {
    speed_admission_t *adm = arg;
    for (int i = 0; i < 300; i++) {
        speed_status_t st = speed_admission_acquire(adm);
        if (st != SPEED_OK) {
            atomic_fetch_add(&stress_refused, 1);
            continue;
        }
        int now = atomic_fetch_add(&inside, 1) + 1;
        int m = atomic_load(&max_inside);
        while (now > m && !atomic_compare_exchange_weak(&max_inside, &m, now)) {}
        atomic_fetch_sub(&inside, 1);
        atomic_fetch_add(&stress_ok, 1);
        speed_admission_release(adm);
    }
    return NULL;
}

static void test_admission_stress(void) {
    speed_admission_params_t p = {3, 2, 5000, 1};
    speed_admission_t *adm = NULL;
    CHECK_INT_EQ(speed_admission_create(&p, &adm), SPEED_OK);
    pthread_t th[STRESS_THREADS];
    for (int t = 0; t < STRESS_THREADS; t++) pthread_create(&th[t], NULL, stress, adm);
    for (int t = 0; t < STRESS_THREADS; t++) pthread_join(th[t], NULL);
    CHECK(atomic_load(&max_inside) <= 3);
    CHECK_INT_EQ(atomic_load(&stress_ok) + atomic_load(&stress_refused), STRESS_THREADS * 300);
    CHECK(atomic_load(&stress_ok) > 0);
    CHECK_INT_EQ(speed_admission_in_flight(adm), 0);
    CHECK_INT_EQ(speed_admission_waiting(adm), 0);
    speed_admission_destroy(adm);
}

/* ---- route ------------------------------------------------------------------------- */

static void test_route(void) {
    speed_route_params_t p = speed_route_default_params();
    speed_route_decision_t d = speed_route_decide(&p, 5, 2);
    CHECK_INT_EQ(d.kind, SPEED_ROUTE_DISAGGREGATED); /* threshold 0: never decode-only */
    CHECK_STR_EQ(d.reason, SPEED_ROUTE_REASON_LONG_PROMPT);
    CHECK(d.ok);

    p.decode_only_below = 256;
    d = speed_route_decide(&p, 255, 2);
    CHECK_INT_EQ(d.kind, SPEED_ROUTE_DECODE_ONLY);
    CHECK_STR_EQ(d.reason, "short_prompt");
    CHECK_STR_EQ(speed_route_kind_name(d.kind), "decode_only");
    d = speed_route_decide(&p, 256, 2);
    CHECK_INT_EQ(d.kind, SPEED_ROUTE_DISAGGREGATED);
    CHECK_STR_EQ(d.reason, "long_prompt");
    CHECK_STR_EQ(speed_route_kind_name(d.kind), "disaggregated");
    d = speed_route_decide(&p, 0, 0);
    CHECK_STR_EQ(d.reason, "short_prompt"); /* short wins over "no prefill node" */

    d = speed_route_decide(&p, 4096, 0);
    CHECK_INT_EQ(d.kind, SPEED_ROUTE_DECODE_ONLY);
    CHECK_STR_EQ(d.reason, "no_prefill_node");
    CHECK(d.ok);
    p.decode_only_fallback = false;
    d = speed_route_decide(&p, 4096, 0);
    CHECK_INT_EQ(d.kind, SPEED_ROUTE_DISAGGREGATED);
    CHECK_STR_EQ(d.reason, "prefill_unavailable");
    CHECK(!d.ok);

    d = speed_route_decide(NULL, 1, 1);
    CHECK_INT_EQ(d.kind, SPEED_ROUTE_DISAGGREGATED);
    CHECK_STR_EQ(speed_route_kind_name((speed_route_kind_t)7), "unknown");
}

int main(void) {
    speed_log_configure("error");
    int64_t live = speed_alloc_live_count();
    test_pool_basics();
    test_round_robin();
    test_least_loaded();
    test_finished();
    test_replace();
    test_replace_race();
    test_concurrent(SPEED_BALANCE_ROUND_ROBIN);
    test_concurrent(SPEED_BALANCE_LEAST_LOADED);
    test_admission();
    test_admission_stress();
    test_route();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
