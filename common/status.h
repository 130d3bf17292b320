/* speedserve status codes.
 *
 * One enum for the whole project. 0 is success; errors are negative and grouped
 * by how far their consequences reach:
 *   -1   .. -99   one request: bad input, limits, capacity (capacity is retryable)
 *   -100 .. -199  one peer: drop or reconnect it
 *   -200 .. -299  the whole node: drain and exit
 * Later issues map these to HTTP/OpenAI errors and gRPC codes with one table each.
 *
 * Thread-safety: everything here is pure and may be called from any thread.
 */
#ifndef SPEED_STATUS_H
#define SPEED_STATUS_H

#include <stdbool.h>

typedef enum {
    SPEED_OK = 0,

    /* one request */
    SPEED_ERR_INVALID_ARGUMENT = -1, /* a parameter is malformed or out of range */
    SPEED_ERR_NOT_FOUND = -2,        /* a named thing (file, tensor, token, key) does not exist */
    SPEED_ERR_PARSE = -3,            /* text (JSON, YAML, numbers) could not be parsed */
    SPEED_ERR_FORMAT = -4,           /* well-formed input that breaks a format's rules */
    SPEED_ERR_UNSUPPORTED = -5,      /* valid, but not something speedserve implements */
    SPEED_ERR_TOO_LONG = -6,         /* exceeds a length limit (prompt, context) */
    SPEED_ERR_CAPACITY = -7,         /* no room right now (KV blocks, queue); retry later */
    SPEED_ERR_CANCELLED = -8,        /* the request was cancelled */
    SPEED_ERR_TIMEOUT = -9,          /* a deadline passed */
    SPEED_ERR_NO_MEMORY = -10,       /* a host allocation failed */

    /* one peer */
    SPEED_ERR_PEER_UNREACHABLE = -100,
    SPEED_ERR_PEER_PROTOCOL = -101,
    SPEED_ERR_TRANSFER = -102,

    /* whole node */
    SPEED_ERR_IO = -200,       /* an OS call on a file or socket failed */
    SPEED_ERR_DEVICE = -201,   /* the compute device failed */
    SPEED_ERR_INTERNAL = -202, /* a bug: a state that should be impossible */
} speed_status_t;

/* Short lowercase name of a status, e.g. "invalid argument". Never NULL;
 * unknown values give "unknown status". */
const char *speed_status_string(speed_status_t status);

/* True for statuses a caller may retry unchanged later (capacity, timeout, peer). */
bool speed_status_is_retryable(speed_status_t status);

/* Propagate a failing status to the caller. */
#define SPEED_CHECK(call)                                                \
    do {                                                                 \
        speed_status_t speed_check_status_ = (call);                     \
        if (speed_check_status_ != SPEED_OK) return speed_check_status_; \
    } while (0)

/* Store a failing status in `status` and jump to a cleanup label. */
#define SPEED_CHECK_GOTO(call, status, label) \
    do {                                      \
        (status) = (call);                    \
        if ((status) != SPEED_OK) goto label; \
    } while (0)

/* Broken invariant: always on, aborts with file:line. Never for input errors. */
#define SPEED_ASSERT(cond)                                         \
    do {                                                           \
        if (!(cond)) speed_assert_fail(#cond, __FILE__, __LINE__); \
    } while (0)

_Noreturn void speed_assert_fail(const char *expr, const char *file, int line);

#endif /* SPEED_STATUS_H */
