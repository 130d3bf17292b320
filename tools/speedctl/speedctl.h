/* speedctl: the operator's command-line tool. Each verb lives in its own file and has
 * the signature of speedctl_verb_fn_t; it returns the process exit code (0 ok,
 * 1 failure, 2 usage error). Verbs parse their options with common/config.h, so every
 * option is also settable as SPEED_<NAME> and listed by `speedctl VERB --help`. */
#ifndef SPEEDCTL_H
#define SPEEDCTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "cluster_config.h"
#include "engine.h"
#include "config.h"
#include "status.h"
#include "tokenizer.h"

typedef int (*speedctl_verb_fn_t)(int argc, char **argv);

int speedctl_make_tiny_model(int argc, char **argv);
int speedctl_inspect(int argc, char **argv);
int speedctl_tokenize(int argc, char **argv);
int speedctl_generate(int argc, char **argv);
int speedctl_bench(int argc, char **argv);
int speedctl_eval(int argc, char **argv);
int speedctl_up(int argc, char **argv);
int speedctl_certs(int argc, char **argv);
int speedctl_loadgen(int argc, char **argv);
int speedctl_profile(int argc, char **argv); /* cli_profile.c */
int speedctl_plan(int argc, char **argv);    /* cli_plan.c */
int speedctl_k8s(int argc, char **argv);

int speedctl_top(int argc, char **argv);

/* speedctl up's command line split in two (cli_up_args.c): the options in up_fields (speedctl
 * up's own) and everything else, which goes unchanged and in order to every child. Unknown
 * options stay with the cluster options and the first is remembered in unknown. The argv
 * arrays point into the caller's argv (which must outlive them); cluster_argv has room for
 * two more entries and a NULL. False only when out of memory; speedctl_up_args_cleanup frees
 * the arrays either way (and is safe on a zeroed struct). */
typedef struct {
    char **up_argv, **cluster_argv; /* argv[0] = "up"; NULL-terminated */
    int up_argc, cluster_argc;
    const char *config;  /* the positional CONFIG, or NULL */
    bool config_option;  /* --config was given too */
    bool node_index;     /* --node.index was given (speedctl up sets it) */
    const char *unknown; /* the first option neither table has */
    int n_positional;
} speedctl_up_args_t;
bool speedctl_up_args_split(const speed_config_field_t *up_fields, size_t n_up_fields, int argc, char **argv,
                            speedctl_up_args_t *a);
void speedctl_up_args_cleanup(speedctl_up_args_t *a);

/* speedctl up --help on stdout: usage, what it does, up_fields, then the cluster options. */
void speedctl_up_help_print(const speed_config_field_t *up_fields, size_t n_up_fields, const char *usage);

/* The control plane certificates of a cluster into dir (cli_certs.c): ca.crt, ca.key, and
 * <name>.crt / <name>.key for router, admin, prefill-<i>, decode-<i>, with the cluster's host,
 * control.listen, loopback and the comma-separated extra_hosts (may be NULL) as SANs. Keys
 * 0600; existing files are refused unless force. The reason of a failure goes into err. */
speed_status_t speedctl_certs_write(const speed_cluster_config_t *c, const char *dir, const char *extra_hosts,
                                    int64_t days, bool force, char *err, size_t err_size);

/* speedctl up's throwaway set: a new private directory (mode 0700) under $TMPDIR (or /tmp) into
 * dir (size bytes), filled by speedctl_certs_write (valid 30 days). False on failure (printed);
 * dir is then "" or a directory to remove. speedctl_certs_tmp_remove deletes its files and the
 * directory and sets dir to ""; "" is a no-op. */
bool speedctl_certs_tmp_make(const speed_cluster_config_t *c, char *dir, size_t size);
void speedctl_certs_tmp_remove(char *dir);

/* Log sinks: the CLI's stderr format, and one that drops everything (used around
 * optional steps whose failure is reported differently). */
#include "log.h"
void speedctl_silent_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                          const char *line);
void speedctl_log_to_stderr(void);

/* Exit codes. */
#define SPEEDCTL_EXIT_OK    0
#define SPEEDCTL_EXIT_FAIL  1
#define SPEEDCTL_EXIT_USAGE 2

/* Prints "speedctl: error: <formatted>" on stderr (for errors the CLI itself finds;
 * library errors are printed by the log sink where they are born). */
void speedctl_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- options (options.c) --------------------------------------------------------------
 * A verb describes its options in a speed_config_field_t table (config.h) whose offsets point
 * into its own options struct. Options that several verbs take are declared once, as a group:
 * a table whose offsets point into the group's struct, which the verb's struct embeds. A verb
 * that takes groups lists its table's parts, in the order --help shows them:
 *
 *   typedef struct { speedctl_engine_opts_t engine; int64_t max_tokens; } gen_opts_t;
 *   static const speedctl_options_part_t gen_parts[] = {
 *       SPEEDCTL_ENGINE_PART(gen_opts_t, engine),
 *       SPEEDCTL_OWN_PART(gen_fields),              // offsets into gen_opts_t
 *   };
 *   speed_config_field_t fields[SPEEDCTL_MAX_FIELDS];
 *   speedctl_options_load_parts("generate", usage, gen_parts, 2, fields, &o, argc, argv, &cfg, &done);
 */

