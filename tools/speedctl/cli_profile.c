/* speedctl profile: what one prefill node and one decode node cost on this backend, measured in
 * process with the engine the nodes run (engine/runtime, with the node's max_step_tokens and
 * prefill_chunk), and KV transfer time over UCX shared memory between two contexts of this
 * process, written as the profile JSON that `speedctl plan` reads (schema: plan_profile.h,
 * docs/operations.md). Every number is the median of --repeat runs. */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "clock.h"
#include "dtype.h"
#include "engine.h"
#include "kv_transfer.h"
#include "log.h"
#include "model.h"
#include "plan_profile.h"
#include "rng.h"
#include "sampler.h"
#include "speedctl.h"

typedef struct {
    speedctl_engine_opts_t engine; /* --prefill-layers is a list here */
    char *prompt_tokens, *batch_sizes, *context_tokens, *out;
    int64_t repeat, decode_steps, max_step_tokens, prefill_chunk, seed;
    bool transfer;
} profile_opts_t;

#define P_OPT(...) SPEEDCTL_OPT(profile_opts_t, __VA_ARGS__)
static const speed_config_field_t profile_fields[] = {
    P_OPT("prompt_tokens", STRING, prompt_tokens, "16,64,128,256,512", SPEED_CONFIG_UNBOUNDED, NULL,
          "prompt lengths of the prefill table, comma-separated"),
    P_OPT("batch_sizes", STRING, batch_sizes, "1,2,4,8,16", SPEED_CONFIG_UNBOUNDED, NULL,
          "decode batch sizes of the decode table, comma-separated"),
    P_OPT("context_tokens", STRING, context_tokens, "64,512", SPEED_CONFIG_UNBOUNDED, NULL,
          "decode contexts (prompt tokens of every sequence of the batch), comma-separated"),
    P_OPT("repeat", INT, repeat, "5", 1, 1000, NULL, "repetitions of every measurement; medians are written"),
    P_OPT("decode_steps", INT, decode_steps, "8", 1, 10000, NULL, "decode steps timed per repetition"),
    P_OPT("max_step_tokens", INT, max_step_tokens, "512", 16, 65536, NULL,
          "rows one engine step computes (the node's pool.max_step_tokens)"),
    P_OPT("prefill_chunk", INT, prefill_chunk, "512", 1, 65536, NULL,
          "prompt tokens of one sequence per step (the node's pool.prefill_chunk)"),
    P_OPT("transfer", BOOL, transfer, "true", SPEED_CONFIG_UNBOUNDED, NULL,
          "measure KV transfer time vs bytes over UCX shared memory (--no-transfer skips it)"),
    P_OPT("seed", INT, seed, "1", 0, 9.2e18, NULL, "seed of the random prompts"),
    SPEEDCTL_TEXT_OPT(profile_opts_t, "out", out, "profile JSON to write (default: stdout)"),
};
static const speedctl_options_part_t profile_parts[] = {
    SPEEDCTL_ENGINE_PART(profile_opts_t, engine),
    SPEEDCTL_OWN_PART(profile_fields),
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median_of(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* A comma list of positive integers (at most max of them, each in 1..hi) into out. */
static bool list_parse(const char *what, const char *s, int64_t hi, int64_t *out, int max, int *n_p) {
    int n = 0;
    const char *p = s ? s : "";
    while (*p) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < 1 || v > hi || n == max || (*end && *end != ',')) {
            speedctl_fail("--%s: '%s' is not a list of at most %d integers in 1..%" PRId64, what, s, max, hi);
            return false;
        }
        out[n++] = v;
        p = *end ? end + 1 : end;
    }
    if (n == 0) {
        speedctl_fail("--%s: empty list", what);
        return false;
    }
    *n_p = n;
    return true;
}

/* What every measurement shares. */
typedef struct {
    const profile_opts_t *o;
    const speed_model_t *model;
    const speedctl_ranks_t *ranks;
    speed_sampler_t *sampler; /* greedy picks, as a node samples each output */
    int32_t *ids;             /* random prompt ids, max length */
} prof_t;

static speed_status_t engine_make(const prof_t *p, speed_depth_t depth, int max_seqs, int64_t n_prompt, int64_t n_new,
                                  speed_engine_t **eng_p) {
    speed_engine_params_t ep = speedctl_engine_params(&p->o->engine, p->ranks, p->model, depth);
    ep.max_seqs = max_seqs;
    ep.max_step_tokens = (int)p->o->max_step_tokens;
    if (ep.max_step_tokens < max_seqs) ep.max_step_tokens = max_seqs;
    ep.prefill_chunk = (int)p->o->prefill_chunk;
    SPEED_CHECK(speed_engine_params_fit_kv(&ep, max_seqs, n_prompt, n_new));
    return speed_engine_create(&ep, eng_p);
}

