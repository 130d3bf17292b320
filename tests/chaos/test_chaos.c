/* The chaos suite under load (docs/chaos.md): a real 2P2D cluster (speed-router → speed-prefill
 * ×2 → UCX → speed-decode ×2, engine.batch_invariant so every answer is exact) with a load of
 * streamed and non-streamed greedy requests in flight (chaos_load.h), and one fault at a time.
 * On the netns bed when one can be made (each process on its own host, UCX tcp between them),
 * else on loopback without the network faults (SPEED_CHAOS_BED=0 forces loopback):
 *
 *   kill-prefill    SIGKILL a prefill node mid-transfer (debug.prefill_layer_delay_ms stretches
 *                   every transfer; the node is SIGSTOPped as soon as it shows a request running,
 *                   then killed, so the kill provably lands mid-transfer); restarted, taken back
 *   kill-decode     SIGKILL a decode node mid-generation (same gate); restarted, taken back
 *   freeze-prefill  SIGSTOP a prefill node mid-transfer for longer than kv.lease_ms, then SIGCONT
 *   freeze-decode   the same on a decode node mid-generation
 *   drain-prefill   SIGTERM (drain) a prefill node while it works: it exits 0, is restarted
 *   drain-decode    the same on a decode node
 *   partition       (bed) prefill0's host cut from decode0's for 6 s; the router sees both
 *   slow-link       (bed) 50 ms delay + 1% loss each way on a decode host's link for 8 s
 *
 * After every scenario, with the load stopped: no client hung or saw a truncated or malformed
 * stream, every complete answer equals its reference, every node holds nothing (blocks,
 * running, waiting, reserved), the router shows every node up and each node serves new
 * requests exactly, and the router counted the fault (node_down, prefill retries, migrations
 * or the client's clean error).
 *
 * Short form (ctest): every fault once. Long form: random faults for a duration,
 *   test_chaos --long SECONDS [--seed N] [--only a,b]
 *   (or SPEED_CHAOS_SECONDS, SPEED_CHAOS_SEED, SPEED_CHAOS_ONLY; --only also limits the short form)
 * run by hand with $SPEEDCTL set as ctest sets it; prints "chaos total ..." lines at the end. */
#include <signal.h>
#include <stdlib.h>

#include "chaos_cluster.h"
#include "log.h"
#include "model.h"
#include "netns_bed.h"

/* kv.lease_ms of the cluster: short, so that a freeze outlasts it (SPEED_CHAOS_LEASE_MS) */
static int g_lease_ms = 3000;
#define N_PROMPTS  8
#define N_WORKERS  6
#define DEADLINE_S 90.0
#define FREEZE_MS  (g_lease_ms + 1500)

typedef enum {
    F_KILL_PREFILL,
    F_KILL_DECODE,
    F_FREEZE_PREFILL,
    F_FREEZE_DECODE,
    F_DRAIN_PREFILL,
    F_DRAIN_DECODE,
    F_PARTITION, /* the netns bed only */
    F_SLOW_LINK, /* the netns bed only */
    F_N
} fault_t;

static const char *const fault_names[F_N] = {"kill-prefill",  "kill-decode",  "freeze-prefill", "freeze-decode",
                                             "drain-prefill", "drain-decode", "partition",      "slow-link"};

/* The bed's hosts: the router and the test's clients on host 0, prefill i on 1 + i, decode i on
 * 3 + i. */
#define N_HOSTS      5
#define HOST_PREFILL 1
#define HOST_DECODE  3
#define PARTITION_MS 6000
#define SLOW_LINK_MS 8000

static ch_cluster_t g_k;
static nb_bed_t *g_bed; /* NULL: every process on loopback, no network faults */
static ch_prompt_t g_prompts[N_PROMPTS];

/* The long form's totals. */
static struct {
    long long faults[F_N];
    long long faults_failed[F_N]; /* scenarios whose checks failed */
    ch_totals_t load;
    double migrations, prefill_retries, node_down, router_5xx;
    double leaked_blocks;
    double writes_dropped; /* KV writes the decode nodes refused (late ones after a reservation ended) */
} g_sum;

/* The decode nodes' speed_kv_writes_dropped, per node (a restarted node starts again at 0). */
static void writes_dropped(double v[CU_MAX_REPLICAS]) {
    for (int i = 0; i < CU_MAX_REPLICAS; i++)
        v[i] = i < ch_n_nodes(&g_k, CH_DECODE) ? ch_node_metric(&g_k, CH_DECODE, i, "speed_kv_writes_dropped") : 0;
}

