/* Fuzzes the HTTP/1.1 client's response parsing (common/http/client.c): status line, headers,
 * Content-Length / chunked / read-until-close bodies and the server-sent-event framing that
 * speedctl and the tests read the router's streams with. The input is what a server sends:
 * it is written into one end of a socketpair whose other end the client adopts
 * (speed_http_client_adopt), then the writing side is shut down so every read ends.
 * (The server side's request parsing is libmicrohttpd's; what the router does with header
 * values is fuzzed by fuzz_openai_request and the auth check below.)
 *
 * Input: byte 0 picks how the response is read — 0: whole (speed_http_client_request),
 * 1: SSE events (request_begin + next_event), 2: raw body reads, 3: two requests on one
 * connection (keep-alive); bit 2 sends HEAD. The rest is the response bytes. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_util.h"
#include "http.h"

#define MAX_INPUT (64 * 1024) /* well inside a socketpair's buffer: the writer never blocks */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_init();
    return 0;
}

static void check_response(const speed_http_response_t *r, size_t size) {
    FZ_ASSERT(r->status >= 200 && r->status <= 599);
    for (size_t i = 0; i < r->n_headers; i++) {
        FZ_ASSERT(r->headers[i].name && r->headers[i].name[0] && r->headers[i].value);
        FZ_ASSERT(strlen(r->headers[i].name) + strlen(r->headers[i].value) < size);
        FZ_ASSERT(!strchr(r->headers[i].name, ':'));
    }
    if (r->body) {
        FZ_ASSERT(r->body_len <= size); /* decoding (chunked) only removes bytes */
        FZ_ASSERT(r->body[r->body_len] == '\0');
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > MAX_INPUT) return 0;
    int mode = data[0] & 3;
    const char *method = (data[0] & 4) ? "HEAD" : "GET";
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
        perror("socketpair");
        return 0;
    }
    for (size_t off = 1; off < size;) {
        ssize_t n = write(sv[1], data + off, size - off);
        if (n <= 0) break;
        off += (size_t)n;
    }
    shutdown(sv[1], SHUT_WR); /* the client's request still fits in sv[1]'s receive buffer */

    speed_http_client_t *c = NULL;
    if (speed_http_client_adopt(sv[0], "fuzz:1", 1000, &c) != SPEED_OK) {
        close(sv[1]);
        return 0;
    }
    const speed_http_response_t *resp = NULL;
    speed_http_header_t hdr = {"Accept", "text/event-stream"};
    switch (mode) {
    case 0:
    case 3:
        for (int round = 0; round < (mode == 3 ? 2 : 1); round++) {
            if (speed_http_client_request(c, method, "/v1/x", &hdr, 1, NULL, 0, &resp) != SPEED_OK) break;
            check_response(resp, size);
            (void)speed_http_response_header(resp, "Content-Type");
        }
        break;
    case 1:
        if (speed_http_client_request_begin(c, method, "/v1/x", &hdr, 1, "{}", 2, &resp) == SPEED_OK) {
            check_response(resp, size);
            const speed_http_sse_event_t *ev = NULL;
            for (int i = 0; i < 100000; i++) {
                if (speed_http_client_next_event(c, &ev) != SPEED_OK || !ev) break;
                FZ_ASSERT(ev->event && ev->data);
                FZ_ASSERT(ev->data_len <= size && ev->data[ev->data_len] == '\0');
            }
        }
        break;
    case 2:
        if (speed_http_client_request_begin(c, method, "/v1/x", NULL, 0, NULL, 0, &resp) == SPEED_OK) {
            check_response(resp, size);
            char buf[257];
            size_t total = 0, n = 0;
            for (;;) {
                if (speed_http_client_read(c, buf, (size_t)(data[0] >> 3) + 1, &n) != SPEED_OK || n == 0) break;
                FZ_ASSERT(n <= (size_t)(data[0] >> 3) + 1);
                total += n;
                FZ_ASSERT(total <= size);
            }
        }
        break;
    }
    speed_http_client_destroy(c);
    close(sv[1]);
    return 0;
}
