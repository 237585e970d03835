#include "ws.h"

#include "io.h"
#include "log.h"
#include "proxy.h"
#include "server.h"
#include "upstream.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <wslay/wslay.h>

enum { CLIENT = 0, UPSTREAM = 1 };
#define SL_WS_HWM (256 * 1024)
#define SL_WS_LWM (64 * 1024)
#define SL_WS_CLOSE_WAIT_MS 5000

struct sl_ws {
  sl_exchange_t *x;
  wslay_event_context_ptr side[2];
  const char *in[2]; /* bytes being handed to wslay during one read */
  size_t in_len[2];
  bool paused[2];       /* reads stopped on this leg (backpressure) */
  bool lost[2];         /* this leg's TCP connection is gone */
  bool own_close[2];    /* the gateway queued a close on this leg itself */
  unsigned busy;        /* nesting of entry points; freeing waits for 0 */
  bool dead;            /* freed while busy */
  bool ending;
  uint64_t last_activity_ms; /* a message or frame in either direction */
  uint64_t last_ping_ms;
  bool close_wait; /* the session timer now bounds the close handshake */
  sl_buf_t out[2];  /* bytes wslay produced for a leg, written in one call per frame */
  /* A close waiting for the leg's queued messages to go out first: wslay sends control frames
   * ahead of queued data, which would let a close overtake the last message. */
  struct {
    bool pending;
    uint16_t code;
    uint8_t reason[123];
    size_t len;
  } close_after[2];
};

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

void sl_ws_accept_key(const char *key, size_t len, char out[29]) {
  unsigned char in[128 + sizeof(ws_guid)], md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  len = SL_MIN(len, (size_t)128);
  memcpy(in, key, len);
  memcpy(in + len, ws_guid, sizeof(ws_guid) - 1);
  EVP_Digest(in, len + sizeof(ws_guid) - 1, md, &mdlen, EVP_sha1(), NULL);
  EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen); /* 20 bytes -> 28 chars + NUL */
}

static const sl_header_t *find(const sl_http_req_t *r, const char *name) {
  int i = sl_http_req_find(r, name);
  return i < 0 ? NULL : &r->headers[i];
}

int sl_ws_upgrade_kind(const sl_http_req_t *r, const char **why) {
  const sl_header_t *up = find(r, "upgrade");
  if (!r->upgrade || !up) return 0;
  if (!sl_strieq(sl_http_req_str(r, up->value_off), up->value_len, "websocket")) return 0;
  const sl_header_t *key = find(r, "sec-websocket-key");
  const sl_header_t *ver = find(r, "sec-websocket-version");
  if (r->method != HTTP_GET) *why = "a WebSocket upgrade must use GET";
  else if (!key || key->value_len != 24) *why = "missing or malformed Sec-WebSocket-Key";
  else if (!ver || !sl_strieq(sl_http_req_str(r, ver->value_off), ver->value_len, "13"))
    *why = "unsupported Sec-WebSocket-Version (13 is required)";
  else return 1;
  return -1;
}

/* Plumbing --------------------------------------------------------------------------------- */

static int side_of(const sl_ws_t *ws, wslay_event_context_ptr ctx) {
  return ctx == ws->side[CLIENT] ? CLIENT : UPSTREAM;
}

static uv_stream_t *stream_of(sl_ws_t *ws, int s) {
  return s == CLIENT ? (uv_stream_t *)&ws->x->conn->tcp : (uv_stream_t *)&ws->x->up->tcp;
}

/* Unsent bytes toward leg s: in the socket's write queue and still queued in wslay. */
static size_t backlog(sl_ws_t *ws, int s) {
  if (ws->lost[s] || ws->dead) return 0;
  return uv_stream_get_write_queue_size(stream_of(ws, s)) +
         wslay_event_get_queued_msg_length(ws->side[s]);
}

static ssize_t on_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                       void *ud) {
  sl_ws_t *ws = ud;
  int s = side_of(ws, ctx);
  if (ws->in_len[s] == 0) {
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
  }
  size_t n = SL_MIN(len, ws->in_len[s]);
  memcpy(buf, ws->in[s], n);
  ws->in[s] += n;
  ws->in_len[s] -= n;
  return (ssize_t)n;
}

/* Writes what was gathered for leg s. Returns false when the leg is gone. */
static bool flush_leg(sl_ws_t *ws, int s) {
  sl_buf_t *b = &ws->out[s];
  if (!b->len || ws->lost[s] || ws->dead) return !ws->lost[s];
  int rc = s == CLIENT ? sl_conn_write(ws->x->conn, b->data, b->len)
                       : sl_upconn_write(ws->x->up, b->data, b->len);
  b->len = 0;
  if (b->cap > 64 * 1024) sl_buf_free(b);
  if (rc < 0) ws->lost[s] = true;
  return rc >= 0;
}

