/* speed_batcher: see batcher.h.
 *
 * Locking. `mu` protects the command queue, the request list (requests are created and
 * destroyed by the engine thread, while holding mu, so other threads may look ids up under
 * mu), the stats snapshot and the flags. The engine, the sampler and each request's
 * generation state are touched only by the engine thread, without the lock; event callbacks
 * run with no lock held.
 */
#include "batcher_internal.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"
#include "rng.h"

_Thread_local const speed_batcher_t *speed_batcher_tls_engine_thread_of;

const char *speed_batch_finish_name(speed_batch_finish_t finish) {
    switch (finish) {
    case SPEED_BATCH_RUNNING: return "running";
    case SPEED_BATCH_STOP: return "stop";
    case SPEED_BATCH_LENGTH: return "length";
    case SPEED_BATCH_CANCELLED: return "cancelled";
    case SPEED_BATCH_EXPIRED: return "expired";
    case SPEED_BATCH_ERROR: return "error";
    }
    return "unknown";
}

speed_batcher_params_t speed_batcher_default_params(void) {
    speed_batcher_params_t p = {0};
    p.engine = speed_engine_default_params();
    p.max_waiting = 64;
    p.lease_ms = 30000;
    p.cancel_quarantine_ms = 0;
    return p;
}

/* ---- requests ------------------------------------------------------------------------------ */

static req_t *req_find(const speed_batcher_t *b, const char *id) {
    for (req_t *r = b->reqs; r; r = r->next)
        if (strcmp(r->id, id) == 0) return r;
    return NULL;
}

static req_t *req_by_seq(const speed_batcher_t *b, speed_seq_id_t seq) {
    for (req_t *r = b->reqs; r; r = r->next)
        if (r->in_engine && r->seq == seq) return r;
    return NULL;
}

void speed_batcher_req_free(req_t *r) {
    if (!r) return;
    speed_free(r->prompt);
    if (r->stop_strings)
        for (size_t i = 0; i < r->gen.n_stop; i++) speed_free(r->stop_strings[i]);
    speed_free(r->stop_strings);
    speed_stop_destroy(r->stop);
    speed_tok_stream_destroy(r->stream);
    speed_free(r->text);
    speed_free(r);
}

static speed_status_t check_id(const char *id) {
    if (!id || !id[0] || strlen(id) > SPEED_BATCH_ID_MAX) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: request id must be 1..%d bytes", SPEED_BATCH_ID_MAX);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

/* A migrated request's earlier output runs through the same text pipeline as when it was
 * generated (speed_batcher_emit_token), silently: the detokenizer's pending bytes, the stop
 * matcher's held-back text and its token count end up exactly as they were, and the next
 * token releases what it would have. Each token took one draw of the generator (the sampler
 * draws once per token when it draws at all), so skipping one per token keeps seeded
 * sampling on the same numbers. A finish among them is kept for start/submit to report. */
static speed_status_t req_prime(speed_batcher_t *b, req_t *r, const int32_t *ids, int64_t n) {
    r->primed_finish = SPEED_BATCH_RUNNING;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= b->n_vocab) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: resumed token %lld is %d, outside the vocabulary [0, %d)",
                        r->id, (long long)i, ids[i], b->n_vocab);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (r->primed_finish != SPEED_BATCH_RUNNING) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: %lld resumed tokens go on after the request ended at %lld",
                        r->id, (long long)n, (long long)i);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        const char *piece = "";
        size_t piece_len = 0;
        if (r->stream && ids[i] < b->n_tok_vocab)
            SPEED_CHECK(speed_tok_stream_push(r->stream, ids[i], &piece, &piece_len));
        speed_stop_result_t sr;
        SPEED_CHECK(speed_stop_push(r->stop, ids[i], piece, piece_len, &sr));
        if (sr.finish != SPEED_FINISH_NONE) {
            const char *tail = "";
            size_t tail_len = 0;
            if (r->stream) SPEED_CHECK(speed_tok_stream_flush(r->stream, &tail, &tail_len));
            SPEED_CHECK(speed_stop_finish(r->stop, tail, tail_len, &sr));
            r->primed_finish = sr.finish == SPEED_FINISH_LENGTH ? SPEED_BATCH_LENGTH : SPEED_BATCH_STOP;
        }
        (void)speed_rng_next(&r->rng); /* the draw this token took */
    }
    r->n_resume = n;
    r->first_sent = n > 0; /* the request's first token went out before the migration */
    return SPEED_OK;
}

