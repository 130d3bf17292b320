/* The HTTP side of a request: writes to the client's stream, the one complete answer, errors
 * as an HTTP error or (once the stream has started) an SSE error event then [DONE], and the
 * bookkeeping done just before an answer completes (admission slot, requests_total). */
#include "request_internal.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"

/* Writes bytes to the stream (streaming responses). SPEED_ERR_CANCELLED when the client is
 * gone (the request is then cancelled). */
speed_status_t speed_router_req_write(rtr_req_t *r, const char *data, size_t len) {
    speed_status_t st = SPEED_ERR_CANCELLED;
    pthread_mutex_lock(&r->http_lock);
    if (r->stream) {
        st = speed_http_stream_write(r->stream, data, len);
        if (st == SPEED_OK) {
            r->committed = true;
            r->last_write_ms = speed_clock_mono_ms();
        } else if (st == SPEED_ERR_CANCELLED && !r->overrun_counted && speed_http_stream_is_overrun(r->stream)) {
            /* router.stream_buffer_bytes: the client stopped reading; cancelled below. */
            r->overrun_counted = true;
            speed_counter_inc(r->rt->m_overrun);
            speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, r->id,
                      "client is not reading (more than %lld bytes pending); cancelling",
                      (long long)r->rt->cfg->stream_buffer_bytes);
        }
    }
    pthread_mutex_unlock(&r->http_lock);
    if (st == SPEED_ERR_CANCELLED) {
        pthread_mutex_lock(&r->lock);
        r->client_gone = true;
        pthread_mutex_unlock(&r->lock);
        speed_router_req_cancel(r, SPEED_ERR_CANCELLED);
    }
    return st;
}

/* Counts the request in speed_router_requests_total, once, just before its answer is
 * complete: a client that has its answer finds it counted in /metrics. */
void speed_router_req_count(rtr_req_t *r) {
    if (r->counted) return;
    r->counted = true;
    pthread_mutex_lock(&r->lock);
    if (r->client_gone) r->http_status = 499;
    pthread_mutex_unlock(&r->lock);
    char status[8];
    snprintf(status, sizeof status, "%u", r->http_status);
    const char *values[] = {r->route_label, status};
    speed_counter_t *c = NULL;
    if (speed_counter_labels(r->rt->m_requests, values, &c) == SPEED_OK) speed_counter_inc(c);
}

/* Gives back the admission slot and the active count, once, just before the answer's last
 * bytes go out: a client that sends its next request as soon as it has the answer must find
 * the room this one held (else a strictly sequential client could get 429). */
void speed_router_req_release_slot(rtr_req_t *r) {
    if (atomic_exchange(&r->slot_released, true)) return;
    speed_router_t *rt = r->rt;
    if (r->admitted) speed_admission_release(rt->adm);
    pthread_mutex_lock(&rt->lock);
    rt->n_active--;
    pthread_mutex_unlock(&rt->lock);
}

/* Writes the final SSE bytes (an error event may precede): [DONE], after the slot is free. */
void speed_router_req_write_done(rtr_req_t *r) {
    speed_router_req_release_slot(r);
    size_t dlen = 0;
    const char *done = speed_openai_sse_done(&dlen);
    speed_router_req_write(r, done, dlen);
}

/* Ends a stream normally (after [DONE]). */
void speed_router_req_close(rtr_req_t *r) {
    speed_router_req_release_slot(r);
    speed_router_req_count(r);
    pthread_mutex_lock(&r->http_lock);
    speed_http_stream_t *s = r->stream;
    r->stream = NULL;
    if (s) speed_http_stream_close(s);
    pthread_mutex_unlock(&r->http_lock);
}

/* A complete answer (non-streaming success, or an error before anything was written). */
void speed_router_req_respond(rtr_req_t *r, unsigned status, const char *body, size_t len, int retry_after_s) {
    r->http_status = status;
    speed_router_req_release_slot(r);
    speed_router_req_count(r);
    pthread_mutex_lock(&r->http_lock);
    speed_http_stream_t *s = r->stream;
    r->stream = NULL;
    if (s) {
        if (retry_after_s > 0) {
            char v[16];
            snprintf(v, sizeof v, "%d", retry_after_s);
            speed_http_stream_add_header(s, "Retry-After", v);
        }
        speed_http_stream_respond(s, status, "application/json", body, len);
    }
    pthread_mutex_unlock(&r->http_lock);
}

/* Reports an error the way the response allows: an HTTP error with an OpenAI error object
 * while nothing was sent, else an SSE error event then [DONE]. */
void speed_router_req_fail(rtr_req_t *r, const speed_openai_error_t *err, int retry_after_s) {
    unsigned status = (unsigned)speed_openai_error_http_status(err->kind);
    bool gone;
    pthread_mutex_lock(&r->lock);
    gone = r->client_gone;
    pthread_mutex_unlock(&r->lock);
    r->http_status = gone ? 499 : status;
    if (gone) {
        speed_router_req_close(r);
        return;
    }
    pthread_mutex_lock(&r->http_lock);
    bool committed = r->committed;
    pthread_mutex_unlock(&r->http_lock);
    if (!committed) {
        char *body = NULL;
        size_t len = 0;
        if (speed_openai_error_json(err, &body, &len) == SPEED_OK) {
            speed_router_req_respond(r, status, body, len, retry_after_s);
            speed_free(body);
        } else {
            const char *fb = speed_openai_error_fallback_json();
            r->http_status = 500;
            speed_router_req_respond(r, 500, fb, strlen(fb), 0);
        }
        return;
    }
    char *sse = NULL;
    size_t len = 0;
    if (speed_openai_error_sse(err, &sse, &len) == SPEED_OK) {
        speed_router_req_write(r, sse, len);
        speed_free(sse);
    }
    speed_router_req_write_done(r);
    speed_router_req_close(r);
}

void speed_router_req_fail_status(rtr_req_t *r, speed_status_t st, const char *message, int retry_after_s) {
    speed_openai_error_t err;
    speed_openai_error_from_status(st, message, &err);
    speed_router_req_fail(r, &err, retry_after_s);
}

/* The error for a request that was cancelled by someone other than its client. */
void speed_router_req_fail_cancelled(rtr_req_t *r) {
    speed_status_t why = SPEED_ERR_CANCELLED;
    pthread_mutex_lock(&r->lock);
    why = r->cancel_status;
    bool shutdown = r->shutdown;
    pthread_mutex_unlock(&r->lock);
    if (why == SPEED_ERR_TIMEOUT)
        speed_router_req_fail_status(r, SPEED_ERR_TIMEOUT, "the request took longer than router.request_timeout_ms", 0);
    else
        speed_router_req_fail_status(r, SPEED_ERR_CANCELLED,
                                     shutdown ? "the server is shutting down" : "the request was cancelled", 0);
}
