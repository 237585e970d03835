/* forward.c: the upstream request serialized from the client's, with a route hook's header
 * and path edits applied, and the edit validation that keeps hooks from desynchronizing the
 * two ends of a connection. */
#include "forward.h"
#include "t.h"

static sl_http_req_t req;

static void parse(const char *raw) {
  static sl_h1_limits_t limits = {.max_header_bytes = 65536, .max_headers = 100,
                                  .max_body_bytes = 1 << 20};
  sl_h1_parser_t p;
  sl_http_req_init(&req);
  sl_h1_parser_init(&p, &req, &limits);
  size_t len = strlen(raw), off = 0, used = 0;
  for (;;) {
    sl_h1_event_t ev = sl_h1_execute(&p, raw + off, len - off, &used);
    off += used;
    if (ev == SL_H1_HEADERS) {
      sl_h1_resume(&p);
      continue;
    }
    CHECK(ev == SL_H1_MESSAGE);
    break;
  }
}

static char *forward(const sl_hedits_t *e) {
  sl_endpoint_t ep = {0};
  ep.authority = "up:9000";
  ep.path_prefix = "/base";
  sl_forward_opts_t o = {.client_ip = "10.0.0.1", .request_id = "rid", .edits = e};
  sl_buf_t out;
  sl_buf_init(&out);
  sl_forward_request(&out, &req, &ep, &o);
  sl_buf_append(&out, "", 1);
  return out.data;
}

static const char RAW[] = "POST /v1/chat?x=1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer k\r\n"
                          "X-Tenant: spoof\r\nX-Tenant: again\r\nAccept: */*\r\n"
                          "Content-Length: 2\r\n\r\n{}";

static void no_edits_is_unchanged(void) {
  parse(RAW);
  sl_hedits_t e = {0};
  char *a = forward(NULL), *b = forward(&e);
  CHECK_EQ_STR(a, b);
  CHECK(strstr(a, "POST /base/v1/chat?x=1 HTTP/1.1\r\n") == a);
  CHECK(strstr(a, "X-Tenant: spoof\r\n") && strstr(a, "X-Tenant: again\r\n"));
  free(a);
  free(b);
  sl_http_req_free(&req);
}

static void set_replaces_every_value_and_remove_drops(void) {
  parse(RAW);
  sl_hedits_t e = {0};
  char err[200];
  CHECK_EQ_INT(sl_hedits_put(&e, "x-tenant", 8, "t1", 2, false, err, sizeof(err)), 0);
  CHECK_EQ_INT(sl_hedits_put(&e, "authorization", 13, NULL, 0, false, err, sizeof(err)), 0);
  CHECK_EQ_INT(sl_hedits_put(&e, "X-New", 5, "v", 1, false, err, sizeof(err)), 0);
  char *s = forward(&e);
  CHECK(!strstr(s, "spoof") && !strstr(s, "again"));
  CHECK(strstr(s, "x-tenant: t1\r\n") != NULL);
  CHECK(!strstr(s, "Authorization"));
  CHECK(strstr(s, "X-New: v\r\n") != NULL);
  CHECK(strstr(s, "Accept: */*\r\n") != NULL);
  CHECK(strstr(s, "Content-Length: 2\r\n\r\n{}") != NULL);
  free(s);
  /* The latest edit of a name wins: a remove after a set, a set after a remove. */
  CHECK_EQ_INT(sl_hedits_put(&e, "X-NEW", 5, NULL, 0, false, err, sizeof(err)), 0);
  CHECK_EQ_INT(sl_hedits_put(&e, "Authorization", 13, "Bearer upstream", 15, false, err,
                             sizeof(err)), 0);
  s = forward(&e);
  CHECK(!strstr(s, "X-New"));
  CHECK(strstr(s, "Authorization: Bearer upstream\r\n") != NULL);
  CHECK(!strstr(s, "Bearer k\r\n"));
  free(s);
  sl_hedits_clear(&e);
  sl_http_req_free(&req);
}

