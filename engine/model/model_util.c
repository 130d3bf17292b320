#include "model_util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"
#include "log.h"

speed_status_t speed_model_file_read(const char *path, size_t max_bytes, char **text_p,
                                     size_t *len_p) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %s", path, strerror(e));
        return e == ENOENT ? SPEED_ERR_NOT_FOUND : SPEED_ERR_IO;
    }
    speed_status_t status = SPEED_OK;
    char *buf = NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: fstat: %s", path, strerror(errno));
        status = SPEED_ERR_IO;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: not a regular file", path);
        status = SPEED_ERR_FORMAT;
        goto out;
    }
    if ((uint64_t)st.st_size > max_bytes) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: %lld bytes is larger than the %zu allowed", path,
                    (long long)st.st_size, max_bytes);
        status = SPEED_ERR_FORMAT;
        goto out;
    }
    size_t size = (size_t)st.st_size, got = 0;
    buf = speed_malloc(size + 1);
    if (!buf) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: out of memory", path);
        status = SPEED_ERR_NO_MEMORY;
        goto out;
    }
    while (got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s: read: %s", path, strerror(errno));
            status = SPEED_ERR_IO;
            goto out;
        }
        if (n == 0) break; /* shrank under us: use what is there */
        got += (size_t)n;
    }
    buf[got] = '\0';
    *text_p = buf;
    *len_p = got;
    buf = NULL;
out:
    speed_free(buf);
    close(fd);
    return status;
}

char *speed_model_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = speed_malloc(a + b + 2);
    if (!p) {
        SPEED_ERROR(SPEED_SUBSYS_MODEL, "%s/%s: out of memory", dir, name);
        return NULL;
    }
    memcpy(p, dir, a);
    size_t n = a;
    if (a == 0 || dir[a - 1] != '/') p[n++] = '/';
    memcpy(p + n, name, b + 1);
    return p;
}

const char *speed_model_path_base(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}
