/* Test scaffolding for the speed-router daemon tests: see router_test_util.h. */
#include "router_test_util.h"

#include <sys/wait.h>
#include <time.h>

#include "test_proc.h"
#include "tls_test_util.h"

/* ---- fake nodes ------------------------------------------------------------------------ */

/* One call a fake node answers from a thread of its own (it owns the call until it finishes
 * it). */
typedef struct {
    fake_node_t *node;
    speed_rpc_call_t *call;
    char id[128];
    int n_prompt;
    int n_resumed; /* a migrated stream: tokens 0..n_resumed-1 came from elsewhere */
    bool has_first;
    int32_t first_id;
    int top_logprobs;
    bool logprobs;
} fake_call_t;

/* The list `which` of node n and its length (both under n->lock). */
static char (*fake_ids(fake_node_t *n, fake_ids_t which, int **count_p))[128] {
    switch (which) {
    case FAKE_IDS_RESERVED: *count_p = &n->n_reserved_ids; return n->reserved_ids;
    case FAKE_IDS_GENERATED: *count_p = &n->n_generated_ids; return n->generated_ids;
    case FAKE_IDS_PREFILL: *count_p = &n->n_prefill_ids; return n->prefill_ids;
    case FAKE_IDS_STREAM_CANCELLED: *count_p = &n->n_stream_cancelled_ids; return n->stream_cancelled_ids;
    case FAKE_IDS_CANCELLED:
    default: *count_p = &n->n_cancelled_ids; return n->cancelled_ids;
    }
}

static void fake_add_id(fake_node_t *n, fake_ids_t which, const char *id) {
    pthread_mutex_lock(&n->lock);
    int *count = NULL;
    char(*ids)[128] = fake_ids(n, which, &count);
    if (*count < FAKE_MAX_IDS) snprintf(ids[(*count)++], 128, "%s", id);
    pthread_mutex_unlock(&n->lock);
}

bool fake_has_id(fake_node_t *n, fake_ids_t which, const char *id) {
    bool found = false;
    pthread_mutex_lock(&n->lock);
    int *count = NULL;
    char(*ids)[128] = fake_ids(n, which, &count);
    for (int i = 0; i < *count && !found; i++) found = strcmp(ids[i], id) == 0;
    pthread_mutex_unlock(&n->lock);
    return found;
}

bool fake_find_id(fake_node_t *n, fake_ids_t which, const char *prefix, char *out, size_t cap) {
    bool found = false;
    pthread_mutex_lock(&n->lock);
    int *count = NULL;
    char(*ids)[128] = fake_ids(n, which, &count);
    for (int i = 0; i < *count && !found; i++) {
        found = strncmp(ids[i], prefix, strlen(prefix)) == 0;
        if (found) snprintf(out, cap, "%s", ids[i]);
    }
    pthread_mutex_unlock(&n->lock);
    return found;
}

/* Whether a Cancel RPC for `id` ends the node's work on it (cancel_ignored turns that off). */
static bool fake_id_cancelled(fake_node_t *n, const char *id) {
    return !atomic_load(&n->cancel_ignored) && fake_has_id(n, FAKE_IDS_CANCELLED, id);
}

static void fake_reply(speed_rpc_call_t *call, const ProtobufCMessage *m) {
    uint8_t *buf = NULL;
    size_t len = 0;
    if (speed_proto_pack(m, &buf, &len) != SPEED_OK) {
        speed_rpc_call_finish(call, SPEED_RPC_INTERNAL, "pack");
        return;
    }
    speed_rpc_call_reply(call, buf, len);
    speed_free(buf);
}

