-- Smooth weighted round robin (nginx's algorithm).
--
-- Each pick adds every available endpoint's weight to its current weight, takes the
-- endpoint with the highest current weight (first one on ties) and subtracts the total
-- weight of the available endpoints from it. Weights {5,1,1} give a a b a c a a: the
-- heavy endpoint's turns are interleaved rather than bunched, and equal weights give a
-- plain rotation. From a fresh state every run of `total weight` consecutive picks has
-- each endpoint exactly `weight` times.
--
-- Use when endpoints are alike and requests cost about the same; it ignores load, so
-- prefer least_inflight (or a queue-aware balancer) when request cost varies.
--
-- Unavailable endpoints are skipped and their current weight is frozen until they return.
-- Weight and availability changes take effect on the next pick; current weights carry
-- over, so the counts just after a change can be off their share by a pick or two.
--
-- Options: none.
-- State:   pool.state.rr_current, one current weight per endpoint index.
-- Cost:    O(n) per pick, one pass, no allocation after the first pick.

local M = {}

function M.pick(pool, req)
  local n = pool.n
  if n == 0 then return nil end

  local state = pool.state
  local current = state.rr_current
  if current == nil then
    current = {}
    state.rr_current = current
  end

  local eps = pool.endpoints
  -- best = 0 means none yet: keeping it a number (not nil) keeps the loop's trace stable.
  local total, best, best_cw = 0, 0, 0
  for i = 1, n do
    local ep = eps[i]
    if ep.available then
      local w = tonumber(ep.weight)
      local cw = (current[i] or 0) + w
      current[i] = cw
      total = total + w
      if best == 0 or cw > best_cw then
        best, best_cw = i, cw
      end
    end
  end

  if best == 0 then return nil end
  current[best] = best_cw - total
  return best
end

return M
