/* common/block_hash and common/block_set: chained token-block hashes and the bounded set that
 * holds them.
 *   - only full blocks are hashed; the chain is what speed_block_hash_next composes;
 *   - equal prefixes give equal hashes; a change of any id in block j changes hashes j.. and
 *     leaves 0..j-1 alone; a change in the partial last block changes nothing;
 *   - the seed separates models and block sizes; no hash is 0;
 *   - the set: add / has / remove against a plain reference under churn (backward-shift
 *     removal keeps every other entry findable), the bound refused, clear, list. */
#include <stdint.h>

#include "alloc.h"
#include "block_hash.h"
#include "block_set.h"
#include "check.h"

#define B 16

static void fill(int32_t *ids, size_t n, uint32_t x) {
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        ids[i] = (int32_t)((x >> 8) % 32000u);
    }
}

static void test_chain(void) {
    uint64_t seed = speed_block_hash_seed("fortune-llama", B);
    int32_t a[5 * B + 7], b[5 * B + 7];
    fill(a, 5 * B + 7, 1);
    uint64_t ha[8], hb[8];
    /* only full blocks */
    CHECK_INT_EQ(speed_block_hash_prompt(seed, a, 5 * B + 7, B, ha, 8), 5);
    CHECK_INT_EQ(speed_block_hash_prompt(seed, a, B - 1, B, ha, 8), 0);
    CHECK_INT_EQ(speed_block_hash_prompt(seed, a, 5 * B, B, ha, 3), 3); /* bounded by the output */
    CHECK_INT_EQ(speed_block_hash_prompt(seed, a, 5 * B, 0, ha, 8), 0);
    CHECK_INT_EQ(speed_block_hash_prompt(seed, a, 5 * B + 7, B, ha, 8), 5);
    /* the chain is the composition of next() */
    uint64_t h = seed;
    for (int k = 0; k < 5; k++) {
        h = speed_block_hash_next(h, a + k * B, B);
        CHECK(ha[k] == h);
        CHECK(ha[k] != 0);
    }
    /* equal prefixes, equal hashes; a different tail (partial block) changes nothing */
    memcpy(b, a, sizeof a);
    b[5 * B + 3] ^= 1;
    CHECK_INT_EQ(speed_block_hash_prompt(seed, b, 5 * B + 7, B, hb, 8), 5);
    CHECK(memcmp(ha, hb, 5 * sizeof ha[0]) == 0);
    /* a shorter prompt with the same first blocks: the same leading hashes */
    CHECK_INT_EQ(speed_block_hash_prompt(seed, a, 2 * B + 1, B, hb, 8), 2);
    CHECK(hb[0] == ha[0] && hb[1] == ha[1]);
    /* any id of block j changed: hashes j.. change, 0..j-1 stay */
    for (int j = 0; j < 5; j++)
        for (int pos = 0; pos < B; pos += 5) {
            memcpy(b, a, sizeof a);
            b[j * B + pos] += 1;
            speed_block_hash_prompt(seed, b, 5 * B, B, hb, 8);
            for (int k = 0; k < 5; k++) {
                if (k < j)
                    CHECK_MSG(hb[k] == ha[k], "block %d changed by an edit in block %d", k, j);
                else
                    CHECK_MSG(hb[k] != ha[k], "block %d unchanged by an edit in block %d (pos %d)", k, j, pos);
            }
        }
    /* order within a block matters */
    memcpy(b, a, sizeof a);
    int32_t t = b[3];
    b[3] = b[4];
    b[4] = t;
    if (b[3] != b[4]) {
        speed_block_hash_prompt(seed, b, B, B, hb, 1);
        CHECK(hb[0] != ha[0]);
    }
    /* the same block after different prefixes: different hashes (the chain names the prefix) */
    int32_t c[2 * B];
    memcpy(c, a + B, B * sizeof c[0]);
    memcpy(c + B, a + B, B * sizeof c[0]);
    uint64_t hc[2];
    speed_block_hash_prompt(seed, c, 2 * B, B, hc, 2);
    CHECK(hc[0] != hc[1]);
    CHECK(hc[1] != ha[1]);
}

