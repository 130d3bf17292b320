/* Scratch directories and whole-file reads and writes for the tests: see test_fs.h. */
#include "test_fs.h"

#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

char tu_root[512];

const char *tu_tmp_init(const char *test) {
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

const char *tu_path(const char *fmt, ...) {
    static char bufs[8][1100];
    static int next;
    char *b = bufs[next++ % 8];
    char rel[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rel, sizeof rel, fmt, ap);
    va_end(ap);
    snprintf(b, sizeof bufs[0], "%s/%s", tu_root, rel);
    return b;
}

void tu_rm_rf(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (!S_ISDIR(sb.st_mode)) {
        unlink(path);
        return;
    }
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
}

void tu_write(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp || (n && fwrite(data, 1, n, fp) != n) || fclose(fp) != 0) {
        fprintf(stderr, "write %s failed\n", path);
        exit(1);
    }
}

void tu_write_text(const char *path, const char *text) { tu_write(path, text, strlen(text)); }

char *tu_read(const char *path, size_t *n_p) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    /* Read in chunks rather than trusting ftell: pipes and /proc files report size 0. */
    size_t cap = 4096, n = 0;
    char *b = malloc(cap);
    for (;;) {
        if (n + 1 >= cap) b = realloc(b, cap *= 2);
        size_t k = fread(b + n, 1, cap - 1 - n, fp);
        n += k;
        if (k == 0) break;
    }
    bool failed = ferror(fp);
    fclose(fp);
    if (failed) {
        free(b);
        return NULL;
    }
    b[n] = '\0';
    if (n_p) *n_p = n;
    return b;
}
