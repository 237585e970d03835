-- Glue the C runtime calls at generation build time (never on the request path).
local sffi = require("sluice.ffi")
local M = {}

-- Per-endpoint tables policies (breakers) keep state in, keyed by endpoint URL. This module
-- is loaded once per worker VM, so the tables outlive config generations.
local endpoint_state = {}

-- Builds the `pool` table handed to policies. Endpoints arrive as (light userdata, url) pairs
-- pointing at sl_ep_view_t structs owned by C; the table keeps typed read-only pointers.
function M.make_pool(name, options, retry, breaker, stats, ...)
  local eps, states, urls = {}, {}, {}
  for i = 1, select("#", ...) / 2 do
    local lud, url = select(2 * i - 1, ...)
    eps[i] = sffi.endpoint(lud)
    urls[i] = url
    local st = endpoint_state[url]
    if not st then st = {}; endpoint_state[url] = st end
    states[i] = st
  end
  return { name = name, n = #eps, endpoints = eps, urls = urls, ep_state = states, state = {},
           options = options or {}, retry = retry or nil, breaker = breaker or nil,
           stats = sffi.pool_stats(stats) }
end

-- Trampolines C calls with the hook function as first argument (no closure per pool).
function M.breaker_record(fn, pool, i, outcome, now)
  return fn(pool.endpoints[i], outcome, now, pool.ep_state[i], pool)
end

function M.retry_decide(fn, pool, req, attempt, outcome)
  return fn(req, attempt, outcome, pool)
end

M.json = require("sluice.json")

-- The request object policies see. Fields come from the request being decided on; reading
-- them after the hook returned gives nil. `edit` holds the C functions that record
-- on_request's changes (they raise when called from any other hook).
function M.make_req(field, header, edit)
  local json_seq, json_val -- req.json, decoded once per request
  local methods = {
    header = function(_, name) return header(name) end,
    set_header = function(_, name, value) edit.set_header(name, value) end,
    remove_header = function(_, name) edit.remove_header(name) end,
    set_path = function(_, path) edit.set_path(path) end,
  }
  return setmetatable({}, {
    __index = function(_, k)
      local m = methods[k]
      if m then return m end
      if k == "json" then
        local seq = field("seq")
        if seq == nil then return nil end
        if seq ~= json_seq then
          json_seq, json_val = seq, nil
          local body = field("json_body")
          if body then json_val = M.json.decode(body) end
        end
        return json_val
      end
      return field(k)
    end,
    __newindex = function() error("req is read-only (use req:set_header, req:set_path)", 2) end,
  })
end

-- The response object on_response sees: status and headers as the upstream sent them.
function M.make_res(field, header, edit)
  local methods = {
    header = function(_, name) return header(name) end,
    set_header = function(_, name, value) edit.set_header(name, value) end,
    remove_header = function(_, name) edit.remove_header(name) end,
  }
  return setmetatable({}, {
    __index = function(_, k) return methods[k] or field(k) end,
    __newindex = function() error("res is read-only (use res:set_header)", 2) end,
  })
end

-- Route hooks --------------------------------------------------------------------------

-- Headers a direct response may not set: the gateway writes them itself.
local MANAGED = { ["content-length"] = true, ["transfer-encoding"] = true, connection = true,
  ["keep-alive"] = true, ["x-request-id"] = true, upgrade = true, te = true, trailer = true }

local function header_block(policy, headers)
  if headers == nil then return "", nil end
  if type(headers) ~= "table" then
    error(policy .. ": on_request response headers must be a table, got " .. type(headers), 0)
  end
  local names, ctype = {}, nil
  for name in pairs(headers) do
    if type(name) ~= "string" or not name:match("^[%w!#$%%&'*+.^_`|~-]+$") then
      error(policy .. ": on_request response header name " .. tostring(name) .. " is not a valid token", 0)
    end
    names[#names + 1] = name
  end
  table.sort(names) -- deterministic output
  local out = {}
  for _, name in ipairs(names) do
    local v = headers[name]
    if type(v) == "number" then v = tostring(v) end
    if type(v) ~= "string" or v:find("[%z\r\n]") then
      error(policy .. ": on_request response header " .. name .. " needs a string value without CR, LF or NUL", 0)
    end
    local lower = name:lower()
    if MANAGED[lower] then
      error(policy .. ": on_request response header " .. name .. " is set by the gateway", 0)
    end
    if lower == "content-type" then ctype = v else out[#out + 1] = name .. ": " .. v .. "\r\n" end
  end
  return table.concat(out), ctype
end

-- Calls on_request and reduces what it returned to what C acts on:
--   nil                         go on with the route's pool
--   "pool", name                use pool `name`
--   "respond", status, content_type, header_lines, body
function M.route_request(fn, policy, options, req)
  local r = fn(req, options)
  local t = type(r)
  if r == nil then return nil end
  if t == "string" then return "pool", r end
  if t ~= "table" then
    error(policy .. ": on_request returned a " .. t .. ", expected nil, a pool name or { status = ... }", 0)
  end
  if r.pool ~= nil and r.status == nil then
    if type(r.pool) ~= "string" then error(policy .. ": on_request returned a pool that is not a name", 0) end
    return "pool", r.pool
  end
  local status = r.status
  if type(status) ~= "number" or status % 1 ~= 0 or status < 200 or status > 599 then
    error(policy .. ": on_request response status must be an integer from 200 to 599, got " .. tostring(status), 0)
  end
  local lines, ctype = header_block(policy, r.headers)
  local body = r.body
  if type(body) == "table" then
    local s, err = M.json.encode(body)
    if not s then error(policy .. ": on_request response body cannot be encoded as JSON: " .. err, 0) end
    body = s .. "\n"
    ctype = ctype or "application/json"
  elseif body == nil then
    body = ""
  elseif type(body) ~= "string" then
    error(policy .. ": on_request response body must be a string or a table, got " .. type(body), 0)
  end
  if (status == 204 or status == 304) and body ~= "" then
    error(policy .. ": on_request response status " .. status .. " cannot have a body", 0)
  end
  return "respond", status, ctype or "text/plain; charset=utf-8", lines, body
end

-- Runs a route policy's init(options, ctx) when it has one, at generation build time. ctx
-- offers what only makes sense then: the pool names and loading a data file (a Lua table,
-- path relative to the config's directory), evaluated with no globals and a budget.
function M.route_init(mod, options, pool_names, config_dir)
  if type(mod.on_request) ~= "function" and type(mod.on_response) ~= "function" then
    error("a route policy must define on_request(req, options) or on_response(req, res, options)", 0)
  end
  if mod.init == nil then return end
  local pools = {}
  for _, name in ipairs(pool_names) do pools[name] = true end
  local ctx = {
    pools = pools,
    load_table = function(path)
      if type(path) ~= "string" or path == "" then error("load_table: expected a file path", 2) end
      if path:sub(1, 1) ~= "/" then path = config_dir .. "/" .. path end
      local ok, chunk = pcall(require("sluice.sandbox").load, path)
      if not ok then error("load_table: " .. tostring(chunk), 2) end
      setfenv(chunk, {})
      local v
      ok, v = pcall(chunk)
      if not ok then error("load_table: " .. tostring(v), 2) end
      if type(v) ~= "table" then error("load_table: " .. path .. " must return a table, got " .. type(v), 2) end
      return v
    end,
  }
  mod.init(options, ctx)
end

return M
