#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; speedserve reads it in place on little-endian hosts"
#endif

struct speed_safetensors {
    char *path;
    void *map; /* [file_size] read-only */
    size_t file_size;
    void *unmap_addr; /* what to munmap: the file mapping, or the anonymous region */
    size_t unmap_len;
    int n_tensors;
    speed_tensor_t *tensors; /* [n_tensors] sorted by name */
    char *names;             /* all names, NUL-separated; tensors[i].name points here */
};

typedef struct {
    uint64_t start, end;
    int index;
} st_range_t;

static int st_tensor_cmp(const void *a, const void *b) {
    return strcmp(((const speed_tensor_t *)a)->name, ((const speed_tensor_t *)b)->name);
}

static int st_range_cmp(const void *a, const void *b) {
    const st_range_t *x = a, *y = b;
    if (x->start != y->start) return x->start < y->start ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Reads one header entry into *t (name already set). */
static speed_status_t st_entry_parse(const char *path, const char *name, json_t *entry, const unsigned char *data,
                                     uint64_t data_size, uint64_t data_file_offset, speed_tensor_t *t,
                                     st_range_t *range) {
    if (!json_is_object(entry)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: header entry is not an object", path, name);
        return SPEED_ERR_FORMAT;
    }
    json_t *dtype = json_object_get(entry, "dtype");
    json_t *shape = json_object_get(entry, "shape");
    json_t *offsets = json_object_get(entry, "data_offsets");
    if (!json_is_string(dtype) || !json_is_array(shape) || !json_is_array(offsets)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: %s missing or of the wrong type", path, name,
                    !json_is_string(dtype)  ? "dtype"
                    : !json_is_array(shape) ? "shape"
                                            : "data_offsets");
        return SPEED_ERR_FORMAT;
    }
    if (speed_dtype_safetensors_parse(json_string_value(dtype), &t->dtype) != SPEED_OK) {
        char known[64] = "";
        for (int d = 0; d < SPEED_DTYPE_COUNT; d++)
            snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", d ? ", " : "",
                     speed_dtype_safetensors_name((speed_dtype_t)d));
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: unsupported dtype \"%s\" (%s only)", path, name,
                    json_string_value(dtype), known);
        return SPEED_ERR_UNSUPPORTED;
    }
    uint64_t dsize = speed_dtype_size(t->dtype);

    if (json_array_size(shape) > SPEED_TENSOR_MAX_DIMS) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: %zu dims (at most %d supported)", path, name,
                    json_array_size(shape), SPEED_TENSOR_MAX_DIMS);
        return SPEED_ERR_UNSUPPORTED;
    }
    t->n_dims = (int)json_array_size(shape);
    uint64_t n_elements = 1;
    bool overflow = false;
    for (int i = 0; i < t->n_dims; i++) {
        json_t *d = json_array_get(shape, (size_t)i);
        if (!json_is_integer(d) || json_integer_value(d) < 0) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: shape must hold non-negative integers", path, name);
            return SPEED_ERR_FORMAT;
        }
        uint64_t dim = (uint64_t)json_integer_value(d);
        t->shape[i] = (int64_t)dim;
        if (dim && n_elements > (UINT64_MAX / dsize) / dim)
            overflow = true;
        else
            n_elements *= dim;
    }
    if (json_array_size(offsets) != 2 || !json_is_integer(json_array_get(offsets, 0)) ||
        !json_is_integer(json_array_get(offsets, 1)) || json_integer_value(json_array_get(offsets, 0)) < 0 ||
        json_integer_value(json_array_get(offsets, 1)) < 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: data_offsets must be two non-negative integers", path, name);
        return SPEED_ERR_FORMAT;
    }
    uint64_t start = (uint64_t)json_integer_value(json_array_get(offsets, 0));
    uint64_t end = (uint64_t)json_integer_value(json_array_get(offsets, 1));
    if (end < start) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: data_offsets [%llu, %llu] end before start", path, name,
                    (unsigned long long)start, (unsigned long long)end);
        return SPEED_ERR_FORMAT;
    }
    if (end > data_size) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL,
                    "%s: tensor %s: data_offsets [%llu, %llu] out of range (data area is %llu bytes)", path, name,
                    (unsigned long long)start, (unsigned long long)end, (unsigned long long)data_size);
        return SPEED_ERR_FORMAT;
    }
    if (overflow || end - start != n_elements * dsize) {
        char shape_text[96];
        speed_tensor_shape_format(t->shape, t->n_dims, shape_text, sizeof shape_text);
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensor %s: data_offsets span %llu bytes but shape %s of %s needs %s%llu",
                    path, name, (unsigned long long)(end - start), shape_text, json_string_value(dtype),
                    overflow ? "more than " : "",
                    overflow ? (unsigned long long)UINT64_MAX : (unsigned long long)(n_elements * dsize));
        return SPEED_ERR_FORMAT;
    }
    if (end > start && (data_file_offset + start) % dsize != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL,
                    "%s: tensor %s: data at file offset %llu is not aligned to its %llu-byte elements", path, name,
                    (unsigned long long)(data_file_offset + start), (unsigned long long)dsize);
        return SPEED_ERR_FORMAT;
    }
    t->data = data + start;
    t->n_bytes = (size_t)(end - start);
    range->start = start;
    range->end = end;
    return SPEED_OK;
}