/* Steps until every one of n sequences has had its first output; the greedy tokens go to next. */
static speed_status_t run_prefill(const prof_t *p, speed_engine_t *eng, const speed_seq_id_t *seqs, int n,
                                  int32_t *next) {
    speed_sampling_params_t greedy = speed_sampling_default_params();
    greedy.temperature = 0.0f;
    int got = 0;
    while (got < n) {
        speed_engine_step_result_t r;
        SPEED_CHECK(speed_engine_step(eng, &r));
        if (r.n_outputs == 0 && !speed_engine_has_work(eng)) return SPEED_ERR_INTERNAL;
        for (int i = 0; i < r.n_outputs; i++) {
            speed_sample_t s;
            SPEED_CHECK(
                speed_sampler_sample(p->sampler, &greedy, NULL, r.outputs[i].logits, speed_engine_n_vocab(eng), &s));
            for (int k = 0; k < n; k++)
                if (seqs[k] == r.outputs[i].seq) next[k] = s.id;
            got++;
        }
    }
    return SPEED_OK;
}

/* Prefill of one prompt of n tokens at depth (the node's chunking): wall time from add to the
 * first token sampled, median of repeat. */
static speed_status_t measure_prefill(const prof_t *p, speed_engine_t *eng, speed_depth_t depth, int64_t n,
                                      double *ms_p) {
    double t[1000];
    int reps = (int)p->o->repeat;
    for (int r = 0; r < reps + 1; r++) { /* the first run warms up */
        speed_seq_id_t id;
        int32_t next;
        double t0 = speed_clock_mono_s();
        SPEED_CHECK(speed_engine_seq_add(eng, p->ids, n, &depth, 1, &id));
        speed_status_t st = run_prefill(p, eng, &id, 1, &next);
        double dt = speed_clock_mono_s() - t0;
        speed_engine_seq_remove(eng, id);
        SPEED_CHECK(st);
        if (r > 0) t[r - 1] = dt * 1e3;
    }
    *ms_p = median_of(t, reps);
    return SPEED_OK;
}

/* Decode step time of a batch of b sequences with ctx prompt tokens each: the median over
 * repeat x decode_steps steps (one step = every sequence appends its token, the engine steps,
 * every output is sampled). */
static speed_status_t measure_decode(const prof_t *p, speed_engine_t *eng, speed_depth_t depth, int b, int64_t ctx,
                                     double *ms_p) {
    int reps = (int)p->o->repeat, steps = (int)p->o->decode_steps;
    double *t = speed_calloc((size_t)reps * (size_t)steps, sizeof *t);
    speed_seq_id_t *seqs = speed_calloc((size_t)b, sizeof *seqs);
    int32_t *next = speed_calloc((size_t)b, sizeof *next);
    speed_status_t st = SPEED_OK;
    int n_t = 0;
    if (!t || !seqs || !next) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    speed_sampling_params_t greedy = speed_sampling_default_params();
    greedy.temperature = 0.0f;
    for (int r = 0; r < reps && st == SPEED_OK; r++) {
        int n_added = 0;
        for (; n_added < b; n_added++)
            SPEED_CHECK_GOTO(speed_engine_seq_add(eng, p->ids, ctx, &depth, steps + 2, &seqs[n_added]), st, rem);
        SPEED_CHECK_GOTO(run_prefill(p, eng, seqs, b, next), st, rem);
        for (int s = 0; s <= steps; s++) { /* step 0 warms up */
            double t0 = speed_clock_mono_s();
            for (int k = 0; k < b; k++) SPEED_CHECK_GOTO(speed_engine_seq_append(eng, seqs[k], next[k]), st, rem);
            speed_engine_step_result_t res;
            SPEED_CHECK_GOTO(speed_engine_step(eng, &res), st, rem);
            if (res.n_outputs != b) {
                SPEED_ERROR(SPEED_SUBSYS_CLI, "profile: a decode step of %d sequences gave %d outputs", b,
                            res.n_outputs);
                st = SPEED_ERR_INTERNAL;
                goto rem;
            }
            for (int i = 0; i < res.n_outputs; i++) {
                speed_sample_t smp;
                SPEED_CHECK_GOTO(speed_sampler_sample(p->sampler, &greedy, NULL, res.outputs[i].logits,
                                                      speed_engine_n_vocab(eng), &smp),
                                 st, rem);
                for (int k = 0; k < b; k++)
                    if (seqs[k] == res.outputs[i].seq) next[k] = smp.id;
            }
            if (s > 0) t[n_t++] = (speed_clock_mono_s() - t0) * 1e3;
        }
    rem:
        for (int k = 0; k < n_added; k++) speed_engine_seq_remove(eng, seqs[k]);
    }
    if (st == SPEED_OK) *ms_p = median_of(t, n_t);
out:
    speed_free(t);
    speed_free(seqs);
    speed_free(next);
    return st;
}

