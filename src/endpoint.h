/* Upstream endpoints: one object per endpoint URL per worker, shared by every pool and config
 * generation that names the URL, so counters, latency and (later) breaker state survive
 * reloads. Each endpoint owns its pool of idle keep-alive upstream connections. */
#ifndef SL_ENDPOINT_H
#define SL_ENDPOINT_H

#include "common.h"

#include <netinet/in.h>
#include <sys/socket.h>

struct sl_worker;

/* The part of an endpoint that policies read through LuaJIT's FFI. The layout is mirrored in
 * lua/sluice/ffi.lua; the runtime checks ffi.sizeof against sizeof at start-up. Policies get
 * a pointer to this struct (the first member of sl_endpoint_t) and must not write it. */
typedef struct sl_ep_view {
  double ewma_ms;         /* smoothed upstream time to first byte, ms (0 = no sample yet) */
  double reported_load;   /* load figure the upstream reported (x-load header), -1 = none */
  int64_t successes;      /* attempts that got a complete response */
  int64_t fails;          /* attempts that failed: connect error, reset, timeout */
  int32_t inflight;       /* requests and sessions being served now */
  int32_t max_inflight;   /* 0 = unlimited */
  int32_t queued;         /* requests assigned here still waiting for a connection */
  int32_t weight;
  int32_t state;          /* breaker: 0 closed, 1 open, 2 half-open */
  int32_t consecutive_fails;
  int32_t ejections;      /* times the breaker opened since it last closed */
  bool available;         /* may take a request now: breaker allows and a slot is free */
  const char *url;        /* the endpoint URL (ffi.string(ep.url) to get a Lua string) */
} sl_ep_view_t;

/* Pool-wide figures policies read through FFI (pool.stats). Mirrored in lua/sluice/ffi.lua. */
typedef struct sl_pool_view {
  int32_t active;   /* requests of this pool in progress (queued, waiting or upstream) */
  int32_t queued;   /* requests waiting in the pool's admission queue */
  int32_t retrying; /* requests of this pool past their first attempt */
  int32_t ejected;  /* endpoints whose breaker is open */
} sl_pool_view_t;

enum { SL_EP_CLOSED = 0, SL_EP_OPEN = 1, SL_EP_HALF_OPEN = 2 };

typedef struct sl_endpoint {
  sl_ep_view_t view; /* must stay first */
  char *url;
  char *host;        /* as written in the URL, without brackets */
  char *authority;   /* host[:port] for the Host header */
  char *path_prefix; /* "" or "/base" prepended to request paths */
  uint16_t port;
  bool tls, websocket;
  struct sockaddr_storage addr;
  socklen_t addrlen;

  sl_list_t idle;      /* idle sl_upconn_t, most recently used first */
  uint32_t nidle;
  uint32_t max_idle;
  uint32_t idle_timeout_ms;
  uint32_t nconns;     /* all upstream connections, idle or busy */

  struct ssl_ctx_st *tls_ctx;         /* https/wss: client context (pools' tls settings) */
  struct ssl_session_st *tls_session; /* the last session the upstream issued, for resumption */
  char *tls_ca;                       /* the settings tls_ctx was built with */
  bool tls_verify;

  uint64_t open_until_ms; /* breaker: when an open endpoint turns half-open */
  uint32_t probes;        /* breaker: attempts in flight while half-open */
  uint32_t probes_max;
  uint32_t connect_timeout_ms; /* of the last connection started (bounds a TLS handshake) */

  sl_list_t link; /* in worker->endpoints */
  uint32_t refs;  /* pools (of any generation) that reference it */
  struct sl_worker *worker;
} sl_endpoint_t;

/* Returns the worker's endpoint for `url` (creating it, unresolved, if needed) with a new
 * reference. Fills *err and returns NULL when the address cannot be resolved. */
sl_endpoint_t *sl_endpoint_get(struct sl_worker *w, const char *url, const char *host,
                               uint16_t port, const char *path, bool tls, bool websocket,
                               char *err, size_t errlen);
void sl_endpoint_unref(sl_endpoint_t *ep);
bool sl_endpoint_has_slot(const sl_endpoint_t *ep);
bool sl_endpoint_breaker_allows(const sl_endpoint_t *ep);
/* Recomputes view.available after inflight or breaker state changed. */
void sl_endpoint_update(sl_endpoint_t *ep);
void sl_endpoint_record_ttfb(sl_endpoint_t *ep, double ms);
/* Closes idle connections (shutdown, endpoint removal). */
void sl_endpoint_close_idle(sl_endpoint_t *ep);
/* Bookkeeping for upstream connections, which may outlive the endpoint's last reference. */
void sl_endpoint_conn_gone(sl_endpoint_t *ep);
void sl_endpoint_free(sl_endpoint_t *ep);

#endif
