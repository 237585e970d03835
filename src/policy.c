#include "policy.h"

#include "telemetry.h"

#include "forward.h"
#include "http1.h"
#include "log.h"
#include "proxy.h"
#include "server.h"

#include <lauxlib.h>
#include <luajit.h>
#include <lualib.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#ifndef SLUICE_LUA_DIR
#define SLUICE_LUA_DIR "lua"
#endif

/* $VAR, else the source tree the library was built from, else where cmake --install put it. */
static const char *runtime_dir(const char *var, const char *built, const char *installed) {
  const char *d = getenv(var);
  if (d && *d) return d;
  return access(built, R_OK) == 0 ? built : installed;
}

const char *sl_lua_dir(void) {
  return runtime_dir("SLUICE_LUA_DIR", SLUICE_LUA_DIR, SLUICE_LUA_DIR_INSTALLED);
}

#define SL_BUDGET_STEP 1000 /* instructions between two hook calls */

static _Thread_local int64_t budget_steps = 1000000 / SL_BUDGET_STEP;
static _Thread_local int64_t budget_left = 1000000 / SL_BUDGET_STEP;

void sl_lua_budget_reset(void) { budget_left = budget_steps; }

static void budget_hook(lua_State *L, lua_Debug *ar) {
  if (--budget_left >= 0) return;
  budget_left = budget_steps; /* room for the error handler */
  /* Name the running Lua line: luaL_where cannot see through the hook frame. */
  char where[300] = "";
  lua_Debug d;
  for (int level = 0; lua_getstack(L, level, &d); level++) {
    if (lua_getinfo(L, "Sl", &d) && d.currentline > 0) {
      snprintf(where, sizeof(where), "%s:%d: ", d.short_src, d.currentline);
      break;
    }
  }
  char msg[400];
  snprintf(msg, sizeof(msg), "%sinstruction budget of %lld exceeded (runaway loop?)", where,
           (long long)(budget_steps * SL_BUDGET_STEP));
  lua_pushstring(L, msg);
  lua_error(L);
}

static _Thread_local bool jit_user_code;

void sl_lua_set_mode(lua_State *L, bool jit, uint64_t budget) {
  budget_steps = (int64_t)(budget / SL_BUDGET_STEP);
  if (budget_steps < 1) budget_steps = 1;
  budget_left = budget_steps;
  jit_user_code = jit;
  luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_ON);
  if (jit) lua_sethook(L, NULL, 0, 0);
  else lua_sethook(L, budget_hook, LUA_MASKCOUNT, SL_BUDGET_STEP);
}

#include "shipped_lua.h" /* generated: sl_shipped_lua_sha256[] */

/* Lowercase hex SHA-256 of s into out[65]; false if OpenSSL failed. */
static bool sha256_hex(const char *s, size_t len, char out[65]) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  if (!EVP_Digest(s, len, md, &mdlen, EVP_sha256(), NULL) || mdlen != 32) return false;
  for (unsigned int i = 0; i < mdlen; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
  return true;
}

static bool shipped_source(const char *src, size_t len) {
  char hex[65];
  if (!sha256_hex(src, len, hex)) return false;
  for (size_t i = 0; i < sizeof(sl_shipped_lua_sha256) / sizeof(sl_shipped_lua_sha256[0]); i++)
    if (strcmp(hex, sl_shipped_lua_sha256[i]) == 0) return true;
  return false;
}

/* sluice.vm.seal(chunk, source, path) -> compiled: called on every chunk of policy code loaded
 * from a file. Unless the source is one sluice ships or lua.jit is on, the chunk and every
 * function defined in it stay interpreted, where the instruction budget can stop them. */
static int l_vm_seal(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  size_t len;
  const char *src = luaL_checklstring(L, 2, &len);
  const char *path = luaL_optstring(L, 3, "?");
  bool shipped = shipped_source(src, len);
  if (!shipped && !jit_user_code) luaJIT_setmode(L, 1, LUAJIT_MODE_ALLFUNC | LUAJIT_MODE_OFF);
  SL_DEBUG("lua: %s: %s", path,
           shipped         ? "sluice's own source, compiled"
           : jit_user_code ? "compiled (lua.jit = true)"
                           : "interpreted under the instruction budget");
  lua_pushboolean(L, shipped || jit_user_code);
  return 1;
}

#ifndef SLUICE_POLICY_DIR
#define SLUICE_POLICY_DIR "policies"
#endif

const char *sl_bundled_policy_dir(void) {
  return runtime_dir("SLUICE_POLICY_DIR", SLUICE_POLICY_DIR, SLUICE_POLICY_DIR_INSTALLED);
}

/* lua-cjson (Debian's lua-cjson, linked in): the runtime decodes JSON bodies with it. */
int luaopen_cjson(lua_State *L);

