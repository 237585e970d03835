#!/usr/bin/env python3
"""How sluice frames upstream responses that have no body or no length (RFC 9112 6.3):
204 and 304 never have a body whatever Content-Length says, neither do interim 1xx responses
or the answer to HEAD; a response without Content-Length or chunked coding ends when the
upstream closes. Each case is followed by another request on the same client connection, and
where the upstream keeps its connection open, on the same upstream connection: a misframed
response shows as a hang or as one response's bytes read as the next one's."""

import unittest

import harness as h

ROUTES = {
    "/204": b"HTTP/1.1 204 No Content\r\nContent-Length: 40\r\nX-Case: 204\r\n\r\n",
    "/304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: \"v1\"\r\nX-Case: 304\r\n\r\n",
    "/103": (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nContent-Length: 9\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Case: 103\r\n\r\nfinal"),
    "/1xx-twice": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </b>\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Case: 1xx\r\n\r\nok"),
    "/plain": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Case: plain\r\n\r\nplain",
    "/trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
                  b"2\r\nok\r\n0\r\nX-T: 1\r\n\r\n"),
    # Codings other than chunked would reach the client applied but unannounced
    # (Transfer-Encoding is hop-by-hop): refused, as nginx does.
    "/te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8bnot-really-gzip",
    "/te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "/te-twice": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n"),
    "/te-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    # Hop-by-hop headers named in any of several Connection headers are dropped.
    "/two-connection": (b"HTTP/1.1 200 OK\r\nConnection: X-Gone\r\nX-Gone: 1\r\nX-Stay: 2\r\n"
                        b"Connection: keep-alive, X-Also\r\nX-Also: 3\r\nContent-Length: 2\r\n\r\nok"),
    "/huge-head": b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"b" * 300000 + b"\r\nContent-Length: 2\r\n\r\nok",
}
CLOSE_AFTER = {"/te-gzip"}
HEAD_LEN = 1234


def handler(up, conn, n, req):
    method, target, headers, body = req
    if target == "/head":
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Case: head\r\n\r\n" % HEAD_LEN
        conn.sendall(resp if method == "HEAD" else resp + b"h" * HEAD_LEN)
        return True
    if target == "/until-close":
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until the close")
        return False
    try:
        conn.sendall(ROUTES.get(target, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    except OSError:  # sluice stops reading a response it refused
        return False
    return target not in CLOSE_AFTER


class ResponseFramingTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.up = cls.env.scripted(handler)
        pools = {"up": h.make_pool([cls.up.url], retry=False,
                                   timeout_ms={"connect": 2000, "first_byte": 3000, "total": 3000})}
        cls.sluice = cls.env.sluice(h.make_config(pools, [{"path": "/", "pool": "up"}]))
        cls.port = cls.sluice.port

    def pair(self, method, path):
        """method path, then GET /plain, on one client connection; both must complete."""
        conns = self.up.connections
        with h.RawConn(self.port, timeout=2) as c:
            first = c.request(method, path)
            second = c.request("GET", "/plain")
        self.assertEqual(second.status, 200, path)
        self.assertEqual(second.body, b"plain", path)
        self.assertEqual(h.hdr(second.headers, "x-case"), "plain")
        return first, self.up.connections - conns

    def test_204_with_content_length_has_no_body(self):
        r, opened = self.pair("GET", "/204")
        self.assertEqual(r.status, 204)
        self.assertEqual(r.body, b"")
        self.assertIsNone(h.hdr(r.headers, "content-length"))
        self.assertIsNone(h.hdr(r.headers, "transfer-encoding"))
        self.assertLessEqual(opened, 1, "the upstream connection was not reused after a 204")

    def test_304_with_content_length_has_no_body(self):
        r, opened = self.pair("GET", "/304")
        self.assertEqual(r.status, 304)
        self.assertEqual(r.body, b"")
        self.assertEqual(h.hdr(r.headers, "etag"), '"v1"')
        self.assertIsNone(h.hdr(r.headers, "transfer-encoding"))
        self.assertLessEqual(opened, 1, "the upstream connection was not reused after a 304")

    def test_many_bodiless_responses_on_one_connection(self):
        conns = self.up.connections
        with h.RawConn(self.port, timeout=2) as c:
            for i in range(10):
                path = ("/204", "/304", "/plain")[i % 3]
                r = c.request("GET", path)
                self.assertEqual(r.status, int(path[1:]) if path != "/plain" else 200, i)
        self.assertLessEqual(self.up.connections - conns, 1)

    def test_interim_response_with_content_length_is_skipped(self):
        r, opened = self.pair("GET", "/103")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"final")
        self.assertEqual(h.hdr(r.headers, "x-case"), "103")

    def test_two_interim_responses_then_final(self):
        r, _ = self.pair("GET", "/1xx-twice")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"ok")

    def test_head_keeps_content_length_and_sends_no_body(self):
        r, opened = self.pair("HEAD", "/head")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")
        self.assertEqual(h.hdr(r.headers, "content-length"), str(HEAD_LEN))
        self.assertLessEqual(opened, 1)
        with h.RawConn(self.port, timeout=2) as c:
            r = c.request("GET", "/head")
            self.assertEqual(len(r.body), HEAD_LEN)

    def test_close_delimited_body_is_chunked_to_http11_client(self):
        r, _ = self.pair("GET", "/until-close")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"body until the close")
        self.assertEqual(h.hdr(r.headers, "transfer-encoding"), "chunked")

    def test_close_delimited_body_to_http10_client_ends_with_the_connection(self):
        with h.RawConn(self.port, timeout=2) as c:
            c.send(h.build_request("GET", "/until-close", version="HTTP/1.0"))
            data = c.read_all_until_close()
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(body, b"body until the close")

    def test_chunked_with_trailers(self):
        r, opened = self.pair("GET", "/trailers")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"ok")
        self.assertLessEqual(opened, 1)

    def test_headers_named_by_any_connection_header_are_dropped(self):
        r, opened = self.pair("GET", "/two-connection")
        self.assertEqual(r.status, 200)
        self.assertIsNone(h.hdr(r.headers, "x-gone"))
        self.assertIsNone(h.hdr(r.headers, "x-also"))
        self.assertIsNone(h.hdr(r.headers, "connection"))
        self.assertEqual(h.hdr(r.headers, "x-stay"), "2")
        self.assertLessEqual(opened, 1)

    def test_bad_transfer_codings_are_502(self):
        for path, why in (("/te-gzip", "unsupported Transfer-Encoding"),
                          ("/te-gzip-chunked", "unsupported Transfer-Encoding"),
                          ("/te-twice", "unsupported Transfer-Encoding"),
                          ("/te-cl", "Content-Length"),
                          ("/huge-head", "response header section over 256 KiB")):
            with self.subTest(path=path):
                r, _ = self.pair("GET", path)
                self.assertJsonError(r, 502, "upstream_protocol_error")
                self.assertIn(why, r.json()["error"]["message"])


if __name__ == "__main__":
    unittest.main()
