/* stt_http.c — HTTP/1.1 before the upgrade: llhttp parsing, GET /healthz and GET /stats,
 * and the RFC 6455 opening handshake on any other path.
 *
 * Requests are answered as soon as they are parsed (every answer is immediate), in order,
 * into the connection's staged output. on_message_complete pauses the parser so that the
 * bytes after an upgrade request stay unparsed: they are the first WebSocket frames. */
#include "stt.h"

#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

static const char WS_GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* ---- responses ---- */

/* Stages a complete response. extra: more header lines ("name: value\r\n"), or NULL. */
static void respond(stt_conn_t *c, int status, const char *ctype, const char *body, size_t len,
                    const char *extra) {
  mock_buf_t h = {0};
  int bodyless = status == 204 || status == 304;
  mock_buf_addf(&h, "HTTP/1.1 %d %s\r\n", status, mock_reason(status));
  if (!bodyless) {
    mock_buf_addf(&h, "content-type: %s\r\n", ctype);
    mock_buf_addf(&h, "content-length: %zu\r\n", len);
  }
  mock_buf_addf(&h, "x-mock-instance: %s\r\n", c->srv->opts.name);
  if (extra)
    mock_buf_adds(&h, extra);
  if (!c->keep_alive)
    mock_buf_adds(&h, "connection: close\r\n");
  else if (c->parser.http_minor == 0)
    mock_buf_adds(&h, "connection: keep-alive\r\n");
  mock_buf_adds(&h, "\r\n");
  stt_conn_write(c, h.data, h.len);
  if (!bodyless && c->parser.method != HTTP_HEAD)
    stt_conn_write(c, body, len);
  mock_buf_free(&h);
  if (!c->keep_alive)
    stt_conn_end(c);
}

static void respond_error(stt_conn_t *c, int status, const char *type, const char *msg,
                          const char *extra) {
  mock_buf_t b = {0};
  mock_buf_adds(&b, "{\"error\":{\"type\":");
  mock_buf_add_json_str(&b, type, strlen(type));
  mock_buf_adds(&b, ",\"message\":");
  mock_buf_add_json_str(&b, msg, strlen(msg));
  mock_buf_adds(&b, "}}");
  respond(c, status, "application/json", b.data, b.len, extra);
  mock_buf_free(&b);
}

/* ---- the opening handshake ---- */

/* Whether any header called name lists token. */
static int header_has_token(const stt_conn_t *c, const char *name, const char *token) {
  for (unsigned i = 0; i < c->nhdrs; i++) {
    const stt_hdr_t *h = &c->hdrs[i];
    if (mock_ieq(c->hbuf.data + h->name_off, h->name_len, name) &&
        stt_has_token(c->hbuf.data + h->val_off, h->val_len, token))
      return 1;
  }
  return 0;
}

/* A Sec-WebSocket-Key is the base64 form of 16 bytes: 22 digits and "==". */
static int key_valid(const char *k, size_t n) {
  static const char b64[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  if (n != 24 || k[22] != '=' || k[23] != '=')
    return 0;
  for (size_t i = 0; i < 22; i++)
    if (!memchr(b64, k[i], sizeof b64 - 1))
      return 0;
  return 1;
}

/* out: base64(SHA-1(key GUID)), 28 characters and a NUL. Returns 0 or -1. */
static int accept_value(const char *key, size_t n, char out[29]) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned mdlen = 0;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) &&
           EVP_DigestUpdate(ctx, key, n) &&
           EVP_DigestUpdate(ctx, WS_GUID, sizeof WS_GUID - 1) &&
           EVP_DigestFinal_ex(ctx, md, &mdlen) && mdlen == 20;
  EVP_MD_CTX_free(ctx);
  if (!ok)
    return -1;
  return EVP_EncodeBlock((unsigned char *)out, md, 20) == 28 ? 0 : -1;
}

/* The status to refuse this upgrade with (x-mock-refuse, else --refuse-handshake), 0 to
 * accept it, or -1 if x-mock-refuse is malformed. */
static int refuse_status(const stt_conn_t *c) {
  size_t n;
  const char *v = stt_req_header(c, "x-mock-refuse", &n);
  if (!v)
    return c->srv->opts.refuse_status;
  stt_trim(&v, &n);
  uint64_t st;
  if (mock_parse_u64(v, n, 999, &st) < 0 || st < 200)
    return -1;
  return (int)st;
}

