/* mock_conn.c — one client connection: reading, llhttp parsing, ordered writes, close.
 *
 * Requests on a connection are handled one at a time: on_message_complete pauses the
 * parser, the request is dispatched, and the bytes after it (pipelined requests) stay
 * unparsed in the input buffer until the response has been fully written. That keeps
 * responses in request order without a response queue. Reading continues meanwhile, so a
 * client that goes away is noticed at once (up to MOCK_IN_MAX of held input). */
#include "mock.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LINGER_MS 2000 /* after our FIN, how long to drain the client before closing */

static const char EMPTY_SHA256[] =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/* A write request and, for copied writes, its bytes. Freed in on_write. */
typedef struct mock_wreq {
  uv_write_t req;
  uv_buf_t buf;
  char data[];
} mock_wreq_t;

static void conn_parse(mock_conn_t *c);
static void read_start(mock_conn_t *c);

/* ---- close ---- */

static void conn_free(mock_conn_t *c) {
  free(c->in);
  mock_buf_free(&c->hbuf);
  mock_buf_free(&c->req.body);
  mock_buf_free(&c->out);
  mock_buf_free(&c->head);
  EVP_MD_CTX_free(c->md);
  free(c);
}

static void on_close(uv_handle_t *h) {
  mock_conn_t *c = h->data;
  if (--c->open_handles == 0)
    conn_free(c);
}

void mock_conn_close(mock_conn_t *c, int peer_gone, int reset) {
  if (c->closing)
    return;
  c->closing = 1;
  mock_req_abandon(c, peer_gone);
  mock_list_remove(&c->link);
  c->srv->open_conns--;
  uv_timer_stop(&c->timer);
  uv_close((uv_handle_t *)&c->timer, on_close);
  /* close_reset refuses while a shutdown is pending; a plain close is right then. */
  if (reset && uv_tcp_close_reset(&c->tcp, on_close) == 0)
    return;
  uv_close((uv_handle_t *)&c->tcp, on_close);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  mock_conn_t *c = req->handle->data;
  if (c->closing)
    return;
  if (status < 0) {
    mock_conn_close(c, 0, 0);
    return;
  }
  /* Closing now, with request bytes still unread, would send RST and could destroy the
   * response in flight; so wait (briefly) for the client's own FIN instead. */
  read_start(c);
  mock_timer_start(c, LINGER_MS);
}

/* Ends the connection gracefully once queued writes are out. */
static void conn_end(mock_conn_t *c) {
  if (c->closing || c->shutting)
    return;
  c->shutting = 1;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) < 0)
    mock_conn_close(c, 0, 0);
}

/* ---- writing ---- */

static void on_write(uv_write_t *wr, int status) {
  mock_conn_t *c = wr->handle->data;
  free(wr);
  c->writes_pending--;
  if (c->closing)
    return;
  if (status < 0) {
    mock_conn_close(c, 1, 0);
    return;
  }
  if (c->writes_pending == 0 && !c->shutting)
    mock_on_drain(c);
}

static void write_wreq(mock_conn_t *c, mock_wreq_t *w) {
  c->writes_pending++;
  if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &w->buf, 1, on_write) < 0) {
    c->writes_pending--;
    free(w);
    mock_conn_close(c, 1, 0);
  }
}

void mock_send(mock_conn_t *c, const char *a, size_t alen, const char *b, size_t blen) {
  if (c->closing || c->shutting || alen + blen == 0)
    return;
  mock_wreq_t *w = mock_xmalloc(sizeof *w + alen + blen);
  if (alen)
    memcpy(w->data, a, alen);
  if (blen)
    memcpy(w->data + alen, b, blen);
  w->buf = uv_buf_init(w->data, (unsigned)(alen + blen));
  write_wreq(c, w);
}

void mock_send_static(mock_conn_t *c, const char *p, size_t n) {
  if (c->closing || c->shutting || n == 0)
    return;
  mock_wreq_t *w = mock_xmalloc(sizeof *w);
  w->buf = uv_buf_init((char *)p, (unsigned)n); /* libuv never writes through base */
  write_wreq(c, w);
}

/* ---- timer ---- */

static void on_timer(uv_timer_t *t) {
  mock_conn_t *c = t->data;
  if (c->closing)
    return;
  if (c->shutting) { /* the lingering close ran out */
    mock_conn_close(c, 0, 0);
    return;
  }
  mock_on_timer(c);
}

void mock_timer_start(mock_conn_t *c, uint64_t ms) {
  if (!c->closing)
    uv_timer_start(&c->timer, on_timer, ms, 0);
}

