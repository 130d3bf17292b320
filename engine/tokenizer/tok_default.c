/* speed_tok_write_default: a small byte-level BPE tokenizer in the Llama 3 layout,
 * trained deterministically on an English sample kept in this file. Used for generated
 * test models that need a real tokenizer but no download. */
#include "tok_internal.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "log.h"

#define LLAMA3_REGEX                                                            \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?" \
    "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/* Same text as the Llama 3 tokenizer_config.json, so AUTO recognises it. */
#define LLAMA3_CHAT_TEMPLATE                                                                   \
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "    \
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | " \
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"   \
    "{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"

static const char *const special_tokens[] = {
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
};
#define N_SPECIAL 5

/* Training text: plain English with the usual punctuation, digits and line breaks. */
static const char sample_text[] =
    "The old lighthouse stood at the end of the harbour wall, and every evening the keeper "
    "climbed the ninety-two steps to light the lamp. She had done it for twenty years. The "
    "town below was small: a bakery, a post office, two churches, a school, and a market "
    "that opened on Saturdays when the weather was kind.\n\n"
    "People said the sea was quieter in the morning. Fishermen left before the sun came up, "
    "and they came back in the afternoon with their boats low in the water. Children waited "
    "on the pier to see what they had caught. Some days it was cod and mackerel; other days "
    "it was nothing at all, and the men walked home without a word.\n\n"
    "In the spring of that year a young engineer arrived with a suitcase, a notebook and a "
    "small computer. He had been sent to measure the wind and the waves, because the council "
    "wanted to know whether a new breakwater would protect the harbour from the winter "
    "storms. He asked questions about everything. How high did the water rise in March? "
    "Which way did the wind blow before a storm? Why was the bell on the church rung twice "
    "at noon?\n\n"
    "The keeper answered what she could. \"The water rises to the third ring on the wall,\" "
    "she told him, \"and when the wind turns to the north you have about six hours.\" He "
    "wrote it all down. In the evenings he worked in the back room of the inn, writing "
    "programs that read the numbers from his instruments and turned them into tables and "
    "graphs. The innkeeper thought he was strange, but he paid on time and he was polite.\n\n"
    "By the summer he understood the harbour better than anyone who had lived there all "
    "their life. He knew that the current moved faster near the rocks, that the sand shifted "
    "after every storm, and that the old wall was already breaking in three places. He "
    "explained this at a meeting in the school hall. About forty people came. Some of them "
    "listened carefully; others did not believe that a machine could tell them anything "
    "about their own sea.\n\n"
    "\"We have been here for three hundred years,\" said one of the fishermen. \"The wall has "
    "always held.\" The engineer showed them a picture of the cracks, taken at low tide in "
    "June. Then he showed them the numbers: the height of the waves, the speed of the wind, "
    "the days when the water had come over the top. The room was quiet for a long time.\n\n"
    "In the end the council voted to build the new breakwater. The work started in "
    "September and took almost two years. Trucks carried stone from the quarry in the "
    "hills, and a crane stood on the pier like a tall grey bird. The keeper watched from "
    "the top of the lighthouse, and sometimes she brought tea to the workers when the "
    "weather was cold.\n\n"
    "When it was finished, the first winter storm came in the middle of the night. The "
    "wind was stronger than anyone could remember, and the waves were higher than the "
    "houses. But the new wall held, and in the morning the boats were still in the harbour, "
    "safe and dry. The engineer had already left for another town, another coast, another "
    "set of questions. He sent a letter in the new year. The keeper kept it in the drawer "
    "of her desk, next to the logbook, where she wrote down the weather every day at six "
    "o'clock: wind, waves, clouds, rain, and the light that she still climbed up to tend.\n\n"
    "Questions and answers are how we learn. What is the time? It is 10:45 in the morning. "
    "How many steps are there? There are 92 steps, and it takes about 3 minutes to climb "
    "them. Where is the key? It's in the box by the door. We'll see you tomorrow, and we're "
    "sure you'll like it. I'm happy to help; you've been very kind. They'd like some more "
    "bread, please.\n";

/* ---- training ------------------------------------------------------------------------- */

typedef struct {
    int32_t *sym; /* symbol ids */
    size_t n;
    int64_t count; /* occurrences in the sample */
} word_t;

typedef struct {
    tok_buf_t *str; /* [n_tok] mapped strings */
    size_t n_tok, cap_tok;
    int32_t (*merges)[2];
    size_t n_merges, cap_merges;
    word_t *words;
    size_t n_words;
} trainer_t;

typedef struct {
    uint64_t key;
    int64_t count;
} pair_slot_t;

typedef struct {
    size_t off, len;
} span_t;

static int span_cmp_text(const char *text, const span_t *a, const span_t *b) {
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(text + a->off, text + b->off, n);
    if (c) return c;
    return a->len < b->len ? -1 : a->len > b->len;
}

/* Merge sort of spans by text (qsort has no context argument). */
static void span_sort(const char *text, span_t *v, span_t *tmp, size_t n) {
    if (n < 2) return;
    size_t h = n / 2;
    span_sort(text, v, tmp, h);
    span_sort(text, v + h, tmp, n - h);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n) tmp[k++] = span_cmp_text(text, &v[i], &v[j]) <= 0 ? v[i++] : v[j++];
    while (i < h) tmp[k++] = v[i++];
    while (j < n) tmp[k++] = v[j++];
    memcpy(v, tmp, n * sizeof *v);
}

