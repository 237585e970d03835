#include "ws.h"

#include "log.h"
#include "proxy.h"
#include "server.h"
#include "telemetry.h"
#include "upstream.h"
#include "ws_frame.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>

enum { CLIENT = 0, UPSTREAM = 1 };
#define SL_WS_HWM (256 * 1024)
#define SL_WS_LWM (64 * 1024)
#define SL_WS_CLOSE_WAIT_MS 5000
#define SL_WS_BATCH 32

/* Payload of the gateway's keepalive pings: pongs carrying it are answers to the gateway and
 * are not relayed. */
static const uint8_t ka_token[] = {'s', 'l', 'u', 'i', 'c', 'e', '-', 'k', 'a'};

/* Frames arriving from one leg. Data frames are relayed as they arrive, header and payload
 * bytes untouched (client frames stay masked, upstream frames unmasked, as each receiving side
 * expects); control frames are gathered whole (at most 131 bytes) and then relayed, answered
 * or consumed. */
typedef struct ws_in {
  uint64_t left;    /* payload bytes of the current data frame still to come */
  uint64_t msg_len; /* payload bytes of the data message in progress */
  uint8_t hdr[SL_WSF_MAX_HEADER]; /* a header split across reads */
  uint8_t ctl[6 + SL_WSF_MAX_CONTROL_PAYLOAD];
  uint8_t hn;     /* bytes in hdr */
  uint8_t cn;     /* bytes in ctl */
  uint8_t cneed;  /* size of the control frame being gathered */
  uint8_t chlen;  /* its header length */
  bool in_msg;    /* a fragmented data message is open */
  bool fin;       /* the current data frame ends its message */
  bool drop;      /* the current data frame is not relayed (the other leg is closing) */
  bool failed;    /* protocol error: further input is ignored */
  bool close_rcvd;
} ws_in_t;

/* Toward one leg. */
typedef struct ws_out {
  bool lost;       /* the leg's TCP connection is gone */
  bool close_sent; /* a close frame went out (relayed or the gateway's own) */
  bool paused;     /* reads on the *other* leg are stopped until this one drains */
  bool close_pending; /* a gateway close waits for the relayed frame in progress to end */
  uint16_t code;
  uint8_t reason_len;
  char reason[48];
} ws_out_t;

struct sl_ws {
  sl_exchange_t *x;
  ws_in_t in[2];   /* frames from the client [0] and from the upstream [1] */
  ws_out_t out[2]; /* toward the client [0] and toward the upstream [1] */
  uint64_t to_client; /* bytes written toward the client, 101 head included */
  unsigned busy;   /* nesting of entry points; freeing waits for 0 */
  bool dead;       /* freed while busy */
  bool ending;
  bool close_wait; /* the session timer now bounds the close handshake */
  uint64_t last_activity_ms; /* bytes from either leg */
  uint64_t last_ping_ms;
};

/* Relayed bytes for one leg, gathered during one read and written with one writev. */
typedef struct batch {
  uv_buf_t iov[SL_WS_BATCH];
  unsigned n;
} batch_t;

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

/* Writing ---------------------------------------------------------------------------------- */

static size_t queued(sl_ws_t *ws, int s) {
  if (ws->out[s].lost || ws->dead) return 0;
  return s == CLIENT ? sl_conn_queued_bytes(ws->x->conn) : sl_upconn_queued_bytes(ws->x->up);
}

static void leg_writev(sl_ws_t *ws, int s, const uv_buf_t *iov, unsigned n) {
  if (!n || ws->out[s].lost || ws->dead) return;
  if (s == CLIENT)
    for (unsigned i = 0; i < n; i++) ws->to_client += iov[i].len;
  int rc = s == CLIENT ? sl_conn_writev(ws->x->conn, iov, n) : sl_upconn_writev(ws->x->up, iov, n);
  if (rc < 0) ws->out[s].lost = true;
}

static void flush(sl_ws_t *ws, int s, batch_t *b) {
  leg_writev(ws, s, b->iov, b->n);
  b->n = 0;
}

static void push(sl_ws_t *ws, int s, batch_t *b, const uint8_t *p, size_t len) {
  if (!len) return;
  if (b->n == SL_WS_BATCH) flush(ws, s, b);
  b->iov[b->n++] = uv_buf_init((char *)p, (unsigned)len);
}

