/* speed_batcher: one engine shared by the threads of a node daemon.
 *
 * A batcher owns a speed_engine, a sampler and one thread (the "engine thread") that runs
 * the continuous-batching loop: apply the commands other threads queued, step the engine,
 * sample every output, turn tokens into text and stop decisions, and report each token to
 * the request's event callback. It is what the decode node and the prefill node run; the
 * daemons add only the network around it (engine/ knows nothing of gRPC or HTTP).
 *
 * Requests, by id (a string unique among the batcher's live requests):
 *   submit    prompt ids in, tokens out: the engine prefills and decodes here (colocated
 *             node, the router's decode-only route, and the prefill node with max_tokens 1);
 *   reserve   decode side of a disaggregated prefill: KV blocks for n_prompt tokens are
 *             reserved at once and their addresses are reachable with speed_batcher_with_kv;
 *             the reservation holds until speed_batcher_start claims it or its lease ends;
 *   kv_ready  the prompt KV was written into the reserved blocks (by a transfer);
 *   start     the first token (sampled by the prefill node) arrives: decoding begins;
 *   cancel    ends a request in any state; its blocks are freed at once, except those of a
 *             reservation not started yet (the cancel fence): a prefill node's puts may still
 *             land in them, so they stay out of circulation until release (the prefill side
 *             said it stopped) or the lease ends (cancel_quarantine_ms, if shorter);
 *   release   frees the KV a finished request kept (hold_kv: the prefill node's puts read
 *             the blocks after the first token is out, until the transfer is flushed).
 * A request never leaks its blocks: finish, cancel, error, lease expiry and destroy all free
 * them; speed_batcher_stats().kv.usage.n_blocks shows any that are still held.
 *
 * Events. on_event is called on the engine thread, with no batcher lock held, once per
 * token (the first one included) and exactly once with finish != NONE, after which the
 * request is gone (the callback may then free `user`). A callback may call any speed_batcher
 * function except destroy; it must not block for long (the whole batch waits).
 *
 * Threading: every function is thread-safe. Calls that need the engine queue a command and
 * wait until the engine thread has carried it out, which takes at most one engine step
 * (a step is one decode token, or one prefill chunk); cancel and release do not wait.
 */
#ifndef SPEED_BATCHER_H
#define SPEED_BATCHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "kv_cache.h"
#include "sampler.h"
#include "status.h"
#include "stop.h"
#include "tokenizer.h"

#define SPEED_BATCH_ID_MAX 128 /* bytes of a request id, NUL excluded */

typedef enum {
    SPEED_BATCH_RUNNING = 0, /* not finished */
    SPEED_BATCH_STOP,        /* EOS or a stop string */
    SPEED_BATCH_LENGTH,      /* max_tokens reached */
    SPEED_BATCH_CANCELLED,   /* speed_batcher_cancel, or destroy */
    SPEED_BATCH_EXPIRED,     /* a reservation's lease ended before start */
    SPEED_BATCH_ERROR,       /* the engine failed; status says how */
} speed_batch_finish_t;

/* "running", "stop", "length", "cancelled", "expired", "error". */
const char *speed_batch_finish_name(speed_batch_finish_t finish);

typedef struct {
    int32_t id;
    float logprob; /* natural log, of the raw logits */
    int n_top;
    speed_token_logprob_t top[SPEED_SAMPLER_MAX_TOP_LOGPROBS];
    const char *text; /* text released with this token (stop strings hold text back and
                         * cut it); valid during the callback; "" without a tokenizer */
    size_t text_len;
} speed_batch_token_t;

typedef struct {
    int64_t n_prompt, n_generated;
    int64_t n_cached;           /* prompt tokens reused from the engine's prefix cache */
    speed_depth_t depth;        /* resolved */
    size_t kv_bytes;            /* KV entries stored (exact, cache dtype) */
    size_t kv_bytes_full_depth; /* the same tokens at full depth */
    double queue_ms;            /* submit/start until the engine took it */
    double prefill_ms;          /* engine steps with its prompt rows */
    double first_token_ms;      /* submit (or start) until the first token */
    double decode_ms;           /* engine steps with its generated rows */
} speed_batch_usage_t;

