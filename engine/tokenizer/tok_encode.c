/* speed_tok_encode: added tokens → normalizer → pre-tokenizer → BPE, as HF tokenizers.
 *
 * All per-call state lives in an encoder_t on the caller's stack, so encoding is
 * thread-safe on a shared, immutable speed_tok_t. */
#include "tok_internal.h"

#include <string.h>

#include "alloc.h"
#include "log.h"

/* ---- per-call arena for strings made by normalizers and pre-tokenizers ---------------- */

typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    char data[];
} arena_chunk_t;

typedef struct {
    const char *p;
    size_t len;
    bool first; /* starts at offset 0 of the input (Metaspace prepend_scheme "first") */
} piece_t;

typedef struct {
    piece_t *v;
    size_t n, cap;
} pieces_t;

typedef struct {
    int32_t rank, pos, left, right; /* right = id of the right symbol when pushed */
} heap_ent_t;

typedef struct {
    size_t start, end;
    bool match;
} split_item_t;

typedef struct {
    const speed_tok_t *tok;
    speed_tok_ids_t *out;
    arena_chunk_t *arena;
    pieces_t a, b;       /* pre-tokenizer ping-pong */
    split_item_t *items; /* regex split scratch */
    size_t n_items, cap_items;
    pcre2_match_data *md;
    /* BPE scratch */
    int32_t *sym_id, *sym_prev, *sym_next;
    size_t cap_sym;
    heap_ent_t *heap;
    size_t n_heap, cap_heap;
    tok_buf_t mapped;        /* byte-level mapped piece */
    const tok_span_t *plain; /* special tokens are text here (tok_encode_spans) */
    size_t n_plain, k_plain; /* k_plain: first span not wholly before the scan */
} encoder_t;

static void *arena_alloc(encoder_t *e, size_t n) {
    arena_chunk_t *c = e->arena;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        c = speed_malloc(sizeof *c + cap);
        if (!c) return NULL;
        c->next = e->arena;
        c->used = 0;
        c->cap = cap;
        e->arena = c;
    }
    void *p = c->data + c->used;
    c->used += n;
    return p;
}

static void encoder_cleanup(encoder_t *e) {
    while (e->arena) {
        arena_chunk_t *next = e->arena->next;
        speed_free(e->arena);
        e->arena = next;
    }
    speed_free(e->a.v);
    speed_free(e->b.v);
    speed_free(e->items);
    pcre2_match_data_free(e->md);
    speed_free(e->sym_id);
    speed_free(e->sym_prev);
    speed_free(e->sym_next);
    speed_free(e->heap);
    tok_buf_free(&e->mapped);
}

static speed_status_t pieces_push(pieces_t *ps, const char *p, size_t len, bool first) {
    if (ps->n == ps->cap) {
        size_t cap = ps->cap ? ps->cap * 2 : 64;
        piece_t *v = speed_realloc(ps->v, cap * sizeof *v);
        if (!v) return SPEED_ERR_NO_MEMORY;
        ps->v = v;
        ps->cap = cap;
    }
    ps->v[ps->n++] = (piece_t){p, len, first};
    return SPEED_OK;
}

static speed_status_t items_push(encoder_t *e, size_t start, size_t end, bool match) {
    if (e->n_items == e->cap_items) {
        size_t cap = e->cap_items ? e->cap_items * 2 : 256;
        split_item_t *v = speed_realloc(e->items, cap * sizeof *v);
        if (!v) return SPEED_ERR_NO_MEMORY;
        e->items = v;
        e->cap_items = cap;
    }
    e->items[e->n_items++] = (split_item_t){start, end, match};
    return SPEED_OK;
}

/* ---- BPE ------------------------------------------------------------------------------- */

static bool heap_less(const heap_ent_t *a, const heap_ent_t *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static speed_status_t heap_push(encoder_t *e, heap_ent_t x) {
    if (e->n_heap == e->cap_heap) {
        size_t cap = e->cap_heap ? e->cap_heap * 2 : 256;
        heap_ent_t *h = speed_realloc(e->heap, cap * sizeof *h);
        if (!h) return SPEED_ERR_NO_MEMORY;
        e->heap = h;
        e->cap_heap = cap;
    }
    size_t i = e->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_less(&x, &e->heap[parent])) break;
        e->heap[i] = e->heap[parent];
        i = parent;
    }
    e->heap[i] = x;
    return SPEED_OK;
}

