/* The chaos suite's cluster (library speed_test_chaos): a real np-prefill nd-decode cluster of
 * cu_spawn'd daemons behind one router, the faults the scenarios inject into it (SIGKILL a
 * node that is provably busy, SIGSTOP/SIGCONT, SIGTERM drain, restart), and the invariants
 * checked once the load has stopped:
 *
 *   - every live node holds zero reserved KV blocks, zero running, waiting and reserved
 *     requests (its /metrics), within a bound;
 *   - the router shows every node up, and every node still serves: a round of new requests
 *     reaches each node and each answer is exact;
 *   - the router's counters (node_down, prefill_retries, migrations) are read into a
 *     snapshot the scenarios compare before and after a fault.
 *
 * Thread-safety: one thread (the scenario's) drives the cluster; the metric reads are
 * reentrant and may run beside the load's workers.
 */
#ifndef SPEED_CHAOS_CLUSTER_H
#define SPEED_CHAOS_CLUSTER_H

#include <stdbool.h>

#include "chaos_load.h"
#include "cluster_util.h"

typedef enum { CH_PREFILL = 0, CH_DECODE = 1 } ch_role_t;

typedef struct {
    cu_cluster_t c;
    cu_proc_t router;
    int rport;
    int n_restarts; /* names the logs of restarted nodes */
} ch_cluster_t;

/* cu_cluster_init of k->c with the cluster arguments `extra` (NULL-terminated); place the
 * processes on hosts now (cu_cluster_place on k->c) if they are to run on the netns bed. */
void ch_cluster_init(ch_cluster_t *k, int np, int nd, const char *const *extra);

/* Starts the nodes and the router, and waits until the router sees every node up. False
 * (printed) when something did not come up. */
bool ch_cluster_start(ch_cluster_t *k, double timeout_s);

/* SIGTERM to the router and every live node; false (printed) when one did not exit 0. */
bool ch_cluster_stop(ch_cluster_t *k);

int ch_n_nodes(const ch_cluster_t *k, ch_role_t role);
cu_proc_t *ch_node(ch_cluster_t *k, ch_role_t role, int i);
const char *ch_role_name(ch_role_t role);

/* One sample of a node's /metrics (summed over labels); 0 when absent or unreachable. */
double ch_node_metric(const ch_cluster_t *k, ch_role_t role, int i, const char *name);

/* One router metric summed over its labels; 0 when absent (e.g. a metric another branch adds). */
double ch_router_metric(const ch_cluster_t *k, const char *name);

/* speed_router_node_down_total / speed_router_node_up of one node. */
double ch_router_node_down(const ch_cluster_t *k, ch_role_t role, int i);
bool ch_router_wait_node_up(const ch_cluster_t *k, ch_role_t role, int i, bool up, double timeout_s);

/* A live node of `role` whose speed_<role>_running_requests > 0, waiting up to timeout_s; -1
 * when none showed one. */
int ch_busy_node(const ch_cluster_t *k, ch_role_t role, double timeout_s);

/* Starts a replacement for node i (which must have exited) and waits for its /health and for
 * the router to take it back (speed_router_node_up 1). False (printed) otherwise. */
bool ch_node_restart(ch_cluster_t *k, ch_role_t role, int i, double timeout_s);

/* The router counters the scenarios compare. */
typedef struct {
    double prefill_retries;
    double decode_retries; /* speed_router_decode_retries_total */
    double migrations;     /* speed_router_migrations_total (0 while absent) */
    double node_down[2][CU_MAX_REPLICAS];
    double errors_5xx; /* speed_router_requests_total with a status >= 500 */
    double requests;   /* speed_router_requests_total, every status */
} ch_router_snap_t;

void ch_router_snap(const ch_cluster_t *k, ch_router_snap_t *out);

/* What the nodes still held when ch_nodes_quiet gave up (or 0s). */
typedef struct {
    double blocks;   /* speed_kv_blocks_reserved over every live node */
    double running;  /* speed_<role>_running_requests */
    double waiting;  /* speed_<role>_waiting_requests */
    double reserved; /* speed_<role>_reserved_requests */
} ch_leftover_t;

/* Waits up to timeout_s until every live node holds nothing (all four counts 0). True when it
 * did; *left says what remained either way (printed per node when not quiet). */
bool ch_nodes_quiet(const ch_cluster_t *k, double timeout_s, ch_leftover_t *left);

/* Sends 2 * max(np, nd) requests one at a time (the router balances round-robin) and checks
 * each answer is complete and exact and every node's requests_total grew. False (printed)
 * otherwise. */
bool ch_nodes_serve(ch_cluster_t *k, const ch_prompt_t *p);

#endif /* SPEED_CHAOS_CLUSTER_H */
