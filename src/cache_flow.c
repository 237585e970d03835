#include "cache_flow.h"

#include "http1.h"
#include "json_canon.h"
#include "log.h"
#include "policy.h"
#include "server.h"
#include "telemetry.h"

#include <stdio.h>
#include <stdlib.h>

#define FLAG_CHUNKED 1u /* the body was streamed: replay it chunk by chunk */
#define AGE_SHIFT 1     /* the upstream's Age (seconds) is kept in the flags above bit 0 */

/* A miss in flight that identical requests wait for. Owned by its leader exchange. */
typedef struct sl_cfill {
  sl_list_t link;    /* in worker->cache_fills[bucket] */
  sl_list_t waiters; /* sl_exchange_t.cwait */
  sl_cache_key_t key;
  sl_exchange_t *leader;
} sl_cfill_t;

static sl_worker_t *W(const sl_exchange_t *x) { return x->conn->w; }

static sl_list_t *bucket(sl_worker_t *w, const sl_cache_key_t *k) {
  return &w->cache_fills[k->b[0] % SL_ARRAY_SIZE(w->cache_fills)];
}

static sl_cfill_t *fill_find(sl_worker_t *w, const sl_cache_key_t *k) {
  sl_list_t *h = bucket(w, k);
  for (sl_list_t *l = h->next; l != h; l = l->next) {
    sl_cfill_t *f = SL_CONTAINER_OF(l, sl_cfill_t, link);
    if (memcmp(f->key.b, k->b, sizeof(k->b)) == 0) return f;
  }
  return NULL;
}

/* Request side ----------------------------------------------------------------------------- */

/* Cache-Control directives as comma-separated tokens; max-age in ms (UINT32_MAX if absent). */
typedef struct cache_control {
  bool no_store, no_cache, private_;
  uint32_t max_age_ms, s_maxage_ms;
} cache_control_t;

static uint32_t cc_seconds(const char *p, const char *end) {
  uint64_t v = 0;
  if (p < end && *p == '"') p++;
  if (p == end || *p < '0' || *p > '9') return UINT32_MAX;
  for (; p < end && *p >= '0' && *p <= '9'; p++) v = SL_MIN(v * 10 + (uint64_t)(*p - '0'), 4000000u);
  return (uint32_t)(v * 1000);
}

static void cc_parse(const char *s, size_t len, cache_control_t *cc) {
  const char *p = s, *end = s + len;
  while (p < end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == ',')) p++;
    const char *t = p;
    while (p < end && *p != ',' && *p != '=' && *p != ' ') p++;
    size_t n = (size_t)(p - t);
    const char *val = NULL;
    if (p < end && *p == '=') val = ++p;
    while (p < end && *p != ',') p++;
    if (sl_strieq(t, n, "no-store")) cc->no_store = true;
    else if (sl_strieq(t, n, "no-cache")) cc->no_cache = true;
    else if (sl_strieq(t, n, "private")) cc->private_ = true;
    else if (sl_strieq(t, n, "max-age") && val) cc->max_age_ms = cc_seconds(val, p);
    else if (sl_strieq(t, n, "s-maxage") && val) cc->s_maxage_ms = cc_seconds(val, p);
  }
}

static const char *req_header(const sl_http_req_t *r, const char *name, size_t *len) {
  int i = sl_http_req_find(r, name);
  if (i < 0) return NULL;
  *len = r->headers[i].value_len;
  return sl_http_req_str(r, r->headers[i].value_off);
}

/* Asks the route's cache policy: 1 = cache (with *custom, malloc'd, as the request part of the
 * key when the policy returned a string), 0 = do not cache, -1 = the policy failed. */
static int ask_policy(sl_exchange_t *x, uint32_t route_idx, char **custom, size_t *custom_len,
                      char *err, size_t errlen) {
  int ref = x->gen->route_cache_key ? x->gen->route_cache_key[route_idx] : -1;
  if (ref < 0) return 1;
  return sl_policy_cache_key(W(x), ref, &x->conn->req, x->request_id,
                             x->route->cache->policy, custom, custom_len, err, errlen);
}

