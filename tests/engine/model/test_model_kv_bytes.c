/* The KV byte formulas of docs/design.md §1 (parsing and resolving C: tests/engine/depth). */
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

static void test_kv_bytes(void) {
    /* TinyLlama: 22 layers, 4 kv heads of 64 */
    speed_model_config_t t = config(22, 4, 64);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 22, SPEED_DTYPE_BF16), 2 * 22 * 4 * 64 * 2);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 22, SPEED_DTYPE_F32), 2 * 22 * 4 * 64 * 4);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 16, SPEED_DTYPE_F16), 2 * 16 * 4 * 64 * 2);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, 99, SPEED_DTYPE_BF16), 2 * 22 * 4 * 64 * 2);
    CHECK_INT_EQ(speed_kv_bytes_per_token(&t, -1, SPEED_DTYPE_BF16), 0);

    const int64_t per = 2 * 4 * 64 * 2; /* one layer, one token, bf16 */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 16, 1, 1, 1000, SPEED_DTYPE_BF16), per * (16 * 1000 + 6 * 2));
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 22, 1, 1, 1000, SPEED_DTYPE_BF16), per * 22 * 1000);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 22, 1, 1, 1000, SPEED_DTYPE_BF16),
                 1000 * speed_kv_bytes_per_token(&t, 22, SPEED_DTYPE_BF16));
    /* A + T >= n: every prompt token is full depth */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 1, 1, 2, SPEED_DTYPE_BF16), per * 22 * 2);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 4, 4, 5, SPEED_DTYPE_BF16), per * 22 * 5);
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 0, 1, 1, SPEED_DTYPE_BF16), per * 22);
    /* anchors and tail: shallow tokens are n - A - T */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&t, 8, 4, 16, 100, SPEED_DTYPE_BF16), per * (22 * 20 + 8 * 80));
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
    const int C = 24; /* 0.75 of 32 */
    size_t full = speed_kv_bytes_for_prompt(&l, 32, 1, 1, 131072, SPEED_DTYPE_BF16);
    size_t speed = speed_kv_bytes_for_prompt(&l, C, 1, 1, 131072, SPEED_DTYPE_BF16);
    CHECK_INT_EQ(full, (size_t)131072 * 32 * 2 * 8 * 128 * 2); /* 16 GiB */
    CHECK_NEAR((double)speed / (double)full, 0.75, 1e-4);
    /* sizes past 4 GiB per layer do not overflow */
    CHECK_INT_EQ(speed_kv_bytes_for_prompt(&l, 32, 1, 1, (int64_t)1 << 24, SPEED_DTYPE_F32),
                 ((size_t)1 << 24) * 32 * 2 * 8 * 128 * 4);
}

int main(void) {
    test_kv_bytes();
    return CHECK_DONE();
}
