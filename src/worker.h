/* A worker: one libuv loop, one LuaJIT VM, and everything hot that belongs to them —
 * endpoints, client connections, the current config generation. Nothing here is shared with
 * another worker. */
#ifndef SL_WORKER_H
#define SL_WORKER_H

#include "common.h"
#include "config.h"
#include "endpoint.h"

#include <lua.h>
#include <uv.h>

struct sl_gateway;

/* A pool as one generation sees it: its config, endpoints and balancer. */
typedef struct sl_pool {
  const sl_pool_conf_t *conf;
  sl_endpoint_t **eps;
  uint32_t n;
  struct sl_pool *fallback;
  sl_pool_view_t view; /* pool.stats for policies */
  sl_list_t queue;     /* sl_exchange_t waiting for a slot, oldest first */
  sl_list_t waiting;   /* in worker->waiting_pools while the queue is not empty */
  int lua_pool;        /* registry ref: the pool table handed to policies */
  int lua_pick;        /* registry ref: balancer.pick */
  int lua_decide;      /* registry ref: retry.decide, or LUA_NOREF */
  int lua_record;      /* registry ref: breaker.record, or LUA_NOREF */
  struct sl_pool_m *m; /* metric series (telemetry.h) */
} sl_pool_t;

/* A generation: a config and the policies loaded for it. Requests hold a reference so they
 * finish on the generation they started with while a reload swaps in a new one. */
typedef struct sl_gen {
  uint32_t refs;
  uint64_t id;
  sl_config_t *cfg; /* shared; the gateway owns it */
  sl_pool_t *pools; /* cfg->npools entries */
  struct sl_worker *worker;
  int lua_ctx; /* registry ref: sandbox context (module cache) */
  int *route_cache_key; /* per route: registry ref of its cache policy's key(), or LUA_NOREF */
  struct sl_route_hook *route_hooks; /* per route (route.hook), NULL when no route has one */
  struct sl_route_m *route_m; /* per route: metric series (telemetry.h) */
  struct tls_change *tls_changes; /* TLS contexts built for activation (worker.c) */
  uint32_t ntls_changes;
} sl_gen_t;

/* A route's hook policy (policies/route/<name>.lua) as loaded for one generation. */
typedef struct sl_route_hook {
  int on_request;  /* registry refs, LUA_NOREF when the policy lacks the hook */
  int on_response;
  int options;     /* routes[i].hook.options */
  struct sl_metric_series *errors; /* sluice_policy_errors_total{policy="route/<name>"} */
} sl_route_hook_t;

enum { SL_HOOK_NONE = 0, SL_HOOK_REQUEST, SL_HOOK_RESPONSE };

/* routes[i]'s hook in generation g (only for routes that have one). */
static inline sl_route_hook_t *sl_route_hook(const sl_gen_t *g, const sl_route_conf_t *r) {
  return &g->route_hooks[r - g->cfg->routes];
}

typedef struct sl_worker_stats {
  uint64_t accepted, requests, responses[6]; /* responses by status class 1xx..5xx, [0] other */
  uint64_t upstream_connect_errors, upstream_timeouts, policy_errors;
  uint64_t reloads_ok, reloads_failed;
  uint64_t ws_sessions, ws_upstream_lost;
  uint64_t ws_messages[2], ws_bytes[2]; /* [0] client to upstream, [1] upstream to client */
  uint64_t cache_hits, cache_misses, cache_coalesced, cache_bypass;
} sl_worker_stats_t;