static heap_ent_t heap_pop(encoder_t *e) {
    heap_ent_t top = e->heap[0];
    heap_ent_t x = e->heap[--e->n_heap];
    size_t n = e->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(&e->heap[c + 1], &e->heap[c])) c++;
        if (!heap_less(&e->heap[c], &x)) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n) e->heap[i] = x;
    return top;
}

static speed_status_t sym_reserve(encoder_t *e, size_t n) {
    if (n <= e->cap_sym) return SPEED_OK;
    size_t cap = e->cap_sym ? e->cap_sym : 64;
    while (cap < n) cap *= 2;
    int32_t *a = speed_realloc(e->sym_id, cap * sizeof *a);
    if (!a) return SPEED_ERR_NO_MEMORY;
    e->sym_id = a;
    a = speed_realloc(e->sym_prev, cap * sizeof *a);
    if (!a) return SPEED_ERR_NO_MEMORY;
    e->sym_prev = a;
    a = speed_realloc(e->sym_next, cap * sizeof *a);
    if (!a) return SPEED_ERR_NO_MEMORY;
    e->sym_next = a;
    e->cap_sym = cap;
    return SPEED_OK;
}

static speed_status_t push_pair(encoder_t *e, int32_t pos) {
    int32_t next = e->sym_next[pos];
    if (next < 0) return SPEED_OK;
    int32_t rank;
    if (tok_merge_find(e->tok, e->sym_id[pos], e->sym_id[next], &rank) < 0) return SPEED_OK;
    return heap_push(e, (heap_ent_t){rank, pos, e->sym_id[pos], e->sym_id[next]});
}