/* Copies the generation parameters and builds the sampler/stop/text state (caller's thread). */
static speed_status_t req_prepare_gen(speed_batcher_t *b, req_t *r, const speed_batch_gen_t *gen) {
    r->gen = *gen;
    r->gen.stop = NULL;
    if (gen->max_tokens < 1) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: max_tokens %lld must be >= 1", r->id,
                    (long long)gen->max_tokens);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    SPEED_CHECK(speed_sampling_params_validate(&gen->sampling));
    if (gen->n_stop && !b->p.tokenizer) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: stop strings need a tokenizer", r->id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (gen->n_stop > SPEED_STOP_MAX_STRINGS || (gen->n_stop && !gen->stop)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: at most %d stop strings", r->id, SPEED_STOP_MAX_STRINGS);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (gen->n_stop) {
        r->stop_strings = speed_calloc(gen->n_stop, sizeof *r->stop_strings);
        if (!r->stop_strings) return SPEED_ERR_NO_MEMORY;
        for (size_t i = 0; i < gen->n_stop; i++) {
            if (!gen->stop[i]) return SPEED_ERR_INVALID_ARGUMENT;
            r->stop_strings[i] = speed_strdup(gen->stop[i]);
            if (!r->stop_strings[i]) return SPEED_ERR_NO_MEMORY;
        }
        r->gen.stop = (const char *const *)r->stop_strings;
    }
    speed_stop_params_t sp = {.eos_ids = gen->ignore_eos ? NULL : b->eos_ids,
                              .n_eos_ids = gen->ignore_eos ? 0 : b->n_eos,
                              .stop = r->gen.stop,
                              .n_stop = gen->n_stop,
                              .max_tokens = gen->max_tokens};
    SPEED_CHECK(speed_stop_create(&sp, &r->stop));
    if (b->p.tokenizer) SPEED_CHECK(speed_tok_stream_create(b->p.tokenizer, true, &r->stream));
    speed_rng_init(&r->rng, gen->sampling.seed);
    r->gen.resume_ids = NULL;
    r->gen.n_resume = 0;
    if (gen->n_resume < 0 || (gen->n_resume > 0 && !gen->resume_ids)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: n_resume %lld without its ids", r->id, (long long)gen->n_resume);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return req_prime(b, r, gen->resume_ids, gen->n_resume);
}

static speed_status_t req_create(speed_batcher_t *b, const char *id, req_t **r_p) {
    SPEED_CHECK(check_id(id));
    req_t *r = speed_calloc(1, sizeof *r);
    if (!r) return SPEED_ERR_NO_MEMORY;
    strcpy(r->id, id);
    r->seq = -1;
    r->t_arrival_ns = speed_clock_mono_ns();
    (void)b;
    *r_p = r;
    return SPEED_OK;
}

/* ---- commands ------------------------------------------------------------------------------ */

