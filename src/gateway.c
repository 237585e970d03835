/* The public sluice_t: a config, and the worker that serves it on the host's loop. */
#include "sluice.h"

#include "admin.h"
#include "access_log.h"
#include "admission.h"
#include "cache.h"
#include "telemetry.h"
#include "tls.h"
#include "config.h"
#include "io.h"
#include "log.h"
#include "policy.h"
#include "server.h"
#include "watch.h"
#include "worker.h"
#include "workers.h"

#include <ctype.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <time.h>

struct sluice {
  uv_loop_t *loop;
  sl_config_t *cfg;
  sl_worker_t *worker;
  bool started, stopping, stopped;
  sl_watch_t *watch;
  sl_workers_t *workers; /* worker threads beyond the one on the host loop */
  sl_ext_t *exts;        /* host functions for policies (sluice_register) */
  size_t nexts;
  void (*stop_done)(sluice_t *, void *);
  void *stop_arg;
  char error[2048];
};

static int forced_log_level = -1;

void sluice_set_log_level(int level) {
  forced_log_level = level;
  sl_log_level = level;
}

const char *sluice_version(void) { return SLUICE_VERSION; }

const char *sluice_strerror(int err) {
  switch (err) {
  case 0: return "success";
  case SLUICE_ECONFIG: return "invalid configuration";
  case SLUICE_EPOLICY: return "policy failed to load";
  case SLUICE_ELISTEN: return "cannot listen";
  case SLUICE_ESTATE: return "invalid state for this call";
  default: return err < 0 ? uv_strerror(err) : "unknown error";
  }
}

const char *sluice_last_error(const sluice_t *s) { return s->error; }

uint16_t sluice_port(const sluice_t *s) { return s->worker ? s->worker->bound_port : 0; }

sl_worker_t *sl_worker_create(uv_loop_t *loop, char *err, size_t errlen) {
  sl_worker_t *w = sl_calloc(1, sizeof(*w));
  w->loop = loop;
  sl_list_init(&w->endpoints);
  sl_list_init(&w->conns);
  for (size_t i = 0; i < SL_ARRAY_SIZE(w->cache_fills); i++) sl_list_init(&w->cache_fills[i]);
  if (getrandom(w->rng, sizeof(w->rng), 0) != (ssize_t)sizeof(w->rng)) {
    w->rng[0] = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)w;
    w->rng[1] = (uint64_t)clock() * 0x9E3779B97F4A7C15ull;
  }
  if (!w->rng[0] && !w->rng[1]) w->rng[1] = 1;
  w->L = sl_lua_newstate();
  if (sl_policy_init(w, err, errlen) != 0) {
    lua_close(w->L);
    free(w);
    return NULL;
  }
  sl_telemetry_init(w);
  uv_timer_init(loop, &w->drain_timer);
  w->drain_timer.data = w;
  sl_admission_init(w);
  sl_server_worker_init(w);
  return w;
}

/* Frees the worker's Lua state and endpoints. Handles (listeners, connections, timers) must
 * already be closing. */
void sl_worker_destroy(sl_worker_t *w) {
  if (w->gen) sl_gen_unref(w->gen);
  w->gen = NULL;
  /* Endpoints still referenced by nobody close their idle connections here; they are freed
   * once their last upstream connection has closed. */
  lua_close(w->L);
  sl_telemetry_free(w);
  sl_cache_free(w->cache);
  free(w);
}

int sluice_new(uv_loop_t *loop, sluice_t **out) {
  sluice_t *s = sl_calloc(1, sizeof(*s));
  s->loop = loop;
  *out = s;
  return 0;
}

/* Builds a generation for cfg and makes it current. On failure the running generation stays
 * and the error is in s->error. */
/* Opens, reopens or closes the access log as cfg says. Relative paths are relative to the
 * config file's directory. */
/* Opens the access log cfg asks for when it differs from the current one (*change set; *out
 * is the new log, NULL for none). Nothing is swapped yet. */