/* Merges the symbols sym_id[0..n) by rank (ties: leftmost) and appends the result. */
static speed_status_t bpe_merge(encoder_t *e, int32_t n) {
    const speed_tok_t *tok = e->tok;
    int32_t *id = e->sym_id, *prev = e->sym_prev, *next = e->sym_next;
    for (int32_t i = 0; i < n; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
    e->n_heap = 0;
    for (int32_t i = 0; i + 1 < n; i++) SPEED_CHECK(push_pair(e, i));
    while (e->n_heap) {
        heap_ent_t top = heap_pop(e);
        int32_t pos = top.pos, r = next[pos];
        if (id[pos] != top.left || r < 0 || id[r] != top.right) continue; /* stale */
        int32_t rank;
        id[pos] = tok_merge_find(tok, top.left, top.right, &rank);
        id[r] = -1;
        next[pos] = next[r];
        if (next[r] >= 0) prev[next[r]] = pos;
        if (prev[pos] >= 0) SPEED_CHECK(push_pair(e, prev[pos]));
        SPEED_CHECK(push_pair(e, pos));
    }
    for (int32_t i = 0; i >= 0; i = next[i]) SPEED_CHECK(tok_ids_push(e->out, id[i]));
    return SPEED_OK;
}

/* Adds the initial symbol(s) for one character that is not in the vocabulary. */
static speed_status_t add_unknown(encoder_t *e, const char *c, size_t clen, int32_t *n, bool *last_unk) {
    const speed_tok_t *tok = e->tok;
    if (tok->byte_fallback) {
        bool all = true;
        for (size_t k = 0; k < clen; k++)
            if (tok->byte_piece_id[(unsigned char)c[k]] < 0) all = false;
        if (all) {
            for (size_t k = 0; k < clen; k++) e->sym_id[(*n)++] = tok->byte_piece_id[(unsigned char)c[k]];
            *last_unk = false;
            return SPEED_OK;
        }
    }
    if (tok->unk_id < 0) return SPEED_OK; /* HF drops the character */
    if (tok->fuse_unk && *last_unk) return SPEED_OK;
    e->sym_id[(*n)++] = tok->unk_id;
    *last_unk = true;
    return SPEED_OK;
}

static speed_status_t bpe_piece(encoder_t *e, const char *p, size_t len) {
    const speed_tok_t *tok = e->tok;
    if (len == 0) return SPEED_OK;
    int32_t n = 0;
    bool last_unk = false;
    if (tok->byte_level) {
        if (tok->ignore_merges || len > 1) {
            e->mapped.len = 0;
            SPEED_CHECK(tok_buf_reserve(&e->mapped, len * 2));
            char *m = e->mapped.p;
            for (size_t i = 0; i < len; i++) {
                uint32_t cp = tok_gpt2_byte_to_cp((unsigned char)p[i]);
                if (cp < 0x80) {
                    *m++ = (char)cp;
                } else {
                    *m++ = (char)(0xC0 | (cp >> 6));
                    *m++ = (char)(0x80 | (cp & 0x3F));
                }
            }
            e->mapped.len = (size_t)(m - e->mapped.p);
            if (tok->ignore_merges) {
                int32_t id = tok_vocab_find(tok, e->mapped.p, e->mapped.len);
                if (id >= 0) return tok_ids_push(e->out, id);
            }
        }
        if (len > INT32_MAX / 4) return SPEED_ERR_NO_MEMORY;
        SPEED_CHECK(sym_reserve(e, len));
        for (size_t i = 0; i < len; i++) {
            int32_t id = tok->byte_char_id[(unsigned char)p[i]];
            if (id >= 0) {
                e->sym_id[n++] = id;
                last_unk = false;
            } else {
                char u[4];
                size_t ulen = tok_utf8_encode(tok_gpt2_byte_to_cp((unsigned char)p[i]), u);
                SPEED_CHECK(add_unknown(e, u, ulen, &n, &last_unk));
            }
        }
    } else {
        if (tok->ignore_merges) {
            int32_t id = tok_vocab_find(tok, p, len);
            if (id >= 0) return tok_ids_push(e->out, id);
        }
        if (len > INT32_MAX / 4) return SPEED_ERR_NO_MEMORY;
        SPEED_CHECK(sym_reserve(e, len * 4)); /* byte fallback: up to 4 symbols a char */
        for (size_t i = 0; i < len;) {
            unsigned char c = (unsigned char)p[i];
            size_t clen = tok_utf8_char_len(c);
            int32_t id = c < 0x80 ? tok->ascii_id[c] : tok_vocab_find(tok, p + i, clen);
            if (id >= 0) {
                e->sym_id[n++] = id;
                last_unk = false;
            } else {
                SPEED_CHECK(add_unknown(e, p + i, clen, &n, &last_unk));
            }
            i += clen;
        }
    }
    if (n == 0) return SPEED_OK;
    if (n == 1) return tok_ids_push(e->out, e->sym_id[0]);
    return bpe_merge(e, n);
}

/* ---- normalizers ------------------------------------------------------------------------ */

static speed_status_t normalize(encoder_t *e, const char **s_p, size_t *len_p) {
    const speed_tok_t *tok = e->tok;
    const char *s = *s_p;
    size_t len = *len_p;
    for (size_t k = 0; k < tok->n_norms; k++) {
        const tok_norm_t *nm = &tok->norms[k];
        if (nm->type == TOK_NORM_PREPEND) {
            if (len == 0) continue; /* HF prepends nothing to an empty string */
            char *d = arena_alloc(e, nm->a_len + len);
            if (!d) return SPEED_ERR_NO_MEMORY;
            memcpy(d, nm->a, nm->a_len);
            memcpy(d + nm->a_len, s, len);
            s = d;
            len += nm->a_len;
        } else {
            size_t count = 0;
            for (size_t i = 0; i + nm->a_len <= len;) {
                if (memcmp(s + i, nm->a, nm->a_len) == 0) {
                    count++;
                    i += nm->a_len;
                } else {
                    i++;
                }
            }
            if (count == 0) continue;
            size_t out_len = len - count * nm->a_len + count * nm->b_len;
            char *d = arena_alloc(e, out_len ? out_len : 1);
            if (!d) return SPEED_ERR_NO_MEMORY;
            size_t o = 0;
            for (size_t i = 0; i < len;) {
                if (i + nm->a_len <= len && memcmp(s + i, nm->a, nm->a_len) == 0) {
                    memcpy(d + o, nm->b, nm->b_len);
                    o += nm->b_len;
                    i += nm->a_len;
                } else {
                    d[o++] = s[i++];
                }
            }
            s = d;
            len = out_len;
        }
    }
    *s_p = s;
    *len_p = len;
    return SPEED_OK;
}

/* ---- pre-tokenizers ------------------------------------------------------------------------ */

/* Splits one piece by a regex into e->items (matches and the gaps between them). */
static speed_status_t regex_items(encoder_t *e, const tok_regex_t *re, const char *s, size_t len) {
    const pcre2_code *code = re->full && tok_text_needs_full_regex(s, len) ? re->full : re->fast;
    e->n_items = 0;
    size_t start = 0, prev_end = 0;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
    while (start < len) {
        int rc = pcre2_match(code, (PCRE2_SPTR)s, len, start, PCRE2_NO_UTF_CHECK, e->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc == PCRE2_ERROR_NOMEMORY) return SPEED_ERR_NO_MEMORY;
        if (rc < 0) {
            PCRE2_UCHAR msg[120];
            pcre2_get_error_message(rc, msg, sizeof msg);
            SPEED_ERROR(SPEED_SUBSYS_TOK, "pre-tokenizer regex failed on a %zu-byte piece: %s", len, (const char *)msg);
            return SPEED_ERR_INTERNAL;
        }
        size_t ms = ov[0], me = ov[1];
        if (me == ms) { /* empty match: no piece, move on by one character */
            start = ms + tok_utf8_char_len((unsigned char)s[ms]);
            continue;
        }
        if (ms > prev_end) SPEED_CHECK(items_push(e, prev_end, ms, false));
        SPEED_CHECK(items_push(e, ms, me, true));
        prev_end = start = me;
    }
    if (prev_end < len) SPEED_CHECK(items_push(e, prev_end, len, false));
    return SPEED_OK;
}

/* Applies HF's SplitDelimiterBehavior to e->items and appends the pieces. */
static speed_status_t split_emit(encoder_t *e, tok_split_behavior_t beh, const piece_t *pc, pieces_t *out) {
    split_item_t *it = e->items;
    size_t n = e->n_items, m = 0;
    bool prev_match = false;
    switch (beh) {
    case TOK_SPLIT_ISOLATED: m = n; break;
    case TOK_SPLIT_REMOVED:
        for (size_t i = 0; i < n; i++)
            if (!it[i].match) it[m++] = it[i];
        break;
    case TOK_SPLIT_MERGED_PREV:
        for (size_t i = 0; i < n; i++) {
            if (it[i].match && !prev_match && m > 0)
                it[m - 1].end = it[i].end;
            else
                it[m++] = it[i];
            prev_match = it[i].match;
        }
        break;
    case TOK_SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < n; i++) {
            bool mt = it[i].match;
            if (mt == prev_match && m > 0)
                it[m - 1].end = it[i].end;
            else
                it[m++] = it[i];
            prev_match = mt;
        }
        break;
    case TOK_SPLIT_MERGED_NEXT: {
        /* right to left: a match joins the item after it unless that one is a match */
        size_t w = n;
        for (size_t i = n; i-- > 0;) {
            bool mt = it[i].match;
            if (mt && !prev_match && w < n)
                it[w].start = it[i].start;
            else
                it[--w] = it[i];
            prev_match = mt;
        }
        memmove(it, it + w, (n - w) * sizeof *it);
        m = n - w;
        break;
    }
    }
    for (size_t i = 0; i < m; i++)
        SPEED_CHECK(pieces_push(out, pc->p + it[i].start, it[i].end - it[i].start, pc->first && it[i].start == 0));
    return SPEED_OK;
}

