/* Helpers for the tests that run real daemons (library speed_test_daemon): a scratch directory
 * with a tiny model, the daemons started as child processes on loopback ports unique to this
 * test process, a cluster's port layout and start-up, and `speedctl generate --json` as the
 * reference.
 *
 * Includes daemon_client.h (HTTP to the daemons: cu_http, cu_sse_*, cu_wait_health, cu_metric,
 * ...), test_proc.h and test_clock.h, which these tests use alongside.
 *
 * Each daemon's stdout and stderr go to <cu_dir>/<name>.log; children are killed if the test
 * process dies (they never outlive it). Setup failures print the cause and exit(1); without
 * $SPEEDCTL (not run by ctest) cu_init exits 77.
 *
 * Thread-safety: cu_init and the cluster set-up run on the main thread; cu_spawn, the waits
 * and the HTTP helpers are reentrant.
 */
#ifndef SPEED_CLUSTER_UTIL_H
#define SPEED_CLUSTER_UTIL_H

#include <jansson.h>
#include <stdbool.h>
#include <sys/types.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "daemon_client.h"
#include "http.h"
#include "rpc.h"
#include "test_clock.h"
#include "test_proc.h"

/* The scratch directory (with the tiny model in <cu_dir>/model), the directory of speedctl and
 * the daemons, and the first of 100 ports reserved for this process; set by cu_init. */
extern char cu_dir[512];
extern char cu_bin[512];
extern int cu_port_base;

/* Scratch dir, binaries dir (from $SPEEDCTL), a tiny model at <dir>/model, and a block of 100
 * ports below the ephemeral range that nothing holds now, chosen from the pid (so ctest -j
 * runs tests side by side). Also sets the UCX environment for loopback and clears
 * SPEED_CONFIG / SPEED_MODEL. Exits 77 when $SPEEDCTL is not set, 1 when set-up fails. */
void cu_init(const char *name);

/* cu_init, with extra `speedctl make-tiny-model` options (e.g. a wider model). */
void cu_init_model(const char *name, const char *model_opts);

/* The test's client credentials for `identity` ("router", "admin", "prefill-0", ...,
 * "stranger": a "router" certificate of another CA), loaded once from <cu_dir>/certs, for
 * speed_rpc_channel_params_t.tls. Exits 1 when they cannot be loaded. Main thread. */
const speed_rpc_tls_t *cu_rpc_tls(const char *identity);

/* Removes the scratch directory unless `keep` or $SPEED_KEEP_TEST_LOGS (not "0") says to keep
 * it (then prints where it is). */
void cu_cleanup(bool keep);

/* Prints the last `lines` lines of <cu_dir>/<name>.log to stderr (for failures). */
void cu_log_tail(const char *name, int lines);

/* ---- daemons ------------------------------------------------------------------------------ */

typedef struct {
    pid_t pid; /* 0 once reaped */
    char name[64];
} cu_proc_t;

/* Starts <cu_bin>/<prog> with the NULL-terminated args; stdout and stderr go to
 * <cu_dir>/<name>.log. p.pid is -1 when it could not be started.
 * The daemons (speed-decode, speed-prefill, speed-router) also get --tls.ca/cert/key: the test's
 * CA and the certificate of their identity ("router", "decode-<node.index>", ...) from
 * <cu_dir>/certs (made by cu_init, tls_test_util.h), unless args already hold a --tls.* option
 * (e.g. --tls.insecure). */
cu_proc_t cu_spawn(const char *prog, const char *name, const char *const *args);

/* cu_spawn inside the network namespace `netns` (/run/netns/<netns>: a host of the netns test
 * bed, nb_host_ns); NULL = the caller's. The pid is the program's. */
cu_proc_t cu_spawn_in(const char *netns, const char *prog, const char *name, const char *const *args);

/* Waits up to timeout_s for the process to exit without signalling it (e.g. after a signal
 * sent earlier). Returns its exit code or 128 + signal; -1 when it did not exit in time (it
 * is then killed) or was already reaped. */
int cu_wait_exit(cu_proc_t *p, double timeout_s);

/* Sends sig, then cu_wait_exit. */
int cu_stop(cu_proc_t *p, int sig, double timeout_s);

/* True while the child runs; when it has exited, reaps it and says so on stderr. */
bool cu_alive(cu_proc_t *p);

/* cu_wait_health(port, 200, ...) that gives up as soon as the process is gone. */
bool cu_wait_up(cu_proc_t *p, int port, double timeout_s);

/* `speedctl generate --json` on the tiny model (top 2 logprobs, 1 thread): the reference
 * tokens and logprobs (caller json_decref()s), or NULL (printed). */
json_t *cu_generate_ref(const char *prompt_ids, const char *prefill_layers, int max_tokens);

