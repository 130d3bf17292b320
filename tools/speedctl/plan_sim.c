/* The planner's discrete-event simulation (plan_sim.h).
 *
 * Time advances from event to event: the next arrival, the end of the step of any busy node, the
 * end of any KV transfer. A busy node holds the work left in its step in milliseconds at full
 * speed; between events every busy node works at the same rate (1, or host_cores over what the
 * busy nodes want), so a node's step stretches while others step beside it. */
#include "plan_sim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

typedef struct {
    bool busy;
    double rem_ms; /* work left in the step, ms at full speed */
    double busy_s; /* stepping time within the arrival span */
    int *q;        /* prefill: FIFO of request ids (ring of n) */
    int q_head, q_len;
    int *run; /* prefill: running ids; decode: ready ids (in the engine, taking part in steps) */
    int n_run;
    int *mem, *take; /* the step's members and their rows (prefill) */
    int n_mem;
    int slots; /* decode: sequences reserved here (max decode_max_running) */
} sim_node_t;

typedef struct {
    const speed_plan_sim_params_t *p;
    const speed_plan_request_t *reqs;
    int n;
    sim_node_t *nodes; /* [n_prefill] prefill, then [n_decode] decode */
    int *router_q, rq_head, rq_len;
    int64_t *rem_prompt, *generated;
    int *dnode;
    double *t_first, *t_done, *t_start;
    double *first_share; /* the host's sharing when the first token was made (overhead stretches by it) */
    double share;        /* the sharing of the interval that just ended: 1, or cores over what is wanted */
    double client_ms;    /* router and client CPU work pending (host_cores > 0) */
    int *xfer_req;       /* transfers in flight */
    double *xfer_end;
    int n_xfer;
    int n_done;
    int *run_hist;  /* [decode_max_running + 1] steps per decode batch size */
    int *wait_hist; /* [n + 1] prefill queue length seen by arrivals */
} sim_t;

double speed_plan_kv_bytes(const speed_plan_sim_params_t *p, double n_prompt) {
    double full = p->anchors + p->tail < n_prompt ? p->anchors + p->tail : n_prompt;
    return p->kv_bytes_per_token_layer * (p->prefill_layers * n_prompt + (p->n_layers - p->prefill_layers) * full);
}

void speed_plan_rate_match(const speed_plan_depth_t *d, int max_step_tokens, int prefill_max_running,
                           int decode_max_running, double mean_p, double mean_o, double *prefill_rps,
                           double *decode_rps) {
    double rows = fmin(max_step_tokens, prefill_max_running * mean_p);
    *prefill_rps = rows / speed_plan_prefill_ms(d, rows) * 1e3 / mean_p;
    double b = decode_max_running;
    *decode_rps = mean_o > 1 ? b / speed_plan_decode_ms(d, b, mean_p + mean_o / 2) * 1e3 / (mean_o - 1) : INFINITY;
}

/* Requests waiting at the router go to a decode node with a free slot (the least loaded) and
 * then to the least-loaded prefill node, in arrival order. */
static void router_dispatch(sim_t *s) {
    const speed_plan_sim_params_t *p = s->p;
    while (s->rq_len > 0) {
        int best = -1;
        for (int d = 0; d < p->n_decode; d++) {
            sim_node_t *nd = &s->nodes[p->n_prefill + d];
            if (nd->slots < p->decode_max_running && (best < 0 || nd->slots < s->nodes[p->n_prefill + best].slots))
                best = d;
        }
        if (best < 0) return;
        int r = s->router_q[s->rq_head];
        s->rq_head = (s->rq_head + 1) % s->n;
        s->rq_len--;
        s->dnode[r] = p->n_prefill + best;
        s->nodes[p->n_prefill + best].slots++;
        int pf = 0;
        for (int i = 1; i < p->n_prefill; i++)
            if (s->nodes[i].q_len + s->nodes[i].n_run < s->nodes[pf].q_len + s->nodes[pf].n_run) pf = i;
        sim_node_t *np = &s->nodes[pf];
        s->wait_hist[np->q_len]++;
        np->q[(np->q_head + np->q_len) % s->n] = r;
        np->q_len++;
    }
}

