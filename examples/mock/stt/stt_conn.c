/* stt_conn.c — one client connection: reading, ordered writes with backpressure, the
 * connection timer, close.
 *
 * Output is double-buffered: everything to send is appended to c->staged (HTTP responses,
 * and the WebSocket frames wslay produces), and one uv_write at a time carries a whole
 * staged batch, swapped into c->flight. Reads pause while the backlog is over
 * STT_OUT_HIGH, so a client that does not read cannot make the server buffer without
 * bound; wslay keeps what it could not stage in its own queue meanwhile. */
#include "stt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LINGER_MS 2000 /* after our FIN, how long to drain the client before closing */

/* ---- close ---- */

static void conn_free(stt_conn_t *c) {
  free(c->in);
  mock_buf_free(&c->staged);
  mock_buf_free(&c->flight);
  mock_buf_free(&c->hbuf);
  stt_ws_free(c->ws);
  free(c);
}

static void on_close(uv_handle_t *h) {
  stt_conn_t *c = h->data;
  if (--c->open_handles == 0)
    conn_free(c);
}

void stt_conn_close(stt_conn_t *c) {
  if (c->closing)
    return;
  c->closing = 1;
  if (c->ws)
    stt_ws_closing(c, NULL);
  stt_list_remove(&c->link);
  uv_close((uv_handle_t *)&c->timer, on_close);
  uv_close((uv_handle_t *)&c->tcp, on_close); /* cancels a write in flight */
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  stt_conn_t *c = req->handle->data;
  if (c->closing)
    return;
  if (status < 0) {
    stt_conn_close(c);
    return;
  }
  /* Closing with request bytes unread would send RST and could destroy the response in
   * flight; so wait (briefly) for the client's own FIN instead. */
  stt_conn_update_reading(c);
  stt_conn_timer(c, LINGER_MS);
}

/* Shuts the write side down once an ending connection's output is all written. */
static void maybe_shutdown(stt_conn_t *c) {
  if (!c->ending || c->shutting || c->closing || c->writing || c->staged.len)
    return;
  c->shutting = 1;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) < 0)
    stt_conn_close(c);
}

void stt_conn_end(stt_conn_t *c) {
  if (c->closing || c->ending)
    return;
  c->ending = 1;
  stt_conn_flush(c);
  maybe_shutdown(c);
}

/* ---- writing ---- */

size_t stt_conn_pending(const stt_conn_t *c) { return c->staged.len + c->flight.len; }

void stt_conn_write(stt_conn_t *c, const void *p, size_t n) {
  if (!c->closing && !c->shutting)
    mock_buf_add(&c->staged, p, n);
}

static void on_write(uv_write_t *wr, int status) {
  stt_conn_t *c = wr->handle->data;
  c->writing = 0;
  c->flight.len = 0;
  if (c->closing)
    return;
  if (status < 0) {
    stt_conn_close(c);
    return;
  }
  if (c->mode == STT_WS) {
    stt_ws_pump(c); /* wslay may have more to send, and the session may be done */
    return;
  }
  stt_conn_flush(c);
  maybe_shutdown(c);
  stt_conn_update_reading(c);
}

void stt_conn_flush(stt_conn_t *c) {
  if (c->writing || c->closing || c->shutting || c->staged.len == 0)
    return;
  mock_buf_t t = c->flight; /* empty: its capacity is reused for the next batch */
  c->flight = c->staged;
  c->staged = t;
  uv_buf_t b = uv_buf_init(c->flight.data, (unsigned)c->flight.len);
  if (uv_write(&c->write_req, (uv_stream_t *)&c->tcp, &b, 1, on_write) < 0) {
    c->flight.len = 0;
    stt_conn_close(c);
    return;
  }
  c->writing = 1;
}

/* ---- timer ---- */

static void on_timer(uv_timer_t *t) {
  stt_conn_t *c = t->data;
  if (c->closing)
    return;
  if (c->shutting) { /* the lingering close ran out */
    stt_conn_close(c);
    return;
  }
  if (c->mode == STT_WS)
    stt_ws_on_timer(c);
}

void stt_conn_timer(stt_conn_t *c, uint64_t ms) {
  if (!c->closing)
    uv_timer_start(&c->timer, on_timer, ms, 0);
}

void stt_conn_timer_stop(stt_conn_t *c) {
  if (!c->closing)
    uv_timer_stop(&c->timer);
}

/* ---- reading ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  stt_conn_t *c = h->data;
  if (c->in_off == c->in_len)
    c->in_off = c->in_len = 0;
  if (c->in_off > 0 && STT_IN_CAP - c->in_len < 16 * 1024) {
    memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
    c->in_len -= c->in_off;
    c->in_off = 0;
  }
  /* A zero-length buffer makes libuv report UV_ENOBUFS; on_read then stops reading. */
  *buf = uv_buf_init(c->in + c->in_len, (unsigned)(STT_IN_CAP - c->in_len));
}

static void read_stop(stt_conn_t *c) {
  if (c->reading && !c->closing)
    uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  stt_conn_t *c = s->data;
  if (c->closing || nread == 0)
    return;
  if (nread == UV_ENOBUFS) {
    read_stop(c);
    return;
  }
  if (nread == UV_EOF && c->mode == STT_WS && stt_ws_eof(c))
    return; /* the client half-closed after its close frame: finish the session */
  if (nread < 0) { /* EOF or error: the client is gone */
    if (c->ws)
      stt_ws_closing(c, nread == UV_EOF ? "client EOF" : uv_strerror((int)nread));
    stt_conn_close(c);
    return;
  }
  if (c->shutting || c->ending) /* draining after our response: drop it */
    return;
  c->in_len += (size_t)nread;
  if (c->mode == STT_WS)
    stt_ws_received(c, (size_t)nread);
  else
    stt_http_input(c);
}

void stt_conn_update_reading(stt_conn_t *c) {
  if (c->closing)
    return;
  int want;
  if (c->shutting)
    want = 1; /* drain until the client's FIN */
  else if (c->ending || stt_conn_pending(c) >= STT_OUT_HIGH ||
           c->in_len - c->in_off >= STT_IN_CAP)
    want = 0;
  else
    want = c->mode == STT_HTTP || stt_ws_want_read(c);
  if (want && !c->reading) {
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
      stt_conn_close(c);
      return;
    }
    c->reading = 1;
  } else if (!want && c->reading) {
    read_stop(c);
  }
}

/* ---- accept ---- */

void stt_conn_accept(stt_server_t *srv) {
  stt_conn_t *c = mock_xmalloc(sizeof *c);
  memset(c, 0, sizeof *c);
  c->srv = srv;
  c->id = ++srv->conn_seq;
  stt_list_init(&c->link);
  uv_tcp_init(srv->loop, &c->tcp);
  uv_timer_init(srv->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->open_handles = 2;
  c->in = mock_xmalloc(STT_IN_CAP);
  mock_buf_reserve(&c->hbuf, 1024); /* never NULL: an empty URL is still a valid pointer */
  if (uv_accept((uv_stream_t *)&srv->listener, (uv_stream_t *)&c->tcp) < 0) {
    c->closing = 1;
    uv_close((uv_handle_t *)&c->timer, on_close);
    uv_close((uv_handle_t *)&c->tcp, on_close);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1); /* transcripts and echoes must leave at once */
  llhttp_init(&c->parser, HTTP_REQUEST, &srv->settings);
  c->parser.data = c;
  stt_list_push(&srv->conns, &c->link);
  stt_conn_update_reading(c);
}
