/* Test scaffolding for the speed-router daemon tests (not product code).
 *
 *   - fake nodes: real speed_rpc servers speaking the speed.v1 protocol (Decode, Prefill,
 *     Node services on every fake), with behaviour knobs (failures, delays, stream breaks)
 *     and counters of what they received;
 *   - a tiny model directory (config.json + the generated default tokenizer);
 *   - the speed-router process ($SPEED_ROUTER): start with a cluster file and options,
 *     read its port from stdout, signal it, wait for its exit status;
 *   - HTTP helpers on speed_http's client (requests, SSE streams) and a Prometheus text
 *     format checker.
 * Included by one test source each (static functions). */
#ifndef SPEED_TESTS_ROUTER_TEST_UTIL_H
#define SPEED_TESTS_ROUTER_TEST_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "alloc.h"
#include "check.h"
#include "http.h"
#include "rpc.h"
#include "speed_proto.h"
#include "tokenizer.h"

/* Each test uses a different subset of these helpers. */
#pragma GCC diagnostic ignored "-Wunused-function"

/* ---- time ------------------------------------------------------------------------------ */

static double t_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void t_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* ---- fake nodes ------------------------------------------------------------------------ */

#define FAKE_MAX_IDS 256

typedef struct fake_node {
    char name[32];
    int port;
    speed_rpc_server_t *server;        /* NULL once killed */

    /* behaviour (change any time) */
    atomic_int health_state;           /* Speed__V1__NodeState; -1 = fail Health UNAVAILABLE */
    atomic_int reserve_code;           /* 0 = reply; else fail with this gRPC code */
    atomic_int prefill_code;           /* 0 = reply; else fail with this gRPC code */
    atomic_int prefill_delay_ms;
    atomic_int gen_tokens;             /* tokens per generation, the first included */
    atomic_int gen_delay_ms;           /* before each event */
    atomic_int gen_break_after;        /* < 0: never; k: after k tokens end with UNAVAILABLE */

    /* what it saw */
    atomic_int n_health, n_status, n_reserve, n_prefill, n_generate, n_generate_prompt;
    atomic_int n_generate_first;       /* Generate with a first token (disaggregated) */
    atomic_int n_cancel;               /* Cancel RPCs */
    atomic_int n_gen_cancelled;        /* Generate streams ended by cancellation */
    atomic_int n_gen_active;
    atomic_int last_reserve_prefill_layers;
    atomic_int last_prefill_n_ids;
    atomic_int live_threads;

    pthread_mutex_t lock;
    char cancelled_ids[FAKE_MAX_IDS][128];
    int n_cancelled_ids;
    char last_id[128];
} fake_node_t;

typedef struct {
    fake_node_t *node;
    speed_rpc_call_t *call;
    char id[128];
    int n_prompt;
    bool has_first;
    int32_t first_id;
    int top_logprobs;
    bool logprobs;
} fake_call_t;

static bool fake_id_cancelled(fake_node_t *n, const char *id)
{
    bool found = false;
    pthread_mutex_lock(&n->lock);
    for (int i = 0; i < n->n_cancelled_ids && !found; i++)
        found = strcmp(n->cancelled_ids[i], id) == 0;
    pthread_mutex_unlock(&n->lock);
    return found;
}

static void fake_reply(speed_rpc_call_t *call, const ProtobufCMessage *m)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    if (speed_proto_pack(m, &buf, &len) != SPEED_OK) {
        speed_rpc_call_finish(call, SPEED_RPC_INTERNAL, "pack");
        return;
    }
    speed_rpc_call_reply(call, buf, len);
    speed_free(buf);
}

static void fake_on_health(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len)
{
    fake_node_t *n = user;
    (void)req, (void)len;
    atomic_fetch_add(&n->n_health, 1);
    int state = atomic_load(&n->health_state);
    if (state < 0) {
        speed_rpc_call_finish(call, SPEED_RPC_UNAVAILABLE, "sick");
        return;
    }
    Speed__V1__HealthReply r = SPEED__V1__HEALTH_REPLY__INIT;
    r.state = state;
    r.role = (char *)"fake";
    r.epoch = 7;
    fake_reply(call, &r.base);
}

static void fake_on_status(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len)
{
    fake_node_t *n = user;
    (void)req, (void)len;
    atomic_fetch_add(&n->n_status, 1);
    Speed__V1__NodeStatus r = SPEED__V1__NODE_STATUS__INIT;
    r.running = atomic_load(&n->n_gen_active);
    r.state = atomic_load(&n->health_state) < 0 ? 0 : atomic_load(&n->health_state);
    fake_reply(call, &r.base);
}

