package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

-- Note: the helpers' endpoints default to reported_load = 0 ("reported an empty queue");
-- the runtime starts at -1 ("never reported"), so specs say which they mean.

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

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/reported_load with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/reported_load.lua")
    end)

    local function pool_of(specs, options)
      return h.make_pool(specs, { ffi = kind.ffi, options = options })
    end

    it("picks the lowest reported load plus inflight", function()
      -- 5 + 0, 1 + 2, 2 + 0
      local pool = pool_of({ { reported_load = 5 }, { reported_load = 1, inflight = 2 }, { reported_load = 2 } })
      assert.same({ 3, 3 }, h.sequence(M, pool, 2))
      h.set(pool, 3, { inflight = 2 }) -- 5, 3, 4
      assert.equal(2, M.pick(pool, h.make_req()))
    end)

    it("follows the upstream's queue that this worker cannot see", function()
      -- other gateways keep instances 1-3 busy: this worker has nothing in flight anywhere
      local pool = pool_of({ { reported_load = 6 }, { reported_load = 3 }, { reported_load = 9 }, { reported_load = 0 } })
      assert.same({ 4, 4, 4 }, h.sequence(M, pool, 3))
      local LI = h.load_policy("balancer/least_inflight.lua")
      assert.same({ 1, 2, 3 }, h.sequence(LI, pool, 3)) -- blind to it
    end)

    it("judges an endpoint that never reported by inflight alone", function()
      local pool = pool_of({ { reported_load = -1, inflight = 2 }, { reported_load = 1 } })
      assert.equal(2, M.pick(pool, h.make_req())) -- 2 vs 1
      h.set(pool, 2, { reported_load = 3 })
      assert.equal(1, M.pick(pool, h.make_req())) -- 2 vs 3
      local never = pool_of({ { reported_load = -1, inflight = 1 }, { reported_load = -1 }, { reported_load = -1 } })
      assert.same({ 2, 3, 2, 3 }, h.sequence(M, never, 4))
    end)

    it("divides by weight", function()
      -- (3 + 1) / 4 = 1 < 2 / 1
      local pool = pool_of({ { reported_load = 2 }, { reported_load = 3, inflight = 1, weight = 4 } })
      assert.equal(2, M.pick(pool, h.make_req()))
    end)

    it("accepts fractional reports", function()
      local pool = pool_of({ { reported_load = 0.75 }, { reported_load = 0.5 }, { reported_load = 0.6 } })
      assert.equal(2, M.pick(pool, h.make_req()))
    end)

    it("rotates among equal loads", function()
      local pool = pool_of({ { reported_load = 1 }, { inflight = 1 }, { reported_load = 2 }, { reported_load = -1, inflight = 1 } })
      assert.same({ 1, 2, 4, 1, 2, 4 }, h.sequence(M, pool, 6))
    end)

    it("adds what it sends on top of the last report", function()
      local pool = pool_of({ { reported_load = 4 }, { reported_load = 1 }, { reported_load = 2 } })
      -- loads 4 1 2 -> 2; 4 2 2 -> 3 (ties rotate); 4 2 3 -> 2; ... until all reach 4
      assert.same({ 2, 3, 2, 3, 2, 3, 1, 2 }, hold(M, pool, 8))
    end)

    describe("stale_ms", function()
      it("ignores a report from an endpoint that completed nothing for stale_ms", function()
        local pool = pool_of({ { reported_load = 50 }, { reported_load = 2 }, { reported_load = 3 } }, { stale_ms = 1000 })
        local done = 0
        local function pick_after(ms) -- endpoints 2 and 3 keep answering, 1 gets nothing
          fake.advance(ms)
          done = done + 1
          h.set(pool, 2, { successes = done })
          h.set(pool, 3, { fails = done })
          return M.pick(pool, h.make_req())
        end
        assert.equal(2, pick_after(0))
        assert.equal(2, pick_after(999))
        assert.equal(1, pick_after(1)) -- 50 is 1000 ms old: judged by inflight, 0
        -- it answers (successes + 1) and reports again: fresh, and high, again
        h.set(pool, 1, { successes = 1, reported_load = 40 })
        assert.equal(2, pick_after(0))
        assert.equal(2, pick_after(999))
        assert.equal(1, pick_after(1))
      end)

      it("keeps reports fresh while the endpoint keeps answering", function()
        local pool = pool_of({ { reported_load = 8 }, { reported_load = 5 } }, { stale_ms = 100 })
        for k = 1, 20 do
          fake.advance(60)
          h.set(pool, 1, { successes = k })
          h.set(pool, 2, { fails = k })
          assert.equal(2, M.pick(pool, h.make_req()))
        end
      end)

      it("is off by default: a stale report stays", function()
        local pool = pool_of({ { reported_load = 50 }, { reported_load = 2 } })
        fake.advance(1e9)
        assert.equal(2, M.pick(pool, h.make_req()))
      end)

      it("rejects a bad value", function()
        for _, bad in ipairs({ -1, 1.5, "100" }) do
          local M2 = h.load_policy("balancer/reported_load.lua")
          local ok, err = pcall(M2.pick, pool_of({ {} }, { stale_ms = bad }), h.make_req())
          assert.is_false(ok)
          assert.matches("balancer_options%.stale_ms", err)
        end
      end)
    end)

    it("never returns an unavailable endpoint, however low its report", function()
      local pool = pool_of({
        { reported_load = 9 }, { state = h.OPEN }, { reported_load = 0, inflight = 1, max_inflight = 1 },
        { available = false }, { reported_load = 7, inflight = 4 },
      })
      assert.same({ 100, 0, 0, 0, 0 }, (h.count_picks(M, pool, 100)))
    end)

    it("returns nil when every endpoint is unavailable, and for an empty pool", function()
      local pool = pool_of({ { available = false }, { state = h.OPEN } })
      local _, nils = h.count_picks(M, pool, 5)
      assert.equal(5, nils)
      assert.is_nil(M.pick(pool_of({}), h.make_req()))
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