typedef struct {
    const char *request_id;
    const speed_batch_token_t *token; /* NULL on the finish event */
    bool first;                       /* token is the request's first output */
    speed_batch_finish_t finish;      /* RUNNING for a token event */
    speed_status_t status;            /* SPEED_OK unless finish is ERROR / EXPIRED / CANCELLED */
    const speed_batch_usage_t *usage; /* on the finish event */
} speed_batch_event_t;

typedef void (*speed_batch_event_cb_t)(void *user, const speed_batch_event_t *event);

/* Prefill nodes: called on the engine thread while a step runs (engine.h,
 * speed_engine_layer_cb_t), with the request's KV handle for block addresses. A non-OK
 * return ends the request with SPEED_BATCH_ERROR (the other sequences of the step go on). */
typedef speed_status_t (*speed_batch_layer_cb_t)(void *user, speed_kv_cache_t *cache, const speed_kv_seq_t *seq,
                                                 int layer, int64_t n_done, int64_t n_total);

/* A request's KV blocks are about to return to the free list (its finish, a cancel, its lease
 * end, a release): called on the batcher's thread, before the engine frees them. A decode node
 * revokes the request's transfer grant here, so that no KV write for it can land once the
 * blocks may belong to another request. Must not call the batcher. */
typedef void (*speed_batch_kv_free_cb_t)(void *user, const char *request_id);

/* One engine step, as the batcher saw it (for a node's step metrics). */
typedef struct {
    double seconds;                    /* wall time of the step */
    int n_seqs;                        /* sequences with rows in the step (the batch size) */
    int n_prefill_rows;                /* prompt tokens processed */
    int n_decode_rows;                 /* generated tokens processed */
    speed_prefix_cache_stats_t prefix; /* the engine's prefix cache so far (cumulative; zero when off):
                                        * its hits of this step's admissions are in it */
} speed_batch_step_t;

/* Called on the engine thread after every successful engine step, with no batcher lock held.
 * Must be cheap (the next step waits) and must not call the batcher. */
typedef void (*speed_batch_step_cb_t)(void *user, const speed_batch_step_t *step);

/* How a request generates (submit and start). */
typedef struct {
    speed_sampling_params_t sampling;
    int64_t max_tokens;      /* >= 1, counting the first token */
    const char *const *stop; /* [n_stop] stop strings (copied); need a tokenizer */
    size_t n_stop;
    bool ignore_eos;
    /* A migrated request (its decode node died mid-stream): the n_resume tokens it generated
     * before, in order (copied at submit/start). max_tokens still counts from the request's
     * first token, so these count against it (and in usage.n_generated); they are run through
     * the detokenizer and the stop matcher without being reported, so text held back for a
     * partial stop string comes out with the next token exactly as it would have; and the
     * request's generator skips the draws they took, so seeded sampling goes on with the
     * same random numbers. On submit they must be the last n_resume prompt ids (the prompt
     * keeps at least one other id). If they already end the request (EOS, a stop string,
     * max_tokens), no token is reported: only the finish event (STOP / LENGTH). */
    const int32_t *resume_ids;
    int64_t n_resume;
} speed_batch_gen_t;

typedef struct {
    const char *request_id; /* copied */
    const int32_t *prompt;  /* [n_prompt], copied */
    int64_t n_prompt;
    speed_depth_request_t depth; /* over the batcher's default (speed_depth_resolve); all
                                       * unset (zeros) = the default */
    speed_batch_gen_t gen;
    bool hold_kv;                    /* keep the KV after the finish event until release */
    speed_batch_event_cb_t on_event; /* required */
    speed_batch_layer_cb_t on_layer; /* optional */
    void *user;
} speed_batch_request_t;

typedef struct {
    speed_backend_t *backend;            /* borrowed */
    const speed_model_t *model;          /* borrowed */
    const speed_tok_t *tokenizer;        /* borrowed, optional: token text, EOS ids, stop strings */
    speed_engine_params_t engine;        /* backend/model/layer_cb are set by the batcher */
    int max_waiting;                     /* submitted requests queued while the engine is full
                                       * (0: submit fails with CAPACITY when full) */
    int64_t lease_ms;                    /* reservations (and held KV) live this long; default 30000 */
    int64_t cancel_quarantine_ms;        /* a cancelled reservation's blocks are reused only after
                                   * speed_batcher_release, its lease end, or this long if > 0
                                   * (tests); default 0: release or the lease. A prefill node's
                                   * puts already posted may still land in them. */
    speed_batch_kv_free_cb_t on_kv_free; /* optional */
    void *kv_free_user;
    speed_batch_step_cb_t on_step; /* optional */
    void *step_user;
} speed_batcher_params_t;

