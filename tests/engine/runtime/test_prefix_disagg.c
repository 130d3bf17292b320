/* The prefix cache with a disaggregated prefill (docs/prefix-cache.md), without networking: a
 * "decode" engine D (pools split at C = 6, prefix cache on) reserves each turn of a conversation
 * with its ids (speed_engine_seq_reserve_cached): a hit fills the first positions, and only the
 * units past them must arrive. A "prefill" engine P (split at L, its own prefix cache on or off)
 * prefills the whole prompt and exports only those units (speed_engine_seq_kv_export_from); D
 * receives them by import, or through its host mirror and speed_engine_seq_kv_ready (the path of
 * a real transfer), appends P's first token and decodes. Every turn's logits (P's first, then
 * D's) must equal a cold colocated run bit for bit (cpu-ref), and the bytes shipped must shrink
 * to the suffix's units.
 *
 *   test_prefix_disagg   (cpu-ref)
 */
#include "engine_test_util.h"
#include "kv_cache.h"

#define BLK   8
#define N_GEN 6

static speed_backend_t *g_be;
static speed_model_t *g_model;
static int g_vocab;

static speed_model_t *make_model(void) {
    speed_tiny_model_params_t p = speed_tiny_model_default_params();
    p.n_layers = 8;
    p.init_std = 0.15f;
    p.seed = 4242;
    const char *dir = tu_path("tiny8");
    speed_model_t *m = NULL;
    if (speed_tiny_model_write(dir, &p) != SPEED_OK) return NULL;
    return speed_model_load(dir, NULL, &m) == SPEED_OK ? m : NULL;
}

static speed_engine_t *make_engine(int split, int64_t cache_blocks, speed_kv_mirror_t mirror) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = g_be;
    p.model = g_model;
    p.kv_dtype = SPEED_DTYPE_F32;
    p.block_tokens = BLK;
    p.prefill_chunk = 16;
    p.max_step_tokens = 64;
    p.max_seqs = 2;
    p.depth = (speed_depth_t){split, 1, 1};
    p.n_blocks_lower = p.n_blocks_upper = 64;
    p.kv_host_mirror = mirror;
    p.prefix_cache.max_blocks = cache_blocks;
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    return e;
}

/* Writes the units of buf into the sequence's transfer addresses (the mirror), layer by layer,
 * as puts would: from the block holding each layer's first uncached entry. */
static void put_units(speed_engine_t *d, speed_seq_id_t id, const char *buf, size_t size, int64_t n_cached,
                      speed_depth_t depth, int n_prompt) {
    speed_kv_cache_t *kv = speed_engine_kv_cache(d);
    speed_kv_seq_t *seq = NULL;
    CHECK(speed_engine_seq_kv(d, id, &seq) == SPEED_OK);
    if (!seq) return;
    int64_t n_full, n_compact;
    speed_kv_entries_for(n_prompt, depth.anchors, depth.tail, 0, &n_full, &n_compact);
    int64_t a = depth.anchors < n_prompt ? depth.anchors : n_prompt;
    int64_t from_c = n_cached < a ? n_cached : a;
    size_t off = 0;
    for (int l = 0; l < 8; l++) {
        int64_t begin = l < depth.prefill_layers ? n_cached : from_c;
        int64_t end = l < depth.prefill_layers ? n_full : n_compact;
        if (begin >= end) continue;
        for (int64_t b = begin / BLK; b < (end + BLK - 1) / BLK; b++) {
            void *dst;
            size_t bytes;
            CHECK(speed_kv_cache_xfer_block_addr(kv, seq, l, b, &dst, &bytes) == SPEED_OK);
            CHECK(off + bytes <= size);
            if (off + bytes > size) return;
            memcpy(dst, buf + off, bytes);
            off += bytes;
        }
    }
    CHECK_INT_EQ(off, size);
}

typedef struct {
    int64_t n_cached;   /* on the decode engine */
    int64_t n_cached_p; /* on the prefill engine (its own cache) */
    size_t bytes_shipped, bytes_full;
    int32_t gen[N_GEN];
    float *logits; /* [N_GEN][vocab] */
} turn_t;

