/* speed_router_nodes: pools, channels and the status poller (see nodes.h). */
#include "nodes.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "cluster_config.h"
#include "discovery.h"
#include "log.h"
#include "speed_proto.h"

typedef struct {
    char address[300];
    speed_rpc_channel_t *channel;
    speed_gauge_t *up_gauge;     /* speed_router_node_up{pool,node} */
    speed_counter_t *down_count; /* speed_router_node_down_total{pool,node} */
    int timeouts;                /* health checks in a row that timed out (poller thread only) */
    _Atomic bool retired;        /* left the discovery set (written by the poller thread only) */
} node_t;

/* A pool's discovery: the name, its last good resolution (handed from the discovery thread to
 * the poller under `lock`) and its counters. */
typedef struct {
    char name[256]; /* "" = static pool */
    int64_t port;
    char (*found)[SPEED_ROUTER_ADDRESS_MAX]; /* [max_nodes + 1]: the last good set */
    size_t n_found;
    bool fresh;        /* found holds a set the poller has not applied */
    bool failing;      /* the last resolution failed (log the transitions only) */
    bool refused_seen; /* the cap was hit (warned once per set that hits it) */
    /* an address waits for a retired slot that requests still hold: the last set is applied
     * again at every round until it has one (poller thread only) */
    bool waiting;
    char (*last)[SPEED_ROUTER_ADDRESS_MAX]; /* [max_nodes + 1]: the set last applied (poller only) */
    size_t n_last;
    speed_counter_t *m_added, *m_removed, *m_failures, *m_refused;
    speed_gauge_t *m_waiting; /* addresses waiting for a held retired slot now */
} disc_t;

struct speed_router_nodes {
    speed_balance_pool_t *pools[SPEED_ROUTER_POOL_COUNT];
    node_t *nodes[SPEED_ROUTER_POOL_COUNT];          /* [cap[p]]: slots never move */
    _Atomic size_t n_nodes[SPEED_ROUTER_POOL_COUNT]; /* published after the slot is complete */
    size_t cap[SPEED_ROUTER_POOL_COUNT];
    disc_t disc[SPEED_ROUTER_POOL_COUNT];
    int64_t interval_ms;
    int64_t rpc_timeout_ms;
    int64_t disc_interval_ms;
    const speed_rpc_tls_t *tls;
    speed_gauge_t *up_family;
    speed_counter_t *down_family;
    speed_kv_index_t *kv; /* decode pool's prefix index (NULL = none) */
    bool kv_events;       /* ask the decode nodes for cache events (router.kv_routing on) */

    pthread_t thread, disc_thread;
    bool thread_started, disc_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;      /* CLOCK_MONOTONIC: wakes the poller (stop, a fresh set) */
    pthread_cond_t disc_cond; /* CLOCK_MONOTONIC: wakes the discovery thread to stop */
    bool stop;
    bool kick; /* a fresh discovery set waits: poll now */
    _Atomic uint64_t polls;
};

const char *speed_router_pool_name(speed_router_pool_id_t pool) {
    switch (pool) {
    case SPEED_ROUTER_POOL_PREFILL: return "prefill";
    case SPEED_ROUTER_POOL_DECODE: return "decode";
    default: return "unknown";
    }
}

static void update_gauge(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i) {
    speed_node_state_t state = SPEED_NODE_DOWN;
    speed_balance_pool_state(n->pools[p], i, &state);
    if (n->nodes[p][i].up_gauge) speed_gauge_set(n->nodes[p][i].up_gauge, state == SPEED_NODE_UP);
}

static size_t n_nodes_of(const speed_router_nodes_t *n, int p) {
    return atomic_load_explicit(&((speed_router_nodes_t *)n)->n_nodes[p], memory_order_acquire);
}

/* Fills slot n_nodes[p] (channel, gauges), then adds it to the balance pool: UP for a static
 * node, DOWN for a discovered one (routed to after its first SERVING health check). Only
 * create and the poller thread add nodes, so the slot index is the pool index. */