/* Writes a frame the gateway originates (close, ping): masked toward the upstream. */
static void send_frame(sl_ws_t *ws, int s, uint8_t opcode, const uint8_t *payload, size_t len) {
  uint8_t f[SL_WSF_MAX_HEADER + SL_WSF_MAX_CONTROL_PAYLOAD];
  uint8_t mask[4];
  if (s == UPSTREAM) {
    uint64_t r = sl_worker_rand(ws->x->conn->w);
    memcpy(mask, &r, 4);
  }
  size_t h = sl_wsf_encode(f, opcode, true, len, s == UPSTREAM ? mask : NULL);
  memcpy(f + h, payload, len);
  if (s == UPSTREAM) sl_wsf_mask(f + h, len, mask, 0);
  uv_buf_t b = uv_buf_init((char *)f, (unsigned)(h + len));
  leg_writev(ws, s, &b, 1); /* copied if the socket does not take it at once */
}

/* A relayed data frame toward leg s is half-written: nothing else may go out there yet. */
static bool mid_frame(const sl_ws_t *ws, int s) {
  const ws_in_t *f = &ws->in[1 - s];
  return f->left > 0 && !f->drop;
}

static void send_close_now(sl_ws_t *ws, int s) {
  ws_out_t *o = &ws->out[s];
  uint8_t p[2 + sizeof(o->reason)];
  p[0] = (uint8_t)(o->code >> 8);
  p[1] = (uint8_t)o->code;
  memcpy(p + 2, o->reason, o->reason_len);
  o->close_pending = false;
  o->close_sent = true;
  send_frame(ws, s, SL_WSF_CLOSE, p, 2 + (size_t)o->reason_len);
}

/* The gateway closes leg s itself, at the next frame boundary toward it. */
static void queue_close(sl_ws_t *ws, int s, uint16_t code, const char *reason) {
  ws_out_t *o = &ws->out[s];
  if (o->lost || o->close_sent || o->close_pending) return;
  o->code = code;
  o->reason_len = (uint8_t)SL_MIN(strlen(reason), sizeof(o->reason));
  memcpy(o->reason, reason, o->reason_len);
  if (!mid_frame(ws, s)) {
    send_close_now(ws, s);
    return;
  }
  const ws_in_t *f = &ws->in[1 - s];
  if (ws->out[1 - s].lost || f->failed) {
    /* The frame in progress can never be completed: a clean close is impossible. */
    o->lost = true;
    return;
  }
  o->close_pending = true;
}

/* Reading ---------------------------------------------------------------------------------- */

static const char *side_name(int s) { return s == CLIENT ? "client" : "upstream"; }

/* A protocol violation by leg s: close it with `code`, and the other leg with 1001. */
static void fail(sl_ws_t *ws, int s, uint16_t code, const char *why) {
  ws->in[s].failed = true;
  SL_INFO("request %s: %s WebSocket error: %s; closing with %u", ws->x->request_id, side_name(s),
          why, code);
  queue_close(ws, s, code, why);
  char reason[48];
  snprintf(reason, sizeof(reason), "%s closed with %u", side_name(s), code);
  queue_close(ws, 1 - s, 1001, reason);
}

static const char *check_header(sl_ws_t *ws, int s, const sl_wsf_hdr_t *h) {
  const ws_in_t *in = &ws->in[s];
  if (h->rsv) return "reserved bits set";
  if (!sl_wsf_known_opcode(h->opcode)) return "reserved opcode";
  if (h->masked != (s == CLIENT)) return s == CLIENT ? "unmasked frame" : "masked frame";
  if (sl_wsf_is_control(h->opcode)) {
    if (!h->fin) return "fragmented control frame";
    if (h->len > SL_WSF_MAX_CONTROL_PAYLOAD) return "control frame too long";
  } else if (h->opcode == SL_WSF_CONT) {
    if (!in->in_msg) return "continuation without a message";
  } else if (in->in_msg) {
    return "new message inside a fragmented one";
  }
  return NULL;
}

/* The relayed data frame from leg s ended: count it, and send a close that was waiting for it. */
static void data_frame_done(sl_ws_t *ws, int s, batch_t *b) {
  ws_in_t *in = &ws->in[s];
  int o = 1 - s;
  if (in->drop) return;
  if (in->fin) {
    ws->x->conn->w->stats.ws_messages[s]++;
    sl_mseries_t *m = ws->x->pool->m->ws_messages[s];
    if (m) sl_m_inc(m, 1);
  }
  if (ws->out[o].close_pending) {
    flush(ws, o, b);
    send_close_now(ws, o);
  }
}

