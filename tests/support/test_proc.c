/* Child processes, their output, and loopback ports for the tests: see test_proc.h. */
#define _GNU_SOURCE 1 /* pipe2, setns */
#include "test_proc.h"

#include "test_fs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_clock.h"

int tu_system(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    char *cmd = malloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(cmd, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    free(cmd);
    return rc == -1 ? -1 : tu_exit_code(rc);
}

tu_run_t tu_run_tool(const char *dir, const char *tool, const char *fmt, ...) {
    char args[8192], out_path[1100], err_path[1100];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(out_path, sizeof out_path, "%s/tool.out", dir);
    snprintf(err_path, sizeof err_path, "%s/tool.err", dir);
    tu_run_t r = {0};
    r.rc = tu_system("'%s' %s >'%s' 2>'%s'", tool, args, out_path, err_path);
    r.out = tu_read(out_path, NULL);
    r.err = tu_read(err_path, NULL);
    /* The shell creates both files; "" keeps the callers' checks simple if it could not. */
    if (!r.out) r.out = calloc(1, 1);
    if (!r.err) r.err = calloc(1, 1);
    return r;
}

void tu_run_free(tu_run_t *r) {
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}

int tu_exit_code(int status) {
    return WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
}

pid_t tu_spawn(const char *const *argv, const tu_spawn_params_t *p) {
    static const tu_spawn_params_t none = {0};
    if (!p) p = &none;
    char ns_path[300] = "";
    if (p->netns) snprintf(ns_path, sizeof ns_path, "/run/netns/%s", p->netns);
    int fds[2] = {-1, -1};
    if (p->stdout_fd_p && pipe2(fds, O_CLOEXEC) != 0) {
        perror("pipe2");
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        if (fds[0] >= 0) close(fds[0]), close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        /* Only async-signal-safe calls from here to execv: the parent may have threads. */
        if (p->die_with_parent) prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (ns_path[0]) {
            int fd = open(ns_path, O_RDONLY | O_CLOEXEC);
            if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) _exit(125);
            close(fd);
        }
        if (p->log_path) {
            int fd = open(p->log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
                close(fd);
            }
        }
        if (p->err_path) {
            int fd = open(p->err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                dup2(fd, 2);
                close(fd);
            }
        }
        if (p->stdout_fd_p) dup2(fds[1], 1);
        if (p->cwd && chdir(p->cwd) != 0) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    if (p->stdout_fd_p) {
        close(fds[1]);
        *p->stdout_fd_p = fds[0];
    }
    return pid;
}

bool tu_wait_pid(pid_t pid, double timeout_s, int *status_p) {
    double until = now_s() + timeout_s;
    for (;;) {
        int status;
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            if (status_p) *status_p = status;
            return true;
        }
        if (r < 0 && errno != EINTR) return false;
        if (now_s() >= until) return false;
        sleep_ms(20);
    }
}

int tu_read_until(int fd, char *buf, size_t cap, size_t *len_p, const char *stop, double deadline_s) {
    size_t n = *len_p;
    buf[n] = '\0';
    for (;;) {
        if (stop && strstr(buf, stop)) return 1;
        if (n + 1 >= cap) return 0;
        int left_ms = (int)((deadline_s - now_s()) * 1000);
        if (left_ms <= 0) return 0;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, left_ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) return 0;
        ssize_t k = read(fd, buf + n, cap - 1 - n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        n += (size_t)k;
        buf[n] = '\0';
        *len_p = n;
    }
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

bool tu_ports_free(int base, int n) {
    for (int port = base; port < base + n; port++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return false;
        struct sockaddr_in a = loopback(port);
        bool ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (!ok) return false;
    }
    return true;
}

bool tu_port_open(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    struct sockaddr_in a = loopback(port);
    bool open_ = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return open_;
}
