/* common/status, common/log, common/alloc. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "check.h"
#include "log.h"
#include "status.h"

/* ---- status ------------------------------------------------------------------------- */

static void test_status(void) {
    static const speed_status_t all[] = {
        SPEED_OK,
        SPEED_ERR_INVALID_ARGUMENT,
        SPEED_ERR_NOT_FOUND,
        SPEED_ERR_PARSE,
        SPEED_ERR_FORMAT,
        SPEED_ERR_UNSUPPORTED,
        SPEED_ERR_TOO_LONG,
        SPEED_ERR_CAPACITY,
        SPEED_ERR_CANCELLED,
        SPEED_ERR_TIMEOUT,
        SPEED_ERR_NO_MEMORY,
        SPEED_ERR_PEER_UNREACHABLE,
        SPEED_ERR_PEER_PROTOCOL,
        SPEED_ERR_TRANSFER,
        SPEED_ERR_IO,
        SPEED_ERR_DEVICE,
        SPEED_ERR_INTERNAL,
    };
    size_t n = sizeof all / sizeof all[0];
    for (size_t i = 0; i < n; i++) {
        const char *s = speed_status_string(all[i]);
        CHECK(s != NULL && s[0] != '\0');
        CHECK_MSG(strcmp(s, "unknown status") != 0, "status %d has no name", all[i]);
        for (const char *c = s; *c; c++) CHECK_MSG(*c < 'A' || *c > 'Z', "'%s' not lowercase", s);
        for (size_t j = 0; j < i; j++) CHECK_MSG(strcmp(s, speed_status_string(all[j])) != 0, "'%s' used twice", s);
    }
    CHECK_STR_EQ(speed_status_string(SPEED_OK), "ok");
    CHECK_STR_EQ(speed_status_string(SPEED_ERR_NO_MEMORY), "out of memory");
    CHECK_STR_EQ(speed_status_string((speed_status_t)-55), "unknown status");
    CHECK_STR_EQ(speed_status_string((speed_status_t)7), "unknown status");

    CHECK(speed_status_is_retryable(SPEED_ERR_CAPACITY));
    CHECK(speed_status_is_retryable(SPEED_ERR_TIMEOUT));
    CHECK(speed_status_is_retryable(SPEED_ERR_PEER_UNREACHABLE));
    CHECK(speed_status_is_retryable(SPEED_ERR_PEER_PROTOCOL));
    CHECK(speed_status_is_retryable(SPEED_ERR_TRANSFER));
    CHECK(!speed_status_is_retryable(SPEED_OK));
    CHECK(!speed_status_is_retryable(SPEED_ERR_INVALID_ARGUMENT));
    CHECK(!speed_status_is_retryable(SPEED_ERR_NO_MEMORY));
    CHECK(!speed_status_is_retryable(SPEED_ERR_IO));
    CHECK(!speed_status_is_retryable(SPEED_ERR_INTERNAL));
}

static speed_status_t fails_with(speed_status_t st) { return st; }

static speed_status_t use_check(speed_status_t st, int *reached_p) {
    SPEED_CHECK(fails_with(st));
    *reached_p = 1;
    return SPEED_OK;
}

static speed_status_t use_check_goto(speed_status_t st, int *cleaned_p) {
    speed_status_t status = SPEED_OK;
    SPEED_CHECK_GOTO(fails_with(st), status, out);
    status = SPEED_OK;
out:
    *cleaned_p = 1;
    return status;
}

static void test_check_macros(void) {
    int reached = 0;
    CHECK_INT_EQ(use_check(SPEED_ERR_PARSE, &reached), SPEED_ERR_PARSE);
    CHECK_INT_EQ(reached, 0);
    CHECK_INT_EQ(use_check(SPEED_OK, &reached), SPEED_OK);
    CHECK_INT_EQ(reached, 1);
    int cleaned = 0;
    CHECK_INT_EQ(use_check_goto(SPEED_ERR_IO, &cleaned), SPEED_ERR_IO);
    CHECK_INT_EQ(cleaned, 1);
    cleaned = 0;
    CHECK_INT_EQ(use_check_goto(SPEED_OK, &cleaned), SPEED_OK);
    CHECK_INT_EQ(cleaned, 1);
    SPEED_ASSERT(1 + 1 == 2); /* must not abort */
}

