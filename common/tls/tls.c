/* speed_tls: see tls.h. GnuTLS's x509 API (gnutls_x509_crt_*, gnutls_x509_privkey_*): keys are
 * generated and certificates signed in process, never by running a tool.
 *
 * Why these choices: ECDSA P-256 is what every TLS stack gRPC may be built on accepts (Ed25519
 * certificates are not accepted everywhere yet); serials are 16 random bytes (RFC 5280 allows
 * 20, and no two certificates of one CA share one); certificates start an hour in the past so
 * that hosts whose clocks differ a little accept a certificate made a moment ago.
 */
#define _GNU_SOURCE /* explicit_bzero */
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "alloc.h"
#include "file.h"

#define TLS_MAX_FILE_BYTES (1u << 20)
#define TLS_MAX_CA_CERTS   16

static void seterr(char *err, size_t size, const char *fmt, ...) {
    if (!err || size == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
}

static void free_secret(char *s) {
    if (!s) return;
    explicit_bzero(s, strlen(s));
    speed_free(s);
}

void speed_tls_pem_cleanup(speed_tls_pem_t *pem) {
    if (!pem) return;
    speed_free(pem->cert);
    free_secret(pem->key);
    memset(pem, 0, sizeof *pem);
}

void speed_tls_creds_cleanup(speed_tls_creds_t *c) {
    if (!c) return;
    speed_free(c->ca);
    speed_free(c->cert);
    free_secret(c->key);
    memset(c, 0, sizeof *c);
}

/* ---- GnuTLS objects <-> PEM text ------------------------------------------------------ */

static gnutls_datum_t datum_of(const char *pem) {
    return (gnutls_datum_t){.data = (unsigned char *)pem, .size = (unsigned)strlen(pem)};
}

/* A gnutls-allocated datum into a speed_malloc'd NUL-terminated string; the datum is freed
 * (wiped first when `secret`). */
static char *datum_take(gnutls_datum_t *d, bool secret) {
    char *s = speed_malloc(d->size + 1);
    if (s) {
        memcpy(s, d->data, d->size);
        s[d->size] = '\0';
    }
    if (secret) explicit_bzero(d->data, d->size);
    gnutls_free(d->data);
    d->data = NULL;
    return s;
}

static speed_status_t crt_parse(const char *pem, gnutls_x509_crt_t *crt_p, const char *what, char *err, size_t size) {
    gnutls_x509_crt_t crt;
    if (gnutls_x509_crt_init(&crt) < 0) return SPEED_ERR_NO_MEMORY;
    gnutls_datum_t d = datum_of(pem);
    int rc = gnutls_x509_crt_import(crt, &d, GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
        gnutls_x509_crt_deinit(crt);
        seterr(err, size, "%s: not a PEM certificate (%s)", what, gnutls_strerror(rc));
        return SPEED_ERR_PARSE;
    }
    *crt_p = crt;
    return SPEED_OK;
}

static speed_status_t key_parse(const char *pem, gnutls_x509_privkey_t *key_p, const char *what, char *err,
                                size_t size) {
    gnutls_x509_privkey_t key;
    if (gnutls_x509_privkey_init(&key) < 0) return SPEED_ERR_NO_MEMORY;
    gnutls_datum_t d = datum_of(pem);
    int rc = gnutls_x509_privkey_import2(key, &d, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN);
    if (rc < 0) {
        gnutls_x509_privkey_deinit(key);
        seterr(err, size, "%s: not an unencrypted PEM private key (%s)", what, gnutls_strerror(rc));
        return SPEED_ERR_PARSE;
    }
    *key_p = key;
    return SPEED_OK;
}

/* ---- making certificates -------------------------------------------------------------- */

static bool params_ok(const speed_tls_cert_params_t *p) {
    return p && p->cn && p->cn[0] && p->days > 0 && (p->n_hosts == 0 || p->hosts);
}

/* Everything a CA and a process certificate share: version, serial, validity, subject, key. */
static int crt_fill(gnutls_x509_crt_t crt, gnutls_x509_privkey_t key, const speed_tls_cert_params_t *p) {
    unsigned char serial[16];
    int rc = gnutls_rnd(GNUTLS_RND_NONCE, serial, sizeof serial);
    if (rc < 0) return rc;
    serial[0] = (unsigned char)((serial[0] & 0x7f) | 0x01); /* positive, and never zero */
    time_t start = p->not_before > 0 ? (time_t)p->not_before : time(NULL) - 3600;
    if ((rc = gnutls_x509_crt_set_version(crt, 3)) < 0) return rc;
    if ((rc = gnutls_x509_crt_set_serial(crt, serial, sizeof serial)) < 0) return rc;
    if ((rc = gnutls_x509_crt_set_activation_time(crt, start)) < 0) return rc;
    if ((rc = gnutls_x509_crt_set_expiration_time(crt, start + (time_t)p->days * 86400)) < 0) return rc;
    if ((rc = gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, p->cn, (unsigned)strlen(p->cn))) < 0)
        return rc;
    if ((rc = gnutls_x509_crt_set_key(crt, key)) < 0) return rc;
    unsigned char kid[64];
    size_t kid_size = sizeof kid;
    if ((rc = gnutls_x509_crt_get_key_id(crt, 0, kid, &kid_size)) < 0) return rc;
    return gnutls_x509_crt_set_subject_key_id(crt, kid, kid_size);
}