static void health_answer(fake_node_t *n, speed_rpc_call_t *call) {
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

static void fake_spawn(fake_node_t *n, void *(*fn)(void *), fake_call_t *c);

/* health_slow: the answer comes FAKE_HEALTH_SLOW_MS late, from a thread of its own (the node
 * keeps answering other calls meanwhile, as a node whose reply was delayed on the way would). */
static void *fake_health_late_thread(void *arg) {
    fake_call_t *c = arg;
    sleep_ms(FAKE_HEALTH_SLOW_MS);
    health_answer(c->node, c->call);
    atomic_fetch_sub(&c->node->live_threads, 1);
    free(c);
    return NULL;
}

static void fake_on_health(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    fake_node_t *n = user;
    (void)req, (void)len;
    atomic_fetch_add(&n->n_health, 1);
    if (atomic_fetch_sub(&n->health_slow, 1) > 0) {
        fake_call_t *c = calloc(1, sizeof(*c));
        c->node = n;
        c->call = call;
        fake_spawn(n, fake_health_late_thread, c);
        return;
    }
    atomic_fetch_add(&n->health_slow, 1);
    health_answer(n, call);
}

static void fake_on_status(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    fake_node_t *n = user;
    (void)req, (void)len;
    atomic_fetch_add(&n->n_status, 1);
    Speed__V1__NodeStatus r = SPEED__V1__NODE_STATUS__INIT;
    r.running = atomic_load(&n->n_gen_active);
    r.state = atomic_load(&n->health_state) < 0 ? 0 : atomic_load(&n->health_state);
    fake_reply(call, &r.base);
}

static void fake_on_reserve(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_reserve, 1);
    Speed__V1__ReserveRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__reserve_request__descriptor, data, len, (ProtobufCMessage **)&q) != SPEED_OK) {
        speed_rpc_call_finish(call, SPEED_RPC_INVALID_ARGUMENT, "bad request");
        return;
    }
    atomic_store(&n->last_reserve_prefill_layers, q->speed ? q->speed->prefill_layers : -1);
    atomic_store(&n->last_reserve_resume, q->resume_tokens);
    pthread_mutex_lock(&n->lock);
    snprintf(n->last_id, sizeof n->last_id, "%s", q->request_id);
    pthread_mutex_unlock(&n->lock);
    int code = atomic_load(&n->reserve_code);
    if (code) {
        speed_rpc_call_finish(call, code, "fake reserve failure");
    } else {
        Speed__V1__KvDescriptor kv = SPEED__V1__KV_DESCRIPTOR__INIT;
        kv.total_bytes = 4096;
        kv.lease_ms = (uint32_t)atomic_load(&n->desc_lease_ms);
        kv.epoch = 7;
        kv.prefill_layers = q->speed && q->speed->prefill_layers ? q->speed->prefill_layers : 3;
        kv.anchors = 1;
        kv.tail = 1;
        Speed__V1__ReserveReply r = SPEED__V1__RESERVE_REPLY__INIT;
        r.kv = &kv;
        fake_add_id(n, FAKE_IDS_RESERVED, q->request_id); /* before the router can act on it */
        fake_reply(call, &r.base);
    }
    speed_proto_free(&q->base);
}

static void fake_on_cancel(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_cancel, 1);
    Speed__V1__CancelRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__cancel_request__descriptor, data, len, (ProtobufCMessage **)&q) == SPEED_OK) {
        fake_add_id(n, FAKE_IDS_CANCELLED, q->request_id);
        speed_proto_free(&q->base);
    }
    Speed__V1__CancelReply r = SPEED__V1__CANCEL_REPLY__INIT;
    r.found = true;
    fake_reply(call, &r.base);
}

