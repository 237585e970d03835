-- Glue the C runtime calls at generation build time (never on the request path).
local sffi = require("sluice.ffi")
local M = {}

-- Per-endpoint tables policies (breakers) keep state in, keyed by endpoint URL. This module
-- is loaded once per worker VM, so the tables outlive config generations.
local endpoint_state = {}

-- Builds the `pool` table handed to policies. Endpoints arrive as (light userdata, url) pairs
-- pointing at sl_ep_view_t structs owned by C; the table keeps typed read-only pointers.
function M.make_pool(name, options, retry, breaker, stats, ...)
  local eps, states, urls = {}, {}, {}
  for i = 1, select("#", ...) / 2 do
    local lud, url = select(2 * i - 1, ...)
    eps[i] = sffi.endpoint(lud)
    urls[i] = url
    local st = endpoint_state[url]
    if not st then st = {}; endpoint_state[url] = st end
    states[i] = st
  end
  return { name = name, n = #eps, endpoints = eps, urls = urls, ep_state = states, state = {},
           options = options or {}, retry = retry or nil, breaker = breaker or nil,
           stats = sffi.pool_stats(stats) }
end

-- Trampolines C calls with the hook function as first argument (no closure per pool).
function M.breaker_record(fn, pool, i, outcome, now)
  return fn(pool.endpoints[i], outcome, now, pool.ep_state[i], pool)
end

function M.retry_decide(fn, pool, req, attempt, outcome)
  return fn(req, attempt, outcome, pool)
end

-- The request object policies see. Fields come from the request being decided on; reading
-- them after the hook returned gives nil.
function M.make_req(field, header)
  local methods = { header = function(_, name) return header(name) end }
  return setmetatable({}, {
    __index = function(_, k)
      local m = methods[k]
      if m then return m end
      return field(k)
    end,
    __newindex = function() error("req is read-only", 2) end,
  })
end

return M
