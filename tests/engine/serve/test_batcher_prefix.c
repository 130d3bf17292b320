/* The batcher over an engine with the prefix cache on (engine.prefix_cache, docs/prefix-cache.md):
 * a conversation's second turn, submitted as a whole prompt (turn 1 + its answer + a new
 * message), reuses turn 1's KV (usage.n_cached, the batcher's counters) and streams the same
 * tokens as a plain engine computing it from scratch; a third turn reserved with its ids
 * (speed_batcher_reserve_ids) needs only the units past the cached positions; reserved with its
 * ids kept (speed_batcher_reserve_keep) it looks nothing up and needs every unit. */
#include <pthread.h>

#include "batcher.h"
#include "engine_test_util.h"
#include "test_clock.h"

#define NP 40
#define NG 6
#define NM 9 /* the new message of turn 2 */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_tokens, n_finish;
    int32_t ids[NG];
    speed_batch_usage_t usage;
} rec_t;

static void on_event(void *user, const speed_batch_event_t *ev) {
    rec_t *r = user;
    pthread_mutex_lock(&r->mu);
    if (ev->token) {
        if (r->n_tokens < NG) r->ids[r->n_tokens] = ev->token->id;
        r->n_tokens++;
    } else {
        r->n_finish++;
        r->usage = *ev->usage;
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
}

/* Submits a greedy request and waits for its finish. */
static bool run(speed_batcher_t *b, const char *id, const int32_t *prompt, int n, rec_t *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    speed_batch_request_t q = {.request_id = id, .prompt = prompt, .n_prompt = n, .on_event = on_event, .user = r};
    q.gen.sampling = speed_sampling_default_params();
    q.gen.sampling.temperature = 0.0f;
    q.gen.max_tokens = NG;
    q.gen.ignore_eos = true;
    bool ok = speed_batcher_submit(b, &q) == SPEED_OK;
    struct timespec ts = realtime_after_ms(20000);
    pthread_mutex_lock(&r->mu);
    while (ok && r->n_finish == 0)
        if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) != 0) break;
    ok = ok && r->n_finish == 1;
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    return ok;
}

static const int32_t *bad3_ids(void) {
    static const int32_t bad[3] = {1, 2, 1 << 30}; /* outside the vocabulary */
    return bad;
}

static bool stats_settled(speed_batcher_t *b) {
    speed_batcher_stats_t s;
    speed_batcher_stats(b, &s);
    return s.n_cached_tokens == (uint64_t)(NP + NG - 1) && s.prefix.n_entries >= 1;
}

