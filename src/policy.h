/* The Lua side of a worker: VM creation, the `sluice` module of C primitives, sandboxed
 * policy loading, and the protected calls into policy hooks. Every call into Lua goes
 * through sl_lua_pcall (or the hot-path variant in sl_policy_pick), so a Lua error never
 * unwinds through libuv frames. */
#ifndef SL_POLICY_H
#define SL_POLICY_H

#include "worker.h"

#include <lua.h>

struct sl_http_req;

/* Directory holding the runtime's own Lua modules (lua/sluice/): $SLUICE_LUA_DIR or
 * the compiled-in default. */
const char *sl_lua_dir(void);

/* A new VM with the standard libraries and package.path set to the runtime's lua/ dir, in
 * the default mode of sl_lua_set_mode (user code interpreted under the budget). */
lua_State *sl_lua_newstate(void);

/* The bundled policies ($SLUICE_POLICY_DIR or the compiled-in default), searched after the
 * config's policies directory, so built-in policies need not be copied to be used. */
const char *sl_bundled_policy_dir(void);

/* Compilation and the instruction budget. LuaJIT cannot interrupt compiled code, so the budget
 * only guards interpreted code: with jit false (the default), every chunk of user code —
 * policies, modules they require, data files, the config — has the JIT turned off for its
 * functions and a count hook stops a runaway loop with an error naming its line. The Lua code
 * sluice ships (lua/, and policies/ files whose source is unmodified, by SHA-256) is trusted
 * and compiled either way. jit true compiles user code too and drops the hook. */
void sl_lua_set_mode(lua_State *L, bool jit, uint64_t budget);
/* Grants a fresh budget to the next call into Lua on this thread. */
void sl_lua_budget_reset(void);

/* lua_pcall with a traceback handler. On error writes "file:line: message" (first line of
 * the traceback kept short) into err, pops it, and returns -1. */
int sl_lua_pcall(lua_State *L, int nargs, int nresults, char *err, size_t errlen);

/* A host function registered with sluice_register: sluice.ext.<name> in every policy. */
typedef struct sl_ext {
  char *name;
  int (*fn)(lua_State *L);
  void *data;
} sl_ext_t;
/* Adds the host functions to the worker's sluice module (before any policy loads). */
void sl_policy_add_ext(sl_worker_t *w, const sl_ext_t *ext, size_t n);

/* Prepares a worker's VM: the sluice module, FFI layout check, the reusable req object. */
int sl_policy_init(sl_worker_t *w, char *err, size_t errlen);

/* Loads policies/<kind>/<name>.lua for generation g in the sandbox and pushes the module. */
int sl_policy_load(sl_worker_t *w, sl_gen_t *g, const char *kind, const char *name, char *err,
                   size_t errlen);

/* Asks the pool's balancer for an endpoint. Returns 0 with *out set (NULL when no endpoint is
 * available), or -1 with err filled when the policy failed (error or bad return value). */
int sl_policy_pick(sl_worker_t *w, sl_pool_t *pool, const struct sl_http_req *req,
                   const char *request_id, uint32_t attempt, sl_endpoint_t **out, char *err,
                   size_t errlen);

/* How an attempt ended, as retry and breaker policies see it (the `outcome` table). */
typedef struct sl_outcome {
  const char *kind;       /* response | connect_error | connect_timeout | reset | timeout */
  int status;             /* response status, 0 when there was none */
  int64_t retry_after_ms; /* from a Retry-After header, -1 when absent */
  double ttfb_ms;         /* time to first byte, -1 when there was none */
} sl_outcome_t;

static inline bool sl_outcome_ok(const sl_outcome_t *o) {
  return o->status > 0 && o->status < 500;
}

/* Asks the pool's retry policy whether to try again. Returns 0 with *delay_ms set (< 0 means
 * stop), or -1 with err filled when the policy failed. */
int sl_policy_decide(sl_worker_t *w, sl_pool_t *pool, const struct sl_http_req *req,
                     const char *request_id, uint32_t attempt, const sl_outcome_t *o,
                     int64_t *delay_ms, char *err, size_t errlen);

typedef enum { SL_BREAKER_KEEP = 0, SL_BREAKER_OPEN, SL_BREAKER_CLOSE } sl_breaker_action_t;

/* Reports an attempt's outcome for pool->eps[idx] to the breaker policy. Returns 0 with the
 * transition it asked for (*open_ms set for SL_BREAKER_OPEN), or -1 with err filled. */
int sl_policy_record(sl_worker_t *w, sl_pool_t *pool, uint32_t idx, const sl_outcome_t *o,
                     sl_breaker_action_t *action, double *open_ms, char *err, size_t errlen);

/* Calls a route's cache policy key(req) (function ref `ref`). Returns 1 to cache (with
 * *custom, malloc'd, set when the policy returned a key string), 0 when the policy vetoed
 * caching (false), or -1 with err filled. */
int sl_policy_cache_key(sl_worker_t *w, int ref, const struct sl_http_req *req,
                        const char *request_id, const char *policy, char **custom,
                        size_t *custom_len, char *err, size_t errlen);

/* What a route's on_request asked for. Strings are malloc'd (sl_hook_result_free). */
typedef struct sl_hook_result {
  enum { SL_HOOK_PROCEED = 0, SL_HOOK_POOL, SL_HOOK_RESPOND } kind;
  int pool_idx;        /* SL_HOOK_POOL */
  int status;          /* SL_HOOK_RESPOND: the direct response */
  char *content_type, *headers; /* headers: "Name: value\r\n" lines */
  char *body;
  size_t body_len;
} sl_hook_result_t;
void sl_hook_result_free(sl_hook_result_t *r);

/* Loads routes[i].hook for generation g (policy, init(options, ctx)) into g->route_hooks[i]. A
 * failure names the config key. */
int sl_policy_route_load(sl_worker_t *w, sl_gen_t *g, int cfg_idx, uint32_t i, char *err,
                         size_t errlen);

/* Runs the route's on_request for req; header and path changes go into *edits. Returns 0
 * with *res filled, or -1 with err filled (the hook failed or returned something invalid). */
int sl_policy_on_request(sl_worker_t *w, const sl_gen_t *g, const sl_route_conf_t *route,
                         const struct sl_http_req *req, const char *request_id,
                         struct sl_hedits *edits, sl_hook_result_t *res, char *err,
                         size_t errlen);

/* Runs the route's on_response for the response x is relaying; header changes go into
 * *edits. Returns 0, or -1 with err filled. */
struct sl_exchange;
int sl_policy_on_response(sl_worker_t *w, const struct sl_exchange *x, struct sl_hedits *edits,
                          char *err, size_t errlen);

#endif
