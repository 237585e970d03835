"""Malformed and request-smuggling inputs, and the request limits. Every bad request gets
a JSON error with Connection: close, and then an orderly close (FIN, not RST)."""

import select
import sys
import time
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

MAX_HEADER_BYTES = 4096
MAX_HEADERS = 20
MAX_BODY = 65536
HEADER_TIMEOUT_MS = 300

BAD = (400,)

# name -> (request bytes, acceptable statuses). Each ends so that the parser has a complete
# header section (or more) to judge; nothing is left waiting for more input.
CASES = {
    "cl_and_te": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n", BAD),
    "te_and_cl": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"0\r\n\r\n", BAD),
    "two_different_content_lengths": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", BAD),
    "duplicate_identical_content_length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", BAD),
    "content_length_list": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!", BAD),
    "te_identity": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", (400, 501)),
    "te_gzip_chunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", (400, 501)),
    "te_chunked_identity": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", (400, 501)),
    "te_chunked_twice": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n", BAD),
    "te_xchunked": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", (400, 501)),
    "te_in_http10": (
        b"POST /echo HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", BAD),
    "space_before_colon": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello", BAD),
    "paren_in_header_name": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX(Foo): bar\r\n\r\n", BAD),
    "non_ascii_header_name": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-F\xc3\xb6o: bar\r\n\r\n", BAD),
    "empty_header_name": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\n: bar\r\n\r\n", BAD),
    "header_without_colon": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n", BAD),
    "bare_lf_line_endings": (
        b"GET /echo HTTP/1.1\nHost: x\nX-A: b\n\n", BAD),
    "bare_lf_in_header_section": (
        b"GET /echo HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", BAD),
    "bare_cr_in_header_value": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", BAD),
    "obs_fold": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: first\r\n  continued\r\n\r\n", BAD),
    "nul_in_header_value": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", BAD),
    "nul_in_header_name": (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-\x00A: b\r\n\r\n", BAD),
    "missing_host_http11": (
        b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n", BAD),
    "two_host_headers": (
        b"GET /echo HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", BAD),
    "host_with_space": (
        b"GET /echo HTTP/1.1\r\nHost: exa mple.com\r\n\r\n", BAD),
    "host_with_path": (
        b"GET /echo HTTP/1.1\r\nHost: evil.example/path\r\n\r\n", BAD),
    "invalid_chunk_size": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\nhello\r\n0\r\n\r\n", BAD),
    "chunk_size_overflow": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", (400, 413)),
    "chunk_data_without_crlf": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", BAD),
    "negative_content_length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", BAD),
    "non_numeric_content_length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", BAD),
    "plus_content_length": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", BAD),
    "content_length_overflow": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n", (400, 413)),
    "absolute_form_target": (
        b"GET http://example.com/echo HTTP/1.1\r\nHost: example.com\r\n\r\n", BAD),
    "authority_form_get": (
        b"GET example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", BAD),
    "authority_form_connect": (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", (400, 405)),
    "invalid_method_chars": (
        b"G@T /echo HTTP/1.1\r\nHost: x\r\n\r\n", (400, 405, 501)),
    "unknown_method": (
        b"FROBNICATE /echo HTTP/1.1\r\nHost: x\r\n\r\n", (400, 405, 501)),
    "http_2_0_version": (
        b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", (400, 505)),
    "http_1_2_version": (
        b"GET /echo HTTP/1.2\r\nHost: x\r\n\r\n", (400, 505)),
    "lowercase_http_version": (
        b"GET /echo http/1.1\r\nHost: x\r\n\r\n", BAD),
    "http_0_9_request_line": (
        b"GET /echo\r\n\r\n", (400, 505)),
    "garbage_bytes": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8f\xa1\x00\xff\r\n\r\n", BAD),
    "two_spaces_in_request_line": (
        b"GET  /echo HTTP/1.1\r\nHost: x\r\n\r\n", BAD),
    "space_in_target": (
        b"GET /echo /x HTTP/1.1\r\nHost: x\r\n\r\n", BAD),
    "unsupported_expect": (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 5\r\n\r\nhello", (417,)),
}


class MalformedTest(h.SluiceTestCase):

    @classmethod
    def setUpEnv(cls):
        cls.mock = cls.env.mock("m")
        limits = {
            "max_header_bytes": MAX_HEADER_BYTES,
            "max_headers": MAX_HEADERS,
            "max_body_bytes": MAX_BODY,
            "header_timeout_ms": HEADER_TIMEOUT_MS,
            "idle_timeout_ms": 60000,
            "drain_timeout_ms": 2000,
        }
        cls.sluice = cls.env.sluice(h.make_config({"p": h.make_pool([cls.mock])},
                                                  [{"path": "/", "pool": "p"}], limits=limits))
        cls.port = cls.sluice.port

    def assert_still_serving(self):
        with h.RawConn(self.port) as c:
            r = c.request("POST", "/echo/ok", body=b"fine")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["body_sha256"], h.sha256(b"fine"))

    def assert_rejected(self, c, statuses, etype=None, method="GET"):
        """Reads the error response from c; checks JSON, Connection: close and a clean close."""
        r = c.read_response(method)
        self.assertIn(r.status, statuses, r)
        self.assertJsonError(r, r.status, etype)
        self.assertTrue(r.has_token("connection", "close"), "no Connection: close: %r" % r.headers)
        self.assertEqual(c.closed_state(), ("fin", b""), "connection not closed cleanly after %r" % r)
        return r

    def test_malformed_requests(self):
        self.mock.reset_stats()
        for name, (data, statuses) in CASES.items():
            with self.subTest(case=name):
                with h.RawConn(self.port) as c:
                    c.send(data)
                    self.assert_rejected(c, statuses)
        # none of them reached the upstream
        self.assertEqual(self.mock.stats()["requests"], 0)
        self.assert_still_serving()

    def test_bad_request_error_type(self):
        with h.RawConn(self.port) as c:
            c.send(CASES["cl_and_te"][0])
            self.assert_rejected(c, (400,), "bad_request")

    def test_bad_request_after_good_pipelined(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/first") + CASES["two_different_content_lengths"][0]
                   + h.build_request("GET", "/echo/never"))
            r = c.read_response()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.json()["url"], "/echo/first")
            self.assert_rejected(c, (400,), "bad_request")
        self.assert_still_serving()

    def test_bad_request_sent_byte_by_byte(self):
        data = CASES["obs_fold"][0]
        with h.RawConn(self.port) as c:
            for i in range(len(data)):
                c.send(data[i:i + 1])
            self.assert_rejected(c, (400,))

    # --- limits ----------------------------------------------------------------------------

    def test_header_section_too_large(self):
        cases = {
            "one_big_header": [("X-Big", "a" * (MAX_HEADER_BYTES + 10))],
            "many_medium_headers": [("X-H%d" % i, "b" * 400) for i in range(12)],
        }
        for name, headers in cases.items():
            with self.subTest(case=name):
                with h.RawConn(self.port) as c:
                    c.send(h.build_request("GET", "/echo/big-headers", headers))
                    self.assert_rejected(c, (431,), "headers_too_large")
        self.assert_still_serving()

    def test_request_line_too_long(self):
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/" + "u" * (MAX_HEADER_BYTES + 100)))
            self.assert_rejected(c, (414, 431))
        self.assert_still_serving()

    def test_headers_just_under_limit_accepted(self):
        headers = [("X-H%d" % i, "v") for i in range(MAX_HEADERS - 1)]  # + Host = MAX_HEADERS
        with h.RawConn(self.port) as c:
            r = c.request("GET", "/echo/many-ok", headers)
            self.assertEqual(r.status, 200, r)
            r = c.request("GET", "/echo/biggish", [("X-Big", "c" * (MAX_HEADER_BYTES // 2))])
            self.assertEqual(r.status, 200, r)

    def test_too_many_headers(self):
        headers = [("X-H%d" % i, "v") for i in range(MAX_HEADERS + 1)]
        with h.RawConn(self.port) as c:
            c.send(h.build_request("GET", "/echo/many", headers))
            self.assert_rejected(c, (431,), "headers_too_large")
        self.assert_still_serving()

    def test_body_too_large_content_length(self):
        # Only the head is sent: the 413 must come without waiting for the body.
        with h.RawConn(self.port, timeout=3) as c:
            t0 = time.monotonic()
            c.send(h.build_request("POST", "/echo/big", [("Content-Length", str(MAX_BODY + 1))]))
            r = self.assert_rejected(c, (413,), "request_too_large", method="POST")
            self.assertLess(r.t_head - t0, 1.0)
        self.assert_still_serving()

    def test_body_too_large_content_length_body_already_sent(self):
        # the client sends the whole (too large) body anyway: it still reads the 413 and
        # sees an orderly close, not a reset
        body = b"q" * (MAX_BODY * 3)
        with h.RawConn(self.port, timeout=5) as c:
            import threading
            t = threading.Thread(target=lambda: self._send_quietly(c, h.build_request("POST", "/echo/big", body=body)))
            t.start()
            self.assert_rejected(c, (413,), "request_too_large", method="POST")
            t.join(5)
        self.assert_still_serving()

    @staticmethod
    def _send_quietly(c, data):
        try:
            c.send(data)
        except OSError:
            pass

    def test_body_too_large_with_expect_gets_no_100(self):
        with h.RawConn(self.port, timeout=3) as c:
            c.send(h.build_request("POST", "/echo/big", [("Content-Length", str(MAX_BODY * 4)),
                                                         ("Expect", "100-continue")]))
            r = self.assert_rejected(c, (413,), "request_too_large", method="POST")
            self.assertEqual(r.interim, [])

    def test_body_at_limit_accepted(self):
        body = b"z" * MAX_BODY
        with h.RawConn(self.port) as c:
            r = c.request("POST", "/echo/at-limit", body=body)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["body_length"], MAX_BODY)
            c.send(h.build_request("POST", "/echo/at-limit-chunked", [("Transfer-Encoding", "chunked")])
                   + h.chunked(body, [10000]))
            r = c.read_response()
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["body_length"], MAX_BODY)

    def test_body_too_large_chunked(self):
        body = b"y" * (MAX_BODY + 5000)
        with h.RawConn(self.port, timeout=3) as c:
            c.send(h.build_request("POST", "/echo/big-chunked", [("Transfer-Encoding", "chunked")])
                   + h.chunked(body, [8192]))
            self.assert_rejected(c, (413,), "request_too_large", method="POST")
        self.assert_still_serving()

    def test_header_timeout_slowloris(self):
        with h.RawConn(self.port, timeout=5) as c:
            t0 = time.monotonic()
            c.send(b"GET /echo/slow HTTP/1.1\r\nHost: x\r\nX-Partial: abc")
            r = self.assert_rejected(c, (408,), "request_timeout")
            elapsed = r.t_head - t0
            self.assertGreaterEqual(elapsed, HEADER_TIMEOUT_MS / 1000.0 * 0.9)
            self.assertLess(elapsed, HEADER_TIMEOUT_MS / 1000.0 + 1.5)
        self.assert_still_serving()

    def test_header_timeout_on_second_request(self):
        with h.RawConn(self.port, timeout=5) as c:
            r = c.request("GET", "/echo/first")
            self.assertEqual(r.status, 200)
            time.sleep(0.05)
            t0 = time.monotonic()
            c.send(b"GET /echo/second HTTP/1.1\r\nHost: x\r\n")
            r = self.assert_rejected(c, (408,), "request_timeout")
            self.assertGreaterEqual(r.t_head - t0, HEADER_TIMEOUT_MS / 1000.0 * 0.9)
            self.assertLess(r.t_head - t0, HEADER_TIMEOUT_MS / 1000.0 + 1.5)

    def test_header_timeout_trickle(self):
        # Bytes keep coming, but the header section is not complete in time.
        with h.RawConn(self.port, timeout=5) as c:
            t0 = time.monotonic()
            c.send(b"GET /echo/trickle HTTP/1.1\r\nHost: x\r\n")
            for i in range(40):
                try:
                    c.send(b"X-T%d: v\r\n" % i)
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.05)
                if select.select([c.sock], [], [], 0)[0]:
                    break
            r = self.assert_rejected(c, (408,), "request_timeout")
            self.assertLess(r.t_head - t0, HEADER_TIMEOUT_MS / 1000.0 + 1.5)


if __name__ == "__main__":
    unittest.main()
