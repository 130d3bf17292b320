#include "log.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "clock.h"

static const char *const level_names[] = {"error", "warn", "info", "debug", "trace"};
static const char level_letters[] = "EWIDT";
static const char *const subsys_names[SPEED_SUBSYS_COUNT] = {
    "core", "model", "tok", "engine", "kv", "net", "cli",
};

static struct {
    pthread_mutex_t lock;
    int level[SPEED_SUBSYS_COUNT];
    speed_log_sink_cb_t sink;
    void *sink_user;
} g_log = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .level = {SPEED_LOG_INFO, SPEED_LOG_INFO, SPEED_LOG_INFO, SPEED_LOG_INFO, SPEED_LOG_INFO, SPEED_LOG_INFO,
              SPEED_LOG_INFO},
};

static _Thread_local char t_last_error[1024];

const char *speed_log_subsys_name(speed_log_subsys_t subsys) {
    return (unsigned)subsys < SPEED_SUBSYS_COUNT ? subsys_names[subsys] : "?";
}

speed_status_t speed_log_level_parse(const char *name, speed_log_level_t *level_p) {
    for (int i = 0; i <= SPEED_LOG_TRACE; i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            *level_p = (speed_log_level_t)i;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_INVALID_ARGUMENT;
}

static int subsys_parse(const char *name, size_t len) {
    for (int i = 0; i < SPEED_SUBSYS_COUNT; i++)
        if (strlen(subsys_names[i]) == len && strncasecmp(name, subsys_names[i], len) == 0) return i;
    return -1;
}

speed_status_t speed_log_configure(const char *spec) {
    int levels[SPEED_SUBSYS_COUNT];
    char item[64];
    pthread_mutex_lock(&g_log.lock);
    memcpy(levels, g_log.level, sizeof levels);
    pthread_mutex_unlock(&g_log.lock);

    const char *p = spec;
    while (*p) {
        size_t n = strcspn(p, ",");
        if (n == 0 || n >= sizeof item) return SPEED_ERR_INVALID_ARGUMENT;
        memcpy(item, p, n);
        item[n] = '\0';
        char *eq = strchr(item, '=');
        speed_log_level_t lvl;
        if (eq) {
            *eq = '\0';
            int s = subsys_parse(item, strlen(item));
            if (s < 0 || speed_log_level_parse(eq + 1, &lvl) != SPEED_OK) return SPEED_ERR_INVALID_ARGUMENT;
            levels[s] = (int)lvl;
        } else {
            if (speed_log_level_parse(item, &lvl) != SPEED_OK) return SPEED_ERR_INVALID_ARGUMENT;
            for (int s = 0; s < SPEED_SUBSYS_COUNT; s++) levels[s] = (int)lvl;
        }
        p += n;
        if (*p == ',') p++;
    }
    pthread_mutex_lock(&g_log.lock);
    memcpy(g_log.level, levels, sizeof levels);
    pthread_mutex_unlock(&g_log.lock);
    return SPEED_OK;
}

void speed_log_set_sink(speed_log_sink_cb_t sink, void *user) {
    pthread_mutex_lock(&g_log.lock);
    g_log.sink = sink;
    g_log.sink_user = user;
    pthread_mutex_unlock(&g_log.lock);
}

int speed_log_enabled(speed_log_level_t level, speed_log_subsys_t subsys) {
    if ((unsigned)subsys >= SPEED_SUBSYS_COUNT) subsys = SPEED_SUBSYS_CORE;
    /* A racy read is fine: levels change only at configuration time. */
    return level == SPEED_LOG_ERROR || (int)level <= __atomic_load_n(&g_log.level[subsys], __ATOMIC_RELAXED);
}

const char *speed_log_last_error(void) { return t_last_error; }
void speed_log_clear_last_error(void) { t_last_error[0] = '\0'; }

void speed_logv(speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id, const char *fmt,
                va_list ap) {
    if ((unsigned)subsys >= SPEED_SUBSYS_COUNT) subsys = SPEED_SUBSYS_CORE;
    if ((unsigned)level > SPEED_LOG_TRACE) level = SPEED_LOG_TRACE;
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    /* Messages are one line by contract; fold any stray newline. */
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
    if (level == SPEED_LOG_ERROR) snprintf(t_last_error, sizeof t_last_error, "%s", msg);
    if (!speed_log_enabled(level, subsys)) return;

    pthread_mutex_lock(&g_log.lock);
    if (g_log.sink) {
        g_log.sink(g_log.sink_user, level, subsys, request_id, msg);
    } else {
        struct timespec ts = speed_clock_now(CLOCK_REALTIME);
        struct tm tm;
        char when[32];
        gmtime_r(&ts.tv_sec, &tm);
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
        if (request_id && request_id[0])
            fprintf(stderr, "%s.%03ldZ %c %s [%s] %s\n", when, ts.tv_nsec / 1000000, level_letters[level],
                    subsys_names[subsys], request_id, msg);
        else
            fprintf(stderr, "%s.%03ldZ %c %s %s\n", when, ts.tv_nsec / 1000000, level_letters[level],
                    subsys_names[subsys], msg);
    }
    pthread_mutex_unlock(&g_log.lock);
}

void speed_log(speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    speed_logv(level, subsys, request_id, fmt, ap);
    va_end(ap);
}
