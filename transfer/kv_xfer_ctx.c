/* UCX KV transfer, the context (kv_transfer.h): the UCP context and its worker, the progress
 * thread that drives the worker and enforces deadlines, the active-message callbacks (a decode
 * node receiving KV writes and notifies, a prefill node receiving acks), registration of KV
 * caches, and the endpoint cache. Transfers themselves are in kv_xfer.c, descriptors in
 * kv_desc.c; the shared structures, the locking and the lifetimes are described in
 * kv_transfer_internal.h.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <ucp/api/ucp.h>

#include "alloc.h"
#include "kv_transfer.h"
#include "kv_transfer_internal.h"
#include "log.h"

/* ---- callbacks: endpoint errors, notifies, acks (progress thread, UCX worker lock held) ------ */

static void ep_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status) {
    (void)ep;
    kv_ep_t *e = arg;
    speed_kv_xfer_ctx_t *c = e->ctx;
    pthread_mutex_lock(&c->mu);
    e->failed = true;
    if (!c->closing) {
        c->stats.n_peer_failures++;
        SPEED_WARN(SPEED_SUBSYS_NET, "kv transfer: %s endpoint to a peer failed: %s",
                   speed_kv_transport_name(e->transport), ucs_status_string(status));
    }
    for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) {
        if (x->ep != e || ended(x)) continue;
        speed_kv_stage_t stage = x->state == SPEED_KV_XFER_PUSHING    ? SPEED_KV_STAGE_PUT
                                 : x->state == SPEED_KV_XFER_FLUSHING ? SPEED_KV_STAGE_FLUSH
                                                                      : SPEED_KV_STAGE_NOTIFY;
        speed_kv_xfer_fail_locked(x, SPEED_ERR_PEER_UNREACHABLE, stage, "the peer is gone");
    }
    pthread_mutex_unlock(&c->mu);
}

static void ack_unlink(speed_kv_xfer_ctx_t *c, ack_buf_t *a) {
    pthread_mutex_lock(&c->mu);
    if (a->prev)
        a->prev->next = a->next;
    else
        c->acks = a->next;
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

/* ---- message decoding (what a peer sent: untrusted) ------------------------------------------ */

bool speed_kv_ack_decode(const void *data, size_t length, ack_msg_t *a_p) {
    ack_msg_t a;
    if (length != sizeof a || !data) return false;
    memcpy(&a, data, sizeof a);
    if (a.magic != MSG_MAGIC) return false;
    if (a.status != SPEED_OK && strcmp(speed_status_string((speed_status_t)a.status), "unknown status") == 0)
        a.status = SPEED_ERR_PEER_PROTOCOL;
    *a_p = a;
    return true;
}

static ucs_status_t notify_handler(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                   const ucp_am_recv_param_t *param) {
    (void)header;
    (void)header_length;
    speed_kv_xfer_ctx_t *c = arg;
    speed_status_t st = SPEED_OK;
    speed_kv_notify_wire_t m;
    const char *why = NULL;
    bool aborted = false, integrity_failed = false;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
        SPEED_WARN(SPEED_SUBSYS_NET, "kv transfer: notify of %zu bytes sent by rendezvous rejected", length);
        memset(&m, 0, sizeof m);
        st = SPEED_ERR_PEER_PROTOCOL;
    } else if (speed_kv_notify_decode(data, length, &m, &why) != SPEED_OK) {
        SPEED_WARN(SPEED_SUBSYS_NET, "kv transfer: malformed notify of %zu bytes rejected: %s", length, why);
        st = SPEED_ERR_PEER_PROTOCOL;
    } else {
        const char *r = m.request_id[0] ? m.request_id : NULL;
        aborted = (m.flags & SPEED_KV_NOTIFY_FLAG_ABORT) != 0;
        if (m.epoch != c->epoch) {
            speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, r,
                      "kv transfer: notify for epoch %llu rejected: this node's epoch is %llu (stale descriptor)",
                      (unsigned long long)m.epoch, (unsigned long long)c->epoch);
            st = SPEED_ERR_PEER_PROTOCOL;
        } else {
            /* the nonce (and, in integrity mode, the tags): before anything else sees the notify */
            st = speed_kv_grant_check(c, &m);
            if (st == SPEED_ERR_NOT_FOUND && !c->p.require_grant) st = SPEED_OK; /* no grant asked for */
            if (st == SPEED_ERR_NOT_FOUND)
                speed_log(SPEED_LOG_WARN, SPEED_SUBSYS_NET, r, "kv transfer: notify refused: no reservation grant");
            integrity_failed = st == SPEED_ERR_TRANSFER;
            if (st == SPEED_ERR_NOT_FOUND || st == SPEED_ERR_PEER_PROTOCOL) {
                pthread_mutex_lock(&c->mu);
                c->stats.n_nonce_rejected++;
                pthread_mutex_unlock(&c->mu);
            }
        }
        if ((st == SPEED_OK || integrity_failed) && c->p.notify_cb) {
            speed_kv_notify_t note = {.request_id = m.request_id,
                                      .cookie = m.cookie,
                                      .bytes = m.bytes,
                                      .epoch = m.epoch,
                                      .head_begin = m.head_begin,
                                      .head_end = m.head_end,
                                      .aborted = aborted,
                                      .integrity_failed = integrity_failed};
            speed_status_t cst = c->p.notify_cb(c->p.notify_user, &note);
            if (st == SPEED_OK) st = cst;
        }
    }
    pthread_mutex_lock(&c->mu);
    if (st == SPEED_OK && aborted) {
        c->stats.n_aborts_received++;
    } else if (st == SPEED_OK) {
        c->stats.n_notified++;
        c->stats.bytes_notified += m.bytes;
    } else {
        c->stats.n_notify_rejected++;
    }
    pthread_mutex_unlock(&c->mu);
    uint64_t token = m.token;
    memset(&m, 0, sizeof m); /* the nonce */
    if (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ack_send(c, param->reply_ep, token, st);
    return UCS_OK;
}

