/* Dynamic node discovery (decode.discovery: dns:NAME) on real daemons with real name resolution.
 *
 * The test runs in a private mount namespace (root) where /etc/hosts is a file of its own
 * (bind-mounted; rewritten in place) and /etc/nsswitch.conf says `hosts: files`, so
 * getaddrinfo in the router sees exactly the lines the test writes (Debian's /etc/host.conf
 * has `multi on`: every line of a name is an address). Decode nodes run at 127.0.0.2, .3 (all of
 * 127/8 is local) on the same gRPC port, with certificates from `speedctl certs` for a cluster
 * file naming the discovery name (a DNS SAN); one static prefill node.
 *   1. one decode node listed: the router finds it, health-checks it and serves through it;
 *   2. a second address listed before its node is up: added but DOWN, requests keep working;
 *      the node starts: the router routes to it;
 *   3. the first address removed while two streams run: it is retired (no new requests), the
 *      streams complete ([DONE], no error), nothing stays reserved or running;
 *   4. the name's lines removed, then the file emptied: failures are counted, the pool is kept
 *      and serves;
 *   5. a router whose discovery name is not in the nodes' certificates never routes to them;
 *   6. slot reuse: a router capped at 2 addresses (router.discovery_max_nodes 2) sees four more
 *      addresses replace the old ones one at a time (127.0.0.4 .. .7, a pod restarted at a new IP):
 *      each new node takes a retired node's slot, is health-checked and served through, nothing
 *      is refused, and the series of the addresses that left are gone from /metrics;
 *   7. a retired slot still held by a request is not reused: a stream runs on a node whose
 *      process is stopped (SIGSTOP) while its address leaves and a new one (.8) arrives with
 *      every slot taken; the new address waits (not added, not refused) until the stream ends
 *      (SIGCONT), then takes the slot.
 * Without root (or where unshare is refused) it exits 77 with the reason. */
#define _GNU_SOURCE /* unshare, CLONE_NEWNS */
#include <sched.h>
#include <sys/mount.h>

#include "openai_util.h"

#define NAME     "decode.speed.test"
#define N_PROMPT 24

static cu_cluster_t g_c;
static char g_hosts[600], g_certs[600];
static int32_t g_prompt[N_PROMPT];
#define N_DEC 7

static int g_router;
static int g_api; /* the router completion() asks */
static int g_dec_http[N_DEC];
static const char *const g_dec_addr[N_DEC] = {"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5",
                                              "127.0.0.6", "127.0.0.7", "127.0.0.8"};

/* Rewrites the private /etc/hosts in place (the bind mount holds the inode). */
static void hosts_write(const char *text) {
    FILE *f = fopen(g_hosts, "r+");
    CHECK(f != NULL);
    if (!f) return;
    CHECK(ftruncate(fileno(f), 0) == 0);
    fputs(text, f);
    fclose(f);
}

static bool private_resolver(void) {
    if (geteuid() != 0) {
        printf("SKIP: needs root (a private mount namespace for /etc/hosts)\n");
        return false;
    }
    if (unshare(CLONE_NEWNS) != 0 || mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) {
        printf("SKIP: cannot make a private mount namespace: %s\n", strerror(errno));
        return false;
    }
    snprintf(g_hosts, sizeof g_hosts, "%s/hosts", cu_dir);
    char nss[600];
    snprintf(nss, sizeof nss, "%s/nsswitch.conf", cu_dir);
    FILE *f = fopen(g_hosts, "w");
    FILE *g = fopen(nss, "w");
    if (!f || !g) {
        printf("SKIP: cannot write %s\n", cu_dir);
        return false;
    }
    fputs("127.0.0.1 localhost\n", f);
    fputs("hosts: files\n", g);
    fclose(f);
    fclose(g);
    if (mount(g_hosts, "/etc/hosts", NULL, MS_BIND, NULL) != 0 ||
        mount(nss, "/etc/nsswitch.conf", NULL, MS_BIND, NULL) != 0) {
        printf("SKIP: cannot bind-mount over /etc/hosts: %s\n", strerror(errno));
        return false;
    }
    return true;
}

