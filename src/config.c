#include "config.h"

#include "log.h"
#include "policy.h"

#include <ctype.h>
#include <errno.h>
#include <lauxlib.h>
#include <llhttp.h>
#include <luajit.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>

static char *read_file(const char *path, size_t *len, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    return NULL;
  }
  sl_buf_t b;
  sl_buf_init(&b);
  char chunk[8192];
  size_t n;
  while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) sl_buf_append(&b, chunk, n);
  bool bad = ferror(f);
  fclose(f);
  if (bad) {
    snprintf(err, errlen, "%s: read error", path);
    sl_buf_free(&b);
    return NULL;
  }
  *len = b.len;
  sl_buf_append(&b, "", 1);
  return sl_buf_steal(&b);
}

/* The config runs with a minimal environment: plain data-building functions and os.getenv for
 * secrets. It is operator-written, but it must not be able to do I/O by accident. */
static const char config_env_src[] =
    "local env = { pairs = pairs, ipairs = ipairs, next = next, type = type, tostring = tostring,"
    "  tonumber = tonumber, select = select, error = error, assert = assert, unpack = unpack,"
    "  string = string, table = table, math = math, os = { getenv = os.getenv } }\n"
    "env._G = env\n"
    "return env\n";

void sl_config_error(lua_State *L, const sl_config_t *cfg, const char *path, const char *msg,
                     char *err, size_t errlen) {
  int top = lua_gettop(L), line = 0;
  /* locate.line(source, path) */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "sluice.locate");
  if (lua_pcall(L, 1, 1, 0) == 0) {
    lua_getfield(L, -1, "line");
    lua_pushlstring(L, cfg->source, cfg->source_len);
    lua_pushstring(L, path);
    if (lua_pcall(L, 2, 1, 0) == 0 && lua_isnumber(L, -1)) line = (int)lua_tointeger(L, -1);
  }
  lua_settop(L, top);
  const char *key = *path ? path : "(top)";
  if (line > 0)
    snprintf(err, errlen, "%s:%d: %s: %s", cfg->file, line, key, msg);
  else
    snprintf(err, errlen, "%s: %s: %s", cfg->file, key, msg);
}

int sl_config_eval(lua_State *L, const sl_config_t *cfg, char *err, size_t errlen) {
  int base = lua_gettop(L);
  char chunkname[1024];
  snprintf(chunkname, sizeof(chunkname), "@%s", cfg->file);
  if (luaL_loadbuffer(L, cfg->source, cfg->source_len, chunkname) != 0) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    lua_settop(L, base);
    return -1;
  }
  /* User code: interpreted, so the instruction budget can stop a runaway loop in it. */
  luaJIT_setmode(L, -1, LUAJIT_MODE_ALLFUNC | LUAJIT_MODE_OFF);
  if (luaL_loadstring(L, config_env_src) != 0 || lua_pcall(L, 0, 1, 0) != 0) {
    snprintf(err, errlen, "%s: internal error preparing config env: %s", cfg->file,
             lua_tostring(L, -1));
    lua_settop(L, base);
    return -1;
  }
  lua_setfenv(L, -2);
  if (sl_lua_pcall(L, 0, 1, err, errlen) != 0) {
    lua_settop(L, base);
    return -1;
  }
  /* validate(cfg) -> normalized | nil, {path, msg} */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "sluice.config");
  if (sl_lua_pcall(L, 1, 1, err, errlen) != 0) {
    lua_settop(L, base);
    return -1;
  }
  lua_getfield(L, -1, "validate");
  lua_pushvalue(L, base + 1);
  if (sl_lua_pcall(L, 1, 2, err, errlen) != 0) {
    lua_settop(L, base);
    return -1;
  }
  if (lua_isnil(L, -2)) {
    lua_getfield(L, -1, "path");
    const char *path = lua_tostring(L, -1);
    lua_getfield(L, -2, "msg");
    const char *msg = lua_tostring(L, -1);
    char m[1024];
    snprintf(m, sizeof(m), "%s", msg ? msg : "invalid");
    char p[256];
    snprintf(p, sizeof(p), "%s", path ? path : "");
    lua_settop(L, base);
    sl_config_error(L, cfg, p, m, err, errlen);
    return -1;
  }
  lua_pop(L, 1);
  lua_replace(L, base + 1);
  lua_settop(L, base + 1);
  return 0;
}

