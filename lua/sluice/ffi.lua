-- FFI view of endpoint state for policies. The struct mirrors sl_ep_view_t in
-- src/endpoint.h; the runtime compares ffi.sizeof with the C sizeof at start-up so a change on
-- one side without the other fails loudly instead of reading garbage.
local ffi = require("ffi")

ffi.cdef [[
typedef struct sl_ep_view {
  double ewma_ms;
  double reported_load;
  int64_t successes;
  int64_t fails;
  int32_t inflight;
  int32_t max_inflight;
  int32_t queued;
  int32_t weight;
  int32_t state;
  int32_t consecutive_fails;
  int32_t ejections;
  bool available;
  const char *url;
} sl_ep_view_t;
typedef struct sl_pool_view {
  int32_t active;
  int32_t queued;
  int32_t retrying;
  int32_t ejected;
} sl_pool_view_t;
]]

local M = {}
local view_ptr = ffi.typeof("const sl_ep_view_t *")

-- Turns the light userdata the C side passes into a read-only typed pointer.
function M.endpoint(lud) return ffi.cast(view_ptr, lud) end

local pool_ptr = ffi.typeof("const sl_pool_view_t *")
function M.pool_stats(lud) return ffi.cast(pool_ptr, lud) end

M.sizeof_endpoint = ffi.sizeof("sl_ep_view_t")
M.sizeof_pool = ffi.sizeof("sl_pool_view_t")
return M
