/* speedctl up: a local cluster for development — every decode replica, every prefill replica
 * and the router as separate child processes, health-checked, with their logs in one
 * directory; SIGINT/SIGTERM stops them in the order that drains cleanly (router, prefill,
 * decode). docs/cluster.md describes the behaviour; this file is its implementation.
 *
 * Signals: SIGINT, SIGTERM and SIGCHLD are blocked and read from a signalfd in the one poll
 * loop, which also carries the children's output with --foreground-logs. Children run in
 * their own process group (a terminal's Ctrl-C reaches only speedctl, which then stops them
 * in order) with PR_SET_PDEATHSIG, so a speedctl killed outright does not leave daemons
 * behind. Linux only, like the daemons. */
#define _GNU_SOURCE 1 /* pipe2, signalfd, prctl */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "alloc.h"
#include "clock.h"
#include "cluster_config.h"
#include "http.h"
#include "log.h"
#include "signals.h"
#include "speedctl.h"

#define UP_USAGE             "speedctl up CONFIG [--model DIR] [--log-dir DIR] [--foreground-logs] [cluster options]"
#define UP_TAIL_BYTES        4096 /* log kept for the tail shown when a process fails */
#define UP_TAIL_LINES        20
#define UP_LINE_MAX          2048 /* --foreground-logs: longer lines are cut */
#define UP_HEALTH_PERIOD_S   0.2
#define UP_HEALTH_TIMEOUT_MS 1000
#define UP_BACKOFF_CAP_MS    10000 /* the longest wait before a restart */
#define UP_STABLE_S          30.0  /* healthy this long before it died: its failure count starts over */

/* ---- options ---------------------------------------------------------------------------------
 * speedctl up has a few options of its own; every other option is a cluster option and is
 * passed through, unchanged and in order, to every child (so `--decode.replicas 2` means the
 * same thing to speedctl and to each daemon). cli_up_args.c splits the command line. */

typedef struct {
    char *log_dir;
    bool foreground_logs;
    double start_timeout_s, stop_timeout_s;
    bool restart;
    int64_t restart_max, restart_backoff_ms;
} up_opts_t;

static const speed_config_field_t up_fields[] = {
    {"log_dir", SPEED_CONFIG_STRING, offsetof(up_opts_t, log_dir), NULL, SPEED_CONFIG_UNBOUNDED, NULL,
     "directory for one log file per process (created if missing); default: a new speedctl-up-* dir in $TMPDIR"},
    {"foreground_logs", SPEED_CONFIG_BOOL, offsetof(up_opts_t, foreground_logs), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "write every process's output to stderr, each line prefixed with its name, instead of log files"},
    {"start_timeout_s", SPEED_CONFIG_DOUBLE, offsetof(up_opts_t, start_timeout_s), "120", 0.1, 86400, NULL,
     "seconds each process has to answer GET /health with 200 after it is started"},
    {"stop_timeout_s", SPEED_CONFIG_DOUBLE, offsetof(up_opts_t, stop_timeout_s), "30", 0, 86400, NULL,
     "seconds each group (router, prefill, decode) has to exit after SIGTERM before SIGKILL"},
    {"restart", SPEED_CONFIG_BOOL, offsetof(up_opts_t, restart), "true", SPEED_CONFIG_UNBOUNDED, NULL,
     "restart a process that dies (the others keep serving); --no-restart: stop the whole cluster instead"},
    {"restart_max", SPEED_CONFIG_INT, offsetof(up_opts_t, restart_max), "5", 1, 1000, NULL,
     "restarts in a row of a process that dies before it was healthy for 30 s; then it is given up"},
    {"restart_backoff_ms", SPEED_CONFIG_INT, offsetof(up_opts_t, restart_backoff_ms), "500", 0, 60000, NULL,
     "wait before the first restart; doubled for each further failure in a row, up to 10 s"},
};
#define N_UP_FIELDS (sizeof up_fields / sizeof up_fields[0])

/* ---- processes ------------------------------------------------------------------------------ */

typedef enum { UP_DECODE = 0, UP_PREFILL, UP_ROUTER } up_kind_t;

typedef struct {
    char name[32]; /* "decode-0", "prefill-1", "router" */
    up_kind_t kind;
    int64_t index;
    int http_port;                /* /health and /metrics */
    char grpc_addr[300];          /* nodes only */
    char log_path[PATH_MAX + 64]; /* file mode */

    pid_t pid;    /* 0 = not started */
    bool running; /* started and not yet reaped */
    bool healthy;
    bool stop_sent, killed;
    int wait_status; /* from waitpid once reaped */
    double t_start, t_healthy, t_stop, t_exit, t_health_next;

    /* supervision: a death not asked for is handled once (restart_pending or given_up) */
    int n_starts;         /* times started */
    int n_fails;          /* deaths in a row before it was healthy for UP_STABLE_S */
    bool restart_pending; /* to be started again at t_restart */
    bool given_up;        /* died restart_max + 1 times in a row: left down */
    double t_restart;

    int out_fd; /* --foreground-logs: read end of the child's stdout+stderr */
    char line[UP_LINE_MAX];
    size_t line_len;
    char tail[UP_TAIL_BYTES]; /* --foreground-logs: the last bytes of output (a ring) */
    size_t tail_len, tail_at;
} up_proc_t;

