#include "admin.h"

#include "cache.h"
#include "log.h"
#include "server.h"
#include "sluice.h"
#include "telemetry.h"

#include <stdio.h>
#include <stdlib.h>

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
    sl_gateway_purge_others(c->w->gw, &k, NULL);
  } else if (query_param(r, "route", val, sizeof(val))) {
    purged = cache ? sl_cache_purge_tag(cache, val) : 0;
    sl_gateway_purge_others(c->w->gw, NULL, val);
  } else if (r->url_len == r->path_len) {
    purged = cache ? sl_cache_purge_all(cache) : 0;
    sl_gateway_purge_others(c->w->gw, NULL, NULL);
  } else {
    sl_conn_send_error(c, 400, "bad_request", "expected ?key=<hex>, ?route=<path> or nothing",
                       NULL, true);
    return;
  }
  SL_INFO("admin: purged %zu cache entries", purged);
  int n = snprintf(body, sizeof(body), "{\"purged\":%zu}\n", purged);
  sl_conn_send(c, 200, "application/json", body, (size_t)n, NULL, true);
}

/* /metrics: the collector copies live gauges on the loop (cheap), the text is rendered in
 * libuv's thread pool, so a scrape never holds up requests on the loop. */
typedef struct scrape {
  uv_work_t req;
  sl_worker_t *w;
  uint64_t conn;
  sl_buf_t out;
  sl_metrics_t *regs[257]; /* every worker's; thread workers refresh their gauges themselves */
  size_t nregs;
} scrape_t;

static void scrape_work(uv_work_t *req) {
  scrape_t *s = req->data;
  sl_metrics_render_opts(s->regs, s->nregs, &s->out, false);
}

static void scrape_done(uv_work_t *req, int status) {
  scrape_t *s = req->data;
  sl_conn_t *c = sl_server_find_conn(s->w, s->conn);
  if (c && status == 0)
    sl_conn_send(c, 200, "text/plain; version=0.0.4; charset=utf-8", s->out.data, s->out.len,
                 NULL, true);
  else if (c)
    sl_conn_send_error(c, 503, "unavailable", "the scrape was cancelled", NULL, false);
  sl_buf_free(&s->out);
  free(s);
}

static void handle_metrics(sl_conn_t *c) {
  scrape_t *s = sl_calloc(1, sizeof(*s));
  s->w = c->w;
  s->conn = c->serial;
  s->req.data = s;
  sl_buf_init(&s->out);
  s->nregs = sl_gateway_registries(c->w->gw, s->regs, SL_ARRAY_SIZE(s->regs));
  sl_metrics_collect(c->w->tm->reg);
  if (uv_queue_work(c->w->loop, &s->req, scrape_work, scrape_done) != 0) {
    scrape_work(&s->req); /* no thread pool: render here */
    scrape_done(&s->req, 0);
  }
}

static const char *const STATE_NAMES[3] = {"closed", "open", "half_open"};

static void json_str(sl_buf_t *b, const char *s) {
  sl_buf_append(b, "\"", 1);
  sl_buf_append_json_str(b, s, strlen(s));
  sl_buf_append(b, "\"", 1);
}

/* A live figure of the other workers, summed from the gauges their collectors publish. */
static double others(sl_metrics_t **regs, size_t n, const char *metric, const char *pool,
                     const char *url) {
  const char *labels[2] = {pool, url};
  double sum = 0, v;
  for (size_t i = 1; i < n; i++)
    if (sl_metrics_value(regs[i], metric, labels, &v)) sum += v;
  return sum;
}

/* GET /status: the live state an operator looks at during an incident. With several workers
 * the in-flight and queue figures are summed over all of them (the other workers' as of their
 * last collection, at most 500 ms old); the rest is the admin's own worker's view. */
