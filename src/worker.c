#include "worker.h"

#include "cache.h"
#include "log.h"
#include "policy.h"
#include "telemetry.h"
#include "tls.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>

uint64_t sl_worker_rand(sl_worker_t *w) {
  /* xorshift128+: fast, and good enough for load balancing and request ids. */
  uint64_t s1 = w->rng[0];
  const uint64_t s0 = w->rng[1];
  w->rng[0] = s0;
  s1 ^= s1 << 23;
  w->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
  return w->rng[1] + s0;
}

void sl_worker_request_id(sl_worker_t *w, char out[33]) {
  static const char hex[] = "0123456789abcdef";
  uint64_t a = sl_worker_rand(w), b = sl_worker_rand(w);
  for (int i = 0; i < 16; i++) {
    out[i] = hex[(a >> (i * 4)) & 15];
    out[16 + i] = hex[(b >> (i * 4)) & 15];
  }
  out[32] = 0;
}

static void free_tls_changes(sl_gen_t *g);

static void free_pools(sl_gen_t *g) {
  lua_State *L = g->worker->L;
  free_tls_changes(g);
  sl_telemetry_gen_free(g);
  for (uint32_t i = 0; g->pools && i < g->cfg->npools; i++) {
    sl_pool_t *p = &g->pools[i];
    for (uint32_t j = 0; j < p->n; j++)
      if (p->eps[j]) sl_endpoint_unref(p->eps[j]);
    free(p->eps);
    luaL_unref(L, LUA_REGISTRYINDEX, p->lua_pool);
    luaL_unref(L, LUA_REGISTRYINDEX, p->lua_pick);
    luaL_unref(L, LUA_REGISTRYINDEX, p->lua_decide);
    luaL_unref(L, LUA_REGISTRYINDEX, p->lua_record);
  }
  free(g->pools);
  for (uint32_t i = 0; g->route_cache_key && i < g->cfg->nroutes; i++)
    luaL_unref(L, LUA_REGISTRYINDEX, g->route_cache_key[i]);
  free(g->route_cache_key);
  for (uint32_t i = 0; g->route_hooks && i < g->cfg->nroutes; i++) {
    sl_route_hook_t *h = &g->route_hooks[i];
    luaL_unref(L, LUA_REGISTRYINDEX, h->on_request);
    luaL_unref(L, LUA_REGISTRYINDEX, h->on_response);
    luaL_unref(L, LUA_REGISTRYINDEX, h->options);
    sl_mseries_release(h->errors);
  }
  free(g->route_hooks);
  luaL_unref(L, LUA_REGISTRYINDEX, g->lua_ctx);
}

void sl_gen_unref(sl_gen_t *g) {
  if (--g->refs > 0) return;
  free_pools(g);
  SL_DEBUG("generation %llu released", (unsigned long long)g->id);
  sl_config_unref(g->cfg);
  free(g);
}

/* Pool table for the balancer: make_pool(name, options, ep1, ep2, ...). */
static int build_pool_table(sl_worker_t *w, sl_pool_t *p, int cfg_idx, char *err, size_t errlen) {
  lua_State *L = w->L;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "sluice.runtime");
  if (sl_lua_pcall(L, 1, 1, err, errlen) != 0) return -1;
  lua_getfield(L, -1, "make_pool");
  lua_remove(L, -2);
  lua_pushstring(L, p->conf->name);
  /* options, retry, breaker = cfg.pools[name].{balancer_options, retry, breaker} */
  lua_getfield(L, cfg_idx, "pools");
  lua_getfield(L, -1, p->conf->name);
  int pc = lua_gettop(L);
  lua_getfield(L, pc, "balancer_options");
  lua_getfield(L, pc, "retry");
  lua_getfield(L, pc, "breaker");
  lua_remove(L, pc);
  lua_remove(L, pc - 1);
  lua_pushlightuserdata(L, &p->view);
  luaL_checkstack(L, 2 * (int)p->n + 8, "too many endpoints");
  for (uint32_t i = 0; i < p->n; i++) {
    lua_pushlightuserdata(L, p->eps[i]);
    lua_pushstring(L, p->eps[i]->url);
  }
  if (sl_lua_pcall(L, 5 + 2 * (int)p->n, 1, err, errlen) != 0) return -1;
  p->lua_pool = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* Loads a policy a pool names; a failure names the config key as well as the policy's error. */
