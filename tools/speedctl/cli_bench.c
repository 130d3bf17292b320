/* speedctl bench: prefill and decode speed, KV bytes and memory of the engine on a model,
 * against this machine's roofline measured in the same run. */
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "alloc.h"
#include "clock.h"
#include "engine.h"
#include "log.h"
#include "model.h"
#include "rng.h"
#include "roofline.h"
#include "sampler.h"
#include "speedctl.h"

typedef struct {
    speedctl_engine_opts_t engine; /* --model, --backend, --prefill-layers, ... (speedctl.h) */
    int64_t prompt_tokens, gen_tokens, batch, repeat, seed, roofline_mib;
    bool json, compare, roofline, hugepages;
} bench_opts_t;

/* bench's own options; bench_parts puts the table together (the engine's first) */
static const speed_config_field_t bench_fields[] = {
    {"prompt_tokens", SPEED_CONFIG_INT, offsetof(bench_opts_t, prompt_tokens), "512", 1, 1 << 24, NULL,
     "prompt length (random token ids)"},
    {"gen_tokens", SPEED_CONFIG_INT, offsetof(bench_opts_t, gen_tokens), "32", 1, 1 << 20, NULL,
     "tokens generated per sequence (the first comes from the prefill)"},
    {"batch", SPEED_CONFIG_INT, offsetof(bench_opts_t, batch), "1", 1, 4096, NULL,
     "also measure decode with this many sequences at once (1 = batch 1 only)"},
    {"compare", SPEED_CONFIG_BOOL, offsetof(bench_opts_t, compare), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "run C = L and the given C on the same prompt and print their ratios"},
    {"repeat", SPEED_CONFIG_INT, offsetof(bench_opts_t, repeat), "3", 1, 1000, NULL,
     "repetitions of every measurement; the median is reported"},
    {"seed", SPEED_CONFIG_INT, offsetof(bench_opts_t, seed), "1", 0, 9.2e18, NULL, "seed of the random prompt"},
    {"roofline", SPEED_CONFIG_BOOL, offsetof(bench_opts_t, roofline), "true", SPEED_CONFIG_UNBOUNDED, NULL,
     "measure the machine's read bandwidth and compute peaks, on --threads threads (--no-roofline skips them)"},
    {"hugepages", SPEED_CONFIG_BOOL, offsetof(bench_opts_t, hugepages), "true", SPEED_CONFIG_UNBOUNDED, NULL,
     "read the weights into 2 MiB pages (a load-time copy; decode streams them with fewer TLB misses); "
     "--no-hugepages maps the file"},
    {"roofline_mib", SPEED_CONFIG_INT, offsetof(bench_opts_t, roofline_mib), "1024", 1, 1 << 20, NULL,
     "bandwidth probe buffer in MiB (much larger than the last-level cache)"},
    {"json", SPEED_CONFIG_BOOL, offsetof(bench_opts_t, json), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "print one JSON object"},
};
static const speedctl_options_part_t bench_parts[] = {
    SPEEDCTL_ENGINE_PART(bench_opts_t, engine),
    SPEEDCTL_OWN_PART(bench_fields),
};

