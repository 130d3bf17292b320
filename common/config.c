/* Declarative config loading: see config.h.
 *
 * How the YAML file is read. libcyaml does the structural work: a schema is built at run
 * time from the field table, with one nested mapping per dotted prefix and every leaf an
 * optional string pointer. So cyaml rejects unknown keys, duplicate keys and values of the
 * wrong shape (a list where a scalar belongs, a scalar where a mapping belongs), and hands
 * back the raw text of every scalar present (absent = NULL, unlike a zero). The text then
 * goes through the same parser and bounds check as the environment and the command line.
 *
 * All mappings are inline and share one flat array of string slots (slot i = field i):
 * a nested mapping sits at offset 0 of its parent and each leaf points at its own slot, so
 * no nested structs have to be laid out. Each slot is referenced by exactly one schema
 * leaf, so cyaml_free frees each string once.
 *
 * libcyaml does not report where a successfully loaded key was, and its libyaml syntax
 * errors carry no position, so a short libyaml event pass runs first: it reports syntax
 * errors with line and column, refuses multi-document streams (cyaml would silently drop
 * later documents) and records the line of every key path for origins and messages.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cyaml/cyaml.h>
#include <yaml.h>

#include "alloc.h"
#include "log.h"

#define CONFIG_ERROR(...) SPEED_ERROR(SPEED_SUBSYS_CORE, __VA_ARGS__)

/* Longest accepted name (field, option or key path) and nesting depth. */
enum { NAME_MAX_LEN = 255, DEPTH_MAX = 32, HELP_VALUE_COL = 30 };

typedef union {
    int64_t i;
    double d;
    bool b;
    char *s;
    int e;
} value_t;

typedef struct {
    value_t v;
    speed_config_source_t source;
    const char *origin;  /* static text or origin_owned */
    char *origin_owned;
} slot_t;

/* Tree of names: node 0 is the root mapping; a node is a leaf (field >= 0) or a mapping. */
typedef struct {
    const char *comp;  /* name component, points into the field table */
    size_t len;
    int field;         /* leaf: field index; mapping: -1 */
    int first_child, last_child, next; /* -1 = none */
    int n_children;
} node_t;