typedef struct {
    speed_cluster_config_t c;
    up_opts_t opts;
    speedctl_up_args_t args;
    char bin_dir[PATH_MAX];
    char log_dir[PATH_MAX];
    char cert_dir[PATH_MAX]; /* throwaway control plane certificates; "" = none made */
    up_proc_t *procs;
    int n_procs;
    int sfd; /* signalfd: SIGINT, SIGTERM, SIGCHLD */
    int n_stop_signals;
    sigset_t old_mask;
} up_t;

static const char *const kind_names[] = {"decode", "prefill", "router"};
static const char *const kind_bins[] = {"speed-decode", "speed-prefill", "speed-router"};

/* "exited with status 1" / "was killed by signal 9 (Killed)". */
static void status_text(int ws, char *buf, size_t size) {
    if (WIFEXITED(ws))
        snprintf(buf, size, "exited with status %d", WEXITSTATUS(ws));
    else if (WIFSIGNALED(ws))
        snprintf(buf, size, "was killed by signal %d (%s)", WTERMSIG(ws), strsignal(WTERMSIG(ws)));
    else
        snprintf(buf, size, "ended with wait status %#x", (unsigned)ws);
}

static void tail_add(up_proc_t *p, const char *data, size_t n) {
    for (size_t i = 0; i < n; i++) {
        p->tail[p->tail_at] = data[i];
        p->tail_at = (p->tail_at + 1) % UP_TAIL_BYTES;
        if (p->tail_len < UP_TAIL_BYTES) p->tail_len++;
    }
}

static void line_flush(up_proc_t *p) {
    if (!p->line_len) return;
    fprintf(stderr, "[%s] %.*s\n", p->name, (int)p->line_len, p->line);
    p->line_len = 0;
}

/* Reads what a child wrote (--foreground-logs); closes the pipe at EOF. */
static void output_read(up_proc_t *p) {
    char buf[4096];
    for (;;) {
        ssize_t n = read(p->out_fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                line_flush(p);
                close(p->out_fd);
                p->out_fd = -1;
            }
            return;
        }
        tail_add(p, buf, (size_t)n);
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n')
                line_flush(p);
            else if (p->line_len < UP_LINE_MAX)
                p->line[p->line_len++] = buf[i];
        }
    }
}

/* Prints the last lines a process wrote, indented, on stderr. */
static void tail_print(const up_t *u, up_proc_t *p) {
    char buf[UP_TAIL_BYTES + 1];
    size_t n = 0;
    if (u->opts.foreground_logs) {
        if (p->out_fd >= 0) output_read(p);
        size_t start = (p->tail_at + UP_TAIL_BYTES - p->tail_len) % UP_TAIL_BYTES;
        for (; n < p->tail_len; n++) buf[n] = p->tail[(start + n) % UP_TAIL_BYTES];
    } else {
        int fd = open(p->log_path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0) {
            off_t from = st.st_size > UP_TAIL_BYTES ? st.st_size - UP_TAIL_BYTES : 0;
            ssize_t r = pread(fd, buf, UP_TAIL_BYTES, from);
            n = r > 0 ? (size_t)r : 0;
        }
        if (fd >= 0) close(fd);
    }
    buf[n] = '\0';
    while (n && buf[n - 1] == '\n') buf[--n] = '\0';
    const char *start = buf;
    int lines = 0;
    for (size_t i = n; i > 0; i--)
        if (buf[i - 1] == '\n' && ++lines == UP_TAIL_LINES) {
            start = buf + i;
            break;
        }
    if (!*start) {
        fprintf(stderr, "speedctl: (%s wrote nothing%s%s)\n", p->name, u->opts.foreground_logs ? "" : " to ",
                u->opts.foreground_logs ? "" : p->log_path);
        return;
    }
    if (u->opts.foreground_logs)
        fprintf(stderr, "speedctl: last lines of %s:\n", p->name);
    else
        fprintf(stderr, "speedctl: last lines of %s:\n", p->log_path);
    for (const char *s = start; *s;) {
        const char *nl = strchr(s, '\n');
        int len = nl ? (int)(nl - s) : (int)strlen(s);
        fprintf(stderr, "  | %.*s\n", len, s);
        s = nl ? nl + 1 : s + len;
    }
}

/* Builds the child's argv: BIN, the cluster options, --config FILE, --node.index I, and its own
 * --tls.* files when speedctl made them. tls_buf holds 3 paths of PATH_MAX + 64. */
