/* common/tls: a CA and the certificates it issues; a certificate verifies against its own CA
 * only; expired, not-yet-valid and garbage input is refused with an error naming the cause;
 * keys are written 0600 and never over an existing file unless asked; loading a process's
 * credentials checks the three files together. */
#include <sys/stat.h>
#include <time.h>

#include "alloc.h"
#include "check.h"
#include "log.h"
#include "test_fs.h"
#include "tls.h"

static speed_tls_pem_t make_ca(const char *cn) {
    speed_tls_pem_t ca = {0};
    speed_tls_cert_params_t p = {.cn = cn, .days = 10};
    char err[256] = "";
    CHECK_INT_EQ(speed_tls_ca_create(&p, &ca, err, sizeof err), SPEED_OK);
    CHECK(ca.cert && strstr(ca.cert, "BEGIN CERTIFICATE"));
    CHECK(ca.key && strstr(ca.key, "BEGIN PRIVATE KEY"));
    return ca;
}

static speed_tls_pem_t issue(const speed_tls_pem_t *ca, const char *cn, int64_t not_before, int64_t days) {
    static const char *const hosts[] = {"127.0.0.1", "localhost", "::1"};
    speed_tls_cert_params_t p = {.cn = cn, .hosts = hosts, .n_hosts = 3, .not_before = not_before, .days = days};
    speed_tls_pem_t pem = {0};
    char err[256] = "";
    CHECK_INT_EQ(speed_tls_cert_issue(ca, &p, &pem, err, sizeof err), SPEED_OK);
    return pem;
}

