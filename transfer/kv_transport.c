/* The names of the KV transports (kv_transport.h). */
#include "kv_transport.h"

#include <string.h>

const char *const speed_kv_transport_names[SPEED_KV_TRANSPORT_COUNT + 1] = {
    [SPEED_KV_TRANSPORT_SHM] = "shm",
    [SPEED_KV_TRANSPORT_TCP] = "tcp",
    [SPEED_KV_TRANSPORT_COUNT] = NULL,
};

const char *speed_kv_transport_name(speed_kv_transport_t transport) {
    return (unsigned)transport < SPEED_KV_TRANSPORT_COUNT ? speed_kv_transport_names[transport] : "?";
}

speed_status_t speed_kv_transport_parse(const char *name, speed_kv_transport_t *transport_p) {
    if (!name) return SPEED_ERR_INVALID_ARGUMENT;
    for (int t = 0; t < SPEED_KV_TRANSPORT_COUNT; t++) {
        if (strcmp(name, speed_kv_transport_names[t]) == 0) {
            *transport_p = (speed_kv_transport_t)t;
            return SPEED_OK;
        }
    }
    return SPEED_ERR_INVALID_ARGUMENT;
}