lua_State *sl_lua_newstate(void) {
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "sluice: cannot create a Lua state\n");
    abort();
  }
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_pushfstring(L, "%s/?.lua", sl_lua_dir());
  lua_setfield(L, -2, "path");
  lua_pushliteral(L, "");
  lua_setfield(L, -2, "cpath");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, luaopen_cjson);
  lua_setfield(L, -2, "cjson");
  lua_pop(L, 1);
  lua_getfield(L, -1, "loaded");
  lua_newtable(L);
  lua_pushcfunction(L, l_vm_seal);
  lua_setfield(L, -2, "seal");
  lua_setfield(L, -2, "sluice.vm");
  lua_pop(L, 2);
  sl_lua_set_mode(L, false, (uint64_t)(budget_steps * SL_BUDGET_STEP));
  return L;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (!msg) msg = lua_type(L, 1) == LUA_TNIL ? "nil error" : luaL_typename(L, 1);
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Keeps the message and the first traceback frame that points into a file, which is the
 * policy line users need; the full traceback goes to the debug log. */
static void format_error(const char *tb, char *err, size_t errlen) {
  const char *nl = strchr(tb, '\n');
  size_t msglen = nl ? (size_t)(nl - tb) : strlen(tb);
  snprintf(err, errlen, "%.*s", (int)msglen, tb);
  SL_DEBUG("lua error: %s", tb);
}

int sl_lua_pcall(lua_State *L, int nargs, int nresults, char *err, size_t errlen) {
  sl_lua_budget_reset();
  int fn = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback);
  lua_insert(L, fn);
  int rc = lua_pcall(L, nargs, nresults, fn);
  lua_remove(L, fn);
  if (rc != 0) {
    format_error(lua_tostring(L, -1) ? lua_tostring(L, -1) : "(error object is not a string)",
                 err, errlen);
    lua_pop(L, 1);
    return -1;
  }
  return 0;
}

/* sluice module ----------------------------------------------------------------------------- */

static sl_worker_t *upworker(lua_State *L) {
  return (sl_worker_t *)lua_touserdata(L, lua_upvalueindex(1));
}

static int l_now_ms(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_now(upworker(L)->loop));
  return 1;
}

static int l_random(lua_State *L) {
  uint64_t r = sl_worker_rand(upworker(L));
  lua_pushnumber(L, (lua_Number)(r >> 11) * (1.0 / 9007199254740992.0));
  return 1;
}

/* FNV-1a, 32 bits: stable across runs and workers so hash-based affinity is consistent. */
static int l_hash(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
  lua_pushnumber(L, (lua_Number)h);
  return 1;
}

static int l_log(lua_State *L) {
  const char *lvl = luaL_checkstring(L, 1);
  int level = sl_log_level_parse(lvl);
  if (level < 0) return luaL_argerror(L, 1, "expected error, warn, info or debug");
  if (!sl_log_enabled(level)) return 0;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  int n = lua_gettop(L);
  for (int i = 2; i <= n; i++) {
    if (i > 2) luaL_addchar(&b, ' ');
    lua_getglobal(L, "tostring");
    lua_pushvalue(L, i);
    lua_call(L, 1, 1);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  lua_Debug ar;
  const char *where = "?";
  int line = 0;
  if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar)) {
    where = ar.short_src;
    line = ar.currentline;
  }
  sl_log(level, "policy %s:%d: %s", where, line, lua_tostring(L, -1));
  return 0;
}

/* Whether req.json decodes this body: a JSON media type (application/json or any +json), or
 * a body that starts like a JSON object or array sent without a type or as a form (what
 * `curl -d` does), within the size limit. */
static bool json_body(const sl_http_req_t *r) {
  if (!r->body.len || r->body.len > r->json_max) return false;
  int i = sl_http_req_find(r, "content-type");
  if (i >= 0) {
    const char *v = sl_http_req_str(r, r->headers[i].value_off);
    size_t n = r->headers[i].value_len, end = 0;
    while (end < n && v[end] != ';' && v[end] != ' ') end++;
    if (sl_strieq(v, end, "application/json") ||
        (end >= 5 && sl_strieq(v + end - 5, 5, "+json")))
      return true;
    if (!sl_strieq(v, end, "application/x-www-form-urlencoded")) return false;
  }
  size_t p = 0;
  while (p < r->body.len && strchr(" \t\r\n", r->body.data[p])) p++;
  return p < r->body.len && (r->body.data[p] == '{' || r->body.data[p] == '[');
}

