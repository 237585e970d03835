/* mock_routes.c — what sluice-mock answers: routing, x-mock-* overrides, the latency
 * timer and the FIFO concurrency queue, and the endpoints themselves.
 *
 * A request's life (phases from mock.h): dispatched -> QUEUED (no free slot) -> DELAY
 * (slot held, latency timer) -> a handler writes the response: WRITING directly, or
 * STREAMING/PUMPING first -> when the last write completes the request is finished, its
 * slot goes to the head of the queue, and the connection moves to the next request. */
#include "mock.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define CL_STREAM (-1) /* body length not known up front: chunked (or close-delimited) */
#define CL_NONE (-2)   /* no body at all (204, 304) */

#define MAX_DELAY_MS 3600000u
#define BYTES_MAX (256u * 1024 * 1024)
#define BYTES_PIECE (64 * 1024)
#define STREAM_MAX_CHUNKS 1000000u
#define STREAM_MAX_SIZE (1024u * 1024)

static const char *const chat_words[] = {"Hello", " from", " the", " sluice", " mock",
                                         " model", "."};
#define CHAT_NWORDS (sizeof chat_words / sizeof chat_words[0])

/* ---- response building ---- */

/* Builds a response head in c->head. clen: the Content-Length, CL_STREAM or CL_NONE.
 * extra: more header lines ("name: value\r\n"), or NULL. */
static void head_build(mock_conn_t *c, int status, const char *ctype, int64_t clen,
                       const char *extra) {
  mock_req_t *r = &c->req;
  mock_server_t *srv = c->srv;
  mock_buf_t *h = &c->head;
  h->len = 0;
  r->resp_status = status;
  mock_buf_addf(h, "HTTP/1.1 %d %s\r\n", status, mock_reason(status));
  if (ctype)
    mock_buf_addf(h, "content-type: %s\r\n", ctype);
  if (clen >= 0) {
    mock_buf_addf(h, "content-length: %" PRId64 "\r\n", clen);
  } else if (clen == CL_STREAM) {
    r->chunked = r->http_major == 1 && r->http_minor >= 1;
    if (r->chunked)
      mock_buf_adds(h, "transfer-encoding: chunked\r\n");
    else
      r->keep_alive = 0; /* HTTP/1.0: the body ends when the connection does */
  }
  mock_buf_adds(h, "x-mock-instance: ");
  mock_buf_adds(h, srv->opts.name);
  mock_buf_adds(h, "\r\n");
  if (srv->opts.report_load)
    mock_buf_addf(h, "x-load: %" PRIu64 "\r\n", srv->inflight + srv->queued);
  if (r->request_id >= 0) {
    const mock_hdr_t *rid = &r->hdrs[r->request_id];
    mock_buf_adds(h, "x-request-id: ");
    mock_buf_add(h, c->hbuf.data + rid->val_off, rid->val_len);
    mock_buf_adds(h, "\r\n");
  }
  if (extra)
    mock_buf_adds(h, extra);
  if (!r->keep_alive)
    mock_buf_adds(h, "connection: close\r\n");
  else if (r->http_minor == 0)
    mock_buf_adds(h, "connection: keep-alive\r\n");
  mock_buf_adds(h, "\r\n");
}

/* Sends a complete response; the request finishes once it is written. */
static void respond(mock_conn_t *c, int status, const char *ctype, const char *body,
                    size_t len) {
  mock_req_t *r = &c->req;
  int bodyless = status == 204 || status == 304;
  head_build(c, status, bodyless ? NULL : ctype, bodyless ? CL_NONE : (int64_t)len, NULL);
  r->phase = MOCK_P_WRITING;
  if (bodyless || r->head_only)
    len = 0;
  mock_send(c, c->head.data, c->head.len, body, len);
}

static void respond_json(mock_conn_t *c, int status) {
  respond(c, status, "application/json", c->out.data, c->out.len);
}

