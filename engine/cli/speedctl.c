/* speedctl entry point: verb dispatch, log sink, shared helpers. */
#include "speedctl.h"

#include <errno.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "file.h"
#include "log.h"

/* Inputs (texts to tokenize, tokenizer files to copy) are held in memory whole. */
#define SPEEDCTL_FILE_MAX_BYTES ((size_t)4 << 30)

static const struct {
    const char *name;
    speedctl_verb_fn_t fn;
    const char *summary;
} verbs[] = {
    {"make-tiny-model", speedctl_make_tiny_model,
     "write a random-weight Llama model in the Hugging Face layout"},
    {"inspect", speedctl_inspect, "validate a model directory and print its shape, size and KV cost"},
    {"tokenize", speedctl_tokenize, "encode text to token ids, decode ids, render chat templates"},
};
#define N_VERBS (sizeof verbs / sizeof verbs[0])

/* CLI log format: errors and warnings as "speedctl: error: ...", the rest as is. */
static void cli_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys,
                     const char *request_id, const char *line) {
    (void)user; (void)subsys; (void)request_id;
    const char *tag = level == SPEED_LOG_ERROR ? "error: " : level == SPEED_LOG_WARN ? "warning: " : "";
    fprintf(stderr, "speedctl: %s%s\n", tag, line);
}

void speedctl_silent_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys,
                          const char *request_id, const char *line) {
    (void)user; (void)level; (void)subsys; (void)request_id; (void)line;
}

void speedctl_log_to_stderr(void) { speed_log_set_sink(cli_sink, NULL); }

void speedctl_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "speedctl: error: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int speedctl_options_load(const char *verb, const char *usage,
                          const speed_config_field_t *fields, size_t n_fields, void *opts,
                          int argc, char **argv, speed_config_t **cfg_p, bool *done_p) {
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

speed_status_t speedctl_read_file(const char *path, char **data_p, size_t *len_p) {
    return speed_file_read(path, SPEEDCTL_FILE_MAX_BYTES, SPEED_SUBSYS_CLI, SPEED_FILE_READ_DEFAULT, data_p, len_p);
}

speed_status_t speedctl_copy_file(const char *src, const char *dst) {
    char *data = NULL;
    size_t len = 0;
    SPEED_CHECK(speedctl_read_file(src, &data, &len));
    speed_status_t st = SPEED_OK;
    FILE *f = fopen(dst, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_CLI, "%s: write failed: %s", dst, strerror(errno));
        st = SPEED_ERR_IO;
    }
    speed_free(data);
    return st;
}

static void usage(FILE *f) {
    fprintf(f, "usage: speedctl VERB [options]   (speedctl VERB --help for a verb's options)\n\nverbs:\n");
    for (size_t i = 0; i < N_VERBS; i++) fprintf(f, "  %-16s %s\n", verbs[i].name, verbs[i].summary);
    fprintf(f, "\nEvery option can also be set in the environment as SPEED_<OPTION> or in a YAML file\n"
               "given with --config FILE; --print-config shows the effective values and where each\n"
               "came from. SPEED_LOG sets log levels, e.g. SPEED_LOG=debug or SPEED_LOG=warn,tok=debug.\n");
}

int main(int argc, char **argv) {
    speedctl_log_to_stderr();
    const char *log_spec = getenv("SPEED_LOG");
    if (log_spec && speed_log_configure(log_spec) != SPEED_OK)
        fprintf(stderr, "speedctl: warning: ignoring SPEED_LOG='%s' (expected e.g. 'info' or 'warn,tok=debug')\n",
                log_spec);

    if (argc < 2) {
        usage(stderr);
        return SPEEDCTL_EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return SPEEDCTL_EXIT_OK;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("speedctl %s\n", SPEED_VERSION);
        return SPEEDCTL_EXIT_OK;
    }
    for (size_t i = 0; i < N_VERBS; i++)
        if (strcmp(argv[1], verbs[i].name) == 0) return verbs[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "speedctl: error: unknown verb '%s'\n", argv[1]);
    usage(stderr);
    return SPEEDCTL_EXIT_USAGE;
}
