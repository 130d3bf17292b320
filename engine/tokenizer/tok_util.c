/* Buffers, UTF-8, hashing and the GPT-2 byte map shared by the tokenizer files. */
#include "tok_internal.h"

#include <string.h>

#include "alloc.h"

/* ---- buffers ------------------------------------------------------------------------ */

speed_status_t tok_buf_reserve(tok_buf_t *b, size_t extra) {
    if (extra <= b->cap - b->len && b->p) return SPEED_OK;
    size_t need = b->len + extra + 1; /* room for a NUL */
    if (need < b->len) return SPEED_ERR_NO_MEMORY;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    char *p = speed_realloc(b->p, cap);
    if (!p) return SPEED_ERR_NO_MEMORY;
    b->p = p;
    b->cap = cap - 1; /* cap never counts the NUL byte */
    return SPEED_OK;
}

speed_status_t tok_buf_append(tok_buf_t *b, const void *data, size_t n) {
    SPEED_CHECK(tok_buf_reserve(b, n));
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return SPEED_OK;
}

speed_status_t tok_buf_append_str(tok_buf_t *b, const char *s) { return tok_buf_append(b, s, strlen(s)); }

speed_status_t tok_buf_putc(tok_buf_t *b, char c) { return tok_buf_append(b, &c, 1); }

void tok_buf_free(tok_buf_t *b) {
    speed_free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

speed_status_t tok_spans_push(tok_spans_t *sp, size_t start, size_t end) {
    if (sp->n == sp->cap) {
        size_t cap = sp->cap ? sp->cap * 2 : 16;
        tok_span_t *v = speed_realloc(sp->v, cap * sizeof *v);
        if (!v) return SPEED_ERR_NO_MEMORY;
        sp->v = v;
        sp->cap = cap;
    }
    sp->v[sp->n++] = (tok_span_t){start, end};
    return SPEED_OK;
}

void tok_spans_free(tok_spans_t *sp) {
    speed_free(sp->v);
    sp->v = NULL;
    sp->n = sp->cap = 0;
}

speed_status_t tok_ids_push(speed_tok_ids_t *ids, int32_t id) {
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *p = speed_realloc(ids->ids, cap * sizeof *p);
        if (!p) return SPEED_ERR_NO_MEMORY;
        ids->ids = p;
        ids->cap = cap;
    }
    ids->ids[ids->n++] = id;
    return SPEED_OK;
}

void speed_tok_ids_free(speed_tok_ids_t *ids) {
    if (!ids) return;
    speed_free(ids->ids);
    ids->ids = NULL;
    ids->n = ids->cap = 0;
}

/* ---- UTF-8 -------------------------------------------------------------------------- */

/* Length of the longest prefix of s[0..len) that could begin a valid sequence
 * (1 for an invalid lead byte); *complete is set when that prefix is a whole character. */
static size_t utf8_subpart(const unsigned char *s, size_t len, bool *complete) {
    unsigned char c = s[0];
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    *complete = false;
    if (c < 0x80) {
        *complete = true;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF)
        need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 1;
    }
    size_t i = 1;
    for (; i < need && i < len; i++) {
        unsigned char lo_i = i == 1 ? lo : 0x80, hi_i = i == 1 ? hi : 0xBF;
        if (s[i] < lo_i || s[i] > hi_i) break;
    }
    *complete = i == need;
    return i;
}

size_t tok_utf8_valid_prefix(const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        bool complete;
        size_t n = utf8_subpart(s + i, len - i, &complete);
        if (!complete) return i;
        i += n;
    }
    return len;
}

uint32_t tok_utf8_decode(const char *str, size_t *n_p) {
    const unsigned char *s = (const unsigned char *)str;
    uint32_t cp;
    size_t n = tok_utf8_char_len(s[0]);
    switch (n) {
    case 1: cp = s[0]; break;
    case 2: cp = ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F); break;
    case 3: cp = ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F); break;
    default:
        cp = ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) |
             (s[3] & 0x3F);
        break;
    }
    if (n_p) *n_p = n;
    return cp;
}

size_t tok_utf8_encode(uint32_t cp, char out[4]) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

speed_status_t tok_utf8_append_lossy(tok_buf_t *b, const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, run = 0; /* valid bytes s[run..i) not yet appended */
    SPEED_CHECK(tok_buf_reserve(b, len));
    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        bool complete;
        size_t n = utf8_subpart(s + i, len - i, &complete);
        if (complete) {
            i += n;
            continue;
        }
        SPEED_CHECK(tok_buf_append(b, s + run, i - run));
        SPEED_CHECK(tok_buf_append(b, "\xEF\xBF\xBD", 3));
        i += n;
        run = i;
    }
    return tok_buf_append(b, s + run, i - run);
}

/* ---- hashing ------------------------------------------------------------------------ */

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

uint64_t tok_hash_bytes(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0x100000001b3ULL);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0xbf58476d1ce4e5b9ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t v = 0;
        memcpy(&v, p, n);
        h = (h ^ v) * 0x94d049bb133111ebULL;
    }
    return mix64(h);
}

/* ---- GPT-2 byte map -------------------------------------------------------------------
 * Printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the 68 others map,
 * in byte order, to U+0100.. (so ' ' is U+0120 'Ġ' and '\n' is U+010A 'Ċ'). */

uint32_t tok_gpt2_byte_to_cp(unsigned char b) {
    if (b <= 0x20) return 256u + b;                              /* 33 bytes 0x00..0x20 */
    if (b >= 0x7F && b <= 0xA0) return 256u + 33u + (b - 0x7Fu); /* 34 bytes */
    if (b == 0xAD) return 256u + 33u + 34u;
    return b;
}

int tok_gpt2_cp_to_byte(uint32_t cp) {
    if (cp < 256) {
        if (cp <= 0x20 || (cp >= 0x7F && cp <= 0xA0) || cp == 0xAD) return -1;
        return (int)cp;
    }
    if (cp < 256 + 33) return (int)(cp - 256);
    if (cp < 256 + 33 + 34) return (int)(0x7F + (cp - 256 - 33));
    if (cp == 256 + 33 + 34) return 0xAD;
    return -1;
}

/* ---- Python whitespace ---------------------------------------------------------------- */

bool tok_py_isspace(uint32_t cp) {
    if (cp <= 0x20) return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20);
    switch (cp) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000: return true;
    default: return cp >= 0x2000 && cp <= 0x200A;
    }
}

/* ---- PCRE2 memory through speed_malloc ------------------------------------------------- */

static void *pcre_malloc(PCRE2_SIZE n, void *user) {
    (void)user;
    return speed_malloc(n);
}

static void pcre_free(void *p, void *user) {
    (void)user;
    speed_free(p);
}

pcre2_general_context *tok_pcre2_context_create(void) {
    return pcre2_general_context_create(pcre_malloc, pcre_free, NULL);
}
