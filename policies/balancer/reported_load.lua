-- Reported load: choose the available endpoint with the lowest
--
--     (max(reported_load, 0) + inflight) / weight
--
-- reported_load is the load figure the upstream last sent back in a response header (for
-- a model server, typically its own queue depth); inflight is what this worker has sent
-- it and not yet seen finish. The report is what the endpoint knew when it answered,
-- inflight adds what this worker sent since, as far as it can tell. The sum is a
-- deliberate simplification: requests that were in flight when the report was made are
-- counted twice (once in the report, once in inflight), which only makes an endpoint this
-- worker is already using look a little busier. An endpoint that never reported
-- (reported_load = -1) is judged by inflight alone, like least_inflight.
--
-- Ties rotate: the scan starts just after the endpoint chosen last time, and the first
-- best endpoint in scan order wins.
--
-- Use when the upstream's own queue is the truth and this worker sees only part of the
-- traffic: several gateway workers or processes, other clients hitting the same model
-- servers, or requests of very different cost (the server knows its backlog in tokens or
-- audio seconds; the gateway only counts requests).
--
-- A report is only refreshed by a response, so an endpoint that reported a high load and
-- then stopped getting requests keeps that figure until the others look busier still.
-- `stale_ms` bounds this: a report from an endpoint that has completed no request (no
-- change in successes + fails) for stale_ms is ignored, so the endpoint is judged by
-- inflight, gets a request and reports again.
--
-- Options: stale_ms (integer >= 0, default 0 = reports never go stale): see above.
-- State:   pool.state.rl_start, the index the next scan starts from; rl_stale_ms, the
--          validated option; with stale_ms also rl_done[i] / rl_since[i] (each endpoint's
--          completions count and the sluice.now_ms() it last changed) and rl_n.
-- Cost:    O(n) per pick, one pass, no allocation after the first pick. stale_ms adds
--          two int64 counter reads and two table reads per endpoint (about 1.5x the time).

local M = {}

local floor, max = math.floor, math.max

local function stale_option(pool)
  local s = pool.options.stale_ms
  if s == nil then return 0 end
  if type(s) ~= "number" or s < 0 or s ~= floor(s) then
    error("reported_load: balancer_options.stale_ms must be an integer >= 0, got " .. tostring(s), 0)
  end
  return s
end

function M.pick(pool, req)
  local n = pool.n
  if n == 0 then return nil end

  local state = pool.state
  local stale_ms = state.rl_stale_ms
  if stale_ms == nil then
    stale_ms = stale_option(pool)
    state.rl_stale_ms = stale_ms
  end
  local done, since, now = state.rl_done, state.rl_since, 0
  if stale_ms > 0 then
    now = sluice.now_ms()
    if state.rl_n ~= n then
      -- dense arrays of numbers (-1: nothing seen yet) keep the loop's trace stable
      done, since = {}, {}
      for j = 1, n do done[j], since[j] = -1, now end
      state.rl_done, state.rl_since, state.rl_n = done, since, n
    end
  end

  local start = state.rl_start or 1
  if start > n then start = 1 end

  local eps = pool.endpoints
  -- best = 0 means none yet: keeping it a number (not nil) keeps the loop's trace stable.
  local best, best_load, best_w = 0, 0, 1
  local i = start
  for _ = 1, n do
    local ep = eps[i]
    if ep.available then
      local r = max(tonumber(ep.reported_load), 0) -- -1 = never reported
      if stale_ms > 0 then
        local c = tonumber(ep.successes) + tonumber(ep.fails)
        if done[i] ~= c then
          done[i], since[i] = c, now
        elseif now - since[i] >= stale_ms then
          r = 0
        end
      end
      local load, w = r + tonumber(ep.inflight), tonumber(ep.weight)
      if best == 0 or load * best_w < best_load * w then
        best, best_load, best_w = i, load, w
      end
    end
    i = i == n and 1 or i + 1
  end

  if best == 0 then return nil end
  state.rl_start = best == n and 1 or best + 1
  return best
end

return M
