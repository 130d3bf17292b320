#include "tensor.h"

#include <stdio.h>

int64_t speed_tensor_n_elements(const speed_tensor_t *t) {
    int64_t n = 1;
    for (int i = 0; i < t->n_dims; i++) n *= t->shape[i];
    return n;
}

void speed_tensor_shape_format(const int64_t *shape, int n_dims, char *buf, size_t size) {
    if (size == 0) return;
    size_t used = 0;
    buf[0] = '\0';
    int n = snprintf(buf, size, "[");
    for (int i = 0; i < n_dims && n >= 0; i++) {
        used += (size_t)n;
        if (used >= size) return;
        n = snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    }
    if (n < 0) return;
    used += (size_t)n;
    if (used < size) snprintf(buf + used, size - used, "]");
}
