/* stt_ws.c — a WebSocket session: wslay's event API over the connection's buffers, the
 * mock speech-to-text protocol, and the closing handshake.
 *
 * wslay reads from c->in through recv_cb and writes into c->staged through send_cb; the
 * connection's uv_write carries staged bytes out, and send_cb says WOULDBLOCK while the
 * backlog is over STT_OUT_HIGH, so wslay keeps the rest queued until a write completes.
 *
 * The client's close frame is held back from wslay. wslay answers a close frame the
 * moment it parses it, and nothing can be queued after that, but the protocol wants the
 * final transcript (possibly delayed by --latency-ms) to go out before the echoed close.
 * So frame headers are scanned as they arrive (ws_scan), wslay is fed only the bytes
 * before the first close frame, and that frame is released ("the gate opens") once the
 * final transcript and everything queued before it has been staged. */
#include "stt.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <wslay/wslay.h>

#define CLOSE_WAIT_MS 2000 /* after our close frame, how long to wait for the client's */
#define TEXT_MAX_WORDS 64

struct stt_ws {
  wslay_event_context_ptr ctx;
  EVP_MD_CTX *md; /* SHA-256 of the audio payload, in order */
  uint64_t frames, bytes;
  /* stream positions, counted in bytes from the first byte after the upgrade request */
  uint64_t rx_total; /* bytes received */
  uint64_t next_hdr; /* where the first frame header not yet scanned starts */
  uint64_t close_at; /* where the client's close frame starts (close_seen) */
  int close_seen, scan_dead, gate_open;
  int ended;  /* final transcript triggered or the server closed: data is ignored */
  int drop;   /* --drop-after reached: the connection is dropped */
  int eof;    /* the client half-closed after its close frame */
  int logged; /* the session's end is accounted (or it never started) */
  /* the server closes with close_code and close_reason once wslay has sent the rest */
  int close_pending;
  uint16_t close_code;
  size_t close_rlen;
  char close_reason[123];
  uint64_t close_deadline; /* loop time at which the closing handshake is given up on */
  stt_link_t tq;           /* transcripts waiting out --latency-ms, oldest first */
};

/* A transcript message waiting for its time. */
typedef struct stt_tmsg {
  stt_link_t link;
  uint64_t due;
  uint16_t close_code; /* nonzero: close with this code right after it */
  size_t len;
  char text[];
} stt_tmsg_t;

static const char *const words[] = {"the",   "quick", "brown", "fox",   "jumps",  "over",
                                    "the",   "lazy",  "dog",   "while", "sluice", "relays",
                                    "every", "audio", "frame", "intact"};
#define NWORDS (sizeof words / sizeof words[0])

/* ---- stream positions ---- */

/* Position of c->in[c->in_off], the next byte wslay would read. */
static uint64_t fed_pos(const stt_conn_t *c) {
  return c->ws->rx_total - (uint64_t)(c->in_len - c->in_off);
}

/* Finds frame boundaries in the received bytes, up to the first close frame. Only the
 * header of each frame is read; wslay does the real parsing. */
static void ws_scan(stt_conn_t *c) {
  stt_ws_t *w = c->ws;
  uint64_t base = w->rx_total - c->in_len; /* position of c->in[0] */
  while (!w->close_seen && !w->scan_dead && w->next_hdr + 2 <= w->rx_total) {
    const unsigned char *p = (const unsigned char *)c->in + (w->next_hdr - base);
    uint64_t avail = w->rx_total - w->next_hdr, len = p[1] & 0x7f;
    size_t hlen = 2 + (len == 126 ? 2 : len == 127 ? 8 : 0) + ((p[1] & 0x80) ? 4 : 0);
    if (avail < hlen)
      break;
    if ((p[0] & 0x0f) == WSLAY_CONNECTION_CLOSE) {
      w->close_seen = 1;
      w->close_at = w->next_hdr;
      break;
    }
    if (len == 126) {
      len = (uint64_t)p[2] << 8 | p[3];
    } else if (len == 127) {
      len = 0;
      for (int i = 0; i < 8; i++)
        len = len << 8 | p[2 + i];
    }
    if (len > ((uint64_t)1 << 62)) { /* wslay will reject the frame; stop following */
      w->scan_dead = 1;
      break;
    }
    w->next_hdr += hlen + len;
  }
}

