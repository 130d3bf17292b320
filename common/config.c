/* Declarative config loading: see config.h.
 *
 * This file holds the table checks, the tree of names, the one value parser every source
 * goes through, the command line and speed_config_load itself, which applies the sources in
 * order. The YAML file is read by config_file.c and --print-config / --help are written by
 * config_print.c; config_internal.h is what they share.
 */
#include "config_internal.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "alloc.h"

/* ---- text parsers ---------------------------------------------------------------- */

speed_status_t speed_config_parse_int(const char *text, int64_t *value_p) {
    if (!text || !text[0] || isspace((unsigned char)text[0])) return SPEED_ERR_PARSE;
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno == ERANGE || *end != '\0') return SPEED_ERR_PARSE;
    *value_p = (int64_t)v;
    return SPEED_OK;
}

speed_status_t speed_config_parse_double(const char *text, double *value_p) {
    if (!text || !text[0] || isspace((unsigned char)text[0])) return SPEED_ERR_PARSE;
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    /* ERANGE on underflow still gives a usable finite value; overflow gives inf. */
    if (*end != '\0' || !isfinite(v)) return SPEED_ERR_PARSE;
    *value_p = v;
    return SPEED_OK;
}

speed_status_t speed_config_parse_bool(const char *text, bool *value_p) {
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    if (!text) return SPEED_ERR_PARSE;
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        if (strcasecmp(text, yes[i]) == 0) {
            *value_p = true;
            return SPEED_OK;
        }
        if (strcasecmp(text, no[i]) == 0) {
            *value_p = false;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_PARSE;
}

speed_status_t speed_config_parse_enum(const char *text, const char *const *names, int *index_p) {
    if (!text || !names) return SPEED_ERR_PARSE;
    for (int i = 0; names[i]; i++) {
        if (strcasecmp(text, names[i]) == 0) {
            *index_p = i;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_PARSE;
}

/* ---- names ------------------------------------------------------------------------- */

/* Option names treat '-' and '_' alike. */
static bool name_char_eq(char a, char b) {
    if (a == '-') a = '_';
    if (b == '-') b = '_';
    return a == b;
}

static bool option_matches(const char *opt, size_t opt_len, const char *name) {
    size_t i = 0;
    for (; i < opt_len && name[i]; i++)
        if (!name_char_eq(opt[i], name[i])) return false;
    return i == opt_len && name[i] == '\0';
}

/* Edit distance for "did you mean"; names longer than NAME_MAX_LEN are never suggested. */
static size_t edit_distance(const char *a, size_t la, const char *b) {
    size_t lb = strlen(b);
    if (la > NAME_MAX_LEN || lb > NAME_MAX_LEN) return (size_t)-1;
    size_t row[NAME_MAX_LEN + 1];
    for (size_t j = 0; j <= lb; j++) row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (name_char_eq(a[i - 1], b[j - 1]) ? 0 : 1);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* Is `cand` close enough to `typed` to suggest? */
bool speed_config_name_is_near(const char *typed, size_t typed_len, const char *cand, size_t *best_p) {
    size_t d = edit_distance(typed, typed_len, cand);
    size_t limit = typed_len < 4 ? 1 : typed_len < 9 ? 2 : 3;
    if (d <= limit && d < *best_p) {
        *best_p = d;
        return true;
    }
    return false;
}

static bool is_reserved(const char *name) {
    static const char *const reserved[] = {"config", "help", "print_config"};
    for (size_t i = 0; i < sizeof reserved / sizeof reserved[0]; i++)
        if (option_matches(name, strlen(name), reserved[i])) return true;
    return false;
}

/* Environment name: prefix + NAME with '.' and '-' as '_'. */
char *speed_config_env_name(const char *prefix, const char *name) {
    size_t lp = strlen(prefix), ln = strlen(name);
    char *s = speed_malloc(lp + ln + 1);
    if (!s) return NULL;
    memcpy(s, prefix, lp);
    for (size_t i = 0; i < ln; i++) {
        char c = name[i];
        s[lp + i] = (c == '.' || c == '-') ? '_' : (char)toupper((unsigned char)c);
    }
    s[lp + ln] = '\0';
    return s;
}

char *speed_config_str_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return NULL;
    char *s = speed_malloc((size_t)n + 1);
    if (!s) return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

/* ---- name tree ---------------------------------------------------------------------- */

static int node_find_child(const node_t *nodes, int parent, const char *comp, size_t len) {
    for (int c = nodes[parent].first_child; c >= 0; c = nodes[c].next)
        if (nodes[c].len == len && memcmp(nodes[c].comp, comp, len) == 0) return c;
    return -1;
}

/* Validates the table and builds the tree. Table errors are INVALID_ARGUMENT. */
static speed_status_t build_tree(speed_config_t *cfg) {
    const speed_config_field_t *fields = cfg->fields;
    size_t n_nodes_max = 1;
    for (size_t i = 0; i < cfg->n_fields; i++) {
        const char *name = fields[i].name;
        if (!name || !name[0]) {
            CONFIG_ERROR("config table: field %zu has no name", i);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        n_nodes_max += 1;
        for (const char *p = name; *p; p++) n_nodes_max += (*p == '.');
    }
    cfg->nodes = speed_calloc(n_nodes_max, sizeof *cfg->nodes);
    if (!cfg->nodes) return SPEED_ERR_NO_MEMORY;
    node_t *nodes = cfg->nodes;
    nodes[0] = (node_t){.field = -1, .first_child = -1, .last_child = -1, .next = -1};
    cfg->n_nodes = 1;

    for (size_t i = 0; i < cfg->n_fields; i++) {
        const speed_config_field_t *f = &fields[i];
        const char *name = f->name;
        if (strlen(name) > NAME_MAX_LEN) {
            CONFIG_ERROR("config table: field name '%.40s...' is too long", name);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        for (const char *p = name; *p; p++) {
            if (!isalnum((unsigned char)*p) && *p != '_' && *p != '-' && *p != '.') {
                CONFIG_ERROR("config table: field name '%s' has a character other than "
                             "letters, digits, '_', '-' and '.'",
                             name);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
        if (is_reserved(name)) {
            CONFIG_ERROR("config table: '%s' is a reserved option name", name);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        for (size_t j = 0; j < i; j++) {
            if (option_matches(name, strlen(name), fields[j].name)) {
                CONFIG_ERROR("config table: field '%s' is defined twice", name);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
        if (f->type > SPEED_CONFIG_SECRET) {
            CONFIG_ERROR("config table: field '%s' has an unknown type %d", name, (int)f->type);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (f->type == SPEED_CONFIG_ENUM && (!f->enum_names || !f->enum_names[0])) {
            CONFIG_ERROR("config table: enum field '%s' has no names", name);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (!f->default_value && f->type != SPEED_CONFIG_STRING && f->type != SPEED_CONFIG_SECRET) {
            CONFIG_ERROR("config table: field '%s' needs a default value", name);
            return SPEED_ERR_INVALID_ARGUMENT;
        }

        int parent = 0, depth = 0;
        const char *comp = name;
        for (;;) {
            size_t len = strcspn(comp, ".");
            bool last = comp[len] == '\0';
            if (len == 0 || ++depth > DEPTH_MAX) {
                CONFIG_ERROR("config table: field name '%s' has an empty component or "
                             "is nested too deep",
                             name);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
            int c = node_find_child(nodes, parent, comp, len);
            if (c >= 0 && (last || nodes[c].field >= 0)) {
                /* "kv" as a value and "kv.x" as a key inside it cannot both exist */
                int leaf = c;
                while (nodes[leaf].field < 0) leaf = nodes[leaf].first_child;
                CONFIG_ERROR("config table: field '%s' clashes with field '%s'", name, fields[nodes[leaf].field].name);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
            if (c < 0) {
                c = cfg->n_nodes++;
                nodes[c] = (node_t){.comp = comp,
                                    .len = len,
                                    .field = last ? (int)i : -1,
                                    .first_child = -1,
                                    .last_child = -1,
                                    .next = -1};
                if (nodes[parent].last_child >= 0)
                    nodes[nodes[parent].last_child].next = c;
                else
                    nodes[parent].first_child = c;
                nodes[parent].last_child = c;
                nodes[parent].n_children++;
            }
            if (last) break;
            parent = c;
            comp += len + 1;
        }
    }
    return SPEED_OK;
}

/* Node for a dotted key path (exact YAML spelling), or -1. */
int speed_config_node_for_path(const speed_config_t *cfg, const char *path) {
    int n = 0;
    const char *comp = path;
    while (*comp) {
        size_t len = strcspn(comp, ".");
        n = node_find_child(cfg->nodes, n, comp, len);
        if (n < 0 || comp[len] == '\0') return n;
        comp += len + 1;
    }
    return n;
}

/* ---- values ------------------------------------------------------------------------- */

void speed_config_bound_format(char *buf, size_t size, speed_config_type_t type, double x) {
    if (type == SPEED_CONFIG_INT && fabs(x) < 9e18)
        snprintf(buf, size, "%lld", (long long)x);
    else
        snprintf(buf, size, "%g", x);
}

/* Shortest %g text that reads back as the same double. */
void speed_config_double_format(char *buf, size_t size, double v) {
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    /* keep it visibly a number with a fraction or exponent for readers */
    if (!strpbrk(buf, ".eE") && strlen(buf) + 3 <= size) strcat(buf, ".0");
}

static void slot_set_origin(slot_t *slot, speed_config_source_t source, const char *origin, char *origin_owned) {
    speed_free(slot->origin_owned);
    slot->source = source;
    slot->origin = origin_owned ? origin_owned : origin;
    slot->origin_owned = origin_owned;
}

static void enum_list(char *buf, size_t size, const char *const *names) {
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; names[i] && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%s", i ? ", " : "", names[i]);
}

/* Parse `text` for field i and store it, with its origin (origin_owned, if not NULL, is
 * consumed, also on failure). Errors are logged with the origin. */
speed_status_t speed_config_value_set(speed_config_t *cfg, size_t i, const char *text, speed_config_source_t source,
                                      const char *origin, char *origin_owned) {
    const speed_config_field_t *f = &cfg->fields[i];
    slot_t *slot = &cfg->slots[i];
    const char *from = origin_owned ? origin_owned : origin;
    value_t v = {0};
    char lo[32], hi[32];
    bool bounded = f->min <= f->max;

    switch (f->type) {
    case SPEED_CONFIG_INT:
        if (speed_config_parse_int(text, &v.i) != SPEED_OK) {
            CONFIG_ERROR("%s: '%s' is not an integer (from %s)", f->name, text, from);
            goto invalid;
        }
        if (bounded && ((double)v.i < f->min || (double)v.i > f->max)) {
            bool below = (double)v.i < f->min;
            speed_config_bound_format(lo, sizeof lo, f->type, below ? f->min : f->max);
            CONFIG_ERROR("%s: %lld is %s %s (from %s)", f->name, (long long)v.i,
                         below ? "below the minimum" : "above the maximum", lo, from);
            goto invalid;
        }
        break;
    case SPEED_CONFIG_DOUBLE:
        if (speed_config_parse_double(text, &v.d) != SPEED_OK) {
            CONFIG_ERROR("%s: '%s' is not a finite number (from %s)", f->name, text, from);
            goto invalid;
        }
        if (bounded && (v.d < f->min || v.d > f->max)) {
            bool below = v.d < f->min;
            speed_config_bound_format(lo, sizeof lo, f->type, below ? f->min : f->max);
            speed_config_double_format(hi, sizeof hi, v.d);
            CONFIG_ERROR("%s: %s is %s %s (from %s)", f->name, hi, below ? "below the minimum" : "above the maximum",
                         lo, from);
            goto invalid;
        }
        break;
    case SPEED_CONFIG_BOOL:
        if (speed_config_parse_bool(text, &v.b) != SPEED_OK) {
            CONFIG_ERROR("%s: '%s' is not a boolean (true/false, yes/no, on/off, 1/0) "
                         "(from %s)",
                         f->name, text, from);
            goto invalid;
        }
        break;
    case SPEED_CONFIG_ENUM:
        if (speed_config_parse_enum(text, f->enum_names, &v.e) != SPEED_OK) {
            char list[512];
            enum_list(list, sizeof list, f->enum_names);
            CONFIG_ERROR("%s: '%s' is not one of %s (from %s)", f->name, text, list, from);
            goto invalid;
        }
        break;
    case SPEED_CONFIG_STRING:
    case SPEED_CONFIG_SECRET:
        v.s = speed_strdup(text);
        if (!v.s) {
            speed_free(origin_owned);
            return SPEED_ERR_NO_MEMORY;
        }
        speed_free(slot->v.s);
        break;
    }
    slot->v = v;
    slot_set_origin(slot, source, origin, origin_owned);
    return SPEED_OK;

invalid:
    speed_free(origin_owned);
    return SPEED_ERR_INVALID_ARGUMENT;
}

/* ---- command line ------------------------------------------------------------------- */

typedef struct {
    size_t field;
    const char *text;
} cli_value_t;

static int find_option(const speed_config_t *cfg, const char *opt, size_t len) {
    for (size_t i = 0; i < cfg->n_fields; i++)
        if (option_matches(opt, len, cfg->fields[i].name)) return (int)i;
    return -1;
}

static void report_unknown_option(const speed_config_t *cfg, const char *arg, size_t len) {
    const char *near = NULL;
    size_t best = (size_t)-1;
    const char *body = arg + 2;
    size_t blen = len - 2;
    for (size_t i = 0; i < cfg->n_fields; i++)
        if (speed_config_name_is_near(body, blen, cfg->fields[i].name, &best)) near = cfg->fields[i].name;
    if (near)
        CONFIG_ERROR("unknown option %.*s (did you mean --%s?)", (int)len, arg, near);
    else
        CONFIG_ERROR("unknown option %.*s (see --help)", (int)len, arg);
}

/* First pass over argv: classify, resolve names, find --config. Applies nothing. */
static speed_status_t parse_cli(speed_config_t *cfg, int argc, char **argv, cli_value_t *vals, size_t *n_vals_p,
                                const char **config_p) {
    size_t n_vals = 0;
    bool options_done = false;
    for (int a = 1; a < argc; a++) {
        char *arg = argv[a];
        if (options_done || arg[0] != '-' || arg[1] == '\0') {
            cfg->positional[cfg->n_positional++] = arg;
            continue;
        }
        if (strcmp(arg, "--") == 0) {
            options_done = true;
            continue;
        }
        if (strcmp(arg, "-h") == 0) {
            cfg->help = true;
            continue;
        }
        if (arg[1] != '-') {
            CONFIG_ERROR("unknown option %s (options start with --; see --help)", arg);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        const char *body = arg + 2;
        const char *eq = strchr(body, '=');
        size_t blen = eq ? (size_t)(eq - body) : strlen(body);
        size_t alen = blen + 2;
        const char *value = eq ? eq + 1 : NULL;

        if (option_matches(body, blen, "help") || option_matches(body, blen, "print_config")) {
            if (value) {
                CONFIG_ERROR("option %.*s takes no value", (int)alen, arg);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
            if (body[0] == 'h')
                cfg->help = true;
            else
                cfg->print = true;
            continue;
        }
        bool is_config = option_matches(body, blen, "config");
        int fi = is_config ? -1 : find_option(cfg, body, blen);
        if (!is_config && fi < 0 && blen > 3 && strncmp(body, "no", 2) == 0 && (body[2] == '-' || body[2] == '_')) {
            int nf = find_option(cfg, body + 3, blen - 3);
            if (nf >= 0 && cfg->fields[nf].type == SPEED_CONFIG_BOOL) {
                if (value) {
                    CONFIG_ERROR("option %.*s takes no value", (int)alen, arg);
                    return SPEED_ERR_INVALID_ARGUMENT;
                }
                vals[n_vals++] = (cli_value_t){.field = (size_t)nf, .text = "false"};
                continue;
            }
        }
        if (!is_config && fi < 0) {
            report_unknown_option(cfg, arg, alen);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (!value) {
            if (!is_config && cfg->fields[fi].type == SPEED_CONFIG_BOOL) {
                value = "true";
            } else if (a + 1 < argc) {
                value = argv[++a];
            } else {
                CONFIG_ERROR("option %.*s needs a value", (int)alen, arg);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
        }
        if (!is_config && cfg->fields[fi].type == SPEED_CONFIG_SECRET) {
            /* argv is readable by every user of the host (ps, /proc/PID/cmdline): a secret
             * given there has already leaked, so refuse it rather than use it. */
            char *env = cfg->env_prefix ? speed_config_env_name(cfg->env_prefix, cfg->fields[fi].name) : NULL;
            CONFIG_ERROR("%s is a secret and is not accepted on the command line (other users can read it there): "
                         "set %s%s%s or put it in the --config file (%s)",
                         cfg->fields[fi].name, env ? "the environment variable " : "", env ? env : "", env ? "," : "",
                         cfg->fields[fi].doc ? cfg->fields[fi].doc : "");
            speed_free(env);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (is_config)
            *config_p = value;
        else
            vals[n_vals++] = (cli_value_t){.field = (size_t)fi, .text = value};
    }
    *n_vals_p = n_vals;
    return SPEED_OK;
}

/* ---- load --------------------------------------------------------------------------- */

static void write_struct(const speed_config_t *cfg, void *out) {
    for (size_t i = 0; i < cfg->n_fields; i++) {
        char *dst = (char *)out + cfg->fields[i].offset;
        const value_t *v = &cfg->slots[i].v;
        switch (cfg->fields[i].type) {
        case SPEED_CONFIG_INT: memcpy(dst, &v->i, sizeof v->i); break;
        case SPEED_CONFIG_DOUBLE: memcpy(dst, &v->d, sizeof v->d); break;
        case SPEED_CONFIG_BOOL: memcpy(dst, &v->b, sizeof v->b); break;
        case SPEED_CONFIG_STRING:
        case SPEED_CONFIG_SECRET: memcpy(dst, &v->s, sizeof v->s); break;
        case SPEED_CONFIG_ENUM: memcpy(dst, &v->e, sizeof v->e); break;
        }
    }
}

speed_status_t speed_config_load(const speed_config_field_t *fields, size_t n_fields, void *out_struct, int argc,
                                 char **argv, const char *env_prefix, speed_config_t **cfg_p) {
    speed_status_t st;
    cli_value_t *vals = NULL;
    size_t n_vals = 0;
    *cfg_p = NULL;
    if ((n_fields && !fields) || !out_struct || argc < 0 || (argc > 0 && !argv)) {
        CONFIG_ERROR("config: invalid arguments to speed_config_load");
        return SPEED_ERR_INVALID_ARGUMENT;
    }

    speed_config_t *cfg = speed_calloc(1, sizeof *cfg);
    if (!cfg) return SPEED_ERR_NO_MEMORY;
    cfg->fields = fields;
    cfg->n_fields = n_fields;
    cfg->env_prefix = env_prefix;
    cfg->slots = speed_calloc(n_fields ? n_fields : 1, sizeof *cfg->slots);
    cfg->positional = speed_calloc((size_t)argc + 1, sizeof *cfg->positional);
    vals = speed_calloc(argc > 0 ? (size_t)argc : 1, sizeof *vals);
    if (!cfg->slots || !cfg->positional || !vals) {
        st = SPEED_ERR_NO_MEMORY;
        goto fail;
    }
    SPEED_CHECK_GOTO(build_tree(cfg), st, fail);

    /* Command line first, so a typo is reported before files are read; applied last. */
    const char *config_path = NULL;
    SPEED_CHECK_GOTO(parse_cli(cfg, argc, argv, vals, &n_vals, &config_path), st, fail);

    for (size_t i = 0; i < n_fields; i++) {
        if (!fields[i].default_value) continue; /* unset STRING */
        st = speed_config_value_set(cfg, i, fields[i].default_value, SPEED_CONFIG_SOURCE_DEFAULT, "default", NULL);
        if (st != SPEED_OK) goto fail; /* logged "... (from default)" */
    }
    for (size_t i = 0; i < n_fields; i++)
        if (!fields[i].default_value) slot_set_origin(&cfg->slots[i], SPEED_CONFIG_SOURCE_DEFAULT, "default", NULL);

    if (!config_path && env_prefix) {
        char *name = speed_config_env_name(env_prefix, "config");
        if (!name) {
            st = SPEED_ERR_NO_MEMORY;
            goto fail;
        }
        config_path = getenv(name);
        speed_free(name);
    }
    if (config_path) {
        cfg->file = speed_strdup(config_path);
        if (!cfg->file) {
            st = SPEED_ERR_NO_MEMORY;
            goto fail;
        }
        SPEED_CHECK_GOTO(speed_config_file_load(cfg, cfg->file), st, fail);
    }

    if (env_prefix) {
        for (size_t i = 0; i < n_fields; i++) {
            char *name = speed_config_env_name(env_prefix, fields[i].name);
            if (!name) {
                st = SPEED_ERR_NO_MEMORY;
                goto fail;
            }
            const char *text = getenv(name);
            if (!text) {
                speed_free(name);
                continue;
            }
            char *origin = speed_config_str_printf("env:%s", name);
            speed_free(name);
            if (!origin) {
                st = SPEED_ERR_NO_MEMORY;
                goto fail;
            }
            SPEED_CHECK_GOTO(speed_config_value_set(cfg, i, text, SPEED_CONFIG_SOURCE_ENV, NULL, origin), st, fail);
        }
    }

    for (size_t k = 0; k < n_vals; k++)
        SPEED_CHECK_GOTO(speed_config_value_set(cfg, vals[k].field, vals[k].text, SPEED_CONFIG_SOURCE_CLI, "cli", NULL),
                         st, fail);

    speed_free(vals);
    write_struct(cfg, out_struct);
    *cfg_p = cfg;
    return SPEED_OK;

fail:
    if (st == SPEED_ERR_NO_MEMORY) CONFIG_ERROR("config: out of memory");
    speed_free(vals);
    speed_config_destroy(cfg);
    return st;
}

void speed_config_destroy(speed_config_t *cfg) {
    if (!cfg) return;
    if (cfg->slots) {
        for (size_t i = 0; i < cfg->n_fields; i++) {
            if (cfg->fields[i].type == SPEED_CONFIG_STRING || cfg->fields[i].type == SPEED_CONFIG_SECRET)
                speed_free(cfg->slots[i].v.s);
            speed_free(cfg->slots[i].origin_owned);
        }
    }
    speed_free(cfg->slots);
    speed_free(cfg->nodes);
    speed_free(cfg->positional);
    speed_free(cfg->file);
    speed_free(cfg);
}

int speed_config_positional(const speed_config_t *cfg, char *const **argv_p) {
    if (argv_p) *argv_p = cfg->positional;
    return cfg->n_positional;
}

bool speed_config_help_requested(const speed_config_t *cfg) { return cfg->help; }
bool speed_config_print_requested(const speed_config_t *cfg) { return cfg->print; }
const char *speed_config_file(const speed_config_t *cfg) { return cfg->file; }

speed_status_t speed_config_origin(const speed_config_t *cfg, const char *name, speed_config_source_t *source_p,
                                   const char **origin_p) {
    for (size_t i = 0; i < cfg->n_fields; i++) {
        if (strcmp(cfg->fields[i].name, name) == 0) {
            if (source_p) *source_p = cfg->slots[i].source;
            if (origin_p) *origin_p = cfg->slots[i].origin;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_NOT_FOUND;
}
