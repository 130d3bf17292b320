/* The names of the KV transports (kv_transport.h). */
#include "kv_transport.h"

#include "names.h"

const char *const speed_kv_transport_names[SPEED_KV_TRANSPORT_COUNT + 1] = {
    [SPEED_KV_TRANSPORT_SHM] = "shm",
    [SPEED_KV_TRANSPORT_TCP] = "tcp",
    [SPEED_KV_TRANSPORT_COUNT] = NULL,
};

const char *speed_kv_transport_name(speed_kv_transport_t transport) {
    return speed_names_get(speed_kv_transport_names, SPEED_KV_TRANSPORT_COUNT, (int)transport, "?");
}

speed_status_t speed_kv_transport_parse(const char *name, speed_kv_transport_t *transport_p) {
    int i = speed_names_find(speed_kv_transport_names, name);
    if (i < 0) return SPEED_ERR_INVALID_ARGUMENT;
    *transport_p = (speed_kv_transport_t)i;
    return SPEED_OK;
}