/* ---- log ---------------------------------------------------------------------------- */

typedef struct {
    int n;
    speed_log_level_t level;
    speed_log_subsys_t subsys;
    char request_id[64];
    char line[1100];
} captured_t;

static void capture_sink(void *user, speed_log_level_t level, speed_log_subsys_t subsys, const char *request_id,
                         const char *line) {
    captured_t *c = user;
    c->n++;
    c->level = level;
    c->subsys = subsys;
    snprintf(c->request_id, sizeof c->request_id, "%s", request_id ? request_id : "(none)");
    snprintf(c->line, sizeof c->line, "%s", line);
}

static void test_log_configure(void) {
    speed_log_level_t lvl = SPEED_LOG_ERROR;
    CHECK_INT_EQ(speed_log_level_parse("debug", &lvl), SPEED_OK);
    CHECK_INT_EQ(lvl, SPEED_LOG_DEBUG);
    CHECK_INT_EQ(speed_log_level_parse("WARN", &lvl), SPEED_OK);
    CHECK_INT_EQ(lvl, SPEED_LOG_WARN);
    CHECK_INT_EQ(speed_log_level_parse("trace", &lvl), SPEED_OK);
    CHECK_INT_EQ(lvl, SPEED_LOG_TRACE);
    CHECK_INT_EQ(speed_log_level_parse("verbose", &lvl), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(lvl, SPEED_LOG_TRACE);

    CHECK_STR_EQ(speed_log_subsys_name(SPEED_SUBSYS_CORE), "core");
    CHECK_STR_EQ(speed_log_subsys_name(SPEED_SUBSYS_TOK), "tok");
    CHECK_STR_EQ(speed_log_subsys_name(SPEED_SUBSYS_CLI), "cli");
    CHECK_STR_EQ(speed_log_subsys_name(SPEED_SUBSYS_COUNT), "?");
    for (int s = 0; s < SPEED_SUBSYS_COUNT; s++) CHECK(strcmp(speed_log_subsys_name((speed_log_subsys_t)s), "?") != 0);

    CHECK_INT_EQ(speed_log_configure("warn,tok=debug"), SPEED_OK);
    CHECK(speed_log_enabled(SPEED_LOG_ERROR, SPEED_SUBSYS_MODEL));
    CHECK(speed_log_enabled(SPEED_LOG_WARN, SPEED_SUBSYS_MODEL));
    CHECK(!speed_log_enabled(SPEED_LOG_INFO, SPEED_SUBSYS_MODEL));
    CHECK(speed_log_enabled(SPEED_LOG_DEBUG, SPEED_SUBSYS_TOK));
    CHECK(!speed_log_enabled(SPEED_LOG_TRACE, SPEED_SUBSYS_TOK));

    /* invalid specs change nothing */
    static const char *const bad[] = {
        "loud",
        "warn,bogus=debug",
        "warn,tok=loud",
        ",info",
        "info,,debug",
        "tok=",
        "info,tok=debug,engine=xx",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_MSG(speed_log_configure(bad[i]) == SPEED_ERR_INVALID_ARGUMENT, "'%s'", bad[i]);
        CHECK(!speed_log_enabled(SPEED_LOG_INFO, SPEED_SUBSYS_MODEL));
        CHECK(speed_log_enabled(SPEED_LOG_DEBUG, SPEED_SUBSYS_TOK));
        CHECK(!speed_log_enabled(SPEED_LOG_DEBUG, SPEED_SUBSYS_ENGINE));
    }

    /* later items override earlier ones; case is ignored; a trailing comma is fine */
    CHECK_INT_EQ(speed_log_configure("ENGINE=trace,error,kv=Info,"), SPEED_OK);
    CHECK(!speed_log_enabled(SPEED_LOG_WARN, SPEED_SUBSYS_ENGINE));
    CHECK(speed_log_enabled(SPEED_LOG_INFO, SPEED_SUBSYS_KV));
    CHECK(!speed_log_enabled(SPEED_LOG_DEBUG, SPEED_SUBSYS_KV));
    CHECK(!speed_log_enabled(SPEED_LOG_WARN, SPEED_SUBSYS_TOK));
    CHECK(speed_log_enabled(SPEED_LOG_ERROR, SPEED_SUBSYS_TOK)); /* errors always pass */
    CHECK_INT_EQ(speed_log_configure(""), SPEED_OK);             /* empty: no change */
    CHECK(speed_log_enabled(SPEED_LOG_INFO, SPEED_SUBSYS_KV));
    /* out-of-range subsystems are treated as core */
    CHECK_INT_EQ(speed_log_configure("error,core=debug"), SPEED_OK);
    CHECK(speed_log_enabled(SPEED_LOG_DEBUG, (speed_log_subsys_t)99));
    CHECK_INT_EQ(speed_log_configure("info"), SPEED_OK);
}

static void *other_thread_logs(void *arg) {
    speed_log_clear_last_error();
    speed_log(SPEED_LOG_ERROR, SPEED_SUBSYS_NET, NULL, "error on thread %d", 2);
    snprintf(arg, 64, "%s", speed_log_last_error());
    return NULL;
}

static void test_log_sink_and_last_error(void) {
    captured_t cap = {0};
    CHECK_INT_EQ(speed_log_configure("info"), SPEED_OK);
    speed_log_set_sink(capture_sink, &cap);
    speed_log_clear_last_error();
    CHECK_STR_EQ(speed_log_last_error(), "");

    speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_MODEL, "req-42", "loaded %d tensors", 291);
    CHECK_INT_EQ(cap.n, 1);
    CHECK_INT_EQ(cap.level, SPEED_LOG_INFO);
    CHECK_INT_EQ(cap.subsys, SPEED_SUBSYS_MODEL);
    CHECK_STR_EQ(cap.request_id, "req-42");
    CHECK_STR_EQ(cap.line, "loaded 291 tensors");
    CHECK_STR_EQ(speed_log_last_error(), ""); /* only errors are kept */

    /* filtered out: not delivered */
    speed_log(SPEED_LOG_DEBUG, SPEED_SUBSYS_MODEL, NULL, "hidden");
    SPEED_DEBUG(SPEED_SUBSYS_MODEL, "hidden too");
    CHECK_INT_EQ(cap.n, 1);

    /* errors: delivered, kept as last error, newlines folded to one line */
    SPEED_ERROR(SPEED_SUBSYS_TOK, "bad token %s\nsecond line\r", "x");
    CHECK_INT_EQ(cap.n, 2);
    CHECK_INT_EQ(cap.level, SPEED_LOG_ERROR);
    CHECK_STR_EQ(cap.request_id, "(none)");
    CHECK_STR_EQ(cap.line, "bad token x second line ");
    CHECK_STR_EQ(speed_log_last_error(), "bad token x second line ");
    SPEED_WARN(SPEED_SUBSYS_TOK, "a warning");
    CHECK_INT_EQ(cap.n, 3);
    CHECK_STR_EQ(speed_log_last_error(), "bad token x second line ");

    /* an error is kept even when errors are the only level and the sink is gone */
    CHECK_INT_EQ(speed_log_configure("error"), SPEED_OK);
    SPEED_INFO(SPEED_SUBSYS_CORE, "not shown");
    CHECK_INT_EQ(cap.n, 3);
    SPEED_ERROR(SPEED_SUBSYS_CORE, "second error");
    CHECK_INT_EQ(cap.n, 4);
    CHECK_STR_EQ(speed_log_last_error(), "second error");

    /* out-of-range level and subsystem are clamped, not crashed on */
    CHECK_INT_EQ(speed_log_configure("trace"), SPEED_OK);
    speed_log((speed_log_level_t)17, (speed_log_subsys_t)42, "", "clamped");
    CHECK_INT_EQ(cap.n, 5);
    CHECK_INT_EQ(cap.level, SPEED_LOG_TRACE);
    CHECK_INT_EQ(cap.subsys, SPEED_SUBSYS_CORE);

    /* very long messages are truncated, not overflowed */
    char big[3000];
    memset(big, 'y', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    SPEED_ERROR(SPEED_SUBSYS_CORE, "%s", big);
    CHECK(strlen(cap.line) > 500 && strlen(cap.line) < sizeof big);
    CHECK(strlen(speed_log_last_error()) < sizeof big);

    /* last error is per thread */
    SPEED_ERROR(SPEED_SUBSYS_CORE, "main thread error");
    char other[64] = "";
    pthread_t th;
    CHECK_INT_EQ(pthread_create(&th, NULL, other_thread_logs, other), 0);
    pthread_join(th, NULL);
    CHECK_STR_EQ(other, "error on thread 2");
    CHECK_STR_EQ(speed_log_last_error(), "main thread error");
    speed_log_clear_last_error();
    CHECK_STR_EQ(speed_log_last_error(), "");

    /* back to stderr: must not crash, and still records the last error */
    speed_log_set_sink(NULL, NULL);
    int before = cap.n;
    speed_log(SPEED_LOG_INFO, SPEED_SUBSYS_CLI, "req-1", "to stderr (expected in test output)");
    SPEED_ERROR(SPEED_SUBSYS_CLI, "stderr error (expected in test output)");
    CHECK_INT_EQ(cap.n, before);
    CHECK_STR_EQ(speed_log_last_error(), "stderr error (expected in test output)");
    CHECK_INT_EQ(speed_log_configure("info"), SPEED_OK);
}

/* ---- alloc -------------------------------------------------------------------------- */

static void test_alloc_counting(void) {
    int64_t c0 = speed_alloc_live_count(), b0 = speed_alloc_live_bytes();
    int64_t t0 = speed_alloc_total_count();
    char *a = speed_malloc(100);
    CHECK(a != NULL);
    CHECK(((uintptr_t)a % _Alignof(max_align_t)) == 0);
    memset(a, 1, 100);
    int *b = speed_calloc(10, sizeof(int));
    CHECK(b != NULL);
    int zero = 1;
    for (int i = 0; i < 10; i++) zero &= b[i] == 0;
    CHECK(zero);
    CHECK_INT_EQ(speed_alloc_live_count() - c0, 2);
    CHECK_INT_EQ(speed_alloc_live_bytes() - b0, 100 + 10 * (int64_t)sizeof(int));
    CHECK_INT_EQ(speed_alloc_total_count() - t0, 2);
    speed_free(a);
    speed_free(b);
    speed_free(NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
    CHECK_INT_EQ(speed_alloc_live_bytes(), b0);
    CHECK_INT_EQ(speed_alloc_total_count() - t0, 2); /* monotonic */

    /* zero-size blocks are real allocations */
    void *z = speed_malloc(0);
    CHECK(z != NULL);
    CHECK_INT_EQ(speed_alloc_live_count() - c0, 1);
    speed_free(z);
    /* calloc overflow */
    CHECK(speed_calloc(SIZE_MAX / 2, 4) == NULL);
    CHECK(speed_malloc(SIZE_MAX - 4) == NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
}

static void test_alloc_realloc(void) {
    int64_t c0 = speed_alloc_live_count(), b0 = speed_alloc_live_bytes();
    char *p = speed_realloc(NULL, 16); /* acts as malloc */
    CHECK(p != NULL);
    CHECK_INT_EQ(speed_alloc_live_count() - c0, 1);
    for (int i = 0; i < 16; i++) p[i] = (char)i;
    p = speed_realloc(p, 100000);
    CHECK(p != NULL);
    int same = 1;
    for (int i = 0; i < 16; i++) same &= p[i] == (char)i;
    CHECK(same);
    CHECK_INT_EQ(speed_alloc_live_count() - c0, 1);
    CHECK_INT_EQ(speed_alloc_live_bytes() - b0, 100000);
    p = speed_realloc(p, 8);
    CHECK(p != NULL);
    CHECK_INT_EQ(speed_alloc_live_bytes() - b0, 8);
    same = 1;
    for (int i = 0; i < 8; i++) same &= p[i] == (char)i;
    CHECK(same);

    /* an injected failure leaves the block untouched and accounted */
    speed_alloc_fail_after(0, 0);
    CHECK(speed_realloc(p, 4096) == NULL);
    CHECK_INT_EQ(speed_alloc_injected_failures(), 1);
    CHECK_INT_EQ(speed_alloc_live_bytes() - b0, 8);
    same = 1;
    for (int i = 0; i < 8; i++) same &= p[i] == (char)i;
    CHECK(same);
    CHECK(speed_realloc(p, SIZE_MAX - 4) == NULL);
    CHECK_INT_EQ(speed_alloc_live_bytes() - b0, 8);
    speed_free(p);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
    CHECK_INT_EQ(speed_alloc_live_bytes(), b0);
}

static void test_alloc_aligned(void) {
    int64_t c0 = speed_alloc_live_count(), b0 = speed_alloc_live_bytes();
    static const size_t aligns[] = {sizeof(void *), 16, 32, 64, 128, 4096, 1 << 16};
    static const size_t sizes[] = {0, 1, 63, 64, 1000, 1 << 20};
    for (size_t i = 0; i < sizeof aligns / sizeof aligns[0]; i++) {
        for (size_t j = 0; j < sizeof sizes / sizeof sizes[0]; j++) {
            unsigned char *p = speed_aligned_alloc(aligns[i], sizes[j]);
            CHECK_MSG(p != NULL, "align %zu size %zu", aligns[i], sizes[j]);
            if (!p) continue;
            CHECK_MSG((uintptr_t)p % aligns[i] == 0, "align %zu", aligns[i]);
            if (sizes[j]) {
                memset(p, 0xcd, sizes[j]); /* the whole block is usable */
                CHECK(p[sizes[j] - 1] == 0xcd);
            }
            CHECK_INT_EQ(speed_alloc_live_bytes() - b0, (int64_t)sizes[j]);
            speed_aligned_free(p);
        }
    }
    speed_aligned_free(NULL);
    CHECK(speed_aligned_alloc(3, 64) == NULL); /* not a power of two */
    CHECK(speed_aligned_alloc(48, 64) == NULL);
    CHECK(speed_aligned_alloc(sizeof(void *) / 2, 64) == NULL); /* below sizeof(void *) */
    CHECK(speed_aligned_alloc(64, SIZE_MAX - 8) == NULL);
    speed_alloc_fail_after(0, 0);
    CHECK(speed_aligned_alloc(64, 64) == NULL);
    CHECK_INT_EQ(speed_alloc_injected_failures(), 1);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
    CHECK_INT_EQ(speed_alloc_live_bytes(), b0);
}

static void test_alloc_fault_injection(void) {
    int64_t c0 = speed_alloc_live_count();
    /* the third allocation from now fails, the others succeed */
    speed_alloc_fail_after(2, 0);
    void *a = speed_malloc(8), *b = speed_malloc(8), *c = speed_malloc(8), *d = speed_malloc(8);
    CHECK(a && b && !c && d);
    CHECK_INT_EQ(speed_alloc_injected_failures(), 1);
    speed_free(a);
    speed_free(b);
    speed_free(d);

    /* sticky: every allocation from the failing one on */
    speed_alloc_fail_after(1, 1);
    a = speed_malloc(8);
    CHECK(a != NULL);
    CHECK(speed_malloc(8) == NULL);
    CHECK(speed_calloc(2, 8) == NULL);
    CHECK(speed_strdup("x") == NULL);
    CHECK(speed_aligned_alloc(64, 8) == NULL);
    CHECK_INT_EQ(speed_alloc_injected_failures(), 4);
    speed_alloc_fail_after(-1, 0); /* off; also resets the injected count */
    CHECK_INT_EQ(speed_alloc_injected_failures(), 0);
    b = speed_malloc(8);
    CHECK(b != NULL);
    speed_free(a);
    speed_free(b);

    /* frees are not allocations and do not move the countdown */
    a = speed_malloc(8);
    speed_alloc_fail_after(1, 0);
    speed_free(a);
    b = speed_malloc(8);
    CHECK(b != NULL);
    CHECK(speed_malloc(8) == NULL);
    speed_free(b);
    speed_alloc_fail_after(-1, 0);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
}

static void test_alloc_strdup(void) {
    int64_t c0 = speed_alloc_live_count(), b0 = speed_alloc_live_bytes();
    char *s = speed_strdup("hello");
    CHECK_STR_EQ(s, "hello");
    CHECK_INT_EQ(speed_alloc_live_bytes() - b0, 6);
    char *e = speed_strdup("");
    CHECK_STR_EQ(e, "");
    char *n = speed_strndup("hello world", 5);
    CHECK_STR_EQ(n, "hello");
    char *m = speed_strndup("hi", 100); /* n past the end: stops at the NUL */
    CHECK_STR_EQ(m, "hi");
    char unterminated[3] = {'a', 'b', 'c'};
    char *u = speed_strndup(unterminated, 3); /* reads at most n bytes */
    CHECK_STR_EQ(u, "abc");
    speed_free(s);
    speed_free(e);
    speed_free(n);
    speed_free(m);
    speed_free(u);
    speed_alloc_fail_after(0, 0);
    CHECK(speed_strndup("abc", 2) == NULL);
    speed_alloc_fail_after(-1, 0);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
    CHECK_INT_EQ(speed_alloc_live_bytes(), b0);
}

#if defined(__SANITIZE_ADDRESS__)
static void test_alloc_oom_hook(void) {
    fprintf(stderr, "oom hook: skipped under AddressSanitizer (huge mallocs abort there)\n");
}
#else
static size_t g_oom_size;
static void returning_oom_hook(size_t size) { g_oom_size = size; }

static void test_alloc_oom_hook(void) {
    int64_t c0 = speed_alloc_live_count();
    speed_alloc_set_oom_hook(returning_oom_hook);
    /* far beyond any machine: the system allocator fails, the hook returns, NULL comes back */
    size_t huge = (size_t)1 << 62;
    void *p = speed_malloc(huge);
    CHECK(p == NULL);
    CHECK_INT_EQ(g_oom_size, huge);
    g_oom_size = 0;
    char *q = speed_malloc(4);
    CHECK(q != NULL);
    CHECK(speed_realloc(q, huge) == NULL);
    CHECK_INT_EQ(g_oom_size, huge);
    speed_free(q);
    speed_alloc_set_oom_hook(NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
}
#endif

static void *alloc_worker(void *arg) {
    for (int i = 0; i < 10000; i++) {
        void *p = speed_malloc((size_t)(i % 64) + 1);
        speed_free(p);
    }
    return arg;
}

static void test_alloc_threads(void) {
    int64_t c0 = speed_alloc_live_count(), b0 = speed_alloc_live_bytes();
    pthread_t th[4];
    for (int i = 0; i < 4; i++) CHECK_INT_EQ(pthread_create(&th[i], NULL, alloc_worker, NULL), 0);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), c0);
    CHECK_INT_EQ(speed_alloc_live_bytes(), b0);
}

int main(void) {
    test_status();
    test_check_macros();
    test_log_configure();
    test_log_sink_and_last_error();
    test_alloc_counting();
    test_alloc_realloc();
    test_alloc_aligned();
    test_alloc_fault_injection();
    test_alloc_strdup();
    test_alloc_oom_hook();
    test_alloc_threads();
    return CHECK_DONE();
}
