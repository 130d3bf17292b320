/* A data centre in network namespaces: see netns_bed.h.
 *
 * The bed shells out to iproute2 and iptables (the tools an operator would use, and the only
 * interfaces to bridges and netfilter that need no netlink code here). Every command names its
 * namespace explicitly (`ip -n NS`, `ip netns exec NS iptables`), so a thread that entered a
 * host never makes the bed act on the wrong one.
 *
 * Removal must work from a signal handler, so it does not run `ip netns del`: it does what that
 * command does (detach-unmount and unlink /run/netns/NAME) with async-signal-safe calls, on a
 * fixed table of paths registered when each namespace is made. The kernel frees a namespace
 * once nothing holds it, and its veth ends and the bridge with it.
 */
#define _GNU_SOURCE 1 /* setns */
#include "netns_bed.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nb_delay.h"
#include "test_clock.h"

#define NB_PREFIX    "spnb-"
#define NB_BEDS_MAX  4
#define NB_NETNS_DIR "/run/netns"

struct nb_bed {
    int slot;                        /* index in the registry below */
    char prefix[48];                 /* "spnb-<pid>-<k>-" */
    int n;                           /* hosts */
    char ns[NB_HOSTS_MAX + 1][64];   /* host namespaces, then the switch's at [n] */
    char addr[NB_HOSTS_MAX][16];     /* 10.77.0.<i + 1> */
    int home_fd;                     /* the creating thread's namespace */
    bool chains[NB_HOSTS_MAX];       /* iptables chains NB_PART / NB_LINK made in host i */
    nb_link_t link[NB_HOSTS_MAX];    /* what nb_link_set applied */
    nb_delay_t *delay[NB_HOSTS_MAX]; /* the delay thread of host i, when delay_ms > 0 */
    bool cut[NB_HOSTS_MAX][NB_HOSTS_MAX];
};

/* ---- the registry of namespace paths (removal at exit and in signal handlers) ------------- */

static char g_paths[NB_BEDS_MAX][NB_HOSTS_MAX + 1][96];
static volatile sig_atomic_t g_used[NB_BEDS_MAX][NB_HOSTS_MAX + 1];
static nb_bed_t *g_beds[NB_BEDS_MAX];
static int g_n_made;  /* beds made by this process (their names' <k>) */
static pid_t g_owner; /* the process that made the beds: a forked child's exit or death leaves them */

static void path_remove(int s, int k) {
    if (!g_used[s][k]) return;
    g_used[s][k] = 0;
    umount2(g_paths[s][k], MNT_DETACH);
    unlink(g_paths[s][k]);
}

static void remove_all_paths(void) {
    if (getpid() != g_owner) return;
    for (int s = 0; s < NB_BEDS_MAX; s++)
        for (int k = 0; k <= NB_HOSTS_MAX; k++) path_remove(s, k);
}

static void on_fatal_signal(int sig) {
    remove_all_paths();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void install_cleanup(void) {
    static bool done;
    if (g_owner == getpid()) return;
    if (g_owner != 0) {
        /* a forked child making beds of its own: its parent's are not its to remove */
        memset((void *)g_used, 0, sizeof g_used);
        memset(g_beds, 0, sizeof g_beds);
    }
    g_owner = getpid();
    if (done) return; /* the handlers and atexit came with the fork */
    done = true;
    atexit(remove_all_paths);
    /* Not SIGSEGV/SIGBUS: ASan reports those itself; a crashed run's namespaces are swept by the
     * next one. Handlers the test installed stay. */
    static const int sigs[] = {SIGINT, SIGTERM, SIGABRT, SIGHUP};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        struct sigaction old;
        if (sigaction(sigs[i], NULL, &old) == 0 && old.sa_handler == SIG_DFL) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = on_fatal_signal;
            sigemptyset(&sa.sa_mask);
            sigaction(sigs[i], &sa, NULL);
        }
    }
}

/* ---- commands ------------------------------------------------------------------------------ */

/* Runs a shell command line quietly; on failure prints it with its output. Returns 0 or -1. */
static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run(const char *fmt, ...) {
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char out[64];
    snprintf(out, sizeof out, "/tmp/spnb-%d.out", (int)getpid());
    int rc = tu_system("%s > %s 2>&1", cmd, out);
    if (rc != 0) {
        fprintf(stderr, "netns bed: `%s` failed (%d):\n", cmd, rc);
        tu_system("cat %s >&2", out);
    }
    unlink(out);
    return rc == 0 ? 0 : -1;
}

