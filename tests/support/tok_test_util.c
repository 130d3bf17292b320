/* Helpers shared by the tokenizer tests: see tok_test_util.h. */
#include "tok_test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tok_test_dir(const char *name, char *buf, size_t size) {
    const char *data = getenv("SPEED_TEST_DATA");
    if (!data || !*data) return 0;
    snprintf(buf, size, "%s/tokenizers/%s", data, name);
    return 1;
}

json_t *tok_test_read_jsonl(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        return NULL;
    }
    json_t *arr = json_array();
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int lineno = 0;
    while ((n = getline(&line, &cap, f)) > 0) {
        lineno++;
        if (n == 1 && line[0] == '\n') continue;
        json_error_t err;
        json_t *v = json_loadb(line, (size_t)n, JSON_ALLOW_NUL, &err);
        if (!v) {
            fprintf(stderr, "%s:%d: %s\n", path, lineno, err.text);
            json_decref(arr);
            arr = NULL;
            break;
        }
        json_array_append_new(arr, v);
    }
    free(line);
    fclose(f);
    return arr;
}

int tok_test_ids_equal(const speed_tok_ids_t *ids, size_t from, const json_t *expect, const char *what) {
    size_t n = json_array_size(expect);
    int ok = ids->n - from == n;
    for (size_t i = 0; ok && i < n; i++)
        ok = ids->ids[from + i] == (int32_t)json_integer_value(json_array_get(expect, i));
    if (!ok) {
        fprintf(stderr, "mismatch for %s\n  got:     ", what);
        for (size_t i = from; i < ids->n; i++) fprintf(stderr, " %d", (int)ids->ids[i]);
        fprintf(stderr, "\n  expected:");
        for (size_t i = 0; i < n; i++) fprintf(stderr, " %d", (int)json_integer_value(json_array_get(expect, i)));
        fprintf(stderr, "\n");
    }
    return ok;
}

const char *tok_test_show(const char *s, size_t len) {
    static char buf[256];
    size_t o = 0;
    for (size_t i = 0; i < len && o + 8 < sizeof buf; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f)
            o += (size_t)snprintf(buf + o, sizeof buf - o, "\\x%02x", c);
        else
            buf[o++] = (char)c;
    }
    buf[o] = '\0';
    return buf;
}
