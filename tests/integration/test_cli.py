"""The command line: --version, --help, --check and its error messages, signals and
draining, and policy errors at request time."""

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402


def run(args, cwd=None, timeout=20):
    p = subprocess.run([h.SLUICE_BIN] + args, cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


# A config whose every key sits on its own line, so tests can point at the line of a key.
GOOD_CONFIG = """\
return {
  listen = { "127.0.0.1:0" },
  admin = "127.0.0.1:0",
  policies = "policies",
  limits = {
    max_header_bytes = 32768,
    header_timeout_ms = 10000,
  },
  pools = {
    llm = {
      endpoints = { "http://127.0.0.1:9", { url = "http://127.0.0.1:10", weight = 2 } },
      balancer = "round_robin",
      max_inflight = 0,
      timeout_ms = { connect = 1000, first_byte = 60000, total = 0 },
    },
  },
  routes = {
    { path = "/v1/chat", pool = "llm" },
  },
}
"""


def line_of(text, needle):
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError("%r not in config" % needle)


class CommandLineTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.env = h.Env()
        pol = cls.env.path("cfg", "policies", "balancer")
        os.makedirs(pol)
        for name in ("round_robin", "least_inflight", "random"):
            shutil.copy(os.path.join(h.POLICIES_DIR, "balancer", name + ".lua"), pol)
        with open(os.path.join(pol, "syntax.lua"), "w") as f:
            f.write("-- a policy with a syntax error on line 4\nlocal M = {}\n\nfunction M.pick(pool, req) return = 1 end\n\nreturn M\n")
        cls.cfgdir = cls.env.path("cfg")

    @classmethod
    def tearDownClass(cls):
        cls.env.close()

    def write_config(self, text, name="sluice.lua"):
        p = os.path.join(self.cfgdir, name)
        with open(p, "w") as f:
            f.write(text)
        return p

    def check(self, text, name="bad.lua", cwd="/"):
        path = self.write_config(text, name)
        rc, out, err = run(["--check", "-c", path], cwd=cwd)
        return path, rc, out, err

    def assert_check_error(self, text, key_path, needle, extra=None):
        """--check fails with 'file:line: key.path: ...' where line is the line of needle."""
        path, rc, out, err = self.check(text)
        self.assertEqual(rc, 1, (out, err))
        first = err.strip().splitlines()[0] if err.strip() else ""
        prefix = "%s:%d: %s: " % (path, line_of(text, needle), key_path)
        self.assertTrue(first.startswith(prefix), "expected %r..., got %r" % (prefix, err))
        self.assertGreater(len(first), len(prefix))
        if extra:
            self.assertRegex(first[len(prefix):], extra)
        self.assertNotIn(": ok", out)
        return first

    # --- simple flags ------------------------------------------------------------------------

    def test_version(self):
        rc, out, err = run(["--version"])
        self.assertEqual(rc, 0)
        self.assertRegex(out.strip(), r"^sluice \d+\.\d+\.\d+\S*$")
        rc2, out2, _ = run(["-v"])
        self.assertEqual((rc2, out2), (0, out))

    def test_help(self):
        rc, out, err = run(["--help"])
        self.assertEqual(rc, 0)
        self.assertIn("usage: sluice", out)
        for opt in ("--check", "--log-level", "--version", "-c"):
            self.assertIn(opt, out)

    def test_bad_option(self):
        rc, out, err = run(["--no-such-option"])
        self.assertNotEqual(rc, 0)
        self.assertIn("usage", err)

    def test_bad_log_level(self):
        rc, out, err = run(["--log-level", "chatty", "--version"])
        self.assertNotEqual(rc, 0)
        self.assertIn("chatty", err)

    def test_listen_address_in_use(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        try:
            text = GOOD_CONFIG.replace('"127.0.0.1:0"', '"127.0.0.1:%d"' % port)
            path = self.write_config(text, "inuse.lua")
            rc, out, err = run(["-c", path], timeout=10)
            self.assertEqual(rc, 1, err)
            self.assertIn(str(port), err)
        finally:
            s.close()

    # --- --check ------------------------------------------------------------------------------

    def test_check_ok(self):
        path, rc, out, err = self.check(GOOD_CONFIG, "good.lua")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.strip(), "%s: ok" % path)

    def test_check_ok_relative_policies_resolved_from_config_dir(self):
        # cwd is / : "policies" must be found next to the config file, not in the cwd
        path, rc, out, err = self.check(GOOD_CONFIG, "good2.lua", cwd="/")
        self.assertEqual(rc, 0, err)

    def test_check_unknown_key(self):
        text = GOOD_CONFIG.replace("      max_inflight = 0,\n", "      max_inflight = 0,\n      max_inflite = 3,\n")
        self.assert_check_error(text, "pools.llm.max_inflite", "max_inflite", "unknown key")

    def test_check_unknown_top_level_key(self):
        text = GOOD_CONFIG.replace("  policies = \"policies\",\n", "  policies = \"policies\",\n  poolz = {},\n")
        self.assert_check_error(text, "poolz", "poolz =")

    def test_check_wrong_type(self):
        text = GOOD_CONFIG.replace("max_inflight = 0", "max_inflight = \"four\"")
        self.assert_check_error(text, "pools.llm.max_inflight", "max_inflight", "expected")

    def test_check_wrong_type_nested(self):
        text = GOOD_CONFIG.replace("    header_timeout_ms = 10000,", "    header_timeout_ms = true,")
        self.assert_check_error(text, "limits.header_timeout_ms", "header_timeout_ms", "expected")

    def test_check_dangling_pool(self):
        text = GOOD_CONFIG.replace('{ path = "/v1/chat", pool = "llm" }', '{ path = "/v1/chat", pool = "nope" }')
        path, rc, out, err = self.check(text)
        self.assertEqual(rc, 1)
        self.assertRegex(err.strip().splitlines()[0],
                         r'^%s:%d: routes(\[1\]|\.1)\.pool: .*nope'
                         % (re.escape(path), line_of(text, 'pool = "nope"')))

    def test_check_bad_url_scheme(self):
        text = GOOD_CONFIG.replace('"http://127.0.0.1:9"', '"ftp://127.0.0.1:9"')
        path, rc, out, err = self.check(text)
        self.assertEqual(rc, 1)
        self.assertRegex(err.strip().splitlines()[0],
                         r"^%s:%d: pools\.llm\.endpoints(\[1\]|\.1)(\.url)?: expected"
                         % (re.escape(path), line_of(text, "ftp://")))

    def test_check_bad_url_port(self):
        text = GOOD_CONFIG.replace('"http://127.0.0.1:9"', '"http://127.0.0.1:99999"')
        path, rc, out, err = self.check(text)
        self.assertEqual(rc, 1)
        self.assertRegex(err, r"^%s:%d: pools\.llm\.endpoints" % (re.escape(path), line_of(text, "99999")))

    def test_check_missing_balancer_policy(self):
        text = GOOD_CONFIG.replace('balancer = "round_robin"', 'balancer = "no_such_balancer"')
        first = self.assert_check_error(text, "pools.llm.balancer", "no_such_balancer")
        self.assertIn("no_such_balancer", first)

    def test_check_policy_syntax_error(self):
        text = GOOD_CONFIG.replace('balancer = "round_robin"', 'balancer = "syntax"')
        path, rc, out, err = self.check(text)
        self.assertEqual(rc, 1)
        # names the policy file and the line of the error
        self.assertRegex(err, r"policies/balancer/syntax\.lua:4:")

    def test_check_lua_syntax_error_in_config(self):
        text = GOOD_CONFIG.replace("max_inflight = 0,", "max_inflight = 0,,")
        path, rc, out, err = self.check(text)
        self.assertEqual(rc, 1)
        self.assertIn("%s:%d:" % (os.path.basename(path), line_of(text, ",,")), err)

    def test_check_missing_file(self):
        rc, out, err = run(["--check", "-c", self.env.path("does-not-exist.lua")])
        self.assertEqual(rc, 1)
        self.assertIn("does-not-exist.lua", err)

    def test_start_with_bad_config_fails(self):
        path = self.write_config(GOOD_CONFIG.replace("max_inflight = 0", "max_inflight = -1"), "bad-start.lua")
        rc, out, err = run(["-c", path], timeout=10)
        self.assertEqual(rc, 1)
        self.assertIn("pools.llm.max_inflight", err)


class SignalsTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.mock = cls.env.mock("m")

    def start(self, drain_ms=10000):
        cfg = h.make_config({"p": h.make_pool([self.mock])}, [{"path": "/", "pool": "p"}],
                            limits={"drain_timeout_ms": drain_ms})
        return self.env.sluice(cfg)

    def test_sigterm_finishes_in_flight_request(self):
        self.mock.reset_stats()
        s = self.start()
        idle = h.RawConn(s.port)  # an idle keep-alive connection must not hold up the exit
        self.addCleanup(idle.close)
        self.assertEqual(idle.request("GET", "/echo/idle").status, 200)
        result = {}

        def client():
            try:
                with h.RawConn(s.port, timeout=10) as c:
                    result["resp"] = c.request("GET", "/echo/slow", [("x-mock-delay-ms", "800")])
                    result["after"] = c.closed_state(timeout=3)
            except Exception as e:  # reported below
                result["error"] = e

        t = threading.Thread(target=client)
        t.start()
        h.wait_for(lambda: self.mock.stats()["inflight"] == 1, 5, what="request in flight at the mock")
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        self.assertIsNotNone(s.wait_log(r"SIGTERM|draining", 5), s.log_text())
        # no longer accepting
        h.wait_for(lambda: self.refused(s.port), 2, what="listener closed")
        self.assertEqual(idle.closed_state(timeout=2), ("fin", b""))
        t.join(10)
        self.assertNotIn("error", result, result.get("error"))
        r = result["resp"]
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()["url"], "/echo/slow")
        self.assertTrue(r.has_token("connection", "close"), r.headers)
        self.assertEqual(result["after"], ("fin", b""))
        rc = s.wait_exit(timeout=10)  # exits by itself once drained
        self.assertEqual(rc, 0, s.log_text())
        self.assertLess(time.monotonic() - t0, 5)

    def refused(self, port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True

    def test_sigint_idle_exits_promptly(self):
        s = self.start()
        # One request first, so the event loop (and its signal handlers) is surely running:
        # the "listening" line comes before the handlers are installed.
        with h.RawConn(s.port) as c:
            self.assertEqual(c.request("GET", "/echo/up").status, 200)
        t0 = time.monotonic()
        rc = s.stop(sig=signal.SIGINT, timeout=10)
        self.assertEqual(rc, 0, s.log_text())
        self.assertLess(time.monotonic() - t0, 2)

    def test_drain_timeout_bounds_shutdown(self):
        s = self.start(drain_ms=300)
        c = h.RawConn(s.port, timeout=10)
        self.addCleanup(c.close)
        c.send(h.build_request("GET", "/echo/very-slow", [("x-mock-delay-ms", "5000")]))
        h.wait_for(lambda: self.mock.stats()["inflight"] >= 1, 5, what="request in flight")
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rc = s.wait_exit(timeout=10)
        elapsed = time.monotonic() - t0
        self.assertEqual(rc, 0, s.log_text())
        self.assertLess(elapsed, 2.5, "shutdown took %.1fs with drain_timeout_ms=300" % elapsed)


class PolicyErrorTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.mock = env.mock("m")
        env.write("policies/balancer/boom.lua", 'return { pick = function() error("boom") end }\n')
        shutil.copy(os.path.join(h.POLICIES_DIR, "balancer", "round_robin.lua"), env.path("policies/balancer"))
        env.write("policies/balancer/badret.lua", "return { pick = function() return 42 end }\n")
        env.write("policies/balancer/badtype.lua", 'return { pick = function() return "one" end }\n')
        pools = {
            "boom": h.make_pool([cls.mock], balancer="boom"),
            "badret": h.make_pool([cls.mock], balancer="badret"),
            "badtype": h.make_pool([cls.mock], balancer="badtype"),
            "ok": h.make_pool([cls.mock], balancer="round_robin"),
        }
        routes = [{"path": "/boom", "pool": "boom"}, {"path": "/badret", "pool": "badret"},
                  {"path": "/badtype", "pool": "badtype"}, {"path": "/", "pool": "ok"}]
        cls.sluice = env.sluice(h.make_config(pools, routes, policies=env.path("policies")))
        cls.port = cls.sluice.port

    def test_policy_error_is_500_and_process_lives(self):
        mark = self.sluice.log_mark()
        for i in range(3):
            with h.RawConn(self.port) as c:
                r = c.request("GET", "/boom/x", [("X-Request-Id", "boom-%d" % i)])
                err = self.assertJsonError(r, 500, "policy_error")
                self.assertEqual(err["request_id"], "boom-%d" % i)
        # one keep-alive connection: failing and healthy pools interleaved
        with h.RawConn(self.port) as c:
            for i in range(3):
                self.assertJsonError(c.request("GET", "/boom/y"), 500, "policy_error")
                self.assertEqual(c.request("GET", "/echo/ok").status, 200)
        self.assertTrue(self.sluice.alive())
        # the log names the policy file and line
        self.assertIsNotNone(self.sluice.wait_log(r"boom\.lua:1", 2, start=mark), self.sluice.log_text())

    def test_bad_pick_results_are_policy_errors(self):
        for path in ("/badret", "/badtype"):
            with self.subTest(path=path):
                with h.RawConn(self.port) as c:
                    r = c.request("GET", path)
                    self.assertJsonError(r, 500, "policy_error")
        with h.RawConn(self.port) as c:
            self.assertEqual(c.request("GET", "/echo/still-ok").status, 200)


class RunawayPolicyTest(h.SluiceTestCase):
    """DESIGN.md: a runaway loop in a policy is stopped (instruction budget) and counts as
    a policy error."""

    stuck_sluice_ok = True  # if the loop is never stopped, SIGTERM cannot be handled

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.mock = env.mock("m")
        env.write("policies/balancer/spin.lua", "return { pick = function() while true do end end }\n")
        shutil.copy(os.path.join(h.POLICIES_DIR, "balancer", "round_robin.lua"), env.path("policies/balancer"))
        pools = {"spin": h.make_pool([cls.mock], balancer="spin"),
                 "ok": h.make_pool([cls.mock], balancer="round_robin")}
        routes = [{"path": "/spin", "pool": "spin"}, {"path": "/", "pool": "ok"}]
        cls.sluice = env.sluice(h.make_config(pools, routes, policies=env.path("policies")))
        cls.port = cls.sluice.port


    def test_runaway_policy_is_stopped(self):
        with h.RawConn(self.port, timeout=3) as c:
            try:
                r = c.request("GET", "/spin")
            except socket.timeout:
                self.fail("a policy looping forever hangs the gateway (no instruction budget)")
            self.assertJsonError(r, 500, "policy_error")
        with h.RawConn(self.port, timeout=3) as c:
            self.assertEqual(c.request("GET", "/echo/ok").status, 200)


if __name__ == "__main__":
    unittest.main()