/* A whole control frame from leg s is in in->ctl. */
static void control_frame(sl_ws_t *ws, int s, batch_t *b) {
  ws_in_t *in = &ws->in[s];
  int o = 1 - s;
  uint8_t op = in->ctl[0] & 0xf;
  size_t len = (size_t)in->cneed - in->chlen;
  uint8_t payload[SL_WSF_MAX_CONTROL_PAYLOAD];
  memcpy(payload, in->ctl + in->chlen, len);
  if (s == CLIENT) sl_wsf_mask(payload, len, in->ctl + in->chlen - 4, 0);

  if (op == SL_WSF_PONG && len == sizeof(ka_token) && !memcmp(payload, ka_token, len))
    return; /* the answer to the gateway's keepalive */
  if (op == SL_WSF_CLOSE) {
    unsigned code = len >= 2 ? (unsigned)payload[0] << 8 | payload[1] : 0;
    if (len == 1 || (len >= 2 && !sl_wsf_valid_close_code(code))) {
      flush(ws, o, b); /* frames relayed before it go out ahead of the gateway's close */
      fail(ws, s, 1002, "invalid close frame");
      return;
    }
    in->close_rcvd = true;
    SL_DEBUG("request %s: %s sent close %u", ws->x->request_id, side_name(s), code);
  }
  ws_out_t *to = &ws->out[o];
  if (to->lost || to->close_sent || to->close_pending) {
    /* The other leg is closing already: answer the peer's close ourselves. */
    if (op == SL_WSF_CLOSE) queue_close(ws, s, 1000, "");
    return;
  }
  push(ws, o, b, in->ctl, in->cneed);
  flush(ws, o, b); /* ctl is reused by the next control frame */
  if (op == SL_WSF_CLOSE) to->close_sent = true;
}

/* Relays what leg s sent. Bytes of data frames are forwarded from `p` itself (copied only when
 * the socket does not take them at once); header checks, message-size accounting and
 * control frames are the only per-frame work. */
static void feed(sl_ws_t *ws, int s, const uint8_t *p, size_t n) {
  ws_in_t *in = &ws->in[s];
  int o = 1 - s;
  uint64_t max = ws->x->pool->conf->ws_max_message_bytes;
  batch_t b;
  b.n = 0;
  size_t i = 0, span = 0; /* p[span..i) is to be relayed verbatim */
  ws->last_activity_ms = sl_worker_now(ws->x->conn->w);
  if (in->failed || in->close_rcvd) return;
  ws->x->conn->w->stats.ws_bytes[s] += n;
  if (ws->x->pool->m->ws_bytes[s]) sl_m_inc(ws->x->pool->m->ws_bytes[s], (double)n);

  while (i < n && !in->failed && !in->close_rcvd && !ws->dead) {
    if (in->left) { /* payload of a data frame */
      size_t take = (size_t)SL_MIN(in->left, (uint64_t)(n - i));
      if (in->drop) {
        push(ws, o, &b, p + span, i - span);
        span = i + take;
      }
      i += take;
      in->left -= take;
      if (!in->left) {
        push(ws, o, &b, p + span, i - span);
        span = i;
        data_frame_done(ws, s, &b);
      }
      continue;
    }
    if (in->cn) { /* the rest of a control frame */
      size_t take = SL_MIN((size_t)(in->cneed - in->cn), n - i);
      memcpy(in->ctl + in->cn, p + i, take);
      in->cn = (uint8_t)(in->cn + take);
      i += take;
      span = i;
      if (in->cn == in->cneed) {
        in->cn = 0;
        control_frame(ws, s, &b);
      }
      continue;
    }

    /* A frame header starts here, or completes one begun in the previous read. */
    sl_wsf_hdr_t h;
    int hl;
    size_t fstart = i; /* where the frame's bytes in p begin */
    bool from_hdr = in->hn > 0;
    if (from_hdr) {
      size_t take = SL_MIN(sizeof(in->hdr) - in->hn, n - i);
      memcpy(in->hdr + in->hn, p + i, take);
      hl = sl_wsf_parse(in->hdr, in->hn + take, &h);
      if (hl == 0) {
        in->hn = (uint8_t)(in->hn + take);
        i = span = i + take;
        break;
      }
      if (hl > 0) i += (size_t)hl - in->hn;
      in->hn = 0;
    } else {
      hl = sl_wsf_parse(p + i, n - i, &h);
      if (hl == 0) { /* keep the partial header for the next read */
        push(ws, o, &b, p + span, i - span);
        flush(ws, o, &b);
        memcpy(in->hdr, p + i, n - i);
        in->hn = (uint8_t)(n - i);
        i = span = n;
        break;
      }
    }
    const char *why = hl < 0 ? "malformed frame length" : check_header(ws, s, &h);
    if (why || (!sl_wsf_is_control(h.opcode) && max &&
                (h.opcode == SL_WSF_CONT ? in->msg_len : 0) + h.len > max)) {
      /* Frames before this one still go out, then the closes. */
      push(ws, o, &b, p + span, fstart - span);
      flush(ws, o, &b);
      span = i = n;
      if (why) fail(ws, s, 1002, why);
      else fail(ws, s, 1009, "message too big");
      break;
    }
    const uint8_t *hp = from_hdr ? in->hdr : p + i;
    if (!from_hdr) i += (size_t)hl;

    if (sl_wsf_is_control(h.opcode)) {
      push(ws, o, &b, p + span, fstart - span);
      memcpy(in->ctl, hp, (size_t)hl);
      in->chlen = (uint8_t)hl;
      in->cneed = (uint8_t)(hl + (int)h.len);
      in->cn = (uint8_t)hl;
      span = i;
      if (in->cn == in->cneed) {
        in->cn = 0;
        control_frame(ws, s, &b);
      }
      continue;
    }

    /* Data frame: its header and payload are relayed as they are. */
    if (h.opcode != SL_WSF_CONT) in->msg_len = 0;
    in->in_msg = !h.fin;
    in->msg_len += h.len;
    ws_out_t *to = &ws->out[o];
    in->drop = to->lost || to->close_sent || to->close_pending;
    in->fin = h.fin;
    in->left = h.len;
    if (from_hdr || in->drop) {
      push(ws, o, &b, p + span, fstart - span);
      if (!in->drop) push(ws, o, &b, in->hdr, (size_t)hl);
      span = i;
    }
    if (!in->left) {
      push(ws, o, &b, p + span, i - span);
      span = i;
      data_frame_done(ws, s, &b);
    }
  }
  push(ws, o, &b, p + span, i - span);
  flush(ws, o, &b);
}