static int load_policy(sl_worker_t *w, sl_gen_t *g, sl_pool_t *p, const char *kind,
                       const char *name, char *err, size_t errlen) {
  char perr[1024];
  if (sl_policy_load(w, g, kind, name, perr, sizeof(perr)) == 0) return 0;
  char path[300];
  snprintf(path, sizeof(path), "pools.%s.%s%s", p->conf->name, kind,
           strcmp(kind, "balancer") == 0 ? "" : ".policy");
  sl_config_error(w->L, g->cfg, path, perr, err, errlen);
  return -1;
}

sl_gen_t *sl_gen_build(sl_worker_t *w, sl_config_t *cfg, char *err, size_t errlen) {
  lua_State *L = w->L;
  int top = lua_gettop(L);
  sl_gen_t *g = sl_calloc(1, sizeof(*g));
  g->refs = 1;
  g->id = ++w->next_gen_id;
  g->cfg = sl_config_ref(cfg);
  g->worker = w;
  g->lua_ctx = LUA_NOREF;

  /* The normalized config table in this VM (balancer options live in it). */
  if (sl_config_eval(L, cfg, err, errlen) != 0) goto fail;
  int cfg_idx = lua_gettop(L);

  /* Sandbox context for this generation: module cache and search roots. */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "sluice.sandbox");
  if (sl_lua_pcall(L, 1, 1, err, errlen) != 0) goto fail;
  lua_getfield(L, -1, "context");
  lua_remove(L, -2);
  lua_getfield(L, LUA_REGISTRYINDEX, "sluice.module");
  lua_createtable(L, 3, 0);
  lua_pushstring(L, cfg->policies_dir);
  lua_rawseti(L, -2, 1);
  lua_pushstring(L, sl_bundled_policy_dir());
  lua_rawseti(L, -2, 2);
  lua_pushstring(L, sl_lua_dir());
  lua_rawseti(L, -2, 3);
  if (sl_lua_pcall(L, 2, 1, err, errlen) != 0) goto fail;
  g->lua_ctx = luaL_ref(L, LUA_REGISTRYINDEX);

  g->pools = sl_calloc(cfg->npools, sizeof(sl_pool_t));
  for (uint32_t i = 0; i < cfg->npools; i++) {
    sl_pool_t *p = &g->pools[i];
    p->conf = &cfg->pools[i];
    p->lua_pool = p->lua_pick = p->lua_decide = p->lua_record = LUA_NOREF;
    sl_list_init(&p->queue);
    sl_list_init(&p->waiting);
    if (p->conf->fallback_idx >= 0) p->fallback = &g->pools[p->conf->fallback_idx];
    p->eps = sl_calloc(p->conf->nendpoints, sizeof(sl_endpoint_t *));
    for (uint32_t j = 0; j < p->conf->nendpoints; j++) {
      const sl_endpoint_conf_t *ec = &p->conf->endpoints[j];
      sl_endpoint_t *ep = sl_endpoint_get(w, ec->url, ec->host, ec->port, ec->path, ec->tls,
                                          ec->websocket, err, errlen);
      if (!ep) goto fail;
      p->eps[p->n++] = ep;
    }
    if (load_policy(w, g, p, "balancer", p->conf->balancer, err, errlen) != 0) goto fail;
    lua_getfield(L, -1, "pick");
    p->lua_pick = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    if (p->conf->retry_enabled) {
      if (load_policy(w, g, p, "retry", p->conf->retry_policy, err, errlen) != 0) goto fail;
      lua_getfield(L, -1, "decide");
      p->lua_decide = luaL_ref(L, LUA_REGISTRYINDEX);
      lua_pop(L, 1);
    }
    if (p->conf->breaker_enabled) {
      if (load_policy(w, g, p, "breaker", p->conf->breaker_policy, err, errlen) != 0) goto fail;
      lua_getfield(L, -1, "record");
      p->lua_record = luaL_ref(L, LUA_REGISTRYINDEX);
      lua_pop(L, 1);
    }
    if (build_pool_table(w, p, cfg_idx, err, errlen) != 0) goto fail;
  }
  g->route_cache_key = sl_calloc(cfg->nroutes ? cfg->nroutes : 1, sizeof(int));
  for (uint32_t i = 0; i < cfg->nroutes; i++) g->route_cache_key[i] = LUA_NOREF;
  for (uint32_t i = 0; i < cfg->nroutes; i++) {
    const sl_route_cache_conf_t *rc = cfg->routes[i].cache;
    if (!rc || !rc->policy) continue;
    char perr[1024], path[64];
    snprintf(path, sizeof(path), "routes[%u].cache.policy", i + 1);
    if (sl_policy_load(w, g, "cache", rc->policy, perr, sizeof(perr)) != 0) {
      sl_config_error(L, cfg, path, perr, err, errlen);
      goto fail;
    }
    lua_getfield(L, -1, "key");
    if (!lua_isfunction(L, -1)) {
      snprintf(perr, sizeof(perr), "cache policy %s does not define key(req)", rc->policy);
      sl_config_error(L, cfg, path, perr, err, errlen);
      goto fail;
    }
    g->route_cache_key[i] = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
  }
  for (uint32_t i = 0; i < cfg->nroutes; i++) {
    if (!cfg->routes[i].hook) continue;
    if (!g->route_hooks) {
      g->route_hooks = sl_calloc(cfg->nroutes, sizeof(sl_route_hook_t));
      for (uint32_t j = 0; j < cfg->nroutes; j++)
        g->route_hooks[j].on_request = g->route_hooks[j].on_response =
            g->route_hooks[j].options = LUA_NOREF;
    }
    if (sl_policy_route_load(w, g, cfg_idx, i, err, errlen) != 0) goto fail;
    g->route_hooks[i].errors = sl_telemetry_policy_series(w->tm, "route", cfg->routes[i].hook);
  }
  lua_settop(L, top);
  sl_telemetry_gen_build(g);
  return g;

