/* The decoder of the transfer's ack message (speed_kv_ack_decode): what a peer's bytes must be to
 * be accepted, and what is mapped on the way. The notify's decoder is tested in
 * test_kv_transfer_secure; the end-to-end path (a real notify and ack over UCX) in
 * test_kv_transfer; tests/fuzz/fuzz_kv_notify throws arbitrary bytes at both. */
#include <string.h>

#include "check.h"
#include "kv_transfer_internal.h"

static void test_ack(void) {
    ack_msg_t in = {.magic = MSG_MAGIC, .status = SPEED_ERR_NOT_FOUND, .token = 7}, out;
    CHECK(speed_kv_ack_decode(&in, sizeof in, &out));
    CHECK_INT_EQ(out.status, SPEED_ERR_NOT_FOUND);
    CHECK(out.token == 7);
    in.status = SPEED_OK;
    CHECK(speed_kv_ack_decode(&in, sizeof in, &out));
    CHECK_INT_EQ(out.status, SPEED_OK);
    in.status = 123456; /* not a status: the peer broke the protocol */
    CHECK(speed_kv_ack_decode(&in, sizeof in, &out));
    CHECK_INT_EQ(out.status, SPEED_ERR_PEER_PROTOCOL);
    CHECK(!speed_kv_ack_decode(&in, sizeof in + 1, &out));
    in.magic = 0;
    CHECK(!speed_kv_ack_decode(&in, sizeof in, &out));
}

int main(void) {
    test_ack();
    return CHECK_DONE();
}
