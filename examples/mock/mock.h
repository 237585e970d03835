/* mock.h — internals shared by the sluice-mock sources (not a public API).
 *
 * sluice-mock is a single-threaded mock inference server on one libuv loop. The sources:
 *   mock_model.c   main: options, listener, signals, port file, stats
 *   mock_conn.c    a client connection: read, llhttp parsing, ordered writes, close
 *   mock_routes.c  what to answer: scheduling (latency, concurrency queue), endpoints
 *   mock_util.c    byte buffers, JSON escaping and scanning, query strings
 *
 * Ownership: the server owns every connection (listed in srv->conns); a connection owns
 * its request state, buffers and write requests. A connection is freed only in the close
 * callback of its last handle, so a callback that closes its own connection may keep
 * touching it until it returns. Allocation failure aborts the process (a test tool). */
#ifndef SLUICE_MOCK_H
#define SLUICE_MOCK_H

#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <openssl/evp.h>
#include <uv.h>

#define MOCK_MAX_HEADERS 128
#define MOCK_MAX_HEAD_BYTES (64 * 1024)      /* request line + headers */
#define MOCK_IN_INITIAL (16 * 1024)          /* connection input buffer, first size */
#define MOCK_IN_MAX (1024 * 1024)            /* held pipelined input before reads pause */
#define MOCK_CHAT_BODY_MAX (8 * 1024 * 1024) /* chat bodies are retained to be scanned */

#include "mock_util.h"

/* ---- intrusive doubly linked list with a sentinel head ---- */

typedef struct mock_link {
  struct mock_link *prev, *next;
} mock_link_t;

static inline void mock_list_init(mock_link_t *h) { h->prev = h->next = h; }
static inline int mock_list_empty(const mock_link_t *h) { return h->next == h; }
static inline void mock_list_push(mock_link_t *h, mock_link_t *n) {
  n->prev = h->prev;
  n->next = h;
  h->prev->next = n;
  h->prev = n;
}
static inline void mock_list_remove(mock_link_t *n) {
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->prev = n->next = n;
}
#define MOCK_CONTAINER(ptr, type, field) ((type *)(void *)((char *)(ptr) - offsetof(type, field)))

/* ---- server ---- */

typedef struct mock_opts {
  const char *listen;    /* HOST:PORT */
  const char *port_file; /* NULL: none */
  const char *name;
  uint64_t latency_ms, jitter_ms;
  double fail_rate;
  int fail_status;
  uint64_t max_concurrency; /* 0: unlimited */
  uint64_t sse_events, sse_interval_ms;
  int report_load, verbose;
  uint64_t seed; /* 0: from time and pid */
} mock_opts_t;

typedef struct mock_stats {
  uint64_t requests;          /* everything except /stats and /healthz */
  uint64_t completed;         /* counted requests whose response was fully written */
  uint64_t aborted;           /* counted requests whose client left before that */
  uint64_t max_inflight_seen;
  uint64_t connections;       /* accepted since start or reset */
} mock_stats_t;

typedef struct mock_server {
  uv_loop_t *loop;
  uv_tcp_t listener;
  uv_signal_t sigint, sigterm;
  llhttp_settings_t settings;
  mock_opts_t opts;
  mock_stats_t stats;
  uint64_t inflight;        /* requests holding a processing slot */
  uint64_t queued;          /* requests waiting for a slot, in waitq */
  uint64_t open_conns;
  uint64_t chat_seq;        /* for completion ids */
  uint64_t rng;             /* xorshift64* state */
  mock_link_t conns;        /* every open connection */
  mock_link_t waitq;        /* FIFO of connections whose request waits for a slot */
  int stopping;
} mock_server_t;

double mock_rand01(mock_server_t *s); /* uniform in [0, 1) */

/* ---- request and connection ---- */

enum mock_action { MOCK_ACT_NONE, MOCK_ACT_CLOSE, MOCK_ACT_RESET, MOCK_ACT_HANG, MOCK_ACT_PARTIAL };

enum mock_route {
  MOCK_R_NOT_FOUND, MOCK_R_CHAT, MOCK_R_ECHO, MOCK_R_UPLOAD, MOCK_R_STREAM, MOCK_R_BYTES,
  MOCK_R_HEALTHZ, MOCK_R_STATS, MOCK_R_STATS_RESET
};

/* Where the connection's current request is. Only one request per connection is past
 * parsing at a time; pipelined requests wait, unparsed, in the input buffer. */