static void *fake_prefill_thread(void *arg) {
    fake_call_t *c = arg;
    fake_node_t *n = c->node;
    int delay = atomic_load(&n->prefill_delay_ms);
    bool cancelled = false;
    if (atomic_load(&n->prefill_gate)) {
        atomic_fetch_add(&n->n_prefill_gated, 1);
        while (atomic_load(&n->prefill_gate) && !cancelled) {
            sleep_ms(2);
            cancelled = fake_id_cancelled(n, c->id) || speed_rpc_call_is_cancelled(c->call);
        }
        atomic_fetch_sub(&n->n_prefill_gated, 1);
    }
    for (int waited = 0; waited < delay && !cancelled; waited += 5) {
        sleep_ms(5);
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

static void fake_spawn(fake_node_t *n, void *(*fn)(void *), fake_call_t *c) {
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

static void fake_on_prefill(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_prefill, 1);
    Speed__V1__PrefillRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__prefill_request__descriptor, data, len, (ProtobufCMessage **)&q) != SPEED_OK ||
        !q->kv) {
        if (q) speed_proto_free(&q->base);
        speed_rpc_call_finish(call, SPEED_RPC_INVALID_ARGUMENT, "bad request");
        return;
    }
    fake_call_t *c = calloc(1, sizeof(*c));
    c->node = n;
    c->call = call;
    snprintf(c->id, sizeof c->id, "%s", q->request_id);
    fake_add_id(n, FAKE_IDS_PREFILL, q->request_id);
    atomic_store(&n->last_prefill_n_ids, (int)q->n_prompt_ids);
    atomic_store(&n->last_prefill_resume, (int)q->resume_tokens);
    atomic_store(&n->last_prefill_lease_ms, (int)q->kv->lease_ms);
    speed_proto_free(&q->base);
    fake_spawn(n, fake_prefill_thread, c);
}

/* Token i of a generation: id 'a' + i % 26, text "t<i> " (empty for 1 <= i <= gen_textless). */
static void *fake_generate_thread(void *arg) {
    fake_call_t *c = arg;
    fake_node_t *n = c->node;
    int n_tokens = atomic_load(&n->gen_tokens);
    int delay = atomic_load(&n->gen_delay_ms);
    int brk = atomic_load(&n->gen_break_after);
    int stall = atomic_load(&n->gen_stall_after);
    int textless = atomic_load(&n->gen_textless);
    atomic_fetch_add(&n->n_gen_active, 1);
    bool cancelled = false;
    int sent = c->n_resumed < n_tokens ? c->n_resumed : n_tokens; /* token index */
    int start = sent;
    while (sent < n_tokens && !cancelled) {
        for (int waited = 0; waited < delay && !cancelled; waited += 5) {
            sleep_ms(5);
            cancelled = speed_rpc_call_is_cancelled(c->call) || fake_id_cancelled(n, c->id);
        }
        if (cancelled) break;
        if (brk >= 0 && sent - start >= brk) break;
        for (int waited = 0; sent - start == stall && waited < FAKE_STALL_MS && !cancelled; waited += 5) {
            sleep_ms(5);
            cancelled = speed_rpc_call_is_cancelled(c->call) || fake_id_cancelled(n, c->id);
        }
        if (cancelled) break;
        char text[32];
        snprintf(text, sizeof text, "t%d ", sent);
        Speed__V1__Token tok = SPEED__V1__TOKEN__INIT;
        Speed__V1__TopLogprob tops[2], *topp[2];
        tok.id = (sent == start && c->has_first) ? c->first_id : 'a' + sent % 26;
        tok.text = text;
        if (sent == start && c->has_first) snprintf(text, sizeof text, "F");
        if (sent >= 1 && sent <= textless) text[0] = '\0';
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
        fake_add_id(n, FAKE_IDS_STREAM_CANCELLED, c->id);
        atomic_fetch_add(&n->n_gen_cancelled, 1);
        speed_rpc_call_finish(c->call, SPEED_RPC_CANCELLED, "cancelled");
    } else if (brk >= 0 && sent - start >= brk && sent < n_tokens) {
        speed_rpc_call_finish(c->call, SPEED_RPC_UNAVAILABLE, "fake node broke the stream");
    } else {
        fake_add_id(n, FAKE_IDS_GENERATED, c->id); /* before the router sees the end */
        speed_rpc_call_finish(c->call, SPEED_RPC_OK, NULL);
    }
    atomic_fetch_sub(&n->n_gen_active, 1);
    free(c);
    atomic_fetch_sub(&n->live_threads, 1);
    return NULL;
}