static void http_upgrade(stt_conn_t *c) {
  size_t klen, vlen;
  const char *key = stt_req_header(c, "sec-websocket-key", &klen);
  const char *ver = stt_req_header(c, "sec-websocket-version", &vlen);
  const char *bad = NULL, *extra = NULL;
  c->keep_alive = 0; /* whatever the answer, this connection is not reused for HTTP */
  if (key)
    stt_trim(&key, &klen);
  if (ver)
    stt_trim(&ver, &vlen);
  if (c->parser.method != HTTP_GET)
    bad = "a WebSocket upgrade must be a GET";
  else if (c->parser.http_major != 1 || c->parser.http_minor < 1)
    bad = "a WebSocket upgrade needs HTTP/1.1";
  else if (!header_has_token(c, "upgrade", "websocket"))
    bad = "missing Upgrade: websocket";
  else if (!header_has_token(c, "connection", "upgrade"))
    bad = "missing Connection: upgrade";
  else if (!ver || !mock_ieq(ver, vlen, "13")) {
    bad = "Sec-WebSocket-Version must be 13";
    extra = "sec-websocket-version: 13\r\n";
  } else if (!key || !key_valid(key, klen))
    bad = "missing or malformed Sec-WebSocket-Key";
  if (bad) {
    respond_error(c, 400, "bad_handshake", bad, extra);
    return;
  }
  int refuse = refuse_status(c);
  if (refuse < 0) {
    respond_error(c, 400, "bad_handshake", "x-mock-refuse wants a status 200..999", NULL);
    return;
  }
  if (refuse > 0) {
    c->srv->stats.handshakes_refused++;
    respond_error(c, refuse, "handshake_refused", "upgrade refused by the mock", NULL);
    return;
  }
  char acc[29];
  if (accept_value(key, klen, acc) < 0) {
    respond_error(c, 500, "internal", "SHA-1 failed", NULL);
    return;
  }
  mock_buf_t h = {0};
  mock_buf_addf(&h,
               "HTTP/1.1 101 Switching Protocols\r\n"
               "upgrade: websocket\r\n"
               "connection: Upgrade\r\n"
               "sec-websocket-accept: %s\r\n",
               acc);
  size_t plen;
  const char *proto = stt_req_header(c, "sec-websocket-protocol", &plen);
  if (proto) { /* echo the first subprotocol offered */
    const char *comma = memchr(proto, ',', plen);
    if (comma)
      plen = (size_t)(comma - proto);
    stt_trim(&proto, &plen);
    if (plen) {
      mock_buf_adds(&h, "sec-websocket-protocol: ");
      mock_buf_add(&h, proto, plen);
      mock_buf_adds(&h, "\r\n");
    }
  }
  mock_buf_addf(&h, "x-mock-instance: %s\r\n\r\n", c->srv->opts.name);
  stt_conn_write(c, h.data, h.len);
  mock_buf_free(&h);
  c->mode = STT_WS;
  if (stt_ws_start(c) < 0)
    stt_conn_close(c);
}

/* ---- dispatch ---- */

static void http_dispatch(stt_conn_t *c) {
  size_t ulen = c->url_len;
  const char *q = memchr(c->hbuf.data, '?', ulen);
  size_t plen = q ? (size_t)(q - c->hbuf.data) : ulen;
  int is_healthz = plen == 8 && memcmp(c->hbuf.data, "/healthz", 8) == 0;
  int is_stats = plen == 6 && memcmp(c->hbuf.data, "/stats", 6) == 0;
  int get = c->parser.method == HTTP_GET || c->parser.method == HTTP_HEAD;
  size_t n;
  if (stt_req_header(c, "upgrade", &n) || stt_req_header(c, "sec-websocket-key", &n)) {
    http_upgrade(c);
  } else if ((is_healthz || is_stats) && !get) {
    respond_error(c, 405, "method_not_allowed", "use GET", "allow: GET, HEAD\r\n");
  } else if (is_healthz) {
    respond(c, 200, "text/plain", "ok", 2, NULL);
  } else if (is_stats) {
    mock_buf_t b = {0};
    stt_stats_json(c->srv, &b);
    respond(c, 200, "application/json", b.data, b.len, NULL);
    mock_buf_free(&b);
  } else {
    respond_error(c, 400, "bad_handshake", "expected a WebSocket upgrade",
                  "sec-websocket-version: 13\r\n");
  }
}

