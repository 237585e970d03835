/* ws_echo.c — WebSocket echo upstream for bench/ws/run.sh (bench-only tool).
 *
 * One libuv loop, one thread. Accepts HTTP/1.1 upgrades on any path and then echoes every
 * binary message whose first byte is 0xEE back as one binary message (the same convention
 * as examples/mock/stt); other data messages are dropped, pings are answered, a close is
 * answered and the connection closed. A request that is not an upgrade gets 200 "ok".
 * Output produced while handling one read is written with a single write, and reading
 * pauses while more than 1 MiB is queued toward a peer.
 *
 * usage: ws-echo [--listen 127.0.0.1:0] [--port-file FILE]
 * SIGTERM/SIGINT: prints counters to stderr and exits. */
#include "wsb.h"

#include <signal.h>
#include <uv.h>
#include <wslay/wslay.h>

#define HEAD_MAX (16 * 1024)
#define OUT_HIGH (1024 * 1024)
#define OUT_LOW (256 * 1024)

typedef struct conn {
  uv_tcp_t tcp;
  int state; /* 0 reading the request head, 1 WebSocket, 2 closing */
  char *head;
  size_t head_len;
  wslay_event_context_ptr ws;
  const uint8_t *in;
  size_t in_len;
  wsb_buf_t out;
  int paused, close_after_write;
} conn_t;

typedef struct {
  uv_write_t req;
  uv_buf_t buf;
} wreq_t;

static uv_loop_t *loop;
static uint64_t n_conns, n_sessions, n_msgs, n_bytes, n_dropped, n_open;
static char rbuf[256 * 1024];

static void on_closed(uv_handle_t *h) {
  conn_t *c = h->data;
  if (c->ws) wslay_event_context_free(c->ws);
  free(c->head);
  wsb_buf_free(&c->out);
  free(c);
  n_open--;
}

static void conn_close(conn_t *c) {
  if (uv_is_closing((uv_handle_t *)&c->tcp)) return;
  c->state = 2;
  uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b);
static void on_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b);

static void on_write(uv_write_t *r, int status) {
  wreq_t *w = (wreq_t *)r;
  conn_t *c = r->handle->data;
  free(w->buf.base);
  free(w);
  if (uv_is_closing((uv_handle_t *)&c->tcp)) return;
  if (status < 0) {
    conn_close(c);
    return;
  }
  size_t q = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
  if (q == 0 && c->close_after_write) {
    conn_close(c);
    return;
  }
  if (c->paused && q < OUT_LOW) {
    c->paused = 0;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  }
}

/* Writes everything staged in c->out: directly when nothing is queued, the rest queued. */
static void flush(conn_t *c) {
  if (!c->out.len || uv_is_closing((uv_handle_t *)&c->tcp)) return;
  uv_stream_t *s = (uv_stream_t *)&c->tcp;
  size_t off = 0;
  if (uv_stream_get_write_queue_size(s) == 0) {
    uv_buf_t b = uv_buf_init((char *)c->out.data, (unsigned)c->out.len);
    int n = uv_try_write(s, &b, 1);
    if (n > 0) off = (size_t)n;
    else if (n != UV_EAGAIN && n != UV_ENOSYS) {
      c->out.len = 0;
      conn_close(c);
      return;
    }
  }
  if (off < c->out.len) {
    wreq_t *w = wsb_xmalloc(sizeof(*w));
    size_t rest = c->out.len - off;
    w->buf = uv_buf_init(wsb_xmalloc(rest), (unsigned)rest);
    memcpy(w->buf.base, c->out.data + off, rest);
    if (uv_write(&w->req, s, &w->buf, 1, on_write) != 0) {
      free(w->buf.base);
      free(w);
      c->out.len = 0;
      conn_close(c);
      return;
    }
    if (!c->paused && uv_stream_get_write_queue_size(s) > OUT_HIGH) {
      c->paused = 1;
      uv_read_stop(s);
    }
  } else if (c->close_after_write) {
    c->out.len = 0;
    conn_close(c);
    return;
  }
  c->out.len = 0;
}

/* wslay callbacks ----------------------------------------------------------------------- */

static ssize_t ws_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                       void *ud) {
  conn_t *c = ud;
  if (!c->in_len) {
    wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
    return -1;
  }
  size_t n = len < c->in_len ? len : c->in_len;
  memcpy(buf, c->in, n);
  c->in += n;
  c->in_len -= n;
  return (ssize_t)n;
}

static ssize_t ws_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *ud) {
  conn_t *c = ud;
  wsb_buf_add(&c->out, data, len);
  return (ssize_t)len;
}

static void ws_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *a,
                   void *ud) {
  if (a->opcode != WSLAY_BINARY_FRAME) {
    if (a->opcode == WSLAY_TEXT_FRAME) n_dropped++;
    return; /* ping/pong/close are handled by wslay */
  }
  if (a->msg_length < 1 || a->msg[0] != 0xEE) {
    n_dropped++;
    return;
  }
  struct wslay_event_msg m = {WSLAY_BINARY_FRAME, a->msg, a->msg_length};
  wslay_event_queue_msg(ctx, &m);
  n_msgs++;
  n_bytes += a->msg_length;
}

static const struct wslay_event_callbacks ws_cbs = {
    .recv_callback = ws_recv, .send_callback = ws_send, .on_msg_recv_callback = ws_msg};

