/* The names of the KV transports (kv_transport.h). */
#include "kv_transport.h"

#include "names.h"

const char *const speed_kv_transport_names[SPEED_KV_TRANSPORT_COUNT + 1] = {
    [SPEED_KV_TRANSPORT_SHM] = "shm",
    [SPEED_KV_TRANSPORT_TCP] = "tcp",
    [SPEED_KV_TRANSPORT_COUNT] = NULL,
};

SPEED_NAMES_DEFINE(speed_kv_transport, speed_kv_transport_t, SPEED_KV_TRANSPORT_COUNT)