static speed_status_t add_token(trainer_t *t, const char *s, size_t len, int32_t *id_p) {
    for (size_t i = 0; i < t->n_tok; i++) {
        if (t->str[i].len == len && memcmp(t->str[i].p, s, len) == 0) {
            *id_p = (int32_t)i;
            return SPEED_OK;
        }
    }
    if (t->n_tok == t->cap_tok) {
        size_t cap = t->cap_tok ? t->cap_tok * 2 : 512;
        tok_buf_t *p = speed_realloc(t->str, cap * sizeof *p);
        if (!p) return SPEED_ERR_NO_MEMORY;
        memset(p + t->cap_tok, 0, (cap - t->cap_tok) * sizeof *p);
        t->str = p;
        t->cap_tok = cap;
    }
    SPEED_CHECK(tok_buf_append(&t->str[t->n_tok], s, len));
    *id_p = (int32_t)t->n_tok++;
    return SPEED_OK;
}

static void trainer_cleanup(trainer_t *t) {
    for (size_t i = 0; i < t->cap_tok; i++) tok_buf_free(&t->str[i]);
    speed_free(t->str);
    speed_free(t->merges);
    for (size_t i = 0; i < t->n_words; i++) speed_free(t->words[i].sym);
    speed_free(t->words);
}

/* Splits the sample with the Llama 3 regex into unique words with counts. */
static speed_status_t collect_words(trainer_t *t) {
    speed_status_t st = SPEED_OK;
    pcre2_general_context *g = tok_pcre2_context_create();
    tok_regex_t re = {0};
    pcre2_match_data *md = NULL;
    span_t *spans = NULL, *tmp = NULL;
    size_t n = 0, cap = 0, len = sizeof sample_text - 1;
    if (!g) return SPEED_ERR_NO_MEMORY;
    SPEED_CHECK_GOTO(tok_regex_compile(g, LLAMA3_REGEX, strlen(LLAMA3_REGEX), false, "default tokenizer", &re), st,
                     out);
    md = pcre2_match_data_create(1, g);
    if (!md) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    for (size_t start = 0; start < len;) {
        int rc = pcre2_match(re.fast, (PCRE2_SPTR)sample_text, len, start, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc < 0) break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        if (ov[1] == ov[0]) {
            start = ov[0] + 1;
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 1024;
            span_t *p = speed_realloc(spans, cap * sizeof *p);
            if (!p) {
                st = SPEED_ERR_NO_MEMORY;
                goto out;
            }
            spans = p;
        }
        spans[n++] = (span_t){ov[0], ov[1] - ov[0]};
        start = ov[1];
    }
    tmp = speed_malloc((n ? n : 1) * sizeof *tmp);
    t->words = speed_calloc(n ? n : 1, sizeof *t->words);
    if (!tmp || !t->words) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    span_sort(sample_text, spans, tmp, n);
    for (size_t i = 0; i < n; i++) {
        if (t->n_words && span_cmp_text(sample_text, &spans[i], &spans[i - 1]) == 0) {
            t->words[t->n_words - 1].count++;
            continue;
        }
        word_t *w = &t->words[t->n_words++];
        w->count = 1;
        w->sym = speed_malloc(spans[i].len * sizeof *w->sym);
        if (!w->sym) {
            st = SPEED_ERR_NO_MEMORY;
            goto out;
        }
        for (size_t k = 0; k < spans[i].len; k++)
            w->sym[w->n++] = (unsigned char)sample_text[spans[i].off + k]; /* id = byte */
    }
out:
    pcre2_match_data_free(md);
    tok_regex_free(&re);
    pcre2_general_context_free(g);
    speed_free(spans);
    speed_free(tmp);
    return st;
}

