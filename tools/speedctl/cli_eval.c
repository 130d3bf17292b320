/* speedctl eval: what a SPEED cutoff costs in quality on the operator's model and text, next to
 * what it saves (docs/quality.md). Options and the run; the parts are in eval_*.c (eval.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "clock.h"
#include "eval.h"
#include "log.h"
#include "speedctl.h"

typedef struct {
    speedctl_engine_opts_t engine; /* --model, --backend, --prefill-layers (a list here), --anchors, ... */
    char *data, *svg, *probe_depths, *reference_model;
    int64_t prompt_tokens, continuation_tokens, max_records, batch, probe_trials, seed;
    bool json, probe, progress;
} eval_opts_t;

static const speed_config_field_t eval_fields[] = {
    SPEEDCTL_TEXT_OPT(eval_opts_t, "data", data,
                      "comma-separated input files: *.jsonl lines {\"text\": ...} or {\"ids\": [...]}; any other "
                      "file is text, cut into windows of prompt + continuation tokens"),
    {"prompt_tokens", SPEED_CONFIG_INT, offsetof(eval_opts_t, prompt_tokens), "256", 1, 1 << 24, NULL,
     "N: a record's first N tokens are the prompt, run shallow (as a prefill node runs it)"},
    {"continuation_tokens", SPEED_CONFIG_INT, offsetof(eval_opts_t, continuation_tokens), "32", 1, 1 << 24, NULL,
     "M: the next M tokens are teacher-forced at full depth (as decode runs them) and scored"},
    {"max_records", SPEED_CONFIG_INT, offsetof(eval_opts_t, max_records), "0", 0, 1e12, NULL,
     "use at most this many records; 0 = all"},
    {"batch", SPEED_CONFIG_INT, offsetof(eval_opts_t, batch), "8", 1, 4096, NULL,
     "sequences in flight per engine step (records x cutoffs; at least one record's cutoffs)"},
    {"json", SPEED_CONFIG_BOOL, offsetof(eval_opts_t, json), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "print one JSON object instead of the table"},
    SPEEDCTL_TEXT_OPT(eval_opts_t, "svg", svg, "also write the chart (quality and savings against C) to this file"),
    {"probe", SPEED_CONFIG_BOOL, offsetof(eval_opts_t, probe), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "also run the pass-key retrieval probe (a key hidden in about --prompt-tokens of filler)"},
    {"probe_depths", SPEED_CONFIG_STRING, offsetof(eval_opts_t, probe_depths), "0,0.25,0.5,0.75,1",
     SPEED_CONFIG_UNBOUNDED, NULL, "--probe: where the key sits, as fractions of the filler"},
    {"probe_trials", SPEED_CONFIG_INT, offsetof(eval_opts_t, probe_trials), "4", 1, 10000, NULL,
     "--probe: keys per depth"},
    {"seed", SPEED_CONFIG_INT, offsetof(eval_opts_t, seed), "1", 0, 9.2e18, NULL, "--probe: seed of the keys"},
    SPEEDCTL_TEXT_OPT(eval_opts_t, "reference_model", reference_model,
                      "compare every C with this model at full depth instead of --model's own full depth (same "
                      "tokenizer): a tuned model against its base"),
    {"progress", SPEED_CONFIG_BOOL, offsetof(eval_opts_t, progress), "true", SPEED_CONFIG_UNBOUNDED, NULL,
     "draw a progress bar on stderr when it is a terminal"},
};
static const speedctl_options_part_t eval_parts[] = {
    SPEEDCTL_ENGINE_PART(eval_opts_t, engine),
    SPEEDCTL_OWN_PART(eval_fields),
};

static const char eval_usage[] =
    "speedctl eval --model DIR --data FILE[,FILE] --prompt-tokens N --continuation-tokens M "
    "--prefill-layers 24,28,32 [--anchors A --tail T] [--reference-model DIR] [--json] [--svg FILE] [--probe]";

