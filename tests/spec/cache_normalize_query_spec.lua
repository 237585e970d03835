-- policies/cache/normalize_query.lua: key(req) returns the string that stands for the
-- request's path, query and body in the cache key: tracking parameters (utm_*, fbclid,
-- gclid, mc_cid, mc_eid) dropped, the rest sorted, so parameter order does not matter;
-- false (skip the cache) for nocache=1. A target without a query, with an empty one, or with
-- only tracking parameters all give the same key.
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

-- A request as the runtime hands it to a cache policy: req.path, req.query (nil when the
-- target has no '?') and req.body (the request body, "" when there is none).
local function req(path, query, body)
  local r = h.make_req({ method = "GET", path = path })
  r.query = query
  r.body = body
  return r
end

describe("cache/normalize_query", function()
  local M
  before_each(function()
    M = h.load_policy("cache/normalize_query.lua")
  end)

  it("defines key(req)", function()
    assert.is_function(M.key)
  end)

  describe("without a query", function()
    it("keys the path alone when there is no query", function()
      assert.equal("/v1/models?\n", M.key(req("/v1/models", nil, "")))
    end)

    it("gives an empty query and only tracking parameters the same key as no query", function()
      local none = M.key(req("/v1/models", nil, ""))
      assert.equal(none, M.key(req("/v1/models", "", "")))
      assert.equal(none, M.key(req("/v1/models", "utm_source=x&gclid=1", "")))
    end)
  end)

  describe("the key string", function()
    it("is path?sorted-params, a newline, then the body", function()
      assert.equal("/v1/models?a=1&b=2\n", M.key(req("/v1/models", "b=2&a=1", "")))
    end)

    it("includes the body", function()
      local k1 = M.key(req("/p", "a=1", "one"))
      local k2 = M.key(req("/p", "a=1", "two"))
      assert.equal("/p?a=1\none", k1)
      assert.equal("/p?a=1\ntwo", k2)
      assert.are_not.equal(k1, k2)
    end)

    it("treats a missing body like an empty one", function()
      assert.equal(M.key(req("/p", "a=1", "")), M.key(req("/p", "a=1", nil)))
    end)

    it("depends on the path", function()
      assert.are_not.equal(M.key(req("/p", "a=1", "")), M.key(req("/q", "a=1", "")))
    end)

    it("keeps values: a different value is a different key", function()
      assert.are_not.equal(M.key(req("/p", "a=1", "")), M.key(req("/p", "a=2", "")))
      assert.are_not.equal(M.key(req("/p", "a=1", "")), M.key(req("/p", "a", "")))
    end)
  end)

  describe("order", function()
    it("does not depend on the order of the parameters", function()
      local want = M.key(req("/p", "a=1&b=2&c=3", "x"))
      for _, q in ipairs({ "c=3&b=2&a=1", "b=2&a=1&c=3", "a=1&c=3&b=2" }) do
        assert.equal(want, M.key(req("/p", q, "x")), q)
      end
    end)

    it("keeps repeated parameters", function()
      assert.equal("/p?a=1&a=2\n", M.key(req("/p", "a=2&a=1", "")))
      assert.are_not.equal(M.key(req("/p", "a=1", "")), M.key(req("/p", "a=1&a=1", "")))
    end)
  end)

  describe("tracking parameters", function()
    it("are dropped", function()
      local want = "/p?a=1&b=2\n"
      assert.equal(want, M.key(req("/p", "b=2&utm_source=news&a=1", "")))
      assert.equal(want, M.key(req("/p", "utm_medium=x&utm_campaign=y&a=1&b=2&utm_term=z&utm_content=w", "")))
      assert.equal(want, M.key(req("/p", "fbclid=1&a=1&gclid=2&b=2&mc_cid=3&mc_eid=4", "")))
    end)

    it("are dropped whatever their value, or without one", function()
      assert.equal("/p?a=1\n", M.key(req("/p", "a=1&utm_source&gclid=", "")))
    end)

    it("leaves a query of only tracking parameters with no parameters", function()
      assert.equal("/p?\n", M.key(req("/p", "utm_source=x&fbclid=y", "")))
    end)

    it("are matched by name, not by a look-alike", function()
      assert.equal("/p?utm=1&utmsource=2&xutm_source=3\n",
        M.key(req("/p", "utm=1&utmsource=2&xutm_source=3", "")))
      assert.equal("/p?GCLID=1\n", M.key(req("/p", "GCLID=1", "")))
    end)
  end)

  describe("nocache", function()
    it("nocache=1 vetoes caching (returns false)", function()
      assert.is_false(M.key(req("/p", "nocache=1", "")))
    end)

    it("vetoes wherever it appears among other parameters", function()
      assert.is_false(M.key(req("/p", "a=1&nocache=1", "")))
      assert.is_false(M.key(req("/p", "nocache=1&a=1&utm_source=x", "")))
    end)

    it("other nocache values are ordinary parameters", function()
      assert.equal("/p?a=1&nocache=0\n", M.key(req("/p", "nocache=0&a=1", "")))
      assert.equal("/p?nocache=10\n", M.key(req("/p", "nocache=10", "")))
      assert.equal("/p?nocache\n", M.key(req("/p", "nocache", "")))
    end)
  end)

  describe("empty parameters", function()
    it("ignores empty names", function()
      assert.equal("/p?a=1\n", M.key(req("/p", "=1&a=1&=", "")))
    end)

    it("ignores empty pairs between ampersands", function()
      assert.equal("/p?a=1&b=2\n", M.key(req("/p", "&&b=2&&a=1&", "")))
    end)

    it("an all-empty query leaves no parameters", function()
      assert.equal("/p?\n", M.key(req("/p", "&&=x&", "")))
    end)
  end)

  it("reads nothing outside the sandbox and keeps no state between calls", function()
    local fake
    M, fake = h.load_policy("cache/normalize_query.lua")
    local a = M.key(req("/p", "b=2&a=1", "body"))
    local b = M.key(req("/p", "b=2&a=1", "body"))
    assert.equal(a, b)
    assert.equal(0, fake.draws)
  end)
end)
