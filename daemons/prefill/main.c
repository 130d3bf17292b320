/* speed-prefill: the prefill node. Prefill runs a prompt's shallow prefill (layers < C for
 * shallow tokens; anchors and tail at full depth) and pushes each layer's KV blocks into the
 * decode node's reserved blocks with UCX puts as soon as the layer is computed; after a flush
 * and the decode node's ack it returns the first token. See prefill-node/README.md.
 *
 *   speed-prefill --config CLUSTER.yaml [--node.index I] [--model DIR] [options]
 */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "clock.h"
#include "log.h"
#include "node.h"

typedef struct pf {
    speed_node_t *node;
    speed_rpc_call_t *call;
    char id[SPEED_BATCH_ID_MAX + 1];
    Speed__V1__PrefillRequest *req;
    speed_kv_desc_t *desc;
    speed_kv_xfer_t *xfer; /* created at the first layer callback (engine thread) */
    int64_t n_full, n_compact;
    speed_batch_token_t first;
    char first_text[256];
    bool have_first;
    int n_top;
    bool logprobs;
    speed_batch_finish_t finish;
    speed_status_t status;
    double prefill_ms;
    bool submitted;
    bool xfer_failed; /* the layer callback's transfer step failed (engine thread, before finish) */
    /* Set by Prefill.Cancel or by the router cancelling the call (its request timed out or its
     * client left); the layer callback checks it before each layer's puts and stops the
     * transfer, whose abort notify then lifts the decode node's fence. */
    atomic_bool cancelled;
    atomic_bool finished; /* the finish event came: the blocks are the transfer's until it ends */
    struct pf *next;      /* in the live list */
} pf_t;

static speed_node_t g_node;
static pthread_mutex_t g_live_mu = PTHREAD_MUTEX_INITIALIZER;
static pf_t *g_live;

static void live_add(pf_t *p) {
    pthread_mutex_lock(&g_live_mu);
    p->next = g_live;
    g_live = p;
    pthread_mutex_unlock(&g_live_mu);
}