static void respond_error(mock_conn_t *c, int status, const char *type, const char *msg) {
  mock_buf_t *o = &c->out;
  o->len = 0;
  mock_buf_adds(o, "{\"error\":{\"type\":");
  mock_buf_add_json_str(o, type, strlen(type));
  mock_buf_adds(o, ",\"message\":");
  mock_buf_add_json_str(o, msg, strlen(msg));
  mock_buf_adds(o, "}}");
  respond_json(c, status);
}

void mock_reply_bad_request(mock_conn_t *c, int status, const char *msg) {
  mock_req_t *r = &c->req;
  r->keep_alive = 0;
  r->head_only = 0;
  r->request_id = -1;
  r->counted = 0;
  respond_error(c, status, "invalid_request_error", msg);
}

/* Appends one body piece to out, framed as a chunk when the response is chunked. */
static void chunk_add(mock_conn_t *c, mock_buf_t *out, const char *p, size_t n) {
  if (c->req.chunked)
    mock_buf_addf(out, "%zx\r\n", n);
  mock_buf_add(out, p, n);
  if (c->req.chunked)
    mock_buf_adds(out, "\r\n");
}

static void log_req(mock_conn_t *c, const char *outcome) {
  mock_req_t *r = &c->req;
  if (!c->srv->opts.verbose)
    return;
  char status[16] = "-"; /* no response head was sent */
  if (r->resp_status)
    snprintf(status, sizeof status, "%d", r->resp_status);
  fprintf(stderr, "sluice-mock %s: %s %.*s -> %s %s (%" PRIu64 " ms)\n", c->srv->opts.name,
          llhttp_method_name((llhttp_method_t)r->method), (int)r->url_len, c->hbuf.data, status,
          outcome, uv_now(c->srv->loop) - r->start_ms);
}

/* ---- concurrency slots ---- */

static int slot_free(const mock_server_t *s) {
  return s->opts.max_concurrency == 0 || s->inflight < s->opts.max_concurrency;
}

static void slot_take(mock_conn_t *c) {
  mock_server_t *s = c->srv;
  c->req.has_slot = 1;
  s->inflight++;
  if (s->inflight > s->stats.max_inflight_seen)
    s->stats.max_inflight_seen = s->inflight;
}

/* Frees c's slot and hands it to the oldest waiting request. Its latency timer starts
 * now; even a zero delay goes through the timer, so no other connection's response is
 * written from inside this call. */
static void slot_release(mock_conn_t *c) {
  mock_server_t *s = c->srv;
  c->req.has_slot = 0;
  s->inflight--;
  while (!mock_list_empty(&s->waitq) && slot_free(s)) {
    mock_link_t *l = s->waitq.next;
    mock_list_remove(l);
    s->queued--;
    mock_conn_t *next = MOCK_CONTAINER(l, mock_conn_t, qlink);
    slot_take(next);
    next->req.phase = MOCK_P_DELAY;
    mock_timer_start(next, next->req.delay);
  }
}

static void req_finish(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  if (r->counted) {
    c->srv->stats.completed++;
    log_req(c, "done");
  }
  if (r->has_slot)
    slot_release(c);
  mock_conn_next(c);
}

void mock_req_abandon(mock_conn_t *c, int peer_gone) {
  mock_req_t *r = &c->req;
  mock_server_t *s = c->srv;
  int answering = 0;
  switch (r->phase) {
  case MOCK_P_QUEUED:
    mock_list_remove(&c->qlink);
    s->queued--;
    answering = 1;
    break;
  case MOCK_P_DELAY:
  case MOCK_P_STREAMING:
  case MOCK_P_PUMPING:
  case MOCK_P_WRITING:
  case MOCK_P_HANGING:
    answering = 1;
    break;
  default:
    break;
  }
  if (r->has_slot)
    slot_release(c);
  if (answering && r->counted && peer_gone) {
    s->stats.aborted++;
    log_req(c, "aborted by client");
  }
  r->phase = MOCK_P_DEAD;
}

