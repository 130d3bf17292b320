/* speed_http client TLS over GnuTLS (http_tls.h). */
#include "http_tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

#include <gnutls/gnutls.h>

#include "alloc.h"
#include "log.h"

#define SUBSYS SPEED_SUBSYS_NET

struct speed_http_tls {
    gnutls_session_t session;
    gnutls_certificate_credentials_t cred;
    char *name;
};

void speed_http_tls_close(speed_http_tls_t *t) {
    if (!t) return;
    if (t->session) {
        gnutls_bye(t->session, GNUTLS_SHUT_WR);
        gnutls_deinit(t->session);
    }
    if (t->cred) gnutls_certificate_free_credentials(t->cred);
    speed_free(t->name);
    speed_free(t);
}

speed_status_t speed_http_tls_open(int fd, const char *ca_pem, const char *name,
                                   speed_status_t (*wait)(void *user, bool want_write), void *user,
                                   speed_http_tls_t **tls_p) {
    speed_http_tls_t *t = speed_calloc(1, sizeof *t);
    if (!t) return SPEED_ERR_NO_MEMORY;
    t->name = speed_strdup(name ? name : "");
    if (!t->name || gnutls_certificate_allocate_credentials(&t->cred) != GNUTLS_E_SUCCESS) {
        speed_http_tls_close(t);
        return SPEED_ERR_NO_MEMORY;
    }
    int rc;
    if (ca_pem) {
        gnutls_datum_t d = {(unsigned char *)ca_pem, (unsigned)strlen(ca_pem)};
        rc = gnutls_certificate_set_x509_trust_mem(t->cred, &d, GNUTLS_X509_FMT_PEM);
    } else {
        rc = gnutls_certificate_set_x509_system_trust(t->cred);
    }
    if (rc <= 0) {
        SPEED_DEBUG(SUBSYS, "http client: no usable CA certificate (%s)", rc < 0 ? gnutls_strerror(rc) : "none");
        speed_http_tls_close(t);
        return SPEED_ERR_PEER_PROTOCOL;
    }
    if (gnutls_init(&t->session, GNUTLS_CLIENT | GNUTLS_NONBLOCK) != GNUTLS_E_SUCCESS) {
        t->session = NULL;
        speed_http_tls_close(t);
        return SPEED_ERR_NO_MEMORY;
    }
    unsigned char probe[16];
    bool numeric = inet_pton(AF_INET, t->name, probe) == 1 || inet_pton(AF_INET6, t->name, probe) == 1;
    if (!numeric && t->name[0]) gnutls_server_name_set(t->session, GNUTLS_NAME_DNS, t->name, strlen(t->name));
    gnutls_set_default_priority(t->session);
    gnutls_credentials_set(t->session, GNUTLS_CRD_CERTIFICATE, t->cred);
    /* Verified during the handshake: chain to the CA, validity, and the name (a numeric
     * address is matched against the IP address entries). */
    gnutls_session_set_verify_cert(t->session, t->name, 0);
    gnutls_transport_set_int(t->session, fd);
    for (;;) {
        rc = gnutls_handshake(t->session);
        if (rc == GNUTLS_E_SUCCESS) break;
        if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
            speed_status_t st = wait(user, gnutls_record_get_direction(t->session) == 1);
            if (st != SPEED_OK) {
                speed_http_tls_close(t);
                return st;
            }
            continue;
        }
        if (!gnutls_error_is_fatal(rc)) continue;
        SPEED_DEBUG(SUBSYS, "http client: TLS handshake with %s failed: %s", t->name, gnutls_strerror(rc));
        speed_http_tls_close(t);
        return SPEED_ERR_PEER_PROTOCOL;
    }
    *tls_p = t;
    return SPEED_OK;
}

static ssize_t map_result(ssize_t n) {
    if (n >= 0) return n;
    if (n == GNUTLS_E_AGAIN) {
        errno = EAGAIN;
    } else if (n == GNUTLS_E_INTERRUPTED) {
        errno = EINTR;
    } else if (n == GNUTLS_E_PREMATURE_TERMINATION) {
        return 0; /* the peer closed without close_notify: a close, as for plain TCP */
    } else {
        errno = ECONNRESET;
    }
    return -1;
}

ssize_t speed_http_tls_send(speed_http_tls_t *t, const void *data, size_t len) {
    return map_result(gnutls_record_send(t->session, data, len));
}

ssize_t speed_http_tls_recv(speed_http_tls_t *t, void *buf, size_t cap) {
    return map_result(gnutls_record_recv(t->session, buf, cap));
}

bool speed_http_tls_wants_write(const speed_http_tls_t *t) { return gnutls_record_get_direction(t->session) == 1; }
