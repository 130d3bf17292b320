/* speed_router_discovery: getaddrinfo → gRPC targets (see discovery.h). */
#include "discovery.h"

#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

speed_status_t speed_router_discovery_resolve(const char *name, int64_t port, char (*addrs)[SPEED_ROUTER_ADDRESS_MAX],
                                              size_t n_max, size_t *n_p, char *why, size_t why_size) {
    if (n_p) *n_p = 0;
    if (why_size) why[0] = '\0';
    if (!name || !name[0] || !addrs || !n_p || port < 1 || port > 65535) return SPEED_ERR_INVALID_ARGUMENT;
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM; /* one entry per address, not one per socket type */
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(name, NULL, &hints, &res);
    if (rc != 0) {
        if (why_size) snprintf(why, why_size, "%s", gai_strerror(rc));
        /* NONAME / NODATA: the name has no address; the rest: the resolver could not answer */
        return rc == EAI_NONAME
#ifdef EAI_NODATA
                       || rc == EAI_NODATA
#endif
                   ? SPEED_ERR_NOT_FOUND
                   : SPEED_ERR_PEER_UNREACHABLE;
    }
    size_t n = 0;
    bool more = false;
    for (const struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
        char host[NI_MAXHOST];
        if (getnameinfo(ai->ai_addr, ai->ai_addrlen, host, sizeof host, NULL, 0, NI_NUMERICHOST) != 0) continue;
        char target[SPEED_ROUTER_ADDRESS_MAX];
        bool v6 = ai->ai_family == AF_INET6;
        int len = snprintf(target, sizeof target, "%s%s%s:%lld", v6 ? "[" : "", host, v6 ? "]" : "", (long long)port);
        if (len < 0 || (size_t)len >= sizeof target) continue; /* a scoped v6 address too long to dial */
        bool dup = false;
        for (size_t i = 0; i < n && !dup; i++) dup = strcmp(addrs[i], target) == 0;
        if (dup) continue;
        if (n == n_max) {
            more = true;
            break;
        }
        memcpy(addrs[n++], target, (size_t)len + 1);
    }
    freeaddrinfo(res);
    *n_p = n;
    if (n == 0) {
        if (why_size) snprintf(why, why_size, "no IPv4/IPv6 address");
        return SPEED_ERR_NOT_FOUND;
    }
    return more ? SPEED_ERR_CAPACITY : SPEED_OK;
}
