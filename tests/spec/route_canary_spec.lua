-- policies/route/canary.lua: init(options, ctx) checks options.split (pool = weight >= 0, at
-- least one positive), options.sticky and options.tag; on_request(req) maps a number u in
-- [0, 1) to a pool by cumulative weight over the pools in name order: u = sluice.random(), or
-- sluice.hash(<sticky header>) / 2^32 when the sticky header is present and non-empty. With
-- options.tag, on_response(req, res) sets that response header to req.pool.
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local POOLS = { "a", "b", "c", "stable", "canary" }

-- Deterministic keys ("user-<number>"), independent of sluice.random().
local function make_keys(count, seed)
  local x, keys = seed or 4242, {}
  for k = 1, count do
    x = (x * 48271) % 2147483647
    keys[k] = "user-" .. x
  end
  return keys
end

describe("route/canary", function()
  local M, fake

  local function init(options, pools)
    M.init(options, h.route_ctx({ pools = pools or POOLS }))
    return M
  end

  local function init_error(options, pools)
    local ok, err = pcall(M.init, options, h.route_ctx({ pools = pools or POOLS }))
    assert.is_false(ok, "init accepted the options")
    return err
  end

  -- The pools chosen for the scripted draws us, in order.
  local function picks(us)
    fake.script(us)
    local out = {}
    for i = 1, #us do out[i] = M.on_request(h.make_req()) end
    fake.script(nil)
    return out
  end

  local function count(n, req)
    local c = {}
    for _ = 1, n do
      local p = M.on_request(req or h.make_req())
      c[p] = (c[p] or 0) + 1
    end
    return c
  end

  before_each(function()
    M, fake = h.load_policy("route/canary.lua")
  end)

  it("defines init and on_request, and no on_response before init", function()
    assert.is_function(M.init)
    assert.is_function(M.on_request)
    assert.is_nil(M.on_response)
  end)

  describe("init", function()
    it("requires options.split to be a non-empty table", function()
      local want = "canary: options.split must be a table of pool name = weight"
      assert.equal(want, init_error({}))
      assert.equal(want, init_error({ split = {} }))
      assert.equal(want, init_error({ split = "a" }))
    end)

    it("rejects an unknown pool", function()
      assert.equal("canary: options.split: no pool named nope", init_error({ split = { a = 1, nope = 1 } }))
      assert.equal("canary: options.split: no pool named a", init_error({ split = { a = 1 } }, { "b" }))
    end)

    it("rejects a list instead of a map", function()
      assert.equal("canary: options.split: no pool named 1", init_error({ split = { "a", "b" } }))
    end)

    it("rejects negative, NaN and non-number weights", function()
      assert.equal("canary: options.split.b: weight must be a finite number >= 0",
        init_error({ split = { a = 1, b = -1 } }))
      assert.equal("canary: options.split.b: weight must be a finite number >= 0",
        init_error({ split = { a = 1, b = 0 / 0 } }))
      assert.equal("canary: options.split.b: weight must be a finite number >= 0",
        init_error({ split = { a = 1, b = "5" } }))
    end)

    it("rejects a split whose weights are all zero", function()
      assert.equal("canary: options.split: at least one weight must be positive",
        init_error({ split = { a = 0, b = 0 } }))
    end)

    it("rejects a sticky or tag that is not a header name", function()
      assert.equal("canary: options.sticky must be a header name", init_error({ split = { a = 1 }, sticky = 1 }))
      assert.equal("canary: options.tag must be a header name", init_error({ split = { a = 1 }, tag = true }))
    end)

    it("rejects an infinite weight (it would swallow every draw)", function()
      assert.has_error(function() init({ split = { a = math.huge, b = 1 } }) end)
    end)

    it("draws no randomness and needs no load_table", function()
      local ctx = h.route_ctx({ pools = POOLS })
      ctx.load_table = function() error("canary must not load files") end
      M.init({ split = { a = 1, b = 1 }, sticky = "x-user", tag = "x-variant" }, ctx)
      assert.equal(0, fake.draws)
    end)
  end)

  describe("random split", function()
    it("splits by cumulative weight over the pools in name order", function()
      init({ split = { b = 10, a = 90 } })
      assert.same({ "a", "a", "a", "b", "b", "b" }, picks({ 0.0, 0.5, 0.8999, 0.9, 0.95, 0.99999 }))
    end)

    it("uses one sluice.random() draw per request", function()
      init({ split = { a = 1, b = 1 } })
      for _ = 1, 5 do M.on_request(h.make_req()) end
      assert.equal(5, fake.draws)
    end)

    it("orders by name, not by weight or insertion", function()
      init({ split = { stable = 95, canary = 5 } })
      -- "canary" < "stable": canary owns [0, 0.05).
      assert.same({ "canary", "canary", "stable", "stable" }, picks({ 0, 0.0499, 0.05, 0.9999 }))
    end)

    it("handles three pools and fractional weights", function()
      init({ split = { a = 0.5, b = 0.25, c = 0.25 } })
      assert.same({ "a", "a", "b", "b", "c", "c" }, picks({ 0, 0.4999, 0.5, 0.7499, 0.75, 0.9999 }))
    end)

    it("never picks a zero-weight pool, wherever it sorts", function()
      init({ split = { a = 0, b = 3, c = 0 } })
      assert.same({ "b", "b", "b" }, picks({ 0, 0.5, 0.99999999 }))
      init({ split = { a = 1, z = 0 } }, { "a", "z" })
      assert.same({ "a", "a" }, picks({ 0, 0.99999999 }))
    end)

    it("sends everything to a single pool", function()
      init({ split = { canary = 7 } })
      assert.same({ "canary", "canary" }, picks({ 0, 0.99999999 }))
    end)

    it("returns a pool for u just below 1 despite rounding", function()
      init({ split = { a = 1 / 3, b = 1 / 3, c = 1 / 3 } })
      assert.same({ "c" }, picks({ 1 - 2 ^ -53 }))
    end)

    it("follows the weights over 10,000 seeded draws", function()
      init({ split = { stable = 90, canary = 10 } })
      fake.seed(12345)
      local c = count(10000)
      -- Binomial(10000, 0.1): sd = 30; allow 4 sd.
      assert.is_true(c.canary >= 880 and c.canary <= 1120, "canary " .. tostring(c.canary))
      assert.equal(10000, c.canary + c.stable)
    end)

    it("follows three-way weights over 10,000 seeded draws", function()
      init({ split = { a = 50, b = 30, c = 20 } })
      fake.seed(99)
      local c = count(10000)
      assert.is_true(math.abs(c.a - 5000) <= 200, "a " .. c.a)
      assert.is_true(math.abs(c.b - 3000) <= 184, "b " .. c.b)
      assert.is_true(math.abs(c.c - 2000) <= 160, "c " .. c.c)
    end)

    it("returns pool names the gateway turns into a pool choice", function()
      init({ split = { a = 1, b = 1 } })
      fake.script({ 0.75 })
      assert.same({ "pool", "b" }, { h.route_request(M, h.make_req()) })
    end)

    it("makes no request edits", function()
      init({ split = { a = 1, b = 1 }, tag = "x-variant" })
      local req = h.make_req()
      M.on_request(req)
      assert.same({}, req.edits)
    end)
  end)

  describe("sticky", function()
    local function user(v) return h.make_req({ headers = { ["X-User-Id"] = v } }) end

    -- What on_request should pick for key under split { a = 90, b = 10 }.
    local function expected(key)
      return fake.sluice.hash(key) / 4294967296 < 0.9 and "a" or "b"
    end

    before_each(function()
      init({ split = { a = 90, b = 10 }, sticky = "x-user-id" })
    end)

    it("maps a key by sluice.hash(key) / 2^32, without drawing", function()
      for _, key in ipairs(make_keys(200)) do
        assert.equal(expected(key), M.on_request(user(key)), key)
      end
      assert.equal(0, fake.draws)
    end)

    it("gives the same key the same pool every time", function()
      for _, key in ipairs(make_keys(20, 7)) do
        local first = M.on_request(user(key))
        for _ = 1, 5 do assert.equal(first, M.on_request(user(key))) end
      end
    end)

    it("reads the header case-insensitively", function()
      local key = make_keys(1)[1]
      assert.equal(M.on_request(h.make_req({ headers = { ["x-user-id"] = key } })),
        M.on_request(h.make_req({ headers = { ["X-USER-ID"] = key } })))
      init({ split = { a = 90, b = 10 }, sticky = "X-User-Id" })
      assert.equal(expected(key), M.on_request(h.make_req({ headers = { ["x-user-id"] = key } })))
      assert.equal(0, fake.draws)
    end)

    it("keeps assignments across a reload with the same split (another worker)", function()
      local keys = make_keys(100, 3)
      local before = {}
      for i, key in ipairs(keys) do before[i] = M.on_request(user(key)) end
      local M2 = h.load_policy("route/canary.lua")
      M2.init({ split = { b = 10, a = 90 }, sticky = "x-user-id" }, h.route_ctx({ pools = POOLS }))
      for i, key in ipairs(keys) do assert.equal(before[i], M2.on_request(user(key))) end
    end)

    it("follows the weights over 10,000 distinct keys", function()
      local c = { a = 0, b = 0 }
      for _, key in ipairs(make_keys(10000)) do
        local p = M.on_request(user(key))
        c[p] = c[p] + 1
      end
      assert.is_true(c.b >= 880 and c.b <= 1120, "b " .. c.b)
    end)

    it("falls back to a random draw when the header is missing", function()
      fake.script({ 0.95, 0.1 })
      assert.equal("b", M.on_request(h.make_req()))
      assert.equal("a", M.on_request(h.make_req({ headers = { ["x-other"] = "user-1" } })))
      assert.equal(2, fake.draws)
    end)

    it("falls back to a random draw when the header is empty", function()
      fake.script({ 0.95 })
      assert.equal("b", M.on_request(user("")))
      assert.equal(1, fake.draws)
    end)

    it("is ignored when not configured: the header does not pin the pool", function()
      init({ split = { a = 90, b = 10 } })
      fake.script({ 0.1, 0.95 })
      assert.same({ "a", "b" }, { M.on_request(user("u1")), M.on_request(user("u1")) })
    end)
  end)

  describe("tag", function()
    it("installs on_response, which sets the tag header to the pool that served", function()
      init({ split = { a = 1, b = 1 }, tag = "x-sluice-variant" })
      assert.is_function(M.on_response)
      local res = h.make_res({ status = 200, headers = { ["content-type"] = "application/json" } })
      M.on_response(h.make_req({ pool = "b" }), res, {})
      assert.same({ { op = "set_header", name = "x-sluice-variant", value = "b" } }, res.edits)
      assert.equal("b", h.final_headers(res)["x-sluice-variant"])
      assert.equal("application/json", h.final_headers(res)["content-type"])
    end)

    it("tags error responses too", function()
      init({ split = { a = 1 }, tag = "X-Variant" })
      local res = h.make_res({ status = 503 })
      M.on_response(h.make_req({ pool = "a" }), res, {})
      assert.equal("a", h.final_headers(res)["x-variant"])
    end)

    it("overwrites a tag header the upstream sent", function()
      init({ split = { a = 1 }, tag = "x-variant" })
      local res = h.make_res({ headers = { ["X-Variant"] = "spoofed" } })
      M.on_response(h.make_req({ pool = "a" }), res, {})
      assert.equal("a", h.final_headers(res)["x-variant"])
    end)

    it("leaves on_response nil without a tag", function()
      init({ split = { a = 1 } })
      assert.is_nil(M.on_response)
    end)

    it("removes on_response when a reload drops the tag", function()
      init({ split = { a = 1 }, tag = "x-variant" })
      assert.is_function(M.on_response)
      init({ split = { a = 1 } })
      assert.is_nil(M.on_response)
    end)

    it("is what the runtime's route_init sees after init", function()
      local rt = h.runtime()
      rt.route_init(M, { split = { a = 1, b = 1 }, tag = "x-variant" }, { "a", "b" }, ".")
      assert.is_function(M.on_response)
    end)
  end)
end)
