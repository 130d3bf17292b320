/* KV-aware routing in the router, without daemons: the prefix index (kv_index.h), the cost
 * (kv_route.h) and the pool's candidates (balance.h).
 *   index: events and snapshots applied in order; the overlap counts leading blocks only; a
 *          node restart (another instance) and forget drop everything of a node and reset its
 *          cursor; a full set refuses and counts; another seed / block size is ignored;
 *          nodes are independent; a completed request's blocks are anticipated only for a
 *          node whose journal reported stored blocks;
 *   cost:  w = 1 picks the longest prefix whatever the load, w = 0 the least loaded whatever
 *          the prefix, 0.5 trades a block to prefill against a block of load; ties go to the
 *          longer prefix, then fewer requests, then the first candidate; reasons;
 *   pool:  candidates are the UP, not excluded nodes in rotation order; take counts a pick. */
#include "alloc.h"
#include "test_clock.h"
#include "balance.h"
#include "block_hash.h"
#include "check.h"
#include "kv_index.h"
#include "kv_route.h"

#define SEED 0x1234u
#define BT   16

/* One status reply's events: runs of (kind, hashes). */
typedef struct {
    Speed__V1__CacheEvents ev;
    Speed__V1__CacheEventRun runs[4], *ptrs[4];
} events_t;

static void ev_init(events_t *e, uint64_t instance, uint64_t next_seq, bool snapshot) {
    speed__v1__cache_events__init(&e->ev);
    e->ev.instance = instance;
    e->ev.next_seq = next_seq;
    e->ev.snapshot = snapshot;
    e->ev.hash_seed = SEED;
    e->ev.block_tokens = BT;
    e->ev.runs = e->ptrs;
}

static void ev_run(events_t *e, bool evicted, uint64_t *hashes, size_t n) {
    Speed__V1__CacheEventRun *r = &e->runs[e->ev.n_runs];
    speed__v1__cache_event_run__init(r);
    r->kind =
        evicted ? SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_EVICTED : SPEED__V1__CACHE_EVENT_KIND__CACHE_EVENT_STORED;
    r->hashes = hashes;
    r->n_hashes = n;
    e->ptrs[e->ev.n_runs++] = r;
}

static speed_kv_index_t *make_index(size_t n_nodes, size_t max_blocks) {
    speed_kv_index_params_t p = {.n_nodes_max = n_nodes, .max_blocks = max_blocks, .seed = SEED, .block_tokens = BT};
    speed_kv_index_t *idx = NULL;
    CHECK_INT_EQ(speed_kv_index_create(&p, &idx), SPEED_OK);
    return idx;
}

