-- Test support for policy specs: a sandbox like the runtime's, a fake `sluice` module
-- with a controllable clock and randomness, and fake pools, endpoints and requests.
--
-- Specs run from the repository root:
--
--   package.path = "tests/spec/?.lua;" .. package.path
--   local h = require "helpers"
--   local M, fake = h.load_policy("balancer/round_robin.lua")
--   local pool = h.make_pool({ { weight = 5 }, { weight = 1, available = false } })
--   local idx = M.pick(pool, h.make_req())
--
-- The sandbox is stricter than the runtime's in two ways, so a spec fails loudly where a
-- policy would misbehave in production: reading or writing an undefined global raises
-- (this is what catches a policy reaching for `os`, `io` or `ffi`), and `math.random` /
-- `math.randomseed` raise, because policies must draw from `sluice.random()`.

local ffi_ok, ffi = pcall(require, "ffi")

local h = {}

h.ROOT = "."

-- sluice.json exactly as the runtime has it (lua/sluice/json.lua over lua-cjson); nil when
-- lua-cjson is not installed.
do
  local chunk = loadfile(h.ROOT .. "/lua/sluice/json.lua")
  local ok, json = pcall(chunk)
  if ok then h.json = json end
end

-- Fake sluice ------------------------------------------------------------------------

local LCG_M = 2147483647 -- Park-Miller "minimal standard": exact in doubles
local LCG_A = 48271

