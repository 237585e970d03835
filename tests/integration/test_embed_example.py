"""examples/embed: a host program with its own libuv loop runs sluice and registers a
primitive of its own (per-tenant quotas, sluice.ext.quota_take / quota_peek) that the route
policy examples/embed/policies/route/tenant_quota.lua calls. The real example binary, its
real policy, the mock upstream; workers = 2 so the host function is called from two threads.
"""

import os
import signal
import subprocess
import threading
import unittest

import harness
from harness import SOURCE_DIR, hdr, http_request, wait_for

EMBED_BIN = os.environ.get("SLUICE_EMBED_BIN") or "/tmp/itb/examples/embed/sluice-embed-example"
EMBED_POLICIES = os.path.join(SOURCE_DIR, "examples", "embed", "policies")

QUOTA = 3


def config(mock_url, route_extra=""):
    return """return {
  listen = { "127.0.0.1:0" }, admin = false, workers = 2, watch = false,
  policies = %r,
  pools = { llm = { endpoints = { %r }, retry = false } },
  routes = {
    { path = "/echo", pool = "llm", hook = { policy = "tenant_quota", options = { tenant_header = "x-tenant-id" } } },
    %s
  },
}
""" % (EMBED_POLICIES, mock_url, route_extra)


class Host:
    def __init__(self, env, cfg_text, quota=QUOTA):
        self.dir = env.path("host")
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "gateway.lua")
        with open(self.config, "w") as f:
            f.write(cfg_text)
        self.port_file = os.path.join(self.dir, "port")
        self.log_path = os.path.join(self.dir, "stderr.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([EMBED_BIN, "-c", self.config, "--quota", str(quota),
                                      "--window-s", "3600", "--port-file", self.port_file],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("host exited with %s: %s" % (self.proc.returncode, self.text()))
            try:
                with open(self.port_file) as f:
                    t = f.read().strip()
            except FileNotFoundError:
                return None
            return int(t) if t.isdigit() else None

        self.port = wait_for(ready, 10, what="embed host port file")

    def text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def get(self, path="/echo", tenant=None):
        h = {"x-tenant-id": tenant} if tenant is not None else {}
        return http_request(self.port, "GET", path, headers=h)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


class EmbedExample(harness.SluiceTestCase):
    @classmethod
    def setUpEnv(cls):
        cls.mock = cls.env.mock("up")
        cls.host = Host(cls.env, config(cls.mock.url))

    @classmethod
    def tearDownClass(cls):
        rc = cls.host.stop()
        super().tearDownClass()
        if rc != 0:
            raise AssertionError("host exited %s on SIGTERM:\n%s" % (rc, cls.host.text()))

    def test_1_quota_counts_down_then_429(self):
        self.mock.reset_stats()
        for left in range(QUOTA - 1, -1, -1):
            st, hs, body = self.host.get(tenant="acme")
            self.assertEqual(st, 200, body)
            self.assertEqual(hdr(hs, "x-ratelimit-remaining"), str(left))
        st, hs, body = self.host.get(tenant="acme")
        self.assertEqual(st, 429, body)
        self.assertEqual(hdr(hs, "content-type"), "application/json")
        self.assertTrue(1 <= int(hdr(hs, "retry-after")) <= 3600)
        err = harness.json.loads(body)["error"]
        self.assertEqual(err["type"], "quota_exceeded")
        self.assertEqual(err["request_id"], hdr(hs, "x-request-id"))
        # Rejected requests never reached the upstream.
        self.assertEqual(self.mock.stats()["requests"], QUOTA)

    def test_2_tenants_are_separate(self):
        st, hs, _ = self.host.get(tenant="globex")
        self.assertEqual(st, 200)
        self.assertEqual(hdr(hs, "x-ratelimit-remaining"), str(QUOTA - 1))

    def test_3_no_tenant_is_401(self):
        st, hs, body = self.host.get()
        self.assertEqual(st, 401)
        self.assertEqual(harness.json.loads(body)["error"]["type"], "tenant_required")

    def test_4_shared_across_worker_threads(self):
        # 8 clients at once, 5 requests each, one tenant: exactly QUOTA get through whichever
        # worker thread serves them (the host's table is shared and locked).
        results = []
        lock = threading.Lock()

        def client():
            for _ in range(5):
                st, _, _ = self.host.get(tenant="initech")
                with lock:
                    results.append(st)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(results), 40)
        self.assertEqual(results.count(200), QUOTA)
        self.assertEqual(results.count(429), 40 - QUOTA)

    def test_5_sighup_reloads_and_a_bad_reload_keeps_running(self):
        st, _, _ = self.host.get("/echo/open/x")  # under the quota route for now
        self.assertEqual(st, 401)
        with open(self.host.config, "w") as f:
            f.write(config(self.mock.url, '{ path = "/echo/open", pool = "llm" },'))
        self.host.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded (generation 2)" in self.host.text(), 10, what="reload")
        st, _, _ = self.host.get("/echo/open/x")
        self.assertEqual(st, 200)
        with open(self.host.config, "w") as f:
            f.write(config(self.mock.url, '{ path = "/echo/open", pool = "nope" },'))
        self.host.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in self.host.text(), 10, what="failed reload")
        self.assertIn("routes[2].pool", self.host.text())
        st, _, _ = self.host.get("/echo/open/x")
        self.assertEqual(st, 200)
        st, _, _ = self.host.get(tenant="acme")  # quota state outlives reloads (host-owned)
        self.assertEqual(st, 429)


class PolicyNeedsTheHost(harness.SluiceTestCase):
    def test_plain_sluice_refuses_the_policy_with_a_clear_message(self):
        path = self.env.write("gw.lua", config("http://127.0.0.1:9"))
        p = subprocess.run([harness.SLUICE_BIN, "--check", "-c", path], capture_output=True,
                           text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("routes[1].hook", p.stderr + p.stdout)
        self.assertIn("sluice.ext.quota_take", p.stderr + p.stdout)


if __name__ == "__main__":
    unittest.main(verbosity=2)