/* ---- faults ------------------------------------------------------------------------------- */

static ch_role_t fault_role(fault_t f) { return f % 2 == 0 ? CH_PREFILL : CH_DECODE; }

/* A node of `role` with a request running, SIGSTOPped at once so that the request stays in
 * flight whatever the machine's speed; -1 (a failed check) when none showed one. */
static int stop_busy_node(ch_role_t role, const char *what) {
    int v = ch_busy_node(&g_k, role, 30);
    CHECK_MSG(v >= 0, "%s: no %s node showed a running request within 30 s", what, ch_role_name(role));
    if (v >= 0) CHECK(kill(ch_node(&g_k, role, v)->pid, SIGSTOP) == 0);
    return v;
}

/* The router took node v out (node_up 0, node_down_total + 1). */
static void check_taken_out(ch_role_t role, int v, const ch_router_snap_t *r0, double timeout_s, const char *what) {
    CHECK_MSG(ch_router_wait_node_up(&g_k, role, v, false, timeout_s), "%s: the router did not take %s%d out", what,
              ch_role_name(role), v);
    CHECK_MSG(ch_router_node_down(&g_k, role, v) >= r0->node_down[role][v] + 1,
              "%s: speed_router_node_down_total of %s%d did not grow", what, ch_role_name(role), v);
}

static void restart(ch_role_t role, int v, const char *what) {
    CHECK_MSG(ch_node_restart(&g_k, role, v, 60), "%s: %s%d did not rejoin after a restart", what, ch_role_name(role),
              v);
}

static void fault_kill(fault_t f, const ch_router_snap_t *r0) {
    ch_role_t role = fault_role(f);
    const char *what = fault_names[f];
    int v = stop_busy_node(role, what);
    if (v < 0) return;
    CHECK_INT_EQ(cu_stop(ch_node(&g_k, role, v), SIGKILL, 10), 128 + SIGKILL);
    fprintf(stderr, "chaos: %s: killed %s%d with a request running\n", what, ch_role_name(role), v);
    check_taken_out(role, v, r0, 10, what);
    if (role == CH_PREFILL) {
        /* the Prefill call cut short by the kill went to the other prefill node */
        double want = r0->prefill_retries + 1;
        CHECK_MSG(cu_wait_metric(g_k.rport, "speed_router_prefill_retries_total", want, 10) ||
                      ch_router_metric(&g_k, "speed_router_prefill_retries_total") >= want,
                  "%s: speed_router_prefill_retries_total did not grow: the kill did not cut a prefill short", what);
    }
    restart(role, v, what);
}

static void fault_freeze(fault_t f, const ch_router_snap_t *r0) {
    ch_role_t role = fault_role(f);
    const char *what = fault_names[f];
    double t0 = now_s();
    int v = stop_busy_node(role, what);
    if (v < 0) return;
    /* frozen longer than the leases: the router must take it out meanwhile (two health checks
     * in a row unanswered) */
    check_taken_out(role, v, r0, FREEZE_MS / 1000.0, what);
    double left_ms = FREEZE_MS - (now_s() - t0) * 1000;
    if (left_ms > 0) sleep_ms((int)left_ms); /* the fault's length, not a wait for an event */
    CHECK(kill(ch_node(&g_k, role, v)->pid, SIGCONT) == 0);
    fprintf(stderr, "chaos: %s: %s%d frozen %.1f s with a request running\n", what, ch_role_name(role), v,
            now_s() - t0);
    CHECK_MSG(ch_router_wait_node_up(&g_k, role, v, true, 30), "%s: the router did not take %s%d back", what,
              ch_role_name(role), v);
}

static void fault_drain(fault_t f, const ch_router_snap_t *r0) {
    (void)r0;
    ch_role_t role = fault_role(f);
    const char *what = fault_names[f];
    int v = ch_busy_node(&g_k, role, 30);
    CHECK_MSG(v >= 0, "%s: no %s node showed a running request", what, ch_role_name(role));
    if (v < 0) return;
    cu_proc_t *p = ch_node(&g_k, role, v);
    double t0 = now_s();
    CHECK(kill(p->pid, SIGTERM) == 0);
    /* the router stops sending it work while its running requests finish (grace 30 s) */
    CHECK_MSG(ch_router_wait_node_up(&g_k, role, v, false, 10), "%s: the router kept %s%d up while it drained", what,
              ch_role_name(role), v);
    int rc = cu_wait_exit(p, 45);
    CHECK_MSG(rc == 0, "%s: %s%d exit %d after SIGTERM", what, ch_role_name(role), v, rc);
    fprintf(stderr, "chaos: %s: %s%d drained and exited %d after %.1f s\n", what, ch_role_name(role), v, rc,
            now_s() - t0);
    restart(role, v, what);
}

