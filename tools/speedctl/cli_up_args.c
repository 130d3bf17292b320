/* speedctl up's command line: which options are speedctl up's own, which go to the daemons,
 * and the one positional (the cluster file); and its --help. speedctl.h documents the interface. */
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "cluster_config.h"
#include "config.h"
#include "speedctl.h"

/* "--log-dir=x" → "log_dir" in buf; false if arg is not a long option. */
static bool option_name(const char *arg, char *buf, size_t size, const char **value_p) {
    if (strncmp(arg, "--", 2) != 0 || !arg[2]) return false;
    const char *name = arg + 2, *eq = strchr(name, '=');
    size_t n = eq ? (size_t)(eq - name) : strlen(name);
    if (n >= size) n = size - 1;
    for (size_t i = 0; i < n; i++) buf[i] = name[i] == '-' ? '_' : name[i];
    buf[n] = '\0';
    *value_p = eq ? eq + 1 : NULL;
    return true;
}

static const speed_config_field_t *field_find(const speed_config_field_t *fields, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(fields[i].name, name) == 0) return &fields[i];
    return NULL;
}

/* Whether "--name" (written without "=value") consumes the next argument. */
static bool takes_value(const speed_config_field_t *fields, size_t n, const char *name) {
    if (strcmp(name, "config") == 0) return true;
    const speed_config_field_t *f = field_find(fields, n, name);
    if (!f && strncmp(name, "no_", 3) == 0) return false;
    return f && f->type != SPEED_CONFIG_BOOL;
}


/* Splits argv into speedctl up's own options and the cluster options, and finds the one
 * positional (the cluster file). Unknown options stay with the cluster options, whose
 * loader reports them. */
bool speedctl_up_args_split(const speed_config_field_t *up_fields, size_t n_up_fields, int argc, char **argv,
                            speedctl_up_args_t *a) {
    size_t n_cluster_fields;
    const speed_config_field_t *cluster_fields = speed_cluster_config_fields(&n_cluster_fields);
    memset(a, 0, sizeof *a);
    a->up_argv = speed_calloc((size_t)argc + 1, sizeof *a->up_argv);
    a->cluster_argv = speed_calloc((size_t)argc + 3, sizeof *a->cluster_argv);
    if (!a->up_argv || !a->cluster_argv) return false;
    a->up_argv[a->up_argc++] = argv[0];
    a->cluster_argv[a->cluster_argc++] = argv[0];
    bool rest_positional = false;
    for (int i = 1; i < argc; i++) {
        char name[128];
        const char *value;
        if (!rest_positional && strcmp(argv[i], "--") == 0) {
            rest_positional = true;
            continue;
        }
        if (rest_positional || !option_name(argv[i], name, sizeof name, &value)) {
            if (argv[i][0] == '-' && argv[i][1] && !rest_positional) { /* -h and the like */
                a->cluster_argv[a->cluster_argc++] = argv[i];
                continue;
            }
            if (a->n_positional++ == 0) a->config = argv[i];
            continue;
        }
        const char *plain = strncmp(name, "no_", 3) == 0 ? name + 3 : name;
        bool mine = field_find(up_fields, n_up_fields, name) ||
                    (field_find(up_fields, n_up_fields, plain) &&
                     field_find(up_fields, n_up_fields, plain)->type == SPEED_CONFIG_BOOL);
        const speed_config_field_t *cf = field_find(cluster_fields, n_cluster_fields, plain);
        bool known = mine || strcmp(name, "config") == 0 || strcmp(name, "print_config") == 0 ||
                     strcmp(name, "help") == 0 || field_find(cluster_fields, n_cluster_fields, name) ||
                     (cf && cf->type == SPEED_CONFIG_BOOL);
        if (!known && !a->unknown) a->unknown = argv[i];
        if (strcmp(name, "config") == 0) a->config_option = true;
        if (strcmp(name, "node.index") == 0) a->node_index = true;
        char **out = mine ? a->up_argv : a->cluster_argv;
        int *n_out = mine ? &a->up_argc : &a->cluster_argc;
        out[(*n_out)++] = argv[i];
        bool has_value = !value && (mine ? takes_value(up_fields, n_up_fields, name)
                                         : takes_value(cluster_fields, n_cluster_fields, name));
        if (has_value && i + 1 < argc) out[(*n_out)++] = argv[++i];
    }
    return true;
}

void speedctl_up_args_cleanup(speedctl_up_args_t *a) {
    speed_free(a->up_argv);
    speed_free(a->cluster_argv);
}

void speedctl_up_help_print(const speed_config_field_t *up_fields, size_t n_up_fields, const char *usage) {
    size_t n_cluster;
    const speed_config_field_t *cluster = speed_cluster_config_fields(&n_cluster);
    printf("usage: %s\n\n"
           "Starts a local cluster from the cluster file CONFIG: every decode replica, every prefill\n"
           "replica, then the router, each a child process, and waits until each answers GET /health.\n"
           "Prints `router: http://HOST:PORT` and `ready`, then runs until SIGINT/SIGTERM, which stops\n"
           "the router, then the prefill nodes, then the decode nodes. A process that dies is restarted\n"
           "with backoff while the others keep serving (given up after --restart-max quick failures);\n"
           "with --no-restart the whole cluster is stopped and speedctl exits 1. See docs/cluster.md.\n\n"
           "speedctl up's own options (command line or environment, not in CONFIG):\n",
           usage);
    for (size_t i = 0; i < n_up_fields; i++) {
        const speed_config_field_t *f = &up_fields[i];
        char opt[64], env[64];
        size_t k = 0;
        for (const char *c = f->name; *c && k + 1 < sizeof opt; c++) opt[k++] = *c == '_' ? '-' : *c;
        opt[k] = '\0';
        k = 0;
        for (const char *c = f->name; *c && k + 1 < sizeof env; c++)
            env[k++] = (char)(*c >= 'a' && *c <= 'z' ? *c - 32 : *c);
        env[k] = '\0';
        const char *arg = f->type == SPEED_CONFIG_STRING ? " DIR"
                          : f->type == SPEED_CONFIG_BOOL ? ""
                          : f->type == SPEED_CONFIG_INT  ? " N"
                                                         : " SECONDS";
        printf("  --%s%s\n      %s (%s%s%senv SPEED_UP_%s)\n", opt, arg, f->doc, f->default_value ? "default " : "",
               f->default_value ? f->default_value : "", f->default_value ? "; " : "", env);
    }
    printf("\ncluster options (in CONFIG, as SPEED_<OPTION>, or on the command line; passed on to every\n"
           "process, which loads CONFIG itself):\n");
    fflush(stdout);
    speed_config_print_help(cluster, n_cluster, "SPEED_", stdout);
}
