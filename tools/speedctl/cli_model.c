/* speedctl make-tiny-model and speedctl inspect. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "alloc.h"
#include "log.h"
#include "model.h"
#include "speedctl.h"
#include "tiny_model.h"
#include "tokenizer.h"

/* ---- make-tiny-model --------------------------------------------------------------- */

static const char *const preset_names[] = {"tiny", "tinyllama-1.1b", NULL};

typedef struct {
    int preset;
    int64_t layers, hidden, heads, kv_heads, head_dim, ffn, vocab, max_position;
    int dtype;
    bool tied, rope_scaling;
    int64_t shards, seed;
    char *tokenizer;
    double rope_theta;
} make_opts_t;

/* 0 means "the preset's value" for every size. */
#define SIZE_FIELD(n, member, max, doc) \
    { n, SPEED_CONFIG_INT, offsetof(make_opts_t, member), "0", 0, max, NULL, doc }
static const speed_config_field_t make_fields[] = {
    {"preset", SPEED_CONFIG_ENUM, offsetof(make_opts_t, preset), "tiny", SPEED_CONFIG_UNBOUNDED, preset_names,
     "shape to start from: tiny (4 layers, hidden 64) or tinyllama-1.1b (benchmarks)"},
    SIZE_FIELD("layers", layers, 1024, "number of layers (0 = preset)"),
    SIZE_FIELD("hidden", hidden, 65536, "hidden size (0 = preset)"),
    SIZE_FIELD("heads", heads, 1024, "attention heads (0 = preset)"),
    SIZE_FIELD("kv_heads", kv_heads, 1024, "key/value heads, divides heads (0 = preset)"),
    SIZE_FIELD("head_dim", head_dim, 1024, "head dimension (0 = hidden / heads)"),
    SIZE_FIELD("ffn", ffn, 1 << 20, "MLP intermediate size (0 = preset)"),
    SIZE_FIELD("vocab", vocab, 1 << 24, "vocabulary size (0 = the tokenizer's size, or the preset's if larger)"),
    SIZE_FIELD("max_position", max_position, 1 << 26, "max_position_embeddings (0 = preset)"),
    {"dtype", SPEED_CONFIG_ENUM, offsetof(make_opts_t, dtype), "bf16", SPEED_CONFIG_UNBOUNDED, speed_dtype_names,
     "weight dtype"},
    {"tied", SPEED_CONFIG_BOOL, offsetof(make_opts_t, tied), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "tie the output projection to the embeddings"},
    {"rope_scaling", SPEED_CONFIG_BOOL, offsetof(make_opts_t, rope_scaling), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "add a Llama 3.1 style rope_scaling block (llama3, factor 8)"},
    {"rope_theta", SPEED_CONFIG_DOUBLE, offsetof(make_opts_t, rope_theta), "0", 0, 1e9, NULL, "RoPE base (0 = preset)"},
    {"shards", SPEED_CONFIG_INT, offsetof(make_opts_t, shards), "1", 1, 999, NULL,
     "number of safetensors files (more than 1 adds model.safetensors.index.json)"},
    {"seed", SPEED_CONFIG_INT, offsetof(make_opts_t, seed), "1", 0, 9.2e18, NULL, "random seed for the weights"},
    {"tokenizer", SPEED_CONFIG_STRING, offsetof(make_opts_t, tokenizer), NULL, SPEED_CONFIG_UNBOUNDED, NULL,
     "copy tokenizer.json/tokenizer_config.json from this directory (default: generate a small byte-level BPE)"},
};

/* mkdir -p */
static speed_status_t make_dir(const char *path) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        SPEED_ERROR(SPEED_SUBSYS_CLI, "%.64s...: path too long", path);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    for (char *p = buf + 1;; p++) {
        bool end = *p == '\0';
        if (*p != '/' && !end) continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
            SPEED_ERROR(SPEED_SUBSYS_CLI, "%s: cannot create directory: %s", buf, strerror(errno));
            return SPEED_ERR_IO;
        }
        if (end) break;
        *p = '/';
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        SPEED_ERROR(SPEED_SUBSYS_CLI, "%s: exists and is not a directory", path);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

/* Puts the tokenizer files in out_dir: copied from src_dir, or generated. */
static speed_status_t tokenizer_files_write(const char *out_dir, const char *src_dir, int32_t n_vocab_hint) {
    if (!src_dir) return speed_tok_write_default(out_dir, n_vocab_hint);
    static const char *const files[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                        "generation_config.json"};
    char src[4096], dst[4096];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(src, sizeof src, "%s/%s", src_dir, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", out_dir, files[i]);
        struct stat st;
        if (stat(src, &st) != 0) {
            if (i == 0) {
                SPEED_ERROR(SPEED_SUBSYS_CLI, "%s: no tokenizer.json in --tokenizer directory", src_dir);
                return SPEED_ERR_NOT_FOUND;
            }
            continue; /* the rest are optional */
        }
        SPEED_CHECK(speedctl_copy_file(src, dst));
    }
    return SPEED_OK;
}

