/* speedctl loadgen's run (loadgen.h): who sends what when.
 *
 * Threads. The calling thread is the clock: in open loop it walks the arrival schedule and hands
 * each job to an idle request thread (creating one while fewer than max_in_flight exist; when all
 * are busy the arrival is dropped and counted, so memory never grows with the backlog); in closed
 * loop `concurrency` request threads take jobs back to back and the calling thread only watches
 * the time. Either way it prints the progress line, and when sending is over (the request count
 * reached, the trace exhausted, or --duration passed) it waits up to drain_s for the requests in
 * flight, then cuts the rest off (their sockets are shut down) and joins every thread.
 *
 * Multi-turn (conversations > 0): a request thread takes a whole conversation and plays its turns
 * in order; each turn sends the shared system prompt, every earlier turn (the user's words and the
 * server's answers) and the new user message, then waits the think time.
 *
 * Locking: run_t.mu guards the workload, the job queue, the counters and the results; a worker's
 * cancel is reset and fired under it, so a cut-off never misses a request that is starting. */
#include "loadgen.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"

typedef struct run run_t;

typedef struct {
    run_t *run;
    pthread_t th;
    speed_lg_cancel_t cancel;
    bool started;
} worker_t;

struct run {
    const speed_lg_run_params_t *p;
    pthread_mutex_t mu;
    pthread_cond_t cv_job;  /* workers wait for a job (open loop) */
    pthread_cond_t cv_done; /* the clock thread waits for results */
    speed_lg_workload_t wl;
    bool open;
    speed_lg_job_t *queue; /* ring of max_workers jobs handed out but not yet taken */
    size_t q_head, q_len;
    worker_t *workers;
    size_t n_workers, max_workers, n_idle, n_busy, n_exited;
    bool closing;    /* no more jobs: idle workers exit */
    bool cutting;    /* the drain is over: whatever is still running is cut off */
    int64_t started; /* jobs (or conversations) taken */
    int64_t arrivals, dropped;
    speed_lg_result_t *res;
    size_t n_res, cap_res;
    double t0, t_stop;   /* t_stop: when sending ends (closed loop with a duration), else 0 */
    char *system_prompt; /* multi-turn */
    bool oom;
};

static double now_rel(const run_t *r) { return speed_clock_mono_s() - r->t0; }

static void result_add(run_t *r, speed_lg_result_t *res) {
    if (r->n_res == r->cap_res) {
        size_t c = r->cap_res ? r->cap_res * 2 : 256;
        speed_lg_result_t *g = speed_realloc(r->res, c * sizeof *g);
        if (!g) {
            r->oom = true;
            speed_lg_result_cleanup(res);
            return;
        }
        r->res = g;
        r->cap_res = c;
    }
    r->res[r->n_res++] = *res;
}

static void result_start(speed_lg_result_t *res, const speed_lg_job_t *job) {
    memset(res, 0, sizeof *res);
    res->index = job->index;
    res->conversation = res->turn = -1;
    res->t_sched = job->arrival_s;
    res->t_first = -1;
    res->prompt_tokens_req = job->prompt_tokens;
    res->output_tokens_req = job->output_tokens;
    res->prompt_tokens = res->output_tokens = res->kv_bytes = -1;
    res->prefill_layers = job->prefill_layers;
}

static void result_error(speed_lg_result_t *res, double t, const char *type, const char *detail) {
    res->outcome = SPEED_LG_ERROR;
    res->t_send = res->t_end = t;
    snprintf(res->error, sizeof res->error, "%s", type);
    snprintf(res->detail, sizeof res->detail, "%s", detail);
}

/* One request of a job (messages: the conversation so far, or NULL). */
static void job_run(run_t *r, worker_t *w, const speed_lg_job_t *job, json_t *messages, bool keep_text,
                    speed_lg_result_t *res) {
    const speed_lg_run_params_t *p = r->p;
    char err[256] = "";
    char *prompt = NULL, *body = NULL;
    int64_t n_exact = -1;
    if (speed_lg_prompt_make(p->prompter, job->prompt_tokens, job->prompt_seed, &prompt, &n_exact, err, sizeof err) !=
        SPEED_OK) {
        result_error(res, now_rel(r), "prompt", err);
        return;
    }
    json_t *msgs = NULL;
    if (messages) {
        msgs = json_copy(messages);
        json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content", prompt));
    }
    if (speed_lg_body_make(p->target, prompt, msgs, job->output_tokens, job->prefill_layers, &body) != SPEED_OK) {
        result_error(res, now_rel(r), "no_memory", "building the request body");
    } else {
        speed_lg_request_run(p->target, body, strlen(body), r->t0, &w->cancel, keep_text, res);
        if (!r->open) res->t_sched = res->t_send;
    }
    if (messages && res->outcome == SPEED_LG_OK) {
        /* the conversation goes on with this turn's question and answer */
        json_array_append_new(messages, json_pack("{s:s,s:s}", "role", "user", "content", prompt));
        json_array_append_new(messages,
                              json_pack("{s:s,s:s}", "role", "assistant", "content", res->text ? res->text : ""));
    }
    json_decref(msgs);
    free(body);
    speed_free(prompt);
}

