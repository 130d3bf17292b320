/* speedctl loadgen's report (loadgen.h): percentiles, the JSON report, the table printed from it,
 * and the per-request records. The table is printed from the JSON, so the two cannot disagree.
 *
 * Definitions (docs/speedctl.md#loadgen):
 *   TTFT  send → the first chunk bringing a token (streaming only; loadgen_client.c)
 *   ITL   every gap between two chunks bringing tokens (streaming only)
 *   TPOT  (e2e - TTFT) / (output tokens - 1), for requests with at least 2 output tokens
 *   e2e   send → the last byte of the answer
 *   goodput  requests per second that succeeded and met every SLO given (a metric without its
 *            value, e.g. TTFT without streaming, cannot meet its SLO) */
#include "loadgen.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

double speed_lg_percentile(const double *sorted, size_t n, double p) {
    if (n == 0) return 0;
    if (p <= 0) return sorted[0];
    if (p >= 100) return sorted[n - 1];
    double rank = p / 100.0 * (double)(n - 1);
    size_t lo = (size_t)floor(rank);
    double frac = rank - (double)lo;
    if (lo + 1 >= n) return sorted[n - 1];
    return sorted[lo] + frac * (sorted[lo + 1] - sorted[lo]);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

speed_lg_stats_t speed_lg_stats(double *v, size_t n) {
    speed_lg_stats_t s = {0};
    s.n = n;
    if (n == 0) return s;
    qsort(v, n, sizeof *v, cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += v[i];
    s.mean = sum / (double)n;
    s.min = v[0];
    s.max = v[n - 1];
    s.p50 = speed_lg_percentile(v, n, 50);
    s.p90 = speed_lg_percentile(v, n, 90);
    s.p99 = speed_lg_percentile(v, n, 99);
    return s;
}

static json_t *stats_json(const speed_lg_stats_t *s) {
    return json_pack("{s:I,s:f,s:f,s:f,s:f,s:f,s:f}", "n", (json_int_t)s->n, "mean", s->mean, "p50", s->p50, "p90",
                     s->p90, "p99", s->p99, "min", s->min, "max", s->max);
}

static double ttft_ms(const speed_lg_result_t *r) { return (r->t_first - r->t_send) * 1000.0; }
static double e2e_ms(const speed_lg_result_t *r) { return (r->t_end - r->t_send) * 1000.0; }
/* -1 when it has none (fewer than 2 tokens, or no first-token time) */
static double tpot_ms(const speed_lg_result_t *r) {
    if (r->t_first < 0 || r->output_tokens < 2) return -1;
    return (r->t_end - r->t_first) * 1000.0 / (double)(r->output_tokens - 1);
}

static bool slo_met(const speed_lg_slo_t *slo, const speed_lg_result_t *r) {
    if (r->outcome != SPEED_LG_OK) return false;
    if (slo->ttft_ms > 0 && (r->t_first < 0 || ttft_ms(r) > slo->ttft_ms)) return false;
    if (slo->tpot_ms > 0) {
        double t = tpot_ms(r);
        /* one output token has no time per output token: nothing to miss */
        if (r->output_tokens >= 2 && (t < 0 || t > slo->tpot_ms)) return false;
    }
    if (slo->e2e_ms > 0 && e2e_ms(r) > slo->e2e_ms) return false;
    return true;
}

json_t *speed_lg_report_json(const speed_lg_report_params_t *p, const speed_lg_result_t *res, size_t n) {
    size_t n_itl = 0;
    for (size_t i = 0; i < n; i++)
        if (res[i].outcome == SPEED_LG_OK) n_itl += res[i].n_itl;
    double *ttft = speed_malloc((n + 1) * sizeof *ttft), *tpot = speed_malloc((n + 1) * sizeof *tpot);
    double *e2e = speed_malloc((n + 1) * sizeof *e2e), *itl = speed_malloc((n_itl + 1) * sizeof *itl);
    double *late = speed_malloc((n + 1) * sizeof *late);
    json_t *rep = json_object(), *errors = json_object();
    if (!ttft || !tpot || !e2e || !itl || !late || !rep || !errors) {
        speed_free(ttft), speed_free(tpot), speed_free(e2e), speed_free(itl), speed_free(late);
        json_decref(rep);
        json_decref(errors);
        return NULL;
    }
    size_t n_ttft = 0, n_tpot = 0, n_e2e = 0, k_itl = 0, n_late = 0;
    int64_t ok = 0, failed = 0, cut = 0, met = 0, out_tok = 0, in_tok = 0, in_req = 0, out_req = 0;
    bool in_known = true;
    for (size_t i = 0; i < n; i++) {
        const speed_lg_result_t *r = &res[i];
        late[n_late++] = (r->t_send - r->t_sched) * 1000.0;
        if (r->outcome == SPEED_LG_CUT_OFF) {
            cut++;
            continue;
        }
        if (r->outcome == SPEED_LG_ERROR) {
            failed++;
            json_t *c = json_object_get(errors, r->error);
            json_object_set_new(errors, r->error, json_integer(c ? json_integer_value(c) + 1 : 1));
            continue;
        }
        ok++;
        in_req += r->prompt_tokens_req;
        out_req += r->output_tokens_req;
        out_tok += r->output_tokens;
        if (r->prompt_tokens >= 0)
            in_tok += r->prompt_tokens;
        else
            in_known = false;
        e2e[n_e2e++] = e2e_ms(r);
        if (r->t_first >= 0) ttft[n_ttft++] = ttft_ms(r);
        double t = tpot_ms(r);
        if (t >= 0) tpot[n_tpot++] = t;
        for (size_t k = 0; k < r->n_itl; k++) itl[k_itl++] = r->itl_ms[k];
        if (slo_met(&p->slo, r)) met++;
    }
    double dur = p->duration_s > 0 ? p->duration_s : 0;
    speed_lg_stats_t s_ttft = speed_lg_stats(ttft, n_ttft), s_tpot = speed_lg_stats(tpot, n_tpot),
                     s_itl = speed_lg_stats(itl, k_itl), s_e2e = speed_lg_stats(e2e, n_e2e),
                     s_late = speed_lg_stats(late, n_late);
    double rps = dur > 0 ? (double)ok / dur : 0;
    json_object_set(rep, "config", p->config ? p->config : json_null());
    json_object_set_new(rep, "requests",
                        json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:o}", "requested", (json_int_t)p->requested, "sent",
                                  (json_int_t)n, "completed", (json_int_t)ok, "failed", (json_int_t)failed, "cut_off",
                                  (json_int_t)cut, "dropped", (json_int_t)p->dropped, "errors", errors));
    json_object_set_new(rep, "duration_s", json_real(dur));
    json_object_set_new(rep, "throughput",
                        json_pack("{s:f,s:f,s:f}", "requests_per_s", rps, "output_tokens_per_s",
                                  dur > 0 ? (double)out_tok / dur : 0, "input_tokens_per_s",
                                  dur > 0 && in_known ? (double)in_tok / dur : 0));
    json_t *slo = json_object();
    if (p->slo.ttft_ms > 0) json_object_set_new(slo, "ttft_ms", json_real(p->slo.ttft_ms));
    if (p->slo.tpot_ms > 0) json_object_set_new(slo, "tpot_ms", json_real(p->slo.tpot_ms));
    if (p->slo.e2e_ms > 0) json_object_set_new(slo, "e2e_ms", json_real(p->slo.e2e_ms));
    json_object_set_new(rep, "goodput",
                        json_pack("{s:f,s:I,s:f,s:o}", "requests_per_s", dur > 0 ? (double)met / dur : 0, "met",
                                  (json_int_t)met, "fraction",
                                  ok + failed + cut ? (double)met / (double)(ok + failed + cut) : 0, "slo", slo));
    json_object_set_new(rep, "tokens",
                        json_pack("{s:I,s:I,s:I,s:b}", "output", (json_int_t)out_tok, "output_requested",
                                  (json_int_t)out_req, "input_requested", (json_int_t)in_req, "input_known", in_known));
    if (in_known) json_object_set_new(json_object_get(rep, "tokens"), "input", json_integer(in_tok));
    json_t *lat = json_object();
    json_object_set_new(lat, "e2e", stats_json(&s_e2e));
    if (p->stream) {
        json_object_set_new(lat, "ttft", stats_json(&s_ttft));
        json_object_set_new(lat, "tpot", stats_json(&s_tpot));
        json_object_set_new(lat, "itl", stats_json(&s_itl));
    }
    json_object_set_new(rep, "latency_ms", lat);
    json_object_set_new(rep, "send_lateness_ms", stats_json(&s_late));
    speed_free(ttft), speed_free(tpot), speed_free(e2e), speed_free(itl), speed_free(late);
    return rep;
}

