/* Upstream connections: connecting (with a timeout), keep-alive pooling per endpoint, and idle
 * connection health (an idle connection that receives EOF or data is closed). The protocol
 * spoken on a busy connection belongs to its owner (proxy.c for HTTP), which gets the raw
 * bytes through sl_upconn_ops_t. */
#ifndef SL_UPSTREAM_H
#define SL_UPSTREAM_H

#include "endpoint.h"

#include <uv.h>

typedef struct sl_upconn sl_upconn_t;

typedef struct sl_upconn_ops {
  /* Connect finished: status 0, or a negative libuv error (UV_ETIMEDOUT on timeout). On error
   * the connection is already closing and must not be used. */
  void (*connected)(void *ctx, sl_upconn_t *u, int status);
  /* Bytes arrived (n > 0) or the stream ended (n < 0: UV_EOF or an error). May release or
   * close the connection. */
  void (*read)(void *ctx, sl_upconn_t *u, const char *data, ssize_t n);
  /* Queued writes to the upstream drained (optional). */
  void (*drained)(void *ctx, sl_upconn_t *u);
} sl_upconn_ops_t;

struct sl_upconn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* connect timeout while connecting, idle timeout while pooled */
  uint64_t idle_deadline; /* while pooled: loop time the idle timeout is due */
  bool idle_timer;        /* `timer` runs on_idle_timeout (left armed while in use) */
  uv_connect_t creq;
  sl_endpoint_t *ep;
  sl_list_t link; /* in ep->idle while pooled */
  const sl_upconn_ops_t *ops;
  void *ctx;
  struct sl_tls *tls;    /* https/wss: the TLS engine between the socket and the owner */
  uint8_t pending_close; /* handles still to close */
  bool connected;
  bool pooled;
  bool closing;
};

/* Why the last TLS handshake on this worker failed (valid in the connected callback that
 * reported UV_EPROTO). */
const char *sl_upconn_tls_error(const sl_upconn_t *u);
/* ops->read gets n < 0 at the end: UV_EOF for a clean end (TCP FIN, or TLS close_notify),
 * UV_ECONNABORTED for a TLS connection cut without close_notify, UV_EPROTO for a broken TLS
 * record, other libuv errors as they come. */
/* Takes an idle connection to ep (returns it with connected = true; the caller writes at
 * once) or starts a new connection (connected = false; ops->connected follows). Returns NULL
 * only when the socket could not even be created, with *err set. */
sl_upconn_t *sl_upconn_acquire(sl_endpoint_t *ep, uint32_t connect_timeout_ms,
                               const sl_upconn_ops_t *ops, void *ctx, int *err);
/* Starts a new connection to ep, never a pooled one (ops->connected follows); NULL as above. */
sl_upconn_t *sl_upconn_connect(sl_endpoint_t *ep, uint32_t connect_timeout_ms,
                               const sl_upconn_ops_t *ops, void *ctx, int *err);
/* Returns a connection whose last response was complete to the idle pool (or closes it when the
 * pool is full, the worker drains, or `reusable` is false). The owner must not use it after. */
void sl_upconn_release(sl_upconn_t *u, bool reusable);
/* Closes now; queued writes are cancelled. Idempotent. */
void sl_upconn_close(sl_upconn_t *u);
int sl_upconn_write(sl_upconn_t *u, const char *data, size_t len);
int sl_upconn_writev(sl_upconn_t *u, const uv_buf_t *bufs, unsigned n);
size_t sl_upconn_queued_bytes(const sl_upconn_t *u);
void sl_upconn_read_pause(sl_upconn_t *u, bool pause);

#endif
