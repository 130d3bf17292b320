/* Child processes, their output, and loopback ports for the tests (library speed_test_common).
 *
 * The one way tests start programs (the daemons, speedctl): tu_spawn forks and execs with
 * the redirections asked for; tu_wait_pid waits for an exit with a timeout; tu_read_until
 * reads a child's stdout pipe (or a socket) up to a marker with a deadline, so that a child
 * that hangs fails the test instead of hanging it. tu_system runs a shell command line.
 *
 * Ports: a test that starts daemons on fixed ports first finds a block nothing holds
 * (tu_ports_free), since ctest -j runs several such tests side by side.
 *
 * Thread-safety: every function is reentrant; tu_spawn forks the calling thread only (the
 * child execs at once), as fork does.
 */
#ifndef SPEED_TESTS_TEST_PROC_H
#define SPEED_TESTS_TEST_PROC_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* Runs `sh -c <printf(fmt, ...)>` (system(3)); returns the command's exit code, 128 + signal
 * when a signal ended it, or -1 when no shell could run. */
int tu_system(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* What tu_run_tool captured: the exit code (as tu_system's) and the whole stdout and stderr,
 * each a NUL-terminated heap string ("" when nothing was written). Release with tu_run_free. */
typedef struct {
    int rc;
    char *out;
    char *err;
} tu_run_t;

/* Runs `'TOOL' ARGS` through the shell (ARGS printf-formatted, quoted by the caller), stdout and
 * stderr going to files in dir (overwritten by the next call with the same dir: one call at a
 * time per dir), and returns both. */
tu_run_t tu_run_tool(const char *dir, const char *tool, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void tu_run_free(tu_run_t *r);

/* The exit code of a waitpid() status: the exit status, or 128 + the signal that ended it. */
int tu_exit_code(int status);

/* Where a child's output goes; zero fields leave stdout and stderr inherited. err_path and
 * stdout_fd_p take precedence over log_path for their stream. */
typedef struct {
    const char *cwd;      /* the child changes to this directory first; NULL: stays */
    const char *log_path; /* stdout and stderr appended to this file */
    const char *err_path; /* stderr written to this file, truncated first */
    int *stdout_fd_p;     /* non-NULL: stdout goes into a pipe; its read end (close-on-exec)
                                is returned here, the caller closes it */
    bool die_with_parent; /* the child gets SIGKILL when the test process dies */
    const char *netns;    /* the child joins the network namespace /run/netns/<netns> before
                             exec (a test bed host, tests/chaos/netns_bed.h); NULL: stays in
                             the caller's. A namespace it cannot join: exits 125 */
} tu_spawn_params_t;

/* Starts argv[0] (a path; argv NULL-terminated) with the redirections of `p` (NULL: none).
 * Returns the child's pid, or -1 when fork or pipe failed (printed). A program that cannot be
 * executed exits 127 in the child. The caller reaps the child (tu_wait_pid). */
pid_t tu_spawn(const char *const *argv, const tu_spawn_params_t *p);

/* Waits up to timeout_s (0: just looks) for child `pid` to exit, reaping it. Returns true when
 * it has exited, with its waitpid status in *status_p (may be NULL); false while it runs (or
 * when pid is not a child of this process). Never signals it. */
bool tu_wait_pid(pid_t pid, double timeout_s, int *status_p);

/* Reads from fd (a pipe or a socket) into buf, appending at *len_p and keeping buf
 * NUL-terminated, until `stop` (may be NULL) occurs in buf, the peer closes, or now_s()
 * passes deadline_s. *len_p is updated. Returns 1 when `stop` is in buf, 0 on the deadline
 * or a full buffer, -1 on end of file or a read error. */
int tu_read_until(int fd, char *buf, size_t cap, size_t *len_p, const char *stop, double deadline_s);

/* True when every TCP port in [base, base + n) on 127.0.0.1 can be bound right now. */
bool tu_ports_free(int base, int n);

/* True when something accepts TCP connections on 127.0.0.1:port. */
bool tu_port_open(int port);

#endif /* SPEED_TESTS_TEST_PROC_H */
