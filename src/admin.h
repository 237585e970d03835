/* The admin listener (loopback by default): health, readiness, metrics, status, reload and cache
 * purges (docs/config.md#admin-api). Requests
 * arrive through the same HTTP/1.1 connection code as client traffic, so limits and
 * malformed-request handling are identical. */
#ifndef SL_ADMIN_H
#define SL_ADMIN_H

#include <stddef.h>
#include <stdint.h>

struct sl_conn;

/* Answers the admin request held by conn. */
void sl_admin_handle(struct sl_conn *c);

/* Implemented by the gateway: reload the config and policies. Returns 0 and the new
 * generation id, or -1 with err filled (the running generation stays). */
int sl_gateway_reload(void *gateway, char *err, size_t errlen, unsigned long long *generation);
/* Every worker's metrics registry, the admin's own worker first. */
struct sl_metrics;
size_t sl_gateway_registries(void *gateway, struct sl_metrics **out, size_t cap);
/* Purges the caches of the worker threads (the admin's own worker is purged by the caller). */
void sl_gateway_purge_others(void *gateway, const void *key, const char *tag);
uint32_t sl_gateway_workers(void *gateway);

#endif
