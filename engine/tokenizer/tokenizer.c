/* speed_tok_load / destroy and the vocabulary accessors: reading tokenizer.json and
 * tokenizer_config.json into the immutable speed_tok_t. The BPE model and the added tokens
 * are read here; the normalizer, pre-tokenizer, decoder and post-processor in tok_pipeline.c;
 * tokenizer_config.json in tok_config.c. tok_loader.h is what they share. */
#include "tok_loader.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "file.h"
#include "log.h"

/* Logs "<file>: <message>" once and returns status. */
speed_status_t speed_tok_loader_fail(const tok_loader_t *ld, speed_status_t status, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    SPEED_ERROR(SPEED_SUBSYS_TOK, "%s: %s", ld->path, msg);
    return status;
}

speed_status_t speed_tok_loader_oom(const tok_loader_t *ld) {
    return speed_tok_loader_fail(ld, SPEED_ERR_NO_MEMORY, "out of memory while loading");
}

/* ---- files --------------------------------------------------------------------------- */

/* tokenizer.json of the largest vocabularies is ~20 MB; anything far beyond is not one. */
#define TOK_FILE_MAX_BYTES ((size_t)1 << 30)

/* Parses a JSON text that must hold an object; messages name ld->path. */
static speed_status_t json_parse(const tok_loader_t *ld, const char *text, size_t len, size_t flags, json_t **root_p) {
    json_error_t jerr;
    json_t *root = json_loadb(text, len, flags, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_out_of_memory) return speed_tok_loader_oom(ld);
        return speed_tok_loader_fail(ld, SPEED_ERR_PARSE, "invalid JSON at line %d column %d: %s", jerr.line,
                                     jerr.column, jerr.text);
    }
    if (!json_is_object(root)) {
        json_decref(root);
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "top level is not a JSON object");
    }
    *root_p = root;
    return SPEED_OK;
}

/* Reads and parses a JSON file. A missing file gives NOT_FOUND without a message when
 * `optional`, so the caller can decide. */
static speed_status_t json_read(const tok_loader_t *ld, bool optional, size_t flags, json_t **root_p) {
    char *text = NULL;
    size_t len = 0;
    speed_status_t st = speed_file_read(ld->path, TOK_FILE_MAX_BYTES, SPEED_SUBSYS_TOK,
                                        optional ? SPEED_FILE_READ_OPTIONAL : SPEED_FILE_READ_DEFAULT, &text, &len);
    if (st != SPEED_OK) return st;
    st = json_parse(ld, text, len, flags, root_p);
    speed_free(text);
    return st;
}

static speed_status_t path_join(const char *dir, const char *name, char **out_p) {
    *out_p = speed_path_join(dir, name);
    return *out_p ? SPEED_OK : SPEED_ERR_NO_MEMORY;
}

/* ---- JSON helpers ---------------------------------------------------------------------- */

/* Optional string member: absent or null → *s_p = NULL. Other types → FORMAT. */
speed_status_t speed_tok_json_str(const tok_loader_t *ld, const json_t *obj, const char *ctx, const char *key,
                                  const char **s_p, size_t *len_p) {
    json_t *v = json_object_get(obj, key);
    *s_p = NULL;
    if (len_p) *len_p = 0;
    if (!v || json_is_null(v)) return SPEED_OK;
    if (!json_is_string(v)) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "%s: \"%s\" must be a string", ctx, key);
    *s_p = json_string_value(v);
    if (len_p) *len_p = json_string_length(v);
    return SPEED_OK;
}

speed_status_t speed_tok_json_bool(const tok_loader_t *ld, const json_t *obj, const char *ctx, const char *key,
                                   bool dflt, bool *out_p) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        *out_p = dflt;
        return SPEED_OK;
    }
    if (!json_is_boolean(v))
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "%s: \"%s\" must be true or false", ctx, key);
    *out_p = json_is_true(v);
    return SPEED_OK;
}