/* Field readers for the normalized table (types already validated). */
static char *get_str(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  char *s = lua_type(L, -1) == LUA_TSTRING ? sl_strdup(lua_tostring(L, -1)) : NULL;
  lua_pop(L, 1);
  return s;
}

static int64_t get_int(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  int64_t v = (int64_t)lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

static bool get_bool(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  bool v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* Pushes t[key] (a subtable) and returns its absolute index. */
static int push_sub(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  return lua_gettop(L);
}

static void read_listen(lua_State *L, int idx, sl_listen_conf_t *l) {
  l->addr = get_str(L, idx, "addr");
  l->host = get_str(L, idx, "host");
  l->port = (uint16_t)get_int(L, idx, "port");
  lua_getfield(L, idx, "tls");
  if (lua_istable(L, -1)) {
    int t = lua_gettop(L);
    l->tls_cert = get_str(L, t, "cert");
    l->tls_key = get_str(L, t, "key");
  }
  lua_pop(L, 1);
}

/* A list of strings (lowercased when `lower`) as a malloc'd array. */
static char **get_str_list(lua_State *L, int idx, const char *key, bool lower, uint32_t *n) {
  lua_getfield(L, idx, key);
  *n = lua_istable(L, -1) ? (uint32_t)lua_objlen(L, -1) : 0;
  char **out = *n ? sl_calloc(*n, sizeof(char *)) : NULL;
  for (uint32_t i = 0; i < *n; i++) {
    lua_rawgeti(L, -1, (int)i + 1);
    out[i] = sl_strdup(lua_tostring(L, -1));
    if (lower)
      for (char *p = out[i]; *p; p++) *p = (char)tolower((unsigned char)*p);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return out;
}

static sl_route_cache_conf_t *read_route_cache(lua_State *L, int t) {
  sl_route_cache_conf_t *rc = sl_calloc(1, sizeof(*rc));
  rc->ttl_ms = (uint32_t)get_int(L, t, "ttl_s") * 1000u;
  uint32_t n = 0;
  char **methods = get_str_list(L, t, "methods", false, &n);
  for (uint32_t i = 0; i < n; i++) {
    for (int m = 0; m < 32; m++) /* the schema allows only methods llhttp numbers below 32 */
      if (strcmp(methods[i], llhttp_method_name((llhttp_method_t)m)) == 0) rc->methods |= 1u << m;
    free(methods[i]);
  }
  free(methods);
  lua_getfield(L, t, "statuses");
  n = (uint32_t)lua_objlen(L, -1);
  for (uint32_t i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, (int)i);
    int s = (int)lua_tointeger(L, -1) - 100;
    rc->statuses[s >> 3] |= (uint8_t)(1u << (s & 7));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  rc->key_headers = get_str_list(L, t, "key_headers", true, &rc->nkey_headers);
  rc->authorization = get_bool(L, t, "authorization");
  rc->stream = get_bool(L, t, "stream");
  rc->coalesce = get_bool(L, t, "coalesce");
  rc->coalesce_wait_ms = (uint32_t)get_int(L, t, "coalesce_wait_ms");
  rc->policy = get_str(L, t, "policy");
  int j = push_sub(L, t, "json");
  rc->json_canonical = get_bool(L, j, "canonical");
  rc->json_ignore = get_str_list(L, j, "ignore", false, &rc->njson_ignore);
  lua_pop(L, 1);
  return rc;
}

static void free_route_cache(sl_route_cache_conf_t *rc) {
  if (!rc) return;
  for (uint32_t i = 0; i < rc->nkey_headers; i++) free(rc->key_headers[i]);
  for (uint32_t i = 0; i < rc->njson_ignore; i++) free(rc->json_ignore[i]);
  free(rc->key_headers);
  free(rc->json_ignore);
  free(rc->policy);
  free(rc);
}

/* File paths in the config are relative to the config file's directory. */
static void resolve_path(const sl_config_t *c, char **p) {
  if (!*p || (*p)[0] == '/') return;
  size_t n = strlen(c->dir) + strlen(*p) + 2;
  char *abs = sl_malloc(n);
  snprintf(abs, n, "%s/%s", c->dir, *p);
  free(*p);
  *p = abs;
}

static void read_pool(lua_State *L, int idx, const char *name, sl_pool_conf_t *p) {
  p->name = sl_strdup(name);
  p->balancer = get_str(L, idx, "balancer");
  p->max_inflight = (uint32_t)get_int(L, idx, "max_inflight");
  p->fallback = get_str(L, idx, "fallback");
  p->preserve_host = get_bool(L, idx, "preserve_host");
  int tt = push_sub(L, idx, "tls");
  p->tls_ca = get_str(L, tt, "ca");
  p->tls_verify = get_bool(L, tt, "verify");
  lua_pop(L, 1);
  int ws = push_sub(L, idx, "websocket");
  p->ws_max_message_bytes = (uint64_t)get_int(L, ws, "max_message_bytes");
  p->ws_idle_timeout_ms = (uint32_t)get_int(L, ws, "idle_timeout_ms");
  p->ws_ping_interval_ms = (uint32_t)get_int(L, ws, "ping_interval_ms");
  lua_pop(L, 1);

  int t = push_sub(L, idx, "queue");
  p->queue_max = (uint32_t)get_int(L, t, "max");
  p->queue_timeout_ms = (uint32_t)get_int(L, t, "timeout_ms");
  lua_pop(L, 1);
  t = push_sub(L, idx, "timeout_ms");
  p->connect_timeout_ms = (uint32_t)get_int(L, t, "connect");
  p->first_byte_timeout_ms = (uint32_t)get_int(L, t, "first_byte");
  p->total_timeout_ms = (uint32_t)get_int(L, t, "total");
  lua_pop(L, 1);
  t = push_sub(L, idx, "keepalive");
  p->keepalive_max_idle = (uint32_t)get_int(L, t, "max_idle");
  p->keepalive_idle_timeout_ms = (uint32_t)get_int(L, t, "idle_timeout_ms");
  lua_pop(L, 1);

  lua_getfield(L, idx, "retry");
  if (lua_istable(L, -1)) {
    t = lua_gettop(L);
    p->retry_enabled = true;
    p->retry_policy = get_str(L, t, "policy");
    p->retry_attempts = (uint32_t)get_int(L, t, "attempts");
    p->retry_per_try_timeout_ms = (uint32_t)get_int(L, t, "per_try_timeout_ms");
    p->retry_max_body_bytes = (uint64_t)get_int(L, t, "max_body_bytes");
    lua_getfield(L, t, "retry_on");
    int n = (int)lua_objlen(L, -1);
    for (int i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, i);
      if (lua_type(L, -1) == LUA_TNUMBER) {
        int s = (int)lua_tointeger(L, -1) - 400;
        p->retry_status[s >> 3] |= (uint8_t)(1u << (s & 7));
      } else {
        const char *k = lua_tostring(L, -1);
        if (!strcmp(k, "connect_error")) p->retry_kinds |= SL_RETRY_CONNECT_ERROR;
        else if (!strcmp(k, "connect_timeout")) p->retry_kinds |= SL_RETRY_CONNECT_TIMEOUT;
        else if (!strcmp(k, "reset")) p->retry_kinds |= SL_RETRY_RESET;
        else if (!strcmp(k, "timeout")) p->retry_kinds |= SL_RETRY_TIMEOUT;
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_getfield(L, idx, "breaker");
  if (lua_istable(L, -1)) {
    t = lua_gettop(L);
    p->breaker_enabled = true;
    p->breaker_policy = get_str(L, t, "policy");
    p->breaker_probes = (uint32_t)get_int(L, t, "half_open_probes");
    lua_getfield(L, t, "max_ejected_share");
    p->breaker_max_ejected_share = lua_tonumber(L, -1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  t = push_sub(L, idx, "endpoints");
  p->nendpoints = (uint32_t)lua_objlen(L, t);
  p->endpoints = sl_calloc(p->nendpoints, sizeof(sl_endpoint_conf_t));
  for (uint32_t i = 0; i < p->nendpoints; i++) {
    lua_rawgeti(L, t, (int)i + 1);
    int e = lua_gettop(L);
    sl_endpoint_conf_t *ec = &p->endpoints[i];
    ec->url = get_str(L, e, "url");
    ec->host = get_str(L, e, "host");
    ec->path = get_str(L, e, "path");
    ec->port = (uint16_t)get_int(L, e, "port");
    ec->weight = (uint32_t)get_int(L, e, "weight");
    ec->tls = get_bool(L, e, "tls");
    ec->websocket = get_bool(L, e, "websocket");
    p->websocket |= ec->websocket;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static int cmp_pool(const void *a, const void *b) {
  return strcmp(((const sl_pool_conf_t *)a)->name, ((const sl_pool_conf_t *)b)->name);
}

static void extract(lua_State *L, int idx, sl_config_t *c) {
  int t = push_sub(L, idx, "listen");
  c->nlisten = (uint32_t)lua_objlen(L, t);
  c->listen = sl_calloc(c->nlisten, sizeof(sl_listen_conf_t));
  for (uint32_t i = 0; i < c->nlisten; i++) {
    lua_rawgeti(L, t, (int)i + 1);
    read_listen(L, lua_gettop(L), &c->listen[i]);
    resolve_path(c, &c->listen[i].tls_cert);
    resolve_path(c, &c->listen[i].tls_key);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);

  lua_getfield(L, idx, "admin");
  if (lua_istable(L, -1)) {
    read_listen(L, lua_gettop(L), &c->admin);
    c->admin_token = get_str(L, lua_gettop(L), "token");
  }
  lua_pop(L, 1);

  c->workers = (uint32_t)get_int(L, idx, "workers");
  char *pol = get_str(L, idx, "policies");
  if (pol[0] == '/') {
    c->policies_dir = pol;
  } else {
    size_t n = strlen(c->dir) + strlen(pol) + 2;
    c->policies_dir = sl_malloc(n);
    snprintf(c->policies_dir, n, "%s/%s", c->dir, pol);
    free(pol);
  }
  char *lvl = get_str(L, idx, "log_level");
  c->log_level = sl_log_level_parse(lvl);
  free(lvl);
  c->access_log = get_str(L, idx, "access_log");
  c->watch = get_bool(L, idx, "watch");
  t = push_sub(L, idx, "lua");
  c->lua_jit = get_bool(L, t, "jit");
  c->lua_budget = (uint64_t)get_int(L, t, "instruction_budget");
  lua_pop(L, 1);

  t = push_sub(L, idx, "limits");
  c->limits.max_header_bytes = (uint32_t)get_int(L, t, "max_header_bytes");
  c->limits.max_headers = (uint32_t)get_int(L, t, "max_headers");
  c->limits.max_body_bytes = (uint64_t)get_int(L, t, "max_body_bytes");
  c->header_timeout_ms = (uint32_t)get_int(L, t, "header_timeout_ms");
  c->idle_timeout_ms = (uint32_t)get_int(L, t, "idle_timeout_ms");
  c->drain_timeout_ms = (uint32_t)get_int(L, t, "drain_timeout_ms");
  lua_pop(L, 1);
  t = push_sub(L, idx, "cache");
  c->cache_max_bytes = (uint64_t)get_int(L, t, "max_bytes");
  c->cache_max_entry_bytes = (uint64_t)get_int(L, t, "max_entry_bytes");
  lua_pop(L, 1);

  t = push_sub(L, idx, "pools");
  lua_pushnil(L);
  while (lua_next(L, t)) c->npools++, lua_pop(L, 1);
  c->pools = sl_calloc(c->npools, sizeof(sl_pool_conf_t));
  uint32_t i = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    sl_pool_conf_t *pc = &c->pools[i++];
    read_pool(L, lua_gettop(L), lua_tostring(L, -2), pc);
    resolve_path(c, &pc->tls_ca);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  /* Pools in name order: deterministic iteration for logs, status and tests. */
  qsort(c->pools, c->npools, sizeof(sl_pool_conf_t), cmp_pool);

  t = push_sub(L, idx, "routes");
  c->nroutes = (uint32_t)lua_objlen(L, t);
  c->routes = sl_calloc(c->nroutes, sizeof(sl_route_conf_t));
  for (i = 0; i < c->nroutes; i++) {
    lua_rawgeti(L, t, (int)i + 1);
    int r = lua_gettop(L);
    c->routes[i].path = get_str(L, r, "path");
    c->routes[i].host = get_str(L, r, "host");
    c->routes[i].pool = get_str(L, r, "pool");
    c->routes[i].pool_idx = (uint32_t)sl_config_pool_index(c, c->routes[i].pool);
    lua_getfield(L, r, "cache");
    if (lua_istable(L, -1)) c->routes[i].cache = read_route_cache(L, lua_gettop(L));
    lua_pop(L, 1);
    lua_getfield(L, r, "hook");
    if (lua_istable(L, -1)) {
      c->routes[i].hook = get_str(L, lua_gettop(L), "policy");
      c->routes[i].hook_json_max = (uint64_t)get_int(L, lua_gettop(L), "json_max_bytes");
    }
    lua_pop(L, 2);
  }
  lua_pop(L, 1);
  for (i = 0; i < c->npools; i++)
    c->pools[i].fallback_idx = c->pools[i].fallback ? sl_config_pool_index(c, c->pools[i].fallback) : -1;
}

static sl_config_t *config_parse(sl_config_t *c, char *err, size_t errlen) {
  lua_State *L = sl_lua_newstate();
  if (sl_config_eval(L, c, err, errlen) != 0) {
    lua_close(L);
    sl_config_free(c);
    return NULL;
  }
  extract(L, lua_gettop(L), c);
  lua_close(L);
  return c;
}

sl_config_t *sl_config_load(const char *file, char *err, size_t errlen) {
  sl_config_t *c = sl_calloc(1, sizeof(*c));
  c->refs = 1;
  c->file = sl_strdup(file);
  const char *slash = strrchr(file, '/');
  c->dir = slash ? sl_strndup(file, (size_t)(slash - file)) : sl_strdup(".");
  if (slash == file) {
    free(c->dir);
    c->dir = sl_strdup("/");
  }
  c->source = read_file(file, &c->source_len, err, errlen);
  if (!c->source) {
    sl_config_free(c);
    return NULL;
  }
  return config_parse(c, err, errlen);
}

sl_config_t *sl_config_load_string(const char *name, const char *source, size_t len,
                                   const char *dir, char *err, size_t errlen) {
  sl_config_t *c = sl_calloc(1, sizeof(*c));
  c->refs = 1;
  c->file = sl_strdup(name);
  c->dir = sl_strdup(dir ? dir : ".");
  c->source = sl_strndup(source, len);
  c->source_len = len;
  c->from_string = true;
  return config_parse(c, err, errlen);
}

int sl_config_pool_index(const sl_config_t *cfg, const char *name) {
  for (uint32_t i = 0; i < cfg->npools; i++)
    if (strcmp(cfg->pools[i].name, name) == 0) return (int)i;
  return -1;
}

static void free_listen(sl_listen_conf_t *l) {
  free(l->addr);
  free(l->host);
  free(l->tls_cert);
  free(l->tls_key);
}

void sl_config_free(sl_config_t *c) {
  if (!c) return;
  for (uint32_t i = 0; i < c->nlisten; i++) free_listen(&c->listen[i]);
  free(c->listen);
  free_listen(&c->admin);
  free(c->admin_token);
  free(c->access_log);
  for (uint32_t i = 0; i < c->npools; i++) {
    sl_pool_conf_t *p = &c->pools[i];
    for (uint32_t j = 0; j < p->nendpoints; j++) {
      free(p->endpoints[j].url);
      free(p->endpoints[j].host);
      free(p->endpoints[j].path);
    }
    free(p->endpoints);
    free(p->name);
    free(p->balancer);
    free(p->fallback);
    free(p->retry_policy);
    free(p->tls_ca);
    free(p->breaker_policy);
  }
  free(c->pools);
  for (uint32_t i = 0; i < c->nroutes; i++) {
    free(c->routes[i].path);
    free(c->routes[i].host);
    free(c->routes[i].pool);
    free(c->routes[i].hook);
    free_route_cache(c->routes[i].cache);
  }
  free(c->routes);
  free(c->policies_dir);
  free(c->source);
  free(c->file);
  free(c->dir);
  free(c);
}
