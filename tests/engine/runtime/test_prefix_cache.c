/* The prefix cache (prefix_cache.h, docs/prefix-cache.md) in the engine: every hit must give the
 * logits of a cold run of the same prompt at the same C, A, T — bit for bit (memcmp), on
 * cpu-ref and on the cpu backend in batch-invariant mode, where a token's KV does not depend
 * on what else was in its step — at every step of a short greedy generation.
 *
 * Model: 8 layers (L = 8), B = 8, pools split at C = 6 unless a case says otherwise.
 * Cases: the rule itself (pure); a hit ending mid-block (2 blocks shared + 5 positions copied);
 * a hit covering all but the tail; a multi-turn chain crossing turn boundaries (turn 2 = turn 1
 * + its answer, generated at full depth, + a new message; turn 3 over turn 2, whose blocks
 * were shared from turn 1); mixed C (an entry at C serving C' < C below the split: copied,
 * not shared; C' > C: only the anchor; C = L serving every C; an entry below the split);
 * more anchors in the new request; eviction (LRU order, the bound, pinned and shared blocks
 * surviving, a re-miss after eviction still exact, capacity after evicting everything);
 * collisions forced with a 1-bit hash (a prompt differing in one token of its first block
 * never hits); accounting (every block back in the pools after clear).
 *
 *   test_prefix_cache [cpu-ref|cpu-bi] [MODEL_DIR]
 *     cpu-bi: the cpu backend in batch-invariant mode; MODEL_DIR: an 8-layer model to use
 *     instead of the tiny one (models/fortune-llama, a trained model). Prints what a second
 *     turn of a 600-token conversation saves (timing, not asserted).
 */
#include "block_hash.h"
#include "engine_test_util.h"
#include "kv_cache.h"
#include "prefix_cache.h"

#define L_MODEL 8
#define BLK     8
#define N_GEN   6

static speed_backend_t *g_be;
static int g_block = BLK; /* engines' B (the worked example uses 4) */
static speed_model_t *g_model;
static int g_vocab;

static speed_backend_t *make_backend(const char *name) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = strcmp(name, "cpu-ref") == 0 ? SPEED_BACKEND_CPU_REF : SPEED_BACKEND_CPU;
    bp.n_threads = 2;
    bp.batch_invariant = true;
    speed_backend_t *be = NULL;
    return speed_backend_create(&bp, &be) == SPEED_OK ? be : NULL;
}

/* The tiny 8-layer model, or the model in `dir` (models/fortune-llama: 8 layers too). */
static speed_model_t *make_model(const char *dir_arg) {
    if (dir_arg) {
        speed_model_t *m = NULL;
        return speed_model_load(dir_arg, NULL, &m) == SPEED_OK ? m : NULL;
    }
    speed_tiny_model_params_t p = speed_tiny_model_default_params();
    p.n_layers = L_MODEL;
    p.init_std = 0.15f; /* greedy choices are not ties */
    p.seed = 4242;
    const char *dir = tu_path("tiny8");
    if (speed_tiny_model_write(dir, &p) != SPEED_OK) return NULL;
    speed_model_t *m = NULL;
    return speed_model_load(dir, NULL, &m) == SPEED_OK ? m : NULL;
}

/* An engine with pools split at `split`, room for a few sequences in both pools, the prefix
 * cache bounded at max_blocks (0 = off). */
static speed_engine_t *make_engine_ex(int split, int64_t n_blocks, int64_t max_blocks, int hash_bits, int chunk) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = g_be;
    p.model = g_model;
    p.kv_dtype = SPEED_DTYPE_F32;
    p.block_tokens = g_block;
    p.prefill_chunk = chunk;
    p.max_step_tokens = chunk > 64 ? chunk : 64;
    p.max_seqs = 4;
    p.depth = (speed_depth_t){split, 1, 1};
    p.n_blocks_lower = p.n_blocks_upper = n_blocks;
    p.prefix_cache.max_blocks = max_blocks;
    p.prefix_cache.hash_bits = hash_bits;
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    return e;
}

static speed_engine_t *make_engine(int split, int64_t n_blocks, int64_t max_blocks, int hash_bits) {
    return make_engine_ex(split, n_blocks, max_blocks, hash_bits, 16);
}

/* Runs one prompt greedily (et_run: added, generated, removed — donated when the cache is on). */
static void run1(speed_engine_t *e, et_seq_t *s, const int32_t *ids, int n, speed_depth_t d) {
    memset(s, 0, sizeof *s);
    s->depth = d;
    s->n_prompt = n;
    s->n_gen = N_GEN;
    memcpy(s->prompt, ids, (size_t)n * sizeof(int32_t));
    speed_status_t st = et_run(e, s, 1);
    CHECK_MSG(st == SPEED_OK, "run: %s", speed_status_string(st));
}

/* The same prompt and depth in a fresh engine without a cache (same split). */
static void run_cold(int split, et_seq_t *s, const int32_t *ids, int n, speed_depth_t d) {
    speed_engine_t *e = make_engine(split, 64, 0, 64);
    if (e) run1(e, s, ids, n, d);
    speed_engine_destroy(e);
}

/* Bit-exact: the same greedy tokens and the same logits at every step. */
static void check_exact(const et_seq_t *hit, const et_seq_t *cold, const char *what) {
    CHECK_MSG(hit->n_out == N_GEN && cold->n_out == N_GEN, "%s: outputs %d / %d", what, hit->n_out, cold->n_out);
    if (hit->n_out != N_GEN || cold->n_out != N_GEN) return;
    double worst = 0;
    for (size_t i = 0; i < (size_t)N_GEN * g_vocab; i++) {
        double d = fabs((double)hit->logits[i] - cold->logits[i]);
        if (d > worst) worst = d;
    }
    CHECK_MSG(memcmp(hit->gen, cold->gen, sizeof hit->gen) == 0, "%s: greedy tokens differ", what);
    CHECK_MSG(memcmp(hit->logits, cold->logits, (size_t)N_GEN * g_vocab * sizeof(float)) == 0,
              "%s: logits differ from the cold run (max |diff| %.3g)", what, worst);
}

/* Runs `ids` in e (which may hit) and cold; checks exactness and the cached count. Returns
 * the hit run's stats (prefix reuse) in *stats_p when not NULL. */
static void hit_vs_cold(speed_engine_t *e, int split, const int32_t *ids, int n, speed_depth_t d, int64_t want_cached,
                        int64_t want_shared, const char *what, et_seq_t *hit_out) {
    et_seq_t hit, cold;
    run1(e, &hit, ids, n, d);
    run_cold(split, &cold, ids, n, d);
    check_exact(&hit, &cold, what);
    CHECK_MSG(hit.stats_last.n_cached == want_cached, "%s: %lld positions reused, want %lld", what,
              (long long)hit.stats_last.n_cached, (long long)want_cached);
    if (want_shared >= 0)
        CHECK_MSG(hit.stats_last.n_shared_blocks == want_shared, "%s: %lld blocks shared, want %lld", what,
                  (long long)hit.stats_last.n_shared_blocks, (long long)want_shared);
    /* the suffix only was computed */
    CHECK_INT_EQ(hit.stats_last.n_prefilled, n);
    if (hit_out)
        *hit_out = hit;
    else
        et_seq_free(&hit);
    et_seq_free(&cold);
}