static void handle_status(sl_conn_t *c) {
  sl_worker_t *w = c->w;
  sl_metrics_t *regs[257];
  size_t nregs = sl_gateway_registries(w->gw, regs, SL_ARRAY_SIZE(regs));
  const sl_gen_t *g = w->gen;
  sl_buf_t b;
  sl_buf_init(&b);
  sl_buf_appendf(&b, "{\"version\":\"%s\",\"generation\":%llu,\"config\":", sluice_version(),
                 (unsigned long long)g->id);
  json_str(&b, g->cfg->file);
  sl_buf_appendf(&b, ",\"workers\":%u,\"connections\":%u,\"draining\":%s,\"pools\":[",
                 sl_gateway_workers(w->gw), w->nconns, w->draining ? "true" : "false");
  for (uint32_t i = 0; i < g->cfg->npools; i++) {
    const sl_pool_t *p = &g->pools[i];
    if (i) sl_buf_append(&b, ",", 1);
    sl_buf_appends(&b, "{\"name\":");
    json_str(&b, p->conf->name);
    sl_buf_appends(&b, ",\"balancer\":");
    json_str(&b, p->conf->balancer);
    const char *pn = p->conf->name;
    sl_buf_appendf(&b, ",\"active\":%d,\"queued\":%d,\"retrying\":%d,\"ejected\":%d,"
                       "\"queue_max\":%u,\"fallback\":",
                   p->view.active + (int)others(regs, nregs, "sluice_pool_inflight", pn, NULL),
                   p->view.queued + (int)others(regs, nregs, "sluice_pool_queued", pn, NULL),
                   p->view.retrying, p->view.ejected, p->conf->queue_max);
    if (p->conf->fallback) json_str(&b, p->conf->fallback);
    else sl_buf_appends(&b, "null");
    sl_buf_appends(&b, ",\"endpoints\":[");
    for (uint32_t j = 0; j < p->n; j++) {
      const sl_endpoint_t *ep = p->eps[j];
      const sl_ep_view_t *v = &ep->view;
      if (j) sl_buf_append(&b, ",", 1);
      sl_buf_appends(&b, "{\"url\":");
      json_str(&b, ep->url);
      sl_buf_appendf(&b, ",\"inflight\":%d,\"max_inflight\":%d,\"queued\":%d,\"weight\":%d,"
                         "\"available\":%s,\"ewma_ms\":%.3f,\"reported_load\":%.3f,"
                         "\"successes\":%lld,\"failures\":%lld,\"breaker\":\"%s\","
                         "\"consecutive_failures\":%d,\"ejections\":%d,\"idle_connections\":%u}",
                     v->inflight + (int)others(regs, nregs, "sluice_endpoint_inflight", pn,
                                               p->conf->endpoints[j].url),
                     v->max_inflight, v->queued + (int)others(regs, nregs, "sluice_endpoint_queued",
                                                            pn, p->conf->endpoints[j].url),
                     v->weight,
                     v->available ? "true" : "false", v->ewma_ms, v->reported_load,
                     (long long)v->successes, (long long)v->fails,
                     v->state >= 0 && v->state < 3 ? STATE_NAMES[v->state] : "unknown",
                     v->consecutive_fails, v->ejections, ep->nidle);
    }
    sl_buf_appends(&b, "]}");
  }
  sl_cache_stats_t st;
  memset(&st, 0, sizeof(st));
  if (w->cache) sl_cache_stats(w->cache, &st);
  sl_buf_appendf(&b, "],\"cache\":{\"entries\":%llu,\"bytes\":%llu,\"max_bytes\":%llu,"
                     "\"hits\":%llu,\"misses\":%llu,\"coalesced\":%llu,\"evictions\":%llu},"
                     "\"websocket\":{\"sessions_total\":%llu,\"upstream_lost\":%llu},"
                     "\"reloads\":{\"ok\":%llu,\"failed\":%llu},\"policy_errors\":%llu}\n",
                 (unsigned long long)st.entries, (unsigned long long)st.bytes,
                 (unsigned long long)st.max_bytes, (unsigned long long)w->stats.cache_hits,
                 (unsigned long long)w->stats.cache_misses,
                 (unsigned long long)w->stats.cache_coalesced, (unsigned long long)st.evictions,
                 (unsigned long long)w->stats.ws_sessions,
                 (unsigned long long)w->stats.ws_upstream_lost,
                 (unsigned long long)w->stats.reloads_ok, (unsigned long long)w->stats.reloads_failed,
                 (unsigned long long)w->stats.policy_errors);
  sl_conn_send(c, 200, "application/json", b.data, b.len, NULL, true);
  sl_buf_free(&b);
}