static void fake_on_generate(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    fake_node_t *n = user;
    atomic_fetch_add(&n->n_generate, 1);
    Speed__V1__GenerateRequest *q = NULL;
    if (speed_proto_unpack(&speed__v1__generate_request__descriptor, data, len, (ProtobufCMessage **)&q) != SPEED_OK) {
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
    c->n_resumed = (int)q->n_resumed_ids;
    atomic_store(&n->last_generate_resumed, (int)q->n_resumed_ids);
    atomic_store(&n->last_generate_ignore_eos, q->sampling ? (int)q->sampling->ignore_eos : -1);
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

void fake_clear_ids(fake_node_t *n) {
    pthread_mutex_lock(&n->lock);
    n->n_cancelled_ids = n->n_reserved_ids = n->n_generated_ids = n->n_prefill_ids = n->n_stream_cancelled_ids = 0;
    pthread_mutex_unlock(&n->lock);
}

void fake_defaults(fake_node_t *n) {
    atomic_store(&n->health_state, SPEED__V1__NODE_STATE__NODE_STATE_SERVING);
    atomic_store(&n->health_slow, 0);
    atomic_store(&n->gen_tokens, 5);
    atomic_store(&n->gen_delay_ms, 0);
    atomic_store(&n->gen_break_after, -1);
    atomic_store(&n->gen_stall_after, -1);
    atomic_store(&n->gen_textless, 0);
    atomic_store(&n->reserve_code, 0);
    atomic_store(&n->prefill_code, 0);
    atomic_store(&n->prefill_delay_ms, 0);
    atomic_store(&n->desc_lease_ms, 0);
    atomic_store(&n->prefill_gate, false);
    atomic_store(&n->cancel_ignored, false);
}

/* The test's certificates (tls_test_util.h) under its scratch directory, made on first use. */
static const char *fake_certs_dir(void) {
    static char dir[1024];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s", tu_path("certs"));
        tt_certs_write(dir);
    }
    return dir;
}

/* The fake nodes' server credentials: a node certificate of the test's CA (the router checks
 * that the CA signed it and that it names 127.0.0.1, not which node it is). */
static const speed_rpc_tls_t *fake_tls(void) {
    static speed_tls_creds_t creds;
    static speed_rpc_tls_t tls;
    if (!creds.cert) {
        tt_creds_load(fake_certs_dir(), "decode-0", &creds);
        tls = tt_rpc_tls(&creds);
    }
    return &tls;
}

speed_status_t fake_start(fake_node_t *n, const char *name, int port) {
    memset(n, 0, sizeof(*n));
    pthread_mutex_init(&n->lock, NULL);
    snprintf(n->name, sizeof n->name, "%s", name);
    fake_defaults(n);
    n->port = port;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    speed_rpc_server_params_t p = speed_rpc_server_default_params();
    p.address = addr;
    p.tls = fake_tls();
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

void fake_kill(fake_node_t *n) {
    if (!n->server) return;
    speed_rpc_server_destroy(n->server);
    n->server = NULL;
    for (int i = 0; i < 500 && atomic_load(&n->live_threads) > 0; i++) sleep_ms(10);
}

void fake_stop(fake_node_t *n) {
    fake_kill(n);
    pthread_mutex_destroy(&n->lock);
}

/* The first reserved id on n that neither completed a Generate nor got a Cancel, into out;
 * false when there is none. */
static bool fake_unbalanced_id(fake_node_t *n, unsigned flags, char *out, size_t cap) {
    pthread_mutex_lock(&n->lock);
    int n_reserved = n->n_reserved_ids;
    pthread_mutex_unlock(&n->lock);
    for (int i = 0; i < n_reserved; i++) {
        char id[128];
        pthread_mutex_lock(&n->lock);
        snprintf(id, sizeof id, "%s", n->reserved_ids[i]);
        pthread_mutex_unlock(&n->lock);
        bool released = fake_has_id(n, FAKE_IDS_GENERATED, id) || fake_has_id(n, FAKE_IDS_CANCELLED, id) ||
                        ((flags & FAKE_BALANCE_STREAM_END) && fake_has_id(n, FAKE_IDS_STREAM_CANCELLED, id));
        if (!released) {
            snprintf(out, cap, "%s", id);
            return true;
        }
    }
    return false;
}

/* Everything fake_check_balanced asks, once; *why gets the first imbalance. */
static bool fake_balanced_now(fake_node_t *dec, int nd, fake_node_t *pre, int np, int router_port, unsigned flags,
                              char *why, size_t cap) {
    char id[128];
    for (int i = 0; i < nd; i++) {
        if (!dec[i].server) continue;
        if (fake_unbalanced_id(&dec[i], flags, id, sizeof id)) {
            snprintf(why, cap, "%s reserved \"%s\": no completed Generate and no Cancel for it", dec[i].name, id);
            return false;
        }
        if (atomic_load(&dec[i].n_gen_active) != 0) {
            snprintf(why, cap, "%s still runs %d generation(s)", dec[i].name, atomic_load(&dec[i].n_gen_active));
            return false;
        }
    }
    for (int i = 0; i < np; i++) {
        if (!pre[i].server) continue;
        if (atomic_load(&pre[i].n_prefill_gated) != 0 || atomic_load(&pre[i].n_gen_active) != 0) {
            snprintf(why, cap, "%s still has a prefill at its gate or a generation", pre[i].name);
            return false;
        }
    }
    if (router_port > 0) {
        double running = cu_metric(router_port, "speed_router_requests_running");
        if (running != 0) {
            snprintf(why, cap, "speed_router_requests_running is %g", running);
            return false;
        }
    }
    return true;
}

bool fake_check_balanced(const char *what, fake_node_t *dec, int nd, fake_node_t *pre, int np, int router_port,
                         unsigned flags, double timeout_s) {
    char why[320] = "";
    bool ok = false;
    WAIT_FOR((ok = fake_balanced_now(dec, nd, pre, np, router_port, flags, why, sizeof why)), timeout_s * 1000);
    CHECK_MSG(ok, "%s: not balanced after %.0f s: %s", what, timeout_s, why);
    return ok;
}

bool fake_start_pool(fake_node_t *nodes, int n, const char *role, int *base_p) {
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

bool make_model_dir(const char *dir) {
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

/* ---- the router process --------------------------------------------------------------- */

bool write_cluster(const char *path, const char *model, int np, int pbase, int nd, int dbase) {
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
            "decode:\n  replicas: %d\n  grpc_port: %d\n  http_port: %d\n"
            "tls:\n  ca: %s/ca.crt\n  cert: %s/router.crt\n  key: %s/router.key\n",
            model, np, pbase, 1000 + (pbase % 500) * 2, nd, dbase, 3000 + (dbase % 500) * 2, fake_certs_dir(),
            fake_certs_dir(), fake_certs_dir());
    fclose(f);
    return true;
}

bool router_start(router_proc_t *rp, const char *cluster, const char *const *extra) {
    memset(rp, 0, sizeof(*rp));
    rp->out_fd = -1;
    const char *bin = getenv("SPEED_ROUTER");
    if (!bin || !bin[0]) {
        fprintf(stderr, "SPEED_ROUTER is not set\n");
        return false;
    }
    const char *argv[64];
    int argc = 0;
    argv[argc++] = bin;
    argv[argc++] = "--config";
    argv[argc++] = cluster;
    for (int i = 0; extra && extra[i] && argc < 62; i++) argv[argc++] = extra[i];
    argv[argc] = NULL;
    tu_spawn_params_t sp = {.stdout_fd_p = &rp->out_fd};
    rp->pid = tu_spawn(argv, &sp);
    if (rp->pid < 0) {
        rp->pid = 0;
        return false;
    }
    /* "speed-router: listening on 127.0.0.1:PORT" */
    char line[256];
    size_t n = 0;
    tu_read_until(rp->out_fd, line, sizeof line, &n, "\n", now_s() + 30);
    char *nl = strchr(line, '\n');
    if (nl) *nl = '\0';
    const char *colon = strrchr(line, ':');
    if (!strstr(line, "listening on") || !colon) {
        fprintf(stderr, "router did not start (stdout: \"%s\")\n", line);
        kill(rp->pid, SIGKILL);
        waitpid(rp->pid, &rp->status, 0);
        rp->exited = true;
        close(rp->out_fd);
        return false;
    }
    rp->port = atoi(colon + 1);
    return true;
}

bool router_wait(router_proc_t *rp, double timeout_s) {
    if (rp->exited) return true;
    if (!tu_wait_pid(rp->pid, timeout_s, &rp->status)) return false;
    rp->exited = true;
    close(rp->out_fd);
    return true;
}

int router_stop(router_proc_t *rp) {
    if (!rp->pid) return -1;
    if (!rp->exited) kill(rp->pid, SIGTERM);
    if (!router_wait(rp, 60)) {
        kill(rp->pid, SIGKILL);
        waitpid(rp->pid, &rp->status, 0);
        rp->exited = true;
        close(rp->out_fd);
        return -1;
    }
    if (WIFSIGNALED(rp->status)) fprintf(stderr, "speed-router died of signal %d\n", WTERMSIG(rp->status));
    return WIFEXITED(rp->status) ? WEXITSTATUS(rp->status) : -1;
}

/* ---- SSE through speed_http's event parser ---------------------------------------------- */

static void sse_header(const speed_http_response_t *resp, const char *name, char *out, size_t cap) {
    const char *v = speed_http_response_header(resp, name);
    snprintf(out, cap, "%s", v ? v : "");
}

void sse_result_free(sse_result_t *s) {
    for (int i = 0; i < s->n; i++) speed_free(s->data[i]);
    memset(s, 0, sizeof(*s));
}

bool sse_begin(int port, const char *path, const char *body, const char *xid, speed_http_client_t **c_p,
               sse_result_t *out) {
    memset(out, 0, sizeof(*out));
    *c_p = NULL;
    speed_http_client_t *c = NULL;
    if (speed_http_client_connect("127.0.0.1", (uint16_t)port, 30000, &c) != SPEED_OK) return false;
    speed_http_header_t h[2] = {{"Content-Type", "application/json"}, {"X-Request-Id", xid}};
    const speed_http_response_t *resp = NULL;
    if (speed_http_client_request_begin(c, "POST", path, h, xid ? 2 : 1, body, strlen(body), &resp) != SPEED_OK) {
        speed_http_client_destroy(c);
        return false;
    }
    out->status = resp->status;
    sse_header(resp, "X-Request-Id", out->request_id, sizeof out->request_id);
    sse_header(resp, "Content-Type", out->content_type, sizeof out->content_type);
    *c_p = c;
    return true;
}

bool sse_read(speed_http_client_t *c, sse_result_t *out, int max_events) {
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

bool sse_post(int port, const char *path, const char *body, const char *xid, sse_result_t *out) {
    speed_http_client_t *c = NULL;
    if (!sse_begin(port, path, body, xid, &c, out)) return false;
    bool ok = out->status != 200 || sse_read(c, out, -1);
    speed_http_client_destroy(c);
    return ok;
}

/* ---- JSON ------------------------------------------------------------------------------- */

json_t *json_of(const char *s) {
    json_error_t e;
    return s ? json_loads(s, 0, &e) : NULL;
}

json_t *jget(json_t *root, const char *path) {
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

const char *jstr(json_t *root, const char *path) {
    json_t *v = jget(root, path);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

long long jint(json_t *root, const char *path) {
    json_t *v = jget(root, path);
    return json_is_integer(v) ? json_integer_value(v) : -12345;
}
