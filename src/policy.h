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

/* A new VM with the standard libraries and package.path set to the runtime's lua/ dir. */
lua_State *sl_lua_newstate(void);

/* lua_pcall with a traceback handler. On error writes "file:line: message" (first line of
 * the traceback kept short) into err, pops it, and returns -1. */
int sl_lua_pcall(lua_State *L, int nargs, int nresults, char *err, size_t errlen);

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

#endif
