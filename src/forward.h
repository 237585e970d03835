/* What crosses the gateway: the upstream request serialized from the client's (hop-by-hop
 * headers dropped, forwarding headers added), and which upstream response headers reach the
 * client. RFC 9110 7.6.1 for the hop-by-hop set. */
#ifndef SL_FORWARD_H
#define SL_FORWARD_H

#include "buf.h"
#include "endpoint.h"
#include "http1.h"

typedef struct sl_forward_opts {
  const char *client_ip;
  const char *request_id;
  bool preserve_host;
  bool websocket; /* forward the upgrade (without extensions: frames are parsed here) */
  bool tls;       /* the client connected over TLS (X-Forwarded-Proto: https) */
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
