-- consecutive: eject an endpoint after N failures in a row.
--
-- When: simple and predictable; good for instances that fail hard (crash, refuse connections,
-- answer 5xx) rather than degrade gradually (see failure_rate for that).
--
-- Knobs (pool.breaker): failures (default 5), open_ms (30000), max_open_ms (300000),
-- half_open_probes (1, enforced by the runtime), max_ejected_share (0.5, panic threshold,
-- enforced by the runtime).
--
-- States: closed → open after `failures` consecutive failures; the runtime turns an open
-- endpoint half-open when its time is up and lets `half_open_probes` requests through; a probe
-- success closes it, a probe failure opens it again for longer: open_ms × n for the n-th
-- ejection in a row, capped at max_open_ms.
-- A failure is an attempt without a response, or a 5xx response (outcome.ok == false).
local M = {}

local CLOSED, HALF_OPEN = 0, 2

local function duration(cfg, n)
  local d = cfg.open_ms * n
  if d > cfg.max_open_ms then d = cfg.max_open_ms end
  return d
end

function M.record(ep, outcome, now_ms, st, pool)
  local state = ep.state
  if outcome.ok then
    st.fails = 0
    if state ~= CLOSED then return "close" end
    return nil
  end
  local fails = (st.fails or 0) + 1
  st.fails = fails
  if state == HALF_OPEN or (state == CLOSED and fails >= pool.breaker.failures) then
    return "open", duration(pool.breaker, ep.ejections + 1)
  end
  return nil
end

return M