/* Queues cmd and, unless it is async, waits until the engine thread has run it. */
static speed_status_t cmd_run(speed_batcher_t *b, cmd_t *cmd) {
    if (speed_batcher_tls_engine_thread_of == b && !cmd->heap) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: only cancel and release may be called from an event callback");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    pthread_mutex_lock(&b->mu);
    if (b->stopping) {
        pthread_mutex_unlock(&b->mu);
        return SPEED_ERR_CANCELLED;
    }
    cmd->next = NULL;
    if (b->q_tail)
        b->q_tail->next = cmd;
    else
        b->q_head = cmd;
    b->q_tail = cmd;
    pthread_cond_signal(&b->wake);
    if (cmd->heap) {
        pthread_mutex_unlock(&b->mu);
        return SPEED_OK;
    }
    while (!cmd->done) pthread_cond_wait(&b->done_cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
    return cmd->status;
}

/* ---- engine thread ------------------------------------------------------------------------- */

static speed_status_t layer_hook(void *user, speed_seq_id_t seq, int layer, int64_t n_done, int64_t n_total) {
    speed_batcher_t *b = user;
    req_t *r = req_by_seq(b, seq);
    if (!r || !r->on_layer || r->layer_status != SPEED_OK) return SPEED_OK;
    speed_kv_seq_t *kvs;
    speed_status_t st = speed_engine_seq_kv(b->engine, seq, &kvs);
    if (st == SPEED_OK) st = r->on_layer(r->user, speed_engine_kv_cache(b->engine), kvs, layer, n_done, n_total);
    if (st != SPEED_OK) r->layer_status = st; /* ends this request only, after the step */
    return SPEED_OK;
}

static void link_req(speed_batcher_t *b, req_t *r) {
    pthread_mutex_lock(&b->mu);
    r->next = b->reqs;
    b->reqs = r;
    b->n_reqs++;
    pthread_mutex_unlock(&b->mu);
}

/* A request's depth over the batcher's default, through the one resolution (depth.h). Any
 * thread: the engine's default depth and layer count do not change after create. */
static speed_status_t depth_resolve(const speed_batcher_t *b, const speed_depth_request_t *q, speed_depth_t *d_p) {
    char err[200];
    speed_depth_t def = speed_engine_depth(b->engine);
    if (speed_depth_resolve(q, &def, b->p.engine.model->config.n_layers, d_p, err, sizeof err) != SPEED_OK) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s", err);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

/* Puts a waiting request into the engine. CAPACITY: leave it waiting. */
static speed_status_t admit(speed_batcher_t *b, req_t *r) {
    speed_status_t st =
        speed_engine_seq_add(b->engine, r->prompt, r->n_prompt, &r->depth, r->gen.max_tokens - r->n_resume, &r->seq);
    if (st != SPEED_OK) return st;
    r->in_engine = true;
    r->state = REQ_RUNNING;
    r->t_engine_ns = speed_clock_mono_ns();
    b->counts.n_prompt_tokens += (uint64_t)r->n_prompt;
    return SPEED_OK;
}

static int count_state(const speed_batcher_t *b, req_state_t s) {
    int n = 0;
    for (const req_t *r = b->reqs; r; r = r->next) n += r->state == s;
    return n;
}

static speed_status_t do_submit(speed_batcher_t *b, cmd_t *c) {
    req_t *r = c->req;
    if (b->draining) return SPEED_ERR_CANCELLED;
    if (req_find(b, r->id)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: request id '%s' is already in use", r->id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (r->primed_finish != SPEED_BATCH_RUNNING) {
        /* its resumed tokens already ended it: nothing to compute, only the finish event */
        b->counts.n_submitted++;
        c->req = NULL;
        link_req(b, r);
        speed_batcher_req_finish(b, r, r->primed_finish, SPEED_OK);
        return SPEED_OK;
    }
    bool queue_empty = count_state(b, REQ_WAITING) == 0;
    speed_status_t st = queue_empty ? admit(b, r) : SPEED_ERR_CAPACITY;
    if (st == SPEED_ERR_CAPACITY) {
        if (count_state(b, REQ_WAITING) >= b->p.max_waiting) return SPEED_ERR_CAPACITY;
        r->state = REQ_WAITING;
        st = SPEED_OK;
    }
    if (st != SPEED_OK) return st;
    b->counts.n_submitted++;
    c->req = NULL; /* the batcher owns it now */
    link_req(b, r);
    return SPEED_OK;
}

static speed_status_t do_reserve(speed_batcher_t *b, cmd_t *c) {
    if (b->draining) return SPEED_ERR_CANCELLED;
    if (req_find(b, c->id)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: request id '%s' is already in use", c->id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    req_t *r;
    SPEED_CHECK(req_create(b, c->id, &r));
    speed_status_t st =
        !c->ids ? speed_engine_seq_reserve(b->engine, c->n_prompt, &c->depth, c->max_tokens, &r->seq)
        : c->no_lookup
            ? speed_engine_seq_reserve_keep(b->engine, c->ids, c->n_prompt, &c->depth, c->max_tokens, &r->seq)
            : speed_engine_seq_reserve_cached(b->engine, c->ids, c->n_prompt, &c->depth, c->max_tokens, &r->seq);
    if (st != SPEED_OK) {
        speed_batcher_req_free(r);
        return st;
    }
    r->in_engine = true;
    r->state = REQ_RESERVED;
    r->n_prompt = c->n_prompt;
    r->deadline_ms = speed_clock_mono_ms() + b->p.lease_ms;
    speed_engine_seq_stats_t ss;
    speed_engine_seq_stats(b->engine, r->seq, &ss);
    r->depth = ss.depth;
    size_t bytes = 0;
    speed_engine_seq_kv_size(b->engine, r->seq, &bytes);
    *c->reservation_p = (speed_batch_reservation_t){
        .depth = ss.depth, .lease_ms = b->p.lease_ms, .kv_bytes = bytes, .n_cached = ss.n_cached};
    b->counts.n_prompt_tokens += (uint64_t)c->n_prompt;
    link_req(b, r);
    return SPEED_OK;
}

static speed_status_t do_start(speed_batcher_t *b, cmd_t *c) {
    req_t *r = req_find(b, c->req->id);
    if (!r || r->state != REQ_RESERVED) {
        if (r) SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: request '%s' was already started", c->req->id);
        return r ? SPEED_ERR_INVALID_ARGUMENT : SPEED_ERR_NOT_FOUND;
    }
    if (c->first.id < 0 || c->first.id >= b->n_vocab) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: first token %d is outside the vocabulary [0, %d)", r->id,
                    c->first.id, b->n_vocab);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (c->kv_ready && !r->kv_ready) {
        SPEED_CHECK(speed_engine_seq_kv_ready(b->engine, r->seq));
        r->kv_ready = true;
    }
    if (!r->kv_ready) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: started before its KV arrived", r->id);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    /* move the prepared generation state into the reservation */
    req_t *p = c->req;
    r->gen = p->gen;
    r->stop_strings = p->stop_strings, p->stop_strings = NULL;
    r->stop = p->stop, p->stop = NULL;
    r->stream = p->stream, p->stream = NULL;
    r->rng = p->rng;
    r->n_resume = p->n_resume;
    r->primed_finish = p->primed_finish;
    r->first_sent = p->first_sent;
    r->on_event = p->on_event;
    r->on_layer = NULL;
    r->user = p->user;
    r->hold_kv = false;
    r->state = REQ_RUNNING;
    r->t_arrival_ns = p->t_arrival_ns;
    r->t_engine_ns = speed_clock_mono_ns();
    b->counts.n_submitted++;
    if (r->primed_finish != SPEED_BATCH_RUNNING) {
        /* the resumed tokens ended it; the prefill node's token comes after the end */
        speed_batcher_req_finish(b, r, r->primed_finish, SPEED_OK);
        return SPEED_OK;
    }
    /* The prefill node drew the first token with the request's next random number: the
     * following tokens take the ones after it, as on a node that samples them all. */
    (void)speed_rng_next(&r->rng); /* the prefill node's draw */

    speed_sample_t smp = {.id = c->first.id, .logprob = c->first.logprob, .n_top = c->first.n_top};
    memcpy(smp.top, c->first.top, sizeof smp.top);
    speed_batch_finish_t finish = SPEED_BATCH_RUNNING;
    speed_status_t st = speed_batcher_emit_token(b, r, &smp, c->first.n_top, &finish);
    speed_batcher_after_token(b, r, st, finish, smp.id);
    return SPEED_OK;
}

static void run_cmd(speed_batcher_t *b, cmd_t *c) {
    speed_status_t st = SPEED_OK;
    req_t *r;
    switch (c->kind) {
    case CMD_SUBMIT: st = do_submit(b, c); break;
    case CMD_RESERVE: st = do_reserve(b, c); break;
    case CMD_START: st = do_start(b, c); break;
    case CMD_WITH_KV:
        r = req_find(b, c->id);
        if (!r || !r->in_engine) {
            st = SPEED_ERR_NOT_FOUND;
        } else {
            speed_kv_seq_t *kvs;
            st = speed_engine_seq_kv(b->engine, r->seq, &kvs);
            if (st == SPEED_OK) st = c->fn(c->fn_user, speed_engine_kv_cache(b->engine), kvs);
        }
        break;
    case CMD_KV_READY:
        r = req_find(b, c->id);
        if (!r)
            st = SPEED_ERR_NOT_FOUND;
        else if (r->state != REQ_RESERVED || r->kv_ready)
            st = SPEED_ERR_INVALID_ARGUMENT;
        else if ((st = speed_engine_seq_kv_ready(b->engine, r->seq)) == SPEED_OK)
            r->kv_ready = true;
        break;
    case CMD_CANCEL:
        r = req_find(b, c->id);
        if (r && r->state == REQ_RESERVED) {
            /* The fence: a prefill node may still have puts in flight into these blocks. Keep
             * them out of circulation until it says it stopped (release) or the lease ends. */
            b->counts.n_cancelled++;
            r->state = REQ_HELD;
            if (b->p.cancel_quarantine_ms > 0) {
                int64_t until = speed_clock_mono_ms() + b->p.cancel_quarantine_ms;
                if (until < r->deadline_ms) r->deadline_ms = until;
            }
        } else if (r) {
            speed_batcher_req_finish(b, r, SPEED_BATCH_CANCELLED, SPEED_ERR_CANCELLED);
        }
        break;
    case CMD_RELEASE:
        r = req_find(b, c->id);
        if (r && r->state == REQ_HELD) {
            speed_batcher_engine_remove(b, r);
            speed_batcher_req_unlink_free(b, r);
        } else if (r) {
            r->hold_kv = false; /* still running: free at its finish */
        }
        break;
    }
    if (c->heap) {
        speed_free(c);
        return;
    }
    pthread_mutex_lock(&b->mu);
    c->status = st;
    c->done = true;
    pthread_cond_broadcast(&b->done_cv);
    pthread_mutex_unlock(&b->mu);
}

static void expire_leases(speed_batcher_t *b) {
    int64_t now = speed_clock_mono_ms();
    req_t *r = b->reqs;
    while (r) {
        req_t *next = r->next;
        if ((r->state == REQ_RESERVED || r->state == REQ_HELD) && now >= r->deadline_ms) {
            SPEED_INFO(SPEED_SUBSYS_ENGINE, "batcher: %s: lease ended, blocks freed", r->id);
            if (r->state == REQ_RESERVED)
                speed_batcher_req_finish(b, r, SPEED_BATCH_EXPIRED, SPEED_ERR_TIMEOUT);
            else {
                speed_batcher_engine_remove(b, r);
                speed_batcher_req_unlink_free(b, r);
            }
        }
        r = next;
    }
}

static void admit_waiting(speed_batcher_t *b) {
    /* oldest first: the list is newest first, so walk to the last waiting one each time */
    for (;;) {
        req_t *oldest = NULL;
        for (req_t *r = b->reqs; r; r = r->next)
            if (r->state == REQ_WAITING) oldest = r;
        if (!oldest) return;
        speed_status_t st = admit(b, oldest);
        if (st == SPEED_ERR_CAPACITY) return;
        if (st != SPEED_OK) speed_batcher_req_finish(b, oldest, SPEED_BATCH_ERROR, st);
    }
}

static void process_outputs(speed_batcher_t *b, const speed_engine_step_result_t *res) {
    for (int i = 0; i < res->n_outputs; i++) {
        req_t *r = req_by_seq(b, res->outputs[i].seq);
        if (!r || r->state != REQ_RUNNING) continue;
        if (r->layer_status != SPEED_OK) continue; /* ended below */
        speed_sample_t smp;
        speed_status_t st =
            speed_sampler_sample(b->sampler, &r->gen.sampling, &r->rng, res->outputs[i].logits, b->n_vocab, &smp);
        speed_batch_finish_t finish = SPEED_BATCH_RUNNING;
        if (st == SPEED_OK) st = speed_batcher_emit_token(b, r, &smp, smp.n_top, &finish);
        speed_batcher_after_token(b, r, st, finish, smp.id);
    }
    req_t *r = b->reqs;
    while (r) {
        req_t *next = r->next;
        if (r->layer_status != SPEED_OK) speed_batcher_req_finish(b, r, SPEED_BATCH_ERROR, r->layer_status);
        r = next;
    }
}

static void snapshot(speed_batcher_t *b) {
    pthread_mutex_lock(&b->mu);
    b->snap.n_submitted = b->counts.n_submitted;
    b->snap.n_finished = b->counts.n_finished;
    b->snap.n_expired = b->counts.n_expired;
    b->snap.n_cancelled = b->counts.n_cancelled;
    b->snap.n_errors = b->counts.n_errors;
    b->snap.n_prompt_tokens = b->counts.n_prompt_tokens;
    b->snap.n_generated_tokens = b->counts.n_generated_tokens;
    b->snap.running = count_state(b, REQ_RUNNING);
    b->snap.waiting = count_state(b, REQ_WAITING);
    b->snap.reserved = count_state(b, REQ_RESERVED);
    b->snap.held = count_state(b, REQ_HELD);
    b->snap.draining = b->draining;
    int64_t in_flight = 0;
    for (const req_t *r = b->reqs; r; r = r->next) {
        speed_engine_seq_stats_t ss;
        if (r->in_engine && (r->state == REQ_RUNNING || r->state == REQ_RESERVED) &&
            speed_engine_seq_stats(b->engine, r->seq, &ss) == SPEED_OK)
            in_flight += ss.n_prompt + ss.n_generated;
    }
    b->snap.tokens_in_flight = in_flight;
    speed_engine_stats_t es;
    speed_engine_stats(b->engine, &es);
    b->snap.kv = es.kv;
    b->snap.kv_live = es.live;
    b->snap.n_cached_tokens = es.n_cached_tokens;
    b->snap.prefix = es.prefix;
    pthread_mutex_unlock(&b->mu);
}

static void *engine_main(void *arg) {
    speed_batcher_t *b = arg;
    for (;;) {
        pthread_mutex_lock(&b->mu);
        while (!b->stopping && !b->q_head && !speed_engine_has_work(b->engine)) {
            /* wake at least every 100 ms for leases */
            struct timespec ts = speed_clock_deadline(CLOCK_REALTIME, 100);
            if (pthread_cond_timedwait(&b->wake, &b->mu, &ts) == ETIMEDOUT) break;
        }
        cmd_t *q = b->q_head;
        b->q_head = b->q_tail = NULL;
        bool stopping = b->stopping;
        pthread_mutex_unlock(&b->mu);

        while (q) {
            cmd_t *next = q->next;
            run_cmd(b, q);
            q = next;
        }
        if (stopping) break;
        expire_leases(b);
        admit_waiting(b);
        if (speed_engine_has_work(b->engine)) {
            speed_engine_step_result_t res;
            speed_status_t st = speed_engine_step(b->engine, &res);
            if (st != SPEED_OK) {
                SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: engine step failed: %s; ending the running requests",
                            speed_status_string(st));
                req_t *r = b->reqs;
                while (r) {
                    req_t *next = r->next;
                    if (r->state == REQ_RUNNING) speed_batcher_req_finish(b, r, SPEED_BATCH_ERROR, st);
                    r = next;
                }
            } else {
                if (b->p.on_step && res.n_seqs > 0) {
                    speed_batch_step_t step = {.seconds = (double)res.ns / 1e9,
                                               .n_seqs = res.n_seqs,
                                               .n_prefill_rows = res.n_prefill_rows,
                                               .n_decode_rows = res.n_decode_rows};
                    speed_engine_stats_t es;
                    speed_engine_stats(b->engine, &es);
                    step.prefix = es.prefix;
                    b->p.on_step(b->p.step_user, &step);
                }
                process_outputs(b, &res);
            }
        }
        snapshot(b);
    }
    /* shutdown: every live request ends */
    while (b->reqs) speed_batcher_req_finish(b, b->reqs, SPEED_BATCH_CANCELLED, SPEED_ERR_CANCELLED);
    snapshot(b);
    return NULL;
}

/* ---- public -------------------------------------------------------------------------------- */

speed_status_t speed_batcher_create(const speed_batcher_params_t *params, speed_batcher_t **batcher_p) {
    if (!params || !batcher_p || !params->backend || !params->model || params->lease_ms < 1 ||
        params->max_waiting < 0) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: missing backend/model or a parameter out of range");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_batcher_t *b = speed_calloc(1, sizeof *b);
    if (!b) return SPEED_ERR_NO_MEMORY;
    b->p = *params;
    b->p.engine.backend = params->backend;
    b->p.engine.model = params->model;
    b->p.engine.layer_cb = layer_hook;
    b->p.engine.layer_cb_user = b;
    speed_status_t st = speed_engine_create(&b->p.engine, &b->engine);
    if (st == SPEED_OK) {
        b->n_vocab = speed_engine_n_vocab(b->engine);
        st = speed_sampler_create(b->n_vocab, &b->sampler);
    }
    if (st != SPEED_OK) {
        speed_engine_destroy(b->engine);
        speed_free(b);
        return st;
    }
    if (params->tokenizer) {
        b->n_tok_vocab = speed_tok_vocab_size(params->tokenizer);
        b->n_eos = speed_tok_eos_ids(params->tokenizer, &b->eos_ids);
    }
    if (b->n_eos == 0) {
        b->eos_ids = params->model->config.eos_token_ids;
        b->n_eos = (size_t)params->model->config.n_eos;
    }
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->wake, NULL);
    pthread_cond_init(&b->done_cv, NULL);
    b->snap.max_running = b->p.engine.max_seqs;
    snapshot(b);
    if (pthread_create(&b->thread, NULL, engine_main, b) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: cannot start the engine thread");
        pthread_mutex_destroy(&b->mu);
        pthread_cond_destroy(&b->wake);
        pthread_cond_destroy(&b->done_cv);
        speed_sampler_destroy(b->sampler);
        speed_engine_destroy(b->engine);
        speed_free(b);
        return SPEED_ERR_INTERNAL;
    }
    b->thread_started = true;
    *batcher_p = b;
    return SPEED_OK;
}

