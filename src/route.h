/* Request routing: longest path-prefix match on segment boundaries, optionally restricted to
 * a host (exact, or "*.example.com" for subdomains). Among equally long prefixes a route with
 * a host beats one without; then the first in the config wins. */
#ifndef SL_ROUTE_H
#define SL_ROUTE_H

#include "config.h"
#include "http1.h"

/* Returns the matching route, or NULL. */
const sl_route_conf_t *sl_route_match(const sl_config_t *cfg, const char *path, size_t path_len,
                                      const char *host, size_t host_len);
/* True when `prefix` matches `path` at a segment boundary: "/v1" matches "/v1" and "/v1/x"
 * but not "/v10". A prefix ending in "/" matches anything below it. */
bool sl_route_prefix_matches(const char *prefix, const char *path, size_t path_len);
bool sl_route_host_matches(const char *pattern, const char *host, size_t host_len);

#endif
