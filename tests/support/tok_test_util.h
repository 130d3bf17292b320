/* Helpers shared by the tokenizer tests (library speed_test_tok): where the reference data
 * lives, reading .jsonl vectors, comparing ids with a diff, printing texts.
 *
 * Thread-safety: tok_test_show returns a static buffer (one caller at a time); the rest is
 * reentrant.
 */
#ifndef SPEED_TOK_TEST_UTIL_H
#define SPEED_TOK_TEST_UTIL_H

#include <jansson.h>
#include <stddef.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "tokenizer.h"

/* "$SPEED_TEST_DATA/tokenizers/<name>" into buf; returns 1, or 0 (buf untouched) when
 * $SPEED_TEST_DATA is unset or empty (the caller skips). */
int tok_test_dir(const char *name, char *buf, size_t size);

/* The lines of a .jsonl file as one JSON array (caller json_decref()s), read with
 * JSON_ALLOW_NUL since some texts contain U+0000; blank lines are skipped. NULL (printed)
 * when the file cannot be opened or a line is not JSON. */
json_t *tok_test_read_jsonl(const char *path);

/* True when ids->ids[from..] equal the integers of the JSON array `expect`; on a mismatch
 * prints both sequences, labelled `what`. */
int tok_test_ids_equal(const speed_tok_ids_t *ids, size_t from, const json_t *expect, const char *what);

/* A printable form of text[0..len) for messages: control bytes as \xNN, cut at ~250 bytes.
 * Points to a static buffer overwritten by the next call. */
const char *tok_test_show(const char *s, size_t len);

#endif /* SPEED_TOK_TEST_UTIL_H */