/* Table entries: SPEEDCTL_OPT(struct, "name", TYPE, member, default, min, max, enum_names, doc)
 * with TYPE one of INT, DOUBLE, BOOL, STRING, ENUM; SPEEDCTL_TEXT_OPT for a STRING option
 * without default or bounds. */
#define SPEEDCTL_OPT(st, name, type, member, ...) \
    { name, SPEED_CONFIG_##type, offsetof(st, member), __VA_ARGS__ }
#define SPEEDCTL_TEXT_OPT(st, name, member, doc) \
    SPEEDCTL_OPT(st, name, STRING, member, NULL, SPEED_CONFIG_UNBOUNDED, NULL, doc)

/* Loads a verb's options. Handles --help and --print-config itself: *done_p is set and
 * the exit code returned when the verb should stop (help shown, config printed, or an
 * error). `usage` is the one-line synopsis shown in --help. On return with *done_p false
 * the caller owns *cfg_p and must speed_config_destroy it. */
int speedctl_options_load(const char *verb, const char *usage, const speed_config_field_t *fields, size_t n_fields,
                          void *opts, int argc, char **argv, speed_config_t **cfg_p, bool *done_p);

/* One part of a verb's table: n_fields fields whose offsets are relative to a struct at
 * `offset` in the verb's options struct (0 for the verb's own fields). */
typedef struct {
    const speed_config_field_t *fields;
    size_t n_fields;
    size_t offset;
} speedctl_options_part_t;

#define SPEEDCTL_OWN_PART(array) \
    { array, sizeof array / sizeof array[0], 0 }
#define SPEEDCTL_ENGINE_PART(st, member)                                                                      \
    {speedctl_engine_fields, SPEEDCTL_ENGINE_N_FIELDS, offsetof(st, member)}, {                               \
        speedctl_kv_fields, SPEEDCTL_KV_N_FIELDS, offsetof(st, member) + offsetof(speedctl_engine_opts_t, kv) \
    }
#define SPEEDCTL_KV_PART(st, member) \
    { speedctl_kv_fields, SPEEDCTL_KV_N_FIELDS, offsetof(st, member) }
#define SPEEDCTL_CHAT_PART(st, member) \
    { speedctl_chat_fields, SPEEDCTL_CHAT_N_FIELDS, offsetof(st, member) }

/* Room for any verb's table. */
#define SPEEDCTL_MAX_FIELDS 64

/* A verb's options while it runs: the table put together from its parts (it must outlive cfg)
 * and the loaded values. */
typedef struct {
    speed_config_field_t fields[SPEEDCTL_MAX_FIELDS];
    speed_config_t *cfg; /* the verb destroys it */
    int exit_code;       /* what the verb returns when speedctl_options_begin says done */
} speedctl_options_t;

/* Loads the options of the table made of `parts` into `values` (speedctl_options_load): returns
 * true when the verb should go on with opts->cfg, false when it must return opts->exit_code now
 * (--help or --print-config answered, or a usage error reported). */
bool speedctl_options_begin(speedctl_options_t *opts, const char *verb, const char *usage,
                            const speedctl_options_part_t *parts, size_t n_parts, void *values, int argc, char **argv);
#define SPEEDCTL_N_PARTS(parts) (sizeof(parts) / sizeof((parts)[0]))

/* speedctl_options_load of the table put together from the parts in `fields` (room for
 * SPEEDCTL_MAX_FIELDS; it must outlive *cfg_p, so a local of the verb function). */
int speedctl_options_load_parts(const char *verb, const char *usage, const speedctl_options_part_t *parts,
                                size_t n_parts, speed_config_field_t *fields, void *opts, int argc, char **argv,
                                speed_config_t **cfg_p, bool *done_p);

/* The KV options: the SPEED depth and the cache's element type, for every verb that costs or
 * runs a KV cache (generate, bench: as part of the engine options; inspect on its own, with its
 * own default C). speedctl_depth_resolve turns the depth into the engine's. */
typedef struct {
    char *prefill_layers;  /* --prefill-layers: "24" or "0.75"; NULL = L (SPEED off) */
    int64_t anchors, tail; /* --anchors A, --tail T */
    int kv_dtype;          /* --kv-dtype: speed_dtype_t */
} speedctl_kv_opts_t;

#define SPEEDCTL_KV_N_FIELDS 4
extern const speed_config_field_t speedctl_kv_fields[SPEEDCTL_KV_N_FIELDS];

/* The engine options: every verb that runs the engine (generate, bench) takes them, and the KV
 * options with them (SPEEDCTL_ENGINE_PART adds both groups). speedctl_engine_depth,
 * speedctl_ranks_create and speedctl_engine_params turn them into what the engine takes. */
typedef struct {
    char *model;             /* --model DIR (NULL: not given) */
    speedctl_kv_opts_t kv;   /* --prefill-layers, --anchors, --tail, --kv-dtype */
    int64_t threads;         /* --threads: 0 = all online cores */
    int backend;             /* --backend: speed_backend_kind_t */
    int64_t device;          /* --device: the GPU of --backend cuda */
    int64_t tensor_parallel; /* --tensor-parallel: ranks */
    bool batch_invariant;    /* --batch-invariant: speed_backend_params_t.batch_invariant */
} speedctl_engine_opts_t;

#define SPEEDCTL_ENGINE_N_FIELDS 6
extern const speed_config_field_t speedctl_engine_fields[SPEEDCTL_ENGINE_N_FIELDS];

/* The SPEED depth of --prefill-layers (NULL or "": C = n_layers), --anchors and --tail for a
 * model of n_layers layers, resolved by speed_depth_resolve (engine/depth) exactly as the router
 * and the nodes resolve a request's. A value it refuses is reported as one line naming the
 * option and the resolver's reason; returns SPEED_ERR_INVALID_ARGUMENT then (a usage error),
 * else SPEED_OK. */
speed_status_t speedctl_depth_resolve(const char *prefill_layers, int64_t anchors, int64_t tail, int n_layers,
                                      speed_depth_t *depth_p);
/* speedctl_depth_resolve of the engine options. */
speed_status_t speedctl_engine_depth(const speedctl_engine_opts_t *opts, int n_layers, speed_depth_t *depth_p);

/* The backends of --tensor-parallel ranks (docs/tensor-parallel.md): n backends of one kind,
 * the --threads shared out among them (0 = all cores). be[0] is rank 0's. */
typedef struct {
    speed_backend_t *be[64];
    int n;
} speedctl_ranks_t;

/* Creates the ranks' backends of --backend, --device (cuda) and --threads (cpu). A backend
 * that cannot be created, or --tensor-parallel > 1 with cuda, is reported as one error line
 * naming the backend, the cause and the way out (no GPU: "use --backend cpu"). On error
 * nothing is left and the status is returned: SPEED_ERR_UNSUPPORTED (no CUDA in this build;
 * GPU ranks), SPEED_ERR_DEVICE (no usable GPU), SPEED_ERR_INVALID_ARGUMENT (no such device),
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speedctl_ranks_create(const speedctl_engine_opts_t *opts, speedctl_ranks_t *ranks);
void speedctl_ranks_destroy(speedctl_ranks_t *ranks);

/* speed_engine_default_params with the ranks' backends (backend, tp_size, tp_backends), the
 * model, --kv-dtype and the depth. What follows from the verb's workload (max_seqs, KV pool
 * sizes) is the verb's to set. */
speed_engine_params_t speedctl_engine_params(const speedctl_engine_opts_t *opts, const speedctl_ranks_t *ranks,
                                             const speed_model_t *model, speed_depth_t depth);

/* The chat options: a user message rendered with the chat template (generate, tokenize). */
typedef struct {
    char *chat;        /* --chat MSG (NULL: not given) */
    char *system;      /* --system MSG (NULL: none) */
    int chat_template; /* --chat-template: speed_chat_template_t */
} speedctl_chat_opts_t;

#define SPEEDCTL_CHAT_N_FIELDS 3
extern const speed_config_field_t speedctl_chat_fields[SPEEDCTL_CHAT_N_FIELDS];

/* Renders --system (if any) and --chat with tok's chat template (the tokenizer's, or the one
 * --chat-template named when it was loaded) into *text_p (speed_free it) and encodes the text
 * into ids (appending) without adding special tokens: the template carries its own BOS.
 * Returns the status of speed_tok_chat_render or speed_tok_encode (each logs its error);
 * *text_p is NULL on error. */
speed_status_t speedctl_chat_encode(const speedctl_chat_opts_t *opts, const speed_tok_t *tok, char **text_p,
                                    speed_tok_ids_t *ids);

/* speed_file_read for CLI inputs ("-" is not special; use /dev/stdin). */
speed_status_t speedctl_read_file(const char *path, char **data_p, size_t *len_p);

/* Parses "1, 2,3" into out (appending); every id must be in 0..vocab-1. Errors name `what`
 * (the option) and the bad item: SPEED_ERR_INVALID_ARGUMENT, or SPEED_ERR_NO_MEMORY. */
speed_status_t speedctl_ids_parse(const char *what, const char *list, int32_t vocab, speed_tok_ids_t *out);

/* "512 B", "1.5 KiB", "3.25 GiB": bytes in the largest binary unit (up to TiB) that keeps the
 * number at least 1, with `decimals` digits after the point (none for plain bytes). */
void speedctl_bytes_human(double bytes, int decimals, char *out, size_t size);

/* A copy of s with the escapes \n \t \r \\ replaced (others kept as written), for options
 * such as --stop that users type in a shell. NULL on allocation failure; speed_free it. */
char *speedctl_unescape(const char *s);

/* Copies a regular file (overwrites dst). */
speed_status_t speedctl_copy_file(const char *src, const char *dst);

#endif /* SPEEDCTL_H */
