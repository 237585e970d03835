#include "http1.h"

#include <stdlib.h>

#define REQ(p) (((sl_h1_parser_t *)(p))->req)
#define H1(p) ((sl_h1_parser_t *)(p))

static int fail(llhttp_t *p, uint16_t status, const char *msg) {
  sl_http_req_t *r = REQ(p);
  if (!r->err_status) {
    r->err_status = status;
    r->err_msg = msg;
  }
  return -1;
}

/* Counts bytes against the header limit and stores them. */
static int store(llhttp_t *p, const char *at, size_t len) {
  sl_h1_parser_t *h = H1(p);
  h->header_bytes += (uint32_t)len;
  if (h->header_bytes > h->limits->max_header_bytes)
    return fail(p, 431, "request header section too large");
  sl_buf_append(&h->req->strings, at, len);
  return 0;
}

/* The byte `back` positions before `at`, looking into the previous input when needed. */
static char byte_before(const sl_h1_parser_t *h, const char *at, size_t back) {
  size_t avail = (size_t)(at - h->exec_start);
  if (back <= avail) return at[-(ptrdiff_t)back];
  back -= avail;
  return back <= 2 ? h->prev_bytes[2 - back] : 0;
}

/* The last byte before `at` that is not SP or HTAB, looking into the previous input as needed. */
static char byte_before_ws(const sl_h1_parser_t *h, const char *at) {
  for (const char *q = at; q > h->exec_start;) {
    char c = *--q;
    if (c != ' ' && c != '\t') return c;
  }
  return h->prev_nonws;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  sl_h1_parser_t *h = H1(p);
  /* llhttp tolerates several spaces between method and target; RFC 9112 3 has exactly one. */
  if (h->req->strings.len == 0 && byte_before(h, at, 2) == ' ')
    return fail(p, 400, "malformed request line");
  return store(p, at, len);
}

static int on_url_complete(llhttp_t *p) {
  sl_http_req_t *r = REQ(p);
  r->url_len = (uint32_t)r->strings.len;
  const char *q = memchr(r->strings.data, '?', r->url_len);
  r->path_len = q ? (uint32_t)(q - r->strings.data) : r->url_len;
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  sl_h1_parser_t *h = H1(p);
  sl_http_req_t *r = h->req;
  if (h->in_field != 1) {
    if (r->nheaders >= h->limits->max_headers) return fail(p, 431, "too many request headers");
    if (r->nheaders == r->headers_cap) {
      r->headers_cap = r->headers_cap ? r->headers_cap * 2 : 16;
      r->headers = sl_realloc(r->headers, r->headers_cap * sizeof(sl_header_t));
    }
    sl_header_t *hd = &r->headers[r->nheaders++];
    hd->name_off = (uint32_t)r->strings.len;
    hd->name_len = hd->value_off = hd->value_len = 0;
    h->in_field = 1;
  }
  return store(p, at, len);
}

static int on_header_field_complete(llhttp_t *p) {
  sl_http_req_t *r = REQ(p);
  if (H1(p)->in_field != 1) return fail(p, 400, "empty header name");
  sl_header_t *hd = &r->headers[r->nheaders - 1];
  hd->name_len = (uint32_t)r->strings.len - hd->name_off;
  if (hd->name_len == 0) return fail(p, 400, "empty header name");
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  sl_h1_parser_t *h = H1(p);
  if (h->in_field == 0) return fail(p, 400, "empty header name");
  if (len == 0) return 0; /* llhttp reports empty spans too: the value has not started */
  /* llhttp accepts obs-fold (a value continued on a line starting with whitespace) even in
   * strict mode. A value span is normally preceded by ':' and optional whitespace, or by more
   * of the value; after a fold, by a line break: as the continuation line itself, or, when the
   * first line's value was empty, as the next line's text (llhttp skips the whitespace:
   * "Content-Length:\r\n 5" would otherwise read as 5). */
  if (byte_before_ws(h, at) == '\n') return fail(p, 400, "obsolete line folding in header value");
  if (h->in_field != 2) {
    h->req->headers[h->req->nheaders - 1].value_off = (uint32_t)h->req->strings.len;
    h->in_field = 2;
  }
  return store(p, at, len);
}

static bool value_is(const sl_http_req_t *r, const sl_header_t *hd, const char *lit) {
  return sl_strieq(sl_http_req_str(r, hd->value_off), hd->value_len, lit);
}

