/* Fuzzes the decoders of the two UCX active messages of the KV transfer (transfer/
 * kv_xfer_ctx.c): the notify a decode node receives after a prefill node's puts
 * (speed_kv_notify_decode) and the ack the prefill node receives back (speed_kv_ack_decode).
 * Both read a fixed-size payload from a peer; what they accept must be usable as is: the
 * request id NUL-terminated inside its field, the magic and version right, an ack's status a
 * known speed_status_t.
 *
 * Input: byte 0 even — a notify payload, odd — an ack payload (the rest of the bytes). */
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "kv_transfer_internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
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
        notify_msg_t m;
        if (speed_kv_notify_decode(msg, len, &m) == SPEED_OK) {
            FZ_ASSERT(len == sizeof m && m.magic == MSG_MAGIC && m.version == MSG_VERSION);
            FZ_ASSERT(memchr(m.request_id, 0, REQ_ID_MAX));
        }
    }
    return 0;
}
