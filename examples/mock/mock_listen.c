/* Listening helpers shared by the mock servers: address resolution and the port file tests
 * wait for. */
#include "mock_listen.h"
#include "mock_util.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Resolves "HOST:PORT" ("[v6]:PORT" too) into *ss. Non-numeric hosts are looked up. */
int mock_resolve_listen(uv_loop_t *loop, const char *spec, struct sockaddr_storage *ss) {
  const char *colon = strrchr(spec, ':');
  uint64_t port;
  if (!colon || mock_parse_u64(colon + 1, strlen(colon + 1), 65535, &port) < 0)
    return UV_EINVAL;
  char host[256];
  size_t hlen = (size_t)(colon - spec);
  if (hlen >= 2 && spec[0] == '[' && spec[hlen - 1] == ']') {
    spec++;
    hlen -= 2;
  }
  if (hlen == 0 || hlen >= sizeof host)
    return UV_EINVAL;
  memcpy(host, spec, hlen);
  host[hlen] = '\0';
  memset(ss, 0, sizeof *ss);
  if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0 ||
      uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0)
    return 0;
  uv_getaddrinfo_t req;
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
  int rc = uv_getaddrinfo(loop, &req, NULL, host, NULL, &hints); /* NULL cb: synchronous */
  if (rc < 0)
    return rc;
  memcpy(ss, req.addrinfo->ai_addr, req.addrinfo->ai_addrlen);
  uv_freeaddrinfo(req.addrinfo);
  if (ss->ss_family == AF_INET)
    ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
  else
    ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
  return 0;
}

/* Writes "port\n" to path via a temporary file and rename, so readers never see half. */
int mock_write_port_file(const char *path, int port) {
  char tmp[4096];
  if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
    return -1;
  FILE *f = fopen(tmp, "w");
  if (!f)
    return -1;
  int ok = fprintf(f, "%d\n", port) > 0;
  ok = (fclose(f) == 0) && ok;
  if (!ok || rename(tmp, path) < 0) {
    unlink(tmp);
    return -1;
  }
  return 0;
}