int speedctl_make_tiny_model(int argc, char **argv) {
    make_opts_t o;
    speed_config_t *cfg;
    bool done;
    int rc = speedctl_options_load("make-tiny-model", "speedctl make-tiny-model OUTDIR [options]", make_fields,
                                   sizeof make_fields / sizeof make_fields[0], &o, argc, argv, &cfg, &done);
    if (done) return rc;
    char *const *pos;
    if (speed_config_positional(cfg, &pos) != 1) {
        speedctl_fail("make-tiny-model takes exactly one OUTDIR (see --help)");
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_USAGE;
    }
    const char *out_dir = pos[0];

    speed_tiny_model_params_t p = speed_tiny_model_default_params();
    speed_tok_t *tok = NULL;
    speed_status_t st = speed_tiny_model_preset(preset_names[o.preset], &p);
    if (st != SPEED_OK) goto fail;
    if (o.layers) p.n_layers = (int)o.layers;
    if (o.hidden) p.hidden = (int)o.hidden;
    if (o.heads) p.n_heads = (int)o.heads;
    if (o.kv_heads)
        p.n_kv_heads = (int)o.kv_heads;
    else if (o.heads && p.n_kv_heads > p.n_heads)
        p.n_kv_heads = p.n_heads;
    if (o.head_dim) p.head_dim = (int)o.head_dim;
    if (o.ffn) p.ffn = (int)o.ffn;
    if (o.max_position) p.max_position = (int)o.max_position;
    if (o.rope_theta > 0) p.rope_theta = (float)o.rope_theta;
    p.dtype = (speed_dtype_t)o.dtype;
    p.tied = o.tied;
    p.rope_scaling = o.rope_scaling;
    p.n_shards = (int)o.shards;
    p.seed = (uint64_t)o.seed;

    SPEED_CHECK_GOTO(make_dir(out_dir), st, fail);
    /* The tokenizer comes first: the vocabulary and the BOS/EOS ids follow from it. */
    int32_t n_vocab_generated = o.vocab && o.vocab < 4096 ? (int32_t)o.vocab : 512;
    SPEED_CHECK_GOTO(tokenizer_files_write(out_dir, o.tokenizer, n_vocab_generated), st, fail);
    speed_tok_params_t tp = speed_tok_default_params();
    SPEED_CHECK_GOTO(speed_tok_load(out_dir, &tp, &tok), st, fail);

    int32_t n_tok_vocab = speed_tok_vocab_size(tok);
    if (o.vocab) {
        if (o.vocab < n_tok_vocab) {
            speedctl_fail("--vocab %" PRId64 " is smaller than the tokenizer's %d tokens", o.vocab, n_tok_vocab);
            st = SPEED_ERR_INVALID_ARGUMENT;
            goto fail;
        }
        p.vocab_size = (int)o.vocab;
    } else if (o.tokenizer || p.vocab_size < n_tok_vocab) {
        p.vocab_size = n_tok_vocab; /* sized to the copied tokenizer */
    }
    p.bos_token_id = speed_tok_bos_id(tok);
    const int32_t *eos;
    size_t n_eos = speed_tok_eos_ids(tok, &eos);
    p.n_eos = 0;
    for (size_t i = 0; i < n_eos && p.n_eos < (int)(sizeof p.eos_token_ids / sizeof p.eos_token_ids[0]); i++)
        p.eos_token_ids[p.n_eos++] = eos[i];

    SPEED_CHECK_GOTO(speed_tiny_model_write(out_dir, &p), st, fail);
    int hd = p.head_dim ? p.head_dim : p.hidden / p.n_heads;
    printf("wrote %s: %d layers, hidden %d, %d heads (%d kv, head_dim %d), ffn %d, vocab %d, %s%s%s, %d shard%s\n",
           out_dir, p.n_layers, p.hidden, p.n_heads, p.n_kv_heads, hd, p.ffn, p.vocab_size, speed_dtype_name(p.dtype),
           p.tied ? ", tied" : "", p.rope_scaling ? ", rope_scaling llama3" : "", p.n_shards,
           p.n_shards == 1 ? "" : "s");
    speed_tok_destroy(tok);
    speed_config_destroy(cfg);
    return SPEEDCTL_EXIT_OK;
fail:
    speed_tok_destroy(tok);
    speed_config_destroy(cfg);
    return st == SPEED_ERR_INVALID_ARGUMENT ? SPEEDCTL_EXIT_USAGE : SPEEDCTL_EXIT_FAIL;
}

