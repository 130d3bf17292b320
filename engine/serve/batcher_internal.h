/* Private to speed_serve (batcher.c, batcher_events.c); not an API.
 *
 * The batcher's requests, its command queue and the batcher itself. Locking as batcher.c
 * describes: `mu` guards the command queue, the request list, the stats snapshot and the
 * flags; everything else is the engine thread's.
 */
#ifndef SPEED_BATCHER_INTERNAL_H
#define SPEED_BATCHER_INTERNAL_H

#include <pthread.h>

#include "batcher.h"
#include "rng.h"


typedef enum { REQ_WAITING, REQ_RESERVED, REQ_RUNNING, REQ_HELD } req_state_t;

typedef struct req {
    char id[SPEED_BATCH_ID_MAX + 1];
    req_state_t state;
    bool in_engine;
    speed_seq_id_t seq;
    int32_t *prompt;
    int64_t n_prompt;
    speed_depth_t depth;
    speed_batch_gen_t gen;
    char **stop_strings; /* owned copies behind gen.stop */
    bool hold_kv, kv_ready, first_sent;
    speed_batch_event_cb_t on_event;
    speed_batch_layer_cb_t on_layer;
    void *user;
    speed_status_t layer_status; /* first failure of on_layer in the current step */
    speed_rng_t rng;
    int64_t n_resume;                   /* gen.n_resume: tokens generated before a migration */
    speed_batch_finish_t primed_finish; /* RUNNING, or how the resumed tokens already ended it */
    speed_stop_t *stop;
    speed_tok_stream_t *stream;
    int64_t deadline_ms; /* lease of a reservation or of held KV */
    uint64_t t_arrival_ns, t_engine_ns;
    char *text; /* scratch for one token's text */
    size_t text_cap;
    struct req *next;
} req_t;

typedef enum { CMD_SUBMIT, CMD_RESERVE, CMD_WITH_KV, CMD_KV_READY, CMD_START, CMD_CANCEL, CMD_RELEASE } cmd_kind_t;

typedef struct cmd {
    cmd_kind_t kind;
    char id[SPEED_BATCH_ID_MAX + 1];
    req_t *req;                   /* SUBMIT, START: prepared by the caller */
    int64_t n_prompt, max_tokens; /* RESERVE */
    const int32_t *ids;           /* RESERVE: the prompt's ids (prefix cache), or NULL; the caller's, it waits */
    bool no_lookup;               /* RESERVE with ids: keep them for the cache, reuse nothing (reserve_keep) */
    speed_depth_t depth;
    speed_batch_reservation_t *reservation_p;
    speed_batch_kv_fn_t fn; /* WITH_KV */
    void *fn_user;
    speed_batch_token_t first; /* START */
    bool kv_ready;
    bool heap; /* async: freed by the engine thread */
    bool done;
    speed_status_t status;
    struct cmd *next;
} cmd_t;

struct speed_batcher {
    speed_batcher_params_t p;
    speed_engine_t *engine;
    speed_sampler_t *sampler;
    int32_t n_vocab, n_tok_vocab;
    const int32_t *eos_ids;
    size_t n_eos;

    pthread_mutex_t mu;
    pthread_cond_t wake;    /* engine thread: commands or stop */
    pthread_cond_t done_cv; /* callers: a sync command is done; idle */
    pthread_t thread;
    bool thread_started, stopping, draining;
    cmd_t *q_head, *q_tail;
    req_t *reqs; /* every live request */
    int n_reqs;
    speed_batcher_stats_t counts; /* engine thread only: the counters, copied by snapshot() */
    speed_batcher_stats_t snap;
};

/* The batcher whose event callback is running on this thread, if any: such a callback may
 * only cancel and release (batcher.c refuses the other commands). */
extern _Thread_local const speed_batcher_t *speed_batcher_tls_engine_thread_of;

/* ---- batcher.c ----------------------------------------------------------------------- */

/* Frees a request that is in no list (NULL is a no-op). */
void speed_batcher_req_free(req_t *r);

/* ---- batcher_events.c: engine thread ------------------------------------------------- */

/* Unlinks r (under mu) and frees it. */
void speed_batcher_req_unlink_free(speed_batcher_t *b, req_t *r);
/* Removes r's sequence from the engine, if it is there (its blocks go back to the pool). */
void speed_batcher_engine_remove(speed_batcher_t *b, req_t *r);
/* Ends r: finish event (if it has a callback and has not finished), then frees it, or keeps
 * its KV when hold_kv and the request completed normally. */
void speed_batcher_req_finish(speed_batcher_t *b, req_t *r, speed_batch_finish_t finish, speed_status_t status);
/* Reports one generated token; on return *finish_p says whether the request is done.
 * Returns SPEED_OK, or the detokenizer's / stop matcher's error, or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_batcher_emit_token(speed_batcher_t *b, req_t *r, const speed_sample_t *smp, int n_top,
                                        speed_batch_finish_t *finish_p);
/* After a token: finish r (st is an error, or finish says it is done) or feed the token back
 * into the engine. */
void speed_batcher_after_token(speed_batcher_t *b, req_t *r, speed_status_t st, speed_batch_finish_t finish,
                               int32_t id);

#endif /* SPEED_BATCHER_INTERNAL_H */