static void prefill_try_start(sim_t *s, sim_node_t *nd, double t) {
    const speed_plan_sim_params_t *p = s->p;
    while (nd->q_len > 0 && nd->n_run < p->prefill_max_running) {
        nd->run[nd->n_run++] = nd->q[nd->q_head];
        nd->q_head = (nd->q_head + 1) % s->n;
        nd->q_len--;
    }
    if (nd->n_run == 0) return;
    int budget = p->max_step_tokens, rows = 0;
    nd->n_mem = 0;
    for (int i = 0; i < nd->n_run && budget > 0; i++) {
        int r = nd->run[i];
        int64_t take = s->rem_prompt[r];
        if (take > p->prefill_chunk) take = p->prefill_chunk;
        if (take > budget) take = budget;
        if (s->t_start[r] < 0) s->t_start[r] = t;
        nd->mem[nd->n_mem] = r;
        nd->take[nd->n_mem++] = (int)take;
        budget -= (int)take;
        rows += (int)take;
    }
    nd->busy = true;
    nd->rem_ms = speed_plan_prefill_ms(p->depth, rows);
}

/* The first token reaches the client when the decode node starts the request (speedserve's
 * Generate: the batcher takes it between two steps and emits the prefill node's token then). */
static void first_token(sim_t *s, int r, double t) {
    s->t_first[r] = t;
    s->first_share[r] = s->share;
    s->client_ms += s->p->client_ms_per_token; /* the first token, streamed */
}

static void decode_try_start(sim_t *s, sim_node_t *nd, double t) {
    if (nd->n_run == 0) return;
    double ctx = 0;
    for (int i = 0; i < nd->n_run; i++) {
        int r = nd->run[i];
        if (s->t_first[r] < 0) first_token(s, r, t);
        nd->mem[i] = r;
        ctx += (double)(s->reqs[r].prompt + s->generated[r]);
    }
    nd->n_mem = nd->n_run;
    s->run_hist[nd->n_mem]++;
    nd->busy = true;
    nd->rem_ms = speed_plan_decode_ms(s->p->depth, nd->n_mem, ctx / nd->n_mem) + s->p->step_overhead_ms;
}

static void request_done(sim_t *s, int r, double t) {
    s->t_done[r] = t;
    s->nodes[s->dnode[r]].slots--;
    s->n_done++;
}

static void prefill_finish(sim_t *s, sim_node_t *nd, double t) {
    const speed_plan_sim_params_t *p = s->p;
    for (int i = 0; i < nd->n_mem; i++) {
        int r = nd->mem[i];
        s->rem_prompt[r] -= nd->take[i];
        if (s->rem_prompt[r] > 0) continue;
        for (int k = 0; k < nd->n_run; k++) /* keep the order of the others */
            if (nd->run[k] == r) {
                memmove(&nd->run[k], &nd->run[k + 1], (size_t)(nd->n_run - k - 1) * sizeof *nd->run);
                nd->n_run--;
                break;
            }
        if (s->reqs[r].output <= 1) { /* the prefill's token is the answer: no decode node starts it */
            first_token(s, r, t);
            request_done(s, r, t);
            continue;
        }
        s->xfer_req[s->n_xfer] = r;
        s->xfer_end[s->n_xfer++] =
            t + speed_plan_transfer_ms(p->depth, speed_plan_kv_bytes(p, (double)s->reqs[r].prompt)) / 1e3;
    }
    nd->n_mem = 0;
}