static speed_status_t node_add(speed_router_nodes_t *n, speed_router_pool_id_t p, const char *address,
                               bool discovered) {
    size_t i = n_nodes_of(n, p);
    if (i >= n->cap[p]) return SPEED_ERR_CAPACITY;
    node_t *node = &n->nodes[p][i];
    memset(node, 0, sizeof *node);
    atomic_init(&node->retired, false);
    snprintf(node->address, sizeof node->address, "%s", address);
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.tls = n->tls;
    /* A discovered node is dialled at its pod address, which no certificate can list ahead of
     * time: its certificate must name the pool's discovery name instead. */
    if (discovered && n->tls) cp.tls_server_name = n->disc[p].name;
    speed_status_t st = speed_rpc_channel_create(node->address, &cp, &node->channel);
    if (st == SPEED_OK && n->up_family) {
        const char *values[] = {speed_router_pool_name(p), node->address};
        st = speed_gauge_labels(n->up_family, values, &node->up_gauge);
        if (st == SPEED_OK) st = speed_counter_labels(n->down_family, values, &node->down_count);
    }
    size_t index = 0;
    if (st == SPEED_OK) {
        /* published first: a request may hold the index as soon as the pool has it */
        atomic_store_explicit(&n->n_nodes[p], i + 1, memory_order_release);
        st = discovered ? speed_balance_pool_add_down(n->pools[p], node->address, &index)
                        : speed_balance_pool_add(n->pools[p], node->address, &index);
        if (st != SPEED_OK) atomic_store_explicit(&n->n_nodes[p], i, memory_order_release);
    }
    if (st != SPEED_OK) {
        speed_rpc_channel_destroy(node->channel);
        node->channel = NULL;
        return st;
    }
    SPEED_ASSERT(index == i);
    update_gauge(n, p, i);
    if (p == SPEED_ROUTER_POOL_DECODE && n->kv) {
        speed_kv_index_forget(n->kv, i); /* nothing known of it yet */
        if (speed_kv_index_name_node(n->kv, i, node->address) != SPEED_OK)
            SPEED_WARN(SPEED_SUBSYS_NET, "decode node %s: no prefix-index gauge (out of memory)", node->address);
    }
    return SPEED_OK;
}

/* Slot i (retired, its address's last holder gone: speed_balance_pool_replace said so) becomes
 * the node at `address`. Poller thread. Why nobody can read the slot meanwhile: the pool entry
 * is DOWN and unheld, and only this thread makes an entry UP again (a health check, after this
 * returns); picks and takes see only UP entries, under the pool mutex that also orders these
 * writes before any later pick's reads. The new channel is made first: when that fails the slot
 * stays the retired old node. Returns SPEED_OK, SPEED_ERR_CAPACITY (held or not retired:
 * nothing changed) or a channel error. */
static speed_status_t node_reuse(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i, const char *address) {
    node_t *node = &n->nodes[p][i];
    /* (a holder seen here is only a shortcut past making a channel for nothing: replace decides) */
    if (!atomic_load(&node->retired) || speed_balance_pool_holders(n->pools[p], i) > 0) return SPEED_ERR_CAPACITY;
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.tls = n->tls;
    if (n->tls) cp.tls_server_name = n->disc[p].name; /* only discovered slots are reused */
    speed_rpc_channel_t *channel = NULL;
    SPEED_CHECK(speed_rpc_channel_create(address, &cp, &channel));
    speed_status_t st = speed_balance_pool_replace(n->pools[p], i, address);
    if (st != SPEED_OK) {
        speed_rpc_channel_destroy(channel);
        return st;
    }
    /* nobody holds i from here: no RPC of a request or a Cancel is on the old channel */
    speed_rpc_channel_destroy(node->channel);
    node->channel = channel;
    /* the old address's series go: with pod churn they would otherwise grow without bound */
    if (node->up_gauge) speed_gauge_remove(node->up_gauge);
    if (node->down_count) speed_counter_remove(node->down_count);
    node->up_gauge = NULL;
    node->down_count = NULL;
    snprintf(node->address, sizeof node->address, "%s", address);
    node->timeouts = 0;
    if (n->up_family) {
        const char *values[] = {speed_router_pool_name(p), node->address};
        if (speed_gauge_labels(n->up_family, values, &node->up_gauge) != SPEED_OK ||
            speed_counter_labels(n->down_family, values, &node->down_count) != SPEED_OK)
            SPEED_WARN(SPEED_SUBSYS_NET, "%s pool: node %s: no per-node metrics (out of memory)",
                       speed_router_pool_name(p), node->address);
    }
    if (p == SPEED_ROUTER_POOL_DECODE && n->kv) {
        speed_kv_index_forget(n->kv, i); /* the old node's blocks are not the new one's */
        if (speed_kv_index_name_node(n->kv, i, node->address) != SPEED_OK)
            SPEED_WARN(SPEED_SUBSYS_NET, "decode node %s: no prefix-index gauge (out of memory)", node->address);
    }
    atomic_store(&node->retired, false);
    update_gauge(n, p, i);
    return SPEED_OK;
}