static void check_all_free(speed_engine_t *e, const char *what) {
    speed_engine_prefix_cache_clear(e);
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_MSG(st.kv.n_blocks_free[0] == st.kv.n_blocks[0] && st.kv.n_blocks_free[1] == st.kv.n_blocks[1],
              "%s: %lld / %lld lower and %lld / %lld upper blocks free after clear", what,
              (long long)st.kv.n_blocks_free[0], (long long)st.kv.n_blocks[0], (long long)st.kv.n_blocks_free[1],
              (long long)st.kv.n_blocks[1]);
    CHECK_INT_EQ(st.kv.n_seqs, 0);
    CHECK_INT_EQ(st.prefix.n_entries, 0);
    CHECK_INT_EQ(st.prefix.n_blocks, 0);
}

/* ---- the rule, pure ------------------------------------------------------------------------ */

static void test_rule(void) {
    /* docs/prefix-cache.md's example: L = 8, C = 6, A = 1, T = 1; turn 1 prompt of 4 tokens */
    speed_prefix_depth_t t1 = {8, 6, 1, 3}, t2 = {8, 6, 1, 8}; /* turn 2: 9 tokens */
    CHECK_INT_EQ(speed_prefix_layers_have(&t1, 0), 8);         /* BoS: every layer */
    CHECK_INT_EQ(speed_prefix_layers_have(&t1, 3), 6);         /* turn 1's tail: below C only */
    CHECK_INT_EQ(speed_prefix_layers_have(&t1, 5), 6);         /* its answer: below C only */
    CHECK_INT_EQ(speed_prefix_layers_need(&t2, 0), 8);
    CHECK_INT_EQ(speed_prefix_layers_need(&t2, 3), 6);
    CHECK_INT_EQ(speed_prefix_reusable(&t1, &t2, 6), 6);  /* B p1 p2 p3 g1 g2 */
    CHECK_INT_EQ(speed_prefix_reusable(&t1, &t2, 20), 8); /* never the new tail */
    speed_prefix_depth_t deeper = {8, 7, 1, 7}, shallower = {8, 4, 1, 7}, more_anchors = {8, 6, 3, 7};
    CHECK_INT_EQ(speed_prefix_reusable(&t1, &deeper, 6), 1);       /* C' > C: the anchor only */
    CHECK_INT_EQ(speed_prefix_reusable(&t1, &shallower, 6), 6);    /* C' < C: all */
    CHECK_INT_EQ(speed_prefix_reusable(&t1, &more_anchors, 6), 1); /* position 1 is a new anchor */
    speed_prefix_depth_t full = {8, 8, 1, 3}, no_shallow = {8, 2, 3, 3};
    CHECK_INT_EQ(speed_prefix_reusable(&full, &deeper, 6), 6);
    CHECK_INT_EQ(speed_prefix_reusable(&full, &more_anchors, 6), 6);
    CHECK_INT_EQ(speed_prefix_reusable(&no_shallow, &deeper, 6), 6); /* nothing hidden: like C = L */
    speed_prefix_depth_t other_l = {4, 4, 1, 3};
    CHECK_INT_EQ(speed_prefix_reusable(&other_l, &t2, 6), 0);
}

/* docs/prefix-cache.md's worked example, run: L = 8, C = 6, A = 1, T = 1, B = 4. Turn 1: [B p1 p2
 * p3], answer g1 g2 g3 (g3 never fed back). Turn 2: [B p1 p2 p3 g1 g2 g3 u1 u2]: B p1 p2 p3 g1 g2
 * reused (one block shared, two positions copied), g3 u1 u2 computed. */
static void test_worked_example(void) {
    g_block = 4;
    speed_engine_t *e = make_engine(6, 64, 1000, 64);
    g_block = BLK;
    if (!e) return;
    const speed_depth_t d = {6, 1, 1};
    et_seq_t t1, t2, cold;
    memset(&t1, 0, sizeof t1);
    t1.depth = d;
    t1.n_prompt = 4;
    t1.n_gen = 3;
    et_prompt(t1.prompt, 4, 1, g_vocab);
    CHECK(et_run(e, &t1, 1) == SPEED_OK);
    memset(&t2, 0, sizeof t2);
    t2.depth = d;
    t2.n_prompt = 9;
    t2.n_gen = 3;
    memcpy(t2.prompt, t1.prompt, 4 * sizeof(int32_t));
    memcpy(t2.prompt + 4, t1.gen, 3 * sizeof(int32_t));
    t2.prompt[7] = 100; /* u1 */
    t2.prompt[8] = 101; /* u2 */
    cold = t2;
    speed_engine_stats_t before, after;
    speed_engine_stats(e, &before);
    CHECK(et_run(e, &t2, 1) == SPEED_OK);
    speed_engine_stats(e, &after);
    CHECK_INT_EQ(t2.stats_last.n_cached, 6);
    CHECK_INT_EQ(t2.stats_last.n_shared_blocks, 1);
    CHECK_INT_EQ(after.n_prefill_tokens - before.n_prefill_tokens, 3); /* g3 u1 u2 */
    speed_engine_t *c = make_engine(6, 64, 0, 64);
    if (c) CHECK(et_run(c, &cold, 1) == SPEED_OK);
    speed_engine_destroy(c);
    CHECK(memcmp(t2.gen, cold.gen, sizeof t2.gen) == 0);
    CHECK(t2.logits && cold.logits && memcmp(t2.logits, cold.logits, (size_t)3 * g_vocab * sizeof(float)) == 0);
    et_seq_free(&t1);
    et_seq_free(&t2);
    et_seq_free(&cold);
    check_all_free(e, "worked example");
    speed_engine_destroy(e);
}

/* ---- hits ---------------------------------------------------------------------------------- */

