#include "cache.h"
#include "t.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static sl_cache_key_t key_of(unsigned id) {
  sl_cache_keyb_t kb;
  sl_cache_key_t k;
  sl_cache_keyb_init(&kb);
  sl_cache_keyb_add(&kb, "id", &id, sizeof(id));
  sl_cache_keyb_final(&kb, &k);
  return k;
}

/* Builds and commits an entry whose body is `body`, one chunk. */
static int put(sl_cache_t *c, unsigned id, const char *tag, const char *body, uint64_t now,
               uint64_t ttl) {
  sl_cache_key_t k = key_of(id);
  sl_cache_entry_t *e = sl_cache_entry_new(c, &k, tag);
  sl_cache_entry_set_head(e, 200, "content-type: text/plain\r\n", 26);
  if (!sl_cache_entry_append(e, body, strlen(body))) {
    sl_cache_entry_abandon(e);
    return -1;
  }
  return sl_cache_commit(c, e, now, ttl);
}

static bool has(sl_cache_t *c, unsigned id, uint64_t now) {
  sl_cache_key_t k = key_of(id);
  sl_cache_entry_t *e = sl_cache_lookup(c, &k, now);
  sl_cache_entry_unref(e);
  return e != NULL;
}

static bool body_is(const sl_cache_entry_t *e, const char *s) {
  size_t n = strlen(s), off = 0;
  if (sl_cache_entry_body_len(e) != n) return false;
  for (size_t i = 0; i < sl_cache_entry_nchunks(e); i++) {
    size_t len;
    const char *p = sl_cache_entry_chunk(e, i, &len);
    if (off + len > n || memcmp(p, s + off, len) != 0) return false;
    off += len;
  }
  return off == n;
}

/* The accounted size of an entry like put() makes. */
static size_t size_of(sl_cache_t *c, const char *tag, const char *body) {
  sl_cache_key_t k = key_of(0);
  sl_cache_entry_t *e = sl_cache_entry_new(c, &k, tag);
  sl_cache_entry_set_head(e, 200, "content-type: text/plain\r\n", 26);
  sl_cache_entry_append(e, body, strlen(body));
  size_t n = sl_cache_entry_bytes(e);
  sl_cache_entry_abandon(e);
  return n;
}

static void hit_and_miss(void) {
  sl_cache_t *c = sl_cache_new(1 << 20, 0);
  sl_cache_key_t k = key_of(1);
  CHECK(sl_cache_lookup(c, &k, 0) == NULL);

  sl_cache_entry_t *e = sl_cache_entry_new(c, &k, "chat");
  sl_cache_entry_set_head(e, 201, "x-a: 1\r\n", 8);
  CHECK(sl_cache_entry_append(e, "hello", 5));
  CHECK(sl_cache_lookup(c, &k, 0) == NULL); /* not visible before commit */
  CHECK_EQ_INT(sl_cache_commit(c, e, 10, 1000), 0);

  sl_cache_entry_t *r = sl_cache_lookup(c, &k, 20);
  CHECK(r != NULL);
  if (r) {
    size_t hl;
    const char *h = sl_cache_entry_head(r, &hl);
    CHECK_EQ_INT(sl_cache_entry_status(r), 201);
    CHECK(hl == 8 && memcmp(h, "x-a: 1\r\n", 8) == 0);
    CHECK(body_is(r, "hello"));
    CHECK_EQ_INT(sl_cache_entry_age_ms(r, 20), 10);
    CHECK_EQ_INT(sl_cache_entry_ttl_left_ms(r, 20), 990);
    sl_cache_entry_unref(r);
  }
  sl_cache_key_t other = key_of(2);
  CHECK(sl_cache_lookup(c, &other, 20) == NULL);

  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.hits, 1);
  CHECK_EQ_INT(st.misses, 3);
  CHECK_EQ_INT(st.inserts, 1);
  CHECK_EQ_INT(st.entries, 1);
  CHECK_EQ_INT(st.max_bytes, 1 << 20);
  CHECK(st.bytes > 5 && st.bytes < 1024);
  CHECK_EQ_INT(sl_cache__check(c), 0);
  sl_cache_free(c);
}

