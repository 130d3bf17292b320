/* speedctl generate: one prompt through the engine, streamed text or one JSON object. */
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "alloc.h"
#include "clock.h"
#include "engine.h"
#include "log.h"
#include "model.h"
#include "sampler.h"
#include "speedctl.h"
#include "stop.h"
#include "tokenizer.h"

typedef struct {
    speedctl_engine_opts_t engine; /* --model, --backend, --prefill-layers, ... (speedctl.h) */
    speedctl_chat_opts_t chat;     /* --chat, --system, --chat-template */
    char *prompt, *prompt_ids, *stop;
    int64_t max_tokens, top_k, seed, top_logprobs;
    double temperature, top_p;
    bool json, ignore_eos;
} gen_opts_t;

/* generate's own options; gen_parts puts the table together. */
static const speed_config_field_t gen_prompt_fields[] = {
    SPEEDCTL_TEXT_OPT(gen_opts_t, "prompt", prompt, "prompt text; the tokenizer adds its BOS as the model expects"),
    SPEEDCTL_TEXT_OPT(gen_opts_t, "prompt_ids", prompt_ids, "prompt as comma-separated token ids (nothing added)"),
};
static const speed_config_field_t gen_fields[] = {
    {"max_tokens", SPEED_CONFIG_INT, offsetof(gen_opts_t, max_tokens), "64", 1, 1e9, NULL,
     "tokens to generate at most"},
    {"temperature", SPEED_CONFIG_DOUBLE, offsetof(gen_opts_t, temperature), "0", 0, 100, NULL,
     "sampling temperature; 0 = greedy (the default: same output every run)"},
    {"top_p", SPEED_CONFIG_DOUBLE, offsetof(gen_opts_t, top_p), "1", 1e-9, 1, NULL,
     "nucleus sampling: keep the most likely tokens holding this much probability; 1 = off"},
    {"top_k", SPEED_CONFIG_INT, offsetof(gen_opts_t, top_k), "0", 0, 1 << 30, NULL,
     "keep only the k most likely tokens; 0 = off"},
    {"seed", SPEED_CONFIG_INT, offsetof(gen_opts_t, seed), "-1", -1, 9.2e18, NULL,
     "random seed for sampling (same seed, same tokens); -1 = a random one, printed"},
    {"top_logprobs", SPEED_CONFIG_INT, offsetof(gen_opts_t, top_logprobs), "0", 0, SPEED_SAMPLER_MAX_TOP_LOGPROBS, NULL,
     "--json: also list this many most likely tokens per position"},
    SPEEDCTL_TEXT_OPT(gen_opts_t, "stop", stop,
                      "stop when the output contains this text (not shown); \\n and \\t are understood"),
    {"ignore_eos", SPEED_CONFIG_BOOL, offsetof(gen_opts_t, ignore_eos), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "keep generating past end-of-sequence tokens"},
    {"json", SPEED_CONFIG_BOOL, offsetof(gen_opts_t, json), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "print one JSON object (ids, text, logprobs, timing, KV bytes) instead of streaming text"},
};
static const speedctl_options_part_t gen_parts[] = {
    SPEEDCTL_ENGINE_PART(gen_opts_t, engine),
    SPEEDCTL_OWN_PART(gen_prompt_fields),
    SPEEDCTL_CHAT_PART(gen_opts_t, chat),
    SPEEDCTL_OWN_PART(gen_fields),
};

/* One generated token, kept for --json. */
typedef struct {
    int32_t id;
    float logprob;
    int n_top;
    speed_token_logprob_t top[SPEED_SAMPLER_MAX_TOP_LOGPROBS];
    size_t text_at, text_len; /* this token's streamed text, in gen_t.stream_text */
} gen_token_t;

typedef struct {
    gen_token_t *tokens;
    size_t n_tokens, cap_tokens;
    char *stream_text; /* all streamed text (before stop truncation), for per-token "text" */
    size_t stream_len, stream_cap;
    char *out_text; /* the released output (after stop handling) */
    size_t out_len, out_cap;
} gen_record_t;

static bool buf_append(char **buf, size_t *len, size_t *cap, const char *text, size_t n) {
    if (*len + n + 1 > *cap) {
        size_t c = *cap ? *cap : 256;
        while (c < *len + n + 1) c *= 2;
        char *grown = speed_realloc(*buf, c);
        if (!grown) return false;
        *buf = grown;
        *cap = c;
    }
    memcpy(*buf + *len, text, n);
    *len += n;
    (*buf)[*len] = '\0';
    return true;
}