fail:
  lua_settop(L, top);
  free_pools(g);
  sl_config_unref(g->cfg);
  free(g);
  return NULL;
}

/* Endpoint settings that come from pools, applied when a generation becomes current. An
 * endpoint listed by several pools is one upstream instance with one queue, so its settings
 * are merged: the tightest max_inflight, the most idle connections, the shortest idle time. */
/* TLS client contexts of a generation's https/wss endpoints, built before anything changes
 * (so a refused reload leaves the running settings alone) and swapped in on activation. An
 * endpoint shared by pools takes the strictest settings: verification if any pool verifies. */
typedef struct tls_change {
  sl_endpoint_t *ep;
  SSL_CTX *ctx;
  char *ca;
  bool verify;
} tls_change_t;

static bool same_tls(const sl_endpoint_t *ep, const char *ca, bool verify) {
  return ep->tls_ctx && ep->tls_verify == verify &&
         ((!ca && !ep->tls_ca) || (ca && ep->tls_ca && !strcmp(ca, ep->tls_ca)));
}

static void free_tls_changes(sl_gen_t *g) {
  tls_change_t *c = g->tls_changes;
  for (uint32_t i = 0; c && i < g->ntls_changes; i++) {
    if (c[i].ctx) SSL_CTX_free(c[i].ctx);
    free(c[i].ca);
  }
  free(c);
  g->tls_changes = NULL;
  g->ntls_changes = 0;
}

