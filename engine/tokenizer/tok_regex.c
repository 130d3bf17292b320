/* Pre-tokenizer regexes through PCRE2, patched to split exactly as Hugging Face
 * tokenizers (Oniguruma, Unicode 16) does. See docs/dependencies.md §8
 * (measured against Hugging Face tokenizers on 2.3 million strings):
 *   1. \s becomes the White_Space property as an explicit class (PCRE2's UCP \s also
 *      matches U+180E; without UCP it is ASCII only);
 *   2. \p{L} and \p{N} gain the letters and digits new in Unicode 15.0-16.0, which
 *      PCRE2 10.42 (Unicode 14) does not know.
 * Step 2 halves JIT speed, so each regex is compiled twice and the fully patched one is
 * used only for texts that contain one of those code points (same output by construction). */
#include "tok_internal.h"

#include <string.h>

#include "log.h"

#define WS_CLASS                                                                 \
    "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}" \
    "\\x{202F}\\x{205F}\\x{3000}"

#define L_EXTRA                                                                                     \
    "\\x{1C89}-\\x{1C8A}\\x{A7CB}-\\x{A7CD}\\x{A7DA}-\\x{A7DC}\\x{105C0}-\\x{105F3}"                \
    "\\x{10D4A}-\\x{10D65}\\x{10D6F}-\\x{10D85}\\x{10EC2}-\\x{10EC4}\\x{1123F}-\\x{11240}"          \
    "\\x{11380}-\\x{11389}\\x{1138B}\\x{1138E}\\x{11390}-\\x{113B5}\\x{113B7}\\x{113D1}\\x{113D3}"  \
    "\\x{11BC0}-\\x{11BE0}\\x{11F02}\\x{11F04}-\\x{11F10}\\x{11F12}-\\x{11F33}\\x{1342F}"           \
    "\\x{13441}-\\x{13446}\\x{13460}-\\x{143FA}\\x{16100}-\\x{1611D}\\x{16D40}-\\x{16D6C}"          \
    "\\x{18CFF}\\x{1B132}\\x{1B155}\\x{1DF25}-\\x{1DF2A}\\x{1E030}-\\x{1E06D}\\x{1E4D0}-\\x{1E4EB}" \
    "\\x{1E5D0}-\\x{1E5ED}\\x{1E5F0}\\x{2B739}\\x{2EBF0}-\\x{2EE5D}\\x{31350}-\\x{323AF}"

#define N_EXTRA                                                                            \
    "\\x{10D40}-\\x{10D49}\\x{116D0}-\\x{116E3}\\x{11BF0}-\\x{11BF9}\\x{11F50}-\\x{11F59}" \
    "\\x{16130}-\\x{16139}\\x{16D70}-\\x{16D79}\\x{1CCF0}-\\x{1CCF9}\\x{1D2C0}-\\x{1D2D3}" \
    "\\x{1E4F0}-\\x{1E4F9}\\x{1E5F1}-\\x{1E5FA}"

/* The same ranges as numbers, sorted, for tok_text_needs_full_regex. */
static const uint32_t new_ranges[][2] = {
    {0x1C89, 0x1C8A},   {0xA7CB, 0xA7CD},   {0xA7DA, 0xA7DC},   {0x105C0, 0x105F3}, {0x10D40, 0x10D49},
    {0x10D4A, 0x10D65}, {0x10D6F, 0x10D85}, {0x10EC2, 0x10EC4}, {0x1123F, 0x11240}, {0x11380, 0x11389},
    {0x1138B, 0x1138B}, {0x1138E, 0x1138E}, {0x11390, 0x113B5}, {0x113B7, 0x113B7}, {0x113D1, 0x113D1},
    {0x113D3, 0x113D3}, {0x116D0, 0x116E3}, {0x11BC0, 0x11BE0}, {0x11BF0, 0x11BF9}, {0x11F02, 0x11F02},
    {0x11F04, 0x11F10}, {0x11F12, 0x11F33}, {0x11F50, 0x11F59}, {0x1342F, 0x1342F}, {0x13441, 0x13446},
    {0x13460, 0x143FA}, {0x16100, 0x1611D}, {0x16130, 0x16139}, {0x16D40, 0x16D6C}, {0x16D70, 0x16D79},
    {0x18CFF, 0x18CFF}, {0x1B132, 0x1B132}, {0x1B155, 0x1B155}, {0x1CCF0, 0x1CCF9}, {0x1D2C0, 0x1D2D3},
    {0x1DF25, 0x1DF2A}, {0x1E030, 0x1E06D}, {0x1E4D0, 0x1E4EB}, {0x1E4F0, 0x1E4F9}, {0x1E5D0, 0x1E5ED},
    {0x1E5F0, 0x1E5F0}, {0x1E5F1, 0x1E5FA}, {0x2B739, 0x2B739}, {0x2EBF0, 0x2EE5D}, {0x31350, 0x323AF},
};