static speed_status_t register_discovery_metrics(speed_router_nodes_t *n, speed_metrics_t *m) {
    static const char *const labels[] = {"pool"};
    speed_counter_t *added, *removed, *failures, *refused;
    speed_gauge_t *waiting;
    SPEED_CHECK(speed_counter_register(m, "speed_router_discovery_nodes_added_total",
                                       "nodes the router added to a pool because its discovery name listed them",
                                       labels, 1, &added));
    SPEED_CHECK(speed_counter_register(m, "speed_router_discovery_nodes_removed_total",
                                       "nodes the router retired because they left their pool's discovery name", labels,
                                       1, &removed));
    SPEED_CHECK(speed_counter_register(m, "speed_router_discovery_failures_total",
                                       "resolutions of a pool's discovery name that failed or found no address "
                                       "(the pool kept its last set)",
                                       labels, 1, &failures));
    SPEED_CHECK(speed_counter_register(m, "speed_router_discovery_refused_total",
                                       "addresses a discovered pool refused: it holds discovery_max_nodes already",
                                       labels, 1, &refused));
    SPEED_CHECK(speed_gauge_register(m, "speed_router_discovery_waiting",
                                     "addresses a discovered pool listed that wait for a retired node's last request "
                                     "to end (every slot is taken)",
                                     labels, 1, &waiting));
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++) {
        if (!n->disc[p].name[0]) continue;
        const char *values[] = {speed_router_pool_name(p)};
        SPEED_CHECK(speed_counter_labels(added, values, &n->disc[p].m_added));
        SPEED_CHECK(speed_counter_labels(removed, values, &n->disc[p].m_removed));
        SPEED_CHECK(speed_counter_labels(failures, values, &n->disc[p].m_failures));
        SPEED_CHECK(speed_counter_labels(refused, values, &n->disc[p].m_refused));
        SPEED_CHECK(speed_gauge_labels(waiting, values, &n->disc[p].m_waiting));
    }
    return SPEED_OK;
}

speed_status_t speed_router_nodes_create(const speed_router_nodes_params_t *params, speed_router_nodes_t **nodes_p) {
    if (!params || !nodes_p || !params->host || params->status_interval_ms < 10 ||
        params->n_nodes[SPEED_ROUTER_POOL_PREFILL] < 0 || params->n_nodes[SPEED_ROUTER_POOL_DECODE] < 0)
        return SPEED_ERR_INVALID_ARGUMENT;
    bool any_discovery = false;
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++) {
        const char *d = params->discovery[p];
        if (!d || !d[0]) continue;
        if (strncmp(d, "dns:", 4) != 0 || !d[4] || strlen(d + 4) >= 254 || params->discovery_max_nodes < 1 ||
            params->discovery_max_nodes > 256 || params->discovery_interval_ms < 10)
            return SPEED_ERR_INVALID_ARGUMENT;
        any_discovery = true;
    }
    bool decode_discovery =
        params->discovery[SPEED_ROUTER_POOL_DECODE] && params->discovery[SPEED_ROUTER_POOL_DECODE][0];
    if (params->n_nodes[SPEED_ROUTER_POOL_DECODE] < 1 && !decode_discovery) return SPEED_ERR_INVALID_ARGUMENT;

    speed_router_nodes_t *n = speed_calloc(1, sizeof(*n));
    if (!n) return SPEED_ERR_NO_MEMORY;
    pthread_mutex_init(&n->lock, NULL);
    speed_clock_cond_init(&n->cond);
    speed_clock_cond_init(&n->disc_cond);
    n->interval_ms = params->status_interval_ms;
    n->disc_interval_ms = any_discovery ? params->discovery_interval_ms : 0;
    n->tls = params->tls;
    /* A poll must not outlast its period by much, and a node on a loaded host still gets
     * a fair chance to answer. */
    n->rpc_timeout_ms = n->interval_ms < 200 ? 200 : n->interval_ms > 2000 ? 2000 : n->interval_ms;

    speed_status_t st = SPEED_OK;
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++) {
        const char *d = params->discovery[p];
        if (d && d[0]) {
            snprintf(n->disc[p].name, sizeof n->disc[p].name, "%s", d + 4);
            n->disc[p].port = params->grpc_port[p];
        }
    }
    if (params->metrics) {
        static const char *const labels[] = {"pool", "node"};
        st = speed_gauge_register(params->metrics, "speed_router_node_up",
                                  "1 while the router sends requests to the node", labels, 2, &n->up_family);
        if (st == SPEED_OK)
            st = speed_counter_register(params->metrics, "speed_router_node_down_total",
                                        "times the router stopped sending requests to the node", labels, 2,
                                        &n->down_family);
        if (st == SPEED_OK && any_discovery) st = register_discovery_metrics(n, params->metrics);
    }
    if (st == SPEED_OK && params->kv_index) {
        bool d_disc = n->disc[SPEED_ROUTER_POOL_DECODE].name[0] != '\0';
        speed_kv_index_params_t kp = *params->kv_index;
        kp.n_nodes_max =
            d_disc ? (size_t)params->discovery_max_nodes : (size_t)params->n_nodes[SPEED_ROUTER_POOL_DECODE];
        kp.metrics = params->metrics;
        st = speed_kv_index_create(&kp, &n->kv);
        n->kv_events = params->kv_events;
    }
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT && st == SPEED_OK; p++) {
        bool discovered = n->disc[p].name[0] != '\0';
        size_t count = discovered ? 0 : (size_t)params->n_nodes[p];
        n->cap[p] = discovered ? (size_t)params->discovery_max_nodes : count;
        speed_balance_pool_params_t bp = speed_balance_pool_default_params();
        bp.policy = params->policy[p];
        if (count > bp.n_nodes_max) {
            st = SPEED_ERR_INVALID_ARGUMENT;
            break;
        }
        if (n->cap[p] > 0) bp.n_nodes_max = n->cap[p];
        st = speed_balance_pool_create(speed_router_pool_name(p), &bp, &n->pools[p]);
        if (st != SPEED_OK) break;
        if (n->cap[p]) {
            n->nodes[p] = speed_calloc(n->cap[p], sizeof(node_t));
            if (!n->nodes[p]) {
                st = SPEED_ERR_NO_MEMORY;
                break;
            }
        }
        if (discovered) {
            n->disc[p].found = speed_calloc(n->cap[p] + 1, sizeof *n->disc[p].found);
            n->disc[p].last = speed_calloc(n->cap[p] + 1, sizeof *n->disc[p].last);
            if (!n->disc[p].found || !n->disc[p].last) {
                st = SPEED_ERR_NO_MEMORY;
                break;
            }
        }
        for (size_t i = 0; i < count && st == SPEED_OK; i++) {
            char host[256], address[300];
            if (!speed_cluster_list_item(params->hosts[p], (int64_t)i, host, sizeof host))
                snprintf(host, sizeof host, "%s", params->host);
            snprintf(address, sizeof address, "%s:%lld", host, (long long)(params->grpc_port[p] + (int64_t)i));
            st = node_add(n, p, address, false);
        }
    }
    if (st != SPEED_OK) {
        speed_router_nodes_destroy(n);
        return st;
    }
    *nodes_p = n;
    return SPEED_OK;
}

