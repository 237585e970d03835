/* WebSocket relay. The upgrade goes through the normal proxy path (route, admission, balancer,
 * retries, breaker, fallback); only once the upstream answered 101 does the client get its
 * 101, and the connection pair becomes a session: each leg's frame headers are parsed and
 * checked, frames are relayed as they arrive with their bytes untouched, close codes travel
 * both ways, and reads on one leg pause while the other leg's unsent bytes are above a
 * high-water mark (until they drop below a low-water mark). The session holds its endpoint slot (it counts as in
 * flight) and its config generation until it ends, so reloads never cut it. */
#ifndef SL_WS_H
#define SL_WS_H

#include "common.h"
#include "http1.h"

#include <sys/types.h>

struct sl_exchange;
typedef struct sl_ws sl_ws_t;

/* 0 when r is not an upgrade, 1 when it is a valid WebSocket upgrade, -1 when it asks for a
 * WebSocket but is malformed (*why says how). */
int sl_ws_upgrade_kind(const sl_http_req_t *r, const char **why);

/* base64(SHA-1(key + RFC 6455 GUID)) into out[29]. */
void sl_ws_accept_key(const char *key, size_t len, char out[29]);

/* Starts the session after the upstream's 101: writes the client's 101 and relays `early`
 * (bytes that followed the upstream's response head). Returns 0 once the session owns the
 * exchange (which may already have ended), or -1 when nothing was started (the caller fails
 * the exchange). */
int sl_ws_start(struct sl_exchange *x, const char *accept, const char *protocol,
                     size_t protocol_len, const char *early, size_t early_len);

void sl_ws_client_read(sl_ws_t *ws, const char *data, ssize_t n);
void sl_ws_client_drained(sl_ws_t *ws);
/* The gateway is draining: close both legs now (1012 to the client, 1001 upstream). */
void sl_ws_shutdown(sl_ws_t *ws);
/* Bytes the session sent the client (the 101 head and relayed frames), for the access log. */
uint64_t sl_ws_bytes_to_client(const sl_ws_t *ws);
/* Abort: frees the session without further I/O (the connections are being closed). */
void sl_ws_free(sl_ws_t *ws);

#endif
