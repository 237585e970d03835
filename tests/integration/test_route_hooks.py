"""Route hooks (routes[i].hook, policies/route/<name>.lua): the bundled model_router, canary
and api_keys policies; on_request header and path edits, pool choice and direct responses
as the upstream and the client see them; on_response header edits; hook failures (500
policy_error, the log line, the error counter, the process and the connection carrying on);
req.json and json_max_bytes; the cache key of hooked routes; request metrics labelled by the
chosen pool; `sluice --check` and hot reload of hook policies."""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

GEN_RE = re.compile(r"reload: generation (\d+) active")
RELOAD_FAILED_RE = re.compile(r"reload failed, generation \d+ keeps running: (.*)")

# A test route policy; what it does is chosen by the request's x-op / x-res-op headers. Lines
# tagged "-- @name" are found by line_of() so the log assertions can name file:line.
EDITS_POLICY = r'''-- A test route policy: what it does is chosen by the request's x-op / x-res-op headers.
local M = {}

local label
local res_seq = 0

function M.init(options, ctx)
  if options.fail_init then error("edits: init refused", 0) end
  label = options.label or "none"
end

local function fields(req)
  return {
    method = req.method, path = req.path, query = req.query, url = req.url, host = req.host,
    id = req.id, client = req.client, body = req.body, body_length = req.body_length,
    probe = req:header("x-probe"), json_type = type(req.json), label = label,
    model = type(req.json) == "table" and req.json.model or nil,
  }
end

function M.on_request(req, options)
  local op = req:header("x-op") or ""
  if op == "error" then error("deliberate failure") end -- @error
  if op == "badpool" then return "no_such_pool" end
  if op == "badret" then return 42 end
  if op == "badstatus" then return { status = tonumber(req:header("x-status")) } end
  if op == "loop" then while true do end end -- @loop
  if op == "managed" then req:set_header(req:header("x-name"), "1") end -- @managed
  if op == "managed_remove" then req:remove_header(req:header("x-name")) end -- @managed_remove
  if op == "crlf" then req:set_header("X-Evil", "a\r\nInjected: 1") end -- @crlf
  if op == "lf" then req:set_header("X-Evil", "a\nInjected: 1") end -- @lf
  if op == "nul" then req:set_header("X-Evil", "a\0b") end -- @nul
  if op == "badname" then req:set_header("Bad Name", "x") end -- @badname
  if op == "badpath" then req:set_path("/echo/a b") end -- @badpath
  if op == "crlfpath" then req:set_path("/echo/a\r\nX-Injected: 1") end -- @crlfpath
  if op == "readonly" then req.path = "/x" end -- @readonly
  if op == "set_then_error" then
    req:set_header("X-Leak", "1")
    req:set_path("/echo/leak")
    error("failure after edits") -- @set_then_error
  end
  if op == "set_then_direct" then
    req:set_header("X-Leak", "1")
    return { status = 200, body = "direct after edits" }
  end
  if op == "fields" then return { status = 200, body = fields(req) } end
  if op == "missing" then return { status = 200, body = tostring(req:header("x-not-sent")) } end
  if op == "direct" then
    return { status = 418, headers = { ["X-Direct"] = "yes", ["Cache-Control"] = "no-store" },
             body = { ok = true, n = 3, nested = { "x", "y" } } }
  end
  if op == "direct_text" then
    return { status = 503, headers = { ["Content-Type"] = "text/csv", ["Retry-After"] = 7 },
             body = "a,b\n1,2\n" }
  end
  if op == "direct_plain" then return { status = 200, body = "plain" } end
  if op == "direct_204_body" then return { status = 204, body = "abc" } end
  if op == "direct_managed" then
    return { status = 200, headers = { ["Content-Length"] = "3" }, body = "abc" }
  end
  if op == "direct_crlf" then
    return { status = 200, headers = { ["X-A"] = "a\r\nX-B: b" }, body = "abc" }
  end
  if op == "pooltable" then return { pool = req:header("x-pool") } end
  -- edits of the upstream request
  local v = req:header("x-set")
  if v then req:set_header("X-Replace", v) end
  if req:header("x-remove") then req:remove_header("x-drop") end
  local p = req:header("x-path")
  if p then req:set_path(p) end
  -- reads keep returning what the client sent
  if v or p then req:set_header("X-Seen", (req:header("x-replace") or "nil") .. " " .. req.url) end
  if req:header("x-set-twice") then
    req:set_header("X-Twice", "first")
    req:set_header("x-twice", "second")
  end
  return req:header("x-pool")
end

function M.on_response(req, res, options)
  local op = req:header("x-res-op")
  if op == nil then return end
  if op == "set" then
    res:set_header("X-Res", "status " .. res.status .. " from " .. tostring(res:header("x-mock-instance")))
  end
  if op == "remove" then res:remove_header("x-mock-instance") end
  if op == "ctype" then res:set_header("Content-Type", "text/x-replaced") end
  if op == "remove_cookie" then res:remove_header("set-cookie") end
  if op == "set_cookie" then res:set_header("Set-Cookie", "c=3") end
  if op == "pool" then res:set_header("X-Served-By", tostring(req.pool)) end
  if op == "missing" then res:set_header("X-Missing", tostring(res:header("x-not-sent"))) end
  if op == "seq" then
    res_seq = res_seq + 1
    res:set_header("X-Res-Seq", tostring(res_seq))
  end
  if op == "error" then error("deliberate on_response failure") end -- @res_error
  if op == "req_edit" then req:set_header("X-Late", "1") end -- @res_req_edit
  if op == "managed" then res:set_header("Content-Length", "1") end -- @res_managed
  if op == "crlf" then res:set_header("X-Res", "a\r\nX-Injected: 1") end -- @res_crlf
end

return M
'''

KEYS = ("sk-test-alpha-0001", "sk-test-beta-0002")
KEYS_FILE = 'return { "%s", ["%s"] = "beta" }\n' % KEYS


def line_of(text, marker):
    for i, line in enumerate(text.splitlines(), 1):
        if marker in line:
            return i
    raise AssertionError("%r not in the policy" % marker)


def tenant(key):
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def binomial_bounds(n, p, tail=1e-9):
    """The smallest lo and largest hi with P(X < lo) <= tail and P(X > hi) <= tail for
    X ~ Binomial(n, p): exact, from the log pmf."""
    def logpmf(k):
        return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                + k * math.log(p) + (n - k) * math.log(1 - p))
    pmf = [math.exp(logpmf(k)) for k in range(n + 1)]
    lo, acc = 0, 0.0
    while acc + pmf[lo] <= tail:
        acc += pmf[lo]
        lo += 1
    hi, acc = n, 0.0
    while acc + pmf[hi] <= tail:
        acc += pmf[hi]
        hi -= 1
    return lo, hi


class Metrics:
    """One /metrics answer; val() is the sample whose labels are exactly the given ones (0
    when the series does not exist: hook-chosen series are created on first use)."""

    SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")

    def __init__(self, text):
        self.samples = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = self.SAMPLE.match(line)
            if not m:
                raise AssertionError("malformed sample line %r" % line)
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            self.samples[(m.group(1), labels)] = float(m.group(3))

    def has(self, name, **labels):
        return (name, frozenset(labels.items())) in self.samples

    def val(self, name, **labels):
        return self.samples.get((name, frozenset(labels.items())), 0.0)


class HookCase(h.SluiceTestCase):
    """Helpers shared by the classes below; subclasses set cls.s, cls.port, cls.admin."""

    @classmethod
    def boot(cls, cfg, files=None):
        """Starts sluice with cfg after writing files ({name: text}) next to its config."""
        s = cls.env.sluice(cfg, start=False)
        for name, text in (files or {}).items():
            with open(os.path.join(s.dir, name), "w") as f:
                f.write(text)
        s.start()
        return s, s.port, s.admin_port()

    def req(self, method, path, headers=None, body=None, port=None):
        with h.RawConn(port or self.port, timeout=10) as c:
            return c.request(method, path, headers, body)

    def echo(self, r):
        """The /echo JSON of a proxied response: what the upstream received."""
        self.assertEqual(r.status, 200, r)
        return json.loads(r.body)

    def scrape(self):
        status, _, body = h.http_request(self.admin, "GET", "/metrics")
        self.assertEqual(status, 200)
        return Metrics(body.decode())

    def reload(self):
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        return status, body.decode()


