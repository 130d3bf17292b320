/* Fuzzes the safetensors header validation (engine/model/safetensors.c) on whole files held
 * in memory (speed_safetensors_open_memory: the same checks as a mapped file), and checks
 * what the header promises about every tensor it accepts: the bytes lie inside the file's
 * data area, match shape * dtype size, are aligned to the element size, no two non-empty
 * tensors overlap, and lookup by name finds each one. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "fuzz_util.h"
#include "safetensors.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* an 8-aligned private copy, as a file mapping would be (libFuzzer's buffer is exact-size) */
    uint64_t *copy = malloc(size ? (size + 7) / 8 * 8 : 8);
    if (!copy) return 0;
    if (size) memcpy(copy, data, size);
    speed_safetensors_t *st = NULL;
    if (speed_safetensors_open_memory(copy, size, "fuzz.safetensors", &st) == SPEED_OK) {
        FZ_ASSERT(size >= 8);
        uint64_t header_len;
        memcpy(&header_len, data, 8);
        const uint8_t *area = (const uint8_t *)copy + 8 + header_len;
        const uint8_t *end = (const uint8_t *)copy + size;
        int n = speed_safetensors_n_tensors(st);
        FZ_ASSERT(n >= 0 && (size_t)n <= header_len);
        FZ_ASSERT(speed_safetensors_file_size(st) == size);
        for (int i = 0; i < n; i++) {
            const speed_tensor_t *t = speed_safetensors_tensor(st, i);
            FZ_ASSERT(t->name && speed_safetensors_find(st, t->name) == t);
            if (i > 0) FZ_ASSERT(strcmp(speed_safetensors_tensor(st, i - 1)->name, t->name) < 0);
            FZ_ASSERT(t->n_dims >= 0 && t->n_dims <= SPEED_TENSOR_MAX_DIMS);
            size_t esz = speed_dtype_size(t->dtype);
            FZ_ASSERT(esz == 2 || esz == 4);
            FZ_ASSERT(t->n_bytes == (size_t)speed_tensor_n_elements(t) * esz);
            if (t->n_bytes == 0) continue;
            const uint8_t *p = t->data;
            FZ_ASSERT(p >= area && p <= end && t->n_bytes <= (size_t)(end - p));
            FZ_ASSERT((uintptr_t)p % esz == 0);
            for (int j = 0; j < i; j++) { /* no overlap (quadratic, but inputs are small) */
                const speed_tensor_t *u = speed_safetensors_tensor(st, j);
                if (u->n_bytes == 0) continue;
                const uint8_t *q = u->data;
                FZ_ASSERT(p + t->n_bytes <= q || q + u->n_bytes <= p);
            }
        }
        speed_safetensors_close(st);
    }
    free(copy);
    return 0;
}