/* ---- inspect ---------------------------------------------------------------------- */

typedef struct {
    speedctl_kv_opts_t kv; /* the shared KV options; --prefill-layers defaults to 0.75 here */
    int64_t prompt_tokens;
    bool json;
} inspect_opts_t;

static const speed_config_field_t inspect_fields[] = {
    {"prompt_tokens", SPEED_CONFIG_INT, offsetof(inspect_opts_t, prompt_tokens), "4096", 1, 1e9, NULL,
     "prompt length for the example KV total"},
    {"json", SPEED_CONFIG_BOOL, offsetof(inspect_opts_t, json), "false", SPEED_CONFIG_UNBOUNDED, NULL,
     "print one JSON object"},
};

int speedctl_inspect(int argc, char **argv) {
    inspect_opts_t o;
    /* the KV group as every verb declares it, but costing SPEED at C = 0.75 L unless told */
    speed_config_field_t kv[SPEEDCTL_KV_N_FIELDS];
    memcpy(kv, speedctl_kv_fields, sizeof kv);
    kv[0].default_value = "0.75";
    const speedctl_options_part_t parts[] = {
        {kv, SPEEDCTL_KV_N_FIELDS, offsetof(inspect_opts_t, kv)},
        SPEEDCTL_OWN_PART(inspect_fields),
    };
    speedctl_options_t opts;
    if (!speedctl_options_begin(&opts, "inspect", "speedctl inspect MODEL_DIR [options]", parts,
                                SPEEDCTL_N_PARTS(parts), &o, argc, argv))
        return opts.exit_code;
    speed_config_t *cfg = opts.cfg;
    char *const *pos;
    if (speed_config_positional(cfg, &pos) != 1) {
        speedctl_fail("inspect takes exactly one MODEL_DIR (see --help)");
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_USAGE;
    }
    const char *dir = pos[0];
    speed_model_t *m = NULL;
    speed_tok_t *tok = NULL;
    speed_model_params_t mp = speed_model_default_params();
    speed_status_t st = speed_model_load(dir, &mp, &m);
    if (st != SPEED_OK) {
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_FAIL;
    }
    const speed_model_config_t *c = &m->config;
    speed_depth_t depth;
    if (speedctl_depth_resolve(o.kv.prefill_layers, o.kv.anchors, o.kv.tail, c->n_layers, &depth) != SPEED_OK) {
        speed_model_destroy(m);
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_USAGE;
    }
    const int C = depth.prefill_layers;
    speed_dtype_t kv_dtype = speed_model_kv_dtype_resolve(m, (speed_dtype_t)o.kv.kv_dtype);
    size_t per_tok_full = speed_kv_bytes_per_token(c, c->n_layers, kv_dtype);
    size_t per_tok_c = speed_kv_bytes_per_token(c, C, kv_dtype);
    size_t prompt_full =
        speed_kv_bytes_for_prompt(c, c->n_layers, (int)o.kv.anchors, (int)o.kv.tail, o.prompt_tokens, kv_dtype);
    size_t prompt_c = speed_kv_bytes_for_prompt(c, C, (int)o.kv.anchors, (int)o.kv.tail, o.prompt_tokens, kv_dtype);
    int64_t n_params = speed_model_n_params(m);
    size_t n_bytes = speed_model_n_bytes(m);

    /* The tokenizer is optional for inspect: report it when it loads. */
    speed_tok_params_t tp = speed_tok_default_params();
    speed_log_set_sink(speedctl_silent_sink, NULL);
    bool have_tok = speed_tok_load(dir, &tp, &tok) == SPEED_OK;
    speedctl_log_to_stderr();
    if (have_tok && speed_tok_vocab_size(tok) > c->vocab_size)
        SPEED_WARN(SPEED_SUBSYS_CLI,
                   "%s: the tokenizer has %d tokens but the model's vocab_size is %d; "
                   "ids above %d cannot be fed to the model",
                   dir, speed_tok_vocab_size(tok), c->vocab_size, c->vocab_size - 1);

    char rope[128];
    if (c->rope_scaling.type == SPEED_ROPE_SCALING_LLAMA3)
        snprintf(rope, sizeof rope, "theta %g, llama3 scaling x%g (low %g, high %g, original %d)", c->rope_theta,
                 c->rope_scaling.factor, c->rope_scaling.low_freq_factor, c->rope_scaling.high_freq_factor,
                 c->rope_scaling.original_max_position);
    else
        snprintf(rope, sizeof rope, "theta %g", c->rope_theta);

    if (o.json) {
        printf("{\"architecture\": \"%s\", \"layers\": %d, \"hidden\": %d, \"heads\": %d, \"kv_heads\": %d, "
               "\"head_dim\": %d, \"ffn\": %d, \"vocab\": %d, \"max_position\": %d, \"rope_theta\": %g, "
               "\"rope_scaling\": %s, \"tied\": %s, \"dtype\": \"%s\", \"params\": %" PRId64 ", \"bytes\": %zu, "
               "\"kv\": {\"dtype\": \"%s\", \"prefill_layers\": %d, \"anchors\": %" PRId64 ", \"tail\": %" PRId64
               ", \"bytes_per_token_full_depth\": %zu, \"bytes_per_shallow_token\": %zu, \"prompt_tokens\": %" PRId64
               ", \"prompt_bytes_full_depth\": %zu, \"prompt_bytes\": %zu}",
               c->architecture, c->n_layers, c->hidden, c->n_heads, c->n_kv_heads, c->head_dim, c->ffn, c->vocab_size,
               c->max_position, c->rope_theta,
               c->rope_scaling.type == SPEED_ROPE_SCALING_LLAMA3 ? "\"llama3\"" : "null",
               c->tie_word_embeddings ? "true" : "false", speed_dtype_name(c->torch_dtype), n_params, n_bytes,
               speed_dtype_name(kv_dtype), C, o.kv.anchors, o.kv.tail, per_tok_full, per_tok_c, o.prompt_tokens,
               prompt_full, prompt_c);
        if (have_tok)
            printf(", \"tokenizer\": {\"vocab\": %d, \"bos\": %d, \"chat_template\": \"%s\"}",
                   speed_tok_vocab_size(tok), speed_tok_bos_id(tok),
                   speed_chat_template_name(speed_tok_chat_template(tok)));
        printf("}\n");
    } else {
        char b1[32], b2[32], b3[32];
        speedctl_bytes_human((double)n_bytes, 2, b1, sizeof b1);
        printf("model          %s\n", dir);
        printf("architecture   %s\n", c->architecture);
        printf("layers         %d\n", c->n_layers);
        printf("hidden         %d (ffn %d)\n", c->hidden, c->ffn);
        printf("attention      %d heads, %d kv heads (%s), head_dim %d\n", c->n_heads, c->n_kv_heads,
               c->n_kv_heads == c->n_heads ? "multi-head" : "grouped-query", c->head_dim);
        printf("vocab          %d%s\n", c->vocab_size, c->tie_word_embeddings ? " (tied embeddings)" : "");
        printf("context        %d positions, rope %s\n", c->max_position, rope);
        printf("parameters     %" PRId64 " (%.3f B)\n", n_params, (double)n_params / 1e9);
        printf("weights        %s, %s\n", speed_dtype_name(c->torch_dtype), b1);
        speedctl_bytes_human((double)per_tok_full, 2, b1, sizeof b1);
        speedctl_bytes_human((double)per_tok_c, 2, b2, sizeof b2);
        printf("KV per token   full depth %s; shallow (C=%d of %d) %s (%.1f%%), %s cache\n", b1, C, c->n_layers, b2,
               100.0 * (double)per_tok_c / (double)per_tok_full, speed_dtype_name(kv_dtype));
        speedctl_bytes_human((double)prompt_full, 2, b1, sizeof b1);
        speedctl_bytes_human((double)prompt_c, 2, b3, sizeof b3);
        printf("KV per prompt  %" PRId64 " tokens: full depth %s; SPEED (C=%d, A=%" PRId64 ", T=%" PRId64
               ") %s (%.1f%%)\n",
               o.prompt_tokens, b1, C, o.kv.anchors, o.kv.tail, b3, 100.0 * (double)prompt_c / (double)prompt_full);
        if (have_tok) {
            const int32_t *eos;
            size_t n_eos = speed_tok_eos_ids(tok, &eos);
            printf("tokenizer      %d tokens, bos %d, eos", speed_tok_vocab_size(tok), speed_tok_bos_id(tok));
            for (size_t i = 0; i < n_eos; i++) printf("%s%d", i ? "," : " ", eos[i]);
            printf(", chat template %s\n", speed_chat_template_name(speed_tok_chat_template(tok)));
        } else {
            printf("tokenizer      none usable (%s)\n", speed_log_last_error());
        }
    }
    speed_tok_destroy(tok);
    speed_model_destroy(m);
    speed_config_destroy(cfg);
    return SPEEDCTL_EXIT_OK;
}
