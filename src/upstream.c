#include "upstream.h"

#include "io.h"
#include "log.h"
#include "worker.h"

#include <stdlib.h>

static void on_handle_closed(uv_handle_t *h) {
  sl_upconn_t *u = h->data;
  if (--u->pending_close > 0) return;
  sl_endpoint_t *ep = u->ep;
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

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  sl_upconn_t *u = s->data;
  if (n == 0) return;
  if (!u->ops) {
    /* Pooled: the upstream closed it or sent unsolicited bytes. Either way it is unusable. */
    sl_upconn_close(u);
    return;
  }
  u->ops->read(u->ctx, u, buf->base, n);
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
  u->connected = true;
  uv_tcp_nodelay(&u->tcp, 1);
  ops->connected(ctx, u, 0);
}

sl_upconn_t *sl_upconn_acquire(sl_endpoint_t *ep, uint32_t connect_timeout_ms,
                               const sl_upconn_ops_t *ops, void *ctx, int *err) {
  if (!sl_list_empty(&ep->idle)) {
    sl_upconn_t *u = SL_CONTAINER_OF(ep->idle.next, sl_upconn_t, link);
    sl_list_remove(&u->link);
    ep->nidle--;
    u->pooled = false;
    uv_timer_stop(&u->timer);
    u->ops = ops;
    u->ctx = ctx;
    return u;
  }
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
  return u;
}

static void on_idle_timeout(uv_timer_t *t) { sl_upconn_close(t->data); }

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
  uv_timer_start(&u->timer, on_idle_timeout, ep->idle_timeout_ms, 0);
}

static void on_write_done(uv_stream_t *s, int status) {
  sl_upconn_t *u = s->data;
  if (status < 0 || u->closing || !u->ops) return; /* the read side reports the failure */
  if (u->ops->drained && uv_stream_get_write_queue_size(s) == 0) u->ops->drained(u->ctx, u);
}

int sl_upconn_writev(sl_upconn_t *u, const uv_buf_t *bufs, unsigned n) {
  int rc = sl_stream_writev((uv_stream_t *)&u->tcp, bufs, n, on_write_done);
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
