-- Weighted random: each available endpoint is chosen with probability weight / (sum of
-- the available endpoints' weights), independently of earlier picks.
--
-- Use when many gateway workers or processes balance the same endpoints and must not
-- fall into lockstep (each worker's round robin starts at the same endpoint), or when
-- keeping no state matters. Like round_robin it ignores load.
--
-- Draws exactly one sluice.random() per pick that has an available endpoint, none when
-- there is none.
--
-- Options: none.
-- State:   none.
-- Cost:    O(n) per pick, two passes, no allocation.

local M = {}

function M.pick(pool, req)
  local n = pool.n
  local eps = pool.endpoints

  local total = 0
  for i = 1, n do
    local ep = eps[i]
    if ep.available then
      total = total + tonumber(ep.weight)
    end
  end
  if total == 0 then return nil end

  local r = sluice.random() * total
  local acc, last = 0, 0
  for i = 1, n do
    local ep = eps[i]
    if ep.available then
      acc = acc + tonumber(ep.weight)
      if r < acc then return i end
      last = i
    end
  end
  -- Only reached if rounding made r == total: the last available endpoint owns that edge.
  return last
end

return M
