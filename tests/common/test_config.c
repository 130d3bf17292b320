/* common/config: sources and precedence, validation from every source, YAML errors,
 * --print-config round trip, command-line forms, table errors, allocation faults. */
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "config.h"
#include "dtype.h"
#include "log.h"
#include "test_fs.h"

#define PREFIX "SPEEDTEST_"

typedef struct {
    int64_t threads;
    double ratio;
    bool verbose;
    char *name;
    int dtype;
    int64_t max_batch;
    int64_t kv_block_tokens;
    bool kv_offload;
    double kv_x_deep;
    char *model;
} test_cfg_t;


static const speed_config_field_t fields[] = {
    {"threads", SPEED_CONFIG_INT, offsetof(test_cfg_t, threads), "4", 1, 256, NULL, "worker threads"},
    {"ratio", SPEED_CONFIG_DOUBLE, offsetof(test_cfg_t, ratio), "0.5", 0, 1, NULL, "prefill share"},
    {"verbose", SPEED_CONFIG_BOOL, offsetof(test_cfg_t, verbose), "false", SPEED_CONFIG_UNBOUNDED, NULL, "chatty logs"},
    {"name", SPEED_CONFIG_STRING, offsetof(test_cfg_t, name), "dev", SPEED_CONFIG_UNBOUNDED, NULL, "cluster name"},
    {"dtype", SPEED_CONFIG_ENUM, offsetof(test_cfg_t, dtype), "bf16", SPEED_CONFIG_UNBOUNDED, speed_dtype_names,
     "weight type"},
    {"kv.block_tokens", SPEED_CONFIG_INT, offsetof(test_cfg_t, kv_block_tokens), "16", 1, 1024, NULL,
     "tokens per KV block"},
    {"max-batch", SPEED_CONFIG_INT, offsetof(test_cfg_t, max_batch), "8", SPEED_CONFIG_UNBOUNDED, NULL,
     "largest batch"},
    {"kv.x.deep", SPEED_CONFIG_DOUBLE, offsetof(test_cfg_t, kv_x_deep), "1.5", SPEED_CONFIG_UNBOUNDED, NULL,
     "three levels down"},
    {"kv.offload", SPEED_CONFIG_BOOL, offsetof(test_cfg_t, kv_offload), "no", SPEED_CONFIG_UNBOUNDED, NULL,
     "offload KV to host"},
    {"model", SPEED_CONFIG_STRING, offsetof(test_cfg_t, model), NULL, SPEED_CONFIG_UNBOUNDED, NULL, "model directory"},
};
#define N_FIELDS (sizeof fields / sizeof fields[0])

static const char *const env_vars[] = {
    PREFIX "THREADS",    PREFIX "RATIO",           PREFIX "VERBOSE",   PREFIX "NAME",
    PREFIX "DTYPE",      PREFIX "KV_BLOCK_TOKENS", PREFIX "MAX_BATCH", PREFIX "KV_X_DEEP",
    PREFIX "KV_OFFLOAD", PREFIX "MODEL",           PREFIX "CONFIG",
};

static void clear_env(void) {
    for (size_t i = 0; i < sizeof env_vars / sizeof env_vars[0]; i++) unsetenv(env_vars[i]);
}

/* Log sink: count error lines and keep the last one. */
static int n_errors;
static char last_error[1024];
static void sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                 const char *line) {
    if (level != SPEED_LOG_ERROR) return;
    n_errors++;
    snprintf(last_error, sizeof last_error, "%s", line);
    fprintf(stderr, "  [logged] %s\n", line);
}

static char tmpdir[512];

static const char *write_file(const char *name, const char *text) {
    static char path[1024];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
    return path;
}

/* load(&c, &cfg, args..., NULL): argv[0] is "prog". */
static speed_status_t load(test_cfg_t *c, speed_config_t **cfg_p, ...) {
    static char *argv[64];
    int argc = 0;
    argv[argc++] = "prog";
    va_list ap;
    va_start(ap, cfg_p);
    for (char *a; (a = va_arg(ap, char *)) != NULL;) argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    n_errors = 0;
    last_error[0] = '\0';
    speed_status_t st = speed_config_load(fields, N_FIELDS, c, argc, argv, PREFIX, cfg_p);
    CHECK_MSG(st == SPEED_OK ? n_errors == 0 : (st == SPEED_ERR_NO_MEMORY || n_errors == 1),
              "status %d logged %d error lines", st, n_errors);
    return st;
}

static const char *origin(const speed_config_t *cfg, const char *name) {
    const char *o = NULL;
    CHECK_INT_EQ(speed_config_origin(cfg, name, NULL, &o), SPEED_OK);
    return o ? o : "(null)";
}

