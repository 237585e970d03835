#include "server.h"

#include "admin.h"
#include "ws.h"
#include "io.h"
#include "log.h"
#include "telemetry.h"
#include "tls.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>

/* Pipelined input buffered while a request is being answered; reading pauses beyond this. */
#define SL_MAX_BUFFERED_INPUT (256 * 1024)
/* Client-side write backlog at which upstream reads pause, and where they resume. */
#define SL_CLIENT_HWM (256 * 1024)
#define SL_CLIENT_LWM (64 * 1024)
/* How long a closing connection keeps draining input so the client reads our last response. */
#define SL_LINGER_MS 2000

static void conn_process(sl_conn_t *c);
static void conn_finish(sl_conn_t *c);
static int tls_flush(sl_conn_t *c, sl_write_cb cb);

static const sl_config_t *cur_cfg(const sl_conn_t *c) { return c->w->gen->cfg; }

static void exchange_free(sl_conn_t *c) {
  if (!c->x) return;
  if (!uv_is_closing((uv_handle_t *)&c->xtimer)) uv_timer_stop(&c->xtimer);
  sl_proxy_free(c->x);
  free(c->x);
  c->x = NULL;
  c->xtimer.data = NULL;
}

static void conn_handle_closed(sl_conn_t *c) {
  if (--c->pending_close > 0) return;
  sl_tls_free(c->tls);
  sl_http_req_free(&c->req);
  sl_buf_free(&c->in);
  exchange_free(c);
  sl_worker_t *w = c->w;
  free(c);
  sl_worker_conn_gone(w);
}

static void on_conn_handle_closed(uv_handle_t *h) { conn_handle_closed(h->data); }
static void on_exchange_timer_closed(uv_handle_t *h) {
  conn_handle_closed(SL_CONTAINER_OF(h, sl_conn_t, xtimer));
}

sl_exchange_t *sl_conn_exchange(sl_conn_t *c) {
  sl_list_remove(&c->idle_link); /* if it was about to be freed: keep it */
  if (!c->x) {
    c->x = sl_malloc(sizeof(*c->x));
    sl_proxy_init(c->x, c);
  }
  return c->x;
}

/* After the loop turn's I/O callbacks, no exchange code is on the stack: the exchanges of
 * connections that went idle meanwhile can be freed. */
static void on_idle_sweep(uv_check_t *h) {
  sl_worker_t *w = h->data;
  while (!sl_list_empty(&w->idle_sweep_conns)) {
    sl_conn_t *c = SL_CONTAINER_OF(w->idle_sweep_conns.next, sl_conn_t, idle_link);
    sl_list_remove(&c->idle_link);
    if (c->x && !c->x->active && c->state == SL_CONN_IDLE) exchange_free(c);
  }
  uv_check_stop(h);
}

void sl_server_worker_init(sl_worker_t *w) {
  sl_list_init(&w->idle_sweep_conns);
  uv_check_init(w->loop, &w->idle_sweep);
  w->idle_sweep.data = w;
  uv_unref((uv_handle_t *)&w->idle_sweep);
}

void sl_server_worker_close(sl_worker_t *w) {
  sl_close_handle((uv_handle_t *)&w->idle_sweep, NULL);
}

void sl_conn_close(sl_conn_t *c) {
  if (c->closing) return;
  /* Between requests a TLS connection ends with close_notify (RFC 8446 6.1), best effort:
   * mid-response it must not, or a truncated response would look complete. */
  bool active = c->x && c->x->active;
  if (c->tls && c->tls->handshake_done && !active &&
      (c->state == SL_CONN_IDLE || c->state == SL_CONN_READING || c->state == SL_CONN_LINGER)) {
    sl_tls_shutdown(c->tls);
    tls_flush(c, NULL);
  }
  c->closing = true;
  if (active) sl_proxy_abort(c->x);
  sl_list_remove(&c->link);
  sl_list_remove(&c->idle_link);
  c->w->nconns--;
  c->pending_close = 3;
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->xtimer, on_exchange_timer_closed);
}

