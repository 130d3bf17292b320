/* speedctl eval's output (eval.h): the table, the JSON object and the SVG chart. The SVG is
 * written by hand: a fixed-size plot, two y axes, one polyline per series. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eval.h"
#include "speedctl.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

void speedctl_eval_result_of(speedctl_eval_acc_t *acc, speedctl_eval_result_t *res) {
    memset(res, 0, sizeof *res);
    res->prefill_layers = acc->prefill_layers;
    res->n_pos = acc->n_pos;
    for (int d = 0; d < SPEEDCTL_EVAL_MAX_DEPTHS; d++) res->probe_accuracy[d] = -1.0;
    res->probe_overall = -1.0;
    int64_t hits = 0, n = 0;
    for (int d = 0; d < SPEEDCTL_EVAL_MAX_DEPTHS; d++) {
        if (acc->probe_n[d]) res->probe_accuracy[d] = (double)acc->probe_hits[d] / (double)acc->probe_n[d];
        hits += acc->probe_hits[d];
        n += acc->probe_n[d];
    }
    if (n) res->probe_overall = (double)hits / (double)n;
    if (acc->n_pos == 0) return;
    double sum = 0.0;
    for (int64_t i = 0; i < acc->n_pos; i++) sum += acc->kl[i];
    res->kl_mean = sum / (double)acc->n_pos;
    qsort(acc->kl, (size_t)acc->n_pos, sizeof *acc->kl, cmp_double);
    int64_t rank = (int64_t)ceil(0.9 * (double)acc->n_pos); /* nearest rank */
    res->kl_p90 = acc->kl[(rank > 0 ? rank : 1) - 1];
    res->top1_agreement = (double)acc->n_top1_same / (double)acc->n_pos;
    res->perplexity = exp(acc->nll_sum / (double)acc->n_pos);
}

/* ---- table ----------------------------------------------------------------------------- */

void speedctl_eval_table_print(const speedctl_eval_report_t *r) {
    printf("eval %s: L=%d, KV %s, prompt %lld tokens (shallow below C; A=%d, T=%d), continuation %lld "
           "(teacher-forced, full depth)\n",
           r->model, r->n_layers, r->kv_dtype, (long long)r->n_prompt, r->anchors, r->tail, (long long)r->n_cont);
    if (r->reference_model) printf("reference: %s at full depth (KL, top-1 against it)\n", r->reference_model);
    if (r->data) {
        printf("records: %zu used, %lld read, %lld shorter than %lld tokens skipped; %.1f s\n\n", r->data->n,
               (long long)r->data->n_read, (long long)r->data->n_skipped, (long long)(r->n_prompt + r->n_cont),
               r->seconds);
        printf("%6s %10s %10s %8s %12s %12s %8s %9s\n", "C", "KL mean", "KL p90", "top-1", "perplexity", "KV/prompt",
               "KV saved", "FLOPs sv");
        for (int i = 0; i < r->n_results; i++) {
            const speedctl_eval_result_t *x = &r->results[i];
            char kv[32];
            speedctl_bytes_human((double)x->kv_bytes, 1, kv, sizeof kv);
            printf("%6d %10.5f %10.5f %7.1f%% %12.4f %12s %7.1f%% %8.1f%%\n", x->prefill_layers, x->kl_mean, x->kl_p90,
                   100.0 * x->top1_agreement, x->perplexity, kv, 100.0 * x->kv_saved, 100.0 * x->prefill_flops_saved);
        }
    }
    if (r->probe) {
        printf("\npass-key probe: %d trials per depth, retrieved (greedy continuation exact)\n%6s", r->probe_trials,
               "C");
        for (int d = 0; d < r->n_probe_depths; d++) printf("  depth %-4.2f", r->probe_depths[d]);
        printf("  %8s\n", "all");
        for (int i = 0; i < r->n_results; i++) {
            const speedctl_eval_result_t *x = &r->results[i];
            printf("%6d", x->prefill_layers);
            for (int d = 0; d < r->n_probe_depths; d++) printf("  %9.0f%%", 100.0 * x->probe_accuracy[d]);
            printf("  %7.0f%%\n", 100.0 * x->probe_overall);
        }
    }
}

/* ---- JSON ------------------------------------------------------------------------------ */

static json_t *set_json(const speedctl_eval_set_t *s) {
    return json_pack("{s:I, s:I, s:I}", "read", (json_int_t)s->n_read, "used", (json_int_t)s->n, "skipped_short",
                     (json_int_t)s->n_skipped);
}