/* No node was taken out since r0 (the router still sees every node through a network fault
 * that spares the control plane). */
static void check_none_taken_out(const ch_router_snap_t *r0, const char *what) {
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < ch_n_nodes(&g_k, (ch_role_t)r); i++)
            CHECK_MSG(ch_router_node_down(&g_k, r, i) == r0->node_down[r][i], "%s: the router took %s%d out", what,
                      ch_role_name(r), i);
}

/* A prefill host cut from a decode host while the router (host 0) sees both: transfers between
 * them fail and the requests go another way or get a clean error; no node is taken out. */
static void fault_partition(const ch_router_snap_t *r0) {
    const char *what = fault_names[F_PARTITION];
    int p = ch_busy_node(&g_k, CH_PREFILL, 10);
    if (p < 0) p = 0;
    int d = 0;
    CHECK(nb_partition(g_bed, HOST_PREFILL + p, HOST_DECODE + d) == 0);
    double t0 = now_s();
    sleep_ms(PARTITION_MS); /* the fault's length, with the load running */
    CHECK(nb_heal(g_bed, HOST_PREFILL + p, HOST_DECODE + d) == 0);
    fprintf(stderr, "chaos: %s: prefill%d's host cut from decode%d's for %.1f s\n", what, p, d, now_s() - t0);
    check_none_taken_out(r0, what); /* and again once the load has stopped */
}

/* 50 ms delay and 1% loss each way on a decode host's link (its KV and its control traffic). */
static void fault_slow_link(const ch_router_snap_t *r0) {
    const char *what = fault_names[F_SLOW_LINK];
    (void)r0;
    int d = ch_busy_node(&g_k, CH_DECODE, 10);
    if (d < 0) d = 0;
    nb_link_t wan = {.delay_ms = 50, .loss = 0.01};
    CHECK(nb_link_set(g_bed, HOST_DECODE + d, &wan) == 0);
    double t0 = now_s();
    sleep_ms(SLOW_LINK_MS); /* the fault's length, with the load running */
    CHECK(nb_link_clear(g_bed, HOST_DECODE + d) == 0);
    fprintf(stderr, "chaos: %s: decode%d's link at 50 ms + 1%% loss for %.1f s\n", what, d, now_s() - t0);
}

static void fault_inject(fault_t f, const ch_router_snap_t *r0) {
    switch (f) {
    case F_KILL_PREFILL:
    case F_KILL_DECODE: fault_kill(f, r0); break;
    case F_FREEZE_PREFILL:
    case F_FREEZE_DECODE: fault_freeze(f, r0); break;
    case F_DRAIN_PREFILL:
    case F_DRAIN_DECODE: fault_drain(f, r0); break;
    case F_PARTITION: fault_partition(r0); break;
    case F_SLOW_LINK: fault_slow_link(r0); break;
    default: break;
    }
}

/* ---- one scenario ------------------------------------------------------------------------- */

static long long answers(ch_load_t *l) {
    ch_totals_t t;
    ch_load_snapshot(l, &t);
    return t.n_requests;
}

