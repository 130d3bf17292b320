#include "alloc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* speed_malloc blocks carry a header with the requested size so that speed_free
 * can keep exact byte counts. The header is as large as max_align_t so the
 * returned pointer keeps malloc's alignment. */
typedef union {
    size_t size;
    max_align_t align_;
} alloc_header_t;

static int64_t g_live_count, g_live_bytes, g_total_count;
static int64_t g_fail_countdown = -1;
static int g_fail_sticky;
static int64_t g_injected;
static speed_alloc_oom_cb_t g_oom_hook;

static void default_oom(size_t size) {
    fprintf(stderr, "speedserve: out of host memory allocating %zu bytes\n", size);
    abort();
}

/* Returns 1 if this allocation should fail by injection. */
static int inject_failure(void) {
    int64_t c = __atomic_load_n(&g_fail_countdown, __ATOMIC_RELAXED);
    if (c < 0) return 0;
    if (c == 0) {
        if (!g_fail_sticky) __atomic_store_n(&g_fail_countdown, -1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&g_injected, 1, __ATOMIC_RELAXED);
        return 1;
    }
    __atomic_sub_fetch(&g_fail_countdown, 1, __ATOMIC_RELAXED);
    return 0;
}

static void account(int64_t count, int64_t bytes) {
    __atomic_add_fetch(&g_live_count, count, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_live_bytes, bytes, __ATOMIC_RELAXED);
    if (count > 0) __atomic_add_fetch(&g_total_count, count, __ATOMIC_RELAXED);
}

static void *oom(size_t size) {
    (g_oom_hook ? g_oom_hook : default_oom)(size);
    return NULL;
}

void *speed_malloc(size_t size) {
    if (inject_failure()) return NULL;
    if (size > SIZE_MAX - sizeof(alloc_header_t)) return NULL;
    alloc_header_t *h = malloc(sizeof *h + size);
    if (!h) return oom(size);
    h->size = size;
    account(1, (int64_t)size);
    return h + 1;
}

void *speed_calloc(size_t n, size_t size) {
    if (size && n > SIZE_MAX / size) return NULL;
    void *p = speed_malloc(n * size);
    if (p) memset(p, 0, n * size);
    return p;
}

void *speed_realloc(void *ptr, size_t size) {
    if (!ptr) return speed_malloc(size);
    if (inject_failure()) return NULL;
    if (size > SIZE_MAX - sizeof(alloc_header_t)) return NULL;
    alloc_header_t *old = (alloc_header_t *)ptr - 1;
    size_t old_size = old->size;
    alloc_header_t *h = realloc(old, sizeof *h + size);
    if (!h) return oom(size);
    h->size = size;
    account(0, (int64_t)size - (int64_t)old_size);
    return h + 1;
}

char *speed_strndup(const char *s, size_t n) {
    size_t len = strnlen(s, n);
    char *d = speed_malloc(len + 1);
    if (!d) return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *speed_strdup(const char *s) { return speed_strndup(s, SIZE_MAX); }

void speed_free(void *ptr) {
    if (!ptr) return;
    alloc_header_t *h = (alloc_header_t *)ptr - 1;
    account(-1, -(int64_t)h->size);
    free(h);
}

/* Aligned blocks keep their size in a header placed just before the returned pointer,
 * inside the alignment padding. */
void *speed_aligned_alloc(size_t alignment, size_t size) {
    if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return NULL;
    /* room for the size header and the base pointer in front of the block */
    if (alignment < 64) alignment = 64;
    if (inject_failure()) return NULL;
    if (size > SIZE_MAX - alignment) return NULL;
    void *base = NULL;
    if (posix_memalign(&base, alignment, alignment + size) != 0) return oom(size);
    char *p = (char *)base + alignment;
    alloc_header_t *h = (alloc_header_t *)p - 1;
    h->size = size;
    ((void **)h)[-1] = base; /* base pointer sits before the size header */
    account(1, (int64_t)size);
    return p;
}

void speed_aligned_free(void *ptr) {
    if (!ptr) return;
    alloc_header_t *h = (alloc_header_t *)ptr - 1;
    account(-1, -(int64_t)h->size);
    free(((void **)h)[-1]);
}

int64_t speed_alloc_live_count(void) { return __atomic_load_n(&g_live_count, __ATOMIC_RELAXED); }
int64_t speed_alloc_live_bytes(void) { return __atomic_load_n(&g_live_bytes, __ATOMIC_RELAXED); }
int64_t speed_alloc_total_count(void) { return __atomic_load_n(&g_total_count, __ATOMIC_RELAXED); }

void speed_alloc_fail_after(int64_t n, int sticky) {
    g_fail_sticky = sticky;
    __atomic_store_n(&g_injected, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_fail_countdown, n < 0 ? -1 : n, __ATOMIC_RELAXED);
}

int64_t speed_alloc_injected_failures(void) { return __atomic_load_n(&g_injected, __ATOMIC_RELAXED); }

void speed_alloc_set_oom_hook(speed_alloc_oom_cb_t hook) { g_oom_hook = hook; }
