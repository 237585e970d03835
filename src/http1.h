/* HTTP/1.1 request parsing for the client side of the gateway, on top of llhttp.
 *
 * The parser is fed bytes as they arrive and stops (pauses) at two events, headers complete
 * and message complete, so the connection can act on each (send 100 Continue, dispatch the
 * request) before more pipelined bytes are parsed. Everything the request holds — URL, header
 * names and values, body — is owned by the sl_http_req_t and lives until sl_http_req_reset.
 * Strictness beyond llhttp's (Host rules, Transfer-Encoding forms, URL form, limits) is
 * enforced here so that every rejection carries a status code and a reason. */
#ifndef SL_HTTP1_H
#define SL_HTTP1_H

#include "buf.h"
#include "common.h"

#include <llhttp.h>

typedef struct sl_header {
  uint32_t name_off, name_len;
  uint32_t value_off, value_len;
} sl_header_t;

typedef struct sl_h1_limits {
  uint32_t max_header_bytes; /* request line + header names and values; 431 beyond */
  uint32_t max_headers;      /* header count; 431 beyond */
  uint64_t max_body_bytes;   /* 413 beyond */
} sl_h1_limits_t;

typedef struct sl_http_req {
  uint8_t method; /* llhttp_method_t */
  uint8_t http_major, http_minor;
  bool keep_alive;
  bool expect_continue;
  bool chunked;
  bool upgrade; /* Connection: upgrade + Upgrade header (WebSocket handshake) */
  int64_t content_length; /* -1 when absent */

  sl_buf_t strings; /* URL, then header names and values, referenced by offsets */
  uint32_t url_len; /* URL is at offset 0 */
  uint32_t path_len; /* URL up to '?' */
  sl_header_t *headers;
  uint32_t nheaders, headers_cap;
  int32_t host_idx; /* index into headers, -1 when absent */
  int32_t request_id_idx;
  sl_buf_t body;

  /* Set when the request is dispatched, for policies: */
  uint64_t seq;        /* unique per worker (req.json is decoded once per seq) */
  const char *peer;    /* client address (req.client) */
  uint64_t json_max;   /* req.json decodes bodies up to this size */

  uint16_t err_status; /* set when parsing failed */
  const char *err_msg;
} sl_http_req_t;

typedef enum sl_h1_event {
  SL_H1_AGAIN = 0, /* all input consumed; feed more */
  SL_H1_HEADERS,   /* headers complete; parser paused */
  SL_H1_MESSAGE,   /* message complete; parser paused */
  SL_H1_ERROR      /* req->err_status and req->err_msg say why; the connection must close */
} sl_h1_event_t;

typedef struct sl_h1_parser {
  llhttp_t p;
  sl_http_req_t *req;
  const sl_h1_limits_t *limits;
  uint32_t header_bytes;
  uint8_t in_field; /* 1 while receiving a header name, 2 while receiving its value */
  uint8_t event;    /* pending sl_h1_event_t */
  bool headers_done;
  char prev_bytes[2];     /* the two last bytes of the previous input, oldest first */
  char prev_nonws;        /* the last byte of the previous input that is not SP or HTAB */
  const char *exec_start; /* input of the current sl_h1_execute call */
} sl_h1_parser_t;

void sl_http_req_init(sl_http_req_t *req);
/* Frees what the request holds and leaves it ready for the next message. */
void sl_http_req_reset(sl_http_req_t *req);
void sl_http_req_free(sl_http_req_t *req);

static inline const char *sl_http_req_str(const sl_http_req_t *r, uint32_t off) {
  return r->strings.data + off;
}
static inline const char *sl_http_req_url(const sl_http_req_t *r) { return r->strings.data; }
/* Finds a header by case-insensitive name; returns its index or -1. */
int sl_http_req_find(const sl_http_req_t *r, const char *name);

void sl_h1_parser_init(sl_h1_parser_t *h, sl_http_req_t *req, const sl_h1_limits_t *limits);
/* Parses up to `len` bytes, stopping early at an event. `*used` receives how many bytes were
 * consumed; the caller re-feeds the rest after handling the event. */
sl_h1_event_t sl_h1_execute(sl_h1_parser_t *h, const char *data, size_t len, size_t *used);
/* Prepares for the next pipelined request after SL_H1_MESSAGE (req must be reset first). */
void sl_h1_next(sl_h1_parser_t *h);
/* Continues parsing after SL_H1_HEADERS. */
void sl_h1_resume(sl_h1_parser_t *h);

const char *sl_http_method_str(uint8_t method);
const char *sl_http_status_reason(int status);

#endif