/* req object accessors: read the request currently being decided on. */
static int l_req_field(lua_State *L) {
  sl_worker_t *w = upworker(L);
  const sl_http_req_t *r = w->hook_req;
  const char *k = luaL_checkstring(L, 1);
  if (!r) return 0;
  if (strcmp(k, "method") == 0) {
    lua_pushstring(L, sl_http_method_str(r->method));
  } else if (strcmp(k, "path") == 0) {
    lua_pushlstring(L, sl_http_req_url(r), r->path_len);
  } else if (strcmp(k, "query") == 0) {
    if (r->url_len == r->path_len) return 0;
    lua_pushlstring(L, sl_http_req_url(r) + r->path_len + 1, r->url_len - r->path_len - 1);
  } else if (strcmp(k, "url") == 0) {
    lua_pushlstring(L, sl_http_req_url(r), r->url_len);
  } else if (strcmp(k, "host") == 0) {
    if (r->host_idx < 0) return 0;
    const sl_header_t *h = &r->headers[r->host_idx];
    lua_pushlstring(L, sl_http_req_str(r, h->value_off), h->value_len);
  } else if (strcmp(k, "attempt") == 0) {
    lua_pushinteger(L, (lua_Integer)w->hook_attempt);
  } else if (strcmp(k, "id") == 0) {
    lua_pushstring(L, w->hook_request_id);
  } else if (strcmp(k, "body_length") == 0) {
    lua_pushnumber(L, (lua_Number)r->body.len);
  } else if (strcmp(k, "body") == 0) {
    lua_pushlstring(L, r->body.data ? r->body.data : "", r->body.len);
  } else if (strcmp(k, "client") == 0) {
    if (!r->peer) return 0;
    lua_pushstring(L, r->peer);
  } else if (strcmp(k, "pool") == 0) { /* on_response: the pool that served */
    const sl_exchange_t *x = w->hook_res;
    if (!x || !x->pool) return 0;
    lua_pushstring(L, x->pool->conf->name); /* a fallback pool when it took over */
  } else if (strcmp(k, "seq") == 0) {
    lua_pushnumber(L, (lua_Number)r->seq);
  } else if (strcmp(k, "json_body") == 0) {
    if (!json_body(r)) return 0;
    lua_pushlstring(L, r->body.data, r->body.len);
  } else {
    return 0;
  }
  return 1;
}

static int l_req_header(lua_State *L) {
  sl_worker_t *w = upworker(L);
  const sl_http_req_t *r = w->hook_req;
  const char *name = luaL_checkstring(L, 1);
  int i = r ? sl_http_req_find(r, name) : -1;
  if (i < 0) {
    lua_pushnil(L); /* a value, so tostring(req:header(x)) works */
    return 1;
  }
  lua_pushlstring(L, sl_http_req_str(r, r->headers[i].value_off), r->headers[i].value_len);
  return 1;
}

/* sluice.metrics primitives (wrapped by lua/sluice/metrics.lua). */
static int l_metric_family(lua_State *L) {
  sl_worker_t *w = upworker(L);
  const char *kind = luaL_checkstring(L, 1);
  const char *name = luaL_checkstring(L, 2);
  const char *help = luaL_optstring(L, 3, "");
  if (!sl_metrics_valid_name(name)) {
    lua_pushnil(L);
    lua_pushfstring(L, "invalid metric name %s (expected [a-zA-Z_][a-zA-Z0-9_]*)", name);
    return 2;
  }
  const char *labels[16];
  double buckets[SL_M_MAX_BUCKETS];
  size_t nl = lua_istable(L, 4) ? lua_objlen(L, 4) : 0, nb = 0;
  if (nl > SL_ARRAY_SIZE(labels)) return luaL_error(L, "metric %s: at most 16 labels", name);
  for (size_t i = 0; i < nl; i++) {
    lua_rawgeti(L, 4, (int)i + 1);
    labels[i] = lua_tostring(L, -1);
    lua_pop(L, 1); /* the string stays referenced by the table */
    if (!labels[i]) return luaL_error(L, "metric %s: label names must be strings", name);
  }
  if (lua_istable(L, 5)) {
    nb = lua_objlen(L, 5);
    if (nb > SL_M_MAX_BUCKETS) return luaL_error(L, "metric %s: at most 64 buckets", name);
    for (size_t i = 0; i < nb; i++) {
      lua_rawgeti(L, 5, (int)i + 1);
      buckets[i] = lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
  }
  sl_metric_type_t type = !strcmp(kind, "counter") ? SL_M_COUNTER
                          : !strcmp(kind, "gauge") ? SL_M_GAUGE : SL_M_HISTOGRAM;
  char full[256], err[256];
  snprintf(full, sizeof(full), "sluice_policy_%s", name);
  sl_mfamily_t *f = sl_metrics_family(w->tm->reg, full, help, type, labels, nl,
                                      nb ? buckets : NULL, nb, err, sizeof(err));
  if (!f) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushlightuserdata(L, f);
  return 1;
}

static int l_metric_series(lua_State *L) {
  sl_mfamily_t *f = lua_touserdata(L, 1);
  int n = lua_gettop(L) - 1;
  const char *values[16];
  if (!f || n > 16) return luaL_error(L, "bad metric handle");
  for (int i = 0; i < n; i++) {
    values[i] = lua_tostring(L, i + 2);
    if (!values[i]) return luaL_error(L, "label values must be strings or numbers");
  }
  sl_mseries_t *s = sl_mfamily_series(f, values);
  if (!s) return 0;
  lua_pushlightuserdata(L, s);
  return 1;
}

static int l_metric_update(lua_State *L) {
  sl_mseries_t *s = lua_touserdata(L, 1);
  int op = (int)luaL_checkinteger(L, 2);
  double v = luaL_checknumber(L, 3);
  if (!s) return luaL_error(L, "bad metric handle");
  if (op == 0) sl_mseries_inc(s, v);
  else if (op == 1) sl_mseries_set(s, v);
  else if (sl_mseries_type(s) == SL_M_HISTOGRAM) sl_mseries_observe(s, v);
  return 0;
}

/* req:set_header / res:set_header and friends (upvalue 2: the phase they belong to). */
static int edit_error(lua_State *L, const char *msg) {
  luaL_where(L, 2); /* the policy line: level 1 is the method wrapper in runtime.lua */
  lua_pushstring(L, msg);
  lua_concat(L, 2);
  return lua_error(L);
}

static sl_hedits_t *edit_target(lua_State *L, const char *what) {
  sl_worker_t *w = upworker(L);
  int phase = (int)lua_tointeger(L, lua_upvalueindex(2));
  if (!w->hook_edits || w->hook_phase != phase) {
    char msg[160];
    snprintf(msg, sizeof(msg), "%s is only available in %s", what,
             phase == SL_HOOK_REQUEST ? "on_request" : "on_response");
    edit_error(L, msg);
  }
  return w->hook_edits;
}

static int l_edit_header(lua_State *L, bool set) {
  bool response = lua_tointeger(L, lua_upvalueindex(2)) == SL_HOOK_RESPONSE;
  sl_hedits_t *e = edit_target(L, set ? (response ? "res:set_header" : "req:set_header")
                                      : (response ? "res:remove_header" : "req:remove_header"));
  size_t nlen = 0, vlen = 0;
  const char *name = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &nlen) : NULL;
  const char *value = NULL;
  if (!name) return edit_error(L, "header name must be a string");
  if (set) {
    int t = lua_type(L, 2);
    if (t != LUA_TSTRING && t != LUA_TNUMBER) return edit_error(L, "header value must be a string");
    value = lua_tolstring(L, 2, &vlen);
  }
  char err[200];
  if (sl_hedits_put(e, name, nlen, value, vlen, response, err, sizeof(err)) != 0)
    return edit_error(L, err);
  return 0;
}
static int l_edit_set_header(lua_State *L) { return l_edit_header(L, true); }
static int l_edit_remove_header(lua_State *L) { return l_edit_header(L, false); }

