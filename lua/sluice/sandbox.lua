-- The environment user policies run in: an allow-list of pure functions and libraries, a
-- read-only `sluice` module, and a `require` that only finds modules under the policies
-- directory and the runtime's lua/ directory. No os, io, ffi, load*, dofile, debug.
local M = {}

local SAFE = { "pairs", "ipairs", "next", "type", "tostring", "tonumber", "select", "error",
  "assert", "pcall", "xpcall", "unpack", "setmetatable", "getmetatable", "rawget", "rawset",
  "rawequal", "rawlen" }
local LIBS = { "string", "table", "math", "bit" }

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local function readonly(t, what)
  return setmetatable({}, {
    __index = t,
    __newindex = function() error(what .. " is read-only", 2) end,
    __metatable = false,
  })
end

-- ctx = { sluice = <module>, roots = { dir, ... }, loaded = {} } shared by one generation.
local function new_env(ctx)
  local env = {}
  for _, k in ipairs(SAFE) do env[k] = _G[k] end
  for _, k in ipairs(LIBS) do env[k] = copy(_G[k]) end
  env.sluice = ctx.sluice_ro
  env._G = env
  env.require = function(name)
    if name == "sluice" then return ctx.sluice_ro end
    if type(name) ~= "string" or not name:match("^[%w_]+[%w_%.]*$") then
      error("require: invalid module name " .. tostring(name), 2)
    end
    local cached = ctx.loaded[name]
    if cached ~= nil then return cached end
    local rel = name:gsub("%.", "/") .. ".lua"
    for _, root in ipairs(ctx.roots) do
      local path = root .. "/" .. rel
      local f = io.open(path, "rb")
      if f then
        f:close()
        local mod = M.run(path, ctx)
        ctx.loaded[name] = mod == nil and true or mod
        return ctx.loaded[name]
      end
    end
    error("require: module '" .. name .. "' not found under the policies or lua directories", 2)
  end
  return env
end

function M.context(sluice, roots)
  return { sluice_ro = readonly(sluice, "the sluice module"), roots = roots, loaded = {} }
end

-- Inside the gateway, sluice.vm decides whether a chunk may be compiled (src/policy.c:
-- sluice's own unmodified sources, or lua.jit on); elsewhere (busted) everything may.
local has_vm, vm = pcall(require, "sluice.vm")

-- Loads a file of user code as a chunk; errors carry "file:line: message".
function M.load(path)
  local f, oerr = io.open(path, "rb")
  if not f then error("cannot open " .. path .. ": " .. tostring(oerr), 0) end
  local src = f:read("*a")
  f:close()
  local chunk, err = loadstring(src, "@" .. path)
  if not chunk then error(err, 0) end
  if has_vm then vm.seal(chunk, src, path) end
  return chunk
end

-- Loads and runs a file in a fresh sandbox env.
function M.run(path, ctx)
  local chunk = M.load(path)
  setfenv(chunk, new_env(ctx))
  return chunk()
end

-- Loads policies/<kind>/<name>.lua and checks it has the hooks its kind requires.
local REQUIRED = { balancer = { "pick" }, retry = { "decide" }, breaker = { "record" } }

-- dirs: the config's policies directory, then the bundled one; the first that has the file wins.
function M.load_policy(dirs, kind, name, ctx)
  local path
  for _, dir in ipairs(dirs) do
    local p = dir .. "/" .. kind .. "/" .. name .. ".lua"
    local f = io.open(p, "rb")
    if f then f:close(); path = p; break end
  end
  if not path then
    error("policy file not found: " .. kind .. "/" .. name .. ".lua (looked in " .. table.concat(dirs, ", ") .. ")", 0)
  end
  local mod = M.run(path, ctx)
  if type(mod) ~= "table" then error(path .. ": a policy must return a table, got " .. type(mod), 0) end
  for _, hook in ipairs(REQUIRED[kind] or {}) do
    if type(mod[hook]) ~= "function" then
      error(path .. ": " .. kind .. " policy must define function " .. hook .. "(...)", 0)
    end
  end
  return mod
end

return M
