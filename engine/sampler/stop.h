/* speed_stop_t: when a sequence ends, and which of its text may be shown.
 *
 * A sequence ends on the first of:
 *   - an end-of-sequence id (EOS, end-of-turn) is generated      → "stop"
 *   - one of the stop strings appears in the detokenized output   → "stop"
 *   - max_tokens tokens have been generated                       → "length"
 * (on the same token, "stop" wins over "length").
 *
 * Stop strings are matched on the text, not on ids, so a stop string split over several
 * tokens ("\n\n" as "\n" + "\n", "User:" as "Us" + "er:") is found. The text is streamed with
 * hold-back: text that could be the start of a stop string is not released until the
 * following text decides it. So streamed text never shows part of a stop string that then
 * matches, the matched stop string itself is never released, and neither is anything after
 * it. Held-back text that turns out not to start a match is released unchanged, so the
 * concatenation of everything released is exactly the output truncated before the first
 * stop string (or the whole output).
 *
 * Use, per sequence: push every generated token with the text the tokenizer's streaming
 * decoder made final for it (speed_tok_stream_push); show what each push releases. Once a
 * push reports a finish reason, call speed_stop_finish with the decoder's flushed tail
 * (speed_tok_stream_flush; may be empty) to release the held-back rest. An EOS token's own
 * text is ignored.
 *
 * Ownership and threads: one speed_stop_t per sequence, used by one thread at a time. The
 * parameters (ids, strings) are copied at create. Released text is owned by the speed_stop_t
 * and valid until its next call. The library does no I/O; errors are logged once.
 */
#ifndef SPEED_STOP_H
#define SPEED_STOP_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef enum {
    SPEED_FINISH_NONE = 0, /* still running (or ended by the caller: cancel, error) */
    SPEED_FINISH_STOP,     /* EOS id or stop string */
    SPEED_FINISH_LENGTH,   /* max_tokens reached */
} speed_finish_reason_t;

/* "stop", "length", or NULL for SPEED_FINISH_NONE (OpenAI's finish_reason values). */
const char *speed_finish_reason_name(speed_finish_reason_t reason);

#define SPEED_STOP_MAX_STRINGS      64
#define SPEED_STOP_MAX_STRING_BYTES 4096

typedef struct {
    const int32_t *eos_ids; /* [n_eos_ids]; may be NULL when n_eos_ids is 0 */
    size_t n_eos_ids;
    const char *const *stop; /* [n_stop] NUL-terminated UTF-8, each 1..SPEED_STOP_MAX_STRING_BYTES */
    size_t n_stop;           /* 0..SPEED_STOP_MAX_STRINGS */
    int64_t max_tokens;      /* >= 1 */
} speed_stop_params_t;

typedef struct speed_stop speed_stop_t;

/* Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (max_tokens < 1, an empty or too long stop
 * string, too many of them, NULL arrays with a non-zero count) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_stop_create(const speed_stop_params_t *params, speed_stop_t **stop_p);
void speed_stop_destroy(speed_stop_t *stop); /* NULL ok */

/* Starts a new sequence with the same parameters. */
void speed_stop_reset(speed_stop_t *stop);

typedef struct {
    const char *text; /* text released now (never NULL; may be empty) */
    size_t len;
    speed_finish_reason_t finish; /* NONE while the sequence goes on */
    int stop_index;               /* which stop string matched, or -1 */
} speed_stop_result_t;

/* Adds one generated token `id` whose decoded text is text[0..len) (may be empty).
 * Returns SPEED_OK (*result filled), SPEED_ERR_INVALID_ARGUMENT (the sequence has already
 * finished: a bug in the caller) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_stop_push(speed_stop_t *stop, int32_t id, const char *text, size_t len,
                               speed_stop_result_t *result);

/* Ends the sequence: appends tail[0..len) (the decoder's flushed rest; may be empty), and
 * releases everything still held back, up to the first stop string. result->finish is the
 * sequence's final reason (STOP if the tail completed a stop string; NONE if the caller ends
 * a sequence that had not finished, e.g. on cancel). After this, only reset is allowed.
 * Returns SPEED_OK or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_stop_finish(speed_stop_t *stop, const char *tail, size_t len, speed_stop_result_t *result);

/* Tokens pushed since create/reset. */
int64_t speed_stop_n_tokens(const speed_stop_t *stop);

#endif /* SPEED_STOP_H */
