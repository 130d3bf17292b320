/* speed_tls: the cluster's certificates (the only part of speedserve that uses GnuTLS).
 *
 * The control plane (gRPC) runs mutual TLS: every process holds a certificate signed by the
 * cluster's own CA, whose common name (CN) is the process's identity: "router", "prefill-0",
 * "decode-1", "admin" (speedctl). The nodes authorise each method by that name (rpc.h,
 * speed_rpc_server_allow). This library makes and checks those certificates:
 *
 *   speed_tls_ca_create      a self-signed CA (ECDSA P-256, SHA-256 signatures)
 *   speed_tls_cert_issue     a process certificate signed by the CA (CN, SAN hosts,
 *                            usable as TLS server and client)
 *   speed_tls_pem_write      cert and key to files (key mode 0600, never overwritten unless asked)
 *   speed_tls_creds_load     what a daemon does at startup: read CA, cert and key files and check
 *                            them together (signed by the CA, in its validity period, key
 *                            matching), with one clear error otherwise
 *
 * Everything is PEM text in memory (NUL-terminated). Keys are PKCS#8, unencrypted: protect them
 * with file permissions. Buffers holding keys are wiped before they are freed.
 *
 * Errors: functions that check input return a status and write the reason into err (one line,
 * naming the file when there is one); nothing is logged from here except where noted.
 * Thread-safety: every function is reentrant (GnuTLS initialises itself at load time).
 */
#ifndef SPEED_TLS_H
#define SPEED_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* A certificate and (optionally) its private key, PEM, speed_malloc'd. */
typedef struct {
    char *cert;
    char *key; /* NULL when only the certificate is known */
} speed_tls_pem_t;

/* Frees both strings (the key wiped first) and zeroes the struct. Safe on a zeroed struct. */
void speed_tls_pem_cleanup(speed_tls_pem_t *pem);

/* What a certificate says about its subject. */
typedef struct {
    const char *cn;           /* common name: the identity ("router", "prefill-0", ...) */
    const char *const *hosts; /* subject alternative names: IP addresses (v4 or v6) or DNS names */
    int n_hosts;
    int64_t not_before; /* unix seconds; 0 = an hour ago (clock skew between hosts) */
    int64_t days;       /* validity from not_before; > 0 */
} speed_tls_cert_params_t;

/* Default validity of what speedctl writes: the CA 10 years, process certificates 1 year. */
#define SPEED_TLS_CA_DAYS   3650
#define SPEED_TLS_CERT_DAYS 365

/* Create a self-signed CA: a new ECDSA P-256 key, CN params->cn, basic constraints CA:TRUE,
 * key usage certificate and CRL signing. params->hosts are ignored.
 * Returns SPEED_OK and *ca_p (cert and key); SPEED_ERR_INVALID_ARGUMENT (NULL, empty cn,
 * days <= 0); SPEED_ERR_NO_MEMORY; SPEED_ERR_INTERNAL when GnuTLS fails (reason in err). */
speed_status_t speed_tls_ca_create(const speed_tls_cert_params_t *params, speed_tls_pem_t *ca_p, char *err,
                                   size_t err_size);

/* Issue a certificate for params->cn signed by `ca` (cert and key): a new ECDSA P-256 key,
 * CA:FALSE, digital signature, extended key usage TLS server + TLS client, one SAN per host
 * (an IP address when the text parses as one, a DNS name otherwise).
 * Returns SPEED_OK and *pem_p; SPEED_ERR_INVALID_ARGUMENT (NULL, empty cn, days <= 0, a host
 * that is empty); SPEED_ERR_PARSE when `ca` does not parse; SPEED_ERR_NO_MEMORY;
 * SPEED_ERR_INTERNAL when GnuTLS fails. The reason goes into err. */
speed_status_t speed_tls_cert_issue(const speed_tls_pem_t *ca, const speed_tls_cert_params_t *params,
                                    speed_tls_pem_t *pem_p, char *err, size_t err_size);

/* Write pem->cert to cert_path (mode 0644) and pem->key to key_path (mode 0600; skipped when
 * key_path is NULL). Refuses existing files unless overwrite. A key file is created with mode
 * 0600 from the start (never readable by others, even briefly).
 * Returns SPEED_OK; SPEED_ERR_INVALID_ARGUMENT (NULL); SPEED_ERR_IO (cannot write, or a file
 * exists and overwrite is false: the reason in err). */
speed_status_t speed_tls_pem_write(const speed_tls_pem_t *pem, const char *cert_path, const char *key_path,
                                   bool overwrite, char *err, size_t err_size);

/* Check that cert_pem is signed by ca_pem and valid now (or at `at`, unix seconds, when > 0).
 * Returns SPEED_OK; SPEED_ERR_PARSE (either PEM does not parse); SPEED_ERR_FORMAT (not signed
 * by that CA, expired, not yet valid: GnuTLS's description in err). */
speed_status_t speed_tls_cert_verify(const char *ca_pem, const char *cert_pem, int64_t at, char *err, size_t err_size);

/* The certificate's subject common name into cn (NUL-terminated).
 * Returns SPEED_OK; SPEED_ERR_PARSE; SPEED_ERR_NOT_FOUND (no CN); SPEED_ERR_TOO_LONG (cn_size
 * too small). */
speed_status_t speed_tls_cert_cn(const char *cert_pem, char *cn, size_t cn_size, char *err, size_t err_size);

/* A process's credentials, as loaded at startup. */
typedef struct {
    char *ca;   /* the cluster CA certificate(s), PEM */
    char *cert; /* this process's certificate, PEM */
    char *key;  /* its private key, PEM (wiped on cleanup) */
    char cn[64];
} speed_tls_creds_t;

/* Read the three files (each at most 1 MiB) and check them together: the certificate parses,
 * is signed by the CA and is valid now; the key parses and belongs to the certificate; the
 * certificate has a CN. On failure err says which file and why, in one line.
 * Returns SPEED_OK and *creds_p; SPEED_ERR_INVALID_ARGUMENT (a path NULL or empty);
 * SPEED_ERR_NOT_FOUND / SPEED_ERR_IO (a file cannot be read); SPEED_ERR_PARSE (not PEM of the
 * right kind); SPEED_ERR_FORMAT (not signed by the CA, expired, key of another certificate);
 * SPEED_ERR_NO_MEMORY. */
speed_status_t speed_tls_creds_load(const char *ca_path, const char *cert_path, const char *key_path,
                                    speed_tls_creds_t *creds_p, char *err, size_t err_size);

/* Frees the strings (the key wiped first) and zeroes the struct. Safe on a zeroed struct. */
void speed_tls_creds_cleanup(speed_tls_creds_t *creds);

#endif /* SPEED_TLS_H */