/* How far wslay may read: never into a frame header not yet scanned, nor into the
 * client's close frame while the gate is shut. */
static uint64_t feed_limit(const stt_conn_t *c) {
  const stt_ws_t *w = c->ws;
  if (w->scan_dead || w->gate_open)
    return w->rx_total;
  if (w->close_seen)
    return w->close_at;
  return w->next_hdr < w->rx_total ? w->next_hdr : w->rx_total;
}

/* ---- wslay callbacks ---- */

static ssize_t recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                       void *user) {
  stt_conn_t *c = user;
  uint64_t pos = fed_pos(c), lim = feed_limit(c);
  if (c->closing || c->ws->drop || pos >= lim) {
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
  }
  size_t n = lim - pos < len ? (size_t)(lim - pos) : len;
  memcpy(buf, c->in + c->in_off, n);
  c->in_off += n;
  return (ssize_t)n;
}

static ssize_t send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *user) {
  stt_conn_t *c = user;
  if (c->closing) {
    wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
    return -1;
  }
  if (c->staged.len >= STT_OUT_HIGH) {
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
  }
  stt_conn_write(c, data, len);
  return (ssize_t)len;
}

/* ---- transcripts ---- */

/* Starts the closing handshake after everything queued so far. wslay sends control
 * frames ahead of queued data, so stt_ws_pump queues the close frame only once wslay has
 * nothing else left to send. */
static void close_after_queued(stt_ws_t *w, uint16_t code, const char *reason, size_t rlen) {
  if (w->close_pending)
    return;
  w->close_pending = 1;
  w->close_code = code;
  w->close_rlen = rlen < sizeof w->close_reason ? rlen : sizeof w->close_reason;
  memcpy(w->close_reason, reason, w->close_rlen);
}

/* Queues one text message, and a close after it when close_code is set. A session that
 * is already closing has nowhere to put it; that is not an error. */
static void transcript_send(stt_conn_t *c, const char *text, size_t len, uint16_t close_code) {
  stt_ws_t *w = c->ws;
  struct wslay_event_msg m = {WSLAY_TEXT_FRAME, (const uint8_t *)text, len};
  wslay_event_queue_msg(w->ctx, &m);
  if (close_code)
    close_after_queued(w, close_code, "", 0);
}

/* Sends a transcript message after --latency-ms, in order with the ones before it. */
static void transcript_emit(stt_conn_t *c, const mock_buf_t *msg, uint16_t close_code) {
  stt_ws_t *w = c->ws;
  if (c->srv->opts.latency_ms == 0 && stt_list_empty(&w->tq)) {
    transcript_send(c, msg->data, msg->len, close_code);
    return;
  }
  stt_tmsg_t *t = mock_xmalloc(sizeof *t + msg->len);
  t->due = uv_now(c->srv->loop) + c->srv->opts.latency_ms;
  t->close_code = close_code;
  t->len = msg->len;
  memcpy(t->text, msg->data, msg->len);
  stt_list_push(&w->tq, &t->link);
}

static void tq_clear(stt_ws_t *w) {
  while (!stt_list_empty(&w->tq)) {
    stt_tmsg_t *t = STT_CONTAINER(w->tq.next, stt_tmsg_t, link);
    stt_list_remove(&t->link);
    free(t);
  }
}

/* A made-up transcript for `frames` audio frames: one word per --partial-every frames,
 * rounded down for partials and up for the final one. */
static void add_text(stt_conn_t *c, mock_buf_t *b, uint64_t frames, int round_up) {
  uint64_t per = c->srv->opts.partial_every ? c->srv->opts.partial_every : 5;
  uint64_t n = (frames + (round_up ? per - 1 : 0)) / per;
  mock_buf_t t = {0};
  if (n > TEXT_MAX_WORDS)
    n = TEXT_MAX_WORDS;
  for (uint64_t i = 0; i < n; i++) {
    if (i)
      mock_buf_add(&t, " ", 1);
    mock_buf_adds(&t, words[i % NWORDS]);
  }
  mock_buf_add_json_str(b, t.data ? t.data : "", t.len);
  mock_buf_free(&t);
}