static int key_generate(gnutls_x509_privkey_t *key_p) {
    int rc = gnutls_x509_privkey_init(key_p);
    if (rc < 0) return rc;
    rc = gnutls_x509_privkey_generate(*key_p, GNUTLS_PK_ECDSA, GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0);
    if (rc < 0) {
        gnutls_x509_privkey_deinit(*key_p);
        *key_p = NULL;
    }
    return rc;
}

/* Export the signed certificate and its key into *pem_p. */
static speed_status_t export_pair(gnutls_x509_crt_t crt, gnutls_x509_privkey_t key, speed_tls_pem_t *pem_p, char *err,
                                  size_t size) {
    gnutls_datum_t dc = {0}, dk = {0};
    int rc = gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &dc);
    if (rc >= 0) rc = gnutls_x509_privkey_export2_pkcs8(key, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN, &dk);
    if (rc < 0) {
        if (dc.data) gnutls_free(dc.data);
        seterr(err, size, "cannot export the certificate: %s", gnutls_strerror(rc));
        return SPEED_ERR_INTERNAL;
    }
    speed_tls_pem_t pem = {.cert = datum_take(&dc, false), .key = datum_take(&dk, true)};
    if (!pem.cert || !pem.key) {
        speed_tls_pem_cleanup(&pem);
        return SPEED_ERR_NO_MEMORY;
    }
    *pem_p = pem;
    return SPEED_OK;
}

speed_status_t speed_tls_ca_create(const speed_tls_cert_params_t *p, speed_tls_pem_t *ca_p, char *err, size_t size) {
    if (!params_ok(p) || !ca_p) return SPEED_ERR_INVALID_ARGUMENT;
    memset(ca_p, 0, sizeof *ca_p);
    gnutls_x509_privkey_t key = NULL;
    gnutls_x509_crt_t crt = NULL;
    int rc = key_generate(&key);
    if (rc >= 0) rc = gnutls_x509_crt_init(&crt);
    if (rc >= 0) rc = crt_fill(crt, key, p);
    if (rc >= 0) rc = gnutls_x509_crt_set_basic_constraints(crt, 1, -1);
    if (rc >= 0) rc = gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN);
    if (rc >= 0) rc = gnutls_x509_crt_sign2(crt, crt, key, GNUTLS_DIG_SHA256, 0);
    speed_status_t st = SPEED_OK;
    if (rc < 0) {
        seterr(err, size, "cannot create the CA: %s", gnutls_strerror(rc));
        st = SPEED_ERR_INTERNAL;
    } else {
        st = export_pair(crt, key, ca_p, err, size);
    }
    if (crt) gnutls_x509_crt_deinit(crt);
    if (key) gnutls_x509_privkey_deinit(key);
    return st;
}

static int add_san(gnutls_x509_crt_t crt, const char *host) {
    unsigned char addr[16];
    if (inet_pton(AF_INET, host, addr) == 1)
        return gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, addr, 4, GNUTLS_FSAN_APPEND);
    if (inet_pton(AF_INET6, host, addr) == 1)
        return gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, addr, 16, GNUTLS_FSAN_APPEND);
    return gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_DNSNAME, host, (unsigned)strlen(host),
                                                GNUTLS_FSAN_APPEND);
}

