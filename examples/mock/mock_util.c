/* mock_util.c — byte buffers, JSON output escaping, a minimal JSON scanner for chat
 * requests, query-string lookup. Nothing here touches libuv. */
#include "mock.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *mock_xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    fprintf(stderr, "sluice-mock: out of memory\n");
    abort();
  }
  return p;
}

void *mock_xrealloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) {
    fprintf(stderr, "sluice-mock: out of memory\n");
    abort();
  }
  return q;
}

void mock_buf_reserve(mock_buf_t *b, size_t extra) {
  if (b->cap - b->len >= extra)
    return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < extra)
    cap *= 2;
  b->data = mock_xrealloc(b->data, cap);
  b->cap = cap;
}

void mock_buf_add(mock_buf_t *b, const void *p, size_t n) {
  if (n == 0)
    return;
  mock_buf_reserve(b, n);
  memcpy(b->data + b->len, p, n);
  b->len += n;
}

void mock_buf_adds(mock_buf_t *b, const char *s) { mock_buf_add(b, s, strlen(s)); }

void mock_buf_addf(mock_buf_t *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n <= 0)
    return;
  mock_buf_reserve(b, (size_t)n + 1);
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

void mock_buf_free(mock_buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is not one. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t len;
  unsigned min;
  if (c >= 0xc2 && c <= 0xdf) {
    len = 2;
    min = 0x80;
  } else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    min = 0x800;
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    min = 0x10000;
  } else {
    return 0;
  }
  if (n < len)
    return 0;
  unsigned cp = c & (0x3f >> (len - 1));
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80)
      return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return len;
}

void mock_buf_add_json_str(mock_buf_t *b, const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;
  mock_buf_reserve(b, n + 2);
  b->data[b->len++] = '"';
  size_t i = 0;
  while (i < n) {
    size_t run = i; /* copy runs of bytes that need no escaping in one go */
    while (run < n && p[run] >= 0x20 && p[run] < 0x80 && p[run] != '"' && p[run] != '\\')
      run++;
    mock_buf_add(b, p + i, run - i);
    i = run;
    if (i >= n)
      break;
    unsigned char c = p[i];
    if (c == '"' || c == '\\') {
      char esc[2] = {'\\', (char)c};
      mock_buf_add(b, esc, 2);
      i++;
    } else if (c < 0x20) {
      switch (c) {
      case '\n': mock_buf_add(b, "\\n", 2); break;
      case '\r': mock_buf_add(b, "\\r", 2); break;
      case '\t': mock_buf_add(b, "\\t", 2); break;
      default: mock_buf_addf(b, "\\u%04x", c); break;
      }
      i++;
    } else {
      size_t len = utf8_seq(p + i, n - i);
      if (len) {
        mock_buf_add(b, p + i, len);
        i += len;
      } else {
        mock_buf_add(b, "\\ufffd", 6);
        i++;
      }
    }
  }
  mock_buf_add(b, "\"", 1);
}

/* ---- JSON scanning ---- */

typedef struct jscan {
  const char *p, *end;
} jscan_t;

#define JSON_MAX_DEPTH 64

static void js_ws(jscan_t *j) {
  while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
    j->p++;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

static int js_u4(jscan_t *j, unsigned *out) {
  if (j->end - j->p < 4)
    return -1;
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hexval(j->p[i]);
    if (h < 0)
      return -1;
    v = (v << 4) | (unsigned)h;
  }
  j->p += 4;
  *out = v;
  return 0;
}

static void utf8_put(mock_buf_t *out, unsigned cp) {
  char u[4];
  size_t n;
  if (cp < 0x80) {
    u[0] = (char)cp;
    n = 1;
  } else if (cp < 0x800) {
    u[0] = (char)(0xc0 | (cp >> 6));
    u[1] = (char)(0x80 | (cp & 0x3f));
    n = 2;
  } else if (cp < 0x10000) {
    u[0] = (char)(0xe0 | (cp >> 12));
    u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    u[2] = (char)(0x80 | (cp & 0x3f));
    n = 3;
  } else {
    u[0] = (char)(0xf0 | (cp >> 18));
    u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    u[3] = (char)(0x80 | (cp & 0x3f));
    n = 4;
  }
  mock_buf_add(out, u, n);
}

/* A string at j->p (which must be '"'); decoded into out unless out is NULL. */
static int js_string(jscan_t *j, mock_buf_t *out) {
  if (j->p >= j->end || *j->p != '"')
    return -1;
  j->p++;
  while (j->p < j->end) {
    unsigned char c = (unsigned char)*j->p++;
    if (c == '"')
      return 0;
    if (c < 0x20)
      return -1;
    if (c != '\\') {
      if (out)
        mock_buf_add(out, &c, 1);
      continue;
    }
    if (j->p >= j->end)
      return -1;
    char e = *j->p++;
    unsigned cp;
    switch (e) {
    case '"': case '\\': case '/': cp = (unsigned char)e; break;
    case 'b': cp = '\b'; break;
    case 'f': cp = '\f'; break;
    case 'n': cp = '\n'; break;
    case 'r': cp = '\r'; break;
    case 't': cp = '\t'; break;
    case 'u':
      if (js_u4(j, &cp) < 0)
        return -1;
      if (cp >= 0xd800 && cp <= 0xdbff) { /* a high surrogate wants its low half */
        unsigned lo;
        if (j->end - j->p >= 6 && j->p[0] == '\\' && j->p[1] == 'u') {
          j->p += 2;
          if (js_u4(j, &lo) < 0)
            return -1;
          cp = (lo >= 0xdc00 && lo <= 0xdfff) ? 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00)
                                              : 0xfffd;
        } else {
          cp = 0xfffd;
        }
      } else if (cp >= 0xdc00 && cp <= 0xdfff) {
        cp = 0xfffd;
      }
      break;
    default:
      return -1;
    }
    if (out)
      utf8_put(out, cp);
  }
  return -1;
}

