-- policies/route/api_keys.lua: init(options, ctx) loads options.keys_file through
-- ctx.load_table (a list { "key", ... } or a map { key = "label" }; keys of at least 8
-- characters) and keeps only sha256(key):sub(1, 32) per key; on_request(req) takes the key
-- from "Authorization: Bearer <key>" (scheme case-insensitive) or "X-API-Key", answers 401
-- without a known key, else sets options.tenant_header (default x-tenant-id) to the key's
-- digest and removes Authorization and X-API-Key unless options.forward_key is true.
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local KEY_A = "sk-live-aaaaaaaaaaaa"
local KEY_B = "sk-live-bbbbbbbbbbbb"

local function tenant(key) return h.sha256(key):sub(1, 32) end

describe("spec helpers: sha256", function()
  -- FIPS 180-2 / NIST vectors, and lengths around the padding boundaries (checked against
  -- coreutils sha256sum).
  local VECTORS = {
    { "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
    { "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
    { "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
      "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
    { string.rep("a", 55), "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318" },
    { string.rep("a", 56), "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a" },
    { string.rep("a", 63), "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34" },
    { string.rep("a", 64), "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb" },
    { string.rep("x", 1000), "44f8354494a5ba03ba1792a8d3e9c534c47a9181980fde7a3f44b06ef2ae7c7f" },
  }

  for _, v in ipairs(VECTORS) do
    it("hashes a " .. #v[1] .. "-byte message", function()
      assert.equal(v[2], h.sha256(v[1]))
    end)
  end

  it("hashes all byte values, and is the fake sluice.sha256", function()
    local t = {}
    for i = 0, 255 do t[#t + 1] = string.char(i) end
    local fake = h.new_fake()
    assert.equal("40aff2e9d2d8922e47afd4648e6967497158785fbd1da870e7110266bf944880",
      fake.sluice.sha256(table.concat(t)))
    assert.has_error(function() fake.sluice.sha256(nil) end)
  end)
end)

describe("route/api_keys", function()
  local M, fake

  local function ctx(files, opts)
    opts = opts or {}
    opts.pools = opts.pools or { "llm" }
    opts.files = files or { ["keys.lua"] = { KEY_A, KEY_B } }
    return h.route_ctx(opts)
  end

  local function init(options, c)
    options = options or {}
    if options.keys_file == nil then options.keys_file = "keys.lua" end
    M.init(options, c or ctx())
    return M
  end

  local function init_error(options, c)
    local ok, err = pcall(M.init, options, c or ctx())
    assert.is_false(ok, "init accepted the options")
    return err
  end

  local function req(headers, extra)
    local spec = { headers = headers, id = "req-9" }
    for k, v in pairs(extra or {}) do spec[k] = v end
    return h.make_req(spec)
  end

  before_each(function()
    M, fake = h.load_policy("route/api_keys.lua")
  end)

  it("defines init and on_request, and no on_response", function()
    assert.is_function(M.init)
    assert.is_function(M.on_request)
    assert.is_nil(M.on_response)
  end)

  describe("init", function()
    it("loads options.keys_file through ctx.load_table", function()
      local c = ctx()
      init({ keys_file = "keys.lua" }, c)
      assert.same({ "keys.lua" }, c.loaded)
      assert.is_nil(M.on_request(req({ authorization = "Bearer " .. KEY_A })))
      assert.is_nil(M.on_request(req({ authorization = "Bearer " .. KEY_B })))
    end)

    it("accepts the map form { key = label }", function()
      init({}, ctx({ ["keys.lua"] = { [KEY_A] = "team-a", [KEY_B] = "team-b" } }))
      assert.is_nil(M.on_request(req({ ["x-api-key"] = KEY_A })))
      assert.is_nil(M.on_request(req({ ["x-api-key"] = KEY_B })))
      -- The labels are not keys.
      assert.equal(401, M.on_request(req({ ["x-api-key"] = "team-a" })).status)
    end)

    it("accepts a mix of list and map entries", function()
      init({}, ctx({ ["keys.lua"] = "return { '" .. KEY_A .. "', ['" .. KEY_B .. "'] = 'b' }" }))
      assert.is_nil(M.on_request(req({ ["x-api-key"] = KEY_A })))
      assert.is_nil(M.on_request(req({ ["x-api-key"] = KEY_B })))
    end)

    it("accepts a key of exactly 8 characters and rejects 7", function()
      assert.has_no_error(function() init({}, ctx({ ["keys.lua"] = { "12345678" } })) end)
      assert.equal("api_keys: keys.lua: keys must be strings of at least 8 characters",
        init_error({ keys_file = "keys.lua" }, ctx({ ["keys.lua"] = { KEY_A, "1234567" } })))
    end)

    it("rejects short keys in the map form and non-string keys", function()
      local want = "api_keys: keys.lua: keys must be strings of at least 8 characters"
      assert.equal(want, init_error({ keys_file = "keys.lua" }, ctx({ ["keys.lua"] = { short = "label" } })))
      assert.equal(want, init_error({ keys_file = "keys.lua" }, ctx({ ["keys.lua"] = { 12345678901 } })))
      assert.equal(want, init_error({ keys_file = "keys.lua" }, ctx({ ["keys.lua"] = { { KEY_A } } })))
    end)

    it("rejects a file with no keys", function()
      assert.equal("api_keys: keys.lua holds no keys",
        init_error({ keys_file = "keys.lua" }, ctx({ ["keys.lua"] = {} })))
      assert.equal("api_keys: empty.lua holds no keys",
        init_error({ keys_file = "empty.lua" }, ctx({ ["empty.lua"] = "return {}" })))
    end)

    it("requires options.keys_file", function()
      local want = "api_keys: options.keys_file must name a Lua file returning the keys"
      assert.equal(want, init_error({}))
      assert.equal(want, init_error({ keys_file = 5 }))
    end)

    it("passes load_table's errors on (missing file, not a table)", function()
      -- load_table raises at level 2, like the runtime's, so the message names the policy line.
      local err = init_error({ keys_file = "/nonexistent/keys.lua" })
      assert.matches("load_table: cannot open /nonexistent/keys.lua", err, 1, true)
      err = init_error({ keys_file = "k.lua" }, ctx({ ["k.lua"] = "return 'sk-live-aaaaaaaa'" }))
      assert.matches("must return a table, got string", err, 1, true)
    end)

    it("rejects a tenant_header that is not a string", function()
      assert.equal("api_keys: options.tenant_header must be a header name",
        init_error({ keys_file = "keys.lua", tenant_header = 42 }))
    end)

    it("keeps only digests: the keys file's secrets are not retained in clear", function()
      -- The module's upvalues hold digests; search everything reachable from on_request.
      init()
      local seen = {}
      local function walk(v)
        if type(v) == "string" then
          assert.is_nil(v:find(KEY_A, 1, true), "found a raw key")
        elseif (type(v) == "table" or type(v) == "function") and not seen[v] then
          seen[v] = true
          if type(v) == "table" then
            for k, x in pairs(v) do walk(k); walk(x) end
          else
            local i = 1
            while true do
              local name, x = debug.getupvalue(v, i)
              if not name then break end
              if x ~= fake.sluice and x ~= _G then walk(x) end
              i = i + 1
            end
          end
        end
      end
      walk(M.on_request)
    end)

    it("replaces the previous keys on a reload", function()
      init()
      init({}, ctx({ ["keys.lua"] = { "sk-new-key-123" } }))
      assert.equal(401, M.on_request(req({ ["x-api-key"] = KEY_A })).status)
      assert.is_nil(M.on_request(req({ ["x-api-key"] = "sk-new-key-123" })))
    end)

    it("reads a real keys file relative to the config directory (runtime route_init)", function()
      local path = os.tmpname()
      local f = assert(io.open(path, "w"))
      f:write("return { '" .. KEY_A .. "' }\n")
      f:close()
      local dir, base = path:match("^(.*)/([^/]+)$")
      local ok, err = pcall(h.runtime().route_init, M, { keys_file = base }, { "llm" }, dir)
      os.remove(path)
      assert.is_true(ok, tostring(err))
      assert.is_nil(M.on_request(req({ ["x-api-key"] = KEY_A })))
    end)
  end)

  describe("rejecting", function()
    before_each(function() init() end)

    local function assert_401(r, message)
      assert.same({
        status = 401,
        headers = { ["WWW-Authenticate"] = 'Bearer realm="sluice"' },
        body = { error = { type = "invalid_api_key", code = "invalid_api_key", message = message,
                           request_id = "req-9" } },
      }, r)
    end

    local REQUIRED = "An API key is required (Authorization: Bearer <key>)"
    local INVALID = "The API key is not valid"

    it("answers 401 without a key", function()
      assert_401(M.on_request(req({})), REQUIRED)
    end)

    it("answers 401 with a wrong key, by either header", function()
      assert_401(M.on_request(req({ authorization = "Bearer sk-live-wrongwrong" })), INVALID)
      assert_401(M.on_request(req({ ["x-api-key"] = "sk-live-wrongwrong" })), INVALID)
    end)

    it("answers 401 for a key that differs only in case, a prefix or a suffix", function()
      for _, k in ipairs({ KEY_A:upper(), KEY_A:sub(1, -2), KEY_A .. "x", " " .. KEY_A }) do
        local r = M.on_request(req({ ["x-api-key"] = k }))
        assert.is_table(r, k)
        assert.equal(401, r.status, k)
      end
    end)

    it("answers 401 for an empty X-API-Key", function()
      assert_401(M.on_request(req({ ["x-api-key"] = "" })), INVALID)
    end)

    it("does not take a key from a non-Bearer scheme", function()
      assert_401(M.on_request(req({ authorization = "Basic " .. KEY_A })), REQUIRED)
      assert_401(M.on_request(req({ authorization = "Token " .. KEY_A })), REQUIRED)
      assert_401(M.on_request(req({ authorization = KEY_A })), REQUIRED)
    end)

    it("does not take a key from a malformed Bearer header", function()
      assert_401(M.on_request(req({ authorization = "Bearer" })), REQUIRED)
      assert_401(M.on_request(req({ authorization = "Bearer " })), REQUIRED)
      assert_401(M.on_request(req({ authorization = "Bearer " .. KEY_A .. " extra" })), REQUIRED)
      assert_401(M.on_request(req({ authorization = "Bearer" .. KEY_A })), REQUIRED)
    end)

    it("prefers a Bearer key over X-API-Key: a wrong Bearer key is not rescued", function()
      assert_401(M.on_request(req({ authorization = "Bearer sk-live-wrongwrong", ["x-api-key"] = KEY_A })),
        INVALID)
    end)

    it("makes no edits when rejecting (no tenant header, headers left alone)", function()
      local r = req({ authorization = "Bearer sk-live-wrongwrong", ["x-tenant-id"] = "spoof" })
      M.on_request(r)
      assert.same({}, r.edits)
    end)

    it("produces a 401 the gateway accepts: JSON body and a WWW-Authenticate line", function()
      local kind, status, ctype, lines, body = h.route_request(M, req({}))
      assert.equal("respond", kind)
      assert.equal(401, status)
      assert.equal("application/json", ctype)
      assert.equal('WWW-Authenticate: Bearer realm="sluice"\r\n', lines)
      local decoded = h.json.decode(body)
      assert.equal("invalid_api_key", decoded.error.type)
      assert.equal("req-9", decoded.error.request_id)
    end)

    it("never includes the presented key in the response", function()
      local _, _, _, lines, body = h.route_request(M, req({ ["x-api-key"] = "sk-live-secretsecret" }))
      assert.is_nil((lines .. body):find("secretsecret", 1, true))
    end)
  end)

  describe("accepting", function()
    before_each(function() init() end)

    it("accepts Authorization: Bearer <key> and goes on with the route's pool", function()
      assert.is_nil(M.on_request(req({ Authorization = "Bearer " .. KEY_A })))
      assert.is_nil(h.route_request(M, req({ Authorization = "Bearer " .. KEY_A })))
    end)

    it("matches the Bearer scheme case-insensitively", function()
      for _, scheme in ipairs({ "bearer", "BEARER", "BeArEr" }) do
        assert.is_nil(M.on_request(req({ authorization = scheme .. " " .. KEY_A })), scheme)
      end
    end)

    it("tolerates extra whitespace around the token", function()
      assert.is_nil(M.on_request(req({ authorization = "Bearer   " .. KEY_A })))
      assert.is_nil(M.on_request(req({ authorization = "Bearer\t" .. KEY_A .. "  " })))
    end)

    it("accepts X-API-Key: <key>, in any header-name case", function()
      assert.is_nil(M.on_request(req({ ["X-API-Key"] = KEY_B })))
      assert.is_nil(M.on_request(req({ ["x-api-key"] = KEY_B })))
    end)

    it("falls back to X-API-Key when Authorization is not Bearer", function()
      assert.is_nil(M.on_request(req({ authorization = "Basic Zm9vOmJhcg==", ["x-api-key"] = KEY_A })))
    end)

    it("sets x-tenant-id to the first 32 hex digits of sha256(key)", function()
      local r = req({ authorization = "Bearer " .. KEY_A })
      M.on_request(r)
      assert.equal(tenant(KEY_A), h.final_headers(r)["x-tenant-id"])
      assert.matches("^%x+$", tenant(KEY_A))
      assert.equal(32, #tenant(KEY_A))
      assert.equal(tenant(KEY_A), fake.sluice.sha256(KEY_A):sub(1, 32))
    end)

    it("gives each key its own tenant id, the same one whichever header carried it", function()
      local ra, rb = req({ authorization = "Bearer " .. KEY_A }), req({ ["x-api-key"] = KEY_B })
      local ra2 = req({ ["x-api-key"] = KEY_A })
      M.on_request(ra)
      M.on_request(rb)
      M.on_request(ra2)
      local ta, tb = h.final_headers(ra)["x-tenant-id"], h.final_headers(rb)["x-tenant-id"]
      assert.are_not.equal(ta, tb)
      assert.equal(ta, h.final_headers(ra2)["x-tenant-id"])
      assert.equal(tenant(KEY_B), tb)
    end)

    it("overwrites a tenant header the client sent", function()
      local r = req({ ["x-api-key"] = KEY_A, ["X-Tenant-Id"] = "someone-else" })
      M.on_request(r)
      assert.equal(tenant(KEY_A), h.final_headers(r)["x-tenant-id"])
    end)

    it("removes Authorization and X-API-Key by default", function()
      local r = req({ authorization = "Bearer " .. KEY_A, ["x-api-key"] = KEY_B, accept = "*/*" })
      M.on_request(r)
      assert.same({
        { op = "set_header", name = "x-tenant-id", value = tenant(KEY_A) },
        { op = "remove_header", name = "authorization" },
        { op = "remove_header", name = "x-api-key" },
      }, r.edits)
      assert.same({ accept = "*/*", ["x-tenant-id"] = tenant(KEY_A) }, h.final_headers(r))
    end)

    it("removes Authorization even when the key came in X-API-Key", function()
      local r = req({ authorization = "Basic Zm9vOmJhcg==", ["x-api-key"] = KEY_A })
      M.on_request(r)
      local final = h.final_headers(r)
      assert.is_nil(final.authorization)
      assert.is_nil(final["x-api-key"])
    end)

    it("keeps the key headers with forward_key = true", function()
      init({ forward_key = true })
      local r = req({ authorization = "Bearer " .. KEY_A, ["x-api-key"] = KEY_B })
      M.on_request(r)
      assert.same({ { op = "set_header", name = "x-tenant-id", value = tenant(KEY_A) } }, r.edits)
      local final = h.final_headers(r)
      assert.equal("Bearer " .. KEY_A, final.authorization)
      assert.equal(KEY_B, final["x-api-key"])
    end)

    it("only forwards on forward_key == true, not on other truthy values", function()
      init({ forward_key = "yes" })
      local r = req({ authorization = "Bearer " .. KEY_A })
      M.on_request(r)
      assert.is_nil(h.final_headers(r).authorization)
    end)

    it("uses a custom tenant_header", function()
      init({ tenant_header = "X-Org" })
      local r = req({ ["x-api-key"] = KEY_A })
      M.on_request(r)
      assert.equal("X-Org", r.edits[1].name)
      local final = h.final_headers(r)
      assert.equal(tenant(KEY_A), final["x-org"])
      assert.is_nil(final["x-tenant-id"])
    end)

    it("draws no randomness and does not touch the path", function()
      local r = req({ ["x-api-key"] = KEY_A })
      M.on_request(r)
      assert.equal(0, fake.draws)
      for _, e in ipairs(r.edits) do assert.are_not.equal("set_path", e.op) end
    end)
  end)
end)