size_t sl_conn_queued_bytes(const sl_conn_t *c) {
  return uv_stream_get_write_queue_size((const uv_stream_t *)&c->tcp);
}

static void on_write_done(uv_stream_t *s, int status) {
  sl_conn_t *c = s->data;
  if (c->closing) return;
  if (status < 0) {
    sl_conn_close(c);
    return;
  }
  size_t queued = sl_conn_queued_bytes(c);
  if (queued == 0 && c->close_after) {
    conn_finish(c);
    return;
  }
  sl_exchange_t *x = c->x;
  if (!x || !x->active) return;
  if (x->ws) {
    sl_ws_client_drained(x->ws);
    return;
  }
  if (x->up_paused && queued <= SL_CLIENT_LWM) sl_proxy_client_drained(x);
}

static int tls_flush(sl_conn_t *c, sl_write_cb cb) {
  return sl_tls_send(c->tls, (uv_stream_t *)&c->tcp, cb);
}

int sl_conn_writev(sl_conn_t *c, const uv_buf_t *bufs, unsigned n) {
  if (c->closing) return UV_ECANCELED;
  uv_stream_t *s = (uv_stream_t *)&c->tcp;
  int rc = c->tls ? sl_tls_writev(c->tls, s, bufs, n, on_write_done)
                  : sl_stream_writev(s, bufs, n, on_write_done);
  if (rc < 0) {
    sl_conn_close(c);
    return rc;
  }
  return 0;
}

int sl_conn_write(sl_conn_t *c, const char *data, size_t len) {
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  return sl_conn_writev(c, &b, 1);
}

/* Timers ----------------------------------------------------------------------------------- */

static void on_timer(uv_timer_t *t) {
  sl_conn_t *c = t->data;
  uint64_t now = uv_now(c->w->loop);
  if (!c->deadline) return; /* disarmed since */
  if (c->deadline > now) {   /* moved later since: wait for the rest */
    uv_timer_start(t, on_timer, c->deadline - now, 0);
    return;
  }
  c->deadline = 0;
  switch (c->state) {
  case SL_CONN_READING:
    if (!c->admin) sl_telemetry_request_rejected(c, 408);
    sl_conn_send_error(c, 408, "request_timeout", "request not received in time", NULL, false);
    break;
  case SL_CONN_IDLE:
  case SL_CONN_LINGER:
    sl_conn_close(c);
    break;
  default:
    break;
  }
}

/* Connection timeouts change at every request (header, then idle). Moving a libuv timer is a
 * heap update each time, so the timer is only moved earlier: when the new deadline is later,
 * the armed timer fires first and re-arms itself for the rest (as nginx does with its lazy
 * timers). */