static void build_key(sl_exchange_t *x, const char *custom, size_t custom_len) {
  const sl_http_req_t *r = &x->conn->req;
  const sl_route_cache_conf_t *rc = x->route->cache;
  sl_cache_keyb_t kb;
  sl_cache_keyb_init(&kb);
  sl_cache_keyb_add(&kb, "route", x->route->path, strlen(x->route->path));
  /* HEAD is answered from the GET entry (HEAD responses have no body to store). */
  const char *m = sl_http_method_str(r->method == HTTP_HEAD ? HTTP_GET : r->method);
  sl_cache_keyb_add(&kb, "method", m, strlen(m));
  size_t n = 0;
  const char *host = r->host_idx >= 0 ? sl_http_req_str(r, r->headers[r->host_idx].value_off) : "";
  if (r->host_idx >= 0) n = r->headers[r->host_idx].value_len;
  char lower[256];
  size_t hn = SL_MIN(n, sizeof(lower));
  for (size_t i = 0; i < hn; i++) lower[i] = (char)(host[i] | (host[i] >= 'A' && host[i] <= 'Z' ? 0x20 : 0));
  sl_cache_keyb_add(&kb, "host", lower, hn);
  if (custom) {
    sl_cache_keyb_add(&kb, "policy", custom, custom_len);
  } else {
    sl_cache_keyb_add(&kb, "target", sl_http_req_url(r), r->url_len);
    sl_buf_t canon;
    sl_buf_init(&canon);
    if (rc->json_canonical && r->body.len &&
        sl_json_canon(r->body.data, r->body.len, (const char *const *)rc->json_ignore,
                      rc->njson_ignore, &canon) == 0)
      sl_cache_keyb_add(&kb, "json", canon.data, canon.len);
    else
      sl_cache_keyb_add(&kb, "body", r->body.data ? r->body.data : "", r->body.len);
    sl_buf_free(&canon);
  }
  if (rc->authorization) {
    const char *a = req_header(r, "authorization", &n);
    sl_cache_keyb_add(&kb, a ? "auth" : "no-auth", a ? a : "", a ? n : 0);
  }
  if (x->route->hook) { /* what the hook decided shapes the upstream request */
    const char *pool = x->pool_idx >= 0 ? x->gen->cfg->pools[x->pool_idx].name : "";
    sl_cache_keyb_add(&kb, "pool", pool, strlen(pool));
    if (x->edits.path) sl_cache_keyb_add(&kb, "upstream-target", x->edits.path, x->edits.path_len);
    for (uint32_t i = 0; i < x->edits.n; i++) {
      const sl_hedit_t *e = &x->edits.v[i];
      sl_cache_keyb_add(&kb, e->value ? "set" : "remove", e->name, e->name_len);
      if (e->value) sl_cache_keyb_add(&kb, "value", e->value, e->value_len);
    }
  }
  for (uint32_t i = 0; i < rc->nkey_headers; i++) {
    const char *v = req_header(r, rc->key_headers[i], &n);
    sl_cache_keyb_add(&kb, rc->key_headers[i], v ? v : "", v ? n : 0);
    sl_cache_keyb_add(&kb, v ? "present" : "absent", "", 0);
  }
  sl_cache_keyb_final(&kb, &x->ckey);
}

/* One line of a response head as the gateway keeps it ("Name: value\r\n" lines): the line is
 * [p, next), its name [p, p + nlen) when it has a colon. */
typedef struct head_line {
  const char *p, *next, *colon;
  size_t nlen;
} head_line_t;

static bool next_head_line(const char **cur, const char *end, head_line_t *l) {
  if (*cur >= end) return false;
  const char *eol = memchr(*cur, '\n', (size_t)(end - *cur));
  l->p = *cur;
  l->next = eol ? eol + 1 : end;
  l->colon = memchr(l->p, ':', (size_t)(l->next - l->p));
  l->nlen = l->colon ? (size_t)(l->colon - l->p) : 0;
  *cur = l->next;
  return true;
}

/* The value of header `name` in a stored head, or NULL. */
static const char *head_value(const char *head, size_t hl, const char *name, size_t *vlen) {
  size_t nl = strlen(name);
  head_line_t l;
  for (const char *cur = head; next_head_line(&cur, head + hl, &l);) {
    if (!l.colon || l.nlen != nl || !sl_strieq(l.p, nl, name)) continue;
    const char *v = l.colon + 1, *ve = l.next;
    while (v < ve && (*v == ' ' || *v == '\t')) v++;
    while (ve > v && (ve[-1] == '\n' || ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
    *vlen = (size_t)(ve - v);
    return v;
  }
  return NULL;
}

/* Whether an If-None-Match list names the stored entity tag, by weak comparison (RFC 9110
 * 13.1.2: W/ prefixes ignored); "*" matches any stored representation. */
static bool etag_listed(const char *l, size_t n, const char *etag, size_t en) {
  if (en > 2 && etag[0] == 'W' && etag[1] == '/') etag += 2, en -= 2;
  const char *p = l, *end = l + n;
  while (p < end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == ',')) p++;
    if (p == end) break;
    if (*p == '*') return true;
    if (end - p > 2 && p[0] == 'W' && p[1] == '/') p += 2;
    if (*p != '"') return false; /* malformed: no match, the full response goes out */
    const char *q = memchr(p + 1, '"', (size_t)(end - p - 1));
    if (!q) return false;
    if ((size_t)(q + 1 - p) == en && memcmp(p, etag, en) == 0) return true;
    p = q + 1;
  }
  return false;
}

