/* What crosses the gateway: the upstream request serialized from the client's (hop-by-hop
 * headers dropped, forwarding headers added), and which upstream response headers reach the
 * client. RFC 9110 7.6.1 for the hop-by-hop set. */
#ifndef SL_FORWARD_H
#define SL_FORWARD_H

#include "buf.h"
#include "endpoint.h"
#include "http1.h"

/* Header changes a route hook asked for (req:set_header / res:set_header / remove_header),
 * applied when the message is serialized: a set replaces every header of that name, a remove
 * drops them. Later edits of a name replace earlier ones. */
typedef struct sl_hedit {
  char *name, *value; /* value NULL: remove */
  uint32_t name_len, value_len;
} sl_hedit_t;

typedef struct sl_hedits {
  sl_hedit_t *v;
  uint32_t n, cap;
  char *path; /* upstream request target replacing the client's (req:set_path), or NULL */
  uint32_t path_len;
} sl_hedits_t;

/* Validates and records an edit (value NULL: remove). `response`: the edit is for a response
 * (a different set of headers is the gateway's own). Returns 0, or -1 with err filled. */
int sl_hedits_put(sl_hedits_t *e, const char *name, size_t nlen, const char *value, size_t vlen,
                  bool response, char *err, size_t errlen);
/* Validates and records a new request target (path with optional query). */
int sl_hedits_set_path(sl_hedits_t *e, const char *path, size_t len, char *err, size_t errlen);
/* True when an edit names this header: the original is not relayed. */
bool sl_hedits_covers(const sl_hedits_t *e, const char *name, size_t nlen);
/* Appends "Name: value\r\n" for every set. */
void sl_hedits_append(const sl_hedits_t *e, sl_buf_t *out);
void sl_hedits_clear(sl_hedits_t *e);

typedef struct sl_forward_opts {
  const char *client_ip;
  const char *request_id;
  bool preserve_host;
  bool websocket; /* forward the upgrade (without extensions: frames are parsed here) */
  bool tls;       /* the client connected over TLS (X-Forwarded-Proto: https) */
  const sl_hedits_t *edits; /* a route hook's changes, or NULL */
} sl_forward_opts_t;

/* Serializes `r` for `ep` into out (replacing its contents), body included. */
void sl_forward_request(sl_buf_t *out, const sl_http_req_t *r, const sl_endpoint_t *ep,
                        const sl_forward_opts_t *opts);

/* True when a response header must not be relayed: hop-by-hop, framing (rewritten by the
 * gateway) or x-request-id (the gateway sets its own). `conn_tokens` is the upstream's
 * Connection header values (may be NULL). */
bool sl_forward_skip_response_header(const char *name, size_t len, const char *conn_tokens,
                                     size_t conn_len);

/* True when `name` is one of the comma-separated tokens in list. */
bool sl_token_listed(const char *list, size_t list_len, const char *name, size_t nlen);

#endif