/* Session lifecycle ------------------------------------------------------------------------ */

static void really_free(sl_ws_t *ws) { free(ws); }

void sl_ws_free(sl_ws_t *ws) {
  if (!ws) return;
  if (ws->busy) {
    ws->dead = true;
    return;
  }
  really_free(ws);
}

static bool leg_finished(const sl_ws_t *ws, int s) {
  return ws->out[s].lost ||
         (ws->out[s].close_sent && (ws->in[s].close_rcvd || ws->in[s].failed));
}

static bool closing(const sl_ws_t *ws) {
  for (int s = 0; s < 2; s++)
    if (ws->out[s].lost || ws->out[s].close_sent || ws->out[s].close_pending ||
        ws->in[s].close_rcvd || ws->in[s].failed)
      return true;
  return false;
}

/* Reads on leg s pause while the other leg has more than the high-water mark unsent, and
 * resume below the low-water mark. */
static void apply_backpressure(sl_ws_t *ws, int s) {
  int o = 1 - s;
  if (ws->out[s].lost) return;
  size_t q = queued(ws, o);
  bool pause = ws->out[o].paused ? q > SL_WS_LWM : q > SL_WS_HWM;
  if (pause == ws->out[o].paused) return;
  ws->out[o].paused = pause;
  if (s == CLIENT)
    sl_conn_read_pause(ws->x->conn, pause);
  else
    sl_upconn_read_pause(ws->x->up, pause);
}

static void on_session_timer(uv_timer_t *t);

