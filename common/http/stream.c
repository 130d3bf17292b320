/* speed_http streams: a response written from any thread, its buffer, its SSE events, closing
 * it, and the content reader MHD pulls it through (http.h; locking: the top of server.c). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "http_internal.h"
#include "log.h"

/* ---- streams -------------------------------------------------------------------------- */

void speed_http_stream_unref(speed_http_stream_t *s) {
    if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1) return;
    SPEED_ASSERT(!s->attached && !s->suspended);
    speed_free(s->buf);
    speed_free(s->content_type);
    speed_http_headers_free(s->headers);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    speed_free(s);
}

void speed_http_stream_ref(speed_http_stream_t *s) { atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed); }

/* Suspends the connection until the writer has something for it (or the server stops).
 * Caller holds s->lock; the stream is attached, so s->server is valid. */
void speed_http_stream_suspend_locked(speed_http_stream_t *s) {
    s->suspended = true;
    atomic_fetch_add(&s->server->n_streams_suspended, 1);
    MHD_suspend_connection(s->conn);
}

/* Resumes the connection if we suspended it. Caller holds s->lock. */
void speed_http_stream_wake_locked(speed_http_stream_t *s) {
    if (!s->suspended) return;
    s->suspended = false;
    atomic_fetch_sub(&s->server->n_streams_suspended, 1);
    MHD_resume_connection(s->conn);
}