/* KV transfer of a prefilled prompt of n tokens at depth: a decode-side engine reserves the
 * sequence and builds a granted descriptor in one UCX context (as a decode node does: checked
 * writes), the prefill-side engine's sequence is pushed from another context of this process
 * (create, push every layer, finish, wait for the ack). Median of repeat; bytes_p = the KV. */
static speed_status_t measure_transfer(const prof_t *p, speed_engine_t *src, speed_engine_t *dst,
                                       speed_kv_xfer_ctx_t *sctx, speed_kv_xfer_ctx_t *dctx, speed_depth_t depth,
                                       int64_t n, double *ms_p, double *bytes_p) {
    double t[1000];
    int reps = (int)p->o->repeat;
    speed_seq_id_t sid = -1;
    int32_t next;
    SPEED_CHECK(speed_engine_seq_add(src, p->ids, n, &depth, 1, &sid));
    speed_status_t st = run_prefill(p, src, &sid, 1, &next);
    speed_engine_seq_stats_t stats;
    if (st == SPEED_OK) st = speed_engine_seq_stats(src, sid, &stats);
    for (int r = 0; r < reps + 1 && st == SPEED_OK; r++) { /* the first run connects */
        speed_seq_id_t did = -1;
        speed_kv_desc_t *desc = NULL;
        speed_kv_xfer_t *x = NULL;
        char id[32];
        snprintf(id, sizeof id, "profile-%d", r);
        speed_kv_desc_params_t dp = {.transport = SPEED_KV_TRANSPORT_SHM, .grant_id = id};
        st = speed_engine_seq_reserve(dst, n, &depth, 2, &did);
        if (st == SPEED_OK) st = speed_kv_desc_build_engine(dctx, dst, did, &dp, &desc);
        double t0 = speed_clock_mono_s();
        if (st == SPEED_OK) st = speed_kv_xfer_create_engine(sctx, desc, src, sid, id, &x);
        if (st == SPEED_OK) st = speed_kv_xfer_push_all(x);
        if (st == SPEED_OK) st = speed_kv_xfer_finish(x);
        if (st == SPEED_OK) st = speed_kv_xfer_wait(x, 30000);
        double dt = speed_clock_mono_s() - t0;
        speed_kv_xfer_destroy(x);
        speed_kv_desc_destroy(desc);
        speed_kv_xfer_ctx_grant_drop(dctx, id);
        if (did >= 0) speed_engine_seq_remove(dst, did);
        if (r > 0) t[r - 1] = dt * 1e3;
    }
    speed_engine_seq_remove(src, sid);
    if (st != SPEED_OK) return st;
    *ms_p = median_of(t, reps);
    *bytes_p = (double)stats.kv_bytes_used;
    return SPEED_OK;
}

#define LIST_MAX 32