/* Takes the next job under r->mu (closed loop): false when sending is over. */
static bool closed_next(run_t *r, speed_lg_job_t *job) {
    const speed_lg_run_params_t *p = r->p;
    if (r->closing || r->cutting) return false;
    if (p->duration_s > 0 && now_rel(r) >= p->duration_s) return false;
    int64_t limit = p->conversations > 0 ? p->conversations : p->requests;
    if (limit > 0 && r->started >= limit) return false;
    if (!speed_lg_workload_next(&r->wl, job)) return false;
    r->started++;
    r->arrivals++;
    return true;
}

static void conversation_run(run_t *r, worker_t *w, const speed_lg_job_t *first) {
    const speed_lg_run_params_t *p = r->p;
    json_t *messages = json_array();
    if (messages && r->system_prompt)
        json_array_append_new(messages, json_pack("{s:s,s:s}", "role", "system", "content", r->system_prompt));
    speed_lg_rng_t think;
    speed_lg_rng_seed(&think, first->prompt_seed, 7);
    for (int64_t turn = 0; turn < p->turns; turn++) {
        speed_lg_job_t job = *first;
        if (turn > 0) {
            /* a turn's lengths: from the same distributions, drawn on the conversation's stream */
            speed_lg_rng_t lr;
            speed_lg_rng_seed(&lr, first->prompt_seed, (uint64_t)turn + 100);
            job.prompt_tokens = speed_lg_dist_sample(&p->workload.prompt, &lr, p->workload.max_tokens_clamp);
            job.output_tokens = speed_lg_dist_sample(&p->workload.output, &lr, p->workload.max_tokens_clamp);
            job.prompt_seed = first->prompt_seed * 31 + (uint64_t)turn;
        }
        speed_lg_result_t res;
        result_start(&res, &job);
        res.conversation = first->index;
        res.turn = turn;
        pthread_mutex_lock(&r->mu);
        bool go = !r->cutting && messages;
        if (go) speed_lg_cancel_reset(&w->cancel);
        pthread_mutex_unlock(&r->mu);
        if (!go) {
            if (!messages)
                result_error(&res, now_rel(r), "no_memory", "a conversation");
            else {
                res.outcome = SPEED_LG_CUT_OFF;
                res.t_send = res.t_end = now_rel(r);
                snprintf(res.error, sizeof res.error, "cut_off");
            }
        } else {
            job_run(r, w, &job, messages, true, &res);
        }
        speed_lg_outcome_t outcome = res.outcome;
        speed_free(res.text);
        res.text = NULL;
        pthread_mutex_lock(&r->mu);
        result_add(r, &res);
        pthread_cond_broadcast(&r->cv_done);
        bool stop = r->cutting || r->closing;
        pthread_mutex_unlock(&r->mu);
        if (outcome != SPEED_LG_OK || stop || turn + 1 == p->turns) break;
        double ms = p->think ? (double)speed_lg_dist_sample(&p->think_ms, &think, 1 << 30) : 0;
        /* wait the think time, but not past a cut-off or the run's end */
        double until = speed_clock_mono_s() + ms / 1000.0;
        pthread_mutex_lock(&r->mu);
        while (!r->cutting && !r->closing && speed_clock_mono_s() < until) {
            struct timespec dl =
                speed_clock_deadline(CLOCK_MONOTONIC, (int64_t)((until - speed_clock_mono_s()) * 1000) + 1);
            pthread_cond_timedwait(&r->cv_job, &r->mu, &dl);
        }
        stop = r->cutting || r->closing;
        pthread_mutex_unlock(&r->mu);
        if (stop) break;
    }
    json_decref(messages);
}

