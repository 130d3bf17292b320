/* Private to the config engine (config.c, config_file.c, config_print.c); not an API.
 *
 * The loaded speed_config_t: one slot per field (its value and origin) and the tree of
 * names that dotted field names make (node 0 is the root mapping). config.c owns both and
 * the value parser every source goes through; config_file.c reads the YAML file into the
 * slots and config_print.c writes them back out.
 */
#ifndef SPEED_CONFIG_INTERNAL_H
#define SPEED_CONFIG_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "log.h"

#define CONFIG_ERROR(...) SPEED_ERROR(SPEED_SUBSYS_CORE, __VA_ARGS__)

/* Longest accepted name (field, option or key path) and nesting depth. */
enum { NAME_MAX_LEN = 255, DEPTH_MAX = 32 };


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
    const char *origin; /* static text or origin_owned */
    char *origin_owned;
} slot_t;

/* Tree of names: node 0 is the root mapping; a node is a leaf (field >= 0) or a mapping. */
typedef struct {
    const char *comp; /* name component, points into the field table */
    size_t len;
    int field;                         /* leaf: field index; mapping: -1 */
    int first_child, last_child, next; /* -1 = none */
    int n_children;
} node_t;

struct speed_config {
    const speed_config_field_t *fields;
    size_t n_fields;
    slot_t *slots; /* [n_fields] */
    node_t *nodes; /* [n_nodes] */
    int n_nodes;
    char **positional; /* [n_positional + 1], NULL-terminated */
    int n_positional;
    char *file;
    const char *env_prefix; /* as given to load (static text of the caller), or NULL */
    bool help, print;
};

/* ---- config.c ---------------------------------------------------------------------- */

/* Is `cand` close enough to `typed` to suggest ("did you mean")? Keeps the closest in
 * *best_p: true when cand is closer than every earlier candidate. */
bool speed_config_name_is_near(const char *typed, size_t typed_len, const char *cand, size_t *best_p);

/* Environment name: prefix + NAME with '.' and '-' as '_'. speed_malloc'd; NULL on failure. */
char *speed_config_env_name(const char *prefix, const char *name);

/* printf into a speed_malloc'd string; NULL on failure. */
char *speed_config_str_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Node for a dotted key path (exact YAML spelling), or -1. */
int speed_config_node_for_path(const speed_config_t *cfg, const char *path);

/* A bound as text: an integer for INT fields, %g otherwise. */
void speed_config_bound_format(char *buf, size_t size, speed_config_type_t type, double x);

/* Shortest %g text that reads back as the same double, with a fraction or exponent. */
void speed_config_double_format(char *buf, size_t size, double v);

/* Parse `text` for field i and store it, with its origin (origin_owned, if not NULL, is
 * consumed, also on failure). Errors are logged with the origin. Returns SPEED_OK,
 * SPEED_ERR_INVALID_ARGUMENT (does not parse, out of bounds, not an enum name) or
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_config_value_set(speed_config_t *cfg, size_t i, const char *text, speed_config_source_t source,
                                      const char *origin, char *origin_owned);

/* ---- config_file.c ----------------------------------------------------------------- */

/* Read the YAML file at `path` into cfg's slots (origin "file:PATH:LINE"). Returns
 * SPEED_OK, or the codes speed_config_load documents for the file (NOT_FOUND, IO, PARSE,
 * INVALID_ARGUMENT, NO_MEMORY), logged once. */
speed_status_t speed_config_file_load(speed_config_t *cfg, const char *path);

#endif /* SPEED_CONFIG_INTERNAL_H */