static int open_access_log(sl_worker_t *w, const sl_config_t *cfg, sl_access_log_t **out,
                           bool *change, char *err, size_t errlen) {
  char path[4096];
  const char *want = cfg->access_log;
  if (want && strcmp(want, "-") != 0 && want[0] != '/') {
    snprintf(path, sizeof(path), "%s/%s", cfg->dir, want);
    want = path;
  }
  const char *have = w->alog ? sl_access_log_path(w->alog) : NULL;
  *out = NULL;
  *change = !((!want && !have) || (want && have && strcmp(want, have) == 0));
  if (*change && want && !(*out = sl_access_log_open(w->loop, want, err, errlen)))
    return SLUICE_ECONFIG;
  return 0;
}

int sl_worker_apply(sl_worker_t *w, sl_config_t *cfg, bool listening, char *err, size_t errlen) {
  sl_gen_t *g = sl_gen_build(w, cfg, err, errlen);
  if (!g) return SLUICE_EPOLICY;
  /* Everything that can fail comes first: a refused reload changes nothing. */
  sl_access_log_t *alog = NULL;
  bool alog_change = false;
  if (sl_gen_prepare_tls(g, err, errlen) != 0 ||
      open_access_log(w, cfg, &alog, &alog_change, err, errlen) != 0) {
    sl_gen_unref(g);
    return SLUICE_ECONFIG;
  }
  if (listening && sl_server_load_tls(w, cfg, err, errlen) != 0) { /* all or nothing itself */
    sl_access_log_close(alog);
    sl_gen_unref(g);
    return SLUICE_ECONFIG;
  }
  if (alog_change) {
    sl_access_log_close(w->alog);
    w->alog = alog;
  }
  sl_gen_t *old = w->gen;
  w->gen = g;
  sl_gen_activate(g);
  if (old) sl_gen_unref(old); /* in-flight requests hold their own references */
  return 0;
}

static int activate(sluice_t *s, sl_config_t *cfg) {
  /* The new level already covers what loading the config logs; a failed load restores it. */
  int old_level = sl_log_level;
  if (forced_log_level < 0) sl_log_level = cfg->log_level;
  int rc = sl_worker_apply(s->worker, cfg, s->started, s->error, sizeof(s->error));
  if (rc != 0) {
    sl_log_level = old_level;
    return rc;
  }
  sl_config_t *old_cfg = s->cfg;
  s->cfg = sl_config_ref(cfg);
  if (old_cfg) sl_config_unref(old_cfg);
  if (s->workers) sl_workers_reload(s->workers, cfg); /* the other threads follow */
  return 0;
}

static int load_config(sluice_t *s, sl_config_t *cfg) {
  if (!cfg) return SLUICE_ECONFIG;
  if (!s->worker) {
    s->worker = sl_worker_create(s->loop, s->error, sizeof(s->error));
    if (!s->worker) {
      sl_config_unref(cfg);
      return SLUICE_EPOLICY;
    }
    s->worker->gw = s;
    sl_policy_add_ext(s->worker, s->exts, s->nexts);
  }
  sl_lua_set_mode(s->worker->L, cfg->lua_jit, cfg->lua_budget);
  if (cfg->lua_jit) SL_WARN("lua.jit = true: policies are compiled; a runaway loop cannot be stopped");
  int rc = activate(s, cfg);
  sl_config_unref(cfg);
  return rc;
}

int sluice_load_file(sluice_t *s, const char *path) {
  if (s->started) {
    snprintf(s->error, sizeof(s->error), "sluice_load_file: already started (use sluice_reload)");
    return SLUICE_ESTATE;
  }
  return load_config(s, sl_config_load(path, s->error, sizeof(s->error)));
}

int sluice_load_string(sluice_t *s, const char *name, const char *source, size_t len,
                       const char *dir) {
  if (s->started) {
    snprintf(s->error, sizeof(s->error), "sluice_load_string: already started (use sluice_reload_string)");
    return SLUICE_ESTATE;
  }
  return load_config(s, sl_config_load_string(name ? name : "(config)", source, len, dir,
                                              s->error, sizeof(s->error)));
}