static char **child_argv(const up_t *u, const up_proc_t *p, const char *bin, char *index_buf, char *tls_buf) {
    char **argv = speed_calloc((size_t)u->args.cluster_argc + 12, sizeof *argv);
    if (!argv) return NULL;
    int n = 0;
    argv[n++] = (char *)bin;
    for (int i = 1; i < u->args.cluster_argc; i++) argv[n++] = u->args.cluster_argv[i];
    if (u->args.config) {
        argv[n++] = "--config";
        argv[n++] = (char *)u->args.config;
    }
    if (p->kind != UP_ROUTER) {
        snprintf(index_buf, 24, "%lld", (long long)p->index);
        argv[n++] = "--node.index";
        argv[n++] = index_buf;
    }
    if (u->cert_dir[0]) {
        const size_t size = PATH_MAX + 64;
        char *ca = tls_buf, *crt = tls_buf + size, *key = tls_buf + 2 * size;
        snprintf(ca, size, "%s/ca.crt", u->cert_dir);
        snprintf(crt, size, "%s/%s.crt", u->cert_dir, p->name);
        snprintf(key, size, "%s/%s.key", u->cert_dir, p->name);
        argv[n++] = "--tls.ca";
        argv[n++] = ca;
        argv[n++] = "--tls.cert";
        argv[n++] = crt;
        argv[n++] = "--tls.key";
        argv[n++] = key;
    }
    argv[n] = NULL;
    return argv;
}

static bool proc_start(up_t *u, up_proc_t *p) {
    char bin[PATH_MAX + 32], index_buf[24], tls_buf[3 * (PATH_MAX + 64)];
    snprintf(bin, sizeof bin, "%s/%s", u->bin_dir, kind_bins[p->kind]);
    char **argv = child_argv(u, p, bin, index_buf, tls_buf);
    if (!argv) {
        speedctl_fail("%s: out of memory", p->name);
        return false;
    }
    int out_fd = -1, pipe_fds[2] = {-1, -1};
    if (u->opts.foreground_logs) {
        if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
            speedctl_fail("%s: pipe: %s", p->name, strerror(errno));
            speed_free(argv);
            return false;
        }
        out_fd = pipe_fds[1];
    } else {
        /* a restart appends: the log of the death that caused it stays readable */
        int mode = p->n_starts ? O_APPEND : O_TRUNC;
        out_fd = open(p->log_path, O_WRONLY | O_CREAT | mode | O_CLOEXEC, 0644);
        if (out_fd < 0) {
            speedctl_fail("%s: cannot create %s: %s", p->name, p->log_path, strerror(errno));
            speed_free(argv);
            return false;
        }
        if (p->n_starts)
            dprintf(out_fd, "==== speedctl up: %s started again (restart %d) ====\n", p->name, p->n_starts);
    }
    fflush(stdout);
    fflush(stderr);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        /* own process group: a terminal's Ctrl-C goes to speedctl only, which stops the
         * cluster in order; PDEATHSIG: a speedctl killed outright takes the daemons along */
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) _exit(127);
        speed_signals_reset(); /* our mask, and a shell's background job's ignored SIGINT */
        int in = open("/dev/null", O_RDONLY);
        if (in >= 0 && in != 0) {
            dup2(in, 0);
            close(in);
        }
        dup2(out_fd, 1);
        dup2(out_fd, 2);
        execv(bin, argv);
        fprintf(stderr, "speedctl: error: cannot run %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    int fork_errno = errno;
    speed_free(argv);
    close(out_fd);
    if (pid < 0) {
        if (pipe_fds[0] >= 0) close(pipe_fds[0]);
        speedctl_fail("%s: fork: %s", p->name, strerror(fork_errno));
        return false;
    }
    setpgid(pid, pid); /* also here: whichever runs first wins, both set the same group */
    if (pipe_fds[0] >= 0) {
        fcntl(pipe_fds[0], F_SETFL, fcntl(pipe_fds[0], F_GETFL) | O_NONBLOCK);
        p->out_fd = pipe_fds[0];
    }
    p->pid = pid;
    p->running = true;
    p->healthy = p->stop_sent = p->killed = p->restart_pending = false;
    p->n_starts++;
    p->t_start = speed_clock_mono_s();
    p->t_health_next = p->t_start + UP_HEALTH_PERIOD_S;
    printf("started %s (pid %d)\n", p->name, (int)pid);
    fflush(stdout);
    return true;
}