/* ---- reading ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  mock_conn_t *c = h->data;
  if (c->in_off == c->in_len)
    c->in_off = c->in_len = 0;
  if (c->in_cap - c->in_len < 4096 && c->in_off > 0) {
    memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
    c->in_len -= c->in_off;
    c->in_off = 0;
  }
  if (c->in_cap - c->in_len < 4096 && c->in_cap < MOCK_IN_MAX) {
    c->in_cap = c->in_cap ? c->in_cap * 2 : MOCK_IN_INITIAL;
    c->in = mock_xrealloc(c->in, c->in_cap);
  }
  /* A zero-length buffer makes libuv report UV_ENOBUFS; on_read then stops reading. */
  *buf = uv_buf_init(c->in + c->in_len, (unsigned)(c->in_cap - c->in_len));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  mock_conn_t *c = s->data;
  if (c->closing)
    return;
  if (nread == UV_ENOBUFS) {
    uv_read_stop(s);
    c->reading = 0;
    return;
  }
  if (nread < 0) { /* EOF or error: the client is gone, whatever it was waiting for */
    mock_conn_close(c, 1, 0);
    return;
  }
  if (c->shutting) /* draining after our FIN: drop it */
    return;
  c->in_len += (size_t)nread;
  if (c->req.phase != MOCK_P_IDLE) {
    /* Busy with a request: hold pipelined input, and stop reading if it piles up. */
    if (c->in_cap >= MOCK_IN_MAX && c->in_cap - c->in_len < 4096) {
      uv_read_stop(s);
      c->reading = 0;
    }
    return;
  }
  conn_parse(c);
}

static void read_start(mock_conn_t *c) {
  if (c->reading || c->closing)
    return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
    mock_conn_close(c, 1, 0);
    return;
  }
  c->reading = 1;
}

/* Feeds held input to the parser until a request is complete (dispatched) or the input
 * runs out. Only called while no request is in progress. */
static void conn_parse(mock_conn_t *c) {
  while (!c->closing && !c->shutting && c->req.phase == MOCK_P_IDLE && c->in_off < c->in_len) {
    const char *p = c->in + c->in_off;
    llhttp_errno_t err = llhttp_execute(&c->parser, p, c->in_len - c->in_off);
    if (err == HPE_OK) {
      c->in_off = c->in_len;
      break;
    }
    if (c->msg_complete && (err == HPE_PAUSED || err == HPE_PAUSED_UPGRADE)) {
      c->in_off += (size_t)(llhttp_get_error_pos(&c->parser) - p);
      c->msg_complete = 0;
      if (err == HPE_PAUSED)
        llhttp_resume(&c->parser);
      /* after an upgrade request keep_alive is off: nothing more is parsed */
      mock_dispatch(c);
      continue;
    }
    const char *reason = llhttp_get_error_reason(&c->parser);
    mock_reply_bad_request(c, c->error_status ? c->error_status : 400,
                           reason ? reason : "malformed request");
    break;
  }
  if (c->in_off == c->in_len)
    c->in_off = c->in_len = 0;
}

void mock_conn_next(mock_conn_t *c) {
  if (c->closing)
    return;
  c->req.phase = MOCK_P_IDLE;
  if (!c->req.keep_alive) {
    conn_end(c);
    return;
  }
  read_start(c);
  conn_parse(c);
}

/* ---- llhttp callbacks ---- */

static mock_conn_t *pconn(llhttp_t *p) { return p->data; }

/* Keeps URL and header bytes; a head over MOCK_MAX_HEAD_BYTES fails with `status`. */
static int head_append(mock_conn_t *c, const char *at, size_t n, int status) {
  if (c->hbuf.len + n > MOCK_MAX_HEAD_BYTES) {
    c->error_status = status;
    return HPE_USER;
  }
  mock_buf_add(&c->hbuf, at, n);
  return 0;
}

static int on_message_begin(llhttp_t *p) {
  mock_conn_t *c = pconn(p);
  mock_req_t *r = &c->req;
  mock_buf_t body = r->body; /* keep the retained-body allocation across requests */
  memset(r, 0, offsetof(mock_req_t, hdrs)); /* hdrs[0..nhdrs) is all that is read */
  body.len = 0;
  r->body = body;
  r->request_id = -1;
  r->delay_ms = -1;
  r->start_ms = uv_now(c->srv->loop);
  c->hbuf.len = 0;
  c->hstate = 0;
  c->msg_complete = 0;
  c->error_status = 0;
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
  mock_conn_t *c = pconn(p);
  c->req.url_len += (uint32_t)n;
  return head_append(c, at, n, 414);
}

/* hstate: 1 while a header name is arriving, 2 while its value is; a name that starts in
 * any other state is a new header (values may be empty and produce no callback). */
