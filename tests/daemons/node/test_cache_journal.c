/* daemons/node/cache_journal: the decode node's prefix-cache event journal, driven directly.
 *   - events come back in order with their kinds, paged by n_max (more / next_seq);
 *   - a reader with cursor 0, another instance, a cursor older than the ring or ahead of the
 *     journal gets a snapshot: the set of stored-and-not-evicted hashes, then continues;
 *   - the set is bounded: stored hashes beyond n_blocks_max are refused and counted, their
 *     events still journaled;
 *   - bad parameters are refused. */
#include "alloc.h"
#include "cache_journal.h"
#include "check.h"
#include "clock.h"

static bool contains(const speed_cache_journal_reply_t *r, uint64_t h) {
    for (size_t i = 0; i < r->n; i++)
        if (r->hashes[i] == h) return true;
    return false;
}

static void test_params(void) {
    speed_cache_journal_t *j = NULL;
    speed_cache_journal_params_t p = {.instance = 0, .n_events_max = 8, .n_blocks_max = 8};
    CHECK_INT_EQ(speed_cache_journal_create(&p, &j), SPEED_ERR_INVALID_ARGUMENT);
    p.instance = 7;
    p.n_events_max = 0;
    CHECK_INT_EQ(speed_cache_journal_create(&p, &j), SPEED_ERR_INVALID_ARGUMENT);
    p.n_events_max = 8;
    p.n_blocks_max = 0;
    CHECK_INT_EQ(speed_cache_journal_create(&p, &j), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_cache_journal_create(NULL, &j), SPEED_ERR_INVALID_ARGUMENT);
    p.n_blocks_max = 8;
    CHECK_INT_EQ(speed_cache_journal_create(&p, &j), SPEED_OK);
    speed_cache_journal_reply_t r;
    CHECK_INT_EQ(speed_cache_journal_read(j, 7, 1, 0, &r), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_cache_journal_read(NULL, 7, 1, 4, &r), SPEED_ERR_INVALID_ARGUMENT);
    speed_cache_journal_record_stored(j, NULL, 3); /* ignored */
    speed_cache_journal_destroy(j);
    speed_cache_journal_destroy(NULL);
}

