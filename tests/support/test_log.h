/* The tests' log sinks (library speed_test_common).
 *
 *   speed_log_set_sink(tu_log_discard, NULL)   drop every line: for tests that provoke
 *                                              errors on purpose (speed_log_last_error still
 *                                              holds the last one per thread);
 *   tu_log_capture()                           print every line indented as "  [log W] ...",
 *                                              and count the warnings (tu_n_warnings, the last
 *                                              one's text in tu_last_warning).
 *
 * Thread-safety: the log calls sinks under its own lock, so the counters are updated one
 * line at a time; read them once the threads that log are done. Install sinks before
 * threads start (log.h).
 */
#ifndef SPEED_TESTS_TEST_LOG_H
#define SPEED_TESTS_TEST_LOG_H

#include "log.h"

/* A speed_log_sink_cb_t that drops every line. */
void tu_log_discard(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                    const char *line);

/* Warnings counted since tu_log_capture / tu_warnings_reset, and the last one's text. */
extern int tu_n_warnings;
extern char tu_last_warning[1024];

/* Installs the counting, printing sink. */
void tu_log_capture(void);

/* Zeroes tu_n_warnings and empties tu_last_warning. */
void tu_warnings_reset(void);

#endif /* SPEED_TESTS_TEST_LOG_H */
