/* UCX KV transfer: context, progress thread, endpoints, registrations, descriptors and transfers
 * (kv_transfer.h).
 *
 * Locking. ctx->mu guards every field that callbacks touch (transfer states, endpoint flags,
 * counters). UCX calls are never made while holding ctx->mu: UCX runs callbacks with its worker
 * lock held, and callbacks take ctx->mu, so the only lock order is "worker, then mu". ctx->ep_mu
 * serialises endpoint creation among API threads (never taken by callbacks).
 *
 * Lifetimes. A transfer holds a reference on its endpoint; an endpoint that failed (error
 * callback, or a flush / ack timeout) is not handed out again, and the progress thread closes it
 * (forced) once no live transfer uses it, and frees it once no transfer points at it. A destroyed
 * transfer whose UCX requests are still pending (puts, flush, notify) becomes an orphan that the
 * progress thread frees when the last callback has run. Only the progress thread (and
 * ctx_destroy after joining it) closes endpoints and frees orphans, so nothing an API thread
 * is using can disappear under it.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <ucp/api/ucp.h>

#include "alloc.h"
#include "kv_transfer.h"
#include "log.h"

#define AM_ID_NOTIFY 0x5301
#define AM_ID_ACK 0x5302
#define MSG_MAGIC 0x4b565846u /* "FXVK" */
#define MSG_VERSION 2 /* 2: head range added */
#define REQ_ID_MAX 64

typedef struct {
    uint32_t magic, version;
    uint64_t token;   /* the prefill context's id of the transfer, echoed in the ack */
    uint64_t cookie;
    uint64_t bytes;
    uint64_t epoch;
    int32_t head_begin, head_end; /* the model's KV heads the transfer covered */
    char request_id[REQ_ID_MAX];
} notify_msg_t;

typedef struct {
    uint32_t magic;
    int32_t status;
    uint64_t token;
} ack_msg_t;

typedef struct ack_buf {
    struct ack_buf *prev, *next;
    struct speed_kv_xfer_ctx *ctx;
    ack_msg_t msg;
} ack_buf_t;

typedef struct kv_region {
    struct kv_region *next;
    const speed_kv_cache_t *cache;
    speed_kv_pool_t pool;
    void *base;
    size_t length;
    ucp_mem_h memh;
    void *rkey;          /* packed */
    size_t rkey_len;
} kv_region_t;

typedef struct kv_ep {
    struct kv_ep *next;
    struct speed_kv_xfer_ctx *ctx;
    uint8_t *addr;
    size_t addr_len;
    speed_kv_transport_t transport;
    ucp_ep_h ep;
    bool failed;   /* not handed out again */
    bool closed;   /* ucp_ep_close_nbx issued; ep is gone */
    int refs;      /* transfers pointing at it */
    int live;      /* of which not ended */
    int in_use;    /* API threads inside a UCX call on it */
} kv_ep_t;

typedef struct {
    uint32_t pool;
    uint64_t offset;
    int64_t entries;
    int64_t sent_blocks; /* whole blocks put so far */
    bool done;
} xfer_layer_t;

typedef struct {
    uint64_t base, stride;
    int32_t *table;
    uint32_t n_blocks;
    ucp_rkey_h rkey;
} xfer_pool_t;

struct speed_kv_xfer {
    struct speed_kv_xfer *prev, *next; /* ctx->xfers */
    struct speed_kv_xfer_ctx *ctx;
    kv_ep_t *ep;
    uint64_t token;
    char request_id[REQ_ID_MAX];
    const speed_kv_cache_t *cache;
    const speed_kv_seq_t *seq;
    ucp_mem_h lmemh[SPEED_KV_POOL_COUNT];
    int n_layers;
    xfer_layer_t *layers;
    xfer_pool_t *pools;
    uint32_t n_pools;
    int n_layers_done;
    int block_tokens;
    size_t token_bytes, half_unit;
    /* Head ranges differ (tensor-parallel resharding): per token slot, one run of the common
     * heads for K and one for V, at each side's own slot stride and head offset. */
    bool strided;
    size_t run;                  /* n_common * head_dim * dtype size */
    size_t l_slot, l_head_off;   /* local slot stride, offset of the common heads in a slot */
    size_t r_slot, r_head_off, r_half; /* the same remote; r_half = B * r_slot (K -> V) */
    uint64_t total_bytes, lease_deadline_ms;
    notify_msg_t msg;      /* the notify payload; must live until its send completes */
    /* under ctx->mu */
    speed_kv_xfer_state_t state;
    speed_status_t status;
    speed_kv_stage_t failed_stage;
    uint64_t deadline_ns;  /* of the current flush / ack wait */
    int pending;           /* flush and notify requests whose callbacks reference this */
    bool orphan;           /* destroyed by the user, freed when pending and puts are 0 */
    uint64_t bytes_put, n_puts;
    uint64_t t_create, t_push, t_finish, t_end;
    atomic_int puts_pending; /* put requests not completed */
};

struct speed_kv_xfer_ctx {
    speed_kv_xfer_ctx_params_t p;
    uint64_t epoch;
    ucp_context_h ucp;
    ucp_worker_h worker;
    uint8_t *addr;
    size_t addr_len;
    int efd;
    pthread_t thread;
    bool thread_started;
    atomic_bool stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t ep_mu;
    bool closing;          /* teardown: error callbacks are expected */
    kv_region_t *regions;
    kv_ep_t *eps;
    speed_kv_xfer_t *xfers;
    ack_buf_t *acks;       /* acks being sent */
    void **close_reqs;     /* ucp_ep_close_nbx requests not completed */
    int n_close_reqs, cap_close_reqs;
    uint64_t next_token;
    speed_kv_xfer_ctx_stats_t stats;
};

/* ---- small helpers ------------------------------------------------------------------------- */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t realtime_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

static const char *rid(const speed_kv_xfer_t *x) { return x->request_id[0] ? x->request_id : NULL; }

const char *speed_kv_stage_name(speed_kv_stage_t s) {
    switch (s) {
    case SPEED_KV_STAGE_CONNECT: return "connect";
    case SPEED_KV_STAGE_PUT: return "put";
    case SPEED_KV_STAGE_FLUSH: return "flush";
    case SPEED_KV_STAGE_NOTIFY: return "notify";
    case SPEED_KV_STAGE_COUNT: break;
    }
    return "?";
}

/* Status of a failed UCX operation: a peer that went away, or a transfer error. */
static speed_status_t op_status(const kv_ep_t *e, ucs_status_t s) {
    if (e->failed) return SPEED_ERR_PEER_UNREACHABLE;
    switch (s) {
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
        return SPEED_ERR_PEER_UNREACHABLE;
    default:
        return SPEED_ERR_TRANSFER;
    }
}

static bool ended(const speed_kv_xfer_t *x) {
    return x->state == SPEED_KV_XFER_DONE || x->state == SPEED_KV_XFER_FAILED;
}

/* Ends a running transfer (ctx->mu held). Logs once, where the failure is noticed. */
static void fail_locked(speed_kv_xfer_t *x, speed_status_t st, speed_kv_stage_t stage, const char *why) {
    if (ended(x)) return;
    speed_kv_xfer_ctx_t *c = x->ctx;
    x->state = SPEED_KV_XFER_FAILED;
    x->status = st;
    x->failed_stage = stage;
    x->t_end = now_ns();
    x->ep->live--;
    if (st == SPEED_ERR_CANCELLED) {
        c->stats.n_cancelled++;
        speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, rid(x), "kv transfer cancelled");
    } else {
        c->stats.n_failed[stage]++;
        speed_log(c->closing ? SPEED_LOG_DEBUG : SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x),
                  "kv transfer failed at %s: %s (%s)", speed_kv_stage_name(stage), why, speed_status_string(st));
    }
    pthread_cond_broadcast(&c->cv);
}

static void done_locked(speed_kv_xfer_t *x) {
    if (ended(x)) return;
    speed_kv_xfer_ctx_t *c = x->ctx;
    x->state = SPEED_KV_XFER_DONE;
    x->status = SPEED_OK;
    x->t_end = now_ns();
    x->ep->live--;
    c->stats.n_done++;
    c->stats.done_ns += x->t_end - x->t_create;
    pthread_cond_broadcast(&c->cv);
}

/* ---- callbacks (progress thread, UCX worker lock held) --------------------------------------- */

