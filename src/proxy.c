#include "proxy.h"

#include "admission.h"
#include "cache_flow.h"
#include "forward.h"
#include "log.h"
#include "policy.h"
#include "route.h"
#include "server.h"
#include "telemetry.h"
#include "upstream.h"
#include "ws.h"

#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static const llhttp_settings_t resp_settings;
static const sl_upconn_ops_t up_ops;
static void dispatch(sl_exchange_t *x);
static void on_timer(uv_timer_t *t);

void sl_proxy_init(sl_exchange_t *x, sl_conn_t *c) {
  memset(x, 0, sizeof(*x));
  x->conn = c;
  sl_list_init(&x->qlink);
  sl_list_init(&x->cwait);
  x->timer = &c->xtimer;
  c->xtimer.data = x;
}

void sl_proxy_free(sl_exchange_t *x) {
  sl_buf_free(&x->upreq);
  sl_buf_free(&x->out);
  sl_buf_free(&x->rstr);
  free(x->rhdr);
  x->rhdr = NULL;
  x->nrhdr = x->rhdr_cap = 0;
}

static sl_worker_t *W(const sl_exchange_t *x) { return x->conn->w; }

static sl_outcome_t outcome(const sl_exchange_t *x, const char *kind, int status) {
  sl_outcome_t o = {.kind = kind, .status = status, .retry_after_ms = -1, .ttfb_ms = -1};
  if (x->got_bytes) o.ttfb_ms = (double)(x->first_byte_ms - x->attempt_ms);
  return o;
}

/* Bookkeeping ------------------------------------------------------------------------------ */

/* Ends the current attempt: its slot goes back and the breaker hears the outcome (o == NULL:
 * cancelled by the client, which says nothing about the endpoint). */
static void end_attempt(sl_exchange_t *x, const sl_outcome_t *o) {
  if (!x->ep) return;
  sl_endpoint_t *ep = x->ep;
  if (x->connecting) {
    ep->view.queued--;
    x->connecting = false;
  }
  x->ep = NULL;
  if (o) {
    sl_admission_release(W(x), x->pool, x->ep_idx, x->probe, o);
  } else {
    ep->view.inflight--;
    if (x->probe && ep->probes) ep->probes--;
    sl_endpoint_update(ep);
    sl_admission_wake(W(x));
  }
  x->probe = false;
}

static void set_pool(sl_exchange_t *x, sl_pool_t *pool) {
  if (x->pool) {
    x->pool->view.active--;
    if (x->retrying) x->pool->view.retrying--;
  }
  x->pool = pool;
  if (pool) {
    pool->view.active++;
    if (x->retrying) pool->view.retrying++;
  }
}

/* From the moment a retry is decided, so requests in backoff count against the budget. */
static void mark_retrying(sl_exchange_t *x) {
  if (x->retrying) return;
  x->retrying = true;
  x->pool->view.retrying++;
}

static void end_exchange(sl_exchange_t *x) {
  sl_cache_flow_end(x);
  if (x->edits.n || x->edits.path) sl_hedits_clear(&x->edits);
  uv_timer_stop(x->timer);
  set_pool(x, NULL);
  x->retrying = false;
  if (x->gen) sl_gen_unref(x->gen);
  x->gen = NULL;
  x->active = false;
  x->up = NULL;
  x->phase = SL_X_IDLE;
}

/* Ends the exchange with a response the gateway formatted itself (an error, a hook's direct
 * answer): counted and logged, then sent; frees `out`. */
static void send_local(sl_exchange_t *x, int status, sl_buf_t *out, bool keep) {
  sl_conn_t *c = x->conn;
  x->bytes_out += out->len;
  sl_telemetry_request_done(x, status);
  end_exchange(x);
  sl_conn_send_formatted(c, status, out, keep);
  sl_buf_free(out);
}

/* A policy hook failed: counted (worker stats and its policy's error series) and logged. */
static void policy_failed(sl_exchange_t *x, sl_mseries_t *series, const char *what,
                          const char *err) {
  W(x)->stats.policy_errors++;
  sl_telemetry_policy_error(series);
  SL_ERROR("policy error (route %s, %s): %s", x->route->path, what, err);
}

/* Ends the exchange with an error: a JSON error response when nothing was sent yet, otherwise
 * the client connection is cut (a truncated response must not look complete). The attempt must
 * already be over. */
