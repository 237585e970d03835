#include "admission.h"

#include "io.h"
#include <lauxlib.h>
#include "log.h"
#include "proxy.h"
#include "telemetry.h"

/* Breaker housekeeping before a pick: open endpoints whose time is up turn half-open. Returns
 * how many of the pool's endpoints are ejected. */
static uint32_t refresh_breakers(sl_worker_t *w, sl_pool_t *pool) {
  uint64_t now = sl_worker_now(w);
  uint32_t ejected = 0;
  for (uint32_t i = 0; i < pool->n; i++) {
    sl_endpoint_t *ep = pool->eps[i];
    if (ep->view.state == SL_EP_OPEN && now >= ep->open_until_ms) {
      ep->view.state = SL_EP_HALF_OPEN;
      sl_telemetry_breaker(pool, i, SL_EP_HALF_OPEN);
      ep->probes = 0;
      sl_endpoint_update(ep);
      SL_INFO("breaker half-open: %s (probing)", ep->url);
    }
    if (ep->view.state == SL_EP_OPEN) ejected++;
  }
  pool->view.ejected = (int32_t)ejected;
  return ejected;
}

static void schedule_breaker_timer(sl_worker_t *w, uint64_t due);

static bool was_tried(const sl_endpoint_t *ep, sl_endpoint_t *const *tried, uint32_t ntried) {
  for (uint32_t i = 0; i < ntried; i++)
    if (tried[i] == ep) return true;
  return false;
}

sl_pick_result_t sl_admission_pick(sl_worker_t *w, sl_pool_t *pool, const sl_http_req_t *req,
                                   const char *request_id, uint32_t attempt,
                                   sl_endpoint_t *const *tried, uint32_t ntried,
                                   sl_endpoint_t **out, uint32_t *idx, char *err,
                                   size_t errlen) {
  *out = NULL;
  uint32_t ejected = refresh_breakers(w, pool);
  /* Every endpoint ejected: the fallback pool or a fast 503 (the caller decides). */
  if (pool->n && ejected == pool->n) return SL_PICK_DOWN;
  /* Panic: with too much of the pool ejected, the breakers' verdict is ignored; spreading load
   * over every endpoint beats overloading the few left. */
  bool panic = pool->conf->breaker_enabled && ejected > 0 &&
               (double)ejected > pool->n * pool->conf->breaker_max_ejected_share;

  /* The view the balancer sees: `available` adjusted for panic and already-tried endpoints. */
  uint32_t allowed = 0, open_slots = 0, untried = 0;
  for (uint32_t i = 0; i < pool->n; i++) {
    sl_endpoint_t *ep = pool->eps[i];
    bool ok = sl_endpoint_breaker_allows(ep) || panic;
    allowed += ok;
    bool avail = ok && sl_endpoint_has_slot(ep);
    open_slots += avail;
    untried += avail && !was_tried(ep, tried, ntried);
    ep->view.available = avail;
  }
  if (allowed == 0 || open_slots == 0) {
    for (uint32_t i = 0; i < pool->n; i++) sl_endpoint_update(pool->eps[i]);
    return allowed == 0 ? SL_PICK_DOWN : SL_PICK_BUSY;
  }
  bool adjusted = panic;
  if (ntried && untried) {
    for (uint32_t i = 0; i < pool->n; i++)
      if (was_tried(pool->eps[i], tried, ntried)) pool->eps[i]->view.available = false;
    adjusted = true;
  }
  sl_endpoint_t *ep = NULL;
  int rc = sl_policy_pick(w, pool, req, request_id, attempt, &ep, err, errlen);
  if (adjusted)
    for (uint32_t i = 0; i < pool->n; i++) sl_endpoint_update(pool->eps[i]);
  if (rc != 0) return SL_PICK_ERROR;
  if (!ep) return SL_PICK_BUSY;
  for (uint32_t i = 0; i < pool->n; i++)
    if (pool->eps[i] == ep) *idx = i;
  *out = ep;
  return SL_PICK_OK;
}

bool sl_admission_take(sl_endpoint_t *ep) {
  bool probe = ep->view.state != SL_EP_CLOSED; /* half-open, or open in panic mode */
  ep->view.inflight++;
  if (probe) ep->probes++;
  sl_endpoint_update(ep);
  return probe;
}

static void apply_breaker(sl_worker_t *w, sl_pool_t *pool, uint32_t idx,
                          sl_breaker_action_t action, double open_ms) {
  sl_endpoint_t *ep = pool->eps[idx];
  if (action == SL_BREAKER_OPEN) {
    if (ep->view.state != SL_EP_OPEN) {
      ep->view.ejections++;
      sl_telemetry_breaker(pool, idx, SL_EP_OPEN);
      SL_WARN("breaker open: %s (pool %s) for %.0f ms, ejection %d", ep->url, pool->conf->name,
              open_ms, ep->view.ejections);
    }
    ep->view.state = SL_EP_OPEN;
    ep->open_until_ms = sl_worker_now(w) + (uint64_t)open_ms;
    schedule_breaker_timer(w, ep->open_until_ms);
  } else if (action == SL_BREAKER_CLOSE && ep->view.state != SL_EP_CLOSED) {
    SL_INFO("breaker closed: %s (pool %s)", ep->url, pool->conf->name);
    sl_telemetry_breaker(pool, idx, SL_EP_CLOSED);
    ep->view.state = SL_EP_CLOSED;
    ep->view.ejections = 0;
  }
}