static void ep_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status) {
    (void)ep;
    kv_ep_t *e = arg;
    speed_kv_xfer_ctx_t *c = e->ctx;
    pthread_mutex_lock(&c->mu);
    e->failed = true;
    if (!c->closing) {
        c->stats.n_peer_failures++;
        SPEED_WARN(SPEED_SUBSYS_NET, "kv transfer: %s endpoint to a peer failed: %s", speed_kv_transport_name(e->transport),
                   ucs_status_string(status));
    }
    for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) {
        if (x->ep != e || ended(x)) continue;
        speed_kv_stage_t stage = x->state == SPEED_KV_XFER_PUSHING    ? SPEED_KV_STAGE_PUT
                                 : x->state == SPEED_KV_XFER_FLUSHING ? SPEED_KV_STAGE_FLUSH
                                                                      : SPEED_KV_STAGE_NOTIFY;
        fail_locked(x, SPEED_ERR_PEER_UNREACHABLE, stage, "the peer is gone");
    }
    pthread_mutex_unlock(&c->mu);
}

static void put_cb(void *req, ucs_status_t status, void *user) {
    speed_kv_xfer_t *x = user;
    if (status != UCS_OK) {
        pthread_mutex_lock(&x->ctx->mu);
        fail_locked(x, op_status(x->ep, status), SPEED_KV_STAGE_PUT, ucs_status_string(status));
        pthread_mutex_unlock(&x->ctx->mu);
    }
    ucp_request_free(req);
    atomic_fetch_sub(&x->puts_pending, 1);
}

static void notify_sent_cb(void *req, ucs_status_t status, void *user) {
    speed_kv_xfer_t *x = user;
    ucp_request_free(req);
    pthread_mutex_lock(&x->ctx->mu);
    x->pending--;
    if (status != UCS_OK)
        fail_locked(x, op_status(x->ep, status), SPEED_KV_STAGE_NOTIFY, ucs_status_string(status));
    pthread_mutex_unlock(&x->ctx->mu);
}

/* Sends the notify; the caller made x NOTIFYING and counted one pending for it. Runs on the
 * caller's thread (finish, flush completed at once) or the progress thread (flush callback). */
static void send_notify(speed_kv_xfer_t *x) {
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS,
        .cb.send = notify_sent_cb,
        .user_data = x,
        .flags = UCP_AM_SEND_FLAG_REPLY,
    };
    ucs_status_ptr_t r = ucp_am_send_nbx(x->ep->ep, AM_ID_NOTIFY, NULL, 0, &x->msg, sizeof x->msg, &prm);
    if (UCS_PTR_IS_PTR(r)) return;
    pthread_mutex_lock(&x->ctx->mu);
    x->pending--;
    if (UCS_PTR_IS_ERR(r))
        fail_locked(x, op_status(x->ep, UCS_PTR_STATUS(r)), SPEED_KV_STAGE_NOTIFY, ucs_status_string(UCS_PTR_STATUS(r)));
    pthread_mutex_unlock(&x->ctx->mu);
}

/* Flush done: the puts are complete at the target. Next: the notify. */
static void flush_done(speed_kv_xfer_t *x, ucs_status_t status) {
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    x->pending--;
    if (x->state != SPEED_KV_XFER_FLUSHING) { /* timed out, failed or cancelled meanwhile */
        pthread_mutex_unlock(&c->mu);
        return;
    }
    if (status != UCS_OK) {
        fail_locked(x, op_status(x->ep, status), SPEED_KV_STAGE_FLUSH, ucs_status_string(status));
        pthread_mutex_unlock(&c->mu);
        return;
    }
    if (x->lease_deadline_ms && realtime_ms() >= x->lease_deadline_ms) {
        fail_locked(x, SPEED_ERR_TIMEOUT, SPEED_KV_STAGE_NOTIFY, "the lease deadline passed before the notify");
        pthread_mutex_unlock(&c->mu);
        return;
    }
    x->state = SPEED_KV_XFER_NOTIFYING;
    x->deadline_ns = now_ns() + (uint64_t)c->p.op_timeout_ms * 1000000ull;
    x->pending++;
    pthread_mutex_unlock(&c->mu);
    send_notify(x);
}

static void flush_cb(void *req, ucs_status_t status, void *user) {
    ucp_request_free(req);
    flush_done(user, status);
}

static void ack_unlink(speed_kv_xfer_ctx_t *c, ack_buf_t *a) {
    pthread_mutex_lock(&c->mu);
    if (a->prev) a->prev->next = a->next;
    else c->acks = a->next;
    if (a->next) a->next->prev = a->prev;
    pthread_mutex_unlock(&c->mu);
    speed_free(a);
}

static void ack_sent_cb(void *req, ucs_status_t status, void *user) {
    (void)status; /* a lost ack shows as a timeout on the prefill side */
    ack_buf_t *a = user;
    ucp_request_free(req);
    ack_unlink(a->ctx, a);
}

static void ack_send(speed_kv_xfer_ctx_t *c, ucp_ep_h reply_ep, uint64_t token, speed_status_t st) {
    ack_buf_t *a = speed_calloc(1, sizeof *a);
    if (!a) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: out of memory for an ack");
        return;
    }
    a->ctx = c;
    a->msg = (ack_msg_t){.magic = MSG_MAGIC, .status = (int32_t)st, .token = token};
    pthread_mutex_lock(&c->mu);
    a->next = c->acks;
    if (c->acks) c->acks->prev = a;
    c->acks = a;
    pthread_mutex_unlock(&c->mu);
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.send = ack_sent_cb,
        .user_data = a,
    };
    ucs_status_ptr_t r = ucp_am_send_nbx(reply_ep, AM_ID_ACK, NULL, 0, &a->msg, sizeof a->msg, &prm);
    if (UCS_PTR_IS_PTR(r)) return;
    if (UCS_PTR_IS_ERR(r))
        SPEED_WARN(SPEED_SUBSYS_NET, "kv transfer: ack not sent: %s", ucs_status_string(UCS_PTR_STATUS(r)));
    ack_unlink(c, a);
}

static ucs_status_t notify_handler(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                   const ucp_am_recv_param_t *param) {
    (void)header;
    (void)header_length;
    speed_kv_xfer_ctx_t *c = arg;
    speed_status_t st = SPEED_OK;
    notify_msg_t m;
    memset(&m, 0, sizeof m);
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || length != sizeof m) {
        SPEED_WARN(SPEED_SUBSYS_NET, "kv transfer: malformed notify of %zu bytes rejected (version %d is %zu bytes)",
                   length, MSG_VERSION, sizeof m);
        st = SPEED_ERR_PEER_PROTOCOL;
    } else {
        memcpy(&m, data, sizeof m);
        m.request_id[REQ_ID_MAX - 1] = '\0';
        const char *r = m.request_id[0] ? m.request_id : NULL;
        if (m.magic != MSG_MAGIC || m.version != MSG_VERSION) {
            speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, r, "kv transfer: notify with bad magic/version rejected");
            st = SPEED_ERR_PEER_PROTOCOL;
        } else if (m.epoch != c->epoch) {
            speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, r,
                      "kv transfer: notify for epoch %llu rejected: this node's epoch is %llu (stale descriptor)",
                      (unsigned long long)m.epoch, (unsigned long long)c->epoch);
            st = SPEED_ERR_PEER_PROTOCOL;
        } else if (c->p.notify_cb) {
            speed_kv_notify_t note = {.request_id = m.request_id,
                                      .cookie = m.cookie,
                                      .bytes = m.bytes,
                                      .epoch = m.epoch,
                                      .head_begin = m.head_begin,
                                      .head_end = m.head_end};
            st = c->p.notify_cb(c->p.notify_user, &note);
        }
    }
    pthread_mutex_lock(&c->mu);
    if (st == SPEED_OK) {
        c->stats.n_notified++;
        c->stats.bytes_notified += m.bytes;
    } else {
        c->stats.n_notify_rejected++;
    }
    pthread_mutex_unlock(&c->mu);
    if (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ack_send(c, param->reply_ep, m.token, st);
    return UCS_OK;
}

static ucs_status_t ack_handler(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                const ucp_am_recv_param_t *param) {
    (void)header;
    (void)header_length;
    speed_kv_xfer_ctx_t *c = arg;
    ack_msg_t a;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || length != sizeof a) return UCS_OK;
    memcpy(&a, data, sizeof a);
    if (a.magic != MSG_MAGIC) return UCS_OK;
    pthread_mutex_lock(&c->mu);
    for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) {
        if (x->token != a.token) continue;
        if (x->state != SPEED_KV_XFER_NOTIFYING) break; /* ended meanwhile (timeout, cancel) */
        if (a.status == SPEED_OK) {
            done_locked(x);
        } else {
            speed_status_t st = (speed_status_t)a.status;
            if (strcmp(speed_status_string(st), "unknown status") == 0) st = SPEED_ERR_PEER_PROTOCOL;
            fail_locked(x, st, SPEED_KV_STAGE_NOTIFY, "the decode node refused the notify");
        }
        break;
    }
    pthread_mutex_unlock(&c->mu);
    return UCS_OK;
}

