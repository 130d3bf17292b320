/* Test scaffolding for the speed-router daemon tests (library speed_test_router).
 *
 *   - fake nodes: real speed_rpc servers speaking the speed.v1 protocol (Decode, Prefill,
 *     Node services on every fake), with behaviour knobs (failures, delays, stream breaks
 *     and stalls, Cancel RPCs ignored) and counters of what they received;
 *   - a tiny model directory (config.json + the generated default tokenizer);
 *   - the speed-router process ($SPEED_ROUTER): start with a cluster file and options,
 *     read its port from stdout, signal it, wait for its exit status;
 *   - SSE streams read through speed_http's own event parser (speed_http_client_next_event),
 *     and dotted-path JSON lookups.
 *
 * Includes daemon_client.h (cu_http, cu_post, cu_resp_t, cu_wait_health, cu_metrics, ...),
 * prom_check.h (prom_check, prom_value) and test_clock.h, which these tests use alongside.
 *
 * Thread-safety: a fake node's knobs and counters are atomics and its id lists are locked:
 * the test's thread reads and changes them while the node's handler threads run. The rest is
 * called from the test's main thread.
 */
#ifndef SPEED_TESTS_ROUTER_TEST_UTIL_H
#define SPEED_TESTS_ROUTER_TEST_UTIL_H

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "daemon_client.h"
#include "http.h"
#include "prom_check.h"
#include "rpc.h"
#include "speed_proto.h"
#include "test_clock.h"
#include "test_fs.h"
#include "tokenizer.h"

/* ---- fake nodes ------------------------------------------------------------------------ */

#define FAKE_MAX_IDS        256
#define FAKE_HEALTH_SLOW_MS 600   /* a slow Health answer: past the router's 200 ms timeout */
#define FAKE_STALL_MS       30000 /* how long a generation stalls (gen_stall_after) */

typedef struct fake_node {
    char name[32];
    int port;
    speed_rpc_server_t *server; /* NULL once killed */

    /* behaviour (change any time) */
    atomic_int health_state; /* Speed__V1__NodeState; -1 = fail Health UNAVAILABLE */
    atomic_int health_slow;  /* the next this many Health calls answer after FAKE_HEALTH_SLOW_MS */
    atomic_int reserve_code; /* 0 = reply; else fail with this gRPC code */
    atomic_int prefill_code; /* 0 = reply; else fail with this gRPC code */
    atomic_int prefill_delay_ms;
    atomic_int desc_lease_ms;   /* the lease_ms of the descriptors Reserve hands out (0: none) */
    atomic_int gen_tokens;      /* tokens per generation, the first included */
    atomic_int gen_delay_ms;    /* before each event */
    atomic_int gen_break_after; /* < 0: never; k: after k tokens end with UNAVAILABLE */
    atomic_int gen_textless;    /* tokens 1..k (after the first) carry empty text, as a token
                                 * holding part of a UTF-8 character does (0: none) */
    atomic_int gen_stall_after; /* < 0: never; k: after k tokens send nothing for
                                 * FAKE_STALL_MS unless cancelled, then go on */
    atomic_bool prefill_gate;   /* true: a Prefill waits (n_prefill_gated) until this turns
                                 * false or the request is cancelled, so a test acts on a
                                 * prefill that is provably still running */
    atomic_bool cancel_ignored; /* true: Cancel RPCs are recorded but end nothing (a prefill
                                 * stays at its gate, a generation runs on until its caller
                                 * cancels the stream itself) */

    /* what it saw */
    atomic_int n_health, n_status, n_reserve, n_prefill, n_generate, n_generate_prompt;
    atomic_int n_generate_first; /* Generate with a first token (disaggregated) */
    atomic_int n_cancel;         /* Cancel RPCs */
    atomic_int n_gen_cancelled;  /* Generate streams ended by cancellation */
    atomic_int n_gen_active;
    atomic_int n_prefill_gated; /* Prefill calls waiting at the gate now */
    atomic_int last_reserve_prefill_layers;
    atomic_int last_prefill_n_ids;
    atomic_int last_reserve_resume;      /* ReserveRequest.resume_tokens of the last Reserve */
    atomic_int last_prefill_resume;      /* PrefillRequest.resume_tokens of the last Prefill */
    atomic_int last_generate_resumed;    /* GenerateRequest.resumed_ids of the last Generate: a
                                       * migrated stream goes on from token index k (ids and
                                       * texts as if the first k had come from here) */
    atomic_int last_prefill_lease_ms;    /* the descriptor lease_ms of the last Prefill received */
    atomic_int last_generate_ignore_eos; /* SamplingParams.ignore_eos of the last Generate (-1: no sampling) */
    atomic_int live_threads;

    /* request ids, in arrival order (lists stop growing at FAKE_MAX_IDS; see fake_has_id) */
    pthread_mutex_t lock;
    char cancelled_ids[FAKE_MAX_IDS][128]; /* every Cancel RPC (Decode or Prefill service) */
    int n_cancelled_ids;
    char reserved_ids[FAKE_MAX_IDS][128]; /* Reserves answered with a reservation */
    int n_reserved_ids;
    char generated_ids[FAKE_MAX_IDS][128]; /* Generate streams that sent every token and OK */
    int n_generated_ids;
    char prefill_ids[FAKE_MAX_IDS][128]; /* Prefill calls received */
    int n_prefill_ids;
    char stream_cancelled_ids[FAKE_MAX_IDS][128]; /* Generate streams the caller cancelled */
    int n_stream_cancelled_ids;
    char last_id[128];
} fake_node_t;