static void test_hits(void) {
    const int split = 6;
    const speed_depth_t d = {6, 1, 1};
    speed_engine_t *e = make_engine(split, 64, 1000, 64);
    if (!e) return;
    int32_t p1[64], p2[64];
    et_prompt(p1, 29, 11, g_vocab);
    et_seq_t first;
    run1(e, &first, p1, 29, d);
    CHECK_INT_EQ(first.stats_last.n_cached, 0);
    et_seq_free(&first);

    /* mid-block: 21 equal tokens (2 blocks shared, 5 positions copied), then other tokens */
    et_prompt(p2, 35, 12, g_vocab);
    memcpy(p2, p1, 21 * sizeof(int32_t));
    hit_vs_cold(e, split, p2, 35, d, 21, 2, "mid-block hit", NULL);

    /* a probe says what seq_add would reuse, and changes nothing */
    int64_t n_reuse = -1;
    speed_engine_stats_t before, after;
    speed_engine_stats(e, &before);
    CHECK(speed_engine_prefix_probe(e, p2, 35, &d, &n_reuse) == SPEED_OK);
    CHECK_INT_EQ(n_reuse, 34); /* p2's own entry now: all but its tail */
    CHECK(speed_engine_prefix_probe(e, p2, 35, &(speed_depth_t){8, 1, 1}, &n_reuse) == SPEED_OK);
    CHECK_INT_EQ(n_reuse, 1);
    CHECK(speed_engine_prefix_probe(e, p1, 29, NULL, &n_reuse) == SPEED_OK); /* the default: C 6, A 1, T 1 */
    CHECK_INT_EQ(n_reuse, 28);
    CHECK(speed_engine_prefix_probe(e, p1, 0, NULL, &n_reuse) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_engine_prefix_probe(e, p1, 29, &(speed_depth_t){9, 1, 1}, &n_reuse) == SPEED_ERR_INVALID_ARGUMENT);
    speed_engine_stats(e, &after);
    CHECK_INT_EQ(after.prefix.n_lookups, before.prefix.n_lookups);
    CHECK_INT_EQ(after.prefix.n_hits, before.prefix.n_hits);

    /* the same prompt again: all but the tail (T = 1, then T = 3) */
    hit_vs_cold(e, split, p1, 29, d, 28, 3, "all but the tail", NULL);
    hit_vs_cold(e, split, p1, 29, (speed_depth_t){6, 1, 3}, 26, 3, "all but a tail of 3", NULL);

    /* a prompt differing in one token of its first block never hits */
    int32_t p3[64];
    memcpy(p3, p1, 29 * sizeof(int32_t));
    p3[3] = p3[3] == 7 ? 8 : 7;
    hit_vs_cold(e, split, p3, 29, d, 0, 0, "first block differs", NULL);

    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK(st.prefix.n_hits >= 3);
    CHECK_INT_EQ(st.n_cached_tokens, 21 + 28 + 26);
    check_all_free(e, "hits");
    speed_engine_destroy(e);
}

/* Turn k + 1 = turn k's prompt + its answer (generated at full depth) + a new message. */
static void test_turns(int split, speed_depth_t d, const char *what) {
    speed_engine_t *e = make_engine(split, 64, 1000, 64);
    if (!e) return;
    int32_t conv[ET_MAX_PROMPT];
    int n = 19;
    et_prompt(conv, n, 21, g_vocab);
    et_seq_t turn;
    run1(e, &turn, conv, n, d);
    for (int k = 2; k <= 3; k++) {
        int64_t cached_before = n + (N_GEN - 1); /* the last answer token was never fed back */
        memcpy(conv + n, turn.gen, N_GEN * sizeof(int32_t));
        n += N_GEN;
        int32_t msg[8];
        et_prompt(msg, 8, 30 + (uint64_t)k, g_vocab);
        memcpy(conv + n, msg + 1, 7 * sizeof(int32_t)); /* without its BoS */
        n += 7;
        et_seq_free(&turn);
        /* every answer token is reused: it was generated at full depth, below C it is ordinary */
        char label[96];
        snprintf(label, sizeof label, "%s: turn %d", what, k);
        int64_t want_shared = d.prefill_layers >= split ? cached_before / BLK : 0;
        hit_vs_cold(e, split, conv, n, d, cached_before, want_shared, label, &turn);
    }
    et_seq_free(&turn);
    /* each turn's entry covers the previous one's: one entry left */
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_entries, 1);
    CHECK_INT_EQ(st.prefix.n_replaced, 2);
    check_all_free(e, what);
    speed_engine_destroy(e);
}

/* ---- mixed C ------------------------------------------------------------------------------- */

/* An entry made at c_old, then a request at c_new for a prompt sharing 26 tokens. */
static void mixed_case(int split, speed_depth_t d_old, speed_depth_t d_new, int64_t want_cached, int64_t want_shared,
                       const char *what) {
    speed_engine_t *e = make_engine(split, 64, 1000, 64);
    if (!e) return;
    int32_t p1[64], p2[64];
    et_prompt(p1, 30, 41, g_vocab);
    et_prompt(p2, 33, 42, g_vocab);
    memcpy(p2, p1, 26 * sizeof(int32_t));
    et_seq_t s;
    run1(e, &s, p1, 30, d_old);
    et_seq_free(&s);
    hit_vs_cold(e, split, p2, 33, d_new, want_cached, want_shared, what, NULL);
    check_all_free(e, what);
    speed_engine_destroy(e);
}

static void test_mixed(void) {
    /* split 6 */
    mixed_case(6, (speed_depth_t){6, 1, 1}, (speed_depth_t){4, 1, 1}, 26, 0, "C 6 serving C 4 (copied)");
    mixed_case(6, (speed_depth_t){6, 1, 1}, (speed_depth_t){8, 1, 1}, 1, 0, "C 6 serving C 8: the anchor only");
    mixed_case(6, (speed_depth_t){6, 1, 1}, (speed_depth_t){7, 1, 1}, 1, 0, "C 6 serving C 7: the anchor only");
    mixed_case(6, (speed_depth_t){8, 1, 1}, (speed_depth_t){4, 1, 1}, 26, 0, "C L serving C 4");
    mixed_case(6, (speed_depth_t){8, 1, 1}, (speed_depth_t){6, 1, 1}, 26, 3, "C L serving C 6 (shared)");
    mixed_case(6, (speed_depth_t){8, 1, 1}, (speed_depth_t){8, 1, 1}, 26, 3, "C L serving C L");
    mixed_case(6, (speed_depth_t){8, 1, 1}, (speed_depth_t){7, 2, 1}, 26, 3, "C L serving C 7, A 2");
    mixed_case(6, (speed_depth_t){4, 1, 1}, (speed_depth_t){4, 1, 1}, 26, 0, "C 4 below the split serving C 4");
    mixed_case(6, (speed_depth_t){4, 1, 1}, (speed_depth_t){6, 1, 1}, 1, 0, "C 4 serving C 6: the anchor only");
    mixed_case(6, (speed_depth_t){4, 1, 1}, (speed_depth_t){2, 1, 1}, 26, 0, "C 4 serving C 2");
    mixed_case(6, (speed_depth_t){6, 1, 1}, (speed_depth_t){6, 3, 1}, 1, 0, "more anchors: position 1 is one");
    mixed_case(6, (speed_depth_t){6, 0, 1}, (speed_depth_t){6, 0, 1}, 26, 3, "no anchors");
    /* split L: sharing at C = L only */
    mixed_case(8, (speed_depth_t){8, 1, 1}, (speed_depth_t){5, 1, 1}, 26, 0, "split L: C L serving C 5");
    mixed_case(8, (speed_depth_t){8, 1, 1}, (speed_depth_t){8, 1, 1}, 26, 3, "split L: C L serving C L");
    /* split 3: C 5 > split keeps position-indexed entries in the upper pool too */
    mixed_case(3, (speed_depth_t){5, 1, 1}, (speed_depth_t){5, 1, 1}, 26, 3, "split 3: C 5 serving C 5");
    mixed_case(3, (speed_depth_t){5, 1, 1}, (speed_depth_t){4, 2, 1}, 1, 0, "split 3: C 5 serving C 4, A 2");
}

