/* The admin listener's endpoints (loopback by default): GET /healthz, POST /reload. Requests
 * arrive through the same HTTP/1.1 connection code as client traffic, so limits and
 * malformed-request handling are identical. */
#ifndef SL_ADMIN_H
#define SL_ADMIN_H

#include <stddef.h>

struct sl_conn;

/* Answers the admin request held by conn. */
void sl_admin_handle(struct sl_conn *c);

/* Implemented by the gateway: reload the config and policies. Returns 0 and the new
 * generation id, or -1 with err filled (the running generation stays). */
int sl_gateway_reload(void *gateway, char *err, size_t errlen, unsigned long long *generation);

#endif