/* Sweeps namespaces spnb-<pid>-... of processes that no longer exist. */
static void sweep_dead(void) {
    DIR *dir = opendir(NB_NETNS_DIR);
    if (!dir) return;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (strncmp(e->d_name, NB_PREFIX, strlen(NB_PREFIX)) != 0) continue;
        long pid = strtol(e->d_name + strlen(NB_PREFIX), NULL, 10);
        if (pid <= 0 || pid == getpid() || kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
        char path[600];
        snprintf(path, sizeof path, "%s/%s", NB_NETNS_DIR, e->d_name);
        umount2(path, MNT_DETACH);
        if (unlink(path) == 0) fprintf(stderr, "netns bed: removed %s, left by a dead run\n", e->d_name);
    }
    closedir(dir);
}

int nb_list_ns(const char *prefix, char *buf, size_t size) {
    DIR *dir = opendir(NB_NETNS_DIR);
    if (buf && size) buf[0] = '\0';
    if (!dir) return errno == ENOENT ? 0 : -1;
    int n = 0;
    size_t len = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0) continue;
        n++;
        if (buf && len < size) len += (size_t)snprintf(buf + len, size - len, "%s\n", e->d_name);
    }
    closedir(dir);
    return n;
}

/* ---- create / destroy ---------------------------------------------------------------------- */

static void skip(const char *why) {
    fprintf(stderr, "SKIP: netns test bed: %s\n", why);
    exit(77);
}

/* `ip netns add`, registering the path first so that a signal in between still removes it. */
static int ns_add(nb_bed_t *b, int k) {
    snprintf(g_paths[b->slot][k], sizeof g_paths[0][0], "%s/%s", NB_NETNS_DIR, b->ns[k]);
    g_used[b->slot][k] = 1;
    return run("ip netns add %s", b->ns[k]);
}

static int host_up(nb_bed_t *b, int i) {
    const char *sw = b->ns[b->n], *h = b->ns[i];
    if (ns_add(b, i) != 0) return -1;
    if (run("ip -n %s link add p%d type veth peer name %s netns %s", sw, i, NB_HOST_DEV, h) != 0) return -1;
    if (run("ip -n %s link set p%d master br0 up", sw, i) != 0) return -1;
    if (run("ip -n %s addr add %s/24 dev %s", h, b->addr[i], NB_HOST_DEV) != 0) return -1;
    if (run("ip -n %s link set %s up", h, NB_HOST_DEV) != 0) return -1;
    return run("ip -n %s link set lo up", h);
}

nb_bed_t *nb_create(int n_hosts) {
    if (n_hosts < 1 || n_hosts > NB_HOSTS_MAX) {
        fprintf(stderr, "netns bed: %d hosts (1..%d)\n", n_hosts, NB_HOSTS_MAX);
        exit(1);
    }
    if (geteuid() != 0) skip("needs root (network namespaces, veths, iptables)");
    if (tu_system("ip -V > /dev/null 2>&1") != 0) skip("iproute2 (`ip`) is not installed");
    if (tu_system("iptables --version > /dev/null 2>&1") != 0) skip("iptables is not installed (deploy/setup.sh)");
    install_cleanup();
    sweep_dead();
    int slot = -1;
    for (int s = 0; s < NB_BEDS_MAX && slot < 0; s++)
        if (!g_beds[s]) slot = s;
    if (slot < 0) {
        fprintf(stderr, "netns bed: more than %d beds at once\n", NB_BEDS_MAX);
        exit(1);
    }
    nb_bed_t *b = calloc(1, sizeof *b);
    if (!b) abort();
    b->slot = slot;
    g_beds[slot] = b;
    b->n = n_hosts;
    snprintf(b->prefix, sizeof b->prefix, NB_PREFIX "%d-%d-", (int)getpid(), g_n_made++);
    for (int i = 0; i < n_hosts; i++) {
        snprintf(b->ns[i], sizeof b->ns[i], "%sh%d", b->prefix, i);
        snprintf(b->addr[i], sizeof b->addr[i], "10.77.0.%d", i + 1);
    }
    snprintf(b->ns[n_hosts], sizeof b->ns[0], "%ssw", b->prefix);
    b->home_fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);

    if (ns_add(b, n_hosts) != 0) {
        path_remove(slot, n_hosts);
        g_beds[slot] = NULL;
        free(b);
        skip("`ip netns add` failed here (see above)");
    }
    const char *sw = b->ns[n_hosts];
    bool ok = run("ip -n %s link set lo up", sw) == 0 && run("ip -n %s link add br0 type bridge", sw) == 0 &&
              run("ip -n %s link set br0 up", sw) == 0;
    for (int i = 0; i < n_hosts && ok; i++) ok = host_up(b, i) == 0;
    if (!ok) {
        fprintf(stderr, "netns bed: set-up failed\n");
        nb_destroy(b);
        exit(1);
    }
    return b;
}

