/* Integration-test helpers: a scratch directory with a tiny model, real daemons started as
 * child processes on loopback ports unique to this test process, health waits, metrics reads,
 * and `speedctl generate --json` as the reference. */
#ifndef SPEED_CLUSTER_UTIL_H
#define SPEED_CLUSTER_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "http.h"

static char cu_dir[512];
static char cu_bin[512];      /* directory of speedctl and the daemons */
static int cu_port_base;

static inline double cu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Runs a shell command, returns its exit status (-1 if it did not exit). */
static inline int cu_system(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* Scratch dir, binaries dir (from $SPEEDCTL), a tiny model at <dir>/model, and a port base
 * unique to this process (so ctest -j runs tests side by side). Exits 77 when $SPEEDCTL is
 * not set (not run by ctest). */
static inline void cu_init(const char *name) {
    const char *speedctl = getenv("SPEEDCTL");
    if (!speedctl || !*speedctl) {
        fprintf(stderr, "SKIP: SPEEDCTL is not set (run through ctest)\n");
        exit(77);
    }
    snprintf(cu_bin, sizeof cu_bin, "%s", speedctl);
    char *slash = strrchr(cu_bin, '/');
    if (slash) *slash = '\0';
    const char *tmp = getenv("SPEED_TEST_TMP");
    snprintf(cu_dir, sizeof cu_dir, "%s/%s-XXXXXX", tmp && *tmp ? tmp : "/tmp", name);
    if (!mkdtemp(cu_dir)) {
        fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
        exit(1);
    }
    cu_port_base = 20000 + (int)(getpid() % 400) * 100;
    if (cu_system("%s/speedctl make-tiny-model %s/model > %s/make-model.log 2>&1", cu_bin, cu_dir, cu_dir) != 0) {
        fprintf(stderr, "make-tiny-model failed (see %s/make-model.log)\n", cu_dir);
        exit(1);
    }
    setenv("UCX_TCP_CM_REUSEADDR", "y", 1);
    setenv("UCX_NET_DEVICES", "lo", 1);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
    unsetenv("SPEED_CONFIG");
    unsetenv("SPEED_MODEL");
}

typedef struct {
    pid_t pid;
    char name[64];
} cu_proc_t;

/* Starts bin/<prog> with the NULL-terminated extra args; stdout+stderr go to <dir>/<name>.log. */
static inline cu_proc_t cu_spawn(const char *prog, const char *name, const char *const *args) {
    cu_proc_t p = {0};
    snprintf(p.name, sizeof p.name, "%s", name);
    char path[1024], log[1024];
    snprintf(path, sizeof path, "%s/%s", cu_bin, prog);
    snprintf(log, sizeof log, "%s/%s.log", cu_dir, name);
    const char *argv[64];
    int n = 0;
    argv[n++] = path;
    for (int i = 0; args[i] && n < 63; i++) argv[n++] = args[i];
    argv[n] = NULL;
    p.pid = fork();
    if (p.pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(path, (char *const *)argv);
        _exit(127);
    }
    return p;
}

/* Sends sig and waits up to timeout_s; returns the exit code, 128+signal, or -1 on timeout
 * (then the process is killed). */
static inline int cu_stop(cu_proc_t *p, int sig, double timeout_s) {
    if (p->pid <= 0) return -1;
    kill(p->pid, sig);
    double t0 = cu_now();
    for (;;) {
        int status;
        pid_t r = waitpid(p->pid, &status, WNOHANG);
        if (r == p->pid) {
            p->pid = 0;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        if (cu_now() - t0 > timeout_s) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &status, 0);
            p->pid = 0;
            return -1;
        }
        usleep(20000);
    }
}

/* GET http://127.0.0.1:port/path until it answers 200 or timeout_s passes. */
static inline bool cu_wait_ok(int port, const char *path, double timeout_s) {
    double t0 = cu_now();
    while (cu_now() - t0 < timeout_s) {
        int status = 0;
        char *body = NULL;
        if (speed_http_get("127.0.0.1", (uint16_t)port, path, 1000, &status, &body) == SPEED_OK) {
            speed_free(body);
            if (status == 200) return true;
        }
        usleep(100000);
    }
    return false;
}

/* Value of an unlabelled sample in a /metrics page, or NAN. */
static inline double cu_metric(int port, const char *name) {
    int status = 0;
    char *body = NULL;
    double v = 0.0 / 0.0;
    if (speed_http_get("127.0.0.1", (uint16_t)port, "/metrics", 2000, &status, &body) != SPEED_OK) return v;
    size_t n = strlen(name);
    for (char *line = body; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, name, n) == 0 && line[n] == ' ') {
            v = strtod(line + n + 1, NULL);
            break;
        }
        line = nl ? nl + 1 : NULL;
    }
    speed_free(body);
    return v;
}

/* `speedctl generate --json` on the tiny model: the reference tokens and logprobs. */
static inline json_t *cu_generate_ref(const char *prompt_ids, const char *prefill_layers, int max_tokens) {
    char out[1024];
    snprintf(out, sizeof out, "%s/ref-%s-%d.json", cu_dir, prefill_layers, max_tokens);
    if (cu_system("%s/speedctl generate --model %s/model --prompt-ids %s --prefill-layers %s --max-tokens %d "
                  "--top-logprobs 2 --threads 1 --json > %s 2>&1",
                  cu_bin, cu_dir, prompt_ids, prefill_layers, max_tokens, out) != 0) {
        fprintf(stderr, "speedctl generate failed, see %s\n", out);
        return NULL;
    }
    json_error_t err;
    return json_load_file(out, 0, &err);
}

static inline void cu_cleanup(bool keep) {
    if (!keep) cu_system("rm -rf %s", cu_dir);
    else fprintf(stderr, "logs kept in %s\n", cu_dir);
}

#endif /* SPEED_CLUSTER_UTIL_H */