/* wslay hands over a frame in pieces (header, then payload) flagged WSLAY_MSG_MORE: gather
 * them so each frame leaves in one write and one TCP segment, not two. */
static ssize_t on_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *ud) {
  sl_ws_t *ws = ud;
  int s = side_of(ws, ctx);
  if (ws->lost[s] || ws->dead) {
    wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
    return -1;
  }
  if (uv_stream_get_write_queue_size(stream_of(ws, s)) + ws->out[s].len > SL_WS_HWM) {
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
  }
  sl_buf_append(&ws->out[s], data, len);
  if (!(flags & WSLAY_MSG_MORE) || ws->out[s].len >= 64 * 1024) {
    if (!flush_leg(ws, s)) {
      wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
      return -1;
    }
  }
  return (ssize_t)len;
}

static int on_genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *ud) {
  sl_ws_t *ws = ud;
  sl_worker_t *w = ws->x->conn->w;
  for (size_t i = 0; i < len; i += 8) {
    uint64_t r = sl_worker_rand(w);
    memcpy(buf + i, &r, SL_MIN((size_t)8, len - i));
  }
  return 0;
}

static bool close_started(const sl_ws_t *ws, int s) {
  return ws->close_after[s].pending || wslay_event_get_close_sent(ws->side[s]);
}

/* Queues a close on leg s once everything already queued there has been sent. */
static void close_leg(sl_ws_t *ws, int s, uint16_t code, const uint8_t *reason, size_t len) {
  if (ws->lost[s] || close_started(ws, s)) return;
  ws->close_after[s].pending = true;
  ws->close_after[s].code = code;
  ws->close_after[s].len = SL_MIN(len, sizeof(ws->close_after[s].reason));
  if (len) memcpy(ws->close_after[s].reason, reason, ws->close_after[s].len);
}

static void queue_close(sl_ws_t *ws, int s, uint16_t code, const char *reason) {
  if (ws->lost[s] || close_started(ws, s)) return;
  ws->own_close[s] = true;
  close_leg(ws, s, code, (const uint8_t *)reason, reason ? strlen(reason) : 0);
}

/* Relays a complete message (or a close) to the other leg. */
static void on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *ud) {
  sl_ws_t *ws = ud;
  int s = side_of(ws, ctx), o = 1 - s;
  if (ws->lost[o] || close_started(ws, o)) return;
  if (arg->opcode == WSLAY_TEXT_FRAME || arg->opcode == WSLAY_BINARY_FRAME) {
    struct wslay_event_msg m = {arg->opcode, arg->msg, arg->msg_length};
    wslay_event_queue_msg(ws->side[o], &m);
  } else if (arg->opcode == WSLAY_CONNECTION_CLOSE) {
    /* The same code and reason, so the far end learns why (no code -> a close without one). */
    size_t rlen = arg->msg_length > 2 ? arg->msg_length - 2 : 0;
    close_leg(ws, o, arg->status_code, rlen ? arg->msg + 2 : NULL, rlen);
  }
}

static const struct wslay_event_callbacks callbacks = {
    .recv_callback = on_recv,
    .send_callback = on_send,
    .genmask_callback = on_genmask,
    .on_msg_recv_callback = on_msg,
};

/* Session lifecycle ------------------------------------------------------------------------ */

static void really_free(sl_ws_t *ws) {
  for (int s = 0; s < 2; s++) {
    if (ws->side[s]) wslay_event_context_free(ws->side[s]);
    sl_buf_free(&ws->out[s]);
  }
  free(ws);
}

void sl_ws_free(sl_ws_t *ws) {
  if (!ws) return;
  if (ws->busy) {
    ws->dead = true;
    return;
  }
  really_free(ws);
}

/* Done when gone, or when our close went out and the peer's close came back — or can no longer
 * come: wslay stops reading on a protocol error, including close codes it does not know, such
 * as a peer echoing 1012. */
static bool leg_finished(sl_ws_t *ws, int s) {
  wslay_event_context_ptr c = ws->side[s];
  return ws->lost[s] || (wslay_event_get_close_sent(c) &&
                         (wslay_event_get_close_received(c) || !wslay_event_get_read_enabled(c)));
}

static void set_paused(sl_ws_t *ws, int s, bool pause) {
  if (ws->paused[s] == pause || ws->lost[s]) return;
  ws->paused[s] = pause;
  if (s == CLIENT)
    sl_conn_read_pause(ws->x->conn, pause);
  else
    sl_upconn_read_pause(ws->x->up, pause);
}

static void pump(sl_ws_t *ws);
static void enter(sl_ws_t *ws);
static bool leave(sl_ws_t *ws);