int main(void) {
    speed_log_configure("error");
    tu_tmp_init("batcher-prefix");
    et_model_spec_t spec = {"gqa", SPEED_DTYPE_F32, false, 2, false};
    speed_model_t *model = et_model_make(&spec);
    speed_backend_t *be = et_backend("cpu-ref");
    CHECK(model != NULL && be != NULL);
    if (!model || !be) return CHECK_DONE();
    const int L = model->config.n_layers, vocab = model->config.vocab_size;
    const speed_depth_t depth = {L / 2, 1, 1};

    speed_batcher_params_t bp = speed_batcher_default_params();
    bp.backend = be;
    bp.model = model;
    bp.engine.depth = depth;
    bp.engine.max_seqs = 2;
    bp.engine.prefix_cache.max_blocks = 64;
    speed_batcher_t *b = NULL;
    CHECK_INT_EQ(speed_batcher_create(&bp, &b), SPEED_OK);
    if (!b) return CHECK_DONE();

    int32_t conv[NP + NG + NM];
    et_prompt(conv, NP, 7, vocab);
    rec_t t1, t2;
    CHECK(run(b, "turn-1", conv, NP, &t1));
    CHECK_INT_EQ(t1.usage.n_cached, 0);
    memcpy(conv + NP, t1.ids, sizeof t1.ids);
    et_prompt(conv + NP + NG, NM, 8, vocab);
    CHECK(run(b, "turn-2", conv, NP + NG + NM, &t2));
    /* turn 1's prompt and the answer tokens it fed back (all but the last) */
    CHECK_INT_EQ(t2.usage.n_cached, NP + NG - 1);
    CHECK_INT_EQ(t2.usage.n_prompt, NP + NG + NM);
    WAIT_FOR(stats_settled(b), 10000); /* the snapshot is taken after the engine's next loop */
    speed_batcher_stats_t st;
    speed_batcher_stats(b, &st);
    CHECK_INT_EQ(st.n_cached_tokens, NP + NG - 1);
    CHECK_INT_EQ(st.prefix.n_hits, 1);
    CHECK(st.prefix.n_entries >= 1);

    /* turn 3 reserved for a disaggregated prefill: with its ids, only the units past turn 2's
     * cached prompt and answer must arrive */
    int32_t conv3[NP + 2 * (NG + NM)];
    const int n2 = NP + NG + NM, n3 = n2 + NG + NM;
    memcpy(conv3, conv, sizeof conv);
    memcpy(conv3 + n2, t2.ids, sizeof t2.ids);
    et_prompt(conv3 + n2 + NG, NM, 9, vocab);
    speed_batch_reservation_t r3, rfull;
    CHECK_INT_EQ(speed_batcher_reserve_ids(b, "turn-3", conv3, n3, NG, NULL, &r3), SPEED_OK);
    CHECK_INT_EQ(r3.n_cached, n2 + NG - 1);
    CHECK_INT_EQ(speed_batcher_reserve(b, "turn-3-full", n3, NG, NULL, &rfull), SPEED_OK);
    CHECK_INT_EQ(rfull.n_cached, 0);
    CHECK_MSG(r3.kv_bytes * 2 <= rfull.kv_bytes, "%zu of %zu bytes", r3.kv_bytes, rfull.kv_bytes);
    CHECK_INT_EQ(speed_batcher_cancel(b, "turn-3"), SPEED_OK);
    CHECK_INT_EQ(speed_batcher_cancel(b, "turn-3-full"), SPEED_OK);
    speed_batcher_release(b, "turn-3"); /* no puts can land: lift the cancel fence */
    speed_batcher_release(b, "turn-3-full");
    /* kept, not looked up (a decode node whose prefill node pushes every unit): the whole prompt
     * must arrive, even though turn 2's entry could serve most of it; the cache is unchanged */
    speed_batcher_stats(b, &st);
    uint64_t lookups = st.prefix.n_lookups;
    speed_batch_reservation_t rkeep;
    CHECK_INT_EQ(speed_batcher_reserve_keep(b, "turn-3-keep", conv3, n3, NG, NULL, &rkeep), SPEED_OK);
    CHECK_INT_EQ(rkeep.n_cached, 0);
    CHECK_INT_EQ(rkeep.kv_bytes, rfull.kv_bytes);
    CHECK_INT_EQ(speed_batcher_cancel(b, "turn-3-keep"), SPEED_OK);
    speed_batcher_release(b, "turn-3-keep");
    WAIT_FOR((speed_batcher_stats(b, &st), st.reserved == 0), 10000);
    CHECK_INT_EQ(st.prefix.n_lookups, lookups);
    CHECK_INT_EQ(speed_batcher_reserve_keep(b, "bad", bad3_ids(), 3, NG, NULL, &rkeep), SPEED_ERR_INVALID_ARGUMENT);
    int32_t bad[3] = {1, 2, 1 << 30};
    CHECK_INT_EQ(speed_batcher_reserve_ids(b, "bad", bad, 3, NG, NULL, &r3), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_batcher_reserve_ids(b, "null", NULL, 3, NG, NULL, &r3), SPEED_ERR_INVALID_ARGUMENT);
    speed_batcher_destroy(b);

    /* the same turn 2 from scratch in a plain engine */
    speed_engine_params_t ep = speed_engine_default_params();
    ep.backend = be;
    ep.model = model;
    ep.depth = depth;
    speed_engine_t *e = NULL;
    CHECK_INT_EQ(speed_engine_create(&ep, &e), SPEED_OK);
    et_seq_t cold;
    memset(&cold, 0, sizeof cold);
    cold.depth = depth;
    cold.n_prompt = NP + NG + NM;
    cold.n_gen = NG;
    memcpy(cold.prompt, conv, sizeof conv);
    CHECK_INT_EQ(et_run(e, &cold, 1), SPEED_OK);
    for (int t = 0; t < NG; t++) CHECK_INT_EQ(t2.ids[t], cold.gen[t]);
    et_seq_free(&cold);
    speed_engine_destroy(e);

    speed_backend_destroy(be);
    speed_model_destroy(model);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