static void arm(sl_conn_t *c, uint64_t ms) {
  uint64_t now = uv_now(c->w->loop);
  c->deadline = now + ms;
  if (uv_is_active((uv_handle_t *)&c->timer) && uv_timer_get_due_in(&c->timer) <= ms) return;
  uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void disarm(sl_conn_t *c) { c->deadline = 0; }

/* Graceful close: the response is flushed; send FIN, drain what the client still sends for a
 * moment (so it reads the response instead of getting a reset), then close. */
static void on_shutdown(uv_shutdown_t *req, int status) {
  sl_conn_t *c = req->data;
  free(req);
  if (status < 0 && !c->closing) sl_conn_close(c);
}

static void conn_finish(sl_conn_t *c) {
  if (c->closing || c->state == SL_CONN_LINGER) return;
  c->state = SL_CONN_LINGER;
  c->close_after = false;
  if (c->tls) { /* close_notify first, so the client can tell the end from a truncation */
    sl_tls_shutdown(c->tls);
    tls_flush(c, NULL);
  }
  uv_shutdown_t *req = sl_malloc(sizeof(*req));
  req->data = c;
  if (uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
    free(req);
    sl_conn_close(c);
    return;
  }
  arm(c, SL_LINGER_MS);
}

/* Reading ---------------------------------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  sl_conn_t *c = h->data;
  *buf = uv_buf_init(c->w->readbuf, sizeof(c->w->readbuf));
}

static void conn_input(sl_conn_t *c, const char *data, size_t n);

/* Ciphertext from a TLS client: handshake, then plaintext into the usual input path. */
static void tls_input(sl_conn_t *c, const char *data, size_t n) {
  sl_tls_feed(c->tls, data, n);
  if (!c->tls->handshake_done) {
    int hs = sl_tls_handshake(c->tls);
    if (tls_flush(c, NULL) < 0 || hs == SL_TLS_ERROR) {
      char err[256];
      sl_tls_error(c->tls, err, sizeof(err));
      SL_DEBUG("client %s: TLS handshake failed: %s", c->peer, err);
      sl_conn_close(c);
      return;
    }
    if (hs == SL_TLS_WANT) return;
  }
  char plain[16 * 1024];
  for (;;) {
    int r = sl_tls_read(c->tls, plain, sizeof(plain));
    if (c->closing) return;
    if (tls_flush(c, NULL) < 0) r = SL_TLS_ERROR;
    if (r == 0) return;
    if (r < 0) { /* close_notify or a broken record: the client is gone */
      if (c->state == SL_CONN_WS) sl_ws_client_read(c->x->ws, NULL, UV_EOF);
      else sl_conn_close(c);
      return;
    }
    conn_input(c, plain, (size_t)r);
    if (c->closing || c->state == SL_CONN_LINGER) return;
  }
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  sl_conn_t *c = s->data;
  if (n == 0) return;
  if (n > 0 && c->tls) {
    if (c->state != SL_CONN_LINGER) tls_input(c, buf->base, (size_t)n);
    return;
  }
  if (n < 0) {
    if (c->state == SL_CONN_WS) {
      sl_ws_client_read(c->x->ws, NULL, n); /* the session closes the upstream leg properly */
      return;
    }
    /* EOF or error. A client that goes away while its request is served aborts it. */
    sl_conn_close(c);
    return;
  }
  if (c->state == SL_CONN_LINGER) return;
  conn_input(c, buf->base, (size_t)n);
}

static void conn_input(sl_conn_t *c, const char *data, size_t n) {
  if (c->state == SL_CONN_WS) {
    sl_ws_client_read(c->x->ws, data, (ssize_t)n);
    return;
  }
  sl_buf_append(&c->in, data, n);
  if (c->state == SL_CONN_BUSY) {
    if (c->in.len > SL_MAX_BUFFERED_INPUT) {
      uv_read_stop((uv_stream_t *)&c->tcp);
      c->reading = false;
    }
    return;
  }
  conn_process(c);
  if (!c->closing && c->state == SL_CONN_READING && c->h1.headers_done)
    arm(c, cur_cfg(c)->idle_timeout_ms); /* body arriving: an inactivity timeout from here */
}

static void start_reading(sl_conn_t *c) {
  if (c->reading || c->closing) return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = true;
}

void sl_conn_read_pause(sl_conn_t *c, bool pause) {
  if (c->closing) return;
  if (!pause) {
    start_reading(c);
  } else if (c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
  }
}

static void send_continue(sl_conn_t *c) {
  static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
  sl_conn_write(c, cont, sizeof(cont) - 1);
}

/* Parses buffered input and dispatches complete requests, one at a time. A request answered
 * synchronously (an error, say) lets the loop continue with the next pipelined one. */
static void conn_process(sl_conn_t *c) {
  if (c->in_process) return;
  c->in_process = true;
  size_t off = 0;
  while (!c->closing && !c->close_after && off < c->in.len &&
         (c->state == SL_CONN_IDLE || c->state == SL_CONN_READING)) {
    if (c->state == SL_CONN_IDLE) {
      c->state = SL_CONN_READING;
      arm(c, cur_cfg(c)->header_timeout_ms);
    }
    size_t used = 0;
    sl_h1_event_t ev = sl_h1_execute(&c->h1, c->in.data + off, c->in.len - off, &used);
    off += used;
    if (ev == SL_H1_AGAIN) break;
    if (ev == SL_H1_HEADERS) {
      send_continue(c);
      sl_h1_resume(&c->h1);
      continue;
    }
    if (ev == SL_H1_ERROR) {
      SL_DEBUG("client %s: bad request: %s", c->peer, c->req.err_msg);
      off = c->in.len;
      if (!c->admin) sl_telemetry_request_rejected(c, c->req.err_status);
      sl_conn_send_error(c, c->req.err_status, c->req.err_status == 400 ? "bad_request"
                         : c->req.err_status == 413 ? "request_too_large"
                         : c->req.err_status == 431 ? "headers_too_large"
                         : "bad_request",
                         c->req.err_msg, NULL, false);
      break;
    }
    /* SL_H1_MESSAGE */
    disarm(c);
    c->state = SL_CONN_BUSY;
    if (c->admin) {
      sl_admin_handle(c);
      continue;
    }
    c->w->stats.requests++;
    sl_proxy_start(c);
  }
  if (!c->closing) sl_buf_consume(&c->in, off);
  c->in_process = false;
}

void sl_conn_response_done(sl_conn_t *c, bool keep_alive) {
  if (c->closing) return;
  if (c->x) c->x->request_id[0] = 0;
  sl_http_req_reset(&c->req);
  sl_h1_next(&c->h1);
  if (!keep_alive || c->w->draining) {
    c->state = SL_CONN_BUSY; /* stop parsing further input */
    c->close_after = true;
    if (sl_conn_queued_bytes(c) == 0) conn_finish(c);
    return;
  }
  c->state = SL_CONN_IDLE;
  arm(c, cur_cfg(c)->idle_timeout_ms);
  start_reading(c);
  if (c->in.len == 0) {
    /* Idle keep-alive connections are the many; keep them small: no per-request buffers now,
     * and no exchange once the callers up the stack are done with it (on_idle_sweep). */
    sl_http_req_free(&c->req);
    sl_buf_free(&c->in);
    if (c->x) {
      sl_proxy_free(c->x);
      if (sl_list_empty(&c->idle_link)) {
        sl_list_insert_tail(&c->w->idle_sweep_conns, &c->idle_link);
        uv_check_start(&c->w->idle_sweep, on_idle_sweep);
      }
    }
  } else if (!c->in_process) {
    conn_process(c);
  }
}

/* Responses the gateway writes itself -------------------------------------------------------- */

static bool valid_request_id(const char *s, size_t n) {
  if (n == 0 || n > 128) return false;
  for (size_t i = 0; i < n; i++) {
    char ch = s[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
          ch == '-' || ch == '_' || ch == '.' || ch == ':'))
      return false;
  }
  return true;
}