static speed_status_t pre_one(encoder_t *e, const tok_pre_t *pre, const piece_t *pc, pieces_t *out) {
    const char *s = pc->p;
    size_t len = pc->len;
    switch (pre->type) {
    case TOK_PRE_SPLIT: SPEED_CHECK(regex_items(e, &pre->re, s, len)); return split_emit(e, pre->behavior, pc, out);
    case TOK_PRE_BYTELEVEL: {
        piece_t np = *pc;
        if (pre->add_prefix_space && len > 0 && s[0] != ' ') {
            char *d = arena_alloc(e, len + 1);
            if (!d) return SPEED_ERR_NO_MEMORY;
            d[0] = ' ';
            memcpy(d + 1, s, len);
            np.p = d;
            np.len = len + 1;
        }
        if (!pre->use_regex) return pieces_push(out, np.p, np.len, np.first);
        SPEED_CHECK(regex_items(e, &pre->re, np.p, np.len));
        return split_emit(e, TOK_SPLIT_ISOLATED, &np, out);
    }
    case TOK_PRE_METASPACE: {
        if (len == 0) return SPEED_OK;
        size_t spaces = 0;
        for (size_t i = 0; i < len; i++) spaces += s[i] == ' ';
        bool starts = len >= pre->repl_len && memcmp(s, pre->repl, pre->repl_len) == 0;
        if (s[0] == ' ') starts = true; /* becomes the replacement below */
        bool prepend =
            !starts && (pre->prepend == TOK_PREPEND_ALWAYS || (pre->prepend == TOK_PREPEND_FIRST && pc->first));
        size_t nlen = len + spaces * (pre->repl_len - 1) + (prepend ? pre->repl_len : 0);
        char *d = arena_alloc(e, nlen);
        if (!d) return SPEED_ERR_NO_MEMORY;
        size_t o = 0;
        if (prepend) {
            memcpy(d, pre->repl, pre->repl_len);
            o = pre->repl_len;
        }
        for (size_t i = 0; i < len; i++) {
            if (s[i] == ' ') {
                memcpy(d + o, pre->repl, pre->repl_len);
                o += pre->repl_len;
            } else {
                d[o++] = s[i];
            }
        }
        if (!pre->split) return pieces_push(out, d, nlen, pc->first);
        /* MergedWithNext on the replacement character */
        e->n_items = 0;
        size_t gap = 0;
        for (size_t i = 0; i + pre->repl_len <= nlen;) {
            if (memcmp(d + i, pre->repl, pre->repl_len) == 0) {
                if (i > gap) SPEED_CHECK(items_push(e, gap, i, false));
                SPEED_CHECK(items_push(e, i, i + pre->repl_len, true));
                i += pre->repl_len;
                gap = i;
            } else {
                i++;
            }
        }
        if (gap < nlen) SPEED_CHECK(items_push(e, gap, nlen, false));
        piece_t np = {d, nlen, pc->first};
        return split_emit(e, TOK_SPLIT_MERGED_NEXT, &np, out);
    }
    }
    return SPEED_ERR_INTERNAL;
}

