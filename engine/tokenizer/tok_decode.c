/* speed_tok_decode and the incremental decoder (speed_tok_stream_*).
 *
 * Decoding follows HF: ids → token strings → the decoder chain, each step mapping a
 * list of strings to a list of strings → concatenation. */
#include "tok_internal.h"

#include <string.h>

#include "alloc.h"
#include "log.h"

typedef struct {
    const char *p;
    size_t len;
} str_t;

typedef struct dec_chunk {
    struct dec_chunk *next;
    size_t used, cap;
    char data[];
} dec_chunk_t;

typedef struct {
    str_t *v; /* current list of strings */
    size_t n;
    dec_chunk_t *arena;
    tok_buf_t tmp;
    bool raw; /* keep the bytes as they are: no U+FFFD for invalid UTF-8 (speed_tok_decode_raw) */
} dec_state_t;

static char *dec_alloc(dec_state_t *d, size_t n) {
    dec_chunk_t *c = d->arena;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 4096 ? n : 4096;
        c = speed_malloc(sizeof *c + cap);
        if (!c) return NULL;
        c->next = d->arena;
        c->used = 0;
        c->cap = cap;
        d->arena = c;
    }
    char *p = c->data + c->used;
    c->used += n;
    return p;
}

static void dec_cleanup(dec_state_t *d) {
    while (d->arena) {
        dec_chunk_t *next = d->arena->next;
        speed_free(d->arena);
        d->arena = next;
    }
    speed_free(d->v);
    tok_buf_free(&d->tmp);
}

