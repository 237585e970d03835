-- The policy specs rely on the sandbox and fakes in helpers.lua to prove what policies
-- don't do (touch os/io/ffi, use math.random); this checks those checks hold.
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local function run(src, fake)
  fake = fake or h.new_fake()
  local chunk = assert(loadstring(src, "=policy"))
  setfenv(chunk, h.sandbox(fake))
  return chunk()
end

describe("spec helpers", function()
  describe("sandbox", function()
    for _, name in ipairs({ "os", "io", "ffi", "load", "loadstring", "dofile", "jit", "print" }) do
      it("has no " .. name .. ", and says where a policy reached for it", function()
        local ok, err = pcall(run, "local x = 1\nreturn " .. name)
        assert.is_false(ok)
        assert.equal("policy:2: policy read undefined global '" .. name .. "' (not in the sandbox)", err)
      end)
    end

    it("rejects math.random and global assignment", function()
      assert.has_error(function() run("return math.random()") end)
      assert.has_error(function() run("x = 1") end)
      assert.equal(3, run("return math.max(1, 3)"))
    end)

    it("restricts require to policies/ and lua/", function()
      assert.has_error(function() run("return require 'os'") end)
      assert.has_error(function() run("return require '..secrets'") end)
      local M = run("return require 'balancer.round_robin'")
      assert.is_function(M.pick)
      local fake = h.new_fake()
      assert.equal(fake.sluice, run("return require 'sluice'", fake))
    end)
  end)

  describe("fake sluice", function()
    it("has a controllable clock", function()
      local fake = h.new_fake()
      assert.equal(0, fake.sluice.now_ms())
      fake.advance(250)
      fake.now = fake.now + 1
      assert.equal(251, fake.sluice.now_ms())
    end)

    it("has seedable randomness in [0, 1) and scripted sequences", function()
      local fake = h.new_fake()
      fake.seed(5)
      local a = { fake.sluice.random(), fake.sluice.random() }
      fake.seed(5)
      assert.same(a, { fake.sluice.random(), fake.sluice.random() })
      assert.are_not.equal(a[1], a[2])
      local lo, hi = 1, 0
      for _ = 1, 10000 do
        local r = fake.sluice.random()
        lo, hi = math.min(lo, r), math.max(hi, r)
      end
      assert.is_true(lo >= 0 and lo < 0.001 and hi < 1 and hi > 0.999)
      fake.script({ 0.5 })
      assert.equal(0.5, fake.sluice.random())
      assert.has_error(function() fake.sluice.random() end)
      assert.equal(2 + 10000 + 2 + 2, fake.draws)
    end)

    it("captures log lines", function()
      local fake = h.new_fake()
      fake.sluice.log("warn", "pool", "stt", 3)
      assert.same({ { level = "warn", msg = "pool stt 3" } }, fake.logs)
    end)
  end)

  describe("make_pool", function()
    it("fills defaults and derives availability", function()
      local pool = h.make_pool({ {}, { inflight = 2, max_inflight = 2 }, { state = h.OPEN } })
      assert.equal(3, pool.n)
      assert.same({}, pool.state)
      local ep = pool.endpoints[1]
      assert.same({ 1, 0, 0, true }, { ep.weight, ep.inflight, ep.max_inflight, ep.available })
      assert.is_false(pool.endpoints[2].available)
      assert.is_false(pool.endpoints[3].available)
    end)

    it("rejects unknown endpoint fields", function()
      assert.has_error(function() h.make_pool({ { wieght = 2 } }) end)
    end)

    if #h.ENDPOINT_KINDS > 1 then
      it("builds FFI cdata endpoints with int64 counters and a bool available", function()
        local pool = h.make_pool({ { weight = 3, successes = 7 }, { available = false } }, { ffi = true })
        local ep = pool.endpoints[1]
        assert.equal("cdata", type(ep))
        assert.equal("cdata", type(ep.successes))
        assert.equal(7, tonumber(ep.successes))
        assert.equal(3, ep.weight)
        assert.is_true(ep.available)
        assert.is_false(pool.endpoints[2].available)
        h.set(pool, 1, { inflight = 1, max_inflight = 1 })
        assert.is_false(ep.available)
      end)
    end
  end)
end)