const char *speed_tok_json_type(const json_t *obj) {
    json_t *t = json_object_get(obj, "type");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

/* Pattern objects: {"String": "..."} or {"Regex": "..."}. */
speed_status_t speed_tok_json_pattern(const tok_loader_t *ld, const json_t *obj, const char *ctx, const char **s_p,
                                      size_t *len_p, bool *regex_p) {
    json_t *p = json_object_get(obj, "pattern");
    json_t *v;
    if (json_is_object(p) && json_is_string(v = json_object_get(p, "String"))) {
        *regex_p = false;
    } else if (json_is_object(p) && json_is_string(v = json_object_get(p, "Regex"))) {
        *regex_p = true;
    } else {
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                     "%s: \"pattern\" must be {\"String\": ...} or "
                                     "{\"Regex\": ...}",
                                     ctx);
    }
    *s_p = json_string_value(v);
    *len_p = json_string_length(v);
    return SPEED_OK;
}

speed_status_t speed_tok_bytes_dup(const char *s, size_t len, char **out_p) {
    char *p = speed_malloc(len + 1);
    if (!p) return SPEED_ERR_NO_MEMORY;
    memcpy(p, s, len);
    p[len] = '\0';
    *out_p = p;
    return SPEED_OK;
}

/* ---- strings and entries ----------------------------------------------------------------- */

static speed_status_t strs_add(speed_tok_t *tok, const char *s, size_t len, uint32_t *off_p) {
    if (tok->strs_len + len + 1 > UINT32_MAX) return SPEED_ERR_NO_MEMORY;
    if (tok->strs_len + len + 1 > tok->strs_cap) {
        size_t cap = tok->strs_cap ? tok->strs_cap : 4096;
        while (cap < tok->strs_len + len + 1) cap *= 2;
        char *p = speed_realloc(tok->strs, cap);
        if (!p) return SPEED_ERR_NO_MEMORY;
        tok->strs = p;
        tok->strs_cap = cap;
    }
    *off_p = (uint32_t)tok->strs_len;
    if (len) memcpy(tok->strs + tok->strs_len, s, len);
    tok->strs[tok->strs_len + len] = '\0';
    tok->strs_len += len + 1;
    return SPEED_OK;
}

int32_t tok_vocab_find(const speed_tok_t *tok, const char *s, size_t len) {
    if (!tok->vocab_slots) return -1;
    uint32_t i = (uint32_t)tok_hash_bytes(s, len) & tok->vocab_mask;
    for (;;) {
        int32_t id = tok->vocab_slots[i];
        if (id < 0) return -1;
        const tok_entry_t *e = &tok->entries[id];
        if (e->len == len && memcmp(tok->strs + e->off, s, len) == 0) return id;
        i = (i + 1) & tok->vocab_mask;
    }
}

/* Inserts a model-vocabulary id (entry already filled). A duplicate string keeps the
 * first id. */
static void vocab_insert(speed_tok_t *tok, int32_t id) {
    const tok_entry_t *e = &tok->entries[id];
    const char *s = tok->strs + e->off;
    uint32_t i = (uint32_t)tok_hash_bytes(s, e->len) & tok->vocab_mask;
    for (;;) {
        int32_t cur = tok->vocab_slots[i];
        if (cur < 0) {
            tok->vocab_slots[i] = id;
            return;
        }
        const tok_entry_t *c = &tok->entries[cur];
        if (c->len == e->len && memcmp(tok->strs + c->off, s, e->len) == 0) return;
        i = (i + 1) & tok->vocab_mask;
    }
}

static inline uint32_t merge_hash(uint64_t key) { return (uint32_t)((key * 0x9E3779B97F4A7C15ULL) >> 32); }

int32_t tok_merge_find(const speed_tok_t *tok, int32_t a, int32_t b, int32_t *rank_p) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = merge_hash(key) & tok->merge_mask;
    for (;;) {
        const tok_merge_slot_t *s = &tok->merge_slots[i];
        if (s->key == key) {
            *rank_p = s->rank;
            return s->id;
        }
        if (s->key == UINT64_MAX) return -1;
        i = (i + 1) & tok->merge_mask;
    }
}

/* Later duplicates overwrite earlier ones, as in HF (the merges are collected into a map). */
static void merge_insert(speed_tok_t *tok, int32_t a, int32_t b, int32_t rank, int32_t id) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = merge_hash(key) & tok->merge_mask;
    for (;;) {
        tok_merge_slot_t *s = &tok->merge_slots[i];
        if (s->key == UINT64_MAX || s->key == key) {
            if (s->key == UINT64_MAX) tok->n_merges++;
            s->key = key;
            s->rank = rank;
            s->id = id;
            return;
        }
        i = (i + 1) & tok->merge_mask;
    }
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t c = 16;
    while (c < n) c *= 2;
    return c;
}