static void fake_on_reserve(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len)
{
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_reserve, 1);
    Speed__V1__ReserveRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__reserve_request__descriptor, data, len,
                           (ProtobufCMessage **)&q) != SPEED_OK) {
        speed_rpc_call_finish(call, SPEED_RPC_INVALID_ARGUMENT, "bad request");
        return;
    }
    atomic_store(&n->last_reserve_prefill_layers, q->speed ? q->speed->prefill_layers : -1);
    pthread_mutex_lock(&n->lock);
    snprintf(n->last_id, sizeof n->last_id, "%s", q->request_id);
    pthread_mutex_unlock(&n->lock);
    int code = atomic_load(&n->reserve_code);
    if (code) {
        speed_rpc_call_finish(call, code, "fake reserve failure");
    } else {
        Speed__V1__KvDescriptor kv = SPEED__V1__KV_DESCRIPTOR__INIT;
        kv.total_bytes = 4096;
        kv.epoch = 7;
        kv.prefill_layers = q->speed && q->speed->prefill_layers ? q->speed->prefill_layers : 3;
        kv.anchors = 1;
        kv.tail = 1;
        Speed__V1__ReserveReply r = SPEED__V1__RESERVE_REPLY__INIT;
        r.kv = &kv;
        fake_reply(call, &r.base);
    }
    speed_proto_free(&q->base);
}

static void fake_on_cancel(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len)
{
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_cancel, 1);
    Speed__V1__CancelRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__cancel_request__descriptor, data, len,
                           (ProtobufCMessage **)&q) == SPEED_OK) {
        pthread_mutex_lock(&n->lock);
        if (n->n_cancelled_ids < FAKE_MAX_IDS)
            snprintf(n->cancelled_ids[n->n_cancelled_ids++], 128, "%s", q->request_id);
        pthread_mutex_unlock(&n->lock);
        speed_proto_free(&q->base);
    }
    Speed__V1__CancelReply r = SPEED__V1__CANCEL_REPLY__INIT;
    r.found = true;
    fake_reply(call, &r.base);
}

static void *fake_prefill_thread(void *arg)
{
    fake_call_t *c = arg;
    fake_node_t *n = c->node;
    int delay = atomic_load(&n->prefill_delay_ms);
    bool cancelled = false;
    for (int waited = 0; waited < delay && !cancelled; waited += 5) {
        t_sleep_ms(5);
        cancelled = fake_id_cancelled(n, c->id) || speed_rpc_call_is_cancelled(c->call);
    }
    int code = atomic_load(&n->prefill_code);
    if (cancelled) {
        speed_rpc_call_finish(c->call, SPEED_RPC_CANCELLED, "cancelled");
    } else if (code) {
        speed_rpc_call_finish(c->call, code, "fake prefill failure");
    } else {
        Speed__V1__Token first = SPEED__V1__TOKEN__INIT;
        first.id = 'F';
        first.text = (char *)"F";
        Speed__V1__PrefillReply r = SPEED__V1__PREFILL_REPLY__INIT;
        r.first = &first;
        r.kv_bytes_sent = 4096;
        fake_reply(c->call, &r.base);
    }
    free(c);
    atomic_fetch_sub(&n->live_threads, 1);
    return NULL;
}

static void fake_spawn(fake_node_t *n, void *(*fn)(void *), fake_call_t *c)
{
    pthread_t th;
    atomic_fetch_add(&n->live_threads, 1);
    if (pthread_create(&th, NULL, fn, c) != 0) {
        atomic_fetch_sub(&n->live_threads, 1);
        speed_rpc_call_finish(c->call, SPEED_RPC_INTERNAL, "no thread");
        free(c);
        return;
    }
    pthread_detach(th);
}

static void fake_on_prefill(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len)
{
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_prefill, 1);
    Speed__V1__PrefillRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__prefill_request__descriptor, data, len,
                           (ProtobufCMessage **)&q) != SPEED_OK || !q->kv) {
        if (q) speed_proto_free(&q->base);
        speed_rpc_call_finish(call, SPEED_RPC_INVALID_ARGUMENT, "bad request");
        return;
    }
    fake_call_t *c = calloc(1, sizeof(*c));
    c->node = n;
    c->call = call;
    snprintf(c->id, sizeof c->id, "%s", q->request_id);
    atomic_store(&n->last_prefill_n_ids, (int)q->n_prompt_ids);
    speed_proto_free(&q->base);
    fake_spawn(n, fake_prefill_thread, c);
}

