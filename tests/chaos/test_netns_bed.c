/* The netns test bed (netns_bed.h) on three hosts:
 *   - every host reaches every other over TCP; each has its own loopback;
 *   - a link delay raises the round trip by ~2 x delay on that link only, and clearing it
 *     restores it; loss drops about that share of datagrams; a rate limit slows a bulk send;
 *   - a partition of hosts 0 and 1 times connects out (no reset) while 0 <-> 2 and 2 <-> 1 still
 *     work; healing restores 0 <-> 1;
 *   - nb_spawn's pid is the program's, inside its host's namespace (SIGKILL reaches it);
 *   - a leftover namespace of a dead run is swept by the next nb_create;
 *   - a run that exits on a failed check, is killed by SIGTERM or aborts leaves nothing behind;
 *   - after nb_destroy no namespace of the bed is left and the machine's links are unchanged.
 * Exits 77 where namespaces cannot be made (not root, no iproute2 / iptables).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "netns_bed.h"
#include "test_clock.h"
#include "test_proc.h"

#define PORT 7100

static int listen_on(nb_bed_t *b, int host, const char *addr, int port, int type) {
    int fd = nb_socket(b, host, type);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, addr, &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || (type == SOCK_STREAM && listen(fd, 512) != 0)) {
        perror("bind/listen");
        close(fd);
        return -1;
    }
    return fd;
}

/* Accepts and closes whatever connected, so the backlog never fills. */
static void drain(int lfd) {
    int fl = fcntl(lfd, F_GETFL);
    fcntl(lfd, F_SETFL, fl | O_NONBLOCK);
    int c;
    while ((c = accept(lfd, NULL, NULL)) >= 0) close(c);
    fcntl(lfd, F_SETFL, fl);
}

/* Median connect time over 5 tries, -1 when one failed. */
static double rtt_ms(nb_bed_t *b, int from, int to, int lfd) {
    double t[5];
    for (int k = 0; k < 5; k++) {
        t[k] = nb_tcp_connect_ms(b, from, nb_host_addr(b, to), PORT, 3000, NULL);
        drain(lfd);
        if (t[k] < 0) return -1;
    }
    for (int i = 0; i < 5; i++)
        for (int j = i + 1; j < 5; j++)
            if (t[j] < t[i]) {
                double x = t[i];
                t[i] = t[j];
                t[j] = x;
            }
    return t[2];
}

/* Datagrams from host `from` to host `to` that arrive, of n sent. */
static int udp_delivered(nb_bed_t *b, int from, int to, int n) {
    int rfd = listen_on(b, to, nb_host_addr(b, to), PORT + 1, SOCK_DGRAM);
    int sfd = nb_socket(b, from, SOCK_DGRAM);
    if (rfd < 0 || sfd < 0) return -1;
    int big = 4 << 20; /* every datagram fits: only the link may lose them */
    setsockopt(rfd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(PORT + 1)};
    inet_pton(AF_INET, nb_host_addr(b, to), &a.sin_addr);
    char msg[64] = "x";
    for (int i = 0; i < n; i++) {
        sendto(sfd, msg, sizeof msg, 0, (struct sockaddr *)&a, sizeof a);
        if (i % 50 == 49) sleep_ms(2); /* keep within the receive buffer */
    }
    int got = 0;
    double until = now_s() + 1.0;
    struct timeval tv = {.tv_usec = 100000};
    setsockopt(rfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    while (now_s() < until && got < n)
        if (recv(rfd, msg, sizeof msg, 0) > 0) got++;
    close(rfd);
    close(sfd);
    return got;
}

/* Seconds to send `bytes` over TCP from host 0 to host 1 (the receiver reads in a child). */
static double bulk_s(nb_bed_t *b, size_t bytes) {
    int lfd = listen_on(b, 1, nb_host_addr(b, 1), PORT + 2, SOCK_STREAM);
    if (lfd < 0) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        int c = accept(lfd, NULL, NULL);
        char buf[65536];
        while (c >= 0 && read(c, buf, sizeof buf) > 0) {}
        _exit(0);
    }
    close(lfd);
    int fd = nb_socket(b, 0, SOCK_STREAM);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(PORT + 2)};
    inet_pton(AF_INET, nb_host_addr(b, 1), &a.sin_addr);
    double t0 = now_s(), secs = -1;
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        static char buf[65536];
        size_t sent = 0;
        while (sent < bytes) {
            ssize_t k = write(fd, buf, sizeof buf);
            if (k <= 0) break;
            sent += (size_t)k;
        }
        shutdown(fd, SHUT_WR);
        if (sent >= bytes) secs = now_s() - t0;
    }
    if (fd >= 0) close(fd);
    int status;
    waitpid(pid, &status, 0);
    secs = secs >= 0 ? now_s() - t0 : -1; /* until the receiver read everything */
    return secs;
}