static double rmetric(int port, const char *series) {
    double v = cu_metric(port, series);
    return isnan(v) ? 0 : v;
}

static void dec_series(char *buf, size_t size, const char *metric, int k) {
    snprintf(buf, size, "%s{pool=\"decode\",node=\"%s:%d\"}", metric, g_dec_addr[k], cu_dec_grpc(&g_c, 0));
}

static bool wait_up(int port, int k, double want, double timeout_s) {
    char s[160];
    dec_series(s, sizeof s, "speed_router_node_up", k);
    return cu_wait_metric(port, s, want, timeout_s);
}

static cu_proc_t start_decode(int k) {
    char http[16], name[32], ca[640], crt[640], key[640];
    snprintf(http, sizeof http, "%d", g_dec_http[k]);
    snprintf(name, sizeof name, "decode%d", k);
    snprintf(ca, sizeof ca, "%s/ca.crt", g_certs);
    snprintf(crt, sizeof crt, "%s/decode-0.crt", g_certs);
    snprintf(key, sizeof key, "%s/decode-0.key", g_certs);
    const char *more[] = {"--node.index",
                          "0",
                          "--host",
                          g_dec_addr[k],
                          "--control.listen",
                          g_dec_addr[k],
                          "--decode.http_port",
                          http,
                          "--tls.ca",
                          ca,
                          "--tls.cert",
                          crt,
                          "--tls.key",
                          key,
                          NULL};
    return cu_cluster_spawn(&g_c, "speed-decode", name, more);
}

static int completion(int max_tokens) {
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, max_tokens, 0, false, NULL, NULL);
    cu_resp_t r = {0};
    cu_post(g_api, "/v1/completions", body, &r);
    int status = r.status;
    if (status != 200) fprintf(stderr, "completion: %d %s\n", status, r.body ? r.body : "");
    cu_resp_free(&r);
    speed_free(body);
    return status;
}

static double dec_requests(int k) {
    double v = cu_metric_sum(g_dec_http[k], "speed_decode_requests_total");
    return isnan(v) ? 0 : v;
}

/* Blocks reserved and requests running on the prefill node and the live decode nodes reach 0. */
static bool wait_idle(const cu_proc_t *dec, double timeout_s) {
    double s = 1;
    for (double until = now_s() + timeout_s; now_s() < until; sleep_ms(20)) {
        s = rmetric(cu_pre_http(&g_c, 0), "speed_kv_blocks_reserved") +
            rmetric(cu_pre_http(&g_c, 0), "speed_prefill_running_requests");
        for (int k = 0; k < 2; k++)
            if (dec[k].pid)
                s += cu_metric_sum(g_dec_http[k], "speed_kv_blocks_reserved") +
                     cu_metric_sum(g_dec_http[k], "speed_decode_running_requests") +
                     cu_metric_sum(g_dec_http[k], "speed_decode_reserved_requests");
        if (s == 0) return true;
    }
    fprintf(stderr, "blocks reserved + requests running: %.0f\n", s);
    return false;
}

/* 1 when the router's /metrics has a sample of the series (name{labels}), 0 when not, -1 when
 * the page cannot be fetched. */
static int has_series(int port, const char *series) {
    char *page = cu_metrics(port);
    if (!page) return -1;
    char line[200];
    snprintf(line, sizeof line, "\n%s ", series);
    int found = strstr(page, line) != NULL;
    speed_free(page);
    return found;
}

static void hosts_pair(int a, int b) {
    char text[300];
    snprintf(text, sizeof text, "127.0.0.1 localhost\n%s " NAME "\n%s " NAME "\n", g_dec_addr[a], g_dec_addr[b]);
    hosts_write(text);
}

#define ADDED   "speed_router_discovery_nodes_added_total{pool=\"decode\"}"
#define REMOVED "speed_router_discovery_nodes_removed_total{pool=\"decode\"}"
#define REFUSED "speed_router_discovery_refused_total{pool=\"decode\"}"
#define WAITING "speed_router_discovery_waiting{pool=\"decode\"}"