/* ---- model ----------------------------------------------------------------------------- */

/* Largest id in the model vocabulary and the added tokens, to size the entry table. */
static speed_status_t scan_ids(const tok_loader_t *ld, const json_t *vocab, const json_t *added, int64_t *max_p) {
    int64_t max = -1;
    const char *key;
    size_t klen;
    json_t *v;
    json_object_keylen_foreach((json_t *)vocab, key, klen, v) {
        (void)klen;
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= INT32_MAX)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                         "model.vocab: id of \"%s\" is not an integer in "
                                         "0..2^31-2",
                                         key);
        if (json_integer_value(v) > max) max = json_integer_value(v);
    }
    size_t i;
    json_array_foreach(added, i, v) {
        json_t *id = json_is_object(v) ? json_object_get(v, "id") : NULL;
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= INT32_MAX)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                         "added_tokens[%zu]: \"id\" must be an integer in "
                                         "0..2^31-2",
                                         i);
        if (json_integer_value(id) > max) max = json_integer_value(id);
    }
    if (max > (int64_t)16 << 20)
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "token id %lld is implausibly large", (long long)max);
    *max_p = max;
    return SPEED_OK;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static speed_status_t set_entry(speed_tok_t *tok, int32_t id, const char *s, size_t len, uint8_t flags) {
    tok_entry_t *e = &tok->entries[id];
    if (!(e->flags & TOK_ENTRY_USED) || e->len != len || memcmp(tok->strs + e->off, s, len)) {
        if (len > UINT32_MAX) return SPEED_ERR_NO_MEMORY;
        uint32_t off;
        SPEED_CHECK(strs_add(tok, s, len, &off));
        e->off = off;
        e->len = (uint32_t)len;
    }
    e->flags |= flags | TOK_ENTRY_USED;
    e->byte = -1;
    if (len == 6 && s[0] == '<' && s[1] == '0' && s[2] == 'x' && s[5] == '>' && hexval(s[3]) >= 0 && hexval(s[4]) >= 0)
        e->byte = (int16_t)(hexval(s[3]) * 16 + hexval(s[4]));
    return SPEED_OK;
}

static speed_status_t merge_parts(const tok_loader_t *ld, json_t *m, size_t i, const char **a_p, size_t *alen_p,
                                  const char **b_p, size_t *blen_p) {
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        size_t len = json_string_length(m);
        const char *sp = memchr(s, ' ', len);
        if (!sp || sp == s || sp == s + len - 1)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "model.merges[%zu]: \"%s\" is not \"left right\"", i, s);
        *a_p = s;
        *alen_p = (size_t)(sp - s);
        *b_p = sp + 1;
        *blen_p = len - *alen_p - 1;
        return SPEED_OK;
    }
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *a_p = json_string_value(json_array_get(m, 0));
        *alen_p = json_string_length(json_array_get(m, 0));
        *b_p = json_string_value(json_array_get(m, 1));
        *blen_p = json_string_length(json_array_get(m, 1));
        return SPEED_OK;
    }
    return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", i);
}

