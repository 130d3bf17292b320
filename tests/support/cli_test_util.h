/* Helpers shared by the speedctl tests. */
#ifndef SPEED_CLI_TEST_UTIL_H
#define SPEED_CLI_TEST_UTIL_H

#include <stdio.h>
#include <stdlib.h>

/* The whole file as a NUL-terminated string (free()); "" when it cannot be read. */
static inline char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return calloc(1, 1);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = calloc(1, (size_t)n + 1);
    if (fread(b, 1, (size_t)n, f) != (size_t)n) b[0] = '\0';
    fclose(f);
    return b;
}

#endif /* SPEED_CLI_TEST_UTIL_H */