/* Adds a prompt, steps to its first output, removes it (its entry: the prompt's tokens only).
 * Returns the positions it reused. */
static int64_t prefill_only(speed_engine_t *e, const int32_t *ids, int n, speed_depth_t d) {
    speed_seq_id_t id;
    speed_engine_step_result_t r;
    speed_engine_seq_stats_t st = {0};
    if (speed_engine_seq_add(e, ids, n, &d, 2, &id) != SPEED_OK) return -1;
    do CHECK(speed_engine_step(e, &r) == SPEED_OK);
    while (r.n_outputs == 0);
    speed_engine_seq_stats(e, id, &st);
    speed_engine_seq_remove(e, id);
    return st.n_cached;
}

/* An entry replaces only the entries it covers in tokens AND in depth: an entry at C = 4 for the
 * same tokens does not replace one at C = L, which alone serves a request at C = L. */
static void test_replace(void) {
    speed_engine_t *e = make_engine(6, 64, 1000, 64);
    if (!e) return;
    int32_t px[32];
    et_prompt(px, 24, 91, g_vocab);
    et_seq_t s;
    run1(e, &s, px, 24, (speed_depth_t){8, 1, 1});
    et_seq_free(&s);
    hit_vs_cold(e, 6, px, 24, (speed_depth_t){4, 1, 1}, 23, 0, "replace: C L serving C 4", NULL);
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_entries, 2);
    CHECK_INT_EQ(st.prefix.n_replaced, 0);
    hit_vs_cold(e, 6, px, 24, (speed_depth_t){8, 1, 1}, 23, 2, "replace: the C L entry kept", NULL);
    speed_engine_stats(e, &st);
    /* the new C L entry covers the old one (same tokens); not the C 4 one, whose answer (generated
     * at another depth) differs */
    CHECK_INT_EQ(st.prefix.n_replaced, 1);
    CHECK_INT_EQ(st.prefix.n_entries, 2);

    /* prompt-only entries (removed at their first output): the same tokens at C = L, then C = 4 */
    int32_t pv[32];
    et_prompt(pv, 24, 92, g_vocab);
    CHECK_INT_EQ(prefill_only(e, pv, 24, (speed_depth_t){8, 1, 1}), 0);
    CHECK_INT_EQ(prefill_only(e, pv, 24, (speed_depth_t){4, 1, 1}), 23);
    CHECK_INT_EQ(prefill_only(e, pv, 24, (speed_depth_t){8, 1, 1}), 23); /* the C L entry is still there */
    check_all_free(e, "replace");
    speed_engine_destroy(e);
}

/* Block sharing in the KV cache itself: holders counted, shared blocks read-only, refusals. */
static void test_kv_sharing(void) {
    speed_engine_t *e = make_engine(6, 16, 0, 64);
    if (!e) return;
    speed_kv_cache_t *kv = speed_engine_kv_cache(e);
    speed_kv_seq_t *a = NULL, *b = NULL, *c = NULL;
    CHECK(speed_kv_cache_seq_create(kv, 6, 40, 8, &a) == SPEED_OK);
    if (!a) return;
    CHECK(speed_kv_cache_seq_set_entries(kv, a, 20, 2) == SPEED_OK);
    /* sharing needs depths >= the split and stored entries */
    CHECK(speed_kv_cache_seq_create_shared(kv, 4, 40, 8, a, 2, &b) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_seq_create_shared(kv, 6, 40, 8, a, 3, &b) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_seq_create_shared(kv, 6, 40, 8, NULL, 1, &b) == SPEED_ERR_INVALID_ARGUMENT);
    speed_kv_cache_stats_t ks;
    speed_kv_cache_stats(kv, &ks);
    int64_t free0 = ks.n_blocks_free[0];
    CHECK(speed_kv_cache_seq_create_shared(kv, 6, 40, 8, a, 2, &b) == SPEED_OK);
    if (!b) return;
    speed_kv_cache_stats(kv, &ks);
    CHECK_INT_EQ(ks.n_blocks_free[0], free0 - 3); /* 5 blocks of 8 for 40 entries, 2 shared */
    const int32_t *ta = speed_kv_seq_block_table(a, 0), *tb = speed_kv_seq_block_table(b, 0);
    CHECK_INT_EQ(tb[0], ta[0]);
    CHECK_INT_EQ(tb[1], ta[1]);
    CHECK(tb[2] != ta[2]);
    CHECK_INT_EQ(speed_kv_cache_block_refs(kv, SPEED_KV_POOL_LOWER, ta[0]), 2);
    CHECK_INT_EQ(speed_kv_cache_block_refs(kv, SPEED_KV_POOL_LOWER, ta[2]), 1);
    CHECK_INT_EQ(speed_kv_cache_block_refs(kv, SPEED_KV_POOL_LOWER, -1), -1);
    /* copies: into b's own blocks yes, into a shared block never */
    CHECK(speed_kv_cache_seq_copy_entries(kv, b, 16, a, 16, 0, 4) == SPEED_OK);
    CHECK(speed_kv_cache_seq_copy_entries(kv, b, 4, a, 4, 0, 4) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_kv_cache_seq_copy_entries(kv, b, 16, a, 18, 0, 4) == SPEED_ERR_INVALID_ARGUMENT); /* a has 20 */
    /* a goes: the shared blocks stay (b holds them), a's own come back */
    speed_kv_cache_seq_destroy(kv, a);
    CHECK_INT_EQ(speed_kv_cache_block_refs(kv, SPEED_KV_POOL_LOWER, tb[0]), 1);
    speed_kv_cache_stats(kv, &ks);
    CHECK_INT_EQ(ks.n_blocks_free[0], 16 - 5);
    /* trim: b keeps the blocks of its stored entries only */
    CHECK(speed_kv_cache_seq_set_entries(kv, b, 17, 2) == SPEED_OK);
    speed_kv_cache_seq_trim(kv, b);
    speed_kv_cache_stats(kv, &ks);
    CHECK_INT_EQ(ks.n_blocks_free[0], 16 - 3);
    CHECK_INT_EQ(speed_kv_seq_capacity(b, 0), 17);
    CHECK(speed_kv_cache_seq_create_shared(kv, 8, 24, 4, b, 2, &c) == SPEED_OK); /* C = L > split */
    speed_kv_cache_seq_destroy(kv, b);
    speed_kv_cache_seq_destroy(kv, c);
    speed_kv_cache_stats(kv, &ks);
    CHECK_INT_EQ(ks.n_blocks_free[0], 16);
    CHECK_INT_EQ(ks.n_blocks_free[1], 16);
    CHECK_INT_EQ(ks.usage.n_blocks[0], 0);
    CHECK_INT_EQ(ks.usage.bytes_reserved[0], 0);
    speed_engine_destroy(e);
}

