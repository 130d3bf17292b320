/* speedctl plan: the SPEED-aware capacity planner (docs/operations.md, "How plan works").
 *
 * From a profile (speedctl profile), a workload (rate + length SPECs, or a trace) and SLOs:
 *   1. rate matching: per cutoff C, one prefill node's request rate at full steps and one decode
 *      node's at max_running sequences of the workload's mean context, hence the fewest nodes of
 *      each pool the rate needs; candidates are the (C, TP, prefill, decode) within the budget
 *      that rate matching does not rule out;
 *   2. the simulation (plan_sim.h) of each candidate at the rate: TTFT / TPOT p90, and by
 *      bisection the highest rate it sustains within the SLOs;
 *   3. the recommendation (meets the SLOs at the rate with --headroom to spare — its max rate at
 *      least rate x (1 + headroom) — with the fewest nodes, then the highest max rate; without
 *      such a candidate, the best that meets them at the rate), C = L against it, per-node limits
 *      and a cluster file for `speedctl up`. */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "alloc.h"
#include "k8s_emit.h"
#include "plan_profile.h"
#include "plan_sim.h"
#include "plan_workload.h"
#include "speedctl.h"

typedef struct {
    char *profile, *prompt_tokens, *output_tokens, *trace, *prefill_layers, *tp, *out, *model, *image;
    double rate, slo_ttft, slo_tpot, overhead_ms, step_overhead_ms, host_cores, host_background, slowdown;
    double client_ms_per_request, client_ms_per_token, ttft_factor, tpot_factor, headroom;
    int64_t max_nodes, requests, seed, anchors, tail, prefill_max_running, decode_max_running;
    int arrival, emit;
} plan_opts_t;

static const char *const arrival_names[] = {"poisson", "constant", NULL};
static const char *const emit_names[] = {"yaml", "k8s", NULL};