static void decode_finish(sim_t *s, sim_node_t *nd, double t) {
    s->client_ms += s->p->client_ms_per_token * nd->n_mem;
    for (int i = 0; i < nd->n_mem; i++) {
        int r = nd->mem[i];
        if (++s->generated[r] < s->reqs[r].output) continue;
        for (int k = 0; k < nd->n_run; k++)
            if (nd->run[k] == r) {
                nd->run[k] = nd->run[--nd->n_run];
                break;
            }
        request_done(s, r, t);
    }
    nd->n_mem = 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The q quantile of v[n] (sorted in place), nearest rank. */
static double quantile(double *v, int n, double q) {
    if (n == 0) return 0.0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    int k = (int)ceil(q * n) - 1;
    return v[k < 0 ? 0 : k >= n ? n - 1 : k];
}

static int hist_quantile(const int *h, int n_bins, double q) {
    long total = 0, acc = 0;
    for (int i = 0; i < n_bins; i++) total += h[i];
    for (int i = 0; i < n_bins; i++) {
        acc += h[i];
        if (total && (double)acc >= q * (double)total) return i;
    }
    return 0;
}

static void summarize(sim_t *s, double slo_ttft, double slo_tpot, double t_end_arrivals, speed_plan_sim_result_t *res,
                      double *scratch) {
    const speed_plan_sim_params_t *p = s->p;
    int n = s->n;
    memset(res, 0, sizeof *res);
    res->n = n;
    double first = s->reqs[0].arrival_s, last_done = 0, sum = 0, sum_wait = 0;
    double f_ttft = p->ttft_factor > 0 ? p->ttft_factor : 1.0, f_tpot = p->tpot_factor > 0 ? p->tpot_factor : 1.0;
    int good = 0;
    for (int i = 0; i < n; i++) {
        last_done = s->t_done[i] > last_done ? s->t_done[i] : last_done;
        double ttft = f_ttft * ((s->t_first[i] - s->reqs[i].arrival_s) * 1e3 + p->overhead_ms / s->first_share[i]);
        double tpot =
            s->reqs[i].output > 1 ? f_tpot * (s->t_done[i] - s->t_first[i]) * 1e3 / (double)(s->reqs[i].output - 1) : 0;
        scratch[i] = ttft;
        sum += ttft;
        sum_wait += (s->t_start[i] - s->reqs[i].arrival_s) * 1e3;
        if ((slo_ttft <= 0 || ttft <= slo_ttft) && (slo_tpot <= 0 || tpot <= slo_tpot)) good++;
    }
    res->ttft_mean_ms = sum / n;
    res->prefill_wait_mean_ms = sum_wait / n;
    /* growth: the last quarter's TTFT against the first half's */
    double a = 0, b = 0, base = 0;
    for (int i = 0; i < n / 10; i++) base += scratch[i] / (n / 10);
    for (int i = 0; i < n / 2; i++) a += scratch[i];
    for (int i = n - n / 4; i < n; i++) b += scratch[i];
    a /= n / 2 > 0 ? n / 2 : 1;
    b /= n / 4 > 0 ? n / 4 : 1;
    res->ttft_p50_ms = quantile(scratch, n, 0.5);
    res->ttft_p90_ms = quantile(scratch, n, 0.9);
    res->ttft_p99_ms = quantile(scratch, n, 0.99);
    int m = 0;
    sum = 0;
    for (int i = 0; i < n; i++)
        if (s->reqs[i].output > 1) {
            scratch[m] = f_tpot * (s->t_done[i] - s->t_first[i]) * 1e3 / (double)(s->reqs[i].output - 1);
            sum += scratch[m++];
        }
    res->tpot_mean_ms = m ? sum / m : 0;
    res->tpot_p50_ms = quantile(scratch, m, 0.5);
    res->tpot_p90_ms = quantile(scratch, m, 0.9);
    res->tpot_p99_ms = quantile(scratch, m, 0.99);
    for (int i = 0; i < n; i++)
        scratch[i] = f_ttft * ((s->t_first[i] - s->reqs[i].arrival_s) * 1e3 + p->overhead_ms / s->first_share[i]) +
                     f_tpot * (s->t_done[i] - s->t_first[i]) * 1e3;
    res->e2e_p90_ms = quantile(scratch, n, 0.9);
    double span = t_end_arrivals - first, run = last_done - first;
    res->offered_rps = span > 0 ? (n - 1) / span : 0;
    res->throughput_rps = run > 0 ? n / run : 0;
    res->goodput_rps = run > 0 ? good / run : 0;
    double pb = 0, db = 0;
    for (int i = 0; i < p->n_prefill; i++) pb += s->nodes[i].busy_s;
    for (int i = 0; i < p->n_decode; i++) db += s->nodes[p->n_prefill + i].busy_s;
    res->prefill_busy = span > 0 ? pb / (span * p->n_prefill) : 0;
    res->decode_busy = span > 0 ? db / (span * p->n_decode) : 0;
    for (int i = 0; i <= p->decode_max_running; i++)
        if (s->run_hist[i]) res->decode_running_max = i;
    res->decode_running_p99 = hist_quantile(s->run_hist, p->decode_max_running + 1, 0.99);
    res->prefill_waiting_p99 = hist_quantile(s->wait_hist, n + 1, 0.99);
    /* Busy fractions say nothing here: a batching node is busy whenever it has work, at any load.
     * A queue that grows through the run does: the last quarter waits far longer than the first half. */
    res->saturated = n >= 40 && b > 2.0 * a + base;
}

speed_status_t speed_plan_sim_run(const speed_plan_sim_params_t *p, const speed_plan_request_t *reqs, int n,
                                  double slo_ttft_ms, double slo_tpot_ms, speed_plan_sim_result_t *res) {
    if (!p || !p->depth || !reqs || n < 1 || p->n_prefill < 1 || p->n_decode < 1 || p->prefill_max_running < 1 ||
        p->decode_max_running < 1 || p->max_step_tokens < 1 || p->prefill_chunk < 1 ||
        (p->host_cores > 0 && p->node_threads <= 0) || p->host_background < 0 || p->client_ms_per_request < 0 ||
        p->client_ms_per_token < 0 || p->ttft_factor < 0 || p->tpot_factor < 0)
        return SPEED_ERR_INVALID_ARGUMENT;
    sim_t s = {.p = p, .reqs = reqs, .n = n, .share = 1.0};
    int n_nodes = p->n_prefill + p->n_decode,
        width = p->prefill_max_running > p->decode_max_running ? p->prefill_max_running : p->decode_max_running;
    speed_status_t st = SPEED_ERR_NO_MEMORY;
    s.nodes = speed_calloc((size_t)n_nodes, sizeof *s.nodes);
    s.router_q = speed_calloc((size_t)n, sizeof(int));
    s.rem_prompt = speed_calloc((size_t)n, sizeof(int64_t));
    s.generated = speed_calloc((size_t)n, sizeof(int64_t));
    s.dnode = speed_calloc((size_t)n, sizeof(int));
    s.t_first = speed_calloc((size_t)n, sizeof(double));
    s.t_done = speed_calloc((size_t)n, sizeof(double));
    s.t_start = speed_calloc((size_t)n, sizeof(double));
    s.first_share = speed_calloc((size_t)n, sizeof(double));
    s.xfer_req = speed_calloc((size_t)n, sizeof(int));
    s.xfer_end = speed_calloc((size_t)n, sizeof(double));
    s.run_hist = speed_calloc((size_t)p->decode_max_running + 1, sizeof(int));
    s.wait_hist = speed_calloc((size_t)n + 1, sizeof(int));
    double *scratch = speed_calloc((size_t)n, sizeof(double));
    bool ok = s.nodes && s.router_q && s.rem_prompt && s.generated && s.dnode && s.t_first && s.t_done && s.t_start &&
              s.first_share && s.xfer_req && s.xfer_end && s.run_hist && s.wait_hist && scratch;
    for (int i = 0; ok && i < n_nodes; i++) {
        sim_node_t *nd = &s.nodes[i];
        nd->q = i < p->n_prefill ? speed_calloc((size_t)n, sizeof(int)) : NULL;
        nd->run = speed_calloc((size_t)width, sizeof(int));
        nd->mem = speed_calloc((size_t)width, sizeof(int));
        nd->take = speed_calloc((size_t)width, sizeof(int));
        ok = (nd->q || i >= p->n_prefill) && nd->run && nd->mem && nd->take;
    }
    if (!ok) goto out;
    for (int i = 0; i < n; i++) {
        s.rem_prompt[i] = reqs[i].prompt;
        s.generated[i] = 1;
        s.t_start[i] = -1;
        s.t_first[i] = -1;
        if (reqs[i].prompt < 1 || reqs[i].output < 1 || (i > 0 && reqs[i].arrival_s < reqs[i - 1].arrival_s)) {
            st = SPEED_ERR_INVALID_ARGUMENT;
            goto out;
        }
    }
    double t = reqs[0].arrival_s, t_end_arrivals = reqs[n - 1].arrival_s;
    int next = 0;
    while (s.n_done < n) {
        for (int i = 0; i < n_nodes; i++)
            if (!s.nodes[i].busy) {
                if (i < p->n_prefill)
                    prefill_try_start(&s, &s.nodes[i], t);
                else
                    decode_try_start(&s, &s.nodes[i], t);
            }
        int n_busy = 0;
        for (int i = 0; i < n_nodes; i++) n_busy += s.nodes[i].busy;
        bool client_busy = p->host_cores > 0 && s.client_ms > 1e-9;
        if (!client_busy) s.client_ms = 0;
        double want = n_busy * p->node_threads + p->host_background + (client_busy ? 1.0 : 0.0);
        double share = p->host_cores > 0 && want > p->host_cores ? p->host_cores / want : 1.0;
        double rate = share;   /* a node's ms of work per ms */
        if (p->host_cores > 0) /* relative to the share the profile's node had */
            rate /= fmin(1.0, p->host_cores / (p->host_background + p->node_threads));
        double tn = INFINITY;
        if (next < n) tn = reqs[next].arrival_s;
        for (int i = 0; i < n_nodes; i++)
            if (s.nodes[i].busy) tn = fmin(tn, t + s.nodes[i].rem_ms / rate / 1e3);
        if (client_busy) tn = fmin(tn, t + s.client_ms / share / 1e3);
        for (int i = 0; i < s.n_xfer; i++) tn = fmin(tn, s.xfer_end[i]);
        if (!isfinite(tn)) { /* nothing can move: a bug, not an input */
            st = SPEED_ERR_INTERNAL;
            goto out;
        }
        double dt = tn - t;
        for (int i = 0; i < n_nodes; i++) {
            sim_node_t *nd = &s.nodes[i];
            if (!nd->busy) continue;
            /* a step that ends now ends now, whatever the subtraction leaves: late in a long run
             * the clock's resolution exceeds a tiny remainder, and it would never move */
            if (t + nd->rem_ms / rate / 1e3 <= tn)
                nd->rem_ms = 0;
            else
                nd->rem_ms -= dt * 1e3 * rate;
            if (t < t_end_arrivals) nd->busy_s += fmin(tn, t_end_arrivals) - t;
        }
        if (client_busy) s.client_ms = t + s.client_ms / share / 1e3 <= tn ? 0 : s.client_ms - dt * 1e3 * share;
        t = tn;
        s.share = share;
        for (int i = 0; i < n_nodes; i++) {
            sim_node_t *nd = &s.nodes[i];
            if (!nd->busy || nd->rem_ms > 1e-7) continue;
            nd->busy = false;
            if (i < p->n_prefill)
                prefill_finish(&s, nd, t);
            else
                decode_finish(&s, nd, t);
        }
        for (int i = 0; i < s.n_xfer;) {
            if (s.xfer_end[i] > t) {
                i++;
                continue;
            }
            int r = s.xfer_req[i];
            sim_node_t *nd = &s.nodes[s.dnode[r]];
            nd->run[nd->n_run++] = r;
            s.xfer_req[i] = s.xfer_req[--s.n_xfer];
            s.xfer_end[i] = s.xfer_end[s.n_xfer];
        }
        for (; next < n && reqs[next].arrival_s <= t; next++) {
            s.router_q[(s.rq_head + s.rq_len) % n] = next;
            s.rq_len++;
            s.client_ms += p->client_ms_per_request;
        }
        router_dispatch(&s);
    }
    summarize(&s, slo_ttft_ms, slo_tpot_ms, t_end_arrivals, res, scratch);
    st = SPEED_OK;
out:
    for (int i = 0; s.nodes && i < n_nodes; i++) {
        speed_free(s.nodes[i].q);
        speed_free(s.nodes[i].run);
        speed_free(s.nodes[i].mem);
        speed_free(s.nodes[i].take);
    }
    speed_free(s.nodes);
    speed_free(s.router_q);
    speed_free(s.rem_prompt);
    speed_free(s.generated);
    speed_free(s.dnode);
    speed_free(s.t_first);
    speed_free(s.t_done);
    speed_free(s.t_start);
    speed_free(s.first_share);
    speed_free(s.xfer_req);
    speed_free(s.xfer_end);
    speed_free(s.run_hist);
    speed_free(s.wait_hist);
    speed_free(scratch);
    return st;
}
