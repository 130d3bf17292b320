/* Declarative configuration for daemons and speedctl.
 *
 * A program describes its settings once, in a table of speed_config_field_t (name, type,
 * default, bounds, doc, offset into the program's own struct). speed_config_load then fills
 * the struct from four sources, each overriding the one before:
 *
 *   1. the default in the table            (origin "default")
 *   2. a YAML file                         (origin "file:PATH:LINE")
 *   3. the environment, SPEED_<NAME>       (origin "env:SPEED_KV_BLOCK_TOKENS")
 *   4. the command line, --name value      (origin "cli")
 *
 * Every source goes through the same text parser and bounds check, so "threads: 0" in the
 * file, SPEED_THREADS=0 and --threads 0 are rejected with the same message. A value that
 * is invalid is an error even when a later source would override it.
 *
 * Names. A field name is a YAML key; a dotted name ("kv.block_tokens") is a key inside a
 * nested mapping ("kv:" then "  block_tokens:"), to any depth. Names use [a-z0-9_] per
 * component. On the command line '-' and '_' are interchangeable (--kv.block-tokens).
 * The environment variable is the prefix plus the name upper-cased with '.' and '-' turned
 * into '_' (SPEED_KV_BLOCK_TOKENS). Environment variables that match no field are ignored
 * (several programs share the SPEED_ prefix); unknown YAML keys and unknown options are
 * errors.
 *
 * Reserved options, handled by speed_config_load itself and not allowed as field names:
 *   --config FILE    load FILE as the YAML source (also <prefix>CONFIG in the environment;
 *                    the command line wins). Without it no file is read.
 *   --print-config   sets speed_config_print_requested(); the program prints
 *                    speed_config_print() to stdout and exits 0.
 *   --help, -h       sets speed_config_help_requested(); the program prints
 *                    speed_config_print_help() and exits 0.
 *   --               ends the options; everything after it is positional.
 * The library never prints to stdout and never exits: the program decides.
 *
 * Command line forms: "--name value", "--name=value"; for BOOL fields "--name" (true),
 * "--no-name" (false) and "--name=VALUE". A value after "--name" is taken verbatim even if
 * it starts with '-' ("--bias -1"). Arguments not starting with '-' (and a lone "-") are
 * positional and kept in order (speed_config_positional), so options and positionals may be
 * mixed: `speedctl inspect DIR --prefill-layers 0.75`.
 *
 * Value syntax (all sources):
 *   INT     decimal int64 with optional sign, e.g. "-3", "+16"; no trailing characters
 *   DOUBLE  strtod syntax, finite (no nan/inf)
 *   BOOL    true/false, yes/no, on/off, 1/0 (any case)
 *   STRING  any text; in YAML any scalar (quote it to keep leading/trailing spaces)
 *   ENUM    one of enum_names (any case); stored as the index into enum_names
 *   SECRET  as STRING, but not from the command line (an error naming the alternatives)
 *
 * Errors are logged once (SPEED_SUBSYS_CORE, one line naming the field and source) where
 * they are found; speed_log_last_error() returns the line for a CLI to show.
 *
 * Thread-safety: speed_config_load reads the environment (getenv), so call it before other
 * threads modify the environment; otherwise functions are reentrant and a loaded
 * speed_config_t may be read from any thread. Nothing here blocks except file reads.
 */
#ifndef SPEED_CONFIG_H
#define SPEED_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "status.h"

typedef enum {
    SPEED_CONFIG_INT,    /* stored as int64_t */
    SPEED_CONFIG_DOUBLE, /* stored as double */
    SPEED_CONFIG_BOOL,   /* stored as bool */
    SPEED_CONFIG_STRING, /* stored as char *, owned by the speed_config_t (NULL if unset) */
    SPEED_CONFIG_ENUM,   /* stored as int: index into enum_names */
    SPEED_CONFIG_SECRET, /* a STRING that is a secret (an API key): refused on the command
                          * line (argv is readable by every user of the host, in ps and
                          * /proc), accepted from the file and the environment, printed as
                          * SPEED_CONFIG_REDACTED by speed_config_print when set (and its
                          * default by speed_config_print_help), never logged */
} speed_config_type_t;

/* Where a field's value came from. */
typedef enum {
    SPEED_CONFIG_SOURCE_DEFAULT = 0,
    SPEED_CONFIG_SOURCE_FILE,
    SPEED_CONFIG_SOURCE_ENV,
    SPEED_CONFIG_SOURCE_CLI,
} speed_config_source_t;

