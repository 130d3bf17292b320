/* The safetensors reader: good files, and every way a file can be truncated or corrupt. */
#include <string.h>

#include "alloc.h"
#include "check.h"
#include "file.h"
#include "model_test_util.h"
#include "safetensors.h"

static int64_t g_base;

static void test_good(void) {
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[3] = {0x3f80, 0x4000, 0xc040};
    uint16_t c[2] = {0x3c00, 0x0001};
    tu_st_entry_t e[] = {
        {"zeta.weight", "F32", 2, {2, 3}, a, sizeof a}, {"scalar", "F32", 0, {0}, a, 4},
        {"mid.scale", "F16", 1, {2}, c, sizeof c},      {"alpha.bias", "BF16", 1, {3}, b, sizeof b},
        {"empty", "F32", 2, {0, 4}, NULL, 0}, /* at an odd offset: fine, it has no data */
    };
    tu_st_write(tu_path("good.safetensors"), e, 5);

    speed_safetensors_t *st = NULL;
    CHECK_INT_EQ(speed_safetensors_open(tu_path("good.safetensors"), &st), SPEED_OK);
    if (!st) return;
    CHECK_STR_EQ(speed_safetensors_path(st), tu_path("good.safetensors"));
    CHECK_INT_EQ(speed_safetensors_n_tensors(st), 5);
    /* sorted by name */
    CHECK_STR_EQ(speed_safetensors_tensor(st, 0)->name, "alpha.bias");
    CHECK_STR_EQ(speed_safetensors_tensor(st, 4)->name, "zeta.weight");

    const speed_tensor_t *t = speed_safetensors_find(st, "zeta.weight");
    CHECK(t != NULL);
    if (t) {
        CHECK_INT_EQ(t->dtype, SPEED_DTYPE_F32);
        CHECK_INT_EQ(t->n_dims, 2);
        CHECK_INT_EQ(t->shape[0], 2);
        CHECK_INT_EQ(t->shape[1], 3);
        CHECK_INT_EQ(t->n_bytes, 24);
        CHECK_INT_EQ(speed_tensor_n_elements(t), 6);
        CHECK(memcmp(t->data, a, sizeof a) == 0);
        CHECK((uintptr_t)t->data % 4 == 0);
    }
    t = speed_safetensors_find(st, "alpha.bias");
    CHECK(t && t->dtype == SPEED_DTYPE_BF16 && t->n_bytes == 6 && memcmp(t->data, b, 6) == 0);
    t = speed_safetensors_find(st, "mid.scale");
    CHECK(t && t->dtype == SPEED_DTYPE_F16 && memcmp(t->data, c, 4) == 0);
    t = speed_safetensors_find(st, "empty");
    CHECK(t && t->n_bytes == 0 && speed_tensor_n_elements(t) == 0);
    t = speed_safetensors_find(st, "scalar");
    CHECK(t && t->n_dims == 0 && t->n_bytes == 4 && speed_tensor_n_elements(t) == 1);
    CHECK(speed_safetensors_find(st, "nope") == NULL);
    CHECK(speed_safetensors_find(st, "") == NULL);

    /* the data is read-only mapped, not a heap copy */
    CHECK(speed_alloc_live_bytes() < 4096 + 1024);
    speed_safetensors_close(st);
    speed_safetensors_close(NULL);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);

    /* zero tensors, metadata only, header padded with spaces */
    tu_st_write_raw(tu_path("empty.safetensors"), "{\"__metadata__\":{\"a\":\"b\"}}     ", 0);
    CHECK_INT_EQ(speed_safetensors_open(tu_path("empty.safetensors"), &st), SPEED_OK);
    if (st) CHECK_INT_EQ(speed_safetensors_n_tensors(st), 0);
    speed_safetensors_close(st);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

