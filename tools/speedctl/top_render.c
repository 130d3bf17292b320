/* speedctl top's two renderings of a frame: text for a terminal of a given size, and one JSON
 * object for scripts (top.h). Plain ASCII, so that a column is a byte; colours are SGR escapes
 * that take no width, and every line is cut at the terminal's width rather than wrapped. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "speedctl.h"
#include "top.h"

/* ---- text ----------------------------------------------------------------------------------- */

/* One line being built: visible characters counted against the width, escapes not. */
typedef struct {
    char buf[2048];
    size_t len;
    int vis, cols;
    bool color, colored;
} line_t;

static void line_start(line_t *l, int cols, bool color) {
    l->len = 0;
    l->vis = 0;
    l->cols = cols > 0 ? cols : 1 << 20;
    l->color = color;
    l->colored = false;
    l->buf[0] = '\0';
}

static void line_add(line_t *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line_add(line_t *l, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    size_t take = (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1;
    for (size_t i = 0; i < take && l->vis < l->cols && l->len + 1 < sizeof l->buf; i++) {
        char c = tmp[i] >= 32 && tmp[i] < 127 ? tmp[i] : '?'; /* labels from the network: no escapes */
        l->buf[l->len++] = c;
        l->vis++;
    }
    l->buf[l->len] = '\0';
}

/* An SGR escape ("1" bold, "31" red, "0" reset), when colours are on and the line has room. */
static void line_sgr(line_t *l, const char *code) {
    if (!l->color || l->vis >= l->cols) return;
    int n = snprintf(l->buf + l->len, sizeof l->buf - l->len, "\033[%sm", code);
    if (n > 0 && l->len + (size_t)n < sizeof l->buf) {
        l->len += (size_t)n;
        l->colored = strcmp(code, "0") != 0;
    } else {
        l->buf[l->len] = '\0';
    }
}

static void line_end(line_t *l, bool raw, FILE *f) {
    if (l->colored && l->color) fputs("\033[0m", f);
    fputs(l->buf, f);
    if (l->colored && l->color) fputs("\033[0m", f);
    fputs(raw ? "\033[K\r\n" : "\n", f); /* erase what a longer line left here */
}

static void fmt_num(char *out, size_t size, double x, int decimals) {
    if (isnan(x))
        snprintf(out, size, "-");
    else
        snprintf(out, size, "%.*f", decimals, x);
}

static void fmt_secs(char *out, size_t size, double s) {
    if (isnan(s))
        snprintf(out, size, "-");
    else if (s < 1)
        snprintf(out, size, "%.1fms", s * 1e3);
    else
        snprintf(out, size, "%.2fs", s);
}

static void fmt_rate_bytes(char *out, size_t size, double b) {
    if (isnan(b)) {
        snprintf(out, size, "-");
        return;
    }
    speedctl_bytes_human(b, 1, out, size > 2 ? size - 2 : size);
    if (size > 2) strcat(out, "/s");
}

static void quantiles_add(line_t *l, const char *what, const speedctl_top_quantiles_t *q) {
    char a[32], b[32];
    fmt_secs(a, sizeof a, q->p50);
    fmt_secs(b, sizeof b, q->p90);
    /* '*' marks quantiles of every observation since start: the window saw none */
    line_add(l, "%s p50 %s p90 %s%s   ", what, a, b, q->present && !q->window && !isnan(q->p50) ? "*" : "");
}

static const char *state_color(const char *state) {
    if (strcmp(state, "up") == 0) return "32";
    if (strcmp(state, "draining") == 0 || strcmp(state, "starting") == 0) return "33";
    return "31";
}

static const char *role_name(speedctl_top_role_t r) {
    return r == SPEEDCTL_TOP_PREFILL  ? "prefill"
           : r == SPEEDCTL_TOP_DECODE ? "decode"
           : r == SPEEDCTL_TOP_ROUTER ? "router"
                                      : "node";
}

static void node_row(line_t *l, const speedctl_top_node_t *n) {
    line_add(l, "%-7s %-21.21s ", role_name(n->role), n->addr);
    line_sgr(l, state_color(n->state));
    line_add(l, "%-11s", n->state);
    line_sgr(l, "0");
    char run[16], wait[16], tps[24], fail[16], bar[16], pct[16], step[16], batch[16], qw[16];
    fmt_num(run, sizeof run, n->running, 0);
    fmt_num(wait, sizeof wait, n->waiting, 0);
    fmt_num(tps, sizeof tps, n->tokens_per_s, 1);
    fmt_num(fail, sizeof fail, n->xfer_failures_total, 0);
    if (isnan(n->kv_used_ratio)) {
        snprintf(bar, sizeof bar, "          ");
        snprintf(pct, sizeof pct, "-");
    } else {
        double r = n->kv_used_ratio < 0 ? 0 : n->kv_used_ratio > 1 ? 1 : n->kv_used_ratio;
        int filled = (int)lround(r * 10);
        if (filled == 0 && r > 0) filled = 1; /* any use shows */
        for (int k = 0; k < 10; k++) bar[k] = k < filled ? '#' : '.';
        bar[10] = '\0';
        snprintf(pct, sizeof pct, "%.0f%%", n->kv_used_ratio * 100);
    }
    fmt_secs(step, sizeof step, n->step_p50_s);
    fmt_num(batch, sizeof batch, n->batch_mean, 1);
    fmt_secs(qw, sizeof qw, n->queue_wait_p50_s);
    line_add(l, " %4s %4s  [%s] %4s %8s %5s  %-3s", run, wait, bar, pct, tps, fail,
             n->router_up < 0 ? "-"
             : n->router_up   ? "yes"
                              : "no");
    if (!isnan(n->step_p50_s) || !isnan(n->batch_mean) || !isnan(n->queue_wait_p50_s))
        line_add(l, " %8s %6s %8s", step, batch, qw);
}

void speedctl_top_render_text(const speedctl_top_frame_t *fr, int cols, int rows, bool color, bool raw, FILE *f) {
    line_t l;
    int used = 0;
    line_start(&l, cols, color);
    line_sgr(&l, "1");
    line_add(&l, "speedctl top - %s", fr->name);
    line_sgr(&l, "0");
    if (fr->model[0]) line_add(&l, "  model %s", fr->model);
    line_add(&l, "  view %.0fs  window %.1fs  nodes up %zu/%zu", fr->uptime_s, fr->window_s, fr->n_up, fr->n_nodes);
    line_end(&l, raw, f);
    used++;
    if (fr->have_router) {
        const speedctl_top_router_t *r = &fr->router;
        char a[32], b[32], c[32], d[32];
        line_start(&l, cols, color);
        line_add(&l, "router %s ", r->addr);
        line_sgr(&l, state_color(r->state));
        line_add(&l, "%s", r->state);
        line_sgr(&l, "0");
        fmt_num(a, sizeof a, r->requests_per_s, 2);
        fmt_num(b, sizeof b, r->requests_total, 0);
        fmt_num(c, sizeof c, r->running, 0);
        fmt_num(d, sizeof d, r->waiting, 0);
        line_add(&l, "   req/s %s (total %s)   running %s  waiting %s", a, b, c, d);
        if (r->queue_wait.present) {
            fmt_secs(a, sizeof a, r->queue_wait.p50);
            line_add(&l, " (p50 %s)", a);
        }
        line_add(&l, "   errors/s");
        if (!r->n_errors) line_add(&l, " -");
        for (size_t k = 0; k < r->n_errors; k++) {
            fmt_num(a, sizeof a, r->errors[k].per_s, 2);
            line_add(&l, " %s:%s", r->errors[k].code, a);
        }
        line_end(&l, raw, f);
        line_start(&l, cols, color);
        quantiles_add(&l, "TTFT", &r->ttft);
        quantiles_add(&l, "ITL", &r->itl);
        if (r->tpot.present) quantiles_add(&l, "TPOT", &r->tpot);
        quantiles_add(&l, "e2e", &r->e2e);
        line_end(&l, raw, f);
        line_start(&l, cols, color);
        fmt_num(a, sizeof a, r->generated_per_s, 1);
        fmt_rate_bytes(b, sizeof b, r->kv_shipped_per_s);
        line_add(&l, "generated tok/s %s   KV shipped %s", a, b);
        if (!isnan(r->kv_saved_total)) {
            fmt_rate_bytes(c, sizeof c, r->kv_saved_per_s);
            char tot[32];
            speedctl_bytes_human(r->kv_saved_total, 1, tot, sizeof tot);
            line_add(&l, "   SPEED saved %s (total %s)", c, tot);
        }
        if (!isnan(fr->shallow_share)) line_add(&l, "   shallow prompt tokens %.0f%%", fr->shallow_share * 100);
        line_end(&l, raw, f);
        used += 3;
    }
    line_start(&l, cols, color);
    line_end(&l, raw, f);
    line_start(&l, cols, color);
    line_sgr(&l, "1");
    bool extras = false;
    for (size_t i = 0; i < fr->n_nodes; i++)
        extras |=
            !isnan(fr->nodes[i].step_p50_s) || !isnan(fr->nodes[i].batch_mean) || !isnan(fr->nodes[i].queue_wait_p50_s);
    line_add(&l, "%-7s %-21s %-11s %4s %4s  %-17s %8s %5s  %-3s", "ROLE", "ADDRESS", "STATE", "RUN", "WAIT", "KV USED",
             "TOK/S", "XFAIL", "RTR");
    if (extras) line_add(&l, " %8s %6s %8s", "STEP p50", "BATCH", "QWAIT");
    line_sgr(&l, "0");
    line_end(&l, raw, f);
    used += 2;
    int room = rows > 0 ? rows - used - (raw ? 1 : 0) : (int)fr->n_nodes;
    for (size_t i = 0; i < fr->n_nodes; i++) {
        line_start(&l, cols, color);
        if ((int)i >= room - 1 && i + 1 < fr->n_nodes && rows > 0) {
            line_add(&l, "... %zu more nodes (a taller terminal shows them)", fr->n_nodes - i);
            line_end(&l, raw, f);
            break;
        }
        node_row(&l, &fr->nodes[i]);
        line_end(&l, raw, f);
    }
    if (raw) {
        line_start(&l, cols, color);
        line_add(&l, "q: quit");
        line_end(&l, raw, f);
    }
}

/* ---- JSON ----------------------------------------------------------------------------------- */

static json_t *num(double x) { return isnan(x) || isinf(x) ? json_null() : json_real(x); }

static json_t *quantiles_json(const speedctl_top_quantiles_t *q) {
    if (!q->present) return json_null();
    return json_pack("{s:o,s:o,s:b}", "p50", num(q->p50), "p90", num(q->p90), "window", q->window);
}

json_t *speedctl_top_render_json(const speedctl_top_frame_t *fr) {
    json_t *o = json_pack("{s:s,s:s,s:f,s:f,s:I,s:I,s:o}", "cluster", fr->name, "model", fr->model, "uptime_s",
                          fr->uptime_s, "window_s", fr->window_s, "nodes_up", (json_int_t)fr->n_up, "nodes_total",
                          (json_int_t)fr->n_nodes, "shallow_prompt_token_share", num(fr->shallow_share));
    if (!o) return NULL;
    if (fr->have_router) {
        const speedctl_top_router_t *r = &fr->router;
        json_t *errors = json_object();
        for (size_t k = 0; errors && k < r->n_errors; k++)
            json_object_set_new(
                errors, r->errors[k].code,
                json_pack("{s:o,s:o}", "total", num(r->errors[k].total), "per_s", num(r->errors[k].per_s)));
        json_t *rj = json_pack(
            "{s:s,s:s,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o}", "address", r->addr, "state",
            r->state, "requests_total", num(r->requests_total), "requests_per_s", num(r->requests_per_s), "errors",
            errors ? errors : json_null(), "running", num(r->running), "waiting", num(r->waiting), "ttft_s",
            quantiles_json(&r->ttft), "itl_s", quantiles_json(&r->itl), "tpot_s", quantiles_json(&r->tpot), "e2e_s",
            quantiles_json(&r->e2e), "generated_tokens_total", num(r->generated_total), "generated_tokens_per_s",
            num(r->generated_per_s), "kv_bytes_shipped_total", num(r->kv_shipped_total), "kv_bytes_shipped_per_s",
            num(r->kv_shipped_per_s), "kv_bytes_saved_total", num(r->kv_saved_total), "kv_bytes_saved_per_s",
            num(r->kv_saved_per_s), "queue_wait_s", quantiles_json(&r->queue_wait));
        if (!rj || json_object_set_new(o, "router", rj) != 0) {
            json_decref(o);
            return NULL;
        }
    } else {
        json_object_set_new(o, "router", json_null());
    }
    json_t *nodes = json_array();
    for (size_t i = 0; nodes && i < fr->n_nodes; i++) {
        const speedctl_top_node_t *n = &fr->nodes[i];
        json_t *nj = json_pack(
            "{s:s,s:s,s:s,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o,s:o}", "role", role_name(n->role),
            "address", n->addr, "state", n->state, "running", num(n->running), "waiting", num(n->waiting), "reserved",
            num(n->reserved), "kv_used_ratio", num(n->kv_used_ratio), "tokens_per_s", num(n->tokens_per_s),
            "tokens_total", num(n->tokens_total), "requests_total", num(n->requests_total), "transfer_failures_total",
            num(n->xfer_failures_total), "transfer_bytes_per_s", num(n->xfer_bytes_per_s), "step_p50_s",
            num(n->step_p50_s), "batch_mean", num(n->batch_mean), "queue_wait_p50_s", num(n->queue_wait_p50_s),
            "tokens_in_flight", num(n->tokens_in_flight), "router_up",
            n->router_up < 0 ? json_null() : json_boolean(n->router_up));
        if (!nj || json_array_append_new(nodes, nj) != 0) {
            json_decref(nodes);
            nodes = NULL;
        }
    }
    if (!nodes || json_object_set_new(o, "nodes", nodes) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}