static void respond_error(sl_exchange_t *x, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void respond_error(sl_exchange_t *x, int status, const char *type, const char *fmt, ...) {
  char msg[600];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  sl_conn_t *c = x->conn;
  bool sent = x->head_sent;
  SL_INFO("request %s: %s: %s", x->request_id, type, msg);
  if (sent) {
    sl_telemetry_request_done(x, x->status);
    end_exchange(x);
    sl_conn_close(c);
    return;
  }
  const char *extra = status == 503 ? "Retry-After: 1\r\n" : NULL;
  sl_buf_t out;
  sl_buf_init(&out);
  bool keep = sl_conn_format_error(c, status, type, msg, extra, true, &out);
  send_local(x, status, &out, keep);
}

/* Retries -------------------------------------------------------------------------------- */

/* Whether the pool's config lets this outcome be retried at all; the retry policy then decides
 * whether and when. `note` explains a refusal worth telling the client about. */
static bool may_retry(const sl_exchange_t *x, const sl_outcome_t *o, char *note, size_t nlen) {
  const sl_pool_conf_t *pc = x->pool->conf;
  if (x->pool->lua_decide == LUA_NOREF || x->head_sent || x->attempts >= SL_MAX_TRIED) return false;
  bool listed = false;
  if (!strcmp(o->kind, "response")) listed = sl_pool_conf_retries_status(pc, o->status);
  else if (!strcmp(o->kind, "connect_error")) listed = pc->retry_kinds & SL_RETRY_CONNECT_ERROR;
  else if (!strcmp(o->kind, "connect_timeout")) listed = pc->retry_kinds & SL_RETRY_CONNECT_TIMEOUT;
  else if (!strcmp(o->kind, "reset")) listed = pc->retry_kinds & SL_RETRY_RESET;
  else if (!strcmp(o->kind, "timeout")) listed = pc->retry_kinds & SL_RETRY_TIMEOUT;
  if (!listed) return false;
  size_t body = x->conn->req.body.len;
  if (body > pc->retry_max_body_bytes) {
    snprintf(note, nlen, " (not retried: the request body of %zu bytes exceeds retry.max_body_bytes)",
             body);
    return false;
  }
  return true;
}

/* Returns the delay before the next attempt, or -1 to stop. */
static int64_t ask_retry(sl_exchange_t *x, const sl_outcome_t *o) {
  char err[512];
  int64_t delay = -1;
  if (sl_policy_decide(W(x), x->pool, &x->conn->req, x->request_id, x->attempts, o, &delay, err,
                       sizeof(err)) != 0) {
    W(x)->stats.policy_errors++;
    sl_telemetry_policy_error(x->pool->m->policy_retry);
    SL_ERROR("policy error (pool %s retry): %s", x->pool->conf->name, err);
    return -1;
  }
  return delay;
}

/* An attempt failed. Retries when allowed (decided_delay >= 0: already decided; -2: ask the
 * policy), otherwise answers with the error. */
static void attempt_failed(sl_exchange_t *x, const sl_outcome_t *o, int64_t decided_delay,
                           int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static void attempt_failed(sl_exchange_t *x, const sl_outcome_t *o, int64_t decided_delay,
                           int status, const char *type, const char *fmt, ...) {
  char msg[400], note[160] = "";
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (x->up) {
    sl_upconn_close(x->up);
    x->up = NULL;
  }
  sl_cache_flow_attempt_failed(x);
  const char *url = x->ep ? x->ep->url : "?";
  end_attempt(x, o);
  int64_t delay = decided_delay;
  if (delay == -2 && may_retry(x, o, note, sizeof(note))) {
    delay = ask_retry(x, o);
    if (delay < 0)
      snprintf(note, sizeof(note), " (not retried: the retry policy declined — attempts or retry "
                                   "budget used up)");
  }
  if (delay >= 0) {
    mark_retrying(x);
    SL_INFO("request %s: attempt %u on %s failed (%s); retrying in %lld ms", x->request_id,
            x->attempts, url, msg, (long long)delay);
    x->phase = SL_X_BACKOFF;
    uv_timer_start(x->timer, on_timer, (uint64_t)delay, 0);
    return;
  }
  if (x->attempts > 1)
    respond_error(x, status, type, "%s (after %u attempts)%s", msg, x->attempts, note);
  else
    respond_error(x, status, type, "%s%s", msg, note);
}

/* Deadlines ------------------------------------------------------------------------------ */

static void arm_deadline(sl_exchange_t *x) {
  const sl_pool_conf_t *pc = x->pool->conf;
  uint64_t now = sl_worker_now(W(x));
  uint64_t due = UINT64_MAX;
  if (!x->got_bytes) {
    uint32_t per_try = pc->retry_per_try_timeout_ms && x->pool->lua_decide != LUA_NOREF
                           ? SL_MIN(pc->retry_per_try_timeout_ms, pc->first_byte_timeout_ms)
                           : pc->first_byte_timeout_ms;
    due = now + per_try;
  }
  if (pc->total_timeout_ms) due = SL_MIN(due, x->start_ms + pc->total_timeout_ms);
  if (due == UINT64_MAX) {
    uv_timer_stop(x->timer);
    return;
  }
  uv_timer_start(x->timer, on_timer, due > now ? due - now : 0, 0);
}

static void on_upstream_deadline(sl_exchange_t *x) {
  sl_worker_t *w = W(x);
  w->stats.upstream_timeouts++;
  if (x->ep) sl_m_inc(x->pool->m->eps[x->ep_idx].timeouts, 1);
  const sl_pool_conf_t *pc = x->pool->conf;
  uint64_t now = sl_worker_now(w);
  const char *url = x->ep ? x->ep->url : "upstream";
  sl_outcome_t o = outcome(x, "timeout", 0);
  if (pc->total_timeout_ms && now >= x->start_ms + pc->total_timeout_ms) {
    attempt_failed(x, &o, -1, 504, "upstream_timeout", "gave up waiting for %s (total timeout %u ms)",
                   url, pc->total_timeout_ms);
    return;
  }
  attempt_failed(x, &o, -2, 504, "upstream_timeout", "no response from %s within %u ms", url,
                 (unsigned)(now - x->attempt_ms));
}

/* The first time a request leaves the admission queue (admitted or timed out). */
static void observe_queue_wait(sl_exchange_t *x) {
  if (x->queue_wait_ms >= 0) return;
  x->queue_wait_ms = (int32_t)(sl_worker_now(W(x)) - x->queued_ms);
  sl_m_observe(x->pool->m->queue_wait, (double)x->queue_wait_ms / 1000.0);
}

static void on_timer(uv_timer_t *t) {
  sl_exchange_t *x = t->data;
  if (!x->active) return;
  switch (x->phase) {
  case SL_X_QUEUED:
    sl_admission_dequeue(x->pool, x);
    observe_queue_wait(x);
    sl_m_inc(x->pool->m->queue_timeouts, 1);
    respond_error(x, 503, "queue_timeout",
                  "no endpoint of pool %s became free within %u ms (queue wait timeout)",
                  x->pool->conf->name, x->pool->conf->queue_timeout_ms);
    break;
  case SL_X_BACKOFF:
    dispatch(x);
    break;
  case SL_X_UPSTREAM:
    on_upstream_deadline(x);
    break;
  case SL_X_COALESCED:
    sl_cache_flow_wait_expired(x);
    break;
  default:
    break;
  }
}

/* Upstream connection events --------------------------------------------------------------- */

static void send_request(sl_exchange_t *x) {
  if (x->connecting) {
    x->ep->view.queued--;
    x->connecting = false;
  }
  x->got_bytes = x->message_done = x->skip_message = x->status_retry = x->hook_failed = false;
  x->rerror = NULL;
  x->nrhdr = 0;
  x->rstr.len = 0;
  x->rfield = 0;
  llhttp_init(&x->rp, HTTP_RESPONSE, &resp_settings);
  x->rp.data = x;
  arm_deadline(x);
  int rc = sl_upconn_write(x->up, x->upreq.data, x->upreq.len);
  if (rc < 0) {
    sl_outcome_t o = outcome(x, "reset", 0);
    attempt_failed(x, &o, -2, 502, "upstream_reset", "writing to %s failed: %s", x->ep->url,
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
  W(x)->stats.upstream_connect_errors++;
  sl_m_inc(x->pool->m->eps[x->ep_idx].connect_errors, 1);
  if (status == UV_ETIMEDOUT) {
    sl_outcome_t o = outcome(x, "connect_timeout", 0);
    attempt_failed(x, &o, -2, 504, "upstream_connect_timeout",
                   "connecting to %s timed out after %u ms", x->ep->url,
                   x->pool->conf->connect_timeout_ms);
  } else if (status == UV_EPROTO) {
    sl_outcome_t o = outcome(x, "connect_error", 0);
    attempt_failed(x, &o, -2, 502, "upstream_tls_failed", "TLS handshake with %s failed: %s",
                   x->ep->url, sl_upconn_tls_error(u));
  } else {
    sl_outcome_t o = outcome(x, "connect_error", 0);
    attempt_failed(x, &o, -2, 502, "upstream_connect_failed", "connecting to %s failed: %s",
                   x->ep->url, uv_strerror(status));
  }
}

static void flush_out(sl_exchange_t *x) {
  if (!x->out.len) return;
  x->bytes_out += x->out.len;
  sl_conn_write(x->conn, x->out.data, x->out.len);
  x->out.len = 0;
}

/* The response is complete: reuse the upstream connection and let the client connection move
 * on to its next request. */
static void complete(sl_exchange_t *x) {
  sl_conn_t *c = x->conn;
  sl_upconn_release(x->up, x->up_keep);
  x->up = NULL;
  sl_outcome_t o = outcome(x, "response", x->status);
  end_attempt(x, &o);
  c->w->stats.responses[x->status / 100 < 6 ? x->status / 100 : 0]++;
  bool keep = c->req.keep_alive && !x->out_close;
  sl_telemetry_request_done(x, x->status);
  sl_cache_flow_complete(x);
  end_exchange(x);
  sl_conn_response_done(c, keep);
}

/* Idempotent methods (RFC 9110 9.2.2), or a request carrying an idempotency key. */
static bool replayable(const sl_http_req_t *r) {
  switch (r->method) {
  case HTTP_GET: case HTTP_HEAD: case HTTP_OPTIONS: case HTTP_TRACE: case HTTP_PUT:
  case HTTP_DELETE:
    return true;
  default:
    return sl_http_req_find(r, "idempotency-key") >= 0;
  }
}

static void on_up_eof(sl_exchange_t *x, sl_upconn_t *u, ssize_t n) {
  if (x->got_bytes && !x->message_done && n == UV_EOF) {
    /* close-delimited bodies end here, at a clean end only: a broken TLS record or a TLS
     * connection cut without close_notify leaves the body truncated */
    llhttp_errno_t e = llhttp_finish(&x->rp);
    flush_out(x);
    if (x->conn->closing) return;
    if ((e == HPE_OK || e == HPE_PAUSED) && x->message_done) {
      x->up_keep = false;
      complete(x);
      return;
    }
  }
  if (!x->got_bytes && x->reused && !x->stale_retried && replayable(&x->conn->req)) {
    /* A pooled connection the upstream had closed: nothing was answered, so the request is
     * re-sent once on a fresh connection to the same endpoint (not another pooled one: it
     * idled as long and is as likely closed). Only when a second delivery is harmless: the
     * upstream may have acted on the request before closing. */
    x->stale_retried = true;
    sl_upconn_close(u);
    x->reused = false;
    x->connecting = true;
    x->ep->view.queued++;
    int err = 0;
    x->up = sl_upconn_connect(x->ep, x->pool->conf->connect_timeout_ms, &up_ops, x, &err);
    if (!x->up) {
      sl_outcome_t o = outcome(x, "connect_error", 0);
      attempt_failed(x, &o, -2, 502, "upstream_connect_failed", "connecting to %s failed: %s",
                     x->ep->url, uv_strerror(err));
    }
    return;
  }
  sl_outcome_t o = outcome(x, "reset", 0);
  attempt_failed(x, &o, -2, 502, "upstream_reset",
                 "%s closed the connection before a complete response (%s)", x->ep->url,
                 n == UV_EOF            ? "EOF"
                 : n == UV_ECONNABORTED ? "TLS connection ended without close_notify"
                 : n == UV_EPROTO       ? "broken TLS record"
                                        : uv_strerror((int)n));
}


/* The upstream answered the upgrade: switch both connections to the WebSocket session, or
 * treat a refusal like any failed attempt (retry, fallback, then a JSON error, never a 101
 * followed by a close). */
static void ws_handshake_done(sl_exchange_t *x, const char *data, ssize_t n) {
  const char *url = x->ep->url;
  if (!x->ws_ready) {
    sl_outcome_t o = outcome(x, x->ws_refused ? "response" : "reset", x->ws_refused ? x->status : 0);
    int status = x->status;
    bool refused = x->ws_refused;
    x->ws_refused = x->ws_bad_accept = false;
    if (refused)
      attempt_failed(x, &o, -2, 502, "upstream_handshake_failed",
                     "%s refused the WebSocket handshake with status %d", url, status);
    else
      attempt_failed(x, &o, -2, 502, "upstream_handshake_failed",
                     "%s answered 101 without a valid Sec-WebSocket-Accept", url);
    return;
  }
  size_t acc_len = 0, proto_len = 0;
  const char *acc = sl_proxy_response_header(x, "sec-websocket-accept", &acc_len);
  const char *proto = sl_proxy_response_header(x, "sec-websocket-protocol", &proto_len);
  char accept[29];
  memcpy(accept, acc, 28);
  accept[28] = 0;
  const char *pos = llhttp_get_error_pos(&x->rp);
  size_t early = pos ? (size_t)(data + n - pos) : 0;
  uv_timer_stop(x->timer); /* no first-byte or total deadline for a session */
  x->head_sent = true;      /* from here on, failures close the session instead */
  sl_conn_t *c = x->conn;
  c->state = SL_CONN_WS;
  sl_route_pool_m_t *rm = sl_telemetry_route_pool(x);
  sl_telemetry_count(x, 101);
  if (rm->ws_total) sl_m_inc(rm->ws_total, 1);
  if (rm->ws_open) sl_m_inc(rm->ws_open, 1);
  if (sl_ws_start(x, accept, proto, proto ? proto_len : 0, pos, early) != 0) {
    if (rm->ws_open) sl_m_inc(rm->ws_open, -1);
    c->state = SL_CONN_BUSY;
    sl_outcome_t o = outcome(x, "reset", 0);
    attempt_failed(x, &o, -1, 502, "upstream_handshake_failed", "could not start the session");
  }
}

void sl_proxy_ws_end(sl_exchange_t *x, bool client_alive, bool upstream_ok) {
  sl_conn_t *c = x->conn;
  sl_ws_t *ws = x->ws;
  x->ws = NULL;
  if (x->up) {
    sl_upconn_close(x->up);
    x->up = NULL;
  }
  sl_outcome_t o = outcome(x, upstream_ok ? "response" : "reset", upstream_ok ? 101 : 0);
  end_attempt(x, &o);
  x->bytes_out = sl_ws_bytes_to_client(ws);
  sl_telemetry_log(x, 101);
  sl_route_pool_m_t *rm = sl_telemetry_route_pool(x);
  if (rm->ws_open) sl_m_inc(rm->ws_open, -1);
  end_exchange(x);
  sl_ws_free(ws); /* deferred while the session's own callbacks run */
  if (client_alive) {
    c->state = SL_CONN_BUSY;
    sl_conn_response_done(c, false);
  } else {
    sl_conn_close(c);
  }
}

static void on_up_read(void *ctx, sl_upconn_t *u, const char *data, ssize_t n) {
  sl_exchange_t *x = ctx;
  if (n < 0) {
    on_up_eof(x, u, n);
    return;
  }
  if (!x->got_bytes) {
    x->got_bytes = true;
    x->first_byte_ms = sl_worker_now(W(x));
    sl_endpoint_record_ttfb(x->ep, (double)(x->first_byte_ms - x->attempt_ms));
    x->ttfb_ms = (int32_t)(x->first_byte_ms - x->attempt_ms);
    sl_m_observe(x->pool->m->eps[x->ep_idx].ttfb, (double)x->ttfb_ms / 1000.0);
    arm_deadline(x);
  }
  llhttp_errno_t e = llhttp_execute(&x->rp, data, (size_t)n);
  if (x->ws_ready || x->ws_refused || x->ws_bad_accept) {
    ws_handshake_done(x, data, n);
    return;
  }
  if (x->status_retry) {
    sl_outcome_t o = outcome(x, "response", x->status);
    attempt_failed(x, &o, x->retry_delay_ms, 502, "upstream_error", "%s answered %d", x->ep->url,
                   x->status);
    return;
  }
  if (x->hook_failed) { /* the upstream did its part; the rest of its response is dropped */
    x->out.len = 0;
    sl_upconn_close(x->up);
    x->up = NULL;
    sl_outcome_t o = outcome(x, "response", x->status);
    end_attempt(x, &o);
    respond_error(x, 500, "policy_error", "the route policy of %s failed; see the gateway log",
                  x->route->path);
    return;
  }
  flush_out(x);
  if (x->conn->closing) return; /* client write failed: the abort already cleaned up */
  if (e == HPE_PAUSED && x->message_done) {
    /* Bytes after a complete response are a protocol error: do not reuse the connection. */
    if (llhttp_get_error_pos(&x->rp) != data + n) x->up_keep = false;
    complete(x);
    return;
  }
  if (e != HPE_OK) {
    sl_outcome_t o = outcome(x, "reset", 0);
    attempt_failed(x, &o, -2, 502, "upstream_protocol_error", "invalid response from %s: %s",
                   x->ep->url, x->rerror ? x->rerror : llhttp_get_error_reason(&x->rp));
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
#define SL_MAX_RESPONSE_HEADER_BYTES (256 * 1024)

static int head_too_big(sl_exchange_t *x) {
  x->rerror = "response header section over 256 KiB";
  return -1;
}

/* Header callbacks after the head are the trailer fields of a chunked body: neither stored
 * nor relayed (the relayed body ends with an empty trailer section). */
static int r_field(llhttp_t *p, const char *at, size_t len) {
  sl_exchange_t *x = X(p);
  if (x->head_sent) return 0;
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
  if (x->rstr.len + len > SL_MAX_RESPONSE_HEADER_BYTES) return head_too_big(x);
  sl_buf_append(&x->rstr, at, len);
  return 0;
}

/* llhttp reports an empty field name (": b") as a complete empty name. */
static int r_field_complete(llhttp_t *p) {
  sl_exchange_t *x = X(p);
  if (x->head_sent) return 0;
  if (x->rfield != 1 || x->rstr.len == x->rhdr[4 * (x->nrhdr - 1)]) {
    x->rerror = "empty header name";
    return -1;
  }
  return 0;
}

static int r_value(llhttp_t *p, const char *at, size_t len) {
  sl_exchange_t *x = X(p);
  if (x->head_sent) return 0;
  if (x->rfield == 0) { /* a value with no name before it (": b") */
    x->rerror = "empty header name";
    return -1;
  }
  uint32_t *h = &x->rhdr[4 * (x->nrhdr - 1)];
  if (x->rfield != 2) {
    h[1] = (uint32_t)x->rstr.len - h[0];
    h[2] = (uint32_t)x->rstr.len;
    x->rfield = 2;
  }
  if (x->rstr.len + len > SL_MAX_RESPONSE_HEADER_BYTES) return head_too_big(x);
  sl_buf_append(&x->rstr, at, len);
  return 0;
}

static int r_value_complete(llhttp_t *p) {
  sl_exchange_t *x = X(p);
  if (x->head_sent) return 0;
  if (x->rfield == 0) { /* an empty value with no name before it (":") */
    x->rerror = "empty header name";
    return -1;
  }
  uint32_t *h = &x->rhdr[4 * (x->nrhdr - 1)];
  if (x->rfield != 2) {
    h[1] = (uint32_t)x->rstr.len - h[0];
    h[2] = (uint32_t)x->rstr.len;
  }
  h[3] = (uint32_t)x->rstr.len - h[2];
  x->rfield = 0;
  return 0;
}

/* Finds a response header value; NULL when absent. */
const char *sl_proxy_response_header(const sl_exchange_t *x, const char *name, size_t *len) {
  for (uint32_t i = 0; i < x->nrhdr; i++) {
    const uint32_t *h = &x->rhdr[4 * i];
    if (sl_strieq(x->rstr.data + h[0], h[1], name)) {
      *len = h[3];
      return x->rstr.data + h[2];
    }
  }
  return NULL;
}

static double parse_number(const char *s, size_t len, double fallback) {
  char tmp[32];
  if (!s || len == 0 || len >= sizeof(tmp)) return fallback;
  memcpy(tmp, s, len);
  tmp[len] = 0;
  char *end;
  double v = strtod(tmp, &end);
  return end != tmp && *end == 0 && v >= 0 ? v : fallback;
}

/* A retryable status: asks the retry policy now, before anything reaches the client. */
static bool retry_on_status(sl_exchange_t *x, int status) {
  char note[160];
  sl_outcome_t o = outcome(x, "response", status);
  size_t len = 0;
  const char *ra = sl_proxy_response_header(x, "retry-after", &len);
  double secs = parse_number(ra, len, -1);
  if (secs >= 0) o.retry_after_ms = (int64_t)(secs * 1000);
  if (!may_retry(x, &o, note, sizeof(note))) return false;
  int64_t delay = ask_retry(x, &o);
  if (delay < 0) return false;
  mark_retrying(x);
  x->status_retry = true;
  x->retry_delay_ms = delay;
  return true;
}

/* The upstream's answer to a WebSocket upgrade: parsing stops after the head either way (what
 * follows a 101 is frames; a refusal's body is dropped with its connection). */
static int ws_handshake_head(sl_exchange_t *x, int status) {
  if (status != 101) {
    x->ws_refused = true;
    return HPE_PAUSED;
  }
  const sl_http_req_t *r = &x->conn->req;
  int k = sl_http_req_find(r, "sec-websocket-key");
  char want[29];
  sl_ws_accept_key(sl_http_req_str(r, r->headers[k].value_off), r->headers[k].value_len, want);
  size_t len = 0;
  const char *acc = sl_proxy_response_header(x, "sec-websocket-accept", &len);
  if (acc && len == 28 && memcmp(acc, want, 28) == 0)
    x->ws_ready = true;
  else
    x->ws_bad_accept = true;
  return HPE_PAUSED;
}

/* The route's on_response. False when it failed (logged, counted; the exchange answers 500). */
static bool run_on_response(sl_exchange_t *x, sl_hedits_t *edits) {
  char err[512];
  if (sl_policy_on_response(W(x), x, edits, err, sizeof(err)) == 0) return true;
  sl_hedits_clear(edits);
  policy_failed(x, sl_route_hook(x->gen, x->route)->errors, "on_response", err);
  x->hook_failed = true;
  return false;
}

static int r_headers_complete(llhttp_t *p) {
  sl_exchange_t *x = X(p);
  sl_conn_t *c = x->conn;
  int status = p->status_code;
  if (status < 100 || status > 599) { /* llhttp takes "20", "0" and the like */
    x->rerror = "invalid status code";
    return -1;
  }
  if (status < 200 && status != 101) {
    x->skip_message = true; /* interim response: the final one follows */
    return 1;               /* never a body, whatever its headers say */
  }
  x->status = (uint16_t)status;
  if (x->ws_upgrade) return ws_handshake_head(x, status);
  if (status == 101) { /* the connection now speaks something else: never relay or reuse it */
    x->rerror = "101 Switching Protocols to a request that asked for no upgrade";
    return -1;
  }
  /* Decided here: after message completion llhttp has reset the flags it is computed from. */
  x->up_keep = llhttp_should_keep_alive(p);
  /* One pass for the headers the gateway acts on. */
  const char *conn_tokens = NULL;
  size_t conn_len = 0;
  sl_buf_t conn_all; /* the tokens of every Connection header, when there are several */
  sl_buf_init(&conn_all);
  sl_hedits_t redits = {0};
  unsigned te = 0;
  for (uint32_t i = 0; i < x->nrhdr; i++) {
    const uint32_t *h = &x->rhdr[4 * i];
    const char *n = x->rstr.data + h[0], *v = x->rstr.data + h[2];
    if (h[1] == 10 && sl_strieq(n, 10, "connection")) {
      if (conn_tokens && !conn_all.len) sl_buf_append(&conn_all, conn_tokens, conn_len);
      if (conn_all.len) {
        sl_buf_append(&conn_all, ", ", 2);
        sl_buf_append(&conn_all, v, h[3]);
      }
      conn_tokens = v;
      conn_len = h[3];
    } else if (h[1] == 6 && sl_strieq(n, 6, "x-load")) {
      x->ep->view.reported_load = parse_number(v, h[3], x->ep->view.reported_load);
    } else if (h[1] == 17 && sl_strieq(n, 17, "transfer-encoding")) {
      /* Transfer-Encoding is hop-by-hop and not forwarded: any coding but chunked would reach
       * the client still applied and unannounced (nginx refuses these too). */
      if (++te > 1 || !sl_strieq(v, h[3], "chunked")) {
        x->rerror = "unsupported Transfer-Encoding (only \"chunked\" is relayed)";
        sl_buf_free(&conn_all);
        return -1;
      }
    }
  }
  if (conn_all.len) {
    conn_tokens = conn_all.data;
    conn_len = conn_all.len;
  }
  /* RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; the
   * connection is closed after it. */
  if (te && p->http_major == 1 && p->http_minor == 0) x->up_keep = false;
  if ((status >= 400 && retry_on_status(x, status)) ||
      (x->route->hook && !run_on_response(x, &redits))) {
    sl_buf_free(&conn_all);
    return HPE_PAUSED;
  }

  bool no_body = x->head_request || status == 204 || status == 304;
  bool has_cl = (p->flags & F_CONTENT_LENGTH) && !(p->flags & F_CHUNKED);
  sl_buf_t *o = &x->out;
  sl_buf_appends(o, "HTTP/1.1 ");
  sl_buf_append_u64(o, (uint64_t)status);
  sl_buf_append(o, " ", 1);
  const char *reason = sl_http_status_reason(status);
  sl_buf_append2(o, reason, strlen(reason), "\r\n");
  size_t head_start = o->len;
  for (uint32_t i = 0; i < x->nrhdr; i++) {
    const uint32_t *h = &x->rhdr[4 * i];
    const char *n = x->rstr.data + h[0];
    if (sl_forward_skip_response_header(n, h[1], conn_tokens, conn_len)) continue;
    if (redits.n && sl_hedits_covers(&redits, n, h[1])) continue;
    /* On a cached route the gateway's own x-cache headers replace the upstream's. */
    if (x->cache_result != SL_CACHE_NONE && h[1] >= 7 && sl_strieq(n, 7, "x-cache") &&
        (h[1] == 7 || sl_strieq(n, h[1], "x-cache-key")))
      continue;
    sl_buf_append2(o, n, h[1], ": ");
    sl_buf_append2(o, x->rstr.data + h[2], h[3], "\r\n");
  }
  if (redits.n) {
    sl_hedits_append(&redits, o);
    sl_hedits_clear(&redits);
  }
  size_t head_end = o->len;
  if (x->cache_result != SL_CACHE_NONE) {
    /* The stored head is a copy: `o` may move as the cache appends its own lines. */
    sl_buf_t head;
    sl_buf_init(&head);
    sl_buf_append(&head, o->data + head_start, head_end - head_start);
    sl_cache_flow_head(x, status, head.data, head.len, !has_cl && !no_body, o);
    sl_buf_free(&head);
  }
  x->out_chunked = x->out_close = false;
  if (has_cl && (!no_body || x->head_request)) {
    sl_buf_appends(o, "Content-Length: ");
    sl_buf_append_u64(o, p->content_length);
    sl_buf_append(o, "\r\n", 2);
  } else if (!no_body) {
    if (c->req.http_minor >= 1) {
      sl_buf_appends(o, "Transfer-Encoding: chunked\r\n");
      x->out_chunked = true;
    } else {
      x->out_close = true; /* HTTP/1.0 client: the body ends when the connection does */
    }
  }
  sl_buf_appends(o, "x-request-id: ");
  sl_buf_append2(o, x->request_id, strlen(x->request_id), "\r\n");
  if (!c->req.keep_alive || x->out_close || c->w->draining)
    sl_buf_appends(o, "Connection: close\r\n");
  else if (c->req.http_minor == 0)
    sl_buf_appends(o, "Connection: keep-alive\r\n");
  sl_buf_append(o, "\r\n", 2);
  x->head_sent = true;
  sl_buf_free(&conn_all);
  /* 1 = no body: llhttp would otherwise read Content-Length bytes after a 204 or 304 (RFC
   * 9110 6.4.1: they have none), hanging the exchange and misframing a reused connection. */
  return no_body ? 1 : 0;
}

static int r_body(llhttp_t *p, const char *at, size_t len) {
  sl_exchange_t *x = X(p);
  if (x->centry) sl_cache_flow_body(x, at, len);
  if (x->out_chunked) {
    sl_buf_append_hex(&x->out, len);
    sl_buf_append(&x->out, "\r\n", 2);
  }
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
    .on_header_field_complete = r_field_complete,
    .on_header_value = r_value,
    .on_header_value_complete = r_value_complete,
    .on_headers_complete = r_headers_complete,
    .on_body = r_body,
    .on_message_complete = r_message_complete,
};

/* Admission and attempts ------------------------------------------------------------------- */

static void start_attempt(sl_exchange_t *x, sl_endpoint_t *ep, uint32_t idx) {
  sl_worker_t *w = W(x);
  x->attempts++;
  if (x->attempts > 1) sl_m_inc(x->pool->m->retries, 1);
  if (x->queue_wait_ms < 0) { /* admitted without queueing */
    x->queue_wait_ms = 0;
    sl_m_observe(x->pool->m->queue_wait, 0);
  }
  if (x->ntried < SL_MAX_TRIED) x->tried[x->ntried++] = ep;
  x->ep = ep;
  x->ep_idx = idx;
  x->probe = sl_admission_take(ep);
  x->phase = SL_X_UPSTREAM;
  x->connecting = true;
  ep->view.queued++;
  sl_forward_opts_t fo = {.client_ip = x->conn->peer, .request_id = x->request_id,
                          .preserve_host = x->pool->conf->preserve_host,
                          .websocket = x->ws_upgrade, .tls = x->conn->tls != NULL,
                          .edits = &x->edits};
  sl_forward_request(&x->upreq, &x->conn->req, ep, &fo);
  x->attempt_ms = sl_worker_now(w);
  x->got_bytes = false;
  x->stale_retried = false;
  int uerr = 0;
  x->up = sl_upconn_acquire(ep, x->pool->conf->connect_timeout_ms, &up_ops, x, &uerr);
  if (!x->up) {
    w->stats.upstream_connect_errors++;
    sl_m_inc(x->pool->m->eps[idx].connect_errors, 1);
    sl_outcome_t o = outcome(x, "connect_error", 0);
    attempt_failed(x, &o, -2, 502, "upstream_connect_failed", "connecting to %s failed: %s",
                   ep->url, uv_strerror(uerr));
    return;
  }
  x->reused = x->up->connected;
  if (x->reused)
    send_request(x);
  else
    arm_deadline(x); /* the total deadline also covers connecting */
}

static void fallback_or_fail(sl_exchange_t *x) {
  sl_pool_t *fb = x->pool->fallback;
  if (fb && !x->fell_back) {
    SL_INFO("request %s: every endpoint of pool %s is ejected; using fallback pool %s",
            x->request_id, x->pool->conf->name, fb->conf->name);
    x->fell_back = true;
    sl_m_inc(x->pool->m->fallbacks, 1);
    set_pool(x, fb);
    x->ntried = 0;
    dispatch(x);
    return;
  }
  respond_error(x, 503, "no_endpoint_available",
                "every endpoint of pool %s is ejected by its circuit breaker", x->pool->conf->name);
}

static sl_pick_result_t pick(sl_exchange_t *x, sl_endpoint_t **ep, uint32_t *idx, char *err,
                             size_t errlen) {
  return sl_admission_pick(W(x), x->pool, &x->conn->req, x->request_id, x->attempts + 1u,
                           x->tried, x->ntried, ep, idx, err, errlen);
}

/* Acts on a pick other than BUSY. */
static void act(sl_exchange_t *x, sl_pick_result_t r, sl_endpoint_t *ep, uint32_t idx,
                const char *err) {
  switch (r) {
  case SL_PICK_OK:
    start_attempt(x, ep, idx);
    break;
  case SL_PICK_DOWN:
    fallback_or_fail(x);
    break;
  default:
    W(x)->stats.policy_errors++;
    sl_telemetry_policy_error(x->pool->m->policy_balancer);
    SL_ERROR("policy error (pool %s balancer): %s", x->pool->conf->name, err);
    respond_error(x, 500, "policy_error", "the balancer of pool %s failed; see the gateway log",
                  x->pool->conf->name);
    break;
  }
}

static void enqueue(sl_exchange_t *x) {
  const sl_pool_conf_t *pc = x->pool->conf;
  if (pc->queue_max == 0) {
    sl_m_inc(x->pool->m->queue_rejections, 1);
    respond_error(x, 503, "no_endpoint_available",
                  "no endpoint of pool %s can take the request now", pc->name);
    return;
  }
  if (!sl_admission_enqueue(W(x), x->pool, x)) {
    sl_m_inc(x->pool->m->queue_rejections, 1);
    respond_error(x, 503, "queue_full", "every endpoint of pool %s is busy and %u requests wait",
                  pc->name, pc->queue_max);
    return;
  }
  x->phase = SL_X_QUEUED;
  if (x->queue_wait_ms < 0) x->queued_ms = sl_worker_now(W(x));
  uv_timer_start(x->timer, on_timer, pc->queue_timeout_ms, 0);
}

/* Finds an endpoint for the next attempt, or queues. A request never overtakes the pool's
 * queue: the oldest waiter gets the next free slot. */
static void dispatch(sl_exchange_t *x) {
  x->phase = SL_X_IDLE;
  if (!sl_list_empty(&x->pool->queue)) {
    enqueue(x);
    return;
  }
  char err[512];
  sl_endpoint_t *ep = NULL;
  uint32_t idx = 0;
  sl_pick_result_t r = pick(x, &ep, &idx, err, sizeof(err));
  if (r == SL_PICK_BUSY)
    enqueue(x);
  else
    act(x, r, ep, idx, err);
}

bool sl_proxy_offer_slot(sl_exchange_t *x) {
  char err[512];
  sl_endpoint_t *ep = NULL;
  uint32_t idx = 0;
  sl_pick_result_t r = pick(x, &ep, &idx, err, sizeof(err));
  if (r == SL_PICK_BUSY) return false;
  sl_admission_dequeue(x->pool, x);
  uv_timer_stop(x->timer);
  x->phase = SL_X_IDLE;
  observe_queue_wait(x);
  act(x, r, ep, idx, err);
  return true;
}

void sl_proxy_abort(sl_exchange_t *x) {
  if (!x->active) return;
  if (x->ws) { /* the session's line; it was counted at its 101 */
    x->bytes_out = sl_ws_bytes_to_client(x->ws);
    sl_telemetry_log(x, 101);
    sl_route_pool_m_t *rm = sl_telemetry_route_pool(x);
    if (rm->ws_open) sl_m_inc(rm->ws_open, -1);
  } else {
    sl_telemetry_request_done(x, 499); /* the client went away first (nginx's 499) */
  }
  if (x->ws) {
    sl_ws_free(x->ws);
    x->ws = NULL;
  }
  if (x->phase == SL_X_QUEUED) sl_admission_dequeue(x->pool, x);
  if (x->up) {
    sl_upconn_close(x->up);
    x->up = NULL;
  }
  end_attempt(x, NULL);
  end_exchange(x);
}

/* The route's on_request. False when the exchange was answered (directly by the hook, or with
 * a 500 when the hook failed). */
static bool run_on_request(sl_exchange_t *x) {
  sl_conn_t *c = x->conn;
  sl_worker_t *w = c->w;
  const sl_route_conf_t *route = x->route;
  sl_hook_result_t res;
  char err[512];
  if (sl_policy_on_request(w, x->gen, route, &c->req, x->request_id, &x->edits, &res, err,
                           sizeof(err)) != 0) {
    policy_failed(x, sl_route_hook(x->gen, route)->errors, "on_request", err);
    x->pool_idx = -1;
    respond_error(x, 500, "policy_error", "the route policy of %s failed; see the gateway log",
                  route->path);
    return false;
  }
  if (res.kind == SL_HOOK_POOL) {
    x->pool_idx = res.pool_idx;
    return true;
  }
  if (res.kind != SL_HOOK_RESPOND) return true;
  x->pool_idx = -1;
  sl_buf_t out;
  sl_buf_init(&out);
  bool keep = sl_conn_format(c, res.status, res.content_type, res.body, res.body_len, res.headers,
                             true, &out);
  send_local(x, res.status, &out, keep);
  sl_hook_result_free(&res);
  return false;
}

void sl_proxy_start(sl_conn_t *c) {
  sl_exchange_t *x = sl_conn_exchange(c);
  sl_worker_t *w = c->w;
  const sl_http_req_t *r = &c->req;
  x->active = true;
  x->gen = sl_gen_ref(w->gen);
  x->start_ms = sl_worker_now(w);
  x->attempts = 0;
  x->ntried = 0;
  x->head_sent = x->up_paused = x->fell_back = x->retrying = false;
  x->head_request = r->method == HTTP_HEAD;
  x->start_ns = uv_hrtime();
  x->queue_wait_ms = x->ttfb_ms = -1;
  x->bytes_out = 0;
  x->route = NULL;
  x->pool_idx = -1;
  x->cache_result = SL_CACHE_NONE;
  x->ws_upgrade = false;
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
    respond_error(x, 404, "route_not_found", "no route for %.*s", (int)SL_MIN(r->path_len, 200),
                  sl_http_req_url(r));
    return;
  }
  x->route = route;
  x->pool_idx = (int32_t)route->pool_idx;
  c->req.seq = ++w->req_seq;
  c->req.peer = c->peer;
  c->req.json_max = route->hook ? route->hook_json_max : 64 * 1024;
  if (route->hook && !run_on_request(x)) return;
  /* Upgrades are honoured on WebSocket pools; elsewhere Upgrade is an ignored hop-by-hop
   * header (RFC 9110 7.8) and the request proceeds as plain HTTP. */
  const sl_pool_t *pool = &x->gen->pools[x->pool_idx];
  const char *why = NULL;
  int ws = pool->conf->websocket ? sl_ws_upgrade_kind(r, &why) : 0;
  if (ws < 0) {
    respond_error(x, 400, "bad_request", "%s", why);
    return;
  }
  x->ws_upgrade = ws == 1;
  x->ws_ready = x->ws_refused = x->ws_bad_accept = false;
  x->cache_result = SL_CACHE_NONE;
  if (route->cache && !x->ws_upgrade) {
    char err[512];
    switch (sl_cache_flow_begin(x, route, (uint32_t)(route - x->gen->cfg->routes), err,
                                sizeof(err))) {
    case SL_FLOW_DONE:
      return;
    case SL_FLOW_WAIT:
      uv_timer_start(x->timer, on_timer, route->cache->coalesce_wait_ms, 0);
      return;
    case SL_FLOW_ERROR:
      policy_failed(x, sl_route_m(x->gen, route)->policy_cache, "cache policy", err);
      respond_error(x, 500, "policy_error", "the cache policy of route %s failed; see the gateway log",
                    route->path);
      return;
    case SL_FLOW_UPSTREAM:
      break;
    }
  }
  sl_proxy_go_upstream(x);
}

void sl_proxy_go_upstream(sl_exchange_t *x) {
  set_pool(x, &x->gen->pools[x->pool_idx]);
  dispatch(x);
}

void sl_proxy_finish_local(sl_exchange_t *x, int status, bool keep_alive) {
  sl_conn_t *c = x->conn;
  c->w->stats.responses[status / 100 < 6 ? status / 100 : 0]++;
  sl_telemetry_request_done(x, status);
  end_exchange(x);
  sl_conn_response_done(c, keep_alive);
}