static void ttl_expiry(void) {
  sl_cache_t *c = sl_cache_new(1 << 20, 0);
  CHECK_EQ_INT(put(c, 1, NULL, "a", 1000, 500), 0);
  CHECK_EQ_INT(put(c, 2, NULL, "b", 1000, 5000), 0);
  CHECK(has(c, 1, 1499));
  CHECK(!has(c, 1, 1500));
  CHECK(has(c, 2, 1500));
  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.expired, 1);
  CHECK_EQ_INT(st.entries, 1);
  CHECK_EQ_INT(st.hits, 2);
  CHECK_EQ_INT(st.misses, 1);

  /* ttl 0 is refused; a huge ttl saturates instead of wrapping. The far-future lookup runs on
   * a cache of its own: a lookup frees expired entries it meets on its bucket chain, and with
   * a random bucket seed entry 2 would sometimes share the chain and go before the sweep. */
  CHECK_EQ_INT(put(c, 3, NULL, "c", 1000, 0), -1);
  CHECK_EQ_INT(put(c, 4, NULL, "d", 1000, UINT64_MAX), 0);
  sl_cache_t *far = sl_cache_new(1 << 20, 0);
  CHECK_EQ_INT(put(far, 4, NULL, "d", 1000, UINT64_MAX), 0);
  CHECK(has(far, 4, UINT64_MAX - 1));
  sl_cache_free(far);

  /* sweep drops the expired entries nobody looks up. */
  CHECK_EQ_INT(put(c, 5, NULL, "e", 2000, 100), 0);
  CHECK_EQ_INT(put(c, 6, NULL, "f", 2000, 200), 0);
  CHECK_EQ_INT(sl_cache_sweep(c, 2150), 1);
  CHECK(has(c, 6, 2150));
  CHECK_EQ_INT(sl_cache_sweep(c, 7000), 2); /* 2 and 6 */
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.entries, 1);
  CHECK_EQ_INT(sl_cache__check(c), 0);
  sl_cache_free(c);
}

static void lru_order(void) {
  sl_cache_t *c = sl_cache_new(1 << 20, 0);
  size_t one = size_of(c, NULL, "0123456789");
  sl_cache_free(c);
  c = sl_cache_new(3 * one + one / 2, one);
  CHECK_EQ_INT(put(c, 1, NULL, "0123456789", 0, 1000), 0);
  CHECK_EQ_INT(put(c, 2, NULL, "0123456789", 0, 1000), 0);
  CHECK_EQ_INT(put(c, 3, NULL, "0123456789", 0, 1000), 0);
  CHECK(has(c, 1, 1)); /* 1 is now the most recent; 2 the least */
  CHECK_EQ_INT(put(c, 4, NULL, "0123456789", 1, 1000), 0);
  CHECK(!has(c, 2, 2));
  CHECK(has(c, 3, 2)); /* order now 3, 4, 1: 1 is next out */
  CHECK_EQ_INT(put(c, 5, NULL, "0123456789", 2, 1000), 0);
  CHECK(!has(c, 1, 3));
  CHECK(has(c, 3, 3));
  CHECK(has(c, 4, 3));
  CHECK(has(c, 5, 3));
  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.evictions, 2);
  CHECK_EQ_INT(st.entries, 3);
  CHECK_EQ_INT(st.bytes, 3 * one);

  /* An expired tail is counted as expired, not as an eviction. */
  CHECK_EQ_INT(put(c, 6, NULL, "0123456789", 5000, 1000), 0);
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.evictions, 2);
  CHECK_EQ_INT(st.expired, 1);
  CHECK_EQ_INT(sl_cache__check(c), 0);
  sl_cache_free(c);
}

/* A shadow LRU of (id, size), most recent first, to recompute what the cache must hold. */
typedef struct {
  unsigned id;
  size_t size;
  unsigned version;
} model_t;

static void fill_body(char *buf, size_t n, unsigned id, unsigned version) {
  for (size_t i = 0; i < n; i++)
    buf[i] = (char)('a' + (id * 31 + version * 7 + i) % 26);
}

