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
    {"make-tiny-model", speedctl_make_tiny_model, "write a random-weight Llama model in the Hugging Face layout"},
    {"inspect", speedctl_inspect, "validate a model directory and print its shape, size and KV cost"},
    {"tokenize", speedctl_tokenize, "encode text to token ids, decode ids, render chat templates"},
    {"generate", speedctl_generate, "generate text from a prompt (SPEED depth, sampling, logprobs, timing, KV bytes)"},
    {"eval", speedctl_eval, "quality of SPEED cutoffs against full depth on a model and text (KL, top-1, perplexity)"},
    {"bench", speedctl_bench, "prefill/decode speed, KV bytes and memory against this machine's roofline"},
    {"up", speedctl_up, "start a local cluster (decode, prefill, router) from a cluster file; stop it with Ctrl-C"},
    {"profile", speedctl_profile, "measure prefill, decode and KV transfer costs of this backend for `plan`"},
    {"plan", speedctl_plan, "SPEED-aware capacity planner: prefill/decode counts, C, limits and a cluster file"},
    {"certs", speedctl_certs, "write the control plane's CA and per-process certificates for a cluster file"},
    {"loadgen", speedctl_loadgen, "load an OpenAI-compatible endpoint: TTFT, TPOT, ITL, e2e, throughput, goodput"},
    {"top", speedctl_top, "a live terminal view of a running cluster from its metrics endpoints (q quits)"},
    {"k8s", speedctl_k8s, "write Kubernetes manifests (a Kustomize base) for a cluster file"},
};
#define N_VERBS (sizeof verbs / sizeof verbs[0])

/* CLI log format: errors and warnings as "speedctl: error: ...", the rest as is. */
static void cli_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                     const char *line) {
    (void)user;
    (void)subsys;
    (void)request_id;
    const char *tag = level == SPEED_LOG_ERROR ? "error: " : level == SPEED_LOG_WARN ? "warning: " : "";
    fprintf(stderr, "speedctl: %s%s\n", tag, line);
}

void speedctl_silent_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                          const char *line) {
    (void)user;
    (void)level;
    (void)subsys;
    (void)request_id;
    (void)line;
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

speed_status_t speedctl_ids_parse(const char *what, const char *list, int32_t vocab, speed_tok_ids_t *out) {
    const char *p = list;
    while (*p == ' ') p++;
    if (!*p) {
        SPEED_ERROR(SPEED_SUBSYS_CLI, "%s: no token ids given", what);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= vocab) {
            SPEED_ERROR(SPEED_SUBSYS_CLI, "%s: '%.*s' is not a token id in 0..%d", what, (int)strcspn(p, ","), p,
                        vocab - 1);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (out->n == out->cap) {
            size_t cap = out->cap ? out->cap * 2 : 64;
            int32_t *grown = speed_realloc(out->ids, cap * sizeof *grown);
            if (!grown) return SPEED_ERR_NO_MEMORY;
            out->ids = grown;
            out->cap = cap;
        }
        out->ids[out->n++] = (int32_t)v;
        p = end;
        while (*p == ' ') p++;
        if (*p == ',')
            p++;
        else if (*p) {
            SPEED_ERROR(SPEED_SUBSYS_CLI, "%s: expected ',' at '%s'", what, p);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        while (*p == ' ') p++;
    }
    return SPEED_OK;
}

void speedctl_bytes_human(double b, int decimals, char *out, size_t size) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024 && u < 4) {
        b /= 1024;
        u++;
    }
    snprintf(out, size, "%.*f %s", u ? decimals : 0, b, units[u]);
}

char *speedctl_unescape(const char *s) {
    char *out = speed_malloc(strlen(s) + 1), *o = out;
    if (!out) return NULL;
    for (; *s; s++) {
        if (*s != '\\' || !s[1]) {
            *o++ = *s;
            continue;
        }
        switch (*++s) {
        case 'n': *o++ = '\n'; break;
        case 't': *o++ = '\t'; break;
        case 'r': *o++ = '\r'; break;
        case '\\': *o++ = '\\'; break;
        default:
            *o++ = '\\';
            *o++ = *s;
            break;
        }
    }
    *o = '\0';
    return out;
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