/* One turn: D reserves, P prefills and exports the units D lacks, D receives and decodes. */
static void run_turn(speed_engine_t *d, speed_engine_t *p, const int32_t *ids, int n, speed_depth_t depth,
                     bool via_mirror, turn_t *t) {
    memset(t, 0, sizeof *t);
    t->logits = calloc((size_t)N_GEN * g_vocab, sizeof(float));
    speed_seq_id_t id_d, id_p;
    CHECK(speed_engine_seq_reserve_cached(d, ids, n, &depth, N_GEN, &id_d) == SPEED_OK);
    speed_engine_seq_stats_t st;
    CHECK(speed_engine_seq_stats(d, id_d, &st) == SPEED_OK);
    CHECK_INT_EQ(st.state, SPEED_SEQ_AWAIT_KV);
    t->n_cached = st.n_cached;

    CHECK(speed_engine_seq_add(p, ids, n, &depth, 1, &id_p) == SPEED_OK);
    speed_engine_step_result_t r;
    do CHECK(speed_engine_step(p, &r) == SPEED_OK);
    while (r.n_outputs == 0);
    memcpy(t->logits, r.outputs[0].logits, (size_t)g_vocab * sizeof(float));
    t->gen[0] = et_argmax(r.outputs[0].logits, g_vocab);
    CHECK(speed_engine_seq_stats(p, id_p, &st) == SPEED_OK);
    t->n_cached_p = st.n_cached;

    size_t need_d = 0, have_p = 0, full = 0;
    CHECK(speed_engine_seq_kv_size(d, id_d, &need_d) == SPEED_OK);
    CHECK(speed_engine_seq_kv_size_from(p, id_p, t->n_cached, &have_p) == SPEED_OK);
    CHECK(speed_engine_seq_kv_size(p, id_p, &full) == SPEED_OK);
    CHECK_INT_EQ(need_d, have_p);
    t->bytes_shipped = have_p;
    t->bytes_full = full;
    char *buf = malloc(have_p ? have_p : 1);
    CHECK(speed_engine_seq_kv_export_from(p, id_p, t->n_cached, buf, have_p) == SPEED_OK);
    CHECK(speed_engine_seq_remove(p, id_p) == SPEED_OK);
    if (via_mirror) {
        put_units(d, id_d, buf, have_p, t->n_cached, depth, n);
        CHECK(speed_engine_seq_kv_ready(d, id_d) == SPEED_OK);
    } else {
        CHECK(speed_engine_seq_kv_import(d, id_d, buf, have_p) == SPEED_OK);
    }
    free(buf);

    for (int k = 1; k < N_GEN; k++) {
        CHECK(speed_engine_seq_append(d, id_d, t->gen[k - 1]) == SPEED_OK);
        do CHECK(speed_engine_step(d, &r) == SPEED_OK);
        while (r.n_outputs == 0);
        memcpy(t->logits + (size_t)k * g_vocab, r.outputs[0].logits, (size_t)g_vocab * sizeof(float));
        t->gen[k] = et_argmax(r.outputs[0].logits, g_vocab);
    }
    CHECK(speed_engine_seq_remove(d, id_d) == SPEED_OK); /* cached: its ids are known */
}

static void check_cold(const turn_t *t, const int32_t *ids, int n, speed_depth_t depth, const char *what) {
    speed_engine_t *c = make_engine(6, 0, SPEED_KV_MIRROR_OFF);
    if (!c) return;
    et_seq_t cold;
    memset(&cold, 0, sizeof cold);
    cold.depth = depth;
    cold.n_prompt = n;
    cold.n_gen = N_GEN;
    memcpy(cold.prompt, ids, (size_t)n * sizeof(int32_t));
    CHECK(et_run(c, &cold, 1) == SPEED_OK);
    CHECK_MSG(memcmp(cold.gen, t->gen, sizeof t->gen) == 0, "%s: greedy tokens differ", what);
    CHECK_MSG(cold.logits && memcmp(cold.logits, t->logits, (size_t)N_GEN * g_vocab * sizeof(float)) == 0,
              "%s: logits differ from the cold run", what);
    et_seq_free(&cold);
    speed_engine_destroy(c);
}

