/* Helpers shared by the speed_model tests: scratch directories, files, log capture and a
 * small safetensors writer for hand-made (and deliberately broken) files. */
#ifndef SPEED_MODEL_TEST_UTIL_H
#define SPEED_MODEL_TEST_UTIL_H

#include <errno.h>
#include <dirent.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

/* ---- log capture ---------------------------------------------------------- */

static int tu_n_warnings;
static char tu_last_warning[1024];

static inline void tu_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys,
                    const char *request_id, const char *line) {
    (void)user, (void)subsys, (void)request_id;
    if (level == SPEED_LOG_WARN) {
        tu_n_warnings++;
        snprintf(tu_last_warning, sizeof tu_last_warning, "%s", line);
    }
    fprintf(stderr, "  [log %c] %s\n", "EWIDT"[level], line);
}

static inline void tu_log_capture(void) { speed_log_set_sink(tu_sink, NULL); }

static inline void tu_warnings_reset(void) {
    tu_n_warnings = 0;
    tu_last_warning[0] = '\0';
}

/* ---- scratch directories and files ------------------------------------------ */

static char tu_root[512];

/* Creates a fresh scratch directory under $SPEED_TEST_TMP (or /tmp). */
static inline const char *tu_tmp_init(const char *test) {
    const char *base = getenv("SPEED_TEST_TMP");
    if (!base || !*base) base = "/tmp";
    mkdir(base, 0755);
    snprintf(tu_root, sizeof tu_root, "%s/%s-XXXXXX", base, test);
    if (!mkdtemp(tu_root)) {
        fprintf(stderr, "mkdtemp %s: %s\n", tu_root, strerror(errno));
        exit(1);
    }
    return tu_root;
}

/* Removes a directory tree (model directories are shallow). */
static inline void tu_rm_rf(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            size_t n = strlen(path) + strlen(e->d_name) + 2;
            char *child = malloc(n);
            snprintf(child, n, "%s/%s", path, e->d_name);
            tu_rm_rf(child);
            free(child);
        }
        if (d) closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* tu_path("a/b"): "<root>/a/b" in a rotating static buffer. */
static inline const char *tu_path(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline const char *tu_path(const char *fmt, ...) {
    static char bufs[8][1100];
    static int next;
    char *b = bufs[next++ % 8];
    char rel[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rel, sizeof rel, fmt, ap);
    va_end(ap);
    snprintf(b, 1100, "%s/%s", tu_root, rel);
    return b;
}

static inline void tu_write(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp || (n && fwrite(data, 1, n, fp) != n) || fclose(fp) != 0) {
        fprintf(stderr, "write %s failed\n", path);
        exit(1);
    }
}

static inline void tu_write_text(const char *path, const char *text) { tu_write(path, text, strlen(text)); }

/* Reads a whole file with malloc (test-side memory, not counted). */
static inline char *tu_read(const char *path, size_t *n_p) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (fread(b, 1, (size_t)n, fp) != (size_t)n) n = 0;
    b[n] = '\0';
    fclose(fp);
    if (n_p) *n_p = (size_t)n;
    return b;
}

/* ---- safetensors writing ---------------------------------------------------------- */

/* A safetensors file whose header text is given verbatim, followed by n_data zero bytes. */
static inline void tu_st_write_raw(const char *path, const char *header, size_t n_data) {
    size_t hl = strlen(header);
    size_t total = 8 + hl + n_data;
    unsigned char *b = calloc(1, total);
    uint64_t h64 = hl;
    memcpy(b, &h64, 8);
    memcpy(b + 8, header, hl);
    tu_write(path, b, total);
    free(b);
}

typedef struct {
    const char *name;
    const char *dtype;     /* "F32", "BF16", "F16", or anything for broken files */
    int n_dims;
    int64_t shape[4];
    const void *data;      /* NULL = zeros */
    size_t n_bytes;        /* of data */
} tu_st_entry_t;

/* A well-formed file (8-aligned data area) with the given tensors back to back. */
static inline void tu_st_write(const char *path, const tu_st_entry_t *e, int n) {
    char *h = malloc(1 << 20);
    size_t len = 0, off = 0;
    len += (size_t)sprintf(h + len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        len += (size_t)sprintf(h + len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", e[i].name,
                               e[i].dtype);
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

#endif /* SPEED_MODEL_TEST_UTIL_H */