static speed_status_t load_model(const tok_loader_t *ld, const json_t *root) {
    speed_tok_t *tok = ld->tok;
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "no \"model\" object");
    const char *type = speed_tok_json_type(model);
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    if (!type && json_is_object(vocab) && json_is_array(merges)) type = "BPE";
    if (!type) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "model has no \"type\"");
    if (strcmp(type, "BPE") != 0)
        return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED, "model type \"%s\" is not supported (only BPE)", type);
    if (!json_is_object(vocab)) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "model.vocab is not an object");
    if (!json_is_array(merges)) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "model.merges is not an array");
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_null(added) && !json_is_array(added))
        return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "\"added_tokens\" is not an array");
    json_t *dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0.0)
        return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED, "BPE dropout is not supported");
    const char *s;
    size_t slen;
    SPEED_CHECK(speed_tok_json_str(ld, model, "model", "continuing_subword_prefix", &s, &slen));
    if (s && slen)
        return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED, "model.continuing_subword_prefix is not supported");
    SPEED_CHECK(speed_tok_json_str(ld, model, "model", "end_of_word_suffix", &s, &slen));
    if (s && slen) return speed_tok_loader_fail(ld, SPEED_ERR_UNSUPPORTED, "model.end_of_word_suffix is not supported");
    SPEED_CHECK(speed_tok_json_bool(ld, model, "model", "fuse_unk", false, &tok->fuse_unk));
    SPEED_CHECK(speed_tok_json_bool(ld, model, "model", "byte_fallback", false, &tok->byte_fallback));
    SPEED_CHECK(speed_tok_json_bool(ld, model, "model", "ignore_merges", false, &tok->ignore_merges));

    int64_t max_id = -1;
    SPEED_CHECK(scan_ids(ld, vocab, added, &max_id));
    tok->n_vocab = (int32_t)(max_id + 1);
    tok->entries = speed_calloc((size_t)tok->n_vocab + 1, sizeof *tok->entries);
    if (!tok->entries) return speed_tok_loader_oom(ld);

    size_t n_keys = json_object_size(vocab);
    tok->vocab_mask = pow2_at_least(n_keys * 2 + 1) - 1;
    tok->vocab_slots = speed_malloc(((size_t)tok->vocab_mask + 1) * sizeof *tok->vocab_slots);
    if (!tok->vocab_slots) return speed_tok_loader_oom(ld);
    memset(tok->vocab_slots, 0xff, ((size_t)tok->vocab_mask + 1) * sizeof *tok->vocab_slots);

    const char *key;
    size_t klen;
    json_t *v;
    json_object_keylen_foreach(vocab, key, klen, v) {
        int32_t id = (int32_t)json_integer_value(v);
        if (tok->entries[id].flags & TOK_ENTRY_USED)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "model.vocab: id %d is used twice", (int)id);
        if (set_entry(tok, id, key, klen, 0) != SPEED_OK) return speed_tok_loader_oom(ld);
        vocab_insert(tok, id);
    }

    /* merges */
    size_t n_merges = json_array_size(merges);
    if (n_merges > INT32_MAX / 2) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "too many merges");
    tok->merge_mask = pow2_at_least(n_merges * 2 + 1) - 1;
    tok->merge_slots = speed_malloc(((size_t)tok->merge_mask + 1) * sizeof *tok->merge_slots);
    if (!tok->merge_slots) return speed_tok_loader_oom(ld);
    for (size_t i = 0; i <= tok->merge_mask; i++) tok->merge_slots[i].key = UINT64_MAX;
    tok_buf_t cat = {0};
    speed_status_t st = SPEED_OK;
    size_t i;
    json_array_foreach(merges, i, v) {
        const char *a = NULL, *b = NULL;
        size_t alen = 0, blen = 0;
        SPEED_CHECK_GOTO(merge_parts(ld, v, i, &a, &alen, &b, &blen), st, merges_out);
        int32_t ia = tok_vocab_find(tok, a, alen), ib = tok_vocab_find(tok, b, blen);
        cat.len = 0;
        if (tok_buf_append(&cat, a, alen) != SPEED_OK || tok_buf_append(&cat, b, blen) != SPEED_OK) {
            st = speed_tok_loader_oom(ld);
            goto merges_out;
        }
        int32_t ic = tok_vocab_find(tok, cat.p, cat.len);
        if (ia < 0 || ib < 0 || ic < 0) {
            st = speed_tok_loader_fail(ld, SPEED_ERR_FORMAT,
                                       "model.merges[%zu]: \"%.*s\" + \"%.*s\": %s is not "
                                       "in the vocabulary",
                                       i, (int)alen, a, (int)blen, b,
                                       ia < 0   ? "the left part"
                                       : ib < 0 ? "the right part"
                                                : "the result");
            goto merges_out;
        }
        merge_insert(tok, ia, ib, (int32_t)i, ic);
    }
merges_out:
    tok_buf_free(&cat);
    SPEED_CHECK(st);

    /* unk */
    SPEED_CHECK(speed_tok_json_str(ld, model, "model", "unk_token", &s, &slen));
    tok->unk_id = -1;
    if (s) {
        tok->unk_id = tok_vocab_find(tok, s, slen);
        if (tok->unk_id < 0)
            return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "model.unk_token \"%s\" is not in the vocabulary", s);
    }
    return SPEED_OK;
}

/* ---- added tokens ------------------------------------------------------------------------ */