enum mock_phase {
  MOCK_P_IDLE,      /* no request, or one still being read */
  MOCK_P_QUEUED,    /* waiting for a concurrency slot (in srv->waitq) */
  MOCK_P_DELAY,     /* holds a slot; latency timer running */
  MOCK_P_STREAMING, /* head sent; timer paces the next chunk/event */
  MOCK_P_PUMPING,   /* /bytes: the next piece is written when writes drain */
  MOCK_P_PARTIAL,   /* x-mock-action: partial; close when writes drain */
  MOCK_P_WRITING,   /* final bytes queued; the request finishes when writes drain */
  MOCK_P_HANGING,   /* x-mock-action: hang; never answered */
  MOCK_P_DEAD       /* connection closed under the request */
};

typedef struct mock_hdr {
  uint32_t name_off, name_len, val_off, val_len; /* into conn->hbuf */
} mock_hdr_t;

typedef struct mock_req {
  /* as parsed */
  uint8_t method, http_major, http_minor;
  int keep_alive, head_only;
  uint32_t url_len; /* the URL is hbuf[0..url_len) */
  unsigned nhdrs;   /* headers in hdrs, the last member */
  int request_id; /* index into hdrs of x-request-id, or -1 */
  uint64_t body_len;
  int hashing;
  char sha_hex[65];
  mock_buf_t body; /* retained only for chat; owned, reused across requests */
  int keep_body;
  /* x-mock-* overrides */
  int64_t delay_ms; /* -1: not set */
  int status;       /* 0: not set */
  int action, force_fail, expect_continue;
  /* processing */
  int route, phase, counted, has_slot, chunked, resp_status;
  uint64_t delay;  /* effective latency */
  uint64_t start_ms;
  /* streaming (SSE, /stream) and /bytes */
  int sse;
  uint64_t seq, created;
  uint64_t total, sent, interval_ms, size;
  /* last, so that resetting the rest for each request need not touch it */
  mock_hdr_t hdrs[MOCK_MAX_HEADERS];
} mock_req_t;

typedef struct mock_conn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* latency, stream pacing, lingering close: one use at a time */
  uv_shutdown_t shutdown_req;
  mock_server_t *srv;
  mock_link_t link;  /* in srv->conns */
  mock_link_t qlink; /* in srv->waitq while MOCK_P_QUEUED */
  llhttp_t parser;
  char *in; /* unparsed input is in[in_off..in_len) */
  size_t in_off, in_len, in_cap;
  int reading, msg_complete, hstate, error_status;
  mock_buf_t hbuf; /* URL and header bytes of the request being read */
  mock_req_t req;
  EVP_MD_CTX *md;
  mock_buf_t out, head; /* scratch for building a response body and head */
  unsigned writes_pending;
  int open_handles, closing, shutting;
} mock_conn_t;

/* mock_conn.c */
void mock_settings_init(llhttp_settings_t *s);
/* Accepts one pending connection from srv->listener. */
void mock_conn_accept(mock_server_t *srv);
/* Closes c; idempotent. peer_gone: the client left (counts an unanswered request as
 * aborted). reset: close with RST instead of FIN. c is freed later, in the close cb. */
void mock_conn_close(mock_conn_t *c, int peer_gone, int reset);
/* Queues bytes for writing, copying them. On failure the connection is closed. */
void mock_send(mock_conn_t *c, const char *a, size_t alen, const char *b, size_t blen);
/* Queues bytes that stay valid for the life of the process (no copy). */
void mock_send_static(mock_conn_t *c, const char *p, size_t n);
/* The current request is over: continue with pipelined input, or close gracefully. */
void mock_conn_next(mock_conn_t *c);
void mock_timer_start(mock_conn_t *c, uint64_t ms);
/* The value of the first header called name (case-insensitive), or NULL; sets *len. */
const char *mock_req_header(mock_conn_t *c, const char *name, size_t *len);

/* mock_routes.c */
void mock_route_headers(mock_conn_t *c); /* headers parsed: pick the route */
void mock_dispatch(mock_conn_t *c);      /* the whole request is parsed: answer it */
void mock_on_timer(mock_conn_t *c);      /* the connection's request timer fired */
void mock_on_drain(mock_conn_t *c);      /* all writes of c completed */
/* The connection is closing under the request: leave the queue/slot, count an abort. */
void mock_req_abandon(mock_conn_t *c, int peer_gone);
/* Replies with status and a JSON error body, then closes (malformed requests). */
void mock_reply_bad_request(mock_conn_t *c, int status, const char *msg);
void mock_stats_json(mock_server_t *s, mock_buf_t *out);

#endif
