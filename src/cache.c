#include "cache.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

/* Per-entry cost not visible in the struct: the bucket slot (amortized, load factor <= 1) and
 * allocator headers (~16 bytes each) for the struct, tag, head, body and chunk table. */
#define SL_CACHE_ENTRY_OVERHEAD (2 * sizeof(void *) + 80)
#define SL_CACHE_MIN_BITS       6

struct sl_cache_entry {
  sl_list_t lru; /* in the cache's LRU while in_table */
  sl_cache_entry_t *hnext;
  sl_cache_key_t key;
  unsigned refs;
  bool in_table, committed, over;
  uint16_t status;
  uint32_t flags;
  char *tag;
  size_t tag_len;
  char *head;
  size_t head_len;
  char *body;
  size_t body_len, body_cap;
  uint32_t *ends; /* end offset of each chunk in body */
  size_t nchunks, chunks_cap;
  size_t max_bytes; /* entry limit captured at creation */
  size_t acct;      /* accounted size, fixed at commit */
  uint64_t commit_ms, expire_ms;
};

struct sl_cache {
  sl_cache_entry_t **buckets;
  unsigned bits; /* log2 of the bucket count */
  uint64_t seed; /* odd multiplier, secret per cache */
  sl_list_t lru; /* head = most recently used */
  size_t max_bytes, max_entry;
  sl_cache_stats_t st;
};

/* ---- keys ---- */

static void keyb_fail(void) {
  fprintf(stderr, "sluice: EVP SHA-256 failed\n");
  abort();
}

void sl_cache_keyb_init(sl_cache_keyb_t *kb) {
  kb->md = EVP_MD_CTX_new();
  if (!kb->md || EVP_DigestInit_ex(kb->md, EVP_sha256(), NULL) != 1) keyb_fail();
}

