/* The bed's stand-in for netem's delay (library speed_test_netns, private to netns_bed.c): a
 * thread that reads the packets one network namespace queues to NFQUEUE 0 and accepts each one
 * delay +- jitter after it arrived. Packets queued when it stops are accepted at once.
 *
 * Thread-safety: start and stop from one thread; the delay thread touches nothing else.
 */
#ifndef SPEED_TESTS_NB_DELAY_H
#define SPEED_TESTS_NB_DELAY_H

typedef struct nb_delay nb_delay_t;

/* Starts the thread inside the namespace at ns_path (/run/netns/NAME), bound to queue 0, and
 * waits until it is bound. Returns NULL (printed) when the namespace, the netlink socket or the
 * queue cannot be opened. */
nb_delay_t *nb_delay_start(const char *ns_path, double delay_ms, double jitter_ms);

/* Accepts every packet still held, unbinds and joins the thread, frees d. NULL is a no-op. */
void nb_delay_stop(nb_delay_t *d);

#endif /* SPEED_TESTS_NB_DELAY_H */
