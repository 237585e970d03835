-- Require an API key, and tell the upstream which tenant sent the request without telling it
-- the key.
--
--   hook = { policy = "api_keys", options = {
--     keys_file     = "keys.lua",     -- a Lua file returning { "key", ... } or { key = "label" };
--                                     -- relative to the config file; re-read on every reload
--     tenant_header = "x-tenant-id",  -- set to the first 32 hex digits of sha256(key)
--     forward_key   = false,          -- true: keep Authorization / X-API-Key for the upstream
--   } }
--
-- The key is read from "Authorization: Bearer <key>" or "X-API-Key: <key>". A request without
-- a known key is answered 401 with a JSON error and never reaches an upstream. Keys are held
-- by their digest, so the table is searched by sha256(presented key), never by the secret.
local M = {}

local by_digest, tenant_header, forward_key

local function digest(key) return sluice.sha256(key):sub(1, 32) end

function M.init(options, ctx)
  if type(options.keys_file) ~= "string" then
    error("api_keys: options.keys_file must name a Lua file returning the keys", 0)
  end
  local keys = ctx.load_table(options.keys_file)
  by_digest = {}
  local n = 0
  for k, v in pairs(keys) do
    local key = type(k) == "number" and v or k
    if type(key) ~= "string" or #key < 8 then
      error("api_keys: " .. options.keys_file .. ": keys must be strings of at least 8 characters", 0)
    end
    by_digest[digest(key)] = true
    n = n + 1
  end
  if n == 0 then error("api_keys: " .. options.keys_file .. " holds no keys", 0) end
  tenant_header = options.tenant_header or "x-tenant-id"
  if type(tenant_header) ~= "string" or not tenant_header:match("^[%w!#$%%&'*+.^_`|~-]+$") then
    error("api_keys: options.tenant_header must be a header name", 0)
  end
  forward_key = options.forward_key == true
end

local function presented_key(req)
  local auth = req:header("authorization")
  if auth then
    local scheme, token = auth:match("^(%S+)%s+(%S+)%s*$")
    if scheme and scheme:lower() == "bearer" then return token end
  end
  return req:header("x-api-key")
end

function M.on_request(req)
  local key = presented_key(req)
  local d = key and digest(key)
  if not d or not by_digest[d] then
    return {
      status = 401,
      headers = { ["WWW-Authenticate"] = 'Bearer realm="sluice"' },
      body = { error = {
        type = "invalid_api_key",
        code = "invalid_api_key",
        message = key and "The API key is not valid" or "An API key is required (Authorization: Bearer <key>)",
        request_id = req.id,
      } },
    }
  end
  req:set_header(tenant_header, d)
  if not forward_key then
    req:remove_header("authorization")
    req:remove_header("x-api-key")
  end
  return nil
end

return M