#define PL_OPT(...) SPEEDCTL_OPT(plan_opts_t, __VA_ARGS__)
static const speed_config_field_t plan_fields[] = {
    SPEEDCTL_TEXT_OPT(
        plan_opts_t, "profile", profile,
        "profile JSON(s) from speedctl profile, comma-separated (one per tensor-parallel size); required"),
    PL_OPT("rate", DOUBLE, rate, "0", 0, 1e9, NULL,
           "requests per second to plan for (with --trace: scales its arrivals to this mean rate; 0 = as recorded)"),
    SPEEDCTL_TEXT_OPT(
        plan_opts_t, "prompt_tokens", prompt_tokens,
        "prompt lengths (speedctl loadgen SPECs): fixed:N, uniform:A,B, normal:MEAN,SD, lognormal:MEDIAN,SIGMA"),
    SPEEDCTL_TEXT_OPT(plan_opts_t, "output_tokens", output_tokens, "generated lengths (same syntax)"),
    SPEEDCTL_TEXT_OPT(plan_opts_t, "trace", trace,
                      "JSONL trace (speedctl loadgen's) instead of rate and lengths: {\"arrival_ms\", "
                      "\"input_tokens\", \"output_tokens\"}"),
    PL_OPT("arrival", ENUM, arrival, "poisson", SPEED_CONFIG_UNBOUNDED, arrival_names, "arrival process"),
    PL_OPT("requests", INT, requests, "2000", 10, 1000000, NULL, "requests simulated per run"),
    PL_OPT("slo_ttft_p90_ms", DOUBLE, slo_ttft, "1000", 0.001, 1e9, NULL, "TTFT p90 target, ms"),
    PL_OPT("slo_tpot_p90_ms", DOUBLE, slo_tpot, "100", 0.001, 1e9, NULL, "TPOT p90 target, ms"),
    SPEEDCTL_TEXT_OPT(plan_opts_t, "prefill_layers", prefill_layers,
                      "cutoffs C to consider, comma-separated (each in the profile); empty = every profiled one"),
    PL_OPT("anchors", INT, anchors, "1", 0, 1 << 20, NULL, "SPEED anchors A (the KV a transfer moves)"),
    PL_OPT("tail", INT, tail, "1", 1, 1 << 20, NULL, "SPEED tail T"),
    PL_OPT("max_nodes", INT, max_nodes, "4", 2, 4096, NULL, "budget: nodes (GPUs with TP: prefill + decode x TP)"),
    SPEEDCTL_TEXT_OPT(plan_opts_t, "tp", tp, "tensor-parallel sizes to consider (each needs a profile); empty = all"),
    PL_OPT("prefill_max_running", INT, prefill_max_running, "4", 1, 4096, NULL,
           "prompts in a prefill node's engine at once (prefill.max_running)"),
    PL_OPT("decode_max_running", INT, decode_max_running, "16", 1, 4096, NULL,
           "sequences a decode node runs at once (decode.max_running), the most plan will suggest"),
    PL_OPT("overhead_ms", DOUBLE, overhead_ms, "2", 0, 1e6, NULL,
           "fixed latency added to every TTFT (HTTP, router, control RPCs)"),
    PL_OPT("step_overhead_ms", DOUBLE, step_overhead_ms, "0", 0, 1e6, NULL,
           "fixed time added to every decode step (token events, the stream to the router, SSE: what TPOT sees "
           "beyond the engine)"),
    PL_OPT("host_cores", DOUBLE, host_cores, "0", 0, 1e6, NULL,
           "all nodes share this many cores (one small host; each busy node wants the profile's threads); "
           "0 = every node has its own hardware"),
    PL_OPT("host_background", DOUBLE, host_background, "0", 0, 1e6, NULL,
           "with --host-cores: runnable threads of other work on the host (as when the profile was measured)"),
    PL_OPT("client_ms_per_request", DOUBLE, client_ms_per_request, "0", 0, 1e6, NULL,
           "with --host-cores: CPU milliseconds the router and the clients on the same host spend per request"),
    PL_OPT("client_ms_per_token", DOUBLE, client_ms_per_token, "0", 0, 1e6, NULL,
           "with --host-cores: CPU milliseconds the router and the clients spend per streamed token"),
    PL_OPT("headroom", DOUBLE, headroom, "0.25", 0, 100, NULL,
           "recommend a candidate whose max rate within the SLOs is at least rate x (1 + this): the simulation is "
           "least sure near a cluster's limit (measured: a 1P1D predicted to sustain 47 requests/s saturated at 45)"),
    PL_OPT("ttft_factor", DOUBLE, ttft_factor, "1", 0.01, 100, NULL,
           "correction factor: every simulated TTFT is multiplied by it (measured / predicted TTFT p90 of a loaded "
           "calibration cluster on this host: the tails the model does not produce)"),
    PL_OPT("tpot_factor", DOUBLE, tpot_factor, "1", 0.01, 100, NULL,
           "correction factor: every simulated TPOT is multiplied by it (as --ttft-factor, for TPOT p90)"),
    PL_OPT("slowdown", DOUBLE, slowdown, "1", 0.01, 1000, NULL,
           "multiply every profiled time by this: how much slower the host is now than when it was profiled "
           "(a shared machine; measure it with a short speedctl profile of one point)"),
    PL_OPT("seed", INT, seed, "1", 0, 9.2e18, NULL,
           "seed of the simulated arrivals and lengths: loadgen's --seed draws the same requests"),
    SPEEDCTL_TEXT_OPT(plan_opts_t, "out", out,
                      "directory for the cluster file (cluster.yaml) and every candidate (plan.json); created"),
    PL_OPT("emit", ENUM, emit, "yaml", SPEED_CONFIG_UNBOUNDED, emit_names,
           "what --out gets: the cluster file for speedctl up (cluster.yaml), and with k8s also Kubernetes "
           "manifests of it in DIR/k8s (as speedctl k8s writes them)"),
    SPEEDCTL_TEXT_OPT(plan_opts_t, "image", image, "--emit k8s: the container image of every pod"),
    SPEEDCTL_TEXT_OPT(plan_opts_t, "model", model,
                      "model directory written into the cluster file (default: the "
                      "profile's)"),
};
static const speedctl_options_part_t plan_parts[] = {SPEEDCTL_OWN_PART(plan_fields)};

#define MAX_PROFILES   8
#define MAX_CANDIDATES 512

typedef struct {
    int c, tp, n_prefill, n_decode, nodes;
    const speed_plan_profile_t *prof;
    bool rate_ok; /* rate matching leaves it in */
    speed_plan_sim_result_t at_rate;
    double max_rate; /* within the SLOs (0: not even the lowest rate tried) */
    bool meets;      /* SLOs met at --rate */
    bool spare;      /* and max_rate >= rate x (1 + headroom) */
} candidate_t;

typedef struct {
    const plan_opts_t *o;
    speed_lg_dist_t plen, olen;
    speed_plan_request_t *trace;
    int n_trace;
    double trace_rate;
} workload_t;

/* The workload at `rate`: generated, or the trace with its arrivals scaled to that mean rate. */
static speed_plan_request_t *workload_at(const workload_t *w, double rate, int *n_p) {
    int n = w->trace ? w->n_trace : (int)w->o->requests;
    speed_plan_request_t *r = speed_calloc((size_t)n, sizeof *r);
    if (!r) return NULL;
    if (w->trace) {
        double k = w->trace_rate > 0 ? w->trace_rate / rate : 1.0;
        for (int i = 0; i < n; i++)
            r[i] = (speed_plan_request_t){w->trace[i].arrival_s * k, w->trace[i].prompt, w->trace[i].output};
    } else {
        speed_plan_workload_make(&w->plen, &w->olen, rate, (speed_lg_arrival_t)w->o->arrival, (uint64_t)w->o->seed, r,
                                 n);
    }
    *n_p = n;
    return r;
}