/* ---- progress thread ------------------------------------------------------------------------ */

static void reap_close_reqs(speed_kv_xfer_ctx_t *c) {
    int k = 0;
    for (int i = 0; i < c->n_close_reqs; i++) {
        void *r = c->close_reqs[i];
        if (ucp_request_check_status(r) == UCS_INPROGRESS) c->close_reqs[k++] = r;
        else ucp_request_free(r);
    }
    c->n_close_reqs = k;
}

static void close_ep(speed_kv_xfer_ctx_t *c, ucp_ep_h ep, bool force) {
    ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS, .flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0};
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &prm);
    if (!UCS_PTR_IS_PTR(r)) return;
    if (c->n_close_reqs == c->cap_close_reqs) {
        int cap = c->cap_close_reqs ? 2 * c->cap_close_reqs : 8;
        void **grown = speed_realloc(c->close_reqs, (size_t)cap * sizeof *grown);
        if (!grown) { /* cannot track it: wait for it here */
            while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(c->worker);
            ucp_request_free(r);
            return;
        }
        c->close_reqs = grown;
        c->cap_close_reqs = cap;
    }
    c->close_reqs[c->n_close_reqs++] = r;
}

static void xfer_free(speed_kv_xfer_t *x) {
    for (uint32_t p = 0; p < x->n_pools; p++) {
        if (x->pools[p].rkey) ucp_rkey_destroy(x->pools[p].rkey);
        speed_free(x->pools[p].table);
    }
    speed_free(x->pools);
    speed_free(x->layers);
    speed_free(x);
}

/* Deadlines, failed endpoints, orphans. Progress thread only (or ctx_destroy after the join).
 * Returns the ms until the next deadline (capped). */
static int maintenance(speed_kv_xfer_ctx_t *c) {
    enum { MAX_BATCH = 32 };
    ucp_ep_h to_close[MAX_BATCH];
    kv_ep_t *to_free_ep[MAX_BATCH];
    speed_kv_xfer_t *to_free[MAX_BATCH];
    int n_close = 0, n_free_ep = 0, n_free = 0;
    uint64_t now = now_ns(), next = now + 100000000ull;
    pthread_mutex_lock(&c->mu);
    for (speed_kv_xfer_t *x = c->xfers, *nx; x; x = nx) {
        nx = x->next;
        if (x->state == SPEED_KV_XFER_FLUSHING || x->state == SPEED_KV_XFER_NOTIFYING) {
            if (now >= x->deadline_ns) {
                bool flushing = x->state == SPEED_KV_XFER_FLUSHING;
                /* the peer does not answer: do not hand its endpoint out again */
                x->ep->failed = true;
                fail_locked(x, flushing ? SPEED_ERR_TRANSFER : SPEED_ERR_PEER_UNREACHABLE,
                            flushing ? SPEED_KV_STAGE_FLUSH : SPEED_KV_STAGE_NOTIFY,
                            flushing ? "the flush did not complete in time" : "no ack in time");
            } else if (x->deadline_ns < next) {
                next = x->deadline_ns;
            }
        }
        if (x->orphan && x->pending == 0 && atomic_load(&x->puts_pending) == 0 && n_free < MAX_BATCH) {
            if (x->prev) x->prev->next = x->next;
            else c->xfers = x->next;
            if (x->next) x->next->prev = x->prev;
            x->ep->refs--;
            to_free[n_free++] = x;
        }
    }
    for (kv_ep_t **pe = &c->eps; *pe;) {
        kv_ep_t *e = *pe;
        if (e->failed && !e->closed && e->live == 0 && e->in_use == 0 && n_close < MAX_BATCH) {
            e->closed = true;
            to_close[n_close++] = e->ep;
            c->stats.n_endpoints--;
        }
        if (e->closed && e->refs == 0 && n_free_ep < MAX_BATCH) {
            *pe = e->next;
            to_free_ep[n_free_ep++] = e;
            continue;
        }
        pe = &e->next;
    }
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < n_close; i++) close_ep(c, to_close[i], true);
    for (int i = 0; i < n_free; i++) xfer_free(to_free[i]);
    for (int i = 0; i < n_free_ep; i++) {
        speed_free(to_free_ep[i]->addr);
        speed_free(to_free_ep[i]);
    }
    reap_close_reqs(c);
    uint64_t left = next > now ? next - now : 0;
    return (int)(left / 1000000ull) + 1;
}

static void *progress_main(void *arg) {
    speed_kv_xfer_ctx_t *c = arg;
    int idle_busy = 0;
    while (!atomic_load(&c->stop)) {
        unsigned n = 0, k;
        while ((k = ucp_worker_progress(c->worker)) != 0) n += k;
        int timeout_ms = maintenance(c);
        if (c->n_close_reqs) timeout_ms = 1;
        ucs_status_t s = ucp_worker_arm(c->worker);
        /* Some transports keep reporting BUSY with nothing to progress (seen with shm + tcp
         * interfaces in one worker): after two such rounds, sleep 1 ms instead of spinning a
         * core away from the engine. */
        idle_busy = s == UCS_ERR_BUSY && n == 0 ? idle_busy + 1 : 0;
        if (s == UCS_ERR_BUSY && idle_busy < 2) continue;
        if (s == UCS_ERR_BUSY) timeout_ms = 1;
        struct pollfd pfd = {.fd = c->efd, .events = POLLIN};
        if (poll(&pfd, 1, timeout_ms) < 0 && errno != EINTR) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: poll on the worker fd: %m");
            usleep(1000);
        }
    }
    return NULL;
}

/* ---- context -------------------------------------------------------------------------------- */

speed_kv_xfer_ctx_params_t speed_kv_xfer_ctx_default_params(void) {
    return (speed_kv_xfer_ctx_params_t){.op_timeout_ms = 10000};
}

static speed_status_t ucx_fail(const char *what, ucs_status_t s) {
    SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: %s: %s", what, ucs_status_string(s));
    return SPEED_ERR_IO;
}

static void ctx_free(speed_kv_xfer_ctx_t *c);

