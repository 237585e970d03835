-- Consistent hashing for session affinity: requests with the same key go to the same
-- endpoint, and when endpoints come and go only the keys of the changed endpoint move.
--
-- The key is the value of request header `header`, or else of query parameter `query`
-- (first `name=value` in req.query; taken as is, not URL-decoded). A request without a
-- key (missing or empty) is balanced by the `fallback` balancer instead: least inflight
-- by default.
--
-- The ring: every endpoint owns `vnodes` points per unit of weight (weights are first
-- divided by their greatest common divisor, so 100/200 is the same ring as 1/2), placed at
-- hash(identity .. "#" .. v). A key belongs to the first point at or after hash(key),
-- found by binary search; when that point's endpoint is unavailable the walk continues
-- clockwise to the next point whose endpoint is available, so an unavailable endpoint's
-- keys spread over the others (vnodes interleave them) and come back when it recovers.
-- Hashes are sluice.hash (32-bit FNV-1a) followed by murmur3's 32-bit finalizer, done
-- here: FNV-1a alone places the points of similar strings ("a#1", "a#2", ...) in clumps,
-- which left some endpoints with 0.4x and others 1.9x their share.
--
-- Identity of an endpoint, which decides its points:
--   1. balancer_options.keys[i], a stable name per endpoint (same order as `endpoints`);
--   2. else ep.url, if the runtime exposes it (a Lua string or a C string; read once per
--      ring build, never per pick);
--   3. else pool name and position ("stt/3"). The runtime keeps endpoints in config order,
--      so adding or removing the LAST endpoint moves only that endpoint's keys, but
--      removing or inserting one in the middle shifts the positions after it and remaps
--      their keys too. Give `keys` when endpoints are not only appended or removed at the
--      end.
-- The ring is built on the first pick and rebuilt only when pool.n, the endpoint list or
-- a weight changes (checked on every pick, n comparisons).
--
-- Use when an upstream keeps per-key state worth reusing: an LLM server's prefix/KV cache
-- per conversation, a speaker-id model's per-speaker cache, session-bound resources.
-- Affinity ignores load: one hot key is one endpoint's problem. Keep the pool's
-- max_inflight set so a saturated owner becomes unavailable and its keys spill to the next
-- endpoint on the ring rather than queueing.
--
-- Options: header (string): request header holding the key;
--          query (string): query parameter holding the key, used when the header is not
--            given or absent from the request. At least one of header/query is required;
--          vnodes (integer >= 1, default 160): ring points per weight unit;
--          keys (array of n distinct strings): stable endpoint identities, see above;
--          fallback (balancer name, default "least_inflight", loaded with require): how keyless
--            requests are balanced; another name loads policies/balancer/<name>.lua,
--            which then shares pool.state.
--          The ring holds at most 65536 points: with large weights vnodes is scaled down.
-- State:   pool.state.hash_* (the ring as two arrays, points and owners, the weights and
--          endpoint list it was built for, the parsed options, the fallback's rotation).
-- Cost:    per pick one pass over the endpoints (has a weight changed? is any available?
--          none: nil at once). Keyed picks add one sluice.hash of the key, a binary search
--          (12 steps for 16 endpoints at 160 vnodes) and, when the owner is unavailable, a
--          short walk; the key string itself comes from the request (header value or a
--          substring of the query). Keyless picks: one more O(n) pass (least inflight).
--          A rebuild allocates about vnodes * weight units strings, once per change.

local M = {}

local floor = math.floor
local find, sub, byte = string.find, string.sub, string.byte
local bxor, rshift, tobit = bit.bxor, bit.rshift, bit.tobit

local U32 = 4294967296
local MAX_POINTS = 65536
local OWNER_SPAN = 65536 -- ring entries are sorted as point * OWNER_SPAN + owner

-- Low 32 bits of a * b for a, b in [0, 2^32), exact in doubles (partial products < 2^49).
local function mul32(a, b)
  local lo = a % 65536
  return tobit(lo * b + ((a - lo) / 65536 * b) % 65536 * 65536)
end

-- murmur3 fmix32 over the FNV-1a hash: every input bit affects every output bit.
local function mix(h)
  h = bxor(h, rshift(h, 16))
  h = mul32(h % U32, 0x85ebca6b)
  h = bxor(h, rshift(h, 13))
  h = mul32(h % U32, 0xc2b2ae35)
  h = bxor(h, rshift(h, 16))
  return h % U32
end

local function gcd(a, b)
  while b > 0 do a, b = b, a % b end
  return a
end

-- ep.url as a Lua string, or nil. The field may be missing (reading a field an FFI struct
-- lacks raises: callers pcall this, at ring-build time only), a Lua string, or a C string
-- (`const char *`), copied byte by byte since policies have no ffi.string.
local function url_of(ep)
  local u = ep.url
  if type(u) == "string" then return u end
  if type(u) ~= "cdata" or u == nil then return nil end -- a NULL pointer equals nil
  local chars = {}
  for k = 0, 4095 do
    local c = u[k]
    if c == 0 then return table.concat(chars) end
    chars[k + 1] = string.char(c % 256)
  end
  return nil -- no terminator within 4 KiB: not a URL
end

local function fail(msg) error("hash: balancer_options." .. msg, 0) end

-- Validates the options once per config generation; caches them in pool.state.
local function configure(pool, state)
  local o = pool.options
  if o.header ~= nil and (type(o.header) ~= "string" or o.header == "") then
    fail("header must be a header name (a non-empty string)")
  end
  if o.query ~= nil and (type(o.query) ~= "string" or o.query == "") then
    fail("query must be a query parameter name (a non-empty string)")
  end
  if o.header == nil and o.query == nil then fail("header or .query must name the key") end
  local vn = o.vnodes
  if vn == nil then vn = 160 end
  if type(vn) ~= "number" or vn < 1 or vn ~= floor(vn) then
    fail("vnodes must be an integer >= 1, got " .. tostring(vn))
  end
  if o.keys ~= nil and type(o.keys) ~= "table" then fail("keys must be an array of strings") end
  local fb = o.fallback
  if fb == nil then fb = "least_inflight" end
  if type(fb) ~= "string" or fb == "hash" then
    fail("fallback must name another balancer, got " .. tostring(fb))
  else
    local mod = require("balancer." .. fb)
    if type(mod) ~= "table" or type(mod.pick) ~= "function" then
      fail("fallback: balancer/" .. fb .. ".lua has no pick function")
    end
    state.hash_fb = mod.pick
  end
  state.hash_header = o.header or false
  state.hash_needle = o.query and (o.query .. "=") or false
  state.hash_vnodes = vn
  state.hash_ready = true
end

-- The identity strings ring points are derived from, one per endpoint.
local function identities(pool)
  local n, eps, keys = pool.n, pool.endpoints, pool.options.keys
  local ids, seen = {}, {}
  if keys ~= nil and #keys ~= n then
    fail("keys has " .. #keys .. " names for " .. n .. " endpoints")
  end
  for i = 1, n do
    local id
    if keys ~= nil then
      id = keys[i]
      if type(id) ~= "string" and type(id) ~= "number" then
        fail("keys[" .. i .. "] must be a string")
      end
      id = tostring(id)
      if seen[id] then fail("keys[" .. i .. "] repeats '" .. id .. "'") end
    else
      local ok, url = pcall(url_of, eps[i])
      if ok and url ~= nil and url ~= "" then id = url else id = tostring(pool.name) .. "/" .. i end
      if seen[id] then
        seen[id] = seen[id] + 1
        id = id .. "!" .. seen[id] -- the same URL twice still gets two sets of points
      end
    end
    seen[id] = seen[id] or 1
    ids[i] = id
  end
  return ids
end

local function build(pool, state)
  local n, eps = pool.n, pool.endpoints
  if n >= OWNER_SPAN then error("hash: at most " .. (OWNER_SPAN - 1) .. " endpoints", 0) end
  local ids = identities(pool)

  local w, g = {}, 0
  for i = 1, n do
    local wi = tonumber(eps[i].weight)
    w[i] = wi
    if wi > 0 then g = gcd(wi, g) end
  end
  local units = 0
  if g > 0 then
    for i = 1, n do
      if w[i] > 0 then units = units + w[i] / g end
    end
  end
  local per = state.hash_vnodes
  if per * units > MAX_POINTS then per = floor(MAX_POINTS / units) end
  if per < 1 then per = 1 end

  local entries, size = {}, 0
  for i = 1, n do
    if w[i] > 0 then
      local prefix = ids[i] .. "#"
      for v = 0, per * (w[i] / g) - 1 do
        size = size + 1
        entries[size] = mix(sluice.hash(prefix .. v)) * OWNER_SPAN + i
      end
    end
  end
  table.sort(entries)
  local points, owners = {}, {}
  for k = 1, size do
    local e = entries[k]
    local i = e % OWNER_SPAN
    owners[k] = i
    points[k] = (e - i) / OWNER_SPAN
  end

  state.hash_points, state.hash_owners, state.hash_size = points, owners, size
  state.hash_w, state.hash_n, state.hash_eps = w, n, eps
end

-- The value of the first `needle` (= "name=") parameter in query string q, or nil.
local function query_value(q, needle)
  local from = 1
  while true do
    local a, b = find(q, needle, from, true)
    if a == nil then return nil end
    if a == 1 or byte(q, a - 1) == 38 then -- at the start or after '&'
      local e = find(q, "&", b + 1, true)
      if e == nil then return sub(q, b + 1) end
      return sub(q, b + 1, e - 1)
    end
    from = a + 1
  end
end

function M.pick(pool, req)
  local n = pool.n
  if n == 0 then return nil end
  local state = pool.state
  if state.hash_ready == nil then configure(pool, state) end

  -- One pass: has a weight changed since the ring was built, is anything available?
  local eps = pool.endpoints
  local w = state.hash_w
  local stale = w == nil or state.hash_eps ~= eps or state.hash_n ~= n
  local any = false
  for i = 1, n do
    local ep = eps[i]
    if ep.available then any = true end
    if not stale and tonumber(ep.weight) ~= w[i] then stale = true end
  end
  if not any then return nil end
  if stale then build(pool, state) end

  local key = nil
  local hname = state.hash_header
  if hname then key = req:header(hname) end
  if key == nil or key == "" then
    local needle = state.hash_needle
    if needle then
      local q = req.query
      key = q and query_value(q, needle) or nil
    end
  end

  local size = state.hash_size
  if key == nil or key == "" or size == 0 then
    return state.hash_fb(pool, req)
  end

  local h = mix(sluice.hash(key))
  local points = state.hash_points
  local lo = 1
  if h <= points[size] then
    local hi = size
    while lo < hi do
      local mid = floor((lo + hi) / 2)
      if points[mid] < h then lo = mid + 1 else hi = mid end
    end
  end -- else past the last point: wraps to the first

  local owners = state.hash_owners
  for _ = 1, size do
    local i = owners[lo]
    if eps[i].available then return i end
    lo = lo == size and 1 or lo + 1
  end
  return nil
end

return M
