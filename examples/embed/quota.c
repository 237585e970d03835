#include "quota.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

typedef struct tenant {
  struct tenant *next;
  uint64_t window_start;
  uint32_t used;
  size_t len;
  char name[];
} tenant_t;

struct quota {
  uv_mutex_t lock;
  uint32_t limit;
  uint64_t window_ms;
  tenant_t **buckets;
  size_t nbuckets, count;
};

static uint64_t hash(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
  return h;
}

quota_t *quota_new(uint32_t limit, uint64_t window_ms) {
  quota_t *q = calloc(1, sizeof(*q));
  if (!q) return NULL;
  q->limit = limit;
  q->window_ms = window_ms ? window_ms : 1;
  q->nbuckets = 64;
  q->buckets = calloc(q->nbuckets, sizeof(tenant_t *));
  if (!q->buckets || uv_mutex_init(&q->lock) != 0) {
    free(q->buckets);
    free(q);
    return NULL;
  }
  return q;
}

void quota_free(quota_t *q) {
  if (!q) return;
  for (size_t i = 0; i < q->nbuckets; i++)
    for (tenant_t *t = q->buckets[i], *n; t; t = n) {
      n = t->next;
      free(t);
    }
  free(q->buckets);
  uv_mutex_destroy(&q->lock);
  free(q);
}

static void grow(quota_t *q) {
  size_t n = q->nbuckets * 2;
  tenant_t **b = calloc(n, sizeof(tenant_t *));
  if (!b) return; /* keep the longer chains */
  for (size_t i = 0; i < q->nbuckets; i++)
    for (tenant_t *t = q->buckets[i], *next; t; t = next) {
      next = t->next;
      size_t j = hash(t->name, t->len) & (n - 1);
      t->next = b[j];
      b[j] = t;
    }
  free(q->buckets);
  q->buckets = b;
  q->nbuckets = n;
}

/* The tenant's entry with its window rolled forward to now; NULL when out of memory. */
static tenant_t *lookup(quota_t *q, const char *name, size_t len, uint64_t now) {
  size_t i = hash(name, len) & (q->nbuckets - 1);
  tenant_t *t = q->buckets[i];
  while (t && !(t->len == len && memcmp(t->name, name, len) == 0)) t = t->next;
  if (!t) {
    t = malloc(sizeof(*t) + len + 1);
    if (!t) return NULL;
    t->len = len;
    memcpy(t->name, name, len);
    t->name[len] = 0;
    t->used = 0;
    t->window_start = now;
    t->next = q->buckets[i];
    q->buckets[i] = t;
    if (++q->count > 2 * q->nbuckets) grow(q);
  }
  if (now - t->window_start >= q->window_ms) {
    t->window_start = now - (now - t->window_start) % q->window_ms;
    t->used = 0;
  }
  return t;
}

bool quota_take(quota_t *q, const char *tenant, size_t len, uint64_t now_ms, uint32_t *remaining,
                uint64_t *reset_ms) {
  uv_mutex_lock(&q->lock);
  tenant_t *t = lookup(q, tenant, len, now_ms);
  bool ok = t && t->used < q->limit;
  if (ok) t->used++;
  *remaining = t ? q->limit - t->used : 0;
  *reset_ms = t ? t->window_start + q->window_ms - now_ms : q->window_ms;
  uv_mutex_unlock(&q->lock);
  return ok;
}

uint32_t quota_peek(quota_t *q, const char *tenant, size_t len, uint64_t now_ms) {
  uv_mutex_lock(&q->lock);
  tenant_t *t = lookup(q, tenant, len, now_ms);
  uint32_t left = t ? q->limit - t->used : 0;
  uv_mutex_unlock(&q->lock);
  return left;
}