static void record_free(gen_record_t *r) {
    speed_free(r->tokens);
    speed_free(r->stream_text);
    speed_free(r->out_text);
}

/* Builds the prompt ids from whichever of --prompt, --prompt-ids, --chat was given. */
static speed_status_t prompt_build(const gen_opts_t *o, const speed_tok_t *tok, int32_t n_vocab, speed_tok_ids_t *ids) {
    if (o->prompt_ids) return speedctl_ids_parse("--prompt-ids", o->prompt_ids, n_vocab, ids);
    if (o->prompt) return speed_tok_encode(tok, o->prompt, strlen(o->prompt), true, ids);
    char *text = NULL;
    speed_status_t st = speedctl_chat_encode(&o->chat, tok, &text, ids);
    speed_free(text);
    return st;
}

static json_t *json_logprob(double v) { return json_real(isfinite(v) ? v : -1e30); }

static void json_print(const gen_opts_t *o, const speed_tok_ids_t *prompt, const gen_record_t *rec,
                       speed_finish_reason_t finish, double prefill_ms, double decode_ms_per_token,
                       const speed_engine_seq_stats_t *stats, int n_layers, uint64_t seed) {
    json_t *root = json_object();
    json_t *pids = json_array();
    for (size_t i = 0; i < prompt->n; i++) json_array_append_new(pids, json_integer(prompt->ids[i]));
    json_object_set_new(root, "prompt_ids", pids);
    json_t *toks = json_array();
    for (size_t i = 0; i < rec->n_tokens; i++) {
        const gen_token_t *t = &rec->tokens[i];
        json_t *jt = json_object();
        json_object_set_new(jt, "id", json_integer(t->id));
        json_object_set_new(jt, "text",
                            json_stringn_nocheck(rec->stream_text ? rec->stream_text + t->text_at : "", t->text_len));
        json_object_set_new(jt, "logprob", json_logprob(t->logprob));
        json_t *top = json_array();
        for (int k = 0; k < t->n_top; k++) {
            json_t *e = json_object();
            json_object_set_new(e, "id", json_integer(t->top[k].id));
            json_object_set_new(e, "logprob", json_logprob(t->top[k].logprob));
            json_array_append_new(top, e);
        }
        json_object_set_new(jt, "top_logprobs", top);
        json_array_append_new(toks, jt);
    }
    json_object_set_new(root, "tokens", toks);
    json_object_set_new(root, "text", json_stringn_nocheck(rec->out_text ? rec->out_text : "", rec->out_len));
    const char *fr = speed_finish_reason_name(finish);
    json_object_set_new(root, "finish_reason", fr ? json_string(fr) : json_null());
    json_t *timing = json_object();
    json_object_set_new(timing, "prefill_ms", json_real(prefill_ms));
    json_object_set_new(timing, "decode_ms_per_token", json_real(decode_ms_per_token));
    json_object_set_new(root, "timing", timing);
    json_t *kv = json_object();
    json_object_set_new(kv, "bytes", json_integer((json_int_t)stats->kv_bytes_used));
    json_object_set_new(kv, "full_depth_bytes", json_integer((json_int_t)stats->kv_bytes_full_depth));
    json_object_set_new(kv, "dtype", json_string(speed_dtype_name((speed_dtype_t)o->engine.kv.kv_dtype)));
    json_object_set_new(root, "kv", kv);
    json_t *depth = json_object();
    json_object_set_new(depth, "layers", json_integer(n_layers));
    json_object_set_new(depth, "prefill_layers", json_integer(stats->depth.prefill_layers));
    json_object_set_new(depth, "anchors", json_integer(stats->depth.anchors));
    json_object_set_new(depth, "tail", json_integer(stats->depth.tail));
    json_object_set_new(root, "speed", depth);
    json_object_set_new(root, "seed", json_integer((json_int_t)(seed & INT64_MAX)));
    char *s = json_dumps(root, JSON_REAL_PRECISION(9) | JSON_ENSURE_ASCII);
    if (s) {
        fputs(s, stdout);
        fputc('\n', stdout);
    }
    free(s);
    json_decref(root);
}

static const char gen_usage[] =
    "speedctl generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3 | --chat MSG [--system S]) [options]";

