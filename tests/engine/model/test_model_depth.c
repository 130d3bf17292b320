/* SPEED depth: prefill_layers parsing and the KV byte formulas of ARCHITECTURE.md section 1. */
#include "check.h"
#include "log.h"
#include "model.h"

static speed_model_config_t config(int n_layers, int n_kv_heads, int head_dim) {
    speed_model_config_t c = {0};
    c.n_layers = n_layers;
    c.n_kv_heads = n_kv_heads;
    c.n_heads = n_kv_heads * 4;
    c.head_dim = head_dim;
    c.hidden = c.n_heads * head_dim;
    return c;
}

static void test_parse(void) {
    const struct {
        const char *text;
        int n_layers, want;
    } ok[] = {
        {"24", 32, 24}, {"1", 32, 1},     {"32", 32, 32},   {"0.75", 32, 24}, {"1.0", 32, 32},
        {"1.", 32, 32}, {".5", 22, 11},   {"0.5", 22, 11},  {"0.75", 22, 17}, /* 16.5 -> 17 */
        {"0.25", 22, 6}, /* 5.5 -> 6 */   {"0.01", 22, 1},  /* 0.22 clamps to 1 */
        {"0.001", 32, 1}, {"007", 32, 7}, {"0.999999", 32, 32}, {"1", 1, 1}, {"1.00", 1, 1},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        int c = -1;
        CHECK_MSG(speed_prefill_layers_parse(ok[i].text, ok[i].n_layers, &c) == SPEED_OK, "%s",
                  ok[i].text);
        CHECK_MSG(c == ok[i].want, "\"%s\" of %d: %d, want %d", ok[i].text, ok[i].n_layers, c,
                  ok[i].want);
    }
    const char *bad[] = {"0", "33", "-1", "0.0", "0.", "1.5", "24.0", "", ".", "abc", "24x",
                         " 24", "24 ", "1e0", "0.75e0", "+24", "nan", "inf", "0x10", "1..0",
                         "99999999999999999999", "2147483648", "-0.5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int c = -7;
        speed_log_clear_last_error();
        CHECK_MSG(speed_prefill_layers_parse(bad[i], 32, &c) == SPEED_ERR_INVALID_ARGUMENT, "\"%s\"",
                  bad[i]);
        CHECK_INT_EQ(c, -7);
        CHECK_CONTAINS(speed_log_last_error(), "prefill_layers: \"");
    }
    int c = -7;
    CHECK_INT_EQ(speed_prefill_layers_parse(NULL, 32, &c), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_prefill_layers_parse("1", 0, &c), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(speed_log_last_error(), "prefill_layers: ");
    CHECK_INT_EQ(c, -7);
}

static void test_kv_bytes(void) {
    /* TinyLlama: 22 layers, 4 kv heads of 64 */
    speed_model_config_t t = config(22, 4, 64);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 22, SPEED_DTYPE_BF16), 2 * 22 * 4 * 64 * 2);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 22, SPEED_DTYPE_F32), 2 * 22 * 4 * 64 * 4);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 16, SPEED_DTYPE_F16), 2 * 16 * 4 * 64 * 2);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 99, SPEED_DTYPE_BF16), 2 * 22 * 4 * 64 * 2);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, -1, SPEED_DTYPE_BF16), 0);

    const int64_t per = 2 * 4 * 64 * 2; /* one layer, one token, bf16 */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 16, 1, 1, 1000, SPEED_DTYPE_BF16),
                 per * (16 * 1000 + 6 * 2));
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 22, 1, 1, 1000, SPEED_DTYPE_BF16), per * 22 * 1000);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 22, 1, 1, 1000, SPEED_DTYPE_BF16),
                 1000 * speed_kv_bytes_per_token(&t, 22, SPEED_DTYPE_BF16));
    /* A + T >= n: every prompt token is full depth */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 1, 1, 2, SPEED_DTYPE_BF16), per * 22 * 2);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 4, 4, 5, SPEED_DTYPE_BF16), per * 22 * 5);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 0, 1, 1, SPEED_DTYPE_BF16), per * 22);
    /* anchors and tail: shallow tokens are n - A - T */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 4, 16, 100, SPEED_DTYPE_BF16),
                 per * (22 * 20 + 8 * 80));
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 0, 0, 100, SPEED_DTYPE_BF16), per * 8 * 100);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, -3, -3, 100, SPEED_DTYPE_BF16), per * 8 * 100);
    /* shallow share: full-depth tokens + shallow tokens at C layers */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 1, 1, 100, SPEED_DTYPE_BF16),
                 2 * speed_kv_bytes_per_token(&t, 22, SPEED_DTYPE_BF16) +
                     98 * speed_kv_bytes_per_token(&t, 8, SPEED_DTYPE_BF16));
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 1, 1, 0, SPEED_DTYPE_BF16), 0);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 1, 1, -5, SPEED_DTYPE_BF16), 0);
    /* C clamped to [1, L] */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 0, 1, 1, 100, SPEED_DTYPE_BF16),
                 speed_kv_bytes_for_prompt(&t, 1, 1, 1, 100, SPEED_DTYPE_BF16));
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 40, 1, 1, 100, SPEED_DTYPE_BF16), per * 22 * 100);

    /* Llama-3.1-8B at 128K, C = 24 of 32, A = 1, T = 1: ~75% of full depth (the paper's -25%) */
    speed_model_config_t l = config(32, 8, 128);
    int C = 0;
    CHECK_INT_EQ(speed_prefill_layers_parse("0.75", 32, &C), SPEED_OK);
    size_t full = speed_kv_bytes_for_prompt(&l, 32, 1, 1, 131072, SPEED_DTYPE_BF16);
    size_t speed = speed_kv_bytes_for_prompt(&l, C, 1, 1, 131072, SPEED_DTYPE_BF16);
    CHECK_INT_EQ(full, (size_t)131072 * 32 * 2 * 8 * 128 * 2); /* 16 GiB */
    CHECK_NEAR((double)speed / (double)full, 0.75, 1e-4);
    /* sizes past 4 GiB per layer do not overflow */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&l, 32, 1, 1, (int64_t)1 << 24, SPEED_DTYPE_F32),
                 ((size_t)1 << 24) * 32 * 2 * 8 * 128 * 4);
}

int main(void) {
    test_parse();
    test_kv_bytes();
    return CHECK_DONE();
}
