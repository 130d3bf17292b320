/* speed_rng_t: the per-request random number generator of the sampler.
 *
 * xoshiro256** (Blackman and Vigna), seeded through splitmix64 so that every 64-bit seed,
 * 0 included, gives a well-mixed state. The generator is small (32 bytes), lives in the
 * request (not in the sampler's workspace), and is the only source of randomness in
 * sampling: the same seed and the same logits give the same tokens on every run, thread
 * count and machine.
 *
 * Thread-safety: a speed_rng_t belongs to one request; functions are pure apart from the
 * state they are given.
 */
#ifndef SPEED_RNG_H
#define SPEED_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} speed_rng_t;

/* Sets the state from a seed (any value). */
void speed_rng_init(speed_rng_t *rng, uint64_t seed);

/* The next 64 random bits. */
uint64_t speed_rng_next(speed_rng_t *rng);

/* A uniform double in [0, 1) with 53 random bits. */
double speed_rng_uniform(speed_rng_t *rng);

#endif /* SPEED_RNG_H */
