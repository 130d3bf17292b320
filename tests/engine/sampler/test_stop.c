/* speed_stop: EOS ids, max tokens, stop strings within and across tokens, hold-back of
 * streamed text, and a randomised comparison with a direct reference. */
#include "alloc.h"
#include "check.h"
#include "test_log.h"
#include "log.h"
#include "rng.h"
#include "stop.h"

typedef struct {
    char text[4096];              /* everything released, in order */
    speed_finish_reason_t finish; /* after finish() */
    int stop_index;
    int n_pushed; /* tokens pushed until a finish reason appeared */
} run_t;

/* Pushes tokens (ids 1.. with the given texts; id 0 is EOS), then finish(tail). Every
 * partial release must be a prefix of the final text (nothing shown is ever taken back). */
static run_t run_tokens(const speed_stop_params_t *p, const char *const *tokens, int n, const char *tail) {
    run_t r = {.finish = SPEED_FINISH_NONE, .stop_index = -1};
    speed_stop_t *s = NULL;
    CHECK_INT_EQ(speed_stop_create(p, &s), SPEED_OK);
    if (!s) return r;
    speed_stop_result_t res;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        bool eos = strcmp(tokens[i], "<EOS>") == 0;
        CHECK_INT_EQ(speed_stop_push(s, eos ? 0 : i + 1, tokens[i], strlen(tokens[i]), &res), SPEED_OK);
        CHECK(at + res.len < sizeof r.text);
        memcpy(r.text + at, res.text, res.len);
        at += res.len;
        r.n_pushed = i + 1;
        if (res.finish != SPEED_FINISH_NONE) break;
    }
    CHECK_INT_EQ(speed_stop_n_tokens(s), r.n_pushed);
    CHECK_INT_EQ(speed_stop_finish(s, tail, tail ? strlen(tail) : 0, &res), SPEED_OK);
    memcpy(r.text + at, res.text, res.len);
    at += res.len;
    r.text[at] = '\0';
    r.finish = res.finish;
    r.stop_index = res.stop_index;
    speed_stop_destroy(s);
    return r;
}

#define TOKS(...) \
    ((const char *const[]){__VA_ARGS__}), (int)(sizeof((const char *const[]){__VA_ARGS__}) / sizeof(const char *))

static void test_eos_and_length(void) {
    int32_t eos[] = {0, 7};
    speed_stop_params_t p = {.eos_ids = eos, .n_eos_ids = 2, .max_tokens = 100};
    run_t r = run_tokens(&p, TOKS("Hello", " world", "<EOS>", "never"), "");
    CHECK_STR_EQ(r.text, "Hello world");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_STOP);
    CHECK_INT_EQ(r.n_pushed, 3);
    CHECK_INT_EQ(r.stop_index, -1);

    p.max_tokens = 2;
    r = run_tokens(&p, TOKS("a", "b", "c"), NULL);
    CHECK_STR_EQ(r.text, "ab");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_LENGTH);
    CHECK_INT_EQ(r.n_pushed, 2);
    CHECK_STR_EQ(speed_finish_reason_name(r.finish), "length");
    CHECK_STR_EQ(speed_finish_reason_name(SPEED_FINISH_STOP), "stop");
    CHECK(speed_finish_reason_name(SPEED_FINISH_NONE) == NULL);

    /* EOS as the last allowed token: stop wins over length */
    r = run_tokens(&p, TOKS("a", "<EOS>"), NULL);
    CHECK_INT_EQ(r.finish, SPEED_FINISH_STOP);
    /* max_tokens 1 */
    p.max_tokens = 1;
    r = run_tokens(&p, TOKS("x", "y"), "");
    CHECK_STR_EQ(r.text, "x");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_LENGTH);
}

