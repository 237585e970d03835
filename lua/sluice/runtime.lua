-- Glue the C runtime calls at generation build time (never on the request path).
local sffi = require("sluice.ffi")
local M = {}

-- Builds the `pool` table handed to balancers. Endpoints arrive as light userdata pointing at
-- sl_ep_view_t structs owned by C; the table keeps typed read-only pointers to them.
function M.make_pool(name, options, ...)
  local eps = {}
  for i = 1, select("#", ...) do eps[i] = sffi.endpoint((select(i, ...))) end
  return { name = name, n = #eps, endpoints = eps, state = {}, options = options or {} }
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