static void live_remove(pf_t *p) {
    pthread_mutex_lock(&g_live_mu);
    for (pf_t **pp = &g_live; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    pthread_mutex_unlock(&g_live_mu);
}

static void pf_free(pf_t *p) {
    speed_kv_xfer_destroy(p->xfer);
    speed_kv_desc_destroy(p->desc);
    if (p->req) speed_proto_free(&p->req->base);
    speed_free(p);
}

static void xfer_metrics(speed_node_t *n, pf_t *p, speed_kv_xfer_info_t *info) {
    speed_kv_xfer_info(p->xfer, info);
    speed_counter_add(n->m_xfer_bytes, (double)info->bytes_put);
    if (info->state == SPEED_KV_XFER_DONE) {
        speed_histogram_observe(n->m_xfer_seconds, (double)info->total_ns / 1e9);
        speed_histogram_observe(n->m_xfer_exposed, (double)info->finish_ns / 1e9);
    }
    if (info->state == SPEED_KV_XFER_FAILED && info->status != SPEED_ERR_CANCELLED) {
        speed_counter_t *c;
        const char *lbl[] = {speed_kv_stage_name(info->failed_stage)};
        if (speed_counter_labels(n->m_xfer_failures, lbl, &c) == SPEED_OK) speed_counter_inc(c);
    }
}

/* After the finish event: flush + notify, reply, release the held KV. */
static void complete_work(void *arg) {
    pf_t *p = arg;
    speed_node_t *n = p->node;
    speed_status_t st = p->status;
    char err[300] = "";
    if (atomic_load(&p->cancelled) && st == SPEED_OK) {
        st = SPEED_ERR_CANCELLED;
        snprintf(err, sizeof err, "prefill cancelled");
    } else if (p->finish != SPEED_BATCH_STOP && p->finish != SPEED_BATCH_LENGTH) {
        if (st == SPEED_OK) st = SPEED_ERR_CANCELLED;
        if (p->xfer_failed && st != SPEED_ERR_CANCELLED && st != SPEED_ERR_NO_MEMORY) {
            /* as below: the decode side or the link failed, not this node */
            snprintf(err, sizeof err, "KV transfer failed: %s", speed_status_string(st));
            st = SPEED_ERR_TRANSFER;
        } else {
            snprintf(err, sizeof err, "prefill %s: %s", speed_batch_finish_name(p->finish), speed_status_string(st));
        }
    } else if (!p->xfer) {
        st = SPEED_ERR_INTERNAL;
        snprintf(err, sizeof err, "prefill finished without shipping any KV");
    } else {
        st = speed_kv_xfer_finish(p->xfer);
        if (st == SPEED_OK) st = speed_kv_xfer_wait(p->xfer, -1);
        if (st != SPEED_OK) {
            snprintf(err, sizeof err, "KV transfer failed: %s", speed_status_string(st));
            /* A transfer that timed out or was refused failed on the decode side or the link,
             * not here: ABORTED, so the router retries without taking this node out (a
             * DEADLINE_EXCEEDED for a frozen decode node took out every prefill node with a
             * transfer to it). */
            if (st != SPEED_ERR_CANCELLED && st != SPEED_ERR_NO_MEMORY) st = SPEED_ERR_TRANSFER;
        }
    }
    speed_kv_xfer_info_t info = {0};
    bool cancelled = atomic_load(&p->cancelled);
    if (p->xfer) {
        /* Cancelled (the request is over): the abort lifts the decode node's fence. Any other
         * failure: plain cancel, the router may retry the same reservation elsewhere. */
        if (st != SPEED_OK && cancelled)
            speed_kv_xfer_abort(p->xfer);
        else if (st != SPEED_OK)
            speed_kv_xfer_cancel(p->xfer);
        xfer_metrics(n, p, &info);
    } else if (cancelled && p->desc) {
        speed_kv_xfer_ctx_abort_desc(n->xfer, p->desc, p->id); /* cancelled before any put */
    }
    if (st == SPEED_OK) {
        Speed__V1__PrefillReply reply = SPEED__V1__PREFILL_REPLY__INIT;
        Speed__V1__Token tok;
        Speed__V1__TopLogprob storage[SPEED_SAMPLER_MAX_TOP_LOGPROBS], *ptrs[SPEED_SAMPLER_MAX_TOP_LOGPROBS];
        speed_node_token_to_proto(&p->first, p->n_top, &tok, storage, ptrs);
        reply.first = &tok;
        reply.kv_bytes_sent = info.bytes_put;
        reply.prefill_ms = p->prefill_ms;
        reply.transfer_ms = (double)info.finish_ns / 1e6;
        speed_node_reply(p->call, &reply.base);
        speed_node_count(n, "ok");
    } else {
        speed_node_fail(p->call, st, err);
        speed_node_count(n, st == SPEED_ERR_CANCELLED ? "cancelled" : "error");
    }
    live_remove(p);
    speed_batcher_release(n->batcher, p->id); /* NOT_FOUND when nothing was held */
    pf_free(p);
}

static speed_status_t pf_layer(void *user, speed_kv_cache_t *cache, const speed_kv_seq_t *seq, int layer,
                               int64_t n_done, int64_t n_total) {
    pf_t *p = user;
    if (atomic_load(&p->cancelled)) {
        speed_kv_xfer_abort(p->xfer); /* flush + abort notify (complete_work covers no transfer yet) */
        return SPEED_ERR_CANCELLED;
    }
    int64_t delay = p->node->cfg.debug_prefill_layer_delay_ms;
    if (delay > 0) speed_clock_sleep_ms(delay); /* test knob: a slow prefill node */
    speed_status_t st = SPEED_OK;
    if (!p->xfer)
        st = speed_kv_xfer_create(p->node->xfer, p->desc, cache, seq, p->n_full, p->n_compact, p->id, &p->xfer);
    if (st == SPEED_OK) st = speed_kv_xfer_push_layer(p->xfer, layer, n_done, n_total);
    if (st != SPEED_OK) p->xfer_failed = true; /* read by complete_work after the finish event */
    return st;
}

static void pf_event(void *user, const speed_batch_event_t *ev) {
    pf_t *p = user;
    if (ev->token) {
        p->first = *ev->token;
        snprintf(p->first_text, sizeof p->first_text, "%.*s", (int)ev->token->text_len, ev->token->text);
        p->first.text = p->first_text;
        p->first.text_len = strlen(p->first_text);
        if (!p->logprobs) p->first.logprob = 0;
        p->have_first = true;
        return;
    }
    atomic_store(&p->finished, true);
    p->finish = ev->finish;
    p->status = ev->status;
    p->prefill_ms = ev->usage ? ev->usage->prefill_ms : 0.0;
    speed_node_observe_finish(p->node, ev, true);
    if (speed_node_defer(p->node, complete_work, p) != SPEED_OK) complete_work(p);
}

/* Marks p cancelled and ends it in the batcher. g_live_mu held or p otherwise alive. */
static void pf_cancel(pf_t *p) {
    atomic_store(&p->cancelled, true);
    /* After the finish event the held blocks are read by the transfer's puts until it ends:
     * complete_work releases them (cancelling the transfer when the flag is set). */
    if (!atomic_load(&p->finished)) speed_batcher_cancel(p->node->batcher, p->id);
}

/* The router cancelled the Prefill call (deadline, client gone). gRPC thread; p is alive
 * until the call's terminal reply (rpc.h). */
static void pf_call_cancelled(void *user, speed_rpc_call_t *call) {
    (void)call;
    pf_cancel(user);
}

/* Prefill.Cancel's part (the node's cancel_hook): sets the request's cancelled flag, so the
 * layer callback stops the puts before the next layer; speed_node_on_cancel then replies. */
static bool prefill_cancel_hook(speed_node_t *n, const char *request_id) {
    (void)n;
    bool found = false;
    pthread_mutex_lock(&g_live_mu);
    for (pf_t *p = g_live; p; p = p->next)
        if (strcmp(p->id, request_id) == 0) {
            pf_cancel(p);
            found = true;
        }
    pthread_mutex_unlock(&g_live_mu);
    return found;
}

static void prefill_work(void *arg) {
    pf_t *p = arg;
    speed_node_t *n = p->node;
    const Speed__V1__PrefillRequest *req = p->req;
    char err[300] = "";
    speed_status_t st = SPEED_OK;
    speed_batch_request_t q = {
        .request_id = p->id, .on_event = pf_event, .on_layer = pf_layer, .user = p, .hold_kv = true};
    if (!speed_node_accepting(n)) {
        st = SPEED_ERR_CANCELLED;
        snprintf(err, sizeof err, "node is draining");
    }
    if (st == SPEED_OK) {
        st = speed_node_kv_desc_from_proto(req->kv, &p->desc);
        if (st != SPEED_OK) snprintf(err, sizeof err, "bad KV descriptor: %s", speed_log_last_error());
    }
    if (st == SPEED_OK) {
        /* run at the depth the decode node resolved and reserved for: all of C, A and T stated */
        speed_depth_request_t want = {.prefill_layers = speed_cutoff_layers(req->kv->prefill_layers),
                                      .has_anchors = true,
                                      .anchors = req->kv->anchors,
                                      .has_tail = true,
                                      .tail = req->kv->tail};
        speed_depth_t depth = {0, 0, 0};
        char why[200];
        if (speed_depth_resolve(&want, NULL, n->model->config.n_layers, &depth, why, sizeof why) != SPEED_OK) {
            st = SPEED_ERR_INVALID_ARGUMENT;
            snprintf(err, sizeof err, "descriptor: %s", why);
        }
        q.depth = speed_depth_request_of(depth);
        int64_t n_prompt = (int64_t)req->n_prompt_ids;
        if (st == SPEED_OK && (req->resume_tokens < 0 || (req->resume_tokens > 0 && req->resume_tokens >= n_prompt))) {
            st = SPEED_ERR_INVALID_ARGUMENT;
            snprintf(err, sizeof err, "resume_tokens %d must lie in 0..%lld", (int)req->resume_tokens,
                     (long long)(n_prompt - 1));
        }
        p->n_full = n_prompt;
        p->n_compact = depth.anchors + depth.tail < n_prompt ? depth.anchors + depth.tail : n_prompt;
    }
    if (st == SPEED_OK) st = speed_node_gen_from_proto(req->sampling, &q.gen, err, sizeof err);
    if (st == SPEED_OK) {
        q.gen.max_tokens = 1; /* the first token only; the decode node goes on */
        q.gen.n_stop = 0;     /* stop strings are the decode node's job (it sees the whole text) */
        q.gen.stop = NULL;
        q.gen.ignore_eos = true;
        /* A migrated request: its resumed tokens only move the generator on (no stop strings,
         * EOS ignored, one token left), so the first token gets the draw it would have had. */
        q.gen.n_resume = req->resume_tokens;
        q.gen.resume_ids =
            req->resume_tokens > 0 ? req->prompt_ids + (req->n_prompt_ids - (size_t)req->resume_tokens) : NULL;
        q.gen.max_tokens = 1 + (int64_t)req->resume_tokens;
        p->logprobs = req->sampling && (req->sampling->logprobs || req->sampling->top_logprobs > 0);
        p->n_top = req->sampling ? req->sampling->top_logprobs : 0;
        q.prompt = req->prompt_ids;
        q.n_prompt = (int64_t)req->n_prompt_ids;
        speed_counter_t *tokens = n->m_prompt_tokens;
        double n_prompt = (double)req->n_prompt_ids;
        /* before submit: p lives until the call's terminal reply, after which the callback
         * cannot run (rpc.h); a call already cancelled starts with the flag set */
        if (speed_rpc_call_on_cancel(p->call, pf_call_cancelled, p) == SPEED_ERR_CANCELLED)
            atomic_store(&p->cancelled, true);
        live_add(p);
        st = speed_batcher_submit(n->batcher, &q);
        if (st == SPEED_OK) {
            speed_counter_add(tokens, n_prompt);
            return; /* events own p now */
        }
        live_remove(p);
        snprintf(err, sizeof err, "%s", st == SPEED_ERR_CAPACITY ? "prefill node is full" : speed_log_last_error());
    }
    speed_node_count(n, st == SPEED_ERR_CAPACITY ? "capacity" : "rejected");
    speed_node_fail(p->call, st, err);
    pf_free(p);
}

static void on_prefill(void *user, speed_rpc_call_t *call, const uint8_t *data, size_t len) {
    speed_node_t *n = user;
    Speed__V1__PrefillRequest *req = NULL;
    if (speed_proto_unpack(&speed__v1__prefill_request__descriptor, data, len, (ProtobufCMessage **)&req) != SPEED_OK) {
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT, "malformed PrefillRequest");
        return;
    }
    if (!req->request_id || !*req->request_id || strlen(req->request_id) > SPEED_BATCH_ID_MAX ||
        req->n_prompt_ids < 1 || !req->kv) {
        speed_node_fail(call, SPEED_ERR_INVALID_ARGUMENT, "Prefill needs request_id, prompt_ids and kv");
        speed_proto_free(&req->base);
        return;
    }
    pf_t *p = speed_calloc(1, sizeof *p);
    if (p) {
        p->node = n;
        p->call = call;
        p->req = req;
        snprintf(p->id, sizeof p->id, "%s", req->request_id);
    }
    if (!p || speed_node_defer(n, prefill_work, p) != SPEED_OK) {
        if (p) p->req = NULL;
        speed_free(p);
        speed_proto_free(&req->base);
        speed_node_fail(call, SPEED_ERR_NO_MEMORY, "out of memory");
    }
}

int main(int argc, char **argv) {
    static const speed_node_method_t methods[] = {
        {SPEED_METHOD_PREFILL_PREFILL, SPEED_RPC_UNARY, on_prefill},
        {SPEED_METHOD_PREFILL_CANCEL, SPEED_RPC_UNARY, speed_node_on_cancel},
    };
    g_node.cancel_hook = prefill_cancel_hook;
    return speed_node_main(&g_node, "prefill", methods, (int)(sizeof methods / sizeof methods[0]), argc, argv);
}
