#include "forward.h"

#include <stdio.h>
#include <stdlib.h>
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

/* Header edits ---------------------------------------------------------------------------- */

static bool is_tchar(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

/* Headers whose value the gateway computes (framing, hop-by-hop, tracing): a hook that could
 * set them could desynchronize the two ends of a connection. */
static bool managed_header(const char *n, size_t len, bool response) {
  static const char *const both[] = {"content-length", "transfer-encoding", "connection",
                                     "keep-alive", "upgrade", "te", "trailer", "x-request-id",
                                     "proxy-connection"};
  static const char *const req[] = {"host", "expect"};
  for (size_t i = 0; i < SL_ARRAY_SIZE(both); i++)
    if (sl_strieq(n, len, both[i])) return true;
  for (size_t i = 0; !response && i < SL_ARRAY_SIZE(req); i++)
    if (sl_strieq(n, len, req[i])) return true;
  /* Every X-Forwarded-*: upstreams trust them as the gateway's word. */
  return !response && len > 12 && sl_strieq(n, 12, "x-forwarded-");
}

int sl_hedits_put(sl_hedits_t *e, const char *name, size_t nlen, const char *value, size_t vlen,
                  bool response, char *err, size_t errlen) {
  if (nlen == 0 || nlen > 256) {
    snprintf(err, errlen, "header name must be 1 to 256 characters");
    return -1;
  }
  for (size_t i = 0; i < nlen; i++)
    if (!is_tchar((unsigned char)name[i])) {
      snprintf(err, errlen, "header name \"%.*s\" is not a valid token", (int)SL_MIN(nlen, 64), name);
      return -1;
    }
  if (managed_header(name, nlen, response)) {
    snprintf(err, errlen, "header %.*s is managed by the gateway", (int)nlen, name);
    return -1;
  }
  if (value) {
    if (vlen > 65536) {
      snprintf(err, errlen, "header %.*s: value longer than 64 KiB", (int)nlen, name);
      return -1;
    }
    for (size_t i = 0; i < vlen; i++) {
      unsigned char ch = (unsigned char)value[i];
      if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
        snprintf(err, errlen, "header %.*s: value contains a control character", (int)nlen, name);
        return -1;
      }
    }
  }
  for (uint32_t i = 0; i < e->n; i++) { /* the latest edit of a name wins */
    if (e->v[i].name_len != nlen || strncasecmp(e->v[i].name, name, nlen) != 0) continue;
    free(e->v[i].name);
    free(e->v[i].value);
    memmove(&e->v[i], &e->v[i + 1], (e->n - i - 1) * sizeof(sl_hedit_t));
    e->n--;
    break; /* there is at most one */
  }
  if (e->n == e->cap) {
    e->cap = e->cap ? 2 * e->cap : 4;
    e->v = sl_realloc(e->v, e->cap * sizeof(sl_hedit_t));
  }
  sl_hedit_t *h = &e->v[e->n++];
  h->name = sl_strndup(name, nlen);
  h->name_len = (uint32_t)nlen;
  h->value = value ? sl_strndup(value, vlen) : NULL;
  h->value_len = value ? (uint32_t)vlen : 0;
  return 0;
}

int sl_hedits_set_path(sl_hedits_t *e, const char *path, size_t len, char *err, size_t errlen) {
  if (len == 0 || path[0] != '/' || len > 8192) {
    snprintf(err, errlen, "set_path: expected a path starting with / (at most 8 KiB)");
    return -1;
  }
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)path[i];
    if (ch <= 0x20 || ch >= 0x7f || ch == '#') {
      snprintf(err, errlen, "set_path: character %zu is not allowed in a request target "
                            "(percent-encode it)", i + 1);
      return -1;
    }
  }
  free(e->path);
  e->path = sl_strndup(path, len);
  e->path_len = (uint32_t)len;
  return 0;
}

bool sl_hedits_covers(const sl_hedits_t *e, const char *name, size_t nlen) {
  for (uint32_t i = 0; i < e->n; i++)
    if (e->v[i].name_len == nlen && strncasecmp(e->v[i].name, name, nlen) == 0) return true;
  return false;
}

void sl_hedits_append(const sl_hedits_t *e, sl_buf_t *out) {
  for (uint32_t i = 0; i < e->n; i++) {
    if (!e->v[i].value) continue;
    sl_buf_append2(out, e->v[i].name, e->v[i].name_len, ": ");
    sl_buf_append2(out, e->v[i].value, e->v[i].value_len, "\r\n");
  }
}

void sl_hedits_clear(sl_hedits_t *e) {
  for (uint32_t i = 0; i < e->n; i++) {
    free(e->v[i].name);
    free(e->v[i].value);
  }
  free(e->v);
  free(e->path);
  memset(e, 0, sizeof(*e));
}

/* Requests --------------------------------------------------------------------------------- */

void sl_forward_request(sl_buf_t *b, const sl_http_req_t *r, const sl_endpoint_t *ep,
                        const sl_forward_opts_t *o) {
  b->len = 0;
  sl_buf_appends(b, sl_http_method_str(r->method));
  sl_buf_append(b, " ", 1);
  sl_buf_appends(b, ep->path_prefix);
  const sl_hedits_t *e = o->edits && (o->edits->n || o->edits->path) ? o->edits : NULL;
  if (e && e->path)
    sl_buf_append2(b, e->path, e->path_len, " HTTP/1.1\r\nHost: ");
  else
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
    if (e && sl_hedits_covers(e, n, h->name_len)) continue;
    sl_buf_append2(b, n, h->name_len, ": ");
    sl_buf_append2(b, sl_http_req_str(r, h->value_off), h->value_len, "\r\n");
  }
  if (e) sl_hedits_append(e, b);
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