/* RFC 9111 4.3.2: a conditional GET or HEAD answered from storage gets 304 when its
 * validators match: If-None-Match, else If-Modified-Since equal to the stored Last-Modified
 * (the exact rule nginx applies by default: no date parsing, no clock skew). */
static bool not_modified(const sl_http_req_t *r, const char *head, size_t hl) {
  if (r->method != HTTP_GET && r->method != HTTP_HEAD) return false;
  size_t n = 0, vn = 0;
  const char *inm = req_header(r, "if-none-match", &n);
  if (inm) {
    const char *etag = head_value(head, hl, "etag", &vn);
    return etag && etag_listed(inm, n, etag, vn);
  }
  const char *ims = req_header(r, "if-modified-since", &n);
  const char *lm = ims ? head_value(head, hl, "last-modified", &vn) : NULL;
  return lm && vn == n && memcmp(lm, ims, n) == 0;
}

/* The stored head lines a 304 carries (RFC 9110 15.4.5), appended to h. */
static void append_304_head(sl_buf_t *h, const char *head, size_t hl) {
  static const char *const keep[] = {"cache-control", "content-location", "date", "etag",
                                     "expires",       "last-modified",    "vary"};
  head_line_t l;
  for (const char *cur = head; next_head_line(&cur, head + hl, &l);)
    for (size_t i = 0; l.colon && i < SL_ARRAY_SIZE(keep); i++)
      if (sl_strieq(l.p, l.nlen, keep[i])) sl_buf_append(h, l.p, (size_t)(l.next - l.p));
}

/* Writes a stored response to the client: the original head and body, the framing the
 * original had (chunks replayed as chunks, so an event stream replays as a stream); or a 304
 * when the request's validators match it. */
static void replay(sl_exchange_t *x, sl_cache_entry_t *e, uint8_t result) {
  sl_conn_t *c = x->conn;
  const sl_http_req_t *r = &c->req;
  uint64_t now = sl_worker_now(W(x));
  int status = sl_cache_entry_status(e);
  size_t hl = 0;
  const char *head = sl_cache_entry_head(e, &hl);
  bool nm = status == 200 && not_modified(r, head, hl);
  if (nm) status = 304;
  bool chunked = (sl_cache_entry_flags(e) & FLAG_CHUNKED) && r->http_minor >= 1;
  bool no_body = status == 204 || status == 304;
  size_t body_len = sl_cache_entry_body_len(e), nchunks = sl_cache_entry_nchunks(e);
  bool keep = r->keep_alive && !c->w->draining;

  sl_buf_t h;
  sl_buf_init(&h);
  sl_buf_appends(&h, "HTTP/1.1 ");
  sl_buf_append_u64(&h, (uint64_t)status);
  const char *reason = sl_http_status_reason(status);
  sl_buf_append(&h, " ", 1);
  sl_buf_append2(&h, reason, strlen(reason), "\r\n");
  if (nm) append_304_head(&h, head, hl);
  else sl_buf_append(&h, head, hl);
  if (!no_body) {
    if (chunked) {
      sl_buf_appends(&h, "Transfer-Encoding: chunked\r\n");
    } else {
      sl_buf_appends(&h, "Content-Length: ");
      sl_buf_append_u64(&h, body_len);
      sl_buf_append(&h, "\r\n", 2);
    }
  }
  sl_buf_appends(&h, result == SL_CACHE_HIT ? "x-cache: HIT\r\nage: " : "x-cache: COALESCED\r\nage: ");
  /* RFC 9111 4.2.3: the age the upstream reported plus the time spent here */
  sl_buf_append_u64(&h, (sl_cache_entry_flags(e) >> AGE_SHIFT) + sl_cache_entry_age_ms(e, now) / 1000);
  sl_buf_appends(&h, "\r\nx-request-id: ");
  sl_buf_append2(&h, x->request_id, strlen(x->request_id), "\r\n");
  if (!keep) sl_buf_appends(&h, "Connection: close\r\n");
  else if (r->http_minor == 0) sl_buf_appends(&h, "Connection: keep-alive\r\n");
  sl_buf_append(&h, "\r\n", 2);

  if (x->head_request || no_body) {
    sl_conn_write(c, h.data, h.len);
  } else if (!chunked) {
    /* Head and body in one writev: the body is not copied when the socket takes it. */
    uv_buf_t iov[2] = {uv_buf_init(h.data, (unsigned)h.len), uv_buf_init(NULL, 0)};
    unsigned n = 1;
    if (body_len) {
      size_t l0 = 0;
      const char *b0 = sl_cache_entry_chunk(e, 0, &l0);
      iov[1] = uv_buf_init((char *)b0, (unsigned)body_len); /* chunks are contiguous */
      n = 2;
    }
    sl_conn_writev(c, iov, n);
  } else {
    for (size_t i = 0; i < nchunks; i++) {
      size_t l = 0;
      const char *p = sl_cache_entry_chunk(e, i, &l);
      sl_buf_append_hex(&h, l);
      sl_buf_append(&h, "\r\n", 2);
      sl_buf_append(&h, p, l);
      sl_buf_append(&h, "\r\n", 2);
    }
    sl_buf_append(&h, "0\r\n\r\n", 5);
    sl_conn_write(c, h.data, h.len);
  }
  sl_buf_free(&h);
  sl_route_m_t *rm = sl_route_m(x->gen, x->route);
  if (result == SL_CACHE_HIT) {
    W(x)->stats.cache_hits++;
    sl_m_inc(rm->cache_hits, 1);
  } else {
    W(x)->stats.cache_coalesced++;
    sl_m_inc(rm->cache_coalesced, 1);
  }
  x->bytes_out += h.len + (x->head_request || no_body ? 0 : body_len);
  x->cache_result = result;
  sl_proxy_finish_local(x, status, keep);
}