-- Returns a fake with:
--   fake.sluice               the module policies see as the global `sluice`
--   fake.now                  what sluice.now_ms() returns (ms; starts at 0; assignable)
--   fake.advance(ms)          fake.now = fake.now + ms
--   fake.seed(n)              restart sluice.random()'s generator from seed n (default 1)
--   fake.script(seq)          sluice.random() returns seq[1], seq[2], ... then raises
--                             if drawn again; fake.script(nil) returns to the generator
--   fake.draws                how many times sluice.random() was called
--   fake.logs                 captured sluice.log calls: { level = ..., msg = "a b c" }
--   fake.shared               sluice.shared, the per-worker shared table
--   fake.metrics[name]        last value / running count recorded by sluice.metrics.*
function h.new_fake()
  local fake = { now = 0, draws = 0, logs = {}, shared = {}, metrics = {} }
  local x, scripted, pos = 1, nil, 0

  function fake.advance(ms)
    fake.now = fake.now + ms
  end

  function fake.seed(n)
    x = (n or 1) % LCG_M
    if x == 0 then x = 1 end
    scripted = nil
  end

  function fake.script(seq)
    scripted, pos = seq, 0
  end

  local s = {}

  function s.now_ms()
    return fake.now
  end

  function s.random()
    fake.draws = fake.draws + 1
    if scripted then
      pos = pos + 1
      local v = scripted[pos]
      if v == nil then
        error("sluice.random(): scripted sequence exhausted after " .. #scripted .. " draws", 2)
      end
      return v
    end
    x = (x * LCG_A) % LCG_M
    return (x - 1) / (LCG_M - 1) -- [0, 1)
  end

  -- FNV-1a, 32 bits: deterministic, enough for specs of hashing policies.
  function s.hash(str)
    local hv = 2166136261
    for i = 1, #str do
      hv = bit.bxor(hv, str:byte(i))
      hv = (hv * 16777619) % 4294967296
    end
    return hv
  end

  function s.log(level, ...)
    local parts = {}
    for i = 1, select("#", ...) do
      parts[i] = tostring((select(i, ...)))
    end
    fake.logs[#fake.logs + 1] = { level = level, msg = table.concat(parts, " ") }
  end

  -- Lowercase hex SHA-256, like the runtime's (OpenSSL); pure Lua, see h.sha256.
  function s.sha256(str)
    if type(str) ~= "string" then error("sluice.sha256: expected a string", 2) end
    return h.sha256(str)
  end

  -- sluice.json as the runtime configures it (lua-cjson), when lua-cjson is installed.
  s.json = h.json

  s.shared = fake.shared
  s.metrics = {
    counter = function(name, by)
      fake.metrics[name] = (fake.metrics[name] or 0) + (by or 1)
    end,
    gauge = function(name, v)
      fake.metrics[name] = v
    end,
    histogram = function(name, v)
      local t = fake.metrics[name] or {}
      t[#t + 1] = v
      fake.metrics[name] = t
    end,
  }

  fake.sluice = s
  return fake
end

-- Sandbox and loading ----------------------------------------------------------------

local ALLOWED = {
  "string", "table", "bit", "pairs", "ipairs", "next", "type", "tostring", "tonumber",
  "select", "error", "assert", "pcall", "unpack", "setmetatable", "getmetatable",
  "rawget", "rawset", "rawequal",
}

local function forbid(name, instead)
  return function()
    error(name .. " is not allowed in policies; use " .. instead, 2)
  end
end

local function sandbox_math()
  local m = {}
  for k, v in pairs(math) do m[k] = v end
  m.random = forbid("math.random", "sluice.random()")
  m.randomseed = forbid("math.randomseed", "fake.seed() in the spec")
  return m
end

local function load_into(path, env)
  local chunk, err = loadfile(path)
  if not chunk then error(err, 0) end
  setfenv(chunk, env)
  return chunk()
end

-- Returns a fresh sandbox environment whose `sluice` is fake.sluice. `require` only
-- resolves modules under policies/ and lua/ ("balancer.x" -> policies/balancer/x.lua),
-- loaded into the same sandbox; `require "sluice"` returns the fake module.
function h.sandbox(fake, opts)
  opts = opts or {}
  local env = {}
  for _, k in ipairs(ALLOWED) do env[k] = _G[k] end
  env.math = sandbox_math()
  env.sluice = fake.sluice

  local loaded = { sluice = fake.sluice }
  env.require = function(name)
    if type(name) ~= "string" then error("require: module name must be a string", 2) end
    if loaded[name] ~= nil then return loaded[name] end
    if name:find("%.%.") or name:find("^[./]") or name:find("[/\\]") then
      error("require: bad module name '" .. name .. "'", 2)
    end
    local rel = name:gsub("%.", "/") .. ".lua"
    for _, dir in ipairs({ "policies/", "lua/" }) do
      local path = h.ROOT .. "/" .. dir .. rel
      local f = io.open(path, "r")
      if f then
        f:close()
        local mod = load_into(path, env)
        if mod == nil then mod = true end
        loaded[name] = mod
        return mod
      end
    end
    error("require: module '" .. name .. "' not found under policies/ or lua/", 2)
  end

  if opts.strict ~= false then
    setmetatable(env, {
      __index = function(_, k)
        error("policy read undefined global '" .. tostring(k) .. "' (not in the sandbox)", 2)
      end,
      __newindex = function(_, k)
        error("policy assigned global '" .. tostring(k) .. "'; use a local", 2)
      end,
    })
  end
  return env
end

-- load_policy("balancer/round_robin.lua" [, opts]) -> module, fake, env
-- Loads policies/<relpath> into a fresh sandbox. opts.fake shares an existing fake;
-- opts.strict = false turns off the undefined-global checks.
function h.load_policy(relpath, opts)
  opts = opts or {}
  local fake = opts.fake or h.new_fake()
  local env = h.sandbox(fake, opts)
  local mod = load_into(h.ROOT .. "/policies/" .. relpath, env)
  assert(type(mod) == "table", "policies/" .. relpath .. " must return a table")
  return mod, fake, env
end

-- Endpoints and pools ----------------------------------------------------------------

h.EP_DEFAULTS = {
  weight = 1, inflight = 0, max_inflight = 0, queued = 0, ewma_ms = 0, fails = 0,
  successes = 0, state = 0, reported_load = 0,
}

h.OPEN, h.CLOSED, h.HALF_OPEN = 1, 0, 2

-- What the runtime computes for ep.available: breaker not open and a free slot.
function h.is_available(ep)
  local max = tonumber(ep.max_inflight)
  return tonumber(ep.state) ~= h.OPEN and (max == 0 or tonumber(ep.inflight) < max)
end

-- Recomputes ep.available for every endpoint (after changing inflight or state).
function h.refresh(pool)
  for i = 1, pool.n do
    local ep = pool.endpoints[i]
    ep.available = h.is_available(ep)
  end
end

-- A plain-table endpoint: defaults for every field; `available` derived from the others
-- unless given. Unknown fields raise, so a typo cannot silently become a default.
function h.make_endpoint(spec)
  spec = spec or {}
  local ep = {}
  for k, v in pairs(h.EP_DEFAULTS) do ep[k] = v end
  for k, v in pairs(spec) do
    if h.EP_DEFAULTS[k] == nil and k ~= "available" then
      error("make_endpoint: unknown field '" .. tostring(k) .. "'", 2)
    end
    ep[k] = v
  end
  if spec.available == nil then ep.available = h.is_available(ep) end
  return ep
end

local FFI_CDEF = [[
struct sluice_spec_endpoint {
  int32_t weight;
  int32_t inflight;
  int32_t max_inflight;
  int32_t queued;
  double  ewma_ms;
  int64_t fails;
  int64_t successes;
  int32_t state;
  double  reported_load;
  bool    available;
};
]]

local ffi_ep_type
local function ffi_endpoint_type()
  if not ffi_ok then error("make_pool{ ffi = true } needs LuaJIT's ffi module", 3) end
  if not ffi_ep_type then
    -- ffi.cdef is per VM, and busted may run several spec files in one VM.
    if not pcall(ffi.typeof, "struct sluice_spec_endpoint") then ffi.cdef(FFI_CDEF) end
    ffi_ep_type = ffi.typeof("struct sluice_spec_endpoint")
  end
  return ffi_ep_type
end

-- An FFI cdata endpoint like the runtime's: the same fields as make_endpoint, with
-- fails/successes as int64 cdata and available as a C bool. Returned as a pointer into
-- an array kept alive by the pool (pool._ffi_storage).
local function make_ffi_endpoints(eps)
  local t = ffi_endpoint_type()
  local n = #eps
  local arr = ffi.new(ffi.typeof("$[?]", t), math.max(n, 1))
  local ptrs = {}
  for i = 1, n do
    local src, dst = eps[i], arr[i - 1]
    for k in pairs(h.EP_DEFAULTS) do dst[k] = src[k] end
    dst.available = src.available
    ptrs[i] = arr + (i - 1)
  end
  return ptrs, arr
end

-- make_pool(specs [, opts]) -> pool
--   specs: array of endpoint specs for make_endpoint (may be empty)
--   opts.name (default "test"), opts.options (default {}),
--   opts.ffi = true: endpoints are FFI cdata pointers instead of Lua tables.
-- The pool has name, n, endpoints, state (empty) and options, as the runtime builds it.
function h.make_pool(specs, opts)
  opts = opts or {}
  local eps = {}
  for i, spec in ipairs(specs or {}) do eps[i] = h.make_endpoint(spec) end
  local pool = {
    name = opts.name or "test",
    n = #eps,
    endpoints = eps,
    state = {},
    options = opts.options or {},
  }
  if opts.ffi then
    pool.endpoints, pool._ffi_storage = make_ffi_endpoints(eps)
  end
  return pool
end

-- Sets fields on endpoint i (works for tables and cdata), then recomputes `available`
-- unless the change sets it explicitly.
function h.set(pool, i, fields)
  local ep = pool.endpoints[i]
  for k, v in pairs(fields) do ep[k] = v end
  if fields.available == nil then ep.available = h.is_available(ep) end
end

-- Requests ---------------------------------------------------------------------------

-- make_req{ method=, path=, host=, attempt=, query=, id=, client=, body=, json=, pool=,
--           headers = { ["x-a"] = "1" } } -> req
-- req:header(name) is case-insensitive and returns a string or nil; it reads the request as
-- it arrived, like the runtime's (edits are applied by the gateway after the hook returns).
-- req:set_header(name, value), req:remove_header(name) and req:set_path(path) check their
-- arguments the way the runtime does and append to req.edits, in call order:
--   { op = "set_header", name = ..., value = ... }   (a number value is kept as given)
--   { op = "remove_header", name = ... }
--   { op = "set_path", path = ... }
-- req.json is spec.json when given; else, when spec.body is a string, the body decoded with
-- h.json (nil when it is not JSON); else nil. req.id defaults to "test-request-id".
local req_headers = setmetatable({}, { __mode = "k" })

local function edit_methods(obj, with_path)
  obj.edits = {}
  obj.set_header = function(self, name, value)
    if type(name) ~= "string" then error("header name must be a string", 2) end
    if type(value) ~= "string" and type(value) ~= "number" then
      error("header value must be a string", 2)
    end
    self.edits[#self.edits + 1] = { op = "set_header", name = name, value = value }
  end
  obj.remove_header = function(self, name)
    if type(name) ~= "string" then error("header name must be a string", 2) end
    self.edits[#self.edits + 1] = { op = "remove_header", name = name }
  end
  if with_path then
    obj.set_path = function(self, path)
      if type(path) ~= "string" then error("set_path: expected a string", 2) end
      self.edits[#self.edits + 1] = { op = "set_path", path = path }
    end
  end
end

local function lower_headers(t)
  local headers = {}
  for k, v in pairs(t or {}) do headers[k:lower()] = v end
  return headers
end

function h.make_req(spec)
  spec = spec or {}
  local headers = lower_headers(spec.headers)
  local json = spec.json
  if json == nil and type(spec.body) == "string" and h.json then
    json = h.json.decode(spec.body)
  end
  local req = {
    method = spec.method or "POST",
    path = spec.path or "/v1/chat/completions",
    host = spec.host or "localhost",
    attempt = spec.attempt or 1,
    query = spec.query,
    id = spec.id or "test-request-id",
    client = spec.client,
    body = spec.body,
    json = json,
    pool = spec.pool,
    header = function(_, name) return headers[name:lower()] end,
  }
  edit_methods(req, true)
  req_headers[req] = headers
  return req
end

-- make_res{ status = 200, headers = { ... } } -> res, as on_response sees it: res.status,
-- res:header(name) (case-insensitive, the upstream's headers), res:set_header and
-- res:remove_header recorded in res.edits as for make_req (no set_path).
function h.make_res(spec)
  spec = spec or {}
  local headers = lower_headers(spec.headers)
  local res = {
    status = spec.status or 200,
    header = function(_, name) return headers[name:lower()] end,
  }
  edit_methods(res, false)
  req_headers[res] = headers
  return res
end

-- final_headers(req_or_res) -> the headers (lowercase names) after applying obj.edits in
-- order to those obj was made with: what the upstream (or client) would receive.
function h.final_headers(obj)
  local out = {}
  for k, v in pairs(req_headers[obj] or {}) do out[k] = v end
  for _, e in ipairs(obj.edits or {}) do
    if e.op == "set_header" then
      out[e.name:lower()] = tostring(e.value)
    elseif e.op == "remove_header" then
      out[e.name:lower()] = nil
    end
  end
  return out
end

-- Running picks ----------------------------------------------------------------------

-- Calls M.pick(pool, req) `times` times; returns counts[i] (0 for never-picked
-- endpoints) and the number of nil results. Raises if a pick returns anything other
-- than nil or the index of an available endpoint.
function h.count_picks(M, pool, times, req)
  req = req or h.make_req()
  local counts, nils = {}, 0
  for i = 1, pool.n do counts[i] = 0 end
  for _ = 1, times do
    local i = M.pick(pool, req)
    if i == nil then
      nils = nils + 1
    else
      h.check_pick(pool, i)
      counts[i] = counts[i] + 1
    end
  end
  return counts, nils
end

-- Raises unless i is the index of an available endpoint of pool.
function h.check_pick(pool, i)
  if type(i) ~= "number" or i ~= math.floor(i) or i < 1 or i > pool.n then
    error("pick returned " .. tostring(i) .. ", not an index in 1.." .. pool.n, 2)
  end
  if not pool.endpoints[i].available then
    error("pick returned unavailable endpoint " .. i, 2)
  end
  return i
end

-- Calls M.pick `times` times and returns the indices as an array (nil results as false).
function h.sequence(M, pool, times, req)
  req = req or h.make_req()
  local seq = {}
  for k = 1, times do
    local i = M.pick(pool, req)
    if i ~= nil then h.check_pick(pool, i) end
    seq[k] = i or false
  end
  return seq
end

-- Both kinds of endpoint a policy must handle, for parameterised describe blocks.
h.ENDPOINT_KINDS = { { name = "table endpoints", ffi = false } }
if ffi_ok then
  h.ENDPOINT_KINDS[2] = { name = "ffi endpoints", ffi = true }
end


-- Resilience policies (retry, breaker) ---------------------------------------------

local config_mod
-- normalized_pool{ retry = {...}, breaker = {...} } -> the pool table exactly as
-- lua/sluice/config.lua normalizes it (every default filled in), so specs see the same
-- pool.retry / pool.breaker the runtime hands to policies. Raises on a config error.
function h.normalized_pool(fields)
  if not config_mod then
    config_mod = assert(loadfile(h.ROOT .. "/lua/sluice/config.lua"))()
  end
  local p = { endpoints = { "http://127.0.0.1:1" } }
  for k, v in pairs(fields or {}) do p[k] = v end
  local cfg, err = config_mod.validate({ pools = { p = p } })
  if not cfg then error("normalized_pool: " .. tostring(err.path) .. ": " .. tostring(err.msg), 2) end
  return cfg.pools.p
end

-- The runtime's FFI module (lua/sluice/ffi.lua), loaded once per VM (ffi.cdef cannot run
-- twice). Needs LuaJIT.
function h.runtime_ffi()
  local m = package.loaded["sluice.ffi"]
  if not m then
    m = assert(loadfile(h.ROOT .. "/lua/sluice/ffi.lua"))()
    package.loaded["sluice.ffi"] = m
  end
  return m
end

-- pool_stats{ active =, queued =, retrying =, ejected = } [, as_ffi] -> pool.stats as a
-- plain table, or (as_ffi) an sl_pool_view_t cdata like the runtime's.
function h.pool_stats(t, as_ffi)
  t = t or {}
  local s = { active = t.active or 0, queued = t.queued or 0, retrying = t.retrying or 0,
              ejected = t.ejected or 0 }
  if not as_ffi then return s end
  h.runtime_ffi()
  local c = ffi.new("sl_pool_view_t")
  for k, v in pairs(s) do c[k] = v end
  return c
end

-- outcome(200) / outcome(503) / outcome("connect_error") [, extra fields] -> an outcome
-- table as the runtime builds it: ok is true for a response below 500.
function h.outcome(what, extra)
  local o
  if type(what) == "number" then
    o = { kind = "response", status = what, ok = what > 0 and what < 500 }
  else
    o = { kind = what, ok = false }
  end
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- breaker_sim(M, breaker_fields [, opts]) -> sim: one endpoint driven through a breaker
-- policy the way the runtime (src/admission.c) does it:
--   sim:record(outcome) calls M.record(ep, outcome, fake.now, st, pool) and applies the
--     verdict: "open" -> ejections + 1 unless already open, state OPEN until now + ms;
--     "close" -> state CLOSED, ejections 0 (when not already closed). Returns the verdict.
--   sim:advance(ms) moves the fake clock and turns OPEN into HALF_OPEN once its time is up
--     (as the runtime does before each pick); sim:tick() does the latter alone.
--   sim.ep (state, ejections), sim.st (the policy's per-endpoint table), sim.pool
--   (pool.breaker normalized from breaker_fields), sim.fake, sim.open_until.
-- opts.ffi = true: the endpoint is an sl_ep_view_t cdata like the runtime's.
-- opts.now: the clock's start (default 1e9, a realistic uv_now value).
-- opts.fake: share a fake (default: the one M was loaded with must be passed for
--   policies that read sluice.now_ms(); the sim only passes now_ms explicitly).
function h.breaker_sim(M, breaker_fields, opts)
  opts = opts or {}
  local fake = opts.fake or h.new_fake()
  fake.now = opts.now or 1e9
  local ep
  if opts.ffi then
    h.runtime_ffi()
    ep = ffi.new("sl_ep_view_t")
    ep.reported_load = -1
    ep.weight = 1
  else
    ep = { state = 0, ejections = 0, weight = 1, inflight = 0, max_inflight = 0, queued = 0,
           ewma_ms = 0, fails = 0, successes = 0, consecutive_fails = 0, reported_load = -1,
           available = true }
  end
  local pconf = h.normalized_pool({ breaker = breaker_fields or {} })
  local sim = {
    M = M, fake = fake, ep = ep, st = {}, open_until = nil,
    pool = { name = "test", n = 1, endpoints = { ep }, state = {}, options = {},
             breaker = pconf.breaker, stats = h.pool_stats() },
    verdicts = {},
  }

  function sim:state() return tonumber(self.ep.state) end
  function sim:ejections() return tonumber(self.ep.ejections) end

  function sim:tick()
    if tonumber(self.ep.state) == h.OPEN and self.fake.now >= self.open_until then
      self.ep.state = h.HALF_OPEN
    end
  end

  function sim:advance(ms)
    self.fake.advance(ms)
    self:tick()
  end

  function sim:record(outcome)
    if type(outcome) ~= "table" then outcome = h.outcome(outcome) end
    local action, ms = self.M.record(self.ep, outcome, self.fake.now, self.st, self.pool)
    if action == "open" then
      assert(type(ms) == "number" and ms > 0, "record returned \"open\" without a duration")
      if tonumber(self.ep.state) ~= h.OPEN then self.ep.ejections = self.ep.ejections + 1 end
      self.ep.state = h.OPEN
      self.open_until = self.fake.now + ms
    elseif action == "close" then
      if tonumber(self.ep.state) ~= h.CLOSED then
        self.ep.state = h.CLOSED
        self.ep.ejections = 0
      end
    elseif action ~= nil then
      error("record returned " .. tostring(action) .. ", expected nil, \"open\" or \"close\"", 2)
    end
    self.verdicts[#self.verdicts + 1] = action or false
    return action, ms
  end

  -- Records outcome n times; returns the verdicts as an array (nil as false).
  function sim:record_n(n, outcome)
    local out = {}
    for k = 1, n do out[k] = self:record(outcome) or false end
    return out
  end

  return sim
end

-- Route policies (on_request / on_response) -------------------------------------------

-- route_ctx{ pools = { "a", "b" } (or { a = true }), files = { ["keys.lua"] = ... } } -> ctx
-- The ctx a route policy's init(options, ctx) gets: ctx.pools is the set of pool names;
-- ctx.load_table(path) returns a fresh copy of files[path] when it is a table, or runs it
-- when it is a string of Lua source (no globals, like the runtime); paths not in `files`
-- are read from disk (relative to opts.dir when given). Errors read like the runtime's
-- ("load_table: ..."). ctx.loaded lists the paths asked for, in order.
local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[deep_copy(k)] = deep_copy(x) end
  return t
end

function h.route_ctx(opts)
  opts = opts or {}
  local pools = {}
  for k, v in pairs(opts.pools or {}) do
    if type(k) == "number" then pools[v] = true else pools[k] = v end
  end
  local files = opts.files or {}
  local ctx = { pools = pools, loaded = {} }
  function ctx.load_table(path)
    if type(path) ~= "string" or path == "" then error("load_table: expected a file path", 2) end
    ctx.loaded[#ctx.loaded + 1] = path
    local f = files[path]
    local chunk, err
    if type(f) == "table" then
      return deep_copy(f)
    elseif type(f) == "string" then
      chunk, err = loadstring(f, "=" .. path)
    else
      local full = path
      if opts.dir and path:sub(1, 1) ~= "/" then full = opts.dir .. "/" .. path end
      chunk, err = loadfile(full)
    end
    if not chunk then error("load_table: " .. err, 2) end
    setfenv(chunk, {})
    local ok, v = pcall(chunk)
    if not ok then error("load_table: " .. tostring(v), 2) end
    if type(v) ~= "table" then error("load_table: " .. path .. " must return a table, got " .. type(v), 2) end
    return v
  end
  return ctx
end

-- The runtime's glue module (lua/sluice/runtime.lua), loaded once per VM; needs LuaJIT and
-- lua-cjson. Its route_request / route_init are what the gateway runs around a route hook.
function h.runtime()
  local m = package.loaded["sluice.runtime"]
  if not m then
    h.runtime_ffi()
    package.loaded["sluice.json"] = package.loaded["sluice.json"] or h.json
    package.loaded["sluice.sandbox"] = package.loaded["sluice.sandbox"]
      or assert(loadfile(h.ROOT .. "/lua/sluice/sandbox.lua"))()
    m = assert(loadfile(h.ROOT .. "/lua/sluice/runtime.lua"))()
    package.loaded["sluice.runtime"] = m
  end
  return m
end

-- route_request(M, req [, options [, name]]) -> what the gateway makes of M.on_request's
-- answer: nil (the route's pool), "pool", name, or "respond", status, content_type,
-- header_lines, body (JSON bodies encoded). Raises where the gateway would log a policy error.
function h.route_request(M, req, options, name)
  return h.runtime().route_request(M.on_request, name or "policy", options or {}, req)
end

-- SHA-256 ---------------------------------------------------------------------------------

local SHA_K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

-- sha256(s) -> lowercase hex digest of the byte string s (pure Lua on the `bit` library).
function h.sha256(msg)
  local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
  local rshift, lshift, ror, tobit = bit.rshift, bit.lshift, bit.ror, bit.tobit
  local len = #msg
  local bits = len * 8
  local hi, lo = math.floor(bits / 4294967296), bits % 4294967296
  msg = msg .. "\128" .. string.rep("\0", (55 - len) % 64)
    .. string.char(band(rshift(hi, 24), 255), band(rshift(hi, 16), 255),
                   band(rshift(hi, 8), 255), band(hi, 255),
                   band(rshift(lo, 24), 255), band(rshift(lo, 16), 255),
                   band(rshift(lo, 8), 255), band(lo, 255))
  assert(#msg % 64 == 0)
  local H = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
              0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 }
  for i = 1, 8 do H[i] = tobit(H[i]) end
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do
      local a, b, c, d = msg:byte(chunk + 4 * i, chunk + 4 * i + 3)
      w[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for i = 16, 63 do
      local x, y = w[i - 15], w[i - 2]
      local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
      local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
      w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
    end
    local a, b, c, d, e, f, g, hh = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
    for i = 0, 63 do
      local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
      local ch = bxor(band(e, f), band(bnot(e), g))
      local t1 = tobit(hh + S1 + ch + SHA_K[i + 1] + w[i])
      local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
      local maj = bxor(band(a, b), band(a, c), band(b, c))
      local t2 = tobit(S0 + maj)
      hh, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
    H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + hh)
  end
  local out = {}
  for i = 1, 8 do out[i] = bit.tohex(H[i], 8) end
  return table.concat(out)
end

return h
