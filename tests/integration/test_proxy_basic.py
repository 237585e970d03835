"""Basic proxying: methods and bodies, header rewriting, request ids, Host, routing, HEAD,
204, round robin and upstream keep-alive."""

import os
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402


class ProxyBasicTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        env = cls.env
        cls.a = env.mock("a")
        cls.b = env.mock("b")
        cls.c = env.mock("c")
        cls.d = env.mock("d")
        def hop_handler(up, conn, n, req):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
                         b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                         b"Upgrade: foo\r\nTrailer: X-T\r\nX-Request-Id: upstream-chose-this\r\n"
                         b"Set-Cookie: a=1\r\nX-Kept: k\r\nSet-Cookie: b=2\r\n\r\nok")
            return True

        def close_delimited_handler(up, conn, n, req):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
            conn.sendall(b"hello, ")
            time.sleep(0.02)
            conn.sendall(b"close-delimited world")
            return False

        def early_hints_handler(up, conn, n, req):
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            time.sleep(0.01)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
            return True

        cls.closedelim = env.scripted(close_delimited_handler)
        cls.hints = env.scripted(early_hints_handler)
        cls.e = env.mock("e")
        cls.f = env.mock("f")
        cls.g = env.mock("g")

        cls.scr = env.scripted(hop_handler)
        pools = {
            "scr": h.make_pool([cls.scr.url]),
            "closedelim": h.make_pool([cls.closedelim.url]),
            "hints": h.make_pool([cls.hints.url]),
            "noidle": h.make_pool([cls.e], keepalive={"max_idle": 0}),
            "shortidle": h.make_pool([cls.f], keepalive={"max_idle": 8, "idle_timeout_ms": 200}),
            "shared_noidle": h.make_pool([cls.g], keepalive={"max_idle": 0}),
            "shared_pooled": h.make_pool([cls.g]),
            "li": h.make_pool([cls.a, cls.b, cls.c], balancer="least_inflight"),
            "pa": h.make_pool([cls.a]),
            "pb": h.make_pool([cls.b]),
            "pc": h.make_pool([cls.c]),
            "pd": h.make_pool([cls.d]),
            "rr": h.make_pool([cls.a, cls.b], balancer="round_robin"),
            "keep": h.make_pool([cls.d], preserve_host=True),
        }
        routes = [
            {"path": "/echo", "pool": "pa"},
            {"path": "/echo/b", "pool": "pb"},
            {"path": "/echo/b/c", "pool": "pc"},
            {"path": "/echo/rr", "pool": "rr"},
            {"path": "/echo/keep", "pool": "keep"},
            {"path": "/bytes", "pool": "pa"},
            {"path": "/stream", "pool": "pa"},
            {"path": "/upload", "pool": "pa"},
            {"path": "/v1/chat/completions", "pool": "pa"},
            {"path": "/echo/h", "pool": "pc", "host": "api.example.com"},
            {"path": "/echo/h", "pool": "pd", "host": "*.example.org"},
            {"path": "/hostonly", "pool": "pc", "host": "api.example.com"},
            {"path": "/d", "pool": "pd"},
            {"path": "/scripted", "pool": "scr"},
            {"path": "/closedelim", "pool": "closedelim"},
            {"path": "/hints", "pool": "hints"},
            {"path": "/echo/noidle", "pool": "noidle"},
            {"path": "/echo/shortidle", "pool": "shortidle"},
            {"path": "/echo/shared_noidle", "pool": "shared_noidle"},
            {"path": "/echo/shared_pooled", "pool": "shared_pooled"},
            {"path": "/echo/li", "pool": "li"},
        ]
        cls.sluice = env.sluice(h.make_config(pools, routes))
        cls.port = cls.sluice.port

    def req(self, method, path, headers=None, body=None, host="localhost", version="HTTP/1.1"):
        with h.RawConn(self.port) as c:
            return c.request(method, path, headers, body, version=version, host=host)

    def echo(self, path="/echo", headers=None, body=None, method="GET", host="localhost"):
        r = self.req(method, path, headers, body, host=host)
        self.assertEqual(r.status, 200, r)
        return r, r.json()

    # --- methods and bodies ---------------------------------------------------------------

    def test_get_proxied(self):
        r, e = self.echo("/echo/x?q=1&r=two")
        self.assertEqual(e["method"], "GET")
        self.assertEqual(e["url"], "/echo/x?q=1&r=two")
        self.assertEqual(e["instance"], "a")
        self.assertEqual(e["body_length"], 0)
        self.assertEqual(r.header("x-mock-instance"), "a")
        self.assertEqual(r.header("content-type"), "application/json")

    def test_post_small_body(self):
        body = b'{"hello": "world"}'
        r, e = self.echo("/echo", [("Content-Type", "application/json")], body, method="POST")
        self.assertEqual(e["method"], "POST")
        self.assertEqual(e["body_length"], len(body))
        self.assertEqual(e["body_sha256"], h.sha256(body))
        self.assertEqual(h.echo_header_all(e, "content-length"), [str(len(body))])
        self.assertEqual(h.echo_header_all(e, "content-type"), ["application/json"])

    def test_post_1mib_body(self):
        body = os.urandom(1 << 20)
        for path in ("/echo/big", "/upload"):
            with self.subTest(path=path):
                r = self.req("POST", path, [("Content-Type", "application/octet-stream")], body)
                self.assertEqual(r.status, 200, r)
                e = r.json()
                self.assertEqual(e["body_length"], len(body))
                self.assertEqual(e["body_sha256"], h.sha256(body))

    def test_put_and_delete(self):
        r, e = self.echo("/echo/put", body=b"abc", method="PUT")
        self.assertEqual((e["method"], e["body_length"]), ("PUT", 3))
        r, e = self.echo("/echo/del", method="DELETE")
        self.assertEqual(e["method"], "DELETE")

    def test_large_response_integrity(self):
        n = 3 * 1024 * 1024 + 7
        r = self.req("GET", "/bytes?n=%d" % n)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("content-length"), str(n))
        expected = (bytes(range(251)) * (n // 251 + 1))[:n]
        self.assertEqual(len(r.body), n)
        self.assertTrue(r.body == expected, "body differs from the /bytes pattern")

    def test_chat_completion_json(self):
        r = self.req("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                     b'{"model":"m1","messages":[{"role":"user","content":"hi"}]}')
        self.assertEqual(r.status, 200, r)
        j = r.json()
        self.assertEqual(j["object"], "chat.completion")
        self.assertEqual(j["model"], "m1")

    # --- headers ----------------------------------------------------------------------------

    def test_hop_by_hop_headers_removed(self):
        headers = [
            ("X-Custom", "kept"),
            ("Connection", "keep-alive, X-Drop-Me, x-drop-too"),
            ("X-Drop-Me", "1"),
            ("X-Drop-Too", "2"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Foo"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Authorization", "Bearer kept"),
            ("X-Also-Kept", "yes"),
        ]
        r, e = self.echo("/echo/hop", headers)
        got = {k.lower() for k, _ in h.echo_headers(e)}
        for name in ("connection", "x-drop-me", "x-drop-too", "keep-alive", "proxy-connection",
                     "te", "trailer", "upgrade", "proxy-authorization", "transfer-encoding"):
            self.assertNotIn(name, got, "hop-by-hop header %s forwarded: %r" % (name, e["headers"]))
        self.assertEqual(h.echo_header_all(e, "x-custom"), ["kept"])
        self.assertEqual(h.echo_header_all(e, "authorization"), ["Bearer kept"])
        self.assertEqual(h.echo_header_all(e, "x-also-kept"), ["yes"])

    def test_response_hop_by_hop_headers_removed(self):
        with h.RawConn(self.port) as c:
            for _ in range(2):
                r = c.request("GET", "/scripted")
                self.assertEqual(r.status, 200)
                self.assertEqual(r.body, b"ok")
                self.assertEqual(r.header("x-kept"), "k")
                self.assertEqual(r.header_all("set-cookie"), ["a=1", "b=2"])
                names = {k.lower() for k, _ in r.headers}
                for name in ("x-secret", "keep-alive", "proxy-connection", "upgrade", "trailer"):
                    self.assertNotIn(name, names, r.headers)
                self.assertFalse(r.has_token("connection", "close"))
                self.assertEqual(len(r.header_all("x-request-id")), 1, r.headers)

    def test_upstream_request_id_header_replaced(self):
        # the upstream's own X-Request-Id does not replace (or duplicate) the gateway's
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/scripted", [("X-Request-Id", "client-id-1")])
            self.assertEqual(r.header_all("x-request-id"), ["client-id-1"])

    def test_close_delimited_upstream_response(self):
        with h.RawConn(self.port) as c:
            for i in range(3):
                r = c.request("GET", "/closedelim/%d" % i)
                self.assertEqual(r.status, 200)
                self.assertEqual(r.body, b"hello, close-delimited world")
                # re-framed for the HTTP/1.1 client, so its connection can stay open
                self.assertIn(r.framing, ("chunked", "length"))
                if not r.has_token("connection", "close"):
                    self.assertEqual(c.closed_state(timeout=0.3), ("open", b""),
                                     "client connection cut after a complete response")

    def test_interim_response_from_upstream(self):
        with h.RawConn(self.port) as c:
            for i in range(2):
                r = c.request("GET", "/hints")
                self.assertEqual(r.status, 200)
                self.assertEqual(r.body, b"final")
                for st, _ in r.interim:
                    self.assertEqual(st, 103)

    def test_connection_listed_header_with_several_connection_headers(self):
        headers = [("Connection", "x-one"), ("Connection", "x-two"), ("X-One", "1"), ("X-Two", "2"),
                   ("X-Three", "3")]
        r, e = self.echo("/echo/conn2", headers)
        self.assertEqual(h.echo_header_all(e, "x-one"), [])
        self.assertEqual(h.echo_header_all(e, "x-two"), [])
        self.assertEqual(h.echo_header_all(e, "x-three"), ["3"])

    def test_forwarded_headers_added(self):
        r, e = self.echo("/echo/fwd", host="front.example:8080")
        self.assertEqual(h.echo_header_all(e, "x-forwarded-for"), ["127.0.0.1"])
        self.assertEqual(h.echo_header_all(e, "x-forwarded-proto"), ["http"])
        self.assertEqual(h.echo_header_all(e, "x-forwarded-host"), ["front.example:8080"])

    def test_x_forwarded_for_appended(self):
        r, e = self.echo("/echo/xff", [("X-Forwarded-For", "203.0.113.7")])
        self.assertEqual(h.echo_header_all(e, "x-forwarded-for"), ["203.0.113.7, 127.0.0.1"])

    def test_x_forwarded_for_appended_to_multiple(self):
        # Two X-Forwarded-For fields are one list (RFC 9110 5.3): both hops are kept.
        r, e = self.echo("/echo/xff2", [("X-Forwarded-For", "203.0.113.7"),
                                       ("X-Forwarded-For", "198.51.100.1, 192.0.2.9")])
        self.assertEqual(h.echo_header_all(e, "x-forwarded-for"),
                         ["203.0.113.7, 198.51.100.1, 192.0.2.9, 127.0.0.1"])

    def test_client_forwarded_proto_and_host_replaced(self):
        r, e = self.echo("/echo/fp", [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil")],
                         host="real.example")
        self.assertEqual(h.echo_header_all(e, "x-forwarded-proto"), ["http"])
        self.assertEqual(h.echo_header_all(e, "x-forwarded-host"), ["real.example"])

    def test_header_order_and_duplicates_preserved(self):
        headers = [("X-Multi", "1"), ("X-Other", "o"), ("X-Multi", "2")]
        r, e = self.echo("/echo/dup", headers)
        seen = [(k.lower(), v) for k, v in h.echo_headers(e) if k.lower() in ("x-multi", "x-other")]
        self.assertEqual(seen, [("x-multi", "1"), ("x-other", "o"), ("x-multi", "2")])

    # --- request ids ---------------------------------------------------------------------------

    def test_request_id_generated(self):
        r, e = self.echo("/echo/rid")
        rid = r.header("x-request-id")
        self.assertRegex(rid, h.HEX32_RE)
        self.assertEqual(h.echo_header_all(e, "x-request-id"), [rid])
        r2, _ = self.echo("/echo/rid")
        self.assertNotEqual(r2.header("x-request-id"), rid)

    def test_request_id_propagated(self):
        for rid in ("abc-123", "A.b_c:d-9", "x" * 128):
            with self.subTest(rid=rid):
                r, e = self.echo("/echo/rid", [("X-Request-Id", rid)])
                self.assertEqual(r.header_all("x-request-id"), [rid])
                self.assertEqual(h.echo_header_all(e, "x-request-id"), [rid])

    def test_request_ids_on_one_keepalive_connection(self):
        with h.RawConn(self.port) as c:
            ids = []
            for i in range(3):
                r = c.request("GET", "/echo/ka-rid/%d" % i)
                rid = r.header("x-request-id")
                self.assertRegex(rid, h.HEX32_RE)
                self.assertEqual(h.echo_header_all(r.json(), "x-request-id"), [rid])
                ids.append(rid)
            self.assertEqual(len(set(ids)), 3, "request ids repeat on one connection: %r" % ids)
            for i in range(3):
                rid = "client-%d" % i
                r = c.request("GET", "/echo/ka-rid/c%d" % i, [("X-Request-Id", rid)])
                self.assertEqual(r.header_all("x-request-id"), [rid])
                self.assertEqual(h.echo_header_all(r.json(), "x-request-id"), [rid])
            r = c.request("GET", "/no/route", [("X-Request-Id", "client-404")])
            self.assertEqual(r.json()["error"]["request_id"], "client-404")

    def test_invalid_request_id_replaced(self):
        for rid in ("x" * 129, "has space", "semi;colon", "slash/es", "quote\"d"):
            with self.subTest(rid=rid):
                r, e = self.echo("/echo/rid", [("X-Request-Id", rid)])
                got = r.header_all("x-request-id")
                self.assertEqual(len(got), 1)
                self.assertRegex(got[0], h.HEX32_RE)
                self.assertEqual(h.echo_header_all(e, "x-request-id"), got)

    def test_request_id_on_gateway_errors(self):
        r = self.req("GET", "/no/such/route", [("X-Request-Id", "trace-77")])
        err = self.assertJsonError(r, 404, "route_not_found")
        self.assertEqual(err["request_id"], "trace-77")

    # --- Host ------------------------------------------------------------------------------------

    def test_host_rewritten_to_endpoint(self):
        r, e = self.echo("/echo/host", host="client.example")
        self.assertEqual(h.echo_header_all(e, "host"), ["127.0.0.1:%d" % self.a.port])

    def test_preserve_host(self):
        r, e = self.echo("/echo/keep", host="client.example:1234")
        self.assertEqual(e["instance"], "d")
        self.assertEqual(h.echo_header_all(e, "host"), ["client.example:1234"])

    # --- routing ---------------------------------------------------------------------------------

    def test_longest_prefix_and_segment_boundary(self):
        cases = [
            ("/echo", "a"),
            ("/echo/", "a"),
            ("/echo/x/y", "a"),
            ("/echo/b", "b"),
            ("/echo/b/", "b"),
            ("/echo/b/zz?x=/echo/b/c", "b"),
            ("/echo/bb", "a"),          # not a segment boundary of /echo/b
            ("/echo/b/c", "c"),
            ("/echo/b/c/d", "c"),
            ("/echo/b/cd", "b"),
            ("/echo/b?q=1", "b"),
        ]
        for path, inst in cases:
            with self.subTest(path=path):
                r = self.req("GET", path)
                # the mock answers every path it receives (404 for "/echo/" itself)
                self.assertEqual(r.header("x-mock-instance"), inst, r)
                if path != "/echo/":
                    self.assertEqual(r.status, 200, r)
                    self.assertEqual(r.json()["url"], path)

    def test_no_route_404(self):
        for path in ("/", "/echoes", "/ech", "/nothing/here", "/d0"):
            with self.subTest(path=path):
                r = self.req("GET", path)
                err = self.assertJsonError(r, 404, "route_not_found")
                self.assertIsNone(r.header("x-mock-instance"))
                self.assertTrue(err["message"])

    def test_host_routes(self):
        cases = [
            ("api.example.com", "/echo/h", "c"),
            ("API.Example.COM", "/echo/h/x", "c"),
            ("api.example.com:8080", "/echo/h", "c"),
            ("x.example.org", "/echo/h", "d"),
            ("a.b.example.org", "/echo/h", "d"),
            ("other.example", "/echo/h", "a"),     # falls back to the host-less /echo
            ("api.example.com", "/hostonly/1", "c"),
        ]
        for host, path, inst in cases:
            with self.subTest(host=host, path=path):
                r = self.req("GET", path, host=host)
                # /hostonly is not a mock path: the mock's own 404 still names the instance
                self.assertEqual(r.status, 404 if path.startswith("/hostonly") else 200, r)
                self.assertEqual(r.header("x-mock-instance"), inst)
        for host in ("other.example", "example.com", "api.example.com.evil", "xapi.example.com"):
            with self.subTest(host=host, path="/hostonly"):
                r = self.req("GET", "/hostonly", host=host)
                self.assertJsonError(r, 404, "route_not_found")

    # --- HEAD and bodiless responses ---------------------------------------------------------------

    def test_head_request(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("HEAD", "/bytes?n=1000"))
            r = c.read_response("HEAD")
            self.assertEqual(r.status, 200)
            self.assertEqual(r.header("content-length"), "1000")
            self.assertEqual(r.body, b"")
            # a second request on the same connection: no stray body bytes in between
            c.send(h.build_request("HEAD", "/stream?chunks=3"))
            r = c.read_response("HEAD")
            self.assertEqual(r.status, 200)
            self.assertEqual(r.body, b"")
            r = c.request("GET", "/echo/after-head")
            self.assertEqual(r.status, 200)
            self.assertEqual(r.json()["url"], "/echo/after-head")
            self.assertEqual(c.buf, b"")

    def test_head_for_no_route_has_no_body(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("HEAD", "/nothing"))
            r = c.read_response("HEAD")
            self.assertEqual(r.status, 404)
            r = c.request("GET", "/echo/after")
            self.assertEqual(r.status, 200)

    def test_204_response(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/nc", [("x-mock-status", "204")]))
            r = c.read_response()
            self.assertEqual(r.status, 204)
            self.assertEqual(r.body, b"")
            self.assertIsNone(r.header("transfer-encoding"))
            self.assertIn(r.header("content-length"), (None, "0"))
            self.assertTrue(r.header("x-request-id"))
            r = c.request("GET", "/echo/after-204")
            self.assertEqual(r.status, 200)
            self.assertEqual(r.json()["url"], "/echo/after-204")

    def test_304_response(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/nm", [("x-mock-status", "304")]))
            r = c.read_response()
            self.assertEqual((r.status, r.body), (304, b""))
            self.assertIsNone(r.header("transfer-encoding"))
            r = c.request("GET", "/echo/after-304")
            self.assertEqual(r.json()["url"], "/echo/after-304")

    def test_status_codes_relayed(self):
        for st in (201, 202, 404, 429):
            with self.subTest(status=st):
                r = self.req("GET", "/echo/st", [("x-mock-status", str(st))])
                self.assertEqual(r.status, st)
                self.assertEqual(r.header("x-mock-instance"), "a")

    # --- balancing and upstream connections ----------------------------------------------------------

    def test_round_robin_uses_both(self):
        seen = []
        for i in range(10):
            r = self.req("GET", "/echo/rr/%d" % i)
            self.assertEqual(r.status, 200)
            seen.append(r.header("x-mock-instance"))
        self.assertEqual(sorted(set(seen)), ["a", "b"])
        self.assertEqual(seen.count("a"), 5, seen)
        for x, y in zip(seen, seen[1:]):
            self.assertNotEqual(x, y, "round robin did not alternate: %r" % seen)

    def test_upstream_keepalive_max_idle_zero(self):
        self.e.reset_stats()
        for i in range(5):
            r = self.req("GET", "/echo/noidle/%d" % i)
            self.assertEqual(r.status, 200)
        st = self.e.stats()
        self.assertEqual(st["requests"], 5)
        self.assertEqual(st["connections"], 5 + 1, st)  # + this /stats connection
        h.wait_for(lambda: self.e.stats()["open_connections"] == 1, 3,
                   what="upstream connections closed after use (max_idle = 0)")

    def test_upstream_keepalive_idle_timeout(self):
        r = self.req("GET", "/echo/shortidle/1")
        self.assertEqual(r.status, 200)
        self.assertGreaterEqual(self.f.stats()["open_connections"], 2)  # pooled + /stats
        h.wait_for(lambda: self.f.stats()["open_connections"] == 1, 3, 0.05,
                   what="pooled connection closed after keepalive.idle_timeout_ms")

    def test_pools_sharing_an_endpoint_merge_their_settings(self):
        # Two pools list the same upstream URL: it is one instance with one connection pool,
        # so their keep-alive settings merge (the larger max_idle wins; docs/config.md) and
        # connections are reused whichever pool a request came through.
        self.g.reset_stats()
        for i in range(4):
            self.assertEqual(self.req("GET", "/echo/shared_noidle/%d" % i).status, 200)
        for i in range(4):
            self.assertEqual(self.req("GET", "/echo/shared_pooled/%d" % i).status, 200)
        st = self.g.stats()
        self.assertEqual(st["requests"], 8)
        self.assertEqual(st["connections"], 1 + 1, "shared endpoint did not reuse: %r" % st)

    def test_concurrent_clients(self):
        import threading
        errors = []

        def worker(k):
            try:
                with h.RawConn(self.port, timeout=10) as c:
                    for i in range(15):
                        body = b"%d-%d" % (k, i)
                        r = c.request("POST", "/echo/li/%d/%d" % (k, i), [("x-mock-delay-ms", str(i % 3))], body)
                        if r.status != 200 or r.json()["body_sha256"] != h.sha256(body) \
                                or r.json()["url"] != "/echo/li/%d/%d" % (k, i):
                            errors.append((k, i, r))
            except Exception as e:
                errors.append((k, repr(e)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])

    def test_upstream_keepalive_reuse(self):
        # /d goes only to mock d; nothing else talks to it during this test.
        self.d.reset_stats()
        with h.RawConn(self.port) as c:
            for i in range(100):
                r = c.request("GET", "/d?i=%d" % i)
                self.assertEqual(r.status, 404)  # the mock has no /d; it answers 404 itself
                self.assertEqual(r.header("x-mock-instance"), "d")
        for i in range(100):  # a new client connection each time
            r = self.req("GET", "/d?j=%d" % i)
            self.assertEqual(r.header("x-mock-instance"), "d")
        st = self.d.stats()
        self.assertEqual(st["requests"], 200)
        # stats/reset's own connection may be counted, plus this /stats one
        self.assertLessEqual(st["connections"], 4, st)


if __name__ == "__main__":
    unittest.main()
