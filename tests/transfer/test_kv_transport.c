/* transfer/kv_transport.c: every KV transport's name parses back to it, unknown names are
 * refused, and the names array is what a config ENUM field needs. Linked against
 * speed_kv_transport alone: naming a transport must not need UCX. */
#include <string.h>

#include "check.h"
#include "config.h"
#include "kv_transport.h"

int main(void) {
    for (int t = 0; t < SPEED_KV_TRANSPORT_COUNT; t++) {
        speed_kv_transport_t tr = (speed_kv_transport_t)t, got = (speed_kv_transport_t)99;
        CHECK_STR_EQ(speed_kv_transport_name(tr), speed_kv_transport_names[t]);
        CHECK_INT_EQ(speed_kv_transport_parse(speed_kv_transport_name(tr), &got), SPEED_OK);
        CHECK_INT_EQ(got, tr);
        for (int j = 0; j < t; j++) CHECK(strcmp(speed_kv_transport_names[t], speed_kv_transport_names[j]) != 0);
    }
    CHECK(speed_kv_transport_names[SPEED_KV_TRANSPORT_COUNT] == NULL);
    /* the names are on the wire (KvDescriptor.transport) and in cluster files: they never change */
    CHECK_STR_EQ(speed_kv_transport_name(SPEED_KV_TRANSPORT_SHM), "shm");
    CHECK_STR_EQ(speed_kv_transport_name(SPEED_KV_TRANSPORT_TCP), "tcp");
    CHECK_STR_EQ(speed_kv_transport_name((speed_kv_transport_t)SPEED_KV_TRANSPORT_COUNT), "?");
    CHECK_STR_EQ(speed_kv_transport_name((speed_kv_transport_t)-1), "?");

    /* unknown names (case counts: a peer's "TCP" is not ours) leave the output alone */
    const char *bad[] = {"", "SHM", "TCP", "rdma", "tcp ", "sh", "?", NULL};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        speed_kv_transport_t got = SPEED_KV_TRANSPORT_TCP;
        CHECK_INT_EQ(speed_kv_transport_parse(bad[i], &got), SPEED_ERR_INVALID_ARGUMENT);
        CHECK_INT_EQ(got, SPEED_KV_TRANSPORT_TCP);
    }

    /* As a config field's choices: the stored index is the transport. */
    int index = -1;
    CHECK_INT_EQ(speed_config_parse_enum("tcp", speed_kv_transport_names, &index), SPEED_OK);
    CHECK_INT_EQ(index, SPEED_KV_TRANSPORT_TCP);
    /* shm, the default, is 0: a zeroed params struct asks for it. */
    CHECK_INT_EQ(SPEED_KV_TRANSPORT_SHM, 0);
    return CHECK_DONE();
}