typedef struct {
    const char *name; /* "threads", or dotted "kv.block_tokens" */
    speed_config_type_t type;
    size_t offset;                 /* offsetof(the program's struct, member) */
    const char *default_value;     /* as text, parsed like any source; NULL = unset. NULL is
                                  allowed only for STRING (the member stays NULL) */
    double min, max;               /* inclusive bounds for INT and DOUBLE; min > max = unbounded */
    const char *const *enum_names; /* ENUM only: NULL-terminated list of names */
    const char *doc;               /* one line for --help */
} speed_config_field_t;

/* What speed_config_print writes in place of a secret value that is set. */
#define SPEED_CONFIG_REDACTED "<redacted>"

/* Bounds helper for fields without bounds: .min = 1, .max = 0 (min > max). */
#define SPEED_CONFIG_UNBOUNDED 1, 0

typedef struct speed_config speed_config_t;

/* Parse all sources and fill `out_struct`.
 *
 * fields, n_fields  the table; it must stay valid while the speed_config_t lives.
 * out_struct        the program's struct; written only on success (all fields at once).
 * argc, argv        the command line; argv[0] is skipped (program or verb name). argv must
 *                   stay valid while the speed_config_t lives (positionals point into it).
 *                   argc may be 0 (argv may then be NULL).
 * env_prefix        e.g. "SPEED_"; NULL disables the environment (including <prefix>CONFIG).
 * cfg_p             receives the loaded config on success, NULL on failure. The STRING
 *                   members of out_struct point into it: keep it alive while the struct is
 *                   used, then speed_config_destroy() it.
 *
 * Returns:
 *   SPEED_OK                    loaded (check speed_config_help_requested/print_requested)
 *   SPEED_ERR_INVALID_ARGUMENT  unknown option or YAML key, missing value after an option,
 *                               a value of the wrong shape (e.g. a list in YAML) or that does
 *                               not parse, is out of bounds or is not one of the enum names;
 *                               also a broken table (bad name, duplicate, reserved name,
 *                               invalid default)
 *   SPEED_ERR_PARSE             the config file is not well-formed YAML
 *   SPEED_ERR_NOT_FOUND         the config file does not exist
 *   SPEED_ERR_IO                the config file could not be read
 *   SPEED_ERR_NO_MEMORY         an allocation failed
 * On failure nothing is leaked and out_struct is untouched. */
speed_status_t speed_config_load(const speed_config_field_t *fields, size_t n_fields, void *out_struct, int argc,
                                 char **argv, const char *env_prefix, speed_config_t **cfg_p);

/* Free the config and every string it owns (the STRING members of the filled struct
 * dangle afterwards). NULL is a no-op. */
void speed_config_destroy(speed_config_t *cfg);

/* Positional arguments in command-line order; *argv_p points to an array owned by cfg
 * (entries point into the argv given to load). Returns the count. */
int speed_config_positional(const speed_config_t *cfg, char *const **argv_p);

/* --help / -h, --print-config were given. */
bool speed_config_help_requested(const speed_config_t *cfg);
bool speed_config_print_requested(const speed_config_t *cfg);

/* The config file that was loaded, or NULL. Owned by cfg. */
const char *speed_config_file(const speed_config_t *cfg);

/* Where the field `name` got its value. Returns SPEED_ERR_NOT_FOUND for an unknown name.
 * origin text: "default", "file:PATH:LINE", "env:SPEED_NAME" or "cli"; owned by cfg. Either
 * output pointer may be NULL. */
speed_status_t speed_config_origin(const speed_config_t *cfg, const char *name, speed_config_source_t *source_p,
                                   const char **origin_p);

/* Write the effective configuration as YAML, one "key: value  # origin" line per field,
 * nested mappings for dotted names. The output is itself a valid config file that loads
 * to the same values, except secrets that are set: those read <redacted>. STRING fields that are unset (NULL) are written as comments.
 * Returns SPEED_ERR_IO if writing to `f` failed. */
speed_status_t speed_config_print(const speed_config_t *cfg, FILE *f);

/* Write --help text generated from the table: one entry per field with its type, default,
 * bounds or choices, environment variable and doc. env_prefix as for load (may be NULL).
 * Returns SPEED_ERR_IO if writing to `f` failed. */
speed_status_t speed_config_print_help(const speed_config_field_t *fields, size_t n_fields, const char *env_prefix,
                                       FILE *f);

/* Text → value parsers used for every source, reusable elsewhere. They do not log.
 * Return SPEED_OK, or SPEED_ERR_PARSE if the whole text is not a valid value (overflow of
 * int64 included); *value_p is written only on success. */
speed_status_t speed_config_parse_int(const char *text, int64_t *value_p);
speed_status_t speed_config_parse_double(const char *text, double *value_p);
speed_status_t speed_config_parse_bool(const char *text, bool *value_p);
/* names: NULL-terminated; comparison ignores case. */
speed_status_t speed_config_parse_enum(const char *text, const char *const *names, int *index_p);

#endif /* SPEED_CONFIG_H */