/* Load, the fault, more load, then the invariants. */
static bool scenario(fault_t f, unsigned seed) {
    const char *what = fault_names[f];
    int failed0 = atomic_load(&check_failures_);
    double t0 = now_s();
    ch_router_snap_t r0, r1;
    ch_router_snap(&g_k, &r0);
    double wd0[CU_MAX_REPLICAS], wd1[CU_MAX_REPLICAS], dropped = 0;
    writes_dropped(wd0);
    ch_load_params_t lp = {.port = g_k.rport,
                           .prompts = g_prompts,
                           .n_prompts = N_PROMPTS,
                           .n_workers = N_WORKERS,
                           .deadline_s = DEADLINE_S,
                           .seed = seed};
    ch_load_t load;
    CHECK(ch_load_start(&load, &lp));
    WAIT_FOR(answers(&load) >= N_WORKERS, 60000); /* the load is flowing */
    fault_inject(f, &r0);
    /* the cluster serves under load after the fault */
    long long n_after = answers(&load);
    WAIT_FOR(answers(&load) >= n_after + N_WORKERS, 60000);
    ch_load_stop(&load);
    ch_totals_t t;
    ch_load_snapshot(&load, &t);

    /* invariant 1 and 2: complete and exact, or a clean error; never a hang */
    CHECK_MSG(ch_totals_violations(&t) == 0,
              "%s: %lld violations (hang %lld, truncated %lld, malformed %lld, wrong %lld)", what,
              ch_totals_violations(&t), t.outcomes[CH_HANG], t.outcomes[CH_TRUNCATED], t.outcomes[CH_MALFORMED],
              t.outcomes[CH_WRONG]);
    CHECK_MSG(t.outcomes[CH_COMPLETE] > 0, "%s: no request completed", what);
    /* invariant 3: nothing held once the load stopped; every node up and serving */
    ch_leftover_t left;
    bool quiet = ch_nodes_quiet(&g_k, 2.0 * g_lease_ms / 1000 + 10, &left);
    CHECK_MSG(quiet, "%s: nodes still hold %.0f blocks, %.0f running, %.0f waiting, %.0f reserved", what, left.blocks,
              left.running, left.waiting, left.reserved);
    CHECK_MSG(cu_wait_metric(g_k.rport, "speed_router_requests_running", 0, 10), "%s: the router still runs requests",
              what);
    CHECK_MSG(cu_router_wait_nodes(&g_k.c, g_k.rport, g_k.c.np, g_k.c.nd, 30), "%s: not every node is up", what);
    CHECK_MSG(ch_nodes_serve(&g_k, &g_prompts[0]), "%s: the cluster does not serve every node exactly", what);
    /* invariant 4: the router counted what happened */
    ch_router_snap(&g_k, &r1);
    writes_dropped(wd1);
    for (int i = 0; i < CU_MAX_REPLICAS; i++) dropped += wd1[i] >= wd0[i] ? wd1[i] - wd0[i] : wd1[i];
    double migrations = r1.migrations - r0.migrations, down = 0;
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < CU_MAX_REPLICAS; i++) down += r1.node_down[r][i] - r0.node_down[r][i];
    if (f == F_KILL_DECODE)
        /* the request running on the killed node was started over before its first token
         * (decode retry), migrated after it, or ended with a clean error */
        CHECK_MSG(migrations + (r1.decode_retries - r0.decode_retries) + t.outcomes[CH_CLEAN_ERROR] >= 1,
                  "%s: no decode retry, no migration and no clean error for the request on the killed node", what);
    if (f == F_KILL_DECODE || f == F_FREEZE_DECODE)
        /* transfers into the dead or frozen decode node failed there, not on the prefill nodes
         * (checked once the load has stopped: those transfers fail a while after the fault) */
        for (int i = 0; i < g_k.c.np; i++)
            CHECK_MSG(r1.node_down[CH_PREFILL][i] == r0.node_down[CH_PREFILL][i],
                      "%s: the router took prefill%d out for a transfer into the faulty decode node", what, i);
    if (f == F_PARTITION) check_none_taken_out(&r0, what);
    fprintf(stderr,
            "chaos: scenario %s: %.1f s, %lld answers (%lld streamed): %lld complete, %lld clean errors, %lld "
            "violations; router: node_down +%.0f, prefill retries +%.0f, migrations +%.0f, 5xx +%.0f; leaked blocks "
            "%.0f; KV writes dropped +%.0f\n",
            what, now_s() - t0, t.n_requests, t.n_streamed, t.outcomes[CH_COMPLETE], t.outcomes[CH_CLEAN_ERROR],
            ch_totals_violations(&t), down, r1.prefill_retries - r0.prefill_retries, migrations,
            r1.errors_5xx - r0.errors_5xx, left.blocks, dropped);
    if (t.outcomes[CH_CLEAN_ERROR]) ch_totals_print(&t, "chaos:    ");
    g_sum.faults[f]++;
    ch_totals_add(&g_sum.load, &t);
    g_sum.migrations += migrations;
    g_sum.prefill_retries += r1.prefill_retries - r0.prefill_retries;
    g_sum.node_down += down;
    g_sum.router_5xx += r1.errors_5xx - r0.errors_5xx;
    g_sum.leaked_blocks += left.blocks;
    g_sum.writes_dropped += dropped;
    bool ok = atomic_load(&check_failures_) == failed0;
    if (!ok) g_sum.faults_failed[f]++;
    return ok;
}