static void memory_bound_under_fill(void) {
  enum { NKEYS = 300, MAX = 64 * 1024, MAXE = 16 * 1024 };
  sl_cache_t *c = sl_cache_new(MAX, MAXE);
  model_t model[NKEYS];
  size_t nmodel = 0, sum = 0, committed = 0, refused = 0, evicted = 0;
  unsigned versions[NKEYS] = {0};
  char *buf = malloc(MAXE * 2), *expect = malloc(MAXE * 2);
  uint64_t total = 0;
  int bad_bound = 0, bad_sum = 0, bad_check = 0, bad_presence = 0;

  while (total < 100ull * MAX) {
    unsigned id = (unsigned)(rnd() % NKEYS);
    unsigned ver = ++versions[id];
    size_t len = (size_t)(rnd() % (MAXE + MAXE / 4)); /* some over the entry limit */
    if (rnd() % 4 == 0) len = (size_t)(rnd() % 256);
    fill_body(buf, len, id, ver);
    sl_cache_key_t k = key_of(id);
    sl_cache_entry_t *e = sl_cache_entry_new(c, &k, (id & 1) ? "odd" : "even");
    sl_cache_entry_set_head(e, 200, "x: y\r\n", 6);
    bool ok = true;
    for (size_t off = 0; off < len && ok;) {
      size_t n = 1 + (size_t)(rnd() % 4096);
      n = SL_MIN(n, len - off);
      ok = sl_cache_entry_append(e, buf + off, n);
      off += n;
    }
    if (!ok) {
      sl_cache_entry_abandon(e);
      refused++;
      continue;
    }
    size_t size = sl_cache_entry_bytes(e);
    int rc = sl_cache_commit(c, e, 0, 1000000);
    if (size > MAXE) {
      CHECK_EQ_INT(rc, -1);
      refused++;
      continue;
    }
    CHECK_EQ_INT(rc, 0);
    committed++;
    total += size;
    for (size_t i = 0; i < nmodel; i++) {
      if (model[i].id == id) {
        sum -= model[i].size;
        memmove(&model[i], &model[i + 1], (nmodel - i - 1) * sizeof(model[0]));
        nmodel--;
        break;
      }
    }
    while (sum + size > MAX) {
      sum -= model[--nmodel].size;
      evicted++;
    }
    memmove(&model[1], &model[0], nmodel * sizeof(model[0]));
    model[0] = (model_t){id, size, ver};
    nmodel++;
    sum += size;

    sl_cache_stats_t st;
    sl_cache_stats(c, &st);
    bad_bound += st.bytes > MAX;
    bad_sum += st.bytes != sum || st.entries != nmodel;
    bad_check += sl_cache__check(c) != 0;

    /* Probe a key; a hit moves it to the front, in the model too. */
    if (rnd() % 3 == 0) {
      unsigned pid = (unsigned)(rnd() % NKEYS);
      size_t at = nmodel;
      for (size_t i = 0; i < nmodel; i++)
        if (model[i].id == pid) at = i;
      sl_cache_key_t pk = key_of(pid);
      sl_cache_entry_t *r = sl_cache_lookup(c, &pk, 1);
      if ((r != NULL) != (at < nmodel)) {
        bad_presence++;
      } else if (r) {
        size_t blen = sl_cache_entry_body_len(r);
        fill_body(expect, blen, pid, model[at].version);
        expect[blen] = '\0';
        CHECK(body_is(r, expect));
        CHECK_EQ_INT(sl_cache_entry_bytes(r), model[at].size);
        model_t m = model[at];
        memmove(&model[1], &model[0], at * sizeof(model[0]));
        model[0] = m;
      }
      sl_cache_entry_unref(r);
    }
  }
  CHECK_EQ_INT(bad_bound, 0);
  CHECK_EQ_INT(bad_sum, 0);
  CHECK_EQ_INT(bad_check, 0);
  CHECK_EQ_INT(bad_presence, 0);
  printf("fill: %zu committed, %zu refused, %zu evicted, %llu bytes through a %d-byte cache\n",
         committed, refused, evicted, (unsigned long long)total, MAX);
  CHECK(committed > 100);
  CHECK(refused > 10);
  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.evictions, evicted);
  CHECK_EQ_INT(st.inserts, committed);

  /* Shrinking the bound on reload evicts at once. */
  sl_cache_set_limits(c, MAX / 4, 0);
  sl_cache_stats(c, &st);
  CHECK(st.bytes <= MAX / 4);
  CHECK_EQ_INT(st.max_bytes, MAX / 4);
  CHECK_EQ_INT(sl_cache__check(c), 0);
  free(buf);
  free(expect);
  sl_cache_free(c);
}