/* ---- endpoints ---- */

static void h_healthz(mock_conn_t *c) { respond(c, 200, "text/plain", "ok", 2); }

void mock_stats_json(mock_server_t *s, mock_buf_t *o) {
  mock_buf_addf(o,
                "{\"requests\":%" PRIu64 ",\"inflight\":%" PRIu64 ",\"queued\":%" PRIu64
                ",\"max_inflight_seen\":%" PRIu64 ",\"completed\":%" PRIu64
                ",\"aborted\":%" PRIu64 ",\"connections\":%" PRIu64
                ",\"open_connections\":%" PRIu64 "}",
                s->stats.requests, s->inflight, s->queued, s->stats.max_inflight_seen,
                s->stats.completed, s->stats.aborted, s->stats.connections, s->open_conns);
}

static void h_stats(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  mock_server_t *s = c->srv;
  if (r->route == MOCK_R_STATS_RESET) {
    if (r->method != HTTP_POST) {
      respond_error(c, 405, "method_not_allowed", "use POST /stats/reset");
      return;
    }
    memset(&s->stats, 0, sizeof s->stats);
    s->stats.max_inflight_seen = s->inflight;
  } else if (r->method != HTTP_GET && r->method != HTTP_HEAD) {
    respond_error(c, 405, "method_not_allowed", "use GET /stats");
    return;
  }
  c->out.len = 0;
  mock_stats_json(s, &c->out);
  respond_json(c, 200);
}

static void h_not_found(mock_conn_t *c) {
  mock_buf_t msg = {0};
  mock_buf_adds(&msg, "no route for ");
  mock_buf_add(&msg, c->hbuf.data, c->req.url_len);
  mock_buf_add(&msg, "", 1);
  respond_error(c, 404, "not_found", msg.data);
  mock_buf_free(&msg);
}

/* The body summary shared by /echo and /upload. */
static void body_summary(mock_conn_t *c, mock_buf_t *o) {
  mock_buf_addf(o, "\"body_length\":%" PRIu64 ",\"body_sha256\":\"%s\"", c->req.body_len,
                c->req.sha_hex);
}

static void h_echo(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  mock_buf_t *o = &c->out;
  const char *method = llhttp_method_name((llhttp_method_t)r->method);
  o->len = 0;
  mock_buf_adds(o, "{\"method\":");
  mock_buf_add_json_str(o, method, strlen(method));
  mock_buf_adds(o, ",\"url\":");
  mock_buf_add_json_str(o, c->hbuf.data, r->url_len);
  mock_buf_adds(o, ",\"headers\":[");
  for (unsigned i = 0; i < r->nhdrs; i++) {
    const mock_hdr_t *h = &r->hdrs[i];
    mock_buf_adds(o, i ? ",[" : "[");
    mock_buf_add_json_str(o, c->hbuf.data + h->name_off, h->name_len);
    mock_buf_adds(o, ",");
    mock_buf_add_json_str(o, c->hbuf.data + h->val_off, h->val_len);
    mock_buf_adds(o, "]");
  }
  mock_buf_adds(o, "],");
  body_summary(c, o);
  mock_buf_adds(o, ",\"instance\":");
  mock_buf_add_json_str(o, c->srv->opts.name, strlen(c->srv->opts.name));
  mock_buf_adds(o, "}");
  respond_json(c, r->resp_status);
}

static void h_upload(mock_conn_t *c) {
  if (c->req.method != HTTP_POST && c->req.method != HTTP_PUT) {
    respond_error(c, 405, "method_not_allowed", "use POST /upload");
    return;
  }
  c->out.len = 0;
  mock_buf_adds(&c->out, "{");
  body_summary(c, &c->out);
  mock_buf_adds(&c->out, "}");
  respond_json(c, c->req.resp_status);
}