bool speedctl_eval_json_print(const speedctl_eval_report_t *r) {
    json_t *root = json_pack("{s:s, s:i, s:s, s:I, s:I, s:i, s:i, s:f}", "model", r->model, "layers", r->n_layers,
                             "kv_dtype", r->kv_dtype, "prompt_tokens", (json_int_t)r->n_prompt, "continuation_tokens",
                             (json_int_t)r->n_cont, "anchors", r->anchors, "tail", r->tail, "seconds", r->seconds);
    json_t *results = json_array();
    if (!root || !results) {
        json_decref(root);
        json_decref(results);
        return false;
    }
    if (r->data) json_object_set_new(root, "records", set_json(r->data));
    if (r->reference_model) json_object_set_new(root, "reference_model", json_string(r->reference_model));
    for (int i = 0; i < r->n_results; i++) {
        const speedctl_eval_result_t *x = &r->results[i];
        json_t *e = json_pack("{s:i, s:I, s:f, s:f, s:f, s:f, s:I, s:I, s:f, s:f, s:f, s:f}", "prefill_layers",
                              x->prefill_layers, "positions", (json_int_t)x->n_pos, "kl_mean", x->kl_mean, "kl_p90",
                              x->kl_p90, "top1_agreement", x->top1_agreement, "perplexity", x->perplexity, "kv_bytes",
                              (json_int_t)x->kv_bytes, "kv_bytes_full_depth", (json_int_t)x->kv_bytes_full_depth,
                              "kv_saved", x->kv_saved, "prefill_flops", x->prefill_flops, "prefill_flops_full_depth",
                              x->prefill_flops_full_depth, "prefill_flops_saved", x->prefill_flops_saved);
        if (e && r->probe) {
            json_t *acc = json_array();
            for (int d = 0; d < r->n_probe_depths; d++) json_array_append_new(acc, json_real(x->probe_accuracy[d]));
            json_object_set_new(e, "probe_accuracy", acc);
            json_object_set_new(e, "probe_overall", json_real(x->probe_overall));
        }
        json_array_append_new(results, e);
    }
    json_object_set_new(root, "results", results);
    if (r->probe) {
        json_t *depths = json_array();
        for (int d = 0; d < r->n_probe_depths; d++) json_array_append_new(depths, json_real(r->probe_depths[d]));
        json_t *probe =
            json_pack("{s:o, s:i, s:o}", "depths", depths, "trials", r->probe_trials, "records", set_json(r->probe));
        json_object_set_new(root, "probe", probe);
    }
    char *s = json_dumps(root, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
    json_decref(root);
    if (!s) return false;
    puts(s);
    free(s);
    return true;
}

/* ---- SVG ------------------------------------------------------------------------------- */

/* The plot area inside a W x H picture. */
enum { W = 760, H = 440, X0 = 80, X1 = 640, Y0 = 60, Y1 = 370 };

typedef struct {
    double c_min, c_max, kl_max;
} scale_t;

static double sx(const scale_t *s, double c) {
    return s->c_max > s->c_min ? X0 + (X1 - X0) * (c - s->c_min) / (s->c_max - s->c_min) : (X0 + X1) / 2.0;
}
static double sy_kl(const scale_t *s, double kl) { return Y1 - (Y1 - Y0) * kl / s->kl_max; }
static double sy_pct(double frac) { return Y1 - (Y1 - Y0) * frac; }

/* A "nice" axis top at or above v: 1, 2 or 5 times a power of ten. */
static double nice_ceil(double v) {
    if (!(v > 0)) return 1.0;
    double p = pow(10.0, floor(log10(v)));
    return v <= p ? p : v <= 2 * p ? 2 * p : v <= 5 * p ? 5 * p : 10 * p;
}

typedef double (*series_fn_t)(const speedctl_eval_result_t *x);
static double f_kl_mean(const speedctl_eval_result_t *x) { return x->kl_mean; }
static double f_kl_p90(const speedctl_eval_result_t *x) { return x->kl_p90; }
static double f_top1(const speedctl_eval_result_t *x) { return x->top1_agreement; }
static double f_kv(const speedctl_eval_result_t *x) { return x->kv_saved; }
static double f_flops(const speedctl_eval_result_t *x) { return x->prefill_flops_saved; }

static const struct {
    const char *label, *color, *dash;
    series_fn_t fn;
    bool left; /* on the KL axis */
} series[] = {
    {"KL mean (left)", "#c0392b", "", f_kl_mean, true},
    {"KL p90 (left)", "#c0392b", "6,4", f_kl_p90, true},
    {"top-1 agreement (right)", "#27ae60", "", f_top1, false},
    {"KV saved (right)", "#2c7fb8", "6,4", f_kv, false},
    {"prefill FLOPs saved (right)", "#e67e22", "2,3", f_flops, false},
};

/* The results sorted by C (the table keeps the order the operator gave). */
static int cmp_result(const void *a, const void *b) {
    const speedctl_eval_result_t *x = a, *y = b;
    return (x->prefill_layers > y->prefill_layers) - (x->prefill_layers < y->prefill_layers);
}

speed_status_t speedctl_eval_svg_write(const speedctl_eval_report_t *r, const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) {
        speedctl_fail("--svg %s: %s", path, strerror(errno));
        return SPEED_ERR_IO;
    }
    speedctl_eval_result_t sorted[SPEEDCTL_EVAL_MAX_CUTOFFS];
    int n = r->n_results < SPEEDCTL_EVAL_MAX_CUTOFFS ? r->n_results : SPEEDCTL_EVAL_MAX_CUTOFFS;
    memcpy(sorted, r->results, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, cmp_result);
    scale_t s = {1, r->n_layers, 0};
    s.c_min = n ? sorted[0].prefill_layers : 1;
    s.c_max = r->n_layers;
    for (int i = 0; i < n; i++) s.kl_max = fmax(s.kl_max, fmax(sorted[i].kl_mean, sorted[i].kl_p90));
    s.kl_max = nice_ceil(s.kl_max * 1.05);

    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
            "font-family=\"sans-serif\" font-size=\"12\">\n",
            W, H, W, H);
    fprintf(f, "<rect x=\"0\" y=\"0\" width=\"%d\" height=\"%d\" fill=\"white\"/>\n", W, H);
    fprintf(f,
            "<text x=\"%d\" y=\"24\" font-size=\"15\" text-anchor=\"middle\">SPEED cutoff: quality and savings "
            "(L=%d, prompt %lld, continuation %lld, A=%d, T=%d)</text>\n",
            (X0 + X1) / 2, r->n_layers, (long long)r->n_prompt, (long long)r->n_cont, r->anchors, r->tail);
    /* grid and axes: 5 divisions on both y axes */
    for (int i = 0; i <= 5; i++) {
        double y = Y1 - (Y1 - Y0) * i / 5.0;
        fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#dddddd\"/>\n", X0, y, X1, y);
        fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.3g</text>\n", X0 - 6, y + 4, s.kl_max * i / 5.0);
        fprintf(f, "<text x=\"%d\" y=\"%.1f\">%d%%</text>\n", X1 + 6, y + 4, 20 * i);
    }
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"black\"/>\n", X0, Y0, X1 - X0,
            Y1 - Y0);
    for (int i = 0; i < n; i++) {
        double x = sx(&s, sorted[i].prefill_layers);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"black\"/>\n", x, Y1, x, Y1 + 5);
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%d</text>\n", x, Y1 + 18,
                sorted[i].prefill_layers);
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">prefill layers C</text>\n", (X0 + X1) / 2, Y1 + 36);
    fprintf(f,
            "<text x=\"22\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(-90 22 %d)\">KL(full || C), "
            "nats</text>\n",
            (Y0 + Y1) / 2, (Y0 + Y1) / 2);
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(90 %d %d)\">percent</text>\n",
            X1 + 48, (Y0 + Y1) / 2, X1 + 48, (Y0 + Y1) / 2);
    /* the series */
    for (size_t k = 0; k < sizeof series / sizeof series[0]; k++) {
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s%s%s points=\"", series[k].color,
                *series[k].dash ? " stroke-dasharray=\"" : "", series[k].dash, *series[k].dash ? "\"" : "");
        for (int i = 0; i < n; i++) {
            double v = series[k].fn(&sorted[i]);
            fprintf(f, "%s%.1f,%.1f", i ? " " : "", sx(&s, sorted[i].prefill_layers),
                    series[k].left ? sy_kl(&s, v) : sy_pct(v));
        }
        fprintf(f, "\"/>\n");
        for (int i = 0; i < n; i++) {
            double v = series[k].fn(&sorted[i]);
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", sx(&s, sorted[i].prefill_layers),
                    series[k].left ? sy_kl(&s, v) : sy_pct(v), series[k].color);
        }
        /* legend, under the plot */
        int lx = X0 + (int)(k % 3) * 190, ly = Y1 + 52 + (int)(k / 3) * 16;
        fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"%s%s%s/>\n", lx,
                ly - 4, lx + 24, ly - 4, series[k].color, *series[k].dash ? " stroke-dasharray=\"" : "", series[k].dash,
                *series[k].dash ? "\"" : "");
        fprintf(f, "<text x=\"%d\" y=\"%d\">%s</text>\n", lx + 30, ly, series[k].label);
    }
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        speedctl_fail("--svg %s: %s", path, strerror(errno));
        return SPEED_ERR_IO;
    }
    return SPEED_OK;
}
