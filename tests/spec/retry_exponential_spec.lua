-- policies/retry/exponential.lua: full-jitter exponential backoff, the attempt limit,
-- Retry-After, and the retry budget. The contract is the policy's header comment:
--   delay before attempt n+1 = random(0, min(max_ms, base_ms * 2^(n-1)))
--   Retry-After <= retry_after_max_ms is the delay; a longer one stops
--   a retry is allowed while pool.stats.retrying < max(budget_min, budget_ratio * active)
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local ALMOST_ONE = 1 - 2 ^ -40

-- pool.retry normalized by the real config code; stats default to a quiet pool (nothing
-- retrying, so the budget never interferes unless a test sets it).
local function make_pool(retry, stats, as_ffi)
  local p = h.normalized_pool({ retry = retry or {} })
  return { name = "test", n = 0, endpoints = {}, state = {}, options = {}, retry = p.retry,
           stats = h.pool_stats(stats or { active = 1 }, as_ffi) }
end

local function load()
  return h.load_policy("retry/exponential.lua")
end

local function cap_for(retry, attempt)
  return math.min(retry.max_ms, retry.base_ms * 2 ^ (attempt - 1))
end

for _, kind in ipairs({ { name = "plain stats", ffi = false }, { name = "ffi stats", ffi = true } }) do
  if kind.ffi and not pcall(require, "ffi") then break end

  describe("retry/exponential (" .. kind.name .. ")", function()
    local M, fake
    before_each(function()
      M, fake = load()
    end)

    local function pool(retry, stats) return make_pool(retry, stats, kind.ffi) end

    describe("full-jitter backoff", function()
      local retry = { attempts = 12, base_ms = 10, max_ms = 1000 }

      it("uses the normalized defaults the config gives it", function()
        local p = pool({})
        assert.equal(3, p.retry.attempts)
        assert.equal(25, p.retry.base_ms)
        assert.equal(250, p.retry.max_ms)
        -- attempt 1 of 3 with the defaults: [0, 25)
        fake.script({ ALMOST_ONE })
        assert.equal(24, M.decide(h.make_req(), 1, h.outcome("connect_error"), p))
      end)

      it("draws 0 for a random 0 at every attempt", function()
        local p = pool(retry)
        for attempt = 1, retry.attempts - 1 do
          fake.script({ 0 })
          local d = M.decide(h.make_req(), attempt, h.outcome("connect_error"), p)
          assert.equal(0, d, "attempt " .. attempt)
        end
      end)

      it("stays strictly below min(max_ms, base_ms * 2^(attempt-1)) for a random ~1", function()
        local p = pool(retry)
        local caps = {}
        for attempt = 1, retry.attempts - 1 do
          fake.script({ ALMOST_ONE })
          local d = M.decide(h.make_req(), attempt, h.outcome("reset"), p)
          local cap = cap_for(p.retry, attempt)
          caps[attempt] = cap
          assert.is_number(d)
          assert.is_true(d < cap, ("attempt %d: delay %s not below cap %s"):format(attempt, tostring(d), cap))
          assert.is_true(d >= cap - 1, ("attempt %d: delay %s, expected close to cap %s"):format(attempt, tostring(d), cap))
        end
        -- the caps double and then stay at max_ms
        assert.same({ 10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000 }, caps)
      end)

      it("returns whole milliseconds", function()
        local p = pool(retry)
        fake.script({ 0.123456, 0.987654, 0.5 })
        for attempt = 1, 3 do
          local d = M.decide(h.make_req(), attempt, h.outcome(503), p)
          assert.equal(math.floor(d), d)
        end
      end)

      it("spreads seeded draws over the whole [0, cap) range for every attempt", function()
        local p = pool(retry)
        fake.seed(42)
        for attempt = 1, retry.attempts - 1 do
          local cap = cap_for(p.retry, attempt)
          local lo, hi, sum, n = math.huge, -math.huge, 0, 2000
          for _ = 1, n do
            local d = M.decide(h.make_req(), attempt, h.outcome("connect_error"), p)
            assert.is_number(d)
            assert.is_true(d >= 0 and d < cap, ("attempt %d: delay %s outside [0, %s)"):format(attempt, tostring(d), cap))
            if d < lo then lo = d end
            if d > hi then hi = d end
            sum = sum + d
          end
          -- full jitter, not "equal jitter" or a fixed delay: both ends are reached and the
          -- mean is about cap/2
          assert.is_true(lo <= cap * 0.02, ("attempt %d: smallest delay %s"):format(attempt, lo))
          assert.is_true(hi >= cap * 0.98 - 1, ("attempt %d: largest delay %s of cap %s"):format(attempt, hi, cap))
          local mean = sum / n
          assert.is_true(math.abs(mean - (cap - 1) / 2) < cap * 0.05 + 0.5,
            ("attempt %d: mean %.2f, cap %d"):format(attempt, mean, cap))
        end
      end)

      it("caps at max_ms even when max_ms is below base_ms", function()
        local p = pool({ attempts = 5, base_ms = 500, max_ms = 100 })
        for attempt = 1, 4 do
          fake.script({ ALMOST_ONE })
          assert.equal(99, M.decide(h.make_req(), attempt, h.outcome("reset"), p))
        end
      end)

      it("retries at once with base_ms = 0", function()
        local p = pool({ attempts = 4, base_ms = 0, max_ms = 250 })
        fake.seed(7)
        for attempt = 1, 3 do
          assert.equal(0, M.decide(h.make_req(), attempt, h.outcome("connect_error"), p))
        end
      end)

      it("draws from sluice.random(), never math.random", function()
        -- the sandbox raises on math.random; one draw per decision
        local p = pool(retry)
        fake.seed(3)
        local before = fake.draws
        M.decide(h.make_req(), 1, h.outcome("connect_error"), p)
        assert.equal(before + 1, fake.draws)
      end)
    end)

    describe("attempt limit", function()
      it("retries after attempts 1 .. attempts-1 and stops at `attempts`", function()
        local p = pool({ attempts = 3 })
        fake.seed(1)
        assert.is_number(M.decide(h.make_req(), 1, h.outcome("connect_error"), p))
        assert.is_number(M.decide(h.make_req(), 2, h.outcome("connect_error"), p))
        assert.is_nil(M.decide(h.make_req(), 3, h.outcome("connect_error"), p))
        assert.is_nil(M.decide(h.make_req(), 4, h.outcome("connect_error"), p))
      end)

      it("never retries with attempts = 1", function()
        local p = pool({ attempts = 1 })
        fake.script({})
        assert.is_nil(M.decide(h.make_req(), 1, h.outcome("connect_error"), p))
        assert.is_nil(M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 0 }), p))
      end)

      it("stops at `attempts` even when the upstream sent Retry-After", function()
        local p = pool({ attempts = 2 })
        assert.is_nil(M.decide(h.make_req(), 2, h.outcome(503, { retry_after_ms = 10 }), p))
      end)

      for _, n in ipairs({ 2, 5, 10 }) do
        it("allows exactly " .. (n - 1) .. " retries with attempts = " .. n, function()
          local p = pool({ attempts = n })
          fake.seed(9)
          local attempt = 1
          while M.decide(h.make_req(), attempt, h.outcome("reset"), p) do
            attempt = attempt + 1
            assert.is_true(attempt <= n, "retried past the limit")
          end
          assert.equal(n, attempt)
        end)
      end
    end)

    describe("Retry-After", function()
      local retry = { attempts = 5, base_ms = 25, max_ms = 250, retry_after_max_ms = 2000 }

      it("is the delay when it is at most retry_after_max_ms", function()
        local p = pool(retry)
        fake.script({}) -- no random draw: the upstream chose the delay
        assert.equal(1500, M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 1500 }), p))
        assert.equal(2000, M.decide(h.make_req(), 2, h.outcome(429, { retry_after_ms = 2000 }), p))
        assert.equal(0, M.decide(h.make_req(), 3, h.outcome(503, { retry_after_ms = 0 }), p))
      end)

      it("is honoured even above max_ms (it is the upstream's request, not our backoff)", function()
        local p = pool(retry)
        assert.equal(1000, M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 1000 }), p))
      end)

      it("stops retrying when it is longer than retry_after_max_ms", function()
        local p = pool(retry)
        fake.script({})
        assert.is_nil(M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 2001 }), p))
        assert.is_nil(M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 120000 }), p))
        local p0 = pool({ attempts = 5, retry_after_max_ms = 0 })
        assert.is_nil(M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 1 }), p0))
        assert.equal(0, M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 0 }), p0))
      end)

      it("without Retry-After the backoff applies", function()
        local p = pool(retry)
        fake.script({ 0.5 })
        assert.equal(12, M.decide(h.make_req(), 1, h.outcome(503), p))
      end)

      it("does not bypass the retry budget", function()
        local p = pool(retry, { active = 10, retrying = 3 })
        assert.is_nil(M.decide(h.make_req(), 1, h.outcome(503, { retry_after_ms = 100 }), p))
      end)
    end)

    describe("retry budget", function()
      local function allows(retry, stats)
        local p = pool(retry, stats)
        fake.seed(5)
        return M.decide(h.make_req(), 1, h.outcome("connect_error"), p) ~= nil
      end
      local r = { attempts = 3, budget_ratio = 0.2, budget_min = 3 }

      it("uses budget_min when ratio * active is smaller (active 10: 2 retrying ok, 3 stop)", function()
        assert.is_true(allows(r, { active = 10, retrying = 0 }))
        assert.is_true(allows(r, { active = 10, retrying = 2 }))
        assert.is_false(allows(r, { active = 10, retrying = 3 }))
        assert.is_false(allows(r, { active = 10, retrying = 4 }))
      end)

      it("uses ratio * active when larger (active 100: 19 retrying ok, 20 stop)", function()
        assert.is_true(allows(r, { active = 100, retrying = 19 }))
        assert.is_false(allows(r, { active = 100, retrying = 20 }))
        assert.is_false(allows(r, { active = 100, retrying = 50 }))
      end)

      it("keeps a floor of budget_min retries in a quiet pool", function()
        assert.is_true(allows(r, { active = 0, retrying = 0 }))
        assert.is_true(allows(r, { active = 1, retrying = 2 }))
        assert.is_false(allows(r, { active = 1, retrying = 3 }))
        local r5 = { attempts = 3, budget_ratio = 0.2, budget_min = 5 }
        assert.is_true(allows(r5, { active = 20, retrying = 4 })) -- 0.2 * 20 = 4 < 5
        assert.is_false(allows(r5, { active = 20, retrying = 5 }))
      end)

      it("a fractional budget is not rounded up (ratio 0.2, active 3, min 0: 0 ok, 1 stop)", function()
        local r0 = { attempts = 3, budget_ratio = 0.2, budget_min = 0 }
        assert.is_true(allows(r0, { active = 3, retrying = 0 }))
        assert.is_false(allows(r0, { active = 3, retrying = 1 }))
      end)

      it("allows no retry at all with budget_ratio = 0 and budget_min = 0", function()
        local rz = { attempts = 3, budget_ratio = 0, budget_min = 0 }
        assert.is_false(allows(rz, { active = 0, retrying = 0 }))
        assert.is_false(allows(rz, { active = 1000, retrying = 0 }))
      end)

      it("budget_ratio = 1 lets every active request retry", function()
        local r1 = { attempts = 3, budget_ratio = 1, budget_min = 0 }
        assert.is_true(allows(r1, { active = 50, retrying = 49 }))
        assert.is_false(allows(r1, { active = 50, retrying = 50 }))
      end)

      it("reads the live stats on every call", function()
        local p = pool(r, { active = 10, retrying = 2 })
        fake.seed(1)
        assert.is_number(M.decide(h.make_req(), 1, h.outcome("reset"), p))
        p.stats.retrying = 3
        assert.is_nil(M.decide(h.make_req(), 1, h.outcome("reset"), p))
        p.stats.active = 100
        assert.is_number(M.decide(h.make_req(), 1, h.outcome("reset"), p))
      end)
    end)
  end)
end
