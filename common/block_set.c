/* speed_block_set: a bounded open-addressing set of block hashes (see block_set.h). */
#include "block_set.h"

#include "alloc.h"

#define MIN_SLOTS 64u

struct speed_block_set {
    uint64_t *slots; /* [n_slots]; 0 = empty; NULL until the first add */
    size_t n_slots;  /* power of two */
    size_t n, n_max;
};

/* Hashes are already uniform (block_hash.c's finalizer): the low bits index the table. */
static size_t home(const speed_block_set_t *s, uint64_t h) { return (size_t)h & (s->n_slots - 1); }

speed_status_t speed_block_set_create(size_t n_max, speed_block_set_t **set_p) {
    if (!set_p || n_max == 0 || n_max > ((size_t)1 << 30)) return SPEED_ERR_INVALID_ARGUMENT;
    speed_block_set_t *s = speed_calloc(1, sizeof *s);
    if (!s) return SPEED_ERR_NO_MEMORY;
    s->n_max = n_max;
    *set_p = s;
    return SPEED_OK;
}

void speed_block_set_destroy(speed_block_set_t *s) {
    if (!s) return;
    speed_free(s->slots);
    speed_free(s);
}

static void insert_slot(uint64_t *slots, size_t n_slots, uint64_t h) {
    size_t i = (size_t)h & (n_slots - 1);
    while (slots[i]) i = (i + 1) & (n_slots - 1);
    slots[i] = h;
}

static speed_status_t grow(speed_block_set_t *s) {
    size_t n_slots = s->n_slots ? s->n_slots * 2 : MIN_SLOTS;
    uint64_t *slots = speed_calloc(n_slots, sizeof *slots);
    if (!slots) return SPEED_ERR_NO_MEMORY;
    for (size_t i = 0; i < s->n_slots; i++)
        if (s->slots[i]) insert_slot(slots, n_slots, s->slots[i]);
    speed_free(s->slots);
    s->slots = slots;
    s->n_slots = n_slots;
    return SPEED_OK;
}

/* The slot holding h, or SIZE_MAX. */
static size_t find(const speed_block_set_t *s, uint64_t h) {
    if (!s->slots) return SIZE_MAX;
    for (size_t i = home(s, h);; i = (i + 1) & (s->n_slots - 1)) {
        if (s->slots[i] == h) return i;
        if (!s->slots[i]) return SIZE_MAX;
    }
}

speed_status_t speed_block_set_add(speed_block_set_t *s, uint64_t h) {
    if (!s || h == 0) return SPEED_ERR_INVALID_ARGUMENT;
    if (find(s, h) != SIZE_MAX) return SPEED_OK;
    if (s->n >= s->n_max) return SPEED_ERR_CAPACITY;
    if ((s->n + 1) * 2 > s->n_slots) SPEED_CHECK(grow(s));
    insert_slot(s->slots, s->n_slots, h);
    s->n++;
    return SPEED_OK;
}

bool speed_block_set_remove(speed_block_set_t *s, uint64_t h) {
    if (!s || h == 0) return false;
    size_t i = find(s, h);
    if (i == SIZE_MAX) return false;
    /* Backward shift: move each later entry of the run into the hole when its home slot does
     * not lie (cyclically) between the hole and itself, so every lookup still finds it. */
    size_t mask = s->n_slots - 1;
    size_t hole = i;
    for (size_t j = (hole + 1) & mask; s->slots[j]; j = (j + 1) & mask) {
        size_t k = home(s, s->slots[j]);
        bool stays = hole <= j ? (hole < k && k <= j) : (hole < k || k <= j);
        if (stays) continue;
        s->slots[hole] = s->slots[j];
        hole = j;
    }
    s->slots[hole] = 0;
    s->n--;
    return true;
}

bool speed_block_set_has(const speed_block_set_t *s, uint64_t h) { return s && h && find(s, h) != SIZE_MAX; }

size_t speed_block_set_size(const speed_block_set_t *s) { return s ? s->n : 0; }

size_t speed_block_set_max(const speed_block_set_t *s) { return s ? s->n_max : 0; }

void speed_block_set_clear(speed_block_set_t *s) {
    if (!s) return;
    speed_free(s->slots);
    s->slots = NULL;
    s->n_slots = 0;
    s->n = 0;
}

size_t speed_block_set_list(const speed_block_set_t *s, uint64_t *out, size_t n_out_max) {
    if (!s || !out) return 0;
    size_t n = 0;
    for (size_t i = 0; i < s->n_slots && n < n_out_max; i++)
        if (s->slots[i]) out[n++] = s->slots[i];
    return n;
}
