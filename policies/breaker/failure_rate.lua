-- failure_rate: eject an endpoint when its share of failures over a sliding window is too high.
--
-- When: instances that degrade (some requests fail) rather than die; a minimum volume keeps a
-- quiet endpoint from being ejected over one or two failures.
--
-- Knobs (pool.breaker): failure_rate (0.5), window_ms (10000), min_requests (20), open_ms,
-- max_open_ms, half_open_probes, max_ejected_share (as in consecutive.lua).
--
-- The window is 10 buckets of window_ms/10 each, kept in the endpoint's state table; counts
-- older than the window are dropped as time moves on. Half-open behaves as in consecutive.lua,
-- and closing clears the window.
local M = {}

local CLOSED, HALF_OPEN = 0, 2
local BUCKETS = 10

local function duration(cfg, n)
  local d = cfg.open_ms * n
  if d > cfg.max_open_ms then d = cfg.max_open_ms end
  return d
end

local function reset(st)
  for i = 1, BUCKETS do st.total[i] = 0; st.failed[i] = 0 end
end

-- Advances the ring to the bucket for now_ms, zeroing buckets that fell out of the window.
local function bucket(st, now_ms, width)
  local slot = math.floor(now_ms / width)
  if not st.total then
    st.total, st.failed = {}, {}
    reset(st)
    st.slot = slot
  end
  local gap = slot - st.slot
  if gap >= BUCKETS then
    reset(st)
  else
    for s = st.slot + 1, slot do
      local i = s % BUCKETS + 1
      st.total[i] = 0; st.failed[i] = 0
    end
  end
  if gap > 0 then st.slot = slot end
  return st.slot % BUCKETS + 1
end

function M.record(ep, outcome, now_ms, st, pool)
  local cfg = pool.breaker
  local state = ep.state
  local i = bucket(st, now_ms, cfg.window_ms / BUCKETS)
  if state ~= CLOSED then
    if outcome.ok then
      reset(st)
      return "close"
    end
    if state == HALF_OPEN then return "open", duration(cfg, ep.ejections + 1) end
    return nil
  end
  st.total[i] = st.total[i] + 1
  if not outcome.ok then st.failed[i] = st.failed[i] + 1 end
  local total, failed = 0, 0
  for b = 1, BUCKETS do total = total + st.total[b]; failed = failed + st.failed[b] end
  if total >= cfg.min_requests and failed / total >= cfg.failure_rate then
    reset(st)
    return "open", duration(cfg, ep.ejections + 1)
  end
  return nil
end

return M