/* Waits up to timeout_ms for a signal or child output; handles both. */
static void up_pump(up_t *u, int timeout_ms) {
    struct pollfd fds[1 + 256];
    up_proc_t *owners[1 + 256];
    int n = 0;
    fds[n++] = (struct pollfd){.fd = u->sfd, .events = POLLIN};
    for (int i = 0; i < u->n_procs && n < (int)(sizeof fds / sizeof fds[0]); i++)
        if (u->procs[i].out_fd >= 0) {
            owners[n] = &u->procs[i];
            fds[n++] = (struct pollfd){.fd = u->procs[i].out_fd, .events = POLLIN};
        }
    if (poll(fds, (nfds_t)n, timeout_ms) <= 0) return;
    if (fds[0].revents & POLLIN) {
        struct signalfd_siginfo si;
        while (read(u->sfd, &si, sizeof si) == (ssize_t)sizeof si)
            if (si.ssi_signo == SIGINT || si.ssi_signo == SIGTERM) {
                u->n_stop_signals++;
                fprintf(stderr, "speedctl: %s\n", si.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM");
            }
    }
    for (int i = 1; i < n; i++)
        if (fds[i].revents) output_read(owners[i]);
}

/* Reaps the children that exited; returns the first one that exited without being asked to
 * stop (NULL if none). */
static up_proc_t *up_reap(up_t *u) {
    up_proc_t *died = NULL;
    for (int i = 0; i < u->n_procs; i++) {
        up_proc_t *p = &u->procs[i];
        if (!p->running) continue;
        int ws;
        pid_t r = waitpid(p->pid, &ws, WNOHANG);
        if (r != p->pid) continue;
        p->running = false;
        p->wait_status = ws;
        p->t_exit = speed_clock_mono_s();
        if (p->out_fd >= 0) output_read(p);
        if (!p->stop_sent && !died) died = p;
    }
    return died;
}

/* GET /health answers 200. For the router, also every node it was configured with is up in
 * its view (decode_nodes_up / prefill_nodes_up in the body, when it reports them): its health
 * turns 200 with one decode node, and `ready` should mean the whole cluster routes. */
static bool proc_check_health(up_t *u, up_proc_t *p) {
    int status = 0;
    char *body = NULL;
    if (speed_http_get(u->c.host, (uint16_t)p->http_port, "/health", UP_HEALTH_TIMEOUT_MS, &status,
                       p->kind == UP_ROUTER ? &body : NULL) != SPEED_OK)
        return false;
    bool ok = status == 200;
    if (ok && body) {
        json_error_t jerr;
        json_t *j = json_loads(body, 0, &jerr);
        json_t *dec = json_object_get(j, "decode_nodes_up"), *pre = json_object_get(j, "prefill_nodes_up");
        int64_t want[2] = {u->c.decode.replicas, u->c.prefill.replicas}; /* less the nodes given up */
        for (int i = 0; i < u->n_procs; i++)
            if (u->procs[i].given_up && u->procs[i].kind != UP_ROUTER) want[u->procs[i].kind]--;
        if (json_is_integer(dec) && json_integer_value(dec) < want[UP_DECODE]) ok = false;
        if (json_is_integer(pre) && json_integer_value(pre) < want[UP_PREFILL]) ok = false;
        json_decref(j);
    }
    speed_free(body);
    return ok;
}

/* Stops the running processes of one kind: SIGTERM, up to stop_timeout_s, then SIGKILL.
 * A further SIGINT/SIGTERM to speedctl kills at once. */
static void group_stop(up_t *u, up_kind_t kind) {
    int n_live = 0;
    for (int i = 0; i < u->n_procs; i++) {
        up_proc_t *p = &u->procs[i];
        if (p->kind != kind || !p->running) continue;
        p->stop_sent = true;
        p->t_stop = speed_clock_mono_s();
        kill(p->pid, SIGTERM);
        n_live++;
    }
    if (!n_live) return;
    double deadline = speed_clock_mono_s() + u->opts.stop_timeout_s;
    for (;;) {
        up_reap(u);
        n_live = 0;
        for (int i = 0; i < u->n_procs; i++) n_live += u->procs[i].kind == kind && u->procs[i].running;
        if (!n_live) return;
        if (u->n_stop_signals >= 2 || speed_clock_mono_s() >= deadline) break; /* a second signal: kill now */
        up_pump(u, 50);
    }
    for (int i = 0; i < u->n_procs; i++) {
        up_proc_t *p = &u->procs[i];
        if (p->kind != kind || !p->running) continue;
        fprintf(stderr, "speedctl: %s (pid %d) still running %.1f s after SIGTERM%s: SIGKILL\n", p->name, (int)p->pid,
                speed_clock_mono_s() - p->t_stop, u->n_stop_signals >= 2 ? " and a second signal" : "");
        kill(p->pid, SIGKILL);
        p->killed = true;
        int ws;
        while (waitpid(p->pid, &ws, 0) < 0 && errno == EINTR) {}
        p->running = false;
        p->wait_status = ws;
        p->t_exit = speed_clock_mono_s();
        if (p->out_fd >= 0) output_read(p);
    }
}

/* Router first (it stops taking requests and finishes the streams it has), then the prefill
 * pool, then decode (which holds the KV of requests still generating). Returns true when
 * every process exited 0 after its SIGTERM (none needed SIGKILL, none died on its own without
 * a restart, none was given up; one waiting for its restart was reported when it died). */
static bool up_stop_all(up_t *u, bool summary) {
    group_stop(u, UP_ROUTER);
    group_stop(u, UP_PREFILL);
    group_stop(u, UP_DECODE);
    bool clean = true;
    for (int i = u->n_procs - 1; i >= 0; i--) {
        up_proc_t *p = &u->procs[i];
        if (!p->pid || p->running || p->restart_pending) continue;
        bool ok = p->stop_sent && !p->killed && WIFEXITED(p->wait_status) && WEXITSTATUS(p->wait_status) == 0;
        clean &= ok;
        if (!summary) continue;
        char st[96];
        status_text(p->wait_status, st, sizeof st);
        if (p->given_up)
            printf("%s (pid %d) was given up: %s\n", p->name, (int)p->pid, st);
        else if (p->stop_sent)
            printf("stopped %s (pid %d): %s%s, %.1f s after SIGTERM\n", p->name, (int)p->pid, st,
                   p->killed ? " (SIGKILL)" : "", p->t_exit - p->t_stop);
        else
            printf("stopped %s (pid %d): %s before it was asked to stop\n", p->name, (int)p->pid, st);
    }
    fflush(stdout);
    return clean;
}

/* A process that failed: say which, show its log tail, stop the rest. */
static int up_fail(up_t *u, up_proc_t *p, const char *when) {
    char st[96];
    if (p->running)
        snprintf(st, sizeof st, "is not healthy");
    else
        status_text(p->wait_status, st, sizeof st);
    speedctl_fail("%s (pid %d) %s%s", p->name, (int)p->pid, st, when);
    tail_print(u, p);
    if (!u->opts.foreground_logs) fprintf(stderr, "speedctl: logs: %s\n", u->log_dir);
    fprintf(stderr, "speedctl: stopping the cluster\n");
    up_stop_all(u, true);
    return SPEEDCTL_EXIT_FAIL;
}

/* ---- supervision ---------------------------------------------------------------------------- */

/* The first process that exited without being asked to and is not handled yet, or NULL. */
static up_proc_t *death_unhandled(up_t *u) {
    for (int i = 0; i < u->n_procs; i++) {
        up_proc_t *p = &u->procs[i];
        if (p->pid && !p->running && !p->stop_sent && !p->restart_pending && !p->given_up) return p;
    }
    return NULL;
}

/* A death not asked for, with restarts on: says why, shows the log tail, and schedules the
 * restart after the backoff, or gives the process up after restart_max quick failures in a
 * row. Returns false when the cluster cannot go on (the router was given up). */
static bool death_handle(up_t *u, up_proc_t *p) {
    char st[96];
    status_text(p->wait_status, st, sizeof st);
    bool stable = p->healthy && p->t_exit - p->t_healthy >= UP_STABLE_S;
    p->n_fails = stable ? 1 : p->n_fails + 1;
    fprintf(stderr, "speedctl: %s (pid %d) %s %.1f s after its start%s\n", p->name, (int)p->pid, st,
            p->t_exit - p->t_start, p->healthy ? "" : ", before it was healthy");
    tail_print(u, p);
    p->healthy = false;
    if (p->n_fails > u->opts.restart_max) {
        p->given_up = true;
        fprintf(stderr, "speedctl: giving up on %s: it failed %d times in a row (--restart-max %lld)%s; see %s\n",
                p->name, p->n_fails, (long long)u->opts.restart_max,
                p->kind == UP_ROUTER ? "" : "; the rest of the cluster keeps serving",
                u->opts.foreground_logs ? "its output above" : p->log_path);
        return p->kind != UP_ROUTER;
    }
    int64_t ms = u->opts.restart_backoff_ms;
    for (int k = 1; k < p->n_fails && ms < UP_BACKOFF_CAP_MS; k++) ms *= 2;
    if (ms > UP_BACKOFF_CAP_MS) ms = UP_BACKOFF_CAP_MS;
    p->restart_pending = true;
    p->t_restart = speed_clock_mono_s() + (double)ms / 1000.0;
    fprintf(stderr, "speedctl: restarting %s in %.1f s (failure %d in a row of at most %lld)\n", p->name,
            (double)ms / 1000.0, p->n_fails, (long long)u->opts.restart_max);
    return true;
}

/* One turn of supervision: handles the deaths, starts what is due. *rc_p is speedctl's exit
 * code when it returns false (the cluster was stopped). */
static bool up_supervise(up_t *u, bool router_due, int *rc_p) {
    for (up_proc_t *p; (p = death_unhandled(u));)
        if (!death_handle(u, p)) {
            fprintf(stderr, "speedctl: without the router nothing is served; stopping the cluster\n");
            up_stop_all(u, true);
            *rc_p = SPEEDCTL_EXIT_FAIL;
            return false;
        }
    double now = speed_clock_mono_s();
    for (int i = 0; i < u->n_procs; i++) {
        up_proc_t *p = &u->procs[i];
        if (!p->restart_pending || now < p->t_restart || (p->kind == UP_ROUTER && !router_due)) continue;
        if (!proc_start(u, p)) {
            up_stop_all(u, true);
            *rc_p = SPEEDCTL_EXIT_FAIL;
            return false;
        }
    }
    return true;
}

/* Polls /health of the started processes not yet healthy. Returns one that missed
 * start_timeout_s when restarts are off (the caller stops the cluster); with restarts on such
 * a process is killed and restarted like one that died. */
static up_proc_t *procs_health(up_t *u) {
    for (int i = 0; i < u->n_procs; i++) {
        up_proc_t *p = &u->procs[i];
        double now = speed_clock_mono_s();
        if (!p->running || p->healthy || p->stop_sent || now < p->t_health_next) continue;
        p->t_health_next = now + UP_HEALTH_PERIOD_S;
        /* the health answer counts only if the child is still alive after it (another process
         * might own the port) */
        if (proc_check_health(u, p)) {
            up_reap(u);
            if (!p->running) continue;
            p->healthy = true;
            p->t_healthy = speed_clock_mono_s();
            printf("%s healthy%s (pid %d) in %.1f s: http://%s:%d/health\n", p->name, p->n_starts > 1 ? " again" : "",
                   (int)p->pid, p->t_healthy - p->t_start, u->c.host, p->http_port);
            fflush(stdout);
        } else if (p->running && speed_clock_mono_s() - p->t_start > u->opts.start_timeout_s) {
            if (!u->opts.restart) return p;
            fprintf(stderr, "speedctl: %s (pid %d) not healthy after %.0f s (--start-timeout-s): SIGKILL\n", p->name,
                    (int)p->pid, u->opts.start_timeout_s);
            kill(p->pid, SIGKILL); /* reaped and handled as a death */
        }
    }
    return NULL;
}

/* ---- setup ---------------------------------------------------------------------------------- */

static bool find_binaries(up_t *u) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        speedctl_fail("cannot find speedctl's own path (/proc/self/exe): %s", strerror(errno));
        return false;
    }
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash) *slash = '\0';
    snprintf(u->bin_dir, sizeof u->bin_dir, "%s", exe);
    bool need[3] = {true, u->c.prefill.replicas > 0, true};
    for (int k = 0; k < 3; k++) {
        char path[PATH_MAX + 32];
        snprintf(path, sizeof path, "%s/%s", u->bin_dir, kind_bins[k]);
        if (need[k] && access(path, X_OK) != 0) {
            speedctl_fail("%s not found next to speedctl (%s: %s); build it (cmake --build BUILD --target %s)",
                          kind_bins[k], path, strerror(errno), kind_bins[k]);
            return false;
        }
    }
    return true;
}

