/* The notify message a prefill node sends a decode node after its puts were flushed (or, with
 * the abort flag, after a cancelled transfer's puts were flushed), as bytes: a plain encoder
 * and decoder, independent of UCX, so the decoder can be tested and fuzzed on any bytes.
 *
 * Wire (little-endian, version 3):
 *   u32 magic "FXVK"  u32 version  u32 flags  u32 n_tags
 *   u64 token  u64 cookie  u64 bytes  u64 epoch  i32 head_begin  i32 head_end
 *   char request_id[64] (NUL-terminated)  u8 nonce[16]  u8 tags[n_tags][16]
 * n_tags is 0, or the layer count in integrity mode (tag l = speed_mac over layer l's bytes in
 * put order, keyed by the nonce: see kv_transfer_internal.h). The nonce is a secret: nothing
 * here logs it.
 */
#ifndef SPEED_KV_NOTIFY_WIRE_H
#define SPEED_KV_NOTIFY_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "kv_transfer.h"
#include "status.h"

#define SPEED_KV_NOTIFY_MAGIC      0x4b565846u /* "FXVK" */
#define SPEED_KV_NOTIFY_VERSION    3           /* 3: nonce, flags, integrity tags */
#define SPEED_KV_NOTIFY_FLAG_ABORT 1u          /* cancelled: flushed, nothing more will be put */
#define SPEED_KV_NOTIFY_ID_MAX     64          /* request_id bytes, NUL included */
#define SPEED_KV_NOTIFY_HEADER     136         /* bytes before the tags */

typedef struct {
    uint32_t flags;
    uint64_t token; /* the prefill context's id of the transfer, echoed in the ack */
    uint64_t cookie;
    uint64_t bytes;
    uint64_t epoch;
    int32_t head_begin, head_end;
    char request_id[SPEED_KV_NOTIFY_ID_MAX];
    uint8_t nonce[SPEED_KV_NONCE_BYTES];
    uint32_t n_tags;
    const uint8_t *tags; /* [n_tags][SPEED_KV_TAG_BYTES]; decode: points into the decoded bytes */
} speed_kv_notify_wire_t;

/* Bytes of a message with n_tags tags. */
size_t speed_kv_notify_wire_size(uint32_t n_tags);

/* Writes m into buf (speed_kv_notify_wire_size(m->n_tags) bytes). request_id is truncated to
 * 63 bytes. */
void speed_kv_notify_encode(const speed_kv_notify_wire_t *m, uint8_t *buf);

/* Reads a message from len bytes. Checks: length exactly the header plus n_tags tags, n_tags <=
 * SPEED_KV_DESC_MAX_LAYERS, magic, version, known flags, a NUL inside request_id, 0 <=
 * head_begin < head_end <= 65536. out->tags points into data (valid while data is).
 * Returns SPEED_OK or SPEED_ERR_FORMAT (not logged: the caller logs with its context; *why_p, if
 * not NULL, names the first fault). */
speed_status_t speed_kv_notify_decode(const uint8_t *data, size_t len, speed_kv_notify_wire_t *out, const char **why_p);

#endif /* SPEED_KV_NOTIFY_WIRE_H */