void speed_batcher_destroy(speed_batcher_t *b) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    b->stopping = true;
    pthread_cond_signal(&b->wake);
    pthread_mutex_unlock(&b->mu);
    if (b->thread_started) pthread_join(b->thread, NULL);
    /* commands that raced with the stop: fail them */
    while (b->q_head) {
        cmd_t *c = b->q_head;
        b->q_head = c->next;
        if (c->heap) speed_free(c);
    }
    speed_sampler_destroy(b->sampler);
    speed_engine_destroy(b->engine);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->wake);
    pthread_cond_destroy(&b->done_cv);
    speed_free(b);
}

speed_depth_t speed_batcher_depth(const speed_batcher_t *b) { return speed_engine_depth(b->engine); }
int speed_batcher_max_context(const speed_batcher_t *b) { return speed_engine_max_context(b->engine); }
speed_kv_cache_t *speed_batcher_kv_cache(speed_batcher_t *b) { return speed_engine_kv_cache(b->engine); }

speed_status_t speed_batcher_submit(speed_batcher_t *b, const speed_batch_request_t *q) {
    if (!b || !q || !q->on_event) return SPEED_ERR_INVALID_ARGUMENT;
    if (!q->prompt || q->n_prompt < 1) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: empty prompt", q->request_id ? q->request_id : "?");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    for (int64_t i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= b->n_vocab) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: prompt token %lld is %d, outside the vocabulary [0, %d)",
                        (long long)i, q->prompt[i], b->n_vocab);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    if (q->gen.n_resume > 0 && (q->gen.n_resume >= q->n_prompt || !q->gen.resume_ids ||
                                memcmp(q->prompt + (q->n_prompt - q->gen.n_resume), q->gen.resume_ids,
                                       (size_t)q->gen.n_resume * sizeof *q->prompt) != 0)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: %s: the %lld resumed tokens must end a longer prompt",
                    q->request_id ? q->request_id : "?", (long long)q->gen.n_resume);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (q->n_prompt + q->gen.max_tokens - (q->gen.n_resume > 0 ? q->gen.n_resume : 0) >
        speed_engine_max_context(b->engine)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "batcher: prompt %lld + max_tokens %lld exceeds the context limit %d",
                    (long long)q->n_prompt, (long long)q->gen.max_tokens, speed_engine_max_context(b->engine));
        return SPEED_ERR_TOO_LONG;
    }
    req_t *r;
    speed_depth_t depth;
    SPEED_CHECK(depth_resolve(b, &q->depth, &depth));
    SPEED_CHECK(req_create(b, q->request_id, &r));
    r->depth = depth;
    speed_status_t st = req_prepare_gen(b, r, &q->gen);
    if (st == SPEED_OK) {
        r->prompt = speed_malloc((size_t)q->n_prompt * sizeof *r->prompt);
        if (!r->prompt) st = SPEED_ERR_NO_MEMORY;
    }
    if (st != SPEED_OK) {
        speed_batcher_req_free(r);
        return st;
    }
    memcpy(r->prompt, q->prompt, (size_t)q->n_prompt * sizeof *r->prompt);
    r->n_prompt = q->n_prompt;
    r->hold_kv = q->hold_kv;
    r->on_event = q->on_event;
    r->on_layer = q->on_layer;
    r->user = q->user;
    cmd_t c = {.kind = CMD_SUBMIT, .req = r};
    st = cmd_run(b, &c);
    speed_batcher_req_free(c.req); /* NULL when the batcher took it */
    return st;
}