static void expect_bad_file(const char *file, speed_status_t want, const char *msg) {
    speed_safetensors_t *st = (speed_safetensors_t *)0x1;
    speed_log_clear_last_error();
    speed_status_t s = speed_safetensors_open(tu_path("%s", file), &st);
    CHECK_MSG(s == want, "%s: status %d, want %d", file, s, want);
    CHECK(st == (speed_safetensors_t *)0x1);
    CHECK_CONTAINS(speed_log_last_error(), file);
    CHECK_CONTAINS(speed_log_last_error(), msg);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

/* header + spaces so that the data area starts at a file offset == `mod` (mod 8) */
static const char *padded(const char *header, size_t mod) {
    static char buf[4096];
    size_t n = (size_t)snprintf(buf, sizeof buf - 16, "%s", header);
    while ((8 + n) % 8 != mod) buf[n++] = ' ';
    buf[n] = '\0';
    return buf;
}

static void expect_bad_header(const char *header, size_t n_data, speed_status_t want, const char *msg) {
    tu_st_write_raw(tu_path("bad.safetensors"), padded(header, 0), n_data);
    expect_bad_file("bad.safetensors", want, msg);
}

static void test_bad(void) {
    expect_bad_file("absent.safetensors", SPEED_ERR_NOT_FOUND, "No such file");
    tu_write(tu_path("short.safetensors"), "\x10\x00\x00", 3);
    expect_bad_file("short.safetensors", SPEED_ERR_FORMAT, "3 bytes is too short");
    tu_write(tu_path("zero.safetensors"), "", 0);
    expect_bad_file("zero.safetensors", SPEED_ERR_FORMAT, "too short");
    mkdir(tu_path("dir.safetensors"), 0755);
    expect_bad_file("dir.safetensors", SPEED_ERR_FORMAT, "not a regular file");

    /* header length past end of file */
    unsigned char past[16] = {0xe8, 0x03, 0, 0, 0, 0, 0, 0, '{', '}'};
    tu_write(tu_path("past.safetensors"), past, 10);
    expect_bad_file("past.safetensors", SPEED_ERR_FORMAT, "header length 1000 past end of file (10 bytes)");
    unsigned char huge[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    tu_write(tu_path("huge.safetensors"), huge, 8);
    expect_bad_file("huge.safetensors", SPEED_ERR_FORMAT, "past end of file");

    /* a real file cut short: the last tensor's data is missing */
    float a[64] = {0};
    tu_st_entry_t e[] = {{"w", "F32", 1, {64}, a, sizeof a}};
    tu_st_write(tu_path("cut.safetensors"), e, 1);
    size_t n = 0;
    char *whole = tu_read(tu_path("cut.safetensors"), &n);
    tu_write(tu_path("cut.safetensors"), whole, n - 100);
    free(whole);
    expect_bad_file("cut.safetensors", SPEED_ERR_FORMAT, "tensor w: data_offsets [0, 256] out of range");

    expect_bad_header("\x01\x02garbage", 0, SPEED_ERR_PARSE, "header is not JSON");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, SPEED_ERR_PARSE,
                      "header is not JSON");
    expect_bad_header("", 0, SPEED_ERR_PARSE, "header is not JSON");
    expect_bad_header("[1,2,3]", 0, SPEED_ERR_FORMAT, "header is not a JSON object");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                      8, SPEED_ERR_PARSE, "duplicate");
    expect_bad_header("{\"w\":[1]}", 0, SPEED_ERR_FORMAT, "tensor w: header entry is not an object");
    expect_bad_header("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, SPEED_ERR_FORMAT, "tensor w: dtype missing");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, SPEED_ERR_FORMAT,
                      "tensor w: shape missing");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, SPEED_ERR_FORMAT,
                      "tensor w: data_offsets missing");
    expect_bad_header("{\"w\":{\"dtype\":\"I8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4, SPEED_ERR_UNSUPPORTED,
                      "tensor w: unsupported dtype \"I8\"");
    expect_bad_header("{\"w\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, SPEED_ERR_UNSUPPORTED,
                      "unsupported dtype \"F64\"");
    expect_bad_header("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, SPEED_ERR_UNSUPPORTED,
                      "unsupported dtype \"f32\"");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
                      SPEED_ERR_UNSUPPORTED, "tensor w: 5 dims");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, SPEED_ERR_FORMAT,
                      "shape must hold non-negative integers");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"4\"],\"data_offsets\":[0,4]}}", 4, SPEED_ERR_FORMAT,
                      "shape must hold non-negative integers");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, SPEED_ERR_FORMAT,
                      "data_offsets must be two non-negative integers");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, SPEED_ERR_FORMAT,
                      "data_offsets must be two non-negative integers");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, SPEED_ERR_FORMAT,
                      "tensor w: data_offsets [8, 4] end before start");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, SPEED_ERR_FORMAT,
                      "tensor w: data_offsets [0, 8] out of range (data area is 4 bytes)");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 16, SPEED_ERR_FORMAT,
                      "tensor w: data_offsets span 8 bytes but shape [3] of F32 needs 12");
    expect_bad_header("{\"w\":{\"dtype\":\"BF16\",\"shape\":[4611686018427387904,8],"
                      "\"data_offsets\":[0,8]}}",
                      16, SPEED_ERR_FORMAT, "needs more than");
    /* overlapping (w: [0, 16), v: [8, 24)), and out-of-range offsets */
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                      "\"v\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
                      24, SPEED_ERR_FORMAT, "tensors w [0, 16] and v [8, 24] overlap");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                      "\"v\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                      16, SPEED_ERR_FORMAT, "overlap");
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                      "\"v\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[1000000,1000016]}}",
                      16, SPEED_ERR_FORMAT, "tensor v: data_offsets [1000000, 1000016] out of range");
    /* misaligned: an F32 tensor at data offset 2 (the data area itself starts 8-aligned) */
    expect_bad_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[2,6]}}", 8, SPEED_ERR_FORMAT,
                      "is not aligned to its 4-byte elements");

    /* fine: an empty tensor inside another's range, holes between tensors, an unpadded header
     * when the element alignment still holds (BF16 at an even offset) */
    tu_st_write_raw(tu_path("ok.safetensors"),
                    padded("{\"w\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]},"
                           "\"e\":{\"dtype\":\"BF16\",\"shape\":[0],\"data_offsets\":[4,4]},"
                           "\"v\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[12,16]}}",
                           2),
                    16);
    speed_safetensors_t *st = NULL;
    CHECK_INT_EQ(speed_safetensors_open(tu_path("ok.safetensors"), &st), SPEED_OK);
    speed_safetensors_close(st);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