speed_status_t speed_kv_xfer_ctx_create(const speed_kv_xfer_ctx_params_t *params, speed_kv_xfer_ctx_t **ctx_p) {
    if (!params || !ctx_p || params->op_timeout_ms < 1) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: no params or output pointer, or op_timeout_ms < 1");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_xfer_ctx_t *c = speed_calloc(1, sizeof *c);
    if (!c) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }
    c->p = *params;
    c->efd = -1;
    c->next_token = 1;
    c->epoch = params->epoch;
    if (!c->epoch) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        c->epoch = ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 40);
        if (!c->epoch) c->epoch = 1;
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->ep_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);

    speed_status_t st = SPEED_ERR_IO;
    ucp_config_t *cfg = NULL;
    ucs_status_t s = ucp_config_read(NULL, NULL, &cfg);
    if (s != UCS_OK) {
        st = ucx_fail("ucp_config_read", s);
        goto fail;
    }
    ucp_params_t up = {
        .field_mask = UCP_PARAM_FIELD_FEATURES,
        .features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
    };
    s = ucp_init(&up, cfg, &c->ucp);
    ucp_config_release(cfg);
    if (s != UCS_OK) {
        c->ucp = NULL;
        st = ucx_fail("ucp_init", s);
        goto fail;
    }
    if (c->p.cuda_direct) {
        /* Refuse now, not at the first registration or put: a UCX without CUDA support cannot
         * register or address device memory at all. */
        ucp_context_attr_t cattr = {.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES};
        s = ucp_context_query(c->ucp, &cattr);
        if (s != UCS_OK) {
            st = ucx_fail("ucp_context_query", s);
            goto fail;
        }
        if (!(cattr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA))) {
            unsigned major, minor, release;
            ucp_get_version(&major, &minor, &release);
            SPEED_ERROR(SPEED_SUBSYS_NET,
                        "kv transfer: ucx.cuda_direct needs a UCX built with CUDA support (cuda_copy / cuda_ipc "
                        "transports); this UCX %u.%u.%u has none: set ucx.cuda_direct: false to stage the KV through "
                        "pinned host memory",
                        major, minor, release);
            st = SPEED_ERR_UNSUPPORTED;
            goto fail;
        }
    }
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE, .thread_mode = UCS_THREAD_MODE_MULTI};
    s = ucp_worker_create(c->ucp, &wp, &c->worker);
    if (s != UCS_OK) {
        c->worker = NULL;
        st = ucx_fail("ucp_worker_create", s);
        goto fail;
    }
    ucp_worker_attr_t wa = {.field_mask = UCP_WORKER_ATTR_FIELD_THREAD_MODE};
    if (ucp_worker_query(c->worker, &wa) != UCS_OK || wa.thread_mode != UCS_THREAD_MODE_MULTI) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: this UCX has no multi-threaded workers (built without --enable-mt)");
        goto fail;
    }
    ucp_address_t *addr = NULL;
    size_t addr_len = 0;
    s = ucp_worker_get_address(c->worker, &addr, &addr_len);
    if (s != UCS_OK) {
        st = ucx_fail("ucp_worker_get_address", s);
        goto fail;
    }
    c->addr = speed_malloc(addr_len);
    if (c->addr) memcpy(c->addr, addr, addr_len);
    c->addr_len = addr_len;
    ucp_worker_release_address(c->worker, addr);
    if (!c->addr) {
        st = SPEED_ERR_NO_MEMORY;
        goto fail;
    }
    ucp_am_handler_param_t hp = {
        .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS | UCP_AM_HANDLER_PARAM_FIELD_CB |
                      UCP_AM_HANDLER_PARAM_FIELD_ARG,
        .id = AM_ID_NOTIFY,
        .flags = UCP_AM_FLAG_WHOLE_MSG,
        .cb = notify_handler,
        .arg = c,
    };
    if ((s = ucp_worker_set_am_recv_handler(c->worker, &hp)) != UCS_OK) {
        st = ucx_fail("ucp_worker_set_am_recv_handler", s);
        goto fail;
    }
    hp.id = AM_ID_ACK;
    hp.cb = ack_handler;
    if ((s = ucp_worker_set_am_recv_handler(c->worker, &hp)) != UCS_OK) {
        st = ucx_fail("ucp_worker_set_am_recv_handler", s);
        goto fail;
    }
    if ((s = ucp_worker_get_efd(c->worker, &c->efd)) != UCS_OK) {
        st = ucx_fail("ucp_worker_get_efd", s);
        goto fail;
    }
    int e = pthread_create(&c->thread, NULL, progress_main, c);
    if (e != 0) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: cannot start the progress thread: %s", strerror(e));
        goto fail;
    }
    c->thread_started = true;
    SPEED_DEBUG(SPEED_SUBSYS_NET, "kv transfer: context up, epoch %llu, worker address %zu bytes",
                (unsigned long long)c->epoch, c->addr_len);
    *ctx_p = c;
    return SPEED_OK;
fail:
    ctx_free(c);
    return st;
}

void speed_kv_xfer_ctx_address(const speed_kv_xfer_ctx_t *c, const uint8_t **addr_p, size_t *len_p) {
    *addr_p = c->addr;
    *len_p = c->addr_len;
}

uint64_t speed_kv_xfer_ctx_epoch(const speed_kv_xfer_ctx_t *c) { return c->epoch; }

void speed_kv_xfer_ctx_stats(speed_kv_xfer_ctx_t *c, speed_kv_xfer_ctx_stats_t *stats_p) {
    pthread_mutex_lock(&c->mu);
    *stats_p = c->stats;
    pthread_mutex_unlock(&c->mu);
}

static void region_free(speed_kv_xfer_ctx_t *c, kv_region_t *r) {
    if (r->rkey) ucp_rkey_buffer_release(r->rkey);
    if (r->memh) ucp_mem_unmap(c->ucp, r->memh);
    speed_free(r);
}

/* Frees what exists; the progress thread is stopped. The worker goes before the transfers and
 * endpoints (but after the rkeys, which need it): destroying it purges requests UCX never
 * completed (e.g. on an endpoint that failed in mode NONE) and runs their callbacks, which still
 * find their transfers and endpoints. */
static void ctx_free(speed_kv_xfer_ctx_t *c) {
    for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) /* rkeys need the worker */
        for (uint32_t p = 0; p < x->n_pools; p++) {
            if (x->pools[p].rkey) ucp_rkey_destroy(x->pools[p].rkey);
            x->pools[p].rkey = NULL;
        }
    if (c->worker) ucp_worker_destroy(c->worker);
    while (c->xfers) {
        speed_kv_xfer_t *x = c->xfers;
        c->xfers = x->next;
        xfer_free(x);
    }
    while (c->eps) {
        kv_ep_t *e = c->eps;
        c->eps = e->next;
        speed_free(e->addr);
        speed_free(e);
    }
    while (c->regions) {
        kv_region_t *r = c->regions;
        c->regions = r->next;
        region_free(c, r);
    }
    if (c->ucp) ucp_cleanup(c->ucp);
    /* acks whose sends never completed (their callbacks will not run after the worker is gone) */
    while (c->acks) {
        ack_buf_t *a = c->acks;
        c->acks = a->next;
        speed_free(a);
    }
    speed_free(c->close_reqs);
    speed_free(c->addr);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->ep_mu);
    pthread_mutex_destroy(&c->mu);
    speed_free(c);
}

void speed_kv_xfer_ctx_destroy(speed_kv_xfer_ctx_t *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->closing = true;
    pthread_mutex_unlock(&c->mu);
    if (c->thread_started) {
        atomic_store(&c->stop, true);
        ucp_worker_signal(c->worker);
        pthread_join(c->thread, NULL);
        c->thread_started = false;
    }
    /* single-threaded from here: end every transfer, close every endpoint */
    pthread_mutex_lock(&c->mu);
    for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) {
        fail_locked(x, SPEED_ERR_CANCELLED, SPEED_KV_STAGE_PUT, "context destroyed");
        x->orphan = true;
    }
    pthread_mutex_unlock(&c->mu);
    for (kv_ep_t *e = c->eps; e; e = e->next) {
        if (e->closed) continue;
        bool busy = false;
        for (speed_kv_xfer_t *x = c->xfers; x; x = x->next)
            if (x->ep == e && (x->pending || atomic_load(&x->puts_pending))) busy = true;
        /* idle and healthy: a flush-mode close (the peer sees an orderly disconnect) */
        close_ep(c, e->ep, e->failed || busy);
        e->closed = true;
    }
    uint64_t deadline = now_ns() + (uint64_t)c->p.op_timeout_ms * 1000000ull;
    for (;;) {
        ucp_worker_progress(c->worker);
        reap_close_reqs(c);
        /* Requests on an endpoint that failed in mode NONE (a dead shm peer) are never completed
         * by UCX 1.13, not even by a forced close: do not wait for those. */
        bool busy = c->n_close_reqs > 0 || c->acks != NULL;
        for (speed_kv_xfer_t *x = c->xfers; x && !busy; x = x->next)
            if ((x->pending || atomic_load(&x->puts_pending)) && !x->ep->failed) busy = true;
        if (!busy) break;
        if (now_ns() > deadline) {
            int n_x = 0;
            for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) {
                n_x += x->pending || atomic_load(&x->puts_pending);
                if (x->pending || atomic_load(&x->puts_pending))
                    speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, rid(x), "kv transfer: %d requests, %d puts pending at teardown",
                              x->pending, atomic_load(&x->puts_pending));
            }
            SPEED_WARN(SPEED_SUBSYS_NET,
                       "kv transfer: teardown did not complete in %d ms (%d endpoint closes, %d transfers, %s acks "
                       "pending); releasing anyway",
                       c->p.op_timeout_ms, c->n_close_reqs, n_x, c->acks ? "some" : "no");
            break;
        }
    }
    for (int i = 0; i < c->n_close_reqs; i++) ucp_request_free(c->close_reqs[i]);
    c->n_close_reqs = 0;
    ctx_free(c);
}

/* ---- registration ---------------------------------------------------------------------------- */

/* Base and length of the memory registered for a pool of the cache: its host mirror when it has
 * one, else the pool (NULL base when the pool is empty). */
static void pool_extent(const speed_kv_cache_t *cache, speed_kv_pool_t p, void **base_p, size_t *len_p) {
    speed_kv_cache_xfer_region(cache, p, base_p, len_p);
}

/* Pool address of the pool's block 0 (layer offsets are relative to it, in the pool and in the
 * mirror alike). */
static const char *pool_base(const speed_kv_cache_t *cache, speed_kv_pool_t p) {
    int first = p == SPEED_KV_POOL_LOWER ? 0 : speed_kv_cache_split_layer(cache);
    return speed_kv_cache_layer(cache, first).k_base;
}

static kv_region_t *region_find(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache, speed_kv_pool_t p) {
    for (kv_region_t *r = c->regions; r; r = r->next)
        if (r->cache == cache && r->pool == p) return r;
    return NULL;
}