/* One stretch of text between added tokens: normalize, pre-tokenize, BPE. */
static speed_status_t encode_segment(encoder_t *e, const char *s, size_t len, bool first) {
    const speed_tok_t *tok = e->tok;
    if (len == 0) return SPEED_OK;
    SPEED_CHECK(normalize(e, &s, &len));
    if (tok->n_pres == 0 && tok->sp_split) {
        size_t start = 0;
        for (size_t i = 1; i + 3 <= len; i++) {
            if (memcmp(s + i, "\xE2\x96\x81", 3) == 0 && !(i >= 3 && memcmp(s + i - 3, "\xE2\x96\x81", 3) == 0)) {
                SPEED_CHECK(bpe_piece(e, s + start, i - start));
                start = i;
            }
        }
        return bpe_piece(e, s + start, len - start);
    }
    if (tok->n_pres == 0) return bpe_piece(e, s, len);
    e->a.n = 0;
    SPEED_CHECK(pieces_push(&e->a, s, len, first));
    for (size_t k = 0; k < tok->n_pres; k++) {
        e->b.n = 0;
        for (size_t i = 0; i < e->a.n; i++) {
            piece_t pc = e->a.v[i];
            SPEED_CHECK(pre_one(e, &tok->pres[k], &pc, &e->b));
        }
        pieces_t t = e->a;
        e->a = e->b;
        e->b = t;
    }
    for (size_t i = 0; i < e->a.n; i++) SPEED_CHECK(bpe_piece(e, e->a.v[i].p, e->a.v[i].len));
    return SPEED_OK;
}