/* One Status call: the load snapshot, and with kv the cache events after the index's cursor.
 * Returns true when more events wait (poll again). */
static bool poll_status(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i, speed_kv_index_t *kv) {
    Speed__V1__NodeStatusRequest sreq = SPEED__V1__NODE_STATUS_REQUEST__INIT;
    Speed__V1__CacheCursor cursor;
    if (kv) {
        speed_kv_index_cursor(kv, i, &cursor);
        sreq.cache = &cursor;
    }
    uint8_t *buf = NULL;
    size_t len = 0;
    if (speed_proto_pack(&sreq.base, &buf, &len) != SPEED_OK) return false;
    bool more = false;
    speed_rpc_reply_t sr = {0};
    speed_balance_pool_poll_begin(n->pools[p], i); /* ends counted from now on outlive the reply */
    if (speed_rpc_unary(n->nodes[p][i].channel, SPEED_METHOD_NODE_STATUS, buf, len, n->rpc_timeout_ms, &sr) ==
        SPEED_OK) {
        Speed__V1__NodeStatus *s = NULL;
        if (speed_proto_unpack(&speed__v1__node_status__descriptor, sr.data, sr.len, (ProtobufCMessage **)&s) ==
            SPEED_OK) {
            speed_node_load_t load = {s->running, s->waiting, s->kv_usage_ratio, s->active_blocks};
            speed_balance_pool_set_load(n->pools[p], i, &load);
            if (kv) more = speed_kv_index_apply(kv, i, s->cache);
            speed_proto_free(&s->base);
        }
    }
    speed_rpc_reply_cleanup(&sr);
    speed_free(buf);
    return more;
}

