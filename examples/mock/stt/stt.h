/* stt.h — internals shared by the sluice-mock-stt sources (not a public API).
 *
 * sluice-mock-stt is a mock streaming speech-to-text server: HTTP/1.1 and WebSocket
 * (RFC 6455) on one libuv loop, for integration tests of WebSocket proxying. The sources:
 *   stt_main.c   main: options, listener, signals, port file, /stats
 *   stt_conn.c   a client connection: reading, ordered writes with backpressure, timer, close
 *   stt_http.c   llhttp parsing, /healthz and /stats, the opening handshake
 *   stt_ws.c     a WebSocket session over wslay: audio accounting, transcripts, closing
 *   stt_util.c   byte buffers, JSON escaping, number and header-token parsing
 *
 * Ownership: the server owns every connection (listed in srv->conns); a connection owns
 * its buffers and, after the upgrade, its session (c->ws). A connection is freed only in
 * the close callback of its last handle, so a callback that closes its own connection may
 * keep touching it until it returns. Allocation failure aborts the process (a test tool). */
#ifndef SLUICE_MOCK_STT_H
#define SLUICE_MOCK_STT_H

#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <uv.h>

#define STT_MAX_HEADERS    64
#define STT_MAX_HEAD_BYTES (16 * 1024)  /* request line + headers */
#define STT_IN_CAP         (64 * 1024)  /* connection input buffer */
#define STT_OUT_HIGH       (256 * 1024) /* staged output above which reads pause */

#include "../mock_util.h"

/* ---- header helpers (stt_util.c) ---- */

/* Whether the comma-separated header value v[0..n) lists token (case-insensitive). */
int stt_has_token(const char *v, size_t n, const char *token);
/* Trims spaces and tabs from both ends of *s[0..*n). */
void stt_trim(const char **s, size_t *n);

/* ---- intrusive doubly linked list with a sentinel head ---- */

typedef struct stt_link {
  struct stt_link *prev, *next;
} stt_link_t;

static inline void stt_list_init(stt_link_t *h) { h->prev = h->next = h; }
static inline int stt_list_empty(const stt_link_t *h) { return h->next == h; }
static inline void stt_list_push(stt_link_t *h, stt_link_t *n) {
  n->prev = h->prev;
  n->next = h;
  h->prev->next = n;
  h->prev = n;
}
static inline void stt_list_remove(stt_link_t *n) {
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->prev = n->next = n;
}
#define STT_CONTAINER(ptr, type, field) ((type *)(void *)((char *)(ptr) - offsetof(type, field)))

/* ---- server ---- */

typedef struct stt_opts {
  const char *listen;    /* HOST:PORT */
  const char *port_file; /* NULL: none */
  const char *name;
  uint64_t partial_every; /* binary messages per partial transcript; 0: no partials */
  uint64_t latency_ms;    /* delay before each transcript message */
  uint64_t drop_after;    /* binary messages before the TCP connection is dropped; 0: never */
  uint64_t max_message;   /* largest message accepted from a client */
  int refuse_status;      /* answer upgrades with this status instead of 101; 0: accept */
  int quiet;
} stt_opts_t;

typedef struct stt_stats {
  uint64_t sessions_open;      /* WebSocket sessions now open */
  uint64_t sessions_total;     /* handshakes answered with 101 */
  uint64_t frames;             /* binary ("audio") messages received, all sessions */
  uint64_t bytes;              /* their payload bytes */
  uint64_t handshakes_refused; /* upgrades refused by --refuse-handshake or x-mock-refuse */
} stt_stats_t;

typedef struct stt_server {
  uv_loop_t *loop;
  uv_tcp_t listener;
  uv_signal_t sigint, sigterm;
  llhttp_settings_t settings;
  stt_opts_t opts;
  stt_stats_t stats;
  stt_link_t conns; /* every open connection */
  uint64_t conn_seq;
  int stopping;
} stt_server_t;