static void add_instance(stt_conn_t *c, mock_buf_t *b) {
  mock_buf_adds(b, ",\"instance\":");
  mock_buf_add_json_str(b, c->srv->opts.name, strlen(c->srv->opts.name));
  mock_buf_adds(b, "}");
}

static void emit_partial(stt_conn_t *c) {
  stt_ws_t *w = c->ws;
  mock_buf_t b = {0};
  mock_buf_adds(&b, "{\"type\":\"partial\",\"text\":");
  add_text(c, &b, w->frames, 0);
  mock_buf_addf(&b, ",\"frames\":%" PRIu64, w->frames);
  add_instance(c, &b);
  transcript_emit(c, &b, 0);
  mock_buf_free(&b);
}

/* The final transcript; afterwards the session takes no more data. close_code: the
 * server closes after it (the client sent "end"), or 0 (the client is closing). */
static void emit_final(stt_conn_t *c, uint16_t close_code) {
  stt_ws_t *w = c->ws;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned mdlen = 0;
  char hex[2 * EVP_MAX_MD_SIZE + 1] = "";
  w->ended = 1;
  if (EVP_DigestFinal_ex(w->md, md, &mdlen))
    mock_hex(md, mdlen, hex);
  mock_buf_t b = {0};
  mock_buf_adds(&b, "{\"type\":\"final\",\"text\":");
  add_text(c, &b, w->frames, 1);
  mock_buf_addf(&b, ",\"frames\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"sha256\":\"%s\"", w->frames,
               w->bytes, hex);
  add_instance(c, &b);
  transcript_emit(c, &b, close_code);
  mock_buf_free(&b);
}

/* ---- messages ---- */

static void on_audio(stt_conn_t *c, const uint8_t *p, size_t n) {
  stt_ws_t *w = c->ws;
  stt_opts_t *o = &c->srv->opts;
  w->frames++;
  w->bytes += n;
  c->srv->stats.frames++;
  c->srv->stats.bytes += n;
  EVP_DigestUpdate(w->md, p, n);
  if (o->drop_after && w->frames >= o->drop_after) {
    w->drop = 1; /* recv_cb stops feeding; stt_ws_pump drops the connection */
    return;
  }
  if (n && p[0] == 0xEE) {
    struct wslay_event_msg m = {WSLAY_BINARY_FRAME, p, n};
    wslay_event_queue_msg(w->ctx, &m);
  }
  if (o->partial_every && w->frames % o->partial_every == 0)
    emit_partial(c);
}

/* Close codes a server may send (RFC 6455 section 7.4 and the IANA registry). */
static int close_code_sendable(uint64_t code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
         (code >= 3000 && code <= 4999);
}

/* "close:CODE" or "close:CODE:REASON": the server starts the closing handshake. */
static void on_close_request(stt_conn_t *c, const char *s, size_t n) {
  stt_ws_t *w = c->ws;
  const char *colon = memchr(s, ':', n);
  size_t clen = colon ? (size_t)(colon - s) : n;
  const char *reason = colon ? colon + 1 : "";
  size_t rlen = colon ? n - clen - 1 : 0;
  uint64_t code;
  if (mock_parse_u64(s, clen, 65535, &code) < 0 || !close_code_sendable(code)) {
    static const char err[] = "{\"type\":\"error\",\"error\":\"close:CODE wants a close code "
                              "1000-1003, 1007-1014 or 3000-4999\"}";
    struct wslay_event_msg m = {WSLAY_TEXT_FRAME, (const uint8_t *)err, sizeof err - 1};
    wslay_event_queue_msg(w->ctx, &m);
    return;
  }
  if (rlen > 123) { /* a close frame holds 125 bytes; cut on a UTF-8 character boundary */
    rlen = 123;
    while (rlen && ((unsigned char)reason[rlen] & 0xc0) == 0x80)
      rlen--;
  }
  tq_clear(w); /* the close goes now; transcripts still waiting are dropped */
  w->ended = 1;
  close_after_queued(w, (uint16_t)code, reason, rlen);
}

/* Whether s is {"type":"end"}, give or take whitespace. */
static int is_end(const char *s, size_t n) {
  static const char want[] = "{\"type\":\"end\"}";
  size_t j = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')
      continue;
    if (j == sizeof want - 1 || s[i] != want[j])
      return 0;
    j++;
  }
  return j == sizeof want - 1;
}

