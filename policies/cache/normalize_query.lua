-- Cache key policy: requests that differ only in tracking parameters or in the order of their
-- query parameters share a cache entry, and `nocache=1` in the query skips the cache.
--
--   routes = { { path = "/v1/models", pool = "llm", cache = { ttl_s = 60, policy = "normalize_query" } } }
--
-- key(req) returns the string that stands for the request's path, query and body in the key
-- (method, host, route and, unless the route opts out, Authorization are always added by the
-- gateway), false to skip the cache for this request, or nil/true for the default key. This
-- one always returns a string, so /x, /x? and /x?utm_source=y share an entry.
local M = {}

local TRACKING = { fbclid = true, gclid = true, mc_cid = true, mc_eid = true }

local function tracking(name)
  return TRACKING[name] or name:sub(1, 4) == "utm_"
end

function M.key(req)
  local params = {}
  for pair in (req.query or ""):gmatch("[^&]+") do
    local name = pair:match("^([^=]*)")
    if name == "nocache" and pair == "nocache=1" then return false end
    if name ~= "" and not tracking(name) then params[#params + 1] = pair end
  end
  table.sort(params)
  return req.path .. "?" .. table.concat(params, "&") .. "\n" .. (req.body or "")
end

return M
