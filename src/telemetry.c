#include "telemetry.h"

#include "access_log.h"
#include "cache.h"
#include "cache_flow.h"
#include "log.h"
#include "proxy.h"
#include "server.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifndef SLUICE_VERSION
#define SLUICE_VERSION "0"
#endif

static const char *const CLASS[6] = {"5xx", "1xx", "2xx", "3xx", "4xx", "5xx"};
static const char *const DIRECTION[2] = {"client_to_upstream", "upstream_to_client"};
static const char *const STATE[3] = {"closed", "open", "half_open"};

static sl_mfamily_t *fam(sl_telemetry_t *t, const char *name, const char *help,
                         sl_metric_type_t type, const char *l1, const char *l2, const char *l3) {
  const char *labels[3] = {l1, l2, l3};
  size_t n = l3 ? 3 : l2 ? 2 : l1 ? 1 : 0;
  char err[256];
  sl_mfamily_t *f = sl_metrics_family(t->reg, name, help, type, labels, n, NULL, 0, err, sizeof(err));
  if (!f) {
    SL_ERROR("metrics: %s: %s", name, err);
    abort(); /* the built-in catalogue is fixed: a failure here is a programming error */
  }
  return f;
}

static sl_mseries_t *ser(sl_mfamily_t *f, const char *a, const char *b, const char *c) {
  const char *v[3] = {a, b, c};
  return sl_mfamily_series(f, v); /* NULL only past SL_M_MAX_SERIES: updates then skip it */
}

/* Hot-path helpers tolerate NULL series (a family at its series limit). */
static inline void inc(sl_mseries_t *s, double v) {
  if (s) sl_m_inc(s, v);
}
static inline void observe(sl_mseries_t *s, double v) {
  if (s) sl_m_observe(s, v);
}

/* Gauges mirroring live state, set when /metrics is rendered. */
static void collect(void *ud, sl_metrics_t *m) {
  sl_worker_t *w = ud;
  sl_telemetry_t *t = w->tm;
  sl_gen_t *g = w->gen;
  if (g) {
    for (uint32_t i = 0; i < g->cfg->npools; i++) {
      sl_pool_t *p = &g->pools[i];
      if (!p->m) continue;
      if (p->m->inflight) sl_m_set(p->m->inflight, p->view.active);
      if (p->m->queued) sl_m_set(p->m->queued, p->view.queued);
      for (uint32_t j = 0; j < p->n; j++) {
        const sl_ep_view_t *v = &p->eps[j]->view;
        sl_ep_m_t *e = &p->m->eps[j];
        if (e->inflight) sl_m_set(e->inflight, v->inflight);
        if (e->max_inflight) sl_m_set(e->max_inflight, v->max_inflight);
        if (e->queued) sl_m_set(e->queued, v->queued);
        if (e->state) sl_m_set(e->state, v->state);
      }
    }
    sl_m_set(t->gen_id, (double)g->id);
  }
  if (w->cache) {
    sl_cache_stats_t st;
    sl_cache_stats(w->cache, &st);
    sl_m_set(t->bytes, (double)st.bytes);
    sl_m_set(t->entries, (double)st.entries);
    sl_m_set(t->evictions, (double)st.evictions);
  }
  sl_m_set(t->reloads_ok, (double)w->stats.reloads_ok);
  sl_m_set(t->reloads_failed, (double)w->stats.reloads_failed);
  (void)m;
}