/* Token i of a generation: id 'a' + i % 26, text "t<i> ". */
static void *fake_generate_thread(void *arg)
{
    fake_call_t *c = arg;
    fake_node_t *n = c->node;
    int n_tokens = atomic_load(&n->gen_tokens);
    int delay = atomic_load(&n->gen_delay_ms);
    int brk = atomic_load(&n->gen_break_after);
    atomic_fetch_add(&n->n_gen_active, 1);
    bool cancelled = false;
    int sent = 0;
    while (sent < n_tokens && !cancelled) {
        for (int waited = 0; waited < delay && !cancelled; waited += 5) {
            t_sleep_ms(5);
            cancelled = speed_rpc_call_is_cancelled(c->call) || fake_id_cancelled(n, c->id);
        }
        if (cancelled) break;
        if (brk >= 0 && sent >= brk) break;
        char text[32];
        snprintf(text, sizeof text, "t%d ", sent);
        Speed__V1__Token tok = SPEED__V1__TOKEN__INIT;
        Speed__V1__TopLogprob tops[2], *topp[2];
        tok.id = (sent == 0 && c->has_first) ? c->first_id : 'a' + sent % 26;
        tok.text = text;
        if (sent == 0 && c->has_first) snprintf(text, sizeof text, "F");
        if (c->logprobs) tok.logprob = -0.25f;
        if (c->top_logprobs > 0) {
            for (int k = 0; k < 2; k++) {
                Speed__V1__TopLogprob t0 = SPEED__V1__TOP_LOGPROB__INIT;
                tops[k] = t0;
                tops[k].id = 'a' + k;
                tops[k].logprob = -0.25f - (float)k;
                topp[k] = &tops[k];
            }
            tok.n_top_logprobs = c->top_logprobs < 2 ? (size_t)c->top_logprobs : 2;
            tok.top_logprobs = topp;
        }
        Speed__V1__Token *tp = &tok;
        Speed__V1__GenerateEvent ev = SPEED__V1__GENERATE_EVENT__INIT;
        ev.n_tokens = 1;
        ev.tokens = &tp;
        Speed__V1__Usage usage = SPEED__V1__USAGE__INIT;
        sent++;
        if (sent == n_tokens) {
            ev.finish_reason = (char *)"length";
            usage.prompt_tokens = c->n_prompt;
            usage.completion_tokens = n_tokens;
            usage.kv_bytes = c->has_first ? 4096 : 0;
            usage.kv_full_depth_bytes = 8192;
            ev.usage = &usage;
        }
        uint8_t *buf = NULL;
        size_t len = 0;
        speed_proto_pack(&ev.base, &buf, &len);
        if (speed_rpc_call_send(c->call, buf, len) == SPEED_ERR_CANCELLED) cancelled = true;
        speed_free(buf);
    }
    if (cancelled) {
        atomic_fetch_add(&n->n_gen_cancelled, 1);
        speed_rpc_call_finish(c->call, SPEED_RPC_CANCELLED, "cancelled");
    } else if (brk >= 0 && sent >= brk && sent < n_tokens) {
        speed_rpc_call_finish(c->call, SPEED_RPC_UNAVAILABLE, "fake node broke the stream");
    } else {
        speed_rpc_call_finish(c->call, SPEED_RPC_OK, NULL);
    }
    atomic_fetch_sub(&n->n_gen_active, 1);
    free(c);
    atomic_fetch_sub(&n->live_threads, 1);
    return NULL;
}

static void fake_on_generate(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len)
{
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_generate, 1);
    Speed__V1__GenerateRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__generate_request__descriptor, data, len,
                           (ProtobufCMessage **)&q) != SPEED_OK) {
        speed_rpc_call_finish(call, SPEED_RPC_INVALID_ARGUMENT, "bad request");
        return;
    }
    fake_call_t *c = calloc(1, sizeof(*c));
    c->node = n;
    c->call = call;
    snprintf(c->id, sizeof c->id, "%s", q->request_id);
    if (q->n_prompt_ids) atomic_fetch_add(&n->n_generate_prompt, 1);
    if (q->first) {
        atomic_fetch_add(&n->n_generate_first, 1);
        c->has_first = true;
        c->first_id = q->first->id;
    }
    c->n_prompt = q->n_prompt_ids ? (int)q->n_prompt_ids : 9;
    if (q->sampling) {
        c->logprobs = q->sampling->logprobs;
        c->top_logprobs = q->sampling->top_logprobs;
    }
    pthread_mutex_lock(&n->lock);
    snprintf(n->last_id, sizeof n->last_id, "%s", q->request_id);
    pthread_mutex_unlock(&n->lock);
    speed_proto_free(&q->base);
    fake_spawn(n, fake_generate_thread, c);
}