static int l_edit_set_path(lua_State *L) {
  sl_hedits_t *e = edit_target(L, "req:set_path");
  size_t len = 0;
  const char *path = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &len) : NULL;
  if (!path) return edit_error(L, "set_path: expected a string");
  char err[200];
  if (sl_hedits_set_path(e, path, len, err, sizeof(err)) != 0) return edit_error(L, err);
  return 0;
}

/* res object accessors: the upstream response on_response is looking at. */
static int l_res_field(lua_State *L) {
  const sl_exchange_t *x = upworker(L)->hook_res;
  const char *k = luaL_checkstring(L, 1);
  if (!x) return 0;
  if (strcmp(k, "status") == 0) {
    lua_pushinteger(L, x->status);
    return 1;
  }
  return 0;
}

static int l_res_header(lua_State *L) {
  const sl_exchange_t *x = upworker(L)->hook_res;
  const char *name = luaL_checkstring(L, 1);
  size_t len = 0;
  const char *v = x ? sl_proxy_response_header(x, name, &len) : NULL;
  if (!v) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushlstring(L, v, len);
  return 1;
}

/* Pushes { set_header, remove_header, set_path } bound to a phase. */
static void push_edit_table(lua_State *L, sl_worker_t *w, int phase) {
  static const luaL_Reg fns[] = {{"set_header", l_edit_set_header},
                                 {"remove_header", l_edit_remove_header},
                                 {"set_path", l_edit_set_path}, {NULL, NULL}};
  lua_newtable(L);
  for (const luaL_Reg *f = fns; f->name; f++) {
    lua_pushlightuserdata(L, w);
    lua_pushinteger(L, phase);
    lua_pushcclosure(L, f->func, 2);
    lua_setfield(L, -2, f->name);
  }
}

/* sluice.sha256(s): lowercase hex digest, e.g. to turn a secret into a stable identifier. */
static int l_sha256(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  char hex[65];
  if (!sha256_hex(s, len, hex)) return luaL_error(L, "sha256 failed");
  lua_pushlstring(L, hex, 64);
  return 1;
}

static const luaL_Reg sluice_fns[] = {{"now_ms", l_now_ms}, {"random", l_random},
                                      {"hash", l_hash},     {"log", l_log},
                                      {"sha256", l_sha256}, {NULL, NULL}};

