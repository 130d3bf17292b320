/* speed_mac over GnuTLS's HMAC, and the two helpers that go with secrets (mac.h). */
#include "mac.h"

#include <errno.h>
#include <string.h>
#include <sys/random.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "log.h"

speed_status_t speed_mac_begin(speed_mac_t *m, const uint8_t *key, size_t key_len) {
    if (!m || !key || key_len < 1 || key_len > 64) return SPEED_ERR_INVALID_ARGUMENT;
    gnutls_hmac_hd_t h = NULL;
    int rc = gnutls_hmac_init(&h, GNUTLS_MAC_SHA256, key, key_len);
    if (rc < 0) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "mac: gnutls_hmac_init: %s", gnutls_strerror(rc));
        m->h = NULL;
        return SPEED_ERR_INTERNAL;
    }
    m->h = h;
    return SPEED_OK;
}

speed_status_t speed_mac_update(speed_mac_t *m, const void *data, size_t n) {
    if (!n) return SPEED_OK;
    int rc = gnutls_hmac((gnutls_hmac_hd_t)m->h, data, n);
    if (rc < 0) {
        SPEED_ERROR(SPEED_SUBSYS_CORE, "mac: gnutls_hmac: %s", gnutls_strerror(rc));
        return SPEED_ERR_INTERNAL;
    }
    return SPEED_OK;
}

void speed_mac_end(speed_mac_t *m, uint8_t tag[SPEED_MAC_TAG_BYTES]) {
    uint8_t full[32];
    gnutls_hmac_deinit((gnutls_hmac_hd_t)m->h, full);
    memcpy(tag, full, SPEED_MAC_TAG_BYTES);
    memset(full, 0, sizeof full);
    m->h = NULL;
}

void speed_mac_abort(speed_mac_t *m) {
    if (!m || !m->h) return;
    gnutls_hmac_deinit((gnutls_hmac_hd_t)m->h, NULL);
    m->h = NULL;
}

bool speed_mac_equal(const void *a, const void *b, size_t n) {
    /* volatile: the compiler may not turn the loop into an early-exit memcmp */
    const volatile uint8_t *x = a, *y = b;
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++) d |= (uint8_t)(x[i] ^ y[i]);
    return d == 0;
}

speed_status_t speed_random_bytes(void *buf, size_t n) {
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t got = getrandom(p, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            SPEED_ERROR(SPEED_SUBSYS_CORE, "getrandom: %m");
            return SPEED_ERR_IO;
        }
        p += got;
        n -= (size_t)got;
    }
    return SPEED_OK;
}
