#include "admin.h"

#include "cache.h"
#include "log.h"
#include "server.h"

#include <stdio.h>

static bool path_is(const sl_http_req_t *r, const char *p) {
  size_t n = strlen(p);
  return r->path_len == n && memcmp(sl_http_req_url(r), p, n) == 0;
}

static int hexval(char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

/* Value of `name` in the query string, percent-decoded into out. Returns false when absent. */
static bool query_param(const sl_http_req_t *r, const char *name, char *out, size_t cap) {
  if (r->url_len == r->path_len) return false;
  const char *q = sl_http_req_url(r) + r->path_len + 1, *end = sl_http_req_url(r) + r->url_len;
  size_t nl = strlen(name);
  while (q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *pe = amp ? amp : end;
    if ((size_t)(pe - q) > nl && memcmp(q, name, nl) == 0 && q[nl] == '=') {
      size_t o = 0;
      for (const char *p = q + nl + 1; p < pe && o + 1 < cap; p++) {
        int hi, lo;
        if (*p == '%' && pe - p >= 3 &&
            (hi = hexval(p[1])) >= 0 && (lo = hexval(p[2])) >= 0) {
          out[o++] = (char)(hi << 4 | lo);
          p += 2;
        } else {
          out[o++] = *p == '+' ? ' ' : *p;
        }
      }
      out[o] = 0;
      return true;
    }
    q = pe + 1;
  }
  return false;
}

/* GET /cache: stats. DELETE /cache[?route=/path | ?key=hex]: purge. */
static void handle_cache(sl_conn_t *c) {
  const sl_http_req_t *r = &c->req;
  sl_cache_t *cache = c->w->cache;
  char body[512];
  if (r->method == HTTP_GET) {
    sl_cache_stats_t st;
    memset(&st, 0, sizeof(st));
    if (cache) sl_cache_stats(cache, &st);
    int n = snprintf(body, sizeof(body),
                     "{\"entries\":%llu,\"bytes\":%llu,\"max_bytes\":%llu,\"hits\":%llu,"
                     "\"misses\":%llu,\"coalesced\":%llu,\"inserts\":%llu,\"evictions\":%llu,"
                     "\"expired\":%llu,\"purged\":%llu}\n",
                     (unsigned long long)st.entries, (unsigned long long)st.bytes,
                     (unsigned long long)st.max_bytes, (unsigned long long)c->w->stats.cache_hits,
                     (unsigned long long)c->w->stats.cache_misses,
                     (unsigned long long)c->w->stats.cache_coalesced,
                     (unsigned long long)st.inserts, (unsigned long long)st.evictions,
                     (unsigned long long)st.expired, (unsigned long long)st.purged);
    sl_conn_send(c, 200, "application/json", body, (size_t)n, NULL, true);
    return;
  }
  if (r->method != HTTP_DELETE) {
    sl_conn_send_error(c, 405, "method_not_allowed", "use GET /cache or DELETE /cache",
                       "Allow: GET, DELETE\r\n", true);
    return;
  }
  char val[1024];
  size_t purged = 0;
  if (query_param(r, "key", val, sizeof(val))) {
    sl_cache_key_t k;
    if (sl_cache_key_parse_hex(val, strlen(val), &k) != 0) {
      sl_conn_send_error(c, 400, "bad_request",
                         "key must be the 64 hex digits of an x-cache-key response header", NULL,
                         true);
      return;
    }
    purged = cache ? sl_cache_purge_key(cache, &k) : 0;
  } else if (query_param(r, "route", val, sizeof(val))) {
    purged = cache ? sl_cache_purge_tag(cache, val) : 0;
  } else if (r->url_len == r->path_len) {
    purged = cache ? sl_cache_purge_all(cache) : 0;
  } else {
    sl_conn_send_error(c, 400, "bad_request", "expected ?key=<hex>, ?route=<path> or nothing",
                       NULL, true);
    return;
  }
  SL_INFO("admin: purged %zu cache entries", purged);
  int n = snprintf(body, sizeof(body), "{\"purged\":%zu}\n", purged);
  sl_conn_send(c, 200, "application/json", body, (size_t)n, NULL, true);
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
  if (path_is(r, "/cache")) {
    handle_cache(c);
    return;
  }
  sl_conn_send_error(c, 404, "not_found",
                     "admin endpoints: GET /healthz, POST /reload, GET|DELETE /cache", NULL, true);
}
