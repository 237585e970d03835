-- Peak-EWMA latency: choose the endpoint with the lowest expected wait,
--
--     cost = latency * (inflight + 1) / weight
--
-- where latency is the endpoint's ewma_ms, the smoothed time to first byte the runtime
-- keeps per endpoint, and inflight + 1 counts the request being placed: an idle fast
-- endpoint beats an idle slow one, and a fast one with a backlog can lose to an idle slow
-- one. Candidates are drawn at random (`choices` distinct available endpoints, power of d
-- choices) and the cheapest wins, the first one drawn on a tie. `choices = 0` (or choices
-- >= n) compares every available endpoint instead, ties rotated: the scan starts after the
-- endpoint chosen last time. (This is Finagle's peak-EWMA cost; how fast the cost reacts
-- to a latency spike is up to how the runtime smooths ewma_ms.)
--
-- An endpoint without a sample yet (ewma_ms == 0: new, or never answered) is costed at
-- `default_ms` when that is set, else at the mean ewma_ms of the pool's endpoints that have
-- a sample: neither shunned nor flooded, it gets about a fair share, answers, and from then
-- on is judged by its own latency. (When no endpoint has a sample all are costed alike and
-- only inflight / weight decides.) The mean is computed only on picks that meet such an
-- endpoint.
--
-- Use when endpoints differ in speed (mixed GPU generations, a noisy neighbour, a replica
-- warming up) and requests cost about the same: it routes around a slow instance before
-- its queue builds up, which in-flight counts alone only see later. For long streams and
-- WebSocket sessions, where time to first byte says little about the load, prefer
-- least_queue.
--
-- Options: default_ms (number > 0, default unset = the pool mean): latency assumed for
--            endpoints without a sample; set it low to try new endpoints eagerly, high to
--            ease them in;
--          choices (integer >= 0, default 2): candidates per pick; 0 = all (full scan).
--          Read on the first pick of a config generation.
-- State:   pool.state.ewma_k and ewma_default_ms (the validated options); ewma_perm and
--          ewma_perm_n (a permutation of 1..n the candidates are drawn from by a partial
--          Fisher-Yates shuffle, built on the first sampled pick); ewma_start (the full
--          scan's rotation point).
-- Cost:    sampled: O(choices) expected, one sluice.random() per candidate examined; a draw
--          that lands on an unavailable endpoint is not a candidate and the next one is
--          examined, so with most endpoints unavailable a pick costs up to n draws, never
--          more, and returns nil after n draws when none is available. Full scan: O(n), no
--          draws. Plus O(n) on picks that meet an endpoint without a sample (unless
--          default_ms is set). No allocation after the first pick.

local M = {}

local floor = math.floor

-- default_ms if configured, else the mean ewma_ms of the endpoints that have a sample.
local function default_latency(pool, state)
  local d = state.ewma_default_ms
  if d > 0 then return d end
  local eps = pool.endpoints
  local sum, known = 0, 0
  for i = 1, pool.n do
    local e = tonumber(eps[i].ewma_ms)
    if e > 0 then
      sum = sum + e
      known = known + 1
    end
  end
  if known > 0 then return sum / known end
  return 100 -- every endpoint gets the same figure, so its value does not matter
end

-- Validates the options once per config generation and caches them in pool.state.
local function configure(pool, state)
  local opts = pool.options
  local k = opts.choices
  if k == nil then k = 2 end
  if type(k) ~= "number" or k < 0 or k ~= floor(k) then
    error("ewma: balancer_options.choices must be an integer >= 0, got " .. tostring(k), 0)
  end
  local d = opts.default_ms
  if d == nil then
    d = 0 -- use the pool mean
  elseif type(d) ~= "number" or not (d > 0 and d < math.huge) then
    error("ewma: balancer_options.default_ms must be a number > 0, got " .. tostring(d), 0)
  end
  state.ewma_default_ms = d
  state.ewma_k = k
  return k
end

function M.pick(pool, req)
  local n = pool.n
  if n == 0 then return nil end

  local state = pool.state
  local k = state.ewma_k
  if k == nil then k = configure(pool, state) end

  local eps = pool.endpoints
  -- dflt < 0: the no-sample latency has not been computed on this pick yet.
  -- best = 0: no candidate yet. Both stay numbers to keep the loops' traces stable.
  local dflt, best, best_cost = -1, 0, 0

  if k == 0 or k >= n then
    local start = state.ewma_start or 1
    if start > n then start = 1 end
    local i = start
    for _ = 1, n do
      local ep = eps[i]
      if ep.available then
        local e = tonumber(ep.ewma_ms)
        if e <= 0 then
          if dflt < 0 then dflt = default_latency(pool, state) end
          e = dflt
        end
        local cost = e * (tonumber(ep.inflight) + 1) / tonumber(ep.weight)
        if best == 0 or cost < best_cost then
          best, best_cost = i, cost
        end
      end
      i = i == n and 1 or i + 1
    end
    if best == 0 then return nil end
    state.ewma_start = best == n and 1 or best + 1
    return best
  end

  local perm = state.ewma_perm
  if perm == nil or state.ewma_perm_n ~= n then
    perm = {}
    for i = 1, n do perm[i] = i end
    state.ewma_perm, state.ewma_perm_n = perm, n
  end

  local found = 0
  for j = 1, n do
    -- partial Fisher-Yates: perm[j] becomes a uniform draw among perm[j..n]
    local r = j + floor(sluice.random() * (n - j + 1))
    local i = perm[r]
    perm[r] = perm[j]
    perm[j] = i
    local ep = eps[i]
    if ep.available then
      local e = tonumber(ep.ewma_ms)
      if e <= 0 then
        if dflt < 0 then dflt = default_latency(pool, state) end
        e = dflt
      end
      local cost = e * (tonumber(ep.inflight) + 1) / tonumber(ep.weight)
      if best == 0 or cost < best_cost then
        best, best_cost = i, cost
      end
      found = found + 1
      if found == k then break end
    end
  end
  if best == 0 then return nil end
  return best
end

return M