/* Most frequent adjacent pair (ties: smallest left id, then right id); 0 if none. */
static int64_t best_pair(trainer_t *t, pair_slot_t *slots, uint32_t mask, int32_t *a_p, int32_t *b_p) {
    memset(slots, 0xff, ((size_t)mask + 1) * sizeof *slots);
    int64_t best = 0;
    uint64_t best_key = UINT64_MAX;
    for (size_t w = 0; w < t->n_words; w++) {
        const word_t *wd = &t->words[w];
        for (size_t i = 0; i + 1 < wd->n; i++) {
            uint64_t key = (uint64_t)(uint32_t)wd->sym[i] << 32 | (uint32_t)wd->sym[i + 1];
            uint32_t h = (uint32_t)((key * 0x9E3779B97F4A7C15ULL) >> 32) & mask;
            while (slots[h].key != key && slots[h].key != UINT64_MAX) h = (h + 1) & mask;
            if (slots[h].key == UINT64_MAX) {
                slots[h].key = key;
                slots[h].count = 0;
            }
            slots[h].count += wd->count;
            if (slots[h].count > best || (slots[h].count == best && key < best_key)) {
                best = slots[h].count;
                best_key = key;
            }
        }
    }
    *a_p = (int32_t)(best_key >> 32);
    *b_p = (int32_t)(best_key & 0xffffffffu);
    return best;
}

