/* speed_json_strict: a strict JSON syntax check that allocates nothing.
 *
 * It accepts a text only if jansson (json_loadb with JSON_DECODE_ANY and no
 * JSON_ALLOW_NUL) would accept it too: one JSON value of any type, then only whitespace;
 * strings in well-formed UTF-8 with no raw control characters (below U+0020), only the
 * standard escapes, no \u0000, and every \uD800-\uDBFF escape followed by a \uDC00-\uDFFF
 * one; numbers in strict JSON form (no leading zeros, no '+', no bare '.', no NaN or
 * Infinity); arrays and objects nested at most SPEED_JSON_STRICT_MAX_DEPTH deep.
 * Duplicate object keys are accepted, as jansson accepts them (the last one wins there).
 *
 * Why it exists: when jansson fails because an allocation failed, it often does not say so
 * (a failed key copy reads as "string or '}' expected"). A caller that gets an error from
 * jansson on a text this check accepts knows the failure was memory, not the text.
 * The check is syntax only: it does not know the size limits of jansson's integers, so a
 * text it accepts may still overflow there (json_error_numeric_overflow says so).
 *
 * Threading: no state; any thread. Memory: reads the text, allocates nothing. Recursion
 * depth is bounded by SPEED_JSON_STRICT_MAX_DEPTH.
 */
#ifndef SPEED_JSON_STRICT_H
#define SPEED_JSON_STRICT_H

#include <stdbool.h>
#include <stddef.h>

/* Deepest nesting of arrays and objects accepted: below jansson's JSON_PARSER_MAX_DEPTH
 * (2048), so that every text accepted here is within jansson's limit. */
#define SPEED_JSON_STRICT_MAX_DEPTH 2000

/* True if text[0..len) is one valid JSON value (any type) with only whitespace around it,
 * under the rules above. text need not be NUL-terminated (a NUL byte inside is rejected);
 * text may be NULL when len is 0 (false: an empty text is not JSON). */
bool speed_json_strict_check(const char *text, size_t len);

/* Length (1..4) of the well-formed UTF-8 character at s[0..n), or 0 when it is not one:
 * a truncated or overlong sequence, a stray continuation byte, an encoded surrogate
 * (U+D800..U+DFFF) or a code point above U+10FFFF. This is the rule JSON text (and so
 * jansson) applies to strings; 0 when n is 0. */
size_t speed_json_strict_utf8_len(const unsigned char *s, size_t n);

#endif /* SPEED_JSON_STRICT_H */