/* The JSON of streamed chat event i (0-based); the model name is in r->body. */
static void chat_chunk_json(mock_conn_t *c, uint64_t i, mock_buf_t *o) {
  mock_req_t *r = &c->req;
  const char *word = chat_words[i % CHAT_NWORDS];
  mock_buf_addf(o,
                "{\"id\":\"chatcmpl-mock-%" PRIu64 "\",\"object\":\"chat.completion.chunk\","
                "\"created\":%" PRIu64 ",\"model\":",
                r->seq, r->created);
  mock_buf_add_json_str(o, r->body.data, r->body.len);
  mock_buf_adds(o, ",\"choices\":[{\"index\":0,\"delta\":{");
  if (i == 0)
    mock_buf_adds(o, "\"role\":\"assistant\",");
  mock_buf_adds(o, "\"content\":");
  mock_buf_add_json_str(o, word, strlen(word));
  mock_buf_adds(o, i + 1 == r->total ? "},\"finish_reason\":\"stop\"}]}"
                                     : "},\"finish_reason\":null}]}");
}

/* Appends the next streamed piece (SSE event or /stream chunk) to out. After the last
 * one it also appends the end of the body and moves to WRITING; otherwise it arms the
 * timer for the next piece. */
static void stream_next(mock_conn_t *c, mock_buf_t *out) {
  mock_req_t *r = &c->req;
  if (r->sent < r->total) {
    uint64_t i = r->sent++;
    if (r->sse) {
      mock_buf_t *ev = &c->head; /* free once the head has been sent */
      ev->len = 0;
      mock_buf_adds(ev, "data: ");
      chat_chunk_json(c, i, ev);
      mock_buf_adds(ev, "\n\n");
      chunk_add(c, out, ev->data, ev->len);
    } else {
      if (c->req.chunked) /* framed by hand: the bytes are generated in place */
        mock_buf_addf(out, "%" PRIx64 "\r\n", r->size);
      mock_buf_reserve(out, r->size + 2);
      memset(out->data + out->len, '0' + (int)(i % 10), r->size);
      out->len += r->size;
      if (c->req.chunked)
        mock_buf_adds(out, "\r\n");
    }
  }
  if (r->sent < r->total) {
    r->phase = MOCK_P_STREAMING;
    mock_timer_start(c, r->interval_ms);
    return;
  }
  if (r->sse)
    chunk_add(c, out, "data: [DONE]\n\n", 14);
  if (r->chunked)
    mock_buf_adds(out, "0\r\n\r\n");
  r->phase = MOCK_P_WRITING;
}

/* Sends the head of a streamed response together with its first piece. */
static void stream_start(mock_conn_t *c, const char *ctype, const char *extra) {
  mock_req_t *r = &c->req;
  head_build(c, r->resp_status, ctype, CL_STREAM, extra);
  if (r->head_only) {
    r->phase = MOCK_P_WRITING;
    mock_send(c, c->head.data, c->head.len, NULL, 0);
    return;
  }
  c->out.len = 0;
  mock_buf_add(&c->out, c->head.data, c->head.len);
  stream_next(c, &c->out);
  mock_send(c, c->out.data, c->out.len, NULL, 0);
}

static void stream_tick(mock_conn_t *c) {
  c->out.len = 0;
  stream_next(c, &c->out);
  mock_send(c, c->out.data, c->out.len, NULL, 0);
}