static void on_text(stt_conn_t *c, const uint8_t *p, size_t n) {
  const char *s = (const char *)p;
  if (n >= 5 && memcmp(s, "echo:", 5) == 0) {
    struct wslay_event_msg m = {WSLAY_TEXT_FRAME, p, n};
    wslay_event_queue_msg(c->ws->ctx, &m);
  } else if (n >= 6 && memcmp(s, "close:", 6) == 0) {
    on_close_request(c, s + 6, n - 6);
  } else if (is_end(s, n)) {
    emit_final(c, WSLAY_CODE_NORMAL_CLOSURE);
  }
  /* anything else (a config message, say) is ignored */
}

static void on_msg_recv(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                        void *user) {
  stt_conn_t *c = user;
  stt_ws_t *w = c->ws;
  if (c->closing || w->drop || w->ended)
    return;
  if (arg->opcode == WSLAY_BINARY_FRAME)
    on_audio(c, arg->msg, arg->msg_length);
  else if (arg->opcode == WSLAY_TEXT_FRAME)
    on_text(c, arg->msg, arg->msg_length);
  /* pings, pongs and close frames are answered by wslay itself */
}

/* ---- the session ---- */

/* At the client's close frame, with everything before it processed: the final
 * transcript is due (unless the session already ended). */
static int at_client_close(const stt_conn_t *c) {
  const stt_ws_t *w = c->ws;
  return w->close_seen && !w->gate_open && fed_pos(c) == w->close_at;
}

/* Lets wslay have the client's close frame once the final transcript and everything
 * queued before it has been staged. Returns 1 when the gate has just opened. */
static int gate_try_open(stt_conn_t *c) {
  stt_ws_t *w = c->ws;
  if (!at_client_close(c) || !stt_list_empty(&w->tq) || wslay_event_want_write(w->ctx))
    return 0;
  w->gate_open = 1;
  return 1;
}

static void session_log(stt_conn_t *c, const char *why) {
  stt_ws_t *w = c->ws;
  if (w->logged)
    return;
  w->logged = 1;
  c->srv->stats.sessions_open--;
  if (c->srv->opts.quiet)
    return;
  fprintf(stderr,
          "sluice-mock-stt %s: session %" PRIu64 " ended (%s): frames=%" PRIu64 " bytes=%" PRIu64
          " close sent=%u received=%u\n",
          c->srv->opts.name, c->id, why, w->frames, w->bytes,
          (unsigned)wslay_event_get_status_code_sent(w->ctx),
          (unsigned)wslay_event_get_status_code_received(w->ctx));
}

void stt_ws_closing(stt_conn_t *c, const char *why) {
  stt_ws_t *w = c->ws;
  if (w->logged)
    return;
  if (!why)
    why = w->drop ? "dropped (--drop-after)"
          : wslay_event_get_close_sent(w->ctx) && wslay_event_get_close_received(w->ctx)
              ? "closed"
              : "aborted";
  session_log(c, why);
}

/* Arms the connection timer for the next transcript or the end of the close wait. */
static void arm_timer(stt_conn_t *c) {
  stt_ws_t *w = c->ws;
  uint64_t next = UINT64_MAX, now = uv_now(c->srv->loop);
  if (!stt_list_empty(&w->tq))
    next = STT_CONTAINER(w->tq.next, stt_tmsg_t, link)->due;
  if (w->close_deadline && w->close_deadline < next)
    next = w->close_deadline;
  if (next == UINT64_MAX)
    stt_conn_timer_stop(c);
  else
    stt_conn_timer(c, next > now ? next - now : 0);
}