/* Calls require(name).fn(args...) leaving nresults on the stack. */
static int call_module(lua_State *L, const char *mod, const char *fn, int nargs, int nresults,
                       char *err, size_t errlen) {
  lua_getglobal(L, "require");
  lua_pushstring(L, mod);
  if (sl_lua_pcall(L, 1, 1, err, errlen) != 0) {
    lua_pop(L, nargs);
    return -1;
  }
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_insert(L, -1 - nargs);
  return sl_lua_pcall(L, nargs, nresults, err, errlen);
}

int sl_policy_init(sl_worker_t *w, char *err, size_t errlen) {
  lua_State *L = w->L;
  /* sluice module, kept in the registry under "sluice.module". */
  lua_newtable(L);
  for (const luaL_Reg *f = sluice_fns; f->name; f++) {
    lua_pushlightuserdata(L, w);
    lua_pushcclosure(L, f->func, 1);
    lua_setfield(L, -2, f->name);
  }
  lua_newtable(L);
  lua_setfield(L, -2, "shared"); /* per-worker table policies may share state through */
  lua_pushstring(L, SLUICE_VERSION);
  lua_setfield(L, -2, "version");
  int mod = lua_gettop(L);
  lua_pushlightuserdata(L, w);
  lua_pushcclosure(L, l_metric_family, 1);
  lua_pushcfunction(L, l_metric_series);
  lua_pushcfunction(L, l_metric_update);
  if (call_module(L, "sluice.metrics", "new", 3, 1, err, errlen) != 0) return -1;
  lua_setfield(L, mod, "metrics");
  lua_setfield(L, LUA_REGISTRYINDEX, "sluice.module");

  /* The FFI struct layout must match the C one exactly. */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "sluice.ffi");
  if (sl_lua_pcall(L, 1, 1, err, errlen) != 0) return -1;
  lua_getfield(L, -1, "sizeof_endpoint");
  size_t lua_size = (size_t)lua_tonumber(L, -1);
  lua_getfield(L, -2, "sizeof_pool");
  size_t lua_pool_size = (size_t)lua_tonumber(L, -1);
  lua_pop(L, 3);
  if (lua_size != sizeof(sl_ep_view_t) || lua_pool_size != sizeof(sl_pool_view_t)) {
    snprintf(err, errlen,
             "lua/sluice/ffi.lua: sl_ep_view_t/sl_pool_view_t are %zu/%zu bytes, C says %zu/%zu",
             lua_size, lua_pool_size, sizeof(sl_ep_view_t), sizeof(sl_pool_view_t));
    return -1;
  }

  lua_pushcfunction(L, traceback);
  w->lua_traceback = luaL_ref(L, LUA_REGISTRYINDEX);

  lua_newtable(L);
  w->lua_outcome = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "sluice.runtime");
  if (sl_lua_pcall(L, 1, 1, err, errlen) != 0) return -1;
  lua_getfield(L, LUA_REGISTRYINDEX, "sluice.module");
  lua_getfield(L, -2, "json");
  lua_setfield(L, -2, "json"); /* sluice.json = runtime.json (lua-cjson) */
  lua_pop(L, 1);
  w->lua_hooks = luaL_ref(L, LUA_REGISTRYINDEX);

  /* The reusable req and res objects. */
  lua_pushlightuserdata(L, w);
  lua_pushcclosure(L, l_req_field, 1);
  lua_pushlightuserdata(L, w);
  lua_pushcclosure(L, l_req_header, 1);
  push_edit_table(L, w, SL_HOOK_REQUEST);
  if (call_module(L, "sluice.runtime", "make_req", 3, 1, err, errlen) != 0) return -1;
  w->lua_req = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, w);
  lua_pushcclosure(L, l_res_field, 1);
  lua_pushlightuserdata(L, w);
  lua_pushcclosure(L, l_res_header, 1);
  push_edit_table(L, w, SL_HOOK_RESPONSE);
  if (call_module(L, "sluice.runtime", "make_res", 3, 1, err, errlen) != 0) return -1;
  w->lua_res = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

int sl_policy_load(sl_worker_t *w, sl_gen_t *g, const char *kind, const char *name, char *err,
                   size_t errlen) {
  lua_State *L = w->L;
  lua_createtable(L, 2, 0);
  lua_pushstring(L, g->cfg->policies_dir);
  lua_rawseti(L, -2, 1);
  lua_pushstring(L, sl_bundled_policy_dir());
  lua_rawseti(L, -2, 2);
  lua_pushstring(L, kind);
  lua_pushstring(L, name);
  lua_rawgeti(L, LUA_REGISTRYINDEX, g->lua_ctx);
  return call_module(L, "sluice.sandbox", "load_policy", 4, 1, err, errlen);
}

/* Calls the function at base + 2 (the traceback handler is at base + 1) with the budget
 * reset; on error formats "file:line: message" into err and restores the stack to base. Like
 * sl_lua_pcall without creating a handler closure per call (the request path). */
