/* common/signals: blocking and restoring masks, taking blocked signals with and without a
 * timeout (also from another thread), SIGPIPE ignored, and the reset a forked child does
 * before exec. Every check that changes dispositions or masks for the whole process runs in a
 * forked child, so the cases do not see each other's signals. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "clock.h"
#include "signals.h"

static bool blocked_now(int sig) {
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    return sigismember(&cur, sig) == 1;
}

/* Runs fn in a child; the child's exit code is its number of failed checks. */
static int in_child(int (*fn)(void)) {
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) _exit(fn());
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

static void test_stop_set(void) {
    sigset_t set;
    speed_signals_stop_set(&set);
    CHECK(sigismember(&set, SIGINT) == 1);
    CHECK(sigismember(&set, SIGTERM) == 1);
    CHECK(sigismember(&set, SIGCHLD) == 0);
    CHECK(sigismember(&set, SIGPIPE) == 0);
    CHECK(sigismember(&set, SIGHUP) == 0);
}

static int child_block_restore(void) {
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    CHECK(!blocked_now(SIGUSR1));
    CHECK_INT_EQ(speed_signals_block(&set, &old), 0);
    CHECK(blocked_now(SIGUSR1));
    CHECK(sigismember(&old, SIGUSR1) == 0);
    /* Blocked, a raised signal waits to be taken: no timeout needed once it is pending. */
    raise(SIGUSR1);
    CHECK_INT_EQ(speed_signals_wait(&set, 0), SIGUSR1);
    CHECK_INT_EQ(speed_signals_wait(&set, 0), -1); /* taken once */
    /* Blocking more keeps what was blocked. */
    sigset_t more;
    sigemptyset(&more);
    sigaddset(&more, SIGUSR2);
    CHECK_INT_EQ(speed_signals_block(&more, NULL), 0);
    CHECK(blocked_now(SIGUSR1) && blocked_now(SIGUSR2));
    speed_signals_restore(&old);
    CHECK(!blocked_now(SIGUSR1) && !blocked_now(SIGUSR2));
    return check_failures_;
}

static void test_block_restore(void) { CHECK_INT_EQ(in_child(child_block_restore), 0); }

static int child_wait_timeout(void) {
    sigset_t set;
    speed_signals_stop_set(&set);
    speed_signals_block(&set, NULL);
    uint64_t t0 = speed_clock_mono_ns();
    CHECK_INT_EQ(speed_signals_wait(&set, 50), -1);
    uint64_t dt = speed_clock_mono_ns() - t0;
    CHECK_MSG(dt >= 49000000u && dt < 5000000000u, "a 50 ms wait took %llu ns", (unsigned long long)dt);
    return check_failures_;
}

static void test_wait_timeout(void) { CHECK_INT_EQ(in_child(child_wait_timeout), 0); }

static void *send_term_later(void *arg) {
    (void)arg;
    speed_clock_sleep_ms(20);
    kill(getpid(), SIGTERM); /* to the process: taken by whichever thread waits for it */
    return NULL;
}

static int child_wait_forever(void) {
    sigset_t set;
    speed_signals_block_stop(&set); /* before the thread: it inherits the mask */
    pthread_t t;
    pthread_create(&t, NULL, send_term_later, NULL);
    CHECK_INT_EQ(speed_signals_wait(&set, -1), SIGTERM);
    pthread_join(t, NULL);
    return check_failures_;
}

static void test_wait_forever(void) { CHECK_INT_EQ(in_child(child_wait_forever), 0); }

static int child_block_stop(void) {
    sigset_t set;
    speed_signals_block_stop(&set);
    CHECK(blocked_now(SIGINT) && blocked_now(SIGTERM));
    CHECK(!blocked_now(SIGPIPE));
    CHECK(speed_signals_ignored(SIGPIPE));
    /* Writing to a pipe nobody reads: EPIPE, not death. */
    int fds[2];
    CHECK_INT_EQ(pipe(fds), 0);
    close(fds[0]);
    errno = 0;
    CHECK_INT_EQ(write(fds[1], "x", 1), -1);
    CHECK_INT_EQ(errno, EPIPE);
    close(fds[1]);
    /* SIGINT and SIGTERM sent now are taken, in any order. */
    kill(getpid(), SIGINT);
    kill(getpid(), SIGTERM);
    int a = speed_signals_wait(&set, 1000), b = speed_signals_wait(&set, 1000);
    CHECK((a == SIGINT && b == SIGTERM) || (a == SIGTERM && b == SIGINT));
    return check_failures_;
}

static void test_block_stop(void) { CHECK_INT_EQ(in_child(child_block_stop), 0); }

static int child_ignored(void) {
    CHECK(!speed_signals_ignored(SIGUSR2));
    signal(SIGUSR2, SIG_IGN);
    CHECK(speed_signals_ignored(SIGUSR2));
    signal(SIGUSR2, SIG_DFL);
    CHECK(!speed_signals_ignored(SIGUSR2));
    return check_failures_;
}

static void test_ignored(void) { CHECK_INT_EQ(in_child(child_ignored), 0); }

/* What a parent leaves to a child it forks: blocked stop signals, ignored SIGINT and SIGPIPE. */
static int child_reset(void) {
    sigset_t set;
    speed_signals_block_stop(&set);
    signal(SIGINT, SIG_IGN);
    speed_signals_reset();
    CHECK(!blocked_now(SIGINT) && !blocked_now(SIGTERM));
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    for (int sig = 1; sig < 32; sig++) CHECK_MSG(sigismember(&cur, sig) != 1, "signal %d still blocked", sig);
    CHECK(!speed_signals_ignored(SIGINT));
    CHECK(!speed_signals_ignored(SIGTERM));
    CHECK(!speed_signals_ignored(SIGPIPE));
    return check_failures_;
}

static void test_reset(void) { CHECK_INT_EQ(in_child(child_reset), 0); }

int main(void) {
    test_stop_set();
    test_block_restore();
    test_wait_timeout();
    test_wait_forever();
    test_block_stop();
    test_ignored();
    test_reset();
    return CHECK_DONE();
}
