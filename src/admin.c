#include "admin.h"

#include "log.h"
#include "server.h"

#include <stdio.h>

static bool path_is(const sl_http_req_t *r, const char *p) {
  size_t n = strlen(p);
  return r->path_len == n && memcmp(sl_http_req_url(r), p, n) == 0;
}

void sl_admin_handle(sl_conn_t *c) {
  const sl_http_req_t *r = &c->req;
  if (path_is(r, "/healthz")) {
    if (r->method != HTTP_GET && r->method != HTTP_HEAD) {
      sl_conn_send_error(c, 405, "method_not_allowed", "use GET /healthz", "Allow: GET\r\n", true);
      return;
    }
    static const char ok[] = "{\"status\":\"ok\"}\n";
    sl_conn_send(c, 200, "application/json", ok, sizeof(ok) - 1, NULL, true);
    return;
  }
  if (path_is(r, "/reload")) {
    if (r->method != HTTP_POST) {
      sl_conn_send_error(c, 405, "method_not_allowed", "use POST /reload", "Allow: POST\r\n", true);
      return;
    }
    char err[2048];
    unsigned long long gen = 0;
    if (sl_gateway_reload(c->w->gw, err, sizeof(err), &gen) != 0) {
      sl_conn_send_error(c, 422, "reload_failed", err, NULL, true);
      return;
    }
    char body[128];
    int n = snprintf(body, sizeof(body), "{\"result\":\"ok\",\"generation\":%llu}\n", gen);
    sl_conn_send(c, 200, "application/json", body, (size_t)n, NULL, true);
    return;
  }
  sl_conn_send_error(c, 404, "not_found", "admin endpoints: GET /healthz, POST /reload", NULL, true);
}
