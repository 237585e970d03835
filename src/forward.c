#include "forward.h"

#include <strings.h>

bool sl_token_listed(const char *v, size_t list_len, const char *name, size_t nlen) {
  const char *end = v + list_len;
  while (v < end) {
    while (v < end && (*v == ' ' || *v == '\t' || *v == ',')) v++;
    const char *t = v;
    while (v < end && *v != ',' && *v != ' ' && *v != '\t') v++;
    if ((size_t)(v - t) == nlen && strncasecmp(t, name, nlen) == 0) return true;
  }
  return false;
}

/* True when `name` is listed in one of the request's Connection headers. */
static bool connection_lists(const sl_http_req_t *r, const char *name, size_t nlen) {
  for (uint32_t i = 0; i < r->nheaders; i++) {
    const sl_header_t *h = &r->headers[i];
    if (sl_strieq(sl_http_req_str(r, h->name_off), h->name_len, "connection") &&
        sl_token_listed(sl_http_req_str(r, h->value_off), h->value_len, name, nlen))
      return true;
  }
  return false;
}

/* Hop-by-hop headers and those the gateway sets itself. */
static bool skip_request_header(const char *n, size_t len) {
  switch (len) {
  case 2: return sl_strieq(n, len, "te");
  case 4: return sl_strieq(n, len, "host");
  case 6: return sl_strieq(n, len, "expect");
  case 7: return sl_strieq(n, len, "upgrade") || sl_strieq(n, len, "trailer");
  case 10: return sl_strieq(n, len, "connection") || sl_strieq(n, len, "keep-alive");
  case 12: return sl_strieq(n, len, "x-request-id");
  case 14: return sl_strieq(n, len, "content-length");
  case 15: return sl_strieq(n, len, "x-forwarded-for");
  case 16: return sl_strieq(n, len, "proxy-connection") || sl_strieq(n, len, "x-forwarded-host");
  case 17: return sl_strieq(n, len, "transfer-encoding") || sl_strieq(n, len, "x-forwarded-proto");
  case 19: return sl_strieq(n, len, "proxy-authorization");
  default: return false;
  }
}

void sl_forward_request(sl_buf_t *b, const sl_http_req_t *r, const sl_endpoint_t *ep,
                        const sl_forward_opts_t *o) {
  b->len = 0;
  sl_buf_appends(b, sl_http_method_str(r->method));
  sl_buf_append(b, " ", 1);
  sl_buf_appends(b, ep->path_prefix);
  sl_buf_append2(b, sl_http_req_url(r), r->url_len, " HTTP/1.1\r\nHost: ");
  const sl_header_t *host = r->host_idx >= 0 ? &r->headers[r->host_idx] : NULL;
  if (o->preserve_host && host)
    sl_buf_append2(b, sl_http_req_str(r, host->value_off), host->value_len, "\r\n");
  else
    sl_buf_append2(b, ep->authority, strlen(ep->authority), "\r\n");

  for (uint32_t i = 0; i < r->nheaders; i++) {
    const sl_header_t *h = &r->headers[i];
    const char *n = sl_http_req_str(r, h->name_off);
    if (skip_request_header(n, h->name_len)) continue;
    if (connection_lists(r, n, h->name_len)) continue;
    if (h->name_len == 24 && sl_strieq(n, 24, "sec-websocket-extensions")) continue;
    sl_buf_append2(b, n, h->name_len, ": ");
    sl_buf_append2(b, sl_http_req_str(r, h->value_off), h->value_len, "\r\n");
  }
  /* X-Forwarded-For: every value the client sent, in order, then the client's address. */
  sl_buf_appends(b, "X-Forwarded-For: ");
  for (uint32_t i = 0; i < r->nheaders; i++) {
    const sl_header_t *h = &r->headers[i];
    if (h->name_len == 15 && sl_strieq(sl_http_req_str(r, h->name_off), 15, "x-forwarded-for") &&
        h->value_len) {
      sl_buf_append(b, sl_http_req_str(r, h->value_off), h->value_len);
      sl_buf_append(b, ", ", 2);
    }
  }
  sl_buf_append2(b, o->client_ip, strlen(o->client_ip),
                 o->tls ? "\r\nX-Forwarded-Proto: https\r\n" : "\r\nX-Forwarded-Proto: http\r\n");
  if (host && !o->preserve_host) {
    sl_buf_appends(b, "X-Forwarded-Host: ");
    sl_buf_append2(b, sl_http_req_str(r, host->value_off), host->value_len, "\r\n");
  }
  if (o->websocket) sl_buf_appends(b, "Connection: Upgrade\r\nUpgrade: websocket\r\n");
  sl_buf_appends(b, "X-Request-Id: ");
  sl_buf_append2(b, o->request_id, strlen(o->request_id), "\r\n");
  bool body_method = r->method == HTTP_POST || r->method == HTTP_PUT || r->method == HTTP_PATCH;
  if (r->body.len || body_method) {
    sl_buf_appends(b, "Content-Length: ");
    sl_buf_append_u64(b, r->body.len);
    sl_buf_append(b, "\r\n", 2);
  }
  sl_buf_append(b, "\r\n", 2);
  sl_buf_append(b, r->body.data, r->body.len);
}

bool sl_forward_skip_response_header(const char *n, size_t len, const char *conn, size_t conn_len) {
  bool skip;
  switch (len) {
  case 2: skip = sl_strieq(n, len, "te"); break;
  case 7: skip = sl_strieq(n, len, "upgrade") || sl_strieq(n, len, "trailer"); break;
  case 10: skip = sl_strieq(n, len, "connection") || sl_strieq(n, len, "keep-alive"); break;
  case 12: skip = sl_strieq(n, len, "x-request-id"); break;
  case 14: skip = sl_strieq(n, len, "content-length"); break;
  case 16: skip = sl_strieq(n, len, "proxy-connection"); break;
  case 17: skip = sl_strieq(n, len, "transfer-encoding"); break;
  case 18: skip = sl_strieq(n, len, "proxy-authenticate"); break;
  default: skip = false;
  }
  return skip || (conn && sl_token_listed(conn, conn_len, n, len));
}
