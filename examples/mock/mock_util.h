/* Allocation, byte buffers and small parsers shared by the mock servers (sluice-mock and
 * sluice-mock-stt). Implemented in mock_util.c. */
#ifndef MOCK_UTIL_H
#define MOCK_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* ---- allocation and byte buffers (mock_util.c) ---- */

void *mock_xmalloc(size_t n);            /* never NULL: aborts on failure */
void *mock_xrealloc(void *p, size_t n);  /* never NULL: aborts on failure */

/* A growable byte buffer; zero-initialised is empty. Owns data. */
typedef struct mock_buf {
  char *data;
  size_t len, cap;
} mock_buf_t;

void mock_buf_reserve(mock_buf_t *b, size_t extra);
void mock_buf_add(mock_buf_t *b, const void *p, size_t n);
void mock_buf_adds(mock_buf_t *b, const char *s);
void mock_buf_addf(mock_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s[0..n) as a quoted JSON string. Invalid UTF-8 bytes become U+FFFD. */
void mock_buf_add_json_str(mock_buf_t *b, const char *s, size_t n);
void mock_buf_free(mock_buf_t *b);

/* ---- parsing helpers (mock_util.c) ---- */

/* Scans a chat request body: a JSON object whose top-level "model" string (decoded, into
 * *model) and "stream" boolean are picked out; everything else is skipped. Returns 0, or
 * -1 if the body is not a well-formed JSON object. */
int mock_scan_chat(const char *body, size_t len, mock_buf_t *model, int *stream);

/* Looks up key in the query string of url[0..len). Returns 1 and sets *out when present
 * and a decimal number <= max, 0 when absent, -1 when present but invalid. */
int mock_query_u64(const char *url, size_t len, const char *key, uint64_t max, uint64_t *out);

/* Parses a whole decimal string (no sign, no spaces). Returns 0, or -1 if invalid/> max. */
int mock_parse_u64(const char *s, size_t n, uint64_t max, uint64_t *out);

int mock_ieq(const char *a, size_t alen, const char *lit); /* ASCII case-insensitive equality */
const char *mock_reason(int status);                      /* "OK", "Not Found", ... */
void mock_hex(const unsigned char *in, size_t n, char *out); /* 2n hex digits + NUL */

#endif
