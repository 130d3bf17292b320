/* Small file helpers shared by every library (config.json, tokenizer.json, shard indexes,
 * CLI inputs).
 *
 * Thread-safety: reentrant. Errors are logged once, under the caller's subsystem, naming
 * the path.
 */
#ifndef SPEED_FILE_H
#define SPEED_FILE_H

#include <stddef.h>

#include "log.h"
#include "status.h"

typedef enum {
    SPEED_FILE_READ_DEFAULT = 0,
    SPEED_FILE_READ_OPTIONAL = 1 << 0, /* a missing file returns SPEED_ERR_NOT_FOUND unlogged */
} speed_file_read_flags_t;

/* Reads the whole file at `path` (a regular file, a pipe or a device such as /dev/stdin)
 * into a speed_malloc'd buffer with a NUL after the last byte; *len_p excludes the NUL and
 * the data may itself contain NULs. The caller speed_free()s *data_p.
 * Returns:
 *   SPEED_OK
 *   SPEED_ERR_NOT_FOUND   no such file
 *   SPEED_ERR_INVALID_ARGUMENT  it is a directory
 *   SPEED_ERR_IO          it cannot be opened or read (permissions, EIO)
 *   SPEED_ERR_TOO_LONG    it holds more than max_bytes
 *   SPEED_ERR_NO_MEMORY
 * Outputs are written only on success. */
speed_status_t speed_file_read(const char *path, size_t max_bytes, speed_log_subsys_t subsys, unsigned flags,
                               char **data_p, size_t *len_p);

/* "dir/name" (one '/' between them) in a speed_malloc'd string; NULL when out of memory. */
char *speed_path_join(const char *dir, const char *name);

/* The last component of `path` (a pointer into it). */
const char *speed_path_base(const char *path);

#endif /* SPEED_FILE_H */
