/* speed_block_set: a bounded set of block hashes (block_hash.h), for the decode node's cache
 * event journal (the blocks it holds, sent whole as a snapshot) and the router's prefix index
 * (the blocks each decode node holds).
 *
 * Open addressing with linear probing over a power-of-two table that starts small and doubles
 * while it is more than half full; removal shifts the following entries back (no tombstones,
 * so a set that churns never slows down). It never holds more than n_max hashes: an add beyond
 * that is refused (SPEED_ERR_CAPACITY), so whoever feeds it cannot make it grow without bound.
 * Memory: at most 4 * n_max * 8 bytes (the table doubles at half full), from speed_malloc.
 *
 * Threading: none; the owner locks.
 */
#ifndef SPEED_BLOCK_SET_H
#define SPEED_BLOCK_SET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct speed_block_set speed_block_set_t;

/* A set of at most n_max (>= 1) hashes. Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (n_max 0
 * or above 2^30, NULL set_p) or SPEED_ERR_NO_MEMORY. */
speed_status_t speed_block_set_create(size_t n_max, speed_block_set_t **set_p);
void speed_block_set_destroy(speed_block_set_t *set); /* NULL ok */

/* Adds h. Returns SPEED_OK (added, or already there), SPEED_ERR_CAPACITY (n_max hashes held:
 * refused), SPEED_ERR_INVALID_ARGUMENT (h == 0, NULL set) or SPEED_ERR_NO_MEMORY (the table
 * could not grow; the set is unchanged). */
speed_status_t speed_block_set_add(speed_block_set_t *set, uint64_t h);
/* Removes h; true when it was there. */
bool speed_block_set_remove(speed_block_set_t *set, uint64_t h);
bool speed_block_set_has(const speed_block_set_t *set, uint64_t h);
size_t speed_block_set_size(const speed_block_set_t *set);
size_t speed_block_set_max(const speed_block_set_t *set);
/* Empties the set and gives back its table's memory (a node forgotten holds nothing). */
void speed_block_set_clear(speed_block_set_t *set);
/* Copies up to n_out_max hashes (in no particular order) to out; returns how many. */
size_t speed_block_set_list(const speed_block_set_t *set, uint64_t *out, size_t n_out_max);

#endif /* SPEED_BLOCK_SET_H */