void sl_telemetry_init(sl_worker_t *w) {
  sl_telemetry_t *t = sl_calloc(1, sizeof(*t));
  w->tm = t;
  t->reg = sl_metrics_new();
  t->requests = fam(t, "sluice_requests_total", "Requests answered to clients, by status class.",
                    SL_M_COUNTER, "route", "pool", "code");
  t->duration = fam(t, "sluice_request_duration_seconds",
                    "Client-observed request time, request received to last response byte.",
                    SL_M_HISTOGRAM, "route", "pool", NULL);
  t->queue_wait = fam(t, "sluice_queue_wait_seconds",
                      "Time requests waited in the pool's admission queue (0 when admitted at once).",
                      SL_M_HISTOGRAM, "pool", NULL, NULL);
  t->ttfb = fam(t, "sluice_upstream_ttfb_seconds",
                "Per attempt: request sent upstream to first response byte.", SL_M_HISTOGRAM,
                "pool", "endpoint", NULL);
  t->ep_inflight = fam(t, "sluice_endpoint_inflight",
                       "Requests and WebSocket sessions the endpoint is serving now.", SL_M_GAUGE,
                       "pool", "endpoint", NULL);
  t->ep_max_inflight = fam(t, "sluice_endpoint_max_inflight",
                           "The endpoint's max_inflight limit (0 = unlimited).", SL_M_GAUGE, "pool",
                           "endpoint", NULL);
  t->ep_queued = fam(t, "sluice_endpoint_queued",
                     "Requests assigned to the endpoint still waiting for a connection.",
                     SL_M_GAUGE, "pool", "endpoint", NULL);
  t->pool_inflight = fam(t, "sluice_pool_inflight", "The pool's requests in progress.",
                         SL_M_GAUGE, "pool", NULL, NULL);
  t->pool_queued = fam(t, "sluice_pool_queued",
                       "Requests waiting in the pool's admission queue for a free slot.",
                       SL_M_GAUGE, "pool", NULL, NULL);
  t->retries = fam(t, "sluice_retries_total", "Attempts after the first.", SL_M_COUNTER, "pool",
                   NULL, NULL);
  t->fallbacks = fam(t, "sluice_fallbacks_total",
                     "Requests handed to the fallback pool (every endpoint ejected).", SL_M_COUNTER,
                     "pool", NULL, NULL);
  t->breaker_state = fam(t, "sluice_breaker_state",
                         "Breaker state: 0 closed, 1 open (ejected), 2 half-open.", SL_M_GAUGE,
                         "pool", "endpoint", NULL);
  sl_mfamily_set_merge(t->breaker_state, SL_M_MERGE_MAX);
  t->breaker_transitions = fam(t, "sluice_breaker_transitions_total",
                               "Breaker state changes, by the state entered.", SL_M_COUNTER, "pool",
                               "endpoint", "to");
  t->ejections = fam(t, "sluice_endpoint_ejections_total", "Times the endpoint's breaker opened.",
                     SL_M_COUNTER, "pool", "endpoint", NULL);
  t->queue_timeouts = fam(t, "sluice_queue_timeouts_total",
                          "Requests that waited queue.timeout_ms without a slot.", SL_M_COUNTER,
                          "pool", NULL, NULL);
  t->queue_rejections = fam(t, "sluice_queue_rejections_total",
                            "Requests refused because the queue was full or disabled.",
                            SL_M_COUNTER, "pool", NULL, NULL);
  t->connect_errors = fam(t, "sluice_upstream_connect_errors_total",
                          "Attempts whose upstream connection failed.", SL_M_COUNTER, "pool",
                          "endpoint", NULL);
  t->timeouts = fam(t, "sluice_upstream_timeouts_total",
                    "Attempts that hit the first-byte or total timeout.", SL_M_COUNTER, "pool",
                    "endpoint", NULL);
  t->cache_hits = fam(t, "sluice_cache_hits_total", "Responses served from the cache.",
                      SL_M_COUNTER, "route", NULL, NULL);
  t->cache_misses = fam(t, "sluice_cache_misses_total",
                        "Cacheable requests not found in the cache.", SL_M_COUNTER, "route", NULL,
                        NULL);
  t->cache_coalesced = fam(t, "sluice_cache_coalesced_total",
                           "Requests that waited for an identical in-flight miss.", SL_M_COUNTER,
                           "route", NULL, NULL);
  t->cache_evictions = fam(t, "sluice_cache_evictions_total",
                           "Entries evicted to stay under cache.max_bytes.", SL_M_COUNTER, NULL,
                           NULL, NULL);
  t->cache_bytes = fam(t, "sluice_cache_bytes", "Bytes held by the cache.", SL_M_GAUGE, NULL,
                       NULL, NULL);
  t->cache_entries = fam(t, "sluice_cache_entries", "Entries held by the cache.", SL_M_GAUGE,
                         NULL, NULL, NULL);
  t->ws_open = fam(t, "sluice_ws_sessions_open", "WebSocket sessions open now.", SL_M_GAUGE,
                   "route", "pool", NULL);
  t->ws_total = fam(t, "sluice_ws_sessions_total", "WebSocket sessions established.",
                    SL_M_COUNTER, "route", "pool", NULL);
  t->ws_messages = fam(t, "sluice_ws_messages_total", "WebSocket messages relayed.",
                       SL_M_COUNTER, "pool", "direction", NULL);
  t->ws_bytes = fam(t, "sluice_ws_bytes_total", "WebSocket bytes relayed (frames as sent).",
                    SL_M_COUNTER, "pool", "direction", NULL);
  t->ws_lost = fam(t, "sluice_ws_upstream_lost_total",
                   "Sessions whose upstream leg failed mid-session.", SL_M_COUNTER, "pool", NULL,
                   NULL);
  t->reloads = fam(t, "sluice_reloads_total", "Config and policy reloads, by result.",
                   SL_M_COUNTER, "result", NULL, NULL);
  t->generation = fam(t, "sluice_config_generation", "Id of the running config generation.",
                      SL_M_GAUGE, NULL, NULL, NULL);
  sl_mfamily_set_merge(t->generation, SL_M_MERGE_MAX);
  t->policy_errors = fam(t, "sluice_policy_errors_total", "Policy hook failures.", SL_M_COUNTER,
                         "policy", NULL, NULL);
  t->build_info = fam(t, "sluice_build_info", "Always 1; version is the sluice version.",
                      SL_M_GAUGE, "version", NULL, NULL);
  sl_mfamily_set_merge(t->build_info, SL_M_MERGE_MAX);

  for (int c = 1; c < 6; c++) t->noroute_requests[c] = ser(t->requests, "", "", CLASS[c]);
  t->noroute_requests[0] = t->noroute_requests[5];
  t->noroute_duration = ser(t->duration, "", "", NULL);
  t->reloads_ok = ser(t->reloads, "ok", NULL, NULL);
  t->reloads_failed = ser(t->reloads, "failed", NULL, NULL);
  t->gen_id = ser(t->generation, NULL, NULL, NULL);
  t->build = ser(t->build_info, SLUICE_VERSION, NULL, NULL);
  sl_m_set(t->build, 1);
  t->evictions = ser(t->cache_evictions, NULL, NULL, NULL);
  t->bytes = ser(t->cache_bytes, NULL, NULL, NULL);
  t->entries = ser(t->cache_entries, NULL, NULL, NULL);
  sl_metrics_set_collector(t->reg, collect, w);
}

