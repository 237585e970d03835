-- Power of two choices: draw two distinct available endpoints at random and take the one
-- with the lower inflight / weight (the first one drawn when they tie).
--
-- Use for large pools, where a full scan per pick gets expensive: p2c costs the same at 16
-- or 128 endpoints, and stays close to least_inflight in balance (with random placement the
-- worst backlog grows as log n / log log n; with two choices as log log n). Its random
-- candidates also keep several gateways or workers whose load figures lag from all rushing
-- at the one endpoint that looks least loaded. With a handful of endpoints prefer
-- least_inflight or least_queue: the scan is just as cheap and finds the true minimum.
--
-- Sampling: the first endpoint is drawn uniformly from 1..n, the second uniformly from the
-- other n - 1; a draw that lands on an unavailable endpoint is redrawn, at most 4 times
-- per slot (MAX_TRIES). When that fails (most endpoints unavailable) the pick falls
-- back to one scan that counts the available endpoints and draws two distinct ones among
-- them, so a pick never loops and never draws more than 2 * MAX_TRIES + 2 numbers. Both
-- paths give a uniform pair of distinct available endpoints. With exactly one available
-- endpoint it is returned.
--
-- Options: none.
-- State:   none.
-- Cost:    O(1) expected (2 draws, 2 endpoint reads) while most endpoints are available;
--          O(n) when the fallback scan runs. No allocation.

local M = {}

local floor = math.floor
local MAX_TRIES = 4

-- a less loaded than (or as loaded as) b, by inflight / weight, compared exactly by
-- cross-multiplying.
local function le(a, b)
  return tonumber(a.inflight) * tonumber(b.weight) <= tonumber(b.inflight) * tonumber(a.weight)
end

-- The slow path: one pass to count, at most two draws, one pass to locate.
local function scan_pick(eps, n)
  local m, only = 0, 0
  for i = 1, n do
    if eps[i].available then
      m = m + 1
      only = i
    end
  end
  if m == 0 then return nil end
  if m == 1 then return only end

  -- ranks (0-based, among available endpoints) of the first and second choice
  local ra = floor(sluice.random() * m)
  local rb = floor(sluice.random() * (m - 1))
  if rb >= ra then rb = rb + 1 end

  local a, b, r = 0, 0, 0
  for i = 1, n do
    if eps[i].available then
      if r == ra then a = i elseif r == rb then b = i end
      r = r + 1
    end
  end
  return le(eps[a], eps[b]) and a or b
end

function M.pick(pool, req)
  local n = pool.n
  if n == 0 then return nil end
  local eps = pool.endpoints
  if n == 1 then
    if eps[1].available then return 1 end
    return nil
  end

  local a = 0
  for _ = 1, MAX_TRIES do
    local i = floor(sluice.random() * n) + 1
    if eps[i].available then
      a = i
      break
    end
  end
  if a == 0 then return scan_pick(eps, n) end

  local b = 0
  for _ = 1, MAX_TRIES do
    local i = floor(sluice.random() * (n - 1)) + 1
    if i >= a then i = i + 1 end
    if eps[i].available then
      b = i
      break
    end
  end
  if b == 0 then return scan_pick(eps, n) end

  local ea, eb = eps[a], eps[b]
  if le(ea, eb) then return a end
  return b
end

return M