static bool cp_is_new(uint32_t cp) {
    size_t lo = 0, hi = sizeof new_ranges / sizeof new_ranges[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < new_ranges[mid][0])
            hi = mid;
        else if (cp > new_ranges[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

bool tok_text_needs_full_regex(const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    for (size_t i = 0; i < len; i++) {
        /* The lowest new code point, U+1C89, is E1 B2 89: lower lead bytes (and all
         * continuation bytes) cannot start one. */
        if (s[i] < 0xE1) continue;
        if (i + tok_utf8_char_len(s[i]) > len) break;
        size_t n;
        uint32_t cp = tok_utf8_decode(str + i, &n);
        if (cp_is_new(cp)) return true;
        i += n - 1;
    }
    return false;
}

/* Rewrites a pattern (see the top of the file). `full` adds the L/N ranges.
 * *changed_ln_p tells whether the pattern mentions \p{L} or \p{N} at all. */
static speed_status_t patch_pattern(const char *pat, size_t len, bool full, tok_buf_t *out, bool *changed_ln_p) {
    bool in_class = false;
    size_t class_start = 0; /* position right after '[' or '[^' */
    for (size_t i = 0; i < len; i++) {
        char c = pat[i];
        if (c == '[' && !in_class) {
            in_class = true;
            SPEED_CHECK(tok_buf_putc(out, c));
            if (i + 1 < len && pat[i + 1] == '^') SPEED_CHECK(tok_buf_putc(out, pat[++i]));
            class_start = i + 1;
            continue;
        }
        if (c == '[' && in_class && i + 1 < len && pat[i + 1] == ':') {
            const char *end = memchr(pat + i + 2, ']', len - i - 2); /* [:alpha:] */
            size_t n = end ? (size_t)(end - (pat + i)) + 1 : len - i;
            SPEED_CHECK(tok_buf_append(out, pat + i, n));
            i += n - 1;
            continue;
        }
        if (c == ']' && in_class && i != class_start) {
            in_class = false;
            SPEED_CHECK(tok_buf_putc(out, c));
            continue;
        }
        if (c != '\\' || i + 1 >= len) {
            SPEED_CHECK(tok_buf_putc(out, c));
            continue;
        }
        char e = pat[i + 1];
        if (e == 's') {
            SPEED_CHECK(tok_buf_append_str(out, in_class ? WS_CLASS : "[" WS_CLASS "]"));
            i++;
            continue;
        }
        if (e == 'S' && !in_class) {
            SPEED_CHECK(tok_buf_append_str(out, "[^" WS_CLASS "]"));
            i++;
            continue;
        }
        if (e == 'p' || e == 'P') {
            /* \pL, \p{L}, \p{N}, ... */
            size_t n;
            char prop[16] = {0};
            if (i + 2 < len && pat[i + 2] == '{') {
                const char *end = memchr(pat + i + 3, '}', len - i - 3);
                if (!end) {
                    SPEED_CHECK(tok_buf_append(out, pat + i, len - i));
                    break;
                }
                n = (size_t)(end - (pat + i)) + 1;
                size_t plen = n - 4;
                if (plen < sizeof prop) memcpy(prop, pat + i + 3, plen);
            } else {
                n = i + 2 < len ? 3 : 2;
                if (n == 3) prop[0] = pat[i + 2];
            }
            bool is_l = strcmp(prop, "L") == 0, is_n = strcmp(prop, "N") == 0;
            if (is_l || is_n) *changed_ln_p = true;
            if (full && (is_l || is_n) && (e == 'p' || !in_class)) {
                const char *extra = is_l ? L_EXTRA : N_EXTRA;
                const char *base = is_l ? "\\p{L}" : "\\p{N}";
                if (!in_class) SPEED_CHECK(tok_buf_append_str(out, e == 'p' ? "[" : "[^"));
                SPEED_CHECK(tok_buf_append_str(out, base));
                SPEED_CHECK(tok_buf_append_str(out, extra));
                if (!in_class) SPEED_CHECK(tok_buf_putc(out, ']'));
            } else {
                SPEED_CHECK(tok_buf_append(out, pat + i, n));
            }
            i += n - 1;
            continue;
        }
        SPEED_CHECK(tok_buf_append(out, pat + i, 2));
        i++;
    }
    return SPEED_OK;
}

static speed_status_t compile_one(pcre2_general_context *gctx, const char *pat, size_t len, bool literal,
                                  const char *path, const char *orig, pcre2_code **code_p) {
    pcre2_compile_context *cctx = pcre2_compile_context_create(gctx);
    if (!cctx) return SPEED_ERR_NO_MEMORY;
    int err;
    PCRE2_SIZE off;
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)pat, len, opts, &err, &off, cctx);
    pcre2_compile_context_free(cctx);
    if (!code) {
        if (err == PCRE2_ERROR_HEAP_FAILED) return SPEED_ERR_NO_MEMORY;
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof msg);
        SPEED_ERROR(SPEED_SUBSYS_TOK, "%s: pre-tokenizer regex \"%s\" does not compile: %s", path, orig,
                    (const char *)msg);
        return SPEED_ERR_FORMAT;
    }
    int rc = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    if (rc == PCRE2_ERROR_NOMEMORY) {
        pcre2_code_free(code);
        return SPEED_ERR_NO_MEMORY;
    }
    /* Any other JIT failure (no JIT on this CPU) leaves the interpreter, which is slower
     * but gives the same matches. */
    *code_p = code;
    return SPEED_OK;
}