void sl_telemetry_free(sl_worker_t *w) {
  if (!w->tm) return;
  sl_metrics_free(w->tm->reg); /* frees every series */
  free(w->tm);
  w->tm = NULL;
}

static sl_mseries_t *policy_series(sl_telemetry_t *t, const char *kind, const char *name) {
  if (!name) return NULL;
  char label[160];
  snprintf(label, sizeof(label), "%s/%s", kind, name);
  return ser(t->policy_errors, label, NULL, NULL);
}

static void release_all(sl_mseries_t **s, size_t n) {
  for (size_t i = 0; i < n; i++) sl_mseries_release(s[i]);
}

static void route_label(const sl_route_conf_t *r, char *label, size_t len) {
  snprintf(label, len, "%s%s", r->host ? r->host : "", r->path);
}

/* Resolves the series of (route, pool); pool_idx < 0: no pool ("" label). */
static void resolve_route_pool(sl_gen_t *g, const sl_route_conf_t *r, int pool_idx) {
  const sl_config_t *cfg = g->cfg;
  sl_route_m_t *m = &g->route_m[r - cfg->routes];
  uint32_t slot = pool_idx < 0 ? cfg->npools : (uint32_t)pool_idx;
  sl_route_pool_m_t *pm = &m->by_pool[slot];
  sl_telemetry_t *t = g->worker->tm;
  const char *pool = pool_idx < 0 ? "" : cfg->pools[pool_idx].name;
  char label[512];
  route_label(r, label, sizeof(label));
  for (int c = 1; c < 6; c++) pm->requests[c] = ser(t->requests, label, pool, CLASS[c]);
  pm->duration = ser(t->duration, label, pool, NULL);
  if (pool_idx >= 0 && cfg->pools[pool_idx].websocket) {
    pm->ws_open = ser(t->ws_open, label, pool, NULL);
    pm->ws_total = ser(t->ws_total, label, pool, NULL);
  }
}