int sluice_register(sluice_t *s, const char *name, sluice_ext_fn fn, void *data) {
  if (s->worker) {
    snprintf(s->error, sizeof(s->error), "sluice_register: register before loading a config");
    return SLUICE_ESTATE;
  }
  bool ok = name && fn && (isalpha((unsigned char)name[0]) || name[0] == '_');
  for (const char *p = name; ok && *p; p++) ok = isalnum((unsigned char)*p) || *p == '_';
  if (!ok) {
    snprintf(s->error, sizeof(s->error), "sluice_register: %s is not a valid Lua name",
             name ? name : "(null)");
    return SLUICE_ECONFIG;
  }
  s->exts = sl_realloc(s->exts, (s->nexts + 1) * sizeof(sl_ext_t));
  s->exts[s->nexts++] = (sl_ext_t){sl_strdup(name), (int (*)(lua_State *))fn, data};
  return 0;
}

void *sluice_ext_data(struct lua_State *L) { return lua_touserdata(L, lua_upvalueindex(1)); }

/* Settings a reload cannot change: they shape sockets and threads made at start. */
static void warn_restart_only(const sl_config_t *old, const sl_config_t *cfg) {
  bool same_listen = old->nlisten == cfg->nlisten;
  for (uint32_t i = 0; same_listen && i < cfg->nlisten; i++)
    same_listen = strcmp(old->listen[i].addr, cfg->listen[i].addr) == 0 &&
                  (old->listen[i].tls_cert != NULL) == (cfg->listen[i].tls_cert != NULL);
  if (!same_listen) SL_WARN("reload: listen changed; takes effect after a restart");
  if ((old->admin.addr == NULL) != (cfg->admin.addr == NULL) ||
      (cfg->admin.addr && strcmp(old->admin.addr, cfg->admin.addr) != 0))
    SL_WARN("reload: admin changed; takes effect after a restart");
  if (old->workers != cfg->workers) SL_WARN("reload: workers changed; takes effect after a restart");
  if (old->lua_jit != cfg->lua_jit) SL_WARN("reload: lua.jit changed; takes effect after a restart");
}

static int reload_with(sluice_t *s, sl_worker_t *w, uint64_t before, sl_config_t *cfg);

int sluice_reload(sluice_t *s) {
  if (!s->worker || !s->cfg || s->stopping) {
    snprintf(s->error, sizeof(s->error), "sluice_reload: %s", s->stopping ? "stopping" : "no config loaded");
    return SLUICE_ESTATE;
  }
  sl_worker_t *w = s->worker;
  uint64_t before = w->gen->id;
  sl_config_t *cfg = s->cfg->from_string
                         ? sl_config_load_string(s->cfg->file, s->cfg->source, s->cfg->source_len,
                                                 s->cfg->dir, s->error, sizeof(s->error))
                         : sl_config_load(s->cfg->file, s->error, sizeof(s->error));
  return reload_with(s, w, before, cfg);
}

int sluice_reload_string(sluice_t *s, const char *source, size_t len) {
  if (!s->worker || !s->cfg || s->stopping || !s->cfg->from_string) {
    snprintf(s->error, sizeof(s->error), "sluice_reload_string: %s",
             s->stopping ? "stopping" : "no config loaded with sluice_load_string");
    return SLUICE_ESTATE;
  }
  sl_config_t *cfg = sl_config_load_string(s->cfg->file, source, len, s->cfg->dir, s->error,
                                           sizeof(s->error));
  return reload_with(s, s->worker, s->worker->gen->id, cfg);
}

static int reload_with(sluice_t *s, sl_worker_t *w, uint64_t before, sl_config_t *cfg) {
  int rc = cfg ? 0 : SLUICE_ECONFIG;
  if (cfg) {
    warn_restart_only(s->cfg, cfg);
    rc = activate(s, cfg);
    sl_config_unref(cfg);
  }
  if (rc != 0) {
    w->stats.reloads_failed++;
    SL_ERROR("reload failed, generation %llu keeps running: %s", (unsigned long long)before,
             s->error);
    return rc;
  }
  w->stats.reloads_ok++;
  SL_INFO("reload: generation %llu active", (unsigned long long)w->gen->id);
  if (s->watch) sl_watch_refresh(s->watch, s->cfg->policies_dir);
  return 0;
}