/* Insertion sort: qsort's comparator cannot take a context portably and a global would
 * make concurrent loads racy. Added-token lists are short (hundreds). */
static void added_sort(speed_tok_t *tok) {
    for (size_t i = 1; i < tok->n_added; i++) {
        tok_added_t x = tok->added[i];
        size_t j = i;
        while (j > 0) {
            const tok_added_t *y = &tok->added[j - 1];
            unsigned char cx = (unsigned char)tok->strs[x.off], cy = (unsigned char)tok->strs[y->off];
            bool before = cx < cy || (cx == cy && (x.len > y->len || (x.len == y->len && x.id < y->id)));
            if (!before) break;
            tok->added[j] = tok->added[j - 1];
            j--;
        }
        tok->added[j] = x;
    }
}

static speed_status_t load_added(const tok_loader_t *ld, const json_t *root) {
    speed_tok_t *tok = ld->tok;
    json_t *added = json_object_get(root, "added_tokens");
    size_t n = json_is_array(added) ? json_array_size(added) : 0;
    tok->added = speed_calloc(n ? n : 1, sizeof *tok->added);
    if (!tok->added) return speed_tok_loader_oom(ld);
    size_t i;
    json_t *v;
    json_array_foreach(added, i, v) {
        char ctx[48];
        snprintf(ctx, sizeof ctx, "added_tokens[%zu]", i);
        const char *content;
        size_t clen;
        SPEED_CHECK(speed_tok_json_str(ld, v, ctx, "content", &content, &clen));
        if (!content) return speed_tok_loader_fail(ld, SPEED_ERR_FORMAT, "%s has no \"content\"", ctx);
        tok_added_t a = {0};
        a.id = (int32_t)json_integer_value(json_object_get(v, "id"));
        SPEED_CHECK(speed_tok_json_bool(ld, v, ctx, "special", false, &a.special));
        SPEED_CHECK(speed_tok_json_bool(ld, v, ctx, "lstrip", false, &a.lstrip));
        SPEED_CHECK(speed_tok_json_bool(ld, v, ctx, "rstrip", false, &a.rstrip));
        SPEED_CHECK(speed_tok_json_bool(ld, v, ctx, "single_word", false, &a.single_word));
        SPEED_CHECK(speed_tok_json_bool(ld, v, ctx, "normalized", !a.special, &a.normalized));
        if (set_entry(tok, a.id, content, clen, TOK_ENTRY_ADDED | (a.special ? TOK_ENTRY_SPECIAL : 0)) != SPEED_OK)
            return speed_tok_loader_oom(ld);
        if (clen == 0) continue; /* an empty token can never be matched */
        a.off = tok->entries[a.id].off;
        a.len = (uint32_t)clen;
        tok->added[tok->n_added++] = a;
    }
    added_sort(tok);
    size_t k = 0;
    for (int c = 0; c < 256; c++) {
        tok->added_first[c] = (uint32_t)k;
        while (k < tok->n_added && (unsigned char)tok->strs[tok->added[k].off] == c) k++;
    }
    tok->added_first[256] = (uint32_t)k;
    return SPEED_OK;
}

/* ---- derived tables ------------------------------------------------------------------------ */

static void build_tables(speed_tok_t *tok) {
    for (int b = 0; b < 256; b++) {
        char u[4];
        size_t n = tok_utf8_encode(tok_gpt2_byte_to_cp((unsigned char)b), u);
        tok->byte_char_id[b] = tok_vocab_find(tok, u, n);
        char piece[7];
        snprintf(piece, sizeof piece, "<0x%02X>", b);
        tok->byte_piece_id[b] = tok_vocab_find(tok, piece, 6);
    }
    for (int c = 0; c < 128; c++) {
        char ch = (char)c;
        tok->ascii_id[c] = tok_vocab_find(tok, &ch, 1);
    }
}

/* See speed_tok.sp_split. */
static bool vocab_allows_sp_split(const speed_tok_t *tok) {
    if (tok->byte_level || tok->n_pres || tok->ignore_merges) return false;
    if (tok_vocab_find(tok, "\xE2\x96\x81", 3) < 0) return false;
    for (int32_t id = 0; id < tok->n_vocab; id++) {
        const tok_entry_t *e = &tok->entries[id];
        if (!(e->flags & TOK_ENTRY_USED)) continue;
        const char *s = tok->strs + e->off;
        for (uint32_t i = 1; i + 3 <= e->len; i++)
            if (memcmp(s + i, "\xE2\x96\x81", 3) == 0 && !(i >= 3 && memcmp(s + i - 3, "\xE2\x96\x81", 3) == 0))
                return false;
    }
    return true;
}