void sl_telemetry_gen_build(sl_gen_t *g) {
  sl_telemetry_t *t = g->worker->tm;
  const sl_config_t *cfg = g->cfg;
  for (uint32_t i = 0; i < cfg->npools; i++) {
    sl_pool_t *p = &g->pools[i];
    const char *pn = p->conf->name;
    sl_pool_m_t *m = p->m = sl_calloc(1, sizeof(*m));
    m->queue_wait = ser(t->queue_wait, pn, NULL, NULL);
    m->retries = ser(t->retries, pn, NULL, NULL);
    m->fallbacks = ser(t->fallbacks, pn, NULL, NULL);
    m->queue_timeouts = ser(t->queue_timeouts, pn, NULL, NULL);
    m->queue_rejections = ser(t->queue_rejections, pn, NULL, NULL);
    m->inflight = ser(t->pool_inflight, pn, NULL, NULL);
    m->queued = ser(t->pool_queued, pn, NULL, NULL);
    m->policy_balancer = policy_series(t, "balancer", p->conf->balancer);
    if (p->conf->retry_enabled) m->policy_retry = policy_series(t, "retry", p->conf->retry_policy);
    if (p->conf->breaker_enabled)
      m->policy_breaker = policy_series(t, "breaker", p->conf->breaker_policy);
    if (p->conf->websocket) {
      for (int d = 0; d < 2; d++) {
        m->ws_messages[d] = ser(t->ws_messages, pn, DIRECTION[d], NULL);
        m->ws_bytes[d] = ser(t->ws_bytes, pn, DIRECTION[d], NULL);
      }
      m->ws_lost = ser(t->ws_lost, pn, NULL, NULL);
    }
    m->eps = sl_calloc(p->n ? p->n : 1, sizeof(sl_ep_m_t));
    for (uint32_t j = 0; j < p->n; j++) {
      sl_ep_m_t *e = &m->eps[j];
      const char *url = p->conf->endpoints[j].url;
      e->ttfb = ser(t->ttfb, pn, url, NULL);
      e->connect_errors = ser(t->connect_errors, pn, url, NULL);
      e->timeouts = ser(t->timeouts, pn, url, NULL);
      e->ejections = ser(t->ejections, pn, url, NULL);
      for (int k = 0; k < 3; k++) e->transitions[k] = ser(t->breaker_transitions, pn, url, STATE[k]);
      e->inflight = ser(t->ep_inflight, pn, url, NULL);
      e->max_inflight = ser(t->ep_max_inflight, pn, url, NULL);
      e->queued = ser(t->ep_queued, pn, url, NULL);
      e->state = ser(t->breaker_state, pn, url, NULL);
    }
  }
  g->route_m = sl_calloc(cfg->nroutes ? cfg->nroutes : 1, sizeof(sl_route_m_t));
  for (uint32_t i = 0; i < cfg->nroutes; i++) {
    const sl_route_conf_t *r = &cfg->routes[i];
    sl_route_m_t *m = &g->route_m[i];
    m->by_pool = sl_calloc(cfg->npools + 1, sizeof(sl_route_pool_m_t));
    /* A hook may pick any pool or answer itself: resolve them all now, so the series carry
     * over to the next generation (a reload keeps counting) instead of restarting. */
    if (!r->hook) resolve_route_pool(g, r, (int)r->pool_idx);
    for (int p = -1; r->hook && p < (int)cfg->npools; p++) resolve_route_pool(g, r, p);
    if (r->cache) {
      char label[512];
      route_label(r, label, sizeof(label));
      m->cache_hits = ser(t->cache_hits, label, NULL, NULL);
      m->cache_misses = ser(t->cache_misses, label, NULL, NULL);
      m->cache_coalesced = ser(t->cache_coalesced, label, NULL, NULL);
      m->policy_cache = policy_series(t, "cache", r->cache->policy);
    }
  }
}