static void *worker_main(void *arg) {
    worker_t *w = arg;
    run_t *r = w->run;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        speed_lg_job_t job;
        if (r->open) {
            while (r->q_len == 0 && !r->closing) {
                r->n_idle++;
                pthread_cond_wait(&r->cv_job, &r->mu);
                r->n_idle--;
            }
            if (r->q_len == 0) break;
            job = r->queue[r->q_head];
            r->q_head = (r->q_head + 1) % r->max_workers;
            r->q_len--;
        } else if (!closed_next(r, &job)) {
            break;
        }
        r->n_busy++;
        if (r->p->conversations > 0) {
            pthread_mutex_unlock(&r->mu);
            conversation_run(r, w, &job);
            pthread_mutex_lock(&r->mu);
        } else {
            speed_lg_result_t res;
            result_start(&res, &job);
            if (r->cutting) {
                res.outcome = SPEED_LG_CUT_OFF;
                res.t_send = res.t_end = now_rel(r);
                snprintf(res.error, sizeof res.error, "cut_off");
            } else {
                speed_lg_cancel_reset(&w->cancel);
                pthread_mutex_unlock(&r->mu);
                job_run(r, w, &job, NULL, false, &res);
                pthread_mutex_lock(&r->mu);
            }
            result_add(r, &res);
        }
        r->n_busy--;
        pthread_cond_broadcast(&r->cv_done);
    }
    r->n_exited++;
    pthread_cond_broadcast(&r->cv_done);
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* Under r->mu. False when the thread could not be made. */
static bool worker_add(run_t *r, char *err, size_t err_size) {
    worker_t *w = &r->workers[r->n_workers];
    w->run = r;
    speed_lg_cancel_init(&w->cancel);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 << 10); /* a request needs little; many may run */
    int rc = pthread_create(&w->th, &attr, worker_main, w);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        speed_lg_cancel_cleanup(&w->cancel);
        snprintf(err, err_size, "cannot start a request thread: %s", strerror(rc));
        return false;
    }
    w->started = true;
    r->n_workers++;
    return true;
}

static void progress_print(run_t *r, bool final) {
    const speed_lg_run_params_t *p = r->p;
    if (!p->progress) return;
    size_t ok = 0, bad = 0;
    for (size_t i = 0; i < r->n_res; i++) {
        if (r->res[i].outcome == SPEED_LG_OK)
            ok++;
        else
            bad++;
    }
    double t = now_rel(r);
    int64_t limit = p->conversations > 0 ? p->conversations * p->turns : p->requests;
    char total[32] = "";
    if (limit > 0) snprintf(total, sizeof total, "/%lld", (long long)limit);
    fprintf(stderr, "%s[%6.1fs] %lld%s sent, %zu ok, %zu failed, %zu in flight, %lld dropped, %.1f req/s%s",
            p->progress_tty ? "\r\033[K" : "", t, (long long)(p->conversations > 0 ? (int64_t)r->n_res : r->arrivals),
            total, ok, bad, r->n_busy, (long long)r->dropped, t > 0 ? (double)ok / t : 0.0,
            p->progress_tty && !final ? "" : "\n");
    fflush(stderr);
}

/* Waits on cv_done up to `until` (seconds, relative) or while cond holds; prints progress every
 * half second. Under r->mu. */
static void wait_until(run_t *r, double until, bool (*busy)(const run_t *)) {
    double last = now_rel(r);
    while (busy(r)) {
        double t = now_rel(r);
        if (until >= 0 && t >= until) return;
        if (t - last >= (r->p->progress_tty ? 0.5 : 2.0)) {
            progress_print(r, false);
            last = t;
        }
        double wait = 0.1;
        if (until >= 0 && until - t < wait) wait = until - t;
        struct timespec dl = speed_clock_deadline(CLOCK_MONOTONIC, (int64_t)(wait * 1000) + 1);
        pthread_cond_timedwait(&r->cv_done, &r->mu, &dl);
    }
}

static bool always(const run_t *r) {
    (void)r;
    return true;
}
static bool requests_running(const run_t *r) { return r->n_busy > 0 || r->q_len > 0; }
static bool workers_running(const run_t *r) { return r->n_exited < r->n_workers; }

/* Open loop: walks the schedule. Under r->mu. */
static speed_status_t open_dispatch(run_t *r, char *err, size_t err_size) {
    const speed_lg_run_params_t *p = r->p;
    for (;;) {
        if (p->requests > 0 && r->arrivals >= p->requests) break;
        speed_lg_job_t job;
        if (!speed_lg_workload_next(&r->wl, &job)) break;
        if (p->duration_s > 0 && job.arrival_s >= p->duration_s) break;
        wait_until(r, job.arrival_s, always);
        r->arrivals++;
        if (r->n_idle > r->q_len || (r->n_workers < r->max_workers && worker_add(r, err, err_size))) {
            r->queue[(r->q_head + r->q_len) % r->max_workers] = job;
            r->q_len++;
            pthread_cond_signal(&r->cv_job);
        } else if (r->n_workers < r->max_workers) {
            return SPEED_ERR_NO_MEMORY; /* no thread: err says why */
        } else {
            r->dropped++;
        }
    }
    return SPEED_OK;
}