void sl_admission_release(sl_worker_t *w, sl_pool_t *pool, uint32_t idx, bool probe,
                          const sl_outcome_t *o) {
  sl_endpoint_t *ep = pool->eps[idx];
  ep->view.inflight--;
  if (probe && ep->probes) ep->probes--;
  if (sl_outcome_ok(o)) {
    ep->view.successes++;
    ep->view.consecutive_fails = 0;
  } else {
    ep->view.fails++;
    ep->view.consecutive_fails++;
  }
  if (pool->lua_record != LUA_NOREF) {
    char err[512];
    sl_breaker_action_t action;
    double open_ms = 0;
    if (sl_policy_record(w, pool, idx, o, &action, &open_ms, err, sizeof(err)) != 0) {
      w->stats.policy_errors++;
      sl_telemetry_policy_error(pool->m->policy_breaker);
      SL_ERROR("policy error (pool %s breaker): %s", pool->conf->name, err);
    } else {
      apply_breaker(w, pool, idx, action, open_ms);
      refresh_breakers(w, pool); /* pool.stats.ejected stays current */
    }
  }
  sl_endpoint_update(ep);
  sl_admission_wake(w);
}

/* Queue ------------------------------------------------------------------------------------ */

bool sl_admission_enqueue(sl_worker_t *w, sl_pool_t *pool, sl_exchange_t *x) {
  if ((uint32_t)pool->view.queued >= pool->conf->queue_max) return false;
  if (sl_list_empty(&pool->queue)) sl_list_insert_tail(&w->waiting_pools, &pool->waiting);
  sl_list_insert_tail(&pool->queue, &x->qlink);
  pool->view.queued++;
  return true;
}

void sl_admission_dequeue(sl_pool_t *pool, sl_exchange_t *x) {
  sl_list_remove(&x->qlink);
  pool->view.queued--;
  if (sl_list_empty(&pool->queue)) sl_list_remove(&pool->waiting);
}

static void dispatch_waiters(sl_worker_t *w) {
  /* Each pool's oldest waiter first; a pool whose head still finds no slot keeps its order. */
  sl_list_t *l = w->waiting_pools.next;
  while (l != &w->waiting_pools) {
    sl_pool_t *pool = SL_CONTAINER_OF(l, sl_pool_t, waiting);
    l = l->next;
    while (!sl_list_empty(&pool->queue)) {
      sl_exchange_t *x = SL_CONTAINER_OF(pool->queue.next, sl_exchange_t, qlink);
      if (!sl_proxy_offer_slot(x)) break;
    }
  }
}

static void on_dispatch(uv_check_t *h) {
  sl_worker_t *w = h->data;
  uv_check_stop(h);
  w->dispatch_pending = false;
  dispatch_waiters(w);
}

/* An open endpoint's time is up: queued requests may use it as a half-open probe. Dispatches
 * directly: a check handle started from a timer would wait for the next I/O event. */
static void on_breaker_timer(uv_timer_t *t) {
  sl_worker_t *w = t->data;
  /* Open endpoints whose time is up turn half-open now, not at the next pick: readiness and
   * metrics must not wait for traffic that a failing readiness probe keeps away. */
  for (uint32_t i = 0; w->gen && i < w->gen->cfg->npools; i++)
    refresh_breakers(w, &w->gen->pools[i]);
  dispatch_waiters(w);
  uint64_t now = sl_worker_now(w), next = UINT64_MAX;
  for (sl_list_t *l = w->endpoints.next; l != &w->endpoints; l = l->next) {
    sl_endpoint_t *ep = SL_CONTAINER_OF(l, sl_endpoint_t, link);
    if (ep->view.state == SL_EP_OPEN && ep->open_until_ms > now) next = SL_MIN(next, ep->open_until_ms);
  }
  if (next != UINT64_MAX) uv_timer_start(t, on_breaker_timer, next - now, 0);
}

static void schedule_breaker_timer(sl_worker_t *w, uint64_t due) {
  uint64_t now = sl_worker_now(w);
  uint64_t cur = uv_is_active((uv_handle_t *)&w->breaker_timer)
                     ? now + uv_timer_get_due_in(&w->breaker_timer)
                     : UINT64_MAX;
  if (due < cur) uv_timer_start(&w->breaker_timer, on_breaker_timer, due > now ? due - now : 0, 0);
}

void sl_admission_wake(sl_worker_t *w) {
  if (w->dispatch_pending || sl_list_empty(&w->waiting_pools)) return;
  w->dispatch_pending = true;
  uv_check_start(&w->dispatcher, on_dispatch);
}

void sl_admission_init(sl_worker_t *w) {
  sl_list_init(&w->waiting_pools);
  uv_check_init(w->loop, &w->dispatcher);
  w->dispatcher.data = w;
  uv_timer_init(w->loop, &w->breaker_timer);
  w->breaker_timer.data = w;
  uv_unref((uv_handle_t *)&w->breaker_timer); /* must not keep a stopping loop alive */
}

void sl_admission_close(sl_worker_t *w) {
  sl_close_handle((uv_handle_t *)&w->dispatcher, NULL);
  sl_close_handle((uv_handle_t *)&w->breaker_timer, NULL);
}