static int js_literal(jscan_t *j, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
    return -1;
  j->p += n;
  return 0;
}

static int js_number(jscan_t *j) {
  const char *start = j->p;
  while (j->p < j->end && (strchr("+-.eE", *j->p) || (*j->p >= '0' && *j->p <= '9')))
    j->p++;
  return j->p > start ? 0 : -1;
}

static int js_value(jscan_t *j, int depth);

/* An object or array at j->p; close is '}' or ']'. */
static int js_container(jscan_t *j, char close, int depth) {
  if (depth > JSON_MAX_DEPTH)
    return -1;
  j->p++;
  js_ws(j);
  if (j->p < j->end && *j->p == close) {
    j->p++;
    return 0;
  }
  for (;;) {
    if (close == '}') {
      if (js_string(j, NULL) < 0)
        return -1;
      js_ws(j);
      if (j->p >= j->end || *j->p++ != ':')
        return -1;
    }
    if (js_value(j, depth + 1) < 0)
      return -1;
    js_ws(j);
    if (j->p >= j->end)
      return -1;
    char c = *j->p++;
    if (c == close)
      return 0;
    if (c != ',')
      return -1;
    js_ws(j);
  }
}

static int js_value(jscan_t *j, int depth) {
  js_ws(j);
  if (j->p >= j->end)
    return -1;
  switch (*j->p) {
  case '{': return js_container(j, '}', depth);
  case '[': return js_container(j, ']', depth);
  case '"': return js_string(j, NULL);
  case 't': return js_literal(j, "true");
  case 'f': return js_literal(j, "false");
  case 'n': return js_literal(j, "null");
  default: return js_number(j);
  }
}

int mock_scan_chat(const char *body, size_t len, mock_buf_t *model, int *stream) {
  jscan_t j = {body, body + len};
  mock_buf_t key = {0};
  int rc = -1;
  js_ws(&j);
  if (j.p >= j.end || *j.p != '{')
    goto out;
  j.p++;
  js_ws(&j);
  if (j.p < j.end && *j.p == '}') {
    j.p++;
    rc = 0;
    goto trailing;
  }
  for (;;) {
    key.len = 0;
    if (js_string(&j, &key) < 0)
      goto out;
    js_ws(&j);
    if (j.p >= j.end || *j.p++ != ':')
      goto out;
    js_ws(&j);
    if (key.len == 5 && memcmp(key.data, "model", 5) == 0 && j.p < j.end && *j.p == '"') {
      model->len = 0;
      if (js_string(&j, model) < 0)
        goto out;
    } else if (key.len == 6 && memcmp(key.data, "stream", 6) == 0 && j.p < j.end &&
               (*j.p == 't' || *j.p == 'f')) {
      *stream = *j.p == 't';
      if (js_literal(&j, *stream ? "true" : "false") < 0)
        goto out;
    } else if (js_value(&j, 1) < 0) {
      goto out;
    }
    js_ws(&j);
    if (j.p >= j.end)
      goto out;
    char c = *j.p++;
    if (c == '}')
      break;
    if (c != ',')
      goto out;
    js_ws(&j);
  }
  rc = 0;
trailing:
  js_ws(&j);
  if (j.p != j.end)
    rc = -1;
out:
  mock_buf_free(&key);
  return rc;
}

/* ---- small string helpers ---- */

int mock_parse_u64(const char *s, size_t n, uint64_t max, uint64_t *out) {
  if (n == 0 || n > 19)
    return -1;
  uint64_t v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return -1;
    v = v * 10 + (uint64_t)(s[i] - '0');
  }
  if (v > max)
    return -1;
  *out = v;
  return 0;
}

int mock_query_u64(const char *url, size_t len, const char *key, uint64_t max, uint64_t *out) {
  const char *q = memchr(url, '?', len);
  if (!q)
    return 0;
  const char *end = url + len;
  const char *hash = memchr(q, '#', (size_t)(end - q));
  if (hash)
    end = hash;
  size_t klen = strlen(key);
  const char *p = q + 1;
  while (p < end) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    const char *pe = amp ? amp : end;
    const char *eq = memchr(p, '=', (size_t)(pe - p));
    if (eq && (size_t)(eq - p) == klen && memcmp(p, key, klen) == 0)
      return mock_parse_u64(eq + 1, (size_t)(pe - eq - 1), max, out) < 0 ? -1 : 1;
    p = pe + 1;
  }
  return 0;
}

int mock_ieq(const char *a, size_t alen, const char *lit) {
  size_t n = strlen(lit);
  if (alen != n)
    return 0;
  for (size_t i = 0; i < n; i++) {
    char x = a[i], y = lit[i];
    if (x >= 'A' && x <= 'Z')
      x = (char)(x + 32);
    if (y >= 'A' && y <= 'Z')
      y = (char)(y + 32);
    if (x != y)
      return 0;
  }
  return 1;
}

const char *mock_reason(int status) {
  switch (status) {
  case 101: return "Switching Protocols";
  case 100: return "Continue";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 206: return "Partial Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 304: return "Not Modified";
  case 307: return "Temporary Redirect";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 413: return "Content Too Large";
  case 414: return "URI Too Long";
  case 422: return "Unprocessable Content";
  case 426: return "Upgrade Required";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 499: return "Client Closed Request";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return status < 400 ? "OK" : status < 500 ? "Client Error" : "Server Error";
  }
}

void mock_hex(const unsigned char *in, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[in[i] >> 4];
    out[2 * i + 1] = digits[in[i] & 15];
  }
  out[2 * n] = '\0';
}
