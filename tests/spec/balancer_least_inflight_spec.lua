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

local function inflights(pool)
  local t = {}
  for i = 1, pool.n do t[i] = tonumber(pool.endpoints[i].inflight) end
  return t
end

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/least_inflight with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/least_inflight.lua")
    end)

    local function pool_of(specs)
      return h.make_pool(specs, { ffi = kind.ffi })
    end

    it("picks the endpoint with the fewest requests in flight", function()
      local pool = pool_of({ { inflight = 3 }, { inflight = 1 }, { inflight = 2 } })
      assert.same({ 2, 2, 2 }, h.sequence(M, pool, 3))
    end)

    it("compares inflight / weight, not raw inflight", function()
      -- ratios 2/3 and 1/1: the heavier endpoint wins despite more requests in flight
      local pool = pool_of({ { inflight = 2, weight = 3 }, { inflight = 1, weight = 1 } })
      assert.equal(1, M.pick(pool, h.make_req()))
      -- ratios 4/4 and 3/1
      pool = pool_of({ { inflight = 3, weight = 1 }, { inflight = 4, weight = 4 } })
      assert.equal(2, M.pick(pool, h.make_req()))
    end)

    it("sends every request to the idle instances while others are busy", function()
      -- the incident: 12 instances, 8 busy; new work must go to the 4 idle ones
      local specs = {}
      for i = 1, 12 do specs[i] = { inflight = (i % 3 == 0) and 0 or 2, max_inflight = 4 } end
      local pool = pool_of(specs)
      local counts = h.count_picks(M, pool, 400)
      assert.same({ 0, 0, 100, 0, 0, 100, 0, 0, 100, 0, 0, 100 }, counts)
    end)

    it("rotates among equally loaded endpoints", function()
      local pool = pool_of({ {}, {}, {} })
      assert.same({ 1, 2, 3, 1, 2, 3, 1 }, h.sequence(M, pool, 7))
    end)

    it("spreads ties evenly when only some endpoints tie", function()
      local pool = pool_of({ {}, {}, { inflight = 5 }, {} })
      assert.same({ 1, 2, 4, 1, 2, 4 }, h.sequence(M, pool, 6))
      pool = pool_of({ {}, {}, { inflight = 5 } })
      assert.same({ 500, 500, 0 }, (h.count_picks(M, pool, 1000)))
    end)

    it("treats equal ratios with different weights as a tie", function()
      local pool = pool_of({ { inflight = 1, weight = 1 }, { inflight = 2, weight = 2 } })
      assert.same({ 1, 2, 1, 2 }, h.sequence(M, pool, 4))
    end)

    it("fills endpoints evenly up to max_inflight, then returns nil", function()
      local pool = pool_of({ { max_inflight = 2 }, { max_inflight = 2 }, { max_inflight = 2 } })
      assert.same({ 1, 2, 3, 1, 2, 3, false, false }, hold(M, pool, 8))
      assert.same({ 2, 2, 2 }, inflights(pool))
    end)

    it("fills endpoints in proportion to their weights", function()
      local pool = pool_of({ { weight = 1 }, { weight = 3 }, { weight = 2 } })
      hold(M, pool, 60)
      assert.same({ 10, 30, 20 }, inflights(pool))
    end)

    it("never returns an unavailable endpoint, however idle", function()
      local pool = pool_of({
        { inflight = 3 }, { state = h.OPEN }, { inflight = 1, max_inflight = 1 },
        { inflight = 2, available = false }, { inflight = 4 },
      })
      assert.same({ 1, 1, 1 }, h.sequence(M, pool, 3))
      local counts = h.count_picks(M, pool, 100)
      assert.same({ 100, 0, 0, 0, 0 }, counts)
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

    it("follows load and weight changes between calls", function()
      local pool = pool_of({ { inflight = 1 }, { inflight = 2 } })
      assert.equal(1, M.pick(pool, h.make_req()))
      h.set(pool, 1, { inflight = 3 })
      assert.equal(2, M.pick(pool, h.make_req()))
      h.set(pool, 1, { weight = 4 }) -- 3/4 < 2/1
      assert.equal(1, M.pick(pool, h.make_req()))
    end)

    it("picks an endpoint again as soon as it becomes available", function()
      local pool = pool_of({ { inflight = 2 }, { state = h.OPEN }, { inflight = 1 } })
      assert.equal(3, M.pick(pool, h.make_req()))
      h.set(pool, 2, { state = h.HALF_OPEN })
      assert.equal(2, M.pick(pool, h.make_req()))
      h.set(pool, 2, { state = h.OPEN })
      assert.equal(3, M.pick(pool, h.make_req()))
    end)

    it("keeps its state in pool.state only", function()
      local a = pool_of({ {}, {}, {} })
      local b = pool_of({ {}, {}, {} })
      assert.same({ 1, 2 }, h.sequence(M, a, 2))
      assert.same({ 1, 2, 3 }, h.sequence(M, b, 3))
      assert.same({ 3, 1 }, h.sequence(M, a, 2))
      assert.is_not_nil(next(a.state))
      a.state = {}
      assert.same({ 1, 2 }, h.sequence(M, a, 2))
      assert.same({ 0, 0, 0 }, inflights(a))
    end)

    it("does not draw randomness", function()
      h.count_picks(M, pool_of({ {}, {} }), 10)
      assert.equal(0, fake.draws)
    end)
  end)
end