typedef struct sl_worker {
  uv_loop_t *loop;
  lua_State *L;
  void *gw; /* the sluice_t that owns this worker */
  sl_gen_t *gen;
  uint64_t next_gen_id;

  struct sl_listener *listeners;
  uint32_t nlisteners;
  uint16_t bound_port; /* first listener's port (useful when configured as 0) */
  uint16_t admin_port;
  sl_list_t endpoints;
  sl_list_t conns;
  uint32_t nconns;
  sl_list_t idle_sweep_conns; /* connections gone idle whose exchange is to be freed */
  uv_check_t idle_sweep;      /* frees them after the I/O callbacks of the loop turn */
  uint64_t next_conn_serial;

  /* The request a policy hook is deciding on; read by the Lua `req` object. */
  const struct sl_http_req *hook_req;
  struct sl_hedits *hook_edits;       /* where req:/res:set_header go, while allowed */
  const struct sl_exchange *hook_res; /* the response on_response looks at */
  uint8_t hook_phase;                 /* SL_HOOK_REQUEST or SL_HOOK_RESPONSE while one runs */
  uint64_t req_seq;
  const char *hook_request_id;
  uint32_t hook_attempt;
  int lua_req;       /* registry ref: the reusable req object */
  int lua_traceback; /* registry ref: message handler for hot-path pcalls */

  sl_list_t waiting_pools; /* pools with queued requests, of any generation */
  uv_check_t dispatcher;    /* hands freed slots to queued requests after I/O callbacks */
  uv_timer_t breaker_timer; /* fires when the next open endpoint turns half-open */
  bool dispatch_pending;
  int lua_outcome; /* registry ref: reusable outcome table */
  int lua_hooks;   /* registry ref: runtime module (trampolines) */
  int lua_res;     /* registry ref: the reusable res object (on_response) */

  struct sl_cache *cache;    /* response cache (cache.c), created with the first generation */
  struct sl_telemetry *tm;   /* metrics registry and families (telemetry.c) */
  struct sl_access_log *alog; /* access log writer, or NULL when off */
  sl_list_t cache_fills[64]; /* cache misses in flight, by key, for coalescing */

  uint64_t rng[2];
  uint32_t index;    /* 0: the worker on the host's loop (admin, signals); 1..: threads */
  void (*on_stopped)(struct sl_worker *w); /* drained and every handle closing */
  bool draining;
  uv_timer_t drain_timer;
  sl_worker_stats_t stats;
  char readbuf[64 * 1024]; /* shared by every read on this loop: data is consumed in the callback */
} sl_worker_t;

static inline uint64_t sl_worker_now(const sl_worker_t *w) { return uv_now(w->loop); }
uint64_t sl_worker_rand(sl_worker_t *w);
/* Writes 32 lowercase hex characters (128 random bits) and a NUL into out[33]. */
void sl_worker_request_id(sl_worker_t *w, char out[33]);

/* Builds a generation from cfg in this worker's VM. Returns NULL with err filled. */
sl_gen_t *sl_gen_build(sl_worker_t *w, sl_config_t *cfg, char *err, size_t errlen);
static inline sl_gen_t *sl_gen_ref(sl_gen_t *g) {
  g->refs++;
  return g;
}
void sl_gen_unref(sl_gen_t *g);
/* Builds the TLS contexts the generation's https/wss endpoints need, without changing them
 * (sl_gen_activate swaps them in). Returns -1 with err (naming the config key) when a CA file
 * cannot be loaded. */
int sl_gen_prepare_tls(sl_gen_t *g, char *err, size_t errlen);
/* Applies per-pool endpoint settings (weight, max_inflight, keep-alive) of a new current
 * generation. */
void sl_gen_activate(sl_gen_t *g);
/* Defined by the gateway: a worker with its Lua VM and telemetry (no generation yet), freed
 * with sl_worker_destroy once its handles are closed. */
sl_worker_t *sl_worker_create(uv_loop_t *loop, char *err, size_t errlen);
void sl_worker_destroy(sl_worker_t *w);
/* Builds a generation for cfg and makes it current (TLS contexts, access log); on failure
 * the running one stays. `listening`: listener certificates are reloaded too. */
int sl_worker_apply(sl_worker_t *w, sl_config_t *cfg, bool listening, char *err, size_t errlen);
/* Stops accepting and finishes in-flight work within timeout_ms; then closes the worker's
 * handles and calls w->on_stopped. */
void sl_worker_drain(sl_worker_t *w, uint32_t timeout_ms);
/* A client connection finished closing (drain bookkeeping; defined by the gateway). */
void sl_worker_conn_gone(sl_worker_t *w);

#endif
