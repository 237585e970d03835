/* HTTP/1.1 request parsing: every input is also fed in random chunk sizes, which must not
 * change the outcome. */
#include "http1.h"
#include "t.h"

typedef struct result {
  int messages;
  int headers_events;
  int error_status;
  char url[256];
  char host[128];
  char body[4096];
  size_t body_len;
  int nheaders;
  bool keep_alive, expect, chunked;
} result_t;

static const sl_h1_limits_t limits = {.max_header_bytes = 8192, .max_headers = 50,
                                      .max_body_bytes = 1024};

static unsigned rng = 12345;
static size_t rand_chunk(size_t max) {
  rng = rng * 1103515245u + 12345u;
  return 1 + (rng >> 8) % max;
}

/* Parses all of `in`, `chunk` bytes at a time (0 = random sizes), collecting messages until the
 * first error. Returns the result of the last message (or the error). */
static result_t parse(const char *in, size_t len, size_t chunk, const sl_h1_limits_t *lim) {
  result_t res = {0};
  sl_http_req_t req;
  sl_h1_parser_t h;
  sl_http_req_init(&req);
  sl_h1_parser_init(&h, &req, lim ? lim : &limits);
  /* Unparsed bytes carry over like the connection's input buffer does. */
  char pending[65536];
  size_t plen = 0, off = 0;
  while (off < len || plen) {
    size_t n = chunk ? chunk : rand_chunk(17);
    if (n > len - off) n = len - off;
    memcpy(pending + plen, in + off, n);
    plen += n;
    off += n;
    size_t pos = 0;
    for (;;) {
      size_t used = 0;
      sl_h1_event_t ev = sl_h1_execute(&h, pending + pos, plen - pos, &used);
      pos += used;
      if (ev == SL_H1_ERROR) {
        res.error_status = req.err_status;
        sl_http_req_free(&req);
        return res;
      }
      if (ev == SL_H1_HEADERS) {
        res.headers_events++;
        sl_h1_resume(&h);
        continue;
      }
      if (ev == SL_H1_MESSAGE) {
        res.messages++;
        snprintf(res.url, sizeof(res.url), "%.*s", (int)req.url_len, sl_http_req_url(&req));
        res.host[0] = 0;
        if (req.host_idx >= 0)
          snprintf(res.host, sizeof(res.host), "%.*s", (int)req.headers[req.host_idx].value_len,
                   sl_http_req_str(&req, req.headers[req.host_idx].value_off));
        res.body_len = req.body.len;
        memcpy(res.body, req.body.data ? req.body.data : "", SL_MIN(req.body.len, sizeof(res.body)));
        res.nheaders = (int)req.nheaders;
        res.keep_alive = req.keep_alive;
        res.expect = req.expect_continue;
        res.chunked = req.chunked;
        sl_http_req_reset(&req);
        sl_h1_next(&h);
        continue;
      }
      break; /* AGAIN */
    }
    memmove(pending, pending + pos, plen - pos);
    plen -= pos;
    if (off == len) break;
  }
  sl_http_req_free(&req);
  return res;
}

/* Same outcome whole, byte by byte, and in several random chunkings. */
static result_t parse_all_ways(const char *in) {
  size_t len = strlen(in);
  result_t whole = parse(in, len, len ? len : 1, NULL);
  result_t bytewise = parse(in, len, 1, NULL);
  CHECK_EQ_INT(whole.messages, bytewise.messages);
  CHECK_EQ_INT(whole.error_status, bytewise.error_status);
  CHECK_EQ_INT(whole.body_len, bytewise.body_len);
  for (int i = 0; i < 5; i++) {
    result_t r = parse(in, len, 0, NULL);
    CHECK_EQ_INT(whole.messages, r.messages);
    CHECK_EQ_INT(whole.error_status, r.error_status);
    CHECK_EQ_STR(whole.url, r.url);
    CHECK(whole.body_len == r.body_len && memcmp(whole.body, r.body, whole.body_len) == 0);
  }
  return whole;
}

