/* Differential fuzzing of speed_json_strict_check (daemons/router/json_strict.c) against
 * jansson, the parser it promises to agree with (json_strict.h): a text jansson accepts
 * (JSON_DECODE_ANY, no JSON_ALLOW_NUL) must pass the check unless it nests deeper than
 * SPEED_JSON_STRICT_MAX_DEPTH or holds a NUL byte; a text the check accepts must load in jansson unless jansson
 * ran out of memory or an integer overflowed. The router relies on this to tell a client's
 * bad JSON from its own lack of memory. Also checks speed_json_strict_utf8_len on the input. */
#include <jansson.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "json_strict.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

static int depth_of(const json_t *v) {
    int d = 0;
    if (json_is_array(v)) {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            int k = depth_of(e);
            if (k > d) d = k;
        }
        return d + 1;
    }
    if (json_is_object(v)) {
        const char *key;
        json_t *e;
        json_object_foreach((json_t *)v, key, e) {
            int k = depth_of(e);
            if (k > d) d = k;
        }
        return d + 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    bool strict = speed_json_strict_check(size ? text : NULL, size);
    json_error_t jerr;
    json_t *v = json_loadb(text, size, JSON_DECODE_ANY, &jerr);
    if (v) {
        /* jansson stops at a NUL byte (it reads "0\0x" as 0); the check refuses any NUL, as documented */
        FZ_ASSERT(strict || depth_of(v) > SPEED_JSON_STRICT_MAX_DEPTH || memchr(data, 0, size));
        json_decref(v);
    } else if (strict) {
        enum json_error_code c = json_error_code(&jerr);
        FZ_ASSERT(c == json_error_out_of_memory || c == json_error_numeric_overflow);
    }
    for (size_t i = 0; i < size && i < 64; i++) {
        size_t k = speed_json_strict_utf8_len(data + i, size - i);
        FZ_ASSERT(k <= 4 && k <= size - i);
        if (k == 1) FZ_ASSERT(data[i] < 0x80);
    }
    return 0;
}
