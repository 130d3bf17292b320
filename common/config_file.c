/* The YAML config file: speed_config_file_load (see config_internal.h).
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
#include "config_internal.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <cyaml/cyaml.h>
#include <yaml.h>

#include "alloc.h"

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
static speed_status_t scan_yaml(const char *path, const char *buf, size_t len, key_lines_t *kl) {
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
                const yaml_mark_t *m = parser.problem_mark.line || parser.problem_mark.column ? &parser.problem_mark
                                                                                              : &parser.context_mark;
                CONFIG_ERROR("config file %s:%zu:%zu: malformed YAML: %s%s%s", path, m->line + 1, m->column + 1,
                             parser.problem ? parser.problem : "syntax error", parser.context ? " " : "",
                             parser.context ? parser.context : "");
                st = SPEED_ERR_PARSE;
            }
            break;
        }
        int line = (int)ev.start_mark.line + 1;
        /* frames past the stack (overflow) are only counted: no key lines in there */
        frame_t *top = depth > 0 && !overflow ? &stack[depth - 1] : NULL;
        bool is_key = top && top->is_map && top->want_key;
        switch (ev.type) {
        case YAML_STREAM_END_EVENT: done = true; break;
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
            bool recordable = (!top) || (top->is_map && !top->want_key && top->recordable && have_pending_key);
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
        default: break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&parser);
    return st;
}

/* cyaml's log lines, kept to compose one message of our own. */
typedef struct {
    char first[256];             /* first error line, without the "Load: " prefix */
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
static speed_status_t report_cyaml_error(const speed_config_t *cfg, const char *path, cyaml_err_t err,
                                         const cyaml_capture_t *cap, const key_lines_t *kl) {
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
        int parent = plen ? speed_config_node_for_path(cfg, cap->path) : 0;
        const char *near = NULL;
        size_t best = (size_t)-1;
        if (parent >= 0) {
            for (int c = cfg->nodes[parent].first_child; c >= 0; c = cfg->nodes[c].next) {
                char comp[NAME_MAX_LEN + 1];
                snprintf(comp, sizeof comp, "%.*s", (int)cfg->nodes[c].len, cfg->nodes[c].comp);
                if (speed_config_name_is_near(bad, strlen(bad), comp, &best)) near = cfg->nodes[c].comp;
            }
        }
        int dotted = strchr(bad, '.') ? speed_config_node_for_path(cfg, key) : -1;
        if (dotted >= 0 && cfg->nodes[dotted].field >= 0) {
            CONFIG_ERROR("config file %s: unknown key '%s' (a dotted name is a nested "
                         "mapping in YAML: '%.*s:' with '%s:' indented under it)",
                         where, key, (int)strcspn(bad, "."), bad, strrchr(bad, '.') + 1);
        } else if (near) {
            int nlen = (int)strcspn(near, ".");
            CONFIG_ERROR("config file %s: unknown key '%s' (did you mean '%s%s%.*s'?)", where, key, cap->path,
                         plen ? "." : "", nlen, near);
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
            CONFIG_ERROR("config file %s: the document must be a mapping of keys, not %s", where, event_noun(got));
        } else {
            int n = speed_config_node_for_path(cfg, key);
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
    return err == CYAML_ERR_LIBYAML_PARSER || err == CYAML_ERR_INVALID_ALIAS ? SPEED_ERR_PARSE
                                                                             : SPEED_ERR_INVALID_ARGUMENT;
}

/* Fill the cyaml mapping schema of tree node `n`: n_children + 1 entries taken from *pool
 * (nested mappings follow, depth first), keys copied NUL-terminated into *keys. */
static void build_schema(const speed_config_t *cfg, int n, cyaml_schema_field_t **pool, char **keys,
                         uint32_t data_size) {
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

speed_status_t speed_config_file_load(speed_config_t *cfg, const char *path) {
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
    cyaml_err_t err = cyaml_load_data((const uint8_t *)buf, len, &ccfg, &root, (cyaml_data_t **)&data, NULL);
    if (err != CYAML_OK) {
        data = NULL;
        st = report_cyaml_error(cfg, path, err, &cap, &kl);
        goto out;
    }
    st = SPEED_OK;
    for (size_t i = 0; data && i < cfg->n_fields; i++) {
        if (!data[i]) continue;
        int line = key_line(&kl, cfg->fields[i].name);
        char *origin =
            line ? speed_config_str_printf("file:%s:%d", path, line) : speed_config_str_printf("file:%s", path);
        if (!origin) {
            st = SPEED_ERR_NO_MEMORY;
            break;
        }
        st = speed_config_value_set(cfg, i, data[i], SPEED_CONFIG_SOURCE_FILE, NULL, origin);
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