static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  mock_conn_t *c = pconn(p);
  mock_req_t *r = &c->req;
  if (c->hstate != 1) {
    if (r->nhdrs == MOCK_MAX_HEADERS) {
      c->error_status = 431;
      return HPE_USER;
    }
    mock_hdr_t *h = &r->hdrs[r->nhdrs++];
    h->name_off = h->val_off = (uint32_t)c->hbuf.len;
    h->name_len = h->val_len = 0;
    c->hstate = 1;
  }
  r->hdrs[r->nhdrs - 1].name_len += (uint32_t)n;
  return head_append(c, at, n, 431);
}

static int on_header_field_complete(llhttp_t *p) {
  pconn(p)->hstate = 0;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  mock_conn_t *c = pconn(p);
  mock_hdr_t *h = &c->req.hdrs[c->req.nhdrs - 1];
  if (c->hstate != 2) {
    h->val_off = (uint32_t)c->hbuf.len;
    h->val_len = 0;
    c->hstate = 2;
  }
  h->val_len += (uint32_t)n;
  return head_append(c, at, n, 431);
}

static int on_headers_complete(llhttp_t *p) {
  mock_conn_t *c = pconn(p);
  mock_req_t *r = &c->req;
  r->method = p->method;
  r->http_major = p->http_major;
  r->http_minor = p->http_minor;
  r->head_only = p->method == HTTP_HEAD;
  r->keep_alive = llhttp_should_keep_alive(p) && !p->upgrade;
  mock_route_headers(c);
  size_t n;
  const char *expect = mock_req_header(c, "expect", &n);
  int has_body = (p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length);
  if (expect && mock_ieq(expect, n, "100-continue") && r->http_minor >= 1 && has_body) {
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    mock_send_static(c, cont, sizeof cont - 1);
  }
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  mock_conn_t *c = pconn(p);
  mock_req_t *r = &c->req;
  if (!r->hashing) {
    if (!EVP_DigestInit_ex(c->md, EVP_sha256(), NULL))
      return HPE_USER;
    r->hashing = 1;
  }
  EVP_DigestUpdate(c->md, at, n);
  r->body_len += n;
  if (r->keep_body) {
    if (r->body.len + n > MOCK_CHAT_BODY_MAX) {
      c->error_status = 413;
      return HPE_USER;
    }
    mock_buf_add(&r->body, at, n);
  }
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  mock_conn_t *c = pconn(p);
  mock_req_t *r = &c->req;
  if (r->hashing) {
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned dl = 0;
    EVP_DigestFinal_ex(c->md, d, &dl);
    mock_hex(d, dl, r->sha_hex);
  } else {
    memcpy(r->sha_hex, EMPTY_SHA256, sizeof EMPTY_SHA256);
  }
  c->msg_complete = 1;
  return HPE_PAUSED; /* one request at a time: see the file comment */
}

void mock_settings_init(llhttp_settings_t *s) {
  llhttp_settings_init(s);
  s->on_message_begin = on_message_begin;
  s->on_url = on_url;
  s->on_header_field = on_header_field;
  s->on_header_field_complete = on_header_field_complete;
  s->on_header_value = on_header_value;
  s->on_headers_complete = on_headers_complete;
  s->on_body = on_body;
  s->on_message_complete = on_message_complete;
}

const char *mock_req_header(mock_conn_t *c, const char *name, size_t *len) {
  const mock_req_t *r = &c->req;
  for (unsigned i = 0; i < r->nhdrs; i++) {
    const mock_hdr_t *h = &r->hdrs[i];
    if (mock_ieq(c->hbuf.data + h->name_off, h->name_len, name)) {
      *len = h->val_len;
      return c->hbuf.data + h->val_off;
    }
  }
  return NULL;
}

/* ---- accept ---- */

void mock_conn_accept(mock_server_t *srv) {
  mock_conn_t *c = mock_xmalloc(sizeof *c);
  memset(c, 0, sizeof *c);
  c->srv = srv;
  mock_list_init(&c->link);
  mock_list_init(&c->qlink);
  uv_tcp_init(srv->loop, &c->tcp);
  uv_timer_init(srv->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->open_handles = 2;
  c->md = EVP_MD_CTX_new();
  mock_buf_reserve(&c->hbuf, 1024); /* never NULL: an empty URL is still a valid pointer */
  if (uv_accept((uv_stream_t *)&srv->listener, (uv_stream_t *)&c->tcp) < 0 || !c->md) {
    c->closing = 1;
    uv_close((uv_handle_t *)&c->timer, on_close);
    uv_close((uv_handle_t *)&c->tcp, on_close);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1); /* SSE events and small responses must leave at once */
  llhttp_init(&c->parser, HTTP_REQUEST, &srv->settings);
  c->parser.data = c;
  mock_list_push(&srv->conns, &c->link);
  srv->open_conns++;
  srv->stats.connections++;
  read_start(c);
}
