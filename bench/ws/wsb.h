/* wsb.h — helpers shared by the WebSocket benchmark tools (ws_echo.c, ws_load.c).
 * Bench-only code: built by bench/ws/run.sh with cc directly, not part of sluice.
 * Allocation failure aborts (a test tool). */
#ifndef WSB_H
#define WSB_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif

#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static inline void *wsb_xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    fprintf(stderr, "out of memory\n");
    abort();
  }
  return p;
}

static inline void *wsb_xrealloc(void *p, size_t n) {
  p = realloc(p, n ? n : 1);
  if (!p) {
    fprintf(stderr, "out of memory\n");
    abort();
  }
  return p;
}

static inline uint64_t wsb_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A growable byte buffer; zero-initialised is empty. */
typedef struct {
  uint8_t *data;
  size_t len, cap;
} wsb_buf_t;

static inline void wsb_buf_add(wsb_buf_t *b, const void *p, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 2048;
    while (cap < b->len + n) cap *= 2;
    b->data = wsb_xrealloc(b->data, cap);
    b->cap = cap;
  }
  memcpy(b->data + b->len, p, n);
  b->len += n;
}

static inline void wsb_buf_free(wsb_buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* base64(SHA-1(key + GUID)) into out[29] (RFC 6455 Sec-WebSocket-Accept). */
static inline void wsb_accept_key(const char *key, size_t len, char out[29]) {
  static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  unsigned char in[128 + sizeof(guid)], md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  if (len > 128) len = 128;
  memcpy(in, key, len);
  memcpy(in + len, guid, sizeof(guid) - 1);
  EVP_Digest(in, len + sizeof(guid) - 1, md, &mdlen, EVP_sha1(), NULL);
  EVP_EncodeBlock((unsigned char *)out, md, (int)mdlen);
}

/* Finds header `name` (lower case, without ':') in an HTTP head; returns its trimmed value
 * and length, or NULL. */
static inline const char *wsb_header(const char *head, size_t n, const char *name,
                                     size_t *vlen) {
  size_t nl = strlen(name);
  const char *p = head, *end = head + n;
  while (p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol) eol = end;
    if ((size_t)(eol - p) > nl && p[nl] == ':' && strncasecmp(p, name, nl) == 0) {
      const char *v = p + nl + 1, *ve = eol;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
      *vlen = (size_t)(ve - v);
      return v;
    }
    p = eol + 1;
  }
  return NULL;
}

/* xorshift64*: masks and handshake keys (not security-relevant here). */
static inline uint64_t wsb_rand(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

/* Latency histogram, log-linear: exact below 128 ns, then 64 sub-buckets per power of two
 * (at most ~1.6% relative error), up to 2^47 ns. */
#define WSB_HIST_BUCKETS (128 + 41 * 64)
typedef struct {
  uint64_t b[WSB_HIST_BUCKETS];
  uint64_t n, sum, max;
} wsb_hist_t;

static inline int wsb_hist_idx(uint64_t v) {
  if (v < 128) return (int)v;
  int k = 63 - __builtin_clzll(v); /* >= 7 */
  if (k > 47) return WSB_HIST_BUCKETS - 1;
  int sub = (int)(v >> (k - 6)) - 64; /* 0..63 */
  return 128 + (k - 7) * 64 + sub;
}

/* Midpoint of bucket i. */
static inline double wsb_hist_val(int i) {
  if (i < 128) return i;
  int k = (i - 128) / 64 + 7, sub = (i - 128) % 64 + 64;
  double lo = (double)sub * (double)(1ULL << (k - 6));
  return lo + (double)(1ULL << (k - 6)) / 2.0;
}

static inline void wsb_hist_add(wsb_hist_t *h, uint64_t v) {
  h->b[wsb_hist_idx(v)]++;
  h->n++;
  h->sum += v;
  if (v > h->max) h->max = v;
}

/* Value at quantile q (0..1), in ns. */
static inline double wsb_hist_q(const wsb_hist_t *h, double q) {
  if (!h->n) return 0;
  uint64_t want = (uint64_t)(q * (double)h->n + 0.999999);
  if (want < 1) want = 1;
  uint64_t acc = 0;
  for (int i = 0; i < WSB_HIST_BUCKETS; i++) {
    acc += h->b[i];
    if (acc >= want) {
      double v = wsb_hist_val(i);
      return v > (double)h->max ? (double)h->max : v;
    }
  }
  return (double)h->max;
}

#endif