/* ---- the table --------------------------------------------------------------------------------- */

static double num(const json_t *o, const char *path) {
    char key[64];
    const json_t *v = o;
    for (const char *p = path; v && *p;) {
        size_t n = strcspn(p, ".");
        snprintf(key, sizeof key, "%.*s", (int)n, p);
        v = json_object_get(v, key);
        p += n + (p[n] == '.');
    }
    return json_number_value(v);
}

void speed_lg_report_print(const json_t *rep, FILE *f) {
    const json_t *rq = json_object_get(rep, "requests");
    fprintf(f, "requests   %.0f sent, %.0f completed, %.0f failed, %.0f cut off, %.0f dropped", num(rq, "sent"),
            num(rq, "completed"), num(rq, "failed"), num(rq, "cut_off"), num(rq, "dropped"));
    const json_t *errs = json_object_get(rq, "errors");
    if (json_object_size(errs)) {
        const char *k;
        const json_t *v;
        const char *sep = " (";
        json_object_foreach((json_t *)errs, k, v) {
            fprintf(f, "%s%s: %lld", sep, k, (long long)json_integer_value(v));
            sep = ", ";
        }
        fputc(')', f);
    }
    fprintf(f, "\nduration   %.2f s\n", num(rep, "duration_s"));
    fprintf(f, "throughput %.2f req/s, %.1f output tok/s", num(rep, "throughput.requests_per_s"),
            num(rep, "throughput.output_tokens_per_s"));
    if (json_is_true(json_object_get(json_object_get(rep, "tokens"), "input_known")))
        fprintf(f, ", %.1f input tok/s", num(rep, "throughput.input_tokens_per_s"));
    fprintf(f, "\ntokens     %.0f output (%.0f asked)", num(rep, "tokens.output"), num(rep, "tokens.output_requested"));
    if (json_object_get(json_object_get(rep, "tokens"), "input"))
        fprintf(f, ", %.0f input (%.0f asked)", num(rep, "tokens.input"), num(rep, "tokens.input_requested"));
    const json_t *slo = json_object_get(json_object_get(rep, "goodput"), "slo");
    if (json_object_size(slo)) {
        fprintf(f, "\ngoodput    %.2f req/s (%.0f met the SLOs:", num(rep, "goodput.requests_per_s"),
                num(rep, "goodput.met"));
        const char *k;
        const json_t *v;
        json_object_foreach((json_t *)slo, k, v)
            fprintf(f, " %.*s <= %g ms", (int)strcspn(k, "_"), k, json_number_value(v));
        fputc(')', f);
    }
    fprintf(f, "\n\n%-14s %10s %10s %10s %10s %8s\n", "latency (ms)", "mean", "p50", "p90", "p99", "n");
    static const char *const rows[] = {"ttft", "tpot", "itl", "e2e"};
    const json_t *lat = json_object_get(rep, "latency_ms");
    for (size_t i = 0; i < 4; i++) {
        const json_t *s = json_object_get(lat, rows[i]);
        if (!s) continue;
        fprintf(f, "%-14s %10.2f %10.2f %10.2f %10.2f %8.0f\n", rows[i], num(s, "mean"), num(s, "p50"), num(s, "p90"),
                num(s, "p99"), num(s, "n"));
    }
    const json_t *lb = json_object_get(rep, "latency_by_turn");
    for (size_t t = 0; t < json_array_size(lb); t++) {
        const json_t *s = json_array_get(lb, t);
        char name[32];
        snprintf(name, sizeof name, "ttft turn %zu", t + 1);
        fprintf(f, "%-14s %10.2f %10.2f %10.2f %10.2f %8.0f\n", name, num(s, "ttft.mean"), num(s, "ttft.p50"),
                num(s, "ttft.p90"), num(s, "ttft.p99"), num(s, "ttft.n"));
    }
}

