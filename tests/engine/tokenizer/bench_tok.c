/* Tokenizer throughput: encodes ~1 MB of English-like text (generated here, or the file
 * given as argv[1]) with the Llama 3 and Llama 2 tokenizers and prints MB/s and tokens/s
 * (median of 5 runs, one thread). */

#include "tok_test_util.h"

#include "alloc.h"
#include "test_clock.h"
#include "test_fs.h"
#include "test_stats.h"

static const char *const words[] = {
    "the",        "of",          "and",        "to",       "a",         "in",      "is",     "it",       "that",
    "was",        "for",         "on",         "are",      "with",      "as",      "I",      "his",      "they",
    "be",         "at",          "one",        "have",     "this",      "from",    "or",     "had",      "by",
    "word",       "but",         "what",       "some",     "we",        "can",     "out",    "other",    "were",
    "all",        "there",       "when",       "up",       "use",       "your",    "how",    "said",     "an",
    "each",       "she",         "which",      "do",       "their",     "time",    "if",     "will",     "way",
    "about",      "many",        "then",       "them",     "write",     "would",   "like",   "so",       "these",
    "her",        "long",        "make",       "thing",    "see",       "him",     "two",    "has",      "look",
    "more",       "day",         "could",      "go",       "come",      "did",     "number", "sound",    "no",
    "most",       "people",      "my",         "over",     "know",      "water",   "than",   "call",     "first",
    "who",        "may",         "down",       "side",     "been",      "now",     "find",   "Harbour",  "engineer",
    "lighthouse", "measurement", "breakwater", "tomorrow", "questions", "council", "storm",  "Saturday", "computer",
    "programs",   "understood",  "carefully",  "quarry",   "don't",     "it's",    "we'll",  "they're",  "London",
    "September",
};

static char *make_text(size_t target, size_t *len_p) {
    char *buf = malloc(target + 64);
    size_t n = 0;
    uint64_t x = 0x243F6A8885A308D3ULL;
    int in_sentence = 0;
    while (n < target) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        const char *w = words[x % (sizeof words / sizeof words[0])];
        if (!in_sentence) {
            n += (size_t)snprintf(buf + n, 64, "%c%s", w[0] >= 'a' ? w[0] - 32 : w[0], w + 1);
            in_sentence = 1;
        } else {
            n += (size_t)snprintf(buf + n, 64, " %s", w);
        }
        unsigned r = (unsigned)(x >> 40) % 100;
        if (r < 3)
            n += (size_t)snprintf(buf + n, 64, " %u", (unsigned)(x >> 20) % 5000);
        else if (r < 8)
            n += (size_t)snprintf(buf + n, 64, ",");
        else if (r < 14) {
            n += (size_t)snprintf(buf + n, 64, "%s", r < 12 ? "." : "?");
            if (r == 13)
                n += (size_t)snprintf(buf + n, 64, "\n\n");
            else
                n += (size_t)snprintf(buf + n, 64, " ");
            in_sentence = 0;
            if (buf[n - 1] == ' ') n--;
            if (r != 13) buf[n++] = ' ';
        }
    }
    buf[n] = '\0';
    *len_p = n;
    return buf;
}

static int bench(const char *name, const char *text, size_t len) {
    char dir[1024];
    tok_test_dir(name, dir, sizeof dir);
    speed_tok_t *tok = NULL;
    double t0 = now_s();
    if (speed_tok_load(dir, NULL, &tok) != SPEED_OK) return 1;
    double t_load = now_s() - t0;
    double times[5];
    size_t n_tokens = 0;
    for (int r = 0; r < 5; r++) {
        speed_tok_ids_t ids = {0};
        t0 = now_s();
        if (speed_tok_encode(tok, text, len, false, &ids) != SPEED_OK) return 1;
        times[r] = now_s() - t0;
        n_tokens = ids.n;
        speed_tok_ids_free(&ids);
    }
    tu_sort_doubles(times, 5);
    double t = times[2];
    printf("%-7s load %.3f s | encode %.2f MB in %.4f s: %.1f MB/s, %.2f M tokens/s "
           "(%zu tokens, %.2f bytes/token)\n",
           name, t_load, len / 1e6, t, len / 1e6 / t, n_tokens / 1e6 / t, n_tokens, (double)len / (double)n_tokens);
    speed_tok_destroy(tok);
    return 0;
}

int main(int argc, char **argv) {
    (void)check_count_;
    (void)check_failures_;
    char dir[1024];
    if (!tok_test_dir("llama3", dir, sizeof dir)) SKIP_TEST("SPEED_TEST_DATA is not set");
    size_t len;
    char *text;
    if (argc > 1) {
        text = tu_read(argv[1], &len);
        if (!text) SKIP_TEST("cannot open %s", argv[1]);
    } else {
        text = make_text(1 << 20, &len);
    }
    int rc = bench("llama3", text, len) | bench("llama2", text, len);
    free(text);
    return rc;
}
