/* speed_rpc with mutual TLS: a call with a certificate of the cluster CA succeeds and the
 * handler sees the peer's name; a client without a certificate, with one of another CA, or in
 * plaintext is refused at the handshake (the handler never runs); a server whose certificate
 * is of another CA is refused by the client; allow rules end other peers' calls with
 * PERMISSION_DENIED before the handler; a plaintext server has no identity and applies no rule. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "log.h"
#include "rpc.h"
#include "test_fs.h"
#include "tls_test_util.h"

#define WHO   "/t.Tls/Who"
#define ADMIN "/t.Tls/Admin"

static atomic_int n_handled;

/* Replies with the caller's identity. */
static void on_who(void *user, speed_rpc_call_t *call, const uint8_t *req, size_t len) {
    (void)user, (void)req, (void)len;
    atomic_fetch_add(&n_handled, 1);
    const char *peer = speed_rpc_call_peer(call);
    speed_rpc_call_reply(call, peer, strlen(peer));
}

static speed_rpc_server_t *server_start(const speed_rpc_tls_t *tls, char *target, size_t size) {
    speed_rpc_server_params_t p = speed_rpc_server_default_params();
    p.tls = tls;
    speed_rpc_server_t *srv = NULL;
    CHECK_INT_EQ(speed_rpc_server_create(&p, &srv), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_add_method(srv, WHO, SPEED_RPC_UNARY, on_who, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_add_method(srv, ADMIN, SPEED_RPC_UNARY, on_who, NULL), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_allow(srv, ADMIN, "admin, decode"), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_allow(srv, "/t.Tls/Nope", "admin"), SPEED_ERR_NOT_FOUND);
    CHECK_INT_EQ(speed_rpc_server_allow(srv, ADMIN, " , "), SPEED_ERR_INVALID_ARGUMENT);
    CHECK_INT_EQ(speed_rpc_server_start(srv), SPEED_OK);
    CHECK_INT_EQ(speed_rpc_server_allow(srv, WHO, "admin"), SPEED_ERR_INVALID_ARGUMENT); /* started */
    snprintf(target, size, "127.0.0.1:%d", speed_rpc_server_port(srv));
    return srv;
}

/* One unary call on a fresh channel; returns the code, the reply or message into out. */
static speed_rpc_code_t call_as(const char *target, const speed_rpc_tls_t *tls, const char *server_name,
                                const char *method, char *out, size_t size) {
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.tls = tls;
    cp.tls_server_name = server_name;
    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(target, &cp, &ch), SPEED_OK);
    speed_rpc_reply_t r;
    speed_rpc_unary(ch, method, "x", 1, 5000, &r);
    speed_rpc_code_t code = r.code;
    if (code == SPEED_RPC_OK)
        snprintf(out, size, "%.*s", (int)r.len, r.data ? (const char *)r.data : "");
    else
        snprintf(out, size, "%s", r.message ? r.message : "");
    speed_rpc_reply_cleanup(&r);
    speed_rpc_channel_destroy(ch);
    return code;
}

static void test_peer_matches(void) {
    CHECK(speed_rpc_peer_matches("router", "router"));
    CHECK(speed_rpc_peer_matches("router,admin", "admin"));
    CHECK(speed_rpc_peer_matches("router, prefill", "prefill-0"));
    CHECK(speed_rpc_peer_matches("prefill", "prefill-12"));
    CHECK(!speed_rpc_peer_matches("prefill", "prefill-"));
    CHECK(!speed_rpc_peer_matches("prefill", "prefill-0x"));
    CHECK(!speed_rpc_peer_matches("prefill", "prefillx"));
    CHECK(!speed_rpc_peer_matches("router", "route"));
    CHECK(!speed_rpc_peer_matches("router", "routers"));
    CHECK(!speed_rpc_peer_matches("router", ""));
    CHECK(!speed_rpc_peer_matches("", "router"));
    CHECK(!speed_rpc_peer_matches("decode-0", "decode-1"));
}