/* MHD's content reader: hands out pending bytes, or suspends until there are some. */
ssize_t speed_http_stream_reader(void *cls, uint64_t pos, char *out, size_t max) {
    speed_http_stream_t *s = cls;
    (void)pos;
    ssize_t n;
    pthread_mutex_lock(&s->lock);
    if (s->overrun) {
        n = MHD_CONTENT_READER_END_WITH_ERROR; /* cut the connection; the bytes are gone */
    } else if (s->len > s->head) {
        size_t k = s->len - s->head;
        if (k > max) k = max;
        memcpy(out, s->buf + s->head, k);
        s->head += k;
        if (s->head == s->len) s->head = s->len = 0;
        n = (ssize_t)k;
    } else if (s->closed) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else if (s->stopping || !s->conn) {
        n = MHD_CONTENT_READER_END_WITH_ERROR;
    } else {
        /* Returning 0 without suspending would make MHD call again at once: a busy loop. */
        speed_http_stream_suspend_locked(s);
        n = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

void speed_http_stream_response_free(void *cls) { speed_http_stream_unref(cls); }

speed_status_t speed_http_stream_set_status(speed_http_stream_t *stream, unsigned status) {
    if (!stream || status < 100 || status > 599) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    pthread_mutex_lock(&stream->lock);
    if (stream->committed)
        st = SPEED_ERR_INVALID_ARGUMENT;
    else
        stream->status = status;
    pthread_mutex_unlock(&stream->lock);
    return st;
}

speed_status_t speed_http_stream_add_header(speed_http_stream_t *stream, const char *name, const char *value) {
    if (!stream) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st;
    pthread_mutex_lock(&stream->lock);
    if (stream->committed)
        st = SPEED_ERR_INVALID_ARGUMENT;
    else
        st = speed_http_header_push(&stream->headers, name, value);
    pthread_mutex_unlock(&stream->lock);
    return st;
}

/* Appends bytes to the pending buffer. Caller holds s->lock. */
static speed_status_t stream_append_locked(speed_http_stream_t *s, const void *data, size_t len) {
    if (s->closed) return SPEED_ERR_INVALID_ARGUMENT;
    if (s->finished || s->stopping || s->overrun) return SPEED_ERR_CANCELLED;
    if (s->max_pending && s->committed && s->len - s->head + len > s->max_pending) {
        /* The client does not read: drop what it did not take rather than hold it. */
        s->overrun = true;
        speed_free(s->buf);
        s->buf = NULL;
        s->head = s->len = s->cap = 0;
        speed_http_stream_wake_locked(s);
        return SPEED_ERR_CANCELLED;
    }
    if (s->len + len > s->cap) {
        if (s->head) { /* compact before growing */
            memmove(s->buf, s->buf + s->head, s->len - s->head);
            s->len -= s->head;
            s->head = 0;
        }
        if (s->len + len > s->cap) {
            size_t cap = s->cap ? s->cap : 4096;
            while (cap < s->len + len) cap *= 2;
            char *grown = speed_realloc(s->buf, cap);
            if (!grown) return SPEED_ERR_NO_MEMORY;
            s->buf = grown;
            s->cap = cap;
        }
    }
    if (len) memcpy(s->buf + s->len, data, len);
    s->len += len;
    return SPEED_OK;
}

/* Appends in one step (an SSE event is never split between two wake-ups of the reader, and
 * never half-written on allocation failure), commits and wakes the connection. */
static speed_status_t stream_append(speed_http_stream_t *s, const void *data, size_t len) {
    pthread_mutex_lock(&s->lock);
    speed_status_t st = stream_append_locked(s, data, len);
    if (st == SPEED_OK) {
        s->committed = true;
        speed_http_stream_wake_locked(s);
    }
    pthread_mutex_unlock(&s->lock);
    return st;
}

/* Waits out a disconnect callback running on another thread, marks the stream closed, wakes
 * the connection, then drops the writer's reference. Caller holds s->lock, which this
 * releases.
 *
 * The wait comes first. The callback runs outside s->lock, because it may write or close.
 * If close set `closed` and then waited, a writer thread that saw CANCELLED and closed
 * while the callback was running would close the stream under the callback. The callback
 * was told the writer still holds the stream, but its writes would get INVALID_ARGUMENT
 * ("after close") instead of CANCELLED. test_disconnect_races hit this when writers wrote
 * flat out. A callback runs only after the request is over (no connection to wake, nothing
 * left to read), so closing a little later changes nothing on the wire. */
static speed_status_t stream_close_locked(speed_http_stream_t *s, speed_status_t st) {
    while (s->cb_running && !pthread_equal(s->cb_thread, pthread_self())) pthread_cond_wait(&s->cond, &s->lock);
    SPEED_ASSERT(!s->closed); /* closing twice: the reference is already gone */
    s->closed = true;
    s->committed = true;
    if (s->cancelled && st == SPEED_OK) st = SPEED_ERR_CANCELLED;
    speed_http_stream_wake_locked(s);
    pthread_mutex_unlock(&s->lock);
    speed_http_stream_unref(s);
    return st;
}

speed_status_t speed_http_stream_write(speed_http_stream_t *stream, const void *data, size_t len) {
    if (!stream || (!data && len)) return SPEED_ERR_INVALID_ARGUMENT;
    return stream_append(stream, data, len);
}

speed_status_t speed_http_stream_write_sse(speed_http_stream_t *stream, const char *event, const char *data) {
    if (!stream || !data || (event && !speed_http_header_text_ok(event))) return SPEED_ERR_INVALID_ARGUMENT;
    /* event line + per data line "data: " + line + "\n", + final "\n" */
    size_t n_lines = 1;
    for (const char *c = data; *c; c++) n_lines += *c == '\n';
    size_t size = strlen(data) + n_lines * 7 + 1 + (event ? strlen(event) + 8 : 0);
    char *text = speed_malloc(size + 1);
    if (!text) return SPEED_ERR_NO_MEMORY;
    size_t n = 0;
    if (event) n += (size_t)sprintf(text, "event: %s\n", event);
    const char *line = data;
    for (;;) {
        const char *nl = strchr(line, '\n');
        size_t k = nl ? (size_t)(nl - line) : strlen(line);
        if (k && line[k - 1] == '\r') k--; /* CR would end the line on the client side too */
        memcpy(text + n, "data: ", 6);
        n += 6;
        memcpy(text + n, line, k);
        n += k;
        text[n++] = '\n';
        if (!nl) break;
        line = nl + 1;
    }
    text[n++] = '\n';
    speed_status_t st = stream_append(stream, text, n);
    speed_free(text);
    return st;
}

size_t speed_http_stream_pending(speed_http_stream_t *stream) {
    if (!stream) return 0;
    pthread_mutex_lock(&stream->lock);
    size_t n = stream->len - stream->head;
    pthread_mutex_unlock(&stream->lock);
    return n;
}

void speed_http_stream_set_max_pending(speed_http_stream_t *stream, size_t max_bytes) {
    if (!stream) return;
    pthread_mutex_lock(&stream->lock);
    stream->max_pending = max_bytes;
    pthread_mutex_unlock(&stream->lock);
}

bool speed_http_stream_is_overrun(speed_http_stream_t *stream) {
    if (!stream) return false;
    pthread_mutex_lock(&stream->lock);
    bool o = stream->overrun;
    pthread_mutex_unlock(&stream->lock);
    return o;
}

bool speed_http_stream_is_cancelled(speed_http_stream_t *stream) {
    if (!stream) return false;
    pthread_mutex_lock(&stream->lock);
    bool c = stream->cancelled || stream->stopping;
    pthread_mutex_unlock(&stream->lock);
    return c;
}

speed_status_t speed_http_stream_close(speed_http_stream_t *stream) {
    if (!stream) return SPEED_OK;
    pthread_mutex_lock(&stream->lock);
    return stream_close_locked(stream, SPEED_OK);
}

speed_status_t speed_http_stream_respond(speed_http_stream_t *stream, unsigned status, const char *content_type,
                                         const void *body, size_t body_len) {
    if (!stream) return SPEED_ERR_INVALID_ARGUMENT;
    speed_status_t st = SPEED_OK;
    char *ct = NULL;
    if (status < 100 || status > 599 || (!body && body_len) ||
        (content_type && !speed_http_header_text_ok(content_type)))
        st = SPEED_ERR_INVALID_ARGUMENT;
    if (st == SPEED_OK && content_type && !(ct = speed_strdup(content_type))) st = SPEED_ERR_NO_MEMORY;
    pthread_mutex_lock(&stream->lock);
    if (st == SPEED_OK && stream->committed) st = SPEED_ERR_INVALID_ARGUMENT;
    if (st == SPEED_OK) st = stream_append_locked(stream, body, body_len);
    if (st == SPEED_OK) {
        stream->status = status;
        if (ct) {
            speed_free(stream->content_type);
            stream->content_type = ct;
            ct = NULL;
        }
    }
    speed_free(ct);
    return stream_close_locked(stream, st);
}