static void test_seed(void) {
    uint64_t s1 = speed_block_hash_seed("model-a", 16), s2 = speed_block_hash_seed("model-b", 16);
    uint64_t s3 = speed_block_hash_seed("model-a", 32);
    CHECK(s1 != s2 && s1 != s3 && s2 != s3);
    CHECK(s1 == speed_block_hash_seed("model-a", 16));
    CHECK(speed_block_hash_seed(NULL, 16) == speed_block_hash_seed("", 16));
    CHECK(speed_block_hash_seed("", 16) != 0);
    int32_t ids[B];
    fill(ids, B, 7);
    CHECK(speed_block_hash_next(s1, ids, B) != speed_block_hash_next(s2, ids, B));
    /* all-zero ids, and a zero prev, still give non-zero, distinct hashes */
    int32_t z[B] = {0};
    uint64_t h0 = speed_block_hash_next(0, z, B), h1 = speed_block_hash_next(h0, z, B);
    CHECK(h0 != 0 && h1 != 0 && h0 != h1);
    CHECK(speed_block_hash_next(0, z, B) != speed_block_hash_next(0, z, B - 1));
}

/* Many hashes, no collision among them (a sanity check of the mixing, not a proof). */
static void test_spread(void) {
    enum { N = 20000 };
    speed_block_set_t *set = NULL;
    CHECK_INT_EQ(speed_block_set_create(N, &set), SPEED_OK);
    uint64_t seed = speed_block_hash_seed("m", B);
    int32_t ids[B] = {0};
    size_t dup = 0;
    for (int i = 0; i < N; i++) {
        ids[i % B] = i; /* neighbouring inputs */
        uint64_t h = speed_block_hash_next(seed, ids, B);
        if (speed_block_set_has(set, h)) dup++;
        speed_block_set_add(set, h);
    }
    CHECK_INT_EQ(dup, 0);
    speed_block_set_destroy(set);
}

static void test_set(void) {
    speed_block_set_t *set = NULL;
    CHECK_INT_EQ(speed_block_set_create(0, &set), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_block_set_create(1000, &set), SPEED_OK);
    CHECK_INT_EQ(speed_block_set_add(set, 0), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(!speed_block_set_has(set, 5));
    CHECK(!speed_block_set_remove(set, 5));
    /* churn against a reference: keys clustered in the low bits so runs form and wrap */
    enum { K = 3000 };
    static bool ref[K];
    memset(ref, 0, sizeof ref);
    size_t n_ref = 0;
    uint32_t x = 99;
    for (int step = 0; step < 200000; step++) {
        x = x * 1103515245u + 12345u;
        uint64_t key = (uint64_t)((x >> 8) % K) + 1;
        uint64_t h = key * 64; /* many share a home slot */
        if ((x >> 4) & 1) {
            speed_status_t st = speed_block_set_add(set, h);
            if (ref[key - 1]) {
                CHECK_INT_EQ(st, SPEED_OK);
            } else if (n_ref < 1000) {
                CHECK_INT_EQ(st, SPEED_OK);
                ref[key - 1] = true;
                n_ref++;
            } else {
                CHECK_INT_EQ(st, SPEED_ERR_CAPACITY); /* the bound */
            }
        } else {
            CHECK(speed_block_set_remove(set, h) == ref[key - 1]);
            if (ref[key - 1]) n_ref--;
            ref[key - 1] = false;
        }
        if (step % 997 == 0) {
            CHECK_INT_EQ(speed_block_set_size(set), n_ref);
            for (int k = 0; k < K; k++)
                if (speed_block_set_has(set, (uint64_t)(k + 1) * 64) != ref[k]) {
                    CHECK_MSG(false, "step %d: key %d membership wrong", step, k + 1);
                    break;
                }
        }
        if (check_failures_ > 20) break;
    }
    uint64_t *all = speed_malloc(1000 * sizeof *all);
    size_t n = speed_block_set_list(set, all, 1000);
    CHECK_INT_EQ(n, n_ref);
    for (size_t i = 0; i < n; i++) CHECK(ref[all[i] / 64 - 1]);
    CHECK_INT_EQ(speed_block_set_list(set, all, 3), n_ref < 3 ? n_ref : 3);
    speed_free(all);
    speed_block_set_clear(set);
    CHECK_INT_EQ(speed_block_set_size(set), 0);
    CHECK(!speed_block_set_has(set, 64));
    CHECK_INT_EQ(speed_block_set_add(set, 64), SPEED_OK);
    CHECK_INT_EQ(speed_block_set_max(set), 1000);
    speed_block_set_destroy(set);
    speed_block_set_destroy(NULL);
}

int main(void) {
    test_chain();
    test_seed();
    test_spread();
    test_set();
    CHECK_INT_EQ(speed_alloc_live_count(), 0);
    return CHECK_DONE();
}
