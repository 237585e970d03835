#include "common.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>

static void oom(size_t n) {
  fprintf(stderr, "sluice: out of memory allocating %zu bytes\n", n);
  abort();
}

void *sl_malloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (SL_UNLIKELY(!p)) oom(n);
  return p;
}

void *sl_calloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (SL_UNLIKELY(!p)) oom(n * size);
  return p;
}

void *sl_realloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (SL_UNLIKELY(!q)) oom(n);
  return q;
}

char *sl_strndup(const char *s, size_t n) {
  char *p = sl_malloc(n + 1);
  memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

char *sl_strdup(const char *s) { return sl_strndup(s, strlen(s)); }

bool sl_strieq(const char *s, size_t len, const char *lit) {
  size_t i = 0;
  for (; i < len; i++) {
    unsigned char a = (unsigned char)s[i], b = (unsigned char)lit[i];
    if (b == 0) return false;
    if (a >= 'A' && a <= 'Z') a |= 0x20;
    if (b >= 'A' && b <= 'Z') b |= 0x20;
    if (a != b) return false;
  }
  return lit[i] == 0;
}