speed_status_t speed_batcher_reserve(speed_batcher_t *b, const char *request_id, int64_t n_prompt, int64_t max_tokens,
                                     const speed_depth_request_t *depth, speed_batch_reservation_t *out_p) {
    if (!b || !out_p) return SPEED_ERR_INVALID_ARGUMENT;
    SPEED_CHECK(check_id(request_id));
    cmd_t c = {.kind = CMD_RESERVE, .n_prompt = n_prompt, .max_tokens = max_tokens, .reservation_p = out_p};
    SPEED_CHECK(depth_resolve(b, depth, &c.depth));
    strcpy(c.id, request_id);
    return cmd_run(b, &c);
}

static speed_status_t reserve_ids(speed_batcher_t *b, const char *request_id, const int32_t *ids, int64_t n_prompt,
                                  int64_t max_tokens, const speed_depth_request_t *depth, bool lookup,
                                  speed_batch_reservation_t *out_p) {
    if (!b || !out_p || !ids) return SPEED_ERR_INVALID_ARGUMENT;
    SPEED_CHECK(check_id(request_id));
    cmd_t c = {.kind = CMD_RESERVE,
               .n_prompt = n_prompt,
               .max_tokens = max_tokens,
               .ids = ids,
               .no_lookup = !lookup,
               .reservation_p = out_p};
    SPEED_CHECK(depth_resolve(b, depth, &c.depth));
    strcpy(c.id, request_id);
    return cmd_run(b, &c);
}

