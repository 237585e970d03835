-- policies/route/model_router.lua: init(options, ctx) checks options.models (model name or
-- "prefix*" = pool), options.default and options.list_path against the config's pools;
-- on_request(req) routes by req.json.model: an exact name first, then the longest matching
-- prefix; no model -> options.default (nil: the route's pool); an unknown model -> 404
-- model_not_found; a model that is not a string -> 400; GET <list_path> -> the model list.
package.path = "tests/spec/?.lua;" .. package.path
local h = require "helpers"

local POOLS = { "llama", "openai", "gpt4", "gpt4o", "llm", "mistral" }

local function ctx(pools) return h.route_ctx({ pools = pools or POOLS }) end

local function chat(json, extra)
  local spec = { method = "POST", path = "/v1/chat/completions", json = json, id = "req-42" }
  for k, v in pairs(extra or {}) do spec[k] = v end
  return h.make_req(spec)
end

describe("route/model_router", function()
  local M, fake

  -- init with ctx(); returns M for chaining.
  local function init(options, c)
    M.init(options, c or ctx())
    return M
  end

  -- init's error message for options (asserts that init raises).
  local function init_error(options, c)
    local ok, err = pcall(M.init, options, c or ctx())
    assert.is_false(ok, "init accepted the options")
    return err
  end

  before_each(function()
    M, fake = h.load_policy("route/model_router.lua")
  end)

  it("defines init and on_request, and no on_response", function()
    assert.is_function(M.init)
    assert.is_function(M.on_request)
    assert.is_nil(M.on_response)
  end)

  describe("init", function()
    it("requires options.models to be a non-empty table", function()
      local want = "model_router: options.models must be a table of model name = pool name"
      assert.equal(want, init_error({}))
      assert.equal(want, init_error({ models = {} }))
      assert.equal(want, init_error({ models = "llama" }))
    end)

    it("rejects a model that names an unknown pool", function()
      assert.equal('model_router: options.models["llama-3-8b"]: no pool named nope',
        init_error({ models = { ["llama-3-8b"] = "nope" } }))
    end)

    it("rejects a prefix entry that names an unknown pool", function()
      assert.equal('model_router: options.models["gpt-*"]: no pool named nope',
        init_error({ models = { ["gpt-*"] = "nope" } }))
    end)

    it("rejects a pool that is not a string", function()
      assert.equal('model_router: options.models["m"]: no pool named 3',
        init_error({ models = { m = 3 } }))
    end)

    it("rejects model keys that are not names (a list instead of a map, an empty name)", function()
      local want = "model_router: options.models: keys must be model names"
      assert.equal(want, init_error({ models = { "llama" } }))
      assert.equal(want, init_error({ models = { [""] = "llama" } }))
    end)

    it("checks pools against ctx.pools", function()
      assert.has_no_error(function() init({ models = { m = "only" } }, ctx({ "only" })) end)
      assert.equal('model_router: options.models["m"]: no pool named llama',
        init_error({ models = { m = "llama" } }, ctx({ "only" })))
    end)

    it("rejects a default that is not a known pool", function()
      assert.equal("model_router: options.default: no pool named nope",
        init_error({ models = { m = "llama" }, default = "nope" }))
      assert.equal("model_router: options.default: no pool named true",
        init_error({ models = { m = "llama" }, default = true }))
    end)

    it("rejects a list_path that is neither a string nor false", function()
      local want = "model_router: options.list_path must be a path or false"
      assert.equal(want, init_error({ models = { m = "llama" }, list_path = true }))
      assert.equal(want, init_error({ models = { m = "llama" }, list_path = 5 }))
      assert.equal(want, init_error({ models = { m = "llama" }, list_path = {} }))
    end)

    it("accepts a valid configuration and draws no randomness", function()
      assert.has_no_error(function()
        init({ models = { m = "llama", ["gpt-*"] = "openai" }, default = "llm", list_path = "/models" })
      end)
      assert.equal(0, fake.draws)
    end)

    it("forgets the previous configuration when it runs again (a reload)", function()
      init({ models = { old = "llama" } })
      assert.equal("llama", M.on_request(chat({ model = "old" })))
      init({ models = { new = "mistral" } })
      assert.equal("mistral", M.on_request(chat({ model = "new" })))
      assert.equal(404, M.on_request(chat({ model = "old" })).status)
    end)
  end)

  describe("routing by model", function()
    before_each(function()
      init({
        models = {
          ["llama-3-8b"] = "llama",
          ["gpt-*"] = "openai",
          ["gpt-4*"] = "gpt4",
          ["gpt-4o*"] = "gpt4o",
          ["gpt-4-turbo"] = "mistral", -- an exact name beats any prefix
          ["mistral-large"] = "mistral",
        },
      })
    end)

    it("routes an exact model name to its pool", function()
      assert.equal("llama", M.on_request(chat({ model = "llama-3-8b" })))
      assert.equal("mistral", M.on_request(chat({ model = "mistral-large" })))
    end)

    it("matches exact names exactly: no substring, case or suffix matches", function()
      for _, m in ipairs({ "llama-3-8b-instruct", "LLAMA-3-8B", "llama-3", " llama-3-8b" }) do
        local r = M.on_request(chat({ model = m }))
        assert.is_table(r, m)
        assert.equal(404, r.status, m)
      end
    end)

    it("routes by prefix, the longest matching prefix winning", function()
      assert.equal("openai", M.on_request(chat({ model = "gpt-3.5-turbo" })))
      assert.equal("gpt4", M.on_request(chat({ model = "gpt-4" })))
      assert.equal("gpt4", M.on_request(chat({ model = "gpt-4-0613" })))
      assert.equal("gpt4o", M.on_request(chat({ model = "gpt-4o" })))
      assert.equal("gpt4o", M.on_request(chat({ model = "gpt-4o-mini" })))
    end)

    it("a prefix matches the bare prefix itself", function()
      assert.equal("openai", M.on_request(chat({ model = "gpt-" })))
    end)

    it("prefers an exact name over a longer-matching prefix", function()
      assert.equal("mistral", M.on_request(chat({ model = "gpt-4-turbo" })))
      assert.equal("gpt4", M.on_request(chat({ model = "gpt-4-turbo-preview" })))
    end)

    it("does not depend on the order pairs() yields the models in", function()
      -- Same configuration, inserted in the other order.
      local models = {}
      local names = { "gpt-4o*", "gpt-4*", "gpt-*" }
      for i = #names, 1, -1 do models[names[i]] = ({ "gpt4o", "gpt4", "openai" })[i] end
      init({ models = models })
      assert.equal("gpt4o", M.on_request(chat({ model = "gpt-4o-mini" })))
      assert.equal("gpt4", M.on_request(chat({ model = "gpt-4-32k" })))
      assert.equal("openai", M.on_request(chat({ model = "gpt-3.5" })))
    end)

    it("treats a lone '*' as a catch-all prefix", function()
      init({ models = { ["*"] = "llm", exact = "llama" } })
      assert.equal("llama", M.on_request(chat({ model = "exact" })))
      assert.equal("llm", M.on_request(chat({ model = "anything" })))
      assert.equal("llm", M.on_request(chat({ model = "" })))
    end)

    it("treats '*' only at the end as a wildcard, and Lua pattern characters literally", function()
      init({ models = { ["a.b*"] = "llama", ["x*y"] = "mistral" } })
      assert.equal("llama", M.on_request(chat({ model = "a.b-1" })))
      assert.equal(404, M.on_request(chat({ model = "axb-1" })).status)
      assert.equal("mistral", M.on_request(chat({ model = "x*y" })))
      assert.equal(404, M.on_request(chat({ model = "x-y" })).status)
    end)

    it("makes no header or path edits and draws no randomness", function()
      local req = chat({ model = "gpt-4" })
      M.on_request(req)
      assert.same({}, req.edits)
      assert.equal(0, fake.draws)
    end)

    it("returns pool names the gateway turns into a pool choice", function()
      assert.same({ "pool", "gpt4o" }, { h.route_request(M, chat({ model = "gpt-4o" })) })
    end)
  end)

  describe("without a model", function()
    it("uses options.default when the body has no model", function()
      init({ models = { m = "llama" }, default = "llm" })
      assert.equal("llm", M.on_request(chat({ messages = {} })))
    end)

    it("uses options.default when there is no JSON body", function()
      init({ models = { m = "llama" }, default = "llm" })
      assert.equal("llm", M.on_request(chat(nil)))
      assert.equal("llm", M.on_request(h.make_req({ body = "model=m" }))) -- not JSON
      assert.equal("llm", M.on_request(h.make_req({ method = "GET", path = "/v1/other" })))
    end)

    it("uses options.default when the JSON body is not an object", function()
      init({ models = { m = "llama" }, default = "llm" })
      assert.equal("llm", M.on_request(h.make_req({ body = '["m"]' })))
      assert.equal("llm", M.on_request(h.make_req({ body = '"m"' })))
      assert.equal("llm", M.on_request(h.make_req({ body = "42" })))
    end)

    it("decodes a real JSON body the way the runtime does", function()
      init({ models = { m = "llama" }, default = "llm" })
      assert.equal("llama", M.on_request(h.make_req({ body = '{"model":"m","stream":true}' })))
    end)

    it("returns nil (the route's own pool) when there is no default", function()
      init({ models = { m = "llama" } })
      assert.is_nil(M.on_request(chat({ messages = {} })))
      assert.is_nil(M.on_request(chat(nil)))
      assert.is_nil(h.route_request(M, chat(nil)))
    end)
  end)

  describe("errors", function()
    before_each(function()
      init({ models = { ["llama-3-8b"] = "llama", ["gpt-*"] = "openai" }, default = "llm" })
    end)

    it("answers an unknown model 404 model_not_found with the request id", function()
      local r = M.on_request(chat({ model = "claude-3" }, { id = "abc123" }))
      assert.same({
        status = 404,
        body = { error = {
          type = "model_not_found",
          code = "model_not_found",
          message = "The model `claude-3` does not exist",
          request_id = "abc123",
        } },
      }, r)
    end)

    it("does not fall back to the default for an unknown model", function()
      assert.equal(404, M.on_request(chat({ model = "llama" })).status)
    end)

    it("answers a model that is not a string 400 invalid_request_error", function()
      for _, bad in ipairs({ 42, true, { "x" }, { name = "x" } }) do
        local r = M.on_request(chat({ model = bad }, { id = "id-7" }))
        assert.is_table(r, tostring(bad))
        assert.same({
          status = 400,
          body = { error = {
            type = "invalid_request_error",
            code = "invalid_request_error",
            message = '"model" must be a string',
            request_id = "id-7",
          } },
        }, r)
      end
    end)

    it("answers a JSON null model 400 (decoded by the runtime, not absent)", function()
      local r = M.on_request(h.make_req({ body = '{"model":null}' }))
      assert.equal(400, r.status)
      assert.equal("invalid_request_error", r.body.error.type)
    end)

    it("answers \"model\": false 400 like any other non-string model", function()
      local r = M.on_request(h.make_req({ body = '{"model":false}' }))
      assert.is_table(r)
      assert.equal(400, r.status)
    end)

    it("produces error responses the gateway encodes as JSON", function()
      local kind, status, ctype, lines, body = h.route_request(M, chat({ model = "nope" }, { id = "r1" }))
      assert.equal("respond", kind)
      assert.equal(404, status)
      assert.equal("application/json", ctype)
      assert.equal("", lines)
      local decoded = h.json.decode(body)
      assert.equal("model_not_found", decoded.error.code)
      assert.equal("r1", decoded.error.request_id)
    end)
  end)

  describe("the model list", function()
    local function list_req(path, method)
      return h.make_req({ method = method or "GET", path = path or "/v1/models", id = "list-1" })
    end

    before_each(function()
      init({
        models = { zeta = "llama", alpha = "openai", ["gpt-*"] = "openai", mid = "mistral" },
        default = "llm",
      })
    end)

    it("answers GET /v1/models by default with the exact names, sorted, no prefixes", function()
      assert.same({
        status = 200,
        body = { object = "list", data = {
          { id = "alpha", object = "model", owned_by = "sluice" },
          { id = "mid", object = "model", owned_by = "sluice" },
          { id = "zeta", object = "model", owned_by = "sluice" },
        } },
      }, M.on_request(list_req()))
    end)

    it("answers even when the GET carries a JSON body naming a model", function()
      local req = h.make_req({ method = "GET", path = "/v1/models", json = { model = "nope" } })
      assert.equal(200, M.on_request(req).status)
    end)

    it("encodes as an OpenAI list through the gateway", function()
      local kind, status, ctype, _, body = h.route_request(M, list_req())
      assert.same({ "respond", 200, "application/json" }, { kind, status, ctype })
      local decoded = h.json.decode(body)
      assert.equal("list", decoded.object)
      assert.equal(3, #decoded.data)
      assert.equal("alpha", decoded.data[1].id)
    end)

    it("only answers GET: a POST to the list path is routed like any request", function()
      assert.equal("llm", M.on_request(list_req(nil, "POST")))
      assert.equal("llama", M.on_request(h.make_req({ method = "POST", path = "/v1/models",
        json = { model = "zeta" } })))
      assert.equal("llm", M.on_request(list_req(nil, "HEAD")))
    end)

    it("only answers the exact path", function()
      assert.equal("llm", M.on_request(list_req("/v1/models/zeta")))
      assert.equal("llm", M.on_request(list_req("/v1/models/")))
      assert.equal("llm", M.on_request(list_req("/v2/models")))
    end)

    it("uses a configured list_path", function()
      init({ models = { a = "llama" }, default = "llm", list_path = "/models" })
      assert.equal(200, M.on_request(list_req("/models")).status)
      assert.equal("llm", M.on_request(list_req("/v1/models")))
    end)

    it("is off with list_path = false", function()
      init({ models = { a = "llama" }, default = "llm", list_path = false })
      assert.equal("llm", M.on_request(list_req()))
      init({ models = { a = "llama" }, list_path = false })
      assert.is_nil(M.on_request(list_req()))
    end)

    it("encodes an empty model list as \"data\": []", function()
      init({ models = { ["gpt-*"] = "openai" } })
      local _, status, _, _, body = h.route_request(M, list_req())
      assert.equal(200, status)
      assert.matches('"data":%[%]', body)
    end)
  end)
end)
