"""An endpoint killed under load: with retries and a breaker configured, clients see no error
while a healthy endpoint exists, traffic moves to the survivors, and the dead endpoint is
ejected; when it comes back it is probed and rejoins."""

import http.client
import re
import sys
import threading
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402


class Load:
    """Keep-alive clients sending POSTs until stopped; every non-200 or error is recorded."""

    def __init__(self, port, clients=6):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.by_instance = {}
        self.failures = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("POST", "/echo", body=b'{"audio":"..."}',
                             headers={"x-mock-delay-ms": "5"})
                r = conn.getresponse()
                r.read()
                with self.lock:
                    if r.status == 200:
                        self.ok += 1
                        inst = r.getheader("x-mock-instance")
                        self.by_instance[inst] = self.by_instance.get(inst, 0) + 1
                    else:
                        self.failures.append(r.status)
            except Exception as e:
                with self.lock:
                    self.failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def snapshot(self):
        with self.lock:
            return self.ok, dict(self.by_instance)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        for t in self.threads:
            t.join(15)


class FailoverTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.m = [env.mock("s%d" % i) for i in range(3)]
        pool = h.make_pool(cls.m, balancer="least_queue",
                           retry={"attempts": 3, "retry_on": ["connect_error", "reset", 502, 503]},
                           breaker={"policy": "consecutive", "failures": 3, "open_ms": 300})
        cls.s = env.sluice(h.make_config({"stt": pool}, [{"path": "/", "pool": "stt"}],
                                         watch=False))

    def test_endpoint_killed_and_restarted_under_load(self):
        victim = self.m[1]
        with Load(self.s.port) as load:
            h.wait_for(lambda: load.snapshot()[0] > 200, 10, what="load running")
            mark = self.s.log_mark()
            victim.kill()
            self.assertIsNotNone(self.s.wait_log(re.compile(r"breaker open: %s" % re.escape(victim.url)),
                                                 5, start=mark))
            # while it is dead, the survivors take everything
            _, before = load.snapshot()
            h.wait_for(lambda: load.snapshot()[0] > sum(before.values()) + 300, 10, what="more load")
            _, after = load.snapshot()
            self.assertEqual(after.get("s1", 0), before.get("s1", 0))
            # it comes back: probed after open_ms, closed, and gets traffic again
            mark = self.s.log_mark()
            victim.restart()
            self.assertIsNotNone(self.s.wait_log(re.compile(r"breaker closed: %s" % re.escape(victim.url)),
                                                 10, start=mark))
            h.wait_for(lambda: load.snapshot()[1].get("s1", 0) > after.get("s1", 0) + 20, 10,
                       what="restarted endpoint back in rotation")
        self.assertEqual(load.failures, [], "clients saw errors while healthy endpoints existed")
        self.assertGreater(load.ok, 500)


if __name__ == "__main__":
    unittest.main()
