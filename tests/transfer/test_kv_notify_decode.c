/* The decoders of the transfer's active messages (speed_kv_notify_decode, speed_kv_ack_decode):
 * what a peer's bytes must be to be accepted, and what is cut or mapped on the way. The
 * end-to-end path (a real notify over UCX) is test_kv_transfer's; tests/fuzz/fuzz_kv_notify
 * throws arbitrary bytes at both. */
#include <string.h>

#include "check.h"
#include "kv_transfer_internal.h"

static notify_msg_t good_notify(void) {
    notify_msg_t m;
    memset(&m, 0, sizeof m);
    m.magic = MSG_MAGIC;
    m.version = MSG_VERSION;
    m.token = 7, m.cookie = 42, m.bytes = 4096, m.epoch = 99, m.head_begin = 0, m.head_end = 2;
    strcpy(m.request_id, "req-1");
    return m;
}

static void test_notify(void) {
    notify_msg_t in = good_notify(), out;
    memset(&out, 0, sizeof out);
    CHECK_INT_EQ(speed_kv_notify_decode(&in, sizeof in, &out), SPEED_OK);
    CHECK(out.cookie == 42 && out.bytes == 4096 && out.epoch == 99 && out.head_end == 2);
    CHECK_STR_EQ(out.request_id, "req-1");

    /* a request id filling its field is cut to stay NUL-terminated */
    memset(in.request_id, 'x', sizeof in.request_id);
    CHECK_INT_EQ(speed_kv_notify_decode(&in, sizeof in, &out), SPEED_OK);
    CHECK_INT_EQ(strlen(out.request_id), REQ_ID_MAX - 1);

    /* wrong size, magic or version: refused, *out untouched */
    notify_msg_t keep = out;
    in = good_notify();
    CHECK_INT_EQ(speed_kv_notify_decode(&in, sizeof in - 1, &out), SPEED_ERR_PEER_PROTOCOL);
    CHECK_INT_EQ(speed_kv_notify_decode(NULL, sizeof in, &out), SPEED_ERR_PEER_PROTOCOL);
    in.version = MSG_VERSION - 1;
    CHECK_INT_EQ(speed_kv_notify_decode(&in, sizeof in, &out), SPEED_ERR_PEER_PROTOCOL);
    in = good_notify();
    in.magic ^= 1;
    CHECK_INT_EQ(speed_kv_notify_decode(&in, sizeof in, &out), SPEED_ERR_PEER_PROTOCOL);
    CHECK(!memcmp(&keep, &out, sizeof out));
}

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
    test_notify();
    test_ack();
    return CHECK_DONE();
}
