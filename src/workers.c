#include "workers.h"

#include "cache.h"
#include "log.h"
#include "policy.h"
#include "server.h"
#include "telemetry.h"
#include "worker.h"

#include <stdio.h>
#include <stdlib.h>

#define COLLECT_MS 500 /* live gauges of thread workers are refreshed this often for /metrics */

typedef struct wthread {
  struct sl_workers *ws;
  uint32_t index;
  uv_thread_t tid;
  uv_loop_t loop;
  uv_async_t ctl;
  uv_timer_t collect;
  sl_worker_t *w;
  /* mailbox, guarded by mu */
  uv_mutex_t mu;
  sl_config_t *pending; /* a config to activate */
  bool stop;
  bool purge_all;
  char *purge_tag;
  bool purge_key_set;
  sl_cache_key_t purge_key;
  /* start-up */
  sl_config_t *cfg;
  const uint16_t *ports;
  const sl_ext_t *exts;
  size_t nexts;
  int rc;
  char err[512];
  bool started;
} wthread_t;

struct sl_workers {
  uint32_t n;
  wthread_t *t;
  uv_sem_t ready;
};

static void on_collect(uv_timer_t *h) {
  wthread_t *t = h->data;
  sl_metrics_collect(t->w->tm->reg);
}

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void thread_stopped(sl_worker_t *w) {
  wthread_t *t = w->gw;
  uv_close((uv_handle_t *)&t->ctl, on_handle_closed);
  uv_close((uv_handle_t *)&t->collect, on_handle_closed);
}

static void on_ctl(uv_async_t *h) {
  wthread_t *t = h->data;
  uv_mutex_lock(&t->mu);
  sl_config_t *cfg = t->pending;
  t->pending = NULL;
  bool stop = t->stop, all = t->purge_all, key = t->purge_key_set;
  char *tag = t->purge_tag;
  sl_cache_key_t k = t->purge_key;
  t->purge_all = t->purge_key_set = false;
  t->purge_tag = NULL;
  uv_mutex_unlock(&t->mu);

  sl_worker_t *w = t->w;
  if (cfg && !w->draining) {
    char err[1024];
    if (sl_worker_apply(w, cfg, true, err, sizeof(err)) != 0)
      SL_ERROR("worker %u: reload failed, its generation keeps running: %s", t->index, err);
  }
  sl_config_unref(cfg);
  if (w->cache) {
    if (all) sl_cache_purge_all(w->cache);
    if (tag) sl_cache_purge_tag(w->cache, tag);
    if (key) sl_cache_purge_key(w->cache, &k);
  }
  free(tag);
  if (stop && !w->draining) {
    uv_timer_stop(&t->collect);
    sl_worker_drain(w, w->gen->cfg->drain_timeout_ms);
  }
}

/* Closes whatever a worker that failed to start had opened, and frees it. */
static void abandon(wthread_t *t) {
  sl_worker_t *w = t->w;
  if (w) {
    w->on_stopped = NULL;
    sl_server_drain(w);
    sl_worker_drain(w, 0);
  }
  uv_run(&t->loop, UV_RUN_DEFAULT);
  if (w) sl_worker_destroy(w);
  t->w = NULL;
  uv_loop_close(&t->loop);
}

static void thread_main(void *arg) {
  wthread_t *t = arg;
  uv_loop_init(&t->loop);
  t->w = sl_worker_create(&t->loop, t->err, sizeof(t->err));
  if (!t->w) {
    t->rc = -1;
    uv_loop_close(&t->loop);
    uv_sem_post(&t->ws->ready);
    return;
  }
  sl_worker_t *w = t->w;
  w->index = t->index;
  w->gw = t;
  sl_policy_add_ext(w, t->exts, t->nexts);
  sl_lua_set_mode(w->L, t->cfg->lua_jit, t->cfg->lua_budget);
  if (sl_worker_apply(w, t->cfg, false, t->err, sizeof(t->err)) != 0 ||
      sl_server_listen(w, t->cfg, t->ports, false, t->err, sizeof(t->err)) != 0) {
    t->rc = -1;
    abandon(t);
    uv_sem_post(&t->ws->ready);
    return;
  }
  uv_async_init(&t->loop, &t->ctl, on_ctl);
  t->ctl.data = t;
  uv_timer_init(&t->loop, &t->collect);
  t->collect.data = t;
  uv_timer_start(&t->collect, on_collect, 0, COLLECT_MS);
  uv_unref((uv_handle_t *)&t->collect);
  w->on_stopped = thread_stopped;
  t->rc = 0;
  uv_sem_post(&t->ws->ready);

  uv_run(&t->loop, UV_RUN_DEFAULT);
  sl_worker_destroy(w);
  t->w = NULL;
  uv_loop_close(&t->loop);
}

