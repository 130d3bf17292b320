/* speed_tokenizer: Hugging Face tokenizer.json (BPE) and chat templates, in C.
 *
 * Supported: byte-level BPE with regex pre-tokenization (Llama 3, GPT-2, Qwen2,
 * SmolLM) and SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama,
 * Mistral). See README.md in this folder for the exact list and known divergences.
 *
 * Threading: a speed_tok_t is immutable after speed_tok_load returns; every function
 * taking a `const speed_tok_t *` may be called from any number of threads at once.
 * A speed_tok_stream_t belongs to one sequence and must not be shared between threads.
 *
 * Memory: all heap memory comes from speed_malloc (common/alloc.h). Strings returned
 * through `char **text_p` are owned by the caller and released with speed_free.
 *
 * Errors: every failing call logs one line (subsystem "tok", readable afterwards with
 * speed_log_last_error) where the error is detected, and returns a status:
 *   SPEED_ERR_INVALID_ARGUMENT  bad argument (NULL, invalid UTF-8 text, id out of range,
 *                               chat roles that a template rejects)
 *   SPEED_ERR_NOT_FOUND         a required file is missing
 *   SPEED_ERR_PARSE             a file is not valid JSON
 *   SPEED_ERR_FORMAT            valid JSON that is not a usable tokenizer file
 *   SPEED_ERR_UNSUPPORTED       a model/normalizer/pre-tokenizer/decoder type or chat
 *                               template this library does not implement
 *   SPEED_ERR_NO_MEMORY         an allocation failed (nothing is leaked)
 *   SPEED_ERR_IO                reading or writing a file failed
 *   SPEED_ERR_TOO_LONG          a file is larger than 1 GiB (no real tokenizer file is)
 * Output parameters are only written on SPEED_OK, except that an appending encode may
 * have appended nothing (it restores `out->n` on failure).
 */
#ifndef SPEED_TOKENIZER_H
#define SPEED_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct speed_tok speed_tok_t; /* immutable after load; encode/decode thread-safe */

/* ---- parameters -------------------------------------------------------------------- */

typedef enum {
    SPEED_CHAT_TEMPLATE_AUTO = 0, /* recognise tokenizer_config.json's chat_template */
    SPEED_CHAT_TEMPLATE_LLAMA3,   /* <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> */
    SPEED_CHAT_TEMPLATE_LLAMA2,   /* <s>[INST] <<SYS>>...<</SYS>> ... [/INST] ... </s> */
    SPEED_CHAT_TEMPLATE_CHATML,   /* <|im_start|>role\n...<|im_end|>\n */
    SPEED_CHAT_TEMPLATE_COUNT
} speed_chat_template_t;

typedef struct {
    speed_chat_template_t chat_template; /* AUTO = recognise tokenizer_config's template */
} speed_tok_params_t;

speed_tok_params_t speed_tok_default_params(void);

/* The templates' names in enum order, NULL-terminated: "auto", "llama3", "llama2", "chatml".
 * A config ENUM field (config.h) takes them as its enum_names, and its stored index is then
 * the speed_chat_template_t. Adding a template adds its name here (chat_template.c) only. */
extern const char *const speed_chat_template_names[SPEED_CHAT_TEMPLATE_COUNT + 1];

/* One of speed_chat_template_names (case-sensitive). Unknown name →
 * SPEED_ERR_INVALID_ARGUMENT (logged, listing the valid names). */
speed_status_t speed_chat_template_parse(const char *name, speed_chat_template_t *out_p);
/* Static string; "unknown" for values outside the enum. */
const char *speed_chat_template_name(speed_chat_template_t t);

/* ---- lifecycle --------------------------------------------------------------------- */

/* Reads model_dir/tokenizer.json (required) and model_dir/tokenizer_config.json
 * (optional: bos/eos tokens, add_bos_token/add_eos_token, chat_template).
 * params may be NULL (defaults). On success *tok_p owns a new tokenizer.
 * Returns SPEED_OK, INVALID_ARGUMENT, NOT_FOUND (no tokenizer.json), IO, PARSE,
 * FORMAT, UNSUPPORTED or NO_MEMORY; every error message names the file. */