static void test_stop_strings(void) {
    const char *stops[] = {"END", "\n\n"};
    int32_t eos[] = {0};
    speed_stop_params_t p = {.eos_ids = eos, .n_eos_ids = 1, .stop = stops, .n_stop = 2, .max_tokens = 100};

    /* within one token; the rest of that token is dropped */
    run_t r = run_tokens(&p, TOKS("Hello ", "xENDy", "more"), "");
    CHECK_STR_EQ(r.text, "Hello x");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_STOP);
    CHECK_INT_EQ(r.stop_index, 0);
    CHECK_INT_EQ(r.n_pushed, 2);

    /* split over three tokens */
    r = run_tokens(&p, TOKS("Hel", "lo E", "N", "D!", "more"), "");
    CHECK_STR_EQ(r.text, "Hello ");
    CHECK_INT_EQ(r.n_pushed, 4);

    /* "\n" + "\n" */
    r = run_tokens(&p, TOKS("line", "\n", "\n", "next"), "");
    CHECK_STR_EQ(r.text, "line");
    CHECK_INT_EQ(r.stop_index, 1);

    /* a false start is released unchanged once decided */
    r = run_tokens(&p, TOKS("E", "N", "d", "\n", "x"), "");
    CHECK_STR_EQ(r.text, "ENd\nx");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_NONE); /* the caller ended it */

    /* held-back text at EOS and at length is released by finish */
    r = run_tokens(&p, TOKS("ab", "EN", "<EOS>"), "");
    CHECK_STR_EQ(r.text, "abEN");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_STOP);
    CHECK_INT_EQ(r.stop_index, -1);
    p.max_tokens = 2;
    r = run_tokens(&p, TOKS("ab", "\n"), "");
    CHECK_STR_EQ(r.text, "ab\n");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_LENGTH);
    /* ... unless the tail completes a stop string */
    r = run_tokens(&p, TOKS("ab", "EN"), "D");
    CHECK_STR_EQ(r.text, "ab");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_STOP);
    /* a stop string completed by the last allowed token is "stop" */
    r = run_tokens(&p, TOKS("E", "ND"), "");
    CHECK_STR_EQ(r.text, "");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_STOP);
    p.max_tokens = 100;

    /* the earliest match wins, whichever string it is */
    const char *overlap[] = {"bcd", "abc", "zz"};
    speed_stop_params_t q = {.stop = overlap, .n_stop = 3, .max_tokens = 100};
    r = run_tokens(&q, TOKS("xa", "b", "cd"), "");
    CHECK_STR_EQ(r.text, "x");
    CHECK_INT_EQ(r.stop_index, 1);

    /* hold-back step by step: nothing that is part of the final match is ever shown */
    speed_stop_t *s = NULL;
    CHECK_INT_EQ(speed_stop_create(&p, &s), SPEED_OK);
    speed_stop_result_t res;
    speed_stop_push(s, 1, "okE", 3, &res);
    CHECK_INT_EQ(res.len, 2); /* "ok"; "E" held */
    speed_stop_push(s, 2, "N", 1, &res);
    CHECK_INT_EQ(res.len, 0);
    speed_stop_push(s, 3, "D", 1, &res);
    CHECK_INT_EQ(res.len, 0);
    CHECK_INT_EQ(res.finish, SPEED_FINISH_STOP);
    CHECK_INT_EQ(speed_stop_push(s, 4, "x", 1, &res), SPEED_ERR_INVALID_ARGUMENT); /* after the end */
    speed_stop_finish(s, NULL, 0, &res);
    CHECK_INT_EQ(res.len, 0);
    /* reset: a new sequence */
    speed_stop_reset(s);
    speed_stop_push(s, 1, "fine", 4, &res);
    CHECK_INT_EQ(res.len, 4);
    speed_stop_destroy(s);

    /* multi-byte UTF-8 stop string split mid-character by the tokens' text boundaries */
    const char *u[] = {"\xc3\xbc"
                       "ber"}; /* "über" */
    speed_stop_params_t pu = {.stop = u, .n_stop = 1, .max_tokens = 100};
    r = run_tokens(&pu,
                   TOKS("s\xc3\xbc", "bx",
                        "\xc3\xbc"
                        "b",
                        "er", "!"),
                   "");
    CHECK_STR_EQ(r.text, "s\xc3\xbc"
                         "bx");
    CHECK_INT_EQ(r.finish, SPEED_FINISH_STOP);
}

/* Random texts over a small alphabet, random token splits: the released text must equal the
 * text cut before the first stop string. */
