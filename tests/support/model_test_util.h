/* Helpers for the speed_model tests (library speed_test_common): a small safetensors writer
 *
 * Includes test_fs.h (scratch directory, file reads and writes) and test_log.h (log
 * capture), which the model tests use alongside it.
 *
 * Thread-safety: reentrant. Files that cannot be written exit(1) (test_fs.h).
 */
#ifndef SPEED_MODEL_TEST_UTIL_H
#define SPEED_MODEL_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>
/* Not needed by the declarations: kept because the tests were written against a header that
 * brought them in. */
#include <errno.h>
#include <dirent.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"
#include "test_fs.h"
#include "test_log.h"

/* A safetensors file whose header text is given verbatim (after the 8-byte length), followed
 * by n_data zero bytes. */
void tu_st_write_raw(const char *path, const char *header, size_t n_data);

typedef struct {
    const char *name;
    const char *dtype; /* "F32", "BF16", "F16", or anything for broken files */
    int n_dims;
    int64_t shape[4];
    const void *data; /* NULL = zeros */
    size_t n_bytes;   /* of data */
} tu_st_entry_t;

/* A well-formed file (8-aligned data area) with the n tensors of e back to back. */
void tu_st_write(const char *path, const tu_st_entry_t *e, int n);

#endif /* SPEED_MODEL_TEST_UTIL_H */
