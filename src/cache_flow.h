/* The response cache on the request path: key computation, lookups and replay (HIT),
 * coalescing identical concurrent misses behind one upstream call (COALESCED), and storing
 * a response while it streams to the client (MISS). The store itself is cache.c. */
#ifndef SL_CACHE_FLOW_H
#define SL_CACHE_FLOW_H

#include "proxy.h"

enum {
  SL_CACHE_NONE = 0, /* the route does not cache */
  SL_CACHE_BYPASS,   /* the client said no-store, the method is not cached, or a policy vetoed */
  SL_CACHE_MISS,
  SL_CACHE_HIT,
  SL_CACHE_COALESCED,
};

typedef enum {
  SL_FLOW_UPSTREAM = 0, /* go upstream (x->cache_result says whether the response is stored) */
  SL_FLOW_DONE,         /* answered from the cache */
  SL_FLOW_WAIT,         /* waits for an identical request in flight (phase SL_X_COALESCED):
                           the caller arms x->timer for the route's coalesce_wait_ms */
  SL_FLOW_ERROR,        /* the route's cache policy failed; err says how */
} sl_cache_flow_t;

/* Before admission, for a route with `cache`. */
sl_cache_flow_t sl_cache_flow_begin(sl_exchange_t *x, const sl_route_conf_t *route,
                                    uint32_t route_idx, char *err, size_t errlen);

/* The upstream's final response head: decides whether the response will be stored, and
 * appends the cache's own header lines to `out`. `head`/`len` are the forwarded header
 * lines; `chunked` says the body is streamed (no Content-Length). */
void sl_cache_flow_head(sl_exchange_t *x, int status, const char *head, size_t len, bool chunked,
                        sl_buf_t *out);
void sl_cache_flow_body(sl_exchange_t *x, const char *p, size_t n);
/* The response was relayed completely: store it and answer the coalesced waiters. */
void sl_cache_flow_complete(sl_exchange_t *x);
/* The attempt failed (a retry may follow): drop what was being stored. */
void sl_cache_flow_attempt_failed(sl_exchange_t *x);
/* The exchange ends, however: a waiter leaves its fill; a leader that did not complete lets
 * its waiters go upstream on their own. */
void sl_cache_flow_end(sl_exchange_t *x);
/* A waiter's bounded wait is over: it goes upstream on its own. */
void sl_cache_flow_wait_expired(sl_exchange_t *x);

#endif