static ino_t ns_inode(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? st.st_ino : 0;
}

/* A child that makes a bed, then dies the way `how` says; the parent checks nothing is left. */
static void check_dies_clean(const char *how) {
    pid_t pid = fork();
    if (pid == 0) {
        nb_bed_t *b = nb_create(2);
        (void)b;
        if (strcmp(how, "exit") == 0) exit(1); /* a failed test: atexit */
        if (strcmp(how, "sigterm") == 0) raise(SIGTERM);
        if (strcmp(how, "abort") == 0) abort();
        _exit(3);
    }
    int status;
    waitpid(pid, &status, 0);
    char prefix[48], list[512];
    snprintf(prefix, sizeof prefix, "spnb-%d-", (int)pid);
    int left = nb_list_ns(prefix, list, sizeof list);
    CHECK_MSG(left == 0, "%s: %d namespaces left:\n%s", how, left, list);
    CHECK_MSG(!WIFEXITED(status) || WEXITSTATUS(status) != 77, "%s: the child skipped", how);
}

static int count_root_links(void) {
    int fd = -1;
    const char *argv[] = {"/bin/sh", "-c", "ip -o link show | wc -l", NULL};
    tu_spawn_params_t p = {.stdout_fd_p = &fd};
    pid_t pid = tu_spawn(argv, &p);
    char buf[64] = "";
    size_t len = 0;
    if (pid > 0) tu_read_until(fd, buf, sizeof buf, &len, "\n", now_s() + 10);
    if (fd >= 0) close(fd);
    if (pid > 0) waitpid(pid, NULL, 0);
    return atoi(buf);
}

