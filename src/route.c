#include "route.h"

bool sl_route_prefix_matches(const char *prefix, const char *path, size_t path_len) {
  size_t n = strlen(prefix);
  if (n > path_len || memcmp(prefix, path, n) != 0) return false;
  return n == path_len || prefix[n - 1] == '/' || path[n] == '/';
}

/* Host header value without its port, compared case-insensitively. */
bool sl_route_host_matches(const char *pattern, const char *host, size_t host_len) {
  if (host_len && host[0] == '[') {
    const char *end = memchr(host, ']', host_len);
    if (end) host_len = (size_t)(end - host) + 1;
  } else {
    const char *colon = memchr(host, ':', host_len);
    if (colon) host_len = (size_t)(colon - host);
  }
  if (pattern[0] == '*' && pattern[1] == '.') {
    size_t suffix = strlen(pattern + 1); /* ".example.com" */
    return host_len > suffix &&
           sl_strieq(host + host_len - suffix, suffix, pattern + 1);
  }
  return sl_strieq(host, host_len, pattern);
}

const sl_route_conf_t *sl_route_match(const sl_config_t *cfg, const char *path, size_t path_len,
                                      const char *host, size_t host_len) {
  const sl_route_conf_t *best = NULL;
  size_t best_len = 0;
  bool best_host = false;
  for (uint32_t i = 0; i < cfg->nroutes; i++) {
    const sl_route_conf_t *r = &cfg->routes[i];
    if (r->host && (!host || !sl_route_host_matches(r->host, host, host_len))) continue;
    if (!sl_route_prefix_matches(r->path, path, path_len)) continue;
    size_t len = strlen(r->path);
    bool with_host = r->host != NULL;
    if (!best || len > best_len || (len == best_len && with_host && !best_host)) {
      best = r;
      best_len = len;
      best_host = with_host;
    }
  }
  return best;
}