void stt_http_input(stt_conn_t *c) {
  while (!c->closing && !c->ending && c->mode == STT_HTTP && c->in_off < c->in_len) {
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
      http_dispatch(c);
      continue;
    }
    const char *reason = llhttp_get_error_reason(&c->parser);
    c->keep_alive = 0;
    respond_error(c, c->error_status ? c->error_status : 400, "invalid_request",
                  reason ? reason : "malformed request", NULL);
  }
  if (c->closing)
    return;
  if (c->mode == STT_WS) {
    stt_ws_pump(c); /* sends the 101 and handles any frames that came with the request */
    return;
  }
  stt_conn_flush(c);
  stt_conn_update_reading(c);
}

/* ---- llhttp callbacks ---- */

static stt_conn_t *pconn(llhttp_t *p) { return p->data; }

/* Keeps URL and header bytes; a head over STT_MAX_HEAD_BYTES fails with `status`. */
static int head_append(stt_conn_t *c, const char *at, size_t n, int status) {
  if (c->hbuf.len + n > STT_MAX_HEAD_BYTES) {
    c->error_status = status;
    return HPE_USER;
  }
  mock_buf_add(&c->hbuf, at, n);
  return 0;
}

static int on_message_begin(llhttp_t *p) {
  stt_conn_t *c = pconn(p);
  c->hbuf.len = 0;
  c->url_len = 0;
  c->nhdrs = 0;
  c->hstate = 0;
  c->msg_complete = 0;
  c->error_status = 0;
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
  stt_conn_t *c = pconn(p);
  c->url_len += (uint32_t)n;
  return head_append(c, at, n, 414);
}

/* hstate: 1 while a header name is arriving, 2 while its value is; a name that starts in
 * any other state is a new header (values may be empty and produce no callback). */
static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  stt_conn_t *c = pconn(p);
  if (c->hstate != 1) {
    if (c->nhdrs == STT_MAX_HEADERS) {
      c->error_status = 431;
      return HPE_USER;
    }
    stt_hdr_t *h = &c->hdrs[c->nhdrs++];
    h->name_off = h->val_off = (uint32_t)c->hbuf.len;
    h->name_len = h->val_len = 0;
    c->hstate = 1;
  }
  c->hdrs[c->nhdrs - 1].name_len += (uint32_t)n;
  return head_append(c, at, n, 431);
}

static int on_header_field_complete(llhttp_t *p) {
  pconn(p)->hstate = 0;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  stt_conn_t *c = pconn(p);
  stt_hdr_t *h = &c->hdrs[c->nhdrs - 1];
  if (c->hstate != 2) {
    h->val_off = (uint32_t)c->hbuf.len;
    h->val_len = 0;
    c->hstate = 2;
  }
  h->val_len += (uint32_t)n;
  return head_append(c, at, n, 431);
}

static int on_headers_complete(llhttp_t *p) {
  stt_conn_t *c = pconn(p);
  c->keep_alive = llhttp_should_keep_alive(p);
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  pconn(p)->msg_complete = 1;
  return HPE_PAUSED; /* see the file comment */
}

void stt_http_settings_init(llhttp_settings_t *s) {
  llhttp_settings_init(s);
  s->on_message_begin = on_message_begin;
  s->on_url = on_url;
  s->on_header_field = on_header_field;
  s->on_header_field_complete = on_header_field_complete;
  s->on_header_value = on_header_value;
  s->on_headers_complete = on_headers_complete;
  s->on_message_complete = on_message_complete;
}

const char *stt_req_header(const stt_conn_t *c, const char *name, size_t *len) {
  for (unsigned i = 0; i < c->nhdrs; i++) {
    const stt_hdr_t *h = &c->hdrs[i];
    if (mock_ieq(c->hbuf.data + h->name_off, h->name_len, name)) {
      *len = h->val_len;
      return c->hbuf.data + h->val_off;
    }
  }
  return NULL;
}