speed_status_t speed_tls_cert_issue(const speed_tls_pem_t *ca, const speed_tls_cert_params_t *p, speed_tls_pem_t *pem_p,
                                    char *err, size_t size) {
    if (!ca || !ca->cert || !ca->key || !params_ok(p) || !pem_p) return SPEED_ERR_INVALID_ARGUMENT;
    memset(pem_p, 0, sizeof *pem_p);
    for (int i = 0; i < p->n_hosts; i++)
        if (!p->hosts[i] || !p->hosts[i][0]) {
            seterr(err, size, "certificate for %s: an empty host name", p->cn);
            return SPEED_ERR_INVALID_ARGUMENT;
        }
    gnutls_x509_crt_t ca_crt = NULL, crt = NULL;
    gnutls_x509_privkey_t ca_key = NULL, key = NULL;
    speed_status_t st = crt_parse(ca->cert, &ca_crt, "CA certificate", err, size);
    if (st == SPEED_OK) st = key_parse(ca->key, &ca_key, "CA key", err, size);
    if (st != SPEED_OK) goto out;

    int rc = key_generate(&key);
    if (rc >= 0) rc = gnutls_x509_crt_init(&crt);
    if (rc >= 0) rc = crt_fill(crt, key, p);
    if (rc >= 0) rc = gnutls_x509_crt_set_basic_constraints(crt, 0, -1);
    if (rc >= 0) rc = gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_DIGITAL_SIGNATURE);
    if (rc >= 0) rc = gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_SERVER, 0);
    if (rc >= 0) rc = gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_CLIENT, 0);
    for (int i = 0; i < p->n_hosts && rc >= 0; i++) rc = add_san(crt, p->hosts[i]);
    if (rc >= 0) {
        unsigned char kid[64];
        size_t kid_size = sizeof kid;
        unsigned int critical = 0;
        if (gnutls_x509_crt_get_subject_key_id(ca_crt, kid, &kid_size, &critical) >= 0)
            rc = gnutls_x509_crt_set_authority_key_id(crt, kid, kid_size);
    }
    if (rc >= 0) rc = gnutls_x509_crt_sign2(crt, ca_crt, ca_key, GNUTLS_DIG_SHA256, 0);
    if (rc < 0) {
        seterr(err, size, "cannot issue a certificate for %s: %s", p->cn, gnutls_strerror(rc));
        st = SPEED_ERR_INTERNAL;
        goto out;
    }
    st = export_pair(crt, key, pem_p, err, size);
out:
    if (crt) gnutls_x509_crt_deinit(crt);
    if (key) gnutls_x509_privkey_deinit(key);
    if (ca_key) gnutls_x509_privkey_deinit(ca_key);
    if (ca_crt) gnutls_x509_crt_deinit(ca_crt);
    return st;
}

/* ---- files ---------------------------------------------------------------------------- */

static speed_status_t write_text(const char *path, const char *text, mode_t mode, bool overwrite, char *err,
                                 size_t size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : O_EXCL), mode);
    if (fd < 0) {
        if (errno == EEXIST)
            seterr(err, size, "%s exists (use --force to overwrite)", path);
        else
            seterr(err, size, "cannot create %s: %s", path, strerror(errno));
        return SPEED_ERR_IO;
    }
    /* An existing file keeps its old mode through O_TRUNC: set it, before any byte goes in. */
    bool ok = fchmod(fd, mode) == 0;
    size_t len = strlen(text), off = 0;
    while (ok && off < len) {
        ssize_t n = write(fd, text + off, len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0)
            ok = false;
        else
            off += (size_t)n;
    }
    if (ok) ok = fsync(fd) == 0;
    int saved = errno;
    if (close(fd) != 0 && ok) {
        ok = false;
        saved = errno;
    }
    if (!ok) {
        seterr(err, size, "cannot write %s: %s", path, strerror(saved));
        return SPEED_ERR_IO;
    }
    return SPEED_OK;
}

speed_status_t speed_tls_pem_write(const speed_tls_pem_t *pem, const char *cert_path, const char *key_path,
                                   bool overwrite, char *err, size_t size) {
    if (!pem || !pem->cert || !cert_path || (key_path && !pem->key)) return SPEED_ERR_INVALID_ARGUMENT;
    if (key_path) SPEED_CHECK(write_text(key_path, pem->key, 0600, overwrite, err, size));
    return write_text(cert_path, pem->cert, 0644, overwrite, err, size);
}

