/* Name tables: the names of an enum's values, in enum order and NULL-terminated, kept by the
 * module that owns the enum (dtype.h, backend_kind.h, kv_transport.h, tokenizer.h). These
 * helpers are what every owner's name/parse functions are made of, so one rule (exact,
 * case-sensitive; "?"-style fallback outside the enum) holds for every table.
 * Pure functions, any thread. */
#ifndef SPEED_NAMES_H
#define SPEED_NAMES_H

#include <stddef.h>

/* The index of `name` in `names` (exact, case-sensitive), or -1 when absent or name is NULL. */
int speed_names_find(const char *const *names, const char *name);

/* names[value] when 0 <= value < count, else `fallback`. */
const char *speed_names_get(const char *const *names, int count, int value, const char *fallback);

/* Writes the names as prose into buf: "a", "a or b", "a, b or c". Always NUL-terminated (cut
 * to fit); returns buf. */
const char *speed_names_list(const char *const *names, char *buf, size_t size);

#endif /* SPEED_NAMES_H */
