/* stt_util.c — byte buffers, JSON string escaping, number and header-token parsing.
 * Nothing here touches libuv. */
#include "stt.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *stt_xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    fprintf(stderr, "sluice-mock-stt: out of memory\n");
    abort();
  }
  return p;
}

void *stt_xrealloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (!q) {
    fprintf(stderr, "sluice-mock-stt: out of memory\n");
    abort();
  }
  return q;
}

void stt_buf_reserve(stt_buf_t *b, size_t extra) {
  if (b->cap - b->len >= extra)
    return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < extra)
    cap *= 2;
  b->data = stt_xrealloc(b->data, cap);
  b->cap = cap;
}

void stt_buf_add(stt_buf_t *b, const void *p, size_t n) {
  if (n == 0)
    return;
  stt_buf_reserve(b, n);
  memcpy(b->data + b->len, p, n);
  b->len += n;
}

void stt_buf_adds(stt_buf_t *b, const char *s) { stt_buf_add(b, s, strlen(s)); }

void stt_buf_addf(stt_buf_t *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n <= 0)
    return;
  stt_buf_reserve(b, (size_t)n + 1);
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

void stt_buf_free(stt_buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is not one. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned c = s[0], min;
  size_t len;
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

void stt_buf_add_json_str(stt_buf_t *b, const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;
  stt_buf_add(b, "\"", 1);
  size_t i = 0;
  while (i < n) {
    size_t run = i; /* copy runs of bytes that need no escaping in one go */
    while (run < n && p[run] >= 0x20 && p[run] < 0x80 && p[run] != '"' && p[run] != '\\')
      run++;
    stt_buf_add(b, p + i, run - i);
    i = run;
    if (i >= n)
      break;
    unsigned char c = p[i];
    if (c == '"' || c == '\\') {
      char esc[2] = {'\\', (char)c};
      stt_buf_add(b, esc, 2);
      i++;
    } else if (c < 0x20) {
      switch (c) {
      case '\n': stt_buf_add(b, "\\n", 2); break;
      case '\r': stt_buf_add(b, "\\r", 2); break;
      case '\t': stt_buf_add(b, "\\t", 2); break;
      default: stt_buf_addf(b, "\\u%04x", c); break;
      }
      i++;
    } else {
      size_t len = utf8_seq(p + i, n - i);
      if (len) {
        stt_buf_add(b, p + i, len);
        i += len;
      } else {
        stt_buf_add(b, "\\ufffd", 6);
        i++;
      }
    }
  }
  stt_buf_add(b, "\"", 1);
}

int stt_parse_u64(const char *s, size_t n, uint64_t max, uint64_t *out) {
  if (n == 0 || n > 20)
    return -1;
  uint64_t v = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9')
      return -1;
    uint64_t d = (uint64_t)(s[i] - '0');
    if (v > (UINT64_MAX - d) / 10)
      return -1;
    v = v * 10 + d;
  }
  if (v > max)
    return -1;
  *out = v;
  return 0;
}

int stt_ieq(const char *a, size_t alen, const char *lit) {
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

void stt_trim(const char **s, size_t *n) {
  const char *p = *s;
  size_t len = *n;
  while (len && (*p == ' ' || *p == '\t')) {
    p++;
    len--;
  }
  while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
    len--;
  *s = p;
  *n = len;
}

int stt_has_token(const char *v, size_t n, const char *token) {
  const char *end = v + n;
  while (v < end) {
    const char *comma = memchr(v, ',', (size_t)(end - v));
    const char *te = comma ? comma : end;
    const char *t = v;
    size_t tlen = (size_t)(te - v);
    stt_trim(&t, &tlen);
    if (stt_ieq(t, tlen, token))
      return 1;
    v = te + 1;
  }
  return 0;
}

const char *stt_reason(int status) {
  switch (status) {
  case 101: return "Switching Protocols";
  case 200: return "OK";
  case 204: return "No Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 304: return "Not Modified";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 414: return "URI Too Long";
  case 426: return "Upgrade Required";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return status < 400 ? "OK" : status < 500 ? "Client Error" : "Server Error";
  }
}

void stt_hex(const unsigned char *in, size_t n, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = digits[in[i] >> 4];
    out[2 * i + 1] = digits[in[i] & 15];
  }
  out[2 * n] = '\0';
}