static void oversize_refused(void) {
  char big[3000];
  memset(big, 'x', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';

  /* max_entry 0 means max/8 = 1250. */
  sl_cache_t *c = sl_cache_new(10000, 0);
  CHECK_EQ_INT(put(c, 1, NULL, big + 2200, 0, 100), 0); /* 799 bytes + overhead fits */
  sl_cache_purge_all(c);
  CHECK_EQ_INT(put(c, 1, NULL, big + 1000, 0, 100), -1); /* 1999 bytes: append refuses */

  /* A head over the limit: append refuses, commit refuses and counts it. */
  sl_cache_key_t k = key_of(2);
  sl_cache_entry_t *e = sl_cache_entry_new(c, &k, NULL);
  sl_cache_entry_set_head(e, 200, big, 2000);
  CHECK(!sl_cache_entry_append(e, "x", 1));
  CHECK_EQ_INT(sl_cache_commit(c, e, 0, 100), -1);
  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.refused, 1);
  CHECK_EQ_INT(st.entries, 0);
  CHECK_EQ_INT(st.bytes, 0);
  sl_cache_free(c);

  /* max_entry above max_bytes is clamped to it. */
  c = sl_cache_new(1000, 5000);
  CHECK_EQ_INT(put(c, 1, NULL, big + 1500, 0, 100), -1);
  CHECK_EQ_INT(put(c, 1, NULL, "small", 0, 100), 0);
  CHECK_EQ_INT(sl_cache__check(c), 0);
  sl_cache_free(c);

  /* A refused replacement leaves the older entry in place. */
  c = sl_cache_new(1 << 20, 0);
  CHECK_EQ_INT(put(c, 7, NULL, "old", 0, 100), 0);
  k = key_of(7);
  e = sl_cache_entry_new(c, &k, NULL);
  CHECK(sl_cache_entry_append(e, "new", 3));
  CHECK_EQ_INT(sl_cache_commit(c, e, 0, 0), -1);
  sl_cache_entry_t *r = sl_cache_lookup(c, &k, 1);
  CHECK(r && body_is(r, "old"));
  sl_cache_entry_unref(r);
  sl_cache_free(c);
}

static void replace_same_key(void) {
  sl_cache_t *c = sl_cache_new(1 << 20, 0);
  CHECK_EQ_INT(put(c, 1, NULL, "version one", 0, 1000), 0);
  sl_cache_key_t k = key_of(1);
  sl_cache_entry_t *old = sl_cache_lookup(c, &k, 1);
  CHECK_EQ_INT(put(c, 1, NULL, "v2", 2, 1000), 0);
  sl_cache_entry_t *cur = sl_cache_lookup(c, &k, 3);
  CHECK(old && body_is(old, "version one"));
  CHECK(cur && body_is(cur, "v2"));
  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.entries, 1);
  CHECK_EQ_INT(st.bytes, sl_cache_entry_bytes(cur));
  CHECK_EQ_INT(st.evictions, 0);
  CHECK_EQ_INT(sl_cache_entry_age_ms(cur, 3), 1);
  sl_cache_entry_unref(old);
  sl_cache_entry_unref(cur);
  CHECK_EQ_INT(sl_cache__check(c), 0);
  sl_cache_free(c);
}