/* ---- eviction ------------------------------------------------------------------------------ */

/* Pools of 8 blocks; a 24-token prompt with 6 generated tokens holds 4 lower + 1 upper blocks
 * once cached (29 entries below C, 7 above), so two entries fill the lower pool. */
static void test_eviction(void) {
    const int split = 6;
    const speed_depth_t d = {6, 1, 1};
    speed_engine_t *e = make_engine(split, 8, 1000, 64);
    if (!e) return;
    int32_t px[32], py[32], pz[32];
    et_prompt(px, 24, 51, g_vocab);
    et_prompt(py, 24, 52, g_vocab);
    et_prompt(pz, 24, 53, g_vocab);
    et_seq_t s;
    run1(e, &s, px, 24, d); /* entry X */
    et_seq_free(&s);
    run1(e, &s, py, 24, d); /* entry Y: the lower pool is full of entries */
    et_seq_free(&s);
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_entries, 2);
    CHECK_INT_EQ(st.kv.n_blocks_free[0], 0);

    /* X again: a hit sharing 2 blocks; its 2 other blocks need an eviction, which must take Y
     * (the hit pins X, which is also the most recently used). Its own entry then covers X's
     * (same tokens, same depth): X is dropped as replaced, its shared blocks stay with it. */
    hit_vs_cold(e, split, px, 24, d, 23, 2, "hit under pressure", NULL);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_evicted, 1);
    CHECK_INT_EQ(st.prefix.n_replaced, 1);
    CHECK_INT_EQ(st.prefix.n_entries, 1);
    CHECK_INT_EQ(st.kv.n_blocks_free[0], 4);
    /* Y was evicted: a miss now, still exact (4 blocks were free: no eviction) */
    hit_vs_cold(e, split, py, 24, d, 0, 0, "re-miss after eviction", NULL);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_evicted, 1);
    CHECK_INT_EQ(st.prefix.n_entries, 2);
    /* X's entry is the older one now, but a hit pins it: Y's goes */
    hit_vs_cold(e, split, px, 24, d, 23, 2, "the pinned older entry hits", NULL);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_evicted, 2);
    CHECK_INT_EQ(st.prefix.n_entries, 1);

    /* A live sequence sharing an entry's blocks, then that entry evicted to make room for
     * another sequence: the shared blocks must stay the live sequence's (not handed out) */
    et_seq_t two[2], cold_a, cold_z;
    memset(two, 0, sizeof two);
    two[0].depth = two[1].depth = d;
    two[0].n_prompt = two[1].n_prompt = 24;
    two[0].n_gen = two[1].n_gen = N_GEN;
    memcpy(two[0].prompt, px, sizeof(int32_t) * 24);
    memcpy(two[1].prompt, pz, sizeof(int32_t) * 24);
    speed_status_t rst = et_run(e, two, 2);
    CHECK_MSG(rst == SPEED_OK, "live sharer run: %s", speed_status_string(rst));
    CHECK_INT_EQ(two[0].stats_last.n_shared_blocks, 2);
    CHECK_INT_EQ(two[1].stats_last.n_cached, 0);
    run_cold(split, &cold_a, px, 24, d);
    run_cold(split, &cold_z, pz, 24, d);
    check_exact(&two[0], &cold_a, "live sharer whose entry was evicted");
    check_exact(&two[1], &cold_z, "the sequence that evicted it");
    et_seq_free(&two[0]);
    et_seq_free(&two[1]);
    et_seq_free(&cold_a);
    et_seq_free(&cold_z);

    /* a reservation without ids (a disaggregated prefill's) makes room by evicting too */
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.kv.n_blocks_free[0], 0); /* A's and Z's entries fill the lower pool */
    uint64_t evicted = st.prefix.n_evicted;
    speed_seq_id_t rid;
    CHECK(speed_engine_seq_reserve(e, 24, &d, N_GEN, &rid) == SPEED_OK);
    speed_engine_stats(e, &st);
    CHECK(st.prefix.n_evicted > evicted);
    CHECK(speed_engine_seq_remove(e, rid) == SPEED_OK); /* no ids, no KV: not cached */

    /* a request larger than the pools: capacity, after evicting everything; nothing leaks */
    int32_t big[80];
    et_prompt(big, 80, 54, g_vocab);
    speed_seq_id_t id;
    CHECK(speed_engine_seq_add(e, big, 80, &d, 4, &id) == SPEED_ERR_CAPACITY);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_entries, 0);
    CHECK_INT_EQ(st.n_seqs, 0);
    check_all_free(e, "eviction");
    speed_engine_destroy(e);

    /* LRU order under the bound (10 blocks: two entries of 5): X, Y, then a prompt sharing 16
     * tokens with X hits it (X is now more recent than Y) and its own entry takes Y's place */
    e = make_engine(split, 64, 10, 64);
    if (!e) return;
    run1(e, &s, px, 24, d);
    et_seq_free(&s);
    run1(e, &s, py, 24, d);
    et_seq_free(&s);
    int32_t pw[32];
    et_prompt(pw, 24, 55, g_vocab);
    memcpy(pw, px, 16 * sizeof(int32_t));
    hit_vs_cold(e, split, pw, 24, d, 16, 2, "LRU: X touched", NULL);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_evicted, 1);
    CHECK_INT_EQ(st.prefix.n_entries, 2);
    CHECK(st.prefix.n_blocks <= 10);
    hit_vs_cold(e, split, px, 24, d, 23, 2, "LRU: X survived", NULL);
    hit_vs_cold(e, split, py, 24, d, 0, 0, "LRU: Y was the least recently used", NULL);
    speed_engine_destroy(e);

    /* the bound: max_blocks 6 holds one such entry (5 blocks): the older one goes */
    e = make_engine(split, 64, 6, 64);
    if (!e) return;
    run1(e, &s, px, 24, d);
    et_seq_free(&s);
    run1(e, &s, py, 24, d);
    et_seq_free(&s);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_entries, 1);
    CHECK_INT_EQ(st.prefix.n_blocks, 5);
    CHECK_INT_EQ(st.prefix.n_evicted, 1);
    hit_vs_cold(e, split, px, 24, d, 0, 0, "bound: the older entry is gone", NULL);
    /* the px run's own entry pushed py's out in turn */
    hit_vs_cold(e, split, px, 24, d, 23, 2, "bound: the newest entry hits", NULL);
    speed_engine_destroy(e); /* with an entry inside: freed with the engine (ASan: no leak) */
}

/* ---- collisions and trust ------------------------------------------------------------------ */