/* uri-host [ ":" port ] (RFC 9112 3.2, RFC 3986 3.2.2): reg-name characters or an IP literal. */
static bool valid_host(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              strchr("-._~%!$&'()*+,;=:[]", c) != NULL;
    if (!ok || c == 0) return false;
  }
  return true;
}

/* Remembers the headers whose meaning the gateway must enforce; rejects duplicates of those
 * that smuggling attacks duplicate. */
static int classify(llhttp_t *p, sl_header_t *hd, int32_t idx) {
  sl_http_req_t *r = REQ(p);
  const char *name = sl_http_req_str(r, hd->name_off);
  switch (hd->name_len) {
  case 4:
    if (sl_strieq(name, 4, "host")) {
      if (r->host_idx >= 0) return fail(p, 400, "duplicate Host header");
      if (!valid_host(sl_http_req_str(r, hd->value_off), hd->value_len))
        return fail(p, 400, "invalid Host header");
      r->host_idx = idx;
    }
    break;
  case 6:
    if (sl_strieq(name, 6, "expect")) {
      if (!value_is(r, hd, "100-continue")) return fail(p, 417, "unsupported Expect value");
      r->expect_continue = true;
    }
    break;
  case 12:
    if (sl_strieq(name, 12, "x-request-id")) r->request_id_idx = idx;
    break;
  case 14:
    if (sl_strieq(name, 14, "content-length") && r->content_length >= 0)
      return fail(p, 400, "duplicate Content-Length header");
    if (sl_strieq(name, 14, "content-length")) r->content_length = (int64_t)p->content_length;
    break;
  case 17:
    if (sl_strieq(name, 17, "transfer-encoding")) {
      if (r->chunked) return fail(p, 400, "duplicate Transfer-Encoding header");
      if (!value_is(r, hd, "chunked"))
        return fail(p, 400, "unsupported Transfer-Encoding (only \"chunked\" is accepted)");
      r->chunked = true;
    }
    break;
  }
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  sl_h1_parser_t *h = H1(p);
  sl_http_req_t *r = h->req;
  if (h->in_field == 0 || r->nheaders == 0) return fail(p, 400, "empty header name");
  sl_header_t *hd = &r->headers[r->nheaders - 1];
  if (h->in_field != 2) hd->value_off = (uint32_t)r->strings.len; /* empty value */
  hd->value_len = (uint32_t)r->strings.len - hd->value_off;
  /* Trailing whitespace is not part of the value (RFC 9110 5.5). */
  while (hd->value_len) {
    char c = r->strings.data[hd->value_off + hd->value_len - 1];
    if (c != ' ' && c != '\t') break;
    hd->value_len--;
  }
  h->in_field = 0;
  return classify(p, hd, (int32_t)r->nheaders - 1);
}