int sl_gen_prepare_tls(sl_gen_t *g, char *err, size_t errlen) {
  for (uint32_t i = 0; i < g->cfg->npools; i++) {
    sl_pool_t *p = &g->pools[i];
    for (uint32_t j = 0; j < p->n; j++) {
      sl_endpoint_t *ep = p->eps[j];
      if (!ep->tls) continue;
      bool verify = p->conf->tls_verify, seen = false;
      const char *ca = p->conf->tls_ca;
      for (uint32_t k = 0; k < g->cfg->npools; k++) /* another pool naming it may verify */
        for (uint32_t m = 0; m < g->pools[k].n; m++)
          if (g->pools[k].eps[m] == ep && g->pools[k].conf->tls_verify) {
            verify = true;
            if (!ca) ca = g->pools[k].conf->tls_ca;
          }
      tls_change_t *c = g->tls_changes;
      for (uint32_t k = 0; k < g->ntls_changes && !seen; k++) seen = c[k].ep == ep;
      if (seen || same_tls(ep, ca, verify)) continue;
      char e[512];
      SSL_CTX *ctx = sl_tls_client_ctx(ca, verify, e, sizeof(e));
      if (!ctx) {
        char path[300];
        snprintf(path, sizeof(path), "pools.%s.tls.ca", p->conf->name);
        sl_config_error(g->worker->L, g->cfg, path, e, err, errlen);
        free_tls_changes(g);
        return -1;
      }
      g->tls_changes = sl_realloc(g->tls_changes, (g->ntls_changes + 1) * sizeof(tls_change_t));
      g->tls_changes[g->ntls_changes++] = (tls_change_t){ep, ctx, ca ? sl_strdup(ca) : NULL, verify};
    }
  }
  return 0;
}

/* Swaps in what sl_gen_prepare_tls built. Idle connections made under the old settings are
 * closed: one opened without verification must not serve a pool that now verifies. */
static void commit_tls(sl_gen_t *g) {
  tls_change_t *c = g->tls_changes;
  for (uint32_t i = 0; i < g->ntls_changes; i++) {
    sl_endpoint_t *ep = c[i].ep;
    bool had = ep->tls_ctx != NULL;
    if (ep->tls_ctx) SSL_CTX_free(ep->tls_ctx); /* live connections keep their own reference */
    if (ep->tls_session) SSL_SESSION_free(ep->tls_session);
    ep->tls_session = NULL;
    ep->tls_ctx = c[i].ctx;
    free(ep->tls_ca);
    ep->tls_ca = c[i].ca;
    ep->tls_verify = c[i].verify;
    c[i].ctx = NULL;
    c[i].ca = NULL;
    if (had) sl_endpoint_close_idle(ep);
    if (!ep->tls_verify)
      SL_WARN("TLS certificate verification is OFF for %s (tls.verify = false)", ep->url);
  }
  free_tls_changes(g);
}

void sl_gen_activate(sl_gen_t *g) {
  sl_worker_t *w = g->worker;
  commit_tls(g);
  if (!w->cache)
    w->cache = sl_cache_new(g->cfg->cache_max_bytes, g->cfg->cache_max_entry_bytes);
  else
    sl_cache_set_limits(w->cache, g->cfg->cache_max_bytes, g->cfg->cache_max_entry_bytes);
  for (uint32_t pass = 0; pass < 2; pass++) {
    for (uint32_t i = 0; i < g->cfg->npools; i++) {
      sl_pool_t *p = &g->pools[i];
      const sl_pool_conf_t *pc = p->conf;
      for (uint32_t j = 0; j < p->n; j++) {
        sl_endpoint_t *ep = p->eps[j];
        if (pass == 0) { /* reset to neutral values, then merge */
          ep->view.max_inflight = 0;
          ep->max_idle = 0;
          ep->idle_timeout_ms = UINT32_MAX;
          ep->probes_max = 1;
          continue;
        }
        ep->view.weight = (int32_t)pc->endpoints[j].weight;
        int32_t mi = (int32_t)pc->max_inflight;
        if (mi && (ep->view.max_inflight == 0 || mi < ep->view.max_inflight))
          ep->view.max_inflight = mi;
        ep->max_idle = SL_MAX(ep->max_idle, pc->keepalive_max_idle);
        ep->idle_timeout_ms = SL_MIN(ep->idle_timeout_ms, pc->keepalive_idle_timeout_ms);
        if (pc->breaker_enabled) ep->probes_max = SL_MAX(ep->probes_max, pc->breaker_probes);
        sl_endpoint_update(ep);
      }
    }
  }
}
