/* speed_mac: a keyed message authentication code (HMAC-SHA-256, truncated to
 * SPEED_MAC_TAG_BYTES) and a constant-time comparison, for the KV plane's integrity mode and
 * its nonces (docs/security.md#the-kv-plane). A thin layer over GnuTLS so that only this part
 * includes the GnuTLS headers for it.
 *
 *   speed_mac_t m;
 *   speed_mac_begin(&m, key, key_len);      // SPEED_OK / SPEED_ERR_NO_MEMORY / SPEED_ERR_INTERNAL
 *   speed_mac_update(&m, bytes, n);         // any number of times
 *   speed_mac_end(&m, tag);                 // writes the tag, frees the state
 *
 * A speed_mac_t is used by one thread at a time; different ones are independent. After
 * speed_mac_begin succeeded, exactly one speed_mac_end (or speed_mac_abort) must follow.
 */
#ifndef SPEED_MAC_H
#define SPEED_MAC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define SPEED_MAC_TAG_BYTES 16 /* HMAC-SHA-256 truncated to 128 bits (RFC 2104 section 5) */

typedef struct {
    void *h; /* the GnuTLS HMAC handle */
} speed_mac_t;

/* Starts a MAC under key (1..64 bytes). Returns SPEED_OK, SPEED_ERR_INVALID_ARGUMENT (NULLs, bad
 * key length) or SPEED_ERR_INTERNAL (GnuTLS refused: logged). */
speed_status_t speed_mac_begin(speed_mac_t *m, const uint8_t *key, size_t key_len);

/* Adds n bytes. Returns SPEED_OK or SPEED_ERR_INTERNAL (logged). */
speed_status_t speed_mac_update(speed_mac_t *m, const void *data, size_t n);

/* Writes the SPEED_MAC_TAG_BYTES tag and ends the MAC. */
void speed_mac_end(speed_mac_t *m, uint8_t tag[SPEED_MAC_TAG_BYTES]);

/* Ends the MAC without a tag (an error path). */
void speed_mac_abort(speed_mac_t *m);

/* Whether a[0..n) == b[0..n), in time that depends on n only (secrets: nonces, tags). */
bool speed_mac_equal(const void *a, const void *b, size_t n);

/* Fills buf with n bytes from the kernel's CSPRNG (getrandom). Returns SPEED_OK or
 * SPEED_ERR_IO (logged with the cause). */
speed_status_t speed_random_bytes(void *buf, size_t n);

#endif /* SPEED_MAC_H */