static speed_plan_sim_params_t sim_params(const plan_opts_t *o, const candidate_t *c) {
    const speed_plan_profile_t *pr = c->prof;
    return (speed_plan_sim_params_t){.depth = speed_plan_profile_depth(pr, c->c),
                                     .n_layers = pr->n_layers,
                                     .prefill_layers = c->c,
                                     .anchors = (int)o->anchors,
                                     .tail = (int)o->tail,
                                     .kv_bytes_per_token_layer = pr->kv_bytes_per_token_layer / c->tp,
                                     .n_prefill = c->n_prefill,
                                     .n_decode = c->n_decode,
                                     .prefill_max_running = (int)o->prefill_max_running,
                                     .max_step_tokens = pr->max_step_tokens,
                                     .prefill_chunk = pr->prefill_chunk,
                                     .decode_max_running = (int)o->decode_max_running,
                                     .overhead_ms = o->overhead_ms,
                                     .step_overhead_ms = o->step_overhead_ms,
                                     .host_cores = o->host_cores,
                                     .node_threads = pr->threads * c->tp,
                                     .host_background = o->host_background,
                                     .client_ms_per_request = o->client_ms_per_request,
                                     .client_ms_per_token = o->client_ms_per_token,
                                     .ttft_factor = o->ttft_factor,
                                     .tpot_factor = o->tpot_factor};
}

static speed_status_t simulate(const workload_t *w, const candidate_t *c, double rate, speed_plan_sim_result_t *res) {
    int n;
    speed_plan_request_t *reqs = workload_at(w, rate, &n);
    if (!reqs) return SPEED_ERR_NO_MEMORY;
    speed_plan_sim_params_t sp = sim_params(w->o, c);
    speed_status_t st = speed_plan_sim_run(&sp, reqs, n, w->o->slo_ttft, w->o->slo_tpot, res);
    speed_free(reqs);
    return st;
}

static bool within(const plan_opts_t *o, const speed_plan_sim_result_t *r) {
    return !r->saturated && r->ttft_p90_ms <= o->slo_ttft && r->tpot_p90_ms <= o->slo_tpot;
}

static void rate_match(const plan_opts_t *o, const speed_plan_profile_t *pr, int c, double mean_p, double mean_o,
                       double *prefill_rps, double *decode_rps) {
    speed_plan_rate_match(speed_plan_profile_depth(pr, c), pr->max_step_tokens, (int)o->prefill_max_running,
                          (int)o->decode_max_running, mean_p, mean_o, prefill_rps, decode_rps);
}

static int cmp_candidates(const void *a, const void *b) {
    const candidate_t *x = a, *y = b;
    if (x->spare != y->spare) return x->spare ? -1 : 1;
    if (x->meets != y->meets) return x->meets ? -1 : 1;
    if (x->nodes != y->nodes) return x->nodes - y->nodes;
    if (x->max_rate != y->max_rate) return x->max_rate > y->max_rate ? -1 : 1;
    return x->c - y->c; /* the shallower prefill among equals */
}

static int round_up4(int v) { return v < 4 ? 4 : (v + 3) / 4 * 4; }

