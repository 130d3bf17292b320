/* common/file.c: whole-file reads (regular files, pipes, limits, errors) and path helpers. */
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "file.h"
#include "log.h"
#include "test_fs.h"

static void test_read_regular(void) {
    static const char data[] = "a\0b\nc";
    tu_write(tu_path("nul.bin"), data, sizeof data - 1);
    char *text = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_file_read(tu_path("nul.bin"), 100, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_OK);
    CHECK_INT_EQ(len, 5);
    CHECK(text && memcmp(text, data, 5) == 0 && text[5] == '\0');
    speed_free(text);

    tu_write(tu_path("empty"), "", 0);
    text = NULL;
    CHECK_INT_EQ(speed_file_read(tu_path("empty"), 100, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_OK);
    CHECK_INT_EQ(len, 0);
    CHECK(text && text[0] == '\0');
    speed_free(text);

    /* exactly at the limit passes, one byte over fails */
    CHECK_INT_EQ(speed_file_read(tu_path("nul.bin"), 5, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_OK);
    speed_free(text);
    text = NULL;
    CHECK_INT_EQ(speed_file_read(tu_path("nul.bin"), 4, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_ERR_TOO_LONG);
    CHECK(text == NULL);
    CHECK_CONTAINS(speed_log_last_error(), "larger than the 4 bytes allowed");
}

/* A pipe has no size: the buffer grows as data arrives, and the limit still holds. */
static void test_read_pipe(void) {
    int fds[2];
    CHECK(pipe(fds) == 0);
    char dev[64];
    snprintf(dev, sizeof dev, "/proc/self/fd/%d", fds[0]);
    size_t n = 200000; /* several times the first 64 KiB chunk; written by a child */
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        char block[1000];
        for (size_t i = 0; i < sizeof block; i++) block[i] = (char)('a' + i % 26);
        for (size_t w = 0; w < n; w += sizeof block)
            if (write(fds[1], block, sizeof block) != (ssize_t)sizeof block) _exit(1);
        _exit(0);
    }
    close(fds[1]);
    char *text = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_file_read(dev, 1 << 20, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_OK);
    CHECK_INT_EQ(len, n);
    CHECK(text && text[0] == 'a' && text[26] == 'a' && text[n] == '\0');
    speed_free(text);
    close(fds[0]);
    waitpid(pid, NULL, 0);
}

/* /proc files say size 0 but have content: they are read like pipes. */
static void test_read_proc(void) {
    char *text = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_file_read("/proc/self/status", 1 << 20, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_OK);
    CHECK(len > 0 && text && strstr(text, "Pid:") != NULL);
    speed_free(text);
}

static void test_read_errors(void) {
    char *text = (char *)"untouched";
    size_t len = 7;
    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_file_read(tu_path("absent"), 10, SPEED_SUBSYS_CORE, SPEED_FILE_READ_OPTIONAL, &text, &len),
                 SPEED_ERR_NOT_FOUND);
    CHECK_STR_EQ(speed_log_last_error(), ""); /* optional: the caller decides what to say */
    CHECK_INT_EQ(speed_file_read(tu_path("absent"), 10, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_ERR_NOT_FOUND);
    CHECK_CONTAINS(speed_log_last_error(), "absent: No such file");
    CHECK_INT_EQ(speed_file_read(tu_root, 10, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "is a directory");
    CHECK_STR_EQ(text, "untouched");
    CHECK_INT_EQ(len, 7);
    if (geteuid() != 0) { /* root reads anything */
        tu_write(tu_path("secret"), "x", 1);
        chmod(tu_path("secret"), 0);
        CHECK_INT_EQ(speed_file_read(tu_path("secret"), 10, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_ERR_IO);
    }
}

static void test_read_fault_injection(void) {
    tu_write(tu_path("small"), "hello", 5);
    int64_t base = speed_alloc_live_count();
    speed_alloc_fail_after(0, 0);
    char *text = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_file_read(tu_path("small"), 10, SPEED_SUBSYS_CORE, 0, &text, &len), SPEED_ERR_NO_MEMORY);
    speed_alloc_fail_after(-1, 0);
    CHECK(text == NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), base);
}

static void test_paths(void) {
    char *p = speed_path_join("a/b", "c.json");
    CHECK_STR_EQ(p, "a/b/c.json");
    speed_free(p);
    p = speed_path_join("a/b/", "c.json");
    CHECK_STR_EQ(p, "a/b/c.json");
    speed_free(p);
    p = speed_path_join("", "c");
    CHECK_STR_EQ(p, "/c");
    speed_free(p);
    CHECK_STR_EQ(speed_path_base("x/y/model.safetensors"), "model.safetensors");
    CHECK_STR_EQ(speed_path_base("plain"), "plain");
}

int main(void) {
    tu_tmp_init("file");
    speed_log_configure("error");
    test_read_regular();
    test_read_pipe();
    test_read_proc();
    test_read_errors();
    test_read_fault_injection();
    test_paths();
    return CHECK_DONE();
}