static void print_totals(double seconds) {
    long long n_f = 0;
    for (int f = 0; f < F_N; f++) n_f += g_sum.faults[f];
    fprintf(stderr, "chaos total: %.0f s, faults injected %lld\n", seconds, n_f);
    for (int f = 0; f < F_N; f++)
        fprintf(stderr, "chaos total   fault %-15s %lld (checks failed in %lld)\n", fault_names[f], g_sum.faults[f],
                g_sum.faults_failed[f]);
    ch_totals_print(&g_sum.load, "chaos total");
    fprintf(stderr, "chaos total router: migrations %.0f, prefill retries %.0f, node_down %.0f, 5xx %.0f\n",
            g_sum.migrations, g_sum.prefill_retries, g_sum.node_down, g_sum.router_5xx);
    fprintf(stderr, "chaos total leaked blocks %.0f, hangs %lld, violations %lld\n", g_sum.leaked_blocks,
            g_sum.load.outcomes[CH_HANG], ch_totals_violations(&g_sum.load));
    fprintf(stderr, "chaos total KV writes dropped by decode nodes %.0f\n", g_sum.writes_dropped);
}

/* ---- main --------------------------------------------------------------------------------- */

/* Whether a netns bed can be made here: a child tries (nb_create exits 77 where it cannot). */
static bool bed_usable(void) {
    pid_t pid = fork();
    if (pid == 0) {
        speed_log_configure("error");
        nb_bed_t *b = nb_create(1);
        nb_destroy(b);
        _exit(0);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return false;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static const char *arg_str(int argc, char **argv, const char *opt, const char *env) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], opt) == 0) return argv[i + 1];
    const char *e = getenv(env);
    return e && *e ? e : NULL;
}

static double arg_or_env(int argc, char **argv, const char *opt, const char *env, double def) {
    const char *v = arg_str(argc, argv, opt, env);
    return v ? atof(v) : def;
}

/* --only a,b (SPEED_CHAOS_ONLY): the fault kinds to inject, by name; all when absent. False
 * (printed) for an unknown name. */
static bool faults_enabled(const char *list, bool on[F_N]) {
    for (int f = 0; f < F_N; f++) on[f] = list == NULL;
    for (const char *q = list; q && *q;) {
        size_t n = strcspn(q, ",");
        int found = -1;
        for (int f = 0; f < F_N; f++)
            if (strlen(fault_names[f]) == n && strncmp(q, fault_names[f], n) == 0) found = f;
        if (found < 0) {
            fprintf(stderr, "test_chaos: unknown fault \"%.*s\" (kinds:", (int)n, q);
            for (int f = 0; f < F_N; f++) fprintf(stderr, " %s", fault_names[f]);
            fprintf(stderr, ")\n");
            return false;
        }
        on[found] = true;
        q += n + (q[n] == ',');
    }
    return true;
}

