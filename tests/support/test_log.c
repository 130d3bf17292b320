/* The tests' log sinks: see test_log.h. */
#include "test_log.h"

#include <stdio.h>

int tu_n_warnings;
char tu_last_warning[1024];

void tu_log_discard(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                    const char *line) {
    (void)user, (void)level, (void)subsys, (void)request_id, (void)line;
}

static void tu_log_count(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                         const char *line) {
    (void)user, (void)subsys, (void)request_id;
    if (level == SPEED_LOG_WARN) {
        tu_n_warnings++;
        snprintf(tu_last_warning, sizeof tu_last_warning, "%s", line);
    }
    fprintf(stderr, "  [log %c] %s\n", "EWIDT"[level], line);
}

void tu_log_capture(void) { speed_log_set_sink(tu_log_count, NULL); }

void tu_warnings_reset(void) {
    tu_n_warnings = 0;
    tu_last_warning[0] = '\0';
}