/* ---- added tokens ------------------------------------------------------------------------ */

static bool is_word_byte(unsigned char c) {
    return c >= 0x80 || c == '_' || (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

static bool is_space_byte(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* Longest added token at text[i], or NULL. */
static const tok_added_t *match_added(const speed_tok_t *tok, const char *text, size_t len, size_t i) {
    unsigned char c = (unsigned char)text[i];
    for (uint32_t k = tok->added_first[c]; k < tok->added_first[c + 1]; k++) {
        const tok_added_t *a = &tok->added[k];
        if (a->len > len - i || memcmp(tok->strs + a->off, text + i, a->len) != 0) continue;
        if (a->single_word && ((i > 0 && is_word_byte((unsigned char)text[i - 1])) ||
                               (i + a->len < len && is_word_byte((unsigned char)text[i + a->len]))))
            continue;
        return a;
    }
    return NULL;
}

static speed_status_t encode_text(encoder_t *e, const char *text, size_t len) {
    const speed_tok_t *tok = e->tok;
    size_t seg = 0, i = 0;
    if (tok->n_added) {
        while (i < len) {
            unsigned char c = (unsigned char)text[i];
            if (tok->added_first[c] == tok->added_first[c + 1]) {
                i++;
                continue;
            }
            const tok_added_t *a = match_added(tok, text, len, i);
            if (a && a->special && e->n_plain) {
                while (e->k_plain < e->n_plain && e->plain[e->k_plain].end <= i) e->k_plain++;
                if (e->k_plain < e->n_plain && e->plain[e->k_plain].start < i + a->len) a = NULL;
            }
            if (!a) {
                i++;
                continue;
            }
            size_t start = i, end = i + a->len;
            if (a->lstrip)
                while (start > seg && is_space_byte((unsigned char)text[start - 1])) start--;
            if (a->rstrip)
                while (end < len && is_space_byte((unsigned char)text[end])) end++;
            SPEED_CHECK(encode_segment(e, text + seg, start - seg, seg == 0));
            SPEED_CHECK(tok_ids_push(e->out, a->id));
            seg = i = end;
        }
    }
    return encode_segment(e, text + seg, len - seg, seg == 0);
}

speed_status_t speed_tok_encode(const speed_tok_t *tok, const char *text, size_t len, bool add_special,
                                speed_tok_ids_t *out) {
    return tok_encode_spans(tok, text, len, add_special, NULL, 0, out);
}

speed_status_t tok_encode_spans(const speed_tok_t *tok, const char *text, size_t len, bool add_special,
                                const tok_span_t *plain, size_t n_plain, speed_tok_ids_t *out) {
    if (!tok || !out || (!text && len)) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_encode: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    size_t valid = tok_utf8_valid_prefix(text, len);
    if (valid != len) {
        SPEED_ERROR(SPEED_SUBSYS_TOK,
                    "cannot tokenize: text is not valid UTF-8 (byte 0x%02x at "
                    "offset %zu)",
                    (unsigned char)text[valid], valid);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    size_t n0 = out->n;
    speed_status_t st = SPEED_OK;
    encoder_t e = {.tok = tok, .out = out, .plain = plain, .n_plain = n_plain};
    if (add_special)
        for (size_t i = 0; i < tok->n_prefix; i++) SPEED_CHECK_GOTO(tok_ids_push(out, tok->prefix_ids[i]), st, out);
    if (tok->n_pres) {
        e.md = pcre2_match_data_create(1, tok->gctx);
        if (!e.md) {
            st = SPEED_ERR_NO_MEMORY;
            goto out;
        }
    }
    SPEED_CHECK_GOTO(encode_text(&e, text, len), st, out);
    if (add_special)
        for (size_t i = 0; i < tok->n_suffix; i++) SPEED_CHECK_GOTO(tok_ids_push(out, tok->suffix_ids[i]), st, out);
out:
    encoder_cleanup(&e);
    if (st != SPEED_OK) {
        out->n = n0;
        if (st == SPEED_ERR_NO_MEMORY) SPEED_ERROR(SPEED_SUBSYS_TOK, "out of memory tokenizing %zu bytes", len);
    }
    return st;
}