int main(int argc, char **argv) {
    speed_log_configure("error");
    double t_start = now_s();
    double long_s = arg_or_env(argc, argv, "--long", "SPEED_CHAOS_SECONDS", 0);
    unsigned seed = (unsigned)arg_or_env(argc, argv, "--seed", "SPEED_CHAOS_SEED", 1);
    g_lease_ms = (int)arg_or_env(argc, argv, "--lease-ms", "SPEED_CHAOS_LEASE_MS", g_lease_ms);
    bool on[F_N];
    if (!faults_enabled(arg_str(argc, argv, "--only", "SPEED_CHAOS_ONLY"), on)) return 1;
    /* The netns bed when this machine can make one (root, ip netns, iptables) and
     * SPEED_CHAOS_BED is not 0: every process on a host of its own, UCX over tcp between them,
     * and the network faults. Otherwise loopback, and the network faults are skipped. */
    const char *bed_env = getenv("SPEED_CHAOS_BED");
    if (!(bed_env && strcmp(bed_env, "0") == 0) && bed_usable()) {
        g_bed = nb_create(N_HOSTS);
        CHECK(nb_host_enter(g_bed, 0) == 0); /* the clients (and the load's threads) on host 0 */
    }
    fprintf(stderr, "chaos: %s\n", g_bed ? "on the netns bed (5 hosts, UCX tcp)" : "on loopback (no netns bed)");
    if (!g_bed)
        for (int f = F_PARTITION; f <= F_SLOW_LINK; f++) {
            if (on[f]) fprintf(stderr, "chaos: %s skipped: no netns bed here\n", fault_names[f]);
            on[f] = false;
        }
    cu_init("chaos");
    char model_dir[600];
    snprintf(model_dir, sizeof model_dir, "%s/model", cu_dir);
    speed_model_t *model = NULL;
    CHECK_INT_EQ(speed_model_load(model_dir, NULL, &model), SPEED_OK);
    if (!model) return CHECK_DONE();
    int vocab = model->config.vocab_size;
    speed_model_destroy(model);

    /* prompts of several lengths, generations long enough to be cut by a decode fault */
    static const int lens[N_PROMPTS] = {24, 40, 64, 96, 130, 48, 200, 32};
    static const int gens[N_PROMPTS] = {16, 48, 8, 96, 24, 160, 40, 64};
    bool refs = true;
    for (int i = 0; i < N_PROMPTS; i++)
        refs = ch_prompt_init(&g_prompts[i], lens[i], 37 + 4 * i, vocab, gens[i], "3") && refs;
    CHECK_MSG(refs, "references could not be made");
    fprintf(stderr, "chaos: references ready after %.1f s\n", now_s() - t_start);

    /* "--key=value": cu_cluster_t holds 32 cluster arguments */
    char lease[32];
    snprintf(lease, sizeof lease, "--kv.lease_ms=%d", g_lease_ms);
    const char *extra[] = {"--speed.prefill_layers=3", "--engine.batch_invariant=true", lease,
                           /* every transfer takes a while, so a kill or a freeze lands mid-transfer */
                           "--debug.prefill_layer_delay_ms=10", "--prefill.prefill_chunk=32",
                           "--router.prefill_policy=round-robin", "--router.decode_policy=round-robin",
                           "--router.status_interval_ms=500", "--log=info",
                           /* on the bed: the KV between hosts over tcp on eth0 (on loopback the
                            * list ends here: shm) */
                           g_bed ? "--ucx.transport=tcp" : NULL, "--ucx.net_devices=" NB_HOST_DEV, NULL};
    ch_cluster_init(&g_k, 2, 2, extra);
    if (g_bed) {
        cu_cluster_place(&g_k.c, "router", 0, nb_host_ns(g_bed, 0), nb_host_addr(g_bed, 0));
        for (int i = 0; i < 2; i++) {
            cu_cluster_place(&g_k.c, "prefill", i, nb_host_ns(g_bed, HOST_PREFILL + i),
                             nb_host_addr(g_bed, HOST_PREFILL + i));
            cu_cluster_place(&g_k.c, "decode", i, nb_host_ns(g_bed, HOST_DECODE + i),
                             nb_host_addr(g_bed, HOST_DECODE + i));
        }
    }
    bool up = refs && ch_cluster_start(&g_k, 60);
    CHECK_MSG(up, "the cluster did not come up");
    fprintf(stderr, "chaos: cluster up after %.1f s\n", now_s() - t_start);

    if (up) {
        if (long_s <= 0) {
            /* short form: every fault once */
            static const fault_t order[] = {F_KILL_PREFILL,  F_KILL_DECODE,  F_FREEZE_PREFILL, F_FREEZE_DECODE,
                                            F_DRAIN_PREFILL, F_DRAIN_DECODE, F_PARTITION,      F_SLOW_LINK};
            for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
                if (on[order[i]]) scenario(order[i], seed + (unsigned)i);
        } else {
            /* long form: random faults until the time is up */
            unsigned r = seed;
            int n = 0;
            bool any = false;
            for (int f = 0; f < F_N; f++) any = any || on[f];
            while (any && now_s() - t_start < long_s) {
                fault_t f = (fault_t)(rand_r(&r) % F_N);
                if (on[f]) scenario(f, seed + (unsigned)n++);
            }
        }
    }
    print_totals(now_s() - t_start);
    if (up) CHECK_MSG(ch_cluster_stop(&g_k), "the cluster did not stop cleanly");
    if (g_bed) {
        nb_host_leave(g_bed);
        nb_destroy(g_bed);
    }
    for (int i = 0; i < N_PROMPTS; i++) ch_prompt_cleanup(&g_prompts[i]);
    int failed = CHECK_DONE();
    cu_cleanup(failed != 0);
    return failed;
}
