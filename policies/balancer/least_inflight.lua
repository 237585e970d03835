-- Least in-flight: choose the available endpoint with the lowest inflight / weight.
--
-- Endpoints that are equally loaded take turns: the scan starts just after the endpoint
-- chosen last time, and the first endpoint with the lowest ratio in scan order wins.
-- Without that, a pool that is idle between requests would send everything to
-- endpoint 1.
--
-- Use when request cost varies (LLM generations, streaming sessions): a slow endpoint
-- keeps its requests longer and so gets fewer new ones. It sees only requests sent
-- through this worker; it does not look at the endpoint's own queue (`queued`,
-- `reported_load`).
--
-- Options: none.
-- State:   pool.state.li_start, the index the next scan starts from.
-- Cost:    O(n) per pick, one pass, no allocation. Ratios are compared by
--          cross-multiplying (a/b < c/d as a*d < c*b), so ties are exact.

local M = {}

function M.pick(pool, req)
  local n = pool.n
  if n == 0 then return nil end

  local state = pool.state
  local start = state.li_start or 1
  if start > n then start = 1 end

  local eps = pool.endpoints
  -- best = 0 means none yet: keeping it a number (not nil) keeps the loop's trace stable.
  local best, best_load, best_w = 0, 0, 1
  local i = start
  for _ = 1, n do
    local ep = eps[i]
    if ep.available then
      local load, w = tonumber(ep.inflight), tonumber(ep.weight)
      if best == 0 or load * best_w < best_load * w then
        best, best_load, best_w = i, load, w
      end
    end
    i = i == n and 1 or i + 1
  end

  if best == 0 then return nil end
  state.li_start = best == n and 1 or best + 1
  return best
end

return M
