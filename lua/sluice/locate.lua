-- Finds the source line where a key path (e.g. {"pools", "stt", "retry", "attempts"}) is
-- written in a config file that returns a table constructor. Used only to make error
-- messages name a line; returns nil when the path cannot be found (computed configs).
local M = {}

local function tokens(src)
  local toks, i, line, n = {}, 1, 1, #src
  local function push(kind, value) toks[#toks + 1] = { kind = kind, value = value, line = line } end
  while i <= n do
    local c = src:sub(i, i)
    if c == "\n" then
      line = line + 1; i = i + 1
    elseif c:match("%s") then
      i = i + 1
    elseif src:sub(i, i + 1) == "--" then
      local eq = src:match("^%[(=*)%[", i + 2)
      if eq then
        local close = src:find("]" .. eq .. "]", i, true) or n
        for _ in src:sub(i, close):gmatch("\n") do line = line + 1 end
        i = close + #eq + 2
      else
        i = (src:find("\n", i, true) or n + 1)
      end
    elseif c == '"' or c == "'" then
      local j, buf = i + 1, {}
      while j <= n do
        local d = src:sub(j, j)
        if d == "\\" then buf[#buf + 1] = src:sub(j + 1, j + 1); j = j + 2
        elseif d == c then break
        else buf[#buf + 1] = d; j = j + 1 end
      end
      push("string", table.concat(buf)); i = j + 1
    elseif c == "[" and src:match("^%[=*%[", i) then
      local eq = src:match("^%[(=*)%[", i)
      local close = src:find("]" .. eq .. "]", i, true) or n
      local s = src:sub(i + #eq + 2, close - 1)
      push("string", s)
      for _ in s:gmatch("\n") do line = line + 1 end
      i = close + #eq + 2
    elseif c:match("[%a_]") then
      local w = src:match("^[%w_]+", i)
      push("name", w); i = i + #w
    elseif c:match("%d") then
      local w = src:match("^[%w%.]+", i)
      push("number", w); i = i + #w
    elseif src:sub(i, i + 1) == "==" or src:sub(i, i + 1) == "~=" or src:sub(i, i + 1) == ".." then
      push("op", src:sub(i, i + 1)); i = i + 2
    else
      push("op", c); i = i + 1
    end
  end
  return toks
end

-- Walks the table constructor after the last top-level `return`, recording the line of each
-- key path (joined with ".") and of each positional item ("[n]").
local function index(src)
  local toks = tokens(src)
  local start
  for k = #toks, 1, -1 do
    if toks[k].kind == "name" and toks[k].value == "return" then start = k; break end
  end
  local lines = {}
  if not start or not toks[start + 1] or toks[start + 1].value ~= "{" then return lines end
  local k = start + 1
  local function walk(prefix)
    -- toks[k] is "{"
    k = k + 1
    local pos = 0
    while toks[k] and toks[k].value ~= "}" do
      local key, line
      local t = toks[k]
      if t.kind == "name" and toks[k + 1] and toks[k + 1].value == "=" then
        key, line = t.value, t.line; k = k + 2
      elseif t.value == "[" and toks[k + 1] and toks[k + 2] and toks[k + 2].value == "]"
          and toks[k + 3] and toks[k + 3].value == "=" then
        key, line = tostring(toks[k + 1].value), t.line; k = k + 4
      else
        pos = pos + 1
        key, line = "[" .. pos .. "]", t.line
      end
      local path = prefix == "" and key or (key:sub(1, 1) == "[" and prefix .. key or prefix .. "." .. key)
      lines[path] = line
      -- skip the value expression, descending into nested constructors
      local depth = 0
      while toks[k] do
        local v = toks[k].value
        if v == "{" and toks[k].kind == "op" and depth == 0 then
          walk(path)
        elseif v == "(" or (v == "{" and toks[k].kind == "op") then
          depth = depth + 1; k = k + 1
        elseif v == ")" or (v == "}" and toks[k].kind == "op" and depth > 0) then
          depth = depth - 1; k = k + 1
        elseif depth == 0 and (v == "," or v == ";" or v == "}") and toks[k].kind == "op" then
          break
        else
          k = k + 1
        end
      end
      if toks[k] and (toks[k].value == "," or toks[k].value == ";") then k = k + 1 end
    end
    k = k + 1 -- past "}"
  end
  walk("")
  return lines
end

-- Returns the line of `path` (a string like "pools.stt.endpoints[2]") or of its nearest
-- written ancestor, or nil.
function M.line(src, path)
  local lines = index(src)
  while path and path ~= "" do
    if lines[path] then return lines[path] end
    local parent = path:match("^(.*)%[%d+%]$") or path:match("^(.*)%.[^%.]+$")
    path = parent
  end
  return nil
end

M._tokens = tokens
return M