static void test_mtls(const char *dir) {
    speed_tls_creds_t node, router, admin, decode, stranger;
    tt_creds_load(dir, "prefill-0", &node);
    tt_creds_load(dir, "router", &router);
    tt_creds_load(dir, "admin", &admin);
    tt_creds_load(dir, "decode-1", &decode);
    tt_creds_load(dir, "stranger", &stranger);
    speed_rpc_tls_t t_node = tt_rpc_tls(&node), t_router = tt_rpc_tls(&router), t_admin = tt_rpc_tls(&admin),
                    t_decode = tt_rpc_tls(&decode);
    char target[64], out[512];
    speed_rpc_server_t *srv = server_start(&t_node, target, sizeof target);
    CHECK(speed_rpc_server_is_tls(srv));

    /* the cluster's router: accepted, and the handler sees its name */
    atomic_store(&n_handled, 0);
    CHECK_INT_EQ(call_as(target, &t_router, NULL, WHO, out, sizeof out), SPEED_RPC_OK);
    CHECK_STR_EQ(out, "router");
    CHECK_INT_EQ(call_as(target, &t_decode, NULL, WHO, out, sizeof out), SPEED_RPC_OK);
    CHECK_STR_EQ(out, "decode-1");
    CHECK_INT_EQ(atomic_load(&n_handled), 2);

    /* a rule: admin and decode replicas only */
    CHECK_INT_EQ(call_as(target, &t_router, NULL, ADMIN, out, sizeof out), SPEED_RPC_PERMISSION_DENIED);
    CHECK_CONTAINS(out, "peer 'router' may not call /t.Tls/Admin");
    CHECK_INT_EQ(atomic_load(&n_handled), 2);
    CHECK_INT_EQ(call_as(target, &t_admin, NULL, ADMIN, out, sizeof out), SPEED_RPC_OK);
    CHECK_STR_EQ(out, "admin");
    CHECK_INT_EQ(call_as(target, &t_decode, NULL, ADMIN, out, sizeof out), SPEED_RPC_OK);
    CHECK_INT_EQ(atomic_load(&n_handled), 4);

    /* strangers: no certificate, another CA's certificate, plaintext. The handler never runs. */
    speed_rpc_tls_t no_cert = {.ca = router.ca};
    CHECK_INT_EQ(call_as(target, &no_cert, NULL, WHO, out, sizeof out), SPEED_RPC_UNAVAILABLE);
    speed_rpc_tls_t t_stranger = {.ca = router.ca, .cert = stranger.cert, .key = stranger.key};
    CHECK_INT_EQ(call_as(target, &t_stranger, NULL, WHO, out, sizeof out), SPEED_RPC_UNAVAILABLE);
    CHECK_INT_EQ(call_as(target, NULL, NULL, WHO, out, sizeof out), SPEED_RPC_UNAVAILABLE);
    CHECK_INT_EQ(atomic_load(&n_handled), 4);

    /* and the server keeps serving the cluster afterwards */
    CHECK_INT_EQ(call_as(target, &t_router, NULL, WHO, out, sizeof out), SPEED_RPC_OK);
    CHECK_INT_EQ(atomic_load(&n_handled), 5);

    /* the client checks the server too: a client trusting another CA refuses this server */
    speed_rpc_tls_t wrong_ca = {.cert = router.cert, .key = router.key};
    char *other_ca = tu_read(tu_path("certs/other-ca.crt"), NULL);
    wrong_ca.ca = other_ca;
    CHECK_INT_EQ(call_as(target, &wrong_ca, NULL, WHO, out, sizeof out), SPEED_RPC_UNAVAILABLE);
    free(other_ca);
    /* the server's certificate names 127.0.0.1, not node.example: the name is checked */
    CHECK_INT_EQ(call_as(target, &t_router, "node.example", WHO, out, sizeof out), SPEED_RPC_UNAVAILABLE);
    CHECK_INT_EQ(call_as(target, &t_router, "localhost", WHO, out, sizeof out), SPEED_RPC_OK);
    CHECK_INT_EQ(atomic_load(&n_handled), 6);
    speed_rpc_server_destroy(srv);

    /* bad parameters */
    speed_rpc_server_params_t p = speed_rpc_server_default_params();
    speed_rpc_tls_t half = {.ca = node.ca, .cert = node.cert};
    p.tls = &half;
    CHECK_INT_EQ(speed_rpc_server_create(&p, &srv), SPEED_ERR_INVALID_ARGUMENT);
    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params();
    cp.tls = &half;
    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create("127.0.0.1:1", &cp, &ch), SPEED_ERR_INVALID_ARGUMENT);

    /* a plaintext server: no identity, no rule applied (the insecure mode) */
    srv = server_start(NULL, target, sizeof target);
    CHECK(!speed_rpc_server_is_tls(srv));
    CHECK_INT_EQ(call_as(target, NULL, NULL, ADMIN, out, sizeof out), SPEED_RPC_OK);
    CHECK_STR_EQ(out, "");
    /* a TLS client to a plaintext server fails: TLS never silently falls back */
    CHECK_INT_EQ(call_as(target, &t_router, NULL, WHO, out, sizeof out), SPEED_RPC_UNAVAILABLE);
    speed_rpc_server_destroy(srv);

    speed_tls_creds_cleanup(&stranger);
    speed_tls_creds_cleanup(&decode);
    speed_tls_creds_cleanup(&admin);
    speed_tls_creds_cleanup(&router);
    speed_tls_creds_cleanup(&node);
}


/* ---- a slow link: connections take a while to set up ------------------------------------- */

/* A TCP relay on loopback that holds each new connection for delay_ms before it relays a byte
 * (a distant or loaded host, where connect + handshake takes longer than a call's deadline), and
 * counts the connections it accepted. */
typedef struct {
    int listen_fd, port, target_port, delay_ms;
    atomic_int n_accepted;
    atomic_bool stop;
    pthread_t thread;
} slow_relay_t;