speed_status_t speed_kv_xfer_ctx_register_cache(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache) {
    if (!c || !cache) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: register: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    /* Device pools without a mirror: only a CUDA-aware UCX can register them. */
    const bool device = !speed_kv_cache_host_mirror(cache) && !speed_kv_cache_host_memory(cache);
    if (device && !c->p.cuda_direct) {
        SPEED_ERROR(SPEED_SUBSYS_NET,
                    "kv transfer: the cache's pools are device memory and it has no host mirror: keep the mirror "
                    "(speed_engine_params_t.kv_host_mirror AUTO, the default) or set ucx.cuda_direct with a "
                    "CUDA-aware UCX");
        return SPEED_ERR_UNSUPPORTED;
    }
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        pthread_mutex_lock(&c->mu);
        bool have = region_find(c, cache, (speed_kv_pool_t)p) != NULL;
        pthread_mutex_unlock(&c->mu);
        void *base;
        size_t len;
        pool_extent(cache, (speed_kv_pool_t)p, &base, &len);
        if (have || !base) continue;
        kv_region_t *r = speed_calloc(1, sizeof *r);
        if (!r) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: out of memory");
            speed_kv_xfer_ctx_deregister_cache(c, cache);
            return SPEED_ERR_NO_MEMORY;
        }
        r->cache = cache;
        r->pool = (speed_kv_pool_t)p;
        r->base = base;
        r->length = len;
        ucp_mem_map_params_t mp = {
            .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH,
            .address = base,
            .length = len,
        };
        if (device) { /* cuda_direct: cudaMalloc'd pools, registered as such */
            mp.field_mask |= UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
            mp.memory_type = UCS_MEMORY_TYPE_CUDA;
        }
        ucs_status_t s = ucp_mem_map(c->ucp, &mp, &r->memh);
        if (s == UCS_OK) s = ucp_rkey_pack(c->ucp, r->memh, &r->rkey, &r->rkey_len);
        else r->memh = NULL;
        if (s != UCS_OK) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: cannot register the %s pool (%zu bytes): %s",
                        p == 0 ? "lower" : "upper", len, ucs_status_string(s));
            r->rkey = NULL;
            region_free(c, r);
            speed_kv_xfer_ctx_deregister_cache(c, cache);
            return SPEED_ERR_IO;
        }
        pthread_mutex_lock(&c->mu);
        r->next = c->regions;
        c->regions = r;
        pthread_mutex_unlock(&c->mu);
        SPEED_DEBUG(SPEED_SUBSYS_NET, "kv transfer: registered the %s pool%s, %zu bytes, rkey %zu bytes",
                    p == 0 ? "lower" : "upper",
                    speed_kv_cache_host_mirror(cache) ? "'s host mirror" : device ? " (device memory)" : "", len,
                    r->rkey_len);
    }
    return SPEED_OK;
}

void speed_kv_xfer_ctx_deregister_cache(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache) {
    if (!c) return;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        kv_region_t *r = NULL;
        for (kv_region_t **pr = &c->regions; *pr; pr = &(*pr)->next)
            if ((*pr)->cache == cache) {
                r = *pr;
                *pr = r->next;
                break;
            }
        pthread_mutex_unlock(&c->mu);
        if (!r) return;
        region_free(c, r);
    }
}

/* ---- descriptors ------------------------------------------------------------------------------ */

static int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

speed_status_t speed_kv_desc_build(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache, const speed_kv_seq_t *seq,
                                   int64_t n_full, int64_t n_compact, const speed_kv_desc_params_t *params,
                                   speed_kv_desc_t **desc_p) {
    if (!c || !cache || !seq || !params || !desc_p) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (params->transport != SPEED_KV_TRANSPORT_SHM && params->transport != SPEED_KV_TRANSPORT_TCP) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: unknown transport %d", (int)params->transport);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    const int L = speed_kv_cache_n_layers(cache), B = speed_kv_cache_block_tokens(cache);
    const int C = speed_kv_seq_prefill_layers(seq);
    const speed_kv_layer_t l0 = speed_kv_cache_layer(cache, 0);
    const size_t token_bytes = speed_kv_cache_token_bytes(cache);
    kv_region_t *reg[SPEED_KV_POOL_COUNT];
    int pool_index[SPEED_KV_POOL_COUNT] = {-1, -1};
    int64_t pool_entries[SPEED_KV_POOL_COUNT] = {0, 0};
    uint32_t n_pools = 0;
    pthread_mutex_lock(&c->mu);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) reg[p] = region_find(c, cache, (speed_kv_pool_t)p);
    pthread_mutex_unlock(&c->mu);
    for (int l = 0; l < L; l++) {
        int64_t e = l < C ? n_full : n_compact;
        speed_kv_pool_t p = speed_kv_cache_layer_pool(cache, l);
        if (e < 0 || e > speed_kv_seq_capacity(seq, l)) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: layer %d needs %lld entries, the sequence has room for %lld", l,
                        (long long)e, (long long)speed_kv_seq_capacity(seq, l));
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (!reg[p]) {
            SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: the cache's %s pool is not registered "
                        "(speed_kv_xfer_ctx_register_cache)", p == 0 ? "lower" : "upper");
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (pool_index[p] < 0) pool_index[p] = (int)n_pools++;
        if (e > pool_entries[p]) pool_entries[p] = e;
    }
    speed_kv_desc_t *d = speed_calloc(1, sizeof *d);
    if (!d) goto nomem;
    d->worker_addr = speed_malloc(c->addr_len);
    d->regions = speed_calloc(n_pools, sizeof *d->regions);
    d->pools = speed_calloc(n_pools, sizeof *d->pools);
    d->layers = speed_calloc((size_t)L, sizeof *d->layers);
    if (!d->worker_addr || !d->regions || !d->pools || !d->layers) goto nomem;
    d->n_regions = d->n_pools = n_pools;
    d->n_layers = (uint32_t)L;
    memcpy(d->worker_addr, c->addr, c->addr_len);
    d->worker_addr_len = (uint32_t)c->addr_len;
    d->transport = params->transport;
    d->block_tokens = B;
    d->n_kv_heads = l0.n_kv_heads;
    d->head_dim = l0.head_dim;
    d->head_begin = speed_kv_cache_head_begin(cache);
    d->head_end = d->head_begin + l0.n_kv_heads;
    d->model_kv_heads = speed_kv_cache_model_kv_heads(cache);
    d->dtype = l0.dtype;
    d->unit_bytes = speed_kv_cache_unit_bytes(cache);
    d->epoch = c->epoch;
    d->lease_deadline_ms = params->lease_deadline_ms;
    d->cookie = params->cookie;
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        if (pool_index[p] < 0) continue;
        int i = pool_index[p];
        kv_region_t *r = reg[p];
        d->regions[i].base = (uint64_t)(uintptr_t)r->base;
        d->regions[i].length = r->length;
        d->regions[i].rkey_len = (uint32_t)r->rkey_len;
        if (!(d->regions[i].rkey = speed_malloc(r->rkey_len))) goto nomem;
        memcpy(d->regions[i].rkey, r->rkey, r->rkey_len);
        int first = p == SPEED_KV_POOL_LOWER ? 0 : speed_kv_cache_split_layer(cache);
        speed_kv_layer_t kl = speed_kv_cache_layer(cache, first);
        d->pools[i].region = (uint32_t)i;
        d->pools[i].base = (uint64_t)(uintptr_t)r->base;
        d->pools[i].block_stride = kl.block_stride;
        d->pools[i].n_blocks = (uint32_t)div_up(pool_entries[p], B);
        if (!(d->pools[i].table = speed_malloc((size_t)(d->pools[i].n_blocks ? d->pools[i].n_blocks : 1) * sizeof(int32_t))))
            goto nomem;
        if (d->pools[i].n_blocks)
            memcpy(d->pools[i].table, speed_kv_seq_block_table(seq, first), d->pools[i].n_blocks * sizeof(int32_t));
    }
    uint64_t total = 0;
    for (int l = 0; l < L; l++) {
        speed_kv_pool_t p = speed_kv_cache_layer_pool(cache, l);
        speed_kv_layer_t kl = speed_kv_cache_layer(cache, l);
        d->layers[l].pool = (uint32_t)pool_index[p];
        d->layers[l].offset = (uint64_t)((const char *)kl.k_base - pool_base(cache, p));
        d->layers[l].entries = l < C ? n_full : n_compact;
        total += (uint64_t)d->layers[l].entries * token_bytes;
    }
    d->total_bytes = total;
    if (speed_kv_desc_check(d) != SPEED_OK) { /* a bug: logged there */
        speed_kv_desc_destroy(d);
        return SPEED_ERR_INTERNAL;
    }
    *desc_p = d;
    return SPEED_OK;
