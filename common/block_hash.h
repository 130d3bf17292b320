/* speed_block_hash: the one definition of a token block's hash, the key of the prefix cache
 * (decode nodes) and of the router's prefix index (KV-aware routing; docs/prefix-cache.md).
 *
 * A prompt of token ids is cut into blocks of B tokens (B = kv.block_tokens, the KV cache's
 * block size). Only full blocks are hashed: a prompt of n tokens has n / B block hashes, and
 * its last n % B tokens have none. Hashes are chained: block k's hash is computed from block
 * k-1's hash and block k's B ids (block 0 from the seed), so it names the whole prefix
 * ids[0 .. (k+1)B-1], not just the block:
 *
 *   h[0] = speed_block_hash_next(seed, ids[0 .. B-1], B)
 *   h[k] = speed_block_hash_next(h[k-1], ids[kB .. (k+1)B-1], B)
 *
 * Two prompts share h[0..j] exactly when they share their first (j+1)B ids (up to collisions
 * of a 64-bit hash); a change in block j changes h[j] and every later hash.
 *
 * The seed (speed_block_hash_seed) comes from the model's identity and B, so two models (or
 * two block sizes) never produce the same key for the same ids. Every process of a cluster
 * derives it from the same two values: the served model name (served_model_name, else the
 * model directory's base name) and kv.block_tokens.
 *
 * Collisions: a 64-bit hash is a routing key; two different prefixes map to the same value
 * with probability ~2^-64 per pair. The router may route on it as it is. A cache that reuses
 * KV on a hash match must decide whether that risk is acceptable or also compare the ids.
 * A hash is never 0 (0 means "no hash" in the sets that hold them, block_set.h).
 *
 * The hash is not cryptographic: it must not be used where a client could profit from
 * choosing ids that collide (it only steers routing).
 *
 * Threading: pure functions, reentrant.
 */
#ifndef SPEED_BLOCK_HASH_H
#define SPEED_BLOCK_HASH_H

#include <stddef.h>
#include <stdint.h>

/* The seed of a model's chains: from its identity (a NUL-terminated name; NULL reads as "")
 * and the block size B (>= 1). Never 0. */
uint64_t speed_block_hash_seed(const char *model_id, int32_t block_tokens);

/* The hash of one block whose prefix hashes to `prev` (the seed for block 0): n_ids ids
 * (normally B; every id counts, including its position in the block). Never 0. */
uint64_t speed_block_hash_next(uint64_t prev, const int32_t *ids, size_t n_ids);

/* The chained hashes of the full blocks of ids[0 .. n_ids-1]: writes min(n_ids / block_tokens,
 * n_out_max) hashes to out and returns that count (0 when block_tokens is 0 or ids / out is
 * NULL). */
size_t speed_block_hash_prompt(uint64_t seed, const int32_t *ids, size_t n_ids, size_t block_tokens, uint64_t *out,
                               size_t n_out_max);

#endif /* SPEED_BLOCK_HASH_H */