void stt_ws_pump(stt_conn_t *c) {
  stt_ws_t *w = c->ws;
  for (;;) {
    ws_scan(c);
    if (wslay_event_get_read_enabled(w->ctx) && fed_pos(c) < feed_limit(c) &&
        wslay_event_recv(w->ctx) < 0) {
      stt_ws_closing(c, "wslay receive failed");
      stt_conn_close(c);
      return;
    }
    if (w->drop) { /* a crashed instance: no close frame, nothing more written */
      stt_conn_close(c);
      return;
    }
    if (at_client_close(c) && !w->ended)
      emit_final(c, 0);
    if (wslay_event_want_write(w->ctx) && wslay_event_send(w->ctx) < 0) {
      stt_ws_closing(c, "wslay send failed");
      stt_conn_close(c);
      return;
    }
    if (w->close_pending && !wslay_event_want_write(w->ctx)) {
      w->close_pending = 0; /* NO_MORE_MSG: the client's close came first; fine */
      wslay_event_queue_close(w->ctx, w->close_code, (const uint8_t *)w->close_reason,
                              w->close_rlen);
      continue;
    }
    if (!gate_try_open(c))
      break;
  }
  stt_conn_flush(c);
  if (wslay_event_get_close_sent(w->ctx)) {
    /* The server closes the TCP connection first (RFC 6455 section 7.1.1), once the close
     * frame is out and the client has answered it, or cannot be listened to any more. */
    if (wslay_event_get_close_received(w->ctx) || !wslay_event_get_read_enabled(w->ctx)) {
      if (stt_conn_pending(c) == 0)
        stt_conn_close(c);
      return;
    }
    if (!w->close_deadline)
      w->close_deadline = uv_now(c->srv->loop) + CLOSE_WAIT_MS;
  }
  arm_timer(c);
  stt_conn_update_reading(c);
}

void stt_ws_received(stt_conn_t *c, size_t n) {
  c->ws->rx_total += n;
  stt_ws_pump(c);
}

void stt_ws_on_timer(stt_conn_t *c) {
  stt_ws_t *w = c->ws;
  uint64_t now = uv_now(c->srv->loop);
  while (!stt_list_empty(&w->tq)) {
    stt_tmsg_t *t = STT_CONTAINER(w->tq.next, stt_tmsg_t, link);
    if (t->due > now)
      break;
    stt_list_remove(&t->link);
    transcript_send(c, t->text, t->len, t->close_code);
    free(t);
  }
  if (w->close_deadline && now >= w->close_deadline) {
    stt_ws_closing(c, "closing handshake timed out");
    stt_conn_close(c);
    return;
  }
  stt_ws_pump(c);
}

int stt_ws_want_read(const stt_conn_t *c) {
  return !c->ws->drop && !c->ws->eof && wslay_event_get_read_enabled(c->ws->ctx);
}

int stt_ws_eof(stt_conn_t *c) {
  stt_ws_t *w = c->ws;
  if (!w->close_seen || w->eof)
    return 0;
  w->eof = 1;
  /* in case the close frame is truncated: wslay would wait for the rest forever */
  w->close_deadline = uv_now(c->srv->loop) + c->srv->opts.latency_ms + CLOSE_WAIT_MS;
  stt_ws_pump(c);
  return 1;
}

int stt_ws_start(stt_conn_t *c) {
  static const struct wslay_event_callbacks cbs = {
      .recv_callback = recv_cb, .send_callback = send_cb, .on_msg_recv_callback = on_msg_recv};
  stt_ws_t *w = mock_xmalloc(sizeof *w);
  memset(w, 0, sizeof *w);
  stt_list_init(&w->tq);
  w->logged = 1; /* until the session is counted open */
  c->ws = w;
  w->md = EVP_MD_CTX_new();
  if (!w->md || !EVP_DigestInit_ex(w->md, EVP_sha256(), NULL) ||
      wslay_event_context_server_init(&w->ctx, &cbs, c) != 0)
    return -1;
  wslay_event_config_set_max_recv_msg_length(w->ctx, c->srv->opts.max_message);
  /* The bytes after the request head are the first WebSocket bytes; keep them at in[0]
   * so that positions are simple to map. */
  memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
  c->in_len -= c->in_off;
  c->in_off = 0;
  w->rx_total = c->in_len;
  w->logged = 0;
  c->srv->stats.sessions_open++;
  c->srv->stats.sessions_total++;
  return 0;
}

void stt_ws_free(stt_ws_t *w) {
  if (!w)
    return;
  tq_clear(w);
  if (w->ctx)
    wslay_event_context_free(w->ctx);
  EVP_MD_CTX_free(w->md);
  free(w);
}