static void path_rewrite_keeps_the_endpoint_prefix(void) {
  parse(RAW);
  sl_hedits_t e = {0};
  char err[200];
  CHECK_EQ_INT(sl_hedits_set_path(&e, "/v2/complete?y=2", 16, err, sizeof(err)), 0);
  char *s = forward(&e);
  CHECK(strstr(s, "POST /base/v2/complete?y=2 HTTP/1.1\r\n") == s);
  free(s);
  const char *bad[] = {"", "v2", "/a b", "/a\r\nX: y", "/frag#x", "/\x7f", "/caf\xc3\xa9"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
    CHECK_EQ_INT(sl_hedits_set_path(&e, bad[i], strlen(bad[i]), err, sizeof(err)), -1);
  s = forward(&e); /* a refused rewrite leaves the last good one */
  CHECK(strstr(s, "POST /base/v2/complete?y=2 HTTP/1.1\r\n") == s);
  free(s);
  sl_hedits_clear(&e);
  sl_http_req_free(&req);
}

static void validation(void) {
  sl_hedits_t e = {0};
  char err[200];
  const char *managed_both[] = {"Content-Length", "transfer-encoding", "Connection", "keep-alive",
                                "upgrade", "TE", "trailer", "x-request-id", "proxy-connection"};
  for (size_t i = 0; i < sizeof(managed_both) / sizeof(managed_both[0]); i++) {
    const char *n = managed_both[i];
    CHECK_EQ_INT(sl_hedits_put(&e, n, strlen(n), "1", 1, false, err, sizeof(err)), -1);
    CHECK_EQ_INT(sl_hedits_put(&e, n, strlen(n), NULL, 0, true, err, sizeof(err)), -1);
  }
  CHECK(strstr(err, "managed by the gateway") != NULL);
  const char *managed_req[] = {"host", "expect", "x-forwarded-for", "X-Forwarded-Proto",
                               "x-forwarded-host", "X-Forwarded-Port", "x-forwarded-prefix"};
  for (size_t i = 0; i < sizeof(managed_req) / sizeof(managed_req[0]); i++) {
    const char *n = managed_req[i];
    CHECK_EQ_INT(sl_hedits_put(&e, n, strlen(n), "1", 1, false, err, sizeof(err)), -1);
    CHECK_EQ_INT(sl_hedits_put(&e, n, strlen(n), "1", 1, true, err, sizeof(err)), 0);
  }
  CHECK_EQ_INT(sl_hedits_put(&e, "bad name", 8, "1", 1, false, err, sizeof(err)), -1);
  CHECK_EQ_INT(sl_hedits_put(&e, "x:y", 3, "1", 1, false, err, sizeof(err)), -1);
  CHECK_EQ_INT(sl_hedits_put(&e, "", 0, "1", 1, false, err, sizeof(err)), -1);
  CHECK_EQ_INT(sl_hedits_put(&e, "x-a", 3, "b\r\nx-evil: 1", 13, false, err, sizeof(err)), -1);
  CHECK_EQ_INT(sl_hedits_put(&e, "x-a", 3, "b\nc", 3, false, err, sizeof(err)), -1);
  CHECK_EQ_INT(sl_hedits_put(&e, "x-a", 3, "nul\0", 4, false, err, sizeof(err)), -1);
  CHECK_EQ_INT(sl_hedits_put(&e, "x-a", 3, "tab\tok", 6, false, err, sizeof(err)), 0);
  CHECK(sl_hedits_covers(&e, "X-A", 3));
  CHECK(!sl_hedits_covers(&e, "x-b", 3));
  sl_hedits_clear(&e);
  CHECK_EQ_INT(e.n, 0);
}

TEST_MAIN(T(no_edits_is_unchanged), T(set_replaces_every_value_and_remove_drops),
          T(path_rewrite_keeps_the_endpoint_prefix), T(validation))
