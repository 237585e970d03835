-- JSON for policies (sluice.json): lua-cjson, one instance with its own settings so nothing a
-- policy does changes another's view. Failures return nil, message instead of raising.
-- lua-cjson 2.1 (Debian's) encodes every empty table as {}; json.array(t) marks a table that
-- must be encoded as a JSON array even when it is empty.
local cjson = require("cjson").new()
cjson.decode_max_depth(64)
cjson.encode_max_depth(64)
cjson.decode_invalid_numbers(false)
cjson.encode_sparse_array(true)

local M = { null = cjson.null }

local arrays = setmetatable({}, { __mode = "k" }) -- tables marked by json.array
local PLACEHOLDER = "\1sluice:empty-array\1"
local PLACEHOLDER_JSON = '"\\u0001sluice:empty%-array\\u0001"'

function M.array(t)
  t = t or {}
  arrays[t] = true
  return t
end

-- A copy of v in which marked empty tables are the placeholder (v itself when none is).
local function substitute(v, depth)
  if type(v) ~= "table" or depth > 64 then return v end
  if arrays[v] and next(v) == nil then return PLACEHOLDER end
  local copy
  for k, x in pairs(v) do
    local y = substitute(x, depth + 1)
    if y ~= x then
      if not copy then
        copy = {}
        for k2, x2 in pairs(v) do copy[k2] = x2 end
      end
      copy[k] = y
    end
  end
  return copy or v
end

function M.decode(s)
  if type(s) ~= "string" then return nil, "expected a string, got " .. type(s) end
  local ok, v = pcall(cjson.decode, s)
  if ok then return v end
  return nil, tostring(v)
end

function M.encode(v)
  local marked = next(arrays) ~= nil
  local ok, s = pcall(cjson.encode, marked and substitute(v, 0) or v)
  if not ok then return nil, tostring(s) end
  if marked then s = s:gsub(PLACEHOLDER_JSON, "[]") end
  return s
end

return M
