/* Read-only, mmap-based reader of one .safetensors file.
 *
 * Format: an 8-byte little-endian header length N, N bytes of JSON
 *   {"__metadata__": {...}, "<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}, ...}
 * and the tensor bytes; data_offsets are relative to the byte after the header.
 *
 * speed_safetensors_open maps the whole file (PROT_READ, MAP_PRIVATE) and validates the header
 * before returning: the header length fits in the file, the header is a JSON object, every
 * entry has a supported dtype (F32, BF16, F16), at most 4 dims, offsets inside the data area
 * with end >= start and end - start == product(shape) * dtype size, data aligned to the element
 * size, and no two non-empty tensors overlap. `__metadata__` is ignored. Tensor data is never
 * copied: speed_tensor_t.data points into the mapping.
 *
 * Ownership: the speed_safetensors_t owns the mapping, the tensor table and the names; every
 * pointer it hands out stays valid until speed_safetensors_close.
 * Thread-safety: open/close are reentrant; an open file is immutable and may be read from any
 * number of threads.
 */
#ifndef SPEED_SAFETENSORS_H
#define SPEED_SAFETENSORS_H

#include <stddef.h>

#include "status.h"
#include "tensor.h"

/* The safetensors specification caps the JSON header at 100 MB. */
#define SPEED_SAFETENSORS_MAX_HEADER (100u << 20)

typedef struct speed_safetensors speed_safetensors_t;

/* Opens and validates `path`. On success *st_p owns the mapping.
 * Returns:
 *   SPEED_OK
 *   SPEED_ERR_NOT_FOUND    the file does not exist
 *   SPEED_ERR_IO           open/fstat/mmap failed
 *   SPEED_ERR_PARSE        the header is not JSON
 *   SPEED_ERR_FORMAT       not a regular file, too short, header length past end of file,
 *                          bad entry, bad or overlapping offsets, size != shape * dtype size,
 *                          misaligned data
 *   SPEED_ERR_UNSUPPORTED  a dtype other than F32/BF16/F16 (e.g. I8, F64), or > 4 dims
 *   SPEED_ERR_NO_MEMORY
 * Every error is logged once (SPEED_SUBSYS_MODEL) with the path; on error nothing stays
 * mapped or allocated and *st_p is untouched. */
speed_status_t speed_safetensors_open(const char *path, speed_safetensors_t **st_p);

/* Flags of speed_safetensors_open_flags. */
#define SPEED_SAFETENSORS_HUGEPAGES \
    1u /* read the file into anonymous memory in 2 MiB pages
                                        * (MADV_HUGEPAGE) instead of mapping it: a load-time
                                        * copy, then fewer TLB misses when the weights stream */

/* speed_safetensors_open with flags (0 = map the file). Same returns. */
speed_status_t speed_safetensors_open_flags(const char *path, unsigned flags, speed_safetensors_t **st_p);

/* Validates a safetensors image already in memory, data[0..size), exactly as
 * speed_safetensors_open validates a file. The buffer is borrowed, not copied: it must stay
 * valid and unchanged until speed_safetensors_close (tensor data points into it). `name`
 * (NULL: "(memory)") stands for the path in messages and in speed_safetensors_path.
 * Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (data NULL with size > 0), or the PARSE /
 * FORMAT / UNSUPPORTED / NO_MEMORY errors of speed_safetensors_open. For tests and fuzzing
 * (tests/fuzz), and for callers that already hold the bytes. */
speed_status_t speed_safetensors_open_memory(const void *data, size_t size, const char *name,
                                             speed_safetensors_t **st_p);

/* Unmaps (a file) and frees; NULL is a no-op. Invalidates every tensor obtained from `st`. */
void speed_safetensors_close(speed_safetensors_t *st);

/* The path given to open. */
const char *speed_safetensors_path(const speed_safetensors_t *st);

/* Number of tensors (entries other than __metadata__). */
int speed_safetensors_n_tensors(const speed_safetensors_t *st);

/* The i-th tensor, 0 <= i < n_tensors, in ascending byte order of the names. */
const speed_tensor_t *speed_safetensors_tensor(const speed_safetensors_t *st, int i);

/* The tensor called `name`, or NULL (nothing logged). O(log n). */
const speed_tensor_t *speed_safetensors_find(const speed_safetensors_t *st, const char *name);

/* Size of the file in bytes. */
size_t speed_safetensors_file_size(const speed_safetensors_t *st);

#endif /* SPEED_SAFETENSORS_H */
