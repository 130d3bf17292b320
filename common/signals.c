/* speed_signals: see signals.h. */
#include "signals.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <time.h>

void speed_signals_stop_set(sigset_t *set_p) {
    sigemptyset(set_p);
    sigaddset(set_p, SIGINT);
    sigaddset(set_p, SIGTERM);
}

int speed_signals_block(const sigset_t *set, sigset_t *old_p) { return pthread_sigmask(SIG_BLOCK, set, old_p); }

void speed_signals_restore(const sigset_t *old) { pthread_sigmask(SIG_SETMASK, old, NULL); }

void speed_signals_ignore_pipe(void) { signal(SIGPIPE, SIG_IGN); }

void speed_signals_block_stop(sigset_t *set_p) {
    speed_signals_stop_set(set_p);
    speed_signals_block(set_p, NULL);
    speed_signals_ignore_pipe();
}

int speed_signals_wait(const sigset_t *set, int64_t timeout_ms) {
    struct timespec ts = {(time_t)(timeout_ms / 1000), (long)(timeout_ms % 1000) * 1000000L};
    for (;;) {
        int sig = timeout_ms < 0 ? sigwaitinfo(set, NULL) : sigtimedwait(set, NULL, &ts);
        if (sig >= 0) return sig;
        /* EINTR: a handled signal outside the set; the wait goes on (for the full time again:
         * the daemons install no handlers, so this does not happen in practice). EAGAIN is
         * the timeout. */
        if (errno != EINTR) return -1;
    }
}

bool speed_signals_ignored(int sig) {
    struct sigaction old;
    return sigaction(sig, NULL, &old) == 0 && old.sa_handler == SIG_IGN;
}

void speed_signals_reset(void) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
}