/* One Health (+ Status) round trip to one node; updates the pool and the gauge. */
static void poll_node(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i) {
    node_t *node = &n->nodes[p][i];
    speed_balance_pool_t *pool = n->pools[p];
    Speed__V1__HealthRequest hreq = SPEED__V1__HEALTH_REQUEST__INIT;
    uint8_t *buf = NULL;
    size_t len = 0;
    if (speed_proto_pack(&hreq.base, &buf, &len) != SPEED_OK) return; /* next round */
    speed_rpc_reply_t reply = {0};
    speed_status_t st = speed_rpc_unary(node->channel, SPEED_METHOD_NODE_HEALTH, buf, len, n->rpc_timeout_ms, &reply);
    speed_free(buf);
    int state = -1;
    if (st == SPEED_OK) {
        Speed__V1__HealthReply *h = NULL;
        if (speed_proto_unpack(&speed__v1__health_reply__descriptor, reply.data, reply.len, (ProtobufCMessage **)&h) ==
            SPEED_OK) {
            state = h->state;
            speed_proto_free(&h->base);
        }
    } else if (st == SPEED_ERR_NO_MEMORY) {
        speed_rpc_reply_cleanup(&reply);
        return; /* ours, not the node's */
    }
    speed_rpc_reply_cleanup(&reply);

    speed_node_state_t was = SPEED_NODE_DOWN;
    speed_balance_pool_state(pool, i, &was);
    /* A node that answered nothing within the timeout is taken out only at the second such
     * check in a row: one late answer (a loaded host, a long pause of the node) is not a dead
     * node, and taking it out reroutes requests (a refused connection still counts at once). */
    node->timeouts = st == SPEED_ERR_TIMEOUT ? node->timeouts + 1 : 0;
    if (st == SPEED_ERR_TIMEOUT && was != SPEED_NODE_DOWN && node->timeouts < SPEED_ROUTER_HEALTH_TIMEOUTS_DOWN) {
        speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, NULL, "%s pool: node %s health check timed out (%d of %d)",
                  speed_router_pool_name(p), node->address, node->timeouts, SPEED_ROUTER_HEALTH_TIMEOUTS_DOWN);
        return;
    }
    const bool retired = atomic_load(&node->retired);
    if (retired &&
        (state == SPEED__V1__NODE_STATE__NODE_STATE_SERVING || state == SPEED__V1__NODE_STATE__NODE_STATE_DRAINING)) {
        /* out of the discovery set but still answering: its requests finish, no new ones */
        speed_balance_pool_set_draining(pool, i, true);
    } else if (state == SPEED__V1__NODE_STATE__NODE_STATE_SERVING) {
        if (was == SPEED_NODE_DRAINING)
            speed_balance_pool_set_draining(pool, i, false);
        else
            speed_balance_pool_mark_up(pool, i);
    } else if (state == SPEED__V1__NODE_STATE__NODE_STATE_DRAINING) {
        if (was != SPEED_NODE_DRAINING)
            speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, NULL, "%s pool: node %s is draining", speed_router_pool_name(p),
                      node->address);
        speed_balance_pool_set_draining(pool, i, true);
    } else {
        if (was != SPEED_NODE_DOWN && !retired) {
            if (state < 0)
                speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, NULL, "%s pool: node %s health check failed: %s",
                          speed_router_pool_name(p), node->address, speed_status_string(st));
            else
                speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, NULL, "%s pool: node %s is starting",
                          speed_router_pool_name(p), node->address);
        }
        if (speed_balance_pool_take_down(pool, i) && node->down_count) speed_counter_inc(node->down_count);
    }

    speed_kv_index_t *kv = p == SPEED_ROUTER_POOL_DECODE && n->kv_events ? n->kv : NULL;
    speed_node_state_t now = SPEED_NODE_DOWN;
    speed_balance_pool_state(pool, i, &now);
    if (kv && (now == SPEED_NODE_DOWN || retired)) speed_kv_index_forget(kv, i); /* its cache is gone to us */
    if (state == SPEED__V1__NODE_STATE__NODE_STATE_SERVING || state == SPEED__V1__NODE_STATE__NODE_STATE_DRAINING) {
        /* a reply that says more cache events wait is followed by a few more reads now */
        bool more = true;
        for (int read = 0; more && read <= (kv ? SPEED_ROUTER_KV_EXTRA_READS : 0); read++)
            more = poll_status(n, p, i, kv && !retired ? kv : NULL);
    }
    update_gauge(n, p, i);
}

/* Applies a pool's fresh discovery set (poller thread): new addresses get nodes (a retired slot
 * nobody holds, else a new one), vanished ones are retired, returning ones are restored.
 * `found` is the poller's private copy. `again`: the same set once more, for addresses that
 * waited for a held retired slot (refusals are not counted twice). */
