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
int speedctl_up(int argc, char **argv);

/* Log sinks: the CLI's stderr format, and one that drops everything (used around
 * optional steps whose failure is reported differently). */
#include "log.h"
void speedctl_silent_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys,
                          const char *request_id, const char *line);
void speedctl_log_to_stderr(void);

/* Exit codes. */
#define SPEEDCTL_EXIT_OK    0
#define SPEEDCTL_EXIT_FAIL  1
#define SPEEDCTL_EXIT_USAGE 2

/* Loads a verb's options. Handles --help and --print-config itself: *done_p is set and
 * the exit code returned when the verb should stop (help shown, config printed, or an
 * error). `usage` is the one-line synopsis shown in --help. On return with *done_p false
 * the caller owns *cfg_p and must speed_config_destroy it. */
int speedctl_options_load(const char *verb, const char *usage,
                          const speed_config_field_t *fields, size_t n_fields, void *opts,
                          int argc, char **argv, speed_config_t **cfg_p, bool *done_p);

/* Prints "speedctl: error: <formatted>" on stderr (for errors the CLI itself finds;
 * library errors are printed by the log sink where they are born). */
void speedctl_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The --backend choices of generate and bench, NULL-terminated: "cpu", "cpu-ref", "cuda". */
extern const char *const speedctl_backend_names[];

/* Creates the backend of --backend (an index into speedctl_backend_names), --device (cuda)
 * and --threads (cpu). When it cannot be created, prints one error line naming the backend,
 * the cause and the way out (no GPU: "use --backend cpu") and returns the status:
 * SPEED_ERR_UNSUPPORTED (no CUDA in this build), SPEED_ERR_DEVICE (no usable GPU),
 * SPEED_ERR_INVALID_ARGUMENT (no such device), SPEED_ERR_NO_MEMORY. */
speed_status_t speedctl_backend_create(int backend, int64_t device, int64_t threads, speed_backend_t **be_p);

/* The backends of --tensor-parallel ranks (docs/tensor-parallel.md): n backends of one kind,
 * the --threads shared out among them (0 = all cores). be[0] is rank 0's. */
typedef struct {
    speed_backend_t *be[64];
    int n;
} speedctl_ranks_t;

/* Creates them (n 1..64; n > 1 needs a cpu backend: one line otherwise). On error nothing is
 * left and the status is returned as speedctl_backend_create's, or SPEED_ERR_UNSUPPORTED. */
speed_status_t speedctl_ranks_create(int backend, int64_t device, int64_t threads, int64_t n, speedctl_ranks_t *ranks);
/* Points engine params at the ranks (backend, tp_size, tp_backends). */
void speedctl_ranks_apply(const speedctl_ranks_t *ranks, speed_engine_params_t *params);
void speedctl_ranks_destroy(speedctl_ranks_t *ranks);

/* speed_file_read for CLI inputs ("-" is not special; use /dev/stdin). */
speed_status_t speedctl_read_file(const char *path, char **data_p, size_t *len_p);

/* Parses "1, 2,3" into out (appending); every id must be in 0..vocab-1. Errors name `what`
 * (the option) and the bad item: SPEED_ERR_INVALID_ARGUMENT, or SPEED_ERR_NO_MEMORY. */
speed_status_t speedctl_ids_parse(const char *what, const char *list, int32_t vocab, speed_tok_ids_t *out);

/* A copy of s with the escapes \n \t \r \\ replaced (others kept as written), for options
 * such as --stop that users type in a shell. NULL on allocation failure; speed_free it. */
char *speedctl_unescape(const char *s);

/* Copies a regular file (overwrites dst). */
speed_status_t speedctl_copy_file(const char *src, const char *dst);

#endif /* SPEEDCTL_H */