static void test_collisions(void) {
    const int split = 6;
    const speed_depth_t d = {6, 1, 1};
    speed_engine_t *e = make_engine(split, 64, 1000, 0); /* every block hash is 0 */
    if (!e) return;
    int32_t p1[40], p2[40];
    et_prompt(p1, 30, 61, g_vocab);
    memcpy(p2, p1, sizeof p1);
    p2[5] = p2[5] == 9 ? 10 : 9; /* one token inside the first block */
    et_seq_t s;
    run1(e, &s, p1, 30, d);
    et_seq_free(&s);
    hit_vs_cold(e, split, p2, 30, d, 0, 0, "collision: one token differs in block 0", NULL);
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK(st.prefix.n_collisions > 0);
    /* a true prefix still hits through the colliding index */
    hit_vs_cold(e, split, p1, 30, d, 29, 3, "collision: the true prefix", NULL);
    /* differing only in the last block's tokens: the hit stops at the difference */
    memcpy(p2, p1, sizeof p1);
    p2[20] = p2[20] == 9 ? 10 : 9;
    hit_vs_cold(e, split, p2, 30, d, 20, 2, "collision: differs at 20", NULL);
    check_all_free(e, "collisions");
    speed_engine_destroy(e);
}

/* ---- running sequences publish their prompt ----------------------------------------------- */

/* Two conversations with the same 40-token system prompt: the second arrives while the first is
 * still decoding, and reuses the first's prompt blocks (shared, not copied). Both exact. When the
 * first finishes, its full entry replaces the published one. */
static void test_publish(void) {
    const speed_depth_t d = {6, 1, 1};
    speed_engine_t *e = make_engine(6, 64, 1000, 64);
    if (!e) return;
    et_seq_t two[2], cold[2];
    memset(two, 0, sizeof two);
    for (int i = 0; i < 2; i++) {
        two[i].depth = d;
        two[i].n_prompt = 46;
        two[i].n_gen = N_GEN;
        et_prompt(two[i].prompt, 46, 121 + (uint64_t)i, g_vocab);               /* its own question: 6 tokens */
        if (i == 1) memcpy(two[1].prompt, two[0].prompt, 40 * sizeof(int32_t)); /* the system prompt */
        two[i].logits = calloc((size_t)N_GEN * g_vocab, sizeof(float));
    }
    speed_seq_id_t id0, id1;
    speed_engine_step_result_t r;
    CHECK(speed_engine_seq_add(e, two[0].prompt, 46, &d, N_GEN, &id0) == SPEED_OK);
    do CHECK(speed_engine_step(e, &r) == SPEED_OK);
    while (r.n_outputs == 0);
    memcpy(two[0].logits, r.outputs[0].logits, (size_t)g_vocab * sizeof(float));
    two[0].gen[0] = et_argmax(r.outputs[0].logits, g_vocab);
    int out0 = 1, out1 = 0;
    CHECK(speed_engine_seq_append(e, id0, two[0].gen[0]) == SPEED_OK);
    CHECK(speed_engine_seq_add(e, two[1].prompt, 46, &d, N_GEN, &id1) == SPEED_OK); /* conversation 0 runs */
    speed_engine_seq_stats_t ss;
    CHECK(speed_engine_seq_stats(e, id1, &ss) == SPEED_OK);
    CHECK_INT_EQ(ss.n_cached, 40);
    CHECK_INT_EQ(ss.n_shared_blocks, 5);
    while (out0 < N_GEN || out1 < N_GEN) {
        CHECK(speed_engine_step(e, &r) == SPEED_OK);
        if (r.n_seqs == 0) break;
        for (int o = 0; o < r.n_outputs; o++) {
            bool first = r.outputs[o].seq == id0;
            et_seq_t *t = first ? &two[0] : &two[1];
            int *k = first ? &out0 : &out1;
            memcpy(t->logits + (size_t)*k * g_vocab, r.outputs[o].logits, (size_t)g_vocab * sizeof(float));
            t->gen[*k] = et_argmax(r.outputs[o].logits, g_vocab);
            (*k)++;
            if (*k < N_GEN) CHECK(speed_engine_seq_append(e, r.outputs[o].seq, t->gen[*k - 1]) == SPEED_OK);
        }
    }
    two[0].n_out = out0;
    two[1].n_out = out1;
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_entries, 1); /* the published prompt */
    CHECK(speed_engine_seq_remove(e, id0) == SPEED_OK);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_replaced, 1); /* conversation 0's full entry covers its published prompt */
    CHECK(speed_engine_seq_remove(e, id1) == SPEED_OK);
    for (int i = 0; i < 2; i++) {
        run_cold(6, &cold[i], two[i].prompt, 46, d);
        check_exact(&two[i], &cold[i], i == 0 ? "publish: the running one" : "publish: the one reusing it");
        et_seq_free(&cold[i]);
        et_seq_free(&two[i]);
    }
    check_all_free(e, "publish");
    speed_engine_destroy(e);
}

/* ---- allocation faults ---------------------------------------------------------------------- */

/* Every host allocation of a hitting seq_add and of a donating seq_remove may fail: the call
 * fails cleanly (seq_add NO_MEMORY, or succeeds as a miss: a miss is always correct), and no
 * block or allocation is lost. */
static void test_faults(void) {
    const speed_depth_t d = {6, 1, 1};
    speed_engine_t *e = make_engine(6, 64, 1000, 64);
    if (!e) return;
    int32_t px[32];
    et_prompt(px, 24, 111, g_vocab);
    et_seq_t s;
    run1(e, &s, px, 24, d);
    et_seq_free(&s);
    speed_engine_stats_t st0, st;
    speed_engine_stats(e, &st0);
    int n_failed = 0;
    bool done = false;
    for (int fail = 0; fail < 60 && !done; fail++) {
        int64_t live = speed_alloc_live_count();
        speed_seq_id_t id = -1;
        speed_alloc_fail_after(fail, 0);
        speed_status_t rc = speed_engine_seq_add(e, px, 24, &d, N_GEN, &id);
        int64_t injected = speed_alloc_injected_failures();
        speed_alloc_fail_after(-1, 0);
        CHECK(rc == SPEED_OK || rc == SPEED_ERR_NO_MEMORY);
        if (rc == SPEED_OK) {
            speed_engine_seq_stats_t ss;
            speed_engine_seq_stats(e, id, &ss);
            CHECK(ss.n_cached == 23 || (injected > 0 && ss.n_cached == 0));
            done = injected == 0;
            CHECK(speed_engine_seq_remove(e, id) == SPEED_OK); /* still prefilling: freed, not cached */
        } else {
            n_failed++;
        }
        speed_engine_stats(e, &st);
        CHECK_INT_EQ(st.kv.n_blocks_free[0], st0.kv.n_blocks_free[0]);
        CHECK_INT_EQ(st.kv.n_blocks_free[1], st0.kv.n_blocks_free[1]);
        CHECK_INT_EQ(st.prefix.n_entries, 1);
        CHECK_INT_EQ(speed_alloc_live_count(), live);
    }
    CHECK(done && n_failed >= 1);
    /* donation: the entry's allocations fail, the sequence's blocks go back */
    done = false;
    for (int fail = 0; fail < 20 && !done; fail++) {
        speed_seq_id_t id;
        int32_t py[32];
        et_prompt(py, 24, 112 + (uint64_t)fail, g_vocab);
        CHECK(speed_engine_seq_add(e, py, 24, &d, 2, &id) == SPEED_OK);
        speed_engine_step_result_t r;
        do CHECK(speed_engine_step(e, &r) == SPEED_OK);
        while (r.n_outputs == 0);
        speed_engine_stats(e, &st0);
        speed_alloc_fail_after(fail, 0);
        CHECK(speed_engine_seq_remove(e, id) == SPEED_OK);
        int64_t injected = speed_alloc_injected_failures();
        speed_alloc_fail_after(-1, 0);
        speed_engine_stats(e, &st);
        done = injected == 0;
        CHECK_INT_EQ(st.prefix.n_entries, st0.prefix.n_entries + (injected ? 0 : 1));
    }
    CHECK(done);
    int64_t live_before_clear = speed_alloc_live_count();
    speed_engine_stats(e, &st);
    check_all_free(e, "faults");
    CHECK(speed_alloc_live_count() < live_before_clear); /* the entries' memory went with them */
    speed_engine_destroy(e);
}