static bool check_model(const speed_cluster_config_t *c) {
    struct stat st;
    if (stat(c->model, &st) != 0) {
        speedctl_fail("model directory '%s': %s", c->model, errno == ENOENT ? "does not exist" : strerror(errno));
        return false;
    }
    if (!S_ISDIR(st.st_mode)) {
        speedctl_fail("model directory '%s' is not a directory", c->model);
        return false;
    }
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/config.json", c->model);
    if (access(path, R_OK) != 0) {
        speedctl_fail("model directory '%s' has no readable config.json (not a Hugging Face model directory)",
                      c->model);
        return false;
    }
    return true;
}

static bool make_log_dir(up_t *u) {
    if (u->opts.foreground_logs) return true;
    if (u->opts.log_dir && *u->opts.log_dir) {
        snprintf(u->log_dir, sizeof u->log_dir, "%s", u->opts.log_dir);
        if (mkdir(u->log_dir, 0755) != 0 && errno != EEXIST) {
            speedctl_fail("--log-dir %s: %s", u->log_dir, strerror(errno));
            return false;
        }
        return true;
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(u->log_dir, sizeof u->log_dir, "%s/speedctl-up-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(u->log_dir)) {
        speedctl_fail("cannot create a log directory %s: %s", u->log_dir, strerror(errno));
        return false;
    }
    return true;
}

/* A cluster file without tls.cert (and without tls.insecure) gets throwaway certificates. */
static bool make_certs(up_t *u) {
    if (u->c.tls_insecure || (u->c.tls_cert && *u->c.tls_cert)) return true;
    return speedctl_certs_tmp_make(&u->c, u->cert_dir, sizeof u->cert_dir);
}

static bool procs_init(up_t *u) {
    const speed_cluster_config_t *c = &u->c;
    u->n_procs = (int)(c->decode.replicas + c->prefill.replicas + 1);
    u->procs = speed_calloc((size_t)u->n_procs, sizeof *u->procs);
    if (!u->procs) {
        speedctl_fail("out of memory");
        return false;
    }
    int n = 0;
    for (int k = UP_DECODE; k <= UP_ROUTER; k++) {
        const speed_pool_config_t *pool = k == UP_DECODE ? &c->decode : k == UP_PREFILL ? &c->prefill : NULL;
        int64_t replicas = pool ? pool->replicas : 1;
        for (int64_t i = 0; i < replicas; i++) {
            up_proc_t *p = &u->procs[n++];
            p->kind = (up_kind_t)k;
            p->index = i;
            p->out_fd = -1;
            if (pool) {
                snprintf(p->name, sizeof p->name, "%s-%lld", kind_names[k], (long long)i);
                p->http_port = (int)(pool->http_port + i);
                speed_cluster_grpc_addr(c, pool, i, p->grpc_addr, sizeof p->grpc_addr);
            } else {
                snprintf(p->name, sizeof p->name, "router");
                /* its own metrics listener when it has one (open there even with API keys) */
                p->http_port = (int)(c->router_metrics_port ? c->router_metrics_port : c->router_port);
            }
            snprintf(p->log_path, sizeof p->log_path, "%s/%s.log", u->log_dir, p->name);
        }
    }
    return true;
}

/* ---- the verb ------------------------------------------------------------------------------- */

static int up_run(up_t *u) {
    /* nodes first (decode, then prefill, loading their models side by side), the router once
     * every node is healthy: it finds the pools at start and reports ready only when it can
     * route */
    for (int i = 0; i < u->n_procs; i++)
        if (u->procs[i].kind != UP_ROUTER && !proc_start(u, &u->procs[i])) {
            up_stop_all(u, true);
            return SPEEDCTL_EXIT_FAIL;
        }
    double t0 = speed_clock_mono_s();
    up_proc_t *router = &u->procs[u->n_procs - 1];
    for (;;) {
        up_pump(u, 50);
        up_reap(u);
        if (u->n_stop_signals) {
            fprintf(stderr, "speedctl: interrupted during startup; stopping the cluster\n");
            up_stop_all(u, true);
            return SPEEDCTL_EXIT_FAIL;
        }
        up_proc_t *died = death_unhandled(u);
        if (died && !u->opts.restart) return up_fail(u, died, " during startup");
        int rc;
        if (!up_supervise(u, router->pid != 0, &rc)) return rc;
        up_proc_t *late = procs_health(u);
        if (late) {
            char when[64];
            snprintf(when, sizeof when, " after %.0f s (--start-timeout-s)", u->opts.start_timeout_s);
            return up_fail(u, late, when);
        }
        /* a node given up does not hold the rest back */
        int n_nodes_done = 0, n_done = 0;
        for (int i = 0; i < u->n_procs; i++) {
            const up_proc_t *p = &u->procs[i];
            bool done = p->healthy || p->given_up;
            n_done += done;
            n_nodes_done += done && p->kind != UP_ROUTER;
        }
        if (n_nodes_done == u->n_procs - 1 && !router->pid && !proc_start(u, router)) {
            up_stop_all(u, true);
            return SPEEDCTL_EXIT_FAIL;
        }
        if (n_done == u->n_procs) break;
    }

    printf("cluster up in %.1f s: %lld decode, %lld prefill, 1 router\n", speed_clock_mono_s() - t0,
           (long long)u->c.decode.replicas, (long long)u->c.prefill.replicas);
    for (int i = 0; i < u->n_procs; i++) {
        const up_proc_t *p = &u->procs[i];
        if (p->kind == UP_ROUTER) continue;
        if (p->given_up) {
            printf("%s: given up (see above), grpc %s\n", p->name, p->grpc_addr);
            continue;
        }
        printf("%s: pid %d, grpc %s, metrics http://%s:%d/metrics\n", p->name, (int)p->pid, p->grpc_addr, u->c.host,
               p->http_port);
    }
    printf("router metrics: http://%s:%d/metrics (pid %d)\n", u->c.host, router->http_port, (int)router->pid);
    if (!u->opts.foreground_logs) printf("logs: %s\n", u->log_dir);
    printf("router: http%s://%s:%d\n", u->c.api_tls_cert && u->c.api_tls_cert[0] ? "s" : "", u->c.host,
           (int)u->c.router_port);
    printf("ready\n");
    fflush(stdout);

    /* until SIGINT/SIGTERM: a process that dies is restarted (or, with --no-restart, stops all) */
    for (;;) {
        up_pump(u, 250);
        up_reap(u);
        if (u->n_stop_signals) break;
        up_proc_t *died = death_unhandled(u);
        if (died && !u->opts.restart) return up_fail(u, died, " while the cluster was running");
        int rc;
        if (!up_supervise(u, true, &rc)) return rc;
        procs_health(u);
    }
    printf("stopping: router, then prefill, then decode\n");
    fflush(stdout);
    bool clean = up_stop_all(u, true);
    if (!clean) {
        speedctl_fail("not every process exited 0 after SIGTERM (see above%s%s)",
                      u->opts.foreground_logs ? "" : "; logs in ", u->opts.foreground_logs ? "" : u->log_dir);
        return SPEEDCTL_EXIT_FAIL;
    }
    printf("stopped\n");
    fflush(stdout);
    return SPEEDCTL_EXIT_OK;
}

int speedctl_up(int argc, char **argv) {
    up_t u;
    memset(&u, 0, sizeof u);
    u.sfd = -1;
    int rc = SPEEDCTL_EXIT_USAGE;
    speed_config_t *ucfg = NULL, *ccfg = NULL;
    if (!speedctl_up_args_split(up_fields, N_UP_FIELDS, argc, argv, &u.args)) {
        speedctl_fail("out of memory");
        rc = SPEEDCTL_EXIT_FAIL;
        goto out;
    }
    if (speed_config_load(up_fields, N_UP_FIELDS, &u.opts, u.args.up_argc, u.args.up_argv, "SPEED_UP_", &ucfg) !=
        SPEED_OK)
        goto usage;
    if (u.args.unknown) {
        speedctl_fail("unknown option '%s'", u.args.unknown);
        goto usage;
    }
    if (u.args.n_positional > 1) {
        speedctl_fail("up takes one cluster file (got %d arguments that are not options)", u.args.n_positional);
        goto usage;
    }
    if (u.args.config && u.args.config_option) {
        speedctl_fail("give the cluster file either as CONFIG or with --config, not both");
        goto usage;
    }
    if (u.args.node_index) {
        speedctl_fail("--node.index is set by speedctl up for each replica; leave it out");
        goto usage;
    }
    /* the loader sees the cluster options with --config CONFIG appended */
    char **cargv = u.args.cluster_argv;
    int cargc = u.args.cluster_argc;
    if (u.args.config) {
        cargv[cargc++] = "--config";
        cargv[cargc++] = (char *)u.args.config;
        cargv[cargc] = NULL;
    }
    if (speed_cluster_config_load(cargc, cargv, NULL, &u.c, &ccfg) != SPEED_OK) goto usage;
    if (speed_config_help_requested(ccfg)) {
        speedctl_up_help_print(up_fields, N_UP_FIELDS, UP_USAGE);
        rc = SPEEDCTL_EXIT_OK;
        goto out;
    }
    if (speed_config_print_requested(ccfg)) {
        rc = speed_config_print(ccfg, stdout) == SPEED_OK ? SPEEDCTL_EXIT_OK : SPEEDCTL_EXIT_FAIL;
        goto out;
    }
    if (!speed_config_file(ccfg)) {
        speedctl_fail("no cluster file: speedctl up CONFIG (e.g. deploy/clusters/1p1d.yaml)");
        goto usage;
    }
    /* Keys reach the router through the environment (inherited) or their file, never its
     * argv (router.api_keys is refused there). With keys, /health on the API port wants one. */
    if (((u.c.api_keys && u.c.api_keys[0]) || (u.c.api_keys_file && u.c.api_keys_file[0])) &&
        !u.c.router_metrics_port) {
        speedctl_fail("with API keys the router's /health needs a key: set router.metrics_port so that speedctl up "
                      "can watch it");
        goto usage;
    }
    if (u.c.router_port == 0) {
        speedctl_fail("router.port is 0 (any free port), which speedctl up does not allow: clients need a known "
                      "port; set router.port or pass e.g. --router.port 8000");
        goto usage;
    }
    if (!u.c.model || !*u.c.model) {
        speedctl_fail("no model: pass --model DIR or set model: in %s", speed_config_file(ccfg));
        goto usage;
    }
    rc = SPEEDCTL_EXIT_FAIL;
    if (!check_model(&u.c) || !find_binaries(&u) || !make_log_dir(&u) || !procs_init(&u) || !make_certs(&u)) goto out;

    /* UCX settings every process needs on one host; what the user set wins */
    setenv("UCX_TCP_CM_REUSEADDR", "y", 0);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 0);
    if (u.c.ucx_net_devices && *u.c.ucx_net_devices) setenv("UCX_NET_DEVICES", u.c.ucx_net_devices, 0);

    /* a shell starts background jobs with SIGINT ignored; keep it so (Ctrl-C is for the
     * foreground job), and stop on SIGTERM only */
    sigset_t mask;
    speed_signals_stop_set(&mask);
    if (speed_signals_ignored(SIGINT)) sigdelset(&mask, SIGINT);
    sigaddset(&mask, SIGCHLD);
    int block_err = speed_signals_block(&mask, &u.old_mask);
    if (block_err != 0 || (u.sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
        speedctl_fail("signalfd: %s", strerror(block_err ? block_err : errno));
        goto out;
    }
    speed_signals_ignore_pipe();
    printf("starting %s: model %s, %lld decode + %lld prefill replicas and the router on %s%s%s\n",
           speed_config_file(ccfg), u.c.model, (long long)u.c.decode.replicas, (long long)u.c.prefill.replicas,
           u.c.host, u.opts.foreground_logs ? "" : ", logs in ", u.opts.foreground_logs ? "" : u.log_dir);
    printf("control plane: %s\n", u.cert_dir[0]      ? "mutual TLS, throwaway certificates for this run"
                                  : u.c.tls_insecure ? "PLAINTEXT (tls.insecure)"
                                                     : "mutual TLS, the configured certificates");
    fflush(stdout);
    rc = up_run(&u);
    goto out;

usage:
    fprintf(stderr, "speedctl: see 'speedctl up --help'\n");
    rc = SPEEDCTL_EXIT_USAGE;
out:
    if (u.procs)
        for (int i = 0; i < u.n_procs; i++)
            if (u.procs[i].out_fd >= 0) close(u.procs[i].out_fd);
    if (u.sfd >= 0) {
        close(u.sfd);
        speed_signals_restore(&u.old_mask);
    }
    speedctl_certs_tmp_remove(u.cert_dir);
    speed_free(u.procs);
    speed_config_destroy(ccfg);
    speed_config_destroy(ucfg);
    speedctl_up_args_cleanup(&u.args);
    return rc;
}
