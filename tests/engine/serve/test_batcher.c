/* speed_batcher: the node daemons' engine loop. Tokens equal the plain engine's, requests from
 * several threads batch together, reservations receive KV and decode, a migrated request's
 * resumed tokens continue the plain run exactly, and every path (finish,
 * cancel, lease expiry, hold/release, errors, destroy) frees its blocks, calling on_kv_free
 * for the request first, while its blocks are still reserved (a decode node revokes the
 * request's KV transfer grant there). */
#include <pthread.h>

#include "batcher.h"
#include "clock.h"
#include "engine_test_util.h"
#include "test_clock.h"

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_tokens;
    int32_t ids[64];
    float logprobs[64];
    int n_first;
    int n_finish;
    speed_batch_finish_t finish;
    speed_status_t status;
    speed_batch_usage_t usage;
    int n_layer_calls, n_layers_complete;
    int fail_at_layer; /* on_layer returns an error at this layer (-1 never) */
} rec_t;

static void rec_init(rec_t *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    r->fail_at_layer = -1;
}

static void rec_cleanup(rec_t *r) {
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
}

static void on_event(void *user, const speed_batch_event_t *ev) {
    rec_t *r = user;
    pthread_mutex_lock(&r->mu);
    if (ev->token) {
        if (r->n_tokens < 64) {
            r->ids[r->n_tokens] = ev->token->id;
            r->logprobs[r->n_tokens] = ev->token->logprob;
        }
        r->n_tokens++;
        r->n_first += ev->first;
    } else {
        r->n_finish++;
        r->finish = ev->finish;
        r->status = ev->status;
        r->usage = *ev->usage;
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
}

static speed_status_t on_layer(void *user, speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int layer,
                               int64_t n_done, int64_t n_total) {
    (void)cache, (void)seq;
    rec_t *r = user;
    pthread_mutex_lock(&r->mu);
    r->n_layer_calls++;
    r->n_layers_complete += n_done == n_total;
    int fail = r->fail_at_layer;
    pthread_mutex_unlock(&r->mu);
    return layer == fail ? SPEED_ERR_TRANSFER : SPEED_OK;
}

static int rec_tokens(rec_t *r) {
    pthread_mutex_lock(&r->mu);
    int n = r->n_tokens;
    pthread_mutex_unlock(&r->mu);
    return n;
}

static bool rec_wait(rec_t *r, int ms) {
    struct timespec ts = realtime_after_ms(ms);
    pthread_mutex_lock(&r->mu);
    while (r->n_finish == 0)
        if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) != 0) break;
    bool ok = r->n_finish > 0;
    pthread_mutex_unlock(&r->mu);
    return ok;
}

static speed_batch_request_t greedy_request(const char *id, const int32_t *prompt, int n_prompt, int max_tokens,
                                            rec_t *rec) {
    speed_batch_request_t q = {
        .request_id = id, .prompt = prompt, .n_prompt = n_prompt, .on_event = on_event, .user = rec};
    q.gen.sampling = speed_sampling_default_params();
    q.gen.sampling.temperature = 0.0f;
    q.gen.max_tokens = max_tokens;
    q.gen.ignore_eos = true;
    return q;
}

static int64_t blocks_reserved(speed_batcher_t *b) {
    speed_batcher_stats_t s;
    speed_batcher_stats(b, &s);
    return s.kv.usage.n_blocks[0] + s.kv.usage.n_blocks[1];
}

static speed_batcher_stats_t stats_of(speed_batcher_t *b) {
    speed_batcher_stats_t s;
    speed_batcher_stats(b, &s);
    return s;
}

/* The engine thread snapshots stats after each loop: wait (generously) for the snapshot to
 * show no blocks in use. */
static int64_t blocks_reserved_settled(speed_batcher_t *b) {
    WAIT_FOR(blocks_reserved(b) == 0, 10000);
    return blocks_reserved(b);
}

/* The same, waiting for the snapshot to show some blocks in use. */
static int64_t blocks_reserved_nonzero(speed_batcher_t *b) {
    WAIT_FOR(blocks_reserved(b) > 0, 10000);
    return blocks_reserved(b);
}

/* on_kv_free: the requests whose blocks were about to be freed, and how many blocks the cache
 * still had reserved at that moment (> 0: the hook ran before they went back) */
