#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "alloc.h"

speed_status_t speed_file_read(const char *path, size_t max_bytes, speed_log_subsys_t subsys, unsigned flags,
                               char **data_p, size_t *len_p) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT && (flags & SPEED_FILE_READ_OPTIONAL)) return SPEED_ERR_NOT_FOUND;
        speed_log(SPEED_LOG_ERROR, subsys, NULL, "%s: %s", path, strerror(e));
        return e == ENOENT ? SPEED_ERR_NOT_FOUND : SPEED_ERR_IO;
    }
    speed_status_t status = SPEED_OK;
    char *buf = NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        speed_log(SPEED_LOG_ERROR, subsys, NULL, "%s: fstat: %s", path, strerror(errno));
        status = SPEED_ERR_IO;
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        speed_log(SPEED_LOG_ERROR, subsys, NULL, "%s: is a directory, expected a file", path);
        status = SPEED_ERR_INVALID_ARGUMENT;
        goto out;
    }
    /* Regular files are read in one allocation (one byte of room to see the end, one for the
     * NUL); pipes, and files that report size 0 (/proc), grow the buffer as they go. */
    size_t cap = S_ISREG(st.st_mode) && st.st_size > 0 ? (size_t)st.st_size + 2 : 1 << 16, len = 0;
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size > max_bytes) goto too_long;
    for (;;) {
        if (!buf || len + 1 >= cap) {
            size_t new_cap = buf ? cap * 2 : cap;
            char *grown = speed_realloc(buf, new_cap);
            if (!grown) {
                speed_log(SPEED_LOG_ERROR, subsys, NULL, "%s: out of memory reading %zu bytes", path, new_cap);
                status = SPEED_ERR_NO_MEMORY;
                goto out;
            }
            buf = grown;
            cap = new_cap;
        }
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            speed_log(SPEED_LOG_ERROR, subsys, NULL, "%s: read: %s", path, strerror(errno));
            status = SPEED_ERR_IO;
            goto out;
        }
        if (n == 0) break;
        len += (size_t)n;
        if (len > max_bytes) goto too_long;
    }
    buf[len] = '\0';
    *data_p = buf;
    *len_p = len;
    buf = NULL;
out:
    speed_free(buf);
    close(fd);
    return status;
too_long:
    speed_log(SPEED_LOG_ERROR, subsys, NULL, "%s: larger than the %zu bytes allowed", path, max_bytes);
    status = SPEED_ERR_TOO_LONG;
    goto out;
}

char *speed_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = speed_malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t n = a;
    if (a == 0 || dir[a - 1] != '/') p[n++] = '/';
    memcpy(p + n, name, b + 1);
    return p;
}

const char *speed_path_base(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}
