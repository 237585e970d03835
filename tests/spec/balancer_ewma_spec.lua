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

local function inflights(pool)
  local t = {}
  for i = 1, pool.n do t[i] = tonumber(pool.endpoints[i].inflight) end
  return t
end

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/ewma with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/ewma.lua")
      fake.seed(99)
    end)

    local function pool_of(specs, options)
      return h.make_pool(specs, { ffi = kind.ffi, options = options })
    end

    describe("full scan (choices = 0)", function()
      local SCAN = { choices = 0 }

      it("picks the lowest ewma_ms * (inflight + 1) / weight", function()
        -- costs 100, 120, 150
        local pool = pool_of({ { ewma_ms = 100 }, { ewma_ms = 40, inflight = 2 }, { ewma_ms = 300, weight = 2 } }, SCAN)
        assert.equal(1, M.pick(pool, h.make_req()))
        h.set(pool, 2, { inflight = 1 }) -- 80
        assert.equal(2, M.pick(pool, h.make_req()))
        h.set(pool, 3, { weight = 4 }) -- 75
        assert.equal(3, M.pick(pool, h.make_req()))
      end)

      it("routes around a slow endpoint until the others' backlog outweighs it", function()
        local pool = pool_of({ { ewma_ms = 50 }, { ewma_ms = 200 }, { ewma_ms = 50 } }, SCAN)
        hold(M, pool, 9)
        -- the fast ones cost 50 * (k + 1): the slow one (200) gets its first request only
        -- when they hold 3 each
        assert.same({ 4, 1, 4 }, inflights(pool))
      end)

      it("costs an endpoint without a sample at the mean of the others", function()
        -- mean of 100 and 300 is 200; endpoint 3 costs 200
        local pool = pool_of({ { ewma_ms = 100, inflight = 2 }, { ewma_ms = 300 }, {} }, SCAN)
        assert.equal(3, M.pick(pool, h.make_req())) -- 300, 300, 200
        h.set(pool, 1, { inflight = 0 })             -- 100, 300, 200
        assert.equal(1, M.pick(pool, h.make_req()))
      end)

      it("gives a new endpoint a fair share, neither shunned nor flooded", function()
        local pool = pool_of({ { ewma_ms = 80 }, { ewma_ms = 120 }, { ewma_ms = 100 }, {} }, SCAN)
        hold(M, pool, 40)
        -- costs 80(k+1), 120(k+1), 100(k+1) and the new one at the mean, 100(k+1)
        local f = inflights(pool)
        assert.equal(f[3], f[4])
        assert(f[4] >= 9 and f[4] <= 11, f[4])
        assert(f[1] > f[4] and f[2] < f[4])
      end)

      it("uses default_ms for endpoints without a sample when it is set", function()
        local low = pool_of({ { ewma_ms = 100 }, { ewma_ms = 100 }, {} }, { choices = 0, default_ms = 15 })
        hold(M, low, 10)
        assert.same({ 1, 1, 8 }, inflights(low)) -- 15 * 8 = 120 < 100 * 2
        local M2 = h.load_policy("balancer/ewma.lua")
        local high = pool_of({ { ewma_ms = 100 }, { ewma_ms = 100 }, {} }, { choices = 0, default_ms = 1000 })
        hold(M2, high, 18)
        assert.same({ 9, 9, 0 }, inflights(high)) -- 100 * 9 < 1000 * 1
      end)

      it("decides by inflight / weight alone when no endpoint has a sample", function()
        local pool = pool_of({ { inflight = 1 }, { inflight = 2, weight = 4 }, { inflight = 1 } }, SCAN)
        assert.equal(2, M.pick(pool, h.make_req())) -- 3/4 < 2/1
      end)

      it("rotates among equal costs and draws no randomness", function()
        local pool = pool_of({ { ewma_ms = 50 }, { ewma_ms = 50 }, { ewma_ms = 90 }, { ewma_ms = 25, inflight = 1 } }, SCAN)
        assert.same({ 1, 2, 4, 1, 2, 4 }, h.sequence(M, pool, 6))
        assert.equal(0, fake.draws)
      end)

      it("scans fully when choices >= the number of endpoints", function()
        local pool = pool_of({ { ewma_ms = 50 }, { ewma_ms = 40 }, { ewma_ms = 60 } }, { choices = 3 })
        assert.same({ 2, 2, 2 }, h.sequence(M, pool, 3))
        assert.equal(0, fake.draws)
      end)
    end)

    describe("sampled (power of d choices)", function()
      it("draws two distinct candidates and keeps the cheaper by default", function()
        local pool = pool_of({ { ewma_ms = 300 }, { ewma_ms = 100 }, { ewma_ms = 200 }, { ewma_ms = 50 } })
        -- partial Fisher-Yates over 1..4: slot 1 draws from 4, slot 2 from the 3 left
        fake.script({ 0, 0 }) -- candidates 1 and 2
        assert.equal(2, M.pick(pool, h.make_req()))
        assert.equal(2, fake.draws)
        local fresh = pool_of({ { ewma_ms = 300 }, { ewma_ms = 100 }, { ewma_ms = 200 }, { ewma_ms = 50 } })
        fake.script({ 0.99, 0.99 }) -- candidates 4, then 1 (swapped into the last place)
        assert.equal(4, M.pick(fresh, h.make_req()))
      end)

      it("keeps the first candidate on a tie", function()
        local pool = pool_of({ { ewma_ms = 100, inflight = 1 }, { ewma_ms = 200 }, { ewma_ms = 50, inflight = 3 } })
        fake.script({ 0.5, 0 }) -- candidates 2, then 1: both cost 200
        assert.equal(2, M.pick(pool, h.make_req()))
        local fresh = pool_of({ { ewma_ms = 100, inflight = 1 }, { ewma_ms = 200 }, { ewma_ms = 50, inflight = 3 } })
        fake.script({ 0, 0.5 }) -- candidates 1, then 3: 200 each
        assert.equal(1, M.pick(fresh, h.make_req()))
      end)

      it("skips unavailable draws and never draws more than n numbers", function()
        local pool = pool_of({ { available = false }, { state = h.OPEN }, { ewma_ms = 90 }, { ewma_ms = 30 } })
        fake.script({ 0, 0, 0, 0 }) -- 1 and 2 are unavailable, 3 and 4 are the candidates
        assert.equal(4, M.pick(pool, h.make_req()))
        assert.equal(4, fake.draws)

        fake.script(nil)
        local specs = {}
        for i = 1, 40 do specs[i] = { available = false } end
        specs[29] = { ewma_ms = 10 }
        local sparse = pool_of(specs)
        for _ = 1, 50 do
          local before = fake.draws
          assert.equal(29, M.pick(sparse, h.make_req()))
          assert(fake.draws - before <= 40)
        end
      end)

      it("returns nil after at most n draws when nothing is available", function()
        local pool = pool_of({ { available = false }, { state = h.OPEN }, { available = false } })
        local _, nils = h.count_picks(M, pool, 10)
        assert.equal(10, nils)
        assert.equal(30, fake.draws)
      end)

      it("draws uniform pairs: a slow endpoint wins only against a slower one", function()
        local pool = pool_of({ { ewma_ms = 50 }, { ewma_ms = 60 }, { ewma_ms = 70 }, { ewma_ms = 500 } })
        local counts = h.count_picks(M, pool, 60000)
        -- of the 6 pairs: 1 wins 3, 2 wins 2, 3 wins 1, 4 none
        assert.equal(0, counts[4])
        assert(math.abs(counts[1] - 30000) < 600, counts[1])
        assert(math.abs(counts[2] - 20000) < 600, counts[2])
        assert(math.abs(counts[3] - 10000) < 600, counts[3])
      end)

      it("uses `choices` candidates", function()
        local specs = {}
        for i = 1, 8 do specs[i] = { ewma_ms = 10 * i } end
        local pool = pool_of(specs, { choices = 3 })
        local counts = h.count_picks(M, pool, 56000)
        -- endpoint i wins when it is the cheapest of 3 drawn: C(8-i, 2) / C(8, 3)
        for i = 1, 8 do
          local k = 8 - i
          local expected = 56000 * (k * (k - 1) / 2) / 56
          assert(math.abs(counts[i] - expected) < 700, i .. ": " .. counts[i] .. " vs " .. expected)
        end
        assert.equal(56000 * 3, fake.draws)
      end)

      it("costs endpoints without a sample at the pool mean", function()
        local pool = pool_of({ { ewma_ms = 100 }, { ewma_ms = 300 }, {} })
        local counts = h.count_picks(M, pool, 3000)
        -- costs 100, 300, 200: pairs {1,2} -> 1, {1,3} -> 1, {2,3} -> 3
        assert(math.abs(counts[1] - 2000) < 150, counts[1])
        assert(math.abs(counts[3] - 1000) < 150, counts[3])
        assert.equal(0, counts[2])
      end)

      it("shares held load by speed", function()
        local specs = {}
        for i = 1, 8 do specs[i] = { ewma_ms = (i <= 4) and 50 or 150 } end
        local pool = pool_of(specs)
        hold(M, pool, 800)
        local fast, slow = 0, 0
        for i = 1, 8 do
          local f = tonumber(pool.endpoints[i].inflight)
          if i <= 4 then fast = fast + f else slow = slow + f end
        end
        -- equal cost means 50 (f + 1) = 150 (s + 1): about 3 times the load on fast ones
        assert(fast > 2.5 * slow and fast < 3.5 * slow, fast .. " vs " .. slow)
      end)
    end)

    it("rejects bad options with a message naming them", function()
      for _, bad in ipairs({ { choices = -1 }, { choices = 1.5 }, { choices = "2" }, { default_ms = 0 }, { default_ms = "x" } }) do
        local M2 = h.load_policy("balancer/ewma.lua")
        local ok, err = pcall(M2.pick, pool_of({ {}, {} }, bad), h.make_req())
        assert.is_false(ok)
        assert.matches("balancer_options%.", err)
      end
    end)

    it("never returns an unavailable endpoint, however fast", function()
      for _, choices in ipairs({ 0, 2 }) do
        local pool = pool_of({
          { ewma_ms = 500 }, { ewma_ms = 1, state = h.OPEN }, { ewma_ms = 1, inflight = 1, max_inflight = 1 },
          { ewma_ms = 1, available = false }, { ewma_ms = 900 },
        }, { choices = choices })
        local counts = h.count_picks(M, pool, 500)
        assert.equal(0, counts[2] + counts[3] + counts[4])
        assert.equal(500, counts[1] + counts[5])
      end
    end)

    it("returns nil for an empty pool or when every endpoint is unavailable", function()
      assert.is_nil(M.pick(pool_of({}), h.make_req()))
      assert.is_nil(M.pick(pool_of({ { available = false } }, { choices = 0 }), h.make_req()))
      assert.is_nil(M.pick(pool_of({ { available = false } }), h.make_req()))
    end)

    it("keeps its state in pool.state only", function()
      local a = pool_of({ { ewma_ms = 5 }, { ewma_ms = 5 }, { ewma_ms = 5 } }, { choices = 0 })
      local b = pool_of({ { ewma_ms = 5 }, { ewma_ms = 5 }, { ewma_ms = 5 } }, { choices = 0 })
      assert.same({ 1, 2 }, h.sequence(M, a, 2))
      assert.same({ 1, 2, 3 }, h.sequence(M, b, 3))
      assert.same({ 3, 1 }, h.sequence(M, a, 2))
      a.state = {}
      assert.same({ 1, 2 }, h.sequence(M, a, 2))
    end)
  end)
end