/* ---- cache events (KV-aware routing) ------------------------------------------------------- */

typedef struct {
    uint64_t hash[64];
    int count[64]; /* stored - evicted */
    int n, n_stored_events, n_evicted_events, bad;
} ev_log_t;

static void ev_cb(void *user, speed_prefix_event_t kind, const uint64_t *hashes, size_t n) {
    ev_log_t *log = user;
    for (size_t i = 0; i < n; i++) {
        int j = 0;
        while (j < log->n && log->hash[j] != hashes[i]) j++;
        if (j == log->n) {
            if (log->n == 64) return;
            log->hash[log->n] = hashes[i];
            log->count[log->n++] = 0;
        }
        log->count[j] += kind == SPEED_PREFIX_EVENT_STORED ? 1 : -1;
        if (log->count[j] < 0 || log->count[j] > 1) log->bad++; /* reported twice, or never stored */
        if (kind == SPEED_PREFIX_EVENT_STORED)
            log->n_stored_events++;
        else
            log->n_evicted_events++;
    }
}

/* The router's hash in a cluster is another function: the cache must use the one it is given. */
static uint64_t test_hash(uint64_t prev, const int32_t *ids, size_t n) {
    uint64_t h = prev * 31 + 7;
    for (size_t i = 0; i < n; i++) h = h * 1000003 + (uint64_t)(uint32_t)ids[i];
    return h;
}

static int ev_held(const ev_log_t *log, uint64_t h) {
    for (int j = 0; j < log->n; j++)
        if (log->hash[j] == h) return log->count[j];
    return 0;
}

static void test_events(void) {
    ev_log_t log = {0};
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = g_be;
    p.model = g_model;
    p.kv_dtype = SPEED_DTYPE_F32;
    p.block_tokens = BLK;
    p.prefill_chunk = 16;
    p.max_step_tokens = 64;
    p.depth = (speed_depth_t){6, 1, 1};
    p.n_blocks_lower = p.n_blocks_upper = 64;
    p.prefix_cache.max_blocks = 1000;
    p.prefix_cache.hash_next = test_hash;
    p.prefix_cache.hash_seed = 99;
    p.prefix_cache.event_cb = ev_cb;
    p.prefix_cache.event_user = &log;
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (!e) return;
    const speed_depth_t d = {6, 1, 1};
    int32_t conv[64];
    et_prompt(conv, 19, 101, g_vocab);
    et_seq_t s;
    run1(e, &s, conv, 19, d); /* entry: 19 + 5 tokens = 3 blocks */
    memcpy(conv + 19, s.gen, N_GEN * sizeof(int32_t));
    et_seq_free(&s);
    et_prompt(conv + 25, 7, 102, g_vocab); /* turn 2's message */
    uint64_t chain[8], h = 99;
    for (int k = 0; k < 4; k++) chain[k] = h = test_hash(h, conv + k * BLK, BLK);
    CHECK_INT_EQ(log.n_stored_events, 3);
    for (int k = 0; k < 3; k++) CHECK_INT_EQ(ev_held(&log, chain[k]), 1);
    /* turn 2 (19 + 6 + 7 tokens, entry of 32 + 5): one new block hash; turn 1's entry is
     * replaced without an eviction event (turn 2's holds all its hashes) */
    run1(e, &s, conv, 32, d);
    CHECK_INT_EQ(s.stats_last.n_cached, 24);
    et_seq_free(&s);
    CHECK_INT_EQ(log.n_stored_events, 4);
    CHECK_INT_EQ(log.n_evicted_events, 0);
    CHECK_INT_EQ(ev_held(&log, chain[3]), 1);
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.prefix.n_replaced, 1);
    /* another conversation, then clear: every hash stored is evicted exactly once */
    int32_t other[32];
    et_prompt(other, 20, 103, g_vocab);
    run1(e, &s, other, 20, d);
    et_seq_free(&s);
    CHECK_INT_EQ(log.n_stored_events, 7);
    speed_engine_prefix_cache_clear(e);
    CHECK_INT_EQ(log.n_evicted_events, 7);
    for (int j = 0; j < log.n; j++) CHECK_INT_EQ(log.count[j], 0);
    CHECK_INT_EQ(log.bad, 0);
    check_all_free(e, "events");
    speed_engine_destroy(e);
}

/* Without a hash of its own the cache keys blocks with the cluster's one (common/block_hash.h):
 * its events name exactly the hashes a router computes for the same tokens and seed. */
static void test_events_cluster_hash(void) {
    for (int named = 0; named < 2; named++) {
        ev_log_t log = {0};
        speed_engine_params_t p = speed_engine_default_params();
        p.backend = g_be;
        p.model = g_model;
        p.kv_dtype = SPEED_DTYPE_F32;
        p.block_tokens = BLK;
        p.prefill_chunk = 16;
        p.max_step_tokens = 64;
        p.depth = (speed_depth_t){6, 1, 1};
        p.n_blocks_lower = p.n_blocks_upper = 64;
        p.prefix_cache.max_blocks = 1000;
        /* a node passes the served model's seed; 0 means the seed of model "" */
        uint64_t seed = speed_block_hash_seed(named ? "fortune-llama" : "", BLK);
        p.prefix_cache.hash_seed = named ? seed : 0;
        p.prefix_cache.event_cb = ev_cb;
        p.prefix_cache.event_user = &log;
        speed_engine_t *e = NULL;
        CHECK(speed_engine_create(&p, &e) == SPEED_OK);
        if (!e) return;
        int32_t conv[64];
        et_prompt(conv, 19, 111, g_vocab);
        et_seq_t s;
        run1(e, &s, conv, 19, p.depth); /* entry: 19 + 5 tokens = 3 blocks */
        memcpy(conv + 19, s.gen, N_GEN * sizeof(int32_t));
        et_seq_free(&s);
        uint64_t want[3];
        CHECK_INT_EQ(speed_block_hash_prompt(seed, conv, 24, BLK, want, 3), 3);
        CHECK_INT_EQ(log.n_stored_events, 3);
        for (int k = 0; k < 3; k++) CHECK_INT_EQ(ev_held(&log, want[k]), 1);
        speed_engine_prefix_cache_clear(e);
        CHECK_INT_EQ(log.n_evicted_events, 3);
        check_all_free(e, "cluster hash");
        speed_engine_destroy(e);
    }
}

