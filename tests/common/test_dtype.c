/* common/dtype: names (ours, torch's, safetensors'), sizes, parsing and the bf16/f16
 * conversions (exhaustive where cheap). */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "dtype.h"

static uint32_t bits_of(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    return x;
}

static float float_of(uint32_t x) {
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static void test_names(void) {
    CHECK_INT_EQ(speed_dtype_size(SPEED_DTYPE_F32), 4);
    CHECK_INT_EQ(speed_dtype_size(SPEED_DTYPE_BF16), 2);
    CHECK_INT_EQ(speed_dtype_size(SPEED_DTYPE_F16), 2);
    CHECK_STR_EQ(speed_dtype_name(SPEED_DTYPE_F32), "f32");
    CHECK_STR_EQ(speed_dtype_name(SPEED_DTYPE_BF16), "bf16");
    CHECK_STR_EQ(speed_dtype_name(SPEED_DTYPE_F16), "f16");
    CHECK_STR_EQ(speed_dtype_name((speed_dtype_t)99), "?");
    CHECK_INT_EQ(speed_dtype_size((speed_dtype_t)99), 0);

    const struct {
        const char *s;
        speed_dtype_t d;
    } ok[] = {{"f32", SPEED_DTYPE_F32},       {"float32", SPEED_DTYPE_F32}, {"bf16", SPEED_DTYPE_BF16},
              {"bfloat16", SPEED_DTYPE_BF16}, {"f16", SPEED_DTYPE_F16},     {"float16", SPEED_DTYPE_F16},
              {"BF16", SPEED_DTYPE_BF16}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        speed_dtype_t d = (speed_dtype_t)99;
        CHECK_INT_EQ(speed_dtype_parse(ok[i].s, &d), SPEED_OK);
        CHECK_INT_EQ(d, ok[i].d);
    }
    const char *bad[] = {"", "f64", "float64", "int8", "half", "f32 ", NULL};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        speed_dtype_t d = SPEED_DTYPE_F16;
        CHECK_INT_EQ(speed_dtype_parse(bad[i], &d), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(d, SPEED_DTYPE_F16);
    }
}

/* Every spelling of every dtype parses back to it; the names array is the config's choices. */
static void test_round_trip(void) {
    for (int i = 0; i < SPEED_DTYPE_COUNT; i++) {
        speed_dtype_t want = (speed_dtype_t)i, d = (speed_dtype_t)99;
        CHECK_STR_EQ(speed_dtype_names[i], speed_dtype_name(want));
        CHECK_INT_EQ(speed_dtype_parse(speed_dtype_name(want), &d), SPEED_OK);
        CHECK_INT_EQ(d, want);
        d = (speed_dtype_t)99;
        CHECK_INT_EQ(speed_dtype_parse(speed_dtype_torch_name(want), &d), SPEED_OK);
        CHECK_INT_EQ(d, want);
        d = (speed_dtype_t)99;
        CHECK_INT_EQ(speed_dtype_safetensors_parse(speed_dtype_safetensors_name(want), &d), SPEED_OK);
        CHECK_INT_EQ(d, want);
        for (int j = 0; j < i; j++) {
            CHECK(strcmp(speed_dtype_names[i], speed_dtype_names[j]) != 0);
            CHECK(strcmp(speed_dtype_torch_name(want), speed_dtype_torch_name((speed_dtype_t)j)) != 0);
        }
    }
    CHECK(speed_dtype_names[SPEED_DTYPE_COUNT] == NULL);
    CHECK_STR_EQ(speed_dtype_torch_name(SPEED_DTYPE_BF16), "bfloat16");
    CHECK_STR_EQ(speed_dtype_safetensors_name(SPEED_DTYPE_F16), "F16");
    CHECK_STR_EQ(speed_dtype_torch_name((speed_dtype_t)99), "?");
    CHECK_STR_EQ(speed_dtype_safetensors_name((speed_dtype_t)-1), "?");
    CHECK_STR_EQ(speed_dtype_name((speed_dtype_t)-1), "?");

    /* safetensors names are case-sensitive and are not ours or torch's */
    const char *bad[] = {"f32", "bf16", "Bf16", "bfloat16", "F64", "I32", "", NULL};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        speed_dtype_t d = SPEED_DTYPE_BF16;
        CHECK_INT_EQ(speed_dtype_safetensors_parse(bad[i], &d), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(d, SPEED_DTYPE_BF16);
    }
}

static void test_bf16(void) {
    /* every pattern survives bf16 -> f32 -> bf16; NaN stays NaN */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = speed_dtype_bf16_to_f32((uint16_t)h);
        CHECK(bits_of(f) == h << 16);
        uint16_t back = speed_dtype_f32_to_bf16(f);
        if (isnan(f))
            bad += !isnan(speed_dtype_bf16_to_f32(back));
        else
            bad += back != h;
    }
    CHECK_INT_EQ(bad, 0);
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(1.0f), 0x3f80);
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(-2.0f), 0xc000);
    /* ties to even: 1 + 2^-8 is halfway between 0x3f80 (even) and 0x3f81 */
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(float_of(0x3f808001)), 0x3f81); /* just above half */
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(float_of(0x3f807fff)), 0x3f80); /* just below */
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(FLT_MAX), 0x7f80);              /* rounds to inf */
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(INFINITY), 0x7f80);
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(-INFINITY), 0xff80);
    CHECK(isnan(speed_dtype_bf16_to_f32(speed_dtype_f32_to_bf16(NAN))));
    /* a NaN whose payload lives only in the low bits must not become inf */
    CHECK(isnan(speed_dtype_bf16_to_f32(speed_dtype_f32_to_bf16(float_of(0x7f800001)))));
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(float_of(0x00000001)), 0x0000); /* tiny subnormal */
    CHECK_INT_EQ(speed_dtype_f32_to_bf16(-0.0f), 0x8000);
}