# ---------------------------------------------------------------------------------------
# One gateway with every kind of hooked route


class RouteHooksTest(HookCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a, cls.b, cls.c, cls.k = env.mock("a"), env.mock("b"), env.mock("c"), env.mock("k")

        def cookies(up, conn, n, req):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\n"
                         b"X-Up: u\r\nSet-Cookie: b=2\r\n\r\nok")
            return True

        cls.scr = env.scripted(cookies)
        env.write("policies/route/edits.lua", EDITS_POLICY)
        cls.dead_port = h.free_port()
        pools = {
            "a": h.make_pool([cls.a]),
            "b": h.make_pool([cls.b]),
            "c": h.make_pool([cls.c]),
            "k": h.make_pool([cls.k]),
            "scr": h.make_pool([cls.scr.url]),
            "pfx": h.make_pool([cls.a.url + "/echo/prefix"]),
            # nothing listens: every attempt fails (502)
            "down": h.make_pool(["http://127.0.0.1:%d" % h.free_port()]),
            # nothing listens, ejected after one failure; then its fallback serves
            "dead": h.make_pool(["http://127.0.0.1:%d" % cls.dead_port],
                                breaker={"failures": 1, "open_ms": 600000}, fallback="b"),
        }
        llm_models = {"llama-3-8b": "a", "mistral-7b": "b", "gpt-*": "b", "gpt-4*": "c"}
        routes = [
            {"path": "/echo/llm", "pool": "a", "hook": {
                "policy": "model_router",
                "options": {"models": llm_models, "default": "c", "list_path": "/echo/llm/models"},
                "json_max_bytes": 200}},
            {"path": "/v1", "pool": "a", "hook": {
                "policy": "model_router", "options": {"models": {"llama-3-8b": "b", "qwen-*": "c"}}}},
            {"path": "/echo/canary", "pool": "a", "hook": {
                "policy": "canary", "options": {"split": {"a": 80, "b": 20}, "tag": "x-variant"}}},
            {"path": "/echo/sticky", "pool": "a", "hook": {
                "policy": "canary",
                "options": {"split": {"a": 1, "b": 1}, "sticky": "x-user-id", "tag": "x-variant"}}},
            {"path": "/echo/keys", "pool": "k", "hook": {
                "policy": "api_keys", "options": {"keys_file": "keys.lua"}}},
            {"path": "/echo/keysfwd", "pool": "k", "hook": {
                "policy": "api_keys",
                "options": {"keys_file": "keys.lua", "tenant_header": "x-org", "forward_key": True}}},
            {"path": "/echo/edit", "pool": "a", "hook": {"policy": "edits", "options": {"label": "big"}}},
            {"path": "/echo/small", "pool": "a",
             "hook": {"policy": "edits", "options": {"label": "small"}, "json_max_bytes": 100}},
            {"path": "/echo/short", "pool": "a", "hook": "edits"},
            {"path": "/echo/cached", "pool": "a", "hook": "edits", "cache": {"ttl_s": 600}},
            {"path": "/echo", "pool": "a"},
        ]
        # policies: the test's own directory first; model_router, canary, api_keys and the
        # balancer come from the bundled one
        cfg = h.make_config(pools, routes, policies=env.path("policies"), watch=False)
        cls.s, cls.port, cls.admin = cls.boot(cfg, {"keys.lua": KEYS_FILE})

    def setUp(self):
        self.mark = self.s.log_mark()

    def count(self, mock):
        return mock.stats()["requests"]

    def chat(self, path, body, headers=None):
        hs = {"Content-Type": "application/json"}
        hs.update(headers or {})
        if not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        return self.req("POST", path, hs, body)

    # --- model_router ---------------------------------------------------------------------

    def test_model_router_exact_prefix_and_default(self):
        cases = [
            ({"model": "llama-3-8b", "messages": []}, "a"),   # exact
            ({"model": "mistral-7b"}, "b"),                   # exact
            ({"model": "gpt-3.5-turbo"}, "b"),                # "gpt-*"
            ({"model": "gpt-4o-mini"}, "c"),                  # the longest prefix, "gpt-4*"
            ({"model": "gpt-4"}, "c"),
            ({"messages": [{"role": "user", "content": "hi"}]}, "c"),  # no model: default
            ([1, 2, 3], "c"),                                 # not an object: default
        ]
        for body, want in cases:
            r = self.chat("/echo/llm", body)
            e = self.echo(r)
            self.assertEqual((e["instance"], r.header("x-mock-instance")), (want, want), body)
            self.assertEqual(e["url"], "/echo/llm")  # the path is not touched
            self.assertEqual(e["body_length"], len(json.dumps(body)))

    def test_model_router_no_default_uses_route_pool(self):
        r = self.chat("/v1/chat/completions", {"messages": []})
        self.assertEqual((r.status, r.header("x-mock-instance")), (200, "a"), r)
        r = self.chat("/v1/chat/completions", {"model": "llama-3-8b", "messages": []})
        self.assertEqual((r.status, r.header("x-mock-instance")), (200, "b"), r)
        self.assertEqual(json.loads(r.body)["model"], "llama-3-8b")  # the mock saw the body
        r = self.chat("/v1/chat/completions", {"model": "qwen-2", "messages": []})
        self.assertEqual((r.status, r.header("x-mock-instance")), (200, "c"), r)

    def test_model_router_body_without_json_content_type(self):
        # curl -d: form content type, body starting with {
        r = self.req("POST", "/echo/llm", {"Content-Type": "application/x-www-form-urlencoded"},
                     '{"model":"mistral-7b"}')
        self.assertEqual(self.echo(r)["instance"], "b")
        r = self.req("POST", "/echo/llm", None, '  {"model":"mistral-7b"}')
        self.assertEqual(self.echo(r)["instance"], "b")
        r = self.req("POST", "/echo/llm", {"Content-Type": "application/vnd.openai+json; charset=utf-8"},
                     '{"model":"mistral-7b"}')
        self.assertEqual(self.echo(r)["instance"], "b")
        # text/plain is not JSON: no model, the default pool
        r = self.req("POST", "/echo/llm", {"Content-Type": "text/plain"}, '{"model":"mistral-7b"}')
        self.assertEqual(self.echo(r)["instance"], "c")
        # invalid JSON: req.json is nil, the default pool
        r = self.chat("/echo/llm", '{"model":"mistral-7b"')
        self.assertEqual(self.echo(r)["instance"], "c")

    def test_model_router_chunked_and_expect_continue_bodies(self):
        body = b'{"model":"mistral-7b"}'
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/echo/llm", {"Content-Type": "application/json",
                                                        "Transfer-Encoding": "chunked"})
                   + h.chunked(body, [3, 5]))
            r = c.read_response()
            self.assertEqual(self.echo(r)["instance"], "b")
            self.assertEqual(self.echo(r)["body_length"], len(body))
            c.send(h.build_request("POST", "/echo/llm", {"Content-Type": "application/json",
                                                        "Expect": "100-continue",
                                                        "Content-Length": str(len(body))}))
            interim = c.read_head(stop_at_interim=True)
            self.assertEqual(interim.status, 100)
            c.send(body)
            r = c.read_response()
            self.assertEqual(self.echo(r)["instance"], "b")

    def test_model_router_unknown_model_404(self):
        counts = [self.count(m) for m in (self.a, self.b, self.c)]
        r = self.chat("/echo/llm", {"model": "llama-2-70b", "messages": []})
        err = self.assertJsonError(r, 404, "model_not_found")
        self.assertIn("llama-2-70b", err["message"])
        self.assertEqual(err.get("code"), "model_not_found")
        self.assertEqual(r.header("content-length"), str(len(r.body)))
        self.assertIsNone(r.header("x-mock-instance"))
        # an exact name is not a prefix: "llama-3-8b-instruct" is unknown too
        r = self.chat("/echo/llm", {"model": "llama-3-8b-instruct"})
        self.assertJsonError(r, 404, "model_not_found")
        self.assertEqual([self.count(m) for m in (self.a, self.b, self.c)], counts)

    def test_model_router_non_string_model_400(self):
        counts = [self.count(m) for m in (self.a, self.b, self.c)]
        for model in (5, ["gpt-4"], {"name": "gpt-4"}, True):
            r = self.chat("/echo/llm", {"model": model})
            err = self.assertJsonError(r, 400, "invalid_request_error")
            self.assertIn("model", err["message"])
        self.assertEqual([self.count(m) for m in (self.a, self.b, self.c)], counts)

    def test_model_router_model_list(self):
        counts = [self.count(m) for m in (self.a, self.b, self.c)]
        r = self.req("GET", "/echo/llm/models")
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.header("content-type").startswith("application/json"))
        self.assertEqual(r.header("content-length"), str(len(r.body)))
        self.assertTrue(r.header("x-request-id"))
        body = json.loads(r.body)
        self.assertEqual(body["object"], "list")
        # the exact names, sorted; prefixes are not models
        self.assertEqual([m["id"] for m in body["data"]], ["llama-3-8b", "mistral-7b"])
        # the default list_path on the /v1 route
        r = self.req("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        self.assertEqual([m["id"] for m in json.loads(r.body)["data"]], ["llama-3-8b"])
        self.assertEqual([self.count(m) for m in (self.a, self.b, self.c)], counts)
        # only GET: a POST there is an ordinary request (no model: the route's pool)
        r = self.req("POST", "/v1/models", {"Content-Type": "application/json"}, "{}")
        self.assertEqual((r.status, r.header("x-mock-instance")), (404, "a"), r)

    def test_json_max_bytes_model_router(self):
        # json_max_bytes = 200 on /echo/llm: a bigger body is not decoded (no model: default)
        pad = "x" * 250
        small = json.dumps({"model": "mistral-7b", "pad": pad[:100]})
        big = json.dumps({"model": "mistral-7b", "pad": pad})
        self.assertLessEqual(len(small), 200)
        self.assertGreater(len(big), 200)
        self.assertEqual(self.echo(self.chat("/echo/llm", small))["instance"], "b")
        e = self.echo(self.chat("/echo/llm", big))
        self.assertEqual(e["instance"], "c")
        self.assertEqual(e["body_length"], len(big))  # the body itself is forwarded whole

    def test_json_max_bytes_boundary(self):
        # /echo/small: json_max_bytes = 100; the policy reports type(req.json)
        def json_type(body, ctype="application/json"):
            r = self.req("POST", "/echo/small", {"x-op": "fields", "Content-Type": ctype}, body)
            self.assertEqual(r.status, 200, r)
            f = json.loads(r.body)
            self.assertEqual(f["label"], "small")
            return f["json_type"], f["body_length"]

        def body_of(n):
            b = '{"model":"m","pad":"%s"}' % ("p" * (n - 22))
            self.assertEqual(len(b), n)
            return b

        self.assertEqual(json_type(body_of(100)), ("table", 100))
        self.assertEqual(json_type(body_of(101)), ("nil", 101))
        self.assertEqual(json_type("[1,2]", "application/problem+json"), ("table", 5))
        self.assertEqual(json_type('{"a":1}', "text/plain"), ("nil", 7))
        # the default limit (64 KiB) on /echo/edit
        r = self.req("POST", "/echo/edit", {"x-op": "fields", "Content-Type": "application/json"},
                     json.dumps({"model": "m", "pad": "q" * 60000}))
        self.assertEqual((json.loads(r.body)["json_type"], json.loads(r.body)["model"]), ("table", "m"))
        r = self.req("POST", "/echo/edit", {"x-op": "fields", "Content-Type": "application/json"},
                     json.dumps({"model": "m", "pad": "q" * 66000}))
        self.assertEqual(json.loads(r.body)["json_type"], "nil")

    # --- canary ---------------------------------------------------------------------------

    def test_canary_split_within_binomial_bounds(self):
        n = 2000
        before = {m.name: self.count(m) for m in (self.a, self.b)}
        seen = {"a": 0, "b": 0}
        with h.RawConn(self.port, timeout=10) as c:
            for _ in range(n):
                r = c.request("GET", "/echo/canary")
                self.assertEqual(r.status, 200, r)
                served = r.header("x-mock-instance")
                # the tag names the pool that served
                self.assertEqual(r.header_all("x-variant"), [served], r.headers)
                seen[served] += 1
        self.assertEqual(seen["a"] + seen["b"], n)
        after = {m.name: self.count(m) for m in (self.a, self.b)}
        self.assertEqual({k: after[k] - before[k] for k in after}, seen)
        # Binomial(2000, 0.2): P(outside [lo, hi]) < 2e-9
        lo, hi = binomial_bounds(n, 0.2)
        self.assertTrue(lo <= seen["b"] <= hi, "pool b got %d of %d, expected %d..%d" % (seen["b"], n, lo, hi))
        self.assertLess(lo, 400)
        self.assertGreater(hi, 400)

    def test_canary_sticky(self):
        with h.RawConn(self.port, timeout=10) as c:
            first = None
            for _ in range(50):
                r = c.request("GET", "/echo/sticky", {"x-user-id": "alice"})
                self.assertEqual(r.status, 200, r)
                pool = r.header("x-mock-instance")
                self.assertEqual(r.header("x-variant"), pool)
                first = first or pool
                self.assertEqual(pool, first, "user alice moved between pools")
            # different users spread over both pools, each one staying put
            by_user = {}
            for rnd in range(2):
                for i in range(40):
                    r = c.request("GET", "/echo/sticky", {"x-user-id": "user-%d" % i})
                    pool = r.header("x-mock-instance")
                    self.assertEqual(by_user.setdefault(i, pool), pool, "user-%d moved" % i)
            self.assertEqual(set(by_user.values()), {"a", "b"})

    def test_canary_tag_on_upstream_error_status(self):
        r = self.req("GET", "/echo/canary", {"x-mock-status": "503"})
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.header("x-variant"), r.header("x-mock-instance"))

    # --- api_keys -------------------------------------------------------------------------

    def assertUnauthorized(self, r, message_part):
        err = self.assertJsonError(r, 401, "invalid_api_key")
        self.assertIn(message_part, err["message"])
        self.assertEqual(r.header("www-authenticate"), 'Bearer realm="sluice"')
        self.assertIsNone(r.header("x-mock-instance"))

    def test_api_keys_missing_or_wrong_key_401(self):
        before = self.count(self.k)
        self.assertUnauthorized(self.req("GET", "/echo/keys"), "required")
        self.assertUnauthorized(self.req("GET", "/echo/keys", {"Authorization": "Bearer sk-wrong-key-99"}), "not valid")
        self.assertUnauthorized(self.req("GET", "/echo/keys", {"X-API-Key": "sk-wrong-key-99"}), "not valid")
        # not a Bearer credential, and no X-API-Key
        self.assertUnauthorized(self.req("GET", "/echo/keys", {"Authorization": "Basic " + KEYS[0]}), "required")
        # a spoofed tenant header does not get anyone in
        self.assertUnauthorized(self.req("POST", "/echo/keys", {"x-tenant-id": tenant(KEYS[0])}, "{}"), "required")
        self.assertUnauthorized(self.req("GET", "/echo/keysfwd", {"X-API-Key": KEYS[0][:-1]}), "not valid")
        self.assertEqual(self.count(self.k), before, "a request without a valid key reached the upstream")

    def test_api_keys_bearer(self):
        for key in KEYS:
            e = self.echo(self.req("GET", "/echo/keys?x=1", {"Authorization": "Bearer " + key}))
            self.assertEqual(e["instance"], "k")
            self.assertEqual(e["url"], "/echo/keys?x=1")
            self.assertEqual(h.echo_header_all(e, "x-tenant-id"), [tenant(key)])
            self.assertRegex(tenant(key), h.HEX32_RE)
            self.assertEqual(h.echo_header_all(e, "authorization"), [])
            self.assertEqual(h.echo_header_all(e, "x-api-key"), [])
        # the scheme is case-insensitive
        e = self.echo(self.req("GET", "/echo/keys", {"Authorization": "bearer " + KEYS[1]}))
        self.assertEqual(h.echo_header_all(e, "x-tenant-id"), [tenant(KEYS[1])])

    def test_api_keys_x_api_key_and_spoofed_tenant(self):
        e = self.echo(self.req("GET", "/echo/keys", [("X-API-Key", KEYS[0]),
                                                     ("X-Tenant-Id", "spoofed"),
                                                     ("x-tenant-id", "spoofed-again")]))
        self.assertEqual(h.echo_header_all(e, "x-tenant-id"), [tenant(KEYS[0])])
        self.assertEqual(h.echo_header_all(e, "x-api-key"), [])
        self.assertEqual(h.echo_header_all(e, "authorization"), [])

    def test_api_keys_forward_key_and_tenant_header_options(self):
        e = self.echo(self.req("GET", "/echo/keysfwd", {"Authorization": "Bearer " + KEYS[1],
                                                        "x-org": "spoofed"}))
        self.assertEqual(h.echo_header_all(e, "x-org"), [tenant(KEYS[1])])
        self.assertEqual(h.echo_header_all(e, "authorization"), ["Bearer " + KEYS[1]])
        self.assertEqual(h.echo_header_all(e, "x-tenant-id"), [])
        e = self.echo(self.req("GET", "/echo/keysfwd", {"X-API-Key": KEYS[0]}))
        self.assertEqual(h.echo_header_all(e, "x-api-key"), [KEYS[0]])
        self.assertEqual(h.echo_header_all(e, "x-org"), [tenant(KEYS[0])])

    # --- on_request edits -----------------------------------------------------------------

    def test_set_header_replaces_remove_header_and_set_path(self):
        r = self.req("POST", "/echo/edit/x?keep=1", [
            ("x-set", "new"), ("X-Replace", "old-1"), ("x-replace", "old-2"),
            ("x-remove", "1"), ("x-drop", "d1"), ("X-Drop", "d2"),
            ("x-path", "/echo/rewritten/p?q=1&r=%20"), ("x-set-twice", "1"),
        ], "body!")
        e = self.echo(r)
        self.assertEqual(e["instance"], "a")
        self.assertEqual(e["method"], "POST")
        self.assertEqual(e["url"], "/echo/rewritten/p?q=1&r=%20")
        self.assertEqual(e["body_length"], 5)
        self.assertEqual(h.echo_header_all(e, "x-replace"), ["new"])  # every old one replaced
        self.assertEqual(h.echo_header_all(e, "x-drop"), [])
        # the latest edit of a name wins, whatever its case
        self.assertEqual(h.echo_header_all(e, "x-twice"), ["second"])
        # req:header and req.url keep returning what the client sent
        self.assertEqual(h.echo_header_all(e, "x-seen"), ["old-1 /echo/edit/x?keep=1"])
        # what the gateway manages is untouched
        self.assertEqual(h.echo_header_all(e, "x-forwarded-host"), ["localhost"])
        self.assertEqual(h.echo_header_all(e, "x-request-id"), [r.header("x-request-id")])
        self.assertEqual(h.echo_header_all(e, "content-length"), ["5"])

    def test_set_path_after_endpoint_prefix_and_pool_choice(self):
        # pool pfx's endpoint URL has the path /echo/prefix
        e = self.echo(self.req("GET", "/echo/edit", {"x-pool": "pfx", "x-path": "/x?y=1"}))
        self.assertEqual(e["url"], "/echo/prefix/x?y=1")
        e = self.echo(self.req("GET", "/echo/edit/z?w=2", {"x-pool": "pfx"}))
        self.assertEqual(e["url"], "/echo/prefix/echo/edit/z?w=2")
        # { pool = "name" } works like a name
        r = self.req("GET", "/echo/edit", {"x-op": "pooltable", "x-pool": "c"})
        self.assertEqual(self.echo(r)["instance"], "c")

    def test_request_fields(self):
        body = '{"model":"gpt-x","n":1}'
        r = self.req("PUT", "/echo/edit/f?a=1&b=2", {"x-op": "fields", "x-probe": "Probe Value",
                                                     "X-Request-Id": "client-chosen-id.1",
                                                     "Content-Type": "application/json"}, body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-request-id"), "client-chosen-id.1")
        f = json.loads(r.body)
        self.assertEqual(f, {
            "method": "PUT", "path": "/echo/edit/f", "query": "a=1&b=2", "url": "/echo/edit/f?a=1&b=2",
            "host": "localhost", "id": "client-chosen-id.1", "client": "127.0.0.1", "body": body,
            "body_length": len(body), "probe": "Probe Value", "json_type": "table", "label": "big",
            "model": "gpt-x"})

    def test_options_per_route_and_shorthand(self):
        # one policy file on three routes: each route has its own instance and options
        labels = {}
        for path in ("/echo/edit", "/echo/small", "/echo/short"):
            r = self.req("GET", path, {"x-op": "fields"})
            self.assertEqual(r.status, 200, r)
            labels[path] = json.loads(r.body)["label"]
        self.assertEqual(labels, {"/echo/edit": "big", "/echo/small": "small", "/echo/short": "none"})

    def test_edits_do_not_leak_into_the_next_request(self):
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/echo/edit", {"x-op": "set_then_direct"})
            self.assertEqual((r.status, r.body), (200, b"direct after edits"))
            e = self.echo(c.request("GET", "/echo/edit"))
            self.assertEqual((e["url"], h.echo_header_all(e, "x-leak")), ("/echo/edit", []))
            r = c.request("GET", "/echo/edit", {"x-op": "set_then_error"})
            self.assertJsonError(r, 500, "policy_error")
            e = self.echo(c.request("GET", "/echo/edit"))
            self.assertEqual((e["url"], h.echo_header_all(e, "x-leak")), ("/echo/edit", []))

    # --- direct responses -----------------------------------------------------------------

    def test_direct_response_json_table(self):
        before = self.count(self.a)
        r = self.req("POST", "/echo/edit", {"x-op": "direct"}, "ignored")
        self.assertEqual(r.status, 418, r)
        self.assertEqual(r.header_all("content-type"), ["application/json"])
        self.assertEqual(r.header_all("content-length"), [str(len(r.body))])
        self.assertEqual(len(r.header_all("x-request-id")), 1)
        self.assertRegex(r.header("x-request-id"), h.HEX32_RE)
        self.assertEqual(r.header("x-direct"), "yes")
        self.assertEqual(r.header("cache-control"), "no-store")
        self.assertEqual(json.loads(r.body), {"ok": True, "n": 3, "nested": ["x", "y"]})
        self.assertEqual(self.count(self.a), before)

    def test_direct_response_string_body(self):
        r = self.req("GET", "/echo/edit", {"x-op": "direct_text"})
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.header_all("content-type"), ["text/csv"])
        self.assertEqual(r.header("retry-after"), "7")
        self.assertEqual(r.body, b"a,b\n1,2\n")
        self.assertEqual(r.header("content-length"), "8")
        r = self.req("GET", "/echo/edit", {"x-op": "direct_plain"})
        self.assertEqual((r.status, r.body), (200, b"plain"))
        self.assertEqual(r.header("content-type"), "text/plain; charset=utf-8")
        self.assertEqual(r.header("content-length"), "5")

    def test_direct_response_head(self):
        with h.RawConn(self.port) as c:
            r = c.request("HEAD", "/echo/edit", {"x-op": "direct"})
            self.assertEqual(r.status, 418)
            self.assertEqual(r.body, b"")
            self.assertEqual(r.header("content-length"), "37")
            self.assertEqual(self.echo(c.request("GET", "/echo/edit"))["instance"], "a")

    def test_direct_responses_not_cached_and_no_on_response(self):
        for _ in range(2):
            r = self.req("GET", "/echo/cached", {"x-op": "direct", "x-res-op": "set"})
            self.assertEqual(r.status, 418)
            self.assertIsNone(r.header("x-cache"))
            self.assertIsNone(r.header("x-res"))

    # --- keep-alive and pipelining ----------------------------------------------------------

    def test_keepalive_survives_direct_and_error_responses(self):
        with h.RawConn(self.port) as c:
            r = c.request("POST", "/echo/edit", {"x-op": "direct"}, '{"a":1}')
            self.assertEqual(r.status, 418)
            self.assertFalse(r.has_token("connection", "close"))
            r = c.request("GET", "/echo/edit", {"x-op": "error"})
            self.assertJsonError(r, 500, "policy_error")
            self.assertFalse(r.has_token("connection", "close"))
            r = c.request("GET", "/echo/edit", {"x-res-op": "error"})
            self.assertJsonError(r, 500, "policy_error")
            r = c.request("POST", "/echo/llm", {"Content-Type": "application/json"}, '{"model":"nope"}')
            self.assertJsonError(r, 404, "model_not_found")
            self.assertEqual(self.echo(c.request("GET", "/echo/edit"))["instance"], "a")

    def test_pipelined_direct_error_and_proxied(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/echo/edit", {"x-op": "direct"}, b'{"a":1}')
                   + h.build_request("POST", "/echo/edit", {"x-op": "error"}, b"xyz")
                   + h.build_request("GET", "/echo/keys")
                   + h.build_request("GET", "/echo/edit", {"x-set": "v"}))
            statuses = [c.read_response().status for _ in range(3)]
            self.assertEqual(statuses, [418, 500, 401])
            e = self.echo(c.read_response())
            self.assertEqual(h.echo_header_all(e, "x-replace"), ["v"])

    # --- on_response ------------------------------------------------------------------------

    def test_on_response_set_and_remove_header(self):
        r = self.req("GET", "/echo/edit", {"x-res-op": "set"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header_all("x-res"), ["status 200 from a"])
        self.assertEqual(r.header("x-mock-instance"), "a")
        r = self.req("GET", "/echo/edit", {"x-res-op": "remove"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header_all("x-mock-instance"), [])
        self.assertEqual(json.loads(r.body)["instance"], "a")
        r = self.req("GET", "/echo/edit", {"x-res-op": "ctype"})
        self.assertEqual(r.header_all("content-type"), ["text/x-replaced"])
        # runs on upstream error statuses too, and sees them
        r = self.req("GET", "/echo/edit", {"x-res-op": "set", "x-mock-status": "503"})
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.header("x-res"), "status 503 from a")

    def test_on_response_repeated_headers(self):
        r = self.req("GET", "/echo/edit", {"x-pool": "scr", "x-res-op": "remove_cookie"})
        self.assertEqual((r.status, r.body), (200, b"ok"))
        self.assertEqual(r.header_all("set-cookie"), [])
        self.assertEqual(r.header("x-up"), "u")
        r = self.req("GET", "/echo/edit", {"x-pool": "scr", "x-res-op": "set_cookie"})
        self.assertEqual(r.header_all("set-cookie"), ["c=3"])
        r = self.req("GET", "/echo/edit", {"x-pool": "scr"})
        self.assertEqual(r.header_all("set-cookie"), ["a=1", "b=2"])

    def test_on_response_req_pool(self):
        r = self.req("GET", "/echo/edit", {"x-pool": "c", "x-res-op": "pool"})
        self.assertEqual((r.header("x-served-by"), r.header("x-mock-instance")), ("c", "c"))
        r = self.req("GET", "/echo/edit", {"x-res-op": "pool"})
        self.assertEqual((r.header("x-served-by"), r.header("x-mock-instance")), ("a", "a"))

    def ensure_dead_ejected(self):
        """One failed attempt opens the breaker of pool dead's only endpoint."""
        r = self.req("GET", "/echo/edit", {"x-pool": "dead"})
        self.assertIn(r.status, (200, 502), r)

    def test_on_response_req_pool_is_the_fallback_that_served(self):
        # req.pool in on_response is the pool that served: the fallback when the chosen
        # pool's endpoints are all ejected (so canary's `tag` names where it really went).
        self.ensure_dead_ejected()
        r = self.req("GET", "/echo/edit", {"x-pool": "dead", "x-res-op": "pool"})
        self.assertEqual((r.status, r.header("x-mock-instance")), (200, "b"), r)
        self.assertEqual(r.header("x-served-by"), "b")

    def test_on_response_not_run_for_gateway_errors(self):
        # pool down: nothing listens, every attempt fails to connect: the gateway's own 502
        r = self.req("GET", "/echo/edit", {"x-pool": "down", "x-res-op": "set"})
        self.assertJsonError(r, 502)
        self.assertIsNone(r.header("x-res"))
        r = self.req("GET", "/echo/edit", {"x-pool": "down", "x-res-op": "error"})
        self.assertJsonError(r, 502)

    def test_on_response_error_drops_the_upstream_response(self):
        line = line_of(EDITS_POLICY, "-- @res_error")
        m0 = self.scrape()
        before = self.count(self.a)
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/echo/edit", {"x-res-op": "error"})
            self.assertJsonError(r, 500, "policy_error")
            self.assertIsNone(r.header("x-mock-instance"))
            # a big upstream body is dropped too, and the client connection carries on
            r = c.request("GET", "/echo/edit", {"x-res-op": "error", "x-path": "/bytes?n=3000000"})
            self.assertJsonError(r, 500, "policy_error")
            self.assertLess(len(r.body), 1000)
            self.assertEqual(self.echo(c.request("GET", "/echo/edit"))["instance"], "a")
        self.assertEqual(self.count(self.a) - before, 3)  # the upstream was asked, then dropped
        pat = re.compile(r"\[error\] policy error \(route /echo/edit, on_response\): \S*edits\.lua:%d: "
                         r"deliberate on_response failure" % line)
        self.assertIsNotNone(self.s.wait_log(pat, 5, start=self.mark), self.s.log_text())
        m1 = self.scrape()
        self.assertEqual(m1.val("sluice_policy_errors_total", policy="route/edits")
                         - m0.val("sluice_policy_errors_total", policy="route/edits"), 2)

    def test_on_response_refused_edits(self):
        for op, marker, msg in (("req_edit", "@res_req_edit", "req:set_header is only available in on_request"),
                                ("managed", "@res_managed", "header Content-Length is managed by the gateway"),
                                ("crlf", "@res_crlf", "control character")):
            mark = self.s.log_mark()
            r = self.req("GET", "/echo/edit", {"x-res-op": op})
            self.assertJsonError(r, 500, "policy_error")
            pat = re.compile(r"policy error \(route /echo/edit, on_response\): \S*edits\.lua:%d: .*%s"
                             % (line_of(EDITS_POLICY, marker), re.escape(msg)))
            self.assertIsNotNone(self.s.wait_log(pat, 5, start=mark), (op, self.s.log_text()))

    # --- hook errors ------------------------------------------------------------------------

    def assertPolicyError(self, headers, log_re, path="/echo/edit", method="GET", body=None):
        """The request fails with 500 policy_error, the log names the cause, the error counter
        grows by one, no upstream is asked, and the next request is served."""
        m0 = self.scrape()
        before = self.count(self.a)
        mark = self.s.log_mark()
        r = self.req(method, path, headers, body)
        err = self.assertJsonError(r, 500, "policy_error")
        self.assertIn(path, err["message"])
        self.assertIsNone(r.header("x-mock-instance"))
        m = self.s.wait_log(re.compile(r"\[error\] policy error \(route %s, on_request\): %s"
                                       % (re.escape(path), log_re)), 5, start=mark)
        self.assertIsNotNone(m, "no log line %r in:\n%s" % (log_re, self.s.log_text()))
        m1 = self.scrape()
        self.assertEqual(m1.val("sluice_policy_errors_total", policy="route/edits")
                         - m0.val("sluice_policy_errors_total", policy="route/edits"), 1)
        self.assertEqual(m1.val("sluice_requests_total", route=path, pool="", code="5xx")
                         - m0.val("sluice_requests_total", route=path, pool="", code="5xx"), 1)
        self.assertEqual(self.count(self.a), before)
        self.assertTrue(self.s.alive())
        self.assertEqual(self.echo(self.req("GET", path))["instance"], "a")
        return r

    def at(self, marker):
        return r"\S*/policies/route/edits\.lua:%d: " % line_of(EDITS_POLICY, marker)

    def test_error_in_on_request(self):
        self.assertPolicyError({"x-op": "error"}, self.at("@error") + "deliberate failure")
        self.assertPolicyError({"x-op": "set_then_error"}, self.at("@set_then_error") + "failure after edits")
        self.assertPolicyError({"x-op": "readonly"}, self.at("@readonly") + "req is read-only")

    def test_unknown_pool_is_an_error(self):
        self.assertPolicyError({"x-op": "badpool"}, r'.*on_request chose pool "no_such_pool"')
        self.assertPolicyError({"x-pool": "nope"}, r'.*on_request chose pool "nope"')
        self.assertPolicyError({"x-op": "pooltable", "x-pool": "gone"}, r'.*on_request chose pool "gone"')

    def test_bad_return_values(self):
        self.assertPolicyError({"x-op": "badret"}, r".*edits: on_request returned a number")
        for status in ("199", "600", "200.5", "100"):
            self.assertPolicyError({"x-op": "badstatus", "x-status": status},
                                   r".*status must be an integer from 200 to 599")
        self.assertPolicyError({"x-op": "badstatus", "x-status": "x"}, r".*status must be an integer")

    def test_runaway_loop_stopped_by_budget(self):
        self.assertPolicyError({"x-op": "loop"}, self.at("@loop") + r"instruction budget of \d+ exceeded")

    def test_managed_headers_cannot_be_edited(self):
        for name in ("Host", "Content-Length", "transfer-encoding", "Connection", "X-Request-Id",
                     "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Upgrade", "TE",
                     "Trailer", "Expect", "Keep-Alive", "Proxy-Connection"):
            self.assertPolicyError({"x-op": "managed", "x-name": name},
                                   self.at("@managed") + "header %s is managed by the gateway" % re.escape(name))
        for name in ("content-length", "x-forwarded-for", "host"):
            self.assertPolicyError({"x-op": "managed_remove", "x-name": name},
                                   self.at("@managed_remove") + "header %s is managed" % name)

    def test_every_x_forwarded_header_is_managed(self):
        # Every X-Forwarded-* is the gateway's word to the upstream: none can be set by a hook.
        for name in ("X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Server"):
            r = self.req("GET", "/echo/edit", {"x-op": "managed", "x-name": name})
            self.assertEqual(r.status, 500, (name, r))

    def test_header_injection_refused(self):
        self.assertPolicyError({"x-op": "crlf"}, self.at("@crlf") + "header X-Evil: value contains a control character")
        self.assertPolicyError({"x-op": "lf"}, self.at("@lf") + "header X-Evil: value contains a control character")
        self.assertPolicyError({"x-op": "nul"}, self.at("@nul") + "header X-Evil: value contains a control character")
        self.assertPolicyError({"x-op": "badname"}, self.at("@badname") + 'header name "Bad Name" is not a valid token')
        self.assertPolicyError({"x-op": "badpath"}, self.at("@badpath") + "set_path: character 8 is not allowed")
        self.assertPolicyError({"x-op": "crlfpath"}, self.at("@crlfpath") + "set_path: character 8 is not allowed")

    def test_bad_direct_responses(self):
        self.assertPolicyError({"x-op": "direct_managed"}, r".*response header Content-Length is set by the gateway")
        self.assertPolicyError({"x-op": "direct_crlf"}, r".*response header X-A needs a string value without CR, LF or NUL")

    def test_direct_204_with_body_keeps_the_connection_in_sync(self):
        # A 204 has no body (RFC 9110 6.4.1): { status = 204, body = "abc" } is a policy error,
        # answered 500 with a framed JSON body, and the keep-alive connection stays in sync.
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/echo/edit", {"x-op": "direct_204_body"})
            self.assertEqual(r.status, 500)
            r = c.request("GET", "/echo/edit")
            self.assertEqual(self.echo(r)["instance"], "a")

    def test_header_lookup_of_a_missing_header_gives_nil(self):
        # req:header / res:header of an absent header give nil (a value), so ordinary Lua
        # such as tostring(res:header("x")) or type(req:header("x")) works.
        r = self.req("GET", "/echo/edit", {"x-res-op": "missing"})
        self.assertEqual((r.status, r.header("x-missing")), (200, "nil"), r)
        r = self.req("GET", "/echo/edit", {"x-op": "missing"})
        self.assertEqual((r.status, r.body), (200, b"nil"), r)

    # --- cache ------------------------------------------------------------------------------

    def test_cache_key_covers_pool_and_edits(self):
        path = "/echo/cached/key"

        def get(headers):
            r = self.req("GET", path, headers)
            self.assertEqual(r.status, 200, r)
            return r

        r1 = get({"x-pool": "a", "x-res-op": "seq"})
        self.assertEqual((r1.header("x-cache"), r1.header("x-mock-instance")), ("MISS", "a"))
        seq = r1.header("x-res-seq")
        self.assertIsNotNone(seq)
        # a hit: stored with the header on_response set, and on_response does not run again
        r2 = get({"x-pool": "a", "x-res-op": "seq"})
        self.assertEqual((r2.header("x-cache"), r2.header("x-res-seq")), ("HIT", seq))
        # the same request sent to another pool is another entry
        r3 = get({"x-pool": "b", "x-res-op": "seq"})
        self.assertEqual((r3.header("x-cache"), r3.header("x-mock-instance")), ("MISS", "b"))
        self.assertNotEqual(r3.header("x-cache-key"), r1.header("x-cache-key"))
        self.assertEqual(get({"x-pool": "b"}).header("x-cache"), "HIT")
        # different edits, different entries
        r4 = get({"x-pool": "b", "x-set": "1"})
        r5 = get({"x-pool": "b", "x-set": "2"})
        self.assertEqual((r4.header("x-cache"), r5.header("x-cache")), ("MISS", "MISS"))
        self.assertEqual(h.echo_header_all(json.loads(r5.body), "x-replace"), ["2"])
        self.assertEqual(get({"x-pool": "b", "x-set": "1"}).header("x-cache"), "HIT")
        r6 = get({"x-pool": "b", "x-path": "/echo/other"})
        self.assertEqual((r6.header("x-cache"), json.loads(r6.body)["url"]), ("MISS", "/echo/other"))
        self.assertEqual(get({"x-pool": "b", "x-path": "/echo/other"}).header("x-cache"), "HIT")

    # --- metrics ----------------------------------------------------------------------------

    def test_request_metrics_labelled_by_hook_pool(self):
        m0 = self.scrape()
        for body in ({"model": "gpt-4o"}, {"model": "gpt-4o"}, {"messages": []}, {"model": "mistral-7b"}):
            self.assertEqual(self.chat("/echo/llm", body).status, 200)
        self.assertEqual(self.chat("/echo/llm", {"model": "unknown-1"}).status, 404)
        self.assertEqual(self.req("GET", "/echo/llm/models").status, 200)
        m1 = self.scrape()

        def delta(pool, code):
            lab = dict(route="/echo/llm", pool=pool, code=code)
            return m1.val("sluice_requests_total", **lab) - m0.val("sluice_requests_total", **lab)

        self.assertEqual(delta("c", "2xx"), 3)
        self.assertEqual(delta("b", "2xx"), 1)
        self.assertEqual(delta("a", "2xx"), 0)  # the route's own pool
        self.assertEqual(delta("", "4xx"), 1)   # direct responses: no pool
        self.assertEqual(delta("", "2xx"), 1)
        self.assertTrue(m1.has("sluice_request_duration_seconds_count", route="/echo/llm", pool="c"))
        self.assertEqual(m1.val("sluice_policy_errors_total", policy="route/model_router"), 0)


# ---------------------------------------------------------------------------------------
# Hot reload of hook policies


FLIP = '''local M = {}
function M.init(options, ctx)
  if options.bad then error("flip: options.bad is set", 0) end
end
function M.on_request(req) return { status = 200, body = "%s" } end
return M
'''


class RouteHookReloadTest(HookCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a = env.mock("a")
        cls.b = env.mock("b")
        cls.flip = env.write("policies/route/flip.lua", FLIP % "v1")
        env.write("policies/route/edits.lua", EDITS_POLICY)
        cls.pools = {"a": h.make_pool([cls.a]), "b": h.make_pool([cls.b])}
        cfg = h.make_config(cls.pools, cls.routes({}), policies=env.path("policies"), watch=False)
        cls.s, cls.port, cls.admin = cls.boot(cfg)

    @classmethod
    def routes(cls, flip_options):
        return [{"path": "/flip", "pool": "a", "hook": {"policy": "flip", "options": flip_options}},
                {"path": "/echo/edit", "pool": "a", "hook": "edits"}]

    def write_flip(self, text):
        with open(self.flip, "w") as f:
            f.write(text)

    def write_config(self, flip_options):
        cfg = h.make_config(self.pools, self.routes(flip_options), policies=self.env.path("policies"),
                            watch=False)
        with open(self.s.config_path, "w") as f:
            f.write(h.config_text(cfg))

    def flip_body(self):
        r = self.req("GET", "/flip")
        self.assertEqual(r.status, 200, r)
        return r.body.decode()

    def test_policy_edit_then_broken_edit(self):
        self.write_flip(FLIP % "v1")
        self.assertEqual(self.reload()[0], 200)
        self.assertEqual(self.flip_body(), "v1")
        self.write_flip(FLIP % "v2")
        status, body = self.reload()
        self.assertEqual(status, 200, body)
        self.assertEqual(self.flip_body(), "v2")
        # a syntax error: the reload fails naming the route and the file, v2 keeps running
        self.write_flip("local M = {\n")
        status, body = self.reload()
        self.assertEqual(status, 422, body)
        self.assertIn("routes[1].hook", body)
        self.assertRegex(body, r"flip\.lua:2:")
        self.assertEqual(self.flip_body(), "v2")
        # a policy without hooks
        self.write_flip("return {}\n")
        status, body = self.reload()
        self.assertEqual(status, 422, body)
        self.assertIn("must define on_request", body)
        self.assertEqual(self.flip_body(), "v2")
        self.write_flip(FLIP % "v3")
        self.assertEqual(self.reload()[0], 200)
        self.assertEqual(self.flip_body(), "v3")

    def test_init_error_on_reload_keeps_running_version(self):
        self.write_flip(FLIP % "kept")
        self.write_config({})
        self.assertEqual(self.reload()[0], 200)
        self.assertEqual(self.flip_body(), "kept")
        self.write_config({"bad": True})
        status, body = self.reload()
        self.assertEqual(status, 422, body)
        self.assertIn("routes[1].hook: flip: options.bad is set", body)
        self.assertEqual(self.flip_body(), "kept")
        self.write_config({})
        self.assertEqual(self.reload()[0], 200)

    def test_request_in_flight_keeps_its_generations_hooks(self):
        new_policy = EDITS_POLICY.replace('"status " .. res.status', '"new status " .. res.status')
        self.assertNotEqual(new_policy, EDITS_POLICY)
        out = {}

        def slow():
            out["r"] = self.req("GET", "/echo/edit", {"x-res-op": "set", "x-mock-delay-ms": "300"})

        t = threading.Thread(target=slow)
        base = self.a.stats()["requests"]
        t.start()
        try:
            h.wait_for(lambda: self.a.stats()["requests"] > base and self.a.stats()["inflight"] >= 1,
                       5, what="the slow request at the upstream")
            self.env.write("policies/route/edits.lua", new_policy)
            self.assertEqual(self.reload()[0], 200)
            r = self.req("GET", "/echo/edit", {"x-res-op": "set"})
            self.assertEqual(r.header("x-res"), "new status 200 from a")
        finally:
            t.join(10)
            self.env.write("policies/route/edits.lua", EDITS_POLICY)
            self.assertEqual(self.reload()[0], 200)
        # started on the old generation: its on_response ran
        self.assertEqual(out["r"].status, 200, out["r"])
        self.assertEqual(out["r"].header("x-res"), "status 200 from a")

    def test_hook_pool_request_counters_survive_reload(self):
        # Series of pools a hook picks (and pool="" of direct answers) keep counting across a
        # reload, like the route's own pool ("Series that survive a reload keep counting").
        for _ in range(3):
            self.assertEqual(self.echo(self.req("GET", "/echo/edit", {"x-pool": "b"}))["instance"], "b")
            self.assertEqual(self.echo(self.req("GET", "/echo/edit"))["instance"], "a")
        m0 = self.scrape()
        own = m0.val("sluice_requests_total", route="/echo/edit", pool="a", code="2xx")
        hooked = m0.val("sluice_requests_total", route="/echo/edit", pool="b", code="2xx")
        self.assertGreaterEqual(hooked, 3)
        self.assertEqual(self.reload()[0], 200)
        m1 = self.scrape()
        self.assertEqual(m1.val("sluice_requests_total", route="/echo/edit", pool="a", code="2xx"), own)
        self.assertEqual(m1.val("sluice_requests_total", route="/echo/edit", pool="b", code="2xx"), hooked)


class RouteHookWatchTest(HookCase):
    """watch = true: policy files and data files under the policies directory."""

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a = env.mock("a")
        cls.flip = env.write("policies/route/flip.lua", FLIP % "w1")
        cls.keys = env.write("policies/data/keys.lua", 'return { "%s" }\n' % KEYS[0])
        routes = [{"path": "/flip", "pool": "a", "hook": "flip"},
                  {"path": "/echo/keys", "pool": "a",
                   "hook": {"policy": "api_keys", "options": {"keys_file": cls.keys}}}]
        cfg = h.make_config({"a": h.make_pool([cls.a])}, routes, policies=env.path("policies"),
                            watch=True)
        cls.s, cls.port, cls.admin = cls.boot(cfg)

    def replace(self, path, text):
        """Atomic replace: one change event for path."""
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def await_reload(self, mark, ok=True):
        pat = GEN_RE if ok else RELOAD_FAILED_RE
        m = self.s.wait_log(pat, 10, start=mark)
        self.assertIsNotNone(m, "no %s line in:\n%s" % ("reload" if ok else "reload failed", self.s.log_text()))
        return m

    def test_policy_file_change_reloads(self):
        self.assertEqual(self.req("GET", "/flip").body, b"w1")
        mark = self.s.log_mark()
        self.replace(self.flip, FLIP % "w2")
        self.await_reload(mark)
        self.assertEqual(self.req("GET", "/flip").body, b"w2")
        mark = self.s.log_mark()
        self.replace(self.flip, "local M = {}\nfunction M.on_request(req) return { status = 200 \nreturn M\n")
        m = self.await_reload(mark, ok=False)
        self.assertIn("routes[1].hook", m.group(1))
        self.assertRegex(m.group(1), r"flip\.lua:\d+:")
        self.assertEqual(self.req("GET", "/flip").body, b"w2")
        mark = self.s.log_mark()
        self.replace(self.flip, FLIP % "w3")
        self.await_reload(mark)
        self.assertEqual(self.req("GET", "/flip").body, b"w3")

    def test_keys_data_file_change_reloads(self):
        self.assertEqual(self.req("GET", "/echo/keys", {"X-API-Key": KEYS[1]}).status, 401)
        self.assertEqual(self.req("GET", "/echo/keys", {"X-API-Key": KEYS[0]}).status, 200)
        mark = self.s.log_mark()
        self.replace(self.keys, 'return { "%s" }\n' % KEYS[1])
        self.await_reload(mark)
        self.assertEqual(self.req("GET", "/echo/keys", {"X-API-Key": KEYS[1]}).status, 200)
        self.assertEqual(self.req("GET", "/echo/keys", {"X-API-Key": KEYS[0]}).status, 401)
        # an empty key list fails the reload; the keys stay as they were
        mark = self.s.log_mark()
        self.replace(self.keys, "return {}\n")
        m = self.await_reload(mark, ok=False)
        self.assertIn("holds no keys", m.group(1))
        self.assertEqual(self.req("GET", "/echo/keys", {"X-API-Key": KEYS[1]}).status, 200)
        # a good file again: reloads succeed again
        mark = self.s.log_mark()
        self.replace(self.keys, 'return { "%s" }\n' % KEYS[0])
        self.await_reload(mark)
        self.assertEqual(self.req("GET", "/echo/keys", {"X-API-Key": KEYS[0]}).status, 200)


# ---------------------------------------------------------------------------------------
# sluice --check


CHECK_CONFIG = """\
return {
  listen = { "127.0.0.1:0" },
  admin = "127.0.0.1:0",
  pools = {
    llm = { endpoints = { "http://127.0.0.1:9" } },
    other = { endpoints = { "http://127.0.0.1:10" } },
  },
  routes = {
    { path = "/v1", pool = "llm", HOOK1 },
    { path = "/v2", pool = "other", HOOK2 },
  },
}
"""

GOOD_HOOK = 'hook = { policy = "model_router", options = { models = { ["m-*"] = "other" } } }'


class RouteHookCheckTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="sluice-rh-check-")
        pol = os.path.join(cls.tmp, "policies", "route")
        os.makedirs(pol)
        files = {
            "init_error.lua": 'local M = {}\nfunction M.init(o, ctx)\n  error("init says no")\nend\n'
                              'function M.on_request(req) end\nreturn M\n',
            "spin.lua": 'local M = {}\nfunction M.init(o, ctx) while true do end end\n'
                        'function M.on_request(req) end\nreturn M\n',
            "nohooks.lua": "local M = {}\nfunction M.init(o, ctx) end\nreturn M\n",
            "notable.lua": "return 42\n",
            "syntax.lua": "local M = {\nfunction M.on_request(req) end\nreturn M\n",
            "pools.lua": 'local M = {}\nfunction M.init(o, ctx)\n'
                         '  assert(ctx.pools.llm and ctx.pools.other and not ctx.pools.nope, "pools")\n'
                         '  local t = ctx.load_table("data/table.lua")\n'
                         '  assert(t.answer == 42, "load_table")\nend\n'
                         'function M.on_request(req) end\nreturn M\n',
        }
        for name, text in files.items():
            with open(os.path.join(pol, name), "w") as f:
                f.write(text)
        os.makedirs(os.path.join(cls.tmp, "data"))
        with open(os.path.join(cls.tmp, "data", "table.lua"), "w") as f:
            f.write("return { answer = 42 }\n")
        # shadows the bundled canary: the config's policies directory is searched first
        with open(os.path.join(pol, "canary.lua"), "w") as f:
            f.write('return { init = function() error("the shadowing canary", 0) end,\n'
                    '  on_request = function() end }\n')
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        import shutil
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def check(self, hook1, hook2=GOOD_HOOK):
        self.n += 1
        path = os.path.join(self.tmp, "check%d.lua" % self.n)
        text = CHECK_CONFIG.replace("HOOK1", hook1).replace("HOOK2", hook2)
        with open(path, "w") as f:
            f.write(text)
        p = subprocess.run([h.SLUICE_BIN, "--check", "-c", path], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20, cwd="/")
        return path, p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def assertCheckFails(self, hook1, needle, route=1, hook2=GOOD_HOOK):
        path, rc, out, err = self.check(hook1, hook2)
        self.assertNotEqual(rc, 0, (out, err))
        self.assertEqual(rc, 1, (out, err))
        first = err.strip().splitlines()[0] if err.strip() else ""
        line = 8 + route  # the line of routes[route] in CHECK_CONFIG
        self.assertTrue(first.startswith("%s:%d: routes[%d].hook" % (path, line, route)),
                        "expected %s:%d: routes[%d].hook..., got %r" % (path, line, route, err))
        self.assertIn(needle, first)
        self.assertNotIn(": ok", out)
        return first

    def test_good_hooks(self):
        path, rc, out, err = self.check(GOOD_HOOK, 'hook = { policy = "pools" }')
        self.assertEqual(rc, 0, (out, err))
        self.assertIn(": ok", out)

    def test_api_keys_bad_keys_file(self):
        # { answer = 42 }: the key "answer" is shorter than 8 characters
        self.assertCheckFails('hook = { policy = "api_keys", options = { keys_file = "data/table.lua" } }',
                              "keys must be strings of at least 8 characters")

    def test_unknown_policy_file(self):
        first = self.assertCheckFails('hook = "no_such_hook"', "policy file not found: route/no_such_hook.lua")
        self.assertIn(os.path.join(self.tmp, "policies"), first)
        self.assertIn(h.POLICIES_DIR, first)

    def test_model_router_missing_pool(self):
        self.assertCheckFails('hook = { policy = "model_router", options = { models = { m = "nope" } } }',
                              'no pool named nope')
        self.assertCheckFails('hook = { policy = "model_router", options = { models = { m = "llm" }, default = "gone" } }',
                              'options.default: no pool named gone')
        self.assertCheckFails('hook = "model_router"', "options.models must be a table")

    def test_bundled_option_errors(self):
        self.assertCheckFails('hook = { policy = "api_keys", options = { keys_file = "missing.lua" } }',
                              "load_table: cannot open")
        self.assertCheckFails('hook = { policy = "api_keys" }', "options.keys_file")

    def test_config_policies_dir_searched_first(self):
        self.assertCheckFails('hook = { policy = "canary", options = { split = { llm = 1 } } }',
                              "the shadowing canary")

    def test_init_errors_name_the_route(self):
        first = self.assertCheckFails('hook = "init_error"', "init says no")
        self.assertRegex(first, r"policies/route/init_error\.lua:3: init says no")
        self.assertCheckFails('hook = "spin"', "instruction budget")
        self.assertCheckFails('hook = "nohooks"', "must define on_request")
        self.assertCheckFails('hook = "notable"', "must return a table")
        self.assertRegex(self.assertCheckFails('hook = "syntax"', "syntax.lua"), r"syntax\.lua:2:")

    def test_second_route_named(self):
        self.assertCheckFails(GOOD_HOOK, "no pool named nope", route=2,
                              hook2='hook = { policy = "model_router", options = { models = { m = "nope" } } }')

    def test_hook_schema(self):
        path, rc, out, err = self.check("hook = 5")
        self.assertEqual(rc, 1)
        self.assertIn("routes[1].hook: expected a policy name", err)
        path, rc, out, err = self.check('hook = { policy = "model_router", json_max_bytes = -1 }')
        self.assertEqual(rc, 1)
        self.assertIn("routes[1].hook.json_max_bytes", err)
        path, rc, out, err = self.check('hook = { options = {} }')
        self.assertEqual(rc, 1)
        self.assertIn("routes[1].hook.policy", err)


# ---------------------------------------------------------------------------------------
# WebSocket upgrades go through on_request too


WS_HOOK = """local M = {}
function M.on_request(req)
  if req:header("x-deny") then return { status = 403, body = { error = { type = "denied" } } } end
  req:set_header("x-hooked", req.client)
  req:set_path("/stt" .. req.path)
  return req:header("x-pool")
end
function M.on_response(req, res) res:set_header("x-never", "1") end
return M
"""


class RouteHookWebSocketTest(HookCase):
    @classmethod
    def setUpEnv(cls):
        cls.up = {n: h.WsEchoUpstream() for n in ("w1", "w2")}
        for u in cls.up.values():
            cls.env.upstreams.append(u)
        pdir = cls.env.path("wspolicies", "route")
        os.makedirs(pdir)
        with open(os.path.join(pdir, "wsr.lua"), "w") as f:
            f.write(WS_HOOK)
        cfg = h.make_config(
            {n: h.make_pool([u.url]) for n, u in cls.up.items()},
            [{"path": "/v1/listen", "pool": "w1", "hook": "wsr"}],
            policies=cls.env.path("wspolicies"))
        cls.s, cls.port, cls.admin = cls.boot(cfg)

    def session(self, headers):
        import asyncio
        import websockets

        async def go():
            async with websockets.connect("ws://127.0.0.1:%d/v1/listen?lang=en" % self.port,
                                          extra_headers=headers) as ws:
                await ws.send("hello")
                return await ws.recv(), ws.response_headers

        return asyncio.run(go())

    def test_hook_picks_the_pool_and_edits_the_upstream_handshake(self):
        for pool in ("w2", "w1"):
            up = self.up[pool]
            before = len(up.sessions)
            msg, rh = self.session({"x-pool": pool})
            self.assertEqual(msg, "hello")
            self.assertIsNone(rh.get("x-never"))  # on_response does not run for a 101
            self.assertEqual(len(up.sessions), before + 1)
            sess = up.sessions[-1]
            self.assertEqual(sess["path"], "/stt/v1/listen")
            self.assertEqual(sess["headers"].get("x-hooked"), "127.0.0.1")

    def test_direct_answer_refuses_the_upgrade_with_http(self):
        import websockets
        before = sum(len(u.sessions) for u in self.up.values())
        with self.assertRaises(websockets.InvalidStatusCode) as cm:
            self.session({"x-deny": "1"})
        self.assertEqual(cm.exception.status_code, 403)
        self.assertEqual(sum(len(u.sessions) for u in self.up.values()), before)


if __name__ == "__main__":
    unittest.main(verbosity=2)
