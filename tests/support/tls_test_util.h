/* Certificates for tests (library speed_test_tls): a cluster CA and one certificate per
 * process identity the tests use, written once per test into a directory, plus a second CA
 * with a "router" certificate of its own (a stranger with a valid-looking certificate).
 *
 * Files in `dir`: ca.crt ca.key; <name>.crt <name>.key for router, admin, prefill-0..3,
 * decode-0..3 (SAN 127.0.0.1, localhost, ::1 and the netns bed's hosts 10.77.0.1..16); other-ca.crt; stranger.crt stranger.key (CN
 * "router", signed by the other CA). Set-up failures print the cause and exit(1).
 * Thread-safety: call from the test's main thread.
 */
#ifndef SPEED_TLS_TEST_UTIL_H
#define SPEED_TLS_TEST_UTIL_H

#include <stdbool.h>

#include "rpc.h"
#include "tls.h"

/* Writes the files above into dir (created if missing). Idempotent per dir. */
void tt_certs_write(const char *dir);

/* Loads <dir>/ca.crt with <dir>/<name>.crt and .key, checked together (speed_tls_creds_load).
 * "stranger" is read without that check (its certificate is of the other CA) and comes with the
 * cluster's ca.crt as its trust root: a stranger that knows whom to trust but holds no
 * certificate of the cluster. Exits 1 on failure. */
void tt_creds_load(const char *dir, const char *name, speed_tls_creds_t *creds_p);

/* A throwaway server certificate for HTTPS tests: a fresh CA (one per call) and a certificate it
 * issued for 127.0.0.1, ::1 and "localhost", written as PEM at cert_path and key_path (0600).
 * *ca_pem_p (may be NULL) receives a malloc'd copy of the CA certificate, the trust list of a
 * client (free() it); two calls give certificates that do not trust each other. False (printed)
 * on failure. */
bool tu_tls_make_cert(const char *cert_path, const char *key_path, char **ca_pem_p);

/* An rpc TLS view of loaded credentials (pointers into creds). */
speed_rpc_tls_t tt_rpc_tls(const speed_tls_creds_t *creds);

#endif /* SPEED_TLS_TEST_UTIL_H */
