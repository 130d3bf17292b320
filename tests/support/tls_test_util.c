/* Certificates for tests: see tls_test_util.h. */
#include "tls_test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "alloc.h"
#include "file.h"

static void die(const char *what, const char *err) {
    fprintf(stderr, "test certificates: %s: %s\n", what, err);
    exit(1);
}

static void write_pair(const char *dir, const char *name, const speed_tls_pem_t *pem) {
    char crt[1024], key[1024], err[512] = "";
    snprintf(crt, sizeof crt, "%s/%s.crt", dir, name);
    snprintf(key, sizeof key, "%s/%s.key", dir, name);
    if (speed_tls_pem_write(pem, crt, pem->key ? key : NULL, true, err, sizeof err) != SPEED_OK) die(name, err);
}

static void issue_write(const char *dir, const speed_tls_pem_t *ca, const char *cn, const char *file) {
    /* loopback, and the hosts of the netns test bed (tests/chaos/netns_bed.h: 10.77.0.<i + 1>),
     * so a cluster spread over the bed's hosts verifies the same certificates */
    static char bed[16][16];
    const char *hosts[3 + 16] = {"127.0.0.1", "localhost", "::1"};
    for (int i = 0; i < 16; i++) {
        snprintf(bed[i], sizeof bed[i], "10.77.0.%d", i + 1);
        hosts[3 + i] = bed[i];
    }
    speed_tls_cert_params_t p = {.cn = cn, .hosts = hosts, .n_hosts = 3 + 16, .days = 2};
    speed_tls_pem_t pem = {0};
    char err[512] = "";
    if (speed_tls_cert_issue(ca, &p, &pem, err, sizeof err) != SPEED_OK) die(cn, err);
    write_pair(dir, file, &pem);
    speed_tls_pem_cleanup(&pem);
}

void tt_certs_write(const char *dir) {
    char done[1024];
    snprintf(done, sizeof done, "%s/stranger.key", dir);
    struct stat st;
    if (stat(done, &st) == 0) return;
    mkdir(dir, 0700);
    char err[512] = "";
    speed_tls_cert_params_t cap = {.cn = "speedserve test CA", .days = 2};
    speed_tls_pem_t ca = {0}, other = {0};
    if (speed_tls_ca_create(&cap, &ca, err, sizeof err) != SPEED_OK) die("CA", err);
    cap.cn = "another CA";
    if (speed_tls_ca_create(&cap, &other, err, sizeof err) != SPEED_OK) die("other CA", err);
    write_pair(dir, "ca", &ca);
    speed_tls_pem_t other_cert = {.cert = other.cert};
    write_pair(dir, "other-ca", &other_cert);
    issue_write(dir, &ca, "router", "router");
    issue_write(dir, &ca, "admin", "admin");
    char name[32];
    for (int i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "prefill-%d", i);
        issue_write(dir, &ca, name, name);
        snprintf(name, sizeof name, "decode-%d", i);
        issue_write(dir, &ca, name, name);
    }
    issue_write(dir, &other, "router", "stranger");
    speed_tls_pem_cleanup(&other);
    speed_tls_pem_cleanup(&ca);
}

bool tu_tls_make_cert(const char *cert_path, const char *key_path, char **ca_pem_p) {
    static const char *const hosts[] = {"127.0.0.1", "::1", "localhost"};
    char err[512] = "";
    speed_tls_cert_params_t cap = {.cn = "speedserve test HTTPS CA", .days = 1};
    speed_tls_cert_params_t sp = {.cn = "localhost", .hosts = hosts, .n_hosts = 3, .days = 1};
    speed_tls_pem_t ca = {0}, cert = {0};
    bool ok = speed_tls_ca_create(&cap, &ca, err, sizeof err) == SPEED_OK &&
              speed_tls_cert_issue(&ca, &sp, &cert, err, sizeof err) == SPEED_OK &&
              speed_tls_pem_write(&cert, cert_path, key_path, true, err, sizeof err) == SPEED_OK;
    if (!ok) fprintf(stderr, "test certificate: %s\n", err);
    if (ok && ca_pem_p) {
        *ca_pem_p = strdup(ca.cert);
        ok = *ca_pem_p != NULL;
    }
    speed_tls_pem_cleanup(&cert);
    speed_tls_pem_cleanup(&ca);
    return ok;
}

void tt_creds_load(const char *dir, const char *name, speed_tls_creds_t *creds_p) {
    char ca[1024], crt[1024], key[1024], err[512] = "";
    snprintf(ca, sizeof ca, "%s/ca.crt", dir);
    snprintf(crt, sizeof crt, "%s/%s.crt", dir, name);
    snprintf(key, sizeof key, "%s/%s.key", dir, name);
    if (strcmp(name, "stranger") == 0) { /* not loadable against the cluster CA: read it raw */
        memset(creds_p, 0, sizeof *creds_p);
        size_t n = 0;
        if (speed_file_read(ca, 1 << 20, SPEED_SUBSYS_NET, 0, &creds_p->ca, &n) != SPEED_OK ||
            speed_file_read(crt, 1 << 20, SPEED_SUBSYS_NET, 0, &creds_p->cert, &n) != SPEED_OK ||
            speed_file_read(key, 1 << 20, SPEED_SUBSYS_NET, 0, &creds_p->key, &n) != SPEED_OK)
            die(name, "cannot read");
        snprintf(creds_p->cn, sizeof creds_p->cn, "router");
        return;
    }
    if (speed_tls_creds_load(ca, crt, key, creds_p, err, sizeof err) != SPEED_OK) die(name, err);
}

speed_rpc_tls_t tt_rpc_tls(const speed_tls_creds_t *c) {
    return (speed_rpc_tls_t){.ca = c->ca, .cert = c->cert, .key = c->key};
}