/* Steps 6 and 7 (header) on router2, capped at 2 addresses; dec[0] and dec[1] run. */
static void step_reuse(cu_proc_t *dec, const char *ca, const char *rcrt, const char *rkey) {
    int rport = cu_router_port(&g_c, 2);
    char port[16];
    snprintf(port, sizeof port, "%d", rport);
    hosts_pair(0, 1);
    const char *more[] = {"--router.port",
                          port,
                          "--decode.discovery",
                          "dns:" NAME,
                          "--router.discovery_interval_ms",
                          "100",
                          "--router.status_interval_ms",
                          "100",
                          "--router.discovery_max_nodes",
                          "2",
                          "--router.decode_policy",
                          "round-robin",
                          "--tls.ca",
                          ca,
                          "--tls.cert",
                          rcrt,
                          "--tls.key",
                          rkey,
                          NULL};
    cu_proc_t router = cu_cluster_spawn(&g_c, "speed-router", "router2", more);
    CHECK(cu_wait_up(&router, rport, 60));
    CHECK(wait_up(rport, 0, 1, 30) && wait_up(rport, 1, 1, 30));
    g_api = rport;

    /* 6. four new addresses through two slots: k replaces k - 2 */
    for (int k = 2; k <= 5; k++) {
        dec[k] = start_decode(k);
        CHECK(cu_wait_up(&dec[k], g_dec_http[k], 60));
        hosts_pair(k - 1, k);
        CHECK_MSG(wait_up(rport, k, 1, 30), "%s never came up (slot not reused?)", g_dec_addr[k]);
        CHECK_INT_EQ((int)rmetric(rport, ADDED), k + 1);
        CHECK_INT_EQ((int)rmetric(rport, REMOVED), k - 1);
        CHECK_INT_EQ((int)rmetric(rport, REFUSED), 0);
        static const char *const per_node[] = {"speed_router_node_up", "speed_router_node_down_total"};
        for (int m = 0; m < 2; m++) {
            char gone[160];
            dec_series(gone, sizeof gone, per_node[m], k - 2);
            CHECK_MSG(has_series(rport, gone) == 0, "%s still on /metrics after its slot went to %s", gone,
                      g_dec_addr[k]);
        }
        double before = dec_requests(k);
        for (int i = 0; i < 4; i++) CHECK_INT_EQ(completion(4), 200);
        CHECK_MSG(dec_requests(k) >= before + 1, "%s got %.0f of 4 requests", g_dec_addr[k], dec_requests(k) - before);
        cu_stop(&dec[k - 2], SIGTERM, 30); /* its pod is gone */
    }

    /* 7. .6 (dec[4]) leaves while a stream runs on it, stopped; .8 arrives with both slots taken */
    dec[6] = start_decode(6);
    CHECK(cu_wait_up(&dec[6], g_dec_http[6], 60));
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, 250, 0, true, NULL, NULL);
    cu_sse_t s[2];
    for (int i = 0; i < 2; i++) { /* round robin over the two UP nodes: one stream on each */
        CHECK(cu_sse_begin(rport, "/v1/completions", body, NULL, 60000, &s[i]));
        CHECK_INT_EQ(s[i].status, 200);
        cu_sse_read(&s[i], 1, now_s() + 30);
    }
    kill(dec[4].pid, SIGSTOP);
    int n_stopped = s[0].n + s[1].n;
    double added = rmetric(rport, ADDED);
    hosts_pair(5, 6);
    CHECK(cu_wait_metric(rport, REMOVED, 5, 30));
    /* a bounded window of about ten poll rounds: the held slot is not given to .8 */
    char old_up[160], new_up[160];
    dec_series(old_up, sizeof old_up, "speed_router_node_up", 4);
    dec_series(new_up, sizeof new_up, "speed_router_node_up", 6);
    bool taken = false;
    for (double until = now_s() + 1.0; now_s() < until && !taken; sleep_ms(50))
        taken = has_series(rport, new_up) != 0 || rmetric(rport, ADDED) != added;
    CHECK_MSG(!taken, "the slot of %s went to %s while a request held it", g_dec_addr[4], g_dec_addr[6]);
    CHECK_INT_EQ(has_series(rport, old_up), 1);
    CHECK_INT_EQ((int)rmetric(rport, REFUSED), 0); /* it waits, it is not refused */
    CHECK_INT_EQ((int)rmetric(rport, WAITING), 1); /* and an operator sees it wait */
    kill(dec[4].pid, SIGCONT);
    for (int i = 0; i < 2; i++) {
        cu_sse_read(&s[i], -1, now_s() + 120);
        CHECK_MSG(s[i].done, "stream %d: no [DONE] (%d events)", i, s[i].n);
        for (int e = 0; e < s[i].n; e++)
            CHECK_MSG(!strstr(s[i].data[e], "\"error\""), "stream %d: %s", i, s[i].data[e]);
    }
    CHECK_MSG(s[0].n + s[1].n > n_stopped, "the streams ended before the node was stopped: nothing checked");
    for (int i = 0; i < 2; i++) cu_sse_free(&s[i]);
    speed_free(body);
    /* the stream is done: the next round gives the slot to .8 */
    CHECK_MSG(wait_up(rport, 6, 1, 30), "%s never got the slot after the stream ended", g_dec_addr[6]);
    CHECK_INT_EQ((int)rmetric(rport, ADDED), (int)added + 1);
    CHECK_INT_EQ(has_series(rport, old_up), 0);
    CHECK_INT_EQ((int)rmetric(rport, REFUSED), 0);
    CHECK_INT_EQ((int)rmetric(rport, WAITING), 0);
    double before = dec_requests(6);
    for (int i = 0; i < 4; i++) CHECK_INT_EQ(completion(4), 200);
    CHECK_MSG(dec_requests(6) >= before + 1, "%s got %.0f of 4 requests", g_dec_addr[6], dec_requests(6) - before);
    CHECK_INT_EQ(cu_stop(&router, SIGTERM, 30), 0);
}