static void test_defaults(void) {
    int64_t live = speed_alloc_live_count();
    test_cfg_t c;
    memset(&c, 0xab, sizeof c);
    speed_config_t *cfg = NULL;
    CHECK_INT_EQ(load(&c, &cfg, NULL), SPEED_OK);
    CHECK_INT_EQ(c.threads, 4);
    CHECK_NEAR(c.ratio, 0.5, 0);
    CHECK(!c.verbose);
    CHECK_STR_EQ(c.name, "dev");
    CHECK_INT_EQ(c.dtype, 1);
    CHECK_INT_EQ(c.kv_block_tokens, 16);
    CHECK_INT_EQ(c.max_batch, 8);
    CHECK_NEAR(c.kv_x_deep, 1.5, 0);
    CHECK(!c.kv_offload);
    CHECK(c.model == NULL);
    CHECK_STR_EQ(origin(cfg, "threads"), "default");
    CHECK_STR_EQ(origin(cfg, "model"), "default");
    speed_config_source_t src = SPEED_CONFIG_SOURCE_CLI;
    CHECK_INT_EQ(speed_config_origin(cfg, "kv.block_tokens", &src, NULL), SPEED_OK);
    CHECK_INT_EQ(src, SPEED_CONFIG_SOURCE_DEFAULT);
    CHECK_INT_EQ(speed_config_origin(cfg, "nope", NULL, NULL), SPEED_ERR_NOT_FOUND);
    CHECK(speed_config_file(cfg) == NULL);
    CHECK(!speed_config_help_requested(cfg));
    CHECK(!speed_config_print_requested(cfg));
    char *const *pos = NULL;
    CHECK_INT_EQ(speed_config_positional(cfg, &pos), 0);
    CHECK(pos && pos[0] == NULL);
    speed_config_destroy(cfg);
    speed_config_destroy(NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), live);

    /* argc 0, NULL argv, no environment */
    CHECK_INT_EQ(speed_config_load(fields, N_FIELDS, &c, 0, NULL, NULL, &cfg), SPEED_OK);
    CHECK_INT_EQ(c.threads, 4);
    speed_config_destroy(cfg);
    /* an empty table */
    CHECK_INT_EQ(speed_config_load(NULL, 0, &c, 0, NULL, PREFIX, &cfg), SPEED_OK);
    speed_config_destroy(cfg);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