static void reader_outlives_eviction(void) {
  sl_cache_t *c = sl_cache_new(1 << 20, 0);
  size_t one = size_of(c, "t", "aaaaaaaaaaaaaaaaaaaa");
  sl_cache_free(c);
  c = sl_cache_new(one + one / 2, one);
  CHECK_EQ_INT(put(c, 1, "t", "aaaaaaaaaaaaaaaaaaaa", 0, 1000), 0);
  sl_cache_key_t k1 = key_of(1);
  sl_cache_entry_t *r = sl_cache_lookup(c, &k1, 0);
  CHECK(r != NULL);
  CHECK_EQ_INT(put(c, 2, "t", "bbbbbbbbbbbbbbbbbbbb", 0, 1000), 0); /* evicts 1 */
  CHECK(!has(c, 1, 0));
  CHECK(r && body_is(r, "aaaaaaaaaaaaaaaaaaaa"));
  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.entries, 1);
  CHECK_EQ_INT(st.bytes, one);

  /* Purged and then the whole cache freed: readers still hold valid entries. */
  sl_cache_key_t k2 = key_of(2);
  sl_cache_entry_t *r2 = sl_cache_lookup(c, &k2, 0);
  CHECK_EQ_INT(sl_cache_purge_tag(c, "t"), 1);
  sl_cache_free(c);
  CHECK(r2 && body_is(r2, "bbbbbbbbbbbbbbbbbbbb"));
  CHECK(r && body_is(r, "aaaaaaaaaaaaaaaaaaaa"));
  sl_cache_entry_unref(r);
  sl_cache_entry_unref(r2);
}

static void purge(void) {
  sl_cache_t *c = sl_cache_new(1 << 20, 0);
  CHECK_EQ_INT(put(c, 1, "chat", "1", 0, 1000), 0);
  CHECK_EQ_INT(put(c, 2, "chat", "2", 0, 1000), 0);
  CHECK_EQ_INT(put(c, 3, "models", "3", 0, 1000), 0);
  CHECK_EQ_INT(put(c, 4, NULL, "4", 0, 1000), 0);
  CHECK_EQ_INT(put(c, 5, "cha", "5", 0, 1000), 0);
  CHECK_EQ_INT(put(c, 6, "chat", "6", 0, 1000), 0);
  sl_cache_key_t k = key_of(1);
  CHECK_EQ_INT(sl_cache_purge_key(c, &k), 1);
  CHECK_EQ_INT(sl_cache_purge_key(c, &k), 0);
  CHECK(!has(c, 1, 1));
  CHECK_EQ_INT(sl_cache_purge_tag(c, NULL), 0);
  CHECK_EQ_INT(sl_cache_purge_tag(c, "chat"), 2);
  CHECK_EQ_INT(sl_cache_purge_tag(c, "chat"), 0);
  CHECK(has(c, 3, 1) && has(c, 4, 1) && has(c, 5, 1));
  CHECK_EQ_INT(sl_cache__check(c), 0);
  CHECK_EQ_INT(sl_cache_purge_all(c), 3);
  sl_cache_stats_t st;
  sl_cache_stats(c, &st);
  CHECK_EQ_INT(st.entries, 0);
  CHECK_EQ_INT(st.bytes, 0);
  CHECK_EQ_INT(st.purged, 6);
  CHECK_EQ_INT(sl_cache__check(c), 0);
  sl_cache_free(c);
}