/* Which id list fake_has_id searches. */
typedef enum {
    FAKE_IDS_CANCELLED,
    FAKE_IDS_RESERVED,
    FAKE_IDS_GENERATED,
    FAKE_IDS_PREFILL,
    FAKE_IDS_STREAM_CANCELLED
} fake_ids_t;

/* True when `id` is in the node's list `which` (locked; any thread). */
bool fake_has_id(fake_node_t *n, fake_ids_t which, const char *id);

/* The first id in the node's list `which` that starts with `prefix` (the router sends a
 * client's X-Request-Id "x" to the nodes as "x.<sequence>"), copied into out; false when
 * there is none. Locked; any thread. */
bool fake_find_id(fake_node_t *n, fake_ids_t which, const char *prefix, char *out, size_t cap);

/* Starts a fake node on 127.0.0.1:port with the default behaviour (serving, 5 tokens per
 * generation, no delays or failures). Returns SPEED_OK or the speed_rpc_server_* error. */
speed_status_t fake_start(fake_node_t *n, const char *name, int port);

/* Empties the node's id lists (a scenario's balance is then its own). Only while no call is
 * in progress on the node. */
void fake_clear_ids(fake_node_t *n);

/* Puts the behaviour knobs back to their defaults (counters and id lists are kept); opens
 * the prefill gate. */
void fake_defaults(fake_node_t *n);

/* The node dies: its server goes away (open calls end with UNAVAILABLE); waits up to 5 s for
 * its handler threads to end. The counters stay readable. */
void fake_kill(fake_node_t *n);

/* fake_kill, then frees what the node holds. */
void fake_stop(fake_node_t *n);

/* Resource balance at the end of a scenario, waiting up to timeout_s for it (Cancel RPCs go
 * out from the router's housekeeping thread, so they trail the answers):
 *   - every id a decode node in dec[0..nd) reserved was followed, on that node, by a Generate
 *     that ran to completion or by a Cancel for that id;
 *   - no node in dec or pre (np of them) has a generation running or a prefill at its gate;
 *   - when router_port > 0, the router's speed_router_requests_running gauge is 0.
 * A node that is down (killed) is skipped: what it held went with it. With
 * FAKE_BALANCE_STREAM_END a Generate stream its caller cancelled also counts as the release
 * (for a router that exits at once and sends no Cancel). The first imbalance is reported
 * through CHECK_MSG with `what` and the id; returns true when balanced. Call from the test's
 * main thread after the scenario's clients are done. */
