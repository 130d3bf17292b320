/* fuzz_util.h: the fuzz targets' shared setup. */
#define _GNU_SOURCE /* memfd_create */
#include "fuzz_util.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

static void drop_log(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                     const char *line) {
    (void)user, (void)level, (void)subsys, (void)request_id, (void)line;
}

void fz_init(void) {
    if (!getenv("SPEED_FUZZ_LOG")) speed_log_set_sink(drop_log, NULL);
    json_set_alloc_funcs(speed_malloc, speed_free);
}

int fz_memfd(const uint8_t *data, size_t size, char *path, size_t path_size) {
    int fd = memfd_create("speed-fuzz", MFD_CLOEXEC);
    if (fd < 0) {
        perror("memfd_create");
        abort();
    }
    for (size_t off = 0; off < size;) {
        ssize_t n = write(fd, data + off, size - off);
        if (n <= 0) {
            perror("write to memfd");
            abort();
        }
        off += (size_t)n;
    }
    snprintf(path, path_size, "/proc/self/fd/%d", fd);
    return fd;
}

void fz_fail(const char *file, int line, const char *what) {
    fprintf(stderr, "%s:%d: fuzz invariant broken: %s\n", file, line, what);
    abort();
}
