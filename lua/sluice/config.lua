-- Validates a config table against the schema below and returns a normalized copy with every
-- default filled in. Errors are raised as "key.path: what was expected" (the C loader adds
-- "file:line: "). The schema is the single source of truth for config keys: docs/config.md
-- documents it and the C side reads only the normalized result.
local M = {}

local function describe(v)
  local t = type(v)
  if t == "string" then return string.format("string %q", #v > 40 and v:sub(1, 40) .. "..." or v) end
  if t == "number" or t == "boolean" then return t .. " " .. tostring(v) end
  return t
end

local function fail(path, msg) error({ path = path, msg = msg }, 0) end

local function join(path, key)
  if type(key) == "number" then return path .. "[" .. key .. "]" end
  return path == "" and key or path .. "." .. key
end

-- Spec constructors ----------------------------------------------------------------------

local function int(min, max, default)
  return { kind = "integer", min = min, max = max, default = default }
end
local function num(min, max, default) return { kind = "number", min = min, max = max, default = default } end
local function str(default, pattern, what) return { kind = "string", default = default, pattern = pattern, what = what } end
local function bool(default) return { kind = "boolean", default = default } end
local function enum(values, default) return { kind = "enum", values = values, default = default } end
local function record(fields, default) return { kind = "record", fields = fields, default = default } end
-- A record that may also be written as `false` to turn the feature off.
local function switchable(fields) local r = record(fields); r.allow_false = true; return r end
local function array(of, opts) opts = opts or {}; return { kind = "array", of = of, min = opts.min, default = opts.default } end
local function map(of) return { kind = "map", of = of, default = {} } end
local function any_table() return { kind = "any_table", default = {} } end
local function custom(fn, default) return { kind = "custom", fn = fn, default = default } end

-- Values ---------------------------------------------------------------------------------

local function parse_hostport(s)
  local host, port = s:match("^%[([%x:%.]+)%]:(%d+)$")
  if not host then host, port = s:match("^([%w%.%-_]+):(%d+)$") end
  port = tonumber(port)
  if not host or not port or port > 65535 then return nil end
  return host, port
end

local function parse_url(s)
  local scheme, rest = s:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then return nil, "expected a URL like http://host:port" end
  scheme = scheme:lower()
  local default_ports = { http = 80, https = 443, ws = 80, wss = 443 }
  if not default_ports[scheme] then return nil, "expected scheme http, https, ws or wss" end
  local authority, path = rest:match("^([^/?#]*)(.*)$")
  if path ~= "" and not path:match("^/[^?#%s]*$") then return nil, "expected a path without query or fragment" end
  local host, port = authority:match("^%[([%x:%.]+)%]:?(%d*)$")
  if not host then host, port = authority:match("^([%w%.%-_]+):?(%d*)$") end
  if not host or host == "" then return nil, "expected a host name or address" end
  if authority:find("@", 1, true) then return nil, "credentials in endpoint URLs are not supported" end
  port = port ~= "" and tonumber(port) or default_ports[scheme]
  if not port or port < 1 or port > 65535 then return nil, "expected a port between 1 and 65535" end
  if path == "/" then path = "" end
  return { scheme = scheme, host = host, port = port, path = path,
           tls = scheme == "https" or scheme == "wss", websocket = scheme == "ws" or scheme == "wss" }
end

local function endpoint_spec(v, path)
  if type(v) == "string" then v = { url = v } end
  if type(v) ~= "table" then fail(path, "expected a URL string or { url = ..., weight = ... }, got " .. describe(v)) end
  for k in pairs(v) do
    if k ~= "url" and k ~= "weight" then fail(join(path, tostring(k)), "unknown key (expected url or weight)") end
  end
  if type(v.url) ~= "string" then fail(join(path, "url"), "expected a URL string, got " .. describe(v.url)) end
  local u, err = parse_url(v.url)
  if not u then fail(join(path, "url"), err .. ", got " .. describe(v.url)) end
  local w = v.weight == nil and 1 or v.weight
  if type(w) ~= "number" or w % 1 ~= 0 or w < 1 or w > 1000 then
    fail(join(path, "weight"), "expected an integer from 1 to 1000, got " .. describe(v.weight))
  end
  u.url = v.url
  u.weight = w
  return u
end

local function listen_spec(v, path)
  if type(v) == "string" then v = { addr = v } end
  if type(v) ~= "table" then fail(path, "expected \"host:port\" or { addr = ..., tls = {...} }, got " .. describe(v)) end
  for k in pairs(v) do
    if k ~= "addr" and k ~= "tls" then fail(join(path, tostring(k)), "unknown key (expected addr or tls)") end
  end
  if type(v.addr) ~= "string" or not parse_hostport(v.addr) then
    fail(join(path, "addr"), "expected \"host:port\", got " .. describe(v.addr))
  end
  local host, port = parse_hostport(v.addr)
  local out = { addr = v.addr, host = host, port = port }
  if v.tls ~= nil then
    if type(v.tls) ~= "table" or type(v.tls.cert) ~= "string" or type(v.tls.key) ~= "string" then
      fail(join(path, "tls"), "expected { cert = \"file\", key = \"file\" }")
    end
    out.tls = { cert = v.tls.cert, key = v.tls.key }
  end
  return out
end

local function hostport_spec(v, path)
  if v == false then return false end
  if type(v) ~= "string" or not parse_hostport(v) then
    fail(path, "expected \"host:port\" or false, got " .. describe(v))
  end
  local host, port = parse_hostport(v)
  return { addr = v, host = host, port = port }
end

local policy_name = "^[%a_][%w_%-]*$"

local RETRY_KINDS = { connect_error = true, connect_timeout = true, reset = true, timeout = true }
local function retry_condition(v, path)
  if type(v) == "number" and v % 1 == 0 and v >= 400 and v <= 599 then return v end
  if type(v) == "string" and RETRY_KINDS[v] then return v end
  fail(path, "expected connect_error, connect_timeout, reset, timeout or a status 400..599, got " .. describe(v))
end

-- Schema ---------------------------------------------------------------------------------

local pool_schema = record({
  endpoints = array(custom(endpoint_spec), { min = 1 }),
  balancer = str("least_inflight", policy_name, "a policy name"),
  balancer_options = any_table(),
  max_inflight = int(0, 1000000, 0),
  queue = record({ max = int(0, 1000000, 128), timeout_ms = int(1, 3600000, 2000) }),
  timeout_ms = record({
    connect = int(1, 3600000, 2000),
    first_byte = int(1, 86400000, 60000),
    total = int(0, 86400000, 0),
  }),
  keepalive = record({ max_idle = int(0, 100000, 64), idle_timeout_ms = int(1, 86400000, 60000) }),
  -- retry and breaker are on with these defaults; `retry = false` / `breaker = false` disable.
  retry = switchable({
    policy = str("exponential", policy_name, "a policy name"),
    attempts = int(1, 100, 3),
    base_ms = int(0, 600000, 25),
    max_ms = int(0, 600000, 250),
    retry_on = array(custom(retry_condition), { default = { "connect_error", "reset", 502, 503 } }),
    retry_after_max_ms = int(0, 600000, 2000),
    per_try_timeout_ms = int(0, 86400000, 0),
    budget_ratio = num(0, 1, 0.2),
    budget_min = int(0, 1000000, 3),
    max_body_bytes = int(0, 2 ^ 40, 1024 * 1024),
  }),
  breaker = switchable({
    policy = str("consecutive", policy_name, "a policy name"),
    failures = int(1, 1000000, 5),
    failure_rate = num(0, 1, 0.5),
    window_ms = int(1, 86400000, 10000),
    min_requests = int(1, 1000000, 20),
    open_ms = int(1, 86400000, 30000),
    max_open_ms = int(1, 86400000, 300000),
    half_open_probes = int(1, 1000, 1),
    max_ejected_share = num(0, 1, 0.5),
  }),
  fallback = str(nil, "^[%w_%-]+$", "a pool name"),
  preserve_host = bool(false),
  tls = record({ ca = str(nil, nil, "a file path"), verify = bool(true) }),
  websocket = record({
    max_message_bytes = int(125, 2 ^ 31, 1024 * 1024),
    idle_timeout_ms = int(0, 86400000, 300000),
    ping_interval_ms = int(0, 86400000, 0),
  }),
})

local hook_schema = record({
  policy = str(nil, policy_name, "a policy name"),
  options = any_table(),
  json_max_bytes = int(0, 64 * 1024 * 1024, 64 * 1024),
})

-- Complete final responses only: a stored 206 or 304 would answer requests that asked for no
-- range or revalidation, and a 1xx is not a response to store.
local function cacheable_status(v, path)
  if type(v) ~= "number" or v ~= math.floor(v) or v < 200 or v > 599 or v == 206 or v == 304 then
    fail(path, "expected a final status 200-599 other than 206 and 304, got " .. describe(v))
  end
  return v
end

local check -- defined below; hook specs are checked with it

local schema = record({
  listen = custom(function(v, path)
    if type(v) == "string" then v = { v } end
    if type(v) ~= "table" or #v == 0 then fail(path, "expected a list of \"host:port\", got " .. describe(v)) end
    local out = {}
    for i, item in ipairs(v) do out[i] = listen_spec(item, join(path, i)) end
    return out
  end, { "127.0.0.1:8080" }),
  admin = custom(function(v, path)
    if type(v) ~= "table" then return hostport_spec(v, path) end
    for k in pairs(v) do
      if k ~= "addr" and k ~= "token" then fail(join(path, tostring(k)), "unknown key (expected addr or token)") end
    end
    local out = hostport_spec(v.addr == nil and "127.0.0.1:9901" or v.addr, join(path, "addr"))
    if v.token ~= nil then
      if type(v.token) ~= "string" or #v.token < 16 then
        fail(join(path, "token"), "expected a string of at least 16 characters, got " .. describe(v.token))
      end
      out.token = v.token
    end
    return out
  end, "127.0.0.1:9901"),
  workers = int(0, 256, 1),
  policies = str("policies"),
  log_level = enum({ "error", "warn", "info", "debug" }, "info"),
  access_log = custom(function(v, path)
    if v == true then return "-" end
    if v == false then return false end
    if type(v) ~= "string" or v == "" then fail(path, "expected true, false or a file path, got " .. describe(v)) end
    return v
  end, false),
  watch = bool(true),
  lua = record({ jit = bool(false), instruction_budget = int(1000, 2 ^ 40, 1000000) }),
  cache = record({ max_bytes = int(0, 2 ^ 40, 64 * 1024 * 1024), max_entry_bytes = int(0, 2 ^ 40, 0) }),
  limits = record({
    max_header_bytes = int(256, 1048576, 32768),
    max_headers = int(1, 10000, 100),
    max_body_bytes = int(0, 2 ^ 40, 16 * 1024 * 1024),
    header_timeout_ms = int(1, 3600000, 10000),
    idle_timeout_ms = int(1, 86400000, 60000),
    drain_timeout_ms = int(0, 3600000, 10000),
  }),
  pools = map(pool_schema),
  routes = array(record({
    path = str(nil, "^/", "a path starting with /"),
    host = str(nil, "^[%w%.%-*:%[%]]+$", "a host name"),
    pool = str(nil, "^[%w_%-]+$", "a pool name"),
    cache = record({
      ttl_s = int(1, 31536000, 60),
      methods = array(enum({ "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS" }), { default = { "GET", "HEAD" } }),
      statuses = array(custom(cacheable_status), { default = { 200 } }),
      key_headers = array(str(nil, "^[%w!#$%%&'*+.^_`|~-]+$", "a header name"), { default = {} }),
      authorization = bool(true),
      json = record({ canonical = bool(false), ignore = array(str(nil, nil, "a field name"), { default = {} }) }),
      stream = bool(false),
      coalesce = bool(true),
      coalesce_wait_ms = int(1, 3600000, 30000),
      policy = str(nil, policy_name, "a policy name"),
    }, false),
    -- policies/route/<policy>.lua: on_request / on_response hooks (docs/policies.md).
    hook = custom(function(v, path)
      if v == false then return false end -- the default: no hook
      if type(v) == "string" then v = { policy = v } end
      if type(v) ~= "table" then fail(path, "expected a policy name or { policy = ..., options = {...} }, got " .. describe(v)) end
      return check(hook_schema, v, path)
    end, false),
  }), { default = {} }),
})

-- Checker --------------------------------------------------------------------------------

local function default_of(spec)
  local d = spec.default
  if spec.kind == "record" and d == nil then return check(spec, {}, nil) end
  if type(d) == "table" and spec.kind ~= "custom" then
    local copy = {}
    for k, v in pairs(d) do copy[k] = v end
    return copy
  end
  if spec.kind == "custom" and d ~= nil then return spec.fn(d, "(default)") end
  return d
end

function check(spec, v, path)
  path = path or ""
  local k = spec.kind
  if v == nil then
    if k == "record" and spec.default == nil then v = {} else return default_of(spec) end
  end
  if v == false and k == "record" and (spec.default == false or spec.allow_false) then return false end
  if k == "integer" or k == "number" then
    if type(v) ~= "number" or (k == "integer" and v % 1 ~= 0) then
      fail(path, "expected " .. (k == "integer" and "an integer" or "a number") .. ", got " .. describe(v))
    end
    if (spec.min and v < spec.min) or (spec.max and v > spec.max) then
      fail(path, string.format("expected %s from %s to %s, got %s", k == "integer" and "an integer" or "a number",
        tostring(spec.min), tostring(spec.max), describe(v)))
    end
    return v
  elseif k == "string" then
    if type(v) ~= "string" or (spec.pattern and not v:match(spec.pattern)) then
      fail(path, "expected " .. (spec.what or "a string") .. ", got " .. describe(v))
    end
    return v
  elseif k == "boolean" then
    if type(v) ~= "boolean" then fail(path, "expected true or false, got " .. describe(v)) end
    return v
  elseif k == "enum" then
    for _, e in ipairs(spec.values) do if v == e then return v end end
    fail(path, "expected one of " .. table.concat(spec.values, ", ") .. ", got " .. describe(v))
  elseif k == "record" then
    if type(v) ~= "table" then fail(path, "expected a table, got " .. describe(v)) end
    local out = {}
    for key in pairs(v) do
      if not spec.fields[key] then
        local names = {}
        for name in pairs(spec.fields) do names[#names + 1] = name end
        table.sort(names)
        fail(join(path, tostring(key)), "unknown key (expected one of " .. table.concat(names, ", ") .. ")")
      end
    end
    for key, fspec in pairs(spec.fields) do out[key] = check(fspec, v[key], join(path, key)) end
    return out
  elseif k == "array" then
    if type(v) ~= "table" then fail(path, "expected a list, got " .. describe(v)) end
    local n = #v
    for key in pairs(v) do
      if type(key) ~= "number" or key % 1 ~= 0 or key < 1 or key > n then
        fail(join(path, tostring(key)), "unexpected key in a list")
      end
    end
    if spec.min and n < spec.min then fail(path, "expected at least " .. spec.min .. " item(s)") end
    local out = {}
    for i = 1, n do out[i] = check(spec.of, v[i], join(path, i)) end
    return out
  elseif k == "map" then
    if type(v) ~= "table" then fail(path, "expected a table of named entries, got " .. describe(v)) end
    local out = {}
    for key, item in pairs(v) do
      if type(key) ~= "string" or not key:match("^[%w_%-]+$") then
        fail(join(path, tostring(key)), "expected a name made of letters, digits, _ and -")
      end
      out[key] = check(spec.of, item, join(path, key))
    end
    return out
  elseif k == "any_table" then
    if type(v) ~= "table" then fail(path, "expected a table, got " .. describe(v)) end
    return v
  elseif k == "custom" then
    return spec.fn(v, path)
  end
  error("config schema: unknown kind " .. tostring(k))
end

-- Cross-references that a per-key check cannot see.
local function check_refs(cfg)
  for i, r in ipairs(cfg.routes) do
    local p = join("routes", i)
    if not r.path then fail(join(p, "path"), "expected a path starting with /, got nil") end
    if not r.pool then fail(join(p, "pool"), "expected a pool name, got nil") end
    if not cfg.pools[r.pool] then fail(join(p, "pool"), "no pool named " .. string.format("%q", r.pool)) end
    if r.hook and not r.hook.policy then fail(join(join(p, "hook"), "policy"), "expected a policy name, got nil") end
  end
  for name, pool in pairs(cfg.pools) do
    if pool.fallback then
      if not cfg.pools[pool.fallback] then
        fail("pools." .. name .. ".fallback", "no pool named " .. string.format("%q", pool.fallback))
      end
      if pool.fallback == name then fail("pools." .. name .. ".fallback", "a pool cannot be its own fallback") end
    end
  end
end

-- Returns the normalized config, or nil and { path = ..., msg = ... }.
function M.validate(cfg)
  local ok, res = pcall(function()
    if type(cfg) ~= "table" then fail("", "the config file must return a table, got " .. describe(cfg)) end
    local out = check(schema, cfg, "")
    check_refs(out)
    return out
  end)
  if ok then return res end
  if type(res) == "table" then return nil, res end
  return nil, { path = "", msg = tostring(res) }
end

M.parse_url = parse_url
return M