/* Copies tmp into the arena as one string. */
static speed_status_t dec_keep(dec_state_t *d, const char *s, size_t len, str_t *out) {
    char *p = dec_alloc(d, len ? len : 1);
    if (!p) return SPEED_ERR_NO_MEMORY;
    if (len) memcpy(p, s, len);
    out->p = p;
    out->len = len;
    return SPEED_OK;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int byte_token(const str_t *s) {
    if (s->len != 6 || memcmp(s->p, "<0x", 3) != 0 || s->p[5] != '>') return -1;
    int hi = hexval(s->p[3]), lo = hexval(s->p[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

static bool contains(const char *s, size_t len, const char *a, size_t alen) {
    for (size_t i = 0; i + alen <= len; i++)
        if (s[i] == a[0] && memcmp(s + i, a, alen) == 0) return true;
    return false;
}

/* Replaces every occurrence of a by b in each string. */
static speed_status_t dec_replace(dec_state_t *d, const char *a, size_t alen, const char *b, size_t blen) {
    for (size_t i = 0; i < d->n; i++) {
        str_t *s = &d->v[i];
        if (!contains(s->p, s->len, a, alen)) continue;
        d->tmp.len = 0;
        for (size_t k = 0; k < s->len;) {
            if (k + alen <= s->len && memcmp(s->p + k, a, alen) == 0) {
                SPEED_CHECK(tok_buf_append(&d->tmp, b, blen));
                k += alen;
            } else {
                SPEED_CHECK(tok_buf_append(&d->tmp, s->p + k, 1));
                k++;
            }
        }
        SPEED_CHECK(dec_keep(d, d->tmp.p, d->tmp.len, s));
    }
    return SPEED_OK;
}

/* Joins all strings into one (Fuse; also the end of ByteLevel). */
static speed_status_t dec_fuse(dec_state_t *d) {
    if (d->n <= 1) return SPEED_OK;
    d->tmp.len = 0;
    for (size_t i = 0; i < d->n; i++) SPEED_CHECK(tok_buf_append(&d->tmp, d->v[i].p, d->v[i].len));
    SPEED_CHECK(dec_keep(d, d->tmp.p, d->tmp.len, &d->v[0]));
    d->n = 1;
    return SPEED_OK;
}

/* GPT-2 chars back to bytes; a token with a char outside the map keeps its bytes (HF).
 * The bytes are then made valid UTF-8 (U+FFFD per maximal invalid subpart). */
static speed_status_t dec_bytelevel(dec_state_t *d) {
    tok_buf_t raw = {0};
    speed_status_t st = SPEED_OK;
    for (size_t i = 0; i < d->n; i++) {
        const str_t *s = &d->v[i];
        size_t mark = raw.len;
        bool ok = true;
        for (size_t k = 0; k < s->len;) {
            size_t n;
            uint32_t cp = tok_utf8_decode(s->p + k, &n);
            int b = tok_gpt2_cp_to_byte(cp);
            if (b < 0) {
                ok = false;
                break;
            }
            char c = (char)b;
            SPEED_CHECK_GOTO(tok_buf_append(&raw, &c, 1), st, out);
            k += n;
        }
        if (!ok) {
            raw.len = mark;
            SPEED_CHECK_GOTO(tok_buf_append(&raw, s->p, s->len), st, out);
        }
    }
    d->tmp.len = 0;
    if (d->raw)
        SPEED_CHECK_GOTO(tok_buf_append(&d->tmp, raw.p ? raw.p : "", raw.len), st, out);
    else
        SPEED_CHECK_GOTO(tok_utf8_append_lossy(&d->tmp, raw.p ? raw.p : "", raw.len), st, out);
    SPEED_CHECK_GOTO(dec_keep(d, d->tmp.p ? d->tmp.p : "", d->tmp.len, &d->v[0]), st, out);
    d->n = 1;
out:
    tok_buf_free(&raw);
    return st;
}

/* Runs of <0xNN> tokens become their bytes as UTF-8; invalid parts become U+FFFD.
 * (HF turns a whole run with any invalid byte into one U+FFFD per byte; this keeps the
 * valid characters, which makes incremental decoding consistent; see README.) */
static speed_status_t dec_bytefallback(dec_state_t *d) {
    size_t m = 0;
    for (size_t i = 0; i < d->n;) {
        if (byte_token(&d->v[i]) < 0) {
            d->v[m++] = d->v[i++];
            continue;
        }
        d->tmp.len = 0;
        size_t j = i;
        while (j < d->n && byte_token(&d->v[j]) >= 0) j++;
        char *bytes = dec_alloc(d, j - i);
        if (!bytes) return SPEED_ERR_NO_MEMORY;
        for (size_t k = i; k < j; k++) bytes[k - i] = (char)byte_token(&d->v[k]);
        if (d->raw)
            SPEED_CHECK(tok_buf_append(&d->tmp, bytes, j - i));
        else
            SPEED_CHECK(tok_utf8_append_lossy(&d->tmp, bytes, j - i));
        i = j;
        SPEED_CHECK(dec_keep(d, d->tmp.p ? d->tmp.p : "", d->tmp.len, &d->v[m++]));
    }
    d->n = m;
    return SPEED_OK;
}

static void dec_strip(dec_state_t *d, const tok_dec_t *dc) {
    for (size_t i = 0; i < d->n; i++) {
        str_t *s = &d->v[i];
        for (int k = 0; k < dc->start && s->len >= dc->a_len && memcmp(s->p, dc->a, dc->a_len) == 0; k++) {
            s->p += dc->a_len;
            s->len -= dc->a_len;
        }
        for (int k = 0; k < dc->stop && s->len >= dc->a_len && memcmp(s->p + s->len - dc->a_len, dc->a, dc->a_len) == 0;
             k++)
            s->len -= dc->a_len;
    }
}

static speed_status_t dec_metaspace(dec_state_t *d, const tok_dec_t *dc) {
    SPEED_CHECK(dec_replace(d, dc->a, dc->a_len, " ", 1));
    if (dc->prepend && d->n > 0 && d->v[0].len > 0 && d->v[0].p[0] == ' ') {
        d->v[0].p++;
        d->v[0].len--;
    }
    return SPEED_OK;
}

speed_status_t tok_decode_buf(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip_special, bool raw,
                              tok_buf_t *out) {
    dec_state_t d = {0};
    d.raw = raw;
    speed_status_t st = SPEED_OK;
    d.v = speed_malloc((n ? n : 1) * sizeof *d.v);
    if (!d.v) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        const tok_entry_t *e = &tok->entries[id];
        if (!(e->flags & TOK_ENTRY_USED)) continue;
        if (skip_special && (e->flags & TOK_ENTRY_SPECIAL)) continue;
        d.v[d.n++] = (str_t){tok->strs + e->off, e->len};
    }
    if (!tok->has_decoder && d.n > 1) {
        /* HF without a decoder joins tokens with spaces */
        d.tmp.len = 0;
        for (size_t i = 0; i < d.n; i++) {
            if (i) SPEED_CHECK_GOTO(tok_buf_putc(&d.tmp, ' '), st, out);
            SPEED_CHECK_GOTO(tok_buf_append(&d.tmp, d.v[i].p, d.v[i].len), st, out);
        }
        SPEED_CHECK_GOTO(dec_keep(&d, d.tmp.p, d.tmp.len, &d.v[0]), st, out);
        d.n = 1;
    }
    for (size_t k = 0; k < tok->n_decs && d.n; k++) {
        const tok_dec_t *dc = &tok->decs[k];
        switch (dc->type) {
        case TOK_DEC_BYTELEVEL: SPEED_CHECK_GOTO(dec_bytelevel(&d), st, out); break;
        case TOK_DEC_REPLACE: SPEED_CHECK_GOTO(dec_replace(&d, dc->a, dc->a_len, dc->b, dc->b_len), st, out); break;
        case TOK_DEC_BYTEFALLBACK: SPEED_CHECK_GOTO(dec_bytefallback(&d), st, out); break;
        case TOK_DEC_FUSE: SPEED_CHECK_GOTO(dec_fuse(&d), st, out); break;
        case TOK_DEC_STRIP: dec_strip(&d, dc); break;
        case TOK_DEC_METASPACE: SPEED_CHECK_GOTO(dec_metaspace(&d, dc), st, out); break;
        }
    }
    SPEED_CHECK_GOTO(tok_buf_reserve(out, 0), st, out);
    out->p[out->len] = '\0';
    for (size_t i = 0; i < d.n; i++) SPEED_CHECK_GOTO(tok_buf_append(out, d.v[i].p, d.v[i].len), st, out);
out:
    dec_cleanup(&d);
    return st;
}

static speed_status_t check_ids(const speed_tok_t *tok, const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= tok->n_vocab) {
            SPEED_ERROR(SPEED_SUBSYS_TOK,
                        "cannot decode: token id %d at position %zu is outside "
                        "the vocabulary (0..%d)",
                        (int)ids[i], i, (int)tok->n_vocab - 1);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    }
    return SPEED_OK;
}

static speed_status_t decode(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip_special, bool raw,
                             char **text_p, size_t *len_p) {
    if (!tok || !text_p || (!ids && n)) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_decode: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    SPEED_CHECK(check_ids(tok, ids, n));
    tok_buf_t out = {0};
    speed_status_t st = tok_decode_buf(tok, ids, n, skip_special, raw, &out);
    if (st != SPEED_OK) {
        tok_buf_free(&out);
        SPEED_ERROR(SPEED_SUBSYS_TOK, "out of memory decoding %zu tokens", n);
        return st;
    }
    *text_p = out.p;
    if (len_p) *len_p = out.len;
    return SPEED_OK;
}

speed_status_t speed_tok_decode(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip_special, char **text_p,
                                size_t *len_p) {
    return decode(tok, ids, n, skip_special, false, text_p, len_p);
}

speed_status_t speed_tok_decode_raw(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip_special,
                                    char **bytes_p, size_t *len_p) {
    return decode(tok, ids, n, skip_special, true, bytes_p, len_p);
}

/* ---- incremental decoding ----------------------------------------------------------------
 * Keeps the ids from `prefix` on. Each push decodes ids[0..read) (text already emitted,
 * up to where the last emission started) and ids[0..n); the difference is emitted once
 * it is longer and does not end in U+FFFD (an incomplete character). Decoding both from
 * the same start keeps start-of-text rules (Strip, Metaspace) identical in both. */

struct speed_tok_stream {
    const speed_tok_t *tok;
    bool skip_special;
    speed_tok_ids_t ids;
    size_t read;
    tok_buf_t prev, cur, out;
};

speed_status_t speed_tok_stream_create(const speed_tok_t *tok, bool skip_special, speed_tok_stream_t **s_p) {
    if (!tok || !s_p) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_stream_create: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_tok_stream_t *s = speed_calloc(1, sizeof *s);
    if (!s) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "out of memory creating a decode stream");
        return SPEED_ERR_NO_MEMORY;
    }
    s->tok = tok;
    s->skip_special = skip_special;
    *s_p = s;
    return SPEED_OK;
}