int main(void) {
    setvbuf(stderr, NULL, _IONBF, 0);
    int links_before = count_root_links();

    /* a dead run's leftover: a namespace named after a pid that no longer exists */
    pid_t dead = fork();
    if (dead == 0) _exit(0);
    waitpid(dead, NULL, 0);
    char stale[64];
    snprintf(stale, sizeof stale, "spnb-%d-0-h0", (int)dead);
    bool stale_made = geteuid() == 0 && tu_system("ip netns add %s > /dev/null 2>&1", stale) == 0;

    nb_bed_t *b = nb_create(3);
    if (stale_made) CHECK_MSG(nb_list_ns(stale, NULL, 0) == 0, "%s was not swept", stale);
    char list[1024];
    CHECK_INT_EQ(nb_list_ns(nb_prefix(b), list, sizeof list), 4); /* 3 hosts + the switch */
    CHECK_STR_EQ(nb_host_addr(b, 2), "10.77.0.3");

    int l1 = listen_on(b, 1, nb_host_addr(b, 1), PORT, SOCK_STREAM);
    int l2 = listen_on(b, 2, nb_host_addr(b, 2), PORT, SOCK_STREAM);
    CHECK(l1 >= 0 && l2 >= 0);

    /* reachability: every pair; a port with no listener is refused (the host answered) */
    double base01 = rtt_ms(b, 0, 1, l1), base02 = rtt_ms(b, 0, 2, l2), base21 = rtt_ms(b, 2, 1, l1);
    CHECK_MSG(base01 >= 0 && base02 >= 0 && base21 >= 0, "rtt 0-1 %g 0-2 %g 2-1 %g", base01, base02, base21);
    bool refused = false;
    CHECK(nb_tcp_connect_ms(b, 1, nb_host_addr(b, 0), PORT, 2000, &refused) >= 0 && refused);

    /* own loopback per host */
    CHECK(nb_host_enter(b, 2) == 0);
    int lo2 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(PORT + 3)};
    la.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(bind(lo2, (struct sockaddr *)&la, sizeof la) == 0 && listen(lo2, 8) == 0);
    CHECK(nb_host_leave(b) == 0);
    CHECK(nb_tcp_connect_ms(b, 2, "127.0.0.1", PORT + 3, 2000, &refused) >= 0 && !refused);
    CHECK(nb_tcp_connect_ms(b, 0, "127.0.0.1", PORT + 3, 2000, &refused) >= 0 && refused);
    close(lo2);

    /* delay on host 1's link: +2 x 30 ms on 0 <-> 1, nothing on 0 <-> 2 */
    nb_link_t slow = {.delay_ms = 30};
    CHECK(nb_link_set(b, 1, &slow) == 0);
    double d01 = rtt_ms(b, 0, 1, l1), d02 = rtt_ms(b, 0, 2, l2);
    fprintf(stderr, "rtt 0-1: %.3f ms, with 30 ms delay on link 1: %.3f ms; 0-2: %.3f -> %.3f ms\n", base01, d01,
            base02, d02);
    CHECK_MSG(d01 >= 55 && d01 < 200, "delayed rtt %g ms", d01);
    CHECK_MSG(d02 >= 0 && d02 < 20, "0-2 rtt %g ms under link 1's delay", d02);
    nb_link_t jitter = {.delay_ms = 20, .jitter_ms = 10};
    CHECK(nb_link_set(b, 1, &jitter) == 0);
    double j01 = rtt_ms(b, 0, 1, l1);
    CHECK_MSG(j01 >= 20 && j01 < 150, "jittered rtt %g ms", j01);
    CHECK(nb_link_clear(b, 1) == 0);
    double c01 = rtt_ms(b, 0, 1, l1);
    CHECK_MSG(c01 >= 0 && c01 < 20, "rtt after clear %g ms", c01);

    /* loss: 30% on host 1's way in */
    nb_link_t lossy = {.loss = 0.3};
    CHECK(nb_link_set(b, 1, &lossy) == 0);
    int got = udp_delivered(b, 0, 1, 1000);
    fprintf(stderr, "30%% loss on link 1: %d of 1000 datagrams arrived\n", got);
    CHECK_MSG(got >= 550 && got <= 850, "%d of 1000 arrived", got);
    CHECK(nb_link_clear(b, 1) == 0);
    got = udp_delivered(b, 0, 1, 1000);
    CHECK_MSG(got >= 990, "%d of 1000 arrived without loss", got);

    /* rate: 1 MiB at 16 Mbit/s takes ~0.5 s */
    double fast = bulk_s(b, 1 << 20);
    nb_link_t narrow = {.rate_mbit = 16};
    CHECK(nb_link_set(b, 1, &narrow) == 0);
    double limited = bulk_s(b, 1 << 20);
    CHECK(nb_link_clear(b, 1) == 0);
    fprintf(stderr, "1 MiB from host 0 to 1: %.3f s, at 16 Mbit/s: %.3f s\n", fast, limited);
    CHECK_MSG(fast >= 0 && limited >= 0.35 && limited < 5, "bulk %g s, limited %g s", fast, limited);

    /* bad settings are refused */
    nb_link_t bad = {.loss = 1.5};
    CHECK(nb_link_set(b, 1, &bad) == -1);
    CHECK(nb_link_set(b, 7, &slow) == -1);
    CHECK(nb_partition(b, 1, 1) == -1);

    /* partition 0 | 1: silence between them, 0 <-> 2 and 2 <-> 1 unaffected */
    CHECK(nb_partition(b, 0, 1) == 0);
    CHECK(nb_partition(b, 1, 0) == 0); /* idempotent */
    double p01 = nb_tcp_connect_ms(b, 0, nb_host_addr(b, 1), PORT, 300, &refused);
    double p10 = nb_tcp_connect_ms(b, 1, nb_host_addr(b, 0), PORT, 300, &refused);
    CHECK_MSG(p01 < 0 && p10 < 0, "partitioned connects: %g / %g ms", p01, p10);
    CHECK(rtt_ms(b, 0, 2, l2) >= 0);
    CHECK(rtt_ms(b, 2, 1, l1) >= 0);
    CHECK(nb_heal(b, 0, 1) == 0);
    CHECK(rtt_ms(b, 0, 1, l1) >= 0);
    CHECK(nb_partition(b, 2, 1) == 0);
    CHECK(nb_tcp_connect_ms(b, 2, nb_host_addr(b, 1), PORT, 300, NULL) < 0);
    CHECK(nb_heal_all(b) == 0);
    CHECK(rtt_ms(b, 2, 1, l1) >= 0);
    close(l1);
    close(l2);

    /* a spawned program runs inside its host, under its own pid */
    const char *argv[] = {"/bin/sleep", "30", NULL};
    pid_t pid = nb_spawn(b, 2, argv, NULL);
    CHECK(pid > 0);
    char proc_ns[64], comm[64] = "";
    snprintf(proc_ns, sizeof proc_ns, "/proc/%d/ns/net", (int)pid);
    char host_ns[128];
    snprintf(host_ns, sizeof host_ns, "/run/netns/%s", nb_host_ns(b, 2));
    double until = now_s() + 5;
    while (now_s() < until) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(comm, sizeof comm, f)) comm[0] = '\0';
            fclose(f);
        }
        if (strncmp(comm, "sleep", 5) == 0) break;
        sleep_ms(10);
    }
    CHECK_MSG(strncmp(comm, "sleep", 5) == 0, "comm '%s'", comm);
    CHECK(ns_inode(proc_ns) == ns_inode(host_ns)); /* joined before exec: sleep runs there */
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

    char prefix[48];
    snprintf(prefix, sizeof prefix, "%s", nb_prefix(b));
    nb_destroy(b);
    CHECK_MSG(nb_list_ns(prefix, list, sizeof list) == 0, "left after destroy:\n%s", list);

    check_dies_clean("exit");
    check_dies_clean("sigterm");
    check_dies_clean("abort");
    CHECK_INT_EQ(count_root_links(), links_before);
    return CHECK_DONE();
}
