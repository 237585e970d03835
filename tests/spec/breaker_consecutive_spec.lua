-- policies/breaker/consecutive.lua, driven the way the runtime drives it (h.breaker_sim
-- emulates src/admission.c: "open" -> OPEN and ejections + 1, OPEN -> HALF_OPEN when the
-- time is up, "close" -> CLOSED and ejections 0). Contract (the policy's header comment):
--   closed -> open after `failures` consecutive failures (a success resets the count);
--   the n-th ejection in a row lasts open_ms * n, capped at max_open_ms; a half-open probe
--   success closes, a probe failure opens again for longer; a failure is an attempt without
--   a response or a 5xx (outcome.ok == false), so 4xx responses are not failures.
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local CLOSED, OPEN, HALF_OPEN = h.CLOSED, h.OPEN, h.HALF_OPEN

local KINDS = { { name = "table endpoint", ffi = false } }
if pcall(require, "ffi") then KINDS[2] = { name = "ffi endpoint", ffi = true } end

for _, kind in ipairs(KINDS) do
  describe("breaker/consecutive (" .. kind.name .. ")", function()
    local M
    before_each(function()
      M = h.load_policy("breaker/consecutive.lua")
    end)

    local function sim(cfg)
      return h.breaker_sim(M, cfg, { ffi = kind.ffi })
    end

    describe("opening", function()
      it("opens on exactly the `failures`-th consecutive failure, for open_ms", function()
        local s = sim({ failures = 3, open_ms = 500 })
        assert.is_nil(s:record(503))
        assert.is_nil(s:record("connect_error"))
        assert.equal(CLOSED, s:state())
        local action, ms = s:record("reset")
        assert.equal("open", action)
        assert.equal(500, ms)
        assert.equal(OPEN, s:state())
        assert.equal(1, s:ejections())
      end)

      it("uses the default of 5 failures", function()
        local s = sim({})
        assert.same({ false, false, false, false, "open" }, s:record_n(5, 500))
      end)

      it("failures = 1 opens on the first failure", function()
        local s = sim({ failures = 1, open_ms = 100 })
        assert.equal("open", s:record("timeout"))
      end)

      it("a success in between resets the count", function()
        local s = sim({ failures = 3, open_ms = 500 })
        assert.is_nil(s:record(502))
        assert.is_nil(s:record(502))
        assert.is_nil(s:record(200))
        assert.is_nil(s:record(502))
        assert.is_nil(s:record(502))
        assert.is_nil(s:record(201))
        assert.is_nil(s:record(502))
        assert.is_nil(s:record(502))
        assert.equal(CLOSED, s:state())
        assert.equal("open", s:record(502))
      end)

      it("counts every kind of attempt without a response and every 5xx as a failure", function()
        for _, o in ipairs({ "connect_error", "connect_timeout", "reset", "timeout", 500, 502, 503, 504, 599 }) do
          local s = sim({ failures = 2, open_ms = 100 })
          assert.is_nil(s:record(o), tostring(o))
          assert.equal("open", s:record(o), tostring(o))
        end
      end)

      it("does not count 4xx responses (ok = true) as failures", function()
        local s = sim({ failures = 2, open_ms = 100 })
        for _, status in ipairs({ 400, 401, 404, 408, 413, 429, 499 }) do
          for _ = 1, 5 do assert.is_nil(s:record(status), tostring(status)) end
        end
        assert.equal(CLOSED, s:state())
        -- and a 4xx between two failures resets the count like any success
        assert.is_nil(s:record(503))
        assert.is_nil(s:record(404))
        assert.is_nil(s:record(503))
        assert.equal("open", s:record(503))
      end)

      it("a success while closed says nothing", function()
        local s = sim({ failures = 2 })
        for _ = 1, 10 do assert.is_nil(s:record(200)) end
      end)
    end)

    describe("open, half-open, and escalating ejections", function()
      it("open_ms x n for the n-th ejection in a row, capped at max_open_ms; a probe success closes", function()
        local s = sim({ failures = 3, open_ms = 100, max_open_ms = 350 })
        s:record_n(2, 503)
        local action, ms = s:record(503)
        assert.equal("open", action)
        assert.equal(100, ms)

        local expected = { 200, 300, 350, 350, 350 }
        local last = 100
        for n, want in ipairs(expected) do
          -- not half-open a millisecond early
          s:advance(last - 1)
          assert.equal(OPEN, s:state(), "ejection " .. n)
          s:advance(1)
          assert.equal(HALF_OPEN, s:state(), "ejection " .. n)
          -- the probe fails: open again at once, for longer (no `failures` count needed)
          action, ms = s:record("connect_error")
          assert.equal("open", action, "probe " .. n)
          assert.equal(want, ms, "duration of ejection " .. (n + 1))
          assert.equal(OPEN, s:state())
          assert.equal(n + 1, s:ejections())
          last = want
        end

        s:advance(last)
        assert.equal(HALF_OPEN, s:state())
        assert.equal("close", s:record(200))
        assert.equal(CLOSED, s:state())
        assert.equal(0, s:ejections())

        -- the next ejection starts again at open_ms and needs `failures` failures again
        assert.is_nil(s:record(503))
        assert.is_nil(s:record(503))
        action, ms = s:record(503)
        assert.equal("open", action)
        assert.equal(100, ms)
        assert.equal(1, s:ejections())
      end)

      it("max_open_ms smaller than open_ms caps the first ejection too", function()
        local s = sim({ failures = 1, open_ms = 1000, max_open_ms = 300 })
        local _, ms = s:record(503)
        assert.equal(300, ms)
      end)

      it("a 4xx probe answer closes the breaker (the endpoint answered)", function()
        local s = sim({ failures = 1, open_ms = 100 })
        s:record(503)
        s:advance(100)
        assert.equal(HALF_OPEN, s:state())
        assert.equal("close", s:record(404))
        assert.equal(CLOSED, s:state())
      end)

      it("after a probe success only `failures` fresh failures open it again", function()
        local s = sim({ failures = 3, open_ms = 100 })
        s:record_n(3, 503)
        s:advance(100)
        assert.equal("close", s:record(200))
        assert.same({ false, false, "open" }, s:record_n(3, "reset"))
      end)
    end)

    describe("outcomes while open (requests in flight when it opened)", function()
      it("failures neither extend nor re-open the ejection", function()
        local s = sim({ failures = 2, open_ms = 500 })
        s:record_n(2, 503)
        local until_ = s.open_until
        for _ = 1, 10 do
          s:advance(10)
          assert.is_nil(s:record(503))
          assert.is_nil(s:record("reset"))
        end
        assert.equal(until_, s.open_until)
        assert.equal(1, s:ejections())
        assert.equal(OPEN, s:state())
        -- half-open exactly open_ms after it opened
        s:advance(500 - 100 - 1)
        assert.equal(OPEN, s:state())
        s:advance(1)
        assert.equal(HALF_OPEN, s:state())
      end)

      it("failures seen while open do not count towards the next ejection", function()
        local s = sim({ failures = 3, open_ms = 100 })
        s:record_n(3, 503)
        s:record_n(5, 503) -- stragglers while open
        s:advance(100)
        assert.equal("close", s:record(200))
        assert.same({ false, false, "open" }, s:record_n(3, 503))
      end)

      it("a success seen while open closes it (the runtime's panic traffic counts as probes)", function()
        -- src/admission.c lets open endpoints serve in panic mode and marks those attempts
        -- as probes; their success must bring the endpoint back.
        local s = sim({ failures = 1, open_ms = 10000 })
        s:record(503)
        assert.equal(OPEN, s:state())
        assert.equal("close", s:record(200))
        assert.equal(CLOSED, s:state())
        assert.equal(0, s:ejections())
      end)
    end)

    describe("state", function()
      it("keeps its count in the per-endpoint table the runtime hands it (survives reloads)", function()
        local s = sim({ failures = 3, open_ms = 100 })
        s:record_n(2, 503)
        -- a config reload reloads the policy module but keeps the endpoint table
        s.M = h.load_policy("breaker/consecutive.lua")
        assert.equal("open", s:record(503))
      end)

      it("endpoints do not share counts", function()
        local a = sim({ failures = 2, open_ms = 100 })
        local b = sim({ failures = 2, open_ms = 100 })
        b.M = a.M
        assert.is_nil(a:record(503))
        assert.is_nil(b:record(503))
        assert.is_nil(b:record(200))
        assert.equal("open", a:record(503))
        assert.is_nil(b:record(503))
      end)

      it("reads breaker settings from pool.breaker on every call", function()
        local s = sim({ failures = 5, open_ms = 100 })
        s:record_n(2, 503)
        s.pool.breaker = h.normalized_pool({ breaker = { failures = 3, open_ms = 700 } }).breaker
        local action, ms = s:record(503)
        assert.equal("open", action)
        assert.equal(700, ms)
      end)
    end)
  end)
end