/* ---- the cache object on its own ----------------------------------------------------------- */

static void test_params(void) {
    speed_engine_t *e = make_engine(6, 8, 0, 64);
    if (!e) return;
    speed_prefix_cache_params_t pp = speed_prefix_cache_default_params();
    CHECK_INT_EQ(pp.max_blocks, 0);
    CHECK_INT_EQ(pp.hash_bits, 64);
    speed_prefix_cache_t *pc = NULL;
    pp.hash_bits = 65;
    CHECK(speed_prefix_cache_create(&pp, speed_engine_kv_cache(e), &pc) == SPEED_ERR_INVALID_ARGUMENT);
    pp.hash_bits = 64;
    pp.max_blocks = -1;
    CHECK(speed_prefix_cache_create(&pp, speed_engine_kv_cache(e), &pc) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_prefix_cache_create(NULL, speed_engine_kv_cache(e), &pc) == SPEED_ERR_INVALID_ARGUMENT);
    speed_prefix_cache_destroy(NULL);
    int64_t n_reuse = -1;
    int32_t q[4] = {1, 5, 6, 7};
    CHECK(speed_engine_prefix_probe(e, q, 4, NULL, &n_reuse) == SPEED_OK); /* the cache off */
    CHECK_INT_EQ(n_reuse, 0);
    /* the cache off: removed sequences free their blocks at once */
    int32_t p[24];
    et_prompt(p, 24, 71, g_vocab);
    et_seq_t s;
    run1(e, &s, p, 24, (speed_depth_t){6, 1, 1});
    et_seq_free(&s);
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.kv.n_blocks_free[0], 8);
    CHECK_INT_EQ(st.prefix.n_lookups, 0);
    speed_engine_destroy(e);
}

/* ---- what it saves (printed, not asserted: timing on a shared machine) -------------------------
 * A second turn adding 7 tokens to a 600-token conversation, against the same prompt cold. */
static void bench_turn(void) {
    const int split = 6, n1 = 600;
    const speed_depth_t d = {6, 1, 1};
    speed_engine_t *e = make_engine_ex(split, 200, 100000, 64, 512);
    speed_engine_t *cold_e = make_engine_ex(split, 200, 0, 64, 512);
    if (!e || !cold_e) {
        speed_engine_destroy(e);
        speed_engine_destroy(cold_e);
        return;
    }
    static int32_t conv[ET_MAX_PROMPT * 4];
    et_prompt(conv, n1, 81, g_vocab);
    /* et_seq_t holds ET_MAX_PROMPT tokens: drive the engine directly for this prompt */
    speed_seq_id_t id;
    speed_engine_step_result_t r;
    speed_engine_seq_stats_t st1 = {0}, st2 = {0}, st3 = {0};
    int32_t ans[N_GEN];
    /* turn 1 (cold, fills the cache) */
    CHECK(speed_engine_seq_add(e, conv, n1, &d, N_GEN, &id) == SPEED_OK);
    for (int k = 0; k < N_GEN;) {
        CHECK(speed_engine_step(e, &r) == SPEED_OK);
        if (r.n_outputs == 0) continue;
        ans[k] = et_argmax(r.outputs[0].logits, g_vocab);
        if (k == 0) speed_engine_seq_stats(e, id, &st1);
        if (++k < N_GEN) speed_engine_seq_append(e, id, ans[k - 1]);
    }
    speed_engine_seq_remove(e, id);
    int n2 = n1;
    memcpy(conv + n2, ans, sizeof ans);
    n2 += N_GEN;
    et_prompt(conv + n2, 7, 82, g_vocab);
    n2 += 7;
    /* turn 2: hit, then the same prompt cold */
    speed_engine_t *es[2] = {e, cold_e};
    speed_engine_seq_stats_t *sts[2] = {&st2, &st3};
    static float logits[2][8192];
    for (int i = 0; i < 2; i++) {
        CHECK(speed_engine_seq_add(es[i], conv, n2, &d, 1, &id) == SPEED_OK);
        do CHECK(speed_engine_step(es[i], &r) == SPEED_OK);
        while (r.n_outputs == 0);
        speed_engine_seq_stats(es[i], id, sts[i]);
        if (g_vocab <= 8192) memcpy(logits[i], r.outputs[0].logits, (size_t)g_vocab * sizeof(float));
        speed_engine_seq_remove(es[i], id);
    }
    CHECK_INT_EQ(st2.n_cached, n1 + N_GEN - 1);
    CHECK(g_vocab > 8192 || memcmp(logits[0], logits[1], (size_t)g_vocab * sizeof(float)) == 0);
    printf("turn 2 of %d prompt tokens at C=%d: first output cold %.2f ms (turn 1: %d tokens, %.2f ms), with the "
           "prefix cache %.2f ms (%lld reused, %lld computed): %.1fx\n",
           n2, d.prefill_layers, st3.first_output_ns / 1e6, n1, st1.first_output_ns / 1e6, st2.first_output_ns / 1e6,
           (long long)st2.n_cached, (long long)(n2 - st2.n_cached),
           st2.first_output_ns ? (double)st3.first_output_ns / (double)st2.first_output_ns : 0.0);
    speed_engine_destroy(e);
    speed_engine_destroy(cold_e);
}

int main(int argc, char **argv) {
    const char *backend = argc > 1 ? argv[1] : "cpu-ref";
    tu_tmp_init("prefix-cache");
    g_be = make_backend(strcmp(backend, "cpu-bi") == 0 ? "cpu" : backend);
    if (!g_be) {
        tu_rm_rf(tu_root);
        SKIP_TEST("backend %s is not available", backend);
    }
    g_model = make_model(argc > 2 ? argv[2] : NULL);
    CHECK(g_model != NULL);
    if (!g_model) return CHECK_DONE();
    g_vocab = g_model->config.vocab_size;

    test_rule();
    test_worked_example();
    test_params();
    test_hits();
    test_turns(6, (speed_depth_t){6, 1, 1}, "turns at C 6 (shared)");
    test_turns(6, (speed_depth_t){4, 1, 2}, "turns at C 4 (copied)");
    test_turns(6, (speed_depth_t){8, 1, 1}, "turns at C L");
    test_mixed();
    test_replace();
    test_kv_sharing();
    test_eviction();
    test_collisions();
    test_events();
    test_events_cluster_hash();
    test_publish();
    test_faults();
    bench_turn();

    speed_model_destroy(g_model);
    speed_backend_destroy(g_be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
