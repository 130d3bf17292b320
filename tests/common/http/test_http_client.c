/* speed_http client on scripted responses: a socketpair's far end plays the server
 * (speed_http_client_adopt), so malformed heads and bodies can be sent byte for byte.
 * Regression inputs found by tests/fuzz/fuzz_http_client live here as cases. */
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc.h"
#include "check.h"
#include "http.h"

/* A client whose peer already sent `resp` and closed its sending side. */
static speed_http_client_t *scripted(const char *resp, size_t len, int *peer_p) {
    int sv[2];
    CHECK_INT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    CHECK_INT_EQ(write(sv[1], resp, len), (ssize_t)len);
    shutdown(sv[1], SHUT_WR);
    speed_http_client_t *c = NULL;
    CHECK_INT_EQ(speed_http_client_adopt(sv[0], "test:1", 2000, &c), SPEED_OK);
    *peer_p = sv[1];
    return c;
}

static void test_plain(void) {
    static const char r[] = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A:  b c \r\n\r\nhello";
    int peer;
    speed_http_client_t *c = scripted(r, sizeof r - 1, &peer);
    const speed_http_response_t *resp = NULL;
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/", NULL, 0, NULL, 0, &resp), SPEED_OK);
    CHECK_INT_EQ(resp->status, 200);
    CHECK_STR_EQ(resp->body, "hello");
    CHECK_STR_EQ(speed_http_response_header(resp, "x-a"), "b c");
    speed_http_client_destroy(c);
    /* the request reached the peer */
    char buf[256] = {0};
    CHECK(read(peer, buf, sizeof buf - 1) > 0);
    CHECK(strncmp(buf, "GET / HTTP/1.1\r\n", 16) == 0);
    close(peer);
}

/* A NUL byte in the head hid the status line's end: the parser stored through a NULL pointer. */
static void test_nul_in_head(void) {
    static const char r[] = "HTTP/\0\0\0 1.0 404 Not Found\r\nConnection: close\r\n\r\nnot here";
    int peer;
    speed_http_client_t *c = scripted(r, sizeof r - 1, &peer);
    const speed_http_response_t *resp = NULL;
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/", NULL, 0, NULL, 0, &resp), SPEED_ERR_PEER_PROTOCOL);
    speed_http_client_destroy(c);
    close(peer);

    static const char r2[] = "HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n";
    c = scripted(r2, sizeof r2 - 1, &peer);
    CHECK_INT_EQ(speed_http_client_request(c, "GET", "/", NULL, 0, NULL, 0, &resp), SPEED_ERR_PEER_PROTOCOL);
    speed_http_client_destroy(c);
    close(peer);
}

static void test_sse_events(void) {
    static const char r[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                            ": comment\r\ndata: a\r\ndata: b\r\n\r\nevent: done\ndata: [DONE]\n\ndata: partial";
    int peer;
    speed_http_client_t *c = scripted(r, sizeof r - 1, &peer);
    const speed_http_response_t *resp = NULL;
    CHECK_INT_EQ(speed_http_client_request_begin(c, "GET", "/", NULL, 0, NULL, 0, &resp), SPEED_OK);
    const speed_http_sse_event_t *ev = NULL;
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev != NULL);
    if (ev) {
        CHECK_STR_EQ(ev->event, "");
        CHECK_STR_EQ(ev->data, "a\nb");
    }
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev != NULL);
    if (ev) {
        CHECK_STR_EQ(ev->event, "done");
        CHECK_STR_EQ(ev->data, "[DONE]");
    }
    CHECK_INT_EQ(speed_http_client_next_event(c, &ev), SPEED_OK);
    CHECK(ev == NULL); /* the partial event at the end is dropped */
    speed_http_client_destroy(c);
    close(peer);
}

static void test_adopt_args(void) {
    speed_http_client_t *c = NULL;
    CHECK_INT_EQ(speed_http_client_adopt(-1, "h", 0, &c), SPEED_ERR_INVALID_ARGUMENT);
    int sv[2];
    CHECK_INT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    CHECK_INT_EQ(speed_http_client_adopt(sv[0], "", 0, &c), SPEED_ERR_INVALID_ARGUMENT);
    /* the refused fd was closed: the peer sees the end */
    char b;
    CHECK_INT_EQ(read(sv[1], &b, 1), 0);
    close(sv[1]);
}

int main(void) {
    int64_t live = speed_alloc_live_count();
    test_plain();
    test_nul_in_head();
    test_sse_events();
    test_adopt_args();
    CHECK_INT_EQ(speed_alloc_live_count(), live);
    return CHECK_DONE();
}