static void conversation(bool via_mirror, bool prefill_cache) {
    const speed_depth_t depth = {6, 1, 1};
    speed_engine_t *d = make_engine(6, 1000, via_mirror ? SPEED_KV_MIRROR_ON : SPEED_KV_MIRROR_OFF);
    speed_engine_t *p = make_engine(8, prefill_cache ? 1000 : 0, SPEED_KV_MIRROR_OFF);
    if (!d || !p) return;
    int32_t conv[ET_MAX_PROMPT];
    int n = 27;
    et_prompt(conv, n, 5, g_vocab);
    char what[96];
    int64_t cached_want = 0;
    int prev_n = 0;
    for (int k = 1; k <= 3; k++) {
        turn_t t;
        snprintf(what, sizeof what, "turn %d (%s, prefill cache %s)", k, via_mirror ? "mirror" : "import",
                 prefill_cache ? "on" : "off");
        run_turn(d, p, conv, n, depth, via_mirror, &t);
        CHECK_MSG(t.n_cached == cached_want, "%s: %lld cached, want %lld", what, (long long)t.n_cached,
                  (long long)cached_want);
        /* the prefill engine's entries hold prompts only (max_new_tokens 1): the previous prompt */
        CHECK_INT_EQ(t.n_cached_p, prefill_cache && k > 1 ? prev_n : 0);
        if (k > 1)
            CHECK_MSG(t.bytes_shipped * 2 < t.bytes_full, "%s: shipped %zu of %zu", what, t.bytes_shipped,
                      t.bytes_full);
        check_cold(&t, conv, n, depth, what);
        printf("%s: %d prompt tokens, %lld cached on the decode engine, %zu of %zu KV bytes shipped\n", what, n,
               (long long)t.n_cached, t.bytes_shipped, t.bytes_full);
        cached_want = n + N_GEN - 1; /* the next turn: this prompt and the answer tokens fed back */
        prev_n = n;
        memcpy(conv + n, t.gen, sizeof t.gen);
        n += N_GEN;
        et_prompt(conv + n, 5, 40 + (uint64_t)k, g_vocab);
        n += 5;
        free(t.logits);
    }
    /* both engines hand every block back once their caches are cleared */
    speed_engine_t *es[2] = {d, p};
    for (int i = 0; i < 2; i++) {
        speed_engine_prefix_cache_clear(es[i]);
        speed_engine_stats_t st;
        speed_engine_stats(es[i], &st);
        CHECK_INT_EQ(st.kv.n_blocks_free[0], st.kv.n_blocks[0]);
        CHECK_INT_EQ(st.kv.n_blocks_free[1], st.kv.n_blocks[1]);
    }
    speed_engine_destroy(d);
    speed_engine_destroy(p);
}

/* Refusals: skipping into the tail, importing the wrong size. */
static void test_errors(void) {
    speed_engine_t *d = make_engine(6, 1000, SPEED_KV_MIRROR_OFF);
    if (!d) return;
    int32_t ids[30];
    et_prompt(ids, 30, 9, g_vocab);
    const speed_depth_t depth = {6, 1, 1};
    speed_seq_id_t id;
    CHECK(speed_engine_seq_add(d, ids, 30, &depth, 2, &id) == SPEED_OK);
    speed_engine_step_result_t r;
    do CHECK(speed_engine_step(d, &r) == SPEED_OK);
    while (r.n_outputs == 0);
    size_t bytes;
    CHECK(speed_engine_seq_kv_size_from(d, id, 30, &bytes) == SPEED_ERR_INVALID_ARGUMENT); /* past the tail */
    CHECK(speed_engine_seq_kv_size_from(d, id, -1, &bytes) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_engine_seq_kv_size_from(d, 999, 0, &bytes) == SPEED_ERR_NOT_FOUND);
    CHECK(speed_engine_seq_kv_size_from(d, id, 29, &bytes) == SPEED_OK);
    CHECK(speed_engine_seq_remove(d, id) == SPEED_OK);
    CHECK(speed_engine_seq_reserve_cached(d, ids, 30, &depth, 2, &id) == SPEED_OK);
    CHECK(speed_engine_seq_kv_size(d, id, &bytes) == SPEED_OK);
    char small[16] = {0};
    CHECK(speed_engine_seq_kv_import(d, id, small, sizeof small) == SPEED_ERR_INVALID_ARGUMENT);
    CHECK(speed_engine_seq_remove(d, id) == SPEED_OK); /* never received: not cached, freed */
    int32_t bad[2] = {1, 1 << 30};
    CHECK(speed_engine_seq_reserve_cached(d, bad, 2, &depth, 2, &id) == SPEED_ERR_INVALID_ARGUMENT);
    speed_engine_prefix_cache_clear(d);
    speed_engine_stats_t st;
    speed_engine_stats(d, &st);
    CHECK_INT_EQ(st.kv.n_blocks_free[0], st.kv.n_blocks[0]);
    speed_engine_destroy(d);
}

int main(void) {
    tu_tmp_init("prefix-disagg");
    g_be = et_backend("cpu-ref");
    g_model = make_model();
    CHECK(g_be != NULL && g_model != NULL);
    if (!g_be || !g_model) return CHECK_DONE();
    g_vocab = g_model->config.vocab_size;
    conversation(false, false);
    conversation(true, false);
    conversation(false, true);
    conversation(true, true);
    test_errors();
    speed_model_destroy(g_model);
    speed_backend_destroy(g_be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
