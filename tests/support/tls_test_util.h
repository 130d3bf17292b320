/* A throwaway TLS certificate for the HTTPS tests (library speed_test_tls), made with GnuTLS's
 * x509 API: a self-signed ECDSA P-256 certificate for 127.0.0.1, ::1 and "localhost", valid
 * for a day from a minute ago, usable both as the server's certificate and as the CA a client
 * trusts. Test-only: common/tls (another part of issue 10) makes the real ones.
 *
 * Thread-safety: reentrant. */
#ifndef SPEED_TESTS_TLS_TEST_UTIL_H
#define SPEED_TESTS_TLS_TEST_UTIL_H

#include <stdbool.h>

/* Writes the certificate and its private key as PEM files at cert_path and key_path (mode
 * 0600). *cert_pem_p (may be NULL) receives a malloc'd copy of the certificate text, for a
 * client's trust list (free() it). False (printed) on failure. */
bool tu_tls_make_cert(const char *cert_path, const char *key_path, char **cert_pem_p);

#endif /* SPEED_TESTS_TLS_TEST_UTIL_H */
