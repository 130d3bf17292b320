/* Stop conditions: EOS ids, stop strings with streaming hold-back, max tokens. */
#include "stop.h"

#include <stdbool.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

struct speed_stop {
    int32_t *eos; /* [n_eos] */
    size_t n_eos;
    char **stop;      /* [n_stop] */
    size_t *stop_len; /* [n_stop] */
    size_t n_stop;
    int64_t max_tokens;

    int64_t n_tokens;
    speed_finish_reason_t finish;
    int stop_index;
    bool ended;    /* speed_stop_finish was called */
    buf_t pending; /* text not yet released: at most a stop-string prefix between pushes */
    buf_t out;     /* what the last call released */
};

const char *speed_finish_reason_name(speed_finish_reason_t r) {
    switch (r) {
    case SPEED_FINISH_STOP: return "stop";
    case SPEED_FINISH_LENGTH: return "length";
    case SPEED_FINISH_NONE: break;
    }
    return NULL;
}

static bool buf_reserve(buf_t *b, size_t need) {
    if (need <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *grown = speed_realloc(b->data, cap);
    if (!grown) return false;
    b->data = grown;
    b->cap = cap;
    return true;
}

speed_status_t speed_stop_create(const speed_stop_params_t *p, speed_stop_t **stop_p) {
    if (!p || !stop_p || (p->n_eos_ids && !p->eos_ids) || (p->n_stop && !p->stop)) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "stop: NULL arguments");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (p->max_tokens < 1) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "stop: max tokens %lld must be at least 1", (long long)p->max_tokens);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (p->n_stop > SPEED_STOP_MAX_STRINGS) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "stop: %zu stop strings, at most %d allowed", p->n_stop,
                    SPEED_STOP_MAX_STRINGS);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < p->n_stop; i++) {
        size_t n = p->stop[i] ? strlen(p->stop[i]) : 0;
        if (n == 0 || n > SPEED_STOP_MAX_STRING_BYTES) {
            SPEED_ERROR(SPEED_SUBSYS_ENGINE, "stop: stop string %zu is %s (1..%d bytes allowed)", i,
                        n ? "too long" : "empty", SPEED_STOP_MAX_STRING_BYTES);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    speed_stop_t *s = speed_calloc(1, sizeof *s);
    if (!s) return SPEED_ERR_NO_MEMORY;
    s->max_tokens = p->max_tokens;
    s->n_eos = p->n_eos_ids;
    s->n_stop = p->n_stop;
    if (s->n_eos && !(s->eos = speed_malloc(s->n_eos * sizeof *s->eos))) goto oom;
    if (s->n_eos) memcpy(s->eos, p->eos_ids, s->n_eos * sizeof *s->eos);
    if (s->n_stop) {
        s->stop = speed_calloc(s->n_stop, sizeof *s->stop);
        s->stop_len = speed_calloc(s->n_stop, sizeof *s->stop_len);
        if (!s->stop || !s->stop_len) goto oom;
        for (size_t i = 0; i < s->n_stop; i++) {
            if (!(s->stop[i] = speed_strdup(p->stop[i]))) goto oom;
            s->stop_len[i] = strlen(s->stop[i]);
        }
    }
    if (!buf_reserve(&s->out, 1)) goto oom;
    speed_stop_reset(s);
    *stop_p = s;
    return SPEED_OK;
oom:
    speed_stop_destroy(s);
    return SPEED_ERR_NO_MEMORY;
}

void speed_stop_destroy(speed_stop_t *s) {
    if (!s) return;
    if (s->stop)
        for (size_t i = 0; i < s->n_stop; i++) speed_free(s->stop[i]);
    speed_free(s->stop);
    speed_free(s->stop_len);
    speed_free(s->eos);
    speed_free(s->pending.data);
    speed_free(s->out.data);
    speed_free(s);
}

void speed_stop_reset(speed_stop_t *s) {
    s->n_tokens = 0;
    s->finish = SPEED_FINISH_NONE;
    s->stop_index = -1;
    s->ended = false;
    s->pending.len = 0;
    s->out.len = 0;
}

int64_t speed_stop_n_tokens(const speed_stop_t *s) { return s->n_tokens; }

/* Earliest complete stop-string match in pending: its offset, or -1. */
static int64_t match_find(const speed_stop_t *s, int *index_p) {
    const char *p = s->pending.data;
    size_t n = s->pending.len;
    for (size_t at = 0; at < n; at++)
        for (size_t k = 0; k < s->n_stop; k++) {
            size_t sl = s->stop_len[k];
            if (sl <= n - at && p[at] == s->stop[k][0] && memcmp(p + at, s->stop[k], sl) == 0) {
                *index_p = (int)k;
                return (int64_t)at;
            }
        }
    return -1;
}

/* Offset of the longest suffix of pending that is a proper prefix of some stop string
 * (the text that must be held back), or pending.len if none. */
static size_t holdback_start(const speed_stop_t *s) {
    const char *p = s->pending.data;
    size_t n = s->pending.len;
    for (size_t at = 0; at < n; at++)
        for (size_t k = 0; k < s->n_stop; k++)
            if (n - at < s->stop_len[k] && memcmp(p + at, s->stop[k], n - at) == 0) return at;
    return n;
}

/* Moves pending[0..n) to out and drops pending[0..drop) (drop >= n). */
static bool release(speed_stop_t *s, size_t n, size_t drop) {
    if (!buf_reserve(&s->out, n + 1)) return false;
    if (n) memcpy(s->out.data, s->pending.data, n); /* pending.data is NULL until text arrives */
    s->out.len = n;
    s->out.data[n] = '\0';
    if (s->pending.len > drop) memmove(s->pending.data, s->pending.data + drop, s->pending.len - drop);
    s->pending.len -= drop;
    return true;
}

static void result_fill(const speed_stop_t *s, speed_stop_result_t *r) {
    r->text = s->out.data;
    r->len = s->out.len;
    r->finish = s->finish;
    r->stop_index = s->stop_index;
}

/* Appends text and looks for a stop string: releases the text before a match (and drops the
 * rest), else everything but the hold-back (or everything when flushing). */
static speed_status_t append_scan(speed_stop_t *s, const char *text, size_t len, bool flush) {
    if (len && !buf_reserve(&s->pending, s->pending.len + len)) return SPEED_ERR_NO_MEMORY;
    if (len) memcpy(s->pending.data + s->pending.len, text, len);
    s->pending.len += len;
    int index = -1;
    int64_t at = s->n_stop ? match_find(s, &index) : -1;
    if (at >= 0) {
        s->finish = SPEED_FINISH_STOP;
        s->stop_index = index;
        if (!release(s, (size_t)at, s->pending.len)) return SPEED_ERR_NO_MEMORY;
        return SPEED_OK;
    }
    size_t keep_from = flush || !s->n_stop ? s->pending.len : holdback_start(s);
    if (!release(s, keep_from, keep_from)) return SPEED_ERR_NO_MEMORY;
    return SPEED_OK;
}

speed_status_t speed_stop_push(speed_stop_t *s, int32_t id, const char *text, size_t len, speed_stop_result_t *r) {
    if (s->finish != SPEED_FINISH_NONE || s->ended) {
        SPEED_ERROR(SPEED_SUBSYS_ENGINE, "stop: token pushed after the sequence finished");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    s->n_tokens++;
    s->out.len = 0;
    s->out.data[0] = '\0';
    bool eos = false;
    for (size_t i = 0; i < s->n_eos; i++) eos |= s->eos[i] == id;
    if (eos) {
        s->finish = SPEED_FINISH_STOP; /* held-back text is released by finish */
    } else {
        SPEED_CHECK(append_scan(s, text ? text : "", text ? len : 0, false));
    }
    if (s->finish == SPEED_FINISH_NONE && s->n_tokens >= s->max_tokens) s->finish = SPEED_FINISH_LENGTH;
    result_fill(s, r);
    return SPEED_OK;
}

speed_status_t speed_stop_finish(speed_stop_t *s, const char *tail, size_t len, speed_stop_result_t *r) {
    s->out.len = 0;
    s->out.data[0] = '\0';
    if (!s->ended && s->stop_index < 0) SPEED_CHECK(append_scan(s, tail ? tail : "", tail ? len : 0, true));
    s->ended = true;
    s->pending.len = 0;
    result_fill(s, r);
    return SPEED_OK;
}