static void fake_defaults(fake_node_t *n)
{
    atomic_store(&n->health_state, SPEED__V1__NODE_STATE__NODE_STATE_SERVING);
    atomic_store(&n->gen_tokens, 5);
    atomic_store(&n->gen_delay_ms, 0);
    atomic_store(&n->gen_break_after, -1);
    atomic_store(&n->reserve_code, 0);
    atomic_store(&n->prefill_code, 0);
    atomic_store(&n->prefill_delay_ms, 0);
}

/* Starts a fake node on 127.0.0.1:port. */
static speed_status_t fake_start(fake_node_t *n, const char *name, int port)
{
    memset(n, 0, sizeof(*n));
    pthread_mutex_init(&n->lock, NULL);
    snprintf(n->name, sizeof n->name, "%s", name);
    fake_defaults(n);
    n->port = port;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    speed_rpc_server_params_t p = speed_rpc_server_default_params();
    p.address = addr;
    speed_status_t st = speed_rpc_server_create(&p, &n->server);
    if (st != SPEED_OK) return st;
    static const struct {
        const char *path;
        speed_rpc_kind_t kind;
        speed_rpc_handler_cb_t cb;
    } m[] = {
        {SPEED_METHOD_NODE_HEALTH, SPEED_RPC_UNARY, fake_on_health},
        {SPEED_METHOD_NODE_STATUS, SPEED_RPC_UNARY, fake_on_status},
        {SPEED_METHOD_DECODE_RESERVE, SPEED_RPC_UNARY, fake_on_reserve},
        {SPEED_METHOD_DECODE_GENERATE, SPEED_RPC_STREAM, fake_on_generate},
        {SPEED_METHOD_DECODE_CANCEL, SPEED_RPC_UNARY, fake_on_cancel},
        {SPEED_METHOD_PREFILL_PREFILL, SPEED_RPC_UNARY, fake_on_prefill},
        {SPEED_METHOD_PREFILL_CANCEL, SPEED_RPC_UNARY, fake_on_cancel},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0] && st == SPEED_OK; i++)
        st = speed_rpc_server_add_method(n->server, m[i].path, m[i].kind, m[i].cb, n);
    if (st == SPEED_OK) st = speed_rpc_server_start(n->server);
    if (st != SPEED_OK) {
        speed_rpc_server_destroy(n->server);
        n->server = NULL;
    }
    return st;
}

/* The node dies: its server goes away (open calls end with UNAVAILABLE). */
static void fake_kill(fake_node_t *n)
{
    if (!n->server) return;
    speed_rpc_server_destroy(n->server);
    n->server = NULL;
    for (int i = 0; i < 500 && atomic_load(&n->live_threads) > 0; i++) t_sleep_ms(10);
}

static void fake_stop(fake_node_t *n)
{
    fake_kill(n);
    pthread_mutex_destroy(&n->lock);
}

/* n consecutive ports from a random base, every one of them bound by a fake node. */
static bool fake_start_pool(fake_node_t *nodes, int n, const char *role, int *base_p)
{
    static unsigned seed;
    if (!seed) seed = (unsigned)getpid() ^ (unsigned)time(NULL);
    for (int attempt = 0; attempt < 50; attempt++) {
        int base = 20000 + (int)(rand_r(&seed) % 30000);
        int ok = 0;
        for (; ok < n; ok++) {
            char name[32];
            snprintf(name, sizeof name, "%s%d", role, ok);
            if (fake_start(&nodes[ok], name, base + ok) != SPEED_OK) break;
        }
        if (ok == n) {
            *base_p = base;
            return true;
        }
        for (int i = 0; i < ok; i++) fake_stop(&nodes[i]);
    }
    return false;
}

/* ---- model directory ---------------------------------------------------------------------- */

