/* speedctl loadgen's prompts: text of a wanted token count (loadgen.h). Words are drawn from a
 * seed, so that prompts of different requests differ from their first word on (no accidental
 * shared prefix for a prefix cache to find); with a tokenizer the text is adjusted until the
 * server would count exactly the wanted number of tokens. */
#include "loadgen.h"

#include <stdio.h>
#include <string.h>

#include "alloc.h"

/* Short common words: in the vocabularies of real models most are one token each (with their
 * leading space), which makes --words-per-token 1 a fair guess without a tokenizer. */
static const char *const words[] = {
    "time",  "year",   "people",  "way",     "day",     "man",       "thing",   "woman",      "life",     "child",
    "world", "school", "state",   "family",  "group",   "country",   "problem", "hand",       "part",     "place",
    "case",  "week",   "company", "system",  "program", "question",  "work",    "government", "number",   "night",
    "point", "home",   "water",   "room",    "mother",  "area",      "money",   "story",      "fact",     "month",
    "lot",   "right",  "study",   "book",    "eye",     "job",       "word",    "business",   "issue",    "side",
    "kind",  "head",   "house",   "service", "friend",  "father",    "power",   "hour",       "game",     "line",
    "end",   "member", "law",     "car",     "city",    "name",      "team",    "minute",     "idea",     "kid",
    "body",  "back",   "parent",  "face",    "others",  "level",     "office",  "door",       "health",   "person",
    "art",   "war",    "history", "party",   "result",  "change",    "morning", "reason",     "research", "girl",
    "guy",   "moment", "air",     "teacher", "force",   "education", "good",    "new",        "first",    "last",
    "long",  "great",  "little",  "own",     "other",   "old",       "big",     "high",       "small",    "large",
    "next",  "early",  "young",   "few",     "public",  "bad",       "same",    "able",       "make",     "know",
    "take",  "see",    "come",    "think",   "look",    "want",      "give",    "use",        "find",     "tell",
    "ask",   "seem",   "feel",    "try",     "leave",   "call",      "keep",    "let",        "begin",    "show",
    "hear",  "play",   "run",     "move",    "like",    "live",      "hold",    "bring",      "write",    "stand",
    "lose",  "pay",    "meet",    "set",     "learn",   "lead",      "read",    "grow",       "open",     "walk",
    "win",   "offer",  "love",    "send",    "build",   "stay",      "fall",    "cut",        "reach",    "kill",
    "raise", "pass",   "sell",    "decide",  "return",  "explain",   "hope",    "turn",       "river",    "stone",
    "green", "light",  "table",   "music",   "paper",   "road",      "field",   "plant",      "market",   "garden",
};
#define N_WORDS (sizeof words / sizeof words[0])

speed_status_t speed_lg_words_append(char **buf, size_t *len, size_t *cap, int64_t n_words, uint64_t seed) {
    speed_lg_rng_t rng;
    speed_lg_rng_seed(&rng, seed, 0x70726f6d7074ULL);
    for (int64_t i = 0; i < n_words; i++) {
        const char *w = words[speed_lg_rng_next(&rng) % N_WORDS];
        size_t wl = strlen(w), need = *len + wl + 2;
        if (need > *cap) {
            size_t c = *cap ? *cap * 2 : 256;
            while (c < need) c *= 2;
            char *grown = speed_realloc(*buf, c);
            if (!grown) return SPEED_ERR_NO_MEMORY;
            *buf = grown;
            *cap = c;
        }
        if (*len) (*buf)[(*len)++] = ' ';
        memcpy(*buf + *len, w, wl);
        *len += wl;
        (*buf)[*len] = '\0';
    }
    return SPEED_OK;
}

/* The tokens the server counts for text[0..len): see speed_lg_prompter_t. -1 on error. */
static int64_t tokens_count(const speed_lg_prompter_t *pr, char *text, size_t len, speed_tok_ids_t *ids) {
    ids->n = 0;
    char saved = text[len];
    text[len] = '\0';
    speed_status_t st;
    if (pr->chat) {
        speed_chat_message_t m = {"user", text};
        st = speed_tok_chat_encode(pr->tok, &m, 1, true, false, ids);
    } else {
        st = speed_tok_encode(pr->tok, text, len, true, ids);
    }
    text[len] = saved;
    return st == SPEED_OK ? (int64_t)ids->n : -1;
}

