/* Self-signed test certificates with GnuTLS (tls_test_util.h). */
#include "tls_test_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

static bool write_file(const char *path, const gnutls_datum_t *d) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    bool ok = write(fd, d->data, d->size) == (ssize_t)d->size;
    return close(fd) == 0 && ok;
}

bool tu_tls_make_cert(const char *cert_path, const char *key_path, char **cert_pem_p) {
    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL;
    gnutls_datum_t cert_pem = {NULL, 0}, key_pem = {NULL, 0};
    bool ok = false;
    int rc = gnutls_x509_privkey_init(&key);
    if (rc == 0)
        rc = gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA, GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0);
    if (rc == 0) rc = gnutls_x509_crt_init(&crt);
    if (rc == 0) rc = gnutls_x509_crt_set_version(crt, 3);
    unsigned char serial[8];
    for (size_t i = 0; i < sizeof serial; i++) serial[i] = (unsigned char)(rand() & 0x7f);
    serial[0] |= 1;
    if (rc == 0) rc = gnutls_x509_crt_set_serial(crt, serial, sizeof serial);
    time_t now = time(NULL);
    if (rc == 0) rc = gnutls_x509_crt_set_activation_time(crt, now - 60);
    if (rc == 0) rc = gnutls_x509_crt_set_expiration_time(crt, now + 24 * 3600);
    static const char cn[] = "speedserve test";
    if (rc == 0) rc = gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, cn, sizeof cn - 1);
    unsigned char v4[4], v6[16];
    inet_pton(AF_INET, "127.0.0.1", v4);
    inet_pton(AF_INET6, "::1", v6);
    if (rc == 0) rc = gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, v4, sizeof v4, GNUTLS_FSAN_SET);
    if (rc == 0)
        rc = gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, v6, sizeof v6, GNUTLS_FSAN_APPEND);
    if (rc == 0) rc = gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_DNSNAME, "localhost", 9, GNUTLS_FSAN_APPEND);
    /* Its own CA, so that a client can trust exactly this certificate. */
    if (rc == 0) rc = gnutls_x509_crt_set_basic_constraints(crt, 1, 0);
    if (rc == 0) rc = gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_DIGITAL_SIGNATURE | GNUTLS_KEY_KEY_CERT_SIGN);
    if (rc == 0) rc = gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_SERVER, 0);
    if (rc == 0) rc = gnutls_x509_crt_set_key(crt, key);
    if (rc == 0) rc = gnutls_x509_crt_sign2(crt, crt, key, GNUTLS_DIG_SHA256, 0);
    if (rc == 0) rc = gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &cert_pem);
    if (rc == 0) rc = gnutls_x509_privkey_export2(key, GNUTLS_X509_FMT_PEM, &key_pem);
    if (rc != 0) {
        fprintf(stderr, "test certificate: %s\n", gnutls_strerror(rc));
    } else if (!write_file(cert_path, &cert_pem) || !write_file(key_path, &key_pem)) {
        fprintf(stderr, "test certificate: cannot write %s / %s\n", cert_path, key_path);
    } else {
        ok = true;
        if (cert_pem_p) {
            *cert_pem_p = malloc(cert_pem.size + 1);
            if (*cert_pem_p) {
                memcpy(*cert_pem_p, cert_pem.data, cert_pem.size);
                (*cert_pem_p)[cert_pem.size] = '\0';
            }
            ok = *cert_pem_p != NULL;
        }
    }
    gnutls_free(cert_pem.data);
    gnutls_free(key_pem.data);
    if (crt) gnutls_x509_crt_deinit(crt);
    if (key) gnutls_x509_privkey_deinit(key);
    return ok;
}
