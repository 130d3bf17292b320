/* speed_json_strict: a strict JSON syntax check that allocates nothing (json_strict.h says
 * what it accepts and why it exists). A recursive descent over the bytes: every syn_* step
 * advances s->p past what it accepted and returns false at the first byte it cannot. */
#include "json_strict.h"

#include <string.h>

size_t speed_json_strict_utf8_len(const unsigned char *s, size_t n) {
    if (n == 0) return 0;
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else
        return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return len;
}

typedef struct {
    const unsigned char *p, *end;
} syn_t;

static void syn_ws(syn_t *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

static int syn_hex4(syn_t *s) {
    if (s->end - s->p < 4) return -1;
    int v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = s->p[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    s->p += 4;
    return v;
}

static bool syn_string(syn_t *s) {
    s->p++; /* opening quote */
    while (s->p < s->end) {
        unsigned char c = *s->p;
        if (c == '"') {
            s->p++;
            return true;
        }
        if (c < 0x20) return false;
        if (c == '\\') {
            if (++s->p >= s->end) return false;
            c = *s->p++;
            if (c == 'u') {
                int u = syn_hex4(s);
                if (u <= 0 || (u >= 0xDC00 && u <= 0xDFFF)) return false; /* NUL, lone low */
                if (u >= 0xD800 && u <= 0xDBFF) {
                    if (s->end - s->p < 2 || s->p[0] != '\\' || s->p[1] != 'u') return false;
                    s->p += 2;
                    int lo = syn_hex4(s);
                    if (lo < 0xDC00 || lo > 0xDFFF) return false;
                }
            } else if (!strchr("\"\\/bfnrt", c) || c == '\0') { /* strchr finds '\0' */
                return false;
            }
            continue;
        }
        size_t k = speed_json_strict_utf8_len(s->p, (size_t)(s->end - s->p));
        if (!k) return false;
        s->p += k;
    }
    return false;
}

static bool syn_digits(syn_t *s) {
    const unsigned char *start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    return s->p > start;
}

static bool syn_number(syn_t *s) {
    if (*s->p == '-') s->p++;
    if (s->p < s->end && *s->p == '0')
        s->p++;
    else if (!syn_digits(s))
        return false;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!syn_digits(s)) return false;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) s->p++;
        if (!syn_digits(s)) return false;
    }
    return true;
}

static bool syn_word(syn_t *s, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, w, n) != 0) return false;
    s->p += n;
    return true;
}

/* depth: the arrays and objects already open around this value. */
static bool syn_value(syn_t *s, int depth) {
    syn_ws(s);
    if (s->p >= s->end) return false;
    unsigned char c = *s->p;
    if (c == '"') return syn_string(s);
    if (c == '-' || (c >= '0' && c <= '9')) return syn_number(s);
    if (c == 't') return syn_word(s, "true");
    if (c == 'f') return syn_word(s, "false");
    if (c == 'n') return syn_word(s, "null");
    if (c != '[' && c != '{') return false;
    if (depth >= SPEED_JSON_STRICT_MAX_DEPTH) return false;
    unsigned char close = c == '[' ? ']' : '}';
    s->p++;
    syn_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return true;
    }
    for (;;) {
        if (close == '}') {
            syn_ws(s);
            if (s->p >= s->end || *s->p != '"' || !syn_string(s)) return false;
            syn_ws(s);
            if (s->p >= s->end || *s->p != ':') return false;
            s->p++;
        }
        if (!syn_value(s, depth + 1)) return false;
        syn_ws(s);
        if (s->p >= s->end) return false;
        if (*s->p == close) {
            s->p++;
            return true;
        }
        if (*s->p != ',') return false;
        s->p++;
    }
}

bool speed_json_strict_check(const char *text, size_t len) {
    if (!text) return false;
    syn_t s = {(const unsigned char *)text, (const unsigned char *)text + len};
    if (!syn_value(&s, 0)) return false;
    syn_ws(&s);
    return s.p == s.end;
}
