/* Signal masks for programs that take signals synchronously.
 *
 * The daemons and `speedctl up` never run code in a signal handler. Their main thread blocks
 * the signals it cares about before any other thread exists — every thread inherits the mask,
 * so no thread is ever interrupted by them — and then takes them when it is ready: with
 * speed_signals_wait (sigtimedwait) or from a signalfd. SIGPIPE is ignored, so that a write
 * to a socket or pipe whose reader has gone fails with EPIPE instead of ending the process.
 *
 *   sigset_t stop;
 *   speed_signals_block_stop(&stop);            // first thing in main
 *   ... start threads, serve ...
 *   int sig = speed_signals_wait(&stop, -1);   // SIGINT or SIGTERM: drain
 *
 * Libraries never call these: the process's signals belong to its main.
 *
 * Thread-safety: masks are per thread; these functions change the calling thread's mask only
 * (and, for SIGPIPE, the process's disposition). speed_signals_reset is async-signal-safe.
 */
#ifndef SPEED_SIGNALS_H
#define SPEED_SIGNALS_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

/* Fills *set_p with the signals that ask a daemon to stop: SIGINT and SIGTERM. */
void speed_signals_stop_set(sigset_t *set_p);

/* Adds `set` to the calling thread's blocked signals, saving the mask it had in *old_p (NULL:
 * not saved). Returns 0 or the errno of pthread_sigmask (EINVAL). */
int speed_signals_block(const sigset_t *set, sigset_t *old_p);

/* Sets the calling thread's mask back to one saved by speed_signals_block. */
void speed_signals_restore(const sigset_t *old);

/* Ignores SIGPIPE for the whole process (writes to a closed peer return EPIPE). */
void speed_signals_ignore_pipe(void);

/* A daemon's first call, before any thread exists: speed_signals_stop_set into *set_p,
 * speed_signals_block of that set, speed_signals_ignore_pipe. */
void speed_signals_block_stop(sigset_t *set_p);

/* Takes one pending signal of `set` (which must be blocked), waiting at most timeout_ms
 * (< 0: no limit, 0: only one already pending). An interruption by another signal's handler
 * does not end the wait early. Returns the signal's number, or -1 when the time passed without
 * one. */
int speed_signals_wait(const sigset_t *set, int64_t timeout_ms);

/* Whether sig's disposition is SIG_IGN. A shell starts background jobs with SIGINT ignored:
 * a program keeps it so by not taking SIGINT. */
bool speed_signals_ignored(int sig);

/* For a child between fork and exec: unblocks every signal and gives SIGINT, SIGTERM and
 * SIGPIPE their default action — both a mask and an ignored signal survive exec, and the
 * program started there expects neither. */
void speed_signals_reset(void);

#endif /* SPEED_SIGNALS_H */
