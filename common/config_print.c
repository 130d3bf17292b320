/* Writing a loaded config back out: speed_config_print (--print-config, YAML that loads to
 * the same values) and speed_config_print_help (--help, generated from the field table).
 */
#include "config_internal.h"

#include <stdio.h>

#include "alloc.h"

/* Column where --help starts each option's description. */
enum { HELP_VALUE_COL = 30 };

/* ---- printing ----------------------------------------------------------------------- */

static void print_quoted(FILE *f, const char *s, int *col) {
    fputc('"', f);
    (*col)++;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        /* YAML reads U+0085, U+2028 and U+2029 as line breaks and folds them inside a quoted
         * scalar: written raw they would load back as spaces. Its escapes keep them. */
        if (p[0] == 0xc2 && p[1] == 0x85) {
            *col += fprintf(f, "\\N");
            p++;
            continue;
        }
        if (p[0] == 0xe2 && p[1] == 0x80 && (p[2] == 0xa8 || p[2] == 0xa9)) {
            *col += fprintf(f, p[2] == 0xa8 ? "\\L" : "\\P");
            p += 2;
            continue;
        }
        switch (*p) {
        case '"': *col += fprintf(f, "\\\""); break;
        case '\\': *col += fprintf(f, "\\\\"); break;
        case '\n': *col += fprintf(f, "\\n"); break;
        case '\t': *col += fprintf(f, "\\t"); break;
        case '\r': *col += fprintf(f, "\\r"); break;
        default:
            if (*p < 0x20 || *p == 0x7f)
                *col += fprintf(f, "\\x%02x", *p);
            else {
                fputc(*p, f);
                (*col)++;
            }
        }
    }
    fputc('"', f);
    (*col)++;
}

static int format_value(const speed_config_t *cfg, size_t i, FILE *f) {
    const value_t *v = &cfg->slots[i].v;
    char buf[64];
    int col = 0;
    switch (cfg->fields[i].type) {
    case SPEED_CONFIG_INT: return fprintf(f, "%lld", (long long)v->i);
    case SPEED_CONFIG_DOUBLE: speed_config_double_format(buf, sizeof buf, v->d); return fprintf(f, "%s", buf);
    case SPEED_CONFIG_BOOL: return fprintf(f, "%s", v->b ? "true" : "false");
    case SPEED_CONFIG_ENUM: return fprintf(f, "%s", cfg->fields[i].enum_names[v->e]);
    case SPEED_CONFIG_SECRET:
        /* A secret that is set is never printed; an empty one is (no authentication is
         * worth seeing). */
        if (v->s && v->s[0]) return fprintf(f, SPEED_CONFIG_REDACTED);
        print_quoted(f, v->s, &col);
        return col;
    case SPEED_CONFIG_STRING: print_quoted(f, v->s, &col); return col;
    }
    return 0;
}

static bool node_has_value(const speed_config_t *cfg, int n) {
    int fi = cfg->nodes[n].field;
    if (fi >= 0) /* only a STRING without a default can be unset */
        return (cfg->fields[fi].type != SPEED_CONFIG_STRING && cfg->fields[fi].type != SPEED_CONFIG_SECRET) ||
               cfg->slots[fi].v.s != NULL;
    for (int c = cfg->nodes[n].first_child; c >= 0; c = cfg->nodes[c].next)
        if (node_has_value(cfg, c)) return true;
    return false;
}

static void pad(FILE *f, int col, int to) {
    do fputc(' ', f);
    while (++col < to);
}

static void print_node(const speed_config_t *cfg, int n, int indent, FILE *f) {
    for (int c = cfg->nodes[n].first_child; c >= 0; c = cfg->nodes[c].next) {
        const node_t *child = &cfg->nodes[c];
        bool has = node_has_value(cfg, c);
        int col = fprintf(f, "%*s%s%.*s:", indent, "", has ? "" : "# ", (int)child->len, child->comp);
        if (child->field < 0) {
            fputc('\n', f);
            print_node(cfg, c, indent + 2, f);
            continue;
        }
        const slot_t *slot = &cfg->slots[child->field];
        if (has) {
            fputc(' ', f);
            col += 1 + format_value(cfg, (size_t)child->field, f);
        } else {
            col += fprintf(f, " (unset)");
        }
        pad(f, col, 40);
        fprintf(f, "# %s\n", slot->origin);
    }
}