static bool closing(const sl_ws_t *ws) {
  for (int s = 0; s < 2; s++)
    if (ws->lost[s] || ws->close_after[s].pending || wslay_event_get_close_sent(ws->side[s]) ||
        wslay_event_get_close_received(ws->side[s]))
      return true;
  return false;
}

/* Period of the session timer: keepalive pings and the idle check. */
static uint64_t tick_ms(const sl_ws_t *ws) {
  const sl_pool_conf_t *pc = ws->x->pool->conf;
  uint64_t t = UINT64_MAX;
  if (pc->ws_ping_interval_ms) t = pc->ws_ping_interval_ms;
  if (pc->ws_idle_timeout_ms) t = SL_MIN(t, SL_MAX(pc->ws_idle_timeout_ms / 4, 1u));
  return t;
}

static void on_session_timer(uv_timer_t *t) {
  sl_exchange_t *x = t->data;
  sl_ws_t *ws = x->ws;
  if (!ws || ws->ending) return;
  if (closing(ws)) { /* the close handshake did not finish in time */
    SL_INFO("request %s: WebSocket close handshake timed out", x->request_id);
    ws->ending = true;
    sl_proxy_ws_end(x, false, !ws->lost[UPSTREAM]);
    return;
  }
  const sl_pool_conf_t *pc = x->pool->conf;
  uint64_t now = sl_worker_now(x->conn->w);
  enter(ws);
  if (pc->ws_idle_timeout_ms && now - ws->last_activity_ms >= pc->ws_idle_timeout_ms) {
    queue_close(ws, CLIENT, 1001, "idle timeout");
    queue_close(ws, UPSTREAM, 1001, "idle timeout");
  } else if (pc->ws_ping_interval_ms && now - ws->last_ping_ms >= pc->ws_ping_interval_ms) {
    /* Keepalive on both legs; wslay answers the peers' pongs and counts them as traffic. */
    struct wslay_event_msg ping = {WSLAY_PING, NULL, 0};
    for (int s = 0; s < 2; s++)
      if (!ws->lost[s]) wslay_event_queue_msg(ws->side[s], &ping);
    ws->last_ping_ms = now;
  }
  if (!ws->dead) pump(ws);
  if (leave(ws) && !ws->ending && x->ws == ws) {
    uint64_t tick = tick_ms(ws);
    if (tick != UINT64_MAX && !closing(ws)) uv_timer_start(&x->timer, on_session_timer, tick, 0);
  }
}

/* After any event: flush both legs, apply backpressure, and end the session once both legs are
 * closed. */
static void send_leg(sl_ws_t *ws, int s) {
  if (ws->dead || ws->lost[s]) return;
  if (wslay_event_want_write(ws->side[s]) && wslay_event_send(ws->side[s]) != 0) ws->lost[s] = true;
  flush_leg(ws, s);
  if (ws->dead || ws->lost[s] || !ws->close_after[s].pending ||
      wslay_event_get_queued_msg_count(ws->side[s]) != 0)
    return;
  ws->close_after[s].pending = false;
  wslay_event_queue_close(ws->side[s], ws->close_after[s].code, ws->close_after[s].reason,
                          ws->close_after[s].len);
  if (wslay_event_send(ws->side[s]) != 0) ws->lost[s] = true;
  flush_leg(ws, s);
}

static void pump(sl_ws_t *ws) {
  for (int s = 0; s < 2 && !ws->dead; s++) send_leg(ws, s);
  if (ws->dead) return;
  /* A close the gateway's parser generated on one leg (1002 bad frame, 1009 too big) ends the
   * other leg too. */
  for (int s = 0; s < 2; s++) {
    int o = 1 - s;
    if (!ws->own_close[s] && wslay_event_get_close_sent(ws->side[s]) &&
        !wslay_event_get_close_received(ws->side[s]) && !ws->lost[o] && !close_started(ws, o)) {
      char reason[64];
      snprintf(reason, sizeof(reason), "%s closed with %u", s == CLIENT ? "client" : "upstream",
               wslay_event_get_status_code_sent(ws->side[s]));
      queue_close(ws, o, 1001, reason);
      send_leg(ws, o);
    }
  }
  if (ws->dead) return;
  for (int s = 0; s < 2; s++) set_paused(ws, s, backlog(ws, 1 - s) > SL_WS_HWM);

  if (ws->ending || ws->dead) return;
  bool fin[2] = {leg_finished(ws, CLIENT), leg_finished(ws, UPSTREAM)};
  if (fin[CLIENT] && fin[UPSTREAM]) {
    ws->ending = true;
    sl_proxy_ws_end(ws->x, !ws->lost[CLIENT], !ws->lost[UPSTREAM]);
    return;
  }
  if (closing(ws) && !ws->close_wait) {
    ws->close_wait = true;
    uv_timer_start(&ws->x->timer, on_session_timer, SL_WS_CLOSE_WAIT_MS, 0);
  }
}