nomem:
    SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: out of memory");
    speed_kv_desc_destroy(d);
    return SPEED_ERR_NO_MEMORY;
}

/* Prompt entries of an engine sequence (its prompt length and depth). */
static speed_status_t engine_seq_entries(speed_engine_t *engine, speed_seq_id_t seq, speed_kv_seq_t **kv_p,
                                         int64_t *n_full_p, int64_t *n_compact_p) {
    speed_engine_seq_stats_t ss;
    SPEED_CHECK(speed_engine_seq_stats(engine, seq, &ss));
    SPEED_CHECK(speed_engine_seq_kv(engine, seq, kv_p));
    speed_kv_entries_for(ss.n_prompt, ss.depth.anchors, ss.depth.tail, 0, n_full_p, n_compact_p);
    return SPEED_OK;
}

speed_status_t speed_kv_desc_build_engine(speed_kv_xfer_ctx_t *c, speed_engine_t *engine, speed_seq_id_t seq,
                                          const speed_kv_desc_params_t *params, speed_kv_desc_t **desc_p) {
    if (!engine) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv descriptor: NULL engine");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_seq_t *kv;
    int64_t n_full, n_compact;
    SPEED_CHECK(engine_seq_entries(engine, seq, &kv, &n_full, &n_compact));
    return speed_kv_desc_build(c, speed_engine_kv_cache(engine), kv, n_full, n_compact, params, desc_p);
}

/* ---- endpoints ---------------------------------------------------------------------------------- */

/* A healthy cached endpoint to addr in this mode, or a new one; with a reference taken (refs and
 * live). Returns SPEED_OK, SPEED_ERR_PEER_UNREACHABLE or SPEED_ERR_NO_MEMORY. */
static speed_status_t ep_get(speed_kv_xfer_ctx_t *c, const uint8_t *addr, size_t addr_len,
                             speed_kv_transport_t transport, const char *request_id, kv_ep_t **ep_p) {
    pthread_mutex_lock(&c->ep_mu);
    pthread_mutex_lock(&c->mu);
    for (kv_ep_t *e = c->eps; e; e = e->next) {
        if (e->failed || e->closed || e->transport != transport || e->addr_len != addr_len ||
            memcmp(e->addr, addr, addr_len) != 0)
            continue;
        e->refs++;
        e->live++;
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_unlock(&c->ep_mu);
        *ep_p = e;
        return SPEED_OK;
    }
    pthread_mutex_unlock(&c->mu);
    kv_ep_t *e = speed_calloc(1, sizeof *e);
    uint8_t *copy = speed_malloc(addr_len);
    if (!e || !copy) {
        speed_free(e);
        speed_free(copy);
        pthread_mutex_unlock(&c->ep_mu);
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, request_id, "kv transfer: out of memory");
        return SPEED_ERR_NO_MEMORY;
    }
    memcpy(copy, addr, addr_len);
    e->ctx = c;
    e->addr = copy;
    e->addr_len = addr_len;
    e->transport = transport;
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER,
        .address = (const ucp_address_t *)copy,
        .err_mode = transport == SPEED_KV_TRANSPORT_TCP ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE,
        .err_handler = {.cb = ep_err_cb, .arg = e},
    };
    ucs_status_t s = ucp_ep_create(c->worker, &ep, &e->ep);
    if (s != UCS_OK) {
        pthread_mutex_unlock(&c->ep_mu);
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, request_id, "kv transfer: no %s endpoint to the peer: %s",
                  speed_kv_transport_name(transport), ucs_status_string(s));
        speed_free(copy);
        speed_free(e);
        return SPEED_ERR_PEER_UNREACHABLE;
    }
    if (speed_log_enabled(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET)) ucp_ep_print_info(e->ep, stderr); /* the lanes chosen */
    pthread_mutex_lock(&c->mu);
    e->refs = e->live = 1;
    e->next = c->eps;
    c->eps = e;
    c->stats.n_endpoints++;
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->ep_mu);
    *ep_p = e;
    return SPEED_OK;
}

/* ---- transfers -------------------------------------------------------------------------------- */

#define REFUSE(st_, ...)                                                               \
    do {                                                                               \
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, request_id, "kv transfer refused: " __VA_ARGS__); \
        st = (st_);                                                                    \
        goto refuse;                                                                   \
    } while (0)

