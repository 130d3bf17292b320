/* speedserve logging.
 *
 * One line per event on stderr (or a sink installed by the process):
 *   2026-11-25T20:14:05.123Z E model [req-42] model.safetensors: header length past end of file
 * Levels filter globally; each subsystem can be raised or lowered on its own
 * (speed_log_configure("info,tok=debug")).
 *
 * Errors are logged once, where they are born. The text of the last ERROR logged on
 * the calling thread is kept (speed_log_last_error) so that a caller such as a CLI or
 * an HTTP handler can show the cause without logging it twice.
 *
 * Thread-safety: all functions may be called from any thread. Configuration calls
 * (speed_log_configure, speed_log_set_sink) should happen before threads start.
 */
#ifndef SPEED_LOG_H
#define SPEED_LOG_H

#include <stdarg.h>

#include "status.h"

typedef enum {
    SPEED_LOG_ERROR = 0,
    SPEED_LOG_WARN = 1,
    SPEED_LOG_INFO = 2,
    SPEED_LOG_DEBUG = 3,
    SPEED_LOG_TRACE = 4,
} speed_log_level_t;

/* Subsystems: where a message comes from. Keep speed_log_subsys_names in sync. */
typedef enum {
    SPEED_SUBSYS_CORE = 0, /* process services: config, alloc */
    SPEED_SUBSYS_MODEL,    /* model loading, safetensors */
    SPEED_SUBSYS_TOK,      /* tokenizer, chat templates */
    SPEED_SUBSYS_ENGINE,   /* forward pass, batching */
    SPEED_SUBSYS_KV,       /* KV cache and transfer */
    SPEED_SUBSYS_NET,      /* gRPC, HTTP, UCX */
    SPEED_SUBSYS_CLI,      /* speedctl */
    SPEED_SUBSYS_COUNT
} speed_log_subsys_t;

/* Receives every formatted message that passes the filters. `line` is the message
 * without timestamp or newline. Called with an internal lock held: do not log from it. */
typedef void (*speed_log_sink_cb_t)(void *user, speed_log_level_t level, speed_log_subsys_t subsys,
                                    const char *request_id, const char *line);

/* "error" | "warn" | "info" | "debug" | "trace", optionally followed by
 * ",subsys=level" pairs, e.g. "warn,tok=debug". Returns SPEED_ERR_INVALID_ARGUMENT
 * (and changes nothing) on an unknown level or subsystem name. */
speed_status_t speed_log_configure(const char *spec);

/* Parse a single level name. */
speed_status_t speed_log_level_parse(const char *name, speed_log_level_t *level_p);

const char *speed_log_subsys_name(speed_log_subsys_t subsys);

/* Install a sink (NULL restores stderr). */
void speed_log_set_sink(speed_log_sink_cb_t sink, void *user);

/* True if a message at this level from this subsystem would be emitted. */
int speed_log_enabled(speed_log_level_t level, speed_log_subsys_t subsys);

/* The last ERROR message logged by this thread ("" if none). Valid until the
 * next log call on this thread. */
const char *speed_log_last_error(void);
void speed_log_clear_last_error(void);

/* request_id may be NULL. */
void speed_log(speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void speed_logv(speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id, const char *fmt,
                va_list ap);

#define SPEED_LOG_(lvl, subsys, ...)                                                   \
    do {                                                                               \
        if (speed_log_enabled(lvl, subsys)) speed_log(lvl, subsys, NULL, __VA_ARGS__); \
    } while (0)
#define SPEED_ERROR(subsys, ...) SPEED_LOG_(SPEED_LOG_ERROR, subsys, __VA_ARGS__)
#define SPEED_WARN(subsys, ...)  SPEED_LOG_(SPEED_LOG_WARN, subsys, __VA_ARGS__)
#define SPEED_INFO(subsys, ...)  SPEED_LOG_(SPEED_LOG_INFO, subsys, __VA_ARGS__)
#define SPEED_DEBUG(subsys, ...) SPEED_LOG_(SPEED_LOG_DEBUG, subsys, __VA_ARGS__)

#endif /* SPEED_LOG_H */