static speed_status_t write_yaml(const plan_opts_t *o, const candidate_t *c, const char *path, const char *model,
                                 int decode_running, int decode_waiting, int prefill_waiting, double mean_p,
                                 double mean_o) {
    FILE *f = fopen(path, "w");
    if (!f) return SPEED_ERR_IO;
    const speed_plan_profile_t *pr = c->prof;
    int64_t per_seq = (int64_t)(2 * (mean_p + mean_o)) + 64;
    int64_t dkv = per_seq * decode_running, pkv = per_seq * o->prefill_max_running;
    fprintf(f,
            "# Written by speedctl plan for %.3g requests/s (prompts %s, outputs %s), SLOs TTFT p90 %.0f ms, TPOT\n"
            "# p90 %.0f ms, from the profile of %s (%s, %d threads). Start it: speedctl up %s\n"
            "model: %s\nhost: 127.0.0.1\nspeed:\n  prefill_layers: \"%d\"\n  anchors: %" PRId64 "\n  tail: %" PRId64
            "\nkv:\n  dtype: %s\nrouter:\n  max_in_flight: %d\n  max_queue: %d\n",
            o->rate, o->trace ? "trace" : o->prompt_tokens, o->trace ? "trace" : o->output_tokens, o->slo_ttft,
            o->slo_tpot, pr->model, pr->backend, pr->threads, path, model, c->c, o->anchors, o->tail,
            pr->kv_dtype[0] ? pr->kv_dtype : "auto", decode_running * c->n_decode, prefill_waiting * c->n_prefill + 64);
    const char *pools[2] = {"prefill", "decode"};
    for (int i = 0; i < 2; i++)
        fprintf(f,
                "%s:\n  replicas: %d\n  tensor_parallel: %d\n  backend: %s\n  threads: %d\n  max_running: %d\n"
                "  max_waiting: %d\n  max_step_tokens: %d\n  prefill_chunk: %d\n  kv_tokens: %" PRId64 "\n",
                pools[i], i ? c->n_decode : c->n_prefill, c->tp, pr->backend[0] ? pr->backend : "cpu", pr->threads,
                i ? decode_running : (int)o->prefill_max_running, i ? decode_waiting : prefill_waiting,
                pr->max_step_tokens, pr->prefill_chunk, (i ? dkv : pkv) < 4096 ? 4096 : (i ? dkv : pkv));
    fprintf(f, "ucx:\n  transport: shm\n");
    return fclose(f) == 0 ? SPEED_OK : SPEED_ERR_IO;
}

/* The Kubernetes manifests of the cluster file at yaml_path (speed_k8s_emit, as speedctl k8s does). */
static speed_status_t emit_k8s(const plan_opts_t *o, const char *yaml_path, const char *dir) {
    char *text = NULL;
    size_t len = 0;
    SPEED_CHECK(speedctl_read_file(yaml_path, &text, &len));
    char *cargv[] = {"plan", "--config", (char *)yaml_path, NULL};
    speed_cluster_config_t c;
    speed_config_t *ccfg = NULL;
    speed_status_t st = speed_cluster_config_load(3, cargv, "router", &c, &ccfg);
    if (st == SPEED_OK) {
        speed_k8s_emit_params_t p = speed_k8s_emit_default_params();
        p.cluster = &c;
        p.cluster_yaml = text;
        p.image = o->image;
        char err[1024];
        st = speed_k8s_emit(&p, dir, err, sizeof err);
        if (st != SPEED_OK) speedctl_fail("%s", err);
    }
    speed_config_destroy(ccfg);
    speed_free(text);
    return st;
}

/* plan.json: the workload, every simulated candidate (the recommendation first) and the limits. */
static speed_status_t write_json(const plan_opts_t *o, const candidate_t *cands, int n, const char *path, double mean_p,
                                 double mean_o, int decode_running, int prefill_waiting) {
    json_t *root = json_object(), *a = json_array();
    json_object_set_new(root, "rate", json_real(o->rate));
    json_object_set_new(root, "mean_prompt_tokens", json_real(mean_p));
    json_object_set_new(root, "mean_output_tokens", json_real(mean_o));
    json_object_set_new(root, "slo_ttft_p90_ms", json_real(o->slo_ttft));
    json_object_set_new(root, "slo_tpot_p90_ms", json_real(o->slo_tpot));
    json_object_set_new(root, "host_cores", json_real(o->host_cores));
    json_object_set_new(root, "overhead_ms", json_real(o->overhead_ms));
    json_object_set_new(root, "step_overhead_ms", json_real(o->step_overhead_ms));
    json_object_set_new(root, "host_background", json_real(o->host_background));
    json_object_set_new(root, "client_ms_per_request", json_real(o->client_ms_per_request));
    json_object_set_new(root, "client_ms_per_token", json_real(o->client_ms_per_token));
    json_object_set_new(root, "slowdown", json_real(o->slowdown));
    json_object_set_new(root, "headroom", json_real(o->headroom));
    json_object_set_new(root, "ttft_factor", json_real(o->ttft_factor));
    json_object_set_new(root, "tpot_factor", json_real(o->tpot_factor));
    for (int i = 0; i < n; i++) {
        const candidate_t *c = &cands[i];
        json_t *j = json_object();
        json_object_set_new(j, "prefill_layers", json_integer(c->c));
        json_object_set_new(j, "tensor_parallel", json_integer(c->tp));
        json_object_set_new(j, "prefill", json_integer(c->n_prefill));
        json_object_set_new(j, "decode", json_integer(c->n_decode));
        json_object_set_new(j, "nodes", json_integer(c->nodes));
        json_object_set_new(j, "ttft_p90_ms", json_real(c->at_rate.ttft_p90_ms));
        json_object_set_new(j, "tpot_p90_ms", json_real(c->at_rate.tpot_p90_ms));
        json_object_set_new(j, "ttft_p50_ms", json_real(c->at_rate.ttft_p50_ms));
        json_object_set_new(j, "tpot_p50_ms", json_real(c->at_rate.tpot_p50_ms));
        json_object_set_new(j, "goodput_rps", json_real(c->at_rate.goodput_rps));
        json_object_set_new(j, "max_rate_rps", json_real(c->max_rate));
        json_object_set_new(j, "meets_slos", json_boolean(c->meets));
        json_object_set_new(j, "headroom_ok", json_boolean(c->spare));
        json_object_set_new(j, "saturated", json_boolean(c->at_rate.saturated));
        json_array_append_new(a, j);
    }
    json_object_set_new(root, "candidates", a);
    json_t *lim = json_object();
    json_object_set_new(lim, "prefill_max_running", json_integer(o->prefill_max_running));
    json_object_set_new(lim, "prefill_max_waiting", json_integer(prefill_waiting));
    json_object_set_new(lim, "decode_max_running", json_integer(decode_running));
    json_object_set_new(root, "limits", lim);
    int rc = json_dump_file(root, path, JSON_INDENT(1) | JSON_REAL_PRECISION(6));
    json_decref(root);
    return rc == 0 ? SPEED_OK : SPEED_ERR_IO;
}

