/* speed_router_keys: the router's API keys and what each may use at once.
 *
 * Keys come from router.api_keys (comma-separated; a secret, so from the environment
 * SPEED_ROUTER_API_KEYS or the cluster file, never argv) and from router.api_keys_file:
 *
 *     # comment lines and blank lines are ignored
 *     sk-alpha-1f0c...                                   the defaults (router.key_*)
 *     sk-batch-77ab... name=batch max_in_flight=2 max_kv_tokens=65536 rate=0.5 burst=4
 *
 * One key per line, then optional NAME=VALUE overrides: name (the label in metrics and
 * logs, [A-Za-z0-9_.-], default "key<line>" / "env<i>"), max_in_flight, max_kv_tokens,
 * rate (requests/s), burst; 0 = unlimited as for the router.key_* defaults. A key has no
 * whitespace and does not start with '#'. Errors name the file and line, never the key.
 *
 * Limits (each 0 = unlimited):
 *   - in flight: requests of the key between their headers and the end of their answer;
 *   - KV tokens: the router's estimate of the KV a request reserves (prompt + max_tokens),
 *     summed over the key's requests that are running;
 *   - rate: a token bucket of depth `burst` (0: max(1, rate)) refilled at `rate` per s.
 * Over a limit the request gets 429 with Retry-After and an OpenAI error naming the limit.
 *
 * Threading: the table is immutable after create; each key's counters are guarded by its
 * own lock; every function may be called from any thread. */
#ifndef SPEED_ROUTER_API_KEYS_H
#define SPEED_ROUTER_API_KEYS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "openai.h"
#include "status.h"

typedef struct {
    int64_t max_in_flight;
    int64_t max_kv_tokens;
    double rate; /* requests per second */
    int64_t burst;
} speed_router_key_limits_t;

typedef struct speed_router_keys speed_router_keys_t;
typedef struct speed_router_key speed_router_key_t;

/* Builds the table from `list` (comma-separated, may be NULL/"") and `file` (may be
 * NULL/""). No key at all = authentication off. Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT
 * (a bad line or a duplicate key: logged with file:line); the errors of speed_file_read;
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_router_keys_create(const char *list, const char *file, const speed_router_key_limits_t *defaults,
                                        speed_router_keys_t **keys_p);
void speed_router_keys_destroy(speed_router_keys_t *keys); /* NULL ok; wipes the keys */

size_t speed_router_keys_count(const speed_router_keys_t *keys);

/* Checks an Authorization header value (speed_openai_auth_check: Bearer, constant time).
 * True with *key_p = the key (NULL when authentication is off); false with *err the 401. */
bool speed_router_keys_check(const speed_router_keys_t *keys, const char *authorization, speed_router_key_t **key_p,
                             speed_openai_error_t *err);

/* The key's name (never the key). */
const char *speed_router_key_name(const speed_router_key_t *key);

/* Rate and in-flight limits for a new request at monotonic time now_s. True: admitted (the
 * key counts it in flight until speed_router_key_leave). False: *err is the 429,
 * *retry_after_s_p the seconds to wait (>= 1), *limit_p "rate" or "in_flight". */
bool speed_router_key_enter(speed_router_key_t *key, double now_s, speed_openai_error_t *err, int *retry_after_s_p,
                            const char **limit_p);
void speed_router_key_leave(speed_router_key_t *key);

/* Reserves `tokens` of the key's KV budget. True: reserved (give it back with
 * speed_router_key_kv_release). False: *err is the 429 (limit "kv_tokens"). */
bool speed_router_key_kv_reserve(speed_router_key_t *key, int64_t tokens, speed_openai_error_t *err);
void speed_router_key_kv_release(speed_router_key_t *key, int64_t tokens);

#endif /* SPEED_ROUTER_API_KEYS_H */
