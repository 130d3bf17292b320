#include "dtype.h"

#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "names.h"

/* ---- names and sizes ------------------------------------------------------------------ */

const char *const speed_dtype_names[SPEED_DTYPE_COUNT + 1] = {
    [SPEED_DTYPE_F32] = "f32",
    [SPEED_DTYPE_BF16] = "bf16",
    [SPEED_DTYPE_F16] = "f16",
    [SPEED_DTYPE_COUNT] = NULL,
};

const char *const speed_kv_dtype_names[SPEED_DTYPE_COUNT + 2] = {
    [SPEED_DTYPE_F32] = "f32",    [SPEED_DTYPE_BF16] = "bf16",    [SPEED_DTYPE_F16] = "f16",
    [SPEED_DTYPE_COUNT] = "auto", [SPEED_DTYPE_COUNT + 1] = NULL,
};

static const struct {
    size_t size;             /* bytes per element */
    const char *torch;       /* config.json torch_dtype */
    const char *safetensors; /* a safetensors header's "dtype" */
} dtype_info[SPEED_DTYPE_COUNT] = {
    [SPEED_DTYPE_F32] = {4, "float32", "F32"},
    [SPEED_DTYPE_BF16] = {2, "bfloat16", "BF16"},
    [SPEED_DTYPE_F16] = {2, "float16", "F16"},
};

static bool dtype_valid(speed_dtype_t dtype) { return (unsigned)dtype < SPEED_DTYPE_COUNT; }

size_t speed_dtype_size(speed_dtype_t dtype) { return dtype_valid(dtype) ? dtype_info[dtype].size : 0; }

const char *speed_dtype_name(speed_dtype_t dtype) {
    return speed_names_get(speed_dtype_names, SPEED_DTYPE_COUNT, (int)dtype, "?");
}

const char *speed_dtype_torch_name(speed_dtype_t dtype) { return dtype_valid(dtype) ? dtype_info[dtype].torch : "?"; }

const char *speed_dtype_safetensors_name(speed_dtype_t dtype) {
    return dtype_valid(dtype) ? dtype_info[dtype].safetensors : "?";
}

speed_status_t speed_dtype_parse(const char *name, speed_dtype_t *out_p) {
    if (!name) return SPEED_ERR_INVALID_ARGUMENT;
    for (int d = 0; d < SPEED_DTYPE_COUNT; d++) {
        if (strcasecmp(name, speed_dtype_names[d]) == 0 || strcasecmp(name, dtype_info[d].torch) == 0) {
            *out_p = (speed_dtype_t)d;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_INVALID_ARGUMENT;
}

speed_status_t speed_dtype_safetensors_parse(const char *name, speed_dtype_t *out_p) {
    if (!name) return SPEED_ERR_INVALID_ARGUMENT;
    for (int d = 0; d < SPEED_DTYPE_COUNT; d++) {
        if (strcmp(name, dtype_info[d].safetensors) == 0) {
            *out_p = (speed_dtype_t)d;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_INVALID_ARGUMENT;
}

/* ---- conversions ------------------------------------------------------------------------ */

static uint32_t f32_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return x;
}

static float f32_from_bits(uint32_t x) {
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

uint16_t speed_dtype_f32_to_bf16(float value) {
    uint32_t x = f32_bits(value);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u); /* quiet NaN */
    /* Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even; a carry out
     * of the mantissa bumps the exponent, and past the largest finite value gives inf. */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

float speed_dtype_bf16_to_f32(uint16_t bits) { return f32_from_bits((uint32_t)bits << 16); }

uint16_t speed_dtype_f32_to_f16(float value) {
    uint32_t x = f32_bits(value);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;

    if (exp == 0xff) {
        if (mant) return (uint16_t)(sign | 0x7e00u | (mant >> 13)); /* quiet NaN */
        return (uint16_t)(sign | 0x7c00u);
    }
    int32_t e = (int32_t)exp - 127 + 15; /* f16 biased exponent */
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        /* f16 subnormal: value = m * 2^-24 with m = full >> (14 - e). */
        if (e < -10) return sign; /* below half the smallest subnormal: rounds to zero */
        uint32_t full = mant | 0x800000u;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t m = full >> shift;
        uint32_t rem = full & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (m & 1u))) m++; /* m == 0x400 is the smallest normal */
        return (uint16_t)(sign | m);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* carry may reach inf: correct */
    return (uint16_t)(sign | h);
}

float speed_dtype_f16_to_f32(uint16_t bits) {
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16;
    uint32_t exp = (bits >> 10) & 0x1fu;
    uint32_t mant = bits & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24 is exact in f32 */
        float v = (float)mant * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
    return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

void speed_dtype_to_f32(speed_dtype_t dtype, const void *src, float *dst, size_t n) {
    const unsigned char *s = src;
    uint16_t h;
    switch (dtype) {
    case SPEED_DTYPE_F32: memcpy(dst, src, n * sizeof(float)); return;
    case SPEED_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&h, s + 2 * i, 2);
            dst[i] = speed_dtype_bf16_to_f32(h);
        }
        return;
    case SPEED_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&h, s + 2 * i, 2);
            dst[i] = speed_dtype_f16_to_f32(h);
        }
        return;
    }
}

void speed_dtype_from_f32(speed_dtype_t dtype, const float *src, void *dst, size_t n) {
    unsigned char *d = dst;
    uint16_t h;
    switch (dtype) {
    case SPEED_DTYPE_F32: memcpy(dst, src, n * sizeof(float)); return;
    case SPEED_DTYPE_BF16:
        for (size_t i = 0; i < n; i++) {
            h = speed_dtype_f32_to_bf16(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        return;
    case SPEED_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            h = speed_dtype_f32_to_f16(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        return;
    }
}