sl_route_pool_m_t *sl_telemetry_route_pool(sl_exchange_t *x) {
  if (!x->route || !x->gen || !x->gen->route_m) return NULL;
  const sl_config_t *cfg = x->gen->cfg;
  return &sl_route_m(x->gen, x->route)->by_pool[x->pool_idx < 0 ? cfg->npools : (uint32_t)x->pool_idx];
}

sl_mseries_t *sl_telemetry_policy_series(sl_telemetry_t *t, const char *kind, const char *name) {
  return policy_series(t, kind, name);
}

void sl_telemetry_gen_free(sl_gen_t *g) {
  for (uint32_t i = 0; g->pools && i < g->cfg->npools; i++) {
    sl_pool_m_t *m = g->pools[i].m;
    if (!m) continue;
    sl_mseries_t *s[] = {m->queue_wait,      m->retries,        m->fallbacks,
                         m->queue_timeouts,  m->queue_rejections, m->inflight,
                         m->queued,          m->policy_balancer, m->policy_retry,
                         m->policy_breaker,  m->ws_messages[0], m->ws_messages[1],
                         m->ws_bytes[0],     m->ws_bytes[1],    m->ws_lost};
    release_all(s, SL_ARRAY_SIZE(s));
    for (uint32_t j = 0; j < g->pools[i].n; j++) {
      sl_ep_m_t *e = &m->eps[j];
      sl_mseries_t *es[] = {e->ttfb,           e->connect_errors, e->timeouts,
                            e->ejections,      e->transitions[0], e->transitions[1],
                            e->transitions[2], e->inflight,       e->max_inflight,
                            e->queued,         e->state};
      release_all(es, SL_ARRAY_SIZE(es));
    }
    free(m->eps);
    free(m);
    g->pools[i].m = NULL;
  }
  for (uint32_t i = 0; g->route_m && i < g->cfg->nroutes; i++) {
    sl_route_m_t *m = &g->route_m[i];
    for (uint32_t p = 0; m->by_pool && p <= g->cfg->npools; p++) {
      sl_route_pool_m_t *pm = &m->by_pool[p];
      release_all(pm->requests + 1, 5);
      sl_mseries_t *s[] = {pm->duration, pm->ws_open, pm->ws_total};
      release_all(s, SL_ARRAY_SIZE(s));
    }
    free(m->by_pool);
    sl_mseries_t *s[] = {m->cache_hits, m->cache_misses, m->cache_coalesced, m->policy_cache};
    release_all(s, SL_ARRAY_SIZE(s));
  }
  free(g->route_m);
  g->route_m = NULL;
}

/* Request completion -------------------------------------------------------------------- */

static void append_time(sl_buf_t *b) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char when[64];
  snprintf(when, sizeof(when), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
           tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (ts.tv_nsec / 1000000) % 1000);
  sl_buf_appendf(b, "{\"time\":\"%s\",\"request_id\":\"", when);
}