sl_cache_flow_t sl_cache_flow_begin(sl_exchange_t *x, const sl_route_conf_t *route,
                                    uint32_t route_idx, char *err, size_t errlen) {
  const sl_route_cache_conf_t *rc = route->cache;
  const sl_http_req_t *r = &x->conn->req;
  sl_worker_t *w = W(x);
  x->cache_result = SL_CACHE_BYPASS;
  x->cache_store = false;
  x->cache_max_age_ms = UINT32_MAX;
  if (!(rc->methods & (1u << r->method)) || !w->cache) {
    w->stats.cache_bypass++;
    return SL_FLOW_UPSTREAM;
  }
  cache_control_t cc = {.max_age_ms = UINT32_MAX, .s_maxage_ms = UINT32_MAX};
  size_t n = 0;
  const char *v = req_header(r, "cache-control", &n);
  if (v) cc_parse(v, n, &cc);
  v = req_header(r, "pragma", &n);
  if (v && !req_header(r, "cache-control", &n) && sl_strieq(v, n, "no-cache")) cc.no_cache = true;
  if (cc.no_store) {
    w->stats.cache_bypass++;
    return SL_FLOW_UPSTREAM;
  }
  /* max-age=0 asks for a fresh response; with a millisecond clock an entry stored in the same
   * loop turn would otherwise look 0 ms old and qualify. */
  if (cc.max_age_ms == 0) cc.no_cache = true;

  char *custom = NULL;
  size_t custom_len = 0;
  int pr = ask_policy(x, route_idx, &custom, &custom_len, err, errlen);
  if (pr < 0) return SL_FLOW_ERROR;
  if (pr == 0) {
    w->stats.cache_bypass++;
    return SL_FLOW_UPSTREAM;
  }
  build_key(x, custom, custom_len);
  free(custom);
  x->cache_result = SL_CACHE_MISS;
  x->cache_store = true;
  x->cache_max_age_ms = cc.max_age_ms;

  uint64_t now = sl_worker_now(w);
  if (!cc.no_cache) {
    sl_cache_entry_t *e = sl_cache_lookup(w->cache, &x->ckey, now);
    if (e && sl_cache_entry_age_ms(e, now) <= cc.max_age_ms) {
      replay(x, e, SL_CACHE_HIT);
      sl_cache_entry_unref(e);
      return SL_FLOW_DONE;
    }
    sl_cache_entry_unref(e);
  }
  sl_cfill_t *f = rc->coalesce ? fill_find(w, &x->ckey) : NULL;
  if (f) { /* an identical request is in flight: wait for its response */
    x->cfill = f;
    sl_list_insert_tail(&f->waiters, &x->cwait);
    x->phase = SL_X_COALESCED;
    return SL_FLOW_WAIT;
  }
  w->stats.cache_misses++;
  sl_m_inc(sl_route_m(x->gen, route)->cache_misses, 1);
  if (rc->coalesce) {
    f = sl_calloc(1, sizeof(*f));
    f->key = x->ckey;
    f->leader = x;
    sl_list_init(&f->waiters);
    sl_list_insert_tail(bucket(w, &f->key), &f->link);
    x->cfill = f;
  }
  return SL_FLOW_UPSTREAM;
}