speed_batcher_params_t speed_batcher_default_params(void);

typedef struct speed_batcher speed_batcher_t;

/* Creates the engine and starts the engine thread.
 * Returns SPEED_OK, or what speed_engine_create / speed_sampler_create return, or
 * SPEED_ERR_INVALID_ARGUMENT (NULL pointers, lease_ms < 1, max_waiting < 0),
 * SPEED_ERR_INTERNAL (the thread could not start). */
speed_status_t speed_batcher_create(const speed_batcher_params_t *params, speed_batcher_t **batcher_p);

/* Stops the thread; every live request gets its finish event (CANCELLED) first, and every
 * block is freed. NULL is a no-op. Not from an event callback. */
void speed_batcher_destroy(speed_batcher_t *batcher);

/* The resolved default depth, context limit, vocabulary and the engine's KV cache (for
 * registering its pools with a transport; the cache lives as long as the batcher). */
speed_depth_t speed_batcher_depth(const speed_batcher_t *batcher);
int speed_batcher_max_context(const speed_batcher_t *batcher);
speed_kv_cache_t *speed_batcher_kv_cache(speed_batcher_t *batcher);

/* Queues a request that prefills here.
 * Returns SPEED_OK (events follow), SPEED_ERR_INVALID_ARGUMENT (bad id, duplicate id,
 * empty prompt, ids outside the vocabulary, bad sampling or stop parameters, depth out of
 * range), SPEED_ERR_TOO_LONG (prompt + max_tokens over the context limit), SPEED_ERR_CAPACITY
 * (engine full and max_waiting requests already waiting; retryable), SPEED_ERR_CANCELLED
 * (the batcher is draining or shutting down), SPEED_ERR_NO_MEMORY. On error no event is sent. */
speed_status_t speed_batcher_submit(speed_batcher_t *batcher, const speed_batch_request_t *request);

typedef struct {
    speed_depth_t depth; /* resolved */
    int64_t lease_ms;    /* the reservation lives this long from now (this host's
                                * monotonic clock): a duration, never a wall-clock time */
    size_t kv_bytes;     /* bytes the prompt KV takes (the transfer's total); with n_cached > 0
                          * only the units past the cached positions (engine.h,
                          * speed_engine_seq_reserve_cached) */
    int64_t n_cached;    /* prompt positions the prefix cache filled (speed_batcher_reserve_ids) */
} speed_batch_reservation_t;

/* Reserves KV for a request whose prompt KV arrives from elsewhere (n_prompt tokens, up to
 * max_tokens generated, at depth over the batcher's default; NULL = the default). Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT,
 * SPEED_ERR_TOO_LONG, SPEED_ERR_CAPACITY (no blocks: try another node), SPEED_ERR_CANCELLED
 * (draining), SPEED_ERR_NO_MEMORY. */
speed_status_t speed_batcher_reserve(speed_batcher_t *batcher, const char *request_id, int64_t n_prompt,
                                     int64_t max_tokens, const speed_depth_request_t *depth,
                                     speed_batch_reservation_t *out_p);

/* speed_batcher_reserve with the prompt's ids (n_prompt of them, read during the call): the
 * engine's prefix cache may fill the first out_p->n_cached positions
 * (speed_engine_seq_reserve_cached), and only the units past them must arrive; the request is
 * cached when it ends, like a submitted one. Same returns as speed_batcher_reserve (an id
 * outside the vocabulary: SPEED_ERR_INVALID_ARGUMENT). */
speed_status_t speed_batcher_reserve_ids(speed_batcher_t *batcher, const char *request_id, const int32_t *ids,
                                         int64_t n_prompt, int64_t max_tokens, const speed_depth_request_t *depth,
                                         speed_batch_reservation_t *out_p);

/* speed_batcher_reserve with the prompt's ids, kept (not looked up): the whole prompt's KV must
 * arrive (n_cached 0), and the request is cached when it ends (speed_engine_seq_reserve_keep):
 * for a decode node whose prefill nodes push every unit. Same returns as
 * speed_batcher_reserve_ids. */
speed_status_t speed_batcher_reserve_keep(speed_batcher_t *batcher, const char *request_id, const int32_t *ids,
                                          int64_t n_prompt, int64_t max_tokens, const speed_depth_request_t *depth,
                                          speed_batch_reservation_t *out_p);