static speed_status_t st_header_parse(speed_safetensors_t *st, json_t *root, uint64_t header_len) {
    const char *path = st->path;
    const unsigned char *data = (const unsigned char *)st->map + 8 + header_len;
    uint64_t data_size = st->file_size - 8 - header_len;

    size_t n = 0, names_len = 0;
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) continue;
        n++;
        names_len += strlen(key) + 1;
    }
    if (n > INT32_MAX) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: too many tensors", path);
        return SPEED_ERR_FORMAT;
    }
    st_range_t *ranges = NULL;
    speed_status_t status = SPEED_OK;
    st->tensors = speed_calloc(n ? n : 1, sizeof *st->tensors);
    st->names = speed_malloc(names_len ? names_len : 1);
    ranges = speed_malloc((n ? n : 1) * sizeof *ranges);
    if (!st->tensors || !st->names || !ranges) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory for %zu tensors", path, n);
        status = SPEED_ERR_NO_MEMORY;
        goto out;
    }

    size_t i = 0;
    char *name_at = st->names;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) continue;
        speed_tensor_t *t = &st->tensors[i];
        size_t len = strlen(key) + 1;
        memcpy(name_at, key, len);
        t->name = name_at;
        name_at += len;
        SPEED_CHECK_GOTO(st_entry_parse(path, key, value, data, data_size, 8 + header_len, t, &ranges[i]), status, out);
        ranges[i].index = (int)i;
        i++;
    }
    st->n_tensors = (int)n;

    /* Overlap: sort by start; an empty tensor occupies nothing and may sit anywhere. */
    qsort(ranges, n, sizeof *ranges, st_range_cmp);
    const st_range_t *prev = NULL;
    for (i = 0; i < n; i++) {
        if (ranges[i].end == ranges[i].start) continue;
        if (prev && ranges[i].start < prev->end) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: tensors %s [%llu, %llu] and %s [%llu, %llu] overlap", path,
                        st->tensors[prev->index].name, (unsigned long long)prev->start, (unsigned long long)prev->end,
                        st->tensors[ranges[i].index].name, (unsigned long long)ranges[i].start,
                        (unsigned long long)ranges[i].end);
            status = SPEED_ERR_FORMAT;
            goto out;
        }
        prev = &ranges[i];
    }
    qsort(st->tensors, n, sizeof *st->tensors, st_tensor_cmp);
    if ((8 + header_len) % 8 != 0)
        SPEED_DEBUG(SPEED_SUBSYS_MODEL, "%s: data area starts at offset %llu, not 8-aligned", path,
                    (unsigned long long)(8 + header_len));
out:
    speed_free(ranges);
    return status;
}

#define HUGE_PAGE ((size_t)2 << 20)

/* The whole file read into anonymous memory aligned to 2 MiB and advised MADV_HUGEPAGE, then
 * made read-only. Returns the data address (NULL on failure, errno set). */
static void *read_into_hugepages(int fd, size_t size, void **unmap_addr_p, size_t *unmap_len_p) {
    size_t len = (size + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE + HUGE_PAGE;
    char *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    char *mem = (char *)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
#ifdef MADV_HUGEPAGE
    madvise(mem, size, MADV_HUGEPAGE); /* a hint: without THP the copy is still correct */
#endif
    size_t done = 0;
    while (done < size) {
        ssize_t n = pread(fd, mem + done, size - done, (off_t)done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            int e = n < 0 ? errno : EIO;
            munmap(raw, len);
            errno = e;
            return NULL;
        }
        done += (size_t)n;
    }
    mprotect(raw, len, PROT_READ);
    *unmap_addr_p = raw;
    *unmap_len_p = len;
    return mem;
}

/* Validates st->map[0..file_size) (at least 8 bytes) and builds the tensor table. The
 * file and the memory entry points share it, so both check exactly the same things. */
static speed_status_t st_validate(speed_safetensors_t *st) {
    const char *path = st->path;
    speed_status_t status = SPEED_OK;
    json_t *root = NULL;
    uint64_t header_len;
    memcpy(&header_len, st->map, 8); /* little-endian host, checked above */
    if (header_len > st->file_size - 8) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: header length %llu past end of file (%zu bytes)", path,
                    (unsigned long long)header_len, st->file_size);
        return SPEED_ERR_FORMAT;
    }
    if (header_len > SPEED_SAFETENSORS_MAX_HEADER) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: header length %llu exceeds the %u-byte limit", path,
                    (unsigned long long)header_len, SPEED_SAFETENSORS_MAX_HEADER);
        return SPEED_ERR_FORMAT;
    }
    json_error_t jerr;
    root = json_loadb((const char *)st->map + 8, (size_t)header_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory parsing the header", path);
            return SPEED_ERR_NO_MEMORY;
        }
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: header is not JSON: %s at byte %d", path, jerr.text, jerr.position);
        return SPEED_ERR_PARSE;
    }
    if (!json_is_object(root)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: header is not a JSON object", path);
        status = SPEED_ERR_FORMAT;
    } else {
        status = st_header_parse(st, root, header_len);
    }
    json_decref(root);
    return status;
}

