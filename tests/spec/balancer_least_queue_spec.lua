package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

-- Picks `times` times, holding every picked request (inflight + 1, availability
-- recomputed from max_inflight) as the runtime would until the response ends.
local function hold(M, pool, times)
  local seq = {}
  for k = 1, times do
    local i = M.pick(pool, h.make_req())
    if i ~= nil then
      h.check_pick(pool, i)
      h.set(pool, i, { inflight = tonumber(pool.endpoints[i].inflight) + 1 })
    end
    seq[k] = i or false
  end
  return seq
end

local function loads(pool)
  local t = {}
  for i = 1, pool.n do
    local ep = pool.endpoints[i]
    t[i] = tonumber(ep.inflight) + tonumber(ep.queued)
  end
  return t
end

-- The incident in DESIGN.md: 12 STT instances, max_inflight 4, 8 busy, 4 idle (3, 5, 8,
-- 12). A busy instance runs one request and queues the rest internally; the internal
-- queues add up to the reported STT queue depth of 15. Instances 4 and 9 are full.
local INCIDENT_INFLIGHT = { 2, 3, 0, 4, 0, 2, 3, 0, 4, 3, 2, 0 }
local INCIDENT_IDLE = { [3] = true, [5] = true, [8] = true, [12] = true }

local function incident_specs()
  local specs, depth = {}, 0
  for i, v in ipairs(INCIDENT_INFLIGHT) do
    specs[i] = { inflight = v, max_inflight = 4 }
    if v > 0 then depth = depth + v - 1 end
  end
  assert(depth == 15)
  return specs
end

-- A queueing run: 12 single-server FIFO instances (inflight = running + waiting), Poisson
-- arrivals at 80% of capacity, exponential service times averaging 180 ms (the STT figure
-- from the incident). Before each arrival the instances' inflight is brought up to date,
-- then the balancer places the request. The run's own generator is independent of
-- sluice.random(), so every balancer sees the same arrivals and service times.
local function simulate(M, make_pool, arrivals)
  local n, service_ms = 12, 180
  local gap_ms = service_ms / n / 0.8
  local x = 12345
  local function rnd()
    x = (x * 48271) % 2147483647
    return x / 2147483647 -- (0, 1)
  end
  local specs = {}
  for i = 1, n do specs[i] = {} end
  local pool = make_pool(specs)
  local fin, head, tail, last = {}, {}, {}, {}
  for i = 1, n do fin[i], head[i], tail[i], last[i] = {}, 1, 0, 0 end
  local t, waits, total = 0, {}, 0
  local r = { busy_while_idle = 0, max_depth = 0 }
  for k = 1, arrivals do
    t = t - math.log(rnd()) * gap_ms
    local idle = false
    for i = 1, n do
      while head[i] <= tail[i] and fin[i][head[i]] <= t do head[i] = head[i] + 1 end
      local depth = tail[i] - head[i] + 1
      h.set(pool, i, { inflight = depth })
      if depth == 0 then idle = true end
    end
    local i = h.check_pick(pool, M.pick(pool, h.make_req()))
    if idle and tonumber(pool.endpoints[i].inflight) > 0 then
      r.busy_while_idle = r.busy_while_idle + 1
    end
    local start = math.max(t, last[i])
    waits[k] = start - t
    total = total + waits[k]
    last[i] = start - math.log(rnd()) * service_ms
    tail[i] = tail[i] + 1
    fin[i][tail[i]] = last[i]
    r.max_depth = math.max(r.max_depth, tail[i] - head[i] + 1)
  end
  table.sort(waits)
  r.mean_wait = total / arrivals
  r.p99_wait = waits[math.floor(arrivals * 0.99)]
  return r