speed_status_t speed_kv_xfer_create(speed_kv_xfer_ctx_t *c, const speed_kv_desc_t *d, const speed_kv_cache_t *cache,
                                    const speed_kv_seq_t *seq, int64_t n_full, int64_t n_compact,
                                    const char *request_id, speed_kv_xfer_t **xfer_p) {
    if (!c || !d || !cache || !seq || !xfer_p) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: create: NULL argument");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (request_id && !*request_id) request_id = NULL;
    speed_status_t st = SPEED_OK;
    speed_kv_xfer_t *x = NULL;
    const int L = speed_kv_cache_n_layers(cache), B = speed_kv_cache_block_tokens(cache);
    const int C = speed_kv_seq_prefill_layers(seq);
    const speed_kv_layer_t l0 = speed_kv_cache_layer(cache, 0);
    const size_t token_bytes = speed_kv_cache_token_bytes(cache);

    if (speed_kv_desc_check(d) != SPEED_OK) REFUSE(SPEED_ERR_PEER_PROTOCOL, "the descriptor is malformed");
    if (d->dtype != l0.dtype)
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "dtype %s, the local cache holds %s", speed_dtype_name(d->dtype),
               speed_dtype_name(l0.dtype));
    if (d->block_tokens != B) REFUSE(SPEED_ERR_PEER_PROTOCOL, "block_tokens %d, local %d", d->block_tokens, B);
    if (d->head_dim != l0.head_dim) REFUSE(SPEED_ERR_PEER_PROTOCOL, "head_dim %d, local %d", d->head_dim, l0.head_dim);
    /* heads: the model's total must agree; this transfer puts the intersection of the ranges */
    const int lb = speed_kv_cache_head_begin(cache), le = lb + l0.n_kv_heads;
    const int lm = speed_kv_cache_model_kv_heads(cache);
    if (d->model_kv_heads != lm && (d->model_kv_heads != 0 || d->head_end > lm))
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "heads [%d, %d) of a model with %d KV heads, the local cache's has %d",
               d->head_begin, d->head_end, d->model_kv_heads, lm);
    const int hb = d->head_begin > lb ? d->head_begin : lb, he = d->head_end < le ? d->head_end : le;
    if (hb >= he)
        REFUSE(SPEED_ERR_PEER_PROTOCOL,
               "heads [%d, %d) of %d, the local cache holds [%d, %d): the head ranges do not overlap, nothing to send",
               d->head_begin, d->head_end, lm, lb, le);
    const bool strided = d->head_begin != lb || d->head_end != le;
    if ((int)d->n_layers != L) REFUSE(SPEED_ERR_PEER_PROTOCOL, "%u layers, local %d", d->n_layers, L);
    if (!strided && d->unit_bytes != speed_kv_cache_unit_bytes(cache))
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "unit of %llu bytes, local %zu", (unsigned long long)d->unit_bytes,
               speed_kv_cache_unit_bytes(cache));
    /* what this sender puts per entry: K and V of the common heads (token_bytes when not strided) */
    const size_t head_bytes = (size_t)l0.head_dim * speed_dtype_size(l0.dtype);
    const size_t put_token_bytes = 2 * (size_t)(he - hb) * head_bytes;
    uint64_t total = 0, desc_total = 0;
    for (int l = 0; l < L; l++) {
        int64_t want = l < C ? n_full : n_compact;
        if (d->layers[l].entries != want)
            REFUSE(SPEED_ERR_PEER_PROTOCOL, "layer %d: %lld entries, the local sequence has %lld (depth C %d)", l,
                   (long long)d->layers[l].entries, (long long)want, C);
        if (want > speed_kv_seq_capacity(seq, l))
            REFUSE(SPEED_ERR_INVALID_ARGUMENT, "layer %d: %lld entries past the local room %lld", l, (long long)want,
                   (long long)speed_kv_seq_capacity(seq, l));
        total += (uint64_t)want * put_token_bytes;
        desc_total += (uint64_t)want * (uint64_t)d->n_kv_heads * 2 * head_bytes;
    }
    if (d->total_bytes != desc_total) /* desc_check verified it against the descriptor's shape */
        REFUSE(SPEED_ERR_PEER_PROTOCOL, "total of %llu bytes, local %llu", (unsigned long long)d->total_bytes,
               (unsigned long long)desc_total);
    if (d->lease_deadline_ms && realtime_ms() >= d->lease_deadline_ms)
        REFUSE(SPEED_ERR_TIMEOUT, "the lease deadline passed %llu ms ago",
               (unsigned long long)(realtime_ms() - d->lease_deadline_ms));

    x = speed_calloc(1, sizeof *x);
    if (!x) REFUSE(SPEED_ERR_NO_MEMORY, "out of memory");
    x->ctx = c;
    x->cache = cache;
    x->seq = seq;
    x->n_layers = L;
    x->block_tokens = B;
    x->token_bytes = token_bytes;
    x->half_unit = speed_kv_cache_unit_bytes(cache) / 2;
    x->strided = strided;
    x->run = (size_t)(he - hb) * head_bytes;
    x->l_slot = (size_t)l0.n_kv_heads * head_bytes;
    x->l_head_off = (size_t)(hb - lb) * head_bytes;
    x->r_slot = (size_t)d->n_kv_heads * head_bytes;
    x->r_head_off = (size_t)(hb - d->head_begin) * head_bytes;
    x->r_half = (size_t)B * x->r_slot;
    x->total_bytes = total;
    x->lease_deadline_ms = d->lease_deadline_ms;
    x->t_create = now_ns();
    if (request_id) snprintf(x->request_id, sizeof x->request_id, "%s", request_id);
    x->layers = speed_calloc((size_t)L, sizeof *x->layers);
    x->pools = speed_calloc(d->n_pools, sizeof *x->pools);
    if (!x->layers || !x->pools) REFUSE(SPEED_ERR_NO_MEMORY, "out of memory");
    x->n_pools = d->n_pools;
    for (uint32_t p = 0; p < d->n_pools; p++) {
        x->pools[p].base = d->pools[p].base;
        x->pools[p].stride = d->pools[p].block_stride;
        x->pools[p].n_blocks = d->pools[p].n_blocks;
        x->pools[p].table = speed_malloc((size_t)(d->pools[p].n_blocks ? d->pools[p].n_blocks : 1) * sizeof(int32_t));
        if (!x->pools[p].table) REFUSE(SPEED_ERR_NO_MEMORY, "out of memory");
        if (d->pools[p].n_blocks) memcpy(x->pools[p].table, d->pools[p].table, d->pools[p].n_blocks * sizeof(int32_t));
    }
    for (int l = 0; l < L; l++) {
        x->layers[l].pool = d->layers[l].pool;
        x->layers[l].offset = d->layers[l].offset;
        x->layers[l].entries = d->layers[l].entries;
        if (x->layers[l].entries == 0) {
            x->layers[l].done = true;
            x->n_layers_done++;
        }
    }
    pthread_mutex_lock(&c->mu);
    for (int p = 0; p < SPEED_KV_POOL_COUNT; p++) {
        kv_region_t *r = region_find(c, cache, (speed_kv_pool_t)p);
        x->lmemh[p] = r ? r->memh : NULL;
    }
    pthread_mutex_unlock(&c->mu);
    for (int l = 0; l < L; l++)
        if (!x->lmemh[speed_kv_cache_layer_pool(cache, l)])
            REFUSE(SPEED_ERR_INVALID_ARGUMENT, "the local cache is not registered (speed_kv_xfer_ctx_register_cache)");

    /* connect: endpoint and rkeys */
    st = ep_get(c, d->worker_addr, d->worker_addr_len, d->transport, request_id, &x->ep);
    if (st != SPEED_OK) {
        pthread_mutex_lock(&c->mu);
        c->stats.n_failed[SPEED_KV_STAGE_CONNECT]++;
        pthread_mutex_unlock(&c->mu);
        xfer_free(x);
        return st;
    }
    for (uint32_t p = 0; p < d->n_pools; p++) {
        const speed_kv_desc_region_t *g = &d->regions[d->pools[p].region];
        ucs_status_t s = ucp_ep_rkey_unpack(x->ep->ep, g->rkey, &x->pools[p].rkey);
        if (s != UCS_OK) {
            x->pools[p].rkey = NULL;
            speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, request_id, "kv transfer: rkey of region %u does not unpack: %s",
                      d->pools[p].region, ucs_status_string(s));
            pthread_mutex_lock(&c->mu);
            c->stats.n_failed[SPEED_KV_STAGE_CONNECT]++;
            x->ep->refs--;
            x->ep->live--;
            pthread_mutex_unlock(&c->mu);
            xfer_free(x);
            return SPEED_ERR_PEER_PROTOCOL;
        }
    }
    x->msg = (notify_msg_t){.magic = MSG_MAGIC,
                            .version = MSG_VERSION,
                            .cookie = d->cookie,
                            .bytes = total,
                            .epoch = d->epoch,
                            .head_begin = hb,
                            .head_end = he};
    snprintf(x->msg.request_id, sizeof x->msg.request_id, "%s", x->request_id);
    x->state = SPEED_KV_XFER_PUSHING;
    pthread_mutex_lock(&c->mu);
    x->token = x->msg.token = c->next_token++;
    x->next = c->xfers;
    if (c->xfers) c->xfers->prev = x;
    c->xfers = x;
    c->stats.n_started++;
    pthread_mutex_unlock(&c->mu);
    speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, request_id, "kv transfer: %s, %llu bytes in %d layers, heads [%d, %d)%s",
              speed_kv_transport_name(d->transport), (unsigned long long)total, L, hb, he,
              strided ? " (strided: the head ranges differ)" : "");
    *xfer_p = x;
    return SPEED_OK;
refuse:
    pthread_mutex_lock(&c->mu);
    c->stats.n_refused++;
    pthread_mutex_unlock(&c->mu);
    if (x) xfer_free(x);
    return st;
}

speed_status_t speed_kv_xfer_create_engine(speed_kv_xfer_ctx_t *c, const speed_kv_desc_t *d, speed_engine_t *engine,
                                           speed_seq_id_t seq, const char *request_id, speed_kv_xfer_t **xfer_p) {
    if (!engine) {
        SPEED_ERROR(SPEED_SUBSYS_NET, "kv transfer: NULL engine");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_kv_seq_t *kv;
    int64_t n_full, n_compact;
    SPEED_CHECK(engine_seq_entries(engine, seq, &kv, &n_full, &n_compact));
    return speed_kv_xfer_create(c, d, speed_engine_kv_cache(engine), kv, n_full, n_compact, request_id, xfer_p);
}

/* One put; false on an immediate error (*err set). */
static bool put_one(speed_kv_xfer_t *x, ucp_ep_h ep, const void *src, size_t len, uint64_t raddr, ucp_rkey_h rkey,
                    ucp_mem_h memh, ucs_status_t *err) {
    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH,
        .cb.send = put_cb,
        .user_data = x,
        .memh = memh,
    };
    atomic_fetch_add(&x->puts_pending, 1);
    ucs_status_ptr_t r = ucp_put_nbx(ep, src, len, raddr, rkey, &prm);
    if (UCS_PTR_IS_PTR(r)) return true;
    atomic_fetch_sub(&x->puts_pending, 1);
    if (UCS_PTR_IS_ERR(r)) {
        *err = UCS_PTR_STATUS(r);
        return false;
    }
    return true;
}