speed_status_t speed_batcher_reserve_ids(speed_batcher_t *b, const char *request_id, const int32_t *ids,
                                         int64_t n_prompt, int64_t max_tokens, const speed_depth_request_t *depth,
                                         speed_batch_reservation_t *out_p) {
    return reserve_ids(b, request_id, ids, n_prompt, max_tokens, depth, true, out_p);
}

speed_status_t speed_batcher_reserve_keep(speed_batcher_t *b, const char *request_id, const int32_t *ids,
                                          int64_t n_prompt, int64_t max_tokens, const speed_depth_request_t *depth,
                                          speed_batch_reservation_t *out_p) {
    return reserve_ids(b, request_id, ids, n_prompt, max_tokens, depth, false, out_p);
}

speed_status_t speed_batcher_with_kv(speed_batcher_t *b, const char *request_id, speed_batch_kv_fn_t fn, void *user) {
    if (!b || !fn) return SPEED_ERR_INVALID_ARGUMENT;
    SPEED_CHECK(check_id(request_id));
    cmd_t c = {.kind = CMD_WITH_KV, .fn = fn, .fn_user = user};
    strcpy(c.id, request_id);
    return cmd_run(b, &c);
}

speed_status_t speed_batcher_kv_ready(speed_batcher_t *b, const char *request_id) {
    if (!b) return SPEED_ERR_INVALID_ARGUMENT;
    SPEED_CHECK(check_id(request_id));
    cmd_t c = {.kind = CMD_KV_READY};
    strcpy(c.id, request_id);
    return cmd_run(b, &c);
}

