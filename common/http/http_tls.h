/* The HTTP client's TLS layer (GnuTLS): a session over the client's non-blocking socket.
 * Internal to speed_http (client.c); not an API.
 *
 * Reads and writes have the shape of recv/send: > 0 bytes, 0 at a clean close (recv), -1
 * with errno EAGAIN (wait for the direction speed_http_tls_wants_write says, then retry),
 * EINTR, or another errno for a fatal error. */
#ifndef SPEED_HTTP_TLS_H
#define SPEED_HTTP_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "status.h"

typedef struct speed_http_tls speed_http_tls_t;

/* Handshakes over the connected non-blocking socket fd, verifying the server's certificate
 * against ca_pem (NULL: the system's trust store) and `name` (a DNS name or a numeric
 * address, matched against the certificate's subject alternative names). wait(user, want_write)
 * blocks until fd is ready (bounded by the client's timeout) and returns its status.
 * SPEED_OK; SPEED_ERR_PEER_PROTOCOL (handshake or verification failed, logged at debug
 * level); SPEED_ERR_TIMEOUT; SPEED_ERR_NO_MEMORY. */
speed_status_t speed_http_tls_open(int fd, const char *ca_pem, const char *name,
                                   speed_status_t (*wait)(void *user, bool want_write), void *user,
                                   speed_http_tls_t **tls_p);
void speed_http_tls_close(speed_http_tls_t *tls); /* sends close_notify (best effort), frees; NULL ok */

ssize_t speed_http_tls_send(speed_http_tls_t *tls, const void *data, size_t len);
ssize_t speed_http_tls_recv(speed_http_tls_t *tls, void *buf, size_t cap);
/* After EAGAIN: true when the session waits to write, false when it waits to read. */
bool speed_http_tls_wants_write(const speed_http_tls_t *tls);

#endif /* SPEED_HTTP_TLS_H */