int sl_gateway_reload(void *gateway, char *err, size_t errlen, unsigned long long *generation) {
  sluice_t *s = gateway;
  if (sluice_reload(s) != 0) {
    snprintf(err, errlen, "%s", s->error);
    return -1;
  }
  *generation = (unsigned long long)s->worker->gen->id;
  return 0;
}

size_t sl_gateway_registries(void *gateway, sl_metrics_t **out, size_t cap) {
  sluice_t *s = gateway;
  if (!cap) return 0;
  out[0] = s->worker->tm->reg;
  return 1 + sl_workers_registries(s->workers, out + 1, cap - 1);
}

void sl_gateway_purge_others(void *gateway, const void *key, const char *tag) {
  sluice_t *s = gateway;
  sl_workers_purge(s->workers, key, tag);
}

uint32_t sl_gateway_workers(void *gateway) {
  sluice_t *s = gateway;
  return 1 + sl_workers_count(s->workers);
}

uint64_t sluice_generation(const sluice_t *s) {
  return s->worker && s->worker->gen ? s->worker->gen->id : 0;
}

static void on_watch(void *arg) { sluice_reload(arg); }

int sluice_start(sluice_t *s) {
  if (!s->cfg || s->started) {
    snprintf(s->error, sizeof(s->error), "sluice_start: %s",
             s->started ? "already started" : "no config loaded");
    return SLUICE_ESTATE;
  }
  /* Watch before listening: once "listening" is logged, a saved change must not be missed. */
  if (s->cfg->watch)
    s->watch = sl_watch_start(s->loop, s->cfg->from_string ? NULL : s->cfg->file,
                              s->cfg->policies_dir, 150, on_watch, s);
  int rc = sl_server_listen(s->worker, s->cfg, NULL, true, s->error, sizeof(s->error));
  uint32_t n = s->cfg->workers ? s->cfg->workers : (uint32_t)uv_available_parallelism();
  if (rc == 0 && n > 1) {
    /* The other workers bind the ports the first one got (a configured port 0 included). */
    uint16_t ports[256];
    for (uint32_t i = 0; i < s->cfg->nlisten && i < SL_ARRAY_SIZE(ports); i++)
      ports[i] = sl_server_listener_port(s->worker, i);
    s->workers = sl_workers_start(n - 1, s->cfg, ports, s->exts, s->nexts, s->error,
                                  sizeof(s->error));
    if (!s->workers) rc = SLUICE_ELISTEN;
    else SL_INFO("%u workers", n);
  }
  if (rc != 0) {
    sl_watch_stop(s->watch);
    s->watch = NULL;
    return SLUICE_ELISTEN;
  }
  s->started = true;
  return 0;
}

static void on_drain_timer_closed(uv_handle_t *h) {
  sl_worker_t *w = h->data;
  if (w->on_stopped) w->on_stopped(w);
}

/* The host-loop worker has stopped: wait for the worker threads (draining in parallel, with
 * the same bound), then tell the host. */
static void main_stopped(sl_worker_t *w) {
  sluice_t *s = (sluice_t *)w->gw;
  sl_workers_join(s->workers);
  s->workers = NULL;
  s->stopped = true;
  if (s->stop_done) s->stop_done(s, s->stop_arg);
}

static void finish_stop(sl_worker_t *w) {
  for (sl_list_t *l = w->endpoints.next; l != &w->endpoints; l = l->next)
    sl_endpoint_close_idle(SL_CONTAINER_OF(l, sl_endpoint_t, link));
  sl_admission_close(w);
  sl_server_worker_close(w);
  sl_access_log_close(w->alog);
  w->alog = NULL;
  sl_close_handle((uv_handle_t *)&w->drain_timer, on_drain_timer_closed);
}