static void discovery_apply(speed_router_nodes_t *n, speed_router_pool_id_t p, char (*found)[SPEED_ROUTER_ADDRESS_MAX],
                            size_t n_found, bool over_cap, bool again) {
    disc_t *d = &n->disc[p];
    const char *pool_name = speed_router_pool_name(p);
    size_t count = n_nodes_of(n, p);
    for (size_t i = 0; i < count; i++) {
        node_t *node = &n->nodes[p][i];
        bool listed = false;
        for (size_t k = 0; k < n_found && !listed; k++) listed = strcmp(found[k], node->address) == 0;
        bool retired = atomic_load(&node->retired);
        if (!listed && !retired) {
            atomic_store(&node->retired, true);
            speed_balance_pool_set_draining(n->pools[p], i, true);
            if (p == SPEED_ROUTER_POOL_DECODE) speed_kv_index_forget(n->kv, i);
            if (d->m_removed) speed_counter_inc(d->m_removed);
            SPEED_INFO(SPEED_SUBSYS_NET, "%s pool: node %s left %s: retired (its requests finish)", pool_name,
                       node->address, d->name);
        } else if (listed && retired) {
            /* back: DOWN until a health check says SERVING, like a new node */
            atomic_store(&node->retired, false);
            speed_balance_pool_take_down(n->pools[p], i);
            if (d->m_added) speed_counter_inc(d->m_added);
            SPEED_INFO(SPEED_SUBSYS_NET, "%s pool: node %s is back in %s", pool_name, node->address, d->name);
        }
        update_gauge(n, p, i);
    }
    size_t refused = 0, waiting = 0;
    for (size_t k = 0; k < n_found; k++) {
        bool known = false;
        for (size_t i = 0; i < count && !known; i++) known = strcmp(found[k], n->nodes[p][i].address) == 0;
        if (known) continue;
        /* A retired slot nobody holds any more is given to the new address first: the bound is
         * on live addresses, not on addresses ever seen, and a reused slot is one dead pod fewer
         * for the poller to health-check every round. */
        speed_status_t st = SPEED_ERR_CAPACITY;
        bool retired_held = false;
        for (size_t i = 0; i < count && st == SPEED_ERR_CAPACITY; i++) {
            if (!atomic_load(&n->nodes[p][i].retired)) continue;
            bool listed = false;
            for (size_t j = 0; j < n_found && !listed; j++) listed = strcmp(found[j], n->nodes[p][i].address) == 0;
            if (listed) continue;
            char old[sizeof n->nodes[p][i].address];
            snprintf(old, sizeof old, "%s", n->nodes[p][i].address);
            st = node_reuse(n, p, i, found[k]);
            if (st == SPEED_ERR_CAPACITY) retired_held = true;
            if (st == SPEED_OK)
                SPEED_INFO(SPEED_SUBSYS_NET, "%s pool: found node %s in %s (routed to once healthy; slot of %s)",
                           pool_name, found[k], d->name, old);
        }
        if (st == SPEED_ERR_CAPACITY) {
            st = node_add(n, p, found[k], true);
            if (st == SPEED_OK) {
                count++;
                SPEED_INFO(SPEED_SUBSYS_NET, "%s pool: found node %s in %s (routed to once healthy)", pool_name,
                           found[k], d->name);
            }
        }
        if (st == SPEED_OK) {
            if (d->m_added) speed_counter_inc(d->m_added);
        } else if (st == SPEED_ERR_CAPACITY && retired_held) {
            /* every slot is taken, but a retired one frees when its last request ends */
            if (!d->waiting)
                SPEED_INFO(SPEED_SUBSYS_NET,
                           "%s pool: node %s in %s waits for a retired node's requests to end (%zu slots)", pool_name,
                           found[k], d->name, n->cap[p]);
            waiting++;
        } else if (st == SPEED_ERR_CAPACITY) {
            refused++;
        } else {
            SPEED_WARN(SPEED_SUBSYS_NET, "%s pool: cannot add node %s: %s", pool_name, found[k],
                       speed_status_string(st));
        }
    }
    d->waiting = waiting > 0;
    if (d->m_waiting) speed_gauge_set(d->m_waiting, (double)waiting);
    if (again) return;       /* counted and warned when the set was new */
    if (over_cap) refused++; /* the resolver had more than the copy holds */
    if (refused && d->m_refused) speed_counter_add(d->m_refused, (double)refused);
    if (refused && !d->refused_seen)
        SPEED_WARN(SPEED_SUBSYS_NET,
                   "%s pool: %s lists more addresses than the pool holds (router.discovery_max_nodes %zu): %zu "
                   "refused",
                   pool_name, d->name, n->cap[p], refused);
    d->refused_seen = refused > 0;
}