/* ---- a cluster of real daemons ---------------------------------------------------------- */

/* Port layout from a base B: prefill i gRPC B+i, HTTP B+10+i; decode i gRPC B+20+i,
 * HTTP B+30+i; the routers B+40, B+41, ... (each router gets its --router.port; the nodes keep the
 * default router port, which overlaps none of these). */
#define CU_MAX_REPLICAS 4
typedef struct {
    char netns[64]; /* "" = the test's own namespace */
    char addr[64];  /* the address peers dial; "" = 127.0.0.1 */
} cu_place_t;

typedef struct {
    int B, np, nd;
    cu_proc_t pre[CU_MAX_REPLICAS], dec[CU_MAX_REPLICAS];
    /* where each process runs (cu_cluster_place); all "" = every process on loopback */
    cu_place_t at_pre[CU_MAX_REPLICAS], at_dec[CU_MAX_REPLICAS], at_router[CU_MAX_REPLICAS];
    bool placed;
    char model_dir[600];
    char common[32][640]; /* the cluster arguments every process gets */
    int n_common;
} cu_cluster_t;

int cu_pre_grpc(const cu_cluster_t *c, int i);
int cu_pre_http(const cu_cluster_t *c, int i);
int cu_dec_grpc(const cu_cluster_t *c, int i);
int cu_dec_http(const cu_cluster_t *c, int i);
int cu_router_port(const cu_cluster_t *c, int k);

/* Sets up the arguments of a np-prefill nd-decode cluster on the model in cu_dir, at
 * cu_port_base; `extra` (NULL-terminated, may be NULL) are more cluster arguments for every
 * process. Starts nothing. */
void cu_cluster_init(cu_cluster_t *c, int np, int nd, const char *const *extra);

/* Every process of the cluster loads the model in dir instead of the one cu_cluster_init wrote
 * (call before starting anything); c->model_dir names it after. */
void cu_cluster_use_model(cu_cluster_t *c, const char *dir);

/* Which decode node serves a request: cu_dec_served fills counts[c->nd] with each decode node's
 * speed_decode_requests_total; cu_dec_served_since returns the one node whose count moved since
 * `before`, or -1 with a CHECK failure when none or several did. */
void cu_dec_served(const cu_cluster_t *c, double *counts);
int cu_dec_served_since(const cu_cluster_t *c, const double *before);

/* A metric summed over every sample on every decode node (cu_metric_sum0 of each). */
double cu_dec_metric_sum0(const cu_cluster_t *c, const char *name);

/* The router's series of decode node d's prefix index size
 * (speed_router_kv_index_blocks{node="host:grpc_port"}), written into buf; returns buf. */
const char *cu_router_index_series(const cu_cluster_t *c, int d, char *buf, size_t cap);

/* Puts process i of `role` ("prefill", "decode", or "router" for router i) on a host: it runs in
 * network namespace `netns` and binds and is dialled at `addr` (e.g. nb_host_ns(b, h) and
 * nb_host_addr(b, h)). Once anything is placed, every spawned node gets --control.listen and
 * --metrics.listen at its address, a router --router.listen and --metrics.listen at its
 * address, and all get --prefill.hosts / --decode.hosts listing the nodes' addresses (unplaced
 * ones: 127.0.0.1). The helpers of daemon_client.h then dial each placed port at its address
 * (cu_port_host), so the test's thread must be inside one of the bed's hosts (nb_host_enter).
 * Call after cu_cluster_init, before spawning. The test certificates name the bed's addresses. */
void cu_cluster_place(cu_cluster_t *c, const char *role, int i, const char *netns, const char *addr);

/* Spawns prog with the cluster arguments, then `more` (NULL-terminated, may be NULL); a node
 * (--node.index in `more`, else 0) or router (--router.port in `more`) placed by
 * cu_cluster_place runs on its host. */
cu_proc_t cu_cluster_spawn(cu_cluster_t *c, const char *prog, const char *name, const char *const *more);

/* Starts every node (decode first) and waits for each one's /health. True when all are up. */
bool cu_cluster_start_nodes(cu_cluster_t *c, double timeout_s);

/* Waits until the router on `port` shows at least want_pre prefill and want_dec decode nodes
 * up in its speed_router_node_up samples. */
bool cu_router_wait_nodes(const cu_cluster_t *c, int port, int want_pre, int want_dec, double timeout_s);

/* Starts router k (port cu_router_port(c, k)) with more arguments (NULL-terminated, may be
 * NULL); *ok says whether its /health turned 200 and it saw every node up within timeout_s. */
cu_proc_t cu_cluster_router(cu_cluster_t *c, int k, const char *const *more, double timeout_s, bool *ok);

#endif /* SPEED_CLUSTER_UTIL_H */