/* The cutoffs of --prefill-layers "24,0.75,32" (each resolved as serving resolves one; default
 * L, 3L/4, L/2) into accs. False on a usage error (printed). */
static bool cutoffs_parse(const eval_opts_t *o, int L, speedctl_eval_acc_t *accs, int *n_p) {
    const char *list =
        o->engine.kv.prefill_layers && *o->engine.kv.prefill_layers ? o->engine.kv.prefill_layers : "1.0,0.75,0.5";
    int n = 0;
    char item[64];
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= sizeof item || n == SPEEDCTL_EVAL_MAX_CUTOFFS) {
            speedctl_fail("--prefill-layers: expected up to %d comma-separated cutoffs, got '%s'",
                          SPEEDCTL_EVAL_MAX_CUTOFFS, list);
            return false;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        p += len + (p[len] == ',');
        speed_depth_t d;
        if (speedctl_depth_resolve(item, o->engine.kv.anchors, o->engine.kv.tail, L, &d) != SPEED_OK) return false;
        accs[n++].prefill_layers = d.prefill_layers;
    }
    *n_p = n;
    return true;
}

static bool depths_parse(const char *list, double *depths, int *n_p) {
    int n = 0;
    for (const char *p = list; *p;) {
        char *end;
        double v = strtod(p, &end);
        if (end == p || v < 0 || v > 1 || (*end && *end != ',') || n == SPEEDCTL_EVAL_MAX_DEPTHS) {
            speedctl_fail("--probe-depths: expected up to %d comma-separated fractions in [0, 1], got '%s'",
                          SPEEDCTL_EVAL_MAX_DEPTHS, list);
            return false;
        }
        depths[n++] = v;
        p = *end ? end + 1 : end;
    }
    if (n == 0) speedctl_fail("--probe-depths: no depth given");
    *n_p = n;
    return n > 0;
}

/* The longest record of a set (prompt + continuation). */
static int64_t set_longest(const speedctl_eval_set_t *s) {
    int64_t m = 0;
    for (size_t i = 0; i < s->n; i++) m = s->v[i].n_prompt + s->v[i].n_cont > m ? s->v[i].n_prompt + s->v[i].n_cont : m;
    return m;
}

