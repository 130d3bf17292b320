/* Name tables: see names.h. */
#include "names.h"

#include <stdio.h>
#include <string.h>

int speed_names_find(const char *const *names, const char *name) {
    if (!names || !name) return -1;
    for (int i = 0; names[i]; i++)
        if (strcmp(names[i], name) == 0) return i;
    return -1;
}

const char *speed_names_get(const char *const *names, int count, int value, const char *fallback) {
    return value >= 0 && value < count ? names[value] : fallback;
}

const char *speed_names_list(const char *const *names, char *buf, size_t size) {
    if (!size) return buf;
    buf[0] = '\0';
    int n = 0;
    while (names[n]) n++;
    size_t at = 0;
    for (int i = 0; i < n && at < size; i++) {
        const char *sep = i == 0 ? "" : i == n - 1 ? " or " : ", ";
        int k = snprintf(buf + at, size - at, "%s%s", sep, names[i]);
        if (k < 0) break;
        at += (size_t)k;
    }
    return buf;
}
