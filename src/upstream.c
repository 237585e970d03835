#include "upstream.h"

#include "io.h"
#include "log.h"
#include "tls.h"
#include "worker.h"

#include <stdio.h>
#include <stdlib.h>

static _Thread_local char tls_error[256]; /* per worker thread: see sl_upconn_tls_error */

static void on_handle_closed(uv_handle_t *h) {
  sl_upconn_t *u = h->data;
  if (--u->pending_close > 0) return;
  sl_endpoint_t *ep = u->ep;
  sl_tls_free(u->tls);
  free(u);
  sl_endpoint_conn_gone(ep);
}

void sl_upconn_close(sl_upconn_t *u) {
  if (u->closing) return;
  u->closing = true;
  if (u->pooled) {
    sl_list_remove(&u->link);
    u->ep->nidle--;
    u->pooled = false;
  }
  u->ops = NULL;
  u->ctx = NULL;
  u->pending_close = 2;
  uv_close((uv_handle_t *)&u->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&u->timer, on_handle_closed);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  sl_upconn_t *u = h->data;
  sl_worker_t *w = u->ep->worker;
  *buf = uv_buf_init(w->readbuf, sizeof(w->readbuf));
}

static void tls_connected(sl_upconn_t *u);
static void tls_failed(sl_upconn_t *u);

static int tls_flush(sl_upconn_t *u) { return sl_tls_send(u->tls, (uv_stream_t *)&u->tcp, NULL); }

/* Ciphertext arrived: advance the handshake, then hand plaintext to the owner. */
static void tls_read(sl_upconn_t *u, const char *data, size_t n) {
  sl_tls_feed(u->tls, data, n);
  if (!u->connected) {
    int hs = sl_tls_handshake(u->tls);
    if (tls_flush(u) < 0 || hs == SL_TLS_ERROR) {
      tls_failed(u);
      return;
    }
    if (hs == SL_TLS_WANT) return;
    tls_connected(u);
    if (u->closing) return;
  }
  char plain[16 * 1024];
  for (;;) {
    int r = sl_tls_read(u->tls, plain, sizeof(plain));
    if (tls_flush(u) < 0) r = SL_TLS_ERROR; /* e.g. a key update to answer */
    if (r == 0) return;
    if (!u->ops) { /* pooled: application data or a close means unusable; tickets do not */
      sl_upconn_close(u);
      return;
    }
    if (r < 0) {
      u->ops->read(u->ctx, u, NULL, r == SL_TLS_CLOSED ? UV_EOF : UV_EPROTO);
      return;
    }
    u->ops->read(u->ctx, u, plain, r);
    /* Released to the pool by that read: records after the response (close_notify, bytes
     * nobody asked for) must still be seen, or the next request would meet them. */
    if (u->closing || !u->tls) return;
  }
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  sl_upconn_t *u = s->data;
  if (n == 0) return;
  if (u->tls && n > 0) {
    tls_read(u, buf->base, (size_t)n);
    return;
  }
  if (!u->ops) {
    /* Pooled: the upstream closed it or sent unsolicited bytes. Either way it is unusable. */
    sl_upconn_close(u);
    return;
  }
  if (!u->connected) { /* the handshake was cut short */
    tls_failed(u);
    return;
  }
  /* A TLS connection that ends without close_notify is truncated (RFC 8446 6.1): not the clean
   * end a close-delimited body needs. */
  if (u->tls && n == UV_EOF) n = UV_ECONNABORTED;
  u->ops->read(u->ctx, u, buf->base, n);
}

const char *sl_upconn_tls_error(const sl_upconn_t *u) {
  (void)u;
  return tls_error;
}

static void on_connect_timeout(uv_timer_t *t) {
  sl_upconn_t *u = t->data;
  const sl_upconn_ops_t *ops = u->ops;
  void *ctx = u->ctx;
  sl_upconn_close(u);
  if (ops) ops->connected(ctx, u, UV_ETIMEDOUT);
}

static void on_connect(uv_connect_t *req, int status) {
  sl_upconn_t *u = req->data;
  if (u->closing) return; /* timed out or aborted meanwhile */
  uv_timer_stop(&u->timer);
  const sl_upconn_ops_t *ops = u->ops;
  void *ctx = u->ctx;
  if (status == 0) status = uv_read_start((uv_stream_t *)&u->tcp, on_alloc, on_read);
  if (status != 0) {
    sl_upconn_close(u);
    ops->connected(ctx, u, status);
    return;
  }
  uv_tcp_nodelay(&u->tcp, 1);
  if (u->ep->tls) { /* the connect timeout also bounds the handshake */
    u->tls = sl_tls_client_new(u->ep->tls_ctx, u->ep->host, &u->ep->tls_session);
    if (!u->tls) {
      snprintf(tls_error, sizeof(tls_error), "TLS: cannot create a connection");
      sl_upconn_close(u);
      ops->connected(ctx, u, UV_EPROTO);
      return;
    }
    uv_timer_start(&u->timer, on_connect_timeout, u->ep->connect_timeout_ms, 0);
    if (sl_tls_handshake(u->tls) == SL_TLS_ERROR || tls_flush(u) < 0) tls_failed(u);
    return;
  }
  u->connected = true;
  ops->connected(ctx, u, 0);
}

static void tls_connected(sl_upconn_t *u) {
  uv_timer_stop(&u->timer);
  u->connected = true;
  if (u->ops) u->ops->connected(u->ctx, u, 0);
}