int main(void) {
    cu_init("cluster_discovery");
    if (!private_resolver()) {
        cu_cleanup(false);
        return 77;
    }
    ou_prompt(g_prompt, N_PROMPT, 256, 11);

    /* certificates of a cluster file whose decode pool is discovered: they name NAME */
    snprintf(g_certs, sizeof g_certs, "%s/dcerts", cu_dir);
    char yaml[600];
    snprintf(yaml, sizeof yaml, "%s/cluster.yaml", cu_dir);
    FILE *f = fopen(yaml, "w");
    CHECK(f != NULL);
    fprintf(f, "decode:\n  discovery: dns:%s\n", NAME);
    fclose(f);
    CHECK_INT_EQ(tu_system("%s/speedctl certs --config %s --out %s >%s/certs.log 2>&1", cu_bin, yaml, g_certs, cu_dir),
                 0);
    char ca[640], rcrt[640], rkey[640], pcrt[640], pkey[640];
    snprintf(ca, sizeof ca, "%s/ca.crt", g_certs);
    snprintf(rcrt, sizeof rcrt, "%s/router.crt", g_certs);
    snprintf(rkey, sizeof rkey, "%s/router.key", g_certs);
    snprintf(pcrt, sizeof pcrt, "%s/prefill-0.crt", g_certs);
    snprintf(pkey, sizeof pkey, "%s/prefill-0.key", g_certs);

    cu_cluster_init(&g_c, 1, 1, NULL);
    for (int k = 0; k < N_DEC; k++) g_dec_http[k] = cu_dec_http(&g_c, k); /* B+30 .. B+36: below the routers' */
    g_router = cu_router_port(&g_c, 0);
    g_api = g_router;
    const char *pmore[] = {"--node.index", "0", "--tls.ca", ca, "--tls.cert", pcrt, "--tls.key", pkey, NULL};
    cu_proc_t pre = cu_cluster_spawn(&g_c, "speed-prefill", "prefill0", pmore);
    cu_proc_t dec[N_DEC] = {start_decode(0)};
    CHECK(cu_wait_up(&pre, cu_pre_http(&g_c, 0), 60) && cu_wait_up(&dec[0], g_dec_http[0], 60));

    /* 1. one address */
    hosts_write("127.0.0.1 localhost\n127.0.0.2 " NAME "\n");
    char port[16];
    snprintf(port, sizeof port, "%d", g_router);
    const char *rmore[] = {"--router.port",
                           port,
                           "--decode.discovery",
                           "dns:" NAME,
                           "--router.discovery_interval_ms",
                           "100",
                           "--router.status_interval_ms",
                           "100",
                           "--router.decode_policy",
                           "round-robin",
                           "--tls.ca",
                           ca,
                           "--tls.cert",
                           rcrt,
                           "--tls.key",
                           rkey,
                           NULL};
    cu_proc_t router = cu_cluster_spawn(&g_c, "speed-router", "router0", rmore);
    CHECK(cu_wait_up(&router, g_router, 60));
    CHECK(wait_up(g_router, 0, 1, 30));
    CHECK_INT_EQ((int)rmetric(g_router, "speed_router_discovery_nodes_added_total{pool=\"decode\"}"), 1);
    CHECK_INT_EQ(completion(8), 200);
    CHECK(dec_requests(0) >= 1);

    /* 2. a second address whose node is not up yet: found, DOWN, not routed to */
    hosts_write("127.0.0.1 localhost\n127.0.0.2 " NAME "\n127.0.0.3 " NAME "\n");
    CHECK(cu_wait_metric(g_router, "speed_router_discovery_nodes_added_total{pool=\"decode\"}", 2, 30));
    CHECK(wait_up(g_router, 1, 0, 5));
    /* it was never UP: it starts DOWN, not UP until a health check fails */
    char down1[160];
    dec_series(down1, sizeof down1, "speed_router_node_down_total", 1);
    CHECK_INT_EQ((int)rmetric(g_router, down1), 0);
    for (int i = 0; i < 3; i++) CHECK_INT_EQ(completion(4), 200);
    dec[1] = start_decode(1);
    CHECK(cu_wait_up(&dec[1], g_dec_http[1], 60));
    CHECK(wait_up(g_router, 1, 1, 30));
    double before = dec_requests(1);
    for (int i = 0; i < 4; i++) CHECK_INT_EQ(completion(4), 200);
    CHECK_MSG(dec_requests(1) >= before + 1, "the new node got %.0f of 4 requests", dec_requests(1) - before);

    /* 3. the first address leaves while two streams run: both complete */
    char *body = ou_completion_body("model", g_prompt, N_PROMPT, 250, 0, true, NULL, NULL);
    cu_sse_t s[2];
    for (int i = 0; i < 2; i++) {
        CHECK(cu_sse_begin(g_router, "/v1/completions", body, NULL, 60000, &s[i]));
        CHECK_INT_EQ(s[i].status, 200);
        cu_sse_read(&s[i], 1, now_s() + 30);
    }
    hosts_write("127.0.0.1 localhost\n127.0.0.3 " NAME "\n");
    CHECK(cu_wait_metric(g_router, "speed_router_discovery_nodes_removed_total{pool=\"decode\"}", 1, 30));
    int n_at_removal = s[0].n + s[1].n;
    for (int i = 0; i < 2; i++) {
        cu_sse_read(&s[i], -1, now_s() + 120);
        CHECK_MSG(s[i].done, "stream %d: no [DONE] (%d events)", i, s[i].n);
        for (int e = 0; e < s[i].n; e++)
            CHECK_MSG(!strstr(s[i].data[e], "\"error\""), "stream %d: %s", i, s[i].data[e]);
    }
    fprintf(stderr, "streams: %d events at the removal, %d in all\n", n_at_removal, s[0].n + s[1].n);
    CHECK_MSG(s[0].n + s[1].n > n_at_removal, "the streams ended before the node was retired: nothing checked");
    for (int i = 0; i < 2; i++) cu_sse_free(&s[i]);
    speed_free(body);
    CHECK(wait_up(g_router, 0, 0, 5));
    before = dec_requests(0);
    for (int i = 0; i < 3; i++) CHECK_INT_EQ(completion(4), 200);
    CHECK_MSG(dec_requests(0) == before, "the retired node got %.0f new requests", dec_requests(0) - before);
    CHECK(wait_idle(dec, 30));

    /* 4. the name vanishes, then the whole file empties: the pool is kept */
    double fails = rmetric(g_router, "speed_router_discovery_failures_total{pool=\"decode\"}");
    hosts_write("127.0.0.1 localhost\n");
    CHECK(cu_wait_metric(g_router, "speed_router_discovery_failures_total{pool=\"decode\"}", fails + 2, 30) ||
          rmetric(g_router, "speed_router_discovery_failures_total{pool=\"decode\"}") >= fails + 2);
    CHECK_INT_EQ((int)rmetric(g_router, "speed_router_discovery_nodes_removed_total{pool=\"decode\"}"), 1);
    CHECK(wait_up(g_router, 1, 1, 1));
    CHECK_INT_EQ(completion(4), 200);
    hosts_write("");
    fails = rmetric(g_router, "speed_router_discovery_failures_total{pool=\"decode\"}");
    for (double until = now_s() + 30; now_s() < until; sleep_ms(20))
        if (rmetric(g_router, "speed_router_discovery_failures_total{pool=\"decode\"}") >= fails + 2) break;
    CHECK(rmetric(g_router, "speed_router_discovery_failures_total{pool=\"decode\"}") >= fails + 2);
    CHECK(wait_up(g_router, 1, 1, 1));
    CHECK_INT_EQ(completion(4), 200);

    /* 5. a name the certificates do not carry: the nodes are found but never trusted; and a pool
     *    capped at one address refuses the second */
    hosts_write("127.0.0.1 localhost\n127.0.0.3 wrong.speed.test\n127.0.0.2 wrong.speed.test\n");
    char port2[16];
    snprintf(port2, sizeof port2, "%d", cu_router_port(&g_c, 1));
    const char *wmore[] = {"--router.port",
                           port2,
                           "--decode.discovery",
                           "dns:wrong.speed.test",
                           "--router.discovery_interval_ms",
                           "100",
                           "--router.status_interval_ms",
                           "100",
                           "--router.discovery_max_nodes",
                           "1",
                           "--tls.ca",
                           ca,
                           "--tls.cert",
                           rcrt,
                           "--tls.key",
                           rkey,
                           NULL};
    cu_proc_t wrong = cu_cluster_spawn(&g_c, "speed-router", "router1", wmore);
    int wport = cu_router_port(&g_c, 1);
    CHECK(cu_wait_metric(wport, "speed_router_discovery_nodes_added_total{pool=\"decode\"}", 1, 60));
    for (double until = now_s() + 30; now_s() < until; sleep_ms(20))
        if (rmetric(wport, "speed_router_discovery_refused_total{pool=\"decode\"}") >= 1) break;
    CHECK(rmetric(wport, "speed_router_discovery_refused_total{pool=\"decode\"}") >= 1);
    CHECK_INT_EQ((int)rmetric(wport, "speed_router_discovery_nodes_added_total{pool=\"decode\"}"), 1);
    /* a bounded window: a trusted node would be UP within a few 100 ms polls */
    char ws[160];
    dec_series(ws, sizeof ws, "speed_router_node_up", 1);
    bool ever_up = false;
    for (double until = now_s() + 2; now_s() < until && !ever_up; sleep_ms(50)) ever_up = rmetric(wport, ws) == 1;
    CHECK_MSG(!ever_up, "a node whose certificate does not name the discovery name was trusted");
    CHECK(cu_metric_sum(g_dec_http[1], "speed_decode_requests_total") >= 1); /* the node itself is fine */

    CHECK_INT_EQ(cu_stop(&wrong, SIGTERM, 30), 0);
    CHECK_INT_EQ(cu_stop(&router, SIGTERM, 30), 0);

    step_reuse(dec, ca, rcrt, rkey);

    for (int k = 0; k < N_DEC; k++) cu_stop(&dec[k], SIGTERM, 30);
    cu_stop(&pre, SIGTERM, 30);
    if (check_failures_) {
        cu_log_tail("router0", 40);
        cu_log_tail("router1", 20);
        cu_log_tail("router2", 60);
    }
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