/* config.json (4 layers, 128 positions) + the generated default tokenizer. */
static bool make_model_dir(const char *dir)
{
    mkdir(dir, 0755);
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return false;
    fprintf(f, "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\","
               "\"num_hidden_layers\":4,\"hidden_size\":64,\"num_attention_heads\":4,"
               "\"num_key_value_heads\":2,\"intermediate_size\":172,\"vocab_size\":512,"
               "\"max_position_embeddings\":128,\"bos_token_id\":1,\"eos_token_id\":2}\n");
    fclose(f);
    return speed_tok_write_default(dir, 512) == SPEED_OK;
}

static const char *test_tmp_dir(void)
{
    const char *t = getenv("SPEED_TEST_TMP");
    return t && t[0] ? t : "/tmp";
}

/* ---- the router process --------------------------------------------------------------- */

typedef struct {
    pid_t pid;
    int port;
    int out_fd;        /* its stdout */
    bool exited;
    int status;        /* waitpid status once exited */
} router_proc_t;

/* Writes a cluster file for the fakes: prefill pool at pbase (np replicas), decode pool at
 * dbase (nd replicas), router on any port. */
static bool write_cluster(const char *path, const char *model, int np, int pbase, int nd,
                          int dbase)
{
    FILE *f = fopen(path, "w");
    if (!f) return false;
    /* http ports are not used by the router; keep them clear of everything else. */
    fprintf(f,
            "model: %s\nhost: 127.0.0.1\nlog: warn\n"
            "speed:\n  allow_request_override: true\n"
            "router:\n  port: 0\n  threads: 2\n  status_interval_ms: 100\n"
            "  prefill_policy: round-robin\n  decode_policy: round-robin\n"
            "  request_timeout_ms: 20000\n"
            "prefill:\n  replicas: %d\n  grpc_port: %d\n  http_port: %d\n"
            "decode:\n  replicas: %d\n  grpc_port: %d\n  http_port: %d\n",
            model, np, pbase, 1000 + (pbase % 500) * 2, nd, dbase, 3000 + (dbase % 500) * 2);
    fclose(f);
    return true;
}

/* Starts speed-router with `--config cluster` and extra arguments (NULL-terminated). */
static bool router_start(router_proc_t *rp, const char *cluster, const char *const *extra)
{
    memset(rp, 0, sizeof(*rp));
    const char *bin = getenv("SPEED_ROUTER");
    if (!bin || !bin[0]) {
        fprintf(stderr, "SPEED_ROUTER is not set\n");
        return false;
    }
    int fds[2];
    if (pipe(fds) != 0) return false;
    const char *argv[64];
    int argc = 0;
    argv[argc++] = bin;
    argv[argc++] = "--config";
    argv[argc++] = cluster;
    for (int i = 0; extra && extra[i] && argc < 62; i++) argv[argc++] = extra[i];
    argv[argc] = NULL;
    pid_t pid = fork();
    if (pid < 0) return false;
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    rp->pid = pid;
    rp->out_fd = fds[0];
    /* "speed-router: listening on 127.0.0.1:PORT" */
    char line[256];
    size_t n = 0;
    double until = t_now() + 30;
    while (t_now() < until && n < sizeof line - 1) {
        struct pollfd pfd = {rp->out_fd, POLLIN, 0};
        if (poll(&pfd, 1, 100) <= 0) continue;
        ssize_t k = read(rp->out_fd, line + n, 1);
        if (k <= 0) break;
        n++;
        if (line[n - 1] == '\n') break;
    }
    line[n] = '\0';
    const char *colon = strrchr(line, ':');
    if (!strstr(line, "listening on") || !colon) {
        fprintf(stderr, "router did not start (stdout: \"%s\")\n", line);
        kill(pid, SIGKILL);
        waitpid(pid, &rp->status, 0);
        rp->exited = true;
        return false;
    }
    rp->port = atoi(colon + 1);
    return true;
}

/* Waits up to timeout_s for the process to exit. True if it did (status in rp->status). */
static bool router_wait(router_proc_t *rp, double timeout_s)
{
    if (rp->exited) return true;
    double until = t_now() + timeout_s;
    while (t_now() < until) {
        pid_t w = waitpid(rp->pid, &rp->status, WNOHANG);
        if (w == rp->pid) {
            rp->exited = true;
            close(rp->out_fd);
            return true;
        }
        t_sleep_ms(20);
    }
    return false;
}