speed_status_t speed_batcher_start(speed_batcher_t *b, const speed_batch_request_t *q, const speed_batch_token_t *first,
                                   bool kv_ready) {
    if (!b || !q || !first || !q->on_event) return SPEED_ERR_INVALID_ARGUMENT;
    req_t *r;
    speed_depth_t depth;
    SPEED_CHECK(depth_resolve(b, &q->depth, &depth));
    SPEED_CHECK(req_create(b, q->request_id, &r));
    r->depth = depth;
    speed_status_t st = req_prepare_gen(b, r, &q->gen);
    if (st != SPEED_OK) {
        speed_batcher_req_free(r);
        return st;
    }
    r->on_event = q->on_event;
    r->user = q->user;
    cmd_t c = {.kind = CMD_START, .req = r, .first = *first, .kv_ready = kv_ready};
    st = cmd_run(b, &c);
    speed_batcher_req_free(r); /* its state moved into the reservation (pointers cleared) or was refused */
    return st;
}

static speed_status_t async_cmd(speed_batcher_t *b, cmd_kind_t kind, const char *request_id) {
    if (!b) return SPEED_ERR_INVALID_ARGUMENT;
    SPEED_CHECK(check_id(request_id));
    pthread_mutex_lock(&b->mu);
    bool found = req_find(b, request_id) != NULL;
    pthread_mutex_unlock(&b->mu);
    if (!found) return SPEED_ERR_NOT_FOUND;
    cmd_t *c = speed_calloc(1, sizeof *c);
    if (!c) return SPEED_ERR_NO_MEMORY;
    c->kind = kind;
    c->heap = true;
    strcpy(c->id, request_id);
    speed_status_t st = cmd_run(b, c);
    if (st != SPEED_OK) speed_free(c);
    return st;
}