/* Runs fn(user, cache, seq) on the engine thread with the request's KV handle (reserved or
 * running requests, and held KV). Returns fn's status, or SPEED_ERR_NOT_FOUND. */
typedef speed_status_t (*speed_batch_kv_fn_t)(void *user, speed_kv_cache_t *cache, const speed_kv_seq_t *seq);
speed_status_t speed_batcher_with_kv(speed_batcher_t *batcher, const char *request_id, speed_batch_kv_fn_t fn,
                                     void *user);

/* The reserved request's prompt KV is in its blocks. Returns SPEED_OK, SPEED_ERR_NOT_FOUND,
 * SPEED_ERR_INVALID_ARGUMENT (not a reservation awaiting KV). */
speed_status_t speed_batcher_kv_ready(speed_batcher_t *batcher, const char *request_id);

/* The same, queued without waiting (for callbacks that must not block, e.g. a transfer's notify
 * callback on its progress thread). Commands run in the order they were queued, so a start
 * queued after this one sees the KV ready. Returns SPEED_OK (queued), SPEED_ERR_NOT_FOUND
 * (checked at once), SPEED_ERR_NO_MEMORY, SPEED_ERR_CANCELLED (shutting down). */
speed_status_t speed_batcher_kv_ready_post(speed_batcher_t *batcher, const char *request_id);

/* Starts decoding a reserved request from its first token (already sampled elsewhere, with
 * the request's first random draw, which the generator here then skips; it is reported
 * again as the first token event, with its text). With gen.n_resume the first token is the
 * one after the resumed ones (and the reservation's prompt ended with them). kv_ready is implied when
 * kv_ready is true here. request->prompt is ignored; request_id names the reservation.
 * Returns SPEED_OK, SPEED_ERR_NOT_FOUND (no such reservation: expired or never made),
 * SPEED_ERR_INVALID_ARGUMENT (already started, bad parameters, token outside the vocabulary). */
speed_status_t speed_batcher_start(speed_batcher_t *batcher, const speed_batch_request_t *request,
                                   const speed_batch_token_t *first_token, bool kv_ready);

/* Ends a request (finish event CANCELLED if it has not finished) and frees its blocks; also
 * drops held KV. Does not wait. Returns SPEED_OK or SPEED_ERR_NOT_FOUND (checked at once). */
speed_status_t speed_batcher_cancel(speed_batcher_t *batcher, const char *request_id);

/* Frees the KV a finished hold_kv request kept, or the blocks of a cancelled reservation
 * (lifts the cancel fence: call it only when no more puts can land). Does not wait.
 * SPEED_OK or NOT_FOUND. */
speed_status_t speed_batcher_release(speed_batcher_t *batcher, const char *request_id);

/* Stops taking new work (submit/reserve return CANCELLED); running requests finish. */
void speed_batcher_drain(speed_batcher_t *batcher);

/* Waits until no request is alive or timeout_ms passes. Returns true when idle. */
bool speed_batcher_wait_idle(speed_batcher_t *batcher, int64_t timeout_ms);

typedef struct {
    int running;     /* requests in the engine (prefilling or decoding) */
    int waiting;     /* submitted, waiting for room in the engine */
    int reserved;    /* reservations not started yet */
    int held;        /* finished requests holding KV */
    int max_running; /* engine max_seqs */
    bool draining;
    uint64_t n_submitted, n_finished, n_expired, n_cancelled, n_errors;
    uint64_t n_prompt_tokens, n_generated_tokens;
    int64_t tokens_in_flight;          /* over running and reserved requests: prompt tokens + tokens
                                        * generated so far (the context each holds or will hold) */
    speed_kv_cache_stats_t kv;         /* its usage counts the prefix cache's entries too */
    speed_kv_usage_t kv_live;          /* the requests' blocks only (engine.h: live) */
    uint64_t n_cached_tokens;          /* prompt tokens reused from the prefix cache (engine.h) */
    speed_prefix_cache_stats_t prefix; /* the engine's prefix cache; zero when off */
} speed_batcher_stats_t;

/* A snapshot (taken by the engine thread after its last step, so it never waits). */
void speed_batcher_stats(speed_batcher_t *batcher, speed_batcher_stats_t *stats_p);

#endif /* SPEED_BATCHER_H */