/* Response side ---------------------------------------------------------------------------- */

static bool vary_covered(const sl_exchange_t *x, const char *v, size_t len) {
  const sl_route_cache_conf_t *rc = x->route->cache;
  const char *p = v, *end = v + len;
  while (p < end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == ',')) p++;
    const char *t = p;
    while (p < end && *p != ',' && *p != ' ' && *p != '\t') p++;
    size_t n = (size_t)(p - t);
    if (!n) continue;
    bool ok = rc->authorization && sl_strieq(t, n, "authorization");
    for (uint32_t i = 0; !ok && i < rc->nkey_headers; i++) ok = sl_strieq(t, n, rc->key_headers[i]);
    if (!ok) return false; /* includes "*" */
  }
  return true;
}

/* Why a response is not stored, or NULL when it may be (ttl set). */
static const char *storable(sl_exchange_t *x, int status, bool chunked, uint32_t *ttl) {
  const sl_route_cache_conf_t *rc = x->route->cache;
  if (!sl_route_cache_status(rc, status)) return "status";
  if (x->head_request) return "HEAD";
  size_t n = 0;
  cache_control_t cc = {.max_age_ms = UINT32_MAX, .s_maxage_ms = UINT32_MAX};
  const char *v = sl_proxy_response_header(x, "cache-control", &n);
  if (v) cc_parse(v, n, &cc);
  /* Event streams routinely say no-cache (meaning: do not buffer); a route that opted into
   * storing streams stores them anyway. no-store and private are always respected. */
  bool sse = false;
  v = sl_proxy_response_header(x, "content-type", &n);
  if (v && n >= 17 && sl_strieq(v, 17, "text/event-stream")) sse = true;
  if (cc.no_store || cc.private_ || (cc.no_cache && !(sse && rc->stream))) return "Cache-Control";
  if (sl_proxy_response_header(x, "set-cookie", &n)) return "Set-Cookie";
  v = sl_proxy_response_header(x, "vary", &n);
  if (v && !vary_covered(x, v, n)) return "Vary";
  if (chunked && !rc->stream) return "streamed";
  uint32_t t = rc->ttl_ms;
  uint32_t up = cc.s_maxage_ms != UINT32_MAX ? cc.s_maxage_ms : cc.max_age_ms;
  if (up != UINT32_MAX) t = SL_MIN(t, up);
  if (!t) return "max-age=0";
  *ttl = t;
  return NULL;
}

void sl_cache_flow_head(sl_exchange_t *x, int status, const char *head, size_t len, bool chunked,
                        sl_buf_t *out) {
  if (x->cache_result == SL_CACHE_NONE) return;
  if (x->cache_result == SL_CACHE_BYPASS) {
    sl_buf_appends(out, "x-cache: BYPASS\r\n");
    return;
  }
  sl_buf_appends(out, "x-cache: MISS\r\nx-cache-key: ");
  char hex[65];
  sl_cache_key_hex(&x->ckey, hex);
  sl_buf_append2(out, hex, 64, "\r\n");
  uint32_t ttl = 0;
  const char *why = x->cache_store ? storable(x, status, chunked, &ttl) : "client";
  if (why) {
    SL_DEBUG("request %s: response not cached (%s)", x->request_id, why);
    return;
  }
  x->cache_ttl_ms = ttl;
  x->centry = sl_cache_entry_new(W(x)->cache, &x->ckey, x->route->path);
  /* The stored head leaves out what replay writes itself (Age, x-cache). */
  sl_buf_t kept;
  sl_buf_init(&kept);
  uint32_t age = 0;
  head_line_t l;
  for (const char *cur = head; next_head_line(&cur, head + len, &l);) {
    if (l.nlen == 3 && sl_strieq(l.p, 3, "age")) {
      uint32_t a = cc_seconds(l.colon + 1 + (l.colon[1] == ' '), l.next);
      if (a != UINT32_MAX) age = SL_MIN(a / 1000, 1u << 30);
    } else if (!(l.nlen == 7 && sl_strieq(l.p, 7, "x-cache")) &&
               !(l.nlen == 11 && sl_strieq(l.p, 11, "x-cache-key"))) {
      sl_buf_append(&kept, l.p, (size_t)(l.next - l.p));
    }
  }
  sl_cache_entry_set_head(x->centry, (uint16_t)status, kept.data ? kept.data : "", kept.len);
  sl_buf_free(&kept);
  sl_cache_entry_set_flags(x->centry, (chunked ? FLAG_CHUNKED : 0) | age << AGE_SHIFT);
}