void speed_tok_stream_destroy(speed_tok_stream_t *s) {
    if (!s) return;
    speed_tok_ids_free(&s->ids);
    tok_buf_free(&s->prev);
    tok_buf_free(&s->cur);
    tok_buf_free(&s->out);
    speed_free(s);
}

static bool ends_with_fffd(const tok_buf_t *b) {
    return b->len >= 3 && memcmp(b->p + b->len - 3, "\xEF\xBF\xBD", 3) == 0;
}

/* Emits cur minus prev into out (at a character boundary). */
static speed_status_t stream_emit(speed_tok_stream_t *s) {
    size_t start = s->prev.len;
    if (memcmp(s->cur.p, s->prev.p ? s->prev.p : "", start) != 0) {
        /* Not a prefix (a decoder rule we do not know to be local): emit from the first
         * difference, moved back to a character start. */
        start = 0;
        while (start < s->prev.len && s->cur.p[start] == s->prev.p[start]) start++;
        while (start > 0 && ((unsigned char)s->cur.p[start] & 0xC0) == 0x80) start--;
    }
    s->out.len = 0;
    return tok_buf_append(&s->out, s->cur.p + start, s->cur.len - start);
}

static speed_status_t stream_decode(speed_tok_stream_t *s, size_t n, tok_buf_t *b) {
    b->len = 0;
    return tok_decode_buf(s->tok, s->ids.ids, n, s->skip_special, false, b);
}