/* SIGTERM and wait; returns the exit code (-1: killed, did not exit, or crashed). */
static int router_stop(router_proc_t *rp)
{
    if (!rp->pid) return -1;
    if (!rp->exited) kill(rp->pid, SIGTERM);
    if (!router_wait(rp, 60)) {
        kill(rp->pid, SIGKILL);
        waitpid(rp->pid, &rp->status, 0);
        rp->exited = true;
        close(rp->out_fd);
        return -1;
    }
    if (WIFSIGNALED(rp->status))
        fprintf(stderr, "speed-router died of signal %d\n", WTERMSIG(rp->status));
    return WIFEXITED(rp->status) ? WEXITSTATUS(rp->status) : -1;
}

/* ---- HTTP helpers ---------------------------------------------------------------------- */

typedef struct {
    int status;
    char *body;            /* speed_malloc'd, NUL-terminated */
    char retry_after[32];
    char request_id[96];
    char content_type[96];
} http_result_t;

static void http_result_free(http_result_t *r)
{
    speed_free(r->body);
    memset(r, 0, sizeof(*r));
}

static void copy_header(const speed_http_response_t *resp, const char *name, char *out, size_t cap)
{
    const char *v = speed_http_response_header(resp, name);
    snprintf(out, cap, "%s", v ? v : "");
}

/* One request on a new connection. `auth` (may be NULL) is the Authorization value,
 * `xid` (may be NULL) the X-Request-Id. */
static bool http_do(int port, const char *method, const char *path, const char *body,
                    const char *auth, const char *xid, http_result_t *out)
{
    memset(out, 0, sizeof(*out));
    speed_http_client_t *c = NULL;
    if (speed_http_client_connect("127.0.0.1", (uint16_t)port, 30000, &c) != SPEED_OK) return false;
    speed_http_header_t h[3];
    size_t nh = 0;
    if (body) h[nh++] = (speed_http_header_t){"Content-Type", "application/json"};
    if (auth) h[nh++] = (speed_http_header_t){"Authorization", auth};
    if (xid) h[nh++] = (speed_http_header_t){"X-Request-Id", xid};
    const speed_http_response_t *resp = NULL;
    speed_status_t st = speed_http_client_request(c, method, path, h, nh, body,
                                                  body ? strlen(body) : 0, &resp);
    if (st == SPEED_OK) {
        out->status = resp->status;
        out->body = speed_strndup(resp->body ? resp->body : "", resp->body_len);
        copy_header(resp, "Retry-After", out->retry_after, sizeof out->retry_after);
        copy_header(resp, "X-Request-Id", out->request_id, sizeof out->request_id);
        copy_header(resp, "Content-Type", out->content_type, sizeof out->content_type);
    }
    speed_http_client_destroy(c);
    return st == SPEED_OK;
}

static bool http_post(int port, const char *path, const char *body, http_result_t *out)
{
    return http_do(port, "POST", path, body, NULL, NULL, out);
}

/* An SSE stream read to its end: the data of every event, in order. */
#define SSE_MAX_EVENTS 256
typedef struct {
    int status;
    char request_id[96];
    char content_type[96];
    char *data[SSE_MAX_EVENTS];
    int n;
    bool ended;            /* the body ended cleanly */
} sse_result_t;

static void sse_result_free(sse_result_t *s)
{
    for (int i = 0; i < s->n; i++) speed_free(s->data[i]);
    memset(s, 0, sizeof(*s));
}

/* Starts a streaming POST; *c_p is the open client (read with sse_read). */
static bool sse_begin(int port, const char *path, const char *body, const char *xid,
                      speed_http_client_t **c_p, sse_result_t *out)
{
    memset(out, 0, sizeof(*out));
    *c_p = NULL;
    speed_http_client_t *c = NULL;
    if (speed_http_client_connect("127.0.0.1", (uint16_t)port, 30000, &c) != SPEED_OK) return false;
    speed_http_header_t h[2] = {{"Content-Type", "application/json"}, {"X-Request-Id", xid}};
    const speed_http_response_t *resp = NULL;
    if (speed_http_client_request_begin(c, "POST", path, h, xid ? 2 : 1, body, strlen(body),
                                        &resp) != SPEED_OK) {
        speed_http_client_destroy(c);
        return false;
    }
    out->status = resp->status;
    copy_header(resp, "X-Request-Id", out->request_id, sizeof out->request_id);
    copy_header(resp, "Content-Type", out->content_type, sizeof out->content_type);
    *c_p = c;
    return true;
}