static void simple_get(void) {
  result_t r = parse_all_ways("GET /v1/models?x=1 HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n");
  CHECK_EQ_INT(r.messages, 1);
  CHECK_EQ_INT(r.error_status, 0);
  CHECK_EQ_STR(r.url, "/v1/models?x=1");
  CHECK_EQ_STR(r.host, "a.example");
  CHECK_EQ_INT(r.nheaders, 2);
  CHECK(r.keep_alive);
}

static void content_length_body(void) {
  result_t r = parse_all_ways("POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world");
  CHECK_EQ_INT(r.messages, 1);
  CHECK_EQ_INT(r.body_len, 11);
  CHECK(memcmp(r.body, "hello world", 11) == 0);
}

static void chunked_body(void) {
  result_t r = parse_all_ways("POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                              "5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\n\r\n");
  CHECK_EQ_INT(r.messages, 1);
  CHECK(r.chunked);
  CHECK_EQ_INT(r.body_len, 11);
  CHECK(memcmp(r.body, "hello world", 11) == 0);
}

static void pipelined(void) {
  result_t r = parse_all_ways("GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
                              "POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                              "GET /c HTTP/1.1\r\nHost: h\r\n\r\n");
  CHECK_EQ_INT(r.messages, 3);
  CHECK_EQ_STR(r.url, "/c");
}

static void http10(void) {
  result_t r = parse_all_ways("GET / HTTP/1.0\r\n\r\n");
  CHECK_EQ_INT(r.messages, 1);
  CHECK(!r.keep_alive);
  r = parse_all_ways("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  CHECK(r.keep_alive);
}

static void expect_continue(void) {
  result_t r = parse_all_ways("POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                              "Content-Length: 2\r\n\r\nok");
  CHECK_EQ_INT(r.headers_events, 1);
  CHECK_EQ_INT(r.messages, 1);
  CHECK_EQ_INT(r.body_len, 2);
  /* no body: nothing to continue */
  r = parse_all_ways("GET /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n");
  CHECK_EQ_INT(r.headers_events, 0);
  CHECK_EQ_INT(r.messages, 1);
  r = parse_all_ways("POST /x HTTP/1.1\r\nHost: h\r\nExpect: something\r\nContent-Length: 1\r\n\r\nx");
  CHECK_EQ_INT(r.error_status, 417);
}

/* Empty values are not folds, however the bytes arrive. */
static void empty_values(void) {
  result_t r = parse_all_ways("POST / HTTP/1.1\r\nHost: h\r\nX-Empty: \r\nX-None:\r\n"
                              "Content-Length: 3\r\n\r\nabc");
  CHECK_EQ_INT(r.error_status, 0);
  CHECK_EQ_INT(r.messages, 1);
  CHECK_EQ_INT(r.body_len, 3);
  CHECK_EQ_INT(r.nheaders, 4);
}

static void trailing_whitespace_trimmed(void) {
  result_t r = parse_all_ways("GET / HTTP/1.1\r\nHost: h   \r\n\r\n");
  CHECK_EQ_STR(r.host, "h");
}

/* Each of these must be rejected with the given status, however it is chunked. */
static void rejects(void) {
  static const struct {
    int status;
    const char *req;
  } cases[] = {
      {400, "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
      {400, "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost : h\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost: h\r\nBad(Name): x\r\n\r\n"},
      {400, "GET / HTTP/1.1\nHost: h\n\n"},
      {400, "GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost: h\r\nX-Fold: a\r\n b\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nX: y\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\n\r\n"},
      {400, "GET http://evil/ HTTP/1.1\r\nHost: h\r\n\r\n"},
      {405, "CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n"},
      {400, "FOO / HTTP/1.1\r\nHost: h\r\n\r\n"},
      {505, "GET / HTTP/2.0\r\nHost: h\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost: h\r\nX-Fold: a\r\n\tb\r\n\r\n"},
      /* folds after an empty first line: llhttp drops the continuation's leading whitespace */
      {400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n 5\r\n\r\nhello"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length:  \t\r\n\t 5\r\n\r\nhello"},
      {400, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost:\r\n evil.example\r\n\r\n"},
      {400, "GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\n x\r\n\r\n"},
      {400, "GET / http/1.1\r\nHost: h\r\n\r\n"},
      {400, "GET / HTTP/1.1 \r\nHost: h\r\n\r\n"},
      {400, "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"},
      {413, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n"},
  };
  for (size_t i = 0; i < SL_ARRAY_SIZE(cases); i++) {
    size_t len = strlen(cases[i].req);
    result_t whole = parse(cases[i].req, len, len, NULL);
    result_t bytes = parse(cases[i].req, len, 1, NULL);
    if (whole.error_status != cases[i].status || bytes.error_status != cases[i].status)
      fprintf(stderr, "case %zu: got %d / %d, want %d\n", i, whole.error_status,
              bytes.error_status, cases[i].status);
    CHECK_EQ_INT(whole.error_status, cases[i].status);
    CHECK_EQ_INT(bytes.error_status, cases[i].status);
    CHECK_EQ_INT(whole.messages, 0);
  }
}

static void nul_in_header_value(void) {
  static const char req[] = "GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n";
  result_t r = parse(req, sizeof(req) - 1, 1, NULL);
  CHECK_EQ_INT(r.error_status, 400);
}

static void limits_enforced(void) {
  char big[12000];
  int n = snprintf(big, sizeof(big), "GET / HTTP/1.1\r\nHost: h\r\nX-Big: ");
  memset(big + n, 'a', 9000);
  strcpy(big + n + 9000, "\r\n\r\n");
  result_t r = parse(big, strlen(big), 0, NULL);
  CHECK_EQ_INT(r.error_status, 431);

  sl_buf_t many;
  sl_buf_init(&many);
  sl_buf_appends(&many, "GET / HTTP/1.1\r\nHost: h\r\n");
  for (int i = 0; i < 60; i++) sl_buf_appendf(&many, "X-%d: v\r\n", i);
  sl_buf_appends(&many, "\r\n");
  r = parse(many.data, many.len, 0, NULL);
  CHECK_EQ_INT(r.error_status, 431);
  sl_buf_free(&many);

  /* chunked body beyond the limit: 413 once it crosses it */
  sl_buf_t body;
  sl_buf_init(&body);
  sl_buf_appends(&body, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
  for (int i = 0; i < 5; i++) {
    sl_buf_appends(&body, "100\r\n");
    for (int j = 0; j < 256; j++) sl_buf_append(&body, "z", 1);
    sl_buf_appends(&body, "\r\n");
  }
  sl_buf_appends(&body, "0\r\n\r\n");
  r = parse(body.data, body.len, 0, NULL);
  CHECK_EQ_INT(r.error_status, 413);
  sl_buf_free(&body);
}

static void find_header(void) {
  sl_http_req_t req;
  sl_h1_parser_t h;
  sl_http_req_init(&req);
  sl_h1_parser_init(&h, &req, &limits);
  const char *in = "GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc\r\nX-Empty:\r\n\r\n";
  size_t used;
  CHECK_EQ_INT(sl_h1_execute(&h, in, strlen(in), &used), SL_H1_MESSAGE);
  CHECK_EQ_INT(used, strlen(in));
  int i = sl_http_req_find(&req, "x-request-id");
  CHECK(i >= 0);
  CHECK_EQ_INT(req.request_id_idx, i);
  i = sl_http_req_find(&req, "x-empty");
  CHECK(i >= 0 && req.headers[i].value_len == 0);
  CHECK_EQ_INT(sl_http_req_find(&req, "missing"), -1);
  sl_http_req_free(&req);
}

TEST_MAIN(T(simple_get), T(content_length_body), T(chunked_body), T(pipelined), T(http10),
          T(expect_continue), T(trailing_whitespace_trimmed), T(empty_values), T(rejects), T(nul_in_header_value),
          T(limits_enforced), T(find_header))