const char *sl_conn_request_id(sl_conn_t *c) {
  char *id = sl_conn_exchange(c)->request_id;
  if (id[0]) return id;
  const sl_http_req_t *r = &c->req;
  if (r->request_id_idx >= 0) {
    const sl_header_t *h = &r->headers[r->request_id_idx];
    if (valid_request_id(sl_http_req_str(r, h->value_off), h->value_len)) {
      memcpy(id, sl_http_req_str(r, h->value_off), h->value_len);
      id[h->value_len] = 0;
      return id;
    }
  }
  sl_worker_request_id(c->w, id);
  return id;
}

bool sl_conn_format(sl_conn_t *c, int status, const char *content_type, const char *body,
                    size_t len, const char *extra, bool keep_alive, sl_buf_t *out) {
  const char *rid = sl_conn_request_id(c);
  keep_alive = keep_alive && c->req.keep_alive && !c->w->draining;
  if (status == 204 || status == 304) len = 0; /* no body, and for 204 no Content-Length */
  sl_buf_appendf(out, "HTTP/1.1 %d %s\r\n", status, sl_http_status_reason(status));
  if (status != 204) sl_buf_appendf(out, "Content-Type: %s\r\nContent-Length: %zu\r\n", content_type, len);
  sl_buf_appendf(out,
                 "x-request-id: %s\r\n%s%s\r\n",
                 rid, extra ? extra : "",
                 !keep_alive ? "Connection: close\r\n"
                 : c->req.http_minor == 0 && c->req.http_major == 1 ? "Connection: keep-alive\r\n"
                 : "");
  if (c->req.method != HTTP_HEAD) sl_buf_append(out, body, len);
  return keep_alive;
}

