/* Bad input gives a clear error, never a crash: prompt longer than the context limit, ids
 * outside the vocabulary, C/A/T out of range, zero or negative max tokens, KV pool exhausted
 * (SPEED_ERR_CAPACITY, nothing leaked, other sequences unaffected), misuse of the sequence
 * life cycle; allocation fault injection over create and seq_add leaks nothing. */
#include "engine_test_util.h"

static char g_last_error[1024];

static void sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *rid, const char *line) {
    (void)user, (void)subsys, (void)rid;
    if (level == SPEED_LOG_ERROR) snprintf(g_last_error, sizeof g_last_error, "%s", line);
    if (level <= SPEED_LOG_WARN) fprintf(stderr, "  [log %c] %s\n", "EWIDT"[level], line);
}

static speed_engine_params_t base_params(speed_backend_t *be, const speed_model_t *m) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = be;
    p.model = m;
    p.max_context = 100;
    p.max_seqs = 4;
    p.max_step_tokens = 32;
    p.prefill_chunk = 16;
    p.depth = (speed_depth_t){2, 1, 1};
    p.n_blocks_lower = 6; /* 96 token slots */
    p.n_blocks_upper = 3;
    return p;
}

static void expect(speed_status_t got, speed_status_t want, const char *needle, const char *what) {
    CHECK_MSG(got == want, "%s: %s, expected %s", what, speed_status_string(got), speed_status_string(want));
    if (needle) CHECK_CONTAINS(g_last_error, needle);
    g_last_error[0] = '\0';
}

static void test_create(speed_backend_t *be, const speed_model_t *m) {
    speed_engine_t *e = NULL;
    speed_engine_params_t p;
    expect(speed_engine_create(NULL, &e), SPEED_ERR_INVALID_ARGUMENT, "no params", "NULL params");
    p = base_params(be, m), p.backend = NULL;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "no backend", "no backend");
    p = base_params(be, m), p.model = NULL;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "no model", "no model");
    p = base_params(be, m), p.block_tokens = 0;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "block_tokens", "B 0");
    p = base_params(be, m), p.max_seqs = 0;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "max_seqs", "max_seqs 0");
    p = base_params(be, m), p.max_step_tokens = -3;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "max_step_tokens", "rows -3");
    p = base_params(be, m), p.prefill_chunk = 0;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "prefill_chunk", "chunk 0");
    p = base_params(be, m), p.kv_dtype = (speed_dtype_t)7;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "kv_dtype", "dtype 7");
    p = base_params(be, m), p.depth.prefill_layers = 5;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "prefill_layers 5 is outside 1..4", "C 5");
    p = base_params(be, m), p.depth.prefill_layers = -1;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "prefill_layers -1", "C -1");
    p = base_params(be, m), p.depth.tail = 0;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "tail 0 is outside 1..", "T 0");
    p = base_params(be, m), p.depth.anchors = -1;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "anchors -1", "A -1");
    /* A or T one past the context (max_context 100) cannot fit a sequence */
    p = base_params(be, m), p.depth.anchors = 101;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "exceed the context of 100", "A ctx + 1");
    p = base_params(be, m), p.depth.tail = 101;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "exceed the context of 100", "T ctx + 1");
    p = base_params(be, m), p.depth.tail = 100; /* T = context: allowed */
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    speed_engine_destroy(e);
    e = NULL;
    p = base_params(be, m), p.n_blocks_lower = -1;
    expect(speed_engine_create(&p, &e), SPEED_ERR_INVALID_ARGUMENT, "n_blocks", "blocks -1");
    CHECK(e == NULL);
    /* max_context above the model's is clamped to it */
    p = base_params(be, m), p.max_context = 1 << 30;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (e) CHECK_INT_EQ(speed_engine_max_context(e), m->config.max_position);
    speed_engine_destroy(e);
    speed_engine_destroy(NULL);
}