/* speed_safetensors_open_memory: the same validation on bytes in memory, the buffer borrowed. */
static void test_memory(void) {
    char *bytes = NULL;
    size_t len = 0;
    CHECK_INT_EQ(speed_file_read(tu_path("good.safetensors"), 1 << 20, SPEED_SUBSYS_MODEL, SPEED_FILE_READ_DEFAULT,
                                 &bytes, &len),
                 SPEED_OK);
    if (!bytes) return;
    speed_safetensors_t *st = NULL, *file = NULL;
    CHECK_INT_EQ(speed_safetensors_open_memory(bytes, len, "mem", &st), SPEED_OK);
    CHECK_INT_EQ(speed_safetensors_open(tu_path("good.safetensors"), &file), SPEED_OK);
    if (st && file) {
        CHECK_STR_EQ(speed_safetensors_path(st), "mem");
        CHECK_INT_EQ(speed_safetensors_n_tensors(st), speed_safetensors_n_tensors(file));
        CHECK_INT_EQ(speed_safetensors_file_size(st), len);
        const speed_tensor_t *t = speed_safetensors_find(st, "zeta.weight");
        const speed_tensor_t *u = speed_safetensors_find(file, "zeta.weight");
        CHECK(t && u && t->n_bytes == u->n_bytes && !memcmp(t->data, u->data, t->n_bytes));
        /* borrowed, not copied: the tensor points into the caller's buffer */
        CHECK(t && (const char *)t->data > bytes && (const char *)t->data < bytes + len);
    }
    speed_safetensors_close(st);
    speed_safetensors_close(file);
    /* the file checks apply: too short, header past the end, a corrupt entry */
    speed_log_clear_last_error();
    CHECK_INT_EQ(speed_safetensors_open_memory(bytes, 7, "short", &st), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(speed_log_last_error(), "7 bytes is too short");
    CHECK_INT_EQ(speed_safetensors_open_memory(bytes, 40, "cut", &st), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(speed_log_last_error(), "past end of file");
    CHECK_INT_EQ(speed_safetensors_open_memory(NULL, 8, NULL, &st), SPEED_ERR_INVALID_ARGUMENT);
    speed_free(bytes);
    CHECK_INT_EQ(speed_alloc_live_count(), g_base);
}

int main(void) {
    tu_log_capture();
    tu_tmp_init("model_safetensors");
    g_base = speed_alloc_live_count();
    test_good();
    test_memory();
    test_bad();
    tu_rm_rf(tu_root);
    return CHECK_DONE();
}