void sl_conn_send_formatted(sl_conn_t *c, int status, sl_buf_t *out, bool keep_alive) {
  if (c->closing) return;
  if (!c->admin) c->w->stats.responses[status / 100 < 6 ? status / 100 : 0]++;
  sl_conn_write(c, out->data, out->len);
  sl_conn_response_done(c, keep_alive);
}

void sl_conn_send(sl_conn_t *c, int status, const char *content_type, const char *body,
                  size_t len, const char *extra, bool keep_alive) {
  if (c->closing) return;
  sl_buf_t out;
  sl_buf_init(&out);
  keep_alive = sl_conn_format(c, status, content_type, body, len, extra, keep_alive, &out);
  sl_conn_send_formatted(c, status, &out, keep_alive);
  sl_buf_free(&out);
}

bool sl_conn_format_error(sl_conn_t *c, int status, const char *type, const char *msg,
                          const char *extra, bool keep_alive, sl_buf_t *out) {
  const char *rid = sl_conn_request_id(c);
  sl_buf_t body;
  sl_buf_init(&body);
  sl_buf_appends(&body, "{\"error\":{\"type\":\"");
  sl_buf_append_json_str(&body, type, strlen(type));
  sl_buf_appends(&body, "\",\"message\":\"");
  sl_buf_append_json_str(&body, msg, strlen(msg));
  sl_buf_appends(&body, "\",\"request_id\":\"");
  sl_buf_append_json_str(&body, rid, strlen(rid));
  sl_buf_appends(&body, "\"}}\n");
  keep_alive = sl_conn_format(c, status, "application/json", body.data, body.len, extra, keep_alive, out);
  sl_buf_free(&body);
  return keep_alive;
}

void sl_conn_send_error(sl_conn_t *c, int status, const char *type, const char *msg,
                        const char *extra, bool keep_alive) {
  if (c->closing) return;
  sl_buf_t out;
  sl_buf_init(&out);
  keep_alive = sl_conn_format_error(c, status, type, msg, extra, keep_alive, &out);
  sl_conn_send_formatted(c, status, &out, keep_alive);
  sl_buf_free(&out);
}

/* Accepting -------------------------------------------------------------------------------- */