sl_workers_t *sl_workers_start(uint32_t n, sl_config_t *cfg, const uint16_t *ports,
                               const sl_ext_t *exts, size_t nexts, char *err, size_t errlen) {
  sl_workers_t *ws = sl_calloc(1, sizeof(*ws));
  ws->n = n;
  ws->t = sl_calloc(n, sizeof(wthread_t));
  uv_sem_init(&ws->ready, 0);
  int failed = -1;
  for (uint32_t i = 0; i < n; i++) {
    wthread_t *t = &ws->t[i];
    t->ws = ws;
    t->index = i + 1;
    t->cfg = cfg;
    t->ports = ports;
    t->exts = exts;
    t->nexts = nexts;
    uv_mutex_init(&t->mu);
    if (uv_thread_create(&t->tid, thread_main, t) != 0) {
      snprintf(err, errlen, "workers: cannot start thread %u", i + 1);
      failed = (int)i;
      break;
    }
    t->started = true;
    uv_sem_wait(&ws->ready); /* one at a time: each must listen before the next binds */
    if (t->rc != 0) {
      snprintf(err, errlen, "worker %u: %s", i + 1, t->err);
      uv_thread_join(&t->tid);
      t->started = false;
      failed = (int)i;
      break;
    }
  }
  if (failed >= 0) {
    sl_workers_stop(ws);
    sl_workers_join(ws);
    return NULL;
  }
  return ws;
}

void sl_workers_reload(sl_workers_t *ws, sl_config_t *cfg) {
  for (uint32_t i = 0; ws && i < ws->n; i++) {
    wthread_t *t = &ws->t[i];
    if (!t->started) continue;
    uv_mutex_lock(&t->mu);
    sl_config_t *old = t->pending;
    t->pending = sl_config_ref(cfg);
    uv_mutex_unlock(&t->mu);
    sl_config_unref(old);
    uv_async_send(&t->ctl);
  }
}

void sl_workers_purge(sl_workers_t *ws, const sl_cache_key_t *key, const char *tag) {
  for (uint32_t i = 0; ws && i < ws->n; i++) {
    wthread_t *t = &ws->t[i];
    if (!t->started) continue;
    uv_mutex_lock(&t->mu);
    if (key) {
      t->purge_key = *key;
      t->purge_key_set = true;
    } else if (tag) {
      free(t->purge_tag);
      t->purge_tag = sl_strdup(tag);
    } else {
      t->purge_all = true;
    }
    uv_mutex_unlock(&t->mu);
    uv_async_send(&t->ctl);
  }
}

void sl_workers_stop(sl_workers_t *ws) {
  for (uint32_t i = 0; ws && i < ws->n; i++) {
    wthread_t *t = &ws->t[i];
    if (!t->started) continue;
    uv_mutex_lock(&t->mu);
    t->stop = true;
    uv_mutex_unlock(&t->mu);
    uv_async_send(&t->ctl);
  }
}

void sl_workers_join(sl_workers_t *ws) {
  if (!ws) return;
  for (uint32_t i = 0; i < ws->n; i++) {
    wthread_t *t = &ws->t[i];
    if (t->started) uv_thread_join(&t->tid);
    sl_config_unref(t->pending);
    free(t->purge_tag);
    uv_mutex_destroy(&t->mu);
  }
  uv_sem_destroy(&ws->ready);
  free(ws->t);
  free(ws);
}

size_t sl_workers_registries(sl_workers_t *ws, sl_metrics_t **out, size_t cap) {
  size_t k = 0;
  for (uint32_t i = 0; ws && i < ws->n && k < cap; i++)
    if (ws->t[i].started && ws->t[i].w) out[k++] = ws->t[i].w->tm->reg;
  return k;
}

uint32_t sl_workers_count(const sl_workers_t *ws) { return ws ? ws->n : 0; }