static void ws_feed(conn_t *c, const uint8_t *p, size_t n) {
  c->in = p;
  c->in_len = n;
  int rc = wslay_event_recv(c->ws);
  c->in_len = 0;
  if (rc == 0 && wslay_event_want_write(c->ws)) rc = wslay_event_send(c->ws);
  if (rc != 0) {
    flush(c);
    conn_close(c);
    return;
  }
  if (wslay_event_get_close_received(c->ws) && wslay_event_get_close_sent(c->ws) &&
      !wslay_event_want_write(c->ws))
    c->close_after_write = 1;
  if (c->out.len) flush(c);
  else if (c->close_after_write && uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) == 0)
    conn_close(c);
}

/* HTTP: the opening handshake ------------------------------------------------------------ */

static void handle_head(conn_t *c, size_t head_end) {
  size_t n = 0;
  const char *key = wsb_header(c->head, head_end, "sec-websocket-key", &n);
  const char *up = wsb_header(c->head, head_end, "upgrade", &(size_t){0});
  if (!key || !up || n == 0) {
    static const char ok[] =
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        "Connection: close\r\n\r\nok\n";
    wsb_buf_add(&c->out, ok, sizeof(ok) - 1);
    c->close_after_write = 1;
    flush(c);
    return;
  }
  char acc[29];
  wsb_accept_key(key, n, acc);
  char resp[256];
  int len = snprintf(resp, sizeof(resp),
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                     acc);
  wsb_buf_add(&c->out, resp, (size_t)len);
  if (wslay_event_context_server_init(&c->ws, &ws_cbs, c) != 0) {
    conn_close(c);
    return;
  }
  wslay_event_config_set_max_recv_msg_length(c->ws, 16 * 1024 * 1024);
  c->state = 1;
  n_sessions++;
  size_t rest = c->head_len - head_end;
  char *head = c->head;
  c->head = NULL;
  if (rest) ws_feed(c, (const uint8_t *)head + head_end, rest); /* flushes */
  else flush(c);
  free(head);
}

static void on_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b) {
  *b = uv_buf_init(rbuf, sizeof(rbuf));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b) {
  conn_t *c = s->data;
  if (n == 0) return;
  if (n < 0) {
    conn_close(c);
    return;
  }
  if (c->state == 1) {
    ws_feed(c, (const uint8_t *)b->base, (size_t)n);
    return;
  }
  if (c->state != 0) return;
  if (c->head_len + (size_t)n > HEAD_MAX) {
    conn_close(c);
    return;
  }
  if (!c->head) c->head = wsb_xmalloc(HEAD_MAX);
  memcpy(c->head + c->head_len, b->base, (size_t)n);
  c->head_len += (size_t)n;
  char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
  if (end) handle_head(c, (size_t)(end + 4 - c->head));
}

static void on_conn(uv_stream_t *srv, int status) {
  if (status < 0) return;
  conn_t *c = calloc(1, sizeof(*c));
  if (!c) abort();
  uv_tcp_init(loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(srv, (uv_stream_t *)&c->tcp) != 0) {
    uv_close((uv_handle_t *)&c->tcp, (uv_close_cb)free);
    return;
  }
  n_conns++;
  n_open++;
  uv_tcp_nodelay(&c->tcp, 1);
  uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_signal(uv_signal_t *h, int sig) {
  fprintf(stderr,
          "ws-echo: connections=%llu sessions=%llu open=%llu echoed=%llu bytes=%llu "
          "dropped=%llu\n",
          (unsigned long long)n_conns, (unsigned long long)n_sessions,
          (unsigned long long)n_open, (unsigned long long)n_msgs, (unsigned long long)n_bytes,
          (unsigned long long)n_dropped);
  exit(0);
}

int main(int argc, char **argv) {
  const char *listen_at = "127.0.0.1:0", *port_file = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--listen") && i + 1 < argc) listen_at = argv[++i];
    else if (!strcmp(argv[i], "--port-file") && i + 1 < argc) port_file = argv[++i];
    else {
      fprintf(stderr, "usage: ws-echo [--listen HOST:PORT] [--port-file FILE]\n");
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  loop = uv_default_loop();
  char host[64];
  const char *colon = strrchr(listen_at, ':');
  if (!colon || (size_t)(colon - listen_at) >= sizeof(host)) {
    fprintf(stderr, "ws-echo: bad --listen %s\n", listen_at);
    return 2;
  }
  memcpy(host, listen_at, (size_t)(colon - listen_at));
  host[colon - listen_at] = 0;
  struct sockaddr_in sa;
  if (uv_ip4_addr(host, atoi(colon + 1), &sa) != 0) {
    fprintf(stderr, "ws-echo: bad address %s\n", listen_at);
    return 2;
  }
  uv_tcp_t srv;
  uv_tcp_init(loop, &srv);
  int rc = uv_tcp_bind(&srv, (const struct sockaddr *)&sa, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&srv, 4096, on_conn);
  if (rc != 0) {
    fprintf(stderr, "ws-echo: listen %s: %s\n", listen_at, uv_strerror(rc));
    return 1;
  }
  struct sockaddr_storage ss;
  int sl = sizeof(ss);
  uv_tcp_getsockname(&srv, (struct sockaddr *)&ss, &sl);
  int port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  if (port_file) {
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", port_file);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%d\n", port) < 0 || fclose(f) != 0 || rename(tmp, port_file) != 0) {
      fprintf(stderr, "ws-echo: cannot write %s\n", port_file);
      return 1;
    }
  }
  fprintf(stderr, "ws-echo: listening on %s:%d\n", host, port);
  uv_signal_t s1, s2;
  uv_signal_init(loop, &s1);
  uv_signal_init(loop, &s2);
  uv_signal_start(&s1, on_signal, SIGTERM);
  uv_signal_start(&s2, on_signal, SIGINT);
  uv_unref((uv_handle_t *)&s1);
  uv_unref((uv_handle_t *)&s2);
  return uv_run(loop, UV_RUN_DEFAULT);
}
