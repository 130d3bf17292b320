/* router/json_strict: the strict JSON syntax check on its own. Each case names the rule it
 * tests, and each is also given to jansson: the check must accept only what jansson accepts
 * (json_strict.h), so a dropped rule shows up twice, as a wrong answer and as a
 * disagreement with jansson. Also the UTF-8 rule, the depth limit, and that the length
 * bounds what is read. */
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "json_strict.h"

/* How jansson answers a case. */
enum {
    J_SAME = 0, /* as the check does */
    J_OVERFLOW, /* rejects with json_error_numeric_overflow (the check is syntax only) */
};

typedef struct {
    const char *what;
    const char *text;
    size_t len; /* 0: strlen(text) */
    bool ok;
    int jansson;
} strict_case_t;

/* Texts with a NUL byte inside give their length. */
#define NUL_CASE(what, lit, ok) \
    { what, lit, sizeof(lit) - 1, ok, J_SAME }

static const strict_case_t cases[] = {
    /* values of every type, with whitespace around */
    {"empty object", "{}", 0, true, J_SAME},
    {"empty array", "[]", 0, true, J_SAME},
    {"nested", " \t\r\n{\"a\":[1,2,{\"b\":null}],\"c\":{}} \n", 0, true, J_SAME},
    {"top-level string", "\"x\"", 0, true, J_SAME},
    {"top-level number", " 42 ", 0, true, J_SAME},
    {"true", "true", 0, true, J_SAME},
    {"false", "false", 0, true, J_SAME},
    {"null", "null", 0, true, J_SAME},
    {"duplicate keys (jansson keeps the last)", "{\"a\":1,\"a\":2}", 0, true, J_SAME},

    /* numbers */
    {"zero", "0", 0, true, J_SAME},
    {"minus zero", "-0", 0, true, J_SAME},
    {"fraction and exponent", "-12.5e-3", 0, true, J_SAME},
    {"exponent with plus", "1E+4", 0, true, J_SAME},
    {"leading zero", "01", 0, false, J_SAME},
    {"leading zero in an array", "[01]", 0, false, J_SAME},
    {"plus sign", "+1", 0, false, J_SAME},
    {"bare fraction", ".5", 0, false, J_SAME},
    {"dot without digits", "1.", 0, false, J_SAME},
    {"exponent without digits", "1e", 0, false, J_SAME},
    {"signed exponent without digits", "1e+", 0, false, J_SAME},
    {"minus alone", "-", 0, false, J_SAME},
    {"double minus", "--1", 0, false, J_SAME},
    {"hexadecimal", "0x10", 0, false, J_SAME},
    {"NaN", "NaN", 0, false, J_SAME},
    {"Infinity", "Infinity", 0, false, J_SAME},
    {"-Infinity", "[-Infinity]", 0, false, J_SAME},
    /* syntax only: a number too large for jansson passes the check */
    {"integer beyond 64 bits", "123456789012345678901234567890", 0, true, J_OVERFLOW},
    {"real beyond double", "1e400", 0, true, J_OVERFLOW},

    /* words */
    {"truncated word", "tru", 0, false, J_SAME},
    {"capitalised word", "True", 0, false, J_SAME},
    {"word with a tail", "nulls", 0, false, J_SAME},

    /* structure */
    {"empty text", "", 0, false, J_SAME},
    {"only whitespace", " \n\t ", 0, false, J_SAME},
    {"second value", "{} {}", 0, false, J_SAME},
    {"two numbers", "1 2", 0, false, J_SAME},
    {"trailing garbage", "{}x", 0, false, J_SAME},
    {"extra bracket", "[]]", 0, false, J_SAME},
    {"trailing comma in an array", "[1,]", 0, false, J_SAME},
    {"trailing comma in an object", "{\"a\":1,}", 0, false, J_SAME},
    {"leading comma", "[,1]", 0, false, J_SAME},
    {"missing colon", "{\"a\" 1}", 0, false, J_SAME},
    {"missing value", "{\"a\":}", 0, false, J_SAME},
    {"number as key", "{1:2}", 0, false, J_SAME},
    {"single quotes", "['a']", 0, false, J_SAME},
    {"unclosed array", "[1", 0, false, J_SAME},
    {"unclosed object", "{\"a\":1", 0, false, J_SAME},
    {"mismatched close", "[1}", 0, false, J_SAME},
    {"comment", "/* c */ {}", 0, false, J_SAME},
    {"form feed is not whitespace", "\f{}", 0, false, J_SAME},

    /* strings: escapes */
    {"every simple escape", "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", 0, true, J_SAME},
    {"unicode escape", "\"\\u00e9\\u20AC\"", 0, true, J_SAME},
    {"surrogate pair", "\"\\uD83D\\uDE00\"", 0, true, J_SAME},
    {"unknown escape", "\"\\x41\"", 0, false, J_SAME},
    {"escaped single quote", "\"\\'\"", 0, false, J_SAME},
    {"short unicode escape", "\"\\u12\"", 0, false, J_SAME},
    {"non-hex unicode escape", "\"\\u12G4\"", 0, false, J_SAME},
    {"backslash at the end", "\"\\", 0, false, J_SAME},
    {"\\u0000", "\"a\\u0000b\"", 0, false, J_SAME},
    {"lone high surrogate", "\"\\uD800\"", 0, false, J_SAME},
    {"high surrogate then a character", "\"\\uD800x\"", 0, false, J_SAME},
    {"high surrogate then a non-surrogate escape", "\"\\uD800\\u0041\"", 0, false, J_SAME},
    {"two high surrogates", "\"\\uD800\\uD800\"", 0, false, J_SAME},
    {"lone low surrogate", "\"\\uDC00\"", 0, false, J_SAME},
    {"unterminated string", "\"abc", 0, false, J_SAME},

    /* strings: raw bytes */
    {"two-byte UTF-8", "\"\xC3\xA9\"", 0, true, J_SAME},
    {"three-byte UTF-8", "\"\xE2\x82\xAC\"", 0, true, J_SAME},
    {"four-byte UTF-8", "\"\xF0\x9F\x98\x80\"", 0, true, J_SAME},
    {"DEL is not a control character here", "\"\x7F\"", 0, true, J_SAME},
    {"raw newline", "\"a\nb\"", 0, false, J_SAME},
    {"raw tab", "\"a\tb\"", 0, false, J_SAME},
    {"raw 0x1F", "\"a\x1F\"", 0, false, J_SAME},
    NUL_CASE("raw NUL in a string", "\"a\0b\"", false),
    NUL_CASE("NUL after the value", "{}\0", false),
    NUL_CASE("NUL after a backslash", "\"\\\0\"", false),
    {"overlong NUL", "\"\xC0\x80\"", 0, false, J_SAME},
    {"overlong two-byte", "\"\xC1\xBF\"", 0, false, J_SAME},
    {"overlong three-byte", "\"\xE0\x80\xAF\"", 0, false, J_SAME},
    {"encoded surrogate", "\"\xED\xA0\x80\"", 0, false, J_SAME},
    {"above U+10FFFF", "\"\xF4\x90\x80\x80\"", 0, false, J_SAME},
    {"lead byte 0xF5", "\"\xF5\x80\x80\x80\"", 0, false, J_SAME},
    {"stray continuation byte", "\"\x80\"", 0, false, J_SAME},
    {"truncated sequence", "\"\xE2\x82\"", 0, false, J_SAME},
    {"bad continuation", "\"\xC3\x41\"", 0, false, J_SAME},
    {"invalid UTF-8 in a key", "{\"\xFF\":1}", 0, false, J_SAME},
};

