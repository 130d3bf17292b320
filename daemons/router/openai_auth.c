/* The API key check: Authorization: Bearer KEY against the configured keys, in time that does
 * not depend on how much of a key matches. */
#include "openai.h"

#include <string.h>
#include <strings.h>

/* Compares without branching on content: the loop runs over the presented key's length
 * whatever the configured key holds. */
static unsigned key_differs(const unsigned char *a, size_t na, const char *key) {
    size_t nk = strlen(key);
    volatile unsigned diff = na != nk;
    for (size_t i = 0; i < na; i++) {
        unsigned char kc = i < nk ? (unsigned char)key[i] : 0;
        diff |= (unsigned)(a[i] ^ kc);
    }
    return diff;
}

bool speed_openai_auth_check(const char *header, const char *const *keys, size_t n_keys, speed_openai_error_t *err) {
    if (n_keys == 0) return true;
    size_t idx;
    return speed_openai_auth_match(header, keys, n_keys, &idx, err);
}

bool speed_openai_auth_match(const char *header, const char *const *keys, size_t n_keys, size_t *index_p,
                             speed_openai_error_t *err) {
    if (n_keys == 0) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_API_KEY, NULL, "invalid_api_key",
                               "Incorrect API key provided.");
        return false;
    }
    const char *p = header;
    if (p) {
        while (*p == ' ' || *p == '\t') p++;
        if (strncasecmp(p, "Bearer", 6) == 0 && (p[6] == ' ' || p[6] == '\t')) {
            p += 6;
            while (*p == ' ' || *p == '\t') p++;
        } else {
            p = NULL;
        }
    }
    size_t n = p ? strlen(p) : 0;
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t')) n--;
    if (!p || n == 0) {
        speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_API_KEY, NULL, "",
                               "You didn't provide an API key. You need to provide your API "
                               "key in an Authorization header using Bearer auth (i.e. "
                               "Authorization: Bearer YOUR_KEY).");
        return false;
    }
    /* Every key is compared in full, and the matching index is selected with a mask, so the
     * time says nothing about which key (or how much of one) matched. */
    unsigned match = 0;
    size_t idx = 0;
    for (size_t i = 0; i < n_keys; i++) {
        unsigned hit = keys && keys[i] ? key_differs((const unsigned char *)p, n, keys[i]) == 0 : 0;
        size_t mask = (size_t)0 - (size_t)hit;
        idx |= i & mask;
        match |= hit;
    }
    if (match) {
        *index_p = idx;
        return true;
    }
    speed_openai_error_set(err, SPEED_OPENAI_ERR_INVALID_API_KEY, NULL, "invalid_api_key",
                           "Incorrect API key provided.");
    return false;
}