static struct {
    pthread_mutex_t mu;
    speed_kv_cache_t *cache;
    char ids[64][16];
    int64_t blocks[64];
    int n;
} g_freed = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void on_kv_free(void *user, const char *id) {
    (void)user;
    speed_kv_cache_stats_t s;
    speed_kv_cache_stats(g_freed.cache, &s);
    pthread_mutex_lock(&g_freed.mu);
    if (g_freed.n < 64) {
        snprintf(g_freed.ids[g_freed.n], sizeof g_freed.ids[0], "%s", id);
        g_freed.blocks[g_freed.n++] = s.usage.n_blocks[0] + s.usage.n_blocks[1];
    }
    pthread_mutex_unlock(&g_freed.mu);
}

/* The blocks reserved when id's blocks were about to be freed (its last call), -1 if never. */
static int64_t freed_blocks(const char *id) {
    int64_t v = -1;
    pthread_mutex_lock(&g_freed.mu);
    for (int i = 0; i < g_freed.n; i++)
        if (strcmp(g_freed.ids[i], id) == 0) v = g_freed.blocks[i];
    pthread_mutex_unlock(&g_freed.mu);
    return v;
}

#define NP 40
#define NG 6

typedef struct {
    speed_batcher_t *b;
    const char *id;
    const int32_t *prompt;
    rec_t *rec;
    speed_status_t st;
} submit_arg_t;

static void *submit_thread(void *p) {
    submit_arg_t *a = p;
    speed_batch_request_t q = greedy_request(a->id, a->prompt, NP, NG, a->rec);
    a->st = speed_batcher_submit(a->b, &q);
    return NULL;
}

typedef struct {
    const void *buf;
    size_t size;
    int64_t n_full, n_compact;
} import_arg_t;

static speed_status_t import_fn(void *user, speed_kv_cache_t *cache, const speed_kv_seq_t *seq) {
    import_arg_t *a = user;
    return speed_kv_cache_seq_import(cache, (speed_kv_seq_t *)seq, a->n_full, a->n_compact, a->buf, a->size);
}

/* on_step: what the steps reported, summed (engine thread writes, main thread reads after). */
static _Atomic long g_steps, g_step_seqs, g_step_prefill, g_step_decode;
static _Atomic bool g_step_bad;

static void on_step(void *user, const speed_batch_step_t *step) {
    (void)user;
    g_steps++;
    g_step_seqs += step->n_seqs;
    g_step_prefill += step->n_prefill_rows;
    g_step_decode += step->n_decode_rows;
    if (!(step->seconds > 0) || step->n_seqs < 1 || step->n_prefill_rows + step->n_decode_rows < step->n_seqs)
        g_step_bad = true;
}

