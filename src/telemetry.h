/* The runtime's metrics (docs/metrics.md is the catalogue): the families of a worker's
 * registry, the series handles each config generation resolves once per route, pool and
 * endpoint, the collector that fills live gauges at scrape time, and the access log line. */
#ifndef SL_TELEMETRY_H
#define SL_TELEMETRY_H

#include "metrics.h"
#include "worker.h"

typedef struct sl_ep_m {
  sl_mseries_t *ttfb, *connect_errors, *timeouts, *ejections;
  sl_mseries_t *transitions[3]; /* entering closed, open, half_open (SL_EP_* order) */
  sl_mseries_t *inflight, *max_inflight, *queued, *state; /* set by the collector */
} sl_ep_m_t;

typedef struct sl_pool_m {
  sl_mseries_t *queue_wait, *retries, *fallbacks, *queue_timeouts, *queue_rejections;
  sl_mseries_t *ws_messages[2], *ws_bytes[2], *ws_lost; /* [0] client to upstream */
  sl_mseries_t *policy_balancer, *policy_retry, *policy_breaker;
  sl_mseries_t *inflight, *queued; /* set by the collector */
  sl_ep_m_t *eps;                  /* one per pool endpoint */
} sl_pool_m_t;

/* Request series of one (route, pool) pair. */
typedef struct sl_route_pool_m {
  sl_mseries_t *requests[6]; /* by status class 1..5 ([0] unused) */
  sl_mseries_t *duration;
  sl_mseries_t *ws_open, *ws_total; /* WebSocket pools only */
} sl_route_pool_m_t;

typedef struct sl_route_m {
  /* By the pool that served (cfg->npools + 1 entries; the last: answered before a pool was
   * chosen, e.g. by a hook). Resolved with the generation: the route's own pool, and every
   * pool (and none) when the route has a hook. */
  sl_route_pool_m_t *by_pool;
  sl_mseries_t *cache_hits, *cache_misses, *cache_coalesced, *policy_cache;
} sl_route_m_t;

/* Families and process-level series of one worker's registry. */
typedef struct sl_telemetry {
  sl_metrics_t *reg;
  sl_mfamily_t *requests, *duration, *queue_wait, *ttfb;
  sl_mfamily_t *ep_inflight, *ep_max_inflight, *ep_queued, *pool_inflight, *pool_queued;
  sl_mfamily_t *retries, *fallbacks, *breaker_state, *breaker_transitions, *ejections;
  sl_mfamily_t *queue_timeouts, *queue_rejections, *connect_errors, *timeouts;
  sl_mfamily_t *cache_hits, *cache_misses, *cache_coalesced, *cache_evictions, *cache_bytes,
      *cache_entries;
  sl_mfamily_t *ws_open, *ws_total, *ws_messages, *ws_bytes, *ws_lost;
  sl_mfamily_t *reloads, *generation, *policy_errors, *build_info;
  sl_mseries_t *noroute_requests[6], *noroute_duration; /* requests that matched no route */
  sl_mseries_t *reloads_ok, *reloads_failed, *gen_id, *build, *evictions, *bytes, *entries;
} sl_telemetry_t;

/* Creates the worker's registry and families. */
void sl_telemetry_init(sl_worker_t *w);
void sl_telemetry_free(sl_worker_t *w);
/* Resolves (and releases) a generation's series handles. */
void sl_telemetry_gen_build(sl_gen_t *g);
void sl_telemetry_gen_free(sl_gen_t *g);

static inline sl_route_m_t *sl_route_m(const sl_gen_t *g, const sl_route_conf_t *r) {
  return g->route_m ? &g->route_m[r - g->cfg->routes] : NULL;
}
/* The (route, pool) series for an exchange: x->pool_idx, or "" when it is negative. */
struct sl_exchange;
sl_route_pool_m_t *sl_telemetry_route_pool(struct sl_exchange *x);
static inline int sl_status_class(int status) {
  return status >= 100 && status < 600 ? status / 100 : 5;
}

/* A request was answered (or abandoned: 499): counts it and, when on, writes the access log
 * line. A WebSocket upgrade is counted at its 101 (sl_telemetry_count) and logged when the
 * session ends (sl_telemetry_log). */
struct sl_exchange;
void sl_telemetry_request_done(struct sl_exchange *x, int status);
void sl_telemetry_count(struct sl_exchange *x, int status);
void sl_telemetry_log(struct sl_exchange *x, int status);
/* A request the server answered itself before any routing (malformed, too large, timeout):
 * counted under route="" and logged with what is known of it. */
struct sl_conn;
void sl_telemetry_request_rejected(struct sl_conn *c, int status);
/* A breaker state change on pool->eps[idx]. */
void sl_telemetry_breaker(sl_pool_t *pool, uint32_t idx, int state);
/* The policy-error series of policies/<kind>/<name>.lua (a new reference). */
sl_mseries_t *sl_telemetry_policy_series(sl_telemetry_t *t, const char *kind, const char *name);
/* A policy failed; `kind` is balancer, retry, breaker or cache. */
void sl_telemetry_policy_error(sl_mseries_t *s);

#endif