static void test_precedence(void) {
    int64_t live = speed_alloc_live_count();
    const char *path = write_file("cfg_prec.yaml", "# a comment\n"
                                                   "threads: 8\n"
                                                   "ratio: 0.25\n"
                                                   "name: from-file\n"
                                                   "kv:\n"
                                                   "  block_tokens: 32\n"
                                                   "  x:\n"
                                                   "    deep: -2.5\n"
                                                   "max-batch: 64\n");
    char ppath[1024];
    snprintf(ppath, sizeof ppath, "%s", path);
    char line_origin[1100];
    test_cfg_t c;
    speed_config_t *cfg = NULL;

    /* file over defaults */
    CHECK_INT_EQ(load(&c, &cfg, "--config", ppath, NULL), SPEED_OK);
    CHECK_INT_EQ(c.threads, 8);
    CHECK_NEAR(c.ratio, 0.25, 0);
    CHECK_STR_EQ(c.name, "from-file");
    CHECK_INT_EQ(c.kv_block_tokens, 32);
    CHECK_NEAR(c.kv_x_deep, -2.5, 0);
    CHECK_INT_EQ(c.max_batch, 64);
    CHECK_INT_EQ(c.dtype, 1);
    snprintf(line_origin, sizeof line_origin, "file:%s:2", ppath);
    CHECK_STR_EQ(origin(cfg, "threads"), line_origin);
    snprintf(line_origin, sizeof line_origin, "file:%s:8", ppath);
    CHECK_STR_EQ(origin(cfg, "kv.x.deep"), line_origin);
    CHECK_STR_EQ(origin(cfg, "dtype"), "default");
    CHECK_STR_EQ(speed_config_file(cfg), ppath);
    speed_config_destroy(cfg);

    /* env over file */
    setenv(PREFIX "THREADS", "12", 1);
    setenv(PREFIX "KV_BLOCK_TOKENS", "64", 1);
    setenv(PREFIX "NAME", "from-env", 1);
    setenv(PREFIX "MAX_BATCH", "128", 1);
    setenv(PREFIX "KV_X_DEEP", "3", 1);
    CHECK_INT_EQ(load(&c, &cfg, "--config", ppath, NULL), SPEED_OK);
    CHECK_INT_EQ(c.threads, 12);
    CHECK_INT_EQ(c.kv_block_tokens, 64);
    CHECK_STR_EQ(c.name, "from-env");
    CHECK_INT_EQ(c.max_batch, 128);
    CHECK_NEAR(c.kv_x_deep, 3, 0);
    CHECK_NEAR(c.ratio, 0.25, 0);
    CHECK_STR_EQ(origin(cfg, "threads"), "env:" PREFIX "THREADS");
    CHECK_STR_EQ(origin(cfg, "kv.block_tokens"), "env:" PREFIX "KV_BLOCK_TOKENS");
    CHECK_STR_EQ(origin(cfg, "max-batch"), "env:" PREFIX "MAX_BATCH");
    speed_config_destroy(cfg);

    /* cli over env; all option forms; config file named by the environment */
    setenv(PREFIX "CONFIG", ppath, 1);
    CHECK_INT_EQ(load(&c, &cfg, "--threads", "16", "--kv.block-tokens=128", "--name", "from-cli", "--max_batch=3",
                      "--kv.x.deep", "-7.25", NULL),
                 SPEED_OK);
    CHECK_INT_EQ(c.threads, 16);
    CHECK_INT_EQ(c.kv_block_tokens, 128);
    CHECK_STR_EQ(c.name, "from-cli");
    CHECK_INT_EQ(c.max_batch, 3);
    CHECK_NEAR(c.kv_x_deep, -7.25, 0);
    CHECK_NEAR(c.ratio, 0.25, 0); /* still from the file named by SPEEDTEST_CONFIG */
    CHECK_STR_EQ(origin(cfg, "threads"), "cli");
    CHECK_STR_EQ(origin(cfg, "kv.x.deep"), "cli");
    speed_config_destroy(cfg);

    /* the last of repeated options wins */
    CHECK_INT_EQ(load(&c, &cfg, "--threads", "2", "--threads=3", NULL), SPEED_OK);
    CHECK_INT_EQ(c.threads, 3);
    speed_config_destroy(cfg);
    clear_env();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

/* Compare two loaded structs field by field. */
static void check_same(const test_cfg_t *a, const test_cfg_t *b) {
    CHECK_INT_EQ(a->threads, b->threads);
    CHECK_MSG(a->ratio == b->ratio, "%.17g vs %.17g", a->ratio, b->ratio);
    CHECK_INT_EQ(a->verbose, b->verbose);
    CHECK_STR_EQ(a->name, b->name);
    CHECK_INT_EQ(a->dtype, b->dtype);
    CHECK_INT_EQ(a->max_batch, b->max_batch);
    CHECK_INT_EQ(a->kv_block_tokens, b->kv_block_tokens);
    CHECK_INT_EQ(a->kv_offload, b->kv_offload);
    CHECK_MSG(a->kv_x_deep == b->kv_x_deep, "%.17g vs %.17g", a->kv_x_deep, b->kv_x_deep);
    CHECK((a->model == NULL) == (b->model == NULL));
    if (a->model && b->model) CHECK_STR_EQ(a->model, b->model);
}

static void roundtrip(const char *label, test_cfg_t *c1, speed_config_t *cfg1) {
    char path[1024];
    snprintf(path, sizeof path, "%s/cfg_print_%s.yaml", tmpdir, label);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    CHECK_INT_EQ(speed_config_print(cfg1, f), SPEED_OK);
    fclose(f);
    char *text = tu_read(path, NULL);
    fprintf(stderr, "--- %s ---\n%s", label, text ? text : "");
    free(text);
    test_cfg_t c2;
    speed_config_t *cfg2 = NULL;
    CHECK_INT_EQ(load(&c2, &cfg2, "--config", path, NULL), SPEED_OK);
    if (cfg2) {
        check_same(c1, &c2);
        speed_config_destroy(cfg2);
    }
}

static void test_print_roundtrip(void) {
    int64_t live = speed_alloc_live_count();
    test_cfg_t c;
    speed_config_t *cfg = NULL;

    CHECK_INT_EQ(load(&c, &cfg, NULL), SPEED_OK);
    roundtrip("defaults", &c, cfg);
    speed_config_destroy(cfg);

    const char *path = write_file("cfg_rt.yaml", "ratio: 0.1\nkv: {offload: on}\n");
    char ppath[1024];
    snprintf(ppath, sizeof ppath, "%s", path);
    setenv(PREFIX "DTYPE", "F16", 1);
    CHECK_INT_EQ(load(&c, &cfg, "--config", ppath, "--name", "we\"ird\\ \t'name'\n# not a comment: x", "--model",
                      "  /m/llama: 3  ", "--verbose", "--kv.x.deep=1e-300", "--threads=-0", "--max-batch",
                      "-9223372036854775808", "--print-config", NULL),
                 SPEED_ERR_INVALID_ARGUMENT); /* threads -0 = 0 is below the minimum */
    CHECK_CONTAINS(last_error, "threads: 0 is below the minimum 1 (from cli)");
    CHECK_INT_EQ(load(&c, &cfg, "--config", ppath, "--name", "we\"ird\\ \t'name'\n# not a comment: x", "--model",
                      "  /m/llama: 3  ", "--verbose", "--kv.x.deep=1e-300", "--max-batch", "-9223372036854775808",
                      "--print-config", NULL),
                 SPEED_OK);
    CHECK(speed_config_print_requested(cfg));
    CHECK_INT_EQ(c.dtype, 2);
    CHECK_STR_EQ(c.model, "  /m/llama: 3  ");
    CHECK(c.kv_offload);
    roundtrip("mixed", &c, cfg);

    /* the printed text names each origin */
    FILE *f = tmpfile();
    CHECK(f != NULL);
    if (f) {
        speed_config_print(cfg, f);
        rewind(f);
        char text[4096];
        size_t n = fread(text, 1, sizeof text - 1, f);
        text[n] = '\0';
        fclose(f);
        CHECK_CONTAINS(text, "# env:" PREFIX "DTYPE");
        CHECK_CONTAINS(text, "# cli");
        CHECK_CONTAINS(text, "# default");
        CHECK_CONTAINS(text, "ratio: 0.1 ");
        CHECK_CONTAINS(text, "kv:\n  block_tokens: 16");
        CHECK_CONTAINS(text, "\n    deep: 1e-300");
        CHECK_CONTAINS(text, "# file:");
    }
    speed_config_destroy(cfg);

    /* YAML's other line breaks (U+0085, U+2028, U+2029) in a value: printed raw they loaded
     * back as spaces (found by tests/fuzz/fuzz_cluster_yaml) */
    CHECK_INT_EQ(load(&c, &cfg, "--name", "a\xc2\x85" "b\xe2\x80\xa8" "c\xe2\x80\xa9" "d\xc2\xa9", "--model", "m",
                      NULL),
                 SPEED_OK);
    roundtrip("yaml-breaks", &c, cfg);
    speed_config_destroy(cfg);
    clear_env();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

static void test_yaml_errors(void) {
    int64_t live = speed_alloc_live_count();
    test_cfg_t c, before;
    speed_config_t *cfg = (speed_config_t *)&c; /* must be reset to NULL on failure */
    memset(&c, 0x5a, sizeof c);
    before = c;
    struct {
        const char *text;
        speed_status_t st;
        const char *msg;
    } cases[] = {
        {"threads: 4\nthreadz: 5\n", SPEED_ERR_INVALID_ARGUMENT, ":2: unknown key 'threadz' (did you mean 'threads'?)"},
        {"kv:\n  block_tokens: 4\n  blok_tokens: 5\n", SPEED_ERR_INVALID_ARGUMENT,
         ":3: unknown key 'kv.blok_tokens' (did you mean 'kv.block_tokens'?)"},
        {"kv:\n  x:\n    deeper: 1\n", SPEED_ERR_INVALID_ARGUMENT,
         ":3: unknown key 'kv.x.deeper' (did you mean 'kv.x.deep'?)"},
        {"kv.block_tokens: 3\n", SPEED_ERR_INVALID_ARGUMENT,
         "unknown key 'kv.block_tokens' (a dotted name is a nested mapping in YAML"},
        {"zzz: 1\n", SPEED_ERR_INVALID_ARGUMENT, ":1: unknown key 'zzz'"},
        {"threads: [1, 2]\n", SPEED_ERR_INVALID_ARGUMENT, ":1: threads: expected a single value, got a list"},
        {"threads: {a: 1}\n", SPEED_ERR_INVALID_ARGUMENT, "threads: expected a single value, got a mapping"},
        {"kv: 5\n", SPEED_ERR_INVALID_ARGUMENT, "kv: expected a mapping of keys, got a single value"},
        {"- threads\n", SPEED_ERR_INVALID_ARGUMENT, "the document must be a mapping of keys"},
        {"threads: abc\n", SPEED_ERR_INVALID_ARGUMENT, "threads: 'abc' is not an integer (from file:"},
        {"threads:\n", SPEED_ERR_INVALID_ARGUMENT, "threads: '' is not an integer"},
        {"threads: 4.0\n", SPEED_ERR_INVALID_ARGUMENT, "threads: '4.0' is not an integer"},
        {"threads: 0\n", SPEED_ERR_INVALID_ARGUMENT, "threads: 0 is below the minimum 1 (from file:"},
        {"ratio: 1.5\n", SPEED_ERR_INVALID_ARGUMENT, "ratio: 1.5 is above the maximum 1 (from file:"},
        {"ratio: .nan\n", SPEED_ERR_INVALID_ARGUMENT, "ratio: '.nan' is not a finite number"},
        {"dtype: f8\n", SPEED_ERR_INVALID_ARGUMENT, "dtype: 'f8' is not one of f32, bf16, f16"},
        {"verbose: maybe\n", SPEED_ERR_INVALID_ARGUMENT, "verbose: 'maybe' is not a boolean"},
        {"threads: 1\nthreads: 2\n", SPEED_ERR_INVALID_ARGUMENT, "key 'threads' appears twice"},
        {"threads: [\n", SPEED_ERR_PARSE, "malformed YAML"},
        {"threads: \"abc\n", SPEED_ERR_PARSE, "malformed YAML"},
        {"threads: 4\n  name: x\n", SPEED_ERR_PARSE, ":2:7: malformed YAML"},
        {"\tthreads: 4\n", SPEED_ERR_PARSE, ":1:1: malformed YAML"},
        {"threads: 4\n---\nthreads: 5\n", SPEED_ERR_PARSE, ":2: more than one YAML document"},
        {"name: *nope\n", SPEED_ERR_PARSE, "name: no anchor found for alias"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char fname[64];
        snprintf(fname, sizeof fname, "cfg_err_%zu.yaml", i);
        const char *path = write_file(fname, cases[i].text);
        char ppath[1024];
        snprintf(ppath, sizeof ppath, "%s", path);
        cfg = (speed_config_t *)&c;
        speed_status_t st = load(&c, &cfg, "--config", ppath, NULL);
        CHECK_MSG(st == cases[i].st, "case %zu: status %d, want %d", i, st, cases[i].st);
        CHECK_MSG(strstr(last_error, cases[i].msg) != NULL, "case %zu: '%s' lacks '%s'", i, last_error, cases[i].msg);
        CHECK_MSG(strstr(last_error, ppath) != NULL, "case %zu: '%s' lacks the path", i, last_error);
        CHECK(cfg == NULL);
        CHECK(memcmp(&c, &before, sizeof c) == 0);
        CHECK_INT_EQ(speed_alloc_live_count(), live);
        if (st == SPEED_OK) speed_config_destroy(cfg);
    }

    /* a file holding only comments, and an empty file, are fine */
    const char *empty = write_file("cfg_empty.yaml", "");
    char epath[1024];
    snprintf(epath, sizeof epath, "%s", empty);
    CHECK_INT_EQ(load(&c, &cfg, "--config", epath, NULL), SPEED_OK);
    CHECK_INT_EQ(c.threads, 4);
    speed_config_destroy(cfg);
    write_file("cfg_comment.yaml", "# nothing here\n");
    snprintf(epath, sizeof epath, "%s/cfg_comment.yaml", tmpdir);
    CHECK_INT_EQ(load(&c, &cfg, "--config", epath, NULL), SPEED_OK);
    speed_config_destroy(cfg);

    /* quoted scalars, aliases, YAML booleans, flow style */
    write_file("cfg_forms.yaml", "threads: \"7\"\nname: &n 'a b'\nmodel: *n\nverbose: yes\n"
                                 "kv: {offload: True, x: {deep: 2}}\ndtype: F32\n");
    snprintf(epath, sizeof epath, "%s/cfg_forms.yaml", tmpdir);
    CHECK_INT_EQ(load(&c, &cfg, "--config", epath, NULL), SPEED_OK);
    CHECK_INT_EQ(c.threads, 7);
    CHECK_STR_EQ(c.name, "a b");
    CHECK_STR_EQ(c.model, "a b");
    CHECK(c.verbose);
    CHECK(c.kv_offload);
    CHECK_NEAR(c.kv_x_deep, 2, 0);
    CHECK_INT_EQ(c.dtype, 0);
    speed_config_destroy(cfg);

    /* missing file, a directory */
    snprintf(epath, sizeof epath, "%s/cfg_does_not_exist.yaml", tmpdir);
    CHECK_INT_EQ(load(&c, &cfg, "--config", epath, NULL), SPEED_ERR_NOT_FOUND);
    CHECK_CONTAINS(last_error, "cfg_does_not_exist.yaml: No such file or directory");
    CHECK_INT_EQ(load(&c, &cfg, "--config", tmpdir, NULL), SPEED_ERR_IO);
    CHECK(cfg == NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

static void test_cli_errors(void) {
    int64_t live = speed_alloc_live_count();
    test_cfg_t c;
    speed_config_t *cfg = NULL;
    CHECK_INT_EQ(load(&c, &cfg, "--thread", "3", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "unknown option --thread (did you mean --threads?)");
    CHECK_INT_EQ(load(&c, &cfg, "--kv.block-token=3", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "unknown option --kv.block-token (did you mean --kv.block_tokens?)");
    CHECK_INT_EQ(load(&c, &cfg, "--frobnicate", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "unknown option --frobnicate (see --help)");
    CHECK_INT_EQ(load(&c, &cfg, "-t", "3", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(last_error, "unknown option -t");
    CHECK_INT_EQ(load(&c, &cfg, "--threads", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "option --threads needs a value");
    CHECK_INT_EQ(load(&c, &cfg, "--config", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "option --config needs a value");
    CHECK_INT_EQ(load(&c, &cfg, "--threads", "x12", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "threads: 'x12' is not an integer (from cli)");
    CHECK_INT_EQ(load(&c, &cfg, "--threads", "99999999999999999999", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(load(&c, &cfg, "--threads=257", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "threads: 257 is above the maximum 256 (from cli)");
    CHECK_INT_EQ(load(&c, &cfg, "--ratio", "-0.5", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "ratio: -0.5 is below the minimum 0 (from cli)");
    CHECK_INT_EQ(load(&c, &cfg, "--ratio", "inf", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(load(&c, &cfg, "--dtype", "f8", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "dtype: 'f8' is not one of f32, bf16, f16 (from cli)");
    CHECK_INT_EQ(load(&c, &cfg, "--verbose=2", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(load(&c, &cfg, "--no-verbose=true", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "option --no-verbose takes no value");
    CHECK_INT_EQ(load(&c, &cfg, "--no-threads", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(last_error, "unknown option --no-threads");
    CHECK_INT_EQ(load(&c, &cfg, "--help=1", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(cfg == NULL);

    /* out of bounds from the environment; a bad env value is an error even if the
     * command line would override it */
    setenv(PREFIX "KV_BLOCK_TOKENS", "0", 1);
    CHECK_INT_EQ(load(&c, &cfg, "--kv.block_tokens", "8", NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "kv.block_tokens: 0 is below the minimum 1 (from env:" PREFIX "KV_BLOCK_TOKENS)");
    clear_env();
    setenv(PREFIX "DTYPE", "int4", 1);
    CHECK_INT_EQ(load(&c, &cfg, NULL), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_STR_EQ(last_error, "dtype: 'int4' is not one of f32, bf16, f16 (from env:" PREFIX "DTYPE)");
    clear_env();
    /* unrelated variables with the prefix are ignored */
    setenv(PREFIX "NOT_A_FIELD", "1", 1);
    CHECK_INT_EQ(load(&c, &cfg, NULL), SPEED_OK);
    speed_config_destroy(cfg);
    unsetenv(PREFIX "NOT_A_FIELD");
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

static void test_bools(void) {
    int64_t live = speed_alloc_live_count();
    test_cfg_t c;
    speed_config_t *cfg = NULL;
    static const char *const t[] = {"true", "yes", "1", "on", "TRUE", "Yes"};
    static const char *const f[] = {"false", "no", "0", "off", "False", "NO"};
    for (size_t i = 0; i < 6; i++) {
        char opt[64];
        snprintf(opt, sizeof opt, "--verbose=%s", t[i]);
        CHECK_INT_EQ(load(&c, &cfg, opt, NULL), SPEED_OK);
        CHECK_MSG(c.verbose, "%s", opt);
        speed_config_destroy(cfg);
        setenv(PREFIX "VERBOSE", t[i], 1);
        snprintf(opt, sizeof opt, "--kv.offload=%s", t[i]);
        CHECK_INT_EQ(load(&c, &cfg, opt, NULL), SPEED_OK);
        CHECK_MSG(c.verbose && c.kv_offload, "env %s", t[i]);
        speed_config_destroy(cfg);
        setenv(PREFIX "VERBOSE", f[i], 1);
        snprintf(opt, sizeof opt, "--kv.offload=%s", f[i]);
        CHECK_INT_EQ(load(&c, &cfg, opt, NULL), SPEED_OK);
        CHECK_MSG(!c.verbose && !c.kv_offload, "env %s", f[i]);
        speed_config_destroy(cfg);
        unsetenv(PREFIX "VERBOSE");
    }
    /* flag forms; a bare flag does not eat the next argument */
    CHECK_INT_EQ(load(&c, &cfg, "--verbose", "pos", "--kv.offload", NULL), SPEED_OK);
    CHECK(c.verbose && c.kv_offload);
    char *const *pos;
    CHECK_INT_EQ(speed_config_positional(cfg, &pos), 1);
    CHECK_STR_EQ(pos[0], "pos");
    speed_config_destroy(cfg);
    setenv(PREFIX "VERBOSE", "yes", 1);
    CHECK_INT_EQ(load(&c, &cfg, "--no-verbose", "--no_kv.offload", NULL), SPEED_OK);
    CHECK(!c.verbose && !c.kv_offload);
    CHECK_STR_EQ(origin(cfg, "verbose"), "cli");
    speed_config_destroy(cfg);
    clear_env();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

static void test_positional_and_flags(void) {
    int64_t live = speed_alloc_live_count();
    test_cfg_t c;
    speed_config_t *cfg = NULL;
    CHECK_INT_EQ(load(&c, &cfg, "DIR", "--ratio", "0.75", "-", "second", "--", "--threads", "-x", NULL), SPEED_OK);
    char *const *pos;
    CHECK_INT_EQ(speed_config_positional(cfg, &pos), 5);
    CHECK_STR_EQ(pos[0], "DIR");
    CHECK_STR_EQ(pos[1], "-");
    CHECK_STR_EQ(pos[2], "second");
    CHECK_STR_EQ(pos[3], "--threads");
    CHECK_STR_EQ(pos[4], "-x");
    CHECK(pos[5] == NULL);
    CHECK_NEAR(c.ratio, 0.75, 0);
    CHECK_INT_EQ(c.threads, 4);
    speed_config_destroy(cfg);

    CHECK_INT_EQ(load(&c, &cfg, "--help", NULL), SPEED_OK);
    CHECK(speed_config_help_requested(cfg));
    speed_config_destroy(cfg);
    CHECK_INT_EQ(load(&c, &cfg, "-h", "--print_config", NULL), SPEED_OK);
    CHECK(speed_config_help_requested(cfg));
    CHECK(speed_config_print_requested(cfg));
    speed_config_destroy(cfg);

    FILE *f = tmpfile();
    CHECK(f != NULL);
    if (f) {
        CHECK_INT_EQ(speed_config_print_help(fields, N_FIELDS, PREFIX, f), SPEED_OK);
        rewind(f);
        char text[8192];
        size_t n = fread(text, 1, sizeof text - 1, f);
        text[n] = '\0';
        fclose(f);
        fprintf(stderr, "%s", text);
        CHECK_CONTAINS(text, "--threads INT");
        CHECK_CONTAINS(text, "worker threads (default 4; 1..256; env " PREFIX "THREADS)");
        CHECK_CONTAINS(text, "--verbose, --no-verbose");
        CHECK_CONTAINS(text, "--dtype f32|bf16|f16");
        CHECK_CONTAINS(text, "env " PREFIX "KV_X_DEEP");
        CHECK_CONTAINS(text, "--config FILE");
        CHECK_CONTAINS(text, "--print-config");
    }
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

static void test_table_errors(void) {
    int64_t live = speed_alloc_live_count();
    test_cfg_t c;
    speed_config_t *cfg = NULL;
    struct {
        speed_config_field_t f[2];
        const char *msg;
    } cases[] = {
        {{{"threads", SPEED_CONFIG_INT, 0, "1", 1, 0, NULL, ""}, {"threads", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "defined twice"},
        {{{"a_b", SPEED_CONFIG_INT, 0, "1", 1, 0, NULL, ""}, {"a-b", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "defined twice"},
        {{{"config", SPEED_CONFIG_STRING, 0, NULL, 1, 0, NULL, ""}, {"x", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "reserved"},
        {{{"kv", SPEED_CONFIG_INT, 0, "1", 1, 0, NULL, ""}, {"kv.x", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "field 'kv.x' clashes with field 'kv'"},
        {{{"kv.x", SPEED_CONFIG_INT, 0, "1", 1, 0, NULL, ""}, {"kv", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "field 'kv' clashes with field 'kv.x'"},
        {{{"kv..x", SPEED_CONFIG_INT, 0, "1", 1, 0, NULL, ""}, {"y", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "empty component"},
        {{{"a b", SPEED_CONFIG_INT, 0, "1", 1, 0, NULL, ""}, {"y", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "character"},
        {{{"e", SPEED_CONFIG_ENUM, 0, "a", 1, 0, NULL, ""}, {"y", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "has no names"},
        {{{"n", SPEED_CONFIG_INT, 0, NULL, 1, 0, NULL, ""}, {"y", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "needs a default"},
        {{{"n", SPEED_CONFIG_INT, 0, "0", 1, 10, NULL, ""}, {"y", SPEED_CONFIG_INT, 8, "1", 1, 0, NULL, ""}},
         "n: 0 is below the minimum 1 (from default)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *argv[] = {"prog", NULL};
        last_error[0] = '\0';
        CHECK_INT_EQ(speed_config_load(cases[i].f, 2, &c, 1, argv, NULL, &cfg), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_MSG(strstr(last_error, cases[i].msg) != NULL, "table case %zu: '%s' lacks '%s'", i, last_error,
                  cases[i].msg);
        CHECK(cfg == NULL);
    }
    char *argv[] = {"prog", NULL};
    CHECK_INT_EQ(speed_config_load(fields, N_FIELDS, NULL, 1, argv, NULL, &cfg), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

static void test_parsers(void) {
    int64_t i = 0;
    double d = 0;
    bool b = false;
    int e = -1;
    CHECK_INT_EQ(speed_config_parse_int("-42", &i), SPEED_OK);
    CHECK_INT_EQ(i, -42);
    CHECK_INT_EQ(speed_config_parse_int("+7", &i), SPEED_OK);
    CHECK_INT_EQ(i, 7);
    CHECK_INT_EQ(speed_config_parse_int("9223372036854775807", &i), SPEED_OK);
    CHECK_INT_EQ(i, INT64_MAX);
    CHECK_INT_EQ(speed_config_parse_int("9223372036854775808", &i), SPEED_ERR_PARSE);
    CHECK_INT_EQ(i, INT64_MAX);
    CHECK_INT_EQ(speed_config_parse_int("", &i), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_int(" 1", &i), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_int("1 ", &i), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_int("0x10", &i), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_int("010", &i), SPEED_OK);
    CHECK_INT_EQ(i, 10);
    CHECK_INT_EQ(speed_config_parse_double("2.5e-3", &d), SPEED_OK);
    CHECK_NEAR(d, 2.5e-3, 0);
    CHECK_INT_EQ(speed_config_parse_double("7", &d), SPEED_OK);
    CHECK_NEAR(d, 7, 0);
    CHECK_INT_EQ(speed_config_parse_double("nan", &d), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_double("-inf", &d), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_double("1e999", &d), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_double("1.5x", &d), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_double("", &d), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_bool("On", &b), SPEED_OK);
    CHECK(b);
    CHECK_INT_EQ(speed_config_parse_bool("0", &b), SPEED_OK);
    CHECK(!b);
    CHECK_INT_EQ(speed_config_parse_bool("y", &b), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_bool("", &b), SPEED_ERR_PARSE);
    CHECK_INT_EQ(speed_config_parse_enum("BF16", speed_dtype_names, &e), SPEED_OK);
    CHECK_INT_EQ(e, 1);
    CHECK_INT_EQ(speed_config_parse_enum("bf", speed_dtype_names, &e), SPEED_ERR_PARSE);
    CHECK_INT_EQ(e, 1);
}

/* Fail each allocation in turn until the load succeeds; every failure must be
 * SPEED_ERR_NO_MEMORY and leak nothing (cyaml's own allocations are counted too). */
static void test_alloc_faults(void) {
    write_file("cfg_fault.yaml", "threads: 8\nname: filename\nkv:\n  block_tokens: 32\n"
                                 "  x: {deep: 0.5}\nmodel: m\n");
    char path[1024];
    snprintf(path, sizeof path, "%s/cfg_fault.yaml", tmpdir);
    setenv(PREFIX "RATIO", "0.125", 1);
    setenv(PREFIX "NAME", "envname", 1);
    int64_t live = speed_alloc_live_count();
    int64_t n = 0;
    int failures = 0;
    for (;; n++) {
        test_cfg_t c;
        speed_config_t *cfg = NULL;
        speed_alloc_fail_after(n, 0);
        speed_status_t st = load(&c, &cfg, "--config", path, "POS", "--name", "cliname", "--verbose", NULL);
        int64_t injected = speed_alloc_injected_failures();
        speed_alloc_fail_after(-1, 0);
        if (st == SPEED_OK) {
            CHECK_INT_EQ(injected, 0);
            CHECK_INT_EQ(c.threads, 8);
            CHECK_NEAR(c.ratio, 0.125, 0);
            CHECK_STR_EQ(c.name, "cliname");
            CHECK_STR_EQ(c.model, "m");
            CHECK_NEAR(c.kv_x_deep, 0.5, 0);
            speed_config_destroy(cfg);
            CHECK_INT_EQ(speed_alloc_live_count(), live);
            break;
        }
        failures++;
        CHECK_MSG(st == SPEED_ERR_NO_MEMORY, "fail_after(%lld): status %d", (long long)n, st);
        CHECK(cfg == NULL);
        CHECK_MSG(speed_alloc_live_count() == live, "fail_after(%lld): %lld allocations leaked", (long long)n,
                  (long long)(speed_alloc_live_count() - live));
        if (n > 10000) {
            CHECK_MSG(0, "load never succeeded");
            break;
        }
    }
    fprintf(stderr, "fault injection: %d failing points\n", failures);
    CHECK(failures > 10);
    clear_env();
}

/* SECRET fields: file and environment only, redacted when printed, hidden in --help. */
typedef struct {
    char *token;
    char *plain;
} secret_cfg_t;

static const speed_config_field_t secret_fields[] = {
    {"api.token", SPEED_CONFIG_SECRET, offsetof(secret_cfg_t, token), "", SPEED_CONFIG_UNBOUNDED, NULL,
     "a token (or api.token_file)"},
    {"plain", SPEED_CONFIG_STRING, offsetof(secret_cfg_t, plain), "x", SPEED_CONFIG_UNBOUNDED, NULL, "not secret"},
};

static char *print_to_string(const speed_config_t *cfg, bool help) {
    FILE *f = tmpfile();
    if (!f) return NULL;
    if (help)
        speed_config_print_help(secret_fields, 2, PREFIX, f);
    else
        speed_config_print(cfg, f);
    rewind(f);
    static char text[4096];
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = '\0';
    fclose(f);
    return text;
}

static void test_secrets(void) {
    int64_t live = speed_alloc_live_count();
    secret_cfg_t c;
    speed_config_t *cfg = NULL;
    char *argv[] = {"prog", "--api.token", "hunter2", NULL};
    n_errors = 0;
    CHECK_INT_EQ(speed_config_load(secret_fields, 2, &c, 3, argv, PREFIX, &cfg), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(cfg == NULL);
    CHECK_INT_EQ(n_errors, 1);
    CHECK_CONTAINS(last_error, "api.token is a secret");
    CHECK_CONTAINS(last_error, PREFIX "API_TOKEN");
    CHECK_CONTAINS(last_error, "api.token_file");
    CHECK(!strstr(last_error, "hunter2"));
    char *argv2[] = {"prog", "--api.token=hunter2", NULL};
    CHECK_INT_EQ(speed_config_load(secret_fields, 2, &c, 2, argv2, PREFIX, &cfg), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(!strstr(last_error, "hunter2"));

    /* from the environment (and the file): used, printed redacted */
    setenv(PREFIX "API_TOKEN", "hunter2", 1);
    char *argv3[] = {"prog", "--print-config", NULL};
    CHECK_INT_EQ(speed_config_load(secret_fields, 2, &c, 2, argv3, PREFIX, &cfg), SPEED_OK);
    CHECK_STR_EQ(c.token, "hunter2");
    const char *text = cfg ? print_to_string(cfg, false) : NULL;
    CHECK(text && !strstr(text, "hunter2"));
    CHECK_CONTAINS(text ? text : "", "token: <redacted>");
    CHECK_CONTAINS(text ? text : "", "plain: \"x\"");
    speed_config_destroy(cfg);
    unsetenv(PREFIX "API_TOKEN");
    /* unset (empty): printed as it is */
    CHECK_INT_EQ(speed_config_load(secret_fields, 2, &c, 2, argv3, PREFIX, &cfg), SPEED_OK);
    text = cfg ? print_to_string(cfg, false) : NULL;
    CHECK_CONTAINS(text ? text : "", "token: \"\"");
    speed_config_destroy(cfg);
    text = print_to_string(NULL, true);
    CHECK_CONTAINS(text ? text : "", "--api.token SECRET");
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

int main(void) {
    const char *t = getenv("SPEED_TEST_TMP");
    if (!t || !t[0]) t = "/tmp";
    snprintf(tmpdir, sizeof tmpdir, "%s/test_config.%d", t, (int)getpid());
    if (mkdir(tmpdir, 0700) != 0) {
        perror(tmpdir);
        return 1;
    }
    clear_env();
    speed_log_set_sink(sink, NULL);

    test_parsers();
    test_defaults();
    test_precedence();
    test_print_roundtrip();
    test_yaml_errors();
    test_cli_errors();
    test_bools();
    test_positional_and_flags();
    test_table_errors();
    test_secrets();
    test_alloc_faults();

    speed_log_set_sink(NULL, NULL);
    return CHECK_DONE();
}
