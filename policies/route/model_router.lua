-- Route OpenAI-style requests to a pool by the body's "model" field.
--
--   hook = { policy = "model_router", options = {
--     models  = { ["llama-3-8b"] = "llama", ["gpt-*"] = "openai" }, -- exact name, or prefix*
--     default = "llm",          -- requests without a model (default: the route's pool)
--     list_path = "/v1/models", -- GET here answers the model list (false: off)
--   } }
--
-- A model that is not configured is answered 404 (type "model_not_found") without reaching an
-- upstream; a model that is not a string is answered 400.
local M = {}

local exact, prefixes, default, list_path, listing

local function fail(msg) error("model_router: " .. msg, 0) end

function M.init(options, ctx)
  exact, prefixes, listing = {}, {}, {}
  local models = options.models
  if type(models) ~= "table" or next(models) == nil then
    fail("options.models must be a table of model name = pool name")
  end
  for name, pool in pairs(models) do
    if type(name) ~= "string" or name == "" then fail("options.models: keys must be model names") end
    if type(pool) ~= "string" or not ctx.pools[pool] then
      fail("options.models[\"" .. name .. "\"]: no pool named " .. tostring(pool))
    end
    if name:sub(-1) == "*" then
      prefixes[#prefixes + 1] = { prefix = name:sub(1, -2), pool = pool }
    else
      exact[name] = pool
      listing[#listing + 1] = name
    end
  end
  -- Longest prefix first, so "gpt-4*" wins over "gpt-*".
  table.sort(prefixes, function(a, b)
    if #a.prefix ~= #b.prefix then return #a.prefix > #b.prefix end
    return a.prefix < b.prefix
  end)
  table.sort(listing)
  default = options.default
  if default ~= nil and (type(default) ~= "string" or not ctx.pools[default]) then
    fail("options.default: no pool named " .. tostring(default))
  end
  list_path = options.list_path
  if list_path == nil then list_path = "/v1/models" end
  if list_path ~= false and type(list_path) ~= "string" then
    fail("options.list_path must be a path or false")
  end
end

local function pool_for(model)
  local pool = exact[model]
  if pool then return pool end
  for _, p in ipairs(prefixes) do
    if model:sub(1, #p.prefix) == p.prefix then return p.pool end
  end
  return nil
end

local function error_response(status, kind, message, req)
  return {
    status = status,
    body = { error = { type = kind, code = kind, message = message, request_id = req.id } },
  }
end

local function model_list()
  local data = sluice.json.array() -- [] even when only prefixes are configured
  for i, name in ipairs(listing) do
    data[i] = { id = name, object = "model", owned_by = "sluice" }
  end
  return { status = 200, body = { object = "list", data = data } }
end

function M.on_request(req)
  if list_path and req.method == "GET" and req.path == list_path then return model_list() end
  local body, model = req.json, nil
  if type(body) == "table" then model = body.model end
  if model == nil then return default end
  if type(model) ~= "string" then
    return error_response(400, "invalid_request_error", "\"model\" must be a string", req)
  end
  local pool = pool_for(model)
  if not pool then
    return error_response(404, "model_not_found", "The model `" .. model .. "` does not exist", req)
  end
  return pool
end

return M