/* Takes every fresh discovery set (under lock, copied) and applies it. Poller thread. */
static void discovery_take(speed_router_nodes_t *n) {
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++) {
        disc_t *d = &n->disc[p];
        if (!d->name[0]) continue;
        pthread_mutex_lock(&n->lock);
        bool fresh = d->fresh;
        size_t n_found = d->n_found;
        char(*copy)[SPEED_ROUTER_ADDRESS_MAX] = NULL;
        if (fresh) {
            copy = speed_malloc((n_found + 1) * sizeof *copy);
            if (copy) {
                memcpy(copy, d->found, n_found * sizeof *copy);
                d->fresh = false;
            }
        }
        pthread_mutex_unlock(&n->lock);
        if (!copy) {
            /* nothing new (or no memory: the set stays fresh for the next round); an address
             * that waits for a retired slot tries again each round, as its holders end */
            if (d->waiting) discovery_apply(n, p, d->last, d->n_last, false, true);
            continue;
        }
        bool over_cap = n_found > n->cap[p];
        d->n_last = over_cap ? n->cap[p] : n_found;
        memcpy(d->last, copy, d->n_last * sizeof *copy);
        discovery_apply(n, p, copy, d->n_last, over_cap, false);
        speed_free(copy);
    }
}

/* One resolution of every discovery name; a good set is handed to the poller. Any thread that
 * is not the poller (start, the discovery thread). */
static void discovery_resolve_all(speed_router_nodes_t *n) {
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++) {
        disc_t *d = &n->disc[p];
        if (!d->name[0]) continue;
        size_t cap = n->cap[p] + 1; /* one more than fits: says the set is over the cap */
        char(*addrs)[SPEED_ROUTER_ADDRESS_MAX] = speed_malloc(cap * sizeof *addrs);
        if (!addrs) continue;
        size_t n_found = 0;
        char why[128];
        speed_status_t st = speed_router_discovery_resolve(d->name, d->port, addrs, cap, &n_found, why, sizeof why);
        pthread_mutex_lock(&n->lock);
        bool ok = (st == SPEED_OK || st == SPEED_ERR_CAPACITY) && n_found > 0;
        bool was_failing = d->failing;
        d->failing = !ok;
        if (ok) {
            bool same = n_found == d->n_found;
            for (size_t k = 0; same && k < n_found; k++) same = strcmp(addrs[k], d->found[k]) == 0;
            if (!same) {
                memcpy(d->found, addrs, n_found * sizeof *addrs);
                d->n_found = n_found;
                d->fresh = true;
                n->kick = true;
                pthread_cond_broadcast(&n->cond);
            }
        }
        pthread_mutex_unlock(&n->lock);
        if (!ok) {
            if (d->m_failures) speed_counter_inc(d->m_failures);
            /* a resolver outage must not empty the pool: the last set stays */
            if (!was_failing)
                SPEED_WARN(SPEED_SUBSYS_NET, "%s pool: cannot resolve %s (%s): keeping the %zu known nodes",
                           speed_router_pool_name(p), d->name, why[0] ? why : speed_status_string(st),
                           n_nodes_of(n, p));
        } else if (was_failing) {
            SPEED_INFO(SPEED_SUBSYS_NET, "%s pool: %s resolves again (%zu addresses)", speed_router_pool_name(p),
                       d->name, n_found);
        }
        speed_free(addrs);
    }
}

static void *discovery_main(void *arg) {
    speed_router_nodes_t *n = arg;
    for (;;) {
        struct timespec until = speed_clock_deadline(CLOCK_MONOTONIC, n->disc_interval_ms);
        pthread_mutex_lock(&n->lock);
        while (!n->stop && pthread_cond_timedwait(&n->disc_cond, &n->lock, &until) == 0) {}
        bool stop = n->stop;
        pthread_mutex_unlock(&n->lock);
        if (stop) break;
        discovery_resolve_all(n);
    }
    return NULL;
}

static void poll_all(speed_router_nodes_t *n) {
    discovery_take(n);
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++)
        for (size_t i = 0; i < n_nodes_of(n, p); i++) {
            pthread_mutex_lock(&n->lock);
            bool stop = n->stop;
            pthread_mutex_unlock(&n->lock);
            if (stop) return;
            poll_node(n, p, i);
        }
    atomic_fetch_add(&n->polls, 1);
}

static void *poller_main(void *arg) {
    speed_router_nodes_t *n = arg;
    for (;;) {
        struct timespec until = speed_clock_deadline(CLOCK_MONOTONIC, n->interval_ms);
        pthread_mutex_lock(&n->lock);
        while (!n->stop && !n->kick && pthread_cond_timedwait(&n->cond, &n->lock, &until) == 0) {}
        bool stop = n->stop;
        n->kick = false;
        pthread_mutex_unlock(&n->lock);
        if (stop) break;
        poll_all(n);
    }
    return NULL;
}

