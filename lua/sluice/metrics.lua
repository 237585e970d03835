-- sluice.metrics: counters, gauges and histograms defined by policies, exported on /metrics
-- as sluice_policy_<name> (docs/metrics.md). Built once per worker VM around three C
-- primitives that policies never see directly.
local M = {}

local OPS = { inc = 0, set = 1, observe = 2 }

function M.new(family, series, update)
  local api = {}

  local function define(kind, name, help, labels, buckets)
    if type(name) ~= "string" then error("sluice.metrics." .. kind .. ": the name must be a string", 3) end
    if labels ~= nil and type(labels) ~= "table" then
      error("sluice.metrics." .. kind .. ": labels must be a list of names", 3)
    end
    labels = labels or {}
    local f, err = family(kind, name, help or "", labels, buckets)
    if not f then return nil, err end
    local n, cache = #labels, {}
    local function handle(...)
      for i = 1, n do
        local t = type((select(i, ...)))
        if t ~= "string" and t ~= "number" then
          error(string.format("metric %s: label values must be strings or numbers, got %s", name, t), 3)
        end
      end
      local key = n == 0 and "" or table.concat({ ... }, "\0", 1, n)
      local s = cache[key]
      if not s then
        if select("#", ...) < n then error(string.format("metric %s: expected %d label value(s)", name, n), 3) end
        s = series(f, ...)
        if not s then error("metric " .. name .. ": too many label combinations (limit 10000)", 3) end
        cache[key] = s
      end
      return s
    end
    local m = {}
    if kind == "counter" then
      function m:inc(v, ...)
        v = v or 1
        if type(v) ~= "number" or v < 0 then error("metric " .. name .. ": a counter only goes up", 2) end
        update(handle(...), OPS.inc, v)
      end
    elseif kind == "gauge" then
      function m:set(v, ...) update(handle(...), OPS.set, v) end
      function m:inc(v, ...) update(handle(...), OPS.inc, v or 1) end
      function m:dec(v, ...) update(handle(...), OPS.inc, -(v or 1)) end
    else
      function m:observe(v, ...) update(handle(...), OPS.observe, v) end
    end
    return m
  end

  function api.counter(name, help, labels) return define("counter", name, help, labels) end
  function api.gauge(name, help, labels) return define("gauge", name, help, labels) end
  function api.histogram(name, help, labels, buckets) return define("histogram", name, help, labels, buckets) end
  return api
end

return M