int speedctl_profile(int argc, char **argv) {
    profile_opts_t o;
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "profile",
                                "speedctl profile --model DIR [--prefill-layers LIST] [--prompt-tokens LIST] "
                                "[--batch-sizes LIST] [--context-tokens LIST] [--out FILE]",
                                profile_parts, SPEEDCTL_N_PARTS(profile_parts), &o, argc, argv))
        return opts.exit_code;
    speed_config_t *cfg = opts.cfg;
    int exit_code = SPEEDCTL_EXIT_USAGE;
    char *const *pos;
    speed_model_t *model = NULL;
    speedctl_ranks_t ranks = {0};
    prof_t p = {.o = &o};
    speed_plan_profile_t prof;
    memset(&prof, 0, sizeof prof);
    speed_kv_xfer_ctx_t *sctx = NULL, *dctx = NULL;
    if (speed_config_positional(cfg, &pos) != 0 || !o.engine.model) {
        speedctl_fail("profile needs --model DIR (see --help)");
        goto out;
    }
    int64_t prompts[LIST_MAX], batches[LIST_MAX], contexts[LIST_MAX];
    int n_prompts, n_batches, n_contexts;
    if (!list_parse("prompt-tokens", o.prompt_tokens, 1 << 20, prompts, LIST_MAX, &n_prompts) ||
        !list_parse("batch-sizes", o.batch_sizes, 4096, batches, LIST_MAX, &n_batches) ||
        !list_parse("context-tokens", o.context_tokens, 1 << 20, contexts, LIST_MAX, &n_contexts))
        goto out;
    exit_code = SPEEDCTL_EXIT_FAIL;
    speed_model_params_t mp = speed_model_default_params();
    if (speed_model_load(o.engine.model, &mp, &model) != SPEED_OK) goto out;
    const speed_model_config_t *mc = &model->config;
    /* --kv-dtype auto is the checkpoint's dtype: resolved once, for the engines and the bytes */
    o.engine.kv.kv_dtype = (int)speed_model_kv_dtype_resolve(model, (speed_dtype_t)o.engine.kv.kv_dtype);
    p.model = model;

    /* The cutoffs: a comma list, each resolved as the nodes resolve one; none = C = L. */
    speed_depth_t depths[SPEED_PLAN_MAX_CUTOFFS];
    int n_depths = 0;
    {
        const char *s = o.engine.kv.prefill_layers && *o.engine.kv.prefill_layers ? o.engine.kv.prefill_layers : "";
        char item[64];
        do {
            size_t len = strcspn(s, ",");
            if (len >= sizeof item || n_depths == SPEED_PLAN_MAX_CUTOFFS) {
                speedctl_fail("--prefill-layers: at most %d cutoffs of a few characters each", SPEED_PLAN_MAX_CUTOFFS);
                exit_code = SPEEDCTL_EXIT_USAGE;
                goto out;
            }
            memcpy(item, s, len);
            item[len] = '\0';
            if (speedctl_depth_resolve(item, o.engine.kv.anchors, o.engine.kv.tail, mc->n_layers, &depths[n_depths]) !=
                SPEED_OK) {
                exit_code = SPEEDCTL_EXIT_USAGE;
                goto out;
            }
            n_depths++;
            s += len + (s[len] == ',');
        } while (*s);
    }
    int64_t max_prompt = 0, max_ctx = 0, max_batch = 0;
    for (int i = 0; i < n_prompts; i++) max_prompt = prompts[i] > max_prompt ? prompts[i] : max_prompt;
    for (int i = 0; i < n_contexts; i++) max_ctx = contexts[i] > max_ctx ? contexts[i] : max_ctx;
    for (int i = 0; i < n_batches; i++) max_batch = batches[i] > max_batch ? batches[i] : max_batch;
    int64_t longest = max_prompt > max_ctx ? max_prompt : max_ctx;
    if (longest + o.decode_steps + 2 > mc->max_position) {
        speedctl_fail("the longest prompt or context (%" PRId64 ") + --decode-steps exceeds the model's context of %d",
                      longest, mc->max_position);
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }
    if (speedctl_ranks_create(&o.engine, &ranks) != SPEED_OK) goto out;
    p.ranks = &ranks;
    p.ids = speed_malloc((size_t)longest * sizeof *p.ids);
    if (!p.ids || speed_sampler_create(mc->vocab_size, &p.sampler) != SPEED_OK) goto out;
    speed_rng_t rng;
    speed_rng_init(&rng, (uint64_t)o.seed);
    for (int64_t i = 0; i < longest; i++) p.ids[i] = (int32_t)(speed_rng_next(&rng) % (uint64_t)mc->vocab_size);
    if (mc->bos_token_id >= 0 && mc->bos_token_id < mc->vocab_size) p.ids[0] = mc->bos_token_id;

    /* The model's shape and the setup. */
    snprintf(prof.model, sizeof prof.model, "%s", o.engine.model);
    prof.n_layers = mc->n_layers;
    prof.kv_bytes_per_token_layer =
        2.0 * mc->n_kv_heads * mc->head_dim * (double)speed_dtype_size((speed_dtype_t)o.engine.kv.kv_dtype);
    snprintf(prof.backend, sizeof prof.backend, "%s", speed_backend_kind_names[o.engine.backend]);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    prof.threads = o.engine.threads ? (int)o.engine.threads : (int)(cores > 0 ? cores : 1);
    prof.tensor_parallel = (int)o.engine.tensor_parallel;
    snprintf(prof.kv_dtype, sizeof prof.kv_dtype, "%s", speed_dtype_name((speed_dtype_t)o.engine.kv.kv_dtype));
    prof.max_step_tokens = (int)o.max_step_tokens;
    prof.prefill_chunk = (int)o.prefill_chunk;
    prof.repeat = (int)o.repeat;

    if (o.transfer) {
        setenv("UCX_NET_DEVICES", "lo", 0);
        speed_kv_xfer_ctx_params_t xp = speed_kv_xfer_ctx_default_params();
        xp.tls = "sm,self";
        speed_kv_xfer_ctx_params_t dp = xp;
        dp.require_grant = true;
        dp.writes_only = true;
        if (speed_kv_xfer_ctx_create(&xp, &sctx) != SPEED_OK || speed_kv_xfer_ctx_create(&dp, &dctx) != SPEED_OK)
            goto out;
        snprintf(prof.transport, sizeof prof.transport, "ucx shm, checked writes, in process");
    }
    for (int d = 0; d < n_depths; d++) {
        speed_plan_depth_t *pd = &prof.depths[prof.n_depths++];
        pd->prefill_layers = depths[d].prefill_layers;
        fprintf(stderr, "profile: C = %d of %d layers\n", pd->prefill_layers, mc->n_layers);
        speed_engine_t *eng = NULL, *dst = NULL;
        if (engine_make(&p, depths[d], 1, max_prompt, 1, &eng) != SPEED_OK) goto out;
        for (int i = 0; i < n_prompts && pd->n_prefill < SPEED_PLAN_MAX_POINTS; i++) {
            double ms;
            if (measure_prefill(&p, eng, depths[d], prompts[i], &ms) != SPEED_OK) {
                speed_engine_destroy(eng);
                goto out;
            }
            pd->prefill[pd->n_prefill++] = (speed_plan_point_t){(double)prompts[i], ms};
            fprintf(stderr, "  prefill %6" PRId64 " tokens: %8.3f ms\n", prompts[i], ms);
        }
        if (o.transfer) {
            speed_status_t st = engine_make(&p, depths[d], 1, max_prompt, 2, &dst);
            if (st == SPEED_OK) st = speed_kv_xfer_ctx_register_cache(sctx, speed_engine_kv_cache(eng));
            if (st == SPEED_OK) st = speed_kv_xfer_ctx_register_cache(dctx, speed_engine_kv_cache(dst));
            for (int i = 0; i < n_prompts && st == SPEED_OK && pd->n_transfer < SPEED_PLAN_MAX_POINTS; i++) {
                double ms, bytes;
                st = measure_transfer(&p, eng, dst, sctx, dctx, depths[d], prompts[i], &ms, &bytes);
                if (st == SPEED_OK) {
                    pd->transfer[pd->n_transfer++] = (speed_plan_point_t){bytes, ms};
                    fprintf(stderr, "  transfer %10.0f bytes: %8.3f ms\n", bytes, ms);
                }
            }
            if (dst) speed_kv_xfer_ctx_deregister_cache(dctx, speed_engine_kv_cache(dst));
            speed_kv_xfer_ctx_deregister_cache(sctx, speed_engine_kv_cache(eng));
            speed_engine_destroy(dst);
            if (st != SPEED_OK) {
                speed_engine_destroy(eng);
                goto out;
            }
        }
        speed_engine_destroy(eng);
        eng = NULL;
        if (engine_make(&p, depths[d], (int)max_batch, max_ctx, o.decode_steps + 2, &eng) != SPEED_OK) goto out;
        for (int c = 0; c < n_contexts; c++)
            for (int b = 0; b < n_batches && pd->n_decode < SPEED_PLAN_MAX_POINTS * 4; b++) {
                double ms;
                if (measure_decode(&p, eng, depths[d], (int)batches[b], contexts[c], &ms) != SPEED_OK) {
                    speed_engine_destroy(eng);
                    goto out;
                }
                pd->decode[pd->n_decode++] = (speed_plan_decode_point_t){(int)batches[b], (double)contexts[c], ms};
                fprintf(stderr, "  decode batch %4" PRId64 " context %6" PRId64 ": %8.3f ms/step\n", batches[b],
                        contexts[c], ms);
            }
        speed_engine_destroy(eng);
    }
    char err[256];
    if (speed_plan_profile_save(&prof, o.out, err, sizeof err) != SPEED_OK) {
        speedctl_fail("%s", err);
        goto out;
    }
    if (o.out) fprintf(stderr, "profile: wrote %s\n", o.out);
    exit_code = SPEEDCTL_EXIT_OK;
out:
    speed_kv_xfer_ctx_destroy(sctx);
    speed_kv_xfer_ctx_destroy(dctx);
    speed_sampler_destroy(p.sampler);
    speed_free(p.ids);
    speedctl_ranks_destroy(&ranks);
    speed_model_destroy(model);
    speed_config_destroy(cfg);
    return exit_code;
}