/* Pieces tried, in order, to add exactly one token at the end. */
static const char *const pads[] = {" a", " the", ".", ",", " I", "a", "e", "s", "!", "?", ";", " x", "x", "-"};

static speed_status_t exact_make(const speed_lg_prompter_t *pr, int64_t n, uint64_t seed, char **text_p,
                                 int64_t *n_exact_p, char *err, size_t err_size) {
    char *buf = NULL;
    size_t len = 0, cap = 0;
    speed_tok_ids_t ids = {0};
    speed_status_t st = SPEED_OK;
    /* enough words to pass n tokens (a word is at least one token): cut back to the longest
     * prefix of whole words at or below n, by bisection on the word count */
    st = speed_lg_words_append(&buf, &len, &cap, n + 1, seed);
    if (st != SPEED_OK) goto out;
    size_t *ends = speed_malloc((size_t)(n + 2) * sizeof *ends); /* ends[k]: length of the first k words */
    if (!ends) {
        st = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    int64_t n_ends = 0;
    ends[n_ends++] = 0;
    for (size_t i = 0; i <= len; i++)
        if (i == len || buf[i] == ' ') ends[n_ends++] = i;
    int64_t lo = 0, hi = n_ends - 1; /* tokens(words lo) <= n is assumed for lo = 0 */
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        int64_t c = tokens_count(pr, buf, ends[mid], &ids);
        if (c < 0) {
            st = SPEED_ERR_INVALID_ARGUMENT;
            snprintf(err, err_size, "the tokenizer could not encode a prompt");
            speed_free(ends);
            goto out;
        }
        if (c <= n)
            lo = mid;
        else
            hi = mid - 1;
    }
    len = ends[lo];
    buf[len] = '\0';
    speed_free(ends);
    int64_t have = tokens_count(pr, buf, len, &ids);
    /* then one token at a time */
    while (have >= 0 && have < n) {
        bool grown = false;
        for (size_t k = 0; k < sizeof pads / sizeof pads[0] && !grown; k++) {
            const char *pad = len == 0 && pads[k][0] == ' ' ? pads[k] + 1 : pads[k];
            size_t pl = strlen(pad);
            if (len + pl + 1 > cap) {
                char *g = speed_realloc(buf, cap * 2 + pl + 1);
                if (!g) {
                    st = SPEED_ERR_NO_MEMORY;
                    goto out;
                }
                buf = g;
                cap = cap * 2 + pl + 1;
            }
            memcpy(buf + len, pad, pl + 1);
            int64_t c = tokens_count(pr, buf, len + pl, &ids);
            if (c == have + 1) {
                len += pl;
                have = c;
                grown = true;
            } else {
                buf[len] = '\0';
            }
        }
        if (!grown) break;
    }
    if (have != n) {
        snprintf(err, err_size, "no prompt of exactly %lld tokens could be built with this tokenizer%s", (long long)n,
                 pr->chat ? " (the chat template alone may take more)" : "");
        st = SPEED_ERR_INVALID_ARGUMENT;
        goto out;
    }
    *text_p = buf;
    *n_exact_p = have;
    buf = NULL;
out:
    speed_free(buf);
    speed_tok_ids_free(&ids);
    return st;
}

speed_status_t speed_lg_prompt_make(const speed_lg_prompter_t *pr, int64_t n, uint64_t seed, char **text_p,
                                    int64_t *n_exact_p, char *err, size_t err_size) {
    *text_p = NULL;
    *n_exact_p = -1;
    if (pr->tok) return exact_make(pr, n, seed, text_p, n_exact_p, err, err_size);
    double wpt = pr->words_per_token > 0 ? pr->words_per_token : 1.0;
    int64_t n_words = (int64_t)(n * wpt + 0.5);
    if (n_words < 1) n_words = 1;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    speed_status_t st = speed_lg_words_append(&buf, &len, &cap, n_words, seed);
    if (st != SPEED_OK) {
        speed_free(buf);
        snprintf(err, err_size, "out of memory building a prompt");
        return st;
    }
    *text_p = buf;
    return SPEED_OK;
}