static int hot_pcall(sl_worker_t *w, int base, int nargs, int nres, char *err, size_t errlen) {
  lua_State *L = w->L;
  sl_lua_budget_reset();
  int rc = lua_pcall(L, nargs, nres, base + 1);
  w->hook_req = NULL;
  if (rc != 0) {
    format_error(lua_tostring(L, -1) ? lua_tostring(L, -1) : "(error object is not a string)",
                 err, errlen);
    lua_settop(L, base);
    return -1;
  }
  lua_remove(L, base + 1);
  return 0;
}

int sl_policy_pick(sl_worker_t *w, sl_pool_t *pool, const sl_http_req_t *req,
                   const char *request_id, uint32_t attempt, sl_endpoint_t **out, char *err,
                   size_t errlen) {
  lua_State *L = w->L;
  *out = NULL;
  w->hook_req = req;
  w->hook_request_id = request_id;
  w->hook_attempt = attempt;
  int base = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, pool->lua_pick);
  lua_rawgeti(L, LUA_REGISTRYINDEX, pool->lua_pool);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_req);
  if (hot_pcall(w, base, 2, 1, err, errlen) != 0) return -1;

  int t = lua_type(L, -1);
  int rcode = 0;
  if (t == LUA_TNUMBER) {
    lua_Number idx = lua_tonumber(L, -1);
    if (idx >= 1 && idx <= pool->n && idx == (lua_Number)(uint32_t)idx) {
      *out = pool->eps[(uint32_t)idx - 1];
    } else {
      snprintf(err, errlen, "balancer %s: pick returned %g, not an endpoint index 1..%u",
               pool->conf->balancer, (double)idx, pool->n);
      rcode = -1;
    }
  } else if (t == 10 /* LUA_TCDATA: a pointer from pool.endpoints */) {
    const void *p = *(const void *const *)lua_topointer(L, -1);
    for (uint32_t i = 0; i < pool->n; i++)
      if (p == (const void *)pool->eps[i]) *out = pool->eps[i];
    if (!*out) {
      snprintf(err, errlen, "balancer %s: pick returned an endpoint not in pool %s",
               pool->conf->balancer, pool->conf->name);
      rcode = -1;
    }
  } else if (t != LUA_TNIL) {
    snprintf(err, errlen, "balancer %s: pick returned a %s, expected an index or nil",
             pool->conf->balancer, lua_typename(L, t));
    rcode = -1;
  }
  lua_pop(L, 1);
  if (*out && !(*out)->view.available) {
    snprintf(err, errlen, "balancer %s: pick returned an unavailable endpoint (%s)",
             pool->conf->balancer, (*out)->url);
    *out = NULL;
    rcode = -1;
  }
  return rcode;
}

/* Fills the reusable outcome table and pushes it. */
static void push_outcome(sl_worker_t *w, const sl_outcome_t *o) {
  lua_State *L = w->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_outcome);
  lua_pushstring(L, o->kind);
  lua_setfield(L, -2, "kind");
  if (o->status) lua_pushinteger(L, o->status);
  else lua_pushnil(L);
  lua_setfield(L, -2, "status");
  lua_pushboolean(L, sl_outcome_ok(o));
  lua_setfield(L, -2, "ok");
  if (o->retry_after_ms >= 0) lua_pushnumber(L, (lua_Number)o->retry_after_ms);
  else lua_pushnil(L);
  lua_setfield(L, -2, "retry_after_ms");
  if (o->ttfb_ms >= 0) lua_pushnumber(L, o->ttfb_ms);
  else lua_pushnil(L);
  lua_setfield(L, -2, "ttfb_ms");
}

/* Calls runtime.<trampoline>(fn, pool, ...) with nargs extra arguments already pushed after
 * the three slots reserved by push_hook. */
static int call_hook(sl_worker_t *w, int base, int nargs, int nres, char *err, size_t errlen) {
  return hot_pcall(w, base, 2 + nargs, nres, err, errlen);
}

/* Pushes the traceback handler, the runtime's trampoline and the hook function. */
static void push_trampoline(sl_worker_t *w, const char *trampoline, int fn_ref) {
  lua_State *L = w->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_hooks);
  lua_getfield(L, -1, trampoline);
  lua_remove(L, -2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, fn_ref);
}

/* Pushes the traceback handler, the trampoline, the hook function and the pool table. */
static void push_hook(sl_worker_t *w, const char *trampoline, int fn_ref, sl_pool_t *pool) {
  push_trampoline(w, trampoline, fn_ref);
  lua_rawgeti(w->L, LUA_REGISTRYINDEX, pool->lua_pool);
}