static speed_status_t train(trainer_t *t, size_t n_tokens_max) {
    speed_status_t st = SPEED_OK;
    for (int b = 0; b < 256; b++) {
        char u[4];
        int32_t id;
        size_t n = tok_utf8_encode(tok_gpt2_byte_to_cp((unsigned char)b), u);
        SPEED_CHECK(add_token(t, u, n, &id));
    }
    SPEED_CHECK(collect_words(t));
    size_t total = 0;
    for (size_t w = 0; w < t->n_words; w++) total += t->words[w].n;
    uint32_t mask = 16;
    while (mask < total * 2) mask *= 2;
    mask--;
    pair_slot_t *slots = speed_malloc(((size_t)mask + 1) * sizeof *slots);
    if (!slots) return SPEED_ERR_NO_MEMORY;
    tok_buf_t cat = {0};
    while (t->n_tok < n_tokens_max) {
        int32_t a, b, c;
        if (best_pair(t, slots, mask, &a, &b) < 2) break; /* a pair seen once is noise */
        cat.len = 0;
        SPEED_CHECK_GOTO(tok_buf_append(&cat, t->str[a].p, t->str[a].len), st, out);
        SPEED_CHECK_GOTO(tok_buf_append(&cat, t->str[b].p, t->str[b].len), st, out);
        SPEED_CHECK_GOTO(add_token(t, cat.p, cat.len, &c), st, out);
        if (t->n_merges == t->cap_merges) {
            size_t cap = t->cap_merges ? t->cap_merges * 2 : 256;
            int32_t(*m)[2] = speed_realloc(t->merges, cap * sizeof *m);
            if (!m) {
                st = SPEED_ERR_NO_MEMORY;
                goto out;
            }
            t->merges = m;
            t->cap_merges = cap;
        }
        t->merges[t->n_merges][0] = a;
        t->merges[t->n_merges][1] = b;
        t->n_merges++;
        for (size_t w = 0; w < t->n_words; w++) {
            word_t *wd = &t->words[w];
            size_t o = 0;
            for (size_t i = 0; i < wd->n; i++) {
                if (i + 1 < wd->n && wd->sym[i] == a && wd->sym[i + 1] == b) {
                    wd->sym[o++] = c;
                    i++;
                } else {
                    wd->sym[o++] = wd->sym[i];
                }
            }
            wd->n = o;
        }
    }
out:
    tok_buf_free(&cat);
    speed_free(slots);
    return st;
}

/* ---- writing ----------------------------------------------------------------------------- */

static json_t *added_token_json(int32_t id, const char *content) {
    return json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", (int)id, "content", content, "single_word", 0,
                     "lstrip", 0, "rstrip", 0, "normalized", 0, "special", 1);
}

static json_t *build_tokenizer_json(const trainer_t *t, int32_t n_vocab) {
    json_t *vocab = json_object(), *merges = json_array(), *added = json_array();
    json_t *root = NULL;
    if (!vocab || !merges || !added) goto fail;
    for (size_t i = 0; i < t->n_tok; i++)
        if (json_object_setn_new(vocab, t->str[i].p, t->str[i].len, json_integer((json_int_t)i))) goto fail;
    tok_buf_t line = {0};
    for (size_t i = 0; i < t->n_merges; i++) {
        const tok_buf_t *a = &t->str[t->merges[i][0]], *b = &t->str[t->merges[i][1]];
        line.len = 0;
        if (tok_buf_append(&line, a->p, a->len) || tok_buf_putc(&line, ' ') || tok_buf_append(&line, b->p, b->len) ||
            json_array_append_new(merges, json_stringn(line.p, line.len))) {
            tok_buf_free(&line);
            goto fail;
        }
    }
    tok_buf_free(&line);
    int32_t id = (int32_t)t->n_tok;
    for (size_t i = 0; i < N_SPECIAL; i++, id++)
        if (json_array_append_new(added, added_token_json(id, special_tokens[i]))) goto fail;
    for (int32_t r = 0; id < n_vocab; r++, id++) {
        char name[48];
        snprintf(name, sizeof name, "<|reserved_special_token_%d|>", (int)r);
        if (json_array_append_new(added, added_token_json(id, name))) goto fail;
    }
    int bos = (int)t->n_tok;
    root = json_pack("{s:s, s:n, s:n, s:O, s:n,"
                     " s:{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b, s:b}]},"
                     " s:{s:s, s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}], s:[{s:{s:s, s:i}}, {s:{s:s, s:i}},"
                     "    {s:{s:s, s:i}}, {s:{s:s, s:i}}], s:{s:{s:s, s:[i], s:[s]}}},"
                     " s:{s:s, s:b, s:b, s:b},"
                     " s:{s:s, s:n, s:n, s:n, s:n, s:b, s:b, s:b, s:O, s:O}}",
                     "version", "1.0", "truncation", "padding", "added_tokens", added, "normalizer", "pre_tokenizer",
                     "type", "Sequence", "pretokenizers", "type", "Split", "pattern", "Regex", LLAMA3_REGEX, "behavior",
                     "Isolated", "invert", 0, "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1,
                     "use_regex", 0, "post_processor", "type", "TemplateProcessing", "single", "SpecialToken", "id",
                     special_tokens[0], "type_id", 0, "Sequence", "id", "A", "type_id", 0, "pair", "SpecialToken", "id",
                     special_tokens[0], "type_id", 0, "Sequence", "id", "A", "type_id", 0, "SpecialToken", "id",
                     special_tokens[0], "type_id", 1, "Sequence", "id", "B", "type_id", 1, "special_tokens",
                     special_tokens[0], "id", special_tokens[0], "ids", bos, "tokens", special_tokens[0], "decoder",
                     "type", "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1, "use_regex", 1, "model", "type",
                     "BPE", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", 0,
                     "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab, "merges", merges);
fail:
    json_decref(vocab);
    json_decref(merges);
    json_decref(added);
    return root;
}

static json_t *build_config_json(int32_t n_vocab) {
    return json_pack("{s:s, s:s, s:b, s:s, s:i, s:s, s:s, s:i}", "bos_token", special_tokens[0], "eos_token",
                     special_tokens[1], "clean_up_tokenization_spaces", 0, "chat_template", LLAMA3_CHAT_TEMPLATE,
                     "model_max_length", 8192, "tokenizer_class", "PreTrainedTokenizerFast", "generated_by",
                     "speed_tok_write_default", "n_vocab", (int)n_vocab);
}

/* Writes via a temporary file and rename, so readers never see half a file. */
static speed_status_t write_json(const char *dir, const char *name, json_t *root) {
    char path[4096], tmp[4096 + 8];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "%s/%s: path too long", dir, name);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (json_dump_file(root, tmp, JSON_INDENT(1)) != 0) {
        int e = errno;
        remove(tmp);
        SPEED_ERROR(SPEED_SUBSYS_TOK, "%s: cannot write: %s", tmp, e ? strerror(e) : "write failed");
        return SPEED_ERR_IO;
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        remove(tmp);
        SPEED_ERROR(SPEED_SUBSYS_TOK, "%s: cannot rename into place: %s", path, strerror(e));
        return SPEED_ERR_IO;
    }
    return SPEED_OK;
}