speed_status_t speed_tok_load(const char *model_dir, const speed_tok_params_t *params, speed_tok_t **tok_p);
/* The same load from texts in memory: tok_json is tokenizer.json's text (tok_len bytes, need
 * not be NUL-terminated), cfg_json tokenizer_config.json's (NULL: absent). Messages name
 * "tokenizer.json (memory)" / "tokenizer_config.json (memory)". Returns as speed_tok_load, but
 * never NOT_FOUND or IO. Nothing is retained from either text. For tests and fuzzing. */
speed_status_t speed_tok_load_memory(const char *tok_json, size_t tok_len, const char *cfg_json, size_t cfg_len,
                                     const speed_tok_params_t *params, speed_tok_t **tok_p);
void speed_tok_destroy(speed_tok_t *tok); /* NULL ok */

/* ---- vocabulary -------------------------------------------------------------------- */

int32_t speed_tok_vocab_size(const speed_tok_t *tok); /* max id + 1 incl. added tokens */
int32_t speed_tok_bos_id(const speed_tok_t *tok);     /* -1 if none */
/* End-of-sequence ids: eos_token plus the end-of-turn tokens the vocabulary has
 * (<|eot_id|>, <|eom_id|>, <|im_end|>, <|end_of_text|>, <|endoftext|>), no duplicates.
 * *ids_p points into the tokenizer (valid until destroy). Returns the count (may be 0). */
size_t speed_tok_eos_ids(const speed_tok_t *tok, const int32_t **ids_p);
/* Raw vocabulary string of an id (e.g. "Ġthe", "▁the", "<0x0A>", "<|eot_id|>"),
 * NUL-terminated, owned by the tokenizer. NULL if out of range or unassigned. */
const char *speed_tok_token_text(const speed_tok_t *tok, int32_t id);
/* The id of a token given by its exact vocabulary string (added tokens first),
 * or -1. `len` is the byte length of `text`. */
int32_t speed_tok_token_id(const speed_tok_t *tok, const char *text, size_t len);
/* True if the id is an added token marked "special" (skipped by skip_special). */
bool speed_tok_is_special(const speed_tok_t *tok, int32_t id);

/* ---- encode / decode --------------------------------------------------------------- */

typedef struct {
    int32_t *ids;
    size_t n, cap;
} speed_tok_ids_t;                             /* zero-init; free with speed_tok_ids_free */
void speed_tok_ids_free(speed_tok_ids_t *ids); /* frees the array and zeroes the struct */

/* Tokenises text[0..len) (UTF-8; may contain NUL) and appends the ids to *out.
 * Added/special tokens written literally in the text become their ids. add_special adds
 * what the post-processor / tokenizer_config asks for (Llama 2: BOS; Llama 3: nothing).
 * Returns SPEED_OK, INVALID_ARGUMENT (NULL arguments, invalid UTF-8: the message gives
 * the byte offset) or NO_MEMORY; on error *out keeps its previous ids. */
speed_status_t speed_tok_encode(const speed_tok_t *tok, const char *text, size_t len, bool add_special,
                                speed_tok_ids_t *out);

/* Decodes ids into a new NUL-terminated UTF-8 string (*len_p excludes the NUL; len_p
 * may be NULL). skip_special drops added tokens marked special. Invalid byte sequences
 * (e.g. half of a multi-byte character) become U+FFFD. The caller speed_free()s *text_p.
 * Returns SPEED_OK, INVALID_ARGUMENT (an id < 0 or >= vocab size) or NO_MEMORY. */
speed_status_t speed_tok_decode(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip_special, char **text_p,
                                size_t *len_p);

/* The same, but the bytes are kept as the tokens spell them: a token that holds part of a
 * multi-byte character gives those bytes, not U+FFFD (so *bytes_p may not be valid UTF-8; it
 * is still NUL-terminated). For logprobs, whose `bytes` are a token's own bytes. Same
 * returns. */
speed_status_t speed_tok_decode_raw(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip_special,
                                    char **bytes_p, size_t *len_p);

/* ---- incremental decoding ---------------------------------------------------------- */

/* Incremental decoder: push ids one at a time and get the new text. It never emits part
 * of a UTF-8 character (it waits for the rest), and the concatenation of all pushes plus
 * the final flush equals speed_tok_decode of all ids. One per sequence; not thread-safe. */
typedef struct speed_tok_stream speed_tok_stream_t;

/* Returns SPEED_OK, INVALID_ARGUMENT or NO_MEMORY. The stream keeps a pointer to tok,
 * which must outlive it. */