#define FAKE_BALANCE_STREAM_END 1u
bool fake_check_balanced(const char *what, fake_node_t *dec, int nd, fake_node_t *pre, int np, int router_port,
                         unsigned flags, double timeout_s);

/* Starts n fake nodes named <role>0.. on n consecutive ports from a random base, retrying
 * other bases when a port is taken; *base_p gets the first port. False after 50 attempts. */
bool fake_start_pool(fake_node_t *nodes, int n, const char *role, int *base_p);

/* ---- model directory ---------------------------------------------------------------------- */

/* Makes `dir` (its parent must exist) with a config.json (4 layers, 128 positions, vocab 512)
 * and the generated default tokenizer: enough for the router, which loads no weights. */
bool make_model_dir(const char *dir);

/* ---- the router process --------------------------------------------------------------- */

typedef struct {
    pid_t pid;
    int port;
    int out_fd; /* its stdout */
    bool exited;
    int status; /* waitpid status once exited */
} router_proc_t;

/* Writes a cluster file for the fakes: prefill pool at pbase (np replicas), decode pool at
 * dbase (nd replicas), router on any port. */
bool write_cluster(const char *path, const char *model, int np, int pbase, int nd, int dbase);

/* Starts $SPEED_ROUTER with `--config cluster` and extra arguments (NULL-terminated, may be
 * NULL) and reads its port from its first stdout line ("... listening on 127.0.0.1:PORT",
 * within 30 s). False (printed; the process is killed and reaped) when it did not start. */
bool router_start(router_proc_t *rp, const char *cluster, const char *const *extra);

/* Waits up to timeout_s for the process to exit. True if it did (status in rp->status). */
bool router_wait(router_proc_t *rp, double timeout_s);

/* SIGTERM and wait up to 60 s; returns the exit code (-1: killed after the wait, or died of a
 * signal, which is printed). */
int router_stop(router_proc_t *rp);

/* ---- SSE through speed_http's event parser ---------------------------------------------- */

/* An SSE stream read to its end: the data of every event, in order. */
#define SSE_MAX_EVENTS 256
typedef struct {
    int status;
    char request_id[96];
    char content_type[96];
    char *data[SSE_MAX_EVENTS];
    int n;
    bool ended; /* the body ended cleanly */
} sse_result_t;

/* Frees the events and zeroes *s. */
void sse_result_free(sse_result_t *s);

/* Starts a streaming POST (`xid` may be NULL: no X-Request-Id); *c_p is the open client (read
 * with sse_read, then speed_http_client_destroy). False when no response head arrived. */
bool sse_begin(int port, const char *path, const char *body, const char *xid, speed_http_client_t **c_p,
               sse_result_t *out);

/* Reads up to max_events more events (< 0: to the end) into *out (events past SSE_MAX_EVENTS
 * are dropped). Returns false on a socket error. */
bool sse_read(speed_http_client_t *c, sse_result_t *out, int max_events);

/* A whole streaming request: sse_begin, then (on a 200) sse_read to the end. */
bool sse_post(int port, const char *path, const char *body, const char *xid, sse_result_t *out);

/* ---- JSON ------------------------------------------------------------------------------- */

/* s parsed (caller json_decref()s), or NULL when s is NULL or not JSON. */
json_t *json_of(const char *s);

/* The value at a dotted path with [i] indices, e.g. "choices[0].message.content" (borrowed),
 * or NULL. */
json_t *jget(json_t *root, const char *path);

/* The string at a path (borrowed), or NULL when absent or not a string. */
const char *jstr(json_t *root, const char *path);

/* The integer at a path, or -12345 when absent or not an integer. */
long long jint(json_t *root, const char *path);

#endif /* SPEED_TESTS_ROUTER_TEST_UTIL_H */