static void on_connection(uv_stream_t *server, int status) {
  sl_listener_t *l = server->data;
  sl_worker_t *w = l->w;
  if (status < 0) {
    SL_WARN("accept: %s", uv_strerror(status));
    return;
  }
  sl_conn_t *c = sl_calloc(1, sizeof(*c));
  c->w = w;
  c->admin = l->admin;
  if (l->tls_ctx) c->tls = sl_tls_server_new(l->tls_ctx);
  uv_tcp_init(w->loop, &c->tcp);
  uv_timer_init(w->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  sl_list_insert_tail(&w->conns, &c->link);
  w->nconns++;
  c->serial = ++w->next_conn_serial;
  uv_timer_init(w->loop, &c->xtimer);
  sl_list_init(&c->idle_link);
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    sl_conn_close(c);
    return;
  }
  w->stats.accepted++;
  uv_tcp_nodelay(&c->tcp, 1);
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
    if (ss.ss_family == AF_INET6)
      uv_ip6_name((struct sockaddr_in6 *)&ss, c->peer, sizeof(c->peer));
    else
      uv_ip4_name((struct sockaddr_in *)&ss, c->peer, sizeof(c->peer));
  }
  const sl_config_t *cfg = cur_cfg(c);
  sl_http_req_init(&c->req);
  c->limits = cfg->limits;
  sl_h1_parser_init(&c->h1, &c->req, &c->limits);
  c->state = SL_CONN_IDLE;
  arm(c, cfg->header_timeout_ms);
  start_reading(c);
}

static int listen_one(sl_worker_t *w, const sl_listen_conf_t *lc, uint16_t port, bool admin,
                      bool reuseport, char *err, size_t errlen) {
  struct sockaddr_storage ss;
  bool v6 = strchr(lc->host, ':') != NULL;
  int rc = v6 ? uv_ip6_addr(lc->host, port, (struct sockaddr_in6 *)&ss)
              : uv_ip4_addr(lc->host, port, (struct sockaddr_in *)&ss);
  if (rc != 0) {
    snprintf(err, errlen, "listen on %s: invalid address", lc->addr);
    return rc;
  }
  sl_listener_t *l = &w->listeners[w->nlisteners++];
  l->w = w;
  l->admin = admin;
  uv_tcp_init_ex(w->loop, &l->tcp, v6 ? AF_INET6 : AF_INET);
  l->tcp.data = l;
  if (reuseport) { /* every worker listens on the address; the kernel spreads connections */
    uv_os_fd_t fd;
    int one = 1;
    if (uv_fileno((uv_handle_t *)&l->tcp, &fd) == 0)
      setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
  }
  rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&ss, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&l->tcp, 1024, on_connection);
  if (rc != 0) {
    snprintf(err, errlen, "listen on %s%s: %s", admin ? "admin address " : "", lc->addr,
             uv_strerror(rc));
    return rc;
  }
  struct sockaddr_storage bound;
  int blen = sizeof(bound);
  char name[64] = "?";
  if (uv_tcp_getsockname(&l->tcp, (struct sockaddr *)&bound, &blen) == 0) {
    if (bound.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&bound, name, sizeof(name));
      port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    } else {
      uv_ip4_name((struct sockaddr_in *)&bound, name, sizeof(name));
      port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    }
  }
  if (admin) {
    w->admin_port = port;
    SL_INFO("admin listening on %s:%u", name, port);
  } else {
    if (w->nlisteners == 1) w->bound_port = port;
    if (w->index == 0) SL_INFO("listening on %s:%u", name, port);
    else SL_DEBUG("worker %u listening on %s:%u", w->index, name, port);
  }
  return 0;
}

static int load_tls(sl_worker_t *w, const sl_config_t *cfg, bool initial, char *err,
                    size_t errlen) {
  uint32_t n = SL_MIN(cfg->nlisten, w->nlisteners);
  SSL_CTX *fresh[64] = {0};
  bool keep[64] = {0};
  if (n > SL_ARRAY_SIZE(fresh)) n = SL_ARRAY_SIZE(fresh);
  for (uint32_t i = 0; i < n; i++) {
    const sl_listen_conf_t *lc = &cfg->listen[i];
    if (w->listeners[i].admin) continue;
    if (!initial && (lc->tls_cert != NULL) != (w->listeners[i].tls_ctx != NULL)) {
      /* Turning TLS on or off changes what a port speaks: like any listen change, it waits
       * for a restart (the gateway warns). */
      keep[i] = true;
      continue;
    }
    if (!lc->tls_cert) continue;
    char e[512];
    fresh[i] = sl_tls_server_ctx(lc->tls_cert, lc->tls_key, e, sizeof(e));
    if (!fresh[i]) {
      for (uint32_t j = 0; j < i; j++)
        if (fresh[j]) SSL_CTX_free(fresh[j]);
      char path[64];
      snprintf(path, sizeof(path), "listen[%u].tls", i + 1);
      sl_config_error(w->L, cfg, path, e, err, errlen);
      return -1;
    }
  }
  for (uint32_t i = 0; i < n; i++) {
    sl_listener_t *l = &w->listeners[i];
    if (l->admin || keep[i]) continue;
    if (l->tls_ctx) SSL_CTX_free(l->tls_ctx); /* open connections hold their own reference */
    l->tls_ctx = fresh[i];
  }
  return 0;
}

