/* Internal structures of speed_tokenizer. Not installed; not for other modules. */
#ifndef SPEED_TOK_INTERNAL_H
#define SPEED_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

/* ---- growable byte buffer ---------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
} tok_buf_t;

speed_status_t tok_buf_reserve(tok_buf_t *b, size_t extra);
speed_status_t tok_buf_append(tok_buf_t *b, const void *data, size_t n);
speed_status_t tok_buf_append_str(tok_buf_t *b, const char *s);
speed_status_t tok_buf_putc(tok_buf_t *b, char c);
void tok_buf_free(tok_buf_t *b);

speed_status_t tok_ids_push(speed_tok_ids_t *ids, int32_t id);

/* ---- plain spans (chat content) ------------------------------------------------------ */

/* Byte ranges [start, end) of a text where special added tokens are not matched (message
 * content inside a rendered chat); sorted, not overlapping. */
typedef struct {
    size_t start, end;
} tok_span_t;

typedef struct {
    tok_span_t *v;
    size_t n, cap;
} tok_spans_t;

speed_status_t tok_spans_push(tok_spans_t *sp, size_t start, size_t end);
void tok_spans_free(tok_spans_t *sp);

/* speed_tok_encode, except that a special added token overlapping one of plain[0..n_plain)
 * is not matched there (that text is encoded as text). Same returns. */
speed_status_t tok_encode_spans(const speed_tok_t *tok, const char *text, size_t len, bool add_special,
                                const tok_span_t *plain, size_t n_plain, speed_tok_ids_t *out);

/* ---- UTF-8 ------------------------------------------------------------------------- */

/* Length of the valid UTF-8 prefix: returns len if all valid. */
size_t tok_utf8_valid_prefix(const char *s, size_t len);
/* Length of the character starting at s[0] (1..4); assumes valid UTF-8. */
static inline size_t tok_utf8_char_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }
/* Decodes one character of valid UTF-8. */
uint32_t tok_utf8_decode(const char *s, size_t *n_p);
size_t tok_utf8_encode(uint32_t cp, char out[4]);
/* Appends s with invalid sequences replaced by U+FFFD, one per maximal subpart (the
 * Unicode "substitution of maximal subparts" practice, as Rust's from_utf8_lossy). */
speed_status_t tok_utf8_append_lossy(tok_buf_t *b, const char *s, size_t len);

/* ---- hash maps --------------------------------------------------------------------- */

uint64_t tok_hash_bytes(const void *p, size_t n);

/* ---- regex (PCRE2) ----------------------------------------------------------------- */

typedef struct {
    pcre2_code *fast; /* pattern with \s patched (exact unless the text has new letters) */
    pcre2_code *full; /* \s patched and \p{L}/\p{N} extended with Unicode 15-16 ranges */
} tok_regex_t;

/* A PCRE2 context whose memory comes from speed_malloc (NULL on failure). */
pcre2_general_context *tok_pcre2_context_create(void);

/* `path` only for messages. Returns OK, FORMAT (pattern does not compile), NO_MEMORY. */
speed_status_t tok_regex_compile(pcre2_general_context *gctx, const char *pattern, size_t len, bool literal,
                                 const char *path, tok_regex_t *re);
void tok_regex_free(tok_regex_t *re);
/* True if text contains a code point in the Unicode 15-16 L/N ranges. */
bool tok_text_needs_full_regex(const char *s, size_t len);

/* ---- tokenizer --------------------------------------------------------------------- */

enum {
    TOK_ENTRY_USED = 1,
    TOK_ENTRY_ADDED = 2,
    TOK_ENTRY_SPECIAL = 4,
};

typedef struct {
    uint32_t off, len; /* into tok->strs (NUL-terminated there) */
    uint8_t flags;
    int16_t byte; /* 0..255 for SentencePiece byte pieces <0xNN>, else -1 */
} tok_entry_t;

typedef struct {
    uint32_t off, len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} tok_added_t;

typedef enum { TOK_NORM_PREPEND, TOK_NORM_REPLACE } tok_norm_type_t;

typedef struct {
    tok_norm_type_t type;
    char *a, *b; /* PREPEND: a = text. REPLACE: a = pattern, b = content */
    size_t a_len, b_len;
} tok_norm_t;

typedef enum { TOK_PRE_SPLIT, TOK_PRE_BYTELEVEL, TOK_PRE_METASPACE } tok_pre_type_t;

typedef enum {
    TOK_SPLIT_ISOLATED,
    TOK_SPLIT_REMOVED,
    TOK_SPLIT_MERGED_PREV,
    TOK_SPLIT_MERGED_NEXT,
    TOK_SPLIT_CONTIGUOUS,
} tok_split_behavior_t;