static void h_chat(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  mock_server_t *s = c->srv;
  if (r->method != HTTP_POST) {
    respond_error(c, 405, "method_not_allowed", "use POST /v1/chat/completions");
    return;
  }
  mock_buf_t model = {0};
  int stream = 0;
  if (mock_scan_chat(r->body.data, r->body.len, &model, &stream) < 0) {
    mock_buf_free(&model);
    respond_error(c, 400, "invalid_request_error", "request body is not a JSON object");
    return;
  }
  /* The request body is no longer needed; its buffer now holds the model name. */
  r->body.len = 0;
  if (model.len)
    mock_buf_add(&r->body, model.data, model.len);
  else
    mock_buf_adds(&r->body, "mock-model");
  mock_buf_free(&model);
  r->seq = ++s->chat_seq;
  r->created = (uint64_t)time(NULL);
  r->total = s->opts.sse_events;
  if (stream) {
    r->sse = 1;
    r->interval_ms = s->opts.sse_interval_ms;
    stream_start(c, "text/event-stream", "cache-control: no-cache\r\n");
    return;
  }
  mock_buf_t *o = &c->out;
  mock_buf_t content = {0};
  for (uint64_t i = 0; i < r->total; i++)
    mock_buf_adds(&content, chat_words[i % CHAT_NWORDS]);
  o->len = 0;
  mock_buf_addf(o,
                "{\"id\":\"chatcmpl-mock-%" PRIu64 "\",\"object\":\"chat.completion\","
                "\"created\":%" PRIu64 ",\"model\":",
                r->seq, r->created);
  mock_buf_add_json_str(o, r->body.data, r->body.len);
  mock_buf_adds(o, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
  mock_buf_add_json_str(o, content.data, content.len);
  uint64_t prompt = (r->body_len + 3) / 4;
  mock_buf_addf(o,
                "},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":%" PRIu64
                ",\"completion_tokens\":%" PRIu64 ",\"total_tokens\":%" PRIu64 "}}",
                prompt, r->total, prompt + r->total);
  mock_buf_free(&content);
  respond_json(c, r->resp_status);
}

static void h_stream(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  uint64_t n = 5, ms = 10, size = 16;
  const char *url = c->hbuf.data;
  if (mock_query_u64(url, r->url_len, "chunks", STREAM_MAX_CHUNKS, &n) < 0 ||
      mock_query_u64(url, r->url_len, "interval_ms", MAX_DELAY_MS, &ms) < 0 ||
      mock_query_u64(url, r->url_len, "size", STREAM_MAX_SIZE, &size) < 0 || size == 0) {
    respond_error(c, 400, "invalid_request_error",
                  "chunks <= 1000000, interval_ms <= 3600000, 1 <= size <= 1048576");
    return;
  }
  r->total = n;
  r->interval_ms = ms;
  r->size = size;
  stream_start(c, "application/octet-stream", NULL);
}

/* /bytes content: byte i is i % 251. Every piece is a window into this table. */
static char bytes_pattern[BYTES_PIECE + 251];

static void bytes_pump(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  uint64_t left = r->total - r->sent;
  size_t n = left < BYTES_PIECE ? (size_t)left : BYTES_PIECE;
  const char *p = bytes_pattern + r->sent % 251;
  r->sent += n;
  if (r->sent == r->total)
    r->phase = MOCK_P_WRITING;
  mock_send_static(c, p, n);
}

static void h_bytes(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  uint64_t n = 1024;
  if (mock_query_u64(c->hbuf.data, r->url_len, "n", BYTES_MAX, &n) < 0) {
    respond_error(c, 400, "invalid_request_error", "n must be a number <= 268435456");
    return;
  }
  static int pattern_ready;
  if (!pattern_ready) {
    for (size_t i = 0; i < sizeof bytes_pattern; i++)
      bytes_pattern[i] = (char)(i % 251);
    pattern_ready = 1;
  }
  head_build(c, r->resp_status, "application/octet-stream", (int64_t)n, NULL);
  r->total = n;
  r->sent = 0;
  r->phase = (n == 0 || r->head_only) ? MOCK_P_WRITING : MOCK_P_PUMPING;
  mock_send(c, c->head.data, c->head.len, NULL, 0);
  if (r->phase == MOCK_P_PUMPING)
    bytes_pump(c); /* the rest, one piece per drained write: that is the backpressure */
}

/* x-mock-action: partial — promise 100 bytes, send 10, close. */
static void h_partial(mock_conn_t *c) {
  head_build(c, 200, "application/octet-stream", 100, NULL);
  c->req.phase = MOCK_P_PARTIAL;
  mock_send(c, c->head.data, c->head.len, "0123456789", 10);
}

/* ---- routing and dispatch ---- */

static int path_is(const char *p, size_t n, const char *lit) {
  size_t l = strlen(lit);
  return n == l && memcmp(p, lit, l) == 0;
}

static int route_of(const char *p, size_t n) {
  if (path_is(p, n, "/v1/chat/completions"))
    return MOCK_R_CHAT;
  if (path_is(p, n, "/echo") || (n > 6 && memcmp(p, "/echo/", 6) == 0))
    return MOCK_R_ECHO;
  if (path_is(p, n, "/upload"))
    return MOCK_R_UPLOAD;
  if (path_is(p, n, "/stream"))
    return MOCK_R_STREAM;
  if (path_is(p, n, "/bytes"))
    return MOCK_R_BYTES;
  if (path_is(p, n, "/healthz"))
    return MOCK_R_HEALTHZ;
  if (path_is(p, n, "/stats"))
    return MOCK_R_STATS;
  if (path_is(p, n, "/stats/reset"))
    return MOCK_R_STATS_RESET;
  return MOCK_R_NOT_FOUND;
}

static int parse_action(const char *v, size_t n) {
  if (mock_ieq(v, n, "close"))
    return MOCK_ACT_CLOSE;
  if (mock_ieq(v, n, "reset"))
    return MOCK_ACT_RESET;
  if (mock_ieq(v, n, "hang"))
    return MOCK_ACT_HANG;
  if (mock_ieq(v, n, "partial"))
    return MOCK_ACT_PARTIAL;
  return MOCK_ACT_NONE;
}

/* Reads the x-mock-* overrides and x-request-id. Malformed values are ignored. */
static void read_overrides(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  for (unsigned i = 0; i < r->nhdrs; i++) {
    const mock_hdr_t *h = &r->hdrs[i];
    const char *name = c->hbuf.data + h->name_off, *v = c->hbuf.data + h->val_off;
    uint64_t num;
    if (h->name_len < 2 || (name[0] | 0x20) != 'x' || name[1] != '-')
      continue;
    if (mock_ieq(name, h->name_len, "x-request-id")) {
      r->request_id = (int)i;
    } else if (mock_ieq(name, h->name_len, "x-mock-delay-ms")) {
      if (mock_parse_u64(v, h->val_len, MAX_DELAY_MS, &num) == 0)
        r->delay_ms = (int64_t)num;
    } else if (mock_ieq(name, h->name_len, "x-mock-status")) {
      if (mock_parse_u64(v, h->val_len, 999, &num) == 0 && num >= 200)
        r->status = (int)num;
    } else if (mock_ieq(name, h->name_len, "x-mock-action")) {
      r->action = parse_action(v, h->val_len);
    } else if (mock_ieq(name, h->name_len, "x-mock-fail")) {
      r->force_fail = mock_ieq(v, h->val_len, "1") || mock_ieq(v, h->val_len, "true");
    }
  }
}

void mock_route_headers(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  const char *p = c->hbuf.data, *end = p + r->url_len;
  /* absolute-form ("http://host/path") as a proxy might send it */
  const char *scheme = r->url_len > 3 ? memchr(p, ':', r->url_len) : NULL;
  if (p < end && *p != '/' && scheme && end - scheme > 3 && scheme[1] == '/' && scheme[2] == '/') {
    const char *slash = memchr(scheme + 3, '/', (size_t)(end - scheme - 3));
    p = slash ? slash : end;
  }
  const char *q = p;
  while (q < end && *q != '?' && *q != '#')
    q++;
  r->route = route_of(p, (size_t)(q - p));
  r->keep_body = r->route == MOCK_R_CHAT && r->method == HTTP_POST;
  if (r->route != MOCK_R_HEALTHZ && r->route != MOCK_R_STATS && r->route != MOCK_R_STATS_RESET)
    read_overrides(c);
  else
    for (unsigned i = 0; i < r->nhdrs; i++) /* x-request-id is echoed everywhere */
      if (mock_ieq(c->hbuf.data + r->hdrs[i].name_off, r->hdrs[i].name_len, "x-request-id"))
        r->request_id = (int)i;
}

/* The latency is over: answer, honouring status and failure overrides first. */
static void respond_now(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  mock_server_t *s = c->srv;
  if (r->action == MOCK_ACT_PARTIAL) {
    h_partial(c);
    return;
  }
  if (r->status >= 400) {
    respond_error(c, r->status, "mock_status", "status forced by x-mock-status");
    return;
  }
  if (r->status == 204 || r->status == 304) {
    respond(c, r->status, NULL, NULL, 0);
    return;
  }
  if (r->force_fail || (s->opts.fail_rate > 0 && mock_rand01(s) < s->opts.fail_rate)) {
    respond_error(c, s->opts.fail_status, "server_error", "mock failure");
    return;
  }
  r->resp_status = r->status ? r->status : 200;
  switch (r->route) {
  case MOCK_R_CHAT: h_chat(c); break;
  case MOCK_R_ECHO: h_echo(c); break;
  case MOCK_R_UPLOAD: h_upload(c); break;
  case MOCK_R_STREAM: h_stream(c); break;
  case MOCK_R_BYTES: h_bytes(c); break;
  default: h_not_found(c); break;
  }
}

void mock_dispatch(mock_conn_t *c) {
  mock_req_t *r = &c->req;
  mock_server_t *s = c->srv;
  if (r->route == MOCK_R_HEALTHZ) {
    h_healthz(c);
    return;
  }
  if (r->route == MOCK_R_STATS || r->route == MOCK_R_STATS_RESET) {
    h_stats(c);
    return;
  }
  r->counted = 1;
  s->stats.requests++;
  switch (r->action) {
  case MOCK_ACT_CLOSE:
  case MOCK_ACT_RESET:
    log_req(c, r->action == MOCK_ACT_CLOSE ? "closed (x-mock-action)" : "reset (x-mock-action)");
    mock_conn_close(c, 0, r->action == MOCK_ACT_RESET);
    return;
  case MOCK_ACT_HANG:
    r->phase = MOCK_P_HANGING; /* holds no slot: it must not starve the others */
    return;
  default:
    break;
  }
  if (r->delay_ms >= 0) {
    r->delay = (uint64_t)r->delay_ms;
  } else {
    r->delay = s->opts.latency_ms;
    if (s->opts.jitter_ms)
      r->delay += (uint64_t)(mock_rand01(s) * (double)(s->opts.jitter_ms + 1));
  }
  if (!slot_free(s)) {
    r->phase = MOCK_P_QUEUED;
    mock_list_push(&s->waitq, &c->qlink);
    s->queued++;
    return;
  }
  slot_take(c);
  if (r->delay == 0) {
    respond_now(c);
    return;
  }
  r->phase = MOCK_P_DELAY;
  mock_timer_start(c, r->delay);
}

void mock_on_timer(mock_conn_t *c) {
  if (c->req.phase == MOCK_P_DELAY)
    respond_now(c);
  else if (c->req.phase == MOCK_P_STREAMING)
    stream_tick(c);
}

void mock_on_drain(mock_conn_t *c) {
  switch (c->req.phase) {
  case MOCK_P_PUMPING: bytes_pump(c); break;
  case MOCK_P_PARTIAL: mock_conn_close(c, 0, 0); break;
  case MOCK_P_WRITING: req_finish(c); break;
  default: break; /* streaming is paced by the timer; IDLE: a 100 Continue went out */
  }
}
