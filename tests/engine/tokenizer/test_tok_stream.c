/* Incremental decoding: ids pushed one at a time give, concatenated, exactly the full
 * decode; no chunk is invalid UTF-8; multi-byte characters split over several tokens
 * (byte-level pieces, byte-fallback <0xNN> pieces) are held back until complete. */
#include "tok_test_util.h"

#include "alloc.h"

static int valid_utf8(const char *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)s[i];
        size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!n || i + n > len) return 0;
        for (size_t k = 1; k < n; k++)
            if (((unsigned char)s[i + k] & 0xC0) != 0x80) return 0;
        i += n;
    }
    return 1;
}

/* Streams ids and compares with speed_tok_decode. Returns the number of pushes that
 * produced nothing (held back). */
static size_t stream_check(const speed_tok_t *tok, const int32_t *ids, size_t n, bool skip, const char *what) {
    speed_tok_stream_t *s = NULL;
    CHECK_INT_EQ(speed_tok_stream_create(tok, skip, &s), SPEED_OK);
    if (!s) return 0;
    char *acc = malloc(1);
    size_t acc_len = 0, held = 0;
    int chunks_valid = 1;
    for (size_t i = 0; i <= n; i++) {
        const char *t = NULL;
        size_t len = 0;
        speed_status_t st = i < n ? speed_tok_stream_push(s, ids[i], &t, &len) : speed_tok_stream_flush(s, &t, &len);
        CHECK_INT_EQ(st, SPEED_OK);
        if (st != SPEED_OK) break;
        if (!valid_utf8(t, len)) chunks_valid = 0;
        if (len == 0 && i < n) held++;
        acc = realloc(acc, acc_len + len + 1);
        memcpy(acc + acc_len, t, len);
        acc_len += len;
    }
    char *full = NULL;
    size_t full_len = 0;
    CHECK_INT_EQ(speed_tok_decode(tok, ids, n, skip, &full, &full_len), SPEED_OK);
    CHECK_MSG(chunks_valid, "%s: a chunk was not valid UTF-8", what);
    CHECK_MSG(full && acc_len == full_len && memcmp(acc, full, full_len) == 0, "%s (skip=%d): stream \"%s\"", what,
              (int)skip, tok_test_show(acc, acc_len));
    if (full && !(acc_len == full_len && memcmp(acc, full, full_len) == 0))
        fprintf(stderr, "   vs full \"%s\"\n", tok_test_show(full, full_len));
    speed_free(full);
    free(acc);
    speed_tok_stream_destroy(s);
    return held;
}

static void run_file(const speed_tok_t *tok, const char *path) {
    json_t *cases = tok_test_read_jsonl(path);
    CHECK(cases != NULL);
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        json_t *t = json_object_get(c, "text");
        speed_tok_ids_t ids = {0};
        CHECK_INT_EQ(speed_tok_encode(tok, json_string_value(t), json_string_length(t), true, &ids), SPEED_OK);
        char what[200];
        snprintf(what, sizeof what, "%s case %zu", path, i);
        stream_check(tok, ids.ids, ids.n, false, what);
        stream_check(tok, ids.ids, ids.n, true, what);
        speed_tok_ids_free(&ids);
    }
    json_decref(cases);
}

/* Random ids (including special tokens and lone byte pieces) must still stream exactly. */
static void run_random(const speed_tok_t *tok, int32_t max_id) {
    uint64_t x = 88172645463325252ULL;
    for (int round = 0; round < 200; round++) {
        int32_t ids[24];
        for (int k = 0; k < 24; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ids[k] = (int32_t)(x % (uint64_t)max_id);
        }
        char what[64];
        snprintf(what, sizeof what, "random round %d", round);
        stream_check(tok, ids, 24, round % 2, what);
    }
}