/* Reads up to max_events more events (< 0: to the end). Returns false on a socket error. */
static bool sse_read(speed_http_client_t *c, sse_result_t *out, int max_events)
{
    for (int k = 0; max_events < 0 || k < max_events; k++) {
        const speed_http_sse_event_t *ev = NULL;
        if (speed_http_client_next_event(c, &ev) != SPEED_OK) return false;
        if (!ev) {
            out->ended = true;
            return true;
        }
        if (out->n < SSE_MAX_EVENTS) out->data[out->n++] = speed_strndup(ev->data, ev->data_len);
    }
    return true;
}

/* A whole streaming request. */
static bool sse_post(int port, const char *path, const char *body, const char *xid,
                     sse_result_t *out)
{
    speed_http_client_t *c = NULL;
    if (!sse_begin(port, path, body, xid, &c, out)) return false;
    bool ok = out->status != 200 || sse_read(c, out, -1);
    speed_http_client_destroy(c);
    return ok;
}

/* Waits until GET /health answers `status`. */
static bool wait_health(int port, int status, double timeout_s)
{
    double until = t_now() + timeout_s;
    while (t_now() < until) {
        int s = 0;
        if (speed_http_get("127.0.0.1", (uint16_t)port, "/health", 5000, &s, NULL) == SPEED_OK &&
            s == status)
            return true;
        t_sleep_ms(50);
    }
    return false;
}

/* ---- /metrics -------------------------------------------------------------------------- */

static bool prom_name_ok(const char *s, size_t n)
{
    if (n == 0) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        if (!(alpha || (i > 0 && c >= '0' && c <= '9'))) return false;
    }
    return true;
}

/* Checks the text exposition format 0.0.4 line by line: HELP/TYPE comments, samples
 * `name{label="value",...} number`, TYPE before the samples of its family, histogram
 * buckets cumulative and ending with +Inf equal to _count. Returns the number of bad lines
 * (printed). */
static int prom_check(const char *text)
{
    int bad = 0;
    char typed[128][128];
    int n_typed = 0;
    const char *line = text;
    double last_bucket = -1;
    char bucket_series[512] = "";
    while (*line) {
        const char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        char buf[1024];
        snprintf(buf, sizeof buf, "%.*s", (int)len, line);
        line = nl ? nl + 1 : line + len;
        if (!nl) {
            fprintf(stderr, "metrics: last line without newline: %s\n", buf);
            bad++;
        }
        if (buf[0] == '\0') continue;
        if (buf[0] == '#') {
            char kw[8], name[256], rest[256] = "";
            if (sscanf(buf, "# %7s %255s %255[^\n]", kw, name, rest) < 2 ||
                (strcmp(kw, "HELP") != 0 && strcmp(kw, "TYPE") != 0) ||
                !prom_name_ok(name, strlen(name))) {
                fprintf(stderr, "metrics: bad comment: %s\n", buf);
                bad++;
            } else if (strcmp(kw, "TYPE") == 0) {
                if (strcmp(rest, "counter") && strcmp(rest, "gauge") && strcmp(rest, "histogram") &&
                    strcmp(rest, "summary") && strcmp(rest, "untyped")) {
                    fprintf(stderr, "metrics: bad type: %s\n", buf);
                    bad++;
                }
                if (n_typed < 128) snprintf(typed[n_typed++], 128, "%s", name);
            }
            continue;
        }
        size_t nlen = strcspn(buf, "{ ");
        if (!prom_name_ok(buf, nlen)) {
            fprintf(stderr, "metrics: bad name: %s\n", buf);
            bad++;
            continue;
        }
        const char *p = buf + nlen;
        if (*p == '{') {
            p++;
            while (*p && *p != '}') {
                size_t ln = strcspn(p, "=");
                if (!prom_name_ok(p, ln) || p[ln] != '=' || p[ln + 1] != '"') break;
                p += ln + 2;
                while (*p && *p != '"') p += (*p == '\\' && p[1]) ? 2 : 1;
                if (*p != '"') break;
                p++;
                if (*p == ',') p++;
            }
            if (*p != '}') {
                fprintf(stderr, "metrics: bad labels: %s\n", buf);
                bad++;
                continue;
            }
            p++;
        }
        if (*p != ' ') {
            fprintf(stderr, "metrics: no value: %s\n", buf);
            bad++;
            continue;
        }
        p++;
        char *end = NULL;
        double v = strtod(p, &end);
        if (end == p || (*end && *end != ' ')) {
            fprintf(stderr, "metrics: bad value: %s\n", buf);
            bad++;
            continue;
        }
        /* The family must have been typed: strip histogram suffixes to find it. */
        char fam[256];
        snprintf(fam, sizeof fam, "%.*s", (int)nlen, buf);
        bool found = false;
        for (int pass = 0; pass < 2 && !found; pass++) {
            for (int i = 0; i < n_typed && !found; i++) found = strcmp(typed[i], fam) == 0;
            static const char *const sfx[] = {"_bucket", "_sum", "_count"};
            for (int k = 0; k < 3 && !found; k++) {
                size_t fl = strlen(fam), sl = strlen(sfx[k]);
                if (fl > sl && strcmp(fam + fl - sl, sfx[k]) == 0) fam[fl - sl] = '\0';
            }
        }
        if (!found) {
            fprintf(stderr, "metrics: sample before its TYPE: %s\n", buf);
            bad++;
        }
        /* Buckets are cumulative within a series. */
        if (strstr(buf, "_bucket{")) {
            char series[512];
            const char *le = strstr(buf, "le=\"");
            snprintf(series, sizeof series, "%.*s", (int)(le ? le - buf : 0), buf);
            if (strcmp(series, bucket_series) != 0) {
                snprintf(bucket_series, sizeof bucket_series, "%s", series);
                last_bucket = -1;
            }
            if (v < last_bucket) {
                fprintf(stderr, "metrics: bucket not cumulative: %s\n", buf);
                bad++;
            }
            last_bucket = v;
        }
    }
    return bad;
}

