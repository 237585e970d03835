/* Growable byte buffer. The buffer owns `data`; sl_buf_free releases it. */
#ifndef SL_BUF_H
#define SL_BUF_H

#include "common.h"

typedef struct sl_buf {
  char *data;
  size_t len;
  size_t cap;
} sl_buf_t;

static inline void sl_buf_init(sl_buf_t *b) {
  b->data = NULL;
  b->len = b->cap = 0;
}
void sl_buf_free(sl_buf_t *b);
/* Grows the buffer for `extra` more bytes (the slow path of sl_buf_reserve). */
char *sl_buf_grow(sl_buf_t *b, size_t extra);
/* Ensures room for `extra` more bytes; returns a pointer to the end of the data. Inline: it
 * runs a few dozen times per proxied request, almost always with room to spare. */
static inline char *sl_buf_reserve(sl_buf_t *b, size_t extra) {
  if (b->cap - b->len >= extra) return b->data + b->len;
  return sl_buf_grow(b, extra);
}
static inline void sl_buf_append(sl_buf_t *b, const void *p, size_t n) {
  if (!n) return;
  memcpy(sl_buf_reserve(b, n), p, n);
  b->len += n;
}
void sl_buf_appends(sl_buf_t *b, const char *s);
void sl_buf_appendf(sl_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Decimal and lowercase hex forms of an integer, without printf (request hot path). */
void sl_buf_append_u64(sl_buf_t *b, uint64_t v);
void sl_buf_append_hex(sl_buf_t *b, uint64_t v);
/* Appends `n` bytes followed by a NUL-terminated literal (header lines). */
static inline void sl_buf_append2(sl_buf_t *b, const void *p, size_t n, const char *lit) {
  size_t m = strlen(lit);
  char *end = sl_buf_reserve(b, n + m);
  memcpy(end, p, n);
  memcpy(end + n, lit, m);
  b->len += n + m;
}
/* Appends `s` escaped for use inside a JSON string literal (quotes not added). */
void sl_buf_append_json_str(sl_buf_t *b, const char *s, size_t n);
/* Drops the first `n` bytes, moving the rest to the front. */
void sl_buf_consume(sl_buf_t *b, size_t n);
/* Hands the storage to the caller (who frees it with free()) and resets the buffer. */
char *sl_buf_steal(sl_buf_t *b);

#endif