static void access_log_line(sl_exchange_t *x, int status, double duration_s) {
  sl_worker_t *w = x->conn->w;
  const sl_http_req_t *r = &x->conn->req;
  sl_buf_t *b = sl_access_log_buf(w->alog);
  append_time(b);
  sl_buf_append_json_str(b, x->request_id, strlen(x->request_id));
  sl_buf_appends(b, "\",\"client\":\"");
  sl_buf_append_json_str(b, x->conn->peer, strlen(x->conn->peer));
  const char *m = sl_http_method_str(r->method);
  sl_buf_appends(b, "\",\"method\":\"");
  sl_buf_appends(b, m);
  sl_buf_appends(b, "\",\"path\":\"");
  sl_buf_append_json_str(b, sl_http_req_url(r), SL_MIN(r->path_len, (size_t)2048));
  sl_buf_appends(b, "\",\"route\":");
  if (x->route) {
    sl_buf_append(b, "\"", 1);
    sl_buf_append_json_str(b, x->route->path, strlen(x->route->path));
    /* The pool that served (a fallback included); else the one chosen; none when a route
     * hook answered by itself. */
    const char *pn = x->pool ? x->pool->conf->name
                     : x->pool_idx >= 0 ? x->gen->cfg->pools[x->pool_idx].name : NULL;
    if (pn) {
      sl_buf_appends(b, "\",\"pool\":\"");
      sl_buf_append_json_str(b, pn, strlen(pn));
      sl_buf_append(b, "\"", 1);
    } else {
      sl_buf_appends(b, "\",\"pool\":null");
    }
  } else {
    sl_buf_appends(b, "null,\"pool\":null");
  }
  sl_buf_appends(b, ",\"endpoints\":[");
  for (uint32_t i = 0; i < x->ntried; i++) {
    if (i) sl_buf_append(b, ",", 1);
    sl_buf_append(b, "\"", 1);
    sl_buf_append_json_str(b, x->tried[i]->url, strlen(x->tried[i]->url));
    sl_buf_append(b, "\"", 1);
  }
  static const char *const cache_names[] = {NULL, "BYPASS", "MISS", "HIT", "COALESCED"};
  sl_buf_appendf(b, "],\"attempts\":%u,\"status\":%d,\"bytes\":%llu,\"queue_wait_ms\":%d,"
                    "\"upstream_ttfb_ms\":%d,\"duration_ms\":%.3f,\"cache\":",
                 x->attempts, status, (unsigned long long)x->bytes_out,
                 x->queue_wait_ms < 0 ? 0 : x->queue_wait_ms, x->ttfb_ms, duration_s * 1000.0);
  if (x->cache_result && x->cache_result < SL_ARRAY_SIZE(cache_names))
    sl_buf_appendf(b, "\"%s\"", cache_names[x->cache_result]);
  else
    sl_buf_appends(b, "null");
  if (x->ws_upgrade) sl_buf_appends(b, ",\"websocket\":true");
  sl_buf_appends(b, "}\n");
  sl_access_log_commit(w->alog);
}

void sl_telemetry_count(sl_exchange_t *x, int status) {
  double secs = (double)(uv_hrtime() - x->start_ns) / 1e9;
  sl_worker_t *w = x->conn->w;
  int c = sl_status_class(status);
  sl_route_pool_m_t *rm = sl_telemetry_route_pool(x);
  if (rm) {
    inc(rm->requests[c], 1);
    observe(rm->duration, secs);
  } else {
    inc(w->tm->noroute_requests[c], 1);
    observe(w->tm->noroute_duration, secs);
  }
}

void sl_telemetry_log(sl_exchange_t *x, int status) {
  if (x->conn->w->alog) access_log_line(x, status, (double)(uv_hrtime() - x->start_ns) / 1e9);
}

void sl_telemetry_request_done(sl_exchange_t *x, int status) {
  sl_telemetry_count(x, status);
  sl_telemetry_log(x, status);
}

void sl_telemetry_request_rejected(sl_conn_t *c, int status) {
  sl_worker_t *w = c->w;
  inc(w->tm->noroute_requests[sl_status_class(status)], 1);
  if (!w->alog) return;
  sl_buf_t *b = sl_access_log_buf(w->alog);
  append_time(b);
  const char *rid = sl_conn_request_id(c);
  sl_buf_append_json_str(b, rid, strlen(rid));
  sl_buf_appends(b, "\",\"client\":\"");
  sl_buf_append_json_str(b, c->peer, strlen(c->peer));
  sl_buf_appendf(b, "\",\"method\":null,\"path\":null,\"route\":null,\"pool\":null,"
                    "\"endpoints\":[],\"attempts\":0,\"status\":%d,\"bytes\":0,"
                    "\"queue_wait_ms\":0,\"upstream_ttfb_ms\":-1,\"duration_ms\":0,\"cache\":null,"
                    "\"rejected\":true}\n",
                 status);
  sl_access_log_commit(w->alog);
}

void sl_telemetry_breaker(sl_pool_t *pool, uint32_t idx, int state) {
  if (!pool->m || state < 0 || state > 2) return;
  inc(pool->m->eps[idx].transitions[state], 1);
  if (state == SL_EP_OPEN) inc(pool->m->eps[idx].ejections, 1);
}

void sl_telemetry_policy_error(sl_mseries_t *s) { inc(s, 1); }
