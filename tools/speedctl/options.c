/* Verbs' options (speedctl.h): loading a verb's table, the option groups several verbs share
 * (engine, chat) declared once, and what turns a group's values into a depth, backends,
 * engine params or a chat prompt. */
#include "speedctl.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "dtype.h"
#include "log.h"
#include "model.h"

/* ---- loading ------------------------------------------------------------------------------ */

int speedctl_options_load(const char *verb, const char *usage, const speed_config_field_t *fields, size_t n_fields,
                          void *opts, int argc, char **argv, speed_config_t **cfg_p, bool *done_p) {
    *done_p = true;
    *cfg_p = NULL;
    speed_config_t *cfg = NULL;
    if (speed_config_load(fields, n_fields, opts, argc, argv, "SPEED_", &cfg) != SPEED_OK) {
        fprintf(stderr, "speedctl: see 'speedctl %s --help'\n", verb);
        return SPEEDCTL_EXIT_USAGE;
    }
    if (speed_config_help_requested(cfg)) {
        printf("usage: %s\n\noptions:\n", usage);
        fflush(stdout);
        speed_config_print_help(fields, n_fields, "SPEED_", stdout);
        speed_config_destroy(cfg);
        return SPEEDCTL_EXIT_OK;
    }
    if (speed_config_print_requested(cfg)) {
        speed_status_t st = speed_config_print(cfg, stdout);
        speed_config_destroy(cfg);
        return st == SPEED_OK ? SPEEDCTL_EXIT_OK : SPEEDCTL_EXIT_FAIL;
    }
    *done_p = false;
    *cfg_p = cfg;
    return SPEEDCTL_EXIT_OK;
}

int speedctl_options_load_parts(const char *verb, const char *usage, const speedctl_options_part_t *parts,
                                size_t n_parts, speed_config_field_t *fields, void *opts, int argc, char **argv,
                                speed_config_t **cfg_p, bool *done_p) {
    size_t n = 0;
    for (size_t p = 0; p < n_parts; p++) {
        SPEED_ASSERT(n + parts[p].n_fields <= SPEEDCTL_MAX_FIELDS);
        for (size_t i = 0; i < parts[p].n_fields; i++) {
            fields[n] = parts[p].fields[i];
            fields[n++].offset += parts[p].offset;
        }
    }
    return speedctl_options_load(verb, usage, fields, n, opts, argc, argv, cfg_p, done_p);
}

bool speedctl_options_begin(speedctl_options_t *opts, const char *verb, const char *usage,
                            const speedctl_options_part_t *parts, size_t n_parts, void *values, int argc, char **argv) {
    bool done;
    opts->exit_code =
        speedctl_options_load_parts(verb, usage, parts, n_parts, opts->fields, values, argc, argv, &opts->cfg, &done);
    return !done;
}

/* ---- the engine options ------------------------------------------------------------------- */

#define KV_OPT(...) SPEEDCTL_OPT(speedctl_kv_opts_t, __VA_ARGS__)
const speed_config_field_t speedctl_kv_fields[SPEEDCTL_KV_N_FIELDS] = {
    SPEEDCTL_TEXT_OPT(speedctl_kv_opts_t, "prefill_layers", prefill_layers,
                      "SPEED depth C: layers that see every prompt token, an integer 1..L or a fraction of L "
                      "(0.75); empty = L (SPEED off)"),
    KV_OPT("anchors", INT, anchors, "1", 0, 1 << 20, NULL, "first prompt tokens kept at full depth (A)"),
    KV_OPT("tail", INT, tail, "1", 1, 1 << 20, NULL, "last prompt tokens kept at full depth (T)"),
    KV_OPT("kv_dtype", ENUM, kv_dtype, "auto", SPEED_CONFIG_UNBOUNDED, speed_kv_dtype_names,
           "KV cache element type; auto = the model's (f32, bf16 or f16)"),
};

#define ENGINE_OPT(...) SPEEDCTL_OPT(speedctl_engine_opts_t, __VA_ARGS__)
const speed_config_field_t speedctl_engine_fields[SPEEDCTL_ENGINE_N_FIELDS] = {
    SPEEDCTL_TEXT_OPT(speedctl_engine_opts_t, "model", model,
                      "model directory (config.json, safetensors, tokenizer.json); required"),
    ENGINE_OPT("threads", INT, threads, "0", 0, 1024, NULL, "compute threads; 0 = all online cores"),
    ENGINE_OPT("backend", ENUM, backend, "cpu", SPEED_CONFIG_UNBOUNDED, speed_backend_kind_names,
               "compute backend: cpu (fast), cpu-ref (the reference loops) or cuda (a GPU)"),
    ENGINE_OPT("device", INT, device, "0", 0, 1023, NULL, "--backend cuda: the GPU's index"),
    ENGINE_OPT("tensor_parallel", INT, tensor_parallel, "1", 1, 64, NULL,
               "ranks the model is split over (cpu backends: threads of this process, --threads shared out)"),
    ENGINE_OPT("batch_invariant", BOOL, batch_invariant, "false", SPEED_CONFIG_UNBOUNDED, NULL,
               "every sequence's logits bit-identical whatever shares its batch, its chunking or the thread "
               "count (engine.batch_invariant of a cluster; the cuda backend refuses it)"),
};