static void chunk_boundaries(void) {
  static const char *chunks[] = {"data: {\"a\":1}\n\n", "data: {\"b\":22}\n\n", "x",
                                 "data: [DONE]\n\n"};
  sl_cache_t *c = sl_cache_new(1 << 20, 0);
  sl_cache_key_t k = key_of(9);
  sl_cache_entry_t *e = sl_cache_entry_new(c, &k, NULL);
  sl_cache_entry_set_head(e, 200, "content-type: text/event-stream\r\n", 33);
  size_t total = 0;
  for (size_t i = 0; i < SL_ARRAY_SIZE(chunks); i++) {
    CHECK(sl_cache_entry_append(e, chunks[i], strlen(chunks[i])));
    CHECK(sl_cache_entry_append(e, "", 0)); /* empty appends leave no chunk */
    total += strlen(chunks[i]);
  }
  CHECK_EQ_INT(sl_cache_commit(c, e, 0, 1000), 0);
  sl_cache_entry_t *r = sl_cache_lookup(c, &k, 1);
  CHECK(r != NULL);
  if (r) {
    CHECK_EQ_INT(sl_cache_entry_nchunks(r), SL_ARRAY_SIZE(chunks));
    CHECK_EQ_INT(sl_cache_entry_body_len(r), total);
    for (size_t i = 0; i < SL_ARRAY_SIZE(chunks); i++) {
      size_t len;
      const char *p = sl_cache_entry_chunk(r, i, &len);
      CHECK(len == strlen(chunks[i]) && memcmp(p, chunks[i], len) == 0);
    }
    sl_cache_entry_unref(r);
  }

  /* Many tiny appends: each kept, and the table grows past its initial buckets. */
  e = sl_cache_entry_new(c, &k, NULL);
  for (int i = 0; i < 1000; i++)
    CHECK(sl_cache_entry_append(e, &"ab"[i & 1], 1));
  CHECK_EQ_INT(sl_cache_commit(c, e, 0, 1000), 0);
  for (unsigned id = 100; id < 400; id++)
    CHECK_EQ_INT(put(c, id, NULL, "z", 0, 1000), 0);
  r = sl_cache_lookup(c, &k, 1);
  CHECK(r && sl_cache_entry_nchunks(r) == 1000);
  if (r) {
    size_t len;
    const char *p = sl_cache_entry_chunk(r, 999, &len);
    CHECK(len == 1 && *p == 'b');
  }
  sl_cache_entry_unref(r);
  for (unsigned id = 100; id < 400; id++)
    CHECK(has(c, id, 1));
  CHECK_EQ_INT(sl_cache__check(c), 0);
  sl_cache_free(c);
}

static sl_cache_key_t key2(const char *t1, const char *v1, const char *t2, const char *v2) {
  sl_cache_keyb_t kb;
  sl_cache_key_t k;
  sl_cache_keyb_init(&kb);
  sl_cache_keyb_add(&kb, t1, v1, strlen(v1));
  if (t2) sl_cache_keyb_add(&kb, t2, v2, strlen(v2));
  sl_cache_keyb_final(&kb, &k);
  return k;
}

static bool key_eq(sl_cache_key_t a, sl_cache_key_t b) { return memcmp(a.b, b.b, 32) == 0; }

static void key_builder(void) {
  CHECK(key_eq(key2("path", "ab", "body", "c"), key2("path", "ab", "body", "c")));
  CHECK(!key_eq(key2("path", "ab", "body", "c"), key2("path", "a", "body", "bc")));
  CHECK(!key_eq(key2("path", "x", NULL, NULL), key2("host", "x", NULL, NULL)));
  CHECK(!key_eq(key2("a", "bc", NULL, NULL), key2("ab", "c", NULL, NULL)));
  CHECK(!key_eq(key2("auth", "", "host", "h"), key2("host", "h", NULL, NULL)));
  CHECK(!key_eq(key2("a", "b", "c", "d"), key2("c", "d", "a", "b")));

  sl_cache_key_t k = key2("method", "GET", "path", "/v1/models");
  char hex[65];
  sl_cache_key_hex(&k, hex);
  CHECK_EQ_INT(strlen(hex), 64);
  sl_cache_key_t back;
  CHECK_EQ_INT(sl_cache_key_parse_hex(hex, 64, &back), 0);
  CHECK(key_eq(k, back));
  for (int i = 0; i < 64; i++)
    if (hex[i] >= 'a') hex[i] = (char)(hex[i] - 'a' + 'A');
  memset(&back, 0, sizeof(back));
  CHECK_EQ_INT(sl_cache_key_parse_hex(hex, 64, &back), 0);
  CHECK(key_eq(k, back));
  CHECK_EQ_INT(sl_cache_key_parse_hex(hex, 63, &back), -1);
  hex[10] = 'g';
  CHECK_EQ_INT(sl_cache_key_parse_hex(hex, 64, &back), -1);

  sl_cache_key_t z;
  memset(&z, 0, sizeof(z));
  sl_cache_key_hex(&z, hex);
  CHECK_EQ_STR(hex, "0000000000000000000000000000000000000000000000000000000000000000");
}

TEST_MAIN(T(hit_and_miss), T(ttl_expiry), T(lru_order), T(memory_bound_under_fill),
          T(oversize_refused), T(replace_same_key), T(reader_outlives_eviction), T(purge),
          T(chunk_boundaries), T(key_builder))
