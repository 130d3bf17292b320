/* Fuzzes tokenizer loading (engine/tokenizer: tokenizer.json's model, added tokens,
 * normalizer, pre-tokenizer, decoder and post-processor; tokenizer_config.json's tokens and
 * chat template) through speed_tok_load_memory, then uses what loaded: encodes a fixed text
 * (every id in range), decodes the ids again, streams them, renders a short chat.
 *
 * Input: byte 0 even — the rest is tokenizer.json, with no config; odd — the rest is
 * tokenizer_config.json beside a small fixed tokenizer.json. */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "fuzz_util.h"
#include "tokenizer.h"

/* A byte-level BPE in the Llama 3 layout, small enough to load per input. */
static const char k_tok_json[] =
    "{\"version\":\"1.0\",\"added_tokens\":["
    "{\"id\":10,\"content\":\"<|begin_of_text|>\",\"special\":true},"
    "{\"id\":11,\"content\":\"<|eot_id|>\",\"special\":true}],"
    "\"normalizer\":null,"
    "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":true},"
    "\"post_processor\":null,\"decoder\":{\"type\":\"ByteLevel\"},"
    "\"model\":{\"type\":\"BPE\",\"vocab\":{\"h\":0,\"e\":1,\"l\":2,\"o\":3,\"\\u0120\":4,\"he\":5,\"ll\":6,"
    "\"hell\":7,\"hello\":8,\"w\":9},\"merges\":[\"h e\",\"l l\",\"he ll\",\"hell o\"]}}";

static const char k_text[] = "hello w\xc3\xa9 <|eot_id|> 12 \xf0\x9f\xa6\x99\n\t";

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

static void use(const speed_tok_t *tok) {
    int32_t n_vocab = speed_tok_vocab_size(tok);
    FZ_ASSERT(n_vocab >= 1);
    FZ_ASSERT(speed_tok_bos_id(tok) >= -1 && speed_tok_bos_id(tok) < n_vocab);
    const int32_t *eos = NULL;
    size_t n_eos = speed_tok_eos_ids(tok, &eos);
    for (size_t i = 0; i < n_eos; i++) FZ_ASSERT(eos[i] >= 0 && eos[i] < n_vocab);

    speed_tok_ids_t ids = {0};
    if (speed_tok_encode(tok, k_text, sizeof k_text - 1, true, &ids) == SPEED_OK) {
        for (size_t i = 0; i < ids.n; i++) FZ_ASSERT(ids.ids[i] >= 0 && ids.ids[i] < n_vocab);
        char *text = NULL;
        size_t len = 0;
        if (speed_tok_decode(tok, ids.ids, ids.n, false, &text, &len) == SPEED_OK) {
            FZ_ASSERT(text[len] == '\0');
            speed_free(text);
        }
        speed_tok_stream_t *s = NULL;
        if (speed_tok_stream_create(tok, true, &s) == SPEED_OK) {
            const char *piece;
            size_t n;
            for (size_t i = 0; i < ids.n; i++)
                if (speed_tok_stream_push(s, ids.ids[i], &piece, &n) != SPEED_OK) break;
            (void)speed_tok_stream_flush(s, &piece, &n);
            speed_tok_stream_destroy(s);
        }
    }
    speed_tok_ids_free(&ids);
    /* ids the vocabulary may not hold: decode refuses or skips them, never reads past the table */
    int32_t odd[] = {0, n_vocab - 1, n_vocab, -1, 10, 11};
    char *text = NULL;
    size_t len = 0;
    if (speed_tok_decode(tok, odd, 6, true, &text, &len) == SPEED_OK) speed_free(text);
    for (int32_t id = 0; id < n_vocab && id < 64; id++) {
        const char *t = speed_tok_token_text(tok, id);
        if (t) (void)speed_tok_token_id(tok, t, strlen(t)); /* t may hold a NUL: no id promised */
    }
    speed_chat_message_t msgs[] = {{"system", "be brief"}, {"user", "hello"}, {"assistant", "hi"}, {"user", "w"}};
    char *chat = NULL;
    if (speed_tok_chat_render(tok, msgs, 4, true, &chat) == SPEED_OK) speed_free(chat);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *rest = (const char *)data + 1;
    speed_tok_t *tok = NULL;
    speed_status_t st;
    if (data[0] & 1)
        st = speed_tok_load_memory(k_tok_json, sizeof k_tok_json - 1, rest, size - 1, NULL, &tok);
    else
        st = speed_tok_load_memory(rest, size - 1, NULL, 0, NULL, &tok);
    if (st == SPEED_OK) {
        use(tok);
        speed_tok_destroy(tok);
    } else {
        FZ_ASSERT(!tok);
    }
    return 0;
}