static bool jansson_accepts(const char *text, size_t len, enum json_error_code *code_p) {
    json_error_t e;
    memset(&e, 0, sizeof e);
    json_t *v = json_loadb(text, len, JSON_DECODE_ANY, &e);
    *code_p = json_error_code(&e);
    json_decref(v);
    return v != NULL;
}

static void test_cases(void) {
    size_t n = sizeof cases / sizeof cases[0];
    for (size_t i = 0; i < n; i++) {
        const strict_case_t *c = &cases[i];
        size_t len = c->len ? c->len : strlen(c->text);
        /* an exact-size copy: reading past len would leave it (and show under ASan) */
        char *copy = malloc(len ? len : 1);
        memcpy(copy, c->text, len);
        bool got = speed_json_strict_check(copy, len);
        CHECK_MSG(got == c->ok, "%s: check says %s", c->what, got ? "valid" : "invalid");

        enum json_error_code code;
        bool jok = jansson_accepts(copy, len, &code);
        if (c->jansson == J_OVERFLOW)
            CHECK_MSG(!jok && code == json_error_numeric_overflow, "%s: jansson accepted it or failed otherwise (%d)",
                      c->what, (int)code);
        else
            CHECK_MSG(jok == c->ok, "%s: jansson says %s", c->what, jok ? "valid" : "invalid");
        free(copy);
    }
    fprintf(stderr, "strict check: %zu cases\n", n);
}

