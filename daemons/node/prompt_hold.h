/* speed_prompt_hold: a decode node's reserved prompts' block hashes, from Decode.Reserve (which
 * carries the prompt ids) to the Generate that claims the reservation, so that the node can
 * journal the prompt's blocks as stored when the request completes (cache events, KV-aware
 * routing: cache_journal.h). The disaggregated route's Generate carries no prompt.
 *
 * Bounded: at most n_max entries (a full table drops its oldest entry: a routing hint lost);
 * an entry older than ttl_ms (its reservation's lease ended unclaimed, or was cancelled) is
 * dropped at the next put. An entry whose request id is put again is replaced.
 *
 * Threading: every function may be called from any thread (one mutex; O(n_max) per call).
 * Memory: from speed_malloc; the hashes of at most n_max prompts.
 */
#ifndef SPEED_PROMPT_HOLD_H
#define SPEED_PROMPT_HOLD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct speed_prompt_hold speed_prompt_hold_t;

/* Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (n_max 0 or above 2^20, ttl_ms < 1) or
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_prompt_hold_create(size_t n_max, int64_t ttl_ms, speed_prompt_hold_t **hold_p);
void speed_prompt_hold_destroy(speed_prompt_hold_t *hold); /* NULL ok */

/* Keeps a copy of hashes[0..n-1] (n may be 0) under request_id (copied; at most 127 bytes, a
 * longer id is not kept). Out of memory: nothing is kept (a hint lost). */
void speed_prompt_hold_put(speed_prompt_hold_t *hold, const char *request_id, const uint64_t *hashes, size_t n);

/* Moves the entry of request_id out: *hashes_p (speed_free it; NULL when n is 0) and *n_p.
 * False (nothing set) when there is none. */
bool speed_prompt_hold_take(speed_prompt_hold_t *hold, const char *request_id, uint64_t **hashes_p, size_t *n_p);

/* Entries held now. */
size_t speed_prompt_hold_size(speed_prompt_hold_t *hold);

#endif /* SPEED_PROMPT_HOLD_H */
