/* Loading a tokenizer: what tokenizer.c, tok_pipeline.c and tok_config.c share. Private to
 * speed_tokenizer; not an API. The load itself is speed_tok_load (tokenizer.c), which reads
 * tokenizer.json (the model and added tokens there, the other steps in tok_pipeline.c) and
 * then tokenizer_config.json (tok_config.c). Every function logs its failure once, naming
 * the file, and returns FORMAT for a file that is not as expected, UNSUPPORTED for a
 * feature this tokenizer lacks, NO_MEMORY for an allocation that failed. */
#ifndef SPEED_TOK_LOADER_H
#define SPEED_TOK_LOADER_H

#include <jansson.h>

#include "tok_internal.h"


typedef struct {
    speed_tok_t *tok;
    const char *path; /* file being read, for messages */
} tok_loader_t;

/* ---- tokenizer.c: messages and JSON helpers ---------------------------------------- */

/* Logs "<file>: <message>" once and returns status. */
__attribute__((format(printf, 3, 4))) speed_status_t speed_tok_loader_fail(const tok_loader_t *ld,
                                                                           speed_status_t status, const char *fmt, ...);
/* speed_tok_loader_fail with NO_MEMORY and "out of memory while loading". */
speed_status_t speed_tok_loader_oom(const tok_loader_t *ld);

/* Optional string member: absent or null → *s_p = NULL. Other types → FORMAT. */
speed_status_t speed_tok_json_str(const tok_loader_t *ld, const json_t *obj, const char *ctx, const char *key,
                                  const char **s_p, size_t *len_p);
/* Optional boolean member: absent or null → dflt. Other types → FORMAT. */
speed_status_t speed_tok_json_bool(const tok_loader_t *ld, const json_t *obj, const char *ctx, const char *key,
                                   bool dflt, bool *out_p);
/* The "type" member if it is a string, else NULL. */
const char *speed_tok_json_type(const json_t *obj);
/* Pattern objects: {"String": "..."} or {"Regex": "..."}; otherwise FORMAT. */
speed_status_t speed_tok_json_pattern(const tok_loader_t *ld, const json_t *obj, const char *ctx, const char **s_p,
                                      size_t *len_p, bool *regex_p);
/* A speed_malloc'd NUL-terminated copy of s[0, len). OK or NO_MEMORY (not logged). */
speed_status_t speed_tok_bytes_dup(const char *s, size_t len, char **out_p);

/* ---- tok_pipeline.c ------------------------------------------------------------------ */

/* Each reads one member of tokenizer.json (NULL or null = none) into ld->tok, depth counting
 * nested Sequences. */
speed_status_t speed_tok_normalizer_load(const tok_loader_t *ld, const json_t *n, int depth);
speed_status_t speed_tok_pre_tokenizer_load(const tok_loader_t *ld, const json_t *p, int depth);
speed_status_t speed_tok_decoder_load(const tok_loader_t *ld, const json_t *d, int depth);
speed_status_t speed_tok_post_processor_load(const tok_loader_t *ld, const json_t *pp, int depth);

/* ---- tok_config.c -------------------------------------------------------------------- */

/* Applies tokenizer_config.json (cfg; NULL when the file is absent) after tokenizer.json:
 * bos/eos ids and texts, add_bos_token/add_eos_token, the chat template (params may force
 * one). Needs the vocabulary, added tokens and post-processor loaded. */
speed_status_t speed_tok_config_load(const tok_loader_t *ld, const json_t *cfg, const speed_tok_params_t *params);

#endif /* SPEED_TOK_LOADER_H */