typedef enum { TOK_PREPEND_ALWAYS, TOK_PREPEND_FIRST, TOK_PREPEND_NEVER } tok_prepend_t;

typedef struct {
    tok_pre_type_t type;
    tok_regex_t re;                /* SPLIT, and BYTELEVEL with use_regex */
    tok_split_behavior_t behavior; /* SPLIT */
    bool add_prefix_space;         /* BYTELEVEL */
    bool use_regex;                /* BYTELEVEL */
    char repl[8];                  /* METASPACE replacement character (UTF-8) */
    size_t repl_len;
    tok_prepend_t prepend; /* METASPACE */
    bool split;            /* METASPACE */
} tok_pre_t;

typedef enum {
    TOK_DEC_BYTELEVEL,
    TOK_DEC_REPLACE,
    TOK_DEC_BYTEFALLBACK,
    TOK_DEC_FUSE,
    TOK_DEC_STRIP,
    TOK_DEC_METASPACE,
} tok_dec_type_t;

typedef struct {
    tok_dec_type_t type;
    char *a, *b; /* REPLACE pattern/content; STRIP/METASPACE: a = character */
    size_t a_len, b_len;
    int start, stop; /* STRIP */
    bool prepend;    /* METASPACE: strip the leading replacement of the first token */
} tok_dec_t;

/* Merge pair (left id, right id) → rank and result id; open addressing. */
typedef struct {
    uint64_t key; /* (uint64)left << 32 | right; UINT64_MAX = empty */
    int32_t rank, id;
} tok_merge_slot_t;

struct speed_tok {
    /* strings of all entries and added tokens */
    char *strs;
    size_t strs_len, strs_cap;

    tok_entry_t *entries; /* [n_vocab] */
    int32_t n_vocab;

    /* model vocabulary: string → id (entries index); -1 = empty slot */
    int32_t *vocab_slots;
    uint32_t vocab_mask;

    tok_merge_slot_t *merge_slots;
    uint32_t merge_mask;
    size_t n_merges;

    /* BPE options */
    int32_t unk_id; /* -1 if none */
    bool fuse_unk, byte_fallback, ignore_merges;
    int32_t byte_piece_id[256]; /* <0xNN> ids for byte_fallback, -1 if absent */

    /* SentencePiece-style input (no pre-tokenizer) may be cut before every "▁" that
     * follows another character: no vocabulary string has such a pair inside it, so no
     * merge can cross the cut and BPE per part gives the same ids, much faster. */
    bool sp_split;

    /* byte level */
    bool byte_level;           /* a ByteLevel pre-tokenizer maps bytes to GPT-2 chars */
    int32_t byte_char_id[256]; /* id of the one-character token for each byte, or -1 */
    int32_t ascii_id[128];     /* non-byte-level: id of each one-byte character, or -1 */

    tok_added_t *added; /* sorted by first byte, then length descending */
    size_t n_added;
    uint32_t added_first[257]; /* added[added_first[c] .. added_first[c+1]) start with c */

    tok_norm_t *norms;
    size_t n_norms;
    tok_pre_t *pres;
    size_t n_pres;
    tok_dec_t *decs;
    size_t n_decs;
    bool has_decoder;

    int32_t prefix_ids[4], suffix_ids[4]; /* add_special */
    size_t n_prefix, n_suffix;

    int32_t bos_id;
    int32_t eos_ids[8];
    size_t n_eos;
    char *bos_text, *eos_text; /* for chat templates ("" if none) */

    speed_chat_template_t chat_template; /* effective template, AUTO = none */
    bool chat_honours_gen_prompt;        /* Llama 3: template tests add_generation_prompt */
    bool has_chat_template;              /* tokenizer_config.json had one (recognised or not) */

    pcre2_general_context *gctx;
};

/* strings / vocabulary */
static inline const char *tok_entry_str(const speed_tok_t *tok, int32_t id) { return tok->strs + tok->entries[id].off; }
int32_t tok_vocab_find(const speed_tok_t *tok, const char *s, size_t len);
int32_t tok_merge_find(const speed_tok_t *tok, int32_t a, int32_t b, int32_t *rank_p);

/* GPT-2 byte ↔ unicode map */
uint32_t tok_gpt2_byte_to_cp(unsigned char b);
int tok_gpt2_cp_to_byte(uint32_t cp); /* -1 if not in the map */

/* decode without the stream wrapper; raw keeps invalid UTF-8 as it is (no U+FFFD) */
speed_status_t tok_decode_buf(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip_special, bool raw,
                              tok_buf_t *out);

/* Python str.isspace() on a code point (Jinja |trim and .strip()). */
bool tok_py_isspace(uint32_t cp);

#endif /* SPEED_TOK_INTERNAL_H */
