/* Client side: listeners, connections, HTTP/1.1 request parsing with limits and timeouts,
 * keep-alive and pipelining, error responses, graceful close. */
#ifndef SL_SERVER_H
#define SL_SERVER_H

#include "http1.h"
#include "proxy.h"
#include "worker.h"

#include <uv.h>

typedef struct sl_listener {
  uv_tcp_t tcp;
  sl_worker_t *w;
  struct ssl_ctx_st *tls_ctx; /* TLS termination (listen tls = { cert, key }), or NULL */
  bool admin; /* connections are answered by admin.c, not proxied */
} sl_listener_t;

enum sl_conn_state {
  SL_CONN_IDLE,    /* waiting for a request (keep-alive idle timer) */
  SL_CONN_READING, /* a request is partly received (header/body timer) */
  SL_CONN_BUSY,    /* a request is being answered; further input is buffered */
  SL_CONN_LINGER,  /* response sent, write side shut, draining input before close */
  SL_CONN_WS,      /* a WebSocket session: input goes to ws.c */
};

typedef struct sl_conn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* lazily re-armed: fires at or before `deadline` (see arm() in server.c) */
  uint64_t deadline; /* loop time the current state times out at; 0 = no timeout */
  sl_worker_t *w;
  sl_list_t link; /* in w->conns */
  sl_h1_parser_t h1;
  sl_h1_limits_t limits;
  sl_http_req_t req;
  sl_buf_t in; /* received, not yet parsed */
  /* The exchange of the current request; allocated for a request and given back once the
   * connection has gone idle (sl_conn_exchange), so idle keep-alive connections stay small.
   * Its timer lives here: the exchange can then be plain memory. */
  sl_exchange_t *x;
  uv_timer_t xtimer;
  sl_list_t idle_link; /* in w->idle_sweep_conns while the exchange waits to be given back */
  struct sl_tls *tls; /* accepted on a TLS listener */
  char peer[64]; /* client IP, for X-Forwarded-For */
  uint8_t state;
  uint8_t pending_close;
  bool closing;
  bool reading;
  bool in_process;    /* re-entrancy guard for conn_process */
  bool close_after;   /* close once queued writes are flushed */
  bool admin;         /* accepted on the admin listener */
  uint64_t serial;    /* unique per worker: finds the connection again after async work */
} sl_conn_t;

/* The connection's exchange, allocated if it has none (the request being handled needs one). */
sl_exchange_t *sl_conn_exchange(sl_conn_t *c);
/* Per-worker state of the server side (the sweep that frees idle connections' exchanges);
 * closed with the worker's other handles. */
void sl_server_worker_init(sl_worker_t *w);
void sl_server_worker_close(sl_worker_t *w);

/* The live connection with this serial, or NULL when it has closed meanwhile. */
sl_conn_t *sl_server_find_conn(sl_worker_t *w, uint64_t serial);

/* (Re)loads the certificates of the TLS listeners from cfg (on start and on every reload:
 * new connections use the new ones, open connections keep theirs). Returns 0, or -1 with err
 * naming the config key when a file cannot be loaded (nothing is changed then). */
int sl_server_load_tls(sl_worker_t *w, const sl_config_t *cfg, char *err, size_t errlen);
/* Starts listening on every configured address, and on the admin address when set. Returns 0
 * or a negative libuv error with err filled. */
int sl_server_listen(sl_worker_t *w, const sl_config_t *cfg, const uint16_t *ports, bool admin,
                     char *err, size_t errlen);
/* The port listener i is bound to (what a configured port 0 became). */
uint16_t sl_server_listener_port(const sl_worker_t *w, uint32_t i);
/* Stops accepting, closes idle connections, lets busy ones finish (they close after their
 * response). */
void sl_server_drain(sl_worker_t *w);
/* Closes every connection now. */
void sl_server_close_all(sl_worker_t *w);

/* Writes bytes to the client. Returns 0 or a negative error (the connection is closing). */
int sl_conn_write(sl_conn_t *c, const char *data, size_t len);
int sl_conn_writev(sl_conn_t *c, const uv_buf_t *bufs, unsigned n);
size_t sl_conn_queued_bytes(const sl_conn_t *c);
/* The response to the current request is complete. keep_alive = false closes the connection
 * once the response is flushed; otherwise the next pipelined request is handled. */
void sl_conn_response_done(sl_conn_t *c, bool keep_alive);
/* Sends a complete response with a body and finishes the request. */
void sl_conn_send(sl_conn_t *c, int status, const char *content_type, const char *body,
                  size_t len, const char *extra, bool keep_alive);
/* The same in two steps, for callers that account for the response before it goes out:
 * format into `out` (returns the effective keep-alive), then send and finish the request. */
bool sl_conn_format(sl_conn_t *c, int status, const char *content_type, const char *body,
                    size_t len, const char *extra, bool keep_alive, sl_buf_t *out);
bool sl_conn_format_error(sl_conn_t *c, int status, const char *type, const char *msg,
                          const char *extra, bool keep_alive, sl_buf_t *out);
void sl_conn_send_formatted(sl_conn_t *c, int status, sl_buf_t *out, bool keep_alive);
/* Sends a JSON error response {"error":{"type","message","request_id"}} and finishes the
 * request. `extra` holds additional header lines ("Name: value\r\n"), or NULL. */
void sl_conn_send_error(sl_conn_t *c, int status, const char *type, const char *msg,
                        const char *extra, bool keep_alive);
/* Stops or resumes reading from the client (WebSocket backpressure). */
void sl_conn_read_pause(sl_conn_t *c, bool pause);
/* Closes the connection now (abort). Idempotent. */
void sl_conn_close(sl_conn_t *c);
/* The request id for the current request (set by the proxy), generated when absent. */
const char *sl_conn_request_id(sl_conn_t *c);
/* Client write backlog (bytes) above which upstream reads pause. */
uint32_t sl_server_client_hwm(void);

#endif