static void test_seq_errors(speed_backend_t *be, const speed_model_t *m) {
    speed_engine_params_t p = base_params(be, m);
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (!e) return;
    const int V = m->config.vocab_size;
    int32_t ids[128];
    et_prompt(ids, 128, 5, V);
    speed_seq_id_t id = -1;

    expect(speed_engine_seq_add(e, ids, 101, NULL, 1, &id), SPEED_ERR_TOO_LONG, "exceeds the context limit of 100",
           "prompt > context");
    expect(speed_engine_seq_add(e, ids, 60, NULL, 41, &id), SPEED_ERR_TOO_LONG, "max_new_tokens 41",
           "n + max_new > ctx");
    expect(speed_engine_seq_add(e, ids, 0, NULL, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "empty prompt", "n 0");
    expect(speed_engine_seq_add(e, ids, -5, NULL, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "empty prompt", "n -5");
    expect(speed_engine_seq_add(e, NULL, 4, NULL, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "without", "NULL ids");
    expect(speed_engine_seq_add(e, ids, 4, NULL, 0, &id), SPEED_ERR_INVALID_ARGUMENT, "max_new_tokens 0", "max_new 0");
    expect(speed_engine_seq_add(e, ids, 4, NULL, -2, &id), SPEED_ERR_INVALID_ARGUMENT, "max_new_tokens -2",
           "max_new -2");
    ids[2] = V;
    expect(speed_engine_seq_add(e, ids, 4, NULL, 4, &id), SPEED_ERR_INVALID_ARGUMENT,
           "prompt token 2 is id 512, outside the vocabulary [0, 512)", "id = vocab");
    ids[2] = -1;
    expect(speed_engine_seq_add(e, ids, 4, NULL, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "id -1", "id -1");
    ids[2] = 7;
    speed_depth_t d = {5, 1, 1};
    expect(speed_engine_seq_add(e, ids, 4, &d, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "prefill_layers 5", "C 5");
    d = (speed_depth_t){2, -1, 1};
    expect(speed_engine_seq_add(e, ids, 4, &d, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "anchors -1", "A -1");
    d = (speed_depth_t){2, 101, 1};
    expect(speed_engine_seq_add(e, ids, 4, &d, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "anchors 101", "A 101");
    d = (speed_depth_t){2, 1, 0};
    expect(speed_engine_seq_add(e, ids, 4, &d, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "tail 0", "T 0");
    d = (speed_depth_t){2, 1, -4};
    expect(speed_engine_seq_add(e, ids, 4, &d, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "tail -4", "T -4");
    d = (speed_depth_t){2, 1, 101};
    expect(speed_engine_seq_add(e, ids, 4, &d, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "exceed the context of 100",
           "T 101");
    expect(speed_engine_seq_reserve(e, 0, NULL, 4, &id), SPEED_ERR_INVALID_ARGUMENT, "empty prompt", "reserve n 0");
    expect(speed_engine_seq_reserve(e, 99, NULL, 2, &id), SPEED_ERR_TOO_LONG, "context", "reserve too long");
    CHECK(id == -1);
    speed_engine_stats_t st;
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.n_seqs, 0);
    CHECK_INT_EQ(st.kv.n_blocks_free[0], 6);

    /* life cycle misuse */
    speed_seq_id_t a;
    CHECK(speed_engine_seq_add(e, ids, 20, NULL, 3, &a) == SPEED_OK);
    expect(speed_engine_seq_append(e, a, 5), SPEED_ERR_INVALID_ARGUMENT, "still prefilling", "append in prefill");
    expect(speed_engine_seq_append(e, 999, 5), SPEED_ERR_NOT_FOUND, "no sequence 999", "append unknown");
    expect(speed_engine_seq_remove(e, 999), SPEED_ERR_NOT_FOUND, "no sequence 999", "remove unknown");
    size_t sz;
    expect(speed_engine_seq_kv_size(e, 999, &sz), SPEED_ERR_NOT_FOUND, NULL, "size unknown");
    char buf[16];
    expect(speed_engine_seq_kv_export(e, a, buf, sizeof buf), SPEED_ERR_INVALID_ARGUMENT, "not finished its prefill",
           "export in prefill");
    expect(speed_engine_seq_kv_import(e, a, buf, sizeof buf), SPEED_ERR_INVALID_ARGUMENT, "does not await KV",
           "import into a prefilling sequence");
    expect(speed_engine_seq_kv_ready(e, a), SPEED_ERR_INVALID_ARGUMENT, "does not await KV", "ready");
    speed_engine_step_result_t r;
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    CHECK_INT_EQ(r.n_prefill_rows, 16);
    CHECK_INT_EQ(r.n_outputs, 0);
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    CHECK_INT_EQ(r.n_outputs, 1);
    CHECK(!speed_engine_has_work(e));
    expect(speed_engine_seq_append(e, a, V), SPEED_ERR_INVALID_ARGUMENT, "outside the vocabulary", "append id V");
    expect(speed_engine_seq_append(e, a, -3), SPEED_ERR_INVALID_ARGUMENT, "outside the vocabulary", "append -3");
    CHECK(speed_engine_seq_append(e, a, 5) == SPEED_OK);
    expect(speed_engine_seq_append(e, a, 5), SPEED_ERR_INVALID_ARGUMENT, "already has a token queued", "append twice");
    CHECK(speed_engine_has_work(e));
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    CHECK(speed_engine_seq_append(e, a, 6) == SPEED_OK);
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    CHECK_INT_EQ(r.n_outputs, 1); /* third output: max_new_tokens 3 reached */
    expect(speed_engine_seq_append(e, a, 7), SPEED_ERR_TOO_LONG, "max_new_tokens (3)", "append past max_new");
    CHECK(speed_engine_seq_remove(e, a) == SPEED_OK);
    expect(speed_engine_seq_remove(e, a), SPEED_ERR_NOT_FOUND, NULL, "remove twice");
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    CHECK_INT_EQ(r.n_seqs, 0);
    /* remove in the middle of a prefill frees the blocks */
    CHECK(speed_engine_seq_add(e, ids, 40, NULL, 2, &a) == SPEED_OK);
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    CHECK(speed_engine_seq_remove(e, a) == SPEED_OK);
    speed_engine_stats(e, &st);
    CHECK_INT_EQ(st.kv.n_blocks_free[0], 6);
    CHECK_INT_EQ(st.kv.n_blocks_free[1], 3);
    CHECK(speed_engine_step(NULL, &r) == SPEED_ERR_INVALID_ARGUMENT);
    speed_engine_destroy(e);
}

/* KV exhaustion: a status the caller can act on; nothing leaks; the others run unchanged. */
static void test_capacity(speed_backend_t *be, const speed_model_t *m) {
    const int V = m->config.vocab_size;
    et_seq_t alone[2], shared[2];
    memset(alone, 0, sizeof alone);
    memset(shared, 0, sizeof shared);
    for (int i = 0; i < 2; i++) {
        alone[i].use_default = shared[i].use_default = true;
        alone[i].n_prompt = shared[i].n_prompt = 30 + 5 * i;
        alone[i].n_gen = shared[i].n_gen = 4;
        et_prompt(alone[i].prompt, alone[i].n_prompt, 31 + (uint64_t)i, V);
        memcpy(shared[i].prompt, alone[i].prompt, sizeof alone[i].prompt);
    }
    speed_engine_params_t p = base_params(be, m);
    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (!e) return;
    CHECK(et_run(e, alone, 2) == SPEED_OK);

    /* the two sequences take 3 + 3 of 6 lower blocks and 1 + 1 of 3 upper blocks */
    int32_t ids[64];
    et_prompt(ids, 64, 99, V);
    speed_seq_id_t s0, s1, x = -1;
    CHECK(speed_engine_seq_add(e, shared[0].prompt, shared[0].n_prompt, NULL, 4, &s0) == SPEED_OK);
    CHECK(speed_engine_seq_add(e, shared[1].prompt, shared[1].n_prompt, NULL, 4, &s1) == SPEED_OK);
    speed_engine_stats_t before, after;
    speed_engine_stats(e, &before);
    int64_t live = speed_alloc_live_count(), bytes = speed_alloc_live_bytes();
    speed_status_t st = speed_engine_seq_add(e, ids, 5, NULL, 2, &x); /* needs 1 lower block: none left */
    CHECK(st == SPEED_ERR_CAPACITY);
    CHECK(speed_status_is_retryable(st));
    CHECK(x == -1);
    speed_engine_stats(e, &after);
    CHECK(memcmp(&before.kv, &after.kv, sizeof before.kv) == 0);
    CHECK_INT_EQ(after.n_seqs, 2);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    CHECK_INT_EQ(speed_alloc_live_bytes(), bytes);
    /* the upper pool is the one short: a deeper-than-split sequence needs full upper tables */
    speed_depth_t deep = {4, 1, 1};
    CHECK(speed_engine_seq_remove(e, s1) == SPEED_OK);
    CHECK(speed_engine_seq_add(e, ids, 40, &deep, 2, &x) == SPEED_ERR_CAPACITY); /* 3 upper, 2 free */
    CHECK(speed_engine_seq_add(e, shared[1].prompt, shared[1].n_prompt, NULL, 4, &s1) == SPEED_OK);
    /* max_seqs */
    speed_engine_params_t p2 = base_params(be, m);
    p2.max_seqs = 1;
    speed_engine_t *e2 = NULL;
    CHECK(speed_engine_create(&p2, &e2) == SPEED_OK);
    CHECK(speed_engine_seq_add(e2, ids, 5, NULL, 2, &x) == SPEED_OK);
    CHECK(speed_engine_seq_add(e2, ids, 5, NULL, 2, &x) == SPEED_ERR_CAPACITY);
    speed_engine_destroy(e2); /* with a live sequence: freed, no leak */

    /* the survivors of the failed adds produce exactly what they produce alone */
    for (int i = 0; i < 2; i++) {
        free(shared[i].logits);
        shared[i].logits = malloc((size_t)4 * V * sizeof(float));
        shared[i].id = i == 0 ? s0 : s1;
    }
    int n_done = 0;
    for (int guard = 0; n_done < 2 && guard < 100; guard++) {
        speed_engine_step_result_t r;
        CHECK(speed_engine_step(e, &r) == SPEED_OK);
        for (int o = 0; o < r.n_outputs; o++) {
            et_seq_t *s = r.outputs[o].seq == s0 ? &shared[0] : &shared[1];
            memcpy(s->logits + (size_t)s->n_out * V, r.outputs[o].logits, (size_t)V * sizeof(float));
            s->gen[s->n_out] = et_argmax(r.outputs[o].logits, V);
            if (++s->n_out == 4) {
                CHECK(speed_engine_seq_remove(e, r.outputs[o].seq) == SPEED_OK);
                n_done++;
            } else {
                CHECK(speed_engine_seq_append(e, r.outputs[o].seq, s->gen[s->n_out - 1]) == SPEED_OK);
            }
        }
    }
    for (int i = 0; i < 2; i++) {
        CHECK(memcmp(shared[i].gen, alone[i].gen, 4 * sizeof(int32_t)) == 0);
        CHECK(memcmp(shared[i].logits, alone[i].logits, (size_t)4 * V * sizeof(float)) == 0);
        et_seq_free(&shared[i]);
        et_seq_free(&alone[i]);
    }
    speed_engine_destroy(e);
}

static void test_faults(speed_backend_t *be, const speed_model_t *m) {
    speed_engine_params_t p = base_params(be, m);
    int n_fail = 0, done = 0;
    for (int fail = 0; fail < 500 && !done; fail++) {
        int64_t live = speed_alloc_live_count(), bytes = speed_alloc_live_bytes();
        speed_engine_t *e = NULL;
        speed_alloc_fail_after(fail, 0);
        speed_status_t st = speed_engine_create(&p, &e);
        speed_alloc_fail_after(-1, 0);
        CHECK(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY);
        if (st == SPEED_OK) {
            done = 1;
        } else {
            n_fail++;
            CHECK(e == NULL);
        }
        speed_engine_destroy(e);
        CHECK_INT_EQ(speed_alloc_live_count(), live);
        CHECK_INT_EQ(speed_alloc_live_bytes(), bytes);
    }
    CHECK(done);
    CHECK(n_fail >= 10); /* every allocation of create was failed once */
    fprintf(stderr, "create: %d allocation points failed cleanly\n", n_fail);

    speed_engine_t *e = NULL;
    CHECK(speed_engine_create(&p, &e) == SPEED_OK);
    if (!e) return;
    int32_t ids[40];
    et_prompt(ids, 40, 3, m->config.vocab_size);
    speed_seq_id_t keep;
    CHECK(speed_engine_seq_add(e, ids, 10, NULL, 2, &keep) == SPEED_OK);
    int n_add_fail = 0;
    done = 0;
    for (int fail = 0; fail < 50 && !done; fail++) {
        speed_engine_stats_t before, after;
        speed_engine_stats(e, &before);
        int64_t live = speed_alloc_live_count();
        speed_seq_id_t id = -1;
        speed_alloc_fail_after(fail, 0);
        speed_status_t st = speed_engine_seq_add(e, ids, 40, NULL, 3, &id);
        speed_alloc_fail_after(-1, 0);
        CHECK(st == SPEED_OK || st == SPEED_ERR_NO_MEMORY);
        if (st == SPEED_OK) {
            done = 1;
            CHECK(speed_engine_seq_remove(e, id) == SPEED_OK);
        } else {
            n_add_fail++;
            CHECK(id == -1);
        }
        speed_engine_stats(e, &after);
        CHECK(memcmp(&before.kv, &after.kv, sizeof before.kv) == 0);
        CHECK_INT_EQ(after.n_seqs, 1);
        CHECK_INT_EQ(speed_alloc_live_count(), live);
    }
    CHECK(done && n_add_fail >= 2);
    fprintf(stderr, "seq_add: %d allocation points failed cleanly\n", n_add_fail);
    /* the engine still works */
    speed_engine_step_result_t r;
    CHECK(speed_engine_step(e, &r) == SPEED_OK);
    CHECK_INT_EQ(r.n_outputs, 1);
    speed_engine_destroy(e); /* `keep` still alive: the engine frees it */
}

int main(void) {
    tu_tmp_init("engine-errors");
    speed_backend_t *be = et_backend("cpu-ref");
    if (!be) SKIP_TEST("no cpu-ref backend");
    et_model_spec_t spec = {"f32-gqa", SPEED_DTYPE_F32, false, 2, false};
    speed_model_t *m = et_model_make(&spec);
    CHECK(m != NULL);
    if (!m) return CHECK_DONE();
    speed_log_set_sink(sink, NULL);
    int64_t live = speed_alloc_live_count();
    test_create(be, m);
    test_seq_errors(be, m);
    test_capacity(be, m);
    test_faults(be, m);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    speed_log_set_sink(NULL, NULL);
    speed_model_destroy(m);
    speed_backend_destroy(be);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
