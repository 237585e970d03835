package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local HDR = { header = "x-session-id" }

-- Deterministic keys ("user-<number>"), independent of sluice.random().
local function make_keys(count, seed)
  local x, keys = seed or 4242, {}
  for k = 1, count do
    x = (x * 48271) % 2147483647
    keys[k] = "user-" .. x
  end
  return keys
end

local KEYS = make_keys(10000)

local function keyed(key) return h.make_req({ headers = { ["x-session-id"] = key } }) end

local function with_query(q, headers)
  local req = h.make_req({ headers = headers })
  req.query = q
  return req
end

-- The endpoint each key maps to (false for nil).
local function map(M, pool, keys)
  local out = {}
  for k, key in ipairs(keys) do
    local i = M.pick(pool, keyed(key))
    if i ~= nil then h.check_pick(pool, i) end
    out[k] = i or false
  end
  return out
end

local function tally(mapping, n)
  local c = {}
  for i = 1, n do c[i] = 0 end
  for _, i in ipairs(mapping) do c[i] = c[i] + 1 end
  return c
end

local function specs_of(n, extra)
  local s = {}
  for i = 1, n do s[i] = extra and extra(i) or {} end
  return s
end

local function names(n, skip)
  local t = {}
  for i = 1, n do
    if i ~= skip then t[#t + 1] = "node-" .. string.char(96 + i) end
  end
  return t
end

for _, kind in ipairs(h.ENDPOINT_KINDS) do
  describe("balancer/hash with " .. kind.name, function()
    local M, fake

    before_each(function()
      M, fake = h.load_policy("balancer/hash.lua")
    end)

    local function pool_of(specs, options, name)
      return h.make_pool(specs, { ffi = kind.ffi, options = options or HDR, name = name or "stt" })
    end

    describe("keys", function()
      it("sends the same key to the same endpoint every time", function()
        local pool = pool_of(specs_of(6))
        for _, key in ipairs({ "alice", "bob", "carol", "dave" }) do
          local first = M.pick(pool, keyed(key))
          for _ = 1, 50 do assert.equal(first, M.pick(pool, keyed(key))) end
        end
        local seen = tally(map(M, pool, { unpack(KEYS, 1, 60) }), 6)
        for i = 1, 6 do assert(seen[i] > 0, "endpoint " .. i .. " got none of 60 keys") end
      end)

      it("maps a key the same way in every worker and for both endpoint kinds", function()
        local a = map(M, pool_of(specs_of(5)), { unpack(KEYS, 1, 500) })
        local M2 = h.load_policy("balancer/hash.lua")
        local other_ffi = #h.ENDPOINT_KINDS > 1 and not kind.ffi
        local other = h.make_pool(specs_of(5), { ffi = other_ffi, options = HDR, name = "stt" })
        assert.same(a, map(M2, other, { unpack(KEYS, 1, 500) }))
      end)

      it("reads the key from a query parameter", function()
        local pool = pool_of(specs_of(7), { query = "session" })
        local want = M.pick(pool, with_query("session=abc"))
        for _, q in ipairs({
          "session=abc", "a=1&session=abc", "session=abc&b=2", "x=y&session=abc&session=zzz",
          "xsession=nope&session=abc", "sessionx=1&session=abc",
        }) do
          assert.equal(want, M.pick(pool, with_query(q)), q)
        end
        -- and the header with the same value lands in the same place
        local both = pool_of(specs_of(7), { header = "x-session-id", query = "session" })
        assert.equal(want, M.pick(both, keyed("abc")))
      end)

      it("prefers the header to the query parameter", function()
        local pool = pool_of(specs_of(7), { header = "x-session-id", query = "session" })
        local a = M.pick(pool, keyed("k-17"))
        local b = M.pick(pool, with_query("session=k-17"))
        assert.equal(a, b)
        -- find a query value that maps elsewhere; the header still wins
        for _, key in ipairs(KEYS) do
          if M.pick(pool, with_query("session=" .. key)) ~= a then
            assert.equal(a, M.pick(pool, with_query("session=" .. key, { ["x-session-id"] = "k-17" })))
            return
          end
        end
        error("no key maps away from " .. a)
      end)
    end)

    describe("requests without a key", function()
      it("go to the least loaded endpoint, ties rotated", function()
        local pool = pool_of({ { inflight = 2 }, {}, { inflight = 1 }, {} }, { header = "x-session-id", query = "s" })
        assert.same({ 2, 4, 2, 4 }, h.sequence(M, pool, 4)) -- no header, no query
        assert.same({ 2, 4 }, { M.pick(pool, with_query("s=")), M.pick(pool, with_query("t=1&xs=2")) })
        assert.equal(2, M.pick(pool, keyed(""))) -- an empty key is no key
      end)

      it("go to the `fallback` balancer when one is named", function()
        local pool = pool_of({ { inflight = 3 }, {}, {} }, { header = "x-session-id", fallback = "round_robin" })
        assert.same({ 1, 2, 3, 1 }, h.sequence(M, pool, 4))
        assert.is_not_nil(pool.state.rr_current) -- round_robin's own state, in the same table
      end)

      it("never go to an unavailable endpoint", function()
        local pool = pool_of({ { state = h.OPEN }, { inflight = 5 }, { available = false } })
        assert.same({ 0, 20, 0 }, (h.count_picks(M, pool, 20)))
      end)
    end)

    describe("distribution", function()
      it("spreads 10k random keys evenly", function()
        local pool = pool_of(specs_of(8))
        local c = tally(map(M, pool, KEYS), 8)
        for i = 1, 8 do
          assert(c[i] > 1250 * 0.8 and c[i] < 1250 * 1.2, "endpoint " .. i .. ": " .. c[i] .. " of 10000")
        end
      end)

      it("spreads keys in proportion to the weights", function()
        local pool = pool_of({ { weight = 1 }, { weight = 2 }, { weight = 1 }, { weight = 4 } })
        local c = tally(map(M, pool, KEYS), 4)
        for i, share in ipairs({ 1 / 8, 2 / 8, 1 / 8, 4 / 8 }) do
          local want = 10000 * share
          assert(math.abs(c[i] - want) < want * 0.2, "endpoint " .. i .. ": " .. c[i] .. " vs " .. want)
        end
      end)

      it("reduces weights by their common divisor", function()
        local a = pool_of({ { weight = 1 }, { weight = 2 }, { weight = 1 } })
        local b = pool_of({ { weight = 100 }, { weight = 200 }, { weight = 100 } })
        local sub = { unpack(KEYS, 1, 2000) }
        assert.same(map(M, a, sub), map(M, b, sub))
      end)

      it("caps the ring at 65536 points for large weights", function()
        local pool = pool_of({ { weight = 1000 }, { weight = 999 }, { weight = 1 } })
        local c = tally(map(M, pool, KEYS), 3)
        assert(pool.state.hash_size <= 65536, pool.state.hash_size)
        assert(math.abs(c[1] - 5000) < 300 and math.abs(c[2] - 5000) < 300, c[1] .. " " .. c[2])
        assert(c[3] < 40, c[3])
      end)
    end)

    describe("remapping", function()
      -- With positional identities ("stt/1" ...), appending or removing the last endpoint
      -- is the minimal change; with `keys` (or ep.url) any endpoint may go.
      it("moves about 1/(N+1) of the keys, all to the new endpoint, when one is added", function()
        for _, n in ipairs({ 4, 8, 12 }) do
          local before = map(M, pool_of(specs_of(n)), KEYS)
          local after = map(M, pool_of(specs_of(n + 1)), KEYS)
          local moved = 0
          for k = 1, #KEYS do
            if before[k] ~= after[k] then
              moved = moved + 1
              assert.equal(n + 1, after[k])
            end
          end
          local share = moved / #KEYS
          assert(share > 0.5 / (n + 1) and share < 1.5 / (n + 1),
            string.format("N=%d: %.3f moved, ideal %.3f", n, share, 1 / (n + 1)))
        end
      end)

      it("moves only the removed endpoint's keys when the last one goes", function()
        local before = map(M, pool_of(specs_of(9)), KEYS)
        local after = map(M, pool_of(specs_of(8)), KEYS)
        for k = 1, #KEYS do
          if before[k] ~= 9 then assert.equal(before[k], after[k]) end
        end
      end)

      it("moves only the removed endpoint's keys with stable `keys`, wherever it was", function()
        local before = map(M, pool_of(specs_of(9), { header = "x-session-id", keys = names(9) }), KEYS)
        local after = map(M, pool_of(specs_of(8), { header = "x-session-id", keys = names(9, 5) }), KEYS)
        local moved = 0
        for k = 1, #KEYS do
          local b, a = before[k], after[k]
          if b == 5 then
            moved = moved + 1
          else
            assert.equal(b < 5 and b or b - 1, a) -- same name, index shifted
          end
        end
        assert(moved > 0.5 * #KEYS / 9 and moved < 1.5 * #KEYS / 9, moved)
      end)

      it("remaps the later endpoints too when a middle one goes without `keys`", function()
        -- the documented caveat: remove endpoint 5 of 9 and endpoints 6..9 become 5..8,
        -- taking over the ring points of the positions they now hold
        local before = map(M, pool_of(specs_of(9)), KEYS)
        local after = map(M, pool_of(specs_of(8)), KEYS)
        local moved = 0
        for k = 1, #KEYS do
          local a = after[k]
          local same_backend = a < 5 and a or a + 1
          if before[k] ~= same_backend then moved = moved + 1 end
        end
        assert(moved > 3 * #KEYS / 9, moved) -- far more than the 1/9 that `keys` would move
      end)

      it("moves keys only to an endpoint whose weight grew", function()
        local pool = pool_of(specs_of(6))
        local before = map(M, pool, KEYS)
        h.set(pool, 2, { weight = 2 })
        local after = map(M, pool, KEYS)
        local moved = 0
        for k = 1, #KEYS do
          if before[k] ~= after[k] then
            moved = moved + 1
            assert.equal(2, after[k])
          end
        end
        -- endpoint 2 goes from 1/6 to 2/7 of the ring: 5/42 (12%) of the keys move
        assert(moved > 0.5 * #KEYS / 7 and moved < 1.5 * #KEYS / 7, moved)
      end)
    end)

    describe("availability", function()
      it("sends an unavailable owner's keys to the next endpoints on the ring, and back", function()
        local pool = pool_of(specs_of(8))
        local before = map(M, pool, KEYS)
        h.set(pool, 3, { state = h.OPEN })
        local during = map(M, pool, KEYS)
        local went = {}
        for k = 1, #KEYS do
          if before[k] == 3 then
            went[during[k]] = (went[during[k]] or 0) + 1
          else
            assert.equal(before[k], during[k]) -- nobody else's keys move
          end
        end
        assert.is_nil(went[3])
        local targets = 0
        for _ in pairs(went) do targets = targets + 1 end
        assert.equal(7, targets) -- spread over all the others, not dumped on one neighbour
        h.set(pool, 3, { state = h.CLOSED })
        assert.same(before, map(M, pool, KEYS))
      end)

      it("spills a saturated owner's keys (max_inflight) and takes them back", function()
        local pool = pool_of(specs_of(4, function() return { max_inflight = 2 } end))
        local owner = M.pick(pool, keyed("hot"))
        h.set(pool, owner, { inflight = 2 })
        local spill = M.pick(pool, keyed("hot"))
        assert.are_not.equal(owner, spill)
        assert.equal(spill, M.pick(pool, keyed("hot")))
        h.set(pool, owner, { inflight = 1 })
        assert.equal(owner, M.pick(pool, keyed("hot")))
      end)

      it("returns nil when every endpoint is unavailable, without hashing", function()
        local pool = pool_of({ { available = false }, { state = h.OPEN } })
        local calls = 0
        local real = fake.sluice.hash
        fake.sluice.hash = function(s) calls = calls + 1; return real(s) end
        assert.is_nil(M.pick(pool, keyed("x")))
        assert.is_nil(M.pick(pool, h.make_req()))
        assert.equal(0, calls)
      end)

      it("returns nil for an empty pool", function()
        assert.is_nil(M.pick(pool_of({}), keyed("x")))
      end)
    end)

    describe("the ring", function()
      it("is built once and rebuilt only when the endpoints or weights change", function()
        local calls = 0
        local real = fake.sluice.hash
        fake.sluice.hash = function(s) calls = calls + 1; return real(s) end
        local pool = pool_of(specs_of(4), { header = "x-session-id", vnodes = 10 })
        M.pick(pool, keyed("a"))
        assert.equal(4 * 10 + 1, calls) -- 40 ring points, 1 key
        for _ = 1, 100 do M.pick(pool, keyed("a")) end
        assert.equal(41 + 100, calls)
        h.set(pool, 4, { state = h.OPEN }) -- availability is not a ring change
        M.pick(pool, keyed("a"))
        assert.equal(142, calls)
        h.set(pool, 4, { weight = 3 })
        M.pick(pool, keyed("a"))
        assert.equal(142 + 60 + 1, calls)
      end)

      -- Endpoints with a url: Lua strings on table endpoints; on FFI endpoints a
      -- `const char *` field, as the runtime's view may carry.
      local function url_pool(urls)
        if not kind.ffi then
          local pool = pool_of(specs_of(#urls))
          for i, u in ipairs(urls) do pool.endpoints[i].url = u end
          return pool
        end
        local ffi = require "ffi"
        if not pcall(ffi.typeof, "struct hash_spec_url_ep") then
          ffi.cdef [[struct hash_spec_url_ep { int32_t weight; int32_t inflight; bool available; const char *url; };]]
        end
        local arr = ffi.new("struct hash_spec_url_ep[?]", #urls)
        local eps, bufs = {}, {}
        for i, u in ipairs(urls) do
          if u then
            bufs[i] = ffi.new("char[?]", #u + 1, u)
            arr[i - 1].url = bufs[i]
          end
          arr[i - 1].weight, arr[i - 1].available = 1, true
          eps[i] = arr + (i - 1)
        end
        return { name = "stt", n = #urls, endpoints = eps, state = {}, options = HDR, _keep = { arr, bufs } }
      end

      local function urls(idx)
        local t = {}
        for j, i in ipairs(idx) do t[j] = "http://10.0.0." .. i .. ":8000" end
        return t
      end

      it("takes ep.url as the identity when the endpoint has one", function()
        local before = map(M, url_pool(urls({ 1, 2, 3, 4, 5, 6 })), KEYS)
        local after = map(M, url_pool(urls({ 1, 2, 4, 5, 6 })), KEYS) -- the 3rd one removed
        local moved = 0
        for k = 1, #KEYS do
          local b = before[k]
          if b == 3 then
            moved = moved + 1
          else
            assert.equal(b < 3 and b or b - 1, after[k]) -- same URL, index shifted
          end
        end
        assert(moved > 0.5 * #KEYS / 6 and moved < 1.5 * #KEYS / 6, moved)
        -- identities come from the URLs, not from the pool name or positions
        local positional = map(M, pool_of(specs_of(6)), KEYS)
        assert.are_not.same(positional, before)
      end)

      it("falls back to positions when an endpoint has no url", function()
        if kind.ffi then
          -- the helpers' FFI struct has no url field: reading it raises, the ring falls back
          assert.has_error(function() return pool_of(specs_of(1)).endpoints[1].url end)
        end
        local mixed = url_pool({ "http://a:1", false, "http://c:1" }) -- false: no url (NULL)
        local expect = url_pool({ "http://a:1", "stt/2", "http://c:1" })
        assert.same(map(M, expect, { unpack(KEYS, 1, 1000) }), map(M, mixed, { unpack(KEYS, 1, 1000) }))
      end)

      it("rejects bad options with a message naming them", function()
        local cases = {
          { {}, "header or .query" },
          { { header = 5 }, "header must be a header name" },
          { { query = "" }, "query must be a query parameter name" },
          { { header = "x", vnodes = 0 }, "vnodes" },
          { { header = "x", keys = { "a", "b" } }, "keys has 2 names for 3 endpoints" },
          { { header = "x", keys = { "a", "b", "a" } }, "keys%[3%] repeats 'a'" },
          { { header = "x", fallback = "hash" }, "fallback" },
          { { header = "x", fallback = "no_such_balancer" }, "no_such_balancer" },
        }
        for _, case in ipairs(cases) do
          local M2 = h.load_policy("balancer/hash.lua")
          local ok, err = pcall(M2.pick, pool_of(specs_of(3), case[1]), keyed("k"))
          assert.is_false(ok)
          assert.matches(case[2], tostring(err))
        end
      end)

      it("keeps its state in pool.state only and draws no randomness", function()
        local a = pool_of(specs_of(5))
        local b = pool_of(specs_of(5))
        local ma = map(M, a, { unpack(KEYS, 1, 100) })
        assert.same(ma, map(M, b, { unpack(KEYS, 1, 100) }))
        a.state = {}
        assert.same(ma, map(M, a, { unpack(KEYS, 1, 100) }))
        assert.equal(0, fake.draws)
      end)
    end)
  end)
end