static void test_events(void) {
    speed_cache_journal_t *j = NULL;
    speed_cache_journal_params_t p = {.instance = 42, .n_events_max = 16, .n_blocks_max = 100};
    CHECK_INT_EQ(speed_cache_journal_create(&p, &j), SPEED_OK);
    speed_cache_journal_reply_t r;

    /* a fresh reader: a snapshot of nothing, then the events */
    CHECK_INT_EQ(speed_cache_journal_read(j, 0, 0, 4, &r), SPEED_OK);
    CHECK(r.snapshot && r.n == 0 && r.instance == 42 && r.next_seq == 1);
    uint64_t cursor = r.next_seq;
    speed_cache_journal_reply_cleanup(&r);

    uint64_t a[] = {11, 12, 13, 0, 14}; /* the 0 is skipped */
    speed_cache_journal_record_stored(j, a, 5);
    uint64_t e[] = {12};
    speed_cache_journal_record_evicted(j, e, 1);
    /* paged: 3, then 2 */
    CHECK_INT_EQ(speed_cache_journal_read(j, 42, cursor, 3, &r), SPEED_OK);
    CHECK(!r.snapshot && r.more && r.n == 3 && r.next_seq == cursor + 3);
    CHECK(r.hashes[0] == 11 && r.hashes[1] == 12 && r.hashes[2] == 13);
    CHECK(r.kinds[0] == SPEED_CACHE_EVENT_STORED && r.kinds[2] == SPEED_CACHE_EVENT_STORED);
    cursor = r.next_seq;
    speed_cache_journal_reply_cleanup(&r);
    CHECK_INT_EQ(speed_cache_journal_read(j, 42, cursor, 3, &r), SPEED_OK);
    CHECK(!r.snapshot && !r.more && r.n == 2);
    CHECK(r.hashes[0] == 14 && r.kinds[0] == SPEED_CACHE_EVENT_STORED);
    CHECK(r.hashes[1] == 12 && r.kinds[1] == SPEED_CACHE_EVENT_EVICTED);
    cursor = r.next_seq;
    speed_cache_journal_reply_cleanup(&r);
    /* up to date: nothing */
    CHECK_INT_EQ(speed_cache_journal_read(j, 42, cursor, 3, &r), SPEED_OK);
    CHECK(!r.snapshot && !r.more && r.n == 0 && r.next_seq == cursor && !r.hashes);
    speed_cache_journal_reply_cleanup(&r);

    /* another instance (the node restarted since the reader's last read): the set */
    CHECK_INT_EQ(speed_cache_journal_read(j, 41, cursor, 3, &r), SPEED_OK);
    CHECK(r.snapshot && r.n == 3 && r.next_seq == cursor);
    CHECK(contains(&r, 11) && contains(&r, 13) && contains(&r, 14) && !contains(&r, 12));
    for (size_t i = 0; i < r.n; i++) CHECK(r.kinds[i] == SPEED_CACHE_EVENT_STORED);
    speed_cache_journal_reply_cleanup(&r);
    /* a cursor ahead of the journal: a snapshot too */
    CHECK_INT_EQ(speed_cache_journal_read(j, 42, cursor + 5, 3, &r), SPEED_OK);
    CHECK(r.snapshot && r.n == 3);
    speed_cache_journal_reply_cleanup(&r);

    /* fall behind: 20 more events overwrite the ring (16) */
    uint64_t old = cursor;
    uint64_t many[20];
    for (int i = 0; i < 20; i++) many[i] = 100 + (uint64_t)i;
    speed_cache_journal_record_stored(j, many, 20);
    CHECK_INT_EQ(speed_cache_journal_read(j, 42, old, 50, &r), SPEED_OK);
    CHECK(r.snapshot && r.n == 23 && r.next_seq == old + 20);
    CHECK(contains(&r, 100) && contains(&r, 119) && contains(&r, 11));
    speed_cache_journal_reply_cleanup(&r);
    /* a reader exactly at the ring's oldest event still continues */
    uint64_t oldest = old + 20 - 16;
    CHECK_INT_EQ(speed_cache_journal_read(j, 42, oldest, 50, &r), SPEED_OK);
    CHECK(!r.snapshot && r.n == 16 && r.hashes[0] == 104 && r.hashes[15] == 119);
    speed_cache_journal_reply_cleanup(&r);
    CHECK_INT_EQ(speed_cache_journal_read(j, 42, oldest - 1, 50, &r), SPEED_OK);
    CHECK(r.snapshot);
    speed_cache_journal_reply_cleanup(&r);

    speed_cache_journal_stats_t s;
    speed_cache_journal_stats(j, &s);
    CHECK_INT_EQ(s.n_stored, 24);
    CHECK_INT_EQ(s.n_evicted, 1);
    CHECK_INT_EQ(s.n_refused, 0);
    CHECK_INT_EQ(s.n_snapshots, 5);
    CHECK_INT_EQ(s.n_blocks, 23);
    CHECK_INT_EQ(s.next_seq, old + 20);
    speed_cache_journal_destroy(j);
}

static void test_bound(void) {
    speed_cache_journal_t *j = NULL;
    speed_cache_journal_params_t p = {.instance = 3, .n_events_max = 64, .n_blocks_max = 4};
    CHECK_INT_EQ(speed_cache_journal_create(&p, &j), SPEED_OK);
    uint64_t h[] = {1, 2, 3, 4, 5, 6, 2};
    speed_cache_journal_record_stored(j, h, 7);
    speed_cache_journal_stats_t s;
    speed_cache_journal_stats(j, &s);
    CHECK_INT_EQ(s.n_blocks, 4);
    CHECK_INT_EQ(s.n_refused, 2); /* 5 and 6; 2 again is already held */
    speed_cache_journal_reply_t r;
    CHECK_INT_EQ(speed_cache_journal_read(j, 3, 1, 100, &r), SPEED_OK);
    CHECK(!r.snapshot && r.n == 7); /* every event went out */
    speed_cache_journal_reply_cleanup(&r);
    CHECK_INT_EQ(speed_cache_journal_read(j, 0, 0, 100, &r), SPEED_OK);
    CHECK(r.snapshot && r.n == 4 && !contains(&r, 5) && !contains(&r, 6)); /* the snapshot is bounded */
    speed_cache_journal_reply_cleanup(&r);
    /* an eviction makes room */
    uint64_t ev[] = {1};
    speed_cache_journal_record_evicted(j, ev, 1);
    uint64_t again[] = {5};
    speed_cache_journal_record_stored(j, again, 1);
    speed_cache_journal_stats(j, &s);
    CHECK_INT_EQ(s.n_blocks, 4);
    CHECK_INT_EQ(s.n_refused, 2);
    speed_cache_journal_destroy(j);
}

int main(void) {
    test_params();
    test_events();
    test_bound();
    CHECK_INT_EQ(speed_alloc_live_count(), 0);
    return CHECK_DONE();
}