/* Appends the /stats JSON object to out. */
void stt_stats_json(const stt_server_t *s, mock_buf_t *out);

/* ---- connection (stt_conn.c) ---- */

enum stt_mode { STT_HTTP, STT_WS };

typedef struct stt_hdr {
  uint32_t name_off, name_len, val_off, val_len; /* into conn->hbuf */
} stt_hdr_t;

typedef struct stt_ws stt_ws_t; /* a WebSocket session (stt_ws.c) */

typedef struct stt_conn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* HTTP: lingering close; WebSocket: transcript latency, close wait */
  uv_write_t write_req;
  uv_shutdown_t shutdown_req;
  stt_server_t *srv;
  stt_link_t link; /* in srv->conns */
  uint64_t id;
  int mode;
  /* Input not yet consumed is in[in_off..in_len); in has STT_IN_CAP bytes. */
  char *in;
  size_t in_off, in_len;
  /* Output: bytes are staged while the previous batch, flight, is being written. */
  mock_buf_t staged, flight;
  int reading, writing, closing, open_handles;
  int ending;   /* HTTP: shut down once the staged output is written */
  int shutting; /* our FIN is sent or on its way; input is discarded */
  /* the HTTP request being parsed */
  llhttp_t parser;
  mock_buf_t hbuf;   /* URL (hbuf[0..url_len)) and header bytes */
  uint32_t url_len;
  unsigned nhdrs;
  int hstate, msg_complete, error_status, keep_alive;
  stt_hdr_t hdrs[STT_MAX_HEADERS];
  stt_ws_t *ws; /* after the upgrade; owned */
} stt_conn_t;

/* Accepts one pending connection from srv->listener. */
void stt_conn_accept(stt_server_t *srv);
/* Closes c at once, dropping unwritten output; idempotent. Freed later, in the close cb. */
void stt_conn_close(stt_conn_t *c);
/* Ends c gracefully: FIN once the staged output is written, then a brief linger. */
void stt_conn_end(stt_conn_t *c);
/* Stages bytes for writing (copied); stt_conn_flush starts the write. */
void stt_conn_write(stt_conn_t *c, const void *p, size_t n);
void stt_conn_flush(stt_conn_t *c);
/* Bytes staged or being written. */
size_t stt_conn_pending(const stt_conn_t *c);
/* Starts or stops reading according to the mode, buffer space and output backlog. */
void stt_conn_update_reading(stt_conn_t *c);
void stt_conn_timer(stt_conn_t *c, uint64_t ms); /* (re)arms the connection timer */
void stt_conn_timer_stop(stt_conn_t *c);

/* ---- HTTP (stt_http.c) ---- */

void stt_http_settings_init(llhttp_settings_t *s);
/* Parses held input and answers complete requests; may switch c to STT_WS. */
void stt_http_input(stt_conn_t *c);
/* The value of the first header called name (case-insensitive), or NULL; sets *len. */
const char *stt_req_header(const stt_conn_t *c, const char *name, size_t *len);

/* ---- WebSocket session (stt_ws.c) ---- */

/* Starts a session on c, whose 101 response is staged; the input held in c->in is the
 * first WebSocket data. Returns 0, or -1 (c should be closed). */
int stt_ws_start(stt_conn_t *c);
/* n more bytes were appended to c->in. */
void stt_ws_received(stt_conn_t *c, size_t n);
/* Runs the session: feeds wslay, sends, closes when done. Called after any event. */
void stt_ws_pump(stt_conn_t *c);
void stt_ws_on_timer(stt_conn_t *c);
int stt_ws_want_read(const stt_conn_t *c);
/* The client sent EOF. Returns 1 if the session goes on (the client's close frame has
 * arrived, so only answers remain to be sent), 0 if the connection should be closed. */
int stt_ws_eof(stt_conn_t *c);
/* The connection is closing: account the session's end. */
void stt_ws_closing(stt_conn_t *c, const char *why);
void stt_ws_free(stt_ws_t *w);

#endif