static void relay_pump(int a, int b, atomic_bool *stop) {
    char buf[16384];
    struct pollfd fds[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
    while (!atomic_load(stop)) {
        if (poll(fds, 2, 50) <= 0) continue;
        for (int i = 0; i < 2; i++) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(fds[i].fd, buf, sizeof buf);
            if (n <= 0 || write(fds[1 - i].fd, buf, (size_t)n) != n) return;
        }
    }
}

typedef struct {
    slow_relay_t *relay;
    int fd;
} relay_conn_t;

static void *relay_conn_main(void *arg) {
    relay_conn_t *c = arg;
    int up = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->relay->target_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    usleep((useconds_t)c->relay->delay_ms * 1000); /* the slow link itself */
    if (connect(up, (struct sockaddr *)&a, sizeof a) == 0) relay_pump(c->fd, up, &c->relay->stop);
    close(up);
    close(c->fd);
    free(c);
    return NULL;
}

static void *relay_main(void *arg) {
    slow_relay_t *r = arg;
    while (!atomic_load(&r->stop)) {
        struct pollfd pf = {.fd = r->listen_fd, .events = POLLIN};
        if (poll(&pf, 1, 50) <= 0) continue;
        int fd = accept(r->listen_fd, NULL, NULL);
        if (fd < 0) continue;
        atomic_fetch_add(&r->n_accepted, 1);
        relay_conn_t *c = malloc(sizeof *c);
        c->relay = r;
        c->fd = fd;
        pthread_t t;
        pthread_create(&t, NULL, relay_conn_main, c);
        pthread_detach(t);
    }
    return NULL;
}

static void relay_start(slow_relay_t *r, int target_port, int delay_ms) {
    memset(r, 0, sizeof *r);
    r->target_port = target_port;
    r->delay_ms = delay_ms;
    r->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    CHECK(bind(r->listen_fd, (struct sockaddr *)&a, sizeof a) == 0);
    CHECK(listen(r->listen_fd, 16) == 0);
    CHECK(getsockname(r->listen_fd, (struct sockaddr *)&a, &len) == 0);
    r->port = ntohs(a.sin_port);
    pthread_create(&r->thread, NULL, relay_main, r);
}

static void relay_stop(slow_relay_t *r) {
    atomic_store(&r->stop, true);
    pthread_join(r->thread, NULL);
    close(r->listen_fd);
    usleep(200 * 1000); /* the detached relays see `stop` within one 50 ms poll and exit */
}

/* A channel whose connection takes 400 ms to come up (far longer than gRPC's 100 ms first
 * reconnect backoff, which the channel sets so a restarted node is found quickly) still connects
 * on its first attempt: the connect deadline is not the backoff. Calls that give up before the
 * connection is ready fail with a deadline, and the first call after it is ready succeeds.
 * (The router's health checks give up after 200 ms; under load a TLS handshake took longer
 * than 100 ms, every attempt was cut short, and the nodes stayed "down".) */
static void test_slow_link(const char *dir) {
    speed_tls_creds_t node, router;
    tt_creds_load(dir, "prefill-0", &node);
    tt_creds_load(dir, "router", &router);
    speed_rpc_tls_t t_node = tt_rpc_tls(&node), t_router = tt_rpc_tls(&router);
    char target[64];
    speed_rpc_server_t *srv = server_start(&t_node, target, sizeof target);
    slow_relay_t relay;
    relay_start(&relay, speed_rpc_server_port(srv), 400);
    char via[64];
    snprintf(via, sizeof via, "127.0.0.1:%d", relay.port);

    speed_rpc_channel_params_t cp = speed_rpc_channel_default_params(); /* reconnect backoff on */
    cp.tls = &t_router;
    speed_rpc_channel_t *ch = NULL;
    CHECK_INT_EQ(speed_rpc_channel_create(via, &cp, &ch), SPEED_OK);
    int ok = 0;
    for (int i = 0; i < 40 && !ok; i++) { /* a health check every 100 ms, 200 ms each */
        speed_rpc_reply_t r;
        speed_rpc_unary(ch, WHO, "x", 1, 200, &r);
        ok = r.code == SPEED_RPC_OK;
        speed_rpc_reply_cleanup(&r);
        if (!ok) usleep(100 * 1000);
    }
    CHECK_MSG(ok, "no call succeeded over a link that takes 400 ms to connect");
    CHECK_MSG(atomic_load(&relay.n_accepted) == 1, "%d connection attempts, want 1 (attempts cut short)",
              atomic_load(&relay.n_accepted));
    speed_rpc_channel_destroy(ch);
    relay_stop(&relay);
    speed_rpc_server_destroy(srv);
    speed_tls_creds_cleanup(&router);
    speed_tls_creds_cleanup(&node);
}

int main(void) {
    tu_tmp_init("rpc-tls");
    speed_log_configure("error");
    tt_certs_write(tu_path("certs"));
    test_peer_matches();
    test_mtls(tu_path("certs"));
    test_slow_link(tu_path("certs"));
    return CHECK_DONE();
}
