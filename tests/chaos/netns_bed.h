/* A small "data centre" on one machine for the tests (library speed_test_netns): N hosts, each a
 * Linux network namespace with its own IPv4 address on one bridge, and the faults of the links
 * between them (delay, jitter, loss, rate limits, partitions).
 *
 *      host 0 (ns <p>-h0)      host 1 (ns <p>-h1)      ...       <p> = "spnb-<pid>-<k>"
 *      lo, eth0 10.77.0.1      lo, eth0 10.77.0.2
 *            |  veth                |  veth
 *      ------+------ bridge br0 in ns <p>-sw ------+------
 *
 * Everything the bed makes lives in namespaces it made: the bridge and the switch-side veth ends
 * in <p>-sw, each host's end (named "eth0", NB_HOST_DEV) in its host namespace. Nothing is added
 * to the machine's own namespace, and no host reaches anything but the other hosts (no route
 * out), so all traffic stays inside the bed.
 *
 * Faults. This machine's kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is off; tbf, htb,
 * clsact, u32 and bpf classifiers are built in, no gact/police actions), so the bed builds them
 * from what is there:
 *   - partitions: iptables DROP rules in both hosts' namespaces (chain NB_PART), on addresses,
 *     so host i and j lose each other while every other host still reaches both;
 *   - loss: iptables `statistic --mode random` DROP on the host's eth0, both directions;
 *   - delay and jitter: iptables NFQUEUE (--queue-bypass) on the host's eth0, both directions,
 *     and a thread of the test process that holds each packet for delay +- jitter before
 *     accepting it (libnetfilter_queue; jitter may reorder, as netem's does);
 *   - rate: a tbf qdisc on both ends of the host's veth.
 * A link setting applies to EACH direction of host i's link: between i and an unimpaired host
 * j the round trip grows by 2 x delay, and a packet is lost with probability ~2 x loss.
 * Needs iproute2 and iptables (deploy/setup.sh).
 *
 * Cleanup: nb_destroy removes every namespace of the bed (the kernel then deletes the veths and
 * the bridge with them). It also runs at exit (atexit: a failed CHECK, exit(1)) and on SIGINT,
 * SIGTERM, SIGABRT, SIGSEGV and SIGBUS (the handler unmounts and unlinks the namespace files
 * with async-signal-safe calls, then re-raises); only in the process that made the bed: a
 * forked child (a process of the test placed in a host) may exit or be killed without
 * removing it. nb_create first sweeps leftovers of dead runs:
 * namespaces named spnb-<pid>-... whose pid no longer exists. Processes spawned into hosts with
 * die_with_parent (cu_spawn does) die with the test.
 *
 * Skips: nb_create exits 77 with the reason when the process is not root, `ip netns add` fails,
 * or iptables is missing — ctest shows the test as skipped.
 *
 * Thread-safety: create, destroy and the fault calls from one thread (the test's main thread);
 * nb_host_enter/leave, nb_socket and nb_spawn from any thread (they change or use only the
 * calling thread's namespace). Threads created after nb_host_enter start inside that host.
 */
#ifndef SPEED_TESTS_NETNS_BED_H
#define SPEED_TESTS_NETNS_BED_H

#include <stdbool.h>
#include <sys/types.h>

#include "test_proc.h"

#define NB_HOSTS_MAX 16
#define NB_HOST_DEV  "eth0" /* the interface of every host (e.g. for ucx.net_devices) */

typedef struct nb_bed nb_bed_t;

/* Builds a bed of n_hosts (1..NB_HOSTS_MAX) hosts with loopback and eth0 up, addresses
 * 10.77.0.<i + 1>/24. Exits 77 (reason printed) where namespaces cannot be made here, 1 when
 * a later step fails (after removing what it made). Several beds may exist at once in one
 * process (their namespaces differ; their addresses overlap but never meet). */
nb_bed_t *nb_create(int n_hosts);

/* Removes the bed (stops its delay threads, deletes its namespaces, veths, bridge) and frees
 * it. Processes still running inside it keep their (now unreachable) namespace until they
 * exit: stop them first. NULL is a no-op. */
void nb_destroy(nb_bed_t *b);

int nb_n_hosts(const nb_bed_t *b);

/* Host i's address ("10.77.0.3") and namespace name ("spnb-1234-0-h2", for `ip netns exec`);
 * owned by the bed. */
const char *nb_host_addr(const nb_bed_t *b, int i);
const char *nb_host_ns(const nb_bed_t *b, int i);

/* The prefix of every namespace name of this bed ("spnb-1234-0-"). */
const char *nb_prefix(const nb_bed_t *b);

/* Moves the calling thread into host i's namespace (its sockets, connects and binds happen
 * there; 127.0.0.1 is host i's own loopback). nb_host_leave returns it to the namespace it had
 * when the bed was created. Return 0, or -1 (printed). */
int nb_host_enter(nb_bed_t *b, int i);
int nb_host_leave(nb_bed_t *b);

/* A socket(AF_INET, type | SOCK_CLOEXEC, 0) created inside host i (the calling thread's own
 * namespace is unchanged). Returns the fd or -1 (printed). */
int nb_socket(nb_bed_t *b, int i, int type);

/* tu_spawn inside host i: the child joins the namespace before exec, so the pid returned is
 * the program's (SIGKILL / SIGSTOP reach it). p may be NULL. Returns the pid or -1. */
pid_t nb_spawn(nb_bed_t *b, int i, const char *const *argv, const tu_spawn_params_t *p);

/* ---- faults --------------------------------------------------------------------------------- */

typedef struct {
    double delay_ms;  /* added to each packet in each direction (0: none) */
    double jitter_ms; /* each packet's delay drawn uniformly in delay +- jitter (clamped at 0) */
    double loss;      /* probability in [0, 1) that a packet is dropped, each direction */
    double rate_mbit; /* bandwidth limit in Mbit/s, each direction (0: none) */
} nb_link_t;

/* Sets host i's link to *l, replacing what was set before (an all-zero *l clears it). Return 0,
 * or -1 (printed) for a bad argument or a failed command. */
int nb_link_set(nb_bed_t *b, int i, const nb_link_t *l);

/* nb_link_set with all zeros. */
int nb_link_clear(nb_bed_t *b, int i);

/* Cuts hosts i and j apart (both directions; packets silently dropped, as by a dead switch
 * port: connects time out, established connections stall). Every other pair is unaffected.
 * Idempotent. Return 0 or -1 (printed). */
int nb_partition(nb_bed_t *b, int i, int j);

/* Undoes nb_partition(i, j) / every partition. Return 0 or -1 (printed). */
int nb_heal(nb_bed_t *b, int i, int j);
int nb_heal_all(nb_bed_t *b);

/* ---- checks --------------------------------------------------------------------------------- */

/* Connects from host `from` to addr:port over TCP within timeout_ms. Returns the connect time
 * in ms (>= 0: a SYN / SYN-ACK round trip, or a refusal: *refused_p set when the peer answered
 * with a reset), or -1 on a timeout or an error. refused_p may be NULL. */
double nb_tcp_connect_ms(nb_bed_t *b, int from, const char *addr, int port, int timeout_ms, bool *refused_p);

/* Names of namespaces on the machine that start with `prefix`, written one per line into buf
 * (for leak checks). Returns their count, or -1 when /run/netns cannot be read. */
int nb_list_ns(const char *prefix, char *buf, size_t size);

#endif /* SPEED_TESTS_NETNS_BED_H */
