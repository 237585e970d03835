-- Split a route's traffic between pools by weight: a canary release, or an A/B test.
--
--   hook = { policy = "canary", options = {
--     split  = { stable = 95, canary = 5 },  -- pool name = weight (any positive numbers)
--     sticky = "x-user-id",                  -- optional: the same value always gets the same
--                                            -- pool (hash of the header), else a random draw
--     tag    = "x-sluice-variant",           -- optional: response header naming the pool
--   } }
local M = {}

local pools, total, sticky, tag

-- Installed by init only when tagging, so untagged routes pay nothing per response.
local function tag_response(req, res)
  res:set_header(tag, req.pool)
end

function M.init(options, ctx)
  local split = options.split
  if type(split) ~= "table" or next(split) == nil then
    error("canary: options.split must be a table of pool name = weight", 0)
  end
  pools, total = {}, 0
  for name, weight in pairs(split) do
    if type(name) ~= "string" or not ctx.pools[name] then
      error("canary: options.split: no pool named " .. tostring(name), 0)
    end
    if type(weight) ~= "number" or not (weight >= 0 and weight < math.huge) then
      error("canary: options.split." .. name .. ": weight must be a finite number >= 0", 0)
    end
    if weight > 0 then pools[#pools + 1] = { name = name, weight = weight } end
    total = total + weight
  end
  if total <= 0 then error("canary: options.split: at least one weight must be positive", 0) end
  -- Name order, so a given draw maps to the same pool on every worker and after reloads.
  table.sort(pools, function(a, b) return a.name < b.name end)
  if options.sticky ~= nil and type(options.sticky) ~= "string" then
    error("canary: options.sticky must be a header name", 0)
  end
  sticky = options.sticky
  tag = options.tag
  if tag ~= nil and type(tag) ~= "string" then error("canary: options.tag must be a header name", 0) end
  M.on_response = tag and tag_response or nil
end

-- Maps u in [0, 1) to a pool by cumulative weight.
local function choose(u)
  local x = u * total
  for _, p in ipairs(pools) do
    if x < p.weight then return p.name end
    x = x - p.weight
  end
  return pools[#pools].name
end

function M.on_request(req)
  local key = sticky and req:header(sticky)
  local pool
  if key and key ~= "" then
    pool = choose(sluice.hash(key) / 4294967296)
  else
    pool = choose(sluice.random())
  end
  return pool
end

return M