/* ---- checking ------------------------------------------------------------------------- */

static void format_time(time_t t, char *buf, size_t size) {
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

/* Signature chain and validity period of crt against the CA list. */
static speed_status_t crt_check(gnutls_x509_crt_t crt, const gnutls_x509_crt_t *cas, unsigned n_cas, int64_t at,
                                const char *what, char *err, size_t size) {
    unsigned status = 0;
    /* Time is checked below, against `at`, with a message that names the dates. */
    int rc = gnutls_x509_crt_verify(crt, cas, n_cas, GNUTLS_VERIFY_DISABLE_TIME_CHECKS, &status);
    if (rc < 0) {
        seterr(err, size, "%s: cannot verify: %s", what, gnutls_strerror(rc));
        return SPEED_ERR_FORMAT;
    }
    if (status != 0) {
        gnutls_datum_t out = {0};
        if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0) {
            seterr(err, size, "%s is not signed by the cluster CA (%.*s)", what, (int)out.size, (const char *)out.data);
            gnutls_free(out.data);
        } else {
            seterr(err, size, "%s is not signed by the cluster CA", what);
        }
        return SPEED_ERR_FORMAT;
    }
    time_t now = at > 0 ? (time_t)at : time(NULL);
    time_t from = gnutls_x509_crt_get_activation_time(crt), until = gnutls_x509_crt_get_expiration_time(crt);
    char when[64];
    if (from != (time_t)-1 && now < from) {
        format_time(from, when, sizeof when);
        seterr(err, size, "%s is not valid before %s", what, when);
        return SPEED_ERR_FORMAT;
    }
    if (until != (time_t)-1 && now > until) {
        format_time(until, when, sizeof when);
        seterr(err, size, "%s expired on %s", what, when);
        return SPEED_ERR_FORMAT;
    }
    return SPEED_OK;
}

/* The CA file may hold several certificates (a CA being rotated: old and new). */
static speed_status_t ca_parse(const char *pem, gnutls_x509_crt_t **cas_p, unsigned *n_p, const char *what, char *err,
                               size_t size) {
    gnutls_datum_t d = datum_of(pem);
    int rc = gnutls_x509_crt_list_import2(cas_p, n_p, &d, GNUTLS_X509_FMT_PEM, 0);
    if (rc < 0 || *n_p == 0) {
        seterr(err, size, "%s: not a PEM certificate (%s)", what, rc < 0 ? gnutls_strerror(rc) : "empty");
        return SPEED_ERR_PARSE;
    }
    if (*n_p > TLS_MAX_CA_CERTS) {
        for (unsigned i = 0; i < *n_p; i++) gnutls_x509_crt_deinit((*cas_p)[i]);
        gnutls_free(*cas_p);
        seterr(err, size, "%s: more than %d certificates", what, TLS_MAX_CA_CERTS);
        return SPEED_ERR_FORMAT;
    }
    return SPEED_OK;
}

static void ca_free(gnutls_x509_crt_t *cas, unsigned n) {
    for (unsigned i = 0; i < n; i++) gnutls_x509_crt_deinit(cas[i]);
    gnutls_free(cas);
}

speed_status_t speed_tls_cert_verify(const char *ca_pem, const char *cert_pem, int64_t at, char *err, size_t size) {
    if (!ca_pem || !cert_pem) return SPEED_ERR_INVALID_ARGUMENT;
    gnutls_x509_crt_t *cas = NULL, crt = NULL;
    unsigned n_cas = 0;
    SPEED_CHECK(ca_parse(ca_pem, &cas, &n_cas, "CA certificate", err, size));
    speed_status_t st = crt_parse(cert_pem, &crt, "certificate", err, size);
    if (st == SPEED_OK) st = crt_check(crt, cas, n_cas, at, "the certificate", err, size);
    if (crt) gnutls_x509_crt_deinit(crt);
    ca_free(cas, n_cas);
    return st;
}

static speed_status_t crt_cn(gnutls_x509_crt_t crt, char *cn, size_t cn_size, const char *what, char *err,
                             size_t size) {
    size_t n = cn_size;
    int rc = gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, cn, &n);
    if (rc == GNUTLS_E_SHORT_MEMORY_BUFFER) {
        seterr(err, size, "%s: common name longer than %zu bytes", what, cn_size - 1);
        return SPEED_ERR_TOO_LONG;
    }
    if (rc < 0 || n == 0) {
        seterr(err, size, "%s has no common name (the process identity)", what);
        return SPEED_ERR_NOT_FOUND;
    }
    return SPEED_OK;
}