end

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/least_queue with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/least_queue.lua")
    end)

    local function pool_of(specs)
      return h.make_pool(specs, { ffi = kind.ffi })
    end

    it("picks the shortest queue, counting inflight and queued", function()
      local pool = pool_of({
        { inflight = 3 }, { inflight = 1, queued = 2 }, { inflight = 2 }, { queued = 4 },
      })
      assert.same({ 3, 3, 3 }, h.sequence(M, pool, 3))
    end)

    it("weighs requests waiting for a connection twice (they are in inflight too)", function()
      -- 3 in flight of which 2 still connecting (3 + 2), against 4 running (4 + 0)
      local pool = pool_of({ { inflight = 3, queued = 2 }, { inflight = 4 } })
      assert.equal(2, M.pick(pool, h.make_req()))
      local LI = h.load_policy("balancer/least_inflight.lua")
      assert.equal(1, LI.pick(pool_of({ { inflight = 3, queued = 2 }, { inflight = 4 } }), h.make_req()))
    end)

    it("compares (inflight + queued) / weight", function()
      -- 3/3 < 2/1
      local pool = pool_of({ { inflight = 1, queued = 1 }, { inflight = 2, queued = 1, weight = 3 } })
      assert.equal(2, M.pick(pool, h.make_req()))
    end)

    it("prefers an idle endpoint to any busy one, whatever the weights", function()
      local pool = pool_of({ { inflight = 1, weight = 1000 }, { weight = 1 }, { inflight = 1, weight = 1000 } })
      assert.same({ 2, 2, 2 }, h.sequence(M, pool, 3))
    end)

    it("rotates among idle endpoints so they share new work evenly", function()
      local pool = pool_of({ {}, {}, { inflight = 1 }, {}, { queued = 1 } })
      assert.same({ 1, 2, 4, 1, 2, 4 }, h.sequence(M, pool, 6))
      assert.same({ 300, 300, 0, 300, 0 }, (h.count_picks(M, pool, 900)))
    end)

    it("rotates among equal queues", function()
      local pool = pool_of({ { inflight = 2 }, { inflight = 1, queued = 1 }, { inflight = 3 }, { inflight = 4, weight = 2 } })
      assert.same({ 1, 2, 4, 1, 2, 4 }, h.sequence(M, pool, 6))
    end)

    describe("the STT incident (12 instances, 4 idle while 8 queue, queue depth 15)", function()
      it("sends every new request to the idle instances", function()
        local counts = h.count_picks(M, pool_of(incident_specs()), 400)
        assert.same({ 0, 0, 100, 0, 100, 0, 0, 100, 0, 0, 0, 100 }, counts)
      end)

      it("fills the idle instances first, then always the shortest queues", function()
        local pool = pool_of(incident_specs())
        local seq = {}
        for k = 1, 26 do
          local before = loads(pool)
          local min = math.huge
          for i = 1, pool.n do
            if pool.endpoints[i].available and before[i] < min then min = before[i] end
          end
          local i = hold(M, pool, 1)[1]
          seq[k] = i
          if i then assert.equal(min, before[i]) end -- never a longer queue than necessary
        end
        assert.same({
          3, 5, 8, 12,                    -- the 4 idle instances, one request each
          3, 5, 8, 12,                    -- now the shortest queues (1 request) ...
          1, 3, 5, 6, 8, 11, 12,          -- ... then every instance at 2 ...
          1, 2, 3, 5, 6, 7, 8, 10, 11, 12, -- ... and at 3, until all are full (4)
          false,                          -- no free slot: the request waits in the pool queue
        }, seq)
        assert.same({ 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4 }, loads(pool))
      end)

      it("where a load-blind balancer keeps feeding the queues", function()
        local RR = h.load_policy("balancer/round_robin.lua")
        local pool = pool_of(incident_specs())
        local counts = h.count_picks(RR, pool, 1000)
        local to_busy = 0
        for i = 1, 12 do
          if not INCIDENT_IDLE[i] then to_busy = to_busy + counts[i] end
        end
        assert.equal(600, to_busy) -- 6 of the 10 instances with a free slot are busy
        counts = h.count_picks(M, pool, 1000)
        to_busy = 0
        for i = 1, 12 do
          if not INCIDENT_IDLE[i] then to_busy = to_busy + counts[i] end
        end
        assert.equal(0, to_busy)
      end)

      it("never queues behind a busy instance while one is idle, under random load", function()
        local function make(specs) return pool_of(specs) end
        local lq = simulate(M, make, 4000)
        assert.equal(0, lq.busy_while_idle)

        local rr = simulate(h.load_policy("balancer/round_robin.lua"), make, 4000)
        assert(rr.busy_while_idle > 1000, "round_robin busy_while_idle " .. rr.busy_while_idle)
        -- figures for this run: least_queue mean wait 76 ms, p99 0.77 s, deepest queue 4;
        -- round_robin 461 ms, 2.2 s, 14 (p2c 228 ms, 1.2 s, 7; random 811 ms, 5.0 s, 30)
        assert(lq.mean_wait * 4 < rr.mean_wait, lq.mean_wait .. " vs " .. rr.mean_wait)
        assert(lq.p99_wait * 2 < rr.p99_wait, lq.p99_wait .. " vs " .. rr.p99_wait)
        assert(lq.max_depth <= 4 and rr.max_depth >= 10, lq.max_depth .. " vs " .. rr.max_depth)
      end)
    end)

    it("fills endpoints in proportion to their weights", function()
      local pool = pool_of({ { weight = 1 }, { weight = 3 }, { weight = 2 } })
      hold(M, pool, 60)
      assert.same({ 10, 30, 20 }, loads(pool))
    end)

    it("never returns an unavailable endpoint, however short its queue", function()
      local pool = pool_of({
        { inflight = 3 }, { state = h.OPEN }, { inflight = 1, max_inflight = 1 },
        { available = false }, { inflight = 4 },
      })
      assert.same({ 100, 0, 0, 0, 0 }, (h.count_picks(M, pool, 100)))
    end)

    it("returns nil when every endpoint is unavailable", function()
      local pool = pool_of({ { available = false }, { state = h.OPEN }, { inflight = 1, max_inflight = 1 } })
      local counts, nils = h.count_picks(M, pool, 10)
      assert.same({ 0, 0, 0 }, counts)
      assert.equal(10, nils)
    end)

    it("returns nil for an empty pool", function()
      assert.is_nil(M.pick(pool_of({}), h.make_req()))
    end)

    it("follows load, queue and availability changes between calls", function()
      local pool = pool_of({ { inflight = 1 }, { inflight = 2 } })
      assert.equal(1, M.pick(pool, h.make_req()))
      h.set(pool, 1, { queued = 2 })
      assert.equal(2, M.pick(pool, h.make_req()))
      h.set(pool, 2, { state = h.OPEN })
      assert.equal(1, M.pick(pool, h.make_req()))
      h.set(pool, 2, { state = h.HALF_OPEN, inflight = 0 })
      assert.equal(2, M.pick(pool, h.make_req()))
    end)

    it("keeps its state in pool.state only and draws no randomness", function()
      local a = pool_of({ {}, {}, {} })
      local b = pool_of({ {}, {}, {} })
      assert.same({ 1, 2 }, h.sequence(M, a, 2))
      assert.same({ 1, 2, 3 }, h.sequence(M, b, 3))
      assert.same({ 3, 1 }, h.sequence(M, a, 2))
      a.state = {}
      assert.same({ 1, 2 }, h.sequence(M, a, 2))
      assert.equal(0, fake.draws)
    end)
  end)
end