int main(void) {
    char dir[1024], path[1100];
    if (!tok_test_dir("llama3", dir, sizeof dir)) SKIP_TEST("SPEED_TEST_DATA is not set");
    speed_tok_t *l3 = NULL, *l2 = NULL;
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &l3), SPEED_OK);
    snprintf(path, sizeof path, "%s/vectors.jsonl", dir);
    if (l3) run_file(l3, path);
    tok_test_dir("llama2", dir, sizeof dir);
    CHECK_INT_EQ(speed_tok_load(dir, NULL, &l2), SPEED_OK);
    if (l2) {
        snprintf(path, sizeof path, "%s/vectors.jsonl", dir);
        run_file(l2, path);
        snprintf(path, sizeof path, "%s/vectors_extra.jsonl", dir);
        run_file(l2, path);
    }
    if (!l2 || !l3) return CHECK_DONE();

    /* Llama 2: 🦙 is not in the vocabulary, so byte fallback gives <0xF0><0x9F><0xA6><0x99>:
     * the first three pushes must give nothing, the fourth the whole character. */
    const char *llama = "a \xF0\x9F\xA6\x99 b";
    speed_tok_ids_t ids = {0};
    CHECK_INT_EQ(speed_tok_encode(l2, llama, strlen(llama), false, &ids), SPEED_OK);
    speed_tok_stream_t *s = NULL;
    CHECK_INT_EQ(speed_tok_stream_create(l2, false, &s), SPEED_OK);
    size_t n_byte = 0, emitted_at = 0;
    for (size_t i = 0; s && i < ids.n; i++) {
        const char *t;
        size_t len;
        CHECK_INT_EQ(speed_tok_stream_push(s, ids.ids[i], &t, &len), SPEED_OK);
        const char *txt = speed_tok_token_text(l2, ids.ids[i]);
        if (txt && strncmp(txt, "<0x", 3) == 0) {
            n_byte++;
            if (n_byte < 4)
                CHECK_INT_EQ(len, 0);
            else {
                CHECK_MSG(len >= 4 && memcmp(t + len - 4, "\xF0\x9F\xA6\x99", 4) == 0,
                          "emoji not emitted whole: \"%s\"", tok_test_show(t, len));
                emitted_at = i;
            }
        }
    }
    CHECK_INT_EQ(n_byte, 4);
    CHECK(emitted_at > 0);
    speed_tok_stream_destroy(s);
    stream_check(l2, ids.ids, ids.n, false, "llama2 emoji");

    /* A lone first byte flushed at the end becomes U+FFFD, as the full decode does. */
    int32_t lone = ids.ids[2];
    CHECK_STR_EQ(speed_tok_token_text(l2, lone), "<0xF0>");
    s = NULL;
    CHECK_INT_EQ(speed_tok_stream_create(l2, false, &s), SPEED_OK);
    if (s) {
        const char *t;
        size_t len;
        CHECK_INT_EQ(speed_tok_stream_push(s, lone, &t, &len), SPEED_OK);
        CHECK_INT_EQ(len, 0);
        CHECK_INT_EQ(speed_tok_stream_flush(s, &t, &len), SPEED_OK);
        CHECK_MSG(len == 3 && memcmp(t, "\xEF\xBF\xBD", 3) == 0, "flush gave \"%s\"", tok_test_show(t, len));
        /* the stream is reset and reusable */
        CHECK_INT_EQ(speed_tok_stream_push(s, 15043, &t, &len), SPEED_OK); /* ▁Hello */
        CHECK_MSG(len == 5 && memcmp(t, "Hello", 5) == 0, "after reset: \"%s\"", tok_test_show(t, len));
        CHECK_INT_EQ(speed_tok_stream_push(s, -1, &t, &len), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(speed_tok_stream_push(s, 32000, &t, &len), SPEED_ERR_INVALID_ARGUMENT);
    }
    speed_tok_stream_destroy(s);
    speed_tok_ids_free(&ids);

    /* Llama 3: emoji and CJK are split across byte-level tokens. */
    const char *mixed = "Hi \xF0\x9F\xA6\x99\xF0\x9F\x8E\x89 \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E "
                        "h\xC3\xA9llo \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D"
                        "\xF0\x9F\x91\xA7";
    CHECK_INT_EQ(speed_tok_encode(l3, mixed, strlen(mixed), false, &ids), SPEED_OK);
    size_t held = stream_check(l3, ids.ids, ids.n, false, "llama3 emoji");
    CHECK_MSG(held > 0, "expected some pushes to be held back (%zu ids)", ids.n);
    speed_tok_ids_free(&ids);

    run_random(l3, speed_tok_vocab_size(l3));
    run_random(l2, speed_tok_vocab_size(l2));

    speed_tok_destroy(l3);
    speed_tok_destroy(l2);
    CHECK_INT_EQ(speed_alloc_live_count(), 0);
    return CHECK_DONE();
}