int main(void) {
    speed_log_configure("error");
    tu_tmp_init("batcher");
    et_model_spec_t spec = {"gqa", SPEED_DTYPE_F32, false, 2, false};
    speed_model_t *model = et_model_make(&spec);
    CHECK(model != NULL);
    speed_backend_t *be = et_backend("cpu-ref");
    CHECK(be != NULL);
    const int L = model->config.n_layers;
    const int vocab = model->config.vocab_size;
    int64_t live0 = speed_alloc_live_count();

    /* reference: the plain engine, one sequence per prompt, at depth C = L/2 */
    speed_depth_t depth = {L / 2, 1, 1};
    int32_t prompts[3][NP];
    for (int i = 0; i < 3; i++) et_prompt(prompts[i], NP, 100 + (uint64_t)i, vocab);
    et_seq_t ref[3];
    memset(ref, 0, sizeof ref);
    {
        speed_engine_params_t ep = speed_engine_default_params();
        ep.backend = be;
        ep.model = model;
        ep.depth = depth;
        speed_engine_t *e = NULL;
        CHECK_INT_EQ(speed_engine_create(&ep, &e), SPEED_OK);
        for (int i = 0; i < 3; i++) {
            ref[i].depth = depth;
            ref[i].n_prompt = NP;
            ref[i].n_gen = NG;
            memcpy(ref[i].prompt, prompts[i], sizeof prompts[i]);
            CHECK_INT_EQ(et_run(e, &ref[i], 1), SPEED_OK);
        }
        speed_engine_destroy(e);
    }

    speed_batcher_params_t bp = speed_batcher_default_params();
    bp.backend = be;
    bp.model = model;
    bp.engine.depth = depth;
    bp.engine.max_seqs = 4;
    bp.engine.prefill_chunk = 16; /* several steps per prefill: batching interleaves */
    bp.max_waiting = 2;
    bp.lease_ms = 1000;
    bp.cancel_quarantine_ms = 150;
    bp.on_kv_free = on_kv_free;
    bp.on_step = on_step;
    speed_batcher_t *b = NULL;
    CHECK_INT_EQ(speed_batcher_create(&bp, &b), SPEED_OK);
    if (!b) return CHECK_DONE();
    g_freed.cache = speed_batcher_kv_cache(b); /* before any request: the hook runs for requests */
    CHECK_INT_EQ(speed_batcher_depth(b).prefill_layers, L / 2);

    /* 1. three requests from three threads batch together and equal the single runs */
    {
        rec_t rec[3];
        submit_arg_t args[3];
        pthread_t th[3];
        const char *ids[3] = {"a", "b", "c"};
        for (int i = 0; i < 3; i++) {
            rec_init(&rec[i]);
            args[i] = (submit_arg_t){b, ids[i], prompts[i], &rec[i], SPEED_ERR_INTERNAL};
            pthread_create(&th[i], NULL, submit_thread, &args[i]);
        }
        for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
        for (int i = 0; i < 3; i++) {
            CHECK_INT_EQ(args[i].st, SPEED_OK);
            CHECK(rec_wait(&rec[i], 20000));
            CHECK_INT_EQ(rec[i].n_finish, 1);
            CHECK_INT_EQ(rec[i].finish, SPEED_BATCH_LENGTH);
            CHECK_INT_EQ(rec[i].n_tokens, NG);
            CHECK_INT_EQ(rec[i].n_first, 1);
            for (int t = 0; t < NG; t++) CHECK_INT_EQ(rec[i].ids[t], ref[i].gen[t]);
            CHECK_INT_EQ(rec[i].usage.n_generated, NG);
            CHECK_INT_EQ(rec[i].usage.n_prompt, NP);
            CHECK_INT_EQ(rec[i].usage.depth.prefill_layers, L / 2);
            CHECK(rec[i].usage.kv_bytes < rec[i].usage.kv_bytes_full_depth);
            rec_cleanup(&rec[i]);
        }
        CHECK_INT_EQ(blocks_reserved_settled(b), 0);
        /* every step reported: the prompts' rows, and each generated token but the last fed back */
        CHECK_INT_EQ(g_step_prefill, 3 * NP);
        CHECK_INT_EQ(g_step_decode, 3 * (NG - 1));
        CHECK(g_steps >= NP / 16 + NG - 1);
        CHECK(g_step_seqs > g_steps); /* batched: some steps had several sequences */
        CHECK(!g_step_bad);
        speed_batcher_stats_t st;
        speed_batcher_stats(b, &st);
        CHECK_INT_EQ(st.tokens_in_flight, 0); /* nothing running any more */
    }

    /* 2. reserve -> KV written into the blocks -> start: the decode node's path */
    {
        speed_engine_params_t ep = speed_engine_default_params();
        ep.backend = be;
        ep.model = model;
        ep.depth = depth;
        speed_engine_t *pe = NULL;
        CHECK_INT_EQ(speed_engine_create(&ep, &pe), SPEED_OK);
        speed_seq_id_t ps;
        CHECK_INT_EQ(speed_engine_seq_add(pe, prompts[0], NP, NULL, 1, &ps), SPEED_OK);
        speed_engine_step_result_t r;
        int32_t first = -1;
        float first_lp = 0;
        while (first < 0) {
            CHECK_INT_EQ(speed_engine_step(pe, &r), SPEED_OK);
            for (int o = 0; o < r.n_outputs; o++) {
                speed_sampler_t *smp;
                CHECK_INT_EQ(speed_sampler_create(vocab, &smp), SPEED_OK);
                speed_sampling_params_t sp = speed_sampling_default_params();
                sp.temperature = 0;
                speed_sample_t s;
                CHECK_INT_EQ(speed_sampler_sample(smp, &sp, NULL, r.outputs[o].logits, vocab, &s), SPEED_OK);
                first = s.id;
                first_lp = s.logprob;
                speed_sampler_destroy(smp);
            }
        }
        CHECK_INT_EQ(first, ref[0].gen[0]);
        size_t bytes = 0;
        CHECK_INT_EQ(speed_engine_seq_kv_size(pe, ps, &bytes), SPEED_OK);
        void *buf = malloc(bytes);
        CHECK_INT_EQ(speed_engine_seq_kv_export(pe, ps, buf, bytes), SPEED_OK);

        speed_batch_reservation_t res;
        CHECK_INT_EQ(speed_batcher_reserve(b, "r1", NP, NG, NULL, &res), SPEED_OK);
        CHECK_INT_EQ(res.kv_bytes, bytes);
        CHECK_INT_EQ(res.depth.prefill_layers, L / 2);
        /* the reservation holds KV blocks at once (stats come from the engine thread's
         * snapshot, which may lag: wait for it to show them) */
        CHECK_MSG(blocks_reserved_nonzero(b) > 0, "a reservation of %d prompt tokens holds no KV blocks", NP);
        { /* its prompt is in flight (the snapshot may lag here too) */
            speed_batcher_stats_t st;
            double t0 = now_s();
            do {
                speed_batcher_stats(b, &st);
            } while (st.tokens_in_flight != NP && now_s() - t0 < 5 && (speed_clock_sleep_ms(2), true));
            CHECK_INT_EQ(st.tokens_in_flight, NP);
        }
        /* a second reservation with the same id is refused */
        CHECK_INT_EQ(speed_batcher_reserve(b, "r1", NP, NG, NULL, &res), SPEED_ERR_INVALID_ARGUMENT);
        import_arg_t ia = {buf, bytes, NP, 2};
        CHECK_INT_EQ(speed_batcher_with_kv(b, "r1", import_fn, &ia), SPEED_OK);
        CHECK_INT_EQ(speed_batcher_with_kv(b, "nope", import_fn, &ia), SPEED_ERR_NOT_FOUND);
        rec_t rec;
        rec_init(&rec);
        speed_batch_request_t q = greedy_request("r1", NULL, 0, NG, &rec);
        speed_batch_token_t ft = {.id = first, .logprob = first_lp};
        CHECK_INT_EQ(speed_batcher_start(b, &q, &ft, true), SPEED_OK);
        CHECK(rec_wait(&rec, 20000));
        CHECK_INT_EQ(rec.finish, SPEED_BATCH_LENGTH);
        CHECK_INT_EQ(rec.n_tokens, NG);
        for (int t = 0; t < NG; t++) CHECK_INT_EQ(rec.ids[t], ref[0].gen[t]);
        /* starting again: the request is gone */
        CHECK_INT_EQ(speed_batcher_start(b, &q, &ft, true), SPEED_ERR_NOT_FOUND);
        rec_cleanup(&rec);
        free(buf);
        speed_engine_destroy(pe);
        CHECK_INT_EQ(blocks_reserved_settled(b), 0);
        CHECK_MSG(freed_blocks("r1") > 0, "on_kv_free for a finished reservation: %lld", (long long)freed_blocks("r1"));
    }

    /* 3. a reservation nobody claims is freed when its lease ends */
    {
        speed_batch_reservation_t res;
        double t_reserve = now_ms();
        CHECK_INT_EQ(speed_batcher_reserve(b, "lease", NP, NG, NULL, &res), SPEED_OK);
        /* held until the lease ends: the snapshot shows the blocks (or the lease ended first) */
        WAIT_FOR(blocks_reserved(b) > 0 || stats_of(b).n_expired > 0, 10000);
        CHECK_MSG(blocks_reserved(b) > 0 || now_ms() - t_reserve >= 1000, "the reservation held no blocks");
        WAIT_FOR(stats_of(b).n_expired == 1 && blocks_reserved(b) == 0, 10000);
        CHECK_MSG(now_ms() - t_reserve >= 1000, "the 1 s lease ended after %.0f ms", now_ms() - t_reserve);
        CHECK_INT_EQ(blocks_reserved(b), 0);
        speed_batcher_stats_t s = stats_of(b);
        CHECK_INT_EQ(s.n_expired, 1);
        CHECK_INT_EQ(s.reserved, 0);
        CHECK_MSG(freed_blocks("lease") > 0, "on_kv_free at the lease end: %lld", (long long)freed_blocks("lease"));
        rec_t rec;
        rec_init(&rec);
        speed_batch_request_t q = greedy_request("lease", NULL, 0, NG, &rec);
        speed_batch_token_t ft = {.id = 5};
        CHECK_INT_EQ(speed_batcher_start(b, &q, &ft, true), SPEED_ERR_NOT_FOUND);
        CHECK_INT_EQ(rec.n_finish, 0);
        rec_cleanup(&rec);
    }

    /* 4. cancel mid-decode: one CANCELLED finish, blocks freed */
    {
        rec_t rec;
        rec_init(&rec);
        speed_batch_request_t q = greedy_request("long", prompts[1], NP, 200, &rec);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_OK);
        WAIT_FOR(rec_tokens(&rec) >= 2, 20000);
        CHECK_INT_EQ(speed_batcher_cancel(b, "long"), SPEED_OK);
        CHECK(rec_wait(&rec, 20000));
        CHECK_INT_EQ(rec.finish, SPEED_BATCH_CANCELLED);
        CHECK_INT_EQ(rec.status, SPEED_ERR_CANCELLED);
        CHECK(rec.n_tokens >= 2 && rec.n_tokens < 200);
        /* the finish event comes before the engine thread drops the request: wait for a
         * snapshot taken after that (nothing running, blocks freed); then it is gone and no
         * second finish can follow */
        WAIT_FOR(stats_of(b).running == 0 && blocks_reserved(b) == 0, 10000);
        CHECK_INT_EQ(blocks_reserved(b), 0);
        CHECK_INT_EQ(speed_batcher_cancel(b, "long"), SPEED_ERR_NOT_FOUND);
        CHECK_MSG(freed_blocks("long") > 0, "on_kv_free at a cancel: %lld", (long long)freed_blocks("long"));
        pthread_mutex_lock(&rec.mu);
        CHECK_INT_EQ(rec.n_finish, 1);
        pthread_mutex_unlock(&rec.mu);
        rec_cleanup(&rec);
    }

    /* 5. bad input: clear status, no event */
    {
        rec_t rec;
        rec_init(&rec);
        int32_t bad[3] = {1, vocab, 2};
        speed_batch_request_t q = greedy_request("bad", bad, 3, 4, &rec);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        q = greedy_request("bad", prompts[0], 0, 4, &rec);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        q = greedy_request("bad", prompts[0], NP, 0, &rec);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        q = greedy_request("bad", prompts[0], NP, 1 << 20, &rec);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_TOO_LONG);
        q = greedy_request("bad", prompts[0], NP, 4, &rec);
        q.gen.sampling.top_p = 2.0f;
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        q = greedy_request("", prompts[0], NP, 4, &rec);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        char longid[SPEED_BATCH_ID_MAX + 8];
        memset(longid, 'x', sizeof longid - 1);
        longid[sizeof longid - 1] = '\0';
        q = greedy_request(longid, prompts[0], NP, 4, &rec);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        q = greedy_request("bad", prompts[0], NP, 4, &rec);
        q.depth = speed_depth_request_of((speed_depth_t){L + 1, 1, 1});
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(rec.n_finish, 0);
        CHECK_INT_EQ(rec.n_tokens, 0);
        speed_batch_reservation_t res;
        CHECK_INT_EQ(speed_batcher_reserve(b, "bad2", 0, 4, NULL, &res), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(speed_batcher_reserve(b, "bad2", 1 << 20, 4, NULL, &res), SPEED_ERR_TOO_LONG);
        CHECK_INT_EQ(speed_batcher_kv_ready(b, "none"), SPEED_ERR_NOT_FOUND);
        rec_cleanup(&rec);
    }

    /* 6. capacity: 4 reservations fill the engine (max_seqs 4), 2 submits wait, the third is
     * refused; freeing the reservations lets the waiting ones run, oldest first */
    {
        speed_batch_reservation_t res;
        char rid[4][8];
        for (int i = 0; i < 4; i++) {
            snprintf(rid[i], sizeof rid[i], "fill%d", i);
            CHECK_INT_EQ(speed_batcher_reserve(b, rid[i], NP, 4, NULL, &res), SPEED_OK);
        }
        CHECK_INT_EQ(speed_batcher_reserve(b, "fill4", NP, 4, NULL, &res), SPEED_ERR_CAPACITY);
        rec_t rec[3];
        speed_status_t st[3];
        for (int i = 0; i < 3; i++) {
            char id[8];
            rec_init(&rec[i]);
            snprintf(id, sizeof id, "cap%d", i);
            speed_batch_request_t q = greedy_request(id, prompts[i], NP, 3, &rec[i]);
            st[i] = speed_batcher_submit(b, &q);
        }
        CHECK_INT_EQ(st[0], SPEED_OK);
        CHECK_INT_EQ(st[1], SPEED_OK);
        CHECK_INT_EQ(st[2], SPEED_ERR_CAPACITY);
        speed_batcher_stats_t s;
        WAIT_FOR((s = stats_of(b)).waiting == 2, 10000);
        CHECK_INT_EQ(s.waiting, 2);
        CHECK_INT_EQ(s.reserved, 4);
        for (int i = 0; i < 4; i++) CHECK_INT_EQ(speed_batcher_cancel(b, rid[i]), SPEED_OK);
        /* cancelled reservations sit out the 150 ms quarantine before their blocks are reused:
         * the first snapshot after the cancels shows them held and the two submits waiting */
        WAIT_FOR((s = stats_of(b)).reserved == 0, 10000);
        CHECK_INT_EQ(s.reserved, 0);
        CHECK_INT_EQ(s.held, 4);
        CHECK_INT_EQ(s.waiting, 2);
        for (int i = 0; i < 2; i++) {
            CHECK(rec_wait(&rec[i], 30000));
            CHECK_INT_EQ(rec[i].finish, SPEED_BATCH_LENGTH);
            for (int t = 0; t < 3; t++) CHECK_INT_EQ(rec[i].ids[t], ref[i].gen[t]);
        }
        CHECK_INT_EQ(rec[2].n_finish, 0);
        for (int i = 0; i < 3; i++) rec_cleanup(&rec[i]);
        CHECK_INT_EQ(blocks_reserved_settled(b), 0);
        /* cancelled reservations (held, then freed): the hook before their blocks went back */
        for (int i = 0; i < 4; i++) CHECK_MSG(freed_blocks(rid[i]) > 0, "on_kv_free for held %s", rid[i]);
    }

    /* 7. prefill-node use: per-layer callbacks, hold the KV after the first token, release */
    {
        rec_t rec;
        rec_init(&rec);
        speed_batch_request_t q = greedy_request("pf", prompts[2], NP, 1, &rec);
        q.hold_kv = true;
        q.on_layer = on_layer;
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_OK);
        CHECK(rec_wait(&rec, 20000));
        CHECK_INT_EQ(rec.finish, SPEED_BATCH_LENGTH);
        CHECK_INT_EQ(rec.n_tokens, 1);
        CHECK_INT_EQ(rec.ids[0], ref[2].gen[0]);
        CHECK_INT_EQ(rec.n_layers_complete, L); /* every layer reported complete once */
        speed_batcher_stats_t s;
        WAIT_FOR((s = stats_of(b)).held == 1, 10000);
        CHECK_INT_EQ(s.held, 1);
        CHECK(s.kv.usage.n_blocks[0] + s.kv.usage.n_blocks[1] > 0); /* held */
        CHECK_INT_EQ(speed_batcher_release(b, "pf"), SPEED_OK);
        CHECK_INT_EQ(blocks_reserved_settled(b), 0);
        rec_cleanup(&rec);

        /* a failing layer callback ends that request only */
        rec_t r1, r2;
        rec_init(&r1);
        rec_init(&r2);
        r1.fail_at_layer = 1;
        speed_batch_request_t q1 = greedy_request("f1", prompts[0], NP, 2, &r1);
        q1.on_layer = on_layer;
        speed_batch_request_t q2 = greedy_request("f2", prompts[1], NP, 2, &r2);
        CHECK_INT_EQ(speed_batcher_submit(b, &q1), SPEED_OK);
        CHECK_INT_EQ(speed_batcher_submit(b, &q2), SPEED_OK);
        CHECK(rec_wait(&r1, 20000) && rec_wait(&r2, 20000));
        CHECK_INT_EQ(r1.finish, SPEED_BATCH_ERROR);
        CHECK_INT_EQ(r1.status, SPEED_ERR_TRANSFER);
        CHECK_INT_EQ(r2.finish, SPEED_BATCH_LENGTH);
        CHECK_INT_EQ(r2.ids[0], ref[1].gen[0]);
        CHECK_INT_EQ(r2.ids[1], ref[1].gen[1]);
        rec_cleanup(&r1);
        rec_cleanup(&r2);
        CHECK_INT_EQ(blocks_reserved_settled(b), 0);
    }

    /* 7b. a migrated request: the prompt followed by k tokens it generated before, resumed
     * (their depth extended to the tail) goes on with exactly the plain run's tokens; resumed
     * tokens count against max_tokens (k = NG: only the finish); bad resumptions refused */
    {
        for (int k = 1; k <= NG; k++) {
            int32_t p[NP + NG];
            memcpy(p, prompts[0], sizeof prompts[0]);
            memcpy(p + NP, ref[0].gen, (size_t)k * sizeof *p);
            rec_t rec;
            rec_init(&rec);
            char id[16];
            snprintf(id, sizeof id, "m%d", k);
            speed_batch_request_t q = greedy_request(id, p, NP + k, NG, &rec);
            q.gen.resume_ids = ref[0].gen;
            q.gen.n_resume = k;
            q.depth.has_tail = true;
            q.depth.tail = depth.tail + k;
            CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_OK);
            CHECK(rec_wait(&rec, 20000));
            CHECK_INT_EQ(rec.finish, SPEED_BATCH_LENGTH);
            CHECK_INT_EQ(rec.n_tokens, NG - k);
            CHECK_INT_EQ(rec.n_first, 0); /* the request's first token went out before */
            for (int i = 0; i < rec.n_tokens && i < NG; i++)
                CHECK_MSG(rec.ids[i] == ref[0].gen[k + i], "k=%d token %d: %d, plain run %d", k, i, rec.ids[i],
                          ref[0].gen[k + i]);
            CHECK_INT_EQ(rec.usage.n_generated, NG);
            rec_cleanup(&rec);
        }
        int32_t p[NP + 2];
        memcpy(p, prompts[0], sizeof prompts[0]);
        p[NP] = ref[0].gen[0], p[NP + 1] = ref[0].gen[1];
        rec_t rec;
        rec_init(&rec);
        speed_batch_request_t q = greedy_request("mbad", p, NP + 2, NG, &rec);
        int32_t other[2] = {ref[0].gen[1], ref[0].gen[0] + 1};
        q.gen.resume_ids = other; /* not the prompt's last ids */
        q.gen.n_resume = 2;
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        q.gen.resume_ids = p;
        q.gen.n_resume = NP + 2; /* the whole prompt */
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        q.gen.resume_ids = p + NP;
        q.gen.n_resume = 2;
        q.gen.max_tokens = 1; /* the resumed tokens go past max_tokens */
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(rec.n_finish, 0);
        rec_cleanup(&rec);
        CHECK_INT_EQ(blocks_reserved_settled(b), 0);
    }

    /* 8. destroy with live requests: each gets CANCELLED, nothing leaks */
    {
        rec_t rec[2];
        rec_init(&rec[0]);
        rec_init(&rec[1]);
        speed_batch_request_t q = greedy_request("d0", prompts[0], NP, 300, &rec[0]);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_OK);
        speed_batch_reservation_t res;
        CHECK_INT_EQ(speed_batcher_reserve(b, "d1", NP, 4, NULL, &res), SPEED_OK);
        speed_batcher_drain(b);
        q = greedy_request("d2", prompts[0], NP, 3, &rec[1]);
        CHECK_INT_EQ(speed_batcher_submit(b, &q), SPEED_ERR_CANCELLED);
        speed_batcher_destroy(b);
        CHECK_INT_EQ(rec[0].n_finish, 1);
        CHECK_INT_EQ(rec[0].finish, SPEED_BATCH_CANCELLED);
        CHECK_INT_EQ(rec[1].n_finish, 0);
        rec_cleanup(&rec[0]);
        rec_cleanup(&rec[1]);
    }
    CHECK_INT_EQ(speed_alloc_live_count(), live0);

    for (int i = 0; i < 3; i++) et_seq_free(&ref[i]);
    speed_backend_destroy(be);
    speed_model_destroy(model);
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