int speedctl_generate(int argc, char **argv) {
    gen_opts_t o;
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "generate", gen_usage, gen_parts, SPEEDCTL_N_PARTS(gen_parts), &o, argc, argv))
        return opts.exit_code;
    speed_config_t *cfg = opts.cfg;
    const speedctl_engine_opts_t *eo = &o.engine;
    char *const *pos;
    int n_inputs = !!o.prompt + !!o.prompt_ids + !!o.chat.chat;
    if (speed_config_positional(cfg, &pos) != 0 || !eo->model || n_inputs != 1 || (o.chat.system && !o.chat.chat)) {
        speedctl_fail("generate needs --model DIR and exactly one of --prompt, --prompt-ids, --chat "
                      "(--system only with --chat)");
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_USAGE;
    }
    if (o.top_logprobs && !o.json) SPEED_WARN(SPEED_SUBSYS_CLI, "--top-logprobs is shown only with --json");

    int exit_code = SPEEDCTL_EXIT_FAIL;
    speed_status_t st = SPEED_OK;
    speed_model_t *model = NULL;
    speed_tok_t *tok = NULL;
    speed_backend_t *be = NULL; /* rank 0's */
    speedctl_ranks_t ranks = {0};
    speed_engine_t *eng = NULL;
    speed_sampler_t *sampler = NULL;
    speed_stop_t *stop = NULL;
    speed_tok_stream_t *stream = NULL;
    speed_tok_ids_t prompt = {0};
    char *stop_text = NULL;
    gen_record_t rec = {0};
    bool seq_alive = false;
    speed_seq_id_t seq = -1;

    speed_model_params_t mp = speed_model_default_params();
    SPEED_CHECK_GOTO(speed_model_load(eo->model, &mp, &model), st, out);
    const speed_model_config_t *mc = &model->config;
    /* from here on the options name the cache dtype the engine will use (auto resolved) */
    o.engine.kv.kv_dtype = (int)speed_model_kv_dtype_resolve(model, (speed_dtype_t)eo->kv.kv_dtype);
    speed_tok_params_t tp = speed_tok_default_params();
    tp.chat_template = (speed_chat_template_t)o.chat.chat_template;
    SPEED_CHECK_GOTO(speed_tok_load(eo->model, &tp, &tok), st, out);

    speed_depth_t depth;
    if (speedctl_engine_depth(eo, mc->n_layers, &depth) != SPEED_OK) {
        exit_code = SPEEDCTL_EXIT_USAGE;
        goto out;
    }

    SPEED_CHECK_GOTO(prompt_build(&o, tok, mc->vocab_size, &prompt), st, out);
    if (prompt.n == 0) {
        speedctl_fail("the prompt is empty (0 tokens): give some text, or ids with --prompt-ids");
        goto out;
    }

    /* Sampling and stop conditions, checked before any compute. */
    speed_sampling_params_t sp = speed_sampling_default_params();
    sp.temperature = (float)o.temperature;
    sp.top_p = (float)o.top_p;
    sp.top_k = (int32_t)o.top_k;
    sp.n_top_logprobs = (int)o.top_logprobs;
    if (o.seed >= 0) {
        sp.seed = (uint64_t)o.seed;
    } else if (getrandom(&sp.seed, sizeof sp.seed, 0) != (ssize_t)sizeof sp.seed) {
        sp.seed = speed_clock_mono_ns();
    }
    SPEED_CHECK_GOTO(speed_sampling_params_validate(&sp), st, out);
    int32_t eos[2 * SPEED_MODEL_MAX_EOS + 16];
    size_t n_eos = 0;
    if (!o.ignore_eos) {
        const int32_t *tok_eos;
        size_t n_tok_eos = speed_tok_eos_ids(tok, &tok_eos);
        for (size_t i = 0; i < n_tok_eos && n_eos < 16; i++) eos[n_eos++] = tok_eos[i];
        for (int i = 0; i < mc->n_eos; i++) eos[n_eos++] = mc->eos_token_ids[i];
    }
    const char *stops[1];
    if (o.stop) {
        if (!(stop_text = speedctl_unescape(o.stop))) {
            st = SPEED_ERR_NO_MEMORY;
            goto out;
        }
        stops[0] = stop_text;
    }
    speed_stop_params_t stp = {
        .eos_ids = eos, .n_eos_ids = n_eos, .stop = stops, .n_stop = o.stop ? 1 : 0, .max_tokens = o.max_tokens};
    SPEED_CHECK_GOTO(speed_stop_create(&stp, &stop), st, out);
    SPEED_CHECK_GOTO(speed_tok_stream_create(tok, true, &stream), st, out);

    /* Backend and engine, sized for this one sequence. */
    SPEED_CHECK_GOTO(speedctl_ranks_create(eo, &ranks), st, out);
    be = ranks.be[0];
    speed_engine_params_t ep = speedctl_engine_params(eo, &ranks, model, depth);
    ep.max_seqs = 1;
    /* Size the pools for this request, clamped to the context so that a too-long request is
     * refused by seq_add with a clear message rather than by a huge allocation. */
    int64_t ctx = mc->max_position;
    int64_t fit_prompt = (int64_t)prompt.n < ctx ? (int64_t)prompt.n : ctx;
    int64_t fit_new = o.max_tokens < ctx ? o.max_tokens : ctx;
    SPEED_CHECK_GOTO(speed_engine_params_fit_kv(&ep, 1, fit_prompt, fit_new), st, out);
    SPEED_CHECK_GOTO(speed_engine_create(&ep, &eng), st, out);
    int32_t n_vocab = speed_engine_n_vocab(eng);
    int32_t n_tok_vocab = speed_tok_vocab_size(tok);
    SPEED_CHECK_GOTO(speed_sampler_create(n_vocab, &sampler), st, out);

    speed_rng_t rng;
    speed_rng_init(&rng, sp.seed);
    double t_start = speed_clock_mono_s(), t_first = 0.0;
    SPEED_CHECK_GOTO(speed_engine_seq_add(eng, prompt.ids, (int64_t)prompt.n, &depth, o.max_tokens, &seq), st, out);
    seq_alive = true;

    speed_finish_reason_t finish = SPEED_FINISH_NONE;
    speed_engine_seq_stats_t stats = {0};
    while (finish == SPEED_FINISH_NONE) {
        speed_engine_step_result_t r;
        SPEED_CHECK_GOTO(speed_engine_step(eng, &r), st, out);
        if (r.n_outputs == 0 && !speed_engine_has_work(eng)) {
            speedctl_fail("the engine stopped producing output (internal error)");
            st = SPEED_ERR_INTERNAL;
            goto out;
        }
        for (int i = 0; i < r.n_outputs; i++) {
            if (r.outputs[i].seq != seq) continue;
            speed_sample_t smp;
            SPEED_CHECK_GOTO(speed_sampler_sample(sampler, &sp, &rng, r.outputs[i].logits, n_vocab, &smp), st, out);
            if (r.outputs[i].first) t_first = speed_clock_mono_s();
            /* Text: ids past the tokenizer's vocabulary (a padded embedding) have none. */
            const char *piece = "";
            size_t piece_len = 0;
            if (smp.id < n_tok_vocab)
                SPEED_CHECK_GOTO(speed_tok_stream_push(stream, smp.id, &piece, &piece_len), st, out);
            if (rec.n_tokens == rec.cap_tokens) {
                size_t cap = rec.cap_tokens ? rec.cap_tokens * 2 : 64;
                gen_token_t *grown = speed_realloc(rec.tokens, cap * sizeof *grown);
                if (!grown) {
                    st = SPEED_ERR_NO_MEMORY;
                    goto out;
                }
                rec.tokens = grown;
                rec.cap_tokens = cap;
            }
            gen_token_t *gt = &rec.tokens[rec.n_tokens++];
            gt->id = smp.id;
            gt->logprob = smp.logprob;
            gt->n_top = smp.n_top;
            memcpy(gt->top, smp.top, sizeof smp.top);
            gt->text_at = rec.stream_len;
            gt->text_len = piece_len;
            if (!buf_append(&rec.stream_text, &rec.stream_len, &rec.stream_cap, piece, piece_len)) {
                st = SPEED_ERR_NO_MEMORY;
                goto out;
            }
            speed_stop_result_t sr;
            SPEED_CHECK_GOTO(speed_stop_push(stop, smp.id, piece, piece_len, &sr), st, out);
            if (sr.finish != SPEED_FINISH_NONE) {
                /* The decoder's held-back bytes go through the stop matcher too. */
                if (!buf_append(&rec.out_text, &rec.out_len, &rec.out_cap, sr.text, sr.len)) {
                    st = SPEED_ERR_NO_MEMORY;
                    goto out;
                }
                if (!o.json) fwrite(sr.text, 1, sr.len, stdout);
                const char *tail;
                size_t tail_len;
                SPEED_CHECK_GOTO(speed_tok_stream_flush(stream, &tail, &tail_len), st, out);
                SPEED_CHECK_GOTO(speed_stop_finish(stop, tail, tail_len, &sr), st, out);
                finish = sr.finish;
                /* per-token text: the flushed tail belongs to the last token */
                if (tail_len && buf_append(&rec.stream_text, &rec.stream_len, &rec.stream_cap, tail, tail_len))
                    gt->text_len += tail_len;
            }
            if (!buf_append(&rec.out_text, &rec.out_len, &rec.out_cap, sr.text, sr.len)) {
                st = SPEED_ERR_NO_MEMORY;
                goto out;
            }
            if (!o.json && sr.len) {
                fwrite(sr.text, 1, sr.len, stdout);
                fflush(stdout);
            }
            if (finish == SPEED_FINISH_NONE) SPEED_CHECK_GOTO(speed_engine_seq_append(eng, seq, smp.id), st, out);
        }
    }
    double t_end = speed_clock_mono_s();
    SPEED_CHECK_GOTO(speed_engine_seq_stats(eng, seq, &stats), st, out);
    double prefill_ms = (double)stats.prefill_ns / 1e6;
    double decode_ms = stats.n_generated ? (double)stats.decode_ns / 1e6 / (double)stats.n_generated : 0.0;

    if (o.json) {
        json_print(&o, &prompt, &rec, finish, prefill_ms, decode_ms, &stats, mc->n_layers, sp.seed);
    } else {
        if (!rec.out_len || rec.out_text[rec.out_len - 1] != '\n') putchar('\n');
        fflush(stdout);
        char b1[32], b2[32];
        speedctl_bytes_human((double)stats.kv_bytes_used, 1, b1, sizeof b1);
        speedctl_bytes_human((double)stats.kv_bytes_full_depth, 1, b2, sizeof b2);
        char how[64] = "greedy";
        if (sp.temperature > 0.0f) snprintf(how, sizeof how, "seed %" PRIu64, sp.seed);
        fprintf(stderr, "-- %zu prompt tokens, %zu generated (%s), %s, %s\n", prompt.n, rec.n_tokens,
                speed_finish_reason_name(finish) ? speed_finish_reason_name(finish) : "?", how, speed_backend_name(be));
        fprintf(stderr,
                "-- prefill %.2f ms (%.0f tokens/s), first token after %.2f ms; decode %.2f ms/token "
                "(%.1f tokens/s); total %.2f ms\n",
                prefill_ms, prefill_ms > 0 ? (double)prompt.n / prefill_ms * 1e3 : 0.0, (t_first - t_start) * 1e3,
                decode_ms, decode_ms > 0 ? 1e3 / decode_ms : 0.0, (t_end - t_start) * 1e3);
        fprintf(stderr,
                "-- KV %s (%zu bytes, %s) at C=%d of %d layers, A=%d, T=%d; full depth %s (%zu bytes): %.1f%%\n", b1,
                stats.kv_bytes_used, speed_dtype_name((speed_dtype_t)eo->kv.kv_dtype), stats.depth.prefill_layers,
                mc->n_layers, stats.depth.anchors, stats.depth.tail, b2, stats.kv_bytes_full_depth,
                stats.kv_bytes_full_depth ? 100.0 * (double)stats.kv_bytes_used / (double)stats.kv_bytes_full_depth
                                          : 100.0);
    }
    exit_code = SPEEDCTL_EXIT_OK;
out:
    if (st != SPEED_OK && exit_code == SPEEDCTL_EXIT_FAIL && !o.json) fflush(stdout);
    if (seq_alive) speed_engine_seq_remove(eng, seq);
    speed_engine_destroy(eng);
    speedctl_ranks_destroy(&ranks);
    speed_sampler_destroy(sampler);
    speed_stop_destroy(stop);
    speed_tok_stream_destroy(stream);
    speed_tok_ids_free(&prompt);
    speed_free(stop_text);
    record_free(&rec);
    speed_tok_destroy(tok);
    speed_model_destroy(model);
    speed_config_destroy(cfg);
    return exit_code;
}