speed_status_t speed_batcher_cancel(speed_batcher_t *b, const char *request_id) {
    return async_cmd(b, CMD_CANCEL, request_id);
}

speed_status_t speed_batcher_kv_ready_post(speed_batcher_t *b, const char *request_id) {
    return async_cmd(b, CMD_KV_READY, request_id);
}

speed_status_t speed_batcher_release(speed_batcher_t *b, const char *request_id) {
    return async_cmd(b, CMD_RELEASE, request_id);
}

void speed_batcher_drain(speed_batcher_t *b) {
    if (!b) return;
    pthread_mutex_lock(&b->mu);
    b->draining = true;
    b->snap.draining = true;
    pthread_cond_signal(&b->wake);
    pthread_mutex_unlock(&b->mu);
}

bool speed_batcher_wait_idle(speed_batcher_t *b, int64_t timeout_ms) {
    struct timespec ts = speed_clock_deadline(CLOCK_REALTIME, timeout_ms);
    pthread_mutex_lock(&b->mu);
    while (b->n_reqs > 0)
        if (pthread_cond_timedwait(&b->done_cv, &b->mu, &ts) == ETIMEDOUT) break;
    bool idle = b->n_reqs == 0;
    pthread_mutex_unlock(&b->mu);
    return idle;
}

void speed_batcher_stats(speed_batcher_t *b, speed_batcher_stats_t *stats_p) {
    pthread_mutex_lock(&b->mu);
    *stats_p = b->snap;
    pthread_mutex_unlock(&b->mu);
}