speed_status_t tok_regex_compile(pcre2_general_context *gctx, const char *pattern, size_t len, bool literal,
                                 const char *path, tok_regex_t *re) {
    speed_status_t st = SPEED_OK;
    tok_buf_t fast = {0}, full = {0};
    char orig[200];
    size_t olen = len < sizeof orig - 1 ? len : sizeof orig - 1;
    memcpy(orig, pattern, olen);
    orig[olen] = '\0';
    re->fast = re->full = NULL;
    if (literal) {
        st = compile_one(gctx, pattern, len, true, path, orig, &re->fast);
        return st;
    }
    bool has_ln = false;
    SPEED_CHECK_GOTO(patch_pattern(pattern, len, false, &fast, &has_ln), st, out);
    SPEED_CHECK_GOTO(tok_buf_reserve(&fast, 0), st, out);
    SPEED_CHECK_GOTO(compile_one(gctx, fast.p, fast.len, false, path, orig, &re->fast), st, out);
    if (has_ln) {
        SPEED_CHECK_GOTO(patch_pattern(pattern, len, true, &full, &has_ln), st, out);
        SPEED_CHECK_GOTO(compile_one(gctx, full.p, full.len, false, path, orig, &re->full), st, out);
    }
out:
    if (st != SPEED_OK) tok_regex_free(re);
    tok_buf_free(&fast);
    tok_buf_free(&full);
    return st;
}

void tok_regex_free(tok_regex_t *re) {
    pcre2_code_free(re->fast);
    pcre2_code_free(re->full);
    re->fast = re->full = NULL;
}