speed_status_t speed_lg_records_write(const speed_lg_result_t *res, size_t n, FILE *f) {
    static const char *const outcomes[] = {"ok", "error", "cut_off"};
    for (size_t i = 0; i < n; i++) {
        const speed_lg_result_t *r = &res[i];
        json_t *o =
            json_pack("{s:I,s:s,s:i,s:f,s:f,s:f,s:I,s:I,s:I,s:I}", "index", (json_int_t)r->index, "outcome",
                      outcomes[r->outcome], "http_status", r->http_status, "scheduled_ms", r->t_sched * 1000.0,
                      "sent_ms", r->t_send * 1000.0, "e2e_ms", e2e_ms(r), "prompt_tokens_requested",
                      (json_int_t)r->prompt_tokens_req, "output_tokens_requested", (json_int_t)r->output_tokens_req,
                      "prompt_tokens", (json_int_t)r->prompt_tokens, "output_tokens", (json_int_t)r->output_tokens);
        if (!o) return SPEED_ERR_NO_MEMORY;
        if (r->t_first >= 0) {
            json_object_set_new(o, "ttft_ms", json_real(ttft_ms(r)));
            json_object_set_new(o, "chunks", json_integer(r->n_chunks));
        }
        if (tpot_ms(r) >= 0) json_object_set_new(o, "tpot_ms", json_real(tpot_ms(r)));
        if (r->kv_bytes >= 0) json_object_set_new(o, "kv_bytes", json_integer(r->kv_bytes));
        if (r->prefill_layers > 0) json_object_set_new(o, "prefill_layers", json_integer(r->prefill_layers));
        if (r->conversation >= 0) {
            json_object_set_new(o, "conversation", json_integer(r->conversation));
            json_object_set_new(o, "turn", json_integer(r->turn));
        }
        if (r->outcome != SPEED_LG_OK) {
            json_object_set_new(o, "error", json_string(r->error));
            json_object_set_new(o, "detail", json_string(r->detail));
        }
        char *s = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        if (!s) return SPEED_ERR_NO_MEMORY;
        int w = fprintf(f, "%s\n", s);
        free(s);
        if (w < 0) return SPEED_ERR_IO;
    }
    return SPEED_OK;
}