/* Medians and byte counts of one depth. */
typedef struct {
    speed_depth_t depth;       /* resolved */
    double prefill_s, ttft_s;  /* medians */
    double tpot_s;             /* decode at batch 1: wall time per generated token (step + sampling) */
    double batch_tokens_per_s; /* decode at batch N (0 when N = 1) */
    double batch_step_s;
    /* batch N > 1: 1 when every sequence of the batch-N run chose the same tokens with the same
     * logprobs (bit for bit) as the batch-1 run, 0 when one differs (--batch-invariant makes
     * it 1; without, the few-row and many-row kernels may disagree in the last bits); -1 = not
     * measured */
    int batch_matches;
    size_t kv_prompt;      /* engine's exact bytes after the prefill */
    size_t kv_formula;     /* docs/design.md §1 for the prompt */
    size_t kv_prompt_full; /* the same prompt at full depth */
    size_t kv_end;         /* after the last generated token */
    size_t kv_reserved;    /* whole blocks of the sequence */
    double prefill_flops;  /* FLOPs the prefill does at this depth */
    double decode_bytes;   /* bytes read per decoded token at batch 1 (weights + KV), mean */
    size_t kv_pool_bytes, scratch_bytes, weight_bytes;
    /* With the roofline on, each repetition is followed at once by short compute and
     * bandwidth probes, and the fractions below are medians of per-repetition ratios: on a
     * shared machine whose speed drifts, a ratio of two measurements taken seconds apart is
     * far steadier than one of measurements taken a minute apart. 0 = not measured. */
    double prefill_frac, decode_frac;
    size_t rss_max; /* resident set sampled after each run (engine + weights) */
} bench_result_t;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* FLOPs of a prefill of n tokens at depth d (engine/model: the one formula, speedctl eval's too). */
static double prefill_flops(const speed_model_config_t *c, speed_depth_t d, int64_t n) {
    return speed_prefill_flops(c, d.prefill_layers, d.anchors, d.tail, n);
}

/* Bytes one decode step at batch 1 reads: every weight (the embedding table only one row,
 * unless it doubles as the output projection) plus the KV entries attention reads. */
static double decode_weight_bytes(const speed_model_t *m) {
    double total = (double)speed_model_n_bytes(m);
    if (!m->config.tie_word_embeddings) {
        const speed_tensor_t *e = m->tok_embeddings;
        double row = (double)m->config.hidden * (double)speed_dtype_size(e->dtype);
        total -= (double)m->config.vocab_size * row - row;
    }
    return total;
}

/* Resident set size now, from /proc/self/statm (0 if unavailable). */
static size_t rss_now(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long size = 0, resident = 0;
    if (f) {
        if (fscanf(f, "%lu %lu", &size, &resident) != 2) resident = 0;
        fclose(f);
    }
    return (size_t)resident * (size_t)sysconf(_SC_PAGESIZE);
}

static speed_status_t step_checked(speed_engine_t *eng, speed_engine_step_result_t *r) {
    SPEED_CHECK(speed_engine_step(eng, r));
    if (r->n_outputs == 0 && !speed_engine_has_work(eng)) {
        SPEED_ERROR(SPEED_SUBSYS_CLI, "bench: the engine stopped producing output (internal error)");
        return SPEED_ERR_INTERNAL;
    }
    return SPEED_OK;
}


/* The per-step bandwidth probe's buffer: 8x the largest last-level caches here, ~7 ms a read. */
#define PROBE_BYTES ((size_t)256 << 20)

/* Per-token pairing of decode steps with a bandwidth probe (batch-1 runs, roofline on). */
typedef struct {
    speed_roofline_probe_t *probe;
    double weight_bytes; /* + the sequence's KV = bytes one step reads */
    double *ratios;      /* [cap]: step bandwidth / probe bandwidth */
    int n, cap;
} token_pairing_t;

/* The greedy choices of a run: ids and their logprobs, [n_seqs][gen]. */
typedef struct {
    int32_t *ids;
    float *logprobs;
} token_trace_t;

static void trace_put(token_trace_t *tr, int64_t gen, int k, int64_t i, const speed_sample_t *s) {
    if (!tr) return;
    tr->ids[(int64_t)k * gen + i] = s->id;
    tr->logprobs[(int64_t)k * gen + i] = s->logprob;
}

/* Runs n_seqs copies of the prompt to gen tokens each. With n_seqs 1 it records the prefill,
 * TTFT, batch-1 decode and KV; with more, the batch decode rate. trace (optional) receives every
 * sequence's greedy choices. */
static speed_status_t bench_once(speed_engine_t *eng, speed_sampler_t *sampler, const int32_t *prompt, int64_t n,
                                 const speed_depth_t *depth, int64_t gen, int n_seqs, double *prefill_s, double *ttft_s,
                                 double *decode_s, size_t *kv_prompt_p, size_t *kv_end_p, size_t *kv_reserved_p,
                                 token_pairing_t *pair, token_trace_t *trace) {
    speed_status_t st = SPEED_OK;
    speed_seq_id_t *ids = speed_calloc((size_t)n_seqs, sizeof *ids);
    int32_t *next = speed_calloc((size_t)n_seqs, sizeof *next);
    int n_added = 0;
    if (!ids || !next) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    speed_sampling_params_t greedy = speed_sampling_default_params();
    greedy.temperature = 0.0f;
    int32_t n_vocab = speed_engine_n_vocab(eng);
    double t0 = speed_clock_mono_s();
    for (; n_added < n_seqs; n_added++)
        SPEED_CHECK_GOTO(speed_engine_seq_add(eng, prompt, n, depth, gen, &ids[n_added]), st, out);
    /* Prefill every sequence: each gets its first token. */
    int n_first = 0;
    while (n_first < n_seqs) {
        speed_engine_step_result_t r;
        SPEED_CHECK_GOTO(step_checked(eng, &r), st, out);
        for (int i = 0; i < r.n_outputs; i++) {
            speed_sample_t s;
            SPEED_CHECK_GOTO(speed_sampler_sample(sampler, &greedy, NULL, r.outputs[i].logits, n_vocab, &s), st, out);
            for (int k = 0; k < n_seqs; k++)
                if (ids[k] == r.outputs[i].seq) {
                    next[k] = s.id;
                    trace_put(trace, gen, k, 0, &s);
                }
            n_first++;
        }
    }
    double t_first = speed_clock_mono_s();
    speed_engine_seq_stats_t stats;
    SPEED_CHECK_GOTO(speed_engine_seq_stats(eng, ids[0], &stats), st, out);
    if (prefill_s) *prefill_s = (double)stats.prefill_ns / 1e9;
    if (ttft_s) *ttft_s = t_first - t0;
    if (kv_prompt_p) *kv_prompt_p = stats.kv_bytes_used;
    if (kv_reserved_p) *kv_reserved_p = stats.kv_bytes_reserved;
    /* Decode: gen - 1 more tokens per sequence, every step feeding all of them. With a
     * pairing, each step is followed by a bandwidth probe (not counted in decode_s). */
    double decode_total = 0.0;
    double step_bytes = pair ? pair->weight_bytes + (double)stats.kv_bytes_used : 0.0;
    for (int64_t produced = 1; produced < gen; produced++) {
        double ts = speed_clock_mono_s();
        for (int k = 0; k < n_seqs; k++) SPEED_CHECK_GOTO(speed_engine_seq_append(eng, ids[k], next[k]), st, out);
        int got = 0;
        while (got < n_seqs) {
            speed_engine_step_result_t r;
            SPEED_CHECK_GOTO(step_checked(eng, &r), st, out);
            for (int i = 0; i < r.n_outputs; i++) {
                speed_sample_t s;
                SPEED_CHECK_GOTO(speed_sampler_sample(sampler, &greedy, NULL, r.outputs[i].logits, n_vocab, &s), st,
                                 out);
                for (int k = 0; k < n_seqs; k++)
                    if (ids[k] == r.outputs[i].seq) {
                        next[k] = s.id;
                        trace_put(trace, gen, k, produced, &s);
                    }
                got++;
            }
        }
        double step = speed_clock_mono_s() - ts;
        decode_total += step;
        if (pair && n_seqs == 1 && pair->n < pair->cap) {
            double gbs;
            SPEED_CHECK_GOTO(speed_roofline_probe_read(pair->probe, 1, &gbs), st, out);
            pair->ratios[pair->n++] = step_bytes / step / 1e9 / gbs;
        }
    }
    if (decode_s) *decode_s = decode_total;
    SPEED_CHECK_GOTO(speed_engine_seq_stats(eng, ids[0], &stats), st, out);
    if (kv_end_p) *kv_end_p = stats.kv_bytes_used;
out:
    for (int k = 0; k < n_added; k++) speed_engine_seq_remove(eng, ids[k]);
    speed_free(ids);
    speed_free(next);
    return st;
}

/* One depth's engine and per-repetition samples. */
typedef struct {
    speed_depth_t depth;
    speed_engine_t *eng;
    speed_sampler_t *sampler;
    double *v;            /* [6][n_rep]: prefill, ttft, decode, batch, peak, bandwidth */
    token_pairing_t pair; /* decode steps paired with bandwidth probes (roofline on) */
    token_trace_t one;    /* the batch-1 run's choices [gen] */
    token_trace_t many;   /* the batch-N run's [batch][gen] (batch > 1) */
} depth_run_t;

static void depth_run_free(depth_run_t *d) {
    speed_free(d->pair.ratios); /* the probe belongs to bench_depths */
    speed_sampler_destroy(d->sampler);
    speed_engine_destroy(d->eng);
    speed_free(d->v);
    speed_free(d->one.ids);
    speed_free(d->one.logprobs);
    speed_free(d->many.ids);
    speed_free(d->many.logprobs);
    memset(d, 0, sizeof *d);
}

/* Engine of its own (its KV pools split at C), warmed up. */
static speed_status_t depth_setup(const bench_opts_t *o, const speed_model_t *model, const speedctl_ranks_t *ranks,
                                  const int32_t *prompt, speed_depth_t depth, speed_roofline_probe_t *probe,
                                  depth_run_t *d, bench_result_t *res) {
    int batch = (int)o->batch;
    speed_engine_params_t ep = speedctl_engine_params(&o->engine, ranks, model, depth);
    ep.max_seqs = batch;
    if (ep.max_step_tokens < batch) ep.max_step_tokens = batch;
    memset(d, 0, sizeof *d);
    memset(res, 0, sizeof *res);
    d->depth = depth;
    d->v = speed_calloc((size_t)o->repeat * 6, sizeof *d->v);
    if (!d->v) return SPEED_ERR_NO_MEMORY;
    const size_t gen = (size_t)o->gen_tokens;
    d->one.ids = speed_calloc(gen, sizeof *d->one.ids);
    d->one.logprobs = speed_calloc(gen, sizeof *d->one.logprobs);
    d->many.ids = speed_calloc(gen * (size_t)batch, sizeof *d->many.ids);
    d->many.logprobs = speed_calloc(gen * (size_t)batch, sizeof *d->many.logprobs);
    if (!d->one.ids || !d->one.logprobs || !d->many.ids || !d->many.logprobs) return SPEED_ERR_NO_MEMORY;
    SPEED_CHECK(speed_engine_params_fit_kv(&ep, batch, o->prompt_tokens, o->gen_tokens));
    SPEED_CHECK(speed_engine_create(&ep, &d->eng));
    SPEED_CHECK(speed_sampler_create(speed_engine_n_vocab(d->eng), &d->sampler));
    res->depth = speed_engine_depth(d->eng);
    res->depth.anchors = depth.anchors;
    res->depth.tail = depth.tail;
    if (probe) {
        d->pair.probe = probe;
        d->pair.cap = (int)(o->repeat * (o->gen_tokens - 1));
        d->pair.ratios = speed_calloc((size_t)d->pair.cap, sizeof *d->pair.ratios);
        if (!d->pair.ratios) return SPEED_ERR_NO_MEMORY;
        d->pair.weight_bytes = decode_weight_bytes(model);
    }
    /* Warm-up: a short run touches every weight page and the scratch. */
    int64_t n = o->prompt_tokens;
    return bench_once(d->eng, d->sampler, prompt, n < 8 ? n : 8, &depth, 2, 1, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                      NULL);
}

/* Repetition r: the batch-1 run, then (roofline on) the paired peak and bandwidth probes. */
static speed_status_t depth_rep(const bench_opts_t *o, const speed_model_t *model, const int32_t *prompt, int r,
                                depth_run_t *d, bench_result_t *res) {
    int n_rep = (int)o->repeat;
    double *pre = d->v, *ttft = d->v + n_rep, *dec = d->v + 2 * n_rep, *peak = d->v + 4 * n_rep, *bw = d->v + 5 * n_rep;
    SPEED_CHECK(bench_once(d->eng, d->sampler, prompt, o->prompt_tokens, &d->depth, o->gen_tokens, 1, &pre[r], &ttft[r],
                           &dec[r], &res->kv_prompt, &res->kv_end, &res->kv_reserved, d->pair.probe ? &d->pair : NULL,
                           &d->one));
    size_t rss = rss_now();
    if (d->pair.probe) rss -= PROBE_BYTES < rss ? PROBE_BYTES : rss; /* the probe's buffer is not the engine's */
    if (rss > res->rss_max) res->rss_max = rss;
    if (o->roofline) {
        speed_roofline_params_t rp = speed_roofline_default_params();
        rp.n_threads = o->engine.threads > 0 ? (int)o->engine.threads : 0;
        rp.read_bytes = (size_t)o->roofline_mib << 20;
        rp.repetitions = 3;
        rp.compute_ms = 30;
        double fp32, bf;
        SPEED_CHECK(speed_roofline_compute(&rp, &fp32, &bf, NULL));
        peak[r] = model->config.torch_dtype == SPEED_DTYPE_BF16 ? bf : fp32;
        if (!d->pair.probe) SPEED_CHECK(speed_roofline_bandwidth(&rp, &bw[r], NULL));
    }
    return SPEED_OK;
}

/* Medians, the batch-N runs, byte counts. */
static speed_status_t depth_finish(const bench_opts_t *o, const speed_model_t *model, const int32_t *prompt,
                                   depth_run_t *d, bench_result_t *res) {
    const speed_model_config_t *mc = &model->config;
    int n_rep = (int)o->repeat, batch = (int)o->batch;
    int64_t n = o->prompt_tokens, gen = o->gen_tokens;
    double *pre = d->v, *ttft = d->v + n_rep, *dec = d->v + 2 * n_rep, *bat = d->v + 3 * n_rep;
    double *peak = d->v + 4 * n_rep, *bw = d->v + 5 * n_rep;
    res->prefill_flops = prefill_flops(mc, res->depth, n);
    res->decode_bytes = decode_weight_bytes(model) + 0.5 * (double)(res->kv_prompt + res->kv_end);
    if (o->roofline) {
        double *fr = speed_calloc((size_t)n_rep, sizeof *fr);
        if (!fr) return SPEED_ERR_NO_MEMORY;
        for (int r = 0; r < n_rep; r++) fr[r] = res->prefill_flops / pre[r] / 1e9 / peak[r];
        res->prefill_frac = median(fr, n_rep);
        if (d->pair.n > 0) {
            res->decode_frac = median(d->pair.ratios, d->pair.n); /* per decode step */
        } else if (gen > 1) {
            for (int r = 0; r < n_rep; r++) fr[r] = res->decode_bytes / (dec[r] / (double)(gen - 1)) / 1e9 / bw[r];
            res->decode_frac = median(fr, n_rep);
        }
        speed_free(fr);
    }
    double *tmp = speed_calloc((size_t)n_rep, sizeof *tmp); /* median sorts: keep the samples in order */
    if (!tmp) return SPEED_ERR_NO_MEMORY;
    memcpy(tmp, pre, (size_t)n_rep * sizeof *tmp);
    res->prefill_s = median(tmp, n_rep);
    memcpy(tmp, ttft, (size_t)n_rep * sizeof *tmp);
    res->ttft_s = median(tmp, n_rep);
    memcpy(tmp, dec, (size_t)n_rep * sizeof *tmp);
    res->tpot_s = gen > 1 ? median(tmp, n_rep) / (double)(gen - 1) : 0.0;
    speed_free(tmp);
    res->batch_matches = -1;
    if (batch > 1 && gen > 1) {
        for (int r = 0; r < n_rep; r++)
            SPEED_CHECK(bench_once(d->eng, d->sampler, prompt, n, &d->depth, gen, batch, NULL, NULL, &bat[r], NULL,
                                   NULL, NULL, NULL, &d->many));
        /* the same prompt in every row of the batch: with --batch-invariant each row must make
         * exactly the batch-1 run's choices */
        res->batch_matches = 1;
        for (int k = 0; k < batch; k++)
            if (memcmp(d->many.ids + (size_t)k * gen, d->one.ids, (size_t)gen * sizeof *d->one.ids) != 0 ||
                memcmp(d->many.logprobs + (size_t)k * gen, d->one.logprobs, (size_t)gen * sizeof *d->one.logprobs) != 0)
                res->batch_matches = 0;
        double t = median(bat, n_rep);
        res->batch_tokens_per_s = (double)batch * (double)(gen - 1) / t;
        res->batch_step_s = t / (double)(gen - 1);
    }
    speed_dtype_t kvd = (speed_dtype_t)o->engine.kv.kv_dtype;
    res->kv_formula = speed_kv_bytes_for_prompt(mc, res->depth.prefill_layers, d->depth.anchors, d->depth.tail, n, kvd);
    res->kv_prompt_full = speed_kv_bytes_for_prompt(mc, mc->n_layers, d->depth.anchors, d->depth.tail, n, kvd);
    speed_engine_stats_t es;
    speed_engine_stats(d->eng, &es);
    res->kv_pool_bytes = es.kv.bytes_total[SPEED_KV_POOL_LOWER] + es.kv.bytes_total[SPEED_KV_POOL_UPPER];
    res->scratch_bytes = es.scratch_bytes;
    res->weight_bytes = es.weight_bytes;
    return SPEED_OK;
}

/* Every depth (one, or full depth and C with --compare) on engines alive side by side, their
 * repetitions interleaved (full, C, full, C, ...) so that both see the same machine: the
 * per-repetition ratios C / full (medians in *prefill_ratio_p / *tpot_ratio_p) are then
 * steady even while neighbours come and go on a shared host. */
/* Both depths' engines in lockstep: one step of A, one step of B, and so on, each step timed,
 * until both generated gen tokens. Then *prefill_ratio_p / *tpot_ratio_p = B / A of the summed
 * prefill and decode step times. Steps seconds apart see the same machine, which the
 * whole-run timings on a shared host do not. */
static speed_status_t lockstep_once(const bench_opts_t *o, depth_run_t *d, const int32_t *prompt,
                                    double *prefill_ratio_p, double *tpot_ratio_p) {
    speed_seq_id_t id[2] = {-1, -1};
    int32_t next[2] = {0, 0};
    int64_t produced[2] = {0, 0};
    double t_pre[2] = {0, 0}, t_dec[2] = {0, 0};
    speed_sampling_params_t greedy = speed_sampling_default_params();
    greedy.temperature = 0.0f;
    speed_status_t st = SPEED_OK;
    for (int i = 0; i < 2 && st == SPEED_OK; i++)
        st = speed_engine_seq_add(d[i].eng, prompt, o->prompt_tokens, &d[i].depth, o->gen_tokens, &id[i]);
    while (st == SPEED_OK && (produced[0] < o->gen_tokens || produced[1] < o->gen_tokens)) {
        for (int i = 0; i < 2 && st == SPEED_OK; i++) {
            if (produced[i] >= o->gen_tokens) continue;
            if (produced[i] > 0) {
                st = speed_engine_seq_append(d[i].eng, id[i], next[i]);
                if (st != SPEED_OK) break;
            }
            double t0 = speed_clock_mono_s();
            speed_engine_step_result_t r;
            st = step_checked(d[i].eng, &r);
            for (int k = 0; st == SPEED_OK && k < r.n_outputs; k++) {
                speed_sample_t smp;
                st = speed_sampler_sample(d[i].sampler, &greedy, NULL, r.outputs[k].logits,
                                          speed_engine_n_vocab(d[i].eng), &smp);
                next[i] = smp.id;
            }
            double t = speed_clock_mono_s() - t0;
            if (produced[i] == 0)
                t_pre[i] += t; /* the prefill chunks, up to the first token */
            else
                t_dec[i] += t;
            if (st == SPEED_OK && r.n_outputs > 0) produced[i]++;
        }
    }
    for (int i = 0; i < 2; i++)
        if (id[i] >= 0) speed_engine_seq_remove(d[i].eng, id[i]);
    if (st == SPEED_OK) {
        *prefill_ratio_p = t_pre[1] / t_pre[0];
        *tpot_ratio_p = t_dec[0] > 0 ? t_dec[1] / t_dec[0] : 0.0;
    }
    return st;
}

static speed_status_t bench_depths(const bench_opts_t *o, const speed_model_t *model, const speedctl_ranks_t *ranks,
                                   const int32_t *prompt, const speed_depth_t *depths, int n_depths,
                                   bench_result_t *res, double *prefill_ratio_p, double *tpot_ratio_p,
                                   double *prefill_min_ratio_p, double *tpot_min_ratio_p) {
    depth_run_t d[2];
    memset(d, 0, sizeof d);
    int n_rep = (int)o->repeat;
    speed_status_t st = SPEED_OK;
    speed_roofline_probe_t *probe = NULL;
    if (o->roofline && o->gen_tokens > 1) {
        speed_roofline_params_t rp = speed_roofline_default_params();
        rp.n_threads = o->engine.threads > 0 ? (int)o->engine.threads : 0;
        rp.read_bytes = PROBE_BYTES;
        st = speed_roofline_probe_create(&rp, &probe);
    }
    for (int i = 0; i < n_depths && st == SPEED_OK; i++)
        st = depth_setup(o, model, ranks, prompt, depths[i], probe, &d[i], &res[i]);
    for (int r = 0; r < n_rep && st == SPEED_OK; r++)
        for (int i = 0; i < n_depths && st == SPEED_OK; i++) st = depth_rep(o, model, prompt, r, &d[i], &res[i]);
    if (st == SPEED_OK && n_depths == 2) {
        double *ratio = speed_calloc((size_t)n_rep * 2, sizeof *ratio);
        if (!ratio) st = SPEED_ERR_NO_MEMORY;
        for (int r = 0; st == SPEED_OK && r < n_rep; r++)
            st = lockstep_once(o, d, prompt, &ratio[r], &ratio[n_rep + r]);
        if (st == SPEED_OK) {
            *prefill_ratio_p = median(ratio, n_rep);
            *tpot_ratio_p = median(ratio + n_rep, n_rep);
        }
        speed_free(ratio);
        /* Interference on a shared host only ever adds time: each depth's fastest repetition is
         * its least disturbed one, and the ratio of those is the other estimate printed. */
        double mn[2][2] = {{1e300, 1e300}, {1e300, 1e300}};
        for (int i = 0; i < 2; i++)
            for (int r = 0; r < n_rep; r++) {
                if (d[i].v[r] < mn[i][0]) mn[i][0] = d[i].v[r];
                if (d[i].v[2 * n_rep + r] < mn[i][1]) mn[i][1] = d[i].v[2 * n_rep + r];
            }
        *prefill_min_ratio_p = mn[1][0] / mn[0][0];
        *tpot_min_ratio_p = mn[0][1] > 0 ? mn[1][1] / mn[0][1] : 0.0;
    }
    for (int i = 0; i < n_depths && st == SPEED_OK; i++) st = depth_finish(o, model, prompt, &d[i], &res[i]);
    for (int i = 0; i < n_depths; i++) depth_run_free(&d[i]);
    speed_roofline_probe_destroy(probe);
    return st;
}


static void result_print(const bench_result_t *r, const bench_opts_t *o, int n_layers, const speed_roofline_t *rf,
                         bool have_rf, speed_dtype_t wdtype) {
    char b1[32], b2[32], b3[32];
    printf("\nC=%d of %d%s, A=%d, T=%d\n", r->depth.prefill_layers, n_layers,
           r->depth.prefill_layers == n_layers ? " (SPEED off)" : "", r->depth.anchors, r->depth.tail);
    double pre_gflops = r->prefill_flops / r->prefill_s / 1e9;
    double peak = wdtype == SPEED_DTYPE_BF16 ? (have_rf ? rf->bf16_gflops : 0) : (have_rf ? rf->fp32_gflops : 0);
    printf("  prefill      %" PRId64 " tokens in %.2f ms = %.1f tokens/s; %.3g GFLOP -> %.1f GFLOP/s", o->prompt_tokens,
           r->prefill_s * 1e3, (double)o->prompt_tokens / r->prefill_s, r->prefill_flops / 1e9, pre_gflops);
    if (r->prefill_frac > 0)
        printf(" = %.1f%% of the %s peak", 100.0 * r->prefill_frac, wdtype == SPEED_DTYPE_BF16 ? "bf16" : "fp32");
    else if (peak > 0)
        printf(" = %.1f%% of the %s peak", 100.0 * pre_gflops / peak, wdtype == SPEED_DTYPE_BF16 ? "bf16" : "fp32");
    printf("\n  TTFT         %.2f ms\n", r->ttft_s * 1e3);
    if (o->gen_tokens > 1) {
        double gbs = r->decode_bytes / r->tpot_s / 1e9;
        speedctl_bytes_human(r->decode_bytes, 2, b1, sizeof b1);
        printf("  decode b=1   %.2f ms/token = %.2f tokens/s; reads %s/token -> %.2f GB/s", r->tpot_s * 1e3,
               1.0 / r->tpot_s, b1, gbs);
        if (r->decode_frac > 0)
            printf(" = %.1f%% of the read bandwidth", 100.0 * r->decode_frac);
        else if (have_rf)
            printf(" = %.1f%% of the read bandwidth", 100.0 * gbs / rf->read_gbs);
        printf("\n");
        if (r->batch_tokens_per_s > 0)
            printf("  decode b=%-3" PRId64 " %.2f tokens/s (%.2f ms per step of %" PRId64
                   " tokens); tokens and logprobs %s batch 1's\n",
                   o->batch, r->batch_tokens_per_s, r->batch_step_s * 1e3, o->batch,
                   r->batch_matches == 1 ? "equal" : "differ from");
    }
    speedctl_bytes_human((double)r->kv_prompt, 2, b1, sizeof b1);
    speedctl_bytes_human((double)r->kv_formula, 2, b2, sizeof b2);
    speedctl_bytes_human((double)r->kv_prompt_full, 2, b3, sizeof b3);
    printf("  KV           prompt %s (%zu B) vs formula %s (%+.3f%%); full depth %s -> %.1f%%; "
           "at the end %zu B, %zu B reserved\n",
           b1, r->kv_prompt, b2,
           r->kv_formula ? 100.0 * ((double)r->kv_prompt - (double)r->kv_formula) / (double)r->kv_formula : 0.0, b3,
           r->kv_prompt_full ? 100.0 * (double)r->kv_prompt / (double)r->kv_prompt_full : 0.0, r->kv_end,
           r->kv_reserved);
}

static json_t *result_json(const bench_result_t *r, const bench_opts_t *o, const speed_roofline_t *rf, bool have_rf,
                           speed_dtype_t wdtype) {
    json_t *j = json_object();
    json_object_set_new(j, "prefill_layers", json_integer(r->depth.prefill_layers));
    json_object_set_new(j, "anchors", json_integer(r->depth.anchors));
    json_object_set_new(j, "tail", json_integer(r->depth.tail));
    json_object_set_new(j, "prefill_ms", json_real(r->prefill_s * 1e3));
    json_object_set_new(j, "prefill_tokens_per_s", json_real((double)o->prompt_tokens / r->prefill_s));
    json_object_set_new(j, "prefill_flops", json_real(r->prefill_flops));
    json_object_set_new(j, "ttft_ms", json_real(r->ttft_s * 1e3));
    json_object_set_new(j, "decode_ms_per_token", json_real(r->tpot_s * 1e3));
    json_object_set_new(j, "decode_tokens_per_s", json_real(r->tpot_s > 0 ? 1.0 / r->tpot_s : 0.0));
    json_object_set_new(j, "decode_bytes_per_token", json_real(r->decode_bytes));
    json_object_set_new(j, "batch_decode_tokens_per_s", json_real(r->batch_tokens_per_s));
    if (r->batch_matches >= 0) json_object_set_new(j, "batch_matches_batch1", json_boolean(r->batch_matches == 1));
    json_t *kv = json_object();
    json_object_set_new(kv, "prompt_bytes", json_integer((json_int_t)r->kv_prompt));
    json_object_set_new(kv, "formula_bytes", json_integer((json_int_t)r->kv_formula));
    json_object_set_new(kv, "full_depth_bytes", json_integer((json_int_t)r->kv_prompt_full));
    json_object_set_new(kv, "end_bytes", json_integer((json_int_t)r->kv_end));
    json_object_set_new(kv, "reserved_bytes", json_integer((json_int_t)r->kv_reserved));
    json_object_set_new(j, "kv", kv);
    if (have_rf) {
        json_t *f = json_object();
        double peak = wdtype == SPEED_DTYPE_BF16 ? rf->bf16_gflops : rf->fp32_gflops;
        json_object_set_new(
            f, "prefill_of_compute_peak",
            json_real(r->prefill_frac > 0 ? r->prefill_frac : r->prefill_flops / r->prefill_s / 1e9 / peak));
        json_object_set_new(f, "decode_of_read_bandwidth",
                            json_real(r->decode_frac > 0 ? r->decode_frac
                                      : r->tpot_s > 0    ? r->decode_bytes / r->tpot_s / 1e9 / rf->read_gbs
                                                         : 0.0));
        json_object_set_new(j, "roofline_fraction", f);
    }
    return j;
}

int speedctl_bench(int argc, char **argv) {
    bench_opts_t o;
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "bench", "speedctl bench --model DIR [options]", bench_parts,
                                SPEEDCTL_N_PARTS(bench_parts), &o, argc, argv))
        return opts.exit_code;
    speed_config_t *cfg = opts.cfg;
    const speedctl_engine_opts_t *eo = &o.engine;
    char *const *pos;
    if (speed_config_positional(cfg, &pos) != 0 || !eo->model) {
        speedctl_fail("bench needs --model DIR (see --help)");
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_USAGE;
    }
    int exit_code = SPEEDCTL_EXIT_FAIL;
    speed_status_t st = SPEED_OK;
    speed_model_t *model = NULL;
    speed_backend_t *be = NULL; /* rank 0's */
    speedctl_ranks_t ranks = {0};
    int32_t *prompt = NULL;
    bench_result_t res[2];
    int n_res = 0;

    speed_model_params_t mp = speed_model_default_params();
    mp.hugepages = o.hugepages;
    SPEED_CHECK_GOTO(speed_model_load(eo->model, &mp, &model), st, out);
    const speed_model_config_t *mc = &model->config;
    /* from here on the options name the cache dtype the engine will use (auto resolved) */
    o.engine.kv.kv_dtype = (int)speed_model_kv_dtype_resolve(model, (speed_dtype_t)eo->kv.kv_dtype);
    speed_depth_t depth;
    if (speedctl_engine_depth(eo, mc->n_layers, &depth) != SPEED_OK) {
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }
    if (o.compare && depth.prefill_layers == mc->n_layers) {
        speedctl_fail("--compare needs --prefill-layers below the model's %d layers", mc->n_layers);
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }
    if (o.prompt_tokens + o.gen_tokens > mc->max_position) {
        speedctl_fail("--prompt-tokens %" PRId64 " + --gen-tokens %" PRId64 " exceed the model's context of %d",
                      o.prompt_tokens, o.gen_tokens, mc->max_position);
        goto out;
    }

    /* A random prompt: the same ids for every depth (and every run with the same seed). */
    prompt = speed_malloc((size_t)o.prompt_tokens * sizeof *prompt);
    if (!prompt) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    speed_rng_t rng;
    speed_rng_init(&rng, (uint64_t)o.seed);
    for (int64_t i = 0; i < o.prompt_tokens; i++)
        prompt[i] = (int32_t)(speed_rng_next(&rng) % (uint64_t)mc->vocab_size);
    if (mc->bos_token_id >= 0 && mc->bos_token_id < mc->vocab_size) prompt[0] = mc->bos_token_id;

    SPEED_CHECK_GOTO(speedctl_ranks_create(eo, &ranks), st, out);
    be = ranks.be[0];
    int n_threads = (int)eo->threads;
    if (n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }

    speed_depth_t depths[2] = {depth, depth};
    if (o.compare) depths[0].prefill_layers = mc->n_layers;
    n_res = o.compare ? 2 : 1;
    double prefill_ratio = 0.0, tpot_ratio = 0.0, prefill_min_ratio = 0.0, tpot_min_ratio = 0.0;
    SPEED_CHECK_GOTO(bench_depths(&o, model, &ranks, prompt, o.compare ? depths : &depths[1], n_res, res,
                                  &prefill_ratio, &tpot_ratio, &prefill_min_ratio, &tpot_min_ratio),
                     st, out);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    size_t peak_rss = (size_t)ru.ru_maxrss * 1024, rss = rss_now();
    if (o.roofline) { /* the paired probes' buffers count in ru_maxrss: use the samples */
        peak_rss = 0;
        for (int i = 0; i < n_res; i++) peak_rss = res[i].rss_max > peak_rss ? res[i].rss_max : peak_rss;
    }

    /* The roofline last, so that its buffer does not count in the engine's peak RSS. */
    speed_roofline_t rf = {0};
    if (o.roofline) {
        speed_roofline_params_t rp = speed_roofline_default_params();
        rp.n_threads = n_threads;
        rp.read_bytes = (size_t)o.roofline_mib << 20;
        rp.repetitions = o.repeat > 3 ? (int)o.repeat : 3;
        SPEED_CHECK_GOTO(speed_roofline_measure(&rp, &rf), st, out);
    }

    const bench_result_t *last = &res[n_res - 1];
    size_t kv_pool = 0, scratch = 0;
    for (int i = 0; i < n_res; i++) {
        kv_pool += res[i].kv_pool_bytes; /* the engines of every depth are alive together */
        scratch += res[i].scratch_bytes;
    }
    size_t weights = last->weight_bytes;
    speed_dtype_t wdtype = mc->torch_dtype;
    if (o.json) {
        json_t *root = json_object();
        json_t *jm = json_object();
        json_object_set_new(jm, "path", json_string(eo->model));
        json_object_set_new(jm, "layers", json_integer(mc->n_layers));
        json_object_set_new(jm, "params", json_integer(speed_model_n_params(model)));
        json_object_set_new(jm, "weight_bytes", json_integer((json_int_t)weights));
        json_object_set_new(jm, "dtype", json_string(speed_dtype_name(wdtype)));
        json_object_set_new(root, "model", jm);
        json_object_set_new(root, "backend", json_string(speed_backend_name(be)));
        json_object_set_new(root, "threads", json_integer(n_threads));
        json_object_set_new(root, "tensor_parallel", json_integer(eo->tensor_parallel));
        json_object_set_new(root, "kv_dtype", json_string(speed_dtype_name((speed_dtype_t)eo->kv.kv_dtype)));
        json_object_set_new(root, "prompt_tokens", json_integer(o.prompt_tokens));
        json_object_set_new(root, "gen_tokens", json_integer(o.gen_tokens));
        json_object_set_new(root, "batch", json_integer(o.batch));
        json_object_set_new(root, "repeat", json_integer(o.repeat));
        json_t *runs = json_array();
        for (int i = 0; i < n_res; i++) json_array_append_new(runs, result_json(&res[i], &o, &rf, o.roofline, wdtype));
        json_object_set_new(root, "runs", runs);
        if (n_res == 2) {
            json_t *c = json_object();
            json_object_set_new(c, "prefill_time_ratio", json_real(prefill_ratio));
            json_object_set_new(c, "tpot_ratio", json_real(tpot_ratio));
            json_object_set_new(c, "prefill_time_ratio_fastest", json_real(prefill_min_ratio));
            json_object_set_new(c, "tpot_ratio_fastest", json_real(tpot_min_ratio));
            json_object_set_new(c, "kv_ratio", json_real((double)res[1].kv_prompt / (double)res[0].kv_prompt));
            json_object_set_new(root, "compare", c);
        }
        json_t *mem = json_object();
        json_object_set_new(mem, "peak_rss_bytes", json_integer((json_int_t)peak_rss));
        json_object_set_new(mem, "rss_bytes", json_integer((json_int_t)rss));
        json_object_set_new(mem, "weight_bytes", json_integer((json_int_t)weights));
        json_object_set_new(mem, "kv_pool_bytes", json_integer((json_int_t)kv_pool));
        json_object_set_new(mem, "scratch_bytes", json_integer((json_int_t)scratch));
        json_object_set_new(root, "memory", mem);
        if (o.roofline) {
            json_t *jr = json_object();
            json_object_set_new(jr, "threads", json_integer(rf.n_threads));
            json_object_set_new(jr, "read_gbs", json_real(rf.read_gbs));
            json_object_set_new(jr, "copy_gbs", json_real(rf.copy_gbs));
            json_object_set_new(jr, "fp32_gflops", json_real(rf.fp32_gflops));
            json_object_set_new(jr, "bf16_gflops", json_real(rf.bf16_gflops));
            json_object_set_new(jr, "isa", json_string(speed_cpu_isa_name(rf.isa)));
            json_object_set_new(jr, "fp32_kernel", json_string(rf.fp32_kernel));
            json_object_set_new(jr, "bf16_kernel", json_string(rf.bf16_kernel));
            json_object_set_new(root, "roofline", jr);
        }
        char *s = json_dumps(root, JSON_REAL_PRECISION(6));
        if (s) puts(s);
        free(s);
        json_decref(root);
    } else {
        char b1[32], b2[32], b3[32], b4[32], b5[32];
        speedctl_bytes_human((double)weights, 2, b1, sizeof b1);
        double np = (double)speed_model_n_params(model);
        printf("model        %s: %d layers, hidden %d, %.3g%s parameters, %s weights %s\n", eo->model, mc->n_layers,
               mc->hidden, np >= 1e9 ? np / 1e9 : np / 1e6, np >= 1e9 ? " B" : " M", speed_dtype_name(wdtype), b1);
        char be_label[320];
        if (eo->tensor_parallel > 1)
            snprintf(be_label, sizeof be_label, "%" PRId64 " ranks x %s", eo->tensor_parallel, speed_backend_name(be));
        else
            snprintf(be_label, sizeof be_label, "%s", speed_backend_name(be));
        printf("setup        %s; weights %s; KV %s; prompt %" PRId64 " tokens (random ids), %" PRId64
               " generated, batch %" PRId64 ", medians of %" PRId64 "\n",
               be_label, o.hugepages ? "read into 2 MiB pages" : "mapped",
               speed_dtype_name((speed_dtype_t)eo->kv.kv_dtype), o.prompt_tokens, o.gen_tokens, o.batch, o.repeat);
        if (o.roofline)
            printf(
                "roofline     %d threads: read %.2f GB/s (memcpy %.2f GB/s, %zu MiB buffer); fp32 %.1f GFLOP/s (%s); "
                "bf16 %.1f GFLOP/s (%s)\n",
                rf.n_threads, rf.read_gbs, rf.copy_gbs, rf.read_bytes >> 20, rf.fp32_gflops, rf.fp32_kernel,
                rf.bf16_gflops, rf.bf16_kernel);
        for (int i = 0; i < n_res; i++) result_print(&res[i], &o, mc->n_layers, &rf, o.roofline, wdtype);
        speedctl_bytes_human((double)peak_rss, 2, b1, sizeof b1);
        speedctl_bytes_human((double)weights, 2, b2, sizeof b2);
        speedctl_bytes_human((double)kv_pool, 2, b3, sizeof b3);
        speedctl_bytes_human((double)scratch, 2, b4, sizeof b4);
        double parts = (double)weights + (double)kv_pool + (double)scratch, other = (double)peak_rss - parts;
        speedctl_bytes_human(fabs(other), 2, b5, sizeof b5);
        printf("\nmemory       peak RSS %s; weights %s + KV pools %s + scratch %s, RSS %s that by %s (%s)\n", b1, b2,
               b3, b4, other < 0 ? "below" : "above", b5,
               other < 0 ? "pool and scratch pages never touched" : "code, heap, tokenizer, page tables");
        if (n_res == 2) {
            double pr = prefill_ratio, tr = tpot_ratio; /* medians of lockstep ratios */
            double kr = (double)res[1].kv_prompt / (double)res[0].kv_prompt;
            double kerr = res[1].kv_formula
                              ? fabs((double)res[1].kv_prompt - (double)res[1].kv_formula) / (double)res[1].kv_formula
                              : 0.0;
            printf("compare      C=%d vs C=%d: prefill time %.3fx (engines in lockstep, step by step; median of "
                   "%" PRId64 "), %.3fx fastest vs fastest run; TPOT %.3fx (lockstep), %.3fx fastest; KV %.3fx\n",
                   res[1].depth.prefill_layers, res[0].depth.prefill_layers, pr, o.repeat, prefill_min_ratio, tr,
                   tpot_min_ratio, kr);
            bool pre_met = pr <= 0.78 || prefill_min_ratio <= 0.78, tpot_met = tr < 1.0 || tpot_min_ratio < 1.0;
            printf("targets      prefill <= 0.78x: %s; TPOT < 1x: %s; KV within 1%% of the formula: %s\n",
                   pre_met ? "met" : "not met", tpot_met ? "met" : "not met", kerr <= 0.01 ? "yes" : "no");
        }
    }
    exit_code = SPEEDCTL_EXIT_OK;
out:
    speed_free(prompt);
    speedctl_ranks_destroy(&ranks);
    speed_model_destroy(model);
    speed_config_destroy(cfg);
    return exit_code;
}