/* ---- load / destroy ------------------------------------------------------------------------ */

speed_tok_params_t speed_tok_default_params(void) {
    speed_tok_params_t p = {.chat_template = SPEED_CHAT_TEMPLATE_AUTO};
    return p;
}

/* The parameter check both entry points make. */
static speed_status_t tok_params_check(const speed_tok_params_t *params) {
    if ((unsigned)params->chat_template >= SPEED_CHAT_TEMPLATE_COUNT) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_load: invalid chat_template value %d", (int)params->chat_template);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    return SPEED_OK;
}

/* A new tokenizer with nothing loaded yet. */
static speed_status_t tok_new(const tok_loader_t *ld, speed_tok_t **tok_p) {
    speed_tok_t *tok = speed_calloc(1, sizeof *tok);
    if (!tok) return speed_tok_loader_oom(ld);
    tok->unk_id = tok->bos_id = -1;
    tok->gctx = tok_pcre2_context_create();
    if (!tok->gctx) {
        speed_tok_destroy(tok);
        return speed_tok_loader_oom(ld);
    }
    *tok_p = tok;
    return SPEED_OK;
}

/* Everything tokenizer.json's object holds (both entry points). */
static speed_status_t tok_load_root(const tok_loader_t *ld, const json_t *root) {
    SPEED_CHECK(load_model(ld, root));
    SPEED_CHECK(load_added(ld, root));
    SPEED_CHECK(speed_tok_normalizer_load(ld, json_object_get(root, "normalizer"), 0));
    SPEED_CHECK(speed_tok_pre_tokenizer_load(ld, json_object_get(root, "pre_tokenizer"), 0));
    SPEED_CHECK(speed_tok_decoder_load(ld, json_object_get(root, "decoder"), 0));
    SPEED_CHECK(speed_tok_post_processor_load(ld, json_object_get(root, "post_processor"), 0));
    build_tables(ld->tok);
    ld->tok->sp_split = vocab_allows_sp_split(ld->tok);
    return SPEED_OK;
}

/* model_max_length can be 1e30 (Llama 3), beyond int64: tokenizer_config.json's integers are
 * read as reals. */
#define TOK_CONFIG_JSON_FLAGS (JSON_DECODE_INT_AS_REAL | JSON_ALLOW_NUL)

speed_status_t speed_tok_load(const char *model_dir, const speed_tok_params_t *params, speed_tok_t **tok_p) {
    if (!model_dir || !tok_p) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_load: model_dir and tok_p must not be NULL");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_tok_params_t dflt = speed_tok_default_params();
    if (!params) params = &dflt;
    SPEED_CHECK(tok_params_check(params));
    speed_status_t st = SPEED_OK;
    char *path = NULL, *cfg_path = NULL;
    json_t *root = NULL, *cfg = NULL;
    tok_loader_t ld = {.path = model_dir};
    speed_tok_t *tok = NULL;
    if (path_join(model_dir, "tokenizer.json", &path) != SPEED_OK ||
        path_join(model_dir, "tokenizer_config.json", &cfg_path) != SPEED_OK) {
        st = speed_tok_loader_oom(&ld);
        goto fail;
    }
    ld.path = path;
    SPEED_CHECK_GOTO(tok_new(&ld, &tok), st, fail);
    ld.tok = tok;
    SPEED_CHECK_GOTO(json_read(&ld, false, JSON_ALLOW_NUL, &root), st, fail);
    SPEED_CHECK_GOTO(tok_load_root(&ld, root), st, fail);

    ld.path = cfg_path;
    st = json_read(&ld, true, TOK_CONFIG_JSON_FLAGS, &cfg);
    if (st == SPEED_ERR_NOT_FOUND) st = SPEED_OK;
    SPEED_CHECK_GOTO(st, st, fail);
    SPEED_CHECK_GOTO(speed_tok_config_load(&ld, cfg, params), st, fail);

    json_decref(root);
    json_decref(cfg);
    speed_free(path);
    speed_free(cfg_path);
    *tok_p = tok;
    return SPEED_OK;
fail:
    json_decref(root);
    json_decref(cfg);
    speed_free(path);
    speed_free(cfg_path);
    speed_tok_destroy(tok);
    return st;
}