void nb_destroy(nb_bed_t *b) {
    if (!b) return;
    for (int i = 0; i < b->n; i++) nb_delay_stop(b->delay[i]);
    for (int k = 0; k <= NB_HOSTS_MAX; k++) path_remove(b->slot, k);
    if (b->home_fd >= 0) close(b->home_fd);
    g_beds[b->slot] = NULL;
    free(b);
}

int nb_n_hosts(const nb_bed_t *b) { return b->n; }
const char *nb_prefix(const nb_bed_t *b) { return b->prefix; }

static bool host_ok(const nb_bed_t *b, int i, const char *what) {
    if (b && i >= 0 && i < b->n) return true;
    fprintf(stderr, "netns bed: %s: no host %d\n", what, i);
    return false;
}

const char *nb_host_addr(const nb_bed_t *b, int i) { return host_ok(b, i, "addr") ? b->addr[i] : NULL; }
const char *nb_host_ns(const nb_bed_t *b, int i) { return host_ok(b, i, "ns") ? b->ns[i] : NULL; }

/* ---- being in a host ------------------------------------------------------------------------ */

static int enter_path(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
        fprintf(stderr, "netns bed: cannot enter %s: %s\n", path, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

int nb_host_enter(nb_bed_t *b, int i) {
    if (!host_ok(b, i, "enter")) return -1;
    return enter_path(g_paths[b->slot][i]);
}

int nb_host_leave(nb_bed_t *b) {
    if (b->home_fd < 0 || setns(b->home_fd, CLONE_NEWNET) != 0) {
        fprintf(stderr, "netns bed: cannot return to the home namespace: %s\n", strerror(errno));
        return -1;
    }
    return 0;
}

int nb_socket(nb_bed_t *b, int i, int type) {
    if (!host_ok(b, i, "socket")) return -1;
    int here = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (here < 0 || enter_path(g_paths[b->slot][i]) != 0) {
        if (here >= 0) close(here);
        return -1;
    }
    int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
    int err = errno;
    if (setns(here, CLONE_NEWNET) != 0) {
        fprintf(stderr, "netns bed: cannot return from host %d: %s\n", i, strerror(errno));
        if (fd >= 0) close(fd);
        fd = -1;
    }
    close(here);
    if (fd < 0) fprintf(stderr, "netns bed: socket in host %d: %s\n", i, strerror(err));
    return fd;
}

pid_t nb_spawn(nb_bed_t *b, int i, const char *const *argv, const tu_spawn_params_t *p) {
    if (!host_ok(b, i, "spawn")) return -1;
    tu_spawn_params_t sp = p ? *p : (tu_spawn_params_t){0};
    sp.netns = b->ns[i];
    return tu_spawn(argv, &sp);
}

/* ---- faults ---------------------------------------------------------------------------------- */

/* NB_PART (partitions) sees every packet in and out; NB_LINK (loss, delay) those on eth0. */
static int ensure_chains(nb_bed_t *b, int i) {
    if (b->chains[i]) return 0;
    const char *h = b->ns[i];
    if (run("ip netns exec %s sh -c 'iptables -N NB_PART && iptables -N NB_LINK && "
            "iptables -A INPUT -j NB_PART && iptables -A OUTPUT -j NB_PART && "
            "iptables -A INPUT -i %s -j NB_LINK && iptables -A OUTPUT -o %s -j NB_LINK'",
            h, NB_HOST_DEV, NB_HOST_DEV) != 0)
        return -1;
    b->chains[i] = true;
    return 0;
}

int nb_link_set(nb_bed_t *b, int i, const nb_link_t *l) {
    if (!host_ok(b, i, "link") || !l) return -1;
    if (!(l->delay_ms >= 0 && l->jitter_ms >= 0 && l->loss >= 0 && l->loss < 1 && l->rate_mbit >= 0) ||
        l->delay_ms > 60000 || l->jitter_ms > 60000) {
        fprintf(stderr, "netns bed: link %d: bad setting (delay %g ms, jitter %g ms, loss %g, rate %g Mbit/s)\n", i,
                l->delay_ms, l->jitter_ms, l->loss, l->rate_mbit);
        return -1;
    }
    if (ensure_chains(b, i) != 0) return -1;
    const char *h = b->ns[i], *sw = b->ns[b->n];
    /* Old setting off first: the rules (packets then pass), then the delay thread, which
     * accepts what it still holds. */
    if (run("ip netns exec %s iptables -F NB_LINK", h) != 0) return -1;
    nb_delay_stop(b->delay[i]);
    b->delay[i] = NULL;
    memset(&b->link[i], 0, sizeof b->link[i]);
    /* `tc qdisc del` of a default root qdisc fails: nothing to undo then. */
    tu_system("tc -n %s qdisc del dev %s root > /dev/null 2>&1", h, NB_HOST_DEV);
    tu_system("tc -n %s qdisc del dev p%d root > /dev/null 2>&1", sw, i);

    if (l->loss > 0 && run("ip netns exec %s iptables -A NB_LINK -m statistic --mode random --probability %.6f -j DROP",
                           h, l->loss) != 0)
        return -1;
    if (l->delay_ms > 0 || l->jitter_ms > 0) {
        b->delay[i] = nb_delay_start(g_paths[b->slot][i], l->delay_ms, l->jitter_ms);
        if (!b->delay[i]) return -1;
        if (run("ip netns exec %s iptables -A NB_LINK -j NFQUEUE --queue-num 0 --queue-bypass", h) != 0) return -1;
    }
    if (l->rate_mbit > 0) {
        /* burst: at least one MTU and ~10 ms of the rate; latency bounds the queue */
        double burst_kb = fmax(4.0, l->rate_mbit * 1000.0 / 8.0 * 0.010);
        if (run("tc -n %s qdisc add dev %s root tbf rate %.3fmbit burst %.0fkb latency 200ms", h, NB_HOST_DEV,
                l->rate_mbit, burst_kb) != 0 ||
            run("tc -n %s qdisc add dev p%d root tbf rate %.3fmbit burst %.0fkb latency 200ms", sw, i, l->rate_mbit,
                burst_kb) != 0)
            return -1;
    }
    b->link[i] = *l;
    return 0;
}

int nb_link_clear(nb_bed_t *b, int i) {
    nb_link_t none = {0};
    return nb_link_set(b, i, &none);
}

/* Adds (-A) or deletes (-D) host i's rules against host j's address. */
static int part_rules(nb_bed_t *b, int i, int j, const char *op) {
    return run("ip netns exec %s sh -c 'iptables %s NB_PART -s %s -j DROP && iptables %s NB_PART -d %s -j DROP'",
               b->ns[i], op, b->addr[j], op, b->addr[j]);
}

int nb_partition(nb_bed_t *b, int i, int j) {
    if (!host_ok(b, i, "partition") || !host_ok(b, j, "partition") || i == j) return -1;
    if (b->cut[i][j]) return 0;
    if (ensure_chains(b, i) != 0 || ensure_chains(b, j) != 0) return -1;
    if (part_rules(b, i, j, "-A") != 0 || part_rules(b, j, i, "-A") != 0) return -1;
    b->cut[i][j] = b->cut[j][i] = true;
    return 0;
}

int nb_heal(nb_bed_t *b, int i, int j) {
    if (!host_ok(b, i, "heal") || !host_ok(b, j, "heal")) return -1;
    if (!b->cut[i][j]) return 0;
    if (part_rules(b, i, j, "-D") != 0 || part_rules(b, j, i, "-D") != 0) return -1;
    b->cut[i][j] = b->cut[j][i] = false;
    return 0;
}

int nb_heal_all(nb_bed_t *b) {
    int rc = 0;
    for (int i = 0; i < b->n; i++)
        for (int j = i + 1; j < b->n; j++)
            if (nb_heal(b, i, j) != 0) rc = -1;
    return rc;
}

/* ---- checks ---------------------------------------------------------------------------------- */

double nb_tcp_connect_ms(nb_bed_t *b, int from, const char *addr, int port, int timeout_ms, bool *refused_p) {
    if (refused_p) *refused_p = false;
    int fd = nb_socket(b, from, SOCK_STREAM | SOCK_NONBLOCK);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) {
        close(fd);
        return -1;
    }
    double t0 = now_s();
    int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    int err = rc == 0 ? 0 : errno;
    if (rc != 0 && err == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int left = timeout_ms;
        for (;;) {
            int r = poll(&p, 1, left);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                close(fd);
                return -1; /* timed out */
            }
            break;
        }
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    }
    double ms = (now_s() - t0) * 1000.0;
    close(fd);
    if (err == ECONNREFUSED) {
        if (refused_p) *refused_p = true;
        return ms;
    }
    return err == 0 ? ms : -1;
}