/* After any event: apply backpressure, and end the session once both legs are closed. */
static void settle(sl_ws_t *ws) {
  if (ws->dead || ws->ending) return;
  for (int s = 0; s < 2; s++) apply_backpressure(ws, s);
  if (leg_finished(ws, CLIENT) && leg_finished(ws, UPSTREAM)) {
    ws->ending = true;
    sl_proxy_ws_end(ws->x, !ws->out[CLIENT].lost, !ws->out[UPSTREAM].lost);
    return;
  }
  if (closing(ws) && !ws->close_wait) {
    ws->close_wait = true;
    uv_timer_start(ws->x->timer, on_session_timer, SL_WS_CLOSE_WAIT_MS, 0);
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
  if (ws->close_wait) { /* the close handshake did not finish in time */
    SL_INFO("request %s: WebSocket close handshake timed out", x->request_id);
    ws->ending = true;
    sl_proxy_ws_end(x, false, !ws->out[UPSTREAM].lost);
    return;
  }
  const sl_pool_conf_t *pc = x->pool->conf;
  uint64_t now = sl_worker_now(x->conn->w);
  enter(ws);
  if (pc->ws_idle_timeout_ms && now - ws->last_activity_ms >= pc->ws_idle_timeout_ms) {
    queue_close(ws, CLIENT, 1001, "idle timeout");
    queue_close(ws, UPSTREAM, 1001, "idle timeout");
  } else if (pc->ws_ping_interval_ms && now - ws->last_ping_ms >= pc->ws_ping_interval_ms) {
    /* Keepalive on both legs, between relayed frames; the pongs count as activity. */
    for (int s = 0; s < 2 && !ws->dead; s++)
      if (!ws->out[s].lost && !ws->out[s].close_sent && !mid_frame(ws, s))
        send_frame(ws, s, SL_WSF_PING, ka_token, sizeof(ka_token));
    ws->last_ping_ms = now;
  }
  settle(ws);
  if (leave(ws) && !ws->ending && x->ws == ws && !ws->close_wait) {
    uint64_t tick = tick_ms(ws);
    if (tick != UINT64_MAX) uv_timer_start(x->timer, on_session_timer, tick, 0);
  }
}

static void leg_lost(sl_ws_t *ws, int s) {
  ws->out[s].lost = true;
  if (s == UPSTREAM) {
    if (!ws->in[UPSTREAM].close_rcvd) {
      ws->x->conn->w->stats.ws_upstream_lost++;
      if (ws->x->pool->m->ws_lost) sl_m_inc(ws->x->pool->m->ws_lost, 1);
    }
    queue_close(ws, CLIENT, 1011, "upstream connection lost");
  } else {
    queue_close(ws, UPSTREAM, 1001, "client went away");
  }
}

static void on_read(sl_ws_t *ws, int s, const char *data, ssize_t n) {
  enter(ws);
  if (n < 0)
    leg_lost(ws, s);
  else
    feed(ws, s, (const uint8_t *)data, (size_t)n);
  settle(ws);
  leave(ws);
}

void sl_ws_client_read(sl_ws_t *ws, const char *data, ssize_t n) { on_read(ws, CLIENT, data, n); }

static void on_up_read(void *ctx, sl_upconn_t *u, const char *data, ssize_t n) {
  on_read(ctx, UPSTREAM, data, n);
}

static void drained(sl_ws_t *ws) {
  enter(ws);
  settle(ws);
  leave(ws);
}

static void on_up_drained(void *ctx, sl_upconn_t *u) { drained(ctx); }

void sl_ws_client_drained(sl_ws_t *ws) { drained(ws); }

static const sl_upconn_ops_t ws_up_ops = {
    .read = on_up_read,
    .drained = on_up_drained,
};

int sl_ws_start(sl_exchange_t *x, const char *accept, const char *protocol, size_t protocol_len,
                const char *early, size_t early_len) {
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
  size_t head_len = b.len;
  sl_buf_free(&b);
  if (rc < 0) return -1;

  sl_ws_t *ws = sl_calloc(1, sizeof(*ws));
  ws->x = x;
  ws->to_client = head_len;
  x->ws = ws;
  x->up->ops = &ws_up_ops;
  x->up->ctx = ws;
  x->conn->w->stats.ws_sessions++;
  ws->last_activity_ms = ws->last_ping_ms = sl_worker_now(x->conn->w);
  uint64_t tick = tick_ms(ws);
  if (tick != UINT64_MAX) uv_timer_start(x->timer, on_session_timer, tick, 0);
  enter(ws);
  if (early_len) feed(ws, UPSTREAM, (const uint8_t *)early, early_len);
  sl_conn_t *c = x->conn;
  if (c->in.len && !ws->dead) /* frames the client sent right after its upgrade request */
    feed(ws, CLIENT, (const uint8_t *)c->in.data, c->in.len);
  sl_buf_free(&c->in); /* a session never parses HTTP on this connection again */
  settle(ws);
  leave(ws);
  return 0;
}

uint64_t sl_ws_bytes_to_client(const sl_ws_t *ws) { return ws->to_client; }

void sl_ws_shutdown(sl_ws_t *ws) {
  enter(ws);
  queue_close(ws, CLIENT, 1012, "gateway restarting");
  queue_close(ws, UPSTREAM, 1001, "gateway shutting down");
  settle(ws);
  leave(ws);
}