speed_status_t speed_tok_load_memory(const char *tok_json, size_t tok_len, const char *cfg_json, size_t cfg_len,
                                     const speed_tok_params_t *params, speed_tok_t **tok_p) {
    if ((!tok_json && tok_len) || (!cfg_json && cfg_len) || !tok_p) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_load_memory: NULL text with a length, or NULL tok_p");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_tok_params_t dflt = speed_tok_default_params();
    if (!params) params = &dflt;
    SPEED_CHECK(tok_params_check(params));
    speed_status_t st = SPEED_OK;
    json_t *root = NULL, *cfg = NULL;
    tok_loader_t ld = {.path = "tokenizer.json (memory)"};
    speed_tok_t *tok = NULL;
    SPEED_CHECK_GOTO(tok_new(&ld, &tok), st, fail);
    ld.tok = tok;
    /* jansson reads a NULL text of length 0 as invalid JSON, as it reads an empty file */
    SPEED_CHECK_GOTO(json_parse(&ld, tok_json ? tok_json : "", tok_len, JSON_ALLOW_NUL, &root), st, fail);
    SPEED_CHECK_GOTO(tok_load_root(&ld, root), st, fail);
    ld.path = "tokenizer_config.json (memory)";
    if (cfg_json) SPEED_CHECK_GOTO(json_parse(&ld, cfg_json, cfg_len, TOK_CONFIG_JSON_FLAGS, &cfg), st, fail);
    SPEED_CHECK_GOTO(speed_tok_config_load(&ld, cfg, params), st, fail);
    json_decref(root);
    json_decref(cfg);
    *tok_p = tok;
    return SPEED_OK;
fail:
    json_decref(root);
    json_decref(cfg);
    speed_tok_destroy(tok);
    return st;
}

void speed_tok_destroy(speed_tok_t *tok) {
    if (!tok) return;
    for (size_t i = 0; i < tok->n_norms; i++) {
        speed_free(tok->norms[i].a);
        speed_free(tok->norms[i].b);
    }
    for (size_t i = 0; i < tok->n_pres; i++) tok_regex_free(&tok->pres[i].re);
    for (size_t i = 0; i < tok->n_decs; i++) {
        speed_free(tok->decs[i].a);
        speed_free(tok->decs[i].b);
    }
    speed_free(tok->norms);
    speed_free(tok->pres);
    speed_free(tok->decs);
    speed_free(tok->added);
    speed_free(tok->merge_slots);
    speed_free(tok->vocab_slots);
    speed_free(tok->entries);
    speed_free(tok->strs);
    speed_free(tok->bos_text);
    speed_free(tok->eos_text);
    pcre2_general_context_free(tok->gctx);
    speed_free(tok);
}

/* ---- accessors ------------------------------------------------------------------------------ */

int32_t speed_tok_vocab_size(const speed_tok_t *tok) { return tok ? tok->n_vocab : 0; }

int32_t speed_tok_bos_id(const speed_tok_t *tok) { return tok ? tok->bos_id : -1; }

size_t speed_tok_eos_ids(const speed_tok_t *tok, const int32_t **ids_p) {
    if (!tok) {
        if (ids_p) *ids_p = NULL;
        return 0;
    }
    if (ids_p) *ids_p = tok->eos_ids;
    return tok->n_eos;
}

const char *speed_tok_token_text(const speed_tok_t *tok, int32_t id) {
    if (!tok || id < 0 || id >= tok->n_vocab || !(tok->entries[id].flags & TOK_ENTRY_USED)) return NULL;
    return tok_entry_str(tok, id);
}

bool speed_tok_is_special(const speed_tok_t *tok, int32_t id) {
    return tok && id >= 0 && id < tok->n_vocab && (tok->entries[id].flags & TOK_ENTRY_SPECIAL);
}

speed_chat_template_t speed_tok_chat_template(const speed_tok_t *tok) {
    return tok ? tok->chat_template : SPEED_CHAT_TEMPLATE_AUTO;
}