int speedctl_plan(int argc, char **argv) {
    plan_opts_t o;
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "plan",
                                "speedctl plan --profile P.json --rate R --prompt-tokens SPEC --output-tokens SPEC "
                                "(or --trace FILE) --slo-ttft-p90-ms X --slo-tpot-p90-ms Y [--max-nodes N] [--out DIR]",
                                plan_parts, SPEEDCTL_N_PARTS(plan_parts), &o, argc, argv))
        return opts.exit_code;
    int exit_code = SPEEDCTL_EXIT_USAGE;
    char err[512];
    speed_plan_profile_t *profs = speed_calloc(MAX_PROFILES, sizeof *profs);
    candidate_t *cands = speed_calloc(MAX_CANDIDATES, sizeof *cands);
    workload_t w = {.o = &o};
    int n_profs = 0, n_cands = 0;
    char *const *pos;
    if (!profs || !cands) goto out;
    if (speed_config_positional(opts.cfg, &pos) != 0 || !o.profile) {
        speedctl_fail("plan needs --profile FILE (see --help)");
        goto out;
    }
    if (o.emit == 1 && (!o.out || !o.image || !*o.image)) {
        speedctl_fail("--emit k8s needs --out DIR and --image IMAGE");
        goto out;
    }
    /* the workload */
    if (o.trace) {
        speed_status_t st_trace = speed_plan_trace_load(o.trace, &w.trace, &w.n_trace, err, sizeof err);
        if (st_trace != SPEED_OK) {
            speedctl_fail("--trace %s", err);
            exit_code = st_trace == SPEED_ERR_IO ? SPEEDCTL_EXIT_FAIL : SPEEDCTL_EXIT_USAGE;
            goto out;
        }
        if (w.n_trace < 10) {
            speedctl_fail("--trace %s: %d requests; the percentiles need at least 10", o.trace, w.n_trace);
            goto out;
        }
        double span = w.trace[w.n_trace - 1].arrival_s - w.trace[0].arrival_s;
        w.trace_rate = span > 0 ? (w.n_trace - 1) / span : 0;
        if (w.trace_rate <= 0) {
            speedctl_fail("--trace %s: every request arrives at once; no rate to plan for", o.trace);
            goto out;
        }
        if (o.rate <= 0) o.rate = w.trace_rate;
    } else {
        if (o.rate <= 0 || !o.prompt_tokens || !o.output_tokens) {
            speedctl_fail("plan needs --rate R > 0, --prompt-tokens SPEC and --output-tokens SPEC, or --trace FILE");
            goto out;
        }
        if (speed_lg_dist_parse("--prompt-tokens", o.prompt_tokens, &w.plen, err, sizeof err) != SPEED_OK) {
            speedctl_fail("%s", err);
            goto out;
        }
        if (speed_lg_dist_parse("--output-tokens", o.output_tokens, &w.olen, err, sizeof err) != SPEED_OK) {
            speedctl_fail("%s", err);
            goto out;
        }
    }
    double mean_p = 0, mean_o = 0;
    {
        int n;
        speed_plan_request_t *r = workload_at(&w, o.rate, &n);
        if (!r) goto out;
        for (int i = 0; i < n; i++) {
            mean_p += (double)r[i].prompt / n;
            mean_o += (double)r[i].output / n;
        }
        speed_free(r);
    }
    /* the profiles */
    exit_code = SPEEDCTL_EXIT_FAIL;
    for (const char *s = o.profile; *s && n_profs < MAX_PROFILES;) {
        char path[1024];
        size_t len = strcspn(s, ",");
        snprintf(path, sizeof path, "%.*s", (int)len, s);
        if (speed_plan_profile_load(path, &profs[n_profs], err, sizeof err) != SPEED_OK) {
            speedctl_fail("--profile %s", err);
            goto out;
        }
        if (n_profs > 0 && profs[n_profs].n_layers != profs[0].n_layers) {
            speedctl_fail("--profile %s: %d layers, but %d in the first profile (one model per plan)", path,
                          profs[n_profs].n_layers, profs[0].n_layers);
            goto out;
        }
        for (int d = 0; d < profs[n_profs].n_depths; d++) {
            speed_plan_depth_t *pd = &profs[n_profs].depths[d];
            for (int k = 0; k < pd->n_prefill; k++) pd->prefill[k].ms *= o.slowdown;
            for (int k = 0; k < pd->n_decode; k++) pd->decode[k].ms *= o.slowdown;
            for (int k = 0; k < pd->n_transfer; k++) pd->transfer[k].ms *= o.slowdown;
        }
        n_profs++;
        s += len + (s[len] == ',');
    }
    int n_layers = profs[0].n_layers;
    /* the cutoffs and TP sizes asked for */
    int cuts[SPEED_PLAN_MAX_CUTOFFS], n_cuts = 0;
    if (o.prefill_layers && *o.prefill_layers) {
        for (const char *s = o.prefill_layers; *s && n_cuts < SPEED_PLAN_MAX_CUTOFFS;) {
            char item[32];
            size_t len = strcspn(s, ",");
            snprintf(item, sizeof item, "%.*s", (int)len, s);
            speed_depth_t d;
            if (speedctl_depth_resolve(item, o.anchors, o.tail, n_layers, &d) != SPEED_OK) {
                exit_code = SPEEDCTL_EXIT_USAGE;
                goto out;
            }
            if (!speed_plan_profile_depth(&profs[0], d.prefill_layers)) {
                speedctl_fail("--prefill-layers %s: C = %d is not in the profile (run speedctl profile with it)", item,
                              d.prefill_layers);
                exit_code = SPEEDCTL_EXIT_USAGE;
                goto out;
            }
            cuts[n_cuts++] = d.prefill_layers;
            s += len + (s[len] == ',');
        }
    } else {
        for (int i = 0; i < profs[0].n_depths; i++) cuts[n_cuts++] = profs[0].depths[i].prefill_layers;
    }
    bool has_full = false;
    for (int i = 0; i < n_cuts; i++) has_full |= cuts[i] == n_layers;
    if (!has_full && speed_plan_profile_depth(&profs[0], n_layers) && n_cuts < SPEED_PLAN_MAX_CUTOFFS)
        cuts[n_cuts++] = n_layers; /* C = L for the comparison */

    /* 1. rate matching: candidates */
    printf("workload     %.3g requests/s, prompts %s (mean %.0f), outputs %s (mean %.0f); SLOs TTFT p90 %.0f ms, "
           "TPOT p90 %.0f ms; budget %" PRId64 " nodes%s\n",
           o.rate, o.trace ? o.trace : o.prompt_tokens, mean_p, o.trace ? "(trace)" : o.output_tokens, mean_o,
           o.slo_ttft, o.slo_tpot, o.max_nodes, o.host_cores > 0 ? " sharing the host's cores" : "");
    if (o.host_cores > 0) printf("host         %.3g cores shared by every node\n", o.host_cores);
    printf("\nrate matching (one node, requests/s):\n  %4s %3s %12s %12s %8s %8s\n", "C", "TP", "prefill", "decode",
           "min P", "min D");
    for (int pi = 0; pi < n_profs; pi++) {
        const speed_plan_profile_t *pr = &profs[pi];
        int tp = pr->tensor_parallel;
        if (o.tp && *o.tp) {
            char want[16];
            snprintf(want, sizeof want, "%d", tp);
            bool listed = false;
            for (const char *s = o.tp; *s;) {
                size_t len = strcspn(s, ",");
                listed |= len == strlen(want) && strncmp(s, want, len) == 0;
                s += len + (s[len] == ',');
            }
            if (!listed) continue;
        }
        for (int ci = 0; ci < n_cuts; ci++) {
            if (!speed_plan_profile_depth(pr, cuts[ci])) continue;
            double prps, drps;
            rate_match(&o, pr, cuts[ci], mean_p, mean_o, &prps, &drps);
            /* at most 85% busy: beyond it queueing delay grows fast */
            int min_p = (int)ceil(o.rate / (0.85 * prps)),
                min_d = isfinite(drps) ? (int)ceil(o.rate / (0.85 * drps)) : 1;
            printf("  %4d %3d %12.2f %12.2f %8d %8d\n", cuts[ci], tp, prps, drps, min_p, min_d);
            for (int np = 1; np * tp < o.max_nodes; np++)
                for (int nd = 1; (np + nd) * tp <= o.max_nodes && n_cands < MAX_CANDIDATES; nd++) {
                    candidate_t *c = &cands[n_cands];
                    *c = (candidate_t){
                        .c = cuts[ci], .tp = tp, .n_prefill = np, .n_decode = nd, .nodes = (np + nd) * tp, .prof = pr};
                    /* the shared-core budget makes more nodes no faster: keep every candidate then */
                    c->rate_ok = (np >= min_p && nd >= min_d) || o.host_cores > 0;
                    n_cands++;
                }
        }
    }
    if (n_cands == 0) {
        speedctl_fail("no candidate: --max-nodes %" PRId64 " is below 2 x the TP size, or --tp names no profile",
                      o.max_nodes);
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }
    int n_ok = 0;
    for (int i = 0; i < n_cands; i++) n_ok += cands[i].rate_ok;
    if (n_ok == 0) /* nothing fits by rate matching: simulate them all to show how far off they are */
        for (int i = 0; i < n_cands; i++) cands[i].rate_ok = true;

    /* 2. the simulation: at the rate, and the max rate within the SLOs by bisection */
    int n_sim = 0;
    for (int i = 0; i < n_cands; i++) {
        candidate_t *c = &cands[i];
        if (!c->rate_ok) continue;
        if (simulate(&w, c, o.rate, &c->at_rate) != SPEED_OK) goto out;
        c->meets = within(&o, &c->at_rate);
        double lo = 0, hi = o.rate;
        speed_plan_sim_result_t r;
        for (int k = 0; k < 20; k++) { /* find a rate it cannot sustain */
            hi *= 2;
            if (simulate(&w, c, hi, &r) != SPEED_OK) goto out;
            if (!within(&o, &r)) break;
            lo = hi;
        }
        for (int k = 0; k < 14; k++) {
            double mid = 0.5 * (lo + hi);
            if (simulate(&w, c, mid, &r) != SPEED_OK) goto out;
            if (within(&o, &r))
                lo = mid;
            else
                hi = mid;
        }
        c->max_rate = lo;
        c->spare = c->meets && c->max_rate >= o.rate * (1 + o.headroom);
        cands[n_sim++] = *c;
    }
    n_cands = n_sim;
    qsort(cands, (size_t)n_cands, sizeof *cands, cmp_candidates);

    printf("\ncandidates (simulated at %.3g requests/s; max rate = the highest within both SLOs):\n", o.rate);
    printf("  %4s %3s %7s %6s %5s %10s %10s %10s %10s %9s  %s\n", "C", "TP", "prefill", "decode", "nodes", "TTFT p90",
           "TPOT p90", "goodput", "max rate", "busy P/D", "");
    for (int i = 0; i < n_cands; i++) {
        const candidate_t *c = &cands[i];
        printf("  %4d %3d %7d %6d %5d %8.1fms %8.2fms %10.3g %10.3g %4.0f/%-4.0f  %s\n", c->c, c->tp, c->n_prefill,
               c->n_decode, c->nodes, c->at_rate.ttft_p90_ms, c->at_rate.tpot_p90_ms, c->at_rate.goodput_rps,
               c->max_rate, 100 * c->at_rate.prefill_busy, 100 * c->at_rate.decode_busy,
               i == 0 && c->meets     ? "<- recommended"
               : c->spare             ? "meets"
               : c->meets             ? "meets, no headroom"
               : c->at_rate.saturated ? "saturated"
                                      : "misses");
    }
    const candidate_t *best = &cands[0];
    if (!best->meets) {
        if (o.out) { /* the candidates still tell how far off each one is */
            char path[4096];
            snprintf(path, sizeof path, "%s/plan.json", o.out);
            if ((mkdir(o.out, 0755) == 0 || errno == EEXIST) &&
                write_json(&o, cands, n_cands, path, mean_p, mean_o, (int)o.decode_max_running, 8) == SPEED_OK)
                printf("candidates   %s (no recommendation)\n", path);
        }
        speedctl_fail("no candidate within %" PRId64 " nodes meets TTFT p90 <= %.0f ms and TPOT p90 <= %.0f ms at %.3g "
                      "requests/s (best: %d prefill + %d decode at C = %d, max %.3g requests/s within the SLOs); raise "
                      "--max-nodes, lower --rate or loosen the SLOs",
                      o.max_nodes, o.slo_ttft, o.slo_tpot, o.rate, best->n_prefill, best->n_decode, best->c,
                      best->max_rate);
        goto out;
    }
    /* 3. C = L against the recommendation */
    printf("\nrecommended  %d prefill + %d decode node(s), TP %d, C = %d of %d: TTFT p90 %.1f ms, TPOT p90 %.2f ms "
           "predicted at %.3g requests/s; sustains %.3g requests/s within the SLOs\n",
           best->n_prefill, best->n_decode, best->tp, best->c, n_layers, best->at_rate.ttft_p90_ms,
           best->at_rate.tpot_p90_ms, o.rate, best->max_rate);
    if (!best->spare)
        printf(
            "headroom     none of the candidates sustains %.3g requests/s (--headroom %.2f): this one meets the SLOs "
            "at the rate with the least to spare; predictions near a cluster's limit are the least sure\n",
            o.rate * (1 + o.headroom), o.headroom);
    if (best->c != n_layers) {
        const candidate_t *full = NULL;
        for (int i = 0; i < n_cands && !full; i++)
            if (cands[i].c == n_layers && cands[i].meets) full = &cands[i];
        double prps_c, prps_l, drps;
        rate_match(&o, best->prof, best->c, mean_p, mean_o, &prps_c, &drps);
        if (speed_plan_profile_depth(best->prof, n_layers)) {
            rate_match(&o, best->prof, n_layers, mean_p, mean_o, &prps_l, &drps);
            printf("SPEED        one prefill node serves %.2f requests/s at C = %d, %.2f at C = L = %d (%.2fx); ",
                   prps_c, best->c, prps_l, n_layers, prps_c / prps_l);
            if (full)
                printf("C = L needs %d prefill + %d decode within the SLOs: %d fewer prefill node(s) with SPEED\n",
                       full->n_prefill, full->n_decode, full->n_prefill - best->n_prefill);
            else
                printf("at C = L no candidate within %" PRId64 " nodes meets the SLOs (rate matching: %d prefill "
                       "nodes at C = L vs %d at C = %d)\n",
                       o.max_nodes, (int)ceil(o.rate / (0.85 * prps_l)), (int)ceil(o.rate / (0.85 * prps_c)), best->c);
        } else {
            printf("SPEED        C = L = %d was not profiled: no comparison\n", n_layers);
        }
    }
    /* per-node limits, from the simulation at the max rate */
    speed_plan_sim_result_t at_max;
    if (simulate(&w, best, best->max_rate > 0 ? best->max_rate : o.rate, &at_max) != SPEED_OK) goto out;
    int decode_running = round_up4((int)ceil(1.25 * at_max.decode_running_p99));
    if (decode_running > o.decode_max_running) decode_running = (int)o.decode_max_running;
    int prefill_waiting = 2 * at_max.prefill_waiting_p99 < 8 ? 8 : 2 * at_max.prefill_waiting_p99;
    int decode_waiting = 8;
    printf("limits       prefill: max_running %" PRId64 ", max_waiting %d; decode: max_running %d, max_waiting %d "
           "(decode batch p99 %d, prefill queue p99 %d at the max rate)\n",
           o.prefill_max_running, prefill_waiting, decode_running, decode_waiting, at_max.decode_running_p99,
           at_max.prefill_waiting_p99);
    if (o.out) {
        char path[4096];
        if (mkdir(o.out, 0755) != 0 && errno != EEXIST) {
            speedctl_fail("--out %s: %s", o.out, strerror(errno));
            goto out;
        }
        snprintf(path, sizeof path, "%s/cluster.yaml", o.out);
        if (write_yaml(&o, best, path, o.model ? o.model : best->prof->model, decode_running, decode_waiting,
                       prefill_waiting, mean_p, mean_o) != SPEED_OK) {
            speedctl_fail("%s: cannot write the cluster file", path);
            goto out;
        }
        printf("cluster      %s (speedctl up %s)\n", path, path);
        if (o.emit == 1) {
            char k8s_dir[4096];
            snprintf(k8s_dir, sizeof k8s_dir, "%s/k8s", o.out);
            if (emit_k8s(&o, path, k8s_dir) != SPEED_OK) goto out;
            printf("kubernetes   %s (kubectl apply -k %s; docs/kubernetes.md)\n", k8s_dir, k8s_dir);
        }
        snprintf(path, sizeof path, "%s/plan.json", o.out);
        if (write_json(&o, cands, n_cands, path, mean_p, mean_o, decode_running, prefill_waiting) != SPEED_OK) {
            speedctl_fail("%s: cannot write the plan", path);
            goto out;
        }
    }
    exit_code = SPEEDCTL_EXIT_OK;
out:
    speed_free(w.trace);
    speed_free(profs);
    speed_free(cands);
    speed_config_destroy(opts.cfg);
    return exit_code;
}