int speedctl_eval(int argc, char **argv) {
    eval_opts_t o;
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "eval", eval_usage, eval_parts, SPEEDCTL_N_PARTS(eval_parts), &o, argc, argv))
        return opts.exit_code;
    speed_config_t *cfg = opts.cfg;
    const speedctl_engine_opts_t *eo = &o.engine;
    char *const *pos;
    if (speed_config_positional(cfg, &pos) != 0 || !eo->model || (!o.data && !o.probe)) {
        speedctl_fail("eval needs --model DIR and --data FILE (or --probe)");
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_USAGE;
    }

    int exit_code = SPEEDCTL_EXIT_FAIL;
    speed_status_t st = SPEED_OK;
    speed_model_t *model = NULL, *ref_model = NULL;
    speed_tok_t *tok = NULL;
    speedctl_ranks_t ranks = {0};
    speed_engine_t *eng = NULL, *ref_eng = NULL;
    speedctl_eval_set_t data = {0}, probe = {0};
    speedctl_eval_acc_t accs[SPEEDCTL_EVAL_MAX_CUTOFFS] = {0};
    speedctl_eval_result_t results[SPEEDCTL_EVAL_MAX_CUTOFFS];
    int n_accs = 0, n_depths = 0;
    double depths[SPEEDCTL_EVAL_MAX_DEPTHS];

    speed_model_params_t mp = speed_model_default_params();
    SPEED_CHECK_GOTO(speed_model_load(eo->model, &mp, &model), st, out);
    const speed_model_config_t *mc = &model->config;
    const int L = mc->n_layers;
    speed_dtype_t kv_dtype = speed_model_kv_dtype_resolve(model, (speed_dtype_t)eo->kv.kv_dtype);
    if (!cutoffs_parse(&o, L, accs, &n_accs) || (o.probe && !depths_parse(o.probe_depths, depths, &n_depths))) {
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }
    if (o.prompt_tokens + o.continuation_tokens > mc->max_position) {
        speedctl_fail("--prompt-tokens %lld + --continuation-tokens %lld exceed the model's context of %d tokens",
                      (long long)o.prompt_tokens, (long long)o.continuation_tokens, mc->max_position);
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }
    if (o.reference_model) {
        SPEED_CHECK_GOTO(speed_model_load(o.reference_model, &mp, &ref_model), st, out);
        if (ref_model->config.vocab_size != mc->vocab_size) {
            speedctl_fail("--reference-model %s has a vocabulary of %d tokens, --model %s one of %d: they must share "
                          "the tokenizer",
                          o.reference_model, ref_model->config.vocab_size, eo->model, mc->vocab_size);
            exit_code = SPEEDCTL_EXIT_USAGE;
            goto out;
        }
    }
    speed_tok_params_t tp = speed_tok_default_params();
    SPEED_CHECK_GOTO(speed_tok_load(eo->model, &tp, &tok), st, out);

    /* The records, before any compute: a bad file fails in a second. */
    if (o.data)
        SPEED_CHECK_GOTO(speedctl_eval_data_load(o.data, tok, mc->vocab_size, o.prompt_tokens, o.continuation_tokens,
                                                 o.max_records, &data),
                         st, out);
    if (o.probe) {
        st = speedctl_eval_probe_build(tok, o.prompt_tokens, depths, n_depths, (int)o.probe_trials, (uint64_t)o.seed,
                                       &probe);
        if (st == SPEED_ERR_INVALID_ARGUMENT) exit_code = SPEEDCTL_EXIT_USAGE;
        if (st != SPEED_OK) goto out;
    }
    if (o.data && data.n_read == 0)
        SPEED_WARN(SPEED_SUBSYS_CLI, "--data holds no records: nothing to score");
    else if (o.data && data.n == 0)
        SPEED_WARN(SPEED_SUBSYS_CLI, "no record of --data has %lld tokens (%lld read, all shorter): nothing to score",
                   (long long)(o.prompt_tokens + o.continuation_tokens), (long long)data.n_read);
    int64_t longest = set_longest(&data) > set_longest(&probe) ? set_longest(&data) : set_longest(&probe);
    if (longest > mc->max_position || (ref_model && longest > ref_model->config.max_position)) {
        speedctl_fail("a record has %lld tokens, more than the context of --model (%d) or --reference-model: lower "
                      "--prompt-tokens",
                      (long long)longest, mc->max_position);
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }

    /* One engine for every cutoff: each sequence carries its own depth. */
    int n_distinct = 1;
    for (int i = 0; i < n_accs; i++) {
        bool seen = accs[i].prefill_layers == L;
        for (int j = 0; j < i && !seen; j++) seen = accs[j].prefill_layers == accs[i].prefill_layers;
        n_distinct += !seen;
    }
    double t0 = speed_clock_mono_s();
    if (longest > 0) {
        SPEED_CHECK_GOTO(speedctl_ranks_create(eo, &ranks), st, out);
        speed_depth_t full = {L, (int)eo->kv.anchors, (int)eo->kv.tail};
        speed_engine_params_t ep = speedctl_engine_params(eo, &ranks, model, full);
        ep.kv_dtype = kv_dtype;
        ep.max_seqs = o.batch > n_distinct ? (int)o.batch : n_distinct;
        ep.max_context = (int)longest;
        SPEED_CHECK_GOTO(speed_engine_create(&ep, &eng), st, out);
        speedctl_eval_run_t run = {.engine = eng,
                                   .n_layers = L,
                                   .anchors = (int)eo->kv.anchors,
                                   .tail = (int)eo->kv.tail,
                                   .max_seqs = ep.max_seqs,
                                   .what = "records",
                                   .progress = o.progress};
        if (ref_model) { /* the same backends: the two engines step in turn, never together */
            speed_depth_t ref_full = {ref_model->config.n_layers, (int)eo->kv.anchors, (int)eo->kv.tail};
            speed_engine_params_t rp = speedctl_engine_params(eo, &ranks, ref_model, ref_full);
            rp.kv_dtype = speed_model_kv_dtype_resolve(ref_model, (speed_dtype_t)eo->kv.kv_dtype);
            rp.max_seqs = ep.max_seqs;
            rp.max_context = (int)longest;
            SPEED_CHECK_GOTO(speed_engine_create(&rp, &ref_eng), st, out);
            run.reference = ref_eng;
            run.reference_layers = ref_model->config.n_layers;
            run.reference_max_seqs = rp.max_seqs;
        }
        SPEED_CHECK_GOTO(speedctl_eval_score(&run, &data, accs, n_accs), st, out);
        run.what = "probe";
        SPEED_CHECK_GOTO(speedctl_eval_score(&run, &probe, accs, n_accs), st, out);
    }

    for (int i = 0; i < n_accs; i++) {
        speedctl_eval_result_t *x = &results[i];
        speedctl_eval_result_of(&accs[i], x);
        int C = x->prefill_layers, A = (int)eo->kv.anchors, T = (int)eo->kv.tail;
        x->kv_bytes = speed_kv_bytes_for_prompt(mc, C, A, T, o.prompt_tokens, kv_dtype);
        x->kv_bytes_full_depth = speed_kv_bytes_for_prompt(mc, L, A, T, o.prompt_tokens, kv_dtype);
        x->kv_saved = 1.0 - (double)x->kv_bytes / (double)x->kv_bytes_full_depth;
        x->prefill_flops = speed_prefill_flops(mc, C, A, T, o.prompt_tokens);
        x->prefill_flops_full_depth = speed_prefill_flops(mc, L, A, T, o.prompt_tokens);
        x->prefill_flops_saved = 1.0 - x->prefill_flops / x->prefill_flops_full_depth;
    }
    speedctl_eval_report_t rep = {
        .model = eo->model,
        .reference_model = o.reference_model,
        .n_layers = L,
        .kv_dtype = speed_dtype_name(kv_dtype),
        .n_prompt = o.prompt_tokens,
        .n_cont = o.continuation_tokens,
        .anchors = (int)eo->kv.anchors,
        .tail = (int)eo->kv.tail,
        .data = o.data ? &data : NULL,
        .probe = o.probe ? &probe : NULL,
        .probe_depths = depths,
        .n_probe_depths = n_depths,
        .probe_trials = (int)o.probe_trials,
        .results = results,
        .n_results = n_accs,
        .seconds = speed_clock_mono_s() - t0,
    };
    if (o.json) {
        if (!speedctl_eval_json_print(&rep)) st = SPEED_ERR_NO_MEMORY;
    } else {
        speedctl_eval_table_print(&rep);
    }
    if (st == SPEED_OK && o.svg) st = speedctl_eval_svg_write(&rep, o.svg);
    if (st == SPEED_OK) exit_code = SPEEDCTL_EXIT_OK;

out:
    if (st == SPEED_ERR_NO_MEMORY) speedctl_fail("out of memory");
    for (int i = 0; i < n_accs; i++) speedctl_eval_acc_cleanup(&accs[i]);
    speedctl_eval_set_cleanup(&probe);
    speedctl_eval_set_cleanup(&data);
    speed_engine_destroy(ref_eng);
    speed_engine_destroy(eng);
    speedctl_ranks_destroy(&ranks);
    speed_tok_destroy(tok);
    speed_model_destroy(ref_model);
    speed_model_destroy(model);
    speed_config_destroy(cfg);
    return exit_code;
}
