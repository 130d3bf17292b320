/* speed_router_nodes: pools, channels and the status poller (see nodes.h). */
#include "nodes.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "cluster_config.h"
#include "log.h"
#include "speed_proto.h"

typedef struct {
    char address[300];
    speed_rpc_channel_t *channel;
    speed_gauge_t *up_gauge;     /* speed_router_node_up{pool,node} */
    speed_counter_t *down_count; /* speed_router_node_down_total{pool,node} */
    int timeouts;                /* health checks in a row that timed out (poller thread only) */
} node_t;

struct speed_router_nodes {
    speed_balance_pool_t *pools[SPEED_ROUTER_POOL_COUNT];
    node_t *nodes[SPEED_ROUTER_POOL_COUNT];
    size_t n_nodes[SPEED_ROUTER_POOL_COUNT];
    int64_t interval_ms;
    int64_t rpc_timeout_ms;

    pthread_t thread;
    bool thread_started;
    pthread_mutex_t lock;
    pthread_cond_t cond; /* CLOCK_MONOTONIC: wakes the poller to stop */
    bool stop;
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

speed_status_t speed_router_nodes_create(const speed_router_nodes_params_t *params, speed_router_nodes_t **nodes_p) {
    if (!params || !nodes_p || !params->host || params->status_interval_ms < 10 ||
        params->n_nodes[SPEED_ROUTER_POOL_DECODE] < 1 || params->n_nodes[SPEED_ROUTER_POOL_PREFILL] < 0)
        return SPEED_ERR_INVALID_ARGUMENT;
    speed_router_nodes_t *n = speed_calloc(1, sizeof(*n));
    if (!n) return SPEED_ERR_NO_MEMORY;
    pthread_mutex_init(&n->lock, NULL);
    speed_clock_cond_init(&n->cond);
    n->interval_ms = params->status_interval_ms;
    /* A poll must not outlast its period by much, and a node on a loaded host still gets
     * a fair chance to answer. */
    n->rpc_timeout_ms = n->interval_ms < 200 ? 200 : n->interval_ms > 2000 ? 2000 : n->interval_ms;

    speed_gauge_t *up_family = NULL;
    speed_counter_t *down_family = NULL;
    speed_status_t st = SPEED_OK;
    if (params->metrics) {
        static const char *const labels[] = {"pool", "node"};
        st = speed_gauge_register(params->metrics, "speed_router_node_up",
                                  "1 while the router sends requests to the node", labels, 2, &up_family);
        if (st == SPEED_OK)
            st = speed_counter_register(params->metrics, "speed_router_node_down_total",
                                        "times the router stopped sending requests to the node", labels, 2,
                                        &down_family);
    }
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT && st == SPEED_OK; p++) {
        size_t count = (size_t)params->n_nodes[p];
        speed_balance_pool_params_t bp = speed_balance_pool_default_params();
        bp.policy = params->policy[p];
        if (count > bp.n_nodes_max) {
            st = SPEED_ERR_INVALID_ARGUMENT;
            break;
        }
        st = speed_balance_pool_create(speed_router_pool_name(p), &bp, &n->pools[p]);
        if (st != SPEED_OK) break;
        if (count) {
            n->nodes[p] = speed_calloc(count, sizeof(node_t));
            if (!n->nodes[p]) {
                st = SPEED_ERR_NO_MEMORY;
                break;
            }
        }
        for (size_t i = 0; i < count && st == SPEED_OK; i++) {
            node_t *node = &n->nodes[p][i];
            char host[256];
            if (!speed_cluster_list_item(params->hosts[p], (int64_t)i, host, sizeof host))
                snprintf(host, sizeof host, "%s", params->host);
            snprintf(node->address, sizeof node->address, "%s:%lld", host,
                     (long long)(params->grpc_port[p] + (int64_t)i));
            st = speed_balance_pool_add(n->pools[p], node->address, NULL);
            speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
            cp.tls = params->tls;
            if (st == SPEED_OK) st = speed_rpc_channel_create(node->address, &cp, &node->channel);
            if (st == SPEED_OK && up_family) {
                const char *values[] = {speed_router_pool_name(p), node->address};
                st = speed_gauge_labels(up_family, values, &node->up_gauge);
                if (st == SPEED_OK) st = speed_counter_labels(down_family, values, &node->down_count);
            }
            if (st == SPEED_OK) {
                n->n_nodes[p] = i + 1;
                update_gauge(n, p, i);
            }
        }
    }
    if (st != SPEED_OK) {
        speed_router_nodes_destroy(n);
        return st;
    }
    *nodes_p = n;
    return SPEED_OK;
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
    if (state == SPEED__V1__NODE_STATE__NODE_STATE_SERVING) {
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
        if (was != SPEED_NODE_DOWN) {
            if (state < 0)
                speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, NULL, "%s pool: node %s health check failed: %s",
                          speed_router_pool_name(p), node->address, speed_status_string(st));
            else
                speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_NET, NULL, "%s pool: node %s is starting",
                          speed_router_pool_name(p), node->address);
        }
        if (speed_balance_pool_take_down(pool, i) && node->down_count) speed_counter_inc(node->down_count);
    }

    if (state == SPEED__V1__NODE_STATE__NODE_STATE_SERVING || state == SPEED__V1__NODE_STATE__NODE_STATE_DRAINING) {
        Speed__V1__NodeStatusRequest sreq = SPEED__V1__NODE_STATUS_REQUEST__INIT;
        if (speed_proto_pack(&sreq.base, &buf, &len) == SPEED_OK) {
            speed_rpc_reply_t sr = {0};
            if (speed_rpc_unary(node->channel, SPEED_METHOD_NODE_STATUS, buf, len, n->rpc_timeout_ms, &sr) ==
                SPEED_OK) {
                Speed__V1__NodeStatus *s = NULL;
                if (speed_proto_unpack(&speed__v1__node_status__descriptor, sr.data, sr.len, (ProtobufCMessage **)&s) ==
                    SPEED_OK) {
                    speed_node_load_t load = {s->running, s->waiting, s->kv_usage_ratio};
                    speed_balance_pool_set_load(pool, i, &load);
                    speed_proto_free(&s->base);
                }
            }
            speed_rpc_reply_cleanup(&sr);
            speed_free(buf);
        }
    }
    update_gauge(n, p, i);
}