speed_status_t speed_lg_run(const speed_lg_run_params_t *p, speed_lg_run_out_t *out, char *err, size_t err_size) {
    memset(out, 0, sizeof *out);
    run_t *r = speed_calloc(1, sizeof *r);
    if (!r) return SPEED_ERR_NO_MEMORY;
    r->p = p;
    r->open = p->concurrency <= 0 && p->conversations <= 0;
    r->max_workers = (size_t)(r->open ? p->max_in_flight : p->concurrency > 0 ? p->concurrency : p->conversations);
    if (r->max_workers < 1) r->max_workers = 1;
    pthread_mutex_init(&r->mu, NULL);
    speed_clock_cond_init(&r->cv_job);
    speed_clock_cond_init(&r->cv_done);
    speed_lg_workload_init(&r->wl, &p->workload);
    r->workers = speed_calloc(r->max_workers, sizeof *r->workers);
    r->queue = speed_calloc(r->max_workers, sizeof *r->queue);
    speed_status_t st = r->workers && r->queue ? SPEED_OK : SPEED_ERR_NO_MEMORY;
    if (st == SPEED_OK && p->conversations > 0 && p->system_tokens > 0) {
        int64_t n_exact;
        /* one system prompt shared by every conversation: the prefix a cache can reuse */
        speed_lg_prompter_t sys = *p->prompter;
        sys.chat = false;
        st = speed_lg_prompt_make(&sys, p->system_tokens, p->workload.seed ^ 0x5157ULL, &r->system_prompt, &n_exact,
                                  err, err_size);
    }
    if (st != SPEED_OK && !err[0]) snprintf(err, err_size, "out of memory");
    r->t0 = speed_clock_mono_s();
    pthread_mutex_lock(&r->mu);
    if (st == SPEED_OK) {
        if (r->open) {
            st = open_dispatch(r, err, err_size);
        } else {
            while (st == SPEED_OK && r->n_workers < r->max_workers)
                if (!worker_add(r, err, err_size)) st = SPEED_ERR_NO_MEMORY;
            wait_until(r, p->duration_s > 0 ? p->duration_s : -1, workers_running);
        }
    }
    /* sending is over: wait for what is in flight, then cut it off */
    r->closing = true;
    pthread_cond_broadcast(&r->cv_job);
    out->t_first_send = 0;
    double end = now_rel(r);
    /* open loop: a duration is a time window, even when the schedule ends before it */
    if (r->open && p->duration_s > 0 && end < p->duration_s && st == SPEED_OK) end = p->duration_s;
    double drain_end = end + (p->drain_s > 0 ? p->drain_s : 0);
    wait_until(r, drain_end, requests_running);
    r->cutting = true;
    for (size_t i = 0; i < r->n_workers; i++) speed_lg_cancel_fire(&r->workers[i].cancel);
    pthread_cond_broadcast(&r->cv_job);
    pthread_mutex_unlock(&r->mu);
    for (size_t i = 0; i < r->n_workers; i++) {
        pthread_join(r->workers[i].th, NULL);
        speed_lg_cancel_cleanup(&r->workers[i].cancel);
    }
    pthread_mutex_lock(&r->mu);
    progress_print(r, true);
    pthread_mutex_unlock(&r->mu);
    if (st == SPEED_OK && r->oom) {
        st = SPEED_ERR_NO_MEMORY;
        snprintf(err, err_size, "out of memory keeping the results");
    }
    out->results = r->res;
    out->n = r->n_res;
    out->requested = r->arrivals;
    if (p->conversations > 0) out->requested = p->conversations * p->turns;
    out->dropped = r->dropped;
    double first = -1, last = 0;
    for (size_t i = 0; i < r->n_res; i++) {
        const speed_lg_result_t *x = &r->res[i];
        if (x->outcome == SPEED_LG_CUT_OFF && x->t_send == x->t_end) continue; /* never sent */
        if (first < 0 || x->t_send < first) first = x->t_send;
        if (x->t_end > last) last = x->t_end;
    }
    out->t_first_send = first < 0 ? 0 : first;
    out->t_last_end = last;
    pthread_cond_destroy(&r->cv_job);
    pthread_cond_destroy(&r->cv_done);
    pthread_mutex_destroy(&r->mu);
    speed_free(r->workers);
    speed_free(r->queue);
    speed_free(r->system_prompt);
    speed_free(r);
    return st;
}

void speed_lg_run_out_cleanup(speed_lg_run_out_t *out) {
    for (size_t i = 0; i < out->n; i++) speed_lg_result_cleanup(&out->results[i]);
    speed_free(out->results);
    memset(out, 0, sizeof *out);
}