struct speed_config {
    const speed_config_field_t *fields;
    size_t n_fields;
    slot_t *slots;   /* [n_fields] */
    node_t *nodes;   /* [n_nodes] */
    int n_nodes;
    char **positional; /* [n_positional + 1], NULL-terminated */
    int n_positional;
    char *file;
    bool help, print;
};

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
        if (strcasecmp(text, yes[i]) == 0) { *value_p = true; return SPEED_OK; }
        if (strcasecmp(text, no[i]) == 0) { *value_p = false; return SPEED_OK; }
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
static bool is_near(const char *typed, size_t typed_len, const char *cand, size_t *best_p) {
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
static char *env_name(const char *prefix, const char *name) {
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

static char *str_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *str_printf(const char *fmt, ...) {
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
                             "letters, digits, '_', '-' and '.'", name);
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
        if (f->type > SPEED_CONFIG_ENUM) {
            CONFIG_ERROR("config table: field '%s' has an unknown type %d", name, (int)f->type);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (f->type == SPEED_CONFIG_ENUM && (!f->enum_names || !f->enum_names[0])) {
            CONFIG_ERROR("config table: enum field '%s' has no names", name);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
        if (!f->default_value && f->type != SPEED_CONFIG_STRING) {
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
                             "is nested too deep", name);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
            int c = node_find_child(nodes, parent, comp, len);
            if (c >= 0 && (last || nodes[c].field >= 0)) {
                /* "kv" as a value and "kv.x" as a key inside it cannot both exist */
                int leaf = c;
                while (nodes[leaf].field < 0) leaf = nodes[leaf].first_child;
                CONFIG_ERROR("config table: field '%s' clashes with field '%s'", name,
                             fields[nodes[leaf].field].name);
                return SPEED_ERR_INVALID_ARGUMENT;
            }
            if (c < 0) {
                c = cfg->n_nodes++;
                nodes[c] = (node_t){.comp = comp, .len = len, .field = last ? (int)i : -1,
                                    .first_child = -1, .last_child = -1, .next = -1};
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
static int node_for_path(const speed_config_t *cfg, const char *path) {
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

static void format_bound(char *buf, size_t size, speed_config_type_t type, double x) {
    if (type == SPEED_CONFIG_INT && fabs(x) < 9e18)
        snprintf(buf, size, "%lld", (long long)x);
    else
        snprintf(buf, size, "%g", x);
}

/* Shortest %g text that reads back as the same double. */
static void format_double(char *buf, size_t size, double v) {
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    /* keep it visibly a number with a fraction or exponent for readers */
    if (!strpbrk(buf, ".eE") && strlen(buf) + 3 <= size) strcat(buf, ".0");
}

static void slot_set_origin(slot_t *slot, speed_config_source_t source, const char *origin,
                            char *origin_owned) {
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
static speed_status_t set_value(speed_config_t *cfg, size_t i, const char *text,
                                speed_config_source_t source, const char *origin,
                                char *origin_owned) {
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
            format_bound(lo, sizeof lo, f->type, below ? f->min : f->max);
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
            format_bound(lo, sizeof lo, f->type, below ? f->min : f->max);
            format_double(hi, sizeof hi, v.d);
            CONFIG_ERROR("%s: %s is %s %s (from %s)", f->name, hi,
                         below ? "below the minimum" : "above the maximum", lo, from);
            goto invalid;
        }
        break;
    case SPEED_CONFIG_BOOL:
        if (speed_config_parse_bool(text, &v.b) != SPEED_OK) {
            CONFIG_ERROR("%s: '%s' is not a boolean (true/false, yes/no, on/off, 1/0) "
                         "(from %s)", f->name, text, from);
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

/* ---- config file -------------------------------------------------------------------- */

static speed_status_t read_file(const char *path, char **buf_p, size_t *len_p) {
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        int err = errno;
        CONFIG_ERROR("config file %s: %s", path, strerror(err));
        return err == ENOENT ? SPEED_ERR_NOT_FOUND : SPEED_ERR_IO;
    }
    speed_status_t st = SPEED_OK;
    size_t cap = 4096, len = 0;
    char *buf = speed_malloc(cap);
    if (!buf) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    for (;;) {
        if (len == cap) {
            char *nb = speed_realloc(buf, cap * 2);
            if (!nb) {
                st = SPEED_ERR_NO_MEMORY;
                goto out;
            }
            buf = nb;
            cap *= 2;
        }
        size_t n = fread(buf + len, 1, cap - len, fp);
        len += n;
        if (n == 0) break;
    }
    if (ferror(fp)) {
        CONFIG_ERROR("config file %s: %s", path, strerror(errno));
        st = SPEED_ERR_IO;
    }
out:
    fclose(fp);
    if (st != SPEED_OK) {
        speed_free(buf);
        return st;
    }
    *buf_p = buf;
    *len_p = len;
    return SPEED_OK;
}

/* Lines of key paths found by the libyaml pass. */
typedef struct {
    char **paths;
    int *lines;
    size_t n, cap;
} key_lines_t;

static void key_lines_free(key_lines_t *kl) {
    for (size_t i = 0; i < kl->n; i++) speed_free(kl->paths[i]);
    speed_free(kl->paths);
    speed_free(kl->lines);
}

static speed_status_t key_lines_add(key_lines_t *kl, const char *path, int line) {
    if (kl->n == kl->cap) {
        size_t cap = kl->cap ? kl->cap * 2 : 16;
        char **np = speed_realloc(kl->paths, cap * sizeof *np);
        if (!np) return SPEED_ERR_NO_MEMORY;
        kl->paths = np;
        int *nl = speed_realloc(kl->lines, cap * sizeof *nl);
        if (!nl) return SPEED_ERR_NO_MEMORY;
        kl->lines = nl;
        kl->cap = cap;
    }
    char *p = speed_strdup(path);
    if (!p) return SPEED_ERR_NO_MEMORY;
    kl->paths[kl->n] = p;
    kl->lines[kl->n] = line;
    kl->n++;
    return SPEED_OK;
}

/* Line (1-based) of the first occurrence of a key path, or 0. */
static int key_line(const key_lines_t *kl, const char *path) {
    for (size_t i = 0; i < kl->n; i++)
        if (strcmp(kl->paths[i], path) == 0) return kl->lines[i];
    return 0;
}

/* libyaml event pass: syntax errors with position, one document only, key lines. Keys are
 * recorded only along chains of mappings (what the schema can accept). */
static speed_status_t scan_yaml(const char *path, const char *buf, size_t len,
                                key_lines_t *kl) {
    typedef struct {
        bool is_map, want_key;
        size_t path_len; /* length of the key path up to and including this mapping's key */
        bool recordable;
    } frame_t;
    frame_t stack[DEPTH_MAX + 2];
    int depth = 0; /* frames in use; frames beyond the stack are only counted */
    int overflow = 0;
    char kpath[NAME_MAX_LEN + 2];
    size_t cur_len = 0; /* length of the key path of the pending value */
    bool have_pending_key = false;
    int n_docs = 0;
    speed_status_t st = SPEED_OK;

    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser)) return SPEED_ERR_NO_MEMORY;
    yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
    for (bool done = false; !done;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) {
            if (parser.error == YAML_MEMORY_ERROR) {
                st = SPEED_ERR_NO_MEMORY;
            } else {
                const yaml_mark_t *m = parser.problem_mark.line || parser.problem_mark.column
                                           ? &parser.problem_mark : &parser.context_mark;
                CONFIG_ERROR("config file %s:%zu:%zu: malformed YAML: %s%s%s", path,
                             m->line + 1, m->column + 1,
                             parser.problem ? parser.problem : "syntax error",
                             parser.context ? " " : "", parser.context ? parser.context : "");
                st = SPEED_ERR_PARSE;
            }
            break;
        }
        int line = (int)ev.start_mark.line + 1;
        /* frames past the stack (overflow) are only counted: no key lines in there */
        frame_t *top = depth > 0 && !overflow ? &stack[depth - 1] : NULL;
        bool is_key = top && top->is_map && top->want_key;
        switch (ev.type) {
        case YAML_STREAM_END_EVENT:
            done = true;
            break;
        case YAML_DOCUMENT_START_EVENT:
            if (++n_docs > 1) {
                CONFIG_ERROR("config file %s:%d: more than one YAML document", path, line);
                st = SPEED_ERR_PARSE;
                done = true;
            }
            break;
        case YAML_SCALAR_EVENT:
        case YAML_ALIAS_EVENT:
            if (is_key) {
                top->want_key = false;
                have_pending_key = false;
                if (top->recordable && ev.type == YAML_SCALAR_EVENT) {
                    size_t klen = ev.data.scalar.length;
                    size_t base = top->path_len;
                    if (base + (base ? 1 : 0) + klen <= NAME_MAX_LEN) {
                        cur_len = base;
                        if (base) kpath[cur_len++] = '.';
                        memcpy(kpath + cur_len, ev.data.scalar.value, klen);
                        cur_len += klen;
                        kpath[cur_len] = '\0';
                        have_pending_key = true;
                        st = key_lines_add(kl, kpath, line);
                        if (st != SPEED_OK) done = true;
                    }
                }
            } else if (top && top->is_map) {
                top->want_key = true;
            }
            break;
        case YAML_MAPPING_START_EVENT:
        case YAML_SEQUENCE_START_EVENT: {
            bool recordable = (!top) || (top->is_map && !top->want_key && top->recordable &&
                                         have_pending_key);
            if (top && top->is_map) {
                if (top->want_key) recordable = false; /* complex key */
                top->want_key = !top->want_key;
            }
            if (depth >= DEPTH_MAX + 2) {
                overflow++;
                break;
            }
            stack[depth++] = (frame_t){
                .is_map = ev.type == YAML_MAPPING_START_EVENT,
                .want_key = true,
                .path_len = top ? cur_len : 0,
                .recordable = recordable && ev.type == YAML_MAPPING_START_EVENT,
            };
            have_pending_key = false;
            break;
        }
        case YAML_MAPPING_END_EVENT:
        case YAML_SEQUENCE_END_EVENT:
            if (overflow) {
                overflow--;
                break;
            }
            depth--;
            have_pending_key = false;
            break;
        default:
            break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&parser);
    return st;
}

/* cyaml's log lines, kept to compose one message of our own. */
typedef struct {
    char first[256];   /* first error line, without the "Load: " prefix */
    char path[NAME_MAX_LEN + 1]; /* key path from the backtrace, outermost first */
    bool overflow;
} cyaml_capture_t;

static void cyaml_log_capture(cyaml_log_t level, void *ctx, const char *fmt, va_list args) {
    cyaml_capture_t *cap = ctx;
    if (level < CYAML_LOG_ERROR) return;
    char line[512];
    vsnprintf(line, sizeof line, fmt, args);
    line[strcspn(line, "\r\n")] = '\0';
    const char *msg = line;
    if (strncmp(msg, "Load: ", 6) == 0) msg += 6;
    static const char field_prefix[] = "  in mapping field '";
    if (strncmp(msg, field_prefix, sizeof field_prefix - 1) == 0) {
        /* backtrace lines come innermost first: prepend */
        const char *name = msg + sizeof field_prefix - 1;
        size_t nlen = strcspn(name, "'");
        size_t plen = strlen(cap->path);
        size_t need = nlen + (plen ? 1 : 0) + plen;
        if (need > NAME_MAX_LEN) {
            cap->overflow = true;
            return;
        }
        memmove(cap->path + nlen + (plen ? 1 : 0), cap->path, plen + 1);
        memcpy(cap->path, name, nlen);
        if (plen) cap->path[nlen] = '.';
        return;
    }
    if (!cap->first[0] && strncmp(msg, "Backtrace", 9) != 0 && strncmp(msg, "  in ", 5) != 0) {
        size_t len = strnlen(msg, sizeof cap->first - 1);
        memcpy(cap->first, msg, len);
        cap->first[len] = '\0';
    }
}

static void *cyaml_mem_counted(void *ctx, void *ptr, size_t size) {
    if (size == 0) {
        speed_free(ptr);
        return NULL;
    }
    return speed_realloc(ptr, size);
}

static const char *event_noun(const char *cyaml_event) {
    if (strstr(cyaml_event, "SEQUENCE")) return "a list";
    if (strstr(cyaml_event, "MAPPING")) return "a mapping";
    if (strstr(cyaml_event, "SCALAR")) return "a single value";
    return "something else";
}

/* Turn a cyaml failure into one log line and a status. */
static speed_status_t report_cyaml_error(const speed_config_t *cfg, const char *path,
                                         cyaml_err_t err, const cyaml_capture_t *cap,
                                         const key_lines_t *kl) {
    if (err == CYAML_ERR_OOM) return SPEED_ERR_NO_MEMORY;
    char where[NAME_MAX_LEN + 64];
    char key[NAME_MAX_LEN + 1];
    snprintf(key, sizeof key, "%s", cap->path);

    if (err == CYAML_ERR_INVALID_KEY && strncmp(cap->first, "Unexpected key: ", 16) == 0) {
        const char *bad = cap->first + 16;
        size_t plen = strlen(key);
        snprintf(key + plen, sizeof key - plen, "%s%s", plen ? "." : "", bad);
        int line = key_line(kl, key);
        if (line)
            snprintf(where, sizeof where, "%s:%d", path, line);
        else
            snprintf(where, sizeof where, "%s", path);
        /* suggest a sibling key */
        int parent = plen ? node_for_path(cfg, cap->path) : 0;
        const char *near = NULL;
        size_t best = (size_t)-1;
        if (parent >= 0) {
            for (int c = cfg->nodes[parent].first_child; c >= 0; c = cfg->nodes[c].next) {
                char comp[NAME_MAX_LEN + 1];
                snprintf(comp, sizeof comp, "%.*s", (int)cfg->nodes[c].len, cfg->nodes[c].comp);
                if (is_near(bad, strlen(bad), comp, &best)) near = cfg->nodes[c].comp;
            }
        }
        int dotted = strchr(bad, '.') ? node_for_path(cfg, key) : -1;
        if (dotted >= 0 && cfg->nodes[dotted].field >= 0) {
            CONFIG_ERROR("config file %s: unknown key '%s' (a dotted name is a nested "
                         "mapping in YAML: '%.*s:' with '%s:' indented under it)",
                         where, key, (int)strcspn(bad, "."), bad, strrchr(bad, '.') + 1);
        } else if (near) {
            int nlen = (int)strcspn(near, ".");
            CONFIG_ERROR("config file %s: unknown key '%s' (did you mean '%s%s%.*s'?)", where,
                         key, cap->path, plen ? "." : "", nlen, near);
        } else {
            CONFIG_ERROR("config file %s: unknown key '%s'", where, key);
        }
        return SPEED_ERR_INVALID_ARGUMENT;
    }

    int line = key[0] ? key_line(kl, key) : 0;
    if (line)
        snprintf(where, sizeof where, "%s:%d", path, line);
    else
        snprintf(where, sizeof where, "%s", path);
    const char *got = strstr(cap->first, "got event: ");
    if (strncmp(cap->first, "Expecting ", 10) == 0 && got) {
        got += 11;
        if (!key[0]) {
            CONFIG_ERROR("config file %s: the document must be a mapping of keys, not %s",
                         where, event_noun(got));
        } else {
            int n = node_for_path(cfg, key);
            bool want_map = n >= 0 && cfg->nodes[n].field < 0;
            CONFIG_ERROR("config file %s: %s: expected %s, got %s", where, key,
                         want_map ? "a mapping of keys" : "a single value", event_noun(got));
        }
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (strncmp(cap->first, "Mapping field already seen: ", 28) == 0) {
        CONFIG_ERROR("config file %s: key '%s' appears twice", path, key[0] ? key : "?");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    char msg[256];
    snprintf(msg, sizeof msg, "%s", cap->first[0] ? cap->first : cyaml_strerror(err));
    msg[0] = (char)tolower((unsigned char)msg[0]);
    CONFIG_ERROR("config file %s: %s%s%s", where, key[0] ? key : "", key[0] ? ": " : "", msg);
    return err == CYAML_ERR_LIBYAML_PARSER || err == CYAML_ERR_INVALID_ALIAS
               ? SPEED_ERR_PARSE : SPEED_ERR_INVALID_ARGUMENT;
}

/* Fill the cyaml mapping schema of tree node `n`: n_children + 1 entries taken from *pool
 * (nested mappings follow, depth first), keys copied NUL-terminated into *keys. */
static void build_schema(const speed_config_t *cfg, int n, cyaml_schema_field_t **pool,
                         char **keys, uint32_t data_size) {
    cyaml_schema_field_t *out = *pool;
    *pool += cfg->nodes[n].n_children + 1;
    int k = 0;
    for (int c = cfg->nodes[n].first_child; c >= 0; c = cfg->nodes[c].next, k++) {
        const node_t *child = &cfg->nodes[c];
        cyaml_schema_field_t *sf = &out[k];
        memset(sf, 0, sizeof *sf);
        memcpy(*keys, child->comp, child->len);
        (*keys)[child->len] = '\0';
        sf->key = *keys;
        *keys += child->len + 1;
        if (child->field >= 0) {
            sf->data_offset = (uint32_t)((size_t)child->field * sizeof(char *));
            sf->value.type = CYAML_STRING;
            sf->value.flags = CYAML_FLAG_OPTIONAL | CYAML_FLAG_POINTER;
            sf->value.data_size = 1;
            sf->value.string.min = 0;
            sf->value.string.max = UINT32_MAX;
        } else {
            sf->data_offset = 0; /* inline, sharing the parent's slot array */
            sf->value.type = CYAML_MAPPING;
            sf->value.flags = CYAML_FLAG_OPTIONAL;
            sf->value.data_size = data_size;
            sf->value.mapping.fields = *pool;
            build_schema(cfg, c, pool, keys, data_size);
        }
    }
    memset(&out[k], 0, sizeof out[k]);
}

static speed_status_t load_file(speed_config_t *cfg, const char *path) {
    char *buf = NULL;
    size_t len = 0;
    key_lines_t kl = {0};
    cyaml_schema_field_t *schema = NULL;
    char *keys = NULL;
    char **data = NULL;
    speed_status_t st;

    SPEED_CHECK(read_file(path, &buf, &len));
    SPEED_CHECK_GOTO(scan_yaml(path, buf, len, &kl), st, out);

    /* cyaml keys must be NUL-terminated but tree components point into dotted names */
    size_t keys_size = 0;
    for (int n = 1; n < cfg->n_nodes; n++) keys_size += cfg->nodes[n].len + 1;
    keys = speed_malloc(keys_size ? keys_size : 1);
    schema = speed_calloc((size_t)cfg->n_nodes * 2 + 1, sizeof *schema);
    if (!keys || !schema) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    uint32_t data_size = (uint32_t)((cfg->n_fields ? cfg->n_fields : 1) * sizeof(char *));
    cyaml_schema_field_t *pool = schema;
    char *kp = keys;
    build_schema(cfg, 0, &pool, &kp, data_size);
    cyaml_schema_value_t root = {
        .type = CYAML_MAPPING,
        .flags = CYAML_FLAG_POINTER,
        .data_size = data_size,
        .mapping = {.fields = schema},
    };
    cyaml_capture_t cap = {0};
    cyaml_config_t ccfg = {
        .log_fn = cyaml_log_capture,
        .log_ctx = &cap,
        .mem_fn = cyaml_mem_counted,
        .log_level = CYAML_LOG_ERROR,
        .flags = CYAML_CFG_DEFAULT,
    };
    cyaml_err_t err = cyaml_load_data((const uint8_t *)buf, len, &ccfg, &root,
                                      (cyaml_data_t **)&data, NULL);
    if (err != CYAML_OK) {
        data = NULL;
        st = report_cyaml_error(cfg, path, err, &cap, &kl);
        goto out;
    }
    st = SPEED_OK;
    for (size_t i = 0; data && i < cfg->n_fields; i++) {
        if (!data[i]) continue;
        int line = key_line(&kl, cfg->fields[i].name);
        char *origin = line ? str_printf("file:%s:%d", path, line) : str_printf("file:%s", path);
        if (!origin) {
            st = SPEED_ERR_NO_MEMORY;
            break;
        }
        st = set_value(cfg, i, data[i], SPEED_CONFIG_SOURCE_FILE, NULL, origin);
        if (st != SPEED_OK) break;
    }
    if (data) cyaml_free(&ccfg, &root, data, 0);
out:
    speed_free(schema);
    speed_free(keys);
    key_lines_free(&kl);
    speed_free(buf);
    return st;
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
        if (is_near(body, blen, cfg->fields[i].name, &best)) near = cfg->fields[i].name;
    if (near)
        CONFIG_ERROR("unknown option %.*s (did you mean --%s?)", (int)len, arg, near);
    else
        CONFIG_ERROR("unknown option %.*s (see --help)", (int)len, arg);
}

/* First pass over argv: classify, resolve names, find --config. Applies nothing. */
static speed_status_t parse_cli(speed_config_t *cfg, int argc, char **argv, cli_value_t *vals,
                                size_t *n_vals_p, const char **config_p) {
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
            if (body[0] == 'h') cfg->help = true; else cfg->print = true;
            continue;
        }
        bool is_config = option_matches(body, blen, "config");
        int fi = is_config ? -1 : find_option(cfg, body, blen);
        if (!is_config && fi < 0 && blen > 3 && strncmp(body, "no", 2) == 0 &&
            (body[2] == '-' || body[2] == '_')) {
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
        case SPEED_CONFIG_INT:    memcpy(dst, &v->i, sizeof v->i); break;
        case SPEED_CONFIG_DOUBLE: memcpy(dst, &v->d, sizeof v->d); break;
        case SPEED_CONFIG_BOOL:   memcpy(dst, &v->b, sizeof v->b); break;
        case SPEED_CONFIG_STRING: memcpy(dst, &v->s, sizeof v->s); break;
        case SPEED_CONFIG_ENUM:   memcpy(dst, &v->e, sizeof v->e); break;
        }
    }
}

speed_status_t speed_config_load(const speed_config_field_t *fields, size_t n_fields,
                                 void *out_struct, int argc, char **argv,
                                 const char *env_prefix, speed_config_t **cfg_p) {
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
        st = set_value(cfg, i, fields[i].default_value, SPEED_CONFIG_SOURCE_DEFAULT, "default",
                       NULL);
        if (st != SPEED_OK) goto fail; /* logged "... (from default)" */
    }
    for (size_t i = 0; i < n_fields; i++)
        if (!fields[i].default_value)
            slot_set_origin(&cfg->slots[i], SPEED_CONFIG_SOURCE_DEFAULT, "default", NULL);

    if (!config_path && env_prefix) {
        char *name = env_name(env_prefix, "config");
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
        SPEED_CHECK_GOTO(load_file(cfg, cfg->file), st, fail);
    }

    if (env_prefix) {
        for (size_t i = 0; i < n_fields; i++) {
            char *name = env_name(env_prefix, fields[i].name);
            if (!name) {
                st = SPEED_ERR_NO_MEMORY;
                goto fail;
            }
            const char *text = getenv(name);
            if (!text) {
                speed_free(name);
                continue;
            }
            char *origin = str_printf("env:%s", name);
            speed_free(name);
            if (!origin) {
                st = SPEED_ERR_NO_MEMORY;
                goto fail;
            }
            SPEED_CHECK_GOTO(set_value(cfg, i, text, SPEED_CONFIG_SOURCE_ENV, NULL, origin), st,
                             fail);
        }
    }

    for (size_t k = 0; k < n_vals; k++)
        SPEED_CHECK_GOTO(set_value(cfg, vals[k].field, vals[k].text, SPEED_CONFIG_SOURCE_CLI,
                                   "cli", NULL), st, fail);

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
            if (cfg->fields[i].type == SPEED_CONFIG_STRING) speed_free(cfg->slots[i].v.s);
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

speed_status_t speed_config_origin(const speed_config_t *cfg, const char *name,
                                   speed_config_source_t *source_p, const char **origin_p) {
    for (size_t i = 0; i < cfg->n_fields; i++) {
        if (strcmp(cfg->fields[i].name, name) == 0) {
            if (source_p) *source_p = cfg->slots[i].source;
            if (origin_p) *origin_p = cfg->slots[i].origin;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_NOT_FOUND;
}

/* ---- printing ----------------------------------------------------------------------- */

static void print_quoted(FILE *f, const char *s, int *col) {
    fputc('"', f);
    (*col)++;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"':  *col += fprintf(f, "\\\""); break;
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
    case SPEED_CONFIG_INT:    return fprintf(f, "%lld", (long long)v->i);
    case SPEED_CONFIG_DOUBLE: format_double(buf, sizeof buf, v->d); return fprintf(f, "%s", buf);
    case SPEED_CONFIG_BOOL:   return fprintf(f, "%s", v->b ? "true" : "false");
    case SPEED_CONFIG_ENUM:   return fprintf(f, "%s", cfg->fields[i].enum_names[v->e]);
    case SPEED_CONFIG_STRING: print_quoted(f, v->s, &col); return col;
    }
    return 0;
}

static bool node_has_value(const speed_config_t *cfg, int n) {
    int fi = cfg->nodes[n].field;
    if (fi >= 0)  /* only a STRING without a default can be unset */
        return cfg->fields[fi].type != SPEED_CONFIG_STRING || cfg->slots[fi].v.s != NULL;
    for (int c = cfg->nodes[n].first_child; c >= 0; c = cfg->nodes[c].next)
        if (node_has_value(cfg, c)) return true;
    return false;
}

static void pad(FILE *f, int col, int to) {
    do fputc(' ', f); while (++col < to);
}

static void print_node(const speed_config_t *cfg, int n, int indent, FILE *f) {
    for (int c = cfg->nodes[n].first_child; c >= 0; c = cfg->nodes[c].next) {
        const node_t *child = &cfg->nodes[c];
        bool has = node_has_value(cfg, c);
        int col = fprintf(f, "%*s%s%.*s:", indent, "", has ? "" : "# ", (int)child->len,
                          child->comp);
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

speed_status_t speed_config_print_help(const speed_config_field_t *fields, size_t n_fields,
                                       const char *env_prefix, FILE *f) {
    static const char *const type_names[] = {"INT", "NUM", "BOOL", "TEXT", "NAME"};
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
        if (fd->default_value)
            HELP_ITEM(fd->type == SPEED_CONFIG_STRING ? "default \"%s\"" : "default %s",
                      fd->default_value);
        if ((fd->type == SPEED_CONFIG_INT || fd->type == SPEED_CONFIG_DOUBLE) &&
            fd->min <= fd->max) {
            char lo[32], hi[32];
            format_bound(lo, sizeof lo, fd->type, fd->min);
            format_bound(hi, sizeof hi, fd->type, fd->max);
            HELP_ITEM("%s..%s", lo, hi);
        }
        if (env_prefix) {
            char *env = env_name(env_prefix, fd->name);
            if (env) HELP_ITEM("env %s", env);
            speed_free(env);
        }
#undef HELP_ITEM
        fprintf(f, "%s\n", open ? ")" : "");
    }
    fprintf(f, "  --config FILE");
    pad(f, 15, HELP_VALUE_COL);
    fprintf(f, "read settings from a YAML file%s%s%s\n", env_prefix ? " (env " : "",
            env_prefix ? env_prefix : "", env_prefix ? "CONFIG)" : "");
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