static void poll_all(speed_router_nodes_t *n) {
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++)
        for (size_t i = 0; i < n->n_nodes[p]; i++) {
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
        while (!n->stop && pthread_cond_timedwait(&n->cond, &n->lock, &until) == 0) {}
        bool stop = n->stop;
        pthread_mutex_unlock(&n->lock);
        if (stop) break;
        poll_all(n);
    }
    return NULL;
}

speed_status_t speed_router_nodes_start(speed_router_nodes_t *n) {
    if (!n || n->thread_started) return SPEED_ERR_INVALID_ARGUMENT;
    poll_all(n);
    if (pthread_create(&n->thread, NULL, poller_main, n) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "router: cannot start the node poller thread");
        return SPEED_ERR_INTERNAL;
    }
    n->thread_started = true;
    return SPEED_OK;
}

void speed_router_nodes_stop(speed_router_nodes_t *n) {
    if (!n) return;
    pthread_mutex_lock(&n->lock);
    n->stop = true;
    pthread_cond_broadcast(&n->cond);
    pthread_mutex_unlock(&n->lock);
    if (n->thread_started) {
        pthread_join(n->thread, NULL);
        n->thread_started = false;
    }
}

void speed_router_nodes_destroy(speed_router_nodes_t *n) {
    if (!n) return;
    speed_router_nodes_stop(n);
    for (int p = 0; p < SPEED_ROUTER_POOL_COUNT; p++) {
        for (size_t i = 0; i < n->n_nodes[p]; i++) speed_rpc_channel_destroy(n->nodes[p][i].channel);
        speed_free(n->nodes[p]);
        speed_balance_pool_destroy(n->pools[p]);
    }
    pthread_cond_destroy(&n->cond);
    pthread_mutex_destroy(&n->lock);
    speed_free(n);
}

speed_balance_pool_t *speed_router_nodes_pool(speed_router_nodes_t *n, speed_router_pool_id_t p) {
    return (p >= 0 && p < SPEED_ROUTER_POOL_COUNT) ? n->pools[p] : NULL;
}

size_t speed_router_nodes_count(const speed_router_nodes_t *n, speed_router_pool_id_t p) {
    return (p >= 0 && p < SPEED_ROUTER_POOL_COUNT) ? n->n_nodes[p] : 0;
}

speed_rpc_channel_t *speed_router_nodes_channel(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT || i >= n->n_nodes[p]) return NULL;
    return n->nodes[p][i].channel;
}

const char *speed_router_nodes_address(const speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT || i >= n->n_nodes[p]) return NULL;
    return n->nodes[p][i].address;
}

void speed_router_nodes_fail(speed_router_nodes_t *n, speed_router_pool_id_t p, size_t i, const char *request_id,
                             const char *why) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT || i >= n->n_nodes[p]) return;
    speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, request_id, "%s node %s failed: %s", speed_router_pool_name(p),
              n->nodes[p][i].address, why ? why : "");
    /* counted here too: a node a request saw die is down as surely as one the poller found */
    node_t *node = &n->nodes[p][i];
    if (speed_balance_pool_take_down(n->pools[p], i) && node->down_count) speed_counter_inc(node->down_count);
    update_gauge(n, p, i);
}

size_t speed_router_nodes_n_up(speed_router_nodes_t *n, speed_router_pool_id_t p) {
    if (p < 0 || p >= SPEED_ROUTER_POOL_COUNT) return 0;
    return speed_balance_pool_n_up(n->pools[p]);
}

uint64_t speed_router_nodes_polls(const speed_router_nodes_t *n) {
    return atomic_load(&((speed_router_nodes_t *)n)->polls);
}
