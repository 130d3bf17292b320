/* speed_block_hash: chained token-block hashes (see block_hash.h). */
#include "block_hash.h"

/* The final avalanche: every input bit flips about half of the output bits, so prefixes that
 * differ in one id give unrelated hashes. Constants of the well-known 64-bit finalizer
 * (odd multipliers with good diffusion). */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t nonzero(uint64_t h) { return h ? h : 1; }

uint64_t speed_block_hash_seed(const char *model_id, int32_t block_tokens) {
    /* FNV-1a over the name, then the block size: a different B is a different key space */
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *p = (const unsigned char *)(model_id ? model_id : ""); *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ULL;
    }
    h ^= (uint64_t)(uint32_t)block_tokens * 0x9e3779b97f4a7c15ULL;
    return nonzero(mix64(h));
}

uint64_t speed_block_hash_next(uint64_t prev, const int32_t *ids, size_t n_ids) {
    /* A multiply-rotate pass over the ids (each one's position matters: the state is mixed
     * before the next id enters), then the finalizer over the state and the count. */
    uint64_t h = prev ^ 0x6a09e667f3bcc909ULL;
    for (size_t i = 0; i < n_ids; i++) {
        h += (uint64_t)(uint32_t)ids[i] + 1;
        h *= 0x9e3779b97f4a7c15ULL;
        h = (h << 29) | (h >> 35);
    }
    return nonzero(mix64(h ^ ((uint64_t)n_ids << 1)));
}

size_t speed_block_hash_prompt(uint64_t seed, const int32_t *ids, size_t n_ids, size_t block_tokens, uint64_t *out,
                               size_t n_out_max) {
    if (!ids || !out || block_tokens == 0) return 0;
    size_t n = n_ids / block_tokens;
    if (n > n_out_max) n = n_out_max;
    uint64_t h = seed;
    for (size_t k = 0; k < n; k++) {
        h = speed_block_hash_next(h, ids + k * block_tokens, block_tokens);
        out[k] = h;
    }
    return n;
}