/* The length bounds the read: a valid prefix is judged alone, a cut value is invalid. */
static void test_length(void) {
    CHECK(speed_json_strict_check("[1,2]xyz", 5));
    CHECK(!speed_json_strict_check("[1,2]", 4));
    CHECK(!speed_json_strict_check("\"abc\"", 3));
    CHECK(!speed_json_strict_check("true", 3));
    CHECK(!speed_json_strict_check("12", 0));
    CHECK(!speed_json_strict_check(NULL, 0));
}

/* `depth` nested arrays, or objects {"k": ...} when `objects`, around 0. */
static char *nest(int depth, bool objects, size_t *len_p) {
    size_t cap = (size_t)depth * 6 + 2;
    char *b = malloc(cap);
    size_t o = 0;
    for (int i = 0; i < depth; i++) {
        if (objects) {
            memcpy(b + o, "{\"k\":", 5);
            o += 5;
        } else {
            b[o++] = '[';
        }
    }
    b[o++] = '0';
    for (int i = 0; i < depth; i++) b[o++] = objects ? '}' : ']';
    *len_p = o;
    return b;
}

/* SPEED_JSON_STRICT_MAX_DEPTH levels pass, one more fails, and jansson accepts everything
 * the check accepts there. */
static void test_depth(void) {
    for (int objects = 0; objects <= 1; objects++) {
        const int depths[] = {1, SPEED_JSON_STRICT_MAX_DEPTH, SPEED_JSON_STRICT_MAX_DEPTH + 1, 2049, 100000};
        for (size_t i = 0; i < sizeof depths / sizeof depths[0]; i++) {
            size_t len = 0;
            char *b = nest(depths[i], objects, &len);
            bool want = depths[i] <= SPEED_JSON_STRICT_MAX_DEPTH;
            bool got = speed_json_strict_check(b, len);
            CHECK_MSG(got == want, "%s nested %d deep: check says %s", objects ? "objects" : "arrays", depths[i],
                      got ? "valid" : "invalid");
            enum json_error_code code;
            if (got) CHECK_MSG(jansson_accepts(b, len, &code), "jansson refuses depth %d", depths[i]);
            free(b);
        }
    }
}

static void test_utf8_len(void) {
    static const struct {
        const char *s;
        size_t n;
        size_t want;
    } u[] = {
        {"A", 1, 1},
        {"\x7F", 1, 1},
        {"\xC2\x80", 2, 2}, /* U+0080, the smallest two-byte */
        {"\xC3\xA9", 2, 2},
        {"\xC3\xA9", 1, 0},     /* cut by n */
        {"\xE0\xA0\x80", 3, 3}, /* U+0800, the smallest three-byte */
        {"\xE0\x9F\xBF", 3, 0}, /* overlong U+07FF */
        {"\xE2\x82\xAC", 3, 3},
        {"\xED\x9F\xBF", 3, 3},     /* U+D7FF, just below the surrogates */
        {"\xED\xA0\x80", 3, 0},     /* U+D800 */
        {"\xED\xBF\xBF", 3, 0},     /* U+DFFF */
        {"\xEE\x80\x80", 3, 3},     /* U+E000, just above */
        {"\xF0\x90\x80\x80", 4, 4}, /* U+10000, the smallest four-byte */
        {"\xF0\x8F\xBF\xBF", 4, 0}, /* overlong U+FFFF */
        {"\xF4\x8F\xBF\xBF", 4, 4}, /* U+10FFFF */
        {"\xF4\x90\x80\x80", 4, 0}, /* U+110000 */
        {"\xF0\x9F\x98\x80", 3, 0}, /* cut by n */
        {"\xC0\x80", 2, 0},
        {"\xC1\xBF", 2, 0},
        {"\x80", 1, 0},
        {"\xBF", 1, 0},
        {"\xF8\x88\x80\x80\x80", 5, 0},
        {"\xFF", 1, 0},
        {"\xC3\x41", 2, 0}, /* continuation byte missing */
        {"\xE2\x28\xA1", 3, 0},
        {"A", 0, 0}, /* nothing to read */
    };
    for (size_t i = 0; i < sizeof u / sizeof u[0]; i++) {
        size_t got = speed_json_strict_utf8_len((const unsigned char *)u[i].s, u[i].n);
        CHECK_MSG(got == u[i].want, "utf8 case %zu: %zu, want %zu", i, got, u[i].want);
    }
}

int main(void) {
    test_cases();
    test_length();
    test_depth();
    test_utf8_len();
    return CHECK_DONE();
}