static int on_headers_complete(llhttp_t *p) {
  sl_h1_parser_t *h = H1(p);
  sl_http_req_t *r = h->req;
  h->headers_done = true;
  r->method = (uint8_t)p->method;
  r->http_major = p->http_major;
  r->http_minor = p->http_minor;
  r->keep_alive = llhttp_should_keep_alive(p);
  /* Upgrades are decided by the route (WebSocket), not by the parser: keep parsing HTTP. The
   * connection's owner takes over the bytes after this message when it accepts the upgrade. */
  r->upgrade = p->upgrade;
  p->upgrade = 0;
  if (r->http_minor == 0) r->expect_continue = false; /* RFC 9110 10.1.1 */

  if (r->http_major != 1) return fail(p, 505, "unsupported HTTP version");
  if (r->http_minor == 1 && r->host_idx < 0) return fail(p, 400, "missing Host header");
  if (r->chunked && r->content_length >= 0)
    return fail(p, 400, "both Content-Length and Transfer-Encoding present");
  if (r->chunked && r->http_minor == 0)
    return fail(p, 400, "Transfer-Encoding is not allowed in HTTP/1.0");
  if (r->method == HTTP_CONNECT) return fail(p, 405, "CONNECT is not supported");
  const char *url = sl_http_req_url(r);
  if (r->url_len == 0 || url[0] != '/') {
    if (!(r->method == HTTP_OPTIONS && r->url_len == 1 && url[0] == '*'))
      return fail(p, 400, "request target must be an absolute path");
  }
  if (r->content_length > 0 && (uint64_t)r->content_length > h->limits->max_body_bytes)
    return fail(p, 413, "request body too large");

  bool has_body = r->chunked || r->content_length > 0;
  if (r->expect_continue && has_body) {
    h->event = SL_H1_HEADERS;
    return HPE_PAUSED;
  }
  r->expect_continue = false;
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  sl_h1_parser_t *h = H1(p);
  if (h->req->body.len + len > h->limits->max_body_bytes)
    return fail(p, 413, "request body too large");
  sl_buf_append(&h->req->body, at, len);
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  H1(p)->event = SL_H1_MESSAGE;
  return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void sl_http_req_init(sl_http_req_t *req) {
  memset(req, 0, sizeof(*req));
  req->content_length = -1;
  req->host_idx = req->request_id_idx = -1;
}

void sl_http_req_reset(sl_http_req_t *req) {
  sl_buf_t strings = req->strings, body = req->body;
  sl_header_t *headers = req->headers;
  uint32_t cap = req->headers_cap;
  strings.len = body.len = 0;
  /* Keep modest buffers for the next request on this connection; drop large ones. */
  if (body.cap > 64 * 1024) sl_buf_free(&body);
  if (strings.cap > 16 * 1024) sl_buf_free(&strings);
  sl_http_req_init(req);
  req->strings = strings;
  req->body = body;
  req->headers = headers;
  req->headers_cap = cap;
}

void sl_http_req_free(sl_http_req_t *req) {
  sl_buf_free(&req->strings);
  sl_buf_free(&req->body);
  free(req->headers);
  sl_http_req_init(req);
}

int sl_http_req_find(const sl_http_req_t *r, const char *name) {
  for (uint32_t i = 0; i < r->nheaders; i++)
    if (sl_strieq(sl_http_req_str(r, r->headers[i].name_off), r->headers[i].name_len, name))
      return (int)i;
  return -1;
}

void sl_h1_parser_init(sl_h1_parser_t *h, sl_http_req_t *req, const sl_h1_limits_t *limits) {
  memset(h, 0, sizeof(*h));
  llhttp_init(&h->p, HTTP_REQUEST, &settings);
  h->req = req;
  h->limits = limits;
}

/* What the callbacks of the next call may need to see of the input consumed by this one. */
static void remember_tail(sl_h1_parser_t *h, const char *data, size_t n) {
  if (n >= 2) {
    h->prev_bytes[0] = data[n - 2];
    h->prev_bytes[1] = data[n - 1];
  } else if (n == 1) {
    h->prev_bytes[0] = h->prev_bytes[1];
    h->prev_bytes[1] = data[0];
  }
  for (size_t i = n; i > 0; i--) {
    if (data[i - 1] != ' ' && data[i - 1] != '\t') {
      h->prev_nonws = data[i - 1];
      break;
    }
  }
}

sl_h1_event_t sl_h1_execute(sl_h1_parser_t *h, const char *data, size_t len, size_t *used) {
  h->event = SL_H1_AGAIN;
  h->exec_start = data;
  llhttp_errno_t e = llhttp_execute(&h->p, data, len);
  if (e == HPE_OK) {
    *used = len;
    remember_tail(h, data, len);
    return SL_H1_AGAIN;
  }
  if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
    *used = (size_t)(llhttp_get_error_pos(&h->p) - data);
    remember_tail(h, data, *used); /* the rest is fed again */
    if (e == HPE_PAUSED_UPGRADE) h->event = SL_H1_MESSAGE;
    return (sl_h1_event_t)h->event;
  }
  *used = len;
  sl_http_req_t *r = h->req;
  if (!r->err_status) {
    r->err_status = 400;
    r->err_msg = llhttp_get_error_reason(&h->p);
    if (!r->err_msg || !*r->err_msg) r->err_msg = llhttp_errno_name(e);
  }
  return SL_H1_ERROR;
}

void sl_h1_next(sl_h1_parser_t *h) {
  if (llhttp_get_errno(&h->p) == HPE_PAUSED_UPGRADE)
    llhttp_resume_after_upgrade(&h->p);
  else
    llhttp_resume(&h->p);
  h->header_bytes = 0;
  h->in_field = 0;
  h->headers_done = false;
}

void sl_h1_resume(sl_h1_parser_t *h) { llhttp_resume(&h->p); }

const char *sl_http_method_str(uint8_t method) { return llhttp_method_name((llhttp_method_t)method); }

const char *sl_http_status_reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 101: return "Switching Protocols";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 206: return "Partial Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 304: return "Not Modified";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 413: return "Content Too Large";
  case 417: return "Expectation Failed";
  case 422: return "Unprocessable Content";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  case 505: return "HTTP Version Not Supported";
  default: return status < 300 ? "OK" : status < 400 ? "Redirect" : status < 500 ? "Client Error" : "Server Error";
  }
}