/* The f16 value nearest to x by an independent route (double arithmetic over neighbours). */
static int f16_is_nearest(float x, uint16_t h) {
    float v = speed_dtype_f16_to_f32(h);
    if (isinf(v)) return fabs((double)x) >= 65520.0; /* 65504 + half an ulp */
    double d = fabs((double)x - (double)v);
    uint16_t mag = h & 0x7fff;
    for (int delta = -1; delta <= 1; delta += 2) {
        int n = (int)mag + delta;
        if (n < 0 || n > 0x7bff) continue;
        double vn = speed_dtype_f16_to_f32((uint16_t)((h & 0x8000) | n));
        double dn = fabs((double)x - vn);
        if (dn < d) return 0;
        if (dn == d && (mag & 1)) return 0; /* tie must go to even */
    }
    return 1;
}

static void test_f16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = speed_dtype_f16_to_f32((uint16_t)h);
        uint16_t back = speed_dtype_f32_to_f16(f);
        if (isnan(f))
            bad += !isnan(speed_dtype_f16_to_f32(back));
        else
            bad += back != h;
    }
    CHECK_INT_EQ(bad, 0);

    /* every midpoint between neighbouring finite f16 values: ties to even, and one f32 ulp
     * either side rounds to the nearer one (covers subnormals and the normal boundary) */
    bad = 0;
    for (uint32_t h = 0; h < 0x7bff; h++) {
        float a = speed_dtype_f16_to_f32((uint16_t)h), b = speed_dtype_f16_to_f32((uint16_t)(h + 1));
        float mid = (float)(((double)a + (double)b) / 2);
        if ((double)mid != ((double)a + (double)b) / 2) bad++; /* must be exact in f32 */
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        bad += speed_dtype_f32_to_f16(mid) != even;
        bad += speed_dtype_f32_to_f16(nextafterf(mid, 0.0f)) != h;
        bad += speed_dtype_f32_to_f16(nextafterf(mid, INFINITY)) != h + 1;
        bad += speed_dtype_f32_to_f16(-mid) != (uint16_t)(0x8000 | even);
    }
    CHECK_INT_EQ(bad, 0);

    /* a sweep over f32 bit patterns against the nearest-value definition */
    bad = 0;
    for (uint64_t x = 0; x < 0x100000000ull; x += 4093) {
        float f = float_of((uint32_t)x);
        if (isnan(f)) continue;
        bad += !f16_is_nearest(f, speed_dtype_f32_to_f16(f));
    }
    CHECK_INT_EQ(bad, 0);

    CHECK_INT_EQ(speed_dtype_f32_to_f16(1.0f), 0x3c00);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(-2.5f), 0xc100);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(65504.0f), 0x7bff);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(65519.0f), 0x7bff);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(65520.0f), 0x7c00); /* the tie goes to "even" = inf */
    CHECK_INT_EQ(speed_dtype_f32_to_f16(1e10f), 0x7c00);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(-INFINITY), 0xfc00);
    CHECK(isnan(speed_dtype_f16_to_f32(speed_dtype_f32_to_f16(NAN))));
    CHECK(isnan(speed_dtype_f16_to_f32(speed_dtype_f32_to_f16(float_of(0x7f800001)))));
    /* subnormals */
    CHECK_INT_EQ(speed_dtype_f32_to_f16(0x1p-24f), 0x0001);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(0x1p-25f), 0x0000); /* tie to even: zero */
    CHECK_INT_EQ(speed_dtype_f32_to_f16(0x1.0002p-25f), 0x0001);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(3 * 0x1p-25f), 0x0002); /* tie 1|2 -> 2 */
    CHECK_INT_EQ(speed_dtype_f32_to_f16(1023 * 0x1p-24f), 0x03ff);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(0x1p-14f), 0x0400); /* smallest normal */
    CHECK_INT_EQ(speed_dtype_f32_to_f16(0x1p-30f), 0x0000);
    CHECK_INT_EQ(speed_dtype_f32_to_f16(-0x1p-30f), 0x8000);
    CHECK(speed_dtype_f16_to_f32(0x0001) == 0x1p-24f);
    CHECK(speed_dtype_f16_to_f32(0x03ff) == 1023 * 0x1p-24f);
    CHECK(speed_dtype_f16_to_f32(0x8000) == 0.0f && signbit(speed_dtype_f16_to_f32(0x8000)));
    CHECK(isinf(speed_dtype_f16_to_f32(0x7c00)));
}

static void test_bulk(void) {
    float src[7] = {0.0f, 1.0f, -1.5f, 3.14159f, 1e-6f, 70000.0f, -0.0f};
    unsigned char buf[7 * 4 + 1];
    float back[7];
    for (int d = 0; d < SPEED_DTYPE_COUNT; d++) {
        /* odd address: conversions must not assume alignment */
        speed_dtype_from_f32((speed_dtype_t)d, src, buf + 1, 7);
        speed_dtype_to_f32((speed_dtype_t)d, buf + 1, back, 7);
        for (int i = 0; i < 7; i++) {
            float want = d == SPEED_DTYPE_F32    ? src[i]
                         : d == SPEED_DTYPE_BF16 ? speed_dtype_bf16_to_f32(speed_dtype_f32_to_bf16(src[i]))
                                                 : speed_dtype_f16_to_f32(speed_dtype_f32_to_f16(src[i]));
            CHECK(memcmp(&want, &back[i], 4) == 0);
        }
    }
}

int main(void) {
    test_names();
    test_round_trip();
    test_bf16();
    test_f16();
    test_bulk();
    return CHECK_DONE();
}
