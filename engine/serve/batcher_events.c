/* What the engine thread reports for a request: each token (detokenized, through the stop
 * strings) and the one finish event with usage, after which the request is freed or, when it
 * holds its KV, kept until released. Runs on the engine thread; callbacks with no lock held.
 */
#include "batcher_internal.h"

#include <pthread.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"

static double ms_between(uint64_t a, uint64_t b) { return b > a ? (double)(b - a) / 1e6 : 0.0; }

static void fill_usage(speed_batcher_t *b, req_t *r, speed_batch_usage_t *u) {
    memset(u, 0, sizeof *u);
    u->n_prompt = r->n_prompt;
    u->depth = r->depth;
    u->queue_ms = ms_between(r->t_arrival_ns, r->t_engine_ns ? r->t_engine_ns : r->t_arrival_ns);
    speed_engine_seq_stats_t st;
    if (r->in_engine && speed_engine_seq_stats(b->engine, r->seq, &st) == SPEED_OK) {
        u->n_prompt = st.n_prompt;
        u->n_generated = r->stop ? speed_stop_n_tokens(r->stop) : st.n_generated;
        u->depth = st.depth;
        u->kv_bytes = st.kv_bytes_used;
        u->kv_bytes_full_depth = st.kv_bytes_full_depth;
        u->n_cached = st.n_cached;
        u->prefill_ms = (double)st.prefill_ns / 1e6;
        u->decode_ms = (double)st.decode_ns / 1e6;
        u->first_token_ms = st.first_output_ns ? (double)st.first_output_ns / 1e6 : 0.0;
    } else if (r->stop) {
        u->n_generated = speed_stop_n_tokens(r->stop);
    }
}

/* Unlinks r (under mu) and frees it. */
void speed_batcher_req_unlink_free(speed_batcher_t *b, req_t *r) {
    pthread_mutex_lock(&b->mu);
    for (req_t **pp = &b->reqs; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            b->n_reqs--;
            break;
        }
    if (b->n_reqs == 0) pthread_cond_broadcast(&b->done_cv);
    pthread_mutex_unlock(&b->mu);
    speed_batcher_req_free(r);
}

void speed_batcher_engine_remove(speed_batcher_t *b, req_t *r) {
    if (r->in_engine) {
        /* first: once the hook returns, nothing may write these blocks for r any more */
        if (b->p.on_kv_free) b->p.on_kv_free(b->p.kv_free_user, r->id);
        speed_engine_seq_remove(b->engine, r->seq);
        r->in_engine = false;
    }
}

/* Ends r: finish event (if it has a callback and has not finished), then frees it, or keeps
 * its KV when hold_kv and the request completed normally. */
void speed_batcher_req_finish(speed_batcher_t *b, req_t *r, speed_batch_finish_t finish, speed_status_t status) {
    speed_batch_usage_t usage;
    fill_usage(b, r, &usage);
    bool keep = r->hold_kv && r->in_engine && (finish == SPEED_BATCH_STOP || finish == SPEED_BATCH_LENGTH);
    if (!keep) speed_batcher_engine_remove(b, r);
    if (finish == SPEED_BATCH_CANCELLED)
        b->counts.n_cancelled++;
    else if (finish == SPEED_BATCH_EXPIRED)
        b->counts.n_expired++;
    else if (finish == SPEED_BATCH_ERROR)
        b->counts.n_errors++;
    else
        b->counts.n_finished++;
    b->counts.n_generated_tokens += (uint64_t)usage.n_generated;
    if (r->on_event) {
        speed_batch_event_t ev = {.request_id = r->id, .finish = finish, .status = status, .usage = &usage};
        speed_batch_event_cb_t cb = r->on_event;
        r->on_event = NULL; /* exactly once */
        speed_batcher_tls_engine_thread_of = b;
        cb(r->user, &ev);
        speed_batcher_tls_engine_thread_of = NULL;
    }
    if (keep) {
        r->state = REQ_HELD;
        r->deadline_ms = speed_clock_mono_ms() + b->p.lease_ms;
        return;
    }
    speed_batcher_req_unlink_free(b, r);
}

static bool text_reserve(req_t *r, size_t n) {
    if (n <= r->text_cap) return true;
    size_t cap = r->text_cap ? r->text_cap : 64;
    while (cap < n) cap *= 2;
    char *t = speed_realloc(r->text, cap);
    if (!t) return false;
    r->text = t;
    r->text_cap = cap;
    return true;
}

/* Reports one generated token; on return *finish_p says whether the request is done. */
speed_status_t speed_batcher_emit_token(speed_batcher_t *b, req_t *r, const speed_sample_t *smp, int n_top,
                                        speed_batch_finish_t *finish_p) {
    const char *piece = "";
    size_t piece_len = 0;
    if (r->stream && smp->id < b->n_tok_vocab)
        SPEED_CHECK(speed_tok_stream_push(r->stream, smp->id, &piece, &piece_len));
    speed_stop_result_t sr;
    SPEED_CHECK(speed_stop_push(r->stop, smp->id, piece, piece_len, &sr));
    size_t len = 0;
    if (!text_reserve(r, sr.len + 1)) return SPEED_ERR_NO_MEMORY;
    memcpy(r->text, sr.text, sr.len);
    len = sr.len;
    speed_batch_finish_t finish = SPEED_BATCH_RUNNING;
    if (sr.finish != SPEED_FINISH_NONE) {
        const char *tail = "";
        size_t tail_len = 0;
        if (r->stream) SPEED_CHECK(speed_tok_stream_flush(r->stream, &tail, &tail_len));
        SPEED_CHECK(speed_stop_finish(r->stop, tail, tail_len, &sr));
        if (!text_reserve(r, len + sr.len + 1)) return SPEED_ERR_NO_MEMORY;
        memcpy(r->text + len, sr.text, sr.len);
        len += sr.len;
        finish = sr.finish == SPEED_FINISH_LENGTH ? SPEED_BATCH_LENGTH : SPEED_BATCH_STOP;
    }
    r->text[len] = '\0';
    speed_batch_token_t tok = {
        .id = smp->id, .logprob = smp->logprob, .n_top = n_top, .text = r->text, .text_len = len};
    memcpy(tok.top, smp->top, sizeof tok.top);
    speed_batch_event_t ev = {
        .request_id = r->id, .token = &tok, .first = !r->first_sent, .finish = SPEED_BATCH_RUNNING};
    r->first_sent = true;
    if (r->on_event) {
        speed_batcher_tls_engine_thread_of = b;
        r->on_event(r->user, &ev);
        speed_batcher_tls_engine_thread_of = NULL;
    }
    *finish_p = finish;
    return SPEED_OK;
}

/* After a token: finish or feed it back. */
void speed_batcher_after_token(speed_batcher_t *b, req_t *r, speed_status_t st, speed_batch_finish_t finish,
                               int32_t id) {
    if (st != SPEED_OK) {
        speed_batcher_req_finish(b, r, SPEED_BATCH_ERROR, st);
        return;
    }
    if (finish != SPEED_BATCH_RUNNING) {
        speed_batcher_req_finish(b, r, finish, SPEED_OK);
        return;
    }
    st = speed_engine_seq_append(b->engine, r->seq, id);
    if (st != SPEED_OK) speed_batcher_req_finish(b, r, SPEED_BATCH_ERROR, st);
}