void sl_cache_keyb_add(sl_cache_keyb_t *kb, const char *tag, const void *p, size_t n) {
  size_t tn = strlen(tag);
  uint8_t hdr[8];
  for (int i = 0; i < 8; i++)
    hdr[i] = (uint8_t)((uint64_t)tn >> (56 - 8 * i));
  if (EVP_DigestUpdate(kb->md, hdr, 8) != 1 || EVP_DigestUpdate(kb->md, tag, tn) != 1) keyb_fail();
  for (int i = 0; i < 8; i++)
    hdr[i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
  if (EVP_DigestUpdate(kb->md, hdr, 8) != 1 || (n && EVP_DigestUpdate(kb->md, p, n) != 1))
    keyb_fail();
}

void sl_cache_keyb_final(sl_cache_keyb_t *kb, sl_cache_key_t *out) {
  unsigned len = 0;
  if (EVP_DigestFinal_ex(kb->md, out->b, &len) != 1 || len != sizeof(out->b)) keyb_fail();
  EVP_MD_CTX_free(kb->md);
  kb->md = NULL;
}

void sl_cache_key_hex(const sl_cache_key_t *k, char out[65]) {
  static const char hex[] = "0123456789abcdef";
  for (size_t i = 0; i < sizeof(k->b); i++) {
    out[2 * i] = hex[k->b[i] >> 4];
    out[2 * i + 1] = hex[k->b[i] & 15];
  }
  out[64] = '\0';
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

int sl_cache_key_parse_hex(const char *hex, size_t n, sl_cache_key_t *out) {
  sl_cache_key_t k;
  if (n != 64) return -1;
  for (size_t i = 0; i < 32; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return -1;
    k.b[i] = (uint8_t)(hi << 4 | lo);
  }
  *out = k;
  return 0;
}

/* ---- entries ---- */

static size_t entry_bytes(const sl_cache_entry_t *e) {
  return sizeof(*e) + (e->tag ? e->tag_len + 1 : 0) + e->head_len + e->body_len +
         e->nchunks * sizeof(uint32_t) + SL_CACHE_ENTRY_OVERHEAD;
}

static void entry_drop_body(sl_cache_entry_t *e) {
  free(e->body);
  free(e->ends);
  e->body = NULL;
  e->ends = NULL;
  e->body_len = e->body_cap = e->nchunks = e->chunks_cap = 0;
}

sl_cache_entry_t *sl_cache_entry_new(sl_cache_t *c, const sl_cache_key_t *key, const char *tag) {
  sl_cache_entry_t *e = sl_calloc(1, sizeof(*e));
  sl_list_init(&e->lru);
  e->key = *key;
  e->refs = 1;
  e->max_bytes = c->max_entry;
  if (tag) {
    e->tag_len = strlen(tag);
    e->tag = sl_strndup(tag, e->tag_len);
  }
  if (entry_bytes(e) > e->max_bytes) e->over = true;
  return e;
}

void sl_cache_entry_set_head(sl_cache_entry_t *e, uint16_t status, const char *head, size_t len) {
  assert(!e->committed);
  free(e->head);
  e->head = NULL;
  e->head_len = 0;
  e->status = status;
  if (e->over) return;
  if (len > e->max_bytes || entry_bytes(e) + len > e->max_bytes) {
    e->over = true;
    entry_drop_body(e);
    return;
  }
  if (len) {
    e->head = sl_malloc(len);
    memcpy(e->head, head, len);
    e->head_len = len;
  }
}

bool sl_cache_entry_append(sl_cache_entry_t *e, const char *data, size_t len) {
  assert(!e->committed);
  if (e->over) return false;
  /* An empty chunk carries no framing worth keeping (and would read as a terminator). */
  if (!len) return true;
  if (len > e->max_bytes || entry_bytes(e) + len + sizeof(uint32_t) > e->max_bytes ||
      len > UINT32_MAX - e->body_len) {
    /* Release what was buffered now: the rest of the response may keep streaming. */
    e->over = true;
    entry_drop_body(e);
    return false;
  }
  if (e->body_cap - e->body_len < len) {
    size_t cap = e->body_cap ? e->body_cap : 256;
    while (cap - e->body_len < len)
      cap *= 2;
    e->body = sl_realloc(e->body, cap);
    e->body_cap = cap;
  }
  if (e->nchunks == e->chunks_cap) {
    e->chunks_cap = e->chunks_cap ? e->chunks_cap * 2 : 8;
    e->ends = sl_realloc(e->ends, e->chunks_cap * sizeof(uint32_t));
  }
  memcpy(e->body + e->body_len, data, len);
  e->body_len += len;
  e->ends[e->nchunks++] = (uint32_t)e->body_len;
  return true;
}

static void entry_free(sl_cache_entry_t *e) {
  free(e->tag);
  free(e->head);
  free(e->body);
  free(e->ends);
  free(e);
}

sl_cache_entry_t *sl_cache_entry_ref(sl_cache_entry_t *e) {
  e->refs++;
  return e;
}

void sl_cache_entry_unref(sl_cache_entry_t *e) {
  if (!e) return;
  assert(e->refs > 0);
  if (--e->refs == 0) {
    assert(!e->in_table);
    entry_free(e);
  }
}

void sl_cache_entry_abandon(sl_cache_entry_t *e) { sl_cache_entry_unref(e); }

uint16_t sl_cache_entry_status(const sl_cache_entry_t *e) { return e->status; }
void sl_cache_entry_set_flags(sl_cache_entry_t *e, uint32_t flags) { e->flags = flags; }
uint32_t sl_cache_entry_flags(const sl_cache_entry_t *e) { return e->flags; }

const char *sl_cache_entry_head(const sl_cache_entry_t *e, size_t *len) {
  *len = e->head_len;
  return e->head ? e->head : "";
}

size_t sl_cache_entry_body_len(const sl_cache_entry_t *e) { return e->body_len; }
size_t sl_cache_entry_nchunks(const sl_cache_entry_t *e) { return e->nchunks; }

const char *sl_cache_entry_chunk(const sl_cache_entry_t *e, size_t i, size_t *len) {
  assert(i < e->nchunks);
  size_t start = i ? e->ends[i - 1] : 0;
  *len = e->ends[i] - start;
  return e->body + start;
}

uint64_t sl_cache_entry_age_ms(const sl_cache_entry_t *e, uint64_t now_ms) {
  return e->committed && now_ms > e->commit_ms ? now_ms - e->commit_ms : 0;
}

uint64_t sl_cache_entry_ttl_left_ms(const sl_cache_entry_t *e, uint64_t now_ms) {
  return e->committed && now_ms < e->expire_ms ? e->expire_ms - now_ms : 0;
}

size_t sl_cache_entry_bytes(const sl_cache_entry_t *e) {
  return e->committed ? e->acct : entry_bytes(e);
}

/* ---- table ---- */

/* The key is already a uniform hash, but clients choose its input and could grind keys that
 * share low bits into one chain; a secret multiplier (taking the high bits) defeats that. */
static size_t bucket_in(const sl_cache_key_t *k, uint64_t seed, unsigned bits) {
  uint64_t h;
  memcpy(&h, k->b, sizeof(h));
  return (size_t)((h * seed) >> (64 - bits));
}

static size_t bucket_of(const sl_cache_t *c, const sl_cache_key_t *k) {
  return bucket_in(k, c->seed, c->bits);
}

static size_t nbuckets(const sl_cache_t *c) { return (size_t)1 << c->bits; }

static void limits(sl_cache_t *c, size_t max_bytes, size_t max_entry) {
  c->max_bytes = max_bytes;
  if (!max_entry) max_entry = max_bytes / 8;
  c->max_entry = SL_MIN(max_entry, max_bytes);
  c->st.max_bytes = max_bytes;
}

sl_cache_t *sl_cache_new(size_t max_bytes, size_t max_entry_bytes) {
  sl_cache_t *c = sl_calloc(1, sizeof(*c));
  c->bits = SL_CACHE_MIN_BITS;
  c->buckets = sl_calloc(nbuckets(c), sizeof(*c->buckets));
  if (RAND_bytes((unsigned char *)&c->seed, sizeof(c->seed)) != 1)
    c->seed = (uint64_t)(uintptr_t)c * 0x9e3779b97f4a7c15ull;
  c->seed |= 1;
  sl_list_init(&c->lru);
  limits(c, max_bytes, max_entry_bytes);
  return c;
}

/* Takes e out of the table once its chain link is gone; drops the table's reference. */
static void detach(sl_cache_t *c, sl_cache_entry_t *e) {
  sl_list_remove(&e->lru);
  e->hnext = NULL;
  e->in_table = false;
  c->st.entries--;
  c->st.bytes -= e->acct;
  sl_cache_entry_unref(e);
}

static void table_remove(sl_cache_t *c, sl_cache_entry_t *e) {
  sl_cache_entry_t **pp = &c->buckets[bucket_of(c, &e->key)];
  while (*pp != e)
    pp = &(*pp)->hnext;
  *pp = e->hnext;
  detach(c, e);
}

static bool expired(const sl_cache_entry_t *e, uint64_t now_ms) { return now_ms >= e->expire_ms; }

static void evict_tail(sl_cache_t *c, uint64_t now_ms) {
  sl_cache_entry_t *e = SL_CONTAINER_OF(c->lru.prev, sl_cache_entry_t, lru);
  if (expired(e, now_ms))
    c->st.expired++;
  else
    c->st.evictions++;
  table_remove(c, e);
}

static void grow(sl_cache_t *c) {
  unsigned bits = c->bits + 1;
  sl_cache_entry_t **nb = sl_calloc((size_t)1 << bits, sizeof(*nb));
  for (size_t i = 0; i < nbuckets(c); i++) {
    sl_cache_entry_t *e = c->buckets[i], *next;
    for (; e; e = next) {
      next = e->hnext;
      sl_cache_entry_t **slot = &nb[bucket_in(&e->key, c->seed, bits)];
      e->hnext = *slot;
      *slot = e;
    }
  }
  free(c->buckets);
  c->buckets = nb;
  c->bits = bits;
}

void sl_cache_set_limits(sl_cache_t *c, size_t max_bytes, size_t max_entry_bytes) {
  limits(c, max_bytes, max_entry_bytes);
  while (c->st.bytes > c->max_bytes)
    evict_tail(c, 0);
}

size_t sl_cache_purge_all(sl_cache_t *c) {
  size_t n = 0;
  for (size_t i = 0; i < nbuckets(c); i++) {
    sl_cache_entry_t *e = c->buckets[i], *next;
    c->buckets[i] = NULL;
    for (; e; e = next) {
      next = e->hnext;
      detach(c, e);
      n++;
    }
  }
  c->st.purged += n;
  return n;
}

void sl_cache_free(sl_cache_t *c) {
  if (!c) return;
  sl_cache_purge_all(c);
  free(c->buckets);
  free(c);
}

static sl_cache_entry_t **find(sl_cache_t *c, const sl_cache_key_t *key) {
  sl_cache_entry_t **pp = &c->buckets[bucket_of(c, key)];
  while (*pp && memcmp((*pp)->key.b, key->b, sizeof(key->b)) != 0)
    pp = &(*pp)->hnext;
  return pp;
}

int sl_cache_commit(sl_cache_t *c, sl_cache_entry_t *e, uint64_t now_ms, uint64_t ttl_ms) {
  assert(!e->committed && !e->in_table && e->refs == 1);
  size_t size = entry_bytes(e);
  if (e->over || !ttl_ms || size > c->max_entry) {
    c->st.refused++;
    sl_cache_entry_unref(e);
    return -1;
  }
  /* Shrink to fit so the accounted size is what the allocator holds. */
  if (!e->body_len) {
    entry_drop_body(e);
  } else {
    if (e->body_cap > e->body_len) e->body = sl_realloc(e->body, e->body_len);
    if (e->chunks_cap > e->nchunks) e->ends = sl_realloc(e->ends, e->nchunks * sizeof(uint32_t));
    e->body_cap = e->body_len;
    e->chunks_cap = e->nchunks;
  }
  e->committed = true;
  e->acct = size;
  e->commit_ms = now_ms;
  e->expire_ms = ttl_ms > UINT64_MAX - now_ms ? UINT64_MAX : now_ms + ttl_ms;

  sl_cache_entry_t **pp = find(c, &e->key);
  if (*pp) {
    sl_cache_entry_t *old = *pp;
    *pp = old->hnext;
    detach(c, old);
  }
  while (c->st.bytes + size > c->max_bytes)
    evict_tail(c, now_ms);
  if (c->st.entries + 1 > nbuckets(c)) grow(c);

  sl_cache_entry_t **slot = &c->buckets[bucket_of(c, &e->key)];
  e->hnext = *slot;
  *slot = e;
  e->in_table = true;
  sl_list_insert_head(&c->lru, &e->lru);
  c->st.entries++;
  c->st.bytes += size;
  c->st.inserts++;
  return 0;
}

sl_cache_entry_t *sl_cache_lookup(sl_cache_t *c, const sl_cache_key_t *key, uint64_t now_ms) {
  sl_cache_entry_t **pp = &c->buckets[bucket_of(c, key)];
  sl_cache_entry_t *hit = NULL;
  while (*pp) {
    sl_cache_entry_t *e = *pp;
    /* Expired entries met on the chain are freed, the looked-up one included. */
    if (expired(e, now_ms)) {
      *pp = e->hnext;
      c->st.expired++;
      detach(c, e);
      continue;
    }
    if (memcmp(e->key.b, key->b, sizeof(key->b)) == 0) hit = e;
    pp = &e->hnext;
  }
  if (!hit) {
    c->st.misses++;
    return NULL;
  }
  sl_list_remove(&hit->lru);
  sl_list_insert_head(&c->lru, &hit->lru);
  hit->refs++;
  c->st.hits++;
  return hit;
}

size_t sl_cache_purge_key(sl_cache_t *c, const sl_cache_key_t *key) {
  sl_cache_entry_t **pp = find(c, key);
  if (!*pp) return 0;
  sl_cache_entry_t *e = *pp;
  *pp = e->hnext;
  detach(c, e);
  c->st.purged++;
  return 1;
}

size_t sl_cache_purge_tag(sl_cache_t *c, const char *tag) {
  if (!tag) return 0;
  size_t n = 0, tn = strlen(tag);
  sl_list_t *it = c->lru.next, *next;
  for (; it != &c->lru; it = next) {
    next = it->next;
    sl_cache_entry_t *e = SL_CONTAINER_OF(it, sl_cache_entry_t, lru);
    if (e->tag && e->tag_len == tn && memcmp(e->tag, tag, tn) == 0) {
      table_remove(c, e);
      n++;
    }
  }
  c->st.purged += n;
  return n;
}

size_t sl_cache_sweep(sl_cache_t *c, uint64_t now_ms) {
  size_t n = 0;
  sl_list_t *it = c->lru.next, *next;
  for (; it != &c->lru; it = next) {
    next = it->next;
    sl_cache_entry_t *e = SL_CONTAINER_OF(it, sl_cache_entry_t, lru);
    if (expired(e, now_ms)) {
      table_remove(c, e);
      n++;
    }
  }
  c->st.expired += n;
  return n;
}

void sl_cache_stats(const sl_cache_t *c, sl_cache_stats_t *out) { *out = c->st; }

int sl_cache__check(const sl_cache_t *c) {
  size_t n = 0, bytes = 0;
  for (size_t i = 0; i < nbuckets(c); i++) {
    for (const sl_cache_entry_t *e = c->buckets[i]; e; e = e->hnext) {
      if (!e->in_table || !e->committed || e->refs < 1) return -1;
      if (bucket_of(c, &e->key) != i) return -2;
      if (e->acct != entry_bytes(e)) return -3;
      n++;
      bytes += e->acct;
    }
  }
  size_t ln = 0;
  for (const sl_list_t *it = c->lru.next; it != &c->lru; it = it->next) {
    if (it->next->prev != it) return -4;
    const sl_cache_entry_t *e = SL_CONTAINER_OF(it, sl_cache_entry_t, lru);
    if (!e->in_table) return -5;
    ln++;
  }
  if (n != c->st.entries || ln != n) return -6;
  if (bytes != c->st.bytes) return -7;
  if (bytes > c->max_bytes) return -8;
  if (n > nbuckets(c)) return -9;
  return 0;
}
