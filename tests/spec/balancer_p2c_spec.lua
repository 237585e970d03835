package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

-- Picks `times` times, holding every picked request (inflight + 1) as the runtime would
-- until the response ends.
local function hold(M, pool, times)
  for _ = 1, times do
    local i = M.pick(pool, h.make_req())
    if i ~= nil then
      h.check_pick(pool, i)
      h.set(pool, i, { inflight = tonumber(pool.endpoints[i].inflight) + 1 })
    end
  end
end

local function spread(pool)
  local lo, hi = math.huge, -math.huge
  for i = 1, pool.n do
    local v = tonumber(pool.endpoints[i].inflight)
    if v < lo then lo = v end
    if v > hi then hi = v end
  end
  return hi - lo
end

-- Draw u in [0, 1) such that floor(u * m) + 1 == idx.
local function at(idx, m) return (idx - 1 + 0.5) / m end

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/p2c with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/p2c.lua")
      fake.seed(7)
    end)

    local function pool_of(specs)
      return h.make_pool(specs, { ffi = kind.ffi })
    end

    it("takes the less loaded of the two drawn endpoints", function()
      local pool = pool_of({ { inflight = 5 }, { inflight = 1 }, { inflight = 3 }, { inflight = 2 } })
      -- first draw from 1..4, second from the 3 others (indices >= the first shift up)
      fake.script({ at(1, 4), at(2, 3), at(3, 4), at(3, 3), at(2, 4), at(3, 3) })
      assert.same({ 3, 4, 2 }, h.sequence(M, pool, 3)) -- {1,3} -> 3; {3,4} -> 4; {2,4} -> 2
      assert.equal(6, fake.draws)
    end)

    it("draws two distinct endpoints", function()
      local pool = pool_of({ { inflight = 1 }, { inflight = 0 }, { inflight = 2 } })
      -- second draw 0 would be endpoint 1 again: it is the first of the others, endpoint 2
      fake.script({ 0, 0 })
      assert.equal(2, M.pick(pool, h.make_req()))
      fake.script({ at(3, 3), at(2, 2) }) -- first 3; second from {1, 2} -> 2
      assert.equal(2, M.pick(pool, h.make_req()))
    end)

    it("keeps the first drawn endpoint on a tie", function()
      local pool = pool_of({ { inflight = 2 }, { inflight = 2, weight = 1 }, { inflight = 4, weight = 2 } })
      fake.script({ at(2, 3), 0, at(3, 3), 0, at(1, 3), at(2, 2) })
      assert.same({ 2, 3, 1 }, h.sequence(M, pool, 3))
    end)

    it("compares inflight / weight", function()
      local pool = pool_of({ { inflight = 2, weight = 3 }, { inflight = 1, weight = 1 } })
      fake.script({ at(2, 2), 0 }) -- 2 drawn first, 1 second: 2/3 < 1/1
      assert.equal(1, M.pick(pool, h.make_req()))
    end)

    it("redraws a slot that lands on an unavailable endpoint", function()
      local pool = pool_of({ { state = h.OPEN }, { inflight = 3 }, { available = false }, { inflight = 1 } })
      -- slot 1: 1 (open), 3 (unavailable), 2; slot 2 (others of 2): 3 (unavailable), 4
      fake.script({ at(1, 4), at(3, 4), at(2, 4), at(2, 3), at(3, 3) })
      assert.equal(4, M.pick(pool, h.make_req()))
      assert.equal(5, fake.draws)
    end)

    it("returns the only available endpoint", function()
      assert.same({ 1, 1 }, h.sequence(M, pool_of({ {} }), 2))
      assert.equal(0, fake.draws) -- a single endpoint needs no draw

      local specs = {}
      for i = 1, 9 do specs[i] = { available = false } end
      specs[6] = { inflight = 7 }
      local counts = h.count_picks(M, pool_of(specs), 200)
      assert.equal(200, counts[6])
    end)

    it("falls back to a scan when most endpoints are unavailable, with bounded draws", function()
      local specs = {}
      for i = 1, 200 do specs[i] = { state = h.OPEN } end
      specs[17] = { inflight = 4 }
      specs[123] = { inflight = 1 }
      specs[190] = { inflight = 2 }
      local pool = pool_of(specs)
      local per = {}
      for k = 1, 300 do
        local before = fake.draws
        h.check_pick(pool, M.pick(pool, h.make_req()))
        per[k] = fake.draws - before
      end
      for k = 1, 300 do assert(per[k] >= 2 and per[k] <= 10, "draws per pick: " .. per[k]) end
      -- pairs are uniform among the 3 available: {123,x} -> 123, {17,190} -> 190
      local counts = h.count_picks(M, pool, 30000)
      assert.equal(0, counts[17])
      assert(math.abs(counts[123] - 20000) < 500, counts[123])
      assert(math.abs(counts[190] - 10000) < 500, counts[190])
    end)

    it("returns nil after a bounded number of draws when every endpoint is unavailable", function()
      local specs = {}
      for i = 1, 50 do specs[i] = { available = false } end
      local pool = pool_of(specs)
      local counts, nils = h.count_picks(M, pool, 10)
      assert.equal(10, nils)
      assert.equal(40, fake.draws) -- 4 tries for the first slot, then one counting scan
      assert.same({ false, false }, h.sequence(M, pool_of({ { available = false }, { state = h.OPEN } }), 2))
    end)

    it("returns nil for an empty pool", function()
      assert.is_nil(M.pick(pool_of({}), h.make_req()))
      assert.equal(0, fake.draws)
    end)

    it("never returns an unavailable endpoint while availability changes", function()
      local specs = {}
      for i = 1, 12 do specs[i] = { inflight = i % 4, max_inflight = 6 } end
      local pool = pool_of(specs)
      for round = 1, 200 do
        for i = 1, 12 do
          h.set(pool, i, { state = (fake.sluice.random() < 0.6) and h.OPEN or h.CLOSED })
        end
        for _ = 1, 5 do
          local i = M.pick(pool, h.make_req())
          if i ~= nil then h.check_pick(pool, i) end
        end
      end
    end)

    it("spreads equal loads uniformly", function()
      local pool = pool_of({ {}, {}, {}, {}, {} })
      local counts = h.count_picks(M, pool, 50000)
      for i = 1, 5 do assert(math.abs(counts[i] - 10000) < 500, counts[i]) end
    end)

    it("never picks the most loaded endpoint of the pool", function()
      local pool = pool_of({ { inflight = 1 }, { inflight = 9 }, { inflight = 2 }, { inflight = 0 } })
      local counts = h.count_picks(M, pool, 6000)
      assert.equal(0, counts[2])
      -- pairs are uniform: endpoint 4 wins the 3 of 6 it is in, endpoint 1 wins {1,2}
      -- and {1,3}, endpoint 3 only {2,3}
      assert(math.abs(counts[4] - 3000) < 200, counts[4])
      assert(math.abs(counts[1] - 2000) < 200, counts[1])
      assert(math.abs(counts[3] - 1000) < 150, counts[3])
    end)

    it("keeps held load level, far tighter than random placement", function()
      local specs = {}
      for i = 1, 16 do specs[i] = {} end
      local pool = pool_of(specs)
      hold(M, pool, 1600) -- 100 per endpoint on average
      assert(spread(pool) <= 5, "p2c spread " .. spread(pool))

      local R = h.load_policy("balancer/random.lua", { fake = fake })
      local rpool = pool_of(specs)
      hold(R, rpool, 1600)
      assert(spread(rpool) >= 15, "random spread " .. spread(rpool))
    end)

    it("keeps no state", function()
      local pool = pool_of({ {}, {}, {} })
      h.count_picks(M, pool, 100)
      assert.is_nil(next(pool.state))
    end)
  end)
end