speed_status_t speed_kv_xfer_push_layer(speed_kv_xfer_t *x, int layer, int64_t n_done, int64_t n_total) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    if (ended(x)) {
        speed_status_t st = x->status;
        pthread_mutex_unlock(&c->mu);
        return st;
    }
    const char *bad = NULL;
    if (x->state != SPEED_KV_XFER_PUSHING) bad = "push after finish";
    else if (layer < 0 || layer >= x->n_layers) bad = "layer out of range";
    else if (n_total != x->layers[layer].entries) bad = "n_total differs from the descriptor's entries";
    else if (n_done < 0 || n_done > n_total) bad = "n_done out of [0, n_total]";
    if (bad) {
        pthread_mutex_unlock(&c->mu);
        speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x), "kv transfer: %s (layer %d, %lld of %lld)", bad, layer,
                  (long long)n_done, (long long)n_total);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (x->lease_deadline_ms && realtime_ms() >= x->lease_deadline_ms) {
        fail_locked(x, SPEED_ERR_TIMEOUT, SPEED_KV_STAGE_PUT, "the lease deadline passed during the transfer");
        pthread_mutex_unlock(&c->mu);
        return SPEED_ERR_TIMEOUT;
    }
    xfer_layer_t *ly = &x->layers[layer];
    const int64_t B = x->block_tokens;
    int64_t to = n_done == n_total ? div_up(n_total, B) : n_done / B;
    int64_t from = ly->sent_blocks;
    if (to <= from) {
        pthread_mutex_unlock(&c->mu);
        return SPEED_OK;
    }
    x->ep->in_use++;
    ucp_ep_h ep = x->ep->ep;
    pthread_mutex_unlock(&c->mu);

    const xfer_pool_t *pl = &x->pools[ly->pool];
    ucp_mem_h memh = x->lmemh[speed_kv_cache_layer_pool(x->cache, layer)];
    uint64_t bytes = 0, n_puts = 0;
    ucs_status_t err = UCS_OK;
    bool ok = true;
    /* Host mirror (GPU pools): copy these blocks' units of the layer pool -> mirror first, on
     * this (the engine's) thread; the puts then read the mirror. Earlier layers' puts keep
     * running on the progress thread meanwhile: they read other units of the mirror. */
    speed_status_t stage_st = SPEED_OK;
    if (speed_kv_cache_host_mirror(x->cache)) {
        stage_st = speed_kv_cache_stage_out(x->cache, x->seq, layer, from, to);
        ok = stage_st == SPEED_OK;
    }
    int64_t i = from;
    for (; ok && i < to; i++) {
        void *src;
        size_t unit;
        if (speed_kv_cache_xfer_block_addr(x->cache, x->seq, layer, i, &src, &unit) != SPEED_OK) {
            err = UCS_ERR_INVALID_PARAM;
            ok = false;
            break;
        }
        uint64_t raddr = pl->base + (uint64_t)pl->table[i] * pl->stride + ly->offset;
        int64_t n = n_total - i * B < B ? n_total - i * B : B;
        if (x->strided) {
            /* UCX 1.13 puts are contiguous on both sides: one run per slot for K, one for V */
            const char *k = (const char *)src + x->l_head_off, *v = k + x->half_unit;
            uint64_t rk = raddr + x->r_head_off, rv = rk + x->r_half;
            for (int64_t s = 0; ok && s < n; s++)
                ok = put_one(x, ep, k + (size_t)s * x->l_slot, x->run, rk + (uint64_t)s * x->r_slot, pl->rkey, memh,
                             &err) &&
                     put_one(x, ep, v + (size_t)s * x->l_slot, x->run, rv + (uint64_t)s * x->r_slot, pl->rkey, memh,
                             &err);
            bytes += 2 * (uint64_t)n * x->run;
            n_puts += 2 * (uint64_t)n;
        } else if (n == B) {
            ok = put_one(x, ep, src, unit, raddr, pl->rkey, memh, &err);
            bytes += unit;
            n_puts++;
        } else { /* partial last block: K rows, then V rows */
            size_t half = (size_t)n * x->token_bytes / 2;
            ok = put_one(x, ep, src, half, raddr, pl->rkey, memh, &err) &&
                 put_one(x, ep, (char *)src + x->half_unit, half, raddr + x->half_unit, pl->rkey, memh, &err);
            bytes += 2 * half;
            n_puts += 2;
        }
    }
    ucp_worker_signal(c->worker);

    pthread_mutex_lock(&c->mu);
    x->ep->in_use--;
    x->bytes_put += bytes;
    x->n_puts += n_puts;
    c->stats.bytes_put += bytes;
    x->t_push = now_ns();
    speed_status_t st = SPEED_OK;
    if (stage_st != SPEED_OK) {
        fail_locked(x, stage_st, SPEED_KV_STAGE_PUT, "copying the layer's blocks to the host mirror failed");
        st = x->status;
    } else if (!ok) {
        fail_locked(x, err == UCS_ERR_INVALID_PARAM ? SPEED_ERR_INTERNAL : op_status(x->ep, err), SPEED_KV_STAGE_PUT,
                    ucs_status_string(err));
        st = x->status;
    } else {
        ly->sent_blocks = to;
        if (n_done == n_total && !ly->done) {
            ly->done = true;
            x->n_layers_done++;
        }
        if (ended(x)) st = x->status; /* a put callback or the peer failed meanwhile */
    }
    pthread_mutex_unlock(&c->mu);
    return st;
}

speed_status_t speed_kv_xfer_push_all(speed_kv_xfer_t *x) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    for (int l = 0; l < x->n_layers; l++) {
        int64_t e = x->layers[l].entries;
        SPEED_CHECK(speed_kv_xfer_push_layer(x, l, e, e));
    }
    return SPEED_OK;
}

speed_status_t speed_kv_xfer_finish(speed_kv_xfer_t *x) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    if (ended(x)) {
        speed_status_t st = x->status;
        pthread_mutex_unlock(&c->mu);
        return st;
    }
    if (x->state != SPEED_KV_XFER_PUSHING || x->n_layers_done != x->n_layers) {
        int l = 0;
        while (l < x->n_layers && x->layers[l].done) l++;
        pthread_mutex_unlock(&c->mu);
        if (l < x->n_layers)
            speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x), "kv transfer: finish with layer %d incomplete", l);
        else
            speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, rid(x), "kv transfer: finish called twice");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    x->state = SPEED_KV_XFER_FLUSHING;
    x->t_finish = now_ns();
    x->deadline_ns = x->t_finish + (uint64_t)c->p.op_timeout_ms * 1000000ull;
    x->pending++;
    x->ep->in_use++;
    ucp_ep_h ep = x->ep->ep;
    pthread_mutex_unlock(&c->mu);

    ucp_request_param_t prm = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.send = flush_cb,
        .user_data = x,
    };
    ucs_status_ptr_t r = ucp_ep_flush_nbx(ep, &prm);
    if (!UCS_PTR_IS_PTR(r)) flush_done(x, UCS_PTR_STATUS(r)); /* completed (or failed) at once */
    ucp_worker_signal(c->worker);
    pthread_mutex_lock(&c->mu);
    x->ep->in_use--;
    speed_status_t st = ended(x) && x->status != SPEED_OK ? x->status : SPEED_OK;
    pthread_mutex_unlock(&c->mu);
    return st;
}

speed_status_t speed_kv_xfer_wait(speed_kv_xfer_t *x, int timeout_ms) {
    if (!x) return SPEED_ERR_INVALID_ARGUMENT;
    speed_kv_xfer_ctx_t *c = x->ctx;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    if (timeout_ms >= 0) {
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&c->mu);
    while (!ended(x)) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&c->cv, &c->mu);
        } else if (pthread_cond_timedwait(&c->cv, &c->mu, &until) == ETIMEDOUT) {
            break;
        }
    }
    speed_status_t st = ended(x) ? x->status : SPEED_ERR_TIMEOUT;
    pthread_mutex_unlock(&c->mu);
    return st;
}

speed_kv_xfer_state_t speed_kv_xfer_poll(speed_kv_xfer_t *x, speed_status_t *status_p) {
    pthread_mutex_lock(&x->ctx->mu);
    speed_kv_xfer_state_t s = x->state;
    if (status_p) *status_p = ended(x) ? x->status : SPEED_OK;
    pthread_mutex_unlock(&x->ctx->mu);
    return s;
}

void speed_kv_xfer_cancel(speed_kv_xfer_t *x) {
    if (!x) return;
    pthread_mutex_lock(&x->ctx->mu);
    fail_locked(x, SPEED_ERR_CANCELLED, SPEED_KV_STAGE_PUT, "cancelled");
    pthread_mutex_unlock(&x->ctx->mu);
}

void speed_kv_xfer_info(speed_kv_xfer_t *x, speed_kv_xfer_info_t *info_p) {
    pthread_mutex_lock(&x->ctx->mu);
    *info_p = (speed_kv_xfer_info_t){
        .state = x->state,
        .status = ended(x) ? x->status : SPEED_OK,
        .failed_stage = x->failed_stage,
        .bytes_put = x->bytes_put,
        .n_puts = x->n_puts,
        .total_bytes = x->total_bytes,
        .push_ns = x->t_push ? x->t_push - x->t_create : 0,
        .finish_ns = x->t_finish && x->t_end ? x->t_end - x->t_finish : 0,
        .total_ns = x->t_end ? x->t_end - x->t_create : 0,
    };
    pthread_mutex_unlock(&x->ctx->mu);
}

void speed_kv_xfer_destroy(speed_kv_xfer_t *x) {
    if (!x) return;
    speed_kv_xfer_ctx_t *c = x->ctx;
    pthread_mutex_lock(&c->mu);
    fail_locked(x, SPEED_ERR_CANCELLED, SPEED_KV_STAGE_PUT, "destroyed while running");
    x->orphan = true; /* the progress thread frees it once no UCX request refers to it */
    pthread_mutex_unlock(&c->mu);
    ucp_worker_signal(c->worker);
}
