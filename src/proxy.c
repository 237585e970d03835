#include "proxy.h"

#include "log.h"
#include "policy.h"
#include "route.h"
#include "server.h"
#include "upstream.h"

#include <stdarg.h>
#include <stdio.h>
#include <strings.h>
#include <stdlib.h>

static void attempt(sl_exchange_t *x);
static const llhttp_settings_t resp_settings;
static const sl_upconn_ops_t up_ops;

void sl_proxy_init(sl_exchange_t *x, sl_conn_t *c) {
  memset(x, 0, sizeof(*x));
  x->conn = c;
  uv_timer_init(c->w->loop, &x->timer);
  x->timer.data = c;
}

void sl_proxy_free(sl_exchange_t *x) {
  sl_buf_free(&x->upreq);
  sl_buf_free(&x->out);
  sl_buf_free(&x->rstr);
  free(x->rhdr);
}

/* Bookkeeping ------------------------------------------------------------------------------ */

/* Gives back the endpoint slot taken for the current attempt. */
static void end_attempt(sl_exchange_t *x, bool ok) {
  sl_endpoint_t *ep = x->ep;
  if (!ep) return;
  if (!x->up || !x->up->connected) {
    /* still waiting for a connection when it ended */
    if (x->up) ep->view.queued--;
  }
  ep->view.inflight--;
  if (ok) {
    ep->view.successes++;
    ep->view.consecutive_fails = 0;
  } else {
    ep->view.fails++;
    ep->view.consecutive_fails++;
  }
  sl_endpoint_update(ep);
  x->ep = NULL;
}

static void end_exchange(sl_exchange_t *x) {
  uv_timer_stop(&x->timer);
  if (x->gen) sl_gen_unref(x->gen);
  x->gen = NULL;
  x->pool = NULL;
  x->active = false;
  x->up = NULL;
  x->request_id[0] = 0;
}