static void enter(sl_ws_t *ws) { ws->busy++; }

/* Returns false when the session was freed meanwhile. */
static bool leave(sl_ws_t *ws) {
  if (--ws->busy == 0 && ws->dead) {
    really_free(ws);
    return false;
  }
  return true;
}

static void feed(sl_ws_t *ws, int s, const char *data, size_t n) {
  if (ws->lost[s] || !wslay_event_get_read_enabled(ws->side[s])) return;
  ws->in[s] = data;
  ws->in_len[s] = n;
  ws->last_activity_ms = sl_worker_now(ws->x->conn->w);
  if (wslay_event_recv(ws->side[s]) != 0) ws->lost[s] = true;
  ws->in_len[s] = 0;
}

static void leg_lost(sl_ws_t *ws, int s) {
  ws->lost[s] = true;
  if (s == UPSTREAM) {
    ws->x->conn->w->stats.ws_upstream_lost++;
    queue_close(ws, CLIENT, 1011, "upstream connection lost");
  } else {
    queue_close(ws, UPSTREAM, 1001, "client went away");
  }
}

void sl_ws_client_read(sl_ws_t *ws, const char *data, ssize_t n) {
  enter(ws);
  if (n < 0)
    leg_lost(ws, CLIENT);
  else
    feed(ws, CLIENT, data, (size_t)n);
  if (!ws->dead) pump(ws);
  leave(ws);
}

static void on_up_read(void *ctx, sl_upconn_t *u, const char *data, ssize_t n) {
  sl_ws_t *ws = ctx;
  enter(ws);
  if (n < 0)
    leg_lost(ws, UPSTREAM);
  else
    feed(ws, UPSTREAM, data, (size_t)n);
  if (!ws->dead) pump(ws);
  leave(ws);
}

static void on_up_drained(void *ctx, sl_upconn_t *u) {
  sl_ws_t *ws = ctx;
  enter(ws);
  pump(ws);
  leave(ws);
}

void sl_ws_client_drained(sl_ws_t *ws) {
  enter(ws);
  pump(ws);
  leave(ws);
}

static const sl_upconn_ops_t ws_up_ops = {
    .read = on_up_read,
    .drained = on_up_drained,
};

int sl_ws_start(sl_exchange_t *x, const char *accept, const char *protocol,
                     size_t protocol_len, const char *early, size_t early_len) {
  sl_ws_t *ws = sl_calloc(1, sizeof(*ws));
  ws->x = x;
  if (wslay_event_context_server_init(&ws->side[CLIENT], &callbacks, ws) != 0 ||
      wslay_event_context_client_init(&ws->side[UPSTREAM], &callbacks, ws) != 0) {
    really_free(ws);
    return -1;
  }
  uint64_t max = x->pool->conf->ws_max_message_bytes;
  wslay_event_config_set_max_recv_msg_length(ws->side[CLIENT], max);
  wslay_event_config_set_max_recv_msg_length(ws->side[UPSTREAM], max);

  sl_buf_t b;
  sl_buf_init(&b);
  sl_buf_appends(&b, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: ");
  sl_buf_append2(&b, accept, strlen(accept), "\r\n");
  if (protocol_len) {
    sl_buf_appends(&b, "Sec-WebSocket-Protocol: ");
    sl_buf_append2(&b, protocol, protocol_len, "\r\n");
  }
  sl_buf_appends(&b, "x-request-id: ");
  sl_buf_append2(&b, x->request_id, strlen(x->request_id), "\r\n\r\n");
  int rc = sl_conn_write(x->conn, b.data, b.len);
  sl_buf_free(&b);
  if (rc < 0) {
    really_free(ws);
    return -1;
  }
  x->ws = ws;
  x->up->ops = &ws_up_ops;
  x->up->ctx = ws;
  x->conn->w->stats.ws_sessions++;
  ws->last_activity_ms = ws->last_ping_ms = sl_worker_now(x->conn->w);
  uint64_t tick = tick_ms(ws);
  if (tick != UINT64_MAX) uv_timer_start(&x->timer, on_session_timer, tick, 0);
  enter(ws);
  if (early_len) feed(ws, UPSTREAM, early, early_len);
  sl_conn_t *c = x->conn;
  if (c->in.len) { /* frames the client sent right after its upgrade request */
    feed(ws, CLIENT, c->in.data, c->in.len);
    c->in.len = 0;
  }
  if (!ws->dead) pump(ws);
  leave(ws);
  return 0;
}

void sl_ws_shutdown(sl_ws_t *ws) {
  enter(ws);
  queue_close(ws, CLIENT, 1012, "gateway restarting");
  queue_close(ws, UPSTREAM, 1001, "gateway shutting down");
  if (!ws->dead) pump(ws);
  leave(ws);
}
