"""Client-side connection handling: keep-alive, pipelining, HTTP/1.0, chunked request
bodies and Expect: 100-continue."""

import os
import socket
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402


class KeepalivePipeliningTest(h.SluiceTestCase):

    IDLE_MS = 400

    @classmethod
    def setUpEnv(cls):
        cls.mock = cls.env.mock("m", ["--sse-events", "3", "--sse-interval-ms", "5"])
        pools = {"p": h.make_pool([cls.mock])}
        cls.sluice = cls.env.sluice(h.make_config(pools, [{"path": "/", "pool": "p"}]))
        cls.port = cls.sluice.port
        # a second gateway with a short client idle timeout
        cls.short = cls.env.sluice(h.make_config(pools, [{"path": "/", "pool": "p"}],
                                                 limits={"idle_timeout_ms": cls.IDLE_MS,
                                                         "header_timeout_ms": 3000}))

    def read_in_order(self, c, paths, method="GET"):
        out = []
        for p in paths:
            r = c.read_response(method)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["url"], p)
            out.append(r)
        return out

    # --- keep-alive ---------------------------------------------------------------------------

    def test_many_requests_one_connection(self):
        with h.RawConn(self.port) as c:
            for i in range(150):
                if i % 3 == 2:
                    body = os.urandom(i * 10)
                    r = c.request("POST", "/echo/post/%d" % i, body=body)
                    self.assertEqual(r.status, 200)
                    self.assertEqual(r.json()["body_sha256"], h.sha256(body))
                else:
                    r = c.request("GET", "/echo/get/%d" % i)
                    self.assertEqual(r.status, 200)
                    self.assertEqual(r.json()["url"], "/echo/get/%d" % i)
                self.assertFalse(r.has_token("connection", "close"), r.headers)
            state, extra = c.closed_state(timeout=0.2)
            self.assertEqual((state, extra), ("open", b""))

    def test_pipelined_after_connection_close_ignored(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/last-one", [("Connection", "close")])
                   + h.build_request("GET", "/echo/never"))
            r = c.read_response()
            self.assertEqual(r.json()["url"], "/echo/last-one")
            self.assertTrue(r.has_token("connection", "close"))
            self.assertEqual(c.closed_state(), ("fin", b""))

    def test_upgrade_request_on_plain_route_keeps_connection_usable(self):
        # Upgrade is hop-by-hop; the upstream answers plain HTTP, so the connection goes on
        # as HTTP/1.1.
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/echo/up", [("Connection", "Upgrade"), ("Upgrade", "websocket")])
            self.assertEqual(r.status, 200)
            self.assertEqual(h.echo_header_all(r.json(), "upgrade"), [])
            r = c.request("GET", "/echo/after-upgrade")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["url"], "/echo/after-upgrade")

    def test_connection_close_request(self):
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/echo/close", [("Connection", "close")])
            self.assertEqual(r.status, 200)
            self.assertTrue(r.has_token("connection", "close"), r.headers)
            self.assertEqual(c.closed_state(), ("fin", b""))

    def test_idle_keepalive_connection_closed_after_idle_timeout(self):
        with h.RawConn(self.short.port) as c:
            r = c.request("GET", "/echo/idle")
            self.assertEqual(r.status, 200)
            t0 = time.monotonic()
            state = c.closed_state(timeout=self.IDLE_MS / 1000.0 + 2)
            self.assertEqual(state, ("fin", b""))
            self.assertGreaterEqual(time.monotonic() - t0, self.IDLE_MS / 1000.0 * 0.8)

    def stalled_body(self, together):
        with h.RawConn(self.short.port, timeout=6) as c:
            head = h.build_request("POST", "/echo/stall", [("Content-Length", "100")])
            if together:
                c.send(head + b"only part")
            else:
                c.send(head)
                time.sleep(0.05)
                c.send(b"only part")
            t0 = time.monotonic()
            r = c.read_response("POST")
            elapsed = time.monotonic() - t0
            self.assertEqual(r.status, 408, r)
            self.assertEqual(r.json()["error"]["type"], "request_timeout")
            self.assertTrue(r.has_token("connection", "close"))
            self.assertEqual(c.closed_state(), ("fin", b""))
            # an inactivity timeout (idle_timeout_ms) once the body is arriving
            self.assertLess(elapsed, self.IDLE_MS / 1000.0 + 1.0,
                            "stalled body answered after %.2fs (idle_timeout_ms=%d)" % (elapsed, self.IDLE_MS))

    def test_stalled_request_body_times_out(self):
        self.stalled_body(together=False)

    def test_stalled_request_body_times_out_head_and_body_in_one_segment(self):
        self.stalled_body(together=True)

    def test_body_sent_slowly_within_idle_timeout(self):
        body = b"b" * 1000
        with h.RawConn(self.short.port) as c:
            c.send(h.build_request("POST", "/echo/slow-body", [("Content-Length", str(len(body)))]))
            t0 = time.monotonic()
            for i in range(0, len(body), 100):  # ~1 s in total, but never idle for long
                time.sleep(0.1)
                c.send(body[i:i + 100])
            r = c.read_response()
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["body_sha256"], h.sha256(body))
            self.assertGreater(time.monotonic() - t0, self.IDLE_MS / 1000.0)

    # --- pipelining -----------------------------------------------------------------------------

    def pipeline(self, n):
        paths = ["/echo/pipe/%d/%s" % (i, "x" * i) for i in range(n)]
        data = b"".join(h.build_request("GET", p) for p in paths)
        with h.RawConn(self.port) as c:
            c.send(data)
            self.read_in_order(c, paths)
            r = c.request("GET", "/echo/after")  # the connection is still usable
            self.assertEqual(r.json()["url"], "/echo/after")

    def test_pipelined_3(self):
        self.pipeline(3)

    def test_pipelined_20(self):
        self.pipeline(20)

    def test_pipelined_order_with_slow_first(self):
        # The first request is answered last by the upstream if it were concurrent; the
        # responses must still come back in request order.
        reqs = [("/echo/slow", [("x-mock-delay-ms", "150")]), ("/echo/fast1", []), ("/echo/fast2", [])]
        with h.RawConn(self.port) as c:
            c.send(b"".join(h.build_request("GET", p, hs) for p, hs in reqs))
            self.read_in_order(c, [p for p, _ in reqs])

    def test_pipelined_with_bodies(self):
        bodies = [os.urandom(n) for n in (0, 1, 100, 5000, 70000, 3, 200000, 10)]
        paths = ["/echo/body/%d" % i for i in range(len(bodies))]
        data = b"".join(h.build_request("POST", p, body=b) for p, b in zip(paths, bodies))
        with h.RawConn(self.port) as c:
            c.send(data)
            for p, b in zip(paths, bodies):
                r = c.read_response()
                self.assertEqual(r.status, 200)
                e = r.json()
                self.assertEqual(e["url"], p)
                self.assertEqual(e["body_length"], len(b))
                self.assertEqual(e["body_sha256"], h.sha256(b))

    def test_pipelined_mixed_chunked_and_length(self):
        b1, b2, b3 = b"first body", os.urandom(3000), b"third"
        data = (h.build_request("POST", "/echo/m1", body=b1)
                + h.build_request("POST", "/echo/m2", [("Transfer-Encoding", "chunked")])
                + h.chunked(b2, [1000, 7])
                + h.build_request("GET", "/echo/m3")
                + h.build_request("PUT", "/echo/m4", body=b3))
        with h.RawConn(self.port) as c:
            c.send(data)
            for path, body in (("/echo/m1", b1), ("/echo/m2", b2), ("/echo/m3", b""), ("/echo/m4", b3)):
                r = c.read_response()
                e = r.json()
                self.assertEqual(e["url"], path)
                self.assertEqual(e["body_sha256"], h.sha256(body))

    def test_pipelined_large_input_with_slow_first(self):
        # far more pipelined input than the gateway buffers while busy: reading pauses and
        # resumes, nothing is lost or reordered
        bodies = [bytes([65 + i % 26]) * 20000 for i in range(40)]
        paths = ["/echo/big-pipe/%d" % i for i in range(40)]
        data = h.build_request("GET", "/echo/big-pipe/first", [("x-mock-delay-ms", "100")])
        data += b"".join(h.build_request("POST", p, body=b) for p, b in zip(paths, bodies))
        with h.RawConn(self.port, timeout=10) as c:
            import threading
            sender = threading.Thread(target=c.send, args=(data,))
            sender.start()
            r = c.read_response()
            self.assertEqual(r.json()["url"], "/echo/big-pipe/first")
            for p, b in zip(paths, bodies):
                r = c.read_response()
                e = r.json()
                self.assertEqual((e["url"], e["body_sha256"]), (p, h.sha256(b)))
            sender.join(10)

    def test_pipelined_behind_streamed_response(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/stream?chunks=3&interval_ms=50&size=5")
                   + h.build_request("GET", "/echo/behind-stream")
                   + h.build_request("POST", "/v1/chat/completions", body=b'{"stream":true}')
                   + h.build_request("GET", "/echo/behind-sse"))
            r = c.read_response()
            self.assertEqual(r.body, b"00000" + b"11111" + b"22222")
            self.assertEqual(c.read_response().json()["url"], "/echo/behind-stream")
            r = c.read_response()
            self.assertTrue(r.body.endswith(b"data: [DONE]\n\n"))
            self.assertEqual(c.read_response().json()["url"], "/echo/behind-sse")

    def test_pipelined_head_and_get(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("HEAD", "/bytes?n=777") + h.build_request("GET", "/bytes?n=5")
                   + h.build_request("HEAD", "/stream?chunks=2") + h.build_request("GET", "/echo/last"))
            r = c.read_response("HEAD")
            self.assertEqual((r.status, r.header("content-length"), r.body), (200, "777", b""))
            r = c.read_response()
            self.assertEqual(r.body, bytes(range(5)))
            r = c.read_response("HEAD")
            self.assertEqual((r.status, r.body), (200, b""))
            r = c.read_response()
            self.assertEqual(r.json()["url"], "/echo/last")

    def test_pipelined_split_at_odd_boundaries(self):
        paths = ["/echo/split/%d" % i for i in range(5)]
        data = b"".join(h.build_request("POST", p, body=b"payload-%d" % i) for i, p in enumerate(paths))
        with h.RawConn(self.port) as c:
            step = 7
            for i in range(0, len(data), step):
                c.send(data[i:i + step])
            self.read_in_order(c, paths)

    # --- HTTP/1.0 ----------------------------------------------------------------------------------

    def test_http10_without_keepalive(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/ten", version="HTTP/1.0", host=None))
            r = c.read_response()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.json()["url"], "/echo/ten")
            self.assertEqual(c.closed_state(), ("fin", b""))

    def test_http10_with_host_and_body(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/echo/ten-body", body=b"0123456789", version="HTTP/1.0"))
            r = c.read_response()
            self.assertEqual(r.json()["body_sha256"], h.sha256(b"0123456789"))
            self.assertEqual(c.closed_state(), ("fin", b""))

    def test_http10_keepalive(self):
        with h.RawConn(self.port) as c:
            for i in range(3):
                c.send(h.build_request("GET", "/echo/ka/%d" % i, [("Connection", "keep-alive")],
                                       version="HTTP/1.0"))
                r = c.read_response()
                self.assertEqual(r.status, 200)
                self.assertEqual(r.json()["url"], "/echo/ka/%d" % i)
                # An HTTP/1.0 client only keeps the connection if the response says so.
                self.assertTrue(r.has_token("connection", "keep-alive"),
                                "HTTP/1.0 keep-alive response lacks Connection: keep-alive: %r" % r.headers)
            self.assertEqual(c.closed_state(timeout=0.2), ("open", b""))

    def test_http10_streamed_response_is_close_delimited(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/stream?chunks=4&interval_ms=5&size=10",
                                   [("Connection", "keep-alive")], version="HTTP/1.0"))
            r = c.read_response()
            self.assertEqual(r.status, 200)
            self.assertIsNone(r.header("transfer-encoding"))
            self.assertIsNone(r.header("content-length"))
            self.assertEqual(r.framing, "close")
            self.assertEqual(r.body, b"0" * 10 + b"1" * 10 + b"2" * 10 + b"3" * 10)
            self.assertTrue(c.eof)

    def test_http10_sse_is_close_delimited(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/v1/chat/completions", body=b'{"stream": true}',
                                   version="HTTP/1.0"))
            r = c.read_response()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.framing, "close")
            self.assertTrue(r.body.endswith(b"data: [DONE]\n\n"), r.body[-100:])
            self.assertEqual(r.body.count(b"data: "), 4)

    # --- chunked request bodies ---------------------------------------------------------------------

    def test_chunked_request_bodies(self):
        body = os.urandom(150000)
        cases = {
            "1": [1], "7": [7], "1000": [1000], "65536": [65536], "mixed": [3, 1000, 17, 40000, 1],
        }
        with h.RawConn(self.port) as c:
            for name, sizes in cases.items():
                b = body if sizes[0] >= 1000 or name == "mixed" else body[:3000]
                with self.subTest(sizes=name):
                    c.send(h.build_request("POST", "/echo/chunked/" + name,
                                           [("Transfer-Encoding", "chunked")]) + h.chunked(b, sizes))
                    r = c.read_response()
                    self.assertEqual(r.status, 200, r)
                    e = r.json()
                    self.assertEqual(e["body_length"], len(b))
                    self.assertEqual(e["body_sha256"], h.sha256(b))
                    self.assertEqual(h.echo_header_all(e, "content-length"), [str(len(b))])
                    self.assertEqual(h.echo_header_all(e, "transfer-encoding"), [])

    def test_chunked_with_extensions_trailers_and_uppercase_hex(self):
        body = b"A" * 26 + b"B" * 255
        data = (h.build_request("POST", "/echo/ext", [("Transfer-Encoding", "chunked")])
                + b"1A;name=value\r\n" + b"A" * 26 + b"\r\n"
                + b"FF\r\n" + b"B" * 255 + b"\r\n"
                + b"0\r\nX-Trailer: t\r\n\r\n")
        with h.RawConn(self.port) as c:
            c.send(data)
            r = c.read_response()
            self.assertEqual(r.status, 200, r)
            e = r.json()
            self.assertEqual(e["body_sha256"], h.sha256(body))
            r = c.request("GET", "/echo/after-trailer")
            self.assertEqual(r.json()["url"], "/echo/after-trailer")

    def test_framing_header_variants_accepted(self):
        with h.RawConn(self.port) as c:
            c.send(b"POST /echo/te-case HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\n\r\n")
            self.assertEqual(c.read_response().json()["body_sha256"], h.sha256(b"hello"))
            c.send(b"POST /echo/cl-zeros HTTP/1.1\r\nHost: x\r\nContent-Length: 005\r\n\r\nhello")
            self.assertEqual(c.read_response().json()["body_sha256"], h.sha256(b"hello"))
            c.send(b"POST /echo/cl-ows HTTP/1.1\r\nHost: x\r\nContent-Length:   5  \r\n\r\nhello")
            self.assertEqual(c.read_response().json()["body_sha256"], h.sha256(b"hello"))

    def test_chunked_empty_body(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/echo/empty", [("Transfer-Encoding", "chunked")]) + b"0\r\n\r\n")
            r = c.read_response()
            e = r.json()
            self.assertEqual(e["body_length"], 0)
            self.assertEqual(h.echo_header_all(e, "content-length"), ["0"])

    def test_chunked_body_sent_slowly(self):
        body = b"slowly-but-surely" * 10
        data = h.build_request("POST", "/echo/slow-chunks", [("Transfer-Encoding", "chunked")]) + h.chunked(body, [13])
        with h.RawConn(self.port) as c:
            for i in range(0, len(data), 50):
                c.send(data[i:i + 50])
                time.sleep(0.002)
            r = c.read_response()
            self.assertEqual(r.json()["body_sha256"], h.sha256(body))

    # --- Expect: 100-continue ---------------------------------------------------------------------------

    def test_expect_100_continue(self):
        body = os.urandom(20000)
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/echo/expect",
                                   [("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
            interim = c.read_head(stop_at_interim=True)  # before any body byte is sent
            self.assertEqual(interim.status, 100)
            self.assertEqual(interim.version, "HTTP/1.1")
            c.send(body)
            r = c.read_response()
            self.assertEqual(r.status, 200, r)
            e = r.json()
            self.assertEqual(e["body_sha256"], h.sha256(body))
            self.assertEqual(h.echo_header_all(e, "expect"), [])
            r = c.request("GET", "/echo/after-expect")
            self.assertEqual(r.json()["url"], "/echo/after-expect")

    def test_expect_100_continue_chunked(self):
        body = b"x" * 5000
        with h.RawConn(self.port) as c:
            c.send(h.build_request("POST", "/echo/expect-chunked",
                                   [("Expect", "100-continue"), ("Transfer-Encoding", "chunked")]))
            interim = c.read_head(stop_at_interim=True)
            self.assertEqual(interim.status, 100)
            c.send(h.chunked(body, [999]))
            r = c.read_response()
            self.assertEqual(r.json()["body_sha256"], h.sha256(body))

    def test_expect_100_continue_ignored_for_http10(self):
        # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored
        with h.RawConn(self.port) as c:
            c.send(b"POST /echo/ten-expect HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
            r = c.read_response()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.json()["body_sha256"], h.sha256(b"hello"))
            self.assertEqual(r.interim, [], "100 Continue sent to an HTTP/1.0 client")

    def test_expect_without_body_gets_no_interim(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/expect-nobody", [("Expect", "100-continue")]))
            r = c.read_response()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.interim, [])


if __name__ == "__main__":
    unittest.main()