void sl_cache_flow_body(sl_exchange_t *x, const char *p, size_t n) {
  if (!x->centry || !n) return;
  if (!sl_cache_entry_append(x->centry, p, n)) {
    SL_DEBUG("request %s: response too large to cache", x->request_id);
    sl_cache_entry_abandon(x->centry);
    x->centry = NULL;
  }
}

void sl_cache_flow_attempt_failed(sl_exchange_t *x) {
  if (!x->centry) return;
  sl_cache_entry_abandon(x->centry);
  x->centry = NULL;
}

/* Detaches a fill from the map and its leader; returns its waiters in `out`. */
static void fill_close(sl_exchange_t *x, sl_list_t *out) {
  sl_cfill_t *f = x->cfill;
  x->cfill = NULL;
  sl_list_init(out);
  sl_list_remove(&f->link);
  if (!sl_list_empty(&f->waiters)) { /* move the list to `out` */
    out->next = f->waiters.next;
    out->prev = f->waiters.prev;
    out->next->prev = out;
    out->prev->next = out;
  }
  free(f);
}

static sl_exchange_t *pop_waiter(sl_list_t *l) {
  if (sl_list_empty(l)) return NULL;
  sl_exchange_t *w = SL_CONTAINER_OF(l->next, sl_exchange_t, cwait);
  sl_list_remove(&w->cwait);
  w->cfill = NULL;
  uv_timer_stop(w->timer);
  w->phase = SL_X_IDLE;
  return w;
}

/* Waiters of a fill that produced nothing to share go upstream on their own. */
static void release_waiters(sl_list_t *l) {
  sl_exchange_t *w;
  while ((w = pop_waiter(l))) {
    w->cache_result = SL_CACHE_MISS;
    W(w)->stats.cache_misses++;
    sl_m_inc(sl_route_m(w->gen, w->route)->cache_misses, 1);
    sl_proxy_go_upstream(w);
  }
}

void sl_cache_flow_complete(sl_exchange_t *x) {
  sl_cache_entry_t *shared = NULL;
  if (x->centry) {
    sl_cache_entry_t *e = x->centry;
    x->centry = NULL;
    /* commit hands our reference to the table; the waiters' one is taken after it */
    if (sl_cache_commit(W(x)->cache, e, sl_worker_now(W(x)), x->cache_ttl_ms) == 0)
      shared = sl_cache_entry_ref(e);
  }
  if (x->cfill) {
    sl_list_t waiters;
    fill_close(x, &waiters);
    if (shared) {
      sl_exchange_t *w;
      while ((w = pop_waiter(&waiters))) replay(w, shared, SL_CACHE_COALESCED);
    } else {
      release_waiters(&waiters);
    }
  }
  sl_cache_entry_unref(shared);
}

void sl_cache_flow_end(sl_exchange_t *x) {
  sl_cache_flow_attempt_failed(x);
  if (!x->cfill) return;
  if (x->phase == SL_X_COALESCED || x->cfill->leader != x) { /* a waiter leaves */
    sl_list_remove(&x->cwait);
    x->cfill = NULL;
    return;
  }
  sl_list_t waiters;
  fill_close(x, &waiters);
  release_waiters(&waiters);
}

void sl_cache_flow_wait_expired(sl_exchange_t *x) {
  SL_INFO("request %s: waited %u ms for an identical request in flight; going upstream",
          x->request_id, x->route->cache->coalesce_wait_ms);
  sl_list_remove(&x->cwait);
  x->cfill = NULL;
  x->phase = SL_X_IDLE;
  x->cache_result = SL_CACHE_MISS;
  W(x)->stats.cache_misses++;
  sl_m_inc(sl_route_m(x->gen, x->route)->cache_misses, 1);
  sl_proxy_go_upstream(x);
}