static void test_index(void) {
    speed_kv_index_params_t bad = {.n_nodes_max = 0, .max_blocks = 8, .seed = 1, .block_tokens = 16};
    speed_kv_index_t *idx = NULL;
    CHECK_INT_EQ(speed_kv_index_create(&bad, &idx), SPEED_ERR_INVALID_ARGUMENT);
    bad.n_nodes_max = 2;
    bad.block_tokens = 0;
    CHECK_INT_EQ(speed_kv_index_create(&bad, &idx), SPEED_ERR_INVALID_ARGUMENT);

    idx = make_index(2, 100);
    /* a fresh node: cursor 0 (its first read is a snapshot) */
    Speed__V1__CacheCursor cur;
    speed_kv_index_cursor(idx, 0, &cur);
    CHECK(cur.instance == 0 && cur.next_seq == 0);

    /* a snapshot of the prompt's first three blocks, then events */
    uint64_t prompt[6] = {101, 102, 103, 104, 105, 106};
    events_t e;
    ev_init(&e, 7, 10, true);
    ev_run(&e, false, prompt, 3);
    CHECK(!speed_kv_index_apply(idx, 0, &e.ev));
    speed_kv_index_cursor(idx, 0, &cur);
    CHECK(cur.instance == 7 && cur.next_seq == 10);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 3);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 1, prompt, 6), 0); /* the other node holds nothing */
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 2), 2); /* bounded by the prompt */

    /* leading blocks only: 105 held, 104 not → still 3 */
    uint64_t later[] = {105, 106};
    ev_init(&e, 7, 12, false);
    ev_run(&e, false, later, 2);
    e.ev.more = true;
    CHECK(speed_kv_index_apply(idx, 0, &e.ev)); /* more events wait */
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 3);
    CHECK_INT_EQ(speed_kv_index_size(idx, 0), 5);
    /* 104 arrives: the chain is whole */
    uint64_t mid[] = {104};
    ev_init(&e, 7, 13, false);
    ev_run(&e, false, mid, 1);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 6);
    /* evict block 1: the overlap stops at it, in event order (stored then evicted in one reply) */
    uint64_t again[] = {102}, gone[] = {102};
    ev_init(&e, 7, 15, false);
    ev_run(&e, false, again, 1);
    ev_run(&e, true, gone, 1);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 1);
    speed_kv_index_cursor(idx, 0, &cur);
    CHECK(cur.next_seq == 15);

    /* the node restarted: events of another instance without a snapshot → forget, ask again */
    ev_init(&e, 8, 3, false);
    ev_run(&e, false, prompt, 2);
    CHECK(speed_kv_index_apply(idx, 0, &e.ev));
    CHECK_INT_EQ(speed_kv_index_size(idx, 0), 0);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 0);
    speed_kv_index_cursor(idx, 0, &cur);
    CHECK(cur.instance == 0 && cur.next_seq == 0);
    /* its snapshot replaces everything */
    ev_init(&e, 8, 3, true);
    ev_run(&e, false, prompt, 2);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 2);
    /* a later snapshot of the same instance drops what it does not list */
    ev_init(&e, 8, 9, true);
    ev_run(&e, false, prompt + 4, 1);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_size(idx, 0), 1);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 0);

    /* forget (node down / retired): nothing left, cursor 0 */
    ev_init(&e, 8, 10, false);
    ev_run(&e, false, prompt, 3);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 3);
    speed_kv_index_forget(idx, 0);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, prompt, 6), 0);
    speed_kv_index_cursor(idx, 0, &cur);
    CHECK(cur.instance == 0 && cur.next_seq == 0);

    /* another model's (or block size's) hashes are ignored, and the node forgotten */
    ev_init(&e, 9, 1, true);
    ev_run(&e, false, prompt, 3);
    e.ev.hash_seed = SEED + 1;
    CHECK(!speed_kv_index_apply(idx, 1, &e.ev));
    CHECK_INT_EQ(speed_kv_index_size(idx, 1), 0);
    e.ev.hash_seed = SEED;
    e.ev.block_tokens = BT * 2;
    speed_kv_index_apply(idx, 1, &e.ev);
    CHECK_INT_EQ(speed_kv_index_size(idx, 1), 0);
    speed_kv_index_apply(idx, 1, NULL); /* no events: nothing happens */
    /* out of range: harmless */
    speed_kv_index_forget(idx, 5);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 5, prompt, 6), 0);

    speed_kv_index_stats_t s;
    speed_kv_index_stats(idx, &s);
    CHECK_INT_EQ(s.n_snapshots, 3);
    CHECK_INT_EQ(s.n_ignored, 2);
    CHECK_INT_EQ(s.n_evicted, 1);
    CHECK_INT_EQ(s.n_refused, 0);
    speed_kv_index_destroy(idx);
}

/* A completed request's blocks go in ahead of the node's events, only for a node whose journal
 * reported stored blocks (its cache is on). */
static void test_anticipate(void) {
    speed_kv_index_t *idx = make_index(2, 100);
    uint64_t p[3] = {31, 32, 33};
    CHECK_INT_EQ(speed_kv_index_anticipate(idx, 0, p, 3), 0); /* nothing known of it */
    events_t e;
    ev_init(&e, 4, 1, true); /* an empty snapshot: tracked, but no sign of a cache yet */
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_anticipate(idx, 0, p, 3), 0);
    CHECK_INT_EQ(speed_kv_index_size(idx, 0), 0);
    uint64_t first[] = {31};
    ev_init(&e, 4, 2, false);
    ev_run(&e, false, first, 1);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_anticipate(idx, 0, p, 3), 2); /* 31 was there */
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, p, 3), 3);
    /* the node's events still rule: an eviction removes an anticipated block */
    uint64_t gone[] = {32};
    ev_init(&e, 4, 3, false);
    ev_run(&e, true, gone, 1);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, p, 3), 1);
    /* forgotten: no anticipation until it reports stored blocks again */
    speed_kv_index_forget(idx, 0);
    CHECK_INT_EQ(speed_kv_index_anticipate(idx, 0, p, 3), 0);
    CHECK_INT_EQ(speed_kv_index_anticipate(idx, 1, p, 3), 0);
    speed_kv_index_stats_t s;
    speed_kv_index_stats(idx, &s);
    CHECK_INT_EQ(s.n_anticipated, 2);
    speed_kv_index_destroy(idx);
}

static void test_bound(void) {
    speed_kv_index_t *idx = make_index(1, 4);
    uint64_t h[6] = {1, 2, 3, 4, 5, 6};
    events_t e;
    ev_init(&e, 1, 7, true);
    ev_run(&e, false, h, 6);
    speed_kv_index_apply(idx, 0, &e.ev);
    CHECK_INT_EQ(speed_kv_index_size(idx, 0), 4);
    speed_kv_index_stats_t s;
    speed_kv_index_stats(idx, &s);
    CHECK_INT_EQ(s.n_refused, 2);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, h, 6), 4); /* leading ones were kept */
    speed_kv_index_destroy(idx);
}

