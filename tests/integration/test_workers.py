"""workers = N: N event loops with their own Lua VM and pools, all accepting on the same
ports (SO_REUSEPORT). A reload reaches every worker; /metrics sums them; SIGTERM drains all."""

import os
import re
import socket
import sys
import threading
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

CLIENTS = 8
PER_CLIENT = 150


def scrape(admin):
    status, _, body = h.http_request(admin, "GET", "/metrics")
    assert status == 200, body
    return body.decode()


def metric(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all('%s="%s"' % (k, v) in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class WorkersTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.up1, cls.up2 = env.mock("a"), env.mock("b")
        cls.cfg = h.make_config({"p": h.make_pool([cls.up1, cls.up2])}, [{"path": "/", "pool": "p"}],
                                workers=2, watch=False)
        cls.s = env.sluice(cls.cfg)
        cls.admin = cls.s.admin_port()

    def test_reload_under_load_fails_nothing_and_metrics_add_up(self):
        before = metric(scrape(self.admin), "sluice_requests_total", route="/", code="2xx")
        failures, done = [], []
        half = threading.Barrier(CLIENTS + 1)

        def client(i):
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", self.s.port, timeout=10)
            for j in range(PER_CLIENT):
                if j == PER_CLIENT // 2:
                    half.wait()  # every client is mid-run when the reload happens
                try:
                    conn.request("GET", "/echo/%d/%d" % (i, j))
                    r = conn.getresponse()
                    r.read()
                    if r.status != 200:
                        failures.append((i, j, r.status))
                except Exception as e:  # noqa: BLE001 - any failure counts
                    failures.append((i, j, repr(e)))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.s.port, timeout=10)
            conn.close()
            done.append(i)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        half.wait()
        status, _, body = h.http_request(self.admin, "POST", "/reload")
        self.assertEqual(status, 200, body)
        for t in threads:
            t.join(60)
        self.assertEqual(len(done), CLIENTS)
        self.assertEqual(failures, [])
        sent = CLIENTS * PER_CLIENT
        # thread workers refresh nothing that counters depend on: counters are exact at once
        after = metric(scrape(self.admin), "sluice_requests_total", route="/", code="2xx")
        self.assertEqual(after - before, sent)
        text = scrape(self.admin)
        self.assertEqual(metric(text, "sluice_request_duration_seconds_count", route="/"), after)
        # both upstreams saw the requests the gateway counted
        seen = sum(int(h.http_request(u.port, "GET", "/stats")[2].split(b'"requests":')[1].split(b",")[0])
                   for u in (self.up1, self.up2))
        self.assertGreaterEqual(seen, sent)

    def test_status_sums_inflight_over_workers(self):
        import json
        conns = []
        for i in range(6):  # on separate connections, so both workers get some
            c = socket.create_connection(("127.0.0.1", self.s.port), timeout=10)
            c.sendall(b"GET /echo/slow%d HTTP/1.1\r\nHost: x\r\nx-mock-delay-ms: 3000\r\n\r\n" % i)
            conns.append(c)

        def inflight():
            body = h.http_request(self.admin, "GET", "/status")[2]
            pool = json.loads(body)["pools"][0]
            return pool["active"], sum(e["inflight"] for e in pool["endpoints"])

        h.wait_for(lambda: inflight() == (6, 6), 5, what="6 requests in flight over both workers")
        for c in conns:
            c.close()

    def test_both_workers_listen_on_the_port(self):
        # SO_REUSEPORT: the port is bound by one socket per worker. The second worker's thread
        # may still be starting when the first logs "listening on": wait for its socket.
        def sockets():
            return os.popen("ss -Hltn 'sport = :%d'" % self.s.port).read().strip().splitlines()

        h.wait_for(lambda: len(sockets()) >= 2, 10, what="a listening socket per worker")
        self.assertEqual(len(sockets()), 2, sockets())


if __name__ == "__main__":
    unittest.main()
