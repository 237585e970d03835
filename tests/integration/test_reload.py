"""Hot reload: POST /reload, SIGHUP and file watching build a new generation and swap it in
only when everything loads; a bad config or policy keeps the running one; requests in flight
finish on the generation they started with; reloading under load fails no request."""

import http.client
import os
import re
import signal
import sys
import threading
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402


STICKY = "-- sends everything to endpoint %d\nreturn { pick = function(pool, req) return %d end }\n"
BROKEN = "return { pick = function(pool, req) return 1 end\n"  # syntax error: missing }


def admin_reload(port):
    status, _, body = h.http_request(port, "POST", "/reload")
    return status, body


class LoadGenerator:
    """Keep-alive clients requesting in a loop until stopped; every outcome is counted."""

    def __init__(self, port, clients=4):
        self.port = port
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop_flag.is_set():
            try:
                conn.request("POST", "/echo", body=b"x" * 64, headers={"x-mock-delay-ms": "2"})
                r = conn.getresponse()
                r.read()
                with self.lock:
                    if r.status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(r.status)
            except Exception as e:  # a dropped connection is a failure too
                with self.lock:
                    self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a):
        self.stop_flag.set()
        for t in self.threads:
            t.join(15)


class ReloadTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a = env.mock("a")
        cls.b = env.mock("b")
        cls.policy = env.write("policies/balancer/sticky.lua", STICKY % (1, 1))
        cfg = h.make_config({"p": h.make_pool([cls.a, cls.b], balancer="sticky")},
                            [{"path": "/", "pool": "p"}], policies=env.path("policies"),
                            watch=False)
        cls.s = env.sluice(cfg)
        cls.admin = cls.s.admin_port()

    def instance(self):
        status, headers, _ = h.http_request(self.s.port, "GET", "/echo")
        self.assertEqual(status, 200)
        return h.hdr(headers, "x-mock-instance")

    def set_sticky(self, idx):
        with open(self.policy, "w") as f:
            f.write(STICKY % (idx, idx))
        status, body = admin_reload(self.admin)
        self.assertEqual(status, 200, body)
        return int(re.search(rb'"generation":(\d+)', body).group(1))

    def test_hundred_reloads_under_load(self):
        expected = {1: "a", 2: "b"}
        gens = []
        with LoadGenerator(self.s.port) as load:
            for i in range(100):
                kind = i % 3
                if kind == 1:
                    with open(self.policy, "w") as f:
                        f.write(BROKEN)
                    status, body = admin_reload(self.admin)
                    self.assertEqual(status, 422, body)
                    self.assertIn(b"sticky.lua:", body)  # names the policy file and line
                    self.assertIn(b"pools.p.balancer", body)
                    continue
                target = 1 if kind == 0 else 2
                gens.append(self.set_sticky(target))
                # the behaviour change is visible to the very next request
                self.assertEqual(self.instance(), expected[target])
            # a failed reload keeps the previous behaviour
            with open(self.policy, "w") as f:
                f.write(BROKEN)
            self.assertEqual(admin_reload(self.admin)[0], 422)
            self.assertEqual(self.instance(), expected[target])
            time.sleep(0.05)  # let the load run across the last swap
        self.assertEqual(gens, sorted(gens))
        self.assertEqual(len(set(gens)), len(gens))
        self.assertEqual(load.failures, [], "requests failed during reloads")
        self.assertGreater(load.ok, 100)
        self.set_sticky(1)

    def test_in_flight_request_finishes_on_its_generation(self):
        self.set_sticky(1)
        result = {}

        def slow():
            result["r"] = h.http_request(self.s.port, "GET", "/echo", {"x-mock-delay-ms": "400"})

        t = threading.Thread(target=slow)
        t.start()
        h.wait_for(lambda: self.a.stats()["inflight"] == 1, 3, what="slow request in flight")
        self.set_sticky(2)
        self.assertEqual(self.instance(), "b")
        t.join(5)
        status, headers, _ = result["r"]
        self.assertEqual(status, 200)
        self.assertEqual(h.hdr(headers, "x-mock-instance"), "a")
        self.set_sticky(1)

    def test_bad_config_keeps_running_generation(self):
        self.set_sticky(1)
        with open(self.s.config_path) as f:
            good = f.read()
        try:
            with open(self.s.config_path, "w") as f:
                f.write(good.replace('"sticky"', '"no_such_balancer"'))
            status, body = admin_reload(self.admin)
            self.assertEqual(status, 422)
            self.assertIn(b"pools.p.balancer", body)
            self.assertEqual(self.instance(), "a")
            with open(self.s.config_path, "w") as f:
                f.write(good.replace("return {", "return {\n  bogus_key = 1,"))
            status, body = admin_reload(self.admin)
            self.assertEqual(status, 422)
            self.assertIn(b"sluice.lua:2: bogus_key: unknown key", body)
            self.assertEqual(self.instance(), "a")
        finally:
            with open(self.s.config_path, "w") as f:
                f.write(good)
        self.assertEqual(admin_reload(self.admin)[0], 200)

    def test_admin_endpoints(self):
        status, _, body = h.http_request(self.admin, "GET", "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(h.http_request(self.admin, "GET", "/reload")[0], 405)
        self.assertEqual(h.http_request(self.admin, "GET", "/nope")[0], 404)


class EndpointChangesTest(h.SluiceTestCase):
    """Endpoints added and removed by a reload; endpoint state kept across reloads by URL."""

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a = env.mock("a")
        cls.b = env.mock("b")
        cls.c = env.mock("c")
        cls.bad = env.mock("bad", args=["--fail-rate", "1", "--fail-status", "503"])
        cls.s = env.sluice(cls.config([cls.a, cls.b]))
        cls.admin = cls.s.admin_port()

    @classmethod
    def config(cls, endpoints, breaker_endpoints=None):
        pools = {"p": h.make_pool(endpoints, balancer="round_robin")}
        routes = [{"path": "/", "pool": "p"}]
        if breaker_endpoints:
            pools["br"] = h.make_pool(breaker_endpoints, balancer="round_robin",
                                      breaker={"failures": 2, "open_ms": 60000})
            routes.insert(0, {"path": "/", "host": "br", "pool": "br"})
        return h.config_text(h.make_config(pools, routes, watch=False))

    def reload_with(self, text):
        with open(self.s.config_path, "w") as f:
            f.write(text)
        status, body = admin_reload(self.admin)
        self.assertEqual(status, 200, body)

    def instances(self, n, host=None):
        seen = []
        for _ in range(n):
            status, headers, _ = h.http_request(self.s.port, "GET", "/echo", host=host)
            seen.append((status, h.hdr(headers, "x-mock-instance")))
        return seen

    def test_removed_endpoint_drains_and_added_endpoint_serves(self):
        self.reload_with(self.config([self.a, self.b]))
        result = {}

        def slow_on_b():
            # round robin over a, b: send until one lands on b, slowly
            for _ in range(4):
                r = h.http_request(self.s.port, "GET", "/echo", {"x-mock-delay-ms": "500"})
                if h.hdr(r[1], "x-mock-instance") == "b":
                    result["r"] = r
                    return

        t = threading.Thread(target=slow_on_b)
        t.start()
        h.wait_for(lambda: self.b.stats()["inflight"] == 1, 5, what="slow request on b")
        self.reload_with(self.config([self.a, self.c]))  # b removed, c added
        seen = self.instances(10)
        self.assertEqual({s for s, _ in seen}, {200})
        self.assertEqual({i for _, i in seen}, {"a", "c"})
        t.join(10)
        self.assertEqual(result["r"][0], 200)  # the request on the removed endpoint finished
        h.wait_for(lambda: self.b.stats()["open_connections"] == 1, 5,  # this /stats request
                   what="connections to the removed endpoint closed")
        self.reload_with(self.config([self.a, self.b]))

    def test_breaker_state_survives_reload(self):
        self.reload_with(self.config([self.a, self.b], [self.bad, self.c]))
        self.instances(6, host="br")  # "bad" fails twice: ejected for 60 s
        self.bad.reset_stats()
        self.reload_with(self.config([self.a, self.b], [self.bad, self.c]) + "-- touched\n")
        seen = self.instances(10, host="br")
        self.assertEqual({i for _, i in seen}, {"c"})
        self.assertEqual(self.bad.stats()["requests"], 0, "ejected endpoint got traffic after reload")


class WatchAndSignalTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a = env.mock("a")
        cls.b = env.mock("b")
        cls.policy = env.write("policies/balancer/sticky.lua", STICKY % (1, 1))
        cfg = h.make_config({"p": h.make_pool([cls.a, cls.b], balancer="sticky")},
                            [{"path": "/", "pool": "p"}], policies=env.path("policies"))
        cls.s = env.sluice(cfg)

    def instance(self):
        status, headers, _ = h.http_request(self.s.port, "GET", "/echo")
        return h.hdr(headers, "x-mock-instance")

    def test_file_change_reloads(self):
        mark = self.s.log_mark()
        # editors often write a temporary file and rename it over the original
        tmp = self.policy + ".tmp"
        with open(tmp, "w") as f:
            f.write(STICKY % (2, 2))
        os.rename(tmp, self.policy)
        self.assertIsNotNone(self.s.wait_log(re.compile(r"reload: generation \d+ active"), 5, start=mark))
        self.assertEqual(self.instance(), "b")

        mark = self.s.log_mark()
        with open(self.policy, "w") as f:
            f.write(BROKEN)
        self.assertIsNotNone(self.s.wait_log(re.compile(r"reload failed.*sticky\.lua:\d+"), 5, start=mark))
        self.assertEqual(self.instance(), "b")

        mark = self.s.log_mark()
        with open(self.policy, "w") as f:
            f.write(STICKY % (1, 1))
        self.assertIsNotNone(self.s.wait_log(re.compile(r"reload: generation \d+ active"), 5, start=mark))
        self.assertEqual(self.instance(), "a")

    def test_sighup_reloads(self):
        mark = self.s.log_mark()
        os.kill(self.s.pid, signal.SIGHUP)
        self.assertIsNotNone(self.s.wait_log(re.compile(r"reload: generation \d+ active"), 5, start=mark))
        self.assertTrue(self.s.alive)
        self.assertIn(self.instance(), ("a", "b"))


if __name__ == "__main__":
    unittest.main()