/* A real prompt: the router's own hashes find what a node that stored the same prompt holds. */
static void test_prompt_hashes(void) {
    speed_kv_index_t *idx = make_index(2, 1000);
    uint64_t seed = SEED;
    int32_t ids[5 * BT + 3];
    for (int i = 0; i < 5 * BT + 3; i++) ids[i] = i * 7 + 1;
    uint64_t stored[8], asked[8];
    size_t n = speed_block_hash_prompt(seed, ids, 3 * BT + 5, BT, stored, 8); /* the first turn: 3 blocks */
    CHECK_INT_EQ(n, 3);
    events_t e;
    ev_init(&e, 1, 4, true);
    ev_run(&e, false, stored, n);
    speed_kv_index_apply(idx, 1, &e.ev);
    size_t m = speed_block_hash_prompt(seed, ids, 5 * BT + 3, BT, asked, 8); /* the next turn: 5 blocks */
    CHECK_INT_EQ(m, 5);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 1, asked, m), 3);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 0, asked, m), 0);
    ids[BT + 2] += 1; /* an edit in block 1: only block 0 still matches */
    m = speed_block_hash_prompt(seed, ids, 5 * BT + 3, BT, asked, 8);
    CHECK_INT_EQ(speed_kv_index_overlap(idx, 1, asked, m), 1);
    speed_kv_index_destroy(idx);
}

static void test_cost(void) {
    /* node 0: 8 of 10 blocks cached but loaded (30 blocks); node 1: nothing cached, idle */
    speed_kv_candidate_t c[3] = {
        {.node = 10, .overlap_blocks = 8, .load_blocks = 30, .load_requests = 3},
        {.node = 11, .overlap_blocks = 0, .load_blocks = 0, .load_requests = 0},
    };
    const char *why = NULL;
    CHECK_INT_EQ(speed_kv_route_pick(1.0, 10, c, 2, &why), 0); /* affinity extreme */
    CHECK_STR_EQ(why, SPEED_KV_ROUTE_REASON_AFFINITY);
    CHECK_INT_EQ(speed_kv_route_pick(0.0, 10, c, 2, &why), 1); /* balance extreme */
    CHECK_STR_EQ(why, SPEED_KV_ROUTE_REASON_BALANCE);
    /* 0.5: node 0 costs (2 + 30) / 2 = 16, node 1 (10 + 0) / 2 = 5 → node 1 */
    CHECK_INT_EQ(speed_kv_route_pick(0.5, 10, c, 2, NULL), 1);
    CHECK(fabs(speed_kv_route_cost(0.5, 10, &c[0]) - 16) < 1e-12);
    /* less load on node 0 (4 blocks): 3 < 5 → node 0 */
    c[0].load_blocks = 4;
    CHECK_INT_EQ(speed_kv_route_pick(0.5, 10, c, 2, &why), 0);
    CHECK_STR_EQ(why, SPEED_KV_ROUTE_REASON_AFFINITY);
    /* weights outside [0, 1] are clamped */
    c[0].load_blocks = 30;
    CHECK_INT_EQ(speed_kv_route_pick(7.0, 10, c, 2, NULL), 0);
    CHECK_INT_EQ(speed_kv_route_pick(-1.0, 10, c, 2, NULL), 1);
    /* w = 1 and equal overlap: the load breaks the tie (fewer requests) */
    speed_kv_candidate_t t[3] = {
        {.node = 0, .overlap_blocks = 2, .load_blocks = 9, .load_requests = 5},
        {.node = 1, .overlap_blocks = 2, .load_blocks = 1, .load_requests = 1},
        {.node = 2, .overlap_blocks = 1, .load_blocks = 0, .load_requests = 0},
    };
    CHECK_INT_EQ(speed_kv_route_pick(1.0, 4, t, 3, NULL), 1);
    /* w = 0 and equal load: the longer prefix */
    speed_kv_candidate_t u[3] = {
        {.node = 0, .overlap_blocks = 0, .load_blocks = 2, .load_requests = 1},
        {.node = 1, .overlap_blocks = 3, .load_blocks = 2, .load_requests = 1},
        {.node = 2, .overlap_blocks = 1, .load_blocks = 2, .load_requests = 1},
    };
    CHECK_INT_EQ(speed_kv_route_pick(0.0, 4, u, 3, NULL), 1);
    /* a full tie: the first (the pool's rotation order) */
    speed_kv_candidate_t v[2] = {{.node = 5}, {.node = 6}};
    CHECK_INT_EQ(speed_kv_route_pick(0.5, 4, v, 2, &why), 0);
    CHECK_STR_EQ(why, SPEED_KV_ROUTE_REASON_BALANCE);
    /* a prompt under one block: overlap cannot matter, the reason is balance */
    CHECK_INT_EQ(speed_kv_route_pick(0.5, 0, u, 3, &why), 1);
    CHECK_STR_EQ(why, SPEED_KV_ROUTE_REASON_BALANCE);
    /* an overlap above the prompt's blocks counts as the whole prompt */
    speed_kv_candidate_t big = {.overlap_blocks = 9};
    CHECK(speed_kv_route_cost(1.0, 4, &big) == 0);
    CHECK_INT_EQ(speed_kv_route_pick(0.5, 4, v, 0, NULL), 0);
}

