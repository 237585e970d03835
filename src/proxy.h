/* One proxied HTTP exchange: route, balancer pick, upstream request, response relayed to the
 * client as it arrives. Lives inside its client connection (one at a time per connection:
 * pipelined requests are answered in order). */
#ifndef SL_PROXY_H
#define SL_PROXY_H

#include "buf.h"
#include "worker.h"

#include <llhttp.h>
#include <uv.h>

struct sl_conn;
struct sl_upconn;

typedef struct sl_exchange {
  struct sl_conn *conn;
  sl_gen_t *gen;
  sl_pool_t *pool;
  sl_endpoint_t *ep;
  struct sl_upconn *up;
  uv_timer_t timer; /* first-byte and total deadlines */
  llhttp_t rp;      /* upstream response parser */
  sl_buf_t upreq;   /* serialized upstream request, kept for a re-send on a fresh connection */
  sl_buf_t out;     /* response bytes assembled for the client during one upstream read */
  sl_buf_t rstr;    /* response header names/values */
  uint32_t *rhdr;   /* offsets: name_off, name_len, value_off, value_len per header */
  uint32_t nrhdr, rhdr_cap;
  uint8_t rfield;   /* 1 in a header name, 2 in a value */
  uint64_t start_ms, attempt_ms, deadline_ms;
  uint16_t status;
  uint8_t attempts;
  bool active;
  bool reused;          /* the current upstream connection came from the idle pool */
  bool got_bytes;       /* any upstream response byte on this attempt */
  bool head_sent;       /* response head written to the client: no retry, no error page */
  bool out_chunked;     /* re-framing the body as chunked towards the client */
  bool skip_message;    /* ignoring an interim 1xx response */
  bool message_done;
  bool up_paused;       /* upstream reads paused for client backpressure */
  bool head_request;
  bool out_close;       /* body delimited by closing the client connection (HTTP/1.0) */
  bool up_keep;         /* upstream connection reusable after this response */
  bool stale_retried;   /* already re-sent once after a stale pooled connection */
  char request_id[129];
} sl_exchange_t;

/* Starts proxying conn's current request. Always ends with the connection told the response
 * is done (sl_conn_response_done) or the connection closed. */
void sl_proxy_start(struct sl_conn *c);
/* The client went away or the connection is closing: abort the upstream side. Idempotent. */
void sl_proxy_abort(sl_exchange_t *x);
/* Client-side queued writes drained below the low-water mark. */
void sl_proxy_client_drained(sl_exchange_t *x);
void sl_proxy_init(sl_exchange_t *x, struct sl_conn *c);
/* Releases buffers; the timer handle is closed by the connection. */
void sl_proxy_free(sl_exchange_t *x);

#endif
