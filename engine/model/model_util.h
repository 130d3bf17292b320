/* Internal helpers shared by the speed_model sources. Not installed, not public API. */
#ifndef SPEED_MODEL_UTIL_H
#define SPEED_MODEL_UTIL_H

#include <stddef.h>

#include "status.h"

/* Reads a whole regular file (at most max_bytes) into a speed_malloc'd, NUL-terminated buffer.
 * Logs and returns SPEED_ERR_NOT_FOUND, SPEED_ERR_IO, SPEED_ERR_FORMAT (not a regular file,
 * too large) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_model_file_read(const char *path, size_t max_bytes, char **text_p,
                                     size_t *len_p);

/* "dir/name" in a speed_malloc'd string, or NULL when out of memory (logged). */
char *speed_model_path_join(const char *dir, const char *name);

/* Last path component (pointer into `path`). */
const char *speed_model_path_base(const char *path);

#endif /* SPEED_MODEL_UTIL_H */