speed_status_t speed_config_print(const speed_config_t *cfg, FILE *f) {
    fprintf(f, "# effective configuration; each value's origin follows its '#'\n");
    print_node(cfg, 0, 0, f);
    if (fflush(f) != 0 || ferror(f)) return SPEED_ERR_IO;
    return SPEED_OK;
}

speed_status_t speed_config_print_help(const speed_config_field_t *fields, size_t n_fields, const char *env_prefix,
                                       FILE *f) {
    static const char *const type_names[] = {"INT", "NUM", "BOOL", "TEXT", "NAME", "SECRET"};
    fprintf(f, "Options (each is also a key in the --config YAML file%s):\n",
            env_prefix ? " and an environment variable" : "");
    for (size_t i = 0; i < n_fields; i++) {
        const speed_config_field_t *fd = &fields[i];
        int col;
        if (fd->type == SPEED_CONFIG_BOOL) {
            col = fprintf(f, "  --%s, --no-%s", fd->name, fd->name);
        } else if (fd->type == SPEED_CONFIG_ENUM) {
            col = fprintf(f, "  --%s ", fd->name);
            for (int k = 0; fd->enum_names && fd->enum_names[k]; k++)
                col += fprintf(f, "%s%s", k ? "|" : "", fd->enum_names[k]);
        } else {
            col = fprintf(f, "  --%s %s", fd->name, type_names[fd->type]);
        }
        if (col >= HELP_VALUE_COL) {
            fputc('\n', f);
            col = 0;
        }
        pad(f, col, HELP_VALUE_COL);
        fprintf(f, "%s", fd->doc ? fd->doc : "");
        bool open = false;
#define HELP_ITEM(...) (fputs(open ? "; " : " (", f), open = true, fprintf(f, __VA_ARGS__))
        if (fd->default_value && fd->type == SPEED_CONFIG_SECRET && fd->default_value[0])
            HELP_ITEM("default %s", SPEED_CONFIG_REDACTED);
        else if (fd->default_value)
            HELP_ITEM(fd->type == SPEED_CONFIG_STRING || fd->type == SPEED_CONFIG_SECRET ? "default \"%s\""
                                                                                         : "default %s",
                      fd->default_value);
        if ((fd->type == SPEED_CONFIG_INT || fd->type == SPEED_CONFIG_DOUBLE) && fd->min <= fd->max) {
            char lo[32], hi[32];
            speed_config_bound_format(lo, sizeof lo, fd->type, fd->min);
            speed_config_bound_format(hi, sizeof hi, fd->type, fd->max);
            HELP_ITEM("%s..%s", lo, hi);
        }
        if (env_prefix) {
            char *env = speed_config_env_name(env_prefix, fd->name);
            if (env) HELP_ITEM("env %s", env);
            speed_free(env);
        }
#undef HELP_ITEM
        fprintf(f, "%s\n", open ? ")" : "");
    }
    fprintf(f, "  --config FILE");
    pad(f, 15, HELP_VALUE_COL);
    fprintf(f, "read settings from a YAML file%s%s%s\n", env_prefix ? " (env " : "", env_prefix ? env_prefix : "",
            env_prefix ? "CONFIG)" : "");
    fprintf(f, "  --print-config");
    pad(f, 16, HELP_VALUE_COL);
    fprintf(f, "print the effective configuration as YAML and exit\n");
    fprintf(f, "  --help, -h");
    pad(f, 12, HELP_VALUE_COL);
    fprintf(f, "print this help and exit\n");
    fprintf(f, "Precedence: defaults < config file < environment < command line.\n");
    if (fflush(f) != 0 || ferror(f)) return SPEED_ERR_IO;
    return SPEED_OK;
}