speed_status_t speed_safetensors_open(const char *path, speed_safetensors_t **st_p) {
    return speed_safetensors_open_flags(path, 0, st_p);
}

speed_status_t speed_safetensors_open_flags(const char *path, unsigned flags, speed_safetensors_t **st_p) {
    speed_status_t status = SPEED_OK;
    speed_safetensors_t *st = speed_calloc(1, sizeof *st);
    if (!st || !(st->path = speed_strdup(path))) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory", path);
        status = SPEED_ERR_NO_MEMORY;
        goto fail;
    }

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s", path, strerror(e));
        status = e == ENOENT ? SPEED_ERR_NOT_FOUND : SPEED_ERR_IO;
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: fstat: %s", path, strerror(errno));
        close(fd);
        status = SPEED_ERR_IO;
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: not a regular file", path);
        close(fd);
        status = SPEED_ERR_FORMAT;
        goto fail;
    }
    if (sb.st_size < 8) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %lld bytes is too short for a safetensors file", path,
                    (long long)sb.st_size);
        close(fd);
        status = SPEED_ERR_FORMAT;
        goto fail;
    }
    st->file_size = (size_t)sb.st_size;
    void *map;
    int map_errno;
    if (flags & SPEED_SAFETENSORS_HUGEPAGES) {
        map = read_into_hugepages(fd, st->file_size, &st->unmap_addr, &st->unmap_len);
        map_errno = errno;
        close(fd);
        if (!map) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: reading into 2 MiB pages: %s", path, strerror(map_errno));
            status = map_errno == ENOMEM ? SPEED_ERR_NO_MEMORY : SPEED_ERR_IO;
            goto fail;
        }
    } else {
        map = mmap(NULL, st->file_size, PROT_READ, MAP_PRIVATE, fd, 0);
        map_errno = errno;
        close(fd); /* the mapping keeps the file */
        if (map == MAP_FAILED) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: mmap: %s", path, strerror(map_errno));
            status = SPEED_ERR_IO;
            goto fail;
        }
        st->unmap_addr = map;
        st->unmap_len = st->file_size;
    }
    st->map = map;
    SPEED_CHECK_GOTO(st_validate(st), status, fail);
    *st_p = st;
    return SPEED_OK;

fail:
    speed_safetensors_close(st);
    return status;
}

speed_status_t speed_safetensors_open_memory(const void *data, size_t size, const char *name,
                                             speed_safetensors_t **st_p) {
    if (!name) name = "(memory)";
    if (!data && size) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: NULL data", name);
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    if (size < 8) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %zu bytes is too short for a safetensors file", name, size);
        return SPEED_ERR_FORMAT;
    }
    speed_safetensors_t *st = speed_calloc(1, sizeof *st);
    if (!st || !(st->path = speed_strdup(name))) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory", name);
        speed_free(st);
        return SPEED_ERR_NO_MEMORY;
    }
    st->map = (void *)data; /* borrowed: never written, never unmapped (unmap_addr stays NULL) */
    st->file_size = size;
    speed_status_t status = st_validate(st);
    if (status != SPEED_OK) {
        speed_safetensors_close(st);
        return status;
    }
    *st_p = st;
    return SPEED_OK;
}

void speed_safetensors_close(speed_safetensors_t *st) {
    if (!st) return;
    if (st->unmap_addr) munmap(st->unmap_addr, st->unmap_len);
    speed_free(st->tensors);
    speed_free(st->names);
    speed_free(st->path);
    speed_free(st);
}

const char *speed_safetensors_path(const speed_safetensors_t *st) { return st->path; }
int speed_safetensors_n_tensors(const speed_safetensors_t *st) { return st->n_tensors; }
size_t speed_safetensors_file_size(const speed_safetensors_t *st) { return st->file_size; }

const speed_tensor_t *speed_safetensors_tensor(const speed_safetensors_t *st, int i) {
    SPEED_ASSERT(i >= 0 && i < st->n_tensors);
    return &st->tensors[i];
}

const speed_tensor_t *speed_safetensors_find(const speed_safetensors_t *st, const char *name) {
    int lo = 0, hi = st->n_tensors;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, st->tensors[mid].name);
        if (c == 0) return &st->tensors[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}