/* The value of one sample line `series` (exact name{labels}), or -1 when absent. */
static double prom_value(const char *text, const char *series)
{
    size_t n = strlen(series);
    const char *p = text;
    while ((p = strstr(p, series)) != NULL) {
        if ((p == text || p[-1] == '\n') && p[n] == ' ') return strtod(p + n + 1, NULL);
        p += n;
    }
    return -1;
}

static char *get_metrics(int port)
{
    int status = 0;
    char *body = NULL;
    if (speed_http_get("127.0.0.1", (uint16_t)port, "/metrics", 5000, &status, &body) != SPEED_OK ||
        status != 200) {
        speed_free(body);
        return NULL;
    }
    return body;
}

/* Waits until the sample `series` equals `want` (metrics that settle just after an answer,
 * e.g. the admission gauges). Returns the last value seen. */
static double wait_metric(int port, const char *series, double want, double timeout_s)
{
    double until = t_now() + timeout_s, v = -1;
    for (;;) {
        char *m = get_metrics(port);
        v = m ? prom_value(m, series) : -1;
        speed_free(m);
        if (v == want || t_now() >= until) return v;
        t_sleep_ms(20);
    }
}

/* ---- JSON ------------------------------------------------------------------------------- */

static json_t *json_of(const char *s)
{
    json_error_t e;
    return s ? json_loads(s, 0, &e) : NULL;
}

static const char *jstr(json_t *root, const char *path)
{
    /* dotted path with [i] indices, e.g. "choices[0].message.content" */
    json_t *cur = root;
    char key[128];
    const char *p = path;
    while (cur && *p) {
        size_t k = strcspn(p, ".[");
        if (k) {
            snprintf(key, sizeof key, "%.*s", (int)k, p);
            cur = json_object_get(cur, key);
            p += k;
        }
        if (*p == '[') {
            cur = json_array_get(cur, (size_t)atoi(p + 1));
            p = strchr(p, ']');
            if (!p) return NULL;
            p++;
        }
        if (*p == '.') p++;
    }
    return json_is_string(cur) ? json_string_value(cur) : NULL;
}

static json_t *jget(json_t *root, const char *path)
{
    json_t *cur = root;
    char key[128];
    const char *p = path;
    while (cur && *p) {
        size_t k = strcspn(p, ".[");
        if (k) {
            snprintf(key, sizeof key, "%.*s", (int)k, p);
            cur = json_object_get(cur, key);
            p += k;
        }
        if (*p == '[') {
            cur = json_array_get(cur, (size_t)atoi(p + 1));
            p = strchr(p, ']');
            if (!p) return NULL;
            p++;
        }
        if (*p == '.') p++;
    }
    return cur;
}

static long long jint(json_t *root, const char *path)
{
    json_t *v = jget(root, path);
    return json_is_integer(v) ? json_integer_value(v) : -12345;
}

#endif /* SPEED_TESTS_ROUTER_TEST_UTIL_H */
