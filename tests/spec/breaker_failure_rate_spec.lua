-- policies/breaker/failure_rate.lua, driven the way the runtime drives it (h.breaker_sim
-- emulates src/admission.c). Contract (the policy's header comment): open when the share of
-- failures over a sliding window of window_ms (10 buckets of window_ms/10) reaches
-- failure_rate, once the window holds at least min_requests outcomes; old counts drop out as
-- time moves on; half-open as in consecutive.lua; closing clears the window.
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local CLOSED, OPEN, HALF_OPEN = h.CLOSED, h.OPEN, h.HALF_OPEN

local KINDS = { { name = "table endpoint", ffi = false } }
if pcall(require, "ffi") then KINDS[2] = { name = "ffi endpoint", ffi = true } end

-- window 1000 ms = 10 buckets of 100 ms; the sim's clock starts at 1e9, a bucket boundary.
local CFG = { policy = "failure_rate", failure_rate = 0.5, window_ms = 1000, min_requests = 10,
              open_ms = 500, max_open_ms = 1800 }

for _, kind in ipairs(KINDS) do
  describe("breaker/failure_rate (" .. kind.name .. ")", function()
    local M
    before_each(function()
      M = h.load_policy("breaker/failure_rate.lua")
    end)

    local function sim(cfg, now)
      local c = {}
      for k, v in pairs(CFG) do c[k] = v end
      for k, v in pairs(cfg or {}) do c[k] = v end
      return h.breaker_sim(M, c, { ffi = kind.ffi, now = now })
    end

    describe("volume and rate", function()
      it("does not open below min_requests, however bad the rate", function()
        local s = sim()
        for i = 1, 9 do assert.is_nil(s:record(503), "failure " .. i) end
        assert.equal(CLOSED, s:state())
        local action, ms = s:record("connect_error")
        assert.equal("open", action)
        assert.equal(500, ms)
        assert.equal(1, s:ejections())
      end)

      it("opens when the failure share reaches failure_rate (equal counts)", function()
        local s = sim()
        s:record_n(5, 200)
        assert.same({ false, false, false, false, "open" }, s:record_n(5, 503))
      end)

      it("stays closed just below the rate and opens as soon as it is reached", function()
        local s = sim()
        s:record_n(6, 200)
        assert.same({ false, false, false, false }, s:record_n(4, 503)) -- 4/10
        assert.is_nil(s:record(503))                                     -- 5/11
        assert.equal("open", s:record(503))                              -- 6/12
      end)

      it("a healthy endpoint with a few failures stays closed", function()
        local s = sim({ failure_rate = 0.25 })
        for _ = 1, 50 do
          s:record_n(4, 200)
          assert.is_nil(s:record(500))
          s:advance(7)
        end
        assert.equal(CLOSED, s:state())
      end)

      it("4xx responses count as successes", function()
        local s = sim()
        s:record_n(6, 404)
        s:record_n(4, 429)
        assert.same({ false, false, false, false, false, false, false, false, false, "open" },
          s:record_n(10, 502)) -- 10 failures of 20
      end)

      it("failure_rate = 1 needs every request to fail", function()
        local s = sim({ failure_rate = 1 })
        s:record(200)
        for _ = 1, 30 do assert.is_nil(s:record(503)) end
        s:advance(1000) -- the success ages out
        assert.same({ false, false, false, false, false, false, false, false, false, "open" },
          s:record_n(10, 503))
      end)
    end)

    describe("sliding window", function()
      it("failures still inside the window count", function()
        local s = sim()
        s:record_n(9, 503)
        s:advance(999)
        assert.equal("open", s:record(503))
      end)

      it("failures older than window_ms drop out", function()
        local s = sim()
        s:record_n(9, 503)
        s:advance(1000)
        assert.is_nil(s:record(503)) -- 1 of 1: below min_requests again
        assert.same({ false, false, false, false, false, false, false, false, "open" }, s:record_n(9, 503))
      end)

      it("ages out bucket by bucket", function()
        local s = sim()
        s:record_n(4, 503)   -- bucket of t = 0
        s:advance(500)
        s:record_n(4, 200)   -- bucket of t = 500
        s:advance(499)       -- t = 999: everything still in the window
        -- with the t = 0 failures in the window, 2 more failures make 6/10: open
        local probe = sim()
        probe:record_n(4, 503); probe:advance(500); probe:record_n(4, 200); probe:advance(499)
        assert.same({ false, "open" }, probe:record_n(2, 503))
        -- one millisecond later the t = 0 bucket is gone: 2/6, below min_requests
        s:advance(1)
        assert.same({ false, false }, s:record_n(2, 503))
        assert.equal(CLOSED, s:state())
        -- and at t = 1500 the successes are gone too: only the 2 recent failures remain
        s:advance(500)
        assert.same({ false, false, false, false, false, false, false, "open" }, s:record_n(8, 503))
      end)

      it("forgets aged-out failures entirely, not only their volume", function()
        local s = sim()
        s:record_n(8, 503)   -- t = 0
        s:advance(500)
        assert.is_nil(s:record(200)) -- 8/9, below min_requests
        s:advance(500)       -- t = 1000: the t = 0 bucket is reused
        for i = 1, 30 do assert.is_nil(s:record(200), "success " .. i) end
        assert.equal(CLOSED, s:state())
      end)

      it("a long quiet period clears everything", function()
        local s = sim()
        s:record_n(9, 503)
        s:advance(3600 * 1000)
        for _ = 1, 9 do assert.is_nil(s:record(503)) end
        assert.equal("open", s:record(503))
      end)

      it("works at any clock value and window size (fractional bucket width)", function()
        -- bucketed: a count lives between 9 and 10 bucket widths (13.5 .. 15 ms here)
        for _, start in ipairs({ 0, 1, 12345, 2 ^ 40 + 7 }) do
          local s = sim({ window_ms = 15 }, start) -- buckets of 1.5 ms
          s:record_n(9, 503)
          s:advance(13)
          assert.equal("open", s:record(503), "start " .. start)
          local q = sim({ window_ms = 15 }, start)
          q:record_n(9, 503)
          q:advance(16)
          assert.is_nil(q:record(503), "start " .. start)
        end
      end)

      it("a steady trickle of failures over a long time is judged per window", function()
        -- one failure and one success every 100 ms: 50% over every window, 20 per window
        local s = sim({ min_requests = 20 })
        local opened_at
        for step = 1, 30 do
          if s:record(200) == "open" or s:record(503) == "open" then opened_at = step; break end
          s:advance(100)
        end
        assert.equal(10, opened_at) -- the 20th outcome in the window
      end)
    end)

    describe("open and half-open", function()
      local function open_it(s)
        local v = s:record_n(10, 503)
        assert.equal("open", v[10])
      end

      it("outcomes while open are neither counted nor extend the ejection", function()
        local s = sim()
        open_it(s)
        local until_ = s.open_until
        for _ = 1, 20 do
          assert.is_nil(s:record(503))
          s:advance(10)
        end
        assert.equal(until_, s.open_until)
        assert.equal(1, s:ejections())
        s:advance(299) -- 499 ms after opening
        assert.equal(OPEN, s:state())
        s:advance(1)
        assert.equal(HALF_OPEN, s:state())
      end)

      it("a failed probe opens again for open_ms x n, capped at max_open_ms", function()
        local s = sim()
        open_it(s)
        local last = 500
        for n, want in ipairs({ 1000, 1500, 1800, 1800 }) do
          s:advance(last - 1)
          assert.equal(OPEN, s:state())
          s:advance(1)
          assert.equal(HALF_OPEN, s:state())
          local action, ms = s:record("timeout")
          assert.equal("open", action)
          assert.equal(want, ms)
          assert.equal(n + 1, s:ejections())
          last = want
        end
      end)

      it("a probe success closes, clears the window, and the next ejection starts at open_ms", function()
        local s = sim()
        open_it(s)
        s:advance(500)
        local action, ms = s:record("reset")
        assert.equal("open", action)
        assert.equal(1000, ms)
        -- stragglers while open must not be remembered after closing
        s:record_n(15, 503)
        s:advance(1000)
        assert.equal(HALF_OPEN, s:state())
        assert.equal("close", s:record(200))
        assert.equal(CLOSED, s:state())
        assert.equal(0, s:ejections())
        -- a fresh window: min_requests again, then open_ms again
        for i = 1, 9 do assert.is_nil(s:record(503), "failure " .. i .. " after closing") end
        action, ms = s:record(503)
        assert.equal("open", action)
        assert.equal(500, ms)
        assert.equal(1, s:ejections())
      end)

      it("closing forgets the successes too (the share is computed afresh)", function()
        local s = sim()
        s:record_n(9, 200)
        s:record_n(9, 503) -- 9/18 >= 0.5: open on the 9th failure
        assert.equal(OPEN, s:state())
        s:advance(500)
        assert.equal("close", s:record(200)) -- the probe is not counted in the new window
        -- with the 9 old successes still there, 10 failures would be 10/19: closed; afresh
        -- they are 10/10
        assert.same({ false, false, false, false, false, false, false, false, false, "open" },
          s:record_n(10, 503))
      end)
    end)
  end)
end