static void test_issue_and_verify(void) {
    speed_tls_pem_t ca = make_ca("test CA"), other = make_ca("other CA");
    speed_tls_pem_t router = issue(&ca, "router", 0, 5);
    char err[512] = "", cn[64] = "";
    CHECK_INT_EQ(speed_tls_cert_verify(ca.cert, router.cert, 0, err, sizeof err), SPEED_OK);
    CHECK_INT_EQ(speed_tls_cert_cn(router.cert, cn, sizeof cn, err, sizeof err), SPEED_OK);
    CHECK_STR_EQ(cn, "router");
    CHECK_INT_EQ(speed_tls_cert_cn(ca.cert, cn, sizeof cn, err, sizeof err), SPEED_OK);
    CHECK_STR_EQ(cn, "test CA");
    char tiny[4];
    CHECK_INT_EQ(speed_tls_cert_cn(router.cert, tiny, sizeof tiny, err, sizeof err), SPEED_ERR_TOO_LONG);

    /* another CA's certificate, and the CA trusting itself only */
    speed_tls_pem_t stranger = issue(&other, "router", 0, 5);
    err[0] = '\0';
    CHECK_INT_EQ(speed_tls_cert_verify(ca.cert, stranger.cert, 0, err, sizeof err), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(err, "not signed by the cluster CA");
    CHECK_INT_EQ(speed_tls_cert_verify(other.cert, stranger.cert, 0, err, sizeof err), SPEED_OK);

    /* a process certificate is not a CA: what it signs is refused */
    speed_tls_pem_t fake = issue(&router, "decode-0", 0, 5);
    CHECK_INT_EQ(speed_tls_cert_verify(router.cert, fake.cert, 0, err, sizeof err), SPEED_ERR_FORMAT);

    /* validity period: 5 days from now */
    int64_t now = (int64_t)time(NULL);
    CHECK_INT_EQ(speed_tls_cert_verify(ca.cert, router.cert, now + 4 * 86400, err, sizeof err), SPEED_OK);
    err[0] = '\0';
    CHECK_INT_EQ(speed_tls_cert_verify(ca.cert, router.cert, now + 6 * 86400, err, sizeof err), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(err, "expired on");
    speed_tls_pem_t expired = issue(&ca, "decode-0", now - 10 * 86400, 2);
    CHECK_INT_EQ(speed_tls_cert_verify(ca.cert, expired.cert, 0, err, sizeof err), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(err, "expired on");
    speed_tls_pem_t future = issue(&ca, "decode-0", now + 86400, 2);
    CHECK_INT_EQ(speed_tls_cert_verify(ca.cert, future.cert, 0, err, sizeof err), SPEED_ERR_FORMAT);
    CHECK_CONTAINS(err, "not valid before");

    /* garbage */
    CHECK_INT_EQ(speed_tls_cert_verify(ca.cert, "hello", 0, err, sizeof err), SPEED_ERR_PARSE);
    CHECK_CONTAINS(err, "not a PEM certificate");
    CHECK_INT_EQ(speed_tls_cert_verify("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", router.cert, 0,
                                       err, sizeof err),
                 SPEED_ERR_PARSE);
    speed_tls_pem_t bad = {.cert = "junk", .key = ca.key}, out = {0};
    speed_tls_cert_params_t p = {.cn = "x", .days = 1};
    CHECK_INT_EQ(speed_tls_cert_issue(&bad, &p, &out, err, sizeof err), SPEED_ERR_PARSE);
    CHECK(out.cert == NULL);
    p.days = 0;
    CHECK_INT_EQ(speed_tls_cert_issue(&ca, &p, &out, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);
    const char *empty_host[] = {""};
    speed_tls_cert_params_t q = {.cn = "x", .days = 1, .hosts = empty_host, .n_hosts = 1};
    CHECK_INT_EQ(speed_tls_cert_issue(&ca, &q, &out, err, sizeof err), SPEED_ERR_INVALID_ARGUMENT);

    speed_tls_pem_cleanup(&future);
    speed_tls_pem_cleanup(&expired);
    speed_tls_pem_cleanup(&fake);
    speed_tls_pem_cleanup(&stranger);
    speed_tls_pem_cleanup(&router);
    speed_tls_pem_cleanup(&other);
    speed_tls_pem_cleanup(&ca);
    speed_tls_pem_cleanup(&ca); /* twice: a no-op */
}

static void test_files(void) {
    speed_tls_pem_t ca = make_ca("files CA"), other = make_ca("other CA");
    speed_tls_pem_t node = issue(&ca, "decode-1", 0, 5), stranger = issue(&other, "decode-1", 0, 5);
    char err[512] = "";
    CHECK_INT_EQ(speed_tls_pem_write(&ca, tu_path("ca.crt"), NULL, false, err, sizeof err), SPEED_OK);
    CHECK_INT_EQ(speed_tls_pem_write(&node, tu_path("n.crt"), tu_path("n.key"), false, err, sizeof err), SPEED_OK);
    struct stat st;
    CHECK(stat(tu_path("n.key"), &st) == 0 && (st.st_mode & 0777) == 0600);
    CHECK(stat(tu_path("n.crt"), &st) == 0 && (st.st_mode & 0777) == 0644);

    /* no overwrite unless asked; with it, a key made readable by others is 0600 again */
    err[0] = '\0';
    CHECK_INT_EQ(speed_tls_pem_write(&node, tu_path("n.crt"), tu_path("n.key"), false, err, sizeof err), SPEED_ERR_IO);
    CHECK_CONTAINS(err, "exists");
    CHECK(chmod(tu_path("n.key"), 0644) == 0);
    CHECK_INT_EQ(speed_tls_pem_write(&node, tu_path("n.crt"), tu_path("n.key"), true, err, sizeof err), SPEED_OK);
    CHECK(stat(tu_path("n.key"), &st) == 0 && (st.st_mode & 0777) == 0600);

    speed_tls_creds_t c = {0};
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("ca.crt"), tu_path("n.crt"), tu_path("n.key"), &c, err, sizeof err),
                 SPEED_OK);
    CHECK_STR_EQ(c.cn, "decode-1");
    CHECK(c.ca && c.cert && c.key && strstr(c.key, "PRIVATE KEY"));
    speed_tls_creds_cleanup(&c);

    /* another CA's certificate; a key of another certificate; garbage; a missing file */
    CHECK_INT_EQ(speed_tls_pem_write(&stranger, tu_path("s.crt"), tu_path("s.key"), false, err, sizeof err), SPEED_OK);
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("ca.crt"), tu_path("s.crt"), tu_path("s.key"), &c, err, sizeof err),
                 SPEED_ERR_FORMAT);
    CHECK_CONTAINS(err, "s.crt is not signed by the cluster CA");
    CHECK(c.ca == NULL && c.key == NULL);
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("ca.crt"), tu_path("n.crt"), tu_path("s.key"), &c, err, sizeof err),
                 SPEED_ERR_FORMAT);
    CHECK_CONTAINS(err, "is not the key of");
    tu_write_text(tu_path("junk.pem"), "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n");
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("ca.crt"), tu_path("n.crt"), tu_path("junk.pem"), &c, err, sizeof err),
                 SPEED_ERR_PARSE);
    CHECK_CONTAINS(err, "tls.key");
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("junk.pem"), tu_path("n.crt"), tu_path("n.key"), &c, err, sizeof err),
                 SPEED_ERR_PARSE);
    CHECK_CONTAINS(err, "tls.ca");
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("ca.crt"), tu_path("nope.crt"), tu_path("n.key"), &c, err, sizeof err),
                 SPEED_ERR_NOT_FOUND);
    CHECK_CONTAINS(err, "nope.crt");
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("ca.crt"), "", tu_path("n.key"), &c, err, sizeof err),
                 SPEED_ERR_INVALID_ARGUMENT);

    /* an expired certificate in files: refused at load, naming the file */
    speed_tls_pem_t old = issue(&ca, "router", (int64_t)time(NULL) - 30 * 86400, 1);
    CHECK_INT_EQ(speed_tls_pem_write(&old, tu_path("old.crt"), tu_path("old.key"), false, err, sizeof err), SPEED_OK);
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("ca.crt"), tu_path("old.crt"), tu_path("old.key"), &c, err, sizeof err),
                 SPEED_ERR_FORMAT);
    CHECK_CONTAINS(err, "old.crt expired on");

    /* a CA file holding two CAs (rotation): certificates of either load */
    char *both = speed_malloc(strlen(ca.cert) + strlen(other.cert) + 1);
    strcpy(both, other.cert);
    strcat(both, ca.cert);
    tu_write_text(tu_path("both.crt"), both);
    speed_free(both);
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("both.crt"), tu_path("n.crt"), tu_path("n.key"), &c, err, sizeof err),
                 SPEED_OK);
    speed_tls_creds_cleanup(&c);
    CHECK_INT_EQ(speed_tls_creds_load(tu_path("both.crt"), tu_path("s.crt"), tu_path("s.key"), &c, err, sizeof err),
                 SPEED_OK);
    speed_tls_creds_cleanup(&c);

    speed_tls_pem_cleanup(&old);
    speed_tls_pem_cleanup(&stranger);
    speed_tls_pem_cleanup(&node);
    speed_tls_pem_cleanup(&other);
    speed_tls_pem_cleanup(&ca);
}

int main(void) {
    tu_tmp_init("tls");
    speed_log_configure("error");
    test_issue_and_verify();
    test_files();
    return CHECK_DONE();
}
