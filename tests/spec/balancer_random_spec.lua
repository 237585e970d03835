package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

-- Asserts each count is within 5 standard deviations of its binomial expectation.
local function assert_shares(counts, weights, picks)
  local total = 0
  for _, w in ipairs(weights) do total = total + w end
  for i, w in ipairs(weights) do
    local p = w / total
    local expected = picks * p
    local bound = 5 * math.sqrt(picks * p * (1 - p))
    assert(math.abs(counts[i] - expected) <= bound, string.format(
      "endpoint %d picked %d times, expected %.0f +- %.0f", i, counts[i], expected, bound))
  end
end

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/random with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/random.lua")
      fake.seed(20240611)
    end)

    local function pool_of(specs)
      return h.make_pool(specs, { ffi = kind.ffi })
    end

    it("maps the draw onto cumulative weights", function()
      local pool = pool_of({ { weight = 1 }, { weight = 2 }, { weight = 1 } })
      -- total 4: [0,1) -> 1, [1,3) -> 2, [3,4) -> 3
      fake.script({ 0, 0.24, 0.25, 0.5, 0.74, 0.75, 0.999 })
      assert.same({ 1, 1, 2, 2, 2, 3, 3 }, h.sequence(M, pool, 7))
    end)

    it("skips unavailable endpoints when mapping the draw", function()
      local pool = pool_of({ { weight = 1 }, { weight = 2, available = false }, { weight = 1 } })
      fake.script({ 0, 0.49, 0.5, 0.99 })
      assert.same({ 1, 1, 3, 3 }, h.sequence(M, pool, 4))
    end)

    it("picks the last available endpoint for a draw at the very top", function()
      local pool = pool_of({ { weight = 3 }, { weight = 1 }, { available = false } })
      fake.script({ 1 - 2 ^ -53, 1 })
      assert.same({ 2, 2 }, h.sequence(M, pool, 2))
    end)

    it("draws exactly one random number per pick", function()
      local pool = pool_of({ {}, {}, {} })
      h.count_picks(M, pool, 100)
      assert.equal(100, fake.draws)
    end)

    it("matches the weights within statistical bounds", function()
      local pool = pool_of({ { weight = 5 }, { weight = 3 }, { weight = 2 } })
      local counts, nils = h.count_picks(M, pool, 100000)
      assert.equal(0, nils)
      assert_shares(counts, { 5, 3, 2 }, 100000)
    end)

    it("spreads equal weights evenly", function()
      local pool = pool_of({ {}, {}, {}, {}, {}, {}, {}, {} })
      local counts = h.count_picks(M, pool, 80000)
      assert_shares(counts, { 1, 1, 1, 1, 1, 1, 1, 1 }, 80000)
    end)

    it("never returns an unavailable endpoint", function()
      local pool = pool_of({
        { weight = 4 }, { weight = 9, state = h.OPEN }, { weight = 1 },
        { weight = 9, inflight = 3, max_inflight = 3 },
      })
      local counts = h.count_picks(M, pool, 20000)
      assert.equal(0, counts[2])
      assert.equal(0, counts[4])
      assert_shares({ counts[1], counts[3] }, { 4, 1 }, 20000)
    end)

    it("returns nil without drawing when every endpoint is unavailable", function()
      local pool = pool_of({ { available = false }, { state = h.OPEN } })
      local counts, nils = h.count_picks(M, pool, 5)
      assert.same({ 0, 0 }, counts)
      assert.equal(5, nils)
      assert.equal(0, fake.draws)
    end)

    it("returns nil without drawing for an empty pool", function()
      assert.is_nil(M.pick(pool_of({}), h.make_req()))
      assert.equal(0, fake.draws)
    end)

    it("follows weight changes between calls", function()
      local pool = pool_of({ { weight = 1 }, { weight = 1 } })
      assert_shares((h.count_picks(M, pool, 20000)), { 1, 1 }, 20000)
      h.set(pool, 2, { weight = 9 })
      fake.script({ 0.09, 0.1 })
      assert.same({ 1, 2 }, h.sequence(M, pool, 2))
      fake.seed(7)
      assert_shares((h.count_picks(M, pool, 20000)), { 1, 9 }, 20000)
    end)

    it("uses an endpoint again once it becomes available", function()
      local pool = pool_of({ {}, { state = h.OPEN } })
      assert.same({ 1000, 0 }, (h.count_picks(M, pool, 1000)))
      h.set(pool, 2, { state = h.HALF_OPEN })
      fake.script({ 0.75 })
      assert.equal(2, M.pick(pool, h.make_req()))
      fake.seed(3)
      assert_shares((h.count_picks(M, pool, 10000)), { 1, 1 }, 10000)
    end)

    it("keeps no state", function()
      local pool = pool_of({ { weight = 2 }, {} })
      h.count_picks(M, pool, 100)
      assert.is_nil(next(pool.state))
    end)

    it("is reproducible for a given seed", function()
      local pool = pool_of({ { weight = 2 }, { weight = 3 }, {} })
      fake.seed(99)
      local first = h.sequence(M, pool, 50)
      fake.seed(99)
      assert.same(first, h.sequence(M, pool, 50))
    end)
  end)
end
