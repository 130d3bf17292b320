/* speed_json_budget: how much a JSON text would cost once parsed, found by one cheap pass
 * that allocates nothing, so that a body can be refused before jansson builds it.
 *
 * Why: jansson's memory is not a small multiple of the text. An empty object "{}" is 2
 * bytes of text and a few hundred bytes of json_t with its hash table; a 30 MiB body of
 * "{}," became ~3.4 GB of router memory (issue 10). The budget bounds what a request can
 * make the parser allocate: containers (objects and arrays, the expensive values),
 * elements (every value and key: containers + scalars), and nesting depth. Real requests
 * are far below it: a chat is a few containers per message; a 128K-token prompt given as
 * ids is 128K elements and one container.
 *
 * The pass is not a syntax check (json_strict.h is): it only skips strings (escapes
 * included) and counts brackets and commas. elements = containers + commas + 1 counts
 * each array item and each key/value pair once, which over-estimates by at most one per
 * container. On a malformed text the counts are a bound of what jansson could build
 * before it fails.
 *
 * Threading: no state; any thread. Memory: reads the text, allocates nothing. */
#ifndef SPEED_JSON_BUDGET_H
#define SPEED_JSON_BUDGET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t max_elements;   /* values and keys; 0 = unchecked */
    uint64_t max_containers; /* objects + arrays; 0 = unchecked */
    uint32_t max_depth;      /* nesting of objects/arrays; 0 = unchecked */
} speed_json_budget_t;

/* What a text holds (filled by speed_json_budget_check, also on refusal: then the count
 * that went over is at its limit + 1 and the scan stopped there). */
typedef struct {
    uint64_t elements;
    uint64_t containers;
    uint32_t depth; /* deepest nesting seen */
} speed_json_budget_use_t;

/* True when text[0..len) stays within `budget`. On false, *which_p (may be NULL) names the
 * limit ("elements", "containers" or "depth"). use_p may be NULL. */
bool speed_json_budget_check(const char *text, size_t len, const speed_json_budget_t *budget,
                             speed_json_budget_use_t *use_p, const char **which_p);

#endif /* SPEED_JSON_BUDGET_H */