static void on_drain_timeout(uv_timer_t *t) {
  sl_worker_t *w = t->data;
  if (w->nconns) SL_WARN("drain timeout: closing %u connection(s) still busy", w->nconns);
  sl_server_close_all(w);
  finish_stop(w);
}

void sl_worker_conn_gone(sl_worker_t *w) {
  if (w->draining && w->nconns == 0 && !uv_is_closing((uv_handle_t *)&w->drain_timer)) {
    uv_timer_stop(&w->drain_timer);
    finish_stop(w);
  }
}

int sluice_stop(sluice_t *s, void (*done)(sluice_t *, void *), void *arg) {
  if (!s->worker || s->stopping || !s->started) {
    snprintf(s->error, sizeof(s->error), "sluice_stop: %s",
             s->stopping ? "already stopping" : "not started (sluice_free is enough)");
    return SLUICE_ESTATE;
  }
  s->stopping = true;
  sl_watch_stop(s->watch);
  s->watch = NULL;
  s->stop_done = done;
  s->stop_arg = arg;
  s->worker->on_stopped = main_stopped;
  sl_workers_stop(s->workers);
  sl_worker_drain(s->worker, s->cfg->drain_timeout_ms);
  return 0;
}

void sl_worker_drain(sl_worker_t *w, uint32_t timeout_ms) {
  w->draining = true;
  sl_server_drain(w);
  if (w->nconns == 0) {
    finish_stop(w);
  } else {
    SL_INFO("draining %u connection(s), up to %u ms", w->nconns, timeout_ms);
    uv_timer_start(&w->drain_timer, on_drain_timeout, timeout_ms, 0);
  }
}

void sluice_free(sluice_t *s) {
  if (!s) return;
  if (s->started && !s->stopped) {
    /* Its handles are still open on the host loop: freeing now would leave libuv pointing
     * at freed memory. */
    SL_ERROR("sluice_free called before sluice_stop completed; instance leaked");
    return;
  }
  if (s->worker) {
    if (!s->started) {
      sl_access_log_close(s->worker->alog);
      s->worker->alog = NULL;
      sl_admission_close(s->worker);
      sl_server_worker_close(s->worker);
      sl_close_handle((uv_handle_t *)&s->worker->drain_timer, NULL);
    }
    sl_worker_destroy(s->worker);
  }
  sl_config_unref(s->cfg);
  for (size_t i = 0; i < s->nexts; i++) free(s->exts[i].name);
  free(s->exts);
  free(s);
}

int sluice_check_file(const char *path, char *err, size_t errlen) {
  sl_config_t *cfg = sl_config_load(path, err, errlen);
  if (!cfg) return SLUICE_ECONFIG;
  uv_loop_t loop;
  uv_loop_init(&loop);
  int rc = 0;
  sl_worker_t *w = sl_worker_create(&loop, err, errlen);
  if (!w) {
    rc = SLUICE_EPOLICY;
  } else {
    sl_gen_t *g = sl_gen_build(w, cfg, err, errlen);
    if (!g) rc = SLUICE_EPOLICY;
    else w->gen = g;
    if (g && sl_gen_prepare_tls(g, err, errlen) != 0) rc = SLUICE_ECONFIG;
    for (uint32_t i = 0; rc == 0 && i < cfg->nlisten; i++) { /* listener certificates load */
      if (!cfg->listen[i].tls_cert) continue;
      char e[512];
      SSL_CTX *ctx = sl_tls_server_ctx(cfg->listen[i].tls_cert, cfg->listen[i].tls_key, e, sizeof(e));
      if (ctx) {
        SSL_CTX_free(ctx);
        continue;
      }
      char key[64];
      snprintf(key, sizeof(key), "listen[%u].tls", i + 1);
      sl_config_error(w->L, cfg, key, e, err, errlen);
      rc = SLUICE_ECONFIG;
    }
    sl_admission_close(w);
    sl_server_worker_close(w);
    sl_close_handle((uv_handle_t *)&w->drain_timer, NULL);
    sl_worker_destroy(w);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  sl_config_unref(cfg);
  return rc;
}