speed_status_t speed_router_nodes_start(speed_router_nodes_t *n) {
    if (!n || n->thread_started) return SPEED_ERR_INVALID_ARGUMENT;
    if (n->disc_interval_ms) discovery_resolve_all(n);
    poll_all(n);
    if (pthread_create(&n->thread, NULL, poller_main, n) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "router: cannot start the node poller thread");
        return SPEED_ERR_INTERNAL;
    }
    n->thread_started = true;
    if (n->disc_interval_ms) {
        if (pthread_create(&n->disc_thread, NULL, discovery_main, n) != 0) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "router: cannot start the node discovery thread");
            return SPEED_ERR_INTERNAL;
        }
        n->disc_started = true;
    }
    return SPEED_OK;
}

void speed_router_nodes_stop(speed_router_nodes_t *n) {
    if (!n) return;
    pthread_mutex_lock(&n->lock);
    n->stop = true;
    pthread_cond_broadcast(&n->cond);
    pthread_cond_broadcast(&n->disc_cond);
    pthread_mutex_unlock(&n->lock);
    if (n->thread_started) {
        pthread_join(n->thread, NULL);
        n->thread_started = false;
    }
    if (n->disc_started) {
        pthread_join(n->disc_thread, NULL);
        n->disc_started = false;
    }
}

void speed_router_nodes_destroy(speed_router_nodes_t *n) {
    if (!n) return;
    speed_router_nodes_stop(n);
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++) {
        for (size_t i = 0; i < n_nodes_of(n, p); i++) speed_rpc_channel_destroy(n->nodes[p][i].channel);
        speed_free(n->nodes[p]);
        speed_free(n->disc[p].found);
        speed_free(n->disc[p].last);
        speed_balance_pool_destroy(n->pools[p]);
    }
    speed_kv_index_destroy(n->kv);
    pthread_cond_destroy(&n->cond);
    pthread_cond_destroy(&n->disc_cond);
    pthread_mutex_destroy(&n->lock);
    speed_free(n);
}

speed_balance_pool_t *speed_router_nodes_pool(speed_router_nodes_t *n, speed_router_pool_id_t p) {
    return (p >= 0 && p < SPEED_ROUTER_POOL_COUNT) ? n->pools[p] : NULL;
}

size_t speed_router_nodes_count(const speed_router_nodes_t *n, speed_router_pool_id_t p) {
    return (p >= 0 && p < SPEED_ROUTER_POOL_COUNT) ? n_nodes_of(n, p) : 0;
}

speed_rpc_channel_t *speed_router_nodes_channel(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT || i >= n_nodes_of(n, p)) return NULL;
    return n->nodes[p][i].channel;
}

const char *speed_router_nodes_address(const speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT || i >= n_nodes_of(n, p)) return NULL;
    return n->nodes[p][i].address;
}

void speed_router_nodes_fail(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i, const char *request_id,
                             const char *why) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT || i >= n_nodes_of(n, p)) return;
    speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, request_id, "%s node %s failed: %s", speed_router_pool_name(p),
              n->nodes[p][i].address, why ? why : "");
    /* counted here too: a node a request saw die is down as surely as one the poller found */
    node_t *node = &n->nodes[p][i];
    if (speed_balance_pool_take_down(n->pools[p], i) && node->down_count) speed_counter_inc(node->down_count);
    if (p == SPEED_ROUTER_POOL_DECODE) speed_kv_index_forget(n->kv, i);
    update_gauge(n, p, i);
}

speed_kv_index_t *speed_router_nodes_kv_index(speed_router_nodes_t *n) { return n ? n->kv : NULL; }

size_t speed_router_nodes_n_up(speed_router_nodes_t *n, speed_router_pool_id_t p) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT) return 0;
    return speed_balance_pool_n_up(n->pools[p]);
}

uint64_t speed_router_nodes_polls(const speed_router_nodes_t *n) {
    return atomic_load(&((speed_router_nodes_t *)n)->polls);
}

int64_t speed_router_nodes_holders(const speed_router_nodes_t *n) {
    int64_t held = 0;
    for (int p = 0; n && p < SPEED_ROUTER_POOL_COUNT; p++)
        for (size_t i = 0; i < n_nodes_of(n, p); i++) held += speed_balance_pool_holders(n->pools[p], i);
    return held;
}

bool speed_router_nodes_retired(const speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i) {
    if (!n || p < 0 || p >= SPEED_ROUTER_POOL_COUNT || i >= n_nodes_of(n, p)) return false;
    return atomic_load(&((speed_router_nodes_t *)n)->nodes[p][i].retired);
}
