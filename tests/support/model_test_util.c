/* A small safetensors writer for the speed_model tests: see model_test_util.h. */
#include "model_test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void tu_st_write_raw(const char *path, const char *header, size_t n_data) {
    size_t hl = strlen(header);
    size_t total = 8 + hl + n_data;
    unsigned char *b = calloc(1, total);
    uint64_t h64 = hl;
    memcpy(b, &h64, 8);
    memcpy(b + 8, header, hl);
    tu_write(path, b, total);
    free(b);
}

void tu_st_write(const char *path, const tu_st_entry_t *e, int n) {
    char *h = malloc(1 << 20);
    size_t len = 0, off = 0;
    len += (size_t)sprintf(h + len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        len += (size_t)sprintf(h + len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", e[i].name, e[i].dtype);
        for (int d = 0; d < e[i].n_dims; d++)
            len += (size_t)sprintf(h + len, "%s%lld", d ? "," : "", (long long)e[i].shape[d]);
        len += (size_t)sprintf(h + len, "],\"data_offsets\":[%zu,%zu]}", off, off + e[i].n_bytes);
        off += e[i].n_bytes;
    }
    len += (size_t)sprintf(h + len, "}");
    while ((8 + len) % 8) h[len++] = ' ';
    size_t total = 8 + len + off;
    unsigned char *b = calloc(1, total);
    uint64_t h64 = len;
    memcpy(b, &h64, 8);
    memcpy(b + 8, h, len);
    off = 8 + len;
    for (int i = 0; i < n; i++) {
        if (e[i].data) memcpy(b + off, e[i].data, e[i].n_bytes);
        off += e[i].n_bytes;
    }
    tu_write(path, b, total);
    free(b);
    free(h);
}
