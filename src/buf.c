#include "buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void sl_buf_free(sl_buf_t *b) {
  free(b->data);
  sl_buf_init(b);
}

char *sl_buf_grow(sl_buf_t *b, size_t extra) {
  if (b->cap - b->len < extra) {
    /* 1000 bytes fit most header blocks in one allocation, and stay in glibc's per-thread
     * cache (chunks up to 1032 bytes), which recycles them across requests. */
    size_t cap = b->cap ? b->cap : 1000;
    while (cap - b->len < extra) cap *= 2;
    b->data = sl_realloc(b->data, cap);
    b->cap = cap;
  }
  return b->data + b->len;
}

void sl_buf_appends(sl_buf_t *b, const char *s) { sl_buf_append(b, s, strlen(s)); }

void sl_buf_appendf(sl_buf_t *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *end = sl_buf_reserve(b, 128);
  int n = vsnprintf(end, b->cap - b->len, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= b->cap - b->len) {
    end = sl_buf_reserve(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(end, b->cap - b->len, fmt, ap);
    va_end(ap);
  }
  b->len += (size_t)n;
}

void sl_buf_append_json_str(sl_buf_t *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') {
      char e[2] = {'\\', (char)c};
      sl_buf_append(b, e, 2);
    } else if (c < 0x20 || c == 0x7f) {
      char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
      sl_buf_append(b, e, 6);
    } else {
      sl_buf_append(b, &s[i], 1);
    }
  }
}

void sl_buf_append_u64(sl_buf_t *b, uint64_t v) {
  char tmp[20];
  int i = 20;
  do {
    tmp[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  sl_buf_append(b, tmp + i, (size_t)(20 - i));
}

void sl_buf_append_hex(sl_buf_t *b, uint64_t v) {
  static const char hex[] = "0123456789abcdef";
  char tmp[16];
  int i = 16;
  do {
    tmp[--i] = hex[v & 15];
    v >>= 4;
  } while (v);
  sl_buf_append(b, tmp + i, (size_t)(16 - i));
}

void sl_buf_consume(sl_buf_t *b, size_t n) {
  if (n >= b->len) {
    b->len = 0;
    return;
  }
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

char *sl_buf_steal(sl_buf_t *b) {
  char *p = b->data;
  sl_buf_init(b);
  return p;
}