static void fail(sl_exchange_t *x, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Ends the exchange with an error: a JSON error response when nothing was sent yet, otherwise
 * the client connection is cut (a truncated response must not look complete). */
static void fail(sl_exchange_t *x, int status, const char *type, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  sl_conn_t *c = x->conn;
  if (x->up) {
    sl_upconn_close(x->up);
  }
  end_attempt(x, false);
  bool sent = x->head_sent;
  char rid[sizeof(x->request_id)];
  memcpy(rid, x->request_id, sizeof(rid));
  end_exchange(x);
  SL_INFO("request %s: %s: %s", rid, type, msg);
  if (sent) {
    sl_conn_close(c);
    return;
  }
  memcpy(x->request_id, rid, sizeof(rid)); /* the error response carries the same id */
  const char *extra = status == 503 ? "Retry-After: 1\r\n" : NULL;
  sl_conn_send_error(c, status, type, msg, extra, true);
}

void sl_proxy_abort(sl_exchange_t *x) {
  if (!x->active) return;
  if (x->up) sl_upconn_close(x->up);
  end_attempt(x, false);
  end_exchange(x);
}

/* Upstream request ------------------------------------------------------------------------- */

/* True when `name` is listed in one of the request's Connection headers. */
static bool connection_lists(const sl_http_req_t *r, const char *name, size_t nlen) {
  for (uint32_t i = 0; i < r->nheaders; i++) {
    const sl_header_t *h = &r->headers[i];
    if (!sl_strieq(sl_http_req_str(r, h->name_off), h->name_len, "connection")) continue;
    const char *v = sl_http_req_str(r, h->value_off), *end = v + h->value_len;
    while (v < end) {
      while (v < end && (*v == ' ' || *v == '\t' || *v == ',')) v++;
      const char *t = v;
      while (v < end && *v != ',' && *v != ' ' && *v != '\t') v++;
      if ((size_t)(v - t) == nlen && strncasecmp(t, name, nlen) == 0) return true;
    }
  }
  return false;
}

/* Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself. */
static bool skip_request_header(const char *n, size_t len) {
  switch (len) {
  case 2: return sl_strieq(n, len, "te");
  case 4: return sl_strieq(n, len, "host");
  case 6: return sl_strieq(n, len, "expect");
  case 7: return sl_strieq(n, len, "upgrade") || sl_strieq(n, len, "trailer");
  case 10: return sl_strieq(n, len, "connection") || sl_strieq(n, len, "keep-alive");
  case 12: return sl_strieq(n, len, "x-request-id");
  case 14: return sl_strieq(n, len, "content-length");
  case 15: return sl_strieq(n, len, "x-forwarded-for");
  case 16: return sl_strieq(n, len, "proxy-connection") || sl_strieq(n, len, "x-forwarded-host");
  case 17: return sl_strieq(n, len, "transfer-encoding") || sl_strieq(n, len, "x-forwarded-proto");
  case 19: return sl_strieq(n, len, "proxy-authorization");
  default: return false;
  }
}

static void build_upstream_request(sl_exchange_t *x) {
  sl_conn_t *c = x->conn;
  const sl_http_req_t *r = &c->req;
  sl_buf_t *b = &x->upreq;
  b->len = 0;
  const sl_endpoint_t *ep = x->ep;
  sl_buf_appendf(b, "%s %s%.*s HTTP/1.1\r\n", sl_http_method_str(r->method), ep->path_prefix,
                 (int)r->url_len, sl_http_req_url(r));
  const sl_header_t *host = r->host_idx >= 0 ? &r->headers[r->host_idx] : NULL;
  if (x->pool->conf->preserve_host && host)
    sl_buf_appendf(b, "Host: %.*s\r\n", (int)host->value_len, sl_http_req_str(r, host->value_off));
  else
    sl_buf_appendf(b, "Host: %s\r\n", ep->authority);

  const char *xff = NULL;
  uint32_t xff_len = 0;
  for (uint32_t i = 0; i < r->nheaders; i++) {
    const sl_header_t *h = &r->headers[i];
    const char *n = sl_http_req_str(r, h->name_off);
    if (skip_request_header(n, h->name_len)) {
      if (h->name_len == 15 && !xff) {
        xff = sl_http_req_str(r, h->value_off);
        xff_len = h->value_len;
      }
      continue;
    }
    if (connection_lists(r, n, h->name_len)) continue;
    sl_buf_append(b, n, h->name_len);
    sl_buf_append(b, ": ", 2);
    sl_buf_append(b, sl_http_req_str(r, h->value_off), h->value_len);
    sl_buf_append(b, "\r\n", 2);
  }
  if (xff)
    sl_buf_appendf(b, "X-Forwarded-For: %.*s, %s\r\n", (int)xff_len, xff, c->peer);
  else
    sl_buf_appendf(b, "X-Forwarded-For: %s\r\n", c->peer);
  sl_buf_appends(b, "X-Forwarded-Proto: http\r\n");
  if (host && !x->pool->conf->preserve_host)
    sl_buf_appendf(b, "X-Forwarded-Host: %.*s\r\n", (int)host->value_len,
                   sl_http_req_str(r, host->value_off));
  sl_buf_appendf(b, "X-Request-Id: %s\r\n", x->request_id);
  bool body_method = r->method == HTTP_POST || r->method == HTTP_PUT || r->method == HTTP_PATCH;
  if (r->body.len || body_method) sl_buf_appendf(b, "Content-Length: %zu\r\n", r->body.len);
  sl_buf_append(b, "\r\n", 2);
  sl_buf_append(b, r->body.data, r->body.len);
}

/* Timers ----------------------------------------------------------------------------------- */

static void on_deadline(uv_timer_t *t) {
  sl_conn_t *c = t->data;
  sl_exchange_t *x = &c->x;
  if (!x->active) return;
  c->w->stats.upstream_timeouts++;
  uint64_t now = sl_worker_now(c->w);
  const sl_pool_conf_t *pc = x->pool->conf;
  bool total = pc->total_timeout_ms && now >= x->start_ms + pc->total_timeout_ms;
  fail(x, 504, "upstream_timeout", "%s waiting for %s (%s timeout %u ms)",
       total ? "gave up" : "no response", x->ep ? x->ep->url : "upstream",
       total ? "total" : "first-byte", total ? pc->total_timeout_ms : pc->first_byte_timeout_ms);
}

static void arm_deadline(sl_exchange_t *x) {
  const sl_pool_conf_t *pc = x->pool->conf;
  uint64_t now = sl_worker_now(x->conn->w);
  uint64_t due = UINT64_MAX;
  if (!x->got_bytes) due = now + pc->first_byte_timeout_ms;
  if (pc->total_timeout_ms) due = SL_MIN(due, x->start_ms + pc->total_timeout_ms);
  if (due == UINT64_MAX) {
    uv_timer_stop(&x->timer);
    return;
  }
  uv_timer_start(&x->timer, on_deadline, due > now ? due - now : 0, 0);
}

/* Upstream connection events --------------------------------------------------------------- */

static void send_request(sl_exchange_t *x) {
  x->ep->view.queued--;
  sl_endpoint_update(x->ep);
  x->got_bytes = false;
  x->message_done = false;
  x->skip_message = false;
  x->nrhdr = 0;
  x->rstr.len = 0;
  x->rfield = 0;
  llhttp_init(&x->rp, HTTP_RESPONSE, &resp_settings);
  x->rp.data = x;
  arm_deadline(x);
  int rc = sl_upconn_write(x->up, x->upreq.data, x->upreq.len);
  if (rc < 0) {
    /* reported by the read side as well; fail here in case it is not */
    fail(x, 502, "upstream_write_failed", "writing to %s failed: %s", x->ep->url,
         uv_strerror(rc));
  }
}

static void on_up_connected(void *ctx, sl_upconn_t *u, int status) {
  sl_exchange_t *x = ctx;
  if (status == 0) {
    send_request(x);
    return;
  }
  x->up = NULL; /* already closing */
  x->ep->view.queued--;
  x->conn->w->stats.upstream_connect_errors++;
  if (status == UV_ETIMEDOUT)
    fail(x, 504, "upstream_connect_timeout", "connecting to %s timed out after %u ms",
         x->ep->url, x->pool->conf->connect_timeout_ms);
  else
    fail(x, 502, "upstream_connect_failed", "connecting to %s failed: %s", x->ep->url,
         uv_strerror(status));
}

static void flush_out(sl_exchange_t *x) {
  if (!x->out.len) return;
  sl_conn_write(x->conn, x->out.data, x->out.len);
  x->out.len = 0;
}

/* The response is complete: reuse the upstream connection and let the client connection move
 * on to its next request. */
static void complete(sl_exchange_t *x) {
  sl_conn_t *c = x->conn;
  sl_upconn_release(x->up, x->up_keep);
  x->up = NULL;
  end_attempt(x, true);
  c->w->stats.responses[x->status / 100 < 6 ? x->status / 100 : 0]++;
  bool keep = c->req.keep_alive && !x->out_close;
  end_exchange(x);
  sl_conn_response_done(c, keep);
}

static void on_up_read(void *ctx, sl_upconn_t *u, const char *data, ssize_t n) {
  sl_exchange_t *x = ctx;
  if (n < 0) {
    if (x->got_bytes && !x->message_done) {
      /* close-delimited bodies end here */
      llhttp_errno_t e = llhttp_finish(&x->rp);
      flush_out(x);
      if (x->conn->closing) return;
      if (e == HPE_OK && x->message_done) {
        complete(x);
        return;
      }
    }
    if (!x->got_bytes && x->reused && !x->stale_retried) {
      /* A pooled connection the upstream had closed: nothing was answered, so the request is
       * re-sent once on a fresh connection to the same endpoint. */
      x->stale_retried = true;
      sl_upconn_close(u);
      x->up = NULL;
      x->ep->view.queued++;
      int err = 0;
      x->reused = false;
      x->up = sl_upconn_acquire(x->ep, x->pool->conf->connect_timeout_ms, &up_ops, x, &err);
      if (!x->up) {
        x->ep->view.queued--;
        fail(x, 502, "upstream_connect_failed", "connecting to %s failed: %s", x->ep->url,
             uv_strerror(err));
      }
      return;
    }
    fail(x, 502, "upstream_reset", "%s closed the connection before a complete response (%s)",
         x->ep->url, n == UV_EOF ? "EOF" : uv_strerror((int)n));
    return;
  }
  if (!x->got_bytes) {
    x->got_bytes = true;
    sl_endpoint_record_ttfb(x->ep, (double)(sl_worker_now(x->conn->w) - x->attempt_ms));
    arm_deadline(x);
  }
  llhttp_errno_t e = llhttp_execute(&x->rp, data, (size_t)n);
  flush_out(x);
  if (x->conn->closing) return; /* client write failed: the abort already cleaned up */
  if (e == HPE_PAUSED && x->message_done) {
    /* Bytes after a complete response are a protocol error: do not reuse the connection. */
    if (llhttp_get_error_pos(&x->rp) != data + n) x->up_keep = false;
    complete(x);
    return;
  }
  if (e != HPE_OK) {
    fail(x, 502, "upstream_protocol_error", "invalid response from %s: %s", x->ep->url,
         llhttp_get_error_reason(&x->rp));
    return;
  }
  if (sl_conn_queued_bytes(x->conn) > sl_server_client_hwm() && !x->up_paused) {
    x->up_paused = true;
    sl_upconn_read_pause(u, true);
  }
}

void sl_proxy_client_drained(sl_exchange_t *x) {
  if (!x->up_paused || !x->up) return;
  x->up_paused = false;
  sl_upconn_read_pause(x->up, false);
}

static const sl_upconn_ops_t up_ops = {
    .connected = on_up_connected,
    .read = on_up_read,
};

/* Upstream response parsing ---------------------------------------------------------------- */

#define X(p) ((sl_exchange_t *)(p)->data)

static int r_field(llhttp_t *p, const char *at, size_t len) {
  sl_exchange_t *x = X(p);
  if (x->rfield != 1) {
    if (x->nrhdr == x->rhdr_cap) {
      x->rhdr_cap = x->rhdr_cap ? x->rhdr_cap * 2 : 32;
      x->rhdr = sl_realloc(x->rhdr, x->rhdr_cap * 4 * sizeof(uint32_t));
    }
    uint32_t *h = &x->rhdr[4 * x->nrhdr++];
    h[0] = (uint32_t)x->rstr.len;
    h[1] = h[2] = h[3] = 0;
    x->rfield = 1;
  }
  if (x->rstr.len + len > 256 * 1024) return -1; /* absurd upstream header section */
  sl_buf_append(&x->rstr, at, len);
  return 0;
}

static int r_value(llhttp_t *p, const char *at, size_t len) {
  sl_exchange_t *x = X(p);
  uint32_t *h = &x->rhdr[4 * (x->nrhdr - 1)];
  if (x->rfield != 2) {
    h[1] = (uint32_t)x->rstr.len - h[0];
    h[2] = (uint32_t)x->rstr.len;
    x->rfield = 2;
  }
  if (x->rstr.len + len > 256 * 1024) return -1;
  sl_buf_append(&x->rstr, at, len);
  return 0;
}

static int r_value_complete(llhttp_t *p) {
  sl_exchange_t *x = X(p);
  uint32_t *h = &x->rhdr[4 * (x->nrhdr - 1)];
  if (x->rfield != 2) {
    h[1] = (uint32_t)x->rstr.len - h[0];
    h[2] = (uint32_t)x->rstr.len;
  }
  h[3] = (uint32_t)x->rstr.len - h[2];
  x->rfield = 0;
  return 0;
}

static bool upstream_connection_lists(const sl_exchange_t *x, const char *name, size_t nlen) {
  for (uint32_t i = 0; i < x->nrhdr; i++) {
    const uint32_t *h = &x->rhdr[4 * i];
    if (!sl_strieq(x->rstr.data + h[0], h[1], "connection")) continue;
    const char *v = x->rstr.data + h[2], *end = v + h[3];
    while (v < end) {
      while (v < end && (*v == ' ' || *v == '\t' || *v == ',')) v++;
      const char *t = v;
      while (v < end && *v != ',' && *v != ' ' && *v != '\t') v++;
      if ((size_t)(v - t) == nlen && strncasecmp(t, name, nlen) == 0) return true;
    }
  }
  return false;
}

static bool skip_response_header(const char *n, size_t len) {
  switch (len) {
  case 2: return sl_strieq(n, len, "te");
  case 7: return sl_strieq(n, len, "upgrade") || sl_strieq(n, len, "trailer");
  case 10: return sl_strieq(n, len, "connection") || sl_strieq(n, len, "keep-alive");
  case 12: return sl_strieq(n, len, "x-request-id");
  case 14: return sl_strieq(n, len, "content-length");
  case 16: return sl_strieq(n, len, "proxy-connection");
  case 17: return sl_strieq(n, len, "transfer-encoding");
  case 18: return sl_strieq(n, len, "proxy-authenticate");
  default: return false;
  }
}

static int r_headers_complete(llhttp_t *p) {
  sl_exchange_t *x = X(p);
  sl_conn_t *c = x->conn;
  int status = p->status_code;
  if (status < 200 && status != 101) {
    x->skip_message = true; /* interim response: the final one follows */
    return 0;
  }
  x->status = (uint16_t)status;
  /* Decided here: after message completion llhttp has reset the flags it is computed from. */
  x->up_keep = llhttp_should_keep_alive(p);
  bool no_body = x->head_request || status == 204 || status == 304;
  bool has_cl = (p->flags & F_CONTENT_LENGTH) && !(p->flags & F_CHUNKED);
  sl_buf_t *o = &x->out;
  sl_buf_appendf(o, "HTTP/1.1 %d %s\r\n", status, sl_http_status_reason(status));
  for (uint32_t i = 0; i < x->nrhdr; i++) {
    const uint32_t *h = &x->rhdr[4 * i];
    const char *n = x->rstr.data + h[0];
    if (skip_response_header(n, h[1]) || upstream_connection_lists(x, n, h[1])) continue;
    sl_buf_append(o, n, h[1]);
    sl_buf_append(o, ": ", 2);
    sl_buf_append(o, x->rstr.data + h[2], h[3]);
    sl_buf_append(o, "\r\n", 2);
  }
  x->out_chunked = x->out_close = false;
  if (has_cl && (!no_body || x->head_request)) {
    sl_buf_appendf(o, "Content-Length: %llu\r\n", (unsigned long long)p->content_length);
  } else if (!no_body) {
    if (c->req.http_minor >= 1) {
      sl_buf_appends(o, "Transfer-Encoding: chunked\r\n");
      x->out_chunked = true;
    } else {
      x->out_close = true; /* HTTP/1.0 client: the body ends when the connection does */
    }
  }
  sl_buf_appendf(o, "x-request-id: %s\r\n", x->request_id);
  if (!c->req.keep_alive || x->out_close || c->w->draining) sl_buf_appends(o, "Connection: close\r\n");
  sl_buf_append(o, "\r\n", 2);
  x->head_sent = true;
  return x->head_request ? 1 : 0;
}

static int r_body(llhttp_t *p, const char *at, size_t len) {
  sl_exchange_t *x = X(p);
  if (x->out_chunked) sl_buf_appendf(&x->out, "%zx\r\n", len);
  sl_buf_append(&x->out, at, len);
  if (x->out_chunked) sl_buf_append(&x->out, "\r\n", 2);
  return 0;
}

static int r_message_complete(llhttp_t *p) {
  sl_exchange_t *x = X(p);
  if (x->skip_message) {
    x->skip_message = false;
    x->nrhdr = 0;
    x->rstr.len = 0;
    return 0;
  }
  if (x->out_chunked) sl_buf_append(&x->out, "0\r\n\r\n", 5);
  x->message_done = true;
  return HPE_PAUSED;
}

static const llhttp_settings_t resp_settings = {
    .on_header_field = r_field,
    .on_header_value = r_value,
    .on_header_value_complete = r_value_complete,
    .on_headers_complete = r_headers_complete,
    .on_body = r_body,
    .on_message_complete = r_message_complete,
};

/* Starting --------------------------------------------------------------------------------- */

static void attempt(sl_exchange_t *x) {
  sl_conn_t *c = x->conn;
  sl_worker_t *w = c->w;
  char err[512];
  sl_endpoint_t *ep = NULL;
  x->attempts++;
  if (sl_policy_pick(w, x->pool, &c->req, x->request_id, x->attempts, &ep, err, sizeof(err)) !=
      0) {
    w->stats.policy_errors++;
    SL_ERROR("policy error (pool %s): %s", x->pool->conf->name, err);
    fail(x, 500, "policy_error", "the balancer of pool %s failed; see the gateway log",
         x->pool->conf->name);
    return;
  }
  if (!ep) {
    fail(x, 503, "no_endpoint_available", "no endpoint of pool %s can take the request now",
         x->pool->conf->name);
    return;
  }
  x->ep = ep;
  ep->view.inflight++;
  ep->view.queued++;
  sl_endpoint_update(ep);
  build_upstream_request(x);
  x->attempt_ms = sl_worker_now(w);
  x->head_sent = false;
  x->stale_retried = false;
  int uerr = 0;
  x->up = sl_upconn_acquire(ep, x->pool->conf->connect_timeout_ms, &up_ops, x, &uerr);
  if (!x->up) {
    ep->view.queued--;
    w->stats.upstream_connect_errors++;
    fail(x, 502, "upstream_connect_failed", "connecting to %s failed: %s", ep->url,
         uv_strerror(uerr));
    return;
  }
  x->reused = x->up->connected;
  if (x->reused) send_request(x);
}

void sl_proxy_start(sl_conn_t *c) {
  sl_exchange_t *x = &c->x;
  sl_worker_t *w = c->w;
  const sl_http_req_t *r = &c->req;
  x->active = true;
  x->gen = sl_gen_ref(w->gen);
  x->start_ms = sl_worker_now(w);
  x->attempts = 0;
  x->head_sent = false;
  x->up_paused = false;
  x->head_request = r->method == HTTP_HEAD;
  sl_conn_request_id(c);

  const char *host = NULL;
  size_t host_len = 0;
  if (r->host_idx >= 0) {
    host = sl_http_req_str(r, r->headers[r->host_idx].value_off);
    host_len = r->headers[r->host_idx].value_len;
  }
  const sl_route_conf_t *route =
      sl_route_match(x->gen->cfg, sl_http_req_url(r), r->path_len, host, host_len);
  if (!route) {
    x->pool = NULL;
    fail(x, 404, "route_not_found", "no route for %.*s", (int)SL_MIN(r->path_len, 200),
         sl_http_req_url(r));
    return;
  }
  x->pool = &x->gen->pools[route->pool_idx];
  attempt(x);
}