/* A KV write (AM_ID_WRITE): checked against its grant, copied or dropped (kv_grant.c). The
 * sender forces eager; a rendezvous write is dropped unread like a malformed one. */
static ucs_status_t write_handler(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                  const ucp_am_recv_param_t *param) {
    speed_kv_xfer_ctx_t *c = arg;
    write_hdr_t h;
    bool ok = !(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) && header && header_length == sizeof h && data;
    if (ok) {
        memcpy(&h, header, sizeof h);
        ok = h.magic == WRITE_MAGIC && memchr(h.request_id, '\0', sizeof h.request_id) != NULL;
    }
    speed_kv_grant_write(c, ok ? &h : NULL, data, length);
    memset(&h, 0, sizeof h); /* the nonce */
    return UCS_OK;
}

static ucs_status_t ack_handler(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                const ucp_am_recv_param_t *param) {
    (void)header;
    (void)header_length;
    speed_kv_xfer_ctx_t *c = arg;
    ack_msg_t a;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || !speed_kv_ack_decode(data, length, &a)) return UCS_OK;
    pthread_mutex_lock(&c->mu);
    for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) {
        if (x->token != a.token) continue;
        if (x->state != SPEED_KV_XFER_NOTIFYING) break; /* ended meanwhile (timeout, cancel) */
        if (a.status == SPEED_OK) {
            speed_kv_xfer_done_locked(x);
        } else {
            speed_kv_xfer_fail_locked(x, (speed_status_t)a.status, SPEED_KV_STAGE_NOTIFY,
                                      "the decode node refused the notify");
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
        if (ucp_request_check_status(r) == UCS_INPROGRESS)
            c->close_reqs[k++] = r;
        else
            ucp_request_free(r);
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

/* Deadlines, failed endpoints, orphans. Progress thread only (or ctx_destroy after the join).
 * Returns the ms until the next deadline (capped). */
static int maintenance(speed_kv_xfer_ctx_t *c) {
    enum { MAX_BATCH = 32 };
    ucp_ep_h to_close[MAX_BATCH];
    kv_ep_t *to_free_ep[MAX_BATCH];
    speed_kv_xfer_t *to_free[MAX_BATCH];
    int n_close = 0, n_free_ep = 0, n_free = 0;
    uint64_t now = speed_clock_mono_ns(), next = now + 100000000ull;
    pthread_mutex_lock(&c->mu);
    for (speed_kv_xfer_t *x = c->xfers, *nx; x; x = nx) {
        nx = x->next;
        if (x->state == SPEED_KV_XFER_FLUSHING || x->state == SPEED_KV_XFER_NOTIFYING) {
            if (now >= x->deadline_ns) {
                bool flushing = x->state == SPEED_KV_XFER_FLUSHING;
                /* the peer does not answer: do not hand its endpoint out again */
                x->ep->failed = true;
                speed_kv_xfer_fail_locked(x, flushing ? SPEED_ERR_TRANSFER : SPEED_ERR_PEER_UNREACHABLE,
                                          flushing ? SPEED_KV_STAGE_FLUSH : SPEED_KV_STAGE_NOTIFY,
                                          flushing ? "the flush did not complete in time" : "no ack in time");
            } else if (x->deadline_ns < next) {
                next = x->deadline_ns;
            }
        }
        if (x->orphan && x->pending == 0 && atomic_load(&x->puts_pending) == 0 && n_free < MAX_BATCH) {
            if (x->prev)
                x->prev->next = x->next;
            else
                c->xfers = x->next;
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
    for (int i = 0; i < n_free; i++) speed_kv_xfer_free(to_free[i]);
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
            speed_clock_sleep_ms(1);
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
        /* wall-clock ns and the pid: a restarted node announces a new epoch */
        struct timespec ts = speed_clock_now(CLOCK_REALTIME);
        c->epoch = ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 40);
        if (!c->epoch) c->epoch = 1;
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->ep_mu, NULL);
    speed_clock_cond_init(&c->cv); /* speed_kv_xfer_wait's deadlines survive a wall-clock step */

    speed_status_t st = SPEED_ERR_IO;
    ucp_config_t *cfg = NULL;
    ucs_status_t s = ucp_config_read(NULL, NULL, &cfg);
    if (s != UCS_OK) {
        st = ucx_fail("ucp_config_read", s);
        goto fail;
    }
    /* Binding: the transports and devices this context may use, whatever the environment says
     * (shm: shared memory and loopback only, so no TCP socket is ever opened). */
    if (params->tls && (s = ucp_config_modify(cfg, "TLS", params->tls)) != UCS_OK) {
        ucp_config_release(cfg);
        st = ucx_fail("UCX_TLS", s);
        goto fail;
    }
    if (params->net_devices && (s = ucp_config_modify(cfg, "NET_DEVICES", params->net_devices)) != UCS_OK) {
        ucp_config_release(cfg);
        st = ucx_fail("UCX_NET_DEVICES", s);
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
        SPEED_ERROR(SPEED_SUBSYS_NET,
                    "kv transfer: this UCX has no multi-threaded workers (built without --enable-mt)");
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
    hp.id = AM_ID_WRITE;
    hp.cb = write_handler;
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

speed_status_t speed_kv_xfer_ctx_transports(speed_kv_xfer_ctx_t *c, char *buf, size_t size) {
    if (!c || !buf || size == 0) return SPEED_ERR_INVALID_ARGUMENT;
    buf[0] = '\0';
    char *text = NULL;
    size_t text_len = 0;
    FILE *f = open_memstream(&text, &text_len);
    if (!f) return SPEED_ERR_NO_MEMORY;
    ucp_context_print_info(c->ucp, f);
    fclose(f);
    /* lines "#     resource 3  :  md 2  dev 0  flags -- tcp/lo": collect the transport names */
    size_t used = 0;
    bool fit = true;
    for (char *line = text, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = '\0';
        char *tl = strstr(line, "resource") ? strstr(line, "-- ") : NULL;
        if (!tl) continue;
        tl += 3;
        size_t n = strcspn(tl, "/ ");
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)(n < 63 ? n : 63), tl);
        char key[66];
        snprintf(key, sizeof key, ",%s,", name);
        char have[1024];
        snprintf(have, sizeof have, ",%s,", buf);
        if (strstr(have, key)) continue;
        int w = snprintf(buf + used, size - used, "%s%s", used ? "," : "", name);
        if (w < 0 || (size_t)w >= size - used) {
            fit = false;
            break;
        }
        used += (size_t)w;
    }
    free(text); /* open_memstream's buffer comes from malloc */
    return fit ? SPEED_OK : SPEED_ERR_TOO_LONG;
}

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
        speed_kv_xfer_free(x);
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
    speed_kv_grant_free_all(c);
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
        speed_kv_xfer_fail_locked(x, SPEED_ERR_CANCELLED, SPEED_KV_STAGE_PUT, "context destroyed");
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
    uint64_t deadline = speed_clock_mono_ns() + (uint64_t)c->p.op_timeout_ms * 1000000ull;
    for (;;) {
        ucp_worker_progress(c->worker);
        reap_close_reqs(c);
        /* Requests on an endpoint that failed in mode NONE (a dead shm peer) are never completed
         * by UCX 1.13, not even by a forced close: do not wait for those. */
        bool busy = c->n_close_reqs > 0 || c->acks != NULL;
        for (speed_kv_xfer_t *x = c->xfers; x && !busy; x = x->next)
            if ((x->pending || atomic_load(&x->puts_pending)) && !x->ep->failed) busy = true;
        if (!busy) break;
        if (speed_clock_mono_ns() > deadline) {
            int n_x = 0;
            for (speed_kv_xfer_t *x = c->xfers; x; x = x->next) {
                n_x += x->pending || atomic_load(&x->puts_pending);
                if (x->pending || atomic_load(&x->puts_pending))
                    speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_NET, rid(x),
                              "kv transfer: %d requests, %d puts pending at teardown", x->pending,
                              atomic_load(&x->puts_pending));
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

kv_region_t *speed_kv_xfer_ctx_region_find(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache, speed_kv_pool_t p) {
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
        bool have = speed_kv_xfer_ctx_region_find(c, cache, (speed_kv_pool_t)p) != NULL;
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
        if (s == UCS_OK)
            s = ucp_rkey_pack(c->ucp, r->memh, &r->rkey, &r->rkey_len);
        else
            r->memh = NULL;
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
                    speed_kv_cache_host_mirror(cache) ? "'s host mirror"
                    : device                          ? " (device memory)"
                                                      : "",
                    len, r->rkey_len);
    }
    return SPEED_OK;
}

void speed_kv_xfer_ctx_deregister_cache(speed_kv_xfer_ctx_t *c, const speed_kv_cache_t *cache) {
    if (!c) return;
    speed_kv_grant_drop_cache(c, cache); /* first: no write may be copied into the cache after this */
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

/* ---- endpoints ---------------------------------------------------------------------------------- */

speed_status_t speed_kv_xfer_ctx_ep_get(speed_kv_xfer_ctx_t *c, const uint8_t *addr, size_t addr_len,
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
        .field_mask =
            UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER,
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
