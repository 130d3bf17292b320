/* Name tables: the names of an enum's values, in enum order and NULL-terminated, kept by the
 * module that owns the enum (dtype.h, backend_kind.h, kv_transport.h, tokenizer.h). These
 * helpers are what every owner's name/parse functions are made of, so one rule (exact,
 * case-sensitive; "?"-style fallback outside the enum) holds for every table.
 * Pure functions, any thread. */
#ifndef SPEED_NAMES_H
#define SPEED_NAMES_H

#include <stddef.h>

#include "status.h"

/* The index of `name` in `names` (exact, case-sensitive), or -1 when absent or name is NULL. */
int speed_names_find(const char *const *names, const char *name);

/* names[value] when 0 <= value < count, else `fallback`. */
const char *speed_names_get(const char *const *names, int count, int value, const char *fallback);

/* Writes the names as prose into buf: "a", "a or b", "a, b or c". Always NUL-terminated (cut
 * to fit); returns buf. */
const char *speed_names_list(const char *const *names, char *buf, size_t size);

/* An owner's table and its two functions, declared in one line of its header:
 *   extern const char *const P_names[COUNT + 1];        names in enum order, NULL-terminated
 *                                                       (a config ENUM field can take them)
 *   const char *P_name(T value);                        the name; "?" outside the enum; never NULL
 *   speed_status_t P_parse(const char *name, T *value_p);
 *                                                       exact match: SPEED_OK, or
 *                                                       SPEED_ERR_INVALID_ARGUMENT for NULL or any
 *                                                       other name (nothing logged, *value_p untouched)
 * and defined by SPEED_NAMES_DEFINE(P, T, COUNT) in its .c, after the table. */
#define SPEED_NAMES_DECLARE(P, T, COUNT)             \
    extern const char *const P##_names[(COUNT) + 1]; \
    const char *P##_name(T value);                   \
    speed_status_t P##_parse(const char *name, T *value_p)

#define SPEED_NAMES_DEFINE(P, T, COUNT)                                                            \
    const char *P##_name(T value) { return speed_names_get(P##_names, (COUNT), (int)value, "?"); } \
    speed_status_t P##_parse(const char *name, T *value_p) {                                       \
        int index_ = speed_names_find(P##_names, name);                                            \
        if (index_ < 0) return SPEED_ERR_INVALID_ARGUMENT;                                         \
        *value_p = (T)index_;                                                                      \
        return SPEED_OK;                                                                           \
    }

#endif /* SPEED_NAMES_H */
