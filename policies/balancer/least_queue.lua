-- Shortest queue, idle instances first: choose the available endpoint with the lowest
-- (inflight + queued) / weight.
--
-- `inflight` is what the gateway has in flight to the endpoint (for an inference server:
-- the request it is running plus the ones waiting in its own queue); `queued` is what is
-- assigned to it but still waiting for an upstream connection. The runtime takes the
-- endpoint's slot before connecting, so a request waiting for a connection is in both
-- counts and weighs double: an endpoint whose connections are slow to open, or whose
-- keep-alive pool is exhausted, looks busier than one running the same number of
-- requests. An endpoint with a load of zero is idle and is always taken first ("join the
-- idle instance"): the scan stops at the first idle endpoint it meets. Otherwise the
-- lowest load per unit of weight wins.
--
-- Ties rotate: the scan starts just after the endpoint chosen last time and the first best
-- endpoint in scan order wins, so idle endpoints share new work evenly (a burst of picks
-- before the counters move does not pile onto endpoint 1), and so do equal queues.
--
-- Use for model servers that queue internally (STT, TTS, LLM inference): it is the fix
-- for the incident in DESIGN.md, where a load-blind balancer left 4 of 12 STT instances
-- idle while the others queued. It differs from least_inflight only in the extra weight on
-- requests stuck connecting and in stopping early at an idle endpoint. Like least_inflight
-- it sees only this worker's traffic; use reported_load when the upstream reports its own
-- queue depth.
--
-- Options: none.
-- State:   pool.state.lq_start, the index the next scan starts from.
-- Cost:    O(n) per pick, at most one pass (shorter when an idle endpoint is found), no
--          allocation. Loads per weight are compared by cross-multiplying, so ties are exact.

local M = {}

function M.pick(pool, req)
  local n = pool.n
  if n == 0 then return nil end

  local state = pool.state
  local start = state.lq_start or 1
  if start > n then start = 1 end

  local eps = pool.endpoints
  -- best = 0 means none yet: keeping it a number (not nil) keeps the loop's trace stable.
  local best, best_load, best_w = 0, 0, 1
  local i = start
  for _ = 1, n do
    local ep = eps[i]
    if ep.available then
      local load = tonumber(ep.inflight) + tonumber(ep.queued)
      if load <= 0 then
        best = i
        break
      end
      local w = tonumber(ep.weight)
      if best == 0 or load * best_w < best_load * w then
        best, best_load, best_w = i, load, w
      end
    end
    i = i == n and 1 or i + 1
  end

  if best == 0 then return nil end
  state.lq_start = best == n and 1 or best + 1
  return best
end

return M
