/* speedctl eval --probe: pass-key retrieval records (eval.h). The key sits at a chosen depth of
 * filler text and is asked for at the end; under SPEED the shallow filler (and the key with
 * it) is visible to the upper layers only through what the lower C layers wrote into the
 * anchors, tail and generated tokens, which is what the probe exposes. */
#include <stdio.h>
#include <string.h>

#include "alloc.h"
#include "eval.h"
#include "speedctl.h"

static const char intro[] = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n";
static const char filler[] =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
static const char question[] = "\nWhat is the pass key? The pass key is";

/* splitmix64: a seeded, portable sequence (the keys must not depend on libc's rand). */
static uint64_t next_random(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static speed_status_t count_tokens(const speed_tok_t *tok, const char *text, int64_t *n_p) {
    speed_tok_ids_t ids = {0};
    SPEED_CHECK(speed_tok_encode(tok, text, strlen(text), false, &ids));
    *n_p = (int64_t)ids.n;
    speed_tok_ids_free(&ids);
    return SPEED_OK;
}

speed_status_t speedctl_eval_probe_build(const speed_tok_t *tok, int64_t n_prompt, const double *depths, int n_depths,
                                         int n_trials, uint64_t seed, speedctl_eval_set_t *set) {
    int64_t n_fixed, n_unit, n_needle;
    SPEED_CHECK(count_tokens(tok, intro, &n_fixed));
    SPEED_CHECK(count_tokens(tok, filler, &n_unit));
    SPEED_CHECK(count_tokens(tok, "The pass key is 12345. Remember it. 12345 is the pass key. ", &n_needle));
    int64_t n_question;
    SPEED_CHECK(count_tokens(tok, question, &n_question));
    int64_t room = n_prompt - n_fixed - n_needle - n_question - 1;
    int64_t n_units = n_unit > 0 ? room / n_unit : 0;
    if (n_units < 1) {
        speedctl_fail("--probe: --prompt-tokens %lld is too short for the probe's text (it needs about %lld)",
                      (long long)n_prompt, (long long)(n_prompt - room + n_unit));
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    uint64_t rng = seed;
    speed_status_t st = SPEED_OK;
    size_t cap = sizeof intro + (size_t)n_units * sizeof filler + 256 + sizeof question;
    char *text = speed_malloc(cap);
    if (!text) return SPEED_ERR_NO_MEMORY;
    for (int d = 0; d < n_depths && st == SPEED_OK; d++) {
        int64_t before = (int64_t)(depths[d] * (double)n_units + 0.5);
        for (int t = 0; t < n_trials && st == SPEED_OK; t++) {
            unsigned key = 10000u + (unsigned)(next_random(&rng) % 90000u);
            size_t len = (size_t)snprintf(text, cap, "%s", intro);
            for (int64_t u = 0; u < n_units; u++) {
                if (u == before)
                    len += (size_t)snprintf(text + len, cap - len,
                                            "The pass key is %u. Remember it. %u is the pass key. ", key, key);
                len += (size_t)snprintf(text + len, cap - len, "%s", filler);
            }
            if (before >= n_units)
                len += (size_t)snprintf(text + len, cap - len, "The pass key is %u. Remember it. %u is the pass key. ",
                                        key, key);
            len += (size_t)snprintf(text + len, cap - len, "%s", question);
            char answer[16];
            snprintf(answer, sizeof answer, " %u", key);
            /* prompt with the BOS as served, the answer on its own: the ids are what is scored */
            speed_tok_ids_t ids = {0};
            st = speed_tok_encode(tok, text, len, true, &ids);
            size_t n_p = ids.n;
            if (st == SPEED_OK) st = speed_tok_encode(tok, answer, strlen(answer), false, &ids);
            if (st == SPEED_OK && ids.n == n_p) st = SPEED_ERR_INVALID_ARGUMENT; /* a tokenizer without digits */
            if (st == SPEED_OK) st = speedctl_eval_set_add(set, ids.ids, (int64_t)n_p, (int64_t)(ids.n - n_p), d);
            if (st == SPEED_OK) set->n_read++;
            speed_tok_ids_free(&ids);
        }
    }
    speed_free(text);
    return st;
}