speed_status_t speedctl_depth_resolve(const char *prefill_layers, int64_t anchors, int64_t tail, int n_layers,
                                      speed_depth_t *depth_p) {
    /* the one resolution (engine/depth), as the router and the nodes do it */
    char why[256];
    speed_depth_request_t q = {.has_anchors = true, .anchors = anchors, .has_tail = true, .tail = tail};
    if (speed_cutoff_parse(prefill_layers, &q.prefill_layers, why, sizeof why) == SPEED_OK &&
        speed_depth_resolve(&q, NULL, n_layers, depth_p, why, sizeof why) == SPEED_OK)
        return SPEED_OK;
    const char *part = speed_depth_error_part(why);
    speedctl_fail("--%s: %s", strcmp(part, "prefill_layers") == 0 ? "prefill-layers" : part, why);
    return SPEED_ERR_INVALID_ARGUMENT;
}

speed_status_t speedctl_engine_depth(const speedctl_engine_opts_t *o, int n_layers, speed_depth_t *depth_p) {
    return speedctl_depth_resolve(o->kv.prefill_layers, o->kv.anchors, o->kv.tail, n_layers, depth_p);
}

/* One backend of the options' kind and device, with n_threads. */
static speed_status_t backend_create(const speedctl_engine_opts_t *o, int64_t n_threads, speed_backend_t **be_p) {
    speed_backend_params_t bp = speed_backend_default_params();
    bp.kind = (speed_backend_kind_t)o->backend;
    bp.n_threads = (int)n_threads;
    bp.device = (int)o->device;
    bp.batch_invariant = o->batch_invariant;
    char label[32];
    speed_backend_label(&bp, label, sizeof label);
    /* one error line: the backend's cause, folded into ours */
    speed_log_clear_last_error();
    speed_log_set_sink(speedctl_silent_sink, NULL);
    speed_status_t st = speed_backend_create(&bp, be_p);
    speedctl_log_to_stderr();
    if (st == SPEED_OK) return SPEED_OK;
    const char *cause = speed_backend_failure(st);
    const char *hint = st == SPEED_ERR_DEVICE        ? " (the cuda backend needs a GPU; use --backend cpu)"
                       : st == SPEED_ERR_UNSUPPORTED ? "; use --backend cpu"
                                                     : "";
    speedctl_fail("backend %s: %s%s", label, cause, hint);
    return st;
}

speed_status_t speedctl_ranks_create(const speedctl_engine_opts_t *o, speedctl_ranks_t *r) {
    memset(r, 0, sizeof *r);
    int64_t n = o->tensor_parallel, threads = o->threads;
    if (n > 1 && o->backend == SPEED_BACKEND_CUDA) {
        speedctl_fail("--tensor-parallel %lld with --backend cuda: GPU ranks run one process each over NCCL, which "
                      "speedctl does not start; use --tensor-parallel 1 or a cpu backend",
                      (long long)n);
        return SPEED_ERR_UNSUPPORTED;
    }
    if (n > 1) { /* the threads are shared out among the ranks */
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        int64_t total = threads > 0 ? threads : (cores > 0 ? cores : 1);
        threads = total / n > 0 ? total / n : 1;
    }
    for (int i = 0; i < n; i++) {
        speed_status_t st = backend_create(o, threads, &r->be[i]);
        if (st != SPEED_OK) {
            speedctl_ranks_destroy(r);
            return st;
        }
        r->n++;
    }
    return SPEED_OK;
}

void speedctl_ranks_destroy(speedctl_ranks_t *r) {
    for (int i = 0; i < r->n; i++) speed_backend_destroy(r->be[i]);
    memset(r, 0, sizeof *r);
}

speed_engine_params_t speedctl_engine_params(const speedctl_engine_opts_t *o, const speedctl_ranks_t *r,
                                             const speed_model_t *model, speed_depth_t depth) {
    speed_engine_params_t p = speed_engine_default_params();
    p.backend = r->be[0];
    p.tp_size = r->n;
    p.tp_backends = r->n > 1 ? r->be : NULL;
    p.model = model;
    p.kv_dtype = (speed_dtype_t)o->kv.kv_dtype;
    p.depth = depth;
    return p;
}

/* ---- the chat options --------------------------------------------------------------------- */

const speed_config_field_t speedctl_chat_fields[SPEEDCTL_CHAT_N_FIELDS] = {
    SPEEDCTL_TEXT_OPT(speedctl_chat_opts_t, "chat", chat,
                      "a user message, rendered with the model's chat template (which carries the BOS)"),
    SPEEDCTL_TEXT_OPT(speedctl_chat_opts_t, "system", system, "system message for --chat"),
    SPEEDCTL_OPT(speedctl_chat_opts_t, "chat_template", ENUM, chat_template, "auto", SPEED_CONFIG_UNBOUNDED,
                 speed_chat_template_names,
                 "chat template for --chat: auto (tokenizer_config.json's) or a built-in one"),
};

speed_status_t speedctl_chat_encode(const speedctl_chat_opts_t *o, const speed_tok_t *tok, char **text_p,
                                    speed_tok_ids_t *ids) {
    speed_chat_message_t msgs[2];
    size_t n = 0;
    if (o->system) msgs[n++] = (speed_chat_message_t){"system", o->system};
    msgs[n++] = (speed_chat_message_t){"user", o->chat};
    char *text = NULL;
    *text_p = NULL;
    SPEED_CHECK(speed_tok_chat_render(tok, msgs, n, true, &text));
    speed_status_t st = speed_tok_encode(tok, text, strlen(text), false, ids); /* the template has the BOS */
    if (st != SPEED_OK) {
        speed_free(text);
        return st;
    }
    *text_p = text;
    return SPEED_OK;
}