speed_status_t speed_tok_write_default(const char *out_dir, int32_t n_vocab) {
    if (!out_dir) {
        SPEED_ERROR(SPEED_SUBSYS_TOK, "speed_tok_write_default: out_dir is NULL");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (n_vocab < SPEED_TOK_DEFAULT_MIN_VOCAB || n_vocab > SPEED_TOK_DEFAULT_MAX_VOCAB) {
        SPEED_ERROR(SPEED_SUBSYS_TOK,
                    "default tokenizer: n_vocab %d is out of range: it needs "
                    "at least %d (256 byte tokens + %d special tokens) and at most %d",
                    (int)n_vocab, SPEED_TOK_DEFAULT_MIN_VOCAB, N_SPECIAL, SPEED_TOK_DEFAULT_MAX_VOCAB);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    trainer_t t = {0};
    json_t *tj = NULL, *cj = NULL;
    speed_status_t st = train(&t, (size_t)n_vocab - N_SPECIAL);
    if (st == SPEED_OK) {
        tj = build_tokenizer_json(&t, n_vocab);
        cj = build_config_json(n_vocab);
        if (!tj || !cj) st = SPEED_ERR_NO_MEMORY;
    }
    if (st == SPEED_ERR_NO_MEMORY) SPEED_ERROR(SPEED_SUBSYS_TOK, "out of memory generating the default tokenizer");
    if (st == SPEED_OK) st = write_json(out_dir, "tokenizer.json", tj);
    if (st == SPEED_OK) st = write_json(out_dir, "tokenizer_config.json", cj);
    json_decref(tj);
    json_decref(cj);
    trainer_cleanup(&t);
    return st;
}