speed_status_t speed_tok_stream_push(speed_tok_stream_t *s, int32_t id, const char **text_p, size_t *len_p) {
    if (!s || !text_p || !len_p) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_stream_push: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    SPEED_CHECK(check_ids(s->tok, &id, 1));
    speed_status_t st;
    SPEED_CHECK_GOTO(tok_ids_push(&s->ids, id), st, fail);
    SPEED_CHECK_GOTO(tok_buf_reserve(&s->out, 0), st, fail_pop);
    s->out.len = 0;
    s->out.p[0] = '\0';
    SPEED_CHECK_GOTO(stream_decode(s, s->read, &s->prev), st, fail_pop);
    SPEED_CHECK_GOTO(stream_decode(s, s->ids.n, &s->cur), st, fail_pop);
    if (s->cur.len > s->prev.len && !ends_with_fffd(&s->cur)) {
        SPEED_CHECK_GOTO(stream_emit(s), st, fail_pop);
        /* the ids before the old read offset are no longer needed */
        size_t drop = s->read;
        memmove(s->ids.ids, s->ids.ids + drop, (s->ids.n - drop) * sizeof *s->ids.ids);
        s->ids.n -= drop;
        s->read = s->ids.n;
    }
    *text_p = s->out.p;
    *len_p = s->out.len;
    return SPEED_OK;
fail_pop:
    s->ids.n--;
fail:
    SPEED_ERROR(SPEED_SUBSYS_TOK, "out of memory in incremental decoding");
    return st;
}

speed_status_t speed_tok_stream_flush(speed_tok_stream_t *s, const char **text_p, size_t *len_p) {
    if (!s || !text_p || !len_p) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_stream_flush: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_status_t st;
    SPEED_CHECK_GOTO(tok_buf_reserve(&s->out, 0), st, fail);
    s->out.len = 0;
    s->out.p[0] = '\0';
    SPEED_CHECK_GOTO(stream_decode(s, s->read, &s->prev), st, fail);
    SPEED_CHECK_GOTO(stream_decode(s, s->ids.n, &s->cur), st, fail);
    if (s->cur.len > s->prev.len) SPEED_CHECK_GOTO(stream_emit(s), st, fail);
    s->ids.n = 0;
    s->read = 0;
    *text_p = s->out.p;
    *len_p = s->out.len;
    return SPEED_OK;
fail:
    SPEED_ERROR(SPEED_SUBSYS_TOK, "out of memory in incremental decoding");
    return st;
}
