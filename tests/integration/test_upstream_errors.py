"""Upstream failures become the documented JSON errors (or a cut connection once the
response has started), stale pooled connections are retried, and the gateway keeps
serving through all of it."""

import socket
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

FIRST_BYTE_MS = 300
CONNECT_MS = 300


class UpstreamErrorsTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.good = env.mock("good")
        cls.flaky = env.mock("flaky")
        cls.restartable = env.mock("restart")
        cls.dead_port = h.free_port()

        # Answers the first request on a connection, then closes the connection when the
        # next request arrives, without answering it: a keep-alive race lost every time.
        def stale_handler(up, conn, n, req):
            if n >= 2:
                return False
            body = b"served on a fresh connection"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return True

        def garbage_handler(up, conn, n, req):
            conn.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            return False

        def bad_length_handler(up, conn, n, req):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello")
            return False

        cls.stale = env.scripted(stale_handler)
        cls.garbage = env.scripted(garbage_handler)
        cls.bad_length = env.scripted(bad_length_handler)
        cls.blackhole = cls.make_blackhole()

        to = {"connect": CONNECT_MS, "first_byte": FIRST_BYTE_MS, "total": 0}
        pools = {
            "good": h.make_pool([cls.good], timeout_ms=to),
            "flaky": h.make_pool([cls.flaky], timeout_ms=to),
            "dead": h.make_pool(["http://127.0.0.1:%d" % cls.dead_port], timeout_ms=to),
            "restart": h.make_pool([cls.restartable], timeout_ms=to),
            "stale": h.make_pool([cls.stale.url], timeout_ms=to),
            "garbage": h.make_pool([cls.garbage.url], timeout_ms=to),
            "badlen": h.make_pool([cls.bad_length.url], timeout_ms=to),
            "blackhole": h.make_pool(["http://127.0.0.1:%d" % cls.blackhole_port], timeout_ms=to),
            "tiny": h.make_pool([cls.good], max_inflight=1, queue={"max": 0}),
            "total": h.make_pool([cls.flaky], timeout_ms={"connect": CONNECT_MS, "first_byte": 5000,
                                                          "total": 400}),
        }
        # routed by Host ("<pool>.test") so that upstreams see the plain mock paths
        routes = [{"path": "/", "pool": name, "host": name + ".test"} for name in pools]
        cls.sluice = env.sluice(h.make_config(pools, routes))
        cls.port = cls.sluice.port

    @classmethod
    def make_blackhole(cls):
        """A listening socket whose accept queue is full and never drained: connects to it
        hang in SYN-SENT (Linux drops SYNs once the queue overflows)."""
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        cls.blackhole_port = ls.getsockname()[1]
        cls.blackhole_socks = [ls]
        for _ in range(8):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", cls.blackhole_port))
            cls.blackhole_socks.append(s)
        # is it full? a fresh connect must not complete promptly
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", cls.blackhole_port))
            cls.blackhole_ok = False
        except (socket.timeout, OSError):
            cls.blackhole_ok = True
        finally:
            probe.close()
        return ls

    @classmethod
    def tearDownClass(cls):
        for s in getattr(cls, "blackhole_socks", []):
            s.close()
        super().tearDownClass()

    def req(self, pool, path, headers=None, method="GET", body=None):
        with h.RawConn(self.port, timeout=10) as c:
            t0 = time.monotonic()
            r = c.request(method, path, headers, body, host=pool + ".test")
            r.elapsed = time.monotonic() - t0
            return r

    def tearDown(self):
        # whatever the test did, the gateway still serves
        r = self.req("good", "/echo/alive")
        self.assertEqual(r.status, 200, r)
        self.assertTrue(self.sluice.alive())

    # --- errors before any response byte -------------------------------------------------------

    def test_connect_refused_502(self):
        r = self.req("dead", "/echo", [("X-Request-Id", "dead-1")])
        err = self.assertJsonError(r, 502, "upstream_connect_failed")
        self.assertEqual(err["request_id"], "dead-1")
        self.assertLess(r.elapsed, 2.0)
        # keep-alive: the connection survives a gateway error
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/x", host="dead.test")
            self.assertEqual(r.status, 502)
            r = c.request("GET", "/echo/same-conn", host="good.test")
            self.assertEqual(r.status, 200)

    def test_connect_timeout_504(self):
        if not self.blackhole_ok:
            self.skipTest("cannot make a connect hang on this host")
        r = self.req("blackhole", "/echo")
        self.assertJsonError(r, 504, "upstream_connect_timeout")
        self.assertGreaterEqual(r.elapsed, CONNECT_MS / 1000.0 * 0.9)
        self.assertLess(r.elapsed, CONNECT_MS / 1000.0 + 2.0)

    def test_first_byte_timeout_504(self):
        self.flaky.reset_stats()
        r = self.req("flaky", "/echo/slow", [("x-mock-delay-ms", "3000")])
        self.assertJsonError(r, 504, "upstream_timeout")
        self.assertGreaterEqual(r.elapsed, FIRST_BYTE_MS / 1000.0 * 0.9)
        self.assertLess(r.elapsed, FIRST_BYTE_MS / 1000.0 + 1.5)
        # the upstream request is abandoned, not left running
        h.wait_for(lambda: self.flaky.stats()["aborted"] == 1, 5.0, what="mock saw the abort")

    def test_late_response_not_delivered_to_next_request(self):
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/echo/late", [("x-mock-delay-ms", str(FIRST_BYTE_MS + 150))], host="flaky.test")
            self.assertEqual(r.status, 504)
            time.sleep(0.3)  # the abandoned response would have arrived by now
            for i in range(3):
                r = c.request("GET", "/echo/next/%d" % i, host="flaky.test")
                self.assertEqual(r.status, 200)
                self.assertEqual(r.json()["url"], "/echo/next/%d" % i)

    def test_hang_first_byte_timeout_504(self):
        r = self.req("flaky", "/echo/hang", [("x-mock-action", "hang")])
        self.assertJsonError(r, 504, "upstream_timeout")

    def test_total_timeout_504(self):
        # the response starts in time but does not finish within the total timeout:
        # the head has been sent, so the client connection is cut
        with h.RawConn(self.port, timeout=5) as c:
            t0 = time.monotonic()
            c.send(h.build_request("GET", "/stream?chunks=50&interval_ms=50", host="total.test"))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            with self.assertRaises(h.IncompleteResponse):
                c.read_body(r)
            self.assertLess(time.monotonic() - t0, 2.0)
        # before any byte: a JSON 504
        r = self.req("total", "/echo", [("x-mock-delay-ms", "2000")])
        self.assertJsonError(r, 504, "upstream_timeout")
        self.assertLess(r.elapsed, 1.5)

    def test_upstream_closes_without_response_502(self):
        self.flaky.reset_stats()
        r = self.req("flaky", "/echo/close", [("x-mock-action", "close")])
        self.assertJsonError(r, 502, "upstream_reset")

    def test_upstream_resets_502(self):
        r = self.req("flaky", "/echo/reset", [("x-mock-action", "reset")])
        self.assertJsonError(r, 502, "upstream_reset")

    def test_upstream_garbage_502(self):
        r = self.req("garbage", "/x")
        self.assertJsonError(r, 502, "upstream_protocol_error")

    def test_upstream_conflicting_content_length_502(self):
        r = self.req("badlen", "/x")
        self.assertJsonError(r, 502, "upstream_protocol_error")

    def test_no_endpoint_available_503(self):
        # one endpoint, one slot, no queue: a second concurrent request is refused at once
        with h.RawConn(self.port) as busy:
            busy.send(h.build_request("GET", "/echo/busy", [("x-mock-delay-ms", "800")], host="tiny.test"))
            h.wait_for(lambda: self.good.stats()["inflight"] == 1, 3, what="slot taken")
            r = self.req("tiny", "/echo/refused")
            self.assertJsonError(r, 503, "no_endpoint_available")
            self.assertTrue(r.header("retry-after"), r.headers)
            self.assertLess(r.elapsed, 0.3)
            self.assertEqual(busy.read_response().status, 200)
        # the slot is free again
        self.assertEqual(self.req("tiny", "/echo/free").status, 200)

    # --- errors after the response started ------------------------------------------------------

    def test_partial_response_cuts_client(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/partial", host="flaky.test", headers=[("x-mock-action", "partial")]))
            r = c.read_head()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.header("content-length"), "100")
            with self.assertRaises(h.IncompleteResponse) as cm:
                c.read_body(r)
            self.assertEqual(cm.exception.partial.body, b"0123456789")

    # --- upstream error statuses are relayed -----------------------------------------------------

    def test_5xx_relayed_without_retry(self):
        for status in (500, 503, 502, 504):
            with self.subTest(status=status):
                self.flaky.reset_stats()
                r = self.req("flaky", "/echo/st", [("x-mock-status", str(status))])
                self.assertEqual(r.status, status)
                self.assertEqual(r.header("x-mock-instance"), "flaky")
                self.assertEqual(r.json()["error"]["type"], "mock_status")
                self.assertEqual(self.flaky.stats()["requests"], 1)

    def test_fail_header_relayed(self):
        r = self.req("flaky", "/echo/fail", [("x-mock-fail", "1")])
        self.assertEqual(r.status, 500)
        self.assertEqual(r.json()["error"]["type"], "server_error")

    # --- stale pooled connections ---------------------------------------------------------------

    def test_stale_pooled_connection_retried(self):
        # every reused connection is closed by the upstream on its next request
        for i in range(5):
            r = self.req("stale", "/%d" % i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.body, b"served on a fresh connection")
        # requests 2..5 each went first to the pooled connection (closed unanswered), then
        # were re-sent once on a new connection
        self.assertEqual((self.stale.connections, self.stale.requests), (5, 9))

    def test_upstream_restart(self):
        # Warm several pooled connections, then kill the upstream: every pooled connection
        # is now dead. A new upstream on the same port must serve the next requests with no
        # client-visible error.
        def burst():
            conns = [h.RawConn(self.port) for _ in range(4)]
            try:
                for c in conns:
                    c.send(h.build_request("GET", "/echo/warm", host="restart.test", headers=[("x-mock-delay-ms", "100")]))
                for c in conns:
                    self.assertEqual(c.read_response().status, 200)
            finally:
                for c in conns:
                    c.close()

        burst()
        for round_ in range(2):
            self.restartable.restart()
            for i in range(6):
                r = self.req("restart", "/echo/after/%d/%d" % (round_, i))
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.header("x-mock-instance"), "restart")
            burst()

    def test_upstream_down_then_up(self):
        port = self.restartable.port
        self.assertEqual(self.req("restart", "/echo/1").status, 200)
        self.restartable.kill()
        r = self.req("restart", "/echo/2")
        self.assertJsonError(r, 502)
        self.assertIn(r.json()["error"]["type"], ("upstream_connect_failed", "upstream_reset"))
        self.restartable.restart()
        self.assertEqual(self.restartable.port, port)
        r = self.req("restart", "/echo/3")
        self.assertEqual(r.status, 200, r)


if __name__ == "__main__":
    unittest.main()
