package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local function weights(pool)
  local w = {}
  for i = 1, pool.n do w[i] = tonumber(pool.endpoints[i].weight) end
  return w
end

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/round_robin with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/round_robin.lua")
    end)

    local function pool_of(specs)
      return h.make_pool(specs, { ffi = kind.ffi })
    end

    it("gives nginx's smooth sequence a a b a c a a for weights {5,1,1}", function()
      local pool = pool_of({ { weight = 5 }, { weight = 1 }, { weight = 1 } })
      assert.same({ 1, 1, 2, 1, 3, 1, 1, 1, 1, 2, 1, 3, 1, 1 }, h.sequence(M, pool, 14))
    end)

    it("is a plain rotation with equal weights", function()
      local pool = pool_of({ {}, {}, {}, {} })
      assert.same({ 1, 2, 3, 4, 1, 2, 3, 4, 1 }, h.sequence(M, pool, 9))
    end)

    it("matches the weights exactly in every window of total-weight picks", function()
      local pool = pool_of({ { weight = 3 }, { weight = 2 }, { weight = 1 }, { weight = 4 } })
      local seq = h.sequence(M, pool, 100)
      for start = 1, 91 do
        local counts = { 0, 0, 0, 0 }
        for k = start, start + 9 do counts[seq[k]] = counts[seq[k]] + 1 end
        assert.same({ 3, 2, 1, 4 }, counts)
      end
    end)

    it("matches the weights exactly over many picks", function()
      local pool = pool_of({ { weight = 7 }, { weight = 1 }, { weight = 12 } })
      local counts, nils = h.count_picks(M, pool, 20000)
      assert.same({ 7000, 1000, 12000 }, counts)
      assert.equal(0, nils)
    end)

    it("never returns an unavailable endpoint and shares its turns among the rest", function()
      local pool = pool_of({ { weight = 2 }, { weight = 5, available = false }, { weight = 1 } })
      assert.same({ 1, 3, 1, 1, 3, 1 }, h.sequence(M, pool, 6))
      local counts = h.count_picks(M, pool, 3000)
      assert.same({ 2000, 0, 1000 }, counts)
    end)

    it("treats a full endpoint (inflight == max_inflight) as unavailable", function()
      local pool = pool_of({ { inflight = 2, max_inflight = 2 }, { max_inflight = 2 }, {} })
      assert.is_false(pool.endpoints[1].available)
      assert.same({ 0, 50, 50 }, (h.count_picks(M, pool, 100)))
    end)

    it("returns nil when every endpoint is unavailable", function()
      local pool = pool_of({ { available = false }, { state = h.OPEN }, { inflight = 1, max_inflight = 1 } })
      local counts, nils = h.count_picks(M, pool, 10)
      assert.same({ 0, 0, 0 }, counts)
      assert.equal(10, nils)
    end)

    it("returns nil for an empty pool", function()
      local pool = pool_of({})
      assert.is_nil(M.pick(pool, h.make_req()))
      assert.is_nil(M.pick(pool, h.make_req()))
    end)

    it("follows weight changes between calls", function()
      local pool = pool_of({ {}, {} })
      assert.same({ 1, 2, 1, 2, 1, 2, 1 }, h.sequence(M, pool, 7))
      h.set(pool, 1, { weight = 3 })
      for _ = 1, 5 do
        assert.same({ 3, 1 }, (h.count_picks(M, pool, 4)))
      end
      h.set(pool, 1, { weight = 1 })
      h.set(pool, 2, { weight = 4 })
      assert.same({ 200, 800 }, (h.count_picks(M, pool, 1000)))
    end)

    it("takes an endpoint back into rotation when it becomes available again", function()
      local pool = pool_of({ { weight = 2 }, {}, {} })
      h.count_picks(M, pool, 3)
      h.set(pool, 3, { state = h.OPEN })
      -- Endpoint 1 carries its current weight over (+2), so it is one pick ahead of 2:1.
      local during = h.count_picks(M, pool, 9)
      assert.same({ 7, 2, 0 }, during)
      h.set(pool, 3, { state = h.CLOSED })
      assert.same({ 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1 }, h.sequence(M, pool, 12))
      assert.same({ 200, 100, 100 }, (h.count_picks(M, pool, 400)))
    end)

    it("recovers from all endpoints being unavailable", function()
      local pool = pool_of({ { weight = 5 }, { weight = 1 }, { weight = 1 } })
      h.sequence(M, pool, 3)
      for i = 1, 3 do h.set(pool, i, { available = false }) end
      assert.is_nil(M.pick(pool, h.make_req()))
      for i = 1, 3 do h.set(pool, i, { available = true }) end
      -- The interrupted period resumes where it left off: a a b | a c a a.
      assert.same({ 1, 3, 1, 1, 1, 1, 2 }, h.sequence(M, pool, 7))
    end)

    it("keeps its state in pool.state only", function()
      local keys_before = {}
      for k in pairs(M) do keys_before[#keys_before + 1] = k end

      local a = pool_of({ { weight = 5 }, { weight = 1 }, { weight = 1 } })
      local b = pool_of({ { weight = 5 }, { weight = 1 }, { weight = 1 } })
      h.sequence(M, a, 4)
      -- Pool b is unaffected by the picks on pool a.
      assert.same({ 1, 1, 2, 1, 3, 1, 1 }, h.sequence(M, b, 7))
      assert.is_not_nil(next(a.state))

      -- A fresh state table restarts the sequence: nothing is remembered elsewhere.
      a.state = {}
      assert.same({ 1, 1, 2, 1, 3, 1, 1 }, h.sequence(M, a, 7))

      local keys_after = {}
      for k in pairs(M) do keys_after[#keys_after + 1] = k end
      assert.same(keys_before, keys_after)
      assert.same({ 5, 1, 1 }, weights(a))
    end)

    it("does not draw randomness", function()
      local pool = pool_of({ {}, {} })
      h.count_picks(M, pool, 10)
      assert.equal(0, fake.draws)
    end)
  end)
end
