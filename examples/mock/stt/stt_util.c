/* stt_util.c — header-token helpers for the handshake (buffers and parsers are shared with
 * the HTTP mock: ../mock_util.c). */
#include "stt.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    if (mock_ieq(t, tlen, token))
      return 1;
    v = te + 1;
  }
  return 0;
}