speed_status_t speed_tls_cert_cn(const char *cert_pem, char *cn, size_t cn_size, char *err, size_t size) {
    if (!cert_pem || !cn || cn_size == 0) return SPEED_ERR_INVALID_ARGUMENT;
    gnutls_x509_crt_t crt = NULL;
    SPEED_CHECK(crt_parse(cert_pem, &crt, "certificate", err, size));
    speed_status_t st = crt_cn(crt, cn, cn_size, "the certificate", err, size);
    gnutls_x509_crt_deinit(crt);
    return st;
}

static speed_status_t read_pem(const char *path, const char *what, char **text_p, char *err, size_t size) {
    size_t len = 0;
    speed_status_t st = speed_file_read(path, TLS_MAX_FILE_BYTES, SPEED_SUBSYS_NET, 0, text_p, &len);
    if (st != SPEED_OK) {
        seterr(err, size, "%s %s: %s", what, path, speed_status_string(st));
        return st;
    }
    if (strlen(*text_p) != len) { /* a NUL inside: not PEM */
        speed_free(*text_p);
        *text_p = NULL;
        seterr(err, size, "%s %s: not a PEM file", what, path);
        return SPEED_ERR_PARSE;
    }
    return SPEED_OK;
}

speed_status_t speed_tls_creds_load(const char *ca_path, const char *cert_path, const char *key_path,
                                    speed_tls_creds_t *creds_p, char *err, size_t size) {
    if (!creds_p) return SPEED_ERR_INVALID_ARGUMENT;
    memset(creds_p, 0, sizeof *creds_p);
    if (!ca_path || !ca_path[0] || !cert_path || !cert_path[0] || !key_path || !key_path[0]) {
        seterr(err, size, "tls.ca, tls.cert and tls.key must all be set");
        return SPEED_ERR_INVALID_ARGUMENT;
    }
    speed_tls_creds_t c;
    memset(&c, 0, sizeof c);
    gnutls_x509_crt_t *cas = NULL, crt = NULL;
    unsigned n_cas = 0;
    gnutls_x509_privkey_t key = NULL;
    char what[600];
    speed_status_t st = read_pem(ca_path, "tls.ca", &c.ca, err, size);
    if (st == SPEED_OK) st = read_pem(cert_path, "tls.cert", &c.cert, err, size);
    if (st == SPEED_OK) st = read_pem(key_path, "tls.key", &c.key, err, size);
    if (st != SPEED_OK) goto out;

    snprintf(what, sizeof what, "tls.ca %s", ca_path);
    SPEED_CHECK_GOTO(ca_parse(c.ca, &cas, &n_cas, what, err, size), st, out);
    snprintf(what, sizeof what, "tls.cert %s", cert_path);
    SPEED_CHECK_GOTO(crt_parse(c.cert, &crt, what, err, size), st, out);
    SPEED_CHECK_GOTO(crt_check(crt, cas, n_cas, 0, what, err, size), st, out);
    SPEED_CHECK_GOTO(crt_cn(crt, c.cn, sizeof c.cn, what, err, size), st, out);
    snprintf(what, sizeof what, "tls.key %s", key_path);
    SPEED_CHECK_GOTO(key_parse(c.key, &key, what, err, size), st, out);

    unsigned char a[64], b[64];
    size_t na = sizeof a, nb = sizeof b;
    if (gnutls_x509_crt_get_key_id(crt, 0, a, &na) < 0 || gnutls_x509_privkey_get_key_id(key, 0, b, &nb) < 0 ||
        na != nb || memcmp(a, b, na) != 0) {
        seterr(err, size, "tls.key %s is not the key of tls.cert %s", key_path, cert_path);
        st = SPEED_ERR_FORMAT;
        goto out;
    }
    *creds_p = c;
    memset(&c, 0, sizeof c);
out:
    if (key) gnutls_x509_privkey_deinit(key);
    if (crt) gnutls_x509_crt_deinit(crt);
    if (cas) ca_free(cas, n_cas);
    speed_tls_creds_cleanup(&c);
    return st;
}
