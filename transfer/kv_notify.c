/* The notify message's bytes (kv_notify_wire.h): explicit little-endian fields, so the format
 * does not depend on a compiler's struct layout, and a decoder that trusts nothing. */
#include "kv_notify_wire.h"

#include <string.h>

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

size_t speed_kv_notify_wire_size(uint32_t n_tags) {
    return SPEED_KV_NOTIFY_HEADER + (size_t)n_tags * SPEED_KV_TAG_BYTES;
}

void speed_kv_notify_encode(const speed_kv_notify_wire_t *m, uint8_t *buf) {
    put_u32(buf + 0, SPEED_KV_NOTIFY_MAGIC);
    put_u32(buf + 4, SPEED_KV_NOTIFY_VERSION);
    put_u32(buf + 8, m->flags);
    put_u32(buf + 12, m->n_tags);
    put_u64(buf + 16, m->token);
    put_u64(buf + 24, m->cookie);
    put_u64(buf + 32, m->bytes);
    put_u64(buf + 40, m->epoch);
    put_u32(buf + 48, (uint32_t)m->head_begin);
    put_u32(buf + 52, (uint32_t)m->head_end);
    memset(buf + 56, 0, SPEED_KV_NOTIFY_ID_MAX);
    size_t n = strnlen(m->request_id, SPEED_KV_NOTIFY_ID_MAX - 1);
    memcpy(buf + 56, m->request_id, n);
    memcpy(buf + 120, m->nonce, SPEED_KV_NONCE_BYTES);
    if (m->n_tags) memcpy(buf + SPEED_KV_NOTIFY_HEADER, m->tags, (size_t)m->n_tags * SPEED_KV_TAG_BYTES);
}

speed_status_t speed_kv_notify_decode(const uint8_t *data, size_t len, speed_kv_notify_wire_t *out,
                                      const char **why_p) {
    const char *why = NULL;
    memset(out, 0, sizeof *out);
    if (!data || len < SPEED_KV_NOTIFY_HEADER) {
        why = "shorter than the header";
    } else if (get_u32(data) != SPEED_KV_NOTIFY_MAGIC) {
        why = "bad magic";
    } else if (get_u32(data + 4) != SPEED_KV_NOTIFY_VERSION) {
        why = "another version";
    } else {
        out->flags = get_u32(data + 8);
        out->n_tags = get_u32(data + 12);
        out->token = get_u64(data + 16);
        out->cookie = get_u64(data + 24);
        out->bytes = get_u64(data + 32);
        out->epoch = get_u64(data + 40);
        out->head_begin = (int32_t)get_u32(data + 48);
        out->head_end = (int32_t)get_u32(data + 52);
        memcpy(out->request_id, data + 56, SPEED_KV_NOTIFY_ID_MAX);
        memcpy(out->nonce, data + 120, SPEED_KV_NONCE_BYTES);
        if (out->flags & ~SPEED_KV_NOTIFY_FLAG_ABORT)
            why = "unknown flags";
        else if (out->n_tags > SPEED_KV_DESC_MAX_LAYERS)
            why = "too many tags";
        else if (len != speed_kv_notify_wire_size(out->n_tags))
            why = "length does not match the tag count";
        else if (!memchr(out->request_id, '\0', SPEED_KV_NOTIFY_ID_MAX))
            why = "request id not terminated";
        else if (out->head_begin < 0 || out->head_begin >= out->head_end || out->head_end > 65536)
            why = "bad head range";
        else
            out->tags = out->n_tags ? data + SPEED_KV_NOTIFY_HEADER : NULL;
    }
    if (why) {
        memset(out, 0, sizeof *out);
        if (why_p) *why_p = why;
        return SPEED_ERR_FORMAT;
    }
    if (why_p) *why_p = NULL;
    return SPEED_OK;
}