int sl_policy_decide(sl_worker_t *w, sl_pool_t *pool, const sl_http_req_t *req,
                     const char *request_id, uint32_t attempt, const sl_outcome_t *o,
                     int64_t *delay_ms, char *err, size_t errlen) {
  lua_State *L = w->L;
  int base = lua_gettop(L);
  *delay_ms = -1;
  w->hook_req = req;
  w->hook_request_id = request_id;
  w->hook_attempt = attempt;
  push_hook(w, "retry_decide", pool->lua_decide, pool);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_req);
  lua_pushinteger(L, (lua_Integer)attempt);
  push_outcome(w, o);
  int rc = call_hook(w, base, 3, 1, err, errlen);
  w->hook_req = NULL;
  if (rc != 0) return -1;
  int t = lua_type(L, -1);
  if (t == LUA_TNUMBER && lua_tonumber(L, -1) >= 0) {
    *delay_ms = (int64_t)lua_tonumber(L, -1);
  } else if (t != LUA_TNIL && t != LUA_TBOOLEAN) {
    snprintf(err, errlen, "retry %s: decide returned a %s, expected a delay in ms or nil",
             pool->conf->retry_policy, lua_typename(L, t));
    lua_settop(L, base);
    return -1;
  }
  lua_settop(L, base);
  return 0;
}

int sl_policy_record(sl_worker_t *w, sl_pool_t *pool, uint32_t idx, const sl_outcome_t *o,
                     sl_breaker_action_t *action, double *open_ms, char *err, size_t errlen) {
  lua_State *L = w->L;
  int base = lua_gettop(L);
  *action = SL_BREAKER_KEEP;
  push_hook(w, "breaker_record", pool->lua_record, pool);
  lua_pushinteger(L, (lua_Integer)idx + 1);
  push_outcome(w, o);
  lua_pushnumber(L, (lua_Number)uv_now(w->loop));
  if (call_hook(w, base, 3, 2, err, errlen) != 0) return -1;
  const char *a = lua_tostring(L, -2);
  int rc = 0;
  if (a && strcmp(a, "open") == 0) {
    *action = SL_BREAKER_OPEN;
    *open_ms = lua_tonumber(L, -1);
    if (!(*open_ms > 0)) {
      snprintf(err, errlen, "breaker %s: record returned \"open\" without a duration in ms",
               pool->conf->breaker_policy);
      *action = SL_BREAKER_KEEP;
      rc = -1;
    }
  } else if (a && strcmp(a, "close") == 0) {
    *action = SL_BREAKER_CLOSE;
  } else if (!lua_isnil(L, -2)) {
    snprintf(err, errlen, "breaker %s: record returned %s, expected nil, \"open\" or \"close\"",
             pool->conf->breaker_policy, lua_typename(L, lua_type(L, -2)));
    rc = -1;
  }
  lua_settop(L, base);
  return rc;
}

int sl_policy_cache_key(sl_worker_t *w, int ref, const sl_http_req_t *req, const char *request_id,
                        const char *policy, char **custom, size_t *custom_len, char *err,
                        size_t errlen) {
  lua_State *L = w->L;
  int base = lua_gettop(L);
  *custom = NULL;
  *custom_len = 0;
  w->hook_req = req;
  w->hook_request_id = request_id;
  w->hook_attempt = 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_req);
  if (hot_pcall(w, base, 1, 1, err, errlen) != 0) return -1;
  int t = lua_type(L, -1), result = 1;
  if (t == LUA_TSTRING) {
    size_t n = 0;
    const char *s = lua_tolstring(L, -1, &n);
    *custom = sl_strndup(s, n);
    *custom_len = n;
  } else if (t == LUA_TBOOLEAN) {
    result = lua_toboolean(L, -1) ? 1 : 0;
  } else if (t != LUA_TNIL) {
    snprintf(err, errlen, "cache %s: key returned a %s, expected a string, true, false or nil",
             policy, lua_typename(L, t));
    result = -1;
  }
  lua_settop(L, base);
  return result;
}

void sl_policy_add_ext(sl_worker_t *w, const sl_ext_t *ext, size_t n) {
  lua_State *L = w->L;
  if (!n) return;
  lua_getfield(L, LUA_REGISTRYINDEX, "sluice.module");
  lua_getfield(L, -1, "ext");
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "ext");
  }
  for (size_t i = 0; i < n; i++) {
    lua_pushlightuserdata(L, ext[i].data);
    lua_pushcclosure(L, ext[i].fn, 1);
    lua_setfield(L, -2, ext[i].name);
  }
  lua_pop(L, 2);
}

/* Route hooks ---------------------------------------------------------------------------- */

void sl_hook_result_free(sl_hook_result_t *r) {
  free(r->content_type);
  free(r->headers);
  free(r->body);
  memset(r, 0, sizeof(*r));
}