/* GET /readyz: 200 when a config is loaded, the gateway is not draining, and every pool has an
 * endpoint that may take a request (breaker closed or half-open); 503 naming the pools that
 * have none otherwise. */
static void handle_readyz(sl_conn_t *c) {
  sl_worker_t *w = c->w;
  const sl_gen_t *g = w->gen;
  sl_buf_t down;
  sl_buf_init(&down);
  for (uint32_t i = 0; g && i < g->cfg->npools; i++) {
    const sl_pool_t *p = &g->pools[i];
    bool ok = false;
    for (uint32_t j = 0; j < p->n && !ok; j++) ok = sl_endpoint_breaker_allows(p->eps[j]);
    if (!ok) {
      if (down.len) sl_buf_appends(&down, ", ");
      sl_buf_appends(&down, p->conf->name);
    }
  }
  if (!g || w->draining || down.len) {
    char msg[600];
    snprintf(msg, sizeof(msg), "%s%.*s", !g ? "no config loaded" : w->draining ? "draining"
                                         : "no endpoint available in pool(s): ",
             g && !w->draining ? (int)SL_MIN(down.len, (size_t)500) : 0, down.data ? down.data : "");
    sl_conn_send_error(c, 503, "not_ready", msg, NULL, true);
  } else {
    static const char ok[] = "{\"status\":\"ready\"}\n";
    sl_conn_send(c, 200, "application/json", ok, sizeof(ok) - 1, NULL, true);
  }
  sl_buf_free(&down);
}

/* With admin.token set, every endpoint but the health probes needs Authorization: Bearer. */
static bool authorized(sl_conn_t *c) {
  const char *token = c->w->gen ? c->w->gen->cfg->admin_token : NULL;
  if (!token) return true;
  const sl_http_req_t *r = &c->req;
  int i = sl_http_req_find(r, "authorization");
  size_t tl = strlen(token);
  if (i >= 0) {
    const char *v = sl_http_req_str(r, r->headers[i].value_off);
    size_t n = r->headers[i].value_len;
    if (n == 7 + tl && sl_strieq(v, 7, "bearer ")) {
      unsigned diff = 0; /* constant time */
      for (size_t k = 0; k < tl; k++) diff |= (unsigned char)(v[7 + k] ^ token[k]);
      if (!diff) return true;
    }
  }
  sl_conn_send_error(c, 401, "unauthorized", "the admin API needs Authorization: Bearer <admin.token>",
                     "WWW-Authenticate: Bearer\r\n", true);
  return false;
}

static bool is_get(sl_conn_t *c, const char *path) {
  const sl_http_req_t *r = &c->req;
  if (r->method == HTTP_GET || r->method == HTTP_HEAD) return true;
  char msg[64];
  snprintf(msg, sizeof(msg), "use GET %s", path);
  sl_conn_send_error(c, 405, "method_not_allowed", msg, "Allow: GET\r\n", true);
  return false;
}

void sl_admin_handle(sl_conn_t *c) {
  const sl_http_req_t *r = &c->req;
  if (path_is(r, "/readyz")) {
    if (is_get(c, "/readyz")) handle_readyz(c);
    return;
  }
  if (!path_is(r, "/healthz") && !authorized(c)) return;
  if (path_is(r, "/metrics")) {
    if (is_get(c, "/metrics")) handle_metrics(c);
    return;
  }
  if (path_is(r, "/status")) {
    if (is_get(c, "/status")) handle_status(c);
    return;
  }
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
                     "admin endpoints: GET /healthz, GET /readyz, GET /metrics, GET /status, "
                     "POST /reload, GET|DELETE /cache",
                     NULL, true);
}