static void tls_failed(sl_upconn_t *u) {
  if (u->tls) sl_tls_error(u->tls, tls_error, sizeof(tls_error));
  else snprintf(tls_error, sizeof(tls_error), "TLS: the connection closed during the handshake");
  const sl_upconn_ops_t *ops = u->ops;
  void *ctx = u->ctx;
  sl_upconn_close(u);
  if (ops && !u->connected) ops->connected(ctx, u, UV_EPROTO);
}

sl_upconn_t *sl_upconn_acquire(sl_endpoint_t *ep, uint32_t connect_timeout_ms,
                               const sl_upconn_ops_t *ops, void *ctx, int *err) {
  if (!sl_list_empty(&ep->idle)) {
    sl_upconn_t *u = SL_CONTAINER_OF(ep->idle.next, sl_upconn_t, link);
    sl_list_remove(&u->link);
    ep->nidle--;
    u->pooled = false; /* the idle timer stays armed: it ignores connections in use */
    u->ops = ops;
    u->ctx = ctx;
    return u;
  }
  return sl_upconn_connect(ep, connect_timeout_ms, ops, ctx, err);
}

sl_upconn_t *sl_upconn_connect(sl_endpoint_t *ep, uint32_t connect_timeout_ms,
                               const sl_upconn_ops_t *ops, void *ctx, int *err) {
  sl_worker_t *w = ep->worker;
  sl_upconn_t *u = sl_calloc(1, sizeof(*u));
  u->ep = ep;
  sl_list_init(&u->link);
  uv_tcp_init(w->loop, &u->tcp);
  uv_timer_init(w->loop, &u->timer);
  u->tcp.data = u->timer.data = u->creq.data = u;
  u->ops = ops;
  u->ctx = ctx;
  ep->nconns++;
  int rc = uv_tcp_connect(&u->creq, &u->tcp, (const struct sockaddr *)&ep->addr, on_connect);
  if (rc != 0) {
    *err = rc;
    sl_upconn_close(u);
    return NULL;
  }
  uv_timer_start(&u->timer, on_connect_timeout, connect_timeout_ms, 0);
  ep->connect_timeout_ms = connect_timeout_ms;
  return u;
}

/* Pooled connections cycle between idle and busy at every request; rather than a timer
 * stop and start (two heap updates) each time, the idle timer stays armed and checks, when it
 * fires, whether the connection is still idle and for long enough. */
static void on_idle_timeout(uv_timer_t *t) {
  sl_upconn_t *u = t->data;
  uint64_t now = uv_now(u->ep->worker->loop);
  if (!u->pooled) {
    u->idle_timer = false; /* in use; release re-arms */
    return;
  }
  if (u->idle_deadline > now) {
    uv_timer_start(t, on_idle_timeout, u->idle_deadline - now, 0);
    return;
  }
  sl_upconn_close(u);
}

void sl_upconn_release(sl_upconn_t *u, bool reusable) {
  sl_endpoint_t *ep = u->ep;
  u->ops = NULL;
  u->ctx = NULL;
  if (!reusable || u->closing || ep->refs == 0 || ep->worker->draining ||
      ep->nidle >= ep->max_idle) {
    sl_upconn_close(u);
    return;
  }
  /* Keep reading while pooled: that is how a close by the upstream is noticed before reuse. */
  int rc = uv_read_start((uv_stream_t *)&u->tcp, on_alloc, on_read);
  if (rc != 0 && rc != UV_EALREADY) {
    sl_upconn_close(u);
    return;
  }
  u->pooled = true;
  sl_list_insert_head(&ep->idle, &u->link);
  ep->nidle++;
  u->idle_deadline = uv_now(ep->worker->loop) + ep->idle_timeout_ms;
  if (!u->idle_timer || !uv_is_active((uv_handle_t *)&u->timer) ||
      uv_timer_get_due_in(&u->timer) > ep->idle_timeout_ms) {
    uv_timer_start(&u->timer, on_idle_timeout, ep->idle_timeout_ms, 0);
    u->idle_timer = true;
  }
}

static void on_write_done(uv_stream_t *s, int status) {
  sl_upconn_t *u = s->data;
  if (status < 0 || u->closing || !u->ops) return; /* the read side reports the failure */
  if (u->ops->drained && uv_stream_get_write_queue_size(s) == 0) u->ops->drained(u->ctx, u);
}

int sl_upconn_writev(sl_upconn_t *u, const uv_buf_t *bufs, unsigned n) {
  uv_stream_t *s = (uv_stream_t *)&u->tcp;
  int rc = u->tls ? sl_tls_writev(u->tls, s, bufs, n, on_write_done)
                  : sl_stream_writev(s, bufs, n, on_write_done);
  return rc < 0 ? rc : 0;
}

int sl_upconn_write(sl_upconn_t *u, const char *data, size_t len) {
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  return sl_upconn_writev(u, &b, 1);
}

size_t sl_upconn_queued_bytes(const sl_upconn_t *u) {
  return uv_stream_get_write_queue_size((const uv_stream_t *)&u->tcp);
}

void sl_upconn_read_pause(sl_upconn_t *u, bool pause) {
  if (u->closing) return;
  if (pause)
    uv_read_stop((uv_stream_t *)&u->tcp);
  else
    uv_read_start((uv_stream_t *)&u->tcp, on_alloc, on_read);
}
