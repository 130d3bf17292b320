/* Fuzzes the decoders of the two UCX active messages of the KV transfer: the notify a decode
 * node receives after a prefill node's puts (speed_kv_notify_decode, kv_notify_wire.h) and the ack
 * the prefill node receives back (speed_kv_ack_decode, kv_transfer_internal.h). What they accept
 * must be usable as is: the notify's length exactly its header and tags, its request id
 * NUL-terminated inside its field, its head range in bounds, and it encodes back to a message
 * that decodes to the same fields; an ack's status a known speed_status_t.
 *
 * Input: byte 0 even — a notify payload, odd — an ack payload (the rest of the bytes). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "kv_notify_wire.h"
#include "kv_transfer_internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

static void check_notify(const uint8_t *msg, size_t len) {
    speed_kv_notify_wire_t m;
    if (speed_kv_notify_decode(msg, len, &m, NULL) != SPEED_OK) return;
    FZ_ASSERT(len == speed_kv_notify_wire_size(m.n_tags));
    FZ_ASSERT(memchr(m.request_id, 0, sizeof m.request_id));
    FZ_ASSERT(0 <= m.head_begin && m.head_begin < m.head_end);
    /* re-encoded, it decodes to the same fields */
    uint8_t *buf = malloc(len);
    FZ_ASSERT(buf != NULL);
    speed_kv_notify_encode(&m, buf);
    speed_kv_notify_wire_t back;
    FZ_ASSERT(speed_kv_notify_decode(buf, len, &back, NULL) == SPEED_OK);
    FZ_ASSERT(back.flags == m.flags && back.token == m.token && back.cookie == m.cookie && back.bytes == m.bytes &&
              back.epoch == m.epoch && back.head_begin == m.head_begin && back.head_end == m.head_end &&
              back.n_tags == m.n_tags && strcmp(back.request_id, m.request_id) == 0 &&
              memcmp(back.nonce, m.nonce, sizeof m.nonce) == 0 &&
              (m.n_tags == 0 || memcmp(back.tags, m.tags, (size_t)m.n_tags * SPEED_KV_TAG_BYTES) == 0));
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const uint8_t *msg = data + 1;
    size_t len = size - 1;
    if (data[0] & 1) {
        ack_msg_t a;
        if (speed_kv_ack_decode(msg, len, &a)) {
            FZ_ASSERT(len == sizeof a && a.magic == MSG_MAGIC);
            FZ_ASSERT(a.status == SPEED_OK ||
                      strcmp(speed_status_string((speed_status_t)a.status), "unknown status") != 0);
        }
    } else {
        check_notify(msg, len);
    }
    return 0;
}
