/* pdserve's bind-address shim, preloaded (LD_PRELOAD) into the processes that run Mooncake.
 *
 * Mooncake's transfer engine and its master's HTTP metadata server bind their listeners to every
 * interface whatever address they are given. This bind() sends a bind to the wildcard address (0.0.0.0
 * or ::) to the address in PDSERVE_BIND_HOST instead (127.0.0.1 when it is unset), read on every call so a
 * process can set it before each listener it opens. PDSERVE_BIND_HOST="*" leaves wildcard binds alone.
 * Binds to a named address are never touched.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn next_bind(void) {
    static bind_fn real;
    if (real == NULL) real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    return real;
}

static const char *wanted_host(void) {
    const char *host = getenv("PDSERVE_BIND_HOST");
    return (host == NULL || host[0] == '\0') ? "127.0.0.1" : host;
}

static int bind_v4(int fd, const struct sockaddr_in *given, const char *host) {
    struct sockaddr_in addr = *given;
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        errno = EADDRNOTAVAIL;  /* an IPv6 or malformed host for an IPv4 socket: refuse, never widen */
        return -1;
    }
    return next_bind()(fd, (const struct sockaddr *)&addr, sizeof addr);
}

static int bind_v6(int fd, const struct sockaddr_in6 *given, const char *host) {
    struct sockaddr_in6 addr = *given;
    struct in_addr v4;
    int v6only = 0;
    socklen_t len = sizeof v6only;
    getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len);
    if (inet_pton(AF_INET6, host, &addr.sin6_addr) == 1) {
        /* an IPv6 host: bind it as given */
    } else if (inet_pton(AF_INET, host, &v4) == 1 && !v6only) {
        /* a dual-stack socket and an IPv4 host: its IPv4-mapped address, so IPv4 peers still connect */
        memset(&addr.sin6_addr, 0, sizeof addr.sin6_addr);
        addr.sin6_addr.s6_addr[10] = 0xff;
        addr.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&addr.sin6_addr.s6_addr[12], &v4, sizeof v4);
    } else if (strncmp(host, "127.", 4) == 0) {
        addr.sin6_addr = in6addr_loopback;
    } else {
        errno = EADDRNOTAVAIL;
        return -1;
    }
    return next_bind()(fd, (const struct sockaddr *)&addr, sizeof addr);
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    const char *host = wanted_host();
    if (addr == NULL || strcmp(host, "*") == 0) return next_bind()(fd, addr, len);
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)addr;
        if (v4->sin_addr.s_addr == htonl(INADDR_ANY)) return bind_v4(fd, v4, host);
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)addr;
        if (IN6_IS_ADDR_UNSPECIFIED(&v6->sin6_addr)) return bind_v6(fd, v6, host);
    }
    return next_bind()(fd, addr, len);
}
