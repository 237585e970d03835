/* One proxied HTTP exchange: route, admission (pick or queue), upstream attempts with retries,
 * and the response relayed to the client as it arrives. Lives inside its client connection
 * (one at a time per connection: pipelined requests are answered in order). */
#ifndef SL_PROXY_H
#define SL_PROXY_H

#include "buf.h"
#include "cache.h"
#include "forward.h"
#include "worker.h"

#include <llhttp.h>
#include <uv.h>

struct sl_conn;
struct sl_upconn;

#define SL_MAX_TRIED 16

typedef enum {
  SL_X_IDLE = 0,
  SL_X_QUEUED,   /* waiting in the pool's admission queue */
  SL_X_BACKOFF,  /* waiting before a retry */
  SL_X_UPSTREAM, /* an attempt is connecting, sending or receiving */
  SL_X_COALESCED, /* waiting for an identical request in flight (cache) */
} sl_exchange_phase_t;

typedef struct sl_exchange {
  struct sl_conn *conn;
  sl_gen_t *gen;
  sl_pool_t *pool;
  sl_endpoint_t *ep;      /* endpoint of the current attempt */
  uint32_t ep_idx;        /* its index in pool->eps */
  struct sl_upconn *up;
  uv_timer_t *timer;      /* queue wait, backoff, or first-byte/total deadline (the conn's) */
  sl_list_t qlink;        /* in pool->queue while queued */
  llhttp_t rp;            /* upstream response parser */
  sl_buf_t upreq;         /* serialized upstream request, kept for re-sends */
  sl_buf_t out;           /* response bytes assembled for the client during one read */
  sl_buf_t rstr;          /* response header names/values */
  uint32_t *rhdr;         /* name_off, name_len, value_off, value_len per header */
  uint32_t nrhdr, rhdr_cap;
  sl_endpoint_t *tried[SL_MAX_TRIED];
  uint32_t ntried;
  uint64_t start_ms, attempt_ms, first_byte_ms;
  uint64_t start_ns;       /* uv_hrtime() when the exchange started (duration histogram) */
  uint64_t queued_ms;      /* when it entered the admission queue */
  uint64_t bytes_out;      /* response bytes relayed to the client (access log) */
  int32_t queue_wait_ms;   /* -1 until the first admission decision */
  int32_t ttfb_ms;         /* of the last attempt, -1 when none */
  int64_t retry_delay_ms; /* set when a response status asked for a retry */
  uint16_t status;
  uint8_t phase;
  uint8_t attempts;
  uint8_t rfield;         /* 1 in a header name, 2 in a value */
  bool active;
  bool probe;             /* the attempt is a breaker half-open probe */
  bool connecting;        /* the attempt waits for its connection */
  bool reused;            /* the attempt's connection came from the idle pool */
  bool got_bytes;         /* any upstream response byte on this attempt */
  bool head_sent;         /* response head written to the client: no retry, no error page */
  bool out_chunked;       /* re-framing the body as chunked towards the client */
  bool out_close;         /* body delimited by closing the client connection (HTTP/1.0) */
  bool skip_message;      /* ignoring an interim 1xx response */
  bool message_done;
  const char *rerror;     /* why a response callback failed (llhttp only says "User callback error") */
  bool up_keep;           /* upstream connection reusable after this response */
  bool up_paused;         /* upstream reads paused for client backpressure */
  bool stale_retried;     /* already re-sent once after a stale pooled connection */
  bool status_retry;      /* the response status triggered a retry; its body is dropped */
  bool fell_back;         /* moved to the fallback pool already */
  bool retrying;          /* counted in pool->view.retrying: decided to retry (backoff on) */
  bool head_request;
  bool ws_upgrade;        /* the client asked for a WebSocket session */
  bool ws_ready;          /* the upstream answered 101 with a valid accept key */
  bool ws_refused;        /* the upstream answered the upgrade with another status */
  bool ws_bad_accept;     /* ... or with a wrong Sec-WebSocket-Accept */
  struct sl_ws *ws;       /* the session, once both sides switched protocols */
  const sl_route_conf_t *route;
  int32_t pool_idx;        /* the pool the route or its hook chose; -1 before (or none) */
  sl_hedits_t edits;       /* the route hook's changes to the upstream request */
  bool hook_failed;        /* on_response failed: the response is replaced by a 500 */
  /* Cache (cache_flow.c) */
  struct sl_cfill *cfill;  /* the fill this exchange leads, or waits for */
  sl_list_t cwait;         /* in cfill->waiters */
  sl_cache_entry_t *centry; /* the response being stored */
  sl_cache_key_t ckey;
  uint32_t cache_ttl_ms;
  uint32_t cache_max_age_ms; /* the client's Cache-Control max-age, UINT32_MAX if none */
  uint8_t cache_result;
  bool cache_store;        /* the client allows storing the response */
  char request_id[129];
} sl_exchange_t;

/* Starts proxying conn's current request. Always ends with the connection told the response
 * is done (sl_conn_response_done) or the connection closed. */
void sl_proxy_start(struct sl_conn *c);
/* The client went away or the connection is closing: abort whatever phase x is in. */
void sl_proxy_abort(sl_exchange_t *x);
/* Client-side queued writes drained below the low-water mark. */
void sl_proxy_client_drained(sl_exchange_t *x);
/* The WebSocket session ended: releases the endpoint slot (upstream_ok says whether the
 * upstream leg ended cleanly) and closes the client connection gracefully when alive. */
void sl_proxy_ws_end(sl_exchange_t *x, bool client_alive, bool upstream_ok);
/* A slot may be free for a queued exchange. Returns false when x stays queued. */
bool sl_proxy_offer_slot(sl_exchange_t *x);
void sl_proxy_init(sl_exchange_t *x, struct sl_conn *c);
/* Sends the request upstream through the route's pool (admission, balancer, retries). */
void sl_proxy_go_upstream(sl_exchange_t *x);
/* The exchange was answered without the upstream (the response is already written). */
void sl_proxy_finish_local(sl_exchange_t *x, int status, bool keep_alive);
/* A header of the upstream response being parsed; NULL when absent. */
const char *sl_proxy_response_header(const sl_exchange_t *x, const char *name, size_t *len);
/* Releases buffers (the exchange stays usable); its timer belongs to the connection. */
void sl_proxy_free(sl_exchange_t *x);

#endif