static void test_random(void) {
    const char *stops[] = {"ab\n", "\n\n", "bab", "a"};
    speed_rng_t rng;
    speed_rng_init(&rng, 42);
    int bad = 0;
    for (int round = 0; round < 3000; round++) {
        size_t n_stop = 1 + (size_t)(speed_rng_next(&rng) % 3); /* "a" only sometimes */
        if (round % 7 == 0) n_stop = 4;
        speed_stop_params_t p = {.stop = stops, .n_stop = n_stop, .max_tokens = 1000};
        char text[64];
        int len = 1 + (int)(speed_rng_next(&rng) % 40);
        for (int i = 0; i < len; i++) text[i] = "ab\nc"[speed_rng_next(&rng) % 4];
        text[len] = '\0';
        /* split into tokens of 0..4 bytes */
        char pieces[128][48];
        const char *toks[128];
        int n_toks = 0;
        for (int at = 0; at < len;) {
            int k = (int)(speed_rng_next(&rng) % 5);
            if (k > len - at || n_toks == 126) k = len - at;
            memcpy(pieces[n_toks], text + at, (size_t)k);
            pieces[n_toks][k] = '\0';
            toks[n_toks] = pieces[n_toks];
            n_toks++;
            at += k;
        }
        /* reference: generation stops at the first token after which the text holds a stop
         * string; the output is cut at the earliest start of a match in that text */
        int cut = len, seen = 0;
        for (int t = 0; t < n_toks && cut == len; t++) {
            seen += (int)strlen(toks[t]);
            for (int at = 0; at < seen && cut == len; at++)
                for (size_t k = 0; k < n_stop; k++) {
                    int sl = (int)strlen(stops[k]);
                    if (at + sl <= seen && strncmp(text + at, stops[k], (size_t)sl) == 0) {
                        cut = at;
                        break;
                    }
                }
        }
        run_t r = run_tokens(&p, toks, n_toks, "");
        bool ok = strlen(r.text) == (size_t)cut && strncmp(r.text, text, (size_t)cut) == 0 &&
                  (r.finish == SPEED_FINISH_STOP) == (cut < len);
        if (!ok && bad++ < 3)
            fprintf(stderr, "random case: text '%s' cut %d got '%s' finish %d\n", text, cut, r.text, r.finish);
    }
    CHECK_INT_EQ(bad, 0);
}

static void test_bad_params(void) {
    speed_stop_t *s = NULL;
    speed_stop_params_t p = {.max_tokens = 0};
    CHECK_INT_EQ(speed_stop_create(&p, &s), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "max tokens");
    const char *empty[] = {"ok", ""};
    p = (speed_stop_params_t){.stop = empty, .n_stop = 2, .max_tokens = 5};
    CHECK_INT_EQ(speed_stop_create(&p, &s), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "empty");
    p = (speed_stop_params_t){.stop = NULL, .n_stop = 1, .max_tokens = 5};
    CHECK_INT_EQ(speed_stop_create(&p, &s), SPEED_ERR_INVALID_ARGUMENT);
    CHECK(s == NULL);
    speed_stop_destroy(NULL);

    /* allocation failures: no leak, a clean status */
    const char *stops[] = {"x", "yy"};
    int32_t eos[] = {2};
    p = (speed_stop_params_t){.eos_ids = eos, .n_eos_ids = 1, .stop = stops, .n_stop = 2, .max_tokens = 5};
    int64_t live = speed_alloc_live_count();
    for (int n = 0; n < 20; n++) {
        speed_alloc_fail_after(n, 0);
        speed_status_t st = speed_stop_create(&p, &s);
        speed_alloc_fail_after(-1, 0);
        if (st == SPEED_OK) {
            speed_stop_destroy(s);
            continue;
        }
        CHECK_INT_EQ(st, SPEED_ERR_NO_MEMORY);
    }
    CHECK_INT_EQ(speed_alloc_live_count(), live);
}

int main(void) {
    speed_log_set_sink(tu_log_discard, NULL);
    int64_t live = speed_alloc_live_count();
    test_eos_and_length();
    test_stop_strings();
    test_random();
    test_bad_params();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
