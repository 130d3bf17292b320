/* Golden vectors: encode the llama.cpp / generated test strings with the Llama 3 and
 * Llama 2 tokenizers and compare ids exactly; decode them back. */
#include <pthread.h>

#include "tok_test_util.h"

#include "alloc.h"
#include "tok_internal.h"

/* Texts that cannot round trip (README): Llama 2 maps a literal ▁ to a space, and
 * special-token text becomes the special token. */
static int can_round_trip(const char *name, const char *text, size_t len) {
    if (strcmp(name, "llama2") != 0) return 1;
    for (size_t i = 0; i + 3 <= len; i++)
        if (memcmp(text + i, "\xE2\x96\x81", 3) == 0) return 0;
    return !(strstr(text, "<s>") || strstr(text, "</s>") || strstr(text, "<unk>"));
}

static void run_vectors(const speed_tok_t *tok, const char *name, const char *path, size_t expect_n) {
    json_t *cases = tok_test_read_jsonl(path);
    CHECK_MSG(cases != NULL, "%s", path);
    if (!cases) return;
    CHECK_INT_EQ(json_array_size(cases), expect_n);
    size_t i, n_ok = 0, n_rt = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *t = json_object_get(c, "text");
        const char *text = json_string_value(t);
        size_t len = json_string_length(t);
        speed_tok_ids_t ids = {0};
        speed_status_t st = speed_tok_encode(tok, text, len, false, &ids);
        CHECK_INT_EQ(st, SPEED_OK);
        char what[300];
        snprintf(what, sizeof what, "%s %s case %zu \"%s\"", name, path, i, tok_test_show(text, len));
        int ok = tok_test_ids_equal(&ids, 0, json_object_get(c, "ids"), what);
        CHECK_MSG(ok, "%s", what);
        n_ok += ok;
        if (can_round_trip(name, text, len)) {
            char *back = NULL;
            size_t blen = 0;
            CHECK_INT_EQ(speed_tok_decode(tok, ids.ids, ids.n, false, &back, &blen), SPEED_OK);
            int rt = back && blen == len && memcmp(back, text, len) == 0;
            CHECK_MSG(rt, "round trip %s: got \"%s\"", what, back ? tok_test_show(back, blen) : "");
            n_rt += rt;
            speed_free(back);
        }
        speed_tok_ids_free(&ids);
    }
    fprintf(stderr, "%s %s: %zu/%zu ids exact, %zu round trips\n", name, path, n_ok, json_array_size(cases), n_rt);
    json_decref(cases);
}

/* A shared tokenizer encodes from several threads at once with the same results. */
typedef struct {
    const speed_tok_t *tok;
    const json_t *cases;
    int failures;
} thread_arg_t;

static void *thread_main(void *p) {
    thread_arg_t *a = p;
    for (int round = 0; round < 20; round++) {
        size_t i;
        json_t *c;
        json_array_foreach(a->cases, i, c) {
            json_t *t = json_object_get(c, "text"), *expect = json_object_get(c, "ids");
            speed_tok_ids_t ids = {0};
            if (speed_tok_encode(a->tok, json_string_value(t), json_string_length(t), false, &ids)) {
                a->failures++;
                continue;
            }
            int ok = ids.n == json_array_size(expect);
            for (size_t k = 0; ok && k < ids.n; k++) ok = ids.ids[k] == json_integer_value(json_array_get(expect, k));
            a->failures += !ok;
            speed_tok_ids_free(&ids);
        }
    }
    return NULL;
}

static void check_threads(const speed_tok_t *tok, const char *path) {
    json_t *cases = tok_test_read_jsonl(path);
    if (!cases) return;
    pthread_t th[4];
    thread_arg_t args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thread_arg_t){tok, cases, 0};
        CHECK_INT_EQ(pthread_create(&th[i], NULL, thread_main, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_INT_EQ(args[i].failures, 0);
    }
    json_decref(cases);
}

/* The SentencePiece fast path (cutting before each "▁", see speed_tok.sp_split) must give
 * the same ids as BPE over the whole normalised text. */
static void check_sp_split(speed_tok_t *tok, const char *path) {
    CHECK(tok->sp_split);
    json_t *cases = tok_test_read_jsonl(path);
    if (!cases) return;
    char *text = malloc(1 << 16);
    size_t len = 0, i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *t = json_object_get(c, "text");
        size_t n = json_string_length(t);
        if (len + n + 4 > (1 << 16)) break;
        memcpy(text + len, json_string_value(t), n);
        len += n;
        memcpy(text + len, i % 3 ? " " : "  \n", i % 3 ? 1 : 3);
        len += i % 3 ? 1 : 3;
    }
    speed_tok_ids_t a = {0}, b = {0};
    CHECK_INT_EQ(speed_tok_encode(tok, text, len, true, &a), SPEED_OK);
    tok->sp_split = false;
    CHECK_INT_EQ(speed_tok_encode(tok, text, len, true, &b), SPEED_OK);
    tok->sp_split = true;
    CHECK_MSG(a.n == b.n && memcmp(a.ids, b.ids, a.n * sizeof *a.ids) == 0,
              "sp_split changed the ids of a %zu-byte text (%zu vs %zu ids)", len, a.n, b.n);
    speed_tok_ids_free(&a);
    speed_tok_ids_free(&b);
    free(text);
    json_decref(cases);
}

int main(void) {
    char dir[1024], path[1100];
    if (!tok_test_dir("llama3", dir, sizeof dir)) SKIP_TEST("SPEED_TEST_DATA is not set");
    speed_tok_t *tok = NULL;

    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (tok) {
        snprintf(path, sizeof path, "%s/vectors.jsonl", dir);
        run_vectors(tok, "llama3", path, 46);
        check_threads(tok, path);
        speed_tok_destroy(tok);
        tok = NULL;
    }

    tok_test_dir("llama2", dir, sizeof dir);
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &tok), SPEED_OK);
    if (tok) {
        snprintf(path, sizeof path, "%s/vectors.jsonl", dir);
        run_vectors(tok, "llama2", path, 46);
        snprintf(path, sizeof path, "%s/vectors_extra.jsonl", dir);
        run_vectors(tok, "llama2", path, 363);
        check_sp_split(tok, path);
        speed_tok_destroy(tok);
    }
    CHECK_INT_EQ(speed_alloc_live_count(), 0);
    return CHECK_DONE();
}