int sl_server_load_tls(sl_worker_t *w, const sl_config_t *cfg, char *err, size_t errlen) {
  return load_tls(w, cfg, false, err, errlen);
}

int sl_server_listen(sl_worker_t *w, const sl_config_t *cfg, const uint16_t *ports, bool admin,
                     char *err, size_t errlen) {
  w->listeners = sl_calloc(cfg->nlisten + 1, sizeof(sl_listener_t));
  bool reuseport = cfg->workers != 1;
  for (uint32_t i = 0; i < cfg->nlisten; i++) {
    uint16_t port = ports ? ports[i] : cfg->listen[i].port;
    int rc = listen_one(w, &cfg->listen[i], port, false, reuseport, err, errlen);
    if (rc != 0) return rc;
  }
  if (load_tls(w, cfg, true, err, errlen) != 0) return UV_EINVAL;
  if (admin && cfg->admin.addr) return listen_one(w, &cfg->admin, cfg->admin.port, true, false, err, errlen);
  return 0;
}

uint16_t sl_server_listener_port(const sl_worker_t *w, uint32_t i) {
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  if (i >= w->nlisteners || uv_tcp_getsockname(&w->listeners[i].tcp, (struct sockaddr *)&ss, &len))
    return 0;
  return ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                        : ((struct sockaddr_in *)&ss)->sin_port);
}

static void on_listener_closed(uv_handle_t *h) {
  sl_listener_t *l = h->data;
  if (l->tls_ctx) SSL_CTX_free(l->tls_ctx);
  l->tls_ctx = NULL;
  sl_worker_t *w = l->w;
  if (--w->nlisteners == 0) {
    free(w->listeners);
    w->listeners = NULL;
  }
}

void sl_server_drain(sl_worker_t *w) {
  for (uint32_t i = 0; w->listeners && i < w->nlisteners; i++)
    sl_close_handle((uv_handle_t *)&w->listeners[i].tcp, on_listener_closed);
  sl_list_t *l = w->conns.next;
  while (l != &w->conns) {
    sl_conn_t *c = SL_CONTAINER_OF(l, sl_conn_t, link);
    l = l->next;
    if (c->state == SL_CONN_IDLE && c->in.len == 0)
      sl_conn_close(c);
    else if (c->state == SL_CONN_WS && c->x && c->x->ws)
      sl_ws_shutdown(c->x->ws); /* sessions last minutes: close them now, properly */
  }
}

void sl_server_close_all(sl_worker_t *w) {
  while (!sl_list_empty(&w->conns)) sl_conn_close(SL_CONTAINER_OF(w->conns.next, sl_conn_t, link));
}

uint32_t sl_server_client_hwm(void) { return SL_CLIENT_HWM; }

sl_conn_t *sl_server_find_conn(sl_worker_t *w, uint64_t serial) {
  for (sl_list_t *l = w->conns.next; l != &w->conns; l = l->next) {
    sl_conn_t *c = SL_CONTAINER_OF(l, sl_conn_t, link);
    if (c->serial == serial) return c->closing ? NULL : c;
  }
  return NULL;
}