speed_status_t speed_tok_stream_create(const speed_tok_t *tok, bool skip_special, speed_tok_stream_t **s_p);
void speed_tok_stream_destroy(speed_tok_stream_t *s); /* NULL ok */
/* Adds one id; *text_p and *len_p receive the text that became final (possibly empty, never
 * NULL), owned by the stream and valid until the next call on it.
 * Returns SPEED_OK, INVALID_ARGUMENT (id out of range; the stream is unchanged) or
 * NO_MEMORY. */
speed_status_t speed_tok_stream_push(speed_tok_stream_t *s, int32_t id, const char **text_p, size_t *len_p);
/* Returns the text still held back (an incomplete character at the end becomes U+FFFD)
 * and resets the stream for a new sequence. Same ownership and returns as push. */
speed_status_t speed_tok_stream_flush(speed_tok_stream_t *s, const char **text_p, size_t *len_p);

/* ---- chat templates ---------------------------------------------------------------- */

typedef struct {
    const char *role;    /* "system", "user", "assistant", ... */
    const char *content; /* UTF-8, NUL-terminated */
} speed_chat_message_t;

/* Renders messages as the tokenizer's chat template would (the built-in equivalent of
 * its Jinja template); the text includes special-token strings such as <s> or
 * <|begin_of_text|> and should be encoded with add_special = false.
 * add_generation_prompt appends the assistant header (Llama 3, ChatML) when the template
 * supports it. The caller speed_free()s *text_p.
 * Returns SPEED_OK; UNSUPPORTED if the tokenizer has no recognised template and
 * params.chat_template named none; INVALID_ARGUMENT for NULL roles/contents or a
 * conversation the template rejects (Llama 2: roles must alternate user/assistant after
 * an optional system message); NO_MEMORY. */
speed_status_t speed_tok_chat_render(const speed_tok_t *tok, const speed_chat_message_t *msgs, size_t n_msgs,
                                     bool add_generation_prompt, char **text_p);
/* Renders messages (as speed_tok_chat_render) and tokenizes the text in one step, appending
 * to *out. The template's own markup is matched for special tokens; message content is
 * encoded as text: a special-token string written in a message ("<|eot_id|>") gives the
 * ids of its characters, never the control id, so content cannot forge a turn. With
 * content_specials true, content is matched like the markup (speed_tok_encode of the
 * rendered text). Content without special-token strings gives the same ids either way.
 * Non-special added tokens are matched everywhere. Returns as speed_tok_chat_render plus
 * speed_tok_encode's INVALID_ARGUMENT for invalid UTF-8; on error *out keeps its ids. */
speed_status_t speed_tok_chat_encode(const speed_tok_t *tok, const speed_chat_message_t *msgs, size_t n_msgs,
                                     bool add_generation_prompt, bool content_specials, speed_tok_ids_t *out);

/* The template in effect: params.chat_template if not AUTO, else the family recognised
 * in tokenizer_config.json, else SPEED_CHAT_TEMPLATE_AUTO (= none usable). */
speed_chat_template_t speed_tok_chat_template(const speed_tok_t *tok);

/* ---- generated tokenizer ----------------------------------------------------------- */

/* Writes out_dir/tokenizer.json and out_dir/tokenizer_config.json (out_dir must exist):
 * a byte-level BPE in the Llama 3 layout (GPT-2 byte map, Llama 3 Split regex +
 * ByteLevel, merges learned deterministically from an English sample built into the
 * library) with exactly n_vocab ids: 256 byte tokens, learned merges, the special tokens
 * <|begin_of_text|> <|end_of_text|> <|start_header_id|> <|end_header_id|> <|eot_id|>,
 * and <|reserved_special_token_N|> padding if the sample runs out of merges.
 * Encoding with add_special prepends <|begin_of_text|>; the config has a Llama 3 chat
 * template. Output is byte-for-byte deterministic for a given n_vocab.
 * Returns SPEED_OK, INVALID_ARGUMENT (n_vocab < SPEED_TOK_DEFAULT_MIN_VOCAB or
 * > SPEED_TOK_DEFAULT_MAX_VOCAB), IO or NO_MEMORY. */
#define SPEED_TOK_DEFAULT_N_VOCAB   512
#define SPEED_TOK_DEFAULT_MIN_VOCAB 261 /* 256 bytes + 5 special tokens */
#define SPEED_TOK_DEFAULT_MAX_VOCAB 1048576
speed_status_t speed_tok_write_default(const char *out_dir, int32_t n_vocab);

#endif /* SPEED_TOKENIZER_H */