static void test_pool(void) {
    speed_balance_pool_t *pool = NULL;
    speed_balance_pool_params_t pp = speed_balance_pool_default_params();
    pp.policy = SPEED_BALANCE_LEAST_LOADED;
    CHECK_INT_EQ(speed_balance_pool_create("decode", &pp, &pool), SPEED_OK);
    const char *addr[] = {"a:1", "b:2", "c:3", "d:4"};
    for (int i = 0; i < 4; i++) CHECK_INT_EQ(speed_balance_pool_add(pool, addr[i], NULL), SPEED_OK);
    speed_node_load_t l = {1, 2, 0.5, 40};
    speed_balance_pool_set_load(pool, 2, &l);
    speed_balance_pool_mark_down(pool, 1);
    speed_balance_candidate_t c[8];
    size_t ex[] = {3};
    size_t n = speed_balance_pool_candidates(pool, ex, 1, c, 8);
    CHECK_INT_EQ(n, 2); /* 1 is down, 3 excluded */
    CHECK(c[0].index == 0 && c[1].index == 2);
    CHECK(c[1].load.active_blocks == 40 && c[1].load.n_waiting == 2);
    CHECK_INT_EQ(speed_balance_pool_take(pool, 2), SPEED_OK);
    CHECK_INT_EQ(speed_balance_pool_take(pool, 9), SPEED_ERR_INVALID_ARGUMENT);
    int64_t pending = -1;
    speed_balance_pool_pending(pool, 2, &pending);
    CHECK_INT_EQ(pending, 1);
    /* the rotation moved past 2: 3 (excluded), then 0 */
    n = speed_balance_pool_candidates(pool, NULL, 0, c, 8);
    CHECK_INT_EQ(n, 3);
    CHECK(c[0].index == 3 && c[1].index == 0 && c[2].index == 2);
    CHECK_INT_EQ(speed_balance_pool_candidates(pool, NULL, 0, c, 1), 1); /* bounded by the output */
    speed_balance_pool_destroy(pool);
}

/* What the router pays per request: overlaps of a 4096-token prompt (256 blocks) against 8
 * decode nodes holding 65536 blocks each (the default bound), and a whole snapshot applied.
 * Printed, not checked (a shared machine). */
static void bench(void) {
    enum { NODES = 8, HELD = 65536, PROMPT = 256 };
    speed_kv_index_t *idx = make_index(NODES, HELD);
    uint64_t *h = speed_malloc(HELD * sizeof *h);
    int32_t ids[BT];
    uint64_t prev = SEED;
    for (int k = 0; k < HELD; k++) {
        for (int i = 0; i < BT; i++) ids[i] = k * BT + i;
        h[k] = prev = speed_block_hash_next(prev, ids, BT);
    }
    events_t e;
    double t0 = now_s();
    for (int n = 0; n < NODES; n++) {
        ev_init(&e, 1, 2, true);
        ev_run(&e, false, h, HELD);
        speed_kv_index_apply(idx, (size_t)n, &e.ev);
    }
    double t_snap = (now_s() - t0) / NODES;
    CHECK_INT_EQ(speed_kv_index_size(idx, 3), HELD);
    size_t total = 0;
    int reps = 200;
    t0 = now_s();
    for (int r = 0; r < reps; r++)
        for (int n = 0; n < NODES; n++) total += speed_kv_index_overlap(idx, (size_t)n, h + (r % 7), PROMPT);
    double t_pick = (now_s() - t0) / reps;
    CHECK(total > 0);
    printf("router_kv: a snapshot of %d blocks applied in %.2f ms; the overlaps of a %d-block prompt against %d "
           "nodes of %d blocks in %.1f us\n",
           HELD, t_snap * 1e3, PROMPT, NODES, HELD, t_pick * 1e6);
    speed_free(h);
    speed_kv_index_destroy(idx);
}

int main(void) {
    test_index();
    bench();
    test_anticipate();
    test_bound();
    test_prompt_hashes();
    test_cost();
    test_pool();
    CHECK_INT_EQ(speed_alloc_live_count(), 0);
    return CHECK_DONE();
}