int sl_policy_route_load(sl_worker_t *w, sl_gen_t *g, int cfg_idx, uint32_t i, char *err,
                         size_t errlen) {
  lua_State *L = w->L;
  const sl_config_t *cfg = g->cfg;
  const sl_route_conf_t *rc = &cfg->routes[i];
  sl_route_hook_t *h = &g->route_hooks[i];
  int top = lua_gettop(L);
  char perr[1024], path[64];
  snprintf(path, sizeof(path), "routes[%u].hook", i + 1);
  if (sl_policy_load(w, g, "route", rc->hook, perr, sizeof(perr)) != 0) goto fail;
  int mod = lua_gettop(L);
  lua_getfield(L, cfg_idx, "routes");
  lua_rawgeti(L, -1, (int)i + 1);
  lua_getfield(L, -1, "hook");
  lua_getfield(L, -1, "options");
  int opts = lua_gettop(L);
  /* runtime.route_init(mod, options, pool_names, config_dir) */
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_hooks);
  lua_getfield(L, -1, "route_init");
  lua_remove(L, -2);
  lua_pushvalue(L, mod);
  lua_pushvalue(L, opts);
  lua_createtable(L, (int)cfg->npools, 0);
  for (uint32_t p = 0; p < cfg->npools; p++) {
    lua_pushstring(L, cfg->pools[p].name);
    lua_rawseti(L, -2, (int)p + 1);
  }
  lua_pushstring(L, cfg->dir ? cfg->dir : ".");
  if (sl_lua_pcall(L, 4, 0, perr, sizeof(perr)) != 0) goto fail;
  lua_pushvalue(L, opts);
  h->options = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, mod, "on_request");
  if (lua_isfunction(L, -1)) h->on_request = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  lua_getfield(L, mod, "on_response");
  if (lua_isfunction(L, -1)) h->on_response = luaL_ref(L, LUA_REGISTRYINDEX);
  else lua_pop(L, 1);
  lua_settop(L, top);
  return 0;
fail:
  lua_settop(L, top);
  sl_config_error(L, cfg, path, perr, err, errlen);
  return -1;
}

/* Copies the string at idx (NULL when it is not a string). */
static char *dup_string(lua_State *L, int idx, size_t *len) {
  size_t n = 0;
  const char *s = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
  if (len) *len = n;
  return s ? sl_strndup(s, n) : NULL;
}

/* What the req/res objects and their edit methods see while a route hook runs. */
static void hook_enter(sl_worker_t *w, int phase, const sl_http_req_t *req,
                       const char *request_id, uint32_t attempt, const sl_exchange_t *res,
                       sl_hedits_t *edits) {
  w->hook_req = req;
  w->hook_request_id = request_id;
  w->hook_attempt = attempt;
  w->hook_res = res;
  w->hook_edits = edits;
  w->hook_phase = (uint8_t)phase;
}

static void hook_leave(sl_worker_t *w) {
  w->hook_edits = NULL;
  w->hook_res = NULL;
  w->hook_phase = SL_HOOK_NONE;
}

int sl_policy_on_request(sl_worker_t *w, const sl_gen_t *g, const sl_route_conf_t *route,
                         const sl_http_req_t *req, const char *request_id, sl_hedits_t *edits,
                         sl_hook_result_t *res, char *err, size_t errlen) {
  lua_State *L = w->L;
  const sl_route_hook_t *h = sl_route_hook(g, route);
  memset(res, 0, sizeof(*res));
  if (h->on_request == LUA_NOREF) return 0;
  int base = lua_gettop(L);
  hook_enter(w, SL_HOOK_REQUEST, req, request_id, 0, NULL, edits);
  push_trampoline(w, "route_request", h->on_request);
  lua_pushfstring(L, "route policy %s", route->hook);
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->options);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_req);
  int rc = hot_pcall(w, base, 4, 5, err, errlen);
  hook_leave(w);
  if (rc != 0) return -1;
  const char *kind = lua_tostring(L, base + 1);
  if (kind && strcmp(kind, "pool") == 0) {
    const char *name = lua_tostring(L, base + 2);
    res->kind = SL_HOOK_POOL;
    res->pool_idx = sl_config_pool_index(g->cfg, name);
    if (res->pool_idx < 0) {
      snprintf(err, errlen, "route policy %s: on_request chose pool \"%.100s\", which the config "
                            "does not define", route->hook, name);
      rc = -1;
    }
  } else if (kind && strcmp(kind, "respond") == 0) {
    res->kind = SL_HOOK_RESPOND;
    res->status = (int)lua_tointeger(L, base + 2);
    res->content_type = dup_string(L, base + 3, NULL);
    res->headers = dup_string(L, base + 4, NULL);
    res->body = dup_string(L, base + 5, &res->body_len);
  }
  lua_settop(L, base);
  return rc;
}

int sl_policy_on_response(sl_worker_t *w, const sl_exchange_t *x, sl_hedits_t *edits, char *err,
                          size_t errlen) {
  lua_State *L = w->L;
  const sl_route_hook_t *h = sl_route_hook(x->gen, x->route);
  if (h->on_response == LUA_NOREF) return 0;
  int base = lua_gettop(L);
  hook_enter(w, SL_HOOK_RESPONSE, &x->conn->req, x->request_id, x->attempts, x, edits);
  /* on_response(req, res, options): called directly, no trampoline needed */
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->on_response);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_req);
  lua_rawgeti(L, LUA_REGISTRYINDEX, w->lua_res);
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->options);
  int rc = hot_pcall(w, base, 3, 0, err, errlen);
  hook_leave(w);
  lua_settop(L, base);
  return rc;
}
